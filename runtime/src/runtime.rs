//! The running system: the log, the loaded projections and their workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::config::{Config, LimitsConfig, PluginConfig, resolve_limits, resolve_pause};
use crate::generation::{self, Generation, Rebuild, RebuildStatus};
use crate::plugin::cache::CompileCache;
use crate::plugin::route::Routes;
use crate::plugin::wasm::{self, WasmPlugin};
use crate::plugin::{Environment, Handler, IndexMapping, Kind, Lookup, LookupError, Manifest, engine};
use crate::projector::{BatchOptions, Projector, WorkerStatus};
use crate::source::Sources;
use crate::source::kafka::KafkaConfig;
use crate::source::log::EventLog;
use crate::store::ReadModel;
use crate::store::read_model::Counters;
use crate::store::search::{Indexer, Indexes};

/// A loaded projection, as the API sees it: its live generation, and the
/// one being rebuilt, if any.
pub struct Projection {
    /// Where the plugin came from: its file, or `native`.
    pub source: String,
    /// `projections/<name>/`: where its generations live.
    root: PathBuf,
    live: RwLock<Arc<Generation>>,
    rebuild: Mutex<Option<Arc<Rebuild>>>,
    /// Held while a rebuild starts: two requests at once must not both see
    /// none running and build (then switch to) the same generation.
    starting: Mutex<()>,
    /// Why the last new version of the plugin file was not swapped in.
    pub reload_error: Mutex<Option<String>>,
    /// New versions refused since the start (for `/metrics`).
    pub reload_failures: std::sync::atomic::AtomicU64,
}

impl Projection {
    /// The generation queries are answered from.
    pub fn live(&self) -> Arc<Generation> {
        self.live.read().expect("live lock").clone()
    }

    /// The running version's manifest.
    pub fn manifest(&self) -> Manifest {
        self.live().manifest()
    }

    /// The rebuild in progress, if any.
    pub fn rebuild(&self) -> Option<Arc<Rebuild>> {
        self.rebuild.lock().expect("rebuild lock").clone()
    }
}

/// What a new version of a projection's plugin changes.
enum Change {
    /// The same read-model shape: swap it in between batches.
    Swap,
    /// A new schema-version (described): rebuild with it.
    Rebuild(String),
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
    /// Why the plugin file's newest version is not running, if it is not.
    pub reload_error: Option<String>,
    /// The live generation of the read model.
    pub generation: u64,
    /// A rebuild in progress: progress, rate, time left.
    pub rebuild: Option<RebuildStatus>,
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
    pub kind: Kind,
    pub source: String,
    pub version: String,
    pub schema_version: u32,
    pub subscriptions: Vec<SubscriptionInfo>,
    /// An enricher's output streams (from its routes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
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
    /// The API's bearer tokens.
    pub auth: crate::config::AuthConfig,
    /// The API's body limit and request timeout.
    pub api: crate::config::ApiConfig,
    /// Requests per route, for `/metrics`.
    pub http_metrics: crate::telemetry::HttpMetrics,
    plugins_dir: PathBuf,
    /// `plugins.<name>` of the config: settings, routes and limits.
    plugin_config: BTreeMap<String, PluginConfig>,
    /// The global `limits`, which `plugins.<name>.limits` override.
    limits: LimitsConfig,
    /// Checks uploaded plugins (set by [`Runtime::start`]).
    loader: OnceLock<Arc<Loader>>,
    /// Each plugin file as last loaded, so the watcher sees what changed.
    plugin_stamps: Mutex<BTreeMap<PathBuf, Stamp>>,
    data_dir: PathBuf,
    batch: BatchOptions,
    index_commit_interval: Duration,
    /// `storage.cache-mb`, for each read model opened.
    read_model_cache_bytes: usize,
    projections: RwLock<BTreeMap<String, Arc<Projection>>>,
    plugin_errors: Mutex<Vec<PluginError>>,
    stop: Arc<AtomicBool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Runtime {
    /// Open the data directory, start every plugin in the plugins directory,
    /// and watch the directory for new versions and new plugins.
    pub fn start(config: &Config) -> anyhow::Result<Arc<Runtime>> {
        let runtime = Arc::new(Runtime::open(config)?);
        let lookup = Arc::new(RuntimeLookup(Arc::downgrade(&runtime)));
        let loader = Arc::new(Loader::new(config, lookup)?);
        let _ = runtime.loader.set(loader.clone());
        let watcher = Watcher { loader, dir: config.plugins_dir.clone() };
        let mut handlers: Vec<(Box<dyn Handler>, String)> = Vec::new();
        for file in plugin_files(&config.plugins_dir)? {
            let label = file.display().to_string();
            runtime.plugin_stamps.lock().expect("stamps lock").insert(file.clone(), Watcher::stamp(&file));
            match watcher.loader.load(&file) {
                Ok(p) if handlers.iter().any(|(h, _)| h.manifest().name == p.manifest().name) => {
                    let error = format!("another plugin already provides projection {:?}", p.manifest().name);
                    runtime.plugin_error(label, error);
                }
                Ok(p) => {
                    tracing::info!(plugin = %label, projection = %p.manifest().name, version = %p.manifest().version, "plugin loaded");
                    handlers.push((Box::new(p), label));
                }
                Err(error) => runtime.plugin_error(label, error),
            }
        }
        for (handler, source) in handlers {
            // A plugin whose read model cannot be opened (an invalid index
            // mapping, a mapping changed under an existing index) is reported
            // like a plugin that does not load; the others run.
            if let Err(e) = runtime.add(handler, source.clone()) {
                runtime.plugin_error(source, format!("{e:#}"));
            }
        }
        let watching = runtime.clone();
        let thread = std::thread::Builder::new()
            .name("plugin-watcher".into())
            .spawn(move || watcher.run(&watching))
            .context("spawning the plugin watcher")?;
        runtime.workers.lock().expect("workers lock").push(thread);
        Ok(runtime)
    }

    /// Check an uploaded plugin (compile, instantiate, describe) and decide
    /// what it changes (see [`Runtime::deploy`]); only then install it as
    /// `<plugins-dir>/<name>.wasm` and put it to work. A version the runtime
    /// would not run is refused before it is written: the file on disk stays
    /// the one running. Returns its manifest.
    pub fn install_plugin(self: &Arc<Self>, name: &str, bytes: &[u8]) -> Result<Manifest, InstallError> {
        crate::names::validate("plugin", name).map_err(InstallError::Refused)?;
        let loader = self.loader.get().ok_or(InstallError::Refused("this runtime does not load plugins".into()))?;
        let file = self.plugins_dir.join(format!("{name}.wasm"));
        let label = file.display().to_string();
        let owner = self.projections().into_iter().find(|p| p.source == label);
        let refuse = |error: String| {
            if let Some(p) = &owner {
                *p.reload_error.lock().expect("reload error lock") = Some(format!("upload refused: {error}"));
                p.reload_failures.fetch_add(1, Ordering::Relaxed);
            }
            InstallError::Refused(error)
        };
        let plugin = loader
            .load_bytes(bytes, &label)
            .and_then(|plugin| {
                crate::plugin::validate_manifest(plugin.manifest())?;
                crate::plugin::declared(&plugin)?;
                Ok(plugin)
            })
            .map_err(refuse)?;
        let manifest = plugin.manifest().clone();
        if let Some(other) = self.projection(&manifest.name).filter(|p| p.source != label) {
            return Err(InstallError::Refused(format!(
                "projection {:?} is provided by {}; upload it under that name",
                manifest.name, other.source
            )));
        }
        let write = || -> Result<(), InstallError> {
            let failed = |what: String| move |e: std::io::Error| InstallError::Storage(format!("{what}: {e}"));
            std::fs::create_dir_all(&self.plugins_dir).map_err(failed("creating the plugins directory".into()))?;
            // Durably: after a power cut the plugins directory must hold the old
            // version or the new one, not a truncated file that no longer loads.
            crate::data_dir::replace_durably(&file, bytes).map_err(failed(format!("writing {}", file.display())))?;
            // The watcher need not load it again.
            self.plugin_stamps.lock().expect("stamps lock").insert(file.clone(), Watcher::stamp(&file));
            tracing::info!(plugin = %label, projection = %manifest.name, version = %manifest.version, "plugin uploaded");
            Ok(())
        };
        match &owner {
            Some(projection) => {
                let _starting = projection.starting.lock().expect("starting lock");
                let change = self.plan(projection, &plugin).map_err(refuse)?;
                write()?;
                self.apply(projection, &file, plugin, change);
            }
            None => {
                write()?;
                self.deploy(&file, Ok(plugin));
            }
        }
        Ok(manifest)
    }

    /// Put the plugin loaded from `file` (by the plugins-directory watcher)
    /// to work: swap it into the projection that file provides (between
    /// batches), start a rebuild if its schema-version changed, or start a
    /// new projection. A version that cannot run is reported in the
    /// projection's `reloadError`, and the running one stays.
    fn deploy(self: &Arc<Self>, file: &Path, loaded: Result<WasmPlugin, String>) {
        let label = file.display().to_string();
        let owner = self.projections().into_iter().find(|p| p.source == label);
        let Some(projection) = owner else {
            // A new plugin file: a new projection, without a restart.
            match loaded {
                Ok(p) => {
                    let name = p.manifest().name.clone();
                    match self.add(Box::new(p), label.clone()) {
                        Ok(_) => {
                            tracing::info!(plugin = %label, projection = %name, "new plugin loaded");
                            self.plugin_errors.lock().expect("plugin errors lock").retain(|e| e.file != label);
                        }
                        Err(e) => self.plugin_error(label, format!("{e:#}")),
                    }
                }
                Err(error) => self.plugin_error(label, error),
            }
            return;
        };
        let _starting = projection.starting.lock().expect("starting lock");
        let planned = loaded.and_then(|next| self.plan(&projection, &next).map(|change| (next, change)));
        match planned {
            Ok((next, change)) => self.apply(&projection, file, next, change),
            Err(error) => {
                tracing::error!(plugin = %label, %error, "new plugin version not swapped in; the running one stays");
                projection.reload_failures.fetch_add(1, Ordering::Relaxed);
                *projection.reload_error.lock().expect("reload error lock") = Some(error);
            }
        }
    }

    /// What a new version `next` of `projection`'s plugin changes, or why it
    /// cannot run. Called with the projection's `starting` lock held.
    fn plan(&self, projection: &Projection, next: &WasmPlugin) -> Result<Change, String> {
        let current = projection.manifest();
        let live = projection.live();
        if next.manifest().name != current.name {
            return Err(format!("the file now provides projection {:?}, not {:?}", next.manifest().name, current.name));
        }
        if next.kind() != live.kind {
            return Err(format!(
                "the file now provides {:?} as {:?}, not {:?}: remove it and add it again",
                current.name,
                next.kind(),
                live.kind
            ));
        }
        if next.manifest().schema_version != current.schema_version {
            let change = format!("schema-version {} → {}", current.schema_version, next.manifest().schema_version);
            if let Some(r) = projection.rebuild() {
                return Err(format!(
                    "{change} needs a rebuild, and the rebuild to generation {} is still running: wait for it or cancel it",
                    r.generation.number
                ));
            }
            return Ok(Change::Rebuild(change));
        }
        let old: Vec<&IndexMapping> = live.indexes.open.values().map(|i| &i.schema.mapping).collect();
        if let Some(change) = crate::store::search::mapping_change(&old, next.indexes()) {
            return Err(format!(
                "{change}: the indexes are built with the old mapping; declare a new schema-version to rebuild them"
            ));
        }
        Ok(Change::Swap)
    }

    /// Carry out a planned change with `next`, loaded from `file`. Called
    /// with the projection's `starting` lock held.
    fn apply(&self, projection: &Arc<Projection>, file: &Path, next: WasmPlugin, change: Change) {
        let label = file.display().to_string();
        let name = next.manifest().name.clone();
        let outcome = match change {
            Change::Rebuild(change) => match self.start_rebuild_locked(projection, Some(Box::new(next))) {
                Ok(generation) => {
                    tracing::info!(plugin = %label, %change, generation, "new schema-version: rebuilding");
                    None
                }
                Err(e) => Some(format!("{change} needs a rebuild, which did not start: {e}")),
            },
            Change::Swap => {
                tracing::info!(plugin = %label, version = %next.manifest().version, "new plugin version loaded; swapping it in");
                projection.live().control.swap(Box::new(next));
                // A rebuild in progress switches to its generation later: it
                // must run this version too, or the switch would drop it.
                match projection.rebuild() {
                    None => None,
                    Some(rebuild) => match self.loader.get().map(|l| l.load(file)) {
                        Some(Ok(again)) => {
                            rebuild.generation.control.swap(Box::new(again));
                            None
                        }
                        Some(Err(e)) => Some(format!("the rebuilding generation keeps its version: {e}")),
                        None => None,
                    },
                }
            }
        };
        if let Some(error) = &outcome {
            tracing::error!(plugin = %label, projection = %name, %error, "new plugin version not deployed");
            projection.reload_failures.fetch_add(1, Ordering::Relaxed);
        }
        *projection.reload_error.lock().expect("reload error lock") = outcome;
    }

    fn plugin_error(&self, file: String, error: String) {
        tracing::error!(plugin = %file, %error, "plugin not loaded");
        let mut errors = self.plugin_errors.lock().expect("plugin errors lock");
        errors.retain(|e| e.file != file);
        errors.push(PluginError { file, error });
    }

    /// Open the data directory with no projections yet (see [`Runtime::add`]).
    pub fn open(config: &Config) -> anyhow::Result<Runtime> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
        crate::data_dir::check(&config.data_dir)?;
        let log_path = config.data_dir.join("log.redb");
        let log = EventLog::open(&log_path, config.log_options())
            .with_context(|| format!("opening the event log {}", log_path.display()))?;
        Ok(Runtime {
            log: Arc::new(log),
            kafka: Arc::new(config.kafka.clone()),
            auth: config.auth.resolved(),
            api: config.api.clone(),
            http_metrics: Default::default(),
            plugins_dir: config.plugins_dir.clone(),
            plugin_config: config.plugins.clone(),
            limits: config.limits.clone(),
            loader: OnceLock::new(),
            plugin_stamps: Mutex::new(BTreeMap::new()),
            data_dir: config.data_dir.clone(),
            batch: config.batch_options(),
            index_commit_interval: Duration::from_millis(config.search.commit_interval_ms),
            read_model_cache_bytes: config.storage.cache_bytes(),
            projections: RwLock::new(BTreeMap::new()),
            plugin_errors: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            workers: Mutex::new(Vec::new()),
        })
    }

    /// Start a worker for `handler`, resuming from its read model's
    /// checkpoints (and a rebuild that was in progress, when its plugin can
    /// be loaded again).
    pub fn add(&self, handler: Box<dyn Handler>, source: String) -> anyhow::Result<Arc<Projection>> {
        let manifest = handler.manifest().clone();
        crate::plugin::validate_manifest(&manifest).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.projection(&manifest.name).is_none(), "projection {:?} is already running", manifest.name);
        let root = self.data_dir.join("projections").join(&manifest.name);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let generations = || -> std::io::Result<(u64, Option<u64>)> {
            generation::clean(&root)?;
            generation::numbers(&root)
        };
        let (live, rebuilding) =
            generations().with_context(|| format!("finding the generations of {}", manifest.name))?;
        let live = self.start_generation(handler, &root, live, false)?;
        let projection = Arc::new(Projection {
            source,
            root: root.clone(),
            live: RwLock::new(live),
            rebuild: Mutex::new(None),
            starting: Mutex::new(()),
            reload_error: Mutex::new(None),
            reload_failures: Default::default(),
        });
        let mut projections = self.projections.write().expect("projections lock");
        if projections.contains_key(&manifest.name) {
            projection.live().stop();
            anyhow::bail!("projection {:?} is already running", manifest.name);
        }
        projections.insert(manifest.name.clone(), projection.clone());
        drop(projections);
        if let Some(number) = rebuilding {
            match self.loader.get().map(|l| l.load(Path::new(&projection.source))) {
                Some(Ok(handler)) => {
                    tracing::info!(projection = %manifest.name, generation = number, "resuming a rebuild");
                    if let Err(e) = self.start_rebuild(&projection, Box::new(handler), number) {
                        tracing::error!(projection = %manifest.name, error = %e, "resuming a rebuild failed");
                    }
                }
                _ => {
                    tracing::warn!(projection = %manifest.name, "cannot load the plugin again; dropping the unfinished rebuild");
                    generation::delete(&root, number);
                    if let Err(e) = generation::clean(&root) {
                        tracing::warn!(projection = %manifest.name, error = %e, "cleaning old generations");
                    }
                }
            }
        }
        Ok(projection)
    }

    /// Open generation `number` of the projection in `root` and start its
    /// worker, indexer and relay.
    fn start_generation(
        &self,
        handler: Box<dyn Handler>,
        root: &Path,
        number: u64,
        replaying: bool,
    ) -> anyhow::Result<Arc<Generation>> {
        let manifest = handler.manifest().clone();
        let kind = handler.kind();
        let dir = generation::dir(root, number);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("read-model.redb");
        let read_model = Arc::new(
            ReadModel::open_with_cache(&path, self.read_model_cache_bytes)
                .with_context(|| format!("opening the read model {}", path.display()))?,
        );
        let declared = crate::plugin::declared(&*handler).map_err(anyhow::Error::msg)?;
        let indexes = Arc::new(
            Indexes::open(&dir.join("indexes"), &declared.indexes)
                .with_context(|| format!("opening the search indexes of {}", manifest.name))?,
        );
        let status = Arc::new(Mutex::new(WorkerStatus::default()));
        let sources = Sources { log: self.log.clone(), kafka: self.kafka.clone() };
        let stop = Arc::new(AtomicBool::new(false));
        let mut options = self.batch.clone();
        let own = self.plugin_config.get(&manifest.name).map(|p| &p.limits);
        options.kv = resolve_limits(&self.limits, own).1;
        options.kv.max_event_bytes = self.log.max_event_bytes();
        options.pause_after_dead_letters = resolve_pause(&self.limits, own);
        let mut projector =
            Projector::new(handler, read_model.clone(), sources, options, status.clone(), stop.clone())?;
        projector.set_replaying(replaying);
        let generation = Arc::new(Generation {
            number,
            kind,
            manifest: projector.manifest(),
            control: projector.control(),
            replay: projector.replay(),
            read_model: read_model.clone(),
            indexes: indexes.clone(),
            status,
            watermarks: projector.watermarks(),
            stop: stop.clone(),
            threads: Mutex::new(Vec::new()),
        });
        let label = if number == 0 { manifest.name.clone() } else { format!("{}.{number}", manifest.name) };
        let mut threads = generation.threads.lock().expect("threads lock");
        threads.push(
            std::thread::Builder::new()
                .name(format!("projector-{label}"))
                .spawn(move || projector.run())
                .context("spawning a projector thread")?,
        );
        let relay = crate::sink::Relay::new(
            &manifest.name,
            number,
            read_model.clone(),
            self.log.clone(),
            self.kafka.clone(),
            stop.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("relay-{label}"))
                .spawn(move || relay.run())
                .context("spawning a relay thread")?,
        );
        if !indexes.open.is_empty() {
            let indexer = Indexer::new(read_model, indexes, self.index_commit_interval, stop);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("indexer-{label}"))
                    .spawn(move || indexer.run())
                    .context("spawning an indexer thread")?,
            );
        }
        drop(threads);
        Ok(generation)
    }

    /// Rebuild the projection `name` from the beginning of its streams into a
    /// new generation, with `handler` (default: its plugin file loaded
    /// again), while the live generation keeps serving. Returns the new
    /// generation's number.
    pub fn rebuild(&self, name: &str, handler: Option<Box<dyn Handler>>) -> Result<u64, RebuildError> {
        let p = self.projection(name).ok_or(RebuildError::NotFound)?;
        let _starting = p.starting.lock().expect("starting lock");
        self.start_rebuild_locked(&p, handler)
    }

    /// [`Runtime::rebuild`], with `p`'s `starting` lock held.
    fn start_rebuild_locked(
        &self,
        p: &Arc<Projection>,
        handler: Option<Box<dyn Handler>>,
    ) -> Result<u64, RebuildError> {
        if let Some(r) = p.rebuild() {
            return Err(RebuildError::Running(r.generation.number));
        }
        let m = p.manifest();
        if self.kafka.mode == crate::source::kafka::Mode::Group
            && m.subscriptions.iter().any(|s| self.kafka.topic(&s.stream).is_some())
        {
            return Err(RebuildError::Invalid(
                "a projection reading Kafka in group mode holds part of the read model; rebuild it in replica mode"
                    .into(),
            ));
        }
        let handler = match handler {
            Some(h) => h,
            None => {
                let loader = self.loader.get().ok_or_else(|| RebuildError::Invalid("no plugin loader".into()))?;
                Box::new(loader.load(Path::new(&p.source)).map_err(RebuildError::Invalid)?)
            }
        };
        let number = p.live().number + 1;
        generation::delete(&p.root, number);
        generation::mark_rebuilding(&p.root, number).map_err(|e| RebuildError::Invalid(e.to_string()))?;
        self.start_rebuild(p, handler, number).map_err(|e| RebuildError::Invalid(format!("{e:#}")))?;
        tracing::info!(projection = %m.name, generation = number, "rebuild started");
        Ok(number)
    }

    /// Stop the rebuild of `name` and delete what it built.
    pub fn cancel_rebuild(&self, name: &str) -> Result<u64, RebuildError> {
        let p = self.projection(name).ok_or(RebuildError::NotFound)?;
        let job = p.rebuild().ok_or(RebuildError::NotRunning)?;
        if job.switching.load(Ordering::Relaxed) {
            return Err(RebuildError::Switching(job.generation.number));
        }
        job.cancel.store(true, Ordering::Relaxed);
        Ok(job.generation.number)
    }

    fn start_rebuild(&self, p: &Arc<Projection>, handler: Box<dyn Handler>, number: u64) -> anyhow::Result<()> {
        let generation = self.start_generation(handler, &p.root, number, true)?;
        let job = Arc::new(Rebuild::new(generation)?);
        *p.rebuild.lock().expect("rebuild lock") = Some(job.clone());
        let (p, log, kafka, shutdown) = (p.clone(), self.log.clone(), self.kafka.clone(), self.stop.clone());
        let name = p.manifest().name;
        let thread = std::thread::Builder::new()
            .name(format!("rebuild-{name}"))
            .spawn(move || {
                let switch = generation::Switch {
                    name: &name,
                    root: &p.root,
                    live: &p.live,
                    rebuild: &p.rebuild,
                    starting: &p.starting,
                    log: &log,
                    kafka: &kafka,
                    shutdown: &shutdown,
                };
                generation::monitor(switch, job);
            })
            .context("spawning a rebuild monitor")?;
        self.workers.lock().expect("workers lock").push(thread);
        Ok(())
    }

    /// Stop the projection `name` after its current batch and forget it; its
    /// data stays on disk, and adding it again resumes from its checkpoints.
    pub fn remove(&self, name: &str) -> Option<Arc<Projection>> {
        let projection = self.projections.write().expect("projections lock").remove(name)?;
        if let Some(job) = projection.rebuild() {
            // Stopped where it is; it resumes when the projection is added again.
            job.generation.stop();
        }
        projection.live().stop();
        tracing::info!(projection = %name, "projection stopped; its data is kept");
        Some(projection)
    }

    /// The projection called `name`.
    pub fn projection(&self, name: &str) -> Option<Arc<Projection>> {
        self.projections.read().expect("projections lock").get(name).cloned()
    }

    /// Every projection, by name.
    /// Compile-cache (hits, misses) since the start; none for a runtime
    /// that loads no plugin files.
    pub fn compile_cache_lookups(&self) -> (u64, u64) {
        self.loader.get().map_or((0, 0), |l| l.cache.counters().get())
    }

    pub fn projections(&self) -> Vec<Arc<Projection>> {
        self.projections.read().expect("projections lock").values().cloned().collect()
    }

    /// Plugin files that failed to load.
    pub fn plugin_errors(&self) -> Vec<PluginError> {
        self.plugin_errors.lock().expect("plugin errors lock").clone()
    }

    /// The status of `projection`: checkpoints against the log's heads, counters, errors.
    pub fn status(&self, p: &Projection) -> crate::store::Result<ProjectionStatus> {
        let projection = p.live();
        let m = &projection.manifest();
        let checkpoints = projection.read_model.cursor()?;
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
                kind: projection.kind,
                outputs: match projection.kind {
                    Kind::Projection => Vec::new(),
                    Kind::Enricher => {
                        let routes = self.plugin_config.get(&m.name).map(|c| c.routes.as_slice()).unwrap_or_default();
                        let routes = Routes::new(&m.name, routes).unwrap_or_else(|_| Routes::to_own_stream(&m.name));
                        routes.streams().into_iter().map(str::to_owned).collect()
                    }
                },
                source: p.source.clone(),
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
            reload_error: p.reload_error.lock().expect("reload error lock").clone(),
            generation: projection.number,
            rebuild: p.rebuild().map(|r| r.status(&projection)).transpose()?,
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
        let names: Vec<String> = self.projections.read().expect("projections lock").keys().cloned().collect();
        for p in self.projections() {
            p.live().stop.store(true, Ordering::Relaxed);
        }
        for name in names {
            self.remove(&name);
        }
    }
}

/// Why a rebuild could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("no such projection")]
    NotFound,
    #[error("generation {0} is already being rebuilt")]
    Running(u64),
    #[error("no rebuild is running")]
    NotRunning,
    #[error("generation {0} is taking over from the live one; the switch completes")]
    Switching(u64),
    #[error("{0}")]
    Invalid(String),
}

/// Serves plugins' `lookup` calls from the live generations of the runtime's projections.
struct RuntimeLookup(std::sync::Weak<Runtime>);

impl Lookup for RuntimeLookup {
    fn get(&self, projection: &str, table: &str, key: &str) -> Result<Result<Option<Vec<u8>>, LookupError>, String> {
        let runtime = self.0.upgrade().ok_or("the runtime is shutting down")?;
        let Some(p) = runtime.projection(projection) else {
            return Ok(Err(LookupError::UnknownProjection(format!("no projection {projection:?} is running"))));
        };
        let live = p.live();
        if !live.manifest.read().expect("manifest lock").tables.iter().any(|t| t == table) {
            return Ok(Err(LookupError::UnknownTable(format!("{projection} declares no table {table:?}"))));
        }
        live.read_model.get(table, key).map(Ok).map_err(|e| format!("lookup in {projection}/{table}: {e}"))
    }
}

/// Compiles and instantiates plugin files (through the compile cache), and
/// gives each its environment and routes from `plugins.<name>` in the config.
struct Loader {
    engine: wasmtime::Engine,
    cache: CompileCache,
    linker: wasmtime::component::Linker<crate::plugin::host::HostState>,
    limits: LimitsConfig,
    lookup: Arc<dyn Lookup>,
    plugins: BTreeMap<String, PluginConfig>,
}

impl Loader {
    fn new(config: &Config, lookup: Arc<dyn Lookup>) -> anyhow::Result<Self> {
        let engine = engine::new_engine().map_err(|e| anyhow::anyhow!("creating the wasm engine: {e}"))?;
        let cache = CompileCache::new(&config.data_dir.join("cache").join("compiled"), &engine)
            .context("creating the compile cache")?;
        let linker = wasm::linker(&engine).map_err(|e| anyhow::anyhow!("linking host interfaces: {e}"))?;
        Ok(Loader { engine, cache, linker, limits: config.limits.clone(), lookup, plugins: config.plugins.clone() })
    }

    /// Compile, instantiate and describe the plugin in `file`.
    fn load(&self, file: &Path) -> Result<WasmPlugin, String> {
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read: {e}"))?;
        self.load_bytes(&bytes, &file.display().to_string())
    }

    /// Compile, instantiate and describe the plugin in `bytes`.
    fn load_bytes(&self, bytes: &[u8], label: &str) -> Result<WasmPlugin, String> {
        let (component, _) =
            self.cache.load(bytes).map_err(|e| wasm::LoadError::Compile(format!("{e:#}")).to_string())?;
        // Loaded under the global limits; its own apply once its name is known.
        let global = resolve_limits(&self.limits, None).0;
        let mut plugin =
            WasmPlugin::load(&self.engine, &self.linker, &component, label, global).map_err(|e| e.to_string())?;
        let config = self.plugins.get(&plugin.manifest().name).cloned().unwrap_or_default();
        let settings = config.settings_text()?;
        let env = Environment { lookup: self.lookup.clone(), settings: Arc::new(settings) };
        plugin.configure(env, &config.routes, resolve_limits(&self.limits, Some(&config.limits)).0)?;
        Ok(plugin)
    }
}

/// Whether a notification is a change: reads (this watcher loading a file)
/// are not, a write that ends is.
fn is_change(kind: notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(access) => access == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

/// Why an upload was not installed. Nothing was written either way.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The plugin: it does not load, or its projection would not run it.
    #[error("{0}")]
    Refused(String),
    /// The server could not write it (a full disk, an I/O error): the same
    /// upload may succeed later.
    #[error("{0}")]
    Storage(String),
}

/// What the watcher compares to see that a file changed: its inode, length,
/// and modification and change times. The times alone are not enough: a
/// file system stamps them with a coarse clock (ext4: a few milliseconds),
/// so a build of the same length moved in right after another would look
/// unchanged; a moved-in file has a new inode.
type Stamp = Option<(u64, u64, std::time::SystemTime, (i64, i64))>;

/// Watches the plugins directory: a changed file is loaded off the hot path
/// and, if it loads and describes itself, handed to its projection's worker
/// to swap in between batches; a new file starts a new projection.
///
/// The operating system says when the directory changes (inotify, through
/// `notify`), and the directory is also scanned every second: a directory
/// created after the start, or a file system that sends no notifications
/// (NFS), is still seen.
struct Watcher {
    loader: Arc<Loader>,
    dir: PathBuf,
}

/// How often the plugins directory is scanned without a notification.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// After a notification, how long the directory must stay quiet before it
/// is scanned: a file moved in sends one, a file being copied in many.
const SETTLE: Duration = Duration::from_millis(20);

impl Watcher {
    fn stamp(file: &Path) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(file).ok()?;
        Some((m.ino(), m.len(), m.modified().ok()?, (m.ctime(), m.ctime_nsec())))
    }

    fn run(self, runtime: &Arc<Runtime>) {
        let (tx, changes) = std::sync::mpsc::channel::<()>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| is_change(e.kind)) {
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| notify::Watcher::watch(&mut w, &self.dir, notify::RecursiveMode::NonRecursive).map(|()| w));
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "no change notifications for the plugins directory; scanning it every second");
                None
            }
        };
        while !runtime.stop.load(Ordering::Relaxed) {
            match changes.recv_timeout(RESCAN_INTERVAL) {
                Ok(()) => {
                    let until = Instant::now() + RESCAN_INTERVAL;
                    while changes.recv_timeout(SETTLE).is_ok() && Instant::now() < until {}
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(RESCAN_INTERVAL),
            }
            if !runtime.stop.load(Ordering::Relaxed) {
                self.scan(runtime);
            }
        }
    }

    /// Load what changed in the directory since the last scan, and stop the
    /// projections whose file is gone.
    fn scan(&self, runtime: &Arc<Runtime>) {
        if !self.dir.is_dir() {
            return;
        }
        let files = match plugin_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading the plugins directory");
                return;
            }
        };
        let gone: Vec<PathBuf> = {
            let mut stamps = runtime.plugin_stamps.lock().expect("stamps lock");
            let gone: Vec<PathBuf> = stamps.keys().filter(|f| !files.contains(f)).cloned().collect();
            for file in &gone {
                stamps.remove(file);
            }
            gone
        };
        for file in gone {
            let label = file.display().to_string();
            if let Some(p) = runtime.projections().into_iter().find(|p| p.source == label) {
                tracing::info!(plugin = %label, projection = %p.manifest().name, "plugin file removed; stopping its projection");
                runtime.remove(&p.manifest().name);
            }
            runtime.plugin_errors.lock().expect("plugin errors lock").retain(|e| e.file != label);
        }
        for file in files {
            let stamp = Self::stamp(&file);
            let mut stamps = runtime.plugin_stamps.lock().expect("stamps lock");
            if stamps.get(&file) == Some(&stamp) {
                continue;
            }
            stamps.insert(file.clone(), stamp);
            drop(stamps);
            self.changed(runtime, &file);
        }
    }

    fn changed(&self, runtime: &Arc<Runtime>, file: &Path) {
        runtime.deploy(file, self.loader.load(file));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A build of the same length moved in within the file system's
    /// timestamp tick (the same modification time) is still a change.
    #[test]
    fn a_file_moved_in_with_the_same_length_and_time_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let (live, staged) = (dir.path().join("p.wasm"), dir.path().join("p.wasm.new"));
        std::fs::write(&live, b"version 1").unwrap();
        let before = Watcher::stamp(&live);
        let modified = std::fs::metadata(&live).unwrap().modified().unwrap();
        std::fs::write(&staged, b"version 2").unwrap();
        std::fs::File::options().write(true).open(&staged).unwrap().set_modified(modified).unwrap();
        std::fs::rename(&staged, &live).unwrap();
        let after = Watcher::stamp(&live);
        assert_eq!(std::fs::metadata(&live).unwrap().modified().unwrap(), modified);
        assert_ne!(before, after);
        assert_eq!(after, Watcher::stamp(&live), "an unchanged file keeps its stamp");
    }
}
