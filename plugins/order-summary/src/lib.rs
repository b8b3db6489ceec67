//! `order-summary`: the state of every order, and each customer's orders.
//!
//! Reads `OrderPlaced`, `PaymentReceived`, `OrderShipped` and `OrderCancelled`
//! from the `orders` stream and maintains:
//! - `orders`: order id → [`Order`];
//! - `customer-orders`: `<customerId>/<orderId>` → [`CustomerOrder`], so a
//!   prefix scan on `<customerId>/` lists a customer's orders.
//!
//! The status rules are the shared ones of `order-events`.
//!
//! Built with `TESTKIT_VARIANT=canceled` (the end-to-end tests' "new
//! version" to preview) it stores a cancelled order's status as
//! `canceled`: one field's format changes, for cancelled orders only.

use order_events::{OrderEvent, OrderStatus};
use refract_sdk::{Event, Failure, Manifest, Projection, Table};
use serde::{Deserialize, Serialize};

/// An order as the `orders` table holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    /// `placed`, `paid` (once payments cover the total), `shipped` or `cancelled` (final).
    pub status: String,
    pub total: f64,
    /// The sum of payments received.
    pub paid: f64,
    /// Time (ms) of the last event applied to the order.
    pub updated_at: i64,
}

/// An entry of the `customer-orders` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomerOrder {
    pub order_id: String,
    pub status: String,
    pub total: f64,
}

pub const ORDERS: Table<Order> = Table::new("orders");
pub const CUSTOMER_ORDERS: Table<CustomerOrder> = Table::new("customer-orders");

pub struct OrderSummary;

/// The variant this component was built as (`TESTKIT_VARIANT`).
fn spells_canceled() -> bool {
    option_env!("TESTKIT_VARIANT") == Some("canceled")
}

/// `status` as stored: the variant spells `cancelled` its own way.
fn stored(status: String) -> String {
    match spells_canceled() && status == "cancelled" {
        true => "canceled".into(),
        false => status,
    }
}

impl Projection for OrderSummary {
    fn manifest() -> Manifest {
        let version = match spells_canceled() {
            true => concat!(env!("CARGO_PKG_VERSION"), "+canceled"),
            false => env!("CARGO_PKG_VERSION"),
        };
        Manifest::new("order-summary", version)
            .subscribe("orders", &order_events::EVENT_TYPES)
            // An order's summary is stored under its events' key, the order id.
            .keyed_table(&ORDERS)
            .table(&CUSTOMER_ORDERS)
    }

    fn apply(event: &Event) -> Result<(), Failure> {
        let change = OrderEvent::decode(event)?;
        let order = match &change {
            OrderEvent::Placed(placed) => {
                if ORDERS.get(&placed.order_id)?.is_some() {
                    return Err(order_events::already_placed(&placed.order_id));
                }
                Order {
                    order_id: placed.order_id.clone(),
                    customer_id: placed.customer_id.clone(),
                    status: "placed".into(),
                    total: placed.total,
                    paid: 0.0,
                    updated_at: event.time,
                }
            }
            _ => {
                let mut order = ORDERS
                    .get(change.order_id())?
                    .ok_or_else(|| order_events::unknown_order(&change, &event.event_type))?;
                if order.status == "canceled" {
                    order.status = "cancelled".into();
                }
                let status = OrderStatus { status: &mut order.status, paid: &mut order.paid, total: order.total };
                order_events::advance(status, &change);
                order.updated_at = event.time;
                order
            }
        };
        let order = Order { status: stored(order.status), ..order };
        let entry =
            CustomerOrder { order_id: order.order_id.clone(), status: order.status.clone(), total: order.total };
        CUSTOMER_ORDERS.put(&format!("{}/{}", order.customer_id, order.order_id), &entry)?;
        ORDERS.put(&order.order_id, &order)
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_projection!(OrderSummary);

#[cfg(test)]
mod tests {
    use super::*;
    use refract_sdk::native::{MemoryBackend, with_backend};
    use refract_sdk::testing::event;

    fn run(events: &[(&str, &str)]) -> (MemoryBackend, Result<(), Failure>) {
        let events = events
            .iter()
            .enumerate()
            .map(|(i, (ty, data))| {
                let mut e = event("orders", ty, None, data.as_bytes());
                e.time = i as i64;
                e
            })
            .collect();
        with_backend(MemoryBackend::default(), || OrderSummary::handle(events))
    }

    fn order(store: &MemoryBackend, id: &str) -> Order {
        serde_json::from_slice(store.get("orders", id).expect("order exists")).unwrap()
    }

    #[test]
    fn payments_covering_the_total_mark_the_order_paid() {
        let (store, result) = run(&[
            ("OrderPlaced", r#"{"orderId":"o-1","customerId":"c-1","total":10.3}"#),
            ("PaymentReceived", r#"{"orderId":"o-1","paymentId":"p","amount":10.1}"#),
            ("PaymentReceived", r#"{"orderId":"o-1","paymentId":"q","amount":0.2}"#),
        ]);
        result.unwrap();
        let o = order(&store, "o-1");
        assert_eq!((o.status.as_str(), o.paid, o.updated_at), ("paid", 10.3, 2));
        let listed = store.get("customer-orders", "c-1/o-1").unwrap();
        assert_eq!(listed, br#"{"orderId":"o-1","status":"paid","total":10.3}"#);
    }

    #[test]
    fn cancelled_is_final() {
        let (store, result) = run(&[
            ("OrderPlaced", r#"{"orderId":"o-1","customerId":"c-1","total":5}"#),
            ("OrderCancelled", r#"{"orderId":"o-1","reason":"r"}"#),
            ("OrderShipped", r#"{"orderId":"o-1","tracking":"t"}"#),
            ("PaymentReceived", r#"{"orderId":"o-1","paymentId":"p","amount":9}"#),
        ]);
        result.unwrap();
        let o = order(&store, "o-1");
        assert_eq!((o.status.as_str(), o.paid, o.updated_at), ("cancelled", 0.0, 3));
    }

    #[test]
    fn unknown_orders_and_malformed_data_are_rejected() {
        let (_, result) = run(&[("PaymentReceived", r#"{"orderId":"ghost","paymentId":"p","amount":1}"#)]);
        assert!(matches!(result, Err(Failure::Rejected(m)) if m.contains("unknown order ghost")));
        let (_, result) = run(&[("OrderPlaced", r#"{"orderId":17}"#)]);
        assert!(matches!(result, Err(Failure::Rejected(m)) if m.contains("does not decode")));
    }
}
