//! Faults: which ones a run may inject ([`FaultConfig`], `--faults`), and the schedule that
//! injects them (crashes, often timed for a node holding unsynced writes; pauses;
//! partitions), the scripted fault API of `tests/scenarios.rs`, and the heal that ends them.
//! The network's own faults (loss, duplication, reordering) live in [`crate::network`];
//! failing fsyncs in `disk.rs`.

use crate::disk::{values_a_crash_may_take, values_held};
use crate::event_loop::{Event, Simulation};
use crate::node_options::node_config;
use crate::OpId;
use crate::Outcome;
use mendkv_core::config::FsyncPolicy;
use mendkv_core::gossip::NodeStatus;
use mendkv_core::membership::PeerStatus;
use mendkv_core::message::ClientRequest;
use mendkv_core::node::Node;
use mendkv_core::storage::MemoryStorage;
use mendkv_core::Millis;
use rand::Rng;
use std::fmt;

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
    /// Cluster changes during the workload: a node is decommissioned, or crashed for good
    /// and removed, then wiped and joins again (`membership.rs` of the core). Turns gossip
    /// on (changes are acknowledged through it).
    pub membership: bool,
}

/// The names `--faults` accepts, in canonical order.
pub const FAULT_NAMES: [&str; 9] = [
    "loss",
    "duplicate",
    "reorder",
    "partition",
    "crash",
    "pause",
    "skew",
    "fsync",
    "membership",
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
            membership: true,
        }
    }

    fn flags(&self) -> [bool; 9] {
        [
            self.loss,
            self.duplicate,
            self.reorder,
            self.partition,
            self.crash,
            self.pause,
            self.skew,
            self.fsync,
            self.membership,
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
            "membership" => &mut self.membership,
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
        self.loss
            || self.duplicate
            || self.partition
            || self.crash
            || self.pause
            || self.fsync
            || self.membership
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

impl Simulation {
    pub(crate) fn max_faulty(&self) -> usize {
        ((self.slots.len().saturating_sub(1)) / 2).max(1)
    }

    pub(crate) fn faulty(&self) -> usize {
        let armed = self.armed_crash.map(|(n, _)| n);
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| !s.alive() || s.paused || armed == Some(*i))
            .count()
    }

    pub(crate) fn fault_tick(&mut self) {
        if !self.faults_active {
            return;
        }
        let f = self.config.faults;
        if f.membership {
            self.membership_step();
        }
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
        if f.membership {
            kinds.push("membership");
        }
        if kinds.is_empty() {
            let at = self.now + self.rng_fault.gen_range(200..=2000);
            self.schedule(at, Event::FaultTick);
            return;
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
            "membership" if room && self.membership_cycle.is_none() => {
                let node = healthy[self.rng_fault.gen_range(0..healthy.len())];
                self.start_membership_cycle(node);
            }
            _ => {}
        }
        let at = self.now + self.rng_fault.gen_range(200..=2000);
        self.schedule(at, Event::FaultTick);
    }

    /// An armed crash fires once its node holds unsynced writes (or at its deadline), and
    /// is dropped if the node went down, paused, or faults stopped meanwhile. Checked after
    /// every event.
    pub(crate) fn fire_armed_crash(&mut self) {
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
    }

    /// Crashes node `i`: its unsynced writes vanish except a prefix (`keep_pending`, or a
    /// random number when `None`).
    pub fn crash(&mut self, i: usize, keep_pending: Option<usize>) {
        let Some(node) = self.slots[i].node.take() else {
            return;
        };
        let storage = node.into_storage();
        // Periodic fsync promises less: note what this crash takes (not needed otherwise, and
        // not free).
        let periodic = self.config.options.fsync != FsyncPolicy::Always;
        let pending = storage.pending_writes();
        let keep = keep_pending
            .unwrap_or_else(|| self.rng_disk.gen_range(0..=pending))
            .min(pending);
        let before = periodic.then(|| (values_a_crash_may_take(&storage, keep), storage.objects()));
        storage.crash(keep);
        if let Some((values, objects)) = before {
            self.record_crash_losses(i, values, objects);
        }
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
        self.announce_peer_status(i, incarnation, PeerStatus::Down);
    }

    /// Every other live node's transport learns, 0-20 ms from now, that node `i` (in its
    /// `incarnation`) went down or came up.
    fn announce_peer_status(&mut self, i: usize, incarnation: u64, status: PeerStatus) {
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
                        status,
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
        let cluster_of_many = self.slots.len() > 1;
        let slot = &mut self.slots[i];
        slot.incarnation += 1;
        let incarnation = slot.incarnation;
        let local = slot.clock.local(self.now);
        let mut config = node_config(
            &slot.id,
            self.config.seed,
            incarnation,
            &self.config.options,
        );
        // A wiped node that rejoins learns its old epoch from its peers, and joins (as the
        // server does, only when it has peers to ask).
        config.learn_epoch_from_peers = self.config.faults.membership && cluster_of_many;
        let mut node =
            Node::new(config, slot.storage.clone(), local).expect("memory storage does not fail");
        for member in &self.members {
            node.handle_member_discovered(member.clone());
        }
        if self.config.faults.membership {
            for member in &self.members {
                if member.id != self.slots[i].id {
                    node.handle_seed_discovered(local, member.clone());
                }
            }
        }
        for (j, other) in self.slots.iter().enumerate() {
            if j != i && !other.alive() {
                node.handle_peer_status(local, &other.id, PeerStatus::Down);
            }
        }
        let epoch = node.epoch();
        self.slots[i].node = Some(node);
        self.trace_line(&format!("n{i}"), |_| format!("RESTART (epoch {epoch})"));
        self.announce_peer_status(i, incarnation, PeerStatus::Up);
        self.flush(i);
        self.schedule_periodic_sync(i);
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
            let crashed_for_good = self
                .membership_cycle
                .filter(|c| c.node == i && c.kind != CycleKind::Decommission)
                .map(|c| c.kind);
            if let Some(kind) = crashed_for_good.filter(|_| !self.slots[i].alive()) {
                // A node crashed for good comes back wiped, as a new member. (A leaving node
                // that crashed restarts with its data: it may hold the last copies.)
                self.wipe_departed(i, kind);
                if let Some(cycle) = self.membership_cycle.as_mut() {
                    cycle.step = CycleStep::Rejoining;
                }
            }
            self.restart(i);
        }
    }

    /// Gives the departed node of a membership cycle an empty disk (it rejoins as a new
    /// member). A node crashed for good and removed loses what it alone held, as a lost
    /// disk does: a write at `one` that only it took is gone by the operator's choice, not
    /// by a bug. A decommissioned node handed everything over first, and a joiner was never
    /// the only copy of anything (writes reach it only in addition to the old owners):
    /// nothing is excused.
    fn wipe_departed(&mut self, i: usize, kind: CycleKind) {
        let storage = std::mem::replace(&mut self.slots[i].storage, MemoryStorage::new());
        if kind == CycleKind::Remove {
            self.record_crash_losses(i, values_held(&storage), storage.objects());
        }
        self.trace_line(&format!("n{i}"), |_| "DISK WIPED (rejoins)".into());
    }

    /// Starts a cluster change on `node`: a decommission (it leaves, is wiped, and joins
    /// again), or a crash for good and its removal (then wiped, it joins again).
    fn start_membership_cycle(&mut self, node: usize) {
        let rf = self.config.options.replication_factor;
        // Only with a spare node: RF copies must fit on the others.
        if self.slots.len() <= rf {
            return;
        }
        // Removing a dead node at rf 1 loses its only copies by definition (as Cassandra's
        // removenode does): only decommission there.
        let decommission = rf < 2 || self.rng_fault.gen_bool(0.5);
        let kind = if decommission {
            CycleKind::Decommission
        } else {
            CycleKind::Remove
        };
        self.membership_cycle = Some(MembershipCycle {
            node,
            kind,
            step: CycleStep::Leaving,
            asked_at: None,
        });
        self.trace_line(&format!("n{node}"), |_| {
            format!("MEMBERSHIP {kind:?} starts")
        });
        if kind == CycleKind::Remove {
            self.crash(node, None);
        }
        self.membership_step();
    }

    /// Moves the cluster change along: asks for it (again, if refused or lost), wipes and
    /// restarts the node once it left, and ends the cycle once it is normal everywhere.
    pub(crate) fn membership_step(&mut self) {
        let Some(cycle) = self.membership_cycle else {
            return;
        };
        let k = cycle.node;
        let id = self.slots[k].id.clone();
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|&i| i != k && self.slots[i].alive() && !self.slots[i].paused)
            .collect();
        match cycle.step {
            CycleStep::Leaving => {
                let left = match cycle.kind {
                    CycleKind::Decommission => self.slots[k]
                        .node
                        .as_ref()
                        .is_some_and(|n| n.own_state() == NodeStatus::Left),
                    CycleKind::Remove | CycleKind::RemoveJoiner => live.iter().any(|&i| {
                        self.slots[i]
                            .node
                            .as_ref()
                            .is_some_and(|n| n.is_removed(&id))
                    }),
                };
                if left {
                    // Gone: wipe it and bring it back as a new member.
                    self.crash(k, Some(0));
                    self.wipe_departed(k, cycle.kind);
                    if let Some(c) = self.membership_cycle.as_mut() {
                        c.step = CycleStep::Rejoining;
                    }
                    self.restart(k);
                    return;
                }
                let due = cycle.asked_at.is_none_or(|t| self.now >= t + 5_000);
                if !due {
                    return;
                }
                let target = match cycle.kind {
                    CycleKind::Decommission if self.slots[k].alive() && !self.slots[k].paused => {
                        Some((k, ClientRequest::Decommission))
                    }
                    CycleKind::Remove | CycleKind::RemoveJoiner if !live.is_empty() => {
                        let at = live[self.rng_fault.gen_range(0..live.len())];
                        Some((at, ClientRequest::RemoveNode { node: id.clone() }))
                    }
                    _ => None,
                };
                if let Some((at, request)) = target {
                    if let Some(c) = self.membership_cycle.as_mut() {
                        c.asked_at = Some(self.now);
                    }
                    self.admin_request(at, request);
                }
            }
            CycleStep::Rejoining => {
                if !self.slots[k].alive() {
                    return;
                }
                if self.kill_the_joiner(k, cycle.kind) {
                    return;
                }
                let joined = self.slots[k].node.as_ref().is_some_and(|n| {
                    n.own_state() == NodeStatus::Normal && n.layout().active().is_none()
                });
                let everywhere = joined
                    && (0..self.slots.len()).all(|i| {
                        !self.slots[i].alive()
                            || self.slots[i]
                                .node
                                .as_ref()
                                .is_some_and(|n| n.peer_state(&id) == NodeStatus::Normal)
                    });
                if everywhere {
                    self.trace_line(&format!("n{k}"), |_| "MEMBERSHIP rejoined".into());
                    self.membership_cycle = None;
                } else if let Some(node) = self.slots[k].node.as_ref() {
                    let progress = node.change_progress(&id, node_now(self, k));
                    let seen: Vec<String> = (0..self.slots.len())
                        .filter_map(|i| self.slots[i].node.as_ref())
                        .map(|n| {
                            format!(
                                "{}:g{}:{:?}",
                                n.peer_state(&id).as_str(),
                                n.peer_generation(&id),
                                n.change_progress(&id, 0).phase
                            )
                        })
                        .collect();
                    let line = format!(
                        "MEMBERSHIP {} {} {}/{} ({}) seen as {seen:?}",
                        progress.state,
                        progress.phase,
                        progress.ranges_done,
                        progress.ranges_total,
                        progress.reason.unwrap_or_default()
                    );
                    self.trace_line(&format!("n{k}"), |_| line);
                }
            }
        }
    }

    /// Sometimes the rejoining node of a cycle (not already a killed joiner's) is crashed
    /// for good while it streams, and removed while `joining` (issue 13): the cycle then
    /// removes it, wipes it and lets it join again. True when it was killed.
    fn kill_the_joiner(&mut self, k: usize, kind: CycleKind) -> bool {
        if !self.faults_active
            || kind == CycleKind::RemoveJoiner
            || self.slots[k].paused
            || self.faulty() >= self.max_faulty()
        {
            return false;
        }
        let Some(phase) = self.slots[k]
            .node
            .as_ref()
            .filter(|n| n.own_state() == NodeStatus::Joining)
            .map(|n| n.change_progress(n.id(), node_now(self, k)).phase)
        else {
            return false;
        };
        if !self.rng_fault.gen_bool(0.4) {
            return false;
        }
        self.membership_cycle = Some(MembershipCycle {
            node: k,
            kind: CycleKind::RemoveJoiner,
            step: CycleStep::Leaving,
            asked_at: None,
        });
        self.trace_line(&format!("n{k}"), |_| {
            format!("MEMBERSHIP RemoveJoiner starts (killed while joining, {phase})")
        });
        // Its disk keeps every write (a synced kill): nothing it held is excused as lost,
        // and none of it may be needed either.
        self.crash(k, Some(usize::MAX));
        true
    }

    /// An operator's admin request to node `at` (its answer is only traced).
    fn admin_request(&mut self, at: usize, request: ClientRequest) {
        let slot = &mut self.slots[at];
        let local = slot.clock.local(self.now);
        let line = format!("admin {request:?}");
        if let Some(node) = slot.node.as_mut() {
            // Ids from the top of the range never name a workload operation.
            node.handle_client_request(local, ADMIN_CLIENT_ID, request);
        }
        self.trace_line(&format!("n{at}"), |_| line);
        self.flush(at);
    }

    /// True while a cluster change of the membership fault is in progress.
    pub fn membership_changing(&self) -> bool {
        self.membership_cycle.is_some()
    }
}

fn node_now(sim: &Simulation, i: usize) -> Millis {
    sim.slots[i].clock.local(sim.now)
}

/// The client id of operator requests (`reply` ignores ids it did not invoke).
const ADMIN_CLIENT_ID: OpId = OpId::MAX;

/// A cluster change the membership fault drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MembershipCycle {
    pub node: usize,
    pub kind: CycleKind,
    pub step: CycleStep,
    pub asked_at: Option<Millis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CycleKind {
    Decommission,
    Remove,
    /// A rejoining node crashed for good while it streamed, and removed while `joining`.
    RemoveJoiner,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CycleStep {
    Leaving,
    Rejoining,
}
