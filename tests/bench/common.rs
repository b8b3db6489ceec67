//! What the benchmarks share: running a handler through the real projector,
//! medians, CPU time, and a minimal HTTP client.
#![allow(dead_code, reason = "each bench uses a different part")]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use refract::plugin::Handler;
use refract::projector::{BatchOptions, Projector};
use refract::source::log::EventLog;
use refract::store::ReadModel;

/// Run `handler` through the projector (with its read-ahead thread) until it
/// has consumed every event of `streams`; the seconds it took and its read
/// model (in `dir/<name>.redb`).
pub(crate) fn run_projector(
    name: &str,
    handler: Box<dyn Handler>,
    log: &Arc<EventLog>,
    streams: &[&str],
    dir: &Path,
) -> (f64, Arc<ReadModel>) {
    let read_model = Arc::new(ReadModel::open(&dir.join(format!("{name}.redb"))).unwrap());
    run_projector_on(read_model, handler, log, streams)
}

/// [`run_projector`] into `read_model`.
pub(crate) fn run_projector_on(
    read_model: Arc<ReadModel>,
    handler: Box<dyn Handler>,
    log: &Arc<EventLog>,
    streams: &[&str],
) -> (f64, Arc<ReadModel>) {
    let mut options = BatchOptions::default();
    // `REFRACT_BENCH_CATCH_UP=<factor>`: another `batch.catch-up-factor`.
    if let Some(factor) = std::env::var("REFRACT_BENCH_CATCH_UP").ok().and_then(|f| f.parse().ok()) {
        options.catch_up_factor = factor;
    }
    let projector = Projector::new(
        handler,
        read_model.clone(),
        refract::source::Sources::log(log.clone()),
        options,
        Arc::new(Mutex::new(Default::default())),
    )
    .unwrap();
    let control = projector.control();
    let total: u64 = streams.iter().map(|s| log.heads(s).unwrap().iter().sum::<u64>()).sum();
    let started = Instant::now();
    let worker = std::thread::spawn(move || projector.run());
    let consumed = || read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).sum::<u64>();
    while consumed() < total {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let seconds = started.elapsed().as_secs_f64();
    control.stop();
    worker.join().unwrap();
    (seconds, read_model)
}

/// An embedded log in `dir` whose streams have 4 partitions, as the
/// benchmarks append their fixtures to.
pub(crate) fn open_log(dir: &Path) -> Arc<EventLog> {
    let options = refract::source::log::LogOptions { default_partitions: 4, ..Default::default() };
    Arc::new(EventLog::open(&dir.join("log.redb"), options).unwrap())
}

/// Append `events` (fixtures, as JSON) to `stream`, 10,000 at a time.
pub(crate) fn append(log: &EventLog, stream: &str, events: &[serde_json::Value]) {
    for chunk in events.chunks(10_000) {
        let chunk: Vec<refract::source::NewEvent> =
            chunk.iter().map(|e| serde_json::from_value(e.clone()).unwrap()).collect();
        log.append(stream, &chunk).unwrap();
    }
}

/// The median of `values` (NaN when there are none: a variant not run).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Per round, how fast `measured` ran against `baseline` (both in seconds,
/// the same rounds in the same order): baseline ÷ measured, a rate ratio.
pub(crate) fn rate_ratios(measured: &[f64], baseline: &[f64]) -> Vec<f64> {
    measured.iter().zip(baseline).map(|(m, b)| b / m).collect()
}

/// The lowest and highest of `values`, as "lo–hi" to two decimals: a
/// ratio's spread over the rounds.
pub(crate) fn spread(values: &[f64]) -> String {
    let (lo, hi) = values.iter().fold((f64::INFINITY, 0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    format!("{lo:.2}–{hi:.2}")
}

/// CPU seconds this process has used so far, in all its threads (user and
/// system). Differences of it are steadier than wall time on a shared machine:
/// time the process spends waiting for a core is not in them.
pub(crate) fn process_cpu_seconds() -> f64 {
    // SAFETY: `getrusage` only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0, "getrusage");
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A minimal HTTP/1.1 keep-alive client (like a load generator's), so the
/// measurement is of the server, not of a client library.
pub(crate) struct Connection {
    stream: std::io::BufReader<std::net::TcpStream>,
}

impl Connection {
    pub(crate) fn new(address: &str) -> Self {
        let stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_nodelay(true).unwrap();
        Connection { stream: std::io::BufReader::new(stream) }
    }

    /// `GET path`: the status and the JSON body.
    pub(crate) fn get(&mut self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.get_bytes(path);
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// `GET path`: the status and the body, unparsed (as a load generator reads it).
    pub(crate) fn get_bytes(&mut self, path: &str) -> (u16, Vec<u8>) {
        use std::io::{BufRead, Read, Write};
        let request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
        self.stream.get_mut().write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        self.stream.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut length = 0;
        loop {
            line.clear();
            self.stream.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).unwrap();
        (status, body)
    }
}

/// The ids of the orders `events` place, in a scattered order (a fixed
/// shuffle), so that lookups do not walk the B-tree in sequence.
pub(crate) fn scattered_order_ids(events: &[serde_json::Value]) -> Vec<String> {
    let mut keys: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "OrderPlaced")
        .map(|e| e["data"]["orderId"].as_str().unwrap().to_owned())
        .collect();
    let mut state = 42u64;
    for i in (1..keys.len()).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        keys.swap(i, (state >> 33) as usize % (i + 1));
    }
    keys
}
