//! Plugins in any language: the same projection in Rust, Python and
//! JavaScript builds the same read model, and `refract plugin new` +
//! `refract plugin build` + `refract plugin test` give a plugin a running
//! runtime loads, for each.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use refract::store::ReadModel;
use serde_json::{Value, json};

use crate::support::{Server, lang_plugins, ndjson, plugins};

const EVENTS: usize = 10_000;

/// A table's rows: key and raw value bytes, in key order.
type Rows = Vec<(String, Vec<u8>)>;

/// What a projection built: every table's rows (key, raw bytes), its search
/// documents in `orderId` order, and the positions of its dead letters.
struct Projected {
    tables: Vec<(String, Rows)>,
    documents: Vec<Value>,
    dead: Vec<(String, u32, u64)>,
}

/// Run `plugin` (providing `projection`) over `events`, stop, and read its
/// read model's files and search documents.
fn project(plugin: &Path, projection: &str, tables: &[&str], events: &[Value]) -> Projected {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[plugin], "search:\n  commit-interval-ms: 100\n");
    let mut wait_for = String::new();
    for chunk in events.chunks(2_000) {
        let reply = server.client().append_ndjson("orders", &ndjson(chunk)).unwrap();
        assert_eq!(reply.status, 200);
        wait_for = reply.body["waitFor"].as_str().unwrap().to_owned();
    }
    let status = server.wait_checkpoints(projection, events.len() as u64);
    assert_eq!(status["retries"], 0, "{status}");
    let mut documents = Vec::new();
    if !status["indexes"].as_array().unwrap().is_empty() {
        // Every page waits for the index to have applied everything appended.
        for offset in (0..).step_by(1_000) {
            let page = server.get(&format!(
                "/v1/projections/{projection}/indexes/orders/search?sort=orderId:asc&limit=1000&offset={offset}&wait_for={}",
                crate::support::encode(&wait_for)
            ));
            let hits = page["hits"].as_array().unwrap();
            documents.extend(hits.iter().map(|h| h["document"].clone()));
            if hits.len() < 1_000 {
                break;
            }
        }
    }
    server.stop();
    let path = dir.path().join(format!("data/projections/{projection}/read-model.redb"));
    let read_model = ReadModel::open(&path).unwrap();
    let tables = tables.iter().map(|t| ((*t).to_owned(), read_model.scan(t, "", None, usize::MAX).unwrap())).collect();
    // In position order: the order letters are recorded in follows how the
    // batches happened to be cut (by time, for a slow interpreter), not the events.
    let mut dead: Vec<_> = read_model
        .dead_letters(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, l)| (l.stream, l.partition, l.offset))
        .collect();
    dead.sort();
    Projected { tables, documents, dead }
}

/// `other` holds exactly `want`'s bytes, documents and dead letters.
fn assert_same(name: &str, want: &Projected, other: &Projected) {
    for ((table, want), (_, got)) in want.tables.iter().zip(&other.tables) {
        assert_eq!(got.len(), want.len(), "{name}: rows of {table}");
        for (w, g) in want.iter().zip(got) {
            assert!(
                w == g,
                "{name}: {table}/{} differs:\n rust: {}\n {name}: {}",
                w.0,
                String::from_utf8_lossy(&w.1),
                String::from_utf8_lossy(&g.1)
            );
        }
    }
    assert_eq!(other.documents.len(), want.documents.len(), "{name}: search documents");
    for (w, g) in want.documents.iter().zip(&other.documents) {
        assert_eq!(g, w, "{name}: search document");
    }
    assert_eq!(other.dead, want.dead, "{name}: the same events are dead letters");
}

#[test]
fn order_summary_and_order_search_in_rust_python_and_javascript_build_identical_read_models() {
    let mut events = refract_client::fixtures::orders(EVENTS - 5, 77, 0.01);
    // Data each language must reject the same way.
    for (i, data) in [
        json!({"orderId": 17, "customerId": "c-1", "total": 1.0}),
        json!({"orderId": "o-x1", "customerId": "c-1", "total": "12"}),
        json!({"orderId": "o-x2", "customerId": "c-1", "total": 3, "items": [{"sku": 5}]}),
        json!([1, 2]),
        json!({"orderId": "o-x3", "customerId": "c-1", "total": 3, "description": 4}),
    ]
    .into_iter()
    .enumerate()
    {
        events.insert(100 + i * 1_000, json!({"type": "OrderPlaced", "key": format!("x{i}"), "time": 5, "data": data}));
    }
    let lang = lang_plugins();
    let summary = ["orders", "customer-orders"];
    let rust = project(&plugins().order_summary, "order-summary", &summary, &events);
    let rows: usize = rust.tables.iter().map(|(_, rows)| rows.len()).sum();
    assert!(rows > 4_000, "the read model has {rows} rows");
    assert!(rust.dead.len() > 90, "{} dead letters", rust.dead.len());
    assert_same("python", &rust, &project(&lang.order_summary_py, "order-summary", &summary, &events));
    assert_same("javascript", &rust, &project(&lang.order_summary_js, "order-summary", &summary, &events));
    // Each SDK declares `orders` keyed like the events (WIT 0.1.1's `keyed-tables`).
    for plugin in [&plugins().order_summary, &lang.order_summary_py, &lang.order_summary_js] {
        let out = Command::new(env!("CARGO_BIN_EXE_refract")).args(["plugin", "check", "--json"]).arg(plugin).output();
        let checked: Value = serde_json::from_slice(&out.unwrap().stdout).unwrap();
        assert_eq!(checked["keyedTables"], json!([{"table": "orders", "separator": null}]), "{}", plugin.display());
    }

    let rust = project(&plugins().order_search, "order-search", &["orders"], &events);
    assert!(rust.documents.len() > 3_000, "{} search documents", rust.documents.len());
    assert_same("python", &rust, &project(&lang.order_search_py, "order-search", &["orders"], &events));
    assert_same("javascript", &rust, &project(&lang.order_search_js, "order-search", &["orders"], &events));
}

/// Run `program args` in `dir`, asserting it succeeds; its standard output.
fn run(dir: &Path, program: &str, args: &[&str], env: &[(&str, &Path)]) -> String {
    let output = command(dir, program, args, env);
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Run `program args` in `dir` to its end.
fn command(dir: &Path, program: &str, args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut command = Command::new(program);
    command.current_dir(dir).args(args);
    // The nested cargo of a Rust plugin must not inherit this build's flags.
    for k in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "RUSTC_WORKSPACE_WRAPPER", "CARGO_TARGET_DIR"] {
        command.env_remove(k);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap_or_else(|e| panic!("running {program}: {e}"))
}

#[test]
fn plugin_new_and_build_give_a_plugin_the_runtime_loads_in_each_language() {
    let work = tempfile::tempdir().unwrap();
    let refract = env!("CARGO_BIN_EXE_refract");
    // Rust plugins share a target directory across runs (their dependencies take a while).
    let exe = std::env::current_exe().unwrap();
    let rust_target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| exe.ancestors().nth(3).unwrap().to_owned())
        .join("scaffolded-plugins");
    let plugins = [
        ("counts-rs", "rust", "projection"),
        ("counts-py", "python", "projection"),
        ("counts-js", "js", "projection"),
        ("big-js", "js", "enricher"),
        ("big-py", "python", "enricher"),
    ];
    for (name, lang, kind) in plugins {
        run(work.path(), refract, &["plugin", "new", name, "--lang", lang, "--kind", kind], &[]);
        let dir = work.path().join(name);
        let target = [("CARGO_TARGET_DIR", rust_target.as_path())];
        // The unit test the template comes with passes, natively.
        let _ = match lang {
            "rust" => run(&dir, "cargo", &["test", "-q"], &target),
            "python" => {
                run(&dir, "python3", &["-m", "unittest", "-q"], &[("PYTHONPATH", Path::new(".refract/sdk/python"))])
            }
            _ => run(&dir, "node", &["--import", "./.refract/sdk/js/testing.mjs", "--test"], &[]),
        };
        run(&dir, refract, &["plugin", "build"], &target);
        assert!(dir.join(format!("{}.wasm", name.replace('-', "_"))).is_file(), "{name}: no component");
        // The events and expectation the template comes with pass, in the real engine.
        let trace = run(&dir, refract, &["plugin", "test"], &[]);
        assert!(trace.contains("3 events in") && trace.contains("0 failed"), "{name}:\n{trace}");
        let lines: Vec<Value> = run(&dir, refract, &["plugin", "test", "--json"], &[])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let last = lines.last().unwrap();
        assert_eq!(last["differences"], json!([]), "{name}: {last}");
        if kind == "projection" {
            // Each event's reads and writes: the first read its count (none yet) and wrote it.
            let first = &lines[0];
            assert_eq!(first["event"]["type"], "OrderPlaced", "{name}: {first}");
            let got = first["calls"].as_array().unwrap().iter().find(|c| c["call"] == "get");
            assert_eq!(
                got,
                Some(&json!({"call": "get", "table": "counts", "key": "OrderPlaced", "value": null})),
                "{name}: {first}"
            );
            assert_eq!(first["writes"], json!({"counts": {"OrderPlaced": {"n": 1, "last": 10}}}), "{name}: {first}");
            assert_eq!(last["final"]["tables"]["counts"]["OrderShipped"], json!({"n": 1, "last": 30}), "{name}");
        } else {
            assert_eq!(lines.len(), 3, "one line per OrderPlaced, then the end: {lines:?}");
            assert_eq!(lines[0]["emitted"][0]["type"], "LargeOrderPlaced", "{name}: {}", lines[0]);
            assert_eq!(lines[1]["emitted"], json!([]), "{name}: below the threshold");
        }
    }

    // A deliberately wrong projection fails its expectation, naming the key and field.
    // It also fails on purpose on an order cancelled: a Rust panic, a Python
    // KeyError, a JavaScript TypeError, each reported with where it happened.
    let wrong = [
        (
            "counts-rs",
            "src/lib.rs",
            "count.n += 1;",
            "let _data: serde_json::Value = event.json()?;",
            "let _data: serde_json::Value = event.json()?; if event.event_type == \"OrderCancelled\" { panic!(\"cancelled\") }",
            [
                "panicked at src/lib.rs",
                "wasm backtrace: <counts_rs::Plugin as refract_sdk::projection::Projection>::apply",
            ],
        ),
        (
            "counts-py",
            "app.py",
            "count[\"n\"] += 1",
            "data(event)  #",
            "data(event)[\"missing\"] if event.event_type == \"OrderCancelled\" else None  #",
            ["KeyError: 'missing'", "Traceback (most recent call last):"],
        ),
        (
            "counts-js",
            "app.js",
            "count.n += 1;",
            "event.json(); //",
            "if (event.eventType === 'OrderCancelled') event.json().missing.field; //",
            ["TypeError: ", "app.js:"],
        ),
    ];
    let cancelled = work.path().join("cancelled.ndjson");
    std::fs::write(&cancelled, "{\"type\": \"OrderCancelled\", \"key\": \"o-1\", \"data\": {\"orderId\": \"o-1\"}}\n")
        .unwrap();
    for (name, file, line, at, failing, teaches) in wrong {
        let dir = work.path().join(name);
        let source = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(source.contains(line) && source.contains(at), "{name}'s template has changed: {source}");
        std::fs::write(dir.join(file), source.replace(line, &line.replace("1", "2")).replace(at, failing)).unwrap();
        let built = dir.join("wrong.wasm");
        run(
            &dir,
            refract,
            &["plugin", "build", "--out", built.to_str().unwrap()],
            &[("CARGO_TARGET_DIR", rust_target.as_path())],
        );
        let output = command(&dir, refract, &["plugin", "test", "wrong.wasm", "--quiet"], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: a wrong plugin passed:\n{stderr}");
        assert!(stderr.contains(r#"counts["OrderPlaced"].n: expected 2, got 4"#), "{name}:\n{stderr}");
        assert!(stderr.contains(r#"counts["OrderShipped"].n: expected 1, got 2"#), "{name}:\n{stderr}");
        let failed = run(
            &dir,
            refract,
            &["plugin", "test", "wrong.wasm", "--json", "--events", cancelled.to_str().unwrap()],
            &[],
        );
        let step: Value = serde_json::from_str(failed.lines().next().unwrap()).unwrap();
        let error = step["outcome"]["error"].as_str().unwrap_or_default();
        assert!(teaches.iter().all(|t| error.contains(t)), "{name}: {error}");
        std::fs::write(dir.join(file), source).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let config = "plugins:\n  big-js:\n    settings: { threshold: 50 }\n";
    let components: Vec<_> = plugins
        .iter()
        .map(|(name, _, _)| work.path().join(name).join(format!("{}.wasm", name.replace('-', "_"))))
        .collect();
    let paths: Vec<&Path> = components.iter().map(|p| p.as_path()).collect();
    let server = Server::start(dir.path(), &paths, config);
    let orders = [
        json!({"type": "OrderPlaced", "key": "o-1", "time": 10, "data": {"orderId": "o-1", "total": 120}}),
        json!({"type": "OrderPlaced", "key": "o-2", "time": 20, "data": {"orderId": "o-2", "total": 60}}),
        json!({"type": "OrderShipped", "key": "o-1", "time": 30, "data": {"orderId": "o-1"}}),
    ];
    assert_eq!(server.client().append_ndjson("orders", &ndjson(&orders)).unwrap().status, 200);
    for name in ["counts-rs", "counts-py", "counts-js", "big-js", "big-py"] {
        server.wait_checkpoints(name, 3);
    }
    for name in ["counts-rs", "counts-py", "counts-js"] {
        let counts: Vec<(String, Value)> = server.table(name, "counts");
        assert_eq!(
            counts,
            [
                ("OrderPlaced".to_owned(), json!({"n": 2, "last": 20})),
                ("OrderShipped".to_owned(), json!({"n": 1, "last": 30}))
            ],
            "{name}"
        );
    }
    // The enrichers pass orders at or above their threshold: 50 (set in refract.yaml) for
    // big-js, the template's default of 100 for big-py.
    let until = Instant::now() + Duration::from_secs(30);
    let (mut js, mut py) = (Vec::new(), Vec::new());
    while (js.len(), py.len()) != (2, 1) {
        assert!(Instant::now() < until, "enricher outputs: {js:?} {py:?}");
        std::thread::sleep(Duration::from_millis(50));
        js = server.stream("big-js");
        py = server.stream("big-py");
    }
    assert!(js.iter().chain(&py).all(|e| e["type"] == "LargeOrderPlaced"));
    assert_eq!(py[0]["key"], "o-1");
    let status = server.get("/v1/projections/big-js");
    assert_eq!((status["plugin"]["kind"].as_str(), status["deadLetters"].as_u64()), (Some("enricher"), Some(0)));
}
