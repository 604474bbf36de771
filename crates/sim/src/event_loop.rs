//! The event loop: [`Simulation`] owns the nodes, the queue of events ordered by virtual
//! time and a sequence number, and the streams of randomness; it builds the cluster, steps
//! events, delivers messages and carries out each node's actions after every input.

use crate::checker;
use crate::clock::Clock;
use crate::config::SimConfig;
use crate::network::{Network, NetworkParams};
use crate::node_options::{node_config, NodeOptions};
use crate::trace::{describe, Names};
use crate::workload::{self, Client, History, Outcome, WorkloadParams};
use crate::OpId;
use mendkv_core::membership::{MemberInfo, PeerStatus};
use mendkv_core::message::{ClientRequest, ClientResponse, DurableAnswerKey, Message};
use mendkv_core::node::{Action, Node, SyncTicket};
use mendkv_core::ring::Ring;
use mendkv_core::storage::{MemoryStorage, Storage};
use mendkv_core::version::Object;
use mendkv_core::{Millis, NodeId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

pub(crate) struct Slot {
    pub(crate) id: NodeId,
    pub(crate) storage: MemoryStorage,
    pub(crate) node: Option<Node<MemoryStorage>>,
    /// Grows on every restart; events addressed to an older life are dropped.
    pub(crate) incarnation: u64,
    pub(crate) paused: bool,
    /// Events that arrived while paused, in arrival order.
    pub(crate) stalled: Vec<Event>,
    pub(crate) syncing: bool,
    /// The queue key of this node's pending tick.
    pub(crate) tick: Option<(Millis, u64)>,
    pub(crate) clock: Clock,
}

impl Slot {
    pub(crate) fn alive(&self) -> bool {
        self.node.is_some()
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Event {
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
    /// `fsync = periodic`: the node's sync timer.
    PeriodicSync {
        node: usize,
        incarnation: u64,
    },
}

impl Event {
    /// The node that handles this event (for pauses).
    pub(crate) fn target(&self) -> Option<usize> {
        match self {
            Event::Deliver { to, .. } => Some(*to),
            Event::SyncDone { node, .. } | Event::PeriodicSync { node, .. } => Some(*node),
            Event::PeerStatus { observer, .. } => Some(*observer),
            _ => None,
        }
    }
}

/// A simulated cluster.
pub struct Simulation {
    pub(crate) config: SimConfig,
    pub(crate) now: Millis,
    pub(crate) seq: u64,
    pub(crate) queue: BTreeMap<(Millis, u64), Event>,
    pub(crate) slots: Vec<Slot>,
    pub(crate) index: BTreeMap<NodeId, usize>,
    pub(crate) members: Vec<MemberInfo>,
    pub(crate) ring: Ring,
    pub(crate) network: Network,
    pub(crate) rng_net: ChaCha8Rng,
    pub(crate) rng_work: ChaCha8Rng,
    pub(crate) rng_fault: ChaCha8Rng,
    pub(crate) rng_disk: ChaCha8Rng,
    pub(crate) history: History,
    /// Requests not yet handed to their coordinator.
    pub(crate) requests: BTreeMap<OpId, ClientRequest>,
    /// Operations a coordinator has (or has stalled), by node.
    pub(crate) in_flight: BTreeMap<OpId, usize>,
    pub(crate) responses: BTreeMap<OpId, ClientResponse>,
    pub(crate) clients: Vec<Client>,
    pub(crate) workload: Option<WorkloadParams>,
    pub(crate) ops_issued: usize,
    pub(crate) faults_active: bool,
    /// A crash waiting for its moment: node `.0` crashes as soon as it holds unsynced
    /// writes (the interesting case for durability), or at virtual time `.1` at the latest.
    pub(crate) armed_crash: Option<(usize, Millis)>,
    /// The cluster change the membership fault is driving, if any.
    pub(crate) membership_cycle: Option<crate::fault::MembershipCycle>,
    /// Probability that an fsync fails (the `fsync` fault), while faults are on.
    pub(crate) fsync_failure: f64,
    /// Nodes whose next fsync fails (scripted).
    pub(crate) fail_next_fsync: BTreeSet<usize>,
    /// Values whose dots to record as they travel (diagnosis of a failed seed).
    pub(crate) watch: BTreeSet<String>,
    pub(crate) watched_dots: BTreeMap<String, BTreeSet<String>>,
    pub(crate) trace: Option<String>,
    /// Actor hashes to node names, so traces print dots as `n3.1:2` (node n3, epoch 1,
    /// counter 2).
    pub(crate) names: Names,
    pub(crate) steps: u64,
    pub(crate) bound: Option<String>,
    pub(crate) params: String,
    /// The durability audit: for each write request a node handled (node, incarnation,
    /// sender, answer key), how many writes its storage had made by then. Its successful
    /// answer may leave only once that many writes are synced.
    pub(crate) awaiting_durable_answer: BTreeMap<(usize, u64, usize, DurableAnswerKey), u64>,
    /// Answers that claimed durability before their writes were synced.
    pub(crate) unsynced_acknowledgements: Vec<checker::Violation>,
    /// What this run's configuration does not promise (periodic fsync, sloppy quorum),
    /// value by value, for the checkers.
    pub(crate) weaker_promises: checker::WeakerPromises,
    /// Tombstones the reapers named in `Reap` messages (reaping runs only when hints
    /// expire within a run).
    pub(crate) tombstones_reaped: u64,
}

/// Bound on the durability audit's ledger (requests whose answer was never sent, say
/// because the node crashed, are forgotten oldest first).
pub(crate) const MAX_AWAITING_DURABLE_ANSWERS: usize = 100_000;

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
        let params = NetworkParams::random(&mut rng_net, &faults);

        let members: Vec<MemberInfo> = (0..config.nodes)
            .map(|i| MemberInfo {
                id: NodeId::new(format!("n{i}")),
                peer_address: format!("sim:n{i}"),
                http_address: format!("sim-http:n{i}"),
            })
            .collect();
        let proto = node_config(&members[0].id, config.seed, 0, &config.options);
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
            membership_cycle: None,
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
            weaker_promises: checker::WeakerPromises::default(),
            tombstones_reaped: 0,
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
                node_config(&info.id, sim.config.seed, 0, &sim.config.options),
                storage.clone(),
                clock.local(0),
            )
            .expect("memory storage does not fail");
            for member in &members {
                node.handle_member_discovered(member.clone());
            }
            if faults.membership {
                // Cluster changes are acknowledged through gossip: every node gossips.
                for member in members.iter().filter(|m| m.id != info.id) {
                    node.handle_seed_discovered(clock.local(0), member.clone());
                }
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
        if sim.config.options != NodeOptions::default() {
            write!(sim.params, "; options {}", sim.config.options).ok();
        }
        let line = format!("seed {} {}", sim.config.seed, sim.params);
        sim.trace_line("sim", |_| line);
        for i in 0..sim.slots.len() {
            sim.flush(i);
            sim.schedule_periodic_sync(i);
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
            .get(crate::bucket_of(key), key.as_bytes())
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
            .preference_list_for_key(crate::bucket_of(key), key.as_bytes())
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

    pub(crate) fn schedule(&mut self, at: Millis, event: Event) -> (Millis, u64) {
        self.seq += 1;
        let key = (at.max(self.now), self.seq);
        self.queue.insert(key, event);
        key
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
        self.fire_armed_crash();
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

    pub(crate) fn handle(&mut self, event: Event) {
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
            } => self.sync_done(node, incarnation, ticket),
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
            Event::PeriodicSync { node, incarnation } => self.periodic_sync(node, incarnation),
        }
    }

    pub(crate) fn deliver(&mut self, from: usize, to: usize, incarnation: u64, message: Message) {
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
    pub(crate) fn flush(&mut self, i: usize) {
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
        self.start_sync_if_needed(i);
        self.schedule_tick(i);
    }

    pub(crate) fn schedule_tick(&mut self, i: usize) {
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

    pub(crate) fn send(&mut self, from: usize, to: NodeId, message: Message) {
        if !self.watch.is_empty() {
            self.watch_message(&message);
        }
        self.audit_durable_answer(from, &to, &message);
        match &message {
            // A sloppy quorum counted a fallback's hint toward the write's level: the
            // write's quorum need not intersect a later read's.
            Message::HintedWrite { object, .. } => {
                for sibling in object.siblings() {
                    if let Some(value) = workload::value_text(&sibling.value) {
                        self.weaker_promises.hinted.entry(value).or_insert(self.now);
                    }
                }
            }
            Message::Reap { items, .. } => self.tombstones_reaped += items.len() as u64,
            _ => {}
        }
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

    pub(crate) fn send_failed(&mut self, from: usize, to: &NodeId, message: &Message, why: &str) {
        self.trace_line(&format!("n{from}"), |names| {
            format!("send {} to {to} failed ({why})", describe(message, names))
        });
        let slot = &mut self.slots[from];
        let local = slot.clock.local(self.now);
        if let Some(node) = slot.node.as_mut() {
            node.handle_send_failed(local, to, message);
        }
    }
}
