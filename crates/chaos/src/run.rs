//! One run: the namespaces, the servers, the workload under the seeded schedule, the heal,
//! the wait for convergence, the final snapshot and reads, and the checker's verdict.

use crate::checker::{
    self, Action, FinalKey, FinalState, MinorityProbe, Op, Outcome, StoredCopy, StoredSibling,
    Verdict,
};
use crate::nodes::{Nodes, ServerSettings};
use crate::schedule::{self, Change, ChangeStep, Fault, Step};
use crate::topology::Topology;
use crate::workload::{classify, values_of, Workload, BUCKET};
use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use futures::stream::{self, StreamExt};
use mendkv_client::{member_state, Client};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How every node is configured: replication factor 3 (the default).
pub const REPLICATION_FACTOR: usize = 3;
/// Requests in flight at once while snapshotting and reading at the end.
const FINAL_CONCURRENCY: usize = 16;
/// How long one join or decommission may take, from its start, before the run counts it as
/// stuck (a change waits for every member's acknowledgement, so faults hold it up; after the
/// heal it must finish). Generous: streaming in a debug build on a loaded machine.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The `mendkv` binary.
    pub binary: PathBuf,
    pub nodes: usize,
    pub seed: u64,
    /// How long the workload runs under the schedule.
    pub duration: Duration,
    /// How long after the heal replicas may take to converge before they count as divergent.
    pub settle_timeout: Duration,
    pub writers: u32,
    pub readers: u32,
    pub rmw_clients: u32,
    pub rmw_keys: u32,
    pub request_timeout_ms: u64,
    pub anti_entropy_interval_s: u64,
    /// Levels of the workload's reads and writes: `quorum`, the promise under test. `one`
    /// breaks that promise on purpose, to show the checker catches what it should.
    pub read_level: &'static str,
    pub write_level: &'static str,
    /// Keep the servers' data directories and logs when the run finds a violation.
    pub keep_evidence: bool,
    /// Draw the changes lane (joins and decommissions, [`schedule::draw_changes`]).
    pub cluster_changes: bool,
}

impl RunOptions {
    pub fn new(binary: PathBuf, nodes: usize, seed: u64, duration: Duration) -> Self {
        RunOptions {
            binary,
            nodes,
            seed,
            duration,
            settle_timeout: Duration::from_secs(90),
            writers: 3,
            readers: 2,
            rmw_clients: 3,
            rmw_keys: 4,
            request_timeout_ms: 1_000,
            anti_entropy_interval_s: 2,
            read_level: "quorum",
            write_level: "quorum",
            keep_evidence: true,
            cluster_changes: true,
        }
    }

    /// The command line that replays this run's schedule.
    pub fn rerun_command(&self) -> String {
        let mut command = format!(
            "mendkv-chaos --nodes {} --seed {} --duration-s {} --runs 1",
            self.nodes,
            self.seed,
            self.duration.as_secs()
        );
        if !self.cluster_changes {
            command.push_str(" --no-cluster-changes");
        }
        if self.read_level != "quorum" || self.write_level != "quorum" {
            command.push_str(&format!(
                " --read-level {} --write-level {}",
                self.read_level, self.write_level
            ));
        }
        command
    }
}

#[derive(Clone, Debug, Default)]
pub struct OpCounts {
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
}

impl OpCounts {
    pub fn total(&self) -> usize {
        self.ok + self.failed + self.unknown
    }
}

#[derive(Clone, Debug)]
pub struct RunReport {
    pub options: RunOptions,
    pub schedule: Vec<Step>,
    pub ops: OpCounts,
    pub kills: usize,
    pub pauses: usize,
    pub partitions: usize,
    /// Faults skipped because a node they name had left the cluster.
    pub skipped_faults: usize,
    /// The changes lane drawn for the run, and how many of its joins and decommissions
    /// finished (a change that did not finish within [`CHANGE_TIMEOUT`] is a violation).
    pub changes: Vec<ChangeStep>,
    pub joins: usize,
    pub decommissions: usize,
    /// Dead nodes removed (`remove-node`) that every survivor saw `left`.
    pub removals: usize,
    /// Faults aimed at a node that joined during the run instead of the drawn one.
    pub faults_on_joiners: usize,
    pub stuck_changes: Vec<String>,
    pub probes: Vec<MinorityProbe>,
    /// From the heal to the first snapshot where every key's replicas agree.
    pub converge_ms: Option<u64>,
    pub verdict: Verdict,
    /// Servers that exited without being killed.
    pub crashes: Vec<String>,
    /// Keys whose `r=all` read failed three times (the snapshot judged them alone).
    pub final_read_failures: usize,
}

impl RunReport {
    pub fn violations(&self) -> usize {
        self.verdict.violations()
            + self.crashes.len()
            + self.stuck_changes.len()
            + usize::from(self.converge_ms.is_none())
    }

    /// The longest a node alone took to refuse a `w=quorum` write.
    pub fn minority_answer_ms_max(&self) -> Option<u64> {
        self.probes.iter().filter_map(|p| p.answered_ms).max()
    }

    pub fn summary(&self) -> String {
        let mut text = String::new();
        let v = &self.verdict;
        let _ = writeln!(
            text,
            "seed {} nodes {}: {} ops ({} ok, {} failed, {} unknown), {} kills, {} pauses, {} partitions, {} faults aimed at joiners, {} joins, {} decommissions, {} removals ({} faults skipped: their node had left)",
            self.options.seed,
            self.options.nodes,
            self.ops.total(),
            self.ops.ok,
            self.ops.failed,
            self.ops.unknown,
            self.kills,
            self.pauses,
            self.partitions,
            self.faults_on_joiners,
            self.joins,
            self.decommissions,
            self.removals,
            self.skipped_faults
        );
        let _ = writeln!(
            text,
            "  lost {} missed {} unexpected {} resurrected {} divergent {} minority-acked {} minority-unanswered {} crashes {}",
            v.lost.len(),
            v.missed.len(),
            v.unexpected.len(),
            v.resurrected.len(),
            v.divergent.len(),
            v.minority_acked.len(),
            v.minority_unanswered.len(),
            self.crashes.len()
        );
        let _ = writeln!(
            text,
            "  converged {} after the heal; {} minority probes refused, slowest answer {}; {} final r=all reads failed",
            self.converge_ms
                .map_or("NEVER".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
            self.probes.iter().filter(|p| p.outcome != Outcome::Ok).count(),
            self.minority_answer_ms_max()
                .map_or("-".to_string(), |ms| format!("{ms} ms")),
            self.final_read_failures
        );
        if !v.deleted_leftovers.is_empty() {
            let _ = writeln!(
                text,
                "  {} deleted keys still live on a node outside their owners (not read; cleanup pending): {}",
                v.deleted_leftovers.len(),
                v.deleted_leftovers
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        for line in v
            .lines()
            .iter()
            .chain(self.crashes.iter())
            .chain(self.stuck_changes.iter())
            .take(50)
        {
            let _ = writeln!(text, "  VIOLATION {line}");
        }
        if self.violations() > 0 {
            let _ = writeln!(text, "  rerun: {}", self.options.rerun_command());
        }
        text
    }
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs one seeded run to its verdict. Everything it created (namespaces, processes, data)
/// is removed on every exit path, errors and panics included, by the guards' drops.
pub fn run_once(options: &RunOptions) -> Result<RunReport> {
    if options.nodes < 3 {
        bail!("a chaos run needs at least 3 nodes (replication factor 3)");
    }
    let schedule = schedule::draw(
        options.seed,
        options.nodes,
        options.duration.as_millis() as u64,
    );
    let changes = if options.cluster_changes {
        schedule::draw_changes(
            options.seed,
            options.nodes,
            REPLICATION_FACTOR,
            options.duration.as_millis() as u64,
        )
    } else {
        Vec::new()
    };
    println!(
        "run seed {} with {} nodes for {} s; schedule:",
        options.seed,
        options.nodes,
        options.duration.as_secs()
    );
    for step in &schedule {
        println!("  {step}");
    }
    for step in &changes {
        println!("  {step}");
    }
    let tag = format!("{}", RUN_COUNTER.fetch_add(1, Ordering::Relaxed));
    // Declared in this order so they drop in reverse: servers killed, then the thread back
    // in its namespace, then the namespaces deleted, then the data removed.
    let data = tempfile::Builder::new()
        .prefix(&format!(
            "{}{}-",
            crate::topology::DATA_PREFIX,
            std::process::id()
        ))
        .tempdir()
        .context("temporary data directory")?;
    let topology = Topology::create(&tag, schedule::slots(options.nodes, &changes))?;
    let _in_hub = topology.enter_hub()?;
    let settings = ServerSettings {
        request_timeout_ms: options.request_timeout_ms,
        anti_entropy_interval_s: options.anti_entropy_interval_s,
    };
    let nodes = Mutex::new(Nodes::start(
        &options.binary,
        &topology.node_namespaces,
        options.nodes,
        data.path(),
        &settings,
    )?);
    // Built after entering the hub, so its worker threads (and their sockets) are there.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = runtime.block_on(drive(
        options,
        schedule,
        changes,
        &topology,
        &nodes,
        data.path(),
    ));
    let violated = result.as_ref().is_ok_and(|r| r.violations() > 0);
    if result.is_err() || violated {
        let nodes = nodes.lock().expect("nodes lock");
        for index in 0..nodes.len() {
            let log = nodes.log_path(index);
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = tail.lines().rev().take(5).collect();
            if !lines.is_empty() {
                eprintln!("--- last lines of {}:", log.display());
                for line in lines.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
    if violated && options.keep_evidence {
        // The servers' data directories and logs are the evidence: stop the servers and
        // keep them under a name the leftover sweep does not take.
        drop(runtime);
        drop(nodes);
        let kept = std::env::temp_dir().join(format!(
            "{}kept-seed{}-{}",
            crate::topology::DATA_PREFIX,
            options.seed,
            std::process::id()
        ));
        let path = data.keep();
        match std::fs::rename(&path, &kept) {
            Ok(()) => eprintln!("kept the servers' data and logs in {}", kept.display()),
            Err(_) => eprintln!("kept the servers' data and logs in {}", path.display()),
        }
    }
    result
}

/// Sleeps until `deadline`, waking early when the run is interrupted.
async fn sleep_until(deadline: Instant) -> Result<()> {
    loop {
        if crate::interrupted() {
            bail!("interrupted");
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(100))).await;
    }
}

/// Polls `check` every 200 ms until it holds; an error when `timeout` passes first.
async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        sleep_until(Instant::now() + Duration::from_millis(200)).await?;
    }
}

/// Whether every node sees every node up and `normal`: the cluster is bootstrapped. `Err`
/// lists what is not, for the log.
async fn all_up(clients: &[Client]) -> std::result::Result<(), String> {
    let mut not_yet = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), client.status()).await
        else {
            not_yet.push(format!("n{} does not answer", index + 1));
            continue;
        };
        let members = status["nodes"].as_array().cloned().unwrap_or_default();
        if members.len() != clients.len() {
            not_yet.push(format!("n{} knows {} nodes", index + 1, members.len()));
        }
        for member in &members {
            if member["status"] != "up" || member["state"] != "normal" {
                not_yet.push(format!(
                    "n{} sees {} {} {}",
                    index + 1,
                    member["id"],
                    member["status"],
                    member["state"]
                ));
            }
        }
    }
    if not_yet.is_empty() {
        Ok(())
    } else {
        Err(not_yet.join(", "))
    }
}

async fn drive(
    options: &RunOptions,
    schedule: Vec<Step>,
    changes: Vec<ChangeStep>,
    topology: &Topology,
    nodes: &Mutex<Nodes>,
    evidence: &std::path::Path,
) -> Result<RunReport> {
    let began = Instant::now();
    // One client per slot (joiners' included); the first `nodes` make the cluster.
    let clients: Vec<Client> = (0..topology.node_namespaces.len())
        .map(|i| Client::new(&Nodes::url(i)))
        .collect();
    let initial = &clients[..options.nodes];
    // The workload starts once every node has decided it is `normal`, not merely once all
    // are up: a node still deciding (joining or normal, from what gossip says of the others'
    // data) has no state yet and is placed in nobody's ring, so nodes disagree on the ring.
    // Starting at "all up" found quorum reads missing writes acknowledged in the first
    // 300 ms (seed 3, 3 nodes, 1 run in 3): the bootstrap race is reported, not tested here.
    let last_not_yet = Mutex::new(None::<String>);
    wait_until(
        Duration::from_secs(60),
        "every node sees every node up and normal",
        || async {
            let answer = all_up(initial).await;
            if let Err(why) = &answer {
                *last_not_yet.lock().expect("log lock") = Some(why.clone());
            }
            answer.is_ok()
        },
    )
    .await?;
    println!(
        "cluster up and normal after {:.1} s{}",
        began.elapsed().as_secs_f64(),
        last_not_yet
            .into_inner()
            .expect("log lock")
            .map_or(String::new(), |why| format!(" (last not yet: {why})"))
    );

    let op_timeout = Duration::from_millis(options.request_timeout_ms + 2_000);
    let workload = Arc::new(Workload {
        started: Instant::now(),
        clients: clients.clone(),
        serving: Workload::first_serving(options.nodes),
        op_timeout,
        stop: AtomicBool::new(false),
        history: Mutex::new(Vec::new()),
        written_keys: Mutex::new(Vec::new()),
        rmw_keys: (0..options.rmw_keys).map(|i| format!("rmw{i}")).collect(),
        read_level: options.read_level,
        write_level: options.write_level,
    });
    let mut tasks = Vec::new();
    let mut client_id = 0u32;
    let mut next_seed = || {
        client_id += 1;
        (
            client_id,
            options
                .seed
                .wrapping_mul(1_000)
                .wrapping_add(client_id as u64),
        )
    };
    for _ in 0..options.writers {
        let (id, seed) = next_seed();
        tasks.push(tokio::spawn(workload.clone().unique_writer(id, seed)));
    }
    for _ in 0..options.readers {
        let (id, seed) = next_seed();
        tasks.push(tokio::spawn(workload.clone().quorum_reader(id, seed)));
    }
    for _ in 0..options.rmw_clients {
        let (id, seed) = next_seed();
        tasks.push(tokio::spawn(workload.clone().read_modify_writer(id, seed)));
    }

    let mut nemesis = Nemesis {
        options,
        topology,
        nodes,
        workload: &workload,
        probes: Vec::new(),
        kills: 0,
        pauses: 0,
        partitions: 0,
        skipped: 0,
        on_joiners: 0,
        crashes: Vec::new(),
    };
    let mut lane = ChangesLane {
        nodes,
        workload: &workload,
        joins: 0,
        decommissions: 0,
        removals: 0,
        stuck: Vec::new(),
    };
    // The faults and the cluster changes run side by side; the faults end with the workload
    // and the heal, the changes when each finished (or got stuck), the heal included.
    let faults = async {
        let result = nemesis.run(&schedule).await;
        workload.stop.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = task.await;
        }
        result?;
        // The heal: no rule, no paused or dead node. From here on no operator action:
        // hints, read repair (not exercised: no client reads until converged) and
        // anti-entropy.
        topology.heal()?;
        let mut nodes = nodes.lock().expect("nodes lock");
        for index in nodes.members() {
            nodes.revive(index)?;
        }
        anyhow::Ok(Instant::now())
    };
    let (healed, changed) = tokio::join!(faults, lane.run(&changes));
    let healed = healed?;
    changed?;
    let members = nodes.lock().expect("nodes lock").members();
    println!(
        "healed{}; waiting for convergence (at most {:?}) on {}",
        if changes.is_empty() {
            ""
        } else {
            " and the cluster changes done"
        },
        options.settle_timeout,
        members
            .iter()
            .map(|&i| format!("n{}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    );
    // The final members, by name: the snapshot, the convergence and the r=all reads go
    // through them only (a decommissioned node's data must be on them).
    let final_members: Vec<(String, Client)> = members
        .iter()
        .map(|&i| (format!("n{}", i + 1), clients[i].clone()))
        .collect();
    let history = std::mem::take(&mut *workload.history.lock().expect("history lock"));
    // Beside the servers' data: kept with it when the run finds a violation.
    if let Err(e) = write_history(&evidence.join("history.txt"), &history) {
        eprintln!("could not write the history: {e}");
    }
    let keys = keys_of(&history, &workload.rmw_keys);
    let expected = FinalState {
        keys: BTreeMap::new(),
        replicas_per_key: REPLICATION_FACTOR.min(members.len()),
        leftovers_allowed: !changes.is_empty(),
    };
    let (converge_ms, snapshot) = settle(
        &final_members,
        &keys,
        &expected,
        healed,
        options.settle_timeout,
    )
    .await?;
    nemesis.check_crashes();
    let (read_all, final_read_failures) = read_everything(&final_members, &keys).await;
    println!(
        "final r=all reads done {:.1} s after the heal",
        healed.elapsed().as_secs_f64()
    );
    let final_state = FinalState {
        keys: keys
            .iter()
            .map(|key| {
                let (values, through) = match read_all.get(key) {
                    Some(Some((values, through))) => (Some(values.clone()), Some(through.clone())),
                    _ => (None, None),
                };
                let found = FinalKey {
                    read_all: values,
                    read_all_through: through,
                    copies: snapshot.get(key).cloned().unwrap_or_default(),
                };
                (key.clone(), found)
            })
            .collect(),
        ..expected
    };
    let checking = Instant::now();
    let verdict = checker::check(&history, &nemesis.probes, &final_state);
    println!(
        "checked {} operations in {:.1} s",
        history.len(),
        checking.elapsed().as_secs_f64()
    );
    reread_deleted_but_found(&final_members, &history, &final_state).await;
    if !changes.is_empty() {
        print_change_counters(&final_members).await;
    }
    let mut ops = OpCounts::default();
    for op in &history {
        match op.outcome {
            Outcome::Ok => ops.ok += 1,
            Outcome::Failed => ops.failed += 1,
            Outcome::Unknown => ops.unknown += 1,
        }
    }
    Ok(RunReport {
        options: options.clone(),
        schedule,
        ops,
        kills: nemesis.kills,
        pauses: nemesis.pauses,
        partitions: nemesis.partitions,
        skipped_faults: nemesis.skipped,
        changes,
        joins: lane.joins,
        decommissions: lane.decommissions,
        removals: lane.removals,
        faults_on_joiners: nemesis.on_joiners,
        stuck_changes: lane.stuck,
        probes: nemesis.probes,
        converge_ms,
        verdict,
        crashes: nemesis.crashes,
        final_read_failures,
    })
}

/// The cluster changes of a run, one after another, beside the faults.
struct ChangesLane<'a> {
    nodes: &'a Mutex<Nodes>,
    workload: &'a Workload,
    joins: usize,
    decommissions: usize,
    removals: usize,
    /// Changes that did not finish within [`CHANGE_TIMEOUT`] (violations).
    stuck: Vec<String>,
}

impl ChangesLane<'_> {
    async fn run(&mut self, changes: &[ChangeStep]) -> Result<()> {
        let started = self.workload.started;
        for step in changes {
            sleep_until(started + Duration::from_millis(step.start_ms)).await?;
            println!(
                "  {:>6.1}s  {} begins",
                started.elapsed().as_secs_f64(),
                step.change
            );
            let begun = Instant::now();
            let finished = match step.change {
                Change::Join { node } => self.join(node).await?,
                Change::Decommission { node } => self.decommission(node).await?,
                Change::Remove { node } => self.remove(node).await?,
            };
            let took = begun.elapsed().as_secs_f64();
            match finished {
                Ok(()) => println!(
                    "  {:>6.1}s  {} done after {took:.1} s",
                    started.elapsed().as_secs_f64(),
                    step.change
                ),
                Err(why) => {
                    let line = format!("{} did not finish after {took:.1} s: {why}", step.change);
                    eprintln!("  STUCK {line}");
                    self.stuck.push(line);
                    // The next change would only be refused while this one is in progress.
                    break;
                }
            }
        }
        Ok(())
    }

    /// Polls until every member but `except` reports `id` in `state` (a `left` node may be
    /// forgotten already); `Err(what was seen)` after [`CHANGE_TIMEOUT`]. Members that do
    /// not answer (killed, paused, cut off by the faults lane) are asked again.
    async fn wait_state(
        &self,
        id: &str,
        state: &str,
        except: Option<usize>,
        since: Instant,
    ) -> Result<std::result::Result<(), String>> {
        loop {
            let members = self.nodes.lock().expect("nodes lock").members();
            let mut all = true;
            let mut seen = Vec::new();
            for index in members.into_iter().filter(|&i| Some(i) != except) {
                let client = &self.workload.clients[index];
                let answer = tokio::time::timeout(Duration::from_secs(2), client.status()).await;
                let state_seen = match answer {
                    Ok(Ok(status)) => member_state(&status, id),
                    _ => Some("no answer".to_string()),
                };
                let ok = state_seen.as_deref() == Some(state)
                    || (state == "left" && state_seen.is_none());
                all &= ok;
                seen.push(format!(
                    "n{} sees {}",
                    index + 1,
                    state_seen.as_deref().unwrap_or("nothing")
                ));
            }
            if all {
                return Ok(Ok(()));
            }
            if since.elapsed() > CHANGE_TIMEOUT {
                return Ok(Err(format!("{id} not {state}: {}", seen.join(", "))));
            }
            sleep_until(Instant::now() + Duration::from_millis(500)).await?;
        }
    }

    async fn join(&mut self, node: usize) -> Result<std::result::Result<(), String>> {
        let since = Instant::now();
        self.nodes.lock().expect("nodes lock").join(node)?;
        // A joiner coordinates from the start (it answers 503 until gossip told it the
        // membership: those are the workload's failed operations).
        self.workload.set_serving(node, true);
        let id = format!("n{}", node + 1);
        let done = self.wait_state(&id, "normal", None, since).await?;
        if done.is_ok() {
            self.joins += 1;
        }
        Ok(done)
    }

    async fn decommission(&mut self, node: usize) -> Result<std::result::Result<(), String>> {
        let since = Instant::now();
        let id = format!("n{}", node + 1);
        let client = self.workload.clients[node].clone();
        // Asked until the node took it: it may be killed, paused or cut off by the faults
        // lane, or still finishing the change before (409 while one is in progress). A 409
        // from a node already leaving (an earlier answer lost to a timeout) is taken.
        loop {
            let answer = tokio::time::timeout(Duration::from_secs(5), client.decommission()).await;
            match answer {
                Ok(Ok(_)) => break,
                Ok(Err(mendkv_client::ClientError::Api {
                    status: 409,
                    message,
                    ..
                })) => {
                    if message.contains("not enough nodes") {
                        // The draw keeps more than RF members, so this is the cluster
                        // disagreeing about who is a member: report it.
                        return Ok(Err(format!("refused: {message}")));
                    }
                    let own = tokio::time::timeout(Duration::from_secs(2), client.status()).await;
                    if let Ok(Ok(status)) = own {
                        if matches!(
                            member_state(&status, &id).as_deref(),
                            Some("leaving" | "left")
                        ) {
                            break;
                        }
                    }
                }
                _ => {}
            }
            if since.elapsed() > CHANGE_TIMEOUT {
                return Ok(Err("the node never took the decommission".to_string()));
            }
            sleep_until(Instant::now() + Duration::from_secs(1)).await?;
        }
        let done = self.wait_state(&id, "left", Some(node), since).await?;
        if done.is_ok() {
            // It has handed everything over: no more client requests, then stopped.
            self.workload.set_serving(node, false);
            self.nodes.lock().expect("nodes lock").retire(node);
            self.decommissions += 1;
        }
        Ok(done)
    }
}

/// The history, one operation a line in completion order: invoke and complete times (us
/// since the workload started), client, coordinator, outcome, action.
fn write_history(path: &std::path::Path, history: &[Op]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for op in history {
        writeln!(
            file,
            "{} {} c{} n{} {:?} {:?}",
            op.invoke_us,
            op.complete_us,
            op.client,
            op.node + 1,
            op.outcome,
            op.action
        )?;
    }
    file.flush()
}

/// What each final member's cluster changes did (streaming in and out, cleanup), from its
/// `/metrics`: the evidence for a stale copy left on a node that lost a range.
async fn print_change_counters(members: &[(String, Client)]) {
    let wanted = [
        (
            "mendkv_streaming_keys_total{direction=\"in\"}",
            "streamed in",
        ),
        (
            "mendkv_streaming_keys_total{direction=\"out\"}",
            "streamed out",
        ),
        ("mendkv_cleanup_keys_total", "cleaned up"),
    ];
    let mut line = Vec::new();
    for (id, client) in members {
        let Ok(Ok(text)) = tokio::time::timeout(Duration::from_secs(5), client.metrics()).await
        else {
            line.push(format!("{id}: no metrics"));
            continue;
        };
        let counts: Vec<String> = wanted
            .iter()
            .map(|(metric, what)| {
                let value = text
                    .lines()
                    .find_map(|l| l.strip_prefix(metric).map(str::trim))
                    .unwrap_or("0");
                format!("{what} {value}")
            })
            .collect();
        line.push(format!("{id}: {}", counts.join(", ")));
    }
    println!("change counters (keys): {}", line.join("; "));
}

/// Evidence for a resurrection: a key whose delete was acknowledged and whose final `r=all`
/// read found values is read again at `r=all` through every member, so the log shows which
/// coordinators return it (a coordinator's view of the key's replicas is the usual suspect).
async fn reread_deleted_but_found(
    members: &[(String, Client)],
    history: &[Op],
    final_state: &FinalState,
) {
    let deleted: BTreeSet<&str> = history
        .iter()
        .filter(|op| matches!(op.action, Action::Delete { .. }) && op.outcome == Outcome::Ok)
        .map(|op| op.action.key())
        .collect();
    for key in deleted {
        let found = final_state
            .keys
            .get(key)
            .and_then(|k| k.read_all.as_ref())
            .is_some_and(|values| !values.is_empty());
        if !found {
            continue;
        }
        for (id, client) in members {
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                client.get(BUCKET, key.as_bytes(), Some("all")),
            )
            .await;
            let answer = match read {
                Ok(Ok(found)) => format!("{:?}", values_of(&found)),
                Ok(Err(e)) => format!("error {e}"),
                Err(_) => "timeout".to_string(),
            };
            println!("  deleted key {key} read again at r=all through {id}: {answer}");
        }
    }
}

impl ChangesLane<'_> {
    /// A node dies for good: kill -9, never restarted, out of the members (the faults skip
    /// it, the final reads do not go through it) and of the clients' nodes. Then
    /// `remove-node` on a survivor, asked again until one takes it (409 while the survivors
    /// still see it up, or while another change is in progress), and the wait until every
    /// survivor sees it `left`.
    async fn remove(&mut self, node: usize) -> Result<std::result::Result<(), String>> {
        let since = Instant::now();
        let id = format!("n{}", node + 1);
        self.workload.set_serving(node, false);
        self.nodes.lock().expect("nodes lock").retire(node);
        let mut attempt = 0;
        let mut last_answer: String;
        loop {
            let survivors = self.nodes.lock().expect("nodes lock").members();
            let asked = survivors[attempt % survivors.len()];
            attempt += 1;
            let client = &self.workload.clients[asked];
            let answer =
                tokio::time::timeout(Duration::from_secs(5), client.remove_node(&id)).await;
            match answer {
                Ok(Ok(_)) => {
                    println!(
                        "  {:>6.1}s  n{} took the removal of {id}",
                        self.workload.started.elapsed().as_secs_f64(),
                        asked + 1
                    );
                    break;
                }
                Ok(Err(mendkv_client::ClientError::Api {
                    status, message, ..
                })) => {
                    if status == 409 && message.contains("not enough nodes") {
                        // The draw keeps more than RF members: the cluster disagrees about
                        // who is a member. Reported.
                        return Ok(Err(format!("refused by n{}: {message}", asked + 1)));
                    }
                    last_answer = format!("n{}: {status} {message}", asked + 1);
                }
                Ok(Err(e)) => last_answer = format!("n{}: {e}", asked + 1),
                Err(_) => last_answer = format!("n{}: timeout", asked + 1),
            }
            if since.elapsed() > CHANGE_TIMEOUT {
                return Ok(Err(format!(
                    "no survivor took the removal; last answer {last_answer}"
                )));
            }
            sleep_until(Instant::now() + Duration::from_secs(1)).await?;
        }
        let done = self.wait_state(&id, "left", None, since).await?;
        if done.is_ok() {
            self.removals += 1;
        }
        Ok(done)
    }
}

/// Every key the history touched (the read-modify-write keys even if never written).
fn keys_of(history: &[Op], rmw_keys: &[String]) -> Vec<String> {
    let mut keys: BTreeSet<String> = rmw_keys.iter().cloned().collect();
    for op in history {
        if !matches!(op.action, Action::Read { .. }) {
            keys.insert(op.action.key().to_string());
        }
    }
    keys.into_iter().collect()
}

struct Nemesis<'a> {
    options: &'a RunOptions,
    topology: &'a Topology,
    nodes: &'a Mutex<Nodes>,
    workload: &'a Workload,
    probes: Vec<MinorityProbe>,
    kills: usize,
    pauses: usize,
    partitions: usize,
    /// Faults not applied because a node they name had left.
    skipped: usize,
    /// Faults aimed at a joined node instead of the drawn one ([`Nemesis::aim`]).
    on_joiners: usize,
    crashes: Vec<String>,
}

impl Nemesis<'_> {
    async fn run(&mut self, schedule: &[Step]) -> Result<()> {
        let started = self.workload.started;
        for (number, step) in schedule.iter().enumerate() {
            sleep_until(started + Duration::from_millis(step.start_ms)).await?;
            let members = self.nodes.lock().expect("nodes lock").members();
            let aimed = self.aim(number, &step.fault, &members);
            let step = &Step {
                fault: aimed,
                ..step.clone()
            };
            if let Some(gone) = step
                .fault
                .named_nodes()
                .into_iter()
                .find(|n| !members.contains(n))
            {
                println!(
                    "  {:>6.1}s  {} skipped: n{} has left",
                    started.elapsed().as_secs_f64(),
                    step.fault,
                    gone + 1
                );
                self.skipped += 1;
                continue;
            }
            println!(
                "  {:>6.1}s  {}",
                started.elapsed().as_secs_f64(),
                step.fault
            );
            self.apply(&step.fault, &members)?;
            let end = started + Duration::from_millis(step.start_ms + step.duration_ms);
            if let Some(alone) = step.fault.alone(&members) {
                self.probe_while_alone(number, alone, end).await?;
            }
            sleep_until(end).await?;
            self.undo(&step.fault)?;
            self.check_crashes();
        }
        sleep_until(started + self.options.duration).await
    }

    /// [`schedule::aim_at_joiners`], counted.
    fn aim(&mut self, number: usize, fault: &Fault, members: &[usize]) -> Fault {
        let aimed = schedule::aim_at_joiners(
            self.options.seed,
            number,
            fault,
            members,
            self.options.nodes,
        );
        if &aimed != fault {
            self.on_joiners += 1;
        }
        aimed
    }

    fn apply(&mut self, fault: &Fault, members: &[usize]) -> Result<()> {
        let mut nodes = self.nodes.lock().expect("nodes lock");
        match fault {
            Fault::Kill { node } => {
                nodes.kill(*node);
                self.kills += 1;
            }
            Fault::Pause { node } => {
                nodes.pause(*node);
                self.pauses += 1;
            }
            partition => {
                self.topology.cut(&partition.dropped_links(members))?;
                self.partitions += 1;
            }
        }
        Ok(())
    }

    fn undo(&mut self, fault: &Fault) -> Result<()> {
        match fault {
            Fault::Kill { node } | Fault::Pause { node } => {
                self.nodes.lock().expect("nodes lock").revive(*node)
            }
            _ => self.topology.heal(),
        }
    }

    fn check_crashes(&mut self) {
        let exited = self.nodes.lock().expect("nodes lock").exited();
        for line in &exited {
            eprintln!("  CRASH {line}");
        }
        self.crashes.extend(exited);
    }

    /// Sends `w=quorum` writes to the node cut off alone, one after another while the
    /// partition has time left for a whole probe, so none can be in flight at the heal (a
    /// write still waiting then may rightly succeed).
    async fn probe_while_alone(&mut self, step: usize, node: usize, end: Instant) -> Result<()> {
        let client = &self.workload.clients[node];
        let id = self.nodes.lock().expect("nodes lock").id(node).to_string();
        let budget = self.workload.op_timeout;
        let mut sequence = 0;
        while Instant::now() + budget < end && !crate::interrupted() {
            let key = format!("p{step}-{sequence}");
            let value = format!("{key}:v");
            sequence += 1;
            let invoke_us = self.workload.micros();
            let sent = Instant::now();
            let result = tokio::time::timeout(
                budget,
                client.put(
                    BUCKET,
                    key.as_bytes(),
                    value.clone().into_bytes(),
                    None,
                    Some("quorum"),
                    None,
                ),
            )
            .await;
            let outcome = classify(&result);
            let answered_ms = result.is_ok().then(|| sent.elapsed().as_millis() as u64);
            self.workload
                .history
                .lock()
                .expect("history lock")
                .push(Op {
                    client: 0,
                    node,
                    action: Action::Write { key, value },
                    invoke_us,
                    complete_us: self.workload.micros(),
                    outcome,
                });
            self.probes.push(MinorityProbe {
                node: id.clone(),
                outcome,
                answered_ms,
            });
            sleep_until(Instant::now() + Duration::from_millis(200)).await?;
        }
        Ok(())
    }
}

/// One node's own copy of `key`: `Ok(None)` when it holds nothing, `Err` when it did not
/// answer (the key then cannot count as converged).
async fn local_copy(client: &Client, node: &str, key: &str) -> Result<Option<StoredCopy>, ()> {
    let answer = tokio::time::timeout(Duration::from_secs(5), client.local(BUCKET, key.as_bytes()))
        .await
        .map_err(|_| ())?
        .map_err(|_| ())?;
    let Some(json) = answer else {
        return Ok(None);
    };
    let siblings = json["siblings"]
        .as_array()
        .ok_or(())?
        .iter()
        .map(|s| StoredSibling {
            value: STANDARD
                .decode(s["value_base64"].as_str().unwrap_or_default())
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_else(|_| "<bad base64>".into()),
            tombstone: s["tombstone"].as_bool().unwrap_or(false),
        })
        .collect();
    Ok(Some(StoredCopy {
        node: node.to_string(),
        siblings,
        context: json["context"].as_str().unwrap_or_default().to_string(),
    }))
}

/// Every member's copy of each of `keys`; a key is absent when some member did not answer.
async fn snapshot(
    members: &[(String, Client)],
    keys: &[String],
) -> BTreeMap<String, Vec<StoredCopy>> {
    stream::iter(keys.iter().cloned())
        .map(|key| async move {
            let mut copies = Vec::new();
            for (id, client) in members {
                match local_copy(client, id, &key).await {
                    Ok(Some(copy)) => copies.push(copy),
                    Ok(None) => {}
                    Err(()) => return None,
                }
            }
            Some((key, copies))
        })
        .buffer_unordered(FINAL_CONCURRENCY)
        .filter_map(|entry| async move { entry })
        .collect()
        .await
}

/// Polls the replicas of the keys still diverging until all agree (confirmed by a full
/// snapshot) or `timeout` after `healed`. Returns the time to converge and the last full
/// snapshot.
async fn settle(
    members: &[(String, Client)],
    keys: &[String],
    expected: &FinalState,
    healed: Instant,
    timeout: Duration,
) -> Result<(Option<u64>, BTreeMap<String, Vec<StoredCopy>>)> {
    let _ = wait_until(timeout, "every node is healthy again", || async {
        for (_, client) in members {
            if !client.health().await {
                return false;
            }
        }
        true
    })
    .await;
    let diverging = |found: &BTreeMap<String, Vec<StoredCopy>>, asked: &[String]| -> Vec<String> {
        asked
            .iter()
            .filter(|key| {
                found
                    .get(*key)
                    .is_none_or(|copies| !expected.converged(copies))
            })
            .cloned()
            .collect()
    };
    let mut pending = keys.to_vec();
    loop {
        let found = snapshot(members, &pending).await;
        pending = diverging(&found, &pending);
        if pending.is_empty() {
            let converged_ms = healed.elapsed().as_millis() as u64;
            let full = snapshot(members, keys).await;
            pending = diverging(&full, keys);
            if pending.is_empty() {
                println!(
                    "converged {:.1} s after the heal ({} keys)",
                    converged_ms as f64 / 1000.0,
                    keys.len()
                );
                return Ok((Some(converged_ms), full));
            }
        }
        if healed.elapsed() > timeout {
            println!(
                "NOT converged {timeout:?} after the heal: {} keys diverge",
                pending.len()
            );
            return Ok((None, snapshot(members, keys).await));
        }
        sleep_until(Instant::now() + Duration::from_millis(500)).await?;
    }
}

/// Reads every key at `r=all` (through the nodes in turn, three tries each); returns the
/// values per key with the coordinator that answered (`None` when all tries failed) and how
/// many failed.
async fn read_everything(
    members: &[(String, Client)],
    keys: &[String],
) -> (BTreeMap<String, Option<(Vec<String>, String)>>, usize) {
    let reads: BTreeMap<String, Option<(Vec<String>, String)>> =
        stream::iter(keys.iter().cloned().enumerate())
            .map(|(index, key)| async move {
                for attempt in 0..3 {
                    let (through, client) = &members[(index + attempt) % members.len()];
                    let read = tokio::time::timeout(
                        Duration::from_secs(5),
                        client.get(BUCKET, key.as_bytes(), Some("all")),
                    )
                    .await;
                    if let Ok(Ok(found)) = read {
                        return (key, Some((values_of(&found), through.clone())));
                    }
                }
                (key, None)
            })
            .buffer_unordered(FINAL_CONCURRENCY)
            .collect()
            .await;
    let failures = reads.values().filter(|r| r.is_none()).count();
    (reads, failures)
}
