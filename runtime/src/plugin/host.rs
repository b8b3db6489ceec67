//! What a plugin instance can reach: its batch's key/value tables, search
//! documents and emitted events, other projections' tables (read-only), its
//! settings, the log, and a WASI environment with nothing in it.
//!
//! WASI is linked only because components built by the usual toolchains
//! import it to start. The context has no preopened directories, no
//! environment, no arguments, no network, a clock frozen at the Unix epoch
//! (on which sleeps end at once) and a fixed random seed: a projection's output depends on its events alone,
//! so replaying them rebuilds the same read model.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::trace::{self, HostCall, shown};
use super::{Environment, LookupFailure};
use crate::store::Batch;
use crate::wit::worlds::{emit, kv, kv_packed, log, lookup, search, settings, types};
use crate::wit::{EmitError, Entry, KvError, LookupError, Outgoing, PackedError, RefusedWrite, SearchError};

/// The longest log message kept from a plugin; longer ones are cut.
const MAX_LOG_MESSAGE: usize = 4096;

/// The state of one plugin instance's store.
pub struct HostState {
    plugin: Arc<str>,
    /// Lookups and settings.
    pub(super) env: Environment,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: PluginLimiter,
    /// The batch being handled; `None` outside `handle`.
    pub(super) batch: Option<Batch>,
    /// Set when a host function failed for a host reason during this call.
    pub(super) host_error: Option<String>,
    /// The last error-level message the plugin logged during this call
    /// (SDKs log panic messages there before trapping).
    pub(super) last_error_log: Option<String>,
    /// The first pending write (`kv-packed`) refused during this call. It
    /// rejects the batch whatever the plugin returns: the writes after it in
    /// the same log were never applied, so the batch must not commit.
    pub(super) refused_write: Option<String>,
    /// The calls the plugin made during this call, when tracing
    /// (`refract plugin test`); `None` otherwise, and nothing is recorded.
    pub(super) trace: Option<Vec<HostCall>>,
}

struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The generator behind both of `wasi:random`'s interfaces: SplitMix64 from
/// a fixed seed, so that a projection's "random" numbers (uuid v4,
/// `getrandom`, Python's `random`) are the same every time its events are
/// replayed, and a rebuild builds the same read model. wasmtime-wasi's
/// default draws from the operating system.
struct Replayable(u64);

impl rand_core::TryRng for Replayable {
    type Error = std::convert::Infallible;

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Ok(z ^ (z >> 31))
    }

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok((self.try_next_u64()? >> 32) as u32)
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.try_next_u64()?.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(())
    }
}

/// The most table elements (function references, 8 bytes each) all of an
/// instance's tables may hold together. Components need a few thousand.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// What one plugin instance's store may hold, summed over everything in it:
/// all its linear memories together stay under the memory cap, all its
/// tables under [`MAX_TABLE_ELEMENTS`]. (wasmtime's `StoreLimits` bounds
/// each memory and table alone, and a component may hold several; a
/// `table.grow` by 2^30 would zero-fill gigabytes.) Going past either traps.
pub struct PluginLimiter {
    max_memory: usize,
    /// Bytes of linear memory the store holds, over all its memories.
    memory: usize,
    /// Elements the store's tables hold, over all of them.
    table_elements: usize,
}

impl ResourceLimiter for PluginLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let total = (self.memory - current.min(self.memory)).saturating_add(desired);
        if total > self.max_memory {
            wasmtime::bail!(
                "its memory would grow to {} MiB, past its cap of {} MiB (limits.memory-mb)",
                total >> 20,
                self.max_memory >> 20
            );
        }
        self.memory = total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("growing a memory failed"))
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let total = (self.table_elements - current.min(self.table_elements)).saturating_add(desired);
        if total > MAX_TABLE_ELEMENTS {
            wasmtime::bail!("its tables would hold {total} elements, past the {MAX_TABLE_ELEMENTS} allowed");
        }
        self.table_elements = total;
        Ok(true)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("growing a table failed"))
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        16
    }
}

/// A clock pollable that is ready at once. wasmtime-wasi's sleeps for real
/// time inside the host call, where the epoch deadline cannot interrupt
/// them: a plugin calling `sleep` would hang its worker (and swaps, shutdown
/// and the next start) for as long as it asked. Its clock is frozen anyway.
struct Elapsed;

impl wasmtime_wasi::p2::Pollable for Elapsed {
    fn ready<'a, 'b>(&'a mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
    {
        Box::pin(std::future::ready(()))
    }
}

/// Replace `wasi:clocks/monotonic-clock`'s `subscribe-duration` and
/// `subscribe-instant` in `linker` (after WASI was added to it) with
/// pollables that are ready at once, so that sleeping in a plugin ends at once.
pub(super) fn link_frozen_sleep(linker: &mut wasmtime::component::Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::StoreContextMut;
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;
    fn elapsed(mut store: StoreContextMut<'_, HostState>) -> wasmtime::Result<(Resource<DynPollable>,)> {
        let table = &mut store.data_mut().table;
        let pollable = table.push(Elapsed)?;
        Ok((wasmtime_wasi::p2::subscribe(table, pollable)?,))
    }
    linker.allow_shadowing(true);
    let mut clock = linker.instance("wasi:clocks/monotonic-clock@0.2.12")?;
    clock.func_wrap("subscribe-duration", |store: StoreContextMut<'_, HostState>, (_,): (u64,)| elapsed(store))?;
    clock.func_wrap("subscribe-instant", |store: StoreContextMut<'_, HostState>, (_,): (u64,)| elapsed(store))?;
    linker.allow_shadowing(false);
    Ok(())
}

impl HostState {
    /// A fresh state for an instance of `plugin`, whose memory may grow to `max_memory` bytes.
    pub fn new(plugin: Arc<str>, max_memory: usize, env: Environment) -> Self {
        let wasi = WasiCtxBuilder::new()
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(Replayable(0x5eed))
            .insecure_random(Replayable(0x5eed_5eed))
            .insecure_random_seed(0x5eed)
            .build();
        let limits = PluginLimiter { max_memory, memory: 0, table_elements: 0 };
        HostState {
            plugin,
            env,
            wasi,
            table: ResourceTable::new(),
            limits,
            batch: None,
            host_error: None,
            last_error_log: None,
            refused_write: None,
            trace: None,
        }
    }

    /// Record the call `call` describes, when tracing.
    fn record(&mut self, call: impl FnOnce() -> HostCall) {
        if let Some(trace) = &mut self.trace {
            trace.push(call());
        }
    }

    fn batch(&mut self) -> wasmtime::Result<&mut Batch> {
        self.batch.as_mut().ok_or_else(|| wasmtime::format_err!("kv is only available while handling events"))
    }

    /// `result`, unless the batch went over its byte budget: then the call
    /// traps, so that the plugin cannot carry on past it (the batch is
    /// bisected down to the event that does not fit, a dead letter).
    fn within_budget<T>(&self, result: T) -> wasmtime::Result<T> {
        match self.batch.as_ref().and_then(Batch::over_budget) {
            Some(why) => Err(wasmtime::Error::msg(why.to_owned())),
            None => Ok(result),
        }
    }

    fn host_failure(&mut self, e: crate::store::Error) -> wasmtime::Error {
        let message = e.to_string();
        self.host_error = Some(message.clone());
        wasmtime::Error::msg(message)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for HostState {}

impl kv::Host for HostState {
    fn get(&mut self, table: String, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, KvError>> {
        match self.batch()?.get(&table, &key) {
            Ok(result) => {
                self.record(|| HostCall::Get {
                    value: result.as_ref().ok().and_then(|v| v.as_deref().map(shown)),
                    error: result.as_ref().err().map(|e| kv_error_message(e).to_owned()),
                    table,
                    key,
                });
                Ok(result)
            }
            Err(e) => Err(self.host_failure(e)),
        }
    }

    fn put(&mut self, table: String, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), KvError>> {
        let result = self.batch()?.put_owned(&table, key, value);
        self.within_budget(result)
    }

    fn delete(&mut self, table: String, key: String) -> wasmtime::Result<Result<(), KvError>> {
        let result = self.batch()?.delete(&table, &key);
        self.within_budget(result)
    }

    fn scan(
        &mut self,
        table: String,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<Entry>, KvError>> {
        match self.batch()?.scan(&table, &prefix, start_after.as_deref(), limit) {
            Ok(result) => {
                self.record(|| HostCall::Scan {
                    entries: result
                        .iter()
                        .flatten()
                        .map(|e| trace::Entry { key: e.key.clone(), value: shown(&e.value) })
                        .collect(),
                    error: result.as_ref().err().map(|e| kv_error_message(e).to_owned()),
                    table,
                    prefix,
                    after: start_after,
                    limit,
                });
                Ok(result)
            }
            Err(e) => Err(self.host_failure(e)),
        }
    }
}

impl HostState {
    /// Apply a plugin's pending writes (`kv-packed`); a log that does not
    /// decode is the plugin's fault and traps the call.
    fn apply_pending(&mut self, writes: &[u8]) -> wasmtime::Result<Result<(), RefusedWrite>> {
        let batch = self.batch()?;
        let applied = refract_abi::read_kv(writes, |table, key, value| {
            let written = match value {
                Some(value) => batch.put(table, key, value),
                None => batch.delete(table, key),
            };
            written.map_err(|e| (format!("table {table}: {} (writing {key:?})", kv_error_message(&e)), e))
        });
        self.within_budget(())?;
        match applied {
            Ok(Ok(())) => Ok(Ok(())),
            Ok(Err((index, (message, error)))) => {
                self.refused_write.get_or_insert(message);
                Ok(Err(RefusedWrite { index, error }))
            }
            Err(e) => Err(wasmtime::format_err!("kv-packed: {e}")),
        }
    }
}

fn kv_error_message(error: &KvError) -> &str {
    match error {
        KvError::UnknownTable(m) | KvError::InvalidValue(m) | KvError::TooLarge(m) => m,
    }
}

impl kv_packed::Host for HostState {
    fn apply(&mut self, writes: Vec<u8>) -> wasmtime::Result<Result<(), RefusedWrite>> {
        self.apply_pending(&writes)
    }

    fn get(
        &mut self,
        writes: Vec<u8>,
        table: String,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, PackedError>> {
        if let Err(refused) = self.apply_pending(&writes)? {
            return Ok(Err(PackedError::Write(refused)));
        }
        Ok(kv::Host::get(self, table, key)?.map_err(PackedError::Read))
    }
}

impl search::Host for HostState {
    fn upsert(&mut self, index: String, id: String, document: Vec<u8>) -> wasmtime::Result<Result<(), SearchError>> {
        let result = self.batch()?.search_upsert(&index, &id, &document);
        self.within_budget(result)
    }

    fn delete(&mut self, index: String, id: String) -> wasmtime::Result<Result<(), SearchError>> {
        let result = self.batch()?.search_delete(&index, &id);
        self.within_budget(result)
    }
}

impl emit::Host for HostState {
    fn emit(&mut self, stream: String, event: Outgoing) -> wasmtime::Result<Result<(), EmitError>> {
        let result = self.batch()?.emit(&stream, event);
        self.within_budget(result)
    }
}

impl lookup::Host for HostState {
    fn get(
        &mut self,
        projection: String,
        table: String,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, LookupError>> {
        match self.env.lookup.get(&projection, &table, &key) {
            Ok(value) => {
                self.record(|| HostCall::Lookup {
                    value: value.as_deref().map(shown),
                    error: None,
                    projection,
                    table,
                    key,
                });
                Ok(Ok(value))
            }
            Err(LookupFailure::Refused(error)) => {
                let message = match &error {
                    LookupError::UnknownProjection(m) | LookupError::UnknownTable(m) => m.clone(),
                };
                self.record(|| HostCall::Lookup { value: None, error: Some(message), projection, table, key });
                Ok(Err(error))
            }
            Err(LookupFailure::Host(message)) => {
                self.host_error = Some(message.clone());
                Err(wasmtime::Error::msg(message))
            }
        }
    }
}

impl settings::Host for HostState {
    fn get(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        let value = self.env.settings.get(&name).cloned();
        self.record(|| HostCall::Setting { name, value: value.clone() });
        Ok(value)
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, mut message: String) -> wasmtime::Result<()> {
        if message.len() > MAX_LOG_MESSAGE {
            let mut cut = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        self.record(|| HostCall::Log {
            level: match level {
                log::Level::Trace => "trace",
                log::Level::Debug => "debug",
                log::Level::Info => "info",
                log::Level::Warn => "warn",
                log::Level::Error => "error",
            },
            message: message.clone(),
        });
        let plugin = &*self.plugin;
        match level {
            log::Level::Trace => tracing::trace!(target: "refract::plugin", plugin, "{message}"),
            log::Level::Debug => tracing::debug!(target: "refract::plugin", plugin, "{message}"),
            log::Level::Info => tracing::info!(target: "refract::plugin", plugin, "{message}"),
            log::Level::Warn => tracing::warn!(target: "refract::plugin", plugin, "{message}"),
            log::Level::Error => {
                tracing::error!(target: "refract::plugin", plugin, "{message}");
                self.last_error_log = Some(message);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use wasm_encoder::{
        CodeSection, ExportKind, ExportSection, Function, FunctionSection, Instruction, MemorySection, MemoryType,
        Module, RefType, TableSection, TableType, TypeSection, ValType,
    };
    use wasmtime::{Instance, Store};

    use super::*;

    /// A core module exporting `grow0`, `grow1` (memory.grow on its two
    /// memories) and `grow_table` (table.grow with null), each `(i32) -> i32`.
    fn grower() -> Vec<u8> {
        let mut module = Module::new();
        let mut types = TypeSection::new();
        types.ty().function([ValType::I32], [ValType::I32]);
        module.section(&types);
        let mut functions = FunctionSection::new();
        (0..3).for_each(|_| {
            functions.function(0);
        });
        module.section(&functions);
        let mut tables = TableSection::new();
        tables.table(TableType {
            element_type: RefType::FUNCREF,
            table64: false,
            minimum: 1,
            maximum: None,
            shared: false,
        });
        module.section(&tables);
        let mut memories = MemorySection::new();
        for _ in 0..2 {
            memories.memory(MemoryType {
                minimum: 1,
                maximum: None,
                memory64: false,
                shared: false,
                page_size_log2: None,
            });
        }
        module.section(&memories);
        let mut exports = ExportSection::new();
        exports.export("grow0", ExportKind::Func, 0).export("grow1", ExportKind::Func, 1).export(
            "grow_table",
            ExportKind::Func,
            2,
        );
        module.section(&exports);
        let mut code = CodeSection::new();
        for body in [
            vec![Instruction::LocalGet(0), Instruction::MemoryGrow(0)],
            vec![Instruction::LocalGet(0), Instruction::MemoryGrow(1)],
            vec![
                Instruction::RefNull(wasm_encoder::HeapType::FUNC),
                Instruction::LocalGet(0),
                Instruction::TableGrow(0),
            ],
        ] {
            let mut f = Function::new([]);
            body.iter().for_each(|i| {
                f.instruction(i);
            });
            f.instruction(&Instruction::End);
            code.function(&f);
        }
        module.section(&code);
        module.finish()
    }

    /// `wasi:random` gives every new instance the same sequence: replaying
    /// the same events builds the same read model.
    #[test]
    fn random_bytes_are_the_same_in_every_instance() {
        use wasmtime_wasi::p2::bindings::random::{insecure, random};
        let bytes = |state: &mut HostState| {
            let secure = random::Host::get_random_bytes(state.wasi.random(), 32).unwrap();
            let insecure = insecure::Host::get_insecure_random_bytes(state.wasi.random(), 32).unwrap();
            (secure, insecure)
        };
        let mut a = HostState::new("p".into(), 1 << 20, Default::default());
        let mut b = HostState::new("p".into(), 1 << 20, Default::default());
        let first = bytes(&mut a);
        assert_eq!(first, bytes(&mut b));
        assert_ne!(first.0, first.1);
        assert_ne!(bytes(&mut a), first, "a sequence, not one value repeated");
    }

    /// The cap holds for all of a store's memories together and for its
    /// tables: growth within it succeeds, growth past it traps with the reason.
    #[test]
    fn memories_and_tables_are_capped_together_and_growth_past_the_cap_traps() {
        let engine = super::super::engine::new_engine().unwrap();
        let module = wasmtime::Module::new(&engine, grower()).unwrap();
        let mut store = Store::new(&engine, HostState::new("p".into(), 32 << 20, Default::default()));
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = Instance::new(&mut store, &module, &[]).unwrap();
        let grow = |store: &mut Store<HostState>, name: &str, n: i32| {
            instance.get_typed_func::<i32, i32>(&mut *store, name).unwrap().call(&mut *store, n)
        };
        // 64 KiB pages: 2 + 300 + 200 = 502 pages, under 512 (32 MiB).
        assert_eq!(grow(&mut store, "grow0", 300).unwrap(), 1);
        assert_eq!(grow(&mut store, "grow1", 200).unwrap(), 1);
        // Each memory alone is under the cap; together they would not be.
        let error = grow(&mut store, "grow1", 20).unwrap_err();
        assert!(format!("{error:?}").contains("past its cap of 32 MiB"), "{error:?}");

        let mut store = Store::new(&engine, HostState::new("p".into(), 32 << 20, Default::default()));
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = Instance::new(&mut store, &module, &[]).unwrap();
        let grow = |store: &mut Store<HostState>, n: i32| {
            instance.get_typed_func::<i32, i32>(&mut *store, "grow_table").unwrap().call(&mut *store, n)
        };
        assert_eq!(grow(&mut store, 10_000).unwrap(), 1);
        let error = grow(&mut store, 1 << 30).unwrap_err();
        assert!(format!("{error:?}").contains("past the 1048576 allowed"), "{error:?}");
    }
}
