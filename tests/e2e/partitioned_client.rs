//! The user story of a partitioned cluster under fire (issue 26): three
//! instances share `order-summary` and `order-search` over four partitions
//! (one standby each) while events arrive through librdkafka; one instance
//! is SIGKILLed mid-ingest and restarted later, another stopped cleanly.
//! Throughout, a client asks every instance at random for items, prefix
//! pages and searches, each with the `wait_for` token of what had been
//! produced: every answer is right and no older than that token, or a
//! documented 503. At the end every instance answers the reference fold.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

use crate::partitioned::{ORDERS_STREAM, active_shards, cluster_config, start_cluster};
use crate::support::kafka::{Broker, Out};
use crate::support::{Server, encode, plugins};

/// Events produced: `REFRACT_E2E_CLUSTER_EVENTS`, or 100,000 as the issue asks.
fn event_count() -> usize {
    std::env::var("REFRACT_E2E_CLUSTER_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

const CHUNK: usize = 2000;

/// What has been produced so far: how many events, and the `wait_for`
/// token naming the last offset of each partition.
#[derive(Clone, Default)]
struct Produced {
    events: usize,
    token: String,
}

/// What the client saw.
#[derive(Default)]
struct Tally {
    answered: BTreeMap<&'static str, usize>,
    refused: usize,
    wrong: Vec<String>,
}

#[test]
#[ignore = "about 200 s on tansu 0.6.0, whose memory engine needs one record per batch (it skips records when fetching from inside a batch) and whose SQLite engine times out at 100,000 events; see docs/cluster-design.md, \"Open problems\""]
fn a_client_querying_every_instance_during_a_kill_and_a_stop_gets_right_answers_or_documented_503s() {
    let n = event_count();
    let broker = Broker::start_in_memory();
    broker.create_topic("shop.orders", 4);
    let events = refract_client::fixtures::orders(n, 71, 0.01);
    let config = |id: &str| cluster_config(&broker, id, "client-test", 1, ORDERS_STREAM);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let plugins = plugins();
    let ids = ["a", "b", "c"];
    let mut servers = start_cluster(3, &["order-summary", "order-search"], 4, |i| {
        Server::start(dirs[i].path(), &[&plugins.order_summary, &plugins.order_search], &config(ids[i]))
    });
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();

    // The instances the client may ask: one is taken out (under the write
    // lock, so no request to it is in flight) before it is killed or stopped.
    let up = RwLock::new(vec![true, true, true]);
    let produced = Mutex::new(Produced::default());
    let done = AtomicBool::new(false);
    let tally = Mutex::new(Tally::default());
    let started = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            client(&urls, &up, &produced, &done, &tally, &events);
        });
        let producer = broker.producer();
        let watermarks: BaseConsumer = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", broker.address())
            .set("group.id", "watermarks")
            .create()
            .unwrap();
        for (i, chunk) in events.chunks(CHUNK).enumerate() {
            producer.send_all("shop.orders", &chunk.iter().map(Out::plain).collect::<Vec<_>>());
            let token = (0..4)
                .filter_map(|p| {
                    let (_, high) = watermarks.fetch_watermarks("shop.orders", p, Duration::from_secs(10)).unwrap();
                    (high > 0).then(|| format!("orders:{p}:{}", high - 1))
                })
                .collect::<Vec<_>>()
                .join(",");
            *produced.lock().unwrap() = Produced { events: ((i + 1) * CHUNK).min(n), token };
            // At three, six and eight tenths of the events: the kill, the restart, the stop.
            let step = |at: usize| (i + 1) * CHUNK * 10 / n >= at && i * CHUNK * 10 / n < at;
            if step(3) {
                up.write().unwrap()[1] = false;
                servers[1].kill();
                eprintln!("b killed at {} events, {:?}", (i + 1) * CHUNK, started.elapsed());
                // The group notices after its session timeout; a and c take
                // b's shards on while the client asks, before more events come.
                wait_active(&[&servers[0], &servers[2]]);
                eprintln!("b's shards taken on by a and c, {:?}", started.elapsed());
            }
            if step(6) {
                servers[1].restart();
                up.write().unwrap()[1] = true;
                eprintln!("b restarted at {} events, {:?}", (i + 1) * CHUNK, started.elapsed());
            }
            if step(8) {
                up.write().unwrap()[2] = false;
                servers[2].stop();
                eprintln!("c stopped at {} events, {:?}", (i + 1) * CHUNK, started.elapsed());
            }
        }
        // The client goes on until both remaining instances answer whole.
        let expected: Vec<(String, Value)> = crate::support::reference::orders(&events).orders.into_iter().collect();
        for (server, id) in servers[..2].iter().zip(["a", "b"]) {
            let whole = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::partitioned::wait_whole(server, &expected, &format!("{id} at the end"))
            }));
            if whole.is_err() {
                // What the shards did, to tell a slow restore from a wrong one.
                for (i, s) in servers.iter().enumerate() {
                    for l in s.log().lines().filter(|l| l.contains("shard") && !l.contains("CONFWARN")) {
                        eprintln!("instance {i}: {}", &l[..l.len().min(260)]);
                    }
                }
                for s in &servers[..2] {
                    eprintln!("{}", s.get("/v1/projections/order-summary"));
                    let letters = s.get("/v1/projections/order-summary/dead-letters?limit=1000");
                    let mut why: BTreeMap<String, usize> = BTreeMap::new();
                    for l in letters["deadLetters"].as_array().into_iter().flatten() {
                        let error = l["error"].to_string();
                        let kind: String = error.chars().filter(|c| !c.is_ascii_digit()).take(60).collect();
                        *why.entry(kind).or_default() += 1;
                    }
                    eprintln!("dead letters by error: {why:#?}");
                }
                // What the broker holds: a lost record would explain a fold that differs.
                let reader = broker.reader("shop.orders", 4);
                let mut held = [0usize; 4];
                let quiet = Instant::now() + Duration::from_secs(20);
                while Instant::now() < quiet {
                    if let Some(Ok(m)) = reader.poll(Duration::from_millis(500)) {
                        use rdkafka::message::Message;
                        held[m.partition() as usize] += 1;
                    }
                }
                eprintln!(
                    "the broker holds {held:?} = {} records of {} produced",
                    held.iter().sum::<usize>(),
                    events.len()
                );
                panic!("{id} never answered the reference fold");
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    eprintln!("all produced and answered whole in {:?}", started.elapsed());
    let tally = tally.into_inner().unwrap();
    eprintln!("answers: {:?}; documented 503s: {}", tally.answered, tally.refused);
    assert!(
        tally.wrong.is_empty(),
        "{} wrong answers, e.g. {:#?}",
        tally.wrong.len(),
        &tally.wrong[..tally.wrong.len().min(5)]
    );
    assert!(
        tally.answered.len() == 3 && tally.answered.values().sum::<usize>() > 50,
        "too few queries to mean anything: {:?}",
        tally.answered
    );
}

/// Wait until `servers` are active for every shard of both projections between them.
fn wait_active(servers: &[&Server]) {
    let until = Instant::now() + Duration::from_secs(120);
    for projection in ["order-summary", "order-search"] {
        loop {
            let active: usize = servers.iter().map(|s| active_shards(s, projection).len()).sum();
            if active == 4 {
                break;
            }
            assert!(Instant::now() < until, "{projection}: the shards were never all taken on");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Ask a random instance for a random item, prefix page or search with
/// the latest `wait_for` token until `done`, checking every answer against
/// the reference fold of what had been produced when the token was taken.
fn client(
    urls: &[String],
    up: &RwLock<Vec<bool>>,
    produced: &Mutex<Produced>,
    done: &AtomicBool,
    tally: &Mutex<Tally>,
    events: &[Value],
) {
    let clients: Vec<refract_client::Client> = urls.iter().map(|u| refract_client::Client::new(u)).collect();
    let final_state = crate::support::reference::orders(events).orders;
    let mut folded: (usize, BTreeMap<String, Value>) = (0, BTreeMap::new());
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |bound: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % bound.max(1) as u64) as usize
    };
    while !done.load(Ordering::Relaxed) {
        let Produced { events: count, token } = produced.lock().unwrap().clone();
        if count == 0 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if folded.0 != count {
            folded = (count, crate::support::reference::orders(&events[..count]).orders);
        }
        let reference = &folded.1;
        let keys: Vec<&String> = reference.keys().collect();
        let key = keys[next(keys.len())].clone();
        let up = up.read().unwrap();
        let live: Vec<usize> = (0..clients.len()).filter(|i| up[*i]).collect();
        let instance = live[next(live.len())];
        let wait = format!("wait_for={}&timeout_ms=60000", encode(&token));
        let (kind, path) = match next(3) {
            0 => ("item", format!("/v1/projections/order-summary/tables/orders/items/{}?{wait}", encode(&key))),
            1 => {
                let prefix = &key[..key.len() - 1];
                (
                    "page",
                    format!(
                        "/v1/projections/order-summary/tables/orders/items?prefix={}&limit=1000&{wait}",
                        encode(prefix)
                    ),
                )
            }
            _ => (
                "search",
                format!(
                    "/v1/projections/order-search/indexes/orders/search?filter={}&{wait}",
                    encode(&format!("orderId:{key}"))
                ),
            ),
        };
        let mut reply = match clients[instance].get(&path) {
            Ok(r) => r,
            Err(e) => {
                tally.lock().unwrap().wrong.push(format!("{kind} from instance {instance}: {e}"));
                continue;
            }
        };
        // A page goes on from its cursor until the prefix is read whole.
        let mut items = reply.body["items"].as_array().cloned().unwrap_or_default();
        while reply.status == 200 && kind == "page" && items.len() < 20_000 {
            let Some(next) = reply.body["next"].as_str() else { break };
            match clients[instance].get(&format!("{path}&after={}", encode(next))) {
                Ok(r) => reply = r,
                Err(e) => {
                    reply = refract_client::Reply { status: 0, body: Value::String(e.to_string()) };
                    break;
                }
            }
            items.extend(reply.body["items"].as_array().cloned().unwrap_or_default());
        }
        drop(up);
        let mut tally = tally.lock().unwrap();
        if reply.status == 503 && reply.body["error"]["code"].as_str().is_some_and(|c| c.starts_with("shard_")) {
            tally.refused += 1;
            drop(tally);
            // As a client honouring `Retry-After` would, if more eagerly.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let wrong = match (reply.status, kind) {
            (200, "item") => judge(&key, &reply.body, reference, &final_state),
            (200, "page") => {
                let prefix = &key[..key.len() - 1];
                let got: BTreeMap<String, Value> = items
                    .iter()
                    .map(|i| (i["key"].as_str().unwrap_or_default().to_owned(), i["value"].clone()))
                    .collect();
                let missing: Vec<&String> =
                    reference.keys().filter(|k| k.starts_with(prefix) && !got.contains_key(*k)).collect();
                if !missing.is_empty() {
                    Some(format!("page {prefix}: {} keys missing, e.g. {}", missing.len(), missing[0]))
                } else {
                    got.iter().find_map(|(k, v)| judge(k, v, reference, &final_state))
                }
            }
            (200, _) => {
                let hits = reply.body["hits"].as_array().cloned().unwrap_or_default();
                match (reply.body["total"].as_u64(), hits.first()) {
                    (Some(1), Some(hit)) => {
                        let at = hit["document"]["updatedAt"].as_i64().unwrap_or_default();
                        let wanted = reference[&key]["updatedAt"].as_i64().unwrap_or_default();
                        (at < wanted).then(|| format!("search {key}: updatedAt {at}, older than {wanted}"))
                    }
                    _ => Some(format!("search {key}: {}", reply.body)),
                }
            }
            (status, _) => Some(format!("{kind} {key} from instance {instance}: {status} {}", reply.body)),
        };
        *tally.answered.entry(kind).or_default() += 1;
        if let Some(w) = wrong {
            tally.wrong.push(format!("{kind} from instance {instance} after {count} events ({token}): {w}"));
        }
    }
}

/// Why `got` is not an acceptable value of order `key`: it must be the
/// reference's state of the order when the token was taken, or a later one
/// (updated later, no later than the final state).
fn judge(
    key: &str,
    got: &Value,
    reference: &BTreeMap<String, Value>,
    final_state: &BTreeMap<String, Value>,
) -> Option<String> {
    let Some(wanted) = reference.get(key) else {
        // Placed after the token was taken: any state it passed through.
        return match final_state.get(key) {
            Some(_) => None,
            None => Some(format!("{key}: no such order ({got})")),
        };
    };
    let at = |v: &Value| v["updatedAt"].as_i64().unwrap_or_default();
    if got == wanted || (at(got) > at(wanted) && at(got) <= at(&final_state[key])) {
        None
    } else {
        Some(format!("{key}: {got}, older than {wanted}"))
    }
}
