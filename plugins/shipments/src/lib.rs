//! `shipments`: the projection over the join's output — orders ready to
//! ship, from the `shipping` stream that `orders-payments-join` is routed to.
//!
//! Table `ready`: `orderId` → `{"orderId", "customerId", "total", "paid",
//! "payments", "placedAt"}`. A second `OrderReadyForShipment` for an order is
//! rejected (dead letters): the join must emit each order once.

use refract_sdk::{Event, Failure, Manifest, Projection, Table};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shipment {
    pub order_id: String,
    pub customer_id: String,
    pub total: f64,
    pub paid: f64,
    pub payments: Vec<String>,
    pub placed_at: i64,
}

pub const READY: Table<Shipment> = Table::new("ready");

pub struct Shipments;

impl Projection for Shipments {
    fn manifest() -> Manifest {
        Manifest::new("shipments", env!("CARGO_PKG_VERSION"))
            .subscribe("shipping", &["OrderReadyForShipment"])
            .table(&READY)
    }

    fn apply(event: &Event) -> Result<(), Failure> {
        let shipment: Shipment = event.json()?;
        if READY.get(&shipment.order_id)?.is_some() {
            return Err(Failure::rejected(format!("order {} is already ready for shipment", shipment.order_id)));
        }
        READY.put(&shipment.order_id.clone(), &shipment)
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_projection!(Shipments);
