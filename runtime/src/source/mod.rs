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
pub use crate::plugin::bindings::refract::plugin::types::Event;

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
    #[serde(default)]
    pub time: Option<i64>,
    /// Free-form string headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The payload: any JSON value.
    pub data: Box<RawValue>,
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
