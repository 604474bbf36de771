//! A node's skewed clock (the `skew` fault): an offset and a drift over the one virtual
//! clock, monotonic, and the inverse a timer needs (when does the node's clock reach its
//! deadline?).

use mendkv_core::Millis;

/// A node's skewed clock: `local = t + offset + t * drift_ppm / 1e6`, monotonic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    pub offset_ms: Millis,
    /// Drift in parts per million, within (-1e6, 1e6).
    pub drift_ppm: i64,
}

impl Clock {
    pub fn local(&self, t: Millis) -> Millis {
        let t = i128::from(t);
        let local = t + i128::from(self.offset_ms) + t * i128::from(self.drift_ppm) / 1_000_000;
        local.max(0) as Millis
    }

    /// The first virtual time at or after `now` when the local clock reads `deadline`.
    pub fn virtual_at(&self, now: Millis, deadline: Millis) -> Millis {
        let here = self.local(now);
        if deadline <= here {
            return now;
        }
        let rate = 1_000_000 + i128::from(self.drift_ppm);
        let gap = i128::from(deadline - here);
        let mut t = now.saturating_add(((gap * 1_000_000 + rate - 1) / rate) as Millis);
        while self.local(t) < deadline {
            t += 1;
        }
        while t > now && self.local(t - 1) >= deadline {
            t -= 1;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    // A skewed clock is monotonic, and a timer set on it fires at the first virtual
    // millisecond at which the node's clock has reached the deadline.
    #[test]
    fn skewed_timers_fire_on_time() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..2_000 {
            let clock = Clock {
                offset_ms: rng.gen_range(0..=10_000),
                drift_ppm: rng.gen_range(-50_000..=50_000),
            };
            let now = rng.gen_range(0..1_000_000);
            assert!(clock.local(now + 1) >= clock.local(now));
            let deadline = clock.local(now) + rng.gen_range(0..5_000);
            let at = clock.virtual_at(now, deadline);
            assert!(at >= now && clock.local(at) >= deadline);
            assert!(at == now || clock.local(at - 1) < deadline);
        }
    }
}
