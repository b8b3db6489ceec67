//! What every event is, wherever it comes from or goes.
//!
//! The event record is the WIT's ([`Event`]). [`check_event`] is the one rule
//! on its shape: the log applies it on every append, and a batch applies it to
//! the events a plugin emits, so the two cannot drift apart.

pub use crate::wit::Event;

/// What an event must be to enter a stream, in the units the API documents
/// (characters). Checked on every append, and when a plugin emits a derived
/// event: one the log would refuse must fail its batch (and become a dead
/// letter), not the relay publishing it later.
pub fn check_event<'a>(
    event_type: &str,
    key: Option<&str>,
    headers: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
    data_bytes: usize,
    max_event_bytes: usize,
) -> Result<(), String> {
    let chars = |s: &str| s.chars().count();
    if event_type.is_empty() || chars(event_type) > 256 {
        return Err("`type` must be 1 to 256 characters".into());
    }
    if key.is_some_and(|k| k.is_empty() || chars(k) > 1024) {
        return Err("`key` must be 1 to 1024 characters when given".into());
    }
    let too_many = headers.len() > 64;
    if too_many || headers.into_iter().any(|(k, v)| chars(k) > 256 || chars(v) > 16384) {
        return Err("at most 64 headers, names up to 256 characters, values up to 16384".into());
    }
    if data_bytes > max_event_bytes {
        return Err(format!("`data` is larger than {max_event_bytes} bytes"));
    }
    Ok(())
}
