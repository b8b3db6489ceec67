//! Where events come from: the embedded log (and, later, Kafka topics).

pub mod log;
pub mod partition;
pub mod record;

use std::collections::BTreeMap;

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
