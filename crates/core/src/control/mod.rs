//! The optimisation layer around repair: what to repair first ([`repair_queue`]), how fast
//! ([`rate_limiter`]), and when to pause ([`circuit_breaker`]). Everything runs on the
//! injected clock (`now: Millis`), so the simulator replays it exactly.
//!
//! # Layout
//! - [`repair_queue`]: priority queue of ranges (hint loss first, then recovered replicas,
//!   then longest since the last successful sync), with retry backoff.
//! - [`rate_limiter`]: a token bucket (bytes per second with a burst).
//! - [`circuit_breaker`]: opens on stress (p99 latency, in-flight requests, error rate),
//!   half-opens after a cooldown to let one exchange through, closes when signals recover.

pub mod circuit_breaker;
pub mod rate_limiter;
pub mod repair_controller;
pub mod repair_queue;

pub use circuit_breaker::{
    BreakerConfig, BreakerState, CircuitBreaker, ForegroundSignals, StressSignal,
};
pub use rate_limiter::TokenBucket;
pub use repair_controller::{ControllerConfig, RateReason, RepairController};
pub use repair_queue::{RepairQueue, RepairQueueConfig, RepairReason};
