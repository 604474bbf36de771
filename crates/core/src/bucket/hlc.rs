//! A hybrid logical clock (Kulkarni et al., 2014): timestamps that follow the wall clock
//! when it moves forward and never go backwards when it does not.
//!
//! A timestamp is `(physical_ms, logical)`, packed into one `u64` as
//! `physical_ms << 16 | logical`, so the packed numbers order exactly as the pairs do and fit
//! a version vector's counter (below [`crate::version::MAX_COUNTER`]). The clock is an input:
//! `now_ms` comes in as an argument (the server passes wall-clock milliseconds, the simulator
//! its virtual time), so the clock is as testable as the rest of the core.
//!
//! Monotonic by construction: every [`HybridClock::tick`] returns a timestamp greater than
//! every timestamp the clock issued or observed before, whatever `now_ms` does (a clock that
//! jumps back, or a peer whose clock runs ahead). When the wall clock stands still or runs
//! behind, the logical part counts up; when it overflows, the physical part moves on by one.

use serde::{Deserialize, Serialize};

/// Bits of the logical counter.
const LOGICAL_BITS: u32 = 16;
/// The largest physical part: 2^46 ms is about the year 4200, and keeps the packed value
/// below 2^62 (a version vector's counter limit).
pub const MAX_PHYSICAL_MS: u64 = (1 << 46) - 1;

/// One hybrid logical clock timestamp.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct HlcTimestamp(u64);

impl HlcTimestamp {
    pub fn new(physical_ms: u64, logical: u16) -> Self {
        HlcTimestamp((physical_ms.min(MAX_PHYSICAL_MS) << LOGICAL_BITS) | u64::from(logical))
    }

    /// The packed form (what an LWW object's dot counter holds).
    pub fn from_packed(packed: u64) -> Self {
        HlcTimestamp(packed.min((MAX_PHYSICAL_MS << LOGICAL_BITS) | u64::from(u16::MAX)))
    }

    pub fn packed(self) -> u64 {
        self.0
    }

    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        (self.0 & u64::from(u16::MAX)) as u16
    }

    /// The smallest timestamp after this one.
    fn successor(self) -> Self {
        match self.logical().checked_add(1) {
            Some(logical) => HlcTimestamp::new(self.physical_ms(), logical),
            None => HlcTimestamp::new(self.physical_ms() + 1, 0),
        }
    }
}

/// The clock state of one node: the last timestamp issued or observed.
#[derive(Debug, Clone, Default)]
pub struct HybridClock {
    last: HlcTimestamp,
}

impl HybridClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// A timestamp for a local event (a write): greater than everything seen so far.
    pub fn tick(&mut self, now_ms: u64) -> HlcTimestamp {
        let physical = now_ms.min(MAX_PHYSICAL_MS);
        let next = if physical > self.last.physical_ms() {
            HlcTimestamp::new(physical, 0)
        } else {
            self.last.successor()
        };
        self.last = next;
        next
    }

    /// Takes in a timestamp from elsewhere (a stored object, a peer's write), so the next
    /// tick is after it: a write that follows another on any node is stamped later.
    pub fn observe(&mut self, remote: HlcTimestamp) {
        self.last = self.last.max(remote);
    }

    pub fn last(&self) -> HlcTimestamp {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What happens to a clock: the wall clock reads some time, or a peer's timestamp arrives.
    #[derive(Debug, Clone)]
    enum Event {
        Tick(u64),
        Observe(u64, u16),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            // Wall clocks that jump anywhere (skewed, reset, far ahead).
            (0..=MAX_PHYSICAL_MS + 10).prop_map(Event::Tick),
            (1_000..1_010u64).prop_map(Event::Tick),
            (0..2_000u64, any::<u16>()).prop_map(|(p, l)| Event::Observe(p, l)),
        ]
    }

    proptest! {
        /// Under any wall clock (jumps back, stands still, skew between nodes), every tick is
        /// greater than every timestamp issued or observed before it.
        #[test]
        fn ticks_are_strictly_monotonic(events in proptest::collection::vec(event(), 1..200)) {
            let mut clock = HybridClock::new();
            let mut highest = HlcTimestamp::default();
            for e in events {
                match e {
                    Event::Tick(now) => {
                        let t = clock.tick(now);
                        prop_assert!(t > highest, "{t:?} after {highest:?}");
                        prop_assert!(t.packed() < crate::version::MAX_COUNTER);
                        highest = t;
                    }
                    Event::Observe(p, l) => {
                        let t = HlcTimestamp::new(p, l);
                        clock.observe(t);
                        highest = highest.max(t);
                    }
                }
            }
        }

        /// A tick follows the wall clock when it moves forward past everything seen.
        #[test]
        fn ticks_follow_a_clock_that_moves_forward(start in 0..1_000_000u64, step in 1..1_000u64) {
            let mut clock = HybridClock::new();
            let first = clock.tick(start);
            let second = clock.tick(start + step);
            prop_assert_eq!(first, HlcTimestamp::new(start, 0));
            prop_assert_eq!(second, HlcTimestamp::new(start + step, 0));
        }
    }

    /// The logical counter overflows into the physical part rather than wrapping.
    #[test]
    fn logical_overflow_moves_physical_on() {
        let mut clock = HybridClock::new();
        clock.observe(HlcTimestamp::new(5, u16::MAX));
        let t = clock.tick(0);
        assert_eq!((t.physical_ms(), t.logical()), (6, 0));
    }
}
