//! The embedded event log: named streams of partitions of events, in one redb file.
//!
//! Each partition is a table `events/<stream>/<partition>` mapping offsets
//! (dense, from 0) to encoded records; a `streams` table records each stream's
//! partition count. Appends are durable when [`EventLog::append`] returns.
//! Events are kept forever: replaying them is how read models are rebuilt.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use redb::{ReadableTable, TableDefinition};

use crate::db_file::DbFile;

use super::record::{self, CorruptRecord, RecordRef};
use super::{Event, NewEvent, Position, partition};
use crate::names;
pub use crate::signal::Signal;

const STREAMS: TableDefinition<&str, u32> = TableDefinition::new("streams");
/// (producer, stream) → the last sequence number that producer appended to
/// the stream: lets a relay append exactly once across crashes.
const PRODUCERS: TableDefinition<(&str, &str), u64> = TableDefinition::new("producers");

fn partition_table(stream: &str, partition: u32) -> String {
    format!("events/{stream}/{partition}")
}

/// Errors of the embedded log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An event or stream name was refused; nothing was appended.
    #[error("{0}")]
    Invalid(String),
    /// The stream has never been written to.
    #[error("stream {0:?} does not exist")]
    UnknownStream(String),
    /// The partition is outside the stream's partition count.
    #[error("stream {stream:?} has {partitions} partitions; there is no partition {partition}")]
    UnknownPartition { stream: String, partition: u32, partitions: u32 },
    /// A stored record could not be decoded.
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
    /// The storage failed (disk full, I/O error); nothing was appended.
    #[error("event log storage: {0}")]
    Storage(#[from] redb::Error),
}

impl From<redb::DatabaseError> for Error {
    fn from(e: redb::DatabaseError) -> Self {
        Error::Storage(e.into())
    }
}
impl From<redb::TransactionError> for Error {
    fn from(e: redb::TransactionError) -> Self {
        Error::Storage(e.into())
    }
}
impl From<redb::TableError> for Error {
    fn from(e: redb::TableError) -> Self {
        Error::Storage(e.into())
    }
}
impl From<redb::StorageError> for Error {
    fn from(e: redb::StorageError) -> Self {
        Error::Storage(e.into())
    }
}
impl From<redb::CommitError> for Error {
    fn from(e: redb::CommitError) -> Self {
        Error::Storage(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Limits on what one appended event may hold.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Partitions of a stream created by its first append, unless `partitions` names it.
    pub default_partitions: u32,
    /// Partition counts for named streams.
    pub partitions: HashMap<String, u32>,
    /// The largest `data` accepted, in bytes.
    pub max_event_bytes: usize,
    /// The most memory redb may use to cache the log's pages.
    pub cache_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            default_partitions: 4,
            partitions: HashMap::new(),
            max_event_bytes: 1 << 20,
            cache_bytes: crate::db_file::DEFAULT_CACHE_BYTES,
        }
    }
}

/// A stream's shape and how far it has been written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamInfo {
    pub name: String,
    pub partitions: u32,
    /// The next offset of each partition (= its number of events).
    pub heads: Vec<u64>,
}

struct Heads {
    /// Next offset per partition, per stream.
    streams: HashMap<String, Vec<u64>>,
    /// Round-robin counter for events without a key.
    unkeyed: u32,
}

/// The embedded, durable event log.
pub struct EventLog {
    db: DbFile,
    options: LogOptions,
    heads: Mutex<Heads>,
    signal: Signal,
}

impl EventLog {
    /// Open (or create) the log in the file `path`.
    pub fn open(path: &Path, options: LogOptions) -> Result<Self> {
        let db = DbFile::create(path, options.cache_bytes)?;
        let mut streams = HashMap::new();
        let tx = db.begin_write()?;
        {
            let table = tx.open_table(STREAMS)?;
            for entry in table.iter()? {
                let (name, partitions) = entry?;
                let name = name.value().to_owned();
                let mut heads = Vec::new();
                for p in 0..partitions.value() {
                    let table_name = partition_table(&name, p);
                    let def = TableDefinition::<u64, &[u8]>::new(&table_name);
                    let head = match tx.open_table(def) {
                        Ok(t) => t.last()?.map_or(0, |(k, _)| k.value() + 1),
                        Err(e) => return Err(e.into()),
                    };
                    heads.push(head);
                }
                if let Some(&wanted) = options.partitions.get(&name)
                    && wanted != partitions.value()
                {
                    tracing::warn!(
                        stream = %name,
                        stored = partitions.value(),
                        configured = wanted,
                        "a stream keeps the partition count it was created with; ignoring the configured count"
                    );
                }
                streams.insert(name, heads);
            }
        }
        tx.commit()?;
        Ok(EventLog { db, options, heads: Mutex::new(Heads { streams, unkeyed: 0 }), signal: Signal::default() })
    }

    /// Wakes readers after each append.
    pub fn signal(&self) -> &Signal {
        &self.signal
    }

    fn validate(&self, stream: &str, events: &[NewEvent]) -> Result<()> {
        names::validate("stream", stream).map_err(Error::Invalid)?;
        if events.is_empty() {
            return Err(Error::Invalid("no events to append".into()));
        }
        for (i, e) in events.iter().enumerate() {
            let headers = e.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            crate::event::check_event(
                &e.event_type,
                e.key.as_deref(),
                headers,
                e.data.get().len(),
                self.options.max_event_bytes,
            )
            .map_err(|why| Error::Invalid(format!("event {i}: {why}")))?;
        }
        Ok(())
    }

    /// The largest `data` an append accepts, in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.options.max_event_bytes
    }

    /// Append `events` to `stream` in one durable transaction: either all are
    /// stored, or (on error) none. Creates the stream on first use.
    pub fn append(&self, stream: &str, events: &[NewEvent]) -> Result<Vec<Position>> {
        self.append_inner(stream, events, None)
    }

    /// Like [`EventLog::append`], recording in the same transaction that
    /// `producer` has appended everything up to its `sequence` number.
    pub fn append_as(&self, producer: &str, sequence: u64, stream: &str, events: &[NewEvent]) -> Result<Vec<Position>> {
        self.append_inner(stream, events, Some((producer, sequence)))
    }

    /// The last sequence number `producer` appended to `stream` (0: none).
    pub fn producer_sequence(&self, producer: &str, stream: &str) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(PRODUCERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get((producer, stream))?.map_or(0, |v| v.value()))
    }

    fn append_inner(&self, stream: &str, events: &[NewEvent], producer: Option<(&str, u64)>) -> Result<Vec<Position>> {
        self.validate(stream, events)?;
        let now = crate::clock::now_ms();
        let mut heads = self.heads.lock().expect("log heads lock");
        let Heads { streams, unkeyed } = &mut *heads;
        let created = !streams.contains_key(stream);
        let partitions = match streams.get(stream) {
            Some(h) => h.len() as u32,
            None => *self.options.partitions.get(stream).unwrap_or(&self.options.default_partitions),
        };
        let mut next = streams.get(stream).cloned().unwrap_or_else(|| vec![0; partitions as usize]);
        let mut positions = Vec::with_capacity(events.len());
        let mut by_partition: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); partitions as usize];
        for e in events {
            let p = match &e.key {
                Some(k) => partition::for_key(k, partitions),
                None => {
                    *unkeyed = unkeyed.wrapping_add(1);
                    *unkeyed % partitions
                }
            };
            let offset = next[p as usize];
            next[p as usize] += 1;
            let headers: Vec<(String, String)> = e.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let mut bytes = Vec::with_capacity(64 + e.data.get().len());
            record::encode(
                &RecordRef {
                    event_type: &e.event_type,
                    key: e.key.as_deref(),
                    time: e.time.unwrap_or(now),
                    headers: &headers,
                    content_type: "application/json",
                    data: e.data.get().as_bytes(),
                },
                &mut bytes,
            );
            by_partition[p as usize].push((offset, bytes));
            positions.push(Position { partition: p, offset });
        }
        let tx = self.db.begin_write()?;
        if created {
            tx.open_table(STREAMS)?.insert(stream, partitions)?;
        }
        if let Some((name, sequence)) = producer {
            tx.open_table(PRODUCERS)?.insert((name, stream), sequence)?;
        }
        for (p, records) in by_partition.iter().enumerate() {
            if records.is_empty() && !created {
                continue;
            }
            let table_name = partition_table(stream, p as u32);
            let def = TableDefinition::<u64, &[u8]>::new(&table_name);
            let mut table = tx.open_table(def)?;
            for (offset, bytes) in records {
                table.insert(offset, bytes.as_slice())?;
            }
        }
        tx.commit()?;
        streams.insert(stream.to_owned(), next);
        drop(heads);
        self.signal.notify();
        Ok(positions)
    }

    /// Up to `limit` events of `stream`/`partition` from offset `from` on.
    /// Up to `limit` events of `stream`'s `partition` from offset `from`, and
    /// no more data than `max_bytes` (but always the first event there is).
    pub fn read(&self, stream: &str, partition: u32, from: u64, limit: usize, max_bytes: usize) -> Result<Vec<Event>> {
        let partitions = self.partitions(stream).ok_or_else(|| Error::UnknownStream(stream.to_owned()))?;
        if partition >= partitions {
            return Err(Error::UnknownPartition { stream: stream.to_owned(), partition, partitions });
        }
        let tx = self.db.begin_read()?;
        let table_name = partition_table(stream, partition);
        let def = TableDefinition::<u64, &[u8]>::new(&table_name);
        let table = tx.open_table(def)?;
        let mut events = Vec::with_capacity(limit.min(4096));
        let mut held = 0usize;
        for entry in table.range(from..)?.take(limit) {
            let (offset, bytes) = entry?;
            held += bytes.value().len();
            if held > max_bytes && !events.is_empty() {
                break;
            }
            events.push(record::decode(stream, partition, offset.value(), bytes.value())?);
        }
        Ok(events)
    }

    /// The partition count of `stream`, if it exists.
    pub fn partitions(&self, stream: &str) -> Option<u32> {
        self.heads.lock().expect("log heads lock").streams.get(stream).map(|h| h.len() as u32)
    }

    /// The next offset of each partition of `stream`, if it exists.
    pub fn heads(&self, stream: &str) -> Option<Vec<u64>> {
        self.heads.lock().expect("log heads lock").streams.get(stream).cloned()
    }

    /// Every stream, by name.
    pub fn streams(&self) -> Vec<StreamInfo> {
        let heads = self.heads.lock().expect("log heads lock");
        let mut out: Vec<StreamInfo> = heads
            .streams
            .iter()
            .map(|(name, h)| StreamInfo { name: name.clone(), partitions: h.len() as u32, heads: h.clone() })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: &str, key: Option<&str>, data: &str) -> NewEvent {
        serde_json::from_value(serde_json::json!({
            "type": ty, "key": key, "data": serde_json::from_str::<serde_json::Value>(data).unwrap()
        }))
        .unwrap()
    }

    #[test]
    fn appends_are_partitioned_by_key_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let positions = {
            let log = EventLog::open(&path, LogOptions::default()).unwrap();
            let events: Vec<_> = (0..20).map(|i| event("T", Some(&format!("k{}", i % 5)), &format!("{i}"))).collect();
            log.append("s", &events).unwrap()
        };
        let log = EventLog::open(&path, LogOptions::default()).unwrap();
        assert_eq!(log.partitions("s"), Some(4));
        let heads = log.heads("s").unwrap();
        assert_eq!(heads.iter().sum::<u64>(), 20);
        for (i, pos) in positions.iter().enumerate() {
            assert_eq!(pos.partition, partition::for_key(&format!("k{}", i % 5), 4));
            let got = log.read("s", pos.partition, pos.offset, 1, usize::MAX).unwrap();
            assert_eq!(got[0].data, format!("{i}").into_bytes());
        }
        // Offsets continue after a reopen.
        let more = log.append("s", &[event("T", Some("k0"), "99")]).unwrap();
        assert_eq!(more[0].offset, heads[more[0].partition as usize]);
    }

    #[test]
    fn invalid_batches_append_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("log.redb"), LogOptions::default()).unwrap();
        let bad = vec![event("T", None, "1"), event("", None, "2")];
        let err = log.append("s", &bad).unwrap_err();
        assert!(err.to_string().contains("event 1: `type`"), "{err}");
        assert!(log.heads("s").is_none());
        assert!(matches!(log.append("../etc", &[event("T", None, "1")]), Err(Error::Invalid(_))));
        assert!(matches!(log.read("nope", 0, 0, 10, usize::MAX), Err(Error::UnknownStream(_))));
    }

    /// A read is bounded by bytes as well as by count, and always takes the
    /// first event (however large), so that reading never stalls.
    #[test]
    fn reads_stop_at_their_byte_bound_but_always_take_one_event() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("log.redb"), LogOptions::default()).unwrap();
        let big = format!("\"{}\"", "x".repeat(100_000));
        let events: Vec<_> = (0..10).map(|_| event("T", Some("k"), &big)).collect();
        let partition = log.append("s", &events).unwrap()[0].partition;
        assert_eq!(log.read("s", partition, 0, 10, usize::MAX).unwrap().len(), 10);
        assert_eq!(log.read("s", partition, 0, 10, 250_000).unwrap().len(), 2);
        assert_eq!(log.read("s", partition, 3, 10, 10).unwrap().len(), 1);
    }
}
