//! `customers`: reference data — each customer's name and e-mail — from the
//! `customers` stream, for lookups by enrichers (`order-customer-names`).
//!
//! | event | data |
//! |---|---|
//! | `CustomerRegistered` | `customerId`, `name`, `email` |
//! | `CustomerRenamed` | `customerId`, `name` |
//!
//! Table `customers`: `customerId` → `{"customerId", "name", "email"}`. A
//! rename of an unknown customer is rejected (dead letters).

use refract_sdk::{Event, Failure, Manifest, Projection, Table};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    pub customer_id: String,
    pub name: String,
    #[serde(default)]
    pub email: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Renamed {
    customer_id: String,
    name: String,
}

pub const CUSTOMERS: Table<Customer> = Table::new("customers");

pub struct Customers;

impl Projection for Customers {
    fn manifest() -> Manifest {
        Manifest::new("customers", env!("CARGO_PKG_VERSION"))
            .subscribe("customers", &["CustomerRegistered", "CustomerRenamed"])
            .table(&CUSTOMERS)
    }

    fn apply(event: &Event) -> Result<(), Failure> {
        match event.event_type.as_str() {
            "CustomerRegistered" => {
                let customer: Customer = event.json()?;
                CUSTOMERS.put(&customer.customer_id.clone(), &customer)
            }
            _ => {
                let renamed: Renamed = event.json()?;
                let Some(mut customer) = CUSTOMERS.get(&renamed.customer_id)? else {
                    return Err(Failure::rejected(format!("unknown customer {}", renamed.customer_id)));
                };
                customer.name = renamed.name;
                CUSTOMERS.put(&renamed.customer_id, &customer)
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_projection!(Customers);
