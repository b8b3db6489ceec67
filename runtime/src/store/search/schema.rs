//! Index mappings compiled to tantivy schemas, and documents checked against them.

use std::collections::HashMap;

use serde_json::{Map, Value};
use tantivy::schema::{
    DateOptions, FAST, Field, INDEXED, NumericOptions, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::{DateTime, TantivyDocument};

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
