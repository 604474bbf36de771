//! The phi accrual failure detector (Hayashibara et al., 2004), as Akka and Cassandra run it.
//!
//! For each peer we keep the last `window` inter-arrival times of its heartbeats (a heartbeat
//! "arrives" when gossip, from whichever peer, brings a newer heartbeat version). Given the
//! time since the last arrival, phi is `-log10(P(the next heartbeat is still to come))`
//! under a normal distribution fitted to the window; phi 8 means a one-in-10^8 chance that
//! the peer is merely late. As Akka does, the mean is lengthened by an *acceptable pause*
//! and the deviation floored at a *minimum*, so a window of very regular samples does not
//! turn one late heartbeat into a conviction; the normal's tail is the logistic
//! approximation Akka uses.
//!
//! phi grows with time alone, so instead of polling it we solve once for the time at which
//! it crosses a threshold: [`ArrivalWindow::deadline`].

use crate::Millis;
use std::collections::VecDeque;

/// Heartbeat inter-arrival times of one peer.
#[derive(Debug, Clone)]
pub struct ArrivalWindow {
    /// Inter-arrival times in ms (u32: a gap of 49 days is as good as infinite, and a
    /// thousand-node simulation keeps a million of these windows).
    samples: VecDeque<u32>,
    capacity: usize,
    sum: u128,
    sum_of_squares: u128,
    last_arrival: Millis,
}

/// The distribution parameters the detector works with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// Mean inter-arrival plus the acceptable pause, in ms.
    pub mean_ms: f64,
    /// Standard deviation, at least the configured minimum, in ms.
    pub std_deviation_ms: f64,
}

impl ArrivalWindow {
    /// A window whose first heartbeat arrived at `now`. It starts with two samples around
    /// `expected_interval_ms` (Akka's "first heartbeat estimate") so phi is meaningful at once.
    pub fn new(now: Millis, capacity: usize, expected_interval_ms: Millis) -> Self {
        let mut window = ArrivalWindow {
            samples: VecDeque::with_capacity(capacity.min(16)),
            capacity: capacity.max(2),
            sum: 0,
            sum_of_squares: 0,
            last_arrival: now,
        };
        let spread = expected_interval_ms / 4;
        window.push(expected_interval_ms - spread);
        window.push(expected_interval_ms + spread);
        window
    }

    pub fn last_arrival(&self) -> Millis {
        self.last_arrival
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// A heartbeat arrived: records the interval since the previous one.
    pub fn record(&mut self, now: Millis) {
        let interval = now.saturating_sub(self.last_arrival);
        self.last_arrival = self.last_arrival.max(now);
        self.push(interval);
    }

    /// A heartbeat arrived after a gap that must not count (the peer was down, or restarted).
    pub fn restart_at(&mut self, now: Millis) {
        self.last_arrival = self.last_arrival.max(now);
    }

    fn push(&mut self, interval: Millis) {
        let interval = u32::try_from(interval).unwrap_or(u32::MAX);
        if self.samples.len() == self.capacity {
            if let Some(old) = self.samples.pop_front() {
                self.sum -= u128::from(old);
                self.sum_of_squares -= u128::from(old) * u128::from(old);
            }
        }
        self.samples.push_back(interval);
        self.sum += u128::from(interval);
        self.sum_of_squares += u128::from(interval) * u128::from(interval);
    }

    /// The normal distribution the detector fits to the window.
    pub fn fit(&self, acceptable_pause_ms: Millis, min_std_deviation_ms: Millis) -> Fit {
        let n = self.samples.len().max(1) as f64;
        let mean = self.sum as f64 / n;
        let variance = (self.sum_of_squares as f64 / n - mean * mean).max(0.0);
        Fit {
            mean_ms: mean + acceptable_pause_ms as f64,
            std_deviation_ms: variance.sqrt().max(min_std_deviation_ms.max(1) as f64),
        }
    }

    /// phi at `now`.
    pub fn phi(&self, now: Millis, fit: Fit) -> f64 {
        let elapsed = now.saturating_sub(self.last_arrival) as f64;
        phi(elapsed, fit)
    }

    /// The first time at which phi reaches the threshold whose [`threshold_deviations`] is
    /// `deviations`.
    pub fn deadline(&self, fit: Fit, deviations: f64) -> Millis {
        let elapsed = fit.mean_ms + deviations * fit.std_deviation_ms;
        self.last_arrival
            .saturating_add(elapsed.max(0.0).ceil().min(u64::MAX as f64 / 2.0) as Millis)
    }
}

/// phi after `elapsed_ms` without a heartbeat.
pub fn phi(elapsed_ms: f64, fit: Fit) -> f64 {
    phi_of_deviations((elapsed_ms - fit.mean_ms) / fit.std_deviation_ms)
}

/// phi at `y` standard deviations past the mean (logistic approximation of the normal tail).
fn phi_of_deviations(y: f64) -> f64 {
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    if y > 0.0 {
        -(e / (1.0 + e)).log10()
    } else {
        -(1.0 - 1.0 / (1.0 + e)).log10()
    }
}

/// How many standard deviations past the mean phi reaches `threshold` (solved once, by
/// bisection: phi is increasing in the deviations).
pub fn threshold_deviations(threshold: f64) -> f64 {
    let (mut low, mut high) = (-40.0_f64, 100.0_f64);
    for _ in 0..200 {
        let middle = (low + high) / 2.0;
        if phi_of_deviations(middle) < threshold {
            low = middle;
        } else {
            high = middle;
        }
    }
    high
}

#[cfg(test)]
mod tests {
    use super::*;

    // The solved deadline is where phi crosses the threshold.
    #[test]
    fn deadline_is_where_phi_crosses_the_threshold() {
        let mut window = ArrivalWindow::new(0, 1000, 500);
        for t in (500..=50_000).step_by(500) {
            window.record(t + (t / 500 % 7) * 20);
        }
        let fit = window.fit(300, 50);
        for threshold in [1.0, 5.0, 8.0, 12.0] {
            let deadline = window.deadline(fit, threshold_deviations(threshold));
            assert!(window.phi(deadline, fit) >= threshold - 1e-6);
            assert!(window.phi(deadline - 1, fit) < threshold);
        }
    }

    // phi rises with silence and drops back when a heartbeat arrives.
    #[test]
    fn phi_grows_with_silence() {
        let mut window = ArrivalWindow::new(0, 1000, 1000);
        for t in 1..=20 {
            window.record(t * 1000);
        }
        let fit = window.fit(0, 100);
        let at = |ms: Millis| window.phi(20_000 + ms, fit);
        assert!(at(0) < 0.1);
        assert!(at(1000) < at(1500) && at(1500) < at(2000));
        assert!(at(3000) > 8.0, "phi {}", at(3000));
    }

    // The window keeps at most `capacity` samples and its running sums stay exact.
    #[test]
    fn window_is_bounded() {
        let mut window = ArrivalWindow::new(0, 10, 100);
        for t in 1..=100 {
            window.record(t * 100);
        }
        assert_eq!(window.len(), 10);
        let fit = window.fit(0, 1);
        assert!((fit.mean_ms - 100.0).abs() < 1e-9);
        assert!((fit.std_deviation_ms - 1.0).abs() < 1e-9);
    }

    // The thresholds the config sweeps map to sensible deviations.
    #[test]
    fn thresholds_to_deviations() {
        let five = threshold_deviations(5.0);
        let eight = threshold_deviations(8.0);
        let twelve = threshold_deviations(12.0);
        assert!(five < eight && eight < twelve);
        assert!((3.5..5.0).contains(&five), "{five}");
        assert!((4.5..6.5).contains(&eight), "{eight}");
    }
}
