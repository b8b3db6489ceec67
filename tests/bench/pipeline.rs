//! `cargo bench -p refract --bench pipeline`: the order-summary projection
//! end to end, against its baselines, in one run over the same events.
//!
//! - **log scan**: reading and decoding every event from the embedded log;
//! - **redb insert**: inserting the rows the projection writes, in
//!   transactions of the projector's catch-up batch size before it grows
//!   (`max-events` × `catch-up-factor`), durable commits;
//! - **native**: the order-summary crate compiled into the host, through the
//!   same projector, batches and storage;
//! - **wasm**: the order-summary component, through the same pipeline.
//!
//! Set `REFRACT_BENCH_EVENTS` to change the number of events (default
//! 1,000,000) and `REFRACT_BENCH_ROUNDS` the number of alternating rounds of
//! the last three (default 3; the figures are the medians).

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
use refract::source::NewEvent;
use refract::source::log::{EventLog, LogOptions};
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
/// events' rows per durable transaction: seconds.
fn raw_insert(path: &std::path::Path, per_event: &[Vec<(String, String, Vec<u8>)>], batch_events: usize) -> f64 {
    let raw = Database::create(path).unwrap();
    let started = Instant::now();
    for batch in per_event.chunks(batch_events) {
        let mut tx = raw.begin_write().unwrap();
        tx.set_durability(Durability::Immediate).unwrap();
        {
            let mut tables = HashMap::new();
            for rows in batch {
                for (table, key, value) in rows {
                    let t = tables.entry(table.as_str()).or_insert_with(|| {
                        tx.open_table(TableDefinition::<&str, &[u8]>::new(&format!("t/{table}"))).unwrap()
                    });
                    t.insert(key.as_str(), value.as_slice()).unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }
    started.elapsed().as_secs_f64()
}

fn main() {
    refract::allocator::configure();
    let n: usize = std::env::var("REFRACT_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let wasm_path = &support::plugins().order_summary;

    eprintln!("generating {n} order events …");
    let events = refract::fixtures::orders(n, 42, 0.0);
    let log = Arc::new(
        EventLog::open(&dir.path().join("log.redb"), LogOptions { default_partitions: 4, ..Default::default() })
            .unwrap(),
    );
    let started = Instant::now();
    for chunk in events.chunks(10_000) {
        let chunk: Vec<NewEvent> = chunk.iter().map(|e| serde_json::from_value(e.clone()).unwrap()).collect();
        log.append("orders", &chunk).unwrap();
    }
    let append = Measure { name: "log append (10k per request)", events: n, seconds: started.elapsed().as_secs_f64() };

    // Baseline 1: scan and decode the whole log.
    let started = Instant::now();
    let mut scanned = 0;
    for p in 0..4 {
        let mut from = 0;
        loop {
            let batch = log.read("orders", p, from, 10_000).unwrap();
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
        for e in log.read("orders", p, 0, usize::MAX).unwrap() {
            let event = refract_sdk::testing::event("orders", &e.event_type, e.key.as_deref(), &e.data);
            let (mut r, result) = with_backend(std::mem::take(&mut recorder), || OrderSummary::apply(&event));
            result.unwrap();
            per_event.push(std::mem::take(&mut r.puts));
            recorder = r;
        }
    }
    // A projection consuming a backlog commits catch-up batches.
    let options = BatchOptions::default();
    let batch_events = options.max_events * options.catch_up_factor as usize;

    // The raw inserts and the projection, natively and as WebAssembly, take
    // turns `REFRACT_BENCH_ROUNDS` times (default 3), so that all three meet
    // the same changes in the machine's load; the figures are the medians.
    let engine = refract::plugin::engine::new_engine().unwrap();
    let cache = CompileCache::new(&dir.path().join("cache"), &engine).unwrap();
    let (component, _) = cache.load(&std::fs::read(wasm_path).unwrap()).unwrap();
    let linker = wasm::linker(&engine).unwrap();
    let rounds: usize = std::env::var("REFRACT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let (mut inserts, mut natives, mut wasms) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        inserts.push(raw_insert(&dir.path().join(format!("raw-{round}.redb")), &per_event, batch_events));
        let native = Box::new(NativeProjection::new(OrderSummary::manifest(), OrderSummary::handle));
        natives.push(run_pipeline(&format!("native-{round}"), native, &log, dir.path()));
        let plugin = WasmPlugin::load(&engine, &linker, &component, "order-summary", PluginLimits::default()).unwrap();
        wasms.push(run_pipeline(&format!("wasm-{round}"), Box::new(plugin), &log, dir.path()));
        eprintln!(
            "round {round}: raw insert {:.2} s, native {:.2} s, wasm {:.2} s",
            inserts[round], natives[round], wasms[round]
        );
    }
    let insert = Measure { name: "raw redb insert (same rows)", events: n, seconds: common::median(&inserts) };
    let native = Measure { name: "native", events: n, seconds: common::median(&natives) };
    let wasm = Measure { name: "wasm", events: n, seconds: common::median(&wasms) };

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
    for m in [&append, &scan, &insert, &native, &wasm] {
        println!("| {} | {:.0} | {:.2} |", m.name, m.rate(), m.seconds);
    }
    let bound = scan.rate().min(insert.rate());
    println!("\n| ratio | value | target |");
    println!("|---|---:|---:|");
    println!("| wasm / native | {:.2} | ≥ 0.80 |", wasm.rate() / native.rate());
    println!("| wasm end-to-end / min(scan, insert) | {:.2} | ≥ 0.80 |", wasm.rate() / bound);
    println!("| native end-to-end / min(scan, insert) | {:.2} | |", native.rate() / bound);
    println!(
        "| cached load / cold compile | {:.1} ms vs {:.1} ms = {:.0}× faster | ≥ 100× |",
        warm * 1e3,
        cold * 1e3,
        cold / warm
    );
}
