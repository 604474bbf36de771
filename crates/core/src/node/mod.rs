//! The node: every input arrives through a `handle_*` method, every output leaves through
//! [`Node::poll_action`]. Drivers (the tokio server, the simulator) own the clock, the
//! network and the timing of fsyncs; the node owns the protocol.
//!
//! # Group commit
//! Under [`FsyncPolicy::Always`], an action that acknowledges a write (a client's 204, a
//! replica's `ReplicateReply`) is *held* until a sync that covers the write has finished.
//! The driver calls [`Node::begin_sync`] when it has drained a batch of inputs, fsyncs on
//! its own time (another thread, or virtual time), then calls [`Node::finish_sync`]: every
//! write of the batch shares that one fsync.

use crate::anti_entropy::{ExchangeId, ItemHasher, RangeTrees, TreeShape};
use crate::config::NodeConfig;
use crate::control::{CircuitBreaker, RepairQueue, RepairQueueConfig, TokenBucket};
use crate::coordinator::{AfterRead, GetOperation, PutOperation, WriteStep};
use crate::gossip::{initial_state, Gossiper, NodeStatus};
use crate::hinted_handoff::{DropReason, HintQueue};
use crate::membership::{MemberInfo, Membership, PeerStatus};
use crate::message::{
    ClientRequest, ClientRequestId, ClientResponse, Message, ReplicaError, RequestId,
};
use crate::quorum::ConsistencyLevel;
use crate::request::{validate_bucket, validate_key, validate_value_size};
use crate::ring::{Ring, TokenRange};
use crate::storage::{Storage, StorageError};
use crate::version::{Actor, CausalContext, Object, Value, MAX_CONTEXT_ACTORS, MAX_COUNTER};
use crate::{Millis, NodeId};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        to: NodeId,
        message: Message,
    },
    Reply {
        client: ClientRequestId,
        response: ClientResponse,
    },
}

/// Counters the drivers export as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub local_writes: u64,
    pub syncs: u64,
    pub invalid_peer_requests: u64,
    pub storage_errors: u64,
    pub requests_timed_out: u64,
    pub requests_overloaded: u64,
    /// Inconsistent reads found, by outcome (SPEC `mendkv_read_repair_total{outcome}`).
    pub read_repair_repaired: u64,
    pub read_repair_failed: u64,
    pub read_repair_skipped: u64,
    /// Repair writes (SPEC `mendkv_repairs_total{mechanism="read_repair",outcome}`).
    pub read_repair_writes_ok: u64,
    pub read_repair_writes_failed: u64,
    /// Hinted handoff (SPEC `mendkv_hints_*`); `hints_dropped` is indexed by `DropReason`.
    pub hints_stored: u64,
    pub hints_delivered: u64,
    pub hints_expired: u64,
    pub hints_dropped: [u64; 5],
    pub hint_writes_ok: u64,
    pub hint_writes_failed: u64,
    /// Anti-entropy (SPEC `mendkv_anti_entropy_*`, `mendkv_repairs_total{mechanism="anti_entropy"}`).
    pub tree_rebuilds: u64,
    pub anti_entropy_exchanges_ok: u64,
    pub anti_entropy_exchanges_failed: u64,
    pub anti_entropy_keys_repaired: u64,
    pub anti_entropy_bytes: u64,
    pub tree_verifications: u64,
    pub tree_verification_mismatches: u64,
    pub tombstones_reaped: u64,
    /// Times gossip showed this node had run under a higher epoch (a lost data directory).
    pub epochs_learned_from_peers: u64,
}

#[derive(Debug)]
enum Operation {
    Get(GetOperation),
    /// Boxed: a write carries its object, context and replica bookkeeping.
    Put(Box<PutOperation>),
    Repair(read::RepairOperation),
}

impl Operation {
    fn deadline(&self) -> Millis {
        match self {
            Operation::Get(op) => op.deadline,
            Operation::Put(op) => op.deadline,
            Operation::Repair(op) => op.deadline,
        }
    }

    fn is_awaiting(&self, node: &NodeId) -> bool {
        match self {
            Operation::Get(op) => op.is_awaiting(node),
            Operation::Put(op) => op.is_awaiting(node),
            Operation::Repair(op) => op.pending.contains(node),
        }
    }
}

pub struct Node<S: Storage> {
    config: NodeConfig,
    storage: S,
    actor: Actor,
    epoch: u32,
    /// False while a node that started without an epoch record waits to hear from peers
    /// whether it ran before (see `epoch.rs`); it issues no dots meanwhile.
    epoch_confirmed: bool,
    membership: Membership,
    ring: Ring,
    next_request: u64,
    operations: BTreeMap<RequestId, Operation>,
    deadlines: BTreeSet<(Millis, RequestId)>,
    ready: VecDeque<Action>,
    /// Group commit: durable replies wait here for the sync that covers them.
    durability: Durability,
    gossiper: Gossiper,
    stats: NodeStats,
    rng: StdRng,
    /// Recent reply latency per peer (moving average), to pick data replicas.
    peer_latency_ms: BTreeMap<NodeId, Millis>,
    repairs_in_flight: usize,
    hint_queue: HintQueue,
    hint_batches: BTreeMap<RequestId, hints::HintBatchInFlight>,
    /// Hints replayed per second (`delivery_rate_per_s`), a token bucket counting hints.
    delivery_budget: TokenBucket,
    next_delivery_at: Millis,
    repair_marks: BTreeSet<TokenRange>,
    repair_marks_overflowed: bool,
    /// Recent `Coordinate` requests served as actor, so duplicates are answered, not re-applied.
    served_coordinates: BTreeMap<(NodeId, RequestId), Result<Object, ReplicaError>>,
    served_order: VecDeque<(NodeId, RequestId)>,
    /// When reads ask one more replica if still unanswered (see `speculative_retry_ms`).
    speculations: BTreeSet<(Millis, RequestId)>,
    trees: RangeTrees,
    exchanges: BTreeMap<ExchangeId, anti_entropy::ActiveExchange>,
    repair_queue: RepairQueue<(TokenRange, NodeId)>,
    /// Repair bytes, shared by anti-entropy and hint replay.
    repair_bytes: TokenBucket,
    repair_runs: BTreeMap<u64, anti_entropy::RepairRun>,
    next_run: u64,
    repair_debt: BTreeMap<NodeId, u64>,
    /// The latest `now` seen (for samples taken in `poll_action`).
    clock: Millis,
    /// Start times of client requests in flight, for the breaker's latency samples.
    client_started: BTreeMap<ClientRequestId, Millis>,
    /// Pauses scheduled anti-entropy and hint replay while foreground traffic suffers.
    breaker: CircuitBreaker,
    /// The scheduled exchange let through by a half-open breaker.
    breaker_probe: Option<(TokenRange, NodeId)>,
    /// Last converged exchange per (range, peer), and tombstone snapshots per range, for
    /// tombstone reaping.
    converged_at: BTreeMap<(TokenRange, NodeId), Millis>,
    reap_snapshots: BTreeMap<TokenRange, (Millis, BTreeSet<anti_entropy::ReapItem>)>,
    /// The highest counter of this node's actor in any tombstone it reaped this epoch. The
    /// actor's new dots lie above it: a reaped dot reused (the key's object, and with it the
    /// actor's counter, is gone) would be covered by contexts read from the tombstone,
    /// which never saw the new write. A restart starts a new epoch (a new actor), so memory
    /// is enough.
    reaped_counter_floor: u64,
    /// When the next tree verification is due, and which range it takes.
    next_verify_at: Millis,
    verify_cursor: usize,
    /// While the repair byte budget is spent, anti-entropy waits until this time.
    repair_throttled_until: Millis,
    /// Durations of finished exchanges, drained by the driver into a histogram.
    exchange_durations_ms: VecDeque<Millis>,
}

/// Why a client write could not be applied as actor.
#[derive(Debug)]
enum WriteRefusal {
    Storage(StorageError),
    /// The write breaks a rule (the answer is a 400, and nothing changed).
    Invalid(String),
    /// This node may not issue dots yet (its epoch is unconfirmed).
    NotReady(String),
}

/// Longest content type stored (longer ones are cut by the HTTP layer, refused from peers).
pub const MAX_CONTENT_TYPE_BYTES: usize = 256;

/// How many served `Coordinate` requests are remembered. A duplicate arriving later than
/// this many forwarded writes after its original would be applied again; the network
/// delivers duplicates within a request timeout, far fewer writes than this.
const MAX_SERVED_COORDINATES: usize = 4096;

impl<S: Storage> Node<S> {
    /// Opens a node over its storage. The epoch grows (durably) on every start, so a node
    /// that lost un-synced writes in a crash never reuses one of their dots.
    pub fn new(config: NodeConfig, storage: S, now: Millis) -> Result<Self, StorageError> {
        let (epoch, fresh) = epoch::next_epoch(&storage)?;
        let me = MemberInfo {
            id: config.node_id.clone(),
            peer_address: config.peer_address.clone(),
            http_address: config.http_address.clone(),
        };
        let membership = Membership::new(me);
        let ring = Ring::new(membership.ids(), config.vnodes, config.replication_factor);
        let (hint_queue, corrupt_hints) = hints::load_hint_queue(&storage);
        let gossiper = Gossiper::new(
            config.node_id.clone(),
            u64::from(epoch),
            initial_state(
                NodeStatus::Normal,
                &config.peer_address,
                &config.http_address,
                config.vnodes,
            ),
            Vec::new(),
            config.gossip.clone(),
            now,
        )
        .map_err(|e| StorageError::Engine(format!("gossip: {e}")))?;
        let mut stats = NodeStats::default();
        stats.hints_dropped[DropReason::Corrupt as usize] = corrupt_hints;
        let mut node = Node {
            hint_queue,
            hint_batches: BTreeMap::new(),
            delivery_budget: TokenBucket::new(
                config.hinted_handoff.delivery_rate_per_s,
                config.hinted_handoff.delivery_rate_per_s,
                now,
            ),
            next_delivery_at: now,
            repair_marks: BTreeSet::new(),
            repair_marks_overflowed: false,
            served_coordinates: BTreeMap::new(),
            served_order: VecDeque::new(),
            speculations: BTreeSet::new(),
            trees: RangeTrees::new(
                ItemHasher::from_cluster_secret(&config.tree_hash_secret),
                TreeShape::DEFAULT,
            ),
            exchanges: BTreeMap::new(),
            repair_queue: RepairQueue::new(RepairQueueConfig {
                interval_ms: config.anti_entropy.interval_ms,
                ..RepairQueueConfig::default()
            }),
            repair_bytes: TokenBucket::new(
                config.anti_entropy.rate_limit_bytes_per_s,
                config.anti_entropy.rate_limit_bytes_per_s.max(1 << 20),
                now,
            ),
            repair_runs: BTreeMap::new(),
            next_run: 0,
            repair_debt: BTreeMap::new(),
            exchange_durations_ms: VecDeque::new(),
            repair_throttled_until: 0,
            converged_at: BTreeMap::new(),
            reap_snapshots: BTreeMap::new(),
            reaped_counter_floor: 0,
            next_verify_at: now + config.anti_entropy.verify_interval_ms,
            verify_cursor: 0,
            clock: now,
            client_started: BTreeMap::new(),
            breaker: CircuitBreaker::new(config.circuit_breaker.clone()),
            breaker_probe: None,
            actor: Actor::new(config.node_id.as_str(), epoch),
            epoch,
            epoch_confirmed: !(fresh && config.learn_epoch_from_peers),
            membership,
            ring,
            next_request: 0,
            operations: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            ready: VecDeque::new(),
            durability: Durability::new(config.fsync),
            gossiper,
            stats,
            rng: StdRng::seed_from_u64(config.rng_seed),
            peer_latency_ms: BTreeMap::new(),
            repairs_in_flight: 0,
            storage,
            config,
        };
        if !node.epoch_confirmed {
            node.gossiper.set_announce_self(false);
        }
        // Trees are rebuilt by one scan at every start: a tree persisted before a crash could
        // disagree with what the crash left of the data.
        node.align_trees();
        Ok(node)
    }

    pub fn id(&self) -> &NodeId {
        &self.config.node_id
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Gives the storage back (the simulator keeps it across a crash).
    pub fn into_storage(self) -> S {
        self.storage
    }

    pub fn pending_operations(&self) -> usize {
        self.operations.len()
    }

    /// The next action for the driver, if any. Call it until it returns `None` after every
    /// `handle_*` call and after `finish_sync`; then, if [`Node::needs_sync`], start a sync
    /// with [`Node::begin_sync`], and call `handle_tick` at [`Node::next_deadline`] at the
    /// latest. Nothing else makes new actions appear.
    #[must_use = "actions not polled are messages never sent and replies never given"]
    pub fn poll_action(&mut self) -> Option<Action> {
        let action = self.ready.pop_front()?;
        if let Action::Reply { client, response } = &action {
            // Every client answer is a stress sample for the repair circuit breaker.
            if let Some(started) = self.client_started.remove(client) {
                let ok = matches!(
                    response,
                    ClientResponse::Object(_) | ClientResponse::Written { .. }
                );
                let now = self.clock;
                self.breaker.record(now, now.saturating_sub(started), ok);
            }
        }
        Some(action)
    }

    /// Whether repair work (scheduled anti-entropy, hint replay) is paused by the breaker.
    pub fn repair_breaker_open(&mut self) -> bool {
        let now = self.clock;
        self.breaker.is_open(now)
    }

    /// How often the breaker opened since start.
    pub fn repair_breaker_trips(&self) -> u64 {
        self.breaker.trips()
    }

    /// The earliest time `handle_tick` has work to do.
    pub fn next_deadline(&self) -> Millis {
        let op = self
            .deadlines
            .first()
            .map(|(d, _)| *d)
            .unwrap_or(Millis::MAX);
        let hints = if self.hint_queue.total_hints() > 0 || !self.hint_batches.is_empty() {
            self.next_delivery_at
        } else {
            Millis::MAX
        };
        let speculation = self
            .speculations
            .first()
            .map(|(d, _)| *d)
            .unwrap_or(Millis::MAX);
        op.min(self.gossiper.next_deadline())
            .min(hints)
            .min(speculation)
            .min(self.anti_entropy_deadline())
    }

    // ----- durability -----------------------------------------------------------------

    /// True when writes or held acknowledgements wait for a sync.
    pub fn needs_sync(&self) -> bool {
        self.durability.needs_sync()
    }

    /// Starts a sync: every acknowledgement held so far is released by its `finish_sync`.
    /// The driver makes storage durable (on its own thread or in virtual time) and then
    /// calls [`Node::finish_sync`] with the ticket, and polls again.
    #[must_use = "hand the ticket back to finish_sync once the storage sync is done"]
    pub fn begin_sync(&mut self) -> Option<SyncTicket> {
        self.durability.begin()
    }

    /// The driver's fsync finished. On failure every held acknowledgement becomes an error
    /// (see [`DurableReply::failed`]): nothing is acknowledged that is not durable.
    pub fn finish_sync(&mut self, ticket: SyncTicket, result: Result<(), StorageError>) {
        let failed_before = self.durability.failed_replies;
        self.durability.finish(ticket, &result, &mut self.ready);
        self.stats.syncs = self.durability.syncs;
        self.stats.storage_errors += self.durability.failed_replies - failed_before;
    }

    /// Makes the storage durable right here (for drivers without a separate sync thread).
    pub fn sync_now(&mut self) {
        if let Some(ticket) = self.begin_sync() {
            let result = self.storage.sync();
            self.finish_sync(ticket, result);
        }
    }

    fn emit(&mut self, action: Action) {
        self.ready.push_back(action);
    }

    /// Emits an answer that acknowledges durability: held until durable under
    /// `FsyncPolicy::Always`.
    fn emit_durable(&mut self, reply: DurableReply) {
        self.durability.hold(reply, &mut self.ready);
    }

    /// A local write reached storage: durable replies from now on wait for its sync.
    fn wrote(&mut self) {
        self.durability.wrote();
    }

    /// Answers a `Replicate` or `HintedWrite`: an error at once, a success once durable.
    fn answer_replicate(
        &mut self,
        to: &NodeId,
        request: RequestId,
        result: Result<(), ReplicaError>,
    ) {
        match result {
            Ok(()) => self.emit_durable(DurableReply::Replicated {
                to: to.clone(),
                request,
            }),
            Err(error) => self.send(
                to,
                Message::ReplicateReply {
                    request,
                    result: Err(error),
                },
            ),
        }
    }

    fn reply(&mut self, client: ClientRequestId, response: ClientResponse) {
        self.emit(Action::Reply { client, response });
    }

    fn send(&mut self, to: &NodeId, message: Message) {
        self.emit(Action::Send {
            to: to.clone(),
            message,
        });
    }

    // ----- membership ----------------------------------------------------------------

    /// The transport learned a peer (handshake) or gossip announced one.
    pub fn handle_member_discovered(&mut self, info: MemberInfo) {
        if self.membership.learn(info) {
            self.rebuild_ring();
        }
    }

    fn rebuild_ring(&mut self) {
        self.ring = Ring::new(
            self.membership.ids(),
            self.config.vnodes,
            self.config.replication_factor,
        );
        self.align_trees();
    }

    /// The transport saw a peer come up (handshake done) or go down (connection lost).
    /// Requests waiting on a peer that went down fail over at once instead of timing out.
    pub fn handle_peer_status(&mut self, now: Millis, peer: &NodeId, status: PeerStatus) {
        if peer == self.id() {
            return;
        }
        let was_down = self.membership.status(peer) == PeerStatus::Down;
        self.membership.set_status(peer, status);
        if status == PeerStatus::Up && was_down {
            self.mark_peer_recovered(now, peer);
        }
        if status == PeerStatus::Down {
            self.abort_exchanges_with(now, peer);
            let waiting: Vec<RequestId> = self
                .operations
                .iter()
                .filter(|(_, op)| op.is_awaiting(peer))
                .map(|(id, _)| *id)
                .collect();
            for request in waiting {
                self.on_replica_failed(now, request, peer, true);
            }
            let batches: Vec<RequestId> = self
                .hint_batches
                .iter()
                .filter(|(_, b)| b.target == *peer)
                .map(|(id, _)| *id)
                .collect();
            for request in batches {
                self.on_hint_batch_reply(request, false);
            }
        }
    }

    // ----- client requests -----------------------------------------------------------

    pub fn handle_client_request(
        &mut self,
        now: Millis,
        client: ClientRequestId,
        request: ClientRequest,
    ) {
        self.clock = self.clock.max(now);
        if matches!(
            request,
            ClientRequest::Get { .. } | ClientRequest::Put { .. } | ClientRequest::Delete { .. }
        ) && self.client_started.len() < self.config.max_pending_requests
        {
            self.client_started.insert(client, now);
        }
        if self.operations.len() >= self.config.max_pending_requests
            && matches!(
                request,
                ClientRequest::Get { .. }
                    | ClientRequest::Put { .. }
                    | ClientRequest::Delete { .. }
            )
        {
            self.stats.requests_overloaded += 1;
            self.reply(client, ClientResponse::Overloaded);
            return;
        }
        match request {
            ClientRequest::Get { bucket, key, level } => {
                self.start_read(now, client, bucket, key, level, AfterRead::Answer)
            }
            ClientRequest::Put {
                bucket,
                key,
                context,
                value,
                level,
            } => self.start_write(now, client, bucket, key, context, value, level),
            ClientRequest::Delete {
                bucket,
                key,
                context: Some(context),
                level,
            } => self.start_write(now, client, bucket, key, context, Value::Tombstone, level),
            ClientRequest::Delete {
                bucket,
                key,
                context: None,
                level,
            } => self.start_read(now, client, bucket, key, level, AfterRead::Delete { level }),
            ClientRequest::StartRepair => {
                let id = self.start_repair_run(now);
                self.reply(client, ClientResponse::RepairStarted { id });
            }
            ClientRequest::RepairStatus { id } => {
                let status = self.repair_run(id, now);
                self.reply(client, ClientResponse::Repair(status));
            }
            ClientRequest::GetLocal { bucket, key } => {
                let response = match self.storage.get(&bucket, &key) {
                    Ok(object) => ClientResponse::Local(object),
                    Err(e) => ClientResponse::StorageFailed(e.to_string()),
                };
                self.reply(client, response);
            }
        }
    }

    fn new_request_id(&mut self) -> RequestId {
        // The epoch in the high bits keeps ids unique across restarts, so a late reply to a
        // request of a previous life can never be taken for a new one.
        self.next_request += 1;
        (u64::from(self.epoch) << 40) | (self.next_request & ((1 << 40) - 1))
    }

    fn insert_operation(&mut self, id: RequestId, op: Operation) {
        self.deadlines.insert((op.deadline(), id));
        self.operations.insert(id, op);
    }

    fn remove_operation(&mut self, id: RequestId) -> Option<Operation> {
        let op = self.operations.remove(&id)?;
        self.deadlines.remove(&(op.deadline(), id));
        if let Operation::Get(get) = &op {
            // Its speculative retry (due `speculative_retry_ms` after its start) is moot now.
            let started = get.deadline - self.config.request_timeout_ms;
            self.speculations
                .remove(&(started + self.config.speculative_retry_ms, id));
        }
        Some(op)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_write(
        &mut self,
        now: Millis,
        client: ClientRequestId,
        bucket: String,
        key: Vec<u8>,
        context: CausalContext,
        value: Value,
        level: ConsistencyLevel,
    ) {
        let replicas = self.ring.preference_list_for_key(&bucket, &key);
        let id = self.new_request_id();
        let deadline = now + self.config.request_timeout_ms;
        let me = self.id().clone();
        let is_replica = replicas.contains(&me);
        let mut candidates: Vec<NodeId> = replicas.clone();
        // Live replicas first, in preference order, then the ones believed down.
        candidates.sort_by_key(|n| self.membership.status(n) == PeerStatus::Down);
        let mut op = PutOperation::new(
            client,
            bucket.clone(),
            key.clone(),
            context.clone(),
            value.clone(),
            level,
            replicas,
            deadline,
        );
        op.sloppy = self.config.sloppy_quorum;
        let step = if is_replica {
            match self.coordinate_locally(&bucket, &key, &context, value) {
                Ok(object) => op.coordinated_locally(&me, object),
                Err(WriteRefusal::Storage(error)) => {
                    self.reply(client, ClientResponse::StorageFailed(error.to_string()));
                    return;
                }
                Err(WriteRefusal::Invalid(reason)) => {
                    self.reply(client, ClientResponse::Invalid(reason));
                    return;
                }
                Err(WriteRefusal::NotReady(reason)) => {
                    self.reply(client, ClientResponse::NotReady(reason));
                    return;
                }
            }
        } else {
            op.start_remote(candidates)
        };
        self.insert_operation(id, Operation::Put(Box::new(op)));
        self.drive_write(now, id, step);
    }

    /// Applies a client write as the actor: new dot on top of the local object. A write
    /// whose result would break the context limits (too many actors, a counter near
    /// overflow) is refused and changes nothing, so every stored object's context can be
    /// handed out and read back.
    fn coordinate_locally(
        &mut self,
        bucket: &str,
        key: &[u8],
        context: &CausalContext,
        value: Value,
    ) -> Result<Object, WriteRefusal> {
        if !self.epoch_confirmed {
            return Err(WriteRefusal::NotReady(epoch::EPOCH_UNCONFIRMED.into()));
        }
        let old = self
            .storage
            .get(bucket, key)
            .map_err(WriteRefusal::Storage)?;
        let old_digest = old.as_ref().map(Object::digest);
        let mut object = old.unwrap_or_default();
        object.apply_write_above(self.actor, context, value, self.reaped_counter_floor);
        if !CausalContext::within_limits(object.context()) {
            return Err(WriteRefusal::Invalid(format!(
                "the write would give this key more than {MAX_CONTEXT_ACTORS} actors or a \
                 counter of {MAX_COUNTER} or more"
            )));
        }
        self.write_local(bucket, key, old_digest, &object)
            .map_err(WriteRefusal::Storage)?;
        Ok(object)
    }

    /// Merges `incoming` into the local object; true when the local object changed.
    fn merge_local(
        &mut self,
        bucket: &str,
        key: &[u8],
        incoming: &Object,
    ) -> Result<bool, StorageError> {
        let old = self.storage.get(bucket, key)?;
        let empty = Object::empty();
        let current = old.as_ref().unwrap_or(&empty);
        let merged = current.merge(incoming);
        if merged == *current {
            // Already known (duplicates, repairs of what is in sync): no write, no hashing.
            return Ok(false);
        }
        let old_digest = old.as_ref().map(Object::digest);
        self.write_local(bucket, key, old_digest, &merged)?;
        Ok(true)
    }

    /// Stores an object and keeps the Merkle trees exact (one delta on one leaf).
    fn write_local(
        &mut self,
        bucket: &str,
        key: &[u8],
        old_digest: Option<u64>,
        object: &Object,
    ) -> Result<(), StorageError> {
        self.storage.put(bucket, key, object).inspect_err(|_| {
            self.stats.storage_errors += 1;
        })?;
        self.stats.local_writes += 1;
        self.wrote();
        self.trees
            .record_write(bucket, key, old_digest, Some(object.digest()));
        Ok(())
    }

    /// Sloppy quorum: sends the object to the next live node on the ring beyond the
    /// preference list, to keep as a hint for `intended`; this node may be that fallback.
    fn fall_back(&mut self, now: Millis, id: RequestId, intended: NodeId) -> WriteStep {
        let Some(Operation::Put(op)) = self.operations.get(&id) else {
            return WriteStep::Pending;
        };
        let Some(object) = op.object().cloned() else {
            return WriteStep::Pending;
        };
        let (bucket, key) = (op.bucket.clone(), op.key.clone());
        let used: Vec<NodeId> = op
            .replicas()
            .iter()
            .chain(op.fallbacks())
            .cloned()
            .collect();
        let fallback = self
            .ring
            .nodes_from(crate::ring::key_token(&bucket, &key))
            .into_iter()
            .find(|n| !used.contains(n) && self.membership.status(n) == PeerStatus::Up);
        let Some(Operation::Put(op)) = self.operations.get_mut(&id) else {
            return WriteStep::Pending;
        };
        let Some(fallback) = fallback else {
            return op.no_fallback(intended);
        };
        op.add_fallback(fallback.clone(), intended.clone());
        if fallback == *self.id() {
            let stored = self.store_hint(now, &intended, &bucket, &key, &object);
            let Some(Operation::Put(op)) = self.operations.get_mut(&id) else {
                return WriteStep::Pending;
            };
            return op.on_replicated(&fallback, stored);
        }
        let message = Message::HintedWrite {
            request: id,
            intended,
            bucket,
            key,
            object,
        };
        self.send(&fallback, message);
        WriteStep::Pending
    }

    /// Ends an answered write once no replica reply is expected.
    fn finish_write_if_settled(&mut self, now: Millis, id: RequestId) {
        if let Some(Operation::Put(op)) = self.operations.get(&id) {
            if op.answered && op.settled() {
                self.finish_write(now, id);
            }
        }
    }

    /// Removes a write and hints every replica that did not store its object.
    fn finish_write(&mut self, now: Millis, id: RequestId) {
        let Some(Operation::Put(op)) = self.remove_operation(id) else {
            return;
        };
        if let Some(object) = op.object() {
            for target in op.unacknowledged() {
                self.store_hint(now, &target, &op.bucket, &op.key, object);
            }
        }
    }

    fn drive_write(&mut self, now: Millis, id: RequestId, step: WriteStep) {
        let mut step = step;
        loop {
            match step {
                WriteStep::Pending => {
                    self.finish_write_if_settled(now, id);
                    return;
                }
                WriteStep::Fallback { intended } => {
                    step = self.fall_back(now, id, intended);
                }
                WriteStep::AskActor(actor) => {
                    let Some(Operation::Put(op)) = self.operations.get(&id) else {
                        return;
                    };
                    let message = Message::Coordinate {
                        request: id,
                        bucket: op.bucket.clone(),
                        key: op.key.clone(),
                        context: op.context.clone(),
                        value: op.value.clone(),
                    };
                    self.send(&actor, message);
                    return;
                }
                WriteStep::Replicate(targets, object) => {
                    let Some(Operation::Put(op)) = self.operations.get(&id) else {
                        return;
                    };
                    let (bucket, key) = (op.bucket.clone(), op.key.clone());
                    for target in targets {
                        let message = Message::Replicate {
                            request: id,
                            bucket: bucket.clone(),
                            key: key.clone(),
                            object: object.clone(),
                        };
                        self.send(&target, message);
                    }
                    let Some(Operation::Put(op)) = self.operations.get(&id) else {
                        return;
                    };
                    step = op.step();
                }
                WriteStep::Met(context) => {
                    if let Some(Operation::Put(op)) = self.operations.get_mut(&id) {
                        if !op.answered {
                            op.answered = true;
                            let client = op.client;
                            self.emit_durable(DurableReply::Client {
                                client,
                                response: ClientResponse::Written { context },
                            });
                        }
                    }
                    self.finish_write_if_settled(now, id);
                    return;
                }
                WriteStep::Failed { needed, answered } => {
                    if let Some(Operation::Put(op)) = self.operations.get_mut(&id) {
                        if !op.answered {
                            op.answered = true;
                            let client = op.client;
                            self.reply(client, ClientResponse::Unavailable { needed, answered });
                        }
                    }
                    // Replicas still answering may yet store the object: wait for them (or the
                    // deadline) before hinting, so only the ones that miss it get hints.
                    self.finish_write_if_settled(now, id);
                    return;
                }
            }
        }
    }

    /// A replica could not be reached or failed: count it against the request.
    /// `maybe_delivered`: the request may have reached the replica before it failed.
    fn on_replica_failed(
        &mut self,
        now: Millis,
        id: RequestId,
        replica: &NodeId,
        maybe_delivered: bool,
    ) {
        match self.operations.get_mut(&id) {
            Some(Operation::Get(_)) => self.on_read_failed(now, id, replica),
            Some(Operation::Put(op)) => {
                let step = op.on_replica_failed(replica, maybe_delivered);
                self.drive_write(now, id, step);
            }
            Some(Operation::Repair(_)) => self.on_repair_reply(now, id, replica, false),
            None => self.on_hint_batch_reply(id, false),
        }
    }

    // ----- peer messages -------------------------------------------------------------

    /// The driver could not deliver a message (no connection, peer down).
    pub fn handle_send_failed(&mut self, now: Millis, to: &NodeId, message: &Message) {
        if let Message::AntiEntropy { request } = message {
            self.abort_exchange(now, request.exchange);
            return;
        }
        if let Some(id) = message.request_id() {
            self.on_replica_failed(now, id, to, false);
        }
    }

    pub fn handle_message(&mut self, now: Millis, from: &NodeId, message: Message) {
        self.clock = self.clock.max(now);
        match message {
            Message::Read {
                request,
                bucket,
                key,
            } => {
                let result = self.serve_read(&bucket, &key);
                self.send(from, Message::ReadReply { request, result });
            }
            Message::ReadReply { request, result } => {
                self.on_full_read(now, request, from, result.map_err(|_| ()))
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
            Message::ReadDigestReply { request, result } => {
                self.on_digest_read(now, request, from, result.map_err(|_| ()))
            }
            Message::RepairWrite {
                request,
                bucket,
                key,
                object,
            } => {
                let result = self.serve_replicate(&bucket, &key, &object);
                match result {
                    Ok(()) => self.emit_durable(DurableReply::RepairWritten {
                        to: from.clone(),
                        request,
                    }),
                    Err(error) => self.send(
                        from,
                        Message::RepairWriteReply {
                            request,
                            result: Err(error),
                        },
                    ),
                }
            }
            Message::RepairWriteReply { request, result } => {
                self.on_repair_reply(now, request, from, result.is_ok())
            }
            Message::HintBatch { request, hints } => {
                let result = self.serve_hint_batch(hints);
                match result {
                    Ok(()) => self.emit_durable(DurableReply::HintBatchStored {
                        to: from.clone(),
                        request,
                    }),
                    Err(error) => self.send(
                        from,
                        Message::HintBatchReply {
                            request,
                            result: Err(error),
                        },
                    ),
                }
            }
            Message::AntiEntropy { request } => self.on_exchange_request(now, from, request),
            Message::Reap { range, items } => self.on_reap(range, items),
            Message::AntiEntropyReply { response } => {
                self.on_exchange_response(now, from, response)
            }
            Message::HintedWrite {
                request,
                intended,
                bucket,
                key,
                object,
            } => {
                let checked = self
                    .check_peer_input(&bucket, &key)
                    .and_then(|()| self.check_peer_object(&object));
                let result = match checked {
                    Ok(()) => {
                        if self.store_hint(now, &intended, &bucket, &key, &object) {
                            Ok(())
                        } else {
                            Err(ReplicaError::Storage(
                                "hint not kept (budget or unknown target)".into(),
                            ))
                        }
                    }
                    Err(error) => Err(error),
                };
                self.answer_replicate(from, request, result);
            }
            Message::HintBatchReply { request, result } => {
                let delivered = result.is_ok();
                self.on_hint_batch_reply(request, delivered);
                if delivered {
                    // Keep the pipe full: the next batch goes out at once, within the rate.
                    self.deliver_hints(now);
                }
            }
            Message::Coordinate {
                request,
                bucket,
                key,
                context,
                value,
            } => {
                // A duplicated Coordinate must not apply the client's write a second time
                // under a new dot: answer it from the record of the first.
                let served = (from.clone(), request);
                let result = match self.served_coordinates.get(&served) {
                    Some(result) => result.clone(),
                    None => {
                        let result = self.serve_coordinate(&bucket, &key, &context, value);
                        self.remember_coordinate(served, result.clone());
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
            Message::CoordinateReply { request, result } => {
                if let Some(Operation::Put(op)) = self.operations.get_mut(&request) {
                    let step = op.on_coordinated(from, result.map_err(|_| ()));
                    self.drive_write(now, request, step);
                }
            }
            Message::Replicate {
                request,
                bucket,
                key,
                object,
            } => {
                let result = self.serve_replicate(&bucket, &key, &object);
                self.answer_replicate(from, request, result);
            }
            Message::ReplicateReply { request, result } => {
                if let Some(Operation::Put(op)) = self.operations.get_mut(&request) {
                    let step = op.on_replicated(from, result.is_ok());
                    self.drive_write(now, request, step);
                }
            }
            Message::Gossip(message) => self.on_gossip(now, from, message),
        }
    }

    fn check_peer_input(&mut self, bucket: &str, key: &[u8]) -> Result<(), ReplicaError> {
        validate_bucket(bucket)
            .and_then(|_| validate_key(key))
            .map_err(|e| {
                self.stats.invalid_peer_requests += 1;
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
            self.stats.invalid_peer_requests += 1;
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
            self.stats.invalid_peer_requests += 1;
            return Err(ReplicaError::Invalid(
                "object's version vector is over the context limits".into(),
            ));
        }
        Ok(())
    }

    fn serve_read(&mut self, bucket: &str, key: &[u8]) -> Result<Option<Object>, ReplicaError> {
        self.check_peer_input(bucket, key)?;
        self.storage.get(bucket, key).map_err(|e| {
            self.stats.storage_errors += 1;
            ReplicaError::Storage(e.to_string())
        })
    }

    fn remember_coordinate(
        &mut self,
        served: (NodeId, RequestId),
        result: Result<Object, ReplicaError>,
    ) {
        if self.served_order.len() >= MAX_SERVED_COORDINATES {
            if let Some(oldest) = self.served_order.pop_front() {
                self.served_coordinates.remove(&oldest);
            }
        }
        self.served_order.push_back(served.clone());
        self.served_coordinates.insert(served, result);
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
            })
    }

    fn serve_replicate(
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

    // ----- time ----------------------------------------------------------------------

    pub fn handle_tick(&mut self, now: Millis) {
        self.clock = self.clock.max(now);
        self.breaker.set_in_flight(now, self.operations.len());
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            match self.remove_operation(id) {
                Some(Operation::Get(op)) if !op.answered => {
                    let (needed, answered) = op.needed_and_answered();
                    self.stats.requests_timed_out += 1;
                    self.reply(op.client, ClientResponse::Timeout { needed, answered });
                }
                Some(Operation::Get(op)) => {
                    // A background check that ran out of time: repair what answered.
                    let mut resolution = op.final_resolution();
                    resolution.stale.retain(|n| !op.repaired.contains(n));
                    let (bucket, key) = (op.bucket.clone(), op.key.clone());
                    self.repair(now, &bucket, &key, &resolution, None);
                }
                Some(Operation::Put(op)) => {
                    if !op.answered {
                        let (needed, answered) = op.needed_and_answered();
                        self.stats.requests_timed_out += 1;
                        self.reply(op.client, ClientResponse::Timeout { needed, answered });
                    }
                    // Put it back for `finish_write`, which hints the silent replicas.
                    self.operations.insert(id, Operation::Put(op));
                    self.finish_write(now, id);
                }
                Some(Operation::Repair(repair)) => self.finish_repair(now, repair),
                None => {}
            }
        }
        self.speculate_reads(now);
        self.tick_anti_entropy(now);
        self.verify_next_tree(now);
        if now >= self.next_delivery_at {
            self.next_delivery_at = now + hints::DELIVERY_INTERVAL_MS;
            self.deliver_hints(now);
        }
        self.tick_gossip(now);
    }
}

mod anti_entropy;
mod durability;
mod epoch;
mod gossip;
mod hints;
mod read;

pub use anti_entropy::{AntiEntropyConfig, RepairRunStatus};
use durability::Durability;
pub use durability::{DurableReply, SyncTicket};

#[cfg(test)]
mod tests;
