//! `cargo bench -p refract --bench cluster`: `order-summary` and
//! `order-search` partitioned over the 4 partitions of a topic on tansu,
//! run by three instances (`cluster:`, the shards spread by the consumer
//! group) against one instance running every shard (`mode: partitioned`
//! without `cluster:`), in the same run, real processes:
//!
//! - **ingest**: from the first record to every shard caught up, one
//!   instance against three; wall time and the CPU seconds of all the
//!   instances from when they serve (`/proc/<pid>/stat`; compiling the
//!   plugins at start is left out), as events per CPU second;
//! - **lookups and searches**: the same requests through one instance of
//!   the three (a lookup in `orders`, keyed like the events, asks the
//!   key's shard: here or one forwarded request; a search asks its own
//!   shards and each of the other two) and at the instance running every
//!   shard: p50 and p99; and the lookups of keys whose shard runs
//!   elsewhere, routed through that instance against each asked at its
//!   shard's owner;
//! - **hand-over**: from a SIGKILL of one of the three to the other two
//!   answering whole again (the group's `session.timeout.ms`, 6 s here,
//!   then the restore), without standbys (a replay from the beginning) and
//!   with a standby copy of every shard on every instance
//!   (`standby-replicas: 2`); and from a clean stop (the instance leaves
//!   the group) to the same.
//!
//! Rounds alternate one and three instances `REFRACT_BENCH_ROUNDS` times
//! (default 3); the figures are medians, ratios with their spread.
//! `REFRACT_BENCH_EVENTS` sets the records (default 20,000: tansu's fetches
//! are slow; above 20,000 on its memory engine), `REFRACT_BENCH_REQUESTS`
//! the requests per round (default 500).

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::kafka::{Broker, Out};
use support::{Server, plugins};

const PARTITIONS: u32 = 4;

/// CPU seconds (user and system) the process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the 14th field, stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks
}

fn config(broker: &Broker, round: usize, id: Option<&str>, standbys: u32) -> String {
    let mut yaml = format!(
        "kafka:\n  brokers: {}\n  mode: partitioned\n  group-id: bench-{round}\n  standby-replicas: {standbys}\n  properties: {{ session.timeout.ms: \"6000\", heartbeat.interval.ms: \"500\" }}\n  streams:\n    orders: {{ topic: bench.orders, format: json, type-header: event-type }}\n",
        broker.address()
    );
    if let Some(id) = id {
        yaml.push_str(&format!(
            "cluster:\n  instance-id: {id}\n  announce-interval-ms: 1000\n  control-topic: bench.cluster.{round}\n"
        ));
    }
    yaml
}

/// Events read by `projection`'s active shards on `server`, and how many of them are ready there.
fn progress(server: &Server, projection: &str) -> (u64, usize) {
    let reply = server.client().get(&format!("/v1/projections/{projection}")).unwrap();
    assert_eq!(reply.status, 200, "{}\n{}", server.get("/v1/projections"), server.log());
    let status = reply.body;
    let read: u64 = status["partitions"].as_array().unwrap().iter().map(|p| p["checkpoint"].as_u64().unwrap()).sum();
    let ready = status["shards"]
        .as_array()
        .map_or(0, |s| s.iter().filter(|s| s["role"] == "active" && s["ready"] == true).count());
    (read, ready)
}

/// Wait until `servers` together have read all `n` records with every
/// shard of both projections ready, and every search index caught up.
fn wait_caught_up(servers: &[&Server], n: u64) {
    let until = Instant::now() + Duration::from_secs(600);
    loop {
        let done = ["order-summary", "order-search"].iter().all(|p| {
            let (read, ready) =
                servers.iter().map(|s| progress(s, p)).fold((0, 0), |(r, k), (r2, k2)| (r + r2, k + k2));
            read == n && ready == PARTITIONS as usize
        }) && servers.iter().all(|s| {
            let status = s.get("/v1/projections/order-search");
            status["indexes"].as_array().unwrap().iter().all(|i| i["lag"] == 0)
        });
        if done {
            return;
        }
        assert!(Instant::now() < until, "never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The shards of `projection` that `server` is active for.
fn active_shards(server: &Server, projection: &str) -> Vec<u64> {
    let status = server.get(&format!("/v1/projections/{projection}"));
    let shards = status["shards"].as_array().into_iter().flatten();
    shards.filter(|s| s["role"] == "active").map(|s| s["shard"].as_u64().unwrap()).collect()
}

/// Every order, read in pages through `server`, or `None` when it refuses (503 while a shard moves).
fn orders(server: &Server) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let reply = server
            .client()
            .get(&format!("/v1/projections/order-summary/tables/orders/items?limit=1000{after}"))
            .unwrap();
        if reply.status != 200 {
            return None;
        }
        out.extend(reply.body["items"].as_array().unwrap().iter().cloned());
        match reply.body["next"].as_str() {
            Some(next) => after = format!("&after={}", support::encode(next)),
            None => return Some(out),
        }
    }
}

/// Latencies of `paths` through `server`, in ms, sorted.
fn latencies(server: &Server, paths: &[String]) -> Vec<f64> {
    let mut connection = common::Connection::new(server.url.trim_start_matches("http://"));
    let mut out: Vec<f64> = paths
        .iter()
        .map(|path| {
            let started = Instant::now();
            let (status, body) = connection.get_bytes(path);
            assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let env = |var: &str, default: usize| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (n, rounds, requests) =
        (env("REFRACT_BENCH_EVENTS", 20_000), env("REFRACT_BENCH_ROUNDS", 3), env("REFRACT_BENCH_REQUESTS", 500));
    // tansu's SQLite engine times out on offset lookups and fetches past a
    // few tens of thousands of records; its memory engine carries them (its
    // producer sending one record per batch: see `Broker::start_in_memory`).
    let broker = if n > 20_000 { Broker::start_in_memory() } else { Broker::start() };
    broker.create_topic("bench.orders", PARTITIONS);
    let events = refract_client::fixtures::orders(n, 42, 0.0);
    eprintln!("producing {n} order events to tansu …");
    broker.producer().send_all("bench.orders", &events.iter().map(Out::plain).collect::<Vec<_>>());
    let plugins = plugins();
    let wasm: [&std::path::Path; 2] = [&plugins.order_summary, &plugins.order_search];

    let keys = common::scattered_order_ids(&events);
    let lookups: Vec<String> = keys
        .iter()
        .cycle()
        .take(requests)
        .map(|k| format!("/v1/projections/order-summary/tables/orders/items/{k}"))
        .collect();
    let queries = [
        "sort=total:desc&limit=20&facets=status",
        "q=wireless&limit=10",
        "filter=status:paid&sort=updatedAt:asc&limit=50",
    ];
    let searches: Vec<String> = queries
        .iter()
        .cycle()
        .take(requests)
        .map(|q| format!("/v1/projections/order-search/indexes/orders/search?{q}"))
        .collect();

    let (mut ingest, mut cpu) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let (mut lookup_ms, mut search_ms) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    // Lookups of keys whose shard runs elsewhere: at their owner (0), routed through another instance (1).
    let mut routed_ms: [Vec<Vec<f64>>; 2] = [Vec::new(), Vec::new()];
    let (mut killed, mut killed_warm, mut stopped) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // One instance running every shard.
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let one = Server::start(dir.path(), &wasm, &config(&broker, round * 3, None, 0));
        // From when it serves: compiling the plugins (each instance once, then cached) is not ingest.
        let serving = cpu_seconds(one.pid());
        wait_caught_up(&[&one], n as u64);
        ingest[0].push(started.elapsed().as_secs_f64());
        cpu[0].push(cpu_seconds(one.pid()) - serving);

        // Three instances sharing them, no standbys (each shard is applied once).
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let started = Instant::now();
        let mut three: Vec<Server> = ["a", "b", "c"]
            .iter()
            .zip(&dirs)
            .map(|(id, d)| Server::start(d.path(), &wasm, &config(&broker, round * 3 + 1, Some(id), 0)))
            .collect();
        let serving: f64 = three.iter().map(|s| cpu_seconds(s.pid())).sum();
        wait_caught_up(&three.iter().collect::<Vec<_>>(), n as u64);
        ingest[1].push(started.elapsed().as_secs_f64());
        cpu[1].push(three.iter().map(|s| cpu_seconds(s.pid())).sum::<f64>() - serving);
        let whole = orders(&one).unwrap();
        // The instance asked is the one running the fewest shards: most of each answer comes from elsewhere.
        let asked = (0..3).min_by_key(|i| progress(&three[*i], "order-summary").1).unwrap();
        // Caught up; each instance's readiness reaches the others with its next announcement.
        let until = Instant::now() + Duration::from_secs(30);
        while orders(&three[asked]).as_ref() != Some(&whole) {
            assert!(Instant::now() < until, "three instances never answered as one");
            std::thread::sleep(Duration::from_millis(50));
        }

        // Alternating: through one of three, then at the one holding everything.
        for (variant, server) in [(1, &three[asked]), (0, &one)] {
            lookup_ms[variant].push(latencies(server, &lookups));
            search_ms[variant].push(latencies(server, &searches));
        }
        // `orders` is keyed like the events: a lookup through an instance
        // that does not run the key's shard is one request to its owner.
        // Those keys through `asked`, then each at its owner.
        let owners: Vec<Vec<u64>> = three.iter().map(|s| active_shards(s, "order-summary")).collect();
        let owner_of = |key: &str| {
            let shard = refract::source::partition::for_key(key, PARTITIONS) as u64;
            owners.iter().position(|held| held.contains(&shard)).expect("every shard has an owner")
        };
        let elsewhere: Vec<&String> = keys.iter().filter(|k| owner_of(k) != asked).collect();
        let path = |k: &str| format!("/v1/projections/order-summary/tables/orders/items/{k}");
        let routed: Vec<String> = elsewhere.iter().cycle().take(requests).map(|k| path(k)).collect();
        routed_ms[1].push(latencies(&three[asked], &routed));
        let mut at_owner = Vec::new();
        for (i, server) in three.iter().enumerate() {
            let mine: Vec<String> = routed
                .iter()
                .zip(elsewhere.iter().cycle())
                .filter(|(_, k)| owner_of(k) == i)
                .map(|(p, _)| p.clone())
                .collect();
            if !mine.is_empty() {
                at_owner.extend(latencies(server, &mine));
            }
        }
        at_owner.sort_by(f64::total_cmp);
        routed_ms[0].push(at_owner);

        // Hand-overs: a SIGKILL, then a clean stop.
        let survivors: Vec<usize> = (0..3).filter(|i| *i != 2).collect();
        three[2].kill();
        let started = Instant::now();
        while !survivors.iter().all(|i| orders(&three[*i]).as_ref() == Some(&whole)) {
            assert!(started.elapsed() < Duration::from_secs(120), "never whole after a kill");
            std::thread::sleep(Duration::from_millis(20));
        }
        killed.push(started.elapsed().as_secs_f64());
        three[1].stop();
        let started = Instant::now();
        while orders(&three[0]).as_ref() != Some(&whole) {
            assert!(started.elapsed() < Duration::from_secs(120), "never whole after a stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        stopped.push(started.elapsed().as_secs_f64());
        drop(three);

        // Three instances again, each keeping a standby copy of every shard it is not active for.
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let mut three: Vec<Server> = ["a", "b", "c"]
            .iter()
            .zip(&dirs)
            .map(|(id, d)| Server::start(d.path(), &wasm, &config(&broker, round * 3 + 2, Some(id), 2)))
            .collect();
        wait_caught_up(&three.iter().collect::<Vec<_>>(), n as u64);
        let warm = |server: &Server| {
            let status = server.get("/v1/projections/order-summary");
            let standbys = status["shards"].as_array().into_iter().flatten().filter(|s| s["role"] == "standby");
            standbys.filter(|s| s["lag"] == 0 && s["partitions"].as_array().is_some_and(|p| !p.is_empty())).count()
        };
        let until = Instant::now() + Duration::from_secs(120);
        // Every instance warm for every shard it is not active for: 4 shards × 2 standbys.
        while three.iter().map(warm).sum::<usize>() < 8 {
            assert!(Instant::now() < until, "the standbys never caught up");
            std::thread::sleep(Duration::from_millis(50));
        }
        three[2].kill();
        let started = Instant::now();
        while !(0..2).all(|i| orders(&three[i]).as_ref() == Some(&whole)) {
            assert!(started.elapsed() < Duration::from_secs(120), "never whole after a kill, with standbys");
            std::thread::sleep(Duration::from_millis(20));
        }
        killed_warm.push(started.elapsed().as_secs_f64());
        drop(three);
        let p50 = |v: &[Vec<Vec<f64>>; 2], i: usize| quantile(&v[i][round], 0.5);
        eprintln!(
            "round {round}: ingest {:.1} s / {:.1} s (CPU {:.1} / {:.1} s), lookup p50 {:.2} / {:.2} ms, search p50 {:.2} / {:.2} ms, \
             kill → whole {:.1} s (standbys: {:.1} s), stop → whole {:.1} s",
            ingest[0][round],
            ingest[1][round],
            cpu[0][round],
            cpu[1][round],
            p50(&lookup_ms, 0),
            p50(&lookup_ms, 1),
            p50(&search_ms, 0),
            p50(&search_ms, 1),
            killed[round],
            killed_warm[round],
            stopped[round]
        );
    }

    let per = |v: &[Vec<f64>], q: f64| v.iter().map(|l| quantile(l, q)).collect::<Vec<f64>>();
    println!("\n## cluster: {n} events (order-summary and order-search), 4 partitions, tansu, {rounds} rounds\n");
    println!("| measure | one instance, every shard | three instances | ratio (three ÷ one; spread) |");
    println!("|---|---|---|---|");
    let row = |what: &str, one: &[f64], three: &[f64], unit: &str| {
        let ratios: Vec<f64> = three.iter().zip(one).map(|(t, o)| t / o).collect();
        println!(
            "| {what} | {:.2} {unit} | {:.2} {unit} | {:.2} ({}) |",
            common::median(one),
            common::median(three),
            common::median(&ratios),
            common::spread(&ratios)
        );
    };
    row("ingest, wall", &ingest[0], &ingest[1], "s");
    row("ingest, CPU of all instances", &cpu[0], &cpu[1], "s");
    let per_cpu = |c: &[f64]| c.iter().map(|s| (n * 2) as f64 / s).collect::<Vec<f64>>();
    row("events applied per CPU second", &per_cpu(&cpu[0]), &per_cpu(&cpu[1]), "");
    row("lookup p50", &per(&lookup_ms[0], 0.5), &per(&lookup_ms[1], 0.5), "ms");
    row("lookup p99", &per(&lookup_ms[0], 0.99), &per(&lookup_ms[1], 0.99), "ms");
    println!(
        "| routed lookup p50 (at the owner → through another instance) | {:.2} ms | {:.2} ms | |",
        common::median(&per(&routed_ms[0], 0.5)),
        common::median(&per(&routed_ms[1], 0.5))
    );
    println!(
        "| routed lookup p99 (at the owner → through another instance) | {:.2} ms | {:.2} ms | |",
        common::median(&per(&routed_ms[0], 0.99)),
        common::median(&per(&routed_ms[1], 0.99))
    );
    row("search p50", &per(&search_ms[0], 0.5), &per(&search_ms[1], 0.5), "ms");
    row("search p99", &per(&search_ms[0], 0.99), &per(&search_ms[1], 0.99), "ms");
    let added = |v: &[Vec<Vec<f64>>; 2], q: f64| {
        let (one, three) = (per(&v[0], q), per(&v[1], q));
        common::median(&three.iter().zip(&one).map(|(t, o)| t - o).collect::<Vec<f64>>())
    };
    println!(
        "\nforwarding adds (median over rounds): lookups {:.2} ms at p50, {:.2} ms at p99; searches {:.2} ms at p50, {:.2} ms at p99",
        added(&lookup_ms, 0.5),
        added(&lookup_ms, 0.99),
        added(&search_ms, 0.5),
        added(&search_ms, 0.99)
    );
    println!(
        "routing a lookup to its shard's owner adds (median over rounds): {:.2} ms at p50, {:.2} ms at p99",
        added(&routed_ms, 0.5),
        added(&routed_ms, 0.99)
    );
    println!(
        "hand-over, to answering whole again (session.timeout.ms 6 s): after a SIGKILL, no standby {:.1} s (median; {}), \
         standbys on every instance {:.1} s ({}); after a clean stop {:.1} s ({})",
        common::median(&killed),
        common::spread(&killed),
        common::median(&killed_warm),
        common::spread(&killed_warm),
        common::median(&stopped),
        common::spread(&stopped)
    );
}
