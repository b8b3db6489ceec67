//! The events a plugin receives and the failures it reports: the SDK's own
//! types, converted from and to the WIT's at the export boundary
//! ([`crate::export`]), so that a plugin's code does not change when the
//! WIT package gains a field.

use std::fmt;

use serde::de::DeserializeOwned;

use crate::wit::refract::plugin::{log as wit_log, types as wit};

/// An event handed to a plugin, as it was read from its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// The stream (a log stream, or the name a Kafka topic is configured under).
    pub stream: String,
    /// The partition it was read from.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
    /// The partitioning key, if it has one.
    pub key: Option<String>,
    /// Its type, such as `OrderPlaced`.
    pub event_type: String,
    /// Event time, in ms since the Unix epoch.
    pub time: i64,
    /// Headers, in the order they were written.
    pub headers: Vec<(String, String)>,
    /// The content type of `data` (`application/json` for JSON events).
    pub content_type: String,
    /// The payload.
    pub data: Vec<u8>,
}

impl Event {
    /// An event of `event_type` at offset 0 of partition 0 of `stream`,
    /// with no key, time 0, no headers and JSON `data`; set the rest with
    /// the public fields.
    pub fn new(stream: &str, event_type: &str, data: &[u8]) -> Self {
        Event {
            stream: stream.to_owned(),
            partition: 0,
            offset: 0,
            key: None,
            event_type: event_type.to_owned(),
            time: 0,
            headers: Vec::new(),
            content_type: "application/json".to_owned(),
            data: data.to_vec(),
        }
    }

    /// Decode the event's data as JSON into `T`; a decoding error rejects the event.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_slice(&self.data).map_err(|e| {
            Failure::Rejected(format!(
                "{} at {}/{}@{}: data does not decode: {e}",
                self.event_type, self.stream, self.partition, self.offset
            ))
        })
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl From<wit::Event> for Event {
    fn from(e: wit::Event) -> Self {
        let wit::Event { stream, partition, offset, key, event_type, time, headers, content_type, data } = e;
        Event { stream, partition, offset, key, event_type, time, headers, content_type, data }
    }
}

/// Why a plugin could not handle an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The event can never be applied: it becomes a dead letter.
    Rejected(String),
    /// A condition that may pass: the runtime retries the batch with back-off.
    Transient(String),
}

impl Failure {
    /// An event that can never be applied: it becomes a dead letter.
    pub fn rejected(reason: impl fmt::Display) -> Self {
        Failure::Rejected(reason.to_string())
    }

    /// A condition that may pass: the runtime retries the batch with back-off.
    pub fn transient(reason: impl fmt::Display) -> Self {
        Failure::Transient(reason.to_string())
    }

    #[doc(hidden)]
    pub fn into_wit(self) -> wit::Failure {
        match self {
            Failure::Rejected(m) => wit::Failure::Rejected(m),
            Failure::Transient(m) => wit::Failure::Transient(m),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Rejected(m) => write!(f, "rejected: {m}"),
            Failure::Transient(m) => write!(f, "transient: {m}"),
        }
    }
}

impl std::error::Error for Failure {}

/// The type of a search index field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    /// Matched whole: ids, statuses, tags.
    Keyword,
    /// Tokenized for full-text search.
    Text,
    /// A signed 64-bit integer.
    I64,
    /// A 64-bit float.
    F64,
    /// A date (RFC 3339 text, or ms since the Unix epoch).
    Date,
    /// A boolean.
    Bool,
}

impl From<FieldType> for wit::FieldType {
    fn from(t: FieldType) -> Self {
        match t {
            FieldType::Keyword => wit::FieldType::Keyword,
            FieldType::Text => wit::FieldType::Text,
            FieldType::I64 => wit::FieldType::I64,
            FieldType::F64 => wit::FieldType::F64,
            FieldType::Date => wit::FieldType::Date,
            FieldType::Bool => wit::FieldType::Bool,
        }
    }
}

/// The log level of a message sent with [`log`](crate::log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Step by step.
    Trace,
    /// For whoever debugs the plugin.
    Debug,
    /// Worth knowing in normal operation.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something failed.
    Error,
}

impl From<Level> for wit_log::Level {
    fn from(l: Level) -> Self {
        match l {
            Level::Trace => wit_log::Level::Trace,
            Level::Debug => wit_log::Level::Debug,
            Level::Info => wit_log::Level::Info,
            Level::Warn => wit_log::Level::Warn,
            Level::Error => wit_log::Level::Error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_from_the_wit_keeps_every_field() {
        let from = wit::Event {
            stream: "orders".into(),
            partition: 3,
            offset: 41,
            key: Some("o-1".into()),
            event_type: "OrderPlaced".into(),
            time: 1_700_000_000_000,
            headers: vec![("trace".into(), "t-1".into())],
            content_type: "application/json".into(),
            data: br#"{"total":5}"#.to_vec(),
        };
        let e = Event::from(from);
        assert_eq!((e.stream.as_str(), e.partition, e.offset), ("orders", 3, 41));
        assert_eq!((e.key.as_deref(), e.event_type.as_str(), e.time), (Some("o-1"), "OrderPlaced", 1_700_000_000_000));
        assert_eq!(e.header("trace"), Some("t-1"));
        assert_eq!((e.content_type.as_str(), e.data.as_slice()), ("application/json", br#"{"total":5}"#.as_slice()));
    }

    #[test]
    fn a_failure_keeps_its_kind_and_message_across_the_wit() {
        assert!(matches!(Failure::rejected("bad").into_wit(), wit::Failure::Rejected(m) if m == "bad"));
        assert!(matches!(Failure::transient("later").into_wit(), wit::Failure::Transient(m) if m == "later"));
        assert_eq!(Failure::rejected("bad").to_string(), "rejected: bad");
    }
}
