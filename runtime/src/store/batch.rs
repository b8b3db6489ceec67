//! The key/value view a projection works on during one batch.
//!
//! Three layers, newest first: the batch's own writes; the writes of the
//! previous batch while its commit is still in flight (the projector commits
//! one batch while the next one runs); and a redb snapshot of the last
//! committed state. Writes collect in memory, coalesced per key, and reach
//! redb only when the batch commits together with its checkpoint
//! ([`super::ReadModel::commit`]). A failed batch is dropped: nothing to undo.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, OnceLock};

use redb::{ReadOnlyTable, ReadTransaction};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::Result;
use super::search::IndexSchema;
use super::tables::open_plugin_table;
use crate::wit::{EmitError, Entry, KvError, Outgoing, SearchError};

/// Bounds on what a plugin may store.
#[derive(Debug, Clone, Copy)]
pub struct KvLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// The most entries one `scan` returns, whatever the plugin asks for.
    pub max_scan: u32,
    /// The most events one batch may emit.
    pub max_emits: usize,
    /// The largest `data` the embedded log accepts (`streams.max-event-bytes`):
    /// an emitted event must be one the log would take.
    pub max_event_bytes: usize,
    /// The most bytes one batch may hold in writes, search documents and
    /// emitted events (`limits.max-batch-mb`): past it the call traps.
    pub max_batch_bytes: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_scan: 10_000,
            max_emits: 100_000,
            max_event_bytes: 1 << 20,
            max_batch_bytes: 256 << 20,
        }
    }
}

/// An event a projection emitted: stored with its batch, published after it commits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Emitted {
    pub stream: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub key: Option<String>,
    pub time: i64,
    pub headers: Vec<(String, String)>,
    /// The payload, a JSON document.
    pub data: Box<RawValue>,
    /// Which partition's events emitted it, and its place among everything
    /// they emitted: set for a partitioned projection's shards, whose calls
    /// never mix partitions. Every copy of a shard numbers its emits alike
    /// (for a plugin whose emits follow from its partition's events), so
    /// the new owner of a shard knows which of its emits the old one
    /// published (`sink::handover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// Where an emitted event comes from: the `ordinal`-th event emitted for
/// the events of `stream`'s partition `partition` (from 1, assigned at commit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub stream: String,
    pub partition: u32,
    pub ordinal: u64,
}

/// One layer of a scan: (key, value or deletion) in key order.
type Layer<'a> = Box<dyn Iterator<Item = std::result::Result<(String, Option<Vec<u8>>), redb::StorageError>> + 'a>;

type Stored = ReadOnlyTable<&'static str, &'static [u8]>;

/// Writes per table (or index).
pub type Writes = BTreeMap<String, KeyWrites>;

/// The bytes a write's value holds (a deletion: none).
fn size(value: &Option<Vec<u8>>) -> isize {
    value.as_ref().map_or(0, Vec::len) as isize
}

/// One table's (or index's) writes in a batch: each key's latest value, or
/// `None` where it was removed.
///
/// Every `get` and `put` of a batch looks a key up here (and in the previous
/// batch's writes), tens of thousands of keys deep while a projection
/// catches up: an ordered map paid a string comparison per level of its
/// tree, and `memcmp` was 16 % of the projector thread. So keys are hashed,
/// and their order is built only when a scan needs it (then kept up to date)
/// or the commit writes them out.
#[derive(Debug, Default)]
pub struct KeyWrites {
    /// foldhash rather than std's SipHash: a few times faster on short keys
    /// (SipHash was ~5 % of the projector thread), still seeded per process.
    values: HashMap<String, Option<Vec<u8>>, foldhash::fast::RandomState>,
    /// The keys in order, once a scan asked for them.
    order: OnceLock<BTreeSet<String>>,
}

impl KeyWrites {
    pub fn get(&self, key: &str) -> Option<&Option<Vec<u8>>> {
        self.values.get(key)
    }

    /// Record `value` for `key` (`None`: removed). Returns how many bytes
    /// the writes hold more than before (less, when negative).
    pub fn insert(&mut self, key: String, value: Option<Vec<u8>>) -> isize {
        match self.values.entry(key) {
            std::collections::hash_map::Entry::Occupied(slot) => {
                let slot = slot.into_mut();
                let grown = size(&value) - size(slot);
                *slot = value;
                grown
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                if let Some(order) = self.order.get_mut() {
                    order.insert(slot.key().clone());
                }
                let grown = (slot.key().len() as isize) + size(&value);
                slot.insert(value);
                grown
            }
        }
    }

    /// [`KeyWrites::insert`] without allocating the key when it is already there.
    fn set(&mut self, key: &str, value: Option<Vec<u8>>) -> isize {
        match self.values.get_mut(key) {
            Some(slot) => {
                let grown = size(&value) - size(slot);
                *slot = value;
                grown
            }
            None => self.insert(key.to_owned(), value),
        }
    }

    /// The writes from `start` on, in key order.
    pub fn range<'a>(&'a self, start: Bound<&str>) -> impl Iterator<Item = (&'a String, &'a Option<Vec<u8>>)> + 'a {
        let order = self.order.get_or_init(|| self.values.keys().cloned().collect());
        order.range::<str, _>((start, Bound::Unbounded)).map(|key| (key, &self.values[key]))
    }

    /// Every write, in key order (for the commit: redb takes sorted keys best).
    pub fn sorted(&self) -> Vec<(&String, &Option<Vec<u8>>)> {
        match self.order.get() {
            Some(order) => order.iter().map(|key| (key, &self.values[key])).collect(),
            None => {
                let mut all: Vec<_> = self.values.iter().collect();
                all.sort_unstable_by(|a, b| a.0.cmp(b.0));
                all
            }
        }
    }
}

/// Everything a batch wrote: key/value tables and search documents.
#[derive(Debug, Default)]
pub struct BatchWrites {
    pub kv: Writes,
    /// Documents per index and id (`None`: deleted).
    pub docs: Writes,
    /// Events to publish, in the order they were emitted.
    pub emitted: Vec<Emitted>,
    /// Per source partition, emits of replayed history: dropped, but
    /// numbered (they come before the partition's emits in `emitted`), so
    /// that a generation numbers its emits alike whichever event it started
    /// emitting at (copies of a shard switch generations at different points).
    pub history_emits: BTreeMap<(String, u32), u64>,
    /// Enricher outputs no route took.
    pub unrouted: u64,
}

/// What a projection declared: the only tables and indexes that exist for it.
#[derive(Default)]
pub struct Declared {
    pub tables: BTreeSet<String>,
    pub indexes: BTreeMap<String, IndexSchema>,
}

/// One batch's key/value state: a committed snapshot plus pending writes.
pub struct Batch {
    snapshot: ReadTransaction,
    /// The tables and indexes the projection declared; no others exist for it.
    declared: Arc<Declared>,
    limits: KvLimits,
    /// Tables opened in the snapshot so far (`None`: not created yet).
    opened: HashMap<String, Option<Stored>, foldhash::fast::RandomState>,
    /// The previous batch's writes while its commit is in flight.
    below: Option<Arc<BatchWrites>>,
    /// This batch's key/value writes.
    writes: Writes,
    /// This batch's search documents.
    docs: Writes,
    /// This batch's emitted events.
    emitted: Vec<Emitted>,
    /// Emits of history dropped, per source partition (see [`BatchWrites`]).
    history_emits: BTreeMap<(String, u32), u64>,
    /// Enricher outputs no route took.
    unrouted: u64,
    /// Replaying history: emitted events are dropped (they were published
    /// when the history was new).
    replaying: bool,
    /// The partition whose events the current call handles, when emits
    /// are numbered per partition (a shard's).
    source: Option<(String, u32)>,
    /// Bytes this batch holds in writes, documents and emitted events.
    held: usize,
    /// Set once a write would take `held` past `max_batch_bytes`: the batch
    /// is over its budget, and the host traps the call.
    over_budget: Option<String>,
}

impl Batch {
    pub(super) fn new(
        snapshot: ReadTransaction,
        below: Option<Arc<BatchWrites>>,
        declared: Arc<Declared>,
        limits: KvLimits,
    ) -> Self {
        Batch {
            snapshot,
            declared,
            limits,
            opened: HashMap::default(),
            below,
            writes: BTreeMap::new(),
            docs: BTreeMap::new(),
            emitted: Vec::new(),
            history_emits: BTreeMap::new(),
            unrouted: 0,
            replaying: false,
            source: None,
            held: 0,
            over_budget: None,
        }
    }

    /// Why the batch went over its byte budget, if it did.
    pub fn over_budget(&self) -> Option<&str> {
        self.over_budget.as_deref()
    }

    /// Room for `bytes` more in the batch's budget, or the error that refuses them.
    fn budget(&mut self, bytes: usize) -> Result<(), String> {
        if let Some(why) = &self.over_budget {
            return Err(why.clone());
        }
        if self.held.saturating_add(bytes) <= self.limits.max_batch_bytes {
            return Ok(());
        }
        let why = format!(
            "the batch would hold more than {} MiB of writes, documents and emitted events (limits.max-batch-mb)",
            self.limits.max_batch_bytes >> 20
        );
        self.over_budget = Some(why.clone());
        Err(why)
    }

    fn hold(&mut self, grown: isize) {
        self.held = self.held.saturating_add_signed(grown);
    }

    /// The batch's writes, to commit.
    pub fn into_writes(self) -> BatchWrites {
        BatchWrites {
            kv: self.writes,
            docs: self.docs,
            emitted: self.emitted,
            history_emits: self.history_emits,
            unrouted: self.unrouted,
        }
    }

    /// Drop what this batch emits: it replays history.
    pub fn set_replaying(&mut self, replaying: bool) {
        self.replaying = replaying;
    }

    /// Number what the next call emits among the emits of `source`'s
    /// events (`None`: not numbered).
    pub fn set_source(&mut self, source: Option<(&str, u32)>) {
        self.source = source.map(|(s, p)| (s.to_owned(), p));
    }

    /// Count an enricher output that no route took.
    pub fn count_unrouted(&mut self) {
        self.unrouted += 1;
    }

    /// Publish `event` to `stream` once the batch commits.
    pub fn emit(&mut self, stream: &str, event: Outgoing) -> Result<(), EmitError> {
        crate::names::validate("stream", stream).map_err(EmitError::InvalidStream)?;
        if event.key.as_ref().is_some_and(|k| k.is_empty() || k.len() > self.limits.max_key_bytes) {
            return Err(EmitError::InvalidEvent(format!("a key must be 1 to {} bytes", self.limits.max_key_bytes)));
        }
        if event.data.len() > self.limits.max_value_bytes {
            return Err(EmitError::TooLarge(format!(
                "event data of {} bytes exceeds {} bytes",
                event.data.len(),
                self.limits.max_value_bytes
            )));
        }
        let headers = event.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        crate::event::check_event(
            &event.event_type,
            event.key.as_deref(),
            headers,
            event.data.len(),
            self.limits.max_event_bytes,
        )
        .map_err(EmitError::InvalidEvent)?;
        if self.emitted.len() >= self.limits.max_emits {
            return Err(EmitError::TooLarge(format!("a batch may emit at most {} events", self.limits.max_emits)));
        }
        let size = stream.len()
            + event.event_type.len()
            + event.key.as_ref().map_or(0, String::len)
            + event.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + event.data.len();
        self.budget(size).map_err(EmitError::TooLarge)?;
        let data = String::from_utf8(event.data)
            .ok()
            .and_then(|text| RawValue::from_string(text).ok())
            .ok_or_else(|| EmitError::InvalidEvent("event data must be a JSON document".into()))?;
        if self.replaying {
            if let Some(source) = &self.source {
                *self.history_emits.entry(source.clone()).or_default() += 1;
            }
        } else {
            self.hold(size as isize);
            self.emitted.push(Emitted {
                stream: stream.to_owned(),
                event_type: event.event_type,
                key: event.key,
                time: event.time,
                headers: event.headers,
                data,
                origin: self.source.as_ref().map(|(s, p)| Origin { stream: s.clone(), partition: *p, ordinal: 0 }),
            });
        }
        Ok(())
    }

    /// Index `document` under `id` in `index`, after checking it against the mapping.
    pub fn search_upsert(&mut self, index: &str, id: &str, document: &[u8]) -> Result<(), SearchError> {
        let Some(schema) = self.declared.indexes.get(index) else {
            return Err(SearchError::UnknownIndex(format!("index {index:?} is not declared by the plugin")));
        };
        if id.is_empty() || id.len() > self.limits.max_key_bytes {
            return Err(SearchError::TooLarge(format!("an id must be 1 to {} bytes", self.limits.max_key_bytes)));
        }
        if document.len() > self.limits.max_value_bytes {
            return Err(SearchError::TooLarge(format!(
                "document of {} bytes exceeds {} bytes",
                document.len(),
                self.limits.max_value_bytes
            )));
        }
        schema.validate(document).map_err(|e| SearchError::InvalidDocument(format!("document {id:?}: {e}")))?;
        self.budget(id.len() + document.len()).map_err(SearchError::TooLarge)?;
        let grown = entry(&mut self.docs, index).set(id, Some(document.to_vec()));
        self.hold(grown);
        Ok(())
    }

    /// Remove the document `id` from `index`.
    pub fn search_delete(&mut self, index: &str, id: &str) -> Result<(), SearchError> {
        if !self.declared.indexes.contains_key(index) {
            return Err(SearchError::UnknownIndex(format!("index {index:?} is not declared by the plugin")));
        }
        self.budget(id.len()).map_err(SearchError::TooLarge)?;
        let grown = entry(&mut self.docs, index).set(id, None);
        self.hold(grown);
        Ok(())
    }

    fn check_table(&self, table: &str) -> Result<(), KvError> {
        if self.declared.tables.contains(table) {
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
            let opened = open_plugin_table(&self.snapshot, table)?;
            self.opened.insert(table.to_owned(), opened);
        }
        Ok(self.opened[table].as_ref())
    }

    /// The value under `key`: this batch's write if any, else the committed one.
    pub fn get(&mut self, table: &str, key: &str) -> Result<Result<Option<Vec<u8>>, KvError>> {
        if let Err(e) = self.check_table(table) {
            return Ok(Err(e));
        }
        let layers = [Some(&self.writes), self.below.as_deref().map(|b| &b.kv)];
        if let Some(pending) = layers.into_iter().flatten().find_map(|w| w.get(table).and_then(|t| t.get(key))) {
            return Ok(Ok(pending.clone()));
        }
        let Some(stored) = self.stored(table)? else {
            return Ok(Ok(None));
        };
        Ok(Ok(stored.get(key)?.map(|v| v.value().to_vec())))
    }

    fn table_writes(&mut self, table: &str) -> &mut KeyWrites {
        entry(&mut self.writes, table)
    }

    /// Store `value` (which must be a JSON document) under `key`.
    pub fn put(&mut self, table: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.check_put(table, key, value)?;
        self.budget(key.len() + value.len()).map_err(KvError::TooLarge)?;
        let grown = self.table_writes(table).set(key, Some(value.to_vec()));
        self.hold(grown);
        Ok(())
    }

    /// [`Batch::put`] of a key and value the caller owns (no copies).
    pub fn put_owned(&mut self, table: &str, key: String, value: Vec<u8>) -> Result<(), KvError> {
        self.check_put(table, &key, &value)?;
        self.budget(key.len() + value.len()).map_err(KvError::TooLarge)?;
        let grown = self.table_writes(table).insert(key, Some(value));
        self.hold(grown);
        Ok(())
    }

    /// What `put` requires: a declared table, a key and a JSON value within the limits.
    fn check_put(&self, table: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
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
        Ok(())
    }

    /// Remove `key`.
    pub fn delete(&mut self, table: &str, key: &str) -> Result<(), KvError> {
        self.check_table(table)?;
        self.check_key(key)?;
        self.budget(key.len()).map_err(KvError::TooLarge)?;
        let grown = self.table_writes(table).set(key, None);
        self.hold(grown);
        Ok(())
    }

    /// Entries whose key starts with `prefix`, after `start_after`, at most
    /// `limit` (capped by [`KvLimits::max_scan`]): the layers merged in key
    /// order, the newest layer winning for a key.
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
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        self.stored(table)?; // opens the table in the snapshot if it exists
        fn in_memory<'a>(writes: Option<&'a Writes>, table: &str, start: Bound<&str>) -> Layer<'a> {
            let range = writes.and_then(|w| w.get(table)).map(|t| t.range(start));
            Box::new(range.into_iter().flatten().map(|(k, v)| Ok((k.clone(), v.clone()))))
        }
        let stored: Layer<'_> = match self.opened[table].as_ref() {
            None => Box::new(std::iter::empty()),
            Some(t) => Box::new(t.range::<&str>((start, Bound::Unbounded))?.map(|entry| {
                let (k, v) = entry?;
                Ok((k.value().to_owned(), Some(v.value().to_vec())))
            })),
        };
        // Newest first: the first layer holding a key decides its value.
        let mut layers: Vec<std::iter::Peekable<Layer<'_>>> = vec![
            in_memory(Some(&self.writes), table, start).peekable(),
            in_memory(self.below.as_deref().map(|b| &b.kv), table, start).peekable(),
            stored.peekable(),
        ];
        let mut out = Vec::new();
        while out.len() < limit {
            let mut smallest: Option<String> = None;
            for layer in &mut layers {
                match layer.peek() {
                    Some(Ok((k, _))) if smallest.as_ref().is_none_or(|s| k < s) => smallest = Some(k.clone()),
                    Some(Err(_)) => return Err(layer.next().expect("peeked").expect_err("peeked an error").into()),
                    _ => {}
                }
            }
            let Some(key) = smallest else { break };
            if !key.starts_with(prefix) {
                break;
            }
            let mut value = None;
            for layer in &mut layers {
                if matches!(layer.peek(), Some(Ok((k, _))) if *k == key) {
                    let (_, v) = layer.next().expect("peeked").expect("peeked a value");
                    value.get_or_insert(v);
                }
            }
            if let Some(Some(value)) = value {
                out.push(Entry { key, value });
            }
        }
        Ok(Ok(out))
    }
}

/// The writes of `name`, created on first use (looked up first: most writes go
/// to a table already written, and this avoids allocating its name again).
fn entry<'a>(writes: &'a mut Writes, name: &str) -> &'a mut KeyWrites {
    if !writes.contains_key(name) {
        writes.insert(name.to_owned(), KeyWrites::default());
    }
    writes.get_mut(name).expect("inserted above")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<'a>(it: impl Iterator<Item = (&'a String, &'a Option<Vec<u8>>)>) -> Vec<(&'a str, Option<u8>)> {
        it.map(|(k, v)| (k.as_str(), v.as_ref().map(|v| v[0]))).collect()
    }

    #[test]
    fn key_writes_find_by_key_and_keep_key_order_once_scanned() {
        let mut w = KeyWrites::default();
        for (k, v) in [("c", Some(3)), ("a", Some(1)), ("b", None), ("a", Some(9))] {
            w.set(k, v.map(|v| vec![v]));
        }
        assert_eq!(w.get("a"), Some(&Some(vec![9])), "the latest write wins");
        assert_eq!(w.get("b"), Some(&None));
        assert_eq!(w.get("z"), None);
        assert_eq!(keys(w.sorted().into_iter()), [("a", Some(9)), ("b", None), ("c", Some(3))]);
        assert_eq!(keys(w.range(Bound::Excluded("a"))), [("b", None), ("c", Some(3))]);
        // Written after the order was built: still in order, and once.
        w.set("aa", Some(vec![4]));
        w.set("c", None);
        w.insert("0".to_owned(), Some(vec![5]));
        assert_eq!(
            keys(w.range(Bound::Included(""))),
            [("0", Some(5)), ("a", Some(9)), ("aa", Some(4)), ("b", None), ("c", None)]
        );
        assert_eq!(keys(w.sorted().into_iter()), keys(w.range(Bound::Unbounded)));
        assert_eq!(w.sorted().len(), 5);
    }
}

/// The overlay at the core of exactly-once: a batch reads its own writes,
/// then the previous batch's while that one commits, then the file. Random
/// puts, deletes, gets and scans against a `BTreeMap`, as redb fuzzes
/// itself against one, with commits landing in pipeline order.
#[cfg(test)]
mod overlay_model {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::{BatchWrites, Declared, KvLimits};
    use crate::store::ReadModel;
    use crate::store::read_model::Commit;

    type Overlay = BTreeMap<String, Option<Vec<u8>>>;

    fn apply(map: &mut BTreeMap<String, Vec<u8>>, overlay: &Overlay) {
        for (k, v) in overlay {
            match v {
                Some(v) => map.insert(k.clone(), v.clone()),
                None => map.remove(k),
            };
        }
    }

    #[test]
    fn the_batch_overlay_agrees_with_a_map_under_random_puts_deletes_gets_and_scans() {
        let dir = tempfile::tempdir().unwrap();
        let read_model = ReadModel::open(&dir.path().join("rm.redb")).unwrap();
        let declared = Arc::new(Declared { tables: ["t".to_owned()].into(), ..Declared::default() });
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut random = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        // What the file holds, and the batch whose commit is in flight.
        let mut committed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut in_flight: Option<(Arc<BatchWrites>, Overlay)> = None;
        let (mut gets, mut scans) = (0, 0);
        for round in 0..400 {
            let lower = in_flight.as_ref().map(|(w, _)| w.clone());
            let mut batch = read_model.begin(declared.clone(), KvLimits::default(), lower).unwrap();
            let mut model = committed.clone();
            if let Some((_, overlay)) = &in_flight {
                apply(&mut model, overlay);
            }
            let mut mine = Overlay::new();
            for op in 0..random(40) {
                let key = format!("k{:02}", random(60));
                let context = format!("round {round}, op {op}");
                match random(10) {
                    0..=3 => {
                        let value = random(1000).to_string().into_bytes();
                        batch.put("t", &key, &value).unwrap();
                        model.insert(key.clone(), value.clone());
                        mine.insert(key, Some(value));
                    }
                    4 | 5 => {
                        batch.delete("t", &key).unwrap();
                        model.remove(&key);
                        mine.insert(key, None);
                    }
                    6 | 7 => {
                        gets += 1;
                        assert_eq!(
                            batch.get("t", &key).unwrap().unwrap(),
                            model.get(&key).cloned(),
                            "{context}: {key}"
                        );
                    }
                    _ => {
                        scans += 1;
                        let prefix = ["", "k", "k1", "k2", "k5"][random(5) as usize];
                        let after = (random(3) == 0).then(|| format!("k{:02}", random(60)));
                        let limit = 1 + random(25) as u32;
                        let got: Vec<(String, Vec<u8>)> = batch
                            .scan("t", prefix, after.as_deref(), limit)
                            .unwrap()
                            .unwrap()
                            .into_iter()
                            .map(|e| (e.key, e.value))
                            .collect();
                        let want: Vec<(String, Vec<u8>)> = model
                            .iter()
                            .filter(|(k, _)| k.starts_with(prefix) && after.as_ref().is_none_or(|a| *k > a))
                            .take(limit as usize)
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        assert_eq!(got, want, "{context}: scan {prefix:?} after {after:?} limit {limit}");
                    }
                }
            }
            // Submitted: the commit in flight lands first, then this one is
            // in flight, or (a third of the time) commits at once.
            let writes = Arc::new(batch.into_writes());
            if let Some((w, overlay)) = in_flight.take() {
                read_model.commit(&w, &Commit::default()).unwrap();
                apply(&mut committed, &overlay);
            }
            if random(3) == 0 {
                read_model.commit(&writes, &Commit::default()).unwrap();
                apply(&mut committed, &mine);
            } else {
                in_flight = Some((writes, mine));
            }
        }
        assert!(gets > 1000 && scans > 1000, "{gets} gets, {scans} scans");
    }
}
