//! Write [Refract](https://github.com/refract-rs/refract) projections in Rust.
//!
//! A projection is a WebAssembly component that turns batches of events into
//! key/value writes. This crate hides the generated WIT bindings behind a small
//! API: implement [`Projection`], declare a [`Manifest`], read event data with
//! [`Event::json`], and keep state in typed [`Table`]s.
//!
//! ```
//! use refract_sdk::{Event, Failure, Manifest, Projection, Table};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Counter { count: u64 }
//!
//! const COUNTS: Table<Counter> = Table::new("counts");
//!
//! struct CountByType;
//!
//! impl Projection for CountByType {
//!     fn manifest() -> Manifest {
//!         Manifest::new("count-by-type", "1.0.0").subscribe("orders", &[]).table(&COUNTS)
//!     }
//!
//!     fn apply(event: &Event) -> Result<(), Failure> {
//!         let mut counter = COUNTS.get(&event.event_type)?.unwrap_or(Counter { count: 0 });
//!         counter.count += 1;
//!         COUNTS.put(&event.event_type, &counter)
//!     }
//! }
//!
//! // In a plugin crate built for `wasm32-wasip2`:
//! // refract_sdk::export_projection!(CountByType);
//!
//! // Natively, the same code runs against an in-memory store (useful in unit tests):
//! let event = refract_sdk::testing::event("orders", "OrderPlaced", None, b"{}");
//! let (store, result) = refract_sdk::native::with_backend(
//!     refract_sdk::native::MemoryBackend::default(),
//!     || CountByType::handle(vec![event]),
//! );
//! result.unwrap();
//! assert_eq!(store.get("counts", "OrderPlaced"), Some(br#"{"count":1}"#.as_slice()));
//! ```

use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[doc(hidden)]
pub mod wit {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "refract:plugin/packed-projection",
        pub_export_macro: true,
        export_macro_name: "__export_projection_world",
        default_bindings_module: "refract_sdk::wit",
        generate_all,
    });

    /// The `enricher` world: its imports are the interfaces generated above.
    pub mod enricher {
        wit_bindgen::generate!({
            path: "../../wit",
            world: "refract:plugin/packed-enricher",
            pub_export_macro: true,
            export_macro_name: "__export_enricher_world",
            default_bindings_module: "refract_sdk::wit::enricher",
            with: {
                "refract:plugin/types@0.1.0": crate::wit::refract::plugin::types,
                "refract:plugin/kv@0.1.0": crate::wit::refract::plugin::kv,
                "refract:plugin/kv-packed@0.1.0": crate::wit::refract::plugin::kv_packed,
                "refract:plugin/emit@0.1.0": crate::wit::refract::plugin::emit,
                "refract:plugin/lookup@0.1.0": crate::wit::refract::plugin::lookup,
                "refract:plugin/settings@0.1.0": crate::wit::refract::plugin::settings,
                "refract:plugin/log@0.1.0": crate::wit::refract::plugin::log,
            },
        });
    }
}

mod cache;
pub mod native;
#[doc(hidden)]
pub mod packed;
pub mod testing;

pub use cache::TableCache;
pub use wit::refract::plugin::types::{Event, Failure, FieldType};

/// The log level of a message sent with [`log`].
pub use wit::refract::plugin::log::Level;

/// What a projection declares about itself: name, versions, the streams and
/// event types it reads, and the tables it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    name: String,
    version: String,
    schema_version: u32,
    subscriptions: Vec<(String, Vec<String>)>,
    tables: Vec<String>,
}

impl Manifest {
    /// A manifest for the projection `name` at plugin version `version`, with
    /// schema version 1, no subscriptions and no tables.
    pub fn new(name: &str, version: &str) -> Self {
        Manifest {
            name: name.to_owned(),
            version: version.to_owned(),
            schema_version: 1,
            subscriptions: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Set the read model's schema version. Bump it whenever the shape of what
    /// the projection writes changes: the runtime then rebuilds the read model.
    pub fn schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// Read `stream`, delivering only `event_types` (every type when empty).
    pub fn subscribe(mut self, stream: &str, event_types: &[&str]) -> Self {
        let types = event_types.iter().map(|t| (*t).to_owned()).collect();
        self.subscriptions.push((stream.to_owned(), types));
        self
    }

    /// Declare a table the projection writes.
    pub fn table<V>(mut self, table: &Table<V>) -> Self {
        self.tables.push(table.name.to_owned());
        self
    }

    #[doc(hidden)]
    pub fn into_wit(self) -> wit::refract::plugin::types::Manifest {
        use wit::refract::plugin::types as t;
        t::Manifest {
            name: self.name,
            version: self.version,
            schema_version: self.schema_version,
            subscriptions: self
                .subscriptions
                .into_iter()
                .map(|(stream, event_types)| t::Subscription { stream, event_types })
                .collect(),
            tables: self.tables,
        }
    }
}

/// A projection: implement [`Projection::apply`] for one event, or override
/// [`Projection::handle`] to work on whole batches.
pub trait Projection {
    /// Describe the projection. Called once when the plugin is loaded.
    fn manifest() -> Manifest;

    /// Apply one event. Return [`Failure::Rejected`] for an event that can
    /// never be applied (it becomes a dead letter) and [`Failure::Transient`]
    /// for a condition worth retrying.
    fn apply(event: &Event) -> Result<(), Failure>;

    /// Apply a batch. The default applies each event in order; the runtime
    /// commits the batch's writes atomically, or none of them.
    fn handle(events: Vec<Event>) -> Result<(), Failure> {
        events.iter().try_for_each(Self::apply)
    }

    /// The search indexes the projection writes through [`Index`]; none by default.
    fn indexes() -> Vec<IndexMapping> {
        Vec::new()
    }
}

/// An enricher: turns events into zero or more new events (filter, map,
/// flat-map, join, upcast), keeping any state it needs in [`Table`]s.
/// Implement [`Enricher::enrich`] for one event, or override
/// [`Enricher::enrich_batch`] to work on whole batches. Where the outputs go
/// is the runtime's routing (`plugins.<name>.routes` in `refract.yaml`).
///
/// ```
/// use refract_sdk::{Enricher, Event, Failure, Manifest, NewEvent};
///
/// /// Drops test orders and renames a field on the rest.
/// struct CleanOrders;
///
/// impl Enricher for CleanOrders {
///     fn manifest() -> Manifest {
///         Manifest::new("clean-orders", "1.0.0").subscribe("orders", &[])
///     }
///
///     fn enrich(event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Failure> {
///         let mut data: serde_json::Value = event.json()?;
///         if data["test"] == true {
///             return Ok(()); // filtered out
///         }
///         if let Some(customer) = data.as_object_mut().and_then(|o| o.remove("cust")) {
///             data["customer"] = customer;
///         }
///         out.push(NewEvent::json(&event.event_type, &data)?.derived_from(event));
///         Ok(())
///     }
/// }
///
/// let event = refract_sdk::testing::event("orders", "OrderPlaced", Some("o-1"), br#"{"cust":"c-1"}"#);
/// let outputs = CleanOrders::enrich_batch(vec![event]).unwrap();
/// assert_eq!(outputs[0].data(), br#"{"customer":"c-1"}"#);
/// assert_eq!(outputs[0].key_str(), Some("o-1"));
/// ```
pub trait Enricher {
    /// Describe the enricher: the streams it reads and its state tables.
    fn manifest() -> Manifest;

    /// Enrich one event, pushing its outputs (none to filter it out).
    fn enrich(event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Failure>;

    /// Enrich a batch: the default enriches each event in order. The runtime
    /// commits the batch's outputs and state changes atomically, or none.
    fn enrich_batch(events: Vec<Event>) -> Result<Vec<NewEvent>, Failure> {
        let mut out = Vec::new();
        for event in &events {
            Self::enrich(event, &mut out)?;
        }
        Ok(out)
    }
}

/// The mapping of a search index: its fields and their types.
///
/// ```
/// use refract_sdk::IndexMapping;
/// let orders = IndexMapping::new("orders")
///     .keyword("orderId")
///     .keyword("status")
///     .f64("total")
///     .date("updatedAt")
///     .text("description");
/// ```
#[derive(Debug, Clone)]
pub struct IndexMapping {
    name: String,
    fields: Vec<wit::refract::plugin::types::FieldMapping>,
}

impl IndexMapping {
    /// An index called `name` with no fields yet.
    pub fn new(name: &str) -> Self {
        IndexMapping { name: name.to_owned(), fields: Vec::new() }
    }

    /// Add a field of type `ty`; `stored` fields come back in hits, `fast`
    /// fields can be sorted, range-filtered and faceted on.
    pub fn field(mut self, name: &str, ty: FieldType, stored: bool, fast: bool) -> Self {
        self.fields.push(wit::refract::plugin::types::FieldMapping { name: name.to_owned(), type_: ty, stored, fast });
        self
    }

    /// An exact-match string (stored, fast: filter, sort and facet on it).
    pub fn keyword(self, name: &str) -> Self {
        self.field(name, FieldType::Keyword, true, true)
    }

    /// Full text (stored, tokenized; searched by `q`).
    pub fn text(self, name: &str) -> Self {
        self.field(name, FieldType::Text, true, false)
    }

    /// A signed integer (stored, fast).
    pub fn i64(self, name: &str) -> Self {
        self.field(name, FieldType::I64, true, true)
    }

    /// A float (stored, fast).
    pub fn f64(self, name: &str) -> Self {
        self.field(name, FieldType::F64, true, true)
    }

    /// A date: RFC 3339 text or milliseconds since the epoch (stored, fast).
    pub fn date(self, name: &str) -> Self {
        self.field(name, FieldType::Date, true, true)
    }

    /// A boolean (stored, fast).
    pub fn bool(self, name: &str) -> Self {
        self.field(name, FieldType::Bool, true, true)
    }

    #[doc(hidden)]
    pub fn into_wit(self) -> wit::refract::plugin::types::IndexMapping {
        wit::refract::plugin::types::IndexMapping { name: self.name, fields: self.fields }
    }
}

/// A search index of the projection holding documents of type `D` (serialized
/// as JSON objects whose fields follow the index's [`IndexMapping`]).
pub struct Index<D> {
    name: &'static str,
    _doc: PhantomData<fn() -> D>,
}

impl<D: Serialize> Index<D> {
    /// The index called `name`; declare its mapping in [`Projection::indexes`].
    pub const fn new(name: &'static str) -> Self {
        Index { name, _doc: PhantomData }
    }

    /// The index's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// Index `doc` under `id`, replacing the document with that id. A document
    /// that does not fit the mapping rejects the event.
    pub fn upsert(&self, id: &str, doc: &D) -> Result<(), Failure> {
        let bytes = serde_json::to_vec(doc)
            .map_err(|e| Failure::rejected(format!("index {}: cannot encode {id:?}: {e}", self.name)))?;
        search::upsert(self.name, id, &bytes)
    }

    /// Remove the document `id`.
    pub fn delete(&self, id: &str) -> Result<(), Failure> {
        search::delete(self.name, id)
    }
}

/// Raw search access: JSON documents as bytes, as the WIT `search` interface has them.
pub mod search {
    use crate::Failure;
    #[cfg(not(target_arch = "wasm32"))]
    use crate::native::search as host;
    #[cfg(target_arch = "wasm32")]
    use crate::wit::refract::plugin::search as host;
    pub use crate::wit::refract::plugin::search::SearchError;

    fn failure(index: &str, error: SearchError) -> Failure {
        let message = match error {
            SearchError::UnknownIndex(m) | SearchError::InvalidDocument(m) | SearchError::TooLarge(m) => m,
        };
        Failure::Rejected(format!("index {index}: {message}"))
    }

    /// Index the JSON object `document` under `id` in `index`.
    pub fn upsert(index: &str, id: &str, document: &[u8]) -> Result<(), Failure> {
        host::upsert(index, id, document).map_err(|e| failure(index, e))
    }

    /// Remove the document `id` from `index`.
    pub fn delete(index: &str, id: &str) -> Result<(), Failure> {
        host::delete(index, id).map_err(|e| failure(index, e))
    }
}

/// An event for a projection to publish with [`emit`].
#[derive(Debug, Clone)]
pub struct NewEvent(wit::refract::plugin::emit::Outgoing);

impl NewEvent {
    /// An event of type `event_type` whose data is `data` as JSON.
    pub fn json<T: Serialize>(event_type: &str, data: &T) -> Result<Self, Failure> {
        let data = serde_json::to_vec(data)
            .map_err(|e| Failure::rejected(format!("cannot encode a {event_type} event: {e}")))?;
        Ok(NewEvent(wit::refract::plugin::emit::Outgoing {
            event_type: event_type.to_owned(),
            key: None,
            time: 0,
            headers: Vec::new(),
            data,
        }))
    }

    /// The partitioning key: events with the same key keep their order.
    pub fn key(mut self, key: &str) -> Self {
        self.0.key = Some(key.to_owned());
        self
    }

    /// Event time in ms since the Unix epoch; plugins have no clock, so this
    /// is usually the time of the event being handled.
    pub fn time(mut self, time: i64) -> Self {
        self.0.time = time;
        self
    }

    /// Add a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.0.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Take the key (unless one is set), the time and the headers of
    /// `event`, the event this one is derived from.
    pub fn derived_from(mut self, event: &Event) -> Self {
        if self.0.key.is_none() {
            self.0.key.clone_from(&event.key);
        }
        self.0.time = event.time;
        let mut headers = event.headers.clone();
        headers.append(&mut self.0.headers);
        self.0.headers = headers;
        self
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.0.event_type
    }

    /// The key, if any.
    pub fn key_str(&self) -> Option<&str> {
        self.0.key.as_deref()
    }

    /// The event time in ms since the Unix epoch.
    pub fn event_time(&self) -> i64 {
        self.0.time
    }

    /// The headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.0.headers
    }

    /// The payload: a JSON document.
    pub fn data(&self) -> &[u8] {
        &self.0.data
    }

    #[doc(hidden)]
    pub fn into_wit(self) -> wit::refract::plugin::emit::Outgoing {
        self.0
    }
}

/// Publish `event` to `stream` once the current batch commits (the embedded
/// log or a Kafka topic, as the runtime routes the stream). Events emitted
/// while a projection replays history are dropped by the runtime.
pub fn emit(stream: &str, event: NewEvent) -> Result<(), Failure> {
    #[cfg(not(target_arch = "wasm32"))]
    use crate::native::emit as host;
    #[cfg(target_arch = "wasm32")]
    use crate::wit::refract::plugin::emit::emit as host;
    use wit::refract::plugin::emit::EmitError;
    host(stream, &event.0).map_err(|e| {
        let message = match e {
            EmitError::InvalidStream(m) | EmitError::InvalidEvent(m) | EmitError::TooLarge(m) => m,
        };
        Failure::Rejected(format!("emitting to {stream}: {message}"))
    })
}

impl Event {
    /// Decode the event's data as JSON into `T`; a decoding error rejects the event.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_slice(&self.data).map_err(|e| {
            Failure::Rejected(format!(
                "{} at {}/{}@{}: data does not decode: {e}",
                self.event_type, self.stream, self.partition, self.offset
            ))
        })
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl Failure {
    /// An event that can never be applied: it becomes a dead letter.
    pub fn rejected(reason: impl fmt::Display) -> Self {
        Failure::Rejected(reason.to_string())
    }

    /// A condition that may pass: the runtime retries the batch with back-off.
    pub fn transient(reason: impl fmt::Display) -> Self {
        Failure::Transient(reason.to_string())
    }
}

/// A key/value table of the projection holding JSON values of type `V`.
///
/// Reads see the current batch's own writes; writes become visible to queries
/// when the batch commits.
pub struct Table<V> {
    name: &'static str,
    _value: PhantomData<fn() -> V>,
}

impl<V> Table<V> {
    /// The table called `name`; declare it in the manifest with [`Manifest::table`].
    pub const fn new(name: &'static str) -> Self {
        Table { name, _value: PhantomData }
    }

    /// The table's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// Remove `key`; removing an absent key is not an error.
    pub fn delete(&self, key: &str) -> Result<(), Failure> {
        kv::delete(self.name, key)
    }
}

impl<V: Serialize + DeserializeOwned> Table<V> {
    /// The value under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<V>, Failure> {
        match kv::get(self.name, key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Failure::rejected(format!("table {}: value of {key:?} does not decode: {e}", self.name))),
        }
    }

    /// Store `value` under `key`.
    pub fn put(&self, key: &str, value: &V) -> Result<(), Failure> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Failure::rejected(format!("table {}: cannot encode {key:?}: {e}", self.name)))?;
        kv::put(self.name, key, &bytes)
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order,
    /// beginning after `start_after` when given.
    pub fn scan(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<Vec<(String, V)>, Failure> {
        kv::scan(self.name, prefix, start_after, limit)?
            .into_iter()
            .map(|(key, bytes)| {
                let value = serde_json::from_slice(&bytes).map_err(|e| {
                    Failure::rejected(format!("table {}: value of {key:?} does not decode: {e}", self.name))
                })?;
                Ok((key, value))
            })
            .collect()
    }
}

/// Read-only access to other projections' tables: reference data for enrichment.
///
/// A lookup sees the other projection's committed, live read model as it is
/// now (not as it was when the event happened).
pub mod lookup {
    use serde::de::DeserializeOwned;

    use crate::Failure;
    #[cfg(not(target_arch = "wasm32"))]
    use crate::native::lookup as host;
    pub use crate::wit::refract::plugin::lookup::LookupError;
    #[cfg(target_arch = "wasm32")]
    use crate::wit::refract::plugin::lookup::get as host;

    /// The raw value under `key` in `table` of `projection`. A projection that
    /// is not running is a transient failure (it may be starting: the batch is
    /// retried); a table it does not declare rejects the event.
    pub fn get_raw(projection: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, Failure> {
        host(projection, table, key).map_err(|e| match e {
            LookupError::UnknownProjection(m) => Failure::Transient(format!("lookup in {projection}: {m}")),
            LookupError::UnknownTable(m) => Failure::Rejected(format!("lookup in {projection}: {m}")),
        })
    }

    /// The value under `key` in `table` of `projection`, decoded from JSON.
    pub fn get<V: DeserializeOwned>(projection: &str, table: &str, key: &str) -> Result<Option<V>, Failure> {
        match get_raw(projection, table, key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Failure::rejected(format!("lookup in {projection}/{table}: value of {key:?} does not decode: {e}"))
            }),
        }
    }
}

/// The setting `name` from `plugins.<name>.settings` in `refract.yaml`, as text.
/// Settings are available while handling events (not in `manifest()`).
pub fn setting(name: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    return wit::refract::plugin::settings::get(name);
    #[cfg(not(target_arch = "wasm32"))]
    return native::setting(name);
}

/// The setting `name` parsed as `T`, or `default` when it is not set; a
/// setting that does not parse rejects the event (and names the setting).
pub fn setting_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, Failure>
where
    T::Err: fmt::Display,
{
    match setting(name) {
        None => Ok(default),
        Some(text) => {
            text.trim().parse().map_err(|e| Failure::rejected(format!("setting {name} = {text:?} does not parse: {e}")))
        }
    }
}

/// Send a message to the runtime's log, under the plugin's name.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    wit::refract::plugin::log::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    native::log(level, message);
}

/// Raw key/value access: byte values, as the WIT `kv` interface has them.
/// Prefer [`Table`], which encodes values as JSON.
///
/// In WebAssembly, `put` and `delete` only append to the batch's pending
/// writes, held in the plugin; they go to the host with the next `get` (one
/// crossing of the sandbox boundary for both), before a `scan`, and when the
/// batch ends (`kv-packed` in the WIT). So a write the host refuses (an
/// undeclared table, a value that is not JSON or too large) fails the batch
/// at the next read or at its end rather than at the call; the runtime then
/// isolates the event that made it, as for any rejected event.
pub mod kv {
    use crate::Failure;
    #[cfg(not(target_arch = "wasm32"))]
    use crate::native as host;
    #[cfg(target_arch = "wasm32")]
    use crate::wit::refract::plugin::kv as host;
    pub use crate::wit::refract::plugin::kv::KvError;

    fn failure(table: &str, error: KvError) -> Failure {
        let message = match error {
            KvError::UnknownTable(m) | KvError::InvalidValue(m) | KvError::TooLarge(m) => m,
        };
        Failure::Rejected(format!("table {table}: {message}"))
    }

    /// The batch's writes not yet sent, packed (`crate::packed::write_kv`).
    #[cfg(target_arch = "wasm32")]
    mod pending {
        use std::cell::RefCell;

        use crate::Failure;
        use crate::wit::refract::plugin::kv_packed::RefusedWrite;

        /// Past this many bytes the writes are sent without waiting for a
        /// read, so that a batch of any size keeps the plugin's memory bounded.
        const SEND_AT: usize = 1 << 20;

        thread_local! {
            static WRITES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }

        pub fn write(table: &str, key: &str, value: Option<&[u8]>) -> Result<(), Failure> {
            let full = WRITES.with_borrow_mut(|log| {
                crate::packed::write_kv(log, table, key, value);
                log.len() >= SEND_AT
            });
            if full { send() } else { Ok(()) }
        }

        /// Call `f` with the pending writes, which it sends to the host, and
        /// forget them (`f` is not called when there are none: `None`).
        pub fn take<R>(f: impl FnOnce(&[u8]) -> R) -> Option<R> {
            WRITES.with_borrow_mut(|log| {
                if log.is_empty() {
                    return None;
                }
                let result = f(log);
                log.clear();
                Some(result)
            })
        }

        pub fn send() -> Result<(), Failure> {
            let sent = take(|log| crate::wit::refract::plugin::kv_packed::apply(log).map_err(|r| refused(log, r)));
            sent.unwrap_or(Ok(()))
        }

        pub fn clear() {
            WRITES.with_borrow_mut(Vec::clear);
        }

        /// The failure of the pending write of `log` the host refused.
        pub fn refused(log: &[u8], refused: RefusedWrite) -> Failure {
            let mut seen = 0;
            let mut write = (String::new(), String::new());
            let _ = crate::packed::read_kv(log, |table, key, _| {
                if seen < refused.index {
                    seen += 1;
                    return Ok(());
                }
                write = (table.to_owned(), key.to_owned());
                Err(())
            });
            let (table, key) = write;
            match super::failure(&table, refused.error) {
                Failure::Rejected(m) => Failure::Rejected(format!("{m} (writing {key:?})")),
                other => other,
            }
        }
    }

    /// The end of a batch: send its pending writes (`Ok`) or forget them
    /// (`Err`: the host rolls the batch back). Called by the export macros.
    #[doc(hidden)]
    pub fn finish_batch<R>(result: Result<R, Failure>) -> Result<R, Failure> {
        #[cfg(target_arch = "wasm32")]
        match &result {
            Ok(_) => pending::send()?,
            Err(_) => pending::clear(),
        }
        result
    }

    /// The value under `key` in `table`.
    pub fn get(table: &str, key: &str) -> Result<Option<Vec<u8>>, Failure> {
        #[cfg(target_arch = "wasm32")]
        {
            use crate::wit::refract::plugin::kv_packed::{self, PackedError};
            let sent = pending::take(|writes| {
                kv_packed::get(writes, table, key).map_err(|e| match e {
                    PackedError::Write(refused) => pending::refused(writes, refused),
                    PackedError::Read(e) => failure(table, e),
                })
            });
            if let Some(result) = sent {
                return result;
            }
        }
        host::get(table, key).map_err(|e| failure(table, e))
    }

    /// Store a JSON document under `key` in `table`.
    pub fn put(table: &str, key: &str, value: &[u8]) -> Result<(), Failure> {
        #[cfg(target_arch = "wasm32")]
        return pending::write(table, key, Some(value));
        #[cfg(not(target_arch = "wasm32"))]
        host::put(table, key, value).map_err(|e| failure(table, e))
    }

    /// Remove `key` from `table`.
    pub fn delete(table: &str, key: &str) -> Result<(), Failure> {
        #[cfg(target_arch = "wasm32")]
        return pending::write(table, key, None);
        #[cfg(not(target_arch = "wasm32"))]
        host::delete(table, key).map_err(|e| failure(table, e))
    }

    /// Entries of `table` whose key starts with `prefix`, after `start_after`, at most `limit`.
    pub fn scan(
        table: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, Failure> {
        #[cfg(target_arch = "wasm32")]
        pending::send()?;
        host::scan(table, prefix, start_after, limit)
            .map(|entries| entries.into_iter().map(|e| (e.key, e.value)).collect())
            .map_err(|e| failure(table, e))
    }
}

/// The events of a packed batch. The host encoded them: one that does not
/// decode is a host fault, so the plugin traps (and says why in the log).
#[doc(hidden)]
pub fn __unpack(events: &[u8]) -> Vec<Event> {
    packed::decode_events(events).unwrap_or_else(|e| panic!("the host sent a batch that does not decode: {e}"))
}

/// Route panics to the host's log before the instance traps, so the runtime
/// can say why a batch failed (the dead letter carries the panic message).
#[doc(hidden)]
pub fn __install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| log(Level::Error, &format!("plugin panicked: {info}"))));
    });
}

#[cfg(any(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics")), test))]
#[doc(hidden)]
pub mod small_alloc;

/// The plugin's allocator in WebAssembly (feature `talc`, on by default):
/// free lists for small blocks in front of talc ([`small_alloc`]), rather
/// than Rust's default there, dlmalloc, which made allocation a quarter of
/// an allocation-heavy plugin's time.
#[cfg(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics")))]
#[doc(hidden)]
#[macro_export]
macro_rules! __global_allocator {
    () => {
        #[global_allocator]
        static __REFRACT_ALLOCATOR: $crate::small_alloc::PluginAllocator = $crate::small_alloc::PluginAllocator::new();
    };
}

/// Without the `talc` feature, or natively: the default allocator.
#[cfg(not(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics"))))]
#[doc(hidden)]
#[macro_export]
macro_rules! __global_allocator {
    () => {};
}

/// Export `$ty` (which implements [`Enricher`]) as the plugin's `enricher` world.
#[macro_export]
macro_rules! export_enricher {
    ($ty:ty) => {
        const _: () = {
            struct __RefractExport;
            impl $crate::wit::enricher::Guest for __RefractExport {
                fn manifest() -> $crate::wit::refract::plugin::types::Manifest {
                    $crate::__install_panic_hook();
                    <$ty as $crate::Enricher>::manifest().into_wit()
                }
                fn enrich(
                    events: ::std::vec::Vec<$crate::Event>,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<$crate::wit::refract::plugin::emit::Outgoing>,
                    $crate::Failure,
                > {
                    $crate::__install_panic_hook();
                    $crate::kv::finish_batch(<$ty as $crate::Enricher>::enrich_batch(events))
                        .map(|out| out.into_iter().map($crate::NewEvent::into_wit).collect())
                }
                fn enrich_packed(
                    events: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, $crate::Failure> {
                    $crate::__install_panic_hook();
                    let events = $crate::__unpack(&events);
                    let out = $crate::kv::finish_batch(<$ty as $crate::Enricher>::enrich_batch(events))?;
                    let out: ::std::vec::Vec<_> = out.into_iter().map($crate::NewEvent::into_wit).collect();
                    Ok($crate::packed::encode_outputs(&out))
                }
            }
    $crate::wit::enricher::__export_enricher_world!(__RefractExport with_types_in $crate::wit::enricher);
        };
        $crate::__global_allocator!();
    };
}

/// Export `$ty` (which implements [`Projection`]) as the plugin's `projection` world.
#[macro_export]
macro_rules! export_projection {
    ($ty:ty) => {
        const _: () = {
            struct __RefractExport;
            impl $crate::wit::Guest for __RefractExport {
                fn indexes() -> ::std::vec::Vec<$crate::wit::refract::plugin::types::IndexMapping> {
                    $crate::__install_panic_hook();
                    <$ty as $crate::Projection>::indexes().into_iter().map($crate::IndexMapping::into_wit).collect()
                }
                fn manifest() -> $crate::wit::refract::plugin::types::Manifest {
                    $crate::__install_panic_hook();
                    <$ty as $crate::Projection>::manifest().into_wit()
                }
                fn handle(events: ::std::vec::Vec<$crate::Event>) -> ::std::result::Result<(), $crate::Failure> {
                    $crate::__install_panic_hook();
                    $crate::kv::finish_batch(<$ty as $crate::Projection>::handle(events))
                }
                fn handle_packed(events: ::std::vec::Vec<u8>) -> ::std::result::Result<(), $crate::Failure> {
                    $crate::__install_panic_hook();
                    $crate::kv::finish_batch(<$ty as $crate::Projection>::handle($crate::__unpack(&events)))
                }
            }
    $crate::wit::__export_projection_world!(__RefractExport with_types_in $crate::wit);
        };
        $crate::__global_allocator!();
    };
}
