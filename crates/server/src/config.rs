//! Server configuration: TOML file, then `MENDKV_<SECTION>__<KEY>` environment variables,
//! then command-line flags (flag > env > file > default). All three are merged as TOML
//! tables before one typed decode, so every knob gets the same precedence and the same
//! error messages.

use mendkv_core::config::{FsyncPolicy, NodeConfig, ReadRepairConfig, ReadRepairMode};
use mendkv_core::hinted_handoff::HintedHandoffConfig;
use mendkv_core::quorum::ConsistencyLevel;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub node: NodeSection,
    pub cluster: ClusterSection,
    pub peer: crate::transport::PeerSection,
    pub consistency: ConsistencySection,
    pub read_repair: ReadRepairSection,
    pub hinted_handoff: HintedHandoffSection,
    pub anti_entropy: AntiEntropySection,
    pub circuit_breaker: CircuitBreakerSection,
    pub gossip: GossipSection,
    pub storage: StorageSection,
    pub http: HttpSection,
    pub log: LogSection,
    pub buckets: BucketsSection,
    pub repair_controller: RepairControllerSection,
    pub resp: RespSection,
    pub tls: crate::tls::TlsSection,
}

/// `[repair_controller]`: the repair byte rate follows foreground load within these bounds
/// (see `mendkv_core::control::repair_controller`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepairControllerSection {
    /// Off: repair runs at the fixed `anti_entropy.rate_limit_bytes_per_s`.
    pub enabled: bool,
    /// The client p99 repair backs off to protect (below the breaker's threshold).
    pub target_p99_ms: u64,
    /// How far (percent) the client p99 may rise above its level without repair before
    /// repair backs off; 0 = `target_p99_ms` alone.
    pub baseline_headroom_percent: u64,
    pub floor_bytes_per_s: u64,
    pub ceiling_bytes_per_s: u64,
    /// Additive step per second while the client p99 is well under the target.
    pub increase_bytes_per_s: u64,
}

impl Default for RepairControllerSection {
    fn default() -> Self {
        let core = mendkv_core::control::ControllerConfig::default();
        RepairControllerSection {
            enabled: core.enabled,
            target_p99_ms: core.target_p99_ms,
            baseline_headroom_percent: core.baseline_headroom_percent,
            floor_bytes_per_s: core.floor_bytes_per_s,
            ceiling_bytes_per_s: core.ceiling_bytes_per_s,
            increase_bytes_per_s: core.increase_bytes_per_s,
        }
    }
}

/// Databases `SELECT` takes (0..16, as Redis's default `databases 16`): 0 is `resp.bucket`,
/// n > 0 is bucket `db{n}`.
pub const RESP_DATABASES: u32 = 16;

/// `[resp]`: the Redis protocol front end (SPEC section 9).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RespSection {
    /// Address to serve RESP on; off unless set (`mendkv cluster` sets it).
    pub listen: Option<String>,
    /// The bucket of database 0; `SELECT n` (n > 0) uses bucket `db{n}`. These buckets are
    /// `lww` while their properties were never set.
    pub bucket: String,
    /// Consistency level of GET, MGET, EXISTS and the reads of SET NX|XX|GET, DEL, GETDEL.
    pub read: String,
    /// Consistency level of SET, MSET, DEL and GETDEL.
    pub write: String,
    /// When set, every command but AUTH, HELLO and QUIT is refused until AUTH gives it.
    pub password: Option<String>,
}

impl Default for RespSection {
    fn default() -> Self {
        RespSection {
            listen: None,
            bucket: "default".into(),
            read: "quorum".into(),
            write: "quorum".into(),
            password: None,
        }
    }
}

/// How the node logs (to stderr).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` (one human-readable line per event) or `json` (one JSON object per line, for
    /// log shippers). Colour codes only when stderr is a terminal, in either format.
    pub format: LogFormat,
    /// A level (`error`, `warn`, `info`, `debug`, `trace`) or a tracing filter such as
    /// `info,mendkv_server=debug`. `RUST_LOG`, when set, takes its place.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// `[buckets]`: the properties of buckets whose properties were never set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BucketsSection {
    /// `causal` (siblings) or `lww` (last write wins by hybrid logical clock).
    pub resolution: String,
    /// A causal write that would leave more siblings is refused with 409.
    pub max_siblings: u64,
    /// A causal write that leaves at least this many siblings is logged and counted.
    pub warn_siblings: u64,
}

impl Default for BucketsSection {
    fn default() -> Self {
        let props = mendkv_core::bucket::BucketProps::default();
        BucketsSection {
            resolution: props.resolution.as_str().to_string(),
            max_siblings: u64::from(props.max_siblings),
            warn_siblings: u64::from(props.warn_siblings),
        }
    }
}

/// Bounds on client connections to the HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Open client connections at most; more are answered 503 and closed. Lowered at start to
    /// what the open-file limit allows after a reserve for peers and storage.
    pub max_connections: usize,
    /// A request line and headers must arrive in full within this long (counted from the
    /// connection's start, or from the first byte of a later request on it).
    pub header_timeout_ms: u64,
    /// A connection with no request for this long is closed, and a request body must arrive in
    /// full within this long.
    pub idle_timeout_ms: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            max_connections: 4096,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipSection {
    /// Round interval and heartbeat period.
    pub interval_ms: u64,
    /// Peers a round gossips with.
    pub fanout: usize,
    /// phi at which a peer is convicted down.
    pub phi_convict_threshold: f64,
}

impl Default for GossipSection {
    fn default() -> Self {
        let core = mendkv_core::gossip::GossipConfig::default();
        GossipSection {
            interval_ms: core.interval_ms,
            fanout: core.fanout,
            phi_convict_threshold: core.phi_convict_threshold,
        }
    }
}

/// When foreground stress pauses repair work (scheduled anti-entropy and hint replay).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerSection {
    /// Span over which client latency and errors are judged.
    pub window_s: u64,
    /// Opens when the client p99 latency over the window exceeds this.
    pub max_p99_latency_ms: u64,
    /// Opens when more client requests than this are in flight at the node.
    pub max_in_flight: usize,
    /// Opens when the share of failed client requests exceeds this.
    pub max_error_rate: f64,
    /// Latency and error rate are judged over at least this many requests.
    pub min_samples: u64,
    /// Open this long before one exchange is let through (half-open).
    pub cooldown_s: u64,
}

impl Default for CircuitBreakerSection {
    fn default() -> Self {
        let core = mendkv_core::control::BreakerConfig::default();
        CircuitBreakerSection {
            window_s: core.window_ms / 1000,
            max_p99_latency_ms: core.max_p99_latency_ms,
            max_in_flight: core.max_in_flight,
            max_error_rate: core.max_error_rate,
            min_samples: core.min_samples,
            cooldown_s: core.cooldown_ms / 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AntiEntropySection {
    pub enabled: bool,
    /// Each (range, replica peer) is compared at least this often.
    pub interval_s: u64,
    /// Exchanges a node drives at once.
    pub concurrency: usize,
    /// Streaming exchanges a joining or gaining node drives at once.
    pub stream_concurrency: usize,
    /// Repair bytes per second, shared with hint replay (0 = unlimited).
    pub rate_limit_bytes_per_s: u64,
    /// One range's Merkle tree is checked against a scan of its data this often.
    pub verify_interval_s: u64,
    /// Publish per-range Merkle roots on gossip: a root that differs from a replica's starts
    /// an exchange at once, roots that agree skip the periodic exchange.
    pub gossip_roots: bool,
    /// With `gossip_roots`, pairs whose roots agree still get a full exchange this often.
    pub full_exchange_interval_s: u64,
}

impl Default for AntiEntropySection {
    fn default() -> Self {
        let core = mendkv_core::node::AntiEntropyConfig::default();
        AntiEntropySection {
            enabled: core.enabled,
            interval_s: core.interval_ms / 1000,
            concurrency: core.concurrency,
            stream_concurrency: core.stream_concurrency,
            rate_limit_bytes_per_s: core.rate_limit_bytes_per_s,
            verify_interval_s: core.verify_interval_ms / 1000,
            gossip_roots: core.gossip_roots,
            full_exchange_interval_s: core.full_exchange_interval_ms / 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HintedHandoffSection {
    pub enabled: bool,
    pub ttl_s: u64,
    pub max_hints_per_node: usize,
    pub max_bytes_total: u64,
    /// Hints replayed per second (0 = unlimited).
    pub delivery_rate_per_s: u64,
}

impl Default for HintedHandoffSection {
    fn default() -> Self {
        let core = HintedHandoffConfig::default();
        HintedHandoffSection {
            enabled: core.enabled,
            ttl_s: core.ttl_ms / 1000,
            max_hints_per_node: core.max_hints_per_node,
            max_bytes_total: core.max_bytes_total,
            delivery_rate_per_s: core.delivery_rate_per_s,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadRepairSection {
    pub enabled: bool,
    /// `blocking` (repair the level's stale replicas before answering) or `async`.
    pub mode: String,
    pub digest_reads: bool,
    pub background_chance: f64,
    /// Repair writes in flight per node; beyond it, repairs are skipped and counted.
    pub max_concurrent_repairs: usize,
}

impl Default for ReadRepairSection {
    fn default() -> Self {
        let core = ReadRepairConfig::default();
        ReadRepairSection {
            enabled: core.enabled,
            mode: "blocking".into(),
            digest_reads: core.digest_reads,
            background_chance: core.background_chance,
            max_concurrent_repairs: core.max_concurrent_repairs,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Unique node id (default: `node-<listen port>`).
    pub id: Option<String>,
    pub data_dir: PathBuf,
    /// Peer (internal protocol) listen address.
    pub listen: String,
    /// HTTP API listen address.
    pub http: String,
    /// Peer address other nodes should dial (default: `listen`).
    pub advertise: Option<String>,
    /// HTTP address announced to peers (default: `http`).
    pub advertise_http: Option<String>,
    /// Threads that run the node's tasks: 0, one per core (tokio's multi-thread runtime);
    /// 1, a single thread (tokio's current-thread runtime: no hand-offs between threads,
    /// cheaper per request where several nodes share a machine; `mendkv cluster` uses it);
    /// N, N worker threads. fsyncs and engine upkeep run on their own threads either way.
    pub runtime_threads: usize,
}

/// `node.runtime_threads` as an environment variable: `mendkv cluster` sets it for its nodes
/// (a flag would beat the caller's own setting), and so do the black-box tests.
pub const RUNTIME_THREADS_ENV: &str = "MENDKV_NODE__RUNTIME_THREADS";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub name: String,
    pub seeds: Vec<String>,
    pub secret: String,
    pub replication_factor: usize,
    pub vnodes: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsistencySection {
    pub read: String,
    pub write: String,
    pub request_timeout_ms: u64,
    /// A read still unanswered after this asks one more replica.
    pub speculative_retry_ms: u64,
    /// Dynamo's sloppy quorum: fallback nodes keep hints for unreachable replicas and count
    /// toward `w`.
    pub sloppy_quorum: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// `always` (fsync before acknowledging, group commit) or `periodic`.
    pub fsync: String,
    /// With `fsync = "periodic"`: how often to fsync.
    pub fsync_interval_ms: u64,
    pub max_value_bytes: usize,
    /// Writes are refused (507, or stored by the other replicas) while the data directory's
    /// file system has less free space than this; 0 turns the reserve off.
    pub min_free_bytes: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: None,
            data_dir: PathBuf::from("mendkv-data/node"),
            listen: "127.0.0.1:7001".into(),
            http: "127.0.0.1:8001".into(),
            advertise: None,
            advertise_http: None,
            runtime_threads: 0,
        }
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            name: "mendkv".into(),
            seeds: vec![],
            secret: "mendkv-dev-secret".into(),
            replication_factor: 3,
            vnodes: 16,
        }
    }
}

impl Default for ConsistencySection {
    fn default() -> Self {
        ConsistencySection {
            read: "quorum".into(),
            write: "quorum".into(),
            request_timeout_ms: 2000,
            speculative_retry_ms: 200,
            sloppy_quorum: false,
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            fsync: "always".into(),
            fsync_interval_ms: 100,
            max_value_bytes: 1 << 20,
            min_free_bytes: mendkv_storage::DEFAULT_MIN_FREE_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0} is not valid TOML: {1}")]
    Parse(PathBuf, String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &["seeds"];

/// Parses an environment value into the TOML type the key expects.
fn env_value(key: &str, raw: &str) -> toml::Value {
    if LIST_KEYS.contains(&key) {
        return toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        );
    }
    if let Ok(n) = raw.parse::<i64>() {
        return toml::Value::Integer(n);
    }
    if let Ok(f) = raw.parse::<f64>() {
        return toml::Value::Float(f);
    }
    if let Ok(b) = raw.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    toml::Value::String(raw.to_string())
}

/// Sets `section.key = value` in a TOML table.
pub fn set_value(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(section_table) = entry {
        section_table.insert(key.to_string(), value);
    }
}

impl ServerConfig {
    /// Merges file, environment (`vars`, usually `std::env::vars()`) and flag overrides.
    pub fn load(
        file: Option<&std::path::Path>,
        vars: impl IntoIterator<Item = (String, String)>,
        flags: toml::Table,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))?
            }
            None => toml::Table::new(),
        };
        for (name, raw) in vars {
            let Some(rest) = name.strip_prefix("MENDKV_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            let value = env_value(&key, &raw);
            set_value(&mut table, &section, &key, value);
        }
        for (section, values) in flags {
            if let toml::Value::Table(values) = values {
                for (key, value) in values {
                    set_value(&mut table, &section, &key, value);
                }
            }
        }
        let config: ServerConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// `resp.read` and `resp.write` as levels.
    pub fn resp_levels(&self) -> Result<(ConsistencyLevel, ConsistencyLevel), ConfigError> {
        let parse = |name: &str, value: &str| {
            value
                .parse::<ConsistencyLevel>()
                .map_err(|e| ConfigError::Invalid(format!("resp.{name}: {e}")))
        };
        Ok((
            parse("read", &self.resp.read)?,
            parse("write", &self.resp.write)?,
        ))
    }

    /// The buckets the Redis protocol uses: `resp.bucket` and `db1`..`db15`.
    pub fn resp_buckets(&self) -> std::collections::BTreeSet<String> {
        std::iter::once(self.resp.bucket.clone())
            .chain((1..RESP_DATABASES).map(|n| format!("db{n}")))
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.bucket_defaults()?;
        self.resp_levels()?;
        mendkv_core::request::validate_bucket(&self.resp.bucket)
            .map_err(|e| ConfigError::Invalid(format!("resp.bucket: {e}")))?;
        self.read_level()?;
        self.write_level()?;
        self.fsync_policy()?;
        self.read_repair_config()?;
        if self.cluster.replication_factor == 0 {
            return Err(ConfigError::Invalid(
                "cluster.replication_factor must be at least 1".into(),
            ));
        }
        if self.cluster.vnodes == 0 {
            return Err(ConfigError::Invalid(
                "cluster.vnodes must be at least 1".into(),
            ));
        }
        if self.consistency.request_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "consistency.request_timeout_ms must be positive".into(),
            ));
        }
        if self.http.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "http.max_connections must be at least 1".into(),
            ));
        }
        if self.http.header_timeout_ms == 0 || self.http.idle_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "http.header_timeout_ms and http.idle_timeout_ms must be positive".into(),
            ));
        }
        if self.storage.max_value_bytes > 8 << 20 {
            return Err(ConfigError::Invalid(
                "storage.max_value_bytes is at most 8 MiB (the frame limit)".into(),
            ));
        }
        self.tls.build().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// `[buckets]` as the core's default properties.
    pub fn bucket_defaults(&self) -> Result<mendkv_core::bucket::BucketProps, ConfigError> {
        let section = &self.buckets;
        let resolution = section
            .resolution
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("buckets.resolution: {e}")))?;
        let update = mendkv_core::bucket::PropsUpdate {
            resolution: Some(resolution),
            max_siblings: Some(section.max_siblings),
            warn_siblings: Some(section.warn_siblings),
        };
        update
            .apply_to(mendkv_core::bucket::BucketProps::default())
            .map_err(|e| ConfigError::Invalid(format!("[buckets]: {e}")))
    }

    pub fn read_level(&self) -> Result<ConsistencyLevel, ConfigError> {
        self.consistency
            .read
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("consistency.read: {e}")))
    }

    pub fn write_level(&self) -> Result<ConsistencyLevel, ConfigError> {
        self.consistency
            .write
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("consistency.write: {e}")))
    }

    pub fn fsync_policy(&self) -> Result<FsyncPolicy, ConfigError> {
        match self.storage.fsync.as_str() {
            "always" => Ok(FsyncPolicy::Always),
            "periodic" => Ok(FsyncPolicy::Periodic {
                interval_ms: self.storage.fsync_interval_ms.max(1),
            }),
            other => Err(ConfigError::Invalid(format!(
                "storage.fsync must be \"always\" or \"periodic\", not {other:?}"
            ))),
        }
    }

    pub fn read_repair_config(&self) -> Result<ReadRepairConfig, ConfigError> {
        let section = &self.read_repair;
        let mode = match section.mode.as_str() {
            "blocking" => ReadRepairMode::Blocking,
            "async" => ReadRepairMode::Async,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "read_repair.mode must be \"blocking\" or \"async\", not {other:?}"
                )))
            }
        };
        if !(0.0..=1.0).contains(&section.background_chance) {
            return Err(ConfigError::Invalid(
                "read_repair.background_chance must be within 0..1".into(),
            ));
        }
        Ok(ReadRepairConfig {
            enabled: section.enabled,
            mode,
            digest_reads: section.digest_reads,
            background_chance: section.background_chance,
            max_concurrent_repairs: section.max_concurrent_repairs,
        })
    }

    pub fn node_id(&self) -> String {
        self.node.id.clone().unwrap_or_else(|| {
            let port = self.node.listen.rsplit(':').next().unwrap_or("0");
            format!("node-{port}")
        })
    }

    pub fn advertised_peer_address(&self) -> String {
        self.node
            .advertise
            .clone()
            .unwrap_or_else(|| self.node.listen.clone())
    }

    pub fn advertised_http_address(&self) -> String {
        self.node
            .advertise_http
            .clone()
            .unwrap_or_else(|| self.node.http.clone())
    }

    /// The core's view of this configuration.
    pub fn node_config(&self) -> Result<NodeConfig, ConfigError> {
        let mut config = NodeConfig::new(self.node_id());
        config.peer_address = self.advertised_peer_address();
        config.http_address = self.advertised_http_address();
        config.replication_factor = self.cluster.replication_factor;
        config.vnodes = self.cluster.vnodes;
        config.request_timeout_ms = self.consistency.request_timeout_ms;
        config.speculative_retry_ms = self.consistency.speculative_retry_ms;
        config.sloppy_quorum = self.consistency.sloppy_quorum;
        config.default_read = self.read_level()?;
        config.default_write = self.write_level()?;
        config.fsync = self.fsync_policy()?;
        config.max_value_bytes = self.storage.max_value_bytes;
        config.read_repair = self.read_repair_config()?;
        config.bucket_defaults = self.bucket_defaults()?;
        config.lww_default_buckets = self.resp_buckets();
        config.hinted_handoff = HintedHandoffConfig {
            enabled: self.hinted_handoff.enabled,
            ttl_ms: self.hinted_handoff.ttl_s.saturating_mul(1000),
            max_hints_per_node: self.hinted_handoff.max_hints_per_node,
            max_bytes_total: self.hinted_handoff.max_bytes_total,
            delivery_rate_per_s: self.hinted_handoff.delivery_rate_per_s,
            ..HintedHandoffConfig::default()
        };
        config.anti_entropy = mendkv_core::node::AntiEntropyConfig {
            enabled: self.anti_entropy.enabled,
            interval_ms: self.anti_entropy.interval_s.max(1).saturating_mul(1000),
            concurrency: self.anti_entropy.concurrency.max(1),
            stream_concurrency: self.anti_entropy.stream_concurrency.max(1),
            rate_limit_bytes_per_s: self.anti_entropy.rate_limit_bytes_per_s,
            verify_interval_ms: self
                .anti_entropy
                .verify_interval_s
                .max(1)
                .saturating_mul(1000),
            gossip_roots: self.anti_entropy.gossip_roots,
            full_exchange_interval_ms: self
                .anti_entropy
                .full_exchange_interval_s
                .max(1)
                .saturating_mul(1000),
        };
        config.tree_hash_secret = self.cluster.secret.clone().into_bytes();
        let mut gossip = mendkv_core::gossip::GossipConfig::with_interval(self.gossip.interval_ms);
        gossip.fanout = self.gossip.fanout;
        gossip.phi_convict_threshold = self.gossip.phi_convict_threshold;
        gossip.phi_suspect_threshold = gossip
            .phi_suspect_threshold
            .min(self.gossip.phi_convict_threshold);
        gossip
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("[gossip]: {e}")))?;
        config.gossip = gossip;
        let breaker = &self.circuit_breaker;
        config.circuit_breaker = mendkv_core::control::BreakerConfig {
            window_ms: breaker.window_s.max(1).saturating_mul(1000),
            max_p99_latency_ms: breaker.max_p99_latency_ms,
            max_in_flight: breaker.max_in_flight,
            max_error_rate: breaker.max_error_rate,
            min_samples: breaker.min_samples,
            cooldown_ms: breaker.cooldown_s.saturating_mul(1000),
        };
        let controller = &self.repair_controller;
        if controller.enabled
            && (controller.floor_bytes_per_s == 0
                || controller.ceiling_bytes_per_s < controller.floor_bytes_per_s)
        {
            return Err(ConfigError::Invalid(
                "repair_controller: floor_bytes_per_s must be positive and at most \
                 ceiling_bytes_per_s"
                    .into(),
            ));
        }
        config.repair_controller = mendkv_core::control::ControllerConfig {
            enabled: controller.enabled,
            target_p99_ms: controller.target_p99_ms.max(1),
            baseline_headroom_percent: controller.baseline_headroom_percent,
            floor_bytes_per_s: controller.floor_bytes_per_s,
            ceiling_bytes_per_s: controller.ceiling_bytes_per_s,
            increase_bytes_per_s: controller.increase_bytes_per_s,
            ..mendkv_core::control::ControllerConfig::default()
        };
        let own = [self.node.listen.clone(), self.advertised_peer_address()];
        config.learn_epoch_from_peers = self.cluster.seeds.iter().any(|s| !own.contains(s));
        config.rng_seed = rand::random();
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags beat environment variables, which beat the file, which beats defaults.
    #[test]
    fn precedence_is_flag_env_file_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mendkv.toml");
        std::fs::write(
            &file,
            "[cluster]\nvnodes = 8\nreplication_factor = 5\nname = \"file\"\n",
        )
        .unwrap();
        let vars = vec![
            (
                "MENDKV_CLUSTER__REPLICATION_FACTOR".to_string(),
                "2".to_string(),
            ),
            ("MENDKV_CLUSTER__NAME".to_string(), "env".to_string()),
            ("MENDKV_CLUSTER__SEEDS".to_string(), "a:1, b:2".to_string()),
        ];
        let mut flags = toml::Table::new();
        set_value(
            &mut flags,
            "cluster",
            "name",
            toml::Value::String("flag".into()),
        );
        let config = ServerConfig::load(Some(&file), vars, flags).unwrap();
        assert_eq!(config.cluster.vnodes, 8);
        assert_eq!(config.cluster.replication_factor, 2);
        assert_eq!(config.cluster.name, "flag");
        assert_eq!(config.cluster.seeds, vec!["a:1", "b:2"]);
        assert_eq!(config.consistency.request_timeout_ms, 2000);
    }

    /// `node.runtime_threads` is 0 (a worker per core) unless set; `mendkv cluster` sets it
    /// through the environment.
    #[test]
    fn runtime_threads_defaults_to_one_per_core_and_takes_the_environment() {
        let config = ServerConfig::load(None, vec![], toml::Table::new()).unwrap();
        assert_eq!(config.node.runtime_threads, 0);
        let vars = vec![(RUNTIME_THREADS_ENV.to_string(), "1".to_string())];
        let config = ServerConfig::load(None, vars, toml::Table::new()).unwrap();
        assert_eq!(config.node.runtime_threads, 1);
    }

    /// Unknown keys and bad values are refused with the key's name.
    #[test]
    fn bad_values_are_refused() {
        let mut flags = toml::Table::new();
        set_value(
            &mut flags,
            "consistency",
            "read",
            toml::Value::String("two".into()),
        );
        let error = ServerConfig::load(None, vec![], flags)
            .unwrap_err()
            .to_string();
        assert!(error.contains("consistency.read"), "{error}");
        let vars = vec![("MENDKV_STORAGE__NOPE".to_string(), "1".to_string())];
        assert!(ServerConfig::load(None, vars, toml::Table::new()).is_err());
    }

    /// `[buckets]` has SPEC's defaults, takes the environment, and refuses bad values and
    /// unknown keys.
    #[test]
    fn buckets_section_loads_and_validates() {
        let defaults = ServerConfig::load(None, vec![], toml::Table::new()).unwrap();
        let props = defaults.bucket_defaults().unwrap();
        assert_eq!((props.max_siblings, props.warn_siblings), (100, 25));
        let vars = vec![("MENDKV_BUCKETS__RESOLUTION".to_string(), "lww".to_string())];
        let config = ServerConfig::load(None, vars, toml::Table::new()).unwrap();
        assert_eq!(
            config.node_config().unwrap().bucket_defaults.resolution,
            mendkv_core::bucket::Resolution::Lww
        );
        for (key, value) in [("RESOLUTION", "last"), ("MAX_SIBLINGS", "0"), ("NOPE", "1")] {
            let vars = vec![(format!("MENDKV_BUCKETS__{key}"), value.to_string())];
            assert!(
                ServerConfig::load(None, vars, toml::Table::new()).is_err(),
                "{key}"
            );
        }
    }

    /// `[http]` has defaults, takes its keys from the file and the environment, and refuses
    /// unknown keys and zero bounds.
    #[test]
    fn http_section_loads_and_validates() {
        let defaults = ServerConfig::load(None, vec![], toml::Table::new()).unwrap();
        assert_eq!(defaults.http.max_connections, 4096);
        assert_eq!(defaults.http.header_timeout_ms, 10_000);
        assert_eq!(defaults.http.idle_timeout_ms, 60_000);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mendkv.toml");
        std::fs::write(
            &file,
            "[http]\nmax_connections = 10\nidle_timeout_ms = 5000\n",
        )
        .unwrap();
        let vars = vec![
            ("MENDKV_HTTP__MAX_CONNECTIONS".to_string(), "20".to_string()),
            (
                "MENDKV_HTTP__HEADER_TIMEOUT_MS".to_string(),
                "300".to_string(),
            ),
        ];
        let config = ServerConfig::load(Some(&file), vars, toml::Table::new()).unwrap();
        assert_eq!(config.http.max_connections, 20);
        assert_eq!(config.http.header_timeout_ms, 300);
        assert_eq!(config.http.idle_timeout_ms, 5000);
        for (key, value) in [
            ("MENDKV_HTTP__MAX_CONECTIONS", "1"),
            ("MENDKV_HTTP__MAX_CONNECTIONS", "0"),
            ("MENDKV_HTTP__HEADER_TIMEOUT_MS", "0"),
            ("MENDKV_HTTP__IDLE_TIMEOUT_MS", "soon"),
        ] {
            let vars = vec![(key.to_string(), value.to_string())];
            assert!(
                ServerConfig::load(None, vars, toml::Table::new()).is_err(),
                "{key}={value}"
            );
        }
    }

    #[test]
    fn resp_section_loads_and_its_buckets_default_to_lww() {
        let vars = vec![
            (
                "MENDKV_RESP__LISTEN".to_string(),
                "127.0.0.1:9001".to_string(),
            ),
            ("MENDKV_RESP__BUCKET".to_string(), "cache".to_string()),
            ("MENDKV_RESP__WRITE".to_string(), "all".to_string()),
        ];
        let config = ServerConfig::load(None, vars, toml::Table::new()).unwrap();
        assert_eq!(config.resp.listen.as_deref(), Some("127.0.0.1:9001"));
        let (read, write) = config.resp_levels().unwrap();
        assert_eq!((read.as_str(), write.as_str()), ("quorum", "all"));
        let lww = config.node_config().unwrap().lww_default_buckets;
        assert!(lww.contains("cache") && lww.contains("db15") && !lww.contains("db16"));
        let unknown = vec![("MENDKV_RESP__PORT".to_string(), "1".to_string())];
        assert!(ServerConfig::load(None, unknown, toml::Table::new()).is_err());
        let bad_level = vec![("MENDKV_RESP__READ".to_string(), "most".to_string())];
        assert!(ServerConfig::load(None, bad_level, toml::Table::new()).is_err());
    }

    /// `[tls]` is off by default, takes the environment, refuses unknown keys, and checks
    /// its files at load (naming the key at fault).
    #[test]
    fn tls_section_loads_and_validates() {
        let defaults = ServerConfig::load(None, vec![], toml::Table::new()).unwrap();
        assert!(!defaults.tls.peer && !defaults.tls.client);
        let vars = vec![("MENDKV_TLS__CERT".to_string(), "x".to_string())];
        assert!(ServerConfig::load(None, vars, toml::Table::new()).is_err());
        let vars = vec![("MENDKV_TLS__PEER".to_string(), "true".to_string())];
        let error = ServerConfig::load(None, vars, toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(error.contains("tls.cert_file"), "{error}");
        let vars = vec![
            ("MENDKV_TLS__CLIENT".to_string(), "true".to_string()),
            (
                "MENDKV_TLS__CERT_FILE".to_string(),
                "/nonexistent.pem".to_string(),
            ),
            (
                "MENDKV_TLS__KEY_FILE".to_string(),
                "/nonexistent.key".to_string(),
            ),
        ];
        let error = ServerConfig::load(None, vars, toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent.pem"), "{error}");
    }
}
