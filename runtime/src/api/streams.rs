//! Appending to and reading from the embedded log.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;

use super::extract::{Path, Query};
use axum::http::HeaderMap;
use serde::Deserialize;

use super::dto::{Appended, StreamList};
use super::{ApiError, page_limit};
use crate::runtime::Runtime;
use crate::source::NewEvent;
use crate::source::log::Error as LogError;

pub(super) async fn list(State(rt): State<Arc<Runtime>>) -> Json<StreamList> {
    Json(StreamList { streams: rt.log.streams() })
}

/// Parse a body holding one event, a JSON array of events, or NDJSON.
fn parse_events(body: &[u8]) -> Result<Vec<NewEvent>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        return serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid event array: {e}")));
    }
    // One object, or several separated by newlines: a stream of JSON values.
    let mut events = Vec::new();
    for (i, event) in serde_json::Deserializer::from_slice(body).into_iter::<NewEvent>().enumerate() {
        events.push(event.map_err(|e| ApiError::bad_request(format!("invalid event {i}: {e}")))?);
    }
    Ok(events)
}

pub(super) async fn append(
    State(rt): State<Arc<Runtime>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Appended>, ApiError> {
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    if !(content_type.starts_with("application/json")
        || content_type.starts_with("application/x-ndjson")
        || content_type.starts_with("application/ndjson"))
    {
        return Err(ApiError::bad_request(format!(
            "content-type {content_type:?} is not accepted: send application/json or application/x-ndjson"
        )));
    }
    if let Some(topic) = rt.kafka.topic(&stream) {
        return Err(ApiError::conflict(
            "stream_on_kafka",
            format!("stream {stream:?} is the Kafka topic {:?}: produce to Kafka instead", topic.topic),
        ));
    }
    let events = parse_events(&body)?;
    let log = rt.log.clone();
    let name = stream.clone();
    let positions = tokio::task::spawn_blocking(move || log.append(&name, &events))
        .await
        .map_err(|e| ApiError::internal("appending", e))?
        .map_err(|e| match e {
            LogError::Invalid(m) => ApiError::bad_request(m),
            other => ApiError::unavailable("appending to the log", other),
        })?;
    let wait_for = super::consistency::token(&stream, &positions);
    Ok(Json(Appended { stream, positions, wait_for }))
}

#[derive(Deserialize)]
pub(super) struct ReadParams {
    #[serde(default)]
    partition: u32,
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
}

/// The most event data one page of a stream holds (`next` continues it).
const PAGE_BYTES: usize = 16 << 20;

pub(super) async fn read(
    State(rt): State<Arc<Runtime>>,
    Path(stream): Path<String>,
    Query(p): Query<ReadParams>,
) -> Result<Json<EventPage>, ApiError> {
    let limit = page_limit(p.limit)?;
    let events = rt.log.read(&stream, p.partition, p.from, limit, PAGE_BYTES).map_err(|e| match e {
        LogError::UnknownStream(_) => ApiError::not_found("stream_not_found", e.to_string()),
        LogError::UnknownPartition { .. } => ApiError::not_found("partition_not_found", e.to_string()),
        other => ApiError::internal("reading the log", other),
    })?;
    let next = events.last().map_or(p.from, |e| e.offset + 1);
    let events = events
        .into_iter()
        .map(|e| StoredEvent {
            partition: e.partition,
            offset: e.offset,
            key: e.key,
            event_type: e.event_type,
            time: e.time,
            headers: e.headers.into_iter().collect(),
            data: super::raw_json(e.data),
        })
        .collect();
    Ok(Json(EventPage { stream, partition: p.partition, events, next }))
}

/// A page of a stream's partition, and the offset to read on from.
#[derive(serde::Serialize)]
pub(super) struct EventPage {
    stream: String,
    partition: u32,
    events: Vec<StoredEvent>,
    next: u64,
}

/// One event as stored, its data passed on without being parsed.
#[derive(serde::Serialize)]
struct StoredEvent {
    partition: u32,
    offset: u64,
    key: Option<String>,
    #[serde(rename = "type")]
    event_type: String,
    time: i64,
    headers: std::collections::BTreeMap<String, String>,
    data: Box<serde_json::value::RawValue>,
}

#[cfg(test)]
mod tests {
    use super::parse_events;

    #[test]
    fn one_event_an_array_and_ndjson_all_parse() {
        let one = br#"{"type":"A","data":{}}"#;
        let array = br#"[{"type":"A","data":1},{"type":"B","key":"k","data":null}]"#;
        let ndjson = b"{\"type\":\"A\",\"data\":1}\n{\"type\":\"B\",\"data\":2}\n";
        assert_eq!(parse_events(one).unwrap().len(), 1);
        assert_eq!(parse_events(array).unwrap().len(), 2);
        assert_eq!(parse_events(ndjson).unwrap().len(), 2);
        let bad = b"{\"type\":\"A\",\"data\":1}\n{\"type\":\"B\"}\n";
        let err = parse_events(bad).unwrap_err();
        assert!(format!("{err:?}").contains("invalid event 1: missing field `data`"), "{err:?}");
        assert!(parse_events(br#"{"type":"A","data":1,"extra":2}"#).is_err());
    }

    #[test]
    fn event_time_is_a_whole_number_of_ms_however_it_is_written() {
        let time =
            |t: &str| parse_events(format!(r#"{{"type":"A","data":1,"time":{t}}}"#).as_bytes()).map(|e| e[0].time);
        assert_eq!(time("1700000000000").unwrap(), Some(1_700_000_000_000));
        assert_eq!(time("-58.0").unwrap(), Some(-58));
        assert_eq!(time("null").unwrap(), None);
        assert_eq!(time("9007199254740991").unwrap(), Some(9_007_199_254_740_991));
        for bad in ["5.5", "1e30", "9223372036854775808", "-9223372036854775809", "9007199254740992", "\"5\""] {
            assert!(time(bad).is_err(), "{bad}");
        }
    }
}
