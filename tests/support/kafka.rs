//! A real Kafka-protocol broker for the tests: tansu, with its SQLite storage
//! engine in a temporary directory, so data survives a broker restart.
//!
//! The tests fail (they never skip) when the broker binary is missing: see
//! [`tansu`] for where it is looked for.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use super::free_port;

/// The tansu binary: `$REFRACT_TANSU`, `~/.cache/refract/bin/tansu` (where
/// `.ci/run` puts it), the prebuilt one beside the workspace, or `tansu` on the PATH.
pub(crate) fn tansu() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("REFRACT_TANSU") {
        candidates.push(p.into());
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/refract/bin/tansu"));
    }
    candidates.push(super::workspace_root().join("../shared/bin/tansu"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "the Kafka broker for the tests (tansu) is missing: run .ci/run, or \
             `cargo install tansu --version 0.6.0 --features dynostore,libsql`, or set REFRACT_TANSU"
        )
    })
}

/// A running broker.
pub(crate) struct Broker {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// `--storage-engine`: SQLite in the broker's directory, or memory.
    storage: &'static str,
}

impl Broker {
    /// A broker keeping its data in SQLite: it survives [`Broker::restart`].
    pub(crate) fn start() -> Broker {
        Broker::start_with("sqlite://tansu.db")
    }

    /// A broker keeping its data in memory, lost on a restart: under three
    /// instances reading 100,000 records, tansu's SQLite engine answered
    /// offset lookups and fetches only after 10 s timeouts, so the tests
    /// producing that much use this.
    ///
    /// tansu 0.6.0's memory engine answers a fetch from an offset inside a
    /// stored batch with the batches *after* it, skipping the rest of that
    /// one (`dynostore.rs` splits its batch index at the fetch offset;
    /// fixed upstream later): a consumer resuming from a checkpoint in the
    /// middle of a batch silently misses records. Its [`Broker::producer`]
    /// therefore sends one record per batch, so every offset starts one.
    pub(crate) fn start_in_memory() -> Broker {
        Broker::start_with("memory://tansu/")
    }

    fn start_with(storage: &'static str) -> Broker {
        let mut broker = Broker { dir: tempfile::tempdir().unwrap(), port: free_port(), child: None, storage };
        broker.restart();
        broker
    }

    /// `host:port`, for `kafka.brokers`.
    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Start the broker (again) on the same port and storage.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("tansu.log")).unwrap();
        let child = Command::new(tansu())
            .current_dir(self.dir.path())
            .args(["broker", "--listener-url", &self.url(), "--advertised-listener-url", &self.url()])
            // A SQLite path is relative to the working directory.
            .args(["--storage-engine", self.storage])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting tansu");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "tansu did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A consumer of `topic`'s first `partitions` partitions from their
    /// beginning (assigned, in no group), to read what reached the topic.
    pub(crate) fn reader(&self, topic: &str, partitions: i32) -> rdkafka::consumer::BaseConsumer {
        use rdkafka::consumer::Consumer;
        let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.address())
            .set("group.id", "test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        consumer
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    pub(crate) fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(tansu())
            .args(["topic", "create", name, "--partitions", &partitions.to_string(), "--broker", &self.url()])
            .stdin(Stdio::null())
            .output()
            .expect("running tansu topic create");
        assert!(out.status.success(), "creating topic {name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A producer (librdkafka, like any Kafka client) for this broker.
    pub(crate) fn producer(&self) -> TestProducer {
        TestProducer::with(&self.address(), self.storage.starts_with("memory"))
    }
}

impl TestProducer {
    /// A producer for the cluster at `bootstrap` (`host:port,…`).
    pub(crate) fn new(bootstrap: &str) -> TestProducer {
        TestProducer::with(bootstrap, false)
    }

    /// `one_per_batch`: a batch per record (see [`Broker::start_in_memory`]).
    fn with(bootstrap: &str, one_per_batch: bool) -> TestProducer {
        let failures = Arc::new(AtomicUsize::new(0));
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "5")
            // Kafka's Java client partitioning, like the embedded log's.
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", "60000");
        if one_per_batch {
            config.set("batch.num.messages", "1");
        }
        let producer = config.create_with_context(Failures(failures.clone())).expect("creating a producer");
        TestProducer { producer, failures }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Failures(Arc<AtomicUsize>);

impl ClientContext for Failures {}

impl ProducerContext for Failures {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            eprintln!("delivery failed: {e}");
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A record to produce.
#[derive(Debug, Clone, Default)]
pub(crate) struct Out {
    pub key: Option<String>,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    /// `None`: by the key's hash.
    pub partition: Option<i32>,
    /// The record timestamp (ms); `None`: the producer's clock.
    pub timestamp: Option<i64>,
}

impl Out {
    /// A fixture event (`{"type", "key", "time", "data"}`) as a plain JSON
    /// record: the data as the value, the type in an `event-type` header, the
    /// key as the record key, the event time as the timestamp.
    pub(crate) fn plain(e: &serde_json::Value) -> Out {
        Out {
            key: e["key"].as_str().map(str::to_owned),
            value: Some(e["data"].to_string().into_bytes()),
            headers: vec![("event-type".into(), e["type"].as_str().unwrap().into())],
            timestamp: e["time"].as_i64(),
            ..Out::default()
        }
    }
}

pub(crate) struct TestProducer {
    producer: BaseProducer<Failures>,
    failures: Arc<AtomicUsize>,
}

impl TestProducer {
    /// Produce `records` to `topic` in order and wait until every one is acknowledged.
    pub(crate) fn send_all(&self, topic: &str, records: &[Out]) {
        self.send(topic, records);
        self.producer.flush(Duration::from_secs(60)).expect("flushing the producer");
        assert_eq!(self.failures.load(Ordering::Relaxed), 0, "some records were not delivered");
    }

    fn send(&self, topic: &str, records: &[Out]) {
        for r in records {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(Header { key: k, value: Some(v.as_bytes()) });
            }
            let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).headers(headers);
            if let Some(k) = &r.key {
                record = record.key(k.as_str());
            }
            if let Some(v) = &r.value {
                record = record.payload(v.as_slice());
            }
            if let Some(p) = r.partition {
                record = record.partition(p);
            }
            if let Some(t) = r.timestamp {
                record = record.timestamp(t);
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        // The local queue is full: let deliveries drain.
                        record = back;
                        self.producer.poll(Duration::from_millis(10));
                    }
                }
            }
            self.producer.poll(Duration::ZERO);
        }
    }
}

/// Append a transaction's commit marker to `partition` of `topic`, as a
/// Kafka broker does when a transactional producer commits: a control
/// batch of one record that takes an offset but that no consumer is
/// handed. Sent as a raw Produce request (v3), since neither tansu 0.6.0
/// nor librdkafka's mock cluster writes markers itself; the mock cluster
/// stores the batch as sent.
pub(crate) fn append_commit_marker(bootstrap: &str, topic: &str, partition: i32) {
    use std::io::{Read, Write};
    // The control record: key = (version 0, type 1 = commit), value = (version 0, coordinator epoch 0).
    let (key, value) = ([0u8, 0, 0, 1], [0u8, 0, 0, 0, 0, 0]);
    let mut record = vec![0u8]; // attributes
    record.extend([0, 0]); // timestamp and offset deltas: varint 0
    record.push(zigzag(key.len() as i64));
    record.extend(key);
    record.push(zigzag(value.len() as i64));
    record.extend(value);
    record.push(0); // no headers
    let mut records = vec![zigzag(record.len() as i64)];
    records.extend(record);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // From the attributes on: what the CRC covers.
    let mut tail = Vec::new();
    tail.extend(0x30i16.to_be_bytes()); // transactional | control
    tail.extend(0i32.to_be_bytes()); // last offset delta
    tail.extend(now.to_be_bytes()); // first timestamp
    tail.extend(now.to_be_bytes()); // max timestamp
    tail.extend(1000i64.to_be_bytes()); // producer id
    tail.extend(0i16.to_be_bytes()); // producer epoch
    tail.extend((-1i32).to_be_bytes()); // base sequence
    tail.extend(1i32.to_be_bytes()); // one record
    tail.extend(records);
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset: the broker assigns it
    batch.extend(((4 + 1 + 4 + tail.len()) as i32).to_be_bytes()); // batch length
    batch.extend(0i32.to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend(crc32c(&tail).to_be_bytes());
    batch.extend(tail);

    let mut request = Vec::new();
    request.extend(0i16.to_be_bytes()); // Produce
    request.extend(3i16.to_be_bytes()); // v3
    request.extend(1i32.to_be_bytes()); // correlation id
    put_string(&mut request, "refract-test");
    request.extend((-1i16).to_be_bytes()); // no transactional id
    request.extend(1i16.to_be_bytes()); // acks
    request.extend(30_000i32.to_be_bytes());
    request.extend(1i32.to_be_bytes());
    put_string(&mut request, topic);
    request.extend(1i32.to_be_bytes());
    request.extend(partition.to_be_bytes());
    request.extend((batch.len() as i32).to_be_bytes());
    request.extend(batch);

    let mut socket = std::net::TcpStream::connect(bootstrap.split(',').next().unwrap()).unwrap();
    socket.write_all(&(request.len() as i32).to_be_bytes()).unwrap();
    socket.write_all(&request).unwrap();
    let mut len = [0u8; 4];
    socket.read_exact(&mut len).unwrap();
    let mut response = vec![0u8; i32::from_be_bytes(len) as usize];
    socket.read_exact(&mut response).unwrap();
    // correlation id, 1 topic, its name, 1 partition, its index, then the error code.
    let at = 4 + 4 + 2 + topic.len() + 4 + 4;
    let error = i16::from_be_bytes([response[at], response[at + 1]]);
    assert_eq!(error, 0, "appending a commit marker to {topic}/{partition}");
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as i16).to_be_bytes());
    out.extend(s.as_bytes());
}

/// A small value as a one-byte zigzag varint (Kafka's record fields).
fn zigzag(n: i64) -> u8 {
    let z = ((n << 1) ^ (n >> 63)) as u64;
    assert!(z < 0x80, "{n} needs more than one byte");
    z as u8
}

/// CRC-32C (Castagnoli), the record batch checksum.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}
