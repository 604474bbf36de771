//! Anti-entropy: background comparison of replicas' Merkle trees per token range, so that
//! only the keys that differ are exchanged and both sides end with the merged version.
//!
//! # Layout
//! - [`merkle`]: the fixed-shape tree of one token range (XOR leaves, lazy inner nodes), the
//!   keyed item hash, segments, persistence.
//! - [`range_trees`]: a node's trees, one per replicated range; `record_write` on every write.
//! - [`exchange`]: the exchange, driver side ([`ExchangeDriver`]) and receiver side
//!   ([`handle_request`]), sans-IO; the [`SegmentSource`] the node implements over storage.
//! - [`memory_replica`]: an in-memory replica, the reference `SegmentSource`.
//!
//! # How the node wires it in
//! - Keep one [`RangeTrees`] built with [`ItemHasher::from_cluster_secret`] and
//!   [`RangeTrees::set_ranges`] (the ranges whose preference list holds this node); rebuild
//!   new or untrusted trees from a scan ([`RangeTrees::rebuild`]).
//! - On every change of a stored object call [`RangeTrees::record_write`] with the old and
//!   new [`crate::version::Object::digest`].
//! - To repair a range with a peer: [`ExchangeDriver::new`], `start`, send the request, feed
//!   each response to `handle_response`, merge its `writes`, send the next request, until
//!   `DriverStep::Finished`.
//! - On a request from a peer: [`handle_request`], merge its `writes`, send the response.

pub mod exchange;
pub mod memory_replica;
pub mod merkle;
pub mod range_trees;

pub use exchange::{
    handle_request, DriverOutput, DriverStep, ExchangeConfig, ExchangeDriver, ExchangeError,
    ExchangeId, ExchangeOutcome, ExchangeReport, ExchangeRequest, ExchangeResponse, ExchangeStats,
    ReceiverLimits, ReceiverOutput, Refusal, RepairObject, SegmentItem, SegmentSource,
};
pub use memory_replica::{MemoryReplica, MemoryStore};
pub use merkle::{ItemHasher, MerkleTree, Segment, ShapeError, TreeDecodeError, TreeShape};
pub use range_trees::RangeTrees;

#[cfg(test)]
mod tests;
