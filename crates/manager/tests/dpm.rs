//! Power management (DPM) in the live manager with sim agents: quiet hosts
//! are emptied by live migration and put into standby (their agents
//! stopped through the power driver), standby hosts are never taken for
//! dead, they wake ahead of load, and bad requests and failing drivers
//! leave every host usable.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Dc, fast_config, spawn_agent};
use drove_api::CreateGuestRequest;
use drove_hypervisor::sim::{SimConfig, SimHypervisor};
use drove_manager::dpm::{DpmConfig, DpmMode};
use drove_manager::power::{PowerAction, PowerDriver, PowerError, PowerTarget};
use drove_model::guest::LoadProfile;
use drove_model::{ByteSize, GuestState, HostState};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The sim data centre's power switches: powering a host off stops its
/// agent (the host falls silent), powering it on starts a new agent on the
/// same sim state, as a host that boots again would.
#[derive(Clone, Default)]
struct Panel(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    endpoint: String,
    token: String,
    hosts: HashMap<String, Switch>,
    log: Vec<String>,
    /// Make powering off fail, as a BMC that does not answer.
    refuse_off: bool,
    /// Accept powering on but let the host not come up.
    dead_on: bool,
    /// Accept powering off but leave the host on (a request lost on the
    /// way, or a manager that stopped before sending it).
    lost_off: bool,
}

struct Switch {
    sim: SimHypervisor,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for Panel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Panel")
    }
}

impl Panel {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap()
    }

    fn add(&self, dc: &Dc, name: &str) {
        let sim =
            SimHypervisor::with_state_file(SimConfig::default(), dc.dir.path().join(format!("{name}.json"))).unwrap();
        sim.join_pool(&dc.pool);
        let mut i = self.inner();
        i.endpoint = dc.endpoint.clone();
        i.token = dc.agent_token.clone();
        let running = Some(spawn_agent(&i.endpoint, &i.token, name, &sim));
        i.hosts.insert(name.into(), Switch { sim, running });
    }

    fn log(&self) -> Vec<String> {
        self.inner().log.clone()
    }

    fn is_on(&self, name: &str) -> bool {
        self.inner().hosts.get(name).is_some_and(|s| s.running.is_some())
    }

    async fn shutdown(&self) {
        let all: Vec<_> = self.inner().hosts.values_mut().filter_map(|s| s.running.take()).collect();
        for (tx, task) in all {
            let _ = tx.send(());
            let _ = task.await;
        }
    }
}

#[async_trait::async_trait]
impl PowerDriver for Panel {
    fn name(&self) -> &'static str {
        "test-panel"
    }

    async fn power(&self, host: &PowerTarget, action: PowerAction) -> Result<(), PowerError> {
        let stopping = {
            let mut i = self.inner();
            i.log.push(format!("{} {}", host.name, action.as_str()));
            if action == PowerAction::Off && i.refuse_off {
                return Err(PowerError::Failed {
                    host: host.name.clone(),
                    action: "off",
                    program: "bmc".into(),
                    status: "exit status: 1".into(),
                    stderr: "BMC not answering".into(),
                });
            }
            let (endpoint, token, dead_on, lost_off) = (i.endpoint.clone(), i.token.clone(), i.dead_on, i.lost_off);
            let Some(sw) = i.hosts.get_mut(&host.name) else {
                return Err(PowerError::Unsupported { driver: "panel", action: "any", why: "unknown host".into() });
            };
            match action {
                PowerAction::Off if lost_off => None,
                PowerAction::Off => sw.running.take(),
                PowerAction::On => {
                    if sw.running.is_none() && !dead_on {
                        sw.running = Some(spawn_agent(&endpoint, &token, &host.name, &sw.sim));
                    }
                    None
                }
            }
        };
        if let Some((tx, task)) = stopping {
            let _ = tx.send(());
            let _ = task.await;
        }
        Ok(())
    }
}

async fn dc_with(mode: DpmMode, hosts: usize, wake_timeout: Duration) -> (Dc, Panel) {
    let dir = tempfile::tempdir().unwrap();
    let panel = Panel::default();
    let mut config = fast_config(dir.path());
    config.dpm = DpmConfig {
        mode,
        interval: Duration::from_millis(200),
        lookahead_hours: 2,
        wake_timeout,
        driver: Arc::new(panel.clone()),
        ..DpmConfig::default()
    };
    let dc = Dc::start_with(dir, config, 0).await;
    for i in 1..=hosts {
        panel.add(&dc, &format!("host-{i}"));
    }
    dc.wait_hosts_up(hosts).await;
    (dc, panel)
}

/// A running 1-vCPU guest on `host` using `share` of its vCPU all day.
async fn guest_on(dc: &Dc, name: &str, host: &str, vcpus: u32, share: f32) {
    let req = CreateGuestRequest {
        disks: vec![ByteSize::gib(1).into()],
        host: Some(host.into()),
        load_profile: Some(LoadProfile { hourly_cpu: vec![share; 24] }),
        ..CreateGuestRequest::new(name, vcpus, ByteSize::mib(256))
    };
    let acc = dc.admin.create_guest(&req).await.unwrap();
    dc.wait_succeeded(&acc.operation).await;
}

async fn states(dc: &Dc) -> HashMap<String, HostState> {
    dc.admin.list_hosts().await.unwrap().into_iter().map(|h| (h.info.name, h.info.state)).collect()
}

#[tokio::test]
async fn full_mode_empties_quiet_hosts_into_standby_and_wakes_them_ahead_of_load() {
    let (dc, panel) = dc_with(DpmMode::Full, 3, Duration::from_secs(30)).await;
    for i in 1..=3 {
        guest_on(&dc, &format!("quiet-{i}"), &format!("host-{i}"), 1, 0.1).await;
    }
    // Two hosts emptied one at a time, by live migration, then powered off.
    let on = dc
        .eventually("two hosts in standby", || async {
            let s = states(&dc).await;
            (s.values().filter(|st| **st == HostState::Standby).count() == 2)
                .then(|| s.into_iter().find(|(_, st)| *st == HostState::Up).map(|(n, _)| n))
                .flatten()
        })
        .await;
    let guests = dc.admin.list_guests().await.unwrap();
    assert!(guests.iter().all(|g| g.host_name == on && g.guest.state == GuestState::Running), "{guests:?}");
    for h in ["host-1", "host-2", "host-3"].into_iter().filter(|h| *h != on) {
        assert!(!panel.is_on(h), "{h} is in standby but its agent runs");
        assert!(panel.log().contains(&format!("{h} off")), "{:?}", panel.log());
    }
    // Standby hosts fall silent for longer than the host timeout: they
    // stay in standby (no failover, nothing to fence), guests untouched.
    tokio::time::sleep(dc.config.host_timeout + Duration::from_secs(1)).await;
    let s = states(&dc).await;
    assert_eq!(s.values().filter(|st| **st == HostState::Standby).count(), 2, "{s:?}");
    let after = dc.admin.list_guests().await.unwrap();
    assert!(after.iter().all(|g| g.host_name == on && g.guest.state == GuestState::Running), "{after:?}");
    let round = dc.admin.dpm_status().await.unwrap();
    assert_eq!((round.mode.as_str(), round.hosts_standby, round.hosts_on), ("full", 2, 1), "{round:?}");
    assert!(round.watts_saved > 0.0 && round.errors.is_empty(), "{round:?}");
    let token = std::fs::read_to_string(dc.config.data_dir.join("admin.token")).unwrap();
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", dc.endpoint))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("drove_hosts{state=\"standby\"} 2"), "{metrics}");
    assert!(metrics.contains("drove_power_saved_watts "), "{metrics}");
    let audit = dc.admin.audit(0, 1000).await.unwrap();
    let by_dpm: Vec<_> = audit.iter().filter(|r| r.principal == "dpm").map(|r| r.action.as_str()).collect();
    assert_eq!(by_dpm.iter().filter(|a| a.contains("standby")).count(), 2, "{by_dpm:?}");
    assert_eq!(by_dpm.iter().filter(|a| a.contains("consolidate")).count(), 2, "{by_dpm:?}");

    // Load is coming: four busy guests (2 vCPUs at 90 %) join the host on.
    // 7.5 cores in the hours ahead need three hosts at 70 %: both wake.
    for i in 1..=4 {
        guest_on(&dc, &format!("busy-{i}"), &on, 2, 0.9).await;
    }
    dc.eventually("both standby hosts woken and up", || async {
        states(&dc).await.values().all(|st| *st == HostState::Up).then_some(())
    })
    .await;
    assert_eq!(panel.log().iter().filter(|l| l.ends_with(" on")).count(), 2, "{:?}", panel.log());
    // And they stay on: emptying one would leave too little for the load.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(states(&dc).await.values().all(|st| *st == HostState::Up));
    let round = dc.admin.dpm_status().await.unwrap();
    assert!(round.standby.is_empty() && round.moves.is_empty(), "{round:?}");
    panel.shutdown().await;
    dc.shutdown().await;
}

#[tokio::test]
async fn manual_mode_recommends_with_reasons_and_touches_nothing() {
    let (dc, panel) = dc_with(DpmMode::Manual, 3, Duration::from_secs(30)).await;
    for i in 1..=3 {
        guest_on(&dc, &format!("quiet-{i}"), &format!("host-{i}"), 1, 0.1).await;
    }
    let round = dc
        .eventually("a DPM round that recommends a standby", || async {
            let r = dc.admin.dpm_status().await.ok()?;
            (!r.standby.is_empty()).then_some(r)
        })
        .await;
    assert_eq!(round.mode, "manual");
    let s = &round.standby[0];
    assert!(!s.done && s.reason.contains("fit on the other hosts"), "{round:?}");
    assert!(!round.moves.is_empty() && round.moves.iter().all(|m| m.operation.is_none()), "{round:?}");
    assert!(round.moves.iter().all(|m| m.from == s.host && m.kind == "evacuate"), "{round:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(states(&dc).await.values().all(|st| *st == HostState::Up));
    assert!(panel.log().is_empty(), "{:?}", panel.log());
    let guests = dc.admin.list_guests().await.unwrap();
    for i in 1..=3 {
        let g = guests.iter().find(|g| g.guest.spec.name == format!("quiet-{i}")).unwrap();
        assert_eq!(g.host_name, format!("host-{i}"), "nothing moved");
    }
    panel.shutdown().await;
    dc.shutdown().await;
}

#[tokio::test]
async fn standby_and_wake_refuse_what_is_unsafe_and_a_failing_driver_leaves_the_host_on() {
    let (dc, panel) = dc_with(DpmMode::Manual, 3, Duration::from_secs(30)).await;
    guest_on(&dc, "web", "host-1", 1, 0.1).await;

    let e = dc.admin.standby_host("host-1").await.unwrap_err().to_string();
    assert!(e.contains("holds 1 guest") && e.contains("drove host drain host-1"), "{e}");
    let e = dc.admin.wake_host("host-2").await.unwrap_err().to_string();
    assert!(e.contains("host-2 is up") && e.contains("only a host in standby or down"), "{e}");
    let e = dc.admin.standby_host("host-9").await.unwrap_err().to_string();
    assert!(e.contains("host-9"), "{e}");

    // The BMC does not answer: the host stays on (waking, then up).
    panel.inner().refuse_off = true;
    let e = dc.admin.standby_host("host-3").await.unwrap_err().to_string();
    assert!(e.contains("BMC not answering") && e.contains("host-3 stays on"), "{e}");
    dc.eventually("host-3 up again", || async { (states(&dc).await["host-3"] == HostState::Up).then_some(()) }).await;
    assert!(panel.is_on("host-3"));

    // It works now: powered off, and nothing is placed on it.
    panel.inner().refuse_off = false;
    let h = dc.admin.standby_host("host-3").await.unwrap();
    assert_eq!(h.info.state, HostState::Standby);
    assert!(!panel.is_on("host-3"));
    let pinned =
        CreateGuestRequest { host: Some("host-3".into()), ..CreateGuestRequest::new("x", 1, ByteSize::mib(256)) };
    let e = dc.admin.create_guest(&pinned).await.unwrap_err().to_string();
    assert!(e.contains("host-3"), "{e}");
    for i in 0..3 {
        let acc =
            dc.admin.create_guest(&CreateGuestRequest::new(&format!("g{i}"), 1, ByteSize::mib(256))).await.unwrap();
        dc.wait_succeeded(&acc.operation).await;
    }
    let guests = dc.admin.list_guests().await.unwrap();
    assert!(guests.iter().all(|g| g.host_name != "host-3"), "{guests:?}");
    let e = dc.admin.standby_host("host-3").await.unwrap_err().to_string();
    assert!(e.contains("host-3 is standby"), "{e}");

    // Woken by hand: waking until its agent registers, then up.
    let h = dc.admin.wake_host("host-3").await.unwrap();
    assert!(matches!(h.info.state, HostState::Waking | HostState::Up), "{h:?}");
    dc.eventually("host-3 up", || async { (states(&dc).await["host-3"] == HostState::Up).then_some(()) }).await;
    let audit = dc.admin.audit(0, 1000).await.unwrap();
    let host3: Vec<_> = audit
        .iter()
        .filter(|r| r.target.as_deref() == Some("host/host-3") && r.principal == "admin")
        .map(|r| (r.action.rsplit('/').next().unwrap(), r.result.as_str()))
        .collect();
    assert_eq!(host3, [("standby", "failed"), ("standby", "ok"), ("wake", "ok")], "{host3:?}");
    panel.shutdown().await;
    dc.shutdown().await;
}

#[tokio::test]
async fn a_host_that_does_not_come_up_after_waking_is_down_and_said_so() {
    let (dc, panel) = dc_with(DpmMode::Manual, 2, Duration::from_secs(1)).await;
    dc.admin.standby_host("host-2").await.unwrap();
    panel.inner().dead_on = true;
    let h = dc.admin.wake_host("host-2").await.unwrap();
    assert_eq!(h.info.state, HostState::Waking);
    dc.eventually("host-2 down after the wake timeout", || async {
        (states(&dc).await["host-2"] == HostState::Down).then_some(())
    })
    .await;
    let round = dc
        .eventually("the round says why", || async {
            let r = dc.admin.dpm_status().await.ok()?;
            r.errors.iter().any(|e| e.contains("host-2 did not report in")).then_some(r)
        })
        .await;
    assert_eq!(round.hosts_standby, 0);
    // A down host can be powered on again; this time it comes up.
    panel.inner().dead_on = false;
    dc.admin.wake_host("host-2").await.unwrap();
    dc.eventually("host-2 up", || async { (states(&dc).await["host-2"] == HostState::Up).then_some(()) }).await;
    panel.shutdown().await;
    dc.shutdown().await;
}

#[tokio::test]
async fn a_standby_host_that_still_reports_in_is_powered_off_again() {
    let (dc, panel) = {
        let dir = tempfile::tempdir().unwrap();
        let panel = Panel::default();
        panel.inner().lost_off = true;
        let mut config = fast_config(dir.path());
        config.dpm = DpmConfig {
            mode: DpmMode::Full,
            interval: Duration::from_millis(200),
            driver: Arc::new(panel.clone()),
            ..DpmConfig::default()
        };
        let dc = Dc::start_with(dir, config, 0).await;
        for i in 1..=2 {
            panel.add(&dc, &format!("host-{i}"));
        }
        dc.wait_hosts_up(2).await;
        (dc, panel)
    };
    // Two empty hosts: DPM keeps one on and powers the other off, which
    // does not happen; its agent goes on reporting in.
    let (off, _) = dc
        .eventually("the power-off asked for twice", || async {
            let log = panel.log();
            let first = log.first()?.clone();
            (log.iter().filter(|l| **l == first).count() >= 2)
                .then(|| first.split_once(' ').map(|(h, a)| (h.to_owned(), a.to_owned())))
                .flatten()
        })
        .await;
    assert_eq!(states(&dc).await[&off], HostState::Standby);
    assert!(panel.is_on(&off));
    panel.inner().lost_off = false;
    dc.eventually("the host really off", || async { (!panel.is_on(&off)).then_some(()) }).await;
    let before = panel.log().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(panel.log().len(), before, "once off, it is left alone: {:?}", panel.log());
    assert_eq!(states(&dc).await[&off], HostState::Standby);
    panel.shutdown().await;
    dc.shutdown().await;
}

#[tokio::test]
async fn a_host_stays_on_when_ha_needs_its_room() {
    let (dc, panel) = dc_with(DpmMode::Manual, 2, Duration::from_secs(30)).await;
    guest_on(&dc, "db", "host-1", 1, 0.1).await;
    let ha = drove_api::HaSettings { tolerate_failures: 1, admission: drove_api::Admission::Refuse };
    dc.admin.set_ha(&ha).await.unwrap();
    let e = dc.admin.standby_host("host-2").await.unwrap_err().to_string();
    assert!(e.contains("host-2 must stay on for HA"), "{e}");
    assert_eq!(states(&dc).await["host-2"], HostState::Up);
    assert!(panel.log().is_empty());
    panel.shutdown().await;
    dc.shutdown().await;
}
