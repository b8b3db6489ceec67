//! Which shards of a partitioned projection this instance runs, in a
//! cluster: a Kafka consumer group decides, as it decides which consumer
//! reads a partition. Each instance joins the group `<group-id>.<projection>`
//! with the cooperative-sticky assignor, subscribed to the projection's
//! first Kafka topic, and runs shard *n* while the group assigns it
//! partition *n* of that topic. The group's consumer reads nothing (its
//! partitions stay paused) and commits nothing: each shard's worker reads
//! every topic's partition *n* itself, from the shard's own checkpoints.
//! Cooperative rebalancing moves only the partitions that must move, so
//! shards that stay keep running through a rebalance.
//!
//! Standbys (`kafka.standby-replicas`): every second, each instance works
//! out from the control topic which instances keep a warm copy of each
//! shard: the live instances other than its active one, ranked by a hash
//! of (projection, shard, instance), the first `standby-replicas` of them.
//! Every instance computes the same ranking, so no one coordinates. A
//! standby runs the shard's worker with everything as history (it emits
//! nothing) and answers no query; taken on, it catches up the last events
//! and answers. The group does not know about standbys (librdkafka has no
//! pluggable assignor), so a shard's new owner holds a warm copy when the
//! group happens to pick one of its standbys: always, with
//! `standby-replicas` one less than the instances.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};

use super::{Projection, Runtime};
use crate::plugin::Manifest;
use crate::rebuild::{ClusterRebuild, ClusterSwitches};
use crate::source::kafka::KafkaConfig;
use crate::source::reader::Cursor;

/// What the activity thread knows of the cluster, to choose standbys and
/// carry out rebuilds (the control topic).
pub trait Membership: ClusterSwitches {
    /// This instance's id.
    fn me(&self) -> String;
    /// The ids of the live instances, this one included.
    fn live(&self) -> Vec<String>;
    /// The instance that announces itself active for shard `n` of `projection`.
    fn active(&self, projection: &str, n: u32) -> Option<String>;
    /// The last rebuild asked for `projection` across the cluster.
    fn rebuild(&self, projection: &str) -> Option<ClusterRebuild>;
    /// The rebuild of `projection` asked for and neither cancelled nor switched to yet.
    fn pending_rebuild(&self, projection: &str) -> Option<ClusterRebuild> {
        self.rebuild(projection).filter(|r| !r.cancelled && r.generation > self.switched(projection))
    }
    /// Ask every instance to rebuild `projection` (or cancel that).
    fn request_rebuild(&self, projection: &str, rebuild: &ClusterRebuild) -> Result<(), String>;
    /// Tell every shard of `projection` to switch to `generation`.
    fn switch(&self, projection: &str, generation: u64) -> Result<(), String>;
    /// Whether the live instance active for shard `n` of `projection`
    /// announces its copy of `generation` caught up (or switched to it).
    fn caught_up(&self, projection: &str, n: u32, generation: u64) -> bool;
}

/// The instances that keep standby copies of shard `n` of `projection`:
/// the first `replicas` of the live ones other than its active one, ranked
/// by a hash every instance computes alike (rendezvous hashing).
pub(super) fn standbys_of(
    projection: &str,
    n: u32,
    live: &[String],
    active: Option<&str>,
    replicas: u32,
) -> Vec<String> {
    let mut candidates: Vec<(u64, &String)> = live
        .iter()
        .filter(|i| Some(i.as_str()) != active)
        .map(|i| (fnv1a(format!("{projection}\u{0}{n}\u{0}{i}").as_bytes()), i))
        .collect();
    candidates.sort_by(|a, b| b.cmp(a));
    candidates.into_iter().take(replicas as usize).map(|(_, i)| i.clone()).collect()
}

/// 64-bit FNV-1a: the same on every instance, build and platform.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// What the group changed during a poll.
enum Change {
    Assigned(Vec<u32>),
    Revoked(Vec<u32>),
}

/// Collects the group's decisions; they are carried out after the poll
/// that made them, outside librdkafka's callback.
struct Roles {
    projection: String,
    changes: Mutex<Vec<Change>>,
}

impl ClientContext for Roles {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(projection = %self.projection, %error, "kafka (shard group): {reason}");
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<u32> {
    tpl.elements().iter().map(|e| e.partition() as u32).collect()
}

impl ConsumerContext for Roles {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.changes.lock().expect("changes lock").push(Change::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // The shards read for themselves: this consumer fetches nothing.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(projection = %self.projection, error = %e, "pausing the shard group's partitions");
            }
            self.changes.lock().expect("changes lock").push(Change::Assigned(partitions(tpl)));
        }
    }
}

/// Join the group of `projection` and run the shards it assigns here until
/// the runtime stops or the projection is removed.
pub(super) fn spawn(
    runtime: Weak<Runtime>,
    projection: Arc<Projection>,
    manifest: &Manifest,
    kafka: &Arc<KafkaConfig>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let streams: Vec<(String, String)> = manifest
        .subscriptions
        .iter()
        .filter_map(|s| kafka.topic(&s.stream).map(|t| (s.stream.clone(), t.topic.clone())))
        .collect();
    let topic = streams.first().map(|(_, t)| t.clone()).context("a partitioned projection reads a Kafka topic")?;
    let name = manifest.name.clone();
    let mut client = kafka.client_config();
    client
        .set("group.id", format!("{}.{name}", kafka.group_id))
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "latest")
        .set("enable.partition.eof", "false");
    let roles = Roles { projection: name.clone(), changes: Mutex::new(Vec::new()) };
    let consumer: BaseConsumer<Roles> =
        client.create_with_context(roles).context("creating the shard group's consumer")?;
    consumer.subscribe(&[&topic]).with_context(|| format!("joining the shard group of {name}"))?;
    let (count, replicas) = (projection.shard_count(), kafka.standby_replicas);
    let thread = std::thread::Builder::new().name(format!("shards-{name}")).spawn(move || {
        let mut running: HashSet<u32> = HashSet::new();
        // Assigned here, but taking them on failed: tried again every second
        // (the group will not assign them again by itself).
        let mut failed: HashSet<u32> = HashSet::new();
        let mut next_choice = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) && !projection.is_removed() {
            if std::time::Instant::now() >= next_choice
                && let Some(runtime) = runtime.upgrade()
            {
                next_choice = std::time::Instant::now() + Duration::from_secs(1);
                runtime.follow_cluster_rebuild(&projection);
                if !failed.is_empty() {
                    let again = Change::Assigned(failed.drain().collect());
                    consumer.context().changes.lock().expect("changes lock").push(again);
                }
                choose_standbys(&runtime, &projection, &name, count, replicas, &running);
            }
            if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                tracing::warn!(projection = %name, error = %e, "the shard group");
            }
            let changes = std::mem::take(&mut *consumer.context().changes.lock().expect("changes lock"));
            let Some(runtime) = runtime.upgrade() else { return };
            for change in changes {
                match change {
                    Change::Revoked(shards) => {
                        for n in shards {
                            runtime.let_go(&projection, n);
                            running.remove(&n);
                            failed.remove(&n);
                        }
                    }
                    Change::Assigned(shards) => {
                        for n in shards {
                            let Some(heads) = heads(&consumer, &streams, n, &stop) else { return };
                            match runtime.take_on(&projection, n, heads) {
                                Ok(()) => {
                                    running.insert(n);
                                }
                                Err(e) => {
                                    tracing::error!(projection = %name, shard = n, error = format!("{e:#}"), "taking a shard on; trying again in a second");
                                    failed.insert(n);
                                }
                            }
                        }
                    }
                }
            }
        }
        // Dropping the consumer leaves the group: the others take the shards on at once.
        drop(consumer);
    })?;
    Ok(thread)
}

/// Keep standby copies of the shards this instance is chosen for (and not
/// active for), and stop those it is no longer chosen for.
fn choose_standbys(
    runtime: &Runtime,
    projection: &Projection,
    name: &str,
    count: u32,
    replicas: u32,
    running: &HashSet<u32>,
) {
    let Some(membership) = runtime.membership.get() else { return };
    let (me, live) = (membership.me(), membership.live());
    for n in (0..count).filter(|n| !running.contains(n)) {
        let active = membership.active(name, n);
        if standbys_of(name, n, &live, active.as_deref(), replicas).contains(&me) {
            if let Err(e) = runtime.keep_standby(projection, n) {
                tracing::warn!(projection = %name, shard = n, error = format!("{e:#}"), "keeping a standby copy");
            }
        } else {
            runtime.drop_standby(projection, n);
        }
    }
}

/// Where partition `n` of each of `streams` ends now: what a shard taken on
/// must have handled before it answers queries. Read until every head is
/// known (a shard taken on with a head missing would answer before it has
/// caught up: a busy broker can take longer than one attempt's 5 s); `None`
/// once `stop` is set.
fn heads(consumer: &BaseConsumer<Roles>, streams: &[(String, String)], n: u32, stop: &AtomicBool) -> Option<Cursor> {
    let mut heads = Cursor::new();
    for (stream, topic) in streams {
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            match consumer.fetch_watermarks(topic, n as i32, Duration::from_secs(5)) {
                Ok((_, high)) => {
                    heads.insert((stream.clone(), n), high.max(0) as u64);
                    break;
                }
                Err(e) => {
                    tracing::warn!(topic, partition = n, error = %e, "reading a head for a shard taken on; retrying")
                }
            }
        }
    }
    Some(heads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standbys_are_chosen_alike_everywhere_never_the_active_one_and_spread() {
        let live: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let chosen = standbys_of("orders", 2, &live, Some("b"), 2);
        assert_eq!(chosen.len(), 2);
        assert!(!chosen.contains(&"b".to_owned()), "the active instance is no standby");
        let mut shuffled = live.clone();
        shuffled.reverse();
        assert_eq!(standbys_of("orders", 2, &shuffled, Some("b"), 2), chosen, "the order of the list does not matter");
        // Across many shards every instance keeps some standbys.
        let mut counts = std::collections::BTreeMap::new();
        for n in 0..64 {
            for i in standbys_of("orders", n, &live, None, 1) {
                *counts.entry(i).or_insert(0) += 1;
            }
        }
        assert_eq!(counts.len(), 4, "{counts:?}");
        assert!(counts.values().all(|c| *c >= 8), "{counts:?}");
        assert_eq!(standbys_of("orders", 0, &live, None, 9).len(), 4, "no more standbys than instances");
    }
}
