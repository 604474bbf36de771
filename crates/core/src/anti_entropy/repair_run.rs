//! What the node's anti-entropy is configured to do, and how an operator's repair run
//! reports where it stands (`GET /admin/repair/{id}`).

use crate::Millis;
use serde::Serialize;

/// Knobs of `[anti_entropy]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AntiEntropyConfig {
    pub enabled: bool,
    /// Each (range, peer) is compared at least this often.
    pub interval_ms: Millis,
    /// Exchanges this node drives at once.
    pub concurrency: usize,
    /// Streaming exchanges (ranges a joiner or a new owner pulls) a node drives at once,
    /// besides `concurrency`. Streaming is bound by round trips, not by CPU or bytes, when
    /// it runs two at a time (a 2-core machine sat 65% idle), and the repair byte budget
    /// still bounds what it moves.
    pub stream_concurrency: usize,
    /// Repair bytes per second, shared by anti-entropy and hint replay (0 = unlimited).
    pub rate_limit_bytes_per_s: u64,
    /// One range's tree is rebuilt from a scan and compared with the maintained one this
    /// often (seed: "Verify Consistency"); a scan of one range at a time bounds its cost.
    pub verify_interval_ms: Millis,
    /// Publish this node's quiet Merkle roots on gossip and compare them with its replica
    /// peers': a difference schedules an exchange at once, agreement skips the periodic one
    /// (`node/anti_entropy.rs`, "roots on gossip").
    pub gossip_roots: bool,
    /// With `gossip_roots`, a (range, peer) whose roots agree still has a full exchange this
    /// often, so a fault in the roots path cannot hide a divergence for longer.
    pub full_exchange_interval_ms: Millis,
}

impl Default for AntiEntropyConfig {
    fn default() -> Self {
        AntiEntropyConfig {
            enabled: true,
            interval_ms: 300_000,
            concurrency: 2,
            stream_concurrency: 8,
            rate_limit_bytes_per_s: 32 << 20,
            verify_interval_ms: 60_000,
            gossip_roots: true,
            full_exchange_interval_ms: 6 * 3600 * 1000,
        }
    }
}

/// Whether a repair run is still going, finished, or gave up on some (range, peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Done,
    Failed,
}

impl RunState {
    /// SPEC section 3's `state` field.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Done => "done",
            RunState::Failed => "failed",
        }
    }
}

/// Where an operator's repair run stands (`GET /admin/repair/{id}`: its JSON is this
/// struct's serialization).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepairRunStatus {
    pub id: u64,
    pub state: RunState,
    pub ranges_total: u64,
    pub ranges_done: u64,
    pub keys_compared: u64,
    pub keys_different: u64,
    pub keys_repaired: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub elapsed_ms: Millis,
}
