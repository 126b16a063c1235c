//! Kill the daemons of a running lab with SIGKILL in the middle of work and
//! check that what the manager acknowledged survives and the lab converges.
//!
//! The test drives a `drove up --backend sim` lab through the API client
//! (endpoint and token from the client config `up` wrote), kills the manager
//! while eight writers create guests, restarts it the way `up` started it,
//! and checks every acknowledged create and every operation seen succeeded.
//! Then it kills one agent and restarts it: its guests must keep running,
//! neither rebooted nor duplicated.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{CONVERGE_DEADLINE, Lab, alive, kill};
use drove_api::{CreateGuestRequest, GuestView, HostView};
use drove_client::Client;
use drove_model::{ByteSize, GuestId, GuestState, HostState, OperationId, OperationState};

const WRITERS: usize = 8;
/// Creates per writer at most, so a slow kill does not flood the lab.
const PER_WRITER: usize = 100;
/// Pause between two creates of one writer: the kill must land mid-stream.
const PACE: Duration = Duration::from_millis(20);
/// Hosts roomy enough that no create is refused for lack of room.
const HOST_CORES: &str = "128";
const HOST_MEMORY: &str = "64G";

/// A create the manager answered 202 to.
#[derive(Debug, Clone)]
struct Acked {
    name: String,
    guest: GuestId,
    op: OperationId,
}

/// What the test saw before the kill.
#[derive(Debug, Default)]
struct Seen {
    acked: Vec<Acked>,
    succeeded: HashSet<OperationId>,
    errors_before_kill: Vec<String>,
}

/// One guest in a sim agent's state file.
#[derive(Debug, Clone, PartialEq)]
struct SimGuest {
    host: String,
    state: String,
    pid: Option<u64>,
}

/// Poll `check` until it returns `Ok`, or panic with the last reason.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) if started.elapsed() > CONVERGE_DEADLINE => {
                panic!("{what}: not so after {}s; last seen: {why}", CONVERGE_DEADLINE.as_secs())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn wait_dead(pid: u32) {
    eventually(&format!("process {pid} dies after SIGKILL"), || async move {
        if alive(pid) { Err("still alive".to_owned()) } else { Ok(()) }
    })
    .await
}

/// The smallest guest. Built from JSON so that optional fields added to the
/// API later take their defaults here too.
fn request(name: &str) -> CreateGuestRequest {
    serde_json::from_value(serde_json::json!({ "name": name, "vcpus": 1, "memory": ByteSize::mib(16) })).unwrap()
}

/// Every guest the sim agents hold, from their state files.
fn sim_guests(lab: &Lab, hosts: &[String]) -> Vec<(GuestId, SimGuest)> {
    let mut out = Vec::new();
    for host in hosts {
        let path = lab.dir.join("hosts").join(host).join("sim-guests.json");
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        for g in v["guests"].as_array().unwrap_or_else(|| panic!("{}: no guests array", path.display())) {
            let id: GuestId = serde_json::from_value(g["config"]["id"].clone()).unwrap();
            let state = g["state"].as_str().unwrap_or_default().to_owned();
            out.push((id, SimGuest { host: host.clone(), state, pid: g["pid"].as_u64() }));
        }
    }
    out
}

/// No guest name or id twice; hosts hold exactly what their guests add up
/// to; each guest is defined once, on its own host, and runs there.
fn assert_consistent(lab: &Lab, host_names: &[String], guests: &[GuestView], hosts: &[HostView]) {
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for g in guests {
        assert!(names.insert(g.guest.spec.name.as_str()), "guest name {} listed twice", g.guest.spec.name);
        assert!(ids.insert(g.guest.id), "guest id {} listed twice", g.guest.id);
    }
    for h in hosts {
        let mine: Vec<&GuestView> = guests.iter().filter(|g| g.guest.host == h.info.id).collect();
        let vcpus: u32 = mine.iter().map(|g| g.guest.spec.vcpus).sum();
        let memory: u64 = mine.iter().map(|g| g.guest.spec.memory.bytes()).sum();
        assert_eq!(
            (h.allocated_vcpus, h.allocated_memory.bytes(), h.guests),
            (vcpus, memory, mine.len() as u32),
            "allocation of {} is not the sum of its guests",
            h.info.name
        );
    }
    let mut defined: HashMap<GuestId, SimGuest> = HashMap::new();
    for (id, g) in sim_guests(lab, host_names) {
        if let Some(other) = defined.insert(id, g.clone()) {
            panic!("guest {id} is defined twice on the hosts: {other:?} and {g:?}");
        }
    }
    for g in guests {
        let sim = defined.remove(&g.guest.id);
        assert!(
            sim.as_ref().is_some_and(|s| s.host == g.host_name && s.state == "running"),
            "guest {} ({}) placed on {} is {sim:?} on the hosts",
            g.guest.spec.name,
            g.guest.id,
            g.host_name
        );
    }
    assert!(defined.is_empty(), "the hosts run guests the manager does not know: {defined:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manager_sigkill_loses_nothing() {
    let mut lab = Lab::new();
    lab.up(&["--hosts", "3", "--host-cores", HOST_CORES, "--host-memory", HOST_MEMORY]).ok();
    let cfg = lab.client_config();
    let lab_file = lab.lab_file();
    let manager_pid = lab_file.manager_pid.expect("lab.json records the manager");
    let host_names: Vec<String> = lab_file.agents.iter().map(|(n, _)| n.clone()).collect();
    let client = Client::new(&cfg.endpoint, &cfg.token);

    // ---- writers, and a watcher of operations, until the manager dies ----
    let seen = Arc::new(Mutex::new(Seen::default()));
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (c, seen, killed) = (client.clone(), seen.clone(), killed.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                let name = format!("w{w}-{i}");
                match c.create_guest(&request(&name)).await {
                    Ok(a) => seen.lock().unwrap().acked.push(Acked { name, guest: a.guest, op: a.operation.id }),
                    Err(e) => {
                        if !killed.load(Ordering::SeqCst) {
                            seen.lock().unwrap().errors_before_kill.push(format!("create {name}: {e}"));
                        }
                        return;
                    }
                }
                tokio::time::sleep(PACE).await;
            }
        }));
    }
    {
        let (c, seen, killed) = (client.clone(), seen.clone(), killed.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                match c.list_operations().await {
                    Ok(ops) => seen
                        .lock()
                        .unwrap()
                        .succeeded
                        .extend(ops.iter().filter(|o| o.state == OperationState::Succeeded).map(|o| o.id)),
                    Err(e) => {
                        if !killed.load(Ordering::SeqCst) {
                            seen.lock().unwrap().errors_before_kill.push(format!("list operations: {e}"));
                        }
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    // Kill once creates are under way and some have finished.
    let started = Instant::now();
    eventually("writers get creates acknowledged and some finish", || async {
        let s = seen.lock().unwrap();
        if !s.errors_before_kill.is_empty() {
            panic!("the manager refused work before the kill: {:?}", s.errors_before_kill);
        }
        if started.elapsed() >= Duration::from_secs(1) && s.acked.len() >= WRITERS && !s.succeeded.is_empty() {
            Ok(())
        } else {
            Err(format!("{} acknowledged, {} succeeded", s.acked.len(), s.succeeded.len()))
        }
    })
    .await;
    killed.store(true, Ordering::SeqCst);
    kill(manager_pid, "KILL");
    for t in tasks {
        tokio::time::timeout(CONVERGE_DEADLINE, t).await.expect("a writer hung after the kill").unwrap();
    }
    wait_dead(manager_pid).await;
    let (acked, succeeded) = {
        let s = seen.lock().unwrap();
        assert!(
            s.errors_before_kill.is_empty(),
            "the manager refused work before the kill: {:?}",
            s.errors_before_kill
        );
        (s.acked.clone(), s.succeeded.clone())
    };
    eprintln!(
        "killed the manager after {} acknowledged creates, {} operations seen succeeded",
        acked.len(),
        succeeded.len()
    );

    // ---- restart the manager as `drove up` started it ----
    let listen = cfg.endpoint.strip_prefix("http://").unwrap().to_owned();
    let mdir = lab.dir.join("manager").display().to_string();
    let log = "manager-restarted.log";
    let mpid = lab.spawn_daemon(&["manager", "--data-dir", &mdir, "--listen", &listen], log);
    let started = Instant::now();
    loop {
        lab.assert_daemon_running(mpid, log);
        if client.list_hosts().await.is_ok() {
            break;
        }
        assert!(started.elapsed() < CONVERGE_DEADLINE, "the restarted manager did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nothing acknowledged is lost, nothing finished is undone.
    let guests = client.list_guests().await.unwrap();
    let listed: HashMap<GuestId, &GuestView> = guests.iter().map(|g| (g.guest.id, g)).collect();
    let lost: Vec<&str> = acked.iter().filter(|a| !listed.contains_key(&a.guest)).map(|a| a.name.as_str()).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged guests are gone after the restart: {lost:?}",
        lost.len(),
        acked.len()
    );
    for a in &acked {
        assert_eq!(listed[&a.guest].guest.spec.name, a.name);
    }
    for id in &succeeded {
        let op =
            client.get_operation(*id).await.unwrap_or_else(|e| panic!("operation {id} seen succeeded is gone: {e}"));
        assert_eq!(op.state, OperationState::Succeeded, "operation {id} was seen succeeded before the kill: {op:?}");
    }

    // The agents reconnect and everything converges.
    let (guests, hosts) = eventually("every guest runs and every create succeeds after the restart", || async {
        let guests = client.list_guests().await.map_err(|e| e.to_string())?;
        let hosts = client.list_hosts().await.map_err(|e| e.to_string())?;
        let not_running: Vec<String> = guests
            .iter()
            .filter(|g| g.guest.state != GuestState::Running)
            .map(|g| format!("{} {}", g.guest.spec.name, g.guest.state))
            .collect();
        if !not_running.is_empty() {
            return Err(format!(
                "{} guests not running, e.g. {:?}",
                not_running.len(),
                &not_running[..not_running.len().min(5)]
            ));
        }
        let ops = client.list_operations().await.map_err(|e| e.to_string())?;
        let unfinished: Vec<String> = ops
            .iter()
            .filter(|o| o.state != OperationState::Succeeded)
            .map(|o| format!("{} {} {}", o.kind, o.target_name, o.state))
            .collect();
        if !unfinished.is_empty() {
            return Err(format!("operations not succeeded: {unfinished:?}"));
        }
        if let Some(h) = hosts.iter().find(|h| h.info.state != HostState::Up) {
            return Err(format!("{} is {}", h.info.name, h.info.state));
        }
        Ok((guests, hosts))
    })
    .await;
    let acked_ops: HashSet<OperationId> = acked.iter().map(|a| a.op).collect();
    let ops = client.list_operations().await.unwrap();
    assert!(acked_ops.iter().all(|id| ops.iter().any(|o| o.id == *id)), "an acknowledged create's operation is gone");
    assert_consistent(&lab, &host_names, &guests, &hosts);

    // ---- SIGKILL one agent and restart it with the arguments `up` used ----
    let (victim, victim_pid) = lab_file
        .agents
        .iter()
        .max_by_key(|(name, _)| guests.iter().filter(|g| &g.host_name == name).count())
        .cloned()
        .unwrap();
    let before: HashMap<GuestId, u64> =
        guests.iter().filter(|g| g.host_name == victim).map(|g| (g.guest.id, g.guest.generation)).collect();
    assert!(!before.is_empty(), "{victim} has guests to keep");
    let total = guests.len();
    let pids_before: HashMap<GuestId, Option<u64>> =
        sim_guests(&lab, std::slice::from_ref(&victim)).into_iter().map(|(id, g)| (id, g.pid)).collect();
    kill(victim_pid, "KILL");
    wait_dead(victim_pid).await;
    let restarted = Instant::now();
    let log = format!("{victim}-restarted.log");
    let apid = lab.spawn_daemon(
        &[
            "agent",
            "--name",
            &victim,
            "--manager",
            &cfg.endpoint,
            "--token-file",
            &lab.dir.join("manager").join("agent.token").display().to_string(),
            "--backend",
            "sim",
            "--data-dir",
            &lab.dir.join("hosts").join(&victim).display().to_string(),
            "--cores",
            HOST_CORES,
            "--memory",
            HOST_MEMORY,
        ],
        &log,
    );

    // Wait for a heartbeat well after the restarted agent first reported,
    // so the manager has judged what the new agent observes.
    let mut first_seen: Option<u128> = None;
    let (guests, hosts) = loop {
        lab.assert_daemon_running(apid, &log);
        let since_restart = restarted.elapsed().as_millis();
        let hosts = client.list_hosts().await.unwrap();
        let h = hosts.iter().find(|h| h.info.name == victim).unwrap();
        let seen_at = h.last_seen_ms.map_or(0, |ms| since_restart.saturating_sub(u128::from(ms)));
        let why = if seen_at == 0 || h.info.state != HostState::Up {
            format!("{victim} is {} and not heard from since the restart", h.info.state)
        } else if seen_at < *first_seen.get_or_insert(seen_at) + 1200 {
            "waiting for a later heartbeat".to_owned()
        } else {
            let guests = client.list_guests().await.unwrap();
            match guests.iter().find(|g| g.guest.state != GuestState::Running) {
                None => break (guests, hosts),
                Some(g) => format!("{} is {}", g.guest.spec.name, g.guest.state),
            }
        };
        assert!(
            restarted.elapsed() < CONVERGE_DEADLINE,
            "{victim} did not report its running guests after its agent restarted: {why}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after: HashMap<GuestId, u64> =
        guests.iter().filter(|g| g.host_name == victim).map(|g| (g.guest.id, g.guest.generation)).collect();
    assert_eq!(
        after, before,
        "the guests of {victim} (and their generations) are what they were before its agent died"
    );
    let pids_after: HashMap<GuestId, Option<u64>> =
        sim_guests(&lab, std::slice::from_ref(&victim)).into_iter().map(|(id, g)| (id, g.pid)).collect();
    assert_eq!(
        pids_after, pids_before,
        "the guests of {victim} kept running through the agent restart (same processes)"
    );
    assert_eq!(guests.len(), total, "no guest appeared or vanished while an agent restarted");
    assert_consistent(&lab, &host_names, &guests, &hosts);
}
