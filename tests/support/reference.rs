//! Reference folds of the example events, written from the event shapes in
//! `shared/fixtures/README.md`, independently of the plugins: what a correct
//! `order-summary` and `account-balance` must produce.

use std::collections::BTreeMap;

use serde_json::{Value, json};

fn cents(v: &Value) -> i64 {
    (v.as_f64().expect("a number") * 100.0).round() as i64
}

fn money(cents: i64) -> Value {
    json!(cents as f64 / 100.0)
}

/// The expected `orders` and `customer-orders` tables, and how many events are rejected.
pub(crate) struct Orders {
    pub orders: BTreeMap<String, Value>,
    pub customer_orders: BTreeMap<String, Value>,
    pub rejected: usize,
}

struct Order {
    customer: String,
    status: &'static str,
    total: i64,
    paid: i64,
    updated_at: i64,
}

/// Fold order events (in log order per order id).
pub(crate) fn orders(events: &[Value]) -> Orders {
    let mut state: BTreeMap<String, Order> = BTreeMap::new();
    let mut rejected = 0;
    for e in events {
        let d = &e["data"];
        let Some(id) = d["orderId"].as_str() else {
            rejected += 1;
            continue;
        };
        let time = e["time"].as_i64().unwrap();
        let ty = e["type"].as_str().unwrap();
        if ty == "OrderPlaced" {
            let (Some(customer), Some(_)) = (d["customerId"].as_str(), d["total"].as_f64()) else {
                rejected += 1;
                continue;
            };
            if state.contains_key(id) {
                rejected += 1;
                continue;
            }
            let order = Order {
                customer: customer.to_owned(),
                status: "placed",
                total: cents(&d["total"]),
                paid: 0,
                updated_at: time,
            };
            state.insert(id.to_owned(), order);
            continue;
        }
        let Some(o) = state.get_mut(id) else {
            rejected += 1;
            continue;
        };
        if ty == "PaymentReceived" && d["amount"].as_f64().is_none() {
            rejected += 1;
            continue;
        }
        if o.status != "cancelled" {
            match ty {
                "PaymentReceived" => {
                    o.paid += cents(&d["amount"]);
                    if o.status == "placed" && o.paid >= o.total {
                        o.status = "paid";
                    }
                }
                "OrderShipped" => o.status = "shipped",
                "OrderCancelled" => o.status = "cancelled",
                other => panic!("unexpected event type {other}"),
            }
        }
        o.updated_at = time;
    }
    let orders = state
        .iter()
        .map(|(id, o)| {
            let v = json!({"orderId": id, "customerId": o.customer, "status": o.status,
                           "total": money(o.total), "paid": money(o.paid), "updatedAt": o.updated_at});
            (id.clone(), v)
        })
        .collect();
    let customer_orders = state
        .iter()
        .map(|(id, o)| {
            (format!("{}/{id}", o.customer), json!({"orderId": id, "status": o.status, "total": money(o.total)}))
        })
        .collect();
    Orders { orders, customer_orders, rejected }
}

/// The expected `balances` table and number of rejected events.
pub(crate) fn balances(events: &[Value]) -> (BTreeMap<String, Value>, usize) {
    let mut bal: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut rejected = 0;
    for e in events {
        let d = &e["data"];
        let a = d["accountId"].as_str().unwrap().to_owned();
        match e["type"].as_str().unwrap() {
            "AccountCreated" => match bal.entry(a) {
                std::collections::btree_map::Entry::Occupied(_) => rejected += 1,
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert((d["owner"].as_str().unwrap().to_owned(), 0));
                }
            },
            ty => {
                let amount = cents(&d["amount"]);
                let Some(&(_, balance)) = bal.get(&a) else {
                    rejected += 1;
                    continue;
                };
                match ty {
                    "MoneyDeposited" => bal.get_mut(&a).unwrap().1 += amount,
                    "MoneyWithdrawn" if amount > balance => rejected += 1,
                    "MoneyWithdrawn" => bal.get_mut(&a).unwrap().1 -= amount,
                    "MoneyTransferred" => {
                        let b = d["toAccountId"].as_str().unwrap().to_owned();
                        if !bal.contains_key(&b) || amount > balance {
                            rejected += 1;
                        } else {
                            bal.get_mut(&a).unwrap().1 -= amount;
                            bal.get_mut(&b).unwrap().1 += amount;
                        }
                    }
                    other => panic!("unexpected event type {other}"),
                }
            }
        }
    }
    let table = bal
        .into_iter()
        .map(|(id, (owner, cents))| (id.clone(), json!({"accountId": id, "owner": owner, "balance": money(cents)})))
        .collect();
    (table, rejected)
}
