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

use refract_sdk::{Enricher, Event, Failure, Manifest, NewEvent, Table, TableCache, setting_or};
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

/// Where the join stands with one order: one table entry, so an event costs
/// one read and one write of state. Stored as `{"state": …, "data": …}`, the
/// tag first: it decodes in one pass (an internally tagged enum buffers the
/// whole entry to find its tag, which costs more than the join itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", content = "data", rename_all = "kebab-case")]
pub enum OrderState {
    /// Payments seen before the order.
    Early { payments: Vec<EarlyPayment> },
    /// The order, in its window.
    Pending(Pending),
    /// Emitted (`OrderReadyForShipment` or `OrderUnpaid`): duplicates and
    /// late payments change nothing.
    Done { outcome: String },
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

/// Order id → [`OrderState`].
const ORDERS: Table<OrderState> = Table::new("orders");
/// `<order time, 20 digits>/<orderId>` → order id: windows in closing order.
const DEADLINES: Table<String> = Table::new("deadlines");
/// `<payment time, 20 digits>/<orderId>` → order id: early payments in expiry order.
const EARLY_BY_TIME: Table<String> = Table::new("early-by-time");
/// `stream-time` → the largest event time seen.
const CLOCK: Table<i64> = Table::new("clock");
/// How far `deadlines` and `early-by-time` have been worked through: scans
/// start after these keys, so they never walk the entries behind them.
const CURSORS: Table<String> = Table::new("cursors");

pub const READY: &str = "OrderReadyForShipment";
pub const UNPAID: &str = "OrderUnpaid";

fn cents(amount: f64) -> i64 {
    (amount * 100.0).round() as i64
}

/// `<time, 20 digits>/<orderId>`: keys in time order (written by hand, it is
/// on every event's path).
fn time_key(time: i64, order_id: &str) -> String {
    let mut digits = [b'0'; 20];
    let mut t = time.max(0) as u64;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (t % 10) as u8;
        t /= 10;
    }
    let mut key = String::with_capacity(21 + order_id.len());
    key.push_str(std::str::from_utf8(&digits).expect("ASCII digits"));
    key.push('/');
    key.push_str(order_id);
    key
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

    /// The oldest order time whose window is still open.
    fn oldest_open(&self) -> i64 {
        self.now.saturating_sub(self.window + self.grace)
    }
}

/// Emit `order` as `event_type`; its state becomes `Done`.
fn emit(out: &mut Vec<NewEvent>, event_type: &str, order: &Pending, time: i64) -> Result<OrderState, Failure> {
    let joined = JoinedOrder {
        order_id: order.order_id.clone(),
        customer_id: order.customer_id.clone(),
        total: order.total_cents as f64 / 100.0,
        paid: order.paid_cents as f64 / 100.0,
        payments: order.payments.clone(),
        placed_at: order.placed_at,
    };
    out.push(NewEvent::json(event_type, &joined)?.key(&order.order_id).time(time));
    Ok(OrderState::Done { outcome: event_type.to_owned() })
}

/// Join a payment to `order` if it is in the window and new; the order's
/// next state (`Done` once payments cover the total).
fn add_payment(
    out: &mut Vec<NewEvent>,
    mut order: Pending,
    payment: &EarlyPayment,
    window: &Window,
) -> Result<OrderState, Failure> {
    if (payment.time - order.placed_at).abs() > window.window || order.payments.contains(&payment.payment_id) {
        return Ok(OrderState::Pending(order));
    }
    order.payments.push(payment.payment_id.clone());
    order.paid_cents += payment.amount_cents;
    if order.paid_cents >= order.total_cents {
        return emit(out, READY, &order, payment.time.max(order.placed_at));
    }
    Ok(OrderState::Pending(order))
}

/// The batch's view of [`ORDERS`]: an order's state is usually written when
/// the order arrives and again when its payment does, a few events later.
type Orders = TableCache<OrderState>;

fn on_order(
    out: &mut Vec<NewEvent>,
    orders: &mut Orders,
    placed: OrderPlaced,
    time: i64,
    window: &mut Window,
) -> Result<(), Failure> {
    let early = match orders.get(&placed.order_id)? {
        Some(OrderState::Pending(_) | OrderState::Done { .. }) => return Ok(()), // a duplicate
        Some(OrderState::Early { payments }) => payments.clone(),
        None => Vec::new(),
    };
    let order_id = placed.order_id.clone();
    let mut state = OrderState::Pending(Pending {
        order_id: placed.order_id,
        customer_id: placed.customer_id,
        total_cents: cents(placed.total),
        placed_at: time,
        paid_cents: 0,
        payments: Vec::new(),
    });
    for payment in &early {
        if let OrderState::Pending(order) = state {
            state = add_payment(out, order, payment, window)?;
        }
    }
    if let OrderState::Pending(order) = &state {
        if order.placed_at.saturating_add(window.window + window.grace) < window.now {
            // The order itself is late: its window closed before it arrived.
            state = emit(out, UNPAID, order, order.placed_at + window.window)?;
        } else {
            DEADLINES.put(&time_key(order.placed_at, &order.order_id), &order.order_id)?;
            window.next_deadline = window.next_deadline.map(|t| t.min(order.placed_at.max(0)));
        }
    }
    orders.put(&order_id, state)
}

fn on_payment(
    out: &mut Vec<NewEvent>,
    orders: &mut Orders,
    p: PaymentReceived,
    time: i64,
    window: &mut Window,
) -> Result<(), Failure> {
    let payment = EarlyPayment { payment_id: p.payment_id, amount_cents: cents(p.amount), time };
    let next = match orders.get(&p.order_id)?.cloned() {
        Some(OrderState::Done { .. }) => return Ok(()), // late, or a duplicate of a joined payment
        Some(OrderState::Pending(order)) => {
            let placed_at = order.placed_at;
            let next = add_payment(out, order, &payment, window)?;
            if matches!(next, OrderState::Done { .. }) {
                // Paid: its window need not be closed (saves a scan, a read and a delete later).
                DEADLINES.delete(&time_key(placed_at, &p.order_id))?;
            }
            next
        }
        Some(OrderState::Early { mut payments }) => {
            if payments.iter().any(|e| e.payment_id == payment.payment_id) {
                return Ok(());
            }
            payments.push(payment);
            OrderState::Early { payments }
        }
        None => OrderState::Early { payments: vec![payment] },
    };
    if matches!(next, OrderState::Early { .. }) {
        EARLY_BY_TIME.put(&time_key(time, &p.order_id), &p.order_id)?;
        window.next_early = window.next_early.map(|t| t.min(time.max(0)));
    }
    orders.put(&p.order_id, next)
}

/// Close every window that stream time has passed: those orders are unpaid.
/// Early payments no order can join any more are dropped.
fn advance(out: &mut Vec<NewEvent>, orders: &mut Orders, window: &mut Window) -> Result<(), Failure> {
    let oldest_open = window.oldest_open();
    let window_ms = window.window;
    drain_due(&DEADLINES, &mut window.deadlines_cursor, &mut window.next_deadline, oldest_open, |order_id| {
        if let Some(OrderState::Pending(order)) = orders.get(order_id)? {
            let done = emit(out, UNPAID, order, order.placed_at + window_ms)?;
            orders.put(order_id, done)?;
        }
        Ok(())
    })?;
    drain_due(&EARLY_BY_TIME, &mut window.early_cursor, &mut window.next_early, oldest_open, |order_id| {
        // Payments whose order never came within their window.
        if let Some(OrderState::Early { payments }) = orders.get(order_id)? {
            let payments: Vec<_> = payments.iter().filter(|p| p.time >= oldest_open).cloned().collect();
            if payments.is_empty() {
                orders.delete(order_id)?;
            } else {
                orders.put(order_id, OrderState::Early { payments })?;
            }
        }
        Ok(())
    })
}

/// Work through the entries of a time-ordered `table` (`<time>/<orderId>` →
/// order id) older than `oldest_open`, in key order after `cursor`: `due`
/// handles each order id, then the entry goes and the cursor moves past it.
/// `next` caches the earliest time left, so that nothing is scanned until it
/// is due.
fn drain_due(
    table: &Table<String>,
    cursor: &mut Option<String>,
    next: &mut Option<i64>,
    oldest_open: i64,
    mut due: impl FnMut(&str) -> Result<(), Failure>,
) -> Result<(), Failure> {
    // Formatted only once something may be due: this runs on every event.
    let mut horizon = None;
    while next.is_none_or(|t| t < oldest_open) {
        let Some((key, order_id)) = table.scan("", cursor.as_deref(), 1)?.pop() else {
            *next = Some(i64::MAX);
            break;
        };
        if key >= *horizon.get_or_insert_with(|| time_key(oldest_open, "")) {
            *next = Some(key_time(&key));
            break;
        }
        due(&order_id)?;
        table.delete(&key)?;
        *cursor = Some(key);
    }
    Ok(())
}

fn enrich_one(event: &Event, out: &mut Vec<NewEvent>, orders: &mut Orders, window: &mut Window) -> Result<(), Failure> {
    match event.event_type.as_str() {
        "OrderPlaced" => on_order(out, orders, event.json()?, event.time, window)?,
        "PaymentReceived" => on_payment(out, orders, event.json()?, event.time, window)?,
        _ => return Ok(()),
    }
    if event.time > window.now {
        window.now = event.time;
        advance(out, orders, window)?;
    }
    Ok(())
}

pub struct OrdersPaymentsJoin;

impl Enricher for OrdersPaymentsJoin {
    fn manifest() -> Manifest {
        Manifest::new("orders-payments-join", env!("CARGO_PKG_VERSION"))
            // 2: states stored adjacently tagged, paid orders' deadlines removed.
            .schema_version(2)
            .subscribe("orders", &["OrderPlaced", "PaymentReceived"])
            .subscribe("payments", &["PaymentReceived"])
            .table(&ORDERS)
            .table(&DEADLINES)
            .table(&EARLY_BY_TIME)
            .table(&CLOCK)
            .table(&CURSORS)
    }

    fn enrich(event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Failure> {
        let loaded = Window::load()?;
        let mut window = loaded.clone();
        ORDERS.cached(|orders| enrich_one(event, out, orders, &mut window))?;
        window.save(&loaded)
    }

    /// The settings and the clock are read once per batch, not per event, and
    /// order states are decoded and written once per batch (`ORDERS.cached`).
    fn enrich_batch(events: Vec<Event>) -> Result<Vec<NewEvent>, Failure> {
        let loaded = Window::load()?;
        let mut window = loaded.clone();
        let out = ORDERS.cached(|orders| {
            let mut out = Vec::new();
            for event in &events {
                enrich_one(event, &mut out, orders, &mut window)?;
            }
            Ok(out)
        })?;
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
