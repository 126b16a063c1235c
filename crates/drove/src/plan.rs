//! `drove plan`: read-only recommendations from the placement engine.
//!
//! Hosts and guests come from the manager's API; they are turned into the
//! placement crate's [`Cluster`] (24 hourly slots) and handed to the same
//! pure decision functions the simulator runs. Nothing is changed: every
//! command only prints what it would do.
//!
//! The model and how the live system maps onto it live in the manager
//! ([`drove_manager::drs::Model`]), whose rebalancer (DRS) makes the same
//! recommendations on its own; `drove plan drs` shows its last round.

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use drove_manager::drs::{DEFAULT_CPU_FRACTION, MILLI, Model, SLOTS, limits, move_kind};
use drove_model::ByteSize;
use drove_placement::{
    BalanceParams, Cluster, ConsolidateParams, FailoverParams, GuestSpec, Limits, Mobility, Move, PowerModel,
    PowerState, Strategy, consolidate, headroom, rebalance, what_if_add, what_if_lose,
};
use serde::Serialize;

use crate::output::print;
use crate::{Format, OutputArgs};

const CAPACITY_HELP: &str = "\
How it is computed:
  Headroom = capacity - what the guests placed there need, per hour of the day
  (the table shows the fullest hour of each 6-hour window; -o json has all 24).
  CPU is in cores (1 core = 1000 milli-cores in JSON); a guest needs vCPUs x its
  hourly load_profile fraction, or 0.25 of its vCPUs all day without a profile
  (the manager admits 4 vCPUs per core). Memory is counted in full all day.
  Hosts in maintenance or down are left out: they take no guests.
  --what-if-add places N copies of GUEST with the placement engine (most-packed);
  --what-if-lose plans the restart of HOST's guests on the other hosts (HA).

Examples:
  drove plan capacity
  drove plan capacity --what-if-add 20 --like web-1
  drove plan capacity --what-if-lose host-2 -o json";

const BALANCE_HELP: &str = "\
Manual mode: this only recommends. Nothing is migrated; run the moves yourself
(or run the manager with `--drs full`: see `drove plan drs --help`).

How it decides:
  A host is hot when its busiest hour needs more than --hot of its CPU or
  memory; it is relieved down to --target, and receivers are filled up to
  --target only, so a move never makes a new hot host (hysteresis). Then, if
  the peak CPU of the busiest and the idlest host differ by more than
  --max-spread, guests move to even them out. At most --max-moves moves.
  Every move says why. Load is modelled as in `drove plan capacity --help`.

Examples:
  drove plan balance
  drove plan balance --max-spread 0.5 --max-moves 3 -o json";

const POWER_HELP: &str = "\
Manual mode: this only recommends. No host is put into standby and nothing is
migrated.

How it decides:
  Light hosts (peak CPU over the day below half of --target) whose guests all
  fit on the hosts that stay on (up to --target of CPU and memory in every hour
  of the day) can be emptied and put into standby, lightest first; hosts
  already empty go first; at least --min-on hosts stay on. Decisions use the
  whole day's load profiles, so a host sent to standby is not needed at any
  hour of them (waking ahead of predicted load is not done here).

Power model (assumptions, per host, the same for every host until hosts report
their type): wall watts = (idle + (peak - idle) x CPU utilisation) / PSU
efficiency, with --idle-watts 100, --peak-watts 250 (DC, a typical 1U
two-socket server), --psu-efficiency 0.9, and --standby-watts 5 (wall) in
standby. Utilisation is that of the hour given by --hour (default: the current
UTC hour). 'after' counts the recommended moves as done and the emptied hosts
in standby.

Examples:
  drove plan power
  drove plan power --min-on 2 --hour 3 -o json";

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Headroom per host and for the cluster per time of day; what-if questions.
    #[command(after_help = CAPACITY_HELP)]
    Capacity(CapacityArgs),
    /// Recommend live migrations that relieve hot or unbalanced hosts (manual mode: nothing is executed).
    #[command(after_help = BALANCE_HELP)]
    Balance(BalanceArgs),
    /// Recommend hosts to put into standby and estimate the watts saved (nothing is executed).
    #[command(after_help = POWER_HELP)]
    Power(PowerArgs),
    /// If HOST failed now: where each of its guests would restart, in which wave, and which would not.
    #[command(after_help = FAILOVER_HELP)]
    Failover {
        /// The host (name or id).
        host: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The manager's rebalancer (DRS): its mode and last round, the migrations it recommended (manual mode) or started (full mode), each with its reason.
    #[command(after_help = DRS_HELP)]
    Drs {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The manager's power management (DPM): its mode and last round, the hosts it wakes ahead of load or empties and puts into standby, each with its reason, and the watts saved.
    #[command(after_help = DPM_HELP)]
    Dpm {
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// What became of a recommended migration, for the tables of `plan drs`
/// and `plan dpm`.
fn move_action(m: &drove_api::DrsMove) -> String {
    match (&m.operation, &m.error) {
        (Some(op), _) => format!("started {op}"),
        (None, Some(e)) => format!("not started: {e}"),
        (None, None) => "recommended".into(),
    }
}

const DPM_HELP: &str = "\
Every interval the manager models the guests' load profiles of the hours ahead
(settings: drove manager --dpm off|manual|full --dpm-interval SECS
--dpm-lookahead HOURS --dpm-target SHARE --dpm-below SHARE --dpm-min-on N
--power-driver none|command|ipmi|wol). If the hosts on cannot carry that load
within the target, it wakes standby hosts, most efficient first; otherwise it
empties hosts whose guests fit elsewhere and puts them into standby. In manual
mode it only records this; in full mode it migrates and powers hosts off and
on itself, as principal `dpm`, audited. `drove plan power` previews what
consolidation would save.

Examples:
  drove plan dpm
  drove plan dpm -o json";

const DRS_HELP: &str = "\
The manager runs the same balancing as `drove plan balance` every interval on
its own (settings: drove manager --drs manual|partial|full --drs-interval
SECS --drs-hot SHARE --drs-target SHARE --drs-max-moves N --drs-cooldown
SECS). In manual mode it only records its recommendations; in partial mode
it starts only the migrations off hosts whose guests demand more than the
host has, and recommends the rest; in full mode it starts them all, as
principal `drs`, audited. It never thrashes: hot
and target thresholds apart, a budget of moves per round, and a guest it
moved is left alone for the cool-down.

Examples:
  drove plan drs
  drove plan drs -o json";

const FAILOVER_HELP: &str = "\
The manager's own plan, computed as its failover would now: guests on shared
storage restart on the surviving hosts, highest priority first, each on the
host that got the fewest of them (then the most free memory), a few at a time
per host (wave 0 boots first). Guests with disks on HOST itself wait for it to
come back; guests with restart policy `never` move but stay stopped.

Examples:
  drove plan failover host-1
  drove plan failover host-1 -o json";

#[derive(Debug, Args)]
pub struct CapacityArgs {
    /// What if N more guests like --like were created?
    #[arg(long, value_name = "N", requires = "like")]
    pub what_if_add: Option<usize>,
    /// The guest (name or id) the added guests are copies of.
    #[arg(long, value_name = "GUEST", requires = "what_if_add")]
    pub like: Option<String>,
    /// What if this host (name or id) failed: where would its guests restart?
    #[arg(long, value_name = "HOST")]
    pub what_if_lose: Option<String>,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct BalanceArgs {
    /// A host is hot above this share of its CPU or memory.
    #[arg(long, default_value_t = 0.9, value_parser = parse_share)]
    pub hot: f64,
    /// Hot hosts are relieved down to, and receivers filled up to, this share.
    #[arg(long, default_value_t = 0.75, value_parser = parse_share)]
    pub target: f64,
    /// Even out hosts whose peak CPU differs by more than this share (0.3 = 30 points); 1 turns it off.
    #[arg(long, default_value_t = 0.3, value_parser = parse_share)]
    pub max_spread: f64,
    /// Recommend at most this many migrations.
    #[arg(long, default_value_t = 10)]
    pub max_moves: usize,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct PowerArgs {
    /// Hosts that stay on whatever the load (spare for failures and wake-up time).
    #[arg(long, default_value_t = 1)]
    pub min_on: usize,
    /// Hosts that stay on may be filled up to this share of CPU and memory.
    #[arg(long, default_value_t = 0.8, value_parser = parse_share)]
    pub target: f64,
    /// Hour of the day (0-23, UTC) whose load counts as "now".
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..24))]
    pub hour: Option<u8>,
    /// DC watts of an idle host.
    #[arg(long, default_value_t = 100.0)]
    pub idle_watts: f64,
    /// DC watts of a host at full CPU.
    #[arg(long, default_value_t = 250.0)]
    pub peak_watts: f64,
    /// Power supply efficiency, a fraction in (0, 1].
    #[arg(long, default_value_t = 0.9)]
    pub psu_efficiency: f64,
    /// Wall watts of a host in standby.
    #[arg(long, default_value_t = 5.0)]
    pub standby_watts: f64,
    /// Recommend at most this many migrations.
    #[arg(long, default_value_t = 20)]
    pub max_moves: usize,
    #[command(flatten)]
    pub out: OutputArgs,
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v > 0.0 && v <= 1.0 { Ok(v) } else { Err(format!("{v} is not a share in (0, 1]")) }
}

pub async fn run(cmd: PlanCommand) -> Result<()> {
    let c = crate::cli::client()?;
    if let PlanCommand::Failover { host, out } = &cmd {
        let plan = c.failover_plan(host).await?;
        let mut rows: Vec<Vec<String>> = plan
            .restarts
            .iter()
            .map(|r| {
                let what = if r.start { "restart" } else { "move, stopped" };
                vec![r.guest.clone(), r.priority.to_string(), r.to.clone(), r.wave.to_string(), what.to_owned()]
            })
            .collect();
        rows.extend(
            plan.stranded.iter().map(|s| vec![s.guest.clone(), "-".into(), "-".into(), "-".into(), s.reason.clone()]),
        );
        return print(out.format, &plan, &["guest", "priority", "to", "wave", "action"], rows);
    }
    if let PlanCommand::Dpm { out } = &cmd {
        let r = c.dpm_status().await?;
        if out.format == Format::Json {
            return print(Format::Json, &r, &[], Vec::new());
        }
        let when = if r.at.is_empty() { "no round yet".to_owned() } else { format!("last round {}", r.at) };
        println!(
            "DPM {} mode (driver {}), every {} s, looking {} h ahead; {when}",
            r.mode, r.driver, r.interval_secs, r.lookahead_hours
        );
        println!(
            "{} host(s) on, {} in standby; about {:.0} W now, {:.0} W saved",
            r.hosts_on, r.hosts_standby, r.watts_now, r.watts_saved
        );
        if let Some(w) = &r.waiting {
            println!("waiting: {w}");
        }
        let state = |done: bool, error: &Option<String>| match (done, error) {
            (_, Some(e)) => format!("failed: {e}"),
            (true, None) => "done".to_owned(),
            (false, None) => "recommended".to_owned(),
        };
        for a in &r.wake {
            println!("wake {}: {} ({})", a.host, a.reason, state(a.done, &a.error));
        }
        for a in &r.standby {
            println!("standby {}: {} ({})", a.host, a.reason, state(a.done, &a.error));
        }
        if !r.moves.is_empty() {
            let rows =
                r.moves.iter().map(|m| vec![m.guest.clone(), m.from.clone(), m.to.clone(), move_action(m)]).collect();
            print(Format::Table, &r, &["guest", "from", "to", "action"], rows)?;
        }
        if r.wake.is_empty() && r.standby.is_empty() && r.waiting.is_none() {
            println!("nothing to change");
        }
        for e in &r.errors {
            println!("error: {e}");
        }
        return Ok(());
    }
    if let PlanCommand::Drs { out } = &cmd {
        let r = c.drs_status().await?;
        if out.format == Format::Json {
            return print(Format::Json, &r, &[], Vec::new());
        }
        let when = if r.at.is_empty() { "no round yet".to_owned() } else { format!("last round {}", r.at) };
        println!(
            "DRS {} mode, every {} s, hot above {:.0} %, relieved to {:.0} %; {when}; {} guests held back",
            r.mode,
            r.interval_secs,
            r.hot * 100.0,
            r.target * 100.0,
            r.held
        );
        if r.moves.is_empty() {
            println!("no migration recommended");
        } else {
            let rows = r
                .moves
                .iter()
                .map(|m| vec![m.guest.clone(), m.from.clone(), m.to.clone(), m.reason.clone(), move_action(m)])
                .collect();
            print(Format::Table, &r, &["guest", "from", "to", "why", "action"], rows)?;
        }
        for u in &r.unresolved {
            println!("cannot relieve {}: {}", u.host, u.reason);
        }
        return Ok(());
    }
    let hosts = c.list_hosts().await.context("cannot list hosts")?;
    let guests = c.list_guests().await.context("cannot list guests")?;
    match cmd {
        PlanCommand::Capacity(a) => {
            let m = Model::build(&hosts, &guests, drove_manager::drs::default_power())?;
            capacity(&m, &a)
        }
        PlanCommand::Balance(a) => {
            if a.target >= a.hot {
                bail!("--target {} must be below --hot {}", a.target, a.hot);
            }
            let m = Model::build(&hosts, &guests, drove_manager::drs::default_power())?;
            balance(&m, &a)
        }
        PlanCommand::Power(a) => {
            let power = PowerModel::linear(a.idle_watts, a.peak_watts, a.psu_efficiency, a.standby_watts)
                .context("invalid power model")?;
            let m = Model::build(&hosts, &guests, power)?;
            plan_power(&m, &a)
        }
        PlanCommand::Failover { .. } | PlanCommand::Drs { .. } | PlanCommand::Dpm { .. } => Ok(()), // answered above
    }
}

fn find_host(m: &Model, key: &str) -> Result<drove_placement::HostIx> {
    m.find_host(key).ok_or_else(|| {
        let known: Vec<&str> = m.cluster.hosts().map(|h| m.host_name(h)).collect();
        anyhow!("unknown host {key:?} (hosts: {})", known.join(", "))
    })
}

fn find_guest(m: &Model, key: &str) -> Result<drove_placement::GuestIx> {
    m.find_guest(key).ok_or_else(|| anyhow!("unknown guest {key:?} (see `drove vm list`)"))
}

// ---- capacity ---------------------------------------------------------------

#[derive(Debug, Serialize)]
struct CapacityReport {
    /// Slots per day: index i of every array is the hour i:00-i:59 UTC.
    slots_per_day: usize,
    /// Guests without a load profile: planned from their measured load in
    /// the hours it has enough samples, else at `default_cpu_fraction`.
    unprofiled_guests: usize,
    /// Of those, the guests planned from measurement for some hours.
    measured_guests: usize,
    default_cpu_fraction: f32,
    hosts: Vec<HostHeadroom>,
    cluster: Headroom,
    what_if_add: Option<WhatIfAddReport>,
    what_if_lose: Option<WhatIfLoseReport>,
}

#[derive(Debug, Serialize)]
struct HostHeadroom {
    host: String,
    cpu_capacity_millicores: u32,
    memory_capacity_mib: u32,
    guests: usize,
    #[serde(flatten)]
    free: Headroom,
}

#[derive(Debug, Serialize)]
struct Headroom {
    cpu_free_millicores: Vec<u32>,
    memory_free_mib: Vec<u32>,
}

#[derive(Debug, Serialize)]
struct WhatIfAddReport {
    like: String,
    count: usize,
    fits: usize,
    /// Why the first copy that did not fit did not.
    first_failure: Option<String>,
}

#[derive(Debug, Serialize)]
struct WhatIfLoseReport {
    host: String,
    guests: usize,
    /// Every guest of the host can restart elsewhere.
    all_fit: bool,
    restarts: Vec<RestartReport>,
    unplaced: Vec<Unplaced>,
}

#[derive(Debug, Serialize)]
struct RestartReport {
    guest: String,
    host: String,
    /// Restarts go in waves (0 first) so that they do not make a boot storm.
    wave: usize,
}

#[derive(Debug, Serialize)]
struct Unplaced {
    guest: String,
    reason: String,
}

fn capacity(m: &Model, a: &CapacityArgs) -> Result<()> {
    let c = &m.cluster;
    // Resolve names before any work so bad input fails fast.
    let lose = a.what_if_lose.as_deref().map(|k| find_host(m, k)).transpose()?;
    let like = a.like.as_deref().map(|k| find_guest(m, k)).transpose()?;
    let hosts: Vec<HostHeadroom> = headroom(c, &Limits::FULL)
        .into_iter()
        .map(|hr| HostHeadroom {
            host: m.host_name(hr.host).to_owned(),
            cpu_capacity_millicores: c.host(hr.host).capacity.cpu,
            memory_capacity_mib: c.host(hr.host).capacity.memory_mib,
            guests: c.residents(hr.host).len(),
            free: Headroom {
                cpu_free_millicores: hr.free.iter().map(|r| r.cpu).collect(),
                memory_free_mib: hr.free.iter().map(|r| r.memory_mib).collect(),
            },
        })
        .collect();
    let sum = |f: fn(&Headroom) -> &Vec<u32>| -> Vec<u32> {
        (0..SLOTS).map(|s| hosts.iter().map(|h| f(&h.free)[s]).fold(0u32, u32::saturating_add)).collect()
    };
    let cluster =
        Headroom { cpu_free_millicores: sum(|h| &h.cpu_free_millicores), memory_free_mib: sum(|h| &h.memory_free_mib) };
    let what_if_add = match (a.what_if_add, like) {
        (Some(count), Some(g)) => {
            let template = GuestSpec { mobility: Mobility::Free, ..c.guest(g).clone() };
            let r = what_if_add(c, &template, count, &Limits::FULL, Strategy::MostPacked)?;
            Some(WhatIfAddReport {
                like: m.guest_name(g).to_owned(),
                count,
                fits: r.fits,
                first_failure: r.first_failure.map(|e| e.to_string()),
            })
        }
        _ => None,
    };
    let what_if_lose = lose.map(|h| {
        let plan = what_if_lose(c, h, &FailoverParams::default());
        WhatIfLoseReport {
            host: m.host_name(h).to_owned(),
            guests: c.residents(h).len(),
            all_fit: plan.unplaced.is_empty(),
            restarts: plan
                .restarts
                .iter()
                .map(|r| RestartReport {
                    guest: m.guest_name(r.guest).to_owned(),
                    host: m.host_name(r.host).to_owned(),
                    wave: r.wave,
                })
                .collect(),
            unplaced: plan
                .unplaced
                .iter()
                .map(|(g, e)| Unplaced { guest: m.guest_name(*g).to_owned(), reason: e.to_string() })
                .collect(),
        }
    });
    let report = CapacityReport {
        slots_per_day: SLOTS,
        unprofiled_guests: c.guest_count() - m.profiled,
        measured_guests: m.measured,
        default_cpu_fraction: DEFAULT_CPU_FRACTION,
        hosts,
        cluster,
        what_if_add,
        what_if_lose,
    };
    if a.out.format == Format::Json {
        return print(Format::Json, &report, &[], Vec::new());
    }
    // The fullest hour of each 6-hour window.
    let windows = |v: &[u32], fmt: &dyn Fn(u32) -> String| -> Vec<String> {
        v.chunks(6).map(|w| fmt(w.iter().copied().min().unwrap_or(0))).collect()
    };
    let cores = |mc: u32| format!("{:.2}", f64::from(mc) / f64::from(MILLI));
    let mem = |mib: u32| ByteSize::mib(u64::from(mib)).to_string();
    let mut rows = Vec::new();
    for h in &report.hosts {
        let mut cpu = vec![h.host.clone(), "cpu (cores)".into(), cores(h.cpu_capacity_millicores)];
        cpu.extend(windows(&h.free.cpu_free_millicores, &cores));
        let mut memory = vec![h.host.clone(), "memory".into(), mem(h.memory_capacity_mib)];
        memory.extend(windows(&h.free.memory_free_mib, &mem));
        rows.extend([cpu, memory]);
    }
    let total_cpu: u32 = report.hosts.iter().map(|h| h.cpu_capacity_millicores).sum();
    let total_mem: u32 = report.hosts.iter().map(|h| h.memory_capacity_mib).sum();
    let mut cpu = vec!["cluster".into(), "cpu (cores)".into(), cores(total_cpu)];
    cpu.extend(windows(&report.cluster.cpu_free_millicores, &cores));
    let mut memory = vec!["cluster".into(), "memory".into(), mem(total_mem)];
    memory.extend(windows(&report.cluster.memory_free_mib, &mem));
    rows.extend([cpu, memory]);
    print(
        Format::Table,
        &report,
        &["host", "resource", "capacity", "free 00-06h", "free 06-12h", "free 12-18h", "free 18-24h"],
        rows,
    )?;
    if report.unprofiled_guests > 0 {
        println!(
            "\n{} guest(s) without a load profile planned at {:.0} % of their vCPUs in the hours their \
             measured load does not cover ({} measured).",
            report.unprofiled_guests,
            DEFAULT_CPU_FRACTION * 100.0,
            report.measured_guests
        );
    }
    if let Some(w) = &report.what_if_add {
        println!("\nwhat if {} more guests like {}: {} of {} fit", w.count, w.like, w.fits, w.count);
        if let Some(why) = &w.first_failure {
            println!("  the first that does not: {why}");
        }
    }
    if let Some(w) = &report.what_if_lose {
        let verdict = if w.all_fit { "all fit elsewhere" } else { "NOT all fit elsewhere" };
        println!("\nwhat if {} is lost: its {} guest(s) {verdict}", w.host, w.guests);
        for r in &w.restarts {
            println!("  restart {} on {} (wave {})", r.guest, r.host, r.wave);
        }
        for u in &w.unplaced {
            println!("  cannot restart {}: {}", u.guest, u.reason);
        }
    }
    Ok(())
}

// ---- balance ----------------------------------------------------------------

#[derive(Debug, Serialize)]
struct BalanceReport {
    /// Always "manual": recommendations only, nothing was executed.
    mode: &'static str,
    executed: bool,
    hosts: Vec<HostLoad>,
    moves: Vec<MoveReport>,
    /// Hot hosts no move could relieve, and why.
    unresolved: Vec<Unresolved>,
}

#[derive(Debug, Serialize)]
struct HostLoad {
    host: String,
    /// Peak share of CPU and memory over the day (1.0 = all of it).
    cpu_peak: f64,
    memory_peak: f64,
    hot: bool,
}

#[derive(Debug, Serialize)]
struct MoveReport {
    guest: String,
    from: String,
    to: String,
    /// `hot`, `imbalance` or `evacuate`.
    kind: &'static str,
    /// One line saying why.
    reason: String,
}

#[derive(Debug, Serialize)]
struct Unresolved {
    host: String,
    reason: String,
}

fn move_report(m: &Model, mv: &Move) -> MoveReport {
    MoveReport {
        guest: m.guest_name(mv.guest).to_owned(),
        from: m.host_name(mv.from).to_owned(),
        to: m.host_name(mv.to).to_owned(),
        kind: move_kind(&mv.reason),
        reason: mv.explain(&m.cluster),
    }
}

fn balance(m: &Model, a: &BalanceArgs) -> Result<()> {
    let c = &m.cluster;
    let params = BalanceParams {
        hot: limits(a.hot),
        target: limits(a.target),
        strategy: Strategy::LeastLoaded,
        max_moves: a.max_moves,
        imbalance: (a.max_spread < 1.0).then_some(a.max_spread),
        allow_wake: false,
    };
    let plan = rebalance(c, &params);
    let hosts = c
        .hosts()
        .map(|h| {
            let u = c.peak_utilisation(h, &Limits::FULL);
            HostLoad {
                host: m.host_name(h).to_owned(),
                cpu_peak: u[0],
                memory_peak: u[1],
                hot: c.pressure(h, &params.hot) > 1.0,
            }
        })
        .collect();
    let report = BalanceReport {
        mode: "manual",
        executed: false,
        hosts,
        moves: plan.moves.iter().map(|mv| move_report(m, mv)).collect(),
        unresolved: plan
            .unresolved
            .iter()
            .map(|(h, why)| Unresolved { host: m.host_name(*h).to_owned(), reason: why.clone() })
            .collect(),
    };
    if a.out.format == Format::Json {
        return print(Format::Json, &report, &[], Vec::new());
    }
    let pct = |v: f64| format!("{:.0} %", v * 100.0);
    print(
        Format::Table,
        &report,
        &["host", "cpu peak", "memory peak", "hot"],
        report
            .hosts
            .iter()
            .map(|h| vec![h.host.clone(), pct(h.cpu_peak), pct(h.memory_peak), if h.hot { "yes" } else { "no" }.into()])
            .collect(),
    )?;
    println!();
    if report.moves.is_empty() {
        println!("no migration recommended: no host is hot and the load is even enough");
    } else {
        print(
            Format::Table,
            &report,
            &["guest", "from", "to", "why"],
            report
                .moves
                .iter()
                .map(|mv| {
                    let why = mv.reason.split_once(": ").map_or(mv.reason.as_str(), |(_, w)| w);
                    vec![mv.guest.clone(), mv.from.clone(), mv.to.clone(), why.to_owned()]
                })
                .collect(),
        )?;
    }
    for u in &report.unresolved {
        println!("cannot relieve {}: {}", u.host, u.reason);
    }
    println!("\nmanual mode: recommendations only, nothing was migrated");
    Ok(())
}

// ---- power ------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct PowerReport {
    mode: &'static str,
    executed: bool,
    /// The hour of the day (UTC) whose load counts as now.
    hour: usize,
    assumptions: PowerAssumptions,
    hosts: Vec<HostPower>,
    /// Hosts that could go to standby now.
    standby: Vec<String>,
    /// Migrations that empty them.
    moves: Vec<MoveReport>,
    watts_now: f64,
    watts_after: f64,
    watts_saved: f64,
}

#[derive(Debug, Serialize)]
struct PowerAssumptions {
    idle_dc_watts: f64,
    peak_dc_watts: f64,
    psu_efficiency: f64,
    standby_watts: f64,
}

#[derive(Debug, Serialize)]
struct HostPower {
    host: String,
    cpu_now: f64,
    watts_now: f64,
    standby: bool,
    cpu_after: f64,
    watts_after: f64,
}

fn current_hour() -> usize {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    ((secs % 86_400) / 3_600) as usize
}

/// CPU utilisation and wall watts of every host in `slot`.
fn watts(c: &Cluster, slot: usize) -> Vec<(f64, f64)> {
    c.hosts()
        .map(|h| {
            let spec = c.host(h);
            if !spec.state.is_powered() {
                return (0.0, spec.power.standby_watts());
            }
            let u = f64::from(c.load(h, slot).cpu) / f64::from(spec.capacity.cpu.max(1));
            (u, spec.power.watts(u))
        })
        .collect()
}

fn plan_power(m: &Model, a: &PowerArgs) -> Result<()> {
    let c = &m.cluster;
    let hour = a.hour.map_or_else(current_hour, usize::from);
    let params = ConsolidateParams {
        target: limits(a.target),
        below: 0.5,
        max_moves: a.max_moves,
        max_hosts: c.host_count(),
        min_on: a.min_on,
    };
    let plan = consolidate(c, &params);
    let mut after = c.clone();
    for mv in &plan.moves {
        after.assign(mv.guest, mv.to);
    }
    for &h in &plan.standby {
        after.set_power_state(h, PowerState::Standby);
    }
    let (now_w, after_w) = (watts(c, hour), watts(&after, hour));
    let hosts: Vec<HostPower> = c
        .hosts()
        .map(|h| HostPower {
            host: m.host_name(h).to_owned(),
            cpu_now: now_w[h.index()].0,
            watts_now: now_w[h.index()].1,
            standby: plan.standby.contains(&h),
            cpu_after: after_w[h.index()].0,
            watts_after: after_w[h.index()].1,
        })
        .collect();
    let watts_now: f64 = hosts.iter().map(|h| h.watts_now).sum();
    let watts_after: f64 = hosts.iter().map(|h| h.watts_after).sum();
    let report = PowerReport {
        mode: "manual",
        executed: false,
        hour,
        assumptions: PowerAssumptions {
            idle_dc_watts: a.idle_watts,
            peak_dc_watts: a.peak_watts,
            psu_efficiency: a.psu_efficiency,
            standby_watts: a.standby_watts,
        },
        standby: plan.standby.iter().map(|&h| m.host_name(h).to_owned()).collect(),
        moves: plan.moves.iter().map(|mv| move_report(m, mv)).collect(),
        hosts,
        watts_now,
        watts_after,
        watts_saved: watts_now - watts_after,
    };
    if a.out.format == Format::Json {
        return print(Format::Json, &report, &[], Vec::new());
    }
    let pct = |v: f64| format!("{:.0} %", v * 100.0);
    print(
        Format::Table,
        &report,
        &["host", "cpu now", "watts now", "recommendation", "watts after"],
        report
            .hosts
            .iter()
            .map(|h| {
                vec![
                    h.host.clone(),
                    pct(h.cpu_now),
                    format!("{:.0}", h.watts_now),
                    if h.standby { "standby".into() } else { "stay on".into() },
                    format!("{:.0}", h.watts_after),
                ]
            })
            .collect(),
    )?;
    for mv in &report.moves {
        println!("{}", mv.reason);
    }
    println!(
        "\ncluster at {hour:02}:00 UTC: {:.0} W now, {:.0} W after, {:.0} W saved ({:.0} %)",
        report.watts_now,
        report.watts_after,
        report.watts_saved,
        if report.watts_now > 0.0 { report.watts_saved / report.watts_now * 100.0 } else { 0.0 }
    );
    println!("manual mode: recommendations only, no host was put into standby");
    Ok(())
}
