//! A simulated hypervisor: guests are rows in a table, time is `tokio::time::sleep`.
//!
//! [`SimHypervisor`] implements [`Hypervisor`] without running anything, so
//! that the agent, the manager and the placement code can be tested — and run
//! at the scale of a thousand hosts — on one machine. It obeys the same rules
//! as the real backends (the [`conformance`](crate::conformance) suite checks
//! both), and adds three things a real hypervisor cannot offer:
//!
//! * **Timing knobs** ([`SimConfig`]): each call waits as long as the real
//!   operation would (defining a guest, booting it, an ACPI shutdown, a QMP
//!   round trip), so races and timeouts in the callers show up in tests.
//! * **Fault injection**: [`SimHypervisor::crash`] kills a guest's "process",
//!   [`SimHypervisor::fail_next`] makes the next call of an operation fail
//!   before it does anything, [`SimHypervisor::fail_next_after_effect`] makes
//!   it fail after it took effect (a lost reply), and
//!   [`SimHypervisor::set_ignores_acpi`] gives a guest that never shuts down
//!   on request. [`SimHypervisor::calls`] counts the calls per operation.
//! * **Persistence** ([`SimHypervisor::with_state_file`]): the guest table is
//!   saved as JSON after every change and loaded on construction, so a
//!   restarted agent re-adopts its simulated guests the way it re-adopts
//!   real QEMU processes.
//!
//! # How a call runs
//!
//! A state-changing call checks the guest under a short lock, sleeps the
//! simulated time *without* the lock, then re-checks and commits under the
//! lock. The operation therefore takes effect at its end, and whatever
//! happened meanwhile (a crash, a concurrent destroy) is judged by the same
//! transition rules (`Action::step`) as at the start. No call holds a lock
//! across an `.await`, and an instance owns no task or thread: a thousand
//! instances with ten guests each are a few hundred kilobytes and timers.
//!
//! Fake process ids: a guest gets a new pid each time it boots (each
//! incarnation), keeps it while Running or Paused, and has none otherwise.
//!
//! A Running simulated guest has a tiny "guest agent": [`Hypervisor::exec`]
//! runs a fixed set of commands ([`SIM_COMMANDS`], see
//! [`SimHypervisor::run_sim_command`]) and [`Hypervisor::guest_interfaces`]
//! shows `lo` and one `ethN` per NIC of the spec, with its MAC and no
//! address (the simulator assigns none).
//!
//! [`Hypervisor::hotplug`] changes a Running guest's definition at once:
//! disks and NICs are appended, vCPUs and memory set; shrinking and
//! changes to a guest that is not Running are refused as by QEMU.
//!
//! [`Hypervisor::set_limits`] replaces the limits in the guest's definition
//! after `command_delay`, in any state, by the rules of
//! [`crate::check_limits`]; [`SimHypervisor::guest_config`] shows them.
//!
//! Snapshots are kept with the guest (and saved with the state file): a
//! list of names, kinds and times, with the same rules as QEMU's internal
//! snapshots — a memory snapshot needs a guest with a process, a guest
//! without disks has nowhere to keep one, and a restore leaves the guest as
//! [`crate::RestoreOutcome`] says (a disk restore of a running guest boots
//! a new incarnation). There are no disk contents to roll back.
//!
//! A clone (`spec.clone_of`) is checked against its source by the same
//! rules as QEMU's ([`crate::check_clone`]) and gets the source's disk
//! sizes; there are no contents to copy, and it has no snapshots. A source
//! defined on another host of the shared pool ([`SimPool`]) is found there
//! when the clone carries `shared_disks`, as QEMU reads the pool's files.
//!
//! [`Hypervisor::usage`] gives counters that grow as a guest of this spec
//! would: CPU at its `load_profile`'s fraction of the current UTC hour
//! (without one, [`SIM_DEFAULT_CPU_FRACTION`]) of its vCPUs while it runs,
//! none while paused; resident memory its whole memory; no network or disk
//! traffic. [`SimHypervisor::set_load`] gives a guest other rates. They are
//! a deterministic function of the time elapsed, so that the manager's
//! learned profiles in tests and scale runs match what the guests were
//! told to do. Counters start afresh with each incarnation (pid).
//!
//! The simulator does not enforce capacity: like QEMU it lets memory and
//! vCPUs be overcommitted; keeping hosts within their means is the job of
//! admission control and placement.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use drove_model::guest::Storage;
use drove_model::{ByteSize, GuestId, GuestSpec, HypervisorKind, Priority};
use serde::{Deserialize, Serialize};

use crate::{GuestConfig, GuestStatus, HostResources, HvError, Hypervisor, PoolSpace, RuntimeState, StopMode};

/// Host size and how long the simulated operations take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Cores offered to guests.
    pub cores: u32,
    /// Memory offered to guests.
    pub memory: ByteSize,
    /// Defining a new guest and provisioning its disks.
    pub create_delay: Duration,
    /// From `start` until the guest runs.
    pub boot_delay: Duration,
    /// How long the guest OS takes to power off after an ACPI request. If the
    /// graceful-stop timeout is shorter, the guest is forced off at the
    /// timeout instead, as the real backends do.
    pub stop_delay: Duration,
    /// A quick control command (a QMP round trip): pause, resume, and pulling
    /// the plug on a guest.
    pub command_delay: Duration,
    /// Removing a guest's definition and disks.
    pub destroy_delay: Duration,
    /// Taking, deleting or restoring a snapshot (a memory snapshot or a
    /// restore that reboots takes this plus `boot_delay` where it boots),
    /// and moving a guest's disks to another pool.
    pub snapshot_delay: Duration,
    /// Sending a guest to another host (`migrate_out`).
    pub migrate_delay: Duration,
    /// From when a guest's process runs until its OS is up
    /// ([`Hypervisor::guest_ready`]), counted from the first time anyone
    /// asks.
    pub os_boot_delay: Duration,
    /// Size of the host's local pool (and of the shared pool, when it
    /// joined one); free space is this less the disks defined there.
    pub pool_capacity: ByteSize,
}

impl Default for SimConfig {
    /// A 4-core, 16 GiB host whose operations take a few milliseconds: slow
    /// enough that calls overlap, fast enough for thousands of guests.
    fn default() -> Self {
        Self {
            cores: 4,
            memory: ByteSize::gib(16),
            create_delay: Duration::from_millis(2),
            boot_delay: Duration::from_millis(5),
            stop_delay: Duration::from_millis(3),
            command_delay: Duration::from_millis(1),
            destroy_delay: Duration::from_millis(2),
            snapshot_delay: Duration::from_millis(3),
            migrate_delay: Duration::from_millis(10),
            os_boot_delay: Duration::ZERO,
            pool_capacity: ByteSize::gib(1024),
        }
    }
}

impl SimConfig {
    /// The default host with every delay zero, for unit tests. Zero delays do
    /// not touch the timer at all, so calls complete without yielding.
    pub fn instant() -> Self {
        Self {
            create_delay: Duration::ZERO,
            boot_delay: Duration::ZERO,
            stop_delay: Duration::ZERO,
            command_delay: Duration::ZERO,
            destroy_delay: Duration::ZERO,
            snapshot_delay: Duration::ZERO,
            migrate_delay: Duration::ZERO,
            ..Self::default()
        }
    }
}

/// The [`Hypervisor`] calls, for counting them and injecting faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimOp {
    Resources,
    Create,
    Start,
    Stop,
    Pause,
    Resume,
    Reset,
    Destroy,
    Status,
    List,
    SnapshotCreate,
    SnapshotList,
    SnapshotDelete,
    SnapshotRestore,
    MigrateIncoming,
    MigrateOut,
    MigrateFinish,
    MigrateCancel,
    MoveStorage,
    Hotplug,
}

impl SimOp {
    pub const ALL: [SimOp; 20] = [
        SimOp::Resources,
        SimOp::Create,
        SimOp::Start,
        SimOp::Stop,
        SimOp::Pause,
        SimOp::Resume,
        SimOp::Reset,
        SimOp::Destroy,
        SimOp::Status,
        SimOp::List,
        SimOp::SnapshotCreate,
        SimOp::SnapshotList,
        SimOp::SnapshotDelete,
        SimOp::SnapshotRestore,
        SimOp::MigrateIncoming,
        SimOp::MigrateOut,
        SimOp::MigrateFinish,
        SimOp::MigrateCancel,
        SimOp::MoveStorage,
        SimOp::Hotplug,
    ];

    /// The trait method's name, as used in [`HvError`]'s `op`.
    pub const fn name(self) -> &'static str {
        match self {
            SimOp::Resources => "resources",
            SimOp::Create => "create",
            SimOp::Start => "start",
            SimOp::Stop => "stop",
            SimOp::Pause => "pause",
            SimOp::Resume => "resume",
            SimOp::Reset => "reset",
            SimOp::Destroy => "destroy",
            SimOp::Status => "status",
            SimOp::List => "list",
            SimOp::SnapshotCreate => "snapshot_create",
            SimOp::SnapshotList => "snapshot_list",
            SimOp::SnapshotDelete => "snapshot_delete",
            SimOp::SnapshotRestore => "snapshot_restore",
            SimOp::MigrateIncoming => "migrate_incoming",
            SimOp::MigrateOut => "migrate_out",
            SimOp::MigrateFinish => "migrate_finish",
            SimOp::MigrateCancel => "migrate_cancel",
            SimOp::MoveStorage => "move_storage",
            SimOp::Hotplug => "hotplug",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for SimOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The cause inside the [`HvError`] of an injected fault, so that a test can
/// tell it from a genuine failure by downcasting the error's source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected fault: {message}")]
pub struct InjectedFault {
    pub message: String,
}

/// The share of its vCPUs a simulated guest without a load profile keeps
/// busy: the share the manager plans such a guest at, so that measuring
/// it changes no plan.
pub const SIM_DEFAULT_CPU_FRACTION: f32 = 0.25;

/// What a simulated guest uses, set with [`SimHypervisor::set_load`]
/// instead of what its spec implies.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SimLoad {
    /// Share of its vCPUs busy, 0.0..=1.0.
    pub cpu_fraction: f32,
    /// Traffic each way on its NICs, Mbit/s.
    pub net_mbps: f64,
    /// Disk reads and writes each, Mbit/s.
    pub disk_mbps: f64,
}

/// The counters of one simulated incarnation (not saved: a reloaded table
/// starts them again, as a re-adopted QEMU's would continue).
#[derive(Debug, Clone, Copy)]
struct SimCounters {
    started: u64,
    at: std::time::Instant,
    cpu_ns: f64,
    net_bytes: f64,
    disk_bytes: f64,
}

/// The commands a simulated guest runs, by name or as `/bin/NAME` or
/// `/usr/bin/NAME`.
pub const SIM_COMMANDS: &str = "echo ARGS, true, false and cat (without arguments)";

/// A command the simulated guest agent does not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the sim backend runs only {SIM_COMMANDS}, not {path:?} with arguments {args:?}")]
pub struct SimExecUnsupported {
    pub path: String,
    pub args: Vec<String>,
}

/// Why a state file could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum SimStateError {
    #[error("reading sim state file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parsing sim state file {}", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "sim state file {} is {format:?} version {version}; this build reads only {STATE_FORMAT:?} version {STATE_VERSION}",
        .path.display()
    )]
    Unsupported { path: PathBuf, format: String, version: u32 },
    #[error("encoding sim state for {}", .path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing sim state file {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A small, valid guest definition for tests: a fresh random id, generation
/// 1, one vCPU, 64 MiB, named `sim-{n}`. Usable as the template of the
/// conformance suite.
pub fn sample_guest(n: u32) -> GuestConfig {
    GuestConfig {
        id: GuestId::new_v4(),
        generation: 1,
        spec: GuestSpec {
            name: format!("sim-{n}"),
            vcpus: 1,
            memory: ByteSize::mib(64),
            disks: Vec::new(),
            nics: Vec::new(),
            priority: Priority::default(),
            load_profile: None,
            limits: Default::default(),
            image: None,
            clone_of: None,
            storage: Default::default(),
            anti_affinity: None,
            hot_added: None,
        },
    }
}

/// The in-memory hypervisor. Cloning gives another handle to the same
/// simulated host, so a test can keep one for fault injection while the code
/// under test owns another.
#[derive(Clone)]
pub struct SimHypervisor {
    shared: Arc<Shared>,
}

struct Shared {
    config: SimConfig,
    state_file: Option<PathBuf>,
    inner: Mutex<Inner>,
    /// The shared storage pool this host sees, if it joined one.
    pool: Mutex<Option<SimPool>>,
}

/// A simulated shared storage pool: the hosts that joined it see each
/// other's guests on shared storage, and, like QEMU's lock on a shared
/// disk, a guest that runs on one of them cannot start on another.
#[derive(Clone, Default)]
pub struct SimPool(Arc<Mutex<Vec<std::sync::Weak<Shared>>>>);

impl fmt::Debug for SimPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimPool({} hosts)", self.0.lock().map(|v| v.len()).unwrap_or(0))
    }
}

#[derive(Default)]
struct Inner {
    guests: HashMap<GuestId, SimGuest>,
    /// The pid the next boot gets; persisted so that a reloaded table never
    /// hands out a pid twice.
    next_pid: u32,
    calls: [u64; SimOp::ALL.len()],
    faults: [VecDeque<Fault>; SimOp::ALL.len()],
    /// When each guest process was first asked whether its OS is up.
    asked_ready: HashMap<u32, std::time::Instant>,
    /// Usage counters per guest process.
    counters: HashMap<u32, SimCounters>,
    /// Loads set by [`SimHypervisor::set_load`].
    loads: HashMap<GuestId, SimLoad>,
}

/// One guest as the simulator holds it (and saves it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SimGuest {
    config: GuestConfig,
    state: RuntimeState,
    pid: Option<u32>,
    /// The guest OS ignores ACPI power-off requests.
    #[serde(default)]
    ignores_acpi: bool,
    /// Its snapshots, oldest first.
    #[serde(default)]
    snapshots: Vec<crate::SnapshotInfo>,
    /// Where it is in a live migration, if it is in one.
    #[serde(default)]
    migration: Option<SimMigration>,
}

impl SimHypervisor {
    async fn move_guest_storage(&self, id: GuestId, to: Storage) -> Result<crate::StorageMoved, HvError> {
        const OP: &str = "move_storage";
        let refuse = |reason: String| HvError::Unsupported {
            op: OP,
            backend: HypervisorKind::Sim,
            reason: format!("guest {id}: {reason}"),
        };
        let check = |this: &Self| -> Result<(Storage, bool, u64), HvError> {
            let has_pool = this.shared.pool.lock().unwrap_or_else(PoisonError::into_inner).is_some();
            let inner = this.lock();
            let g = inner.guests.get(&id).ok_or(HvError::NotFound { id })?;
            if let Some(reason) = g.config.spec.storage_move_refusal() {
                return Err(HvError::DiskKind { id, op: OP, reason });
            }
            let from = g.config.spec.storage;
            let live = g.pid.is_some();
            let bytes = g.config.spec.pool_bytes();
            if from == to {
                return Ok((from, live, 0));
            }
            if to == Storage::Shared && !has_pool {
                return Err(refuse("this host has no shared pool".into()));
            }
            if g.migration.is_some() {
                return Err(refuse("it is being migrated; move its disks before or after".into()));
            }
            if !g.snapshots.is_empty() {
                let names: Vec<&str> = g.snapshots.iter().map(|s| s.name.as_str()).collect();
                return Err(refuse(format!(
                    "it has internal snapshots ({}), which live inside its disk files and a copy would drop; \
                     delete them first",
                    names.join(", ")
                )));
            }
            if g.state == RuntimeState::Crashed && live {
                return Err(HvError::InvalidState { id, op: OP, state: g.state });
            }
            Ok((from, live, bytes))
        };
        let (from, live, bytes) = check(self)?;
        if from == to {
            return Ok(crate::StorageMoved { from, to, live, bytes: 0, duration_ms: 0 });
        }
        let started = std::time::Instant::now();
        wait(self.shared.config.snapshot_delay).await;
        // The guest may have changed while the copy "ran".
        let (from, live, _) = check(self)?;
        if from == to {
            return Ok(crate::StorageMoved { from, to, live, bytes: 0, duration_ms: 0 });
        }
        let mut inner = self.lock();
        let guest = inner.guests.get_mut(&id).ok_or(HvError::NotFound { id })?;
        guest.config.spec.storage = to;
        if let Err(e) = self.save(&inner, OP) {
            // Not moved if not on disk: the old files stay the guest's.
            if let Some(guest) = inner.guests.get_mut(&id) {
                guest.config.spec.storage = from;
            }
            return Err(e);
        }
        Ok(crate::StorageMoved { from, to, live, bytes, duration_ms: started.elapsed().as_millis() as u64 })
    }
}

/// A simulated guest's part in a live migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum SimMigration {
    /// Defined here, waiting for the stream (paused).
    Incoming,
    /// Being sent away (still running).
    Sending,
    /// Sent: paused for good, unless the migration is cancelled.
    Sent,
}

impl SimGuest {
    fn status(&self) -> GuestStatus {
        GuestStatus { id: self.config.id, state: self.state, generation: self.config.generation, pid: self.pid }
    }
}

#[derive(Debug)]
struct Fault {
    message: String,
    /// Fail after the operation took effect instead of before it.
    after_effect: bool,
}

impl Fault {
    fn into_error(self, op: SimOp, id: Option<GuestId>) -> HvError {
        let source = Box::new(InjectedFault { message: self.message });
        match id {
            Some(id) => HvError::Backend { op: op.name(), id, source },
            // `resources` and `list` concern no guest: they fail as the host.
            None => HvError::Host { op: op.name(), source },
        }
    }
}

/// What a guest-state-changing call asks for. `Crash` is not a trait call
/// but goes through the same rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Start,
    Stop,
    Pause,
    Resume,
    Reset,
    Crash,
}

/// The outcome of an [`Action`] on a guest in some state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Already where the action leads: succeed without doing anything.
    Stay,
    /// A real transition.
    Go(RuntimeState),
    /// Not allowed in this state: `HvError::InvalidState`.
    Refuse,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Reset => "reset",
            Action::Crash => "crash",
        }
    }

    /// The one place that decides which transitions exist (the diagram in
    /// the crate docs). Exhaustive on purpose: a new state must decide every
    /// action.
    fn step(self, from: RuntimeState) -> Step {
        use RuntimeState::{Crashed, Paused, Running, Stopped};
        match (self, from) {
            (Action::Start, Stopped | Crashed) => Step::Go(Running),
            (Action::Start, Running) => Step::Stay,
            // A paused guest is resumed, not booted.
            (Action::Start, Paused) => Step::Refuse,
            (Action::Stop, Running | Paused) => Step::Go(Stopped),
            (Action::Stop, Stopped) => Step::Stay,
            // Stopping a crashed guest acknowledges the crash: nothing is
            // left to kill, and "stopped" is what the caller asked for.
            (Action::Stop, Crashed) => Step::Go(Stopped),
            (Action::Pause, Running) => Step::Go(Paused),
            (Action::Pause, Stopped | Paused | Crashed) => Step::Refuse,
            (Action::Resume, Paused) => Step::Go(Running),
            (Action::Resume, Stopped | Running | Crashed) => Step::Refuse,
            // The same process boots again: running, with a fresh OS.
            (Action::Reset, Running) => Step::Go(Running),
            (Action::Reset, Stopped | Paused | Crashed) => Step::Refuse,
            // Only a guest with a process can lose it.
            (Action::Crash, Running | Paused) => Step::Go(Crashed),
            (Action::Crash, Stopped | Crashed) => Step::Refuse,
        }
    }
}

const STATE_FORMAT: &str = "drove-sim-state";
const STATE_VERSION: u32 = 1;
/// Fake pids start where real ones would look plausible.
const FIRST_PID: u32 = 10_000;

/// Identifies a state file before its body is trusted: a file of another
/// format or version is refused rather than half understood.
#[derive(Deserialize)]
struct StateHeader {
    format: String,
    version: u32,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: String,
    version: u32,
    next_pid: u32,
    guests: Vec<SimGuest>,
}

impl SimHypervisor {
    /// A host with no guests and no persistence.
    pub fn new(config: SimConfig) -> Self {
        Self::from_parts(config, None, HashMap::new(), FIRST_PID)
    }

    /// A host whose guest table lives in `path`: loaded now if the file
    /// exists (a missing file is an empty host), saved after every change.
    ///
    /// Saving writes a temporary file next to `path` and renames it over
    /// `path`, so a process killed mid-write leaves the previous table. There
    /// is no fsync: the file survives a process restart, which is what it
    /// simulates, not a power cut. One state file belongs to one instance at
    /// a time.
    pub fn with_state_file(config: SimConfig, path: impl Into<PathBuf>) -> Result<Self, SimStateError> {
        let path = path.into();
        let (guests, next_pid) = match std::fs::read(&path) {
            Ok(bytes) => load_state(&path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (HashMap::new(), FIRST_PID),
            Err(source) => return Err(SimStateError::Read { path, source }),
        };
        tracing::debug!(path = %path.display(), guests = guests.len(), "sim hypervisor loaded its state");
        Ok(Self::from_parts(config, Some(path), guests, next_pid))
    }

    fn from_parts(
        config: SimConfig,
        state_file: Option<PathBuf>,
        guests: HashMap<GuestId, SimGuest>,
        next_pid: u32,
    ) -> Self {
        let inner = Inner { guests, next_pid, ..Inner::default() };
        Self { shared: Arc::new(Shared { config, state_file, inner: Mutex::new(inner), pool: Mutex::new(None) }) }
    }

    /// Joins the shared storage `pool` (see [`SimPool`]).
    pub fn join_pool(&self, pool: &SimPool) {
        pool.0.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::downgrade(&self.shared));
        *self.shared.pool.lock().unwrap_or_else(PoisonError::into_inner) = Some(pool.clone());
    }

    /// Checks a clone of `source`, whose record is on another host, as
    /// QEMU's backend reads it from the shared pool: its disks must be
    /// there (a host of the pool has it on shared storage), its snapshots
    /// are those its files hold, and a source that runs somewhere is
    /// refused, as QEMU's image lock would.
    fn check_pool_source(
        &self,
        config: &GuestConfig,
        from: &drove_model::CloneSource,
        source: &GuestConfig,
    ) -> Result<(), HvError> {
        let refuse =
            |reason: &str| HvError::CloneSource { id: config.id, source_guest: from.guest, reason: reason.into() };
        let Some(members) = self.pool_members() else {
            return Err(refuse("its disks are on the shared pool and this host has none (drove agent --shared-dir)"));
        };
        let mut found = None;
        for member in &members {
            let inner = member.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(g) = inner.guests.get(&from.guest).filter(|g| g.config.spec.storage == Storage::Shared) else {
                continue;
            };
            if g.pid.is_some() {
                return Err(HvError::Backend {
                    op: "create",
                    id: config.id,
                    source: format!(
                        "Failed to get shared \"write\" lock: guest {} runs on another host of the pool",
                        from.guest
                    )
                    .into(),
                });
            }
            found = Some(g.snapshots.iter().map(|s| s.name.clone()).collect::<Vec<String>>());
        }
        let Some(snapshots) = found else { return Err(refuse("its disks are not on the shared pool")) };
        crate::check_clone(config, from, Some(source), false, &snapshots)
    }

    /// The hosts of this host's shared pool, itself included; `None`
    /// outside a pool.
    fn pool_members(&self) -> Option<Vec<Arc<Shared>>> {
        let pool = self.shared.pool.lock().unwrap_or_else(PoisonError::into_inner).clone()?;
        let members = pool.0.lock().unwrap_or_else(PoisonError::into_inner);
        Some(members.iter().filter_map(std::sync::Weak::upgrade).collect())
    }

    /// Refuses to start a guest on shared storage that runs on another
    /// host of the pool, as QEMU's disk lock would.
    fn check_disk_lock(&self, id: GuestId) -> Result<(), HvError> {
        let shared = self.lock().guests.get(&id).is_some_and(|g| g.config.spec.storage == Storage::Shared);
        let (true, Some(others)) = (shared, self.pool_members()) else { return Ok(()) };
        for other in others.iter().filter(|o| !Arc::ptr_eq(o, &self.shared)) {
            let runs = other
                .inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .guests
                .get(&id)
                .is_some_and(|g| matches!(g.state, RuntimeState::Running | RuntimeState::Paused));
            if runs {
                return Err(HvError::Backend {
                    op: "start",
                    id,
                    source: format!("Failed to get \"write\" lock: guest {id} runs on another host of the pool").into(),
                });
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    pub fn state_file(&self) -> Option<&Path> {
        self.shared.state_file.as_deref()
    }

    /// Kills the guest's (simulated) process: a Running or Paused guest
    /// becomes Crashed and loses its pid, as if QEMU had died. Unknown guests
    /// give `NotFound`, guests without a process `InvalidState`.
    pub fn crash(&self, id: GuestId) -> Result<(), HvError> {
        let mut inner = self.lock();
        let Inner { guests, next_pid, .. } = &mut *inner;
        let guest = guests.get_mut(&id).ok_or(HvError::NotFound { id })?;
        match Action::Crash.step(guest.state) {
            Step::Go(to) => apply(guest, to, next_pid),
            Step::Stay => return Ok(()),
            Step::Refuse => return Err(invalid(Action::Crash, id, guest.state)),
        }
        self.save(&inner, "crash")
    }

    /// Crashes every guest that has a process, as a host reboot or an OOM
    /// killer spree would. Returns how many crashed.
    pub fn crash_all(&self) -> Result<usize, HvError> {
        let mut inner = self.lock();
        let Inner { guests, next_pid, .. } = &mut *inner;
        let mut crashed = 0;
        for guest in guests.values_mut() {
            if let Step::Go(to) = Action::Crash.step(guest.state) {
                apply(guest, to, next_pid);
                crashed += 1;
            }
        }
        if crashed > 0 {
            self.save(&inner, "crash")?;
        }
        Ok(crashed)
    }

    /// Makes the guest OS ignore (or again honour) ACPI power-off requests:
    /// a graceful stop then waits for its whole timeout and forces the guest
    /// off, as with a real guest that has no ACPI daemon.
    pub fn set_ignores_acpi(&self, id: GuestId, ignores: bool) -> Result<(), HvError> {
        let mut inner = self.lock();
        let guest = inner.guests.get_mut(&id).ok_or(HvError::NotFound { id })?;
        if guest.ignores_acpi != ignores {
            guest.ignores_acpi = ignores;
            self.save(&inner, "set_ignores_acpi")?;
        }
        Ok(())
    }

    /// Makes guest `id` use `load` from now on (until it is destroyed),
    /// instead of what its spec implies.
    pub fn set_load(&self, id: GuestId, load: SimLoad) {
        self.lock().loads.insert(id, load);
    }

    /// Makes the next call of `op` fail with `message` before it does
    /// anything. Faults queue: calling this twice fails the next two calls.
    /// The error is `HvError::Backend` (or `HvError::Host` for `resources`
    /// and `list`, which concern no guest) with an [`InjectedFault`] source.
    pub fn fail_next(&self, op: SimOp, message: impl Into<String>) {
        self.push_fault(op, message.into(), false);
    }

    /// Like [`fail_next`](Self::fail_next), but the call takes full effect
    /// and only then reports the failure — a lost reply or a timeout after
    /// the fact, which the caller's retry must absorb idempotently.
    pub fn fail_next_after_effect(&self, op: SimOp, message: impl Into<String>) {
        self.push_fault(op, message.into(), true);
    }

    fn push_fault(&self, op: SimOp, message: String, after_effect: bool) {
        self.lock().faults[op.index()].push_back(Fault { message, after_effect });
    }

    /// How many times `op` was called, failed calls included.
    pub fn calls(&self, op: SimOp) -> u64 {
        self.lock().calls[op.index()]
    }

    /// The guests as [`Hypervisor::list`] would report them, sorted by id —
    /// but for inspection: not counted as a call and never faulted.
    pub fn guests(&self) -> Vec<GuestStatus> {
        sorted_statuses(&self.lock())
    }

    /// The definition held for a guest (the newest generation it was given).
    pub fn guest_config(&self, id: GuestId) -> Option<GuestConfig> {
        self.lock().guests.get(&id).map(|g| g.config.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation under this lock is completed before anything that
        // could panic, so a poisoned table is still consistent: keep going
        // rather than turn one failed test assertion into cascading panics.
        self.shared.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the call and takes its pending fault, if any. A fault that
    /// fails before the effect is returned as the error; one that fails
    /// after it is handed back for [`Self::finish`].
    fn begin(&self, op: SimOp, id: Option<GuestId>) -> Result<Option<Fault>, HvError> {
        let mut inner = self.lock();
        inner.calls[op.index()] += 1;
        match inner.faults[op.index()].pop_front() {
            Some(fault) if !fault.after_effect => {
                tracing::debug!(%op, ?id, message = %fault.message, "sim: injected fault before effect");
                Err(fault.into_error(op, id))
            }
            pending => Ok(pending),
        }
    }

    /// Replaces the call's result with its after-effect fault, if it has one.
    fn finish<T>(
        op: SimOp,
        id: Option<GuestId>,
        fault: Option<Fault>,
        result: Result<T, HvError>,
    ) -> Result<T, HvError> {
        match fault {
            Some(fault) => {
                tracing::debug!(%op, ?id, message = %fault.message, "sim: injected fault after effect");
                Err(fault.into_error(op, id))
            }
            None => result,
        }
    }

    /// Saves the table if this instance has a state file. Called with the
    /// lock held, right after the change: the file is small, and writing
    /// under the lock keeps saves in the order of the changes without any
    /// bookkeeping. There is no `.await` between a change and its save, so
    /// a cancelled call cannot leave a change unsaved.
    fn save(&self, inner: &Inner, op: &'static str) -> Result<(), HvError> {
        let Some(path) = &self.shared.state_file else {
            return Ok(());
        };
        write_state(path, inner).map_err(|e| HvError::Host { op, source: Box::new(e) })
    }

    /// Runs a state-changing call on an existing guest: check, wait the
    /// simulated time without the lock, re-check and commit.
    async fn drive(&self, action: Action, id: GuestId, mode: Option<StopMode>) -> Result<(), HvError> {
        let delay = {
            let inner = self.lock();
            let guest = inner.guests.get(&id).ok_or(HvError::NotFound { id })?;
            match action.step(guest.state) {
                Step::Stay => return Ok(()),
                Step::Refuse => return Err(invalid(action, id, guest.state)),
                Step::Go(_) => self.delay_of(action, guest, mode),
            }
        };
        wait(delay).await;
        let mut inner = self.lock();
        let Inner { guests, next_pid, .. } = &mut *inner;
        // The guest may have been destroyed, crashed or moved on while we
        // waited; judge the action against what it is now.
        let guest = guests.get_mut(&id).ok_or(HvError::NotFound { id })?;
        match action.step(guest.state) {
            Step::Stay => return Ok(()),
            Step::Refuse => return Err(invalid(action, id, guest.state)),
            Step::Go(to) => apply(guest, to, next_pid),
        }
        self.save(&inner, action.name())
    }

    /// How long `action` takes on `guest` as it is now.
    fn delay_of(&self, action: Action, guest: &SimGuest, mode: Option<StopMode>) -> Duration {
        let c = &self.shared.config;
        match (action, mode) {
            (Action::Start, _) => c.boot_delay,
            (Action::Pause | Action::Resume | Action::Reset | Action::Crash, _) => c.command_delay,
            // A crashed guest has no process left to stop.
            (Action::Stop, _) if guest.state == RuntimeState::Crashed => Duration::ZERO,
            (Action::Stop, Some(StopMode::Graceful { timeout })) => {
                // A paused guest cannot act on ACPI either: it is forced off
                // at the timeout, like one that ignores the request.
                let honours = guest.state == RuntimeState::Running && !guest.ignores_acpi;
                if honours && c.stop_delay <= timeout { c.stop_delay } else { timeout + c.command_delay }
            }
            (Action::Stop, Some(StopMode::Force) | None) => c.command_delay,
        }
    }

    async fn create_guest(&self, config: &GuestConfig) -> Result<(), HvError> {
        validate(config)?;
        crate::check_disks(config.id, &config.spec)?;
        {
            let mut inner = self.lock();
            if let Some(guest) = inner.guests.get_mut(&config.id) {
                if redefine(guest, config) {
                    self.save(&inner, "create")?;
                }
                return Ok(());
            }
        }
        if let Some(from) = &config.spec.clone_of {
            let local = {
                let inner = self.lock();
                inner.guests.get(&from.guest).map(|g| {
                    let snapshots: Vec<String> = g.snapshots.iter().map(|s| s.name.clone()).collect();
                    (g.config.clone(), g.pid.is_some(), snapshots)
                })
            };
            match (local, crate::shared_source(config, from)) {
                (Some((source, running, snapshots)), _) => {
                    crate::check_clone(config, from, Some(&source), running, &snapshots)?;
                }
                (None, Some(source)) => self.check_pool_source(config, from, &source)?,
                (None, None) => crate::check_clone(config, from, None, false, &[])?,
            }
        }
        wait(self.shared.config.create_delay).await;
        let mut inner = self.lock();
        // A concurrent create of the same guest may have won meanwhile: then
        // this one is the idempotent repeat.
        let changed = match inner.guests.get_mut(&config.id) {
            Some(guest) => redefine(guest, config),
            None => {
                inner.guests.insert(
                    config.id,
                    SimGuest {
                        config: config.clone(),
                        state: RuntimeState::Stopped,
                        pid: None,
                        ignores_acpi: false,
                        snapshots: Vec::new(),
                        migration: None,
                    },
                );
                tracing::debug!(guest = %config.id, generation = config.generation, "sim: created guest");
                true
            }
        };
        if changed {
            self.save(&inner, "create")?;
        }
        Ok(())
    }

    async fn destroy_guest(&self, id: GuestId) -> Result<(), HvError> {
        let delay = {
            let inner = self.lock();
            let Some(guest) = inner.guests.get(&id) else {
                return Ok(());
            };
            let c = &self.shared.config;
            match guest.state {
                // Pull the plug first, then remove the disks.
                RuntimeState::Running | RuntimeState::Paused => c.command_delay + c.destroy_delay,
                RuntimeState::Stopped | RuntimeState::Crashed => c.destroy_delay,
            }
        };
        wait(delay).await;
        let mut inner = self.lock();
        inner.loads.remove(&id);
        if inner.guests.remove(&id).is_some() {
            tracing::debug!(guest = %id, "sim: destroyed guest");
            self.save(&inner, "destroy")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SimHypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // try_lock: Debug may be called by code that already holds the lock
        // (a tracing field, a panic message); it must not deadlock there.
        let guests = match self.shared.inner.try_lock() {
            Ok(inner) => Some(inner.guests.len()),
            Err(_) => None,
        };
        f.debug_struct("SimHypervisor")
            .field("config", &self.shared.config)
            .field("state_file", &self.shared.state_file)
            .field("guests", &guests)
            .finish()
    }
}

#[async_trait::async_trait]
impl Hypervisor for SimHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Sim
    }

    async fn resources(&self) -> Result<HostResources, HvError> {
        let fault = self.begin(SimOp::Resources, None)?;
        let c = &self.shared.config;
        let result = Ok(HostResources { cores: c.cores, memory: c.memory });
        Self::finish(SimOp::Resources, None, fault, result)
    }

    async fn pools(&self) -> Result<Vec<PoolSpace>, HvError> {
        let capacity = self.shared.config.pool_capacity;
        // Disks count fully (thick): the simulator has no thin growth.
        // A guest on shared storage is defined on each host that ran it:
        // counted once, by id.
        let disks = |host: &Shared, storage: Storage| -> HashMap<GuestId, u64> {
            let inner = host.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner
                .guests
                .iter()
                .filter(|(_, g)| g.config.spec.storage == storage)
                .map(|(id, g)| (*id, g.config.spec.pool_bytes()))
                .collect()
        };
        let space = |name: &str, used: u64| PoolSpace {
            name: name.into(),
            capacity,
            free: ByteSize(capacity.bytes().saturating_sub(used)),
        };
        let mut pools = vec![space("local", disks(&self.shared, Storage::Local).values().sum())];
        if let Some(members) = self.pool_members() {
            let mut all = HashMap::new();
            for m in &members {
                all.extend(disks(m, Storage::Shared));
            }
            pools.push(space("shared", all.values().sum()));
        }
        Ok(pools)
    }

    async fn create(&self, config: &GuestConfig) -> Result<(), HvError> {
        let fault = self.begin(SimOp::Create, Some(config.id))?;
        let result = self.create_guest(config).await;
        Self::finish(SimOp::Create, Some(config.id), fault, result)
    }

    async fn start(&self, id: GuestId) -> Result<(), HvError> {
        let fault = self.begin(SimOp::Start, Some(id))?;
        let result = match self.check_disk_lock(id) {
            Ok(()) => self.drive(Action::Start, id, None).await,
            Err(e) => Err(e),
        };
        Self::finish(SimOp::Start, Some(id), fault, result)
    }

    async fn stop(&self, id: GuestId, mode: StopMode) -> Result<(), HvError> {
        let fault = self.begin(SimOp::Stop, Some(id))?;
        let result = self.drive(Action::Stop, id, Some(mode)).await;
        Self::finish(SimOp::Stop, Some(id), fault, result)
    }

    async fn pause(&self, id: GuestId) -> Result<(), HvError> {
        let fault = self.begin(SimOp::Pause, Some(id))?;
        let result = self.drive(Action::Pause, id, None).await;
        Self::finish(SimOp::Pause, Some(id), fault, result)
    }

    async fn resume(&self, id: GuestId) -> Result<(), HvError> {
        let fault = self.begin(SimOp::Resume, Some(id))?;
        let result = self.drive(Action::Resume, id, None).await;
        Self::finish(SimOp::Resume, Some(id), fault, result)
    }

    async fn reset(&self, id: GuestId) -> Result<(), HvError> {
        let fault = self.begin(SimOp::Reset, Some(id))?;
        let result = self.drive(Action::Reset, id, None).await;
        if result.is_ok() {
            // Its OS boots again: ready only after the boot delay.
            let mut inner = self.lock();
            if let Some(pid) = inner.guests.get(&id).and_then(|g| g.pid) {
                inner.asked_ready.remove(&pid);
            }
        }
        Self::finish(SimOp::Reset, Some(id), fault, result)
    }

    async fn destroy(&self, id: GuestId) -> Result<(), HvError> {
        let fault = self.begin(SimOp::Destroy, Some(id))?;
        let result = self.destroy_guest(id).await;
        Self::finish(SimOp::Destroy, Some(id), fault, result)
    }

    async fn guest_ready(&self, id: GuestId) -> Result<bool, HvError> {
        let mut inner = self.lock();
        let g = inner.guests.get(&id).ok_or(HvError::NotFound { id })?;
        let (RuntimeState::Running, Some(pid)) = (g.state, g.pid) else { return Ok(false) };
        let since = *inner.asked_ready.entry(pid).or_insert_with(std::time::Instant::now);
        Ok(since.elapsed() >= self.shared.config.os_boot_delay)
    }

    async fn forget(&self, id: GuestId) -> Result<(), HvError> {
        let fault = self.begin(SimOp::Destroy, Some(id))?;
        let local = self.lock().guests.get(&id).is_some_and(|g| g.config.spec.storage != Storage::Shared);
        let result = if local {
            Err(HvError::Unsupported {
                op: "forget",
                backend: HypervisorKind::Sim,
                reason: format!("guest {id} has its disks on this host: forgetting it would lose them"),
            })
        } else {
            self.destroy_guest(id).await
        };
        Self::finish(SimOp::Destroy, Some(id), fault, result)
    }

    async fn status(&self, id: GuestId) -> Result<GuestStatus, HvError> {
        let fault = self.begin(SimOp::Status, Some(id))?;
        let result = self.lock().guests.get(&id).map(SimGuest::status).ok_or(HvError::NotFound { id });
        Self::finish(SimOp::Status, Some(id), fault, result)
    }

    async fn list(&self) -> Result<Vec<GuestStatus>, HvError> {
        let fault = self.begin(SimOp::List, None)?;
        let result = Ok(sorted_statuses(&self.lock()));
        Self::finish(SimOp::List, None, fault, result)
    }

    async fn definition(&self, id: GuestId) -> Result<GuestConfig, HvError> {
        let inner = self.lock();
        inner.guests.get(&id).map(|g| g.config.clone()).ok_or(HvError::NotFound { id })
    }

    /// A simulated guest has no real console output; its history is one
    /// line describing its current state, so callers can test the path.
    async fn console_log(&self, id: GuestId, max_bytes: u64) -> Result<Vec<u8>, HvError> {
        let line = {
            let guests = self.lock();
            let g = guests.guests.get(&id).ok_or(HvError::NotFound { id })?;
            format!("sim guest {} is {:?} (pid {:?})\n", g.config.spec.name, g.state, g.pid)
        };
        let bytes = line.into_bytes();
        let skip = bytes.len().saturating_sub(max_bytes as usize);
        Ok(bytes[skip..].to_vec())
    }

    /// The console of a simulated guest is an echo: every byte written comes
    /// back, like a terminal in cooked mode with nothing behind it.
    async fn console(&self, id: GuestId) -> Result<crate::ConsoleStream, HvError> {
        let state = self.lock().guests.get(&id).map(|g| g.state).ok_or(HvError::NotFound { id })?;
        if !matches!(state, RuntimeState::Running | RuntimeState::Paused) {
            return Err(HvError::InvalidState { id, op: "console", state });
        }
        let (ours, theirs) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(theirs);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        Ok(Box::new(ours))
    }

    async fn hotplug(&self, id: GuestId, change: &crate::Hotplug) -> Result<(), HvError> {
        let fault = self.begin(SimOp::Hotplug, Some(id))?;
        let result = self.hotplug_now(id, change).await;
        Self::finish(SimOp::Hotplug, Some(id), fault, result)
    }

    /// Replaces the limits in the guest's definition after `command_delay`
    /// (a QMP round trip) and saves it; checked again after the delay, as
    /// the guest may have started or stopped meanwhile.
    async fn set_limits(&self, id: GuestId, limits: &drove_model::ResourceLimits) -> Result<(), HvError> {
        let check = |guest: &SimGuest| crate::check_limits(id, &guest.config.spec, limits, guest.pid.is_some());
        {
            let inner = self.lock();
            check(inner.guests.get(&id).ok_or(HvError::NotFound { id })?)?;
        }
        wait(self.shared.config.command_delay).await;
        let mut inner = self.lock();
        let guest = inner.guests.get_mut(&id).ok_or(HvError::NotFound { id })?;
        check(guest)?;
        let before = std::mem::replace(&mut guest.config.spec.limits, limits.clone());
        let saved = self.save(&inner, "set_limits");
        if saved.is_err() {
            // Never half-applied: not in memory if not on disk.
            if let Some(guest) = inner.guests.get_mut(&id) {
                guest.config.spec.limits = before;
            }
        }
        saved
    }

    async fn migrate_incoming(&self, config: &GuestConfig, req: &crate::migration::Incoming) -> Result<(), HvError> {
        let _ = req;
        let fault = self.begin(SimOp::MigrateIncoming, Some(config.id))?;
        let result = async {
            let id = config.id;
            if let Some(reason) = config.spec.migration_refusal() {
                return Err(HvError::DiskKind { id, op: "migrate_incoming", reason });
            }
            {
                let inner = self.lock();
                if let Some(g) = inner.guests.get(&id) {
                    return match g.migration {
                        Some(SimMigration::Incoming) => Ok(()),
                        _ => Err(HvError::InvalidState { id, op: "migrate_incoming", state: g.state }),
                    };
                }
            }
            self.create_guest(config).await?;
            let mut inner = self.lock();
            let Inner { guests, next_pid, .. } = &mut *inner;
            let g = guests.get_mut(&id).ok_or(HvError::NotFound { id })?;
            // A process that exists but does not run the guest yet.
            apply(g, RuntimeState::Running, next_pid);
            g.state = RuntimeState::Paused;
            g.migration = Some(SimMigration::Incoming);
            self.save(&inner, "migrate_incoming")
        }
        .await;
        Self::finish(SimOp::MigrateIncoming, Some(config.id), fault, result)
    }

    async fn migrate_out(
        &self,
        id: GuestId,
        req: &crate::migration::Outgoing,
        progress: &(dyn Fn(crate::migration::MigrationProgress) + Send + Sync),
    ) -> Result<crate::migration::MigrationStats, HvError> {
        use crate::migration::{MigrationProgress, MigrationStats, TransferPhase};
        let _ = req;
        let fault = self.begin(SimOp::MigrateOut, Some(id))?;
        let result = async {
            let memory = {
                let mut inner = self.lock();
                let g = inner.guests.get_mut(&id).ok_or(HvError::NotFound { id })?;
                if let Some(reason) = g.config.spec.migration_refusal() {
                    return Err(HvError::DiskKind { id, op: "migrate_out", reason });
                }
                if g.state != RuntimeState::Running || g.migration.is_some() {
                    return Err(HvError::InvalidState { id, op: "migrate_out", state: g.state });
                }
                g.migration = Some(SimMigration::Sending);
                g.config.spec.memory.bytes()
            };
            let started = std::time::Instant::now();
            let report = |phase, transferred: u64| {
                progress(MigrationProgress {
                    phase,
                    transferred,
                    remaining: memory - transferred,
                    dirty_rate: 0,
                    expected_downtime_ms: 1,
                })
            };
            report(TransferPhase::Memory, 0);
            wait(self.shared.config.migrate_delay / 2).await;
            report(TransferPhase::Memory, memory / 2);
            wait(self.shared.config.migrate_delay / 2).await;
            let mut inner = self.lock();
            let g = inner.guests.get_mut(&id).ok_or(HvError::NotFound { id })?;
            if g.migration != Some(SimMigration::Sending) {
                return Err(HvError::InvalidState { id, op: "migrate_out (cancelled)", state: g.state });
            }
            g.migration = Some(SimMigration::Sent);
            g.state = RuntimeState::Paused;
            self.save(&inner, "migrate_out")?;
            report(TransferPhase::Done, memory);
            Ok(MigrationStats {
                total_ms: started.elapsed().as_millis() as u64,
                qemu_downtime_ms: 1,
                transferred: memory,
                stopped_at_us: Some(crate::unix_us()),
                console_last_us: None,
                console_interval_us: None,
                console_copy_gap_us: None,
            })
        }
        .await;
        Self::finish(SimOp::MigrateOut, Some(id), fault, result)
    }

    async fn migrate_finish(
        &self,
        id: GuestId,
        timeout: Duration,
        await_console: bool,
    ) -> Result<crate::migration::IncomingDone, HvError> {
        // A simulated guest has no console to watch.
        let _ = (timeout, await_console);
        let fault = self.begin(SimOp::MigrateFinish, Some(id))?;
        let result = {
            let mut inner = self.lock();
            match inner.guests.get_mut(&id) {
                None => Err(HvError::NotFound { id }),
                Some(g) if g.migration == Some(SimMigration::Incoming) => {
                    g.migration = None;
                    g.state = RuntimeState::Running;
                    self.save(&inner, "migrate_finish").map(|()| crate::migration::IncomingDone {
                        resumed_at_us: Some(crate::unix_us()),
                        console_first_us: None,
                    })
                }
                // Finished already: the repeat of a call whose reply was lost.
                Some(g) if g.migration.is_none() && g.state == RuntimeState::Running => {
                    Ok(crate::migration::IncomingDone { resumed_at_us: None, console_first_us: None })
                }
                Some(g) => Err(HvError::InvalidState { id, op: "migrate_finish", state: g.state }),
            }
        };
        Self::finish(SimOp::MigrateFinish, Some(id), fault, result)
    }

    async fn migrate_cancel(&self, id: GuestId) -> Result<(), HvError> {
        let fault = self.begin(SimOp::MigrateCancel, Some(id))?;
        let result = {
            let mut inner = self.lock();
            match inner.guests.get_mut(&id) {
                None => Err(HvError::NotFound { id }),
                Some(g) => match g.migration {
                    Some(SimMigration::Sending) => {
                        g.migration = None;
                        g.state = RuntimeState::Running;
                        self.save(&inner, "migrate_cancel")
                    }
                    // The target may run it: only `resume` (by whoever knows
                    // it does not) brings this copy back.
                    Some(SimMigration::Sent) => Err(HvError::MigrationCompleted { id }),
                    Some(SimMigration::Incoming) => {
                        Err(HvError::InvalidState { id, op: "migrate_cancel", state: g.state })
                    }
                    None if g.state == RuntimeState::Running => Ok(()),
                    None => Err(HvError::InvalidState { id, op: "migrate_cancel", state: g.state }),
                },
            }
        };
        Self::finish(SimOp::MigrateCancel, Some(id), fault, result)
    }

    async fn snapshot_create(
        &self,
        id: GuestId,
        name: &str,
        kind: crate::SnapshotKind,
    ) -> Result<crate::SnapshotInfo, HvError> {
        let fault = self.begin(SimOp::SnapshotCreate, Some(id))?;
        let result = self.create_snapshot(id, name, kind).await;
        Self::finish(SimOp::SnapshotCreate, Some(id), fault, result)
    }

    /// Takes `snapshot_delay` (the copy); the same refusals as QEMU's.
    async fn move_storage(&self, id: GuestId, to: Storage) -> Result<crate::StorageMoved, HvError> {
        let fault = self.begin(SimOp::MoveStorage, Some(id))?;
        let result = self.move_guest_storage(id, to).await;
        Self::finish(SimOp::MoveStorage, Some(id), fault, result)
    }

    async fn snapshot_list(&self, id: GuestId) -> Result<Vec<crate::SnapshotInfo>, HvError> {
        let fault = self.begin(SimOp::SnapshotList, Some(id))?;
        let result = self.lock().guests.get(&id).map(|g| g.snapshots.clone()).ok_or(HvError::NotFound { id });
        Self::finish(SimOp::SnapshotList, Some(id), fault, result)
    }

    async fn snapshot_delete(&self, id: GuestId, name: &str) -> Result<(), HvError> {
        let fault = self.begin(SimOp::SnapshotDelete, Some(id))?;
        let result = self.delete_snapshot(id, name).await;
        Self::finish(SimOp::SnapshotDelete, Some(id), fault, result)
    }

    async fn snapshot_restore(&self, id: GuestId, name: &str) -> Result<crate::RestoreOutcome, HvError> {
        let fault = self.begin(SimOp::SnapshotRestore, Some(id))?;
        let result = self.restore_snapshot(id, name).await;
        Self::finish(SimOp::SnapshotRestore, Some(id), fault, result)
    }

    /// Runs one of [`SIM_COMMANDS`] in a Running guest, taking
    /// `command_delay`; see [`SimHypervisor::run_sim_command`].
    async fn exec(&self, id: GuestId, req: &crate::ExecRequest) -> Result<crate::ExecResult, HvError> {
        self.running(id, "exec")?;
        wait(self.shared.config.command_delay).await;
        let result = Self::run_sim_command(req).ok_or_else(|| HvError::Backend {
            op: "exec",
            id,
            source: Box::new(SimExecUnsupported { path: req.path.clone(), args: req.args.clone() }),
        })?;
        // The guest may have gone while the command "ran".
        self.running(id, "exec")?;
        Ok(result)
    }

    async fn usage(&self, id: GuestId) -> Result<crate::GuestUsage, HvError> {
        let now = std::time::Instant::now();
        let hour = drove_model::load::utc_hour(crate::unix_us() / 1000);
        let mut inner = self.lock();
        let inner = &mut *inner;
        let guest = inner.guests.get(&id).ok_or(HvError::NotFound { id })?;
        let Some(pid) = guest.pid else { return Err(HvError::InvalidState { id, op: "usage", state: guest.state }) };
        let spec = &guest.config.spec;
        let load = inner.loads.get(&id).copied().unwrap_or_else(|| SimLoad {
            cpu_fraction: spec
                .load_profile
                .as_ref()
                .and_then(|p| p.hourly_cpu.get(hour).copied())
                .unwrap_or(SIM_DEFAULT_CPU_FRACTION),
            ..SimLoad::default()
        });
        let running = guest.state == RuntimeState::Running;
        let vcpus = f64::from(spec.vcpus);
        let memory_bytes = spec.memory.bytes();
        // Incarnations that ended have no more readers; looked for only
        // when there are more counters than guests, so that a reading per
        // guest per heartbeat stays cheap on a host with many guests.
        if inner.counters.len() > inner.guests.len() {
            let live: std::collections::HashSet<u32> = inner.guests.values().filter_map(|g| g.pid).collect();
            inner.counters.retain(|p, _| live.contains(p));
        }
        let c = inner.counters.entry(pid).or_insert(SimCounters {
            started: crate::unix_us(),
            at: now,
            cpu_ns: 0.0,
            net_bytes: 0.0,
            disk_bytes: 0.0,
        });
        // The rates of this moment stand for the time since the last
        // reading: readings come every few seconds, hours change rarely.
        let secs = now.duration_since(c.at).as_secs_f64();
        c.at = now;
        if running {
            c.cpu_ns += secs * vcpus * f64::from(load.cpu_fraction.clamp(0.0, 1.0)) * 1e9;
            c.net_bytes += secs * load.net_mbps.max(0.0) * 1e6 / 8.0;
            c.disk_bytes += secs * load.disk_mbps.max(0.0) * 1e6 / 8.0;
        }
        Ok(crate::GuestUsage {
            pid,
            started: c.started,
            cpu_ns: c.cpu_ns as u64,
            memory_bytes,
            net_rx_bytes: c.net_bytes as u64,
            net_tx_bytes: c.net_bytes as u64,
            disk_read_bytes: c.disk_bytes as u64,
            disk_written_bytes: c.disk_bytes as u64,
        })
    }

    /// `lo` with its loopback addresses, then `eth0`, `eth1`, ... for the
    /// spec's NICs in order, with their MACs and no addresses.
    async fn guest_interfaces(&self, id: GuestId) -> Result<Vec<crate::GuestInterface>, HvError> {
        let nics = self.running(id, "guest_interfaces")?.spec.nics;
        wait(self.shared.config.command_delay).await;
        let lo = crate::GuestInterface {
            name: "lo".to_owned(),
            mac: Some("00:00:00:00:00:00".to_owned()),
            addresses: vec!["127.0.0.1/8".to_owned(), "::1/128".to_owned()],
        };
        let eths = nics.iter().enumerate().map(|(i, nic)| crate::GuestInterface {
            name: format!("eth{i}"),
            mac: Some(nic.mac.to_ascii_lowercase()),
            addresses: Vec::new(),
        });
        Ok(std::iter::once(lo).chain(eths).collect())
    }
}

impl SimHypervisor {
    /// Checks a snapshot call against the guest as it is now: the guest
    /// exists and has a disk, the name is valid. Returns the guest's state.
    fn snapshot_guest(inner: &Inner, id: GuestId, name: &str) -> Result<RuntimeState, HvError> {
        let guest = inner.guests.get(&id).ok_or(HvError::NotFound { id })?;
        crate::check_snapshot_name(id, name)?;
        if guest.config.spec.disks.is_empty() {
            return Err(HvError::Unsupported {
                op: "snapshot",
                backend: HypervisorKind::Sim,
                reason: "the guest has no disk to keep snapshots on".to_owned(),
            });
        }
        Ok(guest.state)
    }

    /// Refuses a snapshot of a guest with a disk that cannot hold one, as
    /// QEMU does (internal snapshots live in qcow2 files).
    fn snapshot_disks(inner: &Inner, id: GuestId, op: &'static str) -> Result<(), HvError> {
        match inner.guests.get(&id).and_then(|g| g.config.spec.snapshot_refusal()) {
            Some(reason) => Err(HvError::DiskKind { id, op, reason }),
            None => Ok(()),
        }
    }

    async fn create_snapshot(
        &self,
        id: GuestId,
        name: &str,
        kind: crate::SnapshotKind,
    ) -> Result<crate::SnapshotInfo, HvError> {
        let check = |inner: &Inner| -> Result<(), HvError> {
            let state = Self::snapshot_guest(inner, id, name)?;
            Self::snapshot_disks(inner, id, "snapshot_create")?;
            if kind == crate::SnapshotKind::Memory && !matches!(state, RuntimeState::Running | RuntimeState::Paused) {
                return Err(HvError::InvalidState { id, op: "snapshot_create", state });
            }
            if inner.guests.get(&id).is_some_and(|g| g.snapshots.iter().any(|s| s.name == name)) {
                return Err(HvError::InvalidSnapshot {
                    id,
                    name: name.to_owned(),
                    reason: "a snapshot of that name exists".to_owned(),
                });
            }
            Ok(())
        };
        check(&self.lock())?;
        wait(self.shared.config.snapshot_delay).await;
        let mut inner = self.lock();
        check(&inner)?;
        let info = crate::SnapshotInfo {
            name: name.to_owned(),
            kind,
            created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            vm_state_size: match kind {
                crate::SnapshotKind::Disk => ByteSize(0),
                crate::SnapshotKind::Memory => {
                    inner.guests.get(&id).map_or(ByteSize(0), |g| ByteSize(g.config.spec.memory.bytes() / 4))
                }
            },
        };
        if let Some(g) = inner.guests.get_mut(&id) {
            g.snapshots.push(info.clone());
        }
        if let Err(e) = self.save(&inner, "snapshot_create") {
            if let Some(g) = inner.guests.get_mut(&id) {
                g.snapshots.retain(|s| s.name != name);
            }
            return Err(e);
        }
        Ok(info)
    }

    async fn delete_snapshot(&self, id: GuestId, name: &str) -> Result<(), HvError> {
        Self::snapshot_guest(&self.lock(), id, name)?;
        wait(self.shared.config.snapshot_delay).await;
        let mut inner = self.lock();
        Self::snapshot_guest(&inner, id, name)?;
        let Some(g) = inner.guests.get_mut(&id) else { return Err(HvError::NotFound { id }) };
        let before = g.snapshots.len();
        g.snapshots.retain(|s| s.name != name);
        if g.snapshots.len() != before {
            self.save(&inner, "snapshot_delete")?;
        }
        Ok(())
    }

    async fn restore_snapshot(&self, id: GuestId, name: &str) -> Result<crate::RestoreOutcome, HvError> {
        use crate::{RestoreOutcome, SnapshotKind};
        let plan = |inner: &Inner| -> Result<RestoreOutcome, HvError> {
            let state = Self::snapshot_guest(inner, id, name)?;
            Self::snapshot_disks(inner, id, "snapshot_restore")?;
            let snapshot = inner
                .guests
                .get(&id)
                .and_then(|g| g.snapshots.iter().find(|s| s.name == name))
                .ok_or_else(|| HvError::SnapshotNotFound { id, name: name.to_owned() })?;
            Ok(match (state, snapshot.kind) {
                (RuntimeState::Running | RuntimeState::Paused, SnapshotKind::Memory) => RestoreOutcome::Live,
                (RuntimeState::Running | RuntimeState::Paused, SnapshotKind::Disk) => RestoreOutcome::Restarted,
                (RuntimeState::Stopped | RuntimeState::Crashed, _) => RestoreOutcome::DisksOnly,
            })
        };
        let outcome = plan(&self.lock())?;
        let c = &self.shared.config;
        let delay = match outcome {
            RestoreOutcome::Restarted => c.snapshot_delay + c.command_delay + c.boot_delay,
            RestoreOutcome::Live | RestoreOutcome::DisksOnly => c.snapshot_delay,
        };
        wait(delay).await;
        let mut inner = self.lock();
        // Judged again: the guest may have stopped or crashed meanwhile.
        let outcome = plan(&inner)?;
        let Inner { guests, next_pid, .. } = &mut *inner;
        let Some(guest) = guests.get_mut(&id) else { return Err(HvError::NotFound { id }) };
        match outcome {
            RestoreOutcome::Live => {}
            RestoreOutcome::Restarted => {
                apply(guest, RuntimeState::Stopped, next_pid);
                apply(guest, RuntimeState::Running, next_pid);
            }
            RestoreOutcome::DisksOnly => apply(guest, RuntimeState::Stopped, next_pid),
        }
        self.save(&inner, "snapshot_restore")?;
        Ok(outcome)
    }

    /// What a simulated guest's command does, or `None` for a command it
    /// does not have. `echo` prints its arguments joined by spaces and a
    /// newline (no options), `true` exits 0, `false` exits 1, `cat` copies
    /// its input to its output.
    pub fn run_sim_command(req: &crate::ExecRequest) -> Option<crate::ExecResult> {
        let name = req.path.strip_prefix("/usr/bin/").or_else(|| req.path.strip_prefix("/bin/")).unwrap_or(&req.path);
        let (exit_code, stdout) = match (name, req.args.as_slice()) {
            ("echo", args) => (0, format!("{}\n", args.join(" ")).into_bytes()),
            ("true", _) => (0, Vec::new()),
            ("false", _) => (1, Vec::new()),
            ("cat", []) => (0, req.input.clone().unwrap_or_default()),
            _ => return None,
        };
        Some(crate::ExecResult { exit_code, stdout, stderr: Vec::new() })
    }

    /// Applies `change` to a Running guest's definition, after
    /// `command_delay` (a QMP round trip), and saves it.
    async fn hotplug_now(&self, id: GuestId, change: &crate::Hotplug) -> Result<(), HvError> {
        self.running(id, "hotplug")?;
        wait(self.shared.config.command_delay).await;
        let mut inner = self.lock();
        let guest = inner.guests.get_mut(&id).ok_or(HvError::NotFound { id })?;
        // The guest may have stopped during the delay.
        if guest.state != RuntimeState::Running {
            return Err(HvError::InvalidState { id, op: "hotplug", state: guest.state });
        }
        let refuse = |reason: String| HvError::Unsupported { op: "hotplug", backend: HypervisorKind::Sim, reason };
        let before = guest.config.spec.clone();
        let spec = &mut guest.config.spec;
        match change {
            crate::Hotplug::AddDisk { size } if size.bytes() == 0 => {
                return Err(refuse("a disk needs a size above zero".to_owned()));
            }
            crate::Hotplug::AddDisk { size } => spec.disks.push(drove_model::DiskSpec::qcow2(*size)),
            crate::Hotplug::AddNic { nic } if spec.nics.iter().any(|n| n.mac.eq_ignore_ascii_case(&nic.mac)) => {
                return Err(refuse(format!("the guest already has a NIC with MAC {}", nic.mac)));
            }
            crate::Hotplug::AddNic { nic } => spec.nics.push(nic.clone()),
            crate::Hotplug::SetVcpus { vcpus } if *vcpus < spec.vcpus => {
                return Err(refuse(format!(
                    "vCPUs can only be added while running, not removed: the guest has {}, {vcpus} asked",
                    spec.vcpus
                )));
            }
            crate::Hotplug::SetVcpus { vcpus } => spec.grow_vcpus_to(*vcpus),
            crate::Hotplug::SetMemory { memory } if *memory < spec.memory => {
                return Err(refuse(format!(
                    "memory can only be added while running, not removed: the guest has {}, {memory} asked",
                    spec.memory
                )));
            }
            crate::Hotplug::SetMemory { memory } => spec.grow_memory_to(*memory),
            crate::Hotplug::GrowDisk { index, .. } if let Some(why) = spec.grow_refusal(*index as usize) => {
                return Err(refuse(why));
            }
            crate::Hotplug::GrowDisk { index, size } => match spec.disks.get(*index as usize) {
                None => return Err(refuse(format!("the guest has no disk {index}"))),
                Some(d) if *size <= d.size => {
                    return Err(refuse(format!("disk {index} is {}; it can only grow, not to {size}", d.size)));
                }
                Some(_) => spec.grow_disk_to(*index as usize, *size),
            },
        }
        let saved = self.save(&inner, "hotplug");
        if saved.is_err() {
            // Never half-applied: not in memory if not on disk.
            if let Some(guest) = inner.guests.get_mut(&id) {
                guest.config.spec = before;
            }
        }
        saved
    }

    /// The definition of a Running guest; otherwise NotFound or
    /// InvalidState for `op`.
    fn running(&self, id: GuestId, op: &'static str) -> Result<GuestConfig, HvError> {
        let inner = self.lock();
        let guest = inner.guests.get(&id).ok_or(HvError::NotFound { id })?;
        match guest.state {
            RuntimeState::Running => Ok(guest.config.clone()),
            state => Err(HvError::InvalidState { id, op, state }),
        }
    }
}

/// Sleeps for `d`; zero does not touch the timer, whose resolution would
/// turn "instant" into a millisecond.
async fn wait(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

fn invalid(action: Action, id: GuestId, state: RuntimeState) -> HvError {
    HvError::InvalidState { id, op: action.name(), state }
}

/// Moves a guest to `to`, keeping its pid across pause/resume and giving it
/// a new one for each boot.
fn apply(guest: &mut SimGuest, to: RuntimeState, next_pid: &mut u32) {
    let from = guest.state;
    guest.pid = match to {
        RuntimeState::Running | RuntimeState::Paused => match guest.pid {
            Some(pid) => Some(pid),
            None => {
                let pid = *next_pid;
                *next_pid = next_pid.checked_add(1).unwrap_or(FIRST_PID);
                Some(pid)
            }
        },
        RuntimeState::Stopped | RuntimeState::Crashed => None,
    };
    guest.state = to;
    // A sent guest resumed (its target never ran it) or ended is out of
    // the migration.
    if guest.migration == Some(SimMigration::Sent) && to != RuntimeState::Paused {
        guest.migration = None;
    }
    tracing::debug!(guest = %guest.config.id, ?from, ?to, pid = ?guest.pid, "sim: transition");
}

/// Takes a repeated create's definition if it is newer. An older generation
/// is a stale request and never rolls the definition back. Returns whether
/// anything changed.
fn redefine(guest: &mut SimGuest, config: &GuestConfig) -> bool {
    if config.generation > guest.config.generation {
        guest.config = config.clone();
        true
    } else {
        false
    }
}

/// Refuses definitions QEMU would refuse, so that tests of the callers see
/// the same failure early.
fn validate(config: &GuestConfig) -> Result<(), HvError> {
    let reason = if config.spec.vcpus == 0 {
        "a guest needs at least one vCPU"
    } else if config.spec.memory.bytes() == 0 {
        "a guest needs some memory"
    } else {
        return Ok(());
    };
    Err(HvError::Backend { op: "create", id: config.id, source: reason.into() })
}

fn sorted_statuses(inner: &Inner) -> Vec<GuestStatus> {
    let mut list: Vec<GuestStatus> = inner.guests.values().map(SimGuest::status).collect();
    list.sort_by_key(|s| s.id);
    list
}

fn load_state(path: &Path, bytes: &[u8]) -> Result<(HashMap<GuestId, SimGuest>, u32), SimStateError> {
    let parse = |source| SimStateError::Parse { path: path.to_owned(), source };
    let header: StateHeader = serde_json::from_slice(bytes).map_err(parse)?;
    if header.format != STATE_FORMAT || header.version != STATE_VERSION {
        return Err(SimStateError::Unsupported {
            path: path.to_owned(),
            format: header.format,
            version: header.version,
        });
    }
    let file: StateFile = serde_json::from_slice(bytes).map_err(parse)?;
    let guests = file.guests.into_iter().map(|g| (g.config.id, g)).collect();
    Ok((guests, file.next_pid))
}

fn write_state(path: &Path, inner: &Inner) -> Result<(), SimStateError> {
    let mut guests: Vec<SimGuest> = inner.guests.values().cloned().collect();
    // Sorted, so that the file is stable and diffs between saves are small.
    guests.sort_by_key(|g| g.config.id);
    let file = StateFile { format: STATE_FORMAT.to_owned(), version: STATE_VERSION, next_pid: inner.next_pid, guests };
    let bytes =
        serde_json::to_vec_pretty(&file).map_err(|source| SimStateError::Encode { path: path.to_owned(), source })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write_err = |source| SimStateError::Write { path: path.to_owned(), source };
    std::fs::write(&tmp, bytes).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every action in every state has a decided outcome, and the outcomes
    /// match the diagram in the crate docs.
    #[test]
    fn transition_table_matches_the_diagram() {
        use RuntimeState::{Crashed, Paused, Running, Stopped};
        let table = [
            (Action::Start, [Step::Go(Running), Step::Stay, Step::Refuse, Step::Go(Running)]),
            (Action::Stop, [Step::Stay, Step::Go(Stopped), Step::Go(Stopped), Step::Go(Stopped)]),
            (Action::Pause, [Step::Refuse, Step::Go(Paused), Step::Refuse, Step::Refuse]),
            (Action::Resume, [Step::Refuse, Step::Refuse, Step::Go(Running), Step::Refuse]),
            (Action::Crash, [Step::Refuse, Step::Go(Crashed), Step::Go(Crashed), Step::Refuse]),
        ];
        for (action, expected) in table {
            for (from, want) in [Stopped, Running, Paused, Crashed].into_iter().zip(expected) {
                assert_eq!(action.step(from), want, "{action:?} from {from:?}");
            }
        }
    }

    #[tokio::test]
    async fn the_sim_agent_runs_its_fixed_commands_in_running_guests_only() {
        use crate::ExecRequest;
        let hv = SimHypervisor::new(SimConfig::instant());
        let mut g = sample_guest(1);
        g.spec.nics =
            vec![drove_model::NicSpec::new(drove_model::VlanTag::new(10).expect("a valid VLAN"), "52:54:00:AA:00:01")];
        hv.create(&g).await.expect("create");
        let echo = ExecRequest::new("/bin/echo", ["hello", "sim"]);
        assert!(matches!(hv.exec(g.id, &echo).await, Err(HvError::InvalidState { op: "exec", .. })));
        hv.start(g.id).await.expect("start");

        let out = hv.exec(g.id, &echo).await.expect("echo");
        assert_eq!((out.exit_code, out.stdout.as_slice()), (0, &b"hello sim\n"[..]));
        assert_eq!(hv.exec(g.id, &ExecRequest::new("false", [] as [&str; 0])).await.expect("false").exit_code, 1);
        let mut cat = ExecRequest::new("/usr/bin/cat", [] as [&str; 0]);
        cat.input = Some(b"in".to_vec());
        assert_eq!(hv.exec(g.id, &cat).await.expect("cat").stdout, b"in");
        let err = hv.exec(g.id, &ExecRequest::new("/bin/sh", ["-c", "true"])).await.expect_err("sh is not simulated");
        let source = std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default();
        assert!(source.contains("\"/bin/sh\"") && source.contains("echo"), "{source}");

        let names: Vec<(String, Option<String>, usize)> = hv
            .guest_interfaces(g.id)
            .await
            .expect("interfaces")
            .into_iter()
            .map(|i| (i.name, i.mac, i.addresses.len()))
            .collect();
        assert_eq!(
            names,
            [("lo".into(), Some("00:00:00:00:00:00".into()), 2), ("eth0".into(), Some("52:54:00:aa:00:01".into()), 0)]
        );
    }

    #[test]
    fn sim_op_indices_match_all() {
        for (i, op) in SimOp::ALL.into_iter().enumerate() {
            assert_eq!(op.index(), i, "{op}");
        }
    }
}
