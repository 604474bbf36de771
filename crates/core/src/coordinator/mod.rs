//! Per-request state machines for get / put / delete at the coordinating node.
//!
//! Each operation knows which replicas it asked, counts their answers against the
//! consistency level with a [`Quorum`], and says what the node must do next. They never
//! touch storage or the network themselves: the node (`node.rs`) carries out their
//! decisions, which keeps them small and easy to test.
//!
//! Writes are coordinated by a replica of the key (the *actor*), because a dot is only unique
//! when the actor holds its own earlier writes to that key. A node that is not a replica asks
//! the first live replica to coordinate (`Message::Coordinate`), then replicates the result.

use crate::quorum::{ConsistencyLevel, Quorum, QuorumStatus};
use crate::version::{CausalContext, Object, Value};
use crate::{Millis, NodeId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::message::ClientRequestId;

mod read;

pub use read::{GetOperation, ReadKind, ReadProgress};

/// What happens once a read has met its level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterRead {
    /// Answer the client with the merged object.
    Answer,
    /// A DELETE without context: write a tombstone over everything the read saw.
    Delete { level: ConsistencyLevel },
}

/// Where a write stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PutPhase {
    /// Waiting for `actor` to coordinate the write; untried replicas may take over.
    Coordinating { actor: NodeId },
    /// The object exists; waiting for replicas to store it.
    Replicating,
}

/// A write (put or tombstone) in flight.
#[derive(Debug, Clone)]
pub struct PutOperation {
    pub client: ClientRequestId,
    pub bucket: String,
    pub key: Vec<u8>,
    pub context: CausalContext,
    pub value: Value,
    pub deadline: Millis,
    replicas: Vec<NodeId>,
    untried_actors: VecDeque<NodeId>,
    phase: PutPhase,
    awaiting: BTreeSet<NodeId>,
    votes: Votes,
    object: Option<Object>,
    /// Replicas that could not store the object: they get hints.
    pub failed_replicas: Vec<NodeId>,
    /// Replicas whose `Coordinate` could not be sent (counted once against the level).
    failed_actors: Vec<NodeId>,
    /// Sloppy quorum: fallback nodes may stand in for unreachable replicas.
    pub sloppy: bool,
    /// Fallback node -> the replica it stands in for.
    fallbacks: BTreeMap<NodeId, NodeId>,
    /// Replicas whose write a fallback holds as a hint.
    covered: BTreeSet<NodeId>,
    /// The client has its answer; the operation waits for the remaining replicas only to
    /// hint the ones that do not answer.
    pub answered: bool,
    /// The coordinator is a replica whose disk is full: a write that fails its level is
    /// answered as insufficient storage (507), not as unavailable.
    local_storage_full: bool,
}

/// The level a write must meet in each of its preference lists: one list, or two while a
/// cluster change is active (the old and the new owners; see `membership::Layout`). A
/// node's answer counts in every list that holds it.
#[derive(Debug, Clone)]
struct Votes {
    lists: Vec<(Vec<NodeId>, Quorum)>,
}

impl Votes {
    fn new(level: ConsistencyLevel, lists: Vec<Vec<NodeId>>) -> Self {
        Votes {
            lists: lists
                .into_iter()
                .map(|list| {
                    let quorum = Quorum::new(level, list.len());
                    (list, quorum)
                })
                .collect(),
        }
    }

    fn success(&mut self, node: &NodeId) {
        for (list, quorum) in &mut self.lists {
            if list.contains(node) {
                quorum.record_success();
            }
        }
    }

    fn failure(&mut self, node: &NodeId) {
        for (list, quorum) in &mut self.lists {
            if list.contains(node) {
                quorum.record_failure();
            }
        }
    }

    fn status(&self) -> QuorumStatus {
        let statuses: Vec<QuorumStatus> = self.lists.iter().map(|(_, q)| q.status()).collect();
        if statuses.contains(&QuorumStatus::Failed) {
            QuorumStatus::Failed
        } else if statuses.iter().all(|s| *s == QuorumStatus::Met) {
            QuorumStatus::Met
        } else {
            QuorumStatus::Pending
        }
    }

    /// Needed and answered of the list furthest from its level (the one a client must hear
    /// about).
    fn needed_and_answered(&self) -> (usize, usize) {
        self.lists
            .iter()
            .map(|(_, q)| (q.required, q.succeeded))
            .max_by_key(|(required, succeeded)| required.saturating_sub(*succeeded))
            .unwrap_or((1, 0))
    }
}

/// What the node must do for a write next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteStep {
    Pending,
    /// Ask this replica to coordinate the write.
    AskActor(NodeId),
    /// Send the coordinated object to these replicas.
    Replicate(Vec<NodeId>, Object),
    /// Sloppy quorum: `intended` could not store the object; a fallback node should keep it
    /// as a hint and count toward the level (`add_fallback`, or `no_fallback` if none is up).
    Fallback {
        intended: NodeId,
    },
    /// The level is met: the context of the new object.
    Met(CausalContext),
    Failed {
        needed: usize,
        answered: usize,
    },
}

impl PutOperation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: ClientRequestId,
        bucket: String,
        key: Vec<u8>,
        context: CausalContext,
        value: Value,
        level: ConsistencyLevel,
        replicas: Vec<NodeId>,
        deadline: Millis,
    ) -> Self {
        let lists = vec![replicas.clone()];
        Self::with_lists(
            client, bucket, key, context, value, level, replicas, lists, deadline,
        )
    }

    /// A write that must meet `level` in each of `lists` (`replicas` is their union, in the
    /// order actors are tried).
    #[allow(clippy::too_many_arguments)]
    pub fn with_lists(
        client: ClientRequestId,
        bucket: String,
        key: Vec<u8>,
        context: CausalContext,
        value: Value,
        level: ConsistencyLevel,
        replicas: Vec<NodeId>,
        lists: Vec<Vec<NodeId>>,
        deadline: Millis,
    ) -> Self {
        let votes = Votes::new(level, lists);
        PutOperation {
            client,
            bucket,
            key,
            context,
            value,
            deadline,
            untried_actors: VecDeque::new(),
            replicas,
            phase: PutPhase::Replicating,
            awaiting: BTreeSet::new(),
            votes,
            object: None,
            failed_replicas: Vec::new(),
            failed_actors: Vec::new(),
            sloppy: false,
            fallbacks: BTreeMap::new(),
            covered: BTreeSet::new(),
            answered: false,
            local_storage_full: false,
        }
    }

    /// The coordinator is itself the actor and has stored `object` locally.
    pub fn coordinated_locally(&mut self, me: &NodeId, object: Object) -> WriteStep {
        self.votes.success(me);
        self.replicate(me, object)
    }

    /// The coordinator is not a replica: choose the actor among `candidates` (replicas in
    /// preference order, live ones first).
    pub fn start_remote(&mut self, candidates: Vec<NodeId>) -> WriteStep {
        self.untried_actors = candidates.into();
        self.next_actor()
    }

    /// The coordinator is a replica but its disk is full and nothing was written: it counts
    /// once against the level (no `Replicate` to itself, no hint: hints live on the same
    /// disk) and another replica among `candidates` coordinates, as for a non-replica
    /// coordinator. Safe because no dot was issued here.
    pub fn start_remote_storage_full(&mut self, me: &NodeId, candidates: Vec<NodeId>) -> WriteStep {
        self.local_storage_full = true;
        self.votes.failure(me);
        self.failed_actors.push(me.clone());
        if self.votes.status() == QuorumStatus::Failed {
            self.phase = PutPhase::Replicating;
            return self.step();
        }
        self.start_remote(candidates.into_iter().filter(|n| n != me).collect())
    }

    /// True when this write could not be stored locally because the disk is full.
    pub fn local_storage_full(&self) -> bool {
        self.local_storage_full
    }

    fn next_actor(&mut self) -> WriteStep {
        match self.untried_actors.pop_front() {
            Some(actor) => {
                self.phase = PutPhase::Coordinating {
                    actor: actor.clone(),
                };
                WriteStep::AskActor(actor)
            }
            None => {
                self.phase = PutPhase::Replicating;
                self.step()
            }
        }
    }

    fn replicate(&mut self, actor: &NodeId, object: Object) -> WriteStep {
        self.phase = PutPhase::Replicating;
        // Replicas that already failed as actors were counted once; they get hints, not a
        // second message (and a second vote against the level).
        let others: Vec<NodeId> = self
            .replicas
            .iter()
            .filter(|r| *r != actor && !self.failed_actors.contains(r))
            .cloned()
            .collect();
        self.failed_replicas
            .extend(self.failed_actors.iter().cloned());
        self.awaiting = others.iter().cloned().collect();
        self.object = Some(object.clone());
        if others.is_empty() {
            self.step()
        } else {
            WriteStep::Replicate(others, object)
        }
    }

    /// The actor answered a `Coordinate`. An error (or a loss after the message may have
    /// arrived) ends the write as failed: the actor may have applied it, and asking another
    /// actor would give the same client write a second dot, which a later delete could miss.
    pub fn on_coordinated(&mut self, from: &NodeId, result: Result<Object, ()>) -> WriteStep {
        let PutPhase::Coordinating { actor } = &self.phase else {
            return WriteStep::Pending;
        };
        if actor != from {
            return WriteStep::Pending;
        }
        let actor = actor.clone();
        match result {
            Ok(object) => {
                self.votes.success(&actor);
                self.replicate(&actor, object)
            }
            Err(()) => {
                self.votes.failure(&actor);
                self.untried_actors.clear();
                self.phase = PutPhase::Replicating;
                self.step()
            }
        }
    }

    /// The `Coordinate` never left this node (no connection): another replica may safely
    /// take over. The unreachable actor counts once against the level and gets a hint later.
    fn on_actor_unreachable(&mut self, actor: &NodeId) -> WriteStep {
        self.votes.failure(actor);
        self.failed_actors.push(actor.clone());
        match self.votes.status() {
            QuorumStatus::Failed => {
                self.phase = PutPhase::Replicating;
                self.step()
            }
            _ => self.next_actor(),
        }
    }

    /// A replica answered a `Replicate`.
    pub fn on_replicated(&mut self, from: &NodeId, ok: bool) -> WriteStep {
        if !self.awaiting.remove(from) {
            return WriteStep::Pending;
        }
        let intended = self.fallbacks.get(from).cloned();
        if ok {
            // A fallback's answer counts for the replica it stands in for.
            self.votes.success(intended.as_ref().unwrap_or(from));
            if let Some(intended) = intended {
                self.covered.insert(intended);
            }
            return self.step();
        }
        match intended {
            // A replica failed: under sloppy quorum a fallback may take its place.
            None if self.sloppy => WriteStep::Fallback {
                intended: from.clone(),
            },
            None => {
                self.votes.failure(from);
                self.failed_replicas.push(from.clone());
                self.step()
            }
            // A fallback failed: the coordinator hints the replica it stood for.
            Some(intended) => {
                self.votes.failure(&intended);
                self.failed_replicas.push(intended);
                self.step()
            }
        }
    }

    /// Sloppy quorum: `fallback` keeps the object as a hint for `intended` and its answer
    /// counts toward the level in `intended`'s place.
    pub fn add_fallback(&mut self, fallback: NodeId, intended: NodeId) {
        self.awaiting.insert(fallback.clone());
        self.fallbacks.insert(fallback, intended);
    }

    /// Sloppy quorum found no live fallback for `intended`: it counts as failed.
    pub fn no_fallback(&mut self, intended: NodeId) -> WriteStep {
        self.votes.failure(&intended);
        self.failed_replicas.push(intended);
        self.step()
    }

    /// Nodes serving as fallbacks for this write (they must not be picked twice).
    pub fn fallbacks(&self) -> impl Iterator<Item = &NodeId> {
        self.fallbacks.keys()
    }

    pub fn replicas(&self) -> &[NodeId] {
        &self.replicas
    }

    /// A replica could not be reached: the message never left (`maybe_delivered` false), or
    /// the peer went down after it may have arrived.
    pub fn on_replica_failed(&mut self, node: &NodeId, maybe_delivered: bool) -> WriteStep {
        let is_actor = matches!(&self.phase, PutPhase::Coordinating { actor } if actor == node);
        match (is_actor, maybe_delivered) {
            (true, false) => self.on_actor_unreachable(node),
            (true, true) => self.on_coordinated(node, Err(())),
            (false, _) => self.on_replicated(node, false),
        }
    }

    /// Where the vote stands now.
    pub fn step(&self) -> WriteStep {
        let (needed, answered) = self.votes.needed_and_answered();
        match (self.votes.status(), &self.object) {
            (QuorumStatus::Met, Some(object)) => WriteStep::Met(object.causal_context()),
            (QuorumStatus::Failed, _) => WriteStep::Failed { needed, answered },
            (QuorumStatus::Met, None) | (QuorumStatus::Pending, _) => {
                if self.object.is_none()
                    && self.untried_actors.is_empty()
                    && !matches!(self.phase, PutPhase::Coordinating { .. })
                {
                    WriteStep::Failed { needed, answered }
                } else {
                    WriteStep::Pending
                }
            }
        }
    }

    /// The coordinated object, once it exists.
    pub fn object(&self) -> Option<&Object> {
        self.object.as_ref()
    }

    /// Replicas that have not stored the object: failed ones, and those still silent.
    pub fn unacknowledged(&self) -> Vec<NodeId> {
        let mut nodes = self.failed_replicas.clone();
        for node in &self.awaiting {
            nodes.push(self.fallbacks.get(node).unwrap_or(node).clone());
        }
        // A replica whose fallback holds the hint needs no second one from the coordinator.
        nodes.retain(|n| !self.covered.contains(n));
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// No replica reply is expected any more.
    pub fn settled(&self) -> bool {
        self.awaiting.is_empty() && !matches!(self.phase, PutPhase::Coordinating { .. })
    }

    /// True when a reply from `node` is still expected (used when a peer goes down).
    pub fn is_awaiting(&self, node: &NodeId) -> bool {
        self.awaiting.contains(node)
            || matches!(&self.phase, PutPhase::Coordinating { actor } if actor == node)
    }

    pub fn needed_and_answered(&self) -> (usize, usize) {
        self.votes.needed_and_answered()
    }
}

#[cfg(test)]
mod tests;
