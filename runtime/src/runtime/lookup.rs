//! Plugins' `lookup` capability: reads from other projections' live read models.

use super::Runtime;
use crate::plugin::{Lookup, LookupError, LookupFailure};

/// Serves plugins' `lookup` calls from the live generations of the runtime's projections.
pub(super) struct RuntimeLookup(pub(super) std::sync::Weak<Runtime>);

impl Lookup for RuntimeLookup {
    fn get(&self, projection: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, LookupFailure> {
        let runtime = self.0.upgrade().ok_or_else(|| LookupFailure::Host("the runtime is shutting down".into()))?;
        let Some(p) = runtime.projection(projection) else {
            let error = LookupError::UnknownProjection(format!("no projection {projection:?} is running"));
            return Err(LookupFailure::Refused(error));
        };
        let live = p.live();
        if !live.manifest.read().expect("manifest lock").tables.iter().any(|t| t == table) {
            let error = LookupError::UnknownTable(format!("{projection} declares no table {table:?}"));
            return Err(LookupFailure::Refused(error));
        }
        live.read_model.get(table, key).map_err(|e| LookupFailure::Host(format!("lookup in {projection}/{table}: {e}")))
    }
}
