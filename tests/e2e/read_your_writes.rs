//! Read-your-writes: an append's `waitFor` token makes the next query wait
//! until the projection (and, for a search, its index) has seen the append.

use serde_json::{Value, json};

use crate::support::{Server, encode, plugins};

#[test]
fn a_query_with_wait_for_sees_the_append_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    // A slow index commit: a search that did not wait would miss new orders.
    let server =
        Server::start(dir.path(), &[&p.order_summary, &p.order_search], "search:\n  commit-interval-ms: 300\n");
    let client = server.client();
    for i in 0..30 {
        let id = format!("o-ryw-{i}");
        let event = json!({"type": "OrderPlaced", "key": id, "data": {"orderId": id, "customerId": "c-1", "total": 10.0 + i as f64,
            "items": [], "description": "red lamp"}});
        let reply = client.post("/v1/streams/orders/events", "application/json", event.to_string().as_bytes()).unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        let token = encode(reply.body["waitFor"].as_str().unwrap());
        let got = client
            .get(&format!("/v1/projections/order-summary/tables/orders/items/{id}?wait_for={token}&timeout_ms=10000"))
            .unwrap();
        assert_eq!(got.status, 200, "append {i} not visible: {}", got.body);
        assert_eq!(got.body["orderId"], id.as_str());
        let page = client
            .get(&format!(
                "/v1/projections/order-summary/tables/customer-orders/items?prefix=c-1/&limit=1000&wait_for={token}"
            ))
            .unwrap();
        assert_eq!(page.body["items"].as_array().unwrap().len(), i + 1);
        let hits = client
            .get(&format!(
                "/v1/projections/order-search/indexes/orders/search?filter=orderId:{id}&wait_for={token}&timeout_ms=10000"
            ))
            .unwrap();
        assert_eq!((hits.status, hits.body["total"].as_u64()), (200, Some(1)), "{}", hits.body);
    }
}

#[test]
fn waiting_too_long_is_a_504_naming_the_lag_and_bad_tokens_are_400s() {
    let dir = tempfile::tempdir().unwrap();
    // `Spin` holds the worker until the call deadline.
    let server = Server::start(dir.path(), &[&plugins().chaos], "limits:\n  deadline-ms: 3000\n");
    let client = server.client();
    let events: Vec<Value> = vec![json!({"type": "Spin", "data": {}}), json!({"type": "Ok", "data": {"n": 1}})];
    let reply =
        client.post("/v1/streams/chaos/events", "application/json", &serde_json::to_vec(&events).unwrap()).unwrap();
    let token = reply.body["waitFor"].as_str().unwrap().to_owned();
    let path = format!("/v1/projections/testkit-chaos/tables/applied/items?wait_for={}&timeout_ms=300", encode(&token));
    let late = client.get(&path).unwrap();
    assert_eq!((late.status, late.body["error"]["code"].as_str()), (504, Some("wait_timeout")), "{}", late.body);
    let message = late.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("after 300 ms") && message.contains("checkpoint 0"), "{message}");

    for (query, expected) in [
        ("wait_for=chaos", "is not <stream>:<partition>:<offset>"),
        ("wait_for=orders:0:1", "does not read"),
        ("wait_for=chaos:0:1&timeout_ms=600000", "timeout_ms may be at most"),
        ("wait_for=chaos:0:999", "which the log has not written"),
    ] {
        let bad = client.get(&format!("/v1/projections/testkit-chaos/tables/applied/items?{query}")).unwrap();
        assert_eq!(bad.status, 400, "{query}: {}", bad.body);
        assert!(bad.body["error"]["message"].as_str().unwrap().contains(expected), "{query}: {}", bad.body);
    }
    // Once the deadline breaks the spin (a dead letter), the wait succeeds.
    let path =
        format!("/v1/projections/testkit-chaos/tables/applied/items?wait_for={}&timeout_ms=20000", encode(&token));
    let reply = client.get(&path).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["items"].as_array().unwrap().len(), 1);
}
