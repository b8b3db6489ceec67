//! The running system: the log, the loaded projections and their workers.
//!
//! This file owns the projections (start, add, rebuild, remove, shutdown).
//! New plugin versions go through `deploy`, found by `watcher` or
//! uploaded; `status` is what the status API shows; `lookup` serves
//! plugins' reads of other projections.

mod activity;
mod cluster_rebuild;
mod components;
mod deploy;
mod lookup;
mod preview;
mod projection;
mod shard_count;
mod status;
mod watcher;

pub use activity::Membership;
pub use components::Reproduced;
pub use deploy::{InstallError, PluginError};
pub use preview::{IndexCount, MAX_SAMPLES, PreviewDiff};
pub use projection::{DEAD_LETTER_SHARD_BITS, Projection, Shard};
pub use status::{
    EmitStatus, IndexStatus, PartitionStatus, PluginInfo, ProjectionStatus, ShardRebuild, ShardRole, ShardStatus,
    SubscriptionInfo,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use deploy::Loader;
use lookup::RuntimeLookup;
use shard_count::{ShardCount, Waits};
use watcher::{Stamp, Watcher, plugin_files};

use crate::config::{Config, LimitsConfig, PluginConfig, resolve_limits, resolve_pause};
use crate::generation::{self, Generation};
use crate::plugin::Handler;
use crate::projector::{BatchOptions, Projector, Replay, WorkerStatus};
use crate::rebuild::{self, Rebuild};
use crate::sink::handover::{Handover, Publications};
use crate::source::Sources;
use crate::source::kafka::KafkaConfig;
use crate::source::log::EventLog;
use crate::store::ReadModel;
use crate::store::search::{Indexer, Indexes};

/// The runtime: owns the log and one worker thread per projection.
pub struct Runtime {
    pub log: Arc<EventLog>,
    pub kafka: Arc<KafkaConfig>,
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
    /// `changes`: how long each read model's change log keeps changes.
    changes: crate::store::changes::ChangeRetention,
    projections: RwLock<BTreeMap<String, Arc<Projection>>>,
    plugin_errors: Mutex<Vec<PluginError>>,
    /// Plugins waiting for their brokers to say how many shards they have;
    /// held while a projection is added, so that adds and waits ending go
    /// one at a time.
    waits: Mutex<Waits>,
    stop: Arc<AtomicBool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// In a cluster, a consumer group decides which shards of a partitioned
    /// projection this instance runs (`activity`); otherwise it runs all.
    shards_by_group: bool,
    /// This runtime, for the threads that take shards on (set by [`Runtime::start`]).
    me: OnceLock<std::sync::Weak<Runtime>>,
    /// The cluster's members, to choose standbys (set once it has joined).
    membership: OnceLock<Arc<dyn activity::Membership>>,
    /// Where shards record what they published, for their next owners
    /// (the same control topic; set once it has joined).
    publications: Arc<OnceLock<Arc<dyn Publications>>>,
    /// Notified when this instance takes a shard on or lets one go, so that
    /// it announces the change at once.
    pub roles_changed: crate::signal::Signal,
}

impl Runtime {
    /// Open the data directory, start every plugin in the plugins directory,
    /// and watch the directory for new versions and new plugins.
    pub fn start(config: &Config) -> anyhow::Result<Arc<Runtime>> {
        let runtime = Arc::new(Runtime::open(config)?);
        let _ = runtime.me.set(Arc::downgrade(&runtime));
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
        // Components only dead letters of the past needed: not kept forever.
        let sweeping = runtime.clone();
        std::thread::Builder::new()
            .name("component-sweep".into())
            .spawn(move || sweeping.sweep_components())
            .context("spawning the component sweep")?;
        let watching = runtime.clone();
        let thread = std::thread::Builder::new()
            .name("plugin-watcher".into())
            .spawn(move || watcher.run(&watching))
            .context("spawning the plugin watcher")?;
        runtime.workers.lock().expect("workers lock").push(thread);
        Ok(runtime)
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
            plugins_dir: config.plugins_dir.clone(),
            plugin_config: config.plugins.clone(),
            limits: config.limits.clone(),
            loader: OnceLock::new(),
            plugin_stamps: Mutex::new(BTreeMap::new()),
            data_dir: config.data_dir.clone(),
            batch: config.batch_options(),
            index_commit_interval: Duration::from_millis(config.search.commit_interval_ms),
            read_model_cache_bytes: config.storage.cache_bytes(),
            changes: config.changes.retention(),
            projections: RwLock::new(BTreeMap::new()),
            plugin_errors: Mutex::new(Vec::new()),
            waits: Mutex::default(),
            stop: Arc::new(AtomicBool::new(false)),
            workers: Mutex::new(Vec::new()),
            shards_by_group: config.cluster.is_some() && config.kafka.mode == crate::source::kafka::Mode::Partitioned,
            me: OnceLock::new(),
            membership: OnceLock::new(),
            publications: Arc::default(),
            roles_changed: Default::default(),
        })
    }

    /// Start a worker for `handler` (one per shard of a partitioned
    /// projection), resuming from its read model's checkpoints (and a
    /// rebuild that was in progress, when its plugin can be loaded again).
    /// `None` when it waits for its brokers to say how many shards it has:
    /// it starts by itself once they do (`shard_count`).
    pub fn add(&self, handler: Box<dyn Handler>, source: String) -> anyhow::Result<Option<Arc<Projection>>> {
        let mut waits = self.waits.lock().expect("waits lock");
        self.add_locked(&mut waits, handler, source)
    }

    /// [`Runtime::add`], with the waits' lock held.
    fn add_locked(
        &self,
        waits: &mut Waits,
        handler: Box<dyn Handler>,
        source: String,
    ) -> anyhow::Result<Option<Arc<Projection>>> {
        // This load of `source` supersedes an earlier one still waiting.
        waits.end(&source);
        let manifest = handler.manifest().clone();
        crate::plugin::validate_manifest(&manifest).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.projection(&manifest.name).is_none(), "projection {:?} is already running", manifest.name);
        let root = self.data_dir.join("projections").join(&manifest.name);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        // In a cluster, a consumer group hands a partitioned projection's shards to this instance (`activity`).
        let by_group = self.shards_by_group && self.me.get().is_some();
        let count = match self.shard_count(&manifest, &root)? {
            ShardCount::NotYet(why) => {
                self.wait_for_shard_count(waits, handler, source, why)?;
                return Ok(None);
            }
            ShardCount::Whole => None,
            ShardCount::Shards(n) => Some(n),
        };
        let (projection, rebuilding) = match count {
            None => {
                let (shard, rebuilding) = self.start_shard(handler, None, &root, Replay::Live)?;
                (Projection::new(source, 1, false, vec![Arc::new(shard)], None), rebuilding)
            }
            Some(count) => {
                // Every shard runs its own instance of the plugin, made from
                // `handler`, which stays to make those of shards taken on later.
                let (mut shards, mut rebuilding) = (Vec::new(), None);
                for n in (0..count).filter(|_| !by_group) {
                    let root = projection::shard_root(&root, n);
                    match another(&*handler, &source).and_then(|h| self.start_shard(h, Some(n), &root, Replay::Live)) {
                        Ok((shard, number)) => {
                            shards.push(Arc::new(shard));
                            rebuilding = rebuilding.max(number);
                        }
                        Err(e) => {
                            for started in shards {
                                started.live().stop();
                            }
                            return Err(e);
                        }
                    }
                }
                if by_group {
                    another(&*handler, &source)?;
                    tracing::info!(projection = %manifest.name, shards = count, "partitioned: the group decides which shards run here");
                } else {
                    tracing::info!(projection = %manifest.name, shards = count, "partitioned: one shard per partition");
                }
                (Projection::new(source, count, true, shards, Some(handler)), rebuilding)
            }
        };
        let projection = Arc::new(projection);
        self.insert(&manifest.name, &projection)?;
        if projection.is_partitioned() && by_group {
            let me = self.me.get().expect("checked above").clone();
            let thread = activity::spawn(me, projection.clone(), &manifest, &self.kafka, self.stop.clone())?;
            self.workers.lock().expect("workers lock").push(thread);
        }
        if let Some(number) = rebuilding {
            self.resume_rebuild(&projection, number);
        }
        if !projection.rebuilds().iter().any(|r| r.is_preview()) {
            self.forget_preview_component(&projection);
        }
        Ok(Some(projection))
    }

    /// Carry on rebuilding `p` into generation `number` after a restart:
    /// every shard not yet switched to it rebuilds (a crash in the middle of
    /// starting or switching a partitioned projection's rebuild leaves
    /// some shards marked and others not, or some switched).
    fn resume_rebuild(&self, p: &Arc<Projection>, number: u64) {
        let name = p.manifest().name;
        let behind: Vec<Arc<Shard>> = p.shards().into_iter().filter(|s| s.live().number < number).collect();
        let barrier = barrier_of(p, &behind);
        // A preview runs the component it was started with, kept beside the
        // shards. A mark that cannot be read counts as a preview: one must
        // never switch by itself.
        let preview = behind.iter().any(|s| generation::is_preview(&s.root, number).unwrap_or(true));
        let component = match preview {
            true => self.preview_component(&name),
            false => PathBuf::from(&p.source),
        };
        let loaded = self.loader.get().map(|l| l.load(&component));
        let handlers = match loaded {
            Some(Ok(handler)) => instances(Box::new(handler), behind.len(), &p.source).ok(),
            _ => None,
        };
        let Some(handlers) = handlers else {
            tracing::warn!(projection = %name, "cannot load the plugin again; dropping the unfinished rebuild");
            if behind.len() < p.shards().len() {
                tracing::error!(projection = %name, generation = number, "some shards switched to the rebuilt generation before the crash and the others cannot follow: queries merging shards answer 503 until the projection is rebuilt");
            }
            for shard in &behind {
                generation::abandon_rebuild(&shard.root, number);
                if let Err(e) = generation::clean(&shard.root) {
                    tracing::warn!(projection = %name, error = %e, "cleaning old generations");
                }
            }
            return;
        };
        tracing::info!(projection = %name, generation = number, shards = behind.len(), preview, "resuming a rebuild");
        for (shard, handler) in behind.iter().zip(handlers) {
            if let Err(e) = self.start_rebuild(p, shard, handler, number, barrier.clone(), preview) {
                tracing::error!(projection = %name, shard = shard.number(), error = %e, "resuming a rebuild failed");
            }
        }
    }

    /// Where shard `n` of projection `name` keeps its generations.
    fn shard_root(&self, name: &str, n: u32) -> PathBuf {
        projection::shard_root(&self.data_dir.join("projections").join(name), n)
    }

    /// Make `projection` one of the runtime's, unless one of that name runs already.
    fn insert(&self, name: &str, projection: &Arc<Projection>) -> anyhow::Result<()> {
        let mut projections = self.projections.write().expect("projections lock");
        if projections.contains_key(name) {
            projection.stop();
            anyhow::bail!("projection {name:?} is already running");
        }
        projections.insert(name.to_owned(), projection.clone());
        Ok(())
    }

    /// Run shard `n` of `p` here: the group made this instance active for
    /// it. A standby copy kept here becomes the active one (it starts
    /// emitting); otherwise it starts from its copy on disk (a fresh one
    /// when there is none). Either way it answers queries once it has caught
    /// up to `heads`.
    pub(super) fn take_on(&self, p: &Projection, n: u32, heads: crate::source::reader::Cursor) -> anyhow::Result<()> {
        let _starting = p.starting.lock().expect("starting lock");
        if p.shard_of(n).is_some() {
            return Ok(());
        }
        let name = p.manifest().name;
        let shard = match p.remove_standby(n) {
            Some(standby) => {
                standby.live().set_active(true);
                tracing::info!(projection = %name, shard = n, "shard taken on from its standby copy");
                standby
            }
            None => {
                let root = self.shard_root(&name, n);
                self.align_with_cluster(p, &root)?;
                let handler = p.another_handler().context("no plugin instance to run the shard with")?;
                let (shard, _) = self.start_shard(handler, Some(n), &root, Replay::Live)?;
                tracing::info!(projection = %name, shard = n, "shard taken on; restoring it by replay");
                Arc::new(shard)
            }
        };
        shard.restore_to(heads);
        p.insert_shard(shard);
        self.roles_changed.notify();
        Ok(())
    }

    /// Stop being active for shard `n` of `p` (the group moved it away).
    /// It stays a standby copy (emitting nothing) until the next choice of
    /// standbys says otherwise; its files stay in any case, a copy that
    /// catches up from its checkpoints if it comes back.
    pub(super) fn let_go(&self, p: &Projection, n: u32) {
        let _starting = p.starting.lock().expect("starting lock");
        if let Some(shard) = p.remove_shard(n) {
            shard.live().set_active(false);
            p.insert_standby(shard);
            tracing::info!(projection = %p.manifest().name, shard = n, "shard let go; kept as a standby for now");
            self.roles_changed.notify();
        }
    }

    /// Keep a standby copy of shard `n` of `p` here: the shard's worker
    /// reads and applies its partitions as the active one does, as history
    /// (emitting nothing), and answers no query.
    pub(super) fn keep_standby(&self, p: &Projection, n: u32) -> anyhow::Result<()> {
        let _starting = p.starting.lock().expect("starting lock");
        if p.shard_of(n).is_some() || p.standbys().iter().any(|s| s.number() == n) {
            return Ok(());
        }
        let name = p.manifest().name;
        let root = self.shard_root(&name, n);
        self.align_with_cluster(p, &root)?;
        let handler = p.another_handler().context("no plugin instance to run the standby with")?;
        let (shard, _) = self.start_shard(handler, Some(n), &root, Replay::Standby)?;
        tracing::info!(projection = %name, shard = n, "keeping a standby copy");
        p.insert_standby(Arc::new(shard));
        self.roles_changed.notify();
        Ok(())
    }

    /// Stop keeping a standby copy of shard `n` of `p` (its files stay).
    pub(super) fn drop_standby(&self, p: &Projection, n: u32) {
        let _starting = p.starting.lock().expect("starting lock");
        if let Some(shard) = p.remove_standby(n) {
            shard.live().stop();
            tracing::info!(projection = %p.manifest().name, shard = n, "standby copy stopped");
            self.roles_changed.notify();
        }
    }

    /// How this instance learns the cluster's members, to choose standbys
    /// and hand emitted events over (set once the instance has joined the
    /// cluster).
    pub fn set_membership<M: activity::Membership + Publications + 'static>(&self, membership: Arc<M>) {
        let _ = self.publications.set(membership.clone());
        let _ = self.membership.set(membership);
    }

    /// Start the live generation of the shard in `root` (after cleaning up
    /// what a crash left), and say which generation was being rebuilt.
    fn start_shard(
        &self,
        handler: Box<dyn Handler>,
        partition: Option<u32>,
        root: &Path,
        replay: Replay,
    ) -> anyhow::Result<(Shard, Option<u64>)> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let generations = || -> std::io::Result<(u64, Option<u64>)> {
            generation::clean(root)?;
            generation::numbers(root)
        };
        let name = handler.manifest().name.clone();
        let (live, rebuilding) = generations().with_context(|| format!("finding the generations of {name}"))?;
        let live = self.start_generation(handler, root, partition, live, replay)?;
        Ok((Shard::new(partition, root, live), rebuilding))
    }

    /// Open generation `number` of the shard in `root` and start its
    /// worker, indexer and relay.
    fn start_generation(
        &self,
        handler: Box<dyn Handler>,
        root: &Path,
        partition: Option<u32>,
        number: u64,
        replay: Replay,
    ) -> anyhow::Result<Arc<Generation>> {
        let manifest = handler.manifest().clone();
        let kind = handler.kind();
        let dir = generation::dir(root, number);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("read-model.redb");
        let read_model = Arc::new(
            ReadModel::open_with_cache(&path, self.read_model_cache_bytes)
                .with_context(|| format!("opening the read model {}", path.display()))?
                .with_change_log(self.changes),
        );
        // Only a live generation's commits are changes anyone can subscribe to.
        read_model.record_changes(replay == Replay::Live);
        let declared = crate::plugin::declared(&*handler).map_err(anyhow::Error::msg)?;
        let indexes = Arc::new(
            Indexes::open(&dir.join("indexes"), &declared.indexes)
                .with_context(|| format!("opening the search indexes of {}", manifest.name))?,
        );
        let status = Arc::new(Mutex::new(WorkerStatus::default()));
        let sources = Sources { log: self.log.clone(), kafka: self.kafka.clone(), shard: partition };
        let stop = Arc::new(AtomicBool::new(false));
        let mut options = self.batch.clone();
        let own = self.plugin_config.get(&manifest.name).map(|p| &p.limits);
        options.kv = resolve_limits(&self.limits, own).1;
        options.kv.max_event_bytes = self.log.max_event_bytes();
        options.pause_after_dead_letters = resolve_pause(&self.limits, own);
        // In a cluster, a shard's relay publishes only while its copy is
        // active (a rebuilt generation becomes so at its switch, if the
        // copy is then active).
        let handover = partition
            .filter(|_| self.shards_by_group)
            .map(|n| Arc::new(Handover::new(&manifest.name, n, replay == Replay::Live, self.publications.clone())));
        let mut projector = Projector::new(handler, read_model.clone(), sources, options, status.clone())?;
        projector.set_replay(replay);
        let generation = Arc::new(Generation {
            number,
            kind,
            manifest: projector.manifest(),
            keyed: projector.keyed(),
            control: projector.control(),
            read_model: read_model.clone(),
            indexes: indexes.clone(),
            status,
            watermarks: projector.watermarks(),
            stop: stop.clone(),
            threads: Mutex::new(Vec::new()),
            handover: handover.clone(),
        });
        let label = match partition {
            None => manifest.name.clone(),
            Some(n) => format!("{}#{n}", manifest.name),
        };
        let label = if number == 0 { label } else { format!("{label}.{number}") };
        let mut threads = generation.threads.lock().expect("threads lock");
        threads.push(
            std::thread::Builder::new()
                .name(format!("projector-{label}"))
                .spawn(move || projector.run())
                .context("spawning a projector thread")?,
        );
        let mut relay = crate::sink::Relay::new(
            &manifest.name,
            number,
            read_model.clone(),
            self.log.clone(),
            self.kafka.clone(),
            stop.clone(),
        );
        if let Some(n) = partition {
            relay = relay.for_shard(n, handover);
        }
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
        self.start_rebuild_locked(&p, handler, false)
    }

    /// [`Runtime::rebuild`], with `p`'s `starting` lock held; a `preview`
    /// switches only once promoted.
    fn start_rebuild_locked(
        &self,
        p: &Arc<Projection>,
        handler: Option<Box<dyn Handler>>,
        preview: bool,
    ) -> Result<u64, RebuildError> {
        if p.is_partitioned() && self.shards_by_group {
            if preview {
                return Err(RebuildError::PreviewInCluster);
            }
            return self.ask_cluster_rebuild(p, handler.map(|h| h.manifest().schema_version));
        }
        not_rebuilding(p)?;
        let m = p.manifest();
        let handler = match handler {
            Some(h) => h,
            None => {
                let loader = self.loader.get().ok_or_else(|| RebuildError::Invalid("no plugin loader".into()))?;
                Box::new(loader.load(Path::new(&p.source)).map_err(RebuildError::Invalid)?)
            }
        };
        // Every shard builds the same next generation (they are all at the
        // same one: they switch together), each with its own instance of the plugin.
        let shards = p.shards();
        let number = shards.iter().map(|s| s.live().number).max().unwrap_or(0) + 1;
        let handlers = instances(handler, shards.len(), &p.source).map_err(|e| RebuildError::Invalid(e.to_string()))?;
        let barrier = barrier_of(p, &shards);
        for (shard, handler) in shards.iter().zip(handlers) {
            generation::delete(&shard.root, number);
            if let Err(e) = self.start_rebuild(p, shard, handler, number, barrier.clone(), preview) {
                // All shards or none: those started are cancelled (and delete what they built).
                for job in p.rebuilds() {
                    job.cancel();
                }
                generation::unmark_rebuilding(&shard.root);
                return Err(RebuildError::Invalid(format!("{e:#}")));
            }
        }
        tracing::info!(projection = %m.name, generation = number, shards = shards.len(), preview, "rebuild started");
        Ok(number)
    }

    /// Stop the rebuild of `name` and delete what it built.
    pub fn cancel_rebuild(&self, name: &str) -> Result<u64, RebuildError> {
        let p = self.projection(name).ok_or(RebuildError::NotFound)?;
        if p.is_partitioned() && self.shards_by_group {
            return self.cancel_cluster_rebuild(&p);
        }
        let _starting = p.starting.lock().expect("starting lock");
        let jobs = p.rebuilds();
        let job = jobs.first().ok_or(RebuildError::NotRunning)?;
        // Once one shard switches, all do: no query may read two generations for good.
        if let Some(switching) = jobs.iter().find(|j| j.switching.load(Ordering::Relaxed)) {
            return Err(RebuildError::Switching(switching.generation.number));
        }
        for job in &jobs {
            job.cancel();
        }
        if job.is_preview() {
            self.forget_preview_component(&p);
        }
        Ok(job.generation.number)
    }

    /// Start rebuilding `shard` of `p` into generation `number` (recorded
    /// in its `rebuilding` file, and its `preview` file for a preview, so
    /// that a restart resumes it as it was).
    fn start_rebuild(
        &self,
        p: &Arc<Projection>,
        shard: &Arc<Shard>,
        handler: Box<dyn Handler>,
        number: u64,
        barrier: Arc<dyn rebuild::SwitchBarrier>,
        preview: bool,
    ) -> anyhow::Result<()> {
        if preview {
            generation::mark_preview(&shard.root, number)
                .with_context(|| format!("recording the preview in {}", shard.root.display()))?;
        }
        generation::mark_rebuilding(&shard.root, number)
            .with_context(|| format!("recording the rebuild in {}", shard.root.display()))?;
        // Gated at nothing until the rebuild monitor opens the gate.
        let gate = Replay::Until(Default::default(), Default::default());
        let generation = self.start_generation(handler, &shard.root, shard.partition, number, gate)?;
        let job = Arc::new(Rebuild::new(generation, preview)?);
        *shard.rebuild.lock().expect("rebuild lock") = Some(job.clone());
        let (p, shard) = (p.clone(), shard.clone());
        let (log, kafka, shutdown) = (self.log.clone(), self.kafka.clone(), self.stop.clone());
        let name = p.manifest().name;
        let label = match shard.partition {
            None => format!("rebuild-{name}"),
            Some(n) => format!("rebuild-{name}#{n}"),
        };
        let thread = std::thread::Builder::new()
            .name(label)
            .spawn(move || {
                let switch = rebuild::Switch {
                    name: &name,
                    partition: shard.partition,
                    barrier: &*barrier,
                    root: &shard.root,
                    live: &shard.live,
                    rebuild: &shard.rebuild,
                    starting: &p.starting,
                    log: &log,
                    kafka: &kafka,
                    shutdown: &shutdown,
                };
                rebuild::monitor(switch, job);
            })
            .context("spawning a rebuild monitor")?;
        self.workers.lock().expect("workers lock").push(thread);
        Ok(())
    }

    /// Stop the projection `name` after its current batch and forget it; its
    /// data stays on disk, and adding it again resumes from its checkpoints.
    pub fn remove(&self, name: &str) -> Option<Arc<Projection>> {
        let projection = self.projections.write().expect("projections lock").remove(name)?;
        projection.stop();
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

    /// Stop every worker after its current batch and wait for them.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let workers = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        for w in workers {
            let _ = w.join();
        }
        let names: Vec<String> = self.projections.read().expect("projections lock").keys().cloned().collect();
        for p in self.projections() {
            p.ask_to_stop();
        }
        for name in names {
            self.remove(&name);
        }
    }
}

/// Another instance of `handler`, for one more shard: only plugin
/// components can make one (`source` names the plugin in the error).
fn another(handler: &dyn Handler, source: &str) -> anyhow::Result<Box<dyn Handler>> {
    handler
        .another()
        .ok_or_else(|| anyhow::anyhow!("{source} cannot run as several shards (only plugin components can)"))
}

/// `handler` and `count - 1` more instances of it: one for each shard.
fn instances(handler: Box<dyn Handler>, count: usize, source: &str) -> anyhow::Result<Vec<Box<dyn Handler>>> {
    let mut handlers = (1..count).map(|_| another(&*handler, source)).collect::<anyhow::Result<Vec<_>>>()?;
    handlers.push(handler);
    Ok(handlers)
}

/// Refuse another rebuild or preview of `p` while one runs here.
fn not_rebuilding(p: &Projection) -> Result<(), RebuildError> {
    match p.rebuilding() {
        Some(r) if r.is_preview() => Err(RebuildError::Previewing(r.generation.number)),
        Some(r) => Err(RebuildError::Running(r.generation.number)),
        None => Ok(()),
    }
}

/// What the rebuilds of `shards` of `p` (all running here) wait on before
/// they switch: each other, for a partitioned projection.
fn barrier_of(p: &Projection, shards: &[Arc<Shard>]) -> Arc<dyn rebuild::SwitchBarrier> {
    match p.is_partitioned() {
        true => Arc::new(rebuild::AllShards::new(shards.iter().map(|s| s.number()))),
        false => Arc::new(rebuild::Alone),
    }
}

/// Why a rebuild could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("no such projection")]
    NotFound,
    #[error("generation {0} is already being rebuilt")]
    Running(u64),
    #[error("generation {0} is being built as a preview: promote or discard it first")]
    Previewing(u64),
    #[error("no preview is open")]
    NoPreview,
    #[error("previews of a projection partitioned across a cluster are not supported yet")]
    PreviewInCluster,
    /// The data directory could not be written (a full disk): worth retrying.
    #[error("{0}")]
    Storage(String),
    #[error("no rebuild is running")]
    NotRunning,
    #[error("generation {0} is taking over from the live one; the switch completes")]
    Switching(u64),
    #[error("{0}")]
    Invalid(String),
    /// The cluster cannot take the request now (the control topic cannot
    /// be written, the instance has not joined yet): worth retrying.
    #[error("{0}")]
    Unavailable(String),
}
