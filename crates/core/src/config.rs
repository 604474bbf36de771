//! The knobs the core reads. The server maps its TOML / env / flag configuration onto these.

use crate::hinted_handoff::HintedHandoffConfig;
use crate::quorum::ConsistencyLevel;
use crate::{Millis, NodeId};

/// When a write is made durable before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync before acknowledging; concurrent writes share one fsync (group commit).
    Always,
    /// Acknowledge once written to the engine; the driver fsyncs every `interval_ms`. A crash
    /// may lose up to that window of acknowledged writes on this replica.
    Periodic { interval_ms: Millis },
}

/// When read repair writes happen relative to the client's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadRepairMode {
    /// Repair the stale replicas that were part of the read's level before answering, so
    /// quorum reads are monotonic.
    Blocking,
    /// Answer first, repair after.
    Async,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReadRepairConfig {
    pub enabled: bool,
    pub mode: ReadRepairMode,
    /// Ask one replica for the object and the others for a digest.
    pub digest_reads: bool,
    /// Share of reads that also check (and repair) the replicas outside the level.
    pub background_chance: f64,
    /// Repair writes in flight per node; an inconsistent read beyond it is answered without
    /// repair and counted as skipped. Bounds repair load under mass divergence, at the price
    /// of slower convergence (and, for skipped blocking repairs, no monotonic-read promise).
    pub max_concurrent_repairs: usize,
}

impl Default for ReadRepairConfig {
    fn default() -> Self {
        ReadRepairConfig {
            enabled: true,
            mode: ReadRepairMode::Blocking,
            digest_reads: true,
            background_chance: 0.1,
            max_concurrent_repairs: 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub peer_address: String,
    pub http_address: String,
    pub replication_factor: usize,
    pub vnodes: u16,
    pub request_timeout_ms: Millis,
    /// A read not answered by its first replicas within this asks one more (speculative
    /// retry), so one slow replica does not make quorum reads time out.
    pub speculative_retry_ms: Millis,
    /// Dynamo's sloppy quorum: a write that cannot reach a replica goes to the next live node
    /// on the ring, which keeps it as a hint and counts toward `w`.
    pub sloppy_quorum: bool,
    pub default_read: ConsistencyLevel,
    pub default_write: ConsistencyLevel,
    pub fsync: FsyncPolicy,
    pub max_value_bytes: usize,
    /// Gossip rounds and the phi-accrual failure detector.
    pub gossip: crate::gossip::GossipConfig,
    /// Bound on client requests in flight at this coordinator; beyond it requests are refused.
    pub max_pending_requests: usize,
    pub read_repair: ReadRepairConfig,
    pub hinted_handoff: HintedHandoffConfig,
    pub anti_entropy: crate::anti_entropy::AntiEntropyConfig,
    /// When foreground stress pauses repair work.
    pub circuit_breaker: crate::control::BreakerConfig,
    /// How fast repair may go now, from foreground load (within floor and ceiling).
    pub repair_controller: crate::control::ControllerConfig,
    /// Key of the Merkle trees' item hash: the cluster secret, so outsiders cannot choose
    /// keys that collide in the trees.
    pub tree_hash_secret: Vec<u8>,
    /// A node that starts without an epoch record waits to hear from a peer what epoch it
    /// ran under before it coordinates writes (set when it has seeds to ask).
    pub learn_epoch_from_peers: bool,
    /// Properties of buckets whose properties were never set (`[buckets]`).
    pub bucket_defaults: crate::bucket::BucketProps,
    /// Buckets that are `lww` while their properties were never set, whatever
    /// `bucket_defaults` says: the Redis protocol's buckets (SPEC section 9). Every node of a
    /// cluster should list the same ones (an object already LWW stays LWW either way).
    pub lww_default_buckets: std::collections::BTreeSet<String>,
    /// Seed of the node's random choices (background repair, ...); the simulator sets it
    /// from its run seed, the server from the OS.
    pub rng_seed: u64,
}

impl NodeConfig {
    pub fn new(node_id: impl AsRef<str>) -> Self {
        NodeConfig {
            node_id: NodeId::new(node_id),
            peer_address: String::new(),
            http_address: String::new(),
            replication_factor: 3,
            vnodes: 16,
            request_timeout_ms: 2000,
            speculative_retry_ms: 200,
            sloppy_quorum: false,
            default_read: ConsistencyLevel::Quorum,
            default_write: ConsistencyLevel::Quorum,
            fsync: FsyncPolicy::Always,
            max_value_bytes: 1 << 20,
            gossip: crate::gossip::GossipConfig::default(),
            max_pending_requests: 65_536,
            read_repair: ReadRepairConfig::default(),
            hinted_handoff: HintedHandoffConfig::default(),
            anti_entropy: crate::anti_entropy::AntiEntropyConfig::default(),
            circuit_breaker: crate::control::BreakerConfig::default(),
            repair_controller: crate::control::ControllerConfig::default(),
            tree_hash_secret: b"mendkv".to_vec(),
            learn_epoch_from_peers: false,
            bucket_defaults: crate::bucket::BucketProps::default(),
            lww_default_buckets: std::collections::BTreeSet::new(),
            rng_seed: 0,
        }
    }
}
