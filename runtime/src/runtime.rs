//! The running system: the log, the loaded projections and their workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::config::Config;
use crate::plugin::cache::CompileCache;
use crate::plugin::wasm::{self, WasmProjection};
use crate::plugin::{Handler, Manifest, engine};
use crate::projector::{BatchOptions, Projector, WorkerStatus};
use crate::source::Sources;
use crate::source::kafka::{KafkaConfig, Watermarks};
use crate::source::log::EventLog;
use crate::store::ReadModel;
use crate::store::read_model::Counters;
use crate::store::search::{Indexer, Indexes};

/// A loaded projection, as the API sees it.
pub struct Projection {
    pub manifest: Manifest,
    /// Where the plugin came from: its file, or `native`.
    pub source: String,
    pub read_model: Arc<ReadModel>,
    /// The projection's search indexes (empty for plain projections).
    pub indexes: Arc<Indexes>,
    pub status: Arc<Mutex<WorkerStatus>>,
    /// High watermarks of the Kafka partitions it reads.
    pub watermarks: Watermarks,
}

/// A plugin file that could not be loaded, and why.
#[derive(Debug, Clone, Serialize)]
pub struct PluginError {
    pub file: String,
    pub error: String,
}

/// One partition's progress.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    pub stream: String,
    pub partition: u32,
    /// The next offset the projection will handle.
    pub checkpoint: u64,
    /// The next offset the log will assign (for Kafka: the high watermark).
    pub head: u64,
    pub lag: u64,
}

/// What `GET /v1/projections/{p}` shows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    pub name: String,
    pub plugin: PluginInfo,
    pub tables: Vec<String>,
    #[serde(flatten)]
    pub worker: WorkerStatus,
    pub partitions: Vec<PartitionStatus>,
    /// Events in the log not yet handled, over all partitions.
    pub lag: u64,
    /// Each search index: how far the indexer has applied the outbox.
    pub indexes: Vec<IndexStatus>,
    /// Events the projection emitted, and how many are published.
    pub emitted: EmitStatus,
    #[serde(flatten)]
    pub counters: Counters,
}

/// The emitted-events outbox: committed with the batches, then published.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EmitStatus {
    /// Events emitted (and committed) so far.
    pub events: u64,
    /// Of those, published to their streams.
    pub published: u64,
    pub lag: u64,
}

/// One search index's progress behind the tables.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexStatus {
    pub name: String,
    /// The last outbox sequence committed to the index.
    pub applied_sequence: u64,
    /// The last outbox sequence the tables committed.
    pub outbox_sequence: u64,
    /// Document changes committed to the tables but not yet searchable.
    pub lag: u64,
    pub documents: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginInfo {
    pub source: String,
    pub version: String,
    pub schema_version: u32,
    pub subscriptions: Vec<SubscriptionInfo>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionInfo {
    pub stream: String,
    pub event_types: Vec<String>,
}

/// The runtime: owns the log and one worker thread per projection.
pub struct Runtime {
    pub log: Arc<EventLog>,
    pub kafka: Arc<KafkaConfig>,
    data_dir: PathBuf,
    batch: BatchOptions,
    index_commit_interval: Duration,
    projections: RwLock<BTreeMap<String, Arc<Projection>>>,
    plugin_errors: Mutex<Vec<PluginError>>,
    stop: Arc<AtomicBool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Runtime {
    /// Open the data directory and start every plugin in the plugins directory.
    pub fn start(config: &Config) -> anyhow::Result<Arc<Runtime>> {
        let mut runtime = Runtime::open(config)?;
        let engine = engine::new_engine().map_err(|e| anyhow::anyhow!("creating the wasm engine: {e}"))?;
        let cache = CompileCache::new(&config.data_dir.join("cache").join("compiled"), &engine)
            .context("creating the compile cache")?;
        let linker = wasm::linker(&engine).map_err(|e| anyhow::anyhow!("linking host interfaces: {e}"))?;
        let mut handlers: Vec<(Box<dyn Handler>, String)> = Vec::new();
        for file in plugin_files(&config.plugins_dir)? {
            let label = file.display().to_string();
            let loaded = std::fs::read(&file)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|bytes| {
                    cache.load(&bytes).map_err(|e| wasm::LoadError::Compile(format!("{e:#}")).to_string())
                })
                .and_then(|(component, _)| {
                    WasmProjection::load(&engine, &linker, &component, &label, config.plugin_limits())
                        .map_err(|e| e.to_string())
                });
            match loaded {
                Ok(p) if handlers.iter().any(|(h, _)| h.manifest().name == p.manifest().name) => {
                    let error = format!("another plugin already provides projection {:?}", p.manifest().name);
                    tracing::error!(plugin = %label, %error, "plugin not loaded");
                    runtime
                        .plugin_errors
                        .get_mut()
                        .expect("plugin errors lock")
                        .push(PluginError { file: label, error });
                }
                Ok(p) => {
                    tracing::info!(plugin = %label, projection = %p.manifest().name, version = %p.manifest().version, "plugin loaded");
                    handlers.push((Box::new(p), label));
                }
                Err(error) => {
                    tracing::error!(plugin = %label, %error, "plugin not loaded");
                    runtime
                        .plugin_errors
                        .get_mut()
                        .expect("plugin errors lock")
                        .push(PluginError { file: label, error });
                }
            }
        }
        let runtime = Arc::new(runtime);
        for (handler, source) in handlers {
            // A plugin whose read model cannot be opened (an invalid index
            // mapping, a mapping changed under an existing index) is reported
            // like a plugin that does not load; the others run.
            if let Err(e) = runtime.add(handler, source.clone()) {
                let error = format!("{e:#}");
                tracing::error!(plugin = %source, %error, "projection not started");
                runtime.plugin_errors.lock().expect("plugin errors lock").push(PluginError { file: source, error });
            }
        }
        Ok(runtime)
    }

    /// Open the data directory with no projections yet (see [`Runtime::add`]).
    pub fn open(config: &Config) -> anyhow::Result<Runtime> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
        let log_path = config.data_dir.join("log.redb");
        let log = EventLog::open(&log_path, config.log_options())
            .with_context(|| format!("opening the event log {}", log_path.display()))?;
        Ok(Runtime {
            log: Arc::new(log),
            kafka: Arc::new(config.kafka.clone()),
            data_dir: config.data_dir.clone(),
            batch: config.batch_options(),
            index_commit_interval: Duration::from_millis(config.search.commit_interval_ms),
            projections: RwLock::new(BTreeMap::new()),
            plugin_errors: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            workers: Mutex::new(Vec::new()),
        })
    }

    /// Start a worker for `handler`, resuming from its read model's checkpoints.
    pub fn add(&self, handler: Box<dyn Handler>, source: String) -> anyhow::Result<Arc<Projection>> {
        let manifest = handler.manifest().clone();
        crate::plugin::validate_manifest(&manifest).map_err(anyhow::Error::msg)?;
        let dir = self.data_dir.join("projections").join(&manifest.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("read-model.redb");
        let read_model =
            Arc::new(ReadModel::open(&path).with_context(|| format!("opening the read model {}", path.display()))?);
        let declared = crate::plugin::declared(&*handler).map_err(anyhow::Error::msg)?;
        let indexes = Arc::new(
            Indexes::open(&dir.join("indexes"), &declared.indexes)
                .with_context(|| format!("opening the search indexes of {}", manifest.name))?,
        );
        let status = Arc::new(Mutex::new(WorkerStatus::default()));
        let sources = Sources { log: self.log.clone(), kafka: self.kafka.clone() };
        let projector = Projector::new(
            handler,
            read_model.clone(),
            sources,
            self.batch.clone(),
            status.clone(),
            self.stop.clone(),
        )?;
        let projection = Arc::new(Projection {
            manifest: manifest.clone(),
            source,
            read_model: read_model.clone(),
            indexes: indexes.clone(),
            status,
            watermarks: projector.watermarks(),
        });
        let mut projections = self.projections.write().expect("projections lock");
        anyhow::ensure!(!projections.contains_key(&manifest.name), "projection {:?} is already running", manifest.name);
        projections.insert(manifest.name.clone(), projection.clone());
        let worker = std::thread::Builder::new()
            .name(format!("projector-{}", manifest.name))
            .spawn(move || projector.run())
            .context("spawning a projector thread")?;
        let mut workers = self.workers.lock().expect("workers lock");
        workers.push(worker);
        let relay = crate::sink::Relay::new(
            &manifest.name,
            read_model.clone(),
            self.log.clone(),
            self.kafka.clone(),
            self.stop.clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("relay-{}", manifest.name))
            .spawn(move || relay.run())
            .context("spawning a relay thread")?;
        workers.push(thread);
        if !indexes.open.is_empty() {
            let indexer = Indexer::new(read_model, indexes, self.index_commit_interval, self.stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("indexer-{}", manifest.name))
                .spawn(move || indexer.run())
                .context("spawning an indexer thread")?;
            workers.push(thread);
        }
        Ok(projection)
    }

    /// The projection called `name`.
    pub fn projection(&self, name: &str) -> Option<Arc<Projection>> {
        self.projections.read().expect("projections lock").get(name).cloned()
    }

    /// Every projection, by name.
    pub fn projections(&self) -> Vec<Arc<Projection>> {
        self.projections.read().expect("projections lock").values().cloned().collect()
    }

    /// Plugin files that failed to load.
    pub fn plugin_errors(&self) -> Vec<PluginError> {
        self.plugin_errors.lock().expect("plugin errors lock").clone()
    }

    /// The status of `projection`: checkpoints against the log's heads, counters, errors.
    pub fn status(&self, projection: &Projection) -> crate::store::Result<ProjectionStatus> {
        let m = &projection.manifest;
        let checkpoints: BTreeMap<(String, u32), u64> = projection
            .read_model
            .checkpoints()?
            .into_iter()
            .map(|c| ((c.stream, c.partition), c.next_offset))
            .collect();
        let mut partitions = Vec::new();
        for s in &m.subscriptions {
            // Kafka streams: the partitions this instance reads; log streams: all.
            let heads: Vec<(u32, u64)> = if self.kafka.topic(&s.stream).is_some() {
                let watermarks = projection.watermarks.lock().expect("watermarks lock");
                watermarks.iter().filter(|((stream, _), _)| *stream == s.stream).map(|((_, p), h)| (*p, *h)).collect()
            } else {
                self.log
                    .heads(&s.stream)
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(|(p, h)| (p as u32, h))
                    .collect()
            };
            for (partition, head) in heads {
                let checkpoint = checkpoints.get(&(s.stream.clone(), partition)).copied().unwrap_or(0);
                partitions.push(PartitionStatus {
                    stream: s.stream.clone(),
                    partition,
                    checkpoint,
                    head,
                    lag: head.saturating_sub(checkpoint),
                });
            }
        }
        let outbox_sequence = projection.read_model.outbox_sequence()?;
        let applied = projection.indexes.applied.load(std::sync::atomic::Ordering::Relaxed);
        let indexes = projection
            .indexes
            .open
            .iter()
            .map(|(name, open)| IndexStatus {
                name: name.clone(),
                applied_sequence: applied,
                outbox_sequence,
                lag: outbox_sequence.saturating_sub(applied),
                documents: open.reader.searcher().num_docs(),
            })
            .collect();
        let (emitted, published) = projection.read_model.emit_progress()?;
        Ok(ProjectionStatus {
            name: m.name.clone(),
            indexes,
            emitted: EmitStatus { events: emitted, published, lag: emitted.saturating_sub(published) },
            plugin: PluginInfo {
                source: projection.source.clone(),
                version: m.version.clone(),
                schema_version: m.schema_version,
                subscriptions: m
                    .subscriptions
                    .iter()
                    .map(|s| SubscriptionInfo { stream: s.stream.clone(), event_types: s.event_types.clone() })
                    .collect(),
            },
            tables: m.tables.clone(),
            worker: projection.status.lock().expect("status lock").clone(),
            lag: partitions.iter().map(|p| p.lag).sum(),
            partitions,
            counters: projection.read_model.counters()?,
        })
    }

    /// Stop every worker after its current batch and wait for them.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let workers = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        for w in workers {
            let _ = w.join();
        }
    }
}

/// The `*.wasm` files in `dir`, sorted; none when `dir` does not exist.
fn plugin_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(dir = %dir.display(), "the plugins directory does not exist; no projections loaded");
            return Ok(Vec::new());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("reading the plugins directory {}", dir.display()));
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
