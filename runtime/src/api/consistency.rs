//! Read-your-writes: a query may name positions it must see.
//!
//! An append replies with `waitFor`, a token listing the last position it
//! wrote in each partition (`<stream>:<partition>:<offset>,…`). Any query of a
//! projection's read model may carry `wait_for=<token>` (and `timeout_ms`):
//! it is answered only once the projection has handled those positions — and,
//! for a search, once the index has applied every document change committed
//! up to then. Kafka positions take the same form, with the topic (or the
//! stream it is mapped to) and the Kafka partition and offset. When the timeout
//! expires first, the reply is a 504 naming how far the projection got.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::ApiError;
use crate::runtime::{Projection, Runtime, Shard};
use crate::source::Position;

/// How long a query waits when it names no `timeout_ms`, and the most it may ask for.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// The query parameters of read-your-writes, accepted by every read-model query.
#[derive(Debug, Default, Deserialize)]
pub struct Consistency {
    pub wait_for: Option<String>,
    pub timeout_ms: Option<u64>,
}

/// Per (stream, partition): the offset that must have been handled.
type Wanted = BTreeMap<(String, u32), u64>;

/// The `waitFor` token for appended `positions` of `stream`.
pub fn token(stream: &str, positions: &[Position]) -> String {
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for p in positions {
        let o = last.entry(p.partition).or_insert(p.offset);
        *o = (*o).max(p.offset);
    }
    last.iter().map(|(p, o)| format!("{stream}:{p}:{o}")).collect::<Vec<_>>().join(",")
}

fn parse(token: &str) -> Result<Wanted, ApiError> {
    let mut wanted = Wanted::new();
    for item in token.split(',').filter(|s| !s.is_empty()) {
        let bad = || {
            ApiError::bad_request(format!(
                "wait_for: {item:?} is not <stream>:<partition>:<offset> (as an append's `waitFor` gives)"
            ))
        };
        let mut parts = item.rsplitn(3, ':');
        let (Some(offset), Some(partition), Some(stream)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let (partition, offset) = (partition.parse().map_err(|_| bad())?, offset.parse().map_err(|_| bad())?);
        crate::names::validate("stream", stream).map_err(ApiError::bad_request)?;
        let o = wanted.entry((stream.to_owned(), partition)).or_insert(offset);
        *o = (*o).max(offset);
    }
    Ok(wanted)
}

/// What is still missing: positions not yet handled, with the checkpoint
/// reached. Each shard's checkpoints are those of the partitions it holds.
fn missing(shards: &[Arc<Shard>], wanted: &Wanted) -> Result<Vec<String>, ApiError> {
    let mut checkpoints = crate::source::reader::Cursor::new();
    for shard in shards {
        checkpoints.extend(shard.live().read_model.cursor()?);
    }
    Ok(wanted
        .iter()
        .filter_map(|(k, offset)| {
            let at = checkpoints.get(k).copied().unwrap_or(0);
            (at <= *offset).then(|| format!("{}:{}:{offset} (checkpoint {at})", k.0, k.1))
        })
        .collect())
}

/// Wait until `shards` of `p` have handled what `c` names of their
/// partitions (and, with `search`, until their indexes have applied the
/// document changes committed by then). Other instances wait for the rest.
pub async fn wait(
    rt: &Runtime,
    p: &Projection,
    shards: &[Arc<Shard>],
    c: &Consistency,
    search: bool,
) -> Result<(), ApiError> {
    let kafka = &rt.kafka;
    let timeout = match c.timeout_ms {
        None => DEFAULT_TIMEOUT,
        Some(ms) if Duration::from_millis(ms) <= MAX_TIMEOUT => Duration::from_millis(ms),
        Some(ms) => {
            return Err(ApiError::bad_request(format!(
                "timeout_ms may be at most {}, got {ms}",
                MAX_TIMEOUT.as_millis()
            )));
        }
    };
    let Some(token) = &c.wait_for else { return Ok(()) };
    let mut wanted = parse(token)?;
    // A Kafka topic stands for the stream it is mapped to.
    wanted = wanted
        .into_iter()
        .map(|((name, partition), offset)| {
            let stream = kafka.streams.iter().find(|(_, t)| t.topic == name).map(|(s, _)| s.clone());
            ((stream.unwrap_or(name), partition), offset)
        })
        .collect();
    if let Some(stream) =
        wanted.keys().map(|(s, _)| s).find(|s| !p.manifest().subscriptions.iter().any(|x| &x.stream == *s))
    {
        return Err(ApiError::bad_request(format!(
            "wait_for names stream {stream:?}, which projection {:?} does not read",
            p.manifest().name
        )));
    }
    // A partition no shard holds would only ever time out.
    let count = p.shard_count();
    if let Some((stream, partition)) = wanted.keys().find(|(_, n)| p.is_partitioned() && *n >= count) {
        return Err(ApiError::bad_request(format!(
            "wait_for names partition {partition} of {stream}, and {:?} has {count} shards (one per partition)",
            p.manifest().name,
        )));
    }
    // Each shard waits for the partition it holds.
    if p.is_partitioned() {
        wanted.retain(|(_, n), _| shards.iter().any(|s| s.number() == *n));
    }
    // A position the embedded log has not written would only ever time out.
    for ((stream, partition), offset) in &wanted {
        if kafka.topic(stream).is_some() {
            continue;
        }
        let head = rt.log.heads(stream).and_then(|h| h.get(*partition as usize).copied()).unwrap_or(0);
        if *offset >= head {
            return Err(ApiError::bad_request(format!(
                "wait_for names {stream}:{partition}:{offset}, which the log has not written (that partition's head is {head})"
            )));
        }
    }
    let until = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    // Per shard, the document changes committed once the positions were handled.
    let mut documents: Option<Vec<u64>> = None;
    loop {
        let behind = match &documents {
            None => {
                let behind = missing(shards, &wanted)?;
                if behind.is_empty() {
                    if !search {
                        return Ok(());
                    }
                    // Every document change up to now must be searchable.
                    let sequences = shards.iter().map(|s| s.live().read_model.outbox_sequence());
                    documents = Some(sequences.collect::<Result<_, _>>()?);
                    continue;
                }
                format!("projection {:?} has not handled {}", p.manifest().name, behind.join(", "))
            }
            Some(sequences) => {
                let behind: Vec<String> = shards
                    .iter()
                    .zip(sequences)
                    .filter_map(|(shard, sequence)| {
                        let applied = shard.live().indexes.applied.load(std::sync::atomic::Ordering::Relaxed);
                        (applied < *sequence).then(|| match shard.partition {
                            Some(n) => format!("{applied} of {sequence} (shard {n})"),
                            None => format!("{applied} of {sequence}"),
                        })
                    })
                    .collect();
                if behind.is_empty() {
                    return Ok(());
                }
                format!(
                    "the indexes of {:?} have applied document changes up to {}",
                    p.manifest().name,
                    behind.join(", ")
                )
            }
        };
        if Instant::now() >= until {
            return Err(ApiError::timeout(format!("after {} ms, {behind}", timeout.as_millis())));
        }
        tokio::time::sleep(pause.min(until.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_the_last_position_per_partition_and_parse_back() {
        let positions = [
            Position { partition: 1, offset: 4 },
            Position { partition: 0, offset: 9 },
            Position { partition: 1, offset: 7 },
        ];
        let t = token("orders", &positions);
        assert_eq!(t, "orders:0:9,orders:1:7");
        let wanted = parse(&format!("{t},payments.v2:3:0")).unwrap();
        assert_eq!(wanted[&("orders".to_owned(), 1)], 7);
        assert_eq!(wanted[&("payments.v2".to_owned(), 3)], 0);
        for bad in ["orders", "orders:x:1", "orders:1:-1", "a/b:0:1", ":0:1"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
