//! Who is in the cluster and how to reach them, as the node uses it for the ring and the
//! transport.
//!
//! Members come from two sources: the transport handshake (a peer that dials us, or a seed
//! we dialed) and gossip (`node/gossip.rs` adds every node gossip hears of). Liveness here is
//! the union of both verdicts: the transport marks a peer down when its connection fails or
//! closes, gossip's phi-accrual detector when its heartbeats stop; either side marks it up
//! again. A member that left is dropped once gossip forgets it.

use crate::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// How to reach a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub peer_address: String,
    pub http_address: String,
}

/// Reachability as the transport sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    Up,
    Down,
}

impl PeerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerStatus::Up => "up",
            PeerStatus::Down => "down",
        }
    }
}

/// The bound on members a message may announce, so a hostile peer cannot grow our state.
pub const MAX_MEMBERS: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct Membership {
    members: BTreeMap<NodeId, MemberInfo>,
    down: BTreeSet<NodeId>,
}

impl Membership {
    pub fn new(me: MemberInfo) -> Self {
        let mut members = BTreeMap::new();
        members.insert(me.id.clone(), me);
        Membership {
            members,
            down: BTreeSet::new(),
        }
    }

    /// Adds or updates a member; true when the set of ids changed (the ring must change).
    pub fn learn(&mut self, info: MemberInfo) -> bool {
        if self.members.len() >= MAX_MEMBERS && !self.members.contains_key(&info.id) {
            return false;
        }
        let is_new = !self.members.contains_key(&info.id);
        self.members.insert(info.id.clone(), info);
        is_new
    }

    /// Drops a member that left the cluster (gossip forgot it). This node itself stays.
    pub fn forget(&mut self, id: &NodeId) {
        if self.members.len() > 1 {
            self.members.remove(id);
            self.down.remove(id);
        }
    }

    pub fn get(&self, id: &NodeId) -> Option<&MemberInfo> {
        self.members.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &NodeId> {
        self.members.keys()
    }

    pub fn all(&self) -> impl Iterator<Item = &MemberInfo> {
        self.members.values()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn set_status(&mut self, id: &NodeId, status: PeerStatus) {
        match status {
            PeerStatus::Up => self.down.remove(id),
            PeerStatus::Down => self.down.insert(id.clone()),
        };
    }

    pub fn status(&self, id: &NodeId) -> PeerStatus {
        if self.down.contains(id) {
            PeerStatus::Down
        } else {
            PeerStatus::Up
        }
    }
}

// ----- cluster changes: the layout ------------------------------------------------------

use crate::gossip::NodeStatus;
use crate::ring::{Ring, Token, TokenRange};

/// How far a node's change (join, leave, removal) has come. A change is *active* from
/// `Streaming` on; only one is active at a time (see [`Layout::active`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Announced, waiting for the change before it to complete (not in any ring yet).
    Waiting,
    /// Writes reach the old and the new owners; reads use the old owners; the new owners
    /// pull the ranges they gain.
    Streaming,
    /// Every new owner has its ranges: reads use the new owners, writes still reach both.
    Synced,
    /// Done (the change's owner announces the final state: `normal`, `left`, removed).
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Streaming => "streaming",
            Phase::Synced => "synced",
            Phase::Done => "done",
        }
    }

    pub fn from_code(code: u64) -> Phase {
        match code {
            0 => Phase::Waiting,
            1 => Phase::Streaming,
            2 => Phase::Synced,
            _ => Phase::Done,
        }
    }

    pub fn code(self) -> u64 {
        match self {
            Phase::Waiting => 0,
            Phase::Streaming => 1,
            Phase::Synced => 2,
            Phase::Done => 3,
        }
    }
}

/// What kind of change a node is going through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ChangeKind {
    Join,
    Leave,
    Remove,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Join => "join",
            ChangeKind::Leave => "decommission",
            ChangeKind::Remove => "remove",
        }
    }
}

/// One member as the layout sees it: its ring state, and the phase of its change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberState {
    pub status: NodeStatus,
    pub phase: Phase,
    /// Removed by an operator (`remove-node`), with the removal's phase.
    pub removal: Option<Phase>,
    /// A new node that has not yet decided between bootstrapping (`normal` at once, no
    /// streaming) and joining: coordinators write to it too (see [`Layout::deciding`]).
    pub deciding: bool,
}

impl MemberState {
    pub fn normal() -> Self {
        MemberState {
            status: NodeStatus::Normal,
            phase: Phase::Done,
            removal: None,
            deciding: false,
        }
    }

    /// The change this member is going through, if any, and its phase.
    pub fn change(&self) -> Option<(ChangeKind, Phase)> {
        if let Some(phase) = self.removal {
            return (phase != Phase::Done).then_some((ChangeKind::Remove, phase));
        }
        match self.status {
            NodeStatus::Joining => Some((ChangeKind::Join, self.phase)),
            NodeStatus::Leaving => Some((ChangeKind::Leave, self.phase)),
            NodeStatus::Normal | NodeStatus::Left => None,
        }
    }

    /// A joiner removed by an operator (`remove-node` of a dead `joining` member): its join
    /// is abandoned. It never was the only copy of anything (writes reached it only in
    /// addition to the old owners, see [`Layout::write_lists`]), so its removal
    /// re-replicates nothing.
    pub fn is_removed_joiner(&self) -> bool {
        self.removal.is_some() && self.status == NodeStatus::Joining
    }

    /// The change the layout weighs when it picks the active one. A removed joiner's join
    /// stays where it was while the removal is `waiting`: the rings stay as the join left
    /// them until every member acknowledged the removal (so none still acts on a layout
    /// where the joiner was further along); from the removal's `streaming` on, the removal.
    fn layout_change(&self) -> Option<(ChangeKind, Phase)> {
        if self.is_removed_joiner()
            && self.removal == Some(Phase::Waiting)
            && matches!(self.phase, Phase::Streaming | Phase::Synced)
        {
            return Some((ChangeKind::Join, self.phase));
        }
        self.change()
    }

    /// Owns ranges before the active change completes.
    fn in_old(&self) -> bool {
        match self.removal {
            Some(Phase::Done) => return false,
            // A joiner never owned anything in the old ring.
            Some(_) if self.status == NodeStatus::Joining => return false,
            Some(_) => return true,
            None => {}
        }
        matches!(self.status, NodeStatus::Normal | NodeStatus::Leaving)
    }

    /// Owns ranges once the active change completes (`active`: this member's change is the
    /// active one; a waiting change is not applied yet).
    fn in_new(&self, active: bool) -> bool {
        if self.is_removed_joiner() {
            // Only while its abandoned join is still the active change (the removal is
            // `waiting`, see [`MemberState::layout_change`]); from then on in no ring.
            return self.removal == Some(Phase::Waiting) && active;
        }
        if self.removal.is_some() {
            return self.removal != Some(Phase::Done) && !active;
        }
        match self.status {
            NodeStatus::Normal => true,
            NodeStatus::Joining => active,
            NodeStatus::Leaving => !active,
            NodeStatus::Left => false,
        }
    }

    /// Counts as a member that must acknowledge views (it is alive and part of the
    /// cluster, possibly waiting to join): not left, not removed.
    pub fn acknowledges(&self) -> bool {
        self.removal.is_none() && self.status != NodeStatus::Left
    }

    pub fn is_departed(&self) -> bool {
        self.removal == Some(Phase::Done) || self.status == NodeStatus::Left
    }
}

/// The rings a node derives from gossip, identically on every node with the same view:
/// the *old* ring (current owners) and the *new* ring (owners once the active change is
/// done), and the *partition*: every token of both, so each of its ranges has one
/// preference list in each ring. Writes must meet their level in both lists while a change
/// is active; reads use the old ring until the change is `Synced`, then the new one.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    old: Ring,
    new: Ring,
    partition: Ring,
    /// The active change: its subject, kind and phase.
    active: Option<(NodeId, ChangeKind, Phase)>,
    /// Members still deciding whether they bootstrap or join. One that bootstraps becomes
    /// an owner without streaming, so every write must already be on it: coordinators add
    /// a preference list of the read ring plus these (the live ones) to every write.
    deciding: BTreeSet<NodeId>,
    fingerprint: u64,
}

impl Layout {
    /// Builds the layout from every member's state (this node included). At most one change
    /// is active: the one furthest along, ties to the smallest id; others wait.
    pub fn new(members: &BTreeMap<NodeId, MemberState>, vnodes: u16, rf: usize) -> Self {
        let active = members
            .iter()
            .filter_map(|(id, m)| m.layout_change().map(|(kind, phase)| (id, kind, phase)))
            .filter(|(_, _, phase)| *phase >= Phase::Streaming)
            .max_by(|a, b| a.2.cmp(&b.2).then_with(|| b.0.cmp(a.0)))
            .map(|(id, kind, phase)| (id.clone(), kind, phase));
        let is_active = |id: &NodeId| active.as_ref().is_some_and(|(a, _, _)| a == id);
        let old_ids: Vec<&NodeId> = members
            .iter()
            .filter(|(_, m)| m.in_old())
            .map(|(id, _)| id)
            .collect();
        let new_ids: Vec<&NodeId> = members
            .iter()
            .filter(|(id, m)| m.in_new(is_active(id)))
            .map(|(id, _)| id)
            .collect();
        let all: BTreeSet<&NodeId> = old_ids.iter().chain(new_ids.iter()).copied().collect();
        let fingerprint = {
            let mut hasher = xxhash_rust::xxh3::Xxh3::new();
            for (id, m) in members {
                hasher.update(id.as_str().as_bytes());
                hasher.update(&[
                    0,
                    m.status as u8,
                    m.phase.code() as u8,
                    m.removal.map_or(9, |p| p.code() as u8),
                ]);
            }
            hasher.digest()
        };
        let deciding = members
            .iter()
            .filter(|(_, m)| m.deciding && m.removal.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        Layout {
            old: Ring::new(old_ids, vnodes, rf),
            new: Ring::new(new_ids, vnodes, rf),
            partition: Ring::new(all, vnodes, rf),
            active,
            deciding,
            fingerprint,
        }
    }

    /// A layout of these nodes, all `normal` (tests, single nodes).
    pub fn of_normal<'a>(
        ids: impl IntoIterator<Item = &'a NodeId>,
        vnodes: u16,
        rf: usize,
    ) -> Self {
        let members = ids
            .into_iter()
            .map(|id| (id.clone(), MemberState::normal()))
            .collect();
        Layout::new(&members, vnodes, rf)
    }

    /// The ring reads use.
    pub fn read_ring(&self) -> &Ring {
        match self.active {
            Some((_, _, Phase::Streaming)) => &self.old,
            _ => &self.new,
        }
    }

    pub fn old_ring(&self) -> &Ring {
        &self.old
    }

    pub fn new_ring(&self) -> &Ring {
        &self.new
    }

    /// Every token of both rings: the ranges trees and streaming work on.
    pub fn partition(&self) -> &Ring {
        &self.partition
    }

    pub fn active(&self) -> Option<&(NodeId, ChangeKind, Phase)> {
        self.active.as_ref()
    }

    /// Members still deciding between bootstrap and join.
    pub fn deciding(&self) -> &BTreeSet<NodeId> {
        &self.deciding
    }

    /// Identifies the view: two nodes with the same fingerprint derive the same rings.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The preference lists a write must meet its level in: the read ring's, and while a
    /// change is active the other ring's too (when it differs).
    pub fn write_lists(&self, token: Token) -> Vec<Vec<NodeId>> {
        let first = self.read_ring().preference_list(token);
        if self.active.is_none() {
            return vec![first];
        }
        let other = match self.active {
            Some((_, _, Phase::Streaming)) => self.new.preference_list(token),
            _ => self.old.preference_list(token),
        };
        if other == first || other.is_empty() {
            vec![first]
        } else {
            vec![first, other]
        }
    }

    /// Every partition range with its old and new preference lists.
    pub fn ranges(&self) -> Vec<(TokenRange, Vec<NodeId>, Vec<NodeId>)> {
        self.partition
            .ranges()
            .into_iter()
            .map(|(range, _)| {
                let old = self.old.preference_list(range.end);
                let new = self.new.preference_list(range.end);
                (range, old, new)
            })
            .collect()
    }

    /// The ranges `node` keeps data and a tree for: in the old or the new list.
    pub fn replicated_ranges(&self, node: &NodeId) -> Vec<TokenRange> {
        self.ranges()
            .into_iter()
            .filter(|(_, old, new)| old.contains(node) || new.contains(node))
            .map(|(range, _, _)| range)
            .collect()
    }

    /// Every (range, other replica) pair `node` syncs by anti-entropy: the other members of
    /// the lists of the ranges it replicates.
    pub fn repair_targets(&self, node: &NodeId) -> Vec<(TokenRange, NodeId)> {
        let mut targets = Vec::new();
        for (range, old, new) in self.ranges() {
            if !old.contains(node) && !new.contains(node) {
                continue;
            }
            let peers: BTreeSet<&NodeId> = old.iter().chain(new.iter()).collect();
            targets.extend(
                peers
                    .into_iter()
                    .filter(|p| *p != node)
                    .map(|p| (range, p.clone())),
            );
        }
        targets
    }

    /// The nodes gaining each range in the active change (in the range's new list and not
    /// in its old one): a gaining node pulls that range from a quorum of its old replicas,
    /// so nobody needs a scheduled exchange of it with the gaining node meanwhile. Empty
    /// when no change is active.
    pub fn gaining_nodes(&self) -> BTreeMap<TokenRange, BTreeSet<NodeId>> {
        if self.active.is_none() {
            return BTreeMap::new();
        }
        self.ranges()
            .into_iter()
            .map(|(range, old, new)| {
                let gaining: BTreeSet<NodeId> =
                    new.into_iter().filter(|n| !old.contains(n)).collect();
                (range, gaining)
            })
            .filter(|(_, gaining)| !gaining.is_empty())
            .collect()
    }

    /// The ranges `node` gains in the active change, each with its old replicas (the
    /// sources to pull from) and how many of them must have been pulled (a quorum of the
    /// old list, so every write acknowledged at quorum is in the union).
    pub fn gained_ranges(&self, node: &NodeId) -> Vec<(TokenRange, Vec<NodeId>, usize)> {
        let Some((subject, kind, _)) = &self.active else {
            return Vec::new();
        };
        // A removed node is dead: its copies cannot be pulled, and a write acknowledged at
        // quorum has correspondingly more of its copies on the survivors.
        let dead = (*kind == ChangeKind::Remove).then_some(subject);
        self.ranges()
            .into_iter()
            .filter(|(_, old, new)| new.contains(node) && !old.contains(node))
            .map(|(range, old, _)| {
                let quorum = crate::quorum::ConsistencyLevel::Quorum.required(old.len());
                let sources: Vec<NodeId> = old.into_iter().filter(|n| Some(n) != dead).collect();
                let lost = usize::from(dead.is_some_and(|d| !sources.contains(d)))
                    .min(quorum.saturating_sub(1));
                let needed = (quorum - lost).min(sources.len()).max(1);
                (range, sources, needed)
            })
            .filter(|(_, sources, _)| !sources.is_empty())
            .collect()
    }

    /// Whether `node` owns `token` in either ring (cleanup keeps what it owns).
    pub fn owns(&self, node: &NodeId, token: Token) -> bool {
        self.old.preference_list(token).contains(node)
            || self.new.preference_list(token).contains(node)
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    fn members(states: &[(&str, NodeStatus, Phase)]) -> BTreeMap<NodeId, MemberState> {
        states
            .iter()
            .map(|(id, status, phase)| {
                (
                    NodeId::new(*id),
                    MemberState {
                        status: *status,
                        phase: *phase,
                        removal: None,
                        deciding: false,
                    },
                )
            })
            .collect()
    }

    /// A streaming joiner: reads stay on the old owners, writes need both lists, and the
    /// joiner gains ranges whose sources are the old replicas.
    #[test]
    fn a_streaming_join_writes_to_both_and_reads_the_old() {
        use NodeStatus::*;
        let layout = Layout::new(
            &members(&[
                ("a", Normal, Phase::Done),
                ("b", Normal, Phase::Done),
                ("c", Normal, Phase::Done),
                ("d", Joining, Phase::Streaming),
            ]),
            16,
            2,
        );
        let d = NodeId::new("d");
        assert!(!layout.read_ring().nodes().contains(&d));
        assert!(layout.new_ring().nodes().contains(&d));
        let gained = layout.gained_ranges(&d);
        assert!(!gained.is_empty());
        for (range, sources, needed) in &gained {
            assert!(!sources.contains(&d));
            assert_eq!(*needed, 2);
            let lists = layout.write_lists(range.end);
            assert_eq!(lists.len(), 2, "old and new lists differ on a gained range");
            assert!(lists[1].contains(&d));
        }
        // Synced: reads move to the new owners, writes still reach both.
        let synced = Layout::new(
            &members(&[
                ("a", Normal, Phase::Done),
                ("b", Normal, Phase::Done),
                ("c", Normal, Phase::Done),
                ("d", Joining, Phase::Synced),
            ]),
            16,
            2,
        );
        assert!(synced.read_ring().nodes().contains(&d));
        assert_ne!(synced.fingerprint(), layout.fingerprint());
        let (range, _, _) = gained[0];
        assert_eq!(synced.write_lists(range.end).len(), 2);
    }

    /// A dead joiner under removal: while the removal waits, the rings stay as the join left
    /// them (the joiner in the new ring only, its join still the active change); from the
    /// removal's `streaming` on it is in no ring, and nothing is gained (its ranges' data is
    /// still on their old owners).
    #[test]
    fn a_removed_joiner_keeps_the_join_rings_while_waiting_then_is_in_no_ring() {
        use NodeStatus::*;
        let d = NodeId::new("d");
        for join_phase in [Phase::Waiting, Phase::Streaming, Phase::Synced] {
            let mut states = members(&[
                ("a", Normal, Phase::Done),
                ("b", Normal, Phase::Done),
                ("c", Normal, Phase::Done),
                ("d", Joining, join_phase),
            ]);
            let before = Layout::new(&states, 16, 2);
            states.get_mut(&d).unwrap().removal = Some(Phase::Waiting);
            let waiting = Layout::new(&states, 16, 2);
            assert_eq!(waiting.old_ring().nodes(), before.old_ring().nodes());
            assert_eq!(waiting.new_ring().nodes(), before.new_ring().nodes());
            assert_eq!(waiting.read_ring().nodes(), before.read_ring().nodes());
            assert_eq!(waiting.active(), before.active(), "{join_phase:?}");
            assert!(!waiting.old_ring().nodes().contains(&d));
            assert_ne!(waiting.fingerprint(), before.fingerprint());
            for removal in [Phase::Streaming, Phase::Synced, Phase::Done] {
                states.get_mut(&d).unwrap().removal = Some(removal);
                let layout = Layout::new(&states, 16, 2);
                assert!(!layout.old_ring().nodes().contains(&d), "{removal:?}");
                assert!(!layout.new_ring().nodes().contains(&d), "{removal:?}");
                assert!(!layout.partition().nodes().contains(&d), "{removal:?}");
                assert!(layout.gaining_nodes().is_empty(), "{removal:?}");
                let expected =
                    (removal != Phase::Done).then(|| (d.clone(), ChangeKind::Remove, removal));
                assert_eq!(
                    layout.active(),
                    expected.as_ref(),
                    "{join_phase:?} {removal:?}"
                );
            }
        }
    }

    /// A waiting joiner is placed nowhere, and of two active changes only one applies.
    #[test]
    fn waiting_changes_are_not_applied_and_one_change_is_active() {
        use NodeStatus::*;
        let layout = Layout::new(
            &members(&[
                ("a", Normal, Phase::Done),
                ("b", Normal, Phase::Done),
                ("c", Leaving, Phase::Streaming),
                ("d", Joining, Phase::Streaming),
                ("e", Joining, Phase::Waiting),
            ]),
            8,
            2,
        );
        let (active, kind, _) = layout.active().unwrap();
        assert_eq!((active.as_str(), *kind), ("c", ChangeKind::Leave));
        for id in ["d", "e"] {
            assert!(!layout.new_ring().nodes().contains(&NodeId::new(id)));
            assert!(!layout.old_ring().nodes().contains(&NodeId::new(id)));
        }
        assert!(!layout.new_ring().nodes().contains(&NodeId::new("c")));
        assert!(layout.old_ring().nodes().contains(&NodeId::new("c")));
    }
}
