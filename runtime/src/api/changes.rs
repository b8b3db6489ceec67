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
//! table again and subscribe anew. A stream reads the log itself until it
//! has caught up, then takes new changes from its read model's [`Feed`],
//! which reads each commit once for every stream; a slow client holds no
//! more than the feed's bounded backlog (beyond it, it reads the log again).
//! `follow=false` ends the stream once every change committed so far is sent.

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

/// Changes a feed reads from its log at a time, and the pages it keeps for
/// subscribers that have not taken them yet (one that falls further behind
/// reads the log itself until it has caught up).
const FEED_PAGE: usize = 1000;
const FEED_PAGES: usize = 256;

/// A change as a feed hands it out: with its event's kind and data, built
/// once for every stream (only the id is each stream's own).
struct Shared {
    change: crate::store::changes::Change,
    kind: &'static str,
    data: String,
}

type FeedPage = Arc<Vec<Shared>>;

/// One tail of a live read model's change log, shared by every stream of
/// it: each commit is read from the log once, however many streams follow
/// the read model, and handed to them in memory.
pub(super) struct Feed {
    pages: tokio::sync::broadcast::Sender<FeedPage>,
}

/// The feeds of the read models streams follow, by read model.
#[derive(Default)]
pub(super) struct Feeds(std::sync::Mutex<std::collections::HashMap<usize, std::sync::Weak<Feed>>>);

impl Feeds {
    /// Follow `read_model`'s feed (started if none runs): every change
    /// committed after this call comes through the receiver, in order,
    /// unless it falls behind (then it says it lagged). Blocks briefly: it
    /// reads where the log ends.
    fn subscribe(
        &self,
        read_model: &Arc<crate::store::ReadModel>,
    ) -> crate::store::Result<(Arc<Feed>, tokio::sync::broadcast::Receiver<FeedPage>)> {
        let mut feeds = self.0.lock().expect("feeds lock");
        feeds.retain(|_, feed| feed.strong_count() > 0);
        // The feed task holds its read model: its address is not reused while the feed lives.
        let key = Arc::as_ptr(read_model) as usize;
        if let Some(feed) = feeds.get(&key).and_then(std::sync::Weak::upgrade) {
            let receiver = feed.pages.subscribe();
            return Ok((feed, receiver));
        }
        let after = read_model.last_change()?;
        let (pages, receiver) = tokio::sync::broadcast::channel(FEED_PAGES);
        let feed = Arc::new(Feed { pages });
        feeds.insert(key, Arc::downgrade(&feed));
        tokio::spawn(tail(read_model.clone(), Arc::downgrade(&feed), after));
        Ok((feed, receiver))
    }
}

/// Read `read_model`'s changes after `after` as they commit, and hand them
/// to the feed's subscribers, until the last of them has gone.
async fn tail(read_model: Arc<crate::store::ReadModel>, feed: std::sync::Weak<Feed>, mut after: u64) {
    let mut commits = read_model.commit_signal().watch();
    loop {
        commits.mark_unchanged();
        let reading = read_model.clone();
        let page = super::run_blocking("reading the change log", move || reading.changes_since(after, FEED_PAGE)).await;
        let Some(live) = feed.upgrade() else { return };
        match page {
            Ok(Ok(page)) if page.read_up_to > after => {
                after = page.read_up_to;
                let shared = page
                    .changes
                    .into_iter()
                    .map(|change| {
                        let (kind, data) = kind_and_data(&change);
                        Shared { change, kind, data }
                    })
                    .collect();
                // No subscriber at this instant is no loss: each reads the log up to where it subscribed.
                let _ = live.pages.send(Arc::new(shared));
                continue;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "reading the change log for change streams"),
            Err(e) => tracing::warn!(error = ?e, "reading the change log for change streams"),
        }
        drop(live);
        let _ = tokio::time::timeout(IDLE, commits.changed()).await;
    }
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
    let local = p.shards();
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
    let (start, ready, feeds) = {
        let local = local.clone();
        let resume = resume.clone();
        let state = state.clone();
        super::run_blocking("starting a change stream", move || -> Result<(Cursor, bool, Vec<Subscription>), ApiError> {
            // Subscribed before the stream reads the log: whatever commits
            // after that read comes through the feed.
            let mut feeds = Vec::new();
            for shard in &local {
                let (feed, pages) = state.http.feeds.subscribe(&shard.live().read_model)?;
                feeds.push(Subscription { shard: number(shard, partitioned), _feed: feed, pages });
            }
            let (cursor, ready) = match resume {
                None => {
                    let mut after = BTreeMap::new();
                    for shard in &local {
                        after.insert(number(shard, partitioned), shard.live().read_model.last_change()?);
                    }
                    (Cursor { generation, after }, true)
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
                    (cursor, false)
                }
            };
            Ok((cursor, ready, feeds))
        })
        .await??
    };
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
        feeds,
        caught_up: false,
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
    /// Each shard's feed: once the stream has read the log to its end, new
    /// changes come from there.
    feeds: Vec<Subscription>,
    /// It has read every change committed when it last read the log: it
    /// takes the next from the feeds (until one skips ahead or lags).
    caught_up: bool,
    done: bool,
}

/// A stream's place in one shard's feed.
struct Subscription {
    shard: u32,
    /// Keeps the feed running.
    _feed: Arc<Feed>,
    pages: tokio::sync::broadcast::Receiver<FeedPage>,
}

/// The event name and data of change `c`.
fn kind_and_data(c: &crate::store::changes::Change) -> (&'static str, String) {
    let key = serde_json::Value::String(c.key.clone());
    let positions = serde_json::Value::String(c.positions.clone());
    match &c.value {
        Some(v) => {
            let value = super::raw_json(v.clone());
            ("put", format!("{{\"key\":{key},\"value\":{},\"positions\":{positions}}}", value.get()))
        }
        None => ("delete", format!("{{\"key\":{key},\"positions\":{positions}}}")),
    }
}

/// The event of change `c`, whose id is `id` (where the stream stands after it).
fn event_of(c: &crate::store::changes::Change, id: String) -> Event {
    let (kind, data) = kind_and_data(c);
    Event::default().event(kind).id(id).data(data)
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
        let shards = s.p.shards();
        let live = shards.first().map_or(0, |x| x.live().number);
        if s.p.is_removed() || live != s.cursor.generation {
            s.done = true;
            let data = serde_json::json!({"generation": live, "reason": "the read model was rebuilt (or its projection removed): read the table again and subscribe anew"});
            return Some((Ok(Event::default().event("reload").data(data.to_string())), s));
        }
        if s.caught_up {
            // Take the next page of any shard's feed (or look at the
            // generation again after a while).
            let receives =
                s.feeds.iter_mut().enumerate().map(|(i, f)| Box::pin(async move { (i, f.pages.recv().await) }));
            let next_page = futures_util::future::select_all(receives);
            let received = tokio::select! {
                (got, _, _) = next_page => Some(got),
                _ = tokio::time::sleep(IDLE) => None,
                _ = s.closing.changed() => None,
            };
            let Some((i, page)) = received else { continue };
            let shard = s.feeds[i].shard;
            match page {
                Ok(page) => {
                    let mut after = s.cursor.after.get(&shard).copied().unwrap_or(0);
                    for shared in page.iter() {
                        let c = &shared.change;
                        if c.seq <= after {
                            continue;
                        }
                        if c.seq != after + 1 {
                            // It subscribed after the feed read this far: the log has the rest.
                            s.caught_up = false;
                            break;
                        }
                        after = c.seq;
                        s.cursor.after.insert(shard, after);
                        if c.table == s.table && c.key.starts_with(&s.prefix) {
                            let event = Event::default().event(shared.kind).id(s.cursor.id(s.partitioned));
                            s.pending.push_back(event.data(&shared.data));
                        }
                    }
                }
                // Fell behind the feed, or it ended: read the log.
                Err(_) => s.caught_up = false,
            }
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok(event), s));
            }
            continue;
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
                    s.pending.push_back(event_of(c, s.cursor.id(s.partitioned)));
                }
                // Changes after the last one sent that did not match: read on after them.
                s.cursor.after.insert(shard, read_up_to);
                let event = s.pending.pop_front().expect("a change was read");
                return Some((Ok(event), s));
            }
            Ok(Ok(Read::Nothing)) if !s.follow => return None,
            // Read to the end: what commits next comes from the feeds.
            Ok(Ok(Read::Nothing)) => s.caught_up = true,
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
