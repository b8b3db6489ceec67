//! `cargo bench -p refract --bench changes`: what the change log (change
//! streams' `store::changes`) costs ingestion. The `order-summary`
//! component over the same N order events through the projector (4
//! partitions, read-ahead, pipelined durable commits), into a read model
//! that records every put and delete in its change log (as a live
//! generation does since session 21), against the same into one that does
//! not (the read model alone), in alternating rounds.
//!
//! `REFRACT_BENCH_EVENTS` (default 200,000), `REFRACT_BENCH_ROUNDS` (default 5).

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;

use refract::plugin::wasm::{self, PluginLimits, WasmPlugin};
use refract::source::NewEvent;
use refract::source::log::{EventLog, LogOptions};
use refract::store::ReadModel;
use refract::store::changes::ChangeRetention;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    refract::allocator::configure();
    let env = |var: &str, default: usize| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (n, rounds) = (env("REFRACT_BENCH_EVENTS", 200_000), env("REFRACT_BENCH_ROUNDS", 5));
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        EventLog::open(&dir.path().join("log.redb"), LogOptions { default_partitions: 4, ..Default::default() })
            .unwrap(),
    );
    for chunk in refract_client::fixtures::orders(n, 42, 0.0).chunks(10_000) {
        let chunk: Vec<NewEvent> = chunk.iter().map(|e| serde_json::from_value(e.clone()).unwrap()).collect();
        log.append("orders", &chunk).unwrap();
    }
    let engine = refract::plugin::engine::new_engine().unwrap();
    let linker = wasm::linker(&engine).unwrap();
    let bytes = std::fs::read(&support::plugins().order_summary).unwrap();
    let component = wasmtime::component::Component::new(&engine, &bytes).unwrap();
    let load = || WasmPlugin::load(&engine, &linker, &component, "order-summary", PluginLimits::default()).unwrap();

    let (mut plain, mut recorded, mut changes) = (Vec::new(), Vec::new(), 0);
    for round in 0..rounds {
        let round_dir = tempfile::tempdir_in(dir.path()).unwrap();
        let without = || {
            let model = Arc::new(ReadModel::open(&round_dir.path().join("plain.redb")).unwrap());
            common::run_projector_on(model, Box::new(load()), &log, &["orders"]).0
        };
        let with = || {
            let model = ReadModel::open(&round_dir.path().join("recorded.redb"))
                .unwrap()
                .with_change_log(ChangeRetention::default());
            model.record_changes(true);
            let (seconds, model) = common::run_projector_on(Arc::new(model), Box::new(load()), &log, &["orders"]);
            (seconds, model.last_change().unwrap())
        };
        // Alternate which runs first.
        let (p, (r, c)) = if round % 2 == 0 {
            let p = without();
            (p, with())
        } else {
            let r = with();
            (without(), r)
        };
        eprintln!("round {round}: without a change log {p:.2} s, with {r:.2} s ({c} changes)");
        plain.push(p);
        recorded.push(r);
        changes = c;
    }
    let ratios = common::rate_ratios(&recorded, &plain);
    println!("\n## change log: order-summary (Rust) over {n} events, {changes} changes recorded, {rounds} rounds\n");
    println!("| run | median | events/s | ratio (spread) |");
    println!("|---|---:|---:|---:|");
    let rate = |s: &[f64]| n as f64 / common::median(s);
    println!("| the read model alone | {:.2} s | {:.0} | 1.00 |", common::median(&plain), rate(&plain));
    println!(
        "| with its change log recorded | {:.2} s | {:.0} | **{:.2}** ({}) |",
        common::median(&recorded),
        rate(&recorded),
        common::median(&ratios),
        common::spread(&ratios)
    );
}
