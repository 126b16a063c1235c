//! Clones and templates through the manager's API with sim agents: fresh
//! identities, placement on the source's host, templates that never run,
//! refusals that change nothing, deletes refused while others depend on a
//! guest, and clones undone after a failure, a lost reply or a manager
//! restart.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::Dc;
use drove_api::{
    CloneGuestRequest, CreateGuestRequest, CreateSnapshotRequest, CreateVlanRequest, MigrateRequest, NicRequest,
};
use drove_hypervisor::sim::{SimConfig, SimOp};
use drove_model::guest::Storage;
use drove_model::{ByteSize, CloneMode, GuestId, GuestState, OperationState};

async fn lab(hosts: usize) -> Dc {
    let dc = Dc::start(hosts).await;
    let vlan = CreateVlanRequest { id: 100, name: "blue".into(), subnet: Some("10.0.100.0/24".into()), gateway: None };
    dc.admin.create_vlan(&vlan).await.unwrap();
    dc
}

async fn source(dc: &Dc, name: &str, start: bool) -> GuestId {
    let req = CreateGuestRequest {
        disks: vec![ByteSize::gib(1).into()],
        nics: vec![NicRequest::on("blue")],
        start: Some(start),
        ..CreateGuestRequest::new(name, 1, ByteSize::mib(256))
    };
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    acc.guest
}

fn clone_req(name: &str, count: u32) -> CloneGuestRequest {
    CloneGuestRequest { name: name.into(), count: Some(count), snapshot: None, start: None, host: None }
}

/// The guests the hosts have, by id.
fn on_hosts(dc: &Dc) -> HashSet<GuestId> {
    dc.agents.iter().flat_map(|a| a.sim.guests()).map(|s| s.id).collect()
}

#[tokio::test]
async fn clones_get_a_fresh_identity_on_the_sources_host() {
    let dc = lab(3).await;
    let src = source(&dc, "web", true).await;
    let before = dc.admin.get_guest("web").await.unwrap();

    let accepted = dc.admin.clone_guest("web", &clone_req("web-c", 3)).await.unwrap();
    let names: Vec<&str> = accepted.iter().map(|a| a.operation.target_name.as_str()).collect();
    assert_eq!(names, ["web-c-1", "web-c-2", "web-c-3"]);
    for a in &accepted {
        dc.wait_succeeded(&a.operation).await;
    }
    let mut macs = HashSet::from([before.guest.spec.nics[0].mac.clone()]);
    let mut ips = HashSet::from([before.guest.spec.nics[0].address.unwrap().ip]);
    for a in &accepted {
        let g = dc.admin.get_guest(&a.guest.to_string()).await.unwrap();
        assert_eq!((g.guest.state, g.host_name.as_str()), (GuestState::Running, before.host_name.as_str()));
        let nic = &g.guest.spec.nics[0];
        assert_eq!(nic.vlan, before.guest.spec.nics[0].vlan);
        assert!(macs.insert(nic.mac.clone()), "MAC {} given twice", nic.mac);
        assert!(ips.insert(nic.address.unwrap().ip), "address {:?} given twice", nic.address);
        assert_eq!(g.guest.spec.disks, before.guest.spec.disks);
        let from = g.guest.spec.clone_of.unwrap();
        assert_eq!((from.guest, from.mode, from.snapshot), (src, CloneMode::Copy, None));
        assert!(on_hosts(&dc).contains(&a.guest));
    }
    // Made: the copies no longer hold their source.
    let after = dc.admin.get_guest("web").await.unwrap();
    assert!(after.dependents.is_empty(), "{:?}", after.dependents);
    assert_eq!((after.guest.state, after.guest.generation), (before.guest.state, before.guest.generation));
    let audit = dc.admin.audit(0, 1000).await.unwrap();
    assert_eq!(audit.iter().filter(|r| r.action.ends_with("/clone") && r.status == 202).count(), 1);

    // Restore as a copy: a clone at a snapshot.
    let snap = dc.admin.create_snapshot("web", &CreateSnapshotRequest { name: "s1".into(), memory: false }).await;
    dc.wait_succeeded(&snap.unwrap().operation).await;
    let req = CloneGuestRequest { snapshot: Some("s1".into()), ..clone_req("web-old", 1) };
    let acc = dc.admin.clone_guest("web", &req).await.unwrap();
    dc.wait_succeeded(&acc[0].operation).await;
    let g = dc.admin.get_guest("web-old").await.unwrap();
    assert_eq!(g.guest.spec.clone_of.unwrap().snapshot.as_deref(), Some("s1"));
    assert_eq!(dc.admin.get_guest("web").await.unwrap().guest.snapshots.len(), 1);
    dc.shutdown().await;
}

#[tokio::test]
async fn refused_clones_change_nothing() {
    let dc = lab(1).await;
    source(&dc, "web", true).await;
    source(&dc, "x-2", false).await;
    let guests = |dc: &Dc| {
        let a = dc.admin.clone();
        async move { a.list_guests().await.unwrap().into_iter().map(|g| g.guest.spec.name).collect::<Vec<_>>() }
    };
    let before = guests(&dc).await;
    let cases = [
        (dc.admin.clone_guest("web", &clone_req("x-2", 1)).await.unwrap_err(), 409, "already exists"),
        // All or none: x-1 would be fine, x-2 is taken.
        (dc.admin.clone_guest("web", &clone_req("x", 3)).await.unwrap_err(), 409, "\"x-2\" already exists"),
        (dc.admin.clone_guest("web", &clone_req("y", 0)).await.unwrap_err(), 400, "count must be"),
        (dc.admin.clone_guest("nope", &clone_req("y", 1)).await.unwrap_err(), 404, "guest \"nope\""),
        (
            dc.admin
                .clone_guest("web", &CloneGuestRequest { snapshot: Some("zz".into()), ..clone_req("y", 1) })
                .await
                .unwrap_err(),
            404,
            "\"zz\" does not exist",
        ),
        (dc.admin.clone_guest("web", &clone_req("Bad_Name", 1)).await.unwrap_err(), 400, "may contain only"),
    ];
    for (err, status, text) in cases {
        assert_eq!(err.status(), Some(status), "{err}");
        assert!(err.to_string().contains(text), "{err}");
    }
    assert_eq!(guests(&dc).await, before);
    // The addresses the refused clones would have had are free: the next
    // clone gets the first one after web's and x-2's.
    let acc = dc.admin.clone_guest("web", &clone_req("z", 1)).await.unwrap();
    dc.wait_succeeded(&acc[0].operation).await;
    let ip = dc.admin.get_guest("z").await.unwrap().guest.spec.nics[0].address.unwrap().ip;
    assert_eq!(ip.to_string(), "10.0.100.3");
    dc.shutdown().await;
}

#[tokio::test]
async fn templates_never_run_and_guests_with_dependents_are_deleted_only_by_force() {
    let dc = lab(1).await;
    source(&dc, "golden", true).await;
    let err = dc.admin.set_template("golden", true).await.unwrap_err();
    assert!(err.to_string().contains("only a stopped guest can become a template"), "{err}");
    let stop = dc.admin.stop_guest("golden", false).await.unwrap();
    dc.wait_succeeded(&stop.operation).await;
    assert!(dc.admin.set_template("golden", true).await.unwrap().guest.template);

    let err = dc.admin.start_guest("golden").await.unwrap_err();
    assert!(err.to_string().contains("is a template and never runs"), "{err}");
    let snap = CreateSnapshotRequest { name: "s".into(), memory: false };
    let err = dc.admin.create_snapshot("golden", &snap).await.unwrap_err();
    assert!(err.to_string().contains("is a template"), "{err}");

    let accepted = dc.admin.clone_guest("golden", &clone_req("web", 2)).await.unwrap();
    for a in &accepted {
        dc.wait_succeeded(&a.operation).await;
    }
    let web1 = dc.admin.get_guest("web-1").await.unwrap();
    assert_eq!((web1.guest.state, web1.guest.spec.clone_of.unwrap().mode), (GuestState::Running, CloneMode::Overlay));
    let golden = dc.admin.get_guest("golden").await.unwrap();
    assert_eq!(golden.dependents, ["web-1", "web-2"]);
    assert_eq!(golden.guest.state, GuestState::Stopped);
    // Listing all guests works out dependents in one pass: the same answer.
    let listed = dc.admin.list_guests().await.unwrap();
    let deps = |name: &str| listed.iter().find(|v| v.guest.spec.name == name).map(|v| v.dependents.clone());
    assert_eq!(deps("golden"), Some(vec!["web-1".to_owned(), "web-2".to_owned()]));
    assert_eq!(deps("web-1"), Some(vec![]));

    let err = dc.admin.set_template("golden", false).await.unwrap_err();
    assert!(err.to_string().contains("is the base of clones (web-1, web-2)"), "{err}");
    let err = dc.admin.delete_guest("golden").await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("has dependents (web-1, web-2)") && err.to_string().contains("--force"), "{err}");
    assert_eq!(dc.admin.list_guests().await.unwrap().len(), 3, "a refused delete changes nothing");

    // A clone of an overlay clone: deleted first by force, deepest first.
    let stop = dc.admin.stop_guest("web-2", false).await.unwrap();
    dc.wait_succeeded(&stop.operation).await;
    dc.admin.set_template("web-2", true).await.unwrap();
    let acc = dc.admin.clone_guest("web-2", &clone_req("leaf", 1)).await.unwrap();
    dc.wait_succeeded(&acc[0].operation).await;

    let acc = dc.admin.delete_guest_forced("golden").await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    dc.eventually("all gone", || async { dc.admin.list_guests().await.unwrap().is_empty().then_some(()) }).await;
    assert!(on_hosts(&dc).is_empty(), "the hosts still have {:?}", on_hosts(&dc));
    dc.shutdown().await;
}

#[tokio::test]
async fn a_clone_being_copied_holds_its_source_and_snapshot() {
    let mut dc = Dc::start(0).await;
    let slow = SimConfig { create_delay: Duration::from_millis(1500), ..SimConfig::default() };
    dc.add_agent("host-1", slow).await;
    dc.wait_hosts_up(1).await;
    let req = CreateGuestRequest {
        disks: vec![ByteSize::gib(1).into()],
        ..CreateGuestRequest::new("web", 1, ByteSize::mib(64))
    };
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let snap = dc.admin.create_snapshot("web", &CreateSnapshotRequest { name: "s".into(), memory: false }).await;
    dc.wait_succeeded(&snap.unwrap().operation).await;
    let req = CloneGuestRequest { snapshot: Some("s".into()), ..clone_req("copy", 1) };
    let acc = dc.admin.clone_guest("web", &req).await.unwrap();
    let err = dc.admin.delete_snapshot("web", "s", true).await.unwrap_err();
    assert!(err.to_string().contains("is being copied into clones (copy)"), "{err}");
    let err = dc.admin.delete_guest("web").await.unwrap_err();
    assert!(err.to_string().contains("has dependents (copy)"), "{err}");
    dc.wait_succeeded(&acc[0].operation).await;
    // Made: nothing holds them any more.
    let del = dc.admin.delete_snapshot("web", "s", false).await.unwrap();
    dc.wait_succeeded(&del.operation).await;
    let del = dc.admin.delete_guest("web").await.unwrap();
    dc.wait_succeeded(&del.operation).await;
    assert_eq!(dc.admin.get_guest("copy").await.unwrap().guest.state, GuestState::Running);
    dc.shutdown().await;
}

#[tokio::test]
async fn failed_and_interrupted_clones_are_undone_or_finished() {
    let mut dc = lab(1).await;
    let src = source(&dc, "web", true).await;

    // The host fails to make it: rolled back, nothing left anywhere.
    dc.agents[0].sim.fail_next(SimOp::Create, "disk full");
    let acc = dc.admin.clone_guest("web", &clone_req("a", 1)).await.unwrap();
    let op = dc.wait_op(&acc[0].operation).await;
    assert_eq!(op.state, OperationState::Failed, "{op:?}");
    assert!(op.error.as_deref().is_some_and(|e| e.contains("disk full")), "{op:?}");
    dc.eventually("rolled back", || async { dc.admin.get_guest("a").await.is_err().then_some(()) }).await;
    assert_eq!(on_hosts(&dc), HashSet::from([src]));

    // The host made it but its answer was lost: undone on the host too.
    dc.agents[0].sim.fail_next_after_effect(SimOp::Create, "reply lost");
    let acc = dc.admin.clone_guest("web", &clone_req("b", 1)).await.unwrap();
    let op = dc.wait_op(&acc[0].operation).await;
    assert_eq!(op.state, OperationState::Failed, "{op:?}");
    dc.eventually("rolled back", || async { dc.admin.get_guest("b").await.is_err().then_some(()) }).await;
    dc.eventually("gone from the host", || async { (on_hosts(&dc) == HashSet::from([src])).then_some(()) }).await;
    assert!(dc.admin.get_guest("web").await.unwrap().dependents.is_empty());

    // The manager restarts while the host is away mid-clone: the clone is
    // recorded (Creating) before anything else, and finished afterwards.
    dc.agents[0].stop().await;
    let acc = dc.admin.clone_guest("web", &clone_req("c", 1)).await.unwrap();
    dc.restart_manager().await;
    assert_eq!(dc.admin.get_guest("c").await.unwrap().guest.state, GuestState::Creating);
    assert_eq!(dc.admin.get_guest("web").await.unwrap().dependents, ["c"]);
    dc.restart_agent(0).await;
    dc.wait_succeeded(&acc[0].operation).await;
    assert_eq!(dc.admin.get_guest("c").await.unwrap().guest.state, GuestState::Running);
    assert_eq!(on_hosts(&dc).len(), 2);
    dc.shutdown().await;
}

/// A guest `name` on shared storage on `host`, running or stopped; its id.
async fn shared_source(dc: &Dc, name: &str, host: &str, start: bool) -> GuestId {
    let req = CreateGuestRequest {
        disks: vec![ByteSize::gib(1).into()],
        nics: vec![NicRequest::on("blue")],
        start: Some(start),
        storage: Some(Storage::Shared),
        host: Some(host.into()),
        ..CreateGuestRequest::new(name, 1, ByteSize::mib(256))
    };
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    acc.guest
}

/// The name of the host whose sim has guest `id`.
fn sim_host_of(dc: &Dc, id: GuestId) -> Option<String> {
    dc.agents.iter().find(|a| a.sim.guests().iter().any(|s| s.id == id)).map(|a| a.name.clone())
}

#[tokio::test]
async fn clones_of_a_template_on_the_shared_pool_spread_over_hosts_and_keep_its_pool() {
    let dc = lab(3).await;
    let golden = shared_source(&dc, "golden", "host-1", false).await;
    dc.admin.set_template("golden", true).await.unwrap();

    // Without --host: placed as creates are, over every host of the pool.
    let accepted = dc.admin.clone_guest("golden", &clone_req("web", 6)).await.unwrap();
    for a in &accepted {
        dc.wait_succeeded(&a.operation).await;
    }
    let mut hosts = HashSet::new();
    for a in &accepted {
        let g = dc.admin.get_guest(&a.guest.to_string()).await.unwrap();
        assert_eq!((g.guest.state, g.guest.spec.storage), (GuestState::Running, Storage::Shared));
        let from = g.guest.spec.clone_of.unwrap();
        assert_eq!((from.guest, from.mode), (golden, CloneMode::Overlay));
        assert_eq!(sim_host_of(&dc, a.guest).as_deref(), Some(g.host_name.as_str()), "made where it is placed");
        hosts.insert(g.host_name);
    }
    assert_eq!(hosts.len(), 3, "six clones on three empty hosts spread over all: {hosts:?}");

    // --host is honoured.
    let req = CloneGuestRequest { host: Some("host-3".into()), ..clone_req("db", 1) };
    let acc = dc.admin.clone_guest("golden", &req).await.unwrap();
    dc.wait_succeeded(&acc[0].operation).await;
    assert_eq!(dc.admin.get_guest("db").await.unwrap().host_name, "host-3");
    assert_eq!(sim_host_of(&dc, acc[0].guest).as_deref(), Some("host-3"));

    // Its dependents on other hosts hold it as those on its own do.
    let view = dc.admin.get_guest("golden").await.unwrap();
    assert_eq!(view.dependents, ["db", "web-1", "web-2", "web-3", "web-4", "web-5", "web-6"]);
    let err = dc.admin.delete_guest("golden").await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("has dependents (db, web-1"), "{err}");
    let err = dc.admin.set_template("golden", false).await.unwrap_err();
    assert!(err.to_string().contains("is the base of clones (db, web-1"), "{err}");
    assert_eq!(dc.admin.list_guests().await.unwrap().len(), 8, "a refused delete changes nothing");
    assert_eq!(sim_host_of(&dc, golden).as_deref(), Some("host-1"));

    // A live migration leaves an overlay on the shared pool where it is: it
    // still stands on golden's file.
    let to = if dc.admin.get_guest("db").await.unwrap().host_name == "host-1" { "host-2" } else { "host-1" };
    let req = MigrateRequest { to: Some(to.into()), ..MigrateRequest::default() };
    let acc = dc.admin.migrate_guest("db", &req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let db = dc.admin.get_guest("db").await.unwrap();
    assert_eq!((db.host_name.as_str(), db.guest.spec.clone_of.map(|c| c.mode)), (to, Some(CloneMode::Overlay)));
    assert_eq!(dc.admin.get_guest("golden").await.unwrap().dependents.len(), 7);

    // A clone of a guest on local storage stays there, on its host.
    let local = source(&dc, "plain", false).await;
    let acc = dc.admin.clone_guest("plain", &clone_req("plain-c", 1)).await.unwrap();
    dc.wait_succeeded(&acc[0].operation).await;
    let (src, c) = (dc.admin.get_guest("plain").await.unwrap(), dc.admin.get_guest("plain-c").await.unwrap());
    assert_eq!((c.guest.spec.storage, c.host_name.as_str()), (Storage::Local, src.host_name.as_str()));
    assert_eq!(sim_host_of(&dc, local), sim_host_of(&dc, acc[0].guest));
    dc.shutdown().await;
}

#[tokio::test]
async fn a_clone_on_another_host_is_refused_for_local_disks_or_a_running_source_and_changes_nothing() {
    let mut dc = Dc::start(0).await;
    dc.add_agent("host-1", SimConfig::default()).await;
    // host-2 takes its time to make a clone: the source is held meanwhile.
    let slow = SimConfig { create_delay: Duration::from_millis(1500), ..SimConfig::default() };
    dc.add_agent("host-2", slow).await;
    dc.wait_hosts_up(2).await;
    let vlan = CreateVlanRequest { id: 100, name: "blue".into(), subnet: Some("10.0.100.0/24".into()), gateway: None };
    dc.admin.create_vlan(&vlan).await.unwrap();
    let local = CreateGuestRequest {
        disks: vec![ByteSize::gib(1).into()],
        start: Some(false),
        host: Some("host-1".into()),
        ..CreateGuestRequest::new("loc", 1, ByteSize::mib(256))
    };
    dc.wait_succeeded(&dc.admin.create_guest(&local).await.unwrap().operation).await;
    let run = shared_source(&dc, "run", "host-1", true).await;

    let to_2 = |name: &str| CloneGuestRequest { host: Some("host-2".into()), ..clone_req(name, 2) };
    let before = dc.admin.list_guests().await.unwrap().len();
    let err = dc.admin.clone_guest("loc", &to_2("x")).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    let text = err.to_string();
    assert!(text.contains("local pool") && text.contains("drove vm move-storage loc --to shared"), "{text}");
    let err = dc.admin.clone_guest("run", &to_2("x")).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    let text = err.to_string();
    assert!(text.contains("it runs") && text.contains("stop it, or make it a template"), "{text}");
    let req = CloneGuestRequest { host: Some("nope".into()), ..clone_req("x", 1) };
    assert_eq!(dc.admin.clone_guest("run", &req).await.unwrap_err().status(), Some(400));
    assert_eq!(dc.admin.list_guests().await.unwrap().len(), before, "refusals create nothing");
    assert_eq!(on_hosts(&dc).len(), before);

    // Without --host, a running source's clones stay on its host.
    let acc = dc.admin.clone_guest("run", &clone_req("near", 1)).await.unwrap();
    dc.wait_succeeded(&acc[0].operation).await;
    assert_eq!(dc.admin.get_guest("near").await.unwrap().host_name, "host-1");

    // Stopped, it can be copied on host-2; while host-2 copies its disks
    // from the pool, the source neither starts nor changes.
    dc.wait_succeeded(&dc.admin.stop_guest("run", false).await.unwrap().operation).await;
    let req = CloneGuestRequest { host: Some("host-2".into()), ..clone_req("far", 1) };
    let acc = dc.admin.clone_guest("run", &req).await.unwrap();
    let err = dc.admin.start_guest("run").await.unwrap_err();
    assert!(err.to_string().contains("being copied from the shared pool by clones on other hosts (far)"), "{err}");
    let snap = CreateSnapshotRequest { name: "s".into(), memory: false };
    let err = dc.admin.create_snapshot("run", &snap).await.unwrap_err();
    assert!(err.to_string().contains("being copied from the shared pool"), "{err}");
    dc.wait_succeeded(&acc[0].operation).await;
    let far = dc.admin.get_guest("far").await.unwrap();
    assert_eq!((far.host_name.as_str(), far.guest.spec.storage), ("host-2", Storage::Shared));
    assert_eq!(far.guest.spec.clone_of.unwrap().mode, CloneMode::Copy);
    assert_eq!(sim_host_of(&dc, acc[0].guest).as_deref(), Some("host-2"));
    // Made: the copy holds its source no more.
    dc.wait_succeeded(&dc.admin.start_guest("run").await.unwrap().operation).await;
    assert_eq!(sim_host_of(&dc, run).as_deref(), Some("host-1"));
    dc.shutdown().await;
}
