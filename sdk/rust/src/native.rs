//! Run projections natively, outside WebAssembly.
//!
//! On `wasm32` targets the SDK's key/value calls go to the Refract host through
//! WIT imports. Everywhere else they go to the [`Backend`] installed with
//! [`with_backend`]: a [`MemoryBackend`] in a plugin's unit tests, or the
//! runtime's own batch store when the host runs a projection compiled
//! natively (its baseline in benchmarks).

use std::any::Any;
use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::Level;
use crate::wit::refract::plugin::emit::{EmitError, Outgoing};
use crate::wit::refract::plugin::kv::{Entry, KvError};
use crate::wit::refract::plugin::lookup::LookupError;
use crate::wit::refract::plugin::search::SearchError;

/// Storage behind the SDK's key/value calls when running natively.
pub trait Backend: Any {
    /// The value under `key` in `table`.
    fn get(&mut self, table: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Store `value` under `key` in `table`.
    fn put(&mut self, table: &str, key: &str, value: &[u8]) -> Result<(), KvError>;
    /// Remove `key` from `table`.
    fn delete(&mut self, table: &str, key: &str) -> Result<(), KvError>;
    /// Entries with keys starting with `prefix`, after `start_after`, at most `limit`.
    fn scan(&mut self, table: &str, prefix: &str, start_after: Option<&str>, limit: u32)
    -> Result<Vec<Entry>, KvError>;
    /// Index `document` under `id` in `index`.
    fn search_upsert(&mut self, index: &str, id: &str, document: &[u8]) -> Result<(), SearchError>;
    /// Remove `id` from `index`.
    fn search_delete(&mut self, index: &str, id: &str) -> Result<(), SearchError>;
    /// Publish `event` to `stream` when the batch commits.
    fn emit(&mut self, stream: &str, event: Outgoing) -> Result<(), EmitError>;
    /// A message from the projection.
    fn log(&mut self, level: Level, message: &str) {
        let _ = (level, message);
    }
    /// The value under `key` in `table` of another projection.
    fn lookup(&mut self, projection: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, LookupError> {
        let _ = (table, key);
        Err(LookupError::UnknownProjection(format!("no projection {projection:?} in this backend")))
    }
    /// The plugin's setting `name`.
    fn setting(&mut self, name: &str) -> Option<String> {
        let _ = name;
        None
    }
}

thread_local! {
    static BACKEND: RefCell<Option<Box<dyn Backend>>> = const { RefCell::new(None) };
}

/// Run `f` with `backend` serving the SDK's key/value calls on this thread,
/// then hand the backend back with `f`'s result.
///
/// # Panics
/// If called again from inside `f` (backends do not nest).
pub fn with_backend<B: Backend, R>(backend: B, f: impl FnOnce() -> R) -> (B, R) {
    BACKEND.with(|slot| {
        let mut slot = slot.borrow_mut();
        assert!(slot.is_none(), "refract_sdk::native::with_backend does not nest");
        *slot = Some(Box::new(backend));
    });
    // Take the backend back even if `f` panics, so the thread stays usable.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            BACKEND.with(|slot| slot.borrow_mut().take());
        }
    }
    let reset = Reset;
    let result = f();
    let backend = BACKEND.with(|slot| slot.borrow_mut().take()).expect("backend installed above");
    drop(reset);
    let backend: Box<dyn Any> = backend;
    (*backend.downcast::<B>().expect("the backend installed above"), result)
}

#[cfg(not(target_arch = "wasm32"))]
fn with<R>(f: impl FnOnce(&mut dyn Backend) -> R) -> R {
    BACKEND.with(|slot| {
        let mut slot = slot.borrow_mut();
        let backend = slot
            .as_deref_mut()
            .expect("no refract_sdk::native backend: call the projection inside native::with_backend");
        f(backend)
    })
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn get(table: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
    with(|b| b.get(table, key))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn put(table: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
    with(|b| b.put(table, key, value))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn delete(table: &str, key: &str) -> Result<(), KvError> {
    with(|b| b.delete(table, key))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn scan(table: &str, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<Vec<Entry>, KvError> {
    with(|b| b.scan(table, prefix, start_after, limit))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod search {
    use super::{SearchError, with};

    pub(crate) fn upsert(index: &str, id: &str, document: &[u8]) -> Result<(), SearchError> {
        with(|b| b.search_upsert(index, id, document))
    }

    pub(crate) fn delete(index: &str, id: &str) -> Result<(), SearchError> {
        with(|b| b.search_delete(index, id))
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn lookup(projection: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, LookupError> {
    with(|b| b.lookup(projection, table, key))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn setting(name: &str) -> Option<String> {
    with(|b| b.setting(name))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn emit(stream: &str, event: &Outgoing) -> Result<(), EmitError> {
    with(|b| b.emit(stream, event.clone()))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn log(level: Level, message: &str) {
    with(|b| b.log(level, message))
}

/// An in-memory [`Backend`] for unit tests of projections: every table and index exists.
#[derive(Debug, Default, Clone)]
pub struct MemoryBackend {
    tables: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    indexes: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Messages logged by the projection, in order.
    pub logs: Vec<(Level, String)>,
    /// Events the projection emitted, with their streams, in order.
    pub emitted: Vec<(String, Outgoing)>,
    /// Other projections' tables for lookups: projection → table → key → value.
    pub lookups: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
    /// The plugin's settings.
    pub settings: BTreeMap<String, String>,
}

impl MemoryBackend {
    /// The raw value under `key` in `table`.
    pub fn get(&self, table: &str, key: &str) -> Option<&[u8]> {
        self.tables.get(table)?.get(key).map(Vec::as_slice)
    }

    /// The document `id` of `index`.
    pub fn document(&self, index: &str, id: &str) -> Option<&[u8]> {
        self.indexes.get(index)?.get(id).map(Vec::as_slice)
    }

    /// Every entry of `table`, in key order.
    pub fn table(&self, table: &str) -> impl Iterator<Item = (&str, &[u8])> {
        self.tables.get(table).into_iter().flatten().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

impl Backend for MemoryBackend {
    fn get(&mut self, table: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(MemoryBackend::get(self, table, key).map(<[u8]>::to_vec))
    }

    fn put(&mut self, table: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.tables.entry(table.to_owned()).or_default().insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, table: &str, key: &str) -> Result<(), KvError> {
        if let Some(t) = self.tables.get_mut(table) {
            t.remove(key);
        }
        Ok(())
    }

    fn scan(
        &mut self,
        table: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Entry>, KvError> {
        let Some(t) = self.tables.get(table) else {
            return Ok(Vec::new());
        };
        let start = match start_after {
            Some(after) if after >= prefix => std::ops::Bound::Excluded(after.to_owned()),
            _ => std::ops::Bound::Included(prefix.to_owned()),
        };
        Ok(t.range((start, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit as usize)
            .map(|(k, v)| Entry { key: k.clone(), value: v.clone() })
            .collect())
    }

    fn search_upsert(&mut self, index: &str, id: &str, document: &[u8]) -> Result<(), SearchError> {
        self.indexes.entry(index.to_owned()).or_default().insert(id.to_owned(), document.to_vec());
        Ok(())
    }

    fn search_delete(&mut self, index: &str, id: &str) -> Result<(), SearchError> {
        if let Some(i) = self.indexes.get_mut(index) {
            i.remove(id);
        }
        Ok(())
    }

    fn emit(&mut self, stream: &str, event: Outgoing) -> Result<(), EmitError> {
        self.emitted.push((stream.to_owned(), event));
        Ok(())
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_owned()));
    }

    fn lookup(&mut self, projection: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, LookupError> {
        let Some(tables) = self.lookups.get(projection) else {
            return Err(LookupError::UnknownProjection(format!("no projection {projection:?}")));
        };
        let Some(table) = tables.get(table) else {
            return Err(LookupError::UnknownTable(format!("{projection} has no table {table:?}")));
        };
        Ok(table.get(key).cloned())
    }

    fn setting(&mut self, name: &str) -> Option<String> {
        self.settings.get(name).cloned()
    }
}
