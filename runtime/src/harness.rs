//! Running a plugin on events outside a server (`refract plugin test`): the
//! real engine with the server's default limits, on a scratch read model
//! (real redb, not flushed), with a trace of what each event did.
//!
//! Traced, each event is a batch of its own, so that its reads, writes,
//! search documents and emits are its own; untraced, events go in batches
//! as a server's worker takes them, and a batch that fails is run again one
//! event at a time. Either way an event that fails changes nothing and the
//! others apply, as on a server, where it becomes a dead letter (a
//! transient failure, which a server retries, is reported the same way).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use serde_json::Value;

use crate::plugin::trace::{HostCall, shown};
use crate::plugin::wasm::WasmPlugin;
use crate::plugin::{Event, HandleError, Handler};
use crate::projector::BatchOptions;
use crate::source::NewEvent;
use crate::store::read_model::Commit;
use crate::store::{BatchWrites, Declared, Emitted, ReadModel};

/// A table's or an index's contents: key (or document id) → value.
pub type Contents = BTreeMap<String, Value>;

/// One event handled, and what it did.
pub struct Step<'a> {
    /// Its place in the events (from 0).
    pub index: usize,
    pub event: &'a Event,
    /// The host calls it made (reads, lookups, settings, log lines), in
    /// order; none when not tracing.
    pub calls: Vec<HostCall>,
    /// What it wrote, by table and key (`None`: deleted), when it applied.
    pub writes: BTreeMap<String, BTreeMap<String, Option<Value>>>,
    /// The search documents it indexed, by index and id (`None`: deleted).
    pub documents: BTreeMap<String, BTreeMap<String, Option<Value>>>,
    /// The events it emitted (an enricher's outputs, on their routes' streams).
    pub emitted: Vec<Emitted>,
    /// An enricher's outputs no route took.
    pub unrouted: u64,
    /// Whether it applied; why not.
    pub outcome: Result<(), HandleError>,
}

/// How handling an event ended, as JSON: `{"applied": true}`, or
/// `{"applied": false, "failure": "rejected"|"transient"|"trap"|"host", "error"}`
/// where `error` is what a dead letter would say.
pub fn outcome_json(outcome: &Result<(), HandleError>) -> Value {
    match outcome {
        Ok(()) => serde_json::json!({"applied": true}),
        Err(error) => {
            let kind = match error {
                HandleError::Rejected(_) => "rejected",
                HandleError::Transient(_) => "transient",
                HandleError::Trap(_) => "trap",
                HandleError::Host(_) => "host",
            };
            serde_json::json!({"applied": false, "failure": kind, "error": error.to_string()})
        }
    }
}

/// The values `calls` read, as `--state` takes them: `{"tables": {table: {key: value}}}`.
pub fn state_read(calls: &[HostCall]) -> Value {
    let mut tables: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for call in calls {
        match call {
            HostCall::Get { table, key, value: Some(value), .. } => {
                tables.entry(table.clone()).or_default().insert(key.clone(), value.clone());
            }
            HostCall::Scan { table, entries, .. } => {
                let contents = tables.entry(table.clone()).or_default();
                for e in entries {
                    contents.insert(e.key.clone(), e.value.clone());
                }
            }
            _ => {}
        }
    }
    serde_json::json!({ "tables": tables })
}

/// `event` as one line of an events file (`read_events`): as appended, with its stream.
pub fn event_line(event: &Event) -> Value {
    let data: Value = serde_json::from_slice(&event.data)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&event.data).into_owned()));
    let headers: serde_json::Map<String, Value> =
        event.headers.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let mut line =
        serde_json::json!({"stream": event.stream, "type": event.event_type, "time": event.time, "data": data});
    if let Some(key) = &event.key {
        line["key"] = Value::String(key.clone());
    }
    if !headers.is_empty() {
        line["headers"] = Value::Object(headers);
    }
    line
}

impl Step<'_> {
    /// The step as one line of `--json`: the event, its host calls, writes,
    /// documents, emits and outcome.
    pub fn to_json(&self) -> Value {
        let e = self.event;
        serde_json::json!({
            "index": self.index,
            "event": {"stream": e.stream, "partition": e.partition, "offset": e.offset, "type": e.event_type,
                "key": e.key, "time": e.time},
            "calls": self.calls,
            "writes": self.writes,
            "documents": self.documents,
            "emitted": self.emitted.iter().map(emitted_json).collect::<Vec<_>>(),
            "unrouted": self.unrouted,
            "outcome": outcome_json(&self.outcome),
        })
    }
}

/// A plugin and its scratch read model.
pub struct Harness {
    plugin: WasmPlugin,
    read_model: ReadModel,
    declared: Arc<Declared>,
    /// The server's defaults: batch and call sizes (untraced), key/value limits.
    options: BatchOptions,
    tracing: bool,
    /// The search documents as they stand, by index and id (every declared index).
    documents: BTreeMap<String, Contents>,
    /// Every event emitted, in order.
    emitted: Vec<Emitted>,
    /// Events that applied, that failed, and that the plugin does not subscribe to.
    applied: u64,
    failed: u64,
    skipped: u64,
    /// Holds the read model's file; removed on drop.
    _dir: tempfile::TempDir,
}

impl Harness {
    /// `plugin` on an empty scratch read model; `tracing` records each
    /// event's host calls.
    pub fn new(mut plugin: WasmPlugin, tracing: bool) -> anyhow::Result<Harness> {
        let declared = crate::plugin::declared(&plugin).map_err(anyhow::Error::msg)?;
        let dir =
            tempfile::Builder::new().prefix("refract-plugin-test").tempdir().context("creating a scratch directory")?;
        let read_model = ReadModel::open_scratch(&dir.path().join("read-model.redb"))?;
        plugin.set_tracing(tracing);
        let documents = declared.indexes.keys().map(|i| (i.clone(), Contents::new())).collect();
        Ok(Harness {
            plugin,
            read_model,
            declared: Arc::new(declared),
            options: BatchOptions::default(),
            tracing,
            documents,
            emitted: Vec::new(),
            applied: 0,
            failed: 0,
            skipped: 0,
            _dir: dir,
        })
    }

    /// Start from `tables` (table → key → value) instead of empty tables.
    pub fn load_tables(&mut self, tables: &BTreeMap<String, Contents>) -> anyhow::Result<()> {
        let mut batch = self.read_model.begin(self.declared.clone(), self.options.kv, None)?;
        for (table, entries) in tables {
            for (key, value) in entries {
                let bytes = serde_json::to_vec(value)?;
                batch.put(table, key, &bytes).map_err(|e| {
                    use crate::wit::KvError::{InvalidValue, TooLarge, UnknownTable};
                    let (UnknownTable(why) | InvalidValue(why) | TooLarge(why)) = e;
                    anyhow::anyhow!("{table}[{key:?}]: {why}")
                })?;
            }
        }
        self.read_model.commit(&batch.into_writes(), &Commit::default())?;
        Ok(())
    }

    /// Hand the events the plugin subscribes to among `events` to it (the
    /// others are skipped, as a server's reader skips them) and commit what
    /// it does, calling `on` for each event handed when tracing, and for
    /// each event that failed when not.
    pub fn run(&mut self, events: &[Event], mut on: impl FnMut(Step<'_>)) -> anyhow::Result<()> {
        let subscriptions = &self.plugin.manifest().subscriptions;
        let subscribed = |e: &Event| {
            subscriptions
                .iter()
                .any(|s| s.stream == e.stream && (s.event_types.is_empty() || s.event_types.contains(&e.event_type)))
        };
        let handed: Vec<usize> = (0..events.len()).filter(|i| subscribed(&events[*i])).collect();
        self.skipped += (events.len() - handed.len()) as u64;
        let size = if self.tracing { 1 } else { self.options.max_events };
        for chunk in handed.chunks(size) {
            let batch: Vec<Event> = chunk.iter().map(|i| events[*i].clone()).collect();
            match self.apply(&batch)? {
                Ok(_) if !self.tracing => {}
                Err(_) if !self.tracing => {
                    // Each event alone: the failing ones fail, the others apply.
                    for (i, event) in chunk.iter().zip(&batch) {
                        if let Err(error) = self.apply(std::slice::from_ref(event))? {
                            self.failed += 1;
                            on(step(*i, &events[*i], Vec::new(), BatchWrites::default(), Err(error)));
                        }
                    }
                }
                outcome => {
                    let calls = self.plugin.take_trace();
                    let (writes, outcome) = match outcome {
                        Ok(writes) => (writes, Ok(())),
                        Err(error) => {
                            self.failed += 1;
                            (BatchWrites::default(), Err(error))
                        }
                    };
                    on(step(chunk[0], &events[chunk[0]], calls, writes, outcome));
                }
            }
        }
        Ok(())
    }

    /// Handle `events` in one batch and commit it; the plugin's failure as
    /// the inner error (nothing committed), the host's as the outer one.
    fn apply(&mut self, events: &[Event]) -> anyhow::Result<Result<BatchWrites, HandleError>> {
        let mut batch = self.read_model.begin(self.declared.clone(), self.options.kv, None)?;
        let mut outcome = Ok(());
        for call in events.chunks(self.options.call_events) {
            let handled;
            (batch, handled) = self.plugin.handle(batch, call);
            outcome = handled;
            if outcome.is_err() {
                break;
            }
        }
        match outcome {
            Ok(()) => {
                let writes = batch.into_writes();
                let commit = Commit { applied: events.len() as u64, ..Commit::default() };
                self.read_model.commit(&writes, &commit).context("committing to the scratch read model")?;
                for (index, docs) in &writes.docs {
                    let contents = self.documents.entry(index.clone()).or_default();
                    for (id, document) in docs.sorted() {
                        match document {
                            Some(d) => contents.insert(id.clone(), shown(d)),
                            None => contents.remove(id),
                        };
                    }
                }
                self.emitted.extend(writes.emitted.iter().cloned());
                self.applied += events.len() as u64;
                Ok(Ok(writes))
            }
            Err(HandleError::Host(e)) => anyhow::bail!("the host failed: {e}"),
            Err(e) => Ok(Err(e)),
        }
    }

    /// What the run ended with: every declared table's contents as
    /// committed, every declared index's documents, the events emitted, and
    /// how many failed.
    pub fn end(&self) -> anyhow::Result<Final> {
        let mut tables = BTreeMap::new();
        for table in &self.plugin.manifest().tables {
            let entries = self.read_model.scan(table, "", None, usize::MAX)?;
            tables.insert(table.clone(), entries.into_iter().map(|(k, v)| (k, shown(&v))).collect());
        }
        Ok(Final {
            tables,
            documents: self.documents.clone(),
            emitted: self.emitted.iter().map(emitted_json).collect(),
            failed: self.failed,
        })
    }

    /// Events that applied, that failed (a server's dead letters), and that
    /// were skipped (not subscribed to).
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.applied, self.failed, self.skipped)
    }
}

/// The step of `event`, with the effects of the batch that committed it.
fn step(
    index: usize,
    event: &Event,
    calls: Vec<HostCall>,
    writes: BatchWrites,
    outcome: Result<(), HandleError>,
) -> Step<'_> {
    let by_key = |w: &crate::store::Writes| -> BTreeMap<String, BTreeMap<String, Option<Value>>> {
        w.iter()
            .map(|(name, keys)| {
                (name.clone(), keys.sorted().into_iter().map(|(k, v)| (k.clone(), v.as_deref().map(shown))).collect())
            })
            .collect()
    };
    Step {
        index,
        event,
        calls,
        writes: by_key(&writes.kv),
        documents: by_key(&writes.docs),
        emitted: writes.emitted,
        unrouted: writes.unrouted,
        outcome,
    }
}

/// The events of an NDJSON file: one event per line, as appended
/// (`{"type", "key"?, "time"?, "headers"?, "data"}`), with an optional
/// `"stream"` (default: `stream`). Each stream's events are on partition 0
/// at offsets from 0, in file order; an event without `time` has time 0.
pub fn read_events(text: &str, stream: &str) -> Result<Vec<Event>, String> {
    let mut offsets: BTreeMap<String, u64> = BTreeMap::new();
    let mut events = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = |e: String| format!("line {}: {e}", n + 1);
        let mut value: Value = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        let object = value.as_object_mut().ok_or_else(|| at("an event is a JSON object".into()))?;
        let stream = match object.remove("stream") {
            None => stream.to_owned(),
            Some(Value::String(s)) => s,
            Some(other) => return Err(at(format!("`stream` must be a string, got {other}"))),
        };
        crate::names::validate("stream", &stream).map_err(at)?;
        let new: NewEvent = serde_json::from_value(value).map_err(|e| at(e.to_string()))?;
        let headers = new.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        crate::event::check_event(&new.event_type, new.key.as_deref(), headers, new.data.get().len(), 1 << 20)
            .map_err(at)?;
        let offset = offsets.entry(stream.clone()).or_default();
        events.push(Event {
            stream,
            partition: 0,
            offset: *offset,
            key: new.key,
            event_type: new.event_type,
            time: new.time.unwrap_or(0),
            headers: new.headers.into_iter().collect(),
            content_type: "application/json".into(),
            data: new.data.get().as_bytes().to_vec(),
        });
        *offset += 1;
    }
    Ok(events)
}

/// What a test expects of the run (`--expect`), each part optional:
/// `{"tables": {table: {key: value}}, "documents": {index: {id: document}},
/// "emitted": [{"stream"?, "type"?, "key"?, "data"?, …}], "failed": n}`.
/// Tables and indexes named are compared whole (keys missing or extra are
/// differences); an emitted event is compared on the fields it names.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expected {
    #[serde(default)]
    pub tables: Option<BTreeMap<String, Contents>>,
    #[serde(default)]
    pub documents: Option<BTreeMap<String, Contents>>,
    #[serde(default)]
    pub emitted: Option<Vec<serde_json::Map<String, Value>>>,
    #[serde(default)]
    pub failed: Option<u64>,
}

impl Expected {
    /// How the run's `end` differs from what is expected, one line per
    /// difference, each naming the table (or index) and key (empty: as expected).
    pub fn differences(&self, end: &Final) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(expected) = &self.tables {
            compare_declared("table", expected, &end.tables, &mut out);
        }
        if let Some(expected) = &self.documents {
            compare_declared("index", expected, &end.documents, &mut out);
        }
        if let Some(expected) = &self.emitted {
            for (i, fields) in expected.iter().enumerate() {
                let Some(got) = end.emitted.get(i) else {
                    out.push(format!("emitted[{i}]: expected {}, nothing was emitted", Value::Object(fields.clone())));
                    continue;
                };
                for (field, want) in fields {
                    compare(&format!("emitted[{i}].{field}"), want, &got[field.as_str()], &mut out);
                }
            }
            for (i, got) in end.emitted.iter().enumerate().skip(expected.len()) {
                out.push(format!("emitted[{i}]: not expected, got {got}"));
            }
        }
        if let Some(expected) = self.failed
            && end.failed != expected
        {
            out.push(format!("failed: expected {expected} events to fail, {} did", end.failed));
        }
        out
    }
}

/// What a run ended with, in `expected.json`'s shape (`--json`'s `final`).
#[derive(Debug, serde::Serialize)]
pub struct Final {
    pub tables: BTreeMap<String, Contents>,
    pub documents: BTreeMap<String, Contents>,
    /// Every event emitted, as [`emitted_json`] shows it.
    pub emitted: Vec<Value>,
    pub failed: u64,
}

/// Each of `expected`'s tables (or indexes, as `what` says) against the one
/// of that name in `actual`.
fn compare_declared(
    what: &str,
    expected: &BTreeMap<String, Contents>,
    actual: &BTreeMap<String, Contents>,
    out: &mut Vec<String>,
) {
    for (name, contents) in expected {
        match actual.get(name) {
            None => out.push(format!("{what} {name:?}: the plugin declares no such {what}")),
            Some(got) => compare_contents(name, contents, got, out),
        }
    }
}

/// An emitted event as JSON: `{"stream", "type", "key", "time", "headers", "data"}`.
pub fn emitted_json(e: &Emitted) -> Value {
    let headers: serde_json::Map<String, Value> =
        e.headers.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    serde_json::json!({"stream": e.stream, "type": e.event_type, "key": e.key, "time": e.time,
        "headers": headers, "data": serde_json::from_str::<Value>(e.data.get()).unwrap_or(Value::Null)})
}

fn compare_contents(name: &str, expected: &Contents, actual: &Contents, out: &mut Vec<String>) {
    for (key, want) in expected {
        match actual.get(key) {
            None => out.push(format!("{name}[{key:?}]: expected {want}, missing")),
            Some(got) => compare(&format!("{name}[{key:?}]"), want, got, out),
        }
    }
    for (key, got) in actual.iter().filter(|(k, _)| !expected.contains_key(*k)) {
        out.push(format!("{name}[{key:?}]: not expected, got {got}"));
    }
}

/// The differences between two JSON values, by path: objects field by
/// field, arrays of the same length item by item, numbers by value (1 = 1.0).
fn compare(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (field, wv) in w {
                match g.get(field) {
                    Some(gv) => compare(&format!("{path}.{field}"), wv, gv, out),
                    None => out.push(format!("{path}.{field}: expected {wv}, missing")),
                }
            }
            for (field, gv) in g.iter().filter(|(f, _)| !w.contains_key(*f)) {
                out.push(format!("{path}.{field}: not expected, got {gv}"));
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                compare(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        (Value::Number(w), Value::Number(g)) if w.as_f64() == g.as_f64() => {}
        _ if want == got => {}
        _ => out.push(format!("{path}: expected {want}, got {got}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_name_the_key_and_the_field() {
        let mut out = Vec::new();
        let want: Contents = [("o-1".to_owned(), json!({"n": 2, "last": 20}))].into();
        let got: Contents =
            [("o-1".to_owned(), json!({"n": 3.0, "last": 20.0})), ("o-2".to_owned(), json!({"n": 1}))].into();
        compare_contents("counts", &want, &got, &mut out);
        assert_eq!(
            out,
            [r#"counts["o-1"].n: expected 2, got 3.0"#, r#"counts["o-2"]: not expected, got {"n":1}"#],
            "numbers compare by value (20 = 20.0)"
        );
    }

    #[test]
    fn events_are_read_as_appended_with_an_optional_stream() {
        let text = r#"{"type": "OrderPlaced", "key": "o-1", "time": 5, "data": {"orderId": "o-1"}}

{"stream": "payments", "type": "PaymentReceived", "data": {"orderId": "o-1"}}
{"type": "OrderShipped", "key": "o-1", "data": {}}
"#;
        let events = read_events(text, "orders").unwrap();
        let at: Vec<(&str, u64, i64)> = events.iter().map(|e| (e.stream.as_str(), e.offset, e.time)).collect();
        assert_eq!(at, [("orders", 0, 5), ("payments", 0, 0), ("orders", 1, 0)]);
        assert_eq!(events[0].data, br#"{"orderId":"o-1"}"#, "the data, as JSON");

        let error = read_events("{\"type\": \"A\", \"data\": 1}\n{\"type\": \"B\"}\n", "s").unwrap_err();
        assert!(error.starts_with("line 2: missing field `data`"), "{error}");
        let error = read_events("{\"type\": \"A\", \"data\": 1, \"extra\": 2}", "s").unwrap_err();
        assert!(error.contains("unknown field `extra`"), "{error}");
    }
}
