//! The `refract:plugin` WIT package on the host side: the one place where
//! `bindgen!` runs, pointed at the workspace's top-level `wit/`.
//!
//! The generated code stays private to the crate. The rest of the host sees
//! only the domain types the WIT defines (events, manifests, the errors a
//! capability answers), re-exported here, so that the store and the sources
//! do not reach into the plugin layer for them. [`crate::plugin`] alone uses
//! the generated worlds and the `Host` traits, through `worlds`.

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "refract:plugin/projection",
        // Host functions may fail for host reasons (storage errors): that traps
        // the call, and the projector tells it apart from a plugin fault.
        imports: { default: trappable },
    });

    /// The `enricher` world. Its imports are a subset of `projection`'s, so they
    /// reuse that world's generated interfaces (one host implementation, one
    /// linker for both kinds of plugin).
    pub(super) mod enricher {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "refract:plugin/enricher",
            imports: { default: trappable },
            with: {
                "refract:plugin/types": super::refract::plugin::types,
                "refract:plugin/kv": super::refract::plugin::kv,
                "refract:plugin/kv-packed": super::refract::plugin::kv_packed,
                "refract:plugin/emit": super::refract::plugin::emit,
                "refract:plugin/lookup": super::refract::plugin::lookup,
                "refract:plugin/settings": super::refract::plugin::settings,
                "refract:plugin/log": super::refract::plugin::log,
            },
        });
    }
}

/// The generated worlds and interfaces, for the plugin layer that links and
/// calls components.
pub(crate) mod worlds {
    pub(crate) use super::generated::enricher::{Enricher, EnricherPre};
    pub(crate) use super::generated::refract::plugin::{emit, kv, kv_packed, log, lookup, search, settings, types};
    pub(crate) use super::generated::{Projection, ProjectionPre};
}

pub use generated::refract::plugin::emit::{EmitError, Outgoing};
pub use generated::refract::plugin::kv::{Entry, KvError};
pub use generated::refract::plugin::kv_packed::{PackedError, RefusedWrite};
pub use generated::refract::plugin::lookup::LookupError;
pub use generated::refract::plugin::search::SearchError;
pub use generated::refract::plugin::types::{
    Event, Failure, FieldMapping, FieldType, IndexMapping, KeyedTable, Manifest, Subscription,
};
