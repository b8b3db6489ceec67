//! The process is killed with SIGKILL at random moments while events are
//! appended and projected; after each restart it carries on. The final read
//! model must equal the reference fold: nothing lost, nothing applied twice.

use std::time::{Duration, Instant};

use crate::support::{Server, ndjson, plugins, reference};

const EVENTS: usize = 20_000;
const KILLS: usize = 6;
const CHUNK: usize = 250;

fn total_in_log(server: &Server) -> u64 {
    let streams = server.get("/v1/streams");
    streams["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "orders")
        .flat_map(|s| s["heads"].as_array().unwrap().iter().map(|h| h.as_u64().unwrap()))
        .sum()
}

#[test]
fn sigkill_during_appends_and_batches_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    // Small batches and a short batch duration: many commits, so kills land between and inside them.
    let config = "batch:\n  max-events: 400\n  call-events: 100\n  max-duration-ms: 20\n";
    let mut server = Server::start(dir.path(), &[&p.order_summary], config);
    let events = refract_client::fixtures::orders(EVENTS, 2024, 0.01);
    let mut rng = refract_client::fixtures::Rng::new(99);

    let mut acknowledged = 0usize; // events the log has confirmed, in order
    let mut kills = 0;
    let mut kills_mid_batch = 0; // kills while the projection had work in hand
    while acknowledged < EVENTS || kills < KILLS {
        // Append in a thread while this thread picks a moment to kill.
        let url = server.url.clone();
        let chunks: Vec<Vec<u8>> = events[acknowledged..].chunks(CHUNK).map(ndjson).collect();
        let sender = std::thread::spawn(move || {
            let client = refract_client::Client::new(&url);
            let mut sent = 0;
            for chunk in chunks {
                match client.append_ndjson("orders", &chunk) {
                    Ok(r) if r.status == 200 => sent += 1,
                    _ => break,
                }
            }
            sent
        });
        let kill_after = Duration::from_millis(rng.range(50, 700));
        let started = Instant::now();
        while started.elapsed() < kill_after && !sender.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        if kills < KILLS {
            if sender.is_finished() {
                // Everything was appended: kill while the projection is still working.
                std::thread::sleep(Duration::from_millis(rng.range(0, 30)));
            }
            let lag = server.client().get("/v1/projections/order-summary").map(|r| r.body["lag"].clone());
            server.kill();
            kills += 1;
            let lag = lag.ok().and_then(|l| l.as_u64()).unwrap_or(0);
            kills_mid_batch += usize::from(lag > 0);
            eprintln!("kill {kills}: {acknowledged}+ events acknowledged, projection lag {lag}");
        }
        let sent_chunks = sender.join().unwrap();
        acknowledged = (acknowledged + sent_chunks * CHUNK).min(EVENTS);
        if server_is_down(&server) {
            server.restart();
        }
        // A chunk in flight at the kill either committed entirely or not at all.
        let in_log = total_in_log(&server) as usize;
        let in_flight = CHUNK.min(EVENTS - acknowledged);
        assert!(
            in_log == acknowledged || in_log == acknowledged + in_flight,
            "log holds {in_log} events; {acknowledged} acknowledged, {in_flight} in flight"
        );
        acknowledged = in_log;
    }
    assert!(kills >= 5);
    assert!(kills_mid_batch >= 1, "no kill landed while the projection was behind");
    server.wait_caught_up();

    server.assert_order_summary_is_the_fold_of(&events);
    let expected = reference::orders(&events);
    let letters = server.get("/v1/projections/order-summary/dead-letters?limit=1000");
    let mut offsets: Vec<(u64, u64)> = letters["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["partition"].as_u64().unwrap(), l["offset"].as_u64().unwrap()))
        .collect();
    offsets.sort();
    offsets.dedup();
    assert_eq!(offsets.len(), expected.rejected, "one dead letter per rejected event");
}

fn server_is_down(server: &Server) -> bool {
    server.client().get("/healthz").is_err()
}
