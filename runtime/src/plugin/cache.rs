//! The on-disk cache of compiled components.
//!
//! Compiling a large component (a Python or JavaScript plugin is 12–18 MB)
//! takes Cranelift tens of seconds; loading its compiled artifact takes
//! milliseconds. Entries are keyed by the SHA-256 of the wasm and by the
//! engine's compatibility hash, and written only by this process (temp file +
//! rename). Each ends with the SHA-256 of the artifact, checked before the
//! artifact is handed to `Component::deserialize`: a truncated or corrupted
//! entry is discarded and recompiled, never loaded. Bytes from users are only
//! ever *compiled*, never deserialized.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Whether a load found its compiled artifact in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
}

/// Compiled components on disk.
pub struct CompileCache {
    dir: PathBuf,
    engine: Engine,
    engine_key: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl CompileCache {
    /// A cache in `dir` for components compiled by `engine`.
    pub fn new(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());
        Ok(CompileCache { dir: dir.to_owned(), engine: engine.clone(), engine_key })
    }

    fn path_for(&self, wasm: &[u8]) -> PathBuf {
        let digest = Sha256::digest(wasm);
        self.dir.join(format!("{}-{}.cwasm", hex(&digest), self.engine_key))
    }

    /// The compiled form of `wasm`: from the cache, or compiled and cached.
    pub fn load(&self, wasm: &[u8]) -> wasmtime::Result<(Component, CacheOutcome)> {
        let path = self.path_for(wasm);
        if let Some(component) = self.read_entry(&path) {
            crate::metrics::COMPILE_CACHE.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok((component, CacheOutcome::Hit));
        }
        crate::metrics::COMPILE_CACHE.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        // A 12–18 MB component (Python, JavaScript) takes Cranelift 20 s or so:
        // say so, since it happens once and then loads from the cache.
        tracing::info!(
            bytes = wasm.len(),
            "compiling a component not in the compile cache (once; later loads take milliseconds)"
        );
        // Cranelift reports no progress of its own: say every 5 s that it is still at it.
        let (done, ticks) = std::sync::mpsc::channel::<()>();
        let component = std::thread::scope(|scope| {
            scope.spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    ticks.recv_timeout(std::time::Duration::from_secs(5))
                {
                    tracing::info!(bytes = wasm.len(), elapsed_s = started.elapsed().as_secs(), "still compiling");
                }
            });
            let component = Component::new(&self.engine, wasm);
            drop(done);
            component
        })?;
        tracing::info!(bytes = wasm.len(), elapsed_ms = started.elapsed().as_millis() as u64, "compiled component");
        if let Err(e) = self.write_entry(&path, &component) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the compile cache");
        }
        Ok((component, CacheOutcome::Miss))
    }

    fn read_entry(&self, path: &Path) -> Option<Component> {
        let bytes = std::fs::read(path).ok()?;
        let valid = bytes.len() > 32 && {
            let (artifact, checksum) = bytes.split_at(bytes.len() - 32);
            Sha256::digest(artifact).as_slice() == checksum
        };
        if !valid {
            tracing::warn!(path = %path.display(), "discarding a corrupt compile-cache entry");
            let _ = std::fs::remove_file(path);
            return None;
        }
        // SAFETY: the artifact was produced by `Component::serialize` in
        // `write_entry` (this cache's directory is written by nothing else),
        // for an engine with the same compatibility hash, and its checksum
        // matches, so it is the bytes we wrote.
        match unsafe { Component::deserialize(&self.engine, &bytes[..bytes.len() - 32]) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding an unusable compile-cache entry");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    fn write_entry(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        let mut bytes = component.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
        let checksum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&checksum);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}
