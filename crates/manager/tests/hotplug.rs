//! Hardware changes whose outcome the manager does not learn at once, with
//! sim agents: the change is recorded as pending before the host is asked,
//! and settled from the host's definition after a manager restart or a host
//! that did not answer; a pending change refuses others.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Dc;
use drove_api::{HotplugRequest, SetLimitsRequest};
use drove_hypervisor::sim::{SimConfig, SimOp};
use drove_model::{ByteSize, GuestId};

fn add_disk(size: ByteSize) -> HotplugRequest {
    HotplugRequest { add_disk: Some(size), ..Default::default() }
}

/// How many disks the host's definition of the guest has.
fn disks_on_host(dc: &Dc, id: GuestId) -> usize {
    dc.agents[0].sim.guest_config(id).unwrap().spec.disks.len()
}

/// A data centre with one host whose calls each take `delay`, running
/// web-1: a change is still on its way to the host for that long.
async fn slow_host_with_a_guest(delay: Duration) -> (Dc, GuestId) {
    let mut dc = Dc::start(0).await;
    dc.add_agent("host-1", SimConfig { command_delay: delay, ..SimConfig::default() }).await;
    dc.wait_hosts_up(1).await;
    let id = dc.running_guest_on("web-1", "host-1").await;
    (dc, id)
}

#[tokio::test]
async fn a_disk_the_host_added_while_the_manager_died_is_recorded_after_the_restart() {
    // A slow hot-add, so that the manager dies while the host makes it.
    let (mut dc, id) = slow_host_with_a_guest(Duration::from_millis(1500)).await;
    let generation = dc.admin.get_guest("web-1").await.unwrap().guest.generation;

    let admin = dc.admin.clone();
    let request = tokio::spawn(async move { admin.hotplug("web-1", &add_disk(ByteSize::mib(32))).await });
    let sim = dc.agents[0].sim.clone();
    dc.eventually("the host got the call", || async { (sim.calls(SimOp::Hotplug) == 1).then_some(()) }).await;
    let g = dc.admin.get_guest("web-1").await.unwrap().guest;
    let pending = g.pending_spec.expect("recorded as pending before the host was asked");
    assert_eq!((pending.what.as_str(), pending.spec.disks.len()), ("add disk 32M", 2), "{pending:?}");
    // The caller goes away and the manager dies before the host answers;
    // the host finishes anyway.
    request.abort();
    dc.kill_manager().await;
    dc.eventually("the host added it", || async { (disks_on_host(&dc, id) == 2).then_some(()) }).await;

    dc.restart_manager().await;
    let g = dc
        .eventually("the change settled", || async {
            dc.admin.get_guest("web-1").await.ok().filter(|g| g.guest.pending_spec.is_none())
        })
        .await
        .guest;
    assert_eq!(g.spec.disks.len(), 2, "recorded from the host's definition: {:?}", g.spec.disks);
    assert_eq!(g.spec.disks[1].size, ByteSize::mib(32));
    assert_eq!(g.generation, generation + 1);
    assert_eq!(sim.calls(SimOp::Hotplug), 1, "settled from the host's definition, not made again");

    // The next generation keeps the disk on the host.
    let req = SetLimitsRequest { cpu_cap_percent: Some(Some(50)), ..Default::default() };
    let g = dc.admin.set_limits("web-1", &req).await.unwrap().guest;
    assert_eq!((g.spec.disks.len(), g.generation), (2, generation + 2));
    dc.eventually("the host has the new generation", || async {
        (sim.guest_config(id).unwrap().generation == generation + 2).then_some(())
    })
    .await;
    let on_host = sim.guest_config(id).unwrap().spec;
    assert_eq!((on_host.disks.len(), on_host.limits.cpu_cap_percent), (2, Some(50)), "{on_host:?}");
    dc.shutdown().await;
}

#[tokio::test]
async fn a_change_the_host_never_got_is_forgotten_once_the_host_is_back() {
    let mut dc = Dc::start(1).await;
    let id = dc.running_guest_on("web-1", "host-1").await;
    let generation = dc.admin.get_guest("web-1").await.unwrap().guest.generation;

    // The host is unreachable when the change is asked.
    dc.agents[0].stop().await;
    let err = dc.admin.hotplug("web-1", &add_disk(ByteSize::mib(32))).await.unwrap_err();
    assert_eq!(err.status(), Some(504), "{err}");
    assert!(err.to_string().contains("settled when the host answers") && !err.to_string().contains('\n'), "{err}");
    let g = dc.admin.get_guest("web-1").await.unwrap().guest;
    assert!(g.pending_spec.is_some(), "{g:?}");

    dc.kill_manager().await;
    dc.restart_manager().await;
    assert!(dc.admin.get_guest("web-1").await.unwrap().guest.pending_spec.is_some(), "durable");
    dc.restart_agent(0).await;
    let g = dc
        .eventually("the change settled", || async {
            dc.admin.get_guest("web-1").await.ok().filter(|g| g.guest.pending_spec.is_none())
        })
        .await
        .guest;
    assert_eq!((g.spec.disks.len(), g.generation), (1, generation), "the spec is as it was");
    assert!(g.last_error.as_deref().is_some_and(|e| e.contains("add disk 32M") && e.contains("not made")), "{g:?}");
    assert_eq!(dc.agents[0].sim.calls(SimOp::Hotplug), 0);

    // Nothing stands in the way of a new change.
    dc.eventually("the guest runs again", || async {
        let g = dc.admin.get_guest("web-1").await.ok()?;
        (g.guest.state == drove_model::GuestState::Running).then_some(())
    })
    .await;
    let g = dc.admin.hotplug("web-1", &add_disk(ByteSize::mib(64))).await.unwrap().guest;
    assert_eq!((g.spec.disks.len(), g.generation, g.pending_spec), (2, generation + 1, None));
    assert_eq!(disks_on_host(&dc, id), 2);
    dc.shutdown().await;
}

#[tokio::test]
async fn a_pending_change_refuses_another_until_it_is_settled() {
    let (dc, _) = slow_host_with_a_guest(Duration::from_millis(800)).await;

    let admin = dc.admin.clone();
    let first = tokio::spawn(async move { admin.hotplug("web-1", &add_disk(ByteSize::mib(32))).await });
    let sim = dc.agents[0].sim.clone();
    dc.eventually("the host got the call", || async { (sim.calls(SimOp::Hotplug) == 1).then_some(()) }).await;
    let second = [
        dc.admin.hotplug("web-1", &HotplugRequest { vcpus: Some(2), ..Default::default() }).await.unwrap_err(),
        dc.admin
            .set_limits("web-1", &SetLimitsRequest { cpu_cap_percent: Some(Some(50)), ..Default::default() })
            .await
            .unwrap_err(),
    ];
    let stop = dc.admin.stop_guest("web-1", false).await.unwrap_err();
    for err in second.into_iter().chain([stop]) {
        assert_eq!(err.status(), Some(409), "{err}");
        let text = err.to_string();
        assert!(text.contains("has a change pending on its host (add disk 32M") && !text.contains('\n'), "{text}");
    }
    let g = first.await.unwrap().unwrap().guest;
    assert_eq!((g.spec.disks.len(), g.spec.vcpus, g.pending_spec), (2, 1, None));
    // Settled: the next change goes through.
    let g = dc.admin.hotplug("web-1", &HotplugRequest { vcpus: Some(2), ..Default::default() }).await.unwrap().guest;
    assert_eq!(g.spec.vcpus, 2);
    dc.shutdown().await;
}

#[tokio::test]
async fn a_guest_that_crashes_while_its_change_is_pending_keeps_the_change() {
    let (mut dc, id) = slow_host_with_a_guest(Duration::from_millis(1500)).await;
    let admin = dc.admin.clone();
    let request = tokio::spawn(async move { admin.hotplug("web-1", &add_disk(ByteSize::mib(32))).await });
    let sim = dc.agents[0].sim.clone();
    dc.eventually("the host got the call", || async { (sim.calls(SimOp::Hotplug) == 1).then_some(()) }).await;
    request.abort();
    dc.kill_manager().await;
    dc.eventually("the host added it", || async { (disks_on_host(&dc, id) == 2).then_some(()) }).await;
    // The guest crashes before the manager is back (its agent restarts it
    // from the host's definition): the change and the disk survive both.
    sim.crash(id).unwrap();
    dc.restart_manager().await;
    let g = dc
        .eventually("settled and running", || async {
            let g = dc.admin.get_guest("web-1").await.ok()?;
            (g.guest.pending_spec.is_none() && g.guest.state == drove_model::GuestState::Running).then_some(g)
        })
        .await
        .guest;
    assert_eq!(g.spec.disks.len(), 2, "the change was recorded: {g:?}");
    dc.eventually("the host has the manager's generation", || async {
        (sim.guest_config(id).unwrap().generation == g.generation).then_some(())
    })
    .await;
    assert_eq!(disks_on_host(&dc, id), 2, "the host kept the disk");
    dc.shutdown().await;
}

#[tokio::test]
async fn a_pending_nics_address_stays_taken_across_a_manager_restart() {
    use drove_api::{CreateGuestRequest, CreateVlanRequest, NicRequest};
    let mut dc = Dc::start(1).await;
    let vlan = CreateVlanRequest { id: 30, name: "blue".into(), subnet: Some("10.30.0.0/24".into()), gateway: None };
    dc.admin.create_vlan(&vlan).await.unwrap();
    dc.running_guest_on("web-1", "host-1").await;
    // The host cannot be reached: the NIC's outcome stays pending.
    dc.agents[0].stop().await;
    let add_nic = HotplugRequest { add_nic: Some(NicRequest::on("blue")), ..Default::default() };
    assert_eq!(dc.admin.hotplug("web-1", &add_nic).await.unwrap_err().status(), Some(504));
    let pending = dc.admin.get_guest("web-1").await.unwrap().guest.pending_spec.expect("pending");
    let nic = pending.spec.nics.last().unwrap().clone();
    let ip = nic.address.expect("an address from blue").ip;

    // After a restart the manager knows the address only from the pending
    // change: its host may use it already, so nobody else gets it.
    dc.kill_manager().await;
    dc.restart_manager().await;
    let mut req = CreateGuestRequest::new("web-2", 1, ByteSize::mib(128));
    req.nics = vec![NicRequest { ip: Some(ip), ..NicRequest::on("blue") }];
    let err = dc.admin.create_guest(&req).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains(&ip.to_string()), "{err}");
    dc.shutdown().await;
}

/// A host can fail after it made a change (the change took, a later step
/// did not). Its error is not taken at its word: its definition decides,
/// so the manager's spec never falls behind the host's.
#[tokio::test]
async fn a_change_the_host_made_before_reporting_an_error_is_recorded() {
    let dc = Dc::start(1).await;
    let id = dc.running_guest_on("web-1", "host-1").await;
    let generation = dc.admin.get_guest("web-1").await.unwrap().guest.generation;
    let sim = dc.agents[0].sim.clone();

    sim.fail_next_after_effect(SimOp::Hotplug, "the disk went in; recording it failed");
    let g = dc.admin.hotplug("web-1", &add_disk(ByteSize::mib(32))).await.unwrap().guest;
    assert_eq!(disks_on_host(&dc, id), 2, "the host made the change");
    assert_eq!((g.spec.disks.len(), g.generation, g.pending_spec), (2, generation + 1, None), "recorded as made");

    // An error before any effect is a refusal: nothing recorded, the
    // host's words returned.
    sim.fail_next(SimOp::Hotplug, "no room for another disk");
    let err = dc.admin.hotplug("web-1", &add_disk(ByteSize::mib(32))).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("no room for another disk"), "{err}");
    let g = dc.admin.get_guest("web-1").await.unwrap().guest;
    assert_eq!((g.spec.disks.len(), g.generation, g.pending_spec), (2, generation + 1, None));
    assert_eq!(disks_on_host(&dc, id), 2);
    dc.shutdown().await;
}
