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
//! # Changing the limits of a running guest
//!
//! [`QemuHypervisor::set_guest_limits`] gives a guest with a QEMU its new
//! limits in place, part by part, then rewrites its record:
//!
//! | part                  | how                                                     |
//! |-----------------------|---------------------------------------------------------|
//! | CPU cap and shares    | the cgroup's files rewritten ([`GuestCgroup::set_cpu`]) |
//! | disk bps and iops     | QMP `qom-set` of each throttle group's `limits`         |
//! | each NIC's rate       | `tc qdisc change`, or the shaping made or removed ([`tc::set`]) |
//!
//! Everything that could refuse the change is checked before the first
//! part: the values, an unchanged pin, a cgroup to write to, a throttle
//! node on every disk. Each part then first notes how to put the old
//! value back — the same call with the old limits, harmless where the
//! part changed nothing — and when a part fails, the noted parts run in
//! reverse order. The record is written last: while it is not, a restart
//! would start the guest with the old limits, which the rollback left too.
//! A guest without a QEMU only gets the new record.
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

use drove_model::{GuestId, GuestSpec, HypervisorKind, ResourceLimits};
use serde_json::json;

use super::cgroup::{self, CgroupError, GuestCgroup, Hierarchy, Removal};
use super::error::QemuError;
use super::guest_dir::GuestDir;
use super::{QemuHypervisor, Slot, backend, cmdline, process, tc};
use crate::{GuestConfig, HvError};

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
    release_within(dir, Wait::Always).await
}

async fn release_within(dir: &GuestDir, wait: Wait) -> Result<(), QemuError> {
    let cgroup = remove_cgroup(dir, wait).await;
    let nics = clear_nics(dir.id()).await;
    cgroup.and(nics)
}

/// When to wait (up to [`CGROUP_EMPTY_TIMEOUT`]) for a guest's cgroup to empty.
#[derive(Clone, Copy)]
enum Wait {
    /// Whatever holds it.
    Always,
    /// Only while what it holds is exiting. A killed QEMU's leader is a
    /// zombie (and no longer "alive") while its other threads still run
    /// their exit, and the kernel refuses the rmdir until the last one is
    /// done: that takes milliseconds. A live task in it joined it from
    /// elsewhere and is not waited for.
    WhileExiting,
}

async fn remove_cgroup(dir: &GuestDir, wait: Wait) -> Result<(), QemuError> {
    let Some(hierarchy) = Hierarchy::detect()? else { return Ok(()) };
    let cgroup = hierarchy.named(dir.cgroup_name());
    let deadline = Instant::now() + CGROUP_EMPTY_TIMEOUT;
    loop {
        match cgroup.remove()? {
            Removal::Gone => return Ok(()),
            Removal::Busy(path) if Instant::now() >= deadline => {
                return Err(CgroupError::Busy { path }.into());
            }
            Removal::Busy(path)
                if matches!(wait, Wait::WhileExiting)
                    && cgroup.pids().unwrap_or_default().into_iter().any(process::is_alive) =>
            {
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
/// `status`: it waits only while the cgroup holds exiting tasks (the
/// QEMU's last threads), not for live ones (something else joined it), so
/// that `status` and `list` never stall on it.
pub(super) async fn release_leftovers(dir: &GuestDir) {
    if let Err(e) = release_within(dir, Wait::WhileExiting).await {
        tracing::warn!(guest = %dir.id(), error = %e, "cannot release the guest's cgroup or NIC limits");
    }
}

const SET_LIMITS: &str = "set_limits";

/// One part of a running guest's limits, to change or put back.
#[derive(Debug, Clone)]
enum Part {
    /// The cgroup's CPU cap and shares.
    Cpu(GuestCgroup),
    /// The throttle group of disk `index`.
    Disk { index: usize },
    /// The shaping of NIC `index` on its tap and IFB.
    Nic { index: usize, tap: String, ifb: String },
}

impl Part {
    /// What the part is, set to what `limits` ask of it (for errors).
    fn describe(&self, limits: &ResourceLimits, spec: &GuestSpec) -> String {
        let show = |v: Option<u64>| v.map_or_else(|| "none".to_owned(), |v| v.to_string());
        match self {
            Part::Cpu(_) => format!(
                "the CPU cap and shares (cap {}%, shares {})",
                show(limits.cpu_cap_percent.map(u64::from)),
                show(limits.cpu_shares.map(u64::from))
            ),
            Part::Disk { index } => format!(
                "the throttle group throttle{index} of disk {index} (bps {}, iops {})",
                show(limits.disk_bps),
                show(limits.disk_iops)
            ),
            Part::Nic { index, tap, .. } => format!(
                "the rate of NIC {index} on tap {tap} ({} bit/s)",
                show(spec.nics.get(*index).and_then(|n| n.effective_rate(limits)))
            ),
        }
    }
}

impl QemuHypervisor {
    /// [`crate::Hypervisor::set_limits`]; see the module docs.
    pub(super) async fn set_guest_limits(&self, id: GuestId, limits: &ResourceLimits) -> Result<(), HvError> {
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        let old = self.record(&dir, id, SET_LIMITS)?;
        let (_, pid) = self.observe(&dir, &mut slot).await.map_err(backend(SET_LIMITS, id))?;
        crate::check_limits(id, &old.spec, limits, pid.is_some())?;
        let mut new = old.clone();
        new.spec.limits = limits.clone();
        if let Some(pid) = pid {
            let parts = plan(&dir, &mut slot, pid, &old.spec, &new.spec).await?;
            let mut done = Vec::new();
            for part in parts {
                // Noted first: a part that fails half-way is put back too.
                done.push(part.clone());
                if let Err(e) = set_part(&dir, &mut slot, pid, &part, &new.spec).await {
                    let what = part.describe(limits, &new.spec);
                    tracing::warn!(guest = %id, part = %what, error = %e, "cannot change a limit; putting the old ones back");
                    put_back(&dir, &mut slot, pid, done, &old.spec).await;
                    return Err(backend(SET_LIMITS, id)(QemuError::Limit { what, source: Box::new(e) }));
                }
            }
            if let Err(e) = dir.write_record(&new) {
                put_back(&dir, &mut slot, pid, done, &old.spec).await;
                return Err(backend(SET_LIMITS, id)(e));
            }
        } else {
            dir.write_record(&new).map_err(backend(SET_LIMITS, id))?;
        }
        tracing::info!(guest = %id, ?limits, live = pid.is_some(), "limits changed");
        Ok(())
    }
}

/// The parts that differ between `old` and `new`, after checking that
/// each can be changed on the running QEMU `pid`.
async fn plan(
    dir: &GuestDir,
    slot: &mut Slot,
    pid: u32,
    old: &GuestSpec,
    new: &GuestSpec,
) -> Result<Vec<Part>, HvError> {
    let id = dir.id();
    let refuse = |reason: String| HvError::Unsupported { op: SET_LIMITS, backend: HypervisorKind::Qemu, reason };
    let (was, will) = (&old.limits, &new.limits);
    let mut parts = Vec::new();
    if (was.cpu_cap_percent, was.cpu_shares) != (will.cpu_cap_percent, will.cpu_shares) {
        let hierarchy = Hierarchy::detect().map_err(|e| backend(SET_LIMITS, id)(e.into()))?;
        let cgroup = hierarchy
            .map(|h| h.named(dir.cgroup_name()))
            .filter(|c| c.controller_dir("cpu").is_some_and(|d| d.is_dir()));
        let Some(cgroup) = cgroup else {
            return Err(refuse(
                "the guest runs without a cpu cgroup (none could be made when it started); its CPU limits can \
                 change at its next start"
                    .to_owned(),
            ));
        };
        parts.push(Part::Cpu(cgroup));
    }
    if (was.disk_bps, was.disk_iops) != (will.disk_bps, will.disk_iops) && !new.disks.is_empty() {
        let nodes = slot
            .execute(dir, pid, "query-named-block-nodes", Some(json!({ "flat": true })))
            .await
            .map_err(backend(SET_LIMITS, id))?;
        for (index, root) in cmdline::root_nodes(&nodes, new.disks.len()).iter().enumerate() {
            if *root != format!("throttled{index}") {
                return Err(refuse(format!(
                    "disk {index} runs without a throttle node (its QEMU was started by an older drove); its disk \
                     limits can change at its next start"
                )));
            }
            parts.push(Part::Disk { index });
        }
    }
    for (index, (before, after)) in old.nics.iter().zip(&new.nics).enumerate() {
        if before.effective_rate(was) == after.effective_rate(will) {
            continue;
        }
        // A NIC whose tap is missing was left out of this QEMU: nothing to
        // shape until it is attached at a start, with the record's rate.
        let tap = QemuHypervisor::tap_name(id, index);
        if tc::device_exists(&tap) {
            parts.push(Part::Nic { index, tap, ifb: tc::ifb_name(id, index) });
        }
    }
    Ok(parts)
}

/// Sets `part` to what `spec`'s limits ask of it.
async fn set_part(dir: &GuestDir, slot: &mut Slot, pid: u32, part: &Part, spec: &GuestSpec) -> Result<(), QemuError> {
    match part {
        Part::Cpu(cgroup) => Ok(cgroup.set_cpu(&spec.limits)?),
        Part::Disk { index } => {
            let args = json!({
                "path": format!("/objects/throttle{index}"),
                "property": "limits",
                "value": cmdline::throttle_limits_object(&spec.limits),
            });
            slot.execute(dir, pid, "qom-set", Some(args)).await.map(drop)
        }
        Part::Nic { index, tap, ifb } => {
            let rate = spec.nics.get(*index).and_then(|n| n.effective_rate(&spec.limits));
            Ok(tc::set(tap, ifb, rate).await?)
        }
    }
}

/// Puts `done` back to `old`'s limits, newest first. Failures are logged:
/// the change has failed already, and its error is the one to report.
async fn put_back(dir: &GuestDir, slot: &mut Slot, pid: u32, mut done: Vec<Part>, old: &GuestSpec) {
    while let Some(part) = done.pop() {
        if let Err(e) = set_part(dir, slot, pid, &part, old).await {
            tracing::error!(
                guest = %dir.id(),
                part = %part.describe(&old.limits, old),
                error = %e,
                "cannot put a limit back after a failed change"
            );
        }
    }
}
