//! End-to-end tests: each module is a user story, run against the real
//! `refract` binary over HTTP, with the example plugins built for WebAssembly.
//!
//! Tests that need more than Rust (a Kafka broker, a browser, the Python and
//! JavaScript plugin toolchains, root) are compiled in only with the
//! `external` feature, which `scripts/test` turns on: see tests/README.md.

#[path = "../support/mod.rs"]
mod support;

mod admin_auth;
#[cfg(feature = "external")]
mod api_fuzz;
mod authoring_loop;
mod change_streams;
#[cfg(feature = "external")]
mod cluster;
#[cfg(feature = "external")]
mod console;
mod crash_safety;
mod data_directory;
mod demo;
mod emitted_events;
mod enrichers;
mod hot_reload;
mod http_api;
#[cfg(feature = "external")]
mod kafka_formats;
#[cfg(feature = "external")]
mod kafka_sink;
#[cfg(feature = "external")]
mod kafka_source;
#[cfg(feature = "external")]
mod languages;
mod model;
mod operability;
#[cfg(feature = "external")]
mod partitioned;
#[cfg(feature = "external")]
mod partitioned_client;
mod plugin_loading;
mod poison_events;
mod previews;
mod query_read_models;
mod read_your_writes;
mod rebuilds;
mod search_indexes;
#[cfg(feature = "external")]
mod storage_faults;
#[cfg(feature = "external")]
mod supply_chain;
