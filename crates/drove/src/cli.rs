//! Client commands: everything goes through the manager's HTTP API.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use drove_api::{CreateGuestRequest, CreateVlanRequest, NicRequest, OperationAccepted};
use drove_client::Client;
use drove_model::{ByteSize, DiskSpec, Operation, OperationState};

use crate::output::{opt, print, print_one};
use crate::{OutputArgs, config, parse_size};

pub fn client() -> Result<Client> {
    let cfg = config::load()?;
    Ok(Client::new(&cfg.endpoint, &cfg.token))
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// List hosts with their state and allocation (and the HA reserve).
    List(OutputArgs),
    /// Show or set high availability: how many host failures the cluster
    /// keeps room to restart every guest after, and what a create or start
    /// that eats into that reserve gets.
    #[command(after_help = "\
Guests on shared storage restart on the surviving hosts when their host fails
(its lease runs out, then the fencing margin passes). With --tolerate N, a
create or start that would leave too little room to restart every such guest
after any N hosts fail (the fullest ones, by memory) is refused, or with
--admission warn only logged.

Examples:
  drove host ha
  drove host ha --tolerate 1
  drove host ha --tolerate 2 --admission warn
  drove plan failover host-1      (what would happen if host-1 failed now)")]
    Ha {
        /// Host failures to keep room for (0 turns admission control off).
        #[arg(long)]
        tolerate: Option<u32>,
        /// `refuse` or `warn`.
        #[arg(long)]
        admission: Option<drove_api::Admission>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Show one host.
    Show {
        /// Host name or id.
        host: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Put a host into maintenance (it takes no new guests) or take it out.
    #[command(after_help = "Example: drove host maintenance host-2 on")]
    Maintenance {
        /// Host name or id.
        host: String,
        #[arg(value_parser = ["on", "off"])]
        mode: String,
    },
    /// Empty a host for maintenance: it takes no new guests and all its
    /// guests are live-migrated away, a few at a time, spread over the
    /// other hosts by free capacity.
    #[command(
        after_help = "Example: drove host drain host-2 --parallel 3\nBring it back with `drove host activate host-2`."
    )]
    Drain {
        /// Host name or id.
        host: String,
        /// Migrations at a time.
        #[arg(long, default_value_t = drove_manager::drain::DEFAULT_PARALLEL)]
        parallel: u32,
        /// Return once started instead of waiting.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 7200)]
        timeout: u64,
    },
    /// Take a host out of maintenance: it takes guests again.
    Activate {
        /// Host name or id.
        host: String,
    },
    /// Put an empty host into standby: it is powered off through the
    /// manager's power driver and takes no guests until woken.
    #[command(after_help = "\
Refused while guests are placed on or migrating to the host (drain it first:
`drove host drain HOST`), or when HA would lose its reserve without it. If the
power driver fails, the host stays on and the error says why.
Power management (`drove manager --dpm full`) does this on its own at quiet
times; `drove plan dpm` shows what it decided.

Example: drove host standby host-3")]
    Standby {
        /// Host name or id.
        host: String,
    },
    /// Power a host in standby (or down) on through the manager's power
    /// driver; it takes guests once its agent reports in.
    #[command(after_help = "Example: drove host wake host-3")]
    Wake {
        /// Host name or id.
        host: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a guest; it is placed on a host with room and started.
    #[command(after_help = "Example: drove vm create web-1 --vcpus 1 --memory 256M --disk 1G --nic blue")]
    Create(CreateArgs),
    /// List guests.
    List(OutputArgs),
    /// Show one guest.
    Show {
        /// Guest name or id.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Start a stopped guest.
    Start(ActionArgs),
    /// Stop a running guest (ACPI power-off, forced after a timeout).
    Stop {
        #[command(flatten)]
        action: ActionArgs,
        /// Pull the plug instead of asking the guest to power off.
        #[arg(long)]
        force: bool,
    },
    /// Reset a running guest, like pressing its reset button: it reboots at once, losing what it had not
    /// written to disk. To shut it down cleanly and start it again, use `vm stop` and `vm start`.
    Reset {
        /// Guest name or id.
        name: String,
    },
    /// Delete a guest and its disks.
    Delete {
        #[command(flatten)]
        action: ActionArgs,
        /// Also delete the guests that depend on it (thin clones of a template, clones still being copied from
        /// it), each by its own delete operation, before it.
        #[arg(long)]
        force: bool,
    },
    /// Clone a running or stopped guest or a template, with a fresh identity (name, MACs, addresses on the
    /// same VLANs, applied by the clone at boot).
    #[command(after_help = "Examples:
  drove vm clone web-1 web-2
  drove vm clone golden web --count 10      # web-1 .. web-10
  drove vm clone golden web-9 --host host-2
  drove vm clone web-1 web-old --snapshot before-upgrade   # restore a snapshot as a new guest
Clones of a template are thin overlays on its disks; others get copies of the source's disks.
A clone is on the source's pool. It goes on the source's host, unless the source's disks
are on the shared pool and it does not run (a template, or a stopped guest): then any host
with the pool can make it, --host or, without it, a host per clone chosen as for vm create.")]
    Clone {
        /// The source: guest name or id.
        source: String,
        /// The clone's name (NAME-1 .. NAME-K with --count K).
        name: String,
        /// How many clones.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Clone the disks as they were at this snapshot of the source.
        #[arg(long)]
        snapshot: Option<String>,
        /// Leave the clones stopped.
        #[arg(long)]
        stopped: bool,
        /// Make the clones on this host (another than the source's only for a source on the shared pool that
        /// does not run).
        #[arg(long)]
        host: Option<String>,
        /// Return once accepted instead of waiting until the clones run.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the operations carry on).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Mark a stopped guest as a template (read-only, never started; its clones are thin overlays), or a
    /// template without clones as a plain guest.
    Template {
        /// Guest name or id.
        name: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Run a command inside the guest (through its guest agent); exits with
    /// the command's exit code.
    #[command(after_help = "Example: drove vm exec web-1 -- ip -o addr")]
    Exec {
        /// Guest name or id.
        name: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Live-migrate a running guest to another host: its disks are mirrored
    /// and its memory copied over the migration network (encrypted), then
    /// it pauses for a moment and resumes there.
    #[command(
        after_help = "Examples:\n  drove vm migrate web-1\n  drove vm migrate web-1 --to host-3 --downtime-ms 100\nCancel one in flight with `drove op cancel ID`; `drove vm show` reports the measured pause."
    )]
    Migrate {
        /// Guest name or id.
        name: String,
        /// Target host (name or id); placement chooses by default.
        #[arg(long)]
        to: Option<String>,
        /// The longest pause to aim for in the final round, milliseconds.
        #[arg(long, default_value_t = drove_manager::migrate::DEFAULT_DOWNTIME_MS)]
        downtime_ms: u64,
        /// Cap the transfer's bandwidth, e.g. 100mbit (default: none).
        #[arg(long, value_parser = parse_rate)]
        bandwidth: Option<u64>,
        /// Return once accepted instead of waiting.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Move all of a guest's disks to another storage pool, without stopping
    /// it: `shared` (the pool every host sees: the guest then restarts
    /// elsewhere if its host dies, and migrates without copying disks) or
    /// `local` (its host's own disks).
    #[command(
        after_help = "Examples:\n  drove vm move-storage web-1 --to shared\n  drove vm move-storage web-1 --to local -o json\n\n\
A running guest keeps running on the same process: each disk is mirrored to a new\n\
file on the target pool while the guest writes on, and switched over once both\n\
hold the same data (every write then reaches both); the old files are removed\n\
after the switch. A stopped guest's disks are copied. If anything fails before the\n\
switch, the guest stays on its old disks and the new files are removed.\n\n\
The copies stand alone: a disk that was a thin overlay on an image or a template\n\
becomes a full copy. Refused: a guest with snapshots (they live inside the disk\n\
files and a copy would drop them; delete them first), a template, a guest being\n\
migrated, a move to the pool the guest is on, and `shared` on a host without one.\n\
`drove pool list` shows each pool's free space."
    )]
    MoveStorage {
        /// Guest name or id.
        name: String,
        /// The pool to move its disks to: shared or local.
        #[arg(long)]
        to: drove_model::guest::Storage,
        /// Return once accepted instead of waiting.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Change a running guest's hardware: add a disk or a NIC, grow memory,
    /// vCPUs or a disk (one change per call).
    #[command(
        after_help = "Examples:\n  drove vm hotplug web-1 --add-disk 1G\n  drove vm hotplug web-1 --vcpus 2\n  drove vm hotplug web-1 --grow-disk 0=20G\nThe guest may need to bring new vCPUs and memory online itself, and to grow its\nfilesystem into a grown disk."
    )]
    #[command(group(clap::ArgGroup::new("change").required(true).args(["add_disk", "add_nic", "memory", "vcpus", "grow_disk"])))]
    Hotplug {
        /// Guest name or id.
        name: String,
        /// Add an empty disk of this size, e.g. 1G.
        #[arg(long, value_parser = parse_size)]
        add_disk: Option<ByteSize>,
        /// Add a NIC: VLAN[,rate=100mbit][,ip=ADDRESS] (VLAN by name or id).
        #[arg(long, value_parser = parse_nic)]
        add_nic: Option<NicRequest>,
        /// Grow memory to this total, e.g. 1G.
        #[arg(long, value_parser = parse_size)]
        memory: Option<ByteSize>,
        /// Grow vCPUs to this total.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Grow a disk: INDEX=SIZE, e.g. 0=20G (disk 0 is the first).
        #[arg(long, value_parser = parse_grow_disk)]
        grow_disk: Option<drove_api::GrowDisk>,
    },
    /// Change a guest's resource limits; only the limits named change, and
    /// `none` removes one. A running guest gets them at once, without a
    /// restart; a stopped one at its next start.
    #[command(
        after_help = "Examples:\n  drove vm limits web-1 --cpu-cap 30\n  drove vm limits web-1 --disk-bps 10M --disk-iops none\n  drove vm limits web-1 --nic-rate 100mbit\nThe values are those of `drove vm create`; a NIC with a rate of its own (--nic VLAN,rate=...) keeps it."
    )]
    #[command(group(clap::ArgGroup::new("limit").required(true).multiple(true).args(["cpu_cap", "cpu_shares", "disk_bps", "disk_iops", "nic_rate"])))]
    Limits {
        /// Guest name or id.
        name: String,
        /// Cap CPU at this percent of one host core (50 = half a core), or none.
        #[arg(long, value_name = "PCT|none", value_parser = clearable(|s| s.parse::<u32>().map_err(|e| e.to_string())))]
        cpu_cap: Option<Clearable<u32>>,
        /// Relative CPU weight (cgroup shares; 1024 is the default), or none.
        #[arg(long, value_name = "N|none", value_parser = clearable(|s| s.parse::<u32>().map_err(|e| e.to_string())))]
        cpu_shares: Option<Clearable<u32>>,
        /// Cap each disk at this many bytes per second, e.g. 10M, or none.
        #[arg(long, value_name = "SIZE|none", value_parser = clearable(|s| parse_size(s).map(ByteSize::bytes)))]
        disk_bps: Option<Clearable<u64>>,
        /// Cap each disk at this many operations per second, or none.
        #[arg(long, value_name = "N|none", value_parser = clearable(|s| s.parse::<u64>().map_err(|e| e.to_string())))]
        disk_iops: Option<Clearable<u64>>,
        /// Cap each NIC (without a rate of its own) at this rate, e.g. 100mbit, or none.
        #[arg(long, value_name = "RATE|none", value_parser = clearable(parse_rate))]
        nic_rate: Option<Clearable<u64>>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Show the guest's serial console history.
    Log {
        /// Guest name or id.
        name: String,
        /// At most this many bytes from the end.
        #[arg(long, default_value_t = 64 * 1024)]
        bytes: u64,
    },
    /// Snapshots of a guest: take (disks, or disks and memory), list as a tree, delete, restore.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Attach to the guest's serial console; Ctrl-] leaves.
    #[command(
        after_help = "Press Ctrl-] to detach. With stdin not a terminal, input is sent as is and the console is left half a second after stdin ends."
    )]
    Console {
        /// Guest name or id.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a guest's disks (crash-consistent, the guest keeps running), or with --memory of its
    /// disks and memory (a restore resumes it exactly where it was).
    #[command(
        after_help = "Examples:\n  drove vm snapshot create web-1 before-upgrade\n  drove vm snapshot create web-1 warm --memory"
    )]
    Create {
        /// Guest name or id.
        name: String,
        /// Snapshot name: lowercase letters, digits and '-'.
        snapshot: String,
        /// Include memory and device state (the guest must be running).
        #[arg(long)]
        memory: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List a guest's snapshots as a tree; `*` marks the one its present state descends from.
    List {
        /// Guest name or id.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete a snapshot.
    #[command(
        after_help = "A snapshot with children is refused unless --force: its children then hang from its parent; they keep all their data."
    )]
    Delete {
        /// Guest name or id.
        name: String,
        snapshot: String,
        /// Delete it even though other snapshots were taken from it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Roll a guest back to a snapshot.
    #[command(
        after_help = "A memory snapshot resumes a running guest live. A disk snapshot of a running guest stops it, rolls its disks back and starts it again. A stopped guest gets its disks back and stays stopped."
    )]
    Restore {
        /// Guest name or id.
        name: String,
        snapshot: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Return once the request is accepted instead of waiting for it to finish.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds (the operation carries on).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct ActionArgs {
    /// Guest name or id.
    pub name: String,
    /// Return once the request is accepted instead of waiting for it to finish.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds (the operation carries on).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Guest name: lowercase letters, digits and '-'.
    pub name: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory, e.g. 512M or 1G.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub memory: ByteSize,
    /// Add a disk (repeatable), in order: disk 0 first.
    ///
    ///   SIZE                    a thin qcow2 file on the guest's pool (snapshots, clones, moves), e.g. --disk 1G
    ///   SIZE,format=raw         a sparse raw file: no format layer, no snapshots, e.g. --disk 20G,format=raw
    ///   block=DEVICE[,size=S]   a whole host block device given to this guest alone (needs --host: it exists
    ///                           there only; its size is the device's), e.g. --disk block=/dev/vg0/db
    #[arg(long = "disk", value_parser = parse_disk, verbatim_doc_comment, value_name = "SIZE[,format=raw]|block=DEVICE")]
    pub disks: Vec<DiskSpec>,
    /// Add a NIC (repeatable): VLAN[,rate=RATE][,ip=ADDRESS], the VLAN by
    /// name or id, e.g. --nic blue or --nic 100,rate=100mbit. Its address
    /// comes from the VLAN's subnet (next free one unless ip= is given).
    #[arg(long = "nic", value_parser = parse_nic)]
    pub nics: Vec<NicRequest>,
    /// Place on this host (name or id) instead of letting drove choose.
    #[arg(long)]
    pub host: Option<String>,
    /// 0..=100; higher restarts first after a failure.
    #[arg(long)]
    pub priority: Option<u8>,
    /// Create it stopped.
    #[arg(long)]
    pub stopped: bool,
    /// When it stops unasked: `on-failure` restarts it after a crash (with
    /// backoff) or when its host dies; `always` also when its OS powered it
    /// off; `never` leaves it off.
    #[arg(long, default_value = "on-failure")]
    pub restart: drove_model::RestartPolicy,
    /// Where its disks live: `local` (its host's disks) or `shared` (the
    /// pool every host sees: it restarts on another host if its host dies,
    /// and migrates without copying disks).
    #[arg(long, default_value = "local")]
    pub storage: drove_model::guest::Storage,
    /// Its anti-affinity group: guests of one group never share a host
    /// (placement, migration and failover keep them apart), e.g. the
    /// replicas of one database.
    #[arg(long, value_name = "GROUP")]
    pub anti_affinity: Option<String>,
    /// Cap CPU at this percent of one host core (50 = half a core).
    #[arg(long)]
    pub cpu_cap: Option<u32>,
    /// Relative CPU weight (cgroup shares; 1024 is the default).
    #[arg(long)]
    pub cpu_shares: Option<u32>,
    /// Pin the vCPUs to these host cores, e.g. 0,1.
    #[arg(long, value_delimiter = ',')]
    pub cpu_pin: Vec<u32>,
    /// Cap each disk at this many bytes per second, e.g. 10M.
    #[arg(long, value_parser = parse_size)]
    pub disk_bps: Option<ByteSize>,
    /// Cap each disk at this many operations per second.
    #[arg(long)]
    pub disk_iops: Option<u64>,
    /// Cap each NIC at this many megabits per second.
    #[arg(long)]
    pub nic_mbit: Option<u64>,
    /// Boot from this imported image (see `drove image import`) instead of the test image.
    /// Its CPU load over the day, as a share of its vCPUs: one figure for
    /// all day (`0.5`) or 24 hourly ones, UTC (`0.1,0.1,...,0.9`).
    /// Placement, `drove plan` and the rebalancer (DRS) plan with it;
    /// without it a guest counts as 0.25 all day.
    #[arg(long, value_parser = parse_load_profile)]
    pub load_profile: Option<drove_model::guest::LoadProfile>,
    #[arg(long)]
    pub image: Option<String>,
    /// Return once accepted instead of waiting until it runs.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds (the operation carries on).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Subcommand)]
pub enum VlanCommand {
    /// Define a VLAN.
    #[command(after_help = "Example: drove vlan create 100 --name blue --subnet 10.0.100.0/24")]
    Create {
        /// 802.1Q id, 1..=4094.
        id: u32,
        #[arg(long)]
        name: String,
        /// IPv4 subnet in CIDR notation.
        #[arg(long)]
        subnet: Option<String>,
        /// Gateway address inside the subnet.
        #[arg(long)]
        gateway: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List VLANs.
    List(OutputArgs),
    /// Delete an unused VLAN.
    Delete {
        /// VLAN name or id.
        vlan: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// The shared pool and each host's local pool: capacity, free space,
    /// and what their guests' (thin) disks are provisioned to.
    #[command(after_help = "Guests choose a pool at creation: drove vm create NAME --storage shared|local")]
    List(OutputArgs),
}

pub async fn pool(cmd: PoolCommand) -> Result<()> {
    let c = client()?;
    match cmd {
        PoolCommand::List(out) => {
            let pools = c.list_pools().await?;
            const HEADER: [&str; 7] = ["name", "hosts", "capacity", "free", "used", "provisioned", "guests"];
            let row = |p: &drove_api::PoolView| {
                let used = p.capacity.bytes().saturating_sub(p.free.bytes());
                let pct = if p.capacity.bytes() == 0 { 0.0 } else { 100.0 * used as f64 / p.capacity.bytes() as f64 };
                vec![
                    p.name.clone(),
                    p.hosts.join(","),
                    p.capacity.to_string(),
                    p.free.to_string(),
                    format!("{pct:.0}%"),
                    p.provisioned.to_string(),
                    p.guests.to_string(),
                ]
            };
            print(out.format, &pools, &HEADER, pools.iter().map(row).collect())
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Copy a qcow2 image into the image pool under a name.
    #[command(
        after_help = "Example: drove image import ./debian.qcow2 --name debian\nThen: drove vm create web-1 --image debian --memory 512M"
    )]
    Import {
        /// A qcow2 file (a path on the manager's machine).
        file: std::path::PathBuf,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List images.
    List(OutputArgs),
    /// Delete an image no guest is built on.
    Delete { name: String },
}

pub async fn image(cmd: ImageCommand) -> Result<()> {
    let c = client()?;
    let row = |i: &drove_model::image::Image| {
        vec![
            i.name.clone(),
            i.format.clone(),
            i.virtual_size.to_string(),
            i.file_size.to_string(),
            i.imported_at.clone(),
        ]
    };
    const HEADER: [&str; 5] = ["name", "format", "size", "file", "imported"];
    match cmd {
        ImageCommand::Import { file, name, out } => {
            // The manager reads the file: hand it an absolute path.
            let path = std::fs::canonicalize(&file).with_context(|| format!("{} cannot be read", file.display()))?;
            let img = c.import_image(&drove_api::ImportImageRequest { name, path: path.display().to_string() }).await?;
            print(out.format, &img, &HEADER, vec![row(&img)])
        }
        ImageCommand::List(out) => {
            let imgs = c.list_images().await?;
            print(out.format, &imgs, &HEADER, imgs.iter().map(row).collect())
        }
        ImageCommand::Delete { name } => {
            c.delete_image(&name).await?;
            println!("deleted image {name}");
            Ok(())
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum OpCommand {
    /// List operations.
    List(OutputArgs),
    /// Show one operation.
    Show {
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Wait for an operation to finish.
    Wait {
        id: String,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Cancel an operation in flight: a migration before it commits (the
    /// guest keeps running where it was).
    Cancel { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit log's hash chain: any changed, removed or reordered
    /// record is found; exits non-zero when the chain is broken.
    Verify(OutputArgs),
    /// List audit records, oldest first.
    List {
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        out: OutputArgs,
    },
}

pub async fn host(cmd: HostCommand) -> Result<()> {
    let c = client()?;
    let row = |h: &drove_api::HostView| {
        vec![
            h.info.name.clone(),
            h.info.state.to_string(),
            h.info.hypervisor.to_string(),
            format!("{}/{}", h.allocated_vcpus, h.info.cores),
            format!("{}/{}", h.allocated_memory, h.info.memory),
            h.guests.to_string(),
            h.last_seen_ms.map_or("-".into(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0)),
            h.orphans.to_string(),
        ]
    };
    const HEADER: [&str; 8] = ["name", "state", "hypervisor", "vcpus", "memory", "guests", "seen", "orphans"];
    match cmd {
        HostCommand::List(out) => {
            let hosts = c.list_hosts().await?;
            print(out.format, &hosts, &HEADER, hosts.iter().map(row).collect())?;
            if out.format == crate::Format::Table {
                let ha = c.ha().await?;
                if ha.settings.tolerate_failures > 0 {
                    let n = ha.settings.tolerate_failures;
                    match ha.shortfall {
                        None => println!("HA reserve: holds for {n} host failure(s)"),
                        Some(why) => println!("HA reserve: SHORT for {n} host failure(s): {why}"),
                    }
                }
            }
            Ok(())
        }
        HostCommand::Ha { tolerate, admission, out } => {
            let mut status = c.ha().await?;
            if tolerate.is_some() || admission.is_some() {
                let settings = drove_api::HaSettings {
                    tolerate_failures: tolerate.unwrap_or(status.settings.tolerate_failures),
                    admission: admission.unwrap_or(status.settings.admission),
                };
                status = c.set_ha(&settings).await?;
            }
            let admission = match status.settings.admission {
                drove_api::Admission::Refuse => "refuse",
                drove_api::Admission::Warn => "warn",
            };
            let fields = vec![
                ("tolerate failures", status.settings.tolerate_failures.to_string()),
                ("admission", admission.to_owned()),
                ("reserve", status.shortfall.clone().map_or("holds".to_owned(), |w| format!("SHORT: {w}"))),
            ];
            print_one(out.format, &status, fields)
        }
        HostCommand::Show { host, out } => {
            let h = c.get_host(&host).await?;
            let fields = HEADER
                .iter()
                .copied()
                .zip(row(&h))
                .chain([
                    ("id", h.info.id.to_string()),
                    ("registered", h.info.registered_at.clone()),
                    (
                        "uplink",
                        h.info.uplink_bps.map_or("not managed".into(), |u| {
                            format!(
                                "{} Mbit/s, {} Mbit/s reserved by NIC limits",
                                u as f64 / 1e6,
                                h.allocated_nic_bps as f64 / 1e6
                            )
                        }),
                    ),
                ])
                .collect();
            print_one(out.format, &h, fields)
        }
        HostCommand::Drain { host, parallel, no_wait, timeout } => {
            let op = c.drain_host(&host, Some(parallel)).await?;
            let accepted = OperationAccepted { guest: drove_model::GuestId::from_uuid(op.target), operation: op };
            let op = finish(&c, &accepted, no_wait, timeout).await?;
            if no_wait {
                println!("draining {host}: operation {} accepted", op.id);
            } else {
                println!("{host}: {}", op.step);
            }
            Ok(())
        }
        HostCommand::Activate { host } => {
            let h = c.set_maintenance(&host, false).await?;
            println!("host {} is {}", h.info.name, h.info.state);
            Ok(())
        }
        HostCommand::Standby { host } => {
            let h = c.standby_host(&host).await?;
            println!("host {} is {} and powered off", h.info.name, h.info.state);
            Ok(())
        }
        HostCommand::Wake { host } => {
            let h = c.wake_host(&host).await?;
            println!("host {} is {}: powered on, it takes guests once its agent reports in", h.info.name, h.info.state);
            Ok(())
        }
        HostCommand::Maintenance { host, mode } => {
            let h = c.set_maintenance(&host, mode == "on").await?;
            println!("host {} is {}", h.info.name, h.info.state);
            Ok(())
        }
    }
}

/// A limit as `drove vm limits` takes it: a value, or `none` to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clearable<T>(pub Option<T>);

/// A parser of [`Clearable`] values that reads anything but `none` with
/// `parse`.
pub fn clearable<T: Clone + Send + Sync + 'static>(
    parse: impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static,
) -> impl Fn(&str) -> Result<Clearable<T>, String> + Clone + Send + Sync + 'static {
    move |s| if s.eq_ignore_ascii_case("none") { Ok(Clearable(None)) } else { parse(s).map(|v| Clearable(Some(v))) }
}

/// `VLAN[,rate=RATE][,ip=ADDRESS]`, as `--nic` takes it.
pub fn parse_nic(s: &str) -> Result<NicRequest, String> {
    let mut parts = s.split(',');
    let vlan = parts.next().unwrap_or_default().trim();
    if vlan.is_empty() {
        return Err(format!("{s:?}: expected VLAN[,rate=RATE][,ip=ADDRESS], e.g. blue,rate=100mbit"));
    }
    let mut nic = NicRequest::on(vlan);
    for part in parts {
        match part.split_once('=') {
            Some(("rate", r)) => nic.rate_bps = Some(parse_rate(r)?),
            Some(("ip", ip)) => {
                nic.ip = Some(ip.parse().map_err(|_| format!("ip={ip}: not an IPv4 address, e.g. ip=10.0.100.5"))?)
            }
            _ => return Err(format!("{part:?}: unknown NIC option; known are rate=RATE and ip=ADDRESS")),
        }
    }
    Ok(nic)
}

/// A disk as `--disk` takes it: `SIZE[,format=qcow2|raw]` or
/// `block=DEVICE[,size=SIZE]`.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    const USAGE: &str = "expected SIZE[,format=raw] or block=DEVICE, e.g. 1G, 20G,format=raw, block=/dev/sdb";
    let mut parts = s.split(',').map(str::trim);
    let first = parts.next().unwrap_or_default();
    let mut disk = match first.split_once('=') {
        Some(("block", dev)) => DiskSpec::block(dev),
        Some(_) => return Err(format!("{s:?}: {USAGE}")),
        None if first.is_empty() => return Err(format!("{s:?}: {USAGE}")),
        None => DiskSpec::qcow2(crate::parse_size(first)?),
    };
    let block = disk.block_path().is_some();
    for part in parts {
        match part.split_once('=') {
            Some(("format", "qcow2")) if !block => disk.format = drove_model::DiskFormat::Qcow2,
            Some(("format", "raw")) if !block => disk.format = drove_model::DiskFormat::Raw,
            Some(("format", f)) if !block => {
                return Err(format!(
                    "format={f}: a disk file is qcow2 (the default) or raw; a host device is block=DEVICE"
                ));
            }
            Some(("size", size)) if block => disk.size = crate::parse_size(size)?,
            _ if block => {
                return Err(format!(
                    "{part:?}: unknown option of a block disk; known is size=SIZE (must be the device's)"
                ));
            }
            _ => return Err(format!("{part:?}: unknown disk option; known is format=qcow2|raw")),
        }
    }
    disk.validate().map_err(|r| format!("{s:?}: the disk {r}"))?;
    Ok(disk)
}

/// `INDEX=SIZE`, as `--grow-disk` takes it.
/// `--load-profile`: one share for all day, or 24 hourly shares.
pub fn parse_load_profile(s: &str) -> Result<drove_model::guest::LoadProfile, String> {
    let values: Vec<f32> = s
        .split(',')
        .map(|v| v.trim().parse::<f32>().map_err(|_| format!("{v:?} is not a number (a share of the vCPUs, 0 to 1)")))
        .collect::<Result<_, _>>()?;
    let hourly_cpu = match values.len() {
        1 => vec![values[0]; 24],
        24 => values,
        n => return Err(format!("give one share for all day or 24 hourly ones, not {n}")),
    };
    let p = drove_model::guest::LoadProfile { hourly_cpu };
    p.validate().map_err(|e| format!("load profile: {e}"))?;
    Ok(p)
}

pub fn parse_grow_disk(s: &str) -> Result<drove_api::GrowDisk, String> {
    let (index, size) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected INDEX=SIZE, e.g. 0=20G"))?;
    let index = index.trim().parse().map_err(|_| format!("{index:?}: a disk index is a number, 0 for the first"))?;
    Ok(drove_api::GrowDisk { index, size: crate::parse_size(size)? })
}

/// A bandwidth: a number of bits per second with an optional unit (bit,
/// kbit, mbit, gbit; decimal, as `tc` counts), e.g. 100mbit.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let split = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (digits, unit) = lower.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("rate {s:?}: expected a number and a unit, e.g. 100mbit"))?;
    let scale = match unit {
        "" | "bit" | "bps" => 1,
        "kbit" | "k" => 1_000,
        "mbit" | "m" => 1_000_000,
        "gbit" | "g" => 1_000_000_000,
        _ => return Err(format!("rate {s:?}: unknown unit {unit:?}; use bit, kbit, mbit or gbit")),
    };
    n.checked_mul(scale).filter(|r| *r > 0).ok_or_else(|| format!("rate {s:?} is out of range"))
}

fn nic_brief(n: &drove_model::NicSpec) -> String {
    match &n.address {
        Some(a) => format!("{}:{}", n.vlan, a.ip),
        None => n.vlan.to_string(),
    }
}

fn nic_detail(n: &drove_model::NicSpec) -> String {
    let mut s = format!("vlan {} mac {}", n.vlan, n.mac);
    if let Some(a) = &n.address {
        s.push_str(&format!(" ip {a}"));
    }
    if let Some(r) = n.rate_bps {
        s.push_str(&format!(" rate {}mbit", r as f64 / 1e6));
    }
    s
}

/// A guest's measured load at `hour` (UTC), and how much of the day has
/// enough samples for planning.
fn measured_summary(m: Option<&drove_model::MeasuredLoad>, hour: usize) -> String {
    let Some(m) = m else { return "not measured yet".into() };
    let trusted = format!("{} of 24 hours measured", m.trusted_hours());
    match m.hours.get(hour).filter(|s| s.samples > 0) {
        Some(s) => format!(
            "cpu {:.2} cores, memory {} at {hour:02}:00 UTC ({} samples); {trusted}",
            s.cpu_millicores / 1000.0,
            ByteSize::mib(s.memory_mib.max(0.0).round() as u64),
            s.samples
        ),
        None => format!("no samples at {hour:02}:00 UTC; {trusted}"),
    }
}

fn guest_row(g: &drove_api::GuestView) -> Vec<String> {
    vec![
        g.guest.spec.name.clone(),
        g.guest.state.to_string(),
        g.host_name.clone(),
        g.guest.spec.vcpus.to_string(),
        g.guest.spec.memory.to_string(),
        g.guest.spec.disks.iter().map(DiskSpec::describe).collect::<Vec<_>>().join(","),
        g.guest.spec.nics.iter().map(nic_brief).collect::<Vec<_>>().join(","),
    ]
}

pub async fn vm(cmd: VmCommand) -> Result<()> {
    let c = client()?;
    match cmd {
        VmCommand::Create(a) => {
            let req = CreateGuestRequest {
                name: a.name.clone(),
                vcpus: a.vcpus,
                memory: a.memory,
                disks: a.disks.into_iter().map(Into::into).collect(),
                nics: a.nics,
                host: a.host,
                priority: a.priority,
                start: Some(!a.stopped),
                load_profile: a.load_profile,
                restart_policy: Some(a.restart),
                storage: Some(a.storage),
                anti_affinity: a.anti_affinity.clone(),
                limits: Some(drove_model::ResourceLimits {
                    cpu_cap_percent: a.cpu_cap,
                    cpu_shares: a.cpu_shares,
                    cpu_pin: a.cpu_pin,
                    disk_bps: a.disk_bps.map(ByteSize::bytes),
                    disk_iops: a.disk_iops,
                    nic_rate_bps: a.nic_mbit.map(|m| m * 1_000_000),
                }),
                image: a.image,
            };
            let accepted = c.create_guest(&req).await?;
            let op = finish(&c, &accepted, a.no_wait, a.timeout).await?;
            if a.no_wait {
                println!("creating {} (operation {})", a.name, op.id);
                return Ok(());
            }
            let g = c.get_guest(&a.name).await?;
            if matches!(a.out.format, crate::Format::Json) {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                println!("created {} on {} ({})", g.guest.spec.name, g.host_name, g.guest.state);
            }
            Ok(())
        }
        VmCommand::List(out) => {
            let guests = c.list_guests().await?;
            print(
                out.format,
                &guests,
                &["name", "state", "host", "vcpus", "memory", "disks", "nics"],
                guests.iter().map(guest_row).collect(),
            )
        }
        VmCommand::Show { name, out } => {
            let g = c.get_guest(&name).await?;
            // Addresses come from inside the guest, so only while it runs.
            let addresses = if g.guest.state == drove_model::GuestState::Running {
                match c.guest_interfaces(&name).await {
                    Ok(list) => list
                        .iter()
                        .filter(|i| i.name != "lo")
                        .map(|i| format!("{} {}", i.name, i.addresses.join(" ")))
                        .collect::<Vec<_>>()
                        .join(", "),
                    Err(e) => format!("unknown ({e})"),
                }
            } else {
                "-".to_owned()
            };
            let s = &g.guest.spec;
            print_one(
                out.format,
                &g,
                vec![
                    ("name", s.name.clone()),
                    ("id", g.guest.id.to_string()),
                    ("state", g.guest.state.to_string()),
                    ("intent", format!("{:?}", g.guest.intent).to_lowercase()),
                    ("host", g.host_name.clone()),
                    ("vcpus", s.vcpus.to_string()),
                    ("memory", s.memory.to_string()),
                    ("disks", s.disks.iter().map(DiskSpec::describe).collect::<Vec<_>>().join(", ")),
                    ("nics", s.nics.iter().map(nic_detail).collect::<Vec<_>>().join(", ")),
                    ("addresses", addresses),
                    ("priority", s.priority.0.to_string()),
                    ("restart policy", g.guest.restart_policy.to_string()),
                    ("storage", g.guest.spec.storage.to_string()),
                    ("anti-affinity", g.guest.spec.anti_affinity.clone().unwrap_or_else(|| "-".into())),
                    ("limits", limits_summary(&s.limits)),
                    ("measured load", measured_summary(g.measured_load.as_ref(), drove_model::load::utc_hour_now())),
                    ("restarts", g.guest.restarts.to_string()),
                    (
                        "migration",
                        match (&g.guest.migration, &g.guest.last_migration) {
                            (Some(m), _) => format!("in progress ({:?}, operation {})", m.state, m.op).to_lowercase(),
                            (None, Some(m)) => format!("last from {} to {}: {}", m.from, m.to, migration_summary(m)),
                            (None, None) => "-".into(),
                        },
                    ),
                    ("last failover", failover_summary(g.guest.last_failover.as_ref())),
                    ("generation", g.guest.generation.to_string()),
                    ("created", g.guest.created_at.clone()),
                    ("last error", opt(&g.guest.last_error)),
                    (
                        "pending change",
                        g.guest
                            .pending_spec
                            .as_ref()
                            .map_or_else(|| "-".into(), |p| format!("{} (since {})", p.what, p.since)),
                    ),
                    ("template", if g.guest.template { "yes".into() } else { "no".into() }),
                    ("cloned from", clone_summary(&c, s.clone_of.as_ref()).await),
                    ("dependents", if g.dependents.is_empty() { "-".into() } else { g.dependents.join(", ") }),
                ],
            )
        }
        VmCommand::Start(a) => {
            let acc = c.start_guest(&a.name).await?;
            report(&a, finish(&c, &acc, a.no_wait, a.timeout).await?, "started")
        }
        VmCommand::Stop { action: a, force } => {
            let acc = c.stop_guest(&a.name, force).await?;
            report(&a, finish(&c, &acc, a.no_wait, a.timeout).await?, "stopped")
        }
        VmCommand::Reset { name } => {
            c.reset_guest(&name).await?;
            println!("reset {name}: it reboots now");
            Ok(())
        }
        VmCommand::Delete { action: a, force } => {
            let acc = if force { c.delete_guest_forced(&a.name).await? } else { c.delete_guest(&a.name).await? };
            report(&a, finish(&c, &acc, a.no_wait, a.timeout).await?, "deleted")
        }
        VmCommand::Clone { source, name, count, snapshot, stopped, host, no_wait, timeout } => {
            let req = drove_api::CloneGuestRequest { name, count: Some(count), snapshot, start: Some(!stopped), host };
            let accepted = c.clone_guest(&source, &req).await?;
            // Each clone is its own create: wait for all, report each.
            let mut failed = Vec::new();
            for acc in &accepted {
                let name = &acc.operation.target_name;
                match finish(&c, acc, no_wait, timeout).await {
                    Ok(op) if no_wait => println!("cloning {source} as {name} (operation {})", op.id),
                    Ok(_) => println!("cloned {source} as {name}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed.push(name.clone());
                    }
                }
            }
            if !failed.is_empty() {
                bail!("{} of {} clones failed: {}", failed.len(), accepted.len(), failed.join(", "));
            }
            Ok(())
        }
        VmCommand::Template { name, state } => {
            let g = c.set_template(&name, state == "on").await?;
            let what = if g.guest.template { "a template" } else { "a plain guest" };
            println!("{} is {what}", g.guest.spec.name);
            Ok(())
        }
        VmCommand::Log { name, bytes } => {
            let log = c.console_log(&name, bytes).await?;
            print!("{}", log.text);
            std::io::stdout().flush()?;
            Ok(())
        }
        VmCommand::Console { name } => crate::console::attach(&c, &name).await,
        VmCommand::Snapshot(cmd) => snapshot(&c, cmd).await,
        VmCommand::Migrate { name, to, downtime_ms, bandwidth, no_wait, timeout } => {
            let req = drove_api::MigrateRequest {
                to,
                downtime_limit_ms: Some(downtime_ms),
                max_bandwidth: bandwidth.map(|bits| bits / 8),
            };
            let acc = c.migrate_guest(&name, &req).await?;
            let op = finish(&c, &acc, no_wait, timeout).await?;
            if no_wait {
                println!("migrate {name}: operation {} accepted", op.id);
                return Ok(());
            }
            let g = c.get_guest(&name).await?;
            match &g.guest.last_migration {
                Some(m) => println!("migrated {name} from {} to {}: {}", m.from, m.to, migration_summary(m)),
                None => println!("migrated {name} to {}", g.host_name),
            }
            Ok(())
        }
        VmCommand::MoveStorage { name, to, no_wait, timeout, out } => {
            let acc = c.move_storage(&name, &drove_api::MoveStorageRequest { to }).await?;
            let op = finish(&c, &acc, no_wait, timeout).await?;
            if no_wait {
                return print_one(
                    out.format,
                    &op,
                    vec![("operation", op.id.to_string()), ("state", op.state.to_string()), ("step", op.step.clone())],
                );
            }
            let g = c.get_guest(&name).await?;
            match out.format {
                crate::Format::Json => print_one(out.format, &g, Vec::new()),
                crate::Format::Table => {
                    println!("{name}: {}", op.step);
                    Ok(())
                }
            }
        }
        VmCommand::Hotplug { name, add_disk, add_nic, memory, vcpus, grow_disk } => {
            let req = drove_api::HotplugRequest { add_disk, add_nic, memory, vcpus, grow_disk };
            let g = c.hotplug(&name, &req).await?;
            let s = &g.guest.spec;
            println!(
                "{}: {} vCPUs, {} memory, {} disks, {} NICs",
                s.name,
                s.vcpus,
                s.memory,
                s.disks.len(),
                s.nics.len()
            );
            Ok(())
        }
        VmCommand::Limits { name, cpu_cap, cpu_shares, disk_bps, disk_iops, nic_rate, out } => {
            let req = drove_api::SetLimitsRequest {
                cpu_cap_percent: cpu_cap.map(|c| c.0),
                cpu_shares: cpu_shares.map(|c| c.0),
                disk_bps: disk_bps.map(|c| c.0),
                disk_iops: disk_iops.map(|c| c.0),
                nic_rate_bps: nic_rate.map(|c| c.0),
            };
            let g = c.set_limits(&name, &req).await?;
            let (s, l) = (&g.guest.spec, &g.guest.spec.limits);
            let show = |v: Option<String>| v.unwrap_or_else(|| "none".into());
            let applied = match g.guest.state {
                drove_model::GuestState::Running => "now (live)",
                _ => "at its next start",
            };
            print_one(
                out.format,
                &g,
                vec![
                    ("name", s.name.clone()),
                    ("state", g.guest.state.to_string()),
                    ("host", g.host_name.clone()),
                    ("cpu cap", show(l.cpu_cap_percent.map(|c| format!("{c}%")))),
                    ("cpu shares", show(l.cpu_shares.map(|v| v.to_string()))),
                    ("cpu pin", if l.cpu_pin.is_empty() { "none".into() } else { format!("{:?}", l.cpu_pin) }),
                    ("disk bps", show(l.disk_bps.map(|b| format!("{}/s", ByteSize(b))))),
                    ("disk iops", show(l.disk_iops.map(|v| v.to_string()))),
                    ("nic rate", show(l.nic_rate_bps.map(|r| format!("{}mbit", r as f64 / 1e6)))),
                    ("applied", applied.into()),
                ],
            )
        }
        VmCommand::Exec { name, timeout, command } => {
            let r =
                c.exec(&name, &drove_api::ExecRequest { command, input: None, timeout_secs: Some(timeout) }).await?;
            print!("{}", r.stdout);
            eprint!("{}", r.stderr);
            std::io::stdout().flush()?;
            if r.exit_code != 0 {
                return Err(crate::ExitWith(r.exit_code.clamp(1, 255) as u8).into());
            }
            Ok(())
        }
    }
}

async fn snapshot(c: &Client, cmd: SnapshotCommand) -> Result<()> {
    let (accepted, wait) = match cmd {
        SnapshotCommand::List { name, out } => {
            let list = c.list_snapshots(&name).await?;
            return print(
                out.format,
                &list,
                &["name", "kind", "state", "vm state", "created"],
                snapshot_tree(&list).into_iter().map(|(depth, s)| snapshot_row(depth, s, &list.current)).collect(),
            );
        }
        SnapshotCommand::Create { name, snapshot, memory, wait } => {
            (c.create_snapshot(&name, &drove_api::CreateSnapshotRequest { name: snapshot, memory }).await?, wait)
        }
        SnapshotCommand::Delete { name, snapshot, force, wait } => {
            (c.delete_snapshot(&name, &snapshot, force).await?, wait)
        }
        SnapshotCommand::Restore { name, snapshot, wait } => (c.restore_snapshot(&name, &snapshot).await?, wait),
    };
    let op = finish(c, &accepted, wait.no_wait, wait.timeout).await?;
    if wait.no_wait {
        println!("{} {}: operation {} accepted", op.kind, op.target_name, op.id);
    } else {
        println!("{}: {}", op.target_name, op.step);
    }
    Ok(())
}

/// The snapshots in tree order (each after its parent, children in the
/// order taken), with their depth.
fn snapshot_tree(list: &drove_api::SnapshotList) -> Vec<(usize, &drove_model::Snapshot)> {
    fn walk<'a>(
        all: &'a [drove_model::Snapshot],
        parent: Option<&str>,
        depth: usize,
        out: &mut Vec<(usize, &'a drove_model::Snapshot)>,
    ) {
        for s in all.iter().filter(|s| s.parent.as_deref() == parent) {
            out.push((depth, s));
            walk(all, Some(&s.name), depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(&list.snapshots, None, 0, &mut out);
    // A parent that is not in the list (should not happen): show them too.
    for s in &list.snapshots {
        if !out.iter().any(|(_, o)| o.name == s.name) {
            out.push((0, s));
        }
    }
    out
}

fn snapshot_row(depth: usize, s: &drove_model::Snapshot, current: &Option<String>) -> Vec<String> {
    let mark = if current.as_deref() == Some(s.name.as_str()) { " *" } else { "" };
    let indent = if depth == 0 { String::new() } else { format!("{}└─ ", "   ".repeat(depth - 1)) };
    vec![
        format!("{indent}{}{mark}", s.name),
        s.kind.to_string(),
        s.state.to_string(),
        s.vm_state_size.map_or("-".to_owned(), |b| if b.bytes() == 0 { "-".to_owned() } else { b.to_string() }),
        s.created_at.clone(),
    ]
}

/// Where a clone's disks came from, for people.
async fn clone_summary(c: &Client, from: Option<&drove_model::CloneSource>) -> String {
    let Some(from) = from else { return "-".into() };
    let source = match c.get_guest(&from.guest.to_string()).await {
        Ok(g) => g.guest.spec.name,
        Err(_) => format!("{} (deleted)", from.guest),
    };
    let at = from.snapshot.as_deref().map(|s| format!(" at snapshot {s}")).unwrap_or_default();
    let how = match from.mode {
        drove_model::CloneMode::Copy => "copies",
        drove_model::CloneMode::Overlay => "thin overlays",
    };
    format!("{source}{at} ({how})")
}

fn limits_summary(l: &drove_model::ResourceLimits) -> String {
    let mut parts = Vec::new();
    if let Some(c) = l.cpu_cap_percent {
        parts.push(format!("cpu cap {c}%"));
    }
    if let Some(s) = l.cpu_shares {
        parts.push(format!("cpu shares {s}"));
    }
    if !l.cpu_pin.is_empty() {
        parts.push(format!("pinned to {:?}", l.cpu_pin));
    }
    if let Some(b) = l.disk_bps {
        parts.push(format!("disk {}/s", ByteSize(b)));
    }
    if let Some(i) = l.disk_iops {
        parts.push(format!("disk {i} iops"));
    }
    if let Some(r) = l.nic_rate_bps {
        parts.push(format!("nic {} Mbit/s", r / 1_000_000));
    }
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

fn migration_summary(m: &drove_model::migration::MigrationResult) -> String {
    let pause = m.downtime_ms.map_or("unmeasured".to_owned(), |d| format!("{d:.1} ms"));
    // The guest's own view, where it writes to its console steadily.
    let seen = m.console_gap_ms.map_or(String::new(), |gap| {
        let mut notes = Vec::new();
        if let Some(pause) = m.console_pause_gap_ms.filter(|&p| p < gap) {
            notes.push(format!("{pause:.1} ms across the pause, longer while copied"));
        }
        if let Some(every) = m.console_interval_ms {
            notes.push(format!("writes every {every:.1} ms"));
        }
        let notes = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
        format!(", console silent {gap:.1} ms{notes}")
    });
    format!(
        "paused {pause} (QEMU: {} ms){seen}, {:.2} s in all, {} transferred",
        m.qemu_downtime_ms,
        m.total_ms as f64 / 1000.0,
        ByteSize(m.transferred)
    )
}

fn report(a: &ActionArgs, op: Operation, done: &str) -> Result<()> {
    if a.no_wait {
        println!("{} {}: operation {} accepted", op.kind, a.name, op.id);
    } else {
        println!("{done} {}", a.name);
    }
    Ok(())
}

/// Wait for an accepted operation, showing its progress on a terminal.
async fn finish(c: &Client, accepted: &OperationAccepted, no_wait: bool, timeout: u64) -> Result<Operation> {
    let mut op = accepted.operation.clone();
    if no_wait || op.state.is_final() {
        return check(op);
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    while !op.state.is_final() {
        if tty {
            eprint!("\r\x1b[K{} {} [{:>3}%] {}", op.kind, op.target_name, op.progress, op.step);
            let _ = std::io::stderr().flush();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            if tty {
                eprintln!();
            }
            bail!(
                "gave up waiting after {timeout}s; operation {} is still {} ({}); follow it with `drove op wait {}`",
                op.id,
                op.state,
                op.step,
                op.id
            );
        }
        op = c.wait_operation(op.id, left.min(Duration::from_secs(2))).await?;
    }
    if tty {
        eprint!("\r\x1b[K");
    }
    check(op)
}

fn check(op: Operation) -> Result<Operation> {
    if op.state == OperationState::Failed {
        bail!("{} {} failed: {}", op.kind, op.target_name, op.error.as_deref().unwrap_or("no reason given"));
    }
    Ok(op)
}

pub async fn vlan(cmd: VlanCommand) -> Result<()> {
    let c = client()?;
    let row = |v: &drove_api::VlanView| {
        vec![v.vlan.tag.to_string(), v.vlan.name.clone(), opt(&v.vlan.subnet), opt(&v.vlan.gateway), v.nics.to_string()]
    };
    const HEADER: [&str; 5] = ["id", "name", "subnet", "gateway", "nics"];
    match cmd {
        VlanCommand::Create { id, name, subnet, gateway, out } => {
            let v = c.create_vlan(&CreateVlanRequest { id, name, subnet, gateway }).await?;
            print(out.format, &v, &HEADER, vec![row(&v)])
        }
        VlanCommand::List(out) => {
            let vlans = c.list_vlans().await?;
            print(out.format, &vlans, &HEADER, vlans.iter().map(row).collect())
        }
        VlanCommand::Delete { vlan } => {
            c.delete_vlan(&vlan).await?;
            println!("deleted VLAN {vlan}");
            Ok(())
        }
    }
}

fn op_row(o: &Operation) -> Vec<String> {
    vec![
        o.id.to_string(),
        o.kind.to_string(),
        o.target_name.clone(),
        o.state.to_string(),
        format!("{}%", o.progress),
        o.step.clone(),
        o.created_at.clone(),
        opt(&o.error),
    ]
}

pub async fn op(cmd: OpCommand) -> Result<()> {
    let c = client()?;
    const HEADER: [&str; 8] = ["id", "kind", "target", "state", "progress", "step", "created", "error"];
    match cmd {
        OpCommand::List(out) => {
            let ops = c.list_operations().await?;
            print(out.format, &ops, &HEADER, ops.iter().map(op_row).collect())
        }
        OpCommand::Show { id, out } => {
            let op = c.get_operation(id.parse().with_context(|| format!("{id:?} is not an operation id"))?).await?;
            print_one(out.format, &op, HEADER.iter().copied().zip(op_row(&op)).collect())
        }
        OpCommand::Cancel { id } => {
            let id = id.parse().with_context(|| format!("{id:?} is not an operation id"))?;
            let op = c.cancel_operation(id).await?;
            println!(
                "cancel requested for {} {} ({}); `drove op wait {}` follows it",
                op.kind, op.target_name, op.step, op.id
            );
            Ok(())
        }
        OpCommand::Wait { id, timeout } => {
            let id = id.parse().with_context(|| format!("{id:?} is not an operation id"))?;
            let op = c.get_operation(id).await?;
            let op = finish(
                &c,
                &OperationAccepted { guest: drove_model::GuestId::from_uuid(op.target), operation: op },
                false,
                timeout,
            )
            .await?;
            println!("{} {}: {}", op.kind, op.target_name, op.state);
            Ok(())
        }
    }
}

pub async fn audit(cmd: AuditCommand) -> Result<()> {
    let c = client()?;
    match cmd {
        AuditCommand::Verify(out) => {
            let v = c.verify_audit().await?;
            match out.format {
                crate::Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                crate::Format::Table if v.intact => {
                    println!("audit log intact: {} records, hash chain verified", v.records)
                }
                crate::Format::Table => {}
            }
            if !v.intact {
                bail!(
                    "audit log broken at record {}: {}",
                    v.first_bad_seq.unwrap_or(0),
                    v.reason.as_deref().unwrap_or("unknown reason")
                );
            }
            Ok(())
        }
        AuditCommand::List { after, limit, out } => {
            let recs = c.audit(after, limit).await?;
            print(
                out.format,
                &recs,
                &["seq", "time", "principal", "action", "target", "status", "result"],
                recs.iter()
                    .map(|r| {
                        vec![
                            r.seq.to_string(),
                            r.time.clone(),
                            r.principal.clone(),
                            r.action.clone(),
                            opt(&r.target),
                            r.status.to_string(),
                            r.result.clone(),
                        ]
                    })
                    .collect(),
            )
        }
    }
}

/// One line on a guest's last restart after its host failed.
fn failover_summary(f: Option<&drove_model::guest::FailoverRecord>) -> String {
    let Some(f) = f else { return "-".into() };
    let after =
        |ms: Option<u64>| ms.map_or("-".to_owned(), |t| format!("{:.1} s", t.saturating_sub(f.at_ms) as f64 / 1000.0));
    format!(
        "from {} to {}: reassigned {:.1} s after its host's last heartbeat; running {} and up {} after that",
        f.from,
        f.to,
        f.detect_ms as f64 / 1000.0,
        after(f.running_ms),
        after(f.ready_ms)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use drove_model::{ByteSize, DiskSpec};

    use super::{measured_summary, parse_disk, parse_load_profile};

    #[test]
    fn measured_load_shows_the_hour_asked_and_how_much_of_the_day_is_measured() {
        assert_eq!(measured_summary(None, 3), "not measured yet");
        let mut m = drove_model::MeasuredLoad::default();
        let sample = drove_model::LoadSample {
            interval_ms: 10_000,
            cpu_millicores: 1500.0,
            memory_mib: 512.0,
            ..Default::default()
        };
        for _ in 0..drove_model::load::MIN_SAMPLES {
            m.record(3, &sample);
        }
        m.record(4, &sample);
        let at3 = measured_summary(Some(&m), 3);
        assert_eq!(at3, "cpu 1.50 cores, memory 512M at 03:00 UTC (30 samples); 1 of 24 hours measured", "{at3}");
        assert_eq!(measured_summary(Some(&m), 5), "no samples at 05:00 UTC; 1 of 24 hours measured");
    }

    #[test]
    fn a_load_profile_is_one_share_or_twenty_four() {
        assert_eq!(parse_load_profile("0.5").unwrap().hourly_cpu, vec![0.5; 24]);
        let hourly: Vec<String> = (0..24).map(|h| format!("{}", h as f32 / 24.0)).collect();
        assert_eq!(parse_load_profile(&hourly.join(",")).unwrap().hourly_cpu[23], 23.0 / 24.0);
        assert!(parse_load_profile("0.1,0.2").unwrap_err().contains("not 2"));
        assert!(parse_load_profile("1.5").unwrap_err().contains("between 0.0 and 1.0"));
        assert!(parse_load_profile("half").unwrap_err().contains("not a number"));
    }

    #[test]
    fn disks_parse_as_operators_type_them() {
        assert_eq!(parse_disk("1G"), Ok(DiskSpec::qcow2(ByteSize::gib(1))));
        assert_eq!(parse_disk("1G,format=qcow2"), Ok(DiskSpec::qcow2(ByteSize::gib(1))));
        assert_eq!(parse_disk("20G,format=raw"), Ok(DiskSpec::raw(ByteSize::gib(20))));
        assert_eq!(parse_disk("block=/dev/loop5"), Ok(DiskSpec::block("/dev/loop5")));
        assert_eq!(
            parse_disk("block=/dev/vg0/db,size=1G"),
            Ok(DiskSpec { size: ByteSize::gib(1), ..DiskSpec::block("/dev/vg0/db") })
        );
    }

    #[test]
    fn bad_disks_say_what_is_expected() {
        for (bad, says) in [
            ("", "expected SIZE"),
            ("1G,format=vmdk", "qcow2 (the default) or raw"),
            ("1G,rate=5", "known is format"),
            ("block=sdb", "under /dev"),
            ("block=/dev/sdb,format=raw", "known is size"),
            ("path=/dev/sdb", "expected SIZE"),
            ("lots", "invalid size"),
        ] {
            let e = parse_disk(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
