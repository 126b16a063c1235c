//! The embedded store: the shared conformance suite, plus what only a
//! file-backed store has (reopening, schema versions, bounded history).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drove_store::conformance::next_event;
use drove_store::embedded::{EmbeddedOptions, EmbeddedStore, SCHEMA_VERSION};
use drove_store::{Op, Precondition, Store, StoreError};
use tempfile::TempDir;

drove_store::conformance_tests!(conformance, || async {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    (store, dir)
});

fn store_file() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    (dir, path)
}

#[tokio::test]
async fn reopen_keeps_keys_and_continues_revisions() {
    let (_dir, path) = store_file();
    let store = EmbeddedStore::open(&path).unwrap();
    let ra = store.put("a", b"1".to_vec(), Precondition::Absent).await.unwrap();
    let rb = store.put("b", b"2".to_vec(), Precondition::Any).await.unwrap();
    let ra2 = store.put("a", b"3".to_vec(), Precondition::Revision(ra)).await.unwrap();
    let rc = store.put("c", b"4".to_vec(), Precondition::Any).await.unwrap();
    let rd = store.delete("c", Precondition::Revision(rc)).await.unwrap();
    let (before, at) = store.list("").await.unwrap();
    drop(store);

    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), rd);
    assert_eq!(store.list("").await.unwrap(), (before.clone(), at));
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!((a.value, a.create_revision, a.mod_revision), (b"3".to_vec(), ra, ra2));
    assert_eq!(store.get("b").await.unwrap().unwrap().mod_revision, rb);
    assert_eq!(store.get("c").await.unwrap(), None);

    // Revisions continue where they stopped, and CAS on a pre-restart
    // revision still works.
    let next = store.put("a", b"5".to_vec(), Precondition::Revision(ra2)).await.unwrap();
    assert_eq!(next, rd + 1);
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision), (ra, next));
}

#[tokio::test]
async fn history_does_not_survive_a_restart() {
    let (_dir, path) = store_file();
    let store = EmbeddedStore::open(&path).unwrap();
    let r1 = store.put("k/a", b"1".to_vec(), Precondition::Any).await.unwrap();
    let r2 = store.put("k/a", b"2".to_vec(), Precondition::Any).await.unwrap();
    drop(store);

    let store = EmbeddedStore::open(&path).unwrap();
    for from in [0, r1, r2] {
        match store.watch("k/", Some(from)).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (from, r2 + 1))
            }
            other => panic!("watch from {from} after restart: expected Compacted, got {other:?}"),
        }
    }
    let mut watch = store.watch("k/", Some(r2 + 1)).await.unwrap();
    let r3 = store.put("k/a", b"3".to_vec(), Precondition::Any).await.unwrap();
    assert_eq!(next_event(&mut watch).await.revision(), r3);
}

#[tokio::test]
async fn a_fresh_store_replays_from_revision_zero() {
    let (_dir, path) = store_file();
    let store = EmbeddedStore::open(&path).unwrap();
    let r1 = store.put("k", b"1".to_vec(), Precondition::Any).await.unwrap();
    let mut watch = store.watch("", Some(0)).await.unwrap();
    assert_eq!(next_event(&mut watch).await.revision(), r1);
}

#[tokio::test]
async fn a_schema_from_the_future_is_refused() {
    let (_dir, path) = store_file();
    drop(EmbeddedStore::open(&path).unwrap());
    {
        // The on-disk layout documented in drove_store::embedded.
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .unwrap()
            .insert("schema_version", u64::from(SCHEMA_VERSION) + 1)
            .unwrap();
        tx.commit().unwrap();
    }
    match EmbeddedStore::open(&path) {
        Err(StoreError::SchemaVersion { path: p, found, supported }) => {
            assert_eq!((p, found, supported), (path.display().to_string(), SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected SchemaVersion, got {other:?}"),
    }
}

#[tokio::test]
async fn another_programs_redb_file_is_refused_and_left_alone() {
    let (_dir, path) = store_file();
    let foreign = redb::TableDefinition::<&str, &str>::new("theirs");
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(foreign).unwrap().insert("x", "y").unwrap();
        tx.commit().unwrap();
    }
    assert!(matches!(EmbeddedStore::open(&path), Err(StoreError::SchemaVersion { found: 0, .. })));
    let db = redb::Database::create(&path).unwrap();
    let tx = db.begin_read().unwrap();
    let tables: Vec<String> = tx.list_tables().unwrap().map(|t| redb::TableHandle::name(&t).to_owned()).collect();
    assert_eq!(tables, ["theirs"], "refusing the file must not add our tables to it");
}

#[tokio::test]
async fn open_errors_name_the_path() {
    let (dir, path) = store_file();
    std::fs::write(&path, b"this is not a redb file, just some text that is long enough").unwrap();
    let garbage = EmbeddedStore::open(&path).unwrap_err();
    assert!(matches!(&garbage, StoreError::Open { path: p, .. } if *p == path.display().to_string()), "{garbage:?}");

    let missing = dir.path().join("no/such/dir/store.redb");
    let err = EmbeddedStore::open(&missing).unwrap_err();
    assert!(err.to_string().contains("no/such/dir/store.redb"), "{err}");
}

#[tokio::test]
async fn a_second_open_of_the_same_file_fails() {
    let (_dir, path) = store_file();
    let _first = EmbeddedStore::open(&path).unwrap();
    assert!(matches!(EmbeddedStore::open(&path), Err(StoreError::Open { .. })));
}

#[tokio::test]
async fn history_is_bounded_by_its_capacity() {
    let (_dir, path) = store_file();
    let options = EmbeddedOptions { watch_history: 5, ..EmbeddedOptions::default() };
    let store = EmbeddedStore::open_with(&path, options).unwrap();
    let put = |key: &'static str| store.put(key, b"v".to_vec(), Precondition::Any);
    let compacted_to = |result: Result<_, StoreError>| match result {
        Err(StoreError::Compacted { oldest, .. }) => oldest,
        other => panic!("expected Compacted, got {other:?}"),
    };

    let r1 = put("k/1").await.unwrap();
    let r2 = put("k/2").await.unwrap();
    let r3 = put("k/3").await.unwrap();
    let r4 = put("k/4").await.unwrap();
    let three =
        (0..3).map(|i| Op::Put { key: format!("t/{i}"), value: b"v".to_vec(), precondition: Precondition::Any });
    let rt = store.txn(three.collect()).await.unwrap();
    // Seven events for five slots: r1 and r2 are gone.
    assert_eq!(compacted_to(store.watch("", Some(r2)).await), r3);
    let mut watch = store.watch("", Some(r3)).await.unwrap();
    let replayed: Vec<_> = [next_event(&mut watch).await, next_event(&mut watch).await].map(|e| e.revision()).to_vec();
    assert_eq!(replayed, [r3, r4]);
    assert_eq!(r1 + 1, r2);

    put("k/5").await.unwrap();
    put("k/6").await.unwrap();
    assert_eq!(compacted_to(store.watch("", Some(r4)).await), rt);
    put("k/7").await.unwrap();
    // That evicted one of rt's three events. The other two are still held,
    // but a partial transaction is not replayable.
    assert_eq!(compacted_to(store.watch("t/", Some(rt)).await), rt + 1);
    let mut watch = store.watch("k/", Some(rt + 1)).await.unwrap();
    assert_eq!(next_event(&mut watch).await.key(), "k/5");
}

#[tokio::test]
async fn a_lagging_watcher_is_dropped_and_never_blocks_writers() {
    let (_dir, path) = store_file();
    let options = EmbeddedOptions { watch_buffer: 4, ..EmbeddedOptions::default() };
    let store = EmbeddedStore::open_with(&path, options).unwrap();
    let mut slow = store.watch("k/", None).await.unwrap();
    let mut revisions = Vec::new();
    for i in 0..10 {
        // Would hang here if a full watcher could hold up a writer.
        revisions.push(store.put(&format!("k/{i}"), b"v".to_vec(), Precondition::Any).await.unwrap());
    }
    for &r in &revisions[..4] {
        assert_eq!(next_event(&mut slow).await.revision(), r);
    }
    match slow.next().await {
        Some(Err(StoreError::WatchLagged { prefix, next })) => {
            assert_eq!((prefix.as_str(), next), ("k/", revisions[4]))
        }
        other => panic!("expected WatchLagged, got {other:?}"),
    }
    assert!(slow.next().await.is_none(), "the lagging watcher is closed after its error");

    // Resuming from `next` picks up exactly where it broke off.
    let mut resumed = store.watch("k/", Some(revisions[4])).await.unwrap();
    for &r in &revisions[4..] {
        assert_eq!(next_event(&mut resumed).await.revision(), r);
    }
}

#[tokio::test]
async fn watches_end_when_the_store_is_dropped() {
    let (_dir, path) = store_file();
    let store = EmbeddedStore::open(&path).unwrap();
    let mut watch = store.watch("", None).await.unwrap();
    let r = store.put("k", b"v".to_vec(), Precondition::Any).await.unwrap();
    drop(store);
    assert_eq!(next_event(&mut watch).await.revision(), r, "events sent before the drop still arrive");
    assert!(watch.next().await.is_none());
}

/// Also covers `run_all`, the macro-free way to run the suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arc_dyn_store_passes_the_suite_too() {
    drove_store::conformance::run_all(|| async {
        let (dir, path) = store_file();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
        (store, dir)
    })
    .await;
}

/// Not a benchmark: a guard against accidentally quadratic reads, with a
/// bound far above the expected few milliseconds so it cannot flake.
#[tokio::test]
async fn listing_ten_thousand_keys_is_fast() {
    let (_dir, path) = store_file();
    let store = EmbeddedStore::open(&path).unwrap();
    let value = vec![b'x'; 500];
    let ops = (0..10_000)
        .map(|i| Op::Put { key: format!("guests/{i:05}"), value: value.clone(), precondition: Precondition::Any })
        .collect();
    store.txn(ops).await.unwrap();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let (listed, _) = store.list("guests/").await.unwrap();
        best = best.min(started.elapsed());
        assert_eq!(listed.len(), 10_000);
    }
    println!("list of 10,000 keys of 500 bytes: {best:?}");
    assert!(best < Duration::from_secs(1), "listing 10,000 keys took {best:?}");
}
