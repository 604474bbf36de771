//! Gossip: who is in the cluster, what each node says about itself, and who is alive.
//!
//! Sans-IO like the rest of the core: the driver hands in `now` and a seeded RNG, and sends
//! the `(peer, message)` pairs the [`Gossiper`] hands back. One gossiper per node.
//!
//! # State
//! Each node owns an [`EndpointState`]: a generation (its epoch; it grows on every start), a
//! heartbeat, and a small map of application state ([`AppKey`] -> [`AppValue`]: status,
//! addresses, vnodes count, load figures, anti-entropy summaries). Every change the owner
//! makes takes the next number of its version counter, so "generation, highest version" of
//! each node (a [`Digest`]) summarises all that is known of it; the digests of all nodes are
//! the version vector gossip compares. Only the owner changes its state; others relay it.
//!
//! # Exchange (Scuttlebutt, as Cassandra runs it)
//! A round opens an exchange with a few peers: `Syn{digests}` -> `Ack{deltas, requests}` ->
//! `Ack2{deltas}` (see [`message`]). Only changes travel (delta propagation). Every message
//! has a byte budget, [`GossipConfig::max_message_bytes`]; a delta is a version-ordered
//! prefix of what the receiver lacks, so a message stops wherever the budget runs out and
//! the rest goes in a later exchange, the updates that waited longest first (flow control).
//! A `Syn` that lists every node the sender knows is `complete`: the receiver then also
//! sends the nodes the sender has never heard of. A delta names the version it starts
//! after; a receiver that holds less (it restarted since it asked) ignores it rather than
//! leave a hole below its new max version (the property test found that one).
//!
//! # Rounds
//! Every [`GossipConfig::interval_ms`] (jittered by +-10%) the node bumps its heartbeat and
//! gossips to [`GossipConfig::fanout`] peers: first a peer whose last exchange with us
//! was cut short by the budget (it is known to be stale: targeted gossip), then random live
//! peers; with probability `down / (live + 1)` also a peer convicted down (so partitions
//! heal), and now and then a seed (so seeds stay informed and a lonely node finds the
//! cluster). After any change of application state, rounds run every
//! [`GossipConfig::fast_interval_ms`] for [`GossipConfig::fast_period_ms`] (frequency tuning);
//! the heartbeat keeps its period, so the failure detector sees a steady rhythm.
//!
//! # Failure detection
//! A phi accrual detector per peer ([`failure_detector`]) over the inter-arrival times of the
//! peer's heartbeats, as gossip (from any peer) brings them. [`Liveness::Suspect`] at
//! `phi_suspect_threshold`, [`Liveness::Down`] at `phi_convict_threshold`. A newer heartbeat
//! brings a peer back up; a new generation is a restart, recognised at once (fresh detector
//! window, [`GossipEvent::NodeRestarted`]). A node whose status is `left` is reported down
//! without a `NodeDown` event and forgotten after `left_forget_after_ms` (then kept out as
//! long again, so stale gossip cannot bring it back; a new generation may rejoin). When
//! this node's own ticks stall (a gap over `acceptable_pause_ms + 2 * interval_ms`), the
//! verdicts wait two intervals so the peers can be heard again (`GossipStats::local_pauses`).
//!
//! # Bad input
//! An oversize or malformed message is dropped whole and counted ([`GossipStats`]). A delta
//! with an older generation than the one held is refused and counted, so a node announcing
//! another's id with an old generation overwrites nothing; nobody but this node may change
//! this node's state. At most [`GossipConfig::max_nodes`] nodes are tracked.
//!
//! # Driving it
//! ```text
//! let mut gossiper = Gossiper::new(me, epoch, initial_state(..), seeds, config, now)?;
//! on timer (at gossiper.next_deadline()):  send each of gossiper.handle_tick(now, &mut rng)
//! on a gossip message from a peer:          send each of gossiper.handle_message(now, &from, msg)
//! on a handshake with a seed:               gossiper.add_seed_contact(id)
//! after either:                             for event in gossiper.take_events() { .. }
//! ```
//! [`Gossiper::members`] is the member list for the ring and `/cluster/status`.
//!
//! # API (what the node and the server use)
//! - [`Gossiper::new`]`(me, generation, initial, seeds, config, now) -> Result<Gossiper, GossipError>`
//!   (refuses an invalid config or an initial value too large to gossip); [`initial_state`]
//!   builds `initial` from status, addresses and vnodes.
//! - [`Gossiper::set_local`]`(key, value, now) -> Result<bool, GossipError>`: publish a change.
//! - [`Gossiper::handle_tick`]`(now, &mut rng) -> Vec<(NodeId, GossipMessage)>`,
//!   [`Gossiper::next_deadline`]`() -> Millis`.
//! - [`Gossiper::handle_message`]`(now, &from, message) -> Vec<(NodeId, GossipMessage)>`, or
//!   [`Gossiper::handle_bytes`] for undecoded input; [`Gossiper::start_exchange`]`(&peer)`
//!   opens an exchange outside the rounds (e.g. right after a handshake).
//! - [`Gossiper::add_seed_contact`]`(id)`: a seed's id, learned in the transport handshake.
//! - [`Gossiper::liveness`]`(&node) -> Liveness`, [`Gossiper::phi`]`(&node, now) -> f64`.
//! - [`Gossiper::members`]`() -> impl Iterator<Item = (&NodeId, &EndpointState)>` (this node
//!   included, `left` nodes until forgotten), [`Gossiper::member`], [`Gossiper::member_info`].
//! - [`Gossiper::take_events`]`() -> Vec<GossipEvent>`, [`Gossiper::stats`]`() -> &GossipStats`.
//! - [`GossipMessage`] is serde (postcard); [`GossipMessage::encoded_len`] is exact.
//!
//! # Measurements and defaults
//! [`simulation`] runs many gossipers on virtual time with one seeded RNG (a run replays
//! from its seed); `cargo run --release -p mendkv-core --example gossip_tables` prints these
//! tables (latency 1-10 ms, ids like `n0042`; figures of 2026-11-25).
//!
//! Dissemination, defaults (interval 500 ms, fanout 3), 1% loss, 100 seeds per size; rounds
//! are `interval_ms` of virtual time from a change until the last node has it:
//!
//! | nodes | median | p99 | max | bytes/node/round at rest | while spreading |
//! |---:|---:|---:|---:|---:|---:|
//! | 10 | 0.80 | 1.33 | 1.38 | 459 | 697 |
//! | 100 | 1.65 | 2.15 | 2.17 | 4,342 | 7,307 |
//! | 1,000 | 2.34 | 2.69 | 2.80 | 42,292 | 75,779 |
//! | 100, no frequency tuning | 1.98 | 2.68 | 2.69 | 4,294 | 5,259 |
//!
//! Bytes grow linearly with the cluster: every round's digest lists every node, and every
//! heartbeat is a change (Cassandra's gossip costs the same). Frequency tuning buys a third
//! of a round for ~40% more bytes while a change spreads.
//!
//! Failure detection, 20 nodes, 10% loss: detection is from the crash until every live node
//! holds the node down (20 crashes); false convictions over one simulated hour without a
//! crash; the other knobs scale with the interval as in [`GossipConfig::with_interval`]:
//!
//! | interval ms | phi | detection median ms | max ms | false convictions | peak phi (hour) | bytes/node/s |
//! |---:|---:|---:|---:|---:|---:|---:|
//! | 200 | 5 | 1,230 | 1,440 | 0 | 1.27 | 5,226 |
//! | 200 | 8 | 1,360 | 1,530 | 0 | 1.50 | 5,228 |
//! | 200 | 12 | 1,420 | 1,650 | 0 | 1.63 | 5,225 |
//! | 500 | 5 | 2,840 | 3,330 | 0 | 1.33 | 2,051 |
//! | **500** | **8** | **3,270** | **3,690** | **0** | **1.46** | **2,053** |
//! | 500 | 12 | 3,690 | 4,030 | 0 | 1.46 | 2,053 |
//! | 1000 | 5 | 6,000 | 6,880 | 0 (+1 during the crash runs) | 1.47 | 1,022 |
//! | 1000 | 8 | 6,640 | 7,490 | 0 | 1.17 | 1,021 |
//! | 1000 | 12 | 7,200 | 8,660 | 0 | 1.73 | 1,021 |
//!
//! The acceptable pause carries the false-conviction margin (interval 500 ms, phi 8):
//! 500 ms gave 3 false convictions in the hour (peak phi 3.5) and 99 while 100-node
//! clusters formed; 750 ms gave 6 at 100 nodes; 1,000 ms gave none. With the defaults a
//! crash in a 100-node cluster is detected by everyone in 4.0-4.4 s.
//!
//! Defaults: `interval_ms` 500 (1,000 misses the 5 s budget; 200 costs 2.5x the bytes for
//! 2 s less), `phi_convict_threshold` 8 (the threshold moves detection by ~0.4 s per step:
//! the tail of the normal is steep, the pause dominates), `acceptable_pause_ms` 2 intervals,
//! `min_std_deviation_ms` a quarter interval, suspect at phi 4, window 1,000 samples,
//! `max_message_bytes` 64 KiB (a 1,000-node digest is ~14 KiB), fast rounds at half the
//! interval for 4 intervals after a change, `left_forget_after_ms` 60 s.

mod config;
mod exchange;
pub mod failure_detector;
pub mod message;
mod peer_selection;
pub mod simulation;
mod state;

pub use config::GossipConfig;
pub use message::{Delta, Digest, GossipMessage, MAX_APP_KEYS, MAX_NODE_ID_BYTES};
pub use state::{AppKey, AppValue, EndpointState, Generation, NodeStatus, Version, VersionedValue};

use crate::membership::MemberInfo;
use crate::{Millis, NodeId};
use failure_detector::{threshold_deviations, ArrivalWindow};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What the failure detector thinks of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Liveness {
    Up,
    Suspect,
    Down,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Up => "up",
            Liveness::Suspect => "suspect",
            Liveness::Down => "down",
        }
    }
}

/// What changed, for the node to act on (ring rebuilds, failover, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipEvent {
    /// A node was heard of for the first time.
    NodeJoined { node: NodeId },
    /// A suspected or convicted node sent a new heartbeat (or restarted).
    NodeUp { node: NodeId },
    /// phi crossed the suspect threshold.
    NodeSuspect { node: NodeId },
    /// phi crossed the convict threshold.
    NodeDown { node: NodeId },
    /// A node came back with a new generation; its old state is gone.
    NodeRestarted {
        node: NodeId,
        generation: Generation,
    },
    /// A node's application state changed (this node's own changes are not reported).
    StateChanged { node: NodeId, key: AppKey },
    /// A node that left was forgotten.
    NodeForgotten { node: NodeId },
}

/// Counters the drivers export as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GossipStats {
    pub rounds: u64,
    pub messages_out: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub bytes_in: u64,
    /// Messages that failed to decode or validate.
    pub dropped_malformed: u64,
    /// Messages over `max_message_bytes`.
    pub dropped_oversize: u64,
    /// Deltas with an older generation than the one held.
    pub stale_generation_rejected: u64,
    /// Deltas or digests claiming a newer state of this node than it has (an impostor).
    pub self_state_rejected: u64,
    /// Deltas ignored because they start after what this node holds (late answers to a
    /// request made before a restart).
    pub deltas_out_of_order: u64,
    /// Nodes refused because `max_nodes` were tracked.
    pub nodes_over_limit: u64,
    /// Messages the budget cut short (the rest waits for the next exchange).
    pub truncated_messages: u64,
    /// Ticks that came so late that this node must have stalled (liveness verdicts were
    /// deferred).
    pub local_pauses: u64,
    /// Events dropped because the driver did not take them.
    pub events_dropped: u64,
}

/// Why the gossiper refused something local (configuration, a value to publish).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    #[error("invalid gossip config: {0}")]
    InvalidConfig(&'static str),
    #[error("application value of {bytes} bytes is over the limit of {limit}: publish less")]
    ValueTooLarge { bytes: usize, limit: usize },
    #[error("application state already has the maximum of {MAX_APP_KEYS} keys")]
    TooManyKeys,
}

/// The application state a node starts with.
pub fn initial_state(
    status: NodeStatus,
    peer_address: &str,
    http_address: &str,
    vnodes: u16,
) -> Vec<(AppKey, AppValue)> {
    vec![
        (AppKey::Status, AppValue::Status(status)),
        (
            AppKey::PeerAddress,
            AppValue::Text(peer_address.to_string()),
        ),
        (
            AppKey::HttpAddress,
            AppValue::Text(http_address.to_string()),
        ),
        (AppKey::Vnodes, AppValue::Count(u64::from(vnodes))),
    ]
}

/// What this node holds about one node (itself included).
#[derive(Debug, Clone)]
struct Peer {
    state: EndpointState,
    detector: ArrivalWindow,
    liveness: Liveness,
    suspect_at: Millis,
    down_at: Millis,
    /// When this node learned the peer left.
    left_at: Option<Millis>,
}

/// The failure detector's settings, copied out of the config.
#[derive(Debug, Clone, Copy)]
struct DetectorParams {
    window: usize,
    interval_ms: Millis,
    acceptable_pause_ms: Millis,
    min_std_deviation_ms: Millis,
    suspect_deviations: f64,
    convict_deviations: f64,
}

impl DetectorParams {
    fn new(config: &GossipConfig) -> Self {
        DetectorParams {
            window: config.detector_window,
            interval_ms: config.interval_ms,
            acceptable_pause_ms: config.acceptable_pause_ms,
            min_std_deviation_ms: config.min_std_deviation_ms,
            suspect_deviations: threshold_deviations(config.phi_suspect_threshold),
            convict_deviations: threshold_deviations(config.phi_convict_threshold),
        }
    }
}

impl Peer {
    fn new(state: EndpointState, now: Millis, params: &DetectorParams) -> Self {
        Peer {
            state,
            detector: ArrivalWindow::new(now, params.window, params.interval_ms),
            liveness: Liveness::Up,
            suspect_at: Millis::MAX,
            down_at: Millis::MAX,
            left_at: None,
        }
    }

    fn has_left(&self) -> bool {
        self.left_at.is_some()
    }

    fn fit(&self, params: &DetectorParams) -> failure_detector::Fit {
        self.detector
            .fit(params.acceptable_pause_ms, params.min_std_deviation_ms)
    }

    /// A newer heartbeat arrived (`fresh`: the first of a new or restarted node): feeds
    /// the detector and moves the deadlines. The caller decides the liveness.
    fn heartbeat_arrived(&mut self, now: Millis, fresh: bool, params: &DetectorParams) {
        if fresh {
            self.detector = ArrivalWindow::new(now, params.window, params.interval_ms);
        } else if self.liveness == Liveness::Down {
            // The silence was an outage, not a sample of the peer's rhythm.
            self.detector.restart_at(now);
        } else {
            self.detector.record(now);
        }
        let fit = self.fit(params);
        self.suspect_at = self.detector.deadline(fit, params.suspect_deviations);
        self.down_at = self.detector.deadline(fit, params.convict_deviations);
    }
}

/// Events kept for the driver, per node tracked; beyond that they are dropped and counted.
const EVENTS_PER_NODE: usize = 8;

/// One node's gossip: its own state, its view of everyone else's, and the failure detector.
#[derive(Debug, Clone)]
pub struct Gossiper {
    me: NodeId,
    config: GossipConfig,
    detector: DetectorParams,
    nodes: BTreeMap<NodeId, Peer>,
    seeds: BTreeSet<NodeId>,
    /// Nodes that left and were forgotten: generation, and until when they are kept out.
    forgotten: BTreeMap<NodeId, (Generation, Millis)>,
    /// Peers whose last exchange with us was cut short, since when (targeted gossip).
    owed: BTreeMap<NodeId, Millis>,
    events: VecDeque<GossipEvent>,
    stats: GossipStats,
    next_round_at: Millis,
    last_heartbeat_at: Option<Millis>,
    /// The previous tick, to notice this node's own stalls.
    last_tick_at: Option<Millis>,
    fast_until: Millis,
    /// No liveness can change before this (the earliest suspect or convict deadline).
    next_check_at: Millis,
    /// Where the next budget-limited `Syn` starts listing digests.
    syn_cursor: usize,
    /// Whether this node's `Syn`s list its own digest (see `set_announce_self`).
    announce_self: bool,
}

impl Gossiper {
    /// A gossiper for node `me` in its `generation` (its epoch), publishing `initial` (see
    /// [`initial_state`]). `seeds` may be empty: [`Gossiper::add_seed_contact`] adds seeds
    /// as the transport learns their ids. The first round is due at `now`.
    pub fn new(
        me: NodeId,
        generation: Generation,
        initial: Vec<(AppKey, AppValue)>,
        seeds: Vec<NodeId>,
        config: GossipConfig,
        now: Millis,
    ) -> Result<Self, GossipError> {
        config.validate()?;
        let detector = DetectorParams::new(&config);
        let mut state = EndpointState::new(generation);
        state.apply_heartbeat(1, now);
        let me_peer = Peer::new(state, now, &detector);
        let mut gossiper = Gossiper {
            detector,
            nodes: BTreeMap::from([(me.clone(), me_peer)]),
            seeds: BTreeSet::new(),
            forgotten: BTreeMap::new(),
            owed: BTreeMap::new(),
            events: VecDeque::new(),
            stats: GossipStats::default(),
            next_round_at: now,
            last_heartbeat_at: None,
            last_tick_at: None,
            fast_until: 0,
            next_check_at: Millis::MAX,
            syn_cursor: 0,
            announce_self: true,
            me,
            config,
        };
        for (key, value) in initial {
            gossiper.set_local(key, value, now)?;
        }
        for seed in seeds {
            gossiper.add_seed_contact(seed);
        }
        Ok(gossiper)
    }

    pub fn id(&self) -> &NodeId {
        &self.me
    }

    /// Off: this node's `Syn`s leave out its own digest, so a peer answering a complete
    /// `Syn` sends whatever it holds of this node, in its generation. A node that lost its
    /// data directory asks this way what its previous life was (a digest of its own would
    /// be compared by version, and an equal generation and version would say nothing).
    pub fn set_announce_self(&mut self, on: bool) {
        self.announce_self = on;
    }

    /// This node learned that it ran before under a generation at least its own (its data
    /// directory was lost): it continues under `generation`, publishing the same state, and
    /// peers see it as a restart.
    pub fn adopt_generation(&mut self, generation: Generation, now: Millis) {
        let entries: Vec<(AppKey, AppValue)> = self
            .local_state()
            .entries()
            .map(|(key, entry)| (key, entry.value.clone()))
            .collect();
        let mut state = EndpointState::new(generation);
        state.apply_heartbeat(1, now);
        self.nodes
            .insert(self.me.clone(), Peer::new(state, now, &self.detector));
        for (key, value) in entries {
            // Each fitted before, so each fits again.
            let _ = self.set_local(key, value, now);
        }
    }

    pub fn generation(&self) -> Generation {
        self.local_state().generation()
    }

    pub fn config(&self) -> &GossipConfig {
        &self.config
    }

    pub fn stats(&self) -> &GossipStats {
        &self.stats
    }

    /// This node's own state.
    pub fn local_state(&self) -> &EndpointState {
        // The local node is inserted at construction and never removed.
        &self.nodes[&self.me].state
    }

    /// Publishes a change of this node's state (a new version); `Ok(false)` when the value
    /// was already current. Refused when the entry could not fit in a gossip message.
    pub fn set_local(
        &mut self,
        key: AppKey,
        value: AppValue,
        now: Millis,
    ) -> Result<bool, GossipError> {
        let changed = self.set_local_unhurried(key, value, now)?;
        if changed {
            self.speed_up(now);
        }
        Ok(changed)
    }

    /// [`Gossiper::set_local`] without the faster rounds that follow a change: for a value
    /// that changes often and can wait for the next round (the Merkle roots).
    pub fn set_local_unhurried(
        &mut self,
        key: AppKey,
        value: AppValue,
        now: Millis,
    ) -> Result<bool, GossipError> {
        let state = self.local_state();
        if state.get(key) == Some(&value) {
            return Ok(false);
        }
        if state.get(key).is_none() && state.application_len() >= MAX_APP_KEYS {
            return Err(GossipError::TooManyKeys);
        }
        let entry = VersionedValue {
            value,
            version: state.max_version() + 1,
        };
        let bytes = message::encoded_len(&(key, &entry));
        let limit = self.config.max_entry_bytes();
        if bytes > limit {
            return Err(GossipError::ValueTooLarge { bytes, limit });
        }
        self.local_mut().apply_entry(key, entry, now);
        Ok(true)
    }

    fn local_mut(&mut self) -> &mut EndpointState {
        // The local node is inserted at construction and never removed.
        &mut self
            .nodes
            .get_mut(&self.me)
            .expect("the local node is always tracked")
            .state
    }

    /// The transport learned the id of a seed (seeds are configured by address).
    pub fn add_seed_contact(&mut self, id: NodeId) {
        if id != self.me && self.seeds.len() < self.config.max_nodes {
            self.seeds.insert(id);
        }
    }

    pub fn seeds(&self) -> impl Iterator<Item = &NodeId> {
        self.seeds.iter()
    }

    /// Every node known (this one included), in id order, with the state it published.
    pub fn members(&self) -> impl Iterator<Item = (&NodeId, &EndpointState)> {
        self.nodes.iter().map(|(id, peer)| (id, &peer.state))
    }

    pub fn member(&self, node: &NodeId) -> Option<&EndpointState> {
        self.nodes.get(node).map(|peer| &peer.state)
    }

    pub fn member_count(&self) -> usize {
        self.nodes.len()
    }

    /// How to reach a member, once its addresses arrived.
    pub fn member_info(&self, node: &NodeId) -> Option<MemberInfo> {
        let state = self.member(node)?;
        Some(MemberInfo {
            id: node.clone(),
            peer_address: state.peer_address()?.to_string(),
            http_address: state.http_address()?.to_string(),
        })
    }

    /// The version vector: generation and highest version held of every node, in id order.
    pub fn digests(&self) -> Vec<Digest> {
        self.nodes
            .iter()
            .map(|(id, peer)| Digest {
                node: id.clone(),
                generation: peer.state.generation(),
                max_version: peer.state.max_version(),
            })
            .collect()
    }

    /// The failure detector's verdict, as of the last tick or message. This node is always
    /// up; a node never heard of, or that left, is down.
    pub fn liveness(&self, node: &NodeId) -> Liveness {
        match self.nodes.get(node) {
            Some(_) if *node == self.me => Liveness::Up,
            Some(peer) if !peer.has_left() => peer.liveness,
            _ => Liveness::Down,
        }
    }

    /// phi of a peer at `now` (0 for this node, a node never heard of, or one that left).
    pub fn phi(&self, node: &NodeId, now: Millis) -> f64 {
        match self.nodes.get(node) {
            Some(peer) if *node != self.me && !peer.has_left() => {
                peer.detector.phi(now, peer.fit(&self.detector))
            }
            _ => 0.0,
        }
    }

    /// Events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<GossipEvent> {
        self.events.drain(..).collect()
    }

    fn push_event(&mut self, event: GossipEvent) {
        if self.events.len() >= self.config.max_nodes.saturating_mul(EVENTS_PER_NODE) {
            self.stats.events_dropped += 1;
        } else {
            self.events.push_back(event);
        }
    }

    /// When `handle_tick` next has work: a round, or a peer's phi crossing a threshold.
    pub fn next_deadline(&self) -> Millis {
        self.next_round_at.min(self.next_check_at)
    }

    /// Time passes: liveness verdicts, forgetting nodes that left, and, when due, a round
    /// (heartbeat and `Syn`s). Returns the messages to send.
    pub fn handle_tick(&mut self, now: Millis, rng: &mut impl Rng) -> Vec<(NodeId, GossipMessage)> {
        let limit = self.config.acceptable_pause_ms + 2 * self.config.interval_ms;
        let paused = self
            .last_tick_at
            .is_some_and(|last| now.saturating_sub(last) > limit);
        self.last_tick_at = Some(now);
        if paused {
            // This node itself stalled (a long pause, a suspended VM, an overloaded driver):
            // the silence it sees is its own. Give peers two intervals to be heard again
            // before judging them (Cassandra does the same after a local pause).
            self.stats.local_pauses += 1;
            self.next_check_at = now + 2 * self.config.interval_ms;
        } else {
            self.check_liveness(now);
        }
        if now < self.next_round_at {
            return Vec::new();
        }
        self.forget_left(now);
        self.round(now, rng)
    }

    fn round(&mut self, now: Millis, rng: &mut impl Rng) -> Vec<(NodeId, GossipMessage)> {
        self.stats.rounds += 1;
        let beat_due = self
            .last_heartbeat_at
            .is_none_or(|last| now.saturating_sub(last) >= self.config.interval_ms * 3 / 4);
        if beat_due {
            self.last_heartbeat_at = Some(now);
            let version = self.local_state().max_version() + 1;
            self.local_mut().apply_heartbeat(version, now);
        }
        let targets = self.choose_targets(rng);
        let interval = if now < self.fast_until {
            self.config.fast_interval_ms
        } else {
            self.config.interval_ms
        };
        let jitter = interval / 10;
        self.next_round_at = now + rng.gen_range(interval - jitter..=interval + jitter).max(1);
        if targets.is_empty() {
            return Vec::new();
        }
        let syn = self.build_syn();
        let syn_len = syn.encoded_len();
        let mut out = Vec::with_capacity(targets.len());
        for target in targets {
            self.count_out(syn_len);
            out.push((target, syn.clone()));
        }
        out
    }

    /// Opens an exchange with `peer` now, outside the rounds (e.g. with a peer that just
    /// connected). Send the message to `peer`.
    pub fn start_exchange(&mut self, peer: &NodeId) -> GossipMessage {
        let syn = self.build_syn();
        self.owed.remove(peer);
        self.count_out(syn.encoded_len());
        syn
    }

    fn count_out(&mut self, bytes: usize) {
        self.stats.messages_out += 1;
        self.stats.bytes_out += bytes as u64;
    }

    /// A change of application state: gossip faster for a while.
    fn speed_up(&mut self, now: Millis) {
        self.fast_until = now + self.config.fast_period_ms;
        self.next_round_at = self.next_round_at.min(now + self.config.fast_interval_ms);
    }

    /// Moves peers whose suspect or convict deadline passed to `Suspect` / `Down`.
    fn check_liveness(&mut self, now: Millis) {
        if now < self.next_check_at {
            return;
        }
        let mut next_check_at = Millis::MAX;
        let mut changes = Vec::new();
        for (id, peer) in self.nodes.iter_mut() {
            if *id == self.me || peer.has_left() {
                continue;
            }
            let verdict = if now >= peer.down_at {
                Liveness::Down
            } else if now >= peer.suspect_at {
                Liveness::Suspect
            } else {
                Liveness::Up
            };
            // Only time moved: phi can only have grown.
            if verdict > peer.liveness {
                peer.liveness = verdict;
                changes.push((id.clone(), verdict));
            }
            next_check_at = next_check_at.min(match peer.liveness {
                Liveness::Up => peer.suspect_at,
                Liveness::Suspect => peer.down_at,
                Liveness::Down => Millis::MAX,
            });
        }
        self.next_check_at = next_check_at;
        for (node, verdict) in changes {
            self.push_event(match verdict {
                Liveness::Down => GossipEvent::NodeDown { node },
                _ => GossipEvent::NodeSuspect { node },
            });
        }
    }

    /// Forgets nodes that left long enough ago, and lets old quarantines lapse.
    fn forget_left(&mut self, now: Millis) {
        let after = self.config.left_forget_after_ms;
        let due: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, peer)| {
                peer.left_at
                    .is_some_and(|at| now >= at.saturating_add(after))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for node in due {
            if let Some(peer) = self.nodes.remove(&node) {
                self.owed.remove(&node);
                let until = now.saturating_add(after);
                self.forgotten
                    .insert(node.clone(), (peer.state.generation(), until));
                self.push_event(GossipEvent::NodeForgotten { node });
            }
        }
        self.forgotten.retain(|_, (_, until)| *until > now);
        while self.forgotten.len() > self.config.max_nodes {
            let oldest = self
                .forgotten
                .iter()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.forgotten.remove(&oldest);
            }
        }
    }

    /// True when gossip about `node` in `generation` concerns a node that left and was
    /// forgotten (stale gossip must not bring it back).
    fn is_forgotten(&self, node: &NodeId, generation: Generation) -> bool {
        self.forgotten
            .get(node)
            .is_some_and(|(forgotten, _)| generation <= *forgotten)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod simulation_tests;
