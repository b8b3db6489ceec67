//! `cargo bench -p refract --bench authoring`: `refract plugin test`'s
//! engine (`refract::harness`, untraced as `--quiet` runs it) on the example
//! `order-summary` component over N order events, against the same
//! component over the same events through the projector as a server runs
//! it (a log with 4 partitions, the read-ahead thread, pipelined durable
//! commits); and the cost of tracing (each event its own batch, its host
//! calls recorded and written as `--json` lines to a sink). Then a
//! preview's diff (`refract::store::diff::compare`) of the read model the
//! `canceled` variant builds against the original's, against reading both
//! read models' tables whole through `ReadModel::scan` in pages of 1,000
//! (what comparing them by hand over the API would at least cost).
//!
//! `REFRACT_BENCH_EVENTS` (default 100,000), `REFRACT_BENCH_ROUNDS` (default
//! 5), `REFRACT_BENCH_POISON` (the share of events the plugin rejects,
//! default 0.01: a server bisects its batches down to each of them).

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::io::Write;
use std::time::Instant;

use refract::harness::Harness;
use refract::plugin::wasm::{self, PluginLimits, WasmPlugin};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    refract::allocator::configure();
    let env = |var: &str, default: usize| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (n, rounds) = (env("REFRACT_BENCH_EVENTS", 100_000), env("REFRACT_BENCH_ROUNDS", 5));
    let dir = tempfile::tempdir().unwrap();
    let poison: f64 = std::env::var("REFRACT_BENCH_POISON").ok().and_then(|v| v.parse().ok()).unwrap_or(0.01);
    let fixtures = refract_client::fixtures::orders(n, 42, poison);
    let log = common::open_log(dir.path());
    common::append(&log, "orders", &fixtures);
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

    // A preview's diff: the two versions' read models, built once.
    let variant_bytes = std::fs::read(&support::plugins().order_summary_canceled).unwrap();
    let variant = wasmtime::component::Component::new(&engine, &variant_bytes).unwrap();
    let load_variant =
        || WasmPlugin::load(&engine, &linker, &variant, "order-summary", PluginLimits::default()).unwrap();
    let (_, live) = common::run_projector("live", Box::new(load()), &log, &["orders"], dir.path());
    let (_, preview) = common::run_projector("preview", Box::new(load_variant()), &log, &["orders"], dir.path());
    let tables = ["customer-orders".to_owned(), "orders".to_owned()];
    let scan_whole = |model: &refract::store::ReadModel| {
        let mut keys = 0u64;
        for table in &tables {
            let mut after: Option<String> = None;
            loop {
                let page = model.scan(table, "", after.as_deref(), 1000).unwrap();
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                keys += page.len() as u64;
            }
        }
        keys
    };
    let (mut diffs, mut scans, mut compared) = (Vec::new(), Vec::new(), None);
    for round in 0..rounds {
        let measure_diff = || {
            let started = Instant::now();
            let c = refract::store::diff::compare(&live, &preview, &tables, 5).unwrap();
            (started.elapsed().as_secs_f64(), c)
        };
        let measure_scan = || {
            let started = Instant::now();
            let keys = scan_whole(&live) + scan_whole(&preview);
            (started.elapsed().as_secs_f64(), keys)
        };
        // Alternate which runs first.
        let ((d, c), (s, keys)) = if round % 2 == 0 {
            let d = measure_diff();
            (d, measure_scan())
        } else {
            let s = measure_scan();
            (measure_diff(), s)
        };
        let total: u64 = c.tables.iter().map(|t| 2 * t.unchanged + 2 * t.changed + t.added + t.removed).sum();
        assert_eq!(total, keys, "the diff saw every key of both read models");
        eprintln!("round {round}: diff {d:.3} s, both scanned {s:.3} s ({keys} keys)");
        diffs.push(d);
        scans.push(s);
        compared = Some(c);
    }
    let compared = compared.expect("at least one round");
    let changed: u64 = compared.tables.iter().map(|t| t.changed).sum();
    let keys: u64 = compared.tables.iter().map(|t| t.unchanged + t.changed + t.added).sum();
    let ratios = common::rate_ratios(&diffs, &scans);
    println!(
        "\n## preview diff: order-summary vs its `canceled` variant, {keys} keys each side ({changed} changed), {rounds} rounds\n"
    );
    println!("| run | median | ratio (spread) |");
    println!("|---|---:|---:|");
    println!(
        "| both read models' tables scanned whole (`ReadModel::scan`, pages of 1,000) | {:.3} s | 1.00 |",
        common::median(&scans)
    );
    println!(
        "| `preview diff` (`store::diff::compare`, both walked merged, samples kept) | {:.3} s | **{:.2}** ({}) |",
        common::median(&diffs),
        common::median(&ratios),
        common::spread(&ratios)
    );
}
