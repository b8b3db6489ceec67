//! Refract: the read side of CQRS as a runtime.
//!
//! Events flow through the modules in this order (see `ARCHITECTURE.md`):
//! [`source`] (the embedded log) → [`projector`] (batches, checkpoints,
//! dead letters) → [`plugin`] (WebAssembly components behind the
//! `refract:plugin` WIT world) → [`store`] (redb read models) → [`api`]
//! (the HTTP query API). [`runtime`] wires them together; [`config`] reads
//! `refract.yaml`.

pub mod api;
pub mod client;
pub mod config;
pub mod fixtures;
pub mod names;
pub mod plugin;
pub mod projector;
pub mod runtime;
pub mod source;
pub mod store;
