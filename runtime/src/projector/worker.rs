//! The worker of one projection: the loop that takes commands and batches,
//! and hands each batch to the plugin in calls, in transactions that end at
//! `max-duration` (see the module docs of [`super`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::commit::InFlight;
use super::control::{Command, Control};
use super::options::BatchOptions;
use super::read_ahead::{Alignment, ReadAhead, align_event_time};
use super::replay::{Failed, Replay};
use super::set_background;
use super::status::{WorkerState, WorkerStatus};
use crate::clock::now_ms;
use crate::plugin::keyed::KeyedTables;
use crate::plugin::{HandleError, Handler, Manifest};
use crate::source::Sources;
use crate::source::kafka::Watermarks;
use crate::source::reader::{Cursor, Delivery, LogReader, Pending, Reader, Subscriptions};
use crate::store::{Batch, Declared, ReadModel};

/// The worker of one projection.
pub struct Projector {
    pub(super) handler: Box<dyn Handler>,
    pub(super) read_model: Arc<ReadModel>,
    pub(super) sources: Sources,
    /// High watermarks of the Kafka partitions read, for the status.
    pub(super) watermarks: Watermarks,
    pub(super) options: BatchOptions,
    pub(super) status: Arc<Mutex<WorkerStatus>>,
    /// Set by a [`Command::Stop`].
    pub(super) stopping: bool,
    /// The tables and indexes the plugin declared.
    pub(super) declared: Arc<Declared>,
    pub(super) subscriptions: Subscriptions,
    /// Durable checkpoints: what the read model holds.
    pub(super) checkpoints: Cursor,
    /// The commit running on its own thread while the next batch is handled.
    pub(super) in_flight: Option<InFlight>,
    /// Set when in-memory progress was dropped: reading must restart from `checkpoints`.
    pub(super) resync: bool,
    /// Dead letters committed since the last batch that applied an event.
    pub(super) dead_in_a_row: u64,
    /// How dead letters are logged: a few in full, the rest counted.
    pub(super) dead_letter_log: super::recovery::DeadLetterLog,
    /// Set by a [`Command::Resume`] (or a new version) to end a pause.
    pub(super) resume: bool,
    /// Which events replay history (a rebuild): what the plugin emits for them is dropped.
    pub(super) replay: Replay,
    /// Where the reader thread learns of a new [`Replay`] (it holds a
    /// rebuild back at the gate in it).
    pub(super) reader_replay: Option<crossbeam_channel::Sender<Replay>>,
    /// Commands from the watcher and the API, and where to send them.
    pub(super) commands: crossbeam_channel::Receiver<Command>,
    pub(super) control: Control,
    /// Commands taken while backing off, obeyed once it is over.
    pub(super) deferred: VecDeque<Command>,
    /// The running version's manifest, shared with the API.
    pub(super) manifest: Arc<RwLock<Manifest>>,
    /// The running version's keyed tables, shared with the API (which routes lookups by them).
    pub(super) keyed: Arc<RwLock<KeyedTables>>,
    /// Set while this thread waits for a delivery: a reader in the middle of
    /// a long catch-up read from Kafka then hands over what it has, so that
    /// reading and handling overlap instead of taking turns.
    pub(super) hungry: Arc<AtomicBool>,
}

impl Projector {
    /// A worker for `handler`, resuming from the checkpoints in `read_model`.
    pub fn new(
        handler: Box<dyn Handler>,
        read_model: Arc<ReadModel>,
        sources: Sources,
        options: BatchOptions,
        status: Arc<Mutex<WorkerStatus>>,
    ) -> crate::store::Result<Self> {
        let manifest = handler.manifest().clone();
        let declared = Arc::new(crate::plugin::declared(&*handler).map_err(crate::store::Error::InvalidMapping)?);
        let keyed = KeyedTables::new(&manifest, handler.keyed_tables()).map_err(crate::store::Error::InvalidMapping)?;
        let subscriptions = subscriptions(&manifest);
        let checkpoints = read_model.cursor()?;
        let (control, commands) = crossbeam_channel::unbounded();
        Ok(Projector {
            handler,
            read_model,
            sources,
            watermarks: Watermarks::default(),
            options,
            status,
            stopping: false,
            declared,
            subscriptions,
            checkpoints,
            in_flight: None,
            resync: false,
            dead_in_a_row: 0,
            dead_letter_log: Default::default(),
            resume: false,
            replay: Replay::default(),
            reader_replay: None,
            commands,
            control: Control(control),
            deferred: VecDeque::new(),
            manifest: Arc::new(RwLock::new(manifest.clone())),
            keyed: Arc::new(RwLock::new(keyed)),
            hungry: Arc::default(),
        })
    }

    pub(super) fn name(&self) -> &str {
        &self.handler.manifest().name
    }

    /// Run until told to [`Command::Stop`], as a pipeline of three threads:
    /// a reader reads and decodes the next batch from the log, this thread
    /// hands the current one to the plugin, and the previous one commits
    /// meanwhile. Between batches it blocks on whichever comes first: a
    /// batch, a command, or the end of the commit in flight.
    pub fn run(mut self) {
        tracing::info!(projection = self.name(), "projector started");
        let mut reading = self.spawn_reader();
        let mut background = false;
        loop {
            while let Some(command) = self.deferred.pop_front() {
                self.obey(command);
            }
            while let Ok(command) = self.commands.try_recv() {
                self.obey(command);
            }
            if self.stopping {
                break;
            }
            let replaying = self.in_background();
            if replaying != background {
                set_background(replaying);
                background = replaying;
            }
            let commands = self.commands.clone();
            if self.paused() {
                // Take no batches; read again from the durable checkpoints once resumed.
                self.resync = true;
                if let Ok(command) = commands.recv() {
                    self.obey(command);
                }
                continue;
            }
            if self.resync {
                reading = self.read_again(reading);
            }
            // The commit in flight is settled as soon as it is done.
            let committed = self.in_flight.as_ref().map_or_else(crossbeam_channel::never, |f| f.finished.clone());
            // The count of dead letters not logged, once its interval ends.
            let count_due = self.dead_letter_log.due().map_or_else(crossbeam_channel::never, crossbeam_channel::at);
            self.hungry.store(true, Ordering::Relaxed);
            let delivery = crossbeam_channel::select! {
                recv(reading.batches) -> delivery => delivery.ok(),
                recv(commands) -> command => {
                    self.hungry.store(false, Ordering::Relaxed);
                    if let Ok(command) = command {
                        self.obey(command);
                    }
                    continue;
                },
                recv(committed) -> _ => {
                    self.hungry.store(false, Ordering::Relaxed);
                    self.settle_or_resync();
                    continue;
                },
                recv(count_due) -> _ => {
                    self.hungry.store(false, Ordering::Relaxed);
                    let name = self.handler.manifest().name.clone();
                    self.dead_letter_log.roll(&name, Instant::now());
                    continue;
                },
            };
            self.hungry.store(false, Ordering::Relaxed);
            let Some(delivery) = delivery else { break };
            match delivery {
                Delivery::Batch(pending) => {
                    // What a batch's log lines carry: which plugin version read what.
                    let span = tracing::info_span!(
                        "batch",
                        projection = self.name(),
                        version = self.handler.manifest().version.as_str(),
                        events = pending.events.len(),
                        positions = %positions(&pending),
                    );
                    let _enter = span.enter();
                    self.process(&pending);
                }
                Delivery::Failed(e) => {
                    tracing::error!(projection = self.name(), error = %e, "reading events failed");
                    self.set_error(&e);
                }
            }
        }
        self.settle_or_resync();
        reading.end();
        self.status.lock().expect("status lock").state = WorkerState::Stopped;
        tracing::info!(projection = self.name(), "projector stopped");
    }

    /// Where to send this worker commands.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    pub(super) fn obey(&mut self, command: Command) {
        match command {
            Command::Swap(next) => self.swap(next),
            Command::RetryDeadLetters(request) => {
                self.settle_or_resync();
                let report = self.retry(request.ids);
                let _ = request.reply.send(report);
            }
            Command::Resume => self.resume = true,
            Command::SetReplay(replay) => {
                if let Some(reader) = &self.reader_replay {
                    let _ = reader.send(replay.clone());
                }
                self.replay = replay;
            }
            Command::Stop => self.stopping = true,
        }
    }

    /// The running version's manifest, updated when a new version is swapped in.
    pub fn manifest(&self) -> Arc<RwLock<Manifest>> {
        self.manifest.clone()
    }

    /// The running version's keyed tables, updated with its manifest.
    pub fn keyed(&self) -> Arc<RwLock<KeyedTables>> {
        self.keyed.clone()
    }

    /// Whether the worker is paused; a resume request, or a new plugin
    /// version (see [`Projector::swap`]), ends the pause.
    pub(super) fn paused(&mut self) -> bool {
        let mut status = self.status.lock().expect("status lock");
        if status.state != WorkerState::Paused {
            return false;
        }
        if std::mem::take(&mut self.resume) {
            tracing::info!(projection = %self.handler.manifest().name, "resuming after a pause");
            status.state = WorkerState::Running;
            self.dead_in_a_row = 0;
            return false;
        }
        true
    }

    /// Swap in a new version of the plugin between batches: what the old one
    /// handled is made durable first, and the new one goes on from there.
    pub(super) fn swap(&mut self, next: Box<dyn Handler>) {
        self.settle_or_resync();
        let declared = match crate::plugin::declared(&*next) {
            Ok(d) => Arc::new(d),
            Err(e) => return self.set_error(&format!("the new plugin version was not swapped in: {e}")),
        };
        let m = next.manifest().clone();
        let keyed = match KeyedTables::new(&m, next.keyed_tables()) {
            Ok(keyed) => keyed,
            Err(e) => return self.set_error(&format!("the new plugin version was not swapped in: {e}")),
        };
        let subscriptions = subscriptions(&m);
        if subscriptions != self.subscriptions {
            // Read again from the durable checkpoints with the new subscriptions.
            self.subscriptions = subscriptions;
            self.resync = true;
        }
        tracing::info!(projection = %m.name, from = %self.handler.manifest().version, to = %m.version, "plugin version swapped in");
        self.declared = declared;
        self.handler = next;
        *self.manifest.write().expect("manifest lock") = m;
        *self.keyed.write().expect("keyed lock") = keyed;
        let mut status = self.status.lock().expect("status lock");
        status.reloads += 1;
        if status.state == WorkerState::Paused {
            // A new version is the usual fix: try it.
            self.resume = true;
        }
    }

    /// The shared high watermarks of the Kafka partitions this projection reads.
    pub fn watermarks(&self) -> Watermarks {
        self.watermarks.clone()
    }

    /// End `reading` and read again from the durable checkpoints (a resync).
    /// The commit in flight is settled first: the checkpoints it makes
    /// durable are where reading starts again, or its span would be applied
    /// twice.
    pub(super) fn read_again(&mut self, reading: ReadAhead) -> ReadAhead {
        reading.end();
        self.resync = false;
        // A failed commit sets `resync` again, with the durable checkpoints.
        self.settle_or_resync();
        self.resync = false;
        self.spawn_reader()
    }

    pub(super) fn set_error(&self, message: &str) {
        let mut status = self.status.lock().expect("status lock");
        status.last_error = Some(message.to_owned());
        status.last_error_at = Some(now_ms());
    }

    /// Read and handle one batch on this thread (no read-ahead) and wait for
    /// its commits; returns how many events it consumed (how far the durable
    /// checkpoints moved), 0 when there was nothing to do.
    pub fn step(&mut self) -> Result<usize, String> {
        let (log_streams, _) = self.sources.split(&self.subscriptions);
        let mut pending = Pending::default();
        LogReader::new(self.sources.log.clone(), log_streams).read(
            &self.checkpoints,
            self.options.max_events,
            Duration::ZERO,
            &mut pending,
        )?;
        if pending.is_empty(&self.checkpoints) {
            return Ok(0);
        }
        if self.handler.kind() == crate::plugin::Kind::Enricher {
            let mut alignment = Alignment::default();
            align_event_time(&mut pending, &self.sources.log, &self.watermarks, &self.checkpoints, &mut alignment);
        }
        let before: u64 = self.checkpoints.values().sum();
        self.process(&pending);
        self.settle_or_resync();
        self.resync = false;
        Ok((self.checkpoints.values().sum::<u64>() - before) as usize)
    }

    /// Mark this worker as replaying history, or not: while it replays,
    /// events the plugin emits are dropped, since they were published when
    /// the history was new.
    pub fn set_replaying(&mut self, replaying: bool) {
        self.set_replay(if replaying { Replay::Until(Cursor::new(), Failed::default()) } else { Replay::Live });
    }

    /// Which events this worker treats as history, before it runs; while
    /// it runs, through [`Control::set_replay`].
    pub fn set_replay(&mut self, replay: Replay) {
        self.replay = replay;
    }

    /// Ready `batch` for the call starting at `start`, and say where it
    /// ends: at most `call-events`, not past `limit`, over events that all
    /// replay history or all do not (what they emit is dropped or kept).
    /// A shard's call handles the events of one partition, so that what it
    /// emits is numbered among that partition's emits.
    pub(super) fn call(&self, batch: &mut Batch, events: &[crate::plugin::Event], start: usize, limit: usize) -> usize {
        let end = (start + self.options.call_events).min(limit);
        let first = &events[start];
        let replaying = self.replay.covers(first);
        let per_partition = self.sources.shard.is_some();
        let differs = |e: &crate::plugin::Event| {
            self.replay.covers(e) != replaying
                || (per_partition && (e.partition != first.partition || e.stream != first.stream))
        };
        batch.set_replaying(replaying);
        batch.set_source(per_partition.then_some((first.stream.as_str(), first.partition)));
        events[start + 1..end].iter().position(differs).map_or(end, |i| start + 1 + i)
    }

    /// Handle every event of `pending`. A transaction ends once it has run
    /// for `max-duration`, so transactions stay short under load; its commit
    /// runs while the next transaction is handled.
    pub(super) fn process(&mut self, pending: &Pending) {
        // A batch ending before what is already handled would move the
        // checkpoints back, and events would be applied twice: refuse it and
        // read again from the checkpoints.
        let behind = pending.read_to.iter().find(|(k, to)| **to < self.checkpoints.get(*k).copied().unwrap_or(0));
        if let Some(((stream, partition), to)) = behind {
            tracing::error!(projection = self.name(), stream, partition, to, "a batch ends before the checkpoint");
            self.resync = true;
            return;
        }
        let n = pending.events.len();
        let mut done = 0;
        // Behind, a batch ends at the catch-up size or time, or later while
        // the previous batch is still committing (the pending read leaves it
        // room up to `COMMIT_GROWTH` times that size).
        let (max_events, max_duration) = match pending.behind {
            true => self.options.catch_up_bounds(),
            false => (usize::MAX, self.options.max_duration),
        };
        let grow = pending.behind && self.options.catches_up();
        loop {
            let started = Instant::now();
            let mut batch = match self.begin() {
                Ok(b) => b,
                Err(e) => return self.recover(pending, done, n, HandleError::Host(e.to_string())),
            };
            let mut end = done;
            while end < n {
                let call_end = self.call(&mut batch, &pending.events, end, n);
                let (b, result) = self.handle_timed(batch, &pending.events[end..call_end]);
                batch = b;
                if let Err(e) = result {
                    drop(batch); // rolled back: nothing of it was written
                    return self.recover(pending, done, n, e);
                }
                end = call_end;
                let full = end - done >= max_events || started.elapsed() >= max_duration;
                if full && !(grow && self.committing()) {
                    break;
                }
            }
            let commit = self.commit_of(pending, done, end, vec![]);
            if let Err(e) = self.submit(batch, commit, started) {
                return self.start_over(e);
            }
            done = end;
            if done >= n {
                return;
            }
        }
    }

    /// Hand `events` to the plugin, counting the time spent inside it.
    pub(super) fn handle_timed(
        &mut self,
        batch: Batch,
        events: &[crate::plugin::Event],
    ) -> (Batch, Result<(), HandleError>) {
        let t = Instant::now();
        let handled = self.handler.handle(batch, events);
        self.status.lock().expect("status lock").metrics.plugin_seconds += t.elapsed().as_secs_f64();
        handled
    }

    /// Whether this worker's threads should yield the CPU (see [`set_background`]).
    pub(super) fn in_background(&self) -> bool {
        self.options.background_rebuilds && self.replay.is_history()
    }

    /// Back off for `duration` unless told to stop first; false when
    /// stopping. Other commands wait until the back-off is over.
    pub(super) fn sleep(&mut self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        while !self.stopping {
            match self.commands.recv_deadline(until) {
                Ok(Command::Stop) => self.stopping = true,
                Ok(command) => self.deferred.push_back(command),
                Err(_) => break,
            }
        }
        !self.stopping
    }
}

/// What `manifest` subscribes to, as its reader reads it.
pub(super) fn subscriptions(manifest: &Manifest) -> Subscriptions {
    manifest.subscriptions.iter().map(|s| (s.stream.clone(), s.event_types.iter().cloned().collect())).collect()
}

/// `stream/partition:first..end` for each partition a batch has events of.
fn positions(pending: &Pending) -> String {
    let mut first: BTreeMap<(&str, u32), u64> = BTreeMap::new();
    for e in &pending.events {
        let f = first.entry((e.stream.as_str(), e.partition)).or_insert(e.offset);
        *f = (*f).min(e.offset);
    }
    let ranges: Vec<String> = first
        .into_iter()
        .map(|((stream, partition), start)| {
            let end = pending.read_to.get(&(stream.to_owned(), partition)).copied().unwrap_or(start + 1);
            format!("{stream}/{partition}:{start}..{end}")
        })
        .collect();
    ranges.join(" ")
}
