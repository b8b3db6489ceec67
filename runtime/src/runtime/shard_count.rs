//! How many shards a partitioned projection has, and waiting until the
//! brokers can say. A projection whose topics do not exist yet, or whose
//! brokers cannot be reached when it is loaded, is not given up on: it
//! waits in the background, without holding up the server or the other
//! projections, and starts as soon as the brokers answer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;

use super::{PluginError, Runtime};
use crate::plugin::{Handler, Manifest};
use crate::source::kafka::ShardCountError;

/// How many shards a projection has.
pub(super) enum ShardCount {
    /// It does not read Kafka in partitioned mode: one read model.
    Whole,
    /// One per partition of its (co-partitioned) topics.
    Shards(u32),
    /// The brokers cannot say yet (unreachable, or the topics do not exist)
    /// and no count is on disk: it waits for them ([`Runtime::wait_for_shard_count`]).
    NotYet(String),
}

/// The plugins waiting for their brokers, by source: each wait holds a
/// token, and a newer load of the same source (a new version, the file
/// removed) replaces or removes it, which ends the older wait.
#[derive(Default)]
pub(super) struct Waits {
    next: u64,
    by_source: BTreeMap<String, u64>,
}

impl Waits {
    /// End the wait of `source`, if it has one.
    pub(super) fn end(&mut self, source: &str) {
        self.by_source.remove(source);
    }
}

/// How long a waiting projection sleeps between asking the brokers at first, and at most.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(10);

impl Runtime {
    /// How many shards `manifest`'s projection has: one read model unless it
    /// reads Kafka in partitioned mode. The brokers say (every topic must
    /// have the same partition count); when they cannot, the shards already
    /// on disk do, and the readers retry the brokers.
    pub(super) fn shard_count(&self, manifest: &Manifest, root: &Path) -> anyhow::Result<ShardCount> {
        if self.kafka.mode != crate::source::kafka::Mode::Partitioned {
            return Ok(ShardCount::Whole);
        }
        let streams: Vec<&str> = manifest.subscriptions.iter().map(|s| s.stream.as_str()).collect();
        let (kafka, log): (Vec<&str>, Vec<&str>) = streams.iter().partition(|s| self.kafka.topic(s).is_some());
        if kafka.is_empty() {
            return Ok(ShardCount::Whole);
        }
        if !log.is_empty() {
            anyhow::bail!(
                "{} is partitioned by its Kafka topics' partitions, and {log:?} is on the embedded log, which this instance alone holds: map it to a Kafka topic",
                manifest.name
            );
        }
        // The count the read model was split into, recorded when it was first split.
        let count_file = root.join("shards").join("count");
        let on_disk = match std::fs::read_to_string(&count_file) {
            Ok(text) => {
                text.trim().parse::<u32>().with_context(|| format!("{} holds {text:?}", count_file.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("reading {}", count_file.display())),
        };
        match crate::source::kafka::shard_count(&self.kafka, &kafka) {
            Ok(n) if on_disk != 0 && n != on_disk => anyhow::bail!(
                "{}'s topics have {n} partitions now, and its read model was split into {on_disk} shards: keys have moved between partitions, so the shards cannot be kept; delete {} to build it again",
                manifest.name,
                root.join("shards").display()
            ),
            Ok(n) => {
                if on_disk == 0 {
                    std::fs::create_dir_all(root.join("shards"))?;
                    crate::data_dir::replace_durably(&count_file, n.to_string().as_bytes())
                        .with_context(|| format!("writing {}", count_file.display()))?;
                }
                Ok(ShardCount::Shards(n))
            }
            Err(e) if on_disk != 0 => {
                tracing::warn!(projection = %manifest.name, error = %e, shards = on_disk, "cannot reach Kafka; starting the shards on disk");
                Ok(ShardCount::Shards(on_disk))
            }
            Err(ShardCountError::NotYet(e)) => Ok(ShardCount::NotYet(e)),
            Err(e @ ShardCountError::NotCoPartitioned(_)) => Err(anyhow::anyhow!("{e}")),
        }
    }

    /// Keep `handler` (from `source`) until its brokers say how many shards
    /// it has, then start it: a thread asks them again and again (1 s, then
    /// up to every 10 s) until they answer, the runtime stops, or a newer
    /// load of `source` supersedes this one. Meanwhile its plugin error
    /// says why it waits (`retrying`), and queries of it are 503s.
    pub(super) fn wait_for_shard_count(
        &self,
        waits: &mut Waits,
        handler: Box<dyn Handler>,
        source: String,
        why: String,
    ) -> anyhow::Result<()> {
        let name = handler.manifest().name.clone();
        let me =
            self.me.get().cloned().with_context(|| format!("{name}: cannot learn how many shards it has: {why}"))?;
        let token = waits.next;
        waits.next += 1;
        waits.by_source.insert(source.clone(), token);
        tracing::warn!(projection = %name, error = %why, "its brokers cannot say how many partitions its topics have yet; it starts when they do");
        self.report_plugin_error(PluginError {
            file: source.clone(),
            error: format!(
                "{name} waits for its Kafka brokers to say how many partitions its topics have, and starts when they do: {why}"
            ),
            projection: Some(name.clone()),
            retrying: true,
        });
        let root = self.data_dir.join("projections").join(&name);
        let (stop, thread_name) = (self.stop.clone(), format!("shard-count-{name}"));
        let wait = move || {
            let mut backoff = crate::clock::Backoff::new(FIRST_RETRY, LAST_RETRY);
            loop {
                if !crate::clock::sleep_unless(&stop, crate::clock::jitter(backoff.next_delay())) {
                    return;
                }
                let Some(runtime) = me.upgrade() else { return };
                // Ask without holding anything; start under the waits' lock,
                // unless a newer load of the file took over meanwhile.
                // (A count, or an error the add below reports.)
                if let Ok(ShardCount::NotYet(e)) = runtime.shard_count(handler.manifest(), &root) {
                    tracing::debug!(projection = %name, error = %e, "still waiting for the partition count");
                    continue;
                }
                let mut waits = runtime.waits.lock().expect("waits lock");
                if waits.by_source.get(&source) != Some(&token) || stop.load(Ordering::Relaxed) {
                    return;
                }
                match runtime.add_locked(&mut waits, handler, source.clone()) {
                    Ok(Some(_)) => {
                        tracing::info!(projection = %name, "its brokers answered; projection started");
                        runtime.clear_plugin_error(&source);
                    }
                    Ok(None) => {} // waiting again, on a new thread
                    Err(e) => runtime.plugin_error(source, format!("{e:#}")),
                }
                return;
            }
        };
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(wait)
            .context("spawning a thread to wait for the partition count")?;
        self.workers.lock().expect("workers lock").push(thread);
        Ok(())
    }

    /// Whether projection `name` waits for its brokers before it starts,
    /// and why.
    pub fn waiting_for_brokers(&self, name: &str) -> Option<String> {
        let errors = self.plugin_errors.lock().expect("plugin errors lock");
        errors.iter().find(|e| e.retrying && e.projection.as_deref() == Some(name)).map(|e| e.error.clone())
    }
}
