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
    /// Per replica pair (this node, peer): the known repair debt and its ETA at that rate.
    pub repair_debt: Vec<mendkv_core::node::RepairDebt>,
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
    /// Its cluster change in progress (join, decommission, removal): phase and streaming
    /// progress as this node sees it; absent when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<mendkv_core::node::ChangeProgress>,
}

/// Why the node task gave no answer to a client request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// The node task is gone (shutdown).
    ShuttingDown,
    /// No answer within the request timeout plus a second (the node always answers by
    /// its own deadline: this is only a safety net).
    TimedOut,
}

/// Hands a client request to the node task and waits for its answer. Both front ends
/// (HTTP, RESP) go through here.
pub async fn ask(
    inbox: &tokio::sync::mpsc::Sender<Inbox>,
    request: ClientRequest,
    request_timeout: std::time::Duration,
) -> Result<ClientResponse, NoAnswer> {
    let (reply, answer) = oneshot::channel();
    inbox
        .send(Inbox::Client { request, reply })
        .await
        .map_err(|_| NoAnswer::ShuttingDown)?;
    match tokio::time::timeout(request_timeout + std::time::Duration::from_secs(1), answer).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(_)) => Err(NoAnswer::ShuttingDown),
        Err(_) => Err(NoAnswer::TimedOut),
    }
}

/// A coordinated request that failed, as every front end reports it: SPEC section 3's
/// error code (HTTP sends it as is, RESP upper-cased), the message, and the outcome label
/// of `mendkv_requests_total` / `mendkv_resp_commands_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRequest {
    pub code: &'static str,
    pub message: String,
    pub outcome: &'static str,
}

impl FailedRequest {
    /// The failure a node's answer stands for (any answer that is not a success).
    pub fn from_response(response: ClientResponse) -> Self {
        let failed = |code, message: String, outcome| FailedRequest {
            code,
            message,
            outcome,
        };
        match response {
            ClientResponse::Unavailable { needed, answered } => failed(
                "unavailable",
                format!("needed {needed} replicas, {answered} answered"),
                "unavailable",
            ),
            ClientResponse::Timeout { needed, answered } => failed(
                "timeout",
                format!("needed {needed} replicas, {answered} answered before the timeout"),
                "timeout",
            ),
            ClientResponse::Overloaded => failed(
                "unavailable",
                "too many requests in flight at this node; retry later".into(),
                "overloaded",
            ),
            ClientResponse::Invalid(message) => failed("bad_request", message, "bad_request"),
            ClientResponse::TooManySiblings(message) => {
                failed("too_many_siblings", message, "too_many_siblings")
            }
            ClientResponse::NotReady(message) => failed("unavailable", message, "unavailable"),
            ClientResponse::InsufficientStorage(message) => {
                failed("insufficient_storage", message, "insufficient_storage")
            }
            ClientResponse::StorageFailed(message) => {
                failed("internal", format!("storage failed: {message}"), "error")
            }
            ClientResponse::Conflict(message) => failed("conflict", message, "conflict"),
            ClientResponse::NotFound(message) => failed("not_found", message, "not_found"),
            other => failed("internal", format!("unexpected answer {other:?}"), "error"),
        }
    }

    /// The failure when the node task gave no answer.
    pub fn from_no_answer(no_answer: NoAnswer) -> Self {
        match no_answer {
            NoAnswer::ShuttingDown => FailedRequest {
                code: "unavailable",
                message: "node is shutting down".into(),
                outcome: "unavailable",
            },
            NoAnswer::TimedOut => FailedRequest {
                code: "timeout",
                message: "no answer from the node in time".into(),
                outcome: "timeout",
            },
        }
    }
}
