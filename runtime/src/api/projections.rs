//! Projection status and read-model queries.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;

use super::extract::{Path, Query};
use serde::Deserialize;

use super::consistency::{self, Consistency};
use super::dto::{
    DeadLetterPage, DeadLetterView, Item, Page, ProjectionList, RebuildCancelled, RebuildStarted, Resumed, Retried,
    Skipped,
};
use super::shards::{Incoming, Partial, Plan};
use super::{ApiError, AppState, page_limit};
use crate::runtime::{Projection, Runtime, Shard};
use crate::telemetry::LookupRoute;

/// The projection called `name`; a 503 while it waits for its brokers
/// before it starts, a 404 when there is none.
pub(super) fn find(rt: &Runtime, name: &str) -> Result<Arc<Projection>, ApiError> {
    rt.projection(name).ok_or_else(|| match rt.waiting_for_brokers(name) {
        Some(why) => ApiError::not_started(why),
        None => ApiError::not_found("projection_not_found", format!("no projection {name:?}")),
    })
}

pub(super) fn check_table(p: &Projection, table: &str) -> Result<(), ApiError> {
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
    State(state): State<AppState>,
    Path((name, table, key)): Path<(String, String, String)>,
    Query(wait): Query<Consistency>,
    Query(partial): Query<Partial>,
    request: Incoming,
) -> Result<(HeaderMap, Json<Box<serde_json::value::RawValue>>), ApiError> {
    let p = find(&state.runtime, &name)?;
    check_table(&p, &table)?;
    let lookup = Lookup { state: &state, p: &p, wait: &wait, request: &request, table: &table, key: &key };
    let not_found = || ApiError::not_found("key_not_found", format!("no key {key:?} in table {table:?}"));
    // A table keyed like the events: ask the shard of the key's partition alone.
    let routed = p.shard_for_key(&table, &key);
    if let Some(n) = routed {
        let plan = Plan::one(&state, &p, &request, n).await?;
        match lookup.read(&plan).await? {
            (Some(value), generation) => {
                if !plan.part {
                    state.http.lookups.record(&name, &table, LookupRoute::Owner);
                }
                return Ok((plan.headers(generation), Json(value)));
            }
            // A part of another instance's lookup answers for its shard alone.
            (None, _) if plan.part => return Err(not_found()),
            // Not there: a wrong declaration, or a producer hashing keys
            // otherwise, must cost time, never a wrong 404. Ask every shard.
            (None, _) => {}
        }
    }
    let plan = Plan::allowing_partial(&state, &p, &request, &partial).await?;
    let (found, generation) = lookup.read(&plan).await?;
    if p.is_partitioned() && !plan.part {
        let route = match (routed, &found) {
            (None, _) => LookupRoute::EveryShard,
            (Some(_), None) => LookupRoute::OwnerThenEveryShard,
            // Written to its own shard between the two reads, or held by another?
            (Some(n), Some(_)) => {
                let again = match Plan::one(&state, &p, &request, n).await {
                    Ok(own) => lookup.read(&own).await.ok(),
                    Err(_) => None,
                };
                if again.is_some_and(|(value, _)| value.is_some()) {
                    LookupRoute::Owner
                } else {
                    LookupRoute::Misrouted
                }
            }
        };
        let times = state.http.lookups.record(&name, &table, route);
        if route == LookupRoute::Misrouted && (times == 1 || times.is_multiple_of(1000)) {
            tracing::warn!(
                projection = %name,
                %table,
                %key,
                shard = routed,
                times,
                "a key of a table declared keyed like the events was not in the shard of its partition but in another: the table's keys do not start with their events' keys, or the producer does not partition by Kafka's murmur2 (librdkafka's default is CRC32: set partitioner=murmur2_random); its lookups ask every shard when the key's own does not hold it"
            );
        }
    }
    match found {
        Some(value) => Ok((plan.headers(generation), Json(value))),
        // The key may be in a shard that did not answer.
        None if !plan.missing().is_empty() => Err(ApiError::shard_unavailable(
            "shard_unavailable",
            format!("no key {key:?} in the shards that answered; shards {:?} did not", plan.missing()),
        )),
        None => Err(not_found()),
    }
}

/// One key lookup: what each plan it is read with needs.
struct Lookup<'a> {
    state: &'a AppState,
    p: &'a Projection,
    wait: &'a Consistency,
    request: &'a Incoming,
    table: &'a str,
    key: &'a str,
}

impl Lookup<'_> {
    /// The value under the key in the shards of `plan`, read from one
    /// generation, and that generation. At most one shard may hold the key:
    /// a second holder is reported, never silently picked.
    async fn read(&self, plan: &Plan) -> Result<(Option<Box<serde_json::value::RawValue>>, Option<u64>), ApiError> {
        let Lookup { state, p, wait, request, table, key } = *self;
        let two = || {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "key_in_two_shards",
                format!(
                    "key {key:?} of table {table:?} is in more than one shard: the projection writes keys that are not partitioned like its events"
                ),
            )
        };
        plan.in_one_generation(|| async move {
            let (waited, parts) =
                tokio::join!(consistency::wait(&state.runtime, p, &plan.local, wait, false), plan.ask(state, request));
            waited?;
            let mut found: Option<Box<serde_json::value::RawValue>> = None;
            for shard in &plan.local {
                if let Some(value) = shard.live().read_model.get(table, key)?
                    && found.replace(super::raw_json(value)).is_some()
                {
                    return Err(two());
                }
            }
            for part in parts? {
                // Not in that instance's shards; any other error (it has no such projection, say) is passed on.
                if part.code().as_deref() == Some("key_not_found") {
                    continue;
                }
                if found.replace(part.answer()?).is_some() {
                    return Err(two());
                }
            }
            Ok(found)
        })
        .await
    }
}

#[derive(Deserialize)]
pub(super) struct ScanParams {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn scan(
    State(state): State<AppState>,
    Path((name, table)): Path<(String, String)>,
    Query(q): Query<ScanParams>,
    Query(wait): Query<Consistency>,
    Query(partial): Query<Partial>,
    request: Incoming,
) -> Result<(HeaderMap, Json<Page>), ApiError> {
    let limit = page_limit(q.limit)?;
    let p = find(&state.runtime, &name)?;
    check_table(&p, &table)?;
    let plan = Plan::allowing_partial(&state, &p, &request, &partial).await?;
    // One more than asked tells whether there is a next page. Each shard
    // gives its first keys after the cursor (another instance, a page of
    // its shards'); merged in key order, the first of them are the page's,
    // and its last key the next cursor.
    let (state, p, plan, wait, request, table, q) = (&state, &p, &plan, &wait, &request, &table, &q);
    let ((mut items, mut more), generation) = plan
        .in_one_generation(|| async move {
            let (waited, parts) =
                tokio::join!(consistency::wait(&state.runtime, p, &plan.local, wait, false), plan.ask(state, request));
            waited?;
            let mut items = Vec::new();
            let mut more = false;
            for shard in &plan.local {
                let entries = shard.live().read_model.scan(table, &q.prefix, q.after.as_deref(), limit + 1)?;
                items.extend(entries.into_iter().map(|(key, v)| Item { key, value: super::raw_json(v) }));
            }
            for part in parts? {
                let page: Page = part.answer()?;
                more |= page.next.is_some();
                items.extend(page.items);
            }
            Ok((items, more))
        })
        .await?;
    if plan.merges() {
        items.sort_by(|a, b| a.key.cmp(&b.key));
    }
    more |= items.len() > limit;
    items.truncate(limit);
    let next = if more { items.last().map(|i| i.key.clone()) } else { None };
    Ok((plan.headers(generation), Json(Page { items, next, missing_shards: plan.missing() })))
}

#[derive(Deserialize)]
pub(super) struct DeadLetterParams {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

pub(super) async fn dead_letters(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<DeadLetterParams>,
    request: Incoming,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    let p = find(&state.runtime, &name)?;
    let plan = Plan::new(&state, &p, &request).await?;
    let parts = plan.ask(&state, &request).await?;
    // Shard by shard, in id order (the ids say which shard).
    let mut letters = Vec::new();
    for shard in &plan.local {
        let Some(after) = Projection::dead_letters_after(shard, q.after) else { continue };
        let page = shard.live().read_model.dead_letters(after, limit + 1)?;
        letters.extend(
            page.into_iter().map(|(id, letter)| DeadLetterView { id: Projection::dead_letter_id(shard, id), letter }),
        );
    }
    let mut more = false;
    for part in parts {
        let page: DeadLetterPage = part.answer()?;
        more |= page.next.is_some();
        letters.extend(page.dead_letters);
    }
    letters.sort_by_key(|l| l.id);
    more |= letters.len() > limit;
    letters.truncate(limit);
    let next = if more { letters.last().map(|l| l.id) } else { None };
    Ok(Json(DeadLetterPage { dead_letters: letters, next }))
}

/// The one answer of the instance running shard `plan` names, passed on.
fn relay<T: serde::de::DeserializeOwned>(parts: Vec<super::shards::Part>) -> Result<Json<T>, ApiError> {
    let part = parts.into_iter().next().ok_or_else(|| ApiError::internal("forwarding", "no instance was asked"))?;
    part.answer().map(Json)
}

/// The shard holding the dead letter the API calls `id`, and its id there.
fn locate(p: &Projection, name: &str, id: u64) -> Result<(u32, u64), ApiError> {
    Projection::dead_letter_shard(id).filter(|(n, _)| *n < p.shard_count()).ok_or_else(|| no_dead_letter(name, id))
}

/// `GET /v1/projections/{p}/dead-letters/{id}`: one dead letter.
pub(super) async fn dead_letter(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, u64)>,
    request: Incoming,
) -> Result<Json<DeadLetterView>, ApiError> {
    let p = find(&state.runtime, &name)?;
    let (n, local) = locate(&p, &name, id)?;
    let plan = Plan::one(&state, &p, &request, n).await?;
    let Some(shard) = plan.local.first() else { return relay(plan.ask(&state, &request).await?) };
    let Some(letter) = shard.live().read_model.dead_letter(local)? else {
        return Err(no_dead_letter(&name, id));
    };
    Ok(Json(DeadLetterView { id, letter }))
}

/// `GET /v1/projections/{p}/dead-letters/{id}/reproduction`: hand the dead
/// letter's event again to the exact component that failed on it (kept by
/// its content hash), over the read model as it is now, tracing, in a batch
/// that is rolled back; answer what it read and how it ended, for
/// `refract dead-letters … reproduce` to write down.
pub(super) async fn reproduce(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, u64)>,
    request: Incoming,
) -> Result<Json<super::dto::Reproduction>, ApiError> {
    use crate::harness::{event_line, outcome_json, state_read};
    let p = find(&state.runtime, &name)?;
    let (n, local) = locate(&p, &name, id)?;
    let plan = Plan::one(&state, &p, &request, n).await?;
    let Some(shard) = plan.local.first().cloned() else { return relay(plan.ask(&state, &request).await?) };
    let Some(letter) = shard.live().read_model.dead_letter(local)? else {
        return Err(no_dead_letter(&name, id));
    };
    let Some(digest) = letter.plugin_digest.clone() else {
        return Err(ApiError::conflict(
            "no_component",
            format!(
                "dead letter {id} names no component: its event did not decode, or it is older than the components the runtime keeps"
            ),
        ));
    };
    // Reading the component and the log, compiling and running it: off the async threads.
    let (rt, kept, held) = (state.runtime.clone(), digest.clone(), letter.clone());
    let (line, reproduced) = tokio::task::spawn_blocking(move || {
        let Some(bytes) =
            rt.component(&name, &kept).map_err(|e| ApiError::unavailable("reading a kept component", e))?
        else {
            return Err(ApiError::not_found("component_not_found", format!("the component {kept} is no longer kept")));
        };
        let event = crate::projector::letter_event(&rt.log, &held);
        let line = event_line(&event);
        let reproduced =
            rt.reproduce(&shard, event, &bytes).map_err(|e| ApiError::internal("reproducing a dead letter", e))?;
        Ok((line, reproduced))
    })
    .await
    .map_err(|e| ApiError::internal("reproducing a dead letter", e))??;
    let same_error = reproduced.outcome.as_ref().err().is_some_and(|e| e.to_string() == letter.error);
    Ok(Json(super::dto::Reproduction {
        component: digest,
        event: line,
        state: state_read(&reproduced.calls),
        outcome: outcome_json(&reproduced.outcome),
        calls: serde_json::to_value(&reproduced.calls)
            .map_err(|e| ApiError::internal("reproducing a dead letter", e))?,
        same_error,
        command: "refract plugin test plugin.wasm --events event.ndjson --state state.json".into(),
        dead_letter: DeadLetterView { id, letter },
    }))
}

fn no_dead_letter(projection: &str, id: u64) -> ApiError {
    ApiError::not_found("dead_letter_not_found", format!("{projection} holds no dead letter {id}"))
}

/// `DELETE /v1/projections/{p}/dead-letters/{id}`: skip it — drop the letter,
/// leaving its event unapplied (admin token required).
pub(super) async fn skip_dead_letter(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, u64)>,
    request: Incoming,
) -> Result<Json<Skipped>, ApiError> {
    let p = find(&state.runtime, &name)?;
    let (n, local) = locate(&p, &name, id)?;
    let plan = Plan::one(&state, &p, &request, n).await?;
    let Some(shard) = plan.local.first() else { return relay(plan.ask(&state, &request).await?) };
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
    State(state): State<AppState>,
    Path(name): Path<String>,
    request: Incoming,
) -> Result<Json<Retried>, ApiError> {
    retry(&state, &name, None, &request).await
}

pub(super) async fn retry_dead_letter(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, u64)>,
    request: Incoming,
) -> Result<Json<Retried>, ApiError> {
    retry(&state, &name, Some(id), &request).await
}

async fn retry(state: &AppState, name: &str, id: Option<u64>, request: &Incoming) -> Result<Json<Retried>, ApiError> {
    let p = find(&state.runtime, name)?;
    let (plan, one) = match id {
        None => (Plan::new(state, &p, request).await?, None),
        Some(id) => match locate(&p, name, id) {
            Ok((n, local)) => (Plan::one(state, &p, request, n).await?, Some(local)),
            Err(_) => return Ok(Json(Retried { missing: vec![id], ..Retried::default() })),
        },
    };
    let parts = plan.ask(state, request).await?;
    // Each shard's worker retries its own letters; ids are the API's.
    let mut report = Retried::default();
    for shard in &plan.local {
        let part = retry_in(shard, name, one.map(|local| vec![local])).await?;
        let api = |local| Projection::dead_letter_id(shard, local);
        report.applied.extend(part.applied.into_iter().map(api));
        report.missing.extend(part.missing.into_iter().map(api));
        report
            .failed
            .extend(part.failed.into_iter().map(|f| crate::projector::RetryFailure { id: api(f.id), error: f.error }));
    }
    for part in parts {
        let other: Retried = part.answer()?;
        report.applied.extend(other.applied);
        report.missing.extend(other.missing);
        report.failed.extend(other.failed);
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
    State(state): State<AppState>,
    Path(name): Path<String>,
    request: Incoming,
) -> Result<Json<Resumed>, ApiError> {
    let p = find(&state.runtime, &name)?;
    let plan = Plan::new(&state, &p, &request).await?;
    let mut resumed = false;
    for part in plan.ask(&state, &request).await? {
        resumed |= part.answer::<Resumed>()?.resumed;
    }
    for shard in &plan.local {
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
        Ok(generation) => Ok((
            axum::http::StatusCode::ACCEPTED,
            Json(RebuildStarted { projection: name, generation, preview: false }),
        )),
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

pub(super) fn rebuild_error(name: &str, e: crate::runtime::RebuildError) -> ApiError {
    use crate::runtime::RebuildError;
    match e {
        RebuildError::NotFound => ApiError::not_found("projection_not_found", format!("no projection {name:?}")),
        RebuildError::Running(_) => ApiError::conflict("rebuild_running", format!("{name}: {e}")),
        RebuildError::Previewing(_) => ApiError::conflict("preview_open", format!("{name}: {e}")),
        RebuildError::NoPreview => ApiError::not_found("no_preview", format!("{name}: {e}")),
        RebuildError::PreviewInCluster => ApiError::conflict("preview_in_cluster", format!("{name}: {e}")),
        RebuildError::Storage(m) => ApiError::unavailable(name, m),
        RebuildError::NotRunning => ApiError::not_found("no_rebuild", format!("{name}: {e}")),
        RebuildError::Switching(_) => ApiError::conflict("rebuild_switching", format!("{name}: {e}")),
        RebuildError::Invalid(m) => ApiError::bad_request(format!("{name}: {m}")),
        RebuildError::Unavailable(m) => ApiError::shard_unavailable("cluster_unavailable", format!("{name}: {m}")),
    }
}
