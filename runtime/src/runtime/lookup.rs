//! Plugins' `lookup` capability: reads from other projections' live read models.

use super::Runtime;
use crate::plugin::{Lookup, LookupError};

/// Serves plugins' `lookup` calls from the live generations of the runtime's projections.
pub(super) struct RuntimeLookup(pub(super) std::sync::Weak<Runtime>);

impl Lookup for RuntimeLookup {
    fn get(&self, projection: &str, table: &str, key: &str) -> Result<Result<Option<Vec<u8>>, LookupError>, String> {
        let runtime = self.0.upgrade().ok_or("the runtime is shutting down")?;
        let Some(p) = runtime.projection(projection) else {
            return Ok(Err(LookupError::UnknownProjection(format!("no projection {projection:?} is running"))));
        };
        let live = p.live();
        if !live.manifest.read().expect("manifest lock").tables.iter().any(|t| t == table) {
            return Ok(Err(LookupError::UnknownTable(format!("{projection} declares no table {table:?}"))));
        }
        live.read_model.get(table, key).map(Ok).map_err(|e| format!("lookup in {projection}/{table}: {e}"))
    }
}
