//! mendkv's protocol logic, sans-IO: no tokio, no sockets, no wall clock, no OS randomness.
//! `now` (milliseconds on the driver's monotonic clock) and a seeded RNG come in as
//! arguments, so the tokio server and the deterministic simulator drive the same code.
//!
//! # Layout
//! - [`version`]: dotted version vectors, siblings, tombstones, the opaque causal context.
//! - [`bucket`]: bucket properties; causal (DVV) and lww (HLC) resolution behind one interface.
//! - [`ring`]: tokens, virtual nodes, preference lists, token ranges.
//! - [`quorum`]: consistency levels and "have enough replicas answered?".
//! - [`coordinator`]: per-request state machines for get / put / delete.
//! - [`read_repair`]: replies in -> the merged answer and which replicas to repair.
//! - [`hinted_handoff`]: hint records, the hint queue, budgets, delivery order.
//! - [`anti_entropy`]: Merkle trees per token range, the exchange (driver side / receiver side).
//! - [`control`]: the optimisation layer: repair priority queue, rate limiter, circuit breaker.
//! - [`membership`]: who is in the cluster and who is reachable (static until gossip).
//! - [`gossip`]: endpoint state, Scuttlebutt digests and deltas, the phi-accrual failure detector.
//! - [`message`]: what nodes say to each other, and what clients ask of a node.
//! - [`request`]: validation of client input (bucket names, keys, sizes).
//! - [`node`]: the node: `handle_*` (messages, client requests, ticks) -> `poll_action`.
//! - [`storage`]: the small Storage trait and an in-memory implementation.
//! - [`config`]: every knob the core reads, with its default.

pub mod anti_entropy;
pub mod bucket;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod gossip;
pub mod hinted_handoff;
pub mod membership;
pub mod message;
pub mod node;
pub mod quorum;
pub mod read_repair;
pub mod request;
pub mod ring;
pub mod storage;
pub mod version;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// A node's unique, human-chosen id (e.g. `node1`). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn new(id: impl AsRef<str>) -> Self {
        NodeId(Arc::from(id.as_ref()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Milliseconds on the driver's monotonic clock (virtual time in the simulator).
pub type Millis = u64;
