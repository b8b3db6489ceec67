//! Refract: the read side of CQRS as a runtime.
//!
//! Events flow through the modules in this order (see `ARCHITECTURE.md`):
//! [`source`] (the embedded log, Kafka topics) → [`projector`] (batches,
//! checkpoints, dead letters) → [`plugin`] (WebAssembly components behind the
//! `refract:plugin` WIT world) → [`store`] (redb read models, tantivy
//! indexes) → [`api`] (the HTTP query API); events a projection emits go
//! out through [`sink`]. [`runtime`] wires them together; [`config`] reads
//! `refract.yaml`.

pub mod allocator;
pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod data_dir;
pub mod db_file;
pub mod event;
pub mod generation;
pub mod harness;
pub mod metrics;
pub mod names;
pub mod plugin;
pub mod position;
pub mod projector;
pub mod rebuild;
pub mod runtime;
pub mod signal;
pub mod sink;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod wit;
