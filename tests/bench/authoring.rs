//! `cargo bench -p refract --bench authoring`: `refract plugin test`'s
//! engine (`refract::harness`, untraced as `--quiet` runs it) on the example
//! `order-summary` component over N order events, against the same
//! component over the same events through the projector as a server runs
//! it (a log with 4 partitions, the read-ahead thread, pipelined durable
//! commits); and the cost of tracing (each event its own batch, its host
//! calls recorded and written as `--json` lines to a sink).
//!
//! `REFRACT_BENCH_EVENTS` (default 100,000), `REFRACT_BENCH_ROUNDS` (default
//! 5), `REFRACT_BENCH_POISON` (the share of events the plugin rejects,
//! default 0.01: a server bisects its batches down to each of them).

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use refract::harness::Harness;
use refract::plugin::wasm::{self, PluginLimits, WasmPlugin};
use refract::source::NewEvent;
use refract::source::log::{EventLog, LogOptions};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    refract::allocator::configure();
    let env = |var: &str, default: usize| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (n, rounds) = (env("REFRACT_BENCH_EVENTS", 100_000), env("REFRACT_BENCH_ROUNDS", 5));
    let dir = tempfile::tempdir().unwrap();
    let poison: f64 = std::env::var("REFRACT_BENCH_POISON").ok().and_then(|v| v.parse().ok()).unwrap_or(0.01);
    let fixtures = refract_client::fixtures::orders(n, 42, poison);
    let log = Arc::new(
        EventLog::open(&dir.path().join("log.redb"), LogOptions { default_partitions: 4, ..Default::default() })
            .unwrap(),
    );
    for chunk in fixtures.chunks(10_000) {
        let chunk: Vec<NewEvent> = chunk.iter().map(|e| serde_json::from_value(e.clone()).unwrap()).collect();
        log.append("orders", &chunk).unwrap();
    }
    let text: String = fixtures.iter().map(|e| format!("{e}\n")).collect();
    let events = refract::harness::read_events(&text, "orders").unwrap();

    let engine = refract::plugin::engine::new_engine().unwrap();
    let linker = wasm::linker(&engine).unwrap();
    let bytes = std::fs::read(&support::plugins().order_summary).unwrap();
    let component = wasmtime::component::Component::new(&engine, &bytes).unwrap();
    let load = || WasmPlugin::load(&engine, &linker, &component, "order-summary", PluginLimits::default()).unwrap();

    let (mut server, mut quiet, mut traced) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let round_dir = tempfile::tempdir_in(dir.path()).unwrap();
        let (seconds, read_model) =
            common::run_projector("server", Box::new(load()), &log, &["orders"], round_dir.path());
        server.push(seconds);
        let counters = read_model.counters().unwrap();

        let mut harness = Harness::new(load(), false).unwrap();
        let started = Instant::now();
        harness.run(&events, |_| {}).unwrap();
        quiet.push(started.elapsed().as_secs_f64());
        let (applied, failed, _) = harness.counts();
        assert_eq!((applied, failed), (counters.events_applied, counters.dead_letters), "the same outcome");

        let mut harness = Harness::new(load(), true).unwrap();
        let mut sink = std::io::BufWriter::new(std::io::sink());
        let started = Instant::now();
        harness.run(&events, |step| writeln!(sink, "{}", step.to_json()).unwrap()).unwrap();
        traced.push(started.elapsed().as_secs_f64());
        assert_eq!(harness.counts().0, counters.events_applied);
        eprintln!(
            "round {round}: server {:.2} s, plugin test --quiet {:.2} s, traced {:.2} s",
            server[round], quiet[round], traced[round]
        );
    }
    let rate = |s: &[f64]| n as f64 / common::median(s);
    println!("\n## plugin test: order-summary (Rust) over {n} events (poison {poison}), {rounds} rounds\n");
    println!("| run | median | events/s | ratio (spread) |");
    println!("|---|---:|---:|---:|");
    println!(
        "| through the projector (a server's worker) | {:.2} s | {:.0} | 1.00 |",
        common::median(&server),
        rate(&server)
    );
    // A run against its baseline: the median ratio of rates over the rounds, and its spread.
    let row = |what: &str, times: &[f64], baseline: &[f64], of: &str, bold: &str| {
        let ratios = common::rate_ratios(times, baseline);
        println!(
            "| {what} | {:.2} s | {:.0} | {bold}{:.2}{bold} ({}) of {of} |",
            common::median(times),
            rate(times),
            common::median(&ratios),
            common::spread(&ratios)
        );
    };
    row("`plugin test --quiet` (batches of 10,000, calls of 500)", &quiet, &server, "the server", "**");
    row("`plugin test --json` (traced, an event per batch)", &traced, &quiet, "`--quiet`", "");
}
