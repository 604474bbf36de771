//! The knobs of gossip and failure detection. The server maps `[gossip]` onto these.

use super::GossipError;
use crate::Millis;

/// Gossip and failure-detection settings; [`GossipConfig::default`] holds the measured
/// defaults (see the module docs for the tables behind them).
#[derive(Debug, Clone, PartialEq)]
pub struct GossipConfig {
    /// Time between rounds while the cluster's state is stable; also the heartbeat period.
    pub interval_ms: Millis,
    /// Live peers a round opens an exchange with.
    pub fanout: usize,
    /// phi at which a peer is convicted (down).
    pub phi_convict_threshold: f64,
    /// phi at which a peer is suspected (reported, not acted on).
    pub phi_suspect_threshold: f64,
    /// Budget of one gossip message, encoded; what does not fit waits for the next round.
    pub max_message_bytes: usize,
    /// How long a node that announced `left` is remembered before it is forgotten (and then
    /// kept out as long again, so stale gossip cannot bring it back).
    pub left_forget_after_ms: Millis,
    /// Bound on the nodes tracked (including this one); others are refused and counted.
    pub max_nodes: usize,
    /// Time between rounds right after a change of application state (frequency tuning).
    pub fast_interval_ms: Millis,
    /// How long after a change rounds stay at `fast_interval_ms`.
    pub fast_period_ms: Millis,
    /// Heartbeat inter-arrival samples kept per peer.
    pub detector_window: usize,
    /// Floor of the standard deviation the detector fits (keeps very regular peers from
    /// being convicted for one late heartbeat).
    pub min_std_deviation_ms: Millis,
    /// Added to the mean inter-arrival: the silence that is never suspicious by itself.
    pub acceptable_pause_ms: Millis,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig::with_interval(500)
    }
}

impl GossipConfig {
    /// A config whose time-based knobs scale with the round interval: the detector allows a
    /// pause of two intervals and a deviation of at least a quarter interval, so the same phi
    /// threshold means the same number of missed rounds at any interval.
    pub fn with_interval(interval_ms: Millis) -> Self {
        let interval_ms = interval_ms.max(1);
        GossipConfig {
            interval_ms,
            fanout: 3,
            phi_convict_threshold: 8.0,
            phi_suspect_threshold: 4.0,
            max_message_bytes: 64 * 1024,
            left_forget_after_ms: 60_000,
            max_nodes: crate::membership::MAX_MEMBERS,
            fast_interval_ms: (interval_ms / 2).max(1),
            fast_period_ms: interval_ms * 4,
            detector_window: 1000,
            min_std_deviation_ms: (interval_ms / 4).max(1),
            acceptable_pause_ms: interval_ms * 2,
        }
    }

    /// Refuses settings gossip cannot work with.
    pub fn validate(&self) -> Result<(), GossipError> {
        let problem = if self.interval_ms == 0 || self.fast_interval_ms == 0 {
            Some("interval_ms and fast_interval_ms must be positive")
        } else if self.fanout == 0 {
            Some("fanout must be at least 1")
        } else if !(self.phi_convict_threshold > 0.5 && self.phi_convict_threshold < 100.0) {
            Some("phi_convict_threshold must be between 0.5 and 100")
        } else if !(self.phi_suspect_threshold > 0.0
            && self.phi_suspect_threshold <= self.phi_convict_threshold)
        {
            Some("phi_suspect_threshold must be positive and at most phi_convict_threshold")
        } else if self.max_message_bytes < 1024 {
            Some("max_message_bytes must be at least 1024")
        } else if self.max_nodes < 1 {
            Some("max_nodes must be at least 1")
        } else if self.detector_window < 2 {
            Some("detector_window must be at least 2")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(GossipError::InvalidConfig(problem)),
            None => Ok(()),
        }
    }

    /// The largest encoded application entry a node may publish: a quarter of a message, so
    /// any single update always fits in one.
    pub fn max_entry_bytes(&self) -> usize {
        self.max_message_bytes / 4
    }
}
