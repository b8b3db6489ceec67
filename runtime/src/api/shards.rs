//! Answering for a partitioned projection whose shards are spread over the
//! instances of a cluster: which shards this instance answers from (those it
//! runs and has restored), and the same request sent to the instances active
//! for the others (found on the control topic), each for its shards. The
//! handlers merge the parts as they merge their own shards. A shard that no
//! live instance can answer for makes the request a 503 with `Retry-After`:
//! never a partial answer presented as whole.
//!
//! A query that merges shards reads them all from one generation: during a
//! rebuild's switch, shards move to the new generation a moment apart, and
//! a merge that meets two is read again ([`Plan::in_one_generation`]); a
//! part of another instance's fan-out names its generation in the
//! `Refract-Generation` header.
//!
//! A forwarded request carries the caller's `Authorization` (the instances
//! of a cluster share their tokens) and names its shards in the
//! `Refract-Shards` header; the instance asked answers from exactly those,
//! or 503 `shard_not_here` when it no longer runs one of them.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode, Uri};

use super::{ApiError, AppState};
use crate::runtime::{Projection, Shard};

/// The header naming the shards a forwarded request reads (`1,3`).
pub(super) const SHARDS_HEADER: &str = "refract-shards";

/// What a handler needs to send its request on: method, URI and headers.
pub(super) struct Incoming {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Incoming {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Incoming { method: parts.method.clone(), uri: parts.uri.clone(), headers: parts.headers.clone() })
    }
}

/// Where a request's shards are answered from.
pub(super) struct Plan {
    /// Shards of this instance to read.
    pub local: Vec<Arc<Shard>>,
    /// Other instances (URL) and the shards each answers for.
    remote: Vec<(String, Vec<u32>)>,
    /// The request named its shards: it is a part of another instance's fan-out.
    pub part: bool,
    /// The projection's name, to find its shards' owners.
    projection: String,
    /// The client asked for a partial answer (`partial=true`): shards no
    /// instance answers for are left out and named, instead of a 503.
    partial: bool,
    /// Shards left out of a partial answer.
    missing: std::sync::Mutex<Vec<u32>>,
    /// The generations the other instances' parts answered from, since
    /// the last read began.
    generations: std::sync::Mutex<Vec<u64>>,
}

/// The header naming the generation a part of a fan-out answered from.
const GENERATION_HEADER: &str = "refract-generation";

/// The error of a merge that met two generations for longer than a switch takes.
const GENERATIONS_SWITCHING: &str = "generations_switching";

/// How long a query merging shards waits for a rebuild's switch to reach
/// every shard once it meets two generations: each shard's switch stops
/// its old generation, lets the new one replay the last events (at most
/// 2,000) and writes a file, so they land well within this.
const SWITCH_WAIT: Duration = Duration::from_secs(5);

/// The header naming the shards a partial answer leaves out (`1,3`).
const MISSING_SHARDS_HEADER: &str = "refract-missing-shards";

/// The query parameter of the routes that may answer in part.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct Partial {
    /// Leave out the shards that cannot answer now, and name them.
    #[serde(default)]
    pub partial: bool,
}

/// Why a plan cannot be made now.
enum Unplanned {
    /// No instance answers for a shard: it may be moving, worth waiting for.
    Moving(ApiError),
    /// An answer that waiting would not change.
    Refused(ApiError),
}

/// What one instance answered for its shards.
pub(super) struct Part {
    pub status: StatusCode,
    pub body: Vec<u8>,
    /// The generation its shards answered from (`Refract-Generation`).
    generation: Option<u64>,
}

impl Part {
    /// The answer, as the type the route answers with; the error it
    /// answered instead, passed on as it is.
    pub(super) fn answer<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.status != StatusCode::OK {
            return Err(self.error());
        }
        serde_json::from_slice(&self.body).map_err(|e| ApiError::internal("reading another instance's answer", e))
    }

    /// The error code it answered with, if it answered an error.
    pub(super) fn code(&self) -> Option<String> {
        let body: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        body["error"]["code"].as_str().map(str::to_owned)
    }

    /// The error it answered, passed on as it is.
    fn error(&self) -> ApiError {
        let body: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        let code = body["error"]["code"].as_str().unwrap_or("internal").to_owned();
        let message = body["error"]["message"].as_str().unwrap_or("another instance failed").to_owned();
        let retry = (self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(1);
        ApiError::relayed(self.status, code, message, retry)
    }

    /// The instance no longer runs the shards it was asked for.
    fn moved(&self) -> bool {
        self.status == StatusCode::SERVICE_UNAVAILABLE && self.code().as_deref() == Some("shard_not_here")
    }
}

fn named(value: &axum::http::HeaderValue) -> Result<Vec<u32>, ApiError> {
    let text = value.to_str().unwrap_or_default();
    text.split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| ApiError::bad_request(format!("{SHARDS_HEADER}: {text:?} is not a list of shard numbers")))
}

impl Plan {
    /// Which shards answer `request` for `p`: every shard.
    pub(super) async fn new(state: &AppState, p: &Projection, request: &Incoming) -> Result<Plan, ApiError> {
        Plan::of(state, p, &request.headers, None, false).await
    }

    /// Which shards answer `request` for `p`: every shard, or those that
    /// can when the client asked for a partial answer (`partial=true`; the
    /// route marks what it leaves out, see [`Plan::missing`]).
    pub(super) async fn allowing_partial(
        state: &AppState,
        p: &Projection,
        request: &Incoming,
        partial: &Partial,
    ) -> Result<Plan, ApiError> {
        Plan::of(state, p, &request.headers, None, partial.partial).await
    }

    /// Which instance answers `request` for shard `n` of `p` (a request about one dead letter).
    pub(super) async fn one(state: &AppState, p: &Projection, request: &Incoming, n: u32) -> Result<Plan, ApiError> {
        Plan::of(state, p, &request.headers, Some(n), false).await
    }

    /// The shards a partial answer leaves out, in order (none for a whole one).
    pub(super) fn missing(&self) -> Vec<u32> {
        let mut missing = self.missing.lock().expect("missing lock").clone();
        missing.sort_unstable();
        missing
    }

    /// The headers of an answer read from `generation`:
    /// `Refract-Missing-Shards` for a partial answer that left shards out,
    /// `Refract-Generation` for a part of another instance's fan-out.
    pub(super) fn headers(&self, generation: Option<u64>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let missing = self.missing();
        if !missing.is_empty() {
            let names = missing.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            headers.insert(MISSING_SHARDS_HEADER, names.parse().expect("digits and commas are a header value"));
        }
        if let Some(g) = generation.filter(|_| self.part) {
            headers.insert(GENERATION_HEADER, g.into());
        }
        headers
    }

    /// The generations this instance's shards answer from now.
    fn local_generations(&self) -> Vec<u64> {
        self.local.iter().map(|s| s.live().number).collect()
    }

    /// Run `read` (which reads this instance's shards and [`Plan::ask`]s
    /// the others) until every shard it read answered from one generation,
    /// and say which. Two generations meet only while a rebuild switches:
    /// it is read again for up to [`SWITCH_WAIT`], then answered with a
    /// 503. A part of another instance's fan-out is not read again: the
    /// instance merging it does that.
    pub(super) async fn in_one_generation<T, Read>(
        &self,
        mut read: impl FnMut() -> Read,
    ) -> Result<(T, Option<u64>), ApiError>
    where
        Read: Future<Output = Result<T, ApiError>>,
    {
        let until = std::time::Instant::now() + if self.part { Duration::ZERO } else { SWITCH_WAIT };
        loop {
            self.generations.lock().expect("generations lock").clear();
            let before = self.local_generations();
            let answer = read().await;
            // Read after the shards were: a switch during the read shows as a change.
            let mut seen = self.local_generations();
            seen.extend(before);
            seen.extend(self.generations.lock().expect("generations lock").drain(..));
            seen.sort_unstable();
            seen.dedup();
            let mixed = match &answer {
                Err(e) => e.code() == GENERATIONS_SWITCHING,
                Ok(_) => seen.len() > 1 && self.merges(),
            };
            if !mixed {
                return answer.map(|a| (a, seen.last().copied()));
            }
            if std::time::Instant::now() >= until {
                return Err(answer.err().unwrap_or_else(|| {
                    ApiError::shard_unavailable(
                        GENERATIONS_SWITCHING,
                        format!(
                            "the shards answer from generations {seen:?}: a rebuild is switching them, which took longer than {}s",
                            SWITCH_WAIT.as_secs()
                        ),
                    )
                }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The plan, once every shard has an instance that answers for it: a
    /// shard in the middle of a hand-over (let go by one instance, not yet
    /// caught up by the next) is waited for up to [`MOVE_WAIT`], so a client
    /// sees a 503 only when the move takes longer, or the shard is being
    /// restored here (which the 503 says at once, with its progress).
    async fn of(
        state: &AppState,
        p: &Projection,
        headers: &HeaderMap,
        only: Option<u32>,
        partial: bool,
    ) -> Result<Plan, ApiError> {
        let until = std::time::Instant::now() + MOVE_WAIT;
        loop {
            match Plan::now(state, p, headers, only, partial) {
                Err(Unplanned::Moving(_)) if std::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(Unplanned::Moving(error) | Unplanned::Refused(error)) => return Err(error),
                Ok(plan) => return Ok(plan),
            }
        }
    }

    /// The plan from what this instance runs and the control topic says now.
    fn now(
        state: &AppState,
        p: &Projection,
        headers: &HeaderMap,
        only: Option<u32>,
        partial: bool,
    ) -> Result<Plan, Unplanned> {
        let plan = |local, remote, part, projection, missing| Plan {
            local,
            remote,
            part,
            projection,
            partial,
            missing: std::sync::Mutex::new(missing),
            generations: Default::default(),
        };
        let (here, name) = (p.shards(), p.manifest().name);
        if let Some(value) = headers.get(SHARDS_HEADER) {
            let mut local = Vec::new();
            for n in named(value).map_err(Unplanned::Refused)? {
                match here.iter().find(|s| s.number() == n && s.is_ready()) {
                    Some(shard) => local.push(shard.clone()),
                    None => {
                        return Err(Unplanned::Refused(ApiError::shard_unavailable(
                            "shard_not_here",
                            format!("this instance does not answer for shard {n} of {name} (any more)"),
                        )));
                    }
                }
            }
            return Ok(plan(local, Vec::new(), true, name, Vec::new()));
        }
        if !p.is_partitioned() {
            return Ok(plan(here, Vec::new(), false, name, Vec::new()));
        }
        let (mut local, mut remote, mut missing) = (Vec::new(), Vec::<(String, Vec<u32>)>::new(), Vec::new());
        for n in (0..p.shard_count()).filter(|n| only.is_none_or(|o| o == *n)) {
            let mine = here.iter().find(|s| s.number() == n);
            if let Some(shard) = mine.filter(|s| s.is_ready()) {
                local.push(shard.clone());
                continue;
            }
            match state.cluster.as_ref().and_then(|c| c.owner(&name, n)) {
                Some(url) => match remote.iter_mut().find(|(u, _)| *u == url) {
                    Some((_, shards)) => shards.push(n),
                    None => remote.push((url, vec![n])),
                },
                None if partial => missing.push(n),
                None => {
                    return Err(match mine.and_then(|s| s.restore_progress()) {
                        Some((done, total)) => Unplanned::Refused(ApiError::shard_unavailable(
                            "shard_unavailable",
                            format!("shard {n} of {name} is being restored here ({done} of {total} events)"),
                        )),
                        None => Unplanned::Moving(ApiError::shard_unavailable(
                            "shard_unavailable",
                            format!("no live instance answers for shard {n} of {name} right now"),
                        )),
                    });
                }
            }
        }
        Ok(plan(local, remote, false, name, missing))
    }

    /// Whether other instances answer for some of the shards.
    pub(super) fn has_remote(&self) -> bool {
        !self.remote.is_empty()
    }

    /// Several shards answer (here or elsewhere), or this is a part: the
    /// answer is a merge.
    pub(super) fn merges(&self) -> bool {
        self.part || self.has_remote() || self.local.len() > 1
    }

    /// Send this request to the other instances, each for its shards, and
    /// wait for all of them. An instance that cannot be reached, or answers
    /// that it no longer runs a shard, is asked again through the shard's
    /// new owner once the control topic names one (within [`MOVE_WAIT`]);
    /// otherwise the answer is a 503 with `Retry-After`.
    ///
    /// For a partial answer, the shards of an instance that cannot answer
    /// are left out instead ([`Plan::missing`]).
    pub(super) async fn ask(&self, state: &AppState, request: &Incoming) -> Result<Vec<Part>, ApiError> {
        let mut parts = Vec::new();
        let leave_out = |shards: &[u32], error: ApiError| {
            if !self.partial {
                return Err(error);
            }
            self.missing.lock().expect("missing lock").extend_from_slice(shards);
            Ok(())
        };
        for ((url, shards), sent) in self.remote.iter().zip(send(state, request, &self.remote).await?) {
            let moved = match sent {
                Ok(part) if !part.moved() => {
                    parts.push(part);
                    continue;
                }
                Ok(part) => part.error(),
                Err(e) => unreachable(url, &e),
            };
            let Some(owners) = self.new_owners(state, url, shards).await else {
                leave_out(shards, moved)?;
                continue;
            };
            for ((url, shards), sent) in owners.iter().zip(send(state, request, &owners).await?) {
                match sent {
                    Ok(part) if part.status.is_success() || !part.moved() => parts.push(part),
                    Ok(part) => leave_out(shards, part.error())?,
                    Err(e) => leave_out(shards, unreachable(url, &e))?,
                }
            }
        }
        let generations = parts.iter().filter_map(|p| p.generation);
        self.generations.lock().expect("generations lock").extend(generations);
        Ok(parts)
    }

    /// The instances other than `gone` that the control topic names for
    /// `shards`, once it names one for each (waiting up to [`MOVE_WAIT`]).
    async fn new_owners(&self, state: &AppState, gone: &str, shards: &[u32]) -> Option<Vec<(String, Vec<u32>)>> {
        let cluster = state.cluster.as_ref()?;
        let until = std::time::Instant::now() + MOVE_WAIT;
        loop {
            let mut owners: Vec<(String, Vec<u32>)> = Vec::new();
            for n in shards {
                match cluster.owner(&self.projection, *n).filter(|url| url != gone) {
                    Some(url) => match owners.iter_mut().find(|(u, _)| *u == url) {
                        Some((_, list)) => list.push(*n),
                        None => owners.push((url, vec![*n])),
                    },
                    None => break,
                }
            }
            if owners.iter().map(|(_, l)| l.len()).sum::<usize>() == shards.len() {
                return Some(owners);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How long a request waits for the control topic to name the new owner of
/// a shard whose instance let it go or cannot be reached: a clean hand-over
/// from a standby copy takes about a second (one announcement); a killed
/// instance's shards move only after the group's session timeout, and the
/// client is told to retry.
const MOVE_WAIT: Duration = Duration::from_secs(3);

fn unreachable(url: &str, error: &ureq::Error) -> ApiError {
    ApiError::shard_unavailable(
        "shard_unavailable",
        format!("the instance at {url} answering for shards cannot be reached: {error}"),
    )
}

/// Send `request` to each instance of `to` for its shards, all at once.
async fn send(
    state: &AppState,
    request: &Incoming,
    to: &[(String, Vec<u32>)],
) -> Result<Vec<Result<Part, ureq::Error>>, ApiError> {
    let path = request.uri.path_and_query().map_or(request.uri.path(), |p| p.as_str()).to_owned();
    let auth = request.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut asks = Vec::new();
    for (url, shards) in to {
        let (agent, method) = (state.peers(), request.method.clone());
        let (target, auth) = (format!("{url}{path}"), auth.clone());
        let shards = shards.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        asks.push(tokio::task::spawn_blocking(move || -> Result<Part, ureq::Error> {
            let mut request = ureq::http::Request::builder().method(method).uri(&target);
            request = request.header(SHARDS_HEADER, shards);
            if let Some(auth) = auth {
                request = request.header(axum::http::header::AUTHORIZATION, auth);
            }
            let request = request.body(()).map_err(|e| ureq::Error::BadUri(e.to_string()))?;
            let mut response = agent.run(request)?;
            let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let generation = response.headers().get(GENERATION_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
            let body = response.body_mut().with_config().limit(256 << 20).read_to_vec()?;
            Ok(Part { status, body, generation })
        }));
    }
    let mut sent = Vec::new();
    for ask in asks {
        sent.push(ask.await.map_err(|e| ApiError::internal("asking another instance", e))?);
    }
    Ok(sent)
}

/// The client other instances are asked with: kept-alive connections, a
/// short connect timeout (an instance that is gone fails fast), room for the
/// longest `wait_for`.
pub(super) fn peers_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(2)))
        .timeout_global(Some(super::consistency::MAX_TIMEOUT + Duration::from_secs(10)))
        .build()
        .into()
}
