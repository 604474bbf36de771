//! The configuration every node of a run shares ([`NodeOptions`], `--options`), the swarm
//! that draws it per seed, and [`node_config`], which turns it into a core `NodeConfig`.
//!
//! Why a swarm: a simulator that only runs the default configuration never tests the other
//! modes (periodic fsync, sloppy quorum, asynchronous or no read repair, tiny hint budgets,
//! hints and tombstones that expire within a run). TigerBeetle's VOPR draws its cluster and
//! options per seed (`options_swarm`); [`NodeOptions::swarm`] does the same from a stream of
//! its own, so a swarm run and the same run replayed with explicit `--nodes` / `--options`
//! (the replay line) are the same run.

use mendkv_core::config::{FsyncPolicy, NodeConfig, ReadRepairMode};
use mendkv_core::{Millis, NodeId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;

use crate::REQUEST_TIMEOUT_MS;

/// What a run sets in every node's `NodeConfig` beyond the simulator's fixed choices
/// (request timeout, gossip interval, addresses, the seeded RNG). The default is the core's
/// default configuration, which is what every run used before the swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOptions {
    pub replication_factor: usize,
    pub fsync: FsyncPolicy,
    pub sloppy_quorum: bool,
    /// `None`: read repair off (convergence is left to hinted handoff and anti-entropy).
    pub read_repair: Option<ReadRepairMode>,
    pub digest_reads: bool,
    /// `read_repair.background_chance` in percent (an integer, so a config compares and
    /// prints exactly).
    pub background_percent: u32,
    pub max_hints_per_node: usize,
    pub max_hint_bytes: u64,
    pub hint_ttl_ms: Millis,
    pub anti_entropy_interval_ms: Millis,
    pub verify_interval_ms: Millis,
    /// How long the repair circuit breaker stays open once foreground errors tripped it.
    /// Faults trip it (more than 5 % of requests fail); its default (30 s) outlasts the
    /// quiet period, so a run checking convergence by anti-entropy alone shortens it.
    pub breaker_cooldown_ms: Millis,
    /// `[anti_entropy] gossip_roots`: Merkle roots on gossip (off: periodic exchanges only).
    pub gossip_roots: bool,
    /// `[hinted_handoff] enabled` (a scenario turns it off to see anti-entropy alone).
    pub hinted_handoff: bool,
}

impl Default for NodeOptions {
    fn default() -> Self {
        let base = NodeConfig::new("default");
        NodeOptions {
            replication_factor: base.replication_factor,
            fsync: base.fsync,
            sloppy_quorum: base.sloppy_quorum,
            read_repair: base.read_repair.enabled.then_some(base.read_repair.mode),
            digest_reads: base.read_repair.digest_reads,
            background_percent: (base.read_repair.background_chance * 100.0).round() as u32,
            max_hints_per_node: base.hinted_handoff.max_hints_per_node,
            max_hint_bytes: base.hinted_handoff.max_bytes_total,
            hint_ttl_ms: base.hinted_handoff.ttl_ms,
            anti_entropy_interval_ms: base.anti_entropy.interval_ms,
            verify_interval_ms: base.anti_entropy.verify_interval_ms,
            breaker_cooldown_ms: base.circuit_breaker.cooldown_ms,
            gossip_roots: base.anti_entropy.gossip_roots,
            hinted_handoff: base.hinted_handoff.enabled,
        }
    }
}

/// The salt of the swarm's stream: independent of the run's own streams, so drawing (or
/// not drawing) a swarm configuration changes nothing else about a seed.
const SWARM_SALT: u64 = 0x7377_6172_6d5f_6f70;

/// Largest cluster and replication factor the swarm draws.
pub const SWARM_MAX_NODES: usize = 9;
pub const SWARM_MAX_REPLICATION: usize = 5;

impl NodeOptions {
    /// The swarm's stream for `seed`.
    pub fn swarm_rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed ^ SWARM_SALT)
    }

    /// Draws a configuration for a cluster of `nodes`. Each knob takes its default often
    /// enough that the defaults stay tested alongside the other modes.
    pub fn swarm(rng: &mut ChaCha8Rng, nodes: usize) -> Self {
        let mut o = NodeOptions {
            replication_factor: rng.gen_range(1..=SWARM_MAX_REPLICATION.min(nodes.max(1))),
            ..NodeOptions::default()
        };
        if rng.gen_bool(0.3) {
            o.fsync = FsyncPolicy::Periodic {
                interval_ms: rng.gen_range(5..=200),
            };
        }
        o.sloppy_quorum = rng.gen_bool(0.5);
        o.read_repair = match rng.gen_range(0..100) {
            0..15 => None,
            15..55 => Some(ReadRepairMode::Async),
            _ => Some(ReadRepairMode::Blocking),
        };
        o.digest_reads = rng.gen_bool(0.5);
        o.background_percent = [0, 10, 50, 100][rng.gen_range(0..4)];
        if rng.gen_bool(0.5) {
            o.max_hints_per_node = rng.gen_range(1..=20);
            o.max_hint_bytes = rng.gen_range(256..=16_384);
        }
        if rng.gen_bool(0.5) {
            // Short enough that hints expire, and tombstones age past the reaping horizon
            // (TTL plus two request timeouts), within a run.
            o.hint_ttl_ms = rng.gen_range(500..=8_000);
        }
        // Without read repair the final reads mend nothing: anti-entropy must finish within
        // the quiet period, so it runs often.
        if o.read_repair.is_none() || rng.gen_bool(0.5) {
            o.anti_entropy_interval_ms = rng.gen_range(200..=2_000);
            o.verify_interval_ms = rng.gen_range(20..=500);
        }
        if o.read_repair.is_none() || rng.gen_bool(0.5) {
            o.breaker_cooldown_ms = rng.gen_range(100..=2_000);
        }
        // Drawn last, so the draws above stay what they were for every seed.
        o.gossip_roots = rng.gen_bool(0.7);
        o
    }

    /// Applies these options to a node's configuration.
    pub fn apply(&self, config: &mut NodeConfig) {
        config.replication_factor = self.replication_factor;
        config.fsync = self.fsync;
        config.sloppy_quorum = self.sloppy_quorum;
        config.read_repair.enabled = self.read_repair.is_some();
        if let Some(mode) = self.read_repair {
            config.read_repair.mode = mode;
        }
        config.read_repair.digest_reads = self.digest_reads;
        config.read_repair.background_chance = f64::from(self.background_percent) / 100.0;
        config.hinted_handoff.max_hints_per_node = self.max_hints_per_node;
        config.hinted_handoff.max_bytes_total = self.max_hint_bytes;
        config.hinted_handoff.ttl_ms = self.hint_ttl_ms;
        config.anti_entropy.interval_ms = self.anti_entropy_interval_ms;
        config.anti_entropy.verify_interval_ms = self.verify_interval_ms;
        config.circuit_breaker.cooldown_ms = self.breaker_cooldown_ms;
        config.anti_entropy.gossip_roots = self.gossip_roots;
        config.hinted_handoff.enabled = self.hinted_handoff;
    }

    /// Parses the `--options` text (what [`fmt::Display`] prints): comma-separated
    /// `name=value`; names left out keep their default.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut o = NodeOptions::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not name=value"))?;
            let number = |v: &str| -> Result<u64, String> {
                v.parse::<u64>()
                    .map_err(|_| format!("{name}: {v:?} is not a number"))
            };
            let switch = |v: &str| match v {
                "on" => Ok(true),
                "off" => Ok(false),
                _ => Err(format!("{name}: use on or off, not {v:?}")),
            };
            match name {
                "rf" => o.replication_factor = number(value)? as usize,
                "fsync" => {
                    o.fsync = match value.split_once(':') {
                        None if value == "always" => FsyncPolicy::Always,
                        Some(("periodic", ms)) => FsyncPolicy::Periodic {
                            interval_ms: number(ms)?.max(1),
                        },
                        _ => return Err(format!("fsync: use always or periodic:MS, not {value:?}")),
                    }
                }
                "sloppy" => o.sloppy_quorum = switch(value)?,
                "read-repair" => {
                    o.read_repair = match value {
                        "off" => None,
                        "blocking" => Some(ReadRepairMode::Blocking),
                        "async" => Some(ReadRepairMode::Async),
                        _ => return Err(format!("read-repair: use off, blocking or async, not {value:?}")),
                    }
                }
                "digest" => o.digest_reads = switch(value)?,
                "background" => {
                    o.background_percent = number(value)?.min(100) as u32;
                }
                "hints" => {
                    let (count, bytes) = value
                        .split_once('/')
                        .ok_or_else(|| format!("hints: use COUNT/BYTES, not {value:?}"))?;
                    o.max_hints_per_node = number(count)? as usize;
                    o.max_hint_bytes = number(bytes)?;
                }
                "hint-ttl-ms" => o.hint_ttl_ms = number(value)?,
                "ae-ms" => o.anti_entropy_interval_ms = number(value)?.max(1),
                "verify-ms" => o.verify_interval_ms = number(value)?.max(1),
                "breaker-ms" => o.breaker_cooldown_ms = number(value)?,
                "roots" => o.gossip_roots = switch(value)?,
                "hh" => o.hinted_handoff = switch(value)?,
                _ => {
                    return Err(format!(
                        "unknown option {name:?}: use rf, fsync, sloppy, read-repair, digest, background, hints, hint-ttl-ms, ae-ms, verify-ms, breaker-ms, roots, hh"
                    ))
                }
            }
        }
        if o.replication_factor == 0 {
            return Err("rf must be at least 1".into());
        }
        Ok(o)
    }
}

impl fmt::Display for NodeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(f, "rf={},fsync=", self.replication_factor)?;
        match self.fsync {
            FsyncPolicy::Always => f.write_str("always")?,
            FsyncPolicy::Periodic { interval_ms } => write!(f, "periodic:{interval_ms}")?,
        }
        let read_repair = match self.read_repair {
            None => "off",
            Some(ReadRepairMode::Blocking) => "blocking",
            Some(ReadRepairMode::Async) => "async",
        };
        write!(
            f,
            ",sloppy={},read-repair={read_repair},digest={},background={},hints={}/{},hint-ttl-ms={},ae-ms={},verify-ms={},breaker-ms={},roots={},hh={}",
            on(self.sloppy_quorum),
            on(self.digest_reads),
            self.background_percent,
            self.max_hints_per_node,
            self.max_hint_bytes,
            self.hint_ttl_ms,
            self.anti_entropy_interval_ms,
            self.verify_interval_ms,
            self.breaker_cooldown_ms,
            on(self.gossip_roots),
            on(self.hinted_handoff)
        )
    }
}

impl std::str::FromStr for NodeOptions {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeOptions::parse(s)
    }
}

/// The configuration of simulated node `id` in its `incarnation`; the node's own random
/// choices (background read repair) are seeded from the run's seed.
pub fn node_config(id: &NodeId, seed: u64, incarnation: u64, options: &NodeOptions) -> NodeConfig {
    let mut config = NodeConfig::new(id.as_str());
    let mut mix = ChaCha8Rng::seed_from_u64(seed ^ 0x6d65_6e64_6b76);
    let salt: u64 = mix.gen();
    config.rng_seed = salt
        ^ id.as_str()
            .bytes()
            .fold(incarnation.wrapping_mul(0x9e37_79b9_7f4a_7c15), |h, b| {
                h.rotate_left(7) ^ u64::from(b)
            });
    config.peer_address = format!("sim:{id}");
    config.http_address = format!("sim-http:{id}");
    config.request_timeout_ms = REQUEST_TIMEOUT_MS;
    config.gossip = mendkv_core::gossip::GossipConfig::with_interval(1000);
    config
        .lww_default_buckets
        .insert(crate::LWW_BUCKET.to_string());
    options.apply(&mut config);
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    // What the swarm draws prints as `--options` text that parses back to the same options,
    // so a failing seed's replay line reproduces its configuration exactly.
    #[test]
    fn options_round_trip_through_their_text() {
        assert_eq!(NodeOptions::parse("").unwrap(), NodeOptions::default());
        for seed in 0..500 {
            let mut rng = NodeOptions::swarm_rng(seed);
            let options = NodeOptions::swarm(&mut rng, 1 + seed as usize % 9);
            assert_eq!(NodeOptions::parse(&options.to_string()).unwrap(), options);
        }
        assert!(NodeOptions::parse("rf=0").is_err());
        assert!(NodeOptions::parse("colour=blue")
            .unwrap_err()
            .contains("unknown"));
        assert!(NodeOptions::parse("fsync=sometimes").is_err());
    }

    // The default options leave the core's default configuration untouched, so runs that
    // do not use the swarm are the runs they were before it.
    #[test]
    fn default_options_are_the_core_defaults() {
        let mut applied = NodeConfig::new("n0");
        NodeOptions::default().apply(&mut applied);
        let base = NodeConfig::new("n0");
        assert_eq!(format!("{applied:?}"), format!("{base:?}"));
    }
}
