//! The tokio driver of a mendkv node: TCP transport between nodes, timers, group commit,
//! the HTTP API and metrics. The only crate that awaits; all protocol decisions are made by
//! the sans-IO `mendkv_core::node::Node`.
//!
//! # Layout
//! - [`config`]: TOML / env / flag configuration.
//! - [`node_loop`]: the task that owns the node, runs group commit and carries out actions.
//! - [`transport`]: handshake, peer links, reconnect with backoff, inbound connections.
//! - [`http`]: the client API (SPEC section 3).
//! - [`http_listener`]: accepts client connections up to a cap, with per-connection deadlines.
//! - [`request_head`]: checks request heads and body framing before hyper sees them.
//! - [`resp`]: the Redis protocol (SPEC section 9), when `resp.listen` is set.
//! - [`tls`]: `[tls]`: mutual TLS on peer links, TLS on the client listeners.
//! - [`metrics`]: Prometheus metrics (SPEC section 5).
//! - [`dashboard`]: the operator's page (`GET /dashboard`) and the JSON it reads.
//!
//! # Shutdown
//! [`run`] returns when its shutdown signal turns true: the HTTP listener stops taking
//! connections and drains (bounded), the node task finishes its sync under way and fsyncs
//! once more, so nothing acknowledged is left unsynced. Then the transport's tasks (accept
//! loop, inbound connections, links, seed contacts) stop, and `run` waits for them (at most
//! [`PEER_SHUTDOWN_DEADLINE`]), so a stopped node holds no peer sockets.

pub mod config;
pub mod dashboard;
pub mod http;
pub mod http_listener;
pub mod inbox;
pub mod metrics;
pub mod node_loop;
pub mod request_head;
pub mod resp;
pub mod tls;
pub mod transport;

use crate::config::ServerConfig;
use crate::inbox::Inbox;
use crate::metrics::Metrics;
use crate::node_loop::run_node;
use crate::transport::{accept_loop, dial, Identity, Inbound, PeerTasks};
use mendkv_core::membership::MemberInfo;
use mendkv_core::node::Node;
use mendkv_core::version::ContextKey;
use mendkv_storage::{FjallStorage, StorageOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("storage: {0}")]
    Storage(#[from] mendkv_core::storage::StorageError),
    #[error("node: {0}")]
    Node(#[from] mendkv_core::node::NodeError),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("http server: {0}")]
    Http(std::io::Error),
}

/// Bound on queued inputs of the node task; HTTP handlers wait when it is full.
const INBOX_CAPACITY: usize = 16_384;
/// How long a stopping node waits for its peer tasks; links that are still sending their
/// last messages get part of it.
pub const PEER_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(2);

/// Runs a node until `shutdown` turns true.
pub async fn run(config: ServerConfig, shutdown: watch::Receiver<bool>) -> Result<(), ServerError> {
    let node_config = config.node_config()?;
    let tls = config.tls.build().map_err(config::ConfigError::Invalid)?;
    // Before storage opens its files, so that the limit they count against is the raised one.
    let open_file_limit = http_listener::raise_open_file_limit();
    let http_limits = http_limits(&config, open_file_limit);
    let storage = FjallStorage::open_with(
        &config.node.data_dir,
        StorageOptions {
            min_free_bytes: config.storage.min_free_bytes,
        },
    )?;
    let node = Node::new(node_config.clone(), storage.clone(), wall_clock_ms())?;
    let peer_listener = TcpListener::bind(&config.node.listen)
        .await
        .map_err(|e| ServerError::Bind(config.node.listen.clone(), e))?;
    let http_socket = TcpListener::bind(&config.node.http)
        .await
        .map_err(|e| ServerError::Bind(config.node.http.clone(), e))?;
    let resp_socket = match &config.resp.listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|e| ServerError::Bind(address.clone(), e))?,
        ),
        None => None,
    };
    let metrics = Metrics::new();
    let identity = Arc::new(Identity {
        cluster: config.cluster.name.clone(),
        secret: config.cluster.secret.clone().into_bytes(),
        me: MemberInfo {
            id: node_config.node_id.clone(),
            peer_address: node_config.peer_address.clone(),
            http_address: node_config.http_address.clone(),
        },
        peer_addresses: vec![node_config.peer_address.clone(), config.node.listen.clone()],
        tls: tls.peer.clone(),
    });
    let (inbox_sender, inbox) = mpsc::channel(INBOX_CAPACITY);
    let start = tokio::time::Instant::now();
    let start_ms = wall_clock_ms();
    log_start(&config, &node, &tls, open_file_limit, &http_limits);
    let peer_tasks = PeerTasks::default();
    let inbound = Arc::new(Inbound::new(
        identity.clone(),
        inbox_sender.clone(),
        metrics.clone(),
        &config.peer,
    ));
    peer_tasks.spawn(accept_loop(peer_listener, inbound, peer_tasks.clone()));
    for seed in config
        .cluster
        .seeds
        .iter()
        .filter(|seed| !identity.peer_addresses.contains(seed))
    {
        peer_tasks.spawn(contact_seed(
            seed.clone(),
            identity.clone(),
            inbox_sender.clone(),
        ));
    }
    let storage_health = storage.clone();
    let node_task = tokio::spawn(run_node(
        node,
        storage,
        identity,
        inbox_sender.clone(),
        inbox,
        metrics.clone(),
        peer_tasks.clone(),
        shutdown.clone(),
        start,
        start_ms,
    ));
    let listener_metrics = http_listener::ListenerMetrics {
        connections: metrics.http_connections.clone(),
        refused: metrics.http_connections_refused.clone(),
    };
    let state = http::ApiState {
        inbox: inbox_sender,
        metrics,
        max_value_bytes: node_config.max_value_bytes,
        default_read: node_config.default_read,
        default_write: node_config.default_write,
        request_timeout: Duration::from_millis(node_config.request_timeout_ms),
        contexts: ContextKey::from_secret(config.cluster.secret.as_bytes()),
        body_timeout: http_limits.idle_timeout,
        storage: storage_health,
    };
    let resp_task = resp_socket.map(|socket| {
        let resp_state = resp_state(&config, &node_config, &state, &http_limits, &tls);
        tracing::info!(
            resp = %resp_state.listen,
            bucket = %resp_state.bucket,
            tls = resp_state.tls.is_some(),
            "serving the Redis protocol"
        );
        tokio::spawn(resp::serve(socket, resp_state, shutdown.clone()))
    });
    let app = http::router(state);
    http_listener::serve(
        http_socket,
        app,
        http_limits,
        listener_metrics,
        tls.client.clone(),
        shutdown.clone(),
    )
    .await;
    if let Some(task) = resp_task {
        let _ = task.await;
    }
    let _ = node_task.await;
    let still_running = peer_tasks.shutdown(PEER_SHUTDOWN_DEADLINE).await;
    if still_running > 0 {
        tracing::warn!(still_running, "peer tasks did not stop in time");
    }
    tracing::info!("node stopped");
    Ok(())
}

/// The HTTP listener's bounds: the configured cap lowered to what the open-file limit
/// allows after a reserve (logged when lowered).
fn http_limits(config: &ServerConfig, open_file_limit: Option<u64>) -> http_listener::HttpLimits {
    let limits = http_listener::HttpLimits {
        max_connections: http_listener::connection_cap(
            config.http.max_connections,
            open_file_limit,
        ),
        header_timeout: Duration::from_millis(config.http.header_timeout_ms),
        idle_timeout: Duration::from_millis(config.http.idle_timeout_ms),
    };
    if limits.max_connections < config.http.max_connections {
        tracing::warn!(
            configured = config.http.max_connections,
            in_force = limits.max_connections,
            open_file_limit,
            reserve = http_listener::RESERVED_FILE_DESCRIPTORS,
            "http.max_connections lowered to fit the open-file limit"
        );
    }
    limits
}

/// What the node found at start, in the log.
fn log_start(
    config: &ServerConfig,
    node: &Node<FjallStorage>,
    tls: &tls::TlsSetup,
    open_file_limit: Option<u64>,
    http_limits: &http_listener::HttpLimits,
) {
    let corrupt_hints = node.stats()[mendkv_core::node::Counter::HintsDroppedCorrupt];
    if corrupt_hints > 0 {
        tracing::error!(
            corrupt_hints,
            "corrupt hint records skipped and removed at start"
        );
    }
    tracing::info!(
        hints_pending = node.hints_pending(),
        "hint queue rebuilt from storage"
    );
    tracing::info!(
        trees_built = node.stats()[mendkv_core::node::Counter::TreeRebuilds],
        "Merkle trees rebuilt from a scan at start (they are not persisted); the rest build in \
         the background while anti-entropy waits for them"
    );
    tracing::info!(
        node = %node.id(),
        epoch = node.epoch(),
        peer = %config.node.listen,
        http = %config.node.http,
        open_file_limit,
        max_http_connections = http_limits.max_connections,
        tls_peer = tls.peer.is_some(),
        tls_client = tls.client.is_some(),
        "node starting"
    );
    if !node.epoch_confirmed() {
        tracing::warn!(
            "no epoch record in the data directory (new or wiped): this node coordinates no \
             writes until a seed has told it which epoch it ran under before"
        );
    }
}

/// The Redis listener's shared state: the node's inbox and metrics, the `[resp]` settings,
/// and HTTP's connection bounds.
fn resp_state(
    config: &ServerConfig,
    node_config: &mendkv_core::config::NodeConfig,
    state: &http::ApiState,
    http_limits: &http_listener::HttpLimits,
    tls: &tls::TlsSetup,
) -> resp::RespState {
    let (read, write) = config.resp_levels().unwrap_or((
        mendkv_core::quorum::ConsistencyLevel::Quorum,
        mendkv_core::quorum::ConsistencyLevel::Quorum,
    ));
    resp::RespState {
        inbox: state.inbox.clone(),
        metrics: state.metrics.clone(),
        bucket: config.resp.bucket.clone(),
        read,
        write,
        password: config.resp.password.clone(),
        max_value_bytes: node_config.max_value_bytes,
        request_timeout: state.request_timeout,
        max_connections: http_limits.max_connections,
        idle_timeout: http_limits.idle_timeout,
        handshake_timeout: http_limits.header_timeout,
        tls: tls.resp.clone(),
        storage: state.storage.clone(),
        key_counting: Default::default(),
        node_id: node_config.node_id.to_string(),
        listen: config.resp.listen.clone().unwrap_or_default(),
        started: std::time::Instant::now(),
        next_client_id: Default::default(),
    }
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Introduces this node to a seed (and learns the seed's id), retrying with backoff until the
/// seed answers; from then on membership messages keep everyone informed.
async fn contact_seed(address: String, identity: Arc<Identity>, inbox: mpsc::Sender<Inbox>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // A seed's id is not known before it answers; the handshake still binds its proof
        // to the seed's address.
        match tokio::time::timeout(Duration::from_secs(2), dial(&address, None, &identity)).await {
            Ok(Ok((_, info))) => {
                let _ = inbox.send(Inbox::SeedDiscovered { info }).await;
                return;
            }
            Ok(Err(error)) if error.is_refusal() => {
                tracing::warn!(seed = %address, %error, reason = error.reason(), "seed refused the handshake");
            }
            Ok(Err(error)) => tracing::debug!(seed = %address, %error, "seed not reachable yet"),
            Err(_) => tracing::debug!(seed = %address, "seed dial timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
