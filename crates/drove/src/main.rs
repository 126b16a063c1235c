//! `drove`: the command line and the daemons of the drove data-centre
//! manager, in one binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use drove_model::ByteSize;

mod bench;
mod bench_boot;
mod bench_failover;
mod bench_migrate;
mod bench_net;
mod bench_storage;
mod cli;
mod config;
mod console;
mod daemons;
mod lab;
mod output;
mod plan;
mod sim;

#[derive(Debug, Parser)]
#[command(name = "drove", version, about = "drove: run a virtual data centre", long_about = None)]
#[command(after_help = "Start a local lab with `drove up --detach`, then try `drove host list`.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Real QEMU guests (TCG where KVM does not work).
    Qemu,
    /// Simulated guests, for tests and scale runs.
    Sim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Args, Clone, Copy)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local data centre: manager, embedded store and N hosts.
    Up(lab::UpArgs),
    /// Stop the local data centre started by `drove up`.
    Down(lab::DownArgs),
    /// Fault injection on the local data centre: fail and heal its hosts.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Run the manager daemon.
    Manager(daemons::ManagerArgs),
    /// Run a host agent daemon.
    Agent(daemons::AgentArgs),
    /// Hosts: list and inspect.
    #[command(subcommand)]
    Host(cli::HostCommand),
    /// Guests (virtual machines): create, list, start, stop, delete.
    #[command(subcommand)]
    Vm(cli::VmCommand),
    /// VLANs: layer-2 segments guests attach to.
    #[command(subcommand)]
    Vlan(cli::VlanCommand),
    /// Disk images guests can boot from.
    #[command(subcommand)]
    Image(cli::ImageCommand),
    /// Storage pools guests' disks live on: their space and use.
    #[command(subcommand)]
    Pool(cli::PoolCommand),
    /// Long-running operations.
    #[command(subcommand, name = "op")]
    Operation(cli::OpCommand),
    /// The audit log of every mutating call.
    #[command(subcommand)]
    Audit(cli::AuditCommand),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Replay a recorded workload trace through placement policies; print energy, SLA violations, migrations.
    Sim(sim::SimArgs),
    /// Read-only recommendations: capacity headroom and what-ifs, rebalancing moves, hosts to put into standby.
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Print the OpenAPI document of the manager API.
    Openapi,
}

/// Parse a size such as `512M` or `1G` for clap.
pub fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse::<ByteSize>().map_err(|e| e.to_string())
}

pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("drove")
        .join("lab")
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Usage errors in one line (the CLI's rule for every error); help and
/// version output go through unchanged.
fn parse_args() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if e.use_stderr() => {
            let rendered = e.render().to_string();
            let parts: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .collect();
            let mut line = String::new();
            for part in parts {
                if !line.is_empty() {
                    line.push_str(if line.ends_with(':') { " " } else { ": " });
                }
                line.push_str(part);
            }
            eprintln!("{}", if line.starts_with("error:") { line } else { format!("error: {line}") });
            Err(ExitCode::from(2))
        }
        Err(e) => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let daemon = matches!(cli.command, Command::Manager(_) | Command::Agent(_));
    init_tracing(if daemon { "info" } else { "warn" });
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Up(a) => lab::up(a).await,
            Command::Down(a) => lab::down(a).await,
            Command::Lab(c) => lab::lab(c).await,
            Command::Manager(a) => daemons::manager(a).await,
            Command::Agent(a) => daemons::agent(a).await,
            Command::Host(c) => cli::host(c).await,
            Command::Vm(c) => cli::vm(c).await,
            Command::Vlan(c) => cli::vlan(c).await,
            Command::Image(c) => cli::image(c).await,
            Command::Pool(c) => cli::pool(c).await,
            Command::Operation(c) => cli::op(c).await,
            Command::Audit(c) => cli::audit(c).await,
            Command::Bench(c) => bench::run(c).await,
            Command::Sim(a) => sim::run(a),
            Command::Plan(c) => plan::run(c).await,
            Command::Openapi => {
                println!("{}", drove_manager::http::openapi_json());
                Ok(())
            }
        }
    });
    // Do not wait for detached background tasks (agents in benches).
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<ExitWith>() {
            Some(ExitWith(code)) => ExitCode::from(*code),
            None => {
                eprintln!("error: {}", one_line(&e));
                ExitCode::FAILURE
            }
        },
    }
}

/// Exit with this code, having printed what there was to print (e.g. a
/// command run inside a guest that failed).
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// An error and its causes on one line, without repeating a cause that its
/// parent already quoted.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}
