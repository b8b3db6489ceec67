//! Where emitted events go: the relay that publishes a projection's
//! emitted-events outbox to the embedded log or to Kafka topics.
//!
//! A batch's emitted events commit with its writes and checkpoint (the
//! outbox, in the read model's transaction). The relay then publishes them
//! in order and trims the outbox:
//! - to the **embedded log**, exactly once: each append records, in the same
//!   log transaction, the outbox sequence it reached for that stream
//!   (producer `emit/<projection>`, or `emit/<projection>@<n>` for generation
//!   `n > 0`: each generation numbers its outbox from 1), and a relay that
//!   restarts skips what the log already has;
//! - to a **Kafka topic**, at least once: an idempotent producer (no
//!   duplicates from its own retries), flushed before the outbox is trimmed.
//!   A crash between the flush and the trim publishes those events again;
//!   each record carries `refract-emit-id: <projection>/<sequence>` so that
//!   consumers can drop repeats. A partitioned projection's shard numbers
//!   its emits per source partition instead
//!   (`<projection>/<stream>/<partition>/<ordinal>`), and in a cluster hands
//!   its publishing over between instances without repeats ([`handover`]).

pub mod handover;
mod kafka;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use self::handover::{Handover, Offsets, Ordinals, Publication, Takeover};
use self::kafka::KafkaSink;
use crate::clock::Backoff;
use crate::source::NewEvent;
use crate::source::kafka::KafkaConfig;
use crate::source::log::EventLog;
use crate::store::{Emitted, ReadModel};

/// The header naming an emitted event's origin on Kafka.
pub const EMIT_ID_HEADER: &str = "refract-emit-id";
/// The header carrying the event type on Kafka (read back with `type-header: event-type`).
pub const EVENT_TYPE_HEADER: &str = "event-type";

/// Publishes one projection's (or shard's) emitted events.
pub struct Relay {
    projection: String,
    /// The shard whose outbox this is, for a partitioned projection.
    shard: Option<u32>,
    /// The generation whose outbox this relay publishes.
    generation: u64,
    read_model: Arc<ReadModel>,
    log: Arc<EventLog>,
    kafka: Arc<KafkaConfig>,
    producer: Option<KafkaSink>,
    stop: Arc<AtomicBool>,
    /// A shard in a cluster: whether it publishes, and what it took over.
    handover: Option<Arc<Handover>>,
    /// While publishing in a cluster: what the previous owners published.
    takeover: Option<Takeover>,
    /// What this relay has published, to record for the next owner.
    published: Ordinals,
    /// Per target partition, an offset before which nothing it publishes next lands.
    from: Offsets,
    /// When it last recorded its publication, and whether it has published since.
    recorded: Option<Instant>,
    unrecorded: bool,
    /// A standby: the publication and emits it last trimmed by.
    held: Option<(i64, u64)>,
}

const CHUNK: usize = 1000;

impl Relay {
    pub fn new(
        projection: &str,
        generation: u64,
        read_model: Arc<ReadModel>,
        log: Arc<EventLog>,
        kafka: Arc<KafkaConfig>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Relay {
            projection: projection.to_owned(),
            shard: None,
            generation,
            read_model,
            log,
            kafka,
            producer: None,
            stop,
            handover: None,
            takeover: None,
            published: Ordinals::new(),
            from: Offsets::new(),
            recorded: None,
            unrecorded: false,
            held: None,
        }
    }

    /// The relay of shard `n`; in a cluster, `handover` says when it publishes.
    pub fn for_shard(mut self, n: u32, handover: Option<Arc<Handover>>) -> Self {
        self.shard = Some(n);
        self.handover = handover;
        self
    }

    /// Who publishes: the projection (its shard `#n`), and its generation
    /// when not the first (a rebuilt generation numbers its outbox from 1 again).
    fn producer(&self) -> String {
        let name = match self.shard {
            None => self.projection.clone(),
            Some(n) => format!("{}#{n}", self.projection),
        };
        match self.generation {
            0 => name,
            g => format!("{name}@{g}"),
        }
    }

    /// The id an emitted event is published under on Kafka.
    fn emit_id(&self, sequence: u64, e: &Emitted) -> String {
        match &e.origin {
            Some(o) => format!("{}/{}/{}/{}", self.id_prefix(), o.stream, o.partition, o.ordinal),
            None => format!("{}/{sequence}", self.producer()),
        }
    }

    /// What the ids of a shard's emits start with.
    fn id_prefix(&self) -> String {
        match self.generation {
            0 => self.projection.clone(),
            g => format!("{}@{g}", self.projection),
        }
    }

    /// (stream, partition, ordinal) of an emit id [`Relay::emit_id`] gave
    /// an emit of this projection's generation; `None` for any other id.
    fn origin_of<'i>(&self, id: &'i str) -> Option<(&'i str, u32, u64)> {
        let rest = id.strip_prefix(self.id_prefix().as_str())?.strip_prefix('/')?;
        let mut parts = rest.rsplitn(3, '/');
        let (ordinal, partition, stream) = (parts.next()?, parts.next()?, parts.next()?);
        Some((stream, partition.parse().ok()?, ordinal.parse().ok()?))
    }

    /// Publish until `stop` is set. A shard in a cluster publishes only
    /// while its copy is active, and takes the publishing over first.
    pub fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        while !self.stop.load(Ordering::Relaxed) {
            if let Some(h) = self.handover.clone() {
                match (h.is_active(), self.takeover.is_some()) {
                    (true, false) => {
                        if let Some(last) = handover::take_over(&h, &self.stop)
                            && !self.start_publishing(&h, last)
                        {
                            std::thread::sleep(backoff.next_delay());
                        }
                        continue;
                    }
                    (false, true) => {
                        self.release(&h);
                        continue;
                    }
                    (false, false) => {
                        self.hold(&h);
                        std::thread::sleep(Duration::from_millis(250));
                        continue;
                    }
                    (true, true) => {}
                }
            }
            let seen = self.read_model.emitted_signal().current();
            match self.publish_some() {
                Ok(0) => {
                    if self.unrecorded {
                        self.record(false);
                    }
                    self.read_model.emitted_signal().wait(seen, Duration::from_millis(200));
                }
                Ok(_) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(projection = %self.projection, shard = self.shard, error = %e, "publishing emitted events failed; retrying");
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
        if let Some(h) = self.handover.clone()
            && self.takeover.is_some()
        {
            self.release(&h);
        }
    }

    /// Take the publishing over from `last`, the last publication recorded,
    /// once this instance's first record is written: the next owner must
    /// know of it (and wait for its release) even if nothing is published.
    /// Whether it took over.
    fn start_publishing(&mut self, h: &Handover, last: Publication) -> bool {
        // The last record is an older generation's (this one was just
        // rebuilt): its ordinals number other emits. What this
        // generation's outbox does not hold is history, or published.
        let covered = match last.generation == self.generation {
            true => last.ordinals(),
            false => match self.read_model.emitted_before_outbox() {
                Ok(done) => done,
                Err(e) => {
                    tracing::warn!(projection = %h.projection, shard = h.shard, error = %e, "reading a new generation's emitted events");
                    return false;
                }
            },
        };
        self.published = covered.clone();
        self.from = last.offsets();
        self.takeover = Some(Takeover { covered, ..Takeover::default() });
        self.record(false);
        if self.unrecorded {
            self.takeover = None;
            return false;
        }
        tracing::info!(projection = %h.projection, shard = h.shard, from = %last.instance, covered = ?self.published, read_back_from = ?self.from, "publishing the shard's emitted events");
        true
    }

    /// Stop publishing (the shard was let go) and say so, with what was published.
    fn release(&mut self, h: &Handover) {
        self.record(true);
        self.takeover = None;
        tracing::info!(projection = %h.projection, shard = h.shard, published = ?self.published, landed_before = ?self.from, "stopped publishing the shard's emitted events");
    }

    /// A standby: forget what the active copy has published (when it has
    /// published more, or this copy emitted more, since the last look).
    fn hold(&mut self, h: &Handover) {
        let Some((last, _)) = h.publications().and_then(|p| p.publication(&h.projection, h.shard)) else { return };
        if last.generation != self.generation {
            // Another generation's ordinals: they number other emits.
            return;
        }
        let looked = (last.at, self.read_model.emitted_signal().current());
        if self.held == Some(looked) {
            return;
        }
        match self.read_model.trim_emitted_published(&last.ordinals()) {
            Ok(_) => self.held = Some(looked),
            Err(e) => {
                tracing::warn!(projection = %h.projection, shard = h.shard, error = %e, "trimming a standby's emitted events")
            }
        }
    }

    /// Record this relay's publication on the control topic (a failure is
    /// logged: the last record stays true, only less precise).
    fn record(&mut self, released: bool) {
        let Some(h) = &self.handover else { return };
        let Some(publications) = h.publications() else { return };
        let from = match &self.takeover {
            Some(takeover) => takeover.recorded_from(&self.from),
            None => self.from.clone(),
        };
        let publication = Publication::new(publications.instance(), self.generation, released, &self.published, &from);
        match publications.record(&h.projection, h.shard, &publication) {
            Ok(()) => {
                self.recorded = Some(Instant::now());
                self.unrecorded = false;
            }
            Err(e) => {
                tracing::warn!(projection = %h.projection, shard = h.shard, error = %e, "recording what the shard published");
                self.unrecorded = true;
            }
        }
    }

    /// Read `topic` back for the emit ids published after the last
    /// publication, once per takeover.
    fn read_back(&mut self, topic: &str) -> Result<(), String> {
        // This shard's ids: `<prefix>/<stream>/<partition n>/<ordinal>`.
        let mine = |id: &str| self.origin_of(id).is_some_and(|(_, partition, _)| Some(partition) == self.shard);
        let Some(takeover) = &self.takeover else { return Ok(()) };
        if takeover.read.contains(topic) {
            return Ok(());
        }
        let from: BTreeMap<i32, i64> =
            self.from.iter().filter(|((t, _), _)| t == topic).map(|((_, p), o)| (*p, *o)).collect();
        let (mut ids, ends) = kafka::emit_ids(&self.kafka, topic, &from, mine, &self.stop)?;
        // Those the ordinals cover need no remembering (a read back may
        // start before the last record's end).
        ids.retain(|id| {
            self.origin_of(id).is_none_or(|(stream, partition, ordinal)| {
                self.published.get(&(stream.to_owned(), partition)).is_none_or(|upto| ordinal > *upto)
            })
        });
        let takeover = self.takeover.as_mut().expect("checked above");
        if !ids.is_empty() {
            tracing::info!(projection = %self.projection, shard = self.shard, topic, published = ids.len(), "emits the previous owner published after its last record; not sent again");
        }
        takeover.seen.extend(ids);
        takeover.read.insert(topic.to_owned());
        for (p, end) in ends {
            let start = from.get(&p).copied().unwrap_or(0);
            let at = takeover.read_from.entry((topic.to_owned(), p)).or_insert(start);
            *at = (*at).min(start);
            raise(&mut self.from, (topic.to_owned(), p), end);
        }
        Ok(())
    }

    /// Publish the next chunk of the outbox; how many events it held.
    pub fn publish_some(&mut self) -> Result<usize, String> {
        let entries = self.read_model.emitted_after(0, CHUNK).map_err(|e| e.to_string())?;
        let Some(&(last, _)) = entries.last() else { return Ok(0) };
        let kafka = self.kafka.clone();
        if self.takeover.is_some() {
            let topics: HashSet<&str> =
                entries.iter().filter_map(|(_, e)| kafka.topic(&e.stream)).map(|t| t.topic.as_str()).collect();
            for topic in topics {
                self.read_back(topic)?;
            }
        }
        let mut to_log: BTreeMap<&str, Vec<(u64, &Emitted)>> = BTreeMap::new();
        let mut to_kafka: Vec<(&str, String, &Emitted)> = Vec::new();
        for (sequence, event) in &entries {
            match kafka.topic(&event.stream) {
                Some(topic) => {
                    let id = self.emit_id(*sequence, event);
                    if !self.published_before(&id, event) {
                        to_kafka.push((topic.topic.as_str(), id, event));
                    }
                }
                None => to_log.entry(&event.stream).or_default().push((*sequence, event)),
            }
        }
        let producer = format!("emit/{}", self.producer());
        for (stream, events) in to_log {
            let done = self.log.producer_sequence(&producer, stream).map_err(|e| e.to_string())?;
            let fresh: Vec<&(u64, &Emitted)> = events.iter().filter(|(s, _)| *s > done).collect();
            let Some(&&(upto, _)) = fresh.last() else { continue };
            let batch: Vec<NewEvent> = fresh.iter().map(|(_, e)| new_event(e)).collect();
            self.log.append_as(&producer, upto, stream, &batch).map_err(|e| format!("appending to {stream}: {e}"))?;
        }
        if !to_kafka.is_empty() {
            if self.producer.is_none() {
                self.producer = Some(KafkaSink::new(&self.kafka)?);
            }
            let sink = self.producer.as_ref().expect("created above");
            match sink.send(&to_kafka) {
                Ok(landed) => {
                    for (at, after) in landed {
                        raise(&mut self.from, at, after);
                    }
                }
                Err(e) => {
                    // The next attempt gets a new producer: after failed
                    // deliveries an idempotent one may be stuck on sequence
                    // numbers the broker refuses, or fatally failed (librdkafka
                    // then wants it recreated). The chunk goes again under the
                    // same emit ids; a shard in a cluster first reads its
                    // topics back for those that landed.
                    self.producer = None;
                    if let Some(takeover) = &mut self.takeover {
                        takeover.read.clear();
                    }
                    return Err(e);
                }
            }
        }
        self.read_model.trim_emitted(last).map_err(|e| e.to_string())?;
        for o in entries.iter().filter_map(|(_, e)| e.origin.as_ref()) {
            raise(&mut self.published, (o.stream.clone(), o.partition), o.ordinal);
        }
        if self.takeover.is_some() {
            self.unrecorded = true;
            if self.recorded.is_none_or(|at| at.elapsed() >= handover::RECORD_INTERVAL) {
                self.record(false);
            }
        }
        Ok(entries.len())
    }

    /// Whether a previous owner of the shard published `event` already.
    fn published_before(&mut self, id: &str, event: &Emitted) -> bool {
        let (Some(takeover), Some(o)) = (&mut self.takeover, &event.origin) else { return false };
        takeover.covers(&o.stream, o.partition, o.ordinal) || takeover.seen.remove(id)
    }
}

/// Set `map[key]` to `value` unless it holds more already.
fn raise<K: Ord, V: Ord + Copy>(map: &mut BTreeMap<K, V>, key: K, value: V) {
    let at = map.entry(key).or_insert(value);
    *at = (*at).max(value);
}

fn new_event(e: &Emitted) -> NewEvent {
    NewEvent {
        event_type: e.event_type.clone(),
        key: e.key.clone(),
        time: Some(e.time),
        headers: e.headers.iter().cloned().collect(),
        data: e.data.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::source::log::LogOptions;
    use crate::store::Declared;
    use crate::store::read_model::Commit;
    use crate::wit::Outgoing;

    fn setup() -> (tempfile::TempDir, Arc<EventLog>, Arc<ReadModel>) {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EventLog::open(&dir.path().join("log.redb"), LogOptions::default()).unwrap());
        let read_model = Arc::new(ReadModel::open(&dir.path().join("rm.redb")).unwrap());
        (dir, log, read_model)
    }

    fn emit(read_model: &ReadModel, stream: &str, n: u32) {
        let mut batch = read_model.begin(Arc::new(Declared::default()), Default::default(), None).unwrap();
        for i in 0..n {
            let event = Outgoing {
                event_type: "Echo".into(),
                key: Some(format!("k{i}")),
                time: i64::from(i),
                headers: vec![("h".into(), "v".into())],
                data: i.to_string().into_bytes(),
            };
            batch.emit(stream, event).unwrap();
        }
        read_model.commit(&batch.into_writes(), &Commit::default()).unwrap();
    }

    fn count(log: &EventLog, stream: &str) -> u64 {
        log.heads(stream).unwrap_or_default().iter().sum()
    }

    #[test]
    fn the_log_gets_each_emitted_event_once_even_when_the_outbox_was_not_trimmed() {
        let (_dir, log, read_model) = setup();
        let stop = Arc::new(AtomicBool::new(false));
        let mut relay =
            Relay::new("p", 0, read_model.clone(), log.clone(), Arc::new(KafkaConfig::default()), stop.clone());
        emit(&read_model, "echoes", 30);
        emit(&read_model, "other", 5);
        assert_eq!(relay.publish_some().unwrap(), 35);
        assert_eq!((count(&log, "echoes"), count(&log, "other")), (30, 5));
        assert_eq!(read_model.emit_progress().unwrap(), (35, 35));
        assert_eq!(relay.publish_some().unwrap(), 0);

        // A crash after the append, before the trim: simulate it by appending
        // the next events as the relay would, without trimming.
        emit(&read_model, "echoes", 10);
        let pending = read_model.emitted_after(0, 100).unwrap();
        let events: Vec<NewEvent> = pending.iter().map(|(_, e)| new_event(e)).collect();
        log.append_as("emit/p", pending.last().unwrap().0, "echoes", &events).unwrap();
        let mut restarted = Relay::new("p", 0, read_model.clone(), log.clone(), Arc::new(KafkaConfig::default()), stop);
        assert_eq!(restarted.publish_some().unwrap(), 10);
        assert_eq!(count(&log, "echoes"), 40, "nothing appended twice");
        let first = log.read("echoes", 0, 0, 1, usize::MAX).unwrap();
        assert_eq!(first[0].event_type, "Echo");
        assert_eq!(first[0].headers, vec![("h".to_owned(), "v".to_owned())]);
    }

    /// A shard numbers what each partition's events emit, from 1 and
    /// across batches; a standby forgets what the active copy published.
    #[test]
    fn a_shard_numbers_its_emits_per_partition_and_a_standby_trims_what_was_published() {
        let (_dir, _log, read_model) = setup();
        let echo = |i: u32| Outgoing {
            event_type: "Echo".into(),
            key: None,
            time: 0,
            headers: vec![],
            data: i.to_string().into_bytes(),
        };
        for round in 0..2 {
            let mut batch = read_model.begin(Arc::new(Declared::default()), Default::default(), None).unwrap();
            for (stream, partition, n) in [("orders", 0, 3), ("payments", 0, 2), ("orders", 0, 1)] {
                batch.set_source(Some((stream, partition)));
                for i in 0..n {
                    batch.emit("echoes", echo(round * 10 + i)).unwrap();
                }
            }
            batch.set_source(None);
            batch.emit("echoes", echo(99)).unwrap();
            read_model.commit(&batch.into_writes(), &Commit::default()).unwrap();
        }
        // What is in the outbox: (stream, ordinal) per event.
        let origins = || -> Vec<Option<(String, u64)>> {
            let left = read_model.emitted_after(0, 100).unwrap();
            left.into_iter().map(|(_, e)| e.origin.map(|o| (o.stream, o.ordinal))).collect()
        };
        let o = |s: &str, n: u64| Some((s.to_owned(), n));
        #[rustfmt::skip]
        assert_eq!(origins(), vec![
            o("orders", 1), o("orders", 2), o("orders", 3), o("payments", 1), o("payments", 2), o("orders", 4), None,
            o("orders", 5), o("orders", 6), o("orders", 7), o("payments", 3), o("payments", 4), o("orders", 8), None,
        ]);

        let published = [(("orders".to_owned(), 0), 6), (("payments".to_owned(), 0), 1)].into_iter().collect();
        assert_eq!(read_model.trim_emitted_published(&published).unwrap(), 7);
        assert_eq!(
            origins(),
            vec![o("payments", 2), None, o("orders", 7), o("payments", 3), o("payments", 4), o("orders", 8), None]
        );
    }

    #[test]
    fn bad_emits_are_refused_with_the_reason() {
        let (_dir, _log, read_model) = setup();
        let mut batch = read_model.begin(Arc::new(Declared::default()), Default::default(), None).unwrap();
        let event = |ty: &str, data: &[u8]| Outgoing {
            event_type: ty.into(),
            key: None,
            time: 0,
            headers: vec![],
            data: data.to_vec(),
        };
        use crate::wit::EmitError;
        assert!(matches!(batch.emit("bad/name", event("T", b"1")), Err(EmitError::InvalidStream(_))));
        assert!(matches!(batch.emit("s", event("", b"1")), Err(EmitError::InvalidEvent(_))));
        assert!(matches!(batch.emit("s", event("T", b"{not json")), Err(EmitError::InvalidEvent(_))));
        let big = vec![b' '; (1 << 20) + 1];
        assert!(matches!(batch.emit("s", event("T", &big)), Err(EmitError::TooLarge(_))));
        assert!(batch.emit("s", event("T", b"{\"ok\":true}")).is_ok());
    }
}
