//! Storage faults: a full disk pauses ingestion with a clear error and,
//! once space returns, everything resumes with nothing lost. The tests mount
//! small tmpfs disks, so they need root (the full tier, tests/README.md).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, ndjson, plugins};

/// A small tmpfs mounted on a directory for the test's lifetime.
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mount it, or fail the test: these tests are in the full tier, which runs as root.
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(mounted, "mounting a {size} tmpfs on {} failed: these tests need root (tests/README.md)", at.display());
        SmallDisk(at.to_owned())
    }

    /// Fill what is left with a file; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while file.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_pauses_ingestion_with_a_clear_error_and_resumes_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("data"), "64m");
    let p = plugins();
    // A small machine: a small disk, and a small page cache for each redb file.
    let config = "search:\n  commit-interval-ms: 100\nlimits:\n  deadline-ms: 1500\nstorage:\n  cache-mb: 4\n";
    let server = Server::start(dir.path(), &[&p.order_summary, &p.order_search, &p.chaos], config);
    let client = server.client();
    let events = refract_client::fixtures::orders(12_000, 41, 0.01);
    let (first, rest) = events.split_at(4_000);
    assert_eq!(client.append_ndjson("orders", &ndjson(first)).unwrap().status, 200);
    let docs = |range: std::ops::Range<u64>| -> Vec<Value> {
        range.map(|n| json!({"type": "Index", "key": format!("d{n}"), "data": {"n": n, "tag": "t"}})).collect()
    };
    assert_eq!(client.append_ndjson("chaos", &ndjson(&docs(0..200))).unwrap().status, 200);
    server.wait_caught_up();

    // `Spin` holds testkit-chaos for its 1.5 s deadline: the disk fills up
    // while it still has 2,000 documents to write.
    let mut chaos = vec![json!({"type": "Spin", "data": {}})];
    chaos.extend(docs(200..2_200));
    assert_eq!(client.append_ndjson("chaos", &ndjson(&chaos)).unwrap().status, 200);
    let filler = disk.fill();

    // Appends are refused whole, with the reason.
    let mut accepted: Vec<Value> = first.to_vec();
    let mut refused = None;
    let mut batches = rest.chunks(250);
    for batch in batches.by_ref() {
        let reply = client.append_ndjson("orders", &ndjson(batch)).unwrap();
        match reply.status {
            200 => accepted.extend_from_slice(batch),
            503 => {
                refused = Some((batch, reply.body));
                break;
            }
            other => panic!("append answered {other}: {}", reply.body),
        }
    }
    let (refused_batch, error) = refused.expect("a full disk refused no append");
    assert_eq!(error["error"]["code"], "storage_unavailable", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("No space left on device"), "{error}");
    // The projection that cannot commit stops where it is and says why.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let status = server.get("/v1/projections/testkit-chaos");
        let stalled = status["lastError"].as_str().is_some_and(|e| e.contains("No space left on device"));
        if stalled && status["lag"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(Instant::now() < until, "testkit-chaos never reported the full disk: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Queries keep being answered meanwhile.
    assert_eq!(client.get("/v1/projections/order-summary/tables/orders/items?limit=1").unwrap().status, 200);
    assert_eq!(client.get("/v1/projections/order-search/indexes/orders/search?q=lamp").unwrap().status, 200);

    // Space returns: the refused batch and the rest go in, every projection catches up.
    std::fs::remove_file(filler).unwrap();
    for batch in std::iter::once(refused_batch).chain(batches) {
        let reply = client.append_ndjson("orders", &ndjson(batch)).unwrap();
        assert_eq!(reply.status, 200, "after space returned: {}", reply.body);
        accepted.extend_from_slice(batch);
    }
    assert_eq!(accepted.len(), events.len());
    // Files were reopened after their failed writes, without a restart.
    assert!(server.log().contains("reopened after a failed write"), "{}", server.log());
    server.wait_caught_up();
    server.assert_order_summary_is_the_fold_of(&accepted);
    let status = server.get("/v1/projections/testkit-chaos");
    assert_eq!((status["eventsApplied"].as_u64(), status["deadLetters"].as_u64()), (Some(2_200), Some(1)), "{status}");
    let applied = server.table("testkit-chaos", "applied");
    assert_eq!(applied.len(), 2_200);
    // testkit-chaos indexes each document under its offset (shared by partitions).
    let offsets: std::collections::BTreeSet<&str> =
        applied.iter().map(|(key, _)| key.split_once('/').unwrap().1).collect();
    let orders = crate::support::reference::orders(&accepted).orders.len() as u64;
    for (index, expected) in
        [("order-search/indexes/orders", orders), ("testkit-chaos/indexes/docs", offsets.len() as u64)]
    {
        let hits = server.get(&format!("/v1/projections/{index}/search?limit=1"));
        assert_eq!(hits["total"].as_u64(), Some(expected), "{index}: {hits}");
    }
}

/// The indexer against its own disk filling up while tantivy commits: the
/// failed commits are reported, nothing is trimmed from the outbox, and once
/// space returns the same indexer (no restart) commits every document once.
#[test]
fn a_full_disk_during_an_index_commit_is_recovered_from_without_losing_or_duplicating_documents() {
    use refract::store::search::{FieldMapping, FieldType, IndexMapping, IndexSchema, Indexer, Indexes};
    use refract::store::{BatchWrites, ReadModel, read_model::Commit};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("indexes"), "16m");
    let field = |name: &str, type_| FieldMapping { name: name.into(), type_, stored: true, fast: false };
    let mapping =
        IndexMapping { name: "docs".into(), fields: vec![field("n", FieldType::I64), field("text", FieldType::Text)] };
    let schemas = [("docs".to_owned(), IndexSchema::new(&mapping).unwrap())].into();
    let read_model = Arc::new(ReadModel::open(&dir.path().join("rm.redb")).unwrap());
    let indexes = Arc::new(Indexes::open(disk.0.as_path(), &schemas).unwrap());
    let indexer =
        Indexer::new(read_model.clone(), indexes.clone(), Duration::from_millis(10), Arc::new(AtomicBool::new(false)));
    // Text that compresses badly, so that the index takes real space.
    let mut rng = refract_client::fixtures::Rng::new(3);
    let mut write = |ids: std::ops::Range<u64>| {
        let mut writes = BatchWrites::default();
        let docs = writes.docs.entry("docs".to_owned()).or_default();
        for n in ids {
            let text: Vec<String> = (0..40).map(|_| format!("w{}", rng.range(0, 1 << 30))).collect();
            docs.insert(format!("d{n}"), Some(json!({"n": n, "text": text.join(" ")}).to_string().into_bytes()));
        }
        read_model.commit(&writes, &Commit::default()).unwrap();
    };

    write(0..2_000);
    assert_eq!(indexer.apply_once().unwrap(), 2_000);
    // The disk fills; more documents (and new versions of old ones) wait in the outbox.
    let filler = disk.fill();
    write(1_000..6_000);
    let failed = indexer.apply_once().expect_err("a commit to a full disk failed");
    eprintln!("commit on a full disk: {failed}");
    assert!(indexer.apply_once().is_err(), "still full");
    assert_eq!(indexes.applied.load(Ordering::Relaxed), 2_000, "nothing counted as applied");
    assert_eq!(read_model.outbox_after(2_000, 10_000).unwrap().len(), 5_000, "nothing trimmed");

    // Space returns: the same indexer catches up.
    std::fs::remove_file(filler).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while indexer.apply_once().map_or(true, |_| indexes.applied.load(Ordering::Relaxed) < 7_000) {
        assert!(Instant::now() < until, "the indexer did not recover once space returned");
        std::thread::sleep(Duration::from_millis(50));
    }
    let open = &indexes.open["docs"];
    assert_eq!(open.committed_sequence().unwrap(), 7_000);
    let searcher = open.reader.searcher();
    assert_eq!(searcher.num_docs(), 6_000, "every id once");
    for n in [0, 999, 1_000, 1_999, 2_000, 5_999] {
        let found = open
            .search(&refract::store::search::SearchRequest { filter: format!("n:{n}"), ..Default::default() }, 10)
            .unwrap();
        assert_eq!(found.total, 1, "document d{n}");
    }
}

/// An upload that cannot be written (the plugins directory's disk is full)
/// is the server's trouble, not the plugin's: 503 `storage_unavailable`,
/// the running file untouched, and the same upload succeeds once there is
/// room again. It used to be a 400, as if the plugin were bad.
#[test]
fn an_upload_to_a_full_disk_is_a_503_and_changes_nothing() {
    const ADMIN: &str = "admin-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("plugins"), "4m");
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.chaos], &format!("auth:\n  admin-token: {ADMIN}\n"));
    let admin = refract_client::Client::new(&server.url).with_token(Some(ADMIN));
    let installed = dir.path().join("plugins").join("testkit_chaos.wasm");
    let original = std::fs::read(&installed).unwrap();
    let newer = crate::hot_reload::variant(&original, 1);

    let filler = disk.fill();
    let reply = admin.put("/v1/plugins/testkit_chaos", "application/wasm", &newer).unwrap();
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "storage_unavailable", "{}", reply.body);
    assert!(reply.body["error"]["message"].as_str().unwrap().contains("No space left"), "{}", reply.body);
    assert!(std::fs::read(&installed).unwrap() == original, "the running plugin's file changed");
    assert_eq!(server.get("/v1/projections/testkit-chaos")["reloads"], 0);

    std::fs::remove_file(filler).unwrap();
    let reply = admin.put("/v1/plugins/testkit_chaos", "application/wasm", &newer).unwrap();
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert!(std::fs::read(&installed).unwrap() == newer);
    let until = Instant::now() + Duration::from_secs(30);
    while server.get("/v1/projections/testkit-chaos")["reloads"] != 1 {
        assert!(Instant::now() < until, "the upload was not swapped in");
        std::thread::sleep(Duration::from_millis(20));
    }
}
