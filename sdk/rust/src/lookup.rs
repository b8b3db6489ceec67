//! Read-only access to other projections' tables: reference data for enrichment.
//!
//! A lookup sees the other projection's committed, live read model as it is
//! now (not as it was when the event happened).

use serde::de::DeserializeOwned;

use crate::Failure;
pub use crate::wit::refract::plugin::lookup::LookupError;

/// The raw value under `key` in `table` of `projection`. A projection that
/// is not running is a transient failure (it may be starting: the batch is
/// retried); a table it does not declare rejects the event.
pub fn get_raw(projection: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, Failure> {
    crate::host::lookup(projection, table, key).map_err(|e| match e {
        LookupError::UnknownProjection(m) => Failure::Transient(format!("lookup in {projection}: {m}")),
        LookupError::UnknownTable(m) => Failure::Rejected(format!("lookup in {projection}: {m}")),
    })
}

/// The value under `key` in `table` of `projection`, decoded from JSON.
pub fn get<V: DeserializeOwned>(projection: &str, table: &str, key: &str) -> Result<Option<V>, Failure> {
    match get_raw(projection, table, key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Failure::rejected(format!("lookup in {projection}/{table}: value of {key:?} does not decode: {e}"))
        }),
    }
}
