//! Read models: each projection's tables, checkpoints and dead letters in its own redb file.
//!
//! [`batch`] is a batch's writes in memory (read-your-writes over the last
//! commit); [`read_model`] opens the file and commits a batch with its
//! checkpoints in one transaction; `tables` is the file's layout and the
//! plugin tables' reads; [`dead_letters`] and [`outbox`] are what the runtime
//! keeps beside them; [`changes`] is the change log change streams read;
//! [`diff`] compares two generations' tables (a
//! preview's against the live one's); [`search`] turns the outbox into tantivy indexes.

pub mod batch;
pub mod changes;
pub mod dead_letters;
pub mod diff;
pub mod outbox;
pub mod read_model;
pub mod search;
mod tables;

pub use batch::{Batch, BatchWrites, Declared, Emitted, KvLimits, Origin, Writes};
pub use dead_letters::DeadLetter;
pub use read_model::{Checkpoint, ReadModel};

/// Errors of a read model's storage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage failed (disk full, I/O error). A batch that hit this did not commit.
    #[error("read model storage: {0}")]
    Storage(#[from] redb::Error),
    /// A stored value could not be decoded.
    #[error("read model is corrupt: {0}")]
    Corrupt(String),
    /// A search index mapping the plugin declared is invalid.
    #[error("invalid index mapping: {0}")]
    InvalidMapping(String),
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Storage(e.into())
            }
        }
    )*};
}
storage_from!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

pub type Result<T, E = Error> = std::result::Result<T, E>;
