//! The node task: the only owner of the sans-IO [`Node`]. It turns inbox items (client
//! requests from HTTP handlers, peer messages, link events) into `handle_*` calls, carries
//! out the node's actions, and runs group commit: after each batch of inputs, one fsync on a
//! blocking thread covers every write of the batch, while the node keeps taking input.

pub use crate::inbox::{ClusterStatus, Inbox, NodeStatus};
use crate::metrics::{Metrics, NameLabels, PeerLabels, ReasonLabels, StatusLabels};
use crate::transport::{spawn_link, Identity, PeerLink, PeerTasks};
use mendkv_core::config::FsyncPolicy;
use mendkv_core::membership::PeerStatus;
use mendkv_core::message::{ClientRequestId, ClientResponse, Message};
use mendkv_core::node::Counters;
use mendkv_core::node::{Action, Node, SyncTicket};
use mendkv_core::storage::{Storage, StorageError};
use mendkv_core::{Millis, NodeId};
use mendkv_storage::FjallStorage;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bound on inputs handled before actions are flushed and a sync started.
const MAX_BATCH: usize = 512;

/// Backoff between attempts to reopen a stopped storage engine (it waits for free space).
const RECOVERY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(5);

struct NodeTask {
    node: Node<FjallStorage>,
    storage: FjallStorage,
    start: Instant,
    /// Wall-clock milliseconds at `start`: the node's `now` is wall-clock based (so hint
    /// TTLs hold across restarts) and monotonic within the process.
    start_ms: Millis,
    links: BTreeMap<NodeId, PeerLink>,
    clients: BTreeMap<ClientRequestId, oneshot::Sender<ClientResponse>>,
    next_client: ClientRequestId,
    identity: Arc<Identity>,
    inbox: mpsc::Sender<Inbox>,
    metrics: Arc<Metrics>,
    /// Where link tasks run, so shutdown can wait for them.
    peer_tasks: PeerTasks,
    sync_in_flight: Option<(SyncTicket, JoinHandle<Result<(), StorageError>>)>,
    /// A reopen of the stopped storage engine under way (a blocking thread), the next
    /// attempt's time and the backoff after it.
    recovery: Option<JoinHandle<Result<bool, StorageError>>>,
    next_recovery_at: Instant,
    recovery_backoff: Duration,
    /// The node's counters as last exported, so metrics grow by the difference.
    exported: Counters,
    /// Whether the log already said that this node was removed and serves nothing.
    refusal_logged: bool,
}

impl NodeTask {
    fn now(&self) -> Millis {
        self.start_ms + self.start.elapsed().as_millis() as Millis
    }

    fn handle(&mut self, item: Inbox) {
        let now = self.now();
        match item {
            Inbox::Client { request, reply } => {
                self.next_client += 1;
                let id = self.next_client;
                self.clients.insert(id, reply);
                self.node.handle_client_request(now, id, request);
            }
            Inbox::Peer { from, message } => self.node.handle_message(now, &from, message),
            Inbox::PeerUp { info } => {
                let id = info.id.clone();
                self.node.handle_member_discovered(info);
                self.node.handle_peer_status(now, &id, PeerStatus::Up);
            }
            Inbox::PeerDown { id } => self.node.handle_peer_status(now, &id, PeerStatus::Down),
            Inbox::Discovered { info } => {
                // A peer that dials us is alive: let a backed-off link retry now.
                if let Some(link) = self.links.get(&info.id) {
                    if link.is_down() {
                        link.retry_now.notify_one();
                    }
                }
                self.node.handle_member_discovered(info);
            }
            Inbox::SeedDiscovered { info } => self.node.handle_seed_discovered(now, info),
            Inbox::SendFailed { to, message } => self.node.handle_send_failed(now, &to, &message),
            Inbox::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Inbox::Dashboard { reply } => {
                let _ = reply.send(crate::dashboard::snapshot(&mut self.node, now));
            }
        }
    }

    fn dispatch(&mut self) {
        while let Some(action) = self.node.poll_action() {
            match action {
                Action::Reply { client, response } => {
                    if let Some(reply) = self.clients.remove(&client) {
                        let _ = reply.send(response);
                    }
                }
                Action::Send { to, message } => self.send(to, message),
            }
        }
    }

    fn send(&mut self, to: NodeId, message: Message) {
        if !self.links.contains_key(&to) {
            let Some(info) = self.node.membership().get(&to) else {
                self.node.handle_send_failed(self.now(), &to, &message);
                return;
            };
            let link = spawn_link(
                to.clone(),
                info.peer_address.clone(),
                self.identity.clone(),
                self.inbox.clone(),
                self.metrics.clone(),
                &self.peer_tasks,
            );
            self.links.insert(to.clone(), link);
        }
        let Some(link) = self.links.get(&to) else {
            return;
        };
        if link.is_down() {
            self.node.handle_send_failed(self.now(), &to, &message);
            return;
        }
        if let Err(error) = link.queue.try_send(message) {
            let message = match error {
                mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
            };
            self.node.handle_send_failed(self.now(), &to, &message);
        }
    }

    fn start_sync_if_needed(&mut self) {
        if self.sync_in_flight.is_some() || self.node.config().fsync != FsyncPolicy::Always {
            return;
        }
        self.start_sync();
    }

    fn start_sync(&mut self) {
        if self.sync_in_flight.is_some() {
            return;
        }
        if let Some(ticket) = self.node.begin_sync() {
            let storage = self.storage.clone();
            let handle = tokio::task::spawn_blocking(move || storage.sync());
            self.sync_in_flight = Some((ticket, handle));
        }
    }

    /// Whether a reopen of the storage engine is due: it stopped and no attempt is running.
    fn recovery_due(&self) -> bool {
        self.recovery.is_none() && self.storage.failure().is_some()
    }

    fn start_recovery(&mut self) {
        let storage = self.storage.clone();
        self.recovery = Some(tokio::task::spawn_blocking(move || storage.recover()));
    }

    fn finish_recovery(&mut self, result: Result<bool, StorageError>) {
        match result {
            Ok(reopened) => {
                if reopened {
                    self.metrics.storage_recoveries.inc();
                }
                self.recovery_backoff = RECOVERY_BACKOFF_MIN;
            }
            Err(error) => {
                tracing::debug!(%error, "storage not reopened yet");
                self.next_recovery_at = Instant::now() + self.recovery_backoff;
                self.recovery_backoff = (self.recovery_backoff * 2).min(RECOVERY_BACKOFF_MAX);
            }
        }
    }

    fn status(&self) -> ClusterStatus {
        let ring = self.node.ring();
        let nodes = self
            .node
            .membership()
            .all()
            .map(|info| NodeStatus {
                id: info.id.to_string(),
                peer_address: info.peer_address.clone(),
                http_address: info.http_address.clone(),
                status: self.node.peer_liveness(&info.id).as_str(),
                state: self.node.peer_state(&info.id).as_str(),
                phi: self.node.peer_phi(&info.id, self.now()),
                ownership: ring.ownership(&info.id),
                hints_pending: self.node.hints_pending_for(&info.id) as u64,
                generation: self.node.peer_generation(&info.id),
                change: {
                    let progress = self.node.change_progress(&info.id, self.now());
                    progress.change.is_some().then_some(progress)
                },
            })
            .collect();
        ClusterStatus {
            node_id: self.node.id().to_string(),
            cluster: self.identity.cluster.clone(),
            epoch: self.node.epoch(),
            repair_rate_bytes_per_s: self.node.repair_rate_bytes_per_s(),
            repair_rate_reason: self.node.repair_rate_reason().to_string(),
            repair_debt: self.node.repair_debt(),
            nodes,
        }
    }

    /// Carries the node's counters into Prometheus counters: each grows by what it grew
    /// since the last export (one loop over the node's counter table).
    fn export_stats(&mut self) {
        // The core counts sibling warnings (`mendkv_siblings_warned_total`); the log line is ours.
        for warning in self.node.take_sibling_warnings() {
            tracing::warn!(
                bucket = %warning.bucket,
                key = %String::from_utf8_lossy(&warning.key),
                siblings = warning.siblings,
                warn_siblings = warning.warn_siblings,
                "key has many siblings: its writers do not send back the context they read"
            );
        }
        let now = self.node.stats().clone();
        let metrics = &self.metrics;
        for (counter, value) in now.iter() {
            metrics.count_node(counter, value - self.exported.get(counter));
        }
        for peer in self.node.take_newly_refused_peers() {
            tracing::warn!(
                %peer,
                "refusing a node removed from the cluster (remove-node) that came back with its \
                 old data: its requests are dropped and its gossip is heard only about itself; \
                 wipe its data directory and start it again to rejoin"
            );
        }
        let refused = self.node.is_refused();
        if refused != self.refusal_logged {
            if refused {
                tracing::error!(
                    "this node was removed from the cluster (remove-node): it serves no reads, \
                     writes or peers; wipe its data directory and start it again to rejoin"
                );
            } else {
                tracing::info!(
                    "this node's removal was lifted: it takes part in the cluster again"
                );
            }
            self.refusal_logged = refused;
        }
        for range in self.node.take_tree_mismatches() {
            tracing::error!(
                range_start = range.start,
                range_end = range.end,
                "a Merkle tree disagreed with its data; rebuilt from a scan"
            );
        }
        metrics.hints_pending.set(self.node.hints_pending() as i64);
        metrics.hints_bytes.set(self.node.hints_bytes() as i64);
        for duration_ms in self.node.take_exchange_durations_ms() {
            metrics
                .anti_entropy_cycle
                .observe(duration_ms as f64 / 1000.0);
        }
        // Every known peer gets a value, so a debt paid off reads 0 rather than its last size.
        let debts = self.node.repair_debt();
        let me = self.node.id().clone();
        for peer in self
            .node
            .membership()
            .ids()
            .filter(|id| **id != me)
            .cloned()
            .collect::<Vec<_>>()
        {
            let debt = debts.iter().find(|d| d.peer == peer);
            let labels = PeerLabels {
                peer: peer.to_string(),
            };
            metrics
                .anti_entropy_repair_debt
                .get_or_create(&labels)
                .set(debt.map_or(0, |d| d.mismatched_leaves) as i64);
            metrics.repair_debt_eta.get_or_create(&labels).set(
                debt.and_then(|d| d.eta_ms)
                    .map_or(0.0, |ms| ms as f64 / 1000.0),
            );
        }
        metrics
            .anti_entropy_tree_bytes
            .set(self.node.tree_memory_bytes() as i64);
        let open = self.node.repair_breaker_open();
        let gauge = metrics
            .circuit_breaker_open
            .get_or_create(&NameLabels { name: "repair" });
        if (gauge.get() == 1) != open {
            if open {
                tracing::warn!(
                    trips = self.node.repair_breaker_trips(),
                    "circuit breaker open: anti-entropy and hint replay paused"
                );
            } else {
                tracing::info!("circuit breaker closed: repair work resumes");
            }
        }
        gauge.set(i64::from(open));
        metrics
            .repair_rate
            .set(self.node.repair_rate_bytes_per_s() as i64);
        let wall_ms = self.now();
        if metrics.history.due(wall_ms) {
            metrics.history.record(wall_ms, &metrics.encode());
        }
        self.exported = now;
    }

    fn publish_gauges(&self) {
        let now = self.now();
        let mut counts = [0i64; 3];
        for id in self.node.membership().ids() {
            let liveness = self.node.peer_liveness(id);
            counts[liveness as usize] += 1;
            if id != self.node.id() {
                self.metrics
                    .peer_phi
                    .get_or_create(&crate::metrics::PeerLabels {
                        peer: id.to_string(),
                    })
                    .set(self.node.peer_phi(id, now));
            }
        }
        for (status, count) in ["up", "suspect", "down"].into_iter().zip(counts) {
            self.metrics
                .peers
                .get_or_create(&StatusLabels { status })
                .set(count);
        }
        let gossip = self.node.gossip_stats();
        let dropped = [
            ("malformed", gossip.dropped_malformed),
            ("oversize", gossip.dropped_oversize),
            ("stale_generation", gossip.stale_generation_rejected),
        ];
        for (reason, total) in dropped {
            let counter = self
                .metrics
                .gossip_dropped
                .get_or_create(&ReasonLabels { reason });
            // Gossip keeps totals; the counter catches up with them.
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }
}

/// Runs the node until `shutdown` turns true; then makes everything durable and returns.
#[allow(clippy::too_many_arguments)]
pub async fn run_node(
    node: Node<FjallStorage>,
    storage: FjallStorage,
    identity: Arc<Identity>,
    inbox_sender: mpsc::Sender<Inbox>,
    mut inbox: mpsc::Receiver<Inbox>,
    metrics: Arc<Metrics>,
    peer_tasks: PeerTasks,
    mut shutdown: watch::Receiver<bool>,
    start: Instant,
    start_ms: Millis,
) {
    let periodic = match node.config().fsync {
        FsyncPolicy::Periodic { interval_ms } => Some(Duration::from_millis(interval_ms)),
        FsyncPolicy::Always => None,
    };
    let mut task = NodeTask {
        node,
        storage,
        start,
        start_ms,
        links: BTreeMap::new(),
        clients: BTreeMap::new(),
        next_client: 0,
        identity,
        inbox: inbox_sender,
        metrics,
        peer_tasks,
        sync_in_flight: None,
        recovery: None,
        next_recovery_at: Instant::now(),
        recovery_backoff: RECOVERY_BACKOFF_MIN,
        exported: Counters::default(),
        refusal_logged: false,
    };
    let mut periodic_sync = tokio::time::interval(periodic.unwrap_or(Duration::from_secs(3600)));
    let mut gauges = tokio::time::interval(Duration::from_millis(200));
    loop {
        let deadline = task.node.next_deadline().min(task.now() + 1000);
        let wake = start + Duration::from_millis(deadline.saturating_sub(start_ms));
        tokio::select! {
            item = inbox.recv() => {
                let Some(item) = item else { break };
                task.handle(item);
                for _ in 0..MAX_BATCH {
                    match inbox.try_recv() {
                        Ok(item) => task.handle(item),
                        Err(_) => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = task.now();
                task.node.handle_tick(now);
            }
            result = async { (&mut task.sync_in_flight.as_mut().expect("guarded").1).await }, if task.sync_in_flight.is_some() => {
                let (ticket, _) = task.sync_in_flight.take().expect("guarded");
                let result = result.unwrap_or_else(|e| Err(StorageError::Engine(e.to_string())));
                if let Err(error) = &result {
                    tracing::error!(%error, "fsync failed; held acknowledgements become errors");
                }
                task.node.finish_sync(ticket, result);
            }
            _ = periodic_sync.tick(), if periodic.is_some() => task.start_sync(),
            // A stopped engine (full disk) is reopened once space returns, with backoff.
            _ = tokio::time::sleep_until(task.next_recovery_at), if task.recovery_due() => {
                task.start_recovery();
            }
            result = async { task.recovery.as_mut().expect("guarded").await }, if task.recovery.is_some() => {
                task.recovery = None;
                let result = result.unwrap_or_else(|e| Err(StorageError::Engine(e.to_string())));
                task.finish_recovery(result);
            }
            _ = gauges.tick() => {
                // Metrics follow the node every 200 ms, off the request path.
                task.publish_gauges();
                task.export_stats();
                let full = task.storage.health().is_err();
                task.metrics.storage_full.set(i64::from(full));
            }
            _ = shutdown.changed() => break,
        }
        task.dispatch();
        task.start_sync_if_needed();
        task.dispatch();
    }
    // Clean shutdown: a reopen under way ends first (it holds the engine), then the sync
    // under way, then everything is made durable.
    if let Some(recovery) = task.recovery.take() {
        let _ = recovery.await;
    }
    if let Some((ticket, handle)) = task.sync_in_flight.take() {
        let result = handle
            .await
            .unwrap_or_else(|e| Err(StorageError::Engine(e.to_string())));
        task.node.finish_sync(ticket, result);
    }
    task.node.sync_now();
    task.dispatch();
    if let Err(error) = task.storage.sync() {
        tracing::error!(%error, "final fsync failed");
    }
    // Memtables out to tables, so that the next start has no journal to replay (issue 15:
    // seconds per 100 MB of journal otherwise). Bounded: a slow flush only slows the next
    // start, the journal keeps the data.
    let storage = task.storage.clone();
    match tokio::task::spawn_blocking(move || {
        storage.flush_for_close(mendkv_storage::CLOSE_FLUSH_DEADLINE)
    })
    .await
    {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => tracing::warn!(
            "memtables not flushed before the deadline; the next start replays the journal"
        ),
        Ok(Err(error)) => tracing::warn!(%error, "memtables not flushed at stop"),
        Err(error) => tracing::warn!(%error, "memtable flush at stop failed"),
    }
}
