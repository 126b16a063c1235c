//! Moving a guest's disks between pools through the manager, with sim
//! agents: the host moves them and the manager records the new pool (a new
//! generation, audited, durable across a restart); refusals change
//! nothing; a failed move leaves the spec and the host as they were; a
//! manager that restarts mid-move asks the host again and records it.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Dc;
use drove_api::{CreateGuestRequest, CreateSnapshotRequest, MoveStorageRequest};
use drove_client::ClientError;
use drove_hypervisor::sim::{SimConfig, SimOp};
use drove_model::guest::Storage;
use drove_model::{ByteSize, GuestId, OperationKind, OperationState};

fn to(pool: Storage) -> MoveStorageRequest {
    MoveStorageRequest { to: pool }
}

/// The pool the host at `agent` holds the guest's disks on.
fn on_host(dc: &Dc, agent: usize, id: GuestId) -> Storage {
    dc.agents[agent].sim.guest_config(id).unwrap().spec.storage
}

fn conflict(e: ClientError, want: &str) -> String {
    let message = e.to_string();
    assert_eq!(e.status(), Some(409), "{message}");
    assert!(message.contains(want), "{message:?} should say {want:?}");
    message
}

#[tokio::test]
async fn a_running_guest_moves_to_the_shared_pool_and_back_and_the_new_pool_is_recorded() {
    let mut dc = Dc::start(2).await;
    let id = dc.running_guest_on("mover", "host-1").await;
    let before = dc.admin.get_guest("mover").await.unwrap().guest;
    assert_eq!(before.spec.storage, Storage::Local);

    let acc = dc.admin.move_storage("mover", &to(Storage::Shared)).await.unwrap();
    assert_eq!(acc.operation.kind, OperationKind::MoveStorage);
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    assert!(op.step.contains("from the local pool to the shared pool (live"), "{}", op.step);
    let g = dc.admin.get_guest("mover").await.unwrap().guest;
    assert_eq!(g.spec.storage, Storage::Shared);
    assert!(g.generation > before.generation, "a new definition: {} -> {}", before.generation, g.generation);
    let moved = g.last_storage_move.clone().expect("the move's figures");
    assert_eq!((moved.from, moved.to, moved.live, moved.bytes), (Storage::Local, Storage::Shared, true, 1 << 30));
    assert_eq!(on_host(&dc, 0, id), Storage::Shared, "the host moved them before the manager recorded it");
    assert_eq!(g.state, drove_model::GuestState::Running, "it kept running");

    let audit = dc.admin.audit(0, 10_000).await.unwrap();
    assert!(
        audit.iter().any(|r| r.action == "POST /v1/guests/mover/storage" && r.status == 202),
        "the request is audited: {audit:?}"
    );

    // Durable, and the guest now counts on the shared pool.
    dc.restart_manager().await;
    assert_eq!(dc.admin.get_guest("mover").await.unwrap().guest.spec.storage, Storage::Shared);
    // (Pools come with the hosts' heartbeats.)
    dc.eventually("the shared pool counts the guest", || async {
        let pools = dc.admin.list_pools().await.ok()?;
        pools.iter().any(|p| p.kind == Storage::Shared && p.guests == 1).then_some(())
    })
    .await;

    // And back, stopped this time: copied, not mirrored.
    dc.wait_succeeded(&dc.admin.stop_guest("mover", false).await.unwrap().operation).await;
    let acc = dc.admin.move_storage("mover", &to(Storage::Local)).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let g = dc.admin.get_guest("mover").await.unwrap().guest;
    assert_eq!(g.spec.storage, Storage::Local);
    assert!(!g.last_storage_move.unwrap().live);
    assert_eq!(on_host(&dc, 0, id), Storage::Local);
    dc.shutdown().await;
}

#[tokio::test]
async fn refused_moves_change_nothing_and_say_why() {
    let mut dc = Dc::start(1).await;
    let id = dc.running_guest_on("keep", "host-1").await;
    let before = dc.admin.get_guest("keep").await.unwrap().guest;

    // To the pool it is on.
    let e = dc.admin.move_storage("keep", &to(Storage::Local)).await.unwrap_err();
    conflict(e, "on the local pool already");
    // An unknown guest; an unknown pool.
    let e = dc.admin.move_storage("nobody", &to(Storage::Shared)).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");

    // With snapshots: they live inside the files a move replaces.
    let snap = CreateSnapshotRequest { name: "s1".into(), memory: false };
    dc.wait_succeeded(&dc.admin.create_snapshot("keep", &snap).await.unwrap().operation).await;
    let e = dc.admin.move_storage("keep", &to(Storage::Shared)).await.unwrap_err();
    conflict(e, "snapshots (s1)");
    dc.wait_succeeded(&dc.admin.delete_snapshot("keep", "s1", false).await.unwrap().operation).await;

    // A host without a shared pool.
    dc.add_agent_without_pool("host-2", SimConfig::default()).await;
    dc.wait_hosts_up(2).await;
    dc.running_guest_on("island", "host-2").await;
    dc.eventually("host-2 reports its pools", || async {
        let pools = dc.admin.list_pools().await.ok()?;
        pools.iter().any(|p| p.name == "local@host-2").then_some(())
    })
    .await;
    let e = dc.admin.move_storage("island", &to(Storage::Shared)).await.unwrap_err();
    conflict(e, "reports no shared pool");

    // A template: overlays may depend on its files.
    dc.wait_succeeded(&dc.admin.stop_guest("keep", false).await.unwrap().operation).await;
    dc.admin.set_template("keep", true).await.unwrap();
    let e = dc.admin.move_storage("keep", &to(Storage::Shared)).await.unwrap_err();
    conflict(e, "is a template");
    dc.admin.set_template("keep", false).await.unwrap();

    let after = dc.admin.get_guest("keep").await.unwrap().guest;
    assert_eq!((after.spec.storage, after.last_storage_move), (Storage::Local, None));
    assert_eq!(on_host(&dc, 0, id), Storage::Local);
    assert_eq!(before.spec.storage, after.spec.storage);
    dc.shutdown().await;
}

#[tokio::test]
async fn a_move_and_a_migration_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::fast_config(dir.path());
    let mut dc = Dc::start_with(dir, config, 0).await;
    let slow = SimConfig { snapshot_delay: Duration::from_millis(800), ..SimConfig::default() };
    dc.add_agent("host-1", slow.clone()).await;
    dc.add_agent("host-2", slow).await;
    dc.wait_hosts_up(2).await;
    dc.running_guest_on("busy", "host-1").await;

    let acc = dc.admin.move_storage("busy", &to(Storage::Shared)).await.unwrap();
    let e = dc
        .admin
        .migrate_guest("busy", &drove_api::MigrateRequest { to: Some("host-2".into()), ..Default::default() })
        .await
        .unwrap_err();
    conflict(e, "in progress");
    let e = dc.admin.move_storage("busy", &to(Storage::Shared)).await.unwrap_err();
    conflict(e, "in progress");
    dc.wait_succeeded(&acc.operation).await;

    // The other way round: no move while it migrates.
    let mig = dc
        .admin
        .migrate_guest("busy", &drove_api::MigrateRequest { to: Some("host-2".into()), ..Default::default() })
        .await
        .unwrap();
    let e = dc.admin.move_storage("busy", &to(Storage::Local)).await.unwrap_err();
    conflict(e, "migrat");
    dc.wait_succeeded(&mig.operation).await;
    dc.shutdown().await;
}

#[tokio::test]
async fn a_failed_move_leaves_the_spec_and_the_host_as_they_were() {
    let mut dc = Dc::start(1).await;
    let id = dc.running_guest_on("stuck", "host-1").await;
    let before = dc.admin.get_guest("stuck").await.unwrap().guest;
    dc.agents[0].sim.fail_next(SimOp::MoveStorage, "the pool went read-only");
    let acc = dc.admin.move_storage("stuck", &to(Storage::Shared)).await.unwrap();
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Failed, "{op:?}");
    assert!(op.error.as_deref().unwrap().contains("the pool went read-only"), "{op:?}");
    let after = dc.admin.get_guest("stuck").await.unwrap().guest;
    assert_eq!((after.spec.storage, after.generation), (Storage::Local, before.generation));
    assert_eq!(on_host(&dc, 0, id), Storage::Local);
    // Nothing is held: the next move goes through.
    let acc = dc.admin.move_storage("stuck", &to(Storage::Shared)).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    assert_eq!(on_host(&dc, 0, id), Storage::Shared);
    dc.restart_manager().await;
    dc.shutdown().await;
}

/// The manager dies while the host copies: the next one resumes the
/// operation, asks the host again (which answers at once: the disks are
/// there) and records the new pool.
#[tokio::test]
async fn a_manager_restarted_mid_move_asks_the_host_again_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::fast_config(dir.path());
    let mut dc = Dc::start_with(dir, config, 0).await;
    dc.add_agent("host-1", SimConfig { snapshot_delay: Duration::from_millis(1500), ..SimConfig::default() }).await;
    dc.wait_hosts_up(1).await;
    let id = dc.running_guest_on("orphan", "host-1").await;
    let acc = dc.admin.move_storage("orphan", &to(Storage::Shared)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    dc.restart_manager().await;
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    assert_eq!(dc.admin.get_guest("orphan").await.unwrap().guest.spec.storage, Storage::Shared);
    assert_eq!(on_host(&dc, 0, id), Storage::Shared);
    dc.shutdown().await;
}

/// While its disks move, a guest on the shared pool does not fail over:
/// after the host's switch its files are on that host, whatever the spec
/// still says. Once the move settles it is planned again by its new pool.
#[tokio::test]
async fn a_guest_whose_disks_are_moving_does_not_fail_over() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::fast_config(dir.path());
    let mut dc = Dc::start_with(dir, config, 0).await;
    let slow = SimConfig { snapshot_delay: Duration::from_millis(1500), ..SimConfig::default() };
    dc.add_agent("host-1", slow.clone()).await;
    dc.add_agent("host-2", slow).await;
    dc.wait_hosts_up(2).await;
    let req = CreateGuestRequest {
        disks: vec![ByteSize::gib(1).into()],
        host: Some("host-1".into()),
        storage: Some(Storage::Shared),
        ..CreateGuestRequest::new("roamer", 1, ByteSize::mib(256))
    };
    dc.wait_succeeded(&dc.admin.create_guest(&req).await.unwrap().operation).await;
    let plan = dc.admin.failover_plan("host-1").await.unwrap();
    assert_eq!(plan.restarts.len(), 1, "{plan:?}");

    let acc = dc.admin.move_storage("roamer", &to(Storage::Local)).await.unwrap();
    assert_eq!(dc.admin.get_guest("roamer").await.unwrap().guest.moving_storage, Some(Storage::Local));
    let plan = dc.admin.failover_plan("host-1").await.unwrap();
    assert!(plan.restarts.is_empty(), "{plan:?}");
    assert!(plan.stranded[0].reason.contains("moving between pools"), "{plan:?}");
    dc.wait_succeeded(&acc.operation).await;
    let g = dc.admin.get_guest("roamer").await.unwrap().guest;
    assert_eq!((g.moving_storage, g.spec.storage), (None, Storage::Local));
    let plan = dc.admin.failover_plan("host-1").await.unwrap();
    assert!(plan.stranded[0].reason.contains("its disks are on that host"), "{plan:?}");
    dc.shutdown().await;
}
