//! Helpers for unit-testing projections natively.

use crate::Event;

/// An event of `event_type` on partition 0 of `stream` at offset 0, with JSON `data`.
pub fn event(stream: &str, event_type: &str, key: Option<&str>, data: &[u8]) -> Event {
    let mut event = Event::new(stream, event_type, data);
    event.key = key.map(str::to_owned);
    event
}
