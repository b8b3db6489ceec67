//! Malformed events and events a plugin rejects, traps on, or cannot finish
//! each become exactly one dead letter; every other event is applied.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::support::{Server, ndjson, plugins, reference};

#[test]
fn malformed_and_rejected_order_events_are_dead_lettered_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.order_summary], "");
    let mut events = refract_client::fixtures::orders(3000, 5, 0.02);
    // Mix in malformed events: wrong shapes, wrong types, missing fields.
    let malformed = [
        json!({"type": "OrderPlaced", "key": "o-1", "time": 1, "data": "not an object"}),
        json!({"type": "OrderPlaced", "key": "o-x", "time": 1, "data": {"orderId": "o-x", "total": "12"}}),
        json!({"type": "PaymentReceived", "key": "o-1", "time": 1, "data": {"orderId": "o-1"}}),
        json!({"type": "OrderShipped", "key": "o-2", "time": 1, "data": [1, 2, 3]}),
        json!({"type": "OrderCancelled", "key": "o-3", "time": 1, "data": null}),
    ];
    for (i, m) in malformed.iter().enumerate() {
        events.insert(400 * (i + 1), m.clone());
    }
    // Events the plugin does not subscribe to are skipped, not dead-lettered.
    events.insert(10, json!({"type": "OrderAudited", "key": "o-1", "time": 1, "data": {}}));
    let reply = server.client().append_ndjson("orders", &ndjson(&events)).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Bodies that are not events never reach the log.
    let bad = server.client().append_ndjson("orders", b"{\"type\":\"OrderPlaced\"}\n").unwrap();
    assert_eq!((bad.status, bad.body["error"]["code"].as_str()), (400, Some("bad_request")));
    assert!(bad.body["error"]["message"].as_str().unwrap().contains("missing field `data`"));
    server.wait_caught_up();

    let subscribed: Vec<Value> = events.iter().filter(|e| e["type"] != "OrderAudited").cloned().collect();
    let expected = reference::orders(&subscribed);
    let letters = server.get("/v1/projections/order-summary/dead-letters?limit=1000");
    let letters = letters["deadLetters"].as_array().unwrap();
    assert_eq!(letters.len(), expected.rejected);
    let positions: BTreeSet<(u64, u64)> =
        letters.iter().map(|l| (l["partition"].as_u64().unwrap(), l["offset"].as_u64().unwrap())).collect();
    assert_eq!(positions.len(), letters.len(), "an event was dead-lettered twice");
    let not_an_object = letters.iter().find(|l| l["data"] == "not an object").expect("the malformed event");
    assert!(not_an_object["error"].as_str().unwrap().contains("does not decode"), "{not_an_object}");
    assert_eq!(not_an_object["pluginVersion"], "0.1.0");
    let got = server.table("order-summary", "orders");
    assert!(got == expected.orders.into_iter().collect::<Vec<_>>(), "orders differ from the reference fold");
    let status = server.get("/v1/projections/order-summary");
    assert_eq!(status["eventsApplied"], subscribed.len() - expected.rejected);
    assert!(status["lastError"].as_str().unwrap().contains("dead-lettered"));
}

#[test]
fn traps_deadlines_memory_caps_and_transient_failures_are_contained() {
    contained("limits:\n  deadline-ms: 300\n  memory-mb: 32\nbatch:\n  initial-backoff-ms: 20\n");
}

#[test]
fn limits_set_for_one_plugin_apply_to_it() {
    // Generous global limits, tight ones for testkit-chaos alone: the same containment.
    contained(
        "limits:\n  deadline-ms: 20000\n  memory-mb: 512\nbatch:\n  initial-backoff-ms: 20\n\
         plugins:\n  testkit-chaos:\n    limits: { deadline-ms: 300, memory-mb: 32 }\n",
    );
}

/// Feed testkit-chaos a rejection, a panic, an endless loop, a memory hog and
/// transient failures under `config`, which limits it to 300 ms a call and 32 MiB.
fn contained(config: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.chaos], config);
    let mut events: Vec<Value> = (0..200).map(|i| json!({"type": "Ok", "key": "k", "data": {"n": i}})).collect();
    for (at, ty) in [(20, "Reject"), (50, "Panic"), (90, "Spin"), (130, "Hog"), (160, "Flaky"), (170, "Flaky")] {
        events[at]["type"] = json!(ty);
    }
    let reply = server.client().append_ndjson("chaos", &ndjson(&events)).unwrap();
    assert_eq!(reply.status, 200);
    server.wait_caught_up();

    let letters = server.get("/v1/projections/testkit-chaos/dead-letters");
    let letters = letters["deadLetters"].as_array().unwrap();
    let by_type: Vec<(&str, &str)> =
        letters.iter().map(|l| (l["type"].as_str().unwrap(), l["error"].as_str().unwrap())).collect();
    assert_eq!(by_type.len(), 4, "{by_type:?}");
    assert!(by_type.iter().any(|(t, e)| *t == "Reject" && e.starts_with("rejected: asked to reject")));
    assert!(by_type.iter().any(|(t, e)| *t == "Panic" && e.contains("asked to panic at offset 50")), "{by_type:?}");
    // A trap names where it happened: the plugin's own frames, from its name section.
    let panic = by_type.iter().find(|(t, _)| *t == "Panic").unwrap().1;
    assert!(panic.contains("; wasm backtrace: ") && panic.contains("testkit_chaos"), "{panic}");
    assert!(by_type.iter().any(|(t, e)| *t == "Spin" && e.contains("deadline of 300 ms")), "{by_type:?}");
    assert!(by_type.iter().any(|(t, e)| *t == "Hog" && e.starts_with("trap:")), "{by_type:?}");
    // Everything else, including the flaky events after their retry, was applied once.
    let applied = server.table("testkit-chaos", "applied");
    let offsets: Vec<u64> = applied.iter().map(|(k, _)| k.split('/').nth(1).unwrap().parse().unwrap()).collect();
    let want: Vec<u64> = (0..200).filter(|i| ![20, 50, 90, 130].contains(i)).collect();
    assert_eq!(offsets, want);
    let status = server.get("/v1/projections/testkit-chaos");
    assert_eq!(status["eventsApplied"], 196);
    assert_eq!(status["state"], "running");
    // The HTTP API kept answering throughout (the server is still healthy).
    assert_eq!(server.get("/healthz")["status"], "ok");
}

#[test]
fn a_plugin_s_own_value_limit_refuses_larger_documents_as_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let config = "plugins:\n  testkit-chaos:\n    limits: { max-value-bytes: 100 }\n";
    let server = Server::start(dir.path(), &[&plugins().chaos], config);
    let events = [
        json!({"type": "Index", "key": "k", "data": {"n": 1, "tag": "small"}}),
        // Refused by the search index at the call.
        json!({"type": "Index", "key": "k", "data": {"n": 2, "tag": "x".repeat(200)}}),
        json!({"type": "Ok", "key": "k", "data": {"n": 3}}),
        // Refused when the SDK sends the batch's pending key/value writes
        // (at the end of the batch): bisection still isolates this event.
        json!({"type": "Ok", "key": "k", "data": {"n": 4, "pad": "y".repeat(200)}}),
        json!({"type": "Ok", "key": "k", "data": {"n": 5}}),
        // The plugin ignores the refusal and goes on: the host fails the batch anyway.
        json!({"type": "Swallow", "key": "k", "data": {"n": 6, "pad": "z".repeat(200)}}),
        json!({"type": "Ok", "key": "k", "data": {"n": 7}}),
    ];
    assert_eq!(server.client().append_ndjson("chaos", &ndjson(&events)).unwrap().status, 200);
    server.wait_caught_up();
    let letters = server.get("/v1/projections/testkit-chaos/dead-letters");
    let letters = letters["deadLetters"].as_array().unwrap();
    assert_eq!(letters.len(), 3, "{letters:?}");
    let offsets: Vec<_> = letters.iter().map(|l| l["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, [1, 3, 5]);
    assert!(letters[0]["error"].as_str().unwrap().contains("exceeds 100 bytes"), "{letters:?}");
    let pending = letters[1]["error"].as_str().unwrap();
    assert!(pending.contains("table applied") && pending.contains("exceeds 100 bytes"), "{pending}");
    let key = format!("(writing \"{}/{:020}\")", letters[1]["partition"], 3);
    assert!(pending.contains(&key), "{pending} should name {key}");
    let swallowed = letters[2]["error"].as_str().unwrap();
    assert!(swallowed.contains("exceeds 100 bytes") && swallowed.contains("swallowed/5"), "{swallowed}");
    assert_eq!(server.get("/v1/projections/testkit-chaos")["eventsApplied"], 4);
    let applied = server.table("testkit-chaos", "applied");
    assert_eq!(applied.len(), 4, "{applied:?}");
}

#[test]
fn dead_letters_can_be_inspected_retried_after_the_cause_is_gone_and_skipped() {
    const ADMIN: &str = "dead-letter-admin-token";
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[&plugins().order_summary], &format!("auth:\n  admin-token: {ADMIN}\n"));
    let admin = server.client().with_token(Some(ADMIN));
    let payment = |order: &str, amount: f64| json!({"type": "PaymentReceived", "key": order, "time": 2, "data": {"orderId": order, "paymentId": "p", "amount": amount}});
    // Payments that arrive before their orders: dead letters.
    let early = [payment("o-1", 10.0), payment("o-2", 5.0), payment("o-3", 1.0)];
    assert_eq!(admin.append_ndjson("orders", &ndjson(&early)).unwrap().status, 200);
    server.wait_caught_up();
    let letters = server.get("/v1/projections/order-summary/dead-letters")["deadLetters"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 3);
    let id_of = |order: &str| letters.iter().find(|l| l["data"]["orderId"] == order).unwrap()["id"].as_u64().unwrap();
    let one = server.get(&format!("/v1/projections/order-summary/dead-letters/{}", id_of("o-1")));
    assert!(one["error"].as_str().unwrap().contains("unknown order o-1"), "{one}");
    assert_eq!(server.client().get("/v1/projections/order-summary/dead-letters/999").unwrap().status, 404);
    // The CLI lists them, a line each: id, position, type, error.
    let out = server.cli(&["dead-letters", "order-summary"], None);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for order in ["o-1", "o-2", "o-3"] {
        let line = listed.lines().find(|l| l.split_whitespace().next() == Some(&id_of(order).to_string()));
        let line = line.unwrap_or_else(|| panic!("no line for the letter of {order} in\n{listed}"));
        assert!(line.contains("PaymentReceived") && line.contains(&format!("unknown order {order}")), "{line}");
    }

    // Retrying needs the admin token; while the orders are still missing, it fails again.
    let path = format!("/v1/projections/order-summary/dead-letters/{}/retry", id_of("o-1"));
    assert_eq!(server.client().post(&path, "application/json", b"").unwrap().status, 401);
    let again = admin.post(&path, "application/json", b"").unwrap();
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["applied"], json!([]));
    assert_eq!(again.body["failed"][0]["id"], id_of("o-1"));
    // The same through the CLI, which reads the report as a type.
    let out = server.cli(&["dead-letters", "order-summary", "retry", &id_of("o-2").to_string()], Some(ADMIN));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(report.starts_with("applied: 0; failed again: 1"), "{report}");
    assert!(report.contains(&format!("{}  ", id_of("o-2"))) && report.contains("unknown order o-2"), "{report}");

    // The orders arrive; o-3's payment is skipped; the rest are retried and applied.
    let orders: Vec<Value> = ["o-1", "o-2", "o-3"]
        .iter()
        .map(|o| json!({"type": "OrderPlaced", "key": o, "time": 1, "data": {"orderId": o, "customerId": "c-1", "total": 10.0}}))
        .collect();
    assert_eq!(admin.append_ndjson("orders", &ndjson(&orders)).unwrap().status, 200);
    server.wait_caught_up();
    let skip = admin.delete(&format!("/v1/projections/order-summary/dead-letters/{}", id_of("o-3"))).unwrap();
    assert_eq!(skip.status, 200, "{}", skip.body);
    let retried = admin.post("/v1/projections/order-summary/dead-letters/retry", "application/json", b"").unwrap();
    assert_eq!(retried.status, 200, "{}", retried.body);
    let mut applied: Vec<u64> = serde_json::from_value(retried.body["applied"].clone()).unwrap();
    applied.sort_unstable();
    assert_eq!(applied, [id_of("o-1"), id_of("o-2")]);
    let order = |id: &str| server.get(&format!("/v1/projections/order-summary/tables/orders/items/{id}"));
    assert_eq!((order("o-1")["status"].as_str(), order("o-1")["paid"].as_f64()), (Some("paid"), Some(10.0)));
    assert_eq!(order("o-2")["paid"], 5.0);
    assert_eq!(order("o-3")["paid"], 0.0, "the skipped payment stays unapplied");
    let status = server.get("/v1/projections/order-summary");
    assert_eq!((status["deadLetters"].as_u64(), status["eventsApplied"].as_u64()), (Some(0), Some(5)));
    assert!(server.get("/v1/projections/order-summary/dead-letters")["deadLetters"].as_array().unwrap().is_empty());

    // The CLI lists what is left.
    let out = server.cli(&["dead-letters", "order-summary"], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("holds no dead letters"), "{out:?}");
}

#[test]
fn a_plugin_failing_every_event_pauses_instead_of_dead_lettering_the_stream() {
    const ADMIN: &str = "pause-test-admin-token";
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "auth:\n  admin-token: {ADMIN}\nplugins:\n  testkit-chaos:\n    limits: {{ pause-after-dead-letters: 10 }}\n"
    );
    let server = Server::start(dir.path(), &[&plugins().chaos], &config);
    let admin = server.client().with_token(Some(ADMIN));
    let events: Vec<Value> = (0..100).map(|i| json!({"type": "Reject", "key": "k", "data": {"n": i}})).collect();
    assert_eq!(admin.append_ndjson("chaos", &ndjson(&events)).unwrap().status, 200);
    let paused_with = |letters: u64| {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let status = server.get("/v1/projections/testkit-chaos");
            if status["state"] == "paused" && status["deadLetters"] == letters {
                return status;
            }
            assert!(std::time::Instant::now() < until, "not paused with {letters} dead letters: {status}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let status = paused_with(10);
    assert!(status["lastError"].as_str().unwrap().contains("paused after 10 dead letters in a row"), "{status}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let status = server.get("/v1/projections/testkit-chaos");
    assert_eq!(status["deadLetters"], 10, "paused: nothing more is read");
    let read: u64 = status["partitions"].as_array().unwrap().iter().map(|p| p["checkpoint"].as_u64().unwrap()).sum();
    assert_eq!(read, 10, "the checkpoint stops at the last dead letter: nothing is skipped");

    assert_eq!(
        server.client().post("/v1/projections/testkit-chaos/resume", "application/json", b"").unwrap().status,
        401
    );
    let resumed = admin.post("/v1/projections/testkit-chaos/resume", "application/json", b"").unwrap();
    assert_eq!(resumed.body["resumed"], true, "{}", resumed.body);
    paused_with(20);
}

#[test]
fn deep_recursion_and_too_many_emits_are_refused_and_moderate_ones_pass_while_queries_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let config = "limits:\n  deadline-ms: 2000\nplugins:\n  testkit-chaos:\n    limits: { max-emits: 1000 }\n";
    let server = Server::start(dir.path(), &[&plugins().chaos], config);
    let event = |ty: &str, data: Value| json!({"type": ty, "key": "k", "data": data});
    let events = [
        event("Recurse", json!({"depth": 1_000})),
        event("Recurse", json!({"depth": 100_000_000})),
        event("EmitMany", json!({"to": "echoes", "count": 1_000})),
        event("EmitMany", json!({"to": "echoes", "count": 1_001})),
        event("Spin", json!({})),
        event("Ok", json!({})),
    ];
    assert_eq!(server.client().append_ndjson("chaos", &ndjson(&events)).unwrap().status, 200);
    // While the endless loop holds the worker (up to its 2 s deadline), the API answers.
    let mut answered = 0;
    let until = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        assert_eq!(server.client().get("/v1/projections/testkit-chaos").unwrap().status, 200);
        assert_eq!(server.client().get("/v1/projections/testkit-chaos/tables/applied/items").unwrap().status, 200);
        answered += 2;
    }
    assert!(answered > 10, "{answered}");
    server.wait_caught_up();

    let letters = chaos_dead_letters(&server);
    assert_eq!(letters.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [1, 3, 4], "{letters:?}");
    assert!(letters[0].1.starts_with("trap: overflowed its stack"), "deep recursion traps: {letters:?}");
    assert!(letters[1].1.contains("at most 1000 events"), "too many emits are refused: {letters:?}");
    assert!(letters[2].1.contains("deadline of 2000 ms"), "{letters:?}");
    // The moderate recursion, the 1,000 emits and the last event were applied;
    // the refused batch's emits were not published.
    let status = server.get("/v1/projections/testkit-chaos");
    assert_eq!(
        (status["eventsApplied"].as_u64(), status["emitted"]["events"].as_u64()),
        (Some(3), Some(1000)),
        "{status}"
    );
    assert_eq!(server.get("/healthz")["status"], "ok");
}

/// A plugin that sleeps (an hour here) must not hang its worker: WASI's clock
/// pollables used to block inside a host call, where the epoch deadline
/// never fires, so swaps, shutdown and the next start hung with it. The
/// plugin's clock is frozen, so its sleeps end at once.
#[test]
fn a_sleeping_plugin_does_not_hang_its_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[&plugins().chaos], "limits:\n  deadline-ms: 300\n");
    let mut events = vec![json!({"type": "Sleep", "key": "s", "data": {"ms": 3_600_000}})];
    events.extend((0..10).map(|n| json!({"type": "Noop", "key": format!("k{n}"), "data": {"n": n}})));
    let reply = server.client().append_ndjson("chaos", &ndjson(&events)).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let caught_up = server.client().wait_caught_up(std::time::Duration::from_secs(30)).unwrap();
    assert!(caught_up, "the worker hung: {}", server.get("/v1/projections/testkit-chaos"));
    assert_eq!(server.table("testkit-chaos", "applied").len(), 11);
    assert_eq!(server.get("/v1/projections/testkit-chaos")["deadLetters"], 0);
    let started = std::time::Instant::now();
    server.stop();
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "shutdown waited on the sleep");
}

/// A batch may hold at most `max-batch-mb` of writes, documents and emitted
/// events: one event writing or emitting past it traps (a dead letter, even
/// though the plugin would carry on) and every other event is applied, also
/// when moderate events fill several budgets' worth together (the batch is
/// split). Without the budget, one event could grow the host's memory by
/// 100,000 emits × 1 MiB, and after the OOM kill run again.
#[test]
fn a_batch_over_its_byte_budget_traps_and_moderate_ones_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let config = "limits:\n  max-batch-mb: 4\n  deadline-ms: 20000\n";
    let server = Server::start(dir.path(), &[&plugins().chaos], config);
    let flood = |count: u64, emit: bool| {
        let mut data = json!({"count": count, "bytes": 100_000});
        if emit {
            data["to"] = json!("echoes");
        }
        json!({"type": "Flood", "key": "k", "data": data})
    };
    // 4 MiB: ~41 values of 100 kB. 10 moderate events of 2 MB each, and two
    // that alone would hold 6 MB (one writing, one emitting).
    let mut events: Vec<Value> = (0..10).map(|i| flood(20, i % 2 == 1)).collect();
    events.insert(4, flood(60, false));
    events.insert(8, flood(60, true));
    assert_eq!(server.client().append_ndjson("chaos", &ndjson(&events)).unwrap().status, 200);
    server.wait_caught_up();
    let letters = chaos_dead_letters(&server);
    assert_eq!(letters.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [4, 8], "{letters:?}");
    assert!(letters.iter().all(|(_, e)| e.starts_with("trap:") && e.contains("limits.max-batch-mb")), "{letters:?}");
    let status = server.get("/v1/projections/testkit-chaos");
    assert_eq!(status["eventsApplied"], 10, "{status}");
    assert_eq!(status["emitted"]["events"], 5 * 20, "{status}");
    let flooded = server.table("testkit-chaos", "applied").iter().filter(|(k, _)| k.starts_with("flood/")).count();
    assert_eq!(flooded, 5 * 20);
}

/// `testkit-chaos`'s dead letters: the offset and the error of each.
fn chaos_dead_letters(server: &Server) -> Vec<(u64, String)> {
    let letters = server.get("/v1/projections/testkit-chaos/dead-letters");
    letters["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["offset"].as_u64().unwrap(), l["error"].as_str().unwrap().to_owned()))
        .collect()
}

/// A retry asked of a worker that stops before it answers (a rebuild's
/// switch, held open by the test hook) is answered from the generation
/// that goes live: a 409 that says so, never a 503.
#[test]
fn a_retry_during_a_rebuild_switch_is_answered_by_the_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    const ADMIN: &str = "admin-secret-0123456789";
    let config = format!("auth:\n  admin-token: {ADMIN}\n");
    let mut server = Server::start(dir.path(), &[&plugins().chaos], &config);
    server.env.push(("REFRACT_TEST_SWITCH_DELAY_MS".into(), "1500".into()));
    server.kill();
    server.restart();
    let mut events: Vec<Value> = (0..50).map(|i| json!({"type": "Ok", "key": format!("k{i}"), "data": {}})).collect();
    events.push(json!({"type": "Reject", "key": "bad", "data": {}}));
    let admin = refract_client::Client::new(&server.url).with_token(Some(ADMIN));
    assert_eq!(admin.append_ndjson("chaos", &ndjson(&events)).unwrap().status, 200);
    server.wait_caught_up();
    let letters = server.get("/v1/projections/testkit-chaos/dead-letters");
    let id = letters["deadLetters"][0]["id"].as_u64().unwrap();

    assert_eq!(admin.post("/v1/projections/testkit-chaos/rebuild", "application/json", b"").unwrap().status, 202);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !server.log().contains("holding the switch") {
        assert!(std::time::Instant::now() < until, "the switch was never reached");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let reply =
        admin.post(&format!("/v1/projections/testkit-chaos/dead-letters/{id}/retry"), "application/json", b"").unwrap();
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "generation_switched", "{}", reply.body);
}
