//! The host side of the `refract:plugin` WIT package: the one place where
//! `bindgen!` runs, pointed at the workspace's top-level `wit/`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "refract:plugin/projection",
    // Host functions may fail for host reasons (storage errors): that traps
    // the call, and the projector tells it apart from a plugin fault.
    imports: { default: trappable },
});

pub use self::refract::plugin::types::{IndexMapping, Subscription};

/// The `enricher` world. Its imports are a subset of `projection`'s, so they
/// reuse that world's generated interfaces (one host implementation, one
/// linker for both kinds of plugin).
pub mod enricher {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "refract:plugin/enricher",
        imports: { default: trappable },
        with: {
            "refract:plugin/types": crate::plugin::bindings::refract::plugin::types,
            "refract:plugin/kv": crate::plugin::bindings::refract::plugin::kv,
            "refract:plugin/kv-packed": crate::plugin::bindings::refract::plugin::kv_packed,
            "refract:plugin/emit": crate::plugin::bindings::refract::plugin::emit,
            "refract:plugin/lookup": crate::plugin::bindings::refract::plugin::lookup,
            "refract:plugin/settings": crate::plugin::bindings::refract::plugin::settings,
            "refract:plugin/log": crate::plugin::bindings::refract::plugin::log,
        },
    });
}
