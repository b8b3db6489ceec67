//! `account-balance`: balances and per-account transaction history.
//!
//! Reads `AccountCreated`, `MoneyDeposited`, `MoneyWithdrawn` and
//! `MoneyTransferred` from the `accounts` stream and maintains:
//! - `balances`: account id → [`Balance`];
//! - `history`: `<accountId>/<offset, 20 digits>` → [`HistoryEntry`], one per
//!   movement of money (both sides of a transfer), in log order.
//!
//! A withdrawal or transfer beyond the balance, or any event for an unknown
//! account, is rejected: it becomes a dead letter and changes nothing.
//! Transfers touch two accounts, so run this projection over a stream with one
//! partition (the demo configures `accounts` that way) to keep a total order.

use refract_sdk::{Event, Failure, Manifest, Projection, Table};
use serde::{Deserialize, Serialize};

/// An account's balance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    pub account_id: String,
    pub owner: String,
    pub balance: f64,
}

/// One movement of money on an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    #[serde(rename = "type")]
    pub event_type: String,
    pub amount: f64,
    pub balance_after: f64,
    /// For transfers, the other account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counterparty: Option<String>,
}

pub const BALANCES: Table<Balance> = Table::new("balances");
pub const HISTORY: Table<HistoryEntry> = Table::new("history");

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountCreated {
    account_id: String,
    owner: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Movement {
    account_id: String,
    amount: f64,
    #[serde(default)]
    to_account_id: Option<String>,
}

fn cents(amount: f64) -> i64 {
    (amount * 100.0).round() as i64
}

fn account(id: &str) -> Result<Balance, Failure> {
    BALANCES.get(id)?.ok_or_else(|| Failure::rejected(format!("unknown account {id}")))
}

fn record(event: &Event, account: &Balance, amount: f64, counterparty: Option<&str>) -> Result<(), Failure> {
    let entry = HistoryEntry {
        event_type: event.event_type.clone(),
        amount,
        balance_after: account.balance,
        counterparty: counterparty.map(str::to_owned),
    };
    HISTORY.put(&format!("{}/{:020}", account.account_id, event.offset), &entry)?;
    BALANCES.put(&account.account_id, account)
}

pub struct AccountBalance;

impl Projection for AccountBalance {
    fn manifest() -> Manifest {
        Manifest::new("account-balance", env!("CARGO_PKG_VERSION"))
            .subscribe("accounts", &["AccountCreated", "MoneyDeposited", "MoneyWithdrawn", "MoneyTransferred"])
            .table(&BALANCES)
            .table(&HISTORY)
    }

    fn apply(event: &Event) -> Result<(), Failure> {
        if event.event_type == "AccountCreated" {
            let created: AccountCreated = event.json()?;
            if BALANCES.get(&created.account_id)?.is_some() {
                return Err(Failure::rejected(format!("account {} already exists", created.account_id)));
            }
            let account = Balance { account_id: created.account_id, owner: created.owner, balance: 0.0 };
            return BALANCES.put(&account.account_id, &account);
        }
        let movement: Movement = event.json()?;
        let amount = cents(movement.amount);
        if amount <= 0 {
            return Err(Failure::rejected(format!("amount must be positive, got {}", movement.amount)));
        }
        let mut source = account(&movement.account_id)?;
        let balance = cents(source.balance);
        match event.event_type.as_str() {
            "MoneyDeposited" => {
                source.balance = (balance + amount) as f64 / 100.0;
                record(event, &source, movement.amount, None)
            }
            "MoneyWithdrawn" | "MoneyTransferred" if amount > balance => Err(Failure::rejected(format!(
                "{} of {} exceeds the balance {} of account {}",
                event.event_type, movement.amount, source.balance, source.account_id
            ))),
            "MoneyWithdrawn" => {
                source.balance = (balance - amount) as f64 / 100.0;
                record(event, &source, movement.amount, None)
            }
            "MoneyTransferred" => {
                let to = movement.to_account_id.ok_or_else(|| Failure::rejected("transfer without toAccountId"))?;
                if to == source.account_id {
                    return record(event, &source, movement.amount, Some(&to));
                }
                let mut target = account(&to)?;
                source.balance = (balance - amount) as f64 / 100.0;
                target.balance = (cents(target.balance) + amount) as f64 / 100.0;
                record(event, &source, -movement.amount, Some(&target.account_id))?;
                record(event, &target, movement.amount, Some(&source.account_id))
            }
            other => Err(Failure::rejected(format!("unexpected event type {other}"))),
        }
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_projection!(AccountBalance);

#[cfg(test)]
mod tests {
    use super::*;
    use refract_sdk::native::{MemoryBackend, with_backend};
    use refract_sdk::testing::event;

    fn apply_all(store: MemoryBackend, events: &[(&str, &str)]) -> (MemoryBackend, Vec<Result<(), Failure>>) {
        let mut results = Vec::new();
        let mut store = store;
        for (offset, (ty, data)) in events.iter().enumerate() {
            let mut e = event("accounts", ty, None, data.as_bytes());
            e.offset = offset as u64;
            let (s, r) = with_backend(store, || AccountBalance::handle(vec![e]));
            store = s;
            results.push(r);
        }
        (store, results)
    }

    fn balance(store: &MemoryBackend, id: &str) -> f64 {
        serde_json::from_slice::<Balance>(store.get("balances", id).unwrap()).unwrap().balance
    }

    #[test]
    fn overdrafts_are_rejected_and_change_nothing() {
        let (store, results) = apply_all(
            MemoryBackend::default(),
            &[
                ("AccountCreated", r#"{"accountId":"a","owner":"Ann"}"#),
                ("MoneyDeposited", r#"{"accountId":"a","amount":10.05}"#),
                ("MoneyWithdrawn", r#"{"accountId":"a","amount":10.06}"#),
                ("MoneyWithdrawn", r#"{"accountId":"a","amount":0.05}"#),
            ],
        );
        assert!(results[2].as_ref().is_err_and(|f| f.to_string().contains("exceeds the balance")));
        assert_eq!(balance(&store, "a"), 10.0);
        assert_eq!(store.table("history").count(), 2);
    }

    #[test]
    fn transfers_move_money_and_record_both_sides() {
        let (store, results) = apply_all(
            MemoryBackend::default(),
            &[
                ("AccountCreated", r#"{"accountId":"a","owner":"Ann"}"#),
                ("AccountCreated", r#"{"accountId":"b","owner":"Bob"}"#),
                ("MoneyDeposited", r#"{"accountId":"a","amount":100}"#),
                ("MoneyTransferred", r#"{"accountId":"a","toAccountId":"b","amount":30.1}"#),
                ("MoneyTransferred", r#"{"accountId":"a","toAccountId":"nobody","amount":1}"#),
            ],
        );
        assert!(results[..4].iter().all(Result::is_ok));
        assert!(results[4].as_ref().is_err_and(|f| f.to_string().contains("unknown account nobody")));
        assert_eq!((balance(&store, "a"), balance(&store, "b")), (69.9, 30.1));
        let entry = store.get("history", "b/00000000000000000003").unwrap();
        assert_eq!(entry, br#"{"type":"MoneyTransferred","amount":30.1,"balanceAfter":30.1,"counterparty":"a"}"#);
    }
}
