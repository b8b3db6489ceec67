//! Enrichers: a windowed join, an upcaster and a lookup, run by the real
//! binary between source streams and projections.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use refract_client::fixtures::Rng;
use serde_json::{Value, json};

use crate::support::{Server, ndjson, plugins};

const WINDOW: i64 = 300_000;
const GRACE: i64 = 1_800_000;
const T0: i64 = 1_700_000_000_000;
const ADMIN: &str = "enricher-test-admin-token";

/// A client with the admin token (rebuilds need it; so do appends once it is set).
fn admin(server: &Server) -> refract_client::Client {
    server.client().with_token(Some(ADMIN))
}

fn join_config(extra: &str) -> String {
    format!(
        "plugins:
  orders-payments-join:
    settings: {{ window-ms: {WINDOW}, grace-ms: {GRACE} }}
    routes:
      - {{ types: [OrderReadyForShipment], to: [shipping, notifications] }}
      - {{ types: [OrderUnpaid], to: [notifications] }}
auth:
  admin-token: {ADMIN}
{extra}"
    )
}

/// Orders (stream `orders`) and payments (stream `payments`), in event-time
/// order, with every case of the join: paid in one or two payments, paid
/// before the order, partly paid, paid late, never paid, payments and
/// orders delivered twice, and one order whose data does not decode.
fn interleaving(orders: usize, seed: u64) -> Vec<(&'static str, Value)> {
    let mut rng = Rng::new(seed);
    let mut events: Vec<(i64, usize, &'static str, Value)> = Vec::new();
    let mut push = |time: i64, stream: &'static str, ty: &str, key: &str, data: Value| {
        let n = events.len();
        events.push((time, n, stream, json!({"type": ty, "key": key, "time": time, "data": data})));
    };
    for i in 0..orders {
        let id = format!("o-{i:05}");
        let t = T0 + i as i64 * 20_000;
        let cents = rng.range(500, 50_000) as i64;
        let total = cents as f64 / 100.0;
        let order = json!({"orderId": id, "customerId": format!("c-{}", i % 37), "total": total});
        if i == orders / 2 {
            push(t, "orders", "OrderPlaced", &id, json!({"orderId": id, "total": "not a number"}));
            continue;
        }
        push(t, "orders", "OrderPlaced", &id, order.clone());
        let pay = |k: u32, amount_cents: i64| json!({"orderId": id, "paymentId": format!("p-{i}-{k}"), "amount": amount_cents as f64 / 100.0});
        let within = |rng: &mut Rng| rng.range(0, WINDOW as u64) as i64;
        match rng.unit() {
            u if u < 0.35 => push(t + within(&mut rng), "payments", "PaymentReceived", &id, pay(0, cents)),
            u if u < 0.50 => {
                let first = t + within(&mut rng) / 2;
                push(first, "payments", "PaymentReceived", &id, pay(0, cents / 2));
                push(first + within(&mut rng) / 2, "payments", "PaymentReceived", &id, pay(1, cents - cents / 2));
            }
            u if u < 0.60 => push(t + within(&mut rng), "payments", "PaymentReceived", &id, pay(0, cents / 2)),
            u if u < 0.70 => {
                let late = t + WINDOW + 1_000 + rng.range(0, 3 * WINDOW as u64) as i64;
                push(late, "payments", "PaymentReceived", &id, pay(0, cents));
            }
            u if u < 0.80 => push(t - within(&mut rng), "payments", "PaymentReceived", &id, pay(0, cents)),
            u if u < 0.88 => {}
            u if u < 0.94 => {
                let at = t + within(&mut rng) / 2;
                push(at, "payments", "PaymentReceived", &id, pay(0, cents));
                push(at + 1_000, "payments", "PaymentReceived", &id, pay(0, cents));
            }
            _ => {
                push(t + 500, "orders", "OrderPlaced", &id, order);
                push(t + within(&mut rng), "payments", "PaymentReceived", &id, pay(0, cents));
            }
        }
    }
    events.sort_by_key(|(time, n, _, _)| (*time, *n));
    events.into_iter().map(|(_, _, stream, e)| (stream, e)).collect()
}

/// The join's outputs for `events`, computed directly: (type, time, data) per
/// order. `now` is the stream time once every event has been read.
fn expected_join(events: &[(&str, Value)], now: i64) -> BTreeMap<String, (String, i64, Value)> {
    let mut placed: Vec<&Value> = Vec::new();
    let mut seen = HashSet::new();
    let mut payments: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for (_, e) in events {
        let d = &e["data"];
        match e["type"].as_str().unwrap() {
            "OrderPlaced" if d["total"].is_f64() && seen.insert(d["orderId"].as_str().unwrap()) => placed.push(e),
            "PaymentReceived" => payments.entry(d["orderId"].as_str().unwrap()).or_default().push(e),
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    for order in placed {
        let (d, t) = (&order["data"], order["time"].as_i64().unwrap());
        let id = d["orderId"].as_str().unwrap();
        let total = (d["total"].as_f64().unwrap() * 100.0).round() as i64;
        let (mut paid, mut ids, mut ready_at) = (0i64, Vec::<String>::new(), None);
        for p in payments.get(id).into_iter().flatten() {
            let (pt, pid) = (p["time"].as_i64().unwrap(), p["data"]["paymentId"].as_str().unwrap());
            if (pt - t).abs() > WINDOW || ids.iter().any(|i| i == pid) {
                continue;
            }
            ids.push(pid.to_owned());
            paid += (p["data"]["amount"].as_f64().unwrap() * 100.0).round() as i64;
            if paid >= total {
                ready_at = Some(pt.max(t));
                break;
            }
        }
        let (ty, time) = match ready_at {
            Some(at) => ("OrderReadyForShipment", at),
            None if t + WINDOW + GRACE < now => ("OrderUnpaid", t + WINDOW),
            None => continue,
        };
        let data = json!({"orderId": id, "customerId": d["customerId"], "total": total as f64 / 100.0,
                          "paid": paid as f64 / 100.0, "payments": ids, "placedAt": t});
        out.insert(id.to_owned(), (ty.to_owned(), time, data));
    }
    out
}

/// A stream's events as (orderId → (type, time, data)), asserting each order appears once.
fn outputs(server: &Server, stream: &str) -> BTreeMap<String, (String, i64, Value)> {
    let mut out = BTreeMap::new();
    for e in server.stream(stream) {
        let id = e["data"]["orderId"].as_str().unwrap().to_owned();
        let entry = (e["type"].as_str().unwrap().to_owned(), e["time"].as_i64().unwrap(), e["data"].clone());
        assert!(out.insert(id.clone(), entry).is_none(), "order {id} was emitted to {stream} twice");
    }
    out
}

fn append_interleaved(server: &Server, events: &[(&str, Value)], chunk: usize) {
    let client = admin(server);
    for part in events.chunks(chunk) {
        for stream in ["orders", "payments"] {
            let lines: Vec<Value> = part.iter().filter(|(s, _)| *s == stream).map(|(_, e)| e.clone()).collect();
            if !lines.is_empty() {
                let reply = client.append_ndjson(stream, &ndjson(&lines)).unwrap();
                assert_eq!(reply.status, 200, "{}", reply.body);
            }
        }
    }
}

/// Wait until the enricher has read `records` and published every output,
/// and `shipments` has read everything published to `shipping`.
fn wait_join(server: &Server, records: u64) {
    server.wait_checkpoints("orders-payments-join", records);
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let status = server.get("/v1/projections/orders-payments-join");
        if status["emitted"]["lag"] == 0 && server.get("/v1/projections/shipments")["lag"] == 0 {
            return;
        }
        assert!(Instant::now() < until, "outputs not published: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Append the interleaving, then one far-future payment that closes every window.
fn run_join(server: &Server, events: &[(&str, Value)]) -> i64 {
    append_interleaved(server, events, 40);
    wait_join(server, events.len() as u64);
    let now = events.iter().map(|(_, e)| e["time"].as_i64().unwrap()).max().unwrap() + WINDOW + GRACE + 1;
    let flush = json!({"type": "PaymentReceived", "key": "none", "time": now,
                       "data": {"orderId": "none", "paymentId": "flush", "amount": 1}});
    assert_eq!(admin(server).append_ndjson("payments", &ndjson(&[flush])).unwrap().status, 200);
    wait_join(server, events.len() as u64 + 1);
    now
}

fn assert_outputs_are(server: &Server, expected: &BTreeMap<String, (String, i64, Value)>) {
    let ready: BTreeMap<_, _> = expected.iter().filter(|(_, (ty, _, _))| ty == "OrderReadyForShipment").collect();
    let shipping = outputs(server, "shipping");
    let notifications = outputs(server, "notifications");
    assert_eq!(notifications.len(), expected.len(), "every order gets exactly one outcome");
    for (id, want) in expected {
        assert_eq!(notifications.get(id), Some(want), "notifications: order {id}");
    }
    assert_eq!(shipping.len(), ready.len());
    for (id, want) in &ready {
        assert_eq!(shipping.get(*id), Some(*want), "shipping: order {id}");
    }
    let table = server.table("shipments", "ready");
    assert_eq!(table.len(), ready.len());
    for (id, value) in &table {
        assert_eq!(&ready[id].2, value, "shipments table: order {id}");
    }
}

#[test]
fn the_join_emits_exactly_the_reference_outputs_and_survives_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.orders_payments_join, &p.shipments], &join_config(""));
    let events = interleaving(1_500, 7);
    let now = run_join(&server, &events);
    let expected = expected_join(&events, now);
    let cases = |ty: &str| expected.values().filter(|(t, _, _)| t == ty).count();
    assert!(cases("OrderReadyForShipment") > 700 && cases("OrderUnpaid") > 400, "both outcomes occur");
    assert_outputs_are(&server, &expected);
    let status = server.get("/v1/projections/orders-payments-join");
    assert_eq!(status["plugin"]["kind"], "enricher");
    assert_eq!(status["plugin"]["outputs"], json!(["notifications", "shipping"]));
    let enrichers = server.get("/v1/projections?kind=enricher");
    let names: Vec<&str> =
        enrichers["projections"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["orders-payments-join"]);
    assert_eq!(server.client().get("/v1/projections?kind=widget").unwrap().status, 400);
    assert_eq!(status["deadLetters"], 1, "the order whose data does not decode: {status}");
    assert_eq!(status["emitted"]["events"], (expected.len() + cases("OrderReadyForShipment")) as u64);
    assert_eq!(server.get("/v1/projections/shipments")["deadLetters"], 0, "no order ready twice");

    // Rebuilding the enricher recomputes its state from the beginning
    // without emitting again; afterwards it carries on from the same state.
    let client = admin(&server);
    assert_eq!(
        client.post("/v1/projections/orders-payments-join/rebuild", "application/json", b"").unwrap().status,
        202
    );
    let until = Instant::now() + Duration::from_secs(120);
    while server.get("/v1/projections/orders-payments-join")["generation"] != 1
        || !server.get("/v1/projections/orders-payments-join")["rebuild"].is_null()
    {
        assert!(Instant::now() < until, "the rebuild did not switch");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_outputs_are(&server, &expected);
    let later = [
        (
            "orders",
            json!({"type": "OrderPlaced", "key": "o-late", "time": now + 1_000,
                          "data": {"orderId": "o-late", "customerId": "c-1", "total": 3.5}}),
        ),
        (
            "payments",
            json!({"type": "PaymentReceived", "key": "o-late", "time": now + 2_000,
                            "data": {"orderId": "o-late", "paymentId": "p-late", "amount": 3.5}}),
        ),
    ];
    append_interleaved(&server, &later, 10);
    let until = Instant::now() + Duration::from_secs(60);
    while !server.table("shipments", "ready").iter().any(|(k, _)| k == "o-late") {
        assert!(
            Instant::now() < until,
            "the rebuilt join did not join a new order: {}\n{}",
            server.get("/v1/projections/orders-payments-join"),
            server.get("/v1/projections/shipments")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(outputs(&server, "shipping").len(), cases("OrderReadyForShipment") + 1);

    // Rebuilding the projection over the join's output replays that stream.
    assert_eq!(client.post("/v1/projections/shipments/rebuild", "application/json", b"").unwrap().status, 202);
    let until = Instant::now() + Duration::from_secs(120);
    while server.get("/v1/projections/shipments")["generation"] != 1 {
        assert!(Instant::now() < until, "the shipments rebuild did not switch");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.table("shipments", "ready").len(), cases("OrderReadyForShipment") + 1);
}

#[test]
fn sigkill_during_enrichment_loses_and_duplicates_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    // Small batches: many commits, so kills land between and inside them.
    let config = join_config("batch:\n  max-events: 20\n  call-events: 20\n  max-duration-ms: 1\n");
    let mut server = Server::start(dir.path(), &[&p.orders_payments_join, &p.shipments], &config);
    let events = interleaving(6_000, 11);
    // Chunks of 40 span ~400 s of event time, well inside the grace: each
    // chunk's orders are appended before its payments, so a chunk spanning
    // more than the grace (200 events: ~2,000 s) would make its payments
    // late whenever the enricher reads the orders first — late by the
    // producer's doing, not lost by a kill.
    append_interleaved(&server, &events, 40);
    let mut rng = Rng::new(5);
    let mut kills = 0;
    let mut kills_with_work_left = 0;
    loop {
        std::thread::sleep(Duration::from_millis(rng.range(30, 400)));
        let status = server.get("/v1/projections/orders-payments-join");
        let work_left = status["lag"].as_u64().unwrap() > 0 || status["emitted"]["lag"].as_u64().unwrap() > 0;
        if !work_left && kills >= 5 {
            break;
        }
        server.kill();
        kills += 1;
        kills_with_work_left += usize::from(work_left);
        server.restart();
    }
    eprintln!("{kills} kills, {kills_with_work_left} with enrichment or publishing under way");
    assert!(kills_with_work_left >= 3, "too few kills landed while the enricher worked");
    let now = events.iter().map(|(_, e)| e["time"].as_i64().unwrap()).max().unwrap() + WINDOW + GRACE + 1;
    let flush = json!({"type": "PaymentReceived", "key": "none", "time": now,
                       "data": {"orderId": "none", "paymentId": "flush", "amount": 1}});
    assert_eq!(admin(&server).append_ndjson("payments", &ndjson(&[flush])).unwrap().status, 200);
    wait_join(&server, events.len() as u64 + 1);
    assert_outputs_are(&server, &expected_join(&events, now));
}

/// `OrderPlaced` as version 1 producers wrote it; every other event is left as it is.
fn as_v1(event: &Value, with_header: bool) -> Value {
    let d = &event["data"];
    let lines: Vec<Value> = d["items"]
        .as_array()
        .map(|items| {
            items.iter().map(|i| json!({"sku": i["sku"], "quantity": i["qty"], "unit_price": i["price"]})).collect()
        })
        .unwrap_or_default();
    let mut v1 = json!({"type": "OrderPlaced", "key": event["key"], "time": event["time"],
                        "data": {"order_id": d["orderId"], "customer": d["customerId"], "amount": d["total"],
                                 "lines": lines, "note": d["description"]}});
    if with_header {
        v1["headers"] = json!({"schema-version": "1"});
    }
    v1
}

#[test]
fn a_projection_fed_v1_and_v2_through_the_upcaster_builds_the_v2_read_model() {
    let p = plugins();
    let events = refract_client::fixtures::orders(3_000, 31, 0.0);
    let mut placed = 0;
    let mixed: Vec<Value> = events
        .iter()
        .map(|e| {
            if e["type"] != "OrderPlaced" {
                return e.clone();
            }
            placed += 1;
            match placed % 3 {
                0 => as_v1(e, true),
                1 => as_v1(e, false),
                _ => e.clone(),
            }
        })
        .collect();
    assert!(mixed.iter().filter(|e| e["data"]["order_id"].is_string()).count() > 300);

    let upcast_dir = tempfile::tempdir().unwrap();
    let routes = "plugins:\n  order-upcaster:\n    routes:\n      - { to: [orders] }\n";
    let upcast = Server::start(upcast_dir.path(), &[&p.order_upcaster, &p.order_summary], routes);
    for chunk in mixed.chunks(500) {
        assert_eq!(upcast.client().append_ndjson("orders-raw", &ndjson(chunk)).unwrap().status, 200);
    }
    let v2_dir = tempfile::tempdir().unwrap();
    let v2 = Server::start(v2_dir.path(), &[&p.order_summary], "");
    for chunk in events.chunks(500) {
        assert_eq!(v2.client().append_ndjson("orders", &ndjson(chunk)).unwrap().status, 200);
    }
    upcast.wait_checkpoints("order-upcaster", events.len() as u64);
    upcast.wait_checkpoints("order-summary", events.len() as u64);
    v2.wait_checkpoints("order-summary", events.len() as u64);

    upcast.assert_order_summary_is_the_fold_of(&events);
    for table in ["orders", "customer-orders"] {
        assert!(upcast.table("order-summary", table) == v2.table("order-summary", table), "{table} differs");
    }
    let status = upcast.get("/v1/projections/order-upcaster");
    assert_eq!((status["eventsApplied"].as_u64(), status["deadLetters"].as_u64()), (Some(3_000), Some(0)));
}

#[test]
fn a_lookup_enricher_adds_reference_data_and_waits_for_it_to_exist() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    // Without the customers projection, lookups fail transiently: retried, not dead-lettered.
    let mut server = Server::start(dir.path(), &[&p.order_customer_names], "batch:\n  max-backoff-ms: 500\n");
    let client = server.client();
    let order = |i: u32, customer: &str| {
        json!({"type": "OrderPlaced", "key": format!("o-{i}"), "time": T0 + i as i64,
               "data": {"orderId": format!("o-{i}"), "customerId": customer, "total": 10}})
    };
    assert_eq!(client.append_ndjson("orders", &ndjson(&[order(1, "c-1")])).unwrap().status, 200);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let status = server.get("/v1/projections/order-customer-names");
        if status["retries"].as_u64().unwrap() >= 2 {
            assert!(status["lastError"].as_str().unwrap().contains("no projection \"customers\""), "{status}");
            assert_eq!(status["deadLetters"], 0);
            break;
        }
        assert!(Instant::now() < until, "lookups were not retried: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let customers = [
        json!({"type": "CustomerRegistered", "key": "c-1", "data": {"customerId": "c-1", "name": "Ada", "email": "ada@example.com"}}),
        json!({"type": "CustomerRegistered", "key": "c-2", "data": {"customerId": "c-2", "name": "Grace", "email": "grace@example.com"}}),
    ];
    assert_eq!(client.append_ndjson("customers", &ndjson(&customers)).unwrap().status, 200);
    std::fs::copy(&p.customers, dir.path().join("plugins").join("customers.wasm")).unwrap();
    server.wait_checkpoints("order-customer-names", 1);
    server.wait_checkpoints("customers", 2);

    let orders = [order(2, "c-2"), order(3, "c-404")];
    assert_eq!(client.append_ndjson("orders", &ndjson(&orders)).unwrap().status, 200);
    server.wait_checkpoints("order-customer-names", 3);
    let until = Instant::now() + Duration::from_secs(30);
    while server.get("/v1/projections/order-customer-names")["emitted"]["lag"] != 0 {
        assert!(Instant::now() < until, "outputs not published");
        std::thread::sleep(Duration::from_millis(50));
    }
    let names: BTreeMap<String, Value> = server
        .stream("order-customer-names")
        .into_iter()
        .map(|e| (e["data"]["orderId"].as_str().unwrap().to_owned(), e["data"]["customerName"].clone()))
        .collect();
    // o-1 waited for the customers projection, which had already read c-1 when it was retried,
    // or not yet: either way it was enriched once, not dropped.
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names["o-1"] == "Ada" || names["o-1"].is_null(), "{names:?}");
    assert_eq!(names["o-2"], "Grace");
    assert_eq!(names["o-3"], Value::Null);
    server.stop();
}

/// Event-time alignment must count every partition that still has events to
/// read, also one whose share of a read held only events the enricher does
/// not subscribe to. Here the payment for o-1 sits behind 1,000 audit
/// events in its partition, while later orders run far ahead in event time:
/// the join must still see the payment inside o-1's window. It used to
/// bound event time only by partitions that had delivered subscribed
/// events, so o-1's window closed first and it was reported unpaid.
#[test]
fn alignment_waits_for_a_partition_whose_reads_held_only_unsubscribed_events() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let extra = "streams:\n  partitions: { orders: 1, payments: 1 }\nbatch:\n  max-events: 40\n  call-events: 10\n";
    let server = Server::start(dir.path(), &[&p.orders_payments_join], &join_config(extra));
    let order = |i: i64, t: i64| {
        json!({"type": "OrderPlaced", "key": format!("o-{i}"), "time": t,
               "data": {"orderId": format!("o-{i}"), "customerId": "c", "total": 10.0}})
    };
    let mut orders = vec![order(1, T0 + 1_000)];
    orders.extend((2..200).map(|i| order(i, T0 + 1_000 + WINDOW + GRACE + i * 1_000)));
    let mut payments: Vec<Value> =
        (0..1_000).map(|i| json!({"type": "PaymentAudited", "key": "o-1", "time": T0 + i, "data": {"n": i}})).collect();
    payments.push(json!({"type": "PaymentReceived", "key": "o-1", "time": T0 + 2_000,
                         "data": {"orderId": "o-1", "paymentId": "p-1", "amount": 10.0}}));
    let client = admin(&server);
    assert_eq!(client.append_ndjson("payments", &ndjson(&payments)).unwrap().status, 200);
    assert_eq!(client.append_ndjson("orders", &ndjson(&orders)).unwrap().status, 200);
    server.wait_checkpoints("orders-payments-join", 1_001 + 199);
    let until = Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        if let Some(e) = server.stream("notifications").into_iter().find(|e| e["data"]["orderId"] == "o-1") {
            break e["type"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < until, "no outcome for o-1");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(outcome, "OrderReadyForShipment", "o-1 was paid inside its window");
}
