//! The optimisation layer as the node uses it: one repair byte budget shared by
//! anti-entropy and hint replay, and the circuit breaker that pauses both while clients
//! suffer.

use super::Node;
use crate::config::NodeConfig;
use crate::control::{BreakerState, CircuitBreaker, StressSignal, TokenBucket};
use crate::ring::TokenRange;
use crate::storage::Storage;
use crate::{Millis, NodeId};

#[derive(Debug)]
pub(super) struct RepairControl {
    /// Repair bytes, shared by anti-entropy and hint replay.
    pub repair_bytes: TokenBucket,
    /// Pauses scheduled anti-entropy and hint replay while foreground traffic suffers.
    pub breaker: CircuitBreaker,
    /// The scheduled exchange let through by a half-open breaker.
    pub breaker_probe: Option<(TokenRange, NodeId)>,
}

impl RepairControl {
    pub fn new(config: &NodeConfig, now: Millis) -> Self {
        RepairControl {
            repair_bytes: TokenBucket::new(
                config.anti_entropy.rate_limit_bytes_per_s,
                config.anti_entropy.rate_limit_bytes_per_s.max(1 << 20),
                now,
            ),
            breaker: CircuitBreaker::new(config.circuit_breaker.clone()),
            breaker_probe: None,
        }
    }
}

/// Read-only views of the repair controls, for the dashboard.
impl<S: Storage> Node<S> {
    /// The repair breaker's state now (`&mut`: reading it lets a cooldown end).
    pub fn repair_breaker_state(&mut self) -> BreakerState {
        let now = self.clock;
        self.control.breaker.state(now)
    }

    /// The signal that last opened the repair breaker, if one did.
    pub fn repair_breaker_last_trip(&self) -> Option<StressSignal> {
        self.control.breaker.last_trip()
    }

    /// The signal over its threshold now, if any.
    pub fn repair_breaker_stress(&self) -> Option<StressSignal> {
        self.control.breaker.stress(self.clock)
    }

    /// The repair byte budget in force (shared by anti-entropy and hint replay); 0 when
    /// unlimited. Fixed by `anti_entropy.rate_limit_bytes_per_s` today.
    pub fn repair_rate_bytes_per_s(&self) -> u64 {
        self.control.repair_bytes.rate_bytes_per_s()
    }

    /// Hints replayed per second at most (`hinted_handoff.delivery_rate_per_s`).
    pub fn hint_delivery_rate_per_s(&self) -> u64 {
        self.hints.delivery_budget.rate_bytes_per_s()
    }
}
