//! Change streams: `GET /v1/projections/{p}/tables/{t}/changes` as
//! Server-Sent Events, resumed with `Last-Event-ID` across disconnects and
//! a SIGKILL, ended for a rebuild, refused beyond the change log's window.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use refract_client::Client;
use serde_json::Value;

use crate::support::{Server, ndjson, plugins};

const ADMIN: &str = "admin-secret-0123456789";

fn config(extra: &str) -> String {
    format!(
        "auth:\n  admin-token: {ADMIN}\nbatch:\n  max-events: 200\n  call-events: 50\n  max-duration-ms: 10\n{extra}"
    )
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

/// An open change stream, read event by event.
struct Stream {
    lines: BufReader<Box<dyn std::io::Read + Send>>,
}

/// Open a change stream at `path` (resuming after `last_id`): the stream,
/// or the status and body it was refused with.
fn open(url: &str, path: &str, last_id: Option<&str>) -> Result<Stream, (u16, Value)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(2)))
        .build()
        .into();
    let mut request = agent.get(format!("{url}{path}"));
    if let Some(id) = last_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.call().map_err(|e| (0, Value::String(e.to_string())))?;
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.into_body().read_to_string().unwrap_or_default();
        return Err((status, serde_json::from_str(&body).unwrap_or(Value::String(body))));
    }
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    let reader: Box<dyn std::io::Read + Send> = Box::new(response.into_body().into_reader());
    Ok(Stream { lines: BufReader::new(reader) })
}

impl Stream {
    /// The next event (keep-alive comments skipped); `None` when the stream ends.
    fn next(&mut self) -> Option<Sse> {
        let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
        loop {
            let mut line = String::new();
            match self.lines.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() && id.is_none() {
                    continue;
                }
                return Some(Sse { event, id, data: serde_json::from_str(&data).unwrap_or(Value::String(data)) });
            }
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
    }
}

/// The change number in an unpartitioned stream's id (`<generation>:<number>`).
fn number(id: &str) -> u64 {
    id.split_once(':').unwrap().1.parse().unwrap()
}

/// A client of a change stream that applies what it receives to a map, and
/// checks each change comes after the last one.
#[derive(Default)]
struct Replica {
    items: BTreeMap<String, Value>,
    last_id: Option<String>,
    changes: u64,
    reconnects: u64,
    /// The change numbers received, in order.
    numbers: Vec<u64>,
    /// How long it takes over each change (a slow client).
    pause: Duration,
}

impl Replica {
    fn apply(&mut self, e: &Sse) {
        let id = e.id.clone().expect("every change has an id");
        if let Some(last) = &self.last_id {
            assert!(number(&id) > number(last), "change {id} after {last}: out of order or twice");
        }
        let key = e.data["key"].as_str().unwrap().to_owned();
        match e.event.as_str() {
            "put" => {
                self.items.insert(key, e.data["value"].clone());
            }
            "delete" => {
                self.items.remove(&key);
            }
            other => panic!("unexpected event {other}: {e:?}"),
        }
        self.changes += 1;
        self.numbers.push(number(&id));
        std::thread::sleep(self.pause);
        self.last_id = Some(id);
    }

    /// Read changes until `done` says the replica is complete, reconnecting
    /// (with `Last-Event-ID`) when the stream breaks and every `every`
    /// changes on purpose.
    fn follow(&mut self, url: &str, path: &str, every: u64, done: impl Fn(&Replica) -> bool) {
        let until = Instant::now() + Duration::from_secs(120);
        while !done(self) {
            assert!(Instant::now() < until, "the change stream never completed: {} changes", self.changes);
            let mut stream = match open(url, path, self.last_id.as_deref()) {
                Ok(s) => s,
                Err((0, _)) => {
                    // The server is down (killed on purpose): try again.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err((status, body)) => panic!("{status} {body}"),
            };
            self.reconnects += 1;
            let mut here = 0;
            while let Some(e) = stream.next() {
                match e.event.as_str() {
                    "ready" => {
                        assert!(self.last_id.is_none(), "a resumed stream does not start again");
                        self.last_id = e.id.clone();
                    }
                    _ => self.apply(&e),
                }
                here += 1;
                if here >= every || done(self) {
                    break;
                }
            }
        }
    }
}

impl Replica {
    /// Read every change committed so far (`follow=false`), once.
    fn drain(&mut self, url: &str, path: &str) {
        let separator = if path.contains('?') { '&' } else { '?' };
        let path = format!("{path}{separator}follow=false");
        let mut stream = open(url, &path, self.last_id.as_deref()).unwrap();
        while let Some(e) = stream.next() {
            self.apply(&e);
        }
    }
}

fn append(server: &Server, events: &[Value]) {
    let admin = Client::new(&server.url).with_token(Some(ADMIN));
    for chunk in events.chunks(250) {
        assert_eq!(admin.append_ndjson("orders", &ndjson(chunk)).unwrap().status, 200);
    }
}

/// A client that disconnects every 300 changes and resumes with its last
/// event id, across a SIGKILL and restart of the server mid-ingest, applies
/// every change once and in order: its replica equals the reference fold,
/// for the whole table and for a prefix.
#[test]
fn a_change_stream_resumes_across_disconnects_and_a_kill_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[&plugins().order_summary], &config(""));
    let events = refract_client::fixtures::orders(4_000, 31, 0.01);
    let expected = crate::support::reference::orders(&events);
    append(&server, &events[..1000]);

    // From the start of the log ("0:0"), while the rest arrives.
    let (url, orders) = (server.url.clone(), expected.orders.clone());
    let follower = std::thread::spawn(move || {
        let mut replica = Replica { last_id: Some("0:0".into()), ..Replica::default() };
        replica.follow(&url, "/v1/projections/order-summary/tables/orders/changes", 300, |r| r.items == orders);
        replica
    });
    append(&server, &events[1000..2500]);
    server.kill();
    server.restart();
    append(&server, &events[2500..]);
    server.wait_caught_up();
    let replica = follower.join().unwrap();
    assert!(replica.reconnects >= 3, "{} reconnects", replica.reconnects);
    let table: BTreeMap<String, Value> = server.table("order-summary", "orders").into_iter().collect();
    assert!(replica.items == table, "the replica differs from the table");

    // Every change is in one of the two tables: the numbers both streams
    // sent, together, are each change of the log once. (The replica stopped
    // once it equalled the table: changes that rewrote a value alike may follow.)
    let mut fresh = open(&server.url, "/v1/projections/order-summary/tables/orders/changes", None).unwrap();
    let last = number(fresh.next().unwrap().id.as_deref().unwrap());
    let mut replica = replica;
    replica.drain(&server.url, "/v1/projections/order-summary/tables/orders/changes");
    assert!(replica.items == table, "the replica differs from the table");
    let mut other = Replica { last_id: Some("0:0".into()), ..Replica::default() };
    other.drain(&server.url, "/v1/projections/order-summary/tables/customer-orders/changes");
    let customer_orders: BTreeMap<String, Value> = expected.customer_orders.clone().into_iter().collect();
    assert!(other.items == customer_orders, "the customer-orders replica differs from the reference");
    let mut all: Vec<u64> = replica.numbers.iter().chain(&other.numbers).copied().collect();
    all.sort_unstable();
    let twice: Vec<u64> = all.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
    let seen: std::collections::BTreeSet<u64> = all.iter().copied().collect();
    let missed: Vec<u64> = (1..=last).filter(|n| !seen.contains(n)).collect();
    assert!(
        twice.is_empty() && missed.is_empty() && seen.last() == Some(&last),
        "of changes 1..={last}: {} missed (first {:?}), {} sent twice (first {:?}); the last seen is {:?}",
        missed.len(),
        &missed[..missed.len().min(10)],
        twice.len(),
        &twice[..twice.len().min(10)],
        seen.last()
    );

    // A prefix: one customer's orders.
    let customer = table.values().next().unwrap()["customerId"].as_str().unwrap().to_owned();
    let prefix = format!("{customer}/");
    let mine: BTreeMap<String, Value> =
        expected.customer_orders.into_iter().filter(|(k, _)| k.starts_with(&prefix)).collect();
    let mut one = Replica { last_id: Some("0:0".into()), ..Replica::default() };
    let path = format!("/v1/projections/order-summary/tables/customer-orders/changes?prefix={prefix}");
    one.follow(&server.url, &path, 1_000_000, |r| r.items == mine);
    assert!(one.items.keys().all(|k| k.starts_with(&prefix)));
}

/// Beyond the change log's window a resumption is 410 `changes_gone`;
/// a rebuild's switch ends a stream with `event: reload`; bad ids and
/// tables are refused with the reason.
#[test]
fn resuming_beyond_the_window_is_gone_and_a_rebuild_ends_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[&plugins().order_summary], &config("changes:\n  max-changes: 100\n"));
    let events = refract_client::fixtures::orders(1_000, 32, 0.0);
    append(&server, &events);
    server.wait_caught_up();
    let path = "/v1/projections/order-summary/tables/orders/changes";
    let Err((status, body)) = open(&server.url, path, Some("0:0")) else { panic!("resumed beyond the window") };
    assert_eq!((status, body["error"]["code"].as_str()), (410, Some("changes_gone")), "{body}");
    let Err((status, body)) = open(&server.url, path, Some("zero")) else { panic!("a bad id was taken") };
    assert_eq!(status, 400, "{body}");
    let Err((status, body)) = open(&server.url, "/v1/projections/order-summary/tables/nope/changes", None) else {
        panic!("an unknown table streamed")
    };
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("table_not_found")), "{body}");

    // A fresh stream starts where the log is; a rebuild ends it with `reload`.
    let mut stream = open(&server.url, path, None).unwrap();
    let ready = stream.next().unwrap();
    assert_eq!(ready.event, "ready", "{ready:?}");
    assert!(number(ready.id.as_deref().unwrap()) > 100, "{ready:?}");
    let admin = Client::new(&server.url).with_token(Some(ADMIN));
    assert_eq!(admin.post("/v1/projections/order-summary/rebuild", "application/json", b"").unwrap().status, 202);
    let end = stream.next().unwrap();
    assert_eq!((end.event.as_str(), end.data["generation"].as_u64()), ("reload", Some(1)), "{end:?}");
    assert!(stream.next().is_none(), "the stream ends after `reload`");
    // On the new generation, a new stream sees new changes.
    let mut stream = open(&server.url, path, None).unwrap();
    let ready = stream.next().unwrap();
    assert!(ready.id.as_deref().unwrap().starts_with("1:"), "{ready:?}");
    let placed = serde_json::json!({"type": "OrderPlaced", "key": "o-new",
        "data": {"orderId": "o-new", "customerId": "c-1", "total": 5.0}});
    append(&server, &[placed]);
    let change = stream.next().unwrap();
    assert_eq!((change.event.as_str(), change.data["key"].as_str()), ("put", Some("o-new")), "{change:?}");
    assert_eq!(change.data["value"]["status"], "placed", "{change:?}");
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// 100 clients follow one table while 10,000 events are ingested, ten of
/// them slow readers: each ends with the table, having received every
/// change of it once, in order; the server holds no backlog per client
/// (each stream reads the log as it sends), so its memory stays bounded.
#[test]
fn a_hundred_clients_follow_one_table_while_ten_thousand_events_arrive() {
    let dir = tempfile::tempdir().unwrap();
    // A small page cache, so that what the server holds is the streams', not redb's cache filling up.
    let server = Server::start(dir.path(), &[&plugins().order_summary], &config("storage:\n  cache-mb: 16\n"));
    let events = refract_client::fixtures::orders(10_000, 34, 0.01);
    let expected = crate::support::reference::orders(&events).orders;
    let path = "/v1/projections/order-summary/tables/orders/changes";
    let before = rss(server.pid());
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let (url, expected) = (server.url.clone(), expected.clone());
            std::thread::spawn(move || {
                let pause = if i < 10 { Duration::from_millis(1) } else { Duration::ZERO };
                let mut replica = Replica { last_id: Some("0:0".into()), pause, ..Replica::default() };
                replica.follow(&url, path, u64::MAX, |r| r.items == expected);
                replica
            })
        })
        .collect();
    let mut peak = before;
    for chunk in events.chunks(500) {
        append(&server, chunk);
        peak = peak.max(rss(server.pid()));
    }
    server.wait_caught_up();
    // Every change of the table, read once more after the others.
    let mut all = Replica { last_id: Some("0:0".into()), ..Replica::default() };
    all.drain(&server.url, path);
    while clients.iter().any(|c| !c.is_finished()) {
        peak = peak.max(rss(server.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let table: BTreeMap<String, Value> = server.table("order-summary", "orders").into_iter().collect();
    assert!(all.items == table);
    for (i, client) in clients.into_iter().enumerate() {
        let mut replica = client.join().unwrap();
        // It stopped once equal to the table: the rest, if any, are rewrites alike.
        replica.drain(&server.url, path);
        assert_eq!(replica.numbers, all.numbers, "client {i} missed or repeated a change");
        assert!(replica.items == table, "client {i} differs from the table");
    }
    let grown = peak.saturating_sub(before);
    eprintln!("server memory: {} MiB before, {} MiB at most with 100 streams", before >> 20, peak >> 20);
    assert!(grown < 256 << 20, "the server grew by {} MiB with 100 streams", grown >> 20);
}
