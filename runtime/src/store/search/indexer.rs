//! The indexer: applies a projection's outbox to its tantivy indexes, exactly once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tantivy::{IndexWriter, Term};

use super::index::{Indexes, SearchError};

/// Applies a projection's outbox to its tantivy indexes.
pub struct Indexer {
    read_model: Arc<crate::store::ReadModel>,
    indexes: Arc<Indexes>,
    interval: Duration,
    stop: Arc<AtomicBool>,
}

/// The most outbox entries applied in one tantivy commit.
const MAX_APPLY: usize = 200_000;

impl Indexer {
    pub fn new(
        read_model: Arc<crate::store::ReadModel>,
        indexes: Arc<Indexes>,
        interval: Duration,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Indexer { read_model, indexes, interval, stop }
    }

    /// Apply and commit until `stop`, once per interval.
    pub fn run(self) {
        let mut next = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            next += self.interval;
            match self.apply_once() {
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "indexing failed; retrying"),
            }
            let now = Instant::now();
            if next > now {
                crate::clock::sleep_unless(&self.stop, next - now);
            } else {
                next = now;
            }
        }
        // A last pass, so a clean shutdown leaves nothing behind.
        if let Err(e) = self.apply_once() {
            tracing::error!(error = %e, "indexing failed at shutdown");
        }
    }

    /// Apply the outbox entries after the committed sequence, commit every
    /// index with the new sequence as payload, trim the outbox. Returns the
    /// number of entries applied.
    pub fn apply_once(&self) -> Result<usize, SearchError> {
        let applied = self.indexes.applied.load(Ordering::Relaxed);
        let entries = self.read_model.outbox_after(applied, MAX_APPLY)?;
        let Some(last) = entries.last().map(|e| e.sequence) else { return Ok(0) };
        let mut writers: BTreeMap<&str, std::sync::MutexGuard<'_, IndexWriter>> = BTreeMap::new();
        for (name, open) in &self.indexes.open {
            writers.insert(name, open.writer.lock().expect("index writer lock"));
        }
        if let Err(e) = self.apply(&entries, last, &mut writers) {
            // A writer whose worker failed (a full disk, say) is dead for
            // good: start each one afresh from its last commit, which the
            // next pass re-applies the outbox after. Nothing was trimmed.
            for (name, writer) in writers.iter_mut() {
                if let Err(e) = writer.rollback() {
                    tracing::error!(index = %name, error = %e, "restarting the index writer failed");
                }
            }
            return Err(e);
        }
        drop(writers);
        self.indexes.applied.store(last, Ordering::Relaxed);
        self.read_model.trim_outbox(last)?;
        Ok(entries.len())
    }

    /// Replay `entries` on the indexes' writers and commit them all, with
    /// `last`, the last entry's sequence, as the commit payload.
    fn apply(
        &self,
        entries: &[crate::store::outbox::OutboxEntry],
        last: u64,
        writers: &mut BTreeMap<&str, std::sync::MutexGuard<'_, IndexWriter>>,
    ) -> Result<(), SearchError> {
        for entry in entries {
            let (Some(open), Some(writer)) =
                (self.indexes.open.get(&entry.index), writers.get_mut(entry.index.as_str()))
            else {
                continue; // an index no longer declared
            };
            writer.delete_term(Term::from_field_text(open.schema.id, &entry.id));
            if let Some(doc) = &entry.document {
                match open.schema.parse(doc) {
                    Ok(object) => {
                        writer.add_document(open.schema.to_tantivy(&entry.id, &object, doc))?;
                    }
                    // Validated when written; only a changed mapping gets here.
                    Err(e) => tracing::warn!(index = %entry.index, id = %entry.id, error = %e, "skipping a document"),
                }
            }
        }
        let payload = last.to_string();
        for (name, writer) in writers.iter_mut() {
            let mut prepared = writer.prepare_commit()?;
            prepared.set_payload(&payload);
            prepared.commit()?;
            self.indexes.open[*name].reader.reload()?;
        }
        Ok(())
    }
}
