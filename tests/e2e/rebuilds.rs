//! Blue/green rebuilds: a new generation replays history while the live one
//! keeps consuming and answering queries, then takes over atomically; a
//! crash resumes the rebuild, a cancel deletes it, and emitted events are
//! published once across the switch.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use refract_client::Client;
use serde_json::{Value, json};

use crate::support::{Server, ndjson, plugins, reference};

const ADMIN: &str = "admin-secret-0123456789";

fn config() -> String {
    format!("auth:\n  admin-token: {ADMIN}\nbatch:\n  max-events: 200\n  call-events: 50\n  max-duration-ms: 10\n")
}

fn admin(server: &Server) -> Client {
    Client::new(&server.url).with_token(Some(ADMIN))
}

fn append(server: &Server, stream: &str, events: &[Value]) {
    for chunk in events.chunks(2000) {
        assert_eq!(admin(server).append_ndjson(stream, &ndjson(chunk)).unwrap().status, 200);
    }
}

/// Wait until `projection` is live on `generation` with no rebuild running.
fn wait_switched(server: &Server, projection: &str, generation: u64) -> Value {
    let until = Instant::now() + Duration::from_secs(180);
    loop {
        let status = server.get(&format!("/v1/projections/{projection}"));
        if status["generation"] == generation && status["rebuild"].is_null() {
            return status;
        }
        assert!(Instant::now() < until, "no switch to generation {generation}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_rebuild_replays_history_while_the_live_generation_serves_then_switches() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.order_summary, &p.order_search], &config());
    let events = refract_client::fixtures::orders(10_000, 21, 0.01);
    append(&server, "orders", &events[..8000]);
    server.wait_caught_up();
    let known = server.table("order-summary", "orders")[0].clone();

    let started = admin(&server).post("/v1/projections/order-summary/rebuild", "application/json", b"").unwrap();
    assert_eq!((started.status, started.body["generation"].as_u64()), (202, Some(1)), "{}", started.body);
    let again = admin(&server).post("/v1/projections/order-summary/rebuild", "application/json", b"").unwrap();
    assert_eq!((again.status, again.body["error"]["code"].as_str()), (409, Some("rebuild_running")));
    let anonymous = server.client().post("/v1/projections/order-summary/rebuild", "application/json", b"").unwrap();
    assert_eq!(anonymous.status, 401);

    // Events keep arriving and queries keep being answered from the live generation.
    let url = server.url.clone();
    let more = events[8000..].to_vec();
    let appender = std::thread::spawn(move || {
        let client = Client::new(&url).with_token(Some(ADMIN));
        for chunk in more.chunks(250) {
            assert_eq!(client.append_ndjson("orders", &ndjson(chunk)).unwrap().status, 200);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut saw_progress = false;
    loop {
        let status = server.get("/v1/projections/order-summary");
        let item = server.get(&format!("/v1/projections/order-summary/tables/orders/items/{}", known.0));
        assert_eq!(item["orderId"], known.1["orderId"], "a query saw a half-built read model");
        if let Some(r) = status["rebuild"].as_object() {
            saw_progress |= r["replayed"].as_u64() < r["target"].as_u64() && r["generation"] == 1;
        } else {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(saw_progress, "the rebuild's progress was never visible");
    appender.join().unwrap();
    wait_switched(&server, "order-summary", 1);
    server.wait_caught_up();
    server.assert_order_summary_is_the_fold_of(&events);
    let root = dir.path().join("data/projections/order-summary");
    assert!(root.join("gen-1/read-model.redb").exists());
    assert!(!root.join("read-model.redb").exists(), "the old generation is deleted");

    // Search indexes are rebuilt with their projection.
    assert_eq!(
        admin(&server).post("/v1/projections/order-search/rebuild", "application/json", b"").unwrap().status,
        202
    );
    wait_switched(&server, "order-search", 1);
    server.wait_caught_up();
    let hits = server.get("/v1/projections/order-search/indexes/orders/search?limit=1");
    assert_eq!(hits["total"].as_u64().unwrap() as usize, reference::orders(&events).orders.len());
}

#[test]
fn a_rebuild_resumes_after_a_crash_and_a_cancelled_one_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[&plugins().order_summary], &config());
    let events = refract_client::fixtures::orders(20_000, 22, 0.01);
    append(&server, "orders", &events);
    server.wait_caught_up();
    assert_eq!(
        admin(&server).post("/v1/projections/order-summary/rebuild", "application/json", b"").unwrap().status,
        202
    );
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let status = server.get("/v1/projections/order-summary");
        if status["rebuild"]["replayed"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(status["rebuild"].is_object(), "the rebuild finished before the kill: {status}");
        assert!(Instant::now() < until, "no progress: {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.kill();
    server.restart();
    let status = server.get("/v1/projections/order-summary");
    assert_eq!(status["generation"], 0, "the live generation is untouched: {status}");
    assert_eq!(status["rebuild"]["generation"], 1, "the rebuild resumed: {status}");
    wait_switched(&server, "order-summary", 1);
    server.assert_order_summary_is_the_fold_of(&events);

    // A cancelled rebuild: its generation is deleted, the live one stays.
    assert_eq!(
        admin(&server).post("/v1/projections/order-summary/rebuild", "application/json", b"").unwrap().status,
        202
    );
    let cancelled = admin(&server).delete("/v1/projections/order-summary/rebuild").unwrap();
    assert_eq!((cancelled.status, cancelled.body["cancelled"].as_u64()), (200, Some(2)), "{}", cancelled.body);
    wait_switched(&server, "order-summary", 1);
    let gen2 = dir.path().join("data/projections/order-summary/gen-2");
    let until = Instant::now() + Duration::from_secs(10);
    while gen2.exists() {
        assert!(Instant::now() < until, "the cancelled generation is still on disk");
        std::thread::sleep(Duration::from_millis(50));
    }
    let none = admin(&server).delete("/v1/projections/order-summary/rebuild").unwrap();
    assert_eq!(none.status, 404);
    server.assert_order_summary_is_the_fold_of(&events);

    // The CLI: starts a rebuild and follows it until the new generation is live.
    let out = server.cli(&["rebuild", "order-summary"], Some(ADMIN));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("generation 2 of order-summary is live"), "{stderr}");
    assert_eq!(server.get("/v1/projections/order-summary")["generation"], 2);
    server.assert_order_summary_is_the_fold_of(&events);
    let refused = server.cli(&["rebuild", "order-summary", "--token", "wrong-token-0123456789"], None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
}

#[test]
fn emitted_events_are_published_once_across_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[&plugins().chaos], &config());
    let emits: Vec<Value> =
        (0..5100).map(|i| json!({"type": "Emit", "key": format!("k{i}"), "data": {"to": "echoes", "n": i}})).collect();
    append(&server, "chaos", &emits[..3000]);
    server.wait_caught_up();
    assert_eq!(
        admin(&server).post("/v1/projections/testkit-chaos/rebuild", "application/json", b"").unwrap().status,
        202
    );
    append(&server, "chaos", &emits[3000..5000]);
    wait_switched(&server, "testkit-chaos", 1);
    // The new generation numbers its outbox from 1 again: what it emits must not
    // be mistaken for what the old one already published.
    append(&server, "chaos", &emits[5000..]);
    server.wait_caught_up();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let status = server.get("/v1/projections/testkit-chaos");
        if status["emitted"]["lag"] == 0 {
            break;
        }
        assert!(Instant::now() < until, "{status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let streams = server.get("/v1/streams");
    let echoes = streams["streams"].as_array().unwrap().iter().find(|s| s["name"] == "echoes").unwrap().clone();
    let mut sources = BTreeSet::new();
    let mut count = 0;
    for (p, head) in echoes["heads"].as_array().unwrap().iter().enumerate() {
        let mut from = 0;
        while from < head.as_u64().unwrap() {
            let page = server.get(&format!("/v1/streams/echoes/events?partition={p}&from={from}&limit=1000"));
            for e in page["events"].as_array().unwrap() {
                sources.insert(e["data"]["source"].as_str().unwrap().to_owned());
                count += 1;
            }
            from = page["next"].as_u64().unwrap();
        }
    }
    assert_eq!(count, 5100, "one echo per emitting event: none lost at the switch, none repeated by the replay");
    assert_eq!(sources.len(), 5100);
}

#[test]
fn during_a_rebuild_of_200_000_events_a_querying_client_only_ever_sees_the_complete_read_model() {
    const EVENTS: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("auth:\n  admin-token: {ADMIN}\n");
    let server = Server::start(dir.path(), &[&plugins().order_summary], &config);
    let events = refract_client::fixtures::orders(EVENTS, 23, 0.01);
    for chunk in events.chunks(10_000) {
        assert_eq!(admin(&server).append_ndjson("orders", &ndjson(chunk)).unwrap().status, 200);
    }
    server.wait_caught_up();
    // The orders changed last are the last a rebuild reaches: a query answered
    // from a half-built generation would show them missing or older.
    let expected = reference::orders(&events);
    let mut latest: Vec<(&String, &Value)> = expected.orders.iter().collect();
    latest.sort_by_key(|(_, o)| std::cmp::Reverse(o["updatedAt"].as_i64()));
    let watched: Vec<(String, Value)> = latest.iter().take(20).map(|(k, v)| ((*k).clone(), (*v).clone())).collect();

    assert_eq!(
        admin(&server).post("/v1/projections/order-summary/rebuild", "application/json", b"").unwrap().status,
        202
    );
    let (mut queries, mut rebuilding_seen) = (0, 0);
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let status = server.get("/v1/projections/order-summary");
        let switched = status["generation"] == 1 && status["rebuild"].is_null();
        rebuilding_seen += usize::from(status["rebuild"].is_object());
        for (id, want) in &watched {
            let got = server.client().get(&format!("/v1/projections/order-summary/tables/orders/items/{id}")).unwrap();
            queries += 1;
            assert_eq!(got.status, 200, "query {queries} failed: {}", got.body);
            assert_eq!(&got.body, want, "query {queries} saw an incomplete read model");
        }
        if switched {
            break;
        }
        assert!(Instant::now() < until, "the rebuild did not finish: {status}");
    }
    assert!(rebuilding_seen > 0 && queries > 100, "{queries} queries, {rebuilding_seen} during the rebuild");
    let got: Vec<(String, Value)> = server.table("order-summary", "orders");
    assert!(got == expected.orders.into_iter().collect::<Vec<_>>(), "the new generation differs from the reference");
    let status = server.get("/v1/projections/order-summary");
    assert_eq!(status["eventsApplied"], EVENTS - expected.rejected);
}

/// Two rebuild requests at the same moment (a double click): exactly one
/// starts, the other is a 409, and the switch keeps the read model whole.
/// Both used to pass the "is one running?" check and pick the same
/// generation; the last switch then deleted the live generation's files.
#[test]
fn concurrent_rebuild_requests_start_one_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[&plugins().order_summary], &config());
    let events = refract_client::fixtures::orders(3000, 8, 0.0);
    append(&server, "orders", &events);
    server.wait_caught_up();
    for round in 1..=3u64 {
        let barrier = std::sync::Barrier::new(4);
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let posts: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let client = admin(&server);
                        barrier.wait();
                        client.post("/v1/projections/order-summary/rebuild", "application/json", b"").unwrap().status
                    })
                })
                .collect();
            posts.into_iter().map(|p| p.join().unwrap()).collect()
        });
        let mut sorted = statuses.clone();
        sorted.sort();
        assert_eq!(sorted, [202, 409, 409, 409], "round {round}: {statuses:?}");
        wait_switched(&server, "order-summary", round);
        server.assert_order_summary_is_the_fold_of(&events);
    }
    server.kill();
    server.restart();
    server.wait_caught_up();
    server.assert_order_summary_is_the_fold_of(&events);
    assert_eq!(server.get("/v1/projections/order-summary")["generation"], 3);
}

/// A switch that cannot be written (the temporary file's path is taken by a
/// directory here; a full disk in production) is retried, visible in the
/// status, and completes once it can: the projection never stays stopped
/// between two generations. It used to give up with the live worker stopped
/// and the rebuild marked running forever.
#[test]
fn a_switch_that_cannot_be_written_is_retried_until_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[&plugins().order_summary], &config());
    let events = refract_client::fixtures::orders(2500, 4, 0.0);
    append(&server, "orders", &events[..2000]);
    server.wait_caught_up();
    let blocker = dir.path().join(format!("data/projections/order-summary/.generation.tmp{}", server.pid()));
    std::fs::create_dir(&blocker).unwrap();
    let started = admin(&server).post("/v1/projections/order-summary/rebuild", "application/json", b"").unwrap();
    assert_eq!(started.status, 202, "{}", started.body);
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let status = server.get("/v1/projections/order-summary");
        if status["rebuild"]["waitingFor"].as_str().is_some_and(|w| w.contains("switching generations")) {
            break;
        }
        assert!(Instant::now() < until, "the failed switch is not shown: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_dir(&blocker).unwrap();
    wait_switched(&server, "order-summary", 1);
    append(&server, "orders", &events[2000..]);
    server.wait_caught_up();
    server.assert_order_summary_is_the_fold_of(&events);
}

/// An event the old version dead-lettered and the new one handles is
/// replayed as history by the rebuild, but its derived events were never
/// published: the rebuild must publish them (once). They used to be
/// dropped with the other history, and the old generation's dead letter was
/// deleted at the switch, so they were lost.
#[test]
fn a_rebuild_publishes_what_the_old_version_dead_lettered_and_the_new_one_emits() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.chaos], &config());
    let mut events = crate::emitted_events::emits(0..300, "echoes");
    events[100]["type"] = json!("EmitIfV2");
    events[200]["type"] = json!("EmitIfV2");
    append(&server, "chaos", &events);
    server.wait_caught_up();
    crate::emitted_events::wait_published(&server, 298);
    assert_eq!(server.get("/v1/projections/testkit-chaos")["deadLetters"], 2);

    // Version 2 (a new schema-version: a rebuild) handles them.
    let file = dir.path().join("plugins").join(p.chaos.file_name().unwrap());
    let tmp = file.with_extension("tmp");
    std::fs::copy(&p.chaos_v2, &tmp).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let status = wait_switched(&server, "testkit-chaos", 1);
    assert_eq!(status["deadLetters"], 0, "{status}");
    let until = Instant::now() + Duration::from_secs(60);
    let echoes = loop {
        let echoes = server.stream("echoes");
        if echoes.len() >= 300 || Instant::now() > until {
            break echoes;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let ns: BTreeSet<u64> = echoes.iter().map(|e| e["data"]["n"].as_u64().unwrap()).collect();
    assert_eq!(ns.len(), 300, "the fixed events' echoes are missing");
    assert_eq!(echoes.len(), 300, "echoes published twice");
}
