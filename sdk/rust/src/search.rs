//! Raw search access: JSON documents as bytes, as the WIT `search` interface has them.
//!
//! [`IndexMapping`] declares an index, [`Index`] writes typed documents to it.

use std::marker::PhantomData;

use serde::Serialize;

use crate::host::search as host;
pub use crate::wit::refract::plugin::search::SearchError;
use crate::{Failure, FieldType, wit};

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
        self.fields.push(wit::refract::plugin::types::FieldMapping {
            name: name.to_owned(),
            type_: ty.into(),
            stored,
            fast,
        });
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
    /// The index called `name`; declare its mapping in [`Projection::indexes`](crate::Projection::indexes).
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
        upsert(self.name, id, &bytes)
    }

    /// Remove the document `id`.
    pub fn delete(&self, id: &str) -> Result<(), Failure> {
        delete(self.name, id)
    }
}

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
