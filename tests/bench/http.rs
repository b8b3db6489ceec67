//! `cargo bench -p refract --bench http`: a key lookup over HTTP against an
//! axum hello-world route, in one run, on the same server stack and with the
//! same client.
//!
//! - **hello**: `GET /hello` answering a constant, a bare axum `Router` served
//!   by `refract::api::serve_router` (the API's hyper connection handling);
//! - **lookup**: `GET /v1/projections/order-summary/tables/orders/items/{key}`
//!   on the real API (its guard, auth, metrics and routing) over a read model
//!   of the order fixtures, random existing keys.
//!
//! The client is a minimal HTTP/1.1 keep-alive connection per thread (what a
//! load generator does), with 1 and 8 concurrent connections; they share the
//! machine's two cores with the server. Hello and lookup alternate
//! `REFRACT_BENCH_ROUNDS` times (default 5); throughput figures are medians
//! of the rounds, latencies percentiles of every request. `REFRACT_BENCH_EVENTS`
//! sets the number of events behind the read model (default 200,000) and
//! `REFRACT_BENCH_REQUESTS` the requests per connection and round (2,000).

#[path = "common.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Connection;
use order_summary::OrderSummary;
use refract::config::Config;
use refract::plugin::native::NativeProjection;
use refract::runtime::Runtime;
use refract_sdk::Projection;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One round of `requests` per connection on `connections` threads: the
/// wall seconds and every request's latency.
fn round(address: &str, paths: &[String], connections: usize, requests: usize) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let latencies = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..connections)
            .map(|c| {
                scope.spawn(move || {
                    let mut connection = Connection::new(address);
                    let mut latencies = Vec::with_capacity(requests);
                    for i in 0..requests {
                        let path = &paths[(c * requests + i) % paths.len()];
                        let sent = Instant::now();
                        let (status, body) = connection.get_bytes(path);
                        latencies.push(sent.elapsed());
                        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
                    }
                    latencies
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect::<Vec<_>>()
    });
    (started.elapsed().as_secs_f64(), latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6
}

fn main() {
    refract::allocator::configure();
    let env = |var: &str, default: usize| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (n, rounds, requests) =
        (env("REFRACT_BENCH_EVENTS", 200_000), env("REFRACT_BENCH_ROUNDS", 5), env("REFRACT_BENCH_REQUESTS", 2_000));
    let dir = tempfile::tempdir().unwrap();

    // The read model: order-summary (native: the lookup does not call the plugin).
    let config = Config { data_dir: dir.path().join("data"), ..Config::default() };
    let runtime = Arc::new(Runtime::open(&config).unwrap());
    eprintln!("generating and projecting {n} order events …");
    let events = refract_client::fixtures::orders(n, 42, 0.0);
    common::append(&runtime.log, "orders", &events);
    let handler = NativeProjection::new(OrderSummary::manifest(), OrderSummary::handle);
    let projection =
        runtime.add(Box::new(handler), "bench".into()).unwrap().expect("one read model, not partitioned").shards()[0]
            .live();
    let total: u64 = runtime.log.heads("orders").unwrap().iter().sum();
    while projection.read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).sum::<u64>() < total {
        std::thread::sleep(Duration::from_millis(10));
    }
    let keys = common::scattered_order_ids(&events);
    let lookups: Vec<String> =
        keys.iter().map(|k| format!("/v1/projections/order-summary/tables/orders/items/{k}")).collect();
    let hellos = vec!["/hello".to_owned()];

    // Both servers on one tokio runtime, as `refract run` builds it.
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let bind = || tokio.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let (api, hello) = (bind(), bind());
    let (api_address, hello_address) = (api.local_addr().unwrap().to_string(), hello.local_addr().unwrap().to_string());
    let serving = refract::api::AppState::new(runtime.clone(), &config);
    tokio.spawn(async move { refract::api::serve(serving, api, std::future::pending()).await });
    let hello_router = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" }));
    let header_timeout = config.api.header_timeout();
    tokio.spawn(async move {
        refract::api::serve_router(hello_router, header_timeout, hello, std::future::pending()).await
    });
    // Every lookup answers, and with the read model's value.
    let (status, body) = Connection::new(&api_address).get(&lookups[0]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["orderId"].as_str(), Some(keys[0].as_str()), "{body}");

    println!(
        "\nkey lookup over HTTP ({} keys, {n} events) against axum hello-world, same stack and client\n",
        keys.len()
    );
    println!(
        "| connections | hello requests/s | lookup requests/s | lookup / hello | hello p50 / p99 µs | lookup p50 / p99 µs |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for connections in [1, 8] {
        // A warm-up round of each, not counted.
        round(&hello_address, &hellos, connections, requests / 4);
        round(&api_address, &lookups, connections, requests / 4);
        let (mut hello_rates, mut lookup_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut hello_latencies, mut lookup_latencies) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let (seconds, latencies) = round(&hello_address, &hellos, connections, requests);
            hello_rates.push(latencies.len() as f64 / seconds);
            hello_latencies.extend(latencies);
            let (seconds, latencies) = round(&api_address, &lookups, connections, requests);
            lookup_rates.push(latencies.len() as f64 / seconds);
            lookup_latencies.extend(latencies);
            ratios.push(lookup_rates[r] / hello_rates[r]);
            eprintln!(
                "{connections} connections, round {r}: hello {:.0}/s, lookup {:.0}/s ({:.2})",
                hello_rates[r], lookup_rates[r], ratios[r]
            );
        }
        hello_latencies.sort();
        lookup_latencies.sort();
        println!(
            "| {connections} | {:.0} | {:.0} | **{:.2}** (rounds {}) | {:.0} / {:.0} | {:.0} / {:.0} |",
            common::median(&hello_rates),
            common::median(&lookup_rates),
            common::median(&ratios),
            common::spread(&ratios),
            percentile(&hello_latencies, 0.5),
            percentile(&hello_latencies, 0.99),
            percentile(&lookup_latencies, 0.5),
            percentile(&lookup_latencies, 0.99),
        );
    }
    println!("\ntarget: lookup / hello ≥ 0.80");
    runtime.shutdown();
}
