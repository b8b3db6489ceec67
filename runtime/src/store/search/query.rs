//! Searches: what a request may ask (bounded), and running it on an index.

use serde_json::{Map, Value};
use tantivy::{DateTime, TantivyDocument};

use super::index::OpenIndex;
use super::schema::FieldType;

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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SearchResponse {
    pub total: usize,
    pub hits: Vec<SearchHit>,
    pub facets: Map<String, Value>,
    /// Shards a partial answer (`partial=true`) left out: the total, hits
    /// and facets are those of the others.
    #[serde(default, rename = "missingShards", skip_serializing_if = "Vec::is_empty")]
    pub missing_shards: Vec<u32>,
}

/// One hit: the document as the projection stored it, and its score or the
/// value it was sorted by.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

/// Several shards' answers to one request, as one. Each shard was asked for
/// its first `request.offset + limit` hits (from offset 0): the page is
/// among them. Hits merge by score (highest first) or by the sort value in
/// the sort's direction, ties in shard order; totals and facet counts add
/// up. Scores are each shard's own (its term statistics), as in
/// Elasticsearch's default `query_then_fetch`.
pub fn merge(request: &SearchRequest, limit: usize, shards: Vec<SearchResponse>) -> SearchResponse {
    use std::cmp::Ordering;
    let descending = match request.sort.trim() {
        "" | "_score" => true,
        sort => sort.ends_with(":desc"),
    };
    let by_value = |a: &SearchHit, b: &SearchHit| match (&a.score, &b.score) {
        (Some(x), Some(y)) => x.partial_cmp(y).unwrap_or(Ordering::Equal),
        _ => compare_json(a.sort.as_ref(), b.sort.as_ref()),
    };
    let total = shards.iter().map(|r| r.total).sum();
    let mut facets: Map<String, Value> = Map::new();
    let mut counts: Vec<(String, Vec<(Value, u64)>)> = Vec::new();
    let mut hits: Vec<(usize, usize, SearchHit)> = Vec::new();
    for (shard, response) in shards.into_iter().enumerate() {
        hits.extend(response.hits.into_iter().enumerate().map(|(rank, hit)| (shard, rank, hit)));
        for (name, buckets) in response.facets {
            let at = match counts.iter().position(|(n, _)| *n == name) {
                Some(at) => at,
                None => {
                    counts.push((name, Vec::new()));
                    counts.len() - 1
                }
            };
            for bucket in buckets.as_array().into_iter().flatten() {
                let (value, count) = (bucket["value"].clone(), bucket["count"].as_u64().unwrap_or(0));
                match counts[at].1.iter_mut().find(|(v, _)| *v == value) {
                    Some((_, c)) => *c += count,
                    None => counts[at].1.push((value, count)),
                }
            }
        }
    }
    hits.sort_by(|(sa, ra, a), (sb, rb, b)| {
        let order = by_value(a, b);
        let order = if descending { order.reverse() } else { order };
        order.then((sa, ra).cmp(&(sb, rb)))
    });
    let hits = hits.into_iter().skip(request.offset).take(limit).map(|(_, _, hit)| hit).collect();
    for (name, mut buckets) in counts {
        // As a terms aggregation orders them: most documents first.
        buckets.sort_by(|(va, ca), (vb, cb)| cb.cmp(ca).then_with(|| compare_json(Some(va), Some(vb))));
        let buckets = buckets.into_iter().map(|(value, count)| serde_json::json!({"value": value, "count": count}));
        facets.insert(name, Value::Array(buckets.collect()));
    }
    SearchResponse { total, hits, facets, missing_shards: Vec::new() }
}

/// Sort values in order: missing first, then numbers, then strings.
fn compare_json(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let rank = |v: Option<&Value>| match v {
        None | Some(Value::Null) => 0,
        Some(Value::Number(_)) => 1,
        _ => 2,
    };
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => x.as_f64().partial_cmp(&y.as_f64()).unwrap_or(Ordering::Equal),
        },
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
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
pub(super) fn check_query(what: &str, text: &str) -> Result<(), QueryError> {
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
pub(super) fn nesting(text: &str) -> usize {
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
        Ok(SearchResponse { total, hits: out, facets, missing_shards: Vec::new() })
    }
}
