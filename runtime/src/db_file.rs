//! A redb file that outlives a failed write.
//!
//! When a write fails (a full disk, an I/O error), redb keeps the file as of
//! its last commit but refuses every later write transaction until the
//! database is closed and opened again. [`DbFile`] does that reopening on the
//! next write after the failure, so that a projection or the log resumes by
//! itself once space returns instead of needing a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{Database, ReadTransaction, ReadableDatabase, StorageError, TransactionError, WriteTransaction};

/// redb's own default page cache: up to 1 GiB per open file (`storage.cache-mb`).
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

pub struct DbFile {
    path: PathBuf,
    /// The most memory redb may use to cache the file's pages.
    cache_bytes: usize,
    /// `None` after a reopen that failed (the old handle is closed first:
    /// redb locks the file); the next use tries again.
    db: RwLock<Option<Arc<Database>>>,
}

impl DbFile {
    /// Open (or create) the database in `path`, caching up to `cache_bytes` of its pages.
    pub fn create(path: &Path, cache_bytes: usize) -> Result<Self, redb::DatabaseError> {
        let db = open(path, cache_bytes)?;
        Ok(DbFile { path: path.to_owned(), cache_bytes, db: RwLock::new(Some(Arc::new(db))) })
    }

    fn current(&self) -> Result<Arc<Database>, TransactionError> {
        if let Some(db) = &*self.db.read().expect("db lock") {
            return Ok(db.clone());
        }
        self.reopen(None)
    }

    /// Close the failed handle and open the file again. Transactions still
    /// holding the old one keep the file locked until they end: until then
    /// reopening fails, and the caller retries later.
    fn reopen(&self, failed: Option<Arc<Database>>) -> Result<Arc<Database>, TransactionError> {
        let mut slot = self.db.write().expect("db lock");
        match (&*slot, &failed) {
            // Someone else reopened it meanwhile.
            (Some(db), Some(f)) if !Arc::ptr_eq(db, f) => return Ok(db.clone()),
            (Some(db), None) => return Ok(db.clone()),
            _ => {}
        }
        drop(failed);
        *slot = None;
        let db = open(&self.path, self.cache_bytes).map_err(|e| {
            TransactionError::Storage(StorageError::Io(std::io::Error::other(format!(
                "reopening {} after a failed write: {e}",
                self.path.display()
            ))))
        })?;
        tracing::info!(file = %self.path.display(), "reopened after a failed write");
        let db = Arc::new(db);
        *slot = Some(db.clone());
        Ok(db)
    }

    pub fn begin_read(&self) -> Result<ReadTransaction, TransactionError> {
        self.current()?.begin_read()
    }

    pub fn begin_write(&self) -> Result<WriteTransaction, TransactionError> {
        let db = self.current()?;
        match db.begin_write() {
            Err(TransactionError::Storage(StorageError::PreviousIo)) => self.reopen(Some(db))?.begin_write(),
            other => other,
        }
    }
}

/// Open (or create) the redb file in `path` with a page cache of `cache_bytes`.
fn open(path: &Path, cache_bytes: usize) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(cache_bytes).create(path)
}
