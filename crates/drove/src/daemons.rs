//! The long-running processes: `drove manager` and `drove agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use drove_agent::{Agent, AgentConfig};
use drove_client::Client;
use drove_hypervisor::Hypervisor;
use drove_hypervisor::sim::{SimConfig, SimHypervisor};
use drove_manager::dpm::{DpmConfig, DpmMode};
use drove_manager::power::{CommandDriver, Ipmi, NoDriver, PowerDriver, WakeOnLan, parse_mac};
use drove_manager::{Manager, ManagerConfig};
use drove_model::ByteSize;
use drove_store::embedded::EmbeddedStore;

use crate::{Backend, parse_size};

#[derive(Debug, Args)]
pub struct ManagerArgs {
    /// Where the state store and token files live.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address to serve the API on (the management network).
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub listen: SocketAddr,
    /// How often agents should send heartbeats, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// The lease each heartbeat gives a host, in seconds: a host not heard
    /// from for this long is down, and an agent cut off for this long
    /// stops its guests (fences itself).
    #[arg(long, default_value_t = 5)]
    pub host_timeout: u64,
    /// Wait this long (ms) after a host's lease ran out before restarting
    /// its guests elsewhere: time for a cut-off host to stop them.
    #[arg(long, default_value_t = 1500)]
    pub fencing_margin_ms: u64,
    /// Failover restarts booting at once on one surviving host.
    #[arg(long, default_value_t = 2)]
    pub failover_per_host: usize,
    /// Failover restarts booting at once in the whole cluster.
    #[arg(long, default_value_t = 16)]
    pub failover_total: usize,
    /// Fail (and roll back) operations that take longer than this many seconds.
    #[arg(long, default_value_t = 600)]
    pub op_timeout: u64,
    /// Where imported images are kept (default: DATA_DIR/images). Hosts
    /// boot guests from these files at this path: with hosts on other
    /// machines, a directory every host mounts at the same path, such as
    /// the shared pool.
    #[arg(long)]
    pub image_pool: Option<PathBuf>,
    /// vCPUs placement allows per physical core.
    #[arg(long, default_value_t = 4.0)]
    pub vcpu_overcommit: f64,
    /// The rebalancer (DRS): `manual` records the migrations that would
    /// relieve hot hosts (`drove plan drs` shows them), `partial` starts
    /// those off hosts over their capacity, `full` starts them all.
    #[arg(long, default_value = "manual")]
    pub drs: drove_manager::drs::DrsMode,
    /// Seconds between DRS rounds.
    #[arg(long, default_value_t = 300)]
    pub drs_interval: u64,
    /// DRS: a host is hot above this share of its CPU or memory in its
    /// busiest hour ...
    #[arg(long, default_value_t = 0.8)]
    pub drs_hot: f64,
    /// ... and is relieved down to this share.
    #[arg(long, default_value_t = 0.7)]
    pub drs_target: f64,
    /// DRS migrations per round, at most.
    #[arg(long, default_value_t = 2)]
    pub drs_max_moves: usize,
    /// A guest DRS moved is not moved again for this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub drs_cooldown: u64,
    /// Power management (DPM): `manual` records which hosts to wake or to
    /// empty into standby (`drove plan dpm`), `full` also does it through
    /// the power driver, `off` runs no rounds.
    #[arg(long, default_value = "manual")]
    pub dpm: drove_manager::dpm::DpmMode,
    /// Seconds between DPM rounds.
    #[arg(long, default_value_t = 300)]
    pub dpm_interval: u64,
    /// DPM: hours of the guests' load profiles ahead that the hosts on must
    /// carry (hosts wake this far ahead of the load).
    #[arg(long, default_value_t = 2)]
    pub dpm_lookahead: usize,
    /// DPM: the share of CPU and memory hosts on may be planned to.
    #[arg(long, default_value_t = 0.7)]
    pub dpm_target: f64,
    /// DPM: only hosts below this share of the target are emptied.
    #[arg(long, default_value_t = 0.5)]
    pub dpm_below: f64,
    /// DPM migrations per round, at most.
    #[arg(long, default_value_t = 4)]
    pub dpm_max_moves: usize,
    /// Hosts DPM empties per round, at most.
    #[arg(long, default_value_t = 1)]
    pub dpm_max_hosts: usize,
    /// DPM never leaves fewer hosts on than this.
    #[arg(long, default_value_t = 1)]
    pub dpm_min_on: usize,
    /// A woken host that has not reported in after this many seconds is down.
    #[arg(long, default_value_t = 600)]
    pub dpm_wake_timeout: u64,
    /// How hosts are powered off and on: `command` runs --power-cmd, `ipmi`
    /// runs ipmitool against --ipmi-bmc (password from IPMI_PASSWORD),
    /// `wol` wakes with a Wake-on-LAN packet to --wol-mac's address and
    /// powers off with --power-cmd; `none` refuses (DPM only recommends).
    #[arg(long, value_enum, default_value_t = PowerDriverKind::None)]
    pub power_driver: PowerDriverKind,
    /// The power command: split on spaces; `{host}`, `{host_id}` and
    /// `{action}` (on or off) are filled in; it must exit 0.
    #[arg(long)]
    pub power_cmd: Option<String>,
    /// A host's BMC address for IPMI, `{host}` filled in.
    #[arg(long, default_value = "{host}-bmc")]
    pub ipmi_bmc: String,
    #[arg(long, default_value = "admin")]
    pub ipmi_user: String,
    /// A host's MAC for Wake-on-LAN, HOST=MAC (repeatable).
    #[arg(long = "wol-mac", value_name = "HOST=MAC")]
    pub wol_macs: Vec<String>,
    /// Where Wake-on-LAN packets go (the hosts' broadcast address).
    #[arg(long, default_value = "255.255.255.255:9")]
    pub wol_target: std::net::SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PowerDriverKind {
    None,
    Command,
    Ipmi,
    Wol,
}

/// The power driver the flags ask for.
fn power_driver(a: &ManagerArgs) -> Result<Arc<dyn PowerDriver>> {
    let cmd = || -> Result<Option<CommandDriver>> {
        a.power_cmd.as_deref().map(CommandDriver::new).transpose().context("--power-cmd")
    };
    Ok(match a.power_driver {
        PowerDriverKind::None => Arc::new(NoDriver),
        PowerDriverKind::Command => {
            Arc::new(cmd()?.context("--power-driver command needs --power-cmd, e.g. 'my-power {host} {action}'")?)
        }
        PowerDriverKind::Ipmi => Arc::new(Ipmi { bmc: a.ipmi_bmc.clone(), user: a.ipmi_user.clone() }),
        PowerDriverKind::Wol => {
            let mut macs = std::collections::HashMap::new();
            for m in &a.wol_macs {
                let (host, mac) = m.split_once('=').with_context(|| format!("--wol-mac {m:?}: expected HOST=MAC"))?;
                macs.insert(host.to_owned(), parse_mac(mac).with_context(|| format!("--wol-mac {m:?}"))?);
            }
            Arc::new(WakeOnLan { macs, to: a.wol_target, off: cmd()? })
        }
    })
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

pub async fn manager(a: ManagerArgs) -> Result<()> {
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("creating {}", a.data_dir.display()))?;
    let store_path = a.data_dir.join("state.redb");
    let store =
        EmbeddedStore::open(&store_path).with_context(|| format!("opening state store {}", store_path.display()))?;
    let mut config = ManagerConfig::new(a.data_dir.clone());
    config.heartbeat_interval = Duration::from_millis(a.heartbeat_ms.max(10));
    config.host_timeout = Duration::from_secs(a.host_timeout.max(1));
    config.fencing_margin = Duration::from_millis(a.fencing_margin_ms);
    if a.failover_per_host == 0 || a.failover_total == 0 {
        anyhow::bail!("--failover-per-host and --failover-total must be at least 1");
    }
    config.failover_per_host = a.failover_per_host;
    config.failover_total = a.failover_total;
    config.op_timeout = Duration::from_secs(a.op_timeout.max(1));
    if let Some(pool) = &a.image_pool {
        config.image_pool = pool.clone();
    }
    if !(a.vcpu_overcommit.is_finite() && a.vcpu_overcommit > 0.0) {
        anyhow::bail!("--vcpu-overcommit must be a positive number, got {}", a.vcpu_overcommit);
    }
    config.policy.vcpu_overcommit = a.vcpu_overcommit;
    if !(0.0 < a.drs_target && a.drs_target < a.drs_hot && a.drs_hot <= 1.0) {
        anyhow::bail!(
            "--drs-target ({}) must be above 0 and below --drs-hot ({}), which is at most 1",
            a.drs_target,
            a.drs_hot
        );
    }
    config.drs = drove_manager::drs::DrsConfig {
        mode: a.drs,
        interval: Duration::from_secs(a.drs_interval.max(1)),
        hot: a.drs_hot,
        target: a.drs_target,
        max_moves: a.drs_max_moves,
        cooldown: Duration::from_secs(a.drs_cooldown),
    };
    let shares_ok = |x: f64| 0.0 < x && x <= 1.0;
    if !(shares_ok(a.dpm_target) && shares_ok(a.dpm_below)) {
        anyhow::bail!(
            "--dpm-target ({}) and --dpm-below ({}) must be above 0 and at most 1",
            a.dpm_target,
            a.dpm_below
        );
    }
    let driver = power_driver(&a)?;
    if a.dpm == DpmMode::Full && !driver.can_act() {
        anyhow::bail!("--dpm full needs a power driver that can act (--power-driver command|ipmi|wol)");
    }
    config.dpm = DpmConfig {
        mode: a.dpm,
        interval: Duration::from_secs(a.dpm_interval.max(1)),
        lookahead_hours: a.dpm_lookahead.clamp(1, 24),
        target: a.dpm_target,
        below: a.dpm_below,
        max_moves: a.dpm_max_moves,
        max_hosts: a.dpm_max_hosts,
        min_on: a.dpm_min_on.max(1),
        wake_timeout: Duration::from_secs(a.dpm_wake_timeout.max(1)),
        driver,
    };
    let (m, minted) = Manager::open(config, Arc::new(store)).await.context("starting the manager")?;
    if minted.admin.is_some() {
        tracing::info!(dir = %a.data_dir.display(), "minted a new admin token (admin.token)");
    }
    let listener =
        tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
    tracing::info!(endpoint = %format!("http://{}", a.listen), "manager serving");
    drove_manager::serve(m.clone(), listener, shutdown_signal()).await.context("serving the API")?;
    if m.persister().has_failed() {
        anyhow::bail!("the state store failed; restart the manager");
    }
    tracing::info!("manager stopped");
    Ok(())
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This host's name, unique in the data centre.
    #[arg(long)]
    pub name: String,
    /// The manager's endpoint, e.g. http://127.0.0.1:7300.
    #[arg(long)]
    pub manager: String,
    /// File holding the agent token.
    #[arg(long)]
    pub token_file: PathBuf,
    #[arg(long, value_enum, default_value_t = Backend::Qemu)]
    pub backend: Backend,
    /// Where this host keeps its guests' state.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Cores to offer (sim backend).
    #[arg(long, default_value_t = 4)]
    pub cores: u32,
    /// Memory to offer (sim backend), e.g. 16G.
    #[arg(long, value_parser = parse_size, default_value = "16G")]
    pub memory: ByteSize,
    /// The interface guests' VLANs run over (as VXLAN, VNI = VLAN id).
    /// Without it the host has no guest networking: NICs are left out.
    #[arg(long)]
    pub underlay: Option<String>,
    /// The underlay's capacity for guest traffic, e.g. 1gbit: shaped, and
    /// reserved by guests' NIC limits (placement keeps within it).
    #[arg(long, value_parser = crate::cli::parse_rate, requires = "underlay")]
    pub uplink_rate: Option<u64>,
    /// This host's address on the migration network: incoming live
    /// migrations listen there. Without it the host takes no migrations.
    #[arg(long)]
    pub migration_address: Option<std::net::IpAddr>,
    /// Names this host's guest cgroups apart (drove/<scope>.<guest>) when
    /// several agents share one kernel, as a lab's hosts do.
    #[arg(long)]
    pub cgroup_scope: Option<String>,
    /// The shared storage pool: a directory every host mounts at the same
    /// path (NFS or a SAN in production). Guests created with `--storage
    /// shared` keep their disks there and restart on another host when
    /// this one fails. Without it, the host takes no such guests.
    #[arg(long)]
    pub shared_dir: Option<PathBuf>,
    /// An address (IP:PORT) whose answer tells that this host is on the
    /// network when the manager does not answer (repeatable; default: the
    /// manager's). A host that lost its lease and reaches none of them is
    /// cut off and stops its guests: the manager restarts them elsewhere.
    #[arg(long = "isolation-address")]
    pub isolation_addresses: Vec<std::net::SocketAddr>,
    /// Seconds between samples of each guest's CPU, memory, network and
    /// disk use, which the manager learns load profiles from.
    #[arg(long, default_value_t = 10)]
    pub usage_interval: u64,
}

pub fn hypervisor(
    backend: Backend,
    data_dir: &std::path::Path,
    cores: u32,
    memory: ByteSize,
    cgroup_scope: Option<&str>,
    shared_dir: Option<&std::path::Path>,
) -> Result<Arc<dyn Hypervisor>> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    Ok(match backend {
        Backend::Sim => {
            let cfg = SimConfig { cores, memory, ..SimConfig::default() };
            Arc::new(SimHypervisor::with_state_file(cfg, data_dir.join("sim-guests.json"))?)
        }
        Backend::Qemu => crate::lab::qemu_hypervisor(data_dir, cgroup_scope, shared_dir)?,
    })
}

pub async fn agent(a: AgentArgs) -> Result<()> {
    let token = std::fs::read_to_string(&a.token_file)
        .with_context(|| format!("reading agent token {}", a.token_file.display()))?;
    if let Some(dir) = &a.shared_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the shared pool {}", dir.display()))?;
    }
    let hv = hypervisor(a.backend, &a.data_dir, a.cores, a.memory, a.cgroup_scope.as_deref(), a.shared_dir.as_deref())?;
    let mut config = AgentConfig::new(&a.name);
    config.migration_address = a.migration_address;
    config.isolation_addresses = a.isolation_addresses.clone();
    config.usage_every = std::time::Duration::from_secs(a.usage_interval.max(1));
    if let Some(dev) = &a.underlay {
        config.network = Arc::new(drove_net::VxlanNetwork::new(dev.clone(), None)?.with_uplink(a.uplink_rate));
        config.uplink_bps = a.uplink_rate;
        tracing::info!(underlay = %dev, "guest VLANs run as VXLAN segments over the underlay");
    }
    let agent = Agent::new(config, Client::new(&a.manager, &token), hv);
    agent.run(shutdown_signal()).await;
    Ok(())
}
