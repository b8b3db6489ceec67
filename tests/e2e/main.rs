//! End-to-end tests: each module is a user story, run against the real
//! `refract` binary over HTTP, with the example plugins built for WebAssembly.

#[path = "../support/mod.rs"]
mod support;

mod admin_auth;
mod console;
mod crash_safety;
mod demo;
mod emitted_events;
mod enrichers;
mod hot_reload;
mod http_api;
mod kafka_formats;
mod kafka_source;
mod languages;
mod model;
mod operability;
mod plugin_loading;
mod poison_events;
mod query_read_models;
mod read_your_writes;
mod rebuilds;
mod search_indexes;
mod storage_faults;
