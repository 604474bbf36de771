//! The node's gossip: rounds on its timer, the exchange with peers, and what gossip's events
//! mean for the node (members for the ring, liveness for failover, restarts for repair).

use super::Node;
use crate::gossip::{AppKey, GossipEvent, GossipMessage, Liveness, NodeStatus};
use crate::membership::{MemberInfo, PeerStatus};
use crate::message::Message;
use crate::storage::Storage;
use crate::{Millis, NodeId};

/// The node's view of the cluster: members and gossip (the ring they form is the
/// membership room's layout: `Node::ring`).
#[derive(Debug)]
pub(super) struct ClusterView {
    pub membership: crate::membership::Membership,
    pub gossiper: crate::gossip::Gossiper,
    /// A peer has told this node everything it knows (a gossip answer) since it started, so
    /// its member list, and with it its ring, is whole. Members are not persisted: a node
    /// restarted after kill -9 knows only itself and its seeds at first, and a ring of one
    /// would make it coordinate a quorum alone with its own stale copy (found by the chaos
    /// harness: quorum reads right after a restart returned the pre-kill copy). Until then
    /// it refuses client reads and writes. True from the start for a node with no seeds.
    pub learned: bool,
    /// Peers first named by a transport handshake while gossip already described other
    /// peers: not members of a static list, possibly joiners. Until gossip describes one,
    /// it is placed nowhere (see `member_states`). Bounded as the member list is.
    pub strangers: std::collections::BTreeSet<NodeId>,
}

/// Why a node refuses client requests until it has heard the cluster from a peer.
pub(super) const MEMBERSHIP_UNLEARNED: &str = "this node has just started and has not yet \
     heard the cluster's membership from a peer (its seeds); until then its view of the ring \
     is incomplete and it cannot coordinate; retry in a moment, or check that its seeds are \
     reachable";

impl<S: Storage> Node<S> {
    fn send_gossip(&mut self, messages: Vec<(NodeId, GossipMessage)>) {
        for (peer, message) in messages {
            if peer != *self.id() {
                self.send(&peer, Message::Gossip(message));
            }
        }
    }

    /// A gossip round when one is due.
    pub(super) fn tick_gossip(&mut self, now: Millis) {
        // Before the round, so the round carries what changed.
        self.publish_roots(now);
        if now >= self.cluster.gossiper.next_deadline() {
            let messages = self.cluster.gossiper.handle_tick(now, &mut self.rng);
            self.send_gossip(messages);
        }
        self.apply_gossip_events(now);
        self.compare_roots(now);
    }

    pub(super) fn on_gossip(&mut self, now: Millis, from: &NodeId, message: GossipMessage) {
        self.learn_epoch_from(now, from, &message);
        // A removed node's gossip is filtered to its own state (`screen_removed`): it tells
        // nothing of the cluster.
        let tells_all = matches!(
            message,
            GossipMessage::Ack { .. } | GossipMessage::Syn { complete: true, .. }
        ) && !self.is_removed_peer(from);
        let replies = self.cluster.gossiper.handle_message(now, from, message);
        self.send_gossip(replies);
        self.apply_gossip_events(now);
        self.compare_roots(now);
        // After the events: the members it told of are in the ring now.
        self.cluster.learned |= tells_all;
    }

    /// A seed answered the transport handshake: gossip with it at once, and now and then.
    pub fn handle_seed_discovered(&mut self, now: Millis, info: MemberInfo) {
        let id = info.id.clone();
        self.handle_member_discovered(info);
        if id != *self.id() {
            self.cluster.gossiper.add_seed_contact(id.clone());
            let opening = self.cluster.gossiper.start_exchange(&id);
            self.send_gossip(vec![(id, opening)]);
        }
        self.apply_gossip_events(now);
    }

    /// Members learned by gossip join the ring; its verdicts drive liveness.
    fn apply_gossip_events(&mut self, now: Millis) {
        for event in self.cluster.gossiper.take_events() {
            match event {
                // New Merkle roots change nothing of the ring (compared in `roots.rs`).
                GossipEvent::StateChanged {
                    key: AppKey::TreeRoots,
                    ..
                } => {}
                GossipEvent::NodeJoined { node } | GossipEvent::StateChanged { node, .. } => {
                    if let Some(info) = self.cluster.gossiper.member_info(&node) {
                        self.handle_member_discovered(info);
                    }
                    self.learn_props_from(now, &node);
                    self.refresh_layout(now);
                }
                GossipEvent::NodeUp { node } | GossipEvent::NodeRestarted { node, .. } => {
                    if let Some(info) = self.cluster.gossiper.member_info(&node) {
                        self.handle_member_discovered(info);
                    }
                    self.learn_props_from(now, &node);
                    self.handle_peer_status(now, &node, PeerStatus::Up);
                }
                GossipEvent::NodeDown { node } => {
                    self.handle_peer_status(now, &node, PeerStatus::Down)
                }
                GossipEvent::NodeForgotten { node } => {
                    // It left: the transport's record must not bring it back as normal.
                    self.cluster.membership.forget(&node);
                    self.refresh_layout(now);
                }
                GossipEvent::NodeSuspect { .. } => {}
            }
        }
        self.decide_join(now);
    }

    /// Liveness as `/cluster/status` reports it: down when the transport or the failure
    /// detector says so, suspect when phi is past the suspect threshold.
    pub fn peer_liveness(&self, node: &NodeId) -> Liveness {
        if node == self.id() {
            return Liveness::Up;
        }
        match (
            self.cluster.membership.status(node),
            self.cluster.gossiper.liveness(node),
        ) {
            (PeerStatus::Down, _) | (_, Liveness::Down) => Liveness::Down,
            (_, liveness) => liveness,
        }
    }

    /// The failure detector's phi for a peer (0 for this node).
    pub fn peer_phi(&self, node: &NodeId, now: Millis) -> f64 {
        if node == self.id() {
            return 0.0;
        }
        // Never negative (a heartbeat just arrived) nor NaN, for display and metrics.
        let phi = self.cluster.gossiper.phi(node, now);
        if phi.is_finite() {
            phi.max(0.0)
        } else {
            0.0
        }
    }

    /// A node's ring state (`joining`, `normal`, `leaving`, `left`) as gossip knows it;
    /// `normal` for a member gossip has not described yet; `left` once removed.
    pub fn peer_state(&self, node: &NodeId) -> NodeStatus {
        if node == self.id() {
            return self.own_state();
        }
        if self.is_removed(node) {
            return NodeStatus::Left;
        }
        self.cluster
            .gossiper
            .member(node)
            .and_then(|state| state.status())
            .unwrap_or(NodeStatus::Normal)
    }

    /// A node's generation as gossip knows it (0 when not heard of yet).
    pub fn peer_generation(&self, node: &NodeId) -> u64 {
        self.cluster
            .gossiper
            .member(node)
            .map(|s| s.generation())
            .unwrap_or(0)
    }

    /// Gossip's counters (bytes, dropped messages, rejected generations).
    pub fn gossip_stats(&self) -> &crate::gossip::GossipStats {
        self.cluster.gossiper.stats()
    }
}
