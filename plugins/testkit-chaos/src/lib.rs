//! `testkit-chaos`: a projection that misbehaves on request, for Refract's own tests.
//!
//! It reads every event of the `chaos` stream and records each one it applies
//! in the `applied` table (key `<partition>/<offset>`). Event types trigger failures:
//! - `Reject`: returns `rejected`;
//! - `Panic`: panics, which traps the instance;
//! - `Spin`: loops forever (the batch deadline must interrupt it);
//! - `Hog`: grows memory without bound (the memory cap must stop it);
//! - `Flaky`: returns `transient` the first time this instance sees each one;
//! - `Index`: indexes the event data as document `<offset>` of index `docs`
//!   (mapping: `n` i64, `tag` keyword), so data that does not fit the mapping
//!   is refused by the host;
//! - `Emit`: emits `{"source": "<partition>/<offset>", "n": data.n}` as an
//!   `Echo` event, keyed by the source event's key, to the stream named by
//!   `data.to`, with `data.headers` headers `h0`, `h1`, … (none by default);
//! - `EmitIfV2`: like `Emit` in the `v2` variant; the others reject it (a
//!   bug a new version fixes);
//! - `Sleep`: sleeps `data.ms` milliseconds with `std::thread::sleep` (the
//!   host's clock is frozen: the sleep must end at once, never hang the worker);
//! - `Flood`: writes `data.count` values of `data.bytes` bytes each, under
//!   keys `flood/<offset>/<i>` (or, with `data.emit`, emits them as `Echo`
//!   events to `data.to`): past the batch's byte budget the host must trap;
//! - `Recurse`: recurses `data.depth` calls deep (a deep one must trap on the
//!   wasm stack limit, not overflow the host's stack);
//! - `Stamp`: stores `stamp/<data.n>` = `{"version": 1}` (2 when built as
//!   `v2`) and indexes it with `tag: "v1"` (`"v2"`);
//! - `EmitMany`: emits `data.count` `Echo` events to `data.to` (more than the
//!   plugin's `max-emits` must be refused);
//! - `Swallow`: stores its data under `swallowed/<offset>` too, then reads a
//!   key and ignores any error: if the host refused that write (too large),
//!   the batch must still fail, though the plugin carries on.
//!
//! Built with `TESTKIT_VARIANT=v2` it declares schema-version 2; with
//! `TESTKIT_VARIANT=trap` its `manifest()` panics; with
//! `TESTKIT_VARIANT=mapping` its index also maps `colour` (keyword), under
//! the same schema-version.

use std::cell::RefCell;
use std::collections::HashSet;

use refract_sdk::{Event, Failure, Index, IndexMapping, Manifest, NewEvent, Projection, Table};

pub const APPLIED: Table<serde_json::Value> = Table::new("applied");
pub const DOCS: Index<serde_json::Value> = Index::new("docs");

thread_local! {
    static FLAKED: RefCell<HashSet<u64>> = RefCell::new(HashSet::new());
}

pub struct Chaos;

impl Projection for Chaos {
    fn manifest() -> Manifest {
        // Test variants, chosen when the component is built: `v2` declares
        // schema-version 2, `trap` panics here.
        let schema = match option_env!("TESTKIT_VARIANT") {
            Some("trap") => panic!("asked to fail in manifest()"),
            Some("v2") => 2,
            _ => 1,
        };
        Manifest::new("testkit-chaos", env!("CARGO_PKG_VERSION"))
            .schema_version(schema)
            .subscribe("chaos", &[])
            .table(&APPLIED)
    }

    fn indexes() -> Vec<IndexMapping> {
        let mapping = IndexMapping::new(DOCS.name()).i64("n").keyword("tag");
        match option_env!("TESTKIT_VARIANT") {
            Some("mapping") => vec![mapping.keyword("colour")],
            _ => vec![mapping],
        }
    }

    fn apply(event: &Event) -> Result<(), Failure> {
        match event.event_type.as_str() {
            "Reject" => {
                return Err(Failure::rejected(format!("asked to reject offset {}", event.offset)));
            }
            "Panic" => panic!("asked to panic at offset {}", event.offset),
            "Spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "Hog" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "Flaky" if FLAKED.with(|f| f.borrow_mut().insert(event.offset)) => {
                return Err(Failure::transient(format!("flaky at offset {}", event.offset)));
            }
            _ => {}
        }
        let data: serde_json::Value = event.json()?;
        if event.event_type == "Index" {
            DOCS.upsert(&event.offset.to_string(), &data)?;
        }
        if event.event_type == "Sleep" {
            std::thread::sleep(std::time::Duration::from_millis(data["ms"].as_u64().unwrap_or(0)));
        }
        if event.event_type == "Flood" {
            let padding = "x".repeat(data["bytes"].as_u64().unwrap_or(0) as usize);
            for i in 0..data["count"].as_u64().unwrap_or(0) {
                let value = serde_json::json!({"i": i, "padding": padding});
                match data["to"].as_str() {
                    Some(to) => refract_sdk::emit(to, NewEvent::json("Echo", &value)?.time(event.time))?,
                    None => APPLIED.put(&format!("flood/{}/{i}", event.offset), &value)?,
                }
            }
        }
        if event.event_type == "Recurse" {
            std::hint::black_box(recurse(data["depth"].as_u64().unwrap_or(0)));
        }
        if event.event_type == "EmitMany" {
            let to = data["to"].as_str().ok_or_else(|| Failure::rejected("EmitMany needs data.to"))?;
            for i in 0..data["count"].as_u64().unwrap_or(0) {
                refract_sdk::emit(to, NewEvent::json("Echo", &serde_json::json!({"i": i}))?.time(event.time))?;
            }
        }
        if event.event_type == "Swallow" {
            APPLIED.put(&format!("swallowed/{}", event.offset), &data)?;
            let _ = APPLIED.get("probe"); // sends the pending writes; an error is ignored
            return APPLIED
                .put(&format!("{}/{:020}", event.partition, event.offset), &serde_json::json!({"n": data["n"]}));
        }
        if event.event_type == "Stamp" {
            // Which version wrote it, in the table and the index: a query
            // that merges shards shows whether it read one generation.
            let version = if option_env!("TESTKIT_VARIANT") == Some("v2") { 2 } else { 1 };
            let id = format!("{:08}", data["n"].as_u64().unwrap_or(0));
            DOCS.upsert(&id, &serde_json::json!({"n": data["n"], "tag": format!("v{version}")}))?;
            return APPLIED.put(&format!("stamp/{id}"), &serde_json::json!({"version": version}));
        }
        if event.event_type == "EmitIfV2" && option_env!("TESTKIT_VARIANT") != Some("v2") {
            return Err(Failure::rejected(format!("version 1 cannot handle offset {}", event.offset)));
        }
        if event.event_type == "Emit" || event.event_type == "EmitIfV2" {
            let to = data["to"].as_str().ok_or_else(|| Failure::rejected("Emit needs data.to"))?;
            let source = format!("{}/{}", event.partition, event.offset);
            let mut echo =
                NewEvent::json("Echo", &serde_json::json!({"source": source, "n": data["n"]}))?.time(event.time);
            if let Some(key) = &event.key {
                echo = echo.key(key);
            }
            for h in 0..data["headers"].as_u64().unwrap_or(0) {
                echo = echo.header(&format!("h{h}"), "v");
            }
            refract_sdk::emit(to, echo)?;
        }
        APPLIED.put(&format!("{}/{:020}", event.partition, event.offset), &data)
    }
}

/// Recursion the compiler cannot turn into a loop: each call keeps a frame.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == 0 {
        return 0;
    }
    let frame = std::hint::black_box([depth; 8]);
    recurse(depth - 1).wrapping_add(frame[depth as usize % 8] & 1)
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_projection!(Chaos);
