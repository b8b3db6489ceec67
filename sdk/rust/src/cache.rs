//! A table's decoded values, held for one batch: [`Table::cached`].
//!
//! A stateful plugin often reads and writes the same key several times in
//! one batch: a join writes an order's state when the order arrives and
//! rewrites it when its payment arrives a few events later. Through the
//! table each of those is a JSON encode or decode and a read from the host;
//! through the cache, a key is read and decoded once per batch, and encoded
//! and written once, when the batch's work is done, with the value it ended
//! with. Kafka Streams puts a record cache in front of its state stores for
//! the same reason.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Failure, Table};

/// Past this many keys the cache writes what changed and starts afresh, so
/// that a batch of any size keeps the plugin's memory bounded.
const MAX_KEYS: usize = 4096;

/// A key's value as the batch has it: `value` (`None`: absent), and whether
/// it differs from what the table holds.
struct Slot<V> {
    value: Option<V>,
    dirty: bool,
}

/// The values of one table that a batch has read or written, decoded. Made by
/// [`Table::cached`], which writes the changed values back when its closure
/// succeeds.
pub struct TableCache<V> {
    table: Table<V>,
    slots: HashMap<String, Slot<V>, BuildHasherDefault<Fnv>>,
}

impl<V: Serialize + DeserializeOwned> TableCache<V> {
    /// The value under `key`, if any: read from the table the first time, from
    /// the cache afterwards (with the batch's own writes).
    pub fn get(&mut self, key: &str) -> Result<Option<&V>, Failure> {
        if !self.slots.contains_key(key) {
            self.make_room()?;
            let value = self.table.get(key)?;
            let slot = self.slots.entry(key.to_owned()).or_insert(Slot { value, dirty: false });
            return Ok(slot.value.as_ref());
        }
        Ok(self.slots[key].value.as_ref())
    }

    /// Store `value` under `key` (written to the table when the batch's work is done).
    pub fn put(&mut self, key: &str, value: V) -> Result<(), Failure> {
        self.set(key, Some(value))
    }

    /// Remove `key` (from the table when the batch's work is done).
    pub fn delete(&mut self, key: &str) -> Result<(), Failure> {
        self.set(key, None)
    }

    /// Write what changed now, then scan the table ([`Table::scan`]).
    pub fn scan(&mut self, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<Vec<(String, V)>, Failure> {
        self.write_back()?;
        self.table.scan(prefix, start_after, limit)
    }

    fn set(&mut self, key: &str, value: Option<V>) -> Result<(), Failure> {
        if let Some(slot) = self.slots.get_mut(key) {
            *slot = Slot { value, dirty: true };
            return Ok(());
        }
        self.make_room()?;
        self.slots.insert(key.to_owned(), Slot { value, dirty: true });
        Ok(())
    }

    fn make_room(&mut self) -> Result<(), Failure> {
        if self.slots.len() >= MAX_KEYS {
            self.write_back()?;
            self.slots.clear();
        }
        Ok(())
    }

    /// Write every changed value to the table; they stay cached, unchanged.
    fn write_back(&mut self) -> Result<(), Failure> {
        for (key, slot) in self.slots.iter_mut().filter(|(_, slot)| slot.dirty) {
            match &slot.value {
                Some(value) => self.table.put(key, value)?,
                None => self.table.delete(key)?,
            }
            slot.dirty = false;
        }
        Ok(())
    }
}

impl<V: Serialize + DeserializeOwned> Table<V> {
    /// Run `f` with a cache of this table's decoded values (see [`TableCache`]);
    /// when `f` succeeds, write the values it changed back to the table, each
    /// once. When `f` fails, nothing it wrote through the cache is written
    /// (the batch fails as a whole anyway).
    ///
    /// While `f` runs, read and write this table only through the cache: the
    /// table itself does not see the cached writes until they are written back.
    pub fn cached<R>(&self, f: impl FnOnce(&mut TableCache<V>) -> Result<R, Failure>) -> Result<R, Failure> {
        let mut cache = TableCache { table: Table::new(self.name()), slots: HashMap::default() };
        let result = f(&mut cache)?;
        cache.write_back()?;
        Ok(result)
    }
}

/// FNV-1a: keys are short strings, for which it is quicker than the standard
/// library's SipHash (in WebAssembly most of all), and they come from the
/// plugin's own events, so flooding is the plugin's own doing.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325) // the offset basis
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::native::{Backend, MemoryBackend, with_backend};

    const T: Table<u32> = Table::new("t");

    fn stored(backend: &MemoryBackend, key: &str) -> Option<String> {
        backend.get("t", key).map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    #[test]
    fn reads_see_the_batch_s_writes_which_reach_the_table_when_its_work_is_done() {
        let mut backend = MemoryBackend::default();
        backend.put("t", "a", b"1").unwrap();
        backend.put("t", "gone", b"7").unwrap();
        let (backend, result) = with_backend(backend, || {
            T.cached(|cache| {
                assert_eq!(cache.get("a")?, Some(&1));
                cache.put("a", 2)?;
                assert_eq!(cache.get("a")?, Some(&2));
                assert_eq!(T.get("a")?, Some(1), "the table sees the write only when it is written back");
                cache.put("b", 3)?;
                cache.delete("gone")?;
                assert_eq!(cache.get("gone")?, None);
                assert_eq!(cache.get("never")?, None);
                Ok(())
            })
        });
        result.unwrap();
        assert_eq!(stored(&backend, "a").as_deref(), Some("2"));
        assert_eq!(stored(&backend, "b").as_deref(), Some("3"));
        assert_eq!(stored(&backend, "gone"), None);
        assert_eq!(stored(&backend, "never"), None);
    }

    #[test]
    fn a_failure_writes_nothing_and_a_scan_sees_the_cached_writes() {
        let (backend, result) = with_backend(MemoryBackend::default(), || {
            T.cached(|cache| {
                cache.put("x", 1)?;
                let scanned = cache.scan("", None, 10)?;
                assert_eq!(scanned, [("x".to_owned(), 1)]);
                cache.put("y", 2)?;
                Err::<(), _>(Failure::rejected("no"))
            })
        });
        assert!(result.is_err());
        // `x` went to the table for the scan (the host rolls the batch back);
        // `y` never left the cache.
        assert_eq!(stored(&backend, "y"), None);
    }

    #[test]
    fn a_batch_touching_more_keys_than_the_cache_holds_loses_none_of_them() {
        let n = MAX_KEYS as u32 * 2 + 5;
        let (mut backend, result) = with_backend(MemoryBackend::default(), || {
            T.cached(|cache| {
                for i in 0..n {
                    cache.put(&format!("k{i}"), i)?;
                    assert_eq!(cache.get(&format!("k{}", i / 2))?, Some(&(i / 2)));
                }
                Ok(())
            })
        });
        result.unwrap();
        assert_eq!(backend.scan("t", "", None, u32::MAX).unwrap().len(), n as usize);
        assert_eq!(stored(&backend, "k0").as_deref(), Some("0"));
    }
}
