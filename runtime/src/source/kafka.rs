//! Kafka topics as streams, read with librdkafka (rdkafka).
//!
//! Each stream a projection subscribes to may be mapped to a Kafka topic in
//! `refract.yaml`. Offsets are never auto-committed: the checkpoint in the
//! projection's redb transaction is the truth, and the consumer starts from
//! it.
//!
//! - `replica` mode (the default): each instance assigns itself every
//!   partition of the topic, from its own checkpoints, and holds a full read
//!   model. Effects are exactly-once per instance, crashes included.
//! - `partitioned` mode: a projection's read model is split into shards,
//!   one per partition number of its co-partitioned topics; each shard's
//!   reader assigns itself that partition of every topic, from the shard's
//!   own checkpoints. On one instance every shard runs locally; in a
//!   cluster a consumer group decides which instance runs which
//!   (`runtime::activity`). It replaced `group` mode, whose new owner of a
//!   partition started without that partition's earlier state.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::Event;
use super::decode::{Decoder, Format, Record};
use super::reader::Undecodable;
use super::reader::{Cursor, Pending, READ_BYTES, Reader};

/// The `kafka:` section of `refract.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port[,host:port…]`.
    pub brokers: String,
    pub mode: Mode,
    /// Partitioned mode in a cluster: the consumer group `<group-id>.<p>`
    /// decides which instance runs which shard of projection `p`.
    pub group_id: String,
    /// Partitioned mode in a cluster: how many other instances keep a warm
    /// copy of each shard (a standby), to take it on without a replay.
    pub standby_replicas: u32,
    /// librdkafka client properties, passed through as given (security:
    /// `security.protocol`, `sasl.*`, `ssl.*`; tuning: `fetch.*`, …).
    pub properties: BTreeMap<String, String>,
    /// Stream name (as projections subscribe to it) → topic.
    pub streams: BTreeMap<String, TopicConfig>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            mode: Mode::Replica,
            group_id: "refract".into(),
            standby_replicas: 1,
            properties: BTreeMap::new(),
            streams: BTreeMap::new(),
        }
    }
}

/// How the instances of a deployment share a topic's partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum Mode {
    /// Every instance reads every partition and holds a full read model.
    #[default]
    Replica,
    /// The read model is split into shards, one per partition number of the
    /// projection's topics (which must have the same partition count).
    Partitioned,
}

impl TryFrom<String> for Mode {
    type Error = String;

    fn try_from(mode: String) -> Result<Mode, String> {
        match mode.as_str() {
            "replica" => Ok(Mode::Replica),
            "partitioned" => Ok(Mode::Partitioned),
            "group" => Err("kafka.mode `group` was replaced by `partitioned`: the read model is split into one shard per partition, and with a `cluster:` section a consumer group spreads the shards over the instances, each shard keeping its whole history across hand-overs (README, \"Running a cluster\")".into()),
            other => Err(format!("kafka.mode must be `replica` or `partitioned`, not {other:?}")),
        }
    }
}

/// One stream backed by a Kafka topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TopicConfig {
    pub topic: String,
    #[serde(default)]
    pub format: Format,
    /// `json`: the field holding the event type (default `type`).
    #[serde(default)]
    pub type_field: Option<String>,
    /// `json`: a header holding the event type, instead of a field.
    #[serde(default)]
    pub type_header: Option<String>,
}

impl TopicConfig {
    pub fn decoder(&self) -> Decoder {
        let mut d = Decoder::new(self.format);
        if let Some(f) = &self.type_field {
            d.type_field = f.clone();
        }
        d.type_header = self.type_header.clone();
        d
    }
}

impl KafkaConfig {
    /// The topic behind `stream`, if it is a Kafka stream.
    pub fn topic(&self, stream: &str) -> Option<&TopicConfig> {
        self.streams.get(stream)
    }

    /// A client configuration with the user's properties over ours.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c.set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// High watermarks of the partitions a projection reads from Kafka, shared
/// with the status endpoint: lag = high watermark − checkpoint.
pub type Watermarks = Arc<Mutex<BTreeMap<(String, u32), u64>>>;

/// A topic a reader consumes.
struct Route {
    stream: String,
    decoder: Decoder,
    types: HashSet<String>,
}

/// How far one read got in one partition: records below `next` were read
/// before (or handled: the group's offset may lag this instance's
/// checkpoint) and are skipped. A read keeps these in a short list and
/// moves `Pending::read_to` once at its end, so that a record costs no map
/// lookup and no allocation for its bookkeeping.
struct Progress<'r> {
    stream: &'r str,
    partition: u32,
    next: u64,
    /// A record was taken: `read_to` moves to `next`.
    moved: bool,
    /// The latest event time of the records taken (`Pending::read_times`).
    latest: Option<i64>,
}

/// Shared between the reader and librdkafka's callbacks (which run inside `poll`).
struct Context {
    projection: String,
    routes: BTreeMap<String, String>, // topic → stream
    watermarks: Watermarks,
    /// The (topic, partition)s this instance reads now.
    assigned: Mutex<BTreeSet<(String, i32)>>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(projection = %self.projection, facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(projection = %self.projection, facility, "librdkafka: {message}")
            }
            _ => tracing::debug!(projection = %self.projection, facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(projection = %self.projection, %error, "kafka: {reason}");
    }

    /// librdkafka's statistics carry each fetched partition's high
    /// watermark (from the fetch responses): no extra request to the broker.
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<serde_json::Value>(statistics) else { return };
        let assigned = self.assigned.lock().expect("assigned lock");
        let mut heads = BTreeMap::new();
        for (topic, stream) in &self.routes {
            let Some(partitions) = stats["topics"][topic]["partitions"].as_object() else { continue };
            for (id, p) in partitions {
                // -1 is librdkafka's internal partition.
                let (Ok(id), Some(high)) = (id.parse::<u32>(), p["hi_offset"].as_i64()) else { continue };
                if assigned.contains(&(topic.clone(), id as i32)) && high >= 0 {
                    heads.insert((stream.clone(), id), high as u64);
                }
            }
        }
        *self.watermarks.lock().expect("watermarks lock") = heads;
    }
}

impl ConsumerContext for Context {}

impl Context {
    fn set_assigned(&self, tpl: &TopicPartitionList) {
        *self.assigned.lock().expect("assigned lock") =
            tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
    }
}

/// The partition count of each of `topics` (0: the topic does not exist yet).
pub fn partition_counts<C: ConsumerContext>(
    client: &impl Consumer<C>,
    topics: &[&str],
) -> Result<BTreeMap<String, u32>, String> {
    let mut counts = BTreeMap::new();
    for topic in topics {
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(|e| format!("reading the metadata of topic {topic:?}: {e}"))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len() as u32);
        counts.insert((*topic).to_owned(), partitions);
    }
    Ok(counts)
}

/// The one partition count every topic of a partitioned projection has, the
/// number of its shards: partition *n* of each topic goes to shard *n*, so
/// topics with different counts cannot be read as one (as Kafka Streams
/// refuses topics that are not co-partitioned).
pub fn co_partitioned(counts: &BTreeMap<String, u32>) -> Result<u32, String> {
    let mut distinct: Vec<u32> = counts.values().copied().collect();
    distinct.sort_unstable();
    distinct.dedup();
    match distinct.as_slice() {
        [] => Err("no Kafka topic to partition by".into()),
        [0] => Err(format!("the topics {:?} do not exist yet (no partitions)", counts.keys().collect::<Vec<_>>())),
        [n] => Ok(*n),
        _ => Err(format!(
            "a partitioned projection needs topics with the same number of partitions (co-partitioned), and these differ: {}",
            counts.iter().map(|(t, n)| format!("{t} has {n}")).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Why the shard count of a partitioned projection is not known.
#[derive(Debug, thiserror::Error)]
pub enum ShardCountError {
    /// The brokers did not answer, or the topics do not exist yet: worth asking again.
    #[error("{0}")]
    NotYet(String),
    /// The topics cannot be split alike: asking again will not help.
    #[error("{0}")]
    NotCoPartitioned(String),
}

/// The partition count shared by the Kafka topics behind `streams`, read
/// from the brokers: how many shards a partitioned projection has.
pub fn shard_count(config: &KafkaConfig, streams: &[&str]) -> Result<u32, ShardCountError> {
    let topics: Vec<&str> = streams.iter().filter_map(|s| config.topic(s)).map(|t| t.topic.as_str()).collect();
    let consumer: BaseConsumer = config
        .client_config()
        .create()
        .map_err(|e| ShardCountError::NotYet(format!("creating a Kafka client: {e}")))?;
    let counts = partition_counts(&consumer, &topics).map_err(ShardCountError::NotYet)?;
    co_partitioned(&counts).map_err(|e| match counts.values().any(|n| *n == 0) {
        true => ShardCountError::NotYet(e),
        false => ShardCountError::NotCoPartitioned(e),
    })
}

/// Reads a projection's Kafka streams.
pub struct KafkaReader {
    consumer: BaseConsumer<Context>,
    /// Partitioned mode: the one partition number this shard reads.
    shard: Option<u32>,
    routes: BTreeMap<String, Route>, // by topic
    /// The partition count assigned, by topic.
    assigned: BTreeMap<String, u32>,
    next_refresh: Instant,
    handover: Handover,
}

/// When a read ends early. librdkafka fetches far ahead, so a catch-up read
/// (up to `BatchOptions::catch_up_read` records) could go on while the
/// worker, done with the previous batch, waits: reading and handling would
/// take turns. A read that has `after` records ends once `hungry` (set by
/// the worker while it waits for a delivery) says so.
pub struct Handover {
    pub hungry: Arc<std::sync::atomic::AtomicBool>,
    pub after: usize,
}

const REFRESH: Duration = Duration::from_secs(1);

impl KafkaReader {
    /// A consumer for the Kafka streams among `subscriptions` (of one shard
    /// when `sources` name one); `None` when there are none.
    pub fn open(
        sources: &super::Sources,
        projection: &str,
        subscriptions: &[(String, HashSet<String>)],
        watermarks: Watermarks,
        handover: Handover,
    ) -> Result<Option<KafkaReader>, String> {
        let (config, shard) = (&*sources.kafka, sources.shard);
        let routes: BTreeMap<String, Route> = subscriptions
            .iter()
            .filter_map(|(stream, types)| {
                config.topic(stream).map(|t| {
                    (t.topic.clone(), Route { stream: stream.clone(), decoder: t.decoder(), types: types.clone() })
                })
            })
            .collect();
        if routes.is_empty() {
            return Ok(None);
        }
        let mut client = config.client_config();
        client
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", "1000");
        // The reader never joins the group (it assigns partitions itself and
        // commits nothing), but librdkafka wants a group id for `assign`.
        client.set("group.id", format!("{}.{projection}", config.group_id));
        let context = Context {
            projection: projection.to_owned(),
            routes: routes.iter().map(|(t, r)| (t.clone(), r.stream.clone())).collect(),
            watermarks,
            assigned: Mutex::new(BTreeSet::new()),
        };
        let consumer: BaseConsumer<Context> =
            client.create_with_context(context).map_err(|e| format!("creating a Kafka consumer: {e}"))?;
        Ok(Some(KafkaReader {
            consumer,
            shard,
            routes,
            assigned: BTreeMap::new(),
            next_refresh: Instant::now(),
            handover,
        }))
    }

    /// Once a second: assign the partitions (new ones, when a topic grows).
    fn refresh(&mut self, cursor: &Cursor) -> Result<(), String> {
        if Instant::now() < self.next_refresh {
            return Ok(());
        }
        self.next_refresh = Instant::now() + REFRESH;
        let projection = self.consumer.context().projection.clone();
        let topics: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        let counts = partition_counts(&self.consumer, &topics)?;
        for (topic, n) in &counts {
            if *n == 0 {
                tracing::warn!(projection = %projection, topic, "topic has no partitions yet (does it exist?)");
            }
        }
        if let Some(shard) = self.shard {
            // Partition counts can grow under a running shard: it
            // must not go on reading a partitioning that no longer holds.
            let n = co_partitioned(&counts)?;
            if shard >= n && n > 0 {
                return Err(format!("shard {shard} has no partition to read: the topics have {n} partitions now"));
            }
        }
        if counts != self.assigned {
            self.assign(&counts, cursor)?;
        }
        Ok(())
    }

    /// Replica mode: read every partition, each from the cursor.
    fn assign(&mut self, counts: &BTreeMap<String, u32>, cursor: &Cursor) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        for (topic, n) in counts {
            let stream = &self.routes[topic].stream;
            for p in (0..*n).filter(|p| self.shard.is_none_or(|s| s == *p)) {
                let offset = match cursor.get(&(stream.clone(), p)) {
                    Some(o) => Offset::Offset(*o as i64),
                    None => Offset::Beginning,
                };
                tpl.add_partition_offset(topic, p as i32, offset).map_err(|e| e.to_string())?;
            }
        }
        self.consumer.assign(&tpl).map_err(|e| format!("assigning partitions: {e}"))?;
        self.consumer.context().set_assigned(&tpl);
        match self.shard {
            None => tracing::info!(assignment = ?counts, "reading every partition (replica mode)"),
            Some(shard) => tracing::info!(assignment = ?counts, shard, "reading one partition of each topic (a shard)"),
        }
        self.assigned = counts.clone();
        Ok(())
    }

    /// Move `read_to` to the consumer's position where that is further: a
    /// transactional producer's commit and abort markers take offsets no
    /// consumer is handed, and without this the checkpoint would stop
    /// before the last marker, the lag never reach 0, and an enricher's
    /// event-time alignment never see the partition exhausted. The position
    /// passes only records this reader was handed, and the markers (and
    /// aborted records) after them.
    fn step_over_markers(&self, cursor: &Cursor, into: &mut Pending) {
        let Ok(positions) = self.consumer.position() else { return };
        for e in positions.elements() {
            let (Some(route), Offset::Offset(position)) = (self.routes.get(e.topic()), e.offset()) else { continue };
            let key = (route.stream.clone(), e.partition() as u32);
            let read = into.read_to.get(&key).or(cursor.get(&key)).copied().unwrap_or(0);
            if position as u64 > read {
                into.read_to.insert(key, position as u64);
            }
        }
    }

    fn take<'r>(
        &'r self,
        message: &rdkafka::message::BorrowedMessage<'_>,
        cursor: &Cursor,
        into: &mut Pending,
        progress: &mut Vec<Progress<'r>>,
    ) {
        let Some(route) = self.routes.get(message.topic()) else { return };
        let (partition, offset) = (message.partition() as u32, message.offset() as u64);
        let stream = route.stream.as_str();
        let at = match progress.iter().position(|p| p.partition == partition && std::ptr::eq(p.stream, stream)) {
            Some(at) => at,
            None => {
                let key = (route.stream.clone(), partition);
                let next = into.read_to.get(&key).or(cursor.get(&key)).copied().unwrap_or(0);
                progress.push(Progress { stream, partition, next, moved: false, latest: None });
                progress.len() - 1
            }
        };
        // Already handled (the group's offset was behind this instance's checkpoint).
        if offset < progress[at].next {
            return;
        }
        (progress[at].next, progress[at].moved) = (offset + 1, true);
        // A few headers at most, usually: on the stack, not a heap allocation per record.
        let mut few: [(&str, &[u8]); 8] = [("", &[]); 8];
        let many: Vec<(&str, &[u8])>;
        let headers: &[(&str, &[u8])] = match message.headers() {
            None => &[],
            Some(hs) if hs.count() <= few.len() => {
                for (slot, h) in few.iter_mut().zip(hs.iter()) {
                    *slot = (h.key, h.value.unwrap_or_default());
                }
                &few[..hs.count()]
            }
            Some(hs) => {
                many = hs.iter().map(|h| (h.key, h.value.unwrap_or_default())).collect();
                &many
            }
        };
        let record = Record {
            key: message.key(),
            value: message.payload(),
            headers,
            timestamp: message.timestamp().to_millis(),
        };
        let seen = &mut progress[at].latest;
        match route.decoder.decode(&record) {
            Ok(Some(d)) => {
                *seen = Some(seen.map_or(d.time, |t| t.max(d.time)));
                if route.types.is_empty() || route.types.contains(&d.event_type) {
                    into.events.push(Event {
                        stream: route.stream.clone(),
                        partition,
                        offset,
                        key: d.key,
                        event_type: d.event_type,
                        time: d.time,
                        headers: d.headers,
                        content_type: d.content_type,
                        data: d.data,
                    });
                }
            }
            Ok(None) => {}
            Err(error) => {
                if let Some(t) = record.timestamp {
                    *seen = Some(seen.map_or(t, |s| s.max(t)));
                }
                let topic = message.topic();
                tracing::warn!(stream = %route.stream, topic, partition, offset, %error, "undecodable record");
                let value = record.value.unwrap_or_default();
                into.undecodable.push(Undecodable {
                    stream: route.stream.clone(),
                    topic: Some(topic.to_owned()),
                    partition,
                    offset,
                    key: record.key.map(|k| String::from_utf8_lossy(k).into_owned()),
                    time: record.timestamp.unwrap_or(0),
                    data: serde_json::from_slice(value)
                        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(value).into_owned())),
                    error: format!(
                        "undecodable record (topic {topic}, partition {partition}, offset {offset}): {error}"
                    ),
                });
            }
        }
    }
}

impl Reader for KafkaReader {
    /// Seek back to records handed back; a seek that fails makes the next
    /// read assign every partition again from the cursor.
    fn rewind(&mut self, to: &Cursor) -> Result<(), String> {
        for ((stream, partition), offset) in to {
            let Some(topic) = self.routes.iter().find(|(_, r)| r.stream == *stream).map(|(t, _)| t.clone()) else {
                continue;
            };
            let seek =
                self.consumer.seek(&topic, *partition as i32, Offset::Offset(*offset as i64), Duration::from_secs(5));
            if let Err(e) = seek {
                tracing::warn!(topic, partition, offset, error = %e, "seeking back failed; assigning again");
                self.assigned.clear();
                self.next_refresh = Instant::now();
            }
        }
        Ok(())
    }

    fn read(&mut self, cursor: &Cursor, max: usize, wait: Duration, into: &mut Pending) -> Result<(), String> {
        self.refresh(cursor)?;
        let start = into.events.len() + into.undecodable.len();
        let mut timeout = wait;
        let mut failure = None;
        let mut progress = Vec::new();
        let mut bytes = 0usize;
        loop {
            let taken = into.events.len() + into.undecodable.len() - start;
            if taken >= max
                || bytes >= READ_BYTES
                || (taken >= self.handover.after
                    && taken.is_multiple_of(256)
                    && self.handover.hungry.load(std::sync::atomic::Ordering::Relaxed))
            {
                break;
            }
            match self.consumer.poll(timeout) {
                None => break,
                Some(Ok(message)) => {
                    bytes += message.payload_len() + message.key_len();
                    self.take(&message, cursor, into, &mut progress)
                }
                Some(Err(e)) => {
                    failure = Some(format!("consuming from Kafka: {e}"));
                    break;
                }
            }
            timeout = Duration::ZERO;
        }
        for p in progress.into_iter().filter(|p| p.moved) {
            if let Some(t) = p.latest {
                let latest = into.read_times.entry((p.stream.to_owned(), p.partition)).or_insert(t);
                *latest = (*latest).max(t);
            }
            into.read_to.insert((p.stream.to_owned(), p.partition), p.next);
        }
        self.step_over_markers(cursor, into);
        match failure {
            Some(e) if into.events.len() + into.undecodable.len() == start => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, "kafka");
                Ok(())
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_the_one_partition_count_of_every_topic() {
        let counts = |c: &[(&str, u32)]| c.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect();
        assert_eq!(co_partitioned(&counts(&[("orders", 4), ("payments", 4)])), Ok(4));
        let error = co_partitioned(&counts(&[("orders", 4), ("payments", 6)])).unwrap_err();
        assert!(error.contains("orders has 4, payments has 6"), "{error}");
        let error = co_partitioned(&counts(&[("orders", 0)])).unwrap_err();
        assert!(error.contains("do not exist yet"), "{error}");
        assert!(co_partitioned(&counts(&[])).is_err());
    }
}
