//! The node's hinted handoff: storing hints for unreachable replicas, replaying them when
//! the replica is up again, expiry, budgets, and the marks left for anti-entropy.

use super::Counter;
use super::Node;
use crate::anti_entropy::RepairObject;
use crate::config::NodeConfig;
use crate::control::BreakerState;
use crate::control::TokenBucket;
use crate::hinted_handoff::{
    hint_key, parse_hint_key, DropReason, HintQueue, HintRecord, QueuedHint,
};
use crate::membership::PeerStatus;
use crate::message::{Message, RequestId};
use crate::ring::key_token;
use crate::storage::Storage;
use crate::version::Object;
use crate::{Millis, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// Token ranges remembered for priority anti-entropy; beyond this many the oldest marks are
/// kept and `repair_marks_overflowed` says a full pass is due.
const MAX_REPAIR_MARKS: usize = 4096;
/// How often delivery is attempted while hints are pending.
pub(super) const DELIVERY_INTERVAL_MS: Millis = 100;

/// Hint batches in flight per target.
const MAX_HINT_BATCHES_IN_FLIGHT: usize = 4;

/// What `send_hint_batch` did.
enum HintBatch {
    Sent,
    NothingToSend,
    OutOfBudget,
}

/// A hint batch on its way to a target.
#[derive(Debug, Clone)]
pub(super) struct HintBatchInFlight {
    pub target: NodeId,
    pub hints: Vec<QueuedHint>,
    pub deadline: Millis,
}

/// Rebuilds the hint queue from storage at start; corrupt records are skipped and counted.
pub(super) fn load_hint_queue<S: Storage>(storage: &S) -> (HintQueue, u64) {
    let mut queue = HintQueue::new();
    let mut corrupt = 0;
    for (key, value) in storage.scan_hints().unwrap_or_default() {
        match (parse_hint_key(&key), HintRecord::decode(&value)) {
            (Some((target, bucket, object_key)), Some(record)) => {
                let is_delete = record.object.is_deleted();
                queue.upsert(
                    &target,
                    &bucket,
                    &object_key,
                    record.created_ms,
                    (key.len() + value.len()) as u64,
                    is_delete,
                );
            }
            _ => {
                corrupt += 1;
                let _ = storage.delete_hint(&key);
            }
        }
    }
    (queue, corrupt)
}

/// Hinted handoff's state: the hints kept (index; records live in storage), the batches
/// in flight and the replay rate.
#[derive(Debug)]
pub(super) struct HintDelivery {
    pub hint_queue: HintQueue,
    pub hint_batches: BTreeMap<RequestId, HintBatchInFlight>,
    /// Hints replayed per second (`delivery_rate_per_s`), a token bucket counting hints.
    pub delivery_budget: TokenBucket,
    pub next_delivery_at: Millis,
}

impl HintDelivery {
    pub fn new(hint_queue: HintQueue, config: &NodeConfig, now: Millis) -> Self {
        HintDelivery {
            hint_queue,
            hint_batches: BTreeMap::new(),
            delivery_budget: TokenBucket::new(
                config.hinted_handoff.delivery_rate_per_s,
                config.hinted_handoff.delivery_rate_per_s,
                now,
            ),
            next_delivery_at: now,
        }
    }
}

impl<S: Storage> Node<S> {
    /// Keeps `object` for `target`, merged into any hint already kept for that key; false when
    /// it was not kept (dropped and counted, or a storage error). `stands_in`: a sloppy
    /// quorum counts this hint toward the write's acknowledgement (see
    /// [`HintRecord::stands_in`]).
    pub(super) fn store_hint(
        &mut self,
        now: Millis,
        target: &NodeId,
        bucket: &str,
        key: &[u8],
        object: &Object,
        stands_in: bool,
    ) -> bool {
        if target == self.id() {
            return false;
        }
        if !self.config.hinted_handoff.enabled {
            self.drop_hint(now, bucket, key, DropReason::Disabled);
            return false;
        }
        if self.cluster.membership.get(target).is_none() {
            self.drop_hint(now, bucket, key, DropReason::UnknownTarget);
            return false;
        }
        let storage_key = hint_key(target, bucket, key);
        let mut record = match self.storage.get_hint(&storage_key) {
            Ok(Some(bytes)) => HintRecord::decode(&bytes).unwrap_or_else(|| {
                self.stats.increment(Counter::HintsDroppedCorrupt);
                HintRecord {
                    object: Object::empty(),
                    created_ms: now,
                    stands_in: false,
                }
            }),
            Ok(None) => HintRecord {
                object: Object::empty(),
                created_ms: now,
                stands_in: false,
            },
            Err(_) => {
                self.stats.increment(Counter::StorageErrors);
                return false;
            }
        };
        record.object.merge_in(object);
        record.stands_in |= stands_in;
        let encoded = record.encode();
        // Budgets count the bytes stored: hint key plus encoded record.
        let bytes = (storage_key.len() + encoded.len()) as u64;
        if let Err(reason) = self.hints.hint_queue.check_budget(
            &self.config.hinted_handoff,
            target,
            bucket,
            key,
            bytes,
        ) {
            self.drop_hint(now, bucket, key, reason);
            return false;
        }
        if self.storage.put_hint(&storage_key, &encoded).is_err() {
            self.stats.increment(Counter::StorageErrors);
            return false;
        }
        self.wrote();
        let is_delete = record.object.is_deleted();
        self.hints
            .hint_queue
            .upsert(target, bucket, key, record.created_ms, bytes, is_delete);
        self.stats.increment(Counter::HintsStored);
        true
    }

    fn drop_hint(&mut self, now: Millis, bucket: &str, key: &[u8], reason: DropReason) {
        self.stats.increment(Counter::hints_dropped(reason));
        self.mark_for_anti_entropy(now, bucket, key);
    }

    /// Remembers the range of a key whose hint was lost, for priority anti-entropy.
    fn mark_for_anti_entropy(&mut self, now: Millis, bucket: &str, key: &[u8]) {
        let Some(range) = self
            .membership
            .layout
            .partition()
            .range_for_token(key_token(bucket, key))
        else {
            return;
        };
        self.mark_range_hints_lost(now, range);
        if self.anti_entropy.repair_marks.len() < MAX_REPAIR_MARKS {
            self.anti_entropy.repair_marks.insert(range);
        } else if !self.anti_entropy.repair_marks.contains(&range) {
            self.anti_entropy.repair_marks_overflowed = true;
        }
    }

    /// Sends one batch to every live target with hints and no batch in flight.
    pub(super) fn deliver_hints(&mut self, now: Millis) {
        self.expire_hint_batches(now);
        // Hint replay shares the repair byte budget with anti-entropy, and pauses while the
        // circuit breaker is open (half-open, it flows again with the probe).
        let breaker_open = matches!(self.control.breaker.state(now), BreakerState::Open { .. });
        if self.control.repair_bytes.available(now) == 0 || breaker_open {
            return;
        }
        let targets: Vec<NodeId> = self.hints.hint_queue.targets().cloned().collect();
        for target in targets {
            if self.cluster.membership.status(&target) != PeerStatus::Up
                || self.cluster.membership.get(&target).is_none()
            {
                continue;
            }
            // A few batches in flight per target keep replay going while the target fsyncs.
            while self
                .hints
                .hint_batches
                .values()
                .filter(|b| b.target == target)
                .count()
                < MAX_HINT_BATCHES_IN_FLIGHT
            {
                match self.send_hint_batch(now, &target) {
                    HintBatch::Sent => {}
                    HintBatch::NothingToSend => break,
                    HintBatch::OutOfBudget => return,
                }
            }
        }
    }

    /// Sends the next batch of hints to `target`.
    fn send_hint_batch(&mut self, now: Millis, target: &NodeId) -> HintBatch {
        let batch_size = self.config.hinted_handoff.batch_size.max(1);
        let granted = (batch_size as u64).min(self.hints.delivery_budget.available(now));
        self.hints.delivery_budget.consume(now, granted);
        let granted = granted as usize;
        if granted == 0 {
            return HintBatch::OutOfBudget;
        }
        let mut sent = Vec::new();
        let mut payload = Vec::new();
        // Hints already on their way in another batch are not sent twice.
        let in_flight: BTreeSet<(String, Vec<u8>)> = self
            .hints
            .hint_batches
            .values()
            .filter(|b| b.target == *target)
            .flat_map(|b| b.hints.iter().map(|h| (h.bucket.clone(), h.key.clone())))
            .collect();
        let candidates: Vec<QueuedHint> = self
            .hints
            .hint_queue
            .next_batch(target, granted + in_flight.len())
            .into_iter()
            .filter(|h| !in_flight.contains(&(h.bucket.clone(), h.key.clone())))
            .take(granted)
            .collect();
        for hint in candidates {
            let storage_key = hint_key(target, &hint.bucket, &hint.key);
            // Every hint expires, standing in or not: the tombstone reaper counts on it (a
            // hint kept past the TTL could bring back a reaped delete; sim seed 586).
            if now.saturating_sub(hint.created_ms) > self.config.hinted_handoff.ttl_ms {
                self.stats.increment(Counter::HintsExpired);
                self.forget_hint(target, &hint, None);
                self.mark_for_anti_entropy(now, &hint.bucket, &hint.key);
                continue;
            }
            match self.storage.get_hint(&storage_key) {
                Ok(Some(bytes)) => match HintRecord::decode(&bytes) {
                    Some(record) if !self.replicates(target, &hint.bucket, &hint.key) => {
                        self.retarget_hint(now, target, &hint, &record);
                    }
                    Some(record) => {
                        payload.push(RepairObject {
                            bucket: hint.bucket.clone(),
                            key: hint.key.clone(),
                            object: record.object,
                        });
                        sent.push(hint);
                    }
                    None => {
                        self.forget_hint(target, &hint, None);
                        self.drop_hint(now, &hint.bucket, &hint.key, DropReason::Corrupt);
                    }
                },
                Ok(None) => {
                    self.hints
                        .hint_queue
                        .remove(target, &hint.bucket, &hint.key, None);
                }
                Err(_) => self.stats.increment(Counter::StorageErrors),
            }
        }
        if payload.is_empty() {
            return HintBatch::NothingToSend;
        }
        let bytes: usize = payload
            .iter()
            .map(|hint| hint.bucket.len() + hint.key.len() + hint.object.size_bytes())
            .sum();
        self.control.repair_bytes.consume(now, bytes as u64);
        let request = self.new_request_id();
        let deadline = now + self.config.request_timeout_ms;
        self.hints.hint_batches.insert(
            request,
            super::hints::HintBatchInFlight {
                target: target.clone(),
                hints: sent,
                deadline,
            },
        );
        self.send(
            target,
            Message::HintBatch {
                request,
                hints: payload,
            },
        );
        HintBatch::Sent
    }

    /// True when `target` replicates the key in this node's layout (old or new ring).
    fn replicates(&self, target: &NodeId, bucket: &str, key: &[u8]) -> bool {
        self.membership.layout.owns(target, key_token(bucket, key))
    }

    /// A hint kept for a node that no longer replicates its key (a cluster change moved the
    /// range after the hint was stored): delivered there, it would leave a copy on a
    /// non-replica (after cleanup deleted the range) and still miss the new owners, and the
    /// hint may hold the last copy. It is kept for the key's current replicas instead
    /// (merged here when this node is one), and forgotten for the old target once kept.
    /// True when the hint was kept for them. (A removed target is left out even while the
    /// layout still lists it; a wrong guess of the owners is corrected the same way when the
    /// hint is replayed to a node that does not replicate it.)
    pub(super) fn retarget_hint(
        &mut self,
        now: Millis,
        target: &NodeId,
        hint: &QueuedHint,
        record: &HintRecord,
    ) -> bool {
        let token = key_token(&hint.bucket, &hint.key);
        let owners: Vec<NodeId> = self
            .membership
            .layout
            .new_ring()
            .preference_list(token)
            .iter()
            .filter(|owner| *owner != target)
            .cloned()
            .collect();
        let mut kept = !owners.is_empty();
        for owner in owners {
            let ok = if owner == *self.id() {
                self.merge_local(&hint.bucket, &hint.key, &record.object)
                    .is_ok()
            } else {
                self.store_hint(
                    now,
                    &owner,
                    &hint.bucket,
                    &hint.key,
                    &record.object,
                    record.stands_in,
                )
            };
            kept &= ok;
        }
        if kept {
            self.forget_hint(target, hint, None);
        }
        kept
    }

    /// Removes a hint from storage and queue (only the version that was sent, if given); true
    /// when it was removed.
    pub(super) fn forget_hint(
        &mut self,
        target: &NodeId,
        hint: &QueuedHint,
        version: Option<u64>,
    ) -> bool {
        let removed = self
            .hints
            .hint_queue
            .remove(target, &hint.bucket, &hint.key, version);
        if removed {
            let _ = self
                .storage
                .delete_hint(&hint_key(target, &hint.bucket, &hint.key));
        }
        removed
    }

    fn expire_hint_batches(&mut self, now: Millis) {
        let expired: Vec<RequestId> = self
            .hints
            .hint_batches
            .iter()
            .filter(|(_, b)| b.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.on_hint_batch_reply(id, false);
        }
    }

    /// The target answered a batch (or could not be reached): delivered hints are removed.
    pub(super) fn on_hint_batch_reply(&mut self, request: RequestId, ok: bool) {
        let Some(batch) = self.hints.hint_batches.remove(&request) else {
            return;
        };
        for hint in &batch.hints {
            if ok {
                self.forget_hint(&batch.target, hint, Some(hint.version));
                self.stats.increment(Counter::HintsDelivered);
                self.stats.increment(Counter::HintWritesOk);
            } else {
                self.stats.increment(Counter::HintWritesFailed);
            }
        }
    }

    /// A replica receives replayed hints: merge each, answer once durable.
    pub(super) fn serve_hint_batch(
        &mut self,
        hints: Vec<RepairObject>,
    ) -> Result<(), crate::message::ReplicaError> {
        let mut result = Ok(());
        for hint in hints {
            if let Err(error) = self.serve_replicate(&hint.bucket, &hint.key, &hint.object) {
                result = Err(error);
            }
        }
        result
    }

    /// Hints waiting for `target`.
    pub fn hints_pending_for(&self, target: &NodeId) -> usize {
        self.hints.hint_queue.pending_for(target)
    }

    /// Targets this node keeps hints for, each with its count and the created time of its
    /// oldest hint (for the dashboard).
    pub fn hints_by_target(&self) -> Vec<(NodeId, usize, Option<Millis>)> {
        let queue = &self.hints.hint_queue;
        queue
            .targets()
            .map(|t| (t.clone(), queue.pending_for(t), queue.oldest_created_ms(t)))
            .collect()
    }

    /// Bytes of stored hints (keys plus encoded records).
    pub fn hints_bytes(&self) -> u64 {
        self.hints.hint_queue.total_bytes()
    }

    /// Hints waiting in total.
    pub fn hints_pending(&self) -> usize {
        self.hints.hint_queue.total_hints()
    }

    /// Ranges marked for priority anti-entropy by dropped or expired hints.
    pub fn repair_marks(&self) -> impl Iterator<Item = &crate::ring::TokenRange> {
        self.anti_entropy.repair_marks.iter()
    }
}
