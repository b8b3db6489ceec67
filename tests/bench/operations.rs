//! `cargo bench -p refract --bench operations`: rebuilds and plugin swaps, in
//! one run over the same events.
//!
//! - **live projection**: `order-summary` (wasm) started on a log of N
//!   events, until its checkpoints reach the end;
//! - **rebuild**: the same events replayed into a new generation while the
//!   live one is idle, until the switch;
//! - **query latency**: `GET …/items/{id}` over HTTP, one at a time, at rest
//!   and during a second rebuild (p50, p99);
//! - **upload to swap**: `Runtime::install_plugin` of a new build of the
//!   plugin until the worker runs it, with the compile cache cold and warm;
//!   then of the Python build of the same projection (18 MB);
//! - **file moved in to swap**: a new build written beside the plugins
//!   directory and moved into it, until the worker runs it, alternating with
//!   an upload of the same bytes (the baseline without the watcher).
//!
//! Set `REFRACT_BENCH_EVENTS` to change N (default 200,000).

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use refract::config::Config;
use refract::runtime::Runtime;
use refract_client::Client;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Query `ids` in turn until `done` says stop; latencies in µs, sorted.
fn query_until(client: &Client, ids: &[String], mut done: impl FnMut(usize) -> bool) -> Vec<f64> {
    let mut latencies = Vec::new();
    let mut i = 0;
    while !done(latencies.len()) {
        let id = &ids[i % ids.len()];
        i += 1;
        let started = Instant::now();
        let reply = client.get(&format!("/v1/projections/order-summary/tables/orders/items/{id}")).unwrap();
        latencies.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(reply.status, 200);
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn main() {
    refract::allocator::configure();
    let n: usize = std::env::var("REFRACT_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(&support::plugins().order_summary).unwrap();
    let plugins_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins_dir).unwrap();
    let config = Config { data_dir: dir.path().join("data"), plugins_dir: plugins_dir.clone(), ..Config::default() };

    // The log first, then the plugin: the live run starts from a full log.
    eprintln!("appending {n} order events …");
    let events = refract_client::fixtures::orders(n, 42, 0.0);
    {
        let runtime = Runtime::start(&config).unwrap();
        common::append(&runtime.log, "orders", &events);
        runtime.shutdown();
    }
    std::fs::write(plugins_dir.join("order_summary.wasm"), &wasm).unwrap();
    let started = Instant::now();
    let runtime = Runtime::start(&config).unwrap();
    let projection = runtime.projection("order-summary").unwrap().whole().unwrap().clone();
    let consumed = |g: &refract::generation::Generation| g.checkpoints().unwrap().values().sum::<u64>();
    while consumed(&projection.live()) < n as u64 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let live_seconds = started.elapsed().as_secs_f64();

    // An HTTP server over the same runtime.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let serving = refract::api::AppState::new(runtime.clone(), &config);
    std::thread::spawn(move || {
        let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        tokio.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            refract::api::serve(serving, listener, std::future::pending()).await.unwrap();
        });
    });
    let client = Client::new(&url);
    let ids: Vec<String> = (1..=200).map(|i| format!("o-{i}")).collect();
    let at_rest = query_until(&client, &ids, |done| done >= 3000);

    // A rebuild: the same work again, beside the idle live generation.
    let started = Instant::now();
    runtime.rebuild("order-summary", None).unwrap();
    while projection.rebuild().is_some() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let rebuild_seconds = started.elapsed().as_secs_f64();
    assert_eq!(projection.live().number, 1);
    // Another, while a client queries one request after another.
    runtime.rebuild("order-summary", None).unwrap();
    let during = query_until(&client, &ids, |_| projection.rebuild().is_none());
    assert_eq!(projection.live().number, 2);

    // Upload to swap: a new build (a different file) compiled cold, then the
    // same bytes again (cached); then the same projection in Python, an 18 MB
    // component with CPython inside, cold and warm.
    let python = std::fs::read(&support::lang_plugins().order_summary_py).unwrap();
    let mut swaps = Vec::new();
    for (label, bytes) in [
        ("cold compile cache", support_variant(&wasm, 1)),
        ("warm compile cache", support_variant(&wasm, 1)),
        ("cold compile cache, Python", support_variant(&python, 2)),
        ("warm compile cache, Python", support_variant(&python, 2)),
    ] {
        let size = bytes.len();
        let reloads = projection.live().status.lock().unwrap().reloads;
        let started = Instant::now();
        runtime.install_plugin("order_summary", &bytes).unwrap();
        while projection.live().status.lock().unwrap().reloads == reloads {
            std::thread::sleep(Duration::from_millis(1));
        }
        swaps.push((label, size, started.elapsed().as_secs_f64() * 1000.0));
    }

    // A file dropped into the plugins directory (written beside it, then
    // moved in, as a deploy script does) until the worker runs it, against
    // an upload of the same bytes (no watcher in its path): alternating
    // rounds, both warm in the compile cache.
    let swapped = |start: &dyn Fn()| {
        let reloads = projection.live().status.lock().unwrap().reloads;
        let started = Instant::now();
        start();
        while projection.live().status.lock().unwrap().reloads == reloads {
            std::thread::sleep(Duration::from_micros(200));
        }
        started.elapsed().as_secs_f64() * 1000.0
    };
    // Both builds the rounds alternate between are in the compile cache first.
    for variant in [1, 2] {
        swapped(&|| {
            runtime.install_plugin("order_summary", &support_variant(&wasm, variant)).unwrap();
        });
    }
    let (mut dropped, mut uploaded) = (Vec::new(), Vec::new());
    for round in 0..DROP_ROUNDS {
        let bytes = support_variant(&wasm, 1 + (round % 2) as u8);
        let staged = dir.path().join("order_summary.wasm.new");
        std::fs::write(&staged, &bytes).unwrap();
        dropped.push(swapped(&|| std::fs::rename(&staged, plugins_dir.join("order_summary.wasm")).unwrap()));
        uploaded.push(swapped(&|| {
            runtime.install_plugin("order_summary", &bytes).unwrap();
        }));
    }
    runtime.shutdown();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = dropped.iter().zip(&uploaded).map(|(d, u)| d / u).collect();
    let (drop_ms, upload_ms) = (median(&mut dropped), median(&mut uploaded));

    let rate = |s: f64| n as f64 / s;
    println!("\norder-summary (wasm), {n} events\n");
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| live projection from an empty read model | {:.0} events/s ({live_seconds:.2} s) |", rate(live_seconds));
    println!(
        "| rebuild into a new generation, to the switch | {:.0} events/s ({rebuild_seconds:.2} s) |",
        rate(rebuild_seconds)
    );
    println!(
        "| query at rest: p50 / p99 | {:.0} µs / {:.0} µs ({} queries) |",
        percentile(&at_rest, 0.5),
        percentile(&at_rest, 0.99),
        at_rest.len()
    );
    println!(
        "| query during the rebuild: p50 / p99 | {:.0} µs / {:.0} µs ({} queries) |",
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len()
    );
    for (label, size, ms) in &swaps {
        println!("| upload to swap, {label} ({} KiB) | {ms:.1} ms |", size / 1024);
    }
    println!(
        "| file moved into the plugins directory to swap, warm: median of {DROP_ROUNDS} (range) | {drop_ms:.1} ms ({:.1}–{:.1}) |",
        dropped[0],
        dropped[DROP_ROUNDS - 1]
    );
    println!(
        "| upload of the same bytes to swap, alternating: median (range) | {upload_ms:.1} ms ({:.1}–{:.1}) |",
        uploaded[0],
        uploaded[DROP_ROUNDS - 1]
    );
    println!("\n| ratio | value | target |");
    println!("|---|---:|---:|");
    println!("| rebuild rate / live rate | {:.2} | ≥ 0.90 |", live_seconds / rebuild_seconds);
    println!(
        "| p99 during the rebuild / p99 at rest | {:.2} | ≤ 2.00 |",
        percentile(&during, 0.99) / percentile(&at_rest, 0.99)
    );
    let mut ratios = ratios;
    println!(
        "| file moved in / upload, to swap: median of per-round ratios | {:.2} | — (the file itself: < 100 ms) |",
        median(&mut ratios)
    );
}

/// Rounds of "file moved in" against "upload", alternating.
const DROP_ROUNDS: usize = 9;

/// `wasm` with a custom section appended: the same code in a different file.
fn support_variant(wasm: &[u8], n: u8) -> Vec<u8> {
    let name = b"refract-bench";
    let mut out = wasm.to_vec();
    out.extend_from_slice(&[0, (1 + name.len() + 8) as u8, name.len() as u8]);
    out.extend_from_slice(name);
    out.extend_from_slice(&[n; 8]);
    out
}
