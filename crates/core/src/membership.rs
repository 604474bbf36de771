//! Who is in the cluster and how to reach them, as the node uses it for the ring and the
//! transport.
//!
//! Members come from two sources: the transport handshake (a peer that dials us, or a seed
//! we dialed) and gossip (`node/gossip.rs` adds every node gossip hears of). Liveness here is
//! the union of both verdicts: the transport marks a peer down when its connection fails or
//! closes, gossip's phi-accrual detector when its heartbeats stop; either side marks it up
//! again. Members are never removed yet (no decommission).

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
