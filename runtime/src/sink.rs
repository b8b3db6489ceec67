//! Where emitted events go: the relay that publishes a projection's
//! emitted-events outbox to the embedded log or to Kafka topics.
//!
//! A batch's emitted events commit with its writes and checkpoint (the
//! outbox, in the read model's transaction). The relay then publishes them
//! in order and trims the outbox:
//! - to the **embedded log**, exactly once: each append records, in the same
//!   log transaction, the outbox sequence it reached for that stream
//!   (producer `emit/<projection>`, or `emit/<projection>@<n>` for generation
//!   `n > 0`: each generation numbers its outbox from 1), and a relay that restarts skips what the
//!   log already has;
//! - to a **Kafka topic**, at least once: an idempotent producer (no
//!   duplicates from its own retries), flushed before the outbox is trimmed.
//!   A crash between the flush and the trim publishes those events again;
//!   each record carries `refract-emit-id: <projection>/<sequence>` so that
//!   consumers can drop repeats.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::clock::Backoff;
use crate::source::NewEvent;
use crate::source::kafka::KafkaConfig;
use crate::source::log::EventLog;
use crate::store::{Emitted, ReadModel};

/// The header naming an emitted event's origin on Kafka.
pub const EMIT_ID_HEADER: &str = "refract-emit-id";
/// The header carrying the event type on Kafka (read back with `type-header: event-type`).
pub const EVENT_TYPE_HEADER: &str = "event-type";

/// Publishes one projection's emitted events.
pub struct Relay {
    projection: String,
    /// The generation whose outbox this relay publishes.
    generation: u64,
    read_model: Arc<ReadModel>,
    log: Arc<EventLog>,
    kafka: Arc<KafkaConfig>,
    producer: Option<KafkaSink>,
    stop: Arc<AtomicBool>,
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
        Relay { projection: projection.to_owned(), generation, read_model, log, kafka, producer: None, stop }
    }

    /// Who publishes: the projection, and its generation when not the first
    /// (a rebuilt generation numbers its outbox from 1 again).
    fn producer(&self) -> String {
        match self.generation {
            0 => self.projection.clone(),
            n => format!("{}@{n}", self.projection),
        }
    }

    /// Publish until `stop` is set.
    pub fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        while !self.stop.load(Ordering::Relaxed) {
            let seen = self.read_model.emitted_signal().current();
            match self.publish_some() {
                Ok(0) => {
                    self.read_model.emitted_signal().wait(seen, Duration::from_millis(200));
                }
                Ok(_) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(projection = %self.projection, error = %e, "publishing emitted events failed; retrying");
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
    }

    /// Publish the next chunk of the outbox; how many events it held.
    pub fn publish_some(&mut self) -> Result<usize, String> {
        let entries = self.read_model.emitted_after(0, CHUNK).map_err(|e| e.to_string())?;
        let Some(&(last, _)) = entries.last() else { return Ok(0) };
        let mut to_log: BTreeMap<&str, Vec<(u64, &Emitted)>> = BTreeMap::new();
        let mut to_kafka: Vec<(u64, &str, &Emitted)> = Vec::new();
        for (sequence, event) in &entries {
            match self.kafka.topic(&event.stream) {
                Some(topic) => to_kafka.push((*sequence, topic.topic.as_str(), event)),
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
            if let Err(e) = sink.send(&self.producer(), &to_kafka) {
                // The next attempt gets a new producer: after failed
                // deliveries an idempotent one may be stuck on sequence
                // numbers the broker refuses, or fatally failed (librdkafka
                // then wants it recreated). The chunk goes again under the
                // same emit ids.
                self.producer = None;
                return Err(e);
            }
        }
        self.read_model.trim_emitted(last).map_err(|e| e.to_string())?;
        Ok(entries.len())
    }
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

struct DeliveryFailures(AtomicUsize);

impl ClientContext for DeliveryFailures {}

impl ProducerContext for DeliveryFailures {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::warn!(error = %e, "a Kafka delivery failed");
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An idempotent Kafka producer for emitted events.
struct KafkaSink {
    producer: BaseProducer<DeliveryFailures>,
}

impl KafkaSink {
    fn new(config: &KafkaConfig) -> Result<Self, String> {
        let producer = config
            .client_config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // Kafka's Java client partitioning, like the embedded log's.
            .set("partitioner", "murmur2_random")
            .create_with_context(DeliveryFailures(AtomicUsize::new(0)))
            .map_err(|e| format!("creating a Kafka producer: {e}"))?;
        Ok(KafkaSink { producer })
    }

    /// Send `events` and wait until every one is acknowledged.
    fn send(&self, projection: &str, events: &[(u64, &str, &Emitted)]) -> Result<(), String> {
        self.producer.context().0.store(0, Ordering::Relaxed);
        for (sequence, topic, e) in events {
            let id = format!("{projection}/{sequence}");
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
        match self.producer.context().0.load(Ordering::Relaxed) {
            0 => Ok(()),
            n => Err(format!("{n} events were not delivered to Kafka")),
        }
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
