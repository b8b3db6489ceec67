//! New plugin versions, uploaded or dropped into the plugins directory:
//! loading them ([`Loader`]), deciding what they change ([`Change`]: a swap
//! between batches, or a rebuild for a new schema-version) and carrying
//! that out, or refusing them with the running version left in place.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::watcher::Watcher;
use super::{Projection, Runtime};
use crate::config::{Config, LimitsConfig, PluginConfig, resolve_limits};
use crate::plugin::cache::CompileCache;
use crate::plugin::wasm::{self, WasmPlugin};
use crate::plugin::{Environment, Handler, IndexMapping, Lookup, Manifest, engine};

/// What a new version of a projection's plugin changes.
pub(super) enum Change {
    /// The same read-model shape: swap it in between batches.
    Swap,
    /// A new schema-version (described): rebuild with it.
    Rebuild(String),
}

/// A plugin file that could not be loaded, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginError {
    pub file: String,
    pub error: String,
    /// The projection the file provides, when it loaded that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<String>,
    /// The runtime tries again by itself (a partitioned projection waiting
    /// for its brokers); otherwise only a new version of the file is tried.
    #[serde(default)]
    pub retrying: bool,
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

/// Compiles and instantiates plugin files (through the compile cache), and
/// gives each its environment and routes from `plugins.<name>` in the config.
pub(super) struct Loader {
    engine: wasmtime::Engine,
    pub(super) cache: CompileCache,
    linker: wasmtime::component::Linker<crate::plugin::host::HostState>,
    limits: LimitsConfig,
    lookup: Arc<dyn Lookup>,
    plugins: BTreeMap<String, PluginConfig>,
    /// Every component loaded, kept by content hash for dead letters.
    pub(super) components: super::components::Components,
    /// The (projection, digest) of each component loaded since the start:
    /// kept by the start's sweep.
    pub(super) loaded: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
}

impl Loader {
    pub(super) fn new(config: &Config, lookup: Arc<dyn Lookup>) -> anyhow::Result<Self> {
        let engine = engine::new_engine().map_err(|e| anyhow::anyhow!("creating the wasm engine: {e}"))?;
        let cache = CompileCache::new(&config.data_dir.join("cache").join("compiled"), &engine)
            .context("creating the compile cache")?;
        let linker = wasm::linker(&engine).map_err(|e| anyhow::anyhow!("linking host interfaces: {e}"))?;
        let components = super::components::Components::new(config.data_dir.join("components"))
            .context("creating the components directory")?;
        Ok(Loader {
            engine,
            cache,
            linker,
            limits: config.limits.clone(),
            lookup,
            plugins: config.plugins.clone(),
            components,
            loaded: Default::default(),
        })
    }

    /// Compile, instantiate and describe the plugin in `file`.
    pub(super) fn load(&self, file: &Path) -> Result<WasmPlugin, String> {
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read: {e}"))?;
        self.load_bytes(&bytes, &file.display().to_string())
    }

    /// Compile, instantiate and describe the plugin in `bytes`, and keep
    /// the component by its content hash.
    pub(super) fn load_bytes(&self, bytes: &[u8], label: &str) -> Result<WasmPlugin, String> {
        let digest = crate::plugin::cache::digest(bytes);
        let (component, _) = self
            .cache
            .load_digested(bytes, &digest)
            .map_err(|e| wasm::LoadError::Compile(format!("{e:#}")).to_string())?;
        // Loaded under the global limits; its own apply once its name is known.
        let global = resolve_limits(&self.limits, None).0;
        let mut plugin =
            WasmPlugin::load(&self.engine, &self.linker, &component, label, global).map_err(|e| e.to_string())?;
        let config = self.plugins.get(&plugin.manifest().name).cloned().unwrap_or_default();
        let settings = config.settings_text()?;
        let env = Environment { lookup: self.lookup.clone(), settings: Arc::new(settings) };
        plugin.configure(env, &config.routes, resolve_limits(&self.limits, Some(&config.limits)).0)?;
        // Kept and recorded under one lock, which the start's sweep holds too.
        let mut loaded = self.loaded.lock().expect("loaded lock");
        let projection = plugin.manifest().name.clone();
        match self.components.keep(&projection, &digest, bytes) {
            Ok(()) => {
                plugin.set_digest(&digest);
                loaded.insert((projection, digest));
            }
            Err(e) => {
                tracing::warn!(plugin = %label, error = %e, "cannot keep the component: its dead letters cannot be reproduced")
            }
        }
        Ok(plugin)
    }
}

impl Runtime {
    /// Check an uploaded plugin (compile, instantiate, describe) and decide
    /// what it changes (see `Runtime::deploy`); only then install it as
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
            self.write_plugin_file(&file, bytes).map_err(InstallError::Storage)?;
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

    /// Write `bytes` as the plugin file `file`, which the runtime has put
    /// to work itself: the watcher must not load it again.
    pub(super) fn write_plugin_file(&self, file: &Path, bytes: &[u8]) -> Result<(), String> {
        std::fs::create_dir_all(&self.plugins_dir).map_err(|e| format!("creating the plugins directory: {e}"))?;
        // The watcher reads stamps under this lock, so it sees the file and its stamp change together.
        let mut stamps = self.plugin_stamps.lock().expect("stamps lock");
        // Durably: after a power cut the plugins directory must hold the old
        // version or the new one, not a truncated file that no longer loads.
        crate::data_dir::replace_durably(file, bytes).map_err(|e| format!("writing {}: {e}", file.display()))?;
        stamps.insert(file.to_owned(), Watcher::stamp(file));
        Ok(())
    }

    /// Put the plugin loaded from `file` (by the plugins-directory watcher)
    /// to work: swap it into the projection that file provides (between
    /// batches), start a rebuild if its schema-version changed, or start a
    /// new projection. A version that cannot run is reported in the
    /// projection's `reloadError`, and the running one stays.
    pub(super) fn deploy(self: &Arc<Self>, file: &Path, loaded: Result<WasmPlugin, String>) {
        let label = file.display().to_string();
        // Under the waits' lock, so that a projection waiting for its
        // brokers does not start between this look and the add below.
        let mut waits = self.waits.lock().expect("waits lock");
        let owner = self.projections().into_iter().find(|p| p.source == label);
        let Some(projection) = owner else {
            // A new plugin file: a new projection, without a restart.
            match loaded {
                Ok(p) => {
                    let name = p.manifest().name.clone();
                    match self.add_locked(&mut waits, Box::new(p), label.clone()) {
                        Ok(Some(_)) => {
                            tracing::info!(plugin = %label, projection = %name, "new plugin loaded");
                            self.clear_plugin_error(&label);
                        }
                        Ok(None) => {} // it waits for its brokers, and says so in its plugin error
                        Err(e) => self.plugin_error(label, format!("{e:#}")),
                    }
                }
                Err(error) => {
                    waits.end(&label);
                    self.plugin_error(label, error);
                }
            }
            return;
        };
        drop(waits);
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
        let kind = projection.kind();
        if next.manifest().name != current.name {
            return Err(format!("the file now provides projection {:?}, not {:?}", next.manifest().name, current.name));
        }
        if next.kind() != kind {
            return Err(format!(
                "the file now provides {:?} as {:?}, not {:?}: remove it and add it again",
                current.name,
                next.kind(),
                kind
            ));
        }
        if next.manifest().schema_version != current.schema_version {
            let change = format!("schema-version {} → {}", current.schema_version, next.manifest().schema_version);
            // (Across a cluster, the rebuild asked for decides: a new
            // version dropped on each instance joins the one asked for.)
            if let Some(r) = projection.rebuilding().filter(|_| !(projection.is_partitioned() && self.shards_by_group))
            {
                let n = r.generation.number;
                let running = match r.is_preview() {
                    true => format!("a preview of generation {n} is open: promote or discard it"),
                    false => format!("the rebuild to generation {n} is still running: wait for it or cancel it"),
                };
                return Err(format!("{change} needs a rebuild, and {running}"));
            }
            return Ok(Change::Rebuild(change));
        }
        let old = projection.index_mappings();
        let old: Vec<&IndexMapping> = old.iter().collect();
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
            Change::Rebuild(change) => match self.start_rebuild_locked(projection, Some(Box::new(next)), false) {
                Ok(generation) => {
                    tracing::info!(plugin = %label, %change, generation, "new schema-version: rebuilding");
                    None
                }
                Err(e) => Some(format!("{change} needs a rebuild, which did not start: {e}")),
            },
            Change::Swap => {
                tracing::info!(plugin = %label, version = %next.manifest().version, "new plugin version loaded; swapping it in");
                if projection.is_partitioned() {
                    // Every shard gets its own instance of the new version,
                    // and so will the shards this instance takes on later.
                    for shard in projection.shards() {
                        if let Some(another) = next.another() {
                            shard.live().control.swap(another);
                        }
                    }
                    projection.set_template(Box::new(next));
                } else if let Some(whole) = projection.whole() {
                    whole.live().control.swap(Box::new(next));
                }
                // A rebuild in progress switches to its generation later: it
                // must run this version too, or the switch would drop it
                // (each shard's rebuild gets its own instance). A preview
                // keeps the version it previews.
                let mut outcome = None;
                for rebuild in projection.rebuilds().into_iter().filter(|r| !r.is_preview()) {
                    match self.loader.get().map(|l| l.load(file)) {
                        Some(Ok(again)) => rebuild.generation.control.swap(Box::new(again)),
                        Some(Err(e)) => outcome = Some(format!("the rebuilding generation keeps its version: {e}")),
                        None => {}
                    }
                }
                outcome
            }
        };
        if let Some(error) = &outcome {
            tracing::error!(plugin = %label, projection = %name, %error, "new plugin version not deployed");
            projection.reload_failures.fetch_add(1, Ordering::Relaxed);
        }
        *projection.reload_error.lock().expect("reload error lock") = outcome;
    }

    pub(super) fn plugin_error(&self, file: String, error: String) {
        tracing::error!(plugin = %file, %error, "plugin not loaded");
        self.report_plugin_error(PluginError { file, error, projection: None, retrying: false });
    }

    /// Forget `file`'s plugin error: it loaded, or is gone.
    pub(super) fn clear_plugin_error(&self, file: &str) {
        self.plugin_errors.lock().expect("plugin errors lock").retain(|e| e.file != file);
    }

    /// Make `error` its file's one plugin error.
    pub(super) fn report_plugin_error(&self, error: PluginError) {
        let mut errors = self.plugin_errors.lock().expect("plugin errors lock");
        errors.retain(|e| e.file != error.file);
        errors.push(error);
    }
}
