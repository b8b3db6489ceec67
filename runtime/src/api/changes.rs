//! `GET /v1/projections/{p}/tables/{t}/changes?prefix=`: a change stream.
//!
//! Server-Sent Events, one per committed put (`event: put`) or delete
//! (`event: delete`) of a key of the table under the prefix, in commit
//! order, read from the read model's change log (`store::changes`), which
//! each batch writes in its own transaction: nothing of a batch that did
//! not commit is ever sent. Each event's id is where the stream stands
//! after it (`<generation>:<change number>`; a partitioned projection's
//! `<generation>:<shard>=<number>,…`): a client that reconnects with it as
//! `Last-Event-ID` goes on with the next change, none missed and none
//! twice. A new stream starts with `event: ready` (its id: where it
//! starts), after which a client reads the table to start from. Beyond the
//! change log's window a resumption is 410 `changes_gone` (a stream that
//! falls that far behind ends with `event: gone`); once a rebuild switches
//! generations the stream ends with `event: reload`. Either way: read the
//! table again and subscribe anew. A slow client costs no memory: the
//! stream reads the log as it sends. `follow=false` ends the stream once
//! every change committed so far is sent.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;

use super::extract::{Path, Query};
use super::projections::{check_table, find};
use super::{ApiError, AppState};
use crate::runtime::{Projection, Shard};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChangesParams {
    #[serde(default)]
    prefix: String,
    /// Where to resume, as `Last-Event-ID` gives it (for clients that cannot set headers).
    after: Option<String>,
    /// `false`: end the stream once every change committed so far is sent.
    follow: Option<bool>,
}

/// Changes sent per read of the log, and changes looked at per read.
const PAGE: usize = 500;
const SCAN: usize = 10_000;

/// How often a stream with nothing to send looks at the generation (a
/// commit wakes it at once).
const IDLE: Duration = Duration::from_secs(1);

/// Where a stream stands: the generation, and per shard the last change sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    generation: u64,
    /// By shard number (an unpartitioned projection's one shard is 0).
    after: BTreeMap<u32, u64>,
}

impl Cursor {
    fn id(&self, partitioned: bool) -> String {
        match partitioned {
            false => format!("{}:{}", self.generation, self.after.get(&0).copied().unwrap_or(0)),
            true => {
                let shards: Vec<String> = self.after.iter().map(|(s, n)| format!("{s}={n}")).collect();
                format!("{}:{}", self.generation, shards.join(","))
            }
        }
    }

    fn parse(id: &str, partitioned: bool) -> Result<Cursor, ApiError> {
        let bad = || {
            ApiError::bad_request(format!(
                "Last-Event-ID {id:?} is not an id this change stream sent (`<generation>:<number>`, or for a partitioned projection `<generation>:<shard>=<number>,…`)"
            ))
        };
        let (generation, rest) = id.split_once(':').ok_or_else(bad)?;
        let generation = generation.parse().map_err(|_| bad())?;
        let mut after = BTreeMap::new();
        if partitioned {
            for item in rest.split(',').filter(|s| !s.is_empty()) {
                let (shard, n) = item.split_once('=').ok_or_else(bad)?;
                after.insert(shard.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
            }
        } else {
            after.insert(0, rest.parse().map_err(|_| bad())?);
        }
        Ok(Cursor { generation, after })
    }
}

/// The shards of `p` this instance answers a change stream from: all of them.
fn shards(p: &Projection) -> Vec<Arc<Shard>> {
    p.shards()
}

fn number(shard: &Shard, partitioned: bool) -> u32 {
    if partitioned { shard.number() } else { 0 }
}

pub(super) async fn changes(
    State(state): State<AppState>,
    Path((name, table)): Path<(String, String)>,
    Query(params): Query<ChangesParams>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let p = find(&state.runtime, &name)?;
    check_table(&p, &table)?;
    let partitioned = p.is_partitioned();
    let local = shards(&p);
    if local.len() as u32 != p.shard_count() {
        return Err(ApiError::conflict(
            "changes_in_cluster",
            format!(
                "{name}: its shards run on several instances; change streams of a projection partitioned across a cluster are not supported yet"
            ),
        ));
    }
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned).or(params.after);
    let generation = local.first().map_or(0, |s| s.live().number);
    let runtime = state.runtime.clone();
    let (start, ready) = {
        let local = local.clone();
        let resume = resume.clone();
        super::run_blocking("starting a change stream", move || -> Result<(Cursor, bool), ApiError> {
            match resume {
                None => {
                    let mut after = BTreeMap::new();
                    for shard in &local {
                        after.insert(number(shard, partitioned), shard.live().read_model.last_change()?);
                    }
                    Ok((Cursor { generation, after }, true))
                }
                Some(id) => {
                    let cursor = Cursor::parse(&id, partitioned)?;
                    if cursor.generation == generation {
                        for shard in &local {
                            let n = cursor.after.get(&number(shard, partitioned)).copied().unwrap_or(0);
                            let read_model = &shard.live().read_model;
                            if gone(n, read_model.oldest_change()?, read_model.last_change()?) {
                                return Err(ApiError::new(
                                    axum::http::StatusCode::GONE,
                                    "changes_gone",
                                    format!(
                                        "the changes after {id} are no longer kept (changes.retention-seconds, changes.max-changes): read the table again and subscribe anew"
                                    ),
                                ));
                            }
                        }
                    }
                    Ok((cursor, false))
                }
            }
        })
        .await??
    };
    drop(runtime);
    let stream = ChangeStream {
        p,
        table,
        prefix: params.prefix,
        partitioned,
        cursor: start,
        ready,
        pending: Default::default(),
        closing: state.http.closing.subscribe(),
        follow: params.follow.unwrap_or(true),
        reads: state.http.change_reads.clone(),
        done: false,
    };
    Ok(Sse::new(futures_util::stream::unfold(stream, next)).keep_alive(KeepAlive::default()))
}

/// Whether the changes right after `after` have been trimmed: the oldest kept is
/// further on, or none is kept and more were committed.
fn gone(after: u64, oldest: Option<u64>, last: u64) -> bool {
    match oldest {
        Some(oldest) => after + 1 < oldest,
        None => after < last,
    }
}

/// What one look at the change logs found.
enum Read {
    /// Nothing after the stream's cursor.
    Nothing,
    /// The changes after the cursor were trimmed.
    Gone,
    /// `shard`'s changes read, up to `read_up_to` (matching or not).
    Page { shard: u32, changes: Vec<crate::store::changes::Change>, read_up_to: u64 },
}

struct ChangeStream {
    p: Arc<Projection>,
    table: String,
    prefix: String,
    partitioned: bool,
    cursor: Cursor,
    /// `event: ready` is still to be sent.
    ready: bool,
    /// Events read from the log and not sent yet (a page at most).
    pending: std::collections::VecDeque<Event>,
    /// The server is stopping: the stream ends (the client resumes with its last id).
    closing: tokio::sync::watch::Receiver<bool>,
    /// Wait for new changes once every committed one is sent (else end).
    follow: bool,
    /// Taken while reading the log (see `Http::change_reads`).
    reads: Arc<tokio::sync::Semaphore>,
    done: bool,
}

/// The stream's next event, or nothing more.
async fn next(mut s: ChangeStream) -> Option<(Result<Event, Infallible>, ChangeStream)> {
    if let Some(event) = s.pending.pop_front() {
        return Some((Ok(event), s));
    }
    if s.done {
        return None;
    }
    if s.ready {
        s.ready = false;
        let event = Event::default().event("ready").id(s.cursor.id(s.partitioned)).data("{}");
        return Some((Ok(event), s));
    }
    loop {
        if *s.closing.borrow() {
            return None;
        }
        let shards = shards(&s.p);
        let live = shards.first().map_or(0, |x| x.live().number);
        if s.p.is_removed() || live != s.cursor.generation {
            s.done = true;
            let data = serde_json::json!({"generation": live, "reason": "the read model was rebuilt (or its projection removed): read the table again and subscribe anew"});
            return Some((Ok(Event::default().event("reload").data(data.to_string())), s));
        }
        let mut watches: Vec<_> = shards.iter().map(|x| x.live().read_model.commit_signal().watch()).collect();
        for w in &mut watches {
            w.mark_unchanged();
        }
        let (table, prefix, partitioned) = (s.table.clone(), s.prefix.clone(), s.partitioned);
        let cursor = s.cursor.clone();
        let permit = s.reads.clone().acquire_owned().await.expect("the semaphore is never closed");
        let read = super::run_blocking("reading the change log", move || -> crate::store::Result<Read> {
            let _permit = permit;
            for shard in &shards {
                let n = number(shard, partitioned);
                let after = cursor.after.get(&n).copied().unwrap_or(0);
                let read_model = &shard.live().read_model;
                let page = read_model.changes_after(after, &table, &prefix, PAGE, SCAN)?;
                if gone(after, page.oldest, read_model.last_change()?) {
                    return Ok(Read::Gone);
                }
                if page.read_up_to > after {
                    return Ok(Read::Page { shard: n, changes: page.changes, read_up_to: page.read_up_to });
                }
            }
            Ok(Read::Nothing)
        })
        .await;
        match read {
            Ok(Ok(Read::Gone)) => {
                s.done = true;
                let data = serde_json::json!({"reason": "this stream fell behind the change log's window (changes.retention-seconds, changes.max-changes): read the table again and subscribe anew"});
                return Some((Ok(Event::default().event("gone").data(data.to_string())), s));
            }
            Ok(Ok(Read::Page { shard, changes, read_up_to })) => {
                if changes.is_empty() {
                    // Changes of other tables or keys: the stream moves on quietly.
                    s.cursor.after.insert(shard, read_up_to);
                    continue;
                }
                for c in &changes {
                    s.cursor.after.insert(shard, c.seq);
                    let key = serde_json::Value::String(c.key.clone());
                    let positions = serde_json::Value::String(c.positions.clone());
                    let (kind, data) = match &c.value {
                        Some(v) => {
                            let value = super::raw_json(v.clone());
                            ("put", format!("{{\"key\":{key},\"value\":{},\"positions\":{positions}}}", value.get()))
                        }
                        None => ("delete", format!("{{\"key\":{key},\"positions\":{positions}}}")),
                    };
                    s.pending.push_back(Event::default().event(kind).id(s.cursor.id(s.partitioned)).data(data));
                }
                // Changes after the last one sent that did not match: read on after them.
                s.cursor.after.insert(shard, read_up_to);
                let event = s.pending.pop_front().expect("a change was read");
                return Some((Ok(event), s));
            }
            Ok(Ok(Read::Nothing)) if !s.follow => return None,
            Ok(Ok(Read::Nothing)) => {
                // Nothing new: wait for a commit of any shard (or look again after a while).
                let waits = watches.iter_mut().map(|w| Box::pin(w.changed()));
                let any = futures_util::future::select_all(waits);
                tokio::select! {
                    _ = tokio::time::timeout(IDLE, any) => {}
                    _ = s.closing.changed() => {}
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(projection = %s.p.manifest().name, error = %e, "reading the change log");
                tokio::time::sleep(IDLE).await;
            }
            Err(e) => {
                tracing::warn!(error = ?e, "reading the change log");
                tokio::time::sleep(IDLE).await;
            }
        }
    }
}
