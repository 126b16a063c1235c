//! The behaviour every [`Store`] implementation must show, as a test suite.
//!
//! Each property is a public `async fn` taking a fresh, empty store. It uses
//! only the [`Store`] trait, so the embedded store and the etcd store are held
//! to the same contract. Wire it up once per implementation:
//!
//! ```no_run
//! use drove_store::embedded::EmbeddedStore;
//!
//! drove_store::conformance_tests!(embedded, || async {
//!     let dir = tempfile::tempdir().expect("temp dir");
//!     let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("open");
//!     (store, dir) // the second part is kept alive until the test ends
//! });
//! # fn main() {}
//! ```
//!
//! This expands to one `#[test]` per property inside `mod embedded`, each on
//! its own multi-threaded tokio runtime; [`run_all`] runs them in sequence
//! instead.
//!
//! Properties that wait for watch events give up after [`EVENT_TIMEOUT`], so
//! a missing event fails the test rather than hanging it. "No event was
//! delivered" is checked by writing a sentinel afterwards and asserting it is
//! the next event, never by sleeping.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::{Event, KeyValue, Op, Precondition, Revision, Store, StoreError, Watch};

/// How long a property waits for an event it expects.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Expand to one `#[test]` per conformance property in a module `$name`.
///
/// `$make` is a closure returning a future of `(store, guard)`: a fresh,
/// empty store and whatever must outlive it (a temp dir, a server process).
/// It is evaluated inside the module, which glob-imports its parent.
#[macro_export]
macro_rules! conformance_tests {
    ($name:ident, $make:expr $(,)?) => {
        $crate::__conformance_properties!($crate::__conformance_module { $name, $make });
    };
}

/// The one list of properties, handed to `$callback`.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_properties {
    ($callback:path { $($args:tt)* }) => {
        $callback! { $($args)*;
            get_put_delete,
            create_and_mod_revisions,
            revisions_increase,
            list_by_prefix,
            list_snapshot_revision,
            precondition_any,
            precondition_absent,
            precondition_revision,
            failed_txn_writes_nothing,
            delete_absent_is_noop,
            multi_op_txn_is_atomic,
            preconditions_see_earlier_ops,
            watch_live,
            watch_none_starts_after_call,
            watch_replay_from_revision,
            watch_prefix_filtering,
            watch_compacted,
            watch_subscribe_during_writes_has_no_gaps,
            concurrent_cas_increments,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_module {
    ($name:ident, $make:expr; $($property:ident,)*) => {
        #[cfg(test)]
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[test]
                fn $property() {
                    $crate::conformance::block_on(async {
                        let make = $make;
                        let (store, guard) = make().await;
                        $crate::conformance::$property(store).await;
                        drop(guard);
                    });
                }
            )*
        }
    };
}

macro_rules! run_each {
    ($make:ident; $($property:ident,)*) => {
        $(
            tracing::info!(property = stringify!($property), "store conformance");
            let (store, guard) = $make().await;
            $property(store).await;
            drop(guard);
        )*
    };
}

/// Run every property in sequence, each on a fresh store from `make`.
pub async fn run_all<S, G, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = (S, G)>,
{
    crate::__conformance_properties!(run_each { make });
}

/// Run `future` to completion on a fresh multi-threaded runtime; what the
/// generated tests use, so callers need no tokio attribute of their own.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime for a conformance test")
        .block_on(future)
}

// ---------------------------------------------------------------------------
// Helpers

fn put(key: &str, value: &[u8], precondition: Precondition) -> Op {
    Op::Put { key: key.to_owned(), value: value.to_vec(), precondition }
}

fn delete(key: &str, precondition: Precondition) -> Op {
    Op::Delete { key: key.to_owned(), precondition }
}

async fn must_put<S: Store + ?Sized>(store: &S, key: &str, value: &[u8]) -> Revision {
    store.put(key, value.to_vec(), Precondition::Any).await.unwrap_or_else(|e| panic!("put {key:?}: {e}"))
}

async fn must_get<S: Store + ?Sized>(store: &S, key: &str) -> Option<KeyValue> {
    store.get(key).await.unwrap_or_else(|e| panic!("get {key:?}: {e}"))
}

async fn must_revision<S: Store + ?Sized>(store: &S) -> Revision {
    store.revision().await.unwrap_or_else(|e| panic!("revision: {e}"))
}

async fn must_watch<S: Store + ?Sized>(store: &S, prefix: &str, from: Option<Revision>) -> Watch {
    store.watch(prefix, from).await.unwrap_or_else(|e| panic!("watch {prefix:?} from {from:?}: {e}"))
}

/// The next event, failing the test on error, end of stream or timeout.
pub async fn next_event(watch: &mut Watch) -> Event {
    match tokio::time::timeout(EVENT_TIMEOUT, watch.next()).await {
        Err(_) => panic!("no watch event within {EVENT_TIMEOUT:?}"),
        Ok(None) => panic!("watch ended unexpectedly"),
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(Some(Ok(event))) => event,
    }
}

fn kv(key: &str, value: &[u8], create_revision: Revision, mod_revision: Revision) -> KeyValue {
    KeyValue { key: key.to_owned(), value: value.to_vec(), create_revision, mod_revision }
}

fn put_event(key: &str, value: &[u8], create_revision: Revision, mod_revision: Revision) -> Event {
    Event::Put(kv(key, value, create_revision, mod_revision))
}

fn delete_event(key: &str, revision: Revision) -> Event {
    Event::Delete { key: key.to_owned(), revision }
}

#[track_caller]
fn assert_precondition_failed<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    key: &str,
    expected: Precondition,
    found: Option<Revision>,
) {
    match result {
        Err(StoreError::PreconditionFailed { key: k, expected: e, found: f }) => {
            assert_eq!((k.as_str(), e, f), (key, expected, found), "precondition failure details");
        }
        other => panic!("expected PreconditionFailed on {key:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Properties: keys and revisions

/// Put, overwrite and delete one key; each write returns the revision that
/// `get` then reports.
pub async fn get_put_delete<S: Store>(store: S) {
    assert_eq!(must_get(&store, "a").await, None);
    let r1 = must_put(&store, "a", b"1").await;
    assert!(r1 > 0, "first write gets a revision above 0");
    assert_eq!(must_get(&store, "a").await, Some(kv("a", b"1", r1, r1)));
    let r2 = must_put(&store, "a", b"2").await;
    assert!(r2 > r1);
    assert_eq!(must_get(&store, "a").await, Some(kv("a", b"2", r1, r2)));
    let r3 = store.delete("a", Precondition::Any).await.expect("delete");
    assert!(r3 > r2);
    assert_eq!(must_get(&store, "a").await, None);
    assert_eq!(must_revision(&store).await, r3);
    // Empty values and keys with odd characters are ordinary.
    let r4 = must_put(&store, "a/ü b\n", b"").await;
    assert_eq!(must_get(&store, "a/ü b\n").await, Some(kv("a/ü b\n", b"", r4, r4)));
}

/// `create_revision` survives overwrites and restarts when a key is
/// recreated; `mod_revision` follows every write.
pub async fn create_and_mod_revisions<S: Store>(store: S) {
    let ra = must_put(&store, "a", b"1").await;
    let rb = must_put(&store, "b", b"1").await;
    let ra2 = must_put(&store, "a", b"2").await;
    assert_eq!(must_get(&store, "a").await, Some(kv("a", b"2", ra, ra2)));
    assert_eq!(must_get(&store, "b").await, Some(kv("b", b"1", rb, rb)));
    // Rewriting the same value is still a write.
    let ra3 = must_put(&store, "a", b"2").await;
    assert!(ra3 > ra2);
    assert_eq!(must_get(&store, "a").await, Some(kv("a", b"2", ra, ra3)));
    store.delete("a", Precondition::Any).await.expect("delete a");
    let ra4 = must_put(&store, "a", b"3").await;
    assert_eq!(must_get(&store, "a").await, Some(kv("a", b"3", ra4, ra4)));
}

/// Every effective write gets a higher revision than the one before, and
/// `revision()` reports the latest.
pub async fn revisions_increase<S: Store>(store: S) {
    let mut last = must_revision(&store).await;
    for i in 0..20 {
        let r = must_put(&store, &format!("k{}", i % 3), b"v").await;
        assert!(r > last, "write {i} got revision {r}, not above {last}");
        assert_eq!(must_revision(&store).await, r);
        last = r;
    }
}

/// `list` returns exactly the keys under the prefix, sorted bytewise.
pub async fn list_by_prefix<S: Store>(store: S) {
    let keys = ["app/b", "app/a", "app/c/d", "app/B", "apq", "ap", "app", "other/x", "app/a0"];
    for key in keys {
        must_put(&store, key, key.as_bytes()).await;
    }
    let (listed, _) = store.list("app/").await.expect("list app/");
    let names: Vec<&str> = listed.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(names, ["app/B", "app/a", "app/a0", "app/b", "app/c/d"]);
    for kv in &listed {
        assert_eq!(Some(kv.clone()), must_get(&store, &kv.key).await, "list agrees with get");
    }

    let (all, _) = store.list("").await.expect("list everything");
    let mut expected: Vec<&str> = keys.to_vec();
    expected.sort_unstable();
    assert_eq!(all.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), expected);

    let (none, _) = store.list("zzz").await.expect("list zzz");
    assert!(none.is_empty());
    let (exact, _) = store.list("app/c/d").await.expect("list one key");
    assert_eq!(exact.len(), 1);
}

/// The revision `list` returns is the store revision its snapshot reflects.
pub async fn list_snapshot_revision<S: Store>(store: S) {
    let (empty, r0) = store.list("").await.expect("list empty store");
    assert!(empty.is_empty());
    assert_eq!(r0, must_revision(&store).await);
    must_put(&store, "s/x", b"1").await;
    let r = must_put(&store, "s/y", b"1").await;
    assert_eq!(store.list("s/").await.expect("list").1, r);
    // Writes outside the prefix still move the snapshot revision.
    let r = must_put(&store, "t/z", b"1").await;
    let (listed, at) = store.list("s/").await.expect("list");
    assert_eq!((listed.len(), at), (2, r));
    let r = store.delete("s/x", Precondition::Any).await.expect("delete");
    let (listed, at) = store.list("s/").await.expect("list");
    assert_eq!((listed.len(), at), (1, r));
}

// ---------------------------------------------------------------------------
// Properties: preconditions and transactions

/// `Any` holds whether or not the key exists.
pub async fn precondition_any<S: Store>(store: S) {
    let r1 = store.put("k", b"1".to_vec(), Precondition::Any).await.expect("put absent key");
    let r2 = store.put("k", b"2".to_vec(), Precondition::Any).await.expect("put present key");
    assert_eq!(must_get(&store, "k").await, Some(kv("k", b"2", r1, r2)));
    store.delete("k", Precondition::Any).await.expect("delete present key");
    assert_eq!(must_get(&store, "k").await, None);
}

/// `Absent` holds only while the key does not exist.
pub async fn precondition_absent<S: Store>(store: S) {
    let r1 = store.put("k", b"1".to_vec(), Precondition::Absent).await.expect("create");
    let result = store.put("k", b"2".to_vec(), Precondition::Absent).await;
    assert_precondition_failed(result, "k", Precondition::Absent, Some(r1));
    let result = store.delete("k", Precondition::Absent).await;
    assert_precondition_failed(result, "k", Precondition::Absent, Some(r1));
    assert_eq!(must_get(&store, "k").await, Some(kv("k", b"1", r1, r1)));
    assert_eq!(must_revision(&store).await, r1, "failed writes do not bump the revision");

    store.delete("k", Precondition::Any).await.expect("delete");
    let r3 = store.put("k", b"3".to_vec(), Precondition::Absent).await.expect("recreate");
    assert_eq!(must_get(&store, "k").await, Some(kv("k", b"3", r3, r3)));
}

/// `Revision(r)` holds only if the key exists with `mod_revision == r`.
pub async fn precondition_revision<S: Store>(store: S) {
    let result = store.put("k", b"1".to_vec(), Precondition::Revision(1)).await;
    assert_precondition_failed(result, "k", Precondition::Revision(1), None);
    let result = store.put("k", b"1".to_vec(), Precondition::Revision(0)).await;
    assert_precondition_failed(result, "k", Precondition::Revision(0), None);
    assert_eq!(must_get(&store, "k").await, None);

    let r1 = must_put(&store, "k", b"1").await;
    let r2 = store.put("k", b"2".to_vec(), Precondition::Revision(r1)).await.expect("CAS on current revision");
    let result = store.put("k", b"3".to_vec(), Precondition::Revision(r1)).await;
    assert_precondition_failed(result, "k", Precondition::Revision(r1), Some(r2));
    let result = store.delete("k", Precondition::Revision(r1)).await;
    assert_precondition_failed(result, "k", Precondition::Revision(r1), Some(r2));
    assert_eq!(must_get(&store, "k").await, Some(kv("k", b"2", r1, r2)));

    store.delete("k", Precondition::Revision(r2)).await.expect("delete on current revision");
    assert_eq!(must_get(&store, "k").await, None);
    let result = store.delete("k", Precondition::Revision(r2)).await;
    assert_precondition_failed(result, "k", Precondition::Revision(r2), None);
}

/// A transaction whose last op fails leaves no trace: not its earlier ops,
/// not a revision bump, not a watch event.
pub async fn failed_txn_writes_nothing<S: Store>(store: S) {
    let rx = must_put(&store, "f/x", b"old").await;
    let rw = must_put(&store, "f/w", b"old").await;
    let mut watch = must_watch(&store, "f/", None).await;

    let result = store
        .txn(vec![
            put("f/y", b"new", Precondition::Any),
            put("f/x", b"new", Precondition::Revision(rx)),
            delete("f/x", Precondition::Any),
            put("f/w", b"new", Precondition::Absent),
        ])
        .await;
    assert_precondition_failed(result, "f/w", Precondition::Absent, Some(rw));
    assert_eq!(must_get(&store, "f/y").await, None);
    assert_eq!(must_get(&store, "f/x").await, Some(kv("f/x", b"old", rx, rx)));
    assert_eq!(must_get(&store, "f/w").await, Some(kv("f/w", b"old", rw, rw)));
    assert_eq!(must_revision(&store).await, rw);

    let sentinel = must_put(&store, "f/sentinel", b"").await;
    assert_eq!(next_event(&mut watch).await, put_event("f/sentinel", b"", sentinel, sentinel));
}

/// Deleting an absent key with `Any` or `Absent` changes nothing and returns
/// the current revision; with `Revision` it fails.
pub async fn delete_absent_is_noop<S: Store>(store: S) {
    let empty = store.delete("d/nope", Precondition::Any).await.expect("delete on empty store");
    assert_eq!(empty, must_revision(&store).await);

    let r = must_put(&store, "d/x", b"1").await;
    let mut watch = must_watch(&store, "d/", None).await;
    assert_eq!(store.delete("d/nope", Precondition::Any).await.expect("delete absent"), r);
    assert_eq!(store.delete("d/nope", Precondition::Absent).await.expect("delete absent, Absent"), r);
    let noops = vec![delete("d/a", Precondition::Any), delete("d/b", Precondition::Absent)];
    assert_eq!(store.txn(noops).await.expect("txn of no-op deletes"), r);
    assert_eq!(store.txn(Vec::new()).await.expect("empty txn"), r);
    assert_eq!(must_revision(&store).await, r);
    let result = store.delete("d/nope", Precondition::Revision(r)).await;
    assert_precondition_failed(result, "d/nope", Precondition::Revision(r), None);

    // Deleting the same key twice in one txn: the second delete is a no-op.
    let rd = store.txn(vec![delete("d/x", Precondition::Any), delete("d/x", Precondition::Any)]).await.expect("txn");
    assert!(rd > r);
    assert_eq!(next_event(&mut watch).await, delete_event("d/x", rd));
    let sentinel = must_put(&store, "d/sentinel", b"").await;
    assert_eq!(next_event(&mut watch).await, put_event("d/sentinel", b"", sentinel, sentinel));
}

/// All ops of a transaction share one new revision, apply in order, and
/// reach watchers in op order.
pub async fn multi_op_txn_is_atomic<S: Store>(store: S) {
    let rc = must_put(&store, "m/c", b"c").await;
    let re = must_put(&store, "m/e", b"e").await;
    let mut watch = must_watch(&store, "m/", None).await;
    let r = store
        .txn(vec![
            put("m/a", b"a", Precondition::Absent),
            put("m/b", b"b", Precondition::Any),
            delete("m/c", Precondition::Revision(rc)),
            put("m/e", b"e2", Precondition::Revision(re)),
            put("m/a", b"a2", Precondition::Any),
        ])
        .await
        .expect("txn");
    assert!(r > re);
    assert_eq!(must_revision(&store).await, r);
    let (listed, at) = store.list("m/").await.expect("list");
    assert_eq!(at, r);
    assert_eq!(listed, vec![kv("m/a", b"a2", r, r), kv("m/b", b"b", r, r), kv("m/e", b"e2", re, r)]);
    let expected = [
        put_event("m/a", b"a", r, r),
        put_event("m/b", b"b", r, r),
        delete_event("m/c", r),
        put_event("m/e", b"e2", re, r),
        put_event("m/a", b"a2", r, r),
    ];
    for want in expected {
        assert_eq!(next_event(&mut watch).await, want);
    }
}

/// Preconditions are checked against the state as the transaction's own
/// earlier ops left it.
pub async fn preconditions_see_earlier_ops<S: Store>(store: S) {
    let result = store.txn(vec![put("p/k", b"1", Precondition::Absent), put("p/k", b"2", Precondition::Absent)]).await;
    match result {
        Err(StoreError::PreconditionFailed { key, expected, found }) => {
            assert_eq!((key.as_str(), expected), ("p/k", Precondition::Absent));
            assert!(found.is_some(), "the failure reports the key the txn itself created");
        }
        other => panic!("expected PreconditionFailed on p/k, got {other:?}"),
    }
    assert_eq!(must_get(&store, "p/k").await, None);

    // Delete then recreate in one txn: the recreation starts a new life.
    let re = must_put(&store, "p/e", b"1").await;
    let r = store
        .txn(vec![delete("p/e", Precondition::Revision(re)), put("p/e", b"2", Precondition::Absent)])
        .await
        .expect("delete and recreate");
    assert_eq!(must_get(&store, "p/e").await, Some(kv("p/e", b"2", r, r)));

    // After an earlier op modified the key, its old revision no longer holds.
    let rm = must_put(&store, "p/m", b"1").await;
    let result =
        store.txn(vec![put("p/m", b"2", Precondition::Any), put("p/m", b"3", Precondition::Revision(rm))]).await;
    match result {
        Err(StoreError::PreconditionFailed { key, expected, found }) => {
            assert_eq!((key.as_str(), expected), ("p/m", Precondition::Revision(rm)));
            assert_ne!(found, Some(rm), "the failure reports the txn's own modification");
        }
        other => panic!("expected PreconditionFailed on p/m, got {other:?}"),
    }
    assert_eq!(must_get(&store, "p/m").await, Some(kv("p/m", b"1", rm, rm)));

    // After an earlier op deleted the key, `Absent` holds.
    let rn = must_put(&store, "p/n", b"1").await;
    let r = store
        .txn(vec![delete("p/n", Precondition::Any), delete("p/n", Precondition::Absent)])
        .await
        .expect("delete, then delete-if-absent");
    assert!(r > rn);
    assert_eq!(must_get(&store, "p/n").await, None);
}

// ---------------------------------------------------------------------------
// Properties: watches

/// A live watch sees puts and deletes with their revisions.
pub async fn watch_live<S: Store>(store: S) {
    let mut watch = must_watch(&store, "w/", None).await;
    let r1 = must_put(&store, "w/a", b"1").await;
    let r2 = must_put(&store, "w/a", b"2").await;
    let r3 = store.delete("w/a", Precondition::Any).await.expect("delete");
    let r4 = must_put(&store, "w/a", b"3").await;
    for want in [
        put_event("w/a", b"1", r1, r1),
        put_event("w/a", b"2", r1, r2),
        delete_event("w/a", r3),
        put_event("w/a", b"3", r4, r4),
    ] {
        let got = next_event(&mut watch).await;
        assert_eq!(got.key(), "w/a");
        assert_eq!(got.revision(), want.revision());
        assert_eq!(got, want);
    }
}

/// `from = None` delivers only what is written after the call.
pub async fn watch_none_starts_after_call<S: Store>(store: S) {
    must_put(&store, "n/old", b"1").await;
    must_put(&store, "n/old", b"2").await;
    let mut watch = must_watch(&store, "n/", None).await;
    let r = must_put(&store, "n/new", b"1").await;
    assert_eq!(next_event(&mut watch).await, put_event("n/new", b"1", r, r));
}

/// `from = Some(r)` replays from `r`, then continues live.
pub async fn watch_replay_from_revision<S: Store>(store: S) {
    let r1 = must_put(&store, "h/a", b"1").await;
    let r2 = must_put(&store, "h/b", b"2").await;
    let r3 = store.delete("h/a", Precondition::Any).await.expect("delete");
    let history = [put_event("h/a", b"1", r1, r1), put_event("h/b", b"2", r2, r2), delete_event("h/a", r3)];

    let mut from_r2 = must_watch(&store, "h/", Some(r2)).await;
    let mut from_r1 = must_watch(&store, "h/", Some(r1)).await;
    let mut from_next = must_watch(&store, "h/", Some(r3 + 1)).await;
    for want in &history[1..] {
        assert_eq!(&next_event(&mut from_r2).await, want);
    }
    for want in &history {
        assert_eq!(&next_event(&mut from_r1).await, want);
    }
    let r4 = must_put(&store, "h/c", b"3").await;
    let live = put_event("h/c", b"3", r4, r4);
    for watch in [&mut from_r2, &mut from_r1, &mut from_next] {
        assert_eq!(next_event(watch).await, live);
    }
}

/// A watch sees only keys under its prefix (a plain string prefix, not a
/// path component).
pub async fn watch_prefix_filtering<S: Store>(store: S) {
    let mut watch = must_watch(&store, "p/", None).await;
    let mut all = must_watch(&store, "", None).await;
    let mut written = Vec::new();
    for key in ["p", "q/x", "p/x", "pp/x", "p/", "p/y/z"] {
        let r = must_put(&store, key, b"v").await;
        written.push(put_event(key, b"v", r, r));
    }
    let r = store.txn(vec![delete("q/x", Precondition::Any), delete("p/x", Precondition::Any)]).await.expect("txn");
    written.push(delete_event("q/x", r));
    written.push(delete_event("p/x", r));
    let rs = must_put(&store, "p/sentinel", b"").await;
    written.push(put_event("p/sentinel", b"", rs, rs));

    for want in written.iter().filter(|e| e.key().starts_with("p/")) {
        assert_eq!(&next_event(&mut watch).await, want);
    }
    for want in &written {
        assert_eq!(&next_event(&mut all).await, want);
    }
}

/// After `compact(r)`, watching from before `r` fails with `Compacted`; from
/// later still works.
pub async fn watch_compacted<S: Store>(store: S) {
    let r1 = must_put(&store, "c/a", b"1").await;
    let r2 = must_put(&store, "c/b", b"2").await;
    let r3 = must_put(&store, "c/c", b"3").await;
    store.compact(r2).await.expect("compact");
    match store.watch("c/", Some(r1)).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, r1);
            assert!(oldest > r1 && oldest <= r3 + 1, "oldest watchable revision {oldest}");
        }
        other => panic!("expected Compacted for a watch from {r1}, got {other:?}"),
    }
    let mut watch = must_watch(&store, "c/", Some(r3)).await;
    assert_eq!(next_event(&mut watch).await, put_event("c/c", b"3", r3, r3));
    // Compaction leaves the data alone.
    assert_eq!(must_get(&store, "c/a").await, Some(kv("c/a", b"1", r1, r1)));
}

/// Watches opened while another task writes see an unbroken run of events:
/// replay and live delivery meet without a gap or a duplicate.
pub async fn watch_subscribe_during_writes_has_no_gaps<S: Store>(store: S) {
    const WRITES: usize = 300;
    let key = |i: usize| format!("g/{}", i % 7);
    let store = Arc::new(store);
    let writer = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            let mut revisions = Vec::with_capacity(WRITES + 1);
            for i in 0..WRITES {
                revisions.push(must_put(&*store, &key(i), i.to_string().as_bytes()).await);
            }
            revisions
        }
    });

    // Each watch with the bounds of where its stream must begin: its first
    // event is the first write at or after `low`, and the write before that
    // is below `high`. They differ only for `None`, which may start anywhere
    // between the revisions read just before and just after the call.
    let mut watches: Vec<(Watch, Revision, Revision)> = Vec::new();
    let mut last_seen = None;
    let mut replaying = false;
    while !writer.is_finished() {
        let before = must_revision(&*store).await;
        if last_seen != Some(before) {
            last_seen = Some(before);
            replaying = !replaying;
            if replaying {
                let from = before.max(1);
                watches.push((must_watch(&*store, "g/", Some(from)).await, from, from));
            } else {
                let watch = must_watch(&*store, "g/", None).await;
                let after = must_revision(&*store).await;
                watches.push((watch, before + 1, after + 1));
            }
        }
        tokio::task::yield_now().await;
    }
    let mut revisions = writer.await.expect("writer task");
    // Every watch, even one opened after the last write, ends on this one.
    revisions.push(must_put(&*store, &key(WRITES), WRITES.to_string().as_bytes()).await);
    let last = revisions[WRITES];
    assert!(!watches.is_empty());

    for (mut watch, low, high) in watches {
        let mut got = Vec::new();
        while got.last().is_none_or(|e: &Event| e.revision() < last) {
            got.push(next_event(&mut watch).await);
        }
        assert!(
            got.len() <= revisions.len(),
            "watch from {low}..{high} got {} events for {} writes",
            got.len(),
            revisions.len()
        );
        let start = revisions.len() - got.len();
        let got_revisions: Vec<Revision> = got.iter().map(Event::revision).collect();
        assert_eq!(got_revisions, revisions[start..], "watch from {low}..{high}: a gap or a duplicate");
        assert!(revisions[start] >= low, "watch from {low}..{high} replayed revision {}", revisions[start]);
        assert!(
            start == 0 || revisions[start - 1] < high,
            "watch from {low}..{high} missed revision {}",
            revisions[start - 1]
        );
        for (event, i) in got.iter().zip(start..) {
            match event {
                Event::Put(kv) => assert_eq!((kv.key.clone(), kv.value.clone()), (key(i), i.to_string().into_bytes())),
                Event::Delete { .. } => panic!("unexpected delete event {event:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Properties: concurrency

/// Many tasks race compare-and-swap increments of one counter: every
/// revision has exactly one winner and no increment is lost.
pub async fn concurrent_cas_increments<S: Store>(store: S) {
    const TASKS: usize = 8;
    const ATTEMPTS: usize = 25;
    let store = Arc::new(store);

    // Creation races too: exactly one `Absent` put wins.
    let creators: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.put("counter", b"0".to_vec(), Precondition::Absent).await })
        })
        .collect();
    let mut created = 0;
    for creator in creators {
        match creator.await.expect("creator task") {
            Ok(_) => created += 1,
            Err(StoreError::PreconditionFailed { .. }) => {}
            Err(e) => panic!("unexpected error creating the counter: {e}"),
        }
    }
    assert_eq!(created, 1, "exactly one creator wins");

    let workers: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut wins = Vec::new();
                for _ in 0..ATTEMPTS {
                    let current = must_get(&*store, "counter").await.expect("counter exists");
                    let n: u64 = std::str::from_utf8(&current.value).expect("utf-8").parse().expect("a number");
                    let next = (n + 1).to_string().into_bytes();
                    match store.put("counter", next, Precondition::Revision(current.mod_revision)).await {
                        Ok(revision) => wins.push((revision, n + 1)),
                        Err(StoreError::PreconditionFailed { .. }) => {}
                        Err(e) => panic!("unexpected error incrementing: {e}"),
                    }
                }
                wins
            })
        })
        .collect();
    let mut wins = Vec::new();
    for worker in workers {
        wins.extend(worker.await.expect("worker task"));
    }
    assert!(!wins.is_empty(), "some increment succeeds");
    wins.sort_unstable();
    for pair in wins.windows(2) {
        assert!(pair[0].0 < pair[1].0, "two increments won revision {}", pair[0].0);
    }
    let values: Vec<u64> = wins.iter().map(|&(_, n)| n).collect();
    let expected: Vec<u64> = (1..=wins.len() as u64).collect();
    assert_eq!(values, expected, "increments, in revision order, count up by one");
    let last = must_get(&*store, "counter").await.expect("counter exists");
    assert_eq!(last.value, wins.len().to_string().into_bytes(), "final counter equals the number of wins");
    assert_eq!(Some(last.mod_revision), wins.last().map(|&(r, _)| r));
}
