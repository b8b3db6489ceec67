//! Projection status and read-model queries.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use super::extract::{Path, Query};
use serde::Deserialize;

use super::consistency::{self, Consistency};
use super::dto::{
    DeadLetterPage, DeadLetterView, Item, Page, ProjectionList, RebuildCancelled, RebuildStarted, Resumed, Retried,
    Skipped,
};
use super::{ApiError, page_limit};
use crate::runtime::{Projection, Runtime, Shard};

/// The projection called `name`, or a 404.
pub(super) fn find(rt: &Runtime, name: &str) -> Result<Arc<Projection>, ApiError> {
    rt.projection(name).ok_or_else(|| ApiError::not_found("projection_not_found", format!("no projection {name:?}")))
}

fn check_table(p: &Projection, table: &str) -> Result<(), ApiError> {
    let m = p.manifest();
    if m.tables.iter().any(|t| t == table) {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "table_not_found",
            format!("projection {:?} has no table {table:?}; it has {:?}", m.name, m.tables),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListParams {
    /// Only projections, or only enrichers.
    kind: Option<crate::plugin::Kind>,
}

pub(super) async fn list(
    State(rt): State<Arc<Runtime>>,
    Query(params): Query<ListParams>,
) -> Result<Json<ProjectionList>, ApiError> {
    let statuses = rt
        .projections()
        .iter()
        .map(|p| rt.status(p))
        .filter(|s| s.as_ref().map_or(true, |s| params.kind.is_none_or(|k| s.plugin.kind == k)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(ProjectionList { projections: statuses, plugin_errors: rt.plugin_errors() }))
}

pub(super) async fn status(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
) -> Result<Json<crate::runtime::ProjectionStatus>, ApiError> {
    let p = find(&rt, &name)?;
    Ok(Json(rt.status(&p)?))
}

pub(super) async fn get_item(
    State(rt): State<Arc<Runtime>>,
    Path((name, table, key)): Path<(String, String, String)>,
    Query(wait): Query<Consistency>,
) -> Result<Json<Box<serde_json::value::RawValue>>, ApiError> {
    let p = find(&rt, &name)?;
    check_table(&p, &table)?;
    consistency::wait(&rt, &p, &wait, false).await?;
    match get(&p, &table, &key)? {
        Some(bytes) => Ok(Json(super::raw_json(bytes))),
        None => Err(ApiError::not_found("key_not_found", format!("no key {key:?} in table {table:?}"))),
    }
}

/// The value of `key` in whichever shard holds it: at most one may (a
/// second holder is reported, never silently picked).
fn get(p: &Projection, table: &str, key: &str) -> Result<Option<Vec<u8>>, ApiError> {
    let mut found: Option<(Option<u32>, Vec<u8>)> = None;
    for shard in p.shards() {
        let Some(value) = shard.live().read_model.get(table, key)? else { continue };
        if let Some((other, _)) = &found {
            return Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "key_in_two_shards",
                format!(
                    "key {key:?} of table {table:?} is in shards {} and {}: the projection writes keys that are not partitioned like its events",
                    other.unwrap_or(0),
                    shard.partition.unwrap_or(0)
                ),
            ));
        }
        found = Some((shard.partition, value));
    }
    Ok(found.map(|(_, v)| v))
}

#[derive(Deserialize)]
pub(super) struct ScanParams {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn scan(
    State(rt): State<Arc<Runtime>>,
    Path((name, table)): Path<(String, String)>,
    Query(q): Query<ScanParams>,
    Query(wait): Query<Consistency>,
) -> Result<Json<Page>, ApiError> {
    let limit = page_limit(q.limit)?;
    let p = find(&rt, &name)?;
    check_table(&p, &table)?;
    consistency::wait(&rt, &p, &wait, false).await?;
    // One more than asked tells whether there is a next page. Each shard
    // gives its first keys after the cursor; merged in key order, the
    // first of them are the page's (and its last key the next cursor).
    let mut entries = Vec::new();
    for shard in p.shards() {
        entries.extend(shard.live().read_model.scan(&table, &q.prefix, q.after.as_deref(), limit + 1)?);
    }
    if p.shards().len() > 1 {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.truncate(limit + 1);
    }
    let more = entries.len() > limit;
    entries.truncate(limit);
    let next = if more { entries.last().map(|(k, _)| k.clone()) } else { None };
    let items = entries.into_iter().map(|(key, v)| Item { key, value: super::raw_json(v) }).collect();
    Ok(Json(Page { items, next }))
}

#[derive(Deserialize)]
pub(super) struct DeadLetterParams {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

pub(super) async fn dead_letters(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
    Query(q): Query<DeadLetterParams>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    let p = find(&rt, &name)?;
    // Shard by shard, in id order (the ids say which shard).
    let mut letters = Vec::new();
    for shard in p.shards() {
        let Some(after) = Projection::dead_letters_after(shard, q.after) else { continue };
        let page = shard.live().read_model.dead_letters(after, limit + 1 - letters.len())?;
        letters.extend(page.into_iter().map(|(id, letter)| (Projection::dead_letter_id(shard, id), letter)));
        if letters.len() > limit {
            break;
        }
    }
    let more = letters.len() > limit;
    letters.truncate(limit);
    let next = if more { letters.last().map(|(id, _)| *id) } else { None };
    let dead_letters = letters.into_iter().map(|(id, letter)| DeadLetterView { id, letter }).collect();
    Ok(Json(DeadLetterPage { dead_letters, next }))
}

/// `GET /v1/projections/{p}/dead-letters/{id}`: one dead letter.
pub(super) async fn dead_letter(
    State(rt): State<Arc<Runtime>>,
    Path((name, id)): Path<(String, u64)>,
) -> Result<Json<DeadLetterView>, ApiError> {
    let p = find(&rt, &name)?;
    let Some((shard, local)) = p.locate_dead_letter(id) else { return Err(no_dead_letter(&name, id)) };
    let Some(letter) = shard.live().read_model.dead_letter(local)? else {
        return Err(no_dead_letter(&name, id));
    };
    Ok(Json(DeadLetterView { id, letter }))
}

fn no_dead_letter(projection: &str, id: u64) -> ApiError {
    ApiError::not_found("dead_letter_not_found", format!("{projection} holds no dead letter {id}"))
}

/// `DELETE /v1/projections/{p}/dead-letters/{id}`: skip it — drop the letter,
/// leaving its event unapplied (admin token required).
pub(super) async fn skip_dead_letter(
    State(rt): State<Arc<Runtime>>,
    Path((name, id)): Path<(String, u64)>,
) -> Result<Json<Skipped>, ApiError> {
    let p = find(&rt, &name)?;
    let Some((shard, local)) = p.locate_dead_letter(id) else { return Err(no_dead_letter(&name, id)) };
    let read_model = shard.live().read_model.clone();
    let removed = tokio::task::spawn_blocking(move || read_model.remove_dead_letter(local))
        .await
        .map_err(|e| ApiError::internal("skipping a dead letter", e))??;
    if !removed {
        return Err(no_dead_letter(&name, id));
    }
    Ok(Json(Skipped { skipped: id }))
}

/// `POST /v1/projections/{p}/dead-letters/retry` (every letter) and
/// `…/dead-letters/{id}/retry`: hand the events to the plugin again, as it is
/// now (after a fix). Answers what was applied and what failed again.
pub(super) async fn retry_dead_letters(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
) -> Result<Json<Retried>, ApiError> {
    retry(&rt, &name, None).await
}

pub(super) async fn retry_dead_letter(
    State(rt): State<Arc<Runtime>>,
    Path((name, id)): Path<(String, u64)>,
) -> Result<Json<Retried>, ApiError> {
    retry(&rt, &name, Some(vec![id])).await
}

async fn retry(rt: &Runtime, name: &str, ids: Option<Vec<u64>>) -> Result<Json<Retried>, ApiError> {
    let p = find(rt, name)?;
    // Each shard's worker retries its own letters; ids are the API's.
    let mut asks: Vec<(&Arc<Shard>, Option<Vec<u64>>)> = Vec::new();
    let mut report = Retried::default();
    match ids {
        None => asks.extend(p.shards().iter().map(|s| (s, None))),
        Some(ids) => {
            for id in ids {
                match p.locate_dead_letter(id) {
                    Some((shard, local)) => match asks.iter_mut().find(|(s, _)| Arc::ptr_eq(s, shard)) {
                        Some((_, Some(list))) => list.push(local),
                        _ => asks.push((shard, Some(vec![local]))),
                    },
                    None => report.missing.push(id),
                }
            }
        }
    }
    for (shard, ids) in asks {
        let part = retry_in(shard, name, ids).await?;
        let api = |local| Projection::dead_letter_id(shard, local);
        report.applied.extend(part.applied.into_iter().map(api));
        report.missing.extend(part.missing.into_iter().map(api));
        report
            .failed
            .extend(part.failed.into_iter().map(|f| crate::projector::RetryFailure { id: api(f.id), error: f.error }));
    }
    Ok(Json(report))
}

/// Retry `ids` (or every dead letter) of one shard, with its own ids.
async fn retry_in(shard: &Arc<Shard>, name: &str, ids: Option<Vec<u64>>) -> Result<Retried, ApiError> {
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::{Duration, Instant};
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let live = shard.live();
        let (reply, answer) = std::sync::mpsc::channel();
        live.control.retry(crate::projector::RetryRequest { ids: ids.clone(), reply });
        // The worker takes requests between batches. One that stops first (a
        // rebuild switched generations, the plugin was removed) never answers.
        let projection = shard.clone();
        let asked = live.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            // A worker stopped for a switch is replaced within moments; one
            // stopped for good (its plugin removed) is not.
            let mut stopped_at: Option<Instant> = None;
            loop {
                match answer.recv_timeout(Duration::from_millis(50)) {
                    Ok(report) => return Some(report),
                    // The worker stopped and dropped the request unanswered:
                    // wait, as for a stopped worker, for the next generation.
                    Err(RecvTimeoutError::Disconnected) => {
                        stopped_at.get_or_insert_with(Instant::now);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if asked.stop.load(std::sync::atomic::Ordering::Relaxed) {
                            stopped_at.get_or_insert_with(Instant::now);
                        }
                    }
                }
                let gone = stopped_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5));
                if gone || !Arc::ptr_eq(&asked, &projection.live()) || Instant::now() >= until {
                    // It answered just before stopping, or never will.
                    return answer.try_recv().ok();
                }
            }
        })
        .await
        .map_err(|e| ApiError::internal("retrying dead letters", e))?;
        if let Some(report) = outcome {
            return Ok(report);
        }
        if Arc::ptr_eq(&live, &shard.live()) || Instant::now() >= until {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "worker_unavailable",
                format!("the worker of {name} is stopped or did not answer in time"),
            ));
        }
        // A new generation is live, with dead letters of its own: all of them
        // can be retried there; a single id named one of the old generation's.
        if ids.is_some() {
            return Err(ApiError::conflict(
                "generation_switched",
                format!("a rebuild of {name} went live meanwhile, with its own dead letters: list them again"),
            ));
        }
    }
}

/// `POST /v1/projections/{p}/resume`: end a pause after too many dead
/// letters in a row (admin token required).
pub(super) async fn resume(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
) -> Result<Json<Resumed>, ApiError> {
    let p = find(&rt, &name)?;
    let mut resumed = false;
    for shard in p.shards() {
        let live = shard.live();
        if live.status.lock().expect("status lock").state == crate::projector::WorkerState::Paused {
            live.control.resume();
            resumed = true;
        }
    }
    Ok(Json(Resumed { projection: name, resumed }))
}

/// `POST /v1/projections/{p}/rebuild`: replay the projection's streams into a
/// new generation while the live one keeps serving (admin token required).
pub(super) async fn rebuild(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
) -> Result<(axum::http::StatusCode, Json<RebuildStarted>), ApiError> {
    find(&rt, &name)?;
    let runtime = rt.clone();
    let projection = name.clone();
    let started = tokio::task::spawn_blocking(move || runtime.rebuild(&projection, None))
        .await
        .map_err(|e| ApiError::internal("starting a rebuild", e))?;
    match started {
        Ok(generation) => Ok((axum::http::StatusCode::ACCEPTED, Json(RebuildStarted { projection: name, generation }))),
        Err(e) => Err(rebuild_error(&name, e)),
    }
}

/// `DELETE /v1/projections/{p}/rebuild`: cancel a rebuild and delete what it built.
pub(super) async fn cancel_rebuild(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
) -> Result<Json<RebuildCancelled>, ApiError> {
    find(&rt, &name)?;
    match rt.cancel_rebuild(&name) {
        Ok(generation) => Ok(Json(RebuildCancelled { projection: name, cancelled: generation })),
        Err(e) => Err(rebuild_error(&name, e)),
    }
}

fn rebuild_error(name: &str, e: crate::runtime::RebuildError) -> ApiError {
    use crate::runtime::RebuildError;
    match e {
        RebuildError::NotFound => ApiError::not_found("projection_not_found", format!("no projection {name:?}")),
        RebuildError::Running(_) => ApiError::conflict("rebuild_running", format!("{name}: {e}")),
        RebuildError::NotRunning => ApiError::not_found("no_rebuild", format!("{name}: {e}")),
        RebuildError::Switching(_) => ApiError::conflict("rebuild_switching", format!("{name}: {e}")),
        RebuildError::Invalid(m) => ApiError::bad_request(format!("{name}: {m}")),
    }
}
