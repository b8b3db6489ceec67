//! A data directory is opened only when this version can read it: one
//! written before formats were numbered opens, a newer or unreadable one is
//! refused with its name and left untouched.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{Server, ndjson, plugins};

/// Run `refract run` on `dir`'s config, expecting it to refuse to start: its stderr.
fn refused_start(dir: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_refract"))
        .arg("run")
        .arg("--config")
        .arg(dir.join("refract.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            child.kill().unwrap();
            panic!("refract started on a data directory it should refuse");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_unnumbered_data_directory_opens_and_a_newer_or_unreadable_one_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[&plugins().order_summary], "");
    let events = refract_client::fixtures::orders(500, 43, 0.01);
    assert_eq!(server.client().append_ndjson("orders", &ndjson(&events)).unwrap().status, 200);
    server.wait_caught_up();
    server.stop();
    let data = dir.path().join("data");
    assert_eq!(std::fs::read_to_string(data.join("FORMAT")).unwrap(), "1\n");

    // Written before data formats were numbered: opens as format 1, data intact.
    std::fs::remove_file(data.join("FORMAT")).unwrap();
    server.restart();
    server.wait_caught_up();
    server.assert_order_summary_is_the_fold_of(&events);
    server.stop();
    assert_eq!(std::fs::read_to_string(data.join("FORMAT")).unwrap(), "1\n");

    // Written by a newer version: refused before anything is opened.
    std::fs::write(data.join("FORMAT"), "2\n").unwrap();
    let log = std::fs::read(data.join("log.redb")).unwrap();
    let stderr = refused_start(dir.path());
    assert!(stderr.contains("written by a newer Refract (data format 2)"), "{stderr}");
    assert!(std::fs::read(data.join("log.redb")).unwrap() == log, "the log was changed");

    // A log that is not a redb file: refused, named, and left as it is.
    std::fs::write(data.join("FORMAT"), "1\n").unwrap();
    std::fs::write(data.join("log.redb"), b"not a database at all").unwrap();
    let stderr = refused_start(dir.path());
    assert!(stderr.contains("opening the event log") && stderr.contains("log.redb"), "{stderr}");
    assert_eq!(std::fs::read(data.join("log.redb")).unwrap(), b"not a database at all");

    // Back to the good log: everything is there.
    std::fs::write(data.join("log.redb"), &log).unwrap();
    server.restart();
    server.wait_caught_up();
    server.assert_order_summary_is_the_fold_of(&events);
}
