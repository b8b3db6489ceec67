//! The order events of the examples and the rules that move an order's status.
//!
//! - `OrderPlaced` creates an order in status `placed` (a second one for the
//!   same order is rejected);
//! - `PaymentReceived` adds to `paid` (in whole cents, so sums never drift)
//!   and moves `placed` to `paid` once payments cover the total;
//! - `OrderShipped` moves it to `shipped`, `OrderCancelled` to `cancelled`,
//!   which is final: later events only move the order's time;
//! - an event for an unknown order, or one whose data does not decode, is rejected.

use refract_sdk::{Event, Failure};
use serde::Deserialize;

/// The event types of the `orders` stream.
pub const EVENT_TYPES: [&str; 4] = ["OrderPlaced", "PaymentReceived", "OrderShipped", "OrderCancelled"];

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Item {
    pub sku: String,
}

/// The data of `OrderPlaced`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer_id: String,
    pub total: f64,
    #[serde(default)]
    pub items: Vec<Item>,
    #[serde(default)]
    pub description: String,
}

/// A decoded order event.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderEvent {
    Placed(OrderPlaced),
    PaymentReceived { order_id: String, amount: f64 },
    Shipped { order_id: String },
    Cancelled { order_id: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OrderRef {
    order_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payment {
    order_id: String,
    amount: f64,
}

impl OrderEvent {
    /// Decode `event`; data that does not decode rejects it, whatever its order's state.
    pub fn decode(event: &Event) -> Result<Self, Failure> {
        Ok(match event.event_type.as_str() {
            "OrderPlaced" => OrderEvent::Placed(event.json()?),
            "PaymentReceived" => {
                let p: Payment = event.json()?;
                OrderEvent::PaymentReceived { order_id: p.order_id, amount: p.amount }
            }
            "OrderShipped" => OrderEvent::Shipped { order_id: event.json::<OrderRef>()?.order_id },
            "OrderCancelled" => OrderEvent::Cancelled { order_id: event.json::<OrderRef>()?.order_id },
            other => return Err(Failure::rejected(format!("unexpected event type {other}"))),
        })
    }

    /// The order the event is about.
    pub fn order_id(&self) -> &str {
        match self {
            OrderEvent::Placed(p) => &p.order_id,
            OrderEvent::PaymentReceived { order_id, .. }
            | OrderEvent::Shipped { order_id }
            | OrderEvent::Cancelled { order_id } => order_id,
        }
    }
}

/// An amount in whole cents.
pub fn cents(amount: f64) -> i64 {
    (amount * 100.0).round() as i64
}

/// The status-changing part of an order.
#[derive(Debug, PartialEq)]
pub struct OrderStatus<'a> {
    pub status: &'a mut String,
    pub paid: &'a mut f64,
    pub total: f64,
}

/// Apply a payment, shipment or cancellation to an existing order's status.
/// `Placed` changes nothing here: creating an order is the caller's.
pub fn advance(order: OrderStatus<'_>, event: &OrderEvent) {
    if order.status == "cancelled" {
        return;
    }
    match event {
        OrderEvent::PaymentReceived { amount, .. } => {
            let paid = cents(*order.paid) + cents(*amount);
            *order.paid = paid as f64 / 100.0;
            if order.status == "placed" && paid >= cents(order.total) {
                *order.status = "paid".into();
            }
        }
        OrderEvent::Shipped { .. } => *order.status = "shipped".into(),
        OrderEvent::Cancelled { .. } => *order.status = "cancelled".into(),
        OrderEvent::Placed(_) => {}
    }
}

/// The rejection of an event for an order that was never placed.
pub fn unknown_order(event: &OrderEvent, event_type: &str) -> Failure {
    Failure::rejected(format!("{event_type} for unknown order {}", event.order_id()))
}

/// The rejection of a second `OrderPlaced`.
pub fn already_placed(order_id: &str) -> Failure {
    Failure::rejected(format!("order {order_id} was already placed"))
}
