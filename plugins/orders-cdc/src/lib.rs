//! `orders-cdc`: a table of the `orders` rows of a database, kept from
//! Debezium change events.
//!
//! Reads the `orders-cdc` stream (a Kafka topic such as
//! `dbserver1.inventory.orders`, decoded with `format: debezium`), whose
//! events are `orders.created`, `orders.updated`, `orders.snapshot`,
//! `orders.deleted` and `orders.truncated`, and maintains:
//! - `orders`: primary key → the row as it is now, plus `lastChange` (the
//!   `ts_ms` of the change that wrote it).
//!
//! Every change event carries the whole row, so each one is applied by
//! overwriting (or deleting) the row: applying a change is idempotent, and
//! the table does not depend on having seen earlier changes.

use refract_sdk::{Event, Failure, Manifest, Projection, Table};
use serde::Deserialize;
use serde_json::{Map, Value};

pub const ORDERS: Table<Value> = Table::new("orders");

/// The event types this projection reads.
pub const EVENT_TYPES: [&str; 5] =
    ["orders.created", "orders.updated", "orders.snapshot", "orders.deleted", "orders.truncated"];

/// The part of a Debezium envelope this projection uses.
#[derive(Deserialize)]
struct Change {
    op: String,
    before: Option<Map<String, Value>>,
    after: Option<Map<String, Value>>,
    ts_ms: Option<i64>,
}

pub struct OrdersCdc;

impl Projection for OrdersCdc {
    fn manifest() -> Manifest {
        Manifest::new("orders-cdc", env!("CARGO_PKG_VERSION")).subscribe("orders-cdc", &EVENT_TYPES).table(&ORDERS)
    }

    fn apply(event: &Event) -> Result<(), Failure> {
        let change: Change = event.json()?;
        if change.op == "t" {
            return truncate();
        }
        let key = event.key.as_deref().ok_or_else(|| Failure::rejected("a change event without a key"))?;
        match (change.op.as_str(), change.after, change.before) {
            ("c" | "u" | "r", Some(mut row), _) => {
                row.insert("lastChange".into(), change.ts_ms.unwrap_or(event.time).into());
                ORDERS.put(key, &Value::Object(row))
            }
            ("d", _, _) => ORDERS.delete(key),
            (op, _, _) => Err(Failure::rejected(format!("op {op:?} without the row it needs"))),
        }
    }
}

/// `TRUNCATE orders`: every row goes.
fn truncate() -> Result<(), Failure> {
    loop {
        let page = ORDERS.scan("", None, 500)?;
        if page.is_empty() {
            return Ok(());
        }
        for (key, _) in page {
            ORDERS.delete(&key)?;
        }
    }
}

refract_sdk::export_projection!(OrdersCdc);

#[cfg(test)]
mod tests {
    use refract_sdk::native::{MemoryBackend, with_backend};
    use refract_sdk::testing::event;
    use serde_json::json;

    use super::*;

    fn change(op: &str, key: &str, before: Value, after: Value) -> refract_sdk::Event {
        let kind = match op {
            "c" => "created",
            "u" => "updated",
            "d" => "deleted",
            "r" => "snapshot",
            _ => "truncated",
        };
        let data = json!({"op": op, "before": before, "after": after, "ts_ms": 7, "source": {"table": "orders"}});
        event("orders-cdc", &format!("orders.{kind}"), Some(key), data.to_string().as_bytes())
    }

    #[test]
    fn rows_follow_creates_updates_and_deletes() {
        let row = |q: i64| json!({"id": 10001, "quantity": q});
        let events = vec![
            change("r", "10001", Value::Null, row(1)),
            change("c", "10002", Value::Null, json!({"id": 10002, "quantity": 5})),
            change("u", "10001", row(1), row(3)),
            change("d", "10002", json!({"id": 10002, "quantity": 5}), Value::Null),
        ];
        let (store, result) = with_backend(MemoryBackend::default(), || OrdersCdc::handle(events));
        result.unwrap();
        let stored: Value = serde_json::from_slice(store.get("orders", "10001").unwrap()).unwrap();
        assert_eq!(stored, json!({"id": 10001, "quantity": 3, "lastChange": 7}));
        assert!(store.get("orders", "10002").is_none());
    }

    #[test]
    fn truncate_empties_the_table() {
        let events = vec![
            change("c", "1", Value::Null, json!({"id": 1})),
            change("c", "2", Value::Null, json!({"id": 2})),
            change("t", "", Value::Null, Value::Null),
        ];
        let (store, result) = with_backend(MemoryBackend::default(), || OrdersCdc::handle(events));
        result.unwrap();
        assert!(store.get("orders", "1").is_none() && store.get("orders", "2").is_none());
    }
}
