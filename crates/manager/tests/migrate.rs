//! Live migration through the manager with sim agents: the move itself,
//! refusals that change nothing, failures at each step rolled back, a
//! cancel, and a manager restart in the middle; afterwards exactly one host
//! runs the guest and the store says which.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Dc;
use drove_api::{CreateGuestRequest, MigrateRequest};
use drove_hypervisor::sim::{SimConfig, SimOp};
use drove_hypervisor::{Hypervisor, RuntimeState};
use drove_model::{ByteSize, GuestId, GuestState, OperationState};

fn to(host: &str) -> MigrateRequest {
    MigrateRequest { to: Some(host.into()), ..Default::default() }
}

/// Which hosts (by index) have the guest, and in what state.
async fn copies(dc: &Dc, id: GuestId) -> Vec<(usize, RuntimeState)> {
    let mut out = Vec::new();
    for (i, a) in dc.agents.iter().enumerate() {
        if let Ok(s) = a.sim.status(id).await {
            out.push((i, s.state));
        }
    }
    out
}

/// The guest settles on exactly one host, running, where the manager says.
async fn settled_on(dc: &Dc, id: GuestId, host: usize) {
    let name = dc.agents[host].name.clone();
    dc.eventually("one running copy where the manager says", || async {
        let g = dc.admin.get_guest(&id.to_string()).await.ok()?;
        let c = copies(dc, id).await;
        (g.host_name == name && g.guest.migration.is_none() && c == vec![(host, RuntimeState::Running)]).then_some(())
    })
    .await;
    assert_eq!(dc.admin.get_guest(&id.to_string()).await.unwrap().guest.state, GuestState::Running);
}

#[tokio::test]
async fn a_running_guest_moves_and_its_room_moves_with_it() {
    let dc = Dc::start(3).await;
    let id = dc.running_guest_on("mover", "host-1").await;
    let acc = dc.admin.migrate_guest("mover", &to("host-2")).await.unwrap();
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    settled_on(&dc, id, 1).await;
    let g = dc.admin.get_guest("mover").await.unwrap();
    let m = g.guest.last_migration.unwrap();
    assert_eq!((m.from.as_str(), m.to.as_str()), ("host-1", "host-2"));
    assert!(m.downtime_ms.is_some(), "the pause is measured: {m:?}");
    let (h1, h2) = (dc.admin.get_host("host-1").await.unwrap(), dc.admin.get_host("host-2").await.unwrap());
    assert_eq!((h1.guests, h1.allocated_memory), (0, ByteSize(0)));
    assert_eq!((h2.guests, h2.allocated_memory), (1, ByteSize::mib(256)));

    // Without a target, placement picks one (never its own host).
    let acc = dc.admin.migrate_guest("mover", &MigrateRequest::default()).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let host = dc.admin.get_guest("mover").await.unwrap().host_name;
    assert_ne!(host, "host-2");
    // The guest still works as before: stop, start, delete.
    let stop = dc.admin.stop_guest("mover", false).await.unwrap();
    dc.wait_succeeded(&stop.operation).await;
    let del = dc.admin.delete_guest("mover").await.unwrap();
    dc.wait_succeeded(&del.operation).await;
    assert!(copies(&dc, id).await.is_empty());
    dc.shutdown().await;
}

#[tokio::test]
async fn bad_migrations_are_refused_and_change_nothing() {
    let dc = Dc::start(2).await;
    let id = dc.running_guest_on("stay", "host-1").await;
    let cases = [
        (to("host-1"), 400, "already runs on host-1"),
        (to("nowhere"), 400, "does not exist"),
        (MigrateRequest { downtime_limit_ms: Some(0), ..to("host-2") }, 400, "downtime limit"),
    ];
    for (req, status, says) in cases {
        let err = dc.admin.migrate_guest("stay", &req).await.unwrap_err();
        assert_eq!(err.status(), Some(status), "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    let stop = dc.admin.stop_guest("stay", false).await.unwrap();
    dc.wait_succeeded(&stop.operation).await;
    let err = dc.admin.migrate_guest("stay", &to("host-2")).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("only a running guest"), "{err}");
    assert_eq!(copies(&dc, id).await, vec![(0, RuntimeState::Stopped)]);
    assert!(dc.admin.get_guest("stay").await.unwrap().guest.migration.is_none());
    dc.shutdown().await;
}

/// A failure at each step before the commit rolls back: the guest runs on
/// its source, the target keeps nothing, the operation says why.
#[tokio::test]
async fn failures_before_the_commit_roll_back_to_the_source() {
    let dc = Dc::start(2).await;
    let id = dc.running_guest_on("roll", "host-1").await;
    let faults = [
        (1, SimOp::MigrateIncoming, "no room for it"),
        (0, SimOp::MigrateOut, "link cut"),
        (1, SimOp::MigrateFinish, "target QEMU died"),
    ];
    for (host, op, why) in faults {
        dc.agents[host].sim.fail_next(op, why);
        let acc = dc.admin.migrate_guest("roll", &to("host-2")).await.unwrap();
        let done = dc.wait_op(&acc.operation).await;
        assert_eq!(done.state, OperationState::Failed, "{op}: {done:?}");
        settled_on(&dc, id, 0).await;
        let g = dc.admin.get_guest("roll").await.unwrap();
        assert!(g.guest.last_migration.is_none());
        assert_eq!(dc.admin.get_host("host-2").await.unwrap().allocated_memory, ByteSize(0), "{op}: room released");
    }
    // And then it works.
    let acc = dc.admin.migrate_guest("roll", &to("host-2")).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    settled_on(&dc, id, 1).await;
    dc.shutdown().await;
}

/// The send's answer is lost after it completed (the target has it all):
/// reconciliation, not a blind retry, decides; the guest ends on one host.
#[tokio::test]
async fn a_send_whose_answer_is_lost_is_reconciled() {
    let dc = Dc::start(2).await;
    let id = dc.running_guest_on("lost", "host-1").await;
    dc.agents[0].sim.fail_next_after_effect(SimOp::MigrateOut, "reply lost");
    let acc = dc.admin.migrate_guest("lost", &to("host-2")).await.unwrap();
    let op = dc.wait_op(&acc.operation).await;
    assert!(op.state.is_final());
    // The sim's target never runs a guest before `finish`: the source's
    // copy is the one, resumed once the target's is gone.
    settled_on(&dc, id, 0).await;
    dc.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_migration_keeps_the_guest_on_its_source() {
    let mut dc = Dc::start(1).await;
    let slow = SimConfig { migrate_delay: Duration::from_secs(3), ..SimConfig::default() };
    dc.add_agent("slow-1", slow.clone()).await;
    dc.add_agent("slow-2", slow).await;
    dc.wait_hosts_up(3).await;
    let id = dc.running_guest_on("cancel-me", "slow-1").await;
    let acc = dc.admin.migrate_guest("cancel-me", &to("slow-2")).await.unwrap();
    dc.eventually("sending", || async {
        let g = dc.admin.get_guest("cancel-me").await.ok()?;
        (g.guest.migration?.state == drove_model::migration::MigrationState::Sending).then_some(())
    })
    .await;
    // Deleting is refused while two hosts hold parts of it.
    let err = dc.admin.delete_guest("cancel-me").await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    dc.admin.cancel_operation(acc.operation.id).await.unwrap();
    let op = dc.wait_op(&acc.operation).await;
    assert_eq!(op.state, OperationState::Failed);
    assert!(op.error.as_deref().unwrap_or_default().contains("cancelled"), "{op:?}");
    settled_on(&dc, id, 1).await;
    // A finished operation cannot be cancelled.
    assert_eq!(dc.admin.cancel_operation(acc.operation.id).await.unwrap_err().status(), Some(409));
    dc.shutdown().await;
}

/// The manager dies while the guest is being sent: the new manager
/// reconciles, and the guest ends on exactly one host.
#[tokio::test]
async fn a_manager_restart_mid_migration_leaves_exactly_one_copy() {
    let mut dc = Dc::start(0).await;
    let slow = SimConfig { migrate_delay: Duration::from_secs(2), ..SimConfig::default() };
    dc.add_agent("host-1", slow.clone()).await;
    dc.add_agent("host-2", slow).await;
    dc.wait_hosts_up(2).await;
    let id = dc.running_guest_on("survivor", "host-1").await;
    let acc = dc.admin.migrate_guest("survivor", &to("host-2")).await.unwrap();
    dc.eventually("sending", || async {
        let g = dc.admin.get_guest("survivor").await.ok()?;
        (g.guest.migration?.state == drove_model::migration::MigrationState::Sending).then_some(())
    })
    .await;
    dc.restart_manager().await;
    let op = dc.wait_op(&acc.operation).await;
    assert!(op.state.is_final(), "{op:?}");
    let g = dc.admin.get_guest("survivor").await.unwrap();
    let host = if g.host_name == "host-1" { 0 } else { 1 };
    settled_on(&dc, id, host).await;
    dc.shutdown().await;
}

/// Draining a host moves all its guests away, spread over the others by
/// free room (six onto two hosts: three each), a few at a time; a guest
/// that cannot move fails the drain by name; activating brings the host
/// back.
#[tokio::test]
async fn a_drain_spreads_the_guests_and_names_what_cannot_move() {
    let dc = Dc::start(3).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(dc.running_guest_on(&format!("d-{i}"), "host-1").await);
    }
    let op = dc.admin.drain_host("host-1", Some(2)).await.unwrap();
    // Asking again hands back the drain under way.
    assert_eq!(dc.admin.drain_host("host-1", None).await.unwrap().id, op.id);
    let done = dc.wait_op(&op).await;
    assert_eq!(done.state, OperationState::Succeeded, "{done:?}");
    assert!(done.step.contains("moved 6"), "{}", done.step);
    let guests = dc.admin.list_guests().await.unwrap();
    let on = |h: &str| guests.iter().filter(|g| g.host_name == h).count();
    assert_eq!((on("host-1"), on("host-2"), on("host-3")), (0, 3, 3), "spread by free room");
    for id in &ids {
        assert_eq!(copies(&dc, *id).await.len(), 1, "one copy of each");
    }
    let h1 = dc.admin.get_host("host-1").await.unwrap();
    assert_eq!(h1.info.state, drove_model::HostState::Maintenance);
    let err = dc
        .admin
        .create_guest(&CreateGuestRequest {
            host: Some("host-1".into()),
            ..CreateGuestRequest::new("no", 1, ByteSize::mib(64))
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "a host in maintenance takes no guests: {err}");

    // Back in service; a stopped guest on it cannot move live.
    dc.admin.set_maintenance("host-1", false).await.unwrap();
    let stay = dc.running_guest_on("stays", "host-1").await;
    let mover = dc.running_guest_on("goes", "host-1").await;
    let stop = dc.admin.stop_guest("stays", false).await.unwrap();
    dc.wait_succeeded(&stop.operation).await;
    let op = dc.admin.drain_host("host-1", None).await.unwrap();
    let done = dc.wait_op(&op).await;
    assert_eq!(done.state, OperationState::Failed);
    let error = done.error.unwrap_or_default();
    assert!(error.contains("moved 1") && error.contains("stays (stopped"), "{error}");
    assert_eq!(copies(&dc, stay).await, vec![(0, RuntimeState::Stopped)]);
    assert_ne!(copies(&dc, mover).await[0].0, 0);
    dc.shutdown().await;
}
