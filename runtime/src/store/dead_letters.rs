//! Dead letters: events a projection could not apply, kept with why, to
//! inspect, retry or skip.

use redb::{Durability, ReadableTable};
use serde::{Deserialize, Serialize};

use super::read_model::ReadModel;
use super::tables::{COUNTERS, DEAD_LETTERS};
use super::{Error, Result};

/// An event the projection could not apply, kept with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub stream: String,
    /// The Kafka topic the record came from, for Kafka streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<String>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub time: i64,
    /// The event's data: its JSON value, or a string when it is not JSON.
    pub data: serde_json::Value,
    /// The event's headers, so that a retry hands the plugin the same event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The event's content type when it is not `application/json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    pub plugin_version: String,
    /// The content hash (SHA-256) of the plugin component that failed, kept
    /// by the runtime while a dead letter names it (none for letters of
    /// undecodable records, or from before components were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_digest: Option<String>,
    pub error: String,
    /// When it was dead-lettered (ms since the Unix epoch).
    pub failed_at: i64,
}

impl ReadModel {
    /// Up to `limit` dead letters with ids greater than `after`, oldest first.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<(u64, DeadLetter)>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(DEAD_LETTERS)?;
        let mut out = Vec::new();
        // Ids are positive: nothing comes after the largest.
        let Some(first) = after.checked_add(1) else { return Ok(Vec::new()) };
        for entry in table.range(first..)?.take(limit) {
            let (id, bytes) = entry?;
            let letter = serde_json::from_slice(bytes.value())
                .map_err(|e| Error::Corrupt(format!("dead letter {}: {e}", id.value())))?;
            out.push((id.value(), letter));
        }
        Ok(out)
    }

    /// The dead letter `id`, if it is held.
    pub fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(DEAD_LETTERS)?;
        let Some(bytes) = table.get(id)? else { return Ok(None) };
        Ok(Some(serde_json::from_slice(bytes.value()).map_err(|e| Error::Corrupt(format!("dead letter {id}: {e}")))?))
    }

    /// Replace the dead letter `id` (a retry that failed again: a new error).
    pub fn replace_dead_letter(&self, id: u64, letter: &DeadLetter) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate).map_err(|e| Error::Storage(redb::Error::from(e)))?;
        {
            let mut table = tx.open_table(DEAD_LETTERS)?;
            if table.get(id)?.is_some() {
                table.insert(id, serde_json::to_vec(letter).expect("dead letters serialize").as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Drop the dead letter `id` without applying its event (skip it);
    /// whether it was held.
    pub fn remove_dead_letter(&self, id: u64) -> Result<bool> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate).map_err(|e| Error::Storage(redb::Error::from(e)))?;
        let removed = {
            let mut table = tx.open_table(DEAD_LETTERS)?;
            let removed = table.remove(id)?.is_some();
            if removed {
                let mut counters = tx.open_table(COUNTERS)?;
                let held = counters.get("dead-letters")?.map_or(0, |v| v.value());
                counters.insert("dead-letters", held.saturating_sub(1))?;
            }
            removed
        };
        tx.commit()?;
        Ok(removed)
    }
}
