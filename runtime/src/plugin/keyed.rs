//! Tables a projection declares keyed like its events (`keyed-tables`, WIT
//! 0.1.1): each key of such a table is the key of the events it is written
//! for, or starts with it and a separator. On a partitioned projection, the
//! shard that can hold a key is then the partition of its event key, by the
//! producer's hash, and a lookup asks that shard alone.

use std::collections::BTreeMap;

use super::{KeyedTable, Manifest};

/// The keyed tables of one plugin version, and where each key's event key ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyedTables(BTreeMap<String, Option<String>>);

impl KeyedTables {
    /// Check what `manifest`'s plugin declared: tables it declares, once
    /// each, and separators that are not empty.
    pub fn new(manifest: &Manifest, declared: &[KeyedTable]) -> Result<Self, String> {
        let mut tables = BTreeMap::new();
        for keyed in declared {
            if !manifest.tables.contains(&keyed.table) {
                return Err(format!(
                    "keyed table {:?} is not one of the tables the manifest declares ({})",
                    keyed.table,
                    manifest.tables.join(", ")
                ));
            }
            if keyed.separator.as_deref() == Some("") {
                return Err(format!("keyed table {:?} has an empty separator", keyed.table));
            }
            if tables.insert(keyed.table.clone(), keyed.separator.clone()).is_some() {
                return Err(format!("table {:?} is declared keyed twice", keyed.table));
            }
        }
        Ok(KeyedTables(tables))
    }

    /// The event key of `key` in `table`, when the table is keyed.
    pub fn event_key<'k>(&self, table: &str, key: &'k str) -> Option<&'k str> {
        match self.0.get(table)? {
            None => Some(key),
            Some(separator) => Some(key.split_once(separator.as_str()).map_or(key, |(event_key, _)| event_key)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            name: "p".into(),
            version: "1".into(),
            schema_version: 1,
            subscriptions: Vec::new(),
            tables: vec!["orders".into(), "lines".into(), "totals".into()],
        }
    }

    fn keyed(table: &str, separator: Option<&str>) -> KeyedTable {
        KeyedTable { table: table.into(), separator: separator.map(str::to_owned) }
    }

    #[test]
    fn names_the_event_key_of_a_key() {
        let k = KeyedTables::new(&manifest(), &[keyed("orders", None), keyed("lines", Some("/"))]).unwrap();
        assert_eq!(k.event_key("orders", "o-1/x"), Some("o-1/x"));
        assert_eq!(k.event_key("lines", "o-1/line/2"), Some("o-1"));
        // A key without the separator is the event key itself.
        assert_eq!(k.event_key("lines", "o-1"), Some("o-1"));
        assert_eq!(k.event_key("totals", "o-1"), None);
    }

    #[test]
    fn refuses_what_the_manifest_does_not_declare() {
        let err = KeyedTables::new(&manifest(), &[keyed("nope", None)]).unwrap_err();
        assert!(err.contains("\"nope\" is not one of the tables"), "{err}");
        let err = KeyedTables::new(&manifest(), &[keyed("lines", Some(""))]).unwrap_err();
        assert!(err.contains("empty separator"), "{err}");
        let err = KeyedTables::new(&manifest(), &[keyed("orders", None), keyed("orders", None)]).unwrap_err();
        assert!(err.contains("declared keyed twice"), "{err}");
    }
}
