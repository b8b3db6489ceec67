//! The two outboxes a batch commits with its writes: search document
//! changes (applied to tantivy by the indexer) and emitted events (published
//! by the relay). Each entry has a sequence; consumers trim what they have
//! made durable elsewhere.

use redb::ReadableTable;

use super::batch::Emitted;
use super::read_model::ReadModel;
use super::tables::{COUNTERS, EMITTED, OUTBOX};
use super::{Error, Result};
use crate::signal::Signal;

/// A change to a search document, waiting to be applied to the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub sequence: u64,
    pub index: String,
    pub id: String,
    /// The document as the batch left it (`None`: deleted).
    pub document: Option<Vec<u8>>,
}

impl ReadModel {
    /// Up to `limit` outbox entries after `after`, in sequence order.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>> {
        let tx = self.db.begin_read()?;
        let outbox = tx.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for entry in outbox.range((after + 1)..)?.take(limit) {
            let (sequence, bytes) = entry?;
            let corrupt = || Error::Corrupt(format!("outbox entry {}", sequence.value()));
            let bytes = bytes.value();
            let mut parts = bytes.splitn(3, |b| *b == 0);
            let (Some(index), Some(id), Some(change)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(corrupt());
            };
            let document = match change.split_first() {
                Some((1, doc)) => Some(doc.to_vec()),
                Some((0, [])) => None,
                _ => return Err(corrupt()),
            };
            let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| corrupt());
            out.push(OutboxEntry { sequence: sequence.value(), index: text(index)?, id: text(id)?, document });
        }
        Ok(out)
    }

    /// Remove outbox entries up to `upto` (applied and committed to the indexes).
    pub fn trim_outbox(&self, upto: u64) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut outbox = tx.open_table(OUTBOX)?;
            outbox.retain_in(..=upto, |_, _| false)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The sequence of the last outbox entry ever written.
    pub fn outbox_sequence(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let counters = tx.open_table(COUNTERS)?;
        Ok(counters.get("outbox-sequence")?.map_or(0, |v| v.value()))
    }

    /// Wakes the relay when a commit emitted events.
    pub fn emitted_signal(&self) -> &Signal {
        &self.emitted
    }

    /// Up to `limit` emitted events not yet trimmed, after sequence `after`.
    pub fn emitted_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Emitted)>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(EMITTED)?;
        let mut out = Vec::new();
        for entry in table.range((after + 1)..)?.take(limit) {
            let (sequence, bytes) = entry?;
            let event = serde_json::from_slice(bytes.value())
                .map_err(|e| Error::Corrupt(format!("emitted event {}: {e}", sequence.value())))?;
            out.push((sequence.value(), event));
        }
        Ok(out)
    }

    /// Forget emitted events up to `upto` (published).
    pub fn trim_emitted(&self, upto: u64) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(EMITTED)?;
            table.retain_in(..=upto, |_, _| false)?;
            let mut counters = tx.open_table(COUNTERS)?;
            let published = counters.get("emit-published")?.map_or(0, |v| v.value());
            counters.insert("emit-published", published.max(upto))?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Forget the emitted events another copy of this shard published:
    /// those numbered at most `published` for their partition (a standby
    /// keeps its shard's emits until the active copy says it published
    /// them, to publish them itself should it take the shard on first).
    pub fn trim_emitted_published(&self, published: &std::collections::BTreeMap<(String, u32), u64>) -> Result<usize> {
        let tx = self.db.begin_write()?;
        let mut trimmed = 0;
        {
            let mut table = tx.open_table(EMITTED)?;
            let mut last = 0;
            table.retain(|sequence, bytes| {
                let origin = serde_json::from_slice::<Emitted>(bytes).ok().and_then(|e| e.origin);
                let done = origin
                    .is_some_and(|o| published.get(&(o.stream, o.partition)).is_some_and(|upto| o.ordinal <= *upto));
                if done {
                    trimmed += 1;
                    last = sequence;
                }
                !done
            })?;
            let mut counters = tx.open_table(COUNTERS)?;
            let before = counters.get("emit-published")?.map_or(0, |v| v.value());
            counters.insert("emit-published", before.max(last))?;
        }
        tx.commit()?;
        Ok(trimmed)
    }

    /// Per source partition, the ordinals numbered before the first emit
    /// still in the outbox (all of them when none is): emits of history, or
    /// already published. What a generation that has just switched in
    /// takes over as done, where the last publication is an older
    /// generation's (whose ordinals number other emits).
    pub fn emitted_before_outbox(&self) -> Result<std::collections::BTreeMap<(String, u32), u64>> {
        let tx = self.db.begin_read()?;
        let mut done = std::collections::BTreeMap::new();
        for entry in tx.open_table(super::tables::EMIT_ORDINALS)?.iter()? {
            let (key, ordinal) = entry?;
            let (stream, partition) = key.value();
            done.insert((stream.to_owned(), partition), ordinal.value());
        }
        for entry in tx.open_table(EMITTED)?.iter()? {
            let (sequence, bytes) = entry?;
            let event: Emitted = serde_json::from_slice(bytes.value())
                .map_err(|e| Error::Corrupt(format!("emitted event {}: {e}", sequence.value())))?;
            if let Some(o) = event.origin
                && let Some(upto) = done.get_mut(&(o.stream, o.partition))
            {
                *upto = (*upto).min(o.ordinal.saturating_sub(1));
            }
        }
        Ok(done)
    }

    /// (sequence of the last event emitted, sequence of the last one published).
    pub fn emit_progress(&self) -> Result<(u64, u64)> {
        let tx = self.db.begin_read()?;
        let counters = tx.open_table(COUNTERS)?;
        let get = |name: &str| -> Result<u64> { Ok(counters.get(name)?.map_or(0, |v| v.value())) };
        Ok((get("emit-sequence")?, get("emit-published")?))
    }
}
