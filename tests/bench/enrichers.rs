//! `cargo bench -p refract --bench enrichers`: enrichers through the
//! projector, as WebAssembly components against the same Rust code compiled
//! into the host, in one run over the same events.
//!
//! - **map**: `order-upcaster` over `orders-raw` (a third of the orders in
//!   the version 1 shape, rewritten; everything else passed through);
//! - **join**: `orders-payments-join` over `orders` and `payments` (each
//!   order paid once within its window, or never).
//!
//! Both commit their outputs to the emitted outbox with their state and
//! checkpoints, as in the runtime (publishing them is the relay's job and
//! not measured here). Set `REFRACT_BENCH_EVENTS` to change the number of
//! events per enricher (default 400,000). Each variant runs
//! `REFRACT_BENCH_ROUNDS` times (default 3), native and wasm alternating; the
//! figures are the medians.

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;

use order_upcaster::OrderUpcaster;
use orders_payments_join::OrdersPaymentsJoin;
use refract::plugin::Handler;
use refract::plugin::cache::CompileCache;
use refract::plugin::native::NativeEnricher;
use refract::plugin::route::Routes;
use refract::plugin::wasm::{self, PluginLimits, WasmPlugin};
use refract::source::log::EventLog;
use refract_sdk::Enricher;
use serde_json::{Value, json};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One run of an enricher over its streams.
struct Run {
    /// Events per second of wall time.
    rate: f64,
    /// Events per CPU second of the whole process.
    cpu_rate: f64,
    /// Outputs committed.
    outputs: u64,
}

/// Run `handler` through the projector until it has consumed `streams`.
fn run(name: &str, handler: Box<dyn Handler>, log: &Arc<EventLog>, streams: &[&str], dir: &Path) -> Run {
    let cpu = common::process_cpu_seconds();
    let (seconds, read_model) = common::run_projector(name, handler, log, streams, dir);
    let cpu = common::process_cpu_seconds() - cpu;
    let total: u64 = streams.iter().map(|s| log.heads(s).unwrap().iter().sum::<u64>()).sum();
    let counters = read_model.counters().unwrap();
    assert_eq!((counters.events_applied, counters.dead_letters), (total, 0), "{name}: every event enriched");
    Run { rate: total as f64 / seconds, cpu_rate: total as f64 / cpu, outputs: read_model.emit_progress().unwrap().0 }
}

fn wasm_enricher(engine: &wasmtime::Engine, cache: &CompileCache, path: &Path, name: &str) -> Box<dyn Handler> {
    let (component, _) = cache.load(&std::fs::read(path).unwrap()).unwrap();
    let linker = wasm::linker(engine).unwrap();
    Box::new(WasmPlugin::load(engine, &linker, &component, name, PluginLimits::default()).unwrap())
}

fn main() {
    refract::allocator::configure();
    let n: usize = std::env::var("REFRACT_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(400_000);
    let dir = tempfile::tempdir().unwrap();
    let plugins = support::plugins();
    let log = common::open_log(dir.path());

    eprintln!("generating {n} events per enricher …");
    let mut placed = 0;
    let raw: Vec<Value> = refract_client::fixtures::orders(n, 42, 0.0)
        .into_iter()
        .map(|e| {
            if e["type"] != "OrderPlaced" {
                return e;
            }
            placed += 1;
            if placed % 3 != 0 {
                return e;
            }
            let d = &e["data"];
            json!({"type": "OrderPlaced", "key": e["key"], "time": e["time"],
                   "data": {"order_id": d["orderId"], "customer": d["customerId"], "amount": d["total"],
                            "lines": [], "note": d["description"]}})
        })
        .collect();
    common::append(&log, "orders-raw", &raw);
    let mut rng = refract_client::fixtures::Rng::new(7);
    let (mut orders, mut payments) = (Vec::new(), Vec::new());
    for i in 0..n / 2 {
        let (id, t) = (format!("o-{i}"), 1_700_000_000_000i64 + i as i64 * 1_000);
        let total = rng.range(100, 100_000) as f64 / 100.0;
        orders.push(json!({"type": "OrderPlaced", "key": id, "time": t,
                           "data": {"orderId": id, "customerId": format!("c-{}", i % 1000), "total": total}}));
        if rng.unit() < 0.9 {
            let at = t + rng.range(0, 30_000) as i64;
            payments.push(json!({"type": "PaymentReceived", "key": id, "time": at,
                                 "data": {"orderId": id, "paymentId": format!("p-{i}"), "amount": total}}));
        }
    }
    payments.sort_by_key(|p| p["time"].as_i64());
    common::append(&log, "orders", &orders);
    common::append(&log, "payments", &payments);

    let engine = refract::plugin::engine::new_engine().unwrap();
    let cache = CompileCache::new(&dir.path().join("cache"), &engine).unwrap();
    let rounds: usize = std::env::var("REFRACT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    // `REFRACT_BENCH_ONLY=join` (or `map`) runs one of the two, e.g. under `perf`.
    let only = std::env::var("REFRACT_BENCH_ONLY").unwrap_or_default();
    let mut map = Compared::default();
    if only != "join" {
        let native = || -> Box<dyn Handler> {
            Box::new(NativeEnricher::new(
                OrderUpcaster::manifest(),
                OrderUpcaster::enrich_batch,
                Routes::to_own_stream("m"),
            ))
        };
        let wasm = || wasm_enricher(&engine, &cache, &plugins.order_upcaster, "order-upcaster");
        map = compare("map", rounds, native, wasm, &log, &["orders-raw"], dir.path());
    }
    let mut join = Compared::default();
    if only != "map" {
        let native = || -> Box<dyn Handler> {
            Box::new(NativeEnricher::new(
                OrdersPaymentsJoin::manifest(),
                OrdersPaymentsJoin::enrich_batch,
                Routes::to_own_stream("j"),
            ))
        };
        let wasm = || wasm_enricher(&engine, &cache, &plugins.orders_payments_join, "orders-payments-join");
        join = compare("join", rounds, native, wasm, &log, &["orders", "payments"], dir.path());
        // `REFRACT_BENCH_JOIN_ALT=<file.wasm>`: another build of the join, run
        // in the same rounds (an A/B of a change to the plugin or the SDK).
        if let Ok(alt) = std::env::var("REFRACT_BENCH_JOIN_ALT") {
            let alt = || wasm_enricher(&engine, &cache, Path::new(&alt), "orders-payments-join");
            let wasm = || wasm_enricher(&engine, &cache, &plugins.orders_payments_join, "orders-payments-join");
            let ab = compare("join-ab", rounds, wasm, alt, &log, &["orders", "payments"], dir.path());
            let m = ab.medians();
            println!(
                "A/B: wasm {:.0} events/s, alternative {:.0} events/s: {:.2}; per CPU second {:.0} and {:.0}: {:.2}",
                m.native,
                m.wasm,
                m.wasm / m.native,
                m.native_cpu,
                m.wasm_cpu,
                m.wasm_cpu / m.native_cpu
            );
        }
    }

    let join_events = orders.len() + payments.len();
    println!(
        "\nenrichers through the projector (outputs committed with state and checkpoints), \
         median of {rounds} alternating rounds\n"
    );
    println!(
        "| enricher | events | outputs | native events/s | wasm events/s | wasm / native | \
         wasm / native per CPU second | target |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, events, c) in [("map (order-upcaster)", n, &map), ("join (orders-payments-join)", join_events, &join)] {
        let m = c.medians();
        println!(
            "| {name} | {events} | {} | {:.0} | {:.0} | {:.2} | {:.2} | ≥ 0.80 |",
            c.outputs,
            m.native,
            m.wasm,
            m.wasm / m.native,
            m.wasm_cpu / m.native_cpu
        );
    }
}

/// Events per second (of wall time, and per CPU second) of each round of the
/// native and the wasm variant, and how many outputs each round committed
/// (the same for all).
#[derive(Default)]
struct Compared {
    native: Vec<f64>,
    wasm: Vec<f64>,
    native_cpu: Vec<f64>,
    wasm_cpu: Vec<f64>,
    outputs: u64,
}

/// The medians of [`Compared`]'s rounds.
struct Medians {
    native: f64,
    wasm: f64,
    native_cpu: f64,
    wasm_cpu: f64,
}

impl Compared {
    fn medians(&self) -> Medians {
        Medians {
            native: common::median(&self.native),
            wasm: common::median(&self.wasm),
            native_cpu: common::median(&self.native_cpu),
            wasm_cpu: common::median(&self.wasm_cpu),
        }
    }
}

/// Run the native and the wasm variant of an enricher `rounds` times each,
/// alternating, so that both meet the same changes in the machine's load.
fn compare(
    name: &str,
    rounds: usize,
    native: impl Fn() -> Box<dyn Handler>,
    wasm: impl Fn() -> Box<dyn Handler>,
    log: &Arc<EventLog>,
    streams: &[&str],
    dir: &Path,
) -> Compared {
    let mut c = Compared::default();
    for round in 0..rounds {
        let n = run(&format!("{name}-native-{round}"), native(), log, streams, dir);
        let w = run(&format!("{name}-wasm-{round}"), wasm(), log, streams, dir);
        assert_eq!(n.outputs, w.outputs, "{name}: the same outputs");
        eprintln!(
            "{name} round {round}: native {:.0} events/s ({:.0} per CPU second), wasm {:.0} events/s ({:.0})",
            n.rate, n.cpu_rate, w.rate, w.cpu_rate
        );
        c.native.push(n.rate);
        c.wasm.push(w.rate);
        c.native_cpu.push(n.cpu_rate);
        c.wasm_cpu.push(w.cpu_rate);
        c.outputs = n.outputs;
    }
    c
}
