//! Where events come from: the embedded log and Kafka topics.

pub mod decode;
pub mod kafka;
pub mod log;
pub mod partition;
pub mod reader;
pub mod record;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// An event as plugins receive it (the WIT `event` record).
pub use crate::event::Event;

/// An event as a producer appends it: `{"type", "key"?, "time"?, "headers"?, "data"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// The event type, e.g. `OrderPlaced`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The partitioning key; events with the same key keep their order.
    #[serde(default)]
    pub key: Option<String>,
    /// Event time in ms since the Unix epoch; the append time when absent.
    #[serde(default, deserialize_with = "integral")]
    pub time: Option<i64>,
    /// Free-form string headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The payload: any JSON value.
    pub data: Box<RawValue>,
}

/// The largest event time accepted, in either direction: 2^53 - 1 ms (some
/// 285,000 years), the largest integer any JSON number (and JavaScript's)
/// holds exactly.
pub const MAX_TIME: i64 = (1 << 53) - 1;

/// A whole number of ms within [`MAX_TIME`], also when written `5.0` (JSON
/// Schema counts it as an integer, and some producers only have floats).
fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    let whole = match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => Some(i),
        (None, Some(f)) if f.fract() == 0.0 && f.abs() <= MAX_TIME as f64 => Some(f as i64),
        _ => None,
    };
    match whole {
        Some(t) if t.abs() <= MAX_TIME => Ok(Some(t)),
        _ => Err(D::Error::custom(format!("`time` must be a whole number of ms within ±{MAX_TIME}, got {n}"))),
    }
}

/// Where an appended event was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// Where streams live: in the embedded log unless `kafka.streams` maps them to a topic.
#[derive(Clone)]
pub struct Sources {
    pub log: Arc<log::EventLog>,
    pub kafka: Arc<kafka::KafkaConfig>,
    /// A shard of a partitioned projection reads only this partition number
    /// of its Kafka topics; `None` reads every partition.
    pub shard: Option<u32>,
}

impl Sources {
    /// Only the embedded log.
    pub fn log(log: Arc<log::EventLog>) -> Self {
        Sources { log, kafka: Arc::default(), shard: None }
    }

    /// `subscriptions` split into (embedded log streams, Kafka streams).
    pub fn split(&self, subscriptions: &reader::Subscriptions) -> (reader::Subscriptions, reader::Subscriptions) {
        subscriptions.iter().cloned().partition(|(stream, _)| self.kafka.topic(stream).is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time_of(json: &str) -> Result<Option<i64>, String> {
        serde_json::from_str::<NewEvent>(json).map(|e| e.time).map_err(|e| e.to_string())
    }

    #[test]
    fn an_event_time_written_as_a_whole_float_is_that_many_ms_to_the_last_digit() {
        // Found by schemathesis: a best-effort float parser read this as …894.5 and refused it.
        let big = r#"{"type": "O", "data": {}, "time": 4341669998380894.0}"#;
        assert_eq!(time_of(big), Ok(Some(4_341_669_998_380_894)));
        assert_eq!(time_of(r#"{"type": "O", "data": {}, "time": 5.0}"#), Ok(Some(5)));
        assert_eq!(time_of(r#"{"type": "O", "data": {}, "time": -277497.0}"#), Ok(Some(-277_497)));
        let max = format!(r#"{{"type": "O", "data": {{}}, "time": {MAX_TIME}.0}}"#);
        assert_eq!(time_of(&max), Ok(Some(MAX_TIME)));
        let error = time_of(r#"{"type": "O", "data": {}, "time": 5.5}"#).unwrap_err();
        assert!(error.contains("`time` must be a whole number of ms"), "{error}");
        let error = time_of(r#"{"type": "O", "data": {}, "time": 9007199254740992}"#).unwrap_err();
        assert!(error.contains("`time` must be a whole number of ms"), "{error}");
    }
}
