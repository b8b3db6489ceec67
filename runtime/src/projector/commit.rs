//! Committing a worker's batches: each batch's writes and checkpoints in one
//! transaction, on its own thread while the next batch is handled, and
//! reading again from the durable checkpoints when a commit fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::set_background;
use super::status::WorkerState;
use super::worker::Projector;
use crate::clock::{jitter, now_ms};
use crate::plugin::HandleError;
use crate::source::reader::Pending;
use crate::store::read_model::Commit;
use crate::store::{Batch, BatchWrites, DeadLetter};

/// A commit running on its own thread.
pub(super) struct InFlight {
    pub(super) commit: Commit,
    /// Also the lower layer of the batch handled meanwhile.
    pub(super) writes: Arc<BatchWrites>,
    /// When its transaction started, for the batch latency.
    pub(super) started: Instant,
    /// The commit, and how long it took.
    pub(super) done: std::thread::JoinHandle<crate::store::Result<Duration>>,
    /// Closed when the commit is over, however it ended: a worker waits on
    /// it together with its batches and commands.
    pub(super) finished: crossbeam_channel::Receiver<()>,
}

impl Projector {
    pub(super) fn begin(&self) -> crate::store::Result<Batch> {
        let below = self.in_flight.as_ref().map(|f| f.writes.clone());
        self.read_model.begin(self.declared.clone(), self.options.kv, below)
    }

    /// Whether the previous batch is still being committed.
    pub(super) fn committing(&self) -> bool {
        self.in_flight.as_ref().is_some_and(|f| !f.done.is_finished())
    }

    /// Wait for the commit in flight, if any; on success its checkpoints become durable.
    pub(super) fn settle(&mut self) -> Result<(), HandleError> {
        let Some(in_flight) = self.in_flight.take() else { return Ok(()) };
        match in_flight.done.join() {
            Ok(Ok(took)) => {
                self.committed(&in_flight.commit);
                self.record_commit(took, in_flight.started);
                Ok(())
            }
            Ok(Err(e)) => Err(HandleError::Host(format!("committing: {e}"))),
            Err(_) => Err(HandleError::Host("the commit thread panicked".into())),
        }
    }

    pub(super) fn settle_or_resync(&mut self) {
        if let Err(e) = self.settle() {
            self.start_over(e);
        }
    }

    /// A commit failed: drop all progress not yet durable, wait, and read
    /// again from the durable checkpoints.
    pub(super) fn start_over(&mut self, error: HandleError) {
        let message = error.to_string();
        tracing::warn!(projection = self.name(), error = %message, "a commit failed; resuming from the last durable checkpoint");
        {
            let mut status = self.status.lock().expect("status lock");
            status.state = WorkerState::Retrying;
            status.retries += 1;
            status.last_error = Some(message);
            status.last_error_at = Some(now_ms());
        }
        let mut backoff = self.options.backoff();
        loop {
            if !self.sleep(jitter(backoff.next_delay())) {
                return;
            }
            match self.read_model.cursor() {
                Ok(checkpoints) => {
                    self.checkpoints = checkpoints;
                    self.resync = true;
                    return;
                }
                Err(e) => self.set_error(&format!("reading checkpoints: {e}")),
            }
        }
    }

    /// Commit `batch` on its own thread, after the previous commit succeeded.
    pub(super) fn submit(&mut self, batch: Batch, commit: Commit, started: Instant) -> Result<(), HandleError> {
        let writes = Arc::new(batch.into_writes());
        self.settle()?;
        let (read_model, w, c) = (self.read_model.clone(), writes.clone(), commit.clone());
        let background = self.in_background();
        let (finishing, finished) = crossbeam_channel::bounded::<()>(0);
        let done = std::thread::Builder::new()
            .name("refract-commit".into())
            .spawn(move || {
                let _finishing = finishing; // dropped on return or panic
                if background {
                    set_background(true);
                }
                let t = Instant::now();
                read_model.commit(&w, &c).map(|()| t.elapsed())
            })
            .map_err(|e| HandleError::Host(format!("spawning a commit thread: {e}")))?;
        self.in_flight = Some(InFlight { commit, writes, started, done, finished });
        Ok(())
    }

    /// What committing `events[from..to]` of `pending` writes besides the
    /// batch: checkpoints, counters, `dead_letters` and the undecodable
    /// records the checkpoints pass.
    pub(super) fn commit_of(
        &self,
        pending: &Pending,
        from: usize,
        to: usize,
        mut dead_letters: Vec<DeadLetter>,
    ) -> Commit {
        let applied = (to - from - dead_letters.len()) as u64;
        let version = &self.handler.manifest().version;
        let now = crate::clock::now_ms();
        dead_letters.extend(pending.undecodable_between(from, to).into_iter().map(|u| DeadLetter {
            stream: u.stream,
            topic: u.topic,
            partition: u.partition,
            offset: u.offset,
            key: u.key,
            event_type: String::new(),
            time: u.time,
            data: u.data,
            headers: Vec::new(),
            content_type: None,
            plugin_version: version.clone(),
            plugin_digest: None,
            error: u.error,
            failed_at: now,
        }));
        Commit { checkpoints: pending.checkpoints_after(to), applied, dead_letters, retired: Vec::new() }
    }

    pub(super) fn committed(&mut self, commit: &Commit) {
        for c in &commit.checkpoints {
            self.checkpoints.insert((c.stream.clone(), c.partition), c.next_offset);
        }
        if commit.applied > 0 {
            self.dead_in_a_row = 0;
        } else {
            self.dead_in_a_row += commit.dead_letters.len() as u64;
        }
        let mut status = self.status.lock().expect("status lock");
        status.state = WorkerState::Running;
        status.retries = 0;
    }

    /// Commit on this thread (bisection and dead letters), timed for `/metrics`.
    pub(super) fn commit_now(
        &self,
        writes: &BatchWrites,
        commit: &Commit,
        started: Instant,
    ) -> crate::store::Result<()> {
        let t = Instant::now();
        self.read_model.commit(writes, commit)?;
        self.record_commit(t.elapsed(), started);
        Ok(())
    }

    /// A commit that `took` this long, of a transaction `started` then, for `/metrics`.
    pub(super) fn record_commit(&self, took: Duration, started: Instant) {
        let mut status = self.status.lock().expect("status lock");
        status.metrics.storage_seconds += took.as_secs_f64();
        status.metrics.batch_seconds.observe(started.elapsed());
    }
}
