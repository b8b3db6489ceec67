//! The thread that reads a worker's next batch while the worker handles the
//! current one: it reads every subscribed partition from the cursor on,
//! aligns event time for enrichers, holds a rebuild back behind the live
//! generation, and hands the batch over.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::replay::Replay;
use super::set_background;
use super::worker::Projector;
use crate::source::Sources;
use crate::source::kafka::{Handover, KafkaReader, Watermarks};
use crate::source::log::EventLog;
use crate::source::reader::{Cursor, Delivery, LogReader, Pending, Reader, Subscriptions, hand_over};

/// The thread reading batches ahead of the worker.
pub(super) struct ReadAhead {
    pub(super) batches: crossbeam_channel::Receiver<Delivery>,
    thread: std::thread::JoinHandle<()>,
    /// Stops the reader (the worker stopping, or a resync): it may be idle,
    /// never sending, so a dropped channel alone would not end it.
    stop: Arc<AtomicBool>,
}

impl ReadAhead {
    pub(super) fn end(self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.batches); // a reader blocked on a full channel returns
        let _ = self.thread.join();
    }
}

impl Projector {
    /// Start the thread that reads batches ahead, from the durable checkpoints on.
    pub(super) fn spawn_reader(&mut self) -> ReadAhead {
        // One batch in the channel and one being read: enough to keep the worker busy.
        let (tx, rx) = crossbeam_channel::bounded::<Delivery>(1);
        let reader_stop = Arc::new(AtomicBool::new(false));
        let (replay_tx, replay_updates) = crossbeam_channel::unbounded();
        self.reader_replay = Some(replay_tx);
        let reader = ReaderThread {
            name: self.name().to_owned(),
            sources: self.sources.clone(),
            subscriptions: self.subscriptions.clone(),
            watermarks: self.watermarks.clone(),
            cursor: self.checkpoints.clone(),
            max_events: self.options.max_events,
            catch_up_events: self.options.catch_up_read(),
            background_rebuilds: self.options.background_rebuilds,
            backoff: self.options.initial_backoff,
            // Enrichers keep clocks (windows, joins): they get events in event-time order.
            align: self.handler.kind() == crate::plugin::Kind::Enricher,
            replay: self.replay.clone(),
            replay_updates,
            hungry: self.hungry.clone(),
            stop: reader_stop.clone(),
            tx,
        };
        std::thread::Builder::new()
            .name(format!("reader-{}", reader.name))
            .spawn(move || reader.run())
            .map(|thread| ReadAhead { batches: rx, thread, stop: reader_stop })
            .expect("spawn a reader thread")
    }
}

/// What the reader thread works with.
struct ReaderThread {
    name: String,
    sources: Sources,
    subscriptions: Subscriptions,
    watermarks: Watermarks,
    /// Where the next read starts: the durable checkpoints, then moved as
    /// batches are handed over.
    cursor: Cursor,
    max_events: usize,
    catch_up_events: usize,
    background_rebuilds: bool,
    backoff: Duration,
    align: bool,
    /// The worker's [`Replay`], and where it sends a new one.
    replay: Replay,
    replay_updates: crossbeam_channel::Receiver<Replay>,
    hungry: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    tx: crossbeam_channel::Sender<Delivery>,
}

impl ReaderThread {
    fn run(mut self) {
        let Some(mut readers) = self.open_readers() else { return };
        // Waiting for news is shared between the readers.
        let idle_wait = Duration::from_millis(200) / readers.len().max(1) as u32;
        let (mut idle, mut behind, mut background) = (false, false, false);
        let mut alignment = Alignment::default();
        while !self.stop.load(Ordering::Relaxed) {
            while let Ok(replay) = self.replay_updates.try_recv() {
                self.replay = replay;
            }
            let wait = if idle { idle_wait } else { Duration::ZERO };
            let mut pending = Pending::new(behind);
            let limit = if behind { self.catch_up_events } else { self.max_events };
            let mut failed = None;
            for r in &mut readers {
                let room = limit.saturating_sub(pending.events.len()).max(1);
                if let Err(e) = r.read(&self.cursor, room, wait, &mut pending) {
                    failed = Some(e);
                }
            }
            if let Some(e) = failed.filter(|_| pending.is_empty(&self.cursor)) {
                if self.tx.send(Delivery::Failed(e)).is_err() {
                    return;
                }
                std::thread::sleep(self.backoff);
                continue;
            }
            idle = pending.is_empty(&self.cursor);
            // A full read means more is waiting: the next batch may be larger.
            behind = pending.events.len() >= self.max_events;
            if idle {
                if readers.is_empty() {
                    std::thread::sleep(idle_wait);
                }
                continue;
            }
            let (gated, history) = (matches!(self.replay, Replay::Until(..)), self.replay.is_history());
            if self.background_rebuilds && history != background {
                set_background(history);
                background = history;
            }
            if (self.align || gated) && !self.hold_back(&mut pending, &mut readers, &mut alignment) {
                // Held back: a rebuild's gate moves, or (aligning) time passes.
                if let Ok(replay) = self.replay_updates.recv_timeout(idle_wait) {
                    self.replay = replay;
                }
                continue;
            }
            self.cursor.extend(pending.read_to.iter().map(|(k, v)| (k.clone(), *v)));
            if !hand_over(&self.tx, pending) {
                return;
            }
        }
    }

    /// A reader per source the subscriptions read; `None` when stopped
    /// before Kafka could be reached.
    fn open_readers(&self) -> Option<Vec<Box<dyn Reader>>> {
        let mut readers: Vec<Box<dyn Reader>> = Vec::new();
        let (log_streams, kafka_streams) = self.sources.split(&self.subscriptions);
        if !log_streams.is_empty() {
            readers.push(Box::new(LogReader::new(self.sources.log.clone(), log_streams)));
        }
        while !kafka_streams.is_empty() {
            let opened = KafkaReader::open(
                &self.sources,
                &self.name,
                &kafka_streams,
                self.watermarks.clone(),
                Handover { hungry: self.hungry.clone(), after: self.max_events },
            );
            match opened {
                Ok(kafka) => {
                    readers.extend(kafka.map(|k| Box::new(k) as Box<dyn Reader>));
                    break;
                }
                Err(e) => {
                    if self.stop.load(Ordering::Relaxed) || self.tx.send(Delivery::Failed(e)).is_err() {
                        return None;
                    }
                    std::thread::sleep(self.backoff);
                }
            }
        }
        Some(readers)
    }

    /// Keep back what an enricher must not see yet (event-time alignment)
    /// and what a gated rebuild must not pass; rewind the readers to read it
    /// again. False when nothing is left to hand over.
    fn hold_back(&self, pending: &mut Pending, readers: &mut [Box<dyn Reader>], alignment: &mut Alignment) -> bool {
        let read_to = pending.read_to.clone();
        if self.align {
            align_event_time(pending, &self.sources.log, &self.watermarks, &self.cursor, alignment);
        }
        if let Replay::Until(limit, _) = &self.replay {
            pending.hold_back(limit, &self.cursor);
        }
        // What was handed back must be read again (Kafka consumers have moved on).
        let handed_back: Cursor = pending
            .read_to
            .iter()
            .filter(|(k, to)| read_to.get(*k).is_some_and(|before| *to < before))
            .map(|(k, to)| (k.clone(), *to))
            .collect();
        if handed_back.is_empty() {
            return true;
        }
        for r in readers.iter_mut() {
            if let Err(e) = r.rewind(&handed_back) {
                tracing::warn!(projection = %self.name, error = %e, "rewinding a reader");
            }
        }
        !pending.is_empty(&self.cursor)
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
pub(super) struct Alignment {
    times: BTreeMap<(String, u32), i64>,
    waiting_since: BTreeMap<(String, u32), Instant>,
}

/// [`Pending::align_event_time`], with a partition exhausted once read to
/// its head (the log's, or the Kafka high watermark; a partition whose
/// watermark is not known yet is not exhausted). Kafka partitions with
/// events waiting that this read did not reach bound the others at the time
/// they were last read to (never read: hold everything, up to
/// [`FIRST_FETCH_WAIT`]).
pub(super) fn align_event_time(
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
