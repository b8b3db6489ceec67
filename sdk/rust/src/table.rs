//! Typed key/value tables.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Failure, kv};

/// A key/value table of the projection holding JSON values of type `V`.
///
/// Reads see the current batch's own writes; writes become visible to queries
/// when the batch commits.
pub struct Table<V> {
    name: &'static str,
    _value: PhantomData<fn() -> V>,
}

impl<V> Table<V> {
    /// The table called `name`; declare it in the manifest with [`Manifest::table`](crate::Manifest::table).
    pub const fn new(name: &'static str) -> Self {
        Table { name, _value: PhantomData }
    }

    /// The table's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// Remove `key`; removing an absent key is not an error.
    pub fn delete(&self, key: &str) -> Result<(), Failure> {
        kv::delete(self.name, key)
    }
}

impl<V: Serialize + DeserializeOwned> Table<V> {
    /// The value under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<V>, Failure> {
        match kv::get(self.name, key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Failure::rejected(format!("table {}: value of {key:?} does not decode: {e}", self.name))),
        }
    }

    /// Store `value` under `key`.
    pub fn put(&self, key: &str, value: &V) -> Result<(), Failure> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Failure::rejected(format!("table {}: cannot encode {key:?}: {e}", self.name)))?;
        kv::put(self.name, key, &bytes)
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order,
    /// beginning after `start_after` when given.
    pub fn scan(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<Vec<(String, V)>, Failure> {
        kv::scan(self.name, prefix, start_after, limit)?
            .into_iter()
            .map(|(key, bytes)| {
                let value = serde_json::from_slice(&bytes).map_err(|e| {
                    Failure::rejected(format!("table {}: value of {key:?} does not decode: {e}", self.name))
                })?;
                Ok((key, value))
            })
            .collect()
    }
}
