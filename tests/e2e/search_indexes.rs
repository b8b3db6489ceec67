//! A projection maintains a tantivy search index through the outbox; users
//! search it over HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, encode, ndjson, plugins, reference};

/// The expected search documents: the reference fold plus text fields.
fn expected_documents(events: &[Value]) -> BTreeMap<String, Value> {
    let folded = reference::orders(events);
    let mut text: BTreeMap<String, (String, String)> = BTreeMap::new();
    for e in events.iter().filter(|e| e["type"] == "OrderPlaced") {
        let d = &e["data"];
        let skus: Vec<&str> = d["items"].as_array().unwrap().iter().map(|i| i["sku"].as_str().unwrap()).collect();
        text.entry(d["orderId"].as_str().unwrap().to_owned())
            .or_insert((d["description"].as_str().unwrap().to_owned(), skus.join(" ")));
    }
    folded
        .orders
        .into_iter()
        .map(|(id, o)| {
            let (description, items) = &text[&id];
            let doc = json!({"orderId": id, "customer": o["customerId"], "status": o["status"], "total": o["total"],
                             "paid": o["paid"], "updatedAt": o["updatedAt"], "description": description, "items": items});
            (id, doc)
        })
        .collect()
}

fn wait_searchable(server: &Server, projection: &str) {
    server.wait_caught_up();
    for _ in 0..400 {
        let status = server.get(&format!("/v1/projections/{projection}"));
        if status["indexes"].as_array().unwrap().iter().all(|i| i["lag"] == 0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the index did not catch up: {}", server.get(&format!("/v1/projections/{projection}")));
}

fn search(server: &Server, params: &str) -> Value {
    server.get(&format!("/v1/projections/order-search/indexes/orders/search?{params}"))
}

/// Every hit of a search, paging with offset.
fn all_hits(server: &Server, params: &str) -> Vec<Value> {
    let mut hits = Vec::new();
    loop {
        let page = search(server, &format!("{params}&limit=1000&offset={}", hits.len()));
        let got = page["hits"].as_array().unwrap().clone();
        let done = got.len() < 1000;
        hits.extend(got);
        if done {
            return hits;
        }
    }
}

fn ids(hits: &[Value]) -> BTreeSet<String> {
    hits.iter().map(|h| h["id"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn search_results_equal_a_reference_over_a_generated_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.order_search], "search:\n  commit-interval-ms: 100\n");
    let events = refract_client::fixtures::orders(6000, 77, 0.0);
    let reply = server.client().append_ndjson("orders", &ndjson(&events)).unwrap();
    assert_eq!(reply.status, 200);
    wait_searchable(&server, "order-search");
    let docs = expected_documents(&events);

    // Everything, with the stored documents.
    let hits = all_hits(&server, "q=");
    assert_eq!(hits.len(), docs.len());
    let got: BTreeMap<String, Value> =
        hits.iter().map(|h| (h["id"].as_str().unwrap().to_owned(), h["document"].clone())).collect();
    assert!(got == docs, "stored documents differ from the reference");

    // Term filter on a keyword.
    let paid: BTreeSet<String> = docs.iter().filter(|(_, d)| d["status"] == "paid").map(|(k, _)| k.clone()).collect();
    assert_eq!(ids(&all_hits(&server, "filter=status:paid")), paid);
    assert_eq!(search(&server, "filter=status:paid&limit=1")["total"], paid.len());

    // Phrase over a text field.
    let phrase: BTreeSet<String> = docs
        .iter()
        .filter(|(_, d)| {
            let words: Vec<&str> = d["description"].as_str().unwrap().split(' ').collect();
            words.windows(2).any(|w| w == ["red", "chair"])
        })
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!phrase.is_empty());
    assert_eq!(ids(&all_hits(&server, &format!("q={}", encode("\"red chair\"")))), phrase);

    // Numeric range, combined with a text query.
    let in_range: BTreeSet<String> = docs
        .iter()
        .filter(|(_, d)| (100.0..=200.0).contains(&d["total"].as_f64().unwrap()))
        .filter(|(_, d)| d["description"].as_str().unwrap().split(' ').any(|w| w == "lamp"))
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(ids(&all_hits(&server, &format!("q=lamp&filter={}", encode("total:[100 TO 200]")))), in_range);

    // Sort by a fast field.
    let mut totals: Vec<f64> = docs.values().map(|d| d["total"].as_f64().unwrap()).collect();
    totals.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let top = search(&server, "sort=total:desc&limit=10");
    let sorted: Vec<f64> = top["hits"].as_array().unwrap().iter().map(|h| h["sort"].as_f64().unwrap()).collect();
    assert_eq!(sorted, totals[..10]);
    let second_page = search(&server, "sort=total:desc&limit=10&offset=10");
    assert_eq!(second_page["hits"][0]["sort"].as_f64().unwrap(), totals[10]);

    // Facet counts on a keyword, under a filter.
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    for d in docs.values().filter(|d| d["total"].as_f64().unwrap() >= 50.0) {
        *by_status.entry(d["status"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let faceted = search(&server, &format!("filter={}&facets=status&limit=1", encode("total:[50 TO *]")));
    let got: BTreeMap<String, u64> = faceted["facets"]["status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["value"].as_str().unwrap().to_owned(), b["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, by_status);

    // Bad requests say what is wrong, with a 400.
    let client = server.client();
    for (params, needle) in [
        ("q=total:%5B10%20TO", "q:"),
        ("sort=description:asc", "not a fast field"),
        ("facets=description", "not a fast keyword field"),
        ("sort=total", "use _score or"),
    ] {
        let reply = client.get(&format!("/v1/projections/order-search/indexes/orders/search?{params}")).unwrap();
        assert_eq!(reply.status, 400, "{params}: {}", reply.body);
        assert!(reply.body["error"]["message"].as_str().unwrap().contains(needle), "{params}: {}", reply.body);
    }
    let missing = client.get("/v1/projections/order-search/indexes/nope/search").unwrap();
    assert_eq!((missing.status, missing.body["error"]["code"].as_str()), (404, Some("index_not_found")));
}

#[test]
fn documents_that_do_not_fit_the_mapping_are_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.chaos], "search:\n  commit-interval-ms: 100\n");
    let events = vec![
        json!({"type": "Index", "key": "k", "data": {"n": 1, "tag": "a"}}),
        json!({"type": "Index", "key": "k", "data": {"n": "one", "tag": "b"}}),
        json!({"type": "Index", "key": "k", "data": {"n": 3, "colour": "red"}}),
        json!({"type": "Index", "key": "k", "data": {"n": 4, "tag": ["c", "d"]}}),
    ];
    server.client().append_ndjson("chaos", &ndjson(&events)).unwrap();
    server.wait_caught_up();
    let letters = server.get("/v1/projections/testkit-chaos/dead-letters");
    let errors: Vec<&str> =
        letters["deadLetters"].as_array().unwrap().iter().map(|l| l["error"].as_str().unwrap()).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("field \"n\" is mapped as i64"), "{errors:?}");
    assert!(errors[1].contains("field \"colour\" is not in the mapping"), "{errors:?}");
    wait_searchable(&server, "testkit-chaos");
    let hits = server.get("/v1/projections/testkit-chaos/indexes/docs/search?filter=tag:d");
    assert_eq!(hits["total"], 1);
    assert_eq!(hits["hits"][0]["document"], json!({"n": 4, "tag": ["c", "d"]}));
    assert_eq!(server.get("/v1/projections/testkit-chaos/indexes/docs/search")["total"], 2);
}

#[test]
fn sigkill_between_the_table_and_index_commits_loses_and_doubles_no_document() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    // Small batches and a slow index commit: kills land between the two commits.
    let config = "batch:\n  max-events: 300\n  max-duration-ms: 20\nsearch:\n  commit-interval-ms: 400\n";
    let mut server = Server::start(dir.path(), &[&p.order_search], config);
    let events = refract_client::fixtures::orders(8000, 5150, 0.0);
    let mut rng = refract_client::fixtures::Rng::new(7);
    let mut kills_behind = 0;
    for (round, chunk) in events.chunks(1000).enumerate() {
        let reply = server.client().append_ndjson("orders", &ndjson(chunk)).unwrap();
        assert_eq!(reply.status, 200);
        std::thread::sleep(Duration::from_millis(rng.range(0, 300)));
        if round % 2 == 0 {
            // Kill as soon as the tables are ahead of the index (the window the
            // test is about), or after a second if that moment was missed.
            let until = std::time::Instant::now() + Duration::from_secs(1);
            let behind = loop {
                let status = server.get("/v1/projections/order-search");
                if status["indexes"][0]["lag"].as_u64().unwrap() > 0 {
                    break true;
                }
                if std::time::Instant::now() >= until {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            kills_behind += usize::from(behind);
            server.kill();
            server.restart();
        }
    }
    assert!(kills_behind >= 1, "no kill landed between a table commit and the index commit");
    wait_searchable(&server, "order-search");
    let docs = expected_documents(&events);
    let hits = all_hits(&server, "q=");
    let total = search(&server, "q=&limit=1")["total"].as_u64().unwrap();
    assert_eq!(total as usize, docs.len(), "documents missing or duplicated in the index");
    let got: BTreeMap<String, Value> =
        hits.iter().map(|h| (h["id"].as_str().unwrap().to_owned(), h["document"].clone())).collect();
    assert!(got == docs, "indexed documents differ from the table-side truth");
    let table = server.table("order-search", "orders");
    assert_eq!(table.len(), docs.len());
}

/// Queries an attacker would send: a group nested 30,000 deep (tantivy's
/// parser recurses once per level), a `NOT` chain, a query too long to be a
/// question, and 20 facets. Each is a 400 that says why, and the server keeps
/// answering. One facet asked 8,000 times is counted once.
#[test]
fn hostile_queries_are_refused_with_a_reason_and_the_server_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let mut server = Server::start(dir.path(), &[&p.order_search], "search:\n  commit-interval-ms: 100\n");
    let events = refract_client::fixtures::orders(200, 3, 0.0);
    server.client().append_ndjson("orders", &ndjson(&events)).unwrap();
    wait_searchable(&server, "order-search");
    let client = server.client();
    let path = "/v1/projections/order-search/indexes/orders/search";
    let refused = |params: String, reason: &str| {
        let reply = client.get(&format!("{path}?{params}")).expect("the server answers");
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert!(reply.body.to_string().contains(reason), "{reason:?} not in {}", reply.body);
    };
    // Parentheses need no escaping in a query string; 30,000 keeps the URI under 64 KiB.
    let deep = format!("{}a{}", "(".repeat(30_000), ")".repeat(30_000));
    refused(format!("q={deep}"), "longer than");
    let nested = format!("{}a{}", "(".repeat(1_000), ")".repeat(1_000));
    refused(format!("q={}", encode(&nested)), "nested");
    refused(format!("filter={}", encode(&nested)), "nested");
    refused(format!("q={}", encode(&format!("{}lamp", "NOT ".repeat(500)))), "nested");
    refused(format!("q={}", encode(&"lamp ".repeat(2_000))), "longer than");
    refused(format!("facets={}", (0..20).map(|i| format!("f{i}")).collect::<Vec<_>>().join(",")), "facets");

    // What a person asks still works: nesting a few levels deep; a facet
    // asked 8,000 times is counted once.
    let fine = format!("q={}&facets={}", encode("((lamp OR chair) AND NOT (red))"), "status,".repeat(8_000));
    let reply = client.get(&format!("{path}?{fine}")).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["facets"].as_object().unwrap().len(), 1, "{}", reply.body);
    assert_eq!(client.get("/healthz").unwrap().status, 200);
    server.stop();
}
