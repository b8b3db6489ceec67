//! A plugin (projection or enricher) running as a WebAssembly component.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store, Trap};

use super::bindings::enricher::{Enricher, EnricherPre};
use super::bindings::refract::plugin::emit::Outgoing;
use super::bindings::{Event, Failure, IndexMapping, Manifest, Projection, ProjectionPre};
use super::engine::deadline_ticks;
use super::host::HostState;
use super::route::{self, Routes};
use super::{Environment, HandleError, Handler, Kind};
use crate::store::Batch;

/// Resource limits of one plugin instance.
#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    /// The most linear memory an instance may have, in bytes.
    pub max_memory: usize,
    /// The longest one `handle` call may run before it is interrupted.
    pub deadline: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits { max_memory: 256 << 20, deadline: Duration::from_secs(10) }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("does not compile as a component: {0}")]
    Compile(String),
    #[error("does not fit the refract:plugin projection or enricher world: {0}")]
    Link(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    #[error("manifest() failed: {0}")]
    Manifest(String),
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
}

/// A component ready to instantiate, by the world it exports.
enum Pre {
    Projection(ProjectionPre<HostState>),
    Enricher(EnricherPre<HostState>),
}

/// A live instance of either world.
enum Instance {
    Projection(Projection),
    Enricher(Enricher),
}

/// A compiled plugin component, instantiated on demand and again after a trap.
pub struct WasmPlugin {
    engine: Engine,
    pre: Pre,
    name: Arc<str>,
    limits: PluginLimits,
    env: Environment,
    manifest: Manifest,
    indexes: Vec<IndexMapping>,
    /// Where an enricher's outputs go (see [`WasmPlugin::configure`]).
    routes: Routes,
    instance: Option<(Store<HostState>, Instance)>,
}

/// A linker with the host interfaces and an empty WASI.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    Projection::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// A short account of why a call into a plugin failed.
fn describe_trap(e: &wasmtime::Error, limits: &PluginLimits, last_error_log: Option<String>) -> String {
    let what = match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!("ran past its deadline of {} ms", limits.deadline.as_millis()),
        Some(Trap::StackOverflow) => "overflowed its stack".to_owned(),
        Some(trap) => trap.to_string(),
        None => e.root_cause().to_string(),
    };
    match last_error_log {
        Some(log) => format!("{what} ({log})"),
        None => what,
    }
}

impl WasmPlugin {
    /// Link `component`, instantiate it once and ask for its manifest. It is
    /// an enricher if it exports `enrich`, else a projection.
    pub fn load(
        engine: &Engine,
        linker: &Linker<HostState>,
        component: &Component,
        label: &str,
        limits: PluginLimits,
    ) -> Result<Self, LoadError> {
        let link = |e: wasmtime::Error| LoadError::Link(format!("{e:#}"));
        let raw_pre = linker.instantiate_pre(component).map_err(link)?;
        let exports_enrich = component.get_export_index(None, "enrich").is_some();
        let pre = if exports_enrich {
            Pre::Enricher(EnricherPre::new(raw_pre).map_err(link)?)
        } else {
            Pre::Projection(ProjectionPre::new(raw_pre).map_err(link)?)
        };
        let mut this = WasmPlugin {
            engine: engine.clone(),
            pre,
            name: Arc::from(label),
            limits,
            env: Environment::default(),
            routes: Routes::to_own_stream(label),
            manifest: Manifest {
                name: label.to_owned(),
                version: String::new(),
                schema_version: 0,
                subscriptions: Vec::new(),
                tables: Vec::new(),
            },
            indexes: Vec::new(),
            instance: None,
        };
        let mut store = this.new_store();
        let raw = match &this.pre {
            Pre::Projection(pre) => pre.instance_pre().instantiate(&mut store),
            Pre::Enricher(pre) => pre.instance_pre().instantiate(&mut store),
        }
        .map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
        let instance = match &this.pre {
            Pre::Projection(_) => Instance::Projection(Projection::new(&mut store, &raw).map_err(link)?),
            Pre::Enricher(_) => Instance::Enricher(Enricher::new(&mut store, &raw).map_err(link)?),
        };
        let manifest = match &instance {
            Instance::Projection(p) => p.call_manifest(&mut store),
            Instance::Enricher(e) => e.call_manifest(&mut store),
        }
        .map_err(|e| LoadError::Manifest(describe_trap(&e, &limits, store.data_mut().last_error_log.take())))?;
        super::validate_manifest(&manifest).map_err(LoadError::InvalidManifest)?;
        // The `search-projection` world adds an `indexes` export; plain projections lack it.
        if let (Instance::Projection(_), Ok(indexes)) =
            (&instance, raw.get_typed_func::<(), (Vec<IndexMapping>,)>(&mut store, "indexes"))
        {
            let (mappings,) = indexes
                .call(&mut store, ())
                .map_err(|e| LoadError::Manifest(describe_trap(&e, &limits, store.data_mut().last_error_log.take())))?;
            this.indexes = mappings;
        }
        this.name = Arc::from(manifest.name.as_str());
        this.routes = Routes::to_own_stream(&manifest.name);
        this.manifest = manifest;
        this.instance = Some((store, instance));
        Ok(this)
    }

    /// Give the plugin its environment (lookups, settings), its limits and,
    /// for an enricher, its routes: all depend on its name, known once loaded.
    pub fn configure(&mut self, env: Environment, routes: &[route::Route], limits: PluginLimits) -> Result<(), String> {
        self.routes = Routes::new(&self.manifest.name, routes)?;
        if self.kind() == Kind::Enricher {
            let routes = self.routes.streams();
            if let Some(s) = self.manifest.subscriptions.iter().find(|s| routes.contains(&s.stream.as_str())) {
                return Err(format!(
                    "enricher {:?} would read its own output stream {:?}",
                    self.manifest.name, s.stream
                ));
            }
        }
        if let Some((store, _)) = &mut self.instance {
            store.data_mut().env = env.clone();
        }
        self.env = env;
        if (limits.max_memory, limits.deadline) != (self.limits.max_memory, self.limits.deadline) {
            // The instance's memory cap is fixed when it is created: make the next one under these limits.
            self.limits = limits;
            self.instance = None;
        }
        Ok(())
    }

    fn new_store(&self) -> Store<HostState> {
        let state = HostState::new(self.name.clone(), self.limits.max_memory, self.env.clone());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(self.limits.deadline));
        store
    }

    fn instantiate(&self) -> Result<(Store<HostState>, Instance), String> {
        let mut store = self.new_store();
        let instance = match &self.pre {
            Pre::Projection(pre) => pre.instantiate(&mut store).map(Instance::Projection),
            Pre::Enricher(pre) => pre.instantiate(&mut store).map(Instance::Enricher),
        }
        .map_err(|e| format!("{e:#}"))?;
        Ok((store, instance))
    }
}

/// What a call into either world returned.
type Called = wasmtime::Result<Result<Option<Vec<Outgoing>>, Failure>>;

impl Handler for WasmPlugin {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn indexes(&self) -> &[IndexMapping] {
        &self.indexes
    }

    fn kind(&self) -> Kind {
        match self.pre {
            Pre::Projection(_) => Kind::Projection,
            Pre::Enricher(_) => Kind::Enricher,
        }
    }

    fn handle(&mut self, batch: Batch, events: &[Event]) -> (Batch, Result<(), HandleError>) {
        if self.instance.is_none() {
            match self.instantiate() {
                Ok(instance) => self.instance = Some(instance),
                Err(e) => {
                    return (batch, Err(HandleError::Host(format!("instantiating the plugin: {e}"))));
                }
            }
        }
        let (store, instance) = self.instance.as_mut().expect("instantiated above");
        store.data_mut().batch = Some(batch);
        store.data_mut().last_error_log = None;
        store.set_epoch_deadline(deadline_ticks(self.limits.deadline));
        let result: Called = match instance {
            Instance::Projection(p) => p.call_handle(&mut *store, events).map(|r| r.map(|()| None)),
            Instance::Enricher(e) => e.call_enrich(&mut *store, events).map(|r| r.map(Some)),
        };
        let state = store.data_mut();
        let mut batch = state.batch.take().expect("the batch stays in the store during the call");
        let host_error = state.host_error.take();
        let last_error_log = state.last_error_log.take();
        let outcome = match result {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(outputs))) => route::deliver(&mut batch, &self.routes, outputs),
            Ok(Err(Failure::Rejected(m))) => Err(HandleError::Rejected(m)),
            Ok(Err(Failure::Transient(m))) => Err(HandleError::Transient(m)),
            Err(e) => {
                // A trapped instance may be in any state: never call it again.
                self.instance = None;
                Err(match host_error {
                    Some(h) => HandleError::Host(h),
                    None => HandleError::Trap(describe_trap(&e, &self.limits, last_error_log)),
                })
            }
        };
        (batch, outcome)
    }
}
