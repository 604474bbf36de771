//! The repair controller: what repair may spend now, set from what foreground traffic feels.
//!
//! The seed asks for repair tuned by load ("adjust repair frequency based on system
//! utilization", "repair during low-traffic periods"). Every `adjust_interval_ms` the
//! controller reads the foreground signals the circuit breaker already keeps (client p99
//! over its window, error rate, requests in flight) and moves the repair byte rate shared by
//! anti-entropy and hint replay:
//! - **idle** (fewer requests than the breaker's `min_samples` in its window): the rate
//!   doubles toward the ceiling, so a quiet cluster repairs at full speed;
//! - **threatened** (p99 over its limit, or more than half the breaker's error or in-flight
//!   limits): the rate halves toward the floor, well before the breaker would open (its
//!   thresholds are higher than the target);
//! - **healthy** (p99 well under its limit): the rate grows by `increase_bytes_per_s`;
//! - otherwise it holds.
//!
//! The p99 limit is the lower of `target_p99_ms` (an absolute ceiling) and, once known, the
//! foreground's own p99 *without repair* plus `baseline_headroom_percent`: a cluster whose
//! clients see 5 ms must not be pushed to 99 ms just because that is under 100. The baseline
//! is learned whenever repair has spent nothing for a whole breaker window with enough
//! requests in it (so it follows the load as it changes between repairs); while repair runs
//! without pause the last baseline stands. With it, "healthy" means at or under the baseline
//! and "threatened" more than the headroom above it.
//!
//! That is additive increase, multiplicative decrease, with a fast start when idle. Sans-IO:
//! time and signals come in as arguments; the answer is a rate and its reason.

use super::circuit_breaker::{BreakerConfig, ForegroundSignals};
use crate::Millis;

#[derive(Debug, Clone, PartialEq)]
pub struct ControllerConfig {
    /// Off: the rate stays at the node's fixed `anti_entropy.rate_limit_bytes_per_s`.
    pub enabled: bool,
    /// The client p99 the controller defends: at or above it repair backs off.
    pub target_p99_ms: Millis,
    /// How far above its level without repair the client p99 may go (percent) before repair
    /// backs off; 0 = only `target_p99_ms` counts.
    pub baseline_headroom_percent: u64,
    /// Repair never goes slower than this (so it always progresses).
    pub floor_bytes_per_s: u64,
    /// Nor faster than this (the "unthrottled" end).
    pub ceiling_bytes_per_s: u64,
    /// Step of the additive increase while healthy.
    pub increase_bytes_per_s: u64,
    /// How often the rate is reconsidered.
    pub adjust_interval_ms: Millis,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            enabled: true,
            target_p99_ms: 100,
            baseline_headroom_percent: 20,
            floor_bytes_per_s: 1 << 20,
            ceiling_bytes_per_s: 256 << 20,
            increase_bytes_per_s: 4 << 20,
            adjust_interval_ms: 1000,
        }
    }
}

/// Why the rate is what it is (shown beside it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateReason {
    /// The controller is off: the fixed rate.
    Fixed,
    /// No decision yet.
    Starting,
    /// Foreground traffic is light: raising toward the ceiling.
    Idle,
    /// Foreground p99 is well under its target: raising step by step.
    Healthy { p99_ms: Millis },
    /// Close to the target: holding.
    Holding { p99_ms: Millis },
    /// The p99 target is threatened: backing off. `baseline_ms`: the p99 without repair the
    /// limit was derived from, when it was (else the limit is `target_p99_ms`).
    LatencyHigh {
        p99_ms: Millis,
        target_ms: Millis,
        baseline_ms: Option<Millis>,
    },
    /// Many failed client requests: backing off.
    ErrorsHigh { rate: f64 },
    /// Many requests in flight: backing off.
    InFlightHigh { in_flight: usize },
}

impl RateReason {
    /// A short label (metrics, status).
    pub fn as_str(&self) -> &'static str {
        match self {
            RateReason::Fixed => "fixed",
            RateReason::Starting => "starting",
            RateReason::Idle => "idle",
            RateReason::Healthy { .. } => "healthy",
            RateReason::Holding { .. } => "holding",
            RateReason::LatencyHigh { .. } => "latency_high",
            RateReason::ErrorsHigh { .. } => "errors_high",
            RateReason::InFlightHigh { .. } => "in_flight_high",
        }
    }
}

impl std::fmt::Display for RateReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateReason::Fixed => write!(f, "fixed rate (repair controller off)"),
            RateReason::Starting => write!(f, "starting"),
            RateReason::Idle => write!(f, "foreground idle: raising toward the ceiling"),
            RateReason::Healthy { p99_ms } => write!(f, "client p99 {p99_ms} ms: raising"),
            RateReason::Holding { p99_ms } => {
                write!(f, "client p99 {p99_ms} ms near the target: holding")
            }
            RateReason::LatencyHigh {
                p99_ms,
                target_ms,
                baseline_ms: None,
            } => {
                write!(
                    f,
                    "client p99 {p99_ms} ms >= target {target_ms} ms: backing off"
                )
            }
            RateReason::LatencyHigh {
                p99_ms,
                target_ms,
                baseline_ms: Some(baseline),
            } => {
                write!(
                    f,
                    "client p99 {p99_ms} ms > {target_ms} ms ({baseline} ms without repair \
                     + headroom): backing off"
                )
            }
            RateReason::ErrorsHigh { rate } => {
                write!(f, "client errors {:.1}%: backing off", rate * 100.0)
            }
            RateReason::InFlightHigh { in_flight } => {
                write!(f, "{in_flight} requests in flight: backing off")
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct RepairController {
    config: ControllerConfig,
    breaker: BreakerConfig,
    rate_bytes_per_s: u64,
    reason: RateReason,
    next_adjust_at: Millis,
    /// The client p99 over the last window in which repair spent nothing (or, until this
    /// node has seen such a window, one adopted from its peers).
    baseline_p99_ms: Option<Millis>,
    /// `baseline_p99_ms` was measured here (not adopted).
    baseline_learned: bool,
    /// When repair last spent bytes (none yet: quiet since the start).
    repair_last_busy_at: Option<Millis>,
}

impl RepairController {
    /// Starts at `initial_bytes_per_s` (the fixed knob; 0 = unlimited starts at the
    /// ceiling), within the floor and ceiling. The breaker's thresholds give the error and
    /// in-flight limits the controller backs off at half of.
    pub fn new(
        config: ControllerConfig,
        breaker: BreakerConfig,
        initial_bytes_per_s: u64,
        now: Millis,
    ) -> Self {
        let (rate, reason) = if config.enabled {
            let initial = if initial_bytes_per_s == 0 {
                config.ceiling_bytes_per_s
            } else {
                initial_bytes_per_s
            };
            (
                initial.clamp(config.floor_bytes_per_s, config.ceiling_bytes_per_s.max(1)),
                RateReason::Starting,
            )
        } else {
            (initial_bytes_per_s, RateReason::Fixed)
        };
        RepairController {
            next_adjust_at: now + config.adjust_interval_ms,
            config,
            breaker,
            rate_bytes_per_s: rate,
            reason,
            baseline_p99_ms: None,
            baseline_learned: false,
            repair_last_busy_at: None,
        }
    }

    /// The baseline this node measured itself (what it tells its peers).
    pub fn learned_baseline_p99_ms(&self) -> Option<Millis> {
        self.baseline_p99_ms.filter(|_| self.baseline_learned)
    }

    /// Takes a baseline measured elsewhere (the peers' median) until this node measures its
    /// own: a node that restarts into a repair is busy repairing from its first second and
    /// would otherwise judge by the absolute target only.
    pub fn adopt_baseline(&mut self, p99_ms: Millis) {
        if !self.baseline_learned {
            self.baseline_p99_ms = Some(p99_ms);
        }
    }

    /// The client p99 without repair the limit follows, once learned.
    pub fn baseline_p99_ms(&self) -> Option<Millis> {
        self.baseline_p99_ms
    }

    /// The p99 above which repair backs off, and the baseline it came from (if it did).
    fn latency_limit(&self) -> (Millis, Option<Millis>) {
        let absolute = self.config.target_p99_ms.saturating_sub(1);
        match self.baseline_p99_ms {
            Some(baseline) if self.config.baseline_headroom_percent > 0 => {
                let headroom = (baseline * self.config.baseline_headroom_percent / 100).max(1);
                let limit = baseline + headroom;
                if limit < absolute {
                    (limit, Some(baseline))
                } else {
                    (absolute, None)
                }
            }
            _ => (absolute, None),
        }
    }

    /// The rate in force (0 = unlimited, only when the controller is off).
    pub fn rate_bytes_per_s(&self) -> u64 {
        self.rate_bytes_per_s
    }

    pub fn reason(&self) -> RateReason {
        self.reason
    }

    /// When `adjust` has something to do.
    pub fn next_deadline(&self) -> Millis {
        if self.config.enabled {
            self.next_adjust_at
        } else {
            Millis::MAX
        }
    }

    /// Reconsiders the rate when due; the new rate when it changed. `repair_busy`: whether
    /// repair spent any bytes since the last call (for the baseline without repair).
    #[must_use = "a changed rate must be applied to the repair byte budget"]
    pub fn adjust(
        &mut self,
        now: Millis,
        signals: &ForegroundSignals,
        repair_busy: bool,
    ) -> Option<u64> {
        if repair_busy {
            self.repair_last_busy_at = Some(now);
        }
        if !self.config.enabled || now < self.next_adjust_at {
            return None;
        }
        self.next_adjust_at = now + self.config.adjust_interval_ms;
        let quiet_window = self
            .repair_last_busy_at
            .is_none_or(|at| now.saturating_sub(at) >= self.breaker.window_ms);
        if quiet_window && signals.requests >= self.breaker.min_samples.max(1) {
            if let Some(p99) = signals.p99_ms {
                self.baseline_p99_ms = Some(p99);
                self.baseline_learned = true;
            }
        }
        let (floor, ceiling) = (
            self.config.floor_bytes_per_s,
            self.config
                .ceiling_bytes_per_s
                .max(self.config.floor_bytes_per_s),
        );
        let current = self.rate_bytes_per_s;
        let back_off = (current / 2).max(floor);
        let (rate, reason) = if signals.in_flight * 2 > self.breaker.max_in_flight {
            (
                back_off,
                RateReason::InFlightHigh {
                    in_flight: signals.in_flight,
                },
            )
        } else if signals.requests < self.breaker.min_samples.max(1) {
            (current.saturating_mul(2).min(ceiling), RateReason::Idle)
        } else if signals.error_rate * 2.0 > self.breaker.max_error_rate {
            (
                back_off,
                RateReason::ErrorsHigh {
                    rate: signals.error_rate,
                },
            )
        } else {
            let p99_ms = signals.p99_ms.unwrap_or(0);
            let (limit, baseline) = self.latency_limit();
            let healthy = match baseline {
                Some(baseline) => p99_ms <= baseline,
                None => p99_ms * 5 < self.config.target_p99_ms * 4,
            };
            if p99_ms > limit {
                (
                    back_off,
                    RateReason::LatencyHigh {
                        p99_ms,
                        target_ms: if baseline.is_some() {
                            limit
                        } else {
                            self.config.target_p99_ms
                        },
                        baseline_ms: baseline,
                    },
                )
            } else if healthy {
                (
                    current
                        .saturating_add(self.config.increase_bytes_per_s)
                        .min(ceiling),
                    RateReason::Healthy { p99_ms },
                )
            } else {
                (current, RateReason::Holding { p99_ms })
            }
        };
        self.reason = reason;
        self.rate_bytes_per_s = rate;
        (rate != current).then_some(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller judging by the absolute target only (no baseline).
    fn controller(initial: u64) -> RepairController {
        RepairController::new(
            ControllerConfig {
                baseline_headroom_percent: 0,
                ..ControllerConfig::default()
            },
            BreakerConfig::default(),
            initial,
            0,
        )
    }

    fn busy(p99_ms: Millis) -> ForegroundSignals {
        ForegroundSignals {
            requests: 1_000,
            error_rate: 0.0,
            p99_ms: Some(p99_ms),
            in_flight: 10,
        }
    }

    /// The rate follows the foreground, step by step, and the reason says why: idle doubles,
    /// a threatened target halves, a healthy p99 adds a step, near the target holds; it stays
    /// within floor and ceiling.
    #[test]
    fn aimd_table() {
        let config = ControllerConfig::default();
        let mib = 1 << 20;
        let idle = ForegroundSignals {
            requests: 3,
            ..busy(0)
        };
        let errors = ForegroundSignals {
            error_rate: 0.04,
            ..busy(5)
        };
        let crowded = ForegroundSignals {
            in_flight: 3000,
            ..busy(5)
        };
        // (signals, rate after, reason label)
        let steps: Vec<(ForegroundSignals, u64, &str)> = vec![
            (idle.clone(), 64 * mib, "idle"),
            (idle.clone(), 128 * mib, "idle"),
            (busy(150), 64 * mib, "latency_high"),
            (busy(100), 32 * mib, "latency_high"),
            (busy(90), 32 * mib, "holding"),
            (busy(20), 36 * mib, "healthy"),
            (errors, 18 * mib, "errors_high"),
            (crowded, 9 * mib, "in_flight_high"),
            (idle.clone(), 18 * mib, "idle"),
        ];
        let mut c = controller(32 * mib);
        let mut now = 0;
        for (i, (signals, rate, reason)) in steps.into_iter().enumerate() {
            now += config.adjust_interval_ms;
            let _ = c.adjust(now, &signals, false);
            assert_eq!(
                (c.rate_bytes_per_s(), c.reason().as_str()),
                (rate, reason),
                "step {i}"
            );
        }
        // Backing off forever stops at the floor; idling forever at the ceiling.
        for _ in 0..40 {
            now += config.adjust_interval_ms;
            let _ = c.adjust(now, &busy(500), false);
        }
        assert_eq!(c.rate_bytes_per_s(), config.floor_bytes_per_s);
        for _ in 0..40 {
            now += config.adjust_interval_ms;
            let _ = c.adjust(now, &idle, false);
        }
        assert_eq!(c.rate_bytes_per_s(), config.ceiling_bytes_per_s);
    }

    /// A controller with the default configuration (the limit follows the baseline).
    fn default_controller(initial: u64) -> RepairController {
        RepairController::new(
            ControllerConfig::default(),
            BreakerConfig::default(),
            initial,
            0,
        )
    }

    /// A node that has not measured a baseline takes its peers' until it measures its own,
    /// which then replaces it (and is the only one it reports as learned).
    #[test]
    fn an_adopted_baseline_holds_until_one_is_measured() {
        let mib = 1 << 20;
        let window = BreakerConfig::default().window_ms;
        let mut c = default_controller(32 * mib);
        // Busy repairing from the start: nothing measured, 30 ms is fine by the absolute
        // target alone.
        let _ = c.adjust(1_000, &busy(30), true);
        assert_eq!(
            (c.baseline_p99_ms(), c.reason().as_str()),
            (None, "healthy")
        );
        c.adopt_baseline(20);
        let _ = c.adjust(2_000, &busy(30), true);
        assert_eq!(c.reason().as_str(), "latency_high", "30 ms > 20 ms + 20%");
        assert_eq!(c.learned_baseline_p99_ms(), None);
        // A quiet window: its own measure replaces the adopted one, and stays.
        let _ = c.adjust(2_000 + window, &busy(8), false);
        assert_eq!(c.learned_baseline_p99_ms(), Some(8));
        c.adopt_baseline(50);
        assert_eq!(c.baseline_p99_ms(), Some(8));
    }

    /// With a baseline: the p99 learned while repair was quiet for a whole breaker window
    /// sets the limit (baseline + 20%, under the absolute target); while repair runs the
    /// baseline stands, and it is learned again after a quiet window.
    #[test]
    fn the_limit_follows_the_p99_without_repair() {
        let mib = 1 << 20;
        let window = BreakerConfig::default().window_ms;
        let mut c = default_controller(32 * mib);
        /// (time, client p99, repair spent bytes, rate after, reason, baseline after)
        type Step = (Millis, Millis, bool, u64, &'static str, Option<Millis>);
        let steps: Vec<Step> = vec![
            (1_000, 10, false, 36 * mib, "healthy", Some(10)),
            (2_000, 12, true, 36 * mib, "holding", Some(10)),
            (3_000, 15, true, 18 * mib, "latency_high", Some(10)),
            (4_000, 10, true, 22 * mib, "healthy", Some(10)),
            // Repair keeps running: a higher p99 is not taken as the new normal.
            (5_000, 20, true, 11 * mib, "latency_high", Some(10)),
            // A whole window without repair: the load's own p99 is the baseline now.
            (5_000 + window, 20, false, 15 * mib, "healthy", Some(20)),
            (6_000 + window, 24, true, 15 * mib, "holding", Some(20)),
            (
                7_000 + window,
                25,
                true,
                7 * mib + mib / 2,
                "latency_high",
                Some(20),
            ),
            // Near the absolute target the target rules: 90 + 20% is over 100.
            (
                8_000 + 2 * window,
                90,
                false,
                7 * mib + mib / 2,
                "holding",
                Some(90),
            ),
            (
                9_000 + 2 * window,
                100,
                true,
                3 * mib + 3 * mib / 4,
                "latency_high",
                Some(90),
            ),
        ];
        for (i, (now, p99, repair_busy, rate, reason, baseline)) in steps.into_iter().enumerate() {
            let _ = c.adjust(now, &busy(p99), repair_busy);
            assert_eq!(
                (
                    c.rate_bytes_per_s(),
                    c.reason().as_str(),
                    c.baseline_p99_ms()
                ),
                (rate, reason, baseline),
                "step {i}"
            );
        }
        assert_eq!(
            c.reason(),
            RateReason::LatencyHigh {
                p99_ms: 100,
                target_ms: 100,
                baseline_ms: None
            },
            "the absolute target, not the baseline, set this limit"
        );
    }

    /// Decisions come once per interval, and a disabled controller keeps the fixed rate.
    #[test]
    fn adjusts_once_per_interval_and_only_when_enabled() {
        let mut c = controller(8 << 20);
        assert_eq!(c.adjust(10, &busy(500), false), None, "not due yet");
        assert_eq!(c.adjust(1000, &busy(500), false), Some(4 << 20));
        assert_eq!(c.adjust(1500, &busy(500), false), None);
        let mut off = RepairController::new(
            ControllerConfig {
                enabled: false,
                ..ControllerConfig::default()
            },
            BreakerConfig::default(),
            8 << 20,
            0,
        );
        assert_eq!(off.adjust(10_000, &busy(500), false), None);
        assert_eq!(off.rate_bytes_per_s(), 8 << 20);
        assert_eq!(off.reason(), RateReason::Fixed);
        assert_eq!(off.next_deadline(), Millis::MAX);
    }
}
