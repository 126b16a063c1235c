//! Ordered group commit of the manager's writes.
//!
//! Callers enqueue a batch of store ops (synchronously, under the inventory
//! lock, which fixes their order) and then await its durability. One task
//! drains whatever has queued up and commits it as a single store
//! transaction: one fsync for many requests. If the store ever fails a
//! write, memory is ahead of disk; the persister then refuses everything
//! and reports itself failed so the process exits and restarts from the
//! store, which is the truth.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use drove_store::{Op, Store};
use tokio::sync::{mpsc, oneshot};

/// Upper bound on ops merged into one transaction, to bound latency.
const MAX_OPS_PER_COMMIT: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PersistError {
    #[error("the state store failed a write; the manager must restart: {0}")]
    Failed(String),
}

struct Batch {
    ops: Vec<Op>,
    done: oneshot::Sender<Result<(), PersistError>>,
}

/// Handle to the writer task.
#[derive(Debug, Clone)]
pub struct Persister {
    tx: mpsc::UnboundedSender<Batch>,
    failed: Arc<AtomicBool>,
    pub stats: Arc<PersistStats>,
}

#[derive(Debug, Default)]
pub struct PersistStats {
    pub commits: AtomicU64,
    pub ops: AtomicU64,
    pub commit_micros: AtomicU64,
}

/// A pending write; await it to know it is durable.
#[derive(Debug)]
pub struct Pending(Option<oneshot::Receiver<Result<(), PersistError>>>);

impl Pending {
    pub async fn durable(self) -> Result<(), PersistError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or_else(|_| Err(PersistError::Failed("writer task ended".into()))),
        }
    }
}

impl Persister {
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(PersistStats::default());
        tokio::spawn(run(store, rx, failed.clone(), stats.clone()));
        Persister { tx, failed, stats }
    }

    /// Queue `ops`; order among calls is the order of this call.
    pub fn enqueue(&self, ops: Vec<Op>) -> Pending {
        if ops.is_empty() {
            return Pending(None);
        }
        let (done, rx) = oneshot::channel();
        if self.tx.send(Batch { ops, done }).is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        Pending(Some(rx))
    }

    /// Resolves once everything enqueued before it is durable: lets a reader
    /// hand out only state that a crash cannot take back.
    pub fn barrier(&self) -> Pending {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Batch { ops: Vec::new(), done }).is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        Pending(Some(rx))
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    failed: Arc<AtomicBool>,
    stats: Arc<PersistStats>,
) {
    while let Some(first) = rx.recv().await {
        let mut batches = vec![first];
        let mut n = batches[0].ops.len();
        while n < MAX_OPS_PER_COMMIT {
            match rx.try_recv() {
                Ok(b) => {
                    n += b.ops.len();
                    batches.push(b);
                }
                Err(_) => break,
            }
        }
        let result = if failed.load(Ordering::SeqCst) {
            Err(PersistError::Failed("an earlier write failed".into()))
        } else if n == 0 {
            // Only barriers: everything before them has been answered.
            Ok(())
        } else {
            let ops: Vec<Op> = batches.iter_mut().flat_map(|b| std::mem::take(&mut b.ops)).collect();
            let started = std::time::Instant::now();
            let r = store.txn(ops).await;
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.ops.fetch_add(n as u64, Ordering::Relaxed);
            stats.commit_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            r.map(|_| ()).map_err(|e| {
                tracing::error!(error = %e, "state store write failed; refusing further writes");
                failed.store(true, Ordering::SeqCst);
                PersistError::Failed(e.to_string())
            })
        };
        for b in batches {
            let _ = b.done.send(result.clone());
        }
    }
}
