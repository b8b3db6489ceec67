//! A projection's read model: one redb file holding the plugin's tables
//! (`t/<name>`), the checkpoint per source partition, dead letters, counters,
//! and two outboxes: search document changes and emitted events.
//!
//! [`ReadModel::commit`] writes a batch's key/value changes, outbox entries,
//! checkpoints, dead letters and counters in **one** durable transaction:
//! after a crash either all of a batch's effects are there or none, and the
//! checkpoint says exactly which events those were.

use std::path::Path;
use std::sync::Arc;

use redb::{Durability, ReadableTable};
use serde::{Deserialize, Serialize};

use super::batch::{Batch, BatchWrites, Declared, Emitted, KvLimits};
use super::{Error, Result};
use crate::db_file::DbFile;
pub use crate::position::Checkpoint;
use crate::position::CheckpointStore;
use crate::signal::Signal;

use super::dead_letters::DeadLetter;
use super::tables::{
    CHECKPOINTS, COUNTERS, DEAD_LETTERS, EMIT_ORDINALS, EMITTED, OUTBOX, plugin_table, table_definition,
};

/// Totals kept with the read model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    pub events_applied: u64,
    pub dead_letters: u64,
    pub batches: u64,
    /// Enricher outputs that matched no route (dropped).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unrouted_outputs: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What one batch commits.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// New checkpoints of the partitions the batch read.
    pub checkpoints: Vec<Checkpoint>,
    /// Events the batch applied (handed to the plugin or skipped as unsubscribed).
    pub applied: u64,
    pub dead_letters: Vec<DeadLetter>,
    /// Dead letters whose events this commit applied (a retry): removed.
    pub retired: Vec<u64>,
}

/// One projection's read model file.
pub struct ReadModel {
    pub(super) db: DbFile,
    /// Bumped after each commit that emitted events, to wake the relay.
    pub(super) emitted: Signal,
    /// Bumped after every commit, to wake whoever waits for the checkpoints
    /// to move (the rebuild monitor).
    committed: Signal,
    /// Whether a commit is on disk when it returns; not for a scratch read
    /// model ([`ReadModel::open_scratch`]).
    durable: bool,
    /// How long its change log keeps changes; `None`: it keeps none.
    change_log: Option<super::changes::ChangeRetention>,
    /// Whether commits record their changes now: while the generation is
    /// live (a rebuild's replay of history, or a standby copy, records none).
    recording: std::sync::atomic::AtomicBool,
}

impl ReadModel {
    /// Open (or create) the read model in the file `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_cache(path, crate::db_file::DEFAULT_CACHE_BYTES)
    }

    /// [`ReadModel::open`], with redb caching up to `cache_bytes` of the file's pages.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self> {
        let db = DbFile::create(path, cache_bytes)?;
        let tx = db.begin_write()?;
        tx.open_table(CHECKPOINTS)?;
        tx.open_table(DEAD_LETTERS)?;
        tx.open_table(COUNTERS)?;
        tx.open_table(OUTBOX)?;
        tx.open_table(EMITTED)?;
        tx.open_table(EMIT_ORDINALS)?;
        tx.open_table(super::changes::CHANGES)?;
        tx.open_table(super::changes::CHANGE_BATCHES)?;
        tx.commit()?;
        Ok(ReadModel {
            db,
            emitted: Signal::default(),
            committed: Signal::default(),
            durable: true,
            change_log: None,
            recording: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Keep a change log with `retention` (`GET …/tables/{t}/changes`),
    /// recorded once [`ReadModel::record_changes`] turns it on.
    pub fn with_change_log(self, retention: super::changes::ChangeRetention) -> Self {
        ReadModel { change_log: Some(retention), ..self }
    }

    /// Record (or stop recording) each commit's changes in the change log.
    pub fn record_changes(&self, on: bool) {
        self.recording.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether commits record their changes now.
    pub fn records_changes(&self) -> bool {
        self.change_log.is_some() && self.recording.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A read model in `path` that nothing needs after the process
    /// (`refract plugin test`): its commits are not flushed to disk.
    pub fn open_scratch(path: &Path) -> Result<Self> {
        Ok(ReadModel { durable: false, ..Self::open(path)? })
    }

    /// Every checkpoint stored so far.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        checkpoints_in(&self.db.begin_read()?)
    }

    /// Every checkpoint stored so far, as a cursor to read on from.
    pub fn cursor(&self) -> Result<crate::position::Cursor> {
        Ok(crate::position::cursor(self.checkpoints()?))
    }

    /// Start a batch over the last committed state and, while its commit is
    /// in flight, the previous batch's writes (`below`).
    pub fn begin(&self, declared: Arc<Declared>, limits: KvLimits, below: Option<Arc<BatchWrites>>) -> Result<Batch> {
        Ok(Batch::new(self.db.begin_read()?, below, declared, limits))
    }

    /// Commit a batch's writes with `commit`'s checkpoints, dead letters and
    /// counters, durably, in one transaction.
    pub fn commit(&self, writes: &BatchWrites, commit: &Commit) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        let durability = if self.durable { Durability::Immediate } else { Durability::None };
        tx.set_durability(durability).map_err(|e| Error::Storage(redb::Error::from(e)))?;
        let retention = self.change_log.filter(|_| self.records_changes());
        let mut changes = match retention {
            Some(_) => Some(super::changes::Recorder::open(&tx)?),
            None => None,
        };
        for (name, writes) in &writes.kv {
            let mut table = tx.open_table(table_definition(&plugin_table(name)))?;
            for (key, value) in writes.sorted() {
                match value {
                    Some(v) => table.insert(key.as_str(), v.as_slice())?,
                    None => table.remove(key.as_str())?,
                };
                if let Some(changes) = &mut changes {
                    changes.record(name, key, value.as_deref())?;
                }
            }
        }
        if let (Some(changes), Some(retention)) = (changes, retention) {
            changes.finish(&tx, &commit.checkpoints, retention, crate::clock::now_ms())?;
        }
        if !writes.docs.is_empty() {
            let mut counters = tx.open_table(COUNTERS)?;
            let mut sequence = counters.get("outbox-sequence")?.map_or(0, |v| v.value());
            let mut outbox = tx.open_table(OUTBOX)?;
            let mut entry = Vec::new();
            for (index, docs) in &writes.docs {
                for (id, doc) in docs.sorted() {
                    entry.clear();
                    entry.extend_from_slice(index.as_bytes());
                    entry.push(0);
                    entry.extend_from_slice(id.as_bytes());
                    entry.push(0);
                    match doc {
                        Some(d) => {
                            entry.push(1);
                            entry.extend_from_slice(d);
                        }
                        None => entry.push(0),
                    }
                    sequence += 1;
                    outbox.insert(sequence, entry.as_slice())?;
                }
            }
            counters.insert("outbox-sequence", sequence)?;
        }
        if !writes.history_emits.is_empty() {
            // History first: in a partition's order, it comes before what is emitted live.
            let mut ordinals = tx.open_table(EMIT_ORDINALS)?;
            for ((stream, partition), count) in &writes.history_emits {
                let ordinal = ordinals.get((stream.as_str(), *partition))?.map_or(0, |v| v.value()) + count;
                ordinals.insert((stream.as_str(), *partition), ordinal)?;
            }
        }
        if !writes.emitted.is_empty() {
            let mut counters = tx.open_table(COUNTERS)?;
            let mut sequence = counters.get("emit-sequence")?.map_or(0, |v| v.value());
            let mut emitted = tx.open_table(EMITTED)?;
            let mut ordinals = tx.open_table(EMIT_ORDINALS)?;
            for event in &writes.emitted {
                sequence += 1;
                let bytes = match &event.origin {
                    None => serde_json::to_vec(event),
                    Some(o) => {
                        let ordinal = ordinals.get((o.stream.as_str(), o.partition))?.map_or(0, |v| v.value()) + 1;
                        ordinals.insert((o.stream.as_str(), o.partition), ordinal)?;
                        let origin = Some(super::batch::Origin { ordinal, ..o.clone() });
                        serde_json::to_vec(&Emitted { origin, ..event.clone() })
                    }
                }
                .expect("emitted events serialize");
                emitted.insert(sequence, bytes.as_slice())?;
            }
            counters.insert("emit-sequence", sequence)?;
        }
        {
            let mut checkpoints = tx.open_table(CHECKPOINTS)?;
            for c in &commit.checkpoints {
                checkpoints.insert((c.stream.as_str(), c.partition), c.next_offset)?;
            }
            let mut dead = tx.open_table(DEAD_LETTERS)?;
            let mut counters = tx.open_table(COUNTERS)?;
            // Ids are never reused, also after letters are retried or skipped.
            let last_id = counters.get("last-dead-letter-id")?.map_or(0, |v| v.value());
            let first_id = dead.last()?.map_or(1, |(k, _)| k.value() + 1).max(last_id + 1);
            for (id, letter) in (first_id..).zip(&commit.dead_letters) {
                let bytes = serde_json::to_vec(letter).expect("dead letters serialize");
                dead.insert(id, bytes.as_slice())?;
            }
            if !commit.dead_letters.is_empty() {
                counters.insert("last-dead-letter-id", first_id + commit.dead_letters.len() as u64 - 1)?;
            }
            let mut retired = 0;
            for id in &commit.retired {
                retired += u64::from(dead.remove(*id)?.is_some());
            }
            if retired > 0 {
                let held = counters.get("dead-letters")?.map_or(0, |v| v.value());
                counters.insert("dead-letters", held.saturating_sub(retired))?;
            }
            for (name, add) in [
                ("events-applied", commit.applied),
                ("dead-letters", commit.dead_letters.len() as u64),
                ("batches", 1),
                ("unrouted-outputs", writes.unrouted),
            ] {
                let current = counters.get(name)?.map_or(0, |v| v.value());
                counters.insert(name, current + add)?;
            }
        }
        tx.commit()?;
        if !writes.emitted.is_empty() {
            self.emitted.notify();
        }
        self.committed.notify();
        Ok(())
    }

    /// Wakes waiters after every commit (its count is the commits so far).
    pub fn commit_signal(&self) -> &Signal {
        &self.committed
    }

    /// The read model's totals.
    pub fn counters(&self) -> Result<Counters> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(COUNTERS)?;
        let get = |name: &str| -> Result<u64> { Ok(table.get(name)?.map_or(0, |v| v.value())) };
        Ok(Counters {
            events_applied: get("events-applied")?,
            dead_letters: get("dead-letters")?,
            batches: get("batches")?,
            unrouted_outputs: get("unrouted-outputs")?,
        })
    }
}

impl CheckpointStore for ReadModel {
    fn durable_checkpoints(&self) -> Result<Vec<Checkpoint>, String> {
        self.checkpoints().map_err(|e| e.to_string())
    }
}

/// Every checkpoint as of `tx`.
pub(super) fn checkpoints_in(tx: &redb::ReadTransaction) -> Result<Vec<Checkpoint>> {
    let table = tx.open_table(CHECKPOINTS)?;
    table
        .iter()?
        .map(|entry| {
            let (k, v) = entry?;
            let (stream, partition) = k.value();
            Ok(Checkpoint { stream: stream.to_owned(), partition, next_offset: v.value() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Arc<Declared> {
        Arc::new(Declared { tables: ["t".to_owned()].into_iter().collect(), ..Declared::default() })
    }

    fn keys(entries: &[crate::wit::Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn a_read_model_larger_than_its_page_cache_keeps_and_serves_every_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rm.redb");
        let value = |i: usize| format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(2000)).into_bytes();
        {
            // 1 MiB of cache for 4 MiB of values, over four commits.
            let rm = ReadModel::open_with_cache(&path, 1 << 20).unwrap();
            for round in 0..4 {
                let mut batch = rm.begin(tables(), KvLimits::default(), None).unwrap();
                for i in round * 500..(round + 1) * 500 {
                    batch.put("t", &format!("k{i:05}"), &value(i)).unwrap();
                }
                let commit = Commit { checkpoints: vec![], applied: 500, dead_letters: vec![], retired: vec![] };
                rm.commit(&batch.into_writes(), &commit).unwrap();
            }
            assert_eq!(rm.get("t", "k00007").unwrap(), Some(value(7)));
        }
        let rm = ReadModel::open_with_cache(&path, 1 << 20).unwrap();
        for i in [0, 499, 500, 1234, 1999] {
            assert_eq!(rm.get("t", &format!("k{i:05}")).unwrap(), Some(value(i)), "k{i:05}");
        }
        assert_eq!(rm.counters().unwrap().events_applied, 2000);
    }

    #[test]
    fn a_batch_reads_its_own_writes_and_commits_them_with_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let rm = ReadModel::open(&dir.path().join("rm.redb")).unwrap();
        let mut batch = rm.begin(tables(), KvLimits::default(), None).unwrap();
        for k in ["a/1", "a/2", "b/1"] {
            batch.put("t", k, b"1").unwrap();
        }
        assert_eq!(batch.get("t", "a/2").unwrap().unwrap(), Some(b"1".to_vec()));
        assert!(rm.get("t", "a/2").unwrap().is_none(), "not visible before commit");
        let checkpoint = Checkpoint { stream: "s".into(), partition: 0, next_offset: 3 };
        rm.commit(
            &batch.into_writes(),
            &Commit { checkpoints: vec![checkpoint.clone()], applied: 3, dead_letters: vec![], retired: vec![] },
        )
        .unwrap();
        assert_eq!(rm.checkpoints().unwrap(), vec![checkpoint]);
        assert_eq!(rm.counters().unwrap().events_applied, 3);

        // A second batch deletes one key, adds another, and scans the merge.
        let mut batch = rm.begin(tables(), KvLimits::default(), None).unwrap();
        batch.delete("t", "a/1").unwrap();
        batch.put("t", "a/15", b"2").unwrap();
        let scanned = batch.scan("t", "a/", None, 10).unwrap().unwrap();
        assert_eq!(keys(&scanned), ["a/15", "a/2"]);
        let scanned = batch.scan("t", "a/", Some("a/15"), 10).unwrap().unwrap();
        assert_eq!(keys(&scanned), ["a/2"]);
        let scanned = batch.scan("t", "", None, 2).unwrap().unwrap();
        assert_eq!(keys(&scanned), ["a/15", "a/2"]);
        drop(batch); // rolled back: nothing changes
        let all: Vec<String> = rm.scan("t", "", None, 10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(all, ["a/1", "a/2", "b/1"]);
    }

    #[test]
    fn a_batch_sees_the_writes_of_the_commit_in_flight_below_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let rm = ReadModel::open(&dir.path().join("rm.redb")).unwrap();
        let mut first = rm.begin(tables(), KvLimits::default(), None).unwrap();
        for k in ["a", "b", "c"] {
            first.put("t", k, b"0").unwrap();
        }
        rm.commit(&first.into_writes(), &Commit::default()).unwrap();
        // The second batch's writes, not committed yet, lie below the third batch.
        let mut second = rm.begin(tables(), KvLimits::default(), None).unwrap();
        second.put("t", "b", b"2").unwrap();
        second.delete("t", "c").unwrap();
        second.put("t", "d", b"2").unwrap();
        let below = Arc::new(second.into_writes());
        let mut third = rm.begin(tables(), KvLimits::default(), Some(below.clone())).unwrap();
        third.put("t", "d", b"3").unwrap();
        third.delete("t", "a").unwrap();
        assert_eq!(third.get("t", "b").unwrap().unwrap(), Some(b"2".to_vec()));
        assert_eq!(third.get("t", "c").unwrap().unwrap(), None);
        let all = third.scan("t", "", None, 10).unwrap().unwrap();
        let seen: Vec<(&str, &[u8])> = all.iter().map(|e| (e.key.as_str(), e.value.as_slice())).collect();
        assert_eq!(seen, [("b", b"2".as_slice()), ("d", b"3".as_slice())]);
        // Committing the second batch, then the third, gives the same state.
        rm.commit(&below, &Commit::default()).unwrap();
        rm.commit(&third.into_writes(), &Commit::default()).unwrap();
        let stored: Vec<(String, Vec<u8>)> = rm.scan("t", "", None, 10).unwrap();
        assert_eq!(stored, [("b".to_owned(), b"2".to_vec()), ("d".to_owned(), b"3".to_vec())]);
    }

    /// A rebuilt generation numbers its emits counting the history it
    /// replayed (so copies that switched at different points agree), and
    /// takes what its outbox does not hold as done.
    #[test]
    fn emits_of_history_are_numbered_and_what_the_outbox_lacks_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let rm = ReadModel::open(&dir.path().join("rm.redb")).unwrap();
        let emit = |n: u32| Emitted {
            stream: "out".into(),
            event_type: "Echo".into(),
            key: None,
            time: 0,
            headers: Vec::new(),
            data: serde_json::value::RawValue::from_string(format!("{{\"n\":{n}}}")).unwrap(),
            origin: Some(super::super::batch::Origin { stream: "in".into(), partition: 3, ordinal: 0 }),
        };
        let history = BatchWrites { history_emits: [(("in".to_owned(), 3), 5)].into(), ..BatchWrites::default() };
        rm.commit(&history, &Commit::default()).unwrap();
        assert_eq!(rm.emitted_before_outbox().unwrap()[&("in".to_owned(), 3)], 5, "history is done");
        let live = BatchWrites {
            history_emits: [(("in".to_owned(), 3), 2)].into(),
            emitted: vec![emit(1), emit(2)],
            ..BatchWrites::default()
        };
        rm.commit(&live, &Commit::default()).unwrap();
        let ordinals: Vec<u64> =
            rm.emitted_after(0, 10).unwrap().into_iter().map(|(_, e)| e.origin.unwrap().ordinal).collect();
        assert_eq!(ordinals, [8, 9], "after the 7 emits of history");
        assert_eq!(rm.emitted_before_outbox().unwrap()[&("in".to_owned(), 3)], 7, "the outbox holds 8 and 9");
        rm.trim_emitted(1).unwrap();
        assert_eq!(rm.emitted_before_outbox().unwrap()[&("in".to_owned(), 3)], 8);
    }

    #[test]
    fn document_changes_reach_the_outbox_in_order_and_trimming_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let rm = ReadModel::open(&dir.path().join("rm.redb")).unwrap();
        let mut writes = BatchWrites::default();
        let docs = writes.docs.entry("idx".to_owned()).or_default();
        docs.insert("a".to_owned(), Some(br#"{"n":1}"#.to_vec()));
        docs.insert("b".to_owned(), None);
        rm.commit(&writes, &Commit::default()).unwrap();
        rm.commit(&writes, &Commit::default()).unwrap();
        assert_eq!(rm.outbox_sequence().unwrap(), 4);
        let entries = rm.outbox_after(1, 10).unwrap();
        let seen: Vec<(u64, &str, Option<&[u8]>)> =
            entries.iter().map(|e| (e.sequence, e.id.as_str(), e.document.as_deref())).collect();
        assert_eq!(seen, [(2, "b", None), (3, "a", Some(br#"{"n":1}"#.as_slice())), (4, "b", None)]);
        assert!(entries.iter().all(|e| e.index == "idx"));
        rm.trim_outbox(3).unwrap();
        assert_eq!(rm.outbox_after(0, 10).unwrap().len(), 1);
        assert_eq!(rm.outbox_sequence().unwrap(), 4, "the sequence survives trimming");
    }

    #[test]
    fn undeclared_tables_oversized_and_non_json_values_are_refused() {
        use crate::wit::KvError;
        let dir = tempfile::tempdir().unwrap();
        let rm = ReadModel::open(&dir.path().join("rm.redb")).unwrap();
        let limits = KvLimits { max_value_bytes: 8, ..KvLimits::default() };
        let mut batch = rm.begin(tables(), limits, None).unwrap();
        assert!(matches!(batch.put("other", "k", b"1"), Err(KvError::UnknownTable(_))));
        assert!(matches!(batch.put("t", "k", b"[1,2,3,4,5]"), Err(KvError::TooLarge(_))));
        assert!(matches!(batch.put("t", "k", b"{oops"), Err(KvError::InvalidValue(_))));
        assert!(matches!(batch.get("other", "k").unwrap(), Err(KvError::UnknownTable(_))));
    }
}
