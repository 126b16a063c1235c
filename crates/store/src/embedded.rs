//! [`EmbeddedStore`]: the default store, a single redb file with no server.
//!
//! # How it works
//!
//! * **One writer thread** owns every write transaction. `txn` callers send
//!   their ops over a channel and await a reply. The thread takes whatever has
//!   queued up (up to [`MAX_BATCH`] transactions) and applies it in *one* redb
//!   write transaction with one fsync — group commit. Each logical transaction
//!   is still checked and numbered on its own: its preconditions are evaluated
//!   against the state left by the transactions before it, a failing one
//!   writes nothing, and each effective one gets its own revision. Replies go
//!   out only after the redb commit (redb's default `Durability::Immediate`)
//!   has returned, so `Ok` means durable. A lone writer pays one fsync; many
//!   concurrent writers share one.
//! * **Reads** (`get`, `list`) open a redb read transaction on tokio's
//!   blocking pool, so they never wait for the writer and never block the
//!   async runtime. `list` reads the revision from the same read transaction,
//!   which makes it a consistent snapshot.
//! * **Watches** are served from memory: a ring of the most recent events
//!   (history is not persisted; a restart starts it empty) plus a fan-out to
//!   live watchers, each with its own bounded channel. Publishing (ring append
//!   and fan-out) and subscribing (replay and registration) happen under the
//!   same lock, so a watcher sees every event exactly once. A watcher whose
//!   channel fills up gets [`StoreError::WatchLagged`] and is dropped; writers
//!   never wait for watchers.
//!
//! # On-disk format (schema version [`SCHEMA_VERSION`])
//!
//! * table `meta` (`&str -> u64`): `schema_version`, and `revision`, the
//!   store revision as of the last commit;
//! * table `kv` (`&str -> &[u8]`): key -> `create_revision` (u64 LE),
//!   `mod_revision` (u64 LE), then the value bytes.
//!
//! Crash safety is redb's: a commit is atomic, and a torn one is rolled back
//! on the next open. Nothing here caches acknowledged writes outside redb.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc as std_mpsc};
use std::thread::JoinHandle;

use redb::{Database, ReadableTable, Table, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::{Event, KeyValue, Op, Precondition, Revision, Store, StoreError, Watch};

/// The on-disk schema this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Most transactions the writer folds into one redb commit. Bounds the
/// latency a big batch adds for the transactions queued behind it.
pub const MAX_BATCH: usize = 256;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_SCHEMA_VERSION: &str = "schema_version";
const META_REVISION: &str = "revision";
/// `create_revision` and `mod_revision`, before the value.
const RECORD_HEADER: usize = 16;

/// Tuning for [`EmbeddedStore::open_with`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Events kept in memory for `watch(_, Some(r))` replays. Older requests
    /// get [`StoreError::Compacted`].
    pub watch_history: usize,
    /// Events a watcher may have queued, unread, before it is dropped with
    /// [`StoreError::WatchLagged`]. One transaction touching more keys under
    /// a watched prefix than this also drops that watcher, since its events
    /// are delivered all or nothing.
    pub watch_buffer: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self { watch_history: 100_000, watch_buffer: 16_384 }
    }
}

/// The embedded, durable, crash-safe [`Store`]. See the module docs.
///
/// Dropping it stops the writer thread (after the batch in progress) and
/// ends all watches. The file stays locked against a second open until the
/// drop returns and any read still running on the blocking pool finishes.
pub struct EmbeddedStore {
    path: PathBuf,
    db: Arc<Database>,
    hub: Arc<Hub>,
    /// `None` only while dropping.
    writer: Option<Writer>,
}

struct Writer {
    requests: std_mpsc::Sender<Request>,
    thread: JoinHandle<()>,
}

struct Request {
    ops: Vec<Op>,
    reply: oneshot::Sender<Result<Revision, StoreError>>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .field("revision", &self.hub.revision.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Open the store at `path`, creating the file if it does not exist.
    ///
    /// Blocking: after a crash redb repairs the file here, which takes time
    /// proportional to its size. From async code, prefer `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, EmbeddedOptions::default())
    }

    /// [`open`](Self::open) with explicit tuning.
    pub fn open_with(path: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        let open_error =
            |source: EmbeddedError| StoreError::Open { path: path.display().to_string(), source: Box::new(source) };
        let db = Database::create(path).map_err(|e| open_error(e.into()))?;
        let revision = match init_schema(&db).map_err(open_error)? {
            Schema::Known { revision } => revision,
            Schema::Unknown { found } => {
                return Err(StoreError::SchemaVersion {
                    path: path.display().to_string(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        };
        tracing::debug!(path = %path.display(), revision, "opened embedded store");

        let db = Arc::new(db);
        let hub = Arc::new(Hub::new(revision, &options));
        let (requests, queue) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("drove-store-writer".to_owned())
            .spawn({
                let db = Arc::clone(&db);
                let hub = Arc::clone(&hub);
                move || write_loop(&db, &hub, &queue, revision)
            })
            .map_err(|e| open_error(EmbeddedError::SpawnWriter(e)))?;
        Ok(Self { path: path.to_owned(), db, hub, writer: Some(Writer { requests, thread }) })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run a read against the database on the blocking pool.
    async fn read<T, F>(&self, during: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, EmbeddedError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(result) => result.map_err(|e| backend(during, e)),
            Err(join) => Err(backend(during, join)),
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Some(Writer { requests, thread }) = self.writer.take() {
            // The writer exits once its queue is closed and drained; joining
            // it here means the file is released when the drop returns, so
            // the same process may reopen it right away.
            drop(requests);
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "store writer thread panicked");
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.read("get", move |db| {
            let tx = db.begin_read()?;
            let kv = tx.open_table(KV)?;
            let found = kv.get(key.as_str())?;
            found.map(|record| decode(&key, record.value())).transpose()
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_owned();
        self.read("list", move |db| {
            let tx = db.begin_read()?;
            let revision = read_revision(&tx.open_table(META)?)?;
            let kv = tx.open_table(KV)?;
            let mut out = Vec::new();
            for entry in kv.range::<&str>(prefix.as_str()..)? {
                let (key, record) = entry?;
                let key = key.value();
                // Keys sort bytewise, so the prefix's keys are one contiguous run.
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                out.push(decode(key, record.value())?);
            }
            Ok((out, revision))
        })
        .await
    }

    async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        let writer = self.writer.as_ref().ok_or(StoreError::Closed)?;
        let (reply, replied) = oneshot::channel();
        writer.requests.send(Request { ops, reply }).map_err(|_| StoreError::Closed)?;
        // Once queued, the transaction runs even if this future is dropped.
        replied.await.map_err(|_| StoreError::Closed)?
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.hub.revision.load(Ordering::Acquire))
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watch, StoreError> {
        self.hub.subscribe(prefix, from)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.hub.compact(revision);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Errors

/// What went wrong inside the backend; wrapped in [`StoreError::Backend`] or
/// [`StoreError::Open`].
#[derive(Debug, thiserror::Error)]
enum EmbeddedError {
    /// Boxed: redb's error is large, and it is the rare path.
    #[error(transparent)]
    Redb(Box<redb::Error>),
    #[error("record for key {key:?} is {len} bytes, shorter than its {RECORD_HEADER}-byte header")]
    ShortRecord { key: String, len: usize },
    #[error("meta table has no {0:?} entry")]
    MissingMeta(&'static str),
    #[error("spawning the writer thread")]
    SpawnWriter(#[source] std::io::Error),
}

macro_rules! from_redb {
    ($($err:ty),*) => {
        $(impl From<$err> for EmbeddedError {
            fn from(err: $err) -> Self {
                Self::Redb(Box::new(err.into()))
            }
        })*
    };
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// One failed commit answers every transaction of its batch.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct SharedError(Arc<EmbeddedError>);

fn backend(during: &'static str, err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend { during, source: Box::new(err) }
}

// ---------------------------------------------------------------------------
// Schema and records

enum Schema {
    Known { revision: Revision },
    Unknown { found: u32 },
}

fn init_schema(db: &Database) -> Result<Schema, EmbeddedError> {
    let tx = db.begin_write()?;
    let has_tables = tx.list_tables()?.next().is_some();
    let schema = {
        let mut meta = tx.open_table(META)?;
        let version = meta.get(META_SCHEMA_VERSION)?.map(|v| v.value());
        match version {
            // Some other program's redb file: not ours to initialise.
            None if has_tables => Schema::Unknown { found: 0 },
            None => {
                meta.insert(META_SCHEMA_VERSION, u64::from(SCHEMA_VERSION))?;
                meta.insert(META_REVISION, 0)?;
                tx.open_table(KV)?;
                Schema::Known { revision: 0 }
            }
            Some(v) if v == u64::from(SCHEMA_VERSION) => Schema::Known { revision: read_revision(&meta)? },
            Some(v) => Schema::Unknown { found: u32::try_from(v).unwrap_or(u32::MAX) },
        }
    };
    match schema {
        Schema::Known { revision: 0 } if !has_tables => tx.commit()?,
        // Opening a table in a write transaction creates it; do not leave an
        // empty meta table behind in a file we refuse.
        _ => tx.abort()?,
    }
    Ok(schema)
}

fn read_revision(meta: &impl ReadableTable<&'static str, u64>) -> Result<Revision, EmbeddedError> {
    Ok(meta.get(META_REVISION)?.ok_or(EmbeddedError::MissingMeta(META_REVISION))?.value())
}

fn encode(create: Revision, modified: Revision, value: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(RECORD_HEADER + value.len());
    record.extend_from_slice(&create.to_le_bytes());
    record.extend_from_slice(&modified.to_le_bytes());
    record.extend_from_slice(value);
    record
}

/// `(create_revision, mod_revision)` of a record.
fn header(key: &str, record: &[u8]) -> Result<(Revision, Revision), EmbeddedError> {
    let short = || EmbeddedError::ShortRecord { key: key.to_owned(), len: record.len() };
    let create = record.get(0..8).and_then(|b| b.try_into().ok()).ok_or_else(short)?;
    let modified = record.get(8..16).and_then(|b| b.try_into().ok()).ok_or_else(short)?;
    Ok((u64::from_le_bytes(create), u64::from_le_bytes(modified)))
}

fn decode(key: &str, record: &[u8]) -> Result<KeyValue, EmbeddedError> {
    let (create_revision, mod_revision) = header(key, record)?;
    Ok(KeyValue { key: key.to_owned(), value: record[RECORD_HEADER..].to_vec(), create_revision, mod_revision })
}

// ---------------------------------------------------------------------------
// Writer

fn write_loop(db: &Database, hub: &Hub, queue: &std_mpsc::Receiver<Request>, mut revision: Revision) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let (txns, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|r| (r.ops, r.reply)).unzip();
        match commit_batch(db, revision, txns) {
            Ok(batch) => {
                if batch.revision != revision {
                    revision = batch.revision;
                    hub.publish(batch.events, revision);
                }
                for (reply, result) in replies.into_iter().zip(batch.results) {
                    // A caller that stopped waiting still had its txn applied.
                    let _ = reply.send(result);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "store commit failed; batch discarded");
                let err = Arc::new(err);
                for reply in replies {
                    let _ = reply.send(Err(backend("commit", SharedError(Arc::clone(&err)))));
                }
            }
        }
    }
}

struct Batch {
    /// Store revision after the batch.
    revision: Revision,
    /// Events of all its effective transactions, in commit order.
    events: Vec<Event>,
    /// One per transaction, in queue order.
    results: Vec<Result<Revision, StoreError>>,
}

/// Apply a batch of transactions in one redb commit. An `Err` means nothing
/// was written; a precondition failure only fails its own transaction.
fn commit_batch(db: &Database, start: Revision, txns: Vec<Vec<Op>>) -> Result<Batch, EmbeddedError> {
    let tx = db.begin_write()?;
    let mut revision = start;
    let mut events = Vec::new();
    let mut results = Vec::with_capacity(txns.len());
    {
        let mut kv = tx.open_table(KV)?;
        for ops in txns {
            match stage(&kv, revision + 1, ops)? {
                Staged::Failed(err) => results.push(Err(err)),
                Staged::Unchanged => results.push(Ok(revision)),
                Staged::Changed { writes, events: txn_events } => {
                    revision += 1;
                    for (key, record) in writes {
                        match record {
                            Some(record) => kv.insert(key.as_str(), record.as_slice())?,
                            None => kv.remove(key.as_str())?,
                        };
                    }
                    events.extend(txn_events);
                    results.push(Ok(revision));
                }
            }
        }
    }
    if revision == start {
        // Only failures and no-ops: nothing to make durable.
        tx.abort()?;
    } else {
        tx.open_table(META)?.insert(META_REVISION, revision)?;
        tx.commit()?;
    }
    Ok(Batch { revision, events, results })
}

enum Staged {
    Failed(StoreError),
    Unchanged,
    /// Final record per key (`None` = deleted), and the events in op order.
    Changed {
        writes: BTreeMap<String, Option<Vec<u8>>>,
        events: Vec<Event>,
    },
}

/// Check one transaction's ops in order against the table plus its own
/// earlier ops, without touching the table, so a failure leaves no trace.
fn stage(kv: &Table<&str, &[u8]>, next: Revision, ops: Vec<Op>) -> Result<Staged, EmbeddedError> {
    let mut writes: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let mut events = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value, precondition } => {
                let current = current(kv, &writes, &key)?;
                if let Err(err) = check(&key, precondition, current) {
                    return Ok(Staged::Failed(err));
                }
                let create_revision = current.map_or(next, |(create, _)| create);
                writes.insert(key.clone(), Some(encode(create_revision, next, &value)));
                events.push(Event::Put(KeyValue { key, value, create_revision, mod_revision: next }));
            }
            Op::Delete { key, precondition } => {
                let current = current(kv, &writes, &key)?;
                if let Err(err) = check(&key, precondition, current) {
                    return Ok(Staged::Failed(err));
                }
                if current.is_some() {
                    writes.insert(key.clone(), None);
                    events.push(Event::Delete { key, revision: next });
                }
            }
        }
    }
    Ok(if events.is_empty() { Staged::Unchanged } else { Staged::Changed { writes, events } })
}

/// `(create_revision, mod_revision)` of `key` as the transaction sees it.
fn current(
    kv: &Table<&str, &[u8]>,
    writes: &BTreeMap<String, Option<Vec<u8>>>,
    key: &str,
) -> Result<Option<(Revision, Revision)>, EmbeddedError> {
    match writes.get(key) {
        Some(Some(record)) => Ok(Some(header(key, record)?)),
        Some(None) => Ok(None),
        None => match kv.get(key)? {
            Some(record) => Ok(Some(header(key, record.value())?)),
            None => Ok(None),
        },
    }
}

fn check(key: &str, expected: Precondition, current: Option<(Revision, Revision)>) -> Result<(), StoreError> {
    let found = current.map(|(_, modified)| modified);
    let holds = match expected {
        Precondition::Any => true,
        Precondition::Absent => found.is_none(),
        Precondition::Revision(r) => found == Some(r),
    };
    if holds { Ok(()) } else { Err(StoreError::PreconditionFailed { key: key.to_owned(), expected, found }) }
}

// ---------------------------------------------------------------------------
// Watch hub

/// Recent history and live watchers. The writer publishes under the lock and
/// watchers subscribe under it, which is what makes replay + live gap-free.
struct Hub {
    state: Mutex<HubState>,
    /// Last published revision. Written only under `state`'s lock, so reading
    /// it under the lock is exact; `revision()` reads it without the lock.
    revision: AtomicU64,
}

struct HubState {
    /// Events in revision order, oldest first.
    history: VecDeque<Event>,
    history_capacity: usize,
    /// Oldest revision whose events are all still in `history`: this
    /// process's first revision, raised by eviction and compaction.
    floor: Revision,
    watchers: Vec<Watcher>,
    buffer: usize,
}

struct Watcher {
    prefix: String,
    /// Deliver only events at or after this revision.
    start: Revision,
    tx: mpsc::Sender<Result<Event, StoreError>>,
}

impl Hub {
    fn new(revision: Revision, options: &EmbeddedOptions) -> Self {
        Self {
            state: Mutex::new(HubState {
                history: VecDeque::new(),
                history_capacity: options.watch_history,
                // History from before this process is gone.
                floor: revision + 1,
                watchers: Vec::new(),
                buffer: options.watch_buffer.max(1),
            }),
            revision: AtomicU64::new(revision),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // Every critical section leaves the state consistent between
        // statements that can panic, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn subscribe(&self, prefix: &str, from: Option<Revision>) -> Result<Watch, StoreError> {
        let mut state = self.lock();
        let current = self.revision.load(Ordering::Acquire);
        let start = match from {
            None => current + 1,
            Some(requested) => {
                // Revision 0 has no events; asking for it means "everything".
                let start = requested.max(1);
                if start < state.floor {
                    return Err(StoreError::Compacted { requested, oldest: state.floor });
                }
                start
            }
        };
        let first = state.history.partition_point(|e| e.revision() < start);
        let replay: Vec<Event> =
            state.history.range(first..).filter(|e| e.key().starts_with(prefix)).cloned().collect();
        // Room for the replay, the live buffer, and the slot kept for the
        // lag error. tokio allocates channel slots lazily.
        let (tx, rx) = mpsc::channel(replay.len() + state.buffer + 1);
        for event in replay {
            // Cannot fail: the receiver is alive and the channel has room.
            let _ = tx.try_send(Ok(event));
        }
        state.watchers.push(Watcher { prefix: prefix.to_owned(), start, tx });
        Ok(Watch { rx })
    }

    fn publish(&self, events: Vec<Event>, revision: Revision) {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.watchers.retain(|watcher| watcher.deliver(&events));
        state.history.extend(events);
        while state.history.len() > state.history_capacity {
            if let Some(evicted) = state.history.pop_front() {
                // A revision is replayable only if all its events are kept.
                state.floor = state.floor.max(evicted.revision() + 1);
            }
        }
        self.revision.store(revision, Ordering::Release);
    }

    fn compact(&self, revision: Revision) {
        let mut state = self.lock();
        let floor = revision.min(self.revision.load(Ordering::Acquire) + 1);
        if floor > state.floor {
            state.floor = floor;
            let keep = state.history.partition_point(|e| e.revision() < floor);
            state.history.drain(..keep);
        }
    }
}

impl Watcher {
    /// Send this watcher its share of `events`; `false` drops it.
    fn deliver(&self, events: &[Event]) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        for txn in events.chunk_by(|a, b| a.revision() == b.revision()) {
            let revision = txn[0].revision();
            if revision < self.start {
                continue;
            }
            let matching = || txn.iter().filter(|e| e.key().starts_with(self.prefix.as_str()));
            let count = matching().count();
            if count == 0 {
                continue;
            }
            // A transaction's events go all or nothing, keeping one slot
            // free so the lag error always fits.
            if self.tx.capacity() <= count {
                tracing::warn!(prefix = %self.prefix, next = revision, "dropping lagging store watcher");
                let _ = self.tx.try_send(Err(StoreError::WatchLagged { prefix: self.prefix.clone(), next: revision }));
                return false;
            }
            for event in matching() {
                if self.tx.try_send(Ok(event.clone())).is_err() {
                    return false;
                }
            }
        }
        true
    }
}
