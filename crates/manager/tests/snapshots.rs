//! Snapshot operations through the manager's API with sim agents: the tree,
//! refusals that change nothing, lost replies, and manager restarts in the
//! middle of an operation (finished or undone from what the host has).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Dc;
use drove_api::{CreateGuestRequest, CreateSnapshotRequest, SnapshotList};
use drove_hypervisor::Hypervisor;
use drove_hypervisor::sim::{SimConfig, SimOp};
use drove_model::{ByteSize, GuestId, GuestState, OperationState, SnapshotKind, SnapshotState};

async fn running_guest(dc: &Dc, name: &str) -> GuestId {
    let req = CreateGuestRequest {
        disks: vec![ByteSize::gib(1).into()],
        ..CreateGuestRequest::new(name, 1, ByteSize::mib(256))
    };
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    acc.guest
}

async fn snapshot(dc: &Dc, guest: &str, name: &str, memory: bool) -> drove_model::Operation {
    let acc = dc.admin.create_snapshot(guest, &CreateSnapshotRequest { name: name.into(), memory }).await.unwrap();
    dc.wait_op(&acc.operation).await
}

/// (name, parent, kind, state) of one recorded snapshot.
type Row = (String, Option<String>, SnapshotKind, SnapshotState);

/// Each recorded snapshot, and the current one.
fn tree(list: &SnapshotList) -> (Vec<Row>, Option<String>) {
    let rows = list.snapshots.iter().map(|s| (s.name.clone(), s.parent.clone(), s.kind, s.state)).collect();
    (rows, list.current.clone())
}

/// The names the host has, in order.
async fn on_host(dc: &Dc, id: GuestId) -> Vec<String> {
    dc.agents[0].sim.snapshot_list(id).await.unwrap().into_iter().map(|s| s.name).collect()
}

fn row(name: &str, parent: Option<&str>, kind: SnapshotKind) -> Row {
    (name.into(), parent.map(Into::into), kind, SnapshotState::Ready)
}

#[tokio::test]
async fn snapshots_form_a_tree_restore_and_delete_and_refusals_change_nothing() {
    let dc = Dc::start(1).await;
    let id = running_guest(&dc, "web-1").await;
    use SnapshotKind::{Disk, Memory};

    let op = snapshot(&dc, "web-1", "a", false).await;
    assert_eq!((op.state, op.step.as_str()), (OperationState::Succeeded, "snapshot a taken"), "{op:?}");
    let op = snapshot(&dc, "web-1", "b", true).await;
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    let list = dc.admin.list_snapshots("web-1").await.unwrap();
    assert_eq!(tree(&list), (vec![row("a", None, Disk), row("b", Some("a"), Memory)], Some("b".into())));
    assert!(list.snapshots[1].vm_state_size.is_some_and(|s| s.bytes() > 0), "{list:?}");
    assert_eq!(on_host(&dc, id).await, ["a", "b"]);

    // Back to a (a disk snapshot of a running guest: stop, roll back, start).
    let acc = dc.admin.restore_snapshot("web-1", "a").await.unwrap();
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    assert!(op.step.contains("started again"), "{}", op.step);
    assert_eq!(dc.admin.get_guest("web-1").await.unwrap().guest.state, GuestState::Running);
    // The next snapshot branches off a.
    assert_eq!(snapshot(&dc, "web-1", "c", false).await.state, OperationState::Succeeded);
    let list = dc.admin.list_snapshots("web-1").await.unwrap();
    let want = vec![row("a", None, Disk), row("b", Some("a"), Memory), row("c", Some("a"), Disk)];
    assert_eq!(tree(&list), (want.clone(), Some("c".into())));

    // Refusals: one line each, and nothing changes, here or on the host.
    let create = |name: &str, memory| CreateSnapshotRequest { name: name.into(), memory };
    let refusals = [
        (dc.admin.create_snapshot("web-1", &create("a", false)).await.unwrap_err(), 409, "already has a snapshot"),
        (dc.admin.create_snapshot("web-1", &create("Bad_Name", false)).await.unwrap_err(), 400, "may contain only"),
        (dc.admin.create_snapshot("nope", &create("x", false)).await.unwrap_err(), 404, "guest \"nope\""),
        (dc.admin.restore_snapshot("web-1", "zz").await.unwrap_err(), 404, "\"zz\" does not exist"),
        (dc.admin.delete_snapshot("web-1", "zz", false).await.unwrap_err(), 404, "\"zz\" does not exist"),
        (dc.admin.delete_snapshot("web-1", "a", false).await.unwrap_err(), 409, "has children (b, c)"),
    ];
    for (err, status, text) in refusals {
        assert_eq!(err.status(), Some(status), "{err}");
        assert!(err.to_string().contains(text) && !err.to_string().contains('\n'), "{err}");
    }
    let stop = dc.admin.stop_guest("web-1", false).await.unwrap();
    dc.wait_succeeded(&stop.operation).await;
    let err = dc.admin.create_snapshot("web-1", &create("m", true)).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("is stopped; a snapshot with memory needs it running"), "{err}");
    assert_eq!(tree(&dc.admin.list_snapshots("web-1").await.unwrap()), (want, Some("c".into())));
    assert_eq!(on_host(&dc, id).await, ["a", "b", "c"]);

    // Forced: a goes, its children keep everything and hang from the root.
    let acc = dc.admin.delete_snapshot("web-1", "a", true).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let list = dc.admin.list_snapshots("web-1").await.unwrap();
    assert_eq!(tree(&list), (vec![row("b", None, Memory), row("c", None, Disk)], Some("c".into())));
    assert_eq!(on_host(&dc, id).await, ["b", "c"]);

    // A stopped guest gets the disks of a memory snapshot and stays stopped.
    let acc = dc.admin.restore_snapshot("web-1", "b").await.unwrap();
    let op = dc.wait_op(&acc.operation).await;
    assert!(op.step.contains("stays stopped"), "{op:?}");
    assert_eq!(dc.admin.get_guest("web-1").await.unwrap().guest.state, GuestState::Stopped);
    assert_eq!(dc.admin.list_snapshots("web-1").await.unwrap().current.as_deref(), Some("b"));

    // Every accepted snapshot request is in the audit log.
    let audit = dc.admin.audit(0, 1000).await.unwrap();
    let accepted = audit.iter().filter(|r| r.action.contains("/snapshots") && r.status == 202).count();
    assert_eq!(accepted, 6, "{audit:#?}");
    dc.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_whose_reply_was_lost_is_undone_on_the_host_too() {
    let dc = Dc::start(1).await;
    let id = running_guest(&dc, "web-1").await;
    dc.agents[0].sim.fail_next_after_effect(SimOp::SnapshotCreate, "reply lost");
    let op = snapshot(&dc, "web-1", "a", false).await;
    assert_eq!(op.state, OperationState::Failed, "{op:?}");
    assert!(op.error.as_deref().is_some_and(|e| e.contains("reply lost") && e.ends_with("undone")), "{op:?}");
    assert!(dc.admin.list_snapshots("web-1").await.unwrap().snapshots.is_empty());
    assert!(on_host(&dc, id).await.is_empty(), "the snapshot taken before the reply got lost is gone");
    // The name is free.
    assert_eq!(snapshot(&dc, "web-1", "a", false).await.state, OperationState::Succeeded);
    dc.shutdown().await;
}

#[tokio::test]
async fn a_manager_restarted_while_the_host_takes_a_snapshot_records_it_from_the_host() {
    let mut dc = Dc::start(0).await;
    let slow = SimConfig { snapshot_delay: Duration::from_millis(800), ..SimConfig::default() };
    dc.add_agent("host-1", slow).await;
    dc.wait_hosts_up(1).await;
    let id = running_guest(&dc, "web-1").await;
    let acc =
        dc.admin.create_snapshot("web-1", &CreateSnapshotRequest { name: "a".into(), memory: true }).await.unwrap();
    let sim = dc.agents[0].sim.clone();
    dc.eventually("the host got the call", || async { (sim.calls(SimOp::SnapshotCreate) == 1).then_some(()) }).await;
    // The manager dies before the host answers; the host finishes anyway.
    dc.kill_manager().await;
    dc.eventually("the host has it", || async { (on_host(&dc, id).await == ["a"]).then_some(()) }).await;
    dc.restart_manager().await;
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    let list = dc.admin.list_snapshots("web-1").await.unwrap();
    assert_eq!(tree(&list), (vec![row("a", None, SnapshotKind::Memory)], Some("a".into())));
    assert_eq!(sim.calls(SimOp::SnapshotCreate), 1, "finished from the host's list, not taken again");
    dc.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_the_host_never_took_is_undone_after_a_manager_restart() {
    let mut dc = Dc::start(1).await;
    let id = running_guest(&dc, "web-1").await;
    // The host is unreachable when the request comes; then the manager dies.
    dc.agents[0].stop().await;
    let acc =
        dc.admin.create_snapshot("web-1", &CreateSnapshotRequest { name: "a".into(), memory: false }).await.unwrap();
    dc.kill_manager().await;
    dc.restart_manager().await;
    let pending = dc.admin.list_snapshots("web-1").await.unwrap();
    assert_eq!(pending.snapshots[0].state, SnapshotState::Creating, "recorded as pending before anything else");
    dc.restart_agent(0).await;
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Failed, "{op:?}");
    assert!(op.error.as_deref().is_some_and(|e| e.contains("interrupted") && e.ends_with("undone")), "{op:?}");
    assert!(dc.admin.list_snapshots("web-1").await.unwrap().snapshots.is_empty());
    assert!(on_host(&dc, id).await.is_empty());
    assert_eq!(dc.agents[0].sim.calls(SimOp::SnapshotCreate), 0);
    dc.shutdown().await;
}

#[tokio::test]
async fn a_delete_interrupted_by_a_manager_restart_is_finished() {
    let mut dc = Dc::start(1).await;
    let id = running_guest(&dc, "web-1").await;
    assert_eq!(snapshot(&dc, "web-1", "a", false).await.state, OperationState::Succeeded);
    assert_eq!(snapshot(&dc, "web-1", "b", false).await.state, OperationState::Succeeded);
    dc.agents[0].stop().await;
    let acc = dc.admin.delete_snapshot("web-1", "a", true).await.unwrap();
    dc.kill_manager().await;
    dc.restart_manager().await;
    dc.restart_agent(0).await;
    dc.wait_succeeded(&acc.operation).await;
    let list = dc.admin.list_snapshots("web-1").await.unwrap();
    assert_eq!(tree(&list), (vec![row("b", None, SnapshotKind::Disk)], Some("b".into())));
    assert_eq!(on_host(&dc, id).await, ["b"]);
    dc.shutdown().await;
}

#[tokio::test]
async fn a_restore_interrupted_by_a_manager_restart_is_finished_once_more() {
    let mut dc = Dc::start(0).await;
    let slow = SimConfig { snapshot_delay: Duration::from_millis(800), ..SimConfig::default() };
    dc.add_agent("host-1", slow).await;
    dc.wait_hosts_up(1).await;
    let id = running_guest(&dc, "web-1").await;
    assert_eq!(snapshot(&dc, "web-1", "a", true).await.state, OperationState::Succeeded);
    assert_eq!(snapshot(&dc, "web-1", "b", true).await.state, OperationState::Succeeded);
    let acc = dc.admin.restore_snapshot("web-1", "a").await.unwrap();
    let sim = dc.agents[0].sim.clone();
    dc.eventually("the host got the call", || async { (sim.calls(SimOp::SnapshotRestore) == 1).then_some(()) }).await;
    // The manager dies while the host restores; the restarted one restores
    // again (idempotent) and records where the guest now descends from.
    dc.kill_manager().await;
    dc.restart_manager().await;
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    let list = dc.admin.list_snapshots("web-1").await.unwrap();
    assert_eq!(list.current.as_deref(), Some("a"), "the guest descends from the restored snapshot");
    assert!(list.snapshots.iter().all(|s| s.state == SnapshotState::Ready), "{list:?}");
    assert_eq!(on_host(&dc, id).await, ["a", "b"], "nothing lost on the host");
    assert!(sim.calls(SimOp::SnapshotRestore) >= 2, "restored again after the restart");
    assert_eq!(dc.admin.get_guest("web-1").await.unwrap().guest.state, GuestState::Running);
    dc.shutdown().await;
}
