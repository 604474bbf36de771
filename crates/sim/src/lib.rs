//! A deterministic simulator for mendkv clusters, in the spirit of TigerBeetle's VOPR and
//! FoundationDB's simulation.
//!
//! Many [`Node`]s run in one process, driven through the same sans-IO interface the tokio
//! server drives (`handle_*`, `poll_action`, group commit), over a simulated network, clock
//! and disk. Every random choice (delays, losses, faults, the workload) is drawn from
//! ChaCha8 streams derived from one `u64` seed, all state lives in ordered collections, and
//! nothing reads the wall clock, so a seed replays byte for byte: a failure found on seed
//! `X` is reproduced by running seed `X` again, with a full trace.
//!
//! Why: distributed bugs live in the interleavings of messages, timeouts, crashes and
//! fsyncs. A simulator explores thousands of interleavings per minute (a simulated hour
//! runs in seconds) and makes every one of them replayable, which no test against real
//! sockets can do.
//!
//! # Layout
//! - [`Simulation`] (this file): the event loop (a queue ordered by virtual time and a
//!   sequence number), nodes with skewed clocks, crash / restart / pause, the disk model
//!   (fsync latency, what a crash keeps), the fault schedule, the workload driver, the final
//!   heal-and-check phase, and the scripted API used by `tests/scenarios.rs`.
//! - [`network`]: per-message delay, loss, duplication, reordering, partitions.
//! - [`workload`]: clients, the operations they issue, and the history of outcomes.
//! - [`checker`]: lost / missed / unexpected / resurrected / stale / converged.
//! - `main.rs`: the seed runner (`cargo run --release -p mendkv-sim -- --seeds 100`).
//!
//! # The models
//! - **Time**: one virtual clock in milliseconds. Each node sees `now + offset + drift`
//!   (skew), which stays monotonic per node; a node's timers are scheduled at the virtual
//!   time its skewed clock reaches `next_deadline()`.
//! - **Disk**: [`MemoryStorage`] keeps synced and pending writes apart. After a node has
//!   handled an input, if it needs a sync and none is in flight, the simulator calls
//!   `begin_sync` and completes it (`storage.sync()` then `finish_sync`) 0-5 ms later in
//!   virtual time (sometimes up to 40 ms), one sync at a time, as the server does. With the
//!   `fsync` fault some syncs fail: `finish_sync` gets an error and the writes stay
//!   unsynced in the storage (a later crash may lose them).
//! - **Crash**: the node is dropped; its storage keeps what was synced plus a random prefix
//!   of the unsynced writes (a disk may persist some of them anyway). Its peers learn it
//!   is down after 0-20 ms (`handle_peer_status(Down)`: the TCP connection closed), and
//!   messages sent to it meanwhile fail at once (`handle_send_failed`: connection
//!   refused). Messages in flight to it are lost; messages it sent before dying still
//!   arrive. Clients waiting on it get "unknown".
//!   A restart opens a new `Node` on the same storage (a new epoch), tells it every member,
//!   and tells the peers it is up.
//! - **Pause**: the node stops handling anything (a GC pause, SIGSTOP); whatever arrives
//!   waits and is handled, in order, when it resumes. Peers are not told.
//! - **Partitions**: cut directed links drop messages silently (see [`network`]).
//! - **Clients**: each has one operation in flight, sent to a random node; a request to a
//!   crashed node fails at once (connection refused); a client gives up after 5 s.
//!
//! # A run
//! 1. Faults and the workload run until the workload has invoked and finished `ops`
//!    operations.
//! 2. Heal: faults stop, partitions heal, paused nodes resume, crashed nodes restart, the
//!    network stops losing and duplicating; the cluster gets a quiet period.
//! 3. Final reads at level `all` of every key, through random nodes (retried if needed).
//! 4. Another quiet period, then the checkers ([`checker`]).
//!
//! Every run is bounded: at most `max_steps` events and `max_sim_ms` of virtual time; a
//! run that reaches a bound fails and says so, it never hangs.

pub mod checker;
pub mod network;
pub mod workload;

pub use checker::CheckReport;
pub use workload::{ContextSource, History, Op, OpId, OpKind, Outcome};

use mendkv_core::config::{FsyncPolicy, NodeConfig};
use mendkv_core::membership::{MemberInfo, PeerStatus};
use mendkv_core::message::{ClientRequest, ClientResponse, DurableAnswerKey, Message, RequestId};
use mendkv_core::node::{Action, Node, SyncTicket};
use mendkv_core::quorum::ConsistencyLevel;
use mendkv_core::ring::Ring;
use mendkv_core::storage::{MemoryStorage, Storage, StorageError};
use mendkv_core::version::{Actor, CausalContext, Object, Value};
use mendkv_core::{Millis, NodeId};
use network::{Network, NetworkParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use workload::{Client, OkResult, WorkloadParams};

/// The bucket every simulated client uses.
pub const BUCKET: &str = "sim";
/// Quiet period after healing, before the final reads and again before the checks. Longer
/// than the request timeout, so every request still in flight has ended.
pub const QUIET_MS: Millis = 5_000;
/// The request timeout of simulated nodes.
pub const REQUEST_TIMEOUT_MS: Millis = 1_000;

// ----- configuration ---------------------------------------------------------------------

/// Which faults a run may inject. Parsed from `--faults` (`none`, `all`, or a comma list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultConfig {
    pub loss: bool,
    pub duplicate: bool,
    pub reorder: bool,
    pub partition: bool,
    pub crash: bool,
    pub pause: bool,
    pub skew: bool,
    /// An fsync fails now and then (the disk reports an I/O error; the writes stay
    /// unsynced and a later crash may lose them).
    pub fsync: bool,
}

/// The names `--faults` accepts, in canonical order.
pub const FAULT_NAMES: [&str; 8] = [
    "loss",
    "duplicate",
    "reorder",
    "partition",
    "crash",
    "pause",
    "skew",
    "fsync",
];

impl FaultConfig {
    pub fn none() -> Self {
        FaultConfig::default()
    }

    pub fn all() -> Self {
        FaultConfig {
            loss: true,
            duplicate: true,
            reorder: true,
            partition: true,
            crash: true,
            pause: true,
            skew: true,
            fsync: true,
        }
    }

    fn flags(&self) -> [bool; 8] {
        [
            self.loss,
            self.duplicate,
            self.reorder,
            self.partition,
            self.crash,
            self.pause,
            self.skew,
            self.fsync,
        ]
    }

    fn flag_mut(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "loss" => &mut self.loss,
            "duplicate" => &mut self.duplicate,
            "reorder" => &mut self.reorder,
            "partition" => &mut self.partition,
            "crash" => &mut self.crash,
            "pause" => &mut self.pause,
            "skew" => &mut self.skew,
            "fsync" => &mut self.fsync,
            _ => return None,
        })
    }

    /// Parses `none`, `all`, or a comma-separated list of [`FAULT_NAMES`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text {
            "none" => return Ok(FaultConfig::none()),
            "all" => return Ok(FaultConfig::all()),
            "" => return Err(format!("empty fault list: {}", Self::help())),
            _ => {}
        }
        let mut faults = FaultConfig::none();
        for name in text.split(',').map(str::trim) {
            if name == "none" || name == "all" {
                return Err(format!("{name:?} cannot be combined with other faults"));
            }
            match faults.flag_mut(name) {
                Some(flag) if *flag => return Err(format!("fault {name:?} is listed twice")),
                Some(flag) => *flag = true,
                None => return Err(format!("unknown fault {name:?}: {}", Self::help())),
            }
        }
        Ok(faults)
    }

    fn help() -> String {
        format!(
            "use none, all, or a comma list of {}",
            FAULT_NAMES.join(", ")
        )
    }

    pub fn is_none(&self) -> bool {
        !self.flags().iter().any(|f| *f)
    }

    /// True when these faults can keep a write from reaching every replica: a lost message,
    /// a crash, a partition, a pause long enough for the coordinator to time out before it
    /// replicates, or a duplicated (non-idempotent) `Coordinate`. Without them (reorder and
    /// skew keep every message, and delays stay below the request timeout) replicas agree
    /// even before any repair.
    pub fn breaks_replication(&self) -> bool {
        self.loss || self.duplicate || self.partition || self.crash || self.pause || self.fsync
    }
}

impl fmt::Display for FaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            return f.write_str("none");
        }
        if *self == FaultConfig::all() {
            return f.write_str("all");
        }
        let names: Vec<&str> = FAULT_NAMES
            .iter()
            .zip(self.flags())
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl std::str::FromStr for FaultConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultConfig::parse(s)
    }
}

/// Everything that defines a run. Together with the commit, `seed` and these fields
/// determine the run exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    /// Operations the workload invokes.
    pub ops: usize,
    pub faults: FaultConfig,
    /// Bound on events handled in one run.
    pub max_steps: u64,
    /// Bound on virtual time of one run.
    pub max_sim_ms: Millis,
    /// Keep a line-per-event trace.
    pub trace: bool,
    /// Fail the seed when replicas have not converged at the end.
    pub require_convergence: bool,
}

/// Largest cluster the runner accepts.
pub const MAX_NODES: usize = 32;

impl SimConfig {
    /// Five nodes, 1,000 operations, every fault, convergence required.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 5,
            ops: 1000,
            faults: FaultConfig::all(),
            max_steps: 2_000_000,
            max_sim_ms: 3_600_000,
            trace: false,
            require_convergence: true,
        }
    }

    pub fn with_faults(mut self, faults: FaultConfig) -> Self {
        self.faults = faults;
        self
    }

    /// Rejects what the simulator cannot honour, with a reason.
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return Err(format!(
                "--nodes must be 1..={MAX_NODES} (got {})",
                self.nodes
            ));
        }
        if self.ops == 0 {
            return Err("--ops must be at least 1".into());
        }
        if self.faults.partition && self.nodes < 2 {
            return Err("the partition fault needs at least 2 nodes".into());
        }
        if self.max_steps == 0 {
            return Err("--max-steps must be at least 1".into());
        }
        Ok(())
    }

    /// The command line that replays this run.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run --release -p mendkv-sim -- --seed {} --nodes {} --ops {} --faults {}",
            self.seed, self.nodes, self.ops, self.faults
        );
        if !self.require_convergence {
            cmd.push_str(" --no-require-convergence");
        }
        if self.max_steps != SimConfig::new(0).max_steps {
            write!(cmd, " --max-steps {}", self.max_steps).ok();
        }
        cmd
    }
}

// ----- nodes -----------------------------------------------------------------------------

/// A node's skewed clock: `local = t + offset + t * drift_ppm / 1e6`, monotonic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    pub offset_ms: Millis,
    /// Drift in parts per million, within (-1e6, 1e6).
    pub drift_ppm: i64,
}

impl Clock {
    pub fn local(&self, t: Millis) -> Millis {
        let t = i128::from(t);
        let local = t + i128::from(self.offset_ms) + t * i128::from(self.drift_ppm) / 1_000_000;
        local.max(0) as Millis
    }

    /// The first virtual time at or after `now` when the local clock reads `deadline`.
    pub fn virtual_at(&self, now: Millis, deadline: Millis) -> Millis {
        let here = self.local(now);
        if deadline <= here {
            return now;
        }
        let rate = 1_000_000 + i128::from(self.drift_ppm);
        let gap = i128::from(deadline - here);
        let mut t = now.saturating_add(((gap * 1_000_000 + rate - 1) / rate) as Millis);
        while self.local(t) < deadline {
            t += 1;
        }
        while t > now && self.local(t - 1) >= deadline {
            t -= 1;
        }
        t
    }
}

struct Slot {
    id: NodeId,
    storage: MemoryStorage,
    node: Option<Node<MemoryStorage>>,
    /// Grows on every restart; events addressed to an older life are dropped.
    incarnation: u64,
    paused: bool,
    /// Events that arrived while paused, in arrival order.
    stalled: Vec<Event>,
    syncing: bool,
    /// The queue key of this node's pending tick.
    tick: Option<(Millis, u64)>,
    clock: Clock,
}

impl Slot {
    fn alive(&self) -> bool {
        self.node.is_some()
    }
}

#[derive(Debug, Clone)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        incarnation: u64,
        message: Message,
    },
    Tick {
        node: usize,
        incarnation: u64,
    },
    SyncDone {
        node: usize,
        incarnation: u64,
        ticket: SyncTicket,
    },
    PeerStatus {
        observer: usize,
        observer_incarnation: u64,
        peer: usize,
        peer_incarnation: u64,
        status: PeerStatus,
    },
    ClientArrive {
        op: OpId,
    },
    ClientTimeout {
        op: OpId,
    },
    ClientNext {
        client: usize,
    },
    FaultTick,
    Restart {
        node: usize,
    },
    Resume {
        node: usize,
    },
    HealPartition,
}

impl Event {
    /// The node that handles this event (for pauses).
    fn target(&self) -> Option<usize> {
        match self {
            Event::Deliver { to, .. } => Some(*to),
            Event::SyncDone { node, .. } => Some(*node),
            Event::PeerStatus { observer, .. } => Some(*observer),
            _ => None,
        }
    }
}

/// What a run did and what the checkers found.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub config: SimConfig,
    pub check: CheckReport,
    /// Events handled.
    pub steps: u64,
    /// Virtual time at the end.
    pub sim_ms: Millis,
    /// Set when the run stopped at its step or time bound.
    pub bound: Option<String>,
    /// (ok, failed, unknown, pending) of the workload's operations.
    pub tally: (usize, usize, usize, usize),
    /// The parameters the seed chose (network, workload, clocks).
    pub params: String,
    pub history: History,
    pub trace: Option<String>,
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.bound.is_none()
            && self.check.safe()
            && (!self.config.require_convergence || self.check.converged())
    }

    /// One line: seed, verdict, checker figures.
    pub fn summary(&self) -> String {
        let (ok, failed, unknown, pending) = self.tally;
        let mut line = format!(
            "seed {} {}: {} | ops ok={ok} failed={failed} unknown={unknown} pending={pending} | {} events, {:.1}s simulated",
            self.config.seed,
            if self.passed() { "passed" } else { "FAILED" },
            self.check,
            self.steps,
            self.sim_ms as f64 / 1000.0
        );
        if let Some(bound) = &self.bound {
            write!(line, " | {bound}").ok();
        }
        line
    }

    /// The history of the keys involved in violations, for failure reports.
    pub fn key_histories(&self, max_keys: usize) -> String {
        let mut out = String::new();
        for key in self.check.keys().into_iter().take(max_keys) {
            writeln!(out, "history of {key}:").ok();
            for op in self.history.for_key(&key) {
                writeln!(out, "  {op}").ok();
            }
        }
        out
    }
}

/// Runs one seed from start to verdict.
pub fn run_seed(config: &SimConfig) -> RunReport {
    let (mut report, _) = run_once(config, BTreeSet::new());
    // A resurrected or stale value is often one the cluster applied more than once (a
    // duplicated or retried `Coordinate`). Replay the seed watching those values and say
    // under which dots they travelled.
    let suspects: BTreeSet<String> = report
        .check
        .resurrected
        .iter()
        .chain(&report.check.stale)
        .filter_map(|v| v.value.clone())
        .collect();
    if !suspects.is_empty() {
        let mut quiet = config.clone();
        quiet.trace = false;
        let (_, dots) = run_once(&quiet, suspects);
        for v in report
            .check
            .resurrected
            .iter_mut()
            .chain(report.check.stale.iter_mut())
        {
            let seen = v.value.as_ref().and_then(|value| dots.get(value));
            if let Some(seen) = seen.filter(|d| d.len() > 1) {
                let list: Vec<&str> = seen.iter().map(String::as_str).collect();
                write!(
                    v.detail,
                    " [the cluster applied this write {} times: dots {}]",
                    seen.len(),
                    list.join(", ")
                )
                .ok();
            }
        }
    }
    report
}

/// One run; also returns the dots under which the `watch`ed values travelled.
fn run_once(
    config: &SimConfig,
    watch: BTreeSet<String>,
) -> (RunReport, BTreeMap<String, BTreeSet<String>>) {
    let mut sim = Simulation::new(config.clone());
    sim.watch = watch;
    sim.start_workload();
    sim.run_until(|s| s.workload_done(), Millis::MAX);
    let check = sim.finish();
    let dots = std::mem::take(&mut sim.watched_dots);
    (sim.report(check), dots)
}

/// A simulated cluster.
pub struct Simulation {
    config: SimConfig,
    now: Millis,
    seq: u64,
    queue: BTreeMap<(Millis, u64), Event>,
    slots: Vec<Slot>,
    index: BTreeMap<NodeId, usize>,
    members: Vec<MemberInfo>,
    ring: Ring,
    network: Network,
    rng_net: ChaCha8Rng,
    rng_work: ChaCha8Rng,
    rng_fault: ChaCha8Rng,
    rng_disk: ChaCha8Rng,
    history: History,
    /// Requests not yet handed to their coordinator.
    requests: BTreeMap<OpId, ClientRequest>,
    /// Operations a coordinator has (or has stalled), by node.
    in_flight: BTreeMap<OpId, usize>,
    responses: BTreeMap<OpId, ClientResponse>,
    clients: Vec<Client>,
    workload: Option<WorkloadParams>,
    ops_issued: usize,
    faults_active: bool,
    /// A crash waiting for its moment: node `.0` crashes as soon as it holds unsynced
    /// writes (the interesting case for durability), or at virtual time `.1` at the latest.
    armed_crash: Option<(usize, Millis)>,
    /// Probability that an fsync fails (the `fsync` fault), while faults are on.
    fsync_failure: f64,
    /// Nodes whose next fsync fails (scripted).
    fail_next_fsync: BTreeSet<usize>,
    /// Values whose dots to record as they travel (diagnosis of a failed seed).
    watch: BTreeSet<String>,
    watched_dots: BTreeMap<String, BTreeSet<String>>,
    trace: Option<String>,
    /// Actor hashes to node names, so traces print dots as `n3.1:2` (node n3, epoch 1,
    /// counter 2).
    names: Names,
    steps: u64,
    bound: Option<String>,
    params: String,
    /// The durability audit: for each write request a node handled (node, incarnation,
    /// sender, answer key), how many writes its storage had made by then. Its successful
    /// answer may leave only once that many writes are synced.
    awaiting_durable_answer: BTreeMap<(usize, u64, usize, DurableAnswerKey), u64>,
    /// Answers that claimed durability before their writes were synced.
    unsynced_acknowledgements: Vec<checker::Violation>,
}

/// Bound on the durability audit's ledger (requests whose answer was never sent, say
/// because the node crashed, are forgotten oldest first).
const MAX_AWAITING_DURABLE_ANSWERS: usize = 100_000;

impl Simulation {
    /// Builds the cluster (every node knows every member) with the seed's parameters. The
    /// config should have been validated ([`SimConfig::validate`]).
    pub fn new(config: SimConfig) -> Self {
        let mut master = ChaCha8Rng::seed_from_u64(config.seed);
        // Independent streams, so (for example) a different fault schedule does not change
        // the workload.
        let mut rng_net = ChaCha8Rng::seed_from_u64(master.gen());
        let rng_work = ChaCha8Rng::seed_from_u64(master.gen());
        let mut rng_fault = ChaCha8Rng::seed_from_u64(master.gen());
        let rng_disk = ChaCha8Rng::seed_from_u64(master.gen());

        let faults = config.faults;
        let max_delay = if rng_net.gen_bool(0.2) {
            rng_net.gen_range(10..=60)
        } else {
            rng_net.gen_range(1..=10)
        };
        let params = NetworkParams {
            min_delay_ms: 1,
            max_delay_ms: max_delay,
            loss: if faults.loss {
                rng_net.gen_range(0.001..0.05)
            } else {
                0.0
            },
            duplicate: if faults.duplicate {
                rng_net.gen_range(0.001..0.05)
            } else {
                0.0
            },
            reorder: if faults.reorder {
                rng_net.gen_range(0.01..0.2)
            } else {
                0.0
            },
            detour_max_ms: if faults.reorder {
                rng_net.gen_range(20..=500)
            } else {
                0
            },
        };

        let members: Vec<MemberInfo> = (0..config.nodes)
            .map(|i| MemberInfo {
                id: NodeId::new(format!("n{i}")),
                peer_address: format!("sim:n{i}"),
                http_address: format!("sim-http:n{i}"),
            })
            .collect();
        let proto = node_config(&members[0].id, config.seed, 0);
        let ring = Ring::new(
            members.iter().map(|m| &m.id),
            proto.vnodes,
            proto.replication_factor,
        );
        let mut sim = Simulation {
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            slots: Vec::new(),
            index: members
                .iter()
                .enumerate()
                .map(|(i, m)| (m.id.clone(), i))
                .collect(),
            members: members.clone(),
            ring,
            network: Network::new(params.clone()),
            rng_net,
            rng_work,
            rng_fault: rng_fault.clone(),
            rng_disk,
            history: History::default(),
            requests: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            responses: BTreeMap::new(),
            clients: Vec::new(),
            workload: None,
            ops_issued: 0,
            faults_active: false,
            armed_crash: None,
            fsync_failure: 0.0,
            fail_next_fsync: BTreeSet::new(),
            watch: BTreeSet::new(),
            watched_dots: BTreeMap::new(),
            trace: config.trace.then(String::new),
            names: Names::new(&members),
            steps: 0,
            bound: None,
            params: String::new(),
            awaiting_durable_answer: BTreeMap::new(),
            unsynced_acknowledgements: Vec::new(),
            config,
        };
        let mut clocks = Vec::new();
        for (i, info) in members.iter().enumerate() {
            let clock = if faults.skew {
                Clock {
                    offset_ms: rng_fault.gen_range(0..=10_000),
                    drift_ppm: rng_fault.gen_range(-50_000..=50_000),
                }
            } else {
                Clock::default()
            };
            clocks.push(format!(
                "n{i}:{:+}ms/{:+}ppm",
                clock.offset_ms, clock.drift_ppm
            ));
            let storage = MemoryStorage::new();
            let mut node = Node::new(
                node_config(&info.id, sim.config.seed, 0),
                storage.clone(),
                clock.local(0),
            )
            .expect("memory storage does not fail");
            for member in &members {
                node.handle_member_discovered(member.clone());
            }
            sim.slots.push(Slot {
                id: info.id.clone(),
                storage,
                node: Some(node),
                incarnation: 0,
                paused: false,
                stalled: Vec::new(),
                syncing: false,
                tick: None,
                clock,
            });
        }
        sim.rng_fault = rng_fault;
        sim.params = format!(
            "nodes={} faults={} net: delay {}-{}ms loss {:.3} dup {:.3} reorder {:.3} detour<={}ms; clocks {}",
            sim.config.nodes,
            faults,
            params.min_delay_ms,
            params.max_delay_ms,
            params.loss,
            params.duplicate,
            params.reorder,
            params.detour_max_ms,
            clocks.join(" ")
        );
        let line = format!("seed {} {}", sim.config.seed, sim.params);
        sim.trace_line("sim", |_| line);
        for i in 0..sim.slots.len() {
            sim.flush(i);
        }
        sim
    }

    // ----- accessors (for scenarios and checkers) ------------------------------------

    pub fn now(&self) -> Millis {
        self.now
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn nodes(&self) -> usize {
        self.slots.len()
    }

    /// The storage of node `i` (survives crashes).
    pub fn storage(&self, i: usize) -> &MemoryStorage {
        &self.slots[i].storage
    }

    /// The stored object of a key on node `i` (pending writes included).
    pub fn stored(&self, i: usize, key: &str) -> Option<Object> {
        self.slots[i]
            .storage
            .get(BUCKET, key.as_bytes())
            .expect("memory storage does not fail")
    }

    pub fn is_alive(&self, i: usize) -> bool {
        self.slots[i].alive()
    }

    pub fn node(&self, i: usize) -> Option<&Node<MemoryStorage>> {
        self.slots[i].node.as_ref()
    }

    /// The replicas of a key, as node indexes, in preference order.
    pub fn preference_list(&self, key: &str) -> Vec<usize> {
        self.ring
            .preference_list_for_key(BUCKET, key.as_bytes())
            .iter()
            .map(|id| self.index[id])
            .collect()
    }

    /// The number of replicas of a key.
    pub fn replicas(&self) -> usize {
        self.ring.effective_replication()
    }

    /// The outcome of an operation.
    pub fn outcome(&self, op: OpId) -> &Outcome {
        &self.history.get(op).expect("known op").outcome
    }

    /// The coordinator's answer to an operation, if it answered.
    pub fn response(&self, op: OpId) -> Option<&ClientResponse> {
        self.responses.get(&op)
    }

    /// The trace so far (empty unless tracing is on).
    pub fn trace(&self) -> &str {
        self.trace.as_deref().unwrap_or("")
    }

    pub fn network_mut(&mut self) -> &mut Network {
        &mut self.network
    }

    /// The bound this run hit, if any.
    pub fn bound(&self) -> Option<&str> {
        self.bound.as_deref()
    }

    // ----- the event loop ------------------------------------------------------------

    fn schedule(&mut self, at: Millis, event: Event) -> (Millis, u64) {
        self.seq += 1;
        let key = (at.max(self.now), self.seq);
        self.queue.insert(key, event);
        key
    }

    fn trace_line(&mut self, who: &str, text: impl FnOnce(&Names) -> String) {
        if let Some(trace) = &mut self.trace {
            let _ = writeln!(trace, "{:>8} {who:<4} {}", self.now, text(&self.names));
        }
    }

    /// Handles the next event. False when nothing is left or a bound was hit.
    pub fn step(&mut self) -> bool {
        if self.bound.is_some() {
            return false;
        }
        if self.steps >= self.config.max_steps {
            let why = format!("hit step bound ({} events)", self.config.max_steps);
            self.trace_line("sim", |_| why.clone());
            self.bound = Some(why);
            return false;
        }
        let Some(((at, _), event)) = self.queue.pop_first() else {
            return false;
        };
        if at > self.config.max_sim_ms {
            let why = format!("hit time bound ({} ms simulated)", self.config.max_sim_ms);
            self.trace_line("sim", |_| why.clone());
            self.bound = Some(why);
            return false;
        }
        self.now = at;
        self.steps += 1;
        self.handle(event);
        if let Some((node, latest)) = self.armed_crash {
            let slot = &self.slots[node];
            if !slot.alive() || slot.paused || !self.faults_active {
                self.armed_crash = None;
            } else if slot.storage.pending_writes() > 0 || self.now >= latest {
                self.armed_crash = None;
                self.crash(node, None);
                let at = self.now + self.rng_fault.gen_range(100..=3000);
                self.schedule(at, Event::Restart { node });
            }
        }
        true
    }

    /// Steps until `done` holds (true) or `max_ms` of virtual time pass, the queue empties
    /// or a bound is hit (false).
    pub fn run_until(&mut self, mut done: impl FnMut(&Simulation) -> bool, max_ms: Millis) -> bool {
        let deadline = self.now.saturating_add(max_ms);
        loop {
            if done(self) {
                return true;
            }
            match self.queue.first_key_value() {
                Some((&(at, _), _)) if at <= deadline => {
                    if !self.step() {
                        return false;
                    }
                }
                _ => {
                    if deadline != Millis::MAX {
                        self.now = deadline;
                    }
                    return false;
                }
            }
        }
    }

    /// Runs `ms` of virtual time.
    pub fn run_for(&mut self, ms: Millis) {
        self.run_until(|_| false, ms);
    }

    fn handle(&mut self, event: Event) {
        if let Some(target) = event.target() {
            if self.slots[target].paused {
                self.slots[target].stalled.push(event);
                return;
            }
        }
        match event {
            Event::Deliver {
                from,
                to,
                incarnation,
                message,
            } => self.deliver(from, to, incarnation, message),
            Event::Tick { node, incarnation } => {
                let slot = &mut self.slots[node];
                if slot.incarnation != incarnation || !slot.alive() {
                    return;
                }
                slot.tick = None;
                if slot.paused {
                    return; // rescheduled on resume
                }
                let local = slot.clock.local(self.now);
                if let Some(n) = slot.node.as_mut() {
                    n.handle_tick(local);
                }
                self.flush(node);
            }
            Event::SyncDone {
                node,
                incarnation,
                ticket,
            } => {
                let slot = &mut self.slots[node];
                if slot.incarnation != incarnation || !slot.alive() {
                    return;
                }
                slot.syncing = false;
                let fail = self.fail_next_fsync.remove(&node)
                    || (self.fsync_failure > 0.0 && self.rng_disk.gen_bool(self.fsync_failure));
                let result = if fail {
                    Err(StorageError::Engine("injected fsync failure".into()))
                } else {
                    slot.storage.sync()
                };
                if let Some(n) = slot.node.as_mut() {
                    n.finish_sync(ticket, result);
                }
                self.trace_line(&format!("n{node}"), |_| {
                    if fail {
                        "fsync FAILED (injected)"
                    } else {
                        "fsync done"
                    }
                    .into()
                });
                self.flush(node);
            }
            Event::PeerStatus {
                observer,
                observer_incarnation,
                peer,
                peer_incarnation,
                status,
            } => {
                let p = &self.slots[peer];
                let current = p.incarnation == peer_incarnation
                    && match status {
                        PeerStatus::Up => p.alive(),
                        PeerStatus::Down => !p.alive(),
                    };
                let o = &self.slots[observer];
                if !current || o.incarnation != observer_incarnation || !o.alive() {
                    return;
                }
                let peer_id = p.id.clone();
                let local = o.clock.local(self.now);
                self.trace_line(&format!("n{observer}"), |_| {
                    format!("sees n{peer} {}", status.as_str())
                });
                if let Some(n) = self.slots[observer].node.as_mut() {
                    n.handle_peer_status(local, &peer_id, status);
                }
                self.flush(observer);
            }
            Event::ClientArrive { op } => self.client_arrive(op),
            Event::ClientTimeout { op } => {
                if self
                    .history
                    .get(op)
                    .is_some_and(|o| o.outcome == Outcome::Pending)
                {
                    self.in_flight.remove(&op);
                    self.requests.remove(&op);
                    self.complete(op, Outcome::Unknown("client gave up".into()), None);
                }
            }
            Event::ClientNext { client } => self.client_next(client),
            Event::FaultTick => self.fault_tick(),
            Event::Restart { node } => self.restart(node),
            Event::Resume { node } => self.resume(node),
            Event::HealPartition => self.heal_partition(),
        }
    }

    fn deliver(&mut self, from: usize, to: usize, incarnation: u64, message: Message) {
        let who = format!("n{to}");
        if !self.slots[to].alive() || self.slots[to].incarnation != incarnation {
            self.trace_line(&who, |names| {
                format!(
                    "lost {} from n{from} (receiver crashed)",
                    describe(&message, names)
                )
            });
            return;
        }
        if self.network.is_blocked(from, to) {
            self.trace_line(&who, |names| {
                format!(
                    "lost {} from n{from} (partitioned)",
                    describe(&message, names)
                )
            });
            return;
        }
        self.trace_line(&who, |names| {
            format!("recv {} from n{from}", describe(&message, names))
        });
        let from_id = self.slots[from].id.clone();
        let local = self.slots[to].clock.local(self.now);
        let durable_request = message.durable_request();
        if let Some(node) = self.slots[to].node.as_mut() {
            node.handle_message(local, &from_id, message);
        }
        if let Some(key) = durable_request {
            self.expect_durable_answer(to, from, key);
        }
        self.flush(to);
    }

    /// Carries out node `i`'s actions, starts a sync if one is needed, and reschedules its
    /// timer. Called after every input the node handles.
    fn flush(&mut self, i: usize) {
        loop {
            let action = match self.slots[i].node.as_mut() {
                Some(node) => node.poll_action(),
                None => return,
            };
            match action {
                None => break,
                Some(Action::Send { to, message }) => self.send(i, to, message),
                Some(Action::Reply { client, response }) => self.reply(i, client, response),
            }
        }
        let slot = &mut self.slots[i];
        if !slot.syncing {
            if let Some(ticket) = slot.node.as_mut().and_then(|n| n.begin_sync()) {
                slot.syncing = true;
                let incarnation = slot.incarnation;
                let latency = if self.rng_disk.gen_bool(0.05) {
                    self.rng_disk.gen_range(5..=40)
                } else {
                    self.rng_disk.gen_range(0..=5)
                };
                let pending = slot.storage.pending_writes();
                self.trace_line(&format!("n{i}"), |_| {
                    format!("fsync start ({pending} writes, {latency}ms)")
                });
                self.schedule(
                    self.now + latency,
                    Event::SyncDone {
                        node: i,
                        incarnation,
                        ticket,
                    },
                );
            }
        }
        self.schedule_tick(i);
    }

    fn schedule_tick(&mut self, i: usize) {
        let slot = &self.slots[i];
        let wanted = match &slot.node {
            Some(node) if !slot.paused => {
                let deadline = node.next_deadline();
                (deadline != Millis::MAX).then(|| slot.clock.virtual_at(self.now, deadline))
            }
            _ => None,
        };
        if wanted.is_some() && wanted == slot.tick.map(|(t, _)| t) {
            return;
        }
        if let Some(key) = self.slots[i].tick.take() {
            self.queue.remove(&key);
        }
        if let Some(at) = wanted {
            let incarnation = self.slots[i].incarnation;
            let key = self.schedule(
                at,
                Event::Tick {
                    node: i,
                    incarnation,
                },
            );
            self.slots[i].tick = Some(key);
        }
    }

    /// Records the dots of watched values found in a message's objects.
    fn watch_message(&mut self, message: &Message) {
        let objects: Vec<&Object> = match message {
            Message::Replicate { object, .. } | Message::RepairWrite { object, .. } => {
                vec![object]
            }
            Message::CoordinateReply { result: Ok(o), .. } => vec![o],
            Message::ReadReply {
                result: Ok(Some(o)),
                ..
            } => vec![o],
            _ => vec![],
        };
        for sibling in objects.iter().flat_map(|o| o.siblings()) {
            if let Some(value) = workload::value_text(&sibling.value) {
                if self.watch.contains(&value) {
                    let dot = format!(
                        "{}.{}",
                        self.names.actor(&sibling.dot.actor),
                        sibling.dot.counter
                    );
                    self.watched_dots.entry(value).or_default().insert(dot);
                }
            }
        }
    }

    /// Node `at` handled a write request from `from`: its successful answer must wait for
    /// every write made so far.
    fn expect_durable_answer(&mut self, at: usize, from: usize, key: DurableAnswerKey) {
        let slot = &self.slots[at];
        if node_config(&slot.id, self.config.seed, slot.incarnation).fsync != FsyncPolicy::Always {
            return;
        }
        if self.awaiting_durable_answer.len() >= MAX_AWAITING_DURABLE_ANSWERS {
            self.awaiting_durable_answer.pop_first();
        }
        // A duplicated request keeps its first record: its first answer is checked.
        self.awaiting_durable_answer
            .entry((at, slot.incarnation, from, key))
            .or_insert_with(|| slot.storage.writes_made());
    }

    /// The durability audit (issue: a failed fsync once released hint, repair and
    /// anti-entropy acknowledgements as successes): an answer that claims durability must
    /// find every write made before its request handled synced.
    fn audit_durable_answer(&mut self, from: usize, to: &NodeId, message: &Message) {
        let Some((key, claims_durable)) = message.durable_answer() else {
            return;
        };
        let Some(&j) = self.index.get(to) else {
            return;
        };
        let slot = &self.slots[from];
        let Some(writes) = self
            .awaiting_durable_answer
            .remove(&(from, slot.incarnation, j, key))
        else {
            return;
        };
        let synced = slot.storage.writes_synced();
        if claims_durable && synced < writes {
            let detail = format!(
                "n{from} acknowledged {key:?} to n{j} at {} ms with {} of its writes unsynced",
                self.now,
                writes - synced
            );
            self.unsynced_acknowledgements.push(checker::Violation {
                key: format!("n{from}"),
                detail,
                value: None,
            });
        }
    }

    fn send(&mut self, from: usize, to: NodeId, message: Message) {
        if !self.watch.is_empty() {
            self.watch_message(&message);
        }
        self.audit_durable_answer(from, &to, &message);
        let Some(&j) = self.index.get(&to) else {
            // Not a simulated node: the transport has no address for it.
            self.send_failed(from, &to, &message, "unknown node");
            return;
        };
        if !self.slots[j].alive() {
            self.send_failed(from, &to, &message, "connection refused");
            return;
        }
        match self.network.plan(&mut self.rng_net, from, j, self.now) {
            Err(_) => {
                self.trace_line(&format!("n{from}"), |names| {
                    format!(
                        "send {} to n{j} (dropped by the network)",
                        describe(&message, names)
                    )
                });
            }
            Ok(times) => {
                self.trace_line(&format!("n{from}"), |names| {
                    let at: Vec<String> = times.iter().map(|t| format!("{t}")).collect();
                    format!(
                        "send {} to n{j} (arrives {})",
                        describe(&message, names),
                        at.join("+")
                    )
                });
                let incarnation = self.slots[j].incarnation;
                for at in &times {
                    let message = message.clone();
                    self.schedule(
                        *at,
                        Event::Deliver {
                            from,
                            to: j,
                            incarnation,
                            message,
                        },
                    );
                }
            }
        }
    }

    fn send_failed(&mut self, from: usize, to: &NodeId, message: &Message, why: &str) {
        self.trace_line(&format!("n{from}"), |names| {
            format!("send {} to {to} failed ({why})", describe(message, names))
        });
        let slot = &mut self.slots[from];
        let local = slot.clock.local(self.now);
        if let Some(node) = slot.node.as_mut() {
            node.handle_send_failed(local, to, message);
        }
    }

    // ----- clients -------------------------------------------------------------------

    fn reply(&mut self, node: usize, op: OpId, response: ClientResponse) {
        let Some(record) = self.history.get(op) else {
            return;
        };
        if record.outcome != Outcome::Pending {
            self.trace_line(&format!("n{node}"), |_| {
                format!(
                    "reply op{op}: {} (client already gone)",
                    workload::short_response(&response)
                )
            });
            return;
        }
        let outcome = workload::classify(record.kind, &response);
        self.in_flight.remove(&op);
        self.complete(op, outcome, Some(response));
    }

    fn complete(&mut self, op: OpId, outcome: Outcome, response: Option<ClientResponse>) {
        let now = self.now;
        let Some(record) = self.history.get_mut(op) else {
            return;
        };
        record.completed = Some(now);
        record.outcome = outcome;
        let (client, key) = (record.client, record.key.clone());
        let line = format!("{record}");
        self.trace_line(
            &client.map(|c| format!("c{c}")).unwrap_or("cli".into()),
            |_| format!("done {line}"),
        );
        if let Some(response) = response {
            if let Some(c) = client {
                self.clients[c].learn(&key, op, &response);
            }
            self.responses.insert(op, response);
        }
        if let Some(c) = client {
            self.clients[c].busy = None;
            let think = self.workload.as_ref().map(|w| w.think_max_ms).unwrap_or(0);
            let think = self.rng_work.gen_range(0..=think);
            self.schedule(now + think, Event::ClientNext { client: c });
        }
    }

    fn client_arrive(&mut self, op: OpId) {
        let Some(record) = self.history.get(op) else {
            return;
        };
        if record.outcome != Outcome::Pending {
            return;
        }
        let node = record.node;
        let slot = &mut self.slots[node];
        if !slot.alive() {
            self.requests.remove(&op);
            self.complete(op, Outcome::Failed("connection refused".into()), None);
            return;
        }
        self.in_flight.insert(op, node);
        if slot.paused {
            slot.stalled.push(Event::ClientArrive { op });
            return;
        }
        let Some(request) = self.requests.remove(&op) else {
            return;
        };
        let local = slot.clock.local(self.now);
        if let Some(n) = slot.node.as_mut() {
            n.handle_client_request(local, op, request);
        }
        self.flush(node);
    }

    /// Invokes an operation: records it and sends it to `node`.
    #[allow(clippy::too_many_arguments)]
    fn invoke(
        &mut self,
        client: Option<usize>,
        node: usize,
        kind: OpKind,
        key: &str,
        level: ConsistencyLevel,
        value: Option<String>,
        context: ContextSource,
        causal: Option<CausalContext>,
        is_final: bool,
        delay: Millis,
    ) -> OpId {
        let id = self.history.next_id();
        let bucket = BUCKET.to_string();
        let key_bytes = key.as_bytes().to_vec();
        let request = match kind {
            OpKind::Get => ClientRequest::Get {
                bucket,
                key: key_bytes,
                level,
            },
            OpKind::Put => ClientRequest::Put {
                bucket,
                key: key_bytes,
                context: causal.unwrap_or_default(),
                value: Value::Data {
                    bytes: bytes::Bytes::from(value.clone().unwrap_or_default()),
                    content_type: "text/plain".into(),
                },
                level,
            },
            OpKind::Delete => ClientRequest::Delete {
                bucket,
                key: key_bytes,
                context: causal,
                level,
            },
        };
        let op = Op {
            id,
            client,
            kind,
            key: key.to_string(),
            level,
            value,
            context,
            node,
            invoked: self.now,
            completed: None,
            outcome: Outcome::Pending,
            is_final,
        };
        let line = format!("{op}");
        self.trace_line(
            &client.map(|c| format!("c{c}")).unwrap_or("cli".into()),
            |_| format!("invoke {line}"),
        );
        self.history.push(op);
        self.requests.insert(id, request);
        self.schedule(self.now + delay, Event::ClientArrive { op: id });
        let timeout = self
            .workload
            .as_ref()
            .map(|w| w.client_timeout_ms)
            .unwrap_or(5_000);
        self.schedule(self.now + timeout, Event::ClientTimeout { op: id });
        id
    }

    fn client_next(&mut self, client: usize) {
        let Some(params) = self.workload.clone() else {
            return;
        };
        if self.ops_issued >= params.ops || self.clients[client].busy.is_some() {
            return;
        }
        self.ops_issued += 1;
        let plan = self.clients[client].plan(&mut self.rng_work, &params);
        let node = self.rng_work.gen_range(0..self.slots.len());
        let delay = self.rng_work.gen_range(0..=2);
        let id = self.history.next_id();
        let value = (plan.kind == OpKind::Put).then(|| format!("s{}-op{id}", self.config.seed));
        let id = self.invoke(
            Some(client),
            node,
            plan.kind,
            &plan.key,
            plan.level,
            value,
            plan.context,
            plan.causal,
            false,
            delay,
        );
        self.clients[client].busy = Some(id);
    }

    /// Starts the randomized workload and, if any faults are enabled, the fault schedule.
    pub fn start_workload(&mut self) {
        let params = WorkloadParams::random(&mut self.rng_work, self.config.ops, self.config.nodes);
        let line = format!("workload {params:?}");
        self.trace_line("sim", |_| line.clone());
        write!(
            self.params,
            "; workload: {} clients, {} keys, think<={}ms, {}% get {}% put, {}% with context",
            params.clients,
            params.keys,
            params.think_max_ms,
            params.get_percent,
            params.put_percent,
            params.with_context_percent
        )
        .ok();
        self.clients = vec![Client::default(); params.clients];
        for c in 0..params.clients {
            let at = self.now + self.rng_work.gen_range(0..=10);
            self.schedule(at, Event::ClientNext { client: c });
        }
        self.workload = Some(params);
        let f = self.config.faults;
        if f.fsync {
            self.fsync_failure = self.rng_fault.gen_range(0.005..0.05);
            write!(self.params, "; fsync failures {:.3}", self.fsync_failure).ok();
        }
        if f.crash || f.pause || f.partition {
            self.faults_active = true;
            let at = self.now + self.rng_fault.gen_range(100..=1000);
            self.schedule(at, Event::FaultTick);
        }
    }

    /// True when the workload has invoked all its operations and they have all ended.
    pub fn workload_done(&self) -> bool {
        self.workload.as_ref().is_some_and(|w| {
            self.ops_issued >= w.ops && self.clients.iter().all(|c| c.busy.is_none())
        })
    }

    // ----- scripted operations -------------------------------------------------------

    /// Sends a put from a scripted client to `node` now. `after` names an earlier operation
    /// whose returned context the put carries (none: a blind put).
    pub fn put(
        &mut self,
        node: usize,
        key: &str,
        value: &str,
        level: ConsistencyLevel,
        after: Option<OpId>,
    ) -> OpId {
        let (context, causal) = self.context_of(after);
        self.invoke(
            None,
            node,
            OpKind::Put,
            key,
            level,
            Some(value.to_string()),
            context,
            causal,
            false,
            0,
        )
    }

    /// Sends a get from a scripted client to `node` now.
    pub fn get(&mut self, node: usize, key: &str, level: ConsistencyLevel) -> OpId {
        self.invoke(
            None,
            node,
            OpKind::Get,
            key,
            level,
            None,
            ContextSource::Blind,
            None,
            false,
            0,
        )
    }

    /// Sends a delete; without `after`, the coordinator reads first.
    pub fn delete(
        &mut self,
        node: usize,
        key: &str,
        level: ConsistencyLevel,
        after: Option<OpId>,
    ) -> OpId {
        let (context, causal) = match after {
            Some(_) => self.context_of(after),
            None => (ContextSource::ReadsFirst, None),
        };
        self.invoke(
            None,
            node,
            OpKind::Delete,
            key,
            level,
            None,
            context,
            causal,
            false,
            0,
        )
    }

    fn context_of(&self, after: Option<OpId>) -> (ContextSource, Option<CausalContext>) {
        let Some(op) = after else {
            return (ContextSource::Blind, None);
        };
        let context = match self.responses.get(&op) {
            Some(ClientResponse::Object(o)) => o.causal_context(),
            Some(ClientResponse::Written { context }) => context.clone(),
            _ => panic!("op{op} returned no context"),
        };
        (ContextSource::FromOp(op), Some(context))
    }

    /// Runs until `op` has an outcome or `max_ms` pass.
    pub fn wait_for(&mut self, op: OpId, max_ms: Millis) -> &Outcome {
        self.run_until(|s| *s.outcome(op) != Outcome::Pending, max_ms);
        self.outcome(op)
    }

    // ----- faults --------------------------------------------------------------------

    fn max_faulty(&self) -> usize {
        ((self.slots.len().saturating_sub(1)) / 2).max(1)
    }

    fn faulty(&self) -> usize {
        let armed = self.armed_crash.map(|(n, _)| n);
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| !s.alive() || s.paused || armed == Some(*i))
            .count()
    }

    fn fault_tick(&mut self) {
        if !self.faults_active {
            return;
        }
        let f = self.config.faults;
        let mut kinds = Vec::new();
        if f.crash {
            kinds.push("crash");
        }
        if f.pause {
            kinds.push("pause");
        }
        if f.partition {
            kinds.push("partition");
        }
        let kind = kinds[self.rng_fault.gen_range(0..kinds.len())];
        let healthy: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].alive() && !self.slots[i].paused)
            .collect();
        let room = self.faulty() < self.max_faulty() && !healthy.is_empty();
        match kind {
            "crash" if room && self.armed_crash.is_none() => {
                let node = healthy[self.rng_fault.gen_range(0..healthy.len())];
                if self.rng_fault.gen_bool(0.7) {
                    // Crash while writes are unsynced: between a local write and its fsync.
                    let latest = self.now + self.rng_fault.gen_range(10..=2000);
                    self.armed_crash = Some((node, latest));
                } else {
                    self.crash(node, None);
                    let at = self.now + self.rng_fault.gen_range(100..=3000);
                    self.schedule(at, Event::Restart { node });
                }
            }
            "pause" if room => {
                let node = healthy[self.rng_fault.gen_range(0..healthy.len())];
                self.pause(node);
                let at = self.now + self.rng_fault.gen_range(50..=3000);
                self.schedule(at, Event::Resume { node });
            }
            "partition" if !self.network.is_partitioned() => {
                let n = self.slots.len();
                let mut side: Vec<bool> = (0..n).map(|_| self.rng_fault.gen_bool(0.5)).collect();
                if side.iter().all(|s| *s) || side.iter().all(|s| !*s) {
                    let flip = self.rng_fault.gen_range(0..n);
                    side[flip] = !side[flip];
                }
                let a: Vec<usize> = (0..n).filter(|&i| side[i]).collect();
                let b: Vec<usize> = (0..n).filter(|&i| !side[i]).collect();
                let symmetric = self.rng_fault.gen_bool(0.6);
                self.partition(&a, &b, symmetric);
                let at = self.now + self.rng_fault.gen_range(200..=5000);
                self.schedule(at, Event::HealPartition);
            }
            _ => {}
        }
        let at = self.now + self.rng_fault.gen_range(200..=2000);
        self.schedule(at, Event::FaultTick);
    }

    /// Crashes node `i`: its unsynced writes vanish except a prefix (`keep_pending`, or a
    /// random number when `None`).
    pub fn crash(&mut self, i: usize, keep_pending: Option<usize>) {
        let Some(node) = self.slots[i].node.take() else {
            return;
        };
        let storage = node.into_storage();
        let pending = storage.pending_writes();
        let keep = keep_pending
            .unwrap_or_else(|| self.rng_disk.gen_range(0..=pending))
            .min(pending);
        storage.crash(keep);
        let slot = &mut self.slots[i];
        slot.syncing = false;
        slot.paused = false;
        slot.stalled.clear();
        if let Some(key) = slot.tick.take() {
            self.queue.remove(&key);
        }
        let incarnation = slot.incarnation;
        self.trace_line(&format!("n{i}"), |_| {
            format!("CRASH (kept {keep} of {pending} unsynced writes)")
        });
        // Clients waiting on this coordinator see their connection reset.
        let orphans: Vec<OpId> = self
            .in_flight
            .iter()
            .filter(|(_, n)| **n == i)
            .map(|(op, _)| *op)
            .collect();
        for op in orphans {
            self.in_flight.remove(&op);
            self.requests.remove(&op);
            self.complete(op, Outcome::Unknown("coordinator crashed".into()), None);
        }
        for j in 0..self.slots.len() {
            if j != i && self.slots[j].alive() {
                let at = self.now + self.rng_fault.gen_range(0..=20);
                let observer_incarnation = self.slots[j].incarnation;
                self.schedule(
                    at,
                    Event::PeerStatus {
                        observer: j,
                        observer_incarnation,
                        peer: i,
                        peer_incarnation: incarnation,
                        status: PeerStatus::Down,
                    },
                );
            }
        }
    }

    /// Makes the next fsync of node `i` fail (an I/O error).
    pub fn fail_next_fsync(&mut self, i: usize) {
        self.fail_next_fsync.insert(i);
    }

    /// Crashes node `i` and gives it a new, empty disk: a node that lost its disk. The
    /// storage model never does this by itself; the checkers' own tests use it to prove
    /// they catch lost data.
    pub fn wipe_disk(&mut self, i: usize) {
        self.crash(i, Some(0));
        self.slots[i].storage = MemoryStorage::new();
        self.trace_line(&format!("n{i}"), |_| "DISK WIPED".into());
    }

    /// Restarts a crashed node from its durable state (a new epoch).
    pub fn restart(&mut self, i: usize) {
        if self.slots[i].alive() {
            return;
        }
        let slot = &mut self.slots[i];
        slot.incarnation += 1;
        let incarnation = slot.incarnation;
        let local = slot.clock.local(self.now);
        let mut node = Node::new(
            node_config(&slot.id, self.config.seed, incarnation),
            slot.storage.clone(),
            local,
        )
        .expect("memory storage does not fail");
        for member in &self.members {
            node.handle_member_discovered(member.clone());
        }
        for (j, other) in self.slots.iter().enumerate() {
            if j != i && !other.alive() {
                node.handle_peer_status(local, &other.id, PeerStatus::Down);
            }
        }
        let epoch = node.epoch();
        self.slots[i].node = Some(node);
        self.trace_line(&format!("n{i}"), |_| format!("RESTART (epoch {epoch})"));
        for j in 0..self.slots.len() {
            if j != i && self.slots[j].alive() {
                let at = self.now + self.rng_fault.gen_range(0..=20);
                let observer_incarnation = self.slots[j].incarnation;
                self.schedule(
                    at,
                    Event::PeerStatus {
                        observer: j,
                        observer_incarnation,
                        peer: i,
                        peer_incarnation: incarnation,
                        status: PeerStatus::Up,
                    },
                );
            }
        }
        self.flush(i);
    }

    /// Pauses node `i`: it handles nothing until [`Simulation::resume`].
    pub fn pause(&mut self, i: usize) {
        if !self.slots[i].alive() || self.slots[i].paused {
            return;
        }
        self.slots[i].paused = true;
        if let Some(key) = self.slots[i].tick.take() {
            self.queue.remove(&key);
        }
        self.trace_line(&format!("n{i}"), |_| "PAUSE".into());
    }

    /// Resumes a paused node; what arrived meanwhile is handled now, in order.
    pub fn resume(&mut self, i: usize) {
        if !self.slots[i].paused {
            return;
        }
        self.slots[i].paused = false;
        let stalled = std::mem::take(&mut self.slots[i].stalled);
        let count = stalled.len();
        self.trace_line(&format!("n{i}"), |_| {
            format!("RESUME ({count} inputs waited)")
        });
        for event in stalled {
            self.schedule(self.now, event);
        }
        self.schedule_tick(i);
    }

    /// Cuts the links from `a` to `b`, and from `b` to `a` when `symmetric`.
    pub fn partition(&mut self, a: &[usize], b: &[usize], symmetric: bool) {
        for &x in a {
            for &y in b {
                self.network.block(x, y);
                if symmetric {
                    self.network.block(y, x);
                }
            }
        }
        let arrow = if symmetric { "<->" } else { "->" };
        self.trace_line("net", |_| format!("PARTITION {a:?} {arrow} {b:?}"));
    }

    /// Restores every link.
    pub fn heal_partition(&mut self) {
        if self.network.is_partitioned() {
            self.network.heal();
            self.trace_line("net", |_| "HEAL".into());
        }
    }

    /// Stops every fault: heals partitions, resumes paused nodes, restarts crashed ones,
    /// and makes the network reliable (delays stay).
    pub fn heal_all(&mut self) {
        self.faults_active = false;
        self.armed_crash = None;
        self.fsync_failure = 0.0;
        self.heal_partition();
        self.network.params.loss = 0.0;
        self.network.params.duplicate = 0.0;
        self.trace_line("sim", |_| "faults stop; healing".into());
        for i in 0..self.slots.len() {
            self.resume(i);
            self.restart(i);
        }
    }

    // ----- the end of a run ----------------------------------------------------------

    /// Heals the cluster, lets it settle, reads every key at `all`, lets it settle again,
    /// and runs the checkers.
    pub fn finish(&mut self) -> CheckReport {
        self.heal_all();
        self.run_for(QUIET_MS);
        let apart_before = self.divergence().len();
        let keys: BTreeSet<String> = self
            .history
            .ops
            .iter()
            .filter(|o| !o.is_final)
            .map(|o| o.key.clone())
            .collect();
        let mut missing: Vec<String> = keys.into_iter().collect();
        for attempt in 0..3 {
            if missing.is_empty() || self.bound.is_some() {
                break;
            }
            self.trace_line("sim", |_| format!("final reads, attempt {}", attempt + 1));
            let mut ops = Vec::new();
            for key in &missing {
                let node = self.rng_work.gen_range(0..self.slots.len());
                let op = self.invoke(
                    None,
                    node,
                    OpKind::Get,
                    key,
                    ConsistencyLevel::All,
                    None,
                    ContextSource::Blind,
                    None,
                    true,
                    0,
                );
                ops.push((key.clone(), op));
            }
            let wait: Vec<OpId> = ops.iter().map(|(_, op)| *op).collect();
            self.run_until(
                |s| wait.iter().all(|op| *s.outcome(*op) != Outcome::Pending),
                QUIET_MS * 2,
            );
            missing = ops
                .into_iter()
                .filter(|(_, op)| !self.outcome(*op).is_ok())
                .map(|(k, _)| k)
                .collect();
            if !missing.is_empty() {
                self.run_for(REQUEST_TIMEOUT_MS);
            }
        }
        self.run_for(QUIET_MS);
        let mut report = checker::check_history(&self.history, self.replicas());
        report.unsynced_acknowledgements = self.unsynced_acknowledgements.clone();
        report.divergent = self.divergence();
        report.divergent_before_final_reads = apart_before;
        report
    }

    /// Keys whose replicas store different objects (or that a non-replica stores).
    pub fn divergence(&self) -> Vec<checker::Violation> {
        let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
        for slot in &self.slots {
            for (key, _) in slot.storage.objects() {
                keys.insert(key.key);
            }
        }
        let mut divergent = Vec::new();
        for key in keys {
            let name = String::from_utf8_lossy(&key).into_owned();
            let replicas = self.preference_list(&name);
            let objects: Vec<(usize, Option<Object>)> = (0..self.slots.len())
                .map(|i| (i, self.stored(i, &name)))
                .collect();
            let first = objects[replicas[0]].1.clone();
            let differs = replicas.iter().any(|&r| objects[r].1 != first);
            let misplaced: Vec<usize> = objects
                .iter()
                .filter(|(i, o)| o.is_some() && !replicas.contains(i))
                .map(|(i, _)| *i)
                .collect();
            if differs || !misplaced.is_empty() {
                let mut detail = String::new();
                for &r in &replicas {
                    match &objects[r].1 {
                        Some(o) => write!(detail, "n{r}={} ", describe_object(o, &self.names)).ok(),
                        None => write!(detail, "n{r}=none ").ok(),
                    };
                }
                if !misplaced.is_empty() {
                    write!(detail, "stored on non-replicas {misplaced:?}").ok();
                }
                divergent.push(checker::Violation {
                    key: name,
                    value: None,
                    detail: detail.trim_end().to_string(),
                });
            }
        }
        divergent
    }

    /// Ends a run: the figures and the verdict material.
    pub fn report(self, check: CheckReport) -> RunReport {
        RunReport {
            tally: self.history.tally(),
            config: self.config,
            check,
            steps: self.steps,
            sim_ms: self.now,
            bound: self.bound,
            params: self.params,
            history: self.history,
            trace: self.trace,
        }
    }
}

/// The configuration of simulated node `id` in its `incarnation`; the node's own random
/// choices (background read repair) are seeded from the run's seed.
pub fn node_config(id: &NodeId, seed: u64, incarnation: u64) -> NodeConfig {
    let mut config = NodeConfig::new(id.as_str());
    let mut mix = ChaCha8Rng::seed_from_u64(seed ^ 0x6d65_6e64_6b76);
    let salt: u64 = mix.gen();
    config.rng_seed = salt
        ^ id.as_str()
            .bytes()
            .fold(incarnation.wrapping_mul(0x9e37_79b9_7f4a_7c15), |h, b| {
                h.rotate_left(7) ^ u64::from(b)
            });
    config.peer_address = format!("sim:{id}");
    config.http_address = format!("sim-http:{id}");
    config.request_timeout_ms = REQUEST_TIMEOUT_MS;
    config.gossip = mendkv_core::gossip::GossipConfig::with_interval(1000);
    config
}

fn request_name(id: RequestId) -> String {
    format!("{}.{}", id >> 40, id & ((1 << 40) - 1))
}

/// Names actors in traces: the node whose id hashes to the actor's `node_hash`.
#[derive(Debug, Clone, Default)]
pub struct Names {
    nodes: BTreeMap<u64, String>,
}

impl Names {
    pub fn new(members: &[MemberInfo]) -> Self {
        Names {
            nodes: members
                .iter()
                .map(|m| (Actor::new(m.id.as_str(), 0).node_hash, m.id.to_string()))
                .collect(),
        }
    }

    /// `n3.1` for node n3 in epoch 1 (or the hash, for an actor no member has).
    pub fn actor(&self, actor: &Actor) -> String {
        match self.nodes.get(&actor.node_hash) {
            Some(name) => format!("{name}.{}", actor.epoch),
            None => format!("{:x}.{}", actor.node_hash, actor.epoch),
        }
    }
}

/// An object in a few words: its siblings `value@dot` (`-` a tombstone; a dot is
/// `node.epoch.counter`) and its causal context `[node.epoch:counter ...]`.
pub fn describe_object(object: &Object, names: &Names) -> String {
    let siblings: Vec<String> = object
        .siblings()
        .iter()
        .map(|s| {
            let value = workload::value_text(&s.value).unwrap_or_else(|| "-".into());
            format!("{value}@{}.{}", names.actor(&s.dot.actor), s.dot.counter)
        })
        .collect();
    let context: Vec<String> = object
        .context()
        .iter()
        .map(|(a, c)| format!("{}:{c}", names.actor(a)))
        .collect();
    format!("{{{}}}[{}]", siblings.join(","), context.join(" "))
}

/// A message in a few words, for the trace.
pub fn describe(message: &Message, names: &Names) -> String {
    let key = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    match message {
        Message::Read {
            request, key: k, ..
        } => format!("Read#{} {}", request_name(*request), key(k)),
        Message::ReadReply { request, result } => match result {
            Ok(Some(o)) => format!(
                "ReadReply#{} {}",
                request_name(*request),
                describe_object(o, names)
            ),
            Ok(None) => format!("ReadReply#{} none", request_name(*request)),
            Err(e) => format!("ReadReply#{} error {e:?}", request_name(*request)),
        },
        Message::Coordinate {
            request,
            key: k,
            value,
            context,
            ..
        } => format!(
            "Coordinate#{} {} ={} ctx={}",
            request_name(*request),
            key(k),
            workload::value_text(value).unwrap_or("-".into()),
            context.vector().len()
        ),
        Message::CoordinateReply { request, result } => match result {
            Ok(o) => format!(
                "CoordinateReply#{} {}",
                request_name(*request),
                describe_object(o, names)
            ),
            Err(e) => format!("CoordinateReply#{} error {e:?}", request_name(*request)),
        },
        Message::Replicate {
            request,
            key: k,
            object,
            ..
        } => format!(
            "Replicate#{} {} {}",
            request_name(*request),
            key(k),
            describe_object(object, names)
        ),
        Message::ReplicateReply { request, result } => match result {
            Ok(()) => format!("ReplicateReply#{} ok", request_name(*request)),
            Err(e) => format!("ReplicateReply#{} error {e:?}", request_name(*request)),
        },
        Message::ReadDigest {
            request, key: k, ..
        } => {
            format!("ReadDigest#{} {}", request_name(*request), key(k))
        }
        Message::ReadDigestReply { request, result } => match result {
            Ok(digest) => format!("ReadDigestReply#{} {digest:016x}", request_name(*request)),
            Err(e) => format!("ReadDigestReply#{} error {e:?}", request_name(*request)),
        },
        Message::RepairWrite {
            request,
            key: k,
            object,
            ..
        } => format!(
            "RepairWrite#{} {} {}",
            request_name(*request),
            key(k),
            describe_object(object, names)
        ),
        Message::RepairWriteReply { request, result } => match result {
            Ok(()) => format!("RepairWriteReply#{} ok", request_name(*request)),
            Err(e) => format!("RepairWriteReply#{} error {e:?}", request_name(*request)),
        },
        Message::Gossip(message) => format!("Gossip({})", message.kind()),
        // Any message kind newer than this simulator prints as Debug.
        #[allow(unreachable_patterns)]
        other => {
            let text = format!("{other:?}");
            match text.char_indices().nth(80) {
                Some((cut, _)) => format!("{}...", &text[..cut]),
                None => text,
            }
        }
    }
}

/// Keeps `OkResult` reachable from the crate root for users matching on outcomes.
pub type ReadResult = OkResult;

#[cfg(test)]
mod tests {
    use super::*;

    // A skewed clock is monotonic, and a timer set on it fires at the first virtual
    // millisecond at which the node's clock has reached the deadline.
    #[test]
    fn skewed_timers_fire_on_time() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..2_000 {
            let clock = Clock {
                offset_ms: rng.gen_range(0..=10_000),
                drift_ppm: rng.gen_range(-50_000..=50_000),
            };
            let now = rng.gen_range(0..1_000_000);
            assert!(clock.local(now + 1) >= clock.local(now));
            let deadline = clock.local(now) + rng.gen_range(0..5_000);
            let at = clock.virtual_at(now, deadline);
            assert!(at >= now && clock.local(at) >= deadline);
            assert!(at == now || clock.local(at - 1) < deadline);
        }
    }
}
