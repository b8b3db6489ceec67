//! `order-search`: orders as a full-text search index.
//!
//! The seed material's Elasticsearch `order_projection` mapping, in Refract:
//! index `orders` with `orderId`, `customer` and `status` as keywords,
//! `total` and `paid` as f64, `updatedAt` as a date, and `description` and
//! `items` as full text. The order's state lives in the `orders` table; every
//! event that changes an order re-indexes its document.

use order_events::{OrderEvent, OrderStatus};
use refract_sdk::{Event, Failure, Index, IndexMapping, Manifest, Projection, Table};
use serde::{Deserialize, Serialize};

/// An order's state, as the `orders` table holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderState {
    pub order_id: String,
    pub customer_id: String,
    pub status: String,
    pub total: f64,
    pub paid: f64,
    pub updated_at: i64,
    pub description: String,
    /// The SKUs ordered, space-separated.
    pub items: String,
}

/// The search document of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderDocument {
    pub order_id: String,
    pub customer: String,
    pub status: String,
    pub total: f64,
    pub paid: f64,
    /// Milliseconds since the epoch.
    pub updated_at: i64,
    pub description: String,
    pub items: String,
}

pub const ORDERS: Table<OrderState> = Table::new("orders");
pub const ORDER_INDEX: Index<OrderDocument> = Index::new("orders");

pub struct OrderSearch;

impl Projection for OrderSearch {
    fn manifest() -> Manifest {
        Manifest::new("order-search", env!("CARGO_PKG_VERSION"))
            .subscribe("orders", &order_events::EVENT_TYPES)
            .table(&ORDERS)
    }

    fn indexes() -> Vec<IndexMapping> {
        vec![
            IndexMapping::new(ORDER_INDEX.name())
                .keyword("orderId")
                .keyword("customer")
                .keyword("status")
                .f64("total")
                .f64("paid")
                .date("updatedAt")
                .text("description")
                .text("items"),
        ]
    }

    fn apply(event: &Event) -> Result<(), Failure> {
        let change = OrderEvent::decode(event)?;
        let order = match change {
            OrderEvent::Placed(placed) => {
                if ORDERS.get(&placed.order_id)?.is_some() {
                    return Err(order_events::already_placed(&placed.order_id));
                }
                OrderState {
                    order_id: placed.order_id,
                    customer_id: placed.customer_id,
                    status: "placed".into(),
                    total: placed.total,
                    paid: 0.0,
                    updated_at: event.time,
                    description: placed.description,
                    items: placed.items.into_iter().map(|i| i.sku).collect::<Vec<_>>().join(" "),
                }
            }
            change => {
                let mut order = ORDERS
                    .get(change.order_id())?
                    .ok_or_else(|| order_events::unknown_order(&change, &event.event_type))?;
                let status = OrderStatus { status: &mut order.status, paid: &mut order.paid, total: order.total };
                order_events::advance(status, &change);
                order.updated_at = event.time;
                order
            }
        };
        let document = OrderDocument {
            order_id: order.order_id.clone(),
            customer: order.customer_id.clone(),
            status: order.status.clone(),
            total: order.total,
            paid: order.paid,
            updated_at: order.updated_at,
            description: order.description.clone(),
            items: order.items.clone(),
        };
        ORDER_INDEX.upsert(&order.order_id, &document)?;
        ORDERS.put(&order.order_id, &order)
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_projection!(OrderSearch);

#[cfg(test)]
mod tests {
    use super::*;
    use refract_sdk::native::{MemoryBackend, with_backend};
    use refract_sdk::testing::event;

    #[test]
    fn every_change_reindexes_the_order() {
        let placed = r#"{"orderId":"o-1","customerId":"c-1","total":5,"items":[{"sku":"sku-1"},{"sku":"sku-2"}],"description":"red chair"}"#;
        let events = vec![
            event("orders", "OrderPlaced", Some("o-1"), placed.as_bytes()),
            event("orders", "OrderShipped", Some("o-1"), br#"{"orderId":"o-1","tracking":"t"}"#),
        ];
        let (store, result) = with_backend(MemoryBackend::default(), || OrderSearch::handle(events));
        result.unwrap();
        let doc: OrderDocument = serde_json::from_slice(store.document("orders", "o-1").unwrap()).unwrap();
        assert_eq!((doc.status.as_str(), doc.items.as_str(), doc.customer.as_str()), ("shipped", "sku-1 sku-2", "c-1"));
    }
}
