//! What `GET /v1/projections/{p}` shows: a projection's plugin, progress
//! per partition against the heads, search indexes, outbox and counters.

use serde::{Deserialize, Serialize};

use super::{Projection, Runtime, Shard};
use crate::plugin::Kind;
use crate::plugin::route::Routes;
use crate::projector::WorkerStatus;
use crate::rebuild::RebuildStatus;
use crate::store::read_model::Counters;

/// One partition's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    pub stream: String,
    pub partition: u32,
    /// The next offset the projection will handle.
    pub checkpoint: u64,
    /// The next offset the log will assign (for Kafka: the high watermark).
    pub head: u64,
    pub lag: u64,
}

/// What `GET /v1/projections/{p}` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    pub name: String,
    pub plugin: PluginInfo,
    pub tables: Vec<String>,
    #[serde(flatten)]
    pub worker: WorkerStatus,
    /// Why the plugin file's newest version is not running, if it is not.
    pub reload_error: Option<String>,
    /// The live generation of the read model.
    pub generation: u64,
    /// A rebuild in progress: progress, rate, time left.
    pub rebuild: Option<RebuildStatus>,
    pub partitions: Vec<PartitionStatus>,
    /// Events in the log not yet handled, over all partitions.
    pub lag: u64,
    /// Each search index: how far the indexer has applied the outbox.
    pub indexes: Vec<IndexStatus>,
    /// Events the projection emitted, and how many are published.
    pub emitted: EmitStatus,
    #[serde(flatten)]
    pub counters: Counters,
    /// A partitioned projection's shards, each on its own (the fields above
    /// add them up: the worker shown is the one in the worst state).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
}

/// One shard of a partitioned projection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// The partition number it holds.
    pub shard: u32,
    /// Active (it answers and emits) or a standby copy kept warm.
    pub role: ShardRole,
    /// It answers queries: it is not being restored after it was taken on.
    pub ready: bool,
    /// While it is restored: events handled of those it must have handled
    /// before it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring: Option<Restoring>,
    pub generation: u64,
    /// The next generation being rebuilt beside it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<ShardRebuild>,
    #[serde(flatten)]
    pub worker: WorkerStatus,
    pub partitions: Vec<PartitionStatus>,
    pub lag: u64,
    pub indexes: Vec<IndexStatus>,
    pub emitted: EmitStatus,
    #[serde(flatten)]
    pub counters: Counters,
}

/// A shard's rebuild, as its status (and a cluster's announcements) show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardRebuild {
    pub generation: u64,
    /// It has caught up with the live generation and waits for the switch.
    pub caught_up: bool,
}

/// What a shard running here is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShardRole {
    /// It answers queries and emits.
    #[default]
    Active,
    /// A warm copy for another instance's shard: it emits nothing and answers no query.
    Standby,
}

/// How far a shard taken on from another instance is restored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Restoring {
    pub restored: u64,
    pub total: u64,
}

/// The emitted-events outbox: committed with the batches, then published.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmitStatus {
    /// Events emitted (and committed) so far.
    pub events: u64,
    /// Of those, published to their streams.
    pub published: u64,
    pub lag: u64,
}

/// One search index's progress behind the tables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexStatus {
    pub name: String,
    /// The last outbox sequence committed to the index.
    pub applied_sequence: u64,
    /// The last outbox sequence the tables committed.
    pub outbox_sequence: u64,
    /// Document changes committed to the tables but not yet searchable.
    pub lag: u64,
    pub documents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginInfo {
    pub kind: Kind,
    pub source: String,
    pub version: String,
    pub schema_version: u32,
    pub subscriptions: Vec<SubscriptionInfo>,
    /// An enricher's output streams (from its routes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionInfo {
    pub stream: String,
    pub event_types: Vec<String>,
}

impl Runtime {
    /// The status of `projection`: checkpoints against the log's heads, counters, errors.
    pub fn status(&self, p: &Projection) -> crate::store::Result<ProjectionStatus> {
        let m = p.manifest();
        let shards = p.shards().iter().map(|s| self.shard_status(&m, s)).collect::<crate::store::Result<Vec<_>>>()?;
        let standbys =
            p.standbys().iter().map(|s| self.shard_status(&m, s)).collect::<crate::store::Result<Vec<_>>>()?;
        let rebuilds: crate::store::Result<Vec<_>> =
            p.shards().iter().filter_map(|s| s.rebuild().map(|r| r.status(&s.live()))).collect();
        let rebuild = crate::rebuild::RebuildStatus::combined(rebuilds?).or_else(|| self.asked_rebuild(p, &m));
        let kind = p.kind();
        let plugin = PluginInfo {
            kind,
            outputs: match kind {
                Kind::Projection => Vec::new(),
                Kind::Enricher => {
                    let routes = self.plugin_config.get(&m.name).map(|c| c.routes.as_slice()).unwrap_or_default();
                    let routes = Routes::new(&m.name, routes).unwrap_or_else(|_| Routes::to_own_stream(&m.name));
                    routes.streams().into_iter().map(str::to_owned).collect()
                }
            },
            source: p.source.clone(),
            version: m.version.clone(),
            schema_version: m.schema_version,
            subscriptions: m
                .subscriptions
                .iter()
                .map(|s| SubscriptionInfo { stream: s.stream.clone(), event_types: s.event_types.clone() })
                .collect(),
        };
        let reload_error = p.reload_error.lock().expect("reload error lock").clone();
        let whole = sum(&shards);
        Ok(ProjectionStatus {
            name: m.name.clone(),
            plugin,
            tables: m.tables.clone(),
            worker: whole.worker,
            reload_error,
            // With no shard here, the generation the cluster switched to.
            generation: match (shards.is_empty(), self.membership.get()) {
                (true, Some(cluster)) if p.is_partitioned() && self.shards_by_group => cluster.switched(&m.name),
                _ => whole.generation,
            },
            rebuild,
            partitions: whole.partitions,
            lag: whole.lag,
            indexes: whole.indexes,
            emitted: whole.emitted,
            counters: whole.counters,
            shards: if p.is_partitioned() {
                shards
                    .into_iter()
                    .chain(standbys.into_iter().map(|s| ShardStatus { role: ShardRole::Standby, ..s }))
                    .collect()
            } else {
                Vec::new()
            },
        })
    }

    /// One shard's progress against the heads, its indexes, outbox and counters.
    /// A rebuild asked of the cluster that no copy here has started yet
    /// (this instance's plugin file does not declare its schema-version
    /// yet, or the activity thread is about to start them).
    fn asked_rebuild(&self, p: &super::Projection, m: &crate::plugin::Manifest) -> Option<RebuildStatus> {
        let cluster = self.membership.get().filter(|_| p.is_partitioned() && self.shards_by_group)?;
        let asked = cluster.pending_rebuild(&m.name)?;
        let waiting_for = match asked.schema_version == m.schema_version {
            true => "the copies here to start".to_owned(),
            false => format!("this instance's plugin to declare schema-version {}", asked.schema_version),
        };
        Some(RebuildStatus {
            generation: asked.generation,
            replayed: 0,
            target: 0,
            events_per_second: 0.0,
            eta_seconds: None,
            started_at: asked.at,
            switching: false,
            waiting_for: Some(waiting_for),
            preview: false,
            caught_up: false,
        })
    }

    fn shard_status(&self, m: &crate::plugin::Manifest, shard: &Shard) -> crate::store::Result<ShardStatus> {
        let projection = shard.live();
        let checkpoints = projection.read_model.cursor()?;
        let mut partitions = Vec::new();
        for s in &m.subscriptions {
            // Kafka streams: the partitions this shard reads; log streams: all.
            let heads: Vec<(u32, u64)> = if self.kafka.topic(&s.stream).is_some() {
                let watermarks = projection.watermarks.lock().expect("watermarks lock");
                watermarks.iter().filter(|((stream, _), _)| *stream == s.stream).map(|((_, p), h)| (*p, *h)).collect()
            } else {
                self.log
                    .heads(&s.stream)
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(|(p, h)| (p as u32, h))
                    .collect()
            };
            for (partition, head) in heads {
                let checkpoint = checkpoints.get(&(s.stream.clone(), partition)).copied().unwrap_or(0);
                partitions.push(PartitionStatus {
                    stream: s.stream.clone(),
                    partition,
                    checkpoint,
                    head,
                    lag: head.saturating_sub(checkpoint),
                });
            }
        }
        let outbox_sequence = projection.read_model.outbox_sequence()?;
        let applied = projection.indexes.applied.load(std::sync::atomic::Ordering::Relaxed);
        let indexes = projection
            .indexes
            .open
            .iter()
            .map(|(name, open)| IndexStatus {
                name: name.clone(),
                applied_sequence: applied,
                outbox_sequence,
                lag: outbox_sequence.saturating_sub(applied),
                documents: open.reader.searcher().num_docs(),
            })
            .collect();
        let (emitted, published) = projection.read_model.emit_progress()?;
        Ok(ShardStatus {
            shard: shard.number(),
            role: ShardRole::Active,
            ready: shard.is_ready(),
            restoring: shard.restore_progress().map(|(restored, total)| Restoring { restored, total }),
            generation: projection.number,
            rebuild: shard
                .rebuild()
                .map(|r| ShardRebuild { generation: r.generation.number, caught_up: r.is_caught_up() }),
            worker: projection.status.lock().expect("status lock").clone(),
            lag: partitions.iter().map(|p| p.lag).sum(),
            partitions,
            indexes,
            emitted: EmitStatus { events: emitted, published, lag: emitted.saturating_sub(published) },
            counters: projection.read_model.counters()?,
        })
    }
}

/// A projection's shards added up: partitions side by side; lags, counters,
/// documents and measurements summed; the worker in the worst state (paused,
/// then retrying, then stopped) stands for all.
fn sum(shards: &[ShardStatus]) -> ShardStatus {
    use crate::projector::WorkerState;
    let severity = |s: &ShardStatus| match s.worker.state {
        WorkerState::Paused => 3,
        WorkerState::Retrying => 2,
        WorkerState::Stopped => 1,
        WorkerState::Running => 0,
    };
    let Some(worst) = shards.iter().max_by_key(|s| severity(s)) else {
        // No shard of it runs here (the group gave them all to other instances).
        return ShardStatus {
            shard: 0,
            role: ShardRole::Active,
            ready: true,
            restoring: None,
            generation: 0,
            rebuild: None,
            worker: WorkerStatus::default(),
            partitions: Vec::new(),
            lag: 0,
            indexes: Vec::new(),
            emitted: EmitStatus { events: 0, published: 0, lag: 0 },
            counters: Counters::default(),
        };
    };
    let mut whole = worst.clone();
    if shards.len() == 1 {
        return whole;
    }
    whole.generation = shards[0].generation;
    whole.worker.metrics = Default::default();
    whole.partitions.clear();
    whole.indexes = shards[0]
        .indexes
        .iter()
        .map(|i| IndexStatus { applied_sequence: 0, outbox_sequence: 0, lag: 0, documents: 0, ..i.clone() })
        .collect();
    whole.emitted = EmitStatus { events: 0, published: 0, lag: 0 };
    whole.counters = Counters::default();
    for s in shards {
        whole.worker.metrics.merge(&s.worker.metrics);
        whole.partitions.extend(s.partitions.iter().cloned());
        for (sum, i) in whole.indexes.iter_mut().zip(&s.indexes) {
            sum.applied_sequence += i.applied_sequence;
            sum.outbox_sequence += i.outbox_sequence;
            sum.lag += i.lag;
            sum.documents += i.documents;
        }
        whole.emitted.events += s.emitted.events;
        whole.emitted.published += s.emitted.published;
        whole.emitted.lag += s.emitted.lag;
        whole.counters.events_applied += s.counters.events_applied;
        whole.counters.dead_letters += s.counters.dead_letters;
        whole.counters.batches += s.counters.batches;
        whole.counters.unrouted_outputs += s.counters.unrouted_outputs;
    }
    whole.partitions.sort_by(|a, b| (&a.stream, a.partition).cmp(&(&b.stream, b.partition)));
    whole.lag = whole.partitions.iter().map(|p| p.lag).sum();
    whole
}
