//! The key/value view a projection works on during one batch.
//!
//! Reads go to the batch's own writes first, then to a snapshot of the last
//! committed state; writes collect in memory, coalesced per key, and reach
//! redb only when the batch commits together with its checkpoint
//! ([`super::ReadModel::commit`]). A failed batch is dropped: nothing to undo.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use redb::{ReadOnlyTable, ReadTransaction};

use super::Result;
use super::read_model::table_definition;
use crate::plugin::bindings::refract::plugin::kv::{Entry, KvError};

/// Bounds on what a plugin may store.
#[derive(Debug, Clone, Copy)]
pub struct KvLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// The most entries one `scan` returns, whatever the plugin asks for.
    pub max_scan: u32,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits { max_key_bytes: 1024, max_value_bytes: 1 << 20, max_scan: 10_000 }
    }
}

type Stored = ReadOnlyTable<&'static str, &'static [u8]>;

/// One batch's key/value state: a committed snapshot plus pending writes.
pub struct Batch {
    snapshot: ReadTransaction,
    /// The tables the projection declared; no others exist for it.
    tables: Arc<BTreeSet<String>>,
    limits: KvLimits,
    /// Tables opened in the snapshot so far (`None`: not created yet).
    opened: HashMap<String, Option<Stored>>,
    /// Pending writes per table: `Some(value)` to put, `None` to delete.
    pub(super) writes: BTreeMap<String, BTreeMap<String, Option<Vec<u8>>>>,
}

impl Batch {
    pub(super) fn new(snapshot: ReadTransaction, tables: Arc<BTreeSet<String>>, limits: KvLimits) -> Self {
        Batch { snapshot, tables, limits, opened: HashMap::new(), writes: BTreeMap::new() }
    }

    /// Number of pending writes (after coalescing).
    pub fn pending_writes(&self) -> usize {
        self.writes.values().map(BTreeMap::len).sum()
    }

    fn check_table(&self, table: &str) -> Result<(), KvError> {
        if self.tables.contains(table) {
            Ok(())
        } else {
            Err(KvError::UnknownTable(format!("table {table:?} is not declared in the manifest")))
        }
    }

    fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.len() > self.limits.max_key_bytes {
            return Err(KvError::TooLarge(format!(
                "key of {} bytes exceeds {} bytes",
                key.len(),
                self.limits.max_key_bytes
            )));
        }
        Ok(())
    }

    fn stored(&mut self, table: &str) -> Result<Option<&Stored>> {
        if !self.opened.contains_key(table) {
            let opened = match self.snapshot.open_table(table_definition(&format!("t/{table}"))) {
                Ok(t) => Some(t),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            self.opened.insert(table.to_owned(), opened);
        }
        Ok(self.opened[table].as_ref())
    }

    /// The value under `key`: this batch's write if any, else the committed one.
    pub fn get(&mut self, table: &str, key: &str) -> Result<Result<Option<Vec<u8>>, KvError>> {
        if let Err(e) = self.check_table(table) {
            return Ok(Err(e));
        }
        if let Some(pending) = self.writes.get(table).and_then(|t| t.get(key)) {
            return Ok(Ok(pending.clone()));
        }
        let Some(stored) = self.stored(table)? else {
            return Ok(Ok(None));
        };
        Ok(Ok(stored.get(key)?.map(|v| v.value().to_vec())))
    }

    /// Store `value` (which must be a JSON document) under `key`.
    pub fn put(&mut self, table: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.check_table(table)?;
        self.check_key(key)?;
        if value.len() > self.limits.max_value_bytes {
            return Err(KvError::TooLarge(format!(
                "value of {} bytes exceeds {} bytes",
                value.len(),
                self.limits.max_value_bytes
            )));
        }
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(value) {
            return Err(KvError::InvalidValue(format!("value of {key:?} is not JSON: {e}")));
        }
        self.writes.entry(table.to_owned()).or_default().insert(key.to_owned(), Some(value.to_vec()));
        Ok(())
    }

    /// Remove `key`.
    pub fn delete(&mut self, table: &str, key: &str) -> Result<(), KvError> {
        self.check_table(table)?;
        self.check_key(key)?;
        self.writes.entry(table.to_owned()).or_default().insert(key.to_owned(), None);
        Ok(())
    }

    /// Entries whose key starts with `prefix`, after `start_after`, at most
    /// `limit` (capped by [`KvLimits::max_scan`]): committed entries merged
    /// with this batch's writes.
    pub fn scan(
        &mut self,
        table: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Result<Vec<Entry>, KvError>> {
        if let Err(e) = self.check_table(table) {
            return Ok(Err(e));
        }
        let limit = limit.min(self.limits.max_scan) as usize;
        let start = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_owned()),
            _ => Bound::Included(prefix.to_owned()),
        };
        self.stored(table)?; // opens the table in the snapshot if it exists
        let stored = self.opened[table].as_ref();
        let empty = BTreeMap::new();
        let pending = self.writes.get(table).unwrap_or(&empty).range::<String, _>((start.clone(), Bound::Unbounded));
        let mut pending = pending.peekable();
        let bounds = match &start {
            Bound::Excluded(s) => (Bound::Excluded(s.as_str()), Bound::Unbounded),
            Bound::Included(s) => (Bound::Included(s.as_str()), Bound::Unbounded),
            Bound::Unbounded => (Bound::Unbounded, Bound::Unbounded),
        };
        let mut committed = match stored {
            Some(t) => Some(t.range::<&str>(bounds)?),
            None => None,
        };
        let mut next_committed = || -> Result<Option<(String, Vec<u8>)>> {
            match committed.as_mut().and_then(Iterator::next) {
                None => Ok(None),
                Some(entry) => {
                    let (k, v) = entry?;
                    Ok(Some((k.value().to_owned(), v.value().to_vec())))
                }
            }
        };
        let mut head = next_committed()?;
        let mut out = Vec::new();
        while out.len() < limit {
            let take_pending = match (pending.peek(), &head) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((pk, _)), Some((ck, _))) => pk.as_str() <= ck.as_str(),
            };
            let (key, value) = if take_pending {
                let (k, v) = pending.next().expect("peeked");
                if head.as_ref().is_some_and(|(ck, _)| ck == k) {
                    head = next_committed()?; // overwritten or deleted in this batch
                }
                (k.clone(), v.clone())
            } else {
                let entry = head.take().expect("checked");
                head = next_committed()?;
                (entry.0, Some(entry.1))
            };
            if !key.starts_with(prefix) {
                break;
            }
            if let Some(value) = value {
                out.push(Entry { key, value });
            }
        }
        Ok(Ok(out))
    }
}
