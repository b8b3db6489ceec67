//! A loaded projection and its shards.
//!
//! A projection's read model is one shard, in `projections/<name>/`, unless
//! it reads Kafka in `partitioned` mode: then it is split into one shard per
//! partition number of its (co-partitioned) topics, shard *n* in
//! `projections/<name>/shards/<n>/`, each with its own generations, redb
//! file, indexes, checkpoints, outbox and dead letters, so that exactly-once
//! holds per shard whoever applies it. The API reads through the shards:
//! [`Projection::shards`] for what fans out, [`Projection::whole`] for what
//! only an unpartitioned projection does (rebuilds).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::generation::Generation;
use crate::plugin::Manifest;
use crate::rebuild::Rebuild;

/// A loaded projection, as the API sees it.
pub struct Projection {
    /// Where the plugin came from: its file, or `native`.
    pub source: String,
    /// One shard, or one per partition number (in partition order).
    shards: Vec<Arc<Shard>>,
    /// Split by partition (`kafka.mode: partitioned`).
    partitioned: bool,
    /// Held while a rebuild starts or a new version is deployed: two
    /// requests at once must not both see none running and build (then
    /// switch to) the same generation, and a new version must reach
    /// whichever generation is live after a switch.
    pub(super) starting: Mutex<()>,
    /// Why the last new version of the plugin file was not swapped in.
    pub reload_error: Mutex<Option<String>>,
    /// New versions refused since the start (for `/metrics`).
    pub reload_failures: std::sync::atomic::AtomicU64,
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
}

impl Shard {
    pub(super) fn new(partition: Option<u32>, root: &Path, live: Arc<Generation>) -> Shard {
        Shard { partition, root: root.to_owned(), live: RwLock::new(live), rebuild: Mutex::new(None) }
    }

    /// The generation queries are answered from.
    pub fn live(&self) -> Arc<Generation> {
        self.live.read().expect("live lock").clone()
    }

    /// The rebuild in progress, if any.
    pub fn rebuild(&self) -> Option<Arc<Rebuild>> {
        self.rebuild.lock().expect("rebuild lock").clone()
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

impl Projection {
    pub(super) fn new(source: String, shards: Vec<Arc<Shard>>, partitioned: bool) -> Projection {
        assert!(!shards.is_empty(), "a projection has at least one shard");
        Projection {
            source,
            shards,
            partitioned,
            starting: Mutex::new(()),
            reload_error: Mutex::new(None),
            reload_failures: Default::default(),
        }
    }

    /// Its shards, in partition order (one when it is not partitioned).
    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    /// Split by partition (`kafka.mode: partitioned`)?
    pub fn is_partitioned(&self) -> bool {
        self.partitioned
    }

    /// The one shard of a projection that is not partitioned.
    pub fn whole(&self) -> Option<&Arc<Shard>> {
        (!self.partitioned).then(|| &self.shards[0])
    }

    /// The running version's manifest (every shard runs the same version).
    pub fn manifest(&self) -> Manifest {
        self.shards[0].live().manifest()
    }

    /// The shard holding `partition` of the projection's streams: the one
    /// shard of an unpartitioned projection.
    pub fn shard_of(&self, partition: u32) -> Option<&Arc<Shard>> {
        if self.partitioned {
            self.shards.iter().find(|s| s.partition == Some(partition))
        } else {
            Some(&self.shards[0])
        }
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

    /// The shard holding the dead letter the API calls `id`, and its id there.
    pub fn locate_dead_letter(&self, id: u64) -> Option<(&Arc<Shard>, u64)> {
        let (shard, local) = split_dead_letter_id(id)?;
        if self.partitioned {
            self.shard_of(shard).map(|s| (s, local))
        } else {
            (shard == 0).then(|| (&self.shards[0], local))
        }
    }

    /// Stop every shard's generations after their current batch, and wait for them.
    pub(super) fn stop(&self) {
        for shard in &self.shards {
            if let Some(job) = shard.rebuild() {
                // Stopped where it is; it resumes when the projection is added again.
                job.generation.stop();
            }
            shard.live().stop();
        }
    }

    /// Ask every shard's live generation to stop, without waiting.
    pub(super) fn ask_to_stop(&self) {
        for shard in &self.shards {
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
