//! `cargo bench -p refract --bench languages`: `order-summary` written in
//! Rust, Python and JavaScript, through the same projector over the same
//! events, against the Rust crate compiled into the host; and each
//! component's first compile against its load from the compile cache.
//!
//! Set `REFRACT_BENCH_EVENTS` to change the number of events (default 100,000).

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use order_summary::OrderSummary;
use refract::plugin::Handler;
use refract::plugin::cache::CompileCache;
use refract::plugin::native::NativeProjection;
use refract::plugin::wasm::{self, PluginLimits, WasmPlugin};
use refract::source::log::EventLog;
use refract_sdk::Projection;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Events per second of `handler` through the projector over the whole log.
fn run(name: &str, handler: Box<dyn Handler>, log: &Arc<EventLog>, dir: &Path) -> f64 {
    let (seconds, read_model) = common::run_projector(name, handler, log, &["orders"], dir);
    let total: u64 = log.heads("orders").unwrap().iter().sum();
    let counters = read_model.counters().unwrap();
    assert_eq!(counters.events_applied + counters.dead_letters, total, "{name}: every event handled");
    total as f64 / seconds
}

fn main() {
    refract::allocator::configure();
    let n: usize = std::env::var("REFRACT_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let rust = &support::plugins().order_summary;
    let lang = support::lang_plugins();
    let log = common::open_log(dir.path());
    common::append(&log, "orders", &refract_client::fixtures::orders(n, 42, 0.0));
    let engine = refract::plugin::engine::new_engine().unwrap();
    let linker = wasm::linker(&engine).unwrap();

    let native = run(
        "native",
        Box::new(NativeProjection::new(OrderSummary::manifest(), OrderSummary::handle)),
        &log,
        dir.path(),
    );
    println!("\norder-summary over {n} events, through the projector (batches of 10,000; 500 events per call)\n");
    println!("| plugin | component | events/s | / native Rust | first compile | cached load | faster |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("| Rust, compiled into the host | — | {native:.0} | 1.00 | — | — | — |");
    for (name, path) in [("Rust", rust), ("Python", &lang.order_summary_py), ("JavaScript", &lang.order_summary_js)] {
        let bytes = std::fs::read(path).unwrap();
        let cache = CompileCache::new(&dir.path().join(format!("cache-{name}")), &engine).unwrap();
        let started = Instant::now();
        cache.load(&bytes).unwrap();
        let cold = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let (component, _) = cache.load(&bytes).unwrap();
        let warm = started.elapsed().as_secs_f64();
        let plugin = WasmPlugin::load(&engine, &linker, &component, name, PluginLimits::default()).unwrap();
        let rate = run(name, Box::new(plugin), &log, dir.path());
        println!(
            "| {name} | {:.1} MB | {rate:.0} | {:.3} | {:.1} s | {:.1} ms | {:.0}× |",
            bytes.len() as f64 / 1048576.0,
            rate / native,
            cold,
            warm * 1e3,
            cold / warm
        );
    }
}
