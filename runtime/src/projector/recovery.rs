//! When a plugin fails: retry what failed for a host reason or a transient
//! one, with back-off; bisect a batch a plugin rejects (or traps on) down to
//! the poison event and dead-letter it alone; pause after too many dead
//! letters in a row; and hand dead letters to the plugin again on request.

use std::time::Instant;

use super::control::{RetryFailure, RetryReport};
use super::status::WorkerState;
use super::worker::Projector;
use crate::clock::{jitter, now_ms};
use crate::plugin::HandleError;
use crate::source::reader::Pending;
use crate::store::read_model::Commit;
use crate::store::{BatchWrites, DeadLetter};

pub(super) enum Retry {
    Done,
    Stopped,
}

impl Projector {
    /// `events[lo..hi]` failed with `error`: settle the commit in flight, then
    /// retry, or bisect down to the poison event.
    pub(super) fn recover(&mut self, pending: &Pending, lo: usize, hi: usize, error: HandleError) {
        if let Err(e) = self.settle() {
            return self.start_over(e);
        }
        let _ = self.recover_range(pending, lo, hi, error);
    }

    pub(super) fn recover_range(&mut self, pending: &Pending, lo: usize, hi: usize, error: HandleError) -> Retry {
        let mut error = error;
        let mut backoff = self.options.backoff();
        loop {
            match error {
                HandleError::Transient(_) | HandleError::Host(_) => {
                    let message = error.to_string();
                    let delay = backoff.next_delay();
                    tracing::warn!(projection = self.name(), error = %message, retry_in_ms = delay.as_millis() as u64, "batch failed; retrying");
                    {
                        let mut status = self.status.lock().expect("status lock");
                        status.state = WorkerState::Retrying;
                        status.retries += 1;
                        status.last_error = Some(message);
                        status.last_error_at = Some(now_ms());
                    }
                    if !self.sleep(jitter(delay)) {
                        return Retry::Stopped;
                    }
                    match self.run_range(pending, lo, hi) {
                        Ok(()) => return Retry::Done,
                        Err(e) => error = e,
                    }
                }
                HandleError::Rejected(_) | HandleError::Trap(_) if hi - lo == 1 => {
                    return self.dead_letter(pending, lo, &error);
                }
                HandleError::Rejected(_) | HandleError::Trap(_) => {
                    let mid = lo + (hi - lo) / 2;
                    for (a, b) in [(lo, mid), (mid, hi)] {
                        if let Err(e) = self.run_range(pending, a, b)
                            && let Retry::Stopped = self.recover_range(pending, a, b, e)
                        {
                            return Retry::Stopped;
                        }
                    }
                    return Retry::Done;
                }
            }
        }
    }

    /// Handle `events[lo..hi]` in one batch and commit it before returning.
    pub(super) fn run_range(&mut self, pending: &Pending, lo: usize, hi: usize) -> Result<(), HandleError> {
        let started = Instant::now();
        let mut batch = self.begin().map_err(|e| HandleError::Host(e.to_string()))?;
        let mut start = lo;
        while start < hi {
            let end = self.call(&mut batch, &pending.events, start, hi);
            let (b, result) = self.handle_timed(batch, &pending.events[start..end]);
            batch = b;
            result?;
            start = end;
        }
        let commit = self.commit_of(pending, lo, hi, vec![]);
        self.commit_now(&batch.into_writes(), &commit, started).map_err(|e| HandleError::Host(e.to_string()))?;
        self.committed(&commit);
        Ok(())
    }

    pub(super) fn dead_letter(&mut self, pending: &Pending, at: usize, error: &HandleError) -> Retry {
        let e = &pending.events[at];
        tracing::warn!(projection = self.name(), stream = %e.stream, partition = e.partition, offset = e.offset, error = %error, "dead-lettering an event");
        // JSON data as its value; anything else as its text, kept with its
        // content type so that a retry hands over the same bytes.
        let json = e.content_type == "application/json";
        let text = || serde_json::Value::String(String::from_utf8_lossy(&e.data).into_owned());
        let data = if json { serde_json::from_slice(&e.data).unwrap_or_else(|_| text()) } else { text() };
        let letter = DeadLetter {
            stream: e.stream.clone(),
            topic: self.sources.kafka.topic(&e.stream).map(|t| t.topic.clone()),
            partition: e.partition,
            offset: e.offset,
            key: e.key.clone(),
            event_type: e.event_type.clone(),
            time: e.time,
            data,
            headers: e.headers.clone(),
            content_type: (!json).then(|| e.content_type.clone()),
            plugin_version: self.handler.manifest().version.clone(),
            error: error.to_string(),
            failed_at: now_ms(),
        };
        self.set_error(&format!("dead-lettered {}/{}@{}: {error}", e.stream, e.partition, e.offset));
        let commit = self.commit_of(pending, at, at + 1, vec![letter]);
        let mut backoff = self.options.backoff();
        loop {
            // An empty batch: the dead letter and the checkpoint commit alone.
            let result = self.commit_now(&BatchWrites::default(), &commit, Instant::now());
            match result {
                Ok(()) => {
                    self.committed(&commit);
                    let limit = self.options.pause_after_dead_letters;
                    if limit > 0 && self.dead_in_a_row >= limit {
                        let message = format!(
                            "paused after {} dead letters in a row: fix the plugin and upload it, \
                             or POST /v1/projections/{}/resume",
                            self.dead_in_a_row,
                            self.name()
                        );
                        tracing::error!(projection = self.name(), "{message}");
                        self.set_error(&message);
                        self.status.lock().expect("status lock").state = WorkerState::Paused;
                        // Stop handling the rest of this batch; it is read again on resume.
                        return Retry::Stopped;
                    }
                    return Retry::Done;
                }
                Err(err) => {
                    self.set_error(&format!("storing a dead letter: {err}"));
                    if !self.sleep(jitter(backoff.next_delay())) {
                        return Retry::Stopped;
                    }
                }
            }
        }
    }

    /// Hand the events of dead letters `ids` (all when `None`) to the plugin
    /// again, one at a time, as it is now: an event it handles is applied,
    /// its letter removed in the same transaction; one that fails again
    /// keeps its letter, with the new error. The events come from the log
    /// (with their headers) when it still has them, else from the letter.
    pub(super) fn retry(&mut self, ids: Option<Vec<u64>>) -> RetryReport {
        let mut report = RetryReport::default();
        let letters: Vec<(u64, DeadLetter)> = match ids {
            None => self.read_model.dead_letters(0, usize::MAX).unwrap_or_default(),
            Some(ids) => ids
                .into_iter()
                .filter_map(|id| match self.read_model.dead_letter(id) {
                    Ok(Some(letter)) => Some((id, letter)),
                    _ => {
                        report.missing.push(id);
                        None
                    }
                })
                .collect(),
        };
        for (id, mut letter) in letters {
            let event = self.event_of(&letter);
            let outcome = self.begin().map_err(|e| HandleError::Host(e.to_string())).and_then(|batch| {
                let (batch, result) = self.handler.handle(batch, std::slice::from_ref(&event));
                result?;
                let commit =
                    Commit { checkpoints: Vec::new(), applied: 1, dead_letters: Vec::new(), retired: vec![id] };
                self.read_model.commit(&batch.into_writes(), &commit).map_err(|e| HandleError::Host(e.to_string()))
            });
            match outcome {
                Ok(()) => report.applied.push(id),
                Err(e) => {
                    letter.error = e.to_string();
                    letter.plugin_version = self.handler.manifest().version.clone();
                    letter.failed_at = now_ms();
                    if let Err(e) = self.read_model.replace_dead_letter(id, &letter) {
                        tracing::warn!(projection = self.name(), id, error = %e, "recording a failed retry");
                    }
                    report.failed.push(RetryFailure { id, error: letter.error });
                }
            }
        }
        tracing::info!(
            projection = self.name(),
            applied = report.applied.len(),
            failed = report.failed.len(),
            "dead letters retried"
        );
        report
    }

    /// The event a dead letter holds: from the log when it still has it.
    pub(super) fn event_of(&self, letter: &DeadLetter) -> crate::plugin::Event {
        let from_log = self.sources.log.read(&letter.stream, letter.partition, letter.offset, 1, usize::MAX).ok();
        if let Some(event) = from_log.and_then(|mut events| events.pop()).filter(|e| e.offset == letter.offset) {
            return event;
        }
        event_in(letter)
    }
}

/// The event a dead letter keeps (a Kafka record's, whose topic may have
/// dropped it): its headers and content type as they were, and data that is
/// not JSON as the text it was, not that text quoted as a JSON string.
pub(super) fn event_in(letter: &DeadLetter) -> crate::plugin::Event {
    let content_type = letter.content_type.clone().unwrap_or_else(|| "application/json".into());
    let data = match &letter.data {
        serde_json::Value::String(text) if letter.content_type.is_some() => text.clone().into_bytes(),
        value => serde_json::to_vec(value).expect("JSON values serialize"),
    };
    crate::plugin::Event {
        stream: letter.stream.clone(),
        partition: letter.partition,
        offset: letter.offset,
        key: letter.key.clone(),
        event_type: letter.event_type.clone(),
        time: letter.time,
        headers: letter.headers.clone(),
        content_type,
        data,
    }
}
