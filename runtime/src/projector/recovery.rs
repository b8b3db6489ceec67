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
        self.dead_letter_log.record(self.handler.manifest().name.as_str(), e, error);
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
            plugin_digest: self.handler.component_digest().map(str::to_owned),
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
        letter_event(&self.sources.log, letter)
    }
}

/// The event of `letter`: as the embedded log holds it (with its headers)
/// while it does, else as the letter keeps it (`event_in`).
pub fn letter_event(log: &crate::source::log::EventLog, letter: &DeadLetter) -> crate::plugin::Event {
    let from_log = log.read(&letter.stream, letter.partition, letter.offset, 1, usize::MAX).ok();
    match from_log.and_then(|mut events| events.pop()).filter(|e| e.offset == letter.offset) {
        Some(event) => event,
        None => event_in(letter),
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

/// How a worker logs its dead letters: the first few of each interval in
/// full (which event, why), the rest as one line with their count and the
/// last error when the interval ends. A plugin rejecting a whole stream
/// would otherwise bury every other log line under its own.
pub(super) struct DeadLetterLog {
    /// When the current interval began.
    since: Instant,
    /// Dead letters of this interval logged in full, and counted only.
    in_full: u32,
    counted: u64,
    /// The last error counted, for the summary line.
    last_error: String,
}

/// Dead letters logged in full per interval, and the interval.
const IN_FULL: u32 = 5;
const INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for DeadLetterLog {
    fn default() -> Self {
        DeadLetterLog { since: Instant::now(), in_full: 0, counted: 0, last_error: String::new() }
    }
}

impl DeadLetterLog {
    /// Log (or count) the dead letter of `event`.
    pub(super) fn record(&mut self, projection: &str, e: &crate::plugin::Event, error: &HandleError) {
        self.roll(projection, Instant::now());
        if self.in_full < IN_FULL {
            self.in_full += 1;
            tracing::warn!(projection, stream = %e.stream, partition = e.partition, offset = e.offset, error = %error, "dead-lettering an event");
            if self.in_full == IN_FULL {
                tracing::warn!(
                    projection,
                    "{IN_FULL} dead letters in {} s: more are counted, one line every {} s \
                     (all of them: GET /v1/projections/{projection}/dead-letters, or `refract dead-letters {projection}`)",
                    INTERVAL.as_secs(),
                    INTERVAL.as_secs()
                );
            }
        } else {
            self.counted += 1;
            self.last_error = error.to_string();
        }
    }

    /// When the line counting the dead letters not logged is due; `None`
    /// while none are waiting.
    pub(super) fn due(&self) -> Option<Instant> {
        (self.counted > 0).then(|| self.since + INTERVAL)
    }

    /// At `now`: if the interval is over, log the count of the dead letters
    /// it did not log in full, and begin the next.
    pub(super) fn roll(&mut self, projection: &str, now: Instant) {
        if now.duration_since(self.since) < INTERVAL {
            return;
        }
        if self.counted > 0 {
            tracing::warn!(
                projection,
                count = self.counted,
                last_error = %self.last_error,
                "dead-lettered {} more events in the last {} s (GET /v1/projections/{projection}/dead-letters)",
                self.counted,
                now.duration_since(self.since).as_secs()
            );
        }
        *self = DeadLetterLog { since: now, ..DeadLetterLog::default() };
    }

    /// Dead letters logged in full and counted in the current interval.
    #[cfg(test)]
    fn counts(&self) -> (u32, u64) {
        (self.in_full, self.counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five in full, the rest counted until the interval ends; then the
    /// count is due, and the next interval logs five in full again.
    #[test]
    fn dead_letters_are_logged_in_full_up_to_a_few_per_interval_and_counted_beyond() {
        let event = crate::plugin::Event {
            stream: "orders".into(),
            partition: 0,
            offset: 7,
            key: None,
            event_type: "OrderPlaced".into(),
            time: 0,
            headers: Vec::new(),
            content_type: "application/json".into(),
            data: b"{}".to_vec(),
        };
        let error = HandleError::Rejected("no such order".into());
        let mut log = DeadLetterLog::default();
        let start = log.since;
        for _ in 0..300 {
            log.record("p", &event, &error);
        }
        assert_eq!(log.counts(), (IN_FULL, 295));
        assert_eq!(log.due(), Some(start + INTERVAL));
        log.roll("p", start + INTERVAL / 2);
        assert_eq!(log.counts(), (IN_FULL, 295), "not before the interval ends");
        log.roll("p", start + INTERVAL);
        assert_eq!((log.counts(), log.due()), ((0, 0), None), "counted and logged; a new interval");
        log.record("p", &event, &error);
        assert_eq!(log.counts(), (1, 0));
    }
}
