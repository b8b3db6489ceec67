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
pub use crate::wit::Event;

/// What an event must be to enter a stream, in the units the API documents
/// (characters). Checked on every append, and when a plugin emits a derived
/// event: one the log would refuse must fail its batch (and become a dead
/// letter), not the relay publishing it later.
pub fn check_event<'a>(
    event_type: &str,
    key: Option<&str>,
    headers: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
    data_bytes: usize,
    max_event_bytes: usize,
) -> Result<(), String> {
    let chars = |s: &str| s.chars().count();
    if event_type.is_empty() || chars(event_type) > 256 {
        return Err("`type` must be 1 to 256 characters".into());
    }
    if key.is_some_and(|k| k.is_empty() || chars(k) > 1024) {
        return Err("`key` must be 1 to 1024 characters when given".into());
    }
    let too_many = headers.len() > 64;
    if too_many || headers.into_iter().any(|(k, v)| chars(k) > 256 || chars(v) > 16384) {
        return Err("at most 64 headers, names up to 256 characters, values up to 16384".into());
    }
    if data_bytes > max_event_bytes {
        return Err(format!("`data` is larger than {max_event_bytes} bytes"));
    }
    Ok(())
}

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
}

impl Sources {
    /// Only the embedded log.
    pub fn log(log: Arc<log::EventLog>) -> Self {
        Sources { log, kafka: Arc::default() }
    }

    /// `subscriptions` split into (embedded log streams, Kafka streams).
    pub fn split(&self, subscriptions: &reader::Subscriptions) -> (reader::Subscriptions, reader::Subscriptions) {
        subscriptions.iter().cloned().partition(|(stream, _)| self.kafka.topic(stream).is_none())
    }
}
