//! `refract.yaml`: every setting has a default, so `refract run` needs no file.
//!
//! ```yaml
//! data-dir: ./refract-data        # the log, read models and compile cache
//! plugins-dir: ./plugins          # *.wasm projections loaded at start
//! listen: 127.0.0.1:8080
//! api:
//!   max-body-mb: 64               # larger requests (appends, plugin uploads) are a 413
//!   request-timeout-ms: 90000     # longer requests are a 503 (wait_for waits at most 60 s)
//!   header-timeout-ms: 10000      # a connection whose request headers take longer is closed
//! streams:
//!   default-partitions: 4
//!   partitions: { accounts: 1 }   # per-stream partition counts
//!   max-event-bytes: 1048576
//! batch:
//!   max-events: 10000
//!   max-duration-ms: 250
//!   call-events: 500
//!   catch-up-factor: 4           # batches this many times larger while behind (up to 4x more
//!                                # while the previous batch still commits)
//!   initial-backoff-ms: 100
//!   max-backoff-ms: 30000
//! limits:
//!   memory-mb: 256                # per plugin instance, all its memories together
//!   deadline-ms: 10000            # per call into a plugin
//!   max-key-bytes: 1024
//!   max-value-bytes: 1048576
//!   max-emits: 100000             # events one batch may emit
//!   max-batch-mb: 256             # bytes one batch may hold in writes, documents, emits
//!   pause-after-dead-letters: 1000  # a plugin failing this many events in a row pauses (0: never)
//! search:
//!   commit-interval-ms: 500       # indexer commits to tantivy this often
//! storage:
//!   cache-mb: 1024                # page cache per redb file: the log, and each read model
//! changes:                        # each read model's change log, for change streams (GET …/tables/{t}/changes)
//!   retention-seconds: 600        # changes older than this are trimmed
//!   max-changes: 1000000          # and all but the last this many
//! rebuild:
//!   background: true              # a rebuild uses only CPU nothing else wants (Linux SCHED_IDLE)
//! auth:                           # bearer tokens (or REFRACT_ADMIN_TOKEN / REFRACT_QUERY_TOKEN)
//!   admin-token: null             # mutating routes; plugin uploads are off without it
//!   query-token: null             # queries, when set
//! kafka:                          # streams read from Kafka topics (optional)
//!   brokers: 127.0.0.1:9092
//!   mode: replica                 # replica: every instance reads all partitions; partitioned: one shard per partition
//!   group-id: refract             # partitioned, in a cluster: projection p's shards are spread by group <group-id>.<p>
//!   properties: {}                # librdkafka properties, passed through (security.protocol, sasl.*, ssl.*)
//!   streams:
//!     orders-cdc:                 # the stream name projections subscribe to
//!       topic: dbserver1.inventory.orders
//!       format: debezium          # json (default) | cloudevents | debezium
//!       type-field: type          # json: the field holding the event type
//!       type-header: null         # json: or a header holding it
//! cluster:                        # membership through Kafka (optional; absent: off)
//!   advertise-url: null           # how the others reach this instance (default: http://<listen>)
//!   instance-id: null             # default: generated once, kept in <data-dir>/instance-id
//!   control-topic: refract.cluster  # compacted; created when missing
//!   announce-interval-ms: 2000    # an instance silent for 3 intervals is shown as not live
//! plugins:                        # per plugin, by the name in its manifest (optional)
//!   orders-payments-join:
//!     settings: { window-ms: 300000 }   # read by the plugin with the `settings` interface
//!     limits: { memory-mb: 64, deadline-ms: 2000 }   # any key of `limits`, for this plugin
//!     routes:                     # enrichers: where outputs go (default: a stream named after it)
//!       - types: [OrderReadyForShipment]   # empty or absent: every type
//!         headers: { region: eu }          # optional: exact header values
//!         to: [shipping, notifications]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::plugin::route::{Route, Routes};
use crate::plugin::wasm::PluginLimits;
use crate::projector::BatchOptions;
use crate::source::kafka::KafkaConfig;
use crate::source::log::LogOptions;
use crate::store::KvLimits;

/// The runtime's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub plugins_dir: PathBuf,
    pub listen: String,
    pub api: ApiConfig,
    pub streams: StreamsConfig,
    pub batch: BatchConfig,
    pub limits: LimitsConfig,
    pub search: SearchConfig,
    pub storage: StorageConfig,
    pub changes: ChangesConfig,
    pub rebuild: RebuildConfig,
    pub kafka: KafkaConfig,
    /// Membership through Kafka's `kafka.brokers`; `None` (no `cluster:`
    /// section): this instance announces nothing.
    pub cluster: Option<ClusterConfig>,
    pub auth: AuthConfig,
    pub plugins: BTreeMap<String, PluginConfig>,
}

/// How this instance announces itself to the others on the control topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The URL the other instances and clients reach this one at.
    pub advertise_url: Option<String>,
    /// This instance's id; by default generated once and kept in the data directory.
    pub instance_id: Option<String>,
    /// The compacted topic the announcements go to.
    pub control_topic: String,
    pub announce_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            advertise_url: None,
            instance_id: None,
            control_topic: "refract.cluster".into(),
            announce_interval_ms: 2000,
        }
    }
}

/// Settings and routes of one plugin, keyed by the name in its manifest.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Values the plugin reads with the `settings` interface (scalars, given as text).
    pub settings: BTreeMap<String, serde_json::Value>,
    /// An enricher's routes (see [`crate::plugin::route`]).
    pub routes: Vec<Route>,
    /// This plugin's limits, where they differ from the global `limits`.
    pub limits: PluginLimitsConfig,
}

/// Per-plugin overrides of [`LimitsConfig`]: absent keys keep the global value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct PluginLimitsConfig {
    pub memory_mb: Option<usize>,
    pub deadline_ms: Option<u64>,
    pub max_key_bytes: Option<usize>,
    pub max_value_bytes: Option<usize>,
    pub max_emits: Option<usize>,
    pub max_batch_mb: Option<usize>,
    pub pause_after_dead_letters: Option<u64>,
}

/// After how many dead letters in a row `plugin` pauses (0: never).
pub fn resolve_pause(global: &LimitsConfig, plugin: Option<&PluginLimitsConfig>) -> u64 {
    plugin.and_then(|p| p.pause_after_dead_letters).unwrap_or(global.pause_after_dead_letters)
}

/// The limits a plugin runs under: `plugin`'s overrides of the `global` ones.
pub fn resolve_limits(global: &LimitsConfig, plugin: Option<&PluginLimitsConfig>) -> (PluginLimits, KvLimits) {
    let o = plugin.cloned().unwrap_or_default();
    let instance = PluginLimits {
        max_memory: o.memory_mb.unwrap_or(global.memory_mb) << 20,
        deadline: Duration::from_millis(o.deadline_ms.unwrap_or(global.deadline_ms)),
    };
    let kv = KvLimits {
        max_key_bytes: o.max_key_bytes.unwrap_or(global.max_key_bytes),
        max_value_bytes: o.max_value_bytes.unwrap_or(global.max_value_bytes),
        max_emits: o.max_emits.unwrap_or(global.max_emits),
        max_batch_bytes: o.max_batch_mb.unwrap_or(global.max_batch_mb) << 20,
        ..KvLimits::default()
    };
    (instance, kv)
}

impl PluginConfig {
    /// The settings as the plugin sees them: text.
    pub fn settings_text(&self) -> Result<BTreeMap<String, String>, String> {
        self.settings
            .iter()
            .map(|(name, value)| {
                let text = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return Err(format!("setting {name:?} must be a string, number or boolean")),
                };
                Ok((name.clone(), text))
            })
            .collect()
    }
}

/// Bearer tokens for the HTTP API. `REFRACT_ADMIN_TOKEN` and
/// `REFRACT_QUERY_TOKEN` in the environment take precedence.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Required by every mutating route when set (appends, plugin uploads);
    /// without it, plugin uploads are disabled and appends are open.
    pub admin_token: Option<String>,
    /// Required by every query when set (the admin token works too).
    pub query_token: Option<String>,
}

impl AuthConfig {
    /// The tokens in effect: the environment's, else the file's.
    pub fn resolved(&self) -> AuthConfig {
        let env = |name: &str| std::env::var(name).ok().filter(|t| !t.is_empty());
        AuthConfig {
            admin_token: env("REFRACT_ADMIN_TOKEN").or_else(|| self.admin_token.clone()),
            query_token: env("REFRACT_QUERY_TOKEN").or_else(|| self.query_token.clone()),
        }
    }
}

/// How rebuilds share the machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RebuildConfig {
    /// Replay at the lowest CPU priority, so queries and live ingestion keep
    /// their latency; `false` makes a rebuild compete equally (faster on a
    /// busy machine, at the cost of query tail latency meanwhile).
    pub background: bool,
}

impl Default for RebuildConfig {
    fn default() -> Self {
        RebuildConfig { background: true }
    }
}

/// The HTTP API's own limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The largest request body (a batch of appended events, a plugin upload).
    pub max_body_mb: usize,
    /// The longest a request may take, reading its body included.
    pub request_timeout_ms: u64,
    /// The longest a client may take to send a request's headers once it
    /// has connected (or between requests on a kept-alive connection);
    /// then the connection is closed.
    pub header_timeout_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        // Long enough for a query waiting the longest `timeout_ms` (60 s) and
        // for the first compile of a large uploaded component (~25 s).
        ApiConfig { max_body_mb: 64, request_timeout_ms: 90_000, header_timeout_ms: 10_000 }
    }
}

impl ApiConfig {
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_mb << 20
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SearchConfig {
    /// How often the indexer commits the outbox to tantivy: documents are
    /// searchable at most this long after their batch committed.
    pub commit_interval_ms: u64,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig { commit_interval_ms: 500 }
    }
}

/// The redb files: the log and each projection's read model.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct StorageConfig {
    /// The most memory, in MiB, each file may use to cache its pages (the
    /// log and every read model each have their own cache, filled as pages
    /// are read or written). redb's default is 1024; lower it when many
    /// large read models share a small machine.
    pub cache_mb: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { cache_mb: crate::db_file::DEFAULT_CACHE_BYTES >> 20 }
    }
}

impl StorageConfig {
    pub fn cache_bytes(&self) -> usize {
        self.cache_mb.saturating_mul(1 << 20)
    }
}

/// Each read model's change log: what a change stream can resume from.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ChangesConfig {
    /// Changes older than this are trimmed (a client away longer reloads).
    pub retention_seconds: u64,
    /// And all but the last this many.
    pub max_changes: u64,
}

impl Default for ChangesConfig {
    fn default() -> Self {
        let retention = crate::store::changes::ChangeRetention::default();
        ChangesConfig { retention_seconds: retention.max_age.as_secs(), max_changes: retention.max_changes }
    }
}

impl ChangesConfig {
    pub fn retention(&self) -> crate::store::changes::ChangeRetention {
        crate::store::changes::ChangeRetention {
            max_age: Duration::from_secs(self.retention_seconds),
            max_changes: self.max_changes,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct StreamsConfig {
    pub default_partitions: u32,
    pub partitions: HashMap<String, u32>,
    pub max_event_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_events: usize,
    pub max_duration_ms: u64,
    pub call_events: usize,
    pub catch_up_factor: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub memory_mb: usize,
    pub deadline_ms: u64,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_emits: usize,
    pub max_batch_mb: usize,
    pub pause_after_dead_letters: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("refract-data"),
            plugins_dir: PathBuf::from("plugins"),
            listen: "127.0.0.1:8080".into(),
            api: ApiConfig::default(),
            streams: StreamsConfig::default(),
            batch: BatchConfig::default(),
            limits: LimitsConfig::default(),
            search: SearchConfig::default(),
            storage: StorageConfig::default(),
            changes: ChangesConfig::default(),
            rebuild: RebuildConfig::default(),
            kafka: KafkaConfig::default(),
            cluster: None,
            auth: AuthConfig::default(),
            plugins: BTreeMap::new(),
        }
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        let log = LogOptions::default();
        StreamsConfig {
            default_partitions: log.default_partitions,
            partitions: HashMap::new(),
            max_event_bytes: log.max_event_bytes,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        let b = BatchOptions::default();
        BatchConfig {
            max_events: b.max_events,
            max_duration_ms: b.max_duration.as_millis() as u64,
            call_events: b.call_events,
            catch_up_factor: b.catch_up_factor,
            initial_backoff_ms: b.initial_backoff.as_millis() as u64,
            max_backoff_ms: b.max_backoff.as_millis() as u64,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let p = PluginLimits::default();
        let kv = KvLimits::default();
        LimitsConfig {
            memory_mb: p.max_memory >> 20,
            deadline_ms: p.deadline.as_millis() as u64,
            max_key_bytes: kv.max_key_bytes,
            max_value_bytes: kv.max_value_bytes,
            max_emits: kv.max_emits,
            max_batch_mb: kv.max_batch_bytes >> 20,
            pause_after_dead_letters: BatchOptions::default().pause_after_dead_letters,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: Box<serde_saphyr::Error> },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Read `path`; relative directories in it are taken relative to the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_saphyr::from_str(&text)
                .map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })?
        };
        let base = path.parent().unwrap_or(Path::new("."));
        config.data_dir = base.join(&config.data_dir);
        config.plugins_dir = base.join(&config.plugins_dir);
        config.validate()?;
        Ok(config)
    }

    /// Check values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.streams.default_partitions == 0 || self.streams.partitions.values().any(|&p| p == 0) {
            return bad("streams: a stream needs at least one partition");
        }
        for name in self.streams.partitions.keys() {
            crate::names::validate("stream", name).map_err(ConfigError::Invalid)?;
        }
        if self.batch.max_events == 0 || self.batch.call_events == 0 || self.batch.catch_up_factor == 0 {
            return bad("batch: max-events, call-events and catch-up-factor must be at least 1");
        }
        if self.api.max_body_mb == 0 || self.api.request_timeout_ms == 0 || self.api.header_timeout_ms == 0 {
            return bad("api: max-body-mb, request-timeout-ms and header-timeout-ms must be at least 1");
        }
        if self.search.commit_interval_ms == 0 {
            return bad("search: commit-interval-ms must be at least 1");
        }
        if self.storage.cache_mb == 0 {
            return bad("storage: cache-mb must be at least 1");
        }
        if self.changes.retention_seconds == 0 || self.changes.max_changes == 0 {
            return bad("changes: retention-seconds and max-changes must be at least 1");
        }
        if self.limits.memory_mb == 0 || self.limits.deadline_ms == 0 || self.limits.max_batch_mb == 0 {
            return bad("limits: memory-mb, deadline-ms and max-batch-mb must be at least 1");
        }
        if let Some(c) = &self.cluster {
            if c.announce_interval_ms == 0 {
                return bad("cluster: announce-interval-ms must be at least 1");
            }
            if c.control_topic.is_empty() {
                return bad("cluster: control-topic must not be empty");
            }
            if let Some(id) = &c.instance_id {
                crate::names::validate("cluster instance-id", id).map_err(ConfigError::Invalid)?;
            }
        }
        for (stream, topic) in &self.kafka.streams {
            crate::names::validate("stream", stream).map_err(ConfigError::Invalid)?;
            if topic.topic.is_empty() {
                return Err(ConfigError::Invalid(format!("kafka.streams.{stream}: topic must not be empty")));
            }
            if self.streams.partitions.contains_key(stream) {
                return Err(ConfigError::Invalid(format!(
                    "stream {stream:?} is both a Kafka topic (kafka.streams) and an embedded log stream (streams.partitions)"
                )));
            }
        }
        for (name, plugin) in &self.plugins {
            let invalid = |e: String| ConfigError::Invalid(format!("plugins.{name}: {e}"));
            crate::names::validate("plugin", name).map_err(invalid)?;
            plugin.settings_text().map_err(invalid)?;
            let l = &plugin.limits;
            if l.memory_mb == Some(0) || l.deadline_ms == Some(0) || l.max_batch_mb == Some(0) {
                return Err(invalid("limits: memory-mb, deadline-ms and max-batch-mb must be at least 1".into()));
            }
            Routes::new(name, &plugin.routes).map_err(invalid)?;
        }
        let auth = self.auth.resolved();
        for token in [&auth.admin_token, &auth.query_token].into_iter().flatten() {
            if token.len() < 16 {
                return bad("auth: tokens must be at least 16 characters");
            }
        }
        if !self.kafka.streams.is_empty() {
            // Fail at start, not at the first read, when a property is unknown to librdkafka.
            let probe: Result<rdkafka::producer::BaseProducer, _> = self.kafka.client_config().create();
            probe.map_err(|e| ConfigError::Invalid(format!("kafka: {e}")))?;
        }
        Ok(())
    }

    pub fn log_options(&self) -> LogOptions {
        LogOptions {
            default_partitions: self.streams.default_partitions,
            partitions: self.streams.partitions.clone(),
            max_event_bytes: self.streams.max_event_bytes,
            cache_bytes: self.storage.cache_bytes(),
        }
    }

    pub fn batch_options(&self) -> BatchOptions {
        BatchOptions {
            max_events: self.batch.max_events,
            max_duration: Duration::from_millis(self.batch.max_duration_ms),
            call_events: self.batch.call_events,
            catch_up_factor: self.batch.catch_up_factor,
            initial_backoff: Duration::from_millis(self.batch.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.batch.max_backoff_ms),
            kv: resolve_limits(&self.limits, None).1,
            pause_after_dead_letters: self.limits.pause_after_dead_letters,
            background_rebuilds: self.rebuild.background,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_section_turns_membership_on_with_defaults_and_a_bad_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refract.yaml");
        std::fs::write(&path, "").unwrap();
        assert!(Config::load(&path).unwrap().cluster.is_none(), "no section: off");
        std::fs::write(&path, "cluster: {}\n").unwrap();
        let c = Config::load(&path).unwrap().cluster.unwrap();
        assert_eq!((c.control_topic.as_str(), c.announce_interval_ms), ("refract.cluster", 2000));
        std::fs::write(&path, "cluster:\n  instance-id: a b\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("instance-id"), "{err}");
        std::fs::write(&path, "cluster:\n  announce-interval-ms: 0\n").unwrap();
        assert!(Config::load(&path).unwrap_err().to_string().contains("announce-interval-ms"));
    }

    /// `mode: group` is gone (a new owner of a partition started without
    /// its earlier state): a config that asks for it is refused, saying what
    /// replaces it.
    #[test]
    fn group_mode_is_refused_with_what_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refract.yaml");
        std::fs::write(&path, "kafka:\n  mode: group\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("`group` was replaced by `partitioned`"), "{err}");
        std::fs::write(&path, "kafka:\n  mode: sharded\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("must be `replica` or `partitioned`"), "{err}");
        std::fs::write(&path, "kafka:\n  mode: partitioned\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().kafka.mode, crate::source::kafka::Mode::Partitioned);
    }

    #[test]
    fn an_empty_file_means_defaults_and_typos_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refract.yaml");
        std::fs::write(&path, "").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.batch.max_events, 10_000);
        assert_eq!(c.data_dir, dir.path().join("refract-data"));
        std::fs::write(&path, "batch:\n  max-event: 5\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `max-event`"), "{err}");
        std::fs::write(&path, "streams:\n  partitions: { accounts: 0 }\n").unwrap();
        assert!(matches!(Config::load(&path), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn the_page_cache_of_the_redb_files_is_set_in_storage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refract.yaml");
        std::fs::write(&path, "").unwrap();
        assert_eq!(Config::load(&path).unwrap().log_options().cache_bytes, 1 << 30, "redb's default");
        std::fs::write(&path, "storage:\n  cache-mb: 64\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!((c.storage.cache_bytes(), c.log_options().cache_bytes), (64 << 20, 64 << 20));
        std::fs::write(&path, "storage:\n  cache-mb: 0\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("storage: cache-mb must be at least 1"), "{err}");
    }

    #[test]
    fn plugin_settings_are_text_and_routes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refract.yaml");
        let yaml = "limits:\n  memory-mb: 100\nplugins:\n  join:\n    settings: { window-ms: 300000, region: eu, strict: true }\n    routes:\n      - { types: [A], to: [a, b] }\n    limits: { deadline-ms: 300, max-emits: 5 }\n";
        std::fs::write(&path, yaml).unwrap();
        let c = Config::load(&path).unwrap();
        let settings = c.plugins["join"].settings_text().unwrap();
        assert_eq!(settings["window-ms"], "300000");
        assert_eq!(settings["strict"], "true");
        let limits_for = |plugin: &str| resolve_limits(&c.limits, c.plugins.get(plugin).map(|p| &p.limits));
        let (instance, kv) = limits_for("join");
        assert_eq!((instance.max_memory, instance.deadline.as_millis(), kv.max_emits), (100 << 20, 300, 5));
        let (instance, kv) = limits_for("other");
        assert_eq!((instance.deadline.as_millis(), kv.max_emits), (10_000, 100_000));
        std::fs::write(&path, "plugins:\n  join:\n    routes:\n      - { to: [] }\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("plugins.join: route 1"), "{err}");
        std::fs::write(&path, "plugins:\n  join:\n    settings: { window: [1, 2] }\n").unwrap();
        assert!(Config::load(&path).unwrap_err().to_string().contains("must be a string"));
    }
}
