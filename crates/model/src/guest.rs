//! Guests: their specification and their lifecycle.
//!
//! A guest is the logical machine an operator asked for. Its lifecycle, as
//! the manager tracks it, is this state machine (events in lower case):
//!
//! ```text
//!                provisioned            start                started
//!   Creating ───────────────► Stopped ─────────► Starting ───────────► Running
//!      │                       ▲  ▲  ▲              │  │                 │  │
//!      │ failed                │  │  └── stopped ───┘  │ crashed    stop │  │ crashed
//!      ▼                       │  │                    ▼                 ▼  ▼
//!    Failed ── start ──► Starting│ └──── stopped ── Stopping ◄──────── Crashed
//!                                │                   (stop)     start ──► Starting
//!                                └────────── stopped (Running shut itself down)
//!
//!   delete: any state but Deleting/Deleted ──► Deleting ── deleted ──► Deleted
//! ```
//!
//! [`GuestState::apply`] is the only place that decides transitions; it
//! matches exhaustively, so a new state cannot be added without deciding
//! every edge.

use serde::{Deserialize, Serialize};

use crate::{ByteSize, GuestId, HostId, VlanTag};

/// Checks a name for guests, hosts and VLANs: what DNS labels allow.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > 63 {
        return Err("must be at most 63 characters");
    }
    if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        return Err("may contain only lowercase letters, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must not start or end with '-'");
    }
    Ok(())
}

/// Relative importance: higher restarts first after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
pub struct Priority(pub u8);

impl Default for Priority {
    fn default() -> Self {
        Priority(50)
    }
}

/// A virtual disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskSpec {
    /// Bytes. For a block disk 0: the device's whole size, which only its
    /// host knows (a non-zero size must match the device's).
    #[serde(default)]
    pub size: ByteSize,
    /// What backs it. Default `qcow2`, so records and clients from before
    /// there were other kinds keep working.
    #[serde(default, skip_serializing_if = "DiskFormat::is_qcow2")]
    pub format: DiskFormat,
    /// The host block device of a `block` disk (absolute, under `/dev`);
    /// `None` for the file kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// What backs a virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    /// A thin qcow2 file on the guest's pool: internal snapshots, thin
    /// clones, storage moves, migration, growth.
    #[default]
    Qcow2,
    /// A sparse raw file on the guest's pool: no format layer between the
    /// guest and the file (no snapshots; clones are qcow2 overlays of it).
    Raw,
    /// A whole host block device (a disk, an LVM volume) given 1:1 to one
    /// guest: never created, grown, moved, snapshotted or deleted by drove.
    Block,
}

impl DiskFormat {
    pub fn is_qcow2(&self) -> bool {
        *self == DiskFormat::Qcow2
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
            DiskFormat::Block => "block",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DiskSpec {
    /// A thin qcow2 disk of `size`.
    pub fn qcow2(size: ByteSize) -> Self {
        DiskSpec { size, format: DiskFormat::Qcow2, path: None }
    }

    /// A raw file disk of `size`.
    pub fn raw(size: ByteSize) -> Self {
        DiskSpec { size, format: DiskFormat::Raw, path: None }
    }

    /// The whole host block device at `path`.
    pub fn block(path: impl Into<String>) -> Self {
        DiskSpec { size: ByteSize(0), format: DiskFormat::Block, path: Some(path.into()) }
    }

    /// The host block device it is, if it is one.
    pub fn block_path(&self) -> Option<&str> {
        match self.format {
            DiskFormat::Block => self.path.as_deref(),
            _ => None,
        }
    }

    /// Whether it is a file on the guest's pool (it takes pool space).
    pub fn on_pool(&self) -> bool {
        self.format != DiskFormat::Block
    }

    /// Checks what an operator asks for: the kind's rules
    /// ([`Self::validate_kind`]) and a file's size in whole MiB (a disk made
    /// from a boot image takes the image's size, which need not be); the
    /// reason reads after "disk N ".
    pub fn validate(&self) -> Result<(), String> {
        const MIB: u64 = 1 << 20;
        self.validate_kind()?;
        let b = self.size.bytes();
        if self.on_pool() && (b < MIB || !b.is_multiple_of(MIB)) {
            return Err(format!("size must be a whole number of MiB and at least 1M, got {b} bytes"));
        }
        Ok(())
    }

    /// Checks the kind's own rules: a path for a block device (and a sound
    /// one), none for a file.
    pub fn validate_kind(&self) -> Result<(), String> {
        match self.format {
            DiskFormat::Qcow2 | DiskFormat::Raw => {
                if let Some(p) = &self.path {
                    return Err(format!(
                        "is a {} file on the guest's pool and takes no path (got {p:?}); a host device is format block",
                        self.format
                    ));
                }
            }
            DiskFormat::Block => {
                let Some(p) = &self.path else {
                    return Err("is a block disk and needs the host device's path (e.g. /dev/sdb)".to_owned());
                };
                validate_block_path(p)?;
            }
        }
        Ok(())
    }

    /// "a raw file", "host block device /dev/sdb", "a qcow2 file".
    pub fn kind_phrase(&self) -> String {
        match self.format {
            DiskFormat::Block => format!("host block device {}", self.path.as_deref().unwrap_or("?")),
            f => format!("a {f} file"),
        }
    }

    /// How an operator reads it: `1G`, `1G raw`, `block /dev/sdb`.
    pub fn describe(&self) -> String {
        match (self.format, &self.path) {
            (DiskFormat::Block, Some(p)) if self.size.bytes() == 0 => format!("block {p}"),
            (DiskFormat::Block, Some(p)) => format!("block {p} ({})", self.size),
            (DiskFormat::Qcow2, _) => self.size.to_string(),
            (f, _) => format!("{} {f}", self.size),
        }
    }
}

/// Checks a host block device path: absolute, under `/dev`, no `..`, and
/// nothing QEMU's option syntax would split (`,`).
pub fn validate_block_path(p: &str) -> Result<(), String> {
    let rest = p.strip_prefix("/dev/").filter(|r| !r.is_empty()).ok_or_else(|| {
        format!("block device path must be absolute and under /dev (e.g. /dev/sdb, /dev/vg0/db), got {p:?}")
    })?;
    if rest.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("block device path {p:?} must not contain empty, '.' or '..' components"));
    }
    if p.contains(',') || p.chars().any(char::is_whitespace) {
        return Err(format!("block device path {p:?} must not contain ',' or spaces"));
    }
    Ok(())
}

/// A virtual NIC on a VLAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NicSpec {
    pub vlan: VlanTag,
    /// Assigned by the manager at creation: locally administered, unique.
    pub mac: String,
    /// The NIC's address on its VLAN's subnet, from the manager's IPAM; the
    /// guest configures it at boot. None on a VLAN without a subnet.
    #[serde(default)]
    pub address: Option<crate::vlan::NicAddress>,
    /// Bandwidth cap of this NIC, bits per second, each direction; overrides
    /// the guest's `limits.nic_rate_bps`.
    #[serde(default)]
    pub rate_bps: Option<u64>,
}

impl GuestSpec {
    /// The uplink bandwidth its NIC limits reserve, bits per second.
    pub fn nic_reservation(&self) -> u64 {
        self.nics.iter().filter_map(|n| n.effective_rate(&self.limits)).sum()
    }
}

impl NicSpec {
    /// A NIC with no address and no cap of its own.
    pub fn new(vlan: VlanTag, mac: impl Into<String>) -> Self {
        NicSpec { vlan, mac: mac.into(), address: None, rate_bps: None }
    }

    /// The cap that applies to this NIC of a guest with `limits`.
    pub fn effective_rate(&self, limits: &ResourceLimits) -> Option<u64> {
        self.rate_bps.or(limits.nic_rate_bps)
    }
}

/// Expected CPU use over the day: 24 hourly fractions of the guest's vCPUs
/// (0.0..=1.0). Placement uses it to pack complementary guests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoadProfile {
    pub hourly_cpu: Vec<f32>,
}

impl LoadProfile {
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.hourly_cpu.len() != 24 {
            return Err("needs exactly 24 hourly values");
        }
        if self.hourly_cpu.iter().any(|v| !(0.0..=1.0).contains(v)) {
            return Err("values must be between 0.0 and 1.0");
        }
        Ok(())
    }
}

/// Resource controls of a guest. Every field is optional: `None` (or an
/// empty pin list) means no control of that kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResourceLimits {
    /// CPU cap in percent of one host core (50 = half a core, 200 = two).
    #[serde(default)]
    pub cpu_cap_percent: Option<u32>,
    /// Relative CPU weight against other guests on the host (cgroup v1
    /// shares, 2..=262144; 1024 is the default weight).
    #[serde(default)]
    pub cpu_shares: Option<u32>,
    /// Host cores the guest's vCPUs may run on.
    #[serde(default)]
    pub cpu_pin: Vec<u32>,
    /// Disk throughput cap, bytes per second, for each of its disks.
    #[serde(default)]
    pub disk_bps: Option<u64>,
    /// Disk operations cap, per second, for each of its disks.
    #[serde(default)]
    pub disk_iops: Option<u64>,
    /// Bandwidth cap of each of its NICs, bits per second.
    #[serde(default)]
    pub nic_rate_bps: Option<u64>,
}

impl ResourceLimits {
    /// Checks values against the guest's own size; says which field is wrong.
    pub fn validate(&self, vcpus: u32) -> Result<(), (&'static str, String)> {
        if let Some(cap) = self.cpu_cap_percent
            && (cap == 0 || cap > 100 * vcpus)
        {
            return Err((
                "cpu_cap_percent",
                format!("CPU cap must be 1..={}% for {vcpus} vCPUs, got {cap}%", 100 * vcpus),
            ));
        }
        if let Some(shares) = self.cpu_shares
            && !(2..=262_144).contains(&shares)
        {
            return Err(("cpu_shares", format!("CPU shares must be 2..=262144, got {shares}")));
        }
        let mut pins = self.cpu_pin.clone();
        pins.sort_unstable();
        pins.dedup();
        if pins.len() != self.cpu_pin.len() {
            return Err(("cpu_pin", "CPU pin list names a core twice".to_owned()));
        }
        for (field, v) in
            [("disk_bps", self.disk_bps), ("disk_iops", self.disk_iops), ("nic_rate_bps", self.nic_rate_bps)]
        {
            if v == Some(0) {
                return Err((field, format!("{field} must be positive when set")));
            }
        }
        Ok(())
    }
}

/// The most NICs a guest has.
pub const MAX_NICS: usize = 8;

/// What a guest is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory: ByteSize,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    pub priority: Priority,
    pub load_profile: Option<LoadProfile>,
    #[serde(default)]
    pub limits: ResourceLimits,
    /// Absolute path on the host of a base qcow2 image the guest boots from
    /// (BIOS boot): its first disk becomes a copy-on-write overlay of it.
    /// Without it, the guest boots the backend's own kernel and initramfs.
    #[serde(default)]
    pub image: Option<String>,
    /// Where its disks come from when its host provisions it: another guest
    /// (a clone), on the same host or on the shared pool. Without it, its
    /// disks start empty (or as overlays of `image`).
    #[serde(default)]
    pub clone_of: Option<CloneSource>,
    /// Where its disks live.
    #[serde(default)]
    pub storage: Storage,
    /// Guests of one anti-affinity group never share a host (placement,
    /// migration and failover all keep them apart): replicas of one service
    /// survive the loss of any one host.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// vCPUs and memory added while it ran, and what it had before: its
    /// hardware layout from then on (every later boot and every migration
    /// target reproduce it device for device, which a live migration
    /// needs). `None`: all of `vcpus` and `memory` are boot hardware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_added: Option<HotAdded>,
}

/// vCPUs and memory a guest got while running (see [`GuestSpec::hot_added`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HotAdded {
    /// vCPUs it booted with; the rest of `vcpus` are hot-added CPU devices.
    pub base_vcpus: u32,
    /// Memory it booted with; the rest of `memory` is in `dimms`.
    pub base_memory: ByteSize,
    /// Each memory module added, in order.
    #[serde(default)]
    pub dimms: Vec<ByteSize>,
}

impl GuestSpec {
    /// Its first disk that is not qcow2, with its index: what refuses
    /// internal snapshots.
    pub fn first_non_qcow2_disk(&self) -> Option<(usize, &DiskSpec)> {
        self.disks.iter().enumerate().find(|(_, d)| d.format != DiskFormat::Qcow2)
    }

    /// Its first block-device disk, with its index.
    pub fn first_block_disk(&self) -> Option<(usize, &DiskSpec)> {
        self.disks.iter().enumerate().find(|(_, d)| d.format == DiskFormat::Block)
    }

    /// Why internal snapshots cannot be taken of it (they live in qcow2
    /// files), if they cannot; the reason names the disk.
    pub fn snapshot_refusal(&self) -> Option<String> {
        self.first_non_qcow2_disk().map(|(i, d)| {
            format!(
                "its disk {i} is {}: snapshots live inside qcow2 disks, and every disk of a snapshotted guest \
                 must be one",
                d.kind_phrase()
            )
        })
    }

    /// Why it cannot be live-migrated, if it cannot (a block device is on
    /// its host only).
    pub fn migration_refusal(&self) -> Option<String> {
        self.first_block_disk().map(|(i, d)| {
            format!(
                "its disk {i} is {}, which exists on its host only (block devices on a shared SAN are not \
                 supported yet); stop it and move the device's data yourself",
                d.kind_phrase()
            )
        })
    }

    /// Why its disks cannot move between pools, if they cannot.
    pub fn storage_move_refusal(&self) -> Option<String> {
        self.first_block_disk()
            .map(|(i, d)| format!("its disk {i} is {}, which is on no pool and stays where it is", d.kind_phrase()))
    }

    /// Why its disk `index` cannot grow, if it cannot.
    pub fn grow_refusal(&self, index: usize) -> Option<String> {
        let d = self.disks.get(index)?;
        (d.format == DiskFormat::Block).then(|| {
            format!(
                "its disk {index} is {}: its size is the device's (grow the device, then restart the guest)",
                d.kind_phrase()
            )
        })
    }

    /// The pool space its disks may grow to (block devices take none).
    pub fn pool_bytes(&self) -> u64 {
        self.disks.iter().filter(|d| d.on_pool()).map(|d| d.size.bytes()).sum()
    }

    /// vCPUs of the boot layout.
    pub fn base_vcpus(&self) -> u32 {
        self.hot_added.as_ref().map_or(self.vcpus, |h| h.base_vcpus)
    }

    /// Memory of the boot layout.
    pub fn base_memory(&self) -> ByteSize {
        self.hot_added.as_ref().map_or(self.memory, |h| h.base_memory)
    }

    /// Records vCPUs grown to `vcpus` while running.
    pub fn grow_vcpus_to(&mut self, vcpus: u32) {
        if vcpus > self.vcpus {
            self.hot_added_mut();
            self.vcpus = vcpus;
        }
    }

    /// Records memory grown to `memory` while running: one module of the
    /// difference.
    pub fn grow_memory_to(&mut self, memory: ByteSize) {
        if memory > self.memory {
            let more = ByteSize(memory.bytes() - self.memory.bytes());
            self.hot_added_mut().dimms.push(more);
            self.memory = memory;
        }
    }

    /// Records disk `index` grown to `size` (a disk never shrinks; an index
    /// it does not have changes nothing).
    pub fn grow_disk_to(&mut self, index: usize, size: ByteSize) {
        if let Some(d) = self.disks.get_mut(index)
            && size > d.size
        {
            d.size = size;
        }
    }

    fn hot_added_mut(&mut self) -> &mut HotAdded {
        let (vcpus, memory) = (self.vcpus, self.memory);
        self.hot_added.get_or_insert_with(|| HotAdded { base_vcpus: vcpus, base_memory: memory, dimms: Vec::new() })
    }
}

/// Where a guest's disks live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On its host's own disks: a live migration mirrors them to the
    /// target, and if the host dies the guest waits for it to come back.
    #[default]
    Local,
    /// On the pool every host sees (NFS or a SAN in production, a shared
    /// directory in the lab): a migration copies no disk, and if its host
    /// dies the guest restarts on a survivor.
    Shared,
}

impl Storage {
    pub fn as_str(self) -> &'static str {
        match self {
            Storage::Local => "local",
            Storage::Shared => "shared",
        }
    }
}

impl std::fmt::Display for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Storage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Self::Local),
            "shared" => Ok(Self::Shared),
            other => Err(format!("unknown storage {other:?} (expected local or shared)")),
        }
    }
}

/// The disks a clone is provisioned from (see [`GuestSpec::clone_of`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloneSource {
    /// The guest whose disks are cloned: on the clone's host, or (with
    /// `shared_disks`) on the shared pool.
    pub guest: GuestId,
    /// Its snapshot to clone from (restore as a copy); `None`: its present
    /// disks (at one instant, if it runs).
    #[serde(default)]
    pub snapshot: Option<String>,
    pub mode: CloneMode,
    /// The source's disks, when they are on the shared pool and the source
    /// does not run (a template, or a stopped guest): then the clone may be
    /// made on any host with the pool, which reads them there
    /// (`<pool>/<source id>/disk<N>.<format>`) without the source's record,
    /// which only the source's host has; the source's own host still makes
    /// it from that record. `None`: only the source's host can make it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_disks: Option<Vec<DiskSpec>>,
}

/// How a clone's disks relate to its source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CloneMode {
    /// Independent copies: once provisioned, the clone needs nothing of its
    /// source (a boot image both use stays the shared read-only base).
    Copy,
    /// Thin copy-on-write overlays on the source's disks, which must stay
    /// unchanged for the clone's lifetime: only for templates.
    Overlay,
}

impl CloneSource {
    /// Whether the clone depends on its source now: an overlay always, a
    /// copy while it is being made.
    pub fn binds(&self, clone_state: GuestState) -> bool {
        self.mode == CloneMode::Overlay || clone_state == GuestState::Creating
    }
}

/// What happens when a guest stops without being asked to: it crashed,
/// its host died, or its own OS powered it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Restart it after a crash or a host failure (with exponential backoff
    /// between crashes), and also when its OS powered itself off.
    Always,
    /// Restart it after a crash or a host failure; a guest whose OS powered
    /// itself off stays off.
    #[default]
    OnFailure,
    /// Leave it crashed (and stopped) for the operator, also after a host
    /// failure.
    Never,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }

    /// Whether a guest that died with its host, or crashed, comes back.
    pub fn restarts_after_failure(self) -> bool {
        self != RestartPolicy::Never
    }
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "on-failure" | "on_failure" => Ok(Self::OnFailure),
            "never" => Ok(Self::Never),
            other => Err(format!("unknown restart policy {other:?} (expected always, on-failure or never)")),
        }
    }
}

/// Whether the operator wants the guest running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerIntent {
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuestState {
    Creating,
    Stopped,
    Starting,
    Running,
    Stopping,
    Crashed,
    Failed,
    Deleting,
    Deleted,
}

impl GuestState {
    pub const ALL: [GuestState; 9] = [
        GuestState::Creating,
        GuestState::Stopped,
        GuestState::Starting,
        GuestState::Running,
        GuestState::Stopping,
        GuestState::Crashed,
        GuestState::Failed,
        GuestState::Deleting,
        GuestState::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GuestState::Creating => "creating",
            GuestState::Stopped => "stopped",
            GuestState::Starting => "starting",
            GuestState::Running => "running",
            GuestState::Stopping => "stopping",
            GuestState::Crashed => "crashed",
            GuestState::Failed => "failed",
            GuestState::Deleting => "deleting",
            GuestState::Deleted => "deleted",
        }
    }
}

impl std::fmt::Display for GuestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What can happen to a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestEvent {
    /// The host created its disks and definition.
    Provisioned,
    /// The operator (or a policy) asked it to start.
    Start,
    /// The hypervisor reports it running.
    Started,
    /// The operator asked it to stop.
    Stop,
    /// The hypervisor reports it stopped.
    Stopped,
    /// It died without being asked to.
    Crashed,
    /// Provisioning or starting failed.
    Failed,
    /// The operator asked to delete it.
    Delete,
    /// The host removed it and its disks.
    Deleted,
}

impl GuestEvent {
    pub const ALL: [GuestEvent; 9] = [
        GuestEvent::Provisioned,
        GuestEvent::Start,
        GuestEvent::Started,
        GuestEvent::Stop,
        GuestEvent::Stopped,
        GuestEvent::Crashed,
        GuestEvent::Failed,
        GuestEvent::Delete,
        GuestEvent::Deleted,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {state} guest cannot take event {event:?}")]
pub struct InvalidGuestTransition {
    pub state: GuestState,
    pub event: GuestEvent,
}

impl GuestState {
    /// The one function that decides guest transitions.
    pub fn apply(self, event: GuestEvent) -> Result<GuestState, InvalidGuestTransition> {
        use GuestEvent as E;
        use GuestState as S;
        let next = match (self, event) {
            (S::Creating, E::Provisioned) => S::Stopped,
            (S::Creating | S::Starting, E::Failed) => S::Failed,
            (S::Stopped | S::Crashed | S::Failed, E::Start) => S::Starting,
            (S::Starting, E::Started) => S::Running,
            (S::Running | S::Starting, E::Stop) => S::Stopping,
            (S::Stopping | S::Running | S::Starting, E::Stopped) => S::Stopped,
            (S::Running | S::Starting | S::Stopping, E::Crashed) => S::Crashed,
            (S::Creating | S::Stopped | S::Starting | S::Running | S::Stopping | S::Crashed | S::Failed, E::Delete) => {
                S::Deleting
            }
            (S::Deleting, E::Deleted) => S::Deleted,
            (
                S::Creating
                | S::Stopped
                | S::Starting
                | S::Running
                | S::Stopping
                | S::Crashed
                | S::Failed
                | S::Deleting
                | S::Deleted,
                _,
            ) => return Err(InvalidGuestTransition { state: self, event }),
        };
        Ok(next)
    }

    /// Whether the guest holds capacity on its host (placement must count it).
    pub fn holds_capacity(self) -> bool {
        !matches!(self, GuestState::Deleted)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, GuestState::Deleted)
    }
}

/// A guest as the manager stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Guest {
    pub id: GuestId,
    pub spec: GuestSpec,
    /// The host it is placed on.
    pub host: HostId,
    pub state: GuestState,
    /// What the operator wants.
    pub intent: PowerIntent,
    /// Bumped on every change of desired state; agents echo it so stale
    /// reports can be told apart from fresh ones.
    pub generation: u64,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// The last error seen for this guest, if any.
    pub last_error: Option<String>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// How many times its host restarted it after a crash.
    #[serde(default)]
    pub restarts: u32,
    /// Its snapshots, in the order they were taken; a tree by `parent`.
    #[serde(default)]
    pub snapshots: Vec<crate::Snapshot>,
    /// The snapshot its present state descends from (the last one taken or
    /// restored), the parent of the next one.
    #[serde(default)]
    pub current_snapshot: Option<String>,
    /// The live migration in progress, if any.
    #[serde(default)]
    pub migration: Option<crate::migration::Migration>,
    /// How its last live migration went.
    #[serde(default)]
    pub last_migration: Option<crate::migration::MigrationResult>,
    /// A template: read-only, never started; clones of it are thin overlays
    /// on its disks.
    #[serde(default)]
    pub template: bool,
    /// Its last restart on another host after its host failed.
    #[serde(default)]
    pub last_failover: Option<FailoverRecord>,
    /// The pool its disks are being moved to, while a move runs: until
    /// the move settles, its host alone knows which files are the guest's.
    #[serde(default)]
    pub moving_storage: Option<Storage>,
    /// How its disks last moved between pools.
    #[serde(default)]
    pub last_storage_move: Option<StorageMoved>,
    /// A hardware or limits change relayed to its host whose outcome is not
    /// recorded yet. Written before the change is relayed, so that a
    /// manager that crashes or loses the answer still knows the host may
    /// hold a newer definition than `spec`.
    #[serde(default)]
    pub pending_spec: Option<PendingSpec>,
}

/// A change to a guest's definition its host may or may not have made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PendingSpec {
    /// The guest's spec once the change is made.
    pub spec: GuestSpec,
    /// The change, for people (e.g. "add disk 32M").
    pub what: String,
    /// When it was asked (RFC 3339).
    pub since: String,
}

/// Whether two specs agree on what hotplug and limits changes touch: vCPUs,
/// memory, the disks' sizes, the NICs' MACs, and the limits.
pub fn same_hardware(a: &GuestSpec, b: &GuestSpec) -> bool {
    a.vcpus == b.vcpus
        && a.memory == b.memory
        && a.limits == b.limits
        && a.disks.len() == b.disks.len()
        && a.disks.iter().zip(&b.disks).all(|(x, y)| x.size == y.size)
        && a.nics.len() == b.nics.len()
        && a.nics.iter().zip(&b.nics).all(|(x, y)| x.mac.eq_ignore_ascii_case(&y.mac))
}

/// A move of a guest's disks between pools, as its host did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StorageMoved {
    /// The pool the disks were on.
    pub from: Storage,
    /// The pool they are on now (`from` when they were there already).
    pub to: Storage,
    /// Copied under a running guest (a block mirror, the guest kept
    /// running) rather than from files nobody had open.
    pub live: bool,
    /// Bytes copied: what the new files hold on the target pool (thin
    /// disks: their data, not their size); zero when there was nothing to
    /// move.
    pub bytes: u64,
    /// From the first copy to the old files' removal, milliseconds.
    pub duration_ms: u64,
}

/// A guest's restart on a survivor after its host failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FailoverRecord {
    /// The failed host's name.
    pub from: String,
    /// The survivor's name.
    pub to: String,
    /// When it was assigned to the survivor (Unix milliseconds).
    pub at_ms: u64,
    /// Milliseconds from the host's last heartbeat to the reassignment:
    /// the lease running out plus the fencing margin.
    pub detect_ms: u64,
    /// When the survivor reported it running again (Unix milliseconds);
    /// `None` while it boots, or when it was moved stopped.
    pub running_ms: Option<u64>,
    /// When its OS was up there (its guest agent answered; Unix ms).
    #[serde(default)]
    pub ready_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn happy_path() {
        let mut s = GuestState::Creating;
        for e in
            [GuestEvent::Provisioned, GuestEvent::Start, GuestEvent::Started, GuestEvent::Stop, GuestEvent::Stopped]
        {
            s = s.apply(e).expect("valid transition");
        }
        assert_eq!(s, GuestState::Stopped);
        assert_eq!(s.apply(GuestEvent::Delete).and_then(|s| s.apply(GuestEvent::Deleted)), Ok(GuestState::Deleted));
    }

    #[test]
    fn invalid_transitions_are_errors() {
        assert!(GuestState::Creating.apply(GuestEvent::Started).is_err());
        assert!(GuestState::Running.apply(GuestEvent::Start).is_err());
        assert!(GuestState::Deleted.apply(GuestEvent::Start).is_err());
        assert!(GuestState::Deleting.apply(GuestEvent::Delete).is_err());
        let e = GuestState::Running.apply(GuestEvent::Provisioned).expect_err("invalid");
        assert_eq!(e.to_string(), "a running guest cannot take event Provisioned");
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web-1").is_ok());
        for bad in ["", "Web", "-a", "a-", "a_b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    fn event() -> impl Strategy<Value = GuestEvent> {
        prop::sample::select(GuestEvent::ALL.to_vec())
    }

    proptest! {
        /// Over any sequence of events: rejected events leave the state as it
        /// was, Deleted is absorbing, a guest is only Running after Started,
        /// and every reachable state can still be deleted unless it already is
        /// being deleted.
        #[test]
        fn random_event_sequences_respect_the_lifecycle(events in prop::collection::vec(event(), 0..64)) {
            let mut s = GuestState::Creating;
            for e in events {
                let before = s;
                match s.apply(e) {
                    Ok(next) => {
                        prop_assert!(before != GuestState::Deleted, "left Deleted via {e:?}");
                        if next == GuestState::Running {
                            prop_assert_eq!(e, GuestEvent::Started);
                            prop_assert_eq!(before, GuestState::Starting);
                        }
                        if next == GuestState::Deleted {
                            prop_assert_eq!(before, GuestState::Deleting);
                        }
                        s = next;
                    }
                    Err(err) => {
                        prop_assert_eq!(err.state, before);
                        prop_assert_eq!(err.event, e);
                    }
                }
                let deletable = s.apply(GuestEvent::Delete).is_ok();
                prop_assert_eq!(deletable, !matches!(s, GuestState::Deleting | GuestState::Deleted));
            }
        }

        /// Every state reachable from Creating can reach Deleted.
        #[test]
        fn every_reachable_state_can_be_retired(events in prop::collection::vec(event(), 0..32)) {
            let mut s = GuestState::Creating;
            for e in events {
                s = s.apply(e).unwrap_or(s);
            }
            let end = match s {
                GuestState::Deleted => Ok(s),
                GuestState::Deleting => s.apply(GuestEvent::Deleted),
                _ => s.apply(GuestEvent::Delete).and_then(|d| d.apply(GuestEvent::Deleted)),
            };
            prop_assert_eq!(end, Ok(GuestState::Deleted));
        }
    }

    #[test]
    fn disk_kinds_default_to_qcow2_and_old_records_read() {
        let old: DiskSpec = serde_json::from_str(r#"{"size":1073741824}"#).expect("old record");
        assert_eq!(old, DiskSpec::qcow2(ByteSize::gib(1)));
        assert_eq!(serde_json::to_string(&old).expect("ser"), r#"{"size":1073741824}"#);
        let b: DiskSpec = serde_json::from_str(r#"{"format":"block","path":"/dev/sdb"}"#).expect("block");
        assert_eq!(b, DiskSpec::block("/dev/sdb"));
        assert_eq!(b.block_path(), Some("/dev/sdb"));
        assert!(!b.on_pool());
    }

    #[test]
    fn disk_validation_says_what_is_wrong() {
        assert!(DiskSpec::raw(ByteSize::gib(1)).validate().is_ok());
        assert!(DiskSpec::block("/dev/vg0/db").validate().is_ok());
        let e = DiskSpec::raw(ByteSize(1000)).validate().expect_err("tiny");
        assert!(e.contains("whole number of MiB"), "{e}");
        let e = DiskSpec { path: None, ..DiskSpec::block("x") }.validate().expect_err("no path");
        assert!(e.contains("needs the host device's path"), "{e}");
        for bad in ["sdb", "/tmp/disk", "/dev/", "/dev/../etc/passwd", "/dev/sd,b", "/dev//sdb"] {
            let e = DiskSpec::block(bad).validate().expect_err(bad);
            assert!(e.contains("block device path"), "{bad}: {e}");
        }
        let e =
            DiskSpec { path: Some("/dev/sdb".into()), ..DiskSpec::raw(ByteSize::gib(1)) }.validate().expect_err("p");
        assert!(e.contains("takes no path"), "{e}");
    }

    #[test]
    fn a_guest_names_its_first_disk_of_each_kind() {
        let mut spec: GuestSpec = serde_json::from_value(serde_json::json!({
            "name": "g", "vcpus": 1, "memory": 1u64 << 28, "disks": [{"size": 1u64 << 30}],
            "nics": [], "priority": 50, "load_profile": null
        }))
        .expect("spec");
        assert_eq!(spec.first_non_qcow2_disk(), None);
        spec.disks.push(DiskSpec::raw(ByteSize::gib(2)));
        spec.disks.push(DiskSpec::block("/dev/sdb"));
        assert_eq!(spec.first_non_qcow2_disk().map(|(i, _)| i), Some(1));
        assert_eq!(spec.first_block_disk().map(|(i, _)| i), Some(2));
        assert_eq!(spec.pool_bytes(), 3 << 30);
        assert_eq!(spec.disks[2].describe(), "block /dev/sdb");
        assert_eq!(spec.disks[1].describe(), "2G raw");
    }
}
