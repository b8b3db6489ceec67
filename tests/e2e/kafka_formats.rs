//! What arrives on Kafka topics: Debezium change events (with tombstones),
//! CloudEvents in structured and binary mode, and records that decode as
//! neither, which become dead letters naming topic, partition and offset.

use serde_json::{Value, json};

use crate::support::kafka::{Broker, Out};
use crate::support::{Server, plugins, reference};

/// A Debezium change event of the MySQL connector's tutorial `orders` table,
/// as the JSON converter writes it with schemas enabled.
fn change(op: &str, id: i64, before: Value, after: Value) -> Out {
    let source = json!({"connector": "mysql", "name": "dbserver1", "db": "inventory", "table": "orders",
                        "ts_ms": 1_714_564_800_000i64 + id, "file": "mysql-bin.000003", "pos": 154});
    let value = json!({"schema": {"type": "struct", "name": "dbserver1.inventory.orders.Envelope"},
                       "payload": {"op": op, "before": before, "after": after, "source": source,
                                   "ts_ms": 1_714_564_801_000i64 + id}});
    let key = json!({"schema": {"type": "struct"}, "payload": {"id": id}});
    Out { key: Some(key.to_string()), value: Some(value.to_string().into_bytes()), ..Out::default() }
}

fn row(id: i64, quantity: i64) -> Value {
    json!({"id": id, "order_date": 16816, "purchaser": 1001, "quantity": quantity, "product_id": 102})
}

fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// A fixture order event as a CloudEvent: even ones structured, odd ones binary.
fn cloud_event(i: usize, e: &Value) -> Out {
    let key = e["key"].as_str().map(str::to_owned);
    let (ty, time, id) = (e["type"].as_str().unwrap(), rfc3339(e["time"].as_i64().unwrap()), format!("evt-{i}"));
    if i.is_multiple_of(2) {
        let event = json!({"specversion": "1.0", "id": id, "source": "/shop/orders", "type": ty,
                           "time": time, "datacontenttype": "application/json", "data": e["data"]});
        Out {
            key,
            value: Some(event.to_string().into_bytes()),
            headers: vec![("content-type".into(), "application/cloudevents+json".into())],
            ..Out::default()
        }
    } else {
        let headers = [("ce_specversion", "1.0"), ("ce_id", &id), ("ce_source", "/shop/orders"), ("ce_type", ty)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .chain([("ce_time".to_owned(), time), ("content-type".to_owned(), "application/json".to_owned())])
            .collect();
        Out { key, value: Some(e["data"].to_string().into_bytes()), headers, ..Out::default() }
    }
}

#[test]
fn debezium_and_cloud_events_decode_and_garbage_becomes_dead_letters() {
    let broker = Broker::start();
    broker.create_topic("dbserver1.inventory.orders", 1);
    broker.create_topic("shop.cloudevents", 2);

    let cdc = vec![
        change("r", 10001, Value::Null, row(10001, 1)),
        change("r", 10002, Value::Null, row(10002, 2)),
        change("c", 10003, Value::Null, row(10003, 1)),
        change("u", 10001, row(10001, 1), row(10001, 4)),
        change("d", 10002, row(10002, 2), Value::Null),
        // The tombstone Debezium writes after a delete, for log compaction.
        Out { key: Some(json!({"id": 10002}).to_string()), value: None, ..Out::default() },
        Out { key: Some("x".into()), value: Some(b"not json at all".to_vec()), ..Out::default() },
        change("x", 10005, Value::Null, row(10005, 1)),
        change("c", 10004, Value::Null, row(10004, 9)),
    ];
    let orders = refract_client::fixtures::orders(600, 77, 0.0);
    let mut events: Vec<Out> = orders.iter().enumerate().map(|(i, e)| cloud_event(i, e)).collect();
    // Not a CloudEvent: the required `id` attribute is missing.
    let headers = [("ce_specversion", "1.0"), ("ce_source", "/shop"), ("ce_type", "OrderShipped")];
    events.push(Out {
        key: Some("o-1".into()),
        value: Some(b"{}".to_vec()),
        headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Out::default()
    });
    let producer = broker.producer();
    producer.send_all("dbserver1.inventory.orders", &cdc);
    producer.send_all("shop.cloudevents", &events);

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "kafka:\n  brokers: {}\n  streams:\n    orders-cdc: {{ topic: dbserver1.inventory.orders, format: debezium }}\n    orders: {{ topic: shop.cloudevents, format: cloudevents }}\n",
        broker.address()
    );
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.orders_cdc, &p.order_summary], &config);

    // Debezium: rows follow c/u/d/r, the tombstone is skipped, garbage is dead-lettered.
    let status = server.wait_checkpoints("orders-cdc", cdc.len() as u64);
    let table = server.table("orders-cdc", "orders");
    let ids: Vec<&str> = table.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(ids, ["10001", "10003", "10004"]);
    assert_eq!(table[0].1["quantity"], 4, "the update won");
    assert_eq!(table[0].1["lastChange"], 1_714_564_801_000i64 + 10001);
    assert_eq!(status["eventsApplied"], 6, "r, r, c, u, d, c: {status}");
    assert_eq!(status["deadLetters"], 2, "{status}");
    let letters = server.get("/v1/projections/orders-cdc/dead-letters");
    let letters = letters["deadLetters"].as_array().unwrap();
    assert_eq!(
        (letters[0]["topic"].as_str(), letters[0]["partition"].as_u64()),
        (Some("dbserver1.inventory.orders"), Some(0))
    );
    assert_eq!(letters[0]["offset"], 6);
    assert_eq!(letters[0]["data"], "not json at all");
    assert!(letters[0]["error"].as_str().unwrap().contains("not JSON"), "{}", letters[0]);
    assert_eq!(letters[1]["offset"], 7);
    assert!(letters[1]["error"].as_str().unwrap().contains("unknown Debezium op \"x\""), "{}", letters[1]);

    // CloudEvents, both modes: the same read model as the fixture's own fold.
    server.wait_checkpoints("order-summary", events.len() as u64);
    let expected = reference::orders(&orders);
    let got = server.table("order-summary", "orders");
    assert!(
        got == expected.orders.into_iter().collect::<Vec<_>>(),
        "orders from CloudEvents differ from the reference"
    );
    let letters = server.get("/v1/projections/order-summary/dead-letters");
    let letters = letters["deadLetters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["topic"], "shop.cloudevents");
    assert!(letters[0]["error"].as_str().unwrap().contains("\"id\" attribute is missing"), "{}", letters[0]);
}
