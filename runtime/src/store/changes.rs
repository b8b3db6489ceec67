//! The change log: every put and delete a batch commits to a plugin table,
//! numbered in commit order and written in the batch's own transaction, so
//! a change stream (`GET …/tables/{t}/changes`) delivers exactly what was
//! committed, in order, nothing of a batch that did not commit, and resumes
//! after a reconnect from the number it last saw. Kept for a window
//! ([`ChangeRetention`]): the oldest changes are trimmed as new ones commit.

use std::ops::Bound;
use std::time::Duration;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Result;
use super::read_model::ReadModel;
use crate::position::Checkpoint;

/// Change number → `<table>\0<key>\0` then `1<value>` (a put) or `0` (a delete).
pub(super) const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// The first change number of each batch → when it committed (ms since the
/// Unix epoch, 8 bytes little-endian), then its positions
/// (`<stream>:<partition>:<next offset>,…`, the partitions it read).
pub(super) const CHANGE_BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("change-batches");

/// How long changes are kept: those older than `max_age`, and those beyond
/// the last `max_changes`, are trimmed (`changes.retention-seconds`,
/// `changes.max-changes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeRetention {
    pub max_age: Duration,
    pub max_changes: u64,
}

impl Default for ChangeRetention {
    fn default() -> Self {
        ChangeRetention { max_age: Duration::from_secs(600), max_changes: 1_000_000 }
    }
}

/// One committed put or delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Its number in the read model's change log (commit order).
    pub seq: u64,
    pub table: String,
    pub key: String,
    /// The new value; `None`: deleted.
    pub value: Option<Vec<u8>>,
    /// Its batch's positions (`<stream>:<partition>:<next offset>,…`).
    pub positions: String,
}

/// What [`ReadModel::changes_after`] found.
#[derive(Debug, Clone, Default)]
pub struct ChangesPage {
    /// The matching changes, in order.
    pub changes: Vec<Change>,
    /// The last change number looked at (matching or not): read on after it.
    pub read_up_to: u64,
    /// The number of the oldest change kept; `None` when none is.
    pub oldest: Option<u64>,
}

/// The positions a batch read up to, as a change carries them.
fn positions(checkpoints: &[Checkpoint]) -> String {
    let mut items: Vec<String> =
        checkpoints.iter().map(|c| format!("{}:{}:{}", c.stream, c.partition, c.next_offset)).collect();
    items.sort();
    items.join(",")
}

/// Records a batch's changes in its transaction (see [`ReadModel::commit`]).
pub(super) struct Recorder<'tx> {
    changes: redb::Table<'tx, u64, &'static [u8]>,
    next: u64,
    first: u64,
    entry: Vec<u8>,
}

/// The counter holding the last change number given (numbers are never
/// reused, also once every change has been trimmed).
const SEQUENCE: &str = "change-sequence";

impl<'tx> Recorder<'tx> {
    pub(super) fn open(tx: &'tx redb::WriteTransaction) -> Result<Self> {
        let last = tx.open_table(super::tables::COUNTERS)?.get(SEQUENCE)?.map_or(0, |v| v.value());
        let changes = tx.open_table(CHANGES)?;
        Ok(Recorder { changes, next: last + 1, first: last + 1, entry: Vec::new() })
    }

    pub(super) fn record(&mut self, table: &str, key: &str, value: Option<&[u8]>) -> Result<()> {
        self.entry.clear();
        self.entry.extend_from_slice(table.as_bytes());
        self.entry.push(0);
        self.entry.extend_from_slice(key.as_bytes());
        self.entry.push(0);
        match value {
            Some(v) => {
                self.entry.push(1);
                self.entry.extend_from_slice(v);
            }
            None => self.entry.push(0),
        }
        self.changes.insert(self.next, self.entry.as_slice())?;
        self.next += 1;
        Ok(())
    }

    /// Note the batch (when it recorded anything) and trim what the
    /// retention no longer keeps: every change before the first batch
    /// committed within `max_age`, and all but the last `max_changes`.
    pub(super) fn finish(
        mut self,
        tx: &redb::WriteTransaction,
        checkpoints: &[Checkpoint],
        retention: ChangeRetention,
        now_ms: i64,
    ) -> Result<()> {
        let mut batches = tx.open_table(CHANGE_BATCHES)?;
        if self.next > self.first {
            let mut value = now_ms.to_le_bytes().to_vec();
            value.extend_from_slice(positions(checkpoints).as_bytes());
            batches.insert(self.first, value.as_slice())?;
            tx.open_table(super::tables::COUNTERS)?.insert(SEQUENCE, self.next - 1)?;
        }
        let cutoff = now_ms - retention.max_age.as_millis() as i64;
        let mut young = self.next;
        for entry in batches.iter()? {
            let (first, value) = entry?;
            let at = i64::from_le_bytes(value.value()[..8].try_into().expect("8 bytes of time"));
            if at >= cutoff {
                young = first.value();
                break;
            }
        }
        let keep_from = young.max(self.next.saturating_sub(retention.max_changes));
        let Some(oldest) = self.changes.first()?.map(|(k, _)| k.value()) else { return Ok(()) };
        if oldest >= keep_from {
            return Ok(());
        }
        self.changes.retain_in(oldest..keep_from, |_, _| false)?;
        // The batch holding `keep_from` stays (its positions name its
        // changes); those before it go.
        let holding = batches.range(..=keep_from)?.next_back().transpose()?.map(|(k, _)| k.value());
        if let Some(holding) = holding {
            batches.retain_in(..holding, |_, _| false)?;
        }
        Ok(())
    }
}

fn decode(seq: u64, bytes: &[u8], positions: &str) -> Option<Change> {
    let mut parts = bytes.splitn(3, |b| *b == 0);
    let table = std::str::from_utf8(parts.next()?).ok()?;
    let key = std::str::from_utf8(parts.next()?).ok()?;
    let rest = parts.next()?;
    let value = match rest.first()? {
        1 => Some(rest[1..].to_vec()),
        _ => None,
    };
    Some(Change { seq, table: table.to_owned(), key: key.to_owned(), value, positions: positions.to_owned() })
}

impl ReadModel {
    /// Up to `limit` changes of `table` whose key starts with `prefix`,
    /// after change number `after`, looking at `scan` changes at most.
    pub fn changes_after(
        &self,
        after: u64,
        table: &str,
        prefix: &str,
        limit: usize,
        scan: usize,
    ) -> Result<ChangesPage> {
        self.read_changes(after, Some((table, prefix)), limit, scan)
    }

    /// Up to `limit` changes of every table after change number `after`.
    pub fn changes_since(&self, after: u64, limit: usize) -> Result<ChangesPage> {
        self.read_changes(after, None, limit, limit)
    }

    fn read_changes(&self, after: u64, only: Option<(&str, &str)>, limit: usize, scan: usize) -> Result<ChangesPage> {
        let tx = self.db.begin_read()?;
        let changes = tx.open_table(CHANGES)?;
        let batches = tx.open_table(CHANGE_BATCHES)?;
        let oldest = changes.first()?.map(|(k, _)| k.value());
        let mut page = ChangesPage { changes: Vec::new(), read_up_to: after, oldest };
        // The batch `after + 1` belongs to: the last one starting at or before it.
        let mut batch = batches
            .range(..=after + 1)?
            .next_back()
            .transpose()?
            .map(|(_, v)| String::from_utf8_lossy(&v.value()[8..]).into_owned())
            .unwrap_or_default();
        let mut next_batch = batches.range((Bound::Excluded(after + 1), Bound::Unbounded))?;
        let mut upcoming = next_batch.next().transpose()?.map(|(k, v)| (k.value(), v.value().to_vec()));
        for entry in changes.range((Bound::Excluded(after), Bound::Unbounded))?.take(scan) {
            let (seq, bytes) = entry?;
            let seq = seq.value();
            while let Some((_, value)) = upcoming.take_if(|(first, _)| *first <= seq) {
                batch = String::from_utf8_lossy(&value[8..]).into_owned();
                upcoming = next_batch.next().transpose()?.map(|(k, v)| (k.value(), v.value().to_vec()));
            }
            page.read_up_to = seq;
            let Some(change) = decode(seq, bytes.value(), &batch) else {
                return Err(super::Error::Corrupt(format!("change {seq} cannot be decoded")));
            };
            if only.is_none_or(|(table, prefix)| change.table == table && change.key.starts_with(prefix)) {
                page.changes.push(change);
                if page.changes.len() == limit {
                    break;
                }
            }
        }
        Ok(page)
    }

    /// The number of the oldest change kept; `None` when none is.
    pub fn oldest_change(&self) -> Result<Option<u64>> {
        let tx = self.db.begin_read()?;
        let changes = tx.open_table(CHANGES)?;
        Ok(changes.first()?.map(|(k, _)| k.value()))
    }

    /// The number of the last change committed (0: none yet).
    pub fn last_change(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let counters = tx.open_table(super::tables::COUNTERS)?;
        Ok(counters.get(SEQUENCE)?.map_or(0, |v| v.value()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::batch::{Declared, KvLimits};
    use crate::store::read_model::Commit;

    fn commit(model: &ReadModel, writes: &[(&str, &str, Option<&str>)], offset: u64) {
        let declared = Arc::new(Declared { tables: ["a".to_owned(), "b".to_owned()].into(), ..Declared::default() });
        let mut batch = model.begin(declared, KvLimits::default(), None).unwrap();
        for (table, key, value) in writes {
            match value {
                Some(v) => batch.put(table, key, v.as_bytes()).unwrap(),
                None => batch.delete(table, key).unwrap(),
            }
        }
        let checkpoints = vec![Checkpoint { stream: "s".into(), partition: 0, next_offset: offset }];
        model.commit(&batch.into_writes(), &Commit { checkpoints, ..Commit::default() }).unwrap();
    }

    #[test]
    fn changes_are_numbered_in_commit_order_with_their_batch_and_read_by_table_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let model = ReadModel::open(&dir.path().join("rm.redb")).unwrap().with_change_log(ChangeRetention::default());
        commit(&model, &[("a", "x/1", Some("1"))], 5);
        assert_eq!(model.last_change().unwrap(), 0, "nothing is recorded until recording is on");
        model.record_changes(true);
        commit(&model, &[("a", "x/1", Some("2")), ("a", "y/1", Some("3")), ("b", "x/2", Some("4"))], 7);
        commit(&model, &[("a", "x/1", None)], 9);
        assert_eq!(model.last_change().unwrap(), 4);
        let page = model.changes_after(0, "a", "x/", 10, 100).unwrap();
        let seen: Vec<(u64, &str, Option<&[u8]>, &str)> =
            page.changes.iter().map(|c| (c.seq, c.key.as_str(), c.value.as_deref(), c.positions.as_str())).collect();
        assert_eq!(seen, [(1, "x/1", Some(&b"2"[..]), "s:0:7"), (4, "x/1", None, "s:0:9")]);
        assert_eq!((page.read_up_to, page.oldest), (4, Some(1)));
        // A page stops at its limit; the next read goes on after it.
        let first = model.changes_after(0, "a", "", 1, 100).unwrap();
        assert_eq!((first.changes.len(), first.read_up_to), (1, 1));
        let rest = model.changes_after(first.read_up_to, "a", "", 10, 100).unwrap();
        assert_eq!(rest.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(rest.changes[0].positions, "s:0:7", "a change in the middle of a batch has its batch's positions");
    }

    #[test]
    fn the_oldest_changes_are_trimmed_and_numbers_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let retention = ChangeRetention { max_age: Duration::from_secs(3600), max_changes: 3 };
        let model = ReadModel::open(&dir.path().join("rm.redb")).unwrap().with_change_log(retention);
        model.record_changes(true);
        for n in 0..4 {
            commit(&model, &[("a", &format!("k{n}"), Some("1")), ("b", "k", Some("2"))], n);
        }
        // 8 changes, the last 3 kept.
        assert_eq!((model.oldest_change().unwrap(), model.last_change().unwrap()), (Some(6), 8));
        let page = model.changes_after(5, "a", "", 10, 100).unwrap();
        assert_eq!(page.changes.iter().map(|c| (c.seq, c.positions.as_str())).collect::<Vec<_>>(), [(7, "s:0:3")]);
        assert_eq!(page.changes[0].key, "k3");

        // By age: a retention of 0 s trims everything but the last batch;
        // numbering goes on.
        let dir = tempfile::tempdir().unwrap();
        let retention = ChangeRetention { max_age: Duration::ZERO, max_changes: 100 };
        let model = ReadModel::open(&dir.path().join("rm.redb")).unwrap().with_change_log(retention);
        model.record_changes(true);
        commit(&model, &[("a", "k", Some("1"))], 1);
        std::thread::sleep(Duration::from_millis(5));
        commit(&model, &[("a", "k", Some("2"))], 2);
        assert_eq!((model.oldest_change().unwrap(), model.last_change().unwrap()), (Some(2), 2));
    }
}
