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
//! # Choices
//! - **One tree per replicated range**, all of one shape (default 4096 leaves, fanout 16, so
//!   three levels above the leaves and 34 KiB a tree). With 16 vnodes and RF 3 a node keeps
//!   about 48 trees: 1.6 MiB, whatever the number of keys. A tree per range (not per peer
//!   pair) is compared with each other replica of the range, and a ring change only touches
//!   the ranges that moved. More leaves make a small divergence cheaper to locate (fewer
//!   keys per mismatched segment) at 8 bytes a leaf; the in-sync comparison stays one root
//!   per range either way.
//! - **Leaves are XOR of item hashes** (Riak's Tictac trees): a write is one delta on one
//!   leaf plus a few dirty bits; inner nodes are recomputed lazily, from their children
//!   only, when an exchange reads them. The data is never scanned to compare, only to list
//!   the items of mismatched segments (a token-range scan) or to rebuild a tree.
//! - **Stateless receiver**: every request names range, shape and salt, so a peer that
//!   vanishes mid-exchange costs the receiver nothing and needs no session timeout.
//! - **Short salted hashes below the root** (2 bytes per node, 3 per item by default): a
//!   truncated hash can hide a difference but never invent one, so no key moves that is not
//!   different; the full 64-bit root is compared at the start and at the end (`Verify`), and
//!   a hidden difference costs another pass with a new salt.
//! - **Coded reconciliation below mismatched nodes** ([`coded`], rateless IBLTs after Yang
//!   et al., SIGCOMM 2024): once a level says roughly how many keys differ, the driver gets
//!   coded symbols of the items below the mismatched nodes instead of descending, so locating
//!   a difference costs about 1.4-2 five-byte symbols instead of a level of node hashes per
//!   difference. It trades bytes for scanning (every item below the coded nodes, on both
//!   sides); `coded_max_segments` and `coded_max_items` bound the scan, and
//!   `coded_max_segments: 0` turns it off.
//! - **Coding starts in the first request** (`CompareCoded`): the driver sends its level-1
//!   short hashes with its root, so the receiver, which then knows which children differ,
//!   answers with the first symbols below them in the same round trip (or with the
//!   differing children alone when it declines: every child differs, or the driver's
//!   segment or item bounds are exceeded, its scan stopping at the item bound). One
//!   request and round trip fewer per divergent range, for 32 bytes more per range in
//!   sync (which gossip's roots mostly spare an exchange at all).
//! - **The driver scans once per coded attempt**: it keeps its own short hashes (and their
//!   segments) for every extension, and maps decoded items back by scanning only their
//!   segments. Below a level deeper than 1 it scans before asking anything, and descends
//!   when it holds more than `coded_max_items`.
//! - **Nodes keep coding off** ([`ExchangeConfig::bounded_coding`] is the bounded
//!   alternative): the bytes it saves cost whole-object reads from storage, ~1,000 bytes read
//!   per byte saved at 0.1% divergence (docs/benchmarks.md, 2026-12-02 evening).
//! - **Wants before pushes**: the driver first pulls what only the receiver has, then pushes
//!   what only it has, skipping pushes the pulled version already covers.
//!
//! # Measured (`cargo run --release -p mendkv-core --example anti_entropy_bench`)
//! Two replicas of 1,000,000 keys, 100-byte values, 48 ranges: in sync, a full comparison is
//! 48 round trips, ~4 KB (1.9 KB without coding in the first request) and well under a
//! millisecond, with no segment scanned. At 0.1% of keys divergent, exactly the divergent
//! keys move, and locating them costs ~86 bytes per divergent key with item lists (3-byte
//! item hashes; 94.6 with 4), ~27 with coded reconciliation from the first request in 214
//! round trips for 48 ranges (the moved objects' own keys and causal contexts add ~100 more).
//!
//! # How the node wires it in
//! - Keep one [`RangeTrees`] built with [`ItemHasher::from_cluster_secret`];
//!   [`RangeTrees::set_ranges`] with [`replicated_ranges`] after every ring change, and
//!   rebuild new or untrusted trees from a scan ([`RangeTrees::rebuild`]). Persist with
//!   [`RangeTrees::encode_tree`] only when the tree matches durable data (clean shutdown);
//!   after a crash rebuild, since un-synced writes may be lost from the data but not from a
//!   persisted tree, or the reverse.
//! - On every change of a stored object (client write, replication, read repair, hint,
//!   anti-entropy) call [`RangeTrees::record_write`] with the old and new
//!   [`crate::version::Object::digest`].
//! - To repair a range with a peer ([`repair_targets`], ordered by
//!   [`crate::control::RepairQueue`], paced by [`crate::control::TokenBucket`], paused by
//!   [`crate::control::CircuitBreaker`]): [`ExchangeDriver::new`], `start`, send the request,
//!   feed each response to `handle_response`, merge its `writes` before the next response,
//!   send the next request, until `DriverStep::Finished`. On a timeout call `abort`.
//! - On a request from a peer: [`handle_request`], merge its `writes`, send the response.

pub mod coded;
pub mod exchange;
pub mod memory_replica;
pub mod merkle;
pub mod range_trees;
pub mod repair_run;

pub use exchange::{
    handle_request, DriverOutput, DriverStep, ExchangeConfig, ExchangeDriver, ExchangeError,
    ExchangeId, ExchangeOutcome, ExchangeReport, ExchangeRequest, ExchangeResponse, ExchangeStats,
    ReceiverLimits, ReceiverOutput, Refusal, RepairObject, SegmentItem, SegmentSource,
};
pub use memory_replica::{MemoryReplica, MemoryStore};
pub use merkle::{ItemHasher, MerkleTree, Segment, ShapeError, TreeDecodeError, TreeShape};
pub use range_trees::{repair_targets, replicated_ranges, RangeTrees};
pub use repair_run::{AntiEntropyConfig, RepairRunStatus, RunState};

#[cfg(test)]
mod tests;
