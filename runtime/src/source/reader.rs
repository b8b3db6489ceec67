//! Reading a projection's subscribed streams, wherever they live.
//!
//! A projection's reader thread asks each of its [`Reader`]s (one for the
//! embedded log, one for Kafka) for the events after its cursor and hands
//! them to the worker as a [`Pending`] batch. The cursor starts at the
//! durable checkpoints and moves as batches are handed over; the worker's
//! commits are what make it durable.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::Event;
use super::log::EventLog;
use crate::position::Checkpoint;
pub use crate::position::Cursor;

/// A record that could not be decoded into an event. The projector turns it
/// into a dead letter with the commit whose checkpoint passes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    pub stream: String,
    /// The Kafka topic the record came from.
    pub topic: Option<String>,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<String>,
    /// The record's timestamp (ms since the Unix epoch), 0 when it had none.
    pub time: i64,
    /// The record's value: its JSON, or a string when it is not JSON.
    pub data: serde_json::Value,
    /// Why it could not be decoded, and where it was.
    pub error: String,
}

/// Subscribed streams and event types (empty: all types).
pub type Subscriptions = Vec<(String, HashSet<String>)>;

/// Events read for one batch, and where reading stopped in each partition.
#[derive(Debug, Default)]
pub struct Pending {
    /// The events to hand to the plugin (subscribed types), in read order.
    pub events: Vec<Event>,
    /// Records that could not be decoded: dead letters as soon as the
    /// checkpoint passes them.
    pub undecodable: Vec<Undecodable>,
    /// Per (stream, partition): the offset after the last record read.
    pub read_to: Cursor,
    /// Per (stream, partition): the latest event time among every record
    /// read, subscribed or not, decodable or not: how far in event time the
    /// partition has been read (for event-time alignment).
    pub read_times: BTreeMap<(String, u32), i64>,
    /// Read while catching up (the read before it was full): the batch may
    /// be larger and run longer (`BatchOptions::catch_up_factor`).
    pub behind: bool,
    /// Per partition, the indexes of its events in `events`, built on the
    /// first [`Pending::checkpoints_after`] (once the batch is complete: the
    /// events must not change after it). Bisecting a batch full of rejected
    /// events asks for thousands of checkpoints; scanning the events for each
    /// made that quadratic in the batch's size.
    by_partition: std::sync::OnceLock<Vec<PartitionEvents>>,
}

/// Where one partition's events sit in a [`Pending`] batch.
#[derive(Debug)]
struct PartitionEvents {
    stream: String,
    partition: u32,
    /// Indexes into `Pending::events`, ascending, and each event's offset.
    at: Vec<(usize, u64)>,
}

impl Pending {
    /// An empty batch, read while catching up or not.
    pub fn new(behind: bool) -> Self {
        Pending { behind, ..Pending::default() }
    }

    /// True when reading moved no partition past `cursor`.
    pub fn is_empty(&self, cursor: &Cursor) -> bool {
        self.read_to.iter().all(|(k, to)| cursor.get(k).copied().unwrap_or(0) == *to)
    }

    /// Checkpoints once `events[..done]` are handled: per partition, the first
    /// event not yet handled, or where reading stopped.
    pub fn checkpoints_after(&self, done: usize) -> Vec<Checkpoint> {
        let by_partition = self.by_partition.get_or_init(|| {
            let mut index: BTreeMap<(&str, u32), Vec<(usize, u64)>> = BTreeMap::new();
            for (i, e) in self.events.iter().enumerate() {
                index.entry((e.stream.as_str(), e.partition)).or_default().push((i, e.offset));
            }
            index
                .into_iter()
                .map(|((stream, partition), at)| PartitionEvents { stream: stream.to_owned(), partition, at })
                .collect()
        });
        let mut next = self.read_to.clone();
        for p in by_partition {
            // The partition's first event not yet handled.
            let first = p.at.partition_point(|(i, _)| *i < done);
            if let Some((_, offset)) = p.at.get(first) {
                next.insert((p.stream.clone(), p.partition), *offset);
            }
        }
        crate::position::checkpoints(next)
    }

    /// The undecodable records a commit moving the checkpoints from
    /// `checkpoints_after(from)` to `checkpoints_after(to)` passes.
    pub fn undecodable_between(&self, from: usize, to: usize) -> Vec<Undecodable> {
        if self.undecodable.is_empty() {
            return Vec::new();
        }
        let bound = |done: usize| crate::position::cursor(self.checkpoints_after(done));
        let (lo, hi) = (bound(from), bound(to));
        // Before the first event of a partition, the batch starts at its first record.
        self.undecodable
            .iter()
            .filter(|l| {
                let k = (l.stream.clone(), l.partition);
                let start = if from == 0 { 0 } else { lo.get(&k).copied().unwrap_or(0) };
                l.offset >= start && l.offset < hi.get(&k).copied().unwrap_or(0)
            })
            .cloned()
            .collect()
    }

    /// Make the batch safe for event-time logic (windows, joins): hand over
    /// events in event-time order across partitions, and never past the point
    /// where a partition that still has events to read stopped.
    ///
    /// Reading shares a batch between partitions, so one partition can be read
    /// further ahead in event time than another; an enricher's clock would
    /// then run ahead of events still unread, and its windows close too early.
    /// So: `bound` is the smallest, over partitions that were read and are not
    /// `exhausted` (more is waiting), of the latest event time read from them.
    /// Each partition keeps its events up to the first one later than `bound`;
    /// the rest is read again next time (its `read_to` moves back). The
    /// partition that sets the bound keeps everything, so reading always
    /// progresses. Then the events are merged by time, each partition's in
    /// offset order (like Kafka Streams' timestamp-synchronized processing).
    ///
    /// A partition's time is the latest of every record read from it, also
    /// those the enricher does not subscribe to (`read_times`): a partition
    /// whose share of the read held only those still bounds the others.
    /// `unread` are partitions with events waiting that this read did not
    /// reach (a Kafka fetch not yet arrived), with the time they were last
    /// read to; they bound the others too.
    pub fn align_event_time(&mut self, exhausted: impl Fn(&str, u32, u64) -> bool, unread: &[((String, u32), i64)]) {
        let mut latest: BTreeMap<(&str, u32), i64> =
            self.read_times.iter().map(|((stream, partition), t)| ((stream.as_str(), *partition), *t)).collect();
        for e in &self.events {
            let t = latest.entry((e.stream.as_str(), e.partition)).or_insert(i64::MIN);
            *t = (*t).max(e.time);
        }
        let bound = latest
            .iter()
            .filter(|((stream, partition), _)| {
                let read_to = self.read_to.get(&((*stream).to_owned(), *partition)).copied().unwrap_or(0);
                !exhausted(stream, *partition, read_to)
            })
            .map(|(_, t)| *t)
            .chain(unread.iter().map(|(_, t)| *t))
            .min();
        if let Some(bound) = bound {
            // Per partition: the offset of the first event past the bound.
            let mut cut: BTreeMap<(String, u32), u64> = BTreeMap::new();
            for e in &self.events {
                if e.time > bound {
                    cut.entry((e.stream.clone(), e.partition)).or_insert(e.offset);
                }
            }
            self.cut(&cut);
        }
        self.merge_by_time();
    }

    /// Keep only what lies before `limit` (per partition; a partition absent
    /// from it keeps nothing): a rebuild's reader may not run ahead of the
    /// live generation, whose checkpoints `limit` is. Reading never moves
    /// back before `from`, where it started: a limit below that (a resumed
    /// rebuild whose gate is not set yet) holds back everything read, and
    /// undoes nothing already handled.
    pub fn hold_back(&mut self, limit: &Cursor, from: &Cursor) {
        let cut: BTreeMap<(String, u32), u64> = self
            .read_to
            .iter()
            .map(|(k, to)| {
                let floor = from.get(k).copied().unwrap_or(0);
                (k.clone(), (*to).min(limit.get(k).copied().unwrap_or(0).max(floor)))
            })
            .collect();
        self.cut(&cut);
    }

    /// Drop, per partition, everything from offset `cut[partition]` on; those
    /// records are read again next time (`read_to` moves back to the cut).
    fn cut(&mut self, cut: &BTreeMap<(String, u32), u64>) {
        let past = |stream: &str, partition: u32, offset: u64| {
            cut.get(&(stream.to_owned(), partition)).is_some_and(|&at| offset >= at)
        };
        self.events.retain(|e| !past(&e.stream, e.partition, e.offset));
        self.undecodable.retain(|l| !past(&l.stream, l.partition, l.offset));
        for (key, at) in cut {
            if let Some(to) = self.read_to.get_mut(key) {
                *to = (*to).min(*at);
            }
        }
    }

    /// Order events by time across partitions, keeping each partition's order:
    /// a k-way merge on the time of each partition's next event.
    fn merge_by_time(&mut self) {
        let mut queues: BTreeMap<(String, u32), std::collections::VecDeque<Event>> = BTreeMap::new();
        for e in self.events.drain(..) {
            queues.entry((e.stream.clone(), e.partition)).or_default().push_back(e);
        }
        let mut queues: Vec<_> = queues.into_values().collect();
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(i64, usize)>> =
            queues.iter().enumerate().map(|(i, q)| std::cmp::Reverse((q[0].time, i))).collect();
        while let Some(std::cmp::Reverse((_, i))) = heap.pop() {
            let e = queues[i].pop_front().expect("a queue in the heap has an event");
            self.events.push(e);
            if let Some(next) = queues[i].front() {
                heap.push(std::cmp::Reverse((next.time, i)));
            }
        }
    }
}

/// What a reader thread hands its worker.
pub enum Delivery {
    Batch(Pending),
    /// Reading failed; the reader retries after a pause.
    Failed(String),
}

/// The most event data one read takes into memory, whatever its event
/// count: 10,000 events of up to 1 MiB each would otherwise be 10 GiB.
pub const READ_BYTES: usize = 64 << 20;

/// One source of a projection's events.
pub trait Reader: Send {
    /// Append to `into` up to `max` events after `cursor`, and about
    /// [`READ_BYTES`] of data at most, waiting up to `wait` when there are none yet.
    fn read(&mut self, cursor: &Cursor, max: usize, wait: Duration, into: &mut Pending) -> Result<(), String>;

    /// Records from these positions on were read but handed back (held back
    /// or cut from a batch): read them again. Readers that read from the
    /// cursor each time, like the log's, need do nothing.
    fn rewind(&mut self, _to: &Cursor) -> Result<(), String> {
        Ok(())
    }
}

/// Hand `pending` to the worker through `tx`; false once the worker is gone.
pub fn hand_over(tx: &crossbeam_channel::Sender<Delivery>, pending: Pending) -> bool {
    tx.send(Delivery::Batch(pending)).is_ok()
}

/// Reads subscribed streams of the embedded log.
pub struct LogReader {
    log: Arc<EventLog>,
    subscriptions: Subscriptions,
}

impl LogReader {
    pub fn new(log: Arc<EventLog>, subscriptions: Subscriptions) -> Self {
        LogReader { log, subscriptions }
    }
}

impl Reader for LogReader {
    /// Shares `max` and [`READ_BYTES`] between the partitions that have something to read.
    fn read(&mut self, cursor: &Cursor, max: usize, wait: Duration, into: &mut Pending) -> Result<(), String> {
        let seen = self.log.signal().current();
        let mut partitions = Vec::new();
        for (stream, types) in &self.subscriptions {
            let Some(heads) = self.log.heads(stream) else { continue };
            for (p, head) in heads.into_iter().enumerate() {
                let from = cursor.get(&(stream.clone(), p as u32)).copied().unwrap_or(0);
                if from < head {
                    partitions.push((stream, types, p as u32, from, head));
                }
            }
        }
        if partitions.is_empty() {
            if !wait.is_zero() {
                self.log.signal().wait(seen, wait);
            }
            return Ok(());
        }
        let quota = (max / partitions.len()).max(1);
        let bytes = READ_BYTES / partitions.len();
        for (stream, types, partition, from, head) in partitions {
            let limit = quota.min((head - from) as usize);
            let events =
                self.log.read(stream, partition, from, limit, bytes).map_err(|e| format!("reading the log: {e}"))?;
            let to = events.last().map_or(from, |e| e.offset + 1);
            if let Some(latest) = events.iter().map(|e| e.time).max() {
                into.read_times.insert((stream.clone(), partition), latest);
            }
            into.read_to.insert((stream.clone(), partition), to);
            into.events.extend(events.into_iter().filter(|e| types.is_empty() || types.contains(&e.event_type)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(partition: u32, offset: u64) -> Event {
        Event {
            stream: "s".into(),
            partition,
            offset,
            key: None,
            event_type: "T".into(),
            time: 0,
            headers: vec![],
            content_type: "application/json".into(),
            data: b"{}".to_vec(),
        }
    }

    fn letter(partition: u32, offset: u64) -> Undecodable {
        Undecodable {
            stream: "s".into(),
            topic: Some("t".into()),
            partition,
            offset,
            key: None,
            time: 0,
            data: serde_json::Value::Null,
            error: "undecodable".into(),
        }
    }

    #[test]
    fn checkpoints_after_any_prefix_are_each_partitions_first_event_left() {
        // Interleaved as event-time alignment leaves them; partition 2 was read but kept nothing.
        let events = vec![event(0, 0), event(1, 0), event(0, 1), event(0, 2), event(1, 3), event(0, 5)];
        let read_to: Cursor = [(("s".into(), 0), 6), (("s".into(), 1), 4), (("s".into(), 2), 9)].into();
        let pending = Pending { events: events.clone(), read_to: read_to.clone(), ..Pending::default() };
        for done in 0..=events.len() {
            // The definition: per partition, the first event not handled, else where reading stopped.
            let mut want = read_to.clone();
            for e in events[done..].iter().rev() {
                want.insert((e.stream.clone(), e.partition), e.offset);
            }
            let got = crate::position::cursor(pending.checkpoints_after(done));
            assert_eq!(got, want, "after {done} events");
        }
    }

    #[test]
    fn undecodable_records_go_with_the_commit_that_passes_them() {
        // Partition 0: event 0, bad 1, event 2, bad 3 (last read); partition 1: bad 0 alone.
        let pending = Pending {
            events: vec![event(0, 0), event(0, 2)],
            undecodable: vec![letter(0, 1), letter(0, 3), letter(1, 0)],
            read_to: [(("s".into(), 0), 4), (("s".into(), 1), 1)].into(),
            ..Pending::default()
        };
        let offsets = |ls: Vec<Undecodable>| ls.iter().map(|l| (l.partition, l.offset)).collect::<Vec<_>>();
        // Handling event 0 moves partition 0 to 2 and partition 1 (no events) to its end.
        assert_eq!(offsets(pending.undecodable_between(0, 1)), vec![(0, 1), (1, 0)]);
        assert_eq!(offsets(pending.undecodable_between(1, 2)), vec![(0, 3)]);
        assert_eq!(offsets(pending.undecodable_between(0, 2)), vec![(0, 1), (0, 3), (1, 0)]);
    }

    #[test]
    fn holding_back_keeps_what_lies_before_the_limit() {
        let mut pending = Pending {
            events: vec![event(0, 0), event(0, 1), event(0, 2), event(1, 0), event(2, 5)],
            undecodable: vec![letter(0, 3)],
            read_to: [(("s".into(), 0), 4), (("s".into(), 1), 1), (("s".into(), 2), 6)].into(),
            ..Pending::default()
        };
        pending.hold_back(&[(("s".into(), 0), 2), (("s".into(), 1), 7)].into(), &Cursor::new());
        let kept: Vec<(u32, u64)> = pending.events.iter().map(|e| (e.partition, e.offset)).collect();
        assert_eq!(kept, [(0, 0), (0, 1), (1, 0)]);
        assert!(pending.undecodable.is_empty());
        let read_to: Vec<u64> = pending.read_to.values().copied().collect();
        assert_eq!(read_to, [2, 1, 0], "partition 2 is not in the limit: nothing of it is kept");
    }

    #[test]
    fn holding_back_never_moves_reading_before_where_it_started() {
        // A resumed rebuild reads from its checkpoints before its gate is set
        // (an empty limit): it holds back what it read and stays where it was.
        let from: Cursor = [(("s".into(), 0), 5), (("s".into(), 1), 3)].into();
        let mut pending = Pending {
            events: vec![event(0, 5), event(0, 6), event(1, 3)],
            undecodable: Vec::new(),
            read_to: [(("s".into(), 0), 7), (("s".into(), 1), 4)].into(),
            ..Pending::default()
        };
        pending.hold_back(&Cursor::new(), &from);
        assert!(pending.events.is_empty());
        assert_eq!(pending.read_to, from);
        assert!(pending.is_empty(&from), "nothing to hand over");
    }

    #[test]
    fn event_time_alignment_holds_back_what_runs_ahead_and_merges_by_time() {
        let at = |partition: u32, offset: u64, time: i64| Event { time, ..event(partition, offset) };
        // Partition 0 was read to time 30 and has more; partition 1 ran ahead to
        // time 90; partition 2 is exhausted (it never holds the others back).
        let mut pending = Pending {
            events: vec![
                at(0, 0, 10),
                at(0, 1, 30),
                at(1, 0, 5),
                at(1, 1, 20),
                at(1, 2, 40),
                at(1, 3, 90),
                at(2, 0, 25),
            ],
            undecodable: vec![letter(1, 4)],
            read_to: [(("s".into(), 0), 2), (("s".into(), 1), 5), (("s".into(), 2), 1)].into(),
            ..Pending::default()
        };
        pending.align_event_time(|_, partition, _| partition == 2, &[]);
        let order: Vec<(u32, u64)> = pending.events.iter().map(|e| (e.partition, e.offset)).collect();
        assert_eq!(order, [(1, 0), (0, 0), (1, 1), (2, 0), (0, 1)]);
        assert_eq!(pending.read_to[&("s".into(), 1)], 2, "partition 1 is read again from its first event past 30");
        assert_eq!(pending.read_to[&("s".into(), 0)], 2);
        assert!(pending.undecodable.is_empty(), "a record past the cut is read again, not dead-lettered now");
    }
}
