//! Helpers on the events a plugin receives and the failures it reports.

use std::fmt;

use serde::de::DeserializeOwned;

use crate::{Event, Failure};

impl Event {
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

impl Failure {
    /// An event that can never be applied: it becomes a dead letter.
    pub fn rejected(reason: impl fmt::Display) -> Self {
        Failure::Rejected(reason.to_string())
    }

    /// A condition that may pass: the runtime retries the batch with back-off.
    pub fn transient(reason: impl fmt::Display) -> Self {
        Failure::Transient(reason.to_string())
    }
}
