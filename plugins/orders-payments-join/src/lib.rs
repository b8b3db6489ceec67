//! `orders-payments-join`: a windowed left join of orders with their payments.
//!
//! Reads `OrderPlaced` and `PaymentReceived` from the `orders` stream and
//! `PaymentReceived` from the `payments` stream (either layout works). An
//! order joins the payments for it whose event time is within `window-ms` of
//! the order's (either side may arrive first). Once the joined payments
//! cover the total, it emits **`OrderReadyForShipment`**. When the window
//! has closed without that — event time has passed the order's time plus
//! `window-ms` plus `grace-ms` — it emits **`OrderUnpaid`** (the left join's
//! order without payment). Each order gets exactly one of the two.
//!
//! Event time is the largest event time seen (Kafka Streams' "stream time"),
//! so windows close as events flow, not by a wall clock. `grace-ms` is how far
//! behind stream time a payment may arrive and still count: make it larger
//! than the skew between the two streams. Late payments (outside the window,
//! or after it closed), a second `OrderPlaced` for an order and a payment
//! seen twice (same `paymentId`) change nothing.
//!
//! Settings (`plugins.orders-payments-join.settings`): `window-ms` (default
//! 300000, five minutes) and `grace-ms` (default 60000).

use refract_sdk::{Enricher, Event, Failure, Manifest, NewEvent, Table, setting_or};
use serde::{Deserialize, Serialize};

/// An order waiting for its payments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    pub order_id: String,
    pub customer_id: String,
    pub total_cents: i64,
    pub placed_at: i64,
    pub paid_cents: i64,
    /// The payments joined so far, in arrival order.
    pub payments: Vec<String>,
}

/// A payment that arrived before its order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EarlyPayment {
    pub payment_id: String,
    pub amount_cents: i64,
    pub time: i64,
}

/// What the join emits for an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinedOrder {
    pub order_id: String,
    pub customer_id: String,
    pub total: f64,
    pub paid: f64,
    /// The joined payments' ids, in arrival order (empty: no payment).
    pub payments: Vec<String>,
    pub placed_at: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OrderPlaced {
    order_id: String,
    customer_id: String,
    total: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PaymentReceived {
    order_id: String,
    payment_id: String,
    amount: f64,
}

/// Orders in their window, by order id.
const PENDING: Table<Pending> = Table::new("pending");
/// `<deadline, 20 digits>/<orderId>` → order id: windows in closing order.
const DEADLINES: Table<String> = Table::new("deadlines");
/// Payments for orders not seen yet: `<orderId>` → payments.
const EARLY: Table<Vec<EarlyPayment>> = Table::new("early-payments");
/// `<time, 20 digits>/<orderId>` → order id: early payments in expiry order.
const EARLY_BY_TIME: Table<String> = Table::new("early-by-time");
/// Orders already emitted (for duplicates and late payments): order id → outcome.
const DONE: Table<String> = Table::new("done");
/// `stream-time` → the largest event time seen.
const CLOCK: Table<i64> = Table::new("clock");
/// How far `deadlines` and `early-by-time` have been worked through: scans
/// start after these keys, so they never walk entries already removed.
const CURSORS: Table<String> = Table::new("cursors");

pub const READY: &str = "OrderReadyForShipment";
pub const UNPAID: &str = "OrderUnpaid";

fn cents(amount: f64) -> i64 {
    (amount * 100.0).round() as i64
}

fn time_key(time: i64, order_id: &str) -> String {
    format!("{:020}/{order_id}", time.max(0))
}

fn key_time(key: &str) -> i64 {
    key.get(..20).and_then(|t| t.parse().ok()).unwrap_or(0)
}

/// The settings and the clock, read once per batch and written back at its end.
#[derive(Clone)]
struct Window {
    window: i64,
    grace: i64,
    /// Stream time: the largest event time seen.
    now: i64,
    deadlines_cursor: Option<String>,
    early_cursor: Option<String>,
    /// The earliest time in `deadlines` / `early-by-time`, once a scan has
    /// found it (`None`: not known yet in this batch): no scan until it is due.
    next_deadline: Option<i64>,
    next_early: Option<i64>,
}

impl Window {
    fn load() -> Result<Self, Failure> {
        Ok(Window {
            window: setting_or("window-ms", 300_000)?,
            grace: setting_or("grace-ms", 60_000)?,
            now: CLOCK.get("stream-time")?.unwrap_or(i64::MIN),
            deadlines_cursor: CURSORS.get("deadlines")?,
            early_cursor: CURSORS.get("early")?,
            next_deadline: None,
            next_early: None,
        })
    }

    fn save(&self, loaded: &Window) -> Result<(), Failure> {
        if self.now != loaded.now {
            CLOCK.put("stream-time", &self.now)?;
        }
        for (name, cursor, before) in [
            ("deadlines", &self.deadlines_cursor, &loaded.deadlines_cursor),
            ("early", &self.early_cursor, &loaded.early_cursor),
        ] {
            if let Some(cursor) = cursor.as_ref().filter(|_| cursor != before) {
                CURSORS.put(name, cursor)?;
            }
        }
        Ok(())
    }
}

fn emit(out: &mut Vec<NewEvent>, event_type: &str, order: &Pending, time: i64) -> Result<(), Failure> {
    let joined = JoinedOrder {
        order_id: order.order_id.clone(),
        customer_id: order.customer_id.clone(),
        total: order.total_cents as f64 / 100.0,
        paid: order.paid_cents as f64 / 100.0,
        payments: order.payments.clone(),
        placed_at: order.placed_at,
    };
    out.push(NewEvent::json(event_type, &joined)?.key(&order.order_id).time(time));
    DONE.put(&order.order_id, &event_type.to_owned())?;
    // Its `deadlines` entry stays until stream time reaches it: removing
    // entries only in key order keeps the scans in `advance` short.
    PENDING.delete(&order.order_id)
}

/// Add a payment to `order`; emit the join if it is now paid.
fn add_payment(
    out: &mut Vec<NewEvent>,
    order: &mut Pending,
    payment_id: &str,
    amount_cents: i64,
    time: i64,
    window: &Window,
) -> Result<bool, Failure> {
    if (time - order.placed_at).abs() > window.window || order.payments.iter().any(|p| p == payment_id) {
        return Ok(false);
    }
    order.payments.push(payment_id.to_owned());
    order.paid_cents += amount_cents;
    if order.paid_cents >= order.total_cents {
        emit(out, READY, order, time.max(order.placed_at))?;
        return Ok(true);
    }
    Ok(false)
}

fn on_order(out: &mut Vec<NewEvent>, placed: OrderPlaced, time: i64, window: &mut Window) -> Result<(), Failure> {
    if DONE.get(&placed.order_id)?.is_some() || PENDING.get(&placed.order_id)?.is_some() {
        return Ok(()); // a duplicate
    }
    let mut order = Pending {
        order_id: placed.order_id,
        customer_id: placed.customer_id,
        total_cents: cents(placed.total),
        placed_at: time,
        paid_cents: 0,
        payments: Vec::new(),
    };
    if let Some(early) = EARLY.get(&order.order_id)? {
        EARLY.delete(&order.order_id)?;
        for p in early {
            if add_payment(out, &mut order, &p.payment_id, p.amount_cents, p.time, window)? {
                return Ok(());
            }
        }
    }
    if order.placed_at.saturating_add(window.window + window.grace) < window.now {
        // The order itself is late: its window closed before it arrived.
        return emit(out, UNPAID, &order, order.placed_at + window.window);
    }
    DEADLINES.put(&time_key(order.placed_at, &order.order_id), &order.order_id)?;
    window.next_deadline = window.next_deadline.map(|t| t.min(order.placed_at.max(0)));
    PENDING.put(&order.order_id, &order)
}

fn on_payment(
    out: &mut Vec<NewEvent>,
    payment: PaymentReceived,
    time: i64,
    window: &mut Window,
) -> Result<(), Failure> {
    if DONE.get(&payment.order_id)?.is_some() {
        return Ok(()); // late, or a duplicate of a joined payment
    }
    let amount = cents(payment.amount);
    if let Some(mut order) = PENDING.get(&payment.order_id)? {
        if !add_payment(out, &mut order, &payment.payment_id, amount, time, window)? {
            PENDING.put(&order.order_id, &order)?;
        }
        return Ok(());
    }
    let mut early = EARLY.get(&payment.order_id)?.unwrap_or_default();
    if early.iter().all(|p| p.payment_id != payment.payment_id) {
        early.push(EarlyPayment { payment_id: payment.payment_id, amount_cents: amount, time });
        EARLY_BY_TIME.put(&time_key(time, &payment.order_id), &payment.order_id)?;
        window.next_early = window.next_early.map(|t| t.min(time.max(0)));
        EARLY.put(&payment.order_id, &early)?;
    }
    Ok(())
}

/// Close every window that stream time has passed: those orders are unpaid.
/// Early payments no order can join any more are dropped.
fn advance(out: &mut Vec<NewEvent>, window: &mut Window) -> Result<(), Failure> {
    let oldest_open = window.now - window.window - window.grace;
    let horizon = time_key(oldest_open, "");
    let mut cursor = window.deadlines_cursor.take();
    while window.next_deadline.is_none_or(|t| t < oldest_open) {
        let Some((key, order_id)) = DEADLINES.scan("", cursor.as_deref(), 1)?.pop() else {
            window.next_deadline = Some(i64::MAX);
            break;
        };
        if key >= horizon {
            window.next_deadline = Some(key_time(&key));
            break;
        }
        if let Some(order) = PENDING.get(&order_id)? {
            emit(out, UNPAID, &order, order.placed_at + window.window)?;
        }
        DEADLINES.delete(&key)?;
        cursor = Some(key);
    }
    window.deadlines_cursor = cursor;
    let mut cursor = window.early_cursor.take();
    while window.next_early.is_none_or(|t| t < oldest_open) {
        let Some((key, order_id)) = EARLY_BY_TIME.scan("", cursor.as_deref(), 1)?.pop() else {
            window.next_early = Some(i64::MAX);
            break;
        };
        if key >= horizon {
            window.next_early = Some(key_time(&key));
            break;
        }
        // Payments whose order never came within their window.
        if let Some(mut early) = EARLY.get(&order_id)? {
            early.retain(|p| p.time >= oldest_open);
            if early.is_empty() { EARLY.delete(&order_id)? } else { EARLY.put(&order_id, &early)? }
        }
        EARLY_BY_TIME.delete(&key)?;
        cursor = Some(key);
    }
    window.early_cursor = cursor;
    Ok(())
}

fn enrich_one(event: &Event, out: &mut Vec<NewEvent>, window: &mut Window) -> Result<(), Failure> {
    match event.event_type.as_str() {
        "OrderPlaced" => on_order(out, event.json()?, event.time, window)?,
        "PaymentReceived" => on_payment(out, event.json()?, event.time, window)?,
        _ => return Ok(()),
    }
    if event.time > window.now {
        window.now = event.time;
        advance(out, window)?;
    }
    Ok(())
}

pub struct OrdersPaymentsJoin;

impl Enricher for OrdersPaymentsJoin {
    fn manifest() -> Manifest {
        Manifest::new("orders-payments-join", env!("CARGO_PKG_VERSION"))
            .subscribe("orders", &["OrderPlaced", "PaymentReceived"])
            .subscribe("payments", &["PaymentReceived"])
            .table(&PENDING)
            .table(&DEADLINES)
            .table(&EARLY)
            .table(&EARLY_BY_TIME)
            .table(&DONE)
            .table(&CLOCK)
            .table(&CURSORS)
    }

    fn enrich(event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Failure> {
        let loaded = Window::load()?;
        let mut window = loaded.clone();
        enrich_one(event, out, &mut window)?;
        window.save(&loaded)
    }

    /// The settings and the clock are read once per batch, not per event.
    fn enrich_batch(events: Vec<Event>) -> Result<Vec<NewEvent>, Failure> {
        let loaded = Window::load()?;
        let mut window = loaded.clone();
        let mut out = Vec::new();
        for event in &events {
            enrich_one(event, &mut out, &mut window)?;
        }
        window.save(&loaded)?;
        Ok(out)
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_enricher!(OrdersPaymentsJoin);

#[cfg(test)]
mod tests {
    use refract_sdk::native::{MemoryBackend, with_backend};
    use refract_sdk::testing::event;

    use super::*;

    fn at(mut e: Event, time: i64) -> Event {
        e.time = time;
        e
    }

    fn order(id: &str, total: f64, time: i64) -> Event {
        let data = format!(r#"{{"orderId":"{id}","customerId":"c-1","total":{total}}}"#);
        at(event("orders", "OrderPlaced", Some(id), data.as_bytes()), time)
    }

    fn payment(order: &str, id: &str, amount: f64, time: i64) -> Event {
        let data = format!(r#"{{"orderId":"{order}","paymentId":"{id}","amount":{amount}}}"#);
        at(event("payments", "PaymentReceived", Some(order), data.as_bytes()), time)
    }

    fn run(events: Vec<Event>) -> Vec<(String, JoinedOrder)> {
        let mut backend = MemoryBackend::default();
        backend.settings.insert("window-ms".into(), "1000".into());
        backend.settings.insert("grace-ms".into(), "100".into());
        let (_, out) = with_backend(backend, || OrdersPaymentsJoin::enrich_batch(events));
        out.unwrap()
            .into_iter()
            .map(|e| (e.event_type().to_owned(), serde_json::from_slice(e.data()).unwrap()))
            .collect()
    }

    #[test]
    fn an_order_paid_within_the_window_is_ready_and_one_without_is_unpaid() {
        let out = run(vec![
            order("o-1", 10.0, 0),
            payment("o-1", "p-1", 4.0, 500),
            order("o-2", 5.0, 600),
            payment("o-1", "p-2", 6.0, 900),
            payment("o-2", "p-3", 5.0, 1700), // 1100 ms after o-2: outside the window
            payment("x", "p-4", 1.0, 5000),   // moves stream time past every window
        ]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].0, READY);
        assert_eq!(out[0].1.payments, ["p-1", "p-2"]);
        assert_eq!(out[1].0, UNPAID);
        assert_eq!(out[1].1.order_id, "o-2");
        assert!(out[1].1.payments.is_empty());
    }

    #[test]
    fn payments_may_come_first_and_duplicates_change_nothing() {
        let out = run(vec![
            payment("o-1", "p-1", 10.0, 100),
            payment("o-1", "p-1", 10.0, 100),
            order("o-1", 10.0, 200),
            order("o-1", 10.0, 200),
            payment("o-1", "p-1", 10.0, 300),
            payment("x", "p-9", 1.0, 9000),
        ]);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].0, READY);
        assert_eq!(out[0].1.paid, 10.0);
    }

    #[test]
    fn an_order_arriving_after_its_window_closed_is_unpaid_at_once() {
        let out = run(vec![payment("x", "p-9", 1.0, 9000), order("o-1", 10.0, 100)]);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!((out[0].0.as_str(), out[0].1.order_id.as_str()), (UNPAID, "o-1"));
    }
}
