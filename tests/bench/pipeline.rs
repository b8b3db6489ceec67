//! `cargo bench -p refract --bench pipeline`: the order-summary projection
//! end to end, against its baselines, in one run over the same events.
//!
//! - **log scan**: reading and decoding every event from the embedded log;
//! - **redb insert**: inserting the rows the projection writes, coalesced
//!   per key within a transaction as the projector coalesces them and in
//!   key order, durable commits, swept over transactions of 10,000, 40,000
//!   and 160,000 events; the best of the sweep is the ceiling the projection
//!   is measured against;
//! - **native**: the order-summary crate compiled into the host, through the
//!   same projector, batches and storage;
//! - **wasm**: the order-summary component, through the same pipeline;
//! - **call only**: the plugin's `handle` over the same events in the
//!   projector's batch size, natively and as WebAssembly, against the
//!   batch's in-memory key/value overlay with nothing committed — what the
//!   sandbox itself costs, without redb to dilute it.
//!
//! Set `REFRACT_BENCH_EVENTS` to change the number of events (default
//! 1,000,000) and `REFRACT_BENCH_ROUNDS` the number of alternating rounds
//! (default 3; the figures are the medians).

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use order_summary::OrderSummary;
use redb::{Database, Durability, TableDefinition};
use refract::plugin::Handler;
use refract::plugin::cache::CompileCache;
use refract::plugin::native::NativeProjection;
use refract::plugin::wasm::{self, PluginLimits, WasmPlugin};
use refract::projector::BatchOptions;
use refract::source::Event;
use refract::source::log::EventLog;
use refract::store::{KvLimits, ReadModel};
use refract_sdk::Projection;
use refract_sdk::native::{Backend, MemoryBackend, with_backend};
use refract_sdk::wit::refract::plugin::emit::{EmitError, Outgoing};
use refract_sdk::wit::refract::plugin::kv::{Entry, KvError};
use refract_sdk::wit::refract::plugin::search::SearchError;

// The allocator of the `refract` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Records every put a projection makes, in order.
#[derive(Default)]
struct Recorder {
    memory: MemoryBackend,
    puts: Vec<(String, String, Vec<u8>)>,
}

impl Backend for Recorder {
    fn get(&mut self, table: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Backend::get(&mut self.memory, table, key)
    }
    fn put(&mut self, table: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.puts.push((table.to_owned(), key.to_owned(), value.to_vec()));
        self.memory.put(table, key, value)
    }
    fn delete(&mut self, table: &str, key: &str) -> Result<(), KvError> {
        self.memory.delete(table, key)
    }
    fn scan(&mut self, table: &str, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<Entry>, KvError> {
        self.memory.scan(table, prefix, after, limit)
    }
    fn search_upsert(&mut self, index: &str, id: &str, document: &[u8]) -> Result<(), SearchError> {
        self.memory.search_upsert(index, id, document)
    }
    fn search_delete(&mut self, index: &str, id: &str) -> Result<(), SearchError> {
        self.memory.search_delete(index, id)
    }
    fn emit(&mut self, stream: &str, event: Outgoing) -> Result<(), EmitError> {
        self.memory.emit(stream, event)
    }
}

struct Measure {
    name: &'static str,
    events: usize,
    seconds: f64,
}

impl Measure {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// Run `handler` through the projector until it has consumed the whole log.
/// Run `handler` through the projector over the whole log: seconds.
fn run_pipeline(name: &str, handler: Box<dyn Handler>, log: &Arc<EventLog>, dir: &std::path::Path) -> f64 {
    let (seconds, read_model) = common::run_projector(name, handler, log, &["orders"], dir);
    let total: u64 = log.heads("orders").unwrap().iter().sum();
    let counters = read_model.counters().unwrap();
    assert_eq!(counters.events_applied, total, "{name}: every event applied");
    assert_eq!(counters.dead_letters, 0, "{name}: no dead letters");
    seconds
}

/// The recorded rows inserted into a new redb file at `path`, `batch_events`
/// events' rows per durable transaction, as a careful engineer would write
/// it: each key's last value only (the projector coalesces repeated writes to
/// a key within a batch), inserted table by table in key order: seconds.
fn raw_insert(path: &std::path::Path, per_event: &[Vec<(String, String, Vec<u8>)>], batch_events: usize) -> f64 {
    let raw = Database::create(path).unwrap();
    let started = Instant::now();
    let mut last: HashMap<(&str, &str), &[u8], foldhash::fast::RandomState> = HashMap::default();
    for batch in per_event.chunks(batch_events) {
        last.clear();
        for (table, key, value) in batch.iter().flatten() {
            last.insert((table.as_str(), key.as_str()), value.as_slice());
        }
        let mut rows: Vec<_> = last.iter().map(|(&(table, key), &value)| (table, key, value)).collect();
        rows.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mut tx = raw.begin_write().unwrap();
        tx.set_durability(Durability::Immediate).unwrap();
        for rows in rows.chunk_by(|a, b| a.0 == b.0) {
            let mut t = tx.open_table(TableDefinition::<&str, &[u8]>::new(&format!("t/{}", rows[0].0))).unwrap();
            for (_, key, value) in rows {
                t.insert(*key, *value).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    started.elapsed().as_secs_f64()
}

/// `handler`'s `handle` alone over `events` in batches of `batch_events`, on
/// one batch of an empty read model whose in-memory overlay holds every
/// write (reads see earlier batches' writes, as after commits); nothing is
/// committed: seconds.
fn call_only(handler: &mut dyn Handler, events: &[Event], batch_events: usize, dir: &std::path::Path) -> f64 {
    let read_model = ReadModel::open(&dir.join("call-only.redb")).unwrap();
    let declared = Arc::new(refract::plugin::declared(handler).unwrap());
    let mut batch = read_model.begin(declared, KvLimits::default(), None).unwrap();
    let started = Instant::now();
    for chunk in events.chunks(batch_events) {
        let (next, result) = handler.handle(batch, chunk);
        result.unwrap();
        batch = next;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(batch);
    drop(read_model);
    std::fs::remove_file(dir.join("call-only.redb")).unwrap();
    seconds
}

fn main() {
    refract::allocator::configure();
    let n: usize = std::env::var("REFRACT_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let wasm_path = &support::plugins().order_summary;

    eprintln!("generating {n} order events …");
    let events = refract_client::fixtures::orders(n, 42, 0.0);
    let log = common::open_log(dir.path());
    let started = Instant::now();
    common::append(&log, "orders", &events);
    let append = Measure { name: "log append (10k per request)", events: n, seconds: started.elapsed().as_secs_f64() };

    // Baseline 1: scan and decode the whole log.
    let started = Instant::now();
    let mut scanned = 0;
    for p in 0..4 {
        let mut from = 0;
        loop {
            let batch = log.read("orders", p, from, 10_000, usize::MAX).unwrap();
            let Some(last) = batch.last() else { break };
            from = last.offset + 1;
            scanned += batch.len();
        }
    }
    assert_eq!(scanned, n);
    let scan = Measure { name: "raw log scan", events: n, seconds: started.elapsed().as_secs_f64() };

    // Baseline 2: the rows the projection writes, inserted raw into redb in
    // transactions covering as many events as a projector batch.
    let mut per_event = Vec::with_capacity(n);
    let mut recorder = Recorder::default();
    for p in 0..4 {
        for e in log.read("orders", p, 0, usize::MAX, usize::MAX).unwrap() {
            let event = refract_sdk::testing::event("orders", &e.event_type, e.key.as_deref(), &e.data);
            let (mut r, result) = with_backend(std::mem::take(&mut recorder), || OrderSummary::apply(&event));
            result.unwrap();
            per_event.push(std::mem::take(&mut r.puts));
            recorder = r;
        }
    }
    let options = BatchOptions::default();
    // The events in the order the call-only loop hands them over: partition
    // by partition (each order's events share a partition, so keep their order).
    let all_events: Vec<Event> =
        (0..4).flat_map(|p| log.read("orders", p, 0, usize::MAX, usize::MAX).unwrap()).collect();

    // Everything takes turns `REFRACT_BENCH_ROUNDS` times (default 3), so
    // that all variants meet the same changes in the machine's load; the
    // figures are the medians.
    let engine = refract::plugin::engine::new_engine().unwrap();
    let cache = CompileCache::new(&dir.path().join("cache"), &engine).unwrap();
    let (component, _) = cache.load(&std::fs::read(wasm_path).unwrap()).unwrap();
    let linker = wasm::linker(&engine).unwrap();
    let wasm_plugin =
        || WasmPlugin::load(&engine, &linker, &component, "order-summary", PluginLimits::default()).unwrap();
    let native_plugin = || NativeProjection::new(OrderSummary::manifest(), OrderSummary::handle);
    let rounds: usize = std::env::var("REFRACT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    const SWEEP: [usize; 3] = [10_000, 40_000, 160_000];
    let mut inserts: [Vec<f64>; 3] = Default::default();
    let (mut natives, mut wasms, mut native_calls, mut wasm_calls) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for (size, runs) in SWEEP.iter().zip(&mut inserts) {
            runs.push(raw_insert(&dir.path().join(format!("raw-{round}-{size}.redb")), &per_event, *size));
            std::fs::remove_file(dir.path().join(format!("raw-{round}-{size}.redb"))).unwrap();
        }
        natives.push(run_pipeline(&format!("native-{round}"), Box::new(native_plugin()), &log, dir.path()));
        wasms.push(run_pipeline(&format!("wasm-{round}"), Box::new(wasm_plugin()), &log, dir.path()));
        native_calls.push(call_only(&mut native_plugin(), &all_events, options.max_events, dir.path()));
        wasm_calls.push(call_only(&mut wasm_plugin(), &all_events, options.max_events, dir.path()));
        eprintln!(
            "round {round}: raw insert {:.2} / {:.2} / {:.2} s, native {:.2} s, wasm {:.2} s, call only: native {:.2} s, wasm {:.2} s",
            inserts[0][round],
            inserts[1][round],
            inserts[2][round],
            natives[round],
            wasms[round],
            native_calls[round],
            wasm_calls[round]
        );
    }
    let sweep: Vec<Measure> = SWEEP
        .iter()
        .zip(&inserts)
        .zip(["raw redb insert, 10,000 events per transaction", "raw redb insert, 40,000", "raw redb insert, 160,000"])
        .map(|((_, runs), name)| Measure { name, events: n, seconds: common::median(runs) })
        .collect();
    let best_insert = sweep.iter().min_by(|a, b| a.seconds.total_cmp(&b.seconds)).unwrap();
    let native = Measure { name: "native", events: n, seconds: common::median(&natives) };
    let wasm = Measure { name: "wasm", events: n, seconds: common::median(&wasms) };
    let native_call = Measure { name: "call only, native", events: n, seconds: common::median(&native_calls) };
    let wasm_call = Measure { name: "call only, wasm", events: n, seconds: common::median(&wasm_calls) };

    // Compile cache: a cold compile against a load from the cache.
    let wasm_bytes = std::fs::read(wasm_path).unwrap();
    let cold_cache = CompileCache::new(&dir.path().join("cold"), &engine).unwrap();
    let started = Instant::now();
    cold_cache.load(&wasm_bytes).unwrap();
    let cold = started.elapsed().as_secs_f64();
    let started = Instant::now();
    cold_cache.load(&wasm_bytes).unwrap();
    let warm = started.elapsed().as_secs_f64();

    println!("\norder-summary over {n} events ({} KiB component)\n", wasm_bytes.len() / 1024);
    println!("| measure | events/s | seconds |");
    println!("|---|---:|---:|");
    for m in [&append, &scan].into_iter().chain(&sweep).chain([&native, &wasm, &native_call, &wasm_call]) {
        println!("| {} | {:.0} | {:.2} |", m.name, m.rate(), m.seconds);
    }
    let best_rounds = &inserts[sweep.iter().position(|m| std::ptr::eq(m, best_insert)).unwrap()];
    println!("\n| ratio | median | rounds | target |");
    println!("|---|---:|---:|---:|");
    println!(
        "| call only, wasm / native | **{:.2}** | {} | ≥ 0.80 |",
        wasm_call.rate() / native_call.rate(),
        common::spread(&common::rate_ratios(&wasm_calls, &native_calls))
    );
    println!(
        "| end to end, wasm / native | {:.2} | {} | ≥ 0.80 |",
        wasm.rate() / native.rate(),
        common::spread(&common::rate_ratios(&wasms, &natives))
    );
    println!(
        "| wasm end to end / best raw insert ({}) | **{:.2}** | {} | ≥ 0.75 |",
        best_insert.name,
        wasm.rate() / best_insert.rate(),
        common::spread(&common::rate_ratios(&wasms, best_rounds))
    );
    println!(
        "| native end to end / best raw insert | {:.2} | {} | |",
        native.rate() / best_insert.rate(),
        common::spread(&common::rate_ratios(&natives, best_rounds))
    );
    println!("| wasm end to end / raw log scan | {:.2} | | |", wasm.rate() / scan.rate());
    println!(
        "| cached load / cold compile | {:.1} ms vs {:.1} ms = {:.0}× faster | | ≥ 100× |",
        warm * 1e3,
        cold * 1e3,
        cold / warm
    );
}
