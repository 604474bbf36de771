//! A deterministic cluster of gossipers on virtual time: one seeded RNG decides ticks'
//! phases, peer choices, latencies and losses, so a run is reproduced exactly from its seed.
//! The tests, the `gossip_tables` example and the simulator use it; the measurement
//! functions below produce the figures the defaults were chosen from.

use super::{initial_state, AppKey, AppValue, GossipConfig, GossipEvent, GossipMessage, Gossiper};
use super::{Liveness, NodeStatus};
use crate::{Millis, NodeId};
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// The shape of a simulated cluster and its network.
#[derive(Debug, Clone)]
pub struct SimulationConfig {
    pub nodes: usize,
    /// The first `seeds` nodes are every node's seeds.
    pub seeds: usize,
    /// Probability that a message is lost.
    pub loss: f64,
    pub min_latency_ms: Millis,
    pub max_latency_ms: Millis,
    pub gossip: GossipConfig,
}

impl SimulationConfig {
    pub fn new(nodes: usize, loss: f64, gossip: GossipConfig) -> Self {
        SimulationConfig {
            nodes,
            seeds: 3,
            loss,
            min_latency_ms: 1,
            max_latency_ms: 10,
            gossip,
        }
    }
}

/// The id of simulated node `index`.
pub fn node_id(index: usize) -> NodeId {
    NodeId::new(format!("n{index:04}"))
}

#[derive(Debug, Clone)]
struct SimNode {
    gossiper: Gossiper,
    alive: bool,
    /// The time of the tick event that counts (others in the queue are stale); MAX if none.
    tick_at: Millis,
}

#[derive(Debug, Clone)]
enum SimEvent {
    Tick(usize),
    Deliver {
        from: usize,
        to: usize,
        message: GossipMessage,
    },
}

#[derive(Debug, Clone)]
struct Scheduled {
    at: Millis,
    sequence: u64,
    event: SimEvent,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.sequence) == (other.at, other.sequence)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    // Reversed: the heap pops the earliest event (ties in scheduling order).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.sequence).cmp(&(self.at, self.sequence))
    }
}

/// Many gossipers, a lossy network with latency, and virtual time.
#[derive(Debug, Clone)]
pub struct Simulation<R> {
    config: SimulationConfig,
    now: Millis,
    rng: R,
    nodes: Vec<SimNode>,
    ids: Vec<NodeId>,
    index: BTreeMap<NodeId, usize>,
    queue: BinaryHeap<Scheduled>,
    next_sequence: u64,
    messages_lost: u64,
    /// Each node's side of a network partition; messages between sides are lost.
    sides: Option<Vec<u8>>,
}

impl<R: Rng> Simulation<R> {
    /// All nodes start at time 0, each knowing only the seeds, with its first round at a
    /// random phase of the interval.
    pub fn new(config: SimulationConfig, rng: R) -> Self {
        let ids: Vec<NodeId> = (0..config.nodes).map(node_id).collect();
        let seeds: Vec<NodeId> = ids.iter().take(config.seeds).cloned().collect();
        let mut simulation = Simulation {
            nodes: Vec::with_capacity(config.nodes),
            index: ids
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, id)| (id, i))
                .collect(),
            queue: BinaryHeap::new(),
            next_sequence: 0,
            messages_lost: 0,
            sides: None,
            now: 0,
            ids,
            rng,
            config,
        };
        for index in 0..simulation.config.nodes {
            let gossiper = simulation.new_gossiper(index, 1, &seeds);
            simulation.nodes.push(SimNode {
                gossiper,
                alive: true,
                tick_at: Millis::MAX,
            });
            let phase = simulation
                .rng
                .gen_range(0..simulation.config.gossip.interval_ms);
            simulation.schedule_tick(index, phase);
        }
        simulation
    }

    fn new_gossiper(&self, index: usize, generation: u64, seeds: &[NodeId]) -> Gossiper {
        let id = self.ids[index].clone();
        let state = initial_state(
            NodeStatus::Normal,
            &format!("{id}:7000"),
            &format!("{id}:8000"),
            16,
        );
        Gossiper::new(
            id,
            generation,
            state,
            seeds.to_vec(),
            self.config.gossip.clone(),
            self.now,
        )
        .expect("the simulation's gossip config is valid")
    }

    pub fn now(&self) -> Millis {
        self.now
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn id(&self, index: usize) -> &NodeId {
        &self.ids[index]
    }

    pub fn gossiper(&self, index: usize) -> &Gossiper {
        &self.nodes[index].gossiper
    }

    pub fn is_alive(&self, index: usize) -> bool {
        self.nodes[index].alive
    }

    pub fn config(&self) -> &SimulationConfig {
        &self.config
    }

    pub fn rng(&mut self) -> &mut R {
        &mut self.rng
    }

    /// Replaces the RNG (a warmed-up cluster, cloned, then run on different seeds).
    pub fn reseed(&mut self, rng: R) {
        self.rng = rng;
    }

    pub fn set_loss(&mut self, loss: f64) {
        self.config.loss = loss;
    }

    /// Splits the network: `side(i)` names node i's side; messages between sides are
    /// lost (also those already in flight). `heal` joins it again.
    pub fn partition(&mut self, side: impl Fn(usize) -> u8) {
        self.sides = Some((0..self.nodes.len()).map(side).collect());
    }

    pub fn heal(&mut self) {
        self.sides = None;
    }

    fn separated(&self, a: usize, b: usize) -> bool {
        self.sides
            .as_ref()
            .is_some_and(|sides| sides[a] != sides[b])
    }

    pub fn messages_lost(&self) -> u64 {
        self.messages_lost
    }

    /// Bytes sent by all gossipers so far.
    pub fn bytes_out(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.gossiper.stats().bytes_out)
            .sum()
    }

    /// The node stops: it sends, receives and ticks no more.
    pub fn crash(&mut self, index: usize) {
        self.nodes[index].alive = false;
    }

    /// The node starts again with a new generation and an empty view.
    pub fn restart(&mut self, index: usize) {
        let generation = self.nodes[index].gossiper.generation() + 1;
        let seeds: Vec<NodeId> = self.ids.iter().take(self.config.seeds).cloned().collect();
        self.nodes[index].gossiper = self.new_gossiper(index, generation, &seeds);
        self.nodes[index].alive = true;
        self.nodes[index].tick_at = Millis::MAX;
        self.schedule_tick(index, self.now);
    }

    /// Publishes a change at node `index`.
    pub fn set_local(&mut self, index: usize, key: AppKey, value: AppValue) {
        let now = self.now;
        let node = &mut self.nodes[index];
        // Values the simulation publishes are small.
        let _ = node.gossiper.set_local(key, value, now);
        self.reschedule(index);
    }

    /// True when every live node knows every live node.
    pub fn membership_complete(&self) -> bool {
        let alive: Vec<&NodeId> = self
            .ids
            .iter()
            .zip(&self.nodes)
            .filter(|(_, node)| node.alive)
            .map(|(id, _)| id)
            .collect();
        self.nodes.iter().filter(|node| node.alive).all(|node| {
            alive.iter().all(|id| {
                node.gossiper
                    .member(id)
                    .is_some_and(|s| s.status().is_some())
            })
        })
    }

    /// Runs events up to and including `until`, handing each gossiper event to `observe`
    /// as `(time, observing node, event)`.
    pub fn run_until(
        &mut self,
        until: Millis,
        mut observe: impl FnMut(Millis, usize, &GossipEvent),
    ) {
        while self.queue.peek().is_some_and(|next| next.at <= until) {
            let Some(Scheduled { at, event, .. }) = self.queue.pop() else {
                break;
            };
            self.now = at;
            match event {
                SimEvent::Tick(index) => self.tick(index, &mut observe),
                SimEvent::Deliver { from, to, message } => {
                    self.deliver(from, to, message, &mut observe)
                }
            }
        }
        self.now = self.now.max(until);
    }

    /// Runs for `duration` of virtual time, ignoring events.
    pub fn run_for(&mut self, duration: Millis) {
        let until = self.now + duration;
        self.run_until(until, |_, _, _| {});
    }

    fn tick(&mut self, index: usize, observe: &mut impl FnMut(Millis, usize, &GossipEvent)) {
        let node = &mut self.nodes[index];
        if !node.alive || node.tick_at != self.now {
            return;
        }
        node.tick_at = Millis::MAX;
        let out = node.gossiper.handle_tick(self.now, &mut self.rng);
        self.after(index, out, observe);
    }

    fn deliver(
        &mut self,
        from: usize,
        to: usize,
        message: GossipMessage,
        observe: &mut impl FnMut(Millis, usize, &GossipEvent),
    ) {
        if !self.nodes[to].alive || self.separated(from, to) {
            return;
        }
        let from_id = self.ids[from].clone();
        let out = self.nodes[to]
            .gossiper
            .handle_message(self.now, &from_id, message);
        self.after(to, out, observe);
    }

    fn after(
        &mut self,
        index: usize,
        out: Vec<(NodeId, GossipMessage)>,
        observe: &mut impl FnMut(Millis, usize, &GossipEvent),
    ) {
        for (to, message) in out {
            self.send(index, &to, message);
        }
        for event in self.nodes[index].gossiper.take_events() {
            observe(self.now, index, &event);
        }
        self.reschedule(index);
    }

    fn send(&mut self, from: usize, to: &NodeId, message: GossipMessage) {
        let Some(&to) = self.index.get(to) else {
            return;
        };
        if self.config.loss > 0.0 && self.rng.gen_bool(self.config.loss) {
            self.messages_lost += 1;
            return;
        }
        let latency = self
            .rng
            .gen_range(self.config.min_latency_ms..=self.config.max_latency_ms);
        self.push(self.now + latency, SimEvent::Deliver { from, to, message });
    }

    fn reschedule(&mut self, index: usize) {
        let deadline = self.nodes[index].gossiper.next_deadline().max(self.now);
        if self.nodes[index].alive && deadline < self.nodes[index].tick_at {
            self.schedule_tick(index, deadline);
        }
    }

    fn schedule_tick(&mut self, index: usize, at: Millis) {
        self.nodes[index].tick_at = at;
        self.push(at, SimEvent::Tick(index));
    }

    fn push(&mut self, at: Millis, event: SimEvent) {
        self.next_sequence += 1;
        self.queue.push(Scheduled {
            at,
            sequence: self.next_sequence,
            event,
        });
    }

    /// Runs round by round until every live node knows every live node, for at most
    /// `max_rounds` rounds; true when it got there.
    pub fn run_until_membership_complete(&mut self, max_rounds: u64) -> bool {
        let interval = self.config.gossip.interval_ms;
        for _ in 0..max_rounds {
            if self.membership_complete() {
                return true;
            }
            self.run_for(interval);
        }
        self.membership_complete()
    }
}

// ----- measurements ---------------------------------------------------------------------

/// How fast one change reaches every node.
#[derive(Debug, Clone, Default)]
pub struct DisseminationReport {
    pub nodes: usize,
    /// Per trial: rounds (of `interval_ms`) from the change until the last node had it.
    pub rounds: Vec<f64>,
    /// Trials in which some node never got the change (within 100 rounds).
    pub incomplete: usize,
    /// Gossip bytes sent per node per round, the cluster at rest (heartbeats only).
    pub steady_bytes_per_node_per_round: f64,
    /// The same while the change spreads (faster rounds, the change itself).
    pub spreading_bytes_per_node_per_round: f64,
    /// Rounds the cluster took to form from its seeds.
    pub formation_rounds: u64,
    /// `NodeDown` events during the trials (all false: nobody crashes).
    pub false_convictions: u64,
}

impl DisseminationReport {
    pub fn median(&self) -> f64 {
        percentile(&self.rounds, 0.5)
    }

    pub fn p99(&self) -> f64 {
        percentile(&self.rounds, 0.99)
    }

    pub fn max(&self) -> f64 {
        self.rounds.iter().copied().fold(0.0, f64::max)
    }
}

/// The value at quantile `q` (nearest rank) of unsorted samples; 0 when there are none.
pub fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The key the dissemination trials change.
const PROBE_KEY: AppKey = AppKey::Extension(0x6d6b);

/// Forms a cluster of `nodes` from its seeds once, then runs `trials` trials, each on a
/// copy of the formed cluster with its own seed: a random node changes a value at a random
/// moment, and we time how long until every node has it.
pub fn measure_dissemination<R: Rng + SeedableRng + Clone>(
    nodes: usize,
    trials: u64,
    loss: f64,
    gossip: GossipConfig,
) -> DisseminationReport {
    let interval = gossip.interval_ms;
    let mut formed = Simulation::new(
        SimulationConfig::new(nodes, loss, gossip),
        R::seed_from_u64(0x5eed_0000 + nodes as u64),
    );
    let formation_start = formed.now();
    formed.run_until_membership_complete(500);
    let formation_rounds = (formed.now() - formation_start) / interval;
    // Let the start-up changes settle and the fast rounds end.
    formed.run_for(20 * interval);
    let steady_from = formed.bytes_out();
    formed.run_for(10 * interval);
    let steady = (formed.bytes_out() - steady_from) as f64 / nodes as f64 / 10.0;
    let mut report = DisseminationReport {
        nodes,
        steady_bytes_per_node_per_round: steady,
        formation_rounds,
        ..DisseminationReport::default()
    };
    let mut spreading_bytes = 0.0;
    for trial in 0..trials {
        let mut simulation = formed.clone();
        simulation.reseed(R::seed_from_u64(trial));
        match disseminate_once(&mut simulation, trial, &mut report.false_convictions) {
            Some((rounds, bytes)) => {
                report.rounds.push(rounds);
                spreading_bytes += bytes;
            }
            None => report.incomplete += 1,
        }
    }
    report.spreading_bytes_per_node_per_round = spreading_bytes / report.rounds.len().max(1) as f64;
    report
}

/// One trial: the rounds until every node has the change, and bytes per node per round.
fn disseminate_once<R: Rng>(
    simulation: &mut Simulation<R>,
    trial: u64,
    false_convictions: &mut u64,
) -> Option<(f64, f64)> {
    let interval = simulation.config().gossip.interval_ms;
    let nodes = simulation.len();
    let offset = simulation.rng().gen_range(0..interval);
    simulation.run_for(offset);
    let origin = simulation.rng().gen_range(0..nodes);
    let origin_id = simulation.id(origin).clone();
    simulation.set_local(origin, PROBE_KEY, AppValue::Count(trial + 1));
    let (start, bytes_before) = (simulation.now(), simulation.bytes_out());
    let mut reached = vec![false; nodes];
    reached[origin] = true;
    let (mut count, mut last) = (1, start);
    for _ in 0..100 {
        let until = simulation.now() + interval;
        simulation.run_until(until, |now, node, event| match event {
            GossipEvent::StateChanged { node: about, key }
                if *key == PROBE_KEY && *about == origin_id && !reached[node] =>
            {
                reached[node] = true;
                count += 1;
                last = now;
            }
            GossipEvent::NodeDown { .. } => *false_convictions += 1,
            _ => {}
        });
        if count == nodes {
            let elapsed = (last - start).max(1) as f64;
            let rounds = elapsed / interval as f64;
            let bytes = (simulation.bytes_out() - bytes_before) as f64;
            let bytes_per_node_per_round =
                bytes / nodes as f64 / (elapsed / interval as f64).max(1.0);
            return Some((rounds, bytes_per_node_per_round));
        }
    }
    None
}

/// How fast a crash is detected, and how often the living are convicted.
#[derive(Debug, Clone, Default)]
pub struct DetectionReport {
    /// Per trial: ms from the crash until every live node held the crashed node down.
    pub detection_ms: Vec<f64>,
    /// Trials in which some live node had not convicted within 60 s.
    pub undetected: usize,
    /// `NodeDown` events about nodes that were alive, over all trials.
    pub false_convictions: u64,
}

/// `trials` times: a cluster of `nodes` forms and runs for a minute, then a random node
/// crashes and we time until every live node has convicted it.
pub fn measure_detection<R: Rng + SeedableRng>(
    nodes: usize,
    trials: u64,
    loss: f64,
    gossip: GossipConfig,
) -> DetectionReport {
    let mut report = DetectionReport::default();
    for trial in 0..trials {
        let mut simulation = Simulation::new(
            SimulationConfig::new(nodes, loss, gossip.clone()),
            R::seed_from_u64(0xde7e_c700 + trial),
        );
        let mut false_convictions = 0;
        let mut convicted: BTreeSet<usize> = BTreeSet::new();
        simulation.run_until(60_000, |_, _, event| {
            if let GossipEvent::NodeDown { .. } = event {
                false_convictions += 1;
            }
        });
        let victim = simulation.rng().gen_range(0..nodes);
        let crash_at = 60_000 + simulation.rng().gen_range(0..gossip.interval_ms);
        simulation.run_until(crash_at, |_, _, event| {
            if let GossipEvent::NodeDown { .. } = event {
                false_convictions += 1;
            }
        });
        simulation.crash(victim);
        let crashed = simulation.id(victim).clone();
        let mut detected = None;
        while simulation.now() < crash_at + 60_000 {
            let until = simulation.now() + 10;
            simulation.run_until(until, |_, observer, event| match event {
                GossipEvent::NodeDown { node } if *node == crashed => {
                    convicted.insert(observer);
                }
                GossipEvent::NodeUp { node } if *node == crashed => {
                    convicted.remove(&observer);
                }
                GossipEvent::NodeDown { .. } => false_convictions += 1,
                _ => {}
            });
            if convicted.len() == nodes - 1 {
                detected = Some(simulation.now() - crash_at);
                break;
            }
        }
        match detected {
            Some(ms) => report.detection_ms.push(ms as f64),
            None => report.undetected += 1,
        }
        report.false_convictions += false_convictions;
    }
    report
}

/// A long run without crashes.
#[derive(Debug, Clone, Default)]
pub struct StabilityReport {
    /// `NodeDown` events (every one is false: nobody crashed).
    pub false_convictions: u64,
    /// `NodeSuspect` events.
    pub suspicions: u64,
    /// The highest phi any node had of any other, sampled every `sample_every_ms`.
    pub peak_phi: f64,
    /// Gossip bytes each node sent per second.
    pub bytes_per_node_per_s: f64,
}

/// Runs `nodes` for `duration_ms` with message loss and no crash, counting convictions.
pub fn measure_stability<R: Rng + SeedableRng>(
    nodes: usize,
    duration_ms: Millis,
    loss: f64,
    gossip: GossipConfig,
    seed: u64,
    sample_every_ms: Option<Millis>,
) -> StabilityReport {
    let mut simulation = Simulation::new(
        SimulationConfig::new(nodes, loss, gossip),
        R::seed_from_u64(seed),
    );
    let mut report = StabilityReport::default();
    let step = sample_every_ms.unwrap_or(10_000).max(1);
    while simulation.now() < duration_ms {
        let until = (simulation.now() + step).min(duration_ms);
        simulation.run_until(until, |_, _, event| match event {
            GossipEvent::NodeDown { .. } => report.false_convictions += 1,
            GossipEvent::NodeSuspect { .. } => report.suspicions += 1,
            _ => {}
        });
        if sample_every_ms.is_some() && simulation.now() > 30_000 {
            report.peak_phi = report.peak_phi.max(peak_phi(&simulation));
        }
    }
    let seconds = (duration_ms as f64 / 1000.0).max(1.0);
    report.bytes_per_node_per_s = simulation.bytes_out() as f64 / nodes as f64 / seconds;
    report
}

fn peak_phi<R>(simulation: &Simulation<R>) -> f64 {
    let now = simulation.now;
    let mut peak: f64 = 0.0;
    for node in &simulation.nodes {
        for id in &simulation.ids {
            if node.gossiper.liveness(id) != Liveness::Down {
                peak = peak.max(node.gossiper.phi(id, now));
            }
        }
    }
    peak
}
