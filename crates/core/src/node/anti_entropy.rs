//! The node's anti-entropy: Merkle trees kept current on every write, exchanges with each
//! replica peer per range (scheduled by a priority queue, paced by a byte token bucket),
//! the receiver side, and operator-started repair runs (`POST /admin/repair`).

use super::Counter;
use super::{DurableReply, Node};
use crate::anti_entropy::exchange::{Refusal, ResponseBody};
use crate::anti_entropy::MerkleTree;
use crate::anti_entropy::{
    handle_request, DriverStep, ExchangeConfig, ExchangeDriver, ExchangeId, ExchangeOutcome,
    ExchangeReport, ExchangeRequest, ExchangeResponse, ExchangeStats, ReceiverLimits, RepairObject,
    SegmentItem, SegmentSource,
};
use crate::anti_entropy::{ItemHasher, RangeTrees, TreeShape};
use crate::anti_entropy::{RepairRunStatus, RunState};
use crate::config::NodeConfig;
use crate::control::BreakerState;
use crate::control::{RepairQueue, RepairQueueConfig, RepairReason};
use crate::membership::PeerStatus;
use crate::message::Message;
use crate::ring::{key_token, TokenRange};
use crate::storage::{
    scan_in_batches, scan_in_batches_until, Storage, StorageError, DEFAULT_SCAN_BATCH,
};
use crate::version::Object;
use crate::{Millis, NodeId};
use rand::Rng;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// One exchange this node drives.
#[derive(Debug)]
pub(super) struct ActiveExchange {
    pub driver: ExchangeDriver,
    pub peer: NodeId,
    pub deadline: Millis,
    pub run: Option<u64>,
    pub started_at: Millis,
    /// A one-bucket exchange (`repair --bucket`): the bucket and this side's trees of it.
    pub bucket: Option<(String, RangeTrees)>,
    /// Pulls a range this node gains in a cluster change (`membership.rs`).
    pub streaming: bool,
}

#[derive(Debug)]
pub(super) struct RepairRun {
    /// Only this bucket's keys are compared (each exchange scans its range for them).
    bucket: Option<String>,
    pending: VecDeque<(TokenRange, NodeId)>,
    in_flight: usize,
    ranges_total: u64,
    ranges_done: u64,
    failed: bool,
    stats: ExchangeStats,
    started_at: Millis,
    finished_at: Option<Millis>,
    /// Started before gossip described the cluster to this node (a node just restarted knows
    /// only itself and its seed for a gossip round or two, so its layout gives it no or only
    /// some (range, peer) pairs): the targets are taken once a peer has told it everything
    /// (`learned`) and the layout gives some, or the run fails after
    /// [`REPAIR_TARGETS_WAIT_MS`]. Such a run used to stay `running` with 0 ranges forever.
    awaiting_targets: bool,
}

/// How long a repair run started before the layout was known waits for it before failing.
const REPAIR_TARGETS_WAIT_MS: Millis = 30_000;

/// A tombstone named for reaping: bucket, key and the digest of the exact version.
pub type ReapItem = (String, Vec<u8>, u64);

/// Tombstones remembered per range between reaping passes (the rest wait for a later pass).
const MAX_REAP_CANDIDATES: usize = 10_000;

/// Exchange durations kept until the driver drains them.
const MAX_DURATION_SAMPLES: usize = 4096;

/// Objects scanned into building trees at once when the ranges change (at start, say), so
/// a small node has its trees at once; the rest are scanned in the background. A few
/// milliseconds of a start.
pub(super) const TREE_BUILD_AT_ONCE: usize = 8_192;

/// Objects scanned into building trees per tick, and per scan call.
pub(super) const TREE_BUILD_PER_TICK: usize = 1024;
const TREE_BUILD_BATCH: usize = DEFAULT_SCAN_BATCH;

/// How soon the next tick comes while trees are building (the node serves in between).
pub(super) const TREE_BUILD_TICK_MS: Millis = 2;

/// Repair runs remembered for status queries.
const MAX_REPAIR_RUNS: usize = 64;

/// The node's storage seen as anti-entropy's segment source.
struct StorageSource<'a, S: Storage>(&'a S);

impl<S: Storage> SegmentSource for StorageSource<'_, S> {
    fn segment_items(&self, tokens: TokenRange) -> Result<Vec<SegmentItem>, StorageError> {
        // One segment's keys (digests only, never whole objects), scanned in bounded batches.
        let mut items = Vec::new();
        scan_in_batches(self.0, tokens, DEFAULT_SCAN_BATCH, |bucket, key, object| {
            items.push(SegmentItem {
                digest: object.digest(),
                bucket,
                key,
            })
        })?;
        Ok(items)
    }

    fn object(&self, bucket: &str, key: &[u8]) -> Result<Option<Object>, StorageError> {
        self.0.get(bucket, key)
    }

    fn segment_objects(
        &self,
        tokens: TokenRange,
        each: &mut dyn FnMut(RepairObject) -> bool,
    ) -> Result<(), StorageError> {
        scan_objects_until(self.0, tokens, None, each)
    }
}

/// Hands the objects of `tokens` (of `bucket` alone, when given) to `each`, scanned in
/// bounded batches, until it returns false.
fn scan_objects_until<S: Storage>(
    storage: &S,
    tokens: TokenRange,
    bucket: Option<&str>,
    each: &mut dyn FnMut(RepairObject) -> bool,
) -> Result<(), StorageError> {
    scan_in_batches_until(storage, tokens, DEFAULT_SCAN_BATCH, |b, key, object| {
        bucket.is_some_and(|wanted| wanted != b)
            || each(RepairObject {
                bucket: b,
                key,
                object,
            })
    })
}

/// The node's storage restricted to one bucket, for one-bucket exchanges.
struct BucketSource<'a, S: Storage> {
    storage: &'a S,
    bucket: &'a str,
}

impl<S: Storage> SegmentSource for BucketSource<'_, S> {
    fn segment_items(&self, tokens: TokenRange) -> Result<Vec<SegmentItem>, StorageError> {
        let mut items = Vec::new();
        scan_in_batches(
            self.storage,
            tokens,
            DEFAULT_SCAN_BATCH,
            |bucket, key, object| {
                if bucket == self.bucket {
                    items.push(SegmentItem {
                        digest: object.digest(),
                        bucket,
                        key,
                    })
                }
            },
        )?;
        Ok(items)
    }

    fn object(&self, bucket: &str, key: &[u8]) -> Result<Option<Object>, StorageError> {
        if bucket != self.bucket {
            return Ok(None);
        }
        self.storage.get(bucket, key)
    }

    fn segment_objects(
        &self,
        tokens: TokenRange,
        each: &mut dyn FnMut(RepairObject) -> bool,
    ) -> Result<(), StorageError> {
        scan_objects_until(self.storage, tokens, Some(self.bucket), each)
    }
}

/// The known repair debt of one replica pair (this node, `peer`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RepairDebt {
    pub peer: NodeId,
    pub mismatched_leaves: u64,
    /// Bytes the debt should take to repair, from the bytes recent exchanges moved per
    /// mismatched leaf; none before any exchange found a mismatch.
    pub estimated_bytes: Option<u64>,
    /// `estimated_bytes` at the repair rate granted now.
    pub eta_ms: Option<Millis>,
}

/// Anti-entropy's state: the trees kept current on every write, the exchanges this node
/// drives, their schedule, operator runs, and what tombstone reaping remembers.
#[derive(Debug)]
pub(super) struct AntiEntropyState {
    pub trees: RangeTrees,
    pub exchanges: BTreeMap<ExchangeId, ActiveExchange>,
    pub repair_queue: RepairQueue<(TokenRange, NodeId)>,
    pub repair_runs: BTreeMap<u64, RepairRun>,
    pub next_run: u64,
    /// Mismatched leaves the last whole-range exchange of each (range, peer) found and did
    /// not mend (a converged exchange clears its entry): the known repair debt.
    pub repair_debt: BTreeMap<(TokenRange, NodeId), u64>,
    /// The nodes gaining each range in the active change, which pull it
    /// (`Layout::gaining_nodes`), recomputed with the trees when the layout changes.
    pub gaining_nodes: BTreeMap<TokenRange, BTreeSet<NodeId>>,
    /// Bytes an exchange moved per mismatched leaf, averaged over recent exchanges (for the
    /// debt's byte estimate and ETA); none until one found a mismatch.
    pub bytes_per_leaf: Option<f64>,
    /// Ranges marked for priority anti-entropy (dropped or expired hints).
    pub repair_marks: BTreeSet<TokenRange>,
    pub repair_marks_overflowed: bool,
    /// Merkle roots on gossip (`roots.rs`).
    pub roots: super::roots::RootsState,
    /// Last converged exchange per (range, peer), and tombstone snapshots per range, for
    /// tombstone reaping.
    pub converged_at: BTreeMap<(TokenRange, NodeId), Millis>,
    pub reap_snapshots: BTreeMap<TokenRange, (Millis, BTreeSet<ReapItem>)>,
    /// When the next tree verification is due, and which range it takes.
    pub next_verify_at: Millis,
    pub verify_cursor: usize,
    /// While the repair byte budget is spent, anti-entropy waits until this time.
    pub repair_throttled_until: Millis,
    /// Durations of finished exchanges, drained by the driver into a histogram.
    pub exchange_durations_ms: VecDeque<Millis>,
    /// Ranges whose tree a verification found disagreeing with the data, drained by the
    /// driver into its log (bounded: past [`MAX_PENDING_MISMATCHES`] only the counter grows).
    pub tree_mismatches: VecDeque<TokenRange>,
}

/// Mismatched ranges kept for the driver's log between two drains.
const MAX_PENDING_MISMATCHES: usize = 64;

impl AntiEntropyState {
    pub fn new(config: &NodeConfig, now: Millis) -> Self {
        AntiEntropyState {
            trees: RangeTrees::new(
                ItemHasher::from_cluster_secret(&config.tree_hash_secret),
                TreeShape::DEFAULT,
            ),
            exchanges: BTreeMap::new(),
            repair_queue: RepairQueue::new(RepairQueueConfig {
                interval_ms: config.anti_entropy.interval_ms,
                ..RepairQueueConfig::default()
            }),
            repair_runs: BTreeMap::new(),
            next_run: 0,
            repair_debt: BTreeMap::new(),
            gaining_nodes: BTreeMap::new(),
            bytes_per_leaf: None,
            repair_marks: BTreeSet::new(),
            repair_marks_overflowed: false,
            roots: super::roots::RootsState::default(),
            converged_at: BTreeMap::new(),
            reap_snapshots: BTreeMap::new(),
            next_verify_at: now + config.anti_entropy.verify_interval_ms,
            verify_cursor: 0,
            repair_throttled_until: 0,
            exchange_durations_ms: VecDeque::new(),
            tree_mismatches: VecDeque::new(),
        }
    }
}

impl<S: Storage> Node<S> {
    /// Makes the trees match the ring: ranges this node no longer replicates are dropped,
    /// new ones are built from a scan of their objects (counted in `tree_rebuilds` when
    /// done). Up to [`TREE_BUILD_AT_ONCE`] objects are scanned right away; bigger trees go
    /// on building in the background, [`TREE_BUILD_PER_TICK`] objects a tick, so a node with
    /// much data serves at once after a start. Anti-entropy waits for a range's tree.
    pub(super) fn align_trees(&mut self) {
        let ranges = self.membership.layout.replicated_ranges(self.id());
        // The new ranges are marked building; advance_tree_builds scans them.
        self.anti_entropy.trees.set_ranges_building(ranges);
        self.advance_tree_builds(TREE_BUILD_AT_ONCE);
        let targets = self.membership.layout.repair_targets(self.id());
        self.anti_entropy.repair_queue.set_targets(targets);
        self.anti_entropy.gaining_nodes = self.membership.layout.gaining_nodes();
    }

    /// Whether the scheduled exchange of `range` with `peer` waits for the active change:
    /// one of the two gains the range and pulls it from a quorum of its old replicas (the
    /// pull is what makes the gaining node whole). Running the exchange as well would send
    /// the same objects again while the gaining node's tree is still empty: the join
    /// benchmark's new node received 1.65M objects for the ~0.77M it owns that way, and the
    /// duplicates cost the foreground load. It runs on a retry once the change is over.
    fn exchange_waits_for_streaming(&self, range: TokenRange, peer: &NodeId) -> bool {
        self.anti_entropy
            .gaining_nodes
            .get(&range)
            .is_some_and(|gaining| gaining.contains(peer) || gaining.contains(self.id()))
    }

    /// Scans up to about `budget` objects into the trees still being built, one bounded
    /// batch at a time. A storage error leaves the build where it was, for the next tick.
    pub(super) fn advance_tree_builds(&mut self, budget: usize) {
        let mut left = budget;
        while left > 0 {
            let Some((range, after)) = self.anti_entropy.trees.next_build() else {
                return;
            };
            let batch = match self.storage.scan_range_batch(
                range,
                after.as_ref(),
                left.min(TREE_BUILD_BATCH),
            ) {
                Ok(batch) => batch,
                Err(_) => {
                    self.stats.increment(Counter::StorageErrors);
                    return;
                }
            };
            left = left.saturating_sub(batch.rows.len().max(1));
            if !batch.rows.is_empty() && !self.membership.has_data {
                self.note_has_data();
            }
            let done = batch.resume.is_none();
            self.anti_entropy.trees.add_built(
                range,
                batch
                    .rows
                    .iter()
                    .map(|(b, k, o)| (b.as_str(), k.as_slice(), o.digest())),
                batch.resume,
            );
            if done {
                self.stats.increment(Counter::TreeRebuilds);
            }
        }
    }

    /// Verifies the next range's tree against its data when due: a fresh tree built from a
    /// scan must have the maintained tree's root. A mismatch (a bug, or a write that bypassed
    /// the upkeep) replaces the tree and is counted.
    pub(super) fn verify_next_tree(&mut self, now: Millis) {
        if now < self.anti_entropy.next_verify_at {
            return;
        }
        self.anti_entropy.next_verify_at = now + self.config.anti_entropy.verify_interval_ms.max(1);
        let ranges: Vec<TokenRange> = self.anti_entropy.trees.ranges().collect();
        let Some(&range) = ranges.get(self.anti_entropy.verify_cursor % ranges.len().max(1)) else {
            return;
        };
        self.anti_entropy.verify_cursor += 1;
        if !self.anti_entropy.trees.is_ready(range) {
            // Still being built from a scan: nothing to verify yet.
            return;
        }
        let hasher = *self.anti_entropy.trees.hasher();
        let mut fresh = MerkleTree::new(range, self.anti_entropy.trees.shape());
        let mut tombstones = BTreeSet::new();
        let scanned = scan_in_batches(
            &self.storage,
            range,
            DEFAULT_SCAN_BATCH,
            |bucket, key, object| {
                let digest = object.digest();
                if let Some(segment) = fresh.segment_of(key_token(&bucket, &key)) {
                    fresh.update(segment, None, Some(hasher.item_hash(&bucket, &key, digest)));
                }
                if !object.is_empty()
                    && object.is_deleted()
                    && tombstones.len() < MAX_REAP_CANDIDATES
                {
                    tombstones.insert((bucket, key, digest));
                }
            },
        );
        if scanned.is_err() {
            self.stats.increment(Counter::StorageErrors);
            return;
        }
        let Some(tree) = self.anti_entropy.trees.tree_mut(range) else {
            return;
        };
        if tree.root() == fresh.root() {
            self.stats.increment(Counter::TreeChecksOk);
        } else {
            self.stats.increment(Counter::TreeChecksMismatch);
            if self.anti_entropy.tree_mismatches.len() < MAX_PENDING_MISMATCHES {
                self.anti_entropy.tree_mismatches.push_back(range);
            }
            let _ = self.anti_entropy.trees.insert_tree(fresh);
        }
        self.consider_reaping(now, range, tombstones);
    }

    /// Tombstone reaping, on the scan the verification just made. A tombstone is purged when
    /// (1) it was here, unchanged, at a snapshot of the range taken at least the hint TTL ago
    /// (so every hint of an older write has expired and cannot bring the value back), and
    /// (2) an exchange with every replica peer of the range has converged since that snapshot
    /// (so every replica held it). The reaper tells the peers to purge the same tombstones,
    /// so anti-entropy does not copy them back.
    fn consider_reaping(&mut self, now: Millis, range: TokenRange, tombstones: BTreeSet<ReapItem>) {
        let age_needed = self.config.hinted_handoff.ttl_ms + 2 * self.config.request_timeout_ms;
        let Some((taken_at, candidates)) = self.anti_entropy.reap_snapshots.get(&range) else {
            self.anti_entropy
                .reap_snapshots
                .insert(range, (now, tombstones));
            return;
        };
        let age = now.saturating_sub(*taken_at);
        let taken_at = *taken_at;
        // Nine tenths of the way: the exchanges still missing are scheduled first, so the
        // tombstones can go when they come of age instead of a whole interval later.
        if age < age_needed - age_needed / 10 || candidates.is_empty() {
            return;
        }
        // While a cluster change is active the replica set of the range is moving: no
        // reaping until it settles (a departed node is not a replica that must confirm).
        if self.membership.layout.active().is_some() {
            return;
        }
        let peers: Vec<NodeId> = self
            .membership
            .layout
            .repair_targets(self.id())
            .into_iter()
            .filter(|(r, _)| *r == range)
            .map(|(_, peer)| peer)
            .collect();
        let unconfirmed: Vec<NodeId> = peers
            .iter()
            .filter(|peer| {
                self.anti_entropy
                    .converged_at
                    .get(&(range, (*peer).clone()))
                    .is_none_or(|&t| t <= taken_at)
            })
            .cloned()
            .collect();
        if !unconfirmed.is_empty() {
            self.anti_entropy.repair_queue.mark_matching(
                RepairReason::ReapWaiting,
                now,
                |(r, peer)| *r == range && unconfirmed.contains(peer),
            );
            // Keep the old snapshot: its tombstones keep aging until every peer confirms.
            return;
        }
        if age < age_needed {
            return;
        }
        let mut remaining = tombstones;
        let reap: Vec<ReapItem> = candidates.intersection(&remaining).cloned().collect();
        for (bucket, key, digest) in &reap {
            self.reap_tombstone(bucket, key, *digest);
            remaining.remove(&(bucket.clone(), key.clone(), *digest));
        }
        if !reap.is_empty() {
            for peer in peers {
                let items = reap.clone();
                self.send(&peer, Message::Reap { range, items });
            }
        }
        self.anti_entropy
            .reap_snapshots
            .insert(range, (now, remaining));
    }

    /// Purges one tombstone if this node still holds exactly that version of it.
    pub(super) fn reap_tombstone(&mut self, bucket: &str, key: &[u8], digest: u64) {
        match self.storage.get(bucket, key) {
            Ok(Some(object)) if object.digest() == digest && object.is_deleted() => {
                self.identity.reaped_counter_floor = self
                    .identity
                    .reaped_counter_floor
                    .max(object.context().get(&self.identity.actor));
                if self.storage.remove(bucket, key).is_ok() {
                    self.record_tree_write(bucket, key, Some(digest), None);
                    self.wrote();
                    self.stats.increment(Counter::TombstonesReaped);
                } else {
                    self.stats.increment(Counter::StorageErrors);
                }
            }
            Ok(_) => {}
            Err(_) => self.stats.increment(Counter::StorageErrors),
        }
    }

    /// A peer that confirmed these tombstones on every replica asks this node to purge them.
    pub(super) fn on_reap(&mut self, range: TokenRange, items: Vec<ReapItem>) {
        if self.anti_entropy.trees.tree(range).is_none() {
            return;
        }
        for (bucket, key, digest) in items.into_iter().take(MAX_REAP_CANDIDATES) {
            let valid = crate::request::validate_bucket(&bucket).is_ok()
                && crate::request::validate_key(&key).is_ok()
                && range.contains(key_token(&bucket, &key));
            if valid {
                self.reap_tombstone(&bucket, &key, digest);
            } else {
                self.stats.increment(Counter::InvalidPeerRequests);
            }
        }
    }

    /// A peer came back: its ranges go to the front of the queue.
    pub(super) fn mark_peer_recovered(&mut self, now: Millis, peer: &NodeId) {
        for (range, target) in self.membership.layout.repair_targets(self.id()) {
            if target == *peer {
                self.anti_entropy
                    .repair_queue
                    .mark_replica_recovered(&(range, target), now);
            }
        }
    }

    /// A hint for a key in `range` was lost: that range goes first, with every replica peer.
    pub(super) fn mark_range_hints_lost(&mut self, now: Millis, range: TokenRange) {
        for (target_range, peer) in self.membership.layout.repair_targets(self.id()) {
            if target_range == range {
                self.anti_entropy
                    .repair_queue
                    .mark_hints_lost(&(target_range, peer), now);
            }
        }
    }

    /// Starts due exchanges (operator runs first) and aborts the ones that timed out.
    pub(super) fn tick_anti_entropy(&mut self, now: Millis) {
        let expired: Vec<ExchangeId> = self
            .anti_entropy
            .exchanges
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.abort_exchange(now, id);
        }
        if self.control.repair_bytes.available(now) == 0 {
            // Over the repair byte budget: look again shortly.
            self.anti_entropy.repair_throttled_until = now + 100;
            return;
        }
        self.take_awaited_repair_targets(now);
        let run_ids: Vec<u64> = self.anti_entropy.repair_runs.keys().copied().collect();
        for run_id in run_ids {
            while self.anti_entropy.exchanges.len() < self.config.anti_entropy.concurrency.max(1) {
                let Some(run) = self.anti_entropy.repair_runs.get_mut(&run_id) else {
                    break;
                };
                // A range whose tree is still building waits (one-bucket runs build their own).
                let waits = run.bucket.is_none()
                    && run
                        .pending
                        .front()
                        .is_some_and(|(range, _)| !self.anti_entropy.trees.is_ready(*range));
                if waits {
                    break;
                }
                let Some((range, peer)) = run.pending.pop_front() else {
                    break;
                };
                run.in_flight += 1;
                let bucket = run.bucket.clone();
                self.start_exchange(now, range, peer, Some(run_id), bucket, false);
            }
        }
        if !self.config.anti_entropy.enabled {
            return;
        }
        while self.anti_entropy.exchanges.len() < self.config.anti_entropy.concurrency.max(1) {
            let Some(((next_range, next_peer), _)) = self.anti_entropy.repair_queue.peek(now)
            else {
                break;
            };
            // A peer not up, a tree still building, or a range one of the two is pulling in
            // the active change: try that target again later.
            if self.cluster.membership.status(next_peer) != PeerStatus::Up
                || !self.anti_entropy.trees.is_ready(*next_range)
                || self.exchange_waits_for_streaming(*next_range, next_peer)
            {
                if let Some((target, _)) = self.anti_entropy.repair_queue.next(now) {
                    self.anti_entropy.repair_queue.complete(&target, now, false);
                }
                continue;
            }
            // A periodic exchange of a pair whose quiet roots agree proves nothing new.
            if self
                .anti_entropy
                .repair_queue
                .peek(now)
                .is_some_and(|(target, reason)| {
                    reason == RepairReason::Scheduled && self.roots_agree(now, target)
                })
            {
                if let Some((target, _)) = self.anti_entropy.repair_queue.next(now) {
                    self.anti_entropy.repair_debt.remove(&target);
                    self.anti_entropy.repair_queue.complete(&target, now, true);
                    self.stats
                        .increment(Counter::AntiEntropyExchangesSkippedRootsAgree);
                }
                continue;
            }
            // Scheduled exchanges pause while the breaker is open; half-open lets one probe.
            let probe = matches!(
                self.control.breaker.state(now),
                BreakerState::HalfOpen { .. }
            );
            if !self.control.breaker.allow(now) {
                self.anti_entropy.repair_throttled_until = now + 100;
                break;
            }
            let Some(((range, peer), _reason)) = self.anti_entropy.repair_queue.next(now) else {
                break;
            };
            if probe {
                self.control.breaker_probe = Some((range, peer.clone()));
            }
            self.start_exchange(now, range, peer, None, None, false);
        }
    }

    /// Trees of one bucket's keys in `range`, built by one scan of the range (in bounded
    /// batches): a one-bucket exchange compares these (the maintained trees cover every
    /// bucket).
    fn bucket_trees(&self, range: TokenRange, bucket: &str) -> Result<RangeTrees, StorageError> {
        let hasher = *self.anti_entropy.trees.hasher();
        let mut tree = MerkleTree::new(range, self.anti_entropy.trees.shape());
        scan_in_batches(
            &self.storage,
            range,
            DEFAULT_SCAN_BATCH,
            |b, key, object| {
                if b != bucket {
                    return;
                }
                if let Some(segment) = tree.segment_of(key_token(&b, &key)) {
                    tree.update(
                        segment,
                        None,
                        Some(hasher.item_hash(&b, &key, object.digest())),
                    );
                }
            },
        )?;
        let mut trees = RangeTrees::new(hasher, self.anti_entropy.trees.shape());
        trees.set_ranges([range]);
        let _ = trees.insert_tree(tree);
        Ok(trees)
    }

    pub(super) fn start_exchange(
        &mut self,
        now: Millis,
        range: TokenRange,
        peer: NodeId,
        run: Option<u64>,
        bucket: Option<String>,
        streaming: bool,
    ) {
        // Request ids carry the epoch, so they serve as exchange ids unique across restarts.
        let id = ExchangeId(self.new_request_id());
        let salt = self.rng.gen();
        // Coded reconciliation stays off in nodes: at 0.1% divergence over 1M keys it cuts
        // discovery bytes 86.1 -> 27.1 per divergent key but reads ~2,050 items (whole
        // objects, from storage) per divergent key instead of 24, and bounded
        // (`ExchangeConfig::bounded_coding`) saves 17 bytes for ~140 more items read
        // (docs/benchmarks.md, 2026-12-02 evening): on a cluster's network bytes are far
        // cheaper than reads. Item lists use the default 3-byte item hashes.
        let config = ExchangeConfig {
            coded_max_segments: 0,
            ..ExchangeConfig::default()
        };
        let mut driver = ExchangeDriver::new(id, range, config, salt);
        let bucket = match bucket {
            None => None,
            Some(bucket) => match self.bucket_trees(range, &bucket) {
                Ok(trees) => {
                    driver = driver.for_bucket(bucket.clone());
                    Some((bucket, trees))
                }
                Err(_) => {
                    self.stats.increment(Counter::StorageErrors);
                    let mut exchange = ActiveExchange {
                        driver,
                        peer,
                        deadline: now,
                        run,
                        started_at: now,
                        bucket: None,
                        streaming,
                    };
                    let report = exchange.driver.abort();
                    self.finish_exchange(now, exchange, report);
                    return;
                }
            },
        };
        let mut exchange = ActiveExchange {
            driver,
            peer,
            deadline: now + self.config.request_timeout_ms,
            run,
            started_at: now,
            bucket,
            streaming,
        };
        let step = if self.cluster.membership.status(&exchange.peer) == PeerStatus::Down {
            // Known down: fail at once (a run reports it) instead of waiting for a timeout.
            DriverStep::Finished(exchange.driver.abort())
        } else {
            match exchange.bucket.as_mut() {
                Some((_, trees)) => exchange.driver.start(trees),
                None => exchange.driver.start(&mut self.anti_entropy.trees),
            }
        };
        match step {
            DriverStep::Send(request) => {
                let peer = exchange.peer.clone();
                self.send_exchange_request(now, &peer, request);
                self.anti_entropy.exchanges.insert(id, exchange);
            }
            DriverStep::Finished(report) => self.finish_exchange(now, exchange, report),
            DriverStep::Ignored => {}
        }
    }

    fn send_exchange_request(&mut self, now: Millis, peer: &NodeId, request: ExchangeRequest) {
        let bytes = request.encoded_len() as u64;
        self.control.repair_bytes.consume(now, bytes);
        self.send(peer, Message::AntiEntropy { request });
    }

    /// The receiver side: answer, and merge what the driver pushed.
    pub(super) fn on_exchange_request(
        &mut self,
        now: Millis,
        from: &NodeId,
        request: ExchangeRequest,
    ) {
        let request_range = request.range;
        let output = match request.bucket.clone() {
            // Only for a range this node replicates (else the maintained trees refuse it),
            // and a valid bucket name (a peer's input).
            Some(bucket)
                if self.anti_entropy.trees.tree(request.range).is_some()
                    && crate::request::validate_bucket(&bucket).is_ok() =>
            {
                match self.bucket_trees(request.range, &bucket) {
                    Ok(mut trees) => handle_request(
                        request,
                        &mut trees,
                        &BucketSource {
                            storage: &self.storage,
                            bucket: &bucket,
                        },
                        &ReceiverLimits::default(),
                    ),
                    Err(error) => {
                        self.stats.increment(Counter::StorageErrors);
                        let response = ExchangeResponse {
                            exchange: request.exchange,
                            seq: request.seq,
                            body: ResponseBody::Refused(Refusal::Storage(error.to_string())),
                        };
                        self.send(from, Message::AntiEntropyReply { response });
                        return;
                    }
                }
            }
            Some(_) => {
                self.stats.increment(Counter::InvalidPeerRequests);
                let response = ExchangeResponse {
                    exchange: request.exchange,
                    seq: request.seq,
                    body: ResponseBody::Refused(Refusal::UnknownRange),
                };
                self.send(from, Message::AntiEntropyReply { response });
                return;
            }
            None => handle_request(
                request,
                &mut self.anti_entropy.trees,
                &StorageSource(&self.storage),
                &ReceiverLimits::default(),
            ),
        };
        let pushed_keys = output.writes.len() as u64;
        let pushed_bytes: u64 = output
            .writes
            .iter()
            .map(|w| w.object.size_bytes() as u64)
            .sum();
        let stored = self.apply_repair_writes(output.writes);
        if stored.is_ok() {
            self.count_pushed_into_gained(request_range, pushed_keys, pushed_bytes);
        }
        self.control
            .repair_bytes
            .consume(now, output.response.encoded_len() as u64);
        match stored {
            // The answer acknowledges pushed objects: only once they are durable.
            Ok(()) => self.emit_durable(DurableReply::Exchange {
                to: from.clone(),
                response: output.response,
            }),
            Err(error) => {
                let response = ExchangeResponse {
                    body: ResponseBody::Refused(Refusal::Storage(error.to_string())),
                    ..output.response
                };
                self.send(from, Message::AntiEntropyReply { response });
            }
        }
    }

    /// The driver side: merge what came back, send the next request or finish.
    pub(super) fn on_exchange_response(
        &mut self,
        now: Millis,
        from: &NodeId,
        response: ExchangeResponse,
    ) {
        let id = response.exchange;
        let Some(mut exchange) = self.anti_entropy.exchanges.remove(&id) else {
            return;
        };
        if exchange.peer != *from {
            self.anti_entropy.exchanges.insert(id, exchange);
            return;
        }
        self.control
            .repair_bytes
            .consume(now, response.encoded_len() as u64);
        let output = match exchange.bucket.as_mut() {
            Some((bucket, trees)) => exchange.driver.handle_response(
                response,
                trees,
                &BucketSource {
                    storage: &self.storage,
                    bucket,
                },
            ),
            None => exchange.driver.handle_response(
                response,
                &mut self.anti_entropy.trees,
                &StorageSource(&self.storage),
            ),
        };
        let pulled = !output.writes.is_empty();
        let stored = self.apply_repair_writes(output.writes);
        if stored.is_ok() && pulled {
            // A one-bucket exchange's trees are not kept current by writes: rebuild them
            // after merging what the peer sent, so the verify step sees the merged data.
            if let Some((bucket, _)) = &exchange.bucket {
                match self.bucket_trees(exchange.driver.range(), bucket) {
                    Ok(trees) => exchange.bucket = Some((bucket.clone(), trees)),
                    Err(_) => self.stats.increment(Counter::StorageErrors),
                }
            }
        }
        if stored.is_err() {
            // Objects pulled from the peer were not stored: the exchange must not count as
            // converged (tombstone reaping relies on that), so it ends as failed.
            let report = exchange.driver.abort();
            self.finish_exchange(now, exchange, report);
            return;
        }
        match output.step {
            DriverStep::Send(request) => {
                let peer = exchange.peer.clone();
                self.send_exchange_request(now, &peer, request);
                exchange.deadline = now + self.config.request_timeout_ms;
                self.anti_entropy.exchanges.insert(id, exchange);
            }
            DriverStep::Finished(report) => self.finish_exchange(now, exchange, report),
            DriverStep::Ignored => {
                self.anti_entropy.exchanges.insert(id, exchange);
            }
        }
    }

    /// An exchange whose request could not be sent ends now.
    pub(super) fn abort_exchange(&mut self, now: Millis, id: ExchangeId) {
        if let Some(mut exchange) = self.anti_entropy.exchanges.remove(&id) {
            let report = exchange.driver.abort();
            self.finish_exchange(now, exchange, report);
        }
    }

    /// The peer went down: its exchanges fail now rather than at their timeout.
    pub(super) fn abort_exchanges_with(&mut self, now: Millis, peer: &NodeId) {
        let ids: Vec<ExchangeId> = self
            .anti_entropy
            .exchanges
            .iter()
            .filter(|(_, e)| e.peer == *peer)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.abort_exchange(now, id);
        }
    }

    /// Merges objects pushed by a peer; the first storage error, if any, after trying all
    /// (an exchange answer must not acknowledge objects that were not stored).
    fn apply_repair_writes(&mut self, writes: Vec<RepairObject>) -> Result<(), StorageError> {
        let mut first_error = None;
        for write in writes {
            if !self.owns_key(&write.bucket, &write.key) {
                // An exchange begun while this node replicated the range, answered after a
                // layout change took the range away (and cleanup deleted its keys): merging
                // would leave a copy on a node that is no replica, which nothing removes.
                continue;
            }
            match self.merge_local(&write.bucket, &write.key, &write.object) {
                Ok(true) => self.stats.increment(Counter::AntiEntropyKeysRepaired),
                Ok(false) => {}
                Err(error) => {
                    self.stats.increment(Counter::StorageErrors);
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn finish_exchange(&mut self, now: Millis, exchange: ActiveExchange, report: ExchangeReport) {
        let ok = !matches!(report.outcome, ExchangeOutcome::Failed(_));
        // A one-bucket exchange proves nothing of the range's other buckets: it never counts
        // as the range's sync (tombstone reaping relies on that), nor for the schedule.
        let whole_range = exchange.bucket.is_none();
        if whole_range && report.outcome == ExchangeOutcome::Converged {
            self.anti_entropy
                .converged_at
                .insert((report.range, exchange.peer.clone()), now);
        }
        if ok {
            self.stats.increment(Counter::AntiEntropyExchangesOk);
        } else {
            self.stats.increment(Counter::AntiEntropyExchangesFailed);
        }
        if self.anti_entropy.exchange_durations_ms.len() >= MAX_DURATION_SAMPLES {
            self.anti_entropy.exchange_durations_ms.pop_front();
        }
        self.anti_entropy
            .exchange_durations_ms
            .push_back(now.saturating_sub(exchange.started_at));
        self.stats.add(
            Counter::AntiEntropyBytes,
            report.stats.bytes_sent + report.stats.bytes_received,
        );
        let mismatched = report.stats.leaves_mismatched;
        if whole_range {
            let pair = (report.range, exchange.peer.clone());
            if report.outcome == ExchangeOutcome::Converged || mismatched == 0 {
                self.anti_entropy.repair_debt.remove(&pair);
            } else {
                self.anti_entropy.repair_debt.insert(pair, mismatched);
            }
        }
        if ok && mismatched > 0 {
            let sample =
                (report.stats.bytes_sent + report.stats.bytes_received) as f64 / mismatched as f64;
            let average = self.anti_entropy.bytes_per_leaf.get_or_insert(sample);
            *average = 0.8 * *average + 0.2 * sample;
        }
        if exchange.streaming {
            self.on_stream_exchange_finished(now, report.range, &exchange.peer, &report);
            return;
        }
        match exchange.run {
            Some(run_id) => {
                if let Some(run) = self.anti_entropy.repair_runs.get_mut(&run_id) {
                    run.in_flight = run.in_flight.saturating_sub(1);
                    run.ranges_done += 1;
                    run.failed |= !ok;
                    run.stats.add(&report.stats);
                    if run.pending.is_empty() && run.in_flight == 0 {
                        run.finished_at = Some(now);
                    }
                }
                // A completed operator run also counts as the range's sync.
                if whole_range {
                    self.anti_entropy.repair_queue.complete(
                        &(report.range, exchange.peer),
                        now,
                        ok,
                    );
                }
            }
            None => {
                // The exchange a half-open breaker let through decides whether it closes.
                let target = (report.range, exchange.peer.clone());
                if self.control.breaker_probe.as_ref() == Some(&target) {
                    self.control.breaker_probe = None;
                    self.control.breaker.probe_finished(now, ok);
                }
                // Jitter: the sync is recorded up to a tenth of the interval early, so the
                // (range, peer) pairs of a node, and of the nodes, drift apart instead of
                // coming due in lockstep.
                let spread = self.config.anti_entropy.interval_ms / 10;
                let jitter = self.rng.gen_range(0..=spread);
                let at = now.saturating_sub(jitter);
                self.anti_entropy
                    .repair_queue
                    .complete(&(report.range, exchange.peer), at, ok)
            }
        }
    }

    /// Starts an operator repair run over every (range, replica peer) of this node.
    pub fn start_repair_run(&mut self, now: Millis) -> u64 {
        self.start_repair_run_of(now, None)
    }

    /// Starts an operator repair run; with `bucket`, of that bucket's keys only.
    pub fn start_repair_run_of(&mut self, now: Millis, bucket: Option<String>) -> u64 {
        self.anti_entropy.next_run += 1;
        let id = self.anti_entropy.next_run;
        if self.anti_entropy.repair_runs.len() >= MAX_REPAIR_RUNS {
            let oldest_finished = self
                .anti_entropy
                .repair_runs
                .iter()
                .find(|(_, r)| r.finished_at.is_some())
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest_finished {
                self.anti_entropy.repair_runs.remove(&oldest);
            }
        }
        // Its targets are taken below, or later once the node knows its cluster.
        let alone = self.ring().nodes().len() <= 1;
        let run = RepairRun {
            bucket,
            ranges_total: 0,
            awaiting_targets: !alone,
            pending: VecDeque::new(),
            in_flight: 0,
            ranges_done: 0,
            failed: false,
            stats: ExchangeStats::default(),
            started_at: now,
            finished_at: alone.then_some(now),
        };
        self.anti_entropy.repair_runs.insert(id, run);
        self.take_awaited_repair_targets(now);
        self.tick_anti_entropy(now);
        id
    }

    /// Every (range, peer) this node repairs, peer by peer: two exchanges of one range (with
    /// two peers) never run at once, so a key a first peer repaired is not found different
    /// again with the second.
    fn repair_run_targets(&self) -> VecDeque<(TokenRange, NodeId)> {
        let mut targets = self.membership.layout.repair_targets(self.id());
        targets.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
        targets.into_iter().collect()
    }

    /// Runs awaiting their targets take them once a peer has described the cluster to this
    /// node (`learned`) and its layout gives it some; a run that waited too long fails.
    pub(super) fn take_awaited_repair_targets(&mut self, now: Millis) {
        if !self
            .anti_entropy
            .repair_runs
            .values()
            .any(|run| run.awaiting_targets)
        {
            return;
        }
        let targets = if self.cluster.learned {
            self.repair_run_targets()
        } else {
            VecDeque::new()
        };
        for run in self
            .anti_entropy
            .repair_runs
            .values_mut()
            .filter(|run| run.awaiting_targets)
        {
            if !targets.is_empty() {
                run.awaiting_targets = false;
                run.ranges_total = targets.len() as u64;
                run.pending = targets.clone();
            } else if now >= run.started_at + REPAIR_TARGETS_WAIT_MS {
                run.awaiting_targets = false;
                run.failed = true;
                run.finished_at = Some(now);
            }
        }
    }

    pub fn repair_run(&self, id: u64, now: Millis) -> Option<RepairRunStatus> {
        let run = self.anti_entropy.repair_runs.get(&id)?;
        let state = match (run.finished_at, run.failed) {
            (None, _) => RunState::Running,
            (Some(_), false) => RunState::Done,
            (Some(_), true) => RunState::Failed,
        };
        Some(RepairRunStatus {
            id,
            state,
            ranges_total: run.ranges_total,
            ranges_done: run.ranges_done,
            keys_compared: run.stats.keys_compared,
            keys_different: run.stats.keys_different,
            keys_repaired: run.stats.keys_moved,
            bytes_sent: run.stats.bytes_sent,
            bytes_received: run.stats.bytes_received,
            elapsed_ms: run
                .finished_at
                .unwrap_or(now)
                .saturating_sub(run.started_at),
        })
    }

    /// Every repair run this node remembers (at most `MAX_REPAIR_RUNS`), newest first.
    pub fn repair_runs(&self, now: Millis) -> Vec<RepairRunStatus> {
        self.anti_entropy
            .repair_runs
            .keys()
            .rev()
            .filter_map(|id| self.repair_run(*id, now))
            .collect()
    }

    /// Durations of exchanges finished since the last call (for a histogram).
    pub fn take_exchange_durations_ms(&mut self) -> Vec<Millis> {
        self.anti_entropy.exchange_durations_ms.drain(..).collect()
    }

    /// Ranges whose tree disagreed with a scan of their data since the last call (each was
    /// rebuilt from that scan), for the driver's log.
    pub fn take_tree_mismatches(&mut self) -> Vec<TokenRange> {
        self.anti_entropy.tree_mismatches.drain(..).collect()
    }

    /// The known repair debt toward each peer (mismatched leaves that the last exchange of
    /// a range with it left unmended), with its byte estimate and the time to pay it at the
    /// repair rate granted now: the per-pair ETA (this node, peer).
    pub fn repair_debt(&self) -> Vec<RepairDebt> {
        let mut by_peer: BTreeMap<&NodeId, u64> = BTreeMap::new();
        for ((_, peer), leaves) in &self.anti_entropy.repair_debt {
            *by_peer.entry(peer).or_default() += leaves;
        }
        let rate = self.control.repair_bytes.rate_bytes_per_s();
        by_peer
            .into_iter()
            .map(|(peer, leaves)| {
                let estimated_bytes = self
                    .anti_entropy
                    .bytes_per_leaf
                    .map(|per_leaf| (per_leaf * leaves as f64) as u64);
                RepairDebt {
                    peer: peer.clone(),
                    mismatched_leaves: leaves,
                    estimated_bytes,
                    eta_ms: estimated_bytes
                        .filter(|_| rate > 0)
                        .map(|bytes| bytes.saturating_mul(1000) / rate),
                }
            })
            .collect()
    }

    /// Memory held by this node's Merkle trees.
    pub fn tree_memory_bytes(&self) -> usize {
        self.anti_entropy.trees.memory_bytes()
    }

    /// When anti-entropy next has work: exchange timeouts, runs, the queue.
    /// While trees are building, the next tick scans the next batch.
    pub(super) fn tree_build_deadline(&self) -> Millis {
        if self.anti_entropy.trees.is_building() {
            self.clock + TREE_BUILD_TICK_MS
        } else {
            Millis::MAX
        }
    }

    pub(super) fn anti_entropy_deadline(&self) -> Millis {
        let timeouts = self
            .anti_entropy
            .exchanges
            .values()
            .map(|e| e.deadline)
            .min()
            .unwrap_or(Millis::MAX);
        if self.anti_entropy.exchanges.len() >= self.config.anti_entropy.concurrency.max(1) {
            // No room for another exchange: only a timeout (or a reply) changes that.
            return timeouts;
        }
        let runs = if self
            .anti_entropy
            .repair_runs
            .values()
            .any(|r| !r.pending.is_empty())
        {
            0
        } else {
            // A run awaiting its targets takes them when the layout changes
            // (`refresh_layout`); the timer is for its failure.
            self.anti_entropy
                .repair_runs
                .values()
                .filter(|r| r.awaiting_targets)
                .map(|r| r.started_at + REPAIR_TARGETS_WAIT_MS)
                .min()
                .unwrap_or(Millis::MAX)
        };
        let queue = if self.config.anti_entropy.enabled {
            self.anti_entropy
                .repair_queue
                .next_due_at()
                .unwrap_or(Millis::MAX)
        } else {
            Millis::MAX
        };
        let work = runs.min(queue);
        let work = if work == Millis::MAX {
            work
        } else {
            work.max(self.anti_entropy.repair_throttled_until)
        };
        timeouts.min(work).min(self.anti_entropy.next_verify_at)
    }
}
