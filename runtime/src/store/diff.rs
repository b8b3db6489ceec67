//! What one read model holds that another does not: the tables of a
//! preview (a generation built with another plugin version, not live yet)
//! against the live generation's, key by key.
//!
//! Each side is read in one redb read transaction, so the counts and the
//! checkpoints they are reported with belong together even while both
//! generations keep committing.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::Result;
use super::read_model::ReadModel;
use super::tables::open_plugin_table;
use crate::position::Cursor;

/// How one key differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Change {
    /// Only the preview has it.
    Added,
    /// Only the live read model has it.
    Removed,
    /// Both have it, with values that differ as JSON.
    Changed,
}

/// One differing key, with both values (`null` where a side has none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub key: String,
    pub change: Change,
    pub live: Option<serde_json::Value>,
    pub preview: Option<serde_json::Value>,
}

/// How a table differs: counts, and the first few keys of each kind in key order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableDiff {
    pub table: String,
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
    pub unchanged: u64,
    pub samples: Vec<Sample>,
}

impl TableDiff {
    /// Add `other`'s counts (another shard's) and its samples up to `samples` of each kind.
    pub fn merge(&mut self, other: TableDiff, samples: usize) {
        self.added += other.added;
        self.removed += other.removed;
        self.changed += other.changed;
        self.unchanged += other.unchanged;
        for sample in other.samples {
            if self.samples.iter().filter(|s| s.change == sample.change).count() < samples {
                self.samples.push(sample);
            }
        }
    }
}

/// `tables` of `live` and `preview` compared, with the checkpoints each
/// side was read at.
pub struct Compared {
    pub tables: Vec<TableDiff>,
    pub live: Cursor,
    pub preview: Cursor,
}

/// Compare `tables` of `live` and `preview` key by key (two cursors walked
/// in key order, merged), keeping up to `samples` keys of each kind per
/// table. Values that differ as bytes but not as JSON (another key order)
/// are unchanged.
pub fn compare(live: &ReadModel, preview: &ReadModel, tables: &[String], samples: usize) -> Result<Compared> {
    let (live_tx, preview_tx) = (live.db.begin_read()?, preview.db.begin_read()?);
    let mut out = Vec::new();
    for table in tables {
        let l = open_plugin_table(&live_tx, table)?;
        let p = open_plugin_table(&preview_tx, table)?;
        let mut l = match &l {
            Some(t) => Some(t.iter()?),
            None => None,
        };
        let mut p = match &p {
            Some(t) => Some(t.iter()?),
            None => None,
        };
        let next =
            |side: &mut Option<redb::Range<'_, &'static str, &'static [u8]>>| -> Result<Option<(String, Vec<u8>)>> {
                match side.as_mut().and_then(Iterator::next) {
                    Some(entry) => {
                        let (k, v) = entry?;
                        Ok(Some((k.value().to_owned(), v.value().to_vec())))
                    }
                    None => Ok(None),
                }
            };
        let mut diff = TableDiff { table: table.clone(), ..TableDiff::default() };
        let record =
            |diff: &mut TableDiff, key: String, change: Change, live: Option<&[u8]>, preview: Option<&[u8]>| {
                match change {
                    Change::Added => diff.added += 1,
                    Change::Removed => diff.removed += 1,
                    Change::Changed => diff.changed += 1,
                }
                if diff.samples.iter().filter(|s| s.change == change).count() < samples {
                    diff.samples.push(Sample { key, change, live: live.map(json), preview: preview.map(json) });
                }
            };
        let (mut a, mut b) = (next(&mut l)?, next(&mut p)?);
        loop {
            match (a.take(), b.take()) {
                (None, None) => break,
                (Some((k, v)), None) => {
                    record(&mut diff, k, Change::Removed, Some(&v), None);
                    a = next(&mut l)?;
                }
                (None, Some((k, v))) => {
                    record(&mut diff, k, Change::Added, None, Some(&v));
                    b = next(&mut p)?;
                }
                (Some((lk, lv)), Some((pk, pv))) => match lk.cmp(&pk) {
                    std::cmp::Ordering::Less => {
                        record(&mut diff, lk, Change::Removed, Some(&lv), None);
                        a = next(&mut l)?;
                        b = Some((pk, pv));
                    }
                    std::cmp::Ordering::Greater => {
                        record(&mut diff, pk, Change::Added, None, Some(&pv));
                        a = Some((lk, lv));
                        b = next(&mut p)?;
                    }
                    std::cmp::Ordering::Equal => {
                        if lv == pv || json(&lv) == json(&pv) {
                            diff.unchanged += 1;
                        } else {
                            record(&mut diff, lk, Change::Changed, Some(&lv), Some(&pv));
                        }
                        a = next(&mut l)?;
                        b = next(&mut p)?;
                    }
                },
            }
        }
        out.push(diff);
    }
    let cursor = |tx| super::read_model::checkpoints_in(tx).map(crate::position::cursor);
    Ok(Compared { tables: out, live: cursor(&live_tx)?, preview: cursor(&preview_tx)? })
}

/// A stored value as JSON (values are checked to be JSON when written;
/// anything else shows as a string).
fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::Checkpoint;
    use crate::store::batch::{Declared, KvLimits};
    use crate::store::read_model::Commit;
    use std::sync::Arc;

    fn model(dir: &std::path::Path, name: &str, entries: &[(&str, &str)], at: u64) -> ReadModel {
        let model = ReadModel::open(&dir.join(name)).unwrap();
        let declared = Arc::new(Declared { tables: ["t".to_owned()].into(), ..Declared::default() });
        let mut batch = model.begin(declared, KvLimits::default(), None).unwrap();
        for (k, v) in entries {
            batch.put("t", k, v.as_bytes()).unwrap();
        }
        let checkpoints = vec![Checkpoint { stream: "s".into(), partition: 0, next_offset: at }];
        model.commit(&batch.into_writes(), &Commit { checkpoints, ..Commit::default() }).unwrap();
        model
    }

    #[test]
    fn every_key_is_counted_once_as_added_removed_changed_or_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let live = model(dir.path(), "live", &[("a", "1"), ("b", r#"{"x":1,"y":2}"#), ("c", "3"), ("e", "5")], 7);
        let preview = model(
            dir.path(),
            "preview",
            &[("b", r#"{"y":2,"x":1}"#), ("c", "4"), ("d", "4"), ("e", "5"), ("f", "6")],
            6,
        );
        let compared = compare(&live, &preview, &["t".into(), "never-written".into()], 1).unwrap();
        let t = &compared.tables[0];
        assert_eq!((t.added, t.removed, t.changed, t.unchanged), (2, 1, 1, 2), "{t:?}");
        let kinds: Vec<(&str, Change)> = t.samples.iter().map(|s| (s.key.as_str(), s.change)).collect();
        assert_eq!(kinds, [("a", Change::Removed), ("c", Change::Changed), ("d", Change::Added)]);
        assert_eq!((t.samples[1].live.clone(), t.samples[1].preview.clone()), (Some(3.into()), Some(4.into())));
        let empty = &compared.tables[1];
        assert_eq!((empty.added, empty.removed, empty.changed, empty.unchanged), (0, 0, 0, 0));
        assert_eq!(compared.live[&("s".to_owned(), 0)], 7);
        assert_eq!(compared.preview[&("s".to_owned(), 0)], 6);

        let mut whole = t.clone();
        whole.merge(t.clone(), 1);
        assert_eq!((whole.added, whole.changed, whole.samples.len()), (4, 2, 3), "samples stay at one of each kind");
    }
}
