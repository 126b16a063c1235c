//! `drove bench storage`: snapshots of a running real QEMU guest through the
//! whole stack (API, manager, agent, QMP).
//!
//! The pause a snapshot causes is measured from outside the guest: the test
//! image's ticker (`drove-guest-agent tick`) prints a numbered line on the
//! guest's serial console every millisecond,
//! the bench reads the console's unix socket on the host and timestamps
//! every chunk that arrives. The longest silence while an operation runs is
//! its pause as the guest's output shows it; the longest silence over an
//! idle stretch of the same run is the noise floor to compare it with (TCG
//! on a busy machine does not tick evenly). Times are API request to
//! operation finished, as an operator waits for them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use drove_api::{CreateGuestRequest, CreateSnapshotRequest, OperationAccepted};
use drove_client::Client;
use drove_model::{ByteSize, OperationState};
use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::bench::verdict;
use crate::bench_boot::{BenchLab, wait_ready};
use crate::{Format, OutputArgs};

#[derive(Debug, Args)]
pub struct StorageBench {
    /// Snapshots of each kind (and restores) to time.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Memory of the guest (what a memory snapshot writes).
    #[arg(long, value_parser = crate::parse_size, default_value = "256M")]
    pub memory: ByteSize,
    /// Size of its disk.
    #[arg(long, value_parser = crate::parse_size, default_value = "1G")]
    pub disk: ByteSize,
    /// Data the guest writes to its disk before the snapshots (so they
    /// have data to cover, not an empty image).
    #[arg(long, value_parser = crate::parse_size, default_value = "256M")]
    pub fill: ByteSize,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// One kind of operation, over its rounds.
#[derive(Debug, Serialize, Default)]
struct Series {
    /// API request to operation finished, seconds.
    time_s: Vec<f64>,
    /// Longest silence of the guest's console while it ran, milliseconds.
    gap_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct StorageFigures {
    guest_memory_mib: u64,
    disk_mib: u64,
    /// Written to the disk before the snapshots.
    filled_mib: u64,
    rounds: usize,
    /// Longest console silence over an idle stretch: the noise floor.
    idle_gap_ms: f64,
    tick_interval_ms: f64,
    disk_snapshot: Series,
    memory_snapshot: Series,
    memory_restore: Series,
    /// Restoring a disk snapshot of the running guest (it reboots): until
    /// the operation is done, and until its guest agent answers again.
    disk_restore: Series,
    disk_restore_until_agent_s: Vec<f64>,
    /// Cloning a stopped 1 GiB template (thin overlays) until the clone's
    /// guest agent answers, one clone at a time.
    template_clone_to_ready_s: Vec<f64>,
    /// Cloning the running guest (copies of its disks from one instant)
    /// until the clone's agent answers.
    running_clone_to_ready_s: f64,
    /// Ten clones of the template in one request, until all ten answer.
    ten_clones_to_ready_s: f64,
}

/// Arrival times of console output.
pub(crate) type Ticks = Arc<Mutex<Vec<Instant>>>;

/// The guest's console socket on `host` in the lab in `dir`.
pub(crate) fn console_socket(dir: &Path, host: &str, id: drove_model::GuestId) -> PathBuf {
    dir.join("hosts").join(host).join("guests").join(id.to_string()).join("console.sock")
}

/// Starts the test image's ticker on the guest's console, a line every
/// `every_ms`. The image's compiled ticker, not a shell loop: under TCG the
/// guest's code is translated afresh after a migration or a restore, and
/// the more of it a tick runs, the longer the guest stays silent after.
pub(crate) async fn start_ticker(c: &Client, guest: &str, every_ms: u32) -> Result<()> {
    let ticker = format!("drove-guest-agent tick {every_ms} >/dev/ttyS0 2>&1 </dev/null & echo started");
    let exec =
        drove_api::ExecRequest { command: vec!["sh".into(), "-c".into(), ticker], input: None, timeout_secs: Some(30) };
    c.exec(guest, &exec).await.context("starting the console ticker")?;
    Ok(())
}

/// Timestamps every chunk with a line end that `console` sends, until it
/// closes.
pub(crate) async fn read_ticks(mut console: tokio::net::UnixStream, ticks: Ticks) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = console.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if buf[..n].contains(&b'\n') {
            ticks.lock().unwrap_or_else(|p| p.into_inner()).push(Instant::now());
        }
    }
}

/// The longest silence between arrivals within [from, to], counting the
/// stretch from the last arrival before `from` and to the first after `to`.
pub(crate) fn longest_gap(ticks: &[Instant], from: Instant, to: Instant) -> f64 {
    let start = ticks.iter().rposition(|t| *t <= from).unwrap_or(0);
    let end = ticks.iter().position(|t| *t >= to).unwrap_or(ticks.len().saturating_sub(1));
    ticks[start..=end.max(start)].windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0).fold(0.0, f64::max)
}

async fn run_op(c: &Client, accepted: OperationAccepted) -> Result<drove_model::Operation> {
    let op = c.wait_operation(accepted.operation.id, Duration::from_secs(300)).await?;
    if op.state != OperationState::Succeeded {
        bail!("{} {} ended {}: {}", op.kind, op.target_name, op.state, op.error.unwrap_or_default());
    }
    Ok(op)
}

/// Runs `f` and returns its time and the console's longest silence.
async fn timed<F, Fut>(ticks: &Ticks, f: F) -> Result<(f64, f64)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let t0 = Instant::now();
    f().await?;
    let t1 = Instant::now();
    // Let the next tick arrive, so a silence still running counts whole.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gap = longest_gap(&ticks.lock().unwrap_or_else(|p| p.into_inner()), t0, t1);
    Ok(((t1 - t0).as_secs_f64(), gap))
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.get(s.len() / 2).copied().unwrap_or(0.0);
    (s.first().copied().unwrap_or(0.0), mid, s.last().copied().unwrap_or(0.0))
}

pub async fn run(a: StorageBench) -> Result<()> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    // Twelve small guests on one host at the end (the guest, a template,
    // ten clones): more vCPUs than the default overcommit allows a 2-core
    // machine.
    let (lab, c) = BenchLab::start("storage", &["--hosts", "1", "--vcpu-overcommit", "8"])?;
    let name = "snap-bench";
    if a.fill > a.disk {
        bail!("--fill {} does not fit on a --disk of {}", a.fill, a.disk);
    }
    let req = CreateGuestRequest { disks: vec![a.disk.into()], ..CreateGuestRequest::new(name, 1, a.memory) };
    let accepted = c.create_guest(&req).await?;
    let id = accepted.guest;
    wait_ready(&c, name, Instant::now() + Duration::from_secs(180)).await?;
    eprintln!("writing {} to the guest's disk", a.fill);
    // Not zeros: qcow2 would keep those as metadata alone.
    let fill = format!(
        "dd if=/dev/zero bs=1M count={} 2>/dev/null | tr '\\000' '\\001' | dd of=/dev/vda bs=1M 2>/dev/null; sync",
        a.fill.as_mib()
    );
    let exec =
        drove_api::ExecRequest { command: vec!["sh".into(), "-c".into(), fill], input: None, timeout_secs: Some(600) };
    let filled = c.exec(name, &exec).await?;
    if filled.exit_code != 0 {
        bail!("the guest could not fill its disk: {}", filled.stderr.trim());
    }

    // The guest's console, read here on the host.
    let socket = console_socket(&lab.dir, "host-1", id);
    let console = tokio::net::UnixStream::connect(&socket)
        .await
        .with_context(|| format!("connecting to the guest's console {}", socket.display()))?;
    let ticks: Ticks = Arc::default();
    let reader = tokio::spawn(read_ticks(console, ticks.clone()));
    let tick_ms = 1;
    start_ticker(&c, name, tick_ms).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The noise floor.
    let (_, idle_gap_ms) = timed(&ticks, || async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(())
    })
    .await?;
    let tick_count = ticks.lock().unwrap_or_else(|p| p.into_inner()).len();
    if tick_count < 10 {
        bail!("the guest's ticker printed {tick_count} lines; cannot measure pauses");
    }

    let mut disk_snapshot = Series::default();
    let mut memory_snapshot = Series::default();
    let mut memory_restore = Series::default();
    let mut disk_restore = Series::default();
    let mut disk_restore_until_agent_s = Vec::new();
    for round in 0..a.rounds {
        eprint!("\rround {}/{}   ", round + 1, a.rounds);
        let (disk_snap, mem_snap) = (format!("disk-{round}"), format!("mem-{round}"));
        let (t, gap) = timed(&ticks, || async {
            run_op(
                &c,
                c.create_snapshot(name, &CreateSnapshotRequest { name: disk_snap.clone(), memory: false }).await?,
            )
            .await
            .map(drop)
        })
        .await?;
        disk_snapshot.time_s.push(t);
        disk_snapshot.gap_ms.push(gap);

        let (t, gap) = timed(&ticks, || async {
            run_op(&c, c.create_snapshot(name, &CreateSnapshotRequest { name: mem_snap.clone(), memory: true }).await?)
                .await
                .map(drop)
        })
        .await?;
        memory_snapshot.time_s.push(t);
        memory_snapshot.gap_ms.push(gap);

        let (t, gap) =
            timed(&ticks, || async { run_op(&c, c.restore_snapshot(name, &mem_snap).await?).await.map(drop) }).await?;
        memory_restore.time_s.push(t);
        memory_restore.gap_ms.push(gap);
    }
    eprintln!();
    // Last: it reboots the guest, which ends the ticker.
    for round in 0..a.rounds {
        eprint!("\rdisk restore {}/{}   ", round + 1, a.rounds);
        let t0 = Instant::now();
        let (t, _) =
            timed(&ticks, || async { run_op(&c, c.restore_snapshot(name, "disk-0").await?).await.map(drop) }).await?;
        disk_restore.time_s.push(t);
        let probe = drove_api::ExecRequest { command: vec!["true".into()], input: None, timeout_secs: Some(120) };
        c.exec(name, &probe).await?;
        disk_restore_until_agent_s.push(t0.elapsed().as_secs_f64());
    }
    eprintln!();
    reader.abort();

    // Clones: of a stopped 1 GiB template (thin overlays), and of the
    // running guest (copies), each until its guest agent answers.
    let clone_req = |name: &str, count: u32| drove_api::CloneGuestRequest {
        name: name.into(),
        count: Some(count),
        snapshot: None,
        start: None,
        host: None,
    };
    let golden = CreateGuestRequest {
        disks: vec![ByteSize::gib(1).into()],
        start: Some(false),
        ..CreateGuestRequest::new("golden", 1, ByteSize::mib(128))
    };
    run_op(&c, c.create_guest(&golden).await?).await?;
    c.set_template("golden", true).await?;
    let mut template_clone_to_ready_s = Vec::new();
    for round in 0..a.rounds {
        eprint!("\rclone of a template {}/{}   ", round + 1, a.rounds);
        let clone = format!("clone-{round}");
        let t0 = Instant::now();
        c.clone_guest("golden", &clone_req(&clone, 1)).await?;
        wait_ready(&c, &clone, Instant::now() + Duration::from_secs(180)).await?;
        template_clone_to_ready_s.push(t0.elapsed().as_secs_f64());
        run_op(&c, c.delete_guest(&clone).await?).await?;
    }
    eprintln!();
    let t0 = Instant::now();
    c.clone_guest(name, &clone_req("copy", 1)).await?;
    wait_ready(&c, "copy", Instant::now() + Duration::from_secs(180)).await?;
    let running_clone_to_ready_s = t0.elapsed().as_secs_f64();
    run_op(&c, c.delete_guest("copy").await?).await?;
    eprintln!("ten clones at once");
    let t0 = Instant::now();
    let accepted = c.clone_guest("golden", &clone_req("many", 10)).await?;
    for acc in &accepted {
        wait_ready(&c, &acc.operation.target_name, Instant::now() + Duration::from_secs(600)).await?;
    }
    let ten_clones_to_ready_s = t0.elapsed().as_secs_f64();

    let f = StorageFigures {
        guest_memory_mib: a.memory.as_mib(),
        disk_mib: a.disk.as_mib(),
        filled_mib: a.fill.as_mib(),
        rounds: a.rounds,
        idle_gap_ms,
        tick_interval_ms: f64::from(tick_ms),
        disk_snapshot,
        memory_snapshot,
        memory_restore,
        disk_restore,
        disk_restore_until_agent_s,
        template_clone_to_ready_s,
        running_clone_to_ready_s,
        ten_clones_to_ready_s,
    };
    match a.out.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&f)?),
        Format::Table => {
            println!(
                "drove bench storage: a running QEMU guest ({} MiB, a {} MiB qcow2 disk with {} MiB written), {} rounds, through API, manager, agent and QMP",
                f.guest_memory_mib, f.disk_mib, f.filled_mib, f.rounds
            );
            println!(
                "  pause = longest silence of a {:.0} ms console ticker read on the host; idle noise floor {:.1} ms",
                f.tick_interval_ms, f.idle_gap_ms
            );
            println!("  {:<28} {:>24} {:>28}", "", "time min/median/max", "pause min/median/max");
            for (label, s) in [
                ("disk-only snapshot", &f.disk_snapshot),
                ("snapshot with memory", &f.memory_snapshot),
                ("restore with memory (live)", &f.memory_restore),
            ] {
                let (t0, t1, t2) = stats(&s.time_s);
                let (g0, g1, g2) = stats(&s.gap_ms);
                println!(
                    "  {label:<28} {:>6.0} {:>6.0} {:>6.0} ms   {:>6.1} {:>6.1} {:>6.1} ms",
                    t0 * 1e3,
                    t1 * 1e3,
                    t2 * 1e3,
                    g0,
                    g1,
                    g2
                );
            }
            let (t0, t1, t2) = stats(&f.disk_restore.time_s);
            println!(
                "  {:<28} {:>6.0} {:>6.0} {:>6.0} ms   (reboots the guest)",
                "restore of a disk snapshot",
                t0 * 1e3,
                t1 * 1e3,
                t2 * 1e3
            );
            let (t0, t1, t2) = stats(&f.disk_restore_until_agent_s);
            println!(
                "  {:<28} {:>6.0} {:>6.0} {:>6.0} ms",
                "  ... until its agent answers",
                t0 * 1e3,
                t1 * 1e3,
                t2 * 1e3
            );
            let (t0, t1, t2) = stats(&f.template_clone_to_ready_s);
            println!(
                "  {:<28} {:>6.0} {:>6.0} {:>6.0} ms   (thin overlays; until the clone's agent answers)",
                "clone of a 1 GiB template",
                t0 * 1e3,
                t1 * 1e3,
                t2 * 1e3
            );
            println!(
                "  {:<28} {:>6.0} ms   (copies from one instant; until the clone's agent answers)",
                "clone of the running guest",
                f.running_clone_to_ready_s * 1e3
            );
            println!(
                "  {:<28} {:>6.0} ms   (one request; until all ten agents answer)",
                "10 clones of the template",
                f.ten_clones_to_ready_s * 1e3
            );
            let worst_pause = stats(&f.disk_snapshot.gap_ms).2;
            let worst_clone = stats(&f.template_clone_to_ready_s).2;
            println!(
                "targets: disk-only snapshot pause <= 50 ms: {} (max {worst_pause:.1} ms); \
                 1 GiB template clone booted <= 3 s: {} (max {worst_clone:.2} s)",
                verdict(worst_pause <= 50.0),
                verdict(worst_clone <= 3.0)
            );
        }
    }
    drop(lab);
    Ok(())
}
