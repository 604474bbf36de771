//! The optimisation layer as the node uses it: one repair byte budget shared by
//! anti-entropy and hint replay, and the circuit breaker that pauses both while clients
//! suffer.

use super::Node;
use crate::config::NodeConfig;
use crate::control::{
    BreakerState, CircuitBreaker, RateReason, RepairController, StressSignal, TokenBucket,
};
use crate::gossip::{AppKey, AppValue};
use crate::membership::PeerStatus;
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
    /// Sets `repair_bytes`' rate from foreground load.
    pub controller: RepairController,
    /// `repair_bytes.taken_bytes()` at the last look: whether repair spent since.
    pub repair_taken_seen: u64,
    /// The learned baseline last published in gossip.
    pub baseline_published: Option<Millis>,
}

/// Gossip: the client p99 (ms) this node measured without repair (the controller's
/// baseline), for peers that have none of their own.
pub const REPAIR_BASELINE_KEY: AppKey = AppKey::Extension(9);

impl RepairControl {
    pub fn new(config: &NodeConfig, now: Millis) -> Self {
        let controller = RepairController::new(
            config.repair_controller.clone(),
            config.circuit_breaker.clone(),
            config.anti_entropy.rate_limit_bytes_per_s,
            now,
        );
        let rate = controller.rate_bytes_per_s();
        RepairControl {
            repair_bytes: TokenBucket::new(rate, burst_for(rate), now),
            controller,
            breaker: CircuitBreaker::new(config.circuit_breaker.clone()),
            breaker_probe: None,
            repair_taken_seen: 0,
            baseline_published: None,
        }
    }
}

/// A second's worth of the rate, and at least 1 MiB (one large exchange answer).
fn burst_for(rate_bytes_per_s: u64) -> u64 {
    rate_bytes_per_s.max(1 << 20)
}

impl<S: Storage> Node<S> {
    /// Lets the repair controller move the repair byte rate (on the node's timer).
    pub(super) fn adjust_repair_rate(&mut self, now: Millis) {
        let signals = self.control.breaker.signals(now);
        let taken = self.control.repair_bytes.taken_bytes();
        let repair_busy = taken != self.control.repair_taken_seen;
        self.control.repair_taken_seen = taken;
        if let Some(rate) = self.control.controller.adjust(now, &signals, repair_busy) {
            self.control
                .repair_bytes
                .set_rate(now, rate, burst_for(rate));
        }
        self.share_repair_baseline(now);
    }

    /// Publishes the baseline this node measured; a node without one adopts the median of
    /// its live peers' (a restarted node being repaired never sees a quiet window of its
    /// own, and clients of one cluster see much the same latency through any node).
    fn share_repair_baseline(&mut self, now: Millis) {
        let learned = self.control.controller.learned_baseline_p99_ms();
        if let Some(p99) = learned {
            if self.control.baseline_published != Some(p99) {
                let _ =
                    self.cluster
                        .gossiper
                        .set_local(REPAIR_BASELINE_KEY, AppValue::Count(p99), now);
                self.control.baseline_published = Some(p99);
            }
            return;
        }
        let me = self.id().clone();
        let mut peers: Vec<Millis> = self
            .cluster
            .gossiper
            .members()
            .filter(|(id, _)| **id != me && self.cluster.membership.status(id) != PeerStatus::Down)
            .filter_map(|(_, state)| match state.get(REPAIR_BASELINE_KEY) {
                Some(AppValue::Count(p99)) => Some(*p99),
                _ => None,
            })
            .collect();
        if !peers.is_empty() {
            peers.sort_unstable();
            self.control
                .controller
                .adopt_baseline(peers[peers.len() / 2]);
        }
    }

    /// Why the repair rate is what it is.
    pub fn repair_rate_reason(&self) -> RateReason {
        self.control.controller.reason()
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
    /// unlimited. Set by the repair controller from foreground load (see
    /// `control::repair_controller`), or fixed when it is off.
    pub fn repair_rate_bytes_per_s(&self) -> u64 {
        self.control.repair_bytes.rate_bytes_per_s()
    }

    /// Hints replayed per second at most (`hinted_handoff.delivery_rate_per_s`).
    pub fn hint_delivery_rate_per_s(&self) -> u64 {
        self.hints.delivery_budget.rate_bytes_per_s()
    }
}
