//! The optimisation layer as the node uses it: one repair byte budget shared by
//! anti-entropy and hint replay, and the circuit breaker that pauses both while clients
//! suffer.

use crate::config::NodeConfig;
use crate::control::{CircuitBreaker, TokenBucket};
use crate::ring::TokenRange;
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
