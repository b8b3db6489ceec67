//! Raw key/value access: byte values, as the WIT `kv` interface has them.
//! Prefer [`Table`](crate::Table), which encodes values as JSON.
//!
//! In WebAssembly, `put` and `delete` only append to the batch's pending
//! writes, held in the plugin; they go to the host with the next `get` (one
//! crossing of the sandbox boundary for both), before a `scan`, and when the
//! batch ends (`kv-packed` in the WIT). So a write the host refuses (an
//! undeclared table, a value that is not JSON or too large) fails the batch
//! at the next read or at its end rather than at the call; the runtime then
//! isolates the event that made it, as for any rejected event.

use crate::Failure;
use crate::host;
pub use crate::wit::refract::plugin::kv::KvError;

fn failure(table: &str, error: KvError) -> Failure {
    let message = match error {
        KvError::UnknownTable(m) | KvError::InvalidValue(m) | KvError::TooLarge(m) => m,
    };
    Failure::Rejected(format!("table {table}: {message}"))
}

/// The batch's writes not yet sent, packed (`crate::packed::write_kv`).
#[cfg(target_arch = "wasm32")]
mod pending {
    use std::cell::RefCell;

    use crate::Failure;
    use crate::wit::refract::plugin::kv_packed::RefusedWrite;

    /// Past this many bytes the writes are sent without waiting for a
    /// read, so that a batch of any size keeps the plugin's memory bounded.
    const SEND_AT: usize = 1 << 20;

    thread_local! {
        static WRITES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn write(table: &str, key: &str, value: Option<&[u8]>) -> Result<(), Failure> {
        let full = WRITES.with_borrow_mut(|log| {
            crate::packed::write_kv(log, table, key, value);
            log.len() >= SEND_AT
        });
        if full { send() } else { Ok(()) }
    }

    /// Call `f` with the pending writes, which it sends to the host, and
    /// forget them (`f` is not called when there are none: `None`).
    pub(super) fn take<R>(f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        WRITES.with_borrow_mut(|log| {
            if log.is_empty() {
                return None;
            }
            let result = f(log);
            log.clear();
            Some(result)
        })
    }

    pub(super) fn send() -> Result<(), Failure> {
        let sent = take(|log| crate::wit::refract::plugin::kv_packed::apply(log).map_err(|r| refused(log, r)));
        sent.unwrap_or(Ok(()))
    }

    pub(super) fn clear() {
        WRITES.with_borrow_mut(Vec::clear);
    }

    /// The failure of the pending write of `log` the host refused.
    pub(super) fn refused(log: &[u8], refused: RefusedWrite) -> Failure {
        let mut seen = 0;
        let mut write = (String::new(), String::new());
        let _ = crate::packed::read_kv(log, |table, key, _| {
            if seen < refused.index {
                seen += 1;
                return Ok(());
            }
            write = (table.to_owned(), key.to_owned());
            Err(())
        });
        let (table, key) = write;
        match super::failure(&table, refused.error) {
            Failure::Rejected(m) => Failure::Rejected(format!("{m} (writing {key:?})")),
            other => other,
        }
    }
}

/// The end of a batch: send its pending writes (`Ok`) or forget them
/// (`Err`: the host rolls the batch back). Called by the export macros.
#[doc(hidden)]
pub fn finish_batch<R>(result: Result<R, Failure>) -> Result<R, Failure> {
    #[cfg(target_arch = "wasm32")]
    match &result {
        Ok(_) => pending::send()?,
        Err(_) => pending::clear(),
    }
    result
}

/// The value under `key` in `table`.
pub fn get(table: &str, key: &str) -> Result<Option<Vec<u8>>, Failure> {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::wit::refract::plugin::kv_packed::{self, PackedError};
        let sent = pending::take(|writes| {
            kv_packed::get(writes, table, key).map_err(|e| match e {
                PackedError::Write(refused) => pending::refused(writes, refused),
                PackedError::Read(e) => failure(table, e),
            })
        });
        if let Some(result) = sent {
            return result;
        }
    }
    host::get(table, key).map_err(|e| failure(table, e))
}

/// Store a JSON document under `key` in `table`.
pub fn put(table: &str, key: &str, value: &[u8]) -> Result<(), Failure> {
    #[cfg(target_arch = "wasm32")]
    return pending::write(table, key, Some(value));
    #[cfg(not(target_arch = "wasm32"))]
    host::put(table, key, value).map_err(|e| failure(table, e))
}

/// Remove `key` from `table`.
pub fn delete(table: &str, key: &str) -> Result<(), Failure> {
    #[cfg(target_arch = "wasm32")]
    return pending::write(table, key, None);
    #[cfg(not(target_arch = "wasm32"))]
    host::delete(table, key).map_err(|e| failure(table, e))
}

/// Entries of `table` whose key starts with `prefix`, after `start_after`, at most `limit`.
pub fn scan(
    table: &str,
    prefix: &str,
    start_after: Option<&str>,
    limit: u32,
) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    #[cfg(target_arch = "wasm32")]
    pending::send()?;
    host::scan(table, prefix, start_after, limit)
        .map(|entries| entries.into_iter().map(|e| (e.key, e.value)).collect())
        .map_err(|e| failure(table, e))
}
