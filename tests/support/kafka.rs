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
pub fn tansu() -> PathBuf {
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
pub struct Broker {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Broker {
    pub fn start() -> Broker {
        let mut broker = Broker { dir: tempfile::tempdir().unwrap(), port: free_port(), child: None };
        broker.restart();
        broker
    }

    /// `host:port`, for `kafka.brokers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Start the broker (again) on the same port and storage.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("tansu.log")).unwrap();
        let child = Command::new(tansu())
            .current_dir(self.dir.path())
            .args(["broker", "--listener-url", &self.url(), "--advertised-listener-url", &self.url()])
            // The path is relative to the working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
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

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(tansu())
            .args(["topic", "create", name, "--partitions", &partitions.to_string(), "--broker", &self.url()])
            .stdin(Stdio::null())
            .output()
            .expect("running tansu topic create");
        assert!(out.status.success(), "creating topic {name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A producer (librdkafka, like any Kafka client) for this broker.
    pub fn producer(&self) -> TestProducer {
        TestProducer::new(&self.address())
    }
}

impl TestProducer {
    /// A producer for the cluster at `bootstrap` (`host:port,…`).
    pub fn new(bootstrap: &str) -> TestProducer {
        let failures = Arc::new(AtomicUsize::new(0));
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "5")
            // Kafka's Java client partitioning, like the embedded log's.
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", "60000")
            .create_with_context(Failures(failures.clone()))
            .expect("creating a producer");
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
pub struct Out {
    pub key: Option<String>,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    /// `None`: by the key's hash.
    pub partition: Option<i32>,
    /// The record timestamp (ms); `None`: the producer's clock.
    pub timestamp: Option<i64>,
}

pub struct TestProducer {
    producer: BaseProducer<Failures>,
    failures: Arc<AtomicUsize>,
}

impl TestProducer {
    /// Produce `records` to `topic` in order and wait until every one is acknowledged.
    pub fn send_all(&self, topic: &str, records: &[Out]) {
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
        self.producer.flush(Duration::from_secs(60)).expect("flushing the producer");
        assert_eq!(self.failures.load(Ordering::Relaxed), 0, "some records were not delivered");
    }
}
