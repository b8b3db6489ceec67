//! A plugin (projection or enricher) running as a WebAssembly component.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, ComponentNamedList, Func, HasSelf, Lift, Linker};
use wasmtime::{Engine, Store, Trap};

use super::engine::deadline_ticks;
use super::host::HostState;
use super::route::{self, Routes};
use super::{Environment, HandleError, Handler, Kind};
use crate::store::Batch;
use crate::wit::worlds::{Enricher, EnricherPre, Projection, ProjectionPre};
use crate::wit::{Event, Failure, IndexMapping, KeyedTable, Manifest, Outgoing};

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

impl Clone for Pre {
    fn clone(&self) -> Self {
        match self {
            Pre::Projection(p) => Pre::Projection(p.clone()),
            Pre::Enricher(e) => Pre::Enricher(e.clone()),
        }
    }
}

/// A live instance of either world, with its `handle-packed` or
/// `enrich-packed` export when it has one (the `packed-*` worlds).
enum Instance {
    Projection(Projection, Option<Func>),
    Enricher(Enricher, Option<Func>),
}

/// The names of the packed exports, which the host prefers when present.
const HANDLE_PACKED: &str = "handle-packed";
const ENRICH_PACKED: &str = "enrich-packed";

/// A compiled plugin component, instantiated on demand and again after a trap.
pub struct WasmPlugin {
    engine: Engine,
    pre: Pre,
    name: Arc<str>,
    limits: PluginLimits,
    env: Environment,
    manifest: Manifest,
    indexes: Vec<IndexMapping>,
    keyed_tables: Vec<KeyedTable>,
    /// Where an enricher's outputs go (see [`WasmPlugin::configure`]).
    routes: Routes,
    instance: Option<(Store<HostState>, Instance)>,
    /// Whether the component exports `handle-packed` / `enrich-packed`.
    takes_packed: bool,
    /// The last packed batch, kept so that its allocation is reused.
    packed: Vec<u8>,
    /// Record the host calls of each `handle` (`refract plugin test`).
    tracing: bool,
    /// The calls recorded during the last `handle`.
    traced: Vec<super::trace::HostCall>,
    /// The content hash of the component, once the runtime keeps it.
    digest: Option<Arc<str>>,
}

/// A linker with the host interfaces and an empty WASI.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    super::host::link_frozen_sleep(&mut linker)?;
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
    let what = match last_error_log {
        Some(log) => format!("{what} ({log})"),
        None => what,
    };
    match plugin_frames(e) {
        Some(frames) => format!("{what}; wasm backtrace: {frames}"),
        None => what,
    }
}

/// The most frames of a trap's backtrace a description names.
const FRAMES: usize = 8;

/// The frames of a trap's wasm backtrace that are the plugin's own,
/// innermost first, named from the component's name section (demangled by
/// wasmtime), past the standard library's panic and allocation machinery;
/// `None` when the component names none (a stripped build).
fn plugin_frames(e: &wasmtime::Error) -> Option<String> {
    let backtrace = e.downcast_ref::<wasmtime::WasmBacktrace>()?;
    // wasmtime's rendering, one frame per line: `  N: 0x1f2e - module!function`.
    let text = backtrace.to_string();
    let machinery = [
        "std::",
        "core::",
        "alloc::",
        "<std::",
        "<core::",
        "<alloc::",
        "__rust",
        "rust_panic",
        "abort",
        "wasm-function[",
    ];
    let frames: Vec<String> = text
        .lines()
        .filter_map(|line| line.split_once(" - ").map(|(_, frame)| frame.trim()))
        .map(|frame| readable(frame.split_once('!').map_or(frame, |(_, function)| function)))
        .filter(|function| !machinery.iter().any(|m| function.starts_with(m)))
        .take(FRAMES)
        .collect();
    (!frames.is_empty()).then(|| frames.join(" ← "))
}

/// A demangled Rust function name without what only a linker needs: the
/// crates' disambiguators (`std[d123b7a1a2ed1472]::`) and the trailing
/// hash (`::h028f6ef75abd7fb4`).
fn readable(function: &str) -> String {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut out = String::with_capacity(function.len());
    let mut rest = function;
    while let Some(open) = rest.find('[') {
        let close = rest[open..].find(']').map(|c| open + c);
        match close {
            Some(close) if hex(&rest[open + 1..close]) => {
                out.push_str(&rest[..open]);
                rest = &rest[close + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    match out.rsplit_once("::h") {
        Some((name, hash)) if hash.len() == 16 && hex(hash) => name.to_owned(),
        _ => out,
    }
}

/// Call the export `name` of `raw` that takes nothing, when the component
/// has it: exports a later world added are looked up by name, and a
/// component built against an earlier one lacks them.
fn call_optional<T>(
    raw: &wasmtime::component::Instance,
    store: &mut Store<HostState>,
    name: &str,
    limits: &PluginLimits,
) -> Result<Option<T>, LoadError>
where
    (T,): ComponentNamedList + Lift + Send + Sync + 'static,
{
    let Ok(export) = raw.get_typed_func::<(), (T,)>(&mut *store, name) else { return Ok(None) };
    let (value,) = export
        .call(&mut *store, ())
        .map_err(|e| LoadError::Manifest(describe_trap(&e, limits, store.data_mut().last_error_log.take())))?;
    Ok(Some(value))
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
        let packed_export = if exports_enrich { ENRICH_PACKED } else { HANDLE_PACKED };
        let takes_packed = component.get_export_index(None, packed_export).is_some();
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
            keyed_tables: Vec::new(),
            instance: None,
            takes_packed,
            packed: Vec::new(),
            tracing: false,
            traced: Vec::new(),
            digest: None,
        };
        let mut store = this.new_store();
        let raw = this.instantiate_raw(&mut store).map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
        let instance = this.bind(&mut store, &raw).map_err(link)?;
        let manifest = match &instance {
            Instance::Projection(p, _) => p.call_manifest(&mut store),
            Instance::Enricher(e, _) => e.call_manifest(&mut store),
        }
        .map_err(|e| LoadError::Manifest(describe_trap(&e, &limits, store.data_mut().last_error_log.take())))?;
        super::validate_manifest(&manifest).map_err(LoadError::InvalidManifest)?;
        if let Instance::Projection(..) = &instance {
            // The `search-projection` world adds an `indexes` export; plain projections lack it.
            this.indexes = call_optional(&raw, &mut store, "indexes", &limits)?.unwrap_or_default();
            // WIT 0.1.1's `keyed-tables`; components built before it lack it.
            this.keyed_tables = call_optional(&raw, &mut store, "keyed-tables", &limits)?.unwrap_or_default();
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

    /// Whether the host hands this plugin its batches packed into one buffer
    /// (it exports `handle-packed` or `enrich-packed`), rather than as records.
    pub fn takes_packed_batches(&self) -> bool {
        self.takes_packed
    }

    /// Name the component by its content hash (the runtime keeps it by it).
    pub fn set_digest(&mut self, digest: &str) {
        self.digest = Some(Arc::from(digest));
    }

    /// Record the host calls each `handle` makes, for [`WasmPlugin::take_trace`].
    pub fn set_tracing(&mut self, on: bool) {
        self.tracing = on;
        if let Some((store, _)) = &mut self.instance {
            store.data_mut().trace = on.then(Vec::new);
        }
    }

    /// The host calls the last `handle` made, in order (none unless tracing).
    pub fn take_trace(&mut self) -> Vec<super::trace::HostCall> {
        std::mem::take(&mut self.traced)
    }

    fn new_store(&self) -> Store<HostState> {
        let mut state = HostState::new(self.name.clone(), self.limits.max_memory, self.env.clone());
        state.trace = self.tracing.then(Vec::new);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(self.limits.deadline));
        store
    }

    fn instantiate(&self) -> Result<(Store<HostState>, Instance), String> {
        let mut store = self.new_store();
        let raw = self.instantiate_raw(&mut store).map_err(|e| format!("{e:#}"))?;
        let instance = self.bind(&mut store, &raw).map_err(|e| format!("{e:#}"))?;
        Ok((store, instance))
    }

    /// A fresh instance of the component in `store`, before binding its exports.
    fn instantiate_raw(&self, store: &mut Store<HostState>) -> wasmtime::Result<wasmtime::component::Instance> {
        match &self.pre {
            Pre::Projection(pre) => pre.instance_pre().instantiate(store),
            Pre::Enricher(pre) => pre.instance_pre().instantiate(store),
        }
    }

    /// The world's exports of a fresh instance, and its packed export if it
    /// has one.
    fn bind(&self, store: &mut Store<HostState>, raw: &wasmtime::component::Instance) -> wasmtime::Result<Instance> {
        Ok(match &self.pre {
            Pre::Projection(_) => {
                let packed = packed_export::<PackedHandled>(store, raw, HANDLE_PACKED)?;
                Instance::Projection(Projection::new(&mut *store, raw)?, packed)
            }
            Pre::Enricher(_) => {
                let packed = packed_export::<PackedEnriched>(store, raw, ENRICH_PACKED)?;
                Instance::Enricher(Enricher::new(&mut *store, raw)?, packed)
            }
        })
    }
}

/// The export `name` of `raw`, if it has one, checked to take a byte list and
/// return `R`: a packed export of the wrong type fails the link.
fn packed_export<R: ComponentNamedList + Lift>(
    store: &mut Store<HostState>,
    raw: &wasmtime::component::Instance,
    name: &str,
) -> wasmtime::Result<Option<Func>> {
    let Some(func) = raw.get_func(&mut *store, name) else {
        return Ok(None);
    };
    func.typed::<(&[u8],), R>(&*store).map_err(|e| wasmtime::format_err!("{name}: {e:#}"))?;
    Ok(Some(func))
}

/// What `handle-packed` and `enrich-packed` return.
type PackedHandled = (Result<(), Failure>,);
type PackedEnriched = (Result<Vec<u8>, Failure>,);

/// Encode `events` for a packed export into `buffer`.
fn pack(events: &[Event], buffer: &mut Vec<u8>) {
    use refract_abi::{Writer, write_event};
    buffer.clear();
    let mut w = Writer(buffer);
    w.len(events.len());
    for e in events {
        let (key, headers) = (e.key.as_deref(), &e.headers);
        write_event(
            &mut w,
            &e.stream,
            e.partition,
            e.offset,
            key,
            &e.event_type,
            e.time,
            headers,
            &e.content_type,
            &e.data,
        );
    }
}

/// Decode the outputs of `enrich-packed`; outputs that do not decode are the
/// plugin's fault, like a trap.
fn unpack_outputs(bytes: &[u8]) -> wasmtime::Result<Vec<Outgoing>> {
    let mut outputs = Vec::new();
    refract_abi::read_outputs(bytes, |event_type, key, time, headers, data| {
        outputs.push(Outgoing {
            event_type: event_type.to_owned(),
            key: key.map(str::to_owned),
            time,
            headers,
            data: data.to_vec(),
        })
    })
    .map_err(|e| wasmtime::format_err!("{ENRICH_PACKED} returned outputs that do not decode: {e}"))?;
    Ok(outputs)
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

    fn keyed_tables(&self) -> &[KeyedTable] {
        &self.keyed_tables
    }

    fn component_digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    fn kind(&self) -> Kind {
        match self.pre {
            Pre::Projection(_) => Kind::Projection,
            Pre::Enricher(_) => Kind::Enricher,
        }
    }

    /// The same compiled component, limits, settings and routes; its own
    /// instance, made on its first batch.
    fn another(&self) -> Option<Box<dyn Handler>> {
        Some(Box::new(WasmPlugin {
            engine: self.engine.clone(),
            pre: self.pre.clone(),
            name: self.name.clone(),
            limits: self.limits,
            env: self.env.clone(),
            manifest: self.manifest.clone(),
            indexes: self.indexes.clone(),
            keyed_tables: self.keyed_tables.clone(),
            routes: self.routes.clone(),
            instance: None,
            takes_packed: self.takes_packed,
            packed: Vec::new(),
            tracing: self.tracing,
            traced: Vec::new(),
            digest: self.digest.clone(),
        }))
    }

    fn handle(&mut self, batch: Batch, events: &[Event]) -> (Batch, Result<(), HandleError>) {
        self.traced.clear();
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
            Instance::Projection(_, Some(packed)) => {
                pack(events, &mut self.packed);
                packed
                    .typed::<(&[u8],), PackedHandled>(&*store)
                    .and_then(|f| f.call(&mut *store, (self.packed.as_slice(),)))
                    .map(|(r,)| r.map(|()| None))
            }
            Instance::Enricher(_, Some(packed)) => {
                pack(events, &mut self.packed);
                packed
                    .typed::<(&[u8],), PackedEnriched>(&*store)
                    .and_then(|f| f.call(&mut *store, (self.packed.as_slice(),)))
                    .and_then(|(r,)| match r {
                        Ok(outputs) => unpack_outputs(&outputs).map(|o| Ok(Some(o))),
                        Err(failure) => Ok(Err(failure)),
                    })
            }
            Instance::Projection(p, None) => p.call_handle(&mut *store, events).map(|r| r.map(|()| None)),
            Instance::Enricher(e, None) => e.call_enrich(&mut *store, events).map(|r| r.map(Some)),
        };
        let state = store.data_mut();
        let mut batch = state.batch.take().expect("the batch stays in the store during the call");
        let host_error = state.host_error.take();
        let last_error_log = state.last_error_log.take();
        if let Some(trace) = &mut state.trace {
            // Kept out of the store, which a trap drops.
            self.traced = std::mem::take(trace);
        }
        let result = match (result, state.refused_write.take()) {
            // The plugin went on after a pending write was refused (it ignored
            // the error): the writes after that one are missing.
            (Ok(Ok(_)), Some(refused)) => Ok(Err(Failure::Rejected(refused))),
            (result, _) => result,
        };
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

#[cfg(test)]
mod tests {
    use super::readable;

    #[test]
    fn function_names_lose_their_disambiguators_and_hashes() {
        assert_eq!(readable("std[d123b7a1a2ed1472]::panicking::panic_with_hook"), "std::panicking::panic_with_hook");
        assert_eq!(
            readable("<testkit_chaos::_::__RefractExport as refract_sdk::wit::Guest>::manifest::hdc700ff098d2e0d3"),
            "<testkit_chaos::_::__RefractExport as refract_sdk::wit::Guest>::manifest"
        );
        assert_eq!(readable("<[u8]>::to_vec"), "<[u8]>::to_vec", "a slice type is not a disambiguator");
    }
}
