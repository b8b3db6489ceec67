//! `order-upcaster`: schema evolution by upcasting.
//!
//! Reads every event of the `orders-raw` stream, where producers of two
//! generations write. `OrderPlaced` version 1 used other field names:
//!
//! | v1 | v2 |
//! |---|---|
//! | `order_id` | `orderId` |
//! | `customer` | `customerId` |
//! | `amount` | `total` |
//! | `lines: [{sku, quantity, unit_price}]` | `items: [{sku, qty, price}]` |
//! | `note` | `description` |
//!
//! A v1 event is one with the header `schema-version: 1`, or, without that
//! header, one whose data has `order_id`. It is rewritten as v2; every other
//! event passes through unchanged (same type, key, time and headers), so
//! projections downstream only ever see v2. Route its output to the stream
//! they read (`plugins.order-upcaster.routes` in `refract.yaml`).

use refract_sdk::{Enricher, Event, Failure, Manifest, NewEvent};
use serde::{Deserialize, Serialize};

/// `OrderPlaced` as version 1 producers wrote it.
#[derive(Debug, Deserialize)]
pub struct OrderPlacedV1 {
    pub order_id: String,
    pub customer: String,
    pub amount: f64,
    #[serde(default)]
    pub lines: Vec<LineV1>,
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Deserialize)]
pub struct LineV1 {
    pub sku: String,
    pub quantity: u32,
    pub unit_price: f64,
}

/// `OrderPlaced` version 2, the shape of the fixtures.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlacedV2 {
    pub order_id: String,
    pub customer_id: String,
    pub total: f64,
    pub items: Vec<ItemV2>,
    pub description: String,
}

#[derive(Debug, Serialize)]
pub struct ItemV2 {
    pub sku: String,
    pub qty: u32,
    pub price: f64,
}

impl From<OrderPlacedV1> for OrderPlacedV2 {
    fn from(v1: OrderPlacedV1) -> Self {
        OrderPlacedV2 {
            order_id: v1.order_id,
            customer_id: v1.customer,
            total: v1.amount,
            items: v1.lines.into_iter().map(|l| ItemV2 { sku: l.sku, qty: l.quantity, price: l.unit_price }).collect(),
            description: v1.note,
        }
    }
}

fn is_v1(event: &Event) -> Result<bool, Failure> {
    if let Some(version) = event.header("schema-version") {
        return Ok(version.trim() == "1");
    }
    #[derive(Deserialize)]
    struct Probe {
        order_id: Option<serde::de::IgnoredAny>,
    }
    Ok(event.json::<Probe>()?.order_id.is_some())
}

pub struct OrderUpcaster;

impl Enricher for OrderUpcaster {
    fn manifest() -> Manifest {
        Manifest::new("order-upcaster", env!("CARGO_PKG_VERSION")).subscribe("orders-raw", &[])
    }

    fn enrich(event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Failure> {
        let upcast = if event.event_type == "OrderPlaced" && is_v1(event)? {
            let v2 = OrderPlacedV2::from(event.json::<OrderPlacedV1>()?);
            let headers: Vec<_> = event.headers.iter().filter(|(k, _)| k != "schema-version").cloned().collect();
            let mut next = NewEvent::json("OrderPlaced", &v2)?.time(event.time).header("schema-version", "2");
            if let Some(key) = &event.key {
                next = next.key(key);
            }
            for (k, v) in &headers {
                next = next.header(k, v);
            }
            next
        } else {
            let data: Box<serde_json::value::RawValue> = event.json()?;
            NewEvent::json(&event.event_type, &data)?.derived_from(event)
        };
        out.push(upcast);
        Ok(())
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_enricher!(OrderUpcaster);

#[cfg(test)]
mod tests {
    use refract_sdk::native::{MemoryBackend, with_backend};
    use refract_sdk::testing::event;

    use super::*;

    #[test]
    fn v1_orders_become_v2_and_everything_else_passes_through() {
        let v1 = br#"{"order_id":"o-1","customer":"c-1","amount":12.5,"lines":[{"sku":"a","quantity":2,"unit_price":6.25}],"note":"blue mug"}"#;
        let v2 = br#"{"orderId":"o-2","customerId":"c-2","total":1.0,"items":[],"description":""}"#;
        let paid = br#"{"orderId":"o-1","paymentId":"p","amount":12.5}"#;
        let events = vec![
            event("orders-raw", "OrderPlaced", Some("o-1"), v1),
            event("orders-raw", "OrderPlaced", Some("o-2"), v2),
            event("orders-raw", "PaymentReceived", Some("o-1"), paid),
        ];
        let (_, out) = with_backend(MemoryBackend::default(), || OrderUpcaster::enrich_batch(events));
        let out = out.unwrap();
        assert_eq!(
            std::str::from_utf8(out[0].data()).unwrap(),
            r#"{"orderId":"o-1","customerId":"c-1","total":12.5,"items":[{"sku":"a","qty":2,"price":6.25}],"description":"blue mug"}"#
        );
        assert_eq!(out[0].key_str(), Some("o-1"));
        assert_eq!(out[1].data(), v2);
        assert_eq!((out[2].event_type(), out[2].data()), ("PaymentReceived", paid.as_slice()));
    }
}
