//! The on-disk cache of compiled components.
//!
//! Compiling a large component (a Python or JavaScript plugin is 12–18 MB)
//! takes Cranelift tens of seconds; loading its compiled artifact takes
//! milliseconds. Entries are keyed by the SHA-256 of the wasm and by the
//! engine's compatibility hash, and written only by this process (temp file +
//! rename). Each ends with an HMAC-SHA-256 of the artifact under a secret
//! kept beside the cache (`<data-dir>/cache/secret`, 0600; the directories
//! 0700), checked before the artifact is handed to `Component::deserialize`:
//! a truncated or corrupted entry is discarded and recompiled, never loaded,
//! and so is one written by anyone who does not hold the secret (a
//! deserialized artifact is native code). Bytes from users are only ever
//! *compiled*, never deserialized.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::telemetry::CacheCounters;

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
    /// The key of the entries' HMAC.
    secret: [u8; 32],
    counters: CacheCounters,
}

/// HMAC-SHA-256 (RFC 2104) of `message` under `key`.
fn hmac(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let inner = Sha256::new().chain_update(block.map(|b| b ^ 0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(block.map(|b| b ^ 0x5c)).chain_update(inner).finalize().into()
}

/// The cache's secret in `file`, made (32 bytes from the OS, mode 0600) when missing.
fn secret(file: &Path) -> std::io::Result<[u8; 32]> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(file) {
        Ok(mut created) => {
            std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
            created.write_all(&key)?;
            created.sync_all()?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(file)?;
            key = bytes.try_into().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a 32-byte secret; delete it (and the cache) to make a new one", file.display()),
                )
            })?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// Feeds what a `Hash` impl writes into SHA-256, so that the same engine
/// always gives the same key (`DefaultHasher`'s output may change between
/// Rust releases).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Unused: the key is the digest, taken once everything is written.
    fn finish(&self) -> u64 {
        0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A component's content hash (SHA-256, lowercase hex): its compile-cache
/// key, and the name a dead letter gives the component that failed.
pub fn digest(wasm: &[u8]) -> String {
    hex(&Sha256::digest(wasm))
}

impl CompileCache {
    /// A cache in `dir` for components compiled by `engine`.
    /// The secret lives in `dir`'s parent (`<data-dir>/cache`), both 0700.
    pub fn new(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        let parent = dir.parent().unwrap_or(dir);
        for d in [parent, dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
        }
        let secret = secret(&parent.join("secret"))?;
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hex(&hasher.0.finalize()[..8]);
        let cache = CompileCache {
            dir: dir.to_owned(),
            engine: engine.clone(),
            engine_key,
            secret,
            counters: CacheCounters::default(),
        };
        cache.remove_stale();
        Ok(cache)
    }

    /// Remove entries another engine compiled (an earlier Refract or
    /// wasmtime, other settings): this one can never load them.
    fn remove_stale(&self) {
        let ours = format!("-{}.cwasm", self.engine_key);
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".cwasm") && !name.ends_with(&ours) {
                tracing::info!(entry = %name, "removing a compiled component another engine made");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn path_for(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}-{}.cwasm", self.engine_key))
    }

    /// Hits and misses since the cache was opened.
    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    /// The compiled form of `wasm`: from the cache, or compiled and cached.
    pub fn load(&self, wasm: &[u8]) -> wasmtime::Result<(Component, CacheOutcome)> {
        self.load_digested(wasm, &digest(wasm))
    }

    /// [`CompileCache::load`] for a caller that already has `wasm`'s [`digest`].
    pub fn load_digested(&self, wasm: &[u8], digest: &str) -> wasmtime::Result<(Component, CacheOutcome)> {
        let path = self.path_for(digest);
        if let Some(component) = self.read_entry(&path) {
            self.counters.hit();
            return Ok((component, CacheOutcome::Hit));
        }
        self.counters.miss();
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
            let (artifact, mac) = bytes.split_at(bytes.len() - 32);
            // Compared in full whatever the first difference (no timing hint).
            hmac(&self.secret, artifact).iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        };
        if !valid {
            tracing::warn!(path = %path.display(), "discarding a corrupt or foreign compile-cache entry");
            let _ = std::fs::remove_file(path);
            return None;
        }
        // SAFETY: the artifact was produced by `Component::serialize` in
        // `write_entry`, for an engine with the same compatibility hash: its
        // HMAC matches, and only this data directory's secret makes one.
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
        let mac = hmac(&self.secret, &bytes);
        bytes.extend_from_slice(&mac);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry is loaded only with the HMAC this data directory's secret
    /// makes: one that carries a plain SHA-256 (anyone can compute it) is
    /// discarded and the component compiled again. The directories are the
    /// owner's alone.
    #[test]
    fn entries_without_the_secret_s_mac_are_never_loaded() {
        use std::os::unix::fs::PermissionsExt;
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("cache").join("compiled");
        let engine = super::super::engine::new_engine().unwrap();
        let cache = CompileCache::new(&dir, &engine).unwrap();
        let wasm = b"\0asm\x0d\0\x01\0"; // an empty component
        assert_eq!(cache.load(wasm).unwrap().1, CacheOutcome::Miss);
        assert_eq!(cache.load(wasm).unwrap().1, CacheOutcome::Hit);
        for d in [data.path().join("cache"), dir.clone()] {
            assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        }
        let secret = data.path().join("cache").join("secret");
        assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600);

        // A forged entry: a serialized artifact with an unkeyed checksum.
        let path = cache.path_for(&digest(wasm));
        let mut forged = Component::new(&engine, wasm).unwrap().serialize().unwrap();
        let checksum = Sha256::digest(&forged);
        forged.extend_from_slice(&checksum);
        std::fs::write(&path, &forged).unwrap();
        assert_eq!(cache.load(wasm).unwrap().1, CacheOutcome::Miss, "a forged entry was loaded");
        // Another instance over the same data directory shares the secret.
        let again = CompileCache::new(&dir, &engine).unwrap();
        assert_eq!(again.load(wasm).unwrap().1, CacheOutcome::Hit);
    }

    /// The engine's part of an entry's name is the same in every process
    /// (not a `DefaultHasher`'s), and entries another engine compiled are
    /// removed, since this one never loads them.
    #[test]
    fn the_engine_key_is_stable_and_other_engines_entries_are_removed() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("cache").join("compiled");
        let engine = super::super::engine::new_engine().unwrap();
        let cache = CompileCache::new(&dir, &engine).unwrap();
        let wasm = b"\0asm\x0d\0\x01\0";
        cache.load(wasm).unwrap();
        let ours = cache.path_for(&digest(wasm));
        let theirs = dir.join("0123-0011223344556677.cwasm");
        std::fs::write(&theirs, b"compiled by another engine").unwrap();
        let again = CompileCache::new(&dir, &engine).unwrap();
        assert_eq!(again.engine_key, cache.engine_key);
        assert_eq!(again.engine_key.len(), 16);
        assert!(ours.exists() && !theirs.exists());
        assert_eq!(again.load(wasm).unwrap().1, CacheOutcome::Hit);
    }
}
