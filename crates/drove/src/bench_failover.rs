//! `drove bench failover`: a lab host with six real QEMU guests on shared
//! storage loses power (`drove lab fail --mode kill`); the time until every
//! guest answers on the survivors, per phase, over several runs. Also the
//! time the manager's failover planner takes for a 100-guest host in a
//! 1,000-host / 50,000-guest cluster.
//!
//! Phases, from the kill: the manager marks the host down (its lease ran
//! out), reassigns the guests (lease plus fencing margin), the survivors
//! report them running (booted to the guest agent's start), and every guest
//! answers a command through its guest agent.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use drove_api::CreateGuestRequest;
use drove_client::Client;
use drove_model::guest::Storage;
use drove_model::{ByteSize, HostId, HostState};
use drove_placement::{Evacuee, HostCapacity, Policy, Request, plan_restarts};
use serde::Serialize;

use crate::bench::percentile;
use crate::bench_boot::BenchLab;
use crate::bench_net::wait_booted;
use crate::{Format, OutputArgs};

#[derive(Debug, Args)]
pub struct FailoverBench {
    /// Host failures to measure.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Guests on the failing host.
    #[arg(long, default_value_t = 6)]
    pub guests: usize,
    /// Only time the planner (no lab, no QEMU).
    #[arg(long)]
    pub plan_only: bool,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Serialize)]
struct Run {
    /// The same guests' first boot, for comparison: created on host-1 until
    /// all answer (as many boots at once on the same shared cores).
    cold_boot_s: f64,
    down_s: f64,
    reassigned_s: f64,
    running_s: f64,
    /// Their guest agents answered their hosts' readiness probes.
    ready_s: f64,
    answering_s: f64,
    spread: Vec<(String, usize)>,
}

#[derive(Debug, Serialize)]
struct Figures {
    runs: Vec<Run>,
    answering_p50_s: f64,
    answering_max_s: f64,
    plan_hosts: usize,
    plan_guests: usize,
    plan_evacuees: usize,
    plan_ms_p50: f64,
    plan_ms_max: f64,
}

/// Times `plan_restarts` for a 100-guest host among 1,000 hosts holding
/// 50,000 guests in all (the survivors' allocations as the manager holds
/// them); median and max over 20 plans, ms.
fn time_planner() -> (usize, usize, usize, f64, f64) {
    const HOSTS: usize = 1000;
    const GUESTS: usize = 50_000;
    const EVACUEES: usize = 100;
    let per_host = (GUESTS / HOSTS) as u32;
    let hosts: Vec<HostCapacity> = (0..HOSTS - 1)
        .map(|i| HostCapacity {
            id: HostId::new_v4(),
            name: format!("h{i}"),
            schedulable: true,
            cores: 64,
            memory: ByteSize::gib(512),
            // 50 guests of 1-4 vCPUs and 2-8 GiB, varying by host.
            allocated_vcpus: per_host * (1 + (i % 4) as u32),
            allocated_memory: ByteSize::gib(u64::from(per_host) * (2 + (i % 4) as u64) + (i % 7) as u64),
            uplink_bps: None,
            allocated_nic_bps: 0,
        })
        .collect();
    let evacuees: Vec<Evacuee<usize>> = (0..EVACUEES)
        .map(|i| Evacuee {
            guest: i,
            request: Request { vcpus: 1 + (i % 4) as u32, memory: ByteSize::gib(2 + (i % 4) as u64), nic_bps: 0 },
            priority: (i * 37 % 101) as u8,
            // A quarter of them replicas kept apart.
            group: (i % 4 == 0).then(|| format!("svc-{}", i % 50)),
        })
        .collect();
    // Each host already runs a member of one of 50 groups.
    let groups: drove_placement::HostGroups =
        hosts.iter().enumerate().map(|(i, h)| (h.id, [format!("svc-{}", i % 50)].into_iter().collect())).collect();
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let plan = plan_restarts(&hosts, &evacuees, &Default::default(), &groups, 2, &Policy::default());
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(plan.restarts.len(), EVACUEES, "the benchmark cluster has room for every guest");
    }
    times.sort_by(f64::total_cmp);
    (HOSTS, GUESTS, EVACUEES, percentile(&times, 0.5), times[times.len() - 1])
}

async fn create(c: &Client, name: &str) -> Result<()> {
    let req = CreateGuestRequest {
        host: Some("host-1".into()),
        disks: vec![ByteSize::mib(16).into()],
        storage: Some(Storage::Shared),
        ..CreateGuestRequest::new(name, 1, ByteSize::mib(128))
    };
    let acc = c.create_guest(&req).await.with_context(|| format!("creating {name}"))?;
    let op = c.wait_operation(acc.operation.id, Duration::from_secs(180)).await?;
    if op.state != drove_model::OperationState::Succeeded {
        bail!("creating {name} failed: {}", op.error.unwrap_or_default());
    }
    Ok(())
}

async fn one_run(lab: &BenchLab, c: &Client, n: usize, run: usize) -> Result<Run> {
    let names: Vec<String> = (0..n).map(|i| format!("f{run}-{i}")).collect();
    let boot = Instant::now();
    for name in &names {
        create(c, name).await?;
    }
    for name in &names {
        wait_booted(c, name).await?;
    }
    let cold_boot_s = boot.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let t0_ms = drove_manager::now_ms();
    lab.fail("host-1", "kill")?;
    // Each guest watched on its own, so one slow answer does not delay
    // noticing another's.
    let watch = |name: String| {
        let c = c.clone();
        async move {
            loop {
                if t0.elapsed() > Duration::from_secs(180) {
                    bail!("guest {name} did not answer on a survivor within 180 s");
                }
                let g = c.get_guest(&name).await?;
                if g.host_name != "host-1" && g.guest.state == drove_model::GuestState::Running {
                    let req =
                        drove_api::ExecRequest { command: vec!["true".into()], input: None, timeout_secs: Some(2) };
                    if c.exec(&name, &req).await.is_ok_and(|r| r.exit_code == 0) {
                        return Ok(t0.elapsed().as_secs_f64());
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let down_watch = async {
        loop {
            if t0.elapsed() > Duration::from_secs(180) {
                return None;
            }
            if c.get_host("host-1").await.is_ok_and(|h| h.info.state == HostState::Down) {
                return Some(t0.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let tasks: Vec<_> = names.iter().cloned().map(|n| tokio::spawn(watch(n))).collect();
    let down = down_watch.await;
    let mut answered = Vec::with_capacity(n);
    for t in tasks {
        answered.push(t.await.context("a watcher task failed")??);
    }
    let guests = c.list_guests().await?;
    let mine: Vec<_> = guests.iter().filter(|g| names.contains(&g.guest.spec.name)).collect();
    let since = |ms: u64| ms.saturating_sub(t0_ms) as f64 / 1000.0;
    let reassigned =
        mine.iter().filter_map(|g| g.guest.last_failover.as_ref()).map(|f| since(f.at_ms)).fold(0.0, f64::max);
    let running = mine.iter().filter_map(|g| g.guest.last_failover.as_ref()?.running_ms).map(since).fold(0.0, f64::max);
    let ready = mine.iter().filter_map(|g| g.guest.last_failover.as_ref()?.ready_ms).map(since).fold(0.0, f64::max);
    let spread = ["host-2", "host-3"]
        .iter()
        .map(|h| (h.to_string(), mine.iter().filter(|g| g.host_name == *h).count()))
        .collect();
    // Back to a clean cluster for the next run.
    lab.heal("host-1")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.get_host("host-1").await?.info.state != HostState::Up {
        if Instant::now() > deadline {
            bail!("host-1 did not come back within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for name in &names {
        let del = c.delete_guest(name).await?;
        c.wait_operation(del.operation.id, Duration::from_secs(60)).await?;
    }
    Ok(Run {
        cold_boot_s,
        down_s: down.unwrap_or(f64::NAN),
        reassigned_s: reassigned,
        running_s: running,
        ready_s: ready,
        answering_s: answered.iter().copied().fold(0.0, f64::max),
        spread,
    })
}

pub async fn run(a: FailoverBench) -> Result<()> {
    let (plan_hosts, plan_guests, plan_evacuees, plan_ms_p50, plan_ms_max) = time_planner();
    let mut runs = Vec::new();
    if !a.plan_only {
        if a.runs == 0 || a.guests == 0 {
            bail!("--runs and --guests must be at least 1");
        }
        let (lab, c) = BenchLab::start("failover", &["--hosts", "3", "--net", "netns", "--vcpu-overcommit", "16"])?;
        for run in 0..a.runs {
            eprint!("\rfailover: run {}/{}   ", run + 1, a.runs);
            runs.push(one_run(&lab, &c, a.guests, run).await?);
        }
        eprintln!();
    }
    let mut answering: Vec<f64> = runs.iter().map(|r| r.answering_s).collect();
    answering.sort_by(f64::total_cmp);
    let f = Figures {
        answering_p50_s: percentile(&answering, 0.5),
        answering_max_s: answering.last().copied().unwrap_or(0.0),
        runs,
        plan_hosts,
        plan_guests,
        plan_evacuees,
        plan_ms_p50,
        plan_ms_max,
    };
    match a.out.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&f)?),
        Format::Table => {
            if !f.runs.is_empty() {
                println!(
                    "drove bench failover: power loss of a lab host with {} real QEMU guests (TCG) on shared storage; \
                     seconds from the kill (defaults: lease 5 s, fencing margin 1.5 s)",
                    a.guests
                );
                let rows = f
                    .runs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        vec![
                            (i + 1).to_string(),
                            format!("{:.1}", r.down_s),
                            format!("{:.1}", r.reassigned_s),
                            format!("{:.1}", r.running_s),
                            format!("{:.1}", r.ready_s),
                            format!("{:.1}", r.answering_s),
                            format!("{:.1}", r.cold_boot_s),
                            r.spread.iter().map(|(h, n)| format!("{h}:{n}")).collect::<Vec<_>>().join(" "),
                        ]
                    })
                    .collect();
                crate::output::print(
                    Format::Table,
                    &f.runs,
                    &["run", "host down", "reassigned", "qemu up", "os up", "all answer", "cold boot", "spread"],
                    rows,
                )?;
                println!("all answering: p50 {:.1} s, max {:.1} s", f.answering_p50_s, f.answering_max_s);
            }
            println!(
                "failover plan: {}-guest host in a {}-host / {}-guest cluster: p50 {:.2} ms, max {:.2} ms",
                f.plan_evacuees, f.plan_hosts, f.plan_guests, f.plan_ms_p50, f.plan_ms_max
            );
        }
    }
    Ok(())
}
