//! `drove bench migrate`: live migrations of real QEMU guests between the
//! hosts of a namespace lab, through the whole stack (`vm migrate`), with
//! the pause each one measured (source STOP to target RESUME, host clocks)
//! and its total time; then a drain of six guests onto two hosts.
//!
//! Each scenario runs twice: with the guest's disks on shared storage (the
//! pool every lab host sees: only memory travels) and on its host's own
//! disks (mirrored to the target over NBD while memory is copied).
//!
//! The recorded pause is checked against the guest's own output: the test
//! image's ticker prints a line on its serial console every millisecond, and
//! the bench reads the console socket of whichever host runs the guest
//! (the source's, and the target's from the moment it exists), stamping
//! each arrival. The longest silence across a migration is the pause as
//! the guest's output shows it; the longest over an idle stretch before is
//! the noise floor (TCG on a busy machine does not tick evenly).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use drove_api::{CreateGuestRequest, ExecRequest, MigrateRequest};
use drove_client::Client;
use drove_model::ByteSize;
use drove_model::guest::Storage;
use serde::Serialize;

use crate::bench::{percentile, verdict};
use crate::bench_boot::BenchLab;
use crate::bench_net::wait_booted;
use crate::bench_storage::{Ticks, console_socket, longest_gap, read_ticks, start_ticker};
use crate::{Format, OutputArgs};

#[derive(Debug, Args)]
pub struct MigrateBench {
    /// Migrations per scenario.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Memory of the busy guest (which rewrites 16 MiB of it with random
    /// data about five times a second).
    #[arg(long, value_parser = crate::parse_size, default_value = "1G")]
    pub busy_memory: ByteSize,
    /// Skip the drain of six guests.
    #[arg(long)]
    pub no_drain: bool,
    /// Skip the busy guest's scenarios (idle guests only).
    #[arg(long)]
    pub no_busy: bool,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Serialize)]
struct Scenario {
    name: String,
    storage: &'static str,
    runs: usize,
    /// Migrations that failed (and rolled back: the guest stayed put).
    failed: usize,
    downtime_p50_ms: f64,
    downtime_p99_ms: f64,
    /// The longest silence of the guest's console across each migration.
    console_gap_p50_ms: f64,
    console_gap_p99_ms: f64,
    /// ... and over two idle seconds before: the noise floor.
    console_floor_ms: f64,
    /// The longest silence as the hosts measured it and the migration
    /// record keeps (`console_gap_ms`: across the pause or while copied),
    /// over the runs that measured it.
    recorded_gap_p50_ms: f64,
    recorded_gap_p99_ms: f64,
    recorded_gap_runs: usize,
    qemu_downtime_p50_ms: f64,
    total_p50_s: f64,
    total_p99_s: f64,
    transferred_mib_p50: f64,
    /// Every migration that succeeded, in order: where a percentile comes
    /// from.
    samples: Vec<Sample>,
}

/// One migration's figures.
#[derive(Debug, Serialize)]
struct Sample {
    pause_ms: Option<f64>,
    qemu_downtime_ms: u64,
    /// The bench's own reading of the longest console silence.
    console_gap_ms: f64,
    /// The record's: over the whole migration, and across the pause only.
    recorded_gap_ms: Option<f64>,
    recorded_pause_gap_ms: Option<f64>,
    total_s: f64,
    transferred_mib: f64,
}

#[derive(Debug, Serialize)]
struct Figures {
    scenarios: Vec<Scenario>,
    drain: Option<DrainFigures>,
}

#[derive(Debug, Serialize)]
struct DrainFigures {
    guests: usize,
    seconds: f64,
    spread: Vec<(String, usize)>,
}

async fn create(c: &Client, name: &str, memory: ByteSize, host: &str, storage: Storage) -> Result<()> {
    let req = CreateGuestRequest {
        host: Some(host.into()),
        disks: vec![ByteSize::mib(64).into()],
        storage: Some(storage),
        ..CreateGuestRequest::new(name, 1, memory)
    };
    let acc = c.create_guest(&req).await.with_context(|| format!("creating {name}"))?;
    c.wait_operation(acc.operation.id, Duration::from_secs(120)).await?;
    wait_booted(c, name).await
}

/// Reads the console at `path` into `ticks`, connecting as soon as the
/// socket exists (the target's QEMU starts during the migration).
fn watch_console(path: PathBuf, ticks: Ticks) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        let console = loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(_) => return,
            }
        };
        read_ticks(console, ticks).await;
    })
}

/// Migrates `guest` back and forth between host-1 and host-2 `runs` times.
async fn scenario(c: &Client, dir: &Path, name: &str, guest: &str, runs: usize, storage: Storage) -> Result<Scenario> {
    let mut failed = 0;
    let mut samples: Vec<Sample> = Vec::new();
    let id = c.get_guest(guest).await?.guest.id;
    start_ticker(c, guest, 1).await?;
    let floor = {
        let ticks: Ticks = Default::default();
        let here = c.get_guest(guest).await?.host_name;
        let watcher = watch_console(console_socket(dir, &here, id), ticks.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        watcher.abort();
        let ticks = ticks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if ticks.len() < 100 {
            bail!("the guest's console ticker printed {} lines in 2.5 s; cannot check pauses", ticks.len());
        }
        longest_gap(&ticks, t0, Instant::now())
    };
    for run in 0..runs {
        let here = c.get_guest(guest).await?.host_name;
        let to = if here == "host-1" { "host-2" } else { "host-1" };
        let ticks: Ticks = Default::default();
        let watchers = [here.as_str(), to].map(|h| watch_console(console_socket(dir, h, id), ticks.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        let acc = c.migrate_guest(guest, &MigrateRequest { to: Some(to.into()), ..Default::default() }).await?;
        let op = c.wait_operation(acc.operation.id, Duration::from_secs(300)).await?;
        let t1 = Instant::now();
        // Let the next tick arrive, so a silence still running counts whole.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for w in &watchers {
            w.abort();
        }
        let mut ticks = ticks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ticks.sort();
        if op.state != drove_model::OperationState::Succeeded {
            failed += 1;
            eprintln!("\n{name}: migration {} failed (rolled back): {}", run + 1, op.error.unwrap_or_default());
            continue;
        }
        let m = c.get_guest(guest).await?.guest.last_migration.context("no migration result recorded")?;
        samples.push(Sample {
            pause_ms: m.downtime_ms,
            qemu_downtime_ms: m.qemu_downtime_ms,
            console_gap_ms: longest_gap(&ticks, t0, t1),
            recorded_gap_ms: m.console_gap_ms,
            recorded_pause_gap_ms: m.console_pause_gap_ms,
            total_s: m.total_ms as f64 / 1000.0,
            transferred_mib: m.transferred as f64 / (1024.0 * 1024.0),
        });
        eprint!("\r{name}: {}/{runs}, last pause {:.1} ms   ", run + 1, m.downtime_ms.unwrap_or(f64::NAN));
    }
    eprintln!();
    // Each figure's values over the runs, sorted for the percentiles (a
    // pause unmeasured counts as NaN, which sorts last).
    let sorted = |figure: fn(&Sample) -> Option<f64>| {
        let mut v: Vec<f64> = samples.iter().filter_map(figure).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let down = sorted(|s| Some(s.pause_ms.unwrap_or(f64::NAN)));
    let gaps = sorted(|s| Some(s.console_gap_ms));
    let recorded = sorted(|s| s.recorded_gap_ms);
    let qemu = sorted(|s| Some(s.qemu_downtime_ms as f64));
    let total = sorted(|s| Some(s.total_s));
    let bytes = sorted(|s| Some(s.transferred_mib));
    Ok(Scenario {
        name: name.to_owned(),
        storage: match storage {
            Storage::Shared => "shared",
            Storage::Local => "local, mirrored (NBD)",
        },
        runs,
        failed,
        downtime_p50_ms: percentile(&down, 0.5),
        downtime_p99_ms: percentile(&down, 0.99),
        console_gap_p50_ms: percentile(&gaps, 0.5),
        console_gap_p99_ms: percentile(&gaps, 0.99),
        console_floor_ms: floor,
        recorded_gap_p50_ms: percentile(&recorded, 0.5),
        recorded_gap_p99_ms: percentile(&recorded, 0.99),
        recorded_gap_runs: recorded.len(),
        qemu_downtime_p50_ms: percentile(&qemu, 0.5),
        total_p50_s: percentile(&total, 0.5),
        total_p99_s: percentile(&total, 0.99),
        transferred_mib_p50: percentile(&bytes, 0.5),
        samples,
    })
}

/// The targets (TCG, shared storage), with downtime as the guest's
/// output shows it: the longest silence of its console over a migration,
/// the worse of the bench's own reading and the hosts' record.
fn print_targets(f: &Figures) {
    let shared = |busy: bool| f.scenarios.iter().find(|s| s.name.starts_with("busy") == busy && s.storage == "shared");
    let worst = |s: &Scenario| s.console_gap_p99_ms.max(s.recorded_gap_p99_ms);
    let mut lines = Vec::new();
    if let Some(s) = shared(false) {
        lines.push(format!(
            "idle downtime p99 <= 50 ms: {} ({:.1} ms); idle total p99 <= 1 s: {} ({:.2} s)",
            verdict(worst(s) <= 50.0 && s.failed == 0),
            worst(s),
            verdict(s.total_p99_s <= 1.0),
            s.total_p99_s
        ));
    }
    if let Some(s) = shared(true) {
        lines.push(format!(
            "busy converges with downtime p99 <= 100 ms: {} ({:.1} ms, {} of {} failed)",
            verdict(worst(s) <= 100.0 && s.failed == 0),
            worst(s),
            s.failed,
            s.runs
        ));
    }
    if let Some(d) = &f.drain {
        let even = d.spread.iter().filter(|(h, _)| h != "host-1").all(|(_, n)| *n == d.guests / 2);
        lines.push(format!("drain spread 3/3: {}", verdict(even)));
    }
    if !lines.is_empty() {
        println!("targets: {}", lines.join("; "));
    }
}

pub async fn run(a: MigrateBench) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (lab, c) = BenchLab::start("migrate", &["--hosts", "3", "--net", "netns", "--vcpu-overcommit", "16"])?;
    let mut scenarios = Vec::new();
    for storage in [Storage::Shared, Storage::Local] {
        create(&c, "idle", ByteSize::mib(256), "host-1", storage).await?;
        scenarios.push(scenario(&c, &lab.dir, "idle guest, 256 MiB", "idle", a.runs, storage).await?);
        let del = c.delete_guest("idle").await?;
        c.wait_operation(del.operation.id, Duration::from_secs(60)).await?;
    }

    let dirty = ExecRequest {
        command: vec![
            "sh".into(),
            "-c".into(),
            // Random data (zero pages would travel compressed), copied over
            // and over.
            "dd if=/dev/urandom of=/tmp/src bs=1M count=16 2>/dev/null; \
             (while true; do cp /tmp/src /tmp/dst; usleep 200000; done) >/dev/null 2>&1 &"
                .into(),
        ],
        input: None,
        timeout_secs: Some(30),
    };
    let busy: &[Storage] = if a.no_busy { &[] } else { &[Storage::Shared, Storage::Local] };
    for &storage in busy {
        create(&c, "busy", a.busy_memory, "host-1", storage).await?;
        c.exec("busy", &dirty).await?;
        let label = format!("busy guest, {}, rewriting 16 MiB 5x/s", a.busy_memory);
        scenarios.push(scenario(&c, &lab.dir, &label, "busy", a.runs, storage).await?);
        let del = c.delete_guest("busy").await?;
        c.wait_operation(del.operation.id, Duration::from_secs(60)).await?;
    }

    let drain = if a.no_drain {
        None
    } else {
        for i in 0..6 {
            eprint!("\rdrain: booting guest {}/6   ", i + 1);
            create(&c, &format!("d{i}"), ByteSize::mib(128), "host-1", Storage::Local).await?;
        }
        eprintln!();
        let t0 = Instant::now();
        let op = c.drain_host("host-1", Some(2)).await?;
        let op = c.wait_operation(op.id, Duration::from_secs(300)).await?;
        if op.state != drove_model::OperationState::Succeeded {
            bail!("the drain failed: {}", op.error.unwrap_or_default());
        }
        let seconds = t0.elapsed().as_secs_f64();
        let guests = c.list_guests().await?;
        let spread = ["host-1", "host-2", "host-3"]
            .iter()
            .map(|h| (h.to_string(), guests.iter().filter(|g| g.host_name == *h).count()))
            .collect();
        Some(DrainFigures { guests: 6, seconds, spread })
    };
    let f = Figures { scenarios, drain };
    match a.out.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&f)?),
        Format::Table => {
            println!(
                "drove bench migrate: real QEMU guests (TCG) between namespace hosts, TLS; disks shared or mirrored over NBD"
            );
            let rows = f
                .scenarios
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.storage.to_owned(),
                        format!("{} ({} failed)", s.runs, s.failed),
                        format!("{:.1} / {:.1}", s.downtime_p50_ms, s.downtime_p99_ms),
                        format!(
                            "{:.1} / {:.1} ({:.1})",
                            s.console_gap_p50_ms, s.console_gap_p99_ms, s.console_floor_ms
                        ),
                        format!(
                            "{:.1} / {:.1} ({} runs)",
                            s.recorded_gap_p50_ms, s.recorded_gap_p99_ms, s.recorded_gap_runs
                        ),
                        format!("{:.0}", s.qemu_downtime_p50_ms),
                        format!("{:.2} / {:.2}", s.total_p50_s, s.total_p99_s),
                        format!("{:.0}", s.transferred_mib_p50),
                    ]
                })
                .collect();
            crate::output::print(
                Format::Table,
                &f.scenarios,
                &[
                    "scenario",
                    "disks",
                    "runs",
                    "pause p50/p99 ms",
                    "console gap p50/p99 (floor) ms",
                    "recorded gap p50/p99 ms",
                    "qemu pause ms",
                    "total p50/p99 s",
                    "MiB sent",
                ],
                rows,
            )?;
            if let Some(d) = &f.drain {
                let spread: Vec<String> = d.spread.iter().map(|(h, n)| format!("{h}: {n}")).collect();
                println!("drain of {} guests from host-1: {:.1} s, now {}", d.guests, d.seconds, spread.join(", "));
            }
            print_targets(&f);
        }
    }
    drop(lab);
    Ok(())
}
