//! High availability with simulated hosts: a dead host's guests restart on
//! the survivors, spread and highest priority first, never twice; a host
//! that comes back forgets them; admission control keeps the reserve.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Dc, fast_config};
use drove_api::{Admission, CreateGuestRequest, HaSettings};
use drove_hypervisor::RuntimeState;
use drove_hypervisor::sim::{SimConfig, SimHypervisor};
use drove_model::guest::Storage;
use drove_model::{ByteSize, GuestId, GuestState};

fn shared(name: &str, host: &str, priority: u8) -> CreateGuestRequest {
    let mut r = CreateGuestRequest::new(name, 1, ByteSize::mib(256));
    r.storage = Some(Storage::Shared);
    r.host = Some(host.into());
    r.priority = Some(priority);
    r
}

async fn ha_dc(hosts: usize, per_host: usize) -> Dc {
    ha_dc_with(hosts, per_host, SimConfig::default()).await
}

/// A data centre with short leases whose `hosts` sim hosts run `sim`.
async fn ha_dc_with(hosts: usize, per_host: usize, sim: SimConfig) -> Dc {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path());
    config.host_timeout = Duration::from_millis(1500);
    config.fencing_margin = Duration::from_millis(300);
    config.failover_per_host = per_host;
    let mut dc = Dc::start_with(dir, config, 0).await;
    for i in 1..=hosts {
        dc.add_agent(&format!("host-{i}"), sim.clone()).await;
    }
    dc.wait_hosts_up(hosts).await;
    dc
}

/// `n` running guests `{prefix}-{i}` on shared storage on host-1; their ids.
async fn shared_on_host_1(dc: &Dc, prefix: &str, n: usize) -> Vec<GuestId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let acc = dc.admin.create_guest(&shared(&format!("{prefix}-{i}"), "host-1", 50)).await.unwrap();
        dc.wait_succeeded(&acc.operation).await;
        ids.push(acc.guest);
    }
    ids
}

/// Host `i` loses power: its agent and every guest die.
async fn power_loss(dc: &mut Dc, i: usize) {
    dc.agents[i].stop().await;
    dc.agents[i].sim.crash_all().unwrap();
}

/// Samples every host's hypervisor until stopped; fails on any moment a
/// guest runs on two hosts.
struct Watcher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<usize, String>>,
}

impl Watcher {
    fn start(sims: Vec<(String, SimHypervisor)>) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = 0;
            while !flag.load(Ordering::SeqCst) {
                let mut seen: HashMap<_, &str> = HashMap::new();
                for (host, sim) in &sims {
                    for g in sim.guests().iter().filter(|g| g.state == RuntimeState::Running) {
                        if let Some(other) = seen.insert(g.id, host) {
                            return Err(format!("guest {} runs on {other} and {host}", g.id));
                        }
                    }
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(samples)
        });
        Watcher { stop, task }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.task.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert!(samples > 10, "the watcher barely looked ({samples} samples)");
    }
}

#[tokio::test]
async fn a_dead_hosts_guests_restart_spread_over_the_survivors_highest_priority_first() {
    let mut dc = ha_dc(4, 1).await;
    let prio = [10u8, 90, 50, 20, 70, 30];
    for (i, p) in prio.iter().enumerate() {
        let acc = dc.admin.create_guest(&shared(&format!("web-{i}"), "host-1", *p)).await.unwrap();
        dc.wait_succeeded(&acc.operation).await;
    }
    let mut local = CreateGuestRequest::new("db", 1, ByteSize::mib(256));
    local.host = Some("host-1".into());
    let db = dc.admin.create_guest(&local).await.unwrap();
    dc.wait_succeeded(&db.operation).await;

    // Before: the plan names where each would go.
    let plan = dc.admin.failover_plan("host-1").await.unwrap();
    assert_eq!(plan.restarts.len(), 6, "{plan:?}");
    assert_eq!(plan.restarts[0].guest, "web-1", "highest priority first: {plan:?}");
    assert_eq!(plan.stranded.len(), 1);
    assert!(plan.stranded[0].reason.contains("disks are on that host"), "{plan:?}");

    let watcher = Watcher::start(dc.agents.iter().map(|a| (a.name.clone(), a.sim.clone())).collect());
    // Power loss: the agent and every guest of host-1 die.
    power_loss(&mut dc, 0).await;

    let guests = dc
        .eventually("the shared guests run on survivors", || async {
            let all = dc.admin.list_guests().await.ok()?;
            let web: Vec<_> = all.into_iter().filter(|g| g.guest.spec.name.starts_with("web-")).collect();
            web.iter().all(|g| g.guest.state == GuestState::Running && g.host_name != "host-1").then_some(web)
        })
        .await;
    let mut per_host: HashMap<String, usize> = HashMap::new();
    for g in &guests {
        *per_host.entry(g.host_name.clone()).or_default() += 1;
        let f = g.guest.last_failover.as_ref().unwrap();
        assert_eq!(f.from, "host-1");
        assert!(f.detect_ms >= 1800, "restarted before the lease and margin ran out: {f:?}");
        assert!(f.running_ms.is_some());
        // The survivor runs it.
        let sim = &dc.agents.iter().find(|a| a.name == g.host_name).unwrap().sim;
        assert!(sim.guests().iter().any(|s| s.id == g.guest.id && s.state == RuntimeState::Running));
    }
    assert_eq!(per_host.len(), 3, "spread over all survivors: {per_host:?}");
    assert!(per_host.values().all(|&n| n == 2), "{per_host:?}");
    // Waves: one boot per host at a time, highest priority first.
    let at = |name: &str| {
        guests.iter().find(|g| g.guest.spec.name == name).unwrap().guest.last_failover.as_ref().unwrap().at_ms
    };
    assert!(at("web-1") <= at("web-0"), "priority 90 restarted after priority 10");

    // The local guest waits for its host, and says so.
    let d = dc.admin.get_guest("db").await.unwrap();
    assert_eq!(d.host_name, "host-1");
    assert!(d.guest.last_error.as_deref().unwrap().contains("disks are on that host"), "{d:?}");

    // The host comes back: it forgets the moved guests (never starting
    // them) and restarts its own.
    dc.restart_agent(0).await;
    dc.eventually("host-1 forgot the moved guests and runs db", || async {
        let on = dc.agents[0].sim.guests();
        (on.len() == 1 && on[0].id == db.guest && on[0].state == RuntimeState::Running).then_some(())
    })
    .await;
    let h = dc.admin.get_host("host-1").await.unwrap();
    assert_eq!(h.orphans, 0);
    watcher.finish().await;
    dc.shutdown().await;
}

#[tokio::test]
async fn a_manager_killed_mid_failover_finishes_it_after_restart_with_nothing_lost_or_doubled() {
    // Each guest's OS takes a while to come up, so the failover runs in
    // waves (one boot per survivor at a time) and the manager dies between
    // them.
    let os_boot = Duration::from_millis(600);
    let mut dc = ha_dc_with(3, 1, SimConfig { os_boot_delay: os_boot, ..Default::default() }).await;
    let ids: HashSet<GuestId> = shared_on_host_1(&dc, "app", 4).await.into_iter().collect();
    let watcher = Watcher::start(dc.agents.iter().map(|a| (a.name.clone(), a.sim.clone())).collect());
    power_loss(&mut dc, 0).await;
    dc.eventually("the failover began", || async {
        let all = dc.admin.list_guests().await.ok()?;
        all.iter().any(|g| g.host_name != "host-1").then_some(())
    })
    .await;
    dc.restart_manager().await;
    let restarted_at = drove_manager::now_ms();
    let all = dc
        .eventually("every guest runs on a survivor", || async {
            let all = dc.admin.list_guests().await.ok()?;
            all.iter().all(|g| g.guest.state == GuestState::Running && g.host_name != "host-1").then_some(all)
        })
        .await;
    assert_eq!(all.iter().map(|g| g.guest.id).collect::<HashSet<_>>(), ids, "a guest was lost or added");
    // The host's lease ran out under the old manager, and the store says
    // so: the new one carries on with the next wave as soon as the first
    // is up, instead of granting the dead host a new lease (1.5 s) first.
    let after: Vec<u64> =
        all.iter().map(|g| g.guest.last_failover.as_ref().unwrap().at_ms).filter(|&at| at >= restarted_at).collect();
    assert!(!after.is_empty(), "the whole failover happened before the restart; the test proves nothing");
    let lease = dc.config.host_timeout.as_millis() as u64;
    for at in &after {
        assert!(
            at - restarted_at < os_boot.as_millis() as u64 + lease / 2,
            "the restarted manager waited {} ms to carry on (the dead host got a new lease?)",
            at - restarted_at
        );
    }
    let running: usize =
        dc.agents[1..].iter().map(|a| a.sim.guests().iter().filter(|g| g.state == RuntimeState::Running).count()).sum();
    assert_eq!(running, 4);
    watcher.finish().await;
    dc.shutdown().await;
}

#[tokio::test]
async fn admission_control_keeps_room_to_restart_every_guest_after_the_tolerated_failures() {
    let dc = ha_dc(3, 2).await;
    // Sim hosts offer 16 GiB each, the guests take 4 GiB: with 8 guests a
    // lost 3-guest host restarts on 4 + 8 GiB free; a 9th leaves 4 + 4.
    let big = |name: &str, host: &str| {
        let mut r = shared(name, host, 50);
        r.memory = ByteSize::gib(4);
        r
    };
    let refused = dc.admin.set_ha(&HaSettings { tolerate_failures: 3, admission: Admission::Refuse }).await;
    assert!(refused.unwrap_err().to_string().contains("cannot tolerate 3 host failures with 3 hosts"));
    let status = dc.admin.set_ha(&HaSettings { tolerate_failures: 1, admission: Admission::Refuse }).await.unwrap();
    assert_eq!(status.shortfall, None);
    for i in 0..8 {
        let acc = dc.admin.create_guest(&big(&format!("g{i}"), &format!("host-{}", i % 3 + 1))).await.unwrap();
        dc.wait_succeeded(&acc.operation).await;
    }
    // A ninth would leave too little: refused, and nothing was made.
    let err = dc.admin.create_guest(&big("g8", "host-3")).await.unwrap_err().to_string();
    assert!(err.contains("too little reserve to tolerate 1 host failure"), "{err}");
    assert!(err.contains("could not restart"), "{err}");
    assert!(dc.admin.get_guest("g8").await.is_err());
    // Warn mode admits it; the status then says the reserve is short.
    dc.admin.set_ha(&HaSettings { tolerate_failures: 1, admission: Admission::Warn }).await.unwrap();
    let acc = dc.admin.create_guest(&big("g8", "host-3")).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
    let status = dc.admin.ha().await.unwrap();
    assert!(status.shortfall.is_some(), "{status:?}");
    dc.shutdown().await;
}

#[tokio::test]
async fn anti_affinity_keeps_a_group_apart_in_placement_migration_and_failover() {
    let mut dc = ha_dc(3, 2).await;
    let member = |name: &str, host: Option<&str>| {
        let mut r = shared(name, host.unwrap_or("host-1"), 50);
        r.host = host.map(str::to_owned);
        r.anti_affinity = Some("db".into());
        r
    };
    for i in 0..3 {
        let acc = dc.admin.create_guest(&member(&format!("db-{i}"), None)).await.unwrap();
        dc.wait_succeeded(&acc.operation).await;
    }
    let hosts: HashSet<String> = dc.admin.list_guests().await.unwrap().into_iter().map(|g| g.host_name).collect();
    assert_eq!(hosts.len(), 3, "one member per host: {hosts:?}");
    // A fourth has nowhere to go; pinning it next to a member is refused.
    let err = dc.admin.create_guest(&member("db-3", None)).await.unwrap_err().to_string();
    assert!(err.contains("anti-affinity group db"), "{err}");
    let err = dc.admin.create_guest(&member("db-3", Some("host-2"))).await.unwrap_err().to_string();
    assert!(err.contains("runs guest db-") && err.contains("never share a host"), "{err}");
    // Nor does a migration put two together.
    let req = drove_api::MigrateRequest { to: Some("host-3".into()), ..Default::default() };
    let on1 = dc.admin.list_guests().await.unwrap().into_iter().find(|g| g.host_name == "host-1").unwrap();
    let err = dc.admin.migrate_guest(&on1.guest.spec.name, &req).await.unwrap_err().to_string();
    assert!(err.contains("anti-affinity group db"), "{err}");
    // host-1 dies: its member cannot join the others, and says why; an
    // unrelated guest of host-1 restarts.
    let other = dc.admin.create_guest(&shared("cache", "host-1", 50)).await.unwrap();
    dc.wait_succeeded(&other.operation).await;
    let plan = dc.admin.failover_plan("host-1").await.unwrap();
    assert_eq!(plan.restarts.len(), 1, "{plan:?}");
    assert!(plan.stranded[0].reason.contains("anti-affinity group db"), "{plan:?}");
    power_loss(&mut dc, 0).await;
    dc.eventually("cache restarted elsewhere", || async {
        let g = dc.admin.get_guest("cache").await.ok()?;
        (g.host_name != "host-1" && g.guest.state == GuestState::Running).then_some(())
    })
    .await;
    let g = dc.admin.get_guest(&on1.guest.spec.name).await.unwrap();
    assert_eq!(g.host_name, "host-1");
    assert!(g.guest.last_error.unwrap().contains("anti-affinity group db"));
    dc.shutdown().await;
}

/// A host that only went silent (its agent hung; its guests run on): the
/// failover's restarts cannot start (the running copy holds the disk's
/// lock), and when the host is heard from again it keeps its guests, which
/// never stopped, and the survivors forget their stillborn copies.
#[tokio::test]
async fn a_host_thought_dead_but_only_silent_keeps_its_running_guests() {
    let mut dc = ha_dc(3, 2).await;
    shared_on_host_1(&dc, "s", 2).await;
    let pids: Vec<_> = dc.agents[0].sim.guests().iter().map(|g| g.pid).collect();
    let watcher = Watcher::start(dc.agents.iter().map(|a| (a.name.clone(), a.sim.clone())).collect());
    dc.agents[0].stop().await;
    dc.eventually("the restarts elsewhere failed on the disk lock", || async {
        let all = dc.admin.list_guests().await.ok()?;
        all.iter().all(|g| g.host_name != "host-1" && g.guest.state == GuestState::Failed).then_some(())
    })
    .await;
    dc.restart_agent(0).await;
    dc.eventually("host-1 has its guests back, the others forgot them", || async {
        let all = dc.admin.list_guests().await.ok()?;
        let back = all.iter().all(|g| g.host_name == "host-1" && g.guest.state == GuestState::Running);
        let forgotten = dc.agents[1..].iter().all(|a| a.sim.guests().is_empty());
        (back && forgotten).then_some(())
    })
    .await;
    // They never stopped.
    let now: Vec<_> = dc.agents[0].sim.guests().iter().map(|g| g.pid).collect();
    assert_eq!(now, pids);
    let g = dc.admin.get_guest("s-0").await.unwrap();
    assert!(g.guest.last_error.unwrap().contains("came back with it running"));
    watcher.finish().await;
    dc.shutdown().await;
}

/// The boot throttle lasts until a restarted guest's OS is up (its guest
/// agent answers), not only until its process runs: a survivor boots
/// `failover_per_host` guests at a time.
#[tokio::test]
async fn failover_boots_wait_for_the_guests_os_before_the_next_wave() {
    let os_boot = Duration::from_millis(1200);
    let mut dc = ha_dc_with(3, 1, SimConfig { os_boot_delay: os_boot, ..Default::default() }).await;
    shared_on_host_1(&dc, "w", 4).await;
    power_loss(&mut dc, 0).await;
    let all = dc
        .eventually("all four up on the survivors", || async {
            let all = dc.admin.list_guests().await.ok()?;
            all.iter().all(|g| g.guest.last_failover.as_ref().is_some_and(|f| f.ready_ms.is_some())).then_some(all)
        })
        .await;
    let mut at: Vec<u64> = all.iter().map(|g| g.guest.last_failover.as_ref().unwrap().at_ms).collect();
    at.sort();
    // Two survivors, one boot each at a time: two waves.
    assert!(at[1] - at[0] < 500, "the first wave starts together: {at:?}");
    assert!(
        at[2] - at[0] >= os_boot.as_millis() as u64 - 100,
        "the second wave came before the first one's OS was up: {at:?}"
    );
    for g in &all {
        let f = g.guest.last_failover.as_ref().unwrap();
        assert!(f.ready_ms.unwrap() >= f.running_ms.unwrap(), "{f:?}");
    }
    dc.shutdown().await;
}
