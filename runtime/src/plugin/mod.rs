//! Plugins: compiling, caching, instantiating and calling WebAssembly components.
//!
//! A [`Handler`] is what the projector drives: a WebAssembly component
//! ([`wasm::WasmPlugin`]) or, for baselines and tests, a plugin written
//! with the Rust SDK and compiled into the host (`native::NativeProjection`,
//! `native::NativeEnricher`). It is a projection or an enricher ([`Kind`]);
//! the projector runs both the same way, since an enricher's outputs are
//! events it emits (see [`route`]).

pub mod cache;
pub mod engine;
pub mod host;
pub mod keyed;
#[cfg(any(test, feature = "native"))]
pub mod native;
pub mod route;
pub mod trace;
pub mod wasm;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use crate::wit::{Event, IndexMapping, KeyedTable, LookupError, Manifest};

use crate::store::Batch;

/// What a plugin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Turns events into a read model (tables, search indexes).
    Projection,
    /// Turns events into events, routed to streams.
    Enricher,
}

/// Read access to other projections' committed tables (the `lookup` interface).
pub trait Lookup: Send + Sync {
    /// The value under `key` in `table` of `projection`, if any.
    fn get(&self, projection: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, LookupFailure>;
}

/// Why a lookup returned no answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupFailure {
    /// The plugin asked for something that does not exist: it gets the
    /// `lookup-error` and decides (usually, a transient failure: wait for it).
    #[error("lookup refused: {0:?}")]
    Refused(LookupError),
    /// The host could not read (storage, shutdown): a host error, and the
    /// batch is retried.
    #[error("{0}")]
    Host(String),
}

/// A [`Lookup`] with no projections behind it (benchmarks, unit tests).
pub struct NoLookup;

impl Lookup for NoLookup {
    fn get(&self, projection: &str, _: &str, _: &str) -> Result<Option<Vec<u8>>, LookupFailure> {
        Err(LookupFailure::Refused(LookupError::UnknownProjection(format!("no projection {projection:?} is running"))))
    }
}

/// What a plugin reaches beyond its batch: other projections' tables and
/// its settings from `refract.yaml`.
#[derive(Clone)]
pub struct Environment {
    pub lookup: Arc<dyn Lookup>,
    pub settings: Arc<BTreeMap<String, String>>,
}

impl Default for Environment {
    fn default() -> Self {
        Environment { lookup: Arc::new(NoLookup), settings: Arc::default() }
    }
}

/// Why a batch was not handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleError {
    /// The plugin said an event can never be handled.
    Rejected(String),
    /// The plugin asked for a retry.
    Transient(String),
    /// The plugin trapped: panicked, ran past its deadline or its memory cap.
    Trap(String),
    /// The host failed (storage error, instantiation failure): not the plugin's fault.
    Host(String),
}

impl std::fmt::Display for HandleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandleError::Rejected(m) => write!(f, "rejected: {m}"),
            HandleError::Transient(m) => write!(f, "transient: {m}"),
            HandleError::Trap(m) => write!(f, "trap: {m}"),
            HandleError::Host(m) => write!(f, "host error: {m}"),
        }
    }
}

/// A loaded projection the projector can feed batches to.
pub trait Handler: Send {
    /// What the plugin declared when it was loaded.
    fn manifest(&self) -> &Manifest;

    /// A projection or an enricher.
    fn kind(&self) -> Kind {
        Kind::Projection
    }

    /// The search indexes the plugin declared (none for plain projections).
    fn indexes(&self) -> &[IndexMapping] {
        &[]
    }

    /// The tables the plugin declared keyed like its events (none for a
    /// component built before WIT 0.1.1).
    fn keyed_tables(&self) -> &[KeyedTable] {
        &[]
    }

    /// Handle `events` against `batch`, handing the batch back for commit or rollback.
    fn handle(&mut self, batch: Batch, events: &[Event]) -> (Batch, Result<(), HandleError>);

    /// The content hash of the component this handler runs, when the
    /// runtime keeps it (see `runtime::components`).
    fn component_digest(&self) -> Option<&str> {
        None
    }

    /// A fresh instance of the same plugin version, for another shard of a
    /// partitioned projection; `None` when this handler cannot make one.
    fn another(&self) -> Option<Box<dyn Handler>> {
        None
    }
}

/// The tables and compiled index mappings `handler` declared.
pub fn declared(handler: &dyn Handler) -> Result<crate::store::Declared, String> {
    let mut indexes = std::collections::BTreeMap::new();
    for mapping in handler.indexes() {
        let schema = crate::store::search::IndexSchema::new(mapping)?;
        if indexes.insert(mapping.name.clone(), schema).is_some() {
            return Err(format!("index {:?} is declared twice", mapping.name));
        }
    }
    keyed::KeyedTables::new(handler.manifest(), handler.keyed_tables())?;
    Ok(crate::store::Declared { tables: handler.manifest().tables.iter().cloned().collect(), indexes })
}

/// Check a manifest before trusting it: valid names, at least one subscription.
pub fn validate_manifest(m: &Manifest) -> Result<(), String> {
    crate::names::validate("projection", &m.name)?;
    if m.subscriptions.is_empty() {
        return Err(format!("projection {:?} subscribes to no stream", m.name));
    }
    for (i, s) in m.subscriptions.iter().enumerate() {
        crate::names::validate("stream", &s.stream)?;
        if m.subscriptions[..i].iter().any(|earlier| earlier.stream == s.stream) {
            return Err(format!(
                "projection {:?} subscribes to stream {:?} more than once; list all its event types in one subscription",
                m.name, s.stream
            ));
        }
    }
    for t in &m.tables {
        crate::names::validate("table", t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wit::Subscription;

    fn manifest(subscriptions: &[(&str, &[&str])]) -> Manifest {
        Manifest {
            name: "p".into(),
            version: "1".into(),
            schema_version: 1,
            subscriptions: subscriptions
                .iter()
                .map(|(s, types)| Subscription {
                    stream: s.to_string(),
                    event_types: types.iter().map(|t| t.to_string()).collect(),
                })
                .collect(),
            tables: vec![],
        }
    }

    /// A stream subscribed twice would be read twice (each subscription its
    /// own pass over the partitions), out of offset order: the checkpoints
    /// could then pass events not yet applied. Refused, with the fix named.
    #[test]
    fn a_stream_subscribed_twice_is_refused() {
        assert!(validate_manifest(&manifest(&[("orders", &["A"]), ("payments", &[])])).is_ok());
        let error = validate_manifest(&manifest(&[("orders", &["A"]), ("orders", &["B"])])).unwrap_err();
        assert!(error.contains("\"orders\" more than once") && error.contains("one subscription"), "{error}");
    }
}
