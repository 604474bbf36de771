//! The node's read path: digest reads, read repair (blocking or async), background repair.

use super::Counter;
use super::{DurableReply, Node, Operation};
use crate::config::ReadRepairMode;
use crate::coordinator::{AfterRead, GetOperation, ReadKind, ReadProgress};
use crate::membership::PeerStatus;
use crate::message::{ClientRequestId, ClientResponse, Message, RequestId};
use crate::quorum::ConsistencyLevel;
use crate::read_repair::{absent_digest, Resolution};
use crate::storage::Storage;
use crate::version::{Object, Value};
use crate::{Millis, NodeId};
use rand::Rng;
use std::collections::BTreeSet;

/// Repair writes of one inconsistent read.
#[derive(Debug)]
pub(super) struct RepairOperation {
    pub bucket: String,
    pub key: Vec<u8>,
    pub object: Object,
    /// In blocking mode, the client waits for the repairs: its answer is sent when they end.
    pub waiting_client: Option<(ClientRequestId, Object)>,
    pub pending: BTreeSet<NodeId>,
    pub deadline: Millis,
    pub any_failed: bool,
}

/// Read repair's own state (the rest lives in the read operations).
#[derive(Debug, Default)]
pub(super) struct ReadRepairState {
    /// Repair writes in flight; beyond `max_concurrent_repairs` a read is not repaired.
    pub repairs_in_flight: usize,
}

impl<S: Storage> Node<S> {
    pub(super) fn start_read(
        &mut self,
        now: Millis,
        client: ClientRequestId,
        bucket: String,
        key: Vec<u8>,
        level: ConsistencyLevel,
        after: AfterRead,
    ) {
        let mut candidates = self.ring().preference_list_for_key(&bucket, &key);
        // Live replicas first, in preference order.
        candidates.sort_by_key(|n| self.cluster.membership.status(n) == PeerStatus::Down);
        let data_replica = self.data_replica(&candidates);
        let id = self.new_request_id();
        let deadline = now + self.config.request_timeout_ms;
        let digest_reads = self.config.read_repair.digest_reads;
        let mut op = GetOperation::new(
            client,
            bucket,
            key,
            level,
            candidates,
            deadline,
            after,
            digest_reads,
        );
        let requests = op.start(&data_replica, now);
        self.insert_operation(id, Operation::Get(op));
        self.coordination
            .speculations
            .insert((now + self.config.speculative_retry_ms, id));
        self.send_reads(now, id, requests);
        self.advance_read(now, id);
    }

    /// The replica that sends the full object: this node when it is one, else the live
    /// replica that answered fastest recently.
    fn data_replica(&self, candidates: &[NodeId]) -> NodeId {
        if candidates.contains(self.id()) {
            return self.id().clone();
        }
        candidates
            .iter()
            .filter(|n| self.cluster.membership.status(n) == PeerStatus::Up)
            .min_by_key(|n| {
                self.coordination
                    .peer_latency_ms
                    .get(*n)
                    .copied()
                    .unwrap_or(0)
            })
            .or(candidates.first())
            .cloned()
            .unwrap_or_else(|| self.id().clone())
    }

    fn send_reads(&mut self, now: Millis, id: RequestId, requests: Vec<(NodeId, ReadKind)>) {
        let Some(Operation::Get(op)) = self.coordination.operations.get(&id) else {
            return;
        };
        let (bucket, key) = (op.bucket.clone(), op.key.clone());
        for (node, kind) in requests {
            if node == *self.id() {
                let local = self.storage.get(&bucket, &key);
                let follow = match (local, self.coordination.operations.get_mut(&id)) {
                    (Ok(object), Some(Operation::Get(op))) => match kind {
                        ReadKind::Full => op.on_full(&node, object, now),
                        ReadKind::Digest => {
                            let digest = object.map(|o| o.digest()).unwrap_or_else(absent_digest);
                            op.on_digest(&node, digest, now)
                        }
                    },
                    (Err(_), Some(Operation::Get(op))) => {
                        self.stats.increment(Counter::StorageErrors);
                        op.on_failed(&node, now)
                    }
                    _ => vec![],
                };
                self.send_reads(now, id, follow);
            } else {
                let message = match kind {
                    ReadKind::Full => Message::Read {
                        request: id,
                        bucket: bucket.clone(),
                        key: key.clone(),
                    },
                    ReadKind::Digest => Message::ReadDigest {
                        request: id,
                        bucket: bucket.clone(),
                        key: key.clone(),
                    },
                };
                self.send(&node, message);
            }
        }
    }

    fn note_latency(&mut self, now: Millis, id: RequestId, from: &NodeId) {
        if let Some(Operation::Get(op)) = self.coordination.operations.get(&id) {
            if let Some(sent) = op.sent_at.get(from) {
                let sample = now.saturating_sub(*sent);
                let estimate = self
                    .coordination
                    .peer_latency_ms
                    .entry(from.clone())
                    .or_insert(sample);
                *estimate = (*estimate * 7 + sample) / 8;
            }
        }
    }

    pub(super) fn on_full_read(
        &mut self,
        now: Millis,
        id: RequestId,
        from: &NodeId,
        result: Result<Option<Object>, ()>,
    ) {
        self.note_latency(now, id, from);
        let follow = match self.coordination.operations.get_mut(&id) {
            Some(Operation::Get(op)) => match result {
                Ok(object) => op.on_full(from, object, now),
                Err(()) => op.on_failed(from, now),
            },
            _ => return,
        };
        self.send_reads(now, id, follow);
        self.advance_read(now, id);
    }

    pub(super) fn on_digest_read(
        &mut self,
        now: Millis,
        id: RequestId,
        from: &NodeId,
        result: Result<u64, ()>,
    ) {
        self.note_latency(now, id, from);
        let follow = match self.coordination.operations.get_mut(&id) {
            Some(Operation::Get(op)) => match result {
                Ok(digest) => op.on_digest(from, digest, now),
                Err(()) => op.on_failed(from, now),
            },
            _ => return,
        };
        self.send_reads(now, id, follow);
        self.advance_read(now, id);
    }

    /// Speculative retries that are due.
    pub(super) fn speculate_reads(&mut self, now: Millis) {
        while let Some(&(due, id)) = self.coordination.speculations.first() {
            if due > now {
                break;
            }
            self.coordination.speculations.remove(&(due, id));
            let more = match self.coordination.operations.get_mut(&id) {
                Some(Operation::Get(op)) => op.speculate(now),
                _ => continue,
            };
            self.send_reads(now, id, more);
            self.advance_read(now, id);
        }
    }

    pub(super) fn on_read_failed(&mut self, now: Millis, id: RequestId, from: &NodeId) {
        let follow = match self.coordination.operations.get_mut(&id) {
            Some(Operation::Get(op)) => op.on_failed(from, now),
            _ => return,
        };
        self.send_reads(now, id, follow);
        self.advance_read(now, id);
    }

    /// Acts on where a read stands: answer, repair, go on in the background, or fail.
    fn advance_read(&mut self, now: Millis, id: RequestId) {
        let Some(Operation::Get(op)) = self.coordination.operations.get_mut(&id) else {
            return;
        };
        if op.answered {
            if op.settled() {
                let mut resolution = op.final_resolution();
                resolution.stale.retain(|n| !op.repaired.contains(n));
                let (bucket, key) = (op.bucket.clone(), op.key.clone());
                self.remove_operation(id);
                self.repair(now, &bucket, &key, &resolution, None);
            }
            return;
        }
        match op.progress() {
            ReadProgress::Pending => {}
            ReadProgress::Failed { needed, answered } => {
                let client = op.client;
                self.remove_operation(id);
                self.reply(client, ClientResponse::Unavailable { needed, answered });
            }
            ReadProgress::Met(resolution) => {
                op.answered = true;
                op.repaired = resolution.stale.clone();
                let (client, bucket, key, after) = (
                    op.client,
                    op.bucket.clone(),
                    op.key.clone(),
                    op.after.clone(),
                );
                let background = self.config.read_repair.enabled
                    && self
                        .rng
                        .gen_bool(self.config.read_repair.background_chance.clamp(0.0, 1.0));
                match after {
                    AfterRead::Answer => {
                        let blocking = self.config.read_repair.mode == ReadRepairMode::Blocking;
                        if blocking
                            && self.config.read_repair.enabled
                            && !resolution.stale.is_empty()
                        {
                            let answer = resolution.merged.clone();
                            self.repair(now, &bucket, &key, &resolution, Some((client, answer)));
                        } else {
                            self.reply(client, ClientResponse::Object(resolution.merged.clone()));
                            self.repair(now, &bucket, &key, &resolution, None);
                        }
                    }
                    AfterRead::Delete { level } => {
                        let object = resolution.merged;
                        let context = object.causal_context();
                        if object.is_deleted() && resolution.stale.is_empty() {
                            // Nothing live to delete, and every replica the level needs
                            // already holds the deletion: already absent at this level.
                            self.reply(client, ClientResponse::Written { context });
                        } else {
                            // Something live to delete, or the merge is a deletion that
                            // some answering replica does not hold yet (its copy is older
                            // or still live, simulator seeds 98 and 250): a tombstone with
                            // the merge's context must reach the level like any delete,
                            // or a later read at `one` from that replica would show a
                            // version the acknowledged delete superseded.
                            self.start_write(
                                now,
                                client,
                                bucket,
                                key,
                                context,
                                Value::Tombstone,
                                level,
                            );
                        }
                    }
                }
                let more = match self.coordination.operations.get_mut(&id) {
                    Some(Operation::Get(op)) if background => op.contact_the_rest(now),
                    _ => vec![],
                };
                if more.is_empty() {
                    self.remove_operation(id);
                } else {
                    self.send_reads(now, id, more);
                    self.advance_read(now, id);
                }
            }
        }
    }

    /// Writes the merged object to every stale replica. With a waiting client (blocking
    /// mode) the answer goes out when the repairs end; a failed repair never fails the read.
    pub(super) fn repair(
        &mut self,
        now: Millis,
        bucket: &str,
        key: &[u8],
        resolution: &Resolution,
        waiting_client: Option<(ClientRequestId, Object)>,
    ) {
        let answer_now = |node: &mut Self, waiting: Option<(ClientRequestId, Object)>| {
            if let Some((client, object)) = waiting {
                node.emit_durable(DurableReply::Client {
                    client,
                    response: ClientResponse::Object(object),
                });
            }
        };
        if !self.config.read_repair.enabled || resolution.stale.is_empty() {
            answer_now(self, waiting_client);
            return;
        }
        let stale = &resolution.stale;
        if self.read_repair.repairs_in_flight + stale.len()
            > self.config.read_repair.max_concurrent_repairs
        {
            self.stats.increment(Counter::ReadRepairSkipped);
            answer_now(self, waiting_client);
            return;
        }
        let id = self.new_request_id();
        let mut pending = BTreeSet::new();
        let mut any_failed = false;
        for node in stale {
            if node == self.id() {
                let ok = self.merge_local(bucket, key, &resolution.merged).is_ok();
                self.count_repair_write(ok);
                any_failed |= !ok;
            } else {
                pending.insert(node.clone());
                self.read_repair.repairs_in_flight += 1;
                let message = Message::RepairWrite {
                    request: id,
                    bucket: bucket.to_string(),
                    key: key.to_vec(),
                    object: resolution.merged.clone(),
                };
                self.send(node, message);
            }
        }
        let repair = RepairOperation {
            bucket: bucket.to_string(),
            key: key.to_vec(),
            object: resolution.merged.clone(),
            waiting_client,
            pending,
            deadline: now + self.config.request_timeout_ms,
            any_failed,
        };
        if repair.pending.is_empty() {
            self.finish_repair(now, repair);
        } else {
            self.insert_operation(id, Operation::Repair(repair));
        }
    }

    fn count_repair_write(&mut self, ok: bool) {
        if ok {
            self.stats.increment(Counter::ReadRepairWritesOk);
        } else {
            self.stats.increment(Counter::ReadRepairWritesFailed);
        }
    }

    /// A stale replica answered a repair write (or could not be reached).
    pub(super) fn on_repair_reply(&mut self, now: Millis, id: RequestId, from: &NodeId, ok: bool) {
        let Some(Operation::Repair(repair)) = self.coordination.operations.get_mut(&id) else {
            return;
        };
        if !repair.pending.remove(from) {
            return;
        }
        repair.any_failed |= !ok;
        let done = repair.pending.is_empty();
        let hint = (!ok).then(|| {
            (
                repair.bucket.clone(),
                repair.key.clone(),
                repair.object.clone(),
            )
        });
        self.read_repair.repairs_in_flight = self.read_repair.repairs_in_flight.saturating_sub(1);
        self.count_repair_write(ok);
        if let Some((bucket, key, object)) = hint {
            // A failed repair write becomes a hint, as any other write would.
            self.store_hint(now, from, &bucket, &key, &object, false);
        }
        if done {
            if let Some(Operation::Repair(repair)) = self.remove_operation(id) {
                self.finish_repair(now, repair);
            }
        }
    }

    /// Ends a repair (all answered, or its deadline passed): counts it, answers the client.
    pub(super) fn finish_repair(&mut self, now: Millis, repair: RepairOperation) {
        let unanswered = repair.pending.len();
        self.read_repair.repairs_in_flight = self
            .read_repair
            .repairs_in_flight
            .saturating_sub(unanswered);
        for target in &repair.pending {
            self.count_repair_write(false);
            self.store_hint(
                now,
                target,
                &repair.bucket,
                &repair.key,
                &repair.object,
                false,
            );
        }
        if repair.any_failed || unanswered > 0 {
            self.stats.increment(Counter::ReadRepairFailed);
        } else {
            self.stats.increment(Counter::ReadRepairRepaired);
        }
        if let Some((client, object)) = repair.waiting_client {
            self.emit_durable(DurableReply::Client {
                client,
                response: ClientResponse::Object(object),
            });
        }
    }
}
