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
use crate::source::kafka::KafkaConfig;
use crate::source::reader::Cursor;

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
    let thread = std::thread::Builder::new().name(format!("shards-{name}")).spawn(move || {
        let mut running: HashSet<u32> = HashSet::new();
        while !stop.load(Ordering::Relaxed) && !projection.is_removed() {
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
                        }
                    }
                    Change::Assigned(shards) => {
                        for n in shards {
                            let heads = heads(&consumer, &streams, n);
                            match runtime.take_on(&projection, n, heads) {
                                Ok(()) => {
                                    running.insert(n);
                                }
                                Err(e) => {
                                    tracing::error!(projection = %name, shard = n, error = format!("{e:#}"), "taking a shard on")
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

/// Where partition `n` of each of `streams` ends now: what a shard taken on
/// must have handled before it answers queries. A head that cannot be read
/// is left out (the shard then answers once it has caught up to the rest).
fn heads(consumer: &BaseConsumer<Roles>, streams: &[(String, String)], n: u32) -> Cursor {
    let mut heads = Cursor::new();
    for (stream, topic) in streams {
        match consumer.fetch_watermarks(topic, n as i32, Duration::from_secs(5)) {
            Ok((_, high)) => {
                heads.insert((stream.clone(), n), high.max(0) as u64);
            }
            Err(e) => tracing::warn!(topic, partition = n, error = %e, "reading a head for a shard taken on"),
        }
    }
    heads
}
