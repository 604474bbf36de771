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

use crate::bucket::Resolution;
use crate::config::NodeConfig;
use crate::coordinator::{AfterRead, GetOperation, PutOperation, WriteStep};
use crate::gossip::{initial_state, Gossiper};
use crate::membership::{MemberInfo, Membership, PeerStatus};
use crate::message::{
    ClientRequest, ClientRequestId, ClientResponse, Message, ReplicaError, RequestId,
};
use crate::quorum::ConsistencyLevel;
use crate::ring::Ring;
use crate::storage::{Storage, StorageError};
use crate::version::{CausalContext, Object, Value, MAX_CONTEXT_ACTORS, MAX_COUNTER};
use crate::{Millis, NodeId};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::VecDeque;

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

/// The node: shared plumbing (config, storage, clock, the actions queue, counters) and
/// one room per concern, each holding only the state of that concern.
pub struct Node<S: Storage> {
    config: NodeConfig,
    storage: S,
    /// The latest `now` seen (for samples taken in `poll_action`).
    clock: Millis,
    rng: StdRng,
    ready: VecDeque<Action>,
    /// Everything the node counts, exported by the driver (`counters.rs`).
    stats: Counters,
    /// Group commit: durable replies wait here for the sync that covers them.
    durability: Durability,
    /// Who issues this node's dots (`epoch.rs`).
    identity: epoch::Identity,
    /// Members, the ring and gossip (`gossip.rs`).
    cluster: gossip::ClusterView,
    /// Client requests in flight and the peer requests they wait on (`coordination.rs`).
    coordination: coordination::Coordination,
    /// Read repair writes in flight (`read.rs`).
    read_repair: read::ReadRepairState,
    /// Hints kept for other nodes and their replay (`hints.rs`).
    hints: hints::HintDelivery,
    /// Merkle trees, exchanges, operator runs and tombstone reaping (`anti_entropy.rs`).
    anti_entropy: anti_entropy::AntiEntropyState,
    /// The repair byte budget and circuit breaker shared by anti-entropy and hint replay.
    control: repair_control::RepairControl,
    /// Bucket properties, the hybrid logical clock, sibling warnings (`buckets.rs`).
    buckets: buckets::Buckets,
    /// Cluster changes: this node's ring state, the layout, streaming, cleanup
    /// (`membership.rs`).
    membership: membership::MembershipState,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Its storage failed (reading or recording the epoch): check the data directory.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// Its gossip configuration is invalid: fix `[gossip]`.
    #[error("gossip: {0}")]
    Gossip(#[from] crate::gossip::GossipError),
}

/// Why a client write could not be applied as actor.
#[derive(Debug)]
enum WriteRefusal {
    Storage(StorageError),
    /// The write breaks a rule (the answer is a 400, and nothing changed).
    Invalid(String),
    /// This node may not issue dots yet (its epoch is unconfirmed).
    NotReady(String),
    /// The write would exceed the bucket's `max_siblings`; nothing changed.
    TooManySiblings(String),
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
    pub fn new(config: NodeConfig, storage: S, now: Millis) -> Result<Self, NodeError> {
        // `fresh`: no confirmed epoch record, so a new or wiped data directory (or one
        // whose first start never heard from its peers).
        let (epoch, fresh) = epoch::next_epoch(&storage, config.learn_epoch_from_peers)?;
        let me = MemberInfo {
            id: config.node_id.clone(),
            peer_address: config.peer_address.clone(),
            http_address: config.http_address.clone(),
        };
        let membership = Membership::new(me);
        let (hint_queue, corrupt_hints) = hints::load_hint_queue(&storage);
        let membership_state =
            membership::MembershipState::load(&storage, fresh, config.learn_epoch_from_peers);
        let gossiper = Gossiper::new(
            config.node_id.clone(),
            u64::from(epoch),
            initial_state(
                membership_state.status,
                &config.peer_address,
                &config.http_address,
                config.vnodes,
            ),
            Vec::new(),
            config.gossip.clone(),
            now,
        )
        .map_err(NodeError::Gossip)?;
        let mut stats = Counters::default();
        stats.add(Counter::HintsDroppedCorrupt, corrupt_hints);
        let (buckets, props_corrupt) = buckets::Buckets::load(
            &storage,
            config.bucket_defaults,
            config.lww_default_buckets.clone(),
        );
        if props_corrupt {
            stats.increment(Counter::BucketPropsInvalid);
        }
        let mut node = Node {
            clock: now,
            rng: StdRng::seed_from_u64(config.rng_seed),
            ready: VecDeque::new(),
            stats,
            durability: Durability::new(config.fsync),
            identity: epoch::Identity::new(&config.node_id, epoch, !fresh),
            cluster: gossip::ClusterView {
                membership,
                gossiper,
                learned: !config.learn_epoch_from_peers,
                strangers: Default::default(),
            },
            coordination: coordination::Coordination::default(),
            read_repair: read::ReadRepairState::default(),
            hints: hints::HintDelivery::new(hint_queue, &config, now),
            anti_entropy: anti_entropy::AntiEntropyState::new(&config, now),
            control: repair_control::RepairControl::new(&config, now),
            buckets,
            membership: membership_state,
            storage,
            config,
        };
        if !node.identity.confirmed {
            node.cluster.gossiper.set_announce_self(false);
        }
        // Peers that restarted with us learn the table from our state again.
        node.publish_props(now);
        node.publish_membership(now);
        // Trees are rebuilt from a scan at every start (a tree persisted before a crash could
        // disagree with what the crash left of the data), in the layout's first alignment: the
        // first objects at once, the rest in the background, so a start takes the same time
        // whatever the data.
        node.refresh_layout(now);
        Ok(node)
    }

    pub fn id(&self) -> &NodeId {
        &self.config.node_id
    }

    pub fn epoch(&self) -> u32 {
        self.identity.epoch
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The ring reads use: the membership layout's read ring (the old owners while a
    /// change streams, the new ones from `synced` on).
    pub fn ring(&self) -> &Ring {
        self.membership.layout.read_ring()
    }

    pub fn membership(&self) -> &Membership {
        &self.cluster.membership
    }

    pub fn stats(&self) -> &Counters {
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
        self.coordination.operations.len()
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
            if let Some(started) = self.coordination.client_started.remove(client) {
                let ok = matches!(
                    response,
                    ClientResponse::Object(_) | ClientResponse::Written { .. }
                );
                let now = self.clock;
                self.control
                    .breaker
                    .record(now, now.saturating_sub(started), ok);
            }
        }
        Some(action)
    }

    /// Whether repair work (scheduled anti-entropy, hint replay) is paused by the breaker.
    pub fn repair_breaker_open(&mut self) -> bool {
        let now = self.clock;
        self.control.breaker.is_open(now)
    }

    /// How often the breaker opened since start.
    pub fn repair_breaker_trips(&self) -> u64 {
        self.control.breaker.trips()
    }

    /// The earliest time `handle_tick` has work to do.
    pub fn next_deadline(&self) -> Millis {
        let op = self
            .coordination
            .deadlines
            .first()
            .map(|(d, _)| *d)
            .unwrap_or(Millis::MAX);
        let hints =
            if self.hints.hint_queue.total_hints() > 0 || !self.hints.hint_batches.is_empty() {
                self.hints.next_delivery_at
            } else {
                Millis::MAX
            };
        let speculation = self
            .coordination
            .speculations
            .first()
            .map(|(d, _)| *d)
            .unwrap_or(Millis::MAX);
        op.min(self.cluster.gossiper.next_deadline())
            .min(hints)
            .min(speculation)
            .min(self.anti_entropy_deadline())
            .min(self.control.controller.next_deadline())
            .min(self.tree_build_deadline())
            .min(self.membership_deadline())
            .min(self.roots_deadline())
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
        let (failed_before, syncs_before) = (self.durability.failed_replies, self.durability.syncs);
        self.durability.finish(ticket, &result, &mut self.ready);
        self.stats
            .add(Counter::Syncs, self.durability.syncs - syncs_before);
        self.stats.add(
            Counter::StorageErrors,
            self.durability.failed_replies - failed_before,
        );
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

    /// A new id for a request this node sends (the epoch in the high bits).
    fn new_request_id(&mut self) -> RequestId {
        self.coordination.next_request_id(self.identity.epoch)
    }

    fn insert_operation(&mut self, id: RequestId, op: Operation) {
        self.coordination.insert(id, op);
    }

    fn remove_operation(&mut self, id: RequestId) -> Option<Operation> {
        self.coordination.remove(
            id,
            self.config.request_timeout_ms,
            self.config.speculative_retry_ms,
        )
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
        let me = self.id().clone();
        let gossip_runs = self
            .cluster
            .gossiper
            .members()
            .any(|(id, state)| *id != me && state.status().is_some());
        let id = info.id.clone();
        if self.cluster.membership.learn(info) {
            if gossip_runs && id != me {
                self.cluster.strangers.insert(id);
            }
            self.rebuild_ring();
        }
    }

    fn rebuild_ring(&mut self) {
        let now = self.clock;
        self.refresh_layout(now);
    }

    /// The transport saw a peer come up (handshake done) or go down (connection lost).
    /// Requests waiting on a peer that went down fail over at once instead of timing out.
    pub fn handle_peer_status(&mut self, now: Millis, peer: &NodeId, status: PeerStatus) {
        if peer == self.id() {
            return;
        }
        let was_down = self.cluster.membership.status(peer) == PeerStatus::Down;
        self.cluster.membership.set_status(peer, status);
        if status == PeerStatus::Up && was_down {
            self.mark_peer_recovered(now, peer);
        }
        if status == PeerStatus::Down {
            self.abort_exchanges_with(now, peer);
            let waiting: Vec<RequestId> = self
                .coordination
                .operations
                .iter()
                .filter(|(_, op)| op.is_awaiting(peer))
                .map(|(id, _)| *id)
                .collect();
            for request in waiting {
                self.on_replica_failed(now, request, peer, true);
            }
            let batches: Vec<RequestId> = self
                .hints
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
        // The key-value requests: the ones the gates below (and the breaker's latency
        // samples) are about; admin and status requests pass through.
        let reads_or_writes = matches!(
            request,
            ClientRequest::Get { .. } | ClientRequest::Put { .. } | ClientRequest::Delete { .. }
        );
        if reads_or_writes
            && self.coordination.client_started.len() < self.config.max_pending_requests
        {
            self.coordination.client_started.insert(client, now);
        }
        if self.membership.deciding
            && !self.identity.confirmed
            && matches!(
                request,
                ClientRequest::Put { .. } | ClientRequest::Delete { .. }
            )
        {
            // Not even placed in the ring yet: it cannot tell whether it ran before.
            self.reply(
                client,
                ClientResponse::NotReady(epoch::EPOCH_UNCONFIRMED.into()),
            );
            return;
        }
        if self.membership.refused && reads_or_writes {
            self.reply(
                client,
                ClientResponse::NotReady(
                    "this node was removed from the cluster (remove-node) and came back with \
                     its old data: wipe its data directory and start it again to rejoin"
                        .into(),
                ),
            );
            return;
        }
        if self.coordination.operations.len() >= self.config.max_pending_requests && reads_or_writes
        {
            self.stats.increment(Counter::RequestsOverloaded);
            self.reply(client, ClientResponse::Overloaded);
            return;
        }
        if !self.cluster.learned && reads_or_writes {
            self.reply(
                client,
                ClientResponse::NotReady(gossip::MEMBERSHIP_UNLEARNED.into()),
            );
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
            ClientRequest::StartBucketRepair { bucket } => {
                let id = self.start_repair_run_of(now, Some(bucket));
                self.reply(client, ClientResponse::RepairStarted { id });
            }
            ClientRequest::RepairStatus { id } => {
                let status = self.repair_run(id, now);
                self.reply(client, ClientResponse::Repair(status));
            }
            ClientRequest::GetBucketProps { bucket } => {
                let props = self.bucket_props(&bucket);
                self.reply(client, ClientResponse::BucketProps(props));
            }
            ClientRequest::SetBucketProps { bucket, update } => {
                let response = match self.set_bucket_props(now, &bucket, update) {
                    Ok(props) => ClientResponse::BucketProps(props),
                    Err(SetPropsError::Invalid(e)) => ClientResponse::Invalid(e.to_string()),
                    Err(SetPropsError::Storage(e)) if e.is_full() => {
                        ClientResponse::InsufficientStorage(e.to_string())
                    }
                    Err(SetPropsError::Storage(e)) => ClientResponse::StorageFailed(e.to_string()),
                };
                self.reply(client, response);
            }
            ClientRequest::Decommission => {
                let response = match self.decommission(now) {
                    Ok(progress) => ClientResponse::Change(progress),
                    Err(refusal) => refusal.into(),
                };
                self.reply(client, response);
            }
            ClientRequest::RemoveNode { node } => {
                let response = match self.remove_node(now, &node) {
                    Ok(progress) => ClientResponse::Change(progress),
                    Err(refusal) => refusal.into(),
                };
                self.reply(client, response);
            }
            ClientRequest::ChangeStatus { node } => {
                let known = node == *self.id() || self.cluster.gossiper.member(&node).is_some();
                let response = if known {
                    ClientResponse::Change(self.change_progress(&node, now))
                } else {
                    ClientResponse::NotFound(format!("no member {node} in this cluster"))
                };
                self.reply(client, response);
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
        // While a cluster change is active the write must meet its level among the old and
        // the new owners (`membership::Layout::write_lists`); the first list is the one reads
        // use, and only its members act as the write's actor.
        // Members deciding whether to bootstrap may become owners without streaming, so
        // the write must meet its level among them too (`deciding_write_list`).
        let token = crate::ring::key_token(&bucket, &key);
        let mut lists = self.membership.layout.write_lists(token);
        if let Some(list) = self.deciding_write_list(token) {
            if !lists.contains(&list) {
                lists.push(list);
            }
        }
        let owners = lists.first().cloned().unwrap_or_default();
        if !owners.is_empty() {
            // Before any replica sees the write: a node that starts later must not take a
            // cluster where writes were coordinated for one without data.
            self.note_has_data();
        }
        let mut replicas = owners.clone();
        for node in lists.iter().skip(1).flatten() {
            if !replicas.contains(node) {
                replicas.push(node.clone());
            }
        }
        let id = self.new_request_id();
        let deadline = now + self.config.request_timeout_ms;
        let me = self.id().clone();
        let is_replica = owners.contains(&me);
        let mut candidates: Vec<NodeId> = owners;
        // Live replicas first, in preference order, then the ones believed down.
        candidates.sort_by_key(|n| self.cluster.membership.status(n) == PeerStatus::Down);
        let mut op = PutOperation::with_lists(
            client,
            bucket.clone(),
            key.clone(),
            context.clone(),
            value.clone(),
            level,
            replicas,
            lists,
            deadline,
        );
        op.sloppy = self.config.sloppy_quorum;
        let step = if is_replica {
            match self.coordinate_locally(&bucket, &key, &context, value) {
                Ok(object) => op.coordinated_locally(&me, object),
                // Nothing was written here, so another replica may be the actor.
                Err(WriteRefusal::Storage(StorageError::Full(_))) => {
                    op.start_remote_storage_full(&me, candidates)
                }
                Err(WriteRefusal::Storage(error)) if error.is_full() => {
                    // The disk filled during this write: it may yet reach the disk, so no
                    // other actor may apply it under a second dot. Its outcome is unknown.
                    self.reply(
                        client,
                        ClientResponse::InsufficientStorage(error.to_string()),
                    );
                    return;
                }
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
                Err(WriteRefusal::TooManySiblings(reason)) => {
                    self.reply(client, ClientResponse::TooManySiblings(reason));
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
        if !self.identity.confirmed {
            return Err(WriteRefusal::NotReady(epoch::EPOCH_UNCONFIRMED.into()));
        }
        let old = self
            .storage
            .get(bucket, key)
            .map_err(WriteRefusal::Storage)?;
        let old_digest = old.as_ref().map(Object::digest);
        let mut object = old.unwrap_or_default();
        let props = self.buckets.props(bucket);
        // An object already LWW stays LWW whatever this node believes of the bucket, so a
        // node that has not heard of a change to lww yet still writes it the lww way (and
        // a bucket switched back to causal keeps its LWW keys LWW until they are reaped).
        if props.resolution == Resolution::Lww || object.is_lww() {
            let timestamp = self.lww_timestamp(object.lww_timestamp());
            object.apply_lww_write(self.identity.actor, timestamp, value);
        } else {
            object.apply_write_above(
                self.identity.actor,
                context,
                value,
                self.identity.reaped_counter_floor,
            );
            let siblings = object.siblings().len();
            if siblings > props.max_siblings as usize {
                self.stats.increment(Counter::SiblingsRefused);
                return Err(WriteRefusal::TooManySiblings(format!(
                    "the write would leave {siblings} siblings, over the bucket's \
                     max_siblings of {}: read the key and write back with its context",
                    props.max_siblings
                )));
            }
            if siblings >= props.warn_siblings as usize {
                self.warn_siblings(bucket, key, siblings, props.warn_siblings);
            }
        }
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
        if let Some(timestamp) = incoming.lww_timestamp() {
            // Later LWW writes coordinated here are stamped after this one.
            self.buckets.clock.observe(timestamp);
        }
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
            self.stats.increment(Counter::StorageErrors);
        })?;
        self.stats.increment(Counter::LocalWrites);
        self.wrote();
        if !self.membership.has_data {
            self.note_has_data();
        }
        self.record_tree_write(bucket, key, old_digest, Some(object.digest()));
        Ok(())
    }

    /// Sloppy quorum: sends the object to the next live node on the ring beyond the
    /// preference list, to keep as a hint for `intended`; this node may be that fallback.
    fn fall_back(&mut self, now: Millis, id: RequestId, intended: NodeId) -> WriteStep {
        let Some(Operation::Put(op)) = self.coordination.operations.get(&id) else {
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
            .ring()
            .nodes_from(crate::ring::key_token(&bucket, &key))
            .into_iter()
            .find(|n| !used.contains(n) && self.cluster.membership.status(n) == PeerStatus::Up);
        let Some(Operation::Put(op)) = self.coordination.operations.get_mut(&id) else {
            return WriteStep::Pending;
        };
        let Some(fallback) = fallback else {
            return op.no_fallback(intended);
        };
        op.add_fallback(fallback.clone(), intended.clone());
        if fallback == *self.id() {
            let stored = self.store_hint(now, &intended, &bucket, &key, &object, true);
            let Some(Operation::Put(op)) = self.coordination.operations.get_mut(&id) else {
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
        if let Some(Operation::Put(op)) = self.coordination.operations.get(&id) {
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
                self.store_hint(now, &target, &op.bucket, &op.key, object, false);
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
                    let Some(Operation::Put(op)) = self.coordination.operations.get(&id) else {
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
                    let Some(Operation::Put(op)) = self.coordination.operations.get(&id) else {
                        return;
                    };
                    let (bucket, key) = (op.bucket.clone(), op.key.clone());
                    let me = self.id().clone();
                    for target in targets {
                        if target == me {
                            // A joining coordinator is a new owner but not the actor: it
                            // stores the object itself.
                            let stored = self.merge_local(&bucket, &key, &object).is_ok();
                            if let Some(Operation::Put(op)) =
                                self.coordination.operations.get_mut(&id)
                            {
                                let _ = op.on_replicated(&me, stored);
                            }
                            continue;
                        }
                        let message = Message::Replicate {
                            request: id,
                            bucket: bucket.clone(),
                            key: key.clone(),
                            object: object.clone(),
                        };
                        self.send(&target, message);
                    }
                    let Some(Operation::Put(op)) = self.coordination.operations.get(&id) else {
                        return;
                    };
                    step = op.step();
                }
                WriteStep::Met(context) => {
                    if let Some(Operation::Put(op)) = self.coordination.operations.get_mut(&id) {
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
                    if let Some(Operation::Put(op)) = self.coordination.operations.get_mut(&id) {
                        if !op.answered {
                            op.answered = true;
                            let client = op.client;
                            let response = if op.local_storage_full() {
                                ClientResponse::InsufficientStorage(format!(
                                    "this node's disk is full, and the other replicas could \
                                     not meet the level: needed {needed} replicas, \
                                     {answered} answered"
                                ))
                            } else {
                                ClientResponse::Unavailable { needed, answered }
                            };
                            self.reply(client, response);
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
        match self.coordination.operations.get_mut(&id) {
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

    /// A message from a peer: gossip, a request this node serves (`serve.rs`), or a reply
    /// to one of its own requests.
    pub fn handle_message(&mut self, now: Millis, from: &NodeId, message: Message) {
        self.clock = self.clock.max(now);
        let message = match self.screen_removed(from, message) {
            Some(message) => message,
            None => return,
        };
        match message {
            Message::Gossip(message) => self.on_gossip(now, from, message),
            reply if reply.is_reply() => self.on_reply(now, from, reply),
            request => self.serve_request(now, from, request),
        }
    }

    /// A reply to a request this node sent: it moves the operation that waits for it.
    fn on_reply(&mut self, now: Millis, from: &NodeId, reply: Message) {
        match reply {
            Message::ReadReply { request, result } => {
                self.on_full_read(now, request, from, result.map_err(|_| ()))
            }
            Message::ReadDigestReply { request, result } => {
                self.on_digest_read(now, request, from, result.map_err(|_| ()))
            }
            Message::RepairWriteReply { request, result } => {
                self.on_repair_reply(now, request, from, result.is_ok())
            }
            Message::AntiEntropyReply { response } => {
                self.on_exchange_response(now, from, response)
            }
            Message::HintBatchReply { request, result } => {
                let delivered = result.is_ok();
                self.on_hint_batch_reply(request, delivered);
                if delivered {
                    // Keep the pipe full: the next batch goes out at once, within the rate.
                    self.deliver_hints(now);
                }
            }
            Message::CoordinateReply {
                request,
                result: Err(ReplicaError::TooManySiblings(reason)),
            } => self.on_too_many_siblings(request, from, reason),
            Message::CoordinateReply { request, result } => {
                if let Some(Operation::Put(op)) = self.coordination.operations.get_mut(&request) {
                    let step = op.on_coordinated(from, result.map_err(|_| ()));
                    self.drive_write(now, request, step);
                }
            }
            Message::ReplicateReply { request, result } => {
                if let Some(Operation::Put(op)) = self.coordination.operations.get_mut(&request) {
                    let step = op.on_replicated(from, result.is_ok());
                    self.drive_write(now, request, step);
                } else {
                    // Not a write's: perhaps a leaving node's hint hand-over.
                    self.on_hand_over_reply(request, result.is_ok());
                }
            }
            // Requests and gossip are routed elsewhere by `handle_message`.
            _ => {}
        }
    }

    /// The actor refused a forwarded write for `max_siblings`: nothing was written
    /// anywhere, so the write ends with the client's 409 and no hints.
    fn on_too_many_siblings(&mut self, request: RequestId, from: &NodeId, reason: String) {
        let waiting = matches!(
            self.coordination.operations.get(&request),
            Some(Operation::Put(op)) if op.is_awaiting(from) && !op.answered
        );
        if !waiting {
            return;
        }
        if let Some(Operation::Put(op)) = self.remove_operation(request) {
            self.reply(op.client, ClientResponse::TooManySiblings(reason));
        }
    }

    // ----- time ----------------------------------------------------------------------

    pub fn handle_tick(&mut self, now: Millis) {
        self.clock = self.clock.max(now);
        self.control
            .breaker
            .set_in_flight(now, self.coordination.operations.len());
        self.adjust_repair_rate(now);
        while let Some(&(deadline, id)) = self.coordination.deadlines.first() {
            if deadline > now {
                break;
            }
            match self.remove_operation(id) {
                Some(Operation::Get(op)) if !op.answered => {
                    let (needed, answered) = op.needed_and_answered();
                    self.stats.increment(Counter::RequestsTimedOut);
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
                        self.stats.increment(Counter::RequestsTimedOut);
                        self.reply(op.client, ClientResponse::Timeout { needed, answered });
                    }
                    // Put it back for `finish_write`, which hints the silent replicas.
                    self.coordination.operations.insert(id, Operation::Put(op));
                    self.finish_write(now, id);
                }
                Some(Operation::Repair(repair)) => self.finish_repair(now, repair),
                None => {}
            }
        }
        self.speculate_reads(now);
        self.advance_tree_builds(anti_entropy::TREE_BUILD_PER_TICK);
        self.tick_anti_entropy(now);
        self.verify_next_tree(now);
        if now >= self.hints.next_delivery_at {
            self.hints.next_delivery_at = now + hints::DELIVERY_INTERVAL_MS;
            self.deliver_hints(now);
        }
        self.tick_gossip(now);
        self.tick_membership(now);
    }
}

mod anti_entropy;
mod buckets;
mod coordination;
mod counters;
mod durability;
mod epoch;
mod gossip;
mod hints;
mod membership;
mod read;
mod repair_control;
mod roots;
mod serve;

pub use crate::anti_entropy::{AntiEntropyConfig, RepairRunStatus, RunState};
pub use anti_entropy::RepairDebt;
use buckets::SetPropsError;
pub use buckets::SiblingWarning;
pub use counters::{Counter, CounterSpec, Counters};
use durability::Durability;
pub use durability::{DurableReply, SyncTicket};
pub use membership::{
    ChangeProgress, ChangeRefusal, ACK_KEY, HAS_DATA_KEY, PHASE_KEY, REMOVALS_KEY, STREAMED_KEY,
};

#[cfg(test)]
mod tests;
