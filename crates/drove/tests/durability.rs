//! What the manager tells an agent must already be durable.
//!
//! Found while writing `crash.rs`: if an agent hears of a guest whose
//! creation is still on its way to the store, and the manager dies before
//! the write lands, the host runs a guest the restarted manager never knew,
//! and the client, who never got its 202, creates it again. `crash.rs` can
//! only hit that window by luck; here a store whose writes wait at a gate
//! holds the window open.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use drove_api::{CreateGuestRequest, HeartbeatRequest, HeartbeatResponse, RegisterRequest};
use drove_manager::auth::{Principal, Role};
use drove_manager::core::Ctx;
use drove_manager::{Manager, ManagerConfig};
use drove_store::embedded::EmbeddedStore;
use drove_store::{KeyValue, Op, Revision, Store, StoreError, Watch};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// The embedded store, with writes held while the gate is closed.
#[derive(Debug)]
struct GatedStore {
    inner: EmbeddedStore,
    open: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl Store for GatedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
        self.inner.txn(ops).await
    }
    async fn revision(&self) -> Result<Revision, StoreError> {
        self.inner.revision().await
    }
    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watch, StoreError> {
        self.inner.watch(prefix, from).await
    }
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
}

/// API requests from JSON, so optional fields added later take defaults.
fn req<T: DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn ctx(name: &str, role: Role, action: &str) -> Ctx {
    Ctx { principal: Principal { name: name.into(), role }, action: action.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_hear_of_a_guest_only_once_its_creation_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, _) = watch::channel(true);
    let store =
        Arc::new(GatedStore { inner: EmbeddedStore::open(&dir.path().join("state.redb")).unwrap(), open: gate });
    let (m, _) = Manager::open(ManagerConfig::new(dir.path().join("manager")), store.clone()).await.unwrap();
    let agent = ctx("agent", Role::Agent, "POST /v1/agent/register");
    let host: RegisterRequest =
        req(serde_json::json!({ "name": "host-1", "cores": 4, "memory": 1u64 << 34, "hypervisor": "sim" }));
    let host_id = m.register(&agent, host).await.unwrap().host_id;

    // Hold every write; the create is then in memory, waiting for the store.
    store.open.send_replace(false);
    let create = tokio::spawn({
        let m = m.clone();
        let admin = ctx("admin", Role::Admin, "POST /v1/guests");
        let guest: CreateGuestRequest = req(serde_json::json!({ "name": "g-1", "vcpus": 1, "memory": 64u64 << 20 }));
        async move { m.create_guest(&admin, guest).await }
    });
    let started = Instant::now();
    // Reads wait for durability too, so look at the in-memory counts.
    while m.counts().guests.iter().all(|(_, n)| *n == 0) {
        assert!(started.elapsed() < Duration::from_secs(60), "the create never reached the manager's memory");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!create.is_finished(), "the create was answered before its write was durable");

    // An agent's heartbeat now may wait for the store, or leave the guest
    // out; it must not name it.
    let mut beat = tokio::spawn({
        let m = m.clone();
        let beat: HeartbeatRequest = req(serde_json::json!({ "host_id": host_id, "guests": [] }));
        async move { m.heartbeat(beat).await }
    });
    // Time for a wrong answer to show; a right one may take as long as it likes.
    if let Ok(answer) = tokio::time::timeout(Duration::from_secs(2), &mut beat).await {
        let answer: HeartbeatResponse = answer.unwrap().unwrap();
        let told: Vec<&str> = answer.guests.iter().map(|d| d.spec.name.as_str()).collect();
        let durable = store.inner.list("guests/").await.unwrap().0.len();
        assert!(
            told.is_empty() || durable > 0,
            "the agent was told to run {told:?} while the store holds {durable} guests: a manager crash now \
             leaves a guest on the host that the restarted manager never knew"
        );
    }

    store.open.send_replace(true);
    create.await.unwrap().unwrap();
    if !beat.is_finished() {
        beat.await.unwrap().unwrap();
    }
}
