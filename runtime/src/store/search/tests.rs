use super::query::{check_query, nesting};
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
    let ok = br#"{"status":"paid","total":1.5,"count":2,"at":"2023-11-14T22:13:20Z","gift":false,"description":null}"#;
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
    let mut docs: Vec<String> = vec!["{}".into(), "[]".into(), "1".into(), "{".into(), r#"{"status":"a"} x"#.into()];
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

/// Three shards' answers merged are the answer of one index holding every
/// document: the same page (by sort value), total and facet counts.
#[test]
fn shards_merged_answer_as_one_index_holding_everything() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| OpenIndex::open(&dir.path().join(name), orders()).unwrap();
    let all = open("all");
    let shards = [open("s0"), open("s1"), open("s2")];
    let add = |index: &OpenIndex, id: &str, doc: &str| {
        let object = index.schema.parse(doc.as_bytes()).unwrap();
        let document = index.schema.to_tantivy(id, &object, doc.as_bytes());
        index.writer.lock().unwrap().add_document(document).unwrap();
    };
    for i in 0..60usize {
        let doc = format!(
            r#"{{"status": "{}", "total": {}, "count": {}, "description": "{}"}}"#,
            ["paid", "open", "shipped", "paid"][i % 4],
            (i * 37 % 61) as f64 / 2.0,
            i * 7 % 13,
            if i % 5 == 0 { "gift wrap" } else { "plain box" }
        );
        let id = format!("o-{i}");
        add(&all, &id, &doc);
        add(&shards[i * 7 % 3], &id, &doc);
    }
    for index in shards.iter().chain([&all]) {
        index.writer.lock().unwrap().commit().unwrap();
        index.reader.reload().unwrap();
    }
    let request = |sort: &str, q: &str, offset: usize| SearchRequest {
        q: q.into(),
        sort: sort.into(),
        offset,
        facets: "status".into(),
        ..Default::default()
    };
    let limit = 10;
    for r in [
        request("total:desc", "", 5),
        request("total:asc", "", 0),
        request("count:asc", "", 12),
        request("status:desc", "", 30),
        request("", "gift", 2),
    ] {
        let one = all.search(&r, limit).unwrap();
        let each = SearchRequest { offset: 0, ..r.clone() };
        let answers = shards.iter().map(|s| s.search(&each, r.offset + limit).unwrap()).collect();
        let merged = merge(&r, limit, answers);
        assert_eq!(merged.total, one.total, "{:?}", r.sort);
        assert_eq!(merged.facets, one.facets, "{:?}", r.sort);
        assert_eq!(merged.hits.len(), one.hits.len(), "{:?}", r.sort);
        if r.q.is_empty() {
            // By sort value: equal values may come in another order across shards.
            let values = |hits: &[SearchHit]| hits.iter().map(|h| h.sort.clone()).collect::<Vec<_>>();
            assert_eq!(values(&merged.hits), values(&one.hits), "{:?}", r.sort);
        } else {
            // Scores are each shard's own: highest first, every hit a match.
            let scores: Vec<f32> = merged.hits.iter().map(|h| h.score.unwrap()).collect();
            assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        }
        if r.sort == "total:desc" {
            // Unique values: the very same documents.
            let ids = |hits: &[SearchHit]| hits.iter().map(|h| h.id.clone()).collect::<Vec<_>>();
            assert_eq!(ids(&merged.hits), ids(&one.hits));
        }
    }
}
