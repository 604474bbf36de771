//! What nodes say to each other (peer messages), and what clients ask of a node.
//!
//! Peer messages carry the request id of the coordinator that sent them; replies echo it,
//! so many requests share one connection. Their binary encoding lives in the `wire` crate.

use crate::anti_entropy::{ExchangeRequest, ExchangeResponse, RepairObject};
use crate::quorum::ConsistencyLevel;
use crate::version::{CausalContext, Object, Value};
use crate::NodeId;
use serde::{Deserialize, Serialize};

/// Unique per coordinating node.
pub type RequestId = u64;

/// Why a replica could not serve a peer request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaError {
    Storage(String),
    /// The request was refused as invalid (a bug in the sender, or a hostile peer).
    Invalid(String),
    /// The replica cannot serve this now (its epoch is unconfirmed); another may.
    NotReady(String),
    /// The write would exceed the bucket's `max_siblings` (the client gets 409).
    TooManySiblings(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Read this replica's object for a key.
    Read {
        request: RequestId,
        bucket: String,
        key: Vec<u8>,
    },
    ReadReply {
        request: RequestId,
        result: Result<Option<Object>, ReplicaError>,
    },
    /// Only the digest of this replica's object (`read_repair::absent_digest` when absent).
    ReadDigest {
        request: RequestId,
        bucket: String,
        key: Vec<u8>,
    },
    ReadDigestReply {
        request: RequestId,
        result: Result<u64, ReplicaError>,
    },
    /// A read repair: merge this object into the local one.
    RepairWrite {
        request: RequestId,
        bucket: String,
        key: Vec<u8>,
        object: Object,
    },
    RepairWriteReply {
        request: RequestId,
        result: Result<(), ReplicaError>,
    },
    /// Coordinate a client write as the actor: apply it to the local object with a new dot
    /// and answer with the result (sent by a node that is not a replica of the key).
    Coordinate {
        request: RequestId,
        bucket: String,
        key: Vec<u8>,
        context: CausalContext,
        value: Value,
    },
    CoordinateReply {
        request: RequestId,
        result: Result<Object, ReplicaError>,
    },
    /// Merge this object into the local one (and make it durable before answering).
    Replicate {
        request: RequestId,
        bucket: String,
        key: Vec<u8>,
        object: Object,
    },
    ReplicateReply {
        request: RequestId,
        result: Result<(), ReplicaError>,
    },
    /// Sloppy quorum: keep this object as a hint for `intended` (answered by a
    /// `ReplicateReply` once the hint is durable).
    HintedWrite {
        request: RequestId,
        intended: NodeId,
        bucket: String,
        key: Vec<u8>,
        object: Object,
    },
    /// Hinted writes replayed to the replica they were meant for.
    HintBatch {
        request: RequestId,
        hints: Vec<RepairObject>,
    },
    /// Sent once every hint of the batch is durable on the replica.
    HintBatchReply {
        request: RequestId,
        result: Result<(), ReplicaError>,
    },
    /// One step of an anti-entropy exchange (driver -> receiver).
    AntiEntropy {
        request: ExchangeRequest,
    },
    AntiEntropyReply {
        response: ExchangeResponse,
    },
    /// Purge these tombstones (exact versions): the sender confirmed every replica holds them.
    Reap {
        range: crate::ring::TokenRange,
        items: Vec<(String, Vec<u8>, u64)>,
    },
    /// Gossip: membership, application state and heartbeats (Scuttlebutt).
    Gossip(crate::gossip::GossipMessage),
}

impl Message {
    /// The request id of a request message; replies and gossip have none.
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            Message::Read { request, .. }
            | Message::ReadDigest { request, .. }
            | Message::RepairWrite { request, .. }
            | Message::Coordinate { request, .. }
            | Message::Replicate { request, .. }
            | Message::HintBatch { request, .. }
            | Message::HintedWrite { request, .. } => Some(*request),
            _ => None,
        }
    }

    /// For a request whose successful answer acknowledges durability: the key its answer
    /// carries (see [`Message::durable_answer`]).
    pub fn durable_request(&self) -> Option<DurableAnswerKey> {
        match self {
            Message::RepairWrite { request, .. }
            | Message::Coordinate { request, .. }
            | Message::Replicate { request, .. }
            | Message::HintBatch { request, .. }
            | Message::HintedWrite { request, .. } => Some(DurableAnswerKey::Request(*request)),
            Message::AntiEntropy { request } => {
                Some(DurableAnswerKey::Exchange(request.exchange.0, request.seq))
            }
            _ => None,
        }
    }

    /// For an answer to a [`Message::durable_request`]: its key, and whether it claims the
    /// request's writes are durable (a success) rather than reporting an error.
    pub fn durable_answer(&self) -> Option<(DurableAnswerKey, bool)> {
        match self {
            Message::RepairWriteReply { request, result }
            | Message::ReplicateReply { request, result }
            | Message::HintBatchReply { request, result } => {
                Some((DurableAnswerKey::Request(*request), result.is_ok()))
            }
            Message::CoordinateReply { request, result } => {
                Some((DurableAnswerKey::Request(*request), result.is_ok()))
            }
            Message::AntiEntropyReply { response } => Some((
                DurableAnswerKey::Exchange(response.exchange.0, response.seq),
                !matches!(
                    response.body,
                    crate::anti_entropy::exchange::ResponseBody::Refused(_)
                ),
            )),
            _ => None,
        }
    }

    /// True for an answer to another message (the rest are requests and gossip).
    pub fn is_reply(&self) -> bool {
        matches!(
            self,
            Message::ReadReply { .. }
                | Message::ReadDigestReply { .. }
                | Message::RepairWriteReply { .. }
                | Message::CoordinateReply { .. }
                | Message::ReplicateReply { .. }
                | Message::HintBatchReply { .. }
                | Message::AntiEntropyReply { .. }
        )
    }

    /// The traffic class of `mendkv_network_bytes_total{class}`.
    pub fn class(&self) -> &'static str {
        match self {
            Message::RepairWrite { .. } | Message::RepairWriteReply { .. } => "read_repair",
            Message::Gossip(_) => "gossip",
            Message::HintBatch { .. }
            | Message::HintBatchReply { .. }
            | Message::HintedWrite { .. } => "hints",
            Message::AntiEntropy { .. }
            | Message::AntiEntropyReply { .. }
            | Message::Reap { .. } => "anti_entropy",
            _ => "replication",
        }
    }
}

/// Matches a write request with the answer that acknowledges it (for checkers: the
/// simulator audits that no such answer leaves before its writes are synced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DurableAnswerKey {
    Request(RequestId),
    /// An anti-entropy exchange id and request sequence number.
    Exchange(u64, u32),
}

/// Per-driver id of a client request, echoed in the reply.
pub type ClientRequestId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest {
    Get {
        bucket: String,
        key: Vec<u8>,
        level: ConsistencyLevel,
    },
    Put {
        bucket: String,
        key: Vec<u8>,
        context: CausalContext,
        value: Value,
        level: ConsistencyLevel,
    },
    /// Without a context, the coordinator first reads at the same level and deletes what it
    /// saw (as Riak does), so a plain DELETE deletes.
    Delete {
        bucket: String,
        key: Vec<u8>,
        context: Option<CausalContext>,
        level: ConsistencyLevel,
    },
    /// This node's own stored object, no coordination.
    GetLocal { bucket: String, key: Vec<u8> },
    /// Start an anti-entropy run over every range this node replicates.
    StartRepair,
    /// Start an anti-entropy run of one bucket's keys (`repair --bucket`).
    StartBucketRepair { bucket: String },
    /// Where a repair run stands.
    RepairStatus { id: u64 },
    /// A bucket's properties (defaults for a bucket never set).
    GetBucketProps { bucket: String },
    /// Changes a bucket's properties; every node applies it within seconds.
    SetBucketProps {
        bucket: String,
        update: crate::bucket::PropsUpdate,
    },
    /// This node starts leaving the cluster (`mendkv decommission`).
    Decommission,
    /// A dead node's ranges are re-replicated and it is removed (`mendkv remove-node`).
    RemoveNode { node: NodeId },
    /// Where a node's cluster change stands.
    ChangeStatus { node: NodeId },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientResponse {
    /// The merged object of a read (may be deleted or empty: the HTTP layer answers 404).
    Object(Object),
    /// A write was stored at the requested level; the context of the new object.
    Written {
        context: CausalContext,
    },
    /// Fewer replicas could answer than the level needs.
    Unavailable {
        needed: usize,
        answered: usize,
    },
    /// The level was not met before `request_timeout_ms`.
    Timeout {
        needed: usize,
        answered: usize,
    },
    /// The node's own object (GetLocal).
    Local(Option<Object>),
    /// The local storage failed.
    StorageFailed(String),
    /// This node's disk is full and the write could not be stored at its level elsewhere
    /// (SPEC's 507 `insufficient_storage`); the node recovers by itself once space returns.
    InsufficientStorage(String),
    /// The request breaks a rule (a 400): nothing was changed.
    Invalid(String),
    /// This node cannot coordinate the request yet (a 503 with the reason).
    NotReady(String),
    /// Too many requests are in flight at this coordinator; retry later.
    Overloaded,
    /// A causal write would leave more than the bucket's `max_siblings` siblings (409
    /// `too_many_siblings`): read the key and write back with its context.
    TooManySiblings(String),
    /// A bucket's properties, or the properties just set.
    BucketProps(crate::bucket::BucketProps),
    RepairStarted {
        id: u64,
    },
    Repair(Option<crate::anti_entropy::RepairRunStatus>),
    /// Where a cluster change stands (the answer to the three membership requests).
    Change(crate::node::ChangeProgress),
    /// Refused because of the cluster's state (409 `conflict`): another change is in
    /// progress, the node is up, too few nodes would remain.
    Conflict(String),
    /// No such node (404).
    NotFound(String),
}
