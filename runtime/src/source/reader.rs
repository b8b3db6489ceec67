//! Reading a projection's subscribed streams, wherever they live.
//!
//! A projection's reader thread asks each of its [`Reader`]s (one for the
//! embedded log, one for Kafka) for the events after its cursor and hands
//! them to the worker as a [`Pending`] batch. The cursor starts at the
//! durable checkpoints and moves as batches are handed over; the worker's
//! commits are what make it durable.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use super::Event;
use super::log::EventLog;
use crate::store::{Checkpoint, DeadLetter};

/// Per (stream, partition): the offset of the next event to read.
pub type Cursor = BTreeMap<(String, u32), u64>;

/// Subscribed streams and event types (empty: all types).
pub type Subscriptions = Vec<(String, HashSet<String>)>;

/// Events read for one batch, and where reading stopped in each partition.
#[derive(Debug, Default)]
pub struct Pending {
    /// The events to hand to the plugin (subscribed types), in read order.
    pub events: Vec<Event>,
    /// Records that could not be decoded: dead letters as soon as the
    /// checkpoint passes them.
    pub undecodable: Vec<DeadLetter>,
    /// Per (stream, partition): the offset after the last record read.
    pub read_to: Cursor,
}

impl Pending {
    /// True when reading moved no partition past `cursor`.
    pub fn is_empty(&self, cursor: &Cursor) -> bool {
        self.read_to.iter().all(|(k, to)| cursor.get(k).copied().unwrap_or(0) == *to)
    }

    /// Checkpoints once `events[..done]` are handled: per partition, the first
    /// event not yet handled, or where reading stopped.
    pub fn checkpoints_after(&self, done: usize) -> Vec<Checkpoint> {
        let mut next = self.read_to.clone();
        for e in self.events[done..].iter().rev() {
            next.insert((e.stream.clone(), e.partition), e.offset);
        }
        next.into_iter()
            .map(|((stream, partition), next_offset)| Checkpoint { stream, partition, next_offset })
            .collect()
    }

    /// The undecodable records a commit moving the checkpoints from
    /// `checkpoints_after(from)` to `checkpoints_after(to)` passes.
    pub fn undecodable_between(&self, from: usize, to: usize) -> Vec<DeadLetter> {
        if self.undecodable.is_empty() {
            return Vec::new();
        }
        let bound = |done: usize| -> BTreeMap<(String, u32), u64> {
            self.checkpoints_after(done).into_iter().map(|c| ((c.stream, c.partition), c.next_offset)).collect()
        };
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

    /// Forget what was read from `partitions` (revoked from this instance).
    pub fn drop_partitions(&mut self, partitions: &[(String, u32)]) {
        let gone = |stream: &str, partition: u32| partitions.iter().any(|(s, p)| s == stream && *p == partition);
        self.events.retain(|e| !gone(&e.stream, e.partition));
        self.undecodable.retain(|l| !gone(&l.stream, l.partition));
        self.read_to.retain(|(s, p), _| !gone(s, *p));
    }
}

/// What a reader thread hands its worker.
pub enum Delivery {
    Batch(Pending),
    /// Reading failed; the reader retries after a pause.
    Failed(String),
    /// Kafka is taking partitions away from this instance: the worker makes
    /// everything it has handled durable, then acknowledges, so that the
    /// reader can publish the checkpoints before the partitions move.
    Revoke {
        ack: mpsc::Sender<()>,
    },
}

/// One source of a projection's events.
pub trait Reader: Send {
    /// Append to `into` up to `max` events after `cursor`, waiting up to
    /// `wait` when there are none yet.
    fn read(&mut self, cursor: &Cursor, max: usize, wait: Duration, into: &mut Pending) -> Result<(), String>;
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
    /// Shares `max` between the partitions that have something to read.
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
        for (stream, types, partition, from, head) in partitions {
            let limit = quota.min((head - from) as usize);
            let events = self.log.read(stream, partition, from, limit).map_err(|e| format!("reading the log: {e}"))?;
            let to = events.last().map_or(from, |e| e.offset + 1);
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

    fn letter(partition: u32, offset: u64) -> DeadLetter {
        DeadLetter {
            stream: "s".into(),
            topic: Some("t".into()),
            partition,
            offset,
            key: None,
            event_type: String::new(),
            time: 0,
            data: serde_json::Value::Null,
            plugin_version: String::new(),
            error: "undecodable".into(),
            failed_at: 0,
        }
    }

    #[test]
    fn undecodable_records_go_with_the_commit_that_passes_them() {
        // Partition 0: event 0, bad 1, event 2, bad 3 (last read); partition 1: bad 0 alone.
        let pending = Pending {
            events: vec![event(0, 0), event(0, 2)],
            undecodable: vec![letter(0, 1), letter(0, 3), letter(1, 0)],
            read_to: [(("s".into(), 0), 4), (("s".into(), 1), 1)].into(),
        };
        let offsets = |ls: Vec<DeadLetter>| ls.iter().map(|l| (l.partition, l.offset)).collect::<Vec<_>>();
        // Handling event 0 moves partition 0 to 2 and partition 1 (no events) to its end.
        assert_eq!(offsets(pending.undecodable_between(0, 1)), vec![(0, 1), (1, 0)]);
        assert_eq!(offsets(pending.undecodable_between(1, 2)), vec![(0, 3)]);
        assert_eq!(offsets(pending.undecodable_between(0, 2)), vec![(0, 1), (0, 3), (1, 0)]);
    }
}
