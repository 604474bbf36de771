//! Coordination: the client requests this node coordinates, the peer requests they wait
//! on, their deadlines, and what it remembers to answer duplicates.

use super::Operation;
use crate::message::{ClientRequestId, ReplicaError, RequestId};
use crate::version::Object;
use crate::{Millis, NodeId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

#[derive(Debug, Default)]
pub(super) struct Coordination {
    /// Numbers this node's peer requests (with the epoch in the high bits).
    pub next_request: u64,
    pub operations: BTreeMap<RequestId, Operation>,
    pub deadlines: BTreeSet<(Millis, RequestId)>,
    /// When reads ask one more replica if still unanswered (see `speculative_retry_ms`).
    pub speculations: BTreeSet<(Millis, RequestId)>,
    /// Recent `Coordinate` requests served as actor, so duplicates are answered, not
    /// re-applied.
    pub served_coordinates: BTreeMap<(NodeId, RequestId), Result<Object, ReplicaError>>,
    pub served_order: VecDeque<(NodeId, RequestId)>,
    /// Start times of client requests in flight, for the breaker's latency samples.
    pub client_started: BTreeMap<ClientRequestId, Millis>,
    /// Recent reply latency per peer (moving average), to pick data replicas.
    pub peer_latency_ms: BTreeMap<NodeId, Millis>,
}
