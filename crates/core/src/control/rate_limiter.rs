//! A token bucket on the injected clock: `rate_bytes_per_s` on average, bursts up to
//! `burst_bytes`. Integer arithmetic (tokens kept in thousandths of a byte), so the same
//! inputs always give the same answers.
//!
//! Repair traffic is charged after the fact with [`TokenBucket::consume`] (a message's size
//! is known once it is built), which may leave the bucket in debt; the caller waits for
//! [`TokenBucket::ready_at`] before sending more. [`TokenBucket::try_acquire`] is the
//! ask-first form.

use crate::Millis;

/// Thousandths of a byte per byte.
const SCALE: i128 = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    /// 0 means unlimited.
    rate_bytes_per_s: u64,
    burst_bytes: u64,
    /// In thousandths of a byte; negative while in debt.
    level: i128,
    updated_at: Millis,
    /// Bytes taken or charged so far (wrapping): whether anything was spent between two
    /// looks, whatever the rate.
    taken_bytes: u64,
}

impl TokenBucket {
    /// A full bucket. `rate_bytes_per_s == 0` turns limiting off; a burst below one byte is
    /// one byte (a bucket that can never hold a byte would never let anything through).
    pub fn new(rate_bytes_per_s: u64, burst_bytes: u64, now: Millis) -> Self {
        let burst_bytes = burst_bytes.max(1);
        TokenBucket {
            rate_bytes_per_s,
            burst_bytes,
            level: i128::from(burst_bytes) * SCALE,
            updated_at: now,
            taken_bytes: 0,
        }
    }

    /// Changes the rate from now on (tokens earned so far at the old rate are kept); the
    /// burst follows as `burst_bytes`.
    pub fn set_rate(&mut self, now: Millis, rate_bytes_per_s: u64, burst_bytes: u64) {
        self.refill(now);
        self.rate_bytes_per_s = rate_bytes_per_s;
        self.burst_bytes = burst_bytes.max(1);
        self.level = self.level.min(self.capacity());
    }

    pub fn is_unlimited(&self) -> bool {
        self.rate_bytes_per_s == 0
    }

    pub fn rate_bytes_per_s(&self) -> u64 {
        self.rate_bytes_per_s
    }

    pub fn burst_bytes(&self) -> u64 {
        self.burst_bytes
    }

    /// Bytes taken or charged so far, counted whether or not the bucket limits (wrapping).
    pub fn taken_bytes(&self) -> u64 {
        self.taken_bytes
    }

    fn capacity(&self) -> i128 {
        i128::from(self.burst_bytes) * SCALE
    }

    /// Refills for the time since the last call (a clock that goes back refills nothing).
    fn refill(&mut self, now: Millis) {
        if now <= self.updated_at {
            return;
        }
        // rate bytes/s = rate thousandths of a byte per ms.
        let earned = i128::from(now - self.updated_at) * i128::from(self.rate_bytes_per_s);
        self.level = (self.level + earned).min(self.capacity());
        self.updated_at = now;
    }

    /// Whole bytes available now (0 while in debt).
    pub fn available(&mut self, now: Millis) -> u64 {
        if self.is_unlimited() {
            return u64::MAX;
        }
        self.refill(now);
        (self.level.max(0) / SCALE) as u64
    }

    /// Takes `bytes` if available. A request bigger than the burst is granted when the
    /// bucket is full (it would never fit otherwise) and leaves it in debt.
    pub fn try_acquire(&mut self, now: Millis, bytes: u64) -> bool {
        if self.is_unlimited() {
            self.taken_bytes = self.taken_bytes.wrapping_add(bytes);
            return true;
        }
        self.refill(now);
        let wanted = (i128::from(bytes) * SCALE).min(self.capacity());
        if self.level >= wanted && self.level > 0 || bytes == 0 {
            self.level -= i128::from(bytes) * SCALE;
            self.taken_bytes = self.taken_bytes.wrapping_add(bytes);
            true
        } else {
            false
        }
    }

    /// Charges `bytes` already sent; the bucket may go into debt.
    pub fn consume(&mut self, now: Millis, bytes: u64) {
        self.taken_bytes = self.taken_bytes.wrapping_add(bytes);
        if self.is_unlimited() {
            return;
        }
        self.refill(now);
        self.level -= i128::from(bytes) * SCALE;
    }

    /// The earliest time `try_acquire(bytes)` succeeds (`now` if it would now).
    pub fn ready_at(&mut self, now: Millis, bytes: u64) -> Millis {
        if self.is_unlimited() || bytes == 0 {
            return now;
        }
        self.refill(now);
        // At least one thousandth of a byte, so a full bucket of burst 0 still waits.
        let wanted = (i128::from(bytes) * SCALE).min(self.capacity()).max(1);
        let missing = wanted - self.level;
        if missing <= 0 {
            return now;
        }
        let rate = i128::from(self.rate_bytes_per_s);
        let wait = (missing + rate - 1) / rate;
        now.saturating_add(u64::try_from(wait).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum Op {
        /// try_acquire(bytes) at time, expected result
        Try(Millis, u64, bool),
        Consume(Millis, u64),
        /// available(time) == bytes
        Available(Millis, u64),
        /// ready_at(time, bytes) == when
        ReadyAt(Millis, u64, Millis),
    }

    /// Table: refill, burst cap, debt and waiting, on a virtual clock.
    #[test]
    fn token_bucket_table() {
        use Op::*;
        // 1000 bytes/s = 1 byte per ms; burst 500.
        let cases: Vec<(&str, u64, u64, Vec<Op>)> = vec![
            (
                "starts full, drains, refills at the rate",
                1000,
                500,
                vec![
                    Try(0, 300, true),
                    Try(0, 300, false),
                    Available(0, 200),
                    Available(100, 300),
                    Try(100, 300, true),
                    Available(100, 0),
                ],
            ),
            (
                "refill stops at the burst",
                1000,
                500,
                vec![
                    Available(10_000, 500),
                    Try(10_000, 501, true),
                    Available(10_000, 0),
                ],
            ),
            (
                "consume goes into debt; ready_at says when it is paid off",
                1000,
                500,
                vec![
                    Consume(0, 1500),
                    Available(0, 0),
                    ReadyAt(0, 1, 1001),
                    Try(1000, 1, false),
                    Try(1001, 1, true),
                ],
            ),
            (
                "bigger than the burst: granted only from a full bucket",
                1000,
                100,
                vec![
                    Try(0, 50, true),
                    Try(0, 1000, false),
                    ReadyAt(0, 1000, 50),
                    Try(50, 1000, true),
                    ReadyAt(50, 10, 960),
                ],
            ),
            (
                "fractional rates accumulate exactly",
                3,
                10,
                vec![
                    Consume(0, 10),
                    Available(333, 0),
                    Available(334, 1),
                    ReadyAt(334, 2, 667),
                ],
            ),
            (
                "rate 0 is unlimited",
                0,
                0,
                vec![
                    Try(0, u64::MAX / 4, true),
                    ReadyAt(0, 1 << 40, 0),
                    Available(0, u64::MAX),
                ],
            ),
            (
                "time going back refills nothing",
                1000,
                500,
                vec![Consume(100, 500), Available(50, 0), Available(150, 50)],
            ),
        ];
        for (name, rate, burst, ops) in cases {
            let mut bucket = TokenBucket::new(rate, burst, 0);
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Try(now, bytes, want) => {
                        assert_eq!(bucket.try_acquire(now, bytes), want, "{name}: step {i}")
                    }
                    Consume(now, bytes) => bucket.consume(now, bytes),
                    Available(now, want) => {
                        assert_eq!(bucket.available(now), want, "{name}: step {i}")
                    }
                    ReadyAt(now, bytes, want) => {
                        assert_eq!(bucket.ready_at(now, bytes), want, "{name}: step {i}")
                    }
                }
            }
        }
    }
}
