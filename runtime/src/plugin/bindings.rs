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
