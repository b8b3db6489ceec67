//! Turning Kafka records into events: plain JSON, CloudEvents and Debezium.
//!
//! A decoder sees one record (key, value, headers, timestamp) and returns the
//! event a plugin receives, nothing (a record that carries no event, such as
//! a Debezium tombstone), or an error that makes the record a dead letter.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer as _};
use serde_json::Value;

/// The encoding of a topic's records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// A JSON value per record; the event type is read from a field of it or
    /// from a header.
    #[default]
    Json,
    /// CloudEvents 1.0, in structured mode (`application/cloudevents+json`)
    /// or binary mode (`ce_*` headers), recognised per record.
    Cloudevents,
    /// Debezium change events: `op` c/u/d/r/t → `<table>.created`,
    /// `.updated`, `.deleted`, `.snapshot`, `.truncated`.
    Debezium,
}

/// How one topic's records become events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoder {
    pub format: Format,
    /// JSON: the top-level field holding the event type.
    pub type_field: String,
    /// JSON: a header holding the event type; takes precedence over the field.
    pub type_header: Option<String>,
}

impl Decoder {
    pub fn new(format: Format) -> Self {
        Decoder { format, type_field: "type".into(), type_header: None }
    }

    /// Decode `record`; `Ok(None)` for records that carry no event.
    pub fn decode(&self, record: &Record<'_>) -> Result<Option<Decoded>, String> {
        match self.format {
            Format::Json => json(record, &self.type_field, self.type_header.as_deref()).map(Some),
            Format::Cloudevents => cloud_event(record).map(Some),
            Format::Debezium => debezium(record),
        }
    }
}

/// A record as read from Kafka.
#[derive(Debug, Clone, Default)]
pub struct Record<'a> {
    pub key: Option<&'a [u8]>,
    /// `None` for a tombstone.
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The record's timestamp (ms since the Unix epoch), when it has one.
    pub timestamp: Option<i64>,
}

/// What a plugin will see of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub event_type: String,
    pub key: Option<String>,
    pub time: i64,
    pub headers: Vec<(String, String)>,
    pub content_type: String,
    pub data: Vec<u8>,
}

const JSON: &str = "application/json";

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("the {what} is not UTF-8"))
}

fn text_headers(record: &Record<'_>) -> Vec<(String, String)> {
    // Headers that are not text (binary tracing contexts) are left out.
    record
        .headers
        .iter()
        .filter_map(|(k, v)| std::str::from_utf8(v).ok().map(|v| ((*k).to_owned(), v.to_owned())))
        .collect()
}

fn header<'a>(record: &Record<'a>, name: &str) -> Option<&'a [u8]> {
    record.headers.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
}

fn key_string(record: &Record<'_>) -> Result<Option<String>, String> {
    record.key.map(|k| utf8(k, "record key").map(str::to_owned)).transpose()
}

fn parse_json(bytes: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("the value is not JSON: {e}"))
}

fn json(record: &Record<'_>, type_field: &str, type_header: Option<&str>) -> Result<Decoded, String> {
    let value = record.value.ok_or("the record has no value (a tombstone)")?;
    let not_json = |e: serde_json::Error| format!("the value is not JSON: {e}");
    let event_type = match type_header {
        Some(h) => {
            let event_type = utf8(header(record, h).ok_or_else(|| format!("no {h:?} header"))?, "type header")?;
            // Only validated: skipping keys is cheaper than reading them.
            serde_json::from_slice::<serde::de::IgnoredAny>(value).map_err(not_json)?;
            event_type.to_owned()
        }
        None => {
            // Validate and find the type in one pass, without building the document.
            let mut document = serde_json::Deserializer::from_slice(value);
            let found = (&mut document)
                .deserialize_any(FindField { name: type_field })
                .and_then(|found| document.end().map(|()| found))
                .map_err(not_json)?;
            match found {
                Found::Text(t) if !t.is_empty() => t,
                Found::Text(_) | Found::Other => return Err(format!("field {type_field:?} is not a non-empty string")),
                Found::Missing => return Err(format!("no {type_field:?} field to take the event type from")),
            }
        }
    };
    Ok(Decoded {
        event_type,
        key: key_string(record)?,
        time: record.timestamp.unwrap_or(0),
        headers: text_headers(record),
        content_type: JSON.into(),
        data: value.to_vec(),
    })
}

/// What a top-level field of a JSON document holds.
enum Found {
    Missing,
    Text(String),
    Other,
}

/// Finds one top-level field of a JSON object, skipping everything else.
struct FindField<'a> {
    name: &'a str,
}

impl<'de> serde::de::Visitor<'de> for FindField<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let mut found = Found::Missing;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.name {
                found = match map.next_value::<Value>()? {
                    Value::String(s) => Found::Text(s),
                    _ => Found::Other,
                };
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Found::Missing)
    }

    fn visit_str<E>(self, _: &str) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Found, E> {
        Ok(Found::Missing)
    }
    fn visit_unit<E>(self) -> Result<Found, E> {
        Ok(Found::Missing)
    }
}

/// RFC 3339 → ms since the Unix epoch.
fn parse_time(text: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("time {text:?} is not RFC 3339: {e}"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

const CE_REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];

fn cloud_event(record: &Record<'_>) -> Result<Decoded, String> {
    let structured = header(record, "content-type")
        .and_then(|v| std::str::from_utf8(v).ok())
        .is_some_and(|ct| ct.trim().to_ascii_lowercase().starts_with("application/cloudevents+json"));
    if structured || header(record, "ce_specversion").is_none() {
        structured_cloud_event(record)
    } else {
        binary_cloud_event(record)
    }
}

/// The whole event is one JSON object; attributes other than `data` become
/// `ce_<name>` headers, as in binary mode.
fn structured_cloud_event(record: &Record<'_>) -> Result<Decoded, String> {
    let value = record.value.ok_or("the record has no value (a tombstone)")?;
    let Value::Object(mut event) = parse_json(value)? else {
        return Err("a structured CloudEvent must be a JSON object".into());
    };
    let mut attrs = BTreeMap::new();
    for (name, v) in &event {
        if name == "data" || name == "data_base64" {
            continue;
        }
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Null => continue,
            other => other.to_string(),
        };
        attrs.insert(name.clone(), text);
    }
    check_required(&attrs)?;
    let content_type = attrs.get("datacontenttype").cloned().unwrap_or_else(|| JSON.into());
    let data = match (event.remove("data"), event.remove("data_base64")) {
        (Some(_), Some(_)) => return Err("a CloudEvent cannot have both data and data_base64".into()),
        (None, Some(Value::String(b64))) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| format!("data_base64 is not base64: {e}"))?,
        (None, Some(_)) => return Err("data_base64 must be a string".into()),
        // JSON data is passed on as JSON; a string under a non-JSON content type is the payload itself.
        (Some(Value::String(s)), None) if !is_json(&content_type) => s.into_bytes(),
        (Some(v), None) => serde_json::to_vec(&v).expect("a JSON value serializes"),
        (None, None) => Vec::new(),
    };
    finish_cloud_event(record, attrs, content_type, data)
}

/// Attributes in `ce_*` headers, the data in the record value.
fn binary_cloud_event(record: &Record<'_>) -> Result<Decoded, String> {
    let mut attrs = BTreeMap::new();
    for (name, v) in record.headers {
        if let Some(attr) = name.strip_prefix("ce_") {
            attrs.insert(attr.to_ascii_lowercase(), utf8(v, &format!("header {name}"))?.to_owned());
        }
    }
    check_required(&attrs)?;
    let content_type = header(record, "content-type")
        .map(|v| utf8(v, "content-type header").map(str::to_owned))
        .transpose()?
        .unwrap_or_else(|| JSON.into());
    let data = record.value.unwrap_or_default().to_vec();
    if is_json(&content_type) && !data.is_empty() {
        parse_json(&data)?;
    }
    finish_cloud_event(record, attrs, content_type, data)
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == JSON || essence.ends_with("+json")
}

fn check_required(attrs: &BTreeMap<String, String>) -> Result<(), String> {
    for name in CE_REQUIRED {
        if attrs.get(name).is_none_or(String::is_empty) {
            return Err(format!("not a CloudEvent: the {name:?} attribute is missing"));
        }
    }
    match attrs["specversion"].as_str() {
        "1.0" => Ok(()),
        other => Err(format!("unsupported CloudEvents specversion {other:?} (1.0 is supported)")),
    }
}

fn finish_cloud_event(
    record: &Record<'_>,
    attrs: BTreeMap<String, String>,
    content_type: String,
    data: Vec<u8>,
) -> Result<Decoded, String> {
    let time = match attrs.get("time") {
        Some(t) => parse_time(t)?,
        None => record.timestamp.unwrap_or(0),
    };
    // The partitioning key: the record key, else the `subject` attribute.
    let key = key_string(record)?.or_else(|| attrs.get("subject").cloned());
    let event_type = attrs["type"].clone();
    let mut headers: Vec<(String, String)> = text_headers(record)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("ce_") && !k.eq_ignore_ascii_case("content-type"))
        .collect();
    headers.extend(attrs.into_iter().filter(|(k, _)| k != "datacontenttype").map(|(k, v)| (format!("ce_{k}"), v)));
    Ok(Decoded { event_type, key, time, headers, content_type, data })
}

/// Debezium's JSON converter wraps key and value in `{"schema", "payload"}`
/// when schemas are enabled; both shapes are accepted.
fn unwrap_schema(value: Value) -> Value {
    match value {
        Value::Object(mut o) if o.len() == 2 && o.contains_key("schema") && o.contains_key("payload") => {
            o.remove("payload").expect("checked")
        }
        other => other,
    }
}

fn debezium(record: &Record<'_>) -> Result<Option<Decoded>, String> {
    // A tombstone follows each delete so that compaction can drop the key;
    // the delete event before it already said everything.
    let Some(value) = record.value else { return Ok(None) };
    let envelope = unwrap_schema(parse_json(value)?);
    let Value::Object(envelope) = envelope else {
        return Err("a Debezium change event must be a JSON object".into());
    };
    let op = envelope.get("op").and_then(Value::as_str).ok_or("not a Debezium change event: no \"op\" field")?;
    let source = envelope.get("source").and_then(Value::as_object);
    let table = source
        .and_then(|s| s.get("table").or_else(|| s.get("collection")))
        .and_then(Value::as_str)
        .ok_or("not a Debezium change event: no source.table")?;
    let kind = match op {
        "c" => "created",
        "u" => "updated",
        "d" => "deleted",
        "r" => "snapshot",
        "t" => "truncated",
        other => return Err(format!("unknown Debezium op {other:?}")),
    };
    let row = if op == "d" { envelope.get("before") } else { envelope.get("after") };
    if matches!(op, "c" | "u" | "r") && !row.is_some_and(Value::is_object) {
        return Err(format!("Debezium op {op:?} without an \"after\" row"));
    }
    let time = envelope
        .get("ts_ms")
        .or_else(|| source.and_then(|s| s.get("ts_ms")))
        .and_then(Value::as_i64)
        .or(record.timestamp)
        .unwrap_or(0);
    let key = match record.key {
        Some(k) => Some(debezium_key(k)?),
        None => None,
    };
    let mut headers = text_headers(record);
    headers.push(("debezium_op".into(), op.into()));
    Ok(Some(Decoded {
        event_type: format!("{table}.{kind}"),
        key,
        time,
        headers,
        content_type: JSON.into(),
        data: serde_json::to_vec(&Value::Object(envelope)).expect("a JSON value serializes"),
    }))
}

/// The record key of a change event is the row's primary key as a JSON
/// object: a single column becomes its plain value (`{"id":1001}` → `1001`),
/// a compound key stays JSON.
fn debezium_key(key: &[u8]) -> Result<String, String> {
    let parsed = serde_json::from_slice::<Value>(key).map_err(|e| format!("the record key is not JSON: {e}"))?;
    Ok(match unwrap_schema(parsed) {
        Value::Object(o) if o.len() == 1 => match o.into_iter().next().expect("one field").1 {
            Value::String(s) => s,
            other => other.to_string(),
        },
        Value::String(s) => s,
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record<'a>(key: Option<&'a [u8]>, value: Option<&'a [u8]>, headers: &'a [(&'a str, &'a [u8])]) -> Record<'a> {
        Record { key, value, headers, timestamp: Some(1_700_000_000_000) }
    }

    fn data(d: &Decoded) -> Value {
        serde_json::from_slice(&d.data).unwrap()
    }

    #[test]
    fn json_takes_the_type_from_a_field_or_a_header() {
        let value = br#"{"type":"OrderPlaced","orderId":"o-1"}"#;
        let d = Decoder::new(Format::Json).decode(&record(Some(b"o-1"), Some(value), &[])).unwrap().unwrap();
        assert_eq!((d.event_type.as_str(), d.key.as_deref(), d.time), ("OrderPlaced", Some("o-1"), 1_700_000_000_000));
        assert_eq!(d.data, value);

        let by_header = Decoder { type_header: Some("event-type".into()), ..Decoder::new(Format::Json) };
        let d = by_header.decode(&record(None, Some(b"{}"), &[("event-type", b"PaymentReceived")])).unwrap().unwrap();
        assert_eq!(d.event_type, "PaymentReceived");
        assert_eq!(d.headers, vec![("event-type".to_owned(), "PaymentReceived".to_owned())]);
        // Typed by a header, the value is still checked whole: garbage and trailing junk are refused.
        for bad in [&b"not json"[..], br#"{"a":1} junk"#, br#"{"a":"\x"}"#, br#"{"a":1"#] {
            let refused = by_header.decode(&record(None, Some(bad), &[("event-type", b"P")])).unwrap_err();
            assert!(refused.contains("not JSON"), "{refused}");
        }
        assert!(by_header.decode(&record(None, Some(b"{}"), &[])).unwrap_err().contains("no \"event-type\" header"));

        let by_field = Decoder { type_field: "kind".into(), ..Decoder::new(Format::Json) };
        assert!(by_field.decode(&record(None, Some(br#"{"type":"X"}"#), &[])).unwrap_err().contains("\"kind\""));
        assert!(
            Decoder::new(Format::Json).decode(&record(None, Some(b"not json"), &[])).unwrap_err().contains("not JSON")
        );
        assert!(Decoder::new(Format::Json).decode(&record(None, None, &[])).unwrap_err().contains("tombstone"));
        let trailing = Decoder::new(Format::Json).decode(&record(None, Some(br#"{"type":"X"} junk"#), &[]));
        assert!(trailing.unwrap_err().contains("not JSON"));
        let numeric = Decoder::new(Format::Json).decode(&record(None, Some(br#"{"a":[1,{"type":2}],"type":7}"#), &[]));
        assert!(numeric.unwrap_err().contains("not a non-empty string"));
        let nested =
            Decoder::new(Format::Json).decode(&record(None, Some(br#"{"a":{"type":"No"},"type":"Yes"}"#), &[]));
        assert_eq!(nested.unwrap().unwrap().event_type, "Yes");
    }

    #[test]
    fn structured_cloud_events_keep_their_attributes_as_headers() {
        let value = json!({
            "specversion": "1.0", "id": "e-1", "source": "/shop", "type": "OrderPlaced",
            "subject": "o-7", "time": "2024-05-01T12:00:00.250Z", "region": "eu",
            "data": {"orderId": "o-7", "total": 12.5}
        })
        .to_string();
        let headers = [("content-type", &b"application/cloudevents+json; charset=utf-8"[..])];
        let d =
            Decoder::new(Format::Cloudevents).decode(&record(None, Some(value.as_bytes()), &headers)).unwrap().unwrap();
        assert_eq!(d.event_type, "OrderPlaced");
        assert_eq!(d.key.as_deref(), Some("o-7"), "subject is the key when the record has none");
        assert_eq!(d.time, 1_714_564_800_250);
        assert_eq!(d.content_type, "application/json");
        assert_eq!(data(&d), json!({"orderId": "o-7", "total": 12.5}));
        assert!(d.headers.contains(&("ce_id".into(), "e-1".into())));
        assert!(d.headers.contains(&("ce_region".into(), "eu".into())));

        let b64 = json!({"specversion":"1.0","id":"2","source":"s","type":"Blob","datacontenttype":"application/octet-stream","data_base64":"AAEC"});
        let d = Decoder::new(Format::Cloudevents)
            .decode(&record(None, Some(b64.to_string().as_bytes()), &[]))
            .unwrap()
            .unwrap();
        assert_eq!((d.content_type.as_str(), d.data.as_slice()), ("application/octet-stream", &[0u8, 1, 2][..]));
    }

    #[test]
    fn binary_cloud_events_read_ce_headers() {
        let headers: [(&str, &[u8]); 6] = [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"e-2"),
            ("ce_source", b"/payments"),
            ("ce_type", b"PaymentReceived"),
            ("content-type", b"application/json"),
            ("traceparent", b"00-abc-def-01"),
        ];
        let value = br#"{"orderId":"o-7","amount":12.5}"#;
        let d =
            Decoder::new(Format::Cloudevents).decode(&record(Some(b"o-7"), Some(value), &headers)).unwrap().unwrap();
        assert_eq!((d.event_type.as_str(), d.key.as_deref()), ("PaymentReceived", Some("o-7")));
        assert_eq!(d.time, 1_700_000_000_000, "no time attribute: the record's timestamp");
        assert_eq!(d.data, value);
        assert_eq!(d.headers[0], ("traceparent".to_owned(), "00-abc-def-01".to_owned()));
        assert!(d.headers.contains(&("ce_source".into(), "/payments".into())));

        let missing: [(&str, &[u8]); 2] = [("ce_specversion", b"1.0"), ("ce_type", b"T")];
        let err = Decoder::new(Format::Cloudevents).decode(&record(None, Some(b"{}"), &missing)).unwrap_err();
        assert!(err.contains("\"id\" attribute is missing"), "{err}");
        let v03 = json!({"specversion":"0.3","id":"1","source":"s","type":"T"}).to_string();
        assert!(
            Decoder::new(Format::Cloudevents)
                .decode(&record(None, Some(v03.as_bytes()), &[]))
                .unwrap_err()
                .contains("0.3")
        );
    }

    fn change(op: &str, before: Value, after: Value) -> String {
        json!({
            "schema": {"type": "struct"},
            "payload": {
                "op": op, "before": before, "after": after, "ts_ms": 1_714_564_800_000i64,
                "source": {"connector": "mysql", "db": "inventory", "table": "orders", "ts_ms": 1_714_564_799_000i64}
            }
        })
        .to_string()
    }

    #[test]
    fn debezium_ops_become_table_events_keyed_by_primary_key() {
        let key = br#"{"schema":{"type":"struct"},"payload":{"id":10001}}"#;
        let row = json!({"id": 10001, "purchaser": 1001, "quantity": 1});
        for (op, kind) in [("c", "created"), ("u", "updated"), ("r", "snapshot")] {
            let value = change(op, Value::Null, row.clone());
            let d = Decoder::new(Format::Debezium)
                .decode(&record(Some(key), Some(value.as_bytes()), &[]))
                .unwrap()
                .unwrap();
            assert_eq!(d.event_type, format!("orders.{kind}"));
            assert_eq!(d.key.as_deref(), Some("10001"));
            assert_eq!(d.time, 1_714_564_800_000);
            assert_eq!(data(&d)["after"], row, "the envelope without its schema");
        }
        let value = change("d", row.clone(), Value::Null);
        let d =
            Decoder::new(Format::Debezium).decode(&record(Some(key), Some(value.as_bytes()), &[])).unwrap().unwrap();
        assert_eq!(d.event_type, "orders.deleted");
        assert_eq!(data(&d)["before"], row);
        assert_eq!(
            Decoder::new(Format::Debezium).decode(&record(Some(key), None, &[])).unwrap(),
            None,
            "tombstones carry no event"
        );

        let compound = br#"{"order_id":1,"line":2}"#;
        let value = change("c", Value::Null, row);
        let d = Decoder::new(Format::Debezium)
            .decode(&record(Some(compound), Some(value.as_bytes()), &[]))
            .unwrap()
            .unwrap();
        assert_eq!(d.key.as_deref(), Some(r#"{"line":2,"order_id":1}"#));
    }

    #[test]
    fn broken_change_events_are_errors() {
        let cases = [
            (br#"{"before":null,"after":{}}"#.to_vec(), "no \"op\""),
            (br#"{"op":"c","after":{},"source":{}}"#.to_vec(), "source.table"),
            (br#"{"op":"x","after":{},"source":{"table":"t"}}"#.to_vec(), "unknown Debezium op"),
            (br#"{"op":"c","after":null,"source":{"table":"t"}}"#.to_vec(), "without an \"after\""),
            (b"[1,2]".to_vec(), "JSON object"),
            (b"{".to_vec(), "not JSON"),
        ];
        for (value, expected) in cases {
            let err = Decoder::new(Format::Debezium).decode(&record(None, Some(&value), &[])).unwrap_err();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }
}
