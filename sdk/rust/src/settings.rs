//! The plugin's settings (`plugins.<name>.settings`) and its log.

use std::fmt;

use crate::{Failure, Level};

/// The setting `name` from `plugins.<name>.settings` in `refract.yaml`, as text.
/// Settings are available while handling events (not in `manifest()`).
pub fn setting(name: &str) -> Option<String> {
    crate::host::setting(name)
}

/// The setting `name` parsed as `T`, or `default` when it is not set; a
/// setting that does not parse rejects the event (and names the setting).
pub fn setting_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, Failure>
where
    T::Err: fmt::Display,
{
    match setting(name) {
        None => Ok(default),
        Some(text) => {
            text.trim().parse().map_err(|e| Failure::rejected(format!("setting {name} = {text:?} does not parse: {e}")))
        }
    }
}

/// Send a message to the runtime's log, under the plugin's name.
pub fn log(level: Level, message: &str) {
    crate::host::log(level, message);
}
