//! A circuit breaker that pauses repair work while the node is under stress.
//!
//! Stress signals, over a sliding window of `window_ms`: the p99 latency of requests, the
//! error rate of requests, and the number of requests in flight (a gauge). When any crosses
//! its threshold the breaker *opens*: no new repair exchange starts. After `cooldown_ms` it is
//! *half-open*: exactly one exchange may start (the probe). When the probe ends well and the
//! signals are below their thresholds it *closes*; otherwise it opens for another cooldown.
//!
//! Latency and error rate are only judged over at least `min_samples` requests, so a quiet
//! node never trips on one slow request. Latencies are kept in a fixed histogram per slot of
//! the window (memory is fixed), so p99 is known to bucket resolution (about 25%).

use crate::Millis;

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// The span the latency and error signals are measured over.
    pub window_ms: Millis,
    /// Opens when the window's p99 request latency exceeds this.
    pub max_p99_latency_ms: Millis,
    /// Opens when more requests than this are in flight.
    pub max_in_flight: usize,
    /// Opens when the share of failed requests exceeds this (0.0..=1.0).
    pub max_error_rate: f64,
    /// Latency and error rate are judged over at least this many requests.
    pub min_samples: u64,
    /// How long the breaker stays open before letting one probe through.
    pub cooldown_ms: Millis,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window_ms: 10_000,
            max_p99_latency_ms: 500,
            max_in_flight: 4096,
            max_error_rate: 0.05,
            min_samples: 50,
            cooldown_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open {
        until: Millis,
    },
    /// `probing`: the one exchange let through has not finished yet.
    HalfOpen {
        probing: bool,
    },
}

/// Which signal crossed its threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StressSignal {
    P99Latency {
        p99_ms: Millis,
        threshold_ms: Millis,
    },
    InFlight {
        in_flight: usize,
        threshold: usize,
    },
    ErrorRate {
        rate: f64,
        threshold: f64,
    },
}

/// What foreground traffic looks like over the breaker's window (the repair controller's
/// input).
#[derive(Debug, Clone, PartialEq)]
pub struct ForegroundSignals {
    pub requests: u64,
    /// Failed share of `requests` (0 when there were none).
    pub error_rate: f64,
    /// p99 latency (bucket upper bound), when there was any request.
    pub p99_ms: Option<Millis>,
    pub in_flight: usize,
}

/// Upper bounds (ms) of the latency buckets; the last bucket is unbounded.
const BUCKET_BOUNDS_MS: [Millis; 40] = [
    1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300, 400,
    500, 600, 800, 1_000, 1_200, 1_500, 2_000, 2_500, 3_000, 4_000, 5_000, 6_000, 8_000, 10_000,
    15_000, 20_000,
];
const BUCKETS: usize = BUCKET_BOUNDS_MS.len() + 1;
const SLOTS: u64 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    epoch: u64,
    requests: u64,
    errors: u64,
    latency: [u32; BUCKETS],
}

impl Slot {
    fn empty(epoch: u64) -> Self {
        Slot {
            epoch,
            requests: 0,
            errors: 0,
            latency: [0; BUCKETS],
        }
    }
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: BreakerState,
    slots: Vec<Slot>,
    in_flight: usize,
    trips: u64,
    last_trip: Option<StressSignal>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            config,
            state: BreakerState::Closed,
            slots: (0..SLOTS).map(|_| Slot::empty(u64::MAX)).collect(),
            in_flight: 0,
            trips: 0,
            last_trip: None,
        }
    }

    fn slot_ms(&self) -> Millis {
        (self.config.window_ms / SLOTS).max(1)
    }

    /// The outcome of one request (client or replica), a stress sample.
    pub fn record(&mut self, now: Millis, latency_ms: Millis, ok: bool) {
        let epoch = now / self.slot_ms();
        let slot = &mut self.slots[(epoch % SLOTS) as usize];
        if slot.epoch != epoch {
            *slot = Slot::empty(epoch);
        }
        slot.requests += 1;
        slot.errors += u64::from(!ok);
        let bucket = BUCKET_BOUNDS_MS.partition_point(|&bound| bound < latency_ms);
        slot.latency[bucket] = slot.latency[bucket].saturating_add(1);
        self.evaluate(now);
    }

    /// Requests in flight now (a gauge the node updates).
    pub fn set_in_flight(&mut self, now: Millis, in_flight: usize) {
        self.in_flight = in_flight;
        self.evaluate(now);
    }

    /// May a repair exchange start now? In half-open state exactly one is let through; report
    /// its end with [`CircuitBreaker::probe_finished`].
    pub fn allow(&mut self, now: Millis) -> bool {
        self.evaluate(now);
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: true } => false,
            BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                true
            }
        }
    }

    /// The exchange let through in half-open state ended (`ok`: it completed).
    pub fn probe_finished(&mut self, now: Millis, ok: bool) {
        if self.state != (BreakerState::HalfOpen { probing: true }) {
            return;
        }
        match self.stress(now) {
            None if ok => self.state = BreakerState::Closed,
            signal => self.trip(now, signal),
        }
    }

    pub fn state(&mut self, now: Millis) -> BreakerState {
        self.evaluate(now);
        self.state
    }

    /// For the `mendkv_circuit_breaker_open` gauge: true unless closed.
    pub fn is_open(&mut self, now: Millis) -> bool {
        self.state(now) != BreakerState::Closed
    }

    /// How many times the breaker opened.
    pub fn trips(&self) -> u64 {
        self.trips
    }

    /// The signal that last opened the breaker (`None` for a failed probe alone).
    pub fn last_trip(&self) -> Option<StressSignal> {
        self.last_trip
    }

    fn trip(&mut self, now: Millis, signal: Option<StressSignal>) {
        self.state = BreakerState::Open {
            until: now.saturating_add(self.config.cooldown_ms),
        };
        self.trips += 1;
        self.last_trip = signal;
    }

    fn evaluate(&mut self, now: Millis) {
        match self.state {
            BreakerState::Closed => {
                if let Some(signal) = self.stress(now) {
                    self.trip(now, Some(signal));
                }
            }
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { probing: false };
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => {}
        }
    }

    /// The first signal over its threshold, if any.
    pub fn stress(&self, now: Millis) -> Option<StressSignal> {
        if self.in_flight > self.config.max_in_flight {
            return Some(StressSignal::InFlight {
                in_flight: self.in_flight,
                threshold: self.config.max_in_flight,
            });
        }
        let signals = self.signals(now);
        if signals.requests == 0 || signals.requests < self.config.min_samples {
            return None;
        }
        if signals.error_rate > self.config.max_error_rate {
            return Some(StressSignal::ErrorRate {
                rate: signals.error_rate,
                threshold: self.config.max_error_rate,
            });
        }
        let p99_ms = signals.p99_ms.unwrap_or(0);
        if p99_ms > self.config.max_p99_latency_ms {
            return Some(StressSignal::P99Latency {
                p99_ms,
                threshold_ms: self.config.max_p99_latency_ms,
            });
        }
        None
    }

    /// The window's foreground signals, whatever the thresholds.
    pub fn signals(&self, now: Millis) -> ForegroundSignals {
        let (requests, errors, latency) = self.window(now);
        ForegroundSignals {
            requests,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p99_ms: (requests > 0).then(|| percentile(&latency, requests, 0.99)),
            in_flight: self.in_flight,
        }
    }

    /// The window's p99 latency (bucket upper bound), if there was any request.
    pub fn p99_latency_ms(&self, now: Millis) -> Option<Millis> {
        self.signals(now).p99_ms
    }

    fn window(&self, now: Millis) -> (u64, u64, [u64; BUCKETS]) {
        let current = now / self.slot_ms();
        let oldest = current.saturating_sub(SLOTS - 1);
        let mut latency = [0u64; BUCKETS];
        let (mut requests, mut errors) = (0, 0);
        for slot in self
            .slots
            .iter()
            .filter(|s| s.epoch >= oldest && s.epoch <= current)
        {
            requests += slot.requests;
            errors += slot.errors;
            for (sum, &n) in latency.iter_mut().zip(&slot.latency) {
                *sum += u64::from(n);
            }
        }
        (requests, errors, latency)
    }
}

/// The upper bound of the bucket holding the `q` quantile (the last bucket reports the
/// largest bound plus one).
fn percentile(latency: &[u64; BUCKETS], total: u64, q: f64) -> Millis {
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return BUCKET_BOUNDS_MS
                .get(i)
                .copied()
                .unwrap_or(BUCKET_BOUNDS_MS[BUCKETS - 2] + 1);
        }
    }
    BUCKET_BOUNDS_MS[BUCKETS - 2] + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            window_ms: 1000,
            max_p99_latency_ms: 100,
            max_in_flight: 10,
            max_error_rate: 0.1,
            min_samples: 10,
            cooldown_ms: 500,
        }
    }

    #[derive(Debug)]
    enum Op {
        /// `n` requests at `now` with this latency and success.
        Requests {
            n: u64,
            latency_ms: Millis,
            ok: bool,
        },
        InFlight(usize),
        /// allow() must return this.
        Allow(bool),
        ProbeDone(bool),
        Expect(BreakerState),
    }

    /// Table: how each stress signal opens the breaker, and the way back to closed.
    #[test]
    fn breaker_table() {
        use BreakerState::*;
        use Op::*;
        let fast = |n| Requests {
            n,
            latency_ms: 5,
            ok: true,
        };
        let slow = |n| Requests {
            n,
            latency_ms: 300,
            ok: true,
        };
        let failing = |n| Requests {
            n,
            latency_ms: 5,
            ok: false,
        };
        let cases: Vec<(&str, Vec<(Millis, Op)>)> = vec![
            (
                "healthy traffic keeps it closed",
                vec![(0, fast(100)), (10, Allow(true)), (10, Expect(Closed))],
            ),
            (
                "p99 over the threshold opens it; too few samples do not",
                vec![
                    (0, slow(9)),
                    (0, Expect(Closed)),
                    (1500, fast(99)),
                    (1500, slow(1)),
                    (1501, Expect(Closed)),
                    (1502, slow(1)),
                    (1502, Expect(Open { until: 2002 })),
                    (1503, Allow(false)),
                ],
            ),
            (
                "error rate over the threshold opens it",
                vec![
                    (0, fast(80)),
                    (0, failing(8)),
                    (0, Expect(Closed)),
                    (1, failing(2)),
                    (1, Expect(Open { until: 501 })),
                ],
            ),
            (
                "in-flight over the threshold opens it at once",
                vec![
                    (0, InFlight(10)),
                    (0, Expect(Closed)),
                    (7, InFlight(11)),
                    (7, Expect(Open { until: 507 })),
                ],
            ),
            (
                "after the cooldown one probe goes through; success and calm close it",
                vec![
                    (0, InFlight(50)),
                    (0, InFlight(0)),
                    (499, Allow(false)),
                    (500, Expect(HalfOpen { probing: false })),
                    (500, Allow(true)),
                    (500, Allow(false)),
                    (600, ProbeDone(true)),
                    (600, Expect(Closed)),
                    (600, Allow(true)),
                ],
            ),
            (
                "a failed probe reopens it",
                vec![
                    (0, InFlight(50)),
                    (0, InFlight(0)),
                    (500, Allow(true)),
                    (550, ProbeDone(false)),
                    (550, Expect(Open { until: 1050 })),
                ],
            ),
            (
                "a good probe while signals are still bad reopens it",
                vec![
                    (0, slow(20)),
                    (500, Allow(true)),
                    (600, ProbeDone(true)),
                    (600, Expect(Open { until: 1100 })),
                ],
            ),
            (
                "old samples leave the window, so the signals recover",
                vec![
                    (0, slow(20)),
                    (0, Expect(Open { until: 500 })),
                    (1500, Allow(true)),
                    (1500, ProbeDone(true)),
                    (1500, Expect(Closed)),
                ],
            ),
        ];
        for (name, ops) in cases {
            let mut breaker = CircuitBreaker::new(config());
            for (i, (now, op)) in ops.into_iter().enumerate() {
                match op {
                    Requests { n, latency_ms, ok } => {
                        (0..n).for_each(|_| breaker.record(now, latency_ms, ok))
                    }
                    InFlight(n) => breaker.set_in_flight(now, n),
                    Allow(want) => assert_eq!(breaker.allow(now), want, "{name}: step {i}"),
                    ProbeDone(ok) => breaker.probe_finished(now, ok),
                    Expect(want) => assert_eq!(breaker.state(now), want, "{name}: step {i}"),
                }
            }
        }
    }

    /// p99 is reported at bucket resolution, from the window's samples only.
    #[test]
    fn p99_from_the_window() {
        let mut breaker = CircuitBreaker::new(BreakerConfig {
            min_samples: 1_000_000,
            ..config()
        });
        assert_eq!(breaker.p99_latency_ms(0), None);
        for i in 0..100 {
            breaker.record(0, if i < 98 { 3 } else { 45 }, true);
        }
        assert_eq!(breaker.p99_latency_ms(0), Some(50));
        breaker.record(0, 1_000_000, true);
        assert_eq!(breaker.p99_latency_ms(0), Some(50));
        assert_eq!(breaker.p99_latency_ms(5000), None);
    }
}
