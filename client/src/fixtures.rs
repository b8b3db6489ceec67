//! Deterministic example events (the shapes of `order-summary` and
//! `account-balance`), for the demo, the tests and the benchmarks.
//!
//! Each event is `{"type", "key", "time", "data"}` as appended to the log.
//! The same seed always gives the same events.

use serde_json::{Value, json};

/// A small deterministic PRNG (SplitMix64): the same stream on every platform.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [lo, hi].
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A money amount in [lo, hi) with two decimals.
    pub fn money(&mut self, lo: f64, hi: f64) -> f64 {
        ((lo + self.unit() * (hi - lo)) * 100.0).round() / 100.0
    }
}

const WORDS: [&str; 15] = [
    "red", "blue", "wooden", "steel", "chair", "table", "lamp", "book", "express", "gift", "large", "small", "organic",
    "coffee", "tea",
];

/// `n` order events on the `orders` stream. A `poison` fraction of them are
/// payments for orders that do not exist (the projection must reject them).
pub fn orders(n: usize, seed: u64, poison: f64) -> Vec<Value> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    let mut open: Vec<String> = Vec::new();
    let mut time: i64 = 1_700_000_000_000;
    let customers = (n as u64 / 40).max(2);
    while out.len() < n {
        time += rng.range(1, 50) as i64;
        let r = rng.unit();
        if poison > 0.0 && r < poison {
            let id = format!("ghost-{}", rng.range(0, 1_000_000));
            let pid = format!("p-x{}", out.len());
            out.push(json!({"type": "PaymentReceived", "key": id, "time": time,
                "data": {"orderId": id, "paymentId": pid, "amount": 1.0}}));
            continue;
        }
        if open.is_empty() || r < 0.35 {
            let id = format!("o-{}", open.len() + 1);
            let customer = format!("c-{}", rng.range(1, customers));
            let items: Vec<Value> = (0..rng.range(1, 4))
                .map(|_| json!({"sku": format!("sku-{}", rng.range(1, 500)), "qty": rng.range(1, 3), "price": rng.money(1.0, 100.0)}))
                .collect();
            let cents: i64 = items
                .iter()
                .map(|i| i["qty"].as_i64().unwrap_or(0) * (i["price"].as_f64().unwrap_or(0.0) * 100.0).round() as i64)
                .sum();
            // Four distinct words, like the seed generator's `random.sample`.
            let mut words: Vec<&str> = Vec::with_capacity(4);
            while words.len() < 4 {
                let word = WORDS[rng.range(0, WORDS.len() as u64 - 1) as usize];
                if !words.contains(&word) {
                    words.push(word);
                }
            }
            out.push(json!({"type": "OrderPlaced", "key": id, "time": time,
                "data": {"orderId": id, "customerId": customer, "total": cents as f64 / 100.0,
                         "items": items, "description": words.join(" ")}}));
            open.push(id);
            continue;
        }
        let id = open[rng.range(0, open.len() as u64 - 1) as usize].clone();
        let event = if r < 0.75 {
            json!({"type": "PaymentReceived", "key": id, "time": time,
                "data": {"orderId": id, "paymentId": format!("p-{}", out.len()), "amount": rng.money(5.0, 200.0)}})
        } else if r < 0.92 {
            json!({"type": "OrderShipped", "key": id, "time": time,
                "data": {"orderId": id, "tracking": format!("TRK{}", rng.range(100_000, 1_000_000))}})
        } else {
            json!({"type": "OrderCancelled", "key": id, "time": time,
                "data": {"orderId": id, "reason": "customer request"}})
        };
        out.push(event);
    }
    out
}

/// `n` account events on the `accounts` stream. A `poison` fraction of them
/// are withdrawals far beyond any balance (the projection must reject them).
pub fn accounts(n: usize, seed: u64, poison: f64) -> Vec<Value> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    let mut accounts: Vec<String> = Vec::new();
    let mut time: i64 = 1_700_000_000_000;
    while out.len() < n {
        time += rng.range(1, 50) as i64;
        let r = rng.unit();
        let pick =
            |rng: &mut Rng, accounts: &[String]| accounts[rng.range(0, accounts.len() as u64 - 1) as usize].clone();
        let event = if accounts.is_empty() || r < 0.1 {
            let id = format!("a-{}", accounts.len() + 1);
            accounts.push(id.clone());
            json!({"type": "AccountCreated", "key": id, "time": time, "data": {"accountId": id, "owner": format!("owner {id}")}})
        } else if poison > 0.0 && r < 0.1 + poison {
            let id = pick(&mut rng, &accounts);
            json!({"type": "MoneyWithdrawn", "key": id, "time": time, "data": {"accountId": id, "amount": 1e9}})
        } else if r < 0.6 {
            let id = pick(&mut rng, &accounts);
            json!({"type": "MoneyDeposited", "key": id, "time": time, "data": {"accountId": id, "amount": rng.money(1.0, 500.0)}})
        } else if r < 0.85 {
            let id = pick(&mut rng, &accounts);
            json!({"type": "MoneyWithdrawn", "key": id, "time": time, "data": {"accountId": id, "amount": rng.money(1.0, 300.0)}})
        } else {
            let (a, b) = (pick(&mut rng, &accounts), pick(&mut rng, &accounts));
            json!({"type": "MoneyTransferred", "key": a, "time": time,
                "data": {"accountId": a, "toAccountId": b, "amount": rng.money(1.0, 300.0)}})
        };
        out.push(event);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_same_seed_gives_the_same_events() {
        assert_eq!(super::orders(500, 7, 0.1), super::orders(500, 7, 0.1));
        assert_ne!(super::orders(500, 7, 0.0), super::orders(500, 8, 0.0));
        let events = super::orders(1000, 1, 0.0);
        assert_eq!(events[0]["type"], "OrderPlaced");
        assert!(events.iter().any(|e| e["type"] == "OrderCancelled"));
    }
}
