//! A user appends events over HTTP and queries the read models over HTTP.

use serde_json::{Value, json};

use crate::support::{Server, encode, ndjson, plugins, reference};

#[test]
fn appended_events_become_queryable_read_models_equal_to_the_reference_fold() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server =
        Server::start(dir.path(), &[&p.order_summary, &p.account_balance], "streams:\n  partitions: { accounts: 1 }\n");
    let client = server.client();

    let orders = refract_client::fixtures::orders(5000, 11, 0.01);
    let accounts = refract_client::fixtures::accounts(3000, 12, 0.02);
    // The three accepted body shapes: NDJSON, a JSON array, and one event.
    for chunk in orders.chunks(1000) {
        let reply = client.append_ndjson("orders", &ndjson(chunk)).unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body["positions"].as_array().unwrap().len(), chunk.len());
    }
    let (first, rest) = accounts.split_first().unwrap();
    let reply = client.post("/v1/streams/accounts/events", "application/json", first.to_string().as_bytes()).unwrap();
    assert_eq!(reply.body["positions"], json!([{"partition": 0, "offset": 0}]));
    let array = serde_json::to_vec(rest).unwrap();
    let reply = client.post("/v1/streams/accounts/events", "application/json", &array).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["positions"].as_array().unwrap().last().unwrap()["offset"], 2999);

    server.wait_caught_up();

    let expected = reference::orders(&orders);
    let got: Vec<(String, Value)> = server.table("order-summary", "orders");
    let want: Vec<(String, Value)> = expected.orders.clone().into_iter().collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "orders table differs from the reference fold");
    let got = server.table("order-summary", "customer-orders");
    let want: Vec<(String, Value)> = expected.customer_orders.clone().into_iter().collect();
    assert!(got == want, "customer-orders table differs from the reference fold");

    let (balances, rejected_accounts) = reference::balances(&accounts);
    let got = server.table("account-balance", "balances");
    assert!(got == balances.into_iter().collect::<Vec<_>>(), "balances differ from the reference fold");

    // Status: counters, checkpoints at the heads, no lag.
    let status = server.get("/v1/projections/order-summary");
    assert_eq!(status["deadLetters"], expected.rejected);
    assert_eq!(status["eventsApplied"], orders.len() - expected.rejected);
    assert_eq!(status["lag"], 0);
    assert_eq!(status["plugin"]["version"], "0.1.0");
    let checkpoints: u64 =
        status["partitions"].as_array().unwrap().iter().map(|p| p["checkpoint"].as_u64().unwrap()).sum();
    assert_eq!(checkpoints, orders.len() as u64);
    let status = server.get("/v1/projections/account-balance");
    assert_eq!(status["deadLetters"], rejected_accounts);

    // One key, with a `/` in it; a customer's orders by prefix, page by page.
    let (key, value) = expected.customer_orders.iter().next().unwrap();
    assert_eq!(&server.get(&format!("/v1/projections/order-summary/tables/customer-orders/items/{key}")), value);
    let customer = key.split('/').next().unwrap();
    let prefix = format!("{customer}/");
    let want: Vec<&String> = expected.customer_orders.keys().filter(|k| k.starts_with(&prefix)).collect();
    let page = server
        .get(&format!("/v1/projections/order-summary/tables/customer-orders/items?prefix={}&limit=2", encode(&prefix)));
    let keys: Vec<&str> = page["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
    assert_eq!(keys, want.iter().take(2).map(|k| k.as_str()).collect::<Vec<_>>());
    assert_eq!(page["next"].as_str(), if want.len() > 2 { Some(keys[1]) } else { None });

    // The log reads back what was appended.
    let events = server.get("/v1/streams/accounts/events?partition=0&from=10&limit=5");
    assert_eq!(events["events"][0]["offset"], 10);
    assert_eq!(events["events"][0]["data"], accounts[10]["data"]);
    assert_eq!(events["next"], 15);

    // Errors are JSON with stable codes.
    let missing = client.get("/v1/projections/order-summary/tables/orders/items/no-such-order").unwrap();
    assert_eq!((missing.status, missing.body["error"]["code"].as_str()), (404, Some("key_not_found")));
    let missing = client.get("/v1/projections/nope").unwrap();
    assert_eq!((missing.status, missing.body["error"]["code"].as_str()), (404, Some("projection_not_found")));
    let bad = client.get("/v1/projections/order-summary/tables/orders/items?limit=0").unwrap();
    assert_eq!((bad.status, bad.body["error"]["code"].as_str()), (400, Some("bad_request")));
}

#[test]
fn refract_produce_appends_an_ndjson_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.order_summary], "");
    let orders = refract_client::fixtures::orders(1200, 3, 0.0);
    let file = dir.path().join("orders.ndjson");
    std::fs::write(&file, ndjson(&orders)).unwrap();
    let produce = |file: &std::path::Path, extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_refract"))
            .args(["produce", "orders"])
            .arg(file)
            .args(["--url", &server.url])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = produce(&file, &["--batch", "500"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("appended 1200 events to stream orders"));
    server.wait_caught_up();
    assert_eq!(server.table("order-summary", "orders").len(), reference::orders(&orders).orders.len());

    // A line that is not JSON: a clear error naming the line, and nothing of its batch is sent.
    std::fs::write(&file, "{\"type\":\"OrderShipped\",\"data\":{}}\nnot json\n").unwrap();
    let out = produce(&file, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2 is not JSON"), "{stderr}");
    let streams = server.get("/v1/streams");
    let heads: u64 = streams["streams"][0]["heads"].as_array().unwrap().iter().map(|h| h.as_u64().unwrap()).sum();
    assert_eq!(heads, 1200);
}
