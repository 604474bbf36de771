//! The operator's dashboard (`GET /dashboard`, SPEC section 3): one HTML page with its
//! script embedded in the binary, so it works on a node with no internet access, and the
//! JSON it reads besides `/cluster/status` and `/metrics` (`GET /admin/dashboard.json`):
//! what only the node task knows, such as repair runs, hints per target with their age, the
//! breaker's state and why, and the repair rate in force.
//!
//! For its charts the page needs the recent past: [`MetricsHistory`] keeps the charted
//! lines of `/metrics` every [`HISTORY_INTERVAL_MS`] for the last ten minutes
//! (`GET /admin/dashboard/history`, read once when the page opens); the page adds its own
//! samples after that.

use mendkv_core::anti_entropy::{RepairRunStatus, RunState};
use mendkv_core::control::{BreakerState, StressSignal};
use mendkv_core::node::Node;
use mendkv_core::storage::Storage;
use mendkv_core::Millis;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;

/// How often the node keeps a sample of its charted metrics.
pub const HISTORY_INTERVAL_MS: Millis = 5_000;
/// Samples kept: ten minutes' worth.
pub const HISTORY_SAMPLES: usize = 120;

/// The metrics the charts draw (request rates and latency, read repair, anti-entropy cycle
/// time, hint delivery, repair outcomes, network bytes per class); other lines are not kept.
const CHARTED: &[&str] = &[
    "mendkv_requests_total",
    "mendkv_request_duration_seconds_bucket",
    "mendkv_read_repair_total",
    "mendkv_anti_entropy_cycle_duration_seconds_sum",
    "mendkv_anti_entropy_cycle_duration_seconds_count",
    "mendkv_hints_delivered_total",
    "mendkv_repairs_total",
    "mendkv_network_bytes_total",
];

/// The last ten minutes of the charted metrics, so a page opened now has charts at once.
/// Bounded: [`HISTORY_SAMPLES`] samples of a few kilobytes each.
#[derive(Debug, Default)]
pub struct MetricsHistory {
    samples: Mutex<VecDeque<HistorySample>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistorySample {
    /// Wall-clock milliseconds.
    pub t_ms: Millis,
    /// The charted lines of `/metrics` at that time.
    pub text: String,
}

impl MetricsHistory {
    /// Whether a sample is due at `now_ms`.
    pub fn due(&self, now_ms: Millis) -> bool {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples
            .back()
            .is_none_or(|last| now_ms >= last.t_ms + HISTORY_INTERVAL_MS)
    }

    /// Keeps the charted lines of `exposition` (the Prometheus text) as the sample at `now_ms`.
    pub fn record(&self, now_ms: Millis, exposition: &str) {
        let text: String = exposition
            .lines()
            .filter(|line| {
                CHARTED.iter().any(|name| {
                    line.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
            })
            .flat_map(|line| [line, "\n"])
            .collect();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() >= HISTORY_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(HistorySample { t_ms: now_ms, text });
    }

    /// Every kept sample, oldest first.
    pub fn samples(&self) -> Vec<HistorySample> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.iter().cloned().collect()
    }
}

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

/// A run as `GET /admin/repair/{id}` shows it, with its ETA.
#[derive(Debug, Clone, Serialize)]
pub struct RepairRunView {
    #[serde(flatten)]
    pub run: RepairRunStatus,
    /// Time left at the pace so far; `None` when finished or before the first range ends.
    pub eta_ms: Option<Millis>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairDebt {
    pub node: String,
    pub peer: String,
    pub mismatched_leaves: u64,
    pub estimated_bytes: Option<u64>,
    pub eta_ms: Option<u64>,
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
    /// Why the rate is what it is (the repair controller's reason, or "fixed").
    pub source: String,
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
            run,
        })
        .collect();
    let debt = node
        .repair_debt()
        .into_iter()
        .map(|debt| RepairDebt {
            node: node.id().to_string(),
            peer: debt.peer.to_string(),
            mismatched_leaves: debt.mismatched_leaves,
            estimated_bytes: debt.estimated_bytes,
            eta_ms: debt.eta_ms,
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
                source: node.repair_rate_reason().to_string(),
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

    /// The history keeps only charted lines, at most its bound of samples, oldest first.
    #[test]
    fn history_keeps_charted_lines_within_its_bound() {
        let history = MetricsHistory::default();
        let text = "# HELP x\nmendkv_requests_total{op=\"get\"} 3\nmendkv_requests_other 1\n\
                    mendkv_hints_delivered_total 2\nmendkv_hints_pending 9\n";
        assert!(history.due(0));
        for i in 0..(HISTORY_SAMPLES as u64 + 5) {
            history.record(i * HISTORY_INTERVAL_MS, text);
        }
        assert!(!history.due((HISTORY_SAMPLES as u64 + 4) * HISTORY_INTERVAL_MS + 1));
        let samples = history.samples();
        assert_eq!(samples.len(), HISTORY_SAMPLES);
        assert_eq!(samples[0].t_ms, 5 * HISTORY_INTERVAL_MS);
        assert_eq!(
            samples[0].text,
            "mendkv_requests_total{op=\"get\"} 3\nmendkv_hints_delivered_total 2\n"
        );
    }

    /// The page is whole: its script is inline and it names every endpoint it reads.
    #[test]
    fn page_embeds_its_script_and_fetches_only_this_node() {
        assert!(PAGE.contains("<script>") && PAGE.trim_end().ends_with("</html>"));
        for endpoint in [
            "/cluster/status",
            "/metrics",
            "/admin/dashboard.json",
            "/admin/dashboard/history",
        ] {
            assert!(PAGE.contains(endpoint), "the page reads {endpoint}");
        }
        // The SVG namespace is a name, not an address the browser fetches.
        let page = PAGE.replace("http://www.w3.org/2000/svg", "");
        assert!(!page.contains("http://") && !page.contains("https://"));
    }
}
