//! The batch loop of one projection.
//!
//! 1. Read events after the checkpoint of each subscribed partition, up to
//!    `max-events`.
//! 2. Hand the subscribed ones to the plugin in calls of `call-events`,
//!    inside one [`Batch`]; stop early once `max-duration` has passed, so a
//!    batch grows under load but stays short.
//! 3. Commit the writes and the new checkpoints in one transaction.
//!
//! When a call fails, the batch is dropped (nothing was written) and:
//! - `transient` or host errors: the same events are retried with
//!   exponential back-off and jitter;
//! - `rejected` or a trap: the events are bisected, each half in its own
//!   batch, until the failing event stands alone; it becomes a dead letter
//!   and everything else is applied.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::clock::{Backoff, jitter, now_ms, sleep_unless};
use crate::plugin::{HandleError, Handler, Manifest};
use crate::source::Sources;
use crate::source::kafka::{Handover, KafkaReader, Watermarks};
use crate::source::log::EventLog;
use crate::source::reader::{Cursor, Delivery, LogReader, Pending, Reader, Subscriptions, hand_over};
use crate::store::read_model::Commit;
use crate::store::{Batch, BatchWrites, DeadLetter, Declared, KvLimits, ReadModel};

/// How much larger than its catch-up size a batch may grow while the
/// previous batch is still committing. redb copies every page a commit
/// touches: once a table with scattered keys (order ids) is large, any batch
/// touches most of its leaves and a commit costs about as much for 40,000
/// events as for 160,000, so when commits are the bottleneck, batches grow
/// until they are not. Where commits are cheap (appends, small tables),
/// batches stay at the catch-up size and the stages keep overlapping.
pub const COMMIT_GROWTH: u32 = 4;

/// How batches are sized and failures retried.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// The most events one batch (one transaction) reads.
    pub max_events: usize,
    /// A batch stops taking more calls once it has run this long.
    pub max_duration: Duration,
    /// The most events passed to the plugin in one call.
    pub call_events: usize,
    /// While a projection is behind (its last read filled a batch), batches
    /// take at least this many times `max_events` (or `max_duration`), and
    /// keep growing, up to [`COMMIT_GROWTH`] times more, while the previous
    /// batch is still committing: fewer, larger transactions while it
    /// catches up (a replay, a rebuild, a backlog), whose results nobody sees
    /// sooner anyway. 1 turns both off.
    pub catch_up_factor: u32,
    /// First retry delay after a transient failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub kv: KvLimits,
    /// Pause after this many dead letters in a row (0: never): a plugin that
    /// fails every event stops instead of dead-lettering the whole stream.
    pub pause_after_dead_letters: u64,
    /// Run a rebuild's threads at `SCHED_IDLE` while they replay history
    /// (see [`set_background`]).
    pub background_rebuilds: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_events: 10_000,
            max_duration: Duration::from_millis(250),
            call_events: 500,
            catch_up_factor: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            kv: KvLimits::default(),
            pause_after_dead_letters: 1_000,
            background_rebuilds: true,
        }
    }
}

impl BatchOptions {
    /// The back-off of retries after a failure.
    fn backoff(&self) -> Backoff {
        Backoff::new(self.initial_backoff, self.max_backoff)
    }

    /// Whether batches grow while catching up (a factor of 1 turns it off).
    fn catches_up(&self) -> bool {
        self.catch_up_factor > 1
    }

    /// A catch-up batch's size and time bound, before it grows.
    fn catch_up_bounds(&self) -> (usize, Duration) {
        let factor = self.catch_up_factor.max(1);
        (self.max_events.saturating_mul(factor as usize), self.max_duration.saturating_mul(factor))
    }

    /// The most events a read takes while catching up: a catch-up batch and
    /// its room to grow while the previous one commits (see `process`).
    fn catch_up_read(&self) -> usize {
        match self.catches_up() {
            true => self.catch_up_bounds().0.saturating_mul(COMMIT_GROWTH as usize),
            false => self.max_events,
        }
    }
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerState {
    Running,
    /// Waiting to retry after a transient or host failure.
    Retrying,
    /// Stopped consuming after too many dead letters in a row; resumes on
    /// request or when a new plugin version is swapped in.
    Paused,
    Stopped,
}

/// Which events replay history, so that what the plugin emits for them is
/// dropped (it was published when the history was new).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Replay {
    /// Nothing is a replay: everything emitted is published.
    #[default]
    Live,
    /// Everything is (a rebuild catching up while another generation is live).
    All,
    /// Events before these positions are (a rebuild taking over from a
    /// generation that stopped there).
    Before(Cursor),
    /// Everything is, and the reader holds back whatever lies at or after
    /// these positions: a rebuild catching up never runs ahead of the live
    /// generation (the rebuild monitor moves them to its checkpoints), so no
    /// event is ever handled as history by one generation without being
    /// handled live by the other. Except the events the live generation
    /// dead-lettered (the second field): nothing was ever emitted for them,
    /// so what the new version emits for them is published.
    Until(Cursor, Failed),
}

/// Positions (stream, partition, offset) of the live generation's dead letters.
pub type Failed = Arc<std::collections::BTreeSet<(String, u32, u64)>>;

impl Replay {
    /// Replaying history up to a gate (a rebuild before its switch).
    fn is_history(&self) -> bool {
        matches!(self, Replay::All | Replay::Until(..))
    }

    fn covers(&self, e: &crate::plugin::Event) -> bool {
        match self {
            Replay::Live => false,
            Replay::All => true,
            Replay::Until(_, failed) => {
                failed.is_empty() || !failed.contains(&(e.stream.clone(), e.partition, e.offset))
            }
            Replay::Before(h) => h.get(&(e.stream.clone(), e.partition)).is_some_and(|until| e.offset < *until),
        }
    }
}

/// Stops a reader thread: the projector's flag, or the reader's own.
#[derive(Clone)]
struct StopEither(Arc<AtomicBool>, Arc<AtomicBool>);

impl StopEither {
    fn load(&self, order: Ordering) -> bool {
        self.0.load(order) || self.1.load(order)
    }
}

/// What the watcher and the API ask of a worker. The worker waits on these
/// and on its batches together, so a command is taken at once, between
/// two batches.
pub enum Command {
    /// Swap in a new version of the plugin: what the old one handled is
    /// committed first, and the new one goes on from there.
    Swap(Box<dyn Handler>),
    /// Hand dead letters to the plugin again.
    RetryDeadLetters(RetryRequest),
    /// End a pause after too many dead letters in a row.
    Resume,
}

/// Where to send a worker its [`Command`]s.
#[derive(Clone)]
pub struct Control(crossbeam_channel::Sender<Command>);

impl Control {
    /// Ask the worker to run `next` from the next batch on.
    pub fn swap(&self, next: Box<dyn Handler>) {
        self.send(Command::Swap(next));
    }

    /// Ask the worker to retry dead letters; the report comes on `request.reply`.
    pub fn retry(&self, request: RetryRequest) {
        self.send(Command::RetryDeadLetters(request));
    }

    /// Ask the worker to end its pause.
    pub fn resume(&self) {
        self.send(Command::Resume);
    }

    /// A worker that has stopped takes no commands: a swap or a request
    /// sent to it is dropped (a retry's caller sees its reply channel close).
    fn send(&self, command: Command) {
        let _ = self.0.send(command);
    }
}

/// Dead letters to retry (all of them when `ids` is `None`), and where to
/// send what came of it. The worker takes them between batches.
pub struct RetryRequest {
    pub ids: Option<Vec<u64>>,
    pub reply: mpsc::Sender<RetryReport>,
}

/// What a retry of dead letters did.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryReport {
    /// Letters whose events the plugin has now handled: applied and removed.
    pub applied: Vec<u64>,
    /// Letters that failed again (each keeps its event, with the new error).
    pub failed: Vec<RetryFailure>,
    /// Ids asked for that are not dead letters.
    pub missing: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct RetryFailure {
    pub id: u64,
    pub error: String,
}

/// A worker's live status, shared with the HTTP API.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub state: WorkerState,
    pub last_error: Option<String>,
    /// When `last_error` happened (ms since the Unix epoch).
    pub last_error_at: Option<i64>,
    /// Consecutive retries of the current batch.
    pub retries: u32,
    /// New plugin versions swapped in since the worker started.
    pub reloads: u32,
    /// Latency and where the time goes, for `/metrics`.
    #[serde(skip)]
    pub metrics: crate::telemetry::BatchMetrics,
}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            state: WorkerState::Running,
            last_error: None,
            last_error_at: None,
            retries: 0,
            reloads: 0,
            metrics: Default::default(),
        }
    }
}

/// The worker of one projection.
pub struct Projector {
    handler: Box<dyn Handler>,
    read_model: Arc<ReadModel>,
    sources: Sources,
    /// High watermarks of the Kafka partitions read, for the status.
    watermarks: Watermarks,
    options: BatchOptions,
    status: Arc<Mutex<WorkerStatus>>,
    stop: Arc<AtomicBool>,
    /// The tables and indexes the plugin declared.
    declared: Arc<Declared>,
    subscriptions: Subscriptions,
    /// Durable checkpoints: what the read model holds.
    checkpoints: Cursor,
    /// The commit running on its own thread while the next batch is handled.
    in_flight: Option<InFlight>,
    /// Set when in-memory progress was dropped: reading must restart from `checkpoints`.
    resync: bool,
    /// Dead letters committed since the last batch that applied an event.
    dead_in_a_row: u64,
    /// Set by a [`Command::Resume`] (or a new version) to end a pause.
    resume: bool,
    /// Which events replay history (a rebuild): what the plugin emits for them is dropped.
    replay: Arc<Mutex<Replay>>,
    /// Commands from the watcher and the API, and where to send them.
    commands: crossbeam_channel::Receiver<Command>,
    control: Control,
    /// The running version's manifest, shared with the API.
    manifest: Arc<RwLock<Manifest>>,
    /// Set while this thread waits for a delivery: a reader in the middle of
    /// a long catch-up read from Kafka then hands over what it has, so that
    /// reading and handling overlap instead of taking turns.
    hungry: Arc<AtomicBool>,
}

struct InFlight {
    commit: Commit,
    /// Also the lower layer of the batch handled meanwhile.
    writes: Arc<BatchWrites>,
    /// When its transaction started, for the batch latency.
    started: Instant,
    /// The commit, and how long it took.
    done: std::thread::JoinHandle<crate::store::Result<Duration>>,
}

/// The thread reading batches ahead of the worker.
struct ReadAhead {
    batches: crossbeam_channel::Receiver<Delivery>,
    thread: std::thread::JoinHandle<()>,
    /// Stops this reader alone (a resync): it may be idle, never sending, so
    /// a dropped channel alone would not end it.
    stop: Arc<AtomicBool>,
}

impl ReadAhead {
    fn end(self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.batches); // a reader blocked on a full channel returns
        let _ = self.thread.join();
    }
}

enum Retry {
    Done,
    Stopped,
}

impl Projector {
    /// A worker for `handler`, resuming from the checkpoints in `read_model`.
    pub fn new(
        handler: Box<dyn Handler>,
        read_model: Arc<ReadModel>,
        sources: Sources,
        options: BatchOptions,
        status: Arc<Mutex<WorkerStatus>>,
        stop: Arc<AtomicBool>,
    ) -> crate::store::Result<Self> {
        let manifest = handler.manifest().clone();
        let declared = Arc::new(crate::plugin::declared(&*handler).map_err(crate::store::Error::InvalidMapping)?);
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
            stop,
            declared,
            subscriptions,
            checkpoints,
            in_flight: None,
            resync: false,
            dead_in_a_row: 0,
            resume: false,
            replay: Arc::default(),
            commands,
            control: Control(control),
            manifest: Arc::new(RwLock::new(manifest.clone())),
            hungry: Arc::default(),
        })
    }

    fn name(&self) -> &str {
        &self.handler.manifest().name
    }

    /// Run until `stop` is set, as a pipeline of three threads: a reader
    /// reads and decodes the next batch from the log, this thread hands the
    /// current one to the plugin, and the previous one commits meanwhile.
    pub fn run(mut self) {
        tracing::info!(projection = self.name(), "projector started");
        let mut reading = self.spawn_reader();
        let mut background = false;
        while !self.stop.load(Ordering::Relaxed) {
            let replaying = self.in_background();
            if replaying != background {
                set_background(replaying);
                background = replaying;
            }
            while let Ok(command) = self.commands.try_recv() {
                self.obey(command);
            }
            let commands = self.commands.clone();
            if self.paused() {
                // Take no batches; read again from the durable checkpoints once
                // resumed. A Kafka group handing partitions over still gets its
                // answer: nothing is in flight, the checkpoints are final.
                self.resync = true;
                crossbeam_channel::select! {
                    recv(reading.batches) -> delivery => if let Ok(Delivery::Revoke { ack }) = delivery {
                        let _ = ack.send(());
                    },
                    recv(commands) -> command => if let Ok(command) = command {
                        self.obey(command);
                    },
                    default(Duration::from_millis(25)) => {}
                }
                continue;
            }
            if self.resync {
                reading = self.read_again(reading);
            }
            // A commit in flight is settled soon after it is done; idle, the
            // loop comes round for the stop flag.
            let wait = if self.in_flight.is_some() { Duration::from_millis(2) } else { Duration::from_millis(25) };
            self.hungry.store(true, Ordering::Relaxed);
            let delivery = crossbeam_channel::select! {
                recv(reading.batches) -> delivery => delivery.map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
                recv(commands) -> command => {
                    self.hungry.store(false, Ordering::Relaxed);
                    if let Ok(command) = command {
                        self.obey(command);
                    }
                    continue;
                },
                default(wait) => Err(crossbeam_channel::RecvTimeoutError::Timeout),
            };
            self.hungry.store(false, Ordering::Relaxed);
            match delivery {
                Ok(Delivery::Batch(pending)) => {
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
                Ok(Delivery::Failed(e)) => {
                    tracing::error!(projection = self.name(), error = %e, "reading events failed");
                    self.set_error(&e);
                }
                Ok(Delivery::Revoke { ack }) => {
                    self.settle_or_resync();
                    let _ = ack.send(());
                }
                // Nothing new: make sure the last commit is settled.
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => self.settle_or_resync(),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
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

    fn obey(&mut self, command: Command) {
        match command {
            Command::Swap(next) => self.swap(next),
            Command::RetryDeadLetters(request) => {
                self.settle_or_resync();
                let report = self.retry(request.ids);
                let _ = request.reply.send(report);
            }
            Command::Resume => self.resume = true,
        }
    }

    /// The running version's manifest, updated when a new version is swapped in.
    pub fn manifest(&self) -> Arc<RwLock<Manifest>> {
        self.manifest.clone()
    }

    /// Whether the worker is paused; a resume request, or a new plugin
    /// version (see [`Projector::swap`]), ends the pause.
    fn paused(&mut self) -> bool {
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
    fn swap(&mut self, next: Box<dyn Handler>) {
        self.settle_or_resync();
        let declared = match crate::plugin::declared(&*next) {
            Ok(d) => Arc::new(d),
            Err(e) => return self.set_error(&format!("the new plugin version was not swapped in: {e}")),
        };
        let m = next.manifest().clone();
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
    fn read_again(&mut self, reading: ReadAhead) -> ReadAhead {
        reading.end();
        self.resync = false;
        // A failed commit sets `resync` again, with the durable checkpoints.
        self.settle_or_resync();
        self.resync = false;
        self.spawn_reader()
    }

    /// Start the thread that reads batches ahead, from the durable checkpoints on.
    fn spawn_reader(&self) -> ReadAhead {
        // One batch in the channel and one being read: enough to keep the worker busy.
        let (tx, rx) = crossbeam_channel::bounded::<Delivery>(1);
        let (sources, subscriptions, read_model) =
            (self.sources.clone(), self.subscriptions.clone(), self.read_model.clone());
        let (name, watermarks) = (self.name().to_owned(), self.watermarks.clone());
        let mut cursor = self.checkpoints.clone();
        let max_events = self.options.max_events;
        let catch_up_events = self.options.catch_up_read();
        let background_rebuilds = self.options.background_rebuilds;
        let backoff = self.options.initial_backoff;
        // Enrichers keep clocks (windows, joins): they get events in event-time order.
        let align = self.handler.kind() == crate::plugin::Kind::Enricher;
        let replay = self.replay.clone();
        let projector_stop = self.stop.clone();
        let hungry = self.hungry.clone();
        let reader_stop = Arc::new(AtomicBool::new(false));
        let stop = StopEither(projector_stop, reader_stop.clone());
        std::thread::Builder::new()
            .name(format!("reader-{name}"))
            .spawn(move || {
                let mut background = false;
                let mut readers: Vec<Box<dyn Reader>> = Vec::new();
                let (log_streams, kafka_streams) = sources.split(&subscriptions);
                if !log_streams.is_empty() {
                    readers.push(Box::new(LogReader::new(sources.log.clone(), log_streams)));
                }
                while !kafka_streams.is_empty() {
                    let opened = KafkaReader::open(
                        &sources.kafka,
                        &name,
                        &kafka_streams,
                        read_model.clone(),
                        watermarks.clone(),
                        tx.clone(),
                        Handover { hungry: hungry.clone(), after: max_events },
                    );
                    match opened {
                        Ok(kafka) => {
                            readers.extend(kafka.map(|k| Box::new(k) as Box<dyn Reader>));
                            break;
                        }
                        Err(e) => {
                            if stop.load(Ordering::Relaxed) || tx.send(Delivery::Failed(e)).is_err() {
                                return;
                            }
                            std::thread::sleep(backoff);
                        }
                    }
                }
                // Waiting for news is shared between the readers.
                let idle_wait = Duration::from_millis(200) / readers.len().max(1) as u32;
                let (mut idle, mut behind) = (false, false);
                let mut alignment = Alignment::default();
                while !stop.load(Ordering::Relaxed) {
                    let wait = if idle { idle_wait } else { Duration::ZERO };
                    let mut pending = Pending::new(behind);
                    let limit = if behind { catch_up_events } else { max_events };
                    let mut failed = None;
                    for r in &mut readers {
                        let room = limit.saturating_sub(pending.events.len()).max(1);
                        if let Err(e) = r.read(&cursor, room, wait, &mut pending) {
                            failed = Some(e);
                        }
                    }
                    if let Some(e) = failed.filter(|_| pending.is_empty(&cursor)) {
                        if tx.send(Delivery::Failed(e)).is_err() {
                            return;
                        }
                        std::thread::sleep(backoff);
                        continue;
                    }
                    idle = pending.is_empty(&cursor);
                    // A full read means more is waiting: the next batch may be larger.
                    behind = pending.events.len() >= max_events;
                    if idle {
                        if readers.is_empty() {
                            std::thread::sleep(idle_wait);
                        }
                        continue;
                    }
                    let (gated, history) = {
                        let replay = replay.lock().expect("replay lock");
                        (matches!(*replay, Replay::Until(..)), replay.is_history())
                    };
                    if background_rebuilds && history != background {
                        set_background(history);
                        background = history;
                    }
                    if align || gated {
                        let read_to = pending.read_to.clone();
                        if align {
                            align_event_time(&mut pending, &sources.log, &watermarks, &cursor, &mut alignment);
                        }
                        if let Replay::Until(limit, _) = &*replay.lock().expect("replay lock") {
                            pending.hold_back(limit, &cursor);
                        }
                        // What was handed back must be read again (Kafka consumers have moved on).
                        let handed_back: Cursor = pending
                            .read_to
                            .iter()
                            .filter(|(k, to)| read_to.get(*k).is_some_and(|before| *to < before))
                            .map(|(k, to)| (k.clone(), *to))
                            .collect();
                        if !handed_back.is_empty() {
                            for r in &mut readers {
                                if let Err(e) = r.rewind(&handed_back) {
                                    tracing::warn!(projection = %name, error = %e, "rewinding a reader");
                                }
                            }
                            if pending.is_empty(&cursor) {
                                std::thread::sleep(idle_wait);
                                continue;
                            }
                        }
                    }
                    cursor.extend(pending.read_to.iter().map(|(k, v)| (k.clone(), *v)));
                    if !hand_over(&tx, pending, &mut readers, &mut cursor, &|| stop.load(Ordering::Relaxed)) {
                        return;
                    }
                }
            })
            .map(|thread| ReadAhead { batches: rx, thread, stop: reader_stop })
            .expect("spawn a reader thread")
    }

    fn set_error(&self, message: &str) {
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
        *self.replay.lock().expect("replay lock") =
            if replaying { Replay::Until(Cursor::new(), Failed::default()) } else { Replay::Live };
    }

    /// The worker's replay mode, to change while it runs (a rebuild's switch).
    pub fn replay(&self) -> Arc<Mutex<Replay>> {
        self.replay.clone()
    }

    fn begin(&self) -> crate::store::Result<Batch> {
        let below = self.in_flight.as_ref().map(|f| f.writes.clone());
        self.read_model.begin(self.declared.clone(), self.options.kv, below)
    }

    /// The end of the call starting at `start` (at most `call-events`, not
    /// past `limit`) over events that all replay history or all do not, and
    /// which of the two they do.
    fn call(&self, events: &[crate::plugin::Event], start: usize, limit: usize) -> (usize, bool) {
        let end = (start + self.options.call_events).min(limit);
        let replay = self.replay.lock().expect("replay lock");
        let first = replay.covers(&events[start]);
        let same = events[start + 1..end].iter().position(|e| replay.covers(e) != first);
        (same.map_or(end, |i| start + 1 + i), first)
    }

    /// Whether the previous batch is still being committed.
    fn committing(&self) -> bool {
        self.in_flight.as_ref().is_some_and(|f| !f.done.is_finished())
    }

    /// Wait for the commit in flight, if any; on success its checkpoints become durable.
    fn settle(&mut self) -> Result<(), HandleError> {
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

    fn settle_or_resync(&mut self) {
        if let Err(e) = self.settle() {
            self.start_over(e);
        }
    }

    /// A commit failed: drop all progress not yet durable, wait, and read
    /// again from the durable checkpoints.
    fn start_over(&mut self, error: HandleError) {
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
    fn submit(&mut self, batch: Batch, commit: Commit, started: Instant) -> Result<(), HandleError> {
        let writes = Arc::new(batch.into_writes());
        self.settle()?;
        let (read_model, w, c) = (self.read_model.clone(), writes.clone(), commit.clone());
        let background = self.in_background();
        let done = std::thread::Builder::new()
            .name("refract-commit".into())
            .spawn(move || {
                if background {
                    set_background(true);
                }
                let t = Instant::now();
                read_model.commit(&w, &c).map(|()| t.elapsed())
            })
            .map_err(|e| HandleError::Host(format!("spawning a commit thread: {e}")))?;
        self.in_flight = Some(InFlight { commit, writes, started, done });
        Ok(())
    }

    /// Handle every event of `pending`. A transaction ends once it has run
    /// for `max-duration`, so transactions stay short under load; its commit
    /// runs while the next transaction is handled.
    fn process(&mut self, pending: &Pending) {
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
                let (call_end, replaying) = self.call(&pending.events, end, n);
                batch.set_replaying(replaying);
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

    /// Hand the events of dead letters `ids` (all when `None`) to the plugin
    /// again, one at a time, as it is now: an event it handles is applied,
    /// its letter removed in the same transaction; one that fails again
    /// keeps its letter, with the new error. The events come from the log
    /// (with their headers) when it still has them, else from the letter.
    fn retry(&mut self, ids: Option<Vec<u64>>) -> RetryReport {
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
    fn event_of(&self, letter: &DeadLetter) -> crate::plugin::Event {
        let from_log = self.sources.log.read(&letter.stream, letter.partition, letter.offset, 1, usize::MAX).ok();
        if let Some(event) = from_log.and_then(|mut events| events.pop()).filter(|e| e.offset == letter.offset) {
            return event;
        }
        event_in(letter)
    }

    /// What committing `events[from..to]` of `pending` writes besides the
    /// batch: checkpoints, counters, `dead_letters` and the undecodable
    /// records the checkpoints pass.
    fn commit_of(&self, pending: &Pending, from: usize, to: usize, mut dead_letters: Vec<DeadLetter>) -> Commit {
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
            error: u.error,
            failed_at: now,
        }));
        Commit { checkpoints: pending.checkpoints_after(to), applied, dead_letters, retired: Vec::new() }
    }

    fn committed(&mut self, commit: &Commit) {
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

    /// Handle `events[lo..hi]` in one batch and commit it before returning.
    fn run_range(&mut self, pending: &Pending, lo: usize, hi: usize) -> Result<(), HandleError> {
        let started = Instant::now();
        let mut batch = self.begin().map_err(|e| HandleError::Host(e.to_string()))?;
        let mut start = lo;
        while start < hi {
            let (end, replaying) = self.call(&pending.events, start, hi);
            batch.set_replaying(replaying);
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

    /// Commit on this thread (bisection and dead letters), timed for `/metrics`.
    fn commit_now(&self, writes: &BatchWrites, commit: &Commit, started: Instant) -> crate::store::Result<()> {
        let t = Instant::now();
        self.read_model.commit(writes, commit)?;
        self.record_commit(t.elapsed(), started);
        Ok(())
    }

    /// A commit that `took` this long, of a transaction `started` then, for `/metrics`.
    fn record_commit(&self, took: Duration, started: Instant) {
        let mut status = self.status.lock().expect("status lock");
        status.metrics.storage_seconds += took.as_secs_f64();
        status.metrics.batch_seconds.observe(started.elapsed());
    }

    /// Hand `events` to the plugin, counting the time spent inside it.
    fn handle_timed(&mut self, batch: Batch, events: &[crate::plugin::Event]) -> (Batch, Result<(), HandleError>) {
        let t = Instant::now();
        let handled = self.handler.handle(batch, events);
        self.status.lock().expect("status lock").metrics.plugin_seconds += t.elapsed().as_secs_f64();
        handled
    }

    /// Whether this worker's threads should yield the CPU (see [`set_background`]).
    fn in_background(&self) -> bool {
        self.options.background_rebuilds && self.replay.lock().expect("replay lock").is_history()
    }

    /// `events[lo..hi]` failed with `error`: settle the commit in flight, then
    /// retry, or bisect down to the poison event.
    fn recover(&mut self, pending: &Pending, lo: usize, hi: usize, error: HandleError) {
        if let Err(e) = self.settle() {
            return self.start_over(e);
        }
        let _ = self.recover_range(pending, lo, hi, error);
    }

    fn recover_range(&mut self, pending: &Pending, lo: usize, hi: usize, error: HandleError) -> Retry {
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

    fn dead_letter(&mut self, pending: &Pending, at: usize, error: &HandleError) -> Retry {
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

    /// Sleep for `duration` unless asked to stop; false when stopping.
    fn sleep(&self, duration: Duration) -> bool {
        sleep_unless(&self.stop, duration)
    }
}

/// What `manifest` subscribes to, as its reader reads it.
fn subscriptions(manifest: &Manifest) -> Subscriptions {
    manifest.subscriptions.iter().map(|s| (s.stream.clone(), s.event_types.iter().cloned().collect())).collect()
}

/// A rebuild's threads (replaying history behind the live generation) run at
/// `SCHED_IDLE`: they take only CPU nothing else wants, and give a core up
/// the moment a query or the live worker wakes. At normal priority a waking
/// query thread waited up to a scheduler tick (4 ms) for a core on a busy
/// machine: p99 went from 0.4 to 4 ms during a rebuild; with this, 0.7 ms.
/// The price: on a machine kept fully busy by other work, a rebuild waits.
fn set_background(background: bool) {
    #[cfg(target_os = "linux")]
    {
        let policy = if background { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: changes the scheduling policy of the calling thread only (pid 0).
        if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not change a thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = background;
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

/// The event a dead letter keeps (a Kafka record's, whose topic may have
/// dropped it): its headers and content type as they were, and data that is
/// not JSON as the text it was, not that text quoted as a JSON string.
fn event_in(letter: &DeadLetter) -> crate::plugin::Event {
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

/// How long a Kafka partition that has never delivered a record may hold
/// the others back while it has events waiting (its first fetch is slow):
/// like Kafka Streams' `max.task.idle.ms`, so a partition that cannot be
/// read never stalls the rest for good.
const FIRST_FETCH_WAIT: Duration = Duration::from_secs(5);

/// What event-time alignment remembers between reads: how far in event time
/// each partition has been read, and since when a never-read one waits.
#[derive(Default)]
struct Alignment {
    times: BTreeMap<(String, u32), i64>,
    waiting_since: BTreeMap<(String, u32), Instant>,
}

/// [`Pending::align_event_time`], with a partition exhausted once read to
/// its head (the log's, or the Kafka high watermark; a partition whose
/// watermark is not known yet is not exhausted). Kafka partitions with
/// events waiting that this read did not reach bound the others at the time
/// they were last read to (never read: hold everything, up to
/// [`FIRST_FETCH_WAIT`]).
fn align_event_time(
    pending: &mut Pending,
    log: &EventLog,
    watermarks: &Watermarks,
    cursor: &Cursor,
    memory: &mut Alignment,
) {
    for (k, t) in &pending.read_times {
        let known = memory.times.entry(k.clone()).or_insert(*t);
        *known = (*known).max(*t);
        memory.waiting_since.remove(k);
    }
    let heads = watermarks.lock().expect("watermarks lock").clone();
    let now = Instant::now();
    let unread: Vec<((String, u32), i64)> = heads
        .iter()
        .filter(|(k, head)| !pending.read_to.contains_key(*k) && cursor.get(*k).copied().unwrap_or(0) < **head)
        .filter_map(|(k, _)| match memory.times.get(k) {
            Some(t) => Some((k.clone(), *t)),
            None => {
                let since = *memory.waiting_since.entry(k.clone()).or_insert(now);
                (now - since < FIRST_FETCH_WAIT).then(|| (k.clone(), i64::MIN))
            }
        })
        .collect();
    pending.align_event_time(
        |stream, partition, read_to| {
            let head = match log.heads(stream) {
                Some(heads) => heads.get(partition as usize).copied(),
                None => heads.get(&(stream.to_owned(), partition)).copied(),
            };
            head.is_some_and(|head| read_to >= head)
        },
        &unread,
    );
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use refract_sdk::{Event as SdkEvent, Failure, Manifest, Projection, Table};
    use serde_json::json;

    use super::*;
    use crate::plugin::native::NativeProjection;
    use crate::source::NewEvent;
    use crate::source::log::EventLog;
    use crate::source::log::LogOptions;

    const SEEN: Table<u64> = Table::new("seen");
    const TOTAL: Table<u64> = Table::new("total");

    thread_local! {
        static FLAKES_LEFT: Cell<u32> = const { Cell::new(0) };
    }

    /// Counts events (read-modify-write: applying one twice would show) and
    /// fails on request: `Bad` is rejected, `Boom` panics, `Flaky` is transient
    /// while `FLAKES_LEFT` > 0.
    struct Counter;

    impl Projection for Counter {
        fn manifest() -> Manifest {
            Manifest::new("counter", "1.2.3")
                .subscribe("s", &["Ok", "Bad", "Boom", "Flaky", "Emit"])
                .table(&SEEN)
                .table(&TOTAL)
        }

        fn apply(e: &SdkEvent) -> Result<(), Failure> {
            match e.event_type.as_str() {
                "Bad" => return Err(Failure::rejected(format!("bad event at {}", e.offset))),
                "Boom" => panic!("boom at {}", e.offset),
                "Flaky" if FLAKES_LEFT.get() > 0 => {
                    FLAKES_LEFT.set(FLAKES_LEFT.get() - 1);
                    return Err(Failure::transient("try again"));
                }
                "Emit" => refract_sdk::emit(
                    "echoes",
                    refract_sdk::NewEvent::json("Echo", &format!("{}/{}", e.partition, e.offset))?.time(e.time),
                )?,
                _ => {}
            }
            SEEN.put(&format!("{}/{:04}", e.partition, e.offset), &e.offset)?;
            let total = TOTAL.get("all")?.unwrap_or(0);
            TOTAL.put("all", &(total + 1))
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        log: Arc<EventLog>,
        read_model: Arc<ReadModel>,
        status: Arc<Mutex<WorkerStatus>>,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let options = LogOptions { default_partitions: 2, ..LogOptions::default() };
            let log = Arc::new(EventLog::open(&dir.path().join("log.redb"), options).unwrap());
            let read_model = Arc::new(ReadModel::open(&dir.path().join("rm.redb")).unwrap());
            Fixture { _dir: dir, log, read_model, status: Arc::default() }
        }

        fn append(&self, types: &[&str]) {
            let events: Vec<NewEvent> = types
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    serde_json::from_value(json!({"type": t, "key": format!("k{}", i % 7), "data": {}})).unwrap()
                })
                .collect();
            self.log.append("s", &events).unwrap();
        }

        fn projector(&self, options: BatchOptions) -> Projector {
            self.stoppable_projector(options, Arc::new(AtomicBool::new(false)))
        }

        fn stoppable_projector(&self, options: BatchOptions, stop: Arc<AtomicBool>) -> Projector {
            let handler = Box::new(NativeProjection::new(Counter::manifest(), Counter::handle));
            Projector::new(
                handler,
                self.read_model.clone(),
                crate::source::Sources::log(self.log.clone()),
                options,
                self.status.clone(),
                stop,
            )
            .unwrap()
        }

        fn drain(&self, projector: &mut Projector) {
            while projector.step().unwrap() > 0 {}
        }

        fn total(&self) -> u64 {
            self.read_model.get("total", "all").unwrap().map_or(0, |v| serde_json::from_slice(&v).unwrap())
        }
    }

    fn fast() -> BatchOptions {
        BatchOptions { call_events: 8, initial_backoff: Duration::from_millis(1), ..BatchOptions::default() }
    }

    /// A dead letter from Kafka (not in the embedded log) is retried as the
    /// event it was: the same headers, content type and bytes.
    #[test]
    fn a_dead_letter_retries_with_its_headers_content_type_and_bytes() {
        let letter = |data: serde_json::Value, content_type: Option<&str>| DeadLetter {
            stream: "payments".into(),
            topic: Some("payments.v1".into()),
            partition: 2,
            offset: 7,
            key: Some("k".into()),
            event_type: "PaymentReceived".into(),
            time: 5,
            data,
            headers: vec![("ce_source".into(), "bank".into()), ("trace".into(), "t-1".into())],
            content_type: content_type.map(str::to_owned),
            plugin_version: "1".into(),
            error: "rejected".into(),
            failed_at: 6,
        };
        let text = event_in(&letter(serde_json::json!("\"quoted\" text"), Some("text/plain")));
        assert_eq!(text.data, b"\"quoted\" text");
        assert_eq!(text.content_type, "text/plain");
        assert_eq!(text.headers, [("ce_source".to_owned(), "bank".to_owned()), ("trace".to_owned(), "t-1".to_owned())]);
        let json = event_in(&letter(serde_json::json!({"amount": 1}), None));
        assert_eq!((json.data.as_slice(), json.content_type.as_str()), (&br#"{"amount":1}"#[..], "application/json"));
        // A letter stored before these fields existed still reads.
        let old = r#"{"stream":"s","partition":0,"offset":1,"key":null,"type":"T","time":0,"data":1,"pluginVersion":"1","error":"e","failedAt":0}"#;
        let old: DeadLetter = serde_json::from_str(old).unwrap();
        assert!(old.headers.is_empty() && old.content_type.is_none());
    }

    #[test]
    fn bisection_dead_letters_only_the_poison_events() {
        let f = Fixture::new();
        let mut types = vec!["Ok"; 100];
        for at in [3, 40, 41, 77] {
            types[at] = "Bad";
        }
        types[60] = "Boom";
        f.append(&types);
        let mut p = f.projector(fast());
        f.drain(&mut p);

        assert_eq!(f.total(), 95, "every good event applied exactly once");
        let letters = f.read_model.dead_letters(0, 100).unwrap();
        assert_eq!(letters.len(), 5);
        assert!(letters.iter().all(|(_, l)| l.plugin_version == "1.2.3"));
        let boom = letters.iter().find(|(_, l)| l.event_type == "Boom").unwrap();
        assert!(boom.1.error.contains("trap: plugin panicked: boom at"), "{}", boom.1.error);
        let counters = f.read_model.counters().unwrap();
        assert_eq!((counters.events_applied, counters.dead_letters), (95, 5));
        let heads = f.log.heads("s").unwrap();
        let checkpoints: Vec<u64> = f.read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).collect();
        assert_eq!(checkpoints, heads);
    }

    #[test]
    fn a_new_worker_resumes_from_the_checkpoint_without_reapplying() {
        let f = Fixture::new();
        f.append(&["Ok"; 50]);
        let mut p = f.projector(fast());
        f.drain(&mut p);
        drop(p);
        f.append(&["Ok"; 30]);
        let mut p = f.projector(fast());
        f.drain(&mut p);
        assert_eq!(f.total(), 80);
        assert_eq!(f.read_model.counters().unwrap().events_applied, 80);
    }

    #[test]
    fn a_resumed_rebuild_holds_back_until_its_gate_is_set_and_reads_nothing_twice() {
        let f = Fixture::new();
        f.append(&["Ok"; 50]);
        let mut p = f.projector(fast());
        f.drain(&mut p);
        drop(p);
        f.append(&["Ok"; 20]);
        // A rebuild's worker after a restart: replaying from its checkpoints,
        // the gate at the live generation's checkpoints not set yet.
        let stop = Arc::new(AtomicBool::new(false));
        let mut p = f.stoppable_projector(fast(), stop.clone());
        p.set_replaying(true);
        let replay = p.replay();
        let worker = std::thread::spawn(move || p.run());
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(f.total(), 50, "nothing read past the unset gate, nothing read again");
        let heads: Cursor =
            f.log.heads("s").unwrap().into_iter().enumerate().map(|(p, h)| (("s".to_owned(), p as u32), h)).collect();
        *replay.lock().unwrap() = Replay::Until(heads.clone(), Failed::default());
        let until = Instant::now() + Duration::from_secs(10);
        while f.read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).sum::<u64>() < 70 {
            assert!(Instant::now() < until, "the gated worker did not catch up");
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap();
        assert_eq!(f.total(), 70, "every event applied once");
        assert_eq!(f.read_model.counters().unwrap().events_applied, 70);
    }

    /// The scheduling policy of this process's thread named `name` (Linux: field 41 of its stat).
    #[cfg(target_os = "linux")]
    fn policy_of(name: &str) -> Option<u32> {
        for task in std::fs::read_dir("/proc/self/task").ok()? {
            let dir = task.ok()?.path();
            if std::fs::read_to_string(dir.join("comm")).ok()?.trim() == name {
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                // Fields after the parenthesised name, which may contain spaces.
                let rest = &stat[stat.rfind(')')? + 2..];
                return rest.split(' ').nth(38)?.parse().ok();
            }
        }
        None
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_rebuild_replays_at_idle_priority_and_goes_live_at_normal_priority() {
        let f = Fixture::new();
        f.append(&["Ok"; 20]);
        let stop = Arc::new(AtomicBool::new(false));
        let mut p = f.stoppable_projector(fast(), stop.clone());
        p.set_replaying(true);
        let replay = p.replay();
        let worker = std::thread::Builder::new().name("rebuild-test".into()).spawn(move || p.run()).unwrap();
        let wait_for = |policy: u32| {
            let until = Instant::now() + Duration::from_secs(5);
            while policy_of("rebuild-test") != Some(policy) {
                assert!(Instant::now() < until, "policy {:?}, wanted {policy}", policy_of("rebuild-test"));
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_for(libc::SCHED_IDLE as u32);
        // The switch: it handles live events from here on, at normal priority.
        *replay.lock().unwrap() = Replay::Live;
        wait_for(libc::SCHED_OTHER as u32);
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap();
    }

    #[test]
    fn transient_failures_are_retried_with_back_off_not_dead_lettered() {
        let f = Fixture::new();
        f.append(&["Ok", "Flaky", "Ok"]);
        FLAKES_LEFT.set(3);
        let mut p = f.projector(fast());
        f.drain(&mut p);
        assert_eq!(f.total(), 3);
        assert!(f.read_model.dead_letters(0, 10).unwrap().is_empty());
        let status = f.status.lock().unwrap();
        assert_eq!(status.state, WorkerState::Running);
        assert!(status.last_error.as_deref().unwrap().contains("transient: try again"));
    }

    #[test]
    fn unsubscribed_event_types_advance_the_checkpoint_without_reaching_the_plugin() {
        let f = Fixture::new();
        f.append(&["Ok", "Other", "Other", "Ok"]);
        let mut p = f.projector(fast());
        f.drain(&mut p);
        assert_eq!(f.total(), 2);
        let next: u64 = f.read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).sum();
        assert_eq!(next, 4);
    }

    #[test]
    fn a_time_bounded_batch_commits_what_it_handled_and_the_rest_follows() {
        let f = Fixture::new();
        f.append(&["Ok"; 200]);
        // A zero duration ends every transaction after its first call.
        let options = BatchOptions { max_duration: Duration::ZERO, ..fast() };
        let mut p = f.projector(options);
        assert_eq!(p.step().unwrap(), 200);
        let counters = f.read_model.counters().unwrap();
        assert_eq!((counters.events_applied, counters.batches), (200, 200_u64.div_ceil(8)));
        assert_eq!(f.total(), 200);
    }

    #[test]
    fn a_projection_that_is_behind_catches_up_in_larger_batches() {
        let batches_for = |catch_up_factor: u32| {
            let f = Fixture::new();
            f.append(&["Ok"; 1000]);
            let stop = Arc::new(AtomicBool::new(false));
            let options = BatchOptions { max_events: 100, catch_up_factor, ..fast() };
            let p = f.stoppable_projector(options, stop.clone());
            let worker = std::thread::spawn(move || p.run());
            let until = Instant::now() + Duration::from_secs(10);
            while f.read_model.counters().unwrap().events_applied < 1000 {
                assert!(Instant::now() < until, "caught up");
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
            worker.join().unwrap();
            assert_eq!(f.total(), 1000);
            f.read_model.counters().unwrap().batches
        };
        // At least ten batches of at most 100; behind, up to 400 at a time.
        let (normal, catching_up) = (batches_for(1), batches_for(4));
        assert!(normal >= 10 && catching_up * 2 <= normal, "{catching_up} batches against {normal}");
    }

    #[test]
    fn a_batch_behind_grows_while_the_previous_one_is_still_committing() {
        let batches_for = |options: BatchOptions| {
            let f = Fixture::new();
            f.append(&["Ok"; 800]);
            let mut p = f.projector(options);
            // The previous batch's commit takes 300 ms (as a large table's may).
            let done = std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                Ok(Duration::from_millis(300))
            });
            let commit = Commit { checkpoints: Vec::new(), applied: 0, dead_letters: Vec::new(), retired: Vec::new() };
            let writes = Arc::new(p.begin().unwrap().into_writes());
            p.in_flight = Some(InFlight { commit, writes, started: Instant::now(), done });
            let (log_streams, _) = p.sources.split(&p.subscriptions);
            let mut pending = Pending::new(true);
            LogReader::new(f.log.clone(), log_streams).read(&p.checkpoints, 800, Duration::ZERO, &mut pending).unwrap();
            let read = pending.events.len() as u64;
            assert!(read > 400, "the read shares 800 between two partitions: {read}");
            p.process(&pending);
            p.settle().unwrap();
            assert_eq!(f.total(), read);
            (f.read_model.counters().unwrap().batches, read)
        };
        // Catch-up batches of 200 events: one batch while the commit before it runs…
        assert_eq!(batches_for(BatchOptions { max_events: 100, catch_up_factor: 2, ..fast() }).0, 1);
        // …unless catch-up batches are off.
        let (batches, read) = batches_for(BatchOptions { max_events: 200, catch_up_factor: 1, ..fast() });
        assert_eq!(batches, read.div_ceil(200));
    }

    /// A resync while the previous batch is still committing reads again
    /// from where that commit ends, not from the checkpoints before it: the
    /// span it covers is applied once (audit 17g).
    #[test]
    fn a_resync_during_a_commit_reads_again_after_that_commit() {
        let f = Fixture::new();
        f.append(&["Ok"; 100]);
        let mut p = f.projector(fast());
        let (log_streams, _) = p.sources.split(&p.subscriptions);
        let mut pending = Pending::default();
        LogReader::new(f.log.clone(), log_streams).read(&p.checkpoints, 1000, Duration::ZERO, &mut pending).unwrap();
        assert_eq!(pending.events.len(), 100);
        // Handle the batch; its commit runs on its own thread, not yet settled.
        p.process(&pending);
        assert!(p.in_flight.is_some());
        let reading = p.read_again(p.spawn_reader());
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            if let Ok(Delivery::Batch(again)) = reading.batches.recv_timeout(Duration::from_millis(50)) {
                p.process(&again);
            }
        }
        reading.end();
        p.settle().unwrap();
        assert_eq!(f.total(), 100, "every event applied once");
    }

    #[test]
    fn emitted_events_commit_with_their_batch_and_are_dropped_while_replaying() {
        let f = Fixture::new();
        let mut types = vec!["Emit"; 20];
        types[5] = "Bad"; // its batch is bisected: the emits of the good halves stay, once
        f.append(&types);
        let mut p = f.projector(fast());
        f.drain(&mut p);
        let emitted = f.read_model.emitted_after(0, 100).unwrap();
        assert_eq!(emitted.len(), 19);
        let mut offsets: Vec<String> =
            emitted.iter().map(|(_, e)| serde_json::from_str(e.data.get()).unwrap()).collect();
        offsets.sort();
        offsets.dedup();
        assert_eq!(offsets.len(), 19, "no event emitted twice");
        assert!(emitted.iter().all(|(_, e)| e.stream == "echoes" && e.event_type == "Echo"));

        f.append(&["Emit"; 10]);
        p.set_replaying(true);
        f.drain(&mut p);
        assert_eq!(f.read_model.emitted_after(0, 100).unwrap().len(), 19, "replayed events emit nothing");
        assert_eq!(f.total(), 29);
    }

    #[test]
    fn a_replay_horizon_drops_emits_before_it_and_publishes_those_after() {
        let f = Fixture::new();
        f.append(&["Emit"; 40]);
        let mut p = f.projector(fast());
        let horizon: Cursor = [(("s".to_owned(), 0), 5), (("s".to_owned(), 1), 12)].into();
        *p.replay().lock().unwrap() = Replay::Before(horizon.clone());
        f.drain(&mut p);
        let emitted: Vec<String> = f
            .read_model
            .emitted_after(0, 100)
            .unwrap()
            .into_iter()
            .map(|(_, e)| serde_json::from_str(e.data.get()).unwrap())
            .collect();
        let heads = f.log.heads("s").unwrap();
        let expected = (heads[0] - 5) + (heads[1] - 12);
        assert_eq!(emitted.len() as u64, expected, "{emitted:?}");
        for source in &emitted {
            let (partition, offset) = source.split_once('/').unwrap();
            let until = horizon[&("s".to_owned(), partition.parse().unwrap())];
            assert!(offset.parse::<u64>().unwrap() >= until, "{source} was before the horizon");
        }
        assert_eq!(f.total(), 40, "every event applied either way");
    }
}
