//! Events a plugin publishes: [`NewEvent`], and [`emit`] for projections.

use serde::Serialize;

use crate::{Event, Failure, wit};

/// An event for a projection to publish with [`emit`].
#[derive(Debug, Clone)]
pub struct NewEvent(wit::refract::plugin::emit::Outgoing);

impl NewEvent {
    /// An event of type `event_type` whose data is `data` as JSON.
    pub fn json<T: Serialize>(event_type: &str, data: &T) -> Result<Self, Failure> {
        let data = serde_json::to_vec(data)
            .map_err(|e| Failure::rejected(format!("cannot encode a {event_type} event: {e}")))?;
        Ok(NewEvent(wit::refract::plugin::emit::Outgoing {
            event_type: event_type.to_owned(),
            key: None,
            time: 0,
            headers: Vec::new(),
            data,
        }))
    }

    /// The partitioning key: events with the same key keep their order.
    pub fn key(mut self, key: &str) -> Self {
        self.0.key = Some(key.to_owned());
        self
    }

    /// Event time in ms since the Unix epoch; plugins have no clock, so this
    /// is usually the time of the event being handled.
    pub fn time(mut self, time: i64) -> Self {
        self.0.time = time;
        self
    }

    /// Add a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.0.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Take the key (unless one is set), the time and the headers of
    /// `event`, the event this one is derived from.
    pub fn derived_from(mut self, event: &Event) -> Self {
        if self.0.key.is_none() {
            self.0.key.clone_from(&event.key);
        }
        self.0.time = event.time;
        let mut headers = event.headers.clone();
        headers.append(&mut self.0.headers);
        self.0.headers = headers;
        self
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.0.event_type
    }

    /// The key, if any.
    pub fn key_str(&self) -> Option<&str> {
        self.0.key.as_deref()
    }

    /// The event time in ms since the Unix epoch.
    pub fn event_time(&self) -> i64 {
        self.0.time
    }

    /// The headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.0.headers
    }

    /// The payload: a JSON document.
    pub fn data(&self) -> &[u8] {
        &self.0.data
    }

    #[doc(hidden)]
    pub fn into_wit(self) -> wit::refract::plugin::emit::Outgoing {
        self.0
    }
}

/// Publish `event` to `stream` once the current batch commits (the embedded
/// log or a Kafka topic, as the runtime routes the stream). Events emitted
/// while a projection replays history are dropped by the runtime.
pub fn emit(stream: &str, event: NewEvent) -> Result<(), Failure> {
    use wit::refract::plugin::emit::EmitError;
    crate::host::emit(stream, &event.0).map_err(|e| {
        let message = match e {
            EmitError::InvalidStream(m) | EmitError::InvalidEvent(m) | EmitError::TooLarge(m) => m,
        };
        Failure::Rejected(format!("emitting to {stream}: {message}"))
    })
}
