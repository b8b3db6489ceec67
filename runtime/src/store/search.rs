//! Search indexes: mappings turned into tantivy schemas, documents checked
//! against them, and the indexer that applies the outbox to tantivy.
//!
//! Exactly-once indexing, by construction:
//! 1. `search.upsert/delete` go into the batch (coalesced per id); at
//!    commit, one outbox entry per changed document (sequence → index, id and
//!    the document, or its deletion) is written in the batch's redb
//!    transaction ([`super::ReadModel::commit`]).
//! 2. The [`Indexer`] reads outbox entries after the last sequence it
//!    applied, replays them on tantivy (delete by id, then add the current
//!    document if there is one), and commits tantivy with that sequence as
//!    the commit payload, on an interval — never per batch.
//! 3. Then it trims the outbox up to that sequence.
//!
//! After a crash the indexer resumes from the payload of the last tantivy
//! commit. Replaying entries again is harmless: each is a delete by id
//! followed by an add of that version, applied in sequence order, so the
//! last version wins however often the tail is replayed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tantivy::schema::{
    DateOptions, FAST, Field, INDEXED, NumericOptions, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::{DateTime, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

pub use crate::wit::{FieldMapping, FieldType, IndexMapping};

/// The hidden field holding a document's id (for delete-by-id).
pub const ID_FIELD: &str = "_id";
/// The hidden stored field holding the document's stored fields as JSON.
pub const SOURCE_FIELD: &str = "_source";

/// An index mapping compiled to a tantivy schema.
#[derive(Clone)]
pub struct IndexSchema {
    pub mapping: IndexMapping,
    pub schema: Schema,
    pub id: Field,
    pub source: Field,
    fields: HashMap<String, (FieldMapping, Field)>,
}

/// A date: milliseconds since the Unix epoch, or RFC 3339 text, within what
/// tantivy holds (nanoseconds in an i64: the years 1677 to 2262). Outside
/// it, none: multiplying by 10^6 would overflow, and tantivy would clamp.
fn parse_date(v: &Value) -> Option<DateTime> {
    match v {
        Value::Number(n) => {
            n.as_i64().filter(|ms| ms.checked_mul(1_000_000).is_some()).map(DateTime::from_timestamp_millis)
        }
        Value::String(s) => parse_date_text(s),
        _ => None,
    }
}

/// A date written as RFC 3339 text.
fn parse_date_text(s: &str) -> Option<DateTime> {
    let parsed = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    DateTime::try_from_utc(parsed)
}

/// Whether a document fits its mapping, decided while scanning it (see
/// [`IndexSchema::validate`]); `false` for anything that does not.
struct DocumentCheck<'a>(&'a IndexSchema);

/// One field's value: a value of its type, an array of them, or null.
struct FieldCheck {
    type_: FieldType,
    /// Inside an array: no nested arrays, no nulls.
    element: bool,
}

/// A field name, borrowed from the document when it has no escapes.
struct FieldName<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for FieldName<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> serde::de::Visitor<'de> for Name {
            type Value = FieldName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(FieldName(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(FieldName(v.to_owned().into()))
            }
        }
        d.deserialize_str(Name)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for DocumentCheck<'_> {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for DocumentCheck<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut fits = true;
        while let Some(FieldName(name)) = map.next_key()? {
            match self.0.fields.get(name.as_ref()) {
                Some((mapping, _)) => {
                    fits &= map.next_value_seed(FieldCheck { type_: mapping.type_, element: false })?
                }
                None => return Ok(false),
            }
        }
        Ok(fits)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for FieldCheck {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FieldCheck {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field value")
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(!self.element)
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(self.type_ == FieldType::Bool)
    }
    fn visit_i64<E>(self, v: i64) -> Result<bool, E> {
        Ok(fits(self.type_, &Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<bool, E> {
        Ok(fits(self.type_, &Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<bool, E> {
        Ok(fits(self.type_, &Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(match self.type_ {
            FieldType::Keyword | FieldType::Text => true,
            FieldType::Date => parse_date_text(v).is_some(),
            _ => false,
        })
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut fits = !self.element;
        while let Some(element) = seq.next_element_seed(FieldCheck { type_: self.type_, element: true })? {
            fits &= element;
        }
        Ok(fits)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

fn type_name(t: FieldType) -> &'static str {
    match t {
        FieldType::Keyword => "keyword",
        FieldType::Text => "text",
        FieldType::I64 => "i64",
        FieldType::F64 => "f64",
        FieldType::Date => "date",
        FieldType::Bool => "bool",
    }
}

fn fits(t: FieldType, v: &Value) -> bool {
    match t {
        FieldType::Keyword | FieldType::Text => v.is_string(),
        FieldType::I64 => v.is_i64() || v.as_u64().is_some_and(|u| i64::try_from(u).is_ok()),
        FieldType::F64 => v.is_number(),
        FieldType::Date => parse_date(v).is_some(),
        FieldType::Bool => v.is_boolean(),
    }
}

impl IndexSchema {
    /// Compile `mapping`; refuses invalid or duplicate field names.
    pub fn new(mapping: &IndexMapping) -> Result<Self, String> {
        crate::names::validate("index", &mapping.name)?;
        if mapping.fields.is_empty() {
            return Err(format!("index {:?} has no fields", mapping.name));
        }
        let mut builder = Schema::builder();
        let id = builder.add_text_field(ID_FIELD, STRING | STORED);
        let source = builder.add_bytes_field(SOURCE_FIELD, STORED);
        let mut fields = HashMap::new();
        for f in &mapping.fields {
            if f.name.is_empty() || f.name.starts_with('_') || f.name.contains(['.', ':', ' ']) {
                return Err(format!(
                    "index {:?}: invalid field name {:?} (no leading _, no . : or spaces)",
                    mapping.name, f.name
                ));
            }
            // Checked first: tantivy's schema builder panics on a duplicate.
            if fields.contains_key(&f.name) {
                return Err(format!("index {:?}: field {:?} is mapped twice", mapping.name, f.name));
            }
            let field = match f.type_ {
                FieldType::Keyword => {
                    let options = if f.fast { STRING | FAST } else { STRING };
                    builder.add_text_field(&f.name, options)
                }
                FieldType::Text => {
                    // The default tokenizer, with positions so that phrases work.
                    let indexing = TextFieldIndexing::default()
                        .set_tokenizer("default")
                        .set_index_option(tantivy::schema::IndexRecordOption::WithFreqsAndPositions);
                    let mut options = TextOptions::default().set_indexing_options(indexing);
                    if f.fast {
                        options = options.set_fast("raw");
                    }
                    builder.add_text_field(&f.name, options)
                }
                FieldType::I64 | FieldType::F64 | FieldType::Bool => {
                    let mut options: NumericOptions = INDEXED.into();
                    if f.fast {
                        options = options.set_fast();
                    }
                    match f.type_ {
                        FieldType::I64 => builder.add_i64_field(&f.name, options),
                        FieldType::F64 => builder.add_f64_field(&f.name, options),
                        _ => builder.add_bool_field(&f.name, options),
                    }
                }
                FieldType::Date => {
                    let mut options = DateOptions::from(INDEXED);
                    if f.fast {
                        options = options.set_fast();
                    }
                    builder.add_date_field(&f.name, options)
                }
            };
            fields.insert(f.name.clone(), (f.clone(), field));
        }
        Ok(IndexSchema { mapping: mapping.clone(), schema: builder.build(), id, source, fields })
    }

    /// The mapping of `field`, if it is mapped.
    pub fn field(&self, name: &str) -> Option<(&FieldMapping, Field)> {
        self.fields.get(name).map(|(m, f)| (m, *f))
    }

    /// The text fields: where `q` searches by default.
    pub fn text_fields(&self) -> Vec<Field> {
        let mut fields: Vec<(&String, Field)> = self
            .fields
            .iter()
            .filter(|(_, (m, _))| m.type_ == FieldType::Text)
            .map(|(name, (_, f))| (name, *f))
            .collect();
        fields.sort();
        fields.into_iter().map(|(_, f)| f).collect()
    }

    /// Check that `doc` is a JSON object whose fields are mapped and typed as
    /// mapped (a value, an array of values, or null).
    ///
    /// This runs on the projector's thread for every upserted document, so
    /// it checks the document while scanning it, without building it; only
    /// a document that fails is parsed again, by [`IndexSchema::parse`], to
    /// say why.
    pub fn validate(&self, doc: &[u8]) -> Result<(), String> {
        let mut scanner = serde_json::Deserializer::from_slice(doc);
        let fits = serde::de::DeserializeSeed::deserialize(DocumentCheck(self), &mut scanner).unwrap_or(false)
            && scanner.end().is_ok();
        if fits { Ok(()) } else { self.parse(doc).map(drop) }
    }

    /// [`IndexSchema::validate`], returning the document parsed.
    pub fn parse(&self, doc: &[u8]) -> Result<Map<String, Value>, String> {
        let value: Value = serde_json::from_slice(doc).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(object) = value else {
            return Err("a document must be a JSON object".into());
        };
        for (name, v) in &object {
            let Some((mapping, _)) = self.fields.get(name) else {
                return Err(format!("field {name:?} is not in the mapping of index {:?}", self.mapping.name));
            };
            let values: &[Value] = match v {
                Value::Null => &[],
                Value::Array(items) => items,
                other => std::slice::from_ref(other),
            };
            if let Some(bad) = values.iter().find(|v| !fits(mapping.type_, v)) {
                return Err(format!("field {name:?} is mapped as {}, got {bad}", type_name(mapping.type_)));
            }
        }
        Ok(object)
    }

    /// The tantivy document for document `id`: `object` as [`IndexSchema::validate`]
    /// parsed it from `original`.
    pub fn to_tantivy(&self, id: &str, object: &Map<String, Value>, original: &[u8]) -> TantivyDocument {
        let mut doc = TantivyDocument::default();
        doc.add_text(self.id, id);
        // When every field is stored (the usual case) the source is the document as given.
        let all_stored = object.keys().all(|k| self.fields.get(k).is_some_and(|(m, _)| m.stored));
        let mut stored = Map::new();
        for (name, v) in object {
            let Some((mapping, field)) = self.fields.get(name) else { continue };
            if mapping.stored && !all_stored {
                stored.insert(name.clone(), v.clone());
            }
            let values: &[Value] = match v {
                Value::Null => &[],
                Value::Array(items) => items,
                other => std::slice::from_ref(other),
            };
            for v in values {
                match mapping.type_ {
                    FieldType::Keyword | FieldType::Text => doc.add_text(*field, v.as_str().unwrap_or_default()),
                    FieldType::I64 => doc.add_i64(*field, v.as_i64().unwrap_or_default()),
                    FieldType::F64 => doc.add_f64(*field, v.as_f64().unwrap_or_default()),
                    FieldType::Bool => doc.add_bool(*field, v.as_bool().unwrap_or_default()),
                    FieldType::Date => {
                        if let Some(d) = parse_date(v) {
                            doc.add_date(*field, d)
                        }
                    }
                }
            }
        }
        if all_stored {
            doc.add_bytes(self.source, original);
        } else {
            doc.add_bytes(self.source, &serde_json::to_vec(&Value::Object(stored)).expect("JSON serializes"));
        }
        doc
    }
}

/// A search over one index.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct SearchRequest {
    /// Query in tantivy syntax over the text fields (all documents when empty).
    #[serde(default)]
    pub q: String,
    /// A filter in the same syntax naming fields (`status:paid AND total:[10 TO 100]`); it does not affect scores.
    #[serde(default)]
    pub filter: String,
    /// `_score` (default) or `<fast field>:asc|desc`.
    #[serde(default)]
    pub sort: String,
    pub limit: Option<usize>,
    #[serde(default)]
    pub offset: usize,
    /// Comma-separated keyword fields to count matching documents by.
    #[serde(default)]
    pub facets: String,
}

/// A page of hits, the total, and facet counts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchResponse {
    pub total: usize,
    pub hits: Vec<SearchHit>,
    pub facets: Map<String, Value>,
}

/// One hit: the document as the projection stored it, and its score or the
/// value it was sorted by.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchHit {
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sort: Option<Value>,
    /// The stored JSON text, passed on without being parsed and written
    /// again (it was checked against the mapping when it was upserted).
    pub document: Option<Box<serde_json::value::RawValue>>,
}

/// How the index mappings `new` differ from `old`, in words; `None` when
/// they are the same. An index's files are built for one mapping: another
/// one needs a rebuild (a new schema-version), not a swap.
pub fn mapping_change(old: &[&IndexMapping], new: &[IndexMapping]) -> Option<String> {
    let mut old: Vec<&IndexMapping> = old.to_vec();
    let mut new: Vec<&IndexMapping> = new.iter().collect();
    old.sort_by(|a, b| a.name.cmp(&b.name));
    new.sort_by(|a, b| a.name.cmp(&b.name));
    let names = |m: &[&IndexMapping]| m.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
    let (old_names, new_names) = (names(&old), names(&new));
    if old_names != new_names {
        return Some(format!("search indexes changed from {old_names:?} to {new_names:?}"));
    }
    for (o, n) in old.iter().zip(new) {
        let describe = |f: &FieldMapping| {
            format!(
                "{} ({}{}{})",
                f.name,
                type_name(f.type_),
                if f.stored { ", stored" } else { "" },
                if f.fast { ", fast" } else { "" }
            )
        };
        let fields = |m: &IndexMapping| m.fields.iter().map(describe).collect::<Vec<_>>();
        let (before, after) = (fields(o), fields(n));
        if before != after {
            let removed: Vec<&String> = before.iter().filter(|f| !after.contains(f)).collect();
            let added: Vec<&String> = after.iter().filter(|f| !before.contains(f)).collect();
            return Some(format!("the mapping of index {:?} changed (removed {removed:?}, added {added:?})", o.name));
        }
    }
    None
}

/// The longest `q` or `filter`, in bytes: room for any question a person or
/// a form asks, and a bound on the parser's and the query's work.
pub const MAX_QUERY_BYTES: usize = 4096;
/// The deepest nesting of groups and `NOT`s in `q` or `filter`. tantivy's
/// parser recurses once per level, on the thread serving the request.
pub const MAX_QUERY_DEPTH: usize = 32;
/// The most distinct facets one search may count.
pub const MAX_FACETS: usize = 16;

/// Refuse a query text that is too long or nested too deep to parse safely.
fn check_query(what: &str, text: &str) -> Result<(), QueryError> {
    if text.len() > MAX_QUERY_BYTES {
        return Err(QueryError::Invalid(format!(
            "{what} is {} bytes, longer than the {MAX_QUERY_BYTES} a query may be",
            text.len()
        )));
    }
    let depth = nesting(text);
    if depth > MAX_QUERY_DEPTH {
        return Err(QueryError::Invalid(format!(
            "{what} is nested {depth} levels deep (groups and NOTs); at most {MAX_QUERY_DEPTH} are allowed"
        )));
    }
    Ok(())
}

/// How deep the query grammar recurses on `text`: one level per open group
/// and per `NOT` in a chain, outside quoted phrases and escapes.
fn nesting(text: &str) -> usize {
    let (mut depth, mut max, mut nots) = (0usize, 0usize, 0usize);
    // Each open group's cost: itself plus the NOTs right before it.
    let mut groups: Vec<usize> = Vec::new();
    let mut word = String::new();
    let end_word = |word: &mut String, nots: &mut usize, depth: usize, max: &mut usize| {
        if word == "NOT" {
            *nots += 1;
            *max = (*max).max(depth + *nots);
        } else if !word.is_empty() {
            *nots = 0;
        }
        word.clear();
    };
    let mut chars = text.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
                word.push('x');
            }
            '"' => {
                quoted = !quoted;
                word.push('x');
            }
            _ if quoted => {}
            '(' => {
                end_word(&mut word, &mut nots, depth, &mut max);
                groups.push(1 + nots);
                depth += 1 + nots;
                nots = 0;
                max = max.max(depth);
            }
            ')' => {
                end_word(&mut word, &mut nots, depth, &mut max);
                depth -= groups.pop().unwrap_or(0);
                nots = 0;
            }
            c if c.is_whitespace() => end_word(&mut word, &mut nots, depth, &mut max),
            c => word.push(c),
        }
    }
    end_word(&mut word, &mut nots, depth, &mut max);
    max
}

/// Why a search failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request is wrong (bad syntax, unknown or unsuitable field): a 400.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Search(#[from] tantivy::TantivyError),
}

/// One open tantivy index.
pub struct OpenIndex {
    pub schema: IndexSchema,
    pub index: Index,
    pub reader: IndexReader,
    writer: Mutex<IndexWriter>,
}

/// Errors of the search side.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("tantivy: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("{0}")]
    Store(#[from] super::Error),
    #[error("opening index directory: {0}")]
    Dir(#[from] tantivy::directory::error::OpenDirectoryError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl OpenIndex {
    /// Open (or create) the index of `schema` in `dir`.
    pub fn open(dir: &Path, schema: IndexSchema) -> Result<Self, SearchError> {
        std::fs::create_dir_all(dir)?;
        let directory = tantivy::directory::MmapDirectory::open(dir)?;
        let index = Index::open_or_create(directory, schema.schema.clone())?;
        // One indexing thread: the projector needs the other core.
        let writer = index.writer_with_num_threads(1, 64 << 20)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        Ok(OpenIndex { schema, index, reader, writer: Mutex::new(writer) })
    }

    /// The outbox sequence of the last tantivy commit.
    pub fn committed_sequence(&self) -> Result<u64, SearchError> {
        let metas = self.index.load_metas()?;
        Ok(metas.payload.and_then(|p| p.parse().ok()).unwrap_or(0))
    }
}

/// The search indexes of one projection and how far they are applied.
pub struct Indexes {
    pub open: BTreeMap<String, OpenIndex>,
    /// The outbox sequence all indexes have committed.
    pub applied: AtomicU64,
}

impl Indexes {
    /// Open every index in `schemas` under `dir/<index>`.
    pub fn open(dir: &Path, schemas: &BTreeMap<String, IndexSchema>) -> Result<Self, SearchError> {
        let mut open = BTreeMap::new();
        for (name, schema) in schemas {
            open.insert(name.clone(), OpenIndex::open(&dir.join(name), schema.clone())?);
        }
        let applied = open.values().map(OpenIndex::committed_sequence).collect::<Result<Vec<_>, _>>()?;
        let applied = applied.into_iter().min().unwrap_or(0);
        Ok(Indexes { open, applied: AtomicU64::new(applied) })
    }
}

/// Applies a projection's outbox to its tantivy indexes.
pub struct Indexer {
    read_model: Arc<super::ReadModel>,
    indexes: Arc<Indexes>,
    interval: Duration,
    stop: Arc<AtomicBool>,
}

/// The most outbox entries applied in one tantivy commit.
const MAX_APPLY: usize = 200_000;

impl Indexer {
    pub fn new(
        read_model: Arc<super::ReadModel>,
        indexes: Arc<Indexes>,
        interval: Duration,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Indexer { read_model, indexes, interval, stop }
    }

    /// Apply and commit until `stop`, once per interval.
    pub fn run(self) {
        let mut next = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            next += self.interval;
            match self.apply_once() {
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "indexing failed; retrying"),
            }
            let now = Instant::now();
            if next > now {
                crate::clock::sleep_unless(&self.stop, next - now);
            } else {
                next = now;
            }
        }
        // A last pass, so a clean shutdown leaves nothing behind.
        if let Err(e) = self.apply_once() {
            tracing::error!(error = %e, "indexing failed at shutdown");
        }
    }

    /// Apply the outbox entries after the committed sequence, commit every
    /// index with the new sequence as payload, trim the outbox. Returns the
    /// number of entries applied.
    pub fn apply_once(&self) -> Result<usize, SearchError> {
        let applied = self.indexes.applied.load(Ordering::Relaxed);
        let entries = self.read_model.outbox_after(applied, MAX_APPLY)?;
        let Some(last) = entries.last().map(|e| e.sequence) else { return Ok(0) };
        let mut writers: BTreeMap<&str, std::sync::MutexGuard<'_, IndexWriter>> = BTreeMap::new();
        for (name, open) in &self.indexes.open {
            writers.insert(name, open.writer.lock().expect("index writer lock"));
        }
        if let Err(e) = self.apply(&entries, last, &mut writers) {
            // A writer whose worker failed (a full disk, say) is dead for
            // good: start each one afresh from its last commit, which the
            // next pass re-applies the outbox after. Nothing was trimmed.
            for (name, writer) in writers.iter_mut() {
                if let Err(e) = writer.rollback() {
                    tracing::error!(index = %name, error = %e, "restarting the index writer failed");
                }
            }
            return Err(e);
        }
        drop(writers);
        self.indexes.applied.store(last, Ordering::Relaxed);
        self.read_model.trim_outbox(last)?;
        Ok(entries.len())
    }

    /// Replay `entries` on the indexes' writers and commit them all, with
    /// `last`, the last entry's sequence, as the commit payload.
    fn apply(
        &self,
        entries: &[super::read_model::OutboxEntry],
        last: u64,
        writers: &mut BTreeMap<&str, std::sync::MutexGuard<'_, IndexWriter>>,
    ) -> Result<(), SearchError> {
        for entry in entries {
            let (Some(open), Some(writer)) =
                (self.indexes.open.get(&entry.index), writers.get_mut(entry.index.as_str()))
            else {
                continue; // an index no longer declared
            };
            writer.delete_term(Term::from_field_text(open.schema.id, &entry.id));
            if let Some(doc) = &entry.document {
                match open.schema.parse(doc) {
                    Ok(object) => {
                        writer.add_document(open.schema.to_tantivy(&entry.id, &object, doc))?;
                    }
                    // Validated when written; only a changed mapping gets here.
                    Err(e) => tracing::warn!(index = %entry.index, id = %entry.id, error = %e, "skipping a document"),
                }
            }
        }
        let payload = last.to_string();
        for (name, writer) in writers.iter_mut() {
            let mut prepared = writer.prepare_commit()?;
            prepared.set_payload(&payload);
            prepared.commit()?;
            self.indexes.open[*name].reader.reload()?;
        }
        Ok(())
    }
}

impl OpenIndex {
    /// Run `request` against the last committed state of the index.
    pub fn search(&self, request: &SearchRequest, limit: usize) -> Result<SearchResponse, QueryError> {
        use tantivy::collector::{Count, TopDocs};
        use tantivy::query::{AllQuery, BooleanQuery, ConstScoreQuery, Occur, Query, QueryParser};
        use tantivy::schema::Value as _;

        let invalid = |e: &dyn std::fmt::Display| QueryError::Invalid(e.to_string());
        check_query("q", &request.q)?;
        check_query("filter", &request.filter)?;
        let mut facet_names: Vec<&str> = Vec::new();
        for name in request.facets.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !facet_names.contains(&name) {
                facet_names.push(name);
            }
            if facet_names.len() > MAX_FACETS {
                return Err(invalid(&format!("facets: at most {MAX_FACETS} distinct fields may be counted at once")));
            }
        }
        for name in &facet_names {
            match self.schema.field(name) {
                Some((m, _)) if m.type_ == FieldType::Keyword && m.fast => {}
                _ => return Err(invalid(&format!("facets: {name:?} is not a fast keyword field of this index"))),
            }
        }
        let searcher = self.reader.searcher();
        let parser = QueryParser::for_index(&self.index, self.schema.text_fields());
        let main: Box<dyn Query> = if request.q.trim().is_empty() {
            Box::new(AllQuery)
        } else {
            parser.parse_query(&request.q).map_err(|e| QueryError::Invalid(format!("q: {e}")))?
        };
        let query: Box<dyn Query> = if request.filter.trim().is_empty() {
            main
        } else {
            let filter =
                parser.parse_query(&request.filter).map_err(|e| QueryError::Invalid(format!("filter: {e}")))?;
            Box::new(BooleanQuery::new(vec![
                (Occur::Must, main),
                (Occur::Must, Box::new(ConstScoreQuery::new(filter, 0.0))),
            ]))
        };

        let top = TopDocs::with_limit(limit).and_offset(request.offset);
        let (total, hits): (usize, Vec<(SearchHit, tantivy::DocAddress)>) = match request.sort.trim() {
            "" | "_score" => {
                let (total, docs) = searcher.search(&query, &(Count, top.order_by_score()))?;
                let hit = |score| SearchHit { id: None, score: Some(score), sort: None, document: None };
                (total, docs.into_iter().map(|(s, a)| (hit(s), a)).collect())
            }
            sort => {
                let (name, order) = match sort.rsplit_once(':') {
                    Some((name, "asc")) => (name, tantivy::Order::Asc),
                    Some((name, "desc")) => (name, tantivy::Order::Desc),
                    _ => return Err(invalid(&format!("sort {sort:?}: use _score or <field>:asc|desc"))),
                };
                let Some((mapping, _)) = self.schema.field(name).filter(|(m, _)| m.fast) else {
                    return Err(invalid(&format!("sort: {name:?} is not a fast field of this index")));
                };
                let wrap = |v: Value| SearchHit { id: None, score: None, sort: Some(v), document: None };
                match mapping.type_ {
                    FieldType::I64 => {
                        let (t, d) = searcher.search(&query, &(Count, top.order_by_fast_field::<i64>(name, order)))?;
                        (t, d.into_iter().map(|(v, a)| (wrap(serde_json::json!(v)), a)).collect())
                    }
                    FieldType::F64 => {
                        let (t, d) = searcher.search(&query, &(Count, top.order_by_fast_field::<f64>(name, order)))?;
                        (t, d.into_iter().map(|(v, a)| (wrap(serde_json::json!(v)), a)).collect())
                    }
                    FieldType::Date => {
                        let collector = top.order_by_fast_field::<DateTime>(name, order);
                        let (t, d) = searcher.search(&query, &(Count, collector))?;
                        let ms = |v: Option<DateTime>| serde_json::json!(v.map(DateTime::into_timestamp_millis));
                        (t, d.into_iter().map(|(v, a)| (wrap(ms(v)), a)).collect())
                    }
                    FieldType::Keyword => {
                        let (t, d) = searcher.search(&query, &(Count, top.order_by_string_fast_field(name, order)))?;
                        (t, d.into_iter().map(|(v, a)| (wrap(serde_json::json!(v)), a)).collect())
                    }
                    _ => {
                        return Err(invalid(&format!(
                            "sort: {name:?} is not sortable (use i64, f64, date or keyword)"
                        )));
                    }
                }
            }
        };
        let mut out = Vec::with_capacity(hits.len());
        for (mut hit, address) in hits {
            let doc: TantivyDocument = searcher.doc(address)?;
            let id = doc.get_first(self.schema.id).and_then(|v| v.as_str().map(str::to_owned));
            let source = doc.get_first(self.schema.source).and_then(|v| v.as_bytes().map(<[u8]>::to_vec));
            hit.id = id;
            hit.document =
                source.and_then(|b| serde_json::value::RawValue::from_string(String::from_utf8(b).ok()?).ok());
            out.push(hit);
        }

        // Every facet in one pass over the matching documents.
        let mut facets = Map::new();
        if !facet_names.is_empty() {
            let request: Map<String, Value> = facet_names
                .iter()
                .map(|n| (n.to_string(), serde_json::json!({ "terms": { "field": n, "size": 1000 } })))
                .collect();
            let aggs: tantivy::aggregation::agg_req::Aggregations =
                serde_json::from_value(Value::Object(request)).map_err(|e| invalid(&e))?;
            let collector = tantivy::aggregation::AggregationCollector::from_aggs(
                aggs,
                tantivy::aggregation::AggContextParams::new(Default::default(), self.index.tokenizers().clone()),
            );
            let result = serde_json::to_value(searcher.search(&query, &collector)?).map_err(|e| invalid(&e))?;
            for name in facet_names {
                let buckets: Vec<Value> = result[name]["buckets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| serde_json::json!({"value": b["key"], "count": b["doc_count"]}))
                    .collect();
                facets.insert(name.to_owned(), Value::Array(buckets));
            }
        }
        Ok(SearchResponse { total, hits: out, facets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, type_: FieldType) -> FieldMapping {
        FieldMapping { name: name.into(), type_, stored: true, fast: true }
    }

    fn orders() -> IndexSchema {
        let mapping = IndexMapping {
            name: "orders".into(),
            fields: vec![
                field("status", FieldType::Keyword),
                field("total", FieldType::F64),
                field("count", FieldType::I64),
                field("at", FieldType::Date),
                field("gift", FieldType::Bool),
                FieldMapping { name: "description".into(), type_: FieldType::Text, stored: false, fast: false },
            ],
        };
        IndexSchema::new(&mapping).unwrap()
    }

    #[test]
    fn documents_are_checked_against_the_mapping() {
        let schema = orders();
        let ok =
            br#"{"status":"paid","total":1.5,"count":2,"at":"2023-11-14T22:13:20Z","gift":false,"description":null}"#;
        assert!(schema.validate(ok).is_ok());
        assert!(schema.validate(br#"{"at":1700000000000,"status":["a","b"]}"#).is_ok());
        for (doc, needle) in [
            (&br#"{"status":1}"#[..], "mapped as keyword"),
            (br#"{"count":1.5}"#, "mapped as i64"),
            (br#"{"at":"yesterday"}"#, "mapped as date"),
            // Past what tantivy holds (nanoseconds in an i64: 1677 to 2262).
            (br#"{"at":9223372036854775}"#, "mapped as date"),
            (br#"{"at":"9999-01-01T00:00:00Z"}"#, "mapped as date"),
            (br#"{"gift":"yes"}"#, "mapped as bool"),
            (br#"{"colour":"red"}"#, "not in the mapping"),
            (br#"[1,2]"#, "must be a JSON object"),
            (br#"{oops"#, "not JSON"),
        ] {
            let err = schema.validate(doc).unwrap_err();
            assert!(err.contains(needle), "{}: {err}", String::from_utf8_lossy(doc));
        }
    }

    #[test]
    fn the_scanning_check_agrees_with_parsing_the_document() {
        let schema = orders();
        let values = [
            "null",
            "true",
            "1",
            "-1",
            "1.5",
            "18446744073709551615",
            "9223372036854775808",
            "\"paid\"",
            "\"2023-11-14T22:13:20Z\"",
            "\"yesterday\"",
            "[]",
            "[1,2]",
            "[\"a\",\"b\"]",
            "[null]",
            "[[1]]",
            "[1,\"a\"]",
            "{}",
            "{\"a\":1}",
            "1700000000000",
        ];
        let mut docs: Vec<String> =
            vec!["{}".into(), "[]".into(), "1".into(), "{".into(), r#"{"status":"a"} x"#.into()];
        for name in ["status", "total", "count", "at", "gift", "description", "other", "st\\u0061tus"] {
            for value in values {
                docs.push(format!(r#"{{"{name}":{value}}}"#));
                docs.push(format!(r#"{{"status":"paid","{name}":{value},"total":2}}"#));
            }
        }
        docs.push(r#"{"status":1,"status":"a"}"#.into()); // a duplicate: the last one counts in both
        for doc in &docs {
            let (fast, parsed) = (schema.validate(doc.as_bytes()), schema.parse(doc.as_bytes()).map(drop));
            assert_eq!(fast, parsed, "{doc}");
        }
    }

    #[test]
    fn nesting_counts_groups_and_not_chains_outside_phrases() {
        assert_eq!(nesting("lamp"), 0);
        assert_eq!(nesting("(lamp OR chair) AND (red)"), 1);
        assert_eq!(nesting("((a))"), 2);
        assert_eq!(nesting("NOT NOT NOT a"), 3);
        assert_eq!(nesting("NOT (NOT (a))"), 4);
        assert_eq!(nesting("(a) (b) (c)"), 1);
        assert_eq!(nesting(r#""((((" \(\("#), 0);
        assert_eq!(nesting("NOTE NOTHING"), 0);
        assert_eq!(nesting(&format!("{}a{}", "(".repeat(40), ")".repeat(40))), 40);
        assert!(check_query("q", &"(".repeat(33)).is_err());
        assert!(check_query("q", &"a ".repeat(3000)).is_err());
        assert!(check_query("q", "status:paid AND total:[10 TO 100]").is_ok());
    }

    #[test]
    fn invalid_mappings_are_refused() {
        let bad = |fields: Vec<FieldMapping>| IndexSchema::new(&IndexMapping { name: "i".into(), fields }).err();
        assert!(bad(vec![]).unwrap().contains("no fields"));
        assert!(bad(vec![field("_id", FieldType::Keyword)]).unwrap().contains("invalid field name"));
        assert!(bad(vec![field("a.b", FieldType::Keyword)]).unwrap().contains("invalid field name"));
        let twice = bad(vec![field("a", FieldType::Keyword), field("a", FieldType::Text)]).unwrap();
        assert!(twice.contains("mapped twice"));
        assert!(
            IndexSchema::new(&IndexMapping { name: "../x".into(), fields: vec![field("a", FieldType::Bool)] }).is_err()
        );
    }

    #[test]
    fn only_stored_fields_come_back_in_the_source() {
        let schema = orders();
        let original = br#"{"status":"paid","description":"red chair"}"#;
        let object = schema.parse(original).unwrap();
        let doc = schema.to_tantivy("o-1", &object, original);
        use tantivy::schema::Value as _;
        let source = doc.get_first(schema.source).and_then(|v| v.as_bytes().map(<[u8]>::to_vec)).unwrap();
        assert_eq!(source, br#"{"status":"paid"}"#);
    }
}
