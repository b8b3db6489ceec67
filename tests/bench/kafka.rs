//! `cargo bench -p refract --bench kafka`: consuming a Kafka topic, raw
//! against the order-summary projection end to end, in one run over the
//! same topic, on two brokers: tansu (a real Kafka-protocol server, SQLite
//! storage, the one the tests use) and librdkafka's in-process mock
//! cluster, which serves fetches far faster and so shows Refract's own
//! ceiling rather than the broker's.
//!
//! - **raw consume**: a librdkafka consumer (the one Refract uses) reading
//!   every record of the topic from the beginning, and of each its key,
//!   type header, timestamp and value (no decoding, nothing kept);
//! - **no-op projection**: a native projection that does nothing, through
//!   the projector: Refract's reading, decoding and checkpoint commits alone;
//! - **wasm order-summary**: the component through the projector reading
//!   the same topic (replica mode), decoding each record (plain JSON, type in
//!   a header), with durable commits of tables and checkpoints, until every
//!   record is consumed.
//!
//! The rounds alternate raw, no-op and wasm `REFRACT_BENCH_ROUNDS` times
//! (default 5); the figures are medians, with each ratio's spread over the
//! rounds. Set `REFRACT_BENCH_EVENTS` to change the number of records (default
//! 100,000 on the mock cluster: beyond librdkafka's default producer queue
//! of 100,000 messages its mock broker stalls here) and `REFRACT_BENCH_TANSU_EVENTS` for tansu
//! (default 10,000: its fetches are slow).

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use refract::plugin::Handler;
use refract::plugin::cache::CompileCache;
use refract::plugin::native::NativeProjection;
use refract::plugin::wasm::{self, PluginLimits, WasmPlugin};
use refract::projector::{BatchOptions, Projector};
use refract::source::Sources;
use refract::source::kafka::KafkaConfig;
use refract::source::log::{EventLog, LogOptions};
use refract::store::ReadModel;
use refract_sdk::{Manifest, Projection};
use support::kafka::{Broker, Out, TestProducer};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPIC: &str = "bench.orders";

/// librdkafka's `fetch.wait.max.ms` for both consumers (`REFRACT_BENCH_FETCH_WAIT_MS`, default its own 500).
fn fetch_wait() -> String {
    std::env::var("REFRACT_BENCH_FETCH_WAIT_MS").unwrap_or_else(|_| "500".into())
}
const PARTITIONS: i32 = 4;

fn raw_consume(bootstrap: &str, n: usize) -> f64 {
    // Timed like the projection: from creating the consumer (which, like
    // Refract's reader, learns the partitions before assigning them).
    let started = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-raw")
        .set("fetch.wait.max.ms", fetch_wait())
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(TOPIC), Duration::from_secs(5)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(TOPIC, p.id(), Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let (mut seen, mut bytes) = (0, 0usize);
    // Poll as Refract's reader does: wait only when nothing is buffered.
    let mut wait = Duration::from_millis(100);
    while seen < n {
        match consumer.poll(wait) {
            Some(m) => {
                // What any application reads of a record to act on it: its
                // key, its type (a header), its time and its value.
                let m = m.unwrap();
                let event_type = m.headers().and_then(|hs| hs.iter().find(|h| h.key == "event-type")?.value);
                bytes += m.payload().map_or(0, <[u8]>::len)
                    + m.key().map_or(0, <[u8]>::len)
                    + event_type.map_or(0, <[u8]>::len)
                    + m.timestamp().to_millis().is_some() as usize;
                seen += 1;
                wait = Duration::ZERO;
            }
            None => wait = Duration::from_millis(100),
        }
    }
    std::hint::black_box(bytes);
    started.elapsed().as_secs_f64()
}

/// Subscribes to `orders` and does nothing: what reading, decoding and
/// checkpointing cost without a projection's own work.
struct Noop;

impl Projection for Noop {
    fn manifest() -> Manifest {
        Manifest::new("noop", "1.0.0").subscribe("orders", &[])
    }
    fn apply(_: &refract_sdk::Event) -> Result<(), refract_sdk::Failure> {
        Ok(())
    }
}

fn order_summary(dir: &std::path::Path) -> Box<dyn Handler> {
    let engine = refract::plugin::engine::new_engine().unwrap();
    let cache = CompileCache::new(&dir.join("cache"), &engine).unwrap();
    let (component, _) = cache.load(&std::fs::read(&support::plugins().order_summary).unwrap()).unwrap();
    let linker = wasm::linker(&engine).unwrap();
    Box::new(WasmPlugin::load(&engine, &linker, &component, "order-summary", PluginLimits::default()).unwrap())
}

fn projection(bootstrap: &str, n: usize, dir: &std::path::Path, handler: Box<dyn Handler>) -> f64 {
    let handler_name = handler.manifest().name.clone();
    std::fs::create_dir_all(dir).unwrap();
    let kafka: KafkaConfig = serde_saphyr::from_str(&format!(
        "brokers: {}\nproperties: {{ fetch.wait.max.ms: \"{}\" }}\nstreams:\n  orders: {{ topic: {TOPIC}, type-header: event-type }}\n",
        bootstrap,
        fetch_wait()
    ))
    .unwrap();
    let log = Arc::new(EventLog::open(&dir.join("log.redb"), LogOptions::default()).unwrap());
    let read_model = Arc::new(ReadModel::open(&dir.join("rm.redb")).unwrap());
    let sources = Sources { log, kafka: Arc::new(kafka), shard: None };
    let status = Arc::new(Mutex::new(Default::default()));
    let projector = Projector::new(handler, read_model.clone(), sources, BatchOptions::default(), status).unwrap();
    let control = projector.control();
    let started = Instant::now();
    // Named for profiles (`perf report --comm worker-noop`).
    let name = format!("worker-{}", handler_name);
    let worker = std::thread::Builder::new().name(name).spawn(move || projector.run()).unwrap();
    let consumed = || read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).sum::<u64>();
    while consumed() < n as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let seconds = started.elapsed().as_secs_f64();
    control.stop();
    worker.join().unwrap();
    let counters = read_model.counters().unwrap();
    assert_eq!((counters.events_applied, counters.dead_letters), (n as u64, 0), "every record applied once");
    seconds
}

fn records(n: usize) -> Vec<Out> {
    refract_client::fixtures::orders(n, 42, 0.0)
        .iter()
        .map(|e| Out {
            key: e["key"].as_str().map(str::to_owned),
            value: Some(e["data"].to_string().into_bytes()),
            headers: vec![("event-type".into(), e["type"].as_str().unwrap().into())],
            timestamp: e["time"].as_i64(),
            ..Out::default()
        })
        .collect()
}

/// Produce `n` records, then consume them raw and through the projection,
/// alternating `REFRACT_BENCH_ROUNDS` times (default 5) so that each meets
/// the broker and the machine in the same states; the figures are medians.
fn compare(label: &str, bootstrap: &str, n: usize, dir: &std::path::Path) {
    eprintln!("{label}: producing {n} order events to {TOPIC} …");
    let started = Instant::now();
    TestProducer::new(bootstrap).send_all(TOPIC, &records(n));
    let produce = started.elapsed().as_secs_f64();
    let rounds: usize = std::env::var("REFRACT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let (mut raw, mut noop, mut wasm) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        raw.push(raw_consume(bootstrap, n));
        let noop_projection = Box::new(NativeProjection::new(Noop::manifest(), Noop::handle));
        noop.push(projection(bootstrap, n, &dir.join(format!("{label}-noop-{round}")), noop_projection));
        let run = dir.join(format!("{label}-wasm-{round}"));
        wasm.push(projection(bootstrap, n, &run, order_summary(&run)));
        eprintln!(
            "{label}, round {round}: raw {:.3} s, no-op {:.3} s ({:.2}), wasm {:.3} s ({:.2})",
            raw[round],
            noop[round],
            raw[round] / noop[round],
            wasm[round],
            raw[round] / wasm[round]
        );
    }
    let (noop_ratios, wasm_ratios) = (common::rate_ratios(&noop, &raw), common::rate_ratios(&wasm, &raw));
    let (raw_s, noop_s, wasm_s) = (common::median(&raw), common::median(&noop), common::median(&wasm));
    let rate = |s: f64| n as f64 / s;
    println!(
        "\n{label}: {n} order events on a {PARTITIONS}-partition topic (medians of {rounds} alternating rounds)\n"
    );
    println!("| measure | records/s | seconds |");
    println!("|---|---:|---:|");
    println!("| produce (librdkafka, acks) | {:.0} | {produce:.2} |", rate(produce));
    println!("| raw consume (librdkafka: key, type header, time, value) | {:.0} | {raw_s:.3} |", rate(raw_s));
    println!("| no-op projection end to end (read, decode, checkpoint) | {:.0} | {noop_s:.3} |", rate(noop_s));
    println!("| wasm order-summary end to end | {:.0} | {wasm_s:.3} |", rate(wasm_s));
    println!("\n| ratio | median | rounds | target |");
    println!("|---|---:|---:|---:|");
    println!(
        "| no-op projection end to end / raw consume | **{:.2}** | {} | ≥ 0.50 |",
        common::median(&noop_ratios),
        common::spread(&noop_ratios)
    );
    println!(
        "| wasm order-summary end to end / raw consume | {:.2} | {} | ≥ 0.80 |",
        common::median(&wasm_ratios),
        common::spread(&wasm_ratios)
    );
}

fn main() {
    refract::allocator::configure();
    let count = |var: &str, default: usize| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let dir = tempfile::tempdir().unwrap();
    support::plugins();

    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    compare("librdkafka mock cluster", &mock.bootstrap_servers(), count("REFRACT_BENCH_EVENTS", 100_000), dir.path());

    let broker = Broker::start();
    broker.create_topic(TOPIC, PARTITIONS as u32);
    compare("tansu", &broker.address(), count("REFRACT_BENCH_TANSU_EVENTS", 10_000), dir.path());
}
