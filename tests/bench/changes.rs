//! `cargo bench -p refract --bench changes`: what the change log (change
//! streams' `store::changes`) costs ingestion. The `order-summary`
//! component over the same N order events through the projector (4
//! partitions, read-ahead, pipelined durable commits), into a read model
//! that records every put and delete in its change log (as a live
//! generation does since session 21), against the same into one that does
//! not (the read model alone), in alternating rounds.
//!
//! Then change streams over HTTP: a runtime serving the real API ingests
//! rounds of `REFRACT_BENCH_STREAM_EVENTS` new orders (default 20,000)
//! with 100 clients following `orders`' change stream, against rounds with
//! none (alternating), and one client measures each change's delivery
//! from the moment its event was appended (so the latency includes the
//! projector's batching, not only the stream).
//!
//! `REFRACT_BENCH_EVENTS` (default 200,000), `REFRACT_BENCH_ROUNDS` (default 5).

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use order_summary::OrderSummary;
use refract_sdk::Projection;

use refract::plugin::wasm::{self, PluginLimits, WasmPlugin};
use refract::source::NewEvent;
use refract::store::ReadModel;
use refract::store::changes::ChangeRetention;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    refract::allocator::configure();
    let env = |var: &str, default: usize| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (n, rounds) = (env("REFRACT_BENCH_EVENTS", 200_000), env("REFRACT_BENCH_ROUNDS", 5));
    let dir = tempfile::tempdir().unwrap();
    let log = common::open_log(dir.path());
    common::append(&log, "orders", &refract_client::fixtures::orders(n, 42, 0.0));
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
    report_change_log(n, changes, rounds, &plain, &recorded, &ratios);
    subscribers(rounds + rounds % 2, env("REFRACT_BENCH_STREAM_EVENTS", 20_000));
}

fn report_change_log(n: usize, changes: u64, rounds: usize, plain: &[f64], recorded: &[f64], ratios: &[f64]) {
    println!("\n## change log: order-summary (Rust) over {n} events, {changes} changes recorded, {rounds} rounds\n");
    println!("| run | median | events/s | ratio (spread) |");
    println!("|---|---:|---:|---:|");
    let rate = |s: &[f64]| n as f64 / common::median(s);
    println!("| the read model alone | {:.2} s | {:.0} | 1.00 |", common::median(plain), rate(plain));
    println!(
        "| with its change log recorded | {:.2} s | {:.0} | **{:.2}** ({}) |",
        common::median(recorded),
        rate(recorded),
        common::median(ratios),
        common::spread(ratios)
    );
}

/// Follow `orders`' change stream on `address` until `stop`, counting
/// changes; with `appended`, record each key's delivery latency.
fn follow(
    address: &str,
    stop: Arc<AtomicBool>,
    appended: Option<Arc<Mutex<HashMap<String, Instant>>>>,
) -> (u64, Vec<Duration>) {
    let mut tcp = TcpStream::connect(address).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    write!(tcp, "GET /v1/projections/order-summary/tables/orders/changes HTTP/1.1\r\nHost: bench\r\n\r\n").unwrap();
    let mut lines = BufReader::new(tcp);
    let (mut changes, mut latencies) = (0, Vec::new());
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => continue, // the read timeout: look at `stop`
        }
        let Some(data) = line.strip_prefix("data: {\"key\":\"") else { continue };
        changes += 1;
        if let Some(appended) = &appended {
            let key = data.split('"').next().unwrap_or_default();
            if let Some(at) = appended.lock().unwrap().remove(key) {
                latencies.push(at.elapsed());
            }
        }
    }
    (changes, latencies)
}

/// Ingestion with 100 change-stream clients against none, and delivery latency.
fn subscribers(rounds: usize, per_round: usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = refract::config::Config { data_dir: dir.path().join("data"), ..Default::default() };
    let runtime = Arc::new(refract::runtime::Runtime::open(&config).unwrap());
    let handler = refract::plugin::native::NativeProjection::new(OrderSummary::manifest(), OrderSummary::handle);
    let projection = runtime.add(Box::new(handler), "bench".into()).unwrap().unwrap().shards()[0].live();
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let listener = tokio.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let serving = refract::api::AppState::new(runtime.clone(), &config);
    tokio.spawn(async move { refract::api::serve(serving, listener, std::future::pending()).await });

    // Every round's orders are new ones (ids after the previous rounds').
    let all = refract_client::fixtures::orders(per_round * rounds, 43, 0.0);
    let (mut none, mut hundred, mut latencies, mut delivered) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for (round, events) in all.chunks(per_round).enumerate() {
        let with = round % 2 == 1;
        let stop = Arc::new(AtomicBool::new(false));
        let appended = Arc::new(Mutex::new(HashMap::new()));
        let clients: Vec<_> = (0..if with { 100 } else { 0 })
            .map(|i| {
                let (address, stop) = (address.clone(), stop.clone());
                let appended = (i == 0).then(|| appended.clone());
                std::thread::spawn(move || follow(&address, stop, appended))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500)); // every client connected
        let total: u64 = runtime.log.heads("orders").map(|h| h.iter().sum()).unwrap_or(0) + events.len() as u64;
        let started = Instant::now();
        for chunk in events.chunks(500) {
            let chunk: Vec<NewEvent> = chunk.iter().map(|e| serde_json::from_value(e.clone()).unwrap()).collect();
            let now = Instant::now();
            {
                let mut appended = appended.lock().unwrap();
                for e in &chunk {
                    appended.insert(e.key.clone().unwrap_or_default(), now);
                }
            }
            runtime.log.append("orders", &chunk).unwrap();
        }
        while projection.read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).sum::<u64>() < total {
            std::thread::sleep(Duration::from_millis(1));
        }
        let seconds = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(500)); // the last changes delivered
        stop.store(true, Ordering::Relaxed);
        for (i, client) in clients.into_iter().enumerate() {
            let (changes, measured) = client.join().unwrap();
            if i == 0 {
                latencies.extend(measured);
                delivered += changes;
            }
        }
        eprintln!("round {round}: {} subscribers, {seconds:.2} s", if with { 100 } else { 0 });
        if with { hundred.push(seconds) } else { none.push(seconds) }
    }
    let pairs = none.len().min(hundred.len());
    let ratios = common::rate_ratios(&hundred[..pairs], &none[..pairs]);
    latencies.sort();
    let ms = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    println!("\n## change streams: {per_round} new orders per round, 100 subscribers against none, {rounds} rounds\n");
    println!("| run | median | events/s | ratio (spread) |");
    println!("|---|---:|---:|---:|");
    let rate = |s: &[f64]| per_round as f64 / common::median(s);
    println!("| no subscriber | {:.2} s | {:.0} | 1.00 |", common::median(&none), rate(&none));
    println!(
        "| 100 subscribers to `orders` | {:.2} s | {:.0} | **{:.2}** ({}) |",
        common::median(&hundred),
        rate(&hundred),
        common::median(&ratios),
        common::spread(&ratios)
    );
    println!(
        "\ndelivery from append to one subscriber ({} changes, {delivered} received): p50 {:.1} ms, p99 {:.1} ms",
        latencies.len(),
        ms(0.5),
        ms(0.99)
    );
}
