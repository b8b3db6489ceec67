//! The plugin author's loop: `refract plugin test` runs a component on the
//! events of a file, offline, and builds what a server builds from them.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{ndjson, plugins, reference};

/// `refract plugin test args…` in `dir`: (success, standard output, standard error).
fn plugin_test(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_refract"))
        .current_dir(dir)
        .args(["plugin", "test"])
        .args(args)
        .output()
        .expect("running refract plugin test");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// The example `order-summary` on 3,000 orders with poison among them:
/// offline, its tables are the reference fold and exactly the events a
/// server dead-letters fail, with why.
#[test]
fn plugin_test_builds_the_reference_read_model_and_fails_the_events_a_server_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let events = refract_client::fixtures::orders(3000, 71, 0.02);
    std::fs::write(dir.path().join("orders.ndjson"), ndjson(&events)).unwrap();
    let wasm = plugins().order_summary.to_str().unwrap().to_owned();
    let expected = reference::orders(&events);
    assert!(expected.rejected > 10, "the fixture has poison: {}", expected.rejected);

    for quiet in [false, true] {
        let mut args = vec![wasm.as_str(), "--events", "orders.ndjson", "--json"];
        if quiet {
            args.push("--quiet");
        }
        let (ok, stdout, stderr) = plugin_test(dir.path(), &args);
        assert!(ok, "{stderr}");
        let lines = json_lines(&stdout);
        let last = lines.last().unwrap();
        let tables = &last["final"]["tables"];
        let orders: Vec<(String, Value)> =
            tables["orders"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert!(orders == expected.orders.clone().into_iter().collect::<Vec<_>>(), "quiet {quiet}: orders differ");
        let customers: Vec<(String, Value)> =
            tables["customer-orders"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert!(customers == expected.customer_orders.clone().into_iter().collect::<Vec<_>>(), "quiet {quiet}");
        assert_eq!(last["final"]["failed"], expected.rejected, "quiet {quiet}");
        assert_eq!(last["applied"], events.len() - expected.rejected, "quiet {quiet}");
        let failures: Vec<&Value> = lines.iter().filter(|l| l["outcome"]["applied"] == false).collect();
        assert_eq!(failures.len(), expected.rejected, "quiet {quiet}: one line per failed event");
        assert!(failures.iter().all(|f| f["outcome"]["failure"] == "rejected"), "{:?}", failures[0]);
        // Traced, every event handed has its line; quiet, only the failures do.
        let steps = lines.len() - 1;
        assert_eq!(steps, if quiet { expected.rejected } else { events.len() }, "quiet {quiet}");
    }

    // The text trace names each event, what it read and wrote, and why one failed.
    let (ok, stdout, _) = plugin_test(dir.path(), &[&wasm, "--events", "orders.ndjson"]);
    assert!(ok);
    let first = events[0]["data"]["orderId"].as_str().unwrap();
    assert!(stdout.starts_with(&format!("#0 orders 0:0 OrderPlaced key {first}")), "{}", &stdout[..300]);
    assert!(stdout.contains(&format!("   get      orders[\"{first}\"] → none")), "{}", &stdout[..600]);
    assert!(stdout.contains(&format!("   put      orders[\"{first}\"] = {{")), "{}", &stdout[..600]);
    assert!(stdout.contains("   ✗ rejected: "), "a rejected event and its reason");
    assert!(stdout.contains("3000 events in") && stdout.contains(&format!("{} failed", expected.rejected)));
}

/// `--state` starts from given tables; `--expect` compares; bad input is a
/// clear error that names the line or the file.
#[test]
fn plugin_test_starts_from_a_state_and_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = plugins().order_summary.to_str().unwrap().to_owned();
    let payment = json!({"type": "PaymentReceived", "key": "o-9", "time": 50,
        "data": {"orderId": "o-9", "paymentId": "p-1", "amount": 30}});
    std::fs::write(dir.path().join("payment.ndjson"), ndjson(std::slice::from_ref(&payment))).unwrap();

    // Alone, a payment for an order nobody placed is rejected.
    let (ok, stdout, _) = plugin_test(dir.path(), &[&wasm, "--events", "payment.ndjson"]);
    assert!(ok && stdout.contains("✗ rejected") && stdout.contains("1 failed"), "{stdout}");

    // After the order, as a state, it applies.
    let placed =
        json!({"orderId": "o-9", "customerId": "c-1", "status": "placed", "total": 30.0, "paid": 0.0, "updatedAt": 40});
    let state = json!({"tables": {"orders": {"o-9": placed}}});
    std::fs::write(dir.path().join("state.json"), state.to_string()).unwrap();
    let paid =
        json!({"orderId": "o-9", "customerId": "c-1", "status": "paid", "total": 30.0, "paid": 30.0, "updatedAt": 50});
    let expect = json!({"tables": {"orders": {"o-9": paid}}, "failed": 0});
    std::fs::write(dir.path().join("expect.json"), expect.to_string()).unwrap();
    let args = [wasm.as_str(), "--events", "payment.ndjson", "--state", "state.json", "--expect", "expect.json"];
    let (ok, stdout, stderr) = plugin_test(dir.path(), &args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("   get      orders[\"o-9\"] → {"), "the state was read: {stdout}");
    assert!(stderr.contains("as expected"), "{stderr}");

    // An expectation that is not met names the key and field.
    let wrong = json!({"tables": {"orders": {"o-9": {"status": "shipped"}}}});
    std::fs::write(dir.path().join("wrong.json"), wrong.to_string()).unwrap();
    let args = [wasm.as_str(), "--events", "payment.ndjson", "--state", "state.json", "--expect", "wrong.json"];
    let (ok, _, stderr) = plugin_test(dir.path(), &args);
    assert!(!ok);
    assert!(stderr.contains(r#"orders["o-9"].status: expected "shipped", got "paid""#), "{stderr}");
    assert!(stderr.contains(r#"orders["o-9"].total: not expected, got 30.0"#), "{stderr}");
    assert!(!stderr.contains("customer-orders"), "only the tables named compare: {stderr}");

    // Bad input: the line of an event that is not one, a state for a table the plugin lacks, an expectation of unknown shape.
    std::fs::write(dir.path().join("bad.ndjson"), format!("{payment}\n{{\"type\": \"OrderPlaced\"}}\n")).unwrap();
    let (ok, _, stderr) = plugin_test(dir.path(), &[&wasm, "--events", "bad.ndjson"]);
    assert!(!ok && stderr.contains("bad.ndjson: line 2: missing field `data`"), "{stderr}");
    std::fs::write(dir.path().join("state.json"), json!({"tables": {"nope": {"k": 1}}}).to_string()).unwrap();
    let (ok, _, stderr) = plugin_test(dir.path(), &[&wasm, "--events", "payment.ndjson", "--state", "state.json"]);
    assert!(!ok && stderr.contains("nope"), "{stderr}");
    std::fs::write(dir.path().join("expect.json"), json!({"table": {}}).to_string()).unwrap();
    let (ok, _, stderr) = plugin_test(dir.path(), &[&wasm, "--events", "payment.ndjson", "--expect", "expect.json"]);
    assert!(!ok && stderr.contains("unknown field `table`"), "{stderr}");
    let (ok, _, stderr) = plugin_test(dir.path(), &[&wasm]);
    assert!(!ok && stderr.contains("--events"), "{stderr}");
}
