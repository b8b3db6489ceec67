//! The HTTP API holds up against careless and hostile clients: every route
//! is documented in `/openapi.json` and guarded by the right token, bodies
//! over the limit are refused, slow requests time out, every failure is a
//! JSON error (schemathesis fuzzing every operation: `api_fuzz`).

use std::time::{Duration, Instant};

use refract_client::{Client, Reply};
use serde_json::{Value, json};

use crate::support::{Server, encode, ndjson, plugins};

pub(crate) const ADMIN: &str = "admin-secret-0123456789";
const QUERY: &str = "query-secret-0123456789";

pub(crate) fn tokens() -> String {
    format!("auth:\n  admin-token: {ADMIN}\n  query-token: {QUERY}\n")
}

/// `path` of the OpenAPI document with its parameters filled in.
fn fill(path: &str) -> String {
    [
        ("{stream}", "orders"),
        ("{projection}", "order-summary"),
        ("{table}", "orders"),
        ("{key}", "o-1"),
        ("{id}", "1"),
        ("{index}", "orders"),
        ("{plugin}", "walked"),
    ]
    .iter()
    .fold(path.to_owned(), |p, (from, to)| p.replace(from, to))
        // A change stream follows the table until told not to.
        + if path.ends_with("/changes") { "?follow=false" } else { "" }
}

fn send(client: &Client, method: &str, path: &str) -> Reply {
    match method {
        "get" => client.get(path),
        "post" => client.post(path, "application/json", b"{\"type\":\"Walked\",\"data\":{}}"),
        "put" => client.put(path, "application/wasm", b"not a component"),
        "delete" => client.delete(path),
        other => panic!("the route walk does not know {other}"),
    }
    .unwrap()
}

#[test]
fn every_documented_route_exists_and_its_token_guards_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[&plugins().order_summary], &tokens());
    let anonymous = server.client();
    let query = Client::new(&server.url).with_token(Some(QUERY));
    let admin = Client::new(&server.url).with_token(Some(ADMIN));
    let doc = anonymous.get("/openapi.json").unwrap();
    assert_eq!(doc.status, 200, "the OpenAPI document is open: {}", doc.body);
    assert_eq!(doc.body["openapi"], "3.1.0");

    let mut walked = 0;
    for (path, item) in doc.body["paths"].as_object().unwrap() {
        let url = fill(path);
        for (method, operation) in item.as_object().unwrap().iter().filter(|(k, _)| *k != "parameters") {
            walked += 1;
            let what = format!("{} {path}", method.to_uppercase());
            let open = path == "/" || path == "/healthz" || path == "/openapi.json";
            let mutating = method != "get";
            let refused = |reply: &Reply| reply.status == 401 && reply.body["error"]["code"] == "unauthorized";
            let without = send(&anonymous, method, &url);
            assert_eq!(refused(&without), !open, "{what} without a token: {} {}", without.status, without.body);
            let with_query = send(&query, method, &url);
            assert_eq!(refused(&with_query), mutating, "{what} with the query token: {}", with_query.body);
            // With the admin token: let through, and the answer is one the document lists.
            let with_admin = send(&admin, method, &url);
            assert!(![401, 403].contains(&with_admin.status), "{what} refused the admin token: {}", with_admin.body);
            assert!(
                with_admin.status < 500 || with_admin.status == 503,
                "{what}: {} {}",
                with_admin.status,
                with_admin.body
            );
            let documented = operation["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(&with_admin.status.to_string()),
                "{what} answered {} which its operation does not document: {}",
                with_admin.status,
                with_admin.body
            );
            if with_admin.status >= 400 {
                assert!(with_admin.body["error"]["code"].is_string(), "{what}: not a JSON error: {}", with_admin.body);
            }
        }
    }
    assert_eq!(walked, 29, "every operation of the API was walked");
    // Paging past the largest id is an empty page (it once overflowed).
    let past = admin.get("/v1/projections/order-summary/dead-letters?after=18446744073709551615").unwrap();
    assert_eq!((past.status, past.body["deadLetters"].as_array().map(Vec::len)), (200, Some(0)), "{}", past.body);
    // Anything else is a JSON 404, and a method a route lacks a JSON 405.
    let none = admin.get("/v1/nothing/here").unwrap();
    assert_eq!((none.status, none.body["error"]["code"].as_str()), (404, Some("no_route")));
    let wrong = admin.delete("/v1/streams").unwrap();
    assert_eq!(
        (wrong.status, wrong.body["error"]["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{}",
        wrong.body
    );
    assert!(wrong.body["error"]["message"].as_str().unwrap().contains("GET"), "{}", wrong.body);
}

#[test]
fn oversized_bodies_are_413_slow_requests_503_and_neither_loses_anything() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "api:\n  max-body-mb: 1\n  request-timeout-ms: 2000\nlimits:\n  deadline-ms: 8000\nauth:\n  admin-token: {ADMIN}\n"
    );
    let server = Server::start(dir.path(), &[&plugins().chaos], &config);
    let admin = Client::new(&server.url).with_token(Some(ADMIN));

    // 1.5 MiB of events: refused whole, nothing appended.
    let events: Vec<Value> =
        (0..12_000).map(|i| json!({"type": "Ok", "data": {"n": i, "pad": "x".repeat(100)}})).collect();
    let body = ndjson(&events);
    assert!(body.len() > 1 << 20);
    let refused = admin.post("/v1/streams/chaos/events", "application/x-ndjson", &body).unwrap();
    assert_eq!(
        (refused.status, refused.body["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{}",
        refused.body
    );
    assert!(refused.body["error"]["message"].as_str().unwrap().contains("1 MiB"), "{}", refused.body);
    let streams = admin.get("/v1/streams").unwrap();
    assert!(streams.body["streams"].as_array().unwrap().iter().all(|s| s["name"] != "chaos"), "{}", streams.body);
    let upload = admin.put("/v1/plugins/big", "application/wasm", &vec![0u8; 3 << 20]).unwrap();
    assert_eq!(upload.status, 413, "{}", upload.body);
    assert!(!dir.path().join("plugins/big.wasm").exists());
    // Just under the limit is accepted.
    let fits = admin.post("/v1/streams/chaos/events", "application/x-ndjson", &ndjson(&events[..5000])).unwrap();
    assert_eq!(fits.status, 200, "{}", fits.body);

    // `Spin` holds the worker until its deadline (8 s): a query waiting for
    // it outlasts the request timeout (2 s) and gets a 503, promptly. (The
    // timeout is not shorter because the append above must fit in it on a
    // loaded CI machine: at 0.5 s it once did not.)
    let spin = admin.post("/v1/streams/chaos/events", "application/json", br#"{"type":"Spin","data":{}}"#).unwrap();
    let token = encode(spin.body["waitFor"].as_str().unwrap());
    let started = Instant::now();
    let slow = admin
        .get(&format!("/v1/projections/testkit-chaos/tables/applied/items?wait_for={token}&timeout_ms=20000"))
        .unwrap();
    assert_eq!((slow.status, slow.body["error"]["code"].as_str()), (503, Some("request_timeout")), "{}", slow.body);
    assert!(started.elapsed() < Duration::from_secs(6), "the timeout cut the wait short");
    assert_eq!(admin.get("/healthz").unwrap().status, 200);
    // Nothing was lost: every accepted event is handled (the spin as a dead letter).
    server.wait_caught_up();
    let status = server.get("/v1/projections/testkit-chaos");
    assert_eq!((status["eventsApplied"].as_u64(), status["deadLetters"].as_u64()), (Some(5000), Some(1)), "{status}");
}

#[test]
fn connections_that_never_finish_their_headers_are_closed_and_others_are_served() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], "api:\n  header-timeout-ms: 300\n");
    let address = server.url.trim_start_matches("http://").to_owned();
    // Slowloris: many connections, each a request line and a header, never the blank line.
    let mut slow: Vec<std::net::TcpStream> = (0..64)
        .map(|_| {
            let mut tcp = std::net::TcpStream::connect(&address).unwrap();
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: refract\r\n").unwrap();
            tcp
        })
        .collect();
    assert_eq!(server.client().get("/healthz").unwrap().status, 200, "served meanwhile");
    let started = Instant::now();
    for tcp in &mut slow {
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reply = Vec::new();
        // The server closes the connection (a read of 0 bytes), after at most a 408.
        match tcp.read_to_end(&mut reply) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 408"), "{reply}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "closed after the header timeout, not the read timeout");
    // A client that sends its request in time, even in pieces, is answered.
    let mut tcp = std::net::TcpStream::connect(&address).unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    tcp.write_all(b"host: refract\r\nconnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// A process's peak and current resident memory (`VmHWM`, `VmRSS`), in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// The median of `n` timings of `request`, each of which must answer 200.
fn median_ms(n: usize, mut request: impl FnMut() -> u16) -> f64 {
    let mut took: Vec<f64> = (0..n)
        .map(|_| {
            let started = Instant::now();
            assert_eq!(request(), 200);
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    took.sort_by(|a, b| a.partial_cmp(b).unwrap());
    took[n / 2]
}

/// Everything at once from clients that mean harm, on a server whose open
/// files are limited to 1,024 as on a small machine: 2,000 connections that
/// send nothing, 100 that send the HTTP/2 preface and then nothing, bodies
/// of 60 and 200 MB sent without a token or over the size limit, a search
/// nested 30,000 deep and one facet asked 8,000 times. Health checks and
/// queries are answered throughout (latencies printed), the silent
/// connections are closed after the header timeout, and the server's peak
/// memory grows by less than 64 MiB.
#[test]
fn hostile_clients_leave_queries_answered_and_memory_bounded() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let config =
        format!("auth:\n  admin-token: {ADMIN}\napi:\n  header-timeout-ms: 1000\nsearch:\n  commit-interval-ms: 50\n");
    let mut server = Server::start(dir.path(), &[&plugins().order_search], &config);
    server.soft_nofile = Some(1024);
    server.kill();
    server.restart();
    let admin = Client::new(&server.url).with_token(Some(ADMIN));
    let events = refract_client::fixtures::orders(500, 9, 0.0);
    assert_eq!(admin.append_ndjson("orders", &ndjson(&events)).unwrap().status, 200);
    server.wait_caught_up();
    let client = server.client();
    let healthz = || client.get("/healthz").unwrap().status;
    let page = || client.get("/v1/projections/order-search/tables/orders/items?limit=100").unwrap().status;
    let idle = (median_ms(30, healthz), median_ms(30, page));
    let (peak_before, _) = memory_kib(server.pid());

    let address = server.url.trim_start_matches("http://").to_owned();
    let silent: Vec<std::net::TcpStream> = (0..2000).map(|_| std::net::TcpStream::connect(&address).unwrap()).collect();
    let preface: Vec<std::net::TcpStream> = (0..100)
        .map(|_| {
            let mut tcp = std::net::TcpStream::connect(&address).unwrap();
            tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
            tcp
        })
        .collect();
    // Large bodies: two without a token (under the size limit), two declared over it.
    let uploads: Vec<_> = [(60usize << 20, "wrong-token-0123456789"), (60 << 20, ""), (200 << 20, ADMIN), (200 << 20, ADMIN)]
        .into_iter()
        .map(|(size, token)| {
            let address = address.clone();
            std::thread::spawn(move || {
                let mut tcp = std::net::TcpStream::connect(&address).unwrap();
                let auth = if token.is_empty() { String::new() } else { format!("authorization: Bearer {token}\r\n") };
                let head = format!(
                    "POST /v1/streams/orders/events HTTP/1.1\r\nhost: refract\r\n{auth}content-type: application/x-ndjson\r\ncontent-length: {size}\r\n\r\n"
                );
                tcp.write_all(head.as_bytes()).unwrap();
                let chunk = vec![b' '; 1 << 20];
                for _ in 0..size >> 20 {
                    if tcp.write_all(&chunk).is_err() {
                        break; // answered and closed before the end: fine
                    }
                }
                tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut reply = [0u8; 12];
                let _ = tcp.read_exact(&mut reply);
                String::from_utf8_lossy(&reply).into_owned()
            })
        })
        .collect();
    let nested = format!("{}a{}", "(".repeat(30_000), ")".repeat(30_000));
    let search = "/v1/projections/order-search/indexes/orders/search";
    assert_eq!(client.get(&format!("{search}?q={nested}")).unwrap().status, 400);
    assert_eq!(client.get(&format!("{search}?facets={}", "status,".repeat(8000))).unwrap().status, 200);
    let attacked = (median_ms(30, healthz), median_ms(30, page));
    let replies: Vec<String> = uploads.into_iter().map(|u| u.join().unwrap()).collect();
    assert_eq!(replies.iter().filter(|r| r.starts_with("HTTP/1.1 401")).count(), 2, "{replies:?}");
    assert_eq!(replies.iter().filter(|r| r.starts_with("HTTP/1.1 413")).count(), 2, "{replies:?}");
    let (peak_after, rss) = memory_kib(server.pid());
    println!(
        "idle: healthz {:.2} ms, page {:.2} ms; under attack: healthz {:.2} ms ({:.1}×), page {:.2} ms ({:.1}×); \
         peak memory {} → {} MiB, now {} MiB",
        idle.0,
        idle.1,
        attacked.0,
        attacked.0 / idle.0,
        attacked.1,
        attacked.1 / idle.1,
        peak_before >> 10,
        peak_after >> 10,
        rss >> 10
    );
    assert!(
        peak_after.saturating_sub(peak_before) < 64 << 10,
        "peak memory grew from {peak_before} to {peak_after} KiB"
    );

    // The connections that said nothing (or only the HTTP/2 preface) are closed.
    for mut tcp in silent.into_iter().chain(preface) {
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buffer = [0u8; 256];
        loop {
            match tcp.read(&mut buffer) {
                Ok(0) => break,
                Ok(_) => continue, // an HTTP/2 settings frame or ping, then the close
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("a silent connection was kept open: {e}"),
            }
        }
    }
    assert_eq!(healthz(), 200);
}
