//! The packed batch encoding of the `packed-projection` and `packed-enricher`
//! worlds: a batch of events, or an enricher's outputs, as one byte buffer.
//!
//! Passed as typed WIT records, every string and list of every event is a
//! separate allocation the host asks the plugin for, and a separate copy:
//! about ten crossings of the sandbox boundary per event, which cost more
//! than a simple plugin's own work. As one `list<u8>`, a batch crosses once.
//! The host (`refract::plugin`) and the Rust SDK (`refract_sdk::packed`)
//! both use this crate, so the format is defined in one place, and the host
//! needs nothing of the guest SDK to speak it. The same layout is specified
//! for other languages in `wit/README.md`.
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

/// Appends the encoding's primitives to a buffer.
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A length: lists and buffers the host accepts are far below 4 GiB.
    pub fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("a packed length fits in 32 bits"));
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.len(v.len());
        self.0.extend_from_slice(v);
    }
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    pub fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    pub fn headers(&mut self, headers: &[(String, String)]) {
        self.len(headers.len());
        for (name, value) in headers {
            self.str(name);
            self.str(value);
        }
    }
}

/// Reads the encoding's primitives, failing on truncated or invalid input.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!("packed batch truncated: {n} bytes wanted, {} left", self.rest.len()));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A count of items at least `min_item` bytes each: a count the rest of
    /// the input cannot hold fails here, before anything is allocated for it.
    pub fn count(&mut self, min_item: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.rest.len() {
            return Err(format!("packed batch truncated: {n} items cannot fit in {} bytes", self.rest.len()));
        }
        Ok(n)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|e| format!("packed batch: a string is not UTF-8: {e}"))
    }
    pub fn opt_str(&mut self) -> Result<Option<&'a str>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str().map(Some),
            tag => Err(format!("packed batch: option tag {tag}")),
        }
    }
    pub fn headers(&mut self) -> Result<Vec<(String, String)>, String> {
        let n = self.count(8)?;
        (0..n).map(|_| Ok((self.str()?.to_owned(), self.str()?.to_owned()))).collect()
    }
    /// Fails unless everything has been read.
    pub fn finish(self) -> Result<(), String> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(format!("packed batch: {n} bytes left over")),
        }
    }
}

/// The smallest encoded event and output (every string empty, no key).
pub const MIN_EVENT: usize = 4 + 4 + 8 + 1 + 4 + 8 + 4 + 4 + 4;
pub const MIN_OUTPUT: usize = 4 + 1 + 8 + 4 + 4;

/// One event of a packed batch, as [`read_events`] hands it over: the
/// strings borrowed from the buffer, the headers and data copied out.
pub struct EventFields<'a> {
    pub stream: &'a str,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<&'a str>,
    pub event_type: &'a str,
    pub time: i64,
    pub headers: Vec<(String, String)>,
    pub content_type: &'a str,
    pub data: &'a [u8],
}

/// Decode a batch of events (the plugin's side), calling `event` with each.
pub fn read_events<T>(bytes: &[u8], mut event: impl FnMut(EventFields<'_>) -> T) -> Result<Vec<T>, String> {
    let mut r = Reader::new(bytes);
    let n = r.count(MIN_EVENT)?;
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(event(EventFields {
            stream: r.str()?,
            partition: r.u32()?,
            offset: r.u64()?,
            key: r.opt_str()?,
            event_type: r.str()?,
            time: r.i64()?,
            headers: r.headers()?,
            content_type: r.str()?,
            data: r.bytes()?,
        }));
    }
    r.finish()?;
    Ok(events)
}

/// Encode one output of an enricher (the plugin's side), after
/// `w.len(count)` of all of them.
pub fn write_output(
    w: &mut Writer<'_>,
    event_type: &str,
    key: Option<&str>,
    time: i64,
    headers: &[(String, String)],
    data: &[u8],
) {
    w.str(event_type);
    w.opt_str(key);
    w.i64(time);
    w.headers(headers);
    w.bytes(data);
}

/// Encode a batch of events (the host's side), given as its fields so the
/// host can use its own event type: appended to `buffer`.
#[allow(clippy::too_many_arguments, reason = "the event's fields, in the encoding's order")]
pub fn write_event(
    w: &mut Writer<'_>,
    stream: &str,
    partition: u32,
    offset: u64,
    key: Option<&str>,
    event_type: &str,
    time: i64,
    headers: &[(String, String)],
    content_type: &str,
    data: &[u8],
) {
    w.str(stream);
    w.u32(partition);
    w.u64(offset);
    w.opt_str(key);
    w.str(event_type);
    w.i64(time);
    w.headers(headers);
    w.str(content_type);
    w.bytes(data);
}

/// Decode an enricher's outputs (the host's side), calling `output` with
/// each one's fields: event type, key, time, headers and data.
pub fn read_outputs(
    bytes: &[u8],
    mut output: impl FnMut(&str, Option<&str>, i64, Vec<(String, String)>, &[u8]),
) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    let n = r.count(MIN_OUTPUT)?;
    for _ in 0..n {
        let event_type = r.str()?;
        let key = r.opt_str()?;
        let time = r.i64()?;
        let headers = r.headers()?;
        output(event_type, key, time, headers, r.bytes()?);
    }
    r.finish()
}

/// Append a put (`Some(value)`) or a delete (`None`) to a write log (the plugin's side).
pub fn write_kv(log: &mut Vec<u8>, table: &str, key: &str, value: Option<&[u8]>) {
    let mut w = Writer(log);
    w.u8(u8::from(value.is_some()));
    w.str(table);
    w.str(key);
    if let Some(value) = value {
        w.bytes(value);
    }
}

/// Apply a write log (the host's side): `write` gets each write's table,
/// key and value (`None`: delete) in order, and its first error stops the
/// log with the write's position. A log that does not decode is `Err(Err)`.
pub fn read_kv<E>(
    log: &[u8],
    mut write: impl FnMut(&str, &str, Option<&[u8]>) -> Result<(), E>,
) -> Result<Result<(), (u32, E)>, String> {
    let mut r = Reader::new(log);
    let mut index = 0u32;
    while !r.rest.is_empty() {
        let op = r.u8()?;
        let (table, key) = (r.str()?, r.str()?);
        let value = match op {
            0 => None,
            1 => Some(r.bytes()?),
            op => return Err(format!("pending writes: op {op}")),
        };
        if let Err(e) = write(table, key, value) {
            return Ok(Err((index, e)));
        }
        index += 1;
    }
    Ok(Ok(()))
}
