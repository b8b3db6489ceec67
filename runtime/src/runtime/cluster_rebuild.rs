//! Rebuilds of a partitioned projection across a cluster, through the
//! control topic: asked for (`rebuild/<p>`), carried out on every copy of
//! every shard by each instance's activity thread, switched together
//! (`switch/<p>`), cancelled; and copies started later, which begin at the
//! generation the cluster switched to. The single-instance rebuild, and the
//! monitor that switches each copy, are `Runtime::rebuild` and
//! `crate::rebuild`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;

use super::{Projection, RebuildError, Runtime, Shard};
use crate::clock::now_ms;
use crate::generation;
use crate::plugin::Handler;
use crate::rebuild;

impl Runtime {
    /// Ask every instance of the cluster to rebuild `p` into its next
    /// generation, with the plugin of `schema_version` (default: the one
    /// running). The instances' activity threads carry it out
    /// ([`Runtime::follow_cluster_rebuild`]). A new version of the plugin
    /// (`schema_version` given) joins the rebuild already asked for with
    /// its schema-version: it is dropped on each instance, and each asks;
    /// any other request while one runs is refused, as on one instance.
    pub(super) fn ask_cluster_rebuild(&self, p: &Projection, schema_version: Option<u32>) -> Result<u64, RebuildError> {
        let cluster = self.membership.get().ok_or_else(|| {
            RebuildError::Unavailable("this instance has not joined the cluster yet; try again in a moment".into())
        })?;
        let m = p.manifest();
        self.read_control_topic();
        if let Some(r) = cluster.pending_rebuild(&m.name) {
            return match schema_version == Some(r.schema_version) {
                true => Ok(r.generation),
                false => Err(RebuildError::Running(r.generation)),
            };
        }
        let schema_version = schema_version.unwrap_or(m.schema_version);
        // Past any cancelled one too: its files may still be on a stopped copy.
        let asked = cluster.rebuild(&m.name).map_or(0, |r| r.generation);
        let generation = asked.max(cluster.switched(&m.name)) + 1;
        let request =
            rebuild::ClusterRebuild { generation, schema_version, cancelled: false, by: cluster.me(), at: now_ms() };
        cluster.request_rebuild(&m.name, &request).map_err(RebuildError::Unavailable)?;
        tracing::info!(projection = %m.name, generation, schema_version, "rebuild asked of every instance of the cluster");
        Ok(generation)
    }

    /// Carry out what the control topic says of `p`'s rebuild across the
    /// cluster, for the copies of its shards here (run every second by the
    /// activity thread): start rebuilding each copy (active or standby)
    /// once this instance's plugin file declares the schema-version asked
    /// for, cancel on a cancel, and say that every shard switches once
    /// every shard's active copy has caught up (any instance may: they
    /// write the same). Standby copies older than the generation switched
    /// to are dropped, to start again at it.
    pub(super) fn follow_cluster_rebuild(&self, p: &Arc<Projection>) {
        let Some(cluster) = self.membership.get() else { return };
        let name = p.manifest().name;
        let switched = cluster.switched(&name);
        p.switched_to(switched);
        let stale: Vec<u32> = p
            .standbys()
            .iter()
            .filter(|s| s.live().number < switched && s.rebuild().is_none())
            .map(|s| s.number())
            .collect();
        for n in stale {
            tracing::info!(projection = %name, shard = n, generation = switched, "a standby copy of an older generation; starting it again");
            self.drop_standby(p, n);
        }
        let Some(asked) = cluster.rebuild(&name) else { return };
        let _starting = p.starting.lock().expect("starting lock");
        let copies: Vec<Arc<Shard>> = p.shards().into_iter().chain(p.standbys()).collect();
        if asked.cancelled || asked.generation <= switched {
            for n in (0..p.shard_count()).filter(|_| asked.cancelled) {
                match copies.iter().find(|s| s.number() == n).and_then(|s| s.rebuild()) {
                    Some(job) if job.generation.number == asked.generation => {
                        if !job.switching.load(Ordering::Relaxed) {
                            job.cancel();
                        }
                    }
                    Some(_) => {}
                    // A copy not rebuilding here now (stopped while it
                    // rebuilt: a standby dropped, an instance stopped): what it built goes.
                    None => {
                        let root = self.shard_root(&name, n);
                        if let Ok((_, Some(r))) = generation::numbers(&root)
                            && r == asked.generation
                        {
                            generation::abandon_rebuild(&root, r);
                        }
                    }
                }
            }
            return;
        }
        let waiting: Vec<&Arc<Shard>> = copies
            .iter()
            .filter(|shard| match shard.rebuild() {
                Some(job) if job.generation.number == asked.generation => false,
                // An older request's (cancelled while this instance was away).
                Some(job) => {
                    job.cancel();
                    false
                }
                None => shard.live().number < asked.generation,
            })
            .collect();
        if !waiting.is_empty() || !p.has_next_template(asked.generation) {
            // The version this instance's plugin file holds now builds the
            // generation here, and its shards taken on after the switch.
            let handler = match self.loader.get().map(|l| l.load(Path::new(&p.source))) {
                Some(Ok(h)) if h.manifest().schema_version == asked.schema_version => h,
                _ => {
                    tracing::debug!(projection = %name, generation = asked.generation, "the rebuild waits for this instance's plugin file to declare schema-version {}", asked.schema_version);
                    return;
                }
            };
            if let Some(template) = handler.another() {
                p.set_next_template(asked.generation, template);
            }
            for shard in waiting {
                let Some(handler) = handler.another() else { continue };
                let barrier = Arc::new(rebuild::ClusterSwitch {
                    switches: cluster.clone(),
                    projection: name.clone(),
                    generation: asked.generation,
                });
                // A rebuild this copy was making before a restart goes on from where it was.
                let resumed = generation::numbers(&shard.root).is_ok_and(|(_, r)| r == Some(asked.generation));
                if !resumed {
                    generation::delete(&shard.root, asked.generation);
                }
                match self.start_rebuild(p, shard, handler, asked.generation, barrier, false) {
                    Ok(()) => {
                        tracing::info!(projection = %name, shard = shard.number(), generation = asked.generation, resumed, "rebuilding this copy of the shard")
                    }
                    Err(e) => {
                        tracing::error!(projection = %name, shard = shard.number(), error = format!("{e:#}"), "starting a shard's rebuild")
                    }
                }
            }
        }
        let count = p.shard_count();
        if (0..count).all(|n| cluster.caught_up(&name, n, asked.generation)) {
            match cluster.switch(&name, asked.generation) {
                Ok(()) => {
                    tracing::info!(projection = %name, generation = asked.generation, "every shard has caught up: all switch")
                }
                Err(e) => tracing::warn!(projection = %name, error = %e, "telling the shards to switch; retrying"),
            }
        }
    }

    /// Make `root`, where a copy of shard of `name` is about to start, hold
    /// the generation the cluster has switched to: files of an older one
    /// (this instance was away during a rebuild) are deleted, and the copy
    /// is restored afresh at that generation.
    pub(super) fn align_with_cluster(&self, p: &Projection, root: &Path) -> anyhow::Result<()> {
        let name = &p.manifest().name;
        // The cluster's generation is known once this instance has joined
        // and read the control topic (a shard can be assigned before).
        let until = std::time::Instant::now() + Duration::from_secs(30);
        let cluster = loop {
            match self.membership.get() {
                Some(cluster) => break cluster,
                None if std::time::Instant::now() < until && !self.stop.load(Ordering::Relaxed) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                None => anyhow::bail!("this instance has not joined the cluster; the shard cannot start"),
            }
        };
        self.read_control_topic();
        let switched = cluster.switched(name);
        // The copy starts with the version the cluster's generation was built with.
        p.switched_to(switched);
        if let Some(asked) = cluster.rebuild(name).filter(|r| r.generation == switched && !r.cancelled)
            && let Some(declared) = p.template_schema_version()
            && declared != asked.schema_version
        {
            anyhow::bail!(
                "the cluster runs generation {switched} of {name}, built with schema-version {}, and this instance's plugin declares {declared}: install the same version on every instance",
                asked.schema_version
            );
        }
        let (live, _) =
            generation::numbers(root).with_context(|| format!("finding the generations in {}", root.display()))?;
        if live >= switched {
            return Ok(());
        }
        tracing::info!(projection = %name, root = %root.display(), generation = live, switched, "a copy of an older generation (or none); restoring the shard at the cluster's");
        match std::fs::remove_dir_all(root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("deleting {}", root.display()));
            }
            _ => {}
        }
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        generation::make_live(root, switched).with_context(|| format!("writing the generation in {}", root.display()))
    }

    /// Read the control topic up to its end now (at most 10 s), so that a
    /// decision sees what another instance wrote a moment ago.
    fn read_control_topic(&self) {
        if let Some(publications) = self.publications.get()
            && !publications.read_up_to_now(Duration::from_secs(10))
        {
            tracing::warn!("the control topic could not be read to its end; deciding on what was read");
        }
    }

    /// Ask every instance to stop rebuilding `p` and delete what it built,
    /// unless the shards have been told to switch.
    pub(super) fn cancel_cluster_rebuild(&self, p: &Arc<Projection>) -> Result<u64, RebuildError> {
        let cluster = self.membership.get().ok_or(RebuildError::NotRunning)?;
        let name = p.manifest().name;
        self.read_control_topic();
        let Some(asked) = cluster.pending_rebuild(&name) else {
            return match p.rebuilding() {
                Some(job) => Err(RebuildError::Switching(job.generation.number)),
                None => Err(RebuildError::NotRunning),
            };
        };
        let cancel = rebuild::ClusterRebuild { cancelled: true, at: now_ms(), by: cluster.me(), ..asked };
        cluster.request_rebuild(&name, &cancel).map_err(RebuildError::Unavailable)?;
        self.follow_cluster_rebuild(p);
        Ok(cancel.generation)
    }
}
