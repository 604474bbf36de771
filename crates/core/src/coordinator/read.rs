//! The read state machine, with digest reads and read repair.
//!
//! A read contacts exactly as many replicas as its level needs: the *data replica* (the
//! coordinator itself when it is a replica, else the replica that answered fastest recently)
//! for the full object, the others for a digest. A replica that fails is replaced by the next
//! one in the preference list. Once enough replies are in, [`crate::read_repair::resolve`]
//! decides: replicas whose digest matches no full copy are fetched in full; when `required`
//! replicas are resolved, the answer is the causal merge, and the replicas behind it are to
//! be repaired. After answering, a read may go on in the background (read repair's
//! `background_chance`): it then asks the replicas outside the level for digests and repairs
//! them too.

use crate::quorum::ConsistencyLevel;
use crate::read_repair::{resolve, ReplicaCopy, Resolution};
use crate::version::Object;
use crate::{Millis, NodeId};
use std::collections::BTreeMap;

use super::AfterRead;
use crate::message::ClientRequestId;

/// What to ask a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    Full,
    Digest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ReplicaRead {
    Awaiting(ReadKind),
    /// Sent its digest; its full object is on the way when `fetching`.
    Digest {
        digest: u64,
        fetching: bool,
    },
    Full(Object),
    Failed,
}

/// Where a read stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadProgress {
    Pending,
    /// `required` replicas are resolved: the answer and who is behind it.
    Met(Resolution),
    Failed {
        needed: usize,
        answered: usize,
    },
}

#[derive(Debug, Clone)]
pub struct GetOperation {
    pub client: ClientRequestId,
    pub bucket: String,
    pub key: Vec<u8>,
    pub deadline: Millis,
    pub after: AfterRead,
    required: usize,
    /// The preference list, live replicas first.
    candidates: Vec<NodeId>,
    contacted: BTreeMap<NodeId, ReplicaRead>,
    /// Send times, for the latency estimate that picks data replicas.
    pub sent_at: BTreeMap<NodeId, Millis>,
    digest_reads: bool,
    /// The client has its answer; what remains is background repair.
    pub answered: bool,
    /// Replicas already repaired when the client was answered.
    pub repaired: Vec<NodeId>,
}

impl GetOperation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: ClientRequestId,
        bucket: String,
        key: Vec<u8>,
        level: ConsistencyLevel,
        candidates: Vec<NodeId>,
        deadline: Millis,
        after: AfterRead,
        digest_reads: bool,
    ) -> Self {
        GetOperation {
            client,
            bucket,
            key,
            deadline,
            after,
            required: level.required(candidates.len()),
            candidates,
            contacted: BTreeMap::new(),
            sent_at: BTreeMap::new(),
            digest_reads,
            answered: false,
            repaired: Vec::new(),
        }
    }

    /// The first requests: the full object from `data_replica`, digests from enough others.
    pub fn start(&mut self, data_replica: &NodeId, now: Millis) -> Vec<(NodeId, ReadKind)> {
        let mut out = vec![];
        if self.candidates.contains(data_replica) {
            out.push(self.contact(data_replica.clone(), ReadKind::Full, now));
        }
        while self.contacted.len() < self.required {
            let Some(next) = self.next_uncontacted() else {
                break;
            };
            let kind = if self.digest_reads && !out.is_empty() {
                ReadKind::Digest
            } else {
                ReadKind::Full
            };
            out.push(self.contact(next, kind, now));
        }
        out
    }

    /// Background continuation: digests from every replica not yet asked.
    pub fn contact_the_rest(&mut self, now: Millis) -> Vec<(NodeId, ReadKind)> {
        let mut out = vec![];
        while let Some(next) = self.next_uncontacted() {
            let kind = if self.digest_reads {
                ReadKind::Digest
            } else {
                ReadKind::Full
            };
            out.push(self.contact(next, kind, now));
        }
        out
    }

    /// Speculative retry: the level is not met yet, so one more replica is asked (in full
    /// when no full copy has arrived, else for a digest), in case a contacted one is slow.
    pub fn speculate(&mut self, now: Millis) -> Vec<(NodeId, ReadKind)> {
        if self.answered || !matches!(self.progress(), ReadProgress::Pending) {
            return vec![];
        }
        let Some(next) = self.next_uncontacted() else {
            return vec![];
        };
        let has_full = self
            .contacted
            .values()
            .any(|r| matches!(r, ReplicaRead::Full(_)));
        let kind = if self.digest_reads && has_full {
            ReadKind::Digest
        } else {
            ReadKind::Full
        };
        vec![self.contact(next, kind, now)]
    }

    fn next_uncontacted(&self) -> Option<NodeId> {
        self.candidates
            .iter()
            .find(|c| !self.contacted.contains_key(*c))
            .cloned()
    }

    fn contact(&mut self, node: NodeId, kind: ReadKind, now: Millis) -> (NodeId, ReadKind) {
        self.contacted
            .insert(node.clone(), ReplicaRead::Awaiting(kind));
        self.sent_at.insert(node.clone(), now);
        (node, kind)
    }

    pub fn is_awaiting(&self, node: &NodeId) -> bool {
        matches!(
            self.contacted.get(node),
            Some(ReplicaRead::Awaiting(_)) | Some(ReplicaRead::Digest { fetching: true, .. })
        )
    }

    /// Nothing more is expected from any contacted replica.
    pub fn settled(&self) -> bool {
        !self.contacted.keys().any(|n| self.is_awaiting(n))
    }

    /// A full object arrived (an absent key is `None`). Replies not expected are ignored: the
    /// network may duplicate messages.
    pub fn on_full(
        &mut self,
        from: &NodeId,
        object: Option<Object>,
        now: Millis,
    ) -> Vec<(NodeId, ReadKind)> {
        match self.contacted.get(from) {
            Some(ReplicaRead::Awaiting(ReadKind::Full))
            | Some(ReplicaRead::Digest { fetching: true, .. }) => {
                self.contacted
                    .insert(from.clone(), ReplicaRead::Full(object.unwrap_or_default()));
                self.follow_up(now)
            }
            _ => vec![],
        }
    }

    pub fn on_digest(
        &mut self,
        from: &NodeId,
        digest: u64,
        now: Millis,
    ) -> Vec<(NodeId, ReadKind)> {
        if self.contacted.get(from) != Some(&ReplicaRead::Awaiting(ReadKind::Digest)) {
            return vec![];
        }
        self.contacted.insert(
            from.clone(),
            ReplicaRead::Digest {
                digest,
                fetching: false,
            },
        );
        self.follow_up(now)
    }

    /// A replica failed or is unreachable: another one takes its place.
    pub fn on_failed(&mut self, from: &NodeId, now: Millis) -> Vec<(NodeId, ReadKind)> {
        if !self.is_awaiting(from) {
            return vec![];
        }
        self.contacted.insert(from.clone(), ReplicaRead::Failed);
        let mut out = vec![];
        if !self.answered {
            if let Some(next) = self.next_uncontacted() {
                let kind = if self.digest_reads && self.has_full_or_pending_full() {
                    ReadKind::Digest
                } else {
                    ReadKind::Full
                };
                out.push(self.contact(next, kind, now));
            }
        }
        out.extend(self.follow_up(now));
        out
    }

    fn has_full_or_pending_full(&self) -> bool {
        self.contacted.values().any(|r| {
            matches!(
                r,
                ReplicaRead::Full(_)
                    | ReplicaRead::Awaiting(ReadKind::Full)
                    | ReplicaRead::Digest { fetching: true, .. }
            )
        })
    }

    fn replied(&self) -> usize {
        self.contacted
            .values()
            .filter(|r| matches!(r, ReplicaRead::Full(_) | ReplicaRead::Digest { .. }))
            .count()
    }

    fn failed(&self) -> usize {
        self.contacted
            .values()
            .filter(|r| matches!(r, ReplicaRead::Failed))
            .count()
    }

    /// Fetches in full the digests that match no full copy, once enough replies are in (or
    /// at once when no full copy can come otherwise).
    fn follow_up(&mut self, now: Millis) -> Vec<(NodeId, ReadKind)> {
        let enough = self.replied() >= self.required || self.answered;
        let no_full_coming = !self.has_full_or_pending_full();
        if !enough && !no_full_coming {
            return vec![];
        }
        let resolution = self.resolution();
        let mut out = vec![];
        for node in resolution.unresolved {
            if let Some(ReplicaRead::Digest {
                digest,
                fetching: false,
            }) = self.contacted.get(&node).cloned()
            {
                self.contacted.insert(
                    node.clone(),
                    ReplicaRead::Digest {
                        digest,
                        fetching: true,
                    },
                );
                self.sent_at.insert(node.clone(), now);
                out.push((node, ReadKind::Full));
                if no_full_coming && !enough {
                    // One full copy is enough to resolve the matching digests.
                    break;
                }
            }
        }
        out
    }

    fn resolution(&self) -> Resolution {
        resolve(self.contacted.iter().filter_map(|(node, read)| match read {
            ReplicaRead::Full(object) => Some((node, ReplicaCopy::Full(object))),
            ReplicaRead::Digest { digest, .. } => Some((node, ReplicaCopy::Digest(*digest))),
            _ => None,
        }))
    }

    /// Where the read stands.
    pub fn progress(&self) -> ReadProgress {
        let resolution = self.resolution();
        if resolution.resolved.len() >= self.required {
            return ReadProgress::Met(resolution);
        }
        let possible = self.candidates.len() - self.failed();
        if possible < self.required {
            return ReadProgress::Failed {
                needed: self.required,
                answered: self.replied(),
            };
        }
        ReadProgress::Pending
    }

    /// The final resolution over every replica that answered (for background repair).
    pub fn final_resolution(&self) -> Resolution {
        self.resolution()
    }

    pub fn needed_and_answered(&self) -> (usize, usize) {
        (self.required, self.replied())
    }
}
