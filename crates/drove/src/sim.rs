//! `drove sim`: replay a recorded workload trace through placement policies
//! in simulated time and print energy, SLA violations and migrations.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use drove_sim::{ModelKind, Report, Scenario};
use serde::Serialize;

use crate::{Format, OutputArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    /// CloudSim's model, to compare with published figures: memory counts
    /// only at first placement, idle hosts are off and back instantly.
    Reference,
    /// Memory always enforced, standby and wake-up take time, migrations
    /// share bandwidth, monitoring reports the past.
    Realistic,
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Trace directory: one file per VM, one CPU utilisation percentage per line.
    #[arg(long)]
    pub trace: PathBuf,
    /// Hosts in the simulated data centre (half HP ML110 G4, half G5).
    #[arg(long, default_value_t = 800)]
    pub hosts: usize,
    /// Policies to run, comma-separated: drove, npa, dvfs, thr-mmt[:T],
    /// iqr-mmt[:S], mad-mmt[:S], lr-mmt[:S]; `all` runs drove and every baseline.
    #[arg(long, value_delimiter = ',', default_value = "drove")]
    pub policy: Vec<String>,
    /// World model.
    #[arg(long, value_enum, default_value_t = ModelArg::Reference)]
    pub model: ModelArg,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Serialize)]
struct SimOutput {
    trace: String,
    vms: usize,
    samples: usize,
    hosts: usize,
    model: ModelKind,
    load_secs: f64,
    results: Vec<Report>,
}

fn progress(label: &str, done: usize, total: usize) {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let width = 30;
        let filled = done * width / total.max(1);
        eprint!("\r\x1b[K{label:<14} [{}{}] {done}/{total}", "#".repeat(filled), ".".repeat(width - filled));
        let _ = std::io::stderr().flush();
    }
}

fn progress_done() {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprint!("\r\x1b[K");
        let _ = std::io::stderr().flush();
    }
}

pub fn run(a: SimArgs) -> Result<()> {
    let names: Vec<String> = if a.policy.iter().any(|p| p == "all") {
        drove_sim::policy::NAMES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        a.policy.clone()
    };
    // Refuse an unknown policy before spending time on the trace.
    for n in &names {
        drove_sim::by_name(n)?;
    }
    let started = Instant::now();
    let trace = drove_sim::load_dir(&a.trace)?;
    let load_secs = started.elapsed().as_secs_f64();
    let kind = match a.model {
        ModelArg::Reference => ModelKind::Reference,
        ModelArg::Realistic => ModelKind::Realistic,
    };
    let scenario = Scenario::planetlab(&trace, a.hosts, kind).context("building the simulated data centre")?;
    let mut results = Vec::new();
    for n in &names {
        let mut policy = drove_sim::by_name(n)?;
        let label = policy.name();
        let report = drove_sim::run(&scenario, policy.as_mut(), &mut |d, t| progress(&label, d, t))
            .with_context(|| format!("simulating policy {label}"))?;
        progress_done();
        results.push(report);
    }
    let out = SimOutput {
        trace: trace.source.clone(),
        vms: trace.vms(),
        samples: trace.len(),
        hosts: a.hosts,
        model: kind,
        load_secs,
        results,
    };
    match a.out.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&out)?),
        Format::Table => print_table(&out),
    }
    Ok(())
}

fn print_table(o: &SimOutput) {
    println!(
        "drove sim: {} ({} VMs x {} samples), {} hosts, {} model, {:.0} s simulated; trace loaded in {:.2} s",
        o.trace,
        o.vms,
        o.samples,
        o.hosts,
        o.model,
        o.results.first().map_or(0.0, |r| r.simulated_secs),
        o.load_secs
    );
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header([
        "POLICY",
        "ENERGY KWH",
        "SLATAH %",
        "PDM %",
        "SLAV %",
        "ESV",
        "MIGRATIONS",
        "HOSTS MEAN/MAX",
        "WALL S",
    ]);
    for r in &o.results {
        t.add_row([
            r.policy.clone(),
            format!("{:.2}", r.energy_kwh),
            format!("{:.2}", r.slatah_pct),
            format!("{:.4}", r.pdm_pct),
            format!("{:.5}", r.slav_pct),
            format!("{:.5}", r.esv),
            r.migrations.to_string(),
            format!("{:.1}/{}", r.mean_active_hosts, r.max_active_hosts),
            format!("{:.2}", r.wall_secs),
        ]);
    }
    for line in t.to_string().lines() {
        println!("{}", line.strip_prefix(' ').unwrap_or(line).trim_end());
    }
}

#[derive(Debug, Args)]
pub struct PlacementBench {
    #[arg(long, default_value_t = 1000)]
    pub hosts: usize,
    #[arg(long, default_value_t = 50_000)]
    pub guests: usize,
    /// Time slots of the guests' daily profiles (24 = hourly).
    #[arg(long, default_value_t = 24)]
    pub slots: usize,
    /// Times the failover and rebalancing plans are timed (median reported).
    #[arg(long, default_value_t = 21)]
    pub repeat: usize,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `drove bench placement`.
pub fn bench_placement(a: PlacementBench) -> Result<()> {
    if a.hosts < 2 || a.guests == 0 || a.slots == 0 {
        anyhow::bail!("--hosts must be at least 2, --guests and --slots positive");
    }
    eprintln!("placing {} guests on {} hosts ...", a.guests, a.hosts);
    let f = drove_sim::bench::placement(a.hosts, a.guests, a.slots, a.repeat);
    match a.out.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&f)?),
        Format::Table => {
            println!(
                "drove bench placement: {} guests with {}-slot daily profiles on {} hosts (4 resources, anti-affinity, tiers, 10 % HA reserve)",
                f.guests, f.slots, f.hosts
            );
            println!(
                "  place all guests             {:>9.1} ms   ({} placed, {} not, {} hosts used)",
                f.place_all_ms, f.placed, f.unplaced, f.hosts_used
            );
            println!(
                "  failover plan, 100-guest host {:>8.2} ms   ({} restarts on {} hosts in {} waves)",
                f.failover_ms, f.failover_restarted, f.failover_targets, f.failover_waves
            );
            println!(
                "  one rebalancing round        {:>9.2} ms   ({} hot hosts: {} moves, {} left unresolved)",
                f.rebalance_ms, f.hot_hosts, f.rebalance_moves, f.rebalance_unresolved
            );
        }
    }
    Ok(())
}
