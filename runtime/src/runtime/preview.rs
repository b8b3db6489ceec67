//! Previews: another version of a projection's plugin built beside the
//! live one, compared with it, then promoted (the rebuild's own switch) or
//! discarded.
//!
//! A preview is a rebuild that does not switch by itself
//! ([`crate::rebuild::Rebuild::promote`]); its component is kept as
//! `projections/<name>/preview.wasm`, so that a restart resumes it with the
//! same version. Promoting makes that component the projection's plugin
//! file (as an upload would) before the switch, so that a restart after it
//! runs the version the read model was built with.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Projection, RebuildError, Runtime};
use crate::generation;
use crate::plugin::Handler;
use crate::store::diff::{self, TableDiff};

/// `GET /v1/projections/{p}/preview/diff`: what promoting the preview would change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviewDiff {
    pub projection: String,
    /// The preview's generation, and the live one it is compared with.
    pub generation: u64,
    pub live_generation: u64,
    /// The plugin versions (`version` of each manifest).
    pub live_version: String,
    pub preview_version: String,
    /// Events the live generation and the preview had handled when they
    /// were read (sums of their checkpoints).
    pub live_position: u64,
    pub preview_position: u64,
    /// The preview had handled every event the live generation had: the
    /// counts are what promoting would change. Before, they also count
    /// what it has not replayed yet.
    pub caught_up: bool,
    /// Per table of either version, in name order.
    pub tables: Vec<TableDiff>,
    /// Per search index of either version: documents in each (`null`: that version has no such index).
    pub indexes: Vec<IndexCount>,
}

/// A search index's documents in the live generation and in the preview.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexCount {
    pub index: String,
    pub live: Option<u64>,
    pub preview: Option<u64>,
}

/// Most samples a diff shows of each kind per table.
pub const MAX_SAMPLES: usize = 100;

/// How long discarding waits for the rebuild monitors to delete what they built.
const DISCARD_WAIT: Duration = Duration::from_secs(30);

impl Runtime {
    /// Build generation `n + 1` of `name` with `component` (default: its
    /// plugin file again) beside the live one, as a preview: it never
    /// switches by itself and emits nothing. Returns its number.
    pub fn preview(&self, name: &str, component: Option<Vec<u8>>) -> Result<u64, RebuildError> {
        let p = self.projection(name).ok_or(RebuildError::NotFound)?;
        if p.is_partitioned() && self.shards_by_group {
            return Err(RebuildError::PreviewInCluster);
        }
        let loader = self.loader.get().ok_or_else(|| RebuildError::Invalid("no plugin loader".into()))?;
        let bytes = match component {
            Some(bytes) => bytes,
            None => {
                std::fs::read(&p.source).map_err(|e| RebuildError::Invalid(format!("reading {}: {e}", p.source)))?
            }
        };
        let label = format!("preview of {name}");
        let plugin = loader.load_bytes(&bytes, &label).map_err(RebuildError::Invalid)?;
        let (m, live) = (plugin.manifest().clone(), p.manifest());
        if m.name != live.name {
            return Err(RebuildError::Invalid(format!(
                "the component provides projection {:?}, not {:?}",
                m.name, live.name
            )));
        }
        if plugin.kind() != p.kind() {
            return Err(RebuildError::Invalid(format!(
                "the component provides {:?} as {:?}, not {:?}",
                m.name,
                plugin.kind(),
                p.kind()
            )));
        }
        crate::plugin::validate_manifest(&m).map_err(RebuildError::Invalid)?;
        crate::plugin::declared(&plugin).map_err(RebuildError::Invalid)?;
        let _starting = p.starting.lock().expect("starting lock");
        // Before the component is kept: a refused preview writes nothing.
        super::not_rebuilding(&p)?;
        // Kept before the preview is marked: a restart finds it.
        let kept = self.preview_component(name);
        crate::data_dir::replace_durably(&kept, &bytes)
            .map_err(|e| RebuildError::Storage(format!("keeping the component in {}: {e}", kept.display())))?;
        let number = self.start_rebuild_locked(&p, Some(Box::new(plugin)), true).inspect_err(|_| {
            let _ = std::fs::remove_file(&kept);
        })?;
        tracing::info!(projection = name, generation = number, version = %m.version, "preview started");
        Ok(number)
    }

    /// Compare the preview of `name` with the live generation, table by
    /// table (shard by shard, added up), keeping `samples` keys of each kind.
    pub fn preview_diff(&self, name: &str, samples: usize) -> Result<PreviewDiff, RebuildError> {
        let p = self.projection(name).ok_or(RebuildError::NotFound)?;
        let samples = samples.min(MAX_SAMPLES);
        let pairs: Vec<_> = p
            .shards()
            .into_iter()
            .filter_map(|s| s.rebuild().filter(|r| r.is_preview()).map(|r| (s.live(), r.generation.clone())))
            .collect();
        let Some((first_live, first_preview)) = pairs.first().cloned() else {
            return Err(RebuildError::NoPreview);
        };
        let (live_m, preview_m) = (first_live.manifest(), first_preview.manifest());
        let mut tables: Vec<String> = live_m.tables.iter().chain(&preview_m.tables).cloned().collect();
        tables.sort();
        tables.dedup();
        let mut indexes: Vec<String> =
            first_live.indexes.open.keys().chain(first_preview.indexes.open.keys()).cloned().collect();
        indexes.sort();
        indexes.dedup();
        let mut out = PreviewDiff {
            projection: name.to_owned(),
            generation: first_preview.number,
            live_generation: first_live.number,
            live_version: live_m.version.clone(),
            preview_version: preview_m.version.clone(),
            live_position: 0,
            preview_position: 0,
            caught_up: true,
            tables: tables.iter().map(|t| TableDiff { table: t.clone(), ..TableDiff::default() }).collect(),
            indexes: indexes.iter().map(|i| IndexCount { index: i.clone(), live: None, preview: None }).collect(),
        };
        for (live, preview) in &pairs {
            let compared = diff::compare(&live.read_model, &preview.read_model, &tables, samples)
                .map_err(|e| RebuildError::Invalid(format!("comparing the generations: {e}")))?;
            out.live_position += compared.live.values().sum::<u64>();
            out.preview_position += compared.preview.values().sum::<u64>();
            out.caught_up &= compared.live.iter().all(|(k, v)| compared.preview.get(k).copied().unwrap_or(0) >= *v);
            for (whole, shard) in out.tables.iter_mut().zip(compared.tables) {
                whole.merge(shard, samples);
            }
            for count in &mut out.indexes {
                let docs = |g: &generation::Generation| {
                    g.indexes.open.get(&count.index).map(|i| i.reader.searcher().num_docs())
                };
                if let Some(n) = docs(live) {
                    count.live = Some(count.live.unwrap_or(0) + n);
                }
                if let Some(n) = docs(preview) {
                    count.preview = Some(count.preview.unwrap_or(0) + n);
                }
            }
        }
        Ok(out)
    }

    /// Make the preview of `name` the live generation: its component
    /// becomes the projection's plugin file, and it switches as a rebuild
    /// does once it has caught up (zero downtime). Returns its number.
    pub fn promote_preview(&self, name: &str) -> Result<u64, RebuildError> {
        let p = self.projection(name).ok_or(RebuildError::NotFound)?;
        let _starting = p.starting.lock().expect("starting lock");
        let jobs = p.rebuilds();
        let job = jobs.first().filter(|j| j.is_preview()).ok_or(RebuildError::NoPreview)?;
        let number = job.generation.number;
        let kept = self.preview_component(name);
        // Not promoted yet (a second request finds the switch under way).
        if jobs.iter().any(|j| j.held()) {
            let bytes = std::fs::read(&kept).map_err(|e| {
                RebuildError::Invalid(format!("the preview's component cannot be read from {}: {e}", kept.display()))
            })?;
            self.write_plugin_file(std::path::Path::new(&p.source), &bytes).map_err(RebuildError::Storage)?;
            for shard in p.shards() {
                generation::unmark_preview(&shard.root)
                    .map_err(|e| RebuildError::Storage(format!("recording the promotion: {e}")))?;
            }
            let _ = std::fs::remove_file(&kept);
            tracing::info!(projection = name, generation = number, plugin = %p.source, "preview promoted: its component is now the plugin file");
        }
        for job in &jobs {
            job.promote();
        }
        Ok(number)
    }

    /// Stop the preview of `name` and delete what it built; returns once it
    /// is gone from disk (or after 30 s, still deleting).
    pub fn discard_preview(&self, name: &str) -> Result<u64, RebuildError> {
        let p = self.projection(name).ok_or(RebuildError::NotFound)?;
        match p.rebuilding() {
            Some(r) if r.is_preview() => {}
            _ => return Err(RebuildError::NoPreview),
        }
        let number = self.cancel_rebuild(name)?;
        let until = Instant::now() + DISCARD_WAIT;
        while !p.rebuilds().is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::info!(projection = name, generation = number, "preview discarded");
        Ok(number)
    }

    /// Where the component a preview of `name` runs is kept.
    pub(super) fn preview_component(&self, name: &str) -> PathBuf {
        self.data_dir.join("projections").join(name).join("preview.wasm")
    }

    /// Delete the kept component of `p`'s preview: none is open.
    pub(super) fn forget_preview_component(&self, p: &Projection) {
        let _ = std::fs::remove_file(self.preview_component(&p.manifest().name));
    }
}
