//! Each guest's own cgroup: CPU accounting, caps, shares and pinning.
//!
//! # The idea
//!
//! Every QEMU runs in a cgroup named after its guest, below a `drove`
//! directory of ours in each hierarchy we use:
//!
//! ```text
//! cgroup v1 (one hierarchy per controller, as on this platform; cpu and
//! cpuacct may also share one):
//!   <cpu mount>/drove/<guest-id>      cpu.cfs_quota_us, cpu.shares
//!   <cpuacct mount>/drove/<guest-id>  cpuacct.usage (accounting)
//!   <cpuset mount>/drove/<guest-id>   cpuset.cpus (only for pinned guests)
//! cgroup v2 (one hierarchy):
//!   <cgroup2 mount>/drove/<guest-id>  cpu.max, cpu.weight, cpuset.cpus,
//!                                     cpu.stat (accounting)
//! ```
//!
//! The path follows from the guest id alone, so the cgroup needs no record:
//! it lives exactly as long as the QEMU in it, outlives the agent with it
//! (an agent restart finds it where it expects it) and whoever ends the QEMU
//! removes it by name. Which layout applies is read from
//! `/proc/self/mountinfo` at each use (a few microseconds): a controller
//! mounted on a v1 hierarchy means v1 (a controller lives on one hierarchy
//! only, and the hybrid layout of this platform keeps the cgroup2 mount
//! without controllers), otherwise the cgroup2 mount.
//!
//! Every guest gets its cgroup, limits or not: its CPU use is then
//! accounted per guest, and the cgroup costs two directories. A guest
//! without a pin gets no cpuset cgroup, because one would only copy the
//! host's cores and memory nodes at start and go stale when they change.
//!
//! Limits, from [`ResourceLimits`]:
//! * `cpu_cap_percent` P: a CFS bandwidth quota of P % of one core per
//!   [`CFS_PERIOD_US`] (v1 `cpu.cfs_quota_us`, v2 `cpu.max "quota period"`).
//!   It covers all of QEMU's threads together, which is what "the guest
//!   uses P % of a core" means from the host.
//! * `cpu_shares`: v1 `cpu.shares` as is, v2 `cpu.weight` by
//!   [`shares_to_weight`]. They weigh guests against each other: all guests
//!   are siblings below `drove`.
//! * `cpu_pin`: `cpuset.cpus` of the guest; all QEMU threads run there.
//!
//! A running guest's cap and shares can change ([`GuestCgroup::set_cpu`]):
//! the same files rewritten, and a limit removed is written back to the
//! kernel's default (v1 quota `-1` and 1024 shares, v2 `max` and weight
//! 100), which is what a cgroup without it has.
//!
//! The `drove` directories stay: other guests come and go below them
//! concurrently, and an empty directory costs nothing. On v1 the cpuset
//! `drove` directory gets the host's cores and memory nodes once, because a
//! v1 cpuset starts empty and no task can join an empty one.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drove_model::{GuestId, ResourceLimits};

/// The directory, in each hierarchy, that holds the guests' cgroups.
pub const PARENT: &str = "drove";
/// The CFS period caps are expressed in (the kernel's default, 100 ms).
pub const CFS_PERIOD_US: u64 = 100_000;
/// cgroup v2's `cpu.weight` for an unweighted cgroup; v1's is 1024 shares.
const DEFAULT_WEIGHT: u64 = 100;
const DEFAULT_SHARES: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "the {limit} limit needs the {controller} cgroup controller, which no mounted cgroup hierarchy \
         offers (see /proc/self/mountinfo)"
    )]
    NoController { controller: &'static str, limit: &'static str },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("pinning to host cores {cpus} in {path}: the parent cgroup offers cores {available}")]
    Cores {
        cpus: String,
        available: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the cgroup {path} does not exist: the guest runs without one")]
    Missing { path: PathBuf },
    #[error("the cgroup {path} still holds processes")]
    Busy { path: PathBuf },
    #[error("{path} has no {key} (contents: {content:?})")]
    Stat { path: PathBuf, key: &'static str, content: String },
}

impl CgroupError {
    fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io { action, path: path.into(), source }
    }
}

/// Where the controllers we use are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v1: each controller's mount point, if it is mounted.
    V1 { cpu: Option<PathBuf>, cpuacct: Option<PathBuf>, cpuset: Option<PathBuf> },
    /// cgroup v2: the unified hierarchy's mount point.
    V2 { root: PathBuf },
}

impl Hierarchy {
    /// The layout of this host, or `None` when no cgroup hierarchy is
    /// mounted at all.
    pub fn detect() -> Result<Option<Self>, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|e| CgroupError::io("reading", path, e))?;
        Ok(Self::from_mountinfo(&text))
    }

    /// Reads the layout from the text of a `mountinfo` file (see
    /// proc(5): `id parent dev root mount-point options [tags] - fstype
    /// source super-options`).
    pub fn from_mountinfo(text: &str) -> Option<Self> {
        let (mut cpu, mut cpuacct, mut cpuset, mut unified) = (None, None, None, None);
        for line in text.lines() {
            let Some((mount, fs)) = line.split_once(" - ") else { continue };
            let Some(mount_point) = mount.split(' ').nth(4).map(unescape) else { continue };
            let mut fs = fs.split(' ');
            let (fstype, super_options) = (fs.next(), fs.nth(1).unwrap_or_default());
            match fstype {
                Some("cgroup") => {
                    for option in super_options.split(',') {
                        let slot = match option {
                            "cpu" => &mut cpu,
                            "cpuacct" => &mut cpuacct,
                            "cpuset" => &mut cpuset,
                            _ => continue,
                        };
                        slot.get_or_insert_with(|| mount_point.clone());
                    }
                }
                Some("cgroup2") => {
                    unified.get_or_insert(mount_point);
                }
                _ => {}
            }
        }
        if cpu.is_some() || cpuacct.is_some() || cpuset.is_some() {
            Some(Self::V1 { cpu, cpuacct, cpuset })
        } else {
            unified.map(|root| Self::V2 { root })
        }
    }

    /// The cgroup of guest `id` in this layout (which may not exist).
    pub fn guest(&self, id: GuestId) -> GuestCgroup {
        self.named(id.to_string())
    }

    /// The cgroup `drove/<name>` (see `GuestDir::cgroup_name`).
    pub fn named(&self, name: String) -> GuestCgroup {
        GuestCgroup { hierarchy: self.clone(), name }
    }
}

/// Undoes the octal escapes mountinfo uses for space, tab, newline and
/// backslash in paths.
fn unescape(field: &str) -> PathBuf {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    PathBuf::from(out)
}

/// One guest's cgroup: a directory per hierarchy it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCgroup {
    hierarchy: Hierarchy,
    name: String,
}

/// What [`GuestCgroup::remove`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// No directory of the guest's cgroup remains.
    Gone,
    /// This directory still holds tasks (say, a QEMU that just exited and is
    /// not yet fully gone); try again shortly.
    Busy(PathBuf),
}

/// CPU time a guest's cgroup has used and how often its cap held it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuStat {
    /// CPU time used by all its tasks.
    pub usage: Duration,
    /// CFS periods in which it ran; 0 without a cap on v2.
    pub periods: u64,
    /// Of those, the periods in which it used its whole quota.
    pub throttled_periods: u64,
    /// Time its runnable tasks waited for the next period.
    pub throttled: Duration,
}

impl GuestCgroup {
    fn dir_in(&self, mount: &Path) -> PathBuf {
        mount.join(PARENT).join(&self.name)
    }

    /// Every directory the cgroup may consist of, whether it exists or not.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        match &self.hierarchy {
            Hierarchy::V1 { cpu, cpuacct, cpuset } => {
                for mount in [cpu, cpuacct, cpuset].into_iter().flatten() {
                    let dir = self.dir_in(mount);
                    // cpu and cpuacct may be one hierarchy.
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
            }
            Hierarchy::V2 { root } => dirs.push(self.dir_in(root)),
        }
        dirs
    }

    /// Whether any directory of the cgroup exists.
    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }

    /// The directory of the hierarchy carrying `controller`, if mounted.
    pub fn controller_dir(&self, controller: &str) -> Option<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V1 { cpu, cpuacct, cpuset } => {
                let mount = match controller {
                    "cpu" => cpu,
                    "cpuacct" => cpuacct,
                    "cpuset" => cpuset,
                    _ => &None,
                };
                mount.as_deref().map(|m| self.dir_in(m))
            }
            Hierarchy::V2 { root } => Some(self.dir_in(root)),
        }
    }

    /// Creates the cgroup afresh with `limits` set. A leftover of an
    /// earlier run is replaced. On failure nothing of it remains.
    pub fn create(&self, limits: &ResourceLimits) -> Result<(), CgroupError> {
        let result = match &self.hierarchy {
            Hierarchy::V1 { cpu, cpuacct, cpuset } => {
                self.create_v1(limits, cpu.as_deref(), cpuacct.as_deref(), cpuset.as_deref())
            }
            Hierarchy::V2 { root } => self.create_v2(limits, root),
        };
        if result.is_err() {
            // Best effort: the directories are empty, nothing holds them.
            let _ = self.remove();
        }
        result
    }

    fn create_v1(
        &self,
        limits: &ResourceLimits,
        cpu: Option<&Path>,
        cpuacct: Option<&Path>,
        cpuset: Option<&Path>,
    ) -> Result<(), CgroupError> {
        self.remove_stale()?;
        let cpu_limit = cpu_limit_name(limits);
        if let Some(limit) = cpu_limit
            && cpu.is_none()
        {
            return Err(CgroupError::NoController { controller: "cpu", limit });
        }
        if let Some(mount) = cpu {
            let dir = make_dirs(mount, &self.name)?;
            if let Some(cap) = limits.cpu_cap_percent {
                write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &quota_us(cap).to_string())?;
            }
            if let Some(shares) = limits.cpu_shares {
                write(&dir.join("cpu.shares"), &shares.to_string())?;
            }
        }
        if let Some(mount) = cpuacct {
            make_dirs(mount, &self.name)?;
        }
        if !limits.cpu_pin.is_empty() {
            let Some(mount) = cpuset else {
                return Err(CgroupError::NoController { controller: "cpuset", limit: "cpu_pin" });
            };
            let parent = mount.join(PARENT);
            std::fs::create_dir_all(&parent).map_err(|e| CgroupError::io("creating", &parent, e))?;
            // A new v1 cpuset is empty: the parent takes the host's cores
            // and memory nodes, the guest the parent's nodes and its pins.
            for file in ["cpuset.mems", "cpuset.cpus"] {
                if read_trimmed(&parent.join(file))?.is_empty() {
                    write(&parent.join(file), &read_trimmed(&mount.join(file))?)?;
                }
            }
            let dir = make_dirs(mount, &self.name)?;
            write(&dir.join("cpuset.mems"), &read_trimmed(&parent.join("cpuset.mems"))?)?;
            write_cpus(&dir, &parent, "cpuset.cpus", &limits.cpu_pin)?;
        }
        Ok(())
    }

    fn create_v2(&self, limits: &ResourceLimits, root: &Path) -> Result<(), CgroupError> {
        self.remove_stale()?;
        let mut needed = Vec::new();
        if let Some(limit) = cpu_limit_name(limits) {
            needed.push(("cpu", limit));
        }
        if !limits.cpu_pin.is_empty() {
            needed.push(("cpuset", "cpu_pin"));
        }
        let parent = root.join(PARENT);
        std::fs::create_dir_all(&parent).map_err(|e| CgroupError::io("creating", &parent, e))?;
        enable_v2_controllers(root, &needed)?;
        let dir = make_dirs(root, &self.name)?;
        if let Some(cap) = limits.cpu_cap_percent {
            write(&dir.join("cpu.max"), &format!("{} {CFS_PERIOD_US}", quota_us(cap)))?;
        }
        if let Some(shares) = limits.cpu_shares {
            write(&dir.join("cpu.weight"), &shares_to_weight(shares).to_string())?;
        }
        if !limits.cpu_pin.is_empty() {
            write_cpus(&dir, &parent, "cpuset.cpus.effective", &limits.cpu_pin)?;
        }
        Ok(())
    }

    /// Rewrites the CPU cap and shares of the existing cgroup to those of
    /// `limits` (the rest of `limits` is not looked at), for a guest whose
    /// QEMU runs in it. A limit that is `None` goes back to the kernel's
    /// default. Each file is written once: what was written before a
    /// failure stays, and the caller puts the old limits back the same way.
    pub fn set_cpu(&self, limits: &ResourceLimits) -> Result<(), CgroupError> {
        let limit = cpu_limit_name(limits);
        match &self.hierarchy {
            Hierarchy::V1 { cpu, .. } => {
                let Some(mount) = cpu else {
                    return match limit {
                        Some(limit) => Err(CgroupError::NoController { controller: "cpu", limit }),
                        None => Ok(()),
                    };
                };
                let dir = self.existing_dir(mount)?;
                match limits.cpu_cap_percent {
                    Some(cap) => {
                        write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota_us(cap).to_string())?;
                    }
                    None => write(&dir.join("cpu.cfs_quota_us"), "-1")?,
                }
                let shares = limits.cpu_shares.map_or(DEFAULT_SHARES, u64::from);
                write(&dir.join("cpu.shares"), &shares.to_string())
            }
            Hierarchy::V2 { root } => {
                let dir = self.existing_dir(root)?;
                if let Some(limit) = limit {
                    enable_v2_controllers(root, &[("cpu", limit)])?;
                } else if !dir.join("cpu.max").exists() {
                    // The cpu controller never reached the guest: nothing
                    // of it limits the guest, so there is nothing to remove.
                    return Ok(());
                }
                let max = match limits.cpu_cap_percent {
                    Some(cap) => format!("{} {CFS_PERIOD_US}", quota_us(cap)),
                    None => format!("max {CFS_PERIOD_US}"),
                };
                write(&dir.join("cpu.max"), &max)?;
                let weight = limits.cpu_shares.map_or(DEFAULT_WEIGHT, shares_to_weight);
                write(&dir.join("cpu.weight"), &weight.to_string())
            }
        }
    }

    /// The guest's directory in the hierarchy mounted at `mount`, which
    /// must exist.
    fn existing_dir(&self, mount: &Path) -> Result<PathBuf, CgroupError> {
        let dir = self.dir_in(mount);
        if dir.is_dir() { Ok(dir) } else { Err(CgroupError::Missing { path: dir }) }
    }

    /// A directory left by an earlier QEMU of this guest (an agent that died
    /// before removing it) is removed, so the new one starts with exactly
    /// the limits asked for now.
    fn remove_stale(&self) -> Result<(), CgroupError> {
        match self.remove()? {
            Removal::Gone => Ok(()),
            Removal::Busy(path) => Err(CgroupError::Busy { path }),
        }
    }

    /// Moves the process `pid` with all its threads into the cgroup.
    ///
    /// Written to `cgroup.procs` in each hierarchy, which moves the whole
    /// thread group at once, under the kernel's lock against new threads;
    /// moving thread by thread through `tasks` could miss a thread QEMU
    /// starts meanwhile. Threads started later inherit the cgroup.
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs().into_iter().filter(|d| d.is_dir()) {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes every directory of the cgroup that exists. Only empty
    /// cgroups can go: one still holding tasks is reported, not forced.
    pub fn remove(&self) -> Result<Removal, CgroupError> {
        for dir in self.dirs() {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                    return Ok(Removal::Busy(dir));
                }
                Err(e) => return Err(CgroupError::io("removing", dir, e)),
            }
        }
        Ok(Removal::Gone)
    }

    /// The processes in the cgroup (of its first hierarchy).
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let Some(dir) = self.dirs().into_iter().next() else { return Ok(Vec::new()) };
        let path = dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&path).map_err(|e| CgroupError::io("reading", &path, e))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// CPU time used and throttling so far.
    pub fn cpu_stat(&self) -> Result<CpuStat, CgroupError> {
        match &self.hierarchy {
            Hierarchy::V1 { cpu, cpuacct, .. } => {
                let Some(cpuacct) = cpuacct else {
                    return Err(CgroupError::NoController { controller: "cpuacct", limit: "accounting" });
                };
                let usage_path = self.dir_in(cpuacct).join("cpuacct.usage");
                let usage = read_trimmed(&usage_path)?;
                let usage_ns = usage.parse::<u64>().map_err(|_| CgroupError::Stat {
                    path: usage_path.clone(),
                    key: "usage",
                    content: usage.clone(),
                })?;
                let mut stat = CpuStat { usage: Duration::from_nanos(usage_ns), ..CpuStat::default() };
                if let Some(cpu) = cpu {
                    let path = self.dir_in(cpu).join("cpu.stat");
                    let text = read_trimmed(&path)?;
                    stat.periods = stat_value(&text, "nr_periods").unwrap_or(0);
                    stat.throttled_periods = stat_value(&text, "nr_throttled").unwrap_or(0);
                    stat.throttled = Duration::from_nanos(stat_value(&text, "throttled_time").unwrap_or(0));
                }
                Ok(stat)
            }
            Hierarchy::V2 { root } => {
                let path = self.dir_in(root).join("cpu.stat");
                let text = read_trimmed(&path)?;
                let Some(usage_us) = stat_value(&text, "usage_usec") else {
                    return Err(CgroupError::Stat { path, key: "usage_usec", content: text });
                };
                Ok(CpuStat {
                    usage: Duration::from_micros(usage_us),
                    periods: stat_value(&text, "nr_periods").unwrap_or(0),
                    throttled_periods: stat_value(&text, "nr_throttled").unwrap_or(0),
                    throttled: Duration::from_micros(stat_value(&text, "throttled_usec").unwrap_or(0)),
                })
            }
        }
    }
}

/// The first of `limits` that needs a cgroup, with the controller it
/// needs: `("cpu", "cpu_cap_percent")`, ... `None` when no limit does.
pub fn first_cgroup_limit(limits: &ResourceLimits) -> Option<(&'static str, &'static str)> {
    match cpu_limit_name(limits) {
        Some(limit) => Some(("cpu", limit)),
        None if !limits.cpu_pin.is_empty() => Some(("cpuset", "cpu_pin")),
        None => None,
    }
}

/// Which CPU limit asks for the cpu controller, for error messages.
fn cpu_limit_name(limits: &ResourceLimits) -> Option<&'static str> {
    if limits.cpu_cap_percent.is_some() {
        Some("cpu_cap_percent")
    } else if limits.cpu_shares.is_some() {
        Some("cpu_shares")
    } else {
        None
    }
}

/// Enables `needed` (controller, the limit that needs it) for the guests
/// below `root`'s `drove` directory. Controllers reach a cgroup only
/// through its ancestors' subtree_control; only those a limit needs are
/// enabled: accounting (cpu.stat's usage) works without any.
fn enable_v2_controllers(root: &Path, needed: &[(&'static str, &'static str)]) -> Result<(), CgroupError> {
    let parent = root.join(PARENT);
    let offered = read_trimmed(&root.join("cgroup.controllers"))?;
    for &(controller, limit) in needed {
        if !offered.split_whitespace().any(|c| c == controller) {
            return Err(CgroupError::NoController { controller, limit });
        }
        for dir in [root, &parent] {
            let file = dir.join("cgroup.subtree_control");
            if !read_trimmed(&file)?.split_whitespace().any(|c| c == controller) {
                write(&file, &format!("+{controller}"))?;
            }
        }
    }
    Ok(())
}

/// The CFS quota of a cap in percent of one core.
fn quota_us(cap_percent: u32) -> u64 {
    u64::from(cap_percent) * CFS_PERIOD_US / 100
}

/// v1 shares as a v2 weight: proportional, so that 1024 shares (v1's
/// default) is weight 100 (v2's default) and guests keep their ratios to
/// each other and to guests without shares. v1 allows 2..=262144, v2
/// 1..=10000: the ends are clamped. (The formula some container runtimes
/// use, 1 + (shares - 2) * 9999 / 262142, maps 1024 to 39 and would make a
/// guest with default shares lighter than one with none.)
pub fn shares_to_weight(shares: u32) -> u64 {
    let weight = (u64::from(shares) * DEFAULT_WEIGHT + DEFAULT_SHARES / 2) / DEFAULT_SHARES;
    weight.clamp(1, 10_000)
}

/// Creates `<mount>/drove/<name>`.
fn make_dirs(mount: &Path, name: &str) -> Result<PathBuf, CgroupError> {
    let dir = mount.join(PARENT).join(name);
    std::fs::create_dir_all(&dir).map_err(|e| CgroupError::io("creating", &dir, e))?;
    Ok(dir)
}

/// Writes the pinned cores, naming what the parent offers if the kernel
/// refuses them (it answers EINVAL or ERANGE for cores outside the parent's
/// set).
fn write_cpus(dir: &Path, parent: &Path, parent_file: &str, pins: &[u32]) -> Result<(), CgroupError> {
    let mut pins = pins.to_vec();
    pins.sort_unstable();
    let cpus = pins.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let path = dir.join("cpuset.cpus");
    std::fs::write(&path, &cpus).map_err(|source| CgroupError::Cores {
        available: read_trimmed(&parent.join(parent_file)).unwrap_or_else(|_| "?".to_owned()),
        cpus: cpus.clone(),
        path: path.clone(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) => Err(CgroupError::io("reading", path, e)),
    }
}

/// The value of `key` in a flat-keyed file (`cpu.stat`: "key value" lines).
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_layouts_are_recognised() {
        assert_eq!(
            Hierarchy::from_mountinfo(HYBRID),
            Some(Hierarchy::V1 {
                cpu: Some("/sys/fs/cgroup/cpu".into()),
                cpuacct: Some("/sys/fs/cgroup/cpuacct".into()),
                cpuset: Some("/sys/fs/cgroup/cpuset".into()),
            })
        );
        // The classic layout with cpu and cpuacct on one hierarchy: one
        // directory for both.
        let comounted = "40 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                         41 31 0:34 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n";
        let h = Hierarchy::from_mountinfo(comounted).unwrap();
        let id = GuestId::new_v4();
        assert_eq!(
            h.guest(id).dirs(),
            vec![
                PathBuf::from(format!("/sys/fs/cgroup/cpu,cpuacct/drove/{id}")),
                PathBuf::from(format!("/sys/fs/cgroup/cpuset/drove/{id}")),
            ]
        );
        // Pure v2, with a tagged mount (optional fields before the " - ").
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(Hierarchy::from_mountinfo(v2), Some(Hierarchy::V2 { root: "/sys/fs/cgroup".into() }));
        // Escaped spaces in mount points.
        let spaced = "30 23 0:26 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(Hierarchy::from_mountinfo(spaced), Some(Hierarchy::V2 { root: "/mnt/my cgroups".into() }));
        assert_eq!(Hierarchy::from_mountinfo("22 1 0:5 / /proc rw - proc proc rw\n"), None);
    }

    #[test]
    fn shares_map_to_weights_keeping_the_default() {
        assert_eq!(shares_to_weight(1024), 100);
        assert_eq!(shares_to_weight(2048), 200);
        assert_eq!(shares_to_weight(512), 50);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn caps_are_quotas_of_the_period() {
        assert_eq!(quota_us(50), 50_000);
        assert_eq!(quota_us(1), 1_000);
        assert_eq!(quota_us(250), 250_000);
    }

    fn limits() -> ResourceLimits {
        ResourceLimits { cpu_cap_percent: Some(50), cpu_shares: Some(2048), cpu_pin: vec![1, 0], ..Default::default() }
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A cgroup v2 tree imitated with plain files: what `create` writes.
    #[test]
    fn v2_writes_cpu_max_weight_and_cpus_and_enables_controllers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "memory\n").unwrap();
        std::fs::create_dir(root.join(PARENT)).unwrap();
        std::fs::write(root.join(PARENT).join("cgroup.subtree_control"), "").unwrap();
        let id = GuestId::new_v4();
        let cg = Hierarchy::V2 { root: root.to_owned() }.guest(id);
        cg.create(&limits()).unwrap();
        let dir = root.join(PARENT).join(id.to_string());
        assert_eq!(cg.dirs(), vec![dir.clone()]);
        assert_eq!(read(dir.join("cpu.max")), "50000 100000");
        assert_eq!(read(dir.join("cpu.weight")), "200");
        assert_eq!(read(dir.join("cpuset.cpus")), "0,1");
        // Plain files keep only the last write; the kernel would add each.
        assert_eq!(read(root.join("cgroup.subtree_control")), "+cpuset");
        assert_eq!(read(root.join(PARENT).join("cgroup.subtree_control")), "+cpuset");

        std::fs::write(dir.join("cpu.stat"), "usage_usec 2500000\nuser_usec 1\nnr_periods 30\nnr_throttled 12\n")
            .unwrap();
        let stat = cg.cpu_stat().unwrap();
        assert_eq!(
            stat,
            CpuStat {
                usage: Duration::from_millis(2500),
                periods: 30,
                throttled_periods: 12,
                throttled: Duration::ZERO
            }
        );
    }

    #[test]
    fn v2_refuses_limits_whose_controller_is_not_offered() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let cg = Hierarchy::V2 { root: tmp.path().to_owned() }.guest(GuestId::new_v4());
        let err = cg.create(&limits()).unwrap_err();
        assert!(matches!(err, CgroupError::NoController { controller: "cpu", limit: "cpu_cap_percent" }), "{err}");
        // Without limits nothing needs a controller.
        cg.create(&ResourceLimits::default()).unwrap();
        assert!(cg.exists());
    }

    /// A cgroup v1 tree imitated with plain files.
    #[test]
    fn v1_writes_quota_shares_and_cpuset_from_the_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let mount = |name: &str| {
            let dir = tmp.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            dir
        };
        let (cpu, cpuacct, cpuset) = (mount("cpu"), mount("cpuacct"), mount("cpuset"));
        std::fs::write(cpuset.join("cpuset.cpus"), "0-3\n").unwrap();
        std::fs::write(cpuset.join("cpuset.mems"), "0\n").unwrap();
        // The kernel creates the parent's files empty.
        std::fs::create_dir(cpuset.join(PARENT)).unwrap();
        std::fs::write(cpuset.join(PARENT).join("cpuset.cpus"), "").unwrap();
        std::fs::write(cpuset.join(PARENT).join("cpuset.mems"), "").unwrap();
        let h = Hierarchy::V1 { cpu: Some(cpu.clone()), cpuacct: Some(cpuacct.clone()), cpuset: Some(cpuset.clone()) };
        let id = GuestId::new_v4();
        let cg = h.guest(id);
        cg.create(&limits()).unwrap();
        let name = id.to_string();
        assert_eq!(read(cpu.join(PARENT).join(&name).join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(cpu.join(PARENT).join(&name).join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(cpu.join(PARENT).join(&name).join("cpu.shares")), "2048");
        assert!(cpuacct.join(PARENT).join(&name).is_dir());
        assert_eq!(read(cpuset.join(PARENT).join("cpuset.cpus")), "0-3");
        assert_eq!(read(cpuset.join(PARENT).join("cpuset.mems")), "0");
        assert_eq!(read(cpuset.join(PARENT).join(&name).join("cpuset.mems")), "0");
        assert_eq!(read(cpuset.join(PARENT).join(&name).join("cpuset.cpus")), "0,1");

        // No pin, no cpuset cgroup; no cpu limits, no writes to cpu files.
        let plain = h.guest(GuestId::new_v4());
        plain.create(&ResourceLimits::default()).unwrap();
        let [cpu_dir, acct_dir, set_dir] = plain.dirs().try_into().unwrap();
        assert!(cpu_dir.is_dir() && acct_dir.is_dir() && !set_dir.exists());
        assert_eq!(std::fs::read_dir(&cpu_dir).unwrap().count(), 0);

        std::fs::write(acct_dir.join("cpuacct.usage"), "1500000000\n").unwrap();
        std::fs::write(cpu_dir.join("cpu.stat"), "nr_periods 10\nnr_throttled 4\nthrottled_time 200000000\n").unwrap();
        let stat = plain.cpu_stat().unwrap();
        assert_eq!(
            stat,
            CpuStat {
                usage: Duration::from_millis(1500),
                periods: 10,
                throttled_periods: 4,
                throttled: Duration::from_millis(200)
            }
        );
    }

    /// A running guest's cap and shares rewritten, and removed back to
    /// the kernel's defaults, in both layouts.
    #[test]
    fn set_cpu_rewrites_and_removes_cap_and_shares() {
        let tmp = tempfile::tempdir().unwrap();
        let (cpu, cpuacct) = (tmp.path().join("cpu"), tmp.path().join("cpuacct"));
        let v1 = Hierarchy::V1 { cpu: Some(cpu.clone()), cpuacct: Some(cpuacct), cpuset: None };
        let id = GuestId::new_v4();
        let cg = v1.guest(id);
        let capped = ResourceLimits { cpu_cap_percent: Some(30), cpu_shares: Some(512), ..Default::default() };
        // No cgroup, nothing to rewrite: said so, with the path.
        let err = cg.set_cpu(&capped).unwrap_err();
        assert!(matches!(&err, CgroupError::Missing { path } if path.ends_with(id.to_string())), "{err}");
        cg.create(&ResourceLimits::default()).unwrap();
        let dir = cpu.join(PARENT).join(id.to_string());
        cg.set_cpu(&capped).unwrap();
        assert_eq!(read(dir.join("cpu.cfs_quota_us")), "30000");
        assert_eq!(read(dir.join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(dir.join("cpu.shares")), "512");
        cg.set_cpu(&ResourceLimits::default()).unwrap();
        assert_eq!(read(dir.join("cpu.cfs_quota_us")), "-1");
        assert_eq!(read(dir.join("cpu.shares")), "1024");

        // v2, for a guest started without CPU limits: the cpu controller
        // is enabled on the way.
        let root = tmp.path().join("unified");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io\n").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        std::fs::create_dir(root.join(PARENT)).unwrap();
        std::fs::write(root.join(PARENT).join("cgroup.subtree_control"), "").unwrap();
        let cg = Hierarchy::V2 { root: root.clone() }.guest(id);
        cg.create(&ResourceLimits::default()).unwrap();
        let dir = root.join(PARENT).join(id.to_string());
        // The controller never reached it: nothing to remove.
        cg.set_cpu(&ResourceLimits::default()).unwrap();
        assert!(!dir.join("cpu.max").exists());
        cg.set_cpu(&capped).unwrap();
        assert_eq!(read(root.join(PARENT).join("cgroup.subtree_control")), "+cpu");
        assert_eq!(read(dir.join("cpu.max")), "30000 100000");
        assert_eq!(read(dir.join("cpu.weight")), "50");
        cg.set_cpu(&ResourceLimits::default()).unwrap();
        assert_eq!(read(dir.join("cpu.max")), "max 100000");
        assert_eq!(read(dir.join("cpu.weight")), "100");
    }

    #[test]
    fn a_pin_without_a_cpuset_hierarchy_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let h = Hierarchy::V1 { cpu: Some(tmp.path().to_owned()), cpuacct: None, cpuset: None };
        let cg = h.guest(GuestId::new_v4());
        let err = cg.create(&ResourceLimits { cpu_pin: vec![0], ..Default::default() }).unwrap_err();
        assert!(matches!(err, CgroupError::NoController { controller: "cpuset", limit: "cpu_pin" }), "{err}");
        assert!(err.to_string().contains("cpu_pin"), "{err}");
    }
}
