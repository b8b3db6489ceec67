//! What a plugin asked the host while it handled events, recorded when
//! tracing is on (`refract plugin test`): its reads of its tables, lookups
//! of other projections, settings and log lines, in the order it made them.
//! Its writes are not recorded call by call: they are the batch's (see
//! [`crate::harness`]), which is what commits.

use serde::Serialize;
use serde_json::Value;

/// One call a plugin made to the host.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "call", rename_all = "camelCase")]
pub enum HostCall {
    /// `kv.get`: the value it got (`null`: none), or the error.
    Get {
        table: String,
        key: String,
        value: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// `kv.scan`: the entries it got, or the error.
    Scan {
        table: String,
        prefix: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        limit: u32,
        entries: Vec<Entry>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// `lookup.get` of another projection's table.
    Lookup {
        projection: String,
        table: String,
        key: String,
        value: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// `settings.get`.
    Setting { name: String, value: Option<String> },
    /// `log.log`.
    Log { level: &'static str, message: String },
}

/// A key and its value, as a scan returned them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub key: String,
    pub value: Value,
}

/// A stored value as it is shown: its JSON when it is JSON (every value a
/// plugin stores through an SDK is), else its text.
pub fn shown(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}
