//! The QEMU backend: one `qemu-system-x86_64` process per guest, driven over
//! QMP.
//!
//! # The idea
//!
//! The backend keeps no state of its own that matters: everything lives in
//! one directory per guest (layout in `guest_dir.rs`), and every call derives
//! the guest's state afresh from that directory and the QEMU process it
//! names. A new [`QemuHypervisor`] over the same `state_dir` (an agent
//! restart) therefore sees exactly what the old one saw, and re-adopts the
//! running QEMUs, which were daemonized and never were the agent's children.
//!
//! How a state is derived:
//!
//! | live QEMU in `qemu.pid`? | QMP `query-status`                  | `intent`  | state                  |
//! |--------------------------|-------------------------------------|-----------|------------------------|
//! | yes                      | `running`                           | any       | Running                |
//! | yes                      | `paused`, `inmigrate`, `io-error`.. | any       | Paused                 |
//! | yes                      | `guest-panicked`, `internal-error`  | any       | Crashed (with its pid) |
//! | yes                      | `shutdown`                          | any       | Stopped (QEMU is quit) |
//! | no                       | -                                   | `running` | Crashed                |
//! | no                       | -                                   | `stopped` | Stopped                |
//!
//! "Live QEMU" means: the pid is alive, not a zombie, and its command line
//! names this guest's QMP socket (pids get reused). `intent` is written
//! before we launch (`running`) and before we stop (`stopped`), so a QEMU
//! that is gone while we still wanted it running died on its own: Crashed. A
//! guest that powers itself off does not make QEMU exit (`-no-shutdown`);
//! QEMU waits in `shutdown`, which we observe, report as Stopped, and clean
//! up by quitting it. `cmdline.rs` explains the other choices on QEMU's
//! command line.
//!
//! # Concurrency
//!
//! Calls on one guest are serialised by a per-guest async mutex, which also
//! owns that guest's QMP connection (QEMU serves one QMP client at a time,
//! so the connection is kept, not reopened per call). Calls on different
//! guests run in parallel. `status` and `list` do not queue behind an
//! operation in progress (a graceful stop may take minutes): they answer
//! with the state last observed before it.
//!
//! # Stopping
//!
//! Graceful: `system_powerdown` (the ACPI power button), repeated every few
//! seconds because a guest still booting drops presses that arrive before
//! its button driver is loaded, until QEMU reports `shutdown` or exits; after
//! the timeout the guest is forced off. A paused guest is resumed first, or
//! it could not react. Forced: `quit`, then SIGKILL if QEMU does not exit.
//!
//! # NICs
//!
//! A NIC of the spec is attached only when a host tap for it exists, named
//! by [`QemuHypervisor::tap_name`]; creating and bridging taps is the
//! network layer's job. NICs without a tap are left out (logged).
//!
//! # Resource controls
//!
//! Each QEMU runs in a cgroup of its guest (CPU accounting, caps, shares,
//! pinning: `cgroup.rs`), with its NICs' taps capped by `tc` (`tc.rs`) and
//! its disks throttled by QEMU itself (`cmdline.rs`). `limits.rs` sets them
//! up around a start, changes them on a running guest, and removes them
//! whenever the guest is found without its QEMU, whoever ended it.
//!
//! # The guest image
//!
//! Guests boot the kernel and initramfs in [`QemuConfig::image_dir`], built
//! by `scripts/build-image.sh`, whose header documents the `drove.*` kernel
//! parameters its init understands; [`QemuConfig::extra_kernel_args`] passes
//! them.
//!
//! # Users' images
//!
//! A guest whose spec names a base image (`GuestSpec::image`, an absolute
//! path to a qcow2 file) boots it through the BIOS instead: `create` checks
//! the base (it exists, `qemu-img info` calls it qcow2) before it makes
//! anything, then makes disk 0 a qcow2 overlay backed by it, as large as the
//! spec's first disk if that is larger than the base. The base itself is
//! only ever read. A spec without disks gets disk 0 anyway (the boot disk):
//! the guest's record then lists it, at the base's size, so that hotplug
//! numbers further disks after it.
//!
//! # Hotplug
//!
//! Disks, NICs, vCPUs and memory can be added to a running guest within
//! the room it was started with; `hotplug.rs` explains how, what is
//! refused, and how a failed change is undone.
//!
//! # Clones
//!
//! A guest whose spec names a source (`clone_of`) gets its disks from that
//! guest: copies at one instant, or thin overlays on a template's disks;
//! `clone.rs` explains how.
//!
//! # Snapshots
//!
//! qcow2 internal snapshots in every disk, taken over QMP while QEMU runs
//! and with `qemu-img` while it does not; `snapshot.rs` explains how, and
//! how an interrupted snapshot is cleaned up.
//!
//! # Moving disks between pools
//!
//! A guest's disks move between the local pool and the shared one, live
//! under a running guest (a block mirror, then a switch); `storage.rs`
//! explains how, and where the commit point is.
//!
//! # Usage counters
//!
//! CPU, memory, NIC and disk counters per guest, from its cgroup, `/proc`,
//! its taps and QMP; `usage.rs` lists the sources.
//!
//! # The guest agent
//!
//! Every guest has a virtio-serial channel for a QEMU guest agent
//! (qemu-guest-agent in users' images, `drove-guest-agent` in the test
//! image); `exec` and `guest_interfaces` go through it. `qga.rs` explains the
//! protocol and how a connection gets in step with the agent.

mod accel;
pub mod cgroup;
mod clone;
mod cmdline;
mod config_drive;
mod console_watch;
mod error;
mod guest_dir;
mod hotplug;
mod limits;
mod migrate;
mod process;
pub mod qga;
pub mod qmp;
mod snapshot;
mod storage;
pub mod tc;
mod usage;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use drove_model::guest::Storage;
use drove_model::{ByteSize, DiskFormat, GuestId, HypervisorKind};
use tokio::sync::{Mutex as AsyncMutex, OnceCell};

pub use accel::{Accel, KVM_PROBE_TIMEOUT, probe_kvm};
pub use cmdline::{BootImage, ResolvedAccel, kernel_cmdline};
pub use error::QemuError;
pub use guest_dir::MAX_SOCKET_PATH;
use guest_dir::{GuestDir, Intent};
use qmp::{QmpClient, QmpError, QmpEvent};

use crate::{GuestConfig, GuestStatus, HostResources, HvError, Hypervisor, RuntimeState, StopMode};

/// The kernel file in an image directory made by `scripts/build-image.sh`.
pub const IMAGE_KERNEL: &str = "vmlinux";
/// The initramfs file in an image directory.
pub const IMAGE_INITRD: &str = "initramfs.cpio";

/// Bounds one QMP exchange (they take well under a millisecond).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds the daemonizing launcher: QEMU initialised, pid file written.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long QEMU gets to exit after `quit` before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGKILLed QEMU may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a graceful stop presses the power button again.
const POWERDOWN_REPEAT: Duration = Duration::from_secs(3);
/// How often a graceful stop looks whether the guest is off.
const POWERDOWN_POLL: Duration = Duration::from_millis(100);

/// Where and how the backend runs guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// Holds `guests/<id>/` per guest and the KVM probe cache. Must be on
    /// a path short enough for unix sockets (about 50 bytes at most).
    pub state_dir: PathBuf,
    /// The boot image: `vmlinux` and `initramfs.cpio`, as made by
    /// `scripts/build-image.sh`.
    pub image_dir: PathBuf,
    /// Cores offered to guests.
    pub cores: u32,
    /// Memory offered to guests.
    pub memory: ByteSize,
    pub accel: Accel,
    pub qemu_binary: PathBuf,
    pub qemu_img: PathBuf,
    /// Appended to every guest's kernel command line.
    pub extra_kernel_args: Vec<String>,
    /// Tells this backend's guest cgroups apart from another backend's on
    /// the same machine (`drove/<scope>.<guest-id>`): several lab hosts
    /// share one kernel, and a migrating guest has a QEMU on two of them.
    /// `None` (one backend per machine): `drove/<guest-id>`.
    pub cgroup_scope: Option<String>,
    /// The shared storage pool: a directory every host sees (NFS or a SAN
    /// in production), holding `<guest-id>/disk<N>.qcow2` of guests whose
    /// spec asks for shared storage. `None`: this host has no shared pool
    /// and refuses such guests.
    pub shared_dir: Option<PathBuf>,
}

impl QemuConfig {
    /// A config offering the whole host (from `/proc/cpuinfo` and
    /// `/proc/meminfo`), with `Accel::Auto` and the QEMU binaries on `PATH`.
    pub fn new(state_dir: impl Into<PathBuf>, image_dir: impl Into<PathBuf>) -> Result<Self, HvError> {
        let host = host_resources().map_err(|e| HvError::Host { op: "resources", source: Box::new(e) })?;
        Ok(Self {
            state_dir: state_dir.into(),
            image_dir: image_dir.into(),
            cores: host.cores,
            memory: host.memory,
            accel: Accel::Auto,
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            extra_kernel_args: Vec::new(),
            cgroup_scope: None,
            shared_dir: None,
        })
    }

    /// Where `scripts/build-image.sh` puts the image by default:
    /// `${XDG_CACHE_HOME:-$HOME/.cache}/drove/image`.
    pub fn default_image_dir() -> Option<PathBuf> {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(cache.join("drove").join("image"))
    }

    pub fn boot_image(&self) -> BootImage {
        BootImage { kernel: self.image_dir.join(IMAGE_KERNEL), initrd: self.image_dir.join(IMAGE_INITRD) }
    }
}

/// The host's cores (`processor` lines of `/proc/cpuinfo`) and memory
/// (`MemTotal` of `/proc/meminfo`).
pub fn host_resources() -> Result<HostResources, QemuError> {
    let cpuinfo_path = Path::new("/proc/cpuinfo");
    let cpuinfo = std::fs::read_to_string(cpuinfo_path).map_err(|e| QemuError::io("reading", cpuinfo_path, e))?;
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let meminfo_path = Path::new("/proc/meminfo");
    let meminfo = std::fs::read_to_string(meminfo_path).map_err(|e| QemuError::io("reading", meminfo_path, e))?;
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    match (u32::try_from(cores), mem_kib) {
        (Ok(cores), Some(kib)) if cores > 0 => Ok(HostResources { cores, memory: ByteSize(kib * 1024) }),
        (_, Some(_)) => Err(QemuError::HostInfo { what: "processors", path: cpuinfo_path.into() }),
        (_, None) => Err(QemuError::HostInfo { what: "MemTotal", path: meminfo_path.into() }),
    }
}

/// The QEMU backend. Cheap to clone; clones share guests' QMP connections.
#[derive(Clone)]
pub struct QemuHypervisor {
    inner: Arc<Inner>,
}

struct Inner {
    config: QemuConfig,
    guests_dir: PathBuf,
    guests: std::sync::Mutex<HashMap<GuestId, Arc<GuestHandle>>>,
    accel: OnceCell<ResolvedAccel>,
    /// `qemu-system-x86_64 --version`, asked once; `None` if it said
    /// nothing we could read.
    qemu_version: OnceCell<Option<QemuVersion>>,
}

/// A QEMU release, as `--version` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
}

impl QemuVersion {
    /// The oldest QEMU whose TCG live migration keeps a busy guest's memory
    /// intact in our tests: 7.2 lost guest writes in about one migration in
    /// seven (docs/adr/0014-qemu-10.md).
    pub const TCG_MIGRATION_MIN: QemuVersion = QemuVersion { major: 10, minor: 0 };

    /// From the first line of `--version`: "QEMU emulator version 10.0.2 (...)".
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.lines().next()?.split("version ").nth(1)?;
        let mut parts = rest.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Self { major, minor })
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Per guest, in memory only.
#[derive(Default)]
struct GuestHandle {
    /// Serialises the calls on the guest and owns its QMP connection.
    ops: AsyncMutex<Slot>,
    /// What `status` last observed, cleared whenever an operation ends. A
    /// reader that finds an operation in progress answers from it instead of
    /// waiting: `list` must not stall for the length of a graceful stop.
    seen: std::sync::Mutex<Option<Observed>>,
    /// The guest agent connection, with the QEMU pid it belongs to; apart
    /// from `ops` so that a long `exec` does not hold up lifecycle calls.
    qga: AsyncMutex<Option<(u32, qga::QgaClient)>>,
    /// Set by `migrate_cancel` to make a running `migrate_out` give up.
    cancel_migration: std::sync::atomic::AtomicBool,
}

type Observed = (RuntimeState, Option<u32>);

/// The QMP connection to the guest's current QEMU, tagged with its pid so a
/// new incarnation gets a new connection.
#[derive(Default)]
struct Slot {
    qmp: Option<(u32, QmpClient)>,
    /// The console's writes, watched while the guest migrates in.
    console: Option<console_watch::ConsoleWatch>,
}

impl GuestHandle {
    /// Locks the guest for an operation that may change its state.
    async fn change(&self) -> Change<'_> {
        Change { slot: self.ops.lock().await, seen: &self.seen }
    }

    fn seen(&self) -> Option<Observed> {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remember(&self, observed: Observed) {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(observed);
    }
}

/// The lock of an operation; when it ends, earlier observations are stale.
struct Change<'a> {
    slot: tokio::sync::MutexGuard<'a, Slot>,
    seen: &'a std::sync::Mutex<Option<Observed>>,
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl std::ops::Deref for Change<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        &self.slot
    }
}

impl std::ops::DerefMut for Change<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        &mut self.slot
    }
}

impl fmt::Debug for QemuHypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuHypervisor")
            .field("state_dir", &self.inner.config.state_dir)
            .field("image_dir", &self.inner.config.image_dir)
            .field("accel", &self.inner.accel.get())
            .finish_non_exhaustive()
    }
}

impl QemuHypervisor {
    /// Opens (creating if needed) the state directory. Guests found there
    /// are adopted as they are; nothing is started or stopped.
    pub fn new(mut config: QemuConfig) -> Result<Self, HvError> {
        let host = |source: QemuError| HvError::Host { op: "open", source: Box::new(source) };
        let guests_dir = config.state_dir.join("guests");
        std::fs::create_dir_all(&guests_dir).map_err(|e| host(QemuError::io("creating", &guests_dir, e)))?;
        // QEMU chdirs to / when it daemonizes: every path we hand it must be
        // absolute.
        config.state_dir = std::path::absolute(&config.state_dir)
            .map_err(|e| host(QemuError::io("resolving", &config.state_dir, e)))?;
        config.image_dir = std::path::absolute(&config.image_dir)
            .map_err(|e| host(QemuError::io("resolving", &config.image_dir, e)))?;
        let guests_dir = config.state_dir.join("guests");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                guests_dir,
                guests: std::sync::Mutex::new(HashMap::new()),
                accel: OnceCell::new(),
                qemu_version: OnceCell::new(),
            }),
        })
    }

    pub fn config(&self) -> &QemuConfig {
        &self.inner.config
    }

    /// The guest's directory (which exists only while it is defined).
    pub fn guest_dir(&self, id: GuestId) -> PathBuf {
        self.dir(id).root().to_owned()
    }

    /// Everything the guest wrote to its serial console, across boots.
    pub fn serial_log_path(&self, id: GuestId) -> PathBuf {
        self.dir(id).serial_log_path()
    }

    /// The guest's serial console as a unix stream socket, while it runs.
    pub fn console_socket_path(&self, id: GuestId) -> PathBuf {
        self.dir(id).console_path()
    }

    /// The guest's QMP socket. The backend keeps it connected; a second
    /// client waits until the backend lets go.
    pub fn qmp_socket_path(&self, id: GuestId) -> PathBuf {
        self.dir(id).qmp_path()
    }

    /// The host tap a guest's `index`-th NIC is attached to, if the network
    /// layer created it before `start`. At most 15 bytes (IFNAMSIZ).
    pub fn tap_name(id: GuestId, index: usize) -> String {
        let hex = id.as_uuid().simple().to_string();
        format!("dv{}{index}", &hex[..10])
    }

    /// The accelerator guests run with, probing KVM on first use when the
    /// config says `Auto` (see [`Accel::Auto`]).
    pub async fn accel(&self) -> ResolvedAccel {
        let c = &self.inner.config;
        let image = c.boot_image();
        *self.inner.accel.get_or_init(|| accel::resolve(c.accel, &c.qemu_binary, &image, &c.state_dir)).await
    }

    /// The QEMU release guests run on, asked on first use.
    pub async fn qemu_version(&self) -> Option<QemuVersion> {
        let qemu = &self.inner.config.qemu_binary;
        *self
            .inner
            .qemu_version
            .get_or_init(|| async {
                let out = tokio::process::Command::new(qemu).arg("--version").output().await.ok()?;
                QemuVersion::parse(&String::from_utf8_lossy(&out.stdout))
            })
            .await
    }

    /// QMP events seen on the guest's connection since the last call
    /// (`SHUTDOWN`, `STOP`, `RESUME`, `POWERDOWN`, ...), oldest first.
    pub async fn take_events(&self, id: GuestId) -> Vec<QmpEvent> {
        let guest = self.guest(id);
        let mut slot = guest.ops.lock().await;
        slot.qmp.as_mut().map(|(_, c)| c.take_events()).unwrap_or_default()
    }

    /// Runs one QMP command on the guest's running QEMU, over the
    /// backend's own connection, and returns its `return` value. For
    /// inspection (`query-block`, `query-hotpluggable-cpus`, ...) by tests
    /// and operators; changing the guest this way bypasses its record.
    pub async fn qmp_execute(
        &self,
        id: GuestId,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, HvError> {
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        self.record(&dir, id, "qmp")?;
        let (state, pid) = self.observe(&dir, &mut slot).await.map_err(backend("qmp", id))?;
        let Some(pid) = pid else { return Err(HvError::InvalidState { id, op: "qmp", state }) };
        slot.execute(&dir, pid, command, arguments).await.map_err(backend("qmp", id))
    }

    fn dir(&self, id: GuestId) -> GuestDir {
        GuestDir::new(&self.inner.guests_dir, id).with_cgroup_scope(self.inner.config.cgroup_scope.as_deref())
    }

    fn guest(&self, id: GuestId) -> Arc<GuestHandle> {
        let mut guests = self.inner.guests.lock().unwrap_or_else(PoisonError::into_inner);
        guests.entry(id).or_default().clone()
    }

    /// Ends the guest's QEMU and removes what this host holds of it; its
    /// disks on the shared pool too only with `shared_disks`.
    async fn remove(&self, id: GuestId, op: &'static str, shared_disks: bool) -> Result<(), HvError> {
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        // Works from the pid file alone, so that even a guest whose record
        // is unreadable can be removed.
        if let Some(pid) = live_pid(&dir) {
            dir.write_intent(Intent::Stopped).map_err(backend(op, id))?;
            terminate(&dir, &mut slot, pid).await.map_err(backend(op, id))?;
        }
        // Also after a crash that nobody observed. Before the directory
        // goes, so that a failure leaves a guest to remove again.
        limits::release(&dir).await.map_err(backend(op, id))?;
        let remove_tree = |path: &Path| match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(backend(op, id)(QemuError::io("removing", path, e)))
            }
            _ => Ok(()),
        };
        if shared_disks && let Ok(pool_dir) = std::fs::read_link(dir.shared_link()) {
            remove_tree(&pool_dir)?;
        }
        // remove_dir_all does not follow the `shared` link.
        remove_tree(dir.root())?;
        // An incoming copy's console watch ends with the copy.
        slot.console = None;
        drop(slot);
        self.drop_handle(id, &guest);
        Ok(())
    }

    /// Forgets a removed guest's handle unless another call is waiting on
    /// it (that call will find the guest gone and say NotFound).
    fn drop_handle(&self, id: GuestId, guest: &Arc<GuestHandle>) {
        let mut guests = self.inner.guests.lock().unwrap_or_else(PoisonError::into_inner);
        // Ours and the map's: nobody else holds it, and nobody can take it
        // while we hold the map lock.
        if Arc::strong_count(guest) == 2 {
            guests.remove(&id);
        }
    }

    /// The guest's definition, or NotFound.
    fn record(&self, dir: &GuestDir, id: GuestId, op: &'static str) -> Result<GuestConfig, HvError> {
        match dir.read_record() {
            Ok(Some(config)) => Ok(config),
            Ok(None) => Err(HvError::NotFound { id }),
            Err(e) => Err(backend(op, id)(e)),
        }
    }

    /// Derives the guest's state; see the table in the module docs.
    async fn observe(&self, dir: &GuestDir, slot: &mut Slot) -> Result<(RuntimeState, Option<u32>), QemuError> {
        let intent = dir.read_intent()?;
        let down = |slot: &mut Slot| {
            slot.qmp = None;
            let state = match intent {
                Intent::Running => RuntimeState::Crashed,
                Intent::Stopped => RuntimeState::Stopped,
            };
            (state, None)
        };
        let Some(pid) = live_pid(dir) else {
            // Whatever ended it (a crash, a failed start, a dead agent)
            // left its cgroup and NIC limits: gone with it.
            limits::release_leftovers(dir).await;
            return Ok(down(slot));
        };
        let status = match slot.query_status(dir, pid).await {
            Ok(s) => s,
            // It may have died between the liveness check and the query.
            Err(_) if !process::is_alive(pid) => {
                limits::release_leftovers(dir).await;
                return Ok(down(slot));
            }
            Err(e) => return Err(e),
        };
        let state = match status.as_str() {
            "running" => RuntimeState::Running,
            "guest-panicked" | "internal-error" => RuntimeState::Crashed,
            "shutdown" => {
                // The guest powered itself off; QEMU only waits for us.
                tracing::info!(guest = %dir.root().display(), "guest powered off; quitting its QEMU");
                dir.write_intent(Intent::Stopped)?;
                terminate(dir, slot, pid).await?;
                return Ok((RuntimeState::Stopped, None));
            }
            // paused, suspended, inmigrate, postmigrate, io-error, watchdog,
            // prelaunch, finish-migrate, save-vm, restore-vm, colo, debug:
            // alive, not executing the guest.
            _ => RuntimeState::Paused,
        };
        Ok((state, Some(pid)))
    }

    /// Observes under the guest's lock and remembers the result for readers
    /// that come while an operation holds the lock.
    async fn observe_and_remember(
        &self,
        guest: &GuestHandle,
        dir: &GuestDir,
        slot: &mut Slot,
    ) -> Result<Observed, QemuError> {
        let observed = self.observe(dir, slot).await?;
        guest.remember(observed);
        Ok(observed)
    }

    /// Boots the guest, or with `incoming` starts its QEMU waiting for a
    /// migration stream (`-incoming defer`).
    async fn launch(
        &self,
        dir: &GuestDir,
        slot: &mut Slot,
        config: &GuestConfig,
        incoming: bool,
    ) -> Result<(), QemuError> {
        let c = &self.inner.config;
        let image = c.boot_image();
        match &config.spec.image {
            // The overlay names its base: QEMU would fail on a missing one
            // too, but less clearly.
            Some(base) if !Path::new(base).is_file() => {
                return Err(QemuError::BaseImage { path: base.into(), reason: "the file does not exist".into() });
            }
            Some(_) => {}
            None => {
                for path in [&image.kernel, &image.initrd] {
                    if !path.is_file() {
                        return Err(QemuError::ImageMissing { path: path.clone() });
                    }
                }
            }
        }
        dir.check_socket_paths()?;
        let accel = self.accel().await;
        let taps: Vec<Option<String>> = (0..config.spec.nics.len())
            .map(|i| {
                let name = Self::tap_name(config.id, i);
                if drove_net::cmd::device_exists(&name) {
                    Some(name)
                } else {
                    tracing::warn!(guest = %config.id, nic = i, tap = %name, "no such tap; NIC left out");
                    None
                }
            })
            .collect();

        dir.clear_runtime_files()?;
        if config.spec.image.is_some() {
            config_drive::write(dir, config).await?;
        }
        let previous = dir.read_intent()?;
        // Before the process exists: if we die right after launching it, the
        // next agent must see a guest meant to run.
        dir.write_intent(Intent::Running)?;
        dir.mark_serial_log(&format!("starting guest {} generation {} ({accel:?})", config.id, config.generation))?;

        let launch = cmdline::Launch {
            config,
            dir,
            image: &image,
            accel,
            taps: &taps,
            incoming,
            extra_kernel_args: &self.inner.config.extra_kernel_args,
            host: HostResources { cores: self.inner.config.cores, memory: self.inner.config.memory },
        };
        let launched = match limits::before_launch(config, dir, &taps).await {
            Ok(applied) => match self.spawn_and_connect(slot, &launch).await {
                // At once: the guest runs outside its cgroup until then.
                Ok(()) => dir.read_pid().map_or(Ok(()), |pid| applied.attach(pid)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = launched {
            // Leave no half-started QEMU behind, and the intent as it was: a
            // failed start does not turn a Stopped guest into a Crashed one.
            if let Some(pid) = live_pid(dir)
                && let Err(kill_err) = process::kill_and_wait(pid, KILL_TIMEOUT).await
            {
                tracing::error!(error = %kill_err, "cannot kill the QEMU of a failed start");
            }
            slot.qmp = None;
            limits::release_or_log(dir).await;
            dir.clear_runtime_files()?;
            dir.write_intent(previous)?;
            return Err(e);
        }
        Ok(())
    }

    async fn spawn_and_connect(&self, slot: &mut Slot, launch: &cmdline::Launch<'_>) -> Result<(), QemuError> {
        let c = &self.inner.config;
        let (config, dir, accel, incoming) = (launch.config, launch.dir, launch.accel, launch.incoming);
        let args = cmdline::qemu_args(launch);
        let program = c.qemu_binary.to_string_lossy().into_owned();
        tracing::debug!(guest = %config.id, ?args, "launching QEMU");
        // QEMU truncates its log: keep the last start's, which says why it
        // ended (a restart after a crash would otherwise erase the reason).
        let log = dir.qemu_log_path();
        if log.exists()
            && let Err(e) = std::fs::rename(&log, dir.previous_qemu_log_path())
        {
            tracing::warn!(guest = %config.id, error = %e, "cannot keep the previous QEMU log");
        }
        let mut cmd = tokio::process::Command::new(&c.qemu_binary);
        if cmdline::without_huge_pages(launch) {
            // SAFETY: the closure runs between fork and exec; it makes one
            // prctl system call and touches no memory of the parent.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(|| rustix::thread::disable_transparent_huge_pages(true).map_err(std::io::Error::from));
            }
        }
        let launcher = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // The launcher only; the daemonized QEMU is another process.
            .kill_on_drop(true)
            .output();
        let what = format!("launch of guest {}", config.id);
        let output = tokio::time::timeout(LAUNCH_TIMEOUT, launcher)
            .await
            .map_err(|_| QemuError::Timeout { what: what.clone(), after: LAUNCH_TIMEOUT })?
            .map_err(|source| QemuError::Spawn { program: program.clone(), source })?;
        if !output.status.success() {
            let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            if stderr.is_empty() {
                let logged = crate::tail_file(&log, 4096).await.unwrap_or_default();
                stderr = String::from_utf8_lossy(&logged).trim().to_owned();
            }
            return Err(QemuError::CommandFailed { program, what, status: output.status, stderr });
        }
        let pid_path = dir.pid_path();
        let Some(pid) = dir.read_pid() else {
            let content = std::fs::read_to_string(&pid_path).unwrap_or_default();
            return Err(QemuError::PidFile { path: pid_path, content });
        };
        // -daemonize returns once QEMU is initialised, so its QMP socket
        // listens already; the query confirms the guest executes.
        let status = slot.query_status(dir, pid).await?;
        let expected = if incoming { "inmigrate" } else { "running" };
        if status != expected {
            return Err(QemuError::UnexpectedRunState { status, after: "launch" });
        }
        tracing::info!(guest = %config.id, pid, ?accel, "guest started");
        Ok(())
    }

    /// Presses the power button until the guest is off or `timeout` passes.
    /// Returns whether it went off.
    async fn power_down(&self, dir: &GuestDir, slot: &mut Slot, pid: u32, paused: bool, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        if paused {
            // A paused guest cannot see the button.
            if let Err(e) = slot.execute(dir, pid, "cont", None).await {
                tracing::warn!(error = %e, "cannot resume a paused guest for its graceful stop");
            }
        }
        loop {
            if let Err(e) = slot.execute(dir, pid, "system_powerdown", None).await {
                if !process::is_alive(pid) {
                    return true;
                }
                tracing::warn!(error = %e, "system_powerdown failed");
            }
            let next_press = tokio::time::Instant::now() + POWERDOWN_REPEAT;
            while tokio::time::Instant::now() < next_press.min(deadline) {
                tokio::time::sleep(POWERDOWN_POLL).await;
                if !process::is_alive(pid) {
                    return true;
                }
                match slot.query_status(dir, pid).await {
                    Ok(status) if status == "shutdown" => return true,
                    Ok(_) => {}
                    Err(_) if !process::is_alive(pid) => return true,
                    Err(e) => tracing::warn!(error = %e, "query-status failed during a graceful stop"),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
        }
    }
}

/// The pid in the guest's pid file, if it is a live QEMU of this guest.
/// Has a guest that runs again where it was (a migration rolled back after
/// its target briefly ran it) tell the network it is here: switches and
/// VXLAN peers may have learned its MACs at the other host.
async fn announce(dir: &GuestDir, slot: &mut Slot, pid: u32) {
    if dir.read_record().ok().flatten().is_none_or(|c| c.spec.nics.is_empty()) {
        return;
    }
    let rounds = serde_json::json!({ "initial": 50, "max": 550, "rounds": 5, "step": 100 });
    if let Err(e) = slot.execute(dir, pid, "announce-self", Some(rounds)).await {
        tracing::debug!(guest = %dir.id(), error = %e, "cannot announce the guest's NICs");
    }
}

fn live_pid(dir: &GuestDir) -> Option<u32> {
    dir.read_pid().filter(|&pid| process::is_guest_process(pid, &dir.qmp_path()))
}

/// Makes the QEMU `pid` exit: `quit`, then SIGKILL. Clears the runtime files.
async fn terminate(dir: &GuestDir, slot: &mut Slot, pid: u32) -> Result<(), QemuError> {
    match slot.execute(dir, pid, "quit", None).await {
        Ok(_) => {}
        // QEMU may close the connection before the reply gets out.
        Err(QemuError::Qmp { source: QmpError::Closed { .. }, .. }) => {}
        Err(e) => tracing::warn!(pid, error = %e, "quit failed; killing QEMU"),
    }
    slot.qmp = None;
    if !process::wait_gone(pid, QUIT_TIMEOUT).await {
        tracing::warn!(pid, "QEMU did not exit after quit; killing it");
        process::kill_and_wait(pid, KILL_TIMEOUT).await?;
    }
    dir.clear_runtime_files()?;
    limits::release(dir).await
}

impl Slot {
    async fn client(&mut self, dir: &GuestDir, pid: u32) -> Result<&mut QmpClient, QemuError> {
        if self.qmp.as_ref().is_some_and(|(p, _)| *p != pid) {
            self.qmp = None;
        }
        if self.qmp.is_none() {
            let socket = dir.qmp_path();
            let client = QmpClient::connect(&socket, QMP_TIMEOUT).await.map_err(|source| QemuError::Qmp {
                pid,
                socket,
                source,
            })?;
            self.qmp = Some((pid, client));
        }
        match self.qmp.as_mut() {
            Some((_, client)) => Ok(client),
            None => unreachable!("connected just above"),
        }
    }

    /// Runs a QMP command on the guest's QEMU `pid`, connecting if needed.
    /// After any failure the connection is dropped, to be made anew.
    async fn execute(
        &mut self,
        dir: &GuestDir,
        pid: u32,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QemuError> {
        let result = match self.client(dir, pid).await {
            Ok(client) => client.execute(command, arguments).await.map_err(|source| QemuError::Qmp {
                pid,
                socket: dir.qmp_path(),
                source,
            }),
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.qmp = None;
        }
        result
    }

    async fn query_status(&mut self, dir: &GuestDir, pid: u32) -> Result<String, QemuError> {
        let reply = self.execute(dir, pid, "query-status", None).await?;
        Ok(reply.get("status").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned())
    }
}

/// Checks that `base` can back a guest's boot disk: an absolute path to an
/// existing file that `qemu-img info` (probing, not told the format) calls
/// qcow2. Returns its virtual size.
async fn check_base_image(qemu_img: &Path, base: &Path) -> Result<ByteSize, QemuError> {
    let refuse = |reason: String| QemuError::BaseImage { path: base.to_owned(), reason };
    if !base.is_absolute() {
        return Err(refuse("the path is not absolute".into()));
    }
    match std::fs::metadata(base) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(refuse("not a regular file".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(refuse("the file does not exist".into())),
        Err(e) => return Err(refuse(format!("cannot read it: {e}"))),
    }
    let program = || qemu_img.to_string_lossy().into_owned();
    // --force-share: other guests may be running from the same base.
    let output = tokio::process::Command::new(qemu_img)
        .args(["info", "--output=json", "--force-share"])
        .arg(base)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| QemuError::Spawn { program: program(), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(refuse(format!("qemu-img info failed: {stderr}")));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| refuse(format!("qemu-img info gave no JSON ({e})")))?;
    let format = info.get("format").and_then(serde_json::Value::as_str).unwrap_or("unknown");
    if format != "qcow2" {
        return Err(refuse(format!(
            "unknown format: qemu-img detects {format:?}, and only qcow2 images are supported"
        )));
    }
    match info.get("virtual-size").and_then(serde_json::Value::as_u64) {
        Some(size) if size > 0 => Ok(ByteSize(size)),
        _ => Err(refuse("qemu-img info reports no virtual size".into())),
    }
}

/// `qemu-img create -q -f FORMAT [-b BASE -F BASE_FORMAT] TMP [SIZE]` into
/// a sibling of `path`, renamed into place once made: an interrupted create
/// never leaves a half-made disk that looks finished. `size` is left out
/// for an overlay that keeps its base's size.
async fn qemu_img_create(
    qemu_img: &Path,
    path: &Path,
    format: &str,
    backing: Option<(&Path, &str)>,
    size: Option<ByteSize>,
) -> Result<(), QemuError> {
    let tmp = path.with_extension(format!("{format}.tmp"));
    let program = || qemu_img.to_string_lossy().into_owned();
    let mut command = tokio::process::Command::new(qemu_img);
    command.args(["create", "-q", "-f", format]);
    if let Some((base, base_format)) = backing {
        command.arg("-b").arg(base).args(["-F", base_format]);
    }
    command.arg(&tmp);
    if let Some(size) = size {
        command.arg(size.bytes().to_string());
    }
    let output = command
        .stdin(Stdio::null())
        // Cancelled, it must not go on writing the temporary file.
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| QemuError::Spawn { program: program(), source })?;
    if !output.status.success() {
        // qemu-img may have left part of the image.
        let _ = std::fs::remove_file(&tmp);
        let what = match (backing, size) {
            (Some((base, _)), _) => format!("create of overlay {} over {}", tmp.display(), base.display()),
            (None, Some(size)) => format!("create of {format} {} ({size})", tmp.display()),
            (None, None) => format!("create of {format} {}", tmp.display()),
        };
        return Err(QemuError::CommandFailed {
            program: program(),
            what,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    std::fs::rename(&tmp, path).map_err(|e| QemuError::io("renaming into place", path, e))
}

/// Creates a qcow2 image of `size` at `path`, replacing any file there:
/// empty, or an overlay of the qcow2 image `backing` (`size` is then given
/// only when it is larger than the base's `backing.1`).
async fn create_qcow2(
    qemu_img: &Path,
    path: &Path,
    size: ByteSize,
    backing: Option<(&Path, ByteSize)>,
) -> Result<(), QemuError> {
    let grow = backing.is_none_or(|(_, base_size)| size > base_size);
    qemu_img_create(qemu_img, path, "qcow2", backing.map(|(base, _)| (base, "qcow2")), grow.then_some(size)).await
}

/// Creates a qcow2 overlay at `path` over the disk file `base` of `of`
/// (qcow2 or raw: the backing format is said, never probed).
async fn create_overlay(
    qemu_img: &Path,
    path: &Path,
    size: ByteSize,
    base: &Path,
    of: &drove_model::DiskSpec,
) -> Result<(), QemuError> {
    let grow = (size > of.size).then_some(size);
    qemu_img_create(qemu_img, path, "qcow2", Some((base, of.format.as_str())), grow).await
}

/// Creates the file of a disk of `format` (qcow2 or raw) at `path`. A raw
/// file is sparse (`qemu-img create -f raw`): it takes what the guest
/// writes, and the pool's free space must cover its size.
async fn create_disk_file(
    qemu_img: &Path,
    path: &Path,
    format: DiskFormat,
    size: ByteSize,
    backing: Option<(&Path, ByteSize)>,
) -> Result<(), QemuError> {
    match format {
        DiskFormat::Qcow2 => create_qcow2(qemu_img, path, size, backing).await,
        DiskFormat::Raw | DiskFormat::Block => qemu_img_create(qemu_img, path, "raw", None, Some(size)).await,
    }
}

/// The size of the host block device at `path`, or why it cannot be a
/// guest's disk (missing, not a block device, unreadable).
fn block_device_size(path: &Path) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("block device {} is not there: {e}", path.display()))?;
    if !meta.file_type().is_block_device() {
        return Err(format!("{} is not a block device", path.display()));
    }
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("block device {} cannot be opened: {e}", path.display()))?;
    let size = f.seek(SeekFrom::End(0)).map_err(|e| format!("size of block device {}: {e}", path.display()))?;
    if size == 0 {
        return Err(format!("block device {} has no size (an empty loop device or drive?)", path.display()));
    }
    Ok(size)
}

fn backend(op: &'static str, id: GuestId) -> impl FnOnce(QemuError) -> HvError {
    move |e| HvError::Backend { op, id, source: Box::new(e) }
}

impl QemuHypervisor {
    /// The guest's status; a guest busy with an operation is as last seen
    /// by this process, else waited for — unless `wait` is false and it has
    /// no QEMU yet (its first start is under way): that is stopped, and
    /// truly so. (Not seen yet is not new: a handle nobody holds is dropped,
    /// its memory of the guest with it.)
    async fn status_inner(&self, id: GuestId, wait: bool) -> Result<GuestStatus, HvError> {
        let guest = self.guest(id);
        let dir = self.dir(id);
        let config = self.record(&dir, id, "status")?;
        let (state, pid) = match guest.ops.try_lock() {
            Ok(mut slot) => self.observe_and_remember(&guest, &dir, &mut slot).await,
            Err(_) => match guest.seen() {
                // Busy with an operation: as far as anyone knows, the guest
                // is still as last seen.
                Some(seen) => Ok(seen),
                None if !wait && live_pid(&dir).is_none() => Ok((RuntimeState::Stopped, None)),
                None => {
                    let mut slot = guest.ops.lock().await;
                    self.observe_and_remember(&guest, &dir, &mut slot).await
                }
            },
        }
        .map_err(backend("status", id))?;
        Ok(GuestStatus { id, state, generation: config.generation, pid })
    }
}

#[async_trait::async_trait]
impl Hypervisor for QemuHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    fn nic_device(&self, id: GuestId, index: usize) -> Option<String> {
        Some(Self::tap_name(id, index))
    }

    async fn resources(&self) -> Result<HostResources, HvError> {
        // An agent asks first thing: the KVM probe (a boot of the test
        // kernel, seconds on a busy machine) runs now rather than delaying
        // the first guest this host starts — a failover's restarts above all.
        self.accel().await;
        let c = &self.inner.config;
        Ok(HostResources { cores: c.cores, memory: c.memory })
    }

    async fn pools(&self) -> Result<Vec<crate::PoolSpace>, HvError> {
        let c = &self.inner.config;
        let mut pools = Vec::new();
        // The local pool is the filesystem of the state directory (each
        // guest's own disks live in its directory there).
        let dirs = [("local", Some(&c.state_dir)), ("shared", c.shared_dir.as_ref())];
        for (name, dir) in dirs {
            let Some(dir) = dir else { continue };
            let fs = rustix::fs::statvfs(dir.as_path()).map_err(|e| HvError::Host {
                op: "pools",
                source: Box::new(QemuError::io("measuring the pool at", dir, e.into())),
            })?;
            pools.push(crate::PoolSpace {
                name: name.into(),
                capacity: ByteSize(fs.f_blocks.saturating_mul(fs.f_frsize)),
                free: ByteSize(fs.f_bavail.saturating_mul(fs.f_frsize)),
            });
        }
        Ok(pools)
    }

    async fn create(&self, config: &GuestConfig) -> Result<(), HvError> {
        let id = config.id;
        let guest = self.guest(id);
        let _change = guest.change().await;
        let dir = self.dir(id);
        dir.check_socket_paths().map_err(backend("create", id))?;
        if let Some(mut existing) = dir.read_record().map_err(backend("create", id))? {
            // Defined already: leave it as it is but for the generation.
            if existing.generation != config.generation {
                existing.generation = config.generation;
                dir.write_record(&existing).map_err(backend("create", id))?;
            }
            return Ok(());
        }
        crate::check_disks(id, &config.spec)?;
        let qemu_img = &self.inner.config.qemu_img;
        let shared = match config.spec.storage {
            Storage::Local => None,
            Storage::Shared => Some(self.inner.config.shared_dir.clone().ok_or_else(|| HvError::Unsupported {
                op: "create",
                backend: HypervisorKind::Qemu,
                reason: format!("guest {id} asks for shared storage and this host has no shared pool"),
            })?),
        };
        // Before anything is made: a bad base leaves nothing behind.
        let mut config = config.clone();
        let base = match config.spec.image.clone() {
            Some(base) => {
                let base = PathBuf::from(base);
                let base_size = check_base_image(qemu_img, &base).await.map_err(backend("create", id))?;
                // Disk 0 is the boot disk, at least as large as the base.
                match config.spec.disks.first_mut() {
                    Some(disk) => disk.size = disk.size.max(base_size),
                    None => config.spec.disks.push(drove_model::DiskSpec::qcow2(base_size)),
                }
                Some((base, base_size))
            }
            None => None,
        };
        // Block devices are checked, never made: each must be there and its
        // size is the device's.
        for (i, disk) in config.spec.disks.iter_mut().enumerate() {
            let Some(path) = disk.block_path() else { continue };
            let size = block_device_size(Path::new(path)).map_err(|reason| HvError::DiskKind {
                id,
                op: "create",
                reason: format!("disk {i}: {reason}"),
            })?;
            if disk.size.bytes() != 0 && disk.size.bytes() != size {
                return Err(HvError::DiskKind {
                    id,
                    op: "create",
                    reason: format!(
                        "disk {i} is given as {} but block device {path} has {} (leave the size out: it is the \
                         device's)",
                        disk.size,
                        ByteSize(size)
                    ),
                });
            }
            disk.size = ByteSize(size);
        }
        let created_dir = !dir.root().exists();
        std::fs::create_dir_all(dir.root())
            .map_err(|e| backend("create", id)(QemuError::io("creating", dir.root(), e)))?;
        if let Some(pool) = &shared {
            // Its disks may exist already: it ran on another host before
            // (a failover or a migration), and they are kept as they are.
            if let Err(e) = dir.link_shared(pool) {
                if created_dir {
                    let _ = std::fs::remove_dir_all(dir.root());
                }
                return Err(backend("create", id)(e));
            }
        }
        if let Some(from) = config.spec.clone_of.clone() {
            // Disks an interrupted clone left are of another instant: a
            // clone's disks are made together or not at all.
            let remove_disks = || {
                for (i, disk) in config.spec.disks.iter().enumerate() {
                    let _ = std::fs::remove_file(dir.disk_path(i, disk.format));
                }
            };
            remove_disks();
            if let Err(e) = self.clone_disks(&dir, &config, &from).await {
                // No record was written: nothing here is a guest, and
                // nothing of it stays on the pool (remove_dir_all does not
                // follow the `shared` link; remove_dir takes only an empty
                // directory).
                remove_disks();
                if let Ok(pool_dir) = std::fs::read_link(dir.shared_link()) {
                    let _ = std::fs::remove_dir(pool_dir);
                }
                let _ = std::fs::remove_dir_all(dir.root());
                return Err(e);
            }
        }
        for (i, disk) in config.spec.disks.iter().enumerate() {
            if !disk.on_pool() {
                continue;
            }
            let path = dir.disk_path(i, disk.format);
            if path.exists() {
                continue; // left by an earlier, interrupted create, or cloned
            }
            let backing = base.as_ref().filter(|_| i == 0).map(|(p, s)| (p.as_path(), *s));
            if let Err(e) = create_disk_file(qemu_img, &path, disk.format, disk.size, backing).await {
                if created_dir {
                    let _ = std::fs::remove_dir_all(dir.root());
                }
                return Err(backend("create", id)(e));
            }
        }
        // Last: only a complete guest has a record, and only a guest with a
        // record exists.
        dir.write_record(&config).map_err(backend("create", id))
    }

    async fn start(&self, id: GuestId) -> Result<(), HvError> {
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        let config = self.record(&dir, id, "start")?;
        let (state, pid) = self.observe(&dir, &mut slot).await.map_err(backend("start", id))?;
        match (state, pid) {
            (RuntimeState::Running, _) => return Ok(()),
            (RuntimeState::Paused, _) => {
                return Err(HvError::InvalidState { id, op: "start", state });
            }
            // A QEMU that is alive but crashed (panicked guest) holds the
            // disks' locks: end it before booting anew.
            (RuntimeState::Crashed, Some(pid)) => {
                terminate(&dir, &mut slot, pid).await.map_err(backend("start", id))?;
            }
            (RuntimeState::Crashed | RuntimeState::Stopped, _) => {}
        }
        self.launch(&dir, &mut slot, &config, false).await.map_err(backend("start", id))
    }

    async fn stop(&self, id: GuestId, mode: StopMode) -> Result<(), HvError> {
        let err = backend("stop", id);
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        self.record(&dir, id, "stop")?;
        let (state, pid) = self.observe(&dir, &mut slot).await.map_err(backend("stop", id))?;
        let Some(pid) = pid else {
            // Stopped, or Crashed without a process: now meant to be off.
            return dir.write_intent(Intent::Stopped).map_err(err);
        };
        // First, so that the exit we cause is never taken for a crash.
        dir.write_intent(Intent::Stopped).map_err(backend("stop", id))?;
        let graceful = match mode {
            StopMode::Graceful { timeout } => Some(timeout),
            StopMode::Force => None,
        };
        // A Crashed guest (panicked, its QEMU alive) gets no say.
        if let Some(timeout) = graceful.filter(|_| state != RuntimeState::Crashed) {
            let paused = state == RuntimeState::Paused;
            if !self.power_down(&dir, &mut slot, pid, paused, timeout).await {
                tracing::warn!(guest = %id, ?timeout, "guest did not power off in time; forcing it off");
            }
        }
        terminate(&dir, &mut slot, pid).await.map_err(err)
    }

    async fn pause(&self, id: GuestId) -> Result<(), HvError> {
        self.pause_or_resume(id, "pause", RuntimeState::Running, "stop", "paused").await
    }

    async fn resume(&self, id: GuestId) -> Result<(), HvError> {
        self.pause_or_resume(id, "resume", RuntimeState::Paused, "cont", "running").await
    }

    async fn reset(&self, id: GuestId) -> Result<(), HvError> {
        const OP: &str = "reset";
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        self.record(&dir, id, OP)?;
        let (state, pid) = self.observe(&dir, &mut slot).await.map_err(backend(OP, id))?;
        let (RuntimeState::Running, Some(pid)) = (state, pid) else {
            return Err(HvError::InvalidState { id, op: OP, state });
        };
        // So `vm log` shows where the reset boot begins, like a start's.
        if let Err(e) = dir.mark_serial_log(&format!("resetting guest {id}")) {
            tracing::debug!(guest = %id, error = %e, "cannot mark the serial log");
        }
        slot.execute(&dir, pid, "system_reset", None).await.map_err(backend(OP, id))?;
        Ok(())
    }

    async fn destroy(&self, id: GuestId) -> Result<(), HvError> {
        self.remove(id, "destroy", true).await
    }

    async fn forget(&self, id: GuestId) -> Result<(), HvError> {
        let dir = self.dir(id);
        if !dir.is_shared() && dir.root().exists() {
            return Err(HvError::Unsupported {
                op: "forget",
                backend: HypervisorKind::Qemu,
                reason: format!("guest {id} has its disks on this host: forgetting it would lose them"),
            });
        }
        self.remove(id, "forget", false).await
    }

    async fn status(&self, id: GuestId) -> Result<GuestStatus, HvError> {
        self.status_inner(id, true).await
    }

    /// Does not wait for a guest's first start (a heartbeat must not wait
    /// for a boot): see `status_inner`.
    async fn list(&self) -> Result<Vec<GuestStatus>, HvError> {
        let guests_dir = &self.inner.guests_dir;
        let entries = std::fs::read_dir(guests_dir)
            .map_err(|e| HvError::Host { op: "list", source: Box::new(QemuError::io("reading", guests_dir, e)) })?;
        let mut ids: Vec<GuestId> = entries
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                name.to_str()?.parse().ok()
            })
            .collect();
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.status_inner(id, false).await {
                Ok(status) => out.push(status),
                // A directory without a record: an interrupted create or a
                // concurrent destroy. Not a guest.
                Err(HvError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn console_log(&self, id: GuestId, max_bytes: u64) -> Result<Vec<u8>, HvError> {
        let dir = self.dir(id);
        self.record(&dir, id, "console_log")?;
        let path = dir.serial_log_path();
        crate::tail_file(&path, max_bytes)
            .await
            .map_err(|e| backend("console_log", id)(QemuError::io("reading", &path, e)))
    }

    async fn console(&self, id: GuestId) -> Result<crate::ConsoleStream, HvError> {
        let status = self.status(id).await?;
        if !matches!(status.state, RuntimeState::Running | RuntimeState::Paused) {
            return Err(HvError::InvalidState { id, op: "console", state: status.state });
        }
        let path = self.dir(id).console_path();
        let stream = tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| backend("console", id)(QemuError::io("connecting to", &path, e)))?;
        Ok(Box::new(stream))
    }

    async fn exec(&self, id: GuestId, req: &crate::ExecRequest) -> Result<crate::ExecResult, HvError> {
        self.agent_exec(id, req).await
    }

    async fn guest_interfaces(&self, id: GuestId) -> Result<Vec<crate::GuestInterface>, HvError> {
        self.agent_interfaces(id).await
    }

    async fn usage(&self, id: GuestId) -> Result<crate::GuestUsage, HvError> {
        self.guest_usage(id).await
    }

    async fn guest_ready(&self, id: GuestId) -> Result<bool, HvError> {
        self.agent_ping(id).await
    }

    async fn definition(&self, id: GuestId) -> Result<GuestConfig, HvError> {
        self.dir(id).read_record().map_err(backend("definition", id))?.ok_or(HvError::NotFound { id })
    }

    async fn hotplug(&self, id: GuestId, change: &crate::Hotplug) -> Result<(), HvError> {
        self.hotplug_guest(id, change).await
    }

    async fn set_limits(&self, id: GuestId, limits: &drove_model::ResourceLimits) -> Result<(), HvError> {
        self.set_guest_limits(id, limits).await
    }

    async fn move_storage(&self, id: GuestId, to: Storage) -> Result<crate::StorageMoved, HvError> {
        self.move_guest_storage(id, to).await
    }

    async fn snapshot_create(
        &self,
        id: GuestId,
        name: &str,
        kind: crate::SnapshotKind,
    ) -> Result<crate::SnapshotInfo, HvError> {
        self.snapshot_create_guest(id, name, kind).await
    }

    async fn migrate_incoming(&self, config: &GuestConfig, req: &crate::migration::Incoming) -> Result<(), HvError> {
        self.incoming(config, req).await
    }

    async fn migrate_out(
        &self,
        id: GuestId,
        req: &crate::migration::Outgoing,
        progress: &(dyn Fn(crate::migration::MigrationProgress) + Send + Sync),
    ) -> Result<crate::migration::MigrationStats, HvError> {
        self.outgoing(id, req, progress).await
    }

    async fn migrate_finish(
        &self,
        id: GuestId,
        timeout: Duration,
        await_console: bool,
    ) -> Result<crate::migration::IncomingDone, HvError> {
        self.finish_incoming(id, timeout, await_console).await
    }

    async fn migrate_cancel(&self, id: GuestId) -> Result<(), HvError> {
        self.cancel_outgoing(id).await
    }

    async fn snapshot_list(&self, id: GuestId) -> Result<Vec<crate::SnapshotInfo>, HvError> {
        self.snapshot_list_guest(id).await
    }

    async fn snapshot_delete(&self, id: GuestId, name: &str) -> Result<(), HvError> {
        self.snapshot_delete_guest(id, name).await
    }

    async fn snapshot_restore(&self, id: GuestId, name: &str) -> Result<crate::RestoreOutcome, HvError> {
        self.snapshot_restore_guest(id, name).await
    }
}

impl QemuHypervisor {
    async fn pause_or_resume(
        &self,
        id: GuestId,
        op: &'static str,
        from: RuntimeState,
        command: &str,
        expect: &str,
    ) -> Result<(), HvError> {
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        self.record(&dir, id, op)?;
        let (state, pid) = self.observe(&dir, &mut slot).await.map_err(backend(op, id))?;
        let (true, Some(pid)) = (state == from, pid) else {
            return Err(HvError::InvalidState { id, op, state });
        };
        slot.execute(&dir, pid, command, None).await.map_err(backend(op, id))?;
        let status = slot.query_status(&dir, pid).await.map_err(backend(op, id))?;
        if status != expect {
            return Err(backend(op, id)(QemuError::UnexpectedRunState { status, after: op }));
        }
        if command == "cont" {
            announce(&dir, &mut slot, pid).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn qemu_versions_parse_and_order() {
        let v = |t| QemuVersion::parse(t);
        assert_eq!(
            v("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"),
            Some(QemuVersion { major: 10, minor: 0 })
        );
        assert_eq!(v("QEMU emulator version 7.2.22 (Debian)"), Some(QemuVersion { major: 7, minor: 2 }));
        assert_eq!(v("QEMU emulator version 9.1"), Some(QemuVersion { major: 9, minor: 1 }));
        assert_eq!(v("not qemu"), None);
        assert_eq!(v(""), None);
        assert!(v("QEMU emulator version 7.2.22").unwrap() < QemuVersion::TCG_MIGRATION_MIN);
        assert!(v("QEMU emulator version 11.0.0").unwrap() > QemuVersion::TCG_MIGRATION_MIN);
    }

    /// A QEMU known to corrupt busy guests under TCG migration is refused
    /// before anything is made, with the version and the way out named.
    #[tokio::test]
    async fn a_tcg_migration_on_an_old_qemu_is_refused_with_the_reason() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("qemu-system-x86_64");
        std::fs::write(&fake, "#!/bin/sh\necho 'QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)'\n")
            .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut config = QemuConfig::new(tmp.path().join("state"), tmp.path().join("image")).unwrap();
        config.accel = Accel::Tcg;
        config.qemu_binary = fake;
        let hv = QemuHypervisor::new(config).unwrap();
        let req = crate::migration::Outgoing {
            target: "127.0.0.1".parse().unwrap(),
            port: 1,
            nbd_port: 2,
            disks: crate::migration::DiskTransfer::Shared,
            key: None,
            downtime_limit_ms: 50,
            max_bandwidth: 0,
        };
        let err = crate::Hypervisor::migrate_out(&hv, GuestId::new_v4(), &req, &|_| {}).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, HvError::Unsupported { .. }), "{text}");
        assert!(text.contains("QEMU 7.2") && text.contains("10.0 or newer"), "{text}");
        assert!(!tmp.path().join("state/guests").read_dir().unwrap().any(|_| true), "nothing made");
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_differ_per_nic() {
        let id = GuestId::new_v4();
        let names: Vec<String> = (0..12).map(|i| QemuHypervisor::tap_name(id, i)).collect();
        assert!(names.iter().all(|n| n.len() <= 15), "{names:?}");
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn host_resources_are_read_from_proc() {
        let r = host_resources().unwrap();
        assert!(r.cores > 0);
        assert!(r.memory.bytes() > 64 * 1024 * 1024);
    }
}
