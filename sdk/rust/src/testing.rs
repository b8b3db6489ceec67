//! Helpers for unit-testing projections natively.

use crate::Event;

/// An event of `event_type` on partition 0 of `stream` at offset 0, with JSON `data`.
pub fn event(stream: &str, event_type: &str, key: Option<&str>, data: &[u8]) -> Event {
    Event {
        stream: stream.to_owned(),
        partition: 0,
        offset: 0,
        key: key.map(str::to_owned),
        event_type: event_type.to_owned(),
        time: 0,
        headers: Vec::new(),
        content_type: "application/json".to_owned(),
        data: data.to_vec(),
    }
}
