//! Projections and enrichers written with the Rust SDK and compiled into the host.
//!
//! It runs through the same projector, batches and storage as a WebAssembly
//! plugin, with the SDK's key/value calls served by the batch directly. This
//! is the baseline the benchmarks compare WebAssembly plugins against, and a
//! fast way to test the projector without compiling components.

use refract_sdk::native::{self, Backend};
use refract_sdk::wit::refract::plugin::emit::{EmitError as SdkEmitError, Outgoing as SdkOutgoing};
use refract_sdk::wit::refract::plugin::kv::{Entry as SdkEntry, KvError as SdkKvError};
use refract_sdk::wit::refract::plugin::lookup::LookupError as SdkLookupError;
use refract_sdk::wit::refract::plugin::search::SearchError as SdkSearchError;
use refract_sdk::wit::refract::plugin::types as sdk;

use super::route::{self, Routes};
use super::{Environment, HandleError, Handler, Kind, LookupError, LookupFailure};
use crate::store::Batch;
use crate::wit::{
    EmitError, Event, FieldMapping, FieldType, IndexMapping, KeyedTable, KvError, Manifest, Outgoing, SearchError,
    Subscription,
};

type HandleFn = fn(Vec<refract_sdk::Event>) -> Result<(), refract_sdk::Failure>;
type EnrichFn = fn(Vec<refract_sdk::Event>) -> Result<Vec<refract_sdk::NewEvent>, refract_sdk::Failure>;

/// A native projection: its manifest and the SDK-generated `handle` function.
pub struct NativeProjection {
    manifest: Manifest,
    indexes: Vec<IndexMapping>,
    keyed_tables: Vec<KeyedTable>,
    handle: HandleFn,
    env: Environment,
}

/// A native enricher: its manifest, `Enricher::enrich_batch` and its routes.
pub struct NativeEnricher {
    manifest: Manifest,
    enrich: EnrichFn,
    routes: Routes,
    env: Environment,
}

impl NativeEnricher {
    /// A native enricher from an SDK manifest and `Enricher::enrich_batch`,
    /// its outputs sent along `routes`.
    pub fn new(manifest: refract_sdk::Manifest, enrich: EnrichFn, routes: Routes) -> Self {
        NativeEnricher { manifest: host_manifest(manifest), enrich, routes, env: Environment::default() }
    }
}

fn host_manifest(manifest: refract_sdk::Manifest) -> Manifest {
    let m = manifest.into_wit();
    Manifest {
        name: m.name,
        version: m.version,
        schema_version: m.schema_version,
        subscriptions: m
            .subscriptions
            .into_iter()
            .map(|s| Subscription { stream: s.stream, event_types: s.event_types })
            .collect(),
        tables: m.tables,
    }
}

impl NativeProjection {
    /// A native projection from an SDK manifest and `Projection::handle`.
    pub fn new(manifest: refract_sdk::Manifest, handle: HandleFn) -> Self {
        Self::with_indexes(manifest, Vec::new(), handle)
    }

    /// The same, for a projection with search indexes (`Projection::indexes`).
    pub fn with_indexes(
        manifest: refract_sdk::Manifest,
        indexes: Vec<refract_sdk::IndexMapping>,
        handle: HandleFn,
    ) -> Self {
        let indexes = indexes
            .into_iter()
            .map(|i| {
                let i = i.into_wit();
                let fields = i
                    .fields
                    .into_iter()
                    .map(|f| FieldMapping {
                        name: f.name,
                        type_: match f.type_ {
                            sdk::FieldType::Keyword => FieldType::Keyword,
                            sdk::FieldType::Text => FieldType::Text,
                            sdk::FieldType::I64 => FieldType::I64,
                            sdk::FieldType::F64 => FieldType::F64,
                            sdk::FieldType::Date => FieldType::Date,
                            sdk::FieldType::Bool => FieldType::Bool,
                        },
                        stored: f.stored,
                        fast: f.fast,
                    })
                    .collect();
                IndexMapping { name: i.name, fields }
            })
            .collect();
        let keyed_tables = manifest
            .keyed_into_wit()
            .into_iter()
            .map(|k| KeyedTable { table: k.table, separator: k.separator })
            .collect();
        NativeProjection {
            manifest: host_manifest(manifest),
            indexes,
            keyed_tables,
            handle,
            env: Environment::default(),
        }
    }
}

/// Serves the SDK's key/value calls from a batch, storing the first host error.
struct BatchBackend {
    batch: Batch,
    env: Environment,
    host_error: Option<String>,
}

fn to_sdk(e: KvError) -> SdkKvError {
    match e {
        KvError::UnknownTable(m) => SdkKvError::UnknownTable(m),
        KvError::InvalidValue(m) => SdkKvError::InvalidValue(m),
        KvError::TooLarge(m) => SdkKvError::TooLarge(m),
    }
}

impl BatchBackend {
    fn host<T>(&mut self, r: crate::store::Result<Result<T, KvError>>) -> Result<T, SdkKvError> {
        match r {
            Ok(r) => r.map_err(to_sdk),
            Err(e) => {
                // The WebAssembly host traps here; natively the error is remembered
                // and the batch fails as a host error whatever the projection returns.
                let message = e.to_string();
                self.host_error.get_or_insert(message.clone());
                Err(SdkKvError::TooLarge(message))
            }
        }
    }
}

fn to_sdk_search(e: SearchError) -> SdkSearchError {
    match e {
        SearchError::UnknownIndex(m) => SdkSearchError::UnknownIndex(m),
        SearchError::InvalidDocument(m) => SdkSearchError::InvalidDocument(m),
        SearchError::TooLarge(m) => SdkSearchError::TooLarge(m),
    }
}

impl Backend for BatchBackend {
    fn lookup(&mut self, projection: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, SdkLookupError> {
        match self.env.lookup.get(projection, table, key) {
            Ok(value) => Ok(value),
            Err(LookupFailure::Refused(LookupError::UnknownProjection(m))) => Err(SdkLookupError::UnknownProjection(m)),
            Err(LookupFailure::Refused(LookupError::UnknownTable(m))) => Err(SdkLookupError::UnknownTable(m)),
            Err(LookupFailure::Host(message)) => {
                self.host_error.get_or_insert(message.clone());
                Err(SdkLookupError::UnknownProjection(message))
            }
        }
    }

    fn setting(&mut self, name: &str) -> Option<String> {
        self.env.settings.get(name).cloned()
    }

    fn search_upsert(&mut self, index: &str, id: &str, document: &[u8]) -> Result<(), SdkSearchError> {
        self.batch.search_upsert(index, id, document).map_err(to_sdk_search)
    }

    fn search_delete(&mut self, index: &str, id: &str) -> Result<(), SdkSearchError> {
        self.batch.search_delete(index, id).map_err(to_sdk_search)
    }

    fn emit(&mut self, stream: &str, e: SdkOutgoing) -> Result<(), SdkEmitError> {
        let event = Outgoing { event_type: e.event_type, key: e.key, time: e.time, headers: e.headers, data: e.data };
        self.batch.emit(stream, event).map_err(|e| match e {
            EmitError::InvalidStream(m) => SdkEmitError::InvalidStream(m),
            EmitError::InvalidEvent(m) => SdkEmitError::InvalidEvent(m),
            EmitError::TooLarge(m) => SdkEmitError::TooLarge(m),
        })
    }

    fn get(&mut self, table: &str, key: &str) -> Result<Option<Vec<u8>>, SdkKvError> {
        let r = self.batch.get(table, key);
        self.host(r)
    }

    fn put(&mut self, table: &str, key: &str, value: &[u8]) -> Result<(), SdkKvError> {
        self.batch.put(table, key, value).map_err(to_sdk)
    }

    fn delete(&mut self, table: &str, key: &str) -> Result<(), SdkKvError> {
        self.batch.delete(table, key).map_err(to_sdk)
    }

    fn scan(
        &mut self,
        table: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SdkEntry>, SdkKvError> {
        let r = self.batch.scan(table, prefix, start_after, limit);
        self.host(r).map(|entries| entries.into_iter().map(|e| SdkEntry { key: e.key, value: e.value }).collect())
    }
}

/// Run `call` on `events` with the SDK's host calls served by `batch`.
fn run<R>(
    batch: Batch,
    env: &Environment,
    events: &[Event],
    call: impl FnOnce(Vec<refract_sdk::Event>) -> Result<R, refract_sdk::Failure>,
) -> (Batch, Result<R, HandleError>) {
    let events = events
        .iter()
        .map(|e| {
            let mut event = refract_sdk::Event::new(&e.stream, &e.event_type, &e.data);
            event.partition = e.partition;
            event.offset = e.offset;
            event.key.clone_from(&e.key);
            event.time = e.time;
            event.headers.clone_from(&e.headers);
            event.content_type.clone_from(&e.content_type);
            event
        })
        .collect();
    let backend = BatchBackend { batch, env: env.clone(), host_error: None };
    let (backend, result) =
        native::with_backend(backend, || std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(events))));
    let outcome = match (backend.host_error, result) {
        (Some(h), _) => Err(HandleError::Host(h)),
        (None, Ok(Ok(r))) => Ok(r),
        (None, Ok(Err(refract_sdk::Failure::Rejected(m)))) => Err(HandleError::Rejected(m)),
        (None, Ok(Err(refract_sdk::Failure::Transient(m)))) => Err(HandleError::Transient(m)),
        (None, Err(panic)) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic".to_owned());
            Err(HandleError::Trap(format!("plugin panicked: {message}")))
        }
    };
    (backend.batch, outcome)
}

impl Handler for NativeProjection {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn indexes(&self) -> &[IndexMapping] {
        &self.indexes
    }

    fn keyed_tables(&self) -> &[KeyedTable] {
        &self.keyed_tables
    }

    fn handle(&mut self, batch: Batch, events: &[Event]) -> (Batch, Result<(), HandleError>) {
        run(batch, &self.env, events, self.handle)
    }
}

impl Handler for NativeEnricher {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn kind(&self) -> Kind {
        Kind::Enricher
    }

    fn handle(&mut self, batch: Batch, events: &[Event]) -> (Batch, Result<(), HandleError>) {
        let (mut batch, result) = run(batch, &self.env, events, self.enrich);
        let outcome = result.and_then(|outputs| {
            let outputs = outputs
                .into_iter()
                .map(|o| {
                    let o = o.into_wit();
                    Outgoing { event_type: o.event_type, key: o.key, time: o.time, headers: o.headers, data: o.data }
                })
                .collect();
            route::deliver(&mut batch, &self.routes, outputs)
        });
        (batch, outcome)
    }
}
