//! What the export macros expand to: the glue between a plugin's trait
//! implementation and the WIT world it exports.

use crate::{Event, Level, log, packed};

/// The events of a packed batch. The host encoded them: one that does not
/// decode is a host fault, so the plugin traps (and says why in the log).
#[doc(hidden)]
pub fn __unpack(events: &[u8]) -> Vec<Event> {
    packed::decode_events(events).unwrap_or_else(|e| panic!("the host sent a batch that does not decode: {e}"))
}

/// Route panics to the host's log before the instance traps, so the runtime
/// can say why a batch failed (the dead letter carries the panic message).
#[doc(hidden)]
pub fn __install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| log(Level::Error, &format!("plugin panicked: {info}"))));
    });
}

/// The plugin's allocator in WebAssembly (feature `talc`, on by default):
/// free lists for small blocks in front of talc ([`small_alloc`]), rather
/// than Rust's default there, dlmalloc, which made allocation a quarter of
/// an allocation-heavy plugin's time.
#[cfg(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics")))]
#[doc(hidden)]
#[macro_export]
macro_rules! __global_allocator {
    () => {
        #[global_allocator]
        static __REFRACT_ALLOCATOR: $crate::small_alloc::PluginAllocator = $crate::small_alloc::PluginAllocator::new();
    };
}

/// Without the `talc` feature, or natively: the default allocator.
#[cfg(not(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics"))))]
#[doc(hidden)]
#[macro_export]
macro_rules! __global_allocator {
    () => {};
}

/// Export `$ty` (which implements [`Enricher`](crate::Enricher)) as the plugin's `enricher` world.
#[macro_export]
macro_rules! export_enricher {
    ($ty:ty) => {
        const _: () = {
            struct __RefractExport;
            impl $crate::wit::enricher::Guest for __RefractExport {
                fn manifest() -> $crate::wit::refract::plugin::types::Manifest {
                    $crate::__install_panic_hook();
                    <$ty as $crate::Enricher>::manifest().into_wit()
                }
                fn enrich(
                    events: ::std::vec::Vec<$crate::wit::refract::plugin::types::Event>,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<$crate::wit::refract::plugin::emit::Outgoing>,
                    $crate::wit::refract::plugin::types::Failure,
                > {
                    $crate::__install_panic_hook();
                    let events = events.into_iter().map($crate::Event::from).collect();
                    $crate::kv::finish_batch(<$ty as $crate::Enricher>::enrich_batch(events))
                        .map(|out| out.into_iter().map($crate::NewEvent::into_wit).collect())
                        .map_err($crate::Failure::into_wit)
                }
                fn enrich_packed(
                    events: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, $crate::wit::refract::plugin::types::Failure> {
                    $crate::__install_panic_hook();
                    let events = $crate::__unpack(&events);
                    let out = $crate::kv::finish_batch(<$ty as $crate::Enricher>::enrich_batch(events))
                        .map_err($crate::Failure::into_wit)?;
                    let out: ::std::vec::Vec<_> = out.into_iter().map($crate::NewEvent::into_wit).collect();
                    Ok($crate::packed::encode_outputs(&out))
                }
            }
    $crate::wit::enricher::__export_enricher_world!(__RefractExport with_types_in $crate::wit::enricher);
        };
        $crate::__global_allocator!();
    };
}

/// Export `$ty` (which implements [`Projection`](crate::Projection)) as the plugin's `projection` world.
#[macro_export]
macro_rules! export_projection {
    ($ty:ty) => {
        const _: () = {
            struct __RefractExport;
            impl $crate::wit::Guest for __RefractExport {
                fn indexes() -> ::std::vec::Vec<$crate::wit::refract::plugin::types::IndexMapping> {
                    $crate::__install_panic_hook();
                    <$ty as $crate::Projection>::indexes().into_iter().map($crate::IndexMapping::into_wit).collect()
                }
                fn manifest() -> $crate::wit::refract::plugin::types::Manifest {
                    $crate::__install_panic_hook();
                    <$ty as $crate::Projection>::manifest().into_wit()
                }
                fn keyed_tables() -> ::std::vec::Vec<$crate::wit::refract::plugin::types::KeyedTable> {
                    $crate::__install_panic_hook();
                    <$ty as $crate::Projection>::manifest().keyed_into_wit()
                }
                fn handle(
                    events: ::std::vec::Vec<$crate::wit::refract::plugin::types::Event>,
                ) -> ::std::result::Result<(), $crate::wit::refract::plugin::types::Failure> {
                    $crate::__install_panic_hook();
                    let events = events.into_iter().map($crate::Event::from).collect();
                    $crate::kv::finish_batch(<$ty as $crate::Projection>::handle(events))
                        .map_err($crate::Failure::into_wit)
                }
                fn handle_packed(
                    events: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<(), $crate::wit::refract::plugin::types::Failure> {
                    $crate::__install_panic_hook();
                    $crate::kv::finish_batch(<$ty as $crate::Projection>::handle($crate::__unpack(&events)))
                        .map_err($crate::Failure::into_wit)
                }
            }
    $crate::wit::__export_projection_world!(__RefractExport with_types_in $crate::wit);
        };
        $crate::__global_allocator!();
    };
}
