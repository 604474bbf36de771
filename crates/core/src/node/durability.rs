//! Durability: the acknowledgements that may only leave once a sync covers the writes they
//! acknowledge (group commit), and what each of them becomes when that sync fails.
//!
//! The model is raft-rs's `Ready`, which keeps `messages()` apart from
//! `persisted_messages()` (sent only after the fsync). Here every answer that acknowledges
//! durability is a [`DurableReply`]: it carries only its success payload, and
//! [`DurableReply::failed`] says in one exhaustive match what it turns into when the sync
//! fails. A new kind of durable answer is a new variant, and the compiler will not let it
//! forget its failure path.

use super::Action;
use crate::anti_entropy::exchange::{ExchangeResponse, Refusal, ResponseBody};
use crate::config::FsyncPolicy;
use crate::message::{ClientRequestId, ClientResponse, Message, ReplicaError, RequestId};
use crate::storage::StorageError;
use crate::version::Object;
use crate::NodeId;
use std::collections::VecDeque;

/// A sync the driver has started; hand it back to `Node::finish_sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTicket(u64);

/// An answer that acknowledges that writes are durable. It leaves the node only through
/// [`Durability::hold`], so it waits for a sync that covers every write made before it.
#[must_use = "a durable reply must be held until a sync covers it (Durability::hold)"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurableReply {
    /// A client's write was stored (204), or a blocking read whose repair merged locally.
    Client {
        client: ClientRequestId,
        response: ClientResponse,
    },
    /// A `Replicate` (or a sloppy quorum's `HintedWrite`) is stored.
    Replicated { to: NodeId, request: RequestId },
    /// A `Coordinate` was applied as actor; the resulting object.
    Coordinated {
        to: NodeId,
        request: RequestId,
        object: Object,
    },
    /// A read repair's write is stored.
    RepairWritten { to: NodeId, request: RequestId },
    /// Every hint of a `HintBatch` is stored on the replica it was meant for.
    HintBatchStored { to: NodeId, request: RequestId },
    /// An anti-entropy answer, which acknowledges the objects the driver pushed.
    Exchange {
        to: NodeId,
        response: ExchangeResponse,
    },
}

impl DurableReply {
    /// The action once the sync covering it succeeded.
    pub fn succeeded(self) -> Action {
        match self {
            DurableReply::Client { client, response } => Action::Reply { client, response },
            DurableReply::Replicated { to, request } => send(
                to,
                Message::ReplicateReply {
                    request,
                    result: Ok(()),
                },
            ),
            DurableReply::Coordinated {
                to,
                request,
                object,
            } => send(
                to,
                Message::CoordinateReply {
                    request,
                    result: Ok(object),
                },
            ),
            DurableReply::RepairWritten { to, request } => send(
                to,
                Message::RepairWriteReply {
                    request,
                    result: Ok(()),
                },
            ),
            DurableReply::HintBatchStored { to, request } => send(
                to,
                Message::HintBatchReply {
                    request,
                    result: Ok(()),
                },
            ),
            DurableReply::Exchange { to, response } => {
                send(to, Message::AntiEntropyReply { response })
            }
        }
    }

    /// The error it must become when the sync failed: nothing claims durability for
    /// writes that are not durable.
    pub fn failed(self, error: &StorageError) -> Action {
        match self {
            DurableReply::Client { client, .. } => Action::Reply {
                client,
                response: if error.is_full() {
                    ClientResponse::InsufficientStorage(error.to_string())
                } else {
                    ClientResponse::StorageFailed(error.to_string())
                },
            },
            reply => reply.refused(ReplicaError::Storage(error.to_string())),
        }
    }

    /// The answer that reports `error` in its place: the write was refused before
    /// anything was stored, or its sync failed.
    pub fn refused(self, error: ReplicaError) -> Action {
        match self {
            DurableReply::Client { client, .. } => Action::Reply {
                client,
                response: match error {
                    ReplicaError::Storage(message) => ClientResponse::StorageFailed(message),
                    ReplicaError::Invalid(message) => ClientResponse::Invalid(message),
                    ReplicaError::NotReady(message) => ClientResponse::NotReady(message),
                    ReplicaError::TooManySiblings(message) => {
                        ClientResponse::TooManySiblings(message)
                    }
                },
            },
            DurableReply::Replicated { to, request } => send(
                to,
                Message::ReplicateReply {
                    request,
                    result: Err(error),
                },
            ),
            DurableReply::Coordinated { to, request, .. } => send(
                to,
                Message::CoordinateReply {
                    request,
                    result: Err(error),
                },
            ),
            DurableReply::RepairWritten { to, request } => send(
                to,
                Message::RepairWriteReply {
                    request,
                    result: Err(error),
                },
            ),
            DurableReply::HintBatchStored { to, request } => send(
                to,
                Message::HintBatchReply {
                    request,
                    result: Err(error),
                },
            ),
            DurableReply::Exchange { to, response } => send(
                to,
                Message::AntiEntropyReply {
                    response: ExchangeResponse {
                        body: ResponseBody::Refused(match error {
                            ReplicaError::Storage(message) => Refusal::Storage(message),
                            ReplicaError::Invalid(message) => Refusal::Invalid(message),
                            ReplicaError::NotReady(_) => Refusal::Busy,
                            // Exchanges merge replicas' objects, which the limit never
                            // refuses; reported as invalid should it ever arrive here.
                            ReplicaError::TooManySiblings(message) => Refusal::Invalid(message),
                        }),
                        ..response
                    },
                },
            ),
        }
    }
}

fn send(to: NodeId, message: Message) -> Action {
    Action::Send { to, message }
}

/// Group commit's bookkeeping: which writes wait for a sync, and which durable replies
/// wait for which sync.
#[derive(Debug)]
pub(super) struct Durability {
    policy: FsyncPolicy,
    /// Replies waiting for the next sync to start.
    held: Vec<DurableReply>,
    /// Syncs under way, oldest first, each with the replies it releases.
    syncing: VecDeque<(SyncTicket, Vec<DurableReply>)>,
    next_ticket: u64,
    /// Writes were made since the last sync began (or a sync covering them failed).
    unsynced_writes: bool,
    /// Syncs finished, and failed (for the node's counters).
    pub(super) syncs: u64,
    pub(super) failed_replies: u64,
}

impl Durability {
    pub(super) fn new(policy: FsyncPolicy) -> Self {
        Self {
            policy,
            held: Vec::new(),
            syncing: VecDeque::new(),
            next_ticket: 0,
            unsynced_writes: false,
            syncs: 0,
            failed_replies: 0,
        }
    }

    /// A write was made to storage: the replies held from now on wait for a sync of it.
    pub(super) fn wrote(&mut self) {
        self.unsynced_writes = true;
    }

    /// True when writes or held replies wait for a sync.
    pub(super) fn needs_sync(&self) -> bool {
        self.unsynced_writes || !self.held.is_empty()
    }

    /// A durable reply: out at once (into `ready`) when nothing it acknowledges is unsynced
    /// or the policy does not wait for fsync; otherwise held for the sync that covers it.
    pub(super) fn hold(&mut self, reply: DurableReply, ready: &mut VecDeque<Action>) {
        if self.policy != FsyncPolicy::Always {
            ready.push_back(reply.succeeded());
        } else if self.unsynced_writes {
            self.held.push(reply);
        } else if let Some((_, batch)) = self.syncing.back_mut() {
            // The sync under way already covers every write made so far.
            batch.push(reply);
        } else {
            ready.push_back(reply.succeeded());
        }
    }

    /// Starts a sync: every reply held so far is released by its `finish`.
    pub(super) fn begin(&mut self) -> Option<SyncTicket> {
        if !self.needs_sync() {
            return None;
        }
        self.next_ticket += 1;
        let ticket = SyncTicket(self.next_ticket);
        self.unsynced_writes = false;
        self.syncing
            .push_back((ticket, std::mem::take(&mut self.held)));
        Some(ticket)
    }

    /// The driver's sync finished: releases the replies it covers, as successes or, when it
    /// failed, as the errors they become.
    pub(super) fn finish(
        &mut self,
        ticket: SyncTicket,
        result: &Result<(), StorageError>,
        ready: &mut VecDeque<Action>,
    ) {
        let Some(position) = self.syncing.iter().position(|(t, _)| *t == ticket) else {
            return;
        };
        // Syncs finish in order: an fsync covers every write before it.
        let finished: Vec<_> = self.syncing.drain(..=position).collect();
        self.syncs += 1;
        if result.is_err() {
            // The writes this sync was to cover are not durable: the next sync must cover
            // them again, and nothing acknowledges them before it succeeds.
            self.unsynced_writes = true;
        }
        for reply in finished.into_iter().flat_map(|(_, replies)| replies) {
            match result {
                Ok(()) => ready.push_back(reply.succeeded()),
                Err(error) => {
                    self.failed_replies += 1;
                    ready.push_back(reply.failed(error));
                }
            }
        }
    }
}
