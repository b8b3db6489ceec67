//! The packed batch encoding of the `packed-projection` and `packed-enricher`
//! worlds: a batch of events, or an enricher's outputs, as one byte buffer.
//!
//! Passed as typed WIT records, every string and list of every event is a
//! separate allocation the host asks the plugin for, and a separate copy:
//! about ten crossings of the sandbox boundary per event, which cost more
//! than a simple plugin's own work. As one `list<u8>`, a batch crosses once.
//! The format itself is `refract-abi`'s, shared with the host; this module
//! maps it to the SDK's types.
//!
//! Little-endian throughout; `str` and `bytes` are a `u32` length and the
//! bytes; `opt` is a `u8` (0 or 1) and the value when 1; a list is a `u32`
//! count and its items.
//!
//! - events: list of `str stream, u32 partition, u64 offset, opt str key,
//!   str event-type, i64 time, list of (str, str) headers, str content-type,
//!   bytes data`;
//! - outputs: list of `str event-type, opt str key, i64 time, list of
//!   (str, str) headers, bytes data`;
//! - pending key/value writes (`kv-packed`): a sequence, up to the end of
//!   the buffer, of `u8 op, str table, str key` and, when `op` is 1 (put),
//!   `bytes value`; `op` 0 is a delete.

pub use refract_abi::{Reader, Writer, read_kv, read_outputs, write_event, write_kv};

use crate::Event;
use crate::wit::refract::plugin::emit::Outgoing;

/// Decode a batch of events (the plugin's side).
pub fn decode_events(bytes: &[u8]) -> Result<Vec<Event>, String> {
    refract_abi::read_events(bytes, |e| Event {
        stream: e.stream.to_owned(),
        partition: e.partition,
        offset: e.offset,
        key: e.key.map(str::to_owned),
        event_type: e.event_type.to_owned(),
        time: e.time,
        headers: e.headers,
        content_type: e.content_type.to_owned(),
        data: e.data.to_vec(),
    })
}

/// Encode an enricher's outputs (the plugin's side).
pub fn encode_outputs(outputs: &[Outgoing]) -> Vec<u8> {
    let size: usize = outputs
        .iter()
        .map(|o| {
            refract_abi::MIN_OUTPUT + o.event_type.len() + o.key.as_ref().map_or(0, |k| 4 + k.len()) + o.data.len()
        })
        .sum();
    let mut buffer = Vec::with_capacity(4 + size);
    let mut w = Writer(&mut buffer);
    w.len(outputs.len());
    for o in outputs {
        refract_abi::write_output(&mut w, &o.event_type, o.key.as_deref(), o.time, &o.headers, &o.data);
    }
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: Option<&str>, headers: Vec<(String, String)>, data: &[u8]) -> Event {
        Event {
            stream: "orders".into(),
            partition: 3,
            offset: u64::MAX - 1,
            key: key.map(str::to_owned),
            event_type: "OrderPlaced".into(),
            time: -5,
            headers,
            content_type: "application/json".into(),
            data: data.to_vec(),
        }
    }

    fn encode(events: &[Event]) -> Vec<u8> {
        let mut buffer = Vec::new();
        let mut w = Writer(&mut buffer);
        w.len(events.len());
        for e in events {
            write_event(
                &mut w,
                &e.stream,
                e.partition,
                e.offset,
                e.key.as_deref(),
                &e.event_type,
                e.time,
                &e.headers,
                &e.content_type,
                &e.data,
            );
        }
        buffer
    }

    #[test]
    fn events_and_outputs_come_back_as_they_went() {
        let events =
            vec![event(Some("o-1"), vec![("trace".into(), "ü".into())], br#"{"a":1}"#), event(None, Vec::new(), b"")];
        let decoded = decode_events(&encode(&events)).unwrap();
        assert_eq!(format!("{decoded:?}"), format!("{events:?}"));

        let outputs = vec![
            Outgoing {
                event_type: "OrderPaid".into(),
                key: Some("o-1".into()),
                time: 7,
                headers: vec![("h".into(), "v".into())],
                data: b"{}".to_vec(),
            },
            Outgoing { event_type: "X".into(), key: None, time: i64::MIN, headers: Vec::new(), data: Vec::new() },
        ];
        let mut back = Vec::new();
        read_outputs(&encode_outputs(&outputs), |t, k, time, headers, data| {
            back.push(Outgoing { event_type: t.into(), key: k.map(Into::into), time, headers, data: data.to_vec() })
        })
        .unwrap();
        assert_eq!(format!("{back:?}"), format!("{outputs:?}"));
    }

    #[test]
    fn a_write_log_is_applied_in_order_and_stops_at_the_first_refusal() {
        let mut log = Vec::new();
        write_kv(&mut log, "orders", "o-1", Some(br#"{"n":1}"#));
        let first = log.len();
        write_kv(&mut log, "deadlines", "1/o-1", None);
        let second = log.len();
        write_kv(&mut log, "orders", "", Some(b""));
        let mut seen = Vec::new();
        let applied = read_kv(&log, |t, k, v| {
            seen.push((t.to_owned(), k.to_owned(), v.map(<[u8]>::to_vec)));
            if k.is_empty() { Err("empty key") } else { Ok(()) }
        });
        assert_eq!(applied, Ok(Err((2, "empty key"))));
        assert_eq!(
            seen,
            [
                ("orders".to_owned(), "o-1".to_owned(), Some(br#"{"n":1}"#.to_vec())),
                ("deadlines".to_owned(), "1/o-1".to_owned(), None),
                ("orders".to_owned(), String::new(), Some(Vec::new())),
            ]
        );
        assert_eq!(read_kv::<()>(&[], |_, _, _| unreachable!()), Ok(Ok(())));
        for cut in 1..log.len() {
            let applied = read_kv::<()>(&log[..cut], |_, _, _| Ok(()));
            assert!(applied.is_err() || cut == first || cut == second, "cut at {cut}: {applied:?}");
        }
        assert!(read_kv::<()>(&[7, 0, 0, 0, 0, 0, 0, 0, 0], |_, _, _| Ok(())).unwrap_err().contains("op 7"));
    }

    #[test]
    fn truncated_padded_or_invalid_input_is_an_error_not_a_panic() {
        let bytes = encode(&[event(Some("o-1"), vec![("a".into(), "b".into())], b"{}")]);
        for cut in 0..bytes.len() {
            assert!(decode_events(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(decode_events(&padded).unwrap_err().contains("left over"));
        // A count far beyond the input fails before allocating for it.
        assert!(decode_events(&u32::MAX.to_le_bytes()).unwrap_err().contains("cannot fit"));
        let mut bad_tag = encode(&[event(None, Vec::new(), b"")]);
        bad_tag[4 + 4 + 6 + 4 + 8] = 2; // the key's option tag
        assert!(decode_events(&bad_tag).unwrap_err().contains("option tag 2"));
        let mut not_utf8 = encode_outputs(&[Outgoing {
            event_type: "ab".into(),
            key: None,
            time: 0,
            headers: Vec::new(),
            data: Vec::new(),
        }]);
        not_utf8[8..10].copy_from_slice(&[0xff, 0xfe]);
        assert!(read_outputs(&not_utf8, |_, _, _, _, _| ()).unwrap_err().contains("UTF-8"));
    }
}
