//! The layout of a read model's redb file: the plugin's tables (`t/<name>`)
//! and the runtime's own (checkpoints, dead letters, counters, outboxes),
//! and reading the plugin's tables.

use std::ops::Bound;

use redb::TableDefinition;

use super::Result;
use super::read_model::ReadModel;

pub(super) const CHECKPOINTS: TableDefinition<(&str, u32), u64> = TableDefinition::new("checkpoints");
pub(super) const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead-letters");
pub(super) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Search outbox: sequence → a document change of a batch, encoded as
/// `<index>\0<id>\0` then `1<document>` (upsert) or `0` (delete).
pub(super) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// Emitted events waiting to be published: sequence → [`super::Emitted`] as JSON.
pub(super) const EMITTED: TableDefinition<u64, &[u8]> = TableDefinition::new("emitted");

/// (stream, partition) → how many events its events emitted (a shard's
/// emits are numbered per partition: [`super::batch::Origin`]).
pub(super) const EMIT_ORDINALS: TableDefinition<(&str, u32), u64> = TableDefinition::new("emit-ordinals");

pub(super) fn table_definition(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

/// The redb table behind the plugin table `table`.
pub(super) fn plugin_table(table: &str) -> String {
    format!("t/{table}")
}

/// The plugin table `table` as of `tx`, or `None` before its first write.
pub(super) fn open_plugin_table(
    tx: &redb::ReadTransaction,
    table: &str,
) -> Result<Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>> {
    match tx.open_table(table_definition(&plugin_table(table))) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl ReadModel {
    /// The committed value under `key` in `table`.
    pub fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let tx = self.db.begin_read()?;
        let Some(t) = open_plugin_table(&tx, table)? else { return Ok(None) };
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Up to `limit` committed entries of `table` whose key starts with
    /// `prefix`, after `after`, in key order.
    pub fn scan(&self, table: &str, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        let tx = self.db.begin_read()?;
        let Some(t) = open_plugin_table(&tx, table)? else { return Ok(Vec::new()) };
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut out = Vec::new();
        for entry in t.range::<&str>((start, Bound::Unbounded))? {
            let (k, v) = entry?;
            if !k.value().starts_with(prefix) || out.len() == limit {
                break;
            }
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }
}
