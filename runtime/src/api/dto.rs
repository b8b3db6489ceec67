//! The bodies the HTTP API answers with, one type each: the handlers build
//! them, and the CLI reads them back with the same types (hence
//! `Deserialize`), so the two cannot drift apart. The status and dead-letter
//! shapes are the runtime's own types ([`ProjectionStatus`], [`DeadLetter`],
//! [`RetryReport`]); what only the API says is here.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::projector::RetryReport;
use crate::runtime::{PluginError, ProjectionStatus};
use crate::source::Position;
use crate::source::log::StreamInfo;
use crate::store::DeadLetter;

/// `GET /healthz`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

/// Every error: `{"error": {"code", "message"}}`, the code stable, the message for people.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `GET /v1/streams`.
#[derive(Debug, Serialize)]
pub struct StreamList {
    pub streams: Vec<StreamInfo>,
}

/// `POST /v1/streams/{s}/events`: where each event went, and the token
/// that makes a query wait for them.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Appended {
    pub stream: String,
    pub positions: Vec<Position>,
    pub wait_for: String,
}

/// `GET /v1/projections`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionList {
    pub projections: Vec<ProjectionStatus>,
    /// Plugin files in the plugins directory that did not load.
    pub plugin_errors: Vec<PluginError>,
}

/// One entry of a table page.
#[derive(Debug, Serialize, Deserialize)]
pub struct Item {
    pub key: String,
    pub value: Box<RawValue>,
}

/// A page of a table: its entries in key order, and the key to continue after.
#[derive(Debug, Serialize, Deserialize)]
pub struct Page {
    pub items: Vec<Item>,
    pub next: Option<String>,
    /// Shards a partial answer (`partial=true`) left out: they could not answer.
    #[serde(default, rename = "missingShards", skip_serializing_if = "Vec::is_empty")]
    pub missing_shards: Vec<u32>,
}

/// A dead letter as the API shows it: the letter with its id.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetterView {
    pub id: u64,
    #[serde(flatten)]
    pub letter: DeadLetter,
}

/// `GET /v1/projections/{p}/dead-letters/{id}/reproduction`: the dead
/// letter's event handed again to the component that failed on it, over
/// the read model as it is now, traced and rolled back: what a developer
/// needs to reproduce the failure offline with `refract plugin test`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reproduction {
    pub dead_letter: DeadLetterView,
    /// The component's content hash: `GET /v1/projections/{p}/components/{component}`.
    pub component: String,
    /// The event as one line of `plugin test --events` (with its stream).
    pub event: serde_json::Value,
    /// Every value the plugin read, as `plugin test --state` takes it.
    pub state: serde_json::Value,
    /// The plugin's host calls, in order (`plugin::trace::HostCall`s).
    pub calls: serde_json::Value,
    /// How the call ended this time: `{"applied": true}` or `{"applied": false, "failure", "error"}`.
    pub outcome: serde_json::Value,
    /// Whether it failed again with the dead letter's error.
    pub same_error: bool,
    /// The command that reproduces it offline, in the folder `refract dead-letters … reproduce` writes.
    pub command: String,
}

/// `GET /v1/projections/{p}/dead-letters`: a page, and the id to continue after.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterView>,
    pub next: Option<u64>,
}

/// `DELETE /v1/projections/{p}/dead-letters/{id}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Skipped {
    pub skipped: u64,
}

/// `POST …/dead-letters/retry`: what the retry did.
pub type Retried = RetryReport;

/// `POST /v1/projections/{p}/resume`: whether it was paused (and now is not).
#[derive(Debug, Serialize, Deserialize)]
pub struct Resumed {
    pub projection: String,
    pub resumed: bool,
}

/// `POST /v1/projections/{p}/rebuild` (202): the generation being built.
#[derive(Debug, Serialize, Deserialize)]
pub struct RebuildStarted {
    pub projection: String,
    pub generation: u64,
    /// A preview (`POST …/preview`): it switches only once promoted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview: bool,
}

/// `POST /v1/projections/{p}/preview/promote` (202): the generation that takes over.
#[derive(Debug, Serialize, Deserialize)]
pub struct PreviewPromoted {
    pub projection: String,
    pub promoted: u64,
}

/// `DELETE /v1/projections/{p}/preview`: the generation deleted.
#[derive(Debug, Serialize, Deserialize)]
pub struct PreviewDiscarded {
    pub projection: String,
    pub discarded: u64,
}

/// `DELETE /v1/projections/{p}/rebuild`: the generation deleted.
#[derive(Debug, Serialize, Deserialize)]
pub struct RebuildCancelled {
    pub projection: String,
    pub cancelled: u64,
}

/// `PUT /v1/plugins/{name}` (202): what was installed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginInstalled {
    pub plugin: String,
    pub projection: String,
    pub version: String,
    pub schema_version: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_page_reads_back_as_it_was_written_with_the_id_beside_the_letter() {
        let letter = DeadLetter {
            stream: "payments".into(),
            topic: None,
            partition: 1,
            offset: 7,
            key: Some("o-1".into()),
            event_type: "PaymentReceived".into(),
            time: 5,
            data: serde_json::json!({"orderId": "o-1"}),
            headers: Vec::new(),
            content_type: None,
            plugin_version: "1.0.0".into(),
            plugin_digest: None,
            error: "unknown order o-1".into(),
            failed_at: 9,
        };
        let page = DeadLetterPage { dead_letters: vec![DeadLetterView { id: 3, letter: letter.clone() }], next: None };
        let json = serde_json::to_value(&page).unwrap();
        assert_eq!(json["deadLetters"][0]["id"], 3);
        assert_eq!(json["deadLetters"][0]["type"], "PaymentReceived");
        let back: DeadLetterPage = serde_json::from_value(json).unwrap();
        assert_eq!((back.dead_letters[0].id, &back.dead_letters[0].letter), (3, &letter));
    }

    #[test]
    fn an_error_body_is_code_and_message_under_error() {
        let body = ErrorBody { error: ErrorDetail { code: "bad_request".into(), message: "no".into() } };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"error": {"code": "bad_request", "message": "no"}})
        );
    }
}
