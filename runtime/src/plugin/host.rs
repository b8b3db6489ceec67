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

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::Environment;
use super::bindings::refract::plugin::emit::{self, EmitError, Outgoing};
use super::bindings::refract::plugin::kv::{self, Entry, KvError};
use super::bindings::refract::plugin::kv_packed::{self, PackedError, RefusedWrite};
use super::bindings::refract::plugin::lookup::{self, LookupError};
use super::bindings::refract::plugin::search::{self, SearchError};
use super::bindings::refract::plugin::{log, settings, types};
use crate::store::Batch;

/// The longest log message kept from a plugin; longer ones are cut.
const MAX_LOG_MESSAGE: usize = 4096;

/// The state of one plugin instance's store.
pub struct HostState {
    plugin: Arc<str>,
    /// Lookups and settings.
    pub(super) env: Environment,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: StoreLimits,
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
            .insecure_random_seed(0x5eed)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(max_memory)
            .instances(64)
            .tables(64)
            .memories(16)
            .trap_on_grow_failure(true)
            .build();
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
        }
    }

    fn batch(&mut self) -> wasmtime::Result<&mut Batch> {
        self.batch.as_mut().ok_or_else(|| wasmtime::format_err!("kv is only available while handling events"))
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
            Ok(result) => Ok(result),
            Err(e) => Err(self.host_failure(e)),
        }
    }

    fn put(&mut self, table: String, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), KvError>> {
        Ok(self.batch()?.put_owned(&table, key, value))
    }

    fn delete(&mut self, table: String, key: String) -> wasmtime::Result<Result<(), KvError>> {
        Ok(self.batch()?.delete(&table, &key))
    }

    fn scan(
        &mut self,
        table: String,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<Entry>, KvError>> {
        match self.batch()?.scan(&table, &prefix, start_after.as_deref(), limit) {
            Ok(result) => Ok(result),
            Err(e) => Err(self.host_failure(e)),
        }
    }
}

impl HostState {
    /// Apply a plugin's pending writes (`kv-packed`); a log that does not
    /// decode is the plugin's fault and traps the call.
    fn apply_pending(&mut self, writes: &[u8]) -> wasmtime::Result<Result<(), RefusedWrite>> {
        let batch = self.batch()?;
        let applied = refract_sdk::packed::read_kv(writes, |table, key, value| {
            let written = match value {
                Some(value) => batch.put(table, key, value),
                None => batch.delete(table, key),
            };
            written.map_err(|e| (format!("table {table}: {} (writing {key:?})", kv_error_message(&e)), e))
        });
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
        Ok(self.batch()?.search_upsert(&index, &id, &document))
    }

    fn delete(&mut self, index: String, id: String) -> wasmtime::Result<Result<(), SearchError>> {
        Ok(self.batch()?.search_delete(&index, &id))
    }
}

impl emit::Host for HostState {
    fn emit(&mut self, stream: String, event: Outgoing) -> wasmtime::Result<Result<(), EmitError>> {
        Ok(self.batch()?.emit(&stream, event))
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
            Ok(result) => Ok(result),
            Err(message) => {
                self.host_error = Some(message.clone());
                Err(wasmtime::Error::msg(message))
            }
        }
    }
}

impl settings::Host for HostState {
    fn get(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self.env.settings.get(&name).cloned())
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
