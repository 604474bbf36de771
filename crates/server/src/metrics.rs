//! Prometheus metrics of one node (SPEC section 5). One registry per node, so several nodes
//! in one process (tests) never mix their figures.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;

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
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    pub mechanism: &'static str,
    pub outcome: &'static str,
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
    pub fsyncs: Counter,
    /// 1 while storage takes no writes (disk full, or the engine stopped and not reopened).
    pub storage_full: Gauge,
    pub storage_recoveries: Counter,
    pub requests_timed_out: Gauge,
    pub read_repair: Family<OutcomeLabels, Counter>,
    pub repairs: Family<RepairLabels, Counter>,
    pub hints_stored: Counter,
    pub hints_delivered: Counter,
    pub hints_expired: Counter,
    pub hints_dropped: Family<ReasonLabels, Counter>,
    pub hints_pending: Gauge,
    pub hints_bytes: Gauge,
    pub anti_entropy_cycle: Histogram,
    pub anti_entropy_keys_repaired: Counter,
    pub anti_entropy_repair_debt: Family<PeerLabels, Gauge>,
    pub anti_entropy_tree_bytes: Gauge,
    pub anti_entropy_tree_checks: Family<OutcomeLabels, Counter>,
    pub anti_entropy_tree_rebuilds: Counter,
    pub circuit_breaker_open: Family<NameLabels, Gauge>,
    pub peer_phi: Family<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub gossip_dropped: Family<ReasonLabels, Gauge>,
    pub http_connections: Gauge,
    pub http_connections_refused: Counter,
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
        let fsyncs = Counter::default();
        registry.register(
            "mendkv_storage_fsyncs",
            "Group-commit fsyncs",
            fsyncs.clone(),
        );
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
        let requests_timed_out = Gauge::default();
        registry.register(
            "mendkv_coordinator_timeouts",
            "Requests that timed out at this coordinator since start",
            requests_timed_out.clone(),
        );
        let read_repair = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "mendkv_read_repair",
            "Inconsistent reads found, by what became of their repair",
            read_repair.clone(),
        );
        let repairs = Family::<RepairLabels, Counter>::default();
        registry.register(
            "mendkv_repairs",
            "Repair writes by mechanism and outcome (success rate = ok / all)",
            repairs.clone(),
        );
        let hints_stored = Counter::default();
        registry.register(
            "mendkv_hints_stored",
            "Hints stored (coalesced ones included)",
            hints_stored.clone(),
        );
        let hints_delivered = Counter::default();
        registry.register(
            "mendkv_hints_delivered",
            "Hints delivered and acknowledged durably",
            hints_delivered.clone(),
        );
        let hints_expired = Counter::default();
        registry.register(
            "mendkv_hints_expired",
            "Hints dropped at their TTL",
            hints_expired.clone(),
        );
        let hints_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mendkv_hints_dropped",
            "Hints not kept, by reason",
            hints_dropped.clone(),
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
        let anti_entropy_keys_repaired = Counter::default();
        registry.register(
            "mendkv_anti_entropy_keys_repaired",
            "Keys whose local version changed through anti-entropy",
            anti_entropy_keys_repaired.clone(),
        );
        let anti_entropy_repair_debt = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "mendkv_anti_entropy_repair_debt",
            "Mismatched Merkle leaves at the last comparison with each peer",
            anti_entropy_repair_debt.clone(),
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
        let gossip_dropped = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "mendkv_gossip_dropped",
            "Gossip messages dropped since start: malformed, oversize, stale generation",
            gossip_dropped.clone(),
        );
        let anti_entropy_tree_checks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "mendkv_anti_entropy_tree_verifications",
            "Merkle trees checked against a scan of their data, by outcome (ok, mismatch)",
            anti_entropy_tree_checks.clone(),
        );
        let anti_entropy_tree_rebuilds = Counter::default();
        registry.register(
            "mendkv_anti_entropy_tree_rebuilds",
            "Merkle trees built by a scan (every start, and new ranges after ring changes)",
            anti_entropy_tree_rebuilds.clone(),
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
        Arc::new(Metrics {
            http_connections,
            http_connections_refused,
            anti_entropy_tree_checks,
            anti_entropy_tree_rebuilds,
            peer_phi,
            gossip_dropped,
            circuit_breaker_open,
            anti_entropy_cycle,
            anti_entropy_keys_repaired,
            anti_entropy_repair_debt,
            anti_entropy_tree_bytes,
            hints_bytes,
            hints_stored,
            hints_delivered,
            hints_expired,
            hints_dropped,
            hints_pending,
            read_repair,
            repairs,
            registry,
            requests,
            request_duration,
            network_bytes,
            peer_frames_rejected,
            peer_handshakes_refused,
            peers,
            fsyncs,
            storage_full,
            storage_recoveries,
            requests_timed_out,
        })
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
