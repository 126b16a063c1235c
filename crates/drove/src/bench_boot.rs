//! `drove bench boot`: real QEMU guests through the whole stack.
//!
//! Starts its own one-host QEMU lab in a temp dir (`drove up` as a child
//! process, so the operator's client config is untouched), then measures:
//! create-to-readiness time (API call until the guest's init prints
//! `DROVE-READY`, read back through the API), density (N small guests
//! booted together), and what each guest costs in memory beyond its RAM.
//!
//! Beside each timed boot it boots the same QEMU command line bare (no
//! manager, agent or API) and times it to the same line: this machine's
//! speed varies by tens of percent over an hour, and the pair shows what
//! drove adds to QEMU's own boot at that moment.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use drove_api::CreateGuestRequest;
use drove_client::Client;
use drove_model::ByteSize;
use serde::Serialize;

use crate::bench::percentile;
use crate::{Format, OutputArgs};

#[derive(Debug, Args)]
pub struct BootBench {
    /// Sequential boots to time.
    #[arg(long, default_value_t = 10)]
    pub boots: usize,
    /// Guests booted together for the density run.
    #[arg(long, default_value_t = 20)]
    pub together: usize,
    /// Memory of each guest.
    #[arg(long, value_parser = crate::parse_size, default_value = "128M")]
    pub memory: ByteSize,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Serialize)]
struct BootFigures {
    boots: usize,
    ready_p50_s: f64,
    ready_p95_s: f64,
    ready_min_s: f64,
    /// Until a client polling the console log through the API (every 20
    /// ms, each poll relayed to the host) saw the line.
    seen_via_api_p50_s: f64,
    /// The same command lines run bare, interleaved with drove's boots.
    bare_qemu_p50_s: f64,
    bare_qemu_p95_s: f64,
    together: usize,
    together_ready: usize,
    together_seconds: f64,
    /// Of those, still running and answering through their guest agent
    /// once all were up and had settled.
    together_answering: usize,
    guest_memory_mib: u64,
    qemu_pss_mib_mean: f64,
    qemu_pss_mib_max: f64,
    guest_ram_pss_mib_mean: f64,
    agent_pss_mib: f64,
    overhead_mib_per_guest: f64,
}

/// The lab a bench started; stopped and purged however the bench ends.
pub(crate) struct BenchLab {
    pub dir: PathBuf,
    config: PathBuf,
}

impl BenchLab {
    /// `drove up --backend qemu --detach` with `extra` arguments, in a
    /// fresh directory under /tmp (short: guests' unix sockets live there),
    /// and a client for it.
    pub fn start(name: &str, extra: &[&str]) -> Result<(BenchLab, Client)> {
        let dir = PathBuf::from(format!("/tmp/drove-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let lab = BenchLab { config: dir.join("client.json"), dir: dir.clone() };
        let d = dir.display().to_string();
        let mut args = vec!["up", "--backend", "qemu", "--detach", "--data-dir", &d];
        args.extend_from_slice(extra);
        let out = lab.drove(&args)?;
        if !out.status.success() {
            bail!("starting the bench lab failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let cfg: crate::config::ClientConfig = serde_json::from_slice(&std::fs::read(&lab.config)?)?;
        let c = Client::new(&cfg.endpoint, &cfg.token);
        Ok((lab, c))
    }

    /// `drove lab fail HOST --mode MODE` on this lab.
    pub fn fail(&self, host: &str, mode: &str) -> Result<()> {
        self.lab_cmd(&["lab", "fail", host, "--mode", mode])
    }

    /// `drove lab heal HOST` on this lab.
    pub fn heal(&self, host: &str) -> Result<()> {
        self.lab_cmd(&["lab", "heal", host])
    }

    fn lab_cmd(&self, args: &[&str]) -> Result<()> {
        let d = self.dir.display().to_string();
        let mut all = args.to_vec();
        all.extend(["--data-dir", &d]);
        let out = self.drove(&all)?;
        if !out.status.success() {
            bail!("drove {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    fn drove(&self, args: &[&str]) -> Result<std::process::Output> {
        std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .env("DROVE_CONFIG", &self.config)
            .output()
            .context("running drove")
    }
}

impl Drop for BenchLab {
    /// Stops the lab; `DROVE_BENCH_KEEP=1` keeps its directory (logs, guest
    /// state) for a look at what happened.
    fn drop(&mut self) {
        let dir = self.dir.display().to_string();
        if std::env::var_os("DROVE_BENCH_KEEP").is_some() {
            let _ = self.drove(&["down", "--data-dir", &dir]);
            eprintln!("bench lab kept in {dir} (DROVE_BENCH_KEEP)");
            return;
        }
        let _ = self.drove(&["down", "--purge", "--data-dir", &dir]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Proportional set size (shared pages split among their users), MiB: what
/// one more process of the kind really costs.
fn pss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Proportional MiB of the mapping that is the guest's RAM: the anonymous
/// mapping exactly the guest's memory size (QEMU allocates it in one piece).
fn guest_ram_rss_mib(pid: u32, guest_mib: u64) -> f64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let want = format!("{}", guest_mib * 1024);
    let mut in_ram = false;
    let mut total_kib = 0.0;
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some("Size:"), Some(kib)) => in_ram = kib == want,
            (Some("Pss:"), Some(kib)) if in_ram => total_kib += kib.parse::<f64>().unwrap_or(0.0),
            _ => {}
        }
    }
    total_kib / 1024.0
}

fn qemu_pids(dir: &Path) -> Vec<u32> {
    let Ok(hosts) = std::fs::read_dir(dir.join("hosts")) else { return Vec::new() };
    hosts
        .flatten()
        .filter_map(|h| std::fs::read_dir(h.path().join("guests")).ok())
        .flat_map(|g| g.flatten())
        .filter_map(|g| std::fs::read_to_string(g.path().join("qemu.pid")).ok()?.trim().parse().ok())
        .filter(|pid: &u32| Path::new(&format!("/proc/{pid}")).exists())
        .collect()
}

/// Seconds from `t0` until a guest's serial log on the lab's (one) host
/// holds `DROVE-READY`, looked at every 10 ms: the moment the guest printed
/// it, timed like the bare boots.
async fn wait_logged(dir: &Path, t0: Instant, deadline: Instant) -> Result<f64> {
    loop {
        if let Ok(hosts) = std::fs::read_dir(dir.join("hosts")) {
            let logs = hosts
                .flatten()
                .filter_map(|h| std::fs::read_dir(h.path().join("guests")).ok())
                .flat_map(|g| g.flatten())
                .map(|g| g.path().join("serial.log"));
            for log in logs {
                if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("DROVE-READY")) {
                    return Ok(t0.elapsed().as_secs_f64());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no guest reported ready in time");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A QEMU process's argv.
fn qemu_argv(pid: u32) -> Result<Vec<String>> {
    let raw =
        std::fs::read(format!("/proc/{pid}/cmdline")).with_context(|| format!("reading QEMU {pid}'s command line"))?;
    Ok(raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}

/// Boots `argv` (a guest's QEMU command line as drove ran it) with its
/// per-guest files moved to `dir`, in the foreground, and times it from
/// spawn to `DROVE-READY` in its serial log.
async fn bare_boot(argv: &[String], dir: &Path) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let guest_dir = argv
        .iter()
        .position(|a| a == "-pidfile")
        .and_then(|i| argv.get(i + 1))
        .and_then(|p| Path::new(p).parent())
        .map(|p| p.to_string_lossy().into_owned())
        .context("the guest's QEMU has no -pidfile")?;
    let here = dir.to_string_lossy();
    let args: Vec<String> =
        argv[1..].iter().filter(|a| *a != "-daemonize").map(|a| a.replace(&guest_dir, &here)).collect();
    let log = dir.join("serial.log");
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    let ready = loop {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("DROVE-READY")) {
            break Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > Duration::from_secs(60) || child.try_wait()?.is_some() {
            break Err(anyhow::anyhow!("the bare QEMU boot in {} did not report ready", dir.display()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = child.kill().await;
    ready
}

pub(crate) async fn wait_ready(c: &Client, name: &str, deadline: Instant) -> Result<()> {
    loop {
        if let Ok(log) = c.console_log(name, 1 << 20).await
            && log.text.contains("DROVE-READY")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("guest {name} did not report ready in time");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(a: BootBench) -> Result<()> {
    if a.boots == 0 {
        bail!("--boots must be at least 1");
    }
    // Idle TCG guests: let placement put many on the one host.
    let (lab, c) = BenchLab::start("boot", &["--hosts", "1", "--vcpu-overcommit", "32"])?;
    let dir = lab.dir.clone();

    let mut times = Vec::new();
    let mut bare = Vec::new();
    let mut via_api = Vec::new();
    // In the lab's directory, which goes with the lab.
    let scratch = dir.join("bare-qemu");
    for i in 0..a.boots {
        let name = format!("boot-{i}");
        let t0 = Instant::now();
        c.create_guest(&CreateGuestRequest::new(&name, 1, a.memory)).await?;
        times.push(wait_logged(&dir, t0, t0 + Duration::from_secs(120)).await?);
        wait_ready(&c, &name, t0 + Duration::from_secs(120)).await?;
        via_api.push(t0.elapsed().as_secs_f64());
        let argv = qemu_pids(&dir).first().map(|p| qemu_argv(*p)).transpose()?;
        let del = c.delete_guest(&name).await?;
        c.wait_operation(del.operation.id, Duration::from_secs(60)).await?;
        let argv = argv.context("the booted guest's QEMU was not found")?;
        bare.push(bare_boot(&argv, &scratch.join(i.to_string())).await?);
        eprint!("\rboot {}/{}: {:.2}s (bare QEMU {:.2}s)   ", i + 1, a.boots, times[i], bare[i]);
    }
    eprintln!();
    times.sort_by(f64::total_cmp);
    bare.sort_by(f64::total_cmp);
    via_api.sort_by(f64::total_cmp);

    let t0 = Instant::now();
    for i in 0..a.together {
        c.create_guest(&CreateGuestRequest::new(&format!("dense-{i}"), 1, a.memory)).await?;
    }
    let mut ready = 0;
    for i in 0..a.together {
        if wait_ready(&c, &format!("dense-{i}"), t0 + Duration::from_secs(600)).await.is_ok() {
            ready += 1;
        }
        eprint!("\rdensity: {ready}/{} ready   ", a.together);
    }
    eprintln!();
    let together_seconds = t0.elapsed().as_secs_f64();
    // Let the guests settle so RSS reflects a running guest, not a booting
    // one, and so a guest that fails after its readiness line shows.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let probe = drove_api::ExecRequest { command: vec!["true".into()], input: None, timeout_secs: Some(60) };
    let mut together_answering = 0;
    for i in 0..a.together {
        let name = format!("dense-{i}");
        let running = c.get_guest(&name).await.is_ok_and(|g| g.guest.state == drove_model::GuestState::Running);
        if running && c.exec(&name, &probe).await.is_ok_and(|r| r.exit_code == 0) {
            together_answering += 1;
        }
    }
    let pids = qemu_pids(&dir);
    let rss: Vec<f64> = pids.iter().map(|p| pss_mib(*p)).collect();
    let ram: Vec<f64> = pids.iter().map(|p| guest_ram_rss_mib(*p, a.memory.as_mib())).collect();
    let ram_mean = ram.iter().sum::<f64>() / ram.len().max(1) as f64;
    let lab_file: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("lab.json"))?)?;
    let agent_rss = lab_file["agents"][0][1].as_u64().map_or(0.0, |p| pss_mib(p as u32));
    let mean = rss.iter().sum::<f64>() / rss.len().max(1) as f64;
    let guest_mib = a.memory.as_mib();
    let f = BootFigures {
        boots: a.boots,
        ready_p50_s: percentile(&times, 0.5),
        ready_p95_s: percentile(&times, 0.95),
        ready_min_s: times[0],
        seen_via_api_p50_s: percentile(&via_api, 0.5),
        bare_qemu_p50_s: percentile(&bare, 0.5),
        bare_qemu_p95_s: percentile(&bare, 0.95),
        together: a.together,
        together_ready: ready,
        together_seconds,
        together_answering,
        guest_memory_mib: guest_mib,
        qemu_pss_mib_mean: mean,
        qemu_pss_mib_max: rss.iter().copied().fold(0.0, f64::max),
        guest_ram_pss_mib_mean: ram_mean,
        agent_pss_mib: agent_rss,
        // Beyond its own RAM: QEMU's resident memory less the guest RAM
        // mapping, plus its share of the agent.
        overhead_mib_per_guest: mean - ram_mean + agent_rss / rss.len().max(1) as f64,
    };
    match a.out.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&f)?),
        Format::Table => {
            println!("drove bench boot: real QEMU guests ({guest_mib} MiB) through manager, agent and QMP");
            println!(
                "  create -> DROVE-READY logged p50 {:.2} s   p95 {:.2} s   min {:.2} s   ({} boots)",
                f.ready_p50_s, f.ready_p95_s, f.ready_min_s, f.boots
            );
            println!("  ... seen through the API     p50 {:.2} s", f.seen_via_api_p50_s);
            println!(
                "  same QEMU, bare -> READY      p50 {:.2} s   p95 {:.2} s   (drove adds {:+.0} ms at p50)",
                f.bare_qemu_p50_s,
                f.bare_qemu_p95_s,
                (f.ready_p50_s - f.bare_qemu_p50_s) * 1000.0
            );
            println!(
                "  booted together              {}/{} ready in {:.1} s; {}/{} running and answering after",
                f.together_ready, f.together, f.together_seconds, f.together_answering, f.together
            );
            println!(
                "  QEMU memory (PSS)            mean {:.1} MiB, max {:.1} MiB per guest",
                f.qemu_pss_mib_mean, f.qemu_pss_mib_max
            );
            println!("  of which the guest's RAM     mean {:.1} MiB", f.guest_ram_pss_mib_mean);
            println!("  agent memory (PSS)           {:.1} MiB for {} guests", f.agent_pss_mib, rss.len());
            println!(
                "  cost beyond the guest's RAM  {:.1} MiB per guest (QEMU + share of the agent)",
                f.overhead_mib_per_guest
            );
            println!(
                "targets: p50 <= 2 s: {}; {} guests at once without failures: {}; <= 100 MiB per guest: {}",
                crate::bench::verdict(f.ready_p50_s <= 2.0),
                f.together,
                crate::bench::verdict(f.together_ready == f.together && f.together_answering == f.together),
                crate::bench::verdict(f.overhead_mib_per_guest <= 100.0)
            );
        }
    }
    drop(lab);
    Ok(())
}
