//! The manager's HTTP API: request and response types shared by the server,
//! the client, the CLI and the agents.
//!
//! The OpenAPI document is generated from these types plus the server's
//! route annotations and checked in at `openapi/drove.json`; a manager test
//! fails when the served document and the checked-in one differ.

use drove_model::guest::{Storage, StorageMoved};
use drove_model::migration::{IncomingDone, MigrationKey, MigrationProgress, MigrationStats, Outgoing};
use drove_model::{
    ByteSize, Guest, GuestId, HostId, HostInfo, HypervisorKind, Operation, OperationId, ResourceLimits, RestartPolicy,
    RestoreOutcome, Snapshot, SnapshotKind, Vlan, guest::LoadProfile,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every path of the API starts with this.
pub const API_PREFIX: &str = "/v1";

/// Error body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `invalid_request`, `not_found`.
    pub code: String,
    /// One line for people: what was wrong and why.
    pub message: String,
    /// The request field at fault, where there is one.
    pub field: Option<String>,
}

// ---- hosts ----------------------------------------------------------------

/// A host with its current allocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    #[serde(flatten)]
    pub info: HostInfo,
    /// vCPUs of guests placed here.
    pub allocated_vcpus: u32,
    /// Memory of guests placed here.
    pub allocated_memory: ByteSize,
    /// Uplink bandwidth reserved by the NIC limits of guests placed here.
    #[serde(default)]
    pub allocated_nic_bps: u64,
    pub guests: u32,
    /// Milliseconds since the agent was last heard from (`None`: not since
    /// this manager started).
    pub last_seen_ms: Option<u64>,
    /// Guests the host runs that the manager has no record of (left alone,
    /// never destroyed: an operator decides).
    pub orphans: u32,
}

/// What would happen to a host's guests if it failed now
/// (`GET /v1/hosts/{host}/failover-plan`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FailoverPlanView {
    pub host: String,
    /// Guests that restart on survivors, highest priority first.
    pub restarts: Vec<PlannedRestart>,
    /// Guests that would not restart anywhere, and why.
    pub stranded: Vec<StrandedGuest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlannedRestart {
    pub guest: String,
    pub to: String,
    /// Boots in this wave (0 first): a survivor boots a few at a time.
    pub wave: usize,
    pub priority: u8,
    /// Started there (`false`: moved stopped, as it is now or by its
    /// restart policy).
    pub start: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StrandedGuest {
    pub guest: String,
    pub reason: String,
}

/// The high-availability settings (`GET`/`PUT /v1/settings/ha`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HaSettings {
    /// Host failures the cluster keeps room to restart every guest after.
    pub tolerate_failures: u32,
    /// What a create or start that would eat into that reserve gets.
    pub admission: Admission,
}

impl Default for HaSettings {
    fn default() -> Self {
        HaSettings { tolerate_failures: 0, admission: Admission::Refuse }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Refused with the reason.
    Refuse,
    /// Accepted, with the reason logged and in the answer's warnings.
    Warn,
}

impl std::str::FromStr for Admission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "refuse" => Ok(Self::Refuse),
            "warn" => Ok(Self::Warn),
            other => Err(format!("unknown admission mode {other:?} (expected refuse or warn)")),
        }
    }
}

/// The HA reserve now: whether every guest could restart after the
/// tolerated failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HaStatus {
    #[serde(flatten)]
    pub settings: HaSettings,
    /// `None`: the reserve holds; otherwise what would not restart.
    pub shortfall: Option<String>,
}

/// Put a host into maintenance (no new guests) or take it out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MaintenanceRequest {
    pub enabled: bool,
}

// ---- guests ---------------------------------------------------------------

/// A NIC to attach: a VLAN by name or id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NicRequest {
    pub vlan: String,
    /// A fixed address on the VLAN's subnet; by default the next free one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Bandwidth cap of this NIC, bits per second, each direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u64>,
}

impl NicRequest {
    pub fn on(vlan: impl Into<String>) -> Self {
        NicRequest { vlan: vlan.into(), ip: None, rate_bps: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateGuestRequest {
    pub name: String,
    pub vcpus: u32,
    /// Bytes.
    pub memory: ByteSize,
    /// The virtual disks: each a size in bytes (a thin qcow2 disk, as
    /// before there were other kinds) or a disk object (`format` qcow2, raw
    /// or block; a block disk names its host device in `path`).
    #[serde(default)]
    pub disks: Vec<DiskRequest>,
    #[serde(default)]
    pub nics: Vec<NicRequest>,
    /// Pin placement to this host (name or id).
    #[serde(default)]
    pub host: Option<String>,
    /// 0..=100; higher restarts first. Default 50.
    #[serde(default)]
    pub priority: Option<u8>,
    /// Start after creation. Default true.
    #[serde(default)]
    pub start: Option<bool>,
    #[serde(default)]
    pub load_profile: Option<LoadProfile>,
    /// What to do when it stops unasked. Default: restart after a crash or
    /// a host failure (`on_failure`).
    #[serde(default)]
    pub restart_policy: Option<RestartPolicy>,
    /// CPU, disk and NIC controls. Default: none.
    #[serde(default)]
    pub limits: Option<ResourceLimits>,
    /// Boot from this imported image (its first disk is a copy-on-write
    /// overlay of it). Default: the built-in test image.
    #[serde(default)]
    pub image: Option<String>,
    /// Where its disks live: `local` (default) or `shared` (the pool every
    /// host sees: the guest restarts elsewhere if its host dies).
    #[serde(default)]
    pub storage: Option<drove_model::guest::Storage>,
    /// Its anti-affinity group: guests of one group never share a host.
    #[serde(default)]
    pub anti_affinity: Option<String>,
}

/// One disk of a create request: a bare size (a thin qcow2 disk) or a
/// full disk description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DiskRequest {
    Size(ByteSize),
    Disk(drove_model::DiskSpec),
}

impl DiskRequest {
    pub fn spec(&self) -> drove_model::DiskSpec {
        match self {
            DiskRequest::Size(size) => drove_model::DiskSpec::qcow2(*size),
            DiskRequest::Disk(d) => d.clone(),
        }
    }
}

impl From<ByteSize> for DiskRequest {
    fn from(size: ByteSize) -> Self {
        DiskRequest::Size(size)
    }
}

impl From<drove_model::DiskSpec> for DiskRequest {
    fn from(d: drove_model::DiskSpec) -> Self {
        DiskRequest::Disk(d)
    }
}

/// Import a qcow2 file into the image pool (`POST /v1/images`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImportImageRequest {
    pub name: String,
    /// A qcow2 file on the manager's machine; it is copied into the pool.
    pub path: String,
}

impl CreateGuestRequest {
    /// A request with only the required fields; the rest take their defaults.
    pub fn new(name: &str, vcpus: u32, memory: ByteSize) -> Self {
        CreateGuestRequest {
            name: name.to_owned(),
            vcpus,
            memory,
            disks: Vec::new(),
            nics: Vec::new(),
            host: None,
            priority: None,
            start: None,
            load_profile: None,
            restart_policy: None,
            limits: None,
            image: None,
            storage: None,
            anti_affinity: None,
        }
    }
}

/// A guest with names resolved for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuestView {
    #[serde(flatten)]
    pub guest: Guest,
    pub host_name: String,
    /// Guests that need this one: thin clones of a template (always), and
    /// clones being copied from it (until they are made). Deleting it is
    /// refused while there are any, unless forced.
    #[serde(default)]
    pub dependents: Vec<String>,
    /// What the guest has been measured to use, per UTC hour (see
    /// `drove_model::load`); absent until its host reported a rate.
    #[serde(default)]
    pub measured_load: Option<drove_model::MeasuredLoad>,
}

/// Clone a guest (`POST /v1/guests/{guest}/clone`): each clone gets the
/// source's size, disks (copies, or thin overlays of a template) and
/// storage pool, with a fresh identity: its own name, new MACs and new
/// addresses on the same VLANs. Clones go on the source's host, or, when the
/// source's disks are on the shared pool and it does not run (a template or
/// a stopped guest), on `host` or wherever placement puts each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloneGuestRequest {
    /// The clone's name; with `count` > 1, clones are named `NAME-1` ..
    /// `NAME-K`.
    pub name: String,
    /// How many clones. Default 1, at most 64.
    #[serde(default)]
    pub count: Option<u32>,
    /// Clone the disks as they were at this snapshot of the source (restore
    /// as a copy) instead of as they are now.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Start each clone once made. Default true.
    #[serde(default)]
    pub start: Option<bool>,
    /// The host (name or id) to make the clones on. Another host than the
    /// source's only for a source on the shared pool that does not run.
    /// Default: the source's host, or, for such a source, a host per clone
    /// chosen as for a create.
    #[serde(default)]
    pub host: Option<String>,
}

/// Mark a stopped guest as a template, or a template as a plain guest again
/// (`POST /v1/guests/{guest}/template`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SetTemplateRequest {
    pub template: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct StopGuestRequest {
    /// Pull the plug instead of asking the guest OS to power off.
    #[serde(default)]
    pub force: bool,
}

/// Answer to a request that started a long-running operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OperationAccepted {
    pub operation: Operation,
    pub guest: GuestId,
}

// ---- VLANs ----------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateVlanRequest {
    /// 802.1Q id, 1..=4094.
    pub id: u32,
    pub name: String,
    /// IPv4 CIDR, e.g. `10.0.100.0/24`.
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VlanView {
    #[serde(flatten)]
    pub vlan: Vlan,
    /// NICs attached to it.
    pub nics: u32,
}

// ---- operations and audit --------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditRecord {
    /// Position in the log; strictly increasing.
    pub seq: u64,
    pub time: String,
    /// Who: the name of the token used.
    pub principal: String,
    /// What: method and path.
    pub action: String,
    /// The object acted on, where known.
    pub target: Option<String>,
    /// `ok` or the error message.
    pub result: String,
    pub status: u16,
    /// `hash` of the record before (64 zeros for the first).
    pub prev_hash: String,
    /// SHA-256 over this record's fields and `prev_hash`: changing,
    /// removing or reordering any record breaks every hash after it.
    pub hash: String,
}

impl AuditRecord {
    /// The chain link before the first record.
    pub const GENESIS: &'static str = "0000000000000000000000000000000000000000000000000000000000000000";

    /// The bytes the hash covers: every field but `hash`, unambiguously
    /// separated (lengths prefix the free-text fields).
    pub fn hashed_content(&self) -> String {
        let target = self.target.as_deref().unwrap_or("");
        format!(
            "drove-audit-v1|{}|{}|{}:{}|{}:{}|{}:{}|{}:{}|{}|{}",
            self.seq,
            self.time,
            self.principal.len(),
            self.principal,
            self.action.len(),
            self.action,
            target.len(),
            target,
            self.result.len(),
            self.result,
            self.status,
            self.prev_hash
        )
    }
}

/// The outcome of checking the audit chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditVerification {
    /// Records checked.
    pub records: u64,
    pub intact: bool,
    /// The first record whose link or hash does not match.
    pub first_bad_seq: Option<u64>,
    pub reason: Option<String>,
}

// ---- agent protocol ---------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// Unique host name; re-registering the same name (an agent restart)
    /// returns the same host.
    pub name: String,
    pub cores: u32,
    pub memory: ByteSize,
    pub hypervisor: HypervisorKind,
    /// The uplink guests' traffic to other hosts shares, bits per second.
    #[serde(default)]
    pub uplink_bps: Option<u64>,
    /// This host's address on the migration network.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub migration_address: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterResponse {
    pub host_id: HostId,
    /// How often the agent should send heartbeats.
    pub heartbeat_interval_ms: u64,
    /// How long each answered heartbeat keeps the host's lease, counted
    /// by the agent from when it sent the heartbeat. An agent that cannot
    /// renew in time fences itself: it hard-stops its guests and starts
    /// none until it has the lease again.
    #[serde(default)]
    pub lease_ms: Option<u64>,
}

/// What an agent sees of one guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    Stopped,
    Running,
    Paused,
    Crashed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ObservedGuest {
    pub id: GuestId,
    pub state: ObservedState,
    /// Generation of the definition the hypervisor holds.
    pub generation: u64,
    /// Running and its OS up (its guest agent answered since it started).
    #[serde(default)]
    pub ready: bool,
    /// Its resource use since the agent's previous sample of the same
    /// process; absent on the first sample of a process, for a guest
    /// without one, and from agents that do not measure.
    #[serde(default)]
    pub load: Option<drove_model::LoadSample>,
}

/// An action the agent tried and failed, for the generation it was at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuestFailure {
    pub id: GuestId,
    pub generation: u64,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatRequest {
    pub host_id: HostId,
    /// Every guest defined on the host.
    pub guests: Vec<ObservedGuest>,
    /// Failures since the last heartbeat.
    #[serde(default)]
    pub failures: Vec<GuestFailure>,
    /// Guests the agent found crashed and restarted (policy `always`) since
    /// its last delivered heartbeat, once per crash.
    #[serde(default)]
    pub restarted: Vec<GuestId>,
    /// Guests the manager wanted absent that the agent has destroyed; the
    /// manager forgets a deleted guest only on this explicit confirmation.
    #[serde(default)]
    pub destroyed: Vec<GuestId>,
    /// Long poll: if set, the manager answers as soon as this host's desired
    /// state changes, or after at most this many milliseconds.
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// The storage pools the host keeps disks in, and their space.
    #[serde(default)]
    pub pools: Vec<PoolReport>,
}

/// One storage pool as a host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolReport {
    /// `local` or `shared`.
    pub name: String,
    pub capacity: ByteSize,
    pub free: ByteSize,
}

/// The rebalancer's (DRS) last round (`GET /v1/drs`): what it recommended
/// and, in full mode, which migrations it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrsRound {
    /// `manual` (recommend only), `partial` (migrate off hosts over capacity) or
    /// `full` (migrate on its own).
    pub mode: String,
    /// When the round ran (RFC 3339); empty before the first.
    pub at: String,
    /// Seconds between rounds.
    pub interval_secs: u64,
    /// A host is hot above this share of its CPU or memory in its busiest
    /// hour, and is relieved down to `target`.
    pub hot: f64,
    pub target: f64,
    pub moves: Vec<DrsMove>,
    /// Hot hosts no move could relieve, and why.
    pub unresolved: Vec<DrsUnresolved>,
    /// Guests left out of this round: moved by DRS within the cool-down,
    /// busy with another operation, or not running.
    pub held: usize,
}

/// One recommended migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrsMove {
    pub guest: String,
    pub from: String,
    pub to: String,
    /// `hot` or `imbalance`.
    pub kind: String,
    /// One line an operator can read: which host, which hour, how full.
    pub reason: String,
    /// The migration started for it (full mode).
    #[schema(value_type = Option<String>)]
    pub operation: Option<OperationId>,
    /// Why it could not be started (full mode).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrsUnresolved {
    pub host: String,
    pub reason: String,
}

/// Power management's (DPM) last round (`GET /v1/dpm`): which hosts it
/// woke or emptied and put into standby, and the power this saves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DpmRound {
    /// `off`, `manual` (recommend only) or `full` (act on its own).
    pub mode: String,
    /// The power driver (`none`, `command`, `ipmi`, `wol`).
    pub driver: String,
    /// When the round ran (RFC 3339); empty before the first.
    pub at: String,
    pub interval_secs: u64,
    /// Hours of guests' load profiles the round looked at, from now.
    pub lookahead_hours: u32,
    /// Hosts powered on (up, maintenance, waking), in standby, and down.
    pub hosts_on: u32,
    pub hosts_standby: u32,
    /// Estimated wall power of the hosts now, and what the hosts in standby
    /// save against being on and idle.
    pub watts_now: f64,
    pub watts_saved: f64,
    /// Standby hosts to power on ahead of the load.
    pub wake: Vec<DpmHostAction>,
    /// Migrations that empty hosts.
    pub moves: Vec<DrsMove>,
    /// Hosts to put into standby once empty.
    pub standby: Vec<DpmHostAction>,
    /// Why the round did not plan (e.g. migrations still in flight).
    pub waiting: Option<String>,
    /// What went wrong carrying out earlier decisions (a power driver that
    /// failed, a host that did not wake in time).
    pub errors: Vec<String>,
}

/// One host DPM powers on or off, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DpmHostAction {
    pub host: String,
    pub reason: String,
    /// Done in full mode (`false` while a host waits for its guests to leave).
    pub done: bool,
    pub error: Option<String>,
}

/// A storage pool (`GET /v1/pools`): the shared one all hosts see, and each
/// host's local one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    /// `shared`, or `local@HOST`.
    pub name: String,
    pub kind: drove_model::guest::Storage,
    /// The hosts that report it.
    pub hosts: Vec<String>,
    /// Size of its filesystem (as last reported).
    pub capacity: ByteSize,
    /// Free there now: thin disks take only what they hold.
    pub free: ByteSize,
    /// What its guests' disks may grow to in all (their sizes).
    pub provisioned: ByteSize,
    /// Guests with their disks on it.
    pub guests: u32,
}

/// What the manager wants of one guest on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    Running,
    Stopped,
    /// Stop it and remove it with its disks.
    Absent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DesiredGuest {
    pub id: GuestId,
    pub generation: u64,
    pub state: DesiredState,
    pub spec: drove_model::GuestSpec,
    /// Whether a stop should be forced.
    pub force_stop: bool,
    pub restart_policy: RestartPolicy,
    /// Being migrated away: leave it alone (the migration's steps come as
    /// calls).
    #[serde(default)]
    pub migrating: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    pub guests: Vec<DesiredGuest>,
    /// Requests the manager relays to this host (console, log, exec).
    #[serde(default)]
    pub calls: Vec<AgentCall>,
    /// Guests this host still has that now live on another host (restarted
    /// there after this host failed): drop what the host holds of them —
    /// never their disks on shared storage.
    #[serde(default)]
    pub forget: Vec<GuestId>,
    /// How long this answer keeps the host's lease (see
    /// [`RegisterResponse::lease_ms`]).
    #[serde(default)]
    pub lease_ms: Option<u64>,
}

/// A request relayed from the manager to an agent. Calls are not durable:
/// they serve an operator waiting at the other end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentCall {
    pub id: u64,
    pub guest: GuestId,
    pub kind: AgentCallKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum AgentCallKind {
    /// Answer with the last `max_bytes` of the serial console history.
    ConsoleLog { max_bytes: u64 },
    /// Open `POST /v1/agent/console/{session}` and splice it with the
    /// guest's serial console.
    Console { session: String },
    /// Run a command inside the guest through its guest agent.
    Exec { command: Vec<String>, input: Option<String>, timeout_secs: u64 },
    /// List the guest's network interfaces through its guest agent.
    Interfaces,
    /// Reset the running guest (it reboots at once); answered with `done`.
    Reset,
    /// Add hardware to the running guest.
    Hotplug { change: HotplugChange },
    /// Give the guest these resource limits: at once if it runs, and in its
    /// definition for later starts.
    SetLimits { limits: ResourceLimits },
    /// Take, list, delete or restore a snapshot of the guest.
    Snapshot { call: SnapshotCall },
    /// One step of a live migration, on its source or target host.
    Migrate { call: MigrateCall },
    /// Move all the guest's disks to pool `to`; answered with
    /// `storage_moved`. Safe to repeat: a guest already there is answered
    /// at once, with nothing copied.
    MoveStorage { to: Storage },
    /// Answered with `definition`: the guest's definition as the host holds
    /// it, to settle a change whose answer the manager never got.
    Definition,
}

/// A live migration step relayed to one of the two hosts (see
/// `drove_model::migration`). Each is safe to repeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum MigrateCall {
    /// Target: make the guest's NICs and disks and wait for the stream on
    /// this host's migration address; answered with `prepared`.
    Prepare { generation: u64, spec: Box<drove_model::GuestSpec>, key: Option<MigrationKey> },
    /// Source: send the guest; `migration_progress` results on the way,
    /// answered with `sent`.
    Send { outgoing: Outgoing },
    /// Target: wait until the guest runs here; answered with `finished`.
    /// With `await_console` (the source saw the guest write to its console
    /// steadily), also wait a moment for the guest's first console output
    /// here, to measure the pause as the guest shows it.
    Finish {
        #[serde(default)]
        await_console: bool,
    },
    /// Source: abort a send that has not completed; `done`, or an error
    /// once it completed (the target may run the guest).
    Cancel,
    /// Source: run the guest again after a completed send whose target
    /// does not run it; `done`.
    Resume,
    /// Either host: answered with `guest_state`.
    Status,
    /// Either host: remove this host's copy and its NICs' host side; `done`.
    Discard { nics: u32 },
}

/// A snapshot action relayed to the guest's host. Every action is safe to
/// repeat: the manager repeats or undoes one whose answer it did not get.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum SnapshotCall {
    /// Answered with `snapshots` holding the new one.
    Create { name: String, kind: SnapshotKind },
    /// Answered with `snapshots`: those complete on the host.
    List,
    /// Answered with `done`; deleting an absent snapshot is done too.
    Delete { name: String },
    /// Answered with `restored`.
    Restore { name: String },
}

/// A snapshot as the host holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostSnapshot {
    pub name: String,
    pub kind: SnapshotKind,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub vm_state_size: ByteSize,
}

/// Take a snapshot (`POST /v1/guests/{guest}/snapshots`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateSnapshotRequest {
    /// Lowercase letters, digits and '-'; unique among the guest's snapshots.
    pub name: String,
    /// Include memory and device state (the guest must be running): a
    /// restore then resumes it exactly where it was. Default: disks only.
    #[serde(default)]
    pub memory: bool,
}

/// A guest's snapshots (`GET /v1/guests/{guest}/snapshots`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub guest: GuestId,
    /// The snapshot the guest's present state descends from.
    pub current: Option<String>,
    /// In the order they were taken; a tree by `parent`.
    pub snapshots: Vec<Snapshot>,
}

/// An agent's answer to a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CallResult {
    pub id: u64,
    pub outcome: CallOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum CallOutcome {
    /// Console history, UTF-8 with invalid bytes replaced.
    ConsoleLog {
        text: String,
    },
    Exec(ExecResponse),
    Interfaces {
        interfaces: Vec<GuestInterface>,
    },
    /// The call did what it asked.
    Done,
    Snapshots {
        snapshots: Vec<HostSnapshot>,
    },
    Restored {
        outcome: RestoreOutcome,
    },
    /// The target waits for the migration stream there.
    Prepared {
        #[schema(value_type = String)]
        listen: std::net::IpAddr,
        port: u16,
        nbd_port: u16,
    },
    Sent {
        stats: MigrationStats,
    },
    Finished {
        done: IncomingDone,
    },
    /// Not an answer: how a `send` is going (the call stays open).
    MigrationProgress {
        progress: MigrationProgress,
    },
    /// A cancel came too late: the migration completed, the source's copy
    /// stays paused (its target may run the guest).
    MigrationCompleted,
    /// The guest's disks are on the asked pool now.
    StorageMoved {
        moved: StorageMoved,
    },
    /// The guest's state on the host, `None` if the host has no such guest.
    GuestState {
        state: Option<ObservedState>,
    },
    /// The guest's definition on the host (hardware and limits included).
    Definition {
        spec: Box<drove_model::GuestSpec>,
    },
    Error {
        message: String,
    },
}

/// Hardware to add to a running guest (`POST /v1/guests/{guest}/hotplug`):
/// exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HotplugRequest {
    /// Add an empty disk of this size (bytes).
    #[serde(default)]
    pub add_disk: Option<ByteSize>,
    /// Add a NIC on this VLAN.
    #[serde(default)]
    pub add_nic: Option<NicRequest>,
    /// Grow memory to this total (bytes).
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// Grow vCPUs to this total.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Grow one disk (online; the guest sees the new size).
    #[serde(default)]
    pub grow_disk: Option<GrowDisk>,
}

/// Disk `index` (0 is the first) to `size` bytes, a whole number of MiB,
/// larger than now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GrowDisk {
    pub index: u32,
    pub size: ByteSize,
}

/// One hardware change, as relayed to the guest's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HotplugChange {
    AddDisk {
        size: ByteSize,
    },
    /// The NIC as the manager defined it (MAC, VLAN, address, cap); it
    /// becomes the guest's `index`-th NIC.
    AddNic {
        nic: drove_model::NicSpec,
        index: u32,
    },
    SetMemory {
        memory: ByteSize,
    },
    SetVcpus {
        vcpus: u32,
    },
    GrowDisk {
        index: u32,
        size: ByteSize,
    },
}

/// New resource limits for a guest (`POST /v1/guests/{guest}/limits`), as
/// a JSON merge patch of its `limits`: a field left out keeps its value,
/// `null` removes that limit, a value sets it. A running guest gets them at
/// once, without a restart; a stopped one at its next start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SetLimitsRequest {
    /// CPU cap in percent of one host core (1..=100 x vCPUs).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "patch")]
    #[schema(value_type = Option<u32>)]
    pub cpu_cap_percent: Option<Option<u32>>,
    /// Relative CPU weight (2..=262144; 1024 is the default weight).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "patch")]
    #[schema(value_type = Option<u32>)]
    pub cpu_shares: Option<Option<u32>>,
    /// Disk throughput cap per disk, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "patch")]
    #[schema(value_type = Option<u64>)]
    pub disk_bps: Option<Option<u64>>,
    /// Disk operations cap per disk, per second.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "patch")]
    #[schema(value_type = Option<u64>)]
    pub disk_iops: Option<Option<u64>>,
    /// Bandwidth cap of each NIC without a rate of its own, bits per
    /// second, each direction (at least 8000).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "patch")]
    #[schema(value_type = Option<u64>)]
    pub nic_rate_bps: Option<Option<u64>>,
}

/// A merge-patch field: present (a value or `null`) is `Some`, absent is
/// `None` (through `#[serde(default)]`).
fn patch<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl SetLimitsRequest {
    /// Whether it names no field at all.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// `limits` with this request's changes made.
    pub fn apply_to(&self, limits: &ResourceLimits) -> ResourceLimits {
        fn set<T: Copy>(slot: &mut Option<T>, patch: Option<Option<T>>) {
            if let Some(value) = patch {
                *slot = value;
            }
        }
        let mut out = limits.clone();
        set(&mut out.cpu_cap_percent, self.cpu_cap_percent);
        set(&mut out.cpu_shares, self.cpu_shares);
        set(&mut out.disk_bps, self.disk_bps);
        set(&mut out.disk_iops, self.disk_iops);
        set(&mut out.nic_rate_bps, self.nic_rate_bps);
        out
    }
}

/// Drain a host (`POST /v1/hosts/{host}/drain`): maintenance on, then every
/// guest live-migrated away.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrainRequest {
    /// Migrations at a time (default 2).
    #[serde(default)]
    pub parallel: Option<u32>,
}

/// Move a guest's disks to another storage pool
/// (`POST /v1/guests/{guest}/storage`): `local` (its host's own) or
/// `shared` (the pool every host sees). A running guest keeps running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveStorageRequest {
    /// The pool to move every disk of the guest to.
    pub to: Storage,
}

/// Move a running guest to another host (`POST /v1/guests/{guest}/migrate`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrateRequest {
    /// The target host (name or id); by default placement chooses.
    #[serde(default)]
    pub to: Option<String>,
    /// The longest pause to aim for in the final round, milliseconds
    /// (default 50).
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth cap of the transfer, bytes per second (default: none).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
}

/// A command to run inside a guest (`POST /v1/guests/{guest}/exec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecRequest {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Sent to the command's standard input.
    #[serde(default)]
    pub input: Option<String>,
    /// Give up after this many seconds (default 60, at most 600).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// How a command inside a guest ended; output is UTF-8 with invalid bytes
/// replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A network interface as the guest sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuestInterface {
    pub name: String,
    pub mac: Option<String>,
    /// With prefix length, e.g. `10.0.0.5/24`.
    pub addresses: Vec<String>,
}

/// Console history of a guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConsoleLog {
    pub guest: GuestId,
    pub text: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_limits_request_keeps_left_out_fields_clears_nulls_and_sets_values() {
        let req: SetLimitsRequest = serde_json::from_str(r#"{"cpu_cap_percent": 30, "disk_bps": null}"#).unwrap();
        assert_eq!(
            req,
            SetLimitsRequest { cpu_cap_percent: Some(Some(30)), disk_bps: Some(None), ..Default::default() }
        );
        let before = ResourceLimits {
            cpu_cap_percent: Some(80),
            cpu_shares: Some(512),
            cpu_pin: vec![1],
            disk_bps: Some(1 << 20),
            disk_iops: Some(100),
            nic_rate_bps: None,
        };
        let after = req.apply_to(&before);
        assert_eq!(
            after,
            ResourceLimits { cpu_cap_percent: Some(30), disk_bps: None, ..before.clone() },
            "only the named fields change"
        );
        // What the client sends reads back the same: null stays null, and
        // fields left out stay out.
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(text, r#"{"cpu_cap_percent":30,"disk_bps":null}"#);
        assert_eq!(serde_json::from_str::<SetLimitsRequest>(&text).unwrap(), req);
        assert!(serde_json::from_str::<SetLimitsRequest>("{}").unwrap().is_empty());
    }

    #[test]
    fn an_agent_that_does_not_measure_is_still_understood() {
        let id = GuestId::new_v4();
        let old = serde_json::json!({ "id": id, "state": "running", "generation": 3 });
        let o: ObservedGuest = serde_json::from_value(old).unwrap();
        assert_eq!(o.load, None);
        let new = serde_json::json!({
            "id": id, "state": "running", "generation": 3,
            "load": { "interval_ms": 10000, "cpu_millicores": 250.0, "memory_mib": 300.0, "net_rx_mbps": 0.0,
                      "net_tx_mbps": 0.0, "disk_read_mbps": 0.0, "disk_write_mbps": 1.5 }
        });
        let o: ObservedGuest = serde_json::from_value(new).unwrap();
        assert_eq!(o.load.map(|l| l.cpu_millicores), Some(250.0));
    }
}
