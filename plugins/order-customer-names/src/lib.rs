//! `order-customer-names`: enrichment from reference data.
//!
//! Reads `OrderPlaced` from the `orders` stream, looks the order's customer
//! up in the `customers` table of the `customers` projection, and emits the
//! order with `customerName` added (`null` for a customer the projection does
//! not know). The lookup sees the customers read model as it is when the
//! order is enriched. Output stream: `order-customer-names` unless routed.

use refract_sdk::{Enricher, Event, Failure, Manifest, NewEvent, lookup};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
struct Customer {
    name: String,
}

pub struct OrderCustomerNames;

impl Enricher for OrderCustomerNames {
    fn manifest() -> Manifest {
        Manifest::new("order-customer-names", env!("CARGO_PKG_VERSION")).subscribe("orders", &["OrderPlaced"])
    }

    fn enrich(event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Failure> {
        let mut order: Map<String, Value> = event.json()?;
        let Some(Value::String(customer_id)) = order.get("customerId") else {
            return Err(Failure::rejected("OrderPlaced without a customerId"));
        };
        let customer: Option<Customer> = lookup::get("customers", "customers", customer_id)?;
        order.insert("customerName".into(), customer.map_or(Value::Null, |c| Value::String(c.name)));
        out.push(NewEvent::json(&event.event_type, &order)?.derived_from(event));
        Ok(())
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_enricher!(OrderCustomerNames);

#[cfg(test)]
mod tests {
    use refract_sdk::native::{MemoryBackend, with_backend};
    use refract_sdk::testing::event;

    use super::*;

    #[test]
    fn an_order_gets_its_customer_s_name_or_null() {
        let mut backend = MemoryBackend::default();
        backend
            .lookups
            .entry("customers".into())
            .or_default()
            .entry("customers".into())
            .or_default()
            .insert("c-1".into(), br#"{"customerId":"c-1","name":"Ada"}"#.to_vec());
        let events = vec![
            event("orders", "OrderPlaced", Some("o-1"), br#"{"orderId":"o-1","customerId":"c-1"}"#),
            event("orders", "OrderPlaced", Some("o-2"), br#"{"orderId":"o-2","customerId":"c-2"}"#),
        ];
        let (_, out) = with_backend(backend, || OrderCustomerNames::enrich_batch(events));
        let out = out.unwrap();
        let data: Vec<Value> = out.iter().map(|e| serde_json::from_slice(e.data()).unwrap()).collect();
        assert_eq!(data[0]["customerName"], "Ada");
        assert_eq!(data[1]["customerName"], Value::Null);
    }
}
