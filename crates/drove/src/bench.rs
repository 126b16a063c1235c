//! Benchmarks that print figures (not timed tests).
//!
//! `drove bench api`: a real manager process (release build recommended)
//! with its durable embedded store, N in-process sim agents, and M guests
//! created through the HTTP API by C concurrent clients. Prints the create
//! rate (durable, acknowledged), the end-to-end rate (until every guest
//! runs on its host), list latency, and the manager's resident memory.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use drove_agent::{Agent, AgentConfig};
use drove_api::CreateGuestRequest;
use drove_client::Client;
use drove_hypervisor::sim::{SimConfig, SimHypervisor};
use drove_model::{ByteSize, GuestState, HostState};
use serde::Serialize;

use crate::{Format, OutputArgs};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Create guests on sim hosts through the HTTP API; print rates, list latency, manager memory.
    Api(ApiBench),
    /// Boot real QEMU guests through the whole stack; print readiness times, density, memory per guest.
    Boot(crate::bench_boot::BootBench),
    /// Place N guests with daily profiles on M hosts, plan a failover and a rebalancing round; print times.
    Placement(crate::sim::PlacementBench),
    /// Guest-to-guest latency and throughput on real QEMU guests: same host vs. across hosts, with and without a NIC rate limit.
    Net(crate::bench_net::NetBench),
    /// Snapshot and restore a running real QEMU guest; print times and the pause seen from outside the guest.
    Storage(crate::bench_storage::StorageBench),
    /// Live-migrate real QEMU guests (idle and busy) between lab hosts; print the measured pause and total time, and a drain's spread.
    Migrate(crate::bench_migrate::MigrateBench),
    /// Kill a lab host with real QEMU guests on shared storage; print each phase until they all answer on the survivors, and the failover planner's time at scale.
    Failover(crate::bench_failover::FailoverBench),
}

#[derive(Debug, Args)]
pub struct ApiBench {
    #[arg(long, default_value_t = 1000)]
    pub hosts: usize,
    #[arg(long, default_value_t = 10_000)]
    pub guests: usize,
    /// Concurrent API clients.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How many times to list all guests.
    #[arg(long, default_value_t = 20)]
    pub list_runs: usize,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Serialize)]
struct ApiFigures {
    hosts: usize,
    guests: usize,
    concurrency: usize,
    create_seconds: f64,
    creations_per_second: f64,
    create_p50_ms: f64,
    create_p99_ms: f64,
    all_running_seconds: f64,
    end_to_end_per_second: f64,
    list_guests_p50_ms: f64,
    list_guests_min_ms: f64,
    list_guests_max_ms: f64,
    manager_rss_mib: f64,
    manager_peak_rss_mib: f64,
}

pub async fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Api(a) => api(a).await,
        BenchCommand::Boot(a) => crate::bench_boot::run(a).await,
        BenchCommand::Net(a) => crate::bench_net::run(a).await,
        BenchCommand::Migrate(a) => crate::bench_migrate::run(a).await,
        BenchCommand::Failover(a) => crate::bench_failover::run(a).await,
        BenchCommand::Placement(a) => crate::sim::bench_placement(a),
        BenchCommand::Storage(a) => crate::bench_storage::run(a).await,
    }
}

/// Kills the manager process when the bench ends, however it ends.
struct ChildGuard(std::process::Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// How a bench reports a target: "met" or "NOT met".
pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn progress(label: &str, done: usize, total: usize) {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let width = 30;
        let filled = done * width / total.max(1);
        eprint!("\r\x1b[K{label:<12} [{}{}] {done}/{total}", "#".repeat(filled), ".".repeat(width - filled));
        let _ = std::io::stderr().flush();
    }
}

fn progress_done() {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprint!("\r\x1b[K");
    }
}

async fn api(a: ApiBench) -> Result<()> {
    if a.hosts == 0 || a.guests == 0 || a.concurrency == 0 {
        bail!("--hosts, --guests and --concurrency must be positive");
    }
    let dir = std::env::temp_dir().join(format!("drove-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mdir = dir.join("manager");
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["manager", "--data-dir"])
        .arg(&mdir)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--heartbeat-ms", "2000", "--host-timeout", "30"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("starting the manager")?;
    let manager = ChildGuard(child);
    let started = Instant::now();
    let admin = loop {
        if let Ok(t) = std::fs::read_to_string(mdir.join("admin.token")) {
            let c = Client::new(&endpoint, &t);
            if c.list_hosts().await.is_ok() {
                break c;
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the manager did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let agent_token = std::fs::read_to_string(mdir.join("agent.token"))?;
    let agent_client = Client::new(&endpoint, &agent_token);
    let sim = SimConfig { cores: 32, memory: ByteSize::gib(256), ..SimConfig::default() };
    for i in 0..a.hosts {
        let hv = Arc::new(SimHypervisor::new(sim.clone()));
        let agent = Agent::new(AgentConfig::new(&format!("sim-{i:04}")), agent_client.clone(), hv);
        tokio::spawn(agent.run(std::future::pending::<()>()));
    }
    loop {
        let up = admin.list_hosts().await?.iter().filter(|h| h.info.state == HostState::Up).count();
        progress("hosts", up, a.hosts);
        if up == a.hosts {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("only {up} of {} sim hosts registered", a.hosts);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress_done();

    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..a.concurrency {
        let (c, next, total) = (admin.clone(), next.clone(), a.guests);
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, drove_client::ClientError>(lat);
                }
                let req = CreateGuestRequest {
                    disks: vec![ByteSize::gib(1).into()],
                    ..CreateGuestRequest::new(&format!("bench-{i:05}"), 1, ByteSize::mib(256))
                };
                let s = Instant::now();
                c.create_guest(&req).await?;
                lat.push(s.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let reporter = {
        let (next, total) = (next.clone(), a.guests);
        tokio::spawn(async move {
            loop {
                progress("creating", next.load(Ordering::Relaxed).min(total), total);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut latencies = Vec::with_capacity(a.guests);
    for w in workers {
        latencies.extend(w.await??);
    }
    let create_secs = t0.elapsed().as_secs_f64();
    reporter.abort();
    progress_done();
    latencies.sort_by(f64::total_cmp);

    loop {
        let guests = admin.list_guests().await?;
        let running = guests.iter().filter(|g| g.guest.state == GuestState::Running).count();
        progress("booting", running, a.guests);
        if running == a.guests {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            let mut states = std::collections::BTreeMap::new();
            for g in guests.iter().filter(|g| g.guest.state != GuestState::Running) {
                *states.entry(g.guest.state.to_string()).or_insert(0) += 1;
            }
            bail!("only {running} of {} guests running after 10 minutes; the others: {states:?}", a.guests);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_running = t0.elapsed().as_secs_f64();
    progress_done();

    let mut list = Vec::new();
    for _ in 0..a.list_runs.max(1) {
        let s = Instant::now();
        let n = admin.list_guests().await?.len();
        list.push(s.elapsed().as_secs_f64() * 1000.0);
        if n != a.guests {
            bail!("listed {n} guests, expected {}", a.guests);
        }
    }
    list.sort_by(f64::total_cmp);
    let (rss, peak) = rss_mib(manager.0.id());
    let f = ApiFigures {
        hosts: a.hosts,
        guests: a.guests,
        concurrency: a.concurrency,
        create_seconds: create_secs,
        creations_per_second: a.guests as f64 / create_secs,
        create_p50_ms: percentile(&latencies, 0.5),
        create_p99_ms: percentile(&latencies, 0.99),
        all_running_seconds: all_running,
        end_to_end_per_second: a.guests as f64 / all_running,
        list_guests_p50_ms: percentile(&list, 0.5),
        list_guests_min_ms: list[0],
        list_guests_max_ms: list[list.len() - 1],
        manager_rss_mib: rss,
        manager_peak_rss_mib: peak,
    };
    match a.out.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&f)?),
        Format::Table => {
            println!(
                "drove bench api: {} guests on {} sim hosts, {} concurrent clients, durable embedded store",
                f.guests, f.hosts, f.concurrency
            );
            println!(
                "  create (acknowledged, durable)  {:>9.0} guests/s   ({:.2} s; p50 {:.1} ms, p99 {:.1} ms)",
                f.creations_per_second, f.create_seconds, f.create_p50_ms, f.create_p99_ms
            );
            println!(
                "  create -> running on its host   {:>9.0} guests/s   ({:.2} s)",
                f.end_to_end_per_second, f.all_running_seconds
            );
            println!(
                "  list {} guests                 {:>9.1} ms p50     (min {:.1}, max {:.1})",
                f.guests, f.list_guests_p50_ms, f.list_guests_min_ms, f.list_guests_max_ms
            );
            println!(
                "  manager resident memory         {:>9.1} MiB        (peak {:.1} MiB)",
                f.manager_rss_mib, f.manager_peak_rss_mib
            );
        }
    }
    drop(manager);
    Ok(())
}
