//! `drove up` / `drove down`: a whole data centre on one machine.
//!
//! `up` starts a manager (with its embedded store) and N agents as detached
//! processes under one data directory, records them in `lab.json` as it
//! goes (so a crashed `up` can still be cleaned up), writes the client
//! config, and waits until every host reports in. `down` stops the agents
//! and the manager, then the guests they left running, and is safe to run
//! twice or after a crash.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use drove_client::Client;
use drove_hypervisor::qemu::{QemuConfig, QemuHypervisor};
use drove_hypervisor::{Hypervisor, StopMode};
use drove_model::{ByteSize, HostState};
use drove_net::fabric::{self, Fabric, LinkRole};
use serde::{Deserialize, Serialize};

use crate::config::{self, ClientConfig};
use crate::{Backend, default_data_dir, parse_size};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of hosts.
    #[arg(long, default_value_t = 3)]
    pub hosts: u32,
    #[arg(long, value_enum, default_value_t = Backend::Qemu)]
    pub backend: Backend,
    /// Where the lab keeps its state [default: ~/.local/share/drove/lab].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Return once all hosts are up, leaving the lab running.
    #[arg(long)]
    pub detach: bool,
    /// API port [default: a free one].
    #[arg(long)]
    pub port: Option<u16>,
    /// Cores each sim host offers.
    #[arg(long, default_value_t = 4)]
    pub host_cores: u32,
    /// Memory each sim host offers.
    #[arg(long, value_parser = parse_size, default_value = "16G")]
    pub host_memory: ByteSize,
    /// vCPUs placement allows per physical core.
    #[arg(long, default_value_t = 4.0)]
    pub vcpu_overcommit: f64,
    /// The lab's network: `netns` makes each host a network namespace with
    /// management, migration and trunk links (guests' VLANs run over the
    /// trunk; needs root); `host` runs every daemon on loopback and leaves
    /// guests without NICs. `auto`: netns for QEMU hosts when root.
    #[arg(long, value_enum, default_value_t = NetMode::Auto)]
    pub net: NetMode,
    /// Each host's uplink for guest traffic, e.g. 1gbit (netns labs):
    /// shaped, and reserved by guests' NIC limits.
    #[arg(long, value_parser = crate::cli::parse_rate)]
    pub uplink_rate: Option<u64>,
    /// An argument for the lab's manager, after the lab's own (repeatable;
    /// see `drove manager --help`), e.g. `--manager-arg=--failover-per-host=1`.
    #[arg(long = "manager-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub manager_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetMode {
    Auto,
    Netns,
    Host,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// The lab's data directory [default: ~/.local/share/drove/lab].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Also delete the lab's state: guests, disks, store.
    #[arg(long)]
    pub purge: bool,
}

/// What `up` started, for `down`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LabFile {
    version: u32,
    endpoint: String,
    backend: Option<String>,
    manager_pid: Option<u32>,
    agents: Vec<(String, u32)>,
    /// The namespaces and switches of a `--net netns` lab.
    #[serde(default)]
    fabric: Option<FabricRecord>,
    /// How each agent was started, so `drove lab heal` can start it again.
    #[serde(default)]
    launches: std::collections::BTreeMap<String, Launch>,
    /// How the manager was started, for `drove lab heal manager`.
    #[serde(default)]
    manager_args: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Launch {
    /// The host's namespace, if any, and its number in the fabric.
    netns: Option<String>,
    index: u32,
    args: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FabricRecord {
    id: String,
    k: u8,
}

impl FabricRecord {
    fn fabric(&self) -> Fabric {
        Fabric { id: self.id.clone(), k: self.k }
    }
}

/// A short id for the lab in `dir`, stable across runs, that names its
/// namespaces and links (FNV-1a of the path: no two labs on one machine
/// share a data dir).
fn lab_id(dir: &Path) -> (String, u8) {
    let mut h: u32 = 0x811c_9dc5;
    for b in dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    (format!("{:06x}", h & 0xff_ffff), (h >> 24) as u8)
}

const LAB_FILE: &str = "lab.json";

fn lab_path(dir: &Path) -> PathBuf {
    dir.join(LAB_FILE)
}

fn read_lab(dir: &Path) -> Result<Option<LabFile>> {
    match std::fs::read(lab_path(dir)) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", lab_path(dir).display()))?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", lab_path(dir).display())),
    }
}

/// Held while a lab command reads, changes and writes lab.json: DPM's
/// power driver and an operator may run `drove lab power` at the same time,
/// and each would otherwise write back what it read, losing the other's
/// change. Released when the file is dropped.
fn lock_lab(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("lab.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

fn write_lab(dir: &Path, lab: &LabFile) -> Result<()> {
    let tmp = dir.join("lab.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(lab)?)?;
    std::fs::rename(&tmp, lab_path(dir)).with_context(|| format!("writing {}", lab_path(dir).display()))
}

/// Whether `pid` is a live drove process of the lab in `dir` (guards
/// against pid reuse, also by another lab's daemons).
fn is_drove(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit(") ").next().is_some_and(|rest| rest.starts_with('Z'));
    let cmdline = String::from_utf8_lossy(&cmdline);
    let dir = format!("{}/", dir.display());
    !zombie
        && cmdline.split('\0').next().is_some_and(|exe| exe.ends_with("drove"))
        && cmdline.split('\0').any(|arg| arg.starts_with(&dir))
}

fn signal(pid: u32, sig: &str) {
    let _ =
        std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).stderr(Stdio::null()).status();
}

fn spawn(dir: &Path, log: &str, netns: Option<&str>, args: &[String]) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(log);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locating the drove binary")?;
    let mut cmd = match netns {
        // Only the network namespace: `ip netns exec` would also remount
        // /sys, hiding the cgroup mounts the guests' limits need. nsenter
        // execs the program: the pid stays the daemon's.
        Some(ns) => {
            let mut c = std::process::Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Own process group: Ctrl-C in the caller's terminal must not kill a
        // detached lab.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting drove {}", args.first().map_or("", String::as_str)))
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub async fn up(a: UpArgs) -> Result<()> {
    if a.hosts == 0 || a.hosts > 64 {
        bail!("--hosts must be between 1 and 64, got {}", a.hosts);
    }
    let dir = a.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if let Some(lab) = read_lab(&dir)? {
        if lab.manager_pid.is_some_and(|p| is_drove(p, &dir)) {
            bail!("a lab is already running at {} (data dir {}); run `drove down` first", lab.endpoint, dir.display());
        }
        // Left over from a crash: clear it before starting afresh.
        stop_processes(&lab, &dir).await;
        kill_strays(&dir);
        if let Some(f) = &lab.fabric {
            fabric::destroy(&f.id);
        }
    }
    if a.backend == Backend::Qemu {
        qemu_preflight(&dir)?;
    }
    let root = rustix::process::geteuid().is_root();
    let netns = match a.net {
        NetMode::Netns if !root => bail!("--net netns needs root (it creates network namespaces); try --net host"),
        NetMode::Netns => true,
        NetMode::Host => false,
        NetMode::Auto => root && a.backend == Backend::Qemu,
    };
    if a.uplink_rate.is_some() && !netns {
        bail!("--uplink-rate needs --net netns (hosts without a trunk have no uplink to shape)");
    }
    if netns && a.hosts > fabric::MAX_HOSTS {
        bail!("--net netns supports at most {} hosts, got {}", fabric::MAX_HOSTS, a.hosts);
    }
    let backend = match a.backend {
        Backend::Qemu => "qemu",
        Backend::Sim => "sim",
    };
    let mut lab = LabFile { version: 1, backend: Some(backend.into()), ..Default::default() };
    let listen = if netns {
        let (id, hint) = lab_id(&dir);
        let f = Fabric::choose(&id, hint).await.context("choosing the lab's subnets")?;
        // Recorded before anything exists, so `down` can clear a crashed up.
        lab.fabric = Some(FabricRecord { id: f.id.clone(), k: f.k });
        write_lab(&dir, &lab)?;
        f.create_switches().await.context("creating the lab's switches")?;
        f.manager_ip()
    } else {
        std::net::Ipv4Addr::LOCALHOST
    };
    let port = match a.port {
        Some(p) => p,
        None => drove_net::cmd::free_port(listen.into()).context("finding a free port for the manager")?,
    };
    let endpoint = format!("http://{listen}:{port}");
    lab.endpoint = endpoint.clone();
    let mdir = dir.join("manager");
    lab.manager_args = vec![
        "manager".into(),
        "--data-dir".into(),
        mdir.display().to_string(),
        "--listen".into(),
        format!("{listen}:{port}"),
        "--vcpu-overcommit".into(),
        a.vcpu_overcommit.to_string(),
        // Images where every host sees them, as guests' shared disks are.
        "--image-pool".into(),
        shared_dir(&dir).join("images").display().to_string(),
    ];
    match lab_power_cmd(&dir) {
        Some(cmd) => lab.manager_args.extend(["--power-driver".into(), "command".into(), "--power-cmd".into(), cmd]),
        None => println!("note: a path has spaces; hosts cannot be powered off and on (drove host standby|wake)"),
    }
    lab.manager_args.extend(a.manager_args.iter().cloned());
    let mut manager = spawn(&dir, "manager.log", None, &lab.manager_args)?;
    lab.manager_pid = Some(manager.id());
    write_lab(&dir, &lab)?;

    // Wait for the manager to mint (or find) its tokens and answer.
    let started = Instant::now();
    let admin_token = loop {
        if let Some(status) = manager.try_wait()? {
            bail!(
                "the manager exited ({status}) during start-up; its log says:\n{}",
                tail(&dir.join("logs/manager.log"), 15)
            );
        }
        if let Ok(t) = std::fs::read_to_string(mdir.join(drove_manager::core::ADMIN_TOKEN_FILE)) {
            let c = Client::new(&endpoint, &t);
            if c.list_hosts().await.is_ok() {
                break t.trim().to_owned();
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the manager did not answer within 30s; see {}", dir.join("logs/manager.log").display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let client = Client::new(&endpoint, &admin_token);
    let agent_token = mdir.join(drove_manager::core::AGENT_TOKEN_FILE);
    for i in 1..=a.hosts {
        let name = format!("host-{i}");
        let ns = match &lab.fabric {
            Some(rec) => {
                let f = rec.fabric();
                f.add_host(i).await.with_context(|| format!("creating the namespace of {name}"))?;
                Some(f.namespace(i))
            }
            None => None,
        };
        // One kernel under all the lab's hosts: their guests' cgroups must
        // not meet (a migrating guest has a QEMU on two hosts).
        // Every lab host mounts the same shared pool, as NFS would.
        let mut extra: Vec<String> =
            vec!["--cgroup-scope".into(), name.clone(), "--shared-dir".into(), shared_dir(&dir).display().to_string()];
        if let Some(rec) = &lab.fabric {
            extra.extend(["--migration-address".into(), rec.fabric().migration_ip(i).to_string()]);
        } else {
            extra.extend(["--migration-address".into(), "127.0.0.1".into()]);
        }
        if ns.is_some() {
            extra.extend(["--underlay".into(), fabric::TRUNK_IF.into()]);
            if let Some(rate) = a.uplink_rate {
                extra.extend(["--uplink-rate".into(), rate.to_string()]);
            }
        }
        let args: Vec<String> = [
            "agent".into(),
            "--name".into(),
            name.clone(),
            "--manager".into(),
            endpoint.clone(),
            "--token-file".into(),
            agent_token.display().to_string(),
            "--backend".into(),
            backend.into(),
            "--data-dir".into(),
            dir.join("hosts").join(&name).display().to_string(),
            "--cores".into(),
            a.host_cores.to_string(),
            "--memory".into(),
            a.host_memory.to_string(),
        ]
        .into_iter()
        .chain(extra)
        .collect();
        let child = spawn(&dir, &format!("{name}.log"), ns.as_deref(), &args)?;
        lab.launches.insert(name.clone(), Launch { netns: ns, index: i, args });
        lab.agents.push((name, child.id()));
        write_lab(&dir, &lab)?;
    }
    let cfg_path = config::save(&ClientConfig {
        version: config::CONFIG_VERSION,
        endpoint: endpoint.clone(),
        token: admin_token,
    })?;

    let wanted: Vec<String> = lab.agents.iter().map(|(n, _)| n.clone()).collect();
    let started = Instant::now();
    loop {
        let hosts = client.list_hosts().await?;
        let up = wanted
            .iter()
            .filter(|n| {
                hosts.iter().any(|h| &h.info.name == *n && h.info.state == HostState::Up && h.last_seen_ms.is_some())
            })
            .count();
        if up == wanted.len() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {up} of {} hosts came up within 60s; see the logs in {}",
                wanted.len(),
                dir.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let network = match &lab.fabric {
        Some(rec) => {
            format!("in network namespaces {}..{}", rec.fabric().namespace(1), rec.fabric().namespace(a.hosts))
        }
        None => "on loopback".to_owned(),
    };
    println!("drove is up: manager at {endpoint}, {} {backend} hosts {network}", a.hosts);
    println!("data dir {}; client config {}", dir.display(), cfg_path.display());
    println!("try: drove host list; drove vm create web-1 --memory 256M --disk 1G");
    if a.detach {
        return Ok(());
    }
    println!("press Ctrl-C to stop");
    crate::daemons::shutdown_signal().await;
    down(DownArgs { data_dir: Some(dir), purge: false }).await
}

async fn stop_processes(lab: &LabFile, dir: &Path) {
    let pids: Vec<u32> = lab.agents.iter().map(|(_, p)| *p).chain(lab.manager_pid).collect();
    stop_pids(&pids, dir).await;
}

/// SIGTERM to those of `pids` that are this lab's daemons, and SIGKILL to
/// any still running after 10 s.
async fn stop_pids(pids: &[u32], dir: &Path) {
    let pids: Vec<u32> = pids.iter().copied().filter(|p| is_drove(*p, dir)).collect();
    for p in &pids {
        signal(*p, "TERM");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| is_drove(*p, dir)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in pids.iter().filter(|p| is_drove(**p, dir)) {
        signal(*p, "KILL");
    }
}

pub async fn down(a: DownArgs) -> Result<()> {
    let dir = a.data_dir.unwrap_or_else(default_data_dir);
    // `up` recorded canonical paths on the daemons' command lines.
    let dir = dir.canonicalize().unwrap_or(dir);
    let Some(lab) = read_lab(&dir)? else {
        // No record (an `up` that died before writing one, or a deleted
        // lab.json): what it may have left is still found by name.
        let strays = kill_strays(&dir);
        let links = fabric::destroy(&lab_id(&dir).0);
        if strays + links > 0 {
            println!(
                "no lab record in {}; removed {strays} stray QEMU processes and {links} namespaces/links",
                dir.display()
            );
        }
        if a.purge && dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        println!("no lab running in {}", dir.display());
        return Ok(());
    };
    stop_processes(&lab, &dir).await;
    // Guests outlive their agents by design; a lab shutdown stops them too.
    let mut stopped = 0;
    if lab.backend.as_deref() == Some("qemu") {
        for (name, _) in &lab.agents {
            let hdir = dir.join("hosts").join(name);
            if !hdir.exists() {
                continue;
            }
            let hv = qemu_hypervisor(&hdir, Some(name), Some(&shared_dir(&dir)))?;
            for g in hv.list().await.unwrap_or_default() {
                if let Err(e) = hv.stop(g.id, StopMode::Force).await {
                    eprintln!("warning: could not stop guest {} on {name}: {e}", g.id);
                } else {
                    stopped += 1;
                }
            }
        }
    }
    // Last resort: a QEMU launched by an agent that died mid-start may not
    // be in any guest record yet; none of the lab's may survive `down`.
    stopped += kill_strays(&dir);
    // The namespaces go last: nothing may run in them any more.
    if let Some(f) = &lab.fabric {
        fabric::destroy(&f.id);
    }
    std::fs::remove_file(lab_path(&dir)).ok();
    if a.purge {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    println!(
        "drove is down ({} hosts, {stopped} guests stopped){}",
        lab.agents.len(),
        if a.purge { "; state purged" } else { "" }
    );
    Ok(())
}

/// SIGKILL every QEMU whose command line points into the lab's directory;
/// returns how many there were.
fn kill_strays(dir: &Path) -> usize {
    let dir = format!("{}/", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    let mut n = 0;
    for pid in procs.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let mut args = cmdline.split('\0');
        if args.next().is_some_and(|exe| exe.contains("qemu-system")) && args.any(|a| a.contains(&dir)) {
            signal(pid, "KILL");
            n += 1;
        }
    }
    n
}

/// Where the guest image is: `$DROVE_IMAGE_DIR`, else the cache directory
/// `scripts/build-image.sh` fills by default.
fn image_dir() -> Result<PathBuf> {
    std::env::var_os("DROVE_IMAGE_DIR")
        .map(PathBuf::from)
        .or_else(QemuConfig::default_image_dir)
        .context("cannot tell where the guest image is: set DROVE_IMAGE_DIR or HOME")
}

/// Check what real guests need before starting anything.
fn qemu_preflight(dir: &Path) -> Result<()> {
    let probe = std::process::Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status();
    if !probe.is_ok_and(|s| s.success()) {
        bail!("qemu-system-x86_64 is not installed; run scripts/install-deps.sh (or use --backend sim)");
    }
    let image = QemuConfig::new(dir, image_dir()?)?.boot_image();
    for f in [&image.kernel, &image.initrd] {
        if !f.exists() {
            bail!("guest image file {} is missing; run scripts/build-image.sh", f.display());
        }
    }
    // hosts/host-NN/guests/<uuid>/console.sock must fit a unix socket path.
    let longest = dir.join("hosts/host-64/guests/00000000-0000-0000-0000-000000000000/console.sock");
    if longest.as_os_str().len() > drove_hypervisor::qemu::MAX_SOCKET_PATH {
        bail!("data dir {} is too long for the guests' unix sockets; choose a shorter --data-dir", dir.display());
    }
    Ok(())
}

/// The lab's shared storage pool, which every lab host mounts.
fn shared_dir(lab_dir: &Path) -> PathBuf {
    lab_dir.join("shared")
}

pub fn qemu_hypervisor(dir: &Path, cgroup_scope: Option<&str>, shared: Option<&Path>) -> Result<Arc<dyn Hypervisor>> {
    let mut config = QemuConfig::new(dir, image_dir()?)?;
    config.cgroup_scope = cgroup_scope.map(str::to_owned);
    config.shared_dir = shared.map(Path::to_path_buf);
    Ok(Arc::new(QemuHypervisor::new(config)?))
}

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Make a lab host fail, as a test or a drill would.
    Fail {
        /// The host, e.g. host-2, or `manager` (killed whatever the mode).
        host: String,
        /// `agent`: SIGKILL its agent only (guests keep running);
        /// `kill`: a power loss (agent and guests SIGKILLed, links down);
        /// `partition`: cut its management and migration links (needs --net
        /// netns; its guests run until the agent's lease runs out, then it
        /// fences them); `migration-link`: cut only its migration link.
        #[arg(long, value_enum, default_value_t = FailMode::Agent)]
        mode: FailMode,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Undo `fail`: links up, and the agent (or the manager) started again
    /// if it is not running.
    Heal {
        /// The host, e.g. host-2, or `manager`.
        host: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Power a lab host off (its agent stopped, its links down) or on
    /// (links up, agent started): the lab's power driver, which `drove up`
    /// gives the manager for `drove host standby|wake` and DPM.
    Power {
        /// The host, e.g. host-2.
        host: String,
        #[arg(value_parser = ["on", "off"])]
        action: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailMode {
    Agent,
    Kill,
    Partition,
    MigrationLink,
}

/// `drove lab fail manager` (SIGKILL, as a crash would) and `drove lab
/// heal manager` (started again on the same store and address).
async fn manager_fault(dir: &Path, lab: &mut LabFile, fail: bool) -> Result<()> {
    let pid = lab.manager_pid.filter(|p| is_drove(*p, dir));
    if fail {
        match pid {
            Some(pid) => {
                signal(pid, "KILL");
                println!("manager killed (pid {pid}); hosts and guests carry on");
            }
            None => println!("the manager was not running"),
        }
        return Ok(());
    }
    if let Some(pid) = pid {
        println!("the manager runs already (pid {pid})");
        return Ok(());
    }
    if lab.manager_args.is_empty() {
        bail!("this lab predates `drove lab heal manager`; restart it with `drove down` and `drove up`");
    }
    let mut child = spawn(dir, "manager.log", None, &lab.manager_args)?;
    lab.manager_pid = Some(child.id());
    write_lab(dir, lab)?;
    // Back when it answers again (it reopens the store first).
    let addr = lab.endpoint.trim_start_matches("http://").to_owned();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the manager exited ({status}); its log says:\n{}", tail(&dir.join("logs/manager.log"), 15));
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the manager did not answer within 30s; see {}", dir.join("logs/manager.log").display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("manager started again (pid {})", child.id());
    Ok(())
}

pub async fn lab(cmd: LabCommand) -> Result<()> {
    let (host, data_dir) = match &cmd {
        LabCommand::Fail { host, data_dir, .. }
        | LabCommand::Heal { host, data_dir }
        | LabCommand::Power { host, data_dir, .. } => (host, data_dir),
    };
    let dir = data_dir.clone().unwrap_or_else(default_data_dir);
    let dir = dir.canonicalize().unwrap_or(dir);
    let _lock = lock_lab(&dir)?;
    let mut lab = read_lab(&dir)?.with_context(|| format!("no lab is running in {}", dir.display()))?;
    if host == "manager" {
        if matches!(cmd, LabCommand::Power { .. }) {
            bail!("the manager is not a host: `drove lab power` takes a host, e.g. host-2");
        }
        return manager_fault(&dir, &mut lab, matches!(cmd, LabCommand::Fail { .. })).await;
    }
    let launch = lab.launches.get(host).cloned().with_context(|| {
        format!(
            "the lab has no host {host:?}; its hosts are {} (or `manager`)",
            lab.launches.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let fabric = lab.fabric.as_ref().map(FabricRecord::fabric);
    let agent_pid = lab.agents.iter().find(|(n, _)| n == host).map(|(_, p)| *p).filter(|p| is_drove(*p, &dir));
    match &cmd {
        LabCommand::Fail { mode, .. } => {
            let mode = *mode;
            if matches!(mode, FailMode::Partition | FailMode::MigrationLink) && fabric.is_none() {
                bail!("--mode {mode:?} needs a lab started with --net netns");
            }
            if matches!(mode, FailMode::Agent | FailMode::Kill)
                && let Some(pid) = agent_pid
            {
                signal(pid, "KILL");
            }
            if mode == FailMode::Kill {
                kill_strays(&dir.join("hosts").join(host));
            }
            if let Some(f) = &fabric {
                let roles: &[LinkRole] = match mode {
                    FailMode::Agent => &[],
                    FailMode::Kill => &[LinkRole::Management, LinkRole::Migration, LinkRole::Trunk],
                    FailMode::Partition => &[LinkRole::Management, LinkRole::Migration],
                    FailMode::MigrationLink => &[LinkRole::Migration],
                };
                for role in roles {
                    f.set_link(launch.index, *role, false).await?;
                }
            }
            println!(
                "{host} failed ({})",
                match mode {
                    FailMode::Agent => "agent killed; guests keep running",
                    FailMode::Kill => "agent and guests killed, links down",
                    FailMode::Partition => {
                        "management and migration links cut; its agent fences its guests when its lease runs out"
                    }
                    FailMode::MigrationLink => "migration link cut",
                }
            );
        }
        LabCommand::Power { action, .. } if action == "off" => {
            // A clean stop: the agent leaves whatever runs (nothing, on an
            // emptied host) and the links go down as a powered-off NIC's.
            stop_pids(agent_pid.as_slice(), &dir).await;
            kill_strays(&dir.join("hosts").join(host));
            if let Some(f) = &fabric {
                for role in [LinkRole::Management, LinkRole::Migration, LinkRole::Trunk] {
                    f.set_link(launch.index, role, false).await?;
                }
            }
            lab.agents.retain(|(n, _)| n != host);
            write_lab(&dir, &lab)?;
            println!("{host} powered off (agent stopped, links down)");
        }
        LabCommand::Heal { .. } | LabCommand::Power { .. } => {
            if let Some(f) = &fabric {
                for role in [LinkRole::Management, LinkRole::Migration, LinkRole::Trunk] {
                    f.set_link(launch.index, role, true).await?;
                }
            }
            let verb = if matches!(cmd, LabCommand::Heal { .. }) { "healed" } else { "powered on" };
            if agent_pid.is_none() {
                let child = spawn(&dir, &format!("{host}.log"), launch.netns.as_deref(), &launch.args)?;
                lab.agents.retain(|(n, _)| n != host);
                lab.agents.push((host.clone(), child.id()));
                write_lab(&dir, &lab)?;
                println!("{host} {verb}: links up, agent started (pid {})", child.id());
            } else {
                println!("{host} {verb}: links up, agent was running");
            }
        }
    }
    Ok(())
}

/// The manager's power command for this lab (`drove lab power`), if the
/// paths allow it: the manager splits the command on spaces.
fn lab_power_cmd(dir: &Path) -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let (exe, dir) = (exe.display().to_string(), dir.display().to_string());
    if exe.contains(char::is_whitespace) || dir.contains(char::is_whitespace) {
        return None;
    }
    Some(format!("{exe} lab power {{host}} {{action}} --data-dir {dir}"))
}
