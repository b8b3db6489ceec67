//! Write [Refract](https://github.com/refract-rs/refract) projections in Rust.
//!
//! A projection is a WebAssembly component that turns batches of events into
//! key/value writes. This crate hides the generated WIT bindings behind a small
//! API: implement [`Projection`], declare a [`Manifest`], read event data with
//! [`Event::json`], and keep state in typed [`Table`]s.
//!
//! ```
//! use refract_sdk::{Event, Failure, Manifest, Projection, Table};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Counter { count: u64 }
//!
//! const COUNTS: Table<Counter> = Table::new("counts");
//!
//! struct CountByType;
//!
//! impl Projection for CountByType {
//!     fn manifest() -> Manifest {
//!         Manifest::new("count-by-type", "1.0.0").subscribe("orders", &[]).table(&COUNTS)
//!     }
//!
//!     fn apply(event: &Event) -> Result<(), Failure> {
//!         let mut counter = COUNTS.get(&event.event_type)?.unwrap_or(Counter { count: 0 });
//!         counter.count += 1;
//!         COUNTS.put(&event.event_type, &counter)
//!     }
//! }
//!
//! // In a plugin crate built for `wasm32-wasip2`:
//! // refract_sdk::export_projection!(CountByType);
//!
//! // Natively, the same code runs against an in-memory store (useful in unit tests):
//! let event = refract_sdk::testing::event("orders", "OrderPlaced", None, b"{}");
//! let (store, result) = refract_sdk::native::with_backend(
//!     refract_sdk::native::MemoryBackend::default(),
//!     || CountByType::handle(vec![event]),
//! );
//! result.unwrap();
//! assert_eq!(store.get("counts", "OrderPlaced"), Some(br#"{"count":1}"#.as_slice()));
//! ```

#![deny(missing_docs)]

#[doc(hidden)]
pub mod wit {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "refract:plugin/packed-projection",
        pub_export_macro: true,
        export_macro_name: "__export_projection_world",
        default_bindings_module: "refract_sdk::wit",
        generate_all,
    });

    /// The `enricher` world: its imports are the interfaces generated above.
    pub mod enricher {
        wit_bindgen::generate!({
            path: "../../wit",
            world: "refract:plugin/packed-enricher",
            pub_export_macro: true,
            export_macro_name: "__export_enricher_world",
            default_bindings_module: "refract_sdk::wit::enricher",
            with: {
                "refract:plugin/types@0.1.1": crate::wit::refract::plugin::types,
                "refract:plugin/kv@0.1.1": crate::wit::refract::plugin::kv,
                "refract:plugin/kv-packed@0.1.1": crate::wit::refract::plugin::kv_packed,
                "refract:plugin/emit@0.1.1": crate::wit::refract::plugin::emit,
                "refract:plugin/lookup@0.1.1": crate::wit::refract::plugin::lookup,
                "refract:plugin/settings@0.1.1": crate::wit::refract::plugin::settings,
                "refract:plugin/log@0.1.1": crate::wit::refract::plugin::log,
            },
        });
    }
}

mod cache;
mod emit;
mod enricher;
mod event;
#[doc(hidden)]
pub mod export;
mod host;
pub mod kv;
pub mod lookup;
mod manifest;
pub mod native;
#[doc(hidden)]
pub mod packed;
mod projection;
pub mod search;
mod settings;
mod table;
pub mod testing;

pub use cache::TableCache;
pub use emit::{NewEvent, emit};
pub use enricher::Enricher;
pub use event::{Event, Failure, FieldType, Level};
#[doc(hidden)]
pub use export::{__install_panic_hook, __unpack};
pub use manifest::Manifest;
pub use projection::Projection;
pub use search::{Index, IndexMapping};
pub use settings::{log, setting, setting_or};
pub use table::Table;

#[cfg(any(all(feature = "talc", target_family = "wasm", not(target_feature = "atomics")), test))]
#[doc(hidden)]
pub mod small_alloc;
