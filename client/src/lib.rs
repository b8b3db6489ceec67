//! A small blocking client of Refract's HTTP API, used by the `refract`
//! command (`produce`, `status`, `rebuild`, `dead-letters`, `demo`) and the
//! end-to-end tests; and [`fixtures`], the sample events they append.
//!
//! It lives outside the server library: nothing in the runtime calls it.

pub mod fixtures;

use std::time::Duration;

use serde_json::Value;

/// A client of one Refract server.
#[derive(Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    /// Sent as `Authorization: Bearer …` when set.
    token: Option<String>,
}

/// A reply: status code and JSON body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Client {
    /// A client of the server at `base`, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Client { base: base.trim_end_matches('/').to_owned(), agent, token: None }
    }

    /// The same client, sending `token` as a bearer token.
    pub fn with_token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_owned);
        self
    }

    fn auth<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => request.header("authorization", format!("Bearer {t}")),
            None => request,
        }
    }

    fn reply(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Reply, ureq::Error> {
        let mut response = response?;
        let status = response.status().as_u16();
        let text = response.body_mut().with_config().limit(256 << 20).read_to_string()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, body })
    }

    /// `GET path` (path starts with `/`).
    pub fn get(&self, path: &str) -> Result<Reply, ureq::Error> {
        Self::reply(self.auth(self.agent.get(format!("{}{path}", self.base))).call())
    }

    /// `GET path`, its body as bytes (a component, say): (status, body).
    pub fn get_bytes(&self, path: &str) -> Result<(u16, Vec<u8>), ureq::Error> {
        let mut response = self.auth(self.agent.get(format!("{}{path}", self.base))).call()?;
        let status = response.status().as_u16();
        Ok((status, response.body_mut().with_config().limit(1 << 30).read_to_vec()?))
    }

    /// `POST path` with `body` of `content_type`.
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Result<Reply, ureq::Error> {
        Self::reply(
            self.auth(self.agent.post(format!("{}{path}", self.base))).header("content-type", content_type).send(body),
        )
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Reply, ureq::Error> {
        Self::reply(self.auth(self.agent.delete(format!("{}{path}", self.base))).call())
    }

    /// `PUT path` with `body` of `content_type`.
    pub fn put(&self, path: &str, content_type: &str, body: &[u8]) -> Result<Reply, ureq::Error> {
        Self::reply(
            self.auth(self.agent.put(format!("{}{path}", self.base))).header("content-type", content_type).send(body),
        )
    }

    /// Append NDJSON `lines` to `stream`.
    pub fn append_ndjson(&self, stream: &str, lines: &[u8]) -> Result<Reply, ureq::Error> {
        self.post(&format!("/v1/streams/{stream}/events"), "application/x-ndjson", lines)
    }

    /// Wait until every projection has handled every event and every search
    /// index has applied every document, or `timeout` passes.
    pub fn wait_caught_up(&self, timeout: Duration) -> Result<bool, ureq::Error> {
        let until = std::time::Instant::now() + timeout;
        loop {
            let reply = self.get("/v1/projections")?;
            let projections = reply.body["projections"].as_array().cloned().unwrap_or_default();
            let indexes_current = |p: &Value| p["indexes"].as_array().is_none_or(|i| i.iter().all(|i| i["lag"] == 0));
            if projections.iter().all(|p| p["lag"] == 0 && indexes_current(p)) {
                return Ok(true);
            }
            if std::time::Instant::now() > until {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
