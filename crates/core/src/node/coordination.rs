//! Coordination: the client requests this node coordinates, the peer requests they wait
//! on, their deadlines, and what it remembers to answer duplicates.

use super::{Operation, MAX_SERVED_COORDINATES};
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

impl Coordination {
    /// A new id for a request this node sends. The epoch in the high bits keeps ids unique
    /// across restarts, so a late reply to a request of a previous life can never be taken
    /// for a new one.
    pub fn next_request_id(&mut self, epoch: u32) -> RequestId {
        self.next_request += 1;
        (u64::from(epoch) << 40) | (self.next_request & ((1 << 40) - 1))
    }

    pub fn insert(&mut self, id: RequestId, op: Operation) {
        self.deadlines.insert((op.deadline(), id));
        self.operations.insert(id, op);
    }

    /// Removes an operation with its deadline and, for a read, its speculative retry (due
    /// `speculative_retry_ms` after its start, and moot now).
    pub fn remove(
        &mut self,
        id: RequestId,
        request_timeout_ms: Millis,
        speculative_retry_ms: Millis,
    ) -> Option<Operation> {
        let op = self.operations.remove(&id)?;
        self.deadlines.remove(&(op.deadline(), id));
        if let Operation::Get(get) = &op {
            let started = get.deadline - request_timeout_ms;
            self.speculations
                .remove(&(started + speculative_retry_ms, id));
        }
        Some(op)
    }

    /// Remembers the answer to a `Coordinate` served as actor (the last
    /// `MAX_SERVED_COORDINATES`), so a duplicate is answered from it.
    pub fn remember_coordinate(
        &mut self,
        served: (NodeId, RequestId),
        result: Result<Object, ReplicaError>,
    ) {
        if self.served_order.len() >= MAX_SERVED_COORDINATES {
            if let Some(oldest) = self.served_order.pop_front() {
                self.served_coordinates.remove(&oldest);
            }
        }
        self.served_order.push_back(served.clone());
        self.served_coordinates.insert(served, result);
    }
}
