//! Serving peers: the requests other nodes send this one (reads, digests, replicated and
//! repaired writes, hints, coordination as actor, anti-entropy), checked against the same
//! limits as clients' input, and answered durably where the answer acknowledges a write.

use super::{Counter, DurableReply, Node, WriteRefusal, MAX_CONTENT_TYPE_BYTES};
use crate::message::{Message, ReplicaError, RequestId};
use crate::request::{validate_bucket, validate_key, validate_value_size};
use crate::storage::Storage;
use crate::version::{CausalContext, Object, Value};
use crate::{Millis, NodeId};

impl<S: Storage> Node<S> {
    /// A request from a peer (replies and gossip are routed elsewhere).
    pub(super) fn serve_request(&mut self, now: Millis, from: &NodeId, request: Message) {
        match request {
            Message::Read {
                request,
                bucket,
                key,
            } => {
                let result = self.serve_read(&bucket, &key);
                self.send(from, Message::ReadReply { request, result });
            }
            Message::ReadDigest {
                request,
                bucket,
                key,
            } => {
                let result = self.serve_read(&bucket, &key).map(|o| {
                    o.map(|o| o.digest())
                        .unwrap_or_else(crate::read_repair::absent_digest)
                });
                self.send(from, Message::ReadDigestReply { request, result });
            }
            Message::RepairWrite {
                request,
                bucket,
                key,
                object,
            } => {
                let reply = DurableReply::RepairWritten {
                    to: from.clone(),
                    request,
                };
                self.serve_merge(reply, &bucket, &key, &object);
            }
            Message::HintBatch { request, hints } => {
                let result = self.serve_hint_batch(hints);
                let reply = DurableReply::HintBatchStored {
                    to: from.clone(),
                    request,
                };
                self.answer_write(reply, result);
            }
            Message::AntiEntropy { request } => self.on_exchange_request(now, from, request),
            Message::Reap { range, items } => self.on_reap(range, items),
            Message::HintedWrite {
                request,
                intended,
                bucket,
                key,
                object,
            } => {
                let result = self.serve_hinted_write(now, &intended, &bucket, &key, &object);
                let reply = DurableReply::Replicated {
                    to: from.clone(),
                    request,
                };
                self.answer_write(reply, result);
            }
            Message::Coordinate {
                request,
                bucket,
                key,
                context,
                value,
            } => self.serve_coordinate_request(from, request, &bucket, &key, &context, value),
            Message::Replicate {
                request,
                bucket,
                key,
                object,
            } => {
                let reply = DurableReply::Replicated {
                    to: from.clone(),
                    request,
                };
                self.serve_merge(reply, &bucket, &key, &object);
            }
            // Replies and gossip are routed elsewhere by `handle_message`.
            _ => {}
        }
    }

    /// A replicated or repairing write: merge the object, answer once it is durable.
    fn serve_merge(&mut self, reply: DurableReply, bucket: &str, key: &[u8], object: &Object) {
        let result = self.serve_replicate(bucket, key, object);
        self.answer_write(reply, result);
    }

    /// Answers a write request: an error at once, a success once its sync is done.
    fn answer_write(&mut self, reply: DurableReply, result: Result<(), ReplicaError>) {
        match result {
            Ok(()) => self.emit_durable(reply),
            Err(error) => self.emit(reply.refused(error)),
        }
    }

    /// Sloppy quorum: keep `object` as a hint for `intended`.
    fn serve_hinted_write(
        &mut self,
        now: Millis,
        intended: &NodeId,
        bucket: &str,
        key: &[u8],
        object: &Object,
    ) -> Result<(), ReplicaError> {
        self.check_peer_input(bucket, key)?;
        self.check_peer_object(object)?;
        if self.store_hint(now, intended, bucket, key, object, true) {
            Ok(())
        } else {
            Err(ReplicaError::Storage(
                "hint not kept (budget or unknown target)".into(),
            ))
        }
    }

    /// Coordinates a peer's client write as actor. A duplicated `Coordinate` must not apply
    /// the write a second time under a new dot: it is answered from the record of the first.
    fn serve_coordinate_request(
        &mut self,
        from: &NodeId,
        request: RequestId,
        bucket: &str,
        key: &[u8],
        context: &CausalContext,
        value: Value,
    ) {
        let served = (from.clone(), request);
        let result = match self.coordination.served_coordinates.get(&served) {
            Some(result) => result.clone(),
            None => {
                let result = self.serve_coordinate(bucket, key, context, value);
                self.coordination
                    .remember_coordinate(served, result.clone());
                result
            }
        };
        match result {
            Ok(object) => self.emit_durable(DurableReply::Coordinated {
                to: from.clone(),
                request,
                object,
            }),
            Err(error) => self.send(
                from,
                Message::CoordinateReply {
                    request,
                    result: Err(error),
                },
            ),
        }
    }

    fn check_peer_input(&mut self, bucket: &str, key: &[u8]) -> Result<(), ReplicaError> {
        validate_bucket(bucket)
            .and_then(|_| validate_key(key))
            .map_err(|e| {
                self.stats.increment(Counter::InvalidPeerRequests);
                ReplicaError::Invalid(e.to_string())
            })
    }

    /// A value from a peer obeys the limits a client's does (`max_value_bytes`, the
    /// content type's length): the frame limit alone would let a peer store 8 MiB values.
    fn check_peer_value(&mut self, value: &Value) -> Result<(), ReplicaError> {
        let result = match value {
            Value::Data {
                bytes,
                content_type,
            } => validate_value_size(bytes.len(), self.config.max_value_bytes)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    if content_type.len() > MAX_CONTENT_TYPE_BYTES {
                        Err(format!(
                            "content type is over {MAX_CONTENT_TYPE_BYTES} bytes"
                        ))
                    } else {
                        Ok(())
                    }
                }),
            Value::Tombstone => Ok(()),
        };
        result.map_err(|reason| {
            self.stats.increment(Counter::InvalidPeerRequests);
            ReplicaError::Invalid(reason)
        })
    }

    /// An object from a peer: every sibling's value within the limits, and a context
    /// within the context limits.
    fn check_peer_object(&mut self, object: &Object) -> Result<(), ReplicaError> {
        for sibling in object.siblings() {
            self.check_peer_value(&sibling.value)?;
        }
        if !CausalContext::within_limits(object.context()) {
            self.stats.increment(Counter::InvalidPeerRequests);
            return Err(ReplicaError::Invalid(
                "object's version vector is over the context limits".into(),
            ));
        }
        if !object.is_well_formed() {
            self.stats.increment(Counter::InvalidPeerRequests);
            return Err(ReplicaError::Invalid(
                "object breaks the version invariants (a sibling outside its context, or \
                 an LWW object with more than its one write)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn serve_read(&mut self, bucket: &str, key: &[u8]) -> Result<Option<Object>, ReplicaError> {
        self.check_peer_input(bucket, key)?;
        self.storage.get(bucket, key).map_err(|e| {
            self.stats.increment(Counter::StorageErrors);
            ReplicaError::Storage(e.to_string())
        })
    }

    fn serve_coordinate(
        &mut self,
        bucket: &str,
        key: &[u8],
        context: &CausalContext,
        value: Value,
    ) -> Result<Object, ReplicaError> {
        self.check_peer_input(bucket, key)?;
        self.check_peer_value(&value)?;
        self.coordinate_locally(bucket, key, context, value)
            .map_err(|refusal| match refusal {
                WriteRefusal::Storage(e) => ReplicaError::Storage(e.to_string()),
                WriteRefusal::Invalid(reason) => ReplicaError::Invalid(reason),
                WriteRefusal::NotReady(reason) => ReplicaError::NotReady(reason),
                WriteRefusal::TooManySiblings(reason) => ReplicaError::TooManySiblings(reason),
            })
    }

    pub(super) fn serve_replicate(
        &mut self,
        bucket: &str,
        key: &[u8],
        incoming: &Object,
    ) -> Result<(), ReplicaError> {
        self.check_peer_input(bucket, key)?;
        self.check_peer_object(incoming)?;
        self.merge_local(bucket, key, incoming)
            .map(|_| ())
            .map_err(|e| ReplicaError::Storage(e.to_string()))
    }
}
