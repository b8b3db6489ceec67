//! Publishing emitted events to Kafka, and reading back which a shard's
//! previous owner published (`handover`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{EMIT_ID_HEADER, EVENT_TYPE_HEADER};
use crate::source::kafka::KafkaConfig;
use crate::store::Emitted;

/// Counts failed deliveries, and where the successful ones landed.
struct Deliveries {
    failed: AtomicUsize,
    /// Per (topic, partition): the offset after the last record delivered.
    landed: Mutex<BTreeMap<(String, i32), i64>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                let mut landed = self.landed.lock().expect("landed lock");
                super::raise(&mut landed, (m.topic().to_owned(), m.partition()), m.offset() + 1);
            }
            Err((e, _)) => {
                tracing::warn!(error = %e, "a Kafka delivery failed");
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// An idempotent Kafka producer for emitted events.
pub(super) struct KafkaSink {
    producer: BaseProducer<Deliveries>,
}

impl KafkaSink {
    pub(super) fn new(config: &KafkaConfig) -> Result<Self, String> {
        let producer = config
            .client_config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // Kafka's Java client partitioning, like the embedded log's.
            .set("partitioner", "murmur2_random")
            .create_with_context(Deliveries { failed: AtomicUsize::new(0), landed: Mutex::default() })
            .map_err(|e| format!("creating a Kafka producer: {e}"))?;
        Ok(KafkaSink { producer })
    }

    /// Send `events` (topic, emit id, event) and wait until every one is
    /// acknowledged; say where they landed: per (topic, partition), the
    /// offset after the last one.
    pub(super) fn send(&self, events: &[(&str, String, &Emitted)]) -> Result<BTreeMap<(String, i32), i64>, String> {
        let context = self.producer.context();
        context.failed.store(0, Ordering::Relaxed);
        context.landed.lock().expect("landed lock").clear();
        for (topic, id, e) in events {
            let mut headers = OwnedHeaders::new()
                .insert(Header { key: EVENT_TYPE_HEADER, value: Some(e.event_type.as_bytes()) })
                .insert(Header { key: EMIT_ID_HEADER, value: Some(id.as_bytes()) });
            for (k, v) in &e.headers {
                headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
            }
            let mut record: BaseRecord<'_, str, str> =
                BaseRecord::to(topic).payload(e.data.get()).headers(headers).timestamp(e.time);
            if let Some(k) = &e.key {
                record = record.key(k.as_str());
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        back,
                    )) => {
                        record = back;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(format!("producing to {topic}: {e}")),
                }
            }
            self.producer.poll(Duration::ZERO);
        }
        self.producer.flush(Duration::from_secs(30)).map_err(|e| format!("flushing to Kafka: {e}"))?;
        match context.failed.load(Ordering::Relaxed) {
            0 => Ok(std::mem::take(&mut *context.landed.lock().expect("landed lock"))),
            n => Err(format!("{n} events were not delivered to Kafka")),
        }
    }
}

/// How long reading a topic back for emit ids may take before it is tried again.
const SCAN_LIMIT: Duration = Duration::from_secs(120);

/// The emit ids on `topic` that `wanted` accepts, read from `from` (per
/// partition; a partition not in it from its beginning) to the end each
/// partition has now; and those ends.
pub(super) fn emit_ids(
    config: &KafkaConfig,
    topic: &str,
    from: &BTreeMap<i32, i64>,
    wanted: impl Fn(&str) -> bool,
    stop: &AtomicBool,
) -> Result<(HashSet<String>, BTreeMap<i32, i64>), String> {
    let consumer: BaseConsumer = config
        .client_config()
        // Never joins it (partitions are assigned below), but librdkafka wants one.
        .set("group.id", "refract.handover")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| format!("creating a reader of {topic}: {e}"))?;
    let timeout = Duration::from_secs(10);
    let metadata =
        consumer.fetch_metadata(Some(topic), timeout).map_err(|e| format!("reading {topic}'s metadata: {e}"))?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (low, high) =
            consumer.fetch_watermarks(topic, p, timeout).map_err(|e| format!("reading {topic}/{p}'s offsets: {e}"))?;
        let start = from.get(&p).copied().unwrap_or(low).max(low);
        ends.insert(p, high);
        if start < high {
            tpl.add_partition_offset(topic, p, Offset::Offset(start)).map_err(|e| e.to_string())?;
        }
    }
    let mut ids = HashSet::new();
    let mut waiting: BTreeMap<i32, i64> =
        tpl.elements().iter().map(|e| (e.partition(), ends[&e.partition()])).collect();
    if waiting.is_empty() {
        return Ok((ids, ends));
    }
    consumer.assign(&tpl).map_err(|e| format!("reading {topic}: {e}"))?;
    let until = Instant::now() + SCAN_LIMIT;
    while !waiting.is_empty() {
        if stop.load(Ordering::Relaxed) || Instant::now() >= until {
            return Err(format!("reading {topic} back for what was published: {waiting:?} not reached"));
        }
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.map_err(|e| format!("reading {topic}: {e}"))?;
            let id = message.headers().and_then(|h| h.iter().find(|h| h.key == EMIT_ID_HEADER)).and_then(|h| h.value);
            if let Some(id) = id.and_then(|v| std::str::from_utf8(v).ok()).filter(|id| wanted(id)) {
                ids.insert(id.to_owned());
            }
            if waiting.get(&message.partition()).is_some_and(|end| message.offset() + 1 >= *end) {
                waiting.remove(&message.partition());
            }
        }
        // Past the end without a record at it (compacted away, or a transaction marker).
        if let Ok(position) = consumer.position() {
            for e in position.elements() {
                if let Offset::Offset(at) = e.offset()
                    && waiting.get(&e.partition()).is_some_and(|end| at >= *end)
                {
                    waiting.remove(&e.partition());
                }
            }
        }
    }
    Ok((ids, ends))
}
