//! `cargo bench -p refract --bench search`: search read models, against raw
//! tantivy, in one run over the same documents.
//!
//! - **indexing**: the `order-search` component end to end (log → projector →
//!   redb tables and outbox → indexer → tantivy commit) against raw
//!   tantivy indexing the same document versions (delete by id + add) with a
//!   single commit;
//! - **queries**: the same queries through `GET …/search` over HTTP against
//!   calling tantivy's searcher directly (parse, top 10, count, fetch docs),
//!   one at a time and with four clients against four searching threads.
//!
//! Set `REFRACT_BENCH_EVENTS` to change the number of events (default
//! 1,000,000), `REFRACT_BENCH_COMMIT_MS` to change the indexer's commit interval (500)
//! and `REFRACT_BENCH_BATCH=<events>,<ms>,<factor>` the projector's batch
//! bounds and catch-up factor (10000,250,4). Indexing runs
//! `REFRACT_BENCH_ROUNDS` times (default 3), raw tantivy and the component
//! alternating; the figures are the medians.

#[path = "common.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::Connection;
use order_search::OrderSearch;
use refract::config::Config;
use refract::plugin::cache::CompileCache;
use refract::plugin::wasm::{self, PluginLimits, WasmPlugin};
use refract::runtime::Runtime;
use refract::store::search::IndexSchema;
use refract_sdk::Projection;
use refract_sdk::native::{MemoryBackend, with_backend};
use tantivy::collector::{Count, TopDocs};
use tantivy::query::QueryParser;
use tantivy::{TantivyDocument, Term};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const QUERIES: [&str; 5] = [
    "q=lamp&limit=10",
    "q=%22red+chair%22&limit=10",
    "q=coffee+AND+tea&limit=10",
    "q=lamp&filter=status:paid&limit=10",
    "q=book&filter=total:%5B100+TO+*%5D&limit=10",
];
const PLAIN: [(&str, &str); 5] = [
    ("lamp", ""),
    ("\"red chair\"", ""),
    ("coffee AND tea", ""),
    ("lamp", "status:paid"),
    ("book", "total:[100 TO *]"),
];

fn main() {
    refract::allocator::configure();
    let n: usize = std::env::var("REFRACT_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    eprintln!("generating {n} order events …");
    let events = refract_client::fixtures::orders(n, 42, 0.0);

    // The document versions the projection upserts, recorded natively.
    let mut documents: Vec<(String, Vec<u8>)> = Vec::with_capacity(n);
    let mut store = MemoryBackend::default();
    for e in &events {
        let data = serde_json::to_vec(&e["data"]).unwrap();
        let event = refract_sdk::testing::event("orders", e["type"].as_str().unwrap(), None, &data);
        let id = e["data"]["orderId"].as_str().unwrap().to_owned();
        let (s, result) = with_backend(store, || OrderSearch::apply(&event));
        result.unwrap();
        documents.push((id.clone(), s.document("orders", &id).unwrap().to_vec()));
        store = s;
    }
    drop(store);

    // Baseline: raw tantivy, same schema, same documents, one commit.
    let mapping = refract::plugin::native::NativeProjection::with_indexes(
        OrderSearch::manifest(),
        OrderSearch::indexes(),
        OrderSearch::handle,
    );
    let mapping = refract::plugin::Handler::indexes(&mapping)[0].clone();
    let schema = IndexSchema::new(&mapping).unwrap();

    // The check every upserted document gets on the projector's thread:
    // scanning it against the mapping, against parsing it into a JSON value.
    let started = Instant::now();
    documents.iter().for_each(|(_, doc)| schema.validate(doc).unwrap());
    let check_scan = started.elapsed().as_secs_f64();
    let started = Instant::now();
    documents.iter().for_each(|(_, doc)| drop(schema.parse(doc).unwrap()));
    let check_parse = started.elapsed().as_secs_f64();

    // The component end to end, through the runtime's own threads.
    let mut config = Config::default();
    if let Some(ms) = std::env::var("REFRACT_BENCH_COMMIT_MS").ok().and_then(|v| v.parse().ok()) {
        config.search.commit_interval_ms = ms;
    }
    // `REFRACT_BENCH_BATCH=<events>,<ms>,<factor>`: batch.max-events,
    // batch.max-duration-ms and batch.catch-up-factor.
    if let Ok(batch) = std::env::var("REFRACT_BENCH_BATCH") {
        let numbers: Vec<u64> = batch.split(',').map(|n| n.parse().expect("REFRACT_BENCH_BATCH: numbers")).collect();
        let [events, ms, factor] = numbers[..] else { panic!("REFRACT_BENCH_BATCH=<events>,<ms>,<factor>") };
        (config.batch.max_events, config.batch.max_duration_ms) = (events as usize, ms);
        config.batch.catch_up_factor = factor as u32;
    }
    let engine = refract::plugin::engine::new_engine().unwrap();
    let cache = CompileCache::new(&dir.path().join("cache"), &engine).unwrap();
    let (component, _) = cache.load(&std::fs::read(&support::plugins().order_search).unwrap()).unwrap();
    let linker = wasm::linker(&engine).unwrap();

    // Raw tantivy and the component alternate, so that both meet the same
    // changes in the machine's load; the figures are the medians.
    let rounds: usize = std::env::var("REFRACT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let (mut raw_runs, mut wasm_runs, mut tables_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut memory_runs = Vec::new();
    let mut last: Option<(Arc<Runtime>, Arc<refract::generation::Generation>)> = None;
    for round in 0..rounds {
        raw_runs.push(raw_tantivy(&dir.path().join(format!("raw-{round}")), &schema, &documents));
        if let Some((runtime, _)) = last.take() {
            runtime.shutdown();
        }
        config.data_dir = dir.path().join(format!("data-{round}"));
        let runtime = Arc::new(Runtime::open(&config).unwrap());
        common::append(&runtime.log, "orders", &events);
        let plugin = WasmPlugin::load(&engine, &linker, &component, "order-search", PluginLimits::default()).unwrap();
        let started = Instant::now();
        let projection =
            runtime.add(Box::new(plugin), "bench".into()).unwrap().expect("one read model, not partitioned").shards()
                [0]
            .live();
        let total: u64 = runtime.log.heads("orders").unwrap().iter().sum();
        let mut tables_done = None;
        let (resident_before, mut resident_peak) = (resident_bytes(), 0);
        loop {
            resident_peak = resident_peak.max(resident_bytes());
            let consumed: u64 = projection.read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).sum();
            let written = projection.read_model.outbox_sequence().unwrap();
            if consumed == total && tables_done.is_none() {
                tables_done = Some(started.elapsed().as_secs_f64());
            }
            if consumed == total && projection.indexes.applied.load(Ordering::Relaxed) == written {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        tables_runs.push(tables_done.expect("the tables caught up first"));
        memory_runs.push(resident_peak.saturating_sub(resident_before) as f64 / (1 << 20) as f64);
        wasm_runs.push(started.elapsed().as_secs_f64());
        eprintln!(
            "round {round}: raw tantivy {:.2} s, wasm end to end {:.2} s ({:.2})",
            raw_runs[round],
            wasm_runs[round],
            raw_runs[round] / wasm_runs[round]
        );
        last = Some((runtime, projection));
    }
    let (raw_seconds, wasm_seconds, tables_seconds) =
        (common::median(&raw_runs), common::median(&wasm_runs), common::median(&tables_runs));
    let memory_mb = common::median(&memory_runs);
    let (runtime, projection) = last.expect("at least one round");
    let open = &projection.indexes.open["orders"];
    let indexed = open.reader.searcher().num_docs();

    // Queries, one at a time: tantivy's searcher directly, refract's query
    // code in process, the endpoint over HTTP, and `/healthz` over HTTP (the
    // round trip alone). They take turns in short slices, so that all four
    // meet the same changes in the machine's load; the figures are totals.
    let (query_rounds, slices) = (400, 8);
    let searcher = open.reader.searcher();
    let parser = QueryParser::for_index(&open.index, schema.text_fields());
    let requests: Vec<refract::store::search::SearchRequest> = PLAIN
        .iter()
        .map(|(q, filter)| refract::store::search::SearchRequest {
            q: (*q).to_owned(),
            filter: (*filter).to_owned(),
            ..Default::default()
        })
        .collect();
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let listener = tokio.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = refract::api::AppState::new(runtime.clone(), &config);
    let serving = state.clone();
    tokio.spawn(async move { refract::api::serve(serving, listener, std::future::pending()).await });
    let address = url.trim_start_matches("http://").to_owned();
    let mut client = Connection::new(&address);
    let (mut direct, mut in_process, mut http, mut floor) = (0.0, 0.0, 0.0, 0.0);
    let (mut direct_hits, mut http_hits) = (0, 0);
    for slice in 0..slices {
        let started = Instant::now();
        for _ in 0..query_rounds / slices {
            let hits = search_directly(&parser, &searcher);
            direct_hits += if slice == 0 { hits } else { 0 };
        }
        direct += started.elapsed().as_secs_f64();

        let started = Instant::now();
        for _ in 0..query_rounds / slices {
            for request in &requests {
                let response = open.search(request, 10).unwrap();
                assert!(response.total > 0);
            }
        }
        in_process += started.elapsed().as_secs_f64();

        let started = Instant::now();
        for _ in 0..query_rounds / slices {
            for q in QUERIES {
                let path = format!("/v1/projections/order-search/indexes/orders/search?{q}");
                if slice == 0 {
                    // The first slice checks the answers; the others read them as a load generator does.
                    let (status, body) = client.get(&path);
                    assert_eq!(status, 200, "{body}");
                    http_hits += body["hits"].as_array().unwrap().len();
                } else {
                    assert_eq!(client.get_bytes(&path).0, 200);
                }
            }
        }
        http += started.elapsed().as_secs_f64();

        let started = Instant::now();
        for _ in 0..query_rounds / slices * QUERIES.len() {
            assert_eq!(client.get("/healthz").0, 200);
        }
        floor += started.elapsed().as_secs_f64();
    }
    assert_eq!(http_hits, direct_hits, "both paths return the same hits");
    // The time the server spent on each search, from guard to response
    // (its own latency histogram); the rest is HTTP and the client.
    let metrics = state.metrics();
    let search_sum = |suffix: &str| -> f64 {
        let line = metrics.lines().find(|l| {
            l.contains("request_duration_seconds")
                && l.contains("/search")
                && l.split('{').next().unwrap().ends_with(suffix)
        });
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).expect("the search route's latency")
    };
    assert_eq!(search_sum("_count") as usize, query_rounds * QUERIES.len());
    let in_server = search_sum("_sum");

    // Throughput under concurrency: four HTTP clients against four threads
    // calling tantivy's searcher directly, doing what the one-at-a-time
    // direct loop does (both share the two cores: the clients with the server).
    let clients = 4;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..clients {
            let (parser, searcher) = (parser.clone(), searcher.clone());
            scope.spawn(move || {
                for _ in 0..query_rounds {
                    search_directly(&parser, &searcher);
                }
            });
        }
    });
    let direct_parallel = (clients * query_rounds * QUERIES.len()) as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..clients {
            let client = refract_client::Client::new(&url);
            scope.spawn(move || {
                for _ in 0..query_rounds {
                    for q in QUERIES {
                        let reply =
                            client.get(&format!("/v1/projections/order-search/indexes/orders/search?{q}")).unwrap();
                        assert_eq!(reply.status, 200);
                    }
                }
            });
        }
    });
    let http_parallel = (clients * query_rounds * QUERIES.len()) as f64 / started.elapsed().as_secs_f64();
    runtime.shutdown();

    let queries = (query_rounds * QUERIES.len()) as f64;
    println!(
        "\norder-search over {n} events: {} document versions, {indexed} documents; indexing: median of {rounds} alternating rounds\n",
        documents.len()
    );
    println!("| measure | rate | seconds |");
    println!("|---|---:|---:|");
    println!(
        "| raw tantivy: delete + add, one commit | {:.0} docs/s | {raw_seconds:.2} |",
        documents.len() as f64 / raw_seconds
    );
    println!(
        "| wasm order-search end to end (searchable) | {:.0} docs/s | {wasm_seconds:.2} |",
        documents.len() as f64 / wasm_seconds
    );
    println!(
        "| … of which the tables (redb: orders table and outbox) | {:.0} events/s | {tables_seconds:.2} |",
        n as f64 / tables_seconds
    );
    println!("| … its memory: growth of the resident heap while it ran (peak) | {memory_mb:.0} MiB | |");
    for (what, seconds) in [("scanning", check_scan), ("parsing into a JSON value", check_parse)] {
        println!(
            "| document check by {what} | {:.0} docs/s ({:.2} µs each) | {seconds:.2} |",
            documents.len() as f64 / seconds,
            seconds / documents.len() as f64 * 1e6
        );
    }
    println!(
        "| tantivy searcher, direct | {:.0} queries/s ({:.0} µs each) | {direct:.2} |",
        queries / direct,
        direct / queries * 1e6
    );
    println!(
        "| refract query code, in process | {:.0} queries/s ({:.0} µs each) | {in_process:.2} |",
        queries / in_process,
        in_process / queries * 1e6
    );
    println!(
        "| GET …/search over HTTP | {:.0} queries/s ({:.0} µs each) | {http:.2} |",
        queries / http,
        http / queries * 1e6
    );
    println!(
        "| … of which in the server (its latency histogram) | {:.0} µs each | {in_server:.2} |",
        in_server / queries * 1e6
    );
    println!(
        "| GET /healthz over HTTP (the round trip alone) | {:.0} requests/s ({:.0} µs each) | {floor:.2} |",
        queries / floor,
        floor / queries * 1e6
    );
    println!("\n| ratio | value | target |");
    println!("|---|---:|---:|");
    println!("| wasm indexing / raw tantivy | {:.2} | ≥ 0.70 |", raw_seconds / wasm_seconds);
    println!("| HTTP search / direct searcher, one at a time | {:.2} | ≥ 0.80 |", direct / http);
    println!(
        "| HTTP search / direct searcher, {clients} concurrent | {:.2} ({http_parallel:.0} vs {direct_parallel:.0} queries/s) | ≥ 0.80 |",
        http_parallel / direct_parallel
    );
}

/// The five queries with tantivy's own API, as an engineer calling it
/// directly would: parse, count and top 10, fetch each hit's document.
/// Returns the hits fetched.
fn search_directly(parser: &QueryParser, searcher: &tantivy::Searcher) -> usize {
    let mut hits = 0;
    for (q, filter) in PLAIN {
        let text = if filter.is_empty() { q.to_owned() } else { format!("({q}) AND {filter}") };
        let query = parser.parse_query(&text).unwrap();
        let (count, top) = searcher.search(&query, &(Count, TopDocs::with_limit(10).order_by_score())).unwrap();
        for (_, address) in top {
            let _doc: TantivyDocument = searcher.doc(address).unwrap();
            hits += 1;
        }
        assert!(count > 0);
    }
    hits
}

/// The process's resident anonymous memory (its heap, not the pages of the
/// files it maps: redb's and tantivy's), from `/proc/self/statm`.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: Vec<u64> = statm.split(' ').filter_map(|p| p.trim().parse().ok()).collect();
    pages.get(1).zip(pages.get(2)).map_or(0, |(resident, shared)| resident.saturating_sub(*shared) * 4096)
}

/// Raw tantivy indexing `documents` into a new index in `dir` (delete by id,
/// add, one commit), as the runtime's schema has them: seconds.
fn raw_tantivy(dir: &std::path::Path, schema: &IndexSchema, documents: &[(String, Vec<u8>)]) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    let index = tantivy::Index::create_in_dir(dir, schema.schema.clone()).unwrap();
    let started = Instant::now();
    let mut writer: tantivy::IndexWriter<TantivyDocument> = index.writer(64 << 20).unwrap();
    for (id, doc) in documents {
        let object = schema.parse(doc).unwrap();
        writer.delete_term(Term::from_field_text(schema.id, id));
        writer.add_document(schema.to_tantivy(id, &object, doc)).unwrap();
    }
    writer.commit().unwrap();
    started.elapsed().as_secs_f64()
}
