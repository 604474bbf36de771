//! What the node task takes in: client requests from the HTTP handlers, peer messages and
//! link events from the transport, and status queries. Its own module, so the transport
//! and the HTTP layer depend on it without depending on the node task (and the node task
//! on them).

use mendkv_core::membership::MemberInfo;
use mendkv_core::message::{ClientRequest, ClientResponse, Message};
use mendkv_core::NodeId;
use serde::Serialize;
use tokio::sync::oneshot;

/// Inputs of the node task.
pub enum Inbox {
    Client {
        request: ClientRequest,
        reply: oneshot::Sender<ClientResponse>,
    },
    Peer {
        from: NodeId,
        message: Message,
    },
    /// An outbound link finished its handshake.
    PeerUp {
        info: MemberInfo,
    },
    /// An outbound link failed or closed.
    PeerDown {
        id: NodeId,
    },
    /// A peer introduced itself (inbound handshake or seed dial).
    Discovered {
        info: MemberInfo,
    },
    /// A seed answered our dial: gossip starts with it.
    SeedDiscovered {
        info: MemberInfo,
    },
    /// A message could not be sent (link down or full).
    SendFailed {
        to: NodeId,
        message: Message,
    },
    Status {
        reply: oneshot::Sender<ClusterStatus>,
    },
    /// What the dashboard reads beside `/cluster/status` and `/metrics`.
    Dashboard {
        reply: oneshot::Sender<crate::dashboard::DashboardState>,
    },
}

/// `/cluster/status` (SPEC section 3).
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub node_id: String,
    pub cluster: String,
    pub epoch: u32,
    /// The repair byte rate this node grants now, and why (the repair controller).
    pub repair_rate_bytes_per_s: u64,
    pub repair_rate_reason: String,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub id: String,
    pub peer_address: String,
    pub http_address: String,
    pub status: &'static str,
    /// Ring state (SPEC section 7): `joining`, `normal`, `leaving` or `left`.
    pub state: &'static str,
    /// Phi-accrual suspicion; 0 until gossip's failure detector exists.
    pub phi: f64,
    pub ownership: f64,
    pub hints_pending: u64,
    /// The node's generation as gossip knows it (its epoch: grows on every restart).
    pub generation: u64,
}
