//! A loaded projection and its shards.
//!
//! A projection's read model is one shard, in `projections/<name>/`, unless
//! it reads Kafka in `partitioned` mode: then it is split into one shard per
//! partition number of its (co-partitioned) topics, shard *n* in
//! `projections/<name>/shards/<n>/`, each with its own generations, redb
//! file, indexes, checkpoints, outbox and dead letters, so that exactly-once
//! holds per shard whoever applies it. An instance runs every shard, or in
//! a cluster those the consumer group gives it (`activity`): shards come
//! and go, and one taken on answers only once it has caught up. The API
//! reads through [`Projection::shards`] (and asks other instances for the
//! rest); [`Projection::whole`] is for what only an unpartitioned
//! projection has.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::generation::Generation;
use crate::plugin::{Handler, Manifest};
use crate::rebuild::Rebuild;
use crate::source::reader::Cursor;

/// A loaded projection, as the API sees it.
pub struct Projection {
    /// Where the plugin came from: its file, or `native`.
    pub source: String,
    /// How many shards its read model has: 1, or its topics' partition count.
    count: u32,
    /// Split by partition (`kafka.mode: partitioned`).
    partitioned: bool,
    /// The shards this instance runs, in partition order: all of them,
    /// unless a consumer group spreads them over the instances of a cluster.
    shards: RwLock<Vec<Arc<Shard>>>,
    /// Shards this instance keeps warm for others (standbys): they read and
    /// apply as an active shard does, emit nothing and answer no query.
    standbys: RwLock<Vec<Arc<Shard>>>,
    /// A partitioned projection's plugin as last deployed, which the shards
    /// this instance takes on later are made from (`Handler::another`).
    template: Mutex<Option<Box<dyn Handler>>>,
    /// In a cluster, the plugin a rebuild builds its generation with: the
    /// template once every shard has switched to it.
    next_template: Mutex<Option<(u64, Box<dyn Handler>)>>,
    /// Held while a rebuild starts, a new version is deployed or shards
    /// come and go: two requests at once must not both see none running
    /// and build (then switch to) the same generation, and a new version
    /// must reach whichever generations and shards run after it.
    pub(super) starting: Mutex<()>,
    /// Why the last new version of the plugin file was not swapped in.
    pub reload_error: Mutex<Option<String>>,
    /// New versions refused since the start (for `/metrics`).
    pub reload_failures: std::sync::atomic::AtomicU64,
    /// Stopped for good (its plugin removed, or the runtime shut down).
    removed: AtomicBool,
}

/// One part of a projection's read model: its live generation, and the one
/// being rebuilt, if any.
pub struct Shard {
    /// The partition number it holds; `None` when it holds everything.
    pub partition: Option<u32>,
    /// Where its generations live.
    pub(super) root: PathBuf,
    pub(super) live: RwLock<Arc<Generation>>,
    pub(super) rebuild: Mutex<Option<Arc<Rebuild>>>,
    /// Taken on from another instance: it answers queries only once its
    /// checkpoints reach `restore_to`, the heads when it was taken on, so
    /// that no query sees a shard with missing history.
    restore_to: Mutex<Option<Cursor>>,
    ready: AtomicBool,
}

impl Shard {
    pub(super) fn new(partition: Option<u32>, root: &Path, live: Arc<Generation>) -> Shard {
        Shard {
            partition,
            root: root.to_owned(),
            live: RwLock::new(live),
            rebuild: Mutex::new(None),
            restore_to: Mutex::new(None),
            ready: AtomicBool::new(true),
        }
    }

    /// From now on it answers only once it has caught up to `heads`.
    pub(super) fn restore_to(&self, heads: Cursor) {
        *self.restore_to.lock().expect("restore lock") = Some(heads);
        self.ready.store(false, Ordering::Relaxed);
    }

    /// The generation queries are answered from.
    pub fn live(&self) -> Arc<Generation> {
        self.live.read().expect("live lock").clone()
    }

    /// The rebuild in progress, if any.
    pub fn rebuild(&self) -> Option<Arc<Rebuild>> {
        self.rebuild.lock().expect("rebuild lock").clone()
    }

    /// Its partition number (0 for the one shard of an unpartitioned projection).
    pub fn number(&self) -> u32 {
        self.partition.unwrap_or(0)
    }

    /// Whether it may answer queries: not restoring, or restored (its
    /// checkpoints have reached the heads it was taken on at).
    pub fn is_ready(&self) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let mut target = self.restore_to.lock().expect("restore lock");
        let Some(heads) = target.as_ref() else { return true };
        let Ok(at) = self.live().checkpoints() else { return false };
        if heads.iter().all(|(k, head)| at.get(k).copied().unwrap_or(0) >= *head) {
            *target = None;
            self.ready.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// (events restored, events to restore) while restoring.
    pub fn restore_progress(&self) -> Option<(u64, u64)> {
        let target = self.restore_to.lock().expect("restore lock").clone()?;
        let at = self.live().checkpoints().unwrap_or_default();
        let done = target.iter().map(|(k, head)| at.get(k).copied().unwrap_or(0).min(*head)).sum();
        Some((done, target.values().sum()))
    }
}

/// Where shard `n` of the projection in `root` keeps its generations.
pub(super) fn shard_root(root: &Path, n: u32) -> PathBuf {
    root.join("shards").join(n.to_string())
}

/// Dead-letter ids are numbered per shard; the API shows shard *n*'s id *i*
/// as `n << DEAD_LETTER_SHARD_BITS | i`: shard 0's (and an unpartitioned
/// projection's) ids are unchanged, ids sort shard by shard so that one
/// `after` cursor pages through all of them, and they stay below 2^53 (exact
/// in JSON and JavaScript) for 8,192 shards of 2^40 letters each.
pub const DEAD_LETTER_SHARD_BITS: u32 = 40;

fn dead_letter_id(partition: Option<u32>, local: u64) -> u64 {
    (u64::from(partition.unwrap_or(0)) << DEAD_LETTER_SHARD_BITS) | local
}

/// (shard, id in the shard) of an id the API shows.
fn split_dead_letter_id(id: u64) -> Option<(u32, u64)> {
    let shard = u32::try_from(id >> DEAD_LETTER_SHARD_BITS).ok()?;
    Some((shard, id & ((1 << DEAD_LETTER_SHARD_BITS) - 1)))
}

/// Put `shard` in `list`, in partition order, in place of one for the same partition.
fn insert(list: &RwLock<Vec<Arc<Shard>>>, shard: Arc<Shard>) {
    let mut list = list.write().expect("shards lock");
    list.retain(|s| s.partition != shard.partition);
    list.push(shard);
    list.sort_by_key(|s| s.partition);
}

/// Take the shard of partition `n` out of `list`.
fn remove(list: &RwLock<Vec<Arc<Shard>>>, n: u32) -> Option<Arc<Shard>> {
    let mut list = list.write().expect("shards lock");
    let at = list.iter().position(|s| s.partition == Some(n))?;
    Some(list.remove(at))
}

impl Projection {
    pub(super) fn new(
        source: String,
        count: u32,
        partitioned: bool,
        shards: Vec<Arc<Shard>>,
        template: Option<Box<dyn Handler>>,
    ) -> Projection {
        assert!(partitioned || shards.len() == 1, "an unpartitioned projection has one shard");
        Projection {
            source,
            count,
            partitioned,
            shards: RwLock::new(shards),
            standbys: RwLock::new(Vec::new()),
            template: Mutex::new(template),
            next_template: Mutex::new(None),
            starting: Mutex::new(()),
            reload_error: Mutex::new(None),
            reload_failures: Default::default(),
            removed: AtomicBool::new(false),
        }
    }

    /// Stopped for good: no shard is taken on any more.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// The shards this instance runs, in partition order (the one shard
    /// when it is not partitioned).
    pub fn shards(&self) -> Vec<Arc<Shard>> {
        self.shards.read().expect("shards lock").clone()
    }

    /// How many shards its read model has, here and elsewhere.
    pub fn shard_count(&self) -> u32 {
        self.count
    }

    /// Split by partition (`kafka.mode: partitioned`)?
    pub fn is_partitioned(&self) -> bool {
        self.partitioned
    }

    /// The rebuilds in progress here, one per shard being rebuilt.
    pub fn rebuilds(&self) -> Vec<Arc<Rebuild>> {
        self.shards().iter().filter_map(|s| s.rebuild()).collect()
    }

    /// A rebuild in progress here (any shard's: they build the same generation).
    pub fn rebuilding(&self) -> Option<Arc<Rebuild>> {
        self.shards().iter().find_map(|s| s.rebuild())
    }

    /// The one shard of a projection that is not partitioned.
    pub fn whole(&self) -> Option<Arc<Shard>> {
        if self.partitioned { None } else { self.shards().into_iter().next() }
    }

    /// What the first shard running here says, or when none runs here
    /// (a cluster's group gave them all to others) what the plugin new
    /// shards are made from declares.
    fn described<T>(&self, running: impl FnOnce(&Generation) -> T, declared: impl FnOnce(&dyn Handler) -> T) -> T {
        match self.shards().first() {
            Some(shard) => running(&shard.live()),
            None => {
                let template = self.template.lock().expect("template lock");
                declared(template.as_deref().expect("a projection without shards here has a template"))
            }
        }
    }

    /// The running version's manifest (every shard runs the same version).
    pub fn manifest(&self) -> Manifest {
        self.described(Generation::manifest, |h| h.manifest().clone())
    }

    /// A projection or an enricher.
    pub fn kind(&self) -> crate::plugin::Kind {
        self.described(|g| g.kind, |h| h.kind())
    }

    /// Its search indexes' mappings.
    pub fn index_mappings(&self) -> Vec<crate::store::search::IndexMapping> {
        self.described(
            |g| g.indexes.open.values().map(|i| i.schema.mapping.clone()).collect(),
            |h| h.indexes().to_vec(),
        )
    }

    /// The one shard that can hold `key` of `table`: the partition of its
    /// event key, by Kafka's murmur2 as the producer's default partitioner
    /// computes it, when the projection is partitioned and the table keyed
    /// like its events; `None` when any shard may hold it.
    pub fn shard_for_key(&self, table: &str, key: &str) -> Option<u32> {
        if !self.partitioned {
            return None;
        }
        let event_key = self.described(
            |g| g.keyed.read().expect("keyed lock").event_key(table, key),
            |h| crate::plugin::keyed::KeyedTables::new(h.manifest(), h.keyed_tables()).ok()?.event_key(table, key),
        )?;
        Some(crate::source::partition::for_key(event_key, self.count))
    }

    /// Its search indexes' names.
    pub fn index_names(&self) -> Vec<String> {
        self.index_mappings().into_iter().map(|m| m.name).collect()
    }

    /// The shard of this instance holding `partition` of the projection's
    /// streams: the one shard of an unpartitioned projection.
    pub fn shard_of(&self, partition: u32) -> Option<Arc<Shard>> {
        let shards = self.shards();
        if self.partitioned {
            shards.into_iter().find(|s| s.partition == Some(partition))
        } else {
            shards.into_iter().next()
        }
    }

    /// A fresh instance of the plugin for a shard taken on, from the version last deployed.
    pub(super) fn another_handler(&self) -> Option<Box<dyn Handler>> {
        self.template.lock().expect("template lock").as_ref().and_then(|t| t.another())
    }

    /// Keep `handler` as the version new shards are made from.
    pub(super) fn set_template(&self, handler: Box<dyn Handler>) {
        *self.template.lock().expect("template lock") = Some(handler);
    }

    /// The schema-version of the plugin new shards are made from.
    pub(super) fn template_schema_version(&self) -> Option<u32> {
        self.template.lock().expect("template lock").as_ref().map(|t| t.manifest().schema_version)
    }

    /// Keep `handler` as the version new shards are made from once
    /// generation `number` is live.
    pub(super) fn set_next_template(&self, number: u64, handler: Box<dyn Handler>) {
        *self.next_template.lock().expect("template lock") = Some((number, handler));
    }

    /// Whether the version generation `number` is built with is kept here.
    pub(super) fn has_next_template(&self, number: u64) -> bool {
        self.next_template.lock().expect("template lock").as_ref().is_some_and(|(n, _)| *n == number)
    }

    /// Generation `switched` is live everywhere: the version it was built
    /// with becomes the one new shards are made from.
    pub(super) fn switched_to(&self, switched: u64) {
        let mut next = self.next_template.lock().expect("template lock");
        if next.as_ref().is_some_and(|(n, _)| *n <= switched) {
            let (_, handler) = next.take().expect("checked above");
            self.set_template(handler);
        }
    }

    /// Run `shard` here too (it was taken on).
    pub(super) fn insert_shard(&self, shard: Arc<Shard>) {
        insert(&self.shards, shard);
    }

    /// Stop running shard `n` here (it moved away); its files stay, a copy
    /// that catches up if it comes back.
    pub(super) fn remove_shard(&self, n: u32) -> Option<Arc<Shard>> {
        remove(&self.shards, n)
    }

    /// The shards this instance keeps warm for others, in partition order.
    pub fn standbys(&self) -> Vec<Arc<Shard>> {
        self.standbys.read().expect("standbys lock").clone()
    }

    pub(super) fn insert_standby(&self, shard: Arc<Shard>) {
        insert(&self.standbys, shard);
    }

    pub(super) fn remove_standby(&self, n: u32) -> Option<Arc<Shard>> {
        remove(&self.standbys, n)
    }

    /// The id the API shows for dead letter `local` of `shard`.
    pub fn dead_letter_id(shard: &Shard, local: u64) -> u64 {
        dead_letter_id(shard.partition, local)
    }

    /// Where a listing of dead letters after the API's id `after` starts in
    /// `shard` (its own ids after the one returned); `None` when every id
    /// of the shard comes before `after`.
    pub fn dead_letters_after(shard: &Shard, after: u64) -> Option<u64> {
        let first = dead_letter_id(shard.partition, 0);
        let last = dead_letter_id(shard.partition, (1 << DEAD_LETTER_SHARD_BITS) - 1);
        (after < last).then(|| after.saturating_sub(first))
    }

    /// The shard number of the dead letter the API calls `id`, and its id there.
    pub fn dead_letter_shard(id: u64) -> Option<(u32, u64)> {
        split_dead_letter_id(id)
    }

    /// Stop every shard's generations after their current batch, and wait for them.
    pub(super) fn stop(&self) {
        self.removed.store(true, Ordering::Relaxed);
        let _starting = self.starting.lock().expect("starting lock");
        for shard in self.standbys() {
            shard.live().stop();
        }
        for shard in self.shards() {
            if let Some(job) = shard.rebuild() {
                // Stopped where it is; it resumes when the projection is added again.
                job.generation.stop();
            }
            shard.live().stop();
        }
    }

    /// Ask every shard's live generation to stop, without waiting.
    pub(super) fn ask_to_stop(&self) {
        for shard in self.shards().into_iter().chain(self.standbys()) {
            shard.live().ask_to_stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_ids_name_their_shard_and_stay_exact_in_json() {
        assert_eq!(dead_letter_id(None, 17), 17);
        assert_eq!(dead_letter_id(Some(0), 17), 17);
        let id = dead_letter_id(Some(3), 17);
        assert_eq!(id, (3 << 40) | 17);
        assert_eq!(split_dead_letter_id(id), Some((3, 17)));
        assert_eq!(split_dead_letter_id(17), Some((0, 17)));
        assert!(dead_letter_id(Some(8191), (1 << 40) - 1) < 1 << 53);
        // Shard by shard: one `after` cursor pages through every shard.
        assert!(dead_letter_id(Some(0), 1 << 39) < dead_letter_id(Some(1), 1));
    }
}
