//! The node's cluster changes (SPEC section 7): its own ring state (`joining`, `normal`,
//! `leaving`, `left`), the removals it runs for dead nodes, the acknowledgements that make a
//! change safe, streaming the ranges it gains, cleanup of the ranges it lost, and hints.
//!
//! # Protocol (Garage's layout versions, Cassandra's pending ranges)
//! Every node derives a [`Layout`] from gossip: each member's status and the phase of its
//! change (`Waiting`, `Streaming`, `Synced`), and removals announced by whoever ran
//! `remove-node`. A node publishes the fingerprint of the layout it applied (its *ack*) once
//! the layout has been unchanged for a request timeout, so every operation it coordinated
//! under an older layout has ended. The owner of a change moves it one phase at a time, and
//! only once every member (up or down, not left or removed) acks the current layout:
//! - `Waiting` -> `Streaming`: no other change is active. From the acks on, every
//!   coordinator writes to the old and the new owners (level met in both lists).
//! - The new owners pull each gained range from a quorum of its old replicas (forced
//!   anti-entropy exchanges: key-exact, repair byte budget), so every write acknowledged
//!   at quorum before the acks is in the union; each publishes `STREAMED = fingerprint`.
//! - `Streaming` -> `Synced` once every gainer streamed: reads use the new owners, writes
//!   still reach both.
//! - `Synced` -> done (`normal`, `left`, removed) once acked again: writes use the new
//!   owners only; nodes delete the data of ranges they lost (cleanup) once that is acked.
//!
//! Two nodes never act on layouts more than one step apart (each step waits for everyone's
//! ack of the previous one), and every pair of adjacent layouts intersects: a write made
//! under one reaches a quorum of the replicas a read under the other asks.

use super::{Counter, Node};
use crate::gossip::{AppKey, AppValue, NodeStatus};
use crate::hinted_handoff::{hint_key, DropReason, HintRecord};
use crate::membership::{ChangeKind, Layout, MemberState, PeerStatus, Phase};
use crate::message::{Message, RequestId};
use crate::ring::{key_token, TokenRange};
use crate::storage::Storage;
use crate::{Millis, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The meta record of this node's membership state (status, phase, removals, streaming).
pub(super) const MEMBERSHIP_META: &str = "membership";
/// Gossip: the phase of this node's change ([`Phase::code`]).
pub const PHASE_KEY: AppKey = AppKey::Extension(2);
/// Gossip: the fingerprint of the layout this node applied (its ack).
pub const ACK_KEY: AppKey = AppKey::Extension(3);
/// Gossip: the fingerprint of the layout whose gained ranges this node finished pulling.
pub const STREAMED_KEY: AppKey = AppKey::Extension(4);
/// Gossip: removals this node runs, `(node, generation, phase)` (postcard).
pub const REMOVALS_KEY: AppKey = AppKey::Extension(5);
/// Gossip: 1 once this node stores data (a new node joining a cluster with data streams).
pub const HAS_DATA_KEY: AppKey = AppKey::Extension(6);
/// Gossip: the generation under which this node last joined from an empty data directory
/// (a removed node that rejoined wiped is a new member; with its old data it is not).
pub const JOINED_KEY: AppKey = AppKey::Extension(7);
/// Gossip: the still-deciding members this node holds live in its layout, `(node,
/// generation)` (postcard): every write it coordinates reaches them. A deciding node
/// bootstraps without streaming only once every live member lists it.
pub const SEES_DECIDING_KEY: AppKey = AppKey::Extension(8);

/// Removals one node may announce (bounds a peer's input).
const MAX_REMOVALS: usize = 64;
/// Deciding members one node lists in [`SEES_DECIDING_KEY`] (bounds a peer's input).
const MAX_SEEN_DECIDING: usize = 64;
/// Attempts of a (range, source) pull that diverged before it counts as done anyway.
const MAX_DIVERGED_ATTEMPTS: u32 = 3;
/// Wait before retrying a failed pull.
const PULL_RETRY_MS: Millis = 500;
/// How long a leaving node waits for its hints to be delivered before handing them over.
pub(super) const HINT_DELIVERY_WAIT_MS: Millis = 30_000;
/// Keys examined per cleanup step (bounded work per tick).
const CLEANUP_RANGES_PER_TICK: usize = 4;
/// Ranges remembered for cleanup.
const MAX_CLEANUP_RANGES: usize = 1 << 16;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    status: NodeStatus,
    phase: u64,
    removals: Vec<(NodeId, u64, u64)>,
    stream_fingerprint: u64,
    stream_done: Vec<TokenRange>,
    joined_generation: u64,
    /// Still deciding between bootstrap and join (a crash before the decision).
    deciding: bool,
    /// Ranges whose data this node may hold without owning it any more: cleanup resumes
    /// them after a restart (a record written before it existed still decodes as
    /// [`PersistedBeforeCleanup`]).
    cleanup_ranges: Vec<TokenRange>,
    /// The gossip generation under which this node, starting empty, was first deciding
    /// (0: unknown). A removal announced under that generation or later was of this
    /// deciding node, which then stays removed (last, so a record written before it
    /// existed still decodes as [`PersistedBeforeDecidingGeneration`]).
    deciding_generation: u64,
}

/// The membership record as written before the deciding generation was persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PersistedBeforeDecidingGeneration {
    status: NodeStatus,
    phase: u64,
    removals: Vec<(NodeId, u64, u64)>,
    stream_fingerprint: u64,
    stream_done: Vec<TokenRange>,
    joined_generation: u64,
    deciding: bool,
    cleanup_ranges: Vec<TokenRange>,
}

impl From<PersistedBeforeDecidingGeneration> for Persisted {
    fn from(old: PersistedBeforeDecidingGeneration) -> Self {
        Persisted {
            status: old.status,
            phase: old.phase,
            removals: old.removals,
            stream_fingerprint: old.stream_fingerprint,
            stream_done: old.stream_done,
            joined_generation: old.joined_generation,
            deciding: old.deciding,
            cleanup_ranges: old.cleanup_ranges,
            deciding_generation: 0,
        }
    }
}

/// The membership record as written before cleanup ranges were persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PersistedBeforeCleanup {
    status: NodeStatus,
    phase: u64,
    removals: Vec<(NodeId, u64, u64)>,
    stream_fingerprint: u64,
    stream_done: Vec<TokenRange>,
    joined_generation: u64,
    deciding: bool,
}

impl From<PersistedBeforeCleanup> for Persisted {
    fn from(old: PersistedBeforeCleanup) -> Self {
        Persisted {
            status: old.status,
            phase: old.phase,
            removals: old.removals,
            stream_fingerprint: old.stream_fingerprint,
            stream_done: old.stream_done,
            joined_generation: old.joined_generation,
            deciding: old.deciding,
            cleanup_ranges: Vec::new(),
            deciding_generation: 0,
        }
    }
}

impl Persisted {
    fn decode(bytes: &[u8]) -> Option<Persisted> {
        postcard::from_bytes::<Persisted>(bytes)
            .ok()
            .or_else(|| {
                postcard::from_bytes::<PersistedBeforeDecidingGeneration>(bytes)
                    .ok()
                    .map(Persisted::from)
            })
            .or_else(|| {
                postcard::from_bytes::<PersistedBeforeCleanup>(bytes)
                    .ok()
                    .map(Persisted::from)
            })
    }
}

/// One gained range being pulled.
#[derive(Debug, Clone)]
struct RangePull {
    sources: Vec<NodeId>,
    needed: usize,
    done: BTreeSet<NodeId>,
    in_flight: Option<NodeId>,
    attempts: BTreeMap<NodeId, u32>,
    retry_at: Millis,
}

/// Streaming of the ranges this node gains in the active change.
#[derive(Debug, Clone)]
struct Stream {
    fingerprint: u64,
    /// Every range this node gains in the change (pulled or not yet).
    gained: BTreeSet<TokenRange>,
    pulls: BTreeMap<TokenRange, RangePull>,
    ranges_total: u64,
    ranges_done: u64,
    keys: u64,
    bytes: u64,
    started_at: Millis,
}

/// Where this node's change, or a removal it runs, stands (`/admin/membership/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeProgress {
    pub node: String,
    /// `joining`, `normal`, `leaving`, `left`.
    pub state: String,
    /// `join`, `decommission`, `remove`, or none.
    pub change: Option<String>,
    /// `waiting`, `streaming`, `synced`, `done`.
    pub phase: String,
    /// Why the change does not move (waiting for another change, for acks, for hints).
    pub reason: Option<String>,
    pub ranges_total: u64,
    pub ranges_done: u64,
    pub keys_streamed: u64,
    pub bytes_streamed: u64,
    pub elapsed_ms: u64,
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeRefusal {
    /// No such member (404).
    UnknownNode(String),
    /// Another change is in progress, or the node is up (409).
    Conflict(String),
}

impl From<ChangeRefusal> for crate::message::ClientResponse {
    fn from(refusal: ChangeRefusal) -> Self {
        match refusal {
            ChangeRefusal::UnknownNode(reason) => crate::message::ClientResponse::NotFound(reason),
            ChangeRefusal::Conflict(reason) => crate::message::ClientResponse::Conflict(reason),
        }
    }
}

/// The membership room.
#[derive(Debug)]
pub(super) struct MembershipState {
    pub status: NodeStatus,
    pub phase: Phase,
    /// Removals this node runs: node -> (its generation when removed, phase).
    pub removals: BTreeMap<NodeId, (u64, Phase)>,
    /// A new node (empty data directory, with seeds) that has not yet decided whether it
    /// bootstraps a new cluster (`normal`) or joins one that holds data (`joining`).
    pub deciding: bool,
    /// When the deciding node first heard a peer described.
    deciding_since: Option<Millis>,
    /// The generation under which this node was first deciding (persisted; 0: unknown).
    deciding_generation: u64,
    /// What this node last published in [`SEES_DECIDING_KEY`].
    seen_deciding: Vec<(NodeId, u64)>,
    /// The ring of writes while members are deciding: the read ring plus the live
    /// deciding members, for (layout fingerprint, those members).
    deciding_ring: Option<(u64, BTreeSet<NodeId>, crate::ring::Ring)>,
    pub has_data: bool,
    /// The generation under which this node joined from an empty data directory.
    pub joined_generation: u64,
    pub layout: Layout,
    members: BTreeMap<NodeId, MemberState>,
    /// When the layout last changed (the ack waits a request timeout after it).
    view_since: Millis,
    stream: Option<Stream>,
    /// Ranges already pulled for a fingerprint (persisted: a restart resumes).
    stream_done: (u64, BTreeSet<TokenRange>),
    /// Last streaming figures, kept after the change for `status`.
    last_stream: Option<Stream>,
    cleanup_ranges: BTreeSet<TokenRange>,
    /// This node was removed and came back with its old data: it serves nothing.
    pub refused: bool,
    /// Removed peers whose messages were refused (each logged once; bounded).
    refused_peers: BTreeSet<NodeId>,
    newly_refused_peers: Vec<NodeId>,
    pub reason: Option<String>,
    change_started_at: Millis,
    hints_wait_since: Option<Millis>,
    /// A leaving node's hints on their way to an heir, by request: each is forgotten here
    /// only when the heir has stored it (a lost hand-over is sent again after its deadline).
    pub(super) hand_overs: BTreeMap<RequestId, HandOver>,
}

/// One hint handed to another node by a leaving node.
#[derive(Debug)]
pub(super) struct HandOver {
    target: NodeId,
    hint: crate::hinted_handoff::QueuedHint,
    deadline: Millis,
}

impl MembershipState {
    pub fn load<S: Storage>(storage: &S, fresh: bool, has_seeds: bool) -> Self {
        let persisted: Option<Persisted> = storage
            .get_meta(MEMBERSHIP_META)
            .ok()
            .flatten()
            .and_then(|bytes| Persisted::decode(&bytes));
        let cleanup_ranges: BTreeSet<TokenRange> = persisted
            .as_ref()
            .map(|p| p.cleanup_ranges.iter().copied().collect())
            .unwrap_or_default();
        let joined_generation = persisted.as_ref().map_or(0, |p| p.joined_generation);
        let deciding_generation = persisted.as_ref().map_or(0, |p| p.deciding_generation);
        let was_deciding = persisted.as_ref().is_some_and(|p| p.deciding);
        let first_start = persisted.is_none() && fresh && has_seeds;
        let (status, phase, removals, stream_done) = match persisted {
            Some(p) => (
                p.status,
                Phase::from_code(p.phase),
                p.removals
                    .into_iter()
                    .map(|(n, g, ph)| (n, (g, Phase::from_code(ph))))
                    .collect(),
                (p.stream_fingerprint, p.stream_done.into_iter().collect()),
            ),
            // A node started before cluster changes existed, or one without seeds: normal.
            None if !(fresh && has_seeds) => (
                NodeStatus::Normal,
                Phase::Done,
                BTreeMap::new(),
                (0, BTreeSet::new()),
            ),
            None => (
                NodeStatus::Joining,
                Phase::Waiting,
                BTreeMap::new(),
                (0, BTreeSet::new()),
            ),
        };
        if first_start {
            // Durable before anything else happens: a crash now must not bring the node
            // back as a `normal` member (no record would read as a node from before
            // cluster changes).
            let record = Persisted {
                status,
                phase: phase.code(),
                removals: Vec::new(),
                stream_fingerprint: 0,
                stream_done: Vec::new(),
                joined_generation: 0,
                deciding: true,
                cleanup_ranges: Vec::new(),
                deciding_generation: 0,
            };
            if let Ok(bytes) = postcard::to_allocvec(&record) {
                let _ = storage
                    .put_meta(MEMBERSHIP_META, &bytes)
                    .and_then(|()| storage.sync());
            }
        }
        MembershipState {
            deciding: first_start || was_deciding,
            deciding_since: None,
            deciding_generation,
            seen_deciding: Vec::new(),
            deciding_ring: None,
            status,
            phase,
            removals,
            has_data: false,
            joined_generation,
            layout: Layout::default(),
            members: BTreeMap::new(),
            view_since: 0,
            stream: None,
            stream_done,
            last_stream: None,
            cleanup_ranges,
            refused: false,
            refused_peers: BTreeSet::new(),
            newly_refused_peers: Vec::new(),
            reason: None,
            change_started_at: 0,
            hints_wait_since: None,
            hand_overs: BTreeMap::new(),
        }
    }
}

fn encode_removals(removals: &BTreeMap<NodeId, (u64, Phase)>) -> Vec<u8> {
    let list: Vec<(NodeId, u64, u64)> = removals
        .iter()
        .map(|(n, (g, p))| (n.clone(), *g, p.code()))
        .collect();
    postcard::to_allocvec(&list).unwrap_or_default()
}

impl<S: Storage> Node<S> {
    /// The gossip entries of this node's membership state, published at start.
    pub(super) fn publish_membership(&mut self, now: Millis) {
        let status = self.membership.status;
        let phase = self.membership.phase;
        let removals = encode_removals(&self.membership.removals);
        let gossiper = &mut self.cluster.gossiper;
        let _ = gossiper.set_local(AppKey::Status, AppValue::Status(status), now);
        let _ = gossiper.set_local(PHASE_KEY, AppValue::Count(phase.code()), now);
        if !self.membership.removals.is_empty() {
            let _ = gossiper.set_local(REMOVALS_KEY, AppValue::Bytes(removals), now);
        }
        if self.membership.has_data {
            let _ = gossiper.set_local(HAS_DATA_KEY, AppValue::Count(1), now);
        }
        if self.membership.joined_generation > 0 {
            let joined = AppValue::Count(self.membership.joined_generation);
            let _ = gossiper.set_local(JOINED_KEY, joined, now);
        }
    }

    fn persist_membership(&mut self) {
        let persisted = Persisted {
            status: self.membership.status,
            phase: self.membership.phase.code(),
            removals: self
                .membership
                .removals
                .iter()
                .map(|(n, (g, p))| (n.clone(), *g, p.code()))
                .collect(),
            stream_fingerprint: self.membership.stream_done.0,
            stream_done: self.membership.stream_done.1.iter().copied().collect(),
            joined_generation: self.membership.joined_generation,
            deciding: self.membership.deciding,
            cleanup_ranges: self.membership.cleanup_ranges.iter().copied().collect(),
            deciding_generation: self.membership.deciding_generation,
        };
        let Ok(bytes) = postcard::to_allocvec(&persisted) else {
            return;
        };
        if self.storage.put_meta(MEMBERSHIP_META, &bytes).is_err() {
            self.stats.increment(Counter::StorageErrors);
        }
        self.wrote();
    }

    /// Sets this node's own state and phase, durably and in gossip.
    fn set_own_state(&mut self, now: Millis, status: NodeStatus, phase: Phase) {
        if self.membership.status == status && self.membership.phase == phase {
            return;
        }
        self.membership.status = status;
        self.membership.phase = phase;
        self.persist_membership();
        let _ = self
            .cluster
            .gossiper
            .set_local(AppKey::Status, AppValue::Status(status), now);
        let _ = self
            .cluster
            .gossiper
            .set_local(PHASE_KEY, AppValue::Count(phase.code()), now);
        self.refresh_layout(now);
    }

    fn publish_removals(&mut self, now: Millis) {
        self.persist_membership();
        let bytes = encode_removals(&self.membership.removals);
        let _ = self
            .cluster
            .gossiper
            .set_local(REMOVALS_KEY, AppValue::Bytes(bytes), now);
        self.refresh_layout(now);
    }

    /// The first object stored here: peers joining later will stream.
    pub(super) fn note_has_data(&mut self) {
        if !self.membership.has_data {
            self.membership.has_data = true;
            let now = self.clock;
            let _ = self
                .cluster
                .gossiper
                .set_local(HAS_DATA_KEY, AppValue::Count(1), now);
        }
    }

    /// The generation `node` was removed under, as gossip's removal lists tell (the
    /// highest), if any.
    fn removal_generation(&self, node: &NodeId) -> Option<u64> {
        self.gossip_removals()
            .get(node)
            .map(|(generation, _)| *generation)
    }

    /// Every removal some member announces: node -> (generation, phase), the highest.
    fn gossip_removals(&self) -> BTreeMap<NodeId, (u64, Phase)> {
        let mut removals: BTreeMap<NodeId, (u64, Phase)> = BTreeMap::new();
        for (_, state) in self.cluster.gossiper.members() {
            let Some(AppValue::Bytes(bytes)) = state.get(REMOVALS_KEY) else {
                continue;
            };
            let Ok(list) = postcard::from_bytes::<Vec<(NodeId, u64, u64)>>(bytes) else {
                continue;
            };
            for (node, generation, phase) in list.into_iter().take(MAX_REMOVALS) {
                let phase = Phase::from_code(phase);
                let entry = removals.entry(node).or_insert((generation, phase));
                *entry = (*entry).max((generation, phase));
            }
        }
        removals
    }

    /// Every member's state as gossip describes it, removals applied.
    fn member_states(&self) -> BTreeMap<NodeId, MemberState> {
        let removals = self.gossip_removals();
        let mut members = BTreeMap::new();
        for (id, state) in self.cluster.gossiper.members() {
            let (status, phase) = if id == self.id() {
                (self.membership.status, self.membership.phase)
            } else {
                // A member whose status has not arrived yet is not placed anywhere: it may
                // be a node that is joining.
                let Some(status) = state.status() else {
                    continue;
                };
                let phase = match state.get(PHASE_KEY) {
                    Some(AppValue::Count(code)) => Phase::from_code(*code),
                    _ if status == NodeStatus::Normal => Phase::Done,
                    _ => Phase::Waiting,
                };
                (status, phase)
            };
            // A removed node that joins again from an empty data directory (a new
            // generation, announcing `joining`) is a new member; with its old data it stays
            // removed.
            let joined = match state.get(JOINED_KEY) {
                Some(AppValue::Count(generation)) => *generation,
                _ => 0,
            };
            let removal = removals.get(id).and_then(|(generation, phase)| {
                let rejoined = joined > *generation;
                (!rejoined).then_some(*phase)
            });
            // A new node announces `joining`, `waiting` while it decides, and its join
            // generation once it decided to join; one that bootstraps turns `normal`.
            let deciding = if id == self.id() {
                self.membership.deciding
            } else {
                status == NodeStatus::Joining && phase == Phase::Waiting && joined == 0
            };
            members.insert(
                id.clone(),
                MemberState {
                    status,
                    phase,
                    removal,
                    deciding,
                },
            );
        }
        // Members the transport (or a static member list) named and gossip has not
        // described yet are taken as normal, as before cluster changes existed, except a
        // stranger (a peer first heard of by handshake once gossip was running): it may be
        // a joiner whose state has not arrived, and taken as normal it would be read from
        // before it streamed anything (the chaos harness's seed 3007: quorum reads missed
        // writes acknowledged a second before). It is placed when gossip describes it.
        for id in self
            .cluster
            .membership
            .ids()
            .filter(|id| !self.cluster.strangers.contains(*id))
        {
            if self.cluster.gossiper.member(id).is_none() {
                let removal = removals.get(id).map(|(_, phase)| *phase);
                members.entry(id.clone()).or_insert(MemberState {
                    removal,
                    ..MemberState::normal()
                });
            }
        }
        members
    }

    /// Derives the layout from gossip again; when it changed, the rings, trees and hints
    /// follow.
    pub(super) fn refresh_layout(&mut self, now: Millis) {
        let members = self.member_states();
        if members == self.membership.members && self.membership.view_since != 0 {
            return;
        }
        let layout = Layout::new(&members, self.config.vnodes, self.config.replication_factor);
        let departed: Vec<NodeId> = members
            .iter()
            .filter(|(_, m)| m.removal == Some(Phase::Done))
            .map(|(id, _)| id.clone())
            .collect();
        // Refused from the removal's start, not only once it is done: a removal is what lets
        // the others stop waiting for this node's acknowledgements, so from then on it must
        // coordinate nothing.
        self.membership.refused = members.get(self.id()).is_some_and(|m| m.removal.is_some());
        // A peer whose removal was lifted (it rejoined wiped) is logged again if removed again.
        self.membership
            .refused_peers
            .retain(|peer| members.get(peer).is_some_and(|m| m.removal.is_some()));
        self.membership.members = members;
        self.membership.view_since = now.max(1);
        self.membership.layout = layout;
        let before: BTreeSet<TokenRange> = self.anti_entropy.trees.ranges().collect();
        self.align_trees();
        self.take_awaited_repair_targets(now);
        let after: BTreeSet<TokenRange> = self.anti_entropy.trees.ranges().collect();
        let mut to_clean = false;
        for range in before.difference(&after) {
            if self.membership.cleanup_ranges.len() < MAX_CLEANUP_RANGES {
                to_clean |= self.membership.cleanup_ranges.insert(*range);
            }
        }
        if to_clean {
            // Durable, so a crash before the scan does not leave that data on disk forever.
            self.persist_membership();
        }
        for node in departed {
            self.drop_hints_for(now, &node);
        }
    }

    /// Hints for a node removed from the cluster are dropped (it will never take them), except
    /// those that stand in for a replica: they may hold an acknowledged write's only copy, so
    /// they are kept for the key's new replicas instead.
    fn drop_hints_for(&mut self, now: Millis, node: &NodeId) {
        loop {
            let batch = self.hints.hint_queue.next_batch(node, 256);
            if batch.is_empty() {
                return;
            }
            for hint in batch {
                let storage_key = hint_key(node, &hint.bucket, &hint.key);
                let stand_in = match self.storage.get_hint(&storage_key) {
                    Ok(Some(bytes)) => HintRecord::decode(&bytes).filter(|r| r.stands_in),
                    _ => None,
                };
                if let Some(record) = stand_in {
                    if self.retarget_hint(now, node, &hint, &record) {
                        self.stats.increment(Counter::HintsHandedOver);
                        continue;
                    }
                }
                self.forget_hint(node, &hint, None);
                self.stats
                    .increment(Counter::hints_dropped(DropReason::Removed));
            }
        }
    }

    /// The members whose acks count: every member but the left and the removed.
    fn acknowledgers(&self) -> impl Iterator<Item = &NodeId> {
        self.membership
            .members
            .iter()
            .filter(|(_, m)| m.acknowledges())
            .map(|(id, _)| id)
    }

    fn gossip_count(&self, node: &NodeId, key: AppKey) -> Option<u64> {
        match self.cluster.gossiper.member(node)?.get(key) {
            Some(AppValue::Count(value)) => Some(*value),
            _ => None,
        }
    }

    /// The first member that has not acked this node's layout, if any.
    fn unacked_member(&self) -> Option<NodeId> {
        let fingerprint = self.membership.layout.fingerprint();
        self.acknowledgers()
            .find(|id| self.gossip_count(id, ACK_KEY) != Some(fingerprint))
            .cloned()
    }

    /// What an operator can do about a member a change waits for, when it is down: a down
    /// member blocks every change until it is back or removed (its acknowledgement is what
    /// proves it coordinates nothing under an older layout).
    fn down_advice(&self, member: &NodeId) -> String {
        if self.peer_liveness(member) == crate::gossip::Liveness::Down {
            format!(
                ": {member} is down; restart it, or remove it if it is gone for good \
                 (mendkv remove-node {member})"
            )
        } else {
            String::new()
        }
    }

    /// The first member other than `except` that must acknowledge changes and is down.
    fn down_acknowledger(&self, except: &NodeId) -> Option<NodeId> {
        self.acknowledgers()
            .find(|id| *id != except && self.peer_liveness(id) == crate::gossip::Liveness::Down)
            .cloned()
    }

    /// The first gainer of the active change that has not finished streaming, if any.
    fn unstreamed_member(&self) -> Option<NodeId> {
        let fingerprint = self.membership.layout.fingerprint();
        self.acknowledgers()
            .filter(|id| !self.membership.layout.gained_ranges(id).is_empty())
            .find(|id| self.gossip_count(id, STREAMED_KEY) != Some(fingerprint))
            .cloned()
    }

    /// A removal list naming this id under a generation above this node's own is of an
    /// earlier life: it ran under that generation before, and continues above it, like any
    /// gossip claim of a newer generation (`epoch.rs`). A peer that restarted remembers its
    /// removal list but not the removed life's gossip, so a node wiped again learns nothing
    /// else of it; under its lower generation it took that removal as its own, made while
    /// it was deciding, and stayed refused (simulator seed 6026 of `--faults
    /// membership,crash,partition,loss`). Deciding, it decides again under the new one.
    fn outlive_removed_life(&mut self, now: Millis) {
        // Only a node that takes a removal as its own can be in that case: the removal
        // lists are not decoded again on every tick otherwise.
        if !self.membership.refused {
            return;
        }
        let me = self.id().clone();
        let Some(removed) = self.removal_generation(&me) else {
            return;
        };
        if !self.identity.confirmed || removed <= self.cluster.gossiper.generation() {
            return;
        }
        self.adopt_epoch(now, removed);
        if self.membership.deciding && self.cluster.gossiper.generation() > removed {
            self.membership.deciding_generation = self.cluster.gossiper.generation();
            self.persist_membership();
        }
    }

    /// After this node learned that an earlier life ran under a generation at least its
    /// own (`epoch.rs`), a join it decided in this life moves to the new generation: it
    /// was decided under a generation that earlier life also held, so a removal of that
    /// life (at that generation) would otherwise keep this one refused for good (simulator
    /// seed 1643: wiped, it adopted generation 3 from the one peer that answered, decided
    /// to join, then heard of the old life's removal at 3 and of the old life at 3; its
    /// join stayed at 3 and it never finished). A node that comes back with its old data
    /// never gets here: its epoch record is above every life it had, so no peer claims more.
    pub(super) fn carry_join_to_new_epoch(&mut self, now: Millis) {
        let generation = self.cluster.gossiper.generation();
        if self.membership.joined_generation == 0 || self.membership.joined_generation >= generation
        {
            return;
        }
        self.join_under(generation, now);
    }

    /// Records and announces that this node joins under `generation` (durably), and
    /// derives the layout again: the join lifts a removal of an earlier life.
    fn join_under(&mut self, generation: u64, now: Millis) {
        self.membership.joined_generation = generation;
        let _ = self
            .cluster
            .gossiper
            .set_local(JOINED_KEY, AppValue::Count(generation), now);
        self.persist_membership();
        self.refresh_layout(now);
    }

    /// Decides, for a new node with seeds, whether it bootstraps or joins: it joins when a
    /// member already holds data (or it was removed before and comes back wiped).
    pub(super) fn decide_join(&mut self, now: Millis) {
        if !self.membership.deciding || !self.identity.confirmed {
            return;
        }
        let generation = self.cluster.gossiper.generation();
        if self.membership.deciding_generation == 0 {
            self.membership.deciding_generation = generation;
            self.persist_membership();
        }
        // A node removed while it was deciding (dead) that comes back with its data (it may
        // hold replica writes taken while deciding) stays removed, like any removed node: a
        // decision would announce a join generation above the removal's and lift it. One
        // removed before it started deciding (wiped after a removal, then restarted while
        // deciding) still decides; wiped, it starts empty and joins as a new member.
        let me = self.id().clone();
        if self.membership.refused
            && self
                .removal_generation(&me)
                .is_some_and(|removed| removed >= self.membership.deciding_generation)
        {
            return;
        }
        // Decide on what gossip says of the others (their status and whether they hold
        // data), not on the transport's bare list of them.
        let described = self
            .cluster
            .gossiper
            .members()
            .any(|(id, state)| *id != me && state.status().is_some());
        if !described {
            return;
        }
        let since = *self.membership.deciding_since.get_or_insert(now);
        // Any member that coordinated or stored a write, whatever its state (one still
        // deciding may have coordinated writes to the owners), except the departed.
        let cluster_has_data = self.cluster.gossiper.members().any(|(id, state)| {
            *id != me
                && !self
                    .membership
                    .members
                    .get(id)
                    .is_some_and(MemberState::is_departed)
                && matches!(state.get(HAS_DATA_KEY), Some(AppValue::Count(1)))
        });
        let was_removed = self.cluster.gossiper.members().any(|(_, state)| {
            matches!(state.get(REMOVALS_KEY), Some(AppValue::Bytes(bytes))
                if postcard::from_bytes::<Vec<(NodeId, u64, u64)>>(bytes)
                    .is_ok_and(|l| l.iter().any(|(n, _, _)| *n == me)))
        });
        // Gossip hands over a peer's state in pieces: evidence may arrive a round or two
        // after the first piece, so "nothing to stream" is only concluded after two rounds.
        let evidence = cluster_has_data || was_removed;
        // A node that ran before (it learned its epoch from peers) waits: its own removal
        // or its cluster's data may be in the pieces still to come. A new id decides now.
        let ran_before = self.stats.get(Counter::EpochsLearnedFromPeers) > 0;
        let waited = !ran_before || now.saturating_sub(since) >= 2 * self.config.gossip.interval_ms;
        if !evidence && !waited {
            return;
        }
        if !evidence {
            // Bootstrapping makes this node an owner without streaming: only safe once no
            // write can be acknowledged without it. Every live member must list it as
            // deciding: its writes reach this node from then on, and one it coordinated
            // (or stored) before made it publish `HAS_DATA` first; gossip hands a
            // member's state over in version order, so that evidence is here by the time
            // its list is, and this node joins by streaming instead.
            if let Some(member) = self.member_not_seeing_this_node_deciding() {
                self.membership.reason = Some(format!(
                    "deciding between bootstrap and join: waiting for {member} to see this \
                     node"
                ));
                return;
            }
        }
        self.membership.reason = None;
        self.membership.deciding = false;
        // A node wiped and started again under its old id joins too: it must stream its
        // ranges back before it serves reads for them.
        if evidence {
            self.membership.change_started_at = now;
            let generation = self.cluster.gossiper.generation();
            self.join_under(generation, now);
        } else {
            self.set_own_state(now, NodeStatus::Normal, Phase::Done);
        }
        // The decision is durable at once: a crash must not make the node decide again on
        // a cluster that has data by then.
        if self.storage.sync().is_err() {
            self.stats.increment(Counter::StorageErrors);
        }
    }

    /// The first live member (not this node, not departed, not believed down) whose
    /// [`SEES_DECIDING_KEY`] does not list this node under its current generation.
    fn member_not_seeing_this_node_deciding(&self) -> Option<NodeId> {
        let me = self.id();
        let mine = (me.clone(), self.cluster.gossiper.generation());
        self.cluster
            .gossiper
            .members()
            .filter(|(id, _)| *id != me)
            .filter(|(id, _)| {
                !self
                    .membership
                    .members
                    .get(*id)
                    .is_some_and(MemberState::is_departed)
            })
            .filter(|(id, _)| self.cluster.membership.status(id) != PeerStatus::Down)
            .find(|(_, state)| {
                let sees_me = match state.get(SEES_DECIDING_KEY) {
                    Some(AppValue::Bytes(bytes)) => {
                        postcard::from_bytes::<Vec<(NodeId, u64)>>(bytes)
                            .is_ok_and(|list| list.contains(&mine))
                    }
                    _ => false,
                };
                !sees_me
            })
            .map(|(id, _)| id.clone())
    }

    /// Keeps [`SEES_DECIDING_KEY`] current: the deciding members this node holds live in
    /// its layout (so in every write it coordinates).
    fn watch_deciding_members(&mut self, now: Millis) {
        let me = self.id().clone();
        let seen: Vec<(NodeId, u64)> = self
            .membership
            .layout
            .deciding()
            .iter()
            .filter(|id| **id != me && self.cluster.membership.status(id) != PeerStatus::Down)
            .filter_map(|id| Some((id.clone(), self.cluster.gossiper.member(id)?.generation())))
            .take(MAX_SEEN_DECIDING)
            .collect();
        if seen != self.membership.seen_deciding {
            let bytes = postcard::to_allocvec(&seen).unwrap_or_default();
            let _ = self
                .cluster
                .gossiper
                .set_local(SEES_DECIDING_KEY, AppValue::Bytes(bytes), now);
            self.membership.seen_deciding = seen;
        }
    }

    /// While members are deciding: the preference list of `token` in the read ring plus
    /// the live deciding members (a write must meet its level there too).
    pub(super) fn deciding_write_list(&mut self, token: crate::ring::Token) -> Option<Vec<NodeId>> {
        let layout = &self.membership.layout;
        if layout.deciding().is_empty() {
            return None;
        }
        let live: BTreeSet<NodeId> = layout
            .deciding()
            .iter()
            .filter(|id| *id == self.id() || self.cluster.membership.status(id) != PeerStatus::Down)
            .cloned()
            .collect();
        let read_ring = layout.read_ring();
        if live.is_empty() || read_ring.nodes().is_empty() {
            return None;
        }
        let fingerprint = layout.fingerprint();
        let cached = self
            .membership
            .deciding_ring
            .as_ref()
            .is_some_and(|(f, members, _)| *f == fingerprint && *members == live);
        if !cached {
            let ring = crate::ring::Ring::new(
                read_ring.nodes().iter().chain(live.iter()),
                self.config.vnodes,
                self.config.replication_factor,
            );
            self.membership.deciding_ring = Some((fingerprint, live, ring));
        }
        let (_, _, ring) = self.membership.deciding_ring.as_ref()?;
        Some(ring.preference_list(token))
    }

    /// Moves changes along: acks, this node's own change, removals it runs, streaming,
    /// cleanup.
    pub(super) fn tick_membership(&mut self, now: Millis) {
        self.refresh_layout(now);
        self.outlive_removed_life(now);
        self.watch_deciding_members(now);
        self.decide_join(now);
        let fingerprint = self.membership.layout.fingerprint();
        // Acknowledged once the layout has been unchanged for a request timeout: every
        // operation begun under an older one has ended by then. (Acknowledging as soon as
        // those operations had ended, tried on 2026-12-03, made joins 3x faster but failed
        // the swarm sweep's seed 4179, a wiped node that never learned its new epoch, and
        // the full-disk test; not kept, see docs/benchmarks.md.)
        let settled_for = now.saturating_sub(self.membership.view_since);
        if settled_for >= self.config.request_timeout_ms
            && self.gossip_count(&self.id().clone(), ACK_KEY) != Some(fingerprint)
        {
            let _ = self
                .cluster
                .gossiper
                .set_local(ACK_KEY, AppValue::Count(fingerprint), now);
        }
        let joined = self.membership.joined_generation;
        let me = self.id().clone();
        if joined > 0 && self.gossip_count(&me, JOINED_KEY) != Some(joined) {
            // Re-announced if a restart or an adopted generation lost it.
            let _ = self
                .cluster
                .gossiper
                .set_local(JOINED_KEY, AppValue::Count(joined), now);
        }
        if self.membership.refused || self.membership.deciding {
            return;
        }
        self.drive_own_change(now);
        self.drive_removals(now);
        self.drive_stream(now);
        self.drive_cleanup();
    }

    /// Whether the change of `subject` (at `phase`) may move to its next phase now; sets
    /// the reason when not.
    fn may_advance(&mut self, subject: &NodeId, phase: Phase) -> bool {
        let active = self.membership.layout.active().cloned();
        match phase {
            Phase::Waiting => {
                // A removed joiner's own join stays the active change while its removal
                // waits (`MemberState::layout_change`): the removal does not wait for it.
                if let Some((other, kind, _)) = active.filter(|(other, _, _)| other != subject) {
                    self.membership.reason = Some(format!(
                        "waiting for the {} of {other} to complete",
                        kind.as_str()
                    ));
                    return false;
                }
            }
            Phase::Streaming | Phase::Synced => {
                if active.as_ref().map(|(id, _, _)| id) != Some(subject) {
                    return false;
                }
            }
            Phase::Done => return false,
        }
        if let Some(member) = self.unacked_member() {
            self.membership.reason = Some(format!(
                "waiting for {member} to acknowledge the new layout{}",
                self.down_advice(&member)
            ));
            return false;
        }
        if phase == Phase::Streaming {
            if let Some(member) = self.unstreamed_member() {
                self.membership.reason = Some(format!(
                    "waiting for {member} to stream{}",
                    self.down_advice(&member)
                ));
                return false;
            }
        }
        self.membership.reason = None;
        true
    }

    /// A change that lost the race to another one goes back to waiting.
    fn yields_to_other(&self, subject: &NodeId, phase: Phase) -> bool {
        phase >= Phase::Streaming
            && phase != Phase::Done
            && self
                .membership
                .layout
                .active()
                .is_some_and(|(id, _, _)| id != subject)
    }

    fn drive_own_change(&mut self, now: Millis) {
        let status = self.membership.status;
        if !matches!(status, NodeStatus::Joining | NodeStatus::Leaving) {
            return;
        }
        let me = self.id().clone();
        let phase = self.membership.phase;
        // Judged on a settled view only: a node restarted mid-decommission knows itself and
        // a seed until gossip has described the rest (chaos seed 5003 cancelled its own
        // decommission that way, and it never finished).
        let view_settled = self.cluster.learned
            && now.saturating_sub(self.membership.view_since) >= self.config.request_timeout_ms;
        if status == NodeStatus::Leaving
            && phase < Phase::Synced
            && view_settled
            && self.normal_members() < self.config.replication_factor
        {
            // Another node left first (two decommissions raced), or a dead node is being
            // removed: stay. Safe without acknowledgements even from `streaming`: reads
            // never moved off this node, and writes still reach the old owners.
            self.membership.reason =
                Some("decommission cancelled: not enough nodes to hold RF copies".into());
            self.set_own_state(now, NodeStatus::Normal, Phase::Done);
            return;
        }
        if self.yields_to_other(&me, phase) {
            self.set_own_state(now, status, Phase::Waiting);
            return;
        }
        if !self.may_advance(&me, phase) {
            return;
        }
        match phase {
            Phase::Waiting => self.set_own_state(now, status, Phase::Streaming),
            Phase::Streaming => self.set_own_state(now, status, Phase::Synced),
            Phase::Synced if status == NodeStatus::Joining => {
                self.stats.increment(Counter::ClusterChanges);
                self.set_own_state(now, NodeStatus::Normal, Phase::Done);
            }
            Phase::Synced => {
                if !self.hand_over_hints(now) {
                    self.membership.reason = Some("delivering its hints".into());
                    return;
                }
                self.stats.increment(Counter::ClusterChanges);
                self.set_own_state(now, NodeStatus::Left, Phase::Done);
            }
            Phase::Done => {}
        }
    }

    /// A leaving node's hints: delivered by replay while their targets are up; those left
    /// after a while (or for targets that are down) are handed to another live node, which
    /// keeps them as hints. True when none remain.
    pub(super) fn hand_over_hints(&mut self, now: Millis) -> bool {
        self.membership
            .hand_overs
            .retain(|_, hand_over| hand_over.deadline > now);
        if self.hints.hint_queue.total_hints() == 0 {
            self.membership.hints_wait_since = None;
            return true;
        }
        let since = *self.membership.hints_wait_since.get_or_insert(now);
        let targets: Vec<NodeId> = self.hints.hint_queue.targets().cloned().collect();
        let give_all = now.saturating_sub(since) >= HINT_DELIVERY_WAIT_MS;
        for target in targets {
            let up = self.peer_liveness(&target) != crate::gossip::Liveness::Down;
            if up && !give_all {
                continue;
            }
            let Some(heir) = self
                .ring()
                .nodes()
                .iter()
                .find(|n| {
                    **n != target
                        && *n != self.id()
                        && self.peer_liveness(n) != crate::gossip::Liveness::Down
                })
                .cloned()
            else {
                continue;
            };
            let in_flight: BTreeSet<(String, Vec<u8>)> = self
                .membership
                .hand_overs
                .values()
                .filter(|h| h.target == target)
                .map(|h| (h.hint.bucket.clone(), h.hint.key.clone()))
                .collect();
            for hint in self.hints.hint_queue.next_batch(&target, 256) {
                if in_flight.contains(&(hint.bucket.clone(), hint.key.clone())) {
                    continue;
                }
                let storage_key = hint_key(&target, &hint.bucket, &hint.key);
                let record = match self.storage.get_hint(&storage_key) {
                    Ok(Some(bytes)) => HintRecord::decode(&bytes),
                    Ok(None) => None,
                    Err(_) => {
                        self.stats.increment(Counter::StorageErrors);
                        continue;
                    }
                };
                let Some(record) = record else {
                    self.forget_hint(&target, &hint, None);
                    continue;
                };
                let request = self.new_request_id();
                self.send(
                    &heir,
                    Message::HintedWrite {
                        request,
                        intended: target.clone(),
                        bucket: hint.bucket.clone(),
                        key: hint.key.clone(),
                        object: record.object,
                    },
                );
                self.membership.hand_overs.insert(
                    request,
                    HandOver {
                        target: target.clone(),
                        hint,
                        deadline: now + self.config.request_timeout_ms,
                    },
                );
            }
        }
        self.hints.hint_queue.total_hints() == 0
    }

    /// The heir's answer to a handed-over hint: stored, it is forgotten here (unless a newer
    /// write coalesced into it meanwhile); refused, it is handed over again.
    pub(super) fn on_hand_over_reply(&mut self, request: RequestId, ok: bool) {
        let Some(hand_over) = self.membership.hand_overs.remove(&request) else {
            return;
        };
        if ok
            && self.forget_hint(
                &hand_over.target,
                &hand_over.hint,
                Some(hand_over.hint.version),
            )
        {
            self.stats.increment(Counter::HintsHandedOver);
        }
    }

    fn drive_removals(&mut self, now: Millis) {
        let removals: Vec<(NodeId, u64, Phase)> = self
            .membership
            .removals
            .iter()
            .map(|(n, (g, p))| (n.clone(), *g, *p))
            .collect();
        for (node, generation, phase) in removals {
            let rejoined = self
                .membership
                .members
                .get(&node)
                .is_some_and(|m| m.removal.is_none());
            if rejoined {
                // It came back wiped, as a new member, before its removal completed.
                self.membership.removals.remove(&node);
                self.publish_removals(now);
                return;
            }
            if phase == Phase::Done {
                continue;
            }
            if self.yields_to_other(&node, phase) {
                self.membership
                    .removals
                    .insert(node, (generation, Phase::Waiting));
                self.publish_removals(now);
                return;
            }
            if !self.may_advance(&node, phase) {
                continue;
            }
            let next = match phase {
                Phase::Waiting => Phase::Streaming,
                Phase::Streaming => Phase::Synced,
                _ => {
                    self.stats.increment(Counter::ClusterChanges);
                    Phase::Done
                }
            };
            self.membership
                .removals
                .insert(node.clone(), (generation, next));
            self.publish_removals(now);
            if next == Phase::Done {
                self.drop_hints_for(now, &node);
            }
            return;
        }
    }

    /// Pulls the ranges this node gains in the active change, once everyone writes to the
    /// new owners (all acks in).
    fn drive_stream(&mut self, now: Millis) {
        let layout = &self.membership.layout;
        let fingerprint = layout.fingerprint();
        let streaming = matches!(layout.active(), Some((_, _, Phase::Streaming)));
        if !streaming {
            if let Some(stream) = self.membership.stream.take() {
                self.membership.last_stream = Some(stream);
            }
            return;
        }
        if self.unacked_member().is_some() {
            return;
        }
        if self
            .membership
            .stream
            .as_ref()
            .is_none_or(|s| s.fingerprint != fingerprint)
        {
            let me = self.id().clone();
            if self.membership.stream_done.0 != fingerprint {
                self.membership.stream_done = (fingerprint, BTreeSet::new());
            }
            let done = &self.membership.stream_done.1;
            let gained = self.membership.layout.gained_ranges(&me);
            let ranges_total = gained.len() as u64;
            let gained_set: BTreeSet<TokenRange> =
                gained.iter().map(|(range, _, _)| *range).collect();
            let pulls: BTreeMap<TokenRange, RangePull> = gained
                .into_iter()
                .filter(|(range, _, _)| !done.contains(range))
                .map(|(range, sources, needed)| {
                    (
                        range,
                        RangePull {
                            sources,
                            needed,
                            done: BTreeSet::new(),
                            in_flight: None,
                            attempts: BTreeMap::new(),
                            retry_at: 0,
                        },
                    )
                })
                .collect();
            let ranges_done = ranges_total - pulls.len() as u64;
            self.membership.stream = Some(Stream {
                gained: gained_set,
                fingerprint,
                pulls,
                ranges_total,
                ranges_done,
                keys: 0,
                bytes: 0,
                started_at: now,
            });
        }
        let Some(stream) = self.membership.stream.as_ref() else {
            return;
        };
        if stream.pulls.is_empty() {
            let me = self.id().clone();
            if self.gossip_count(&me, STREAMED_KEY) != Some(fingerprint) {
                let _ = self.cluster.gossiper.set_local(
                    STREAMED_KEY,
                    AppValue::Count(fingerprint),
                    now,
                );
            }
            return;
        }
        // Streaming shares the repair byte budget, and pauses while the breaker is open.
        if self.control.repair_bytes.available(now) == 0
            || matches!(
                self.control.breaker.state(now),
                crate::control::BreakerState::Open { .. }
            )
        {
            return;
        }
        let concurrency = self.config.anti_entropy.stream_concurrency.max(1);
        let mut starts: Vec<(TokenRange, NodeId)> = Vec::new();
        let in_flight = stream
            .pulls
            .values()
            .filter(|p| p.in_flight.is_some())
            .count();
        let mut room = concurrency.saturating_sub(in_flight);
        for (range, pull) in &stream.pulls {
            if room == 0 {
                break;
            }
            if pull.in_flight.is_some() || pull.retry_at > now {
                continue;
            }
            let source = pull.sources.iter().find(|s| {
                !pull.done.contains(*s) && self.peer_liveness(s) != crate::gossip::Liveness::Down
            });
            if let Some(source) = source {
                starts.push((*range, source.clone()));
                room -= 1;
            }
        }
        for (range, source) in starts {
            if let Some(stream) = self.membership.stream.as_mut() {
                if let Some(pull) = stream.pulls.get_mut(&range) {
                    pull.in_flight = Some(source.clone());
                }
            }
            self.start_exchange(now, range, source, None, None, true);
        }
    }

    /// Objects a peer's exchange pushed into `range` and this node stored: while it gains
    /// that range in the active change they are streamed keys too (the old owners' own
    /// anti-entropy with a new owner moves part of its ranges; counting only its pulls
    /// undercounted a join by half).
    pub(super) fn count_pushed_into_gained(&mut self, range: TokenRange, keys: u64, bytes: u64) {
        let Some(stream) = self.membership.stream.as_mut() else {
            return;
        };
        if keys == 0 || !stream.gained.contains(&range) {
            return;
        }
        stream.keys += keys;
        stream.bytes += bytes;
        self.stats.add(Counter::StreamingKeysIn, keys);
        self.stats.add(Counter::StreamingBytesIn, bytes);
    }

    /// A streaming exchange ended.
    pub(super) fn on_stream_exchange_finished(
        &mut self,
        now: Millis,
        range: TokenRange,
        peer: &NodeId,
        report: &crate::anti_entropy::ExchangeReport,
    ) {
        use crate::anti_entropy::ExchangeOutcome;
        self.stats
            .add(Counter::StreamingKeysIn, report.stats.objects_pulled);
        self.stats
            .add(Counter::StreamingKeysOut, report.stats.objects_pushed);
        self.stats
            .add(Counter::StreamingBytesIn, report.stats.bytes_received);
        self.stats
            .add(Counter::StreamingBytesOut, report.stats.bytes_sent);
        let Some(stream) = self.membership.stream.as_mut() else {
            return;
        };
        stream.keys += report.stats.objects_pulled;
        stream.bytes += report.stats.bytes_received;
        let Some(pull) = stream.pulls.get_mut(&range) else {
            return;
        };
        if pull.in_flight.as_ref() != Some(peer) {
            return;
        }
        pull.in_flight = None;
        let attempts = pull.attempts.entry(peer.clone()).or_insert(0);
        *attempts += 1;
        let pulled = match report.outcome {
            ExchangeOutcome::Converged => true,
            ExchangeOutcome::Diverged => *attempts >= MAX_DIVERGED_ATTEMPTS,
            ExchangeOutcome::Failed(_) => {
                pull.retry_at = now + PULL_RETRY_MS;
                false
            }
        };
        if pulled {
            pull.done.insert(peer.clone());
        }
        if pull.done.len() >= pull.needed {
            stream.pulls.remove(&range);
            stream.ranges_done += 1;
            self.stats.increment(Counter::StreamingRangesDone);
            self.membership.stream_done.1.insert(range);
            self.persist_membership();
        }
    }

    /// Deletes the data of ranges this node no longer owns, once no change is active and
    /// everyone applied the layout (so no coordinator still writes or reads here for them).
    fn drive_cleanup(&mut self) {
        if self.membership.cleanup_ranges.is_empty()
            || self.membership.layout.active().is_some()
            || self.membership.status != NodeStatus::Normal
            || self.unacked_member().is_some()
        {
            return;
        }
        let me = self.id().clone();
        let mut scanned = false;
        for _ in 0..CLEANUP_RANGES_PER_TICK {
            let Some(range) = self.membership.cleanup_ranges.pop_first() else {
                break;
            };
            let objects = match self.storage.scan_range(range) {
                Ok(objects) => objects,
                Err(_) => {
                    self.stats.increment(Counter::StorageErrors);
                    self.membership.cleanup_ranges.insert(range);
                    break;
                }
            };
            scanned = true;
            for (bucket, key, object) in objects {
                if self.membership.layout.owns(&me, key_token(&bucket, &key)) {
                    continue;
                }
                // A later write here under this epoch must issue dots above the deleted ones.
                self.identity.reaped_counter_floor = self
                    .identity
                    .reaped_counter_floor
                    .max(object.context().get(&self.identity.actor));
                if self.storage.remove(&bucket, &key).is_ok() {
                    self.anti_entropy.trees.record_write(
                        &bucket,
                        &key,
                        Some(object.digest()),
                        None,
                    );
                    self.wrote();
                    self.stats.increment(Counter::CleanupKeys);
                } else {
                    self.stats.increment(Counter::StorageErrors);
                    // Scanned again later (a restart rescans it from the record).
                    self.membership.cleanup_ranges.insert(range);
                }
            }
        }
        if scanned {
            // Written after the removals, to the same journal: a crash that keeps this
            // record kept them too, and one that loses it rescans (deleting is idempotent).
            self.persist_membership();
        }
    }

    /// Whether a change (active or waiting) is in progress anywhere in the cluster.
    fn change_in_progress(&self) -> Option<(NodeId, ChangeKind)> {
        self.membership
            .members
            .iter()
            .find_map(|(id, m)| m.change().map(|(kind, _)| (id.clone(), kind)))
    }

    fn normal_members(&self) -> usize {
        self.membership
            .members
            .values()
            .filter(|m| m.status == NodeStatus::Normal && m.removal.is_none())
            .count()
    }

    /// Leaving members whose decommission can still be cancelled (not `synced` yet: reads
    /// have not moved off them).
    fn cancellable_leaves(&self) -> usize {
        self.membership
            .members
            .values()
            .filter(|m| {
                m.removal.is_none() && m.status == NodeStatus::Leaving && m.phase < Phase::Synced
            })
            .count()
    }

    /// True when `peer` is being or was removed (`remove-node`) and has not rejoined wiped:
    /// it must not take part in the cluster any more.
    pub(super) fn is_removed_peer(&self, peer: &NodeId) -> bool {
        peer != self.id()
            && self
                .membership
                .members
                .get(peer)
                .is_some_and(|m| m.removal.is_some())
    }

    /// What a message from a removed node (one that came back with its old data) may still
    /// do: nothing but tell us its own gossip state, so a node that is wiped and rejoins
    /// (a new `JOINED` generation, which lifts the removal) is seen, and be answered, so it
    /// learns it was removed and refuses service. Its requests (replica writes, reads,
    /// anti-entropy, hints) and replies are dropped, and what it holds about other nodes
    /// (possibly long stale) is not merged. A node that is itself removed serves no peer
    /// either. None: the message is dropped.
    pub(super) fn screen_removed(&mut self, from: &NodeId, message: Message) -> Option<Message> {
        use crate::gossip::GossipMessage;
        if self.membership.refused && !matches!(message, Message::Gossip(_)) {
            return None;
        }
        if !self.is_removed_peer(from) {
            return Some(message);
        }
        self.stats.increment(Counter::PeerMessagesFromRemoved);
        if self.membership.refused_peers.len() < MAX_REMOVALS
            && self.membership.refused_peers.insert(from.clone())
        {
            self.membership.newly_refused_peers.push(from.clone());
        }
        let own = |deltas: Vec<crate::gossip::Delta>| -> Vec<crate::gossip::Delta> {
            deltas.into_iter().filter(|d| d.node == *from).collect()
        };
        match message {
            Message::Gossip(GossipMessage::Ack { deltas, requests }) => {
                Some(Message::Gossip(GossipMessage::Ack {
                    deltas: own(deltas),
                    requests,
                }))
            }
            Message::Gossip(GossipMessage::Ack2 { deltas }) => {
                Some(Message::Gossip(GossipMessage::Ack2 {
                    deltas: own(deltas),
                }))
            }
            syn @ Message::Gossip(GossipMessage::Syn { .. }) => Some(syn),
            _ => None,
        }
    }

    /// Removed peers whose messages this node started refusing since the last call (each
    /// once), for the driver's log.
    pub fn take_newly_refused_peers(&mut self) -> Vec<NodeId> {
        std::mem::take(&mut self.membership.newly_refused_peers)
    }

    /// `mendkv decommission`: this node starts leaving.
    pub fn decommission(&mut self, now: Millis) -> Result<ChangeProgress, ChangeRefusal> {
        self.refresh_layout(now);
        if self.membership.status == NodeStatus::Leaving {
            return Ok(self.change_progress(self.id(), now));
        }
        if self.membership.status != NodeStatus::Normal {
            return Err(ChangeRefusal::Conflict(format!(
                "this node is {}, not normal: only a normal node can be decommissioned",
                self.membership.status.as_str()
            )));
        }
        if let Some((node, kind)) = self.change_in_progress() {
            return Err(ChangeRefusal::Conflict(format!(
                "the {} of {node} is in progress: retry once it completes",
                kind.as_str()
            )));
        }
        if self.normal_members() <= self.config.replication_factor {
            return Err(ChangeRefusal::Conflict(format!(
                "not enough nodes to hold RF copies: {} normal nodes, replication factor {}; \
                 add a node first",
                self.normal_members(),
                self.config.replication_factor
            )));
        }
        // Refused up front rather than stalled: every step waits for every member's
        // acknowledgement, which a down member cannot give (Cassandra refuses a
        // decommission with a node down the same way).
        if let Some(down) = self.down_acknowledger(self.id()) {
            return Err(ChangeRefusal::Conflict(format!(
                "{down} is down, and every member must acknowledge each step of a change: \
                 restart {down}, or remove it first if it is gone for good \
                 (mendkv remove-node {down})"
            )));
        }
        self.membership.change_started_at = now;
        self.set_own_state(now, NodeStatus::Leaving, Phase::Waiting);
        Ok(self.change_progress(self.id(), now))
    }

    /// `mendkv remove-node ID`: the surviving replicas re-replicate a dead node's ranges (a
    /// dead joiner's join is abandoned instead: there is nothing to re-replicate).
    pub fn remove_node(
        &mut self,
        now: Millis,
        node: &NodeId,
    ) -> Result<ChangeProgress, ChangeRefusal> {
        self.refresh_layout(now);
        let Some(member) = self.membership.members.get(node).copied() else {
            return Err(ChangeRefusal::UnknownNode(format!(
                "no member {node} in this cluster"
            )));
        };
        if member.removal.is_some() || member.status == NodeStatus::Left {
            return Ok(self.change_progress(node, now));
        }
        if node == self.id() || self.peer_liveness(node) != crate::gossip::Liveness::Down {
            return Err(ChangeRefusal::Conflict(format!(
                "{node} is up: decommission it instead (mendkv decommission --node ...)"
            )));
        }
        // A joining node (streaming, or still deciding) can be removed too: a dead joiner
        // otherwise blocks every later change, since it cannot acknowledge them. Its join is
        // abandoned: while the removal waits for every member's acknowledgement the rings
        // stay as the join left them, then it is in no ring (`MemberState::in_new`). Nothing
        // is re-replicated: every write reached it only in addition to the old owners.
        // Another change in progress does not refuse a removal: the dead node may be what
        // holds that change up (it cannot acknowledge), and from its removal on it no longer
        // has to. The removal waits its turn behind the active change.
        //
        // A decommission that has not reached `synced` is cancelled if this removal leaves
        // too few normal nodes (`drive_own_change`), so it counts as staying here.
        let staying = self.normal_members() + self.cancellable_leaves();
        if member.status == NodeStatus::Normal && staying <= self.config.replication_factor {
            return Err(ChangeRefusal::Conflict(format!(
                "not enough nodes to hold RF copies: {} normal nodes, replication factor {}; \
                 add a node first",
                staying, self.config.replication_factor
            )));
        }
        if self.membership.removals.len() >= MAX_REMOVALS {
            self.membership
                .removals
                .retain(|_, (_, phase)| *phase != Phase::Done);
        }
        let generation = self.peer_generation(node);
        self.membership.change_started_at = now;
        self.membership
            .removals
            .insert(node.clone(), (generation, Phase::Waiting));
        self.publish_removals(now);
        Ok(self.change_progress(node, now))
    }

    /// Where a node's change stands, as this node sees it.
    pub fn change_progress(&self, node: &NodeId, now: Millis) -> ChangeProgress {
        let member = self
            .membership
            .members
            .get(node)
            .copied()
            .unwrap_or(MemberState::normal());
        let change = member.change();
        let mine = node == self.id() || self.membership.removals.contains_key(node);
        let stream = if node == self.id() {
            self.membership
                .stream
                .as_ref()
                .or(self.membership.last_stream.as_ref())
        } else {
            None
        };
        let phase = match (change, member.removal) {
            (Some((_, phase)), _) => phase,
            (None, Some(phase)) => phase,
            (None, None) => Phase::Done,
        };
        ChangeProgress {
            node: node.to_string(),
            state: self.peer_state(node).as_str().to_string(),
            change: change.map(|(kind, _)| kind.as_str().to_string()),
            phase: phase.as_str().to_string(),
            reason: if mine && change.is_some() {
                self.membership.reason.clone()
            } else {
                None
            },
            ranges_total: stream.map_or(0, |s| s.ranges_total),
            ranges_done: stream.map_or(0, |s| s.ranges_done),
            keys_streamed: stream.map_or(0, |s| s.keys),
            bytes_streamed: stream.map_or(0, |s| s.bytes),
            elapsed_ms: if change.is_some() && mine {
                now.saturating_sub(self.membership.change_started_at)
            } else {
                stream.map_or(0, |s| now.saturating_sub(s.started_at))
            },
        }
    }

    /// True when this node replicates the key in the old or the new ring (true before the
    /// first layout is derived).
    pub(super) fn owns_key(&self, bucket: &str, key: &[u8]) -> bool {
        self.membership.view_since == 0
            || self
                .membership
                .layout
                .owns(self.id(), key_token(bucket, key))
    }

    /// The layout this node applies (old and new rings, the active change).
    pub fn layout(&self) -> &Layout {
        &self.membership.layout
    }

    /// True when `node` was removed from the cluster (`remove-node` completed).
    pub fn is_removed(&self, node: &NodeId) -> bool {
        self.membership
            .members
            .get(node)
            .is_some_and(|m| m.removal == Some(Phase::Done))
    }

    /// Ranges whose data this node still has to scan for keys it no longer owns (persisted,
    /// so a restart resumes them).
    pub fn cleanup_ranges_pending(&self) -> usize {
        self.membership.cleanup_ranges.len()
    }

    /// This node's own ring state.
    pub fn own_state(&self) -> NodeStatus {
        self.membership.status
    }

    /// True when this node was removed from the cluster and came back with its old data.
    pub fn is_refused(&self) -> bool {
        self.membership.refused
    }

    /// When membership next has work: acks, streaming, the owner's steps.
    pub(super) fn membership_deadline(&self) -> Millis {
        let ack_due = self.membership.view_since + self.config.request_timeout_ms;
        let busy = self.membership.deciding
            || self.membership.layout.active().is_some()
            || matches!(
                self.membership.status,
                NodeStatus::Joining | NodeStatus::Leaving
            )
            || self
                .membership
                .removals
                .values()
                .any(|(_, p)| *p != Phase::Done)
            || !self.membership.cleanup_ranges.is_empty()
            || self
                .membership
                .members
                .values()
                .any(|m| m.change().is_some());
        let fingerprint = self.membership.layout.fingerprint();
        let acked = self.gossip_count(self.id(), ACK_KEY) == Some(fingerprint);
        let mut deadline = if acked { Millis::MAX } else { ack_due };
        if busy {
            // Progress depends on peers' gossip: look again a few times a second.
            deadline = deadline.min(self.clock + 100);
        }
        deadline
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    /// Records written before cleanup ranges, or before the deciding generation, were
    /// persisted still load (no cleanup pending, generation unknown), and the current one
    /// round-trips them.
    #[test]
    fn membership_records_of_both_formats_decode() {
        let old = PersistedBeforeCleanup {
            status: NodeStatus::Leaving,
            phase: Phase::Streaming.code(),
            removals: vec![(NodeId::new("n9"), 3, Phase::Done.code())],
            stream_fingerprint: 7,
            stream_done: vec![TokenRange { start: 1, end: 2 }],
            joined_generation: 5,
            deciding: false,
        };
        let decoded = Persisted::decode(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!(decoded.status, NodeStatus::Leaving);
        assert_eq!(decoded.joined_generation, 5);
        assert_eq!(decoded.removals.len(), 1);
        assert!(decoded.cleanup_ranges.is_empty());
        assert_eq!(decoded.deciding_generation, 0);
        let before_generation = PersistedBeforeDecidingGeneration {
            status: NodeStatus::Joining,
            phase: Phase::Waiting.code(),
            removals: Vec::new(),
            stream_fingerprint: 0,
            stream_done: Vec::new(),
            joined_generation: 0,
            deciding: true,
            cleanup_ranges: vec![TokenRange { start: 3, end: 4 }],
        };
        let decoded =
            Persisted::decode(&postcard::to_allocvec(&before_generation).unwrap()).unwrap();
        assert!(decoded.deciding);
        assert_eq!(decoded.cleanup_ranges, before_generation.cleanup_ranges);
        assert_eq!(decoded.deciding_generation, 0);
        let mut current = decoded;
        current.cleanup_ranges = vec![TokenRange { start: 10, end: 20 }];
        current.deciding_generation = 42;
        let again = Persisted::decode(&postcard::to_allocvec(&current).unwrap()).unwrap();
        assert_eq!(again.cleanup_ranges, current.cleanup_ranges);
        assert_eq!(again.stream_done, current.stream_done);
        assert_eq!(again.deciding_generation, 42);
    }
}
