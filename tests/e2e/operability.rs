//! Operability: Prometheus metrics that move with ingest and show the lag
//! of a projection that stopped consuming.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, ndjson, plugins};

/// The value of the series `series` (name and labels, exactly as exposed).
fn metric(text: &str, series: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"));
    line[series.len() + 1..].parse().unwrap()
}

fn scrape(server: &Server) -> String {
    let reply = server.client().get("/metrics").unwrap();
    assert_eq!(reply.status, 200);
    reply.body.as_str().expect("metrics are text").to_owned()
}

#[test]
fn metrics_move_with_ingest_and_show_the_lag_of_a_paused_projection() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let config = "plugins:\n  testkit-chaos:\n    limits: { pause-after-dead-letters: 5 }\n";
    let server = Server::start(dir.path(), &[&p.order_summary, &p.order_search, &p.chaos], config);
    let text = scrape(&server);
    for family in [
        "# TYPE refract_events_applied_total counter",
        "# TYPE refract_batch_duration_seconds histogram",
        "# TYPE refract_partition_lag_events gauge",
        "# TYPE refract_http_requests_total counter",
        "# TYPE refract_compile_cache_misses_total counter",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    let applied = "refract_events_applied_total{projection=\"order-summary\",kind=\"projection\"}";
    assert_eq!(metric(&text, applied), 0.0);
    let compiles =
        metric(&text, "refract_compile_cache_misses_total") + metric(&text, "refract_compile_cache_hits_total");
    assert_eq!(compiles, 3.0, "one load per plugin");

    // Ingest: the counters move, and agree with the status API.
    let events = refract_client::fixtures::orders(2_000, 51, 0.01);
    assert_eq!(server.client().append_ndjson("orders", &ndjson(&events)).unwrap().status, 200);
    server.wait_caught_up();
    let text = scrape(&server);
    let status = server.get("/v1/projections/order-summary");
    assert_eq!(metric(&text, applied), status["eventsApplied"].as_f64().unwrap());
    assert!(metric(&text, applied) > 1_900.0);
    let summary = "{projection=\"order-summary\",kind=\"projection\"}";
    assert_eq!(metric(&text, &format!("refract_batches_total{summary}")), status["batches"].as_f64().unwrap());
    assert_eq!(metric(&text, &format!("refract_dead_letters_total{summary}")), status["deadLetters"].as_f64().unwrap());
    assert!(metric(&text, &format!("refract_plugin_seconds_total{summary}")) > 0.0);
    assert!(metric(&text, &format!("refract_storage_seconds_total{summary}")) > 0.0);
    assert!(metric(&text, "refract_batch_duration_seconds_count{projection=\"order-summary\"}") > 0.0);
    assert_eq!(metric(&text, &format!("refract_lag_events{summary}")), 0.0);
    let search = server.get("/v1/projections/order-search");
    assert_eq!(
        metric(&text, "refract_index_documents{projection=\"order-search\",index=\"orders\"}"),
        search["indexes"][0]["documents"].as_f64().unwrap()
    );
    let appends = "refract_http_requests_total{method=\"POST\",route=\"/v1/streams/{stream}/events\",status=\"200\"}";
    assert_eq!(metric(&text, appends), 1.0);

    // A projection that stops consuming (paused after 5 dead letters in a
    // row) shows the lag growing with every event appended after it.
    let event = |ty: &str, n: usize| json!({"type": ty, "key": "one-partition", "data": {"n": n}});
    let mut chaos: Vec<Value> = (0..10).map(|n| event("Reject", n)).collect();
    chaos.extend((10..50).map(|n| event("Ok", n)));
    assert_eq!(server.client().append_ndjson("chaos", &ndjson(&chaos)).unwrap().status, 200);
    let until = Instant::now() + Duration::from_secs(60);
    while server.get("/v1/projections/testkit-chaos")["state"] != "paused" {
        assert!(Instant::now() < until, "testkit-chaos never paused");
        std::thread::sleep(Duration::from_millis(50));
    }
    let chaos_labels = "{projection=\"testkit-chaos\",kind=\"projection\"}";
    let text = scrape(&server);
    assert_eq!(metric(&text, "refract_up{projection=\"testkit-chaos\",state=\"paused\"}"), 1.0);
    assert_eq!(metric(&text, "refract_up{projection=\"testkit-chaos\",state=\"running\"}"), 0.0);
    assert_eq!(metric(&text, &format!("refract_lag_events{chaos_labels}")), 45.0, "50 appended, 5 dead-lettered");
    let more: Vec<Value> = (50..70).map(|n| event("Ok", n)).collect();
    assert_eq!(server.client().append_ndjson("chaos", &ndjson(&more)).unwrap().status, 200);
    let text = scrape(&server);
    assert_eq!(metric(&text, &format!("refract_lag_events{chaos_labels}")), 65.0);
    let per_partition: f64 = text
        .lines()
        .filter(|l| l.starts_with("refract_partition_lag_events{projection=\"testkit-chaos\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(per_partition, 65.0);
}

#[test]
fn logs_carry_each_batch_s_projection_version_and_positions_as_text_or_json_and_status_prints_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[&plugins().chaos], "");
    let event = |ty: &str| json!({"type": ty, "key": "k", "data": {}});
    assert_eq!(server.client().append_ndjson("chaos", &ndjson(&[event("Ok"), event("Reject")])).unwrap().status, 200);
    server.wait_caught_up();
    // Text: the dead letter's warning sits inside its batch's span.
    let log = server.log();
    let line = log.lines().find(|l| l.contains("dead-lettering an event")).expect("a dead-letter warning");
    assert!(line.contains("batch{projection=\"testkit-chaos\" version=\"0.1.0\""), "{line}");
    assert!(line.contains("positions=chaos/"), "{line}");

    // JSON: one object per line, the span's fields under `span`.
    server.stop();
    std::fs::write(dir.path().join("refract.log"), "").unwrap();
    server.env.push(("REFRACT_LOG_FORMAT".into(), "json".into()));
    server.restart();
    assert_eq!(server.client().append_ndjson("chaos", &ndjson(&[event("Reject")])).unwrap().status, 200);
    server.wait_caught_up();
    let log = server.log();
    let warning: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "dead-lettering an event")
        .unwrap_or_else(|| panic!("no JSON dead-letter warning in\n{log}"));
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["span"]["name"], "batch", "{warning}");
    assert_eq!(warning["span"]["projection"], "testkit-chaos", "{warning}");
    assert_eq!(warning["span"]["version"], "0.1.0", "{warning}");

    // `refract status`: a table with a row per projection.
    let out = server.cli(&["status"], None);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for column in ["NAME", "KIND", "STATE", "APPLIED", "LAG", "DEAD", "LAST ERROR"] {
        assert!(header.contains(column), "{table}");
    }
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["testkit-chaos", "projection", "running"], "{table}");
}
