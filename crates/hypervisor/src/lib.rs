//! The hypervisor driver interface and its backends.
//!
//! An agent drives exactly one [`Hypervisor`]. The trait is deliberately
//! small and idempotent so that the agent's converge loop can call it again
//! after any failure or restart: `create` of an existing guest with the same
//! definition succeeds, `stop` of a stopped guest succeeds, `destroy` of an
//! unknown guest succeeds.
//!
//! Backends: [`sim`] (in memory, with timing and fault knobs; for tests and
//! scale runs) and `qemu` (real guests over QMP). [`conformance`] is the
//! suite every backend must pass.
//!
//! Looking inside a running guest ([`Hypervisor::exec`],
//! [`Hypervisor::guest_interfaces`]) goes through a guest agent where the
//! backend has one (QEMU: the QEMU guest agent protocol over virtio-serial);
//! these methods default to [`HvError::Unsupported`], so a backend without
//! one need not implement them.
//!
//! Hardware can be added to a running guest with [`Hypervisor::hotplug`]
//! (a disk, a NIC, vCPUs, memory; see [`Hotplug`]), and its resource limits
//! changed in any state with [`Hypervisor::set_limits`] (live while it has
//! a process); both also default to [`HvError::Unsupported`].
//!
//! Snapshots ([`Hypervisor::snapshot_create`], `_list`, `_delete`,
//! `_restore`) are named, point-in-time states of all of a guest's disks,
//! optionally with its memory and device state ([`SnapshotKind`]). The
//! backend is the source of truth for which snapshots exist: a snapshot is
//! listed only once it is complete on every disk, and a delete or a create
//! of the same name removes whatever an interrupted earlier attempt left.
//! The backend keeps no tree: parents are the caller's bookkeeping. These
//! methods default to [`HvError::Unsupported`] as well.
//!
//! Clones: a guest whose spec has [`GuestSpec::clone_of`] gets its disks
//! from another guest on the same host when it is created, instead of empty
//! ones: copies of the source's disks at one instant (a Running source keeps
//! running; the backend takes the copy from a consistent point), or of one
//! of its snapshots (restore as a copy); or, for a template (a source that
//! never runs again), thin copy-on-write overlays on its disks. The source
//! is never changed, a clone carries none of its snapshots, and a failed or
//! interrupted clone leaves no disk behind that a later `create` would take
//! for finished. A source on the shared pool that does not run (a template,
//! or a stopped guest) can be cloned by any host of the pool: that host
//! reads the source's files there ([`shared_source`]), only ever for
//! reading.
//!
//! Measured load: [`Hypervisor::usage`] reads a guest's cumulative CPU,
//! memory, network and disk counters; the agent turns two readings into
//! rates ([`GuestUsage::rate_since`]).
//!
//! Storage: [`Hypervisor::move_storage`] moves a guest's disks between
//! the host's local pool and the shared pool, live while it runs
//! (defaults to [`HvError::Unsupported`]).
//!
//! Runtime states a backend reports:
//!
//! ```text
//!   (absent) ── create ──► Stopped ── start ──► Running ◄── resume ── Paused
//!                 ▲          ▲  │                 │  │                  ▲
//!                 │          │  └─── destroy ──►(absent)                │
//!                 │          └────── stop ────────┘  └───── pause ──────┘
//!                 │                                   │ process died
//!                 └──────────── start ─── Crashed ◄───┘
//! ```

use std::fmt::Debug;
use std::time::Duration;

pub use drove_model::guest::{Storage, StorageMoved};
use drove_model::{ByteSize, GuestId, GuestSpec, HypervisorKind, ResourceLimits};
pub use drove_model::{RestoreOutcome, SnapshotKind};
use serde::{Deserialize, Serialize};

pub mod conformance;
pub mod migration;
pub mod qemu;
pub mod sim;

/// Everything a backend needs to realise a guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestConfig {
    pub id: GuestId,
    /// The manager's generation of this definition.
    pub generation: u64,
    pub spec: GuestSpec,
}

/// What the backend observes of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeState {
    /// Defined, disks present, not running.
    Stopped,
    Running,
    Paused,
    /// Died without being asked to stop; still defined, can be started again.
    Crashed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    pub id: GuestId,
    pub state: RuntimeState,
    /// The generation of the definition the backend holds.
    pub generation: u64,
    /// Process id of the guest's VMM, where there is one.
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Ask the guest OS to power off (ACPI); force it after `timeout`.
    Graceful { timeout: Duration },
    /// Pull the plug.
    Force,
}

/// What a host offers to guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostResources {
    pub cores: u32,
    pub memory: ByteSize,
}

/// Space on a storage pool the host keeps guests' disks in
/// ([`Hypervisor::pools`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpace {
    /// `local` (the host's own) or `shared` (the pool every host sees).
    pub name: String,
    /// Size of the filesystem holding it.
    pub capacity: ByteSize,
    /// What is still free there (thin disks grow into it).
    pub free: ByteSize,
}

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("guest {id} is not defined on this host")]
    NotFound { id: GuestId },
    #[error("cannot {op} guest {id} while it is {state:?}")]
    InvalidState { id: GuestId, op: &'static str, state: RuntimeState },
    #[error("{op} is not supported by the {backend} backend: {reason}")]
    Unsupported { op: &'static str, backend: HypervisorKind, reason: String },
    #[error("{op} of guest {id} failed")]
    Backend {
        op: &'static str,
        id: GuestId,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the migration of guest {id} completed: its target may run it, so this copy stays paused")]
    MigrationCompleted { id: GuestId },
    #[error("guest {id} has no snapshot named {name:?}")]
    SnapshotNotFound { id: GuestId, name: String },
    #[error("snapshot {name:?} of guest {id} cannot be made: {reason}")]
    InvalidSnapshot { id: GuestId, name: String, reason: String },
    #[error("the limits asked for guest {id} are refused: {field}: {reason}")]
    InvalidLimits { id: GuestId, field: &'static str, reason: String },
    /// What its disks' kind cannot do (a snapshot of a raw disk, a move
    /// of a block device, ...): refused before anything is changed.
    #[error("cannot {op} guest {id}: {reason}")]
    DiskKind { id: GuestId, op: &'static str, reason: String },
    #[error("guest {id} cannot be cloned from guest {source_guest}: {reason}")]
    CloneSource { id: GuestId, source_guest: GuestId, reason: String },
    #[error("hypervisor host failure during {op}")]
    Host {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A guest's cumulative resource counters ([`Hypervisor::usage`]), counted
/// since its VMM process started.
///
/// Counters only grow within one process. `pid` and `started` together name
/// that process: when either differs between two readings, the guest was
/// restarted in between and the counters began again, so no rate can be
/// taken across them ([`GuestUsage::rate_since`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestUsage {
    /// The VMM's process id.
    pub pid: u32,
    /// When that process started, in a unit of the backend's own (QEMU:
    /// clock ticks since the host booted, from `/proc/<pid>/stat`); only
    /// compared for equality.
    pub started: u64,
    /// CPU time the VMM used, all its threads, nanoseconds.
    pub cpu_ns: u64,
    /// Its resident memory now, bytes (not a counter).
    pub memory_bytes: u64,
    /// Bytes the guest received on its NICs.
    pub net_rx_bytes: u64,
    /// Bytes the guest sent on its NICs.
    pub net_tx_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_written_bytes: u64,
}

impl GuestUsage {
    /// Rates over the time from `before` to `self`, `elapsed` apart (as the
    /// caller measured it, on a monotonic clock). `None` when there is no
    /// honest rate: another process (a restart), a counter that went back
    /// (a NIC's tap recreated, a disk's counters reset by a block job), or
    /// no time between the readings.
    pub fn rate_since(&self, before: &GuestUsage, elapsed: Duration) -> Option<drove_model::LoadSample> {
        if (self.pid, self.started) != (before.pid, before.started) || elapsed.is_zero() {
            return None;
        }
        let secs = elapsed.as_secs_f64();
        let delta = |now: u64, then: u64| now.checked_sub(then).map(|d| d as f64);
        let mbps = |now, then| delta(now, then).map(|b| b * 8.0 / 1e6 / secs);
        Some(drove_model::LoadSample {
            interval_ms: elapsed.as_millis().max(1).min(u128::from(u64::MAX)) as u64,
            // ns per s of wall time = cores; ×1000 = milli-cores.
            cpu_millicores: delta(self.cpu_ns, before.cpu_ns)? / 1e6 / secs,
            memory_mib: self.memory_bytes as f64 / (1024.0 * 1024.0),
            net_rx_mbps: mbps(self.net_rx_bytes, before.net_rx_bytes)?,
            net_tx_mbps: mbps(self.net_tx_bytes, before.net_tx_bytes)?,
            disk_read_mbps: mbps(self.disk_read_bytes, before.disk_read_bytes)?,
            disk_write_mbps: mbps(self.disk_written_bytes, before.disk_written_bytes)?,
        })
    }
}

/// A command to run inside a guest, through its guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program. Without a slash it is looked up on the guest agent's
    /// `PATH`, as qemu-guest-agent does.
    pub path: String,
    /// The arguments after the program name.
    #[serde(default)]
    pub args: Vec<String>,
    /// Written to the command's standard input, which is then closed.
    /// Without it, standard input is empty (`/dev/null`).
    #[serde(default)]
    pub input: Option<Vec<u8>>,
    /// Bounds the whole call: reaching the agent, running the command and
    /// collecting its output. A command still running then is left running
    /// (the protocol has no way to stop it) and the call fails.
    pub timeout: Duration,
}

impl ExecRequest {
    /// What [`ExecRequest::new`] allows a command.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// `path` with `args`, no input, [`Self::DEFAULT_TIMEOUT`].
    pub fn new(path: impl Into<String>, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            path: path.into(),
            args: args.into_iter().map(Into::into).collect(),
            input: None,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// How a command run by [`Hypervisor::exec`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The exit status; for a command killed by a signal, 128 + the signal
    /// number, as shells report it.
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A network interface as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    /// The guest's name for it: `lo`, `eth0`, ...
    pub name: String,
    /// The hardware address, lower case with colons, where it has one.
    pub mac: Option<String>,
    /// IPv4 and IPv6 addresses with their prefix length: `10.0.0.5/24`,
    /// `fe80::5054:ff:fe12:3456/64`.
    pub addresses: Vec<String>,
}

/// A change to the hardware of a Running guest ([`Hypervisor::hotplug`]).
///
/// Only additions: a guest OS cannot be made to give up memory or vCPUs it
/// may be using, so shrinking is refused (stop the guest and redefine it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Hotplug {
    /// A new, empty disk of `size`, after the guest's existing disks.
    AddDisk { size: ByteSize },
    /// A new NIC with hardware address `mac`, after the guest's existing
    /// NICs. Its host side is the tap the network layer created for it
    /// (QEMU: [`qemu::QemuHypervisor::tap_name`] of the new NIC's index).
    AddNic { nic: drove_model::NicSpec },
    /// Grow the guest's memory to `memory` in total.
    SetMemory { memory: ByteSize },
    /// Grow the guest's vCPUs to `vcpus` in total.
    SetVcpus { vcpus: u32 },
    /// Grow disk `index` to `size` (online resize; the guest sees a
    /// capacity change). Shrinking would cut off data: refused.
    GrowDisk { index: u32, size: ByteSize },
}

impl Hotplug {
    /// A short name of the change, for errors and logs.
    pub fn describe(&self) -> String {
        match self {
            Hotplug::AddDisk { size } => format!("adding a {size} disk"),
            Hotplug::AddNic { nic } => format!("adding a NIC with MAC {} on VLAN {}", nic.mac, nic.vlan),
            Hotplug::SetMemory { memory } => format!("setting memory to {memory}"),
            Hotplug::SetVcpus { vcpus } => format!("setting vCPUs to {vcpus}"),
            Hotplug::GrowDisk { index, size } => format!("growing disk {index} to {size}"),
        }
    }
}

/// A complete snapshot, as the backend holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub kind: SnapshotKind,
    /// When it was taken, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// The saved memory and device state (zero for [`SnapshotKind::Disk`]).
    pub vm_state_size: ByteSize,
}

/// Checks a snapshot name: what [`drove_model::guest::validate_name`] allows
/// (a DNS label), so that it is safe in QEMU tags and on command lines.
pub fn check_snapshot_name(id: GuestId, name: &str) -> Result<(), HvError> {
    drove_model::guest::validate_name(name).map_err(|reason| HvError::InvalidSnapshot {
        id,
        name: name.to_owned(),
        reason: format!("the name {reason}"),
    })
}

pub use drove_model::snapshot::CLONE_SNAPSHOT_PREFIX;

/// Checks new `limits` for a guest defined as `spec`, with a process
/// (`live`) or without: the rules every backend applies (see
/// [`Hypervisor::set_limits`]).
pub fn check_limits(id: GuestId, spec: &GuestSpec, limits: &ResourceLimits, live: bool) -> Result<(), HvError> {
    limits.validate(spec.vcpus).map_err(|(field, reason)| HvError::InvalidLimits { id, field, reason })?;
    if live && limits.cpu_pin != spec.limits.cpu_pin {
        return Err(HvError::InvalidLimits {
            id,
            field: "cpu_pin",
            reason: format!(
                "the pinning of a guest with a process cannot change (it has {:?}, {:?} asked); stop it first",
                spec.limits.cpu_pin, limits.cpu_pin
            ),
        });
    }
    Ok(())
}

/// Checks the disks of a guest to define: each by its kind's rules, and no
/// block device twice. The rules every backend applies on create.
pub fn check_disks(id: GuestId, spec: &GuestSpec) -> Result<(), HvError> {
    for (i, d) in spec.disks.iter().enumerate() {
        d.validate_kind().map_err(|r| HvError::DiskKind { id, op: "create", reason: format!("disk {i} {r}") })?;
        if let Some(p) = d.block_path()
            && spec.disks[..i].iter().any(|o| o.block_path() == Some(p))
        {
            return Err(HvError::DiskKind { id, op: "create", reason: format!("disk {i} names {p} a second time") });
        }
        if d.block_path().is_some() && spec.storage == drove_model::guest::Storage::Shared {
            return Err(HvError::DiskKind {
                id,
                op: "create",
                reason: format!(
                    "disk {i} is {}, local to this host; block devices on a shared SAN are not supported yet",
                    d.kind_phrase()
                ),
            });
        }
    }
    if let Some(img) = &spec.image
        && let Some(d) = spec.disks.first().filter(|d| !d.format.is_qcow2())
    {
        return Err(HvError::DiskKind {
            id,
            op: "create",
            reason: format!("disk 0 boots image {img} as a qcow2 overlay and cannot be {}", d.kind_phrase()),
        });
    }
    Ok(())
}

/// The source of clone `clone` as another host of the shared pool sees it,
/// when its record is not on this host: what the manager said of its disks
/// (`CloneSource::shared_disks`), on shared storage, booting the clone's
/// image (the manager gives a clone its source's). `None`: the source's
/// disks are not on the shared pool, so only its own host can clone it.
pub fn shared_source(clone: &GuestConfig, from: &drove_model::CloneSource) -> Option<GuestConfig> {
    let disks = from.shared_disks.clone()?;
    Some(GuestConfig {
        id: from.guest,
        generation: 0,
        spec: GuestSpec { disks, storage: drove_model::guest::Storage::Shared, clone_of: None, ..clone.spec.clone() },
    })
}

/// Checks a clone against its source as the backend found it: `source` is
/// its definition (`None`: not on this host), `running` whether it has a
/// process, `snapshots` its complete snapshots. The rules every backend
/// applies (see [`Hypervisor::create`]).
pub fn check_clone(
    clone: &GuestConfig,
    from: &drove_model::CloneSource,
    source: Option<&GuestConfig>,
    running: bool,
    snapshots: &[String],
) -> Result<(), HvError> {
    let refuse = |reason: &str| HvError::CloneSource { id: clone.id, source_guest: from.guest, reason: reason.into() };
    let Some(source) = source else { return Err(refuse("the source is not defined on this host")) };
    if from.guest == clone.id {
        return Err(refuse("a guest cannot be its own source"));
    }
    if source.spec.disks.len() != clone.spec.disks.len() {
        return Err(refuse(&format!(
            "the source has {} disks and the clone {}",
            source.spec.disks.len(),
            clone.spec.disks.len()
        )));
    }
    if source.spec.image != clone.spec.image {
        return Err(refuse("the clone must boot the same base image as its source"));
    }
    if let Some(name) = &from.snapshot
        && !snapshots.iter().any(|s| s == name)
    {
        return Err(HvError::SnapshotNotFound { id: from.guest, name: name.clone() });
    }
    if let Some((i, d)) = source.spec.first_block_disk() {
        return Err(refuse(&format!(
            "its disk {i} is {}, which is neither copied nor overlaid (give the clone its own device)",
            d.kind_phrase()
        )));
    }
    if let Some((i, d)) = clone.spec.disks.iter().enumerate().find(|(_, d)| !d.format.is_qcow2()) {
        return Err(refuse(&format!("the clone's disk {i} is {}; a clone's disks are qcow2", d.kind_phrase())));
    }
    if from.mode == drove_model::CloneMode::Copy
        && let Some((i, _)) = source.spec.first_non_qcow2_disk()
        && (running || from.snapshot.is_some())
    {
        return Err(refuse(&format!(
            "its disk {i} is raw: a copy of a running guest or of a snapshot needs qcow2 snapshots; stop it \
             first, or make it a template"
        )));
    }
    if from.mode == drove_model::CloneMode::Overlay {
        if running {
            return Err(refuse("an overlay's base must not change, and the source runs"));
        }
        if from.snapshot.is_some() {
            return Err(refuse("an overlay cannot be made on a snapshot; clone it as a copy"));
        }
    }
    Ok(())
}

#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + Debug + 'static {
    fn kind(&self) -> HypervisorKind;

    /// The host network device the guest's `index`-th NIC attaches to, which
    /// the network layer must create and bridge before the guest starts (or
    /// before the NIC is hot-added); `None` for a backend without host-side
    /// NICs.
    fn nic_device(&self, _id: GuestId, _index: usize) -> Option<String> {
        None
    }

    /// Cores and memory this host offers to guests.
    async fn resources(&self) -> Result<HostResources, HvError>;

    /// The storage pools this host keeps disks in, and their space.
    async fn pools(&self) -> Result<Vec<PoolSpace>, HvError> {
        Ok(Vec::new())
    }

    /// Define the guest and provision its disks, leaving it Stopped.
    /// Idempotent: an existing guest with this id is left as it is (its
    /// generation is updated). A clone (`spec.clone_of`, see the module
    /// docs) is refused without effect when its source is neither on this
    /// host nor on the shared pool (`CloneSource::shared_disks`) or has
    /// other disks (`CloneSource`), names an unknown snapshot
    /// (`SnapshotNotFound`), or is asked for as an overlay of a source that
    /// runs (`CloneSource`: two running guests never share a disk file for
    /// writing, and a base must not change under its overlays).
    async fn create(&self, config: &GuestConfig) -> Result<(), HvError>;

    /// Boot a Stopped or Crashed guest; returns once it runs. Starting a
    /// Running guest succeeds.
    async fn start(&self, id: GuestId) -> Result<(), HvError>;

    /// Stop a guest; stopping a Stopped or Crashed guest succeeds.
    async fn stop(&self, id: GuestId, mode: StopMode) -> Result<(), HvError>;

    async fn pause(&self, id: GuestId) -> Result<(), HvError>;

    async fn resume(&self, id: GuestId) -> Result<(), HvError>;

    /// Reset a running guest, like its reset button: the guest reboots at
    /// once, in the same process, losing what it had in RAM and not written
    /// to disk. Only a running guest can be reset.
    async fn reset(&self, id: GuestId) -> Result<(), HvError>;

    /// Stop the guest if needed and remove its definition and disks, on
    /// shared storage too. Destroying an unknown guest succeeds.
    async fn destroy(&self, id: GuestId) -> Result<(), HvError>;

    /// Drop this host's copy of a guest on shared storage that lives on
    /// another host now (restarted there after this host failed, or
    /// migrated): hard-stop it if it runs, remove its definition, keep its
    /// disks. A guest with disks on this host is refused (`Unsupported`):
    /// forgetting it would lose them. Forgetting an unknown guest succeeds.
    async fn forget(&self, id: GuestId) -> Result<(), HvError>;

    async fn status(&self, id: GuestId) -> Result<GuestStatus, HvError>;

    /// All guests defined on this host, including ones from before an agent
    /// restart.
    async fn list(&self) -> Result<Vec<GuestStatus>, HvError>;

    /// The cumulative counters of a guest with a process (Running, Paused;
    /// `InvalidState` for one without, `NotFound` for an unknown one). Cheap
    /// enough to ask every heartbeat, and never waits for an operation on
    /// the guest to end: a backend that cannot read a counter without
    /// waiting fails instead, and the caller asks again later.
    async fn usage(&self, id: GuestId) -> Result<GuestUsage, HvError> {
        let _ = id;
        Err(HvError::Unsupported { op: "usage", backend: self.kind(), reason: "no usage counters".into() })
    }

    /// The guest's definition as this host holds it (what a later start
    /// uses, hot-added hardware and limits included); `NotFound` for a
    /// guest not defined here. The manager compares it with its own record
    /// to settle a change whose answer it never got.
    async fn definition(&self, id: GuestId) -> Result<GuestConfig, HvError> {
        let _ = id;
        Err(HvError::Unsupported { op: "definition", backend: self.kind(), reason: "no readable definition".into() })
    }

    /// The last `max_bytes` of the guest's serial console output, across
    /// its boots.
    async fn console_log(&self, id: GuestId, max_bytes: u64) -> Result<Vec<u8>, HvError> {
        let _ = (id, max_bytes);
        Err(HvError::Unsupported { op: "console_log", backend: self.kind(), reason: "no console history".into() })
    }

    /// An interactive byte stream to the serial console of a running guest.
    async fn console(&self, id: GuestId) -> Result<ConsoleStream, HvError> {
        let _ = id;
        Err(HvError::Unsupported { op: "console", backend: self.kind(), reason: "no serial console".into() })
    }

    /// Runs a command inside a Running guest and waits for it to exit,
    /// within `req.timeout`. A guest that is not Running is
    /// `InvalidState`; one whose agent does not answer fails with a timeout
    /// in the error's source chain.
    async fn exec(&self, id: GuestId, req: &ExecRequest) -> Result<ExecResult, HvError> {
        let _ = (id, req);
        Err(HvError::Unsupported { op: "exec", backend: self.kind(), reason: "no guest agent".into() })
    }

    /// Whether the guest's OS is up: its guest agent answers. `false` while
    /// it boots (and for a guest that is not running). A backend without
    /// guest agents counts a running guest as up.
    async fn guest_ready(&self, id: GuestId) -> Result<bool, HvError> {
        Ok(self.status(id).await?.state == RuntimeState::Running)
    }

    /// The network interfaces of a Running guest, with their addresses, as
    /// its guest agent reports them.
    async fn guest_interfaces(&self, id: GuestId) -> Result<Vec<GuestInterface>, HvError> {
        let _ = id;
        Err(HvError::Unsupported { op: "guest_interfaces", backend: self.kind(), reason: "no guest agent".into() })
    }

    /// Applies `change` to a Running guest, and records it in the guest's
    /// definition so that later starts keep the new hardware. A change that
    /// cannot be made is refused (`Unsupported` with the reason,
    /// `InvalidState` for a guest that is not Running) and leaves nothing
    /// of itself behind: no half-added device, file or definition change.
    async fn hotplug(&self, id: GuestId, change: &Hotplug) -> Result<(), HvError> {
        let _ = (id, change);
        Err(HvError::Unsupported { op: "hotplug", backend: self.kind(), reason: "no hotplug support".into() })
    }

    /// Replaces the guest's resource limits with `limits` and records them
    /// in its definition, in any state. A guest with a process (Running,
    /// Paused) gets them at once, without a restart: CPU cap and shares,
    /// disk throttles, NIC rates (a NIC with a rate of its own keeps it); a
    /// limit that is `None` now is removed. One without (Stopped, Crashed)
    /// gets them at its next start. Refused without effect
    /// (`InvalidLimits`): values [`ResourceLimits::validate`] rejects for
    /// the guest's vCPUs, and a pin change while it has a process. Never
    /// half-applied: when one part cannot be changed, the parts changed
    /// already go back to the old limits, the definition keeps the old
    /// ones, and the error names the part.
    async fn set_limits(&self, id: GuestId, limits: &ResourceLimits) -> Result<(), HvError> {
        let _ = (id, limits);
        Err(HvError::Unsupported { op: "set_limits", backend: self.kind(), reason: "no resource limits".into() })
    }

    /// Moves every disk of the guest to pool `to` (this host's local pool,
    /// or the shared pool every host sees) and records the new pool in its
    /// definition, so that its later starts (and a restarted agent) use the
    /// new files. A guest with a process (Running, Paused) keeps running
    /// on the same process throughout: its disks are mirrored under it and
    /// switched over once in sync. One without is copied file by file. The
    /// copies stand alone: a disk that was a thin overlay on a base image
    /// no longer depends on it.
    ///
    /// Idempotent: a guest already on `to` succeeds at once (`from ==
    /// to`), so a caller that lost the answer asks again. Refused without
    /// effect: a move to the shared pool on a host without one, a guest
    /// with internal snapshots (a copy would drop them), one in a live
    /// migration (`Unsupported` with the reason), one crashed with its
    /// process still there (`InvalidState`). A move that fails before the
    /// switch leaves the guest on its old files, and nothing of the new
    /// ones behind.
    async fn move_storage(&self, id: GuestId, to: Storage) -> Result<StorageMoved, HvError> {
        let _ = (id, to);
        Err(HvError::Unsupported { op: "move_storage", backend: self.kind(), reason: "no storage pools".into() })
    }

    /// Takes snapshot `name` of all the guest's disks at one instant, with
    /// the memory state for [`SnapshotKind::Memory`]. The guest keeps its
    /// state (a Running guest keeps running, same incarnation). Refused
    /// without effect: an invalid or taken name (`InvalidSnapshot`), a
    /// memory snapshot of a guest without a process (`InvalidState`), a
    /// guest without disks (`Unsupported`). A failed create leaves no part
    /// of the snapshot on any disk.
    async fn snapshot_create(&self, id: GuestId, name: &str, kind: SnapshotKind) -> Result<SnapshotInfo, HvError> {
        let _ = (id, name, kind);
        Err(HvError::Unsupported { op: "snapshot_create", backend: self.kind(), reason: "no snapshots".into() })
    }

    /// The guest's complete snapshots, oldest first.
    async fn snapshot_list(&self, id: GuestId) -> Result<Vec<SnapshotInfo>, HvError> {
        let _ = id;
        Err(HvError::Unsupported { op: "snapshot_list", backend: self.kind(), reason: "no snapshots".into() })
    }

    /// Removes snapshot `name` from every disk; the guest's current state is
    /// untouched. Deleting a snapshot that does not exist succeeds (and
    /// removes any part of it an interrupted create left).
    async fn snapshot_delete(&self, id: GuestId, name: &str) -> Result<(), HvError> {
        let _ = (id, name);
        Err(HvError::Unsupported { op: "snapshot_delete", backend: self.kind(), reason: "no snapshots".into() })
    }

    /// Rolls the guest back to snapshot `name` (see [`RestoreOutcome`]).
    /// The snapshot stays. An unknown name is `SnapshotNotFound`.
    async fn snapshot_restore(&self, id: GuestId, name: &str) -> Result<RestoreOutcome, HvError> {
        let _ = (id, name);
        Err(HvError::Unsupported { op: "snapshot_restore", backend: self.kind(), reason: "no snapshots".into() })
    }

    /// Target side of a live migration: defines the guest (making its
    /// disks empty when they will be mirrored), starts its QEMU waiting for
    /// the stream on `req.listen:req.port`, and serves its disks over NBD
    /// for a mirror. The NICs' host devices must exist. Idempotent for a
    /// guest already waiting.
    async fn migrate_incoming(&self, config: &GuestConfig, req: &migration::Incoming) -> Result<(), HvError> {
        let _ = (config, req);
        Err(HvError::Unsupported { op: "migrate_incoming", backend: self.kind(), reason: "no live migration".into() })
    }

    /// Source side: mirrors the disks (if asked), migrates the guest's
    /// state to the waiting target, reporting progress, and returns once
    /// the target has it all. The source is then paused for good: only
    /// [`Hypervisor::migrate_cancel`] (the target never ran) or
    /// [`Hypervisor::destroy`] (it did) may follow.
    async fn migrate_out(
        &self,
        id: GuestId,
        req: &migration::Outgoing,
        progress: &(dyn Fn(migration::MigrationProgress) + Send + Sync),
    ) -> Result<migration::MigrationStats, HvError> {
        let _ = (id, req, progress);
        Err(HvError::Unsupported { op: "migrate_out", backend: self.kind(), reason: "no live migration".into() })
    }

    /// Target side, after the source finished: waits (up to `timeout`)
    /// until the guest runs here and stops serving its disks. Fails if the
    /// incoming migration failed; the guest must then be destroyed here.
    /// With `await_console`, it also waits (briefly) for the guest's first
    /// console output here, where the backend can see it.
    async fn migrate_finish(
        &self,
        id: GuestId,
        timeout: Duration,
        await_console: bool,
    ) -> Result<migration::IncomingDone, HvError> {
        let _ = (id, timeout, await_console);
        Err(HvError::Unsupported { op: "migrate_finish", backend: self.kind(), reason: "no live migration".into() })
    }

    /// Source side: aborts an outgoing migration, or resumes a guest that
    /// finished migrating but whose target never ran it. The guest runs
    /// here afterwards. Succeeds on a guest that simply runs.
    async fn migrate_cancel(&self, id: GuestId) -> Result<(), HvError> {
        let _ = id;
        Err(HvError::Unsupported { op: "migrate_cancel", backend: self.kind(), reason: "no live migration".into() })
    }
}

/// Something a console can be read from and written to.
pub trait ConsoleIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ConsoleIo for T {}

/// A guest's serial console, as a byte stream.
pub type ConsoleStream = Box<dyn ConsoleIo>;

/// Now as Unix time in microseconds: the clock QEMU stamps its events
/// with, so times from QEMU and from us compare.
pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The last `max` bytes of a file (console histories can grow large).
pub async fn tail_file(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    f.seek(std::io::SeekFrom::Start(len.saturating_sub(max))).await?;
    let mut buf = Vec::with_capacity(len.min(max) as usize);
    f.take(max).read_to_end(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    fn reading(pid: u32, started: u64, cpu_s: u64, net: u64, disk: u64) -> GuestUsage {
        GuestUsage {
            pid,
            started,
            cpu_ns: cpu_s * 1_000_000_000,
            memory_bytes: 512 * 1024 * 1024,
            net_rx_bytes: net,
            net_tx_bytes: net / 2,
            disk_read_bytes: disk,
            disk_written_bytes: 0,
        }
    }

    #[test]
    fn rates_are_per_second_in_the_models_units() {
        let before = reading(7, 100, 10, 0, 0);
        // 5 CPU-seconds, 12.5 MB in, 25 MB read, in 10 s.
        let after = reading(7, 100, 15, 12_500_000, 25_000_000);
        let r = after.rate_since(&before, Duration::from_secs(10)).expect("a rate");
        assert_eq!(r.interval_ms, 10_000);
        assert!((r.cpu_millicores - 500.0).abs() < 1e-9, "{r:?}");
        assert!((r.memory_mib - 512.0).abs() < 1e-9, "{r:?}");
        assert!((r.net_rx_mbps - 10.0).abs() < 1e-9, "{r:?}");
        assert!((r.net_tx_mbps - 5.0).abs() < 1e-9, "{r:?}");
        assert!((r.disk_read_mbps - 20.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.disk_write_mbps, 0.0);
    }

    #[test]
    fn no_rate_across_another_process_or_a_counter_that_went_back() {
        let before = reading(7, 100, 10, 1000, 1000);
        let dt = Duration::from_secs(1);
        // Same pid, another start: the pid was reused by a new QEMU.
        assert!(reading(7, 101, 11, 1000, 1000).rate_since(&before, dt).is_none());
        assert!(reading(8, 100, 11, 1000, 1000).rate_since(&before, dt).is_none());
        // Counters that restarted within what looks like one process.
        assert!(reading(7, 100, 9, 1000, 1000).rate_since(&before, dt).is_none());
        assert!(reading(7, 100, 11, 10, 1000).rate_since(&before, dt).is_none());
        assert!(reading(7, 100, 11, 1000, 10).rate_since(&before, dt).is_none());
        assert!(reading(7, 100, 11, 1000, 1000).rate_since(&before, Duration::ZERO).is_none());
        assert!(reading(7, 100, 11, 1000, 1000).rate_since(&before, dt).is_some());
    }
}
