//! Where the host's capabilities come from, chosen once: the WIT imports in
//! WebAssembly, and natively (unit tests, the runtime's native baselines)
//! the in-process stand-ins of [`crate::native`], which have the same
//! signatures. Everything else in the SDK calls `host::…` and has no
//! `cfg` of its own, except the pending-writes buffer of [`crate::kv`]
//! (in WebAssembly, `put` and `delete` go through it, not through here),
//! which exists only there.

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::native::{delete, emit, get, log, lookup, put, scan, search, setting};
#[cfg(target_arch = "wasm32")]
pub(crate) use crate::wit::refract::plugin::{
    emit::emit,
    kv::{get, scan},
    lookup::get as lookup,
    search,
    settings::get as setting,
};

#[cfg(target_arch = "wasm32")]
pub(crate) fn log(level: crate::Level, message: &str) {
    crate::wit::refract::plugin::log::log(level.into(), message);
}
