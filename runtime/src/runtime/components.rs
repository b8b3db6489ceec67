//! The plugin components that dead letters name, kept by content hash
//! (`<data-dir>/components/<sha256>.wasm`): a dead letter is reproduced with
//! the exact component that failed on it, whatever runs now. Every component
//! the runtime loads is kept; at start, those no dead letter names and no
//! plugin file holds are removed.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::{Runtime, Shard};
use crate::plugin::trace::HostCall;
use crate::plugin::{Event, HandleError, Handler};
use std::sync::Arc;

pub(super) struct Components {
    dir: PathBuf,
}

impl Components {
    pub(super) fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Components { dir })
    }

    /// Where `projection`'s component `digest` is kept: under its
    /// projection, so that a start sweeps only the components of the
    /// projections it runs (one whose plugin was removed keeps its data,
    /// and its dead letters their components).
    fn path(&self, projection: &str, digest: &str) -> Option<PathBuf> {
        let valid = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        let named = crate::names::validate("projection", projection).is_ok();
        (valid && named).then(|| self.dir.join(projection).join(format!("{digest}.wasm")))
    }

    /// Keep `projection`'s component `bytes`, whose content hash is
    /// `digest` (`plugin::cache::digest`), once per content.
    pub(super) fn keep(&self, projection: &str, digest: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path(projection, digest).ok_or_else(|| std::io::Error::other("not a projection name"))?;
        if !path.exists() {
            std::fs::create_dir_all(path.parent().expect("a component is in its projection's directory"))?;
            crate::data_dir::replace_durably(&path, bytes)?;
        }
        Ok(())
    }

    /// `projection`'s component kept under `digest`, if it is.
    pub(super) fn read(&self, projection: &str, digest: &str) -> std::io::Result<Option<Vec<u8>>> {
        let Some(path) = self.path(projection, digest) else { return Ok(None) };
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Remove every component of `projection` but those in `keep`; how many went.
    pub(super) fn sweep(&self, projection: &str, keep: &BTreeSet<String>) -> std::io::Result<usize> {
        let entries = match std::fs::read_dir(self.dir.join(projection)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for entry in entries {
            let path = entry?.path();
            let digest = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if path.extension().is_some_and(|e| e == "wasm") && !keep.contains(digest) {
                std::fs::remove_file(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Runtime {
    /// `projection`'s component kept under `digest`, if it is.
    pub fn component(&self, projection: &str, digest: &str) -> std::io::Result<Option<Vec<u8>>> {
        match self.loader.get() {
            Some(loader) => loader.components.read(projection, digest),
            None => Ok(None),
        }
    }

    /// Hand `event` to the component `bytes` (configured as its projection
    /// is) over `shard`'s live read model, tracing, in a batch that is never
    /// committed: what it read and how it ended. A dead letter's
    /// reproduction.
    pub fn reproduce(&self, shard: &Shard, event: Event, bytes: &[u8]) -> Result<Reproduced, String> {
        let loader = self.loader.get().ok_or("this runtime does not load plugins")?;
        let mut plugin = loader.load_bytes(bytes, "a dead letter's reproduction")?;
        plugin.set_tracing(true);
        let declared = crate::plugin::declared(&plugin)?;
        let read_model = shard.live().read_model.clone();
        let batch = read_model.begin(Arc::new(declared), self.batch.kv, None).map_err(|e| e.to_string())?;
        let (batch, outcome) = plugin.handle(batch, std::slice::from_ref(&event));
        drop(batch); // rolled back: nothing was written
        Ok(Reproduced { calls: plugin.take_trace(), outcome })
    }

    /// Remove the components of the projections running here that none
    /// of their dead letters names and that no plugin loaded since the
    /// start is: once, after the start.
    pub(super) fn sweep_components(&self) {
        let Some(loader) = self.loader.get() else { return };
        for p in self.projections() {
            let name = p.manifest().name;
            let mut models: Vec<_> =
                p.shards().iter().chain(&p.standbys()).map(|s| s.live().read_model.clone()).collect();
            models.extend(p.rebuilds().iter().map(|r| r.generation.read_model.clone()));
            // The digests its dead letters name; all of its components stay when they cannot be read.
            let named: Result<Vec<_>, _> = models.iter().map(|m| m.dead_letters(0, usize::MAX)).collect();
            let mut keep: BTreeSet<String> = match named {
                Ok(pages) => pages.into_iter().flatten().filter_map(|(_, l)| l.plugin_digest).collect(),
                Err(e) => {
                    tracing::warn!(projection = %name, error = %e, "reading dead letters; keeping its components");
                    continue;
                }
            };
            // Under the lock a load keeps its component with: none kept meanwhile is lost.
            let loaded = loader.loaded.lock().expect("loaded lock");
            keep.extend(loaded.iter().filter(|(p, _)| *p == name).map(|(_, d)| d.clone()));
            match loader.components.sweep(&name, &keep) {
                Ok(0) => {}
                Ok(n) => tracing::info!(projection = %name, removed = n, "removed components no dead letter names"),
                Err(e) => tracing::warn!(projection = %name, error = %e, "sweeping kept components"),
            }
        }
    }
}

/// What a reproduction found: the plugin's host calls (its reads), and how
/// its call ended.
pub struct Reproduced {
    pub calls: Vec<HostCall>,
    pub outcome: Result<(), HandleError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_kept_once_by_content_under_their_projection_and_swept_unless_named() {
        let dir = tempfile::tempdir().unwrap();
        let components = Components::new(dir.path().join("components")).unwrap();
        let keep = |projection: &str, bytes: &[u8]| {
            let digest = crate::plugin::cache::digest(bytes);
            components.keep(projection, &digest, bytes).unwrap();
            digest
        };
        let (a, b) = (keep("p", b"version 1"), keep("p", b"version 2"));
        assert_eq!(keep("p", b"version 1"), a, "the same content, kept once");
        let other = keep("q", b"version 1");
        assert_eq!(components.read("p", &a).unwrap().as_deref(), Some(b"version 1".as_slice()));
        assert_eq!(components.read("p", "../../etc/passwd").unwrap(), None, "only digests name components");
        assert_eq!(components.read("..", &a).unwrap(), None, "only projection names hold them");
        assert_eq!(components.sweep("p", &BTreeSet::from([b.clone()])).unwrap(), 1);
        assert_eq!((components.read("p", &a).unwrap(), components.read("p", &b).unwrap().is_some()), (None, true));
        assert!(components.read("q", &other).unwrap().is_some(), "another projection's are left alone");
    }
}
