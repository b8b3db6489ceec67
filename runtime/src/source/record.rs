//! The on-disk encoding of one event in the embedded log.
//!
//! A small length-prefixed binary layout: decoding is a handful of slice
//! reads, which keeps the log scan (the bound on replay speed) cheap.
//!
//! ```text
//! version:u8=1 | time:i64 | type:u16+bytes | key:u8 flag [+u32+bytes]
//! | headers:u16 count (u16+bytes, u32+bytes)* | content-type:u8+bytes | data:rest
//! ```

use super::Event;

const VERSION: u8 = 1;

/// Why a stored record could not be decoded (a corrupt or foreign log file).
#[derive(Debug, thiserror::Error)]
#[error("corrupt event record: {0}")]
pub struct CorruptRecord(&'static str);

/// The fields of an event that the log stores (the rest is its position).
pub struct RecordRef<'a> {
    pub event_type: &'a str,
    pub key: Option<&'a str>,
    pub time: i64,
    pub headers: &'a [(String, String)],
    pub content_type: &'a str,
    pub data: &'a [u8],
}

pub fn encode(r: &RecordRef<'_>, out: &mut Vec<u8>) {
    out.push(VERSION);
    out.extend_from_slice(&r.time.to_le_bytes());
    out.extend_from_slice(&(r.event_type.len() as u16).to_le_bytes());
    out.extend_from_slice(r.event_type.as_bytes());
    match r.key {
        None => out.push(0),
        Some(k) => {
            out.push(1);
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
        }
    }
    out.extend_from_slice(&(r.headers.len() as u16).to_le_bytes());
    for (name, value) in r.headers {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.push(r.content_type.len() as u8);
    out.extend_from_slice(r.content_type.as_bytes());
    out.extend_from_slice(r.data);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CorruptRecord> {
        if self.0.len() < n {
            return Err(CorruptRecord("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, CorruptRecord> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize, CorruptRecord> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize)
    }
    fn u32(&mut self) -> Result<usize, CorruptRecord> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn str(&mut self, len: usize) -> Result<String, CorruptRecord> {
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CorruptRecord("text is not UTF-8"))
    }
}

/// Decode the record stored at `stream`/`partition`/`offset`.
pub fn decode(stream: &str, partition: u32, offset: u64, bytes: &[u8]) -> Result<Event, CorruptRecord> {
    let mut r = Reader(bytes);
    if r.u8()? != VERSION {
        return Err(CorruptRecord("unknown record version"));
    }
    let time = i64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
    let len = r.u16()?;
    let event_type = r.str(len)?;
    let key = match r.u8()? {
        0 => None,
        _ => {
            let len = r.u32()?;
            Some(r.str(len)?)
        }
    };
    let count = r.u16()?;
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u16()?;
        let name = r.str(len)?;
        let len = r.u32()?;
        headers.push((name, r.str(len)?));
    }
    let len = r.u8()? as usize;
    let content_type = r.str(len)?;
    Ok(Event {
        stream: stream.to_owned(),
        partition,
        offset,
        key,
        event_type,
        time,
        headers,
        content_type,
        data: r.0.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let headers = vec![("trace".to_owned(), "abc".to_owned())];
        let record = RecordRef {
            event_type: "OrderPlaced",
            key: Some("o-1"),
            time: -5,
            headers: &headers,
            content_type: "application/json",
            data: br#"{"a":1}"#,
        };
        let mut bytes = Vec::new();
        encode(&record, &mut bytes);
        let event = decode("orders", 3, 9, &bytes).unwrap();
        assert_eq!(
            (event.event_type.as_str(), event.key.as_deref(), event.time, event.partition, event.offset),
            ("OrderPlaced", Some("o-1"), -5, 3, 9)
        );
        assert_eq!((event.headers, event.data), (headers, br#"{"a":1}"#.to_vec()));
        for cut in 0..bytes.len() - 7 {
            assert!(decode("orders", 0, 0, &bytes[..cut]).is_err(), "truncated at {cut}");
        }
    }
}
