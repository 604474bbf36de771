//! Prometheus metrics of one node (SPEC section 5). One registry per node, so several nodes
//! in one process (tests) never mix their figures.

use mendkv_core::node::Counter as NodeCounter;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Labels of a node counter's metric, as its table entry lists them.
pub type NodeCounterLabels = Vec<(&'static str, &'static str)>;

/// A node counter's metric: labelled counters of one name share a family.
enum NodeMetric {
    Plain(Counter),
    Labelled(Family<NodeCounterLabels, Counter>),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub op: &'static str,
    pub level: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Every metric this node exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<OpLabels, Histogram, fn() -> Histogram>,
    pub network_bytes: Family<BytesLabels, Counter>,
    pub peer_frames_rejected: Family<ReasonLabels, Counter>,
    pub peer_handshakes_refused: Family<ReasonLabels, Counter>,
    pub peers: Family<StatusLabels, Gauge>,
    /// 1 while storage takes no writes (disk full, or the engine stopped and not reopened).
    pub storage_full: Gauge,
    pub storage_recoveries: Counter,
    pub hints_pending: Gauge,
    pub hints_bytes: Gauge,
    pub anti_entropy_cycle: Histogram,
    pub anti_entropy_repair_debt: Family<PeerLabels, Gauge>,
    pub repair_debt_eta: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    pub anti_entropy_tree_bytes: Gauge,
    pub circuit_breaker_open: Family<NameLabels, Gauge>,
    pub peer_phi: Family<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub http_connections: Gauge,
    pub http_connections_refused: Counter,
    /// `mendkv_resp_commands_total{command,outcome}`: Redis protocol commands.
    pub resp_commands: Family<crate::resp::CommandLabels, Counter>,
    /// Open Redis protocol connections.
    pub resp_connections: Gauge,
    /// Redis protocol connections closed at once because `http.max_connections` were open.
    pub resp_connections_refused: Counter,
    /// Redis protocol connections closed after `http.idle_timeout_ms` without a command.
    pub resp_connections_idle_closed: Counter,
    /// One metric per name of the node's counter table (`mendkv_core::node::Counter`).
    node_counters: BTreeMap<&'static str, NodeMetric>,
    /// Gossip messages dropped, by reason (from gossip's own statistics).
    pub gossip_dropped: Family<ReasonLabels, Counter>,
    /// The repair byte budget in force (0: unlimited).
    pub repair_rate: Gauge,
    /// The last minutes of the charted metrics, for the dashboard.
    pub history: crate::dashboard::MetricsHistory,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "mendkv_requests",
            "Client requests by operation, consistency level and outcome",
            requests.clone(),
        );
        let request_duration =
            Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "mendkv_request_duration_seconds",
            "Client request latency at the coordinator",
            request_duration.clone(),
        );
        let network_bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "mendkv_network_bytes",
            "Bytes on the network by direction and class (client, replication, ...)",
            network_bytes.clone(),
        );
        let peer_frames_rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mendkv_peer_frames_rejected",
            "Peer frames refused (malformed, oversize, unexpected); the connection is dropped",
            peer_frames_rejected.clone(),
        );
        let peer_handshakes_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mendkv_peer_handshakes_refused",
            "Peer connections refused before or in the handshake, by reason",
            peer_handshakes_refused.clone(),
        );
        let peers = Family::<StatusLabels, Gauge>::default();
        registry.register("mendkv_peers", "Known peers by status", peers.clone());
        let storage_full = Gauge::default();
        registry.register(
            "mendkv_storage_full",
            "1 while this node's storage takes no writes (disk full or engine stopped)",
            storage_full.clone(),
        );
        let storage_recoveries = Counter::default();
        registry.register(
            "mendkv_storage_recoveries",
            "Times the storage engine was reopened after it stopped (a full disk)",
            storage_recoveries.clone(),
        );
        let hints_pending = Gauge::default();
        registry.register(
            "mendkv_hints_pending",
            "Hints waiting for delivery",
            hints_pending.clone(),
        );
        let hints_bytes = Gauge::default();
        registry.register(
            "mendkv_hints_bytes",
            "Bytes of stored hints (keys plus encoded records), the measure of max_bytes_total",
            hints_bytes.clone(),
        );
        let anti_entropy_cycle = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "mendkv_anti_entropy_cycle_duration_seconds",
            "Duration of one anti-entropy exchange (one range with one peer)",
            anti_entropy_cycle.clone(),
        );
        let anti_entropy_repair_debt = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "mendkv_anti_entropy_repair_debt",
            "Mismatched Merkle leaves the last exchange of each range with this peer left unmended",
            anti_entropy_repair_debt.clone(),
        );
        let repair_debt_eta = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "mendkv_repair_debt_eta_seconds",
            "Time to repair the known debt toward this peer at the repair rate granted now (0: none known)",
            repair_debt_eta.clone(),
        );
        let anti_entropy_tree_bytes = Gauge::default();
        registry.register(
            "mendkv_anti_entropy_tree_bytes",
            "Memory held by this node's Merkle trees",
            anti_entropy_tree_bytes.clone(),
        );
        let circuit_breaker_open = Family::<NameLabels, Gauge>::default();
        registry.register(
            "mendkv_circuit_breaker_open",
            "1 while the breaker pauses repair work (open or half-open)",
            circuit_breaker_open.clone(),
        );
        let peer_phi = Family::<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "mendkv_peer_phi",
            "Phi-accrual suspicion of each peer (convicted at gossip.phi_convict_threshold)",
            peer_phi.clone(),
        );
        let http_connections = Gauge::default();
        registry.register(
            "mendkv_http_connections",
            "Client connections the HTTP API serves now (at most http.max_connections)",
            http_connections.clone(),
        );
        let http_connections_refused = Counter::default();
        registry.register(
            "mendkv_http_connections_refused",
            "Client connections answered 503 and closed because http.max_connections were open",
            http_connections_refused.clone(),
        );
        let resp_commands = Family::<crate::resp::CommandLabels, Counter>::default();
        registry.register(
            "mendkv_resp_commands",
            "Redis protocol commands by command and outcome",
            resp_commands.clone(),
        );
        let resp_connections = Gauge::default();
        registry.register(
            "mendkv_resp_connections",
            "Client connections the Redis protocol serves now",
            resp_connections.clone(),
        );
        let resp_connections_refused = Counter::default();
        registry.register(
            "mendkv_resp_connections_refused",
            "Redis protocol connections closed at once because http.max_connections were open",
            resp_connections_refused.clone(),
        );
        let resp_connections_idle_closed = Counter::default();
        registry.register(
            "mendkv_resp_connections_idle_closed",
            "Redis protocol connections closed after http.idle_timeout_ms without a command",
            resp_connections_idle_closed.clone(),
        );
        let mut node_counters = BTreeMap::new();
        for counter in NodeCounter::ALL {
            let spec = counter.spec();
            node_counters.entry(spec.name).or_insert_with(|| {
                if spec.labels.is_empty() {
                    let metric = Counter::default();
                    registry.register(spec.name, spec.help, metric.clone());
                    NodeMetric::Plain(metric)
                } else {
                    let family = Family::<NodeCounterLabels, Counter>::default();
                    registry.register(spec.name, spec.help, family.clone());
                    NodeMetric::Labelled(family)
                }
            });
        }
        let gossip_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mendkv_gossip_dropped",
            "Gossip messages dropped: malformed, oversize, stale generation",
            gossip_dropped.clone(),
        );
        let repair_rate = Gauge::default();
        registry.register(
            "mendkv_repair_rate_bytes_per_s",
            "The repair byte budget in force, shared by anti-entropy and hint replay (0: unlimited)",
            repair_rate.clone(),
        );
        Arc::new(Metrics {
            repair_rate,
            history: crate::dashboard::MetricsHistory::default(),
            node_counters,
            gossip_dropped,
            http_connections,
            http_connections_refused,
            resp_commands,
            resp_connections,
            resp_connections_refused,
            resp_connections_idle_closed,
            peer_phi,
            circuit_breaker_open,
            anti_entropy_cycle,
            anti_entropy_repair_debt,
            repair_debt_eta,
            anti_entropy_tree_bytes,
            hints_bytes,
            hints_pending,
            registry,
            requests,
            request_duration,
            network_bytes,
            peer_frames_rejected,
            peer_handshakes_refused,
            peers,
            storage_full,
            storage_recoveries,
        })
    }

    /// Adds `n` to the metric of one of the node's counters (creating its series at 0).
    pub fn count_node(&self, counter: NodeCounter, n: u64) {
        let spec = counter.spec();
        match self.node_counters.get(spec.name) {
            Some(NodeMetric::Plain(metric)) => {
                metric.inc_by(n);
            }
            Some(NodeMetric::Labelled(family)) => {
                family.get_or_create(&spec.labels.to_vec()).inc_by(n);
            }
            None => {}
        }
    }

    pub fn count_bytes(&self, direction: &'static str, class: &'static str, bytes: usize) {
        self.network_bytes
            .get_or_create(&BytesLabels { direction, class })
            .inc_by(bytes as u64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
