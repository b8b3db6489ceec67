//! Membership through Kafka: each instance announces itself on a compacted
//! control topic (`cluster.control-topic`, `refract.cluster` by default),
//! keyed by its instance id, and reads everyone's announcements from it. No
//! other coordination service: the topic is the directory, and an instance
//! that leaves writes a tombstone. An announcement says where the instance is
//! (`advertise-url`) and what it holds: each projection's generation and
//! checkpoints per partition, and the shards it runs (role, readiness, a
//! rebuild's progress). Other keys: `publication/<p>/<n>` (what a shard's
//! active copy published: `sink::handover`), `rebuild/<p>` (a rebuild
//! asked of every instance) and `switch/<p>` (the generation every shard
//! switches to): `runtime::Runtime::follow_cluster_rebuild`.
//!
//! Routing (`api::shards`), standbys (`runtime::activity`), hand-overs and
//! cluster-wide rebuilds read it, and it answers `GET /v1/cluster`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::clock::{Backoff, now_ms, sleep_unless};
use crate::config::ClusterConfig;
use crate::rebuild::ClusterRebuild;
use crate::runtime::{PartitionStatus, Runtime, ShardRole};
use crate::sink::handover::{Publication, Publications};
use crate::source::kafka::KafkaConfig;

/// What an instance says about itself on the control topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Announcement {
    pub instance: String,
    pub url: String,
    /// When it was sent, in ms since the Unix epoch (the sender's clock).
    pub announced_at: i64,
    /// How often the instance announces itself.
    pub interval_ms: u64,
    /// When this run of the instance joined, in ms since the Unix epoch: a
    /// record it wrote before then was written by a run that is gone.
    #[serde(default)]
    pub started_at: i64,
    pub projections: Vec<Held>,
}

/// A projection an instance holds, and how far it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    pub name: String,
    pub generation: u64,
    pub events_applied: u64,
    pub lag: u64,
    pub partitions: Vec<PartitionStatus>,
    /// A partitioned projection's shards this instance runs, active or standby.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<HeldShard>,
}

/// A shard an instance runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldShard {
    pub shard: u32,
    /// Active (it answers and emits) or a standby copy.
    #[serde(default)]
    pub role: ShardRole,
    /// It answers queries (it is not being restored).
    pub ready: bool,
    pub generation: u64,
    pub lag: u64,
    /// The generation being rebuilt beside it, and whether it has caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<crate::runtime::ShardRebuild>,
}

/// An instance as this one last heard of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    #[serde(flatten)]
    pub announcement: Announcement,
    /// Announced within three of its intervals.
    pub live: bool,
    /// Since its last announcement (this instance's clock against the
    /// announcer's: instances are expected to keep NTP time).
    pub silent_ms: u64,
}

/// `GET /v1/cluster`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// This instance's id.
    pub instance: String,
    pub control_topic: String,
    /// Every instance with an announcement on the control topic, this one included, by id.
    pub members: Vec<Member>,
}

/// This instance's membership: the announcer and the reader of the control topic.
pub struct Cluster {
    me: String,
    topic: String,
    /// By instance id: the last announcement.
    members: Arc<RwLock<BTreeMap<String, Announcement>>>,
    /// By (projection, shard): what its active copy last said it published.
    publications: Arc<RwLock<ByShard>>,
    /// By projection: the last rebuild asked for, and the generation switched to.
    rebuilds: Arc<RwLock<Rebuilds>>,
    /// By partition of the control topic: the offset after the last record read.
    read: Arc<Mutex<BTreeMap<i32, i64>>>,
    /// How long a member that wrote a publication must have been silent
    /// to count as gone: the group's session timeout (the group gives its
    /// shards away no sooner), at least three announcement intervals.
    gone_after_ms: u64,
    producer: Arc<BaseProducer>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Cluster {
    /// Join: announce this instance every interval and read everyone's
    /// announcements, creating the control topic if it is missing. A broker
    /// that cannot be reached yet is retried with back-off (logged), so an
    /// instance starts whether or not Kafka is up.
    pub fn join(
        config: &ClusterConfig,
        kafka: &KafkaConfig,
        listen: &str,
        data_dir: &Path,
        runtime: Arc<Runtime>,
    ) -> anyhow::Result<Cluster> {
        let me = match &config.instance_id {
            Some(id) => id.clone(),
            None => instance_id(data_dir)?,
        };
        let url = config.advertise_url.clone().unwrap_or_else(|| format!("http://{listen}"));
        let topic = config.control_topic.clone();
        let interval = Duration::from_millis(config.announce_interval_ms);
        let producer: Arc<BaseProducer> =
            Arc::new(kafka.client_config().create().context("creating the cluster producer")?);
        let members = Arc::new(RwLock::new(BTreeMap::new()));
        let publications = Arc::new(RwLock::new(BTreeMap::new()));
        let rebuilds = Arc::new(RwLock::new(Rebuilds::default()));
        let read = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reading = {
            let (kafka, topic, me, stop) = (kafka.clone(), topic.clone(), me.clone(), stop.clone());
            let directory = Directory {
                members: members.clone(),
                publications: publications.clone(),
                rebuilds: rebuilds.clone(),
                read: read.clone(),
            };
            move || {
                let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
                while !stop.load(Ordering::Relaxed) {
                    let opened = create_topic(&kafka, &topic)
                        .and_then(|()| Reader::open(&kafka, &topic, &me, directory.clone(), stop.clone()));
                    match opened {
                        Ok(reader) => return reader.run(),
                        Err(e) => {
                            tracing::warn!(error = format!("{e:#}"), "joining the cluster; retrying");
                            sleep_unless(&stop, backoff.next_delay());
                        }
                    }
                }
            }
        };
        let announcer = Announcer {
            producer: producer.clone(),
            topic: topic.clone(),
            me: me.clone(),
            url,
            interval,
            started_at: now_ms(),
            runtime,
            stop: stop.clone(),
        };
        let threads = vec![
            std::thread::Builder::new().name("cluster-reader".into()).spawn(reading)?,
            std::thread::Builder::new().name("cluster-announcer".into()).spawn(move || announcer.run())?,
        ];
        tracing::info!(instance = %me, topic = %topic, "joined the cluster");
        let session_ms = kafka.properties.get("session.timeout.ms").and_then(|v| v.parse().ok()).unwrap_or(45_000);
        let gone_after_ms = (3 * config.announce_interval_ms).max(session_ms);
        Ok(Cluster {
            me,
            topic,
            members,
            publications,
            rebuilds,
            read,
            gone_after_ms,
            producer,
            stop,
            threads: Mutex::new(threads),
        })
    }

    /// Every member this instance has heard of.
    pub fn view(&self) -> ClusterView {
        let now = now_ms();
        let members = self
            .members
            .read()
            .expect("members lock")
            .values()
            .map(|a| Member { live: is_live(a, now), silent_ms: silent_ms(a, now), announcement: a.clone() })
            .collect();
        ClusterView { instance: self.me.clone(), control_topic: self.topic.clone(), members }
    }

    /// The URL of a live instance other than this one that is active for
    /// shard `n` of `projection` and ready to answer (the most recently
    /// announced, should two claim it during a hand-over).
    pub fn owner(&self, projection: &str, n: u32) -> Option<String> {
        self.active_holder(projection, n, |a, s| a.instance != self.me && s.ready, |a| a.url.clone())
    }

    /// What `pick` takes of the live instance most recently announcing
    /// itself active for shard `n` of `projection` (and passing `accept`),
    /// read under the lock, copying nothing else: queries ask this for
    /// every shard they forward.
    fn active_holder<T>(
        &self,
        projection: &str,
        n: u32,
        accept: impl Fn(&Announcement, &HeldShard) -> bool,
        pick: impl FnOnce(&Announcement) -> T,
    ) -> Option<T> {
        let now = now_ms();
        let members = self.members.read().expect("members lock");
        let holds = |a: &Announcement| {
            let shards = a.projections.iter().filter(|p| p.name == projection).flat_map(|p| &p.shards);
            shards.into_iter().any(|s| s.shard == n && s.role == ShardRole::Active && accept(a, s))
        };
        members.values().filter(|a| is_live(a, now) && holds(a)).max_by_key(|a| a.announced_at).map(pick)
    }

    /// Stop announcing and leave: a tombstone under this instance's id, so
    /// the others drop it at once rather than after three silent intervals.
    pub fn leave(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut *self.threads.lock().expect("threads lock")) {
            let _ = t.join();
        }
        let tombstone = BaseRecord::<str, [u8]>::to(&self.topic).key(self.me.as_str());
        match self.producer.send(tombstone) {
            Ok(()) => {
                if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "leaving the cluster: the tombstone was not acknowledged");
                }
            }
            Err((e, _)) => tracing::warn!(error = %e, "leaving the cluster: the tombstone was not sent"),
        }
    }
}

/// What the runtime needs of the membership to choose standbys.
impl crate::runtime::Membership for Cluster {
    fn me(&self) -> String {
        self.me.clone()
    }

    fn live(&self) -> Vec<String> {
        let now = now_ms();
        let members = self.members.read().expect("members lock");
        members.values().filter(|a| is_live(a, now)).map(|a| a.instance.clone()).collect()
    }

    fn active(&self, projection: &str, n: u32) -> Option<String> {
        self.active_holder(projection, n, |_, _| true, |a| a.instance.clone())
    }

    fn rebuild(&self, projection: &str) -> Option<ClusterRebuild> {
        self.rebuilds.read().expect("rebuilds lock").asked.get(projection).cloned()
    }

    fn request_rebuild(&self, projection: &str, rebuild: &ClusterRebuild) -> Result<(), String> {
        // An operator's request, answered once it is written: a broker slow
        // under load is waited for, rather than leaving the request's fate
        // unknown (a record whose flush timed out may still land).
        self.write_within(&format!("{REBUILD}{projection}"), rebuild, ADMIN_WRITE_WAIT)?;
        // Known here at once, without waiting for the reader to read it back.
        self.rebuilds.write().expect("rebuilds lock").asked.insert(projection.to_owned(), rebuild.clone());
        Ok(())
    }

    fn switch(&self, projection: &str, generation: u64) -> Result<(), String> {
        self.write(&format!("{SWITCH}{projection}"), &Switched { generation, at: now_ms() })?;
        self.rebuilds.write().expect("rebuilds lock").switched_to(projection, generation);
        Ok(())
    }

    fn caught_up(&self, projection: &str, n: u32, generation: u64) -> bool {
        let ready = |_: &Announcement, s: &HeldShard| {
            s.generation >= generation || s.rebuild.is_some_and(|r| r.generation == generation && r.caught_up)
        };
        self.active_holder(projection, n, ready, |_| ()).is_some()
    }
}

/// How long an operator's rebuild request or cancel waits for the broker
/// to take its record on the control topic.
const ADMIN_WRITE_WAIT: Duration = Duration::from_secs(30);

impl crate::rebuild::ClusterSwitches for Cluster {
    fn switched(&self, projection: &str) -> u64 {
        self.rebuilds.read().expect("rebuilds lock").switched.get(projection).copied().unwrap_or(0)
    }
}

impl Cluster {
    /// Write `value` under `key` on the control topic, and wait until the broker has it.
    fn write(&self, key: &str, value: &impl Serialize) -> Result<(), String> {
        self.write_within(key, value, Duration::from_secs(5))
    }

    /// Write `value` under `key`, waiting up to `wait` for the broker to take it.
    fn write_within(&self, key: &str, value: &impl Serialize, wait: Duration) -> Result<(), String> {
        let body = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        let record = BaseRecord::<str, [u8]>::to(&self.topic).key(key).payload(&body);
        self.producer.send(record).map_err(|(e, _)| format!("writing {key} on the control topic: {e}"))?;
        self.producer.flush(wait).map_err(|e| format!("writing {key} on the control topic: {e}"))
    }
}

/// Where shards record what they published: `publication/<projection>/<shard>`
/// on the control topic, never deleted (it outlives the instance that wrote it).
impl Publications for Cluster {
    fn instance(&self) -> String {
        self.me.clone()
    }

    fn publication(&self, projection: &str, n: u32) -> Option<(Publication, bool)> {
        let publication =
            self.publications.read().expect("publications lock").get(&(projection.to_owned(), n))?.clone();
        let members = self.members.read().expect("members lock");
        // Not gone: announced within the group's session timeout (a member
        // merely slow to announce under load may still be publishing; one
        // that was killed has been silent that long before the group gives
        // its shards away), by the same run that wrote it (a restarted
        // instance's earlier run is gone, and publishes nothing more).
        let live = members
            .get(&publication.instance)
            .is_some_and(|a| silent_ms(a, now_ms()) < self.gone_after_ms && a.started_at <= publication.at);
        Some((publication, live))
    }

    fn read_up_to_now(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        let client = self.producer.client();
        let Ok(metadata) = client.fetch_metadata(Some(&self.topic), within) else { return false };
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        for p in 0..partitions {
            let left = until.saturating_duration_since(Instant::now());
            let Ok((low, high)) = client.fetch_watermarks(&self.topic, p, left) else { return false };
            loop {
                if self.read.lock().expect("read lock").get(&p).copied().unwrap_or(low) >= high {
                    break;
                }
                if Instant::now() >= until {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        true
    }

    fn record(&self, projection: &str, n: u32, publication: &Publication) -> Result<(), String> {
        self.write(&format!("{PUBLICATION}{projection}/{n}"), publication)?;
        // Known here at once, without waiting for the reader to read it back.
        self.publications.write().expect("publications lock").insert((projection.to_owned(), n), publication.clone());
        Ok(())
    }
}

/// The key prefixes of the control topic's records other than instances'
/// announcements (keyed by instance id): a shard's publication, a
/// projection's rebuild asked for, and the generation it switched to.
const PUBLICATION: &str = "publication/";
const REBUILD: &str = "rebuild/";
const SWITCH: &str = "switch/";

/// `switch/<projection>`: every shard switches to `generation`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Switched {
    generation: u64,
    at: i64,
}

/// What the control topic says of rebuilds, by projection.
#[derive(Debug, Default)]
struct Rebuilds {
    asked: BTreeMap<String, ClusterRebuild>,
    switched: BTreeMap<String, u64>,
}

impl Rebuilds {
    /// `projection` switched to `generation`: never back to an older one
    /// (this instance may have written a newer one before reading this).
    fn switched_to(&mut self, projection: &str, generation: u64) {
        let switched = self.switched.entry(projection.to_owned()).or_default();
        *switched = (*switched).max(generation);
    }
}

/// By (projection, shard): the last publication.
type ByShard = BTreeMap<(String, u32), Publication>;

/// What the reader of the control topic keeps up to date.
#[derive(Clone)]
struct Directory {
    members: Arc<RwLock<BTreeMap<String, Announcement>>>,
    publications: Arc<RwLock<ByShard>>,
    rebuilds: Arc<RwLock<Rebuilds>>,
    /// By partition: the offset after the last record read.
    read: Arc<Mutex<BTreeMap<i32, i64>>>,
}

/// Since `a` was sent, by this instance's clock (instances keep NTP time).
fn silent_ms(a: &Announcement, now: i64) -> u64 {
    (now - a.announced_at).max(0) as u64
}

/// Announced within three of its intervals.
fn is_live(a: &Announcement, now: i64) -> bool {
    silent_ms(a, now) <= 3 * a.interval_ms
}

/// The id kept in `<data-dir>/instance-id`, made on first use: the same
/// instance keeps its identity across restarts.
fn instance_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect::<String>();
    let id =
        format!("{}-{:x}", if host.is_empty() { "refract" } else { &host }, nanos ^ u128::from(std::process::id()));
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// Create `topic`, compacted, with one partition; an existing one is kept as it is.
fn create_topic(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        kafka.client_config().create().context("creating a Kafka admin client")?;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let created = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(admin.create_topics([&new], &options))
        .with_context(|| format!("creating the control topic {topic}"))?;
    for result in created {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => anyhow::bail!("creating the control topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Sends this instance's announcement every interval.
struct Announcer {
    producer: Arc<BaseProducer>,
    topic: String,
    me: String,
    url: String,
    interval: Duration,
    started_at: i64,
    runtime: Arc<Runtime>,
    stop: Arc<AtomicBool>,
}

impl Announcer {
    /// Announce at a fixed rate: the time an announcement takes (the
    /// broker's acknowledgement) does not stretch the interval the others
    /// judge liveness by.
    fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.interval.max(Duration::from_millis(100)));
        let mut next = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            match self.announce() {
                Ok(()) => {
                    backoff.reset();
                    next += self.interval;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "announcing this instance on the control topic");
                    next = Instant::now() + backoff.next_delay();
                }
            }
            let now = Instant::now();
            if next > now {
                // A shard taken on or let go is announced at once, on top of the fixed rate.
                let roles = &self.runtime.roles_changed;
                let seen = roles.current();
                while !self.stop.load(Ordering::Relaxed) && Instant::now() < next && roles.current() == seen {
                    roles.wait(seen, (next - Instant::now()).min(Duration::from_millis(50)));
                }
                if roles.current() != seen && !self.stop.load(Ordering::Relaxed) {
                    // Give a shard taken on a moment to say whether it is ready.
                    if let Err(e) = self.announce() {
                        tracing::warn!(error = %e, "announcing a change of shards");
                    }
                }
            } else {
                next = now; // fell behind (a slow broker): start the rate again from here
            }
        }
    }

    fn announce(&self) -> anyhow::Result<()> {
        let mut projections = Vec::new();
        for p in self.runtime.projections() {
            let status = self.runtime.status(&p)?;
            let shards = status
                .shards
                .iter()
                .map(|s| HeldShard {
                    shard: s.shard,
                    role: s.role,
                    ready: s.ready,
                    generation: s.generation,
                    lag: s.lag,
                    rebuild: s.rebuild,
                })
                .collect();
            projections.push(Held {
                name: status.name,
                generation: status.generation,
                events_applied: status.counters.events_applied,
                lag: status.lag,
                partitions: status.partitions,
                shards,
            });
        }
        let announcement = Announcement {
            instance: self.me.clone(),
            url: self.url.clone(),
            announced_at: now_ms(),
            interval_ms: self.interval.as_millis() as u64,
            started_at: self.started_at,
            projections,
        };
        let body = serde_json::to_vec(&announcement)?;
        let record = BaseRecord::<str, [u8]>::to(&self.topic).key(self.me.as_str()).payload(&body);
        self.producer.send(record).map_err(|(e, _)| e)?;
        self.producer.flush(self.interval.max(Duration::from_secs(1)))?;
        Ok(())
    }
}

/// Reads the control topic from its beginning and keeps the latest
/// announcement per instance and publication per shard.
struct Reader {
    consumer: BaseConsumer,
    me: String,
    directory: Directory,
    stop: Arc<AtomicBool>,
}

impl Reader {
    fn open(
        kafka: &KafkaConfig,
        topic: &str,
        me: &str,
        directory: Directory,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Reader> {
        let consumer: BaseConsumer = kafka
            .client_config()
            // Never joins it (partitions are assigned below), but librdkafka wants one.
            .set("group.id", format!("refract.cluster.{me}"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .context("creating the cluster reader")?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("reading the metadata of the control topic {topic}"))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        anyhow::ensure!(partitions > 0, "the control topic {topic} has no partitions");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)?;
        }
        consumer.assign(&tpl).with_context(|| format!("reading the control topic {topic}"))?;
        Ok(Reader { consumer, me: me.to_owned(), directory, stop })
    }

    fn run(self) {
        while !self.stop.load(Ordering::Relaxed) {
            let Some(message) = self.consumer.poll(Duration::from_millis(200)) else { continue };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the control topic");
                    continue;
                }
            };
            self.read(&message);
            self.directory.read.lock().expect("read lock").insert(message.partition(), message.offset() + 1);
        }
    }

    /// Keep what `message` says: an instance's announcement, or a shard's publication.
    fn read(&self, message: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(Ok(key)) = message.key().map(std::str::from_utf8) else { return };
        if let Some(shard) = key.strip_prefix(PUBLICATION) {
            self.read_publication(shard, message.payload());
            return;
        }
        if let Some(projection) = key.strip_prefix(REBUILD) {
            let mut rebuilds = self.directory.rebuilds.write().expect("rebuilds lock");
            match message.payload().map(serde_json::from_slice::<ClusterRebuild>) {
                None => {
                    rebuilds.asked.remove(projection);
                }
                // Never back to an older one (this instance may have written a newer one since).
                Some(Ok(r)) => {
                    let known = rebuilds.asked.get(projection);
                    if known.is_none_or(|k| (k.generation, k.cancelled, k.at) <= (r.generation, r.cancelled, r.at)) {
                        rebuilds.asked.insert(projection.to_owned(), r);
                    }
                }
                Some(Err(e)) => tracing::warn!(key, error = %e, "a rebuild that does not decode; ignored"),
            }
            return;
        }
        if let Some(projection) = key.strip_prefix(SWITCH) {
            match message.payload().map(serde_json::from_slice::<Switched>) {
                Some(Ok(s)) => {
                    self.directory.rebuilds.write().expect("rebuilds lock").switched_to(projection, s.generation)
                }
                None => {}
                Some(Err(e)) => tracing::warn!(key, error = %e, "a switch that does not decode; ignored"),
            }
            return;
        }
        let instance = key;
        let mut members = self.directory.members.write().expect("members lock");
        match message.payload() {
            None => {
                members.remove(instance);
            }
            Some(body) => match serde_json::from_slice::<Announcement>(body) {
                Ok(a) if a.instance == instance => {
                    members.insert(instance.to_owned(), a);
                }
                Ok(_) => tracing::warn!(instance, "an announcement under another instance's id; ignored"),
                Err(e) => tracing::warn!(instance, error = %e, "an announcement that does not decode; ignored"),
            },
        }
    }

    /// Keep the publication of `shard` (`<projection>/<n>`): the latest on
    /// the topic, unless this instance recorded one since (kept at once,
    /// before this reader reaches it).
    fn read_publication(&self, shard: &str, body: Option<&[u8]>) {
        let Some((projection, Ok(n))) = shard.rsplit_once('/').map(|(p, n)| (p, n.parse::<u32>())) else {
            tracing::warn!(key = shard, "a publication under a key that names no shard; ignored");
            return;
        };
        let key = (projection.to_owned(), n);
        let mut publications = self.directory.publications.write().expect("publications lock");
        match body.map(serde_json::from_slice::<Publication>) {
            None => {
                publications.remove(&key);
            }
            Some(Ok(p)) => {
                if publications.get(&key).is_none_or(|known| known.instance != self.me || known.at <= p.at) {
                    publications.insert(key, p);
                }
            }
            Some(Err(e)) => tracing::warn!(key = shard, error = %e, "a publication that does not decode; ignored"),
        }
    }
}
