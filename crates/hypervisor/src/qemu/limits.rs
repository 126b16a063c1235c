//! A guest's resource controls on the host side: what a start sets up
//! around its QEMU and what goes when the QEMU ends.
//!
//! | limit (`ResourceLimits`)     | mechanism                                   | where        |
//! |------------------------------|---------------------------------------------|--------------|
//! | `cpu_cap_percent`            | CFS quota: `cpu.cfs_quota_us` / `cpu.max`   | `cgroup.rs`  |
//! | `cpu_shares`                 | `cpu.shares` / `cpu.weight`                 | `cgroup.rs`  |
//! | `cpu_pin`                    | `cpuset.cpus`                               | `cgroup.rs`  |
//! | `disk_bps`, `disk_iops`      | QEMU throttle groups, one per disk          | `cmdline.rs` |
//! | `nic_rate_bps`               | `tbf` on the tap, and on an IFB for ingress | `tc.rs`      |
//!
//! # Lifecycle
//!
//! ```text
//! start:   cgroup created with its limits ─► tc on each tap ─► QEMU launched
//!          and confirmed running ─► QEMU's pid moved into the cgroup
//!          (any failure: QEMU killed, then release)
//! release: when the QEMU is gone (stop, destroy, a failed start, and
//!          whenever a guest is observed without its QEMU, e.g. after a
//!          crash): cgroup removed, tc removed, IFBs deleted
//! ```
//!
//! Everything is set up before QEMU starts, so a limit that cannot be
//! applied fails the start before any guest code runs. The pid moves in
//! right after launch (QEMU's `-daemonize` returns once it is initialised);
//! the guest may have run for those few milliseconds outside its cgroup.
//!
//! Release finds everything by the guest id alone (cgroup paths, IFB
//! names), so it needs neither the guest's record nor memory of the start:
//! an agent restarted meanwhile releases what the old one set up.
//!
//! # When the host cannot
//!
//! Without writable cgroups (not root, no cgroupfs) a guest with CPU limits
//! does not start, with an error naming the limit and the file; a guest
//! without any still gets its cgroup where possible, for accounting, and
//! otherwise starts without one (logged). NIC limits that `tc` refuses fail
//! the start; disk limits are QEMU's own and fail with QEMU.

use std::time::{Duration, Instant};

use drove_model::GuestId;

use super::cgroup::{self, CgroupError, GuestCgroup, Hierarchy, Removal};
use super::error::QemuError;
use super::guest_dir::GuestDir;
use super::{QemuHypervisor, tc};
use crate::GuestConfig;

/// How long a cgroup may keep its tasks after its QEMU is gone (the kernel
/// takes them out as the process exits).
const CGROUP_EMPTY_TIMEOUT: Duration = Duration::from_secs(5);
const CGROUP_EMPTY_POLL: Duration = Duration::from_millis(20);

/// What a start set up before launching QEMU.
#[derive(Debug)]
pub(super) struct Applied {
    id: GuestId,
    /// `None` when the guest runs without a cgroup (none was possible and
    /// none was needed).
    cgroup: Option<GuestCgroup>,
    /// Whether limits need the cgroup, so failing to join it fails.
    cgroup_required: bool,
}

/// Creates the guest's cgroup and caps its NICs on `taps` (one entry per
/// NIC of the spec, `None` for NICs left out). On failure nothing of it
/// remains.
pub(super) async fn before_launch(
    config: &GuestConfig,
    dir: &GuestDir,
    taps: &[Option<String>],
) -> Result<Applied, QemuError> {
    let id = config.id;
    let limits = &config.spec.limits;
    let needs = cgroup::first_cgroup_limit(limits);
    let required = needs.is_some();
    let cgroup = match Hierarchy::detect() {
        Ok(Some(hierarchy)) => {
            let cgroup = hierarchy.named(dir.cgroup_name());
            match cgroup.create(limits) {
                Ok(()) => Some(cgroup),
                Err(e) if required => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(guest = %id, error = %e, "cannot create the guest's cgroup; it runs without");
                    None
                }
            }
        }
        Ok(None) => {
            if let Some((controller, limit)) = needs {
                return Err(CgroupError::NoController { controller, limit }.into());
            }
            tracing::warn!(guest = %id, "no cgroup hierarchy is mounted; the guest runs without a cgroup");
            None
        }
        Err(e) if required => return Err(e.into()),
        Err(e) => {
            tracing::warn!(guest = %id, error = %e, "cannot find the cgroup hierarchies; the guest runs without a cgroup");
            None
        }
    };
    let applied = Applied { id, cgroup, cgroup_required: required };
    for (index, (tap, nic)) in taps.iter().zip(&config.spec.nics).enumerate() {
        let (Some(tap), Some(rate)) = (tap, nic.effective_rate(limits)) else { continue };
        if let Err(e) = tc::apply(tap, &tc::ifb_name(id, index), rate).await {
            if let Err(release_err) = release(dir).await {
                tracing::error!(guest = %id, error = %release_err, "cannot undo a failed start's limits");
            }
            return Err(e.into());
        }
    }
    Ok(applied)
}

impl Applied {
    /// Moves the QEMU `pid` into the guest's cgroup.
    pub(super) fn attach(&self, pid: u32) -> Result<(), QemuError> {
        let Some(cgroup) = &self.cgroup else { return Ok(()) };
        match cgroup.attach(pid) {
            Ok(()) => Ok(()),
            Err(e) if self.cgroup_required => Err(e.into()),
            Err(e) => {
                tracing::warn!(guest = %self.id, pid, error = %e, "cannot move QEMU into its cgroup; it runs without");
                // Nothing joined it: the removal cannot meet tasks.
                if let Err(e) = cgroup.remove() {
                    tracing::warn!(guest = %self.id, error = %e, "cannot remove the unused cgroup");
                }
                Ok(())
            }
        }
    }
}

/// Removes the guest's cgroup and NIC limits, whatever of them exists.
/// Call only once its QEMU is gone: a cgroup that still holds tasks after
/// [`CGROUP_EMPTY_TIMEOUT`] is an error. Both are attempted; the first
/// failure is returned.
pub(super) async fn release(dir: &GuestDir) -> Result<(), QemuError> {
    release_within(dir, CGROUP_EMPTY_TIMEOUT).await
}

async fn release_within(dir: &GuestDir, timeout: Duration) -> Result<(), QemuError> {
    let cgroup = remove_cgroup(dir, timeout).await;
    let nics = clear_nics(dir.id()).await;
    cgroup.and(nics)
}

async fn remove_cgroup(dir: &GuestDir, timeout: Duration) -> Result<(), QemuError> {
    let Some(hierarchy) = Hierarchy::detect()? else { return Ok(()) };
    let cgroup = hierarchy.named(dir.cgroup_name());
    let deadline = Instant::now() + timeout;
    loop {
        match cgroup.remove()? {
            Removal::Gone => return Ok(()),
            Removal::Busy(path) if Instant::now() >= deadline => {
                return Err(CgroupError::Busy { path }.into());
            }
            Removal::Busy(_) => tokio::time::sleep(CGROUP_EMPTY_POLL).await,
        }
    }
}

async fn clear_nics(id: GuestId) -> Result<(), QemuError> {
    let mut first_err = None;
    for (index, ifb) in tc::guest_ifbs(id)? {
        if let Err(e) = tc::clear(&QemuHypervisor::tap_name(id, index), &ifb).await {
            tracing::warn!(guest = %id, ifb, error = %e, "cannot remove a NIC limit");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), |e| Err(e.into()))
}

/// [`release`] where a failure must not hide another outcome: logged, and
/// tried again the next time the guest is seen without its QEMU.
pub(super) async fn release_or_log(dir: &GuestDir) {
    if let Err(e) = release(dir).await {
        tracing::warn!(guest = %dir.id(), error = %e, "cannot release the guest's cgroup or NIC limits");
    }
}

/// [`release_or_log`] for a guest whose QEMU is long gone, on the way of
/// `status`: a cgroup still busy then is not waited for (something else
/// joined it), so that `status` and `list` never stall on it.
pub(super) async fn release_leftovers(dir: &GuestDir) {
    if let Err(e) = release_within(dir, Duration::ZERO).await {
        tracing::warn!(guest = %dir.id(), error = %e, "cannot release the guest's cgroup or NIC limits");
    }
}
