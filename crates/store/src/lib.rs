//! The state store: drove's single source of truth for desired state.
//!
//! One trait, [`Store`], with a key/value model borrowed from etcd: every
//! write bumps a store-wide *revision*; each key remembers the revision that
//! created it and the one that last modified it. Writers guard updates with
//! [`Precondition`]s (compare-and-swap on revisions), group several writes
//! into one atomic [`Store::txn`], and follow changes with [`Store::watch`].
//!
//! Implementations: [`embedded::EmbeddedStore`] (redb, durable, crash-safe;
//! the default) — etcd comes later. [`conformance`] holds the test suite that
//! every implementation must pass. `Arc<S>` (and so `Arc<dyn Store>`) is a
//! store too.

use std::fmt::Debug;

pub mod conformance;
pub mod embedded;

/// A store-wide, strictly increasing write counter. `0` means "never written".
pub type Revision = u64;

/// One key with its value and revision metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since it last did not exist).
    pub create_revision: Revision,
    /// Revision of the write that last modified this key.
    pub mod_revision: Revision,
}

/// A guard on a write: the write happens only if it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// No condition.
    Any,
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this `mod_revision`.
    Revision(Revision),
}

/// One write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8>, precondition: Precondition },
    Delete { key: String, precondition: Precondition },
}

/// A change seen by a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// The key was deleted at `revision`.
    Delete {
        key: String,
        revision: Revision,
    },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A precondition did not hold; nothing in the transaction was written.
    #[error("precondition failed on key {key:?}: expected {expected:?}, found revision {found:?}")]
    PreconditionFailed { key: String, expected: Precondition, found: Option<Revision> },
    /// A watch asked to start at a revision whose history is no longer kept.
    #[error("revision {requested} is compacted; oldest watchable revision is {oldest}")]
    Compacted { requested: Revision, oldest: Revision },
    /// The on-disk data was written by a schema this build does not understand.
    #[error("store at {path} has schema version {found}, this build understands {supported}")]
    SchemaVersion { path: String, found: u32, supported: u32 },
    #[error("store backend failed during {during}")]
    Backend {
        during: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store file could not be opened or initialised.
    #[error("opening store at {path}")]
    Open {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A watcher did not keep up and was dropped. Nothing at or after `next`
    /// was delivered: `watch(prefix, Some(next))` resumes without gaps or
    /// duplicates (or says `Compacted`, and the caller re-lists).
    #[error("watch on prefix {prefix:?} fell too far behind; resume from revision {next}")]
    WatchLagged { prefix: String, next: Revision },
    #[error("store is closed")]
    Closed,
}

/// A stream of events for one prefix, in revision order, without gaps.
#[derive(Debug)]
pub struct Watch {
    pub rx: tokio::sync::mpsc::Receiver<Result<Event, StoreError>>,
}

impl Watch {
    /// Next event; `None` when the store shut down.
    pub async fn next(&mut self) -> Option<Result<Event, StoreError>> {
        self.rx.recv().await
    }
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + Debug + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// All keys starting with `prefix`, sorted by key, and the store revision
    /// at which this consistent snapshot was taken.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// Atomically apply all `ops` (all or nothing) once every precondition
    /// holds; the whole transaction gets one new revision, returned. Durable
    /// when this returns `Ok`.
    async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError>;

    /// The current revision.
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// Follow changes to keys under `prefix`. With `from = Some(r)`, events
    /// with revision `>= r` are replayed first (or `Compacted` if that history
    /// is gone); with `None`, only changes after the call are delivered.
    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watch, StoreError>;

    /// Forget watch history before `revision`, as etcd's compaction does:
    /// afterwards a watch from an older revision fails with `Compacted`, one
    /// from `revision` or later still works. Key values are not affected (this
    /// store keeps no old versions to read). A revision beyond the current one
    /// compacts all history so far.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    async fn put(&self, key: &str, value: Vec<u8>, precondition: Precondition) -> Result<Revision, StoreError> {
        self.txn(vec![Op::Put { key: key.to_owned(), value, precondition }]).await
    }

    async fn delete(&self, key: &str, precondition: Precondition) -> Result<Revision, StoreError> {
        self.txn(vec![Op::Delete { key: key.to_owned(), precondition }]).await
    }
}

/// A shared store handle is a store too, so `Arc<dyn Store>` (what the
/// manager passes around) works wherever a generic `S: Store` is expected.
#[async_trait::async_trait]
impl<T: Store + ?Sized> Store for std::sync::Arc<T> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        (**self).get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        (**self).list(prefix).await
    }

    async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        (**self).txn(ops).await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        (**self).revision().await
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watch, StoreError> {
        (**self).watch(prefix, from).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        (**self).compact(revision).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, precondition: Precondition) -> Result<Revision, StoreError> {
        (**self).put(key, value, precondition).await
    }

    async fn delete(&self, key: &str, precondition: Precondition) -> Result<Revision, StoreError> {
        (**self).delete(key, precondition).await
    }
}
