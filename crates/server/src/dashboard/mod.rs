//! The operator's dashboard (`GET /dashboard`, SPEC section 3): one HTML page with its
//! script embedded in the binary, so it works on a node with no internet access, and the
//! JSON it reads besides `/cluster/status` and `/metrics` (`GET /admin/dashboard.json`):
//! what only the node task knows, such as repair runs, hints per target with their age, the
//! breaker's state and why, and the repair rate in force.
//!
//! The page keeps its own history of `/metrics` samples for the charts (the node keeps
//! none), so the charts start when the page is opened.

use mendkv_core::anti_entropy::{RepairRunStatus, RunState};
use mendkv_core::control::{BreakerState, StressSignal};
use mendkv_core::node::Node;
use mendkv_core::storage::Storage;
use mendkv_core::Millis;
use serde::Serialize;

/// The page: HTML, then its script inline (one response, nothing else to fetch).
pub const PAGE: &str = concat!(
    include_str!("index.html"),
    "<script>\n",
    include_str!("dashboard.js"),
    "</script>\n</body>\n</html>\n"
);

/// Only this node may be fetched from, and nothing may be loaded from elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:";

/// `GET /admin/dashboard.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DashboardState {
    pub node_id: String,
    pub now_ms: Millis,
    pub hints: HintsView,
    pub repair: RepairView,
}

#[derive(Debug, Clone, Serialize)]
pub struct HintsView {
    /// Hints this node holds, per target.
    pub targets: Vec<HintTarget>,
    pub pending_total: u64,
    pub bytes: u64,
    pub ttl_ms: Millis,
    pub max_hints_per_node: u64,
    pub max_bytes_total: u64,
    pub delivery_rate_per_s: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HintTarget {
    pub target: String,
    pub pending: u64,
    /// Age of the oldest hint kept for the target.
    pub oldest_age_ms: Option<Millis>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairView {
    /// Operator runs (`POST /admin/repair`) this node remembers, newest first.
    pub runs: Vec<RepairRunView>,
    /// Mismatched Merkle leaves at this node's last comparison with each peer.
    pub debt: Vec<RepairDebt>,
    pub breaker: BreakerView,
    pub rate: RepairRate,
    pub anti_entropy_enabled: bool,
    pub anti_entropy_interval_ms: Millis,
    pub anti_entropy_concurrency: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairRunView {
    pub id: u64,
    pub state: &'static str,
    pub ranges_total: u64,
    pub ranges_done: u64,
    pub keys_compared: u64,
    pub keys_different: u64,
    pub keys_repaired: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub elapsed_ms: Millis,
    /// Time left at the pace so far; `None` when finished or before the first range ends.
    pub eta_ms: Option<Millis>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairDebt {
    pub node: String,
    pub peer: String,
    pub mismatched_leaves: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BreakerView {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// While open: how long until it lets a probe through.
    pub reopens_in_ms: Option<Millis>,
    pub trips: u64,
    /// The signal that last opened it, in words.
    pub last_trip: Option<String>,
    /// A signal over its threshold now, in words.
    pub stress_now: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairRate {
    /// The repair byte budget in force; 0 means unlimited.
    pub bytes_per_s: u64,
    /// Where the figure comes from: no adaptive controller exists yet.
    pub source: &'static str,
}

/// Time left for a run at its pace so far: elapsed per finished range times ranges left.
pub fn eta_ms(run: &RepairRunStatus) -> Option<Millis> {
    if run.state != RunState::Running || run.ranges_done == 0 {
        return None;
    }
    let left = run.ranges_total.saturating_sub(run.ranges_done);
    Some(run.elapsed_ms.saturating_mul(left) / run.ranges_done)
}

fn describe(signal: StressSignal) -> String {
    match signal {
        StressSignal::P99Latency {
            p99_ms,
            threshold_ms,
        } => format!("p99 latency {p99_ms} ms over {threshold_ms} ms"),
        StressSignal::InFlight {
            in_flight,
            threshold,
        } => format!("{in_flight} requests in flight, over {threshold}"),
        StressSignal::ErrorRate { rate, threshold } => format!(
            "error rate {:.1}% over {:.1}%",
            rate * 100.0,
            threshold * 100.0
        ),
    }
}

/// What the node task answers for `GET /admin/dashboard.json`.
pub fn snapshot<S: Storage>(node: &mut Node<S>, now: Millis) -> DashboardState {
    let config = node.config().clone();
    let breaker_state = node.repair_breaker_state();
    let (state, reopens_in_ms) = match breaker_state {
        BreakerState::Closed => ("closed", None),
        BreakerState::Open { until } => ("open", Some(until.saturating_sub(now))),
        BreakerState::HalfOpen { .. } => ("half_open", None),
    };
    let breaker = BreakerView {
        state,
        reopens_in_ms,
        trips: node.repair_breaker_trips(),
        last_trip: node.repair_breaker_last_trip().map(describe),
        stress_now: node.repair_breaker_stress().map(describe),
    };
    let targets = node
        .hints_by_target()
        .into_iter()
        .map(|(target, pending, oldest)| HintTarget {
            target: target.to_string(),
            pending: pending as u64,
            oldest_age_ms: oldest.map(|created| now.saturating_sub(created)),
        })
        .collect();
    let runs = node
        .repair_runs(now)
        .into_iter()
        .map(|run| RepairRunView {
            eta_ms: eta_ms(&run),
            id: run.id,
            state: run.state.as_str(),
            ranges_total: run.ranges_total,
            ranges_done: run.ranges_done,
            keys_compared: run.keys_compared,
            keys_different: run.keys_different,
            keys_repaired: run.keys_repaired,
            bytes_sent: run.bytes_sent,
            bytes_received: run.bytes_received,
            elapsed_ms: run.elapsed_ms,
        })
        .collect();
    let debt = node
        .repair_debt()
        .map(|(peer, leaves)| RepairDebt {
            node: node.id().to_string(),
            peer: peer.to_string(),
            mismatched_leaves: *leaves,
        })
        .collect();
    DashboardState {
        node_id: node.id().to_string(),
        now_ms: now,
        hints: HintsView {
            targets,
            pending_total: node.hints_pending() as u64,
            bytes: node.hints_bytes(),
            ttl_ms: config.hinted_handoff.ttl_ms,
            max_hints_per_node: config.hinted_handoff.max_hints_per_node as u64,
            max_bytes_total: config.hinted_handoff.max_bytes_total,
            delivery_rate_per_s: node.hint_delivery_rate_per_s(),
        },
        repair: RepairView {
            runs,
            debt,
            breaker,
            rate: RepairRate {
                bytes_per_s: node.repair_rate_bytes_per_s(),
                source: "fixed: anti_entropy.rate_limit_bytes_per_s (no adaptive controller yet)",
            },
            anti_entropy_enabled: config.anti_entropy.enabled,
            anti_entropy_interval_ms: config.anti_entropy.interval_ms,
            anti_entropy_concurrency: config.anti_entropy.concurrency as u64,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: RunState, done: u64, total: u64, elapsed_ms: Millis) -> RepairRunStatus {
        RepairRunStatus {
            id: 1,
            state,
            ranges_total: total,
            ranges_done: done,
            keys_compared: 0,
            keys_different: 0,
            keys_repaired: 0,
            bytes_sent: 0,
            bytes_received: 0,
            elapsed_ms,
        }
    }

    /// The ETA is the pace so far times the ranges left, and absent when it cannot be known.
    #[test]
    fn eta_follows_the_pace_so_far() {
        assert_eq!(eta_ms(&run(RunState::Running, 4, 12, 2_000)), Some(4_000));
        assert_eq!(eta_ms(&run(RunState::Running, 0, 12, 2_000)), None);
        assert_eq!(eta_ms(&run(RunState::Done, 12, 12, 6_000)), None);
        assert_eq!(eta_ms(&run(RunState::Running, 12, 12, 6_000)), Some(0));
    }

    /// The page is whole: its script is inline and it names every endpoint it reads.
    #[test]
    fn page_embeds_its_script_and_fetches_only_this_node() {
        assert!(PAGE.contains("<script>") && PAGE.trim_end().ends_with("</html>"));
        for endpoint in ["/cluster/status", "/metrics", "/admin/dashboard.json"] {
            assert!(PAGE.contains(endpoint), "the page reads {endpoint}");
        }
        // The SVG namespace is a name, not an address the browser fetches.
        let page = PAGE.replace("http://www.w3.org/2000/svg", "");
        assert!(!page.contains("http://") && !page.contains("https://"));
    }
}
