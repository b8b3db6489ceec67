//! schemathesis (PyPI, pinned in scripts/install-tools) finds no
//! undocumented status and no schema violation in a thousand generated
//! requests per operation of `/openapi.json`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use refract_client::Client;

use crate::http_api::{ADMIN, tokens};
use crate::support::{Server, ndjson, plugins};

/// schemathesis, installed by `scripts/install-tools`.
fn schemathesis() -> PathBuf {
    let path = PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/refract/st/bin/schemathesis");
    assert!(path.exists(), "schemathesis is not installed: run scripts/install-tools");
    path
}

#[test]
fn schemathesis_finds_no_undocumented_status_and_no_schema_violation() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.order_summary, &p.order_search], &tokens());
    // Data to find: orders (1% malformed, so dead letters too) in tables and an index.
    let admin = Client::new(&server.url).with_token(Some(ADMIN));
    let events = refract_client::fixtures::orders(2_000, 31, 0.01);
    assert_eq!(admin.append_ndjson("orders", &ndjson(&events)).unwrap().status, 200);
    admin.wait_caught_up(Duration::from_secs(120)).unwrap();

    // REFRACT_FUZZ_EXAMPLES lowers the count for a quick local run.
    let examples = std::env::var("REFRACT_FUZZ_EXAMPLES").unwrap_or_else(|_| "1000".into());
    let report = dir.path().join("schemathesis");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/schemathesis.toml");
    let out = Command::new(schemathesis())
        .args(["--config-file", config, "run", &format!("{}/openapi.json", server.url), "--checks", "all"])
        .args(["--max-examples", &examples, "--seed", "7", "--workers", "1"])
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .args(["--report", "junit", "--report-dir", report.to_str().unwrap()])
        .args(["--no-color"])
        .current_dir(dir.path()) // its cache (.schemathesis/) goes with the test's directory
        .output()
        .expect("running schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = server.log();
    let tail: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") || l.contains("panicked")).take(20).collect();
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}\nserver errors:\n{}",
        tail.join("\n")
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
    eprintln!("{}", stdout.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"));
}
