//! The manager's decisions: validation, placement, guest and operation
//! transitions, and the agent protocol.
//!
//! Every mutation follows one pattern: lock the inventory, check, change
//! memory through the model's state machines, enqueue the store writes
//! (with the audit record of the call in the same transaction), unlock,
//! and answer only when the writes are durable.
//!
//! A create is a durable multi-step operation driven by agent reports:
//!
//! ```text
//!  place+record ──► provision (agent) ──► boot (agent) ──► succeeded
//!        │                 │ failure / timeout   │
//!        │                 ▼                     ▼
//!        │           rolling back: guest Deleting, agent destroys it,
//!        │           the record goes only on the agent's confirmation
//!        ▼
//!   (refused requests write nothing but their audit record)
//! ```
//!
//! Operation progress lives in the store, so a restarted manager picks up
//! where the last one stopped: the next heartbeat drives it on.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use drove_api::{
    AgentCall, AgentCallKind, AuditRecord, AuditVerification, CallOutcome, CallResult, CreateGuestRequest,
    CreateVlanRequest, DesiredGuest, DesiredState, GuestView, HeartbeatRequest, HeartbeatResponse, HostView,
    HotplugChange, HotplugRequest, ImportImageRequest, ObservedGuest, ObservedState, OperationAccepted,
    RegisterRequest, RegisterResponse, SetLimitsRequest, VlanView,
};
use drove_model::guest::validate_name;
use drove_model::host::HostEvent;
use drove_model::operation::OperationEvent;
use drove_model::units::MIB;
use drove_model::vlan::Ipv4Cidr;
use drove_model::{
    ByteSize, DiskSpec, Guest, GuestEvent, GuestId, GuestSpec, GuestState, HostId, HostInfo, HostState, NicSpec,
    Operation, OperationId, OperationKind, OperationState, PowerIntent, Priority, RestartPolicy, Vlan, VlanTag,
};
use drove_placement::{HostCapacity, PlacementError, Policy, Request};
use drove_store::{Op, Store};
use tokio::sync::{oneshot, watch};

use crate::auth::{self, Principal, Role, TokenRecord};
use crate::inventory::{
    HostEntry, Inventory, LoadError, audit_key, delete, guest_key, host_key, image_key, lease_key, op_key, put,
    token_key, vlan_key,
};
use crate::now_rfc3339;
use crate::persist::{PersistError, Persister};

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where token files live.
    pub data_dir: PathBuf,
    /// Where imported images are kept: hosts read them at this path.
    pub image_pool: PathBuf,
    pub heartbeat_interval: Duration,
    /// The lease each answered heartbeat gives a host: a host not heard
    /// from for this long is down, and its agent, if it is only cut off,
    /// fences itself (stops its guests).
    pub host_timeout: Duration,
    /// Waited after a host's lease ran out before its guests restart
    /// elsewhere: time for a cut-off agent to notice and stop them.
    pub fencing_margin: Duration,
    /// Failover restarts booting at once per surviving host, and in all.
    pub failover_per_host: usize,
    pub failover_total: usize,
    /// An operation not finished after this long fails (and rolls back).
    pub op_timeout: Duration,
    pub policy: Policy,
    /// The rebalancer (DRS).
    pub drs: crate::drs::DrsConfig,
    /// A guest's measured load profile is written to the store at most
    /// this often (and when its samples move to another hour).
    pub load_flush: Duration,
    /// Power management (DPM) and its power driver.
    pub dpm: crate::dpm::DpmConfig,
}

impl ManagerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        ManagerConfig {
            image_pool: data_dir.join("images"),
            data_dir,
            heartbeat_interval: Duration::from_secs(1),
            host_timeout: Duration::from_secs(5),
            fencing_margin: Duration::from_millis(1500),
            failover_per_host: 2,
            failover_total: 16,
            op_timeout: Duration::from_secs(600),
            policy: Policy::default(),
            drs: crate::drs::DrsConfig::default(),
            load_flush: Duration::from_secs(60),
            dpm: crate::dpm::DpmConfig::default(),
        }
    }
}

/// A refused or failed request: HTTP status, stable code, one-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError { status: 400, code: "invalid_request", message: message.into(), field: Some(field.into()) }
    }
    pub fn not_found(what: &str, key: &str) -> Self {
        ApiError { status: 404, code: "not_found", message: format!("{what} {key:?} does not exist"), field: None }
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError { status: 409, code: "conflict", message: message.into(), field: None }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError { status: 401, code: "unauthorized", message: message.into(), field: None }
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError { status: 403, code: "forbidden", message: message.into(), field: None }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError { status: 503, code: "unavailable", message: message.into(), field: None }
    }
    /// Something outside the manager it relies on failed (a power driver).
    pub fn upstream(code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status: 502, code, message: message.into(), field: None }
    }
}

impl From<PersistError> for ApiError {
    fn from(e: PersistError) -> Self {
        ApiError::unavailable(e.to_string())
    }
}

/// Who is calling and what for: becomes the audit record of a mutation.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub principal: Principal,
    /// Method and path, e.g. `POST /v1/guests`.
    pub action: String,
}

/// Tokens minted on first start (plaintext exists only here and in files).
#[derive(Debug, Clone, Default)]
pub struct MintedTokens {
    pub admin: Option<String>,
    pub agent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("loading state")]
    Load(#[from] LoadError),
    #[error("minting tokens")]
    Token(#[from] auth::TokenError),
    #[error("writing initial state")]
    Persist(#[from] PersistError),
}

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const AGENT_TOKEN_FILE: &str = "agent.token";

#[derive(Debug)]
pub struct Manager {
    pub config: ManagerConfig,
    inv: Mutex<Inventory>,
    pub(crate) persister: Persister,
    store: Arc<dyn Store>,
    /// Bumped whenever an operation changes; waiters watch it.
    changes: watch::Sender<u64>,
    pub started: Instant,
    pub http_requests: std::sync::atomic::AtomicU64,
    calls: Mutex<Calls>,
    consoles: Mutex<HashMap<String, oneshot::Sender<Result<hyper::upgrade::OnUpgrade, String>>>>,
    /// Guests whose snapshot operation or storage move a task of this
    /// process drives.
    pub(crate) snapshot_drivers: Mutex<HashSet<GuestId>>,
    pub(crate) migration_drivers: Mutex<crate::migrate::Drivers>,
    /// Those tasks, aborted when the server stops (`crate::serve`).
    pub(crate) background: Mutex<Vec<tokio::task::AbortHandle>>,
    pub(crate) drs: Mutex<crate::drs::DrsState>,
    pub(crate) dpm: Mutex<crate::dpm::DpmState>,
}

/// Relayed calls to agents: queued per host until its next heartbeat
/// collects them, answered through `POST /v1/agent/results`.
#[derive(Debug, Default)]
struct Calls {
    next_id: u64,
    queued: HashMap<HostId, Vec<AgentCall>>,
    /// Calls sent (or queued) and not answered yet, with their host.
    waiting: HashMap<u64, (HostId, Waiter)>,
}

#[derive(Debug)]
enum Waiter {
    Call {
        tx: oneshot::Sender<CallOutcome>,
        /// The operation whose progress the call's progress reports update.
        progress_op: Option<OperationId>,
    },
    /// A console session: the agent's upgraded connection, or why it failed.
    Console { session: String },
}

/// How long an operator waits for a host to answer a relayed call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A console session waiting for its agent: the agent's connection (or
/// the reason it will not come).
pub type ConsoleRendezvous = oneshot::Receiver<Result<hyper::upgrade::OnUpgrade, String>>;

impl Manager {
    /// Load state from `store` (minting tokens on first start) and start the
    /// writer task. Must run inside a tokio runtime.
    pub async fn open(config: ManagerConfig, store: Arc<dyn Store>) -> Result<(Arc<Manager>, MintedTokens), OpenError> {
        let (mut inv, mut init) = Inventory::load(store.as_ref()).await?;
        let mut minted = MintedTokens::default();
        // Each token file must hold a token the store knows under its name.
        // A missing or stale file (first start, or an operator who lost it)
        // gets a fresh token, and the old one of that name is revoked. The
        // file is written only after the store has the token, so a crash in
        // between leaves a file-less token that the next start replaces.
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| auth::TokenError::Write { path: config.data_dir.clone(), source })?;
        let mut files = Vec::new();
        for (name, role, file) in [("admin", Role::Admin, ADMIN_TOKEN_FILE), ("agent", Role::Agent, AGENT_TOKEN_FILE)] {
            let path = config.data_dir.join(file);
            let valid = std::fs::read_to_string(&path)
                .ok()
                .map(|t| auth::hash_token(t.trim()))
                .is_some_and(|h| inv.tokens.get(&h).is_some_and(|r| r.name == name));
            if valid {
                continue;
            }
            let old: Vec<String> = inv.tokens.values().filter(|r| r.name == name).map(|r| r.hash.clone()).collect();
            if !old.is_empty() {
                tracing::warn!(file = %path.display(), "token file missing or stale: minting a new {name} token, revoking the old");
            }
            for hash in old {
                inv.tokens.remove(&hash);
                init.push(delete(token_key(&hash)));
            }
            let token = auth::mint_token()?;
            let rec =
                TokenRecord { hash: auth::hash_token(&token), name: name.into(), role, created_at: now_rfc3339() };
            init.push(put(token_key(&rec.hash), &rec));
            inv.tokens.insert(rec.hash.clone(), rec);
            match role {
                Role::Admin => minted.admin = Some(token.clone()),
                Role::Agent => minted.agent = Some(token.clone()),
            }
            files.push((path, token));
        }
        let persister = Persister::start(store.clone());
        persister.enqueue(init).durable().await?;
        for (path, token) in files {
            auth::write_token_file(&path, &token)?;
        }
        let (changes, _) = watch::channel(0);
        let m = Manager {
            config,
            inv: Mutex::new(inv),
            persister,
            store,
            changes,
            started: Instant::now(),
            http_requests: Default::default(),
            calls: Mutex::new(Calls::default()),
            consoles: Mutex::new(HashMap::new()),
            snapshot_drivers: Mutex::new(HashSet::new()),
            migration_drivers: Mutex::new(Default::default()),
            drs: Mutex::new(Default::default()),
            dpm: Mutex::new(Default::default()),
            background: Mutex::new(Vec::new()),
        };
        Ok((Arc::new(m), minted))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inventory> {
        // A panic while holding the lock leaves memory possibly ahead of the
        // store; the persister is the authority on failure, so carry on.
        self.inv.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn persister(&self) -> &Persister {
        &self.persister
    }

    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let hash = auth::hash_token(token);
        self.lock().tokens.get(&hash).map(|t| Principal { name: t.name.clone(), role: t.role })
    }

    pub(crate) fn audit_op(inv: &mut Inventory, ctx: &Ctx, target: Option<String>, result: &str, status: u16) -> Op {
        let mut rec = AuditRecord {
            seq: inv.audit_seq,
            time: now_rfc3339(),
            principal: ctx.principal.name.clone(),
            action: ctx.action.clone(),
            target,
            result: result.to_owned(),
            status,
            prev_hash: inv.audit_last_hash.clone(),
            hash: String::new(),
        };
        rec.hash = auth::sha256_hex(rec.hashed_content().as_bytes());
        inv.audit_seq += 1;
        inv.audit_last_hash = rec.hash.clone();
        put(audit_key(rec.seq), &rec)
    }

    /// Recompute the audit chain from the store (not from memory): any
    /// record changed, removed or reordered shows as the first bad link.
    pub async fn verify_audit(&self) -> Result<AuditVerification, ApiError> {
        let (kvs, _) = self.store.list("audit/").await.map_err(|e| ApiError::unavailable(e.to_string()))?;
        let mut prev = AuditRecord::GENESIS.to_owned();
        for (expected_seq, kv) in (1u64..).zip(kvs.iter()) {
            let bad = |seq: u64, reason: String| AuditVerification {
                records: kvs.len() as u64,
                intact: false,
                first_bad_seq: Some(seq),
                reason: Some(reason),
            };
            let rec: AuditRecord = match serde_json::from_slice(&kv.value) {
                Ok(r) => r,
                Err(e) => return Ok(bad(expected_seq, format!("record {} does not decode: {e}", kv.key))),
            };
            if rec.seq != expected_seq || kv.key != audit_key(rec.seq) {
                return Ok(bad(
                    expected_seq,
                    format!("expected record {expected_seq}, found {} at {}", rec.seq, kv.key),
                ));
            }
            if rec.prev_hash != prev {
                return Ok(bad(rec.seq, "its link to the record before does not match".into()));
            }
            if auth::sha256_hex(rec.hashed_content().as_bytes()) != rec.hash {
                return Ok(bad(rec.seq, "its contents do not match its hash".into()));
            }
            prev = rec.hash;
        }
        Ok(AuditVerification { records: kvs.len() as u64, intact: true, first_bad_seq: None, reason: None })
    }

    /// Record a call outside a state change: a refusal, or an interactive
    /// session that changes no state but must be accounted for.
    pub async fn audit_event(&self, ctx: &Ctx, target: Option<String>, message: &str, status: u16) {
        let pending = {
            let mut inv = self.lock();
            let op = Self::audit_op(&mut inv, ctx, target, message, status);
            self.persister.enqueue(vec![op])
        };
        if let Err(e) = pending.durable().await {
            tracing::error!(error = %e, "audit record lost");
        }
    }

    /// Refuses to start an operation on a guest that has one in progress.
    pub(crate) fn ensure_idle(inv: &Inventory, g: &Guest) -> Result<(), ApiError> {
        if let Some(op) = inv.active_ops.get(&g.id).and_then(|o| inv.ops.get(o)) {
            return Err(ApiError::conflict(format!(
                "guest {} has operation {} ({}) in progress; wait for it",
                g.spec.name, op.id, op.kind
            )));
        }
        Self::ensure_no_pending_change(g)?;
        Self::ensure_not_copied_elsewhere(inv, g)
    }

    /// Refuses to build on `g`'s definition while a change is pending on
    /// its host: the host may or may not hold it, and a new generation
    /// (a start or stop too) sent before that is known would redefine the
    /// guest without it.
    pub(crate) fn ensure_no_pending_change(g: &Guest) -> Result<(), ApiError> {
        match &g.pending_spec {
            Some(p) => Err(ApiError::conflict(format!(
                "guest {} has a change pending on its host ({}, asked {}); it is settled when the host answers",
                g.spec.name, p.what, p.since
            ))),
            None => Ok(()),
        }
    }

    /// Refuses to change `g` while another host copies its disks from the
    /// shared pool: that host holds none of its locks (its own host's
    /// backend serializes a clone there with everything else).
    pub(crate) fn ensure_not_copied_elsewhere(inv: &Inventory, g: &Guest) -> Result<(), ApiError> {
        let copying = crate::clones::remote_copies(inv, g);
        if copying.is_empty() {
            return Ok(());
        }
        Err(ApiError::conflict(format!(
            "guest {}'s disks are being copied from the shared pool by clones on other hosts ({}); wait for them",
            g.spec.name,
            copying.join(", ")
        )))
    }

    /// Records a new operation `op` on guest `g` (changed as it begins):
    /// the guest, the operation and the audit record of the request, in one
    /// store transaction.
    pub(crate) fn record_guest_op(
        &self,
        inv: &mut Inventory,
        ctx: &Ctx,
        g: &Guest,
        op: &Operation,
    ) -> crate::persist::Pending {
        inv.active_ops.insert(g.id, op.id);
        inv.ops.insert(op.id, op.clone());
        inv.guests.insert(g.id, g.clone());
        let audit = Self::audit_op(inv, ctx, Some(format!("guest/{}", g.spec.name)), "ok", 202);
        self.persister.enqueue(vec![put(guest_key(g.id), g), put(op_key(op.id), op), audit])
    }

    /// Runs a driver task of this manager, aborted when the server stops.
    pub(crate) fn spawn_background<T: Send + 'static>(
        &self,
        task: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let task = tokio::spawn(task);
        let mut tasks = self.background.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
        task
    }

    pub(crate) fn notify_ops(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    // ---- reads ---------------------------------------------------------------

    pub(crate) fn host_view(inv: &Inventory, h: &HostEntry) -> HostView {
        let a = inv.allocated.get(&h.info.id).copied().unwrap_or_default();
        HostView {
            info: h.info.clone(),
            allocated_vcpus: a.vcpus,
            allocated_memory: ByteSize(a.memory),
            allocated_nic_bps: a.nic_bps,
            guests: a.guests,
            last_seen_ms: h.last_seen.map(|t| t.elapsed().as_millis() as u64),
            orphans: h.orphans,
        }
    }

    /// Read from the inventory, answering only once everything the read
    /// saw is durable: a client never sees state a crash could take back.
    pub(crate) async fn read<T>(&self, f: impl FnOnce(&Inventory) -> T) -> Result<T, ApiError> {
        let (value, durable) = {
            let inv = self.lock();
            (f(&inv), self.persister.barrier())
        };
        durable.durable().await?;
        Ok(value)
    }

    pub async fn list_hosts(&self) -> Result<Vec<HostView>, ApiError> {
        let mut v = self.read(|inv| inv.hosts.values().map(|h| Self::host_view(inv, h)).collect::<Vec<_>>()).await?;
        v.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        Ok(v)
    }

    /// The storage pools: the shared one (as the host heard from last saw
    /// it) and each host's local one, with what their guests' disks take.
    pub async fn list_pools(&self) -> Result<Vec<drove_api::PoolView>, ApiError> {
        self.read(|inv| {
            use drove_model::guest::Storage;
            let mut pools: Vec<drove_api::PoolView> = Vec::new();
            let mut hosts: Vec<&HostEntry> = inv.hosts.values().collect();
            hosts.sort_by(|a, b| a.info.name.cmp(&b.info.name));
            let disks = |g: &drove_model::Guest| g.spec.pool_bytes();
            let mut shared: Option<(drove_api::PoolView, Option<Instant>)> = None;
            for h in &hosts {
                for p in &h.pools {
                    if p.name == "shared" {
                        let view = shared.get_or_insert_with(|| {
                            let mine: Vec<&drove_model::Guest> =
                                inv.guests.values().filter(|g| g.spec.storage == Storage::Shared).collect();
                            let pool = drove_api::PoolView {
                                name: "shared".into(),
                                kind: Storage::Shared,
                                hosts: Vec::new(),
                                capacity: p.capacity,
                                free: p.free,
                                provisioned: ByteSize(mine.iter().map(|g| disks(g)).sum()),
                                guests: mine.len() as u32,
                            };
                            (pool, h.last_seen)
                        });
                        view.0.hosts.push(h.info.name.clone());
                        // The freshest report of the one pool.
                        if h.last_seen > view.1 {
                            (view.0.capacity, view.0.free, view.1) = (p.capacity, p.free, h.last_seen);
                        }
                    } else {
                        let mine: Vec<&drove_model::Guest> = inv
                            .by_host
                            .get(&h.info.id)
                            .into_iter()
                            .flatten()
                            .filter_map(|id| inv.guests.get(id))
                            .filter(|g| g.spec.storage == Storage::Local)
                            .collect();
                        pools.push(drove_api::PoolView {
                            name: format!("{}@{}", p.name, h.info.name),
                            kind: Storage::Local,
                            hosts: vec![h.info.name.clone()],
                            capacity: p.capacity,
                            free: p.free,
                            provisioned: ByteSize(mine.iter().map(|g| disks(g)).sum()),
                            guests: mine.len() as u32,
                        });
                    }
                }
            }
            if let Some((view, _)) = shared {
                pools.insert(0, view);
            }
            pools
        })
        .await
    }

    pub async fn get_host(&self, key: &str) -> Result<HostView, ApiError> {
        self.read(|inv| inv.find_host(key).map(|h| Self::host_view(inv, h)))
            .await?
            .ok_or_else(|| ApiError::not_found("host", key))
    }

    /// Enter or leave maintenance: a host in maintenance takes no new guests.
    pub async fn set_maintenance(&self, ctx: &Ctx, key: &str, enabled: bool) -> Result<HostView, ApiError> {
        let (view, pending) = {
            let mut inv = self.lock();
            let h = inv.find_host(key).ok_or_else(|| ApiError::not_found("host", key))?;
            let (id, state) = (h.info.id, h.info.state);
            let alive = h.last_seen.is_some_and(|t| t.elapsed() <= self.config.host_timeout);
            let event = if enabled { HostEvent::EnterMaintenance } else { HostEvent::ExitMaintenance { alive } };
            let next = match state.apply(event) {
                Ok(next) => next,
                // Asking for the state it is already in is not an error.
                Err(_) if (state == HostState::Maintenance) == enabled => state,
                Err(e) => return Err(ApiError::conflict(e.to_string())),
            };
            let mut writes = Vec::new();
            if let Some(h) = inv.hosts.get_mut(&id)
                && h.info.state != next
            {
                h.info.state = next;
                writes.push(put(host_key(id), &h.info));
            }
            let h = inv.hosts.get(&id).ok_or_else(|| ApiError::not_found("host", key))?;
            let view = Self::host_view(&inv, h);
            writes.push(Self::audit_op(&mut inv, ctx, Some(format!("host/{}", view.info.name)), "ok", 200));
            (view, self.persister.enqueue(writes))
        };
        pending.durable().await?;
        Ok(view)
    }

    pub(crate) fn guest_view(inv: &Inventory, g: &Guest) -> GuestView {
        let dependents = crate::clones::dependents(inv, g.id).iter().map(|d| d.spec.name.clone()).collect();
        Self::guest_view_with(inv, g, dependents)
    }

    fn guest_view_with(inv: &Inventory, g: &Guest, dependents: Vec<String>) -> GuestView {
        let host_name = inv.hosts.get(&g.host).map(|h| h.info.name.clone()).unwrap_or_default();
        let measured_load = inv.load.get(&g.id).map(|l| l.profile.clone());
        GuestView { guest: g.clone(), host_name, dependents, measured_load }
    }

    pub async fn list_guests(&self) -> Result<Vec<GuestView>, ApiError> {
        let mut v = self
            .read(|inv| {
                let mut deps = crate::clones::all_dependents(inv);
                inv.guests
                    .values()
                    .map(|g| Self::guest_view_with(inv, g, deps.remove(&g.id).unwrap_or_default()))
                    .collect::<Vec<_>>()
            })
            .await?;
        v.sort_by(|a, b| a.guest.spec.name.cmp(&b.guest.spec.name));
        Ok(v)
    }

    pub async fn get_guest(&self, key: &str) -> Result<GuestView, ApiError> {
        self.read(|inv| inv.find_guest(key).map(|g| Self::guest_view(inv, g)))
            .await?
            .ok_or_else(|| ApiError::not_found("guest", key))
    }

    pub async fn list_vlans(&self) -> Result<Vec<VlanView>, ApiError> {
        self.read(|inv| {
            inv.vlans
                .values()
                .map(|v| VlanView {
                    vlan: v.clone(),
                    nics: inv.guests.values().flat_map(|g| &g.spec.nics).filter(|n| n.vlan == v.tag).count() as u32,
                })
                .collect()
        })
        .await
    }

    pub async fn list_operations(&self) -> Result<Vec<Operation>, ApiError> {
        let mut v = self.read(|inv| inv.ops.values().cloned().collect::<Vec<_>>()).await?;
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    pub async fn get_operation(&self, id: OperationId) -> Result<Operation, ApiError> {
        self.read(|inv| inv.ops.get(&id).cloned())
            .await?
            .ok_or_else(|| ApiError::not_found("operation", &id.to_string()))
    }

    /// Wait until the operation is final or `timeout` passes; returns it
    /// either way.
    pub async fn wait_operation(&self, id: OperationId, timeout: Duration) -> Result<Operation, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.changes.subscribe();
        loop {
            let op = self.get_operation(id).await?;
            if op.state.is_final() {
                return Ok(op);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.get_operation(id).await,
            }
        }
    }

    pub async fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, ApiError> {
        let (kvs, _) = self.store.list("audit/").await.map_err(|e| ApiError::unavailable(e.to_string()))?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<AuditRecord>(&kv.value).ok())
            .filter(|r| r.seq > after)
            .take(limit)
            .collect())
    }

    // ---- images ----------------------------------------------------------------

    /// Copy a qcow2 file into the image pool and register it. The header is
    /// checked first (qcow2, no backing file), the copy lands under a
    /// temporary name and is renamed into place, and its tables are checked
    /// (`qemu-img check`), so a failed import leaves nothing behind.
    pub async fn import_image(
        &self,
        ctx: &Ctx,
        req: ImportImageRequest,
    ) -> Result<drove_model::image::Image, ApiError> {
        validate_name(&req.name).map_err(|r| ApiError::invalid("name", format!("image name {:?} {r}", req.name)))?;
        if self.lock().images.contains_key(&req.name) {
            return Err(ApiError::conflict(format!("an image named {:?} already exists", req.name)));
        }
        let source = PathBuf::from(&req.path);
        let header = {
            use std::io::Read;
            let mut buf = vec![0u8; 512];
            let n = std::fs::File::open(&source)
                .and_then(|mut f| f.read(&mut buf))
                .map_err(|e| ApiError::invalid("path", format!("cannot read {}: {e}", source.display())))?;
            buf.truncate(n);
            drove_model::image::parse_qcow2_header(&buf)
                .map_err(|e| ApiError::invalid("path", format!("{}: {e}", source.display())))?
        };
        if header.has_backing_file {
            return Err(ApiError::invalid(
                "path",
                format!("{} has a backing file; flatten it first (qemu-img convert -O qcow2)", source.display()),
            ));
        }
        let pool = &self.config.image_pool;
        let dest = pool.join(format!("{}.qcow2", req.name));
        let tmp = pool.join(format!(".{}.importing", req.name));
        let copy = {
            let (tmp, dest, source) = (tmp.clone(), dest.clone(), source.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
                std::fs::create_dir_all(tmp.parent().unwrap_or(std::path::Path::new(".")))?;
                let n = std::fs::copy(&source, &tmp)?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &dest)?;
                Ok(n)
            })
            .await
        };
        let file_size = match copy {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(ApiError::unavailable(format!("copying {} into the image pool: {e}", source.display())));
            }
            Err(e) => return Err(ApiError::unavailable(format!("copying {}: {e}", source.display()))),
        };
        // The copy, not the source: it is what guests will boot, and a
        // source that changes under us cannot slip a bad image in.
        if let Err(reason) = check_image_integrity(&dest).await {
            let _ = std::fs::remove_file(&dest);
            return Err(ApiError::invalid("path", format!("{} is damaged: {reason}", source.display())));
        }
        let image = drove_model::image::Image {
            name: req.name.clone(),
            path: dest.display().to_string(),
            format: "qcow2".into(),
            virtual_size: ByteSize(header.virtual_size),
            file_size: ByteSize(file_size),
            imported_at: now_rfc3339(),
        };
        let pending = {
            let mut inv = self.lock();
            if inv.images.contains_key(&req.name) {
                drop(inv);
                let _ = std::fs::remove_file(&dest);
                return Err(ApiError::conflict(format!("an image named {:?} already exists", req.name)));
            }
            inv.images.insert(image.name.clone(), image.clone());
            let audit = Self::audit_op(&mut inv, ctx, Some(format!("image/{}", image.name)), "ok", 201);
            self.persister.enqueue(vec![put(image_key(&image.name), &image), audit])
        };
        pending.durable().await?;
        Ok(image)
    }

    pub async fn list_images(&self) -> Result<Vec<drove_model::image::Image>, ApiError> {
        self.read(|inv| inv.images.values().cloned().collect()).await
    }

    /// Remove an image no guest is built on.
    pub async fn delete_image(&self, ctx: &Ctx, name: &str) -> Result<(), ApiError> {
        let (path, pending) = {
            let mut inv = self.lock();
            let image = inv.images.get(name).cloned().ok_or_else(|| ApiError::not_found("image", name))?;
            let users: Vec<&str> = inv
                .guests
                .values()
                .filter(|g| g.spec.image.as_deref() == Some(image.path.as_str()))
                .map(|g| g.spec.name.as_str())
                .take(5)
                .collect();
            if !users.is_empty() {
                return Err(ApiError::conflict(format!("image {name} is the base of guests: {}", users.join(", "))));
            }
            inv.images.remove(name);
            let audit = Self::audit_op(&mut inv, ctx, Some(format!("image/{name}")), "ok", 204);
            (image.path, self.persister.enqueue(vec![delete(image_key(name)), audit]))
        };
        pending.durable().await?;
        // The record is gone for good; only then the file.
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    // ---- VLANs -----------------------------------------------------------------

    pub async fn create_vlan(&self, ctx: &Ctx, req: CreateVlanRequest) -> Result<VlanView, ApiError> {
        let tag = VlanTag::new(req.id).map_err(|e| ApiError::invalid("id", e.to_string()))?;
        let subnet = req
            .subnet
            .as_deref()
            .map(str::parse::<Ipv4Cidr>)
            .transpose()
            .map_err(|e| ApiError::invalid("subnet", e.to_string()))?;
        let gateway = req
            .gateway
            .as_deref()
            .map(|g| {
                g.parse().map_err(|_| ApiError::invalid("gateway", format!("gateway {g:?} is not an IPv4 address")))
            })
            .transpose()?;
        if gateway.is_some() && subnet.is_none() {
            return Err(ApiError::invalid("gateway", "a gateway needs a subnet"));
        }
        let vlan = Vlan::new(tag, req.name.clone(), subnet, gateway).map_err(|e| {
            let field = match e {
                drove_model::vlan::VlanError::Name { .. } => "name",
                _ => "gateway",
            };
            ApiError::invalid(field, e.to_string())
        })?;
        let pending = {
            let mut inv = self.lock();
            if let Some(v) = inv.vlans.get(&tag) {
                return Err(ApiError::conflict(format!("VLAN {tag} already exists (named {:?})", v.name)));
            }
            if inv.vlans.values().any(|v| v.name == vlan.name) {
                return Err(ApiError::conflict(format!("a VLAN named {:?} already exists", vlan.name)));
            }
            inv.vlans.insert(tag, vlan.clone());
            let audit = Self::audit_op(&mut inv, ctx, Some(format!("vlan/{tag}")), "ok", 201);
            self.persister.enqueue(vec![put(vlan_key(tag), &vlan), audit])
        };
        pending.durable().await?;
        Ok(VlanView { vlan, nics: 0 })
    }

    pub async fn delete_vlan(&self, ctx: &Ctx, key: &str) -> Result<(), ApiError> {
        let pending = {
            let mut inv = self.lock();
            let tag = inv.find_vlan(key).ok_or_else(|| ApiError::not_found("VLAN", key))?.tag;
            let users: Vec<&str> = inv
                .guests
                .values()
                .filter(|g| g.spec.nics.iter().any(|n| n.vlan == tag))
                .map(|g| g.spec.name.as_str())
                .take(5)
                .collect();
            if !users.is_empty() {
                return Err(ApiError::conflict(format!("VLAN {tag} is in use by guests: {}", users.join(", "))));
            }
            inv.vlans.remove(&tag);
            let audit = Self::audit_op(&mut inv, ctx, Some(format!("vlan/{tag}")), "ok", 204);
            self.persister.enqueue(vec![delete(vlan_key(tag)), audit])
        };
        pending.durable().await?;
        Ok(())
    }

    // ---- guests ----------------------------------------------------------------

    /// A NIC's own bandwidth cap: at least 8 kbit/s (what `tc` can shape).
    fn check_nic_rate(field: &str, rate: Option<u64>) -> Result<Option<u64>, ApiError> {
        match rate {
            Some(r) if r < 8_000 => {
                Err(ApiError::invalid(field, format!("a NIC rate must be at least 8000 bit/s (8kbit), got {r}")))
            }
            other => Ok(other),
        }
    }

    fn validate_spec(inv: &Inventory, req: &CreateGuestRequest) -> Result<(GuestSpec, Option<HostId>), ApiError> {
        validate_name(&req.name).map_err(|r| ApiError::invalid("name", format!("guest name {:?} {r}", req.name)))?;
        if !(1..=255).contains(&req.vcpus) {
            return Err(ApiError::invalid("vcpus", format!("vcpus must be between 1 and 255, got {}", req.vcpus)));
        }
        let mem = req.memory.bytes();
        if mem < 16 * MIB || !mem.is_multiple_of(MIB) {
            return Err(ApiError::invalid(
                "memory",
                format!("memory must be a whole number of MiB and at least 16M, got {} bytes", mem),
            ));
        }
        if req.disks.len() > 16 {
            return Err(ApiError::invalid("disks", format!("at most 16 disks, got {}", req.disks.len())));
        }
        let mut disks: Vec<DiskSpec> = req.disks.iter().map(|d| d.spec()).collect();
        for (i, d) in disks.iter().enumerate() {
            d.validate().map_err(|r| ApiError::invalid(&format!("disks[{i}]"), format!("disk {i} {r}")))?;
            if let Some(path) = d.block_path() {
                if let Some((j, _)) = disks[..i].iter().enumerate().find(|(_, o)| o.block_path() == Some(path)) {
                    return Err(ApiError::invalid(
                        &format!("disks[{i}]"),
                        format!("disk {i} names block device {path} that disk {j} already is (one device, one disk)"),
                    ));
                }
                if req.host.is_none() {
                    return Err(ApiError::invalid(
                        "host",
                        format!(
                            "disk {i} is host block device {path}, which exists only on one host: \
                             pin the guest to it with host (--host)"
                        ),
                    ));
                }
                if req.storage == Some(drove_model::guest::Storage::Shared) {
                    return Err(ApiError::invalid(
                        "storage",
                        format!(
                            "disk {i} is host block device {path}, local to its host; block devices on a \
                             shared SAN are not supported yet"
                        ),
                    ));
                }
            }
        }
        if req.nics.len() > drove_model::guest::MAX_NICS {
            return Err(ApiError::invalid(
                "nics",
                format!("at most {} NICs, got {}", drove_model::guest::MAX_NICS, req.nics.len()),
            ));
        }
        let mut nics: Vec<NicSpec> = Vec::with_capacity(req.nics.len());
        let mut taken: HashSet<String> = HashSet::new();
        for (i, n) in req.nics.iter().enumerate() {
            let vlan = inv.find_vlan(&n.vlan).ok_or_else(|| {
                ApiError::invalid(&format!("nics[{i}].vlan"), format!("VLAN {:?} does not exist", n.vlan))
            })?;
            let mac = loop {
                let mac = random_mac().map_err(|e| ApiError::unavailable(e.to_string()))?;
                if !inv.macs.contains(&mac) && taken.insert(mac.clone()) {
                    break mac;
                }
            };
            let pending: Vec<_> =
                nics.iter().filter(|p| p.vlan == vlan.tag).filter_map(|p| p.address).map(|a| a.ip).collect();
            let rate_bps = Self::check_nic_rate(&format!("nics[{i}].rate_bps"), n.rate_bps)?;
            let address = inv.assign_address(vlan, n.ip, &pending).map_err(|e| ipam_error(&format!("nics[{i}]"), e))?;
            nics.push(NicSpec { address, rate_bps, ..NicSpec::new(vlan.tag, mac) });
        }
        let priority = req.priority.unwrap_or(Priority::default().0);
        if priority > 100 {
            return Err(ApiError::invalid("priority", format!("priority must be 0..=100, got {priority}")));
        }
        let limits = req.limits.clone().unwrap_or_default();
        limits.validate(req.vcpus).map_err(|(field, msg)| ApiError::invalid(&format!("limits.{field}"), msg))?;
        if let Some(p) = &req.load_profile {
            p.validate().map_err(|r| ApiError::invalid("load_profile", format!("load profile {r}")))?;
        }
        let pinned = match &req.host {
            None => None,
            Some(h) => Some(
                inv.find_host(h)
                    .ok_or_else(|| ApiError::invalid("host", format!("host {h:?} does not exist")))?
                    .info
                    .id,
            ),
        };
        let image = match &req.image {
            None => None,
            Some(name) => {
                let img = inv
                    .images
                    .get(name)
                    .ok_or_else(|| ApiError::invalid("image", format!("image {name:?} does not exist")))?;
                // Disk 0 is the image's overlay: at least the image's size.
                match disks.first() {
                    None => disks.push(DiskSpec::qcow2(img.virtual_size)),
                    Some(d) if !d.format.is_qcow2() => {
                        return Err(ApiError::invalid(
                            "disks[0]",
                            format!(
                                "disk 0 boots image {name}: it is a qcow2 overlay of the image, not a {} disk",
                                d.format
                            ),
                        ));
                    }
                    Some(d) if d.size < img.virtual_size => {
                        return Err(ApiError::invalid(
                            "disks[0]",
                            format!("disk 0 boots image {name} and must be at least its {} size", img.virtual_size),
                        ));
                    }
                    Some(_) => {}
                }
                Some(img.path.clone())
            }
        };
        let spec = GuestSpec {
            name: req.name.clone(),
            vcpus: req.vcpus,
            memory: req.memory,
            disks,
            nics,
            priority: Priority(priority),
            load_profile: req.load_profile.clone(),
            limits,
            image,
            clone_of: None,
            storage: req.storage.unwrap_or_default(),
            anti_affinity: match &req.anti_affinity {
                None => None,
                Some(g) => {
                    validate_name(g)
                        .map_err(|e| ApiError::invalid("anti_affinity", format!("anti-affinity group {e}")))?;
                    Some(g.clone())
                }
            },
            hot_added: None,
        };
        Ok((spec, pinned))
    }

    pub(crate) fn capacities(&self, inv: &Inventory) -> Vec<HostCapacity> {
        inv.hosts
            .values()
            .map(|h| {
                let a = inv.allocated.get(&h.info.id).copied().unwrap_or_default();
                HostCapacity {
                    id: h.info.id,
                    name: h.info.name.clone(),
                    schedulable: h.info.state.schedulable(),
                    cores: h.info.cores,
                    memory: h.info.memory,
                    allocated_vcpus: a.vcpus,
                    allocated_memory: ByteSize(a.memory),
                    uplink_bps: h.info.uplink_bps,
                    allocated_nic_bps: a.nic_bps,
                }
            })
            .collect()
    }

    pub(crate) fn new_op(kind: OperationKind, g: &Guest, principal: &Principal, step: &str) -> Operation {
        Operation {
            id: OperationId::new_v4(),
            kind,
            target: *g.id.as_uuid(),
            target_name: g.spec.name.clone(),
            state: OperationState::Running,
            step: step.to_owned(),
            progress: 0,
            error: None,
            principal: principal.name.clone(),
            created_at: now_rfc3339(),
            finished_at: None,
        }
    }

    pub async fn create_guest(&self, ctx: &Ctx, req: CreateGuestRequest) -> Result<OperationAccepted, ApiError> {
        let (accepted, pending) = {
            let mut inv = self.lock();
            let (guest, op) = self.admit(&mut inv, &ctx.principal, &req, |_| Ok(()))?;
            let audit = Self::audit_op(&mut inv, ctx, Some(format!("guest/{}", guest.spec.name)), "ok", 202);
            let pending =
                self.persister.enqueue(vec![put(guest_key(guest.id), &guest), put(op_key(op.id), &op), audit]);
            (OperationAccepted { operation: op, guest: guest.id }, pending)
        };
        pending.durable().await?;
        Ok(accepted)
    }

    /// Validates and places a new guest and records it, with its create
    /// operation, in memory (the caller makes it durable, or takes it back
    /// with [`Self::unadmit`]). `shape` may refine the validated spec (a
    /// clone's source) before it is placed.
    pub(crate) fn admit(
        &self,
        inv: &mut Inventory,
        principal: &Principal,
        req: &CreateGuestRequest,
        shape: impl FnOnce(&mut GuestSpec) -> Result<(), ApiError>,
    ) -> Result<(Guest, Operation), ApiError> {
        let (mut spec, pinned) = Self::validate_spec(inv, req)?;
        shape(&mut spec)?;
        if inv.guest_names.contains_key(&spec.name) {
            return Err(ApiError::conflict(format!("a guest named {:?} already exists", spec.name)));
        }
        let request = Request::of(&spec);
        let mut capacities = self.capacities(inv);
        if pinned.is_none()
            && let Some(from) = spec.clone_of.as_ref().filter(|c| c.shared_disks.is_some())
        {
            // A clone read from the shared pool: made by its source's host
            // or by one that sees the pool.
            let source_host = inv.guests.get(&from.guest).map(|g| g.host);
            for c in &mut capacities {
                let sees_pool = inv.hosts.get(&c.id).is_some_and(|h| h.has_shared_pool());
                if Some(c.id) != source_host && !sees_pool {
                    c.schedulable = false;
                }
            }
        }
        let apart = keep_apart(inv, spec.anti_affinity.as_deref(), None, &mut capacities, pinned, "host")?;
        let host = drove_placement::place(&capacities, request, pinned, &self.config.policy).map_err(|e| match e {
            PlacementError::UnknownHost(_) => ApiError::invalid("host", e.to_string()),
            PlacementError::PinnedMisfit { .. } => {
                ApiError { field: Some("host".into()), ..ApiError::conflict(e.to_string()) }
            }
            PlacementError::TooLarge { .. } => ApiError::invalid("memory", e.to_string()),
            PlacementError::NoHosts | PlacementError::NoRoom { .. } => ApiError::conflict(format!("{e}{apart}")),
        })?;
        Self::check_block_devices_free(inv, &spec, host, None)?;
        if let Some(core) =
            spec.limits.cpu_pin.iter().find(|c| inv.hosts.get(&host).is_some_and(|h| **c >= h.info.cores))
        {
            let name = inv.hosts.get(&host).map(|h| h.info.name.clone()).unwrap_or_default();
            return Err(ApiError::invalid("limits.cpu_pin", format!("host {name} has no core {core}")));
        }
        let intent = if req.start.unwrap_or(true) { PowerIntent::Running } else { PowerIntent::Stopped };
        let guest = Guest {
            id: GuestId::new_v4(),
            spec,
            host,
            state: GuestState::Creating,
            intent,
            generation: 1,
            created_at: now_rfc3339(),
            last_error: None,
            restart_policy: req.restart_policy.unwrap_or_default(),
            restarts: 0,
            snapshots: Vec::new(),
            current_snapshot: None,
            template: false,
            migration: None,
            last_migration: None,
            last_failover: None,
            moving_storage: None,
            last_storage_move: None,
            pending_spec: None,
        };
        if guest.intent == PowerIntent::Running {
            self.ha_admit(inv, &guest, true)?;
        }
        let host_name = inv.hosts.get(&host).map(|h| h.info.name.clone()).unwrap_or_default();
        let mut op = Self::new_op(OperationKind::CreateGuest, &guest, principal, "");
        op.step = match &guest.spec.clone_of {
            None => format!("provisioning on host {host_name}"),
            Some(from) => {
                let source = inv.guests.get(&from.guest).map(|g| g.spec.name.as_str()).unwrap_or("?");
                let at = from.snapshot.as_deref().map(|s| format!(" at snapshot {s}")).unwrap_or_default();
                let how = match from.mode {
                    drove_model::CloneMode::Copy => "copying",
                    drove_model::CloneMode::Overlay => "overlaying",
                };
                format!("cloning {source}{at} ({how} its disks) on host {host_name}")
            }
        };
        op.progress = 10;
        inv.index_guest(&guest);
        inv.guests.insert(guest.id, guest.clone());
        inv.poke(guest.host);
        inv.active_ops.insert(guest.id, op.id);
        inv.ops.insert(op.id, op.clone());
        Ok((guest, op))
    }

    /// Refuses (409) a block device of `spec` that another guest on `host`
    /// (other than `except`) has: a device belongs to one guest (1:1).
    pub(crate) fn check_block_devices_free(
        inv: &Inventory,
        spec: &GuestSpec,
        host: HostId,
        except: Option<GuestId>,
    ) -> Result<(), ApiError> {
        let wanted: Vec<(usize, &str)> =
            spec.disks.iter().enumerate().filter_map(|(i, d)| d.block_path().map(|p| (i, p))).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        for g in inv.guests.values().filter(|g| g.host == host && Some(g.id) != except) {
            if g.state == GuestState::Deleted {
                continue;
            }
            for d in &g.spec.disks {
                if let Some((i, path)) = wanted.iter().find(|(_, p)| d.block_path() == Some(*p)) {
                    let host_name = inv.hosts.get(&host).map(|h| h.info.name.as_str()).unwrap_or("?");
                    return Err(ApiError {
                        field: Some(format!("disks[{i}]")),
                        ..ApiError::conflict(format!(
                            "block device {path} on host {host_name} belongs to guest {} (a device is given \
                             to one guest only)",
                            g.spec.name
                        ))
                    });
                }
            }
        }
        Ok(())
    }

    /// Takes back what [`Self::admit`] recorded (nothing of it was written).
    pub(crate) fn unadmit(inv: &mut Inventory, guest: &Guest, op: &Operation) {
        inv.unindex_guest(guest);
        inv.guests.remove(&guest.id);
        inv.active_ops.remove(&guest.id);
        inv.ops.remove(&op.id);
    }

    /// Start, stop or delete: common shape of a guest power request.
    pub async fn guest_action(&self, ctx: &Ctx, key: &str, action: GuestAction) -> Result<OperationAccepted, ApiError> {
        let (accepted, pending) = {
            let mut inv = self.lock();
            let mut g = inv.find_guest(key).cloned().ok_or_else(|| ApiError::not_found("guest", key))?;
            if action == GuestAction::Delete {
                // Before anything changes, in memory too.
                let deps: Vec<&str> =
                    crate::clones::dependents(&inv, g.id).iter().map(|d| d.spec.name.as_str()).collect();
                if !deps.is_empty() {
                    return Err(ApiError::conflict(format!(
                        "guest {} has dependents ({}): their disks are made from its; delete them first, or use \
                         --force to delete it together with them",
                        g.spec.name,
                        deps.join(", ")
                    )));
                }
            }
            if action != GuestAction::Delete {
                Self::ensure_no_pending_change(&g)?;
            }
            let mut writes = Vec::new();
            if let Some(op_id) = inv.active_ops.get(&g.id).copied() {
                let active = inv.ops.get(&op_id).cloned();
                match (action, active) {
                    // Deleting twice: hand back the delete already under way.
                    (GuestAction::Delete, Some(a))
                        if a.kind == OperationKind::DeleteGuest || a.state == OperationState::RollingBack =>
                    {
                        return Ok(OperationAccepted { operation: a, guest: g.id });
                    }
                    // Two hosts hold parts of it: the migration must end
                    // (or be cancelled) before anything else happens to it.
                    (GuestAction::Delete, Some(a)) if a.kind == OperationKind::MigrateGuest => {
                        return Err(ApiError::conflict(format!(
                            "guest {} is being migrated (operation {}); cancel it first (`drove op cancel {}`) or wait",
                            g.spec.name, a.id, a.id
                        )));
                    }
                    (GuestAction::Delete, Some(mut a)) => {
                        a.state = OperationState::Failed;
                        a.error = Some("superseded by a delete request".into());
                        a.finished_at = Some(now_rfc3339());
                        writes.push(put(op_key(a.id), &a));
                        inv.ops.insert(a.id, a);
                        inv.active_ops.remove(&g.id);
                    }
                    (_, Some(a)) => {
                        return Err(ApiError::conflict(format!(
                            "guest {} has operation {} ({}) in progress; wait for it or delete the guest",
                            g.spec.name, a.id, a.kind
                        )));
                    }
                    (_, None) => {}
                }
            }
            let before = g.state;
            let (kind, done) = match action {
                GuestAction::Start if g.template => {
                    return Err(ApiError::conflict(format!(
                        "guest {} is a template and never runs (its clones' disks are overlays on its own); \
                         clone it, or make it a plain guest first (drove vm template {} off)",
                        g.spec.name, g.spec.name
                    )));
                }
                GuestAction::Start => {
                    Self::ensure_not_copied_elsewhere(&inv, &g)?;
                    if g.intent != PowerIntent::Running {
                        g.intent = PowerIntent::Running;
                        self.ha_admit(&inv, &g, false)?;
                    }
                    match g.state {
                        GuestState::Running | GuestState::Starting => (OperationKind::StartGuest, true),
                        GuestState::Stopped | GuestState::Crashed | GuestState::Failed => {
                            g.state =
                                g.state.apply(GuestEvent::Start).map_err(|e| ApiError::conflict(e.to_string()))?;
                            (OperationKind::StartGuest, false)
                        }
                        s => {
                            return Err(ApiError::conflict(format!(
                                "guest {} is {s}; it can be started once it is stopped",
                                g.spec.name
                            )));
                        }
                    }
                }
                GuestAction::Stop { force } => {
                    g.intent = PowerIntent::Stopped;
                    match g.state {
                        GuestState::Stopped | GuestState::Crashed | GuestState::Failed => {
                            (OperationKind::StopGuest, true)
                        }
                        GuestState::Running | GuestState::Starting => {
                            g.state = g.state.apply(GuestEvent::Stop).map_err(|e| ApiError::conflict(e.to_string()))?;
                            if force {
                                inv.force_stop.insert(g.id);
                            }
                            (OperationKind::StopGuest, false)
                        }
                        GuestState::Stopping => {
                            if force {
                                inv.force_stop.insert(g.id);
                            }
                            (OperationKind::StopGuest, false)
                        }
                        s => {
                            return Err(ApiError::conflict(format!(
                                "guest {} is {s}; it cannot be stopped now",
                                g.spec.name
                            )));
                        }
                    }
                }
                GuestAction::Delete => {
                    g.state = g.state.apply(GuestEvent::Delete).map_err(|e| ApiError::conflict(e.to_string()))?;
                    (OperationKind::DeleteGuest, false)
                }
            };
            if g.state != before || g.intent != inv.guests.get(&g.id).map_or(g.intent, |o| o.intent) {
                g.generation += 1;
            }
            let mut op =
                Self::new_op(kind, &g, &ctx.principal, if done { "nothing to do" } else { "waiting for host" });
            if done {
                op.state = OperationState::Succeeded;
                op.progress = 100;
                op.finished_at = Some(now_rfc3339());
            } else {
                op.progress = 10;
                inv.active_ops.insert(g.id, op.id);
            }
            writes.push(put(guest_key(g.id), &g));
            writes.push(put(op_key(op.id), &op));
            inv.ops.insert(op.id, op.clone());
            inv.poke(g.host);
            inv.guests.insert(g.id, g.clone());
            writes.push(Self::audit_op(&mut inv, ctx, Some(format!("guest/{}", g.spec.name)), "ok", 202));
            (OperationAccepted { operation: op, guest: g.id }, self.persister.enqueue(writes))
        };
        self.notify_ops();
        pending.durable().await?;
        Ok(accepted)
    }

    /// Presses guest `key`'s reset button: it reboots at once on its host,
    /// in the same process, losing what it had not written to disk.
    pub async fn reset_guest(&self, ctx: &Ctx, key: &str) -> Result<GuestView, ApiError> {
        let (id, name) = {
            let inv = self.lock();
            let g = inv.find_guest(key).ok_or_else(|| ApiError::not_found("guest", key))?;
            if g.state != GuestState::Running {
                return Err(ApiError::conflict(format!(
                    "guest {} is {}; only a running guest can be reset (start it instead)",
                    g.spec.name, g.state
                )));
            }
            Self::ensure_idle(&inv, g)?;
            (g.id, g.spec.name.clone())
        };
        self.relay_done(id, AgentCallKind::Reset).await?;
        self.audit_event(ctx, Some(format!("guest/{name}")), "ok", 200).await;
        self.get_guest(&id.to_string()).await
    }

    /// Add hardware to a running guest: checked here (size, capacity,
    /// VLAN), recorded as pending before its host is asked and as the
    /// guest's spec once the host did it (see `crate::changes`); a refused
    /// change leaves the guest exactly as it was.
    pub async fn hotplug(self: &Arc<Self>, ctx: &Ctx, key: &str, req: HotplugRequest) -> Result<GuestView, ApiError> {
        let asked = [
            req.add_disk.is_some(),
            req.add_nic.is_some(),
            req.memory.is_some(),
            req.vcpus.is_some(),
            req.grow_disk.is_some(),
        ];
        if asked.iter().filter(|a| **a).count() != 1 {
            return Err(ApiError::invalid("body", "name exactly one of add_disk, add_nic, memory, vcpus, grow_disk"));
        }
        let (id, change, pending) = {
            let mut inv = self.lock();
            let g = inv.find_guest(key).cloned().ok_or_else(|| ApiError::not_found("guest", key))?;
            if g.state != GuestState::Running {
                return Err(ApiError::conflict(format!(
                    "guest {} is {}; hardware can be hot-added only while it runs",
                    g.spec.name, g.state
                )));
            }
            Self::ensure_idle(&inv, &g)?;
            let host = inv
                .hosts
                .get(&g.host)
                .map(|h| h.info.clone())
                .ok_or_else(|| ApiError::not_found("host", &g.host.to_string()))?;
            let alloc = inv.allocated.get(&g.host).copied().unwrap_or_default();
            let change = if let Some(size) = req.add_disk {
                if size.bytes() < MIB || !size.bytes().is_multiple_of(MIB) {
                    return Err(ApiError::invalid(
                        "add_disk",
                        format!("disk size must be a whole number of MiB and at least 1M, got {} bytes", size.bytes()),
                    ));
                }
                if g.spec.disks.len() >= 16 {
                    return Err(ApiError::conflict(format!("guest {} already has 16 disks", g.spec.name)));
                }
                HotplugChange::AddDisk { size }
            } else if let Some(nic) = &req.add_nic {
                let vlan = inv
                    .find_vlan(&nic.vlan)
                    .ok_or_else(|| ApiError::invalid("add_nic.vlan", format!("VLAN {:?} does not exist", nic.vlan)))?
                    .clone();
                if g.spec.nics.len() >= drove_model::guest::MAX_NICS {
                    return Err(ApiError::conflict(format!(
                        "guest {} already has {} NICs",
                        g.spec.name,
                        drove_model::guest::MAX_NICS
                    )));
                }
                let rate_bps = Self::check_nic_rate("add_nic.rate_bps", nic.rate_bps)?;
                let address = inv.assign_address(&vlan, nic.ip, &[]).map_err(|e| ipam_error("add_nic", e))?;
                // Reserved now so a concurrent create cannot take them.
                let mac = loop {
                    let mac = random_mac().map_err(|e| ApiError::unavailable(e.to_string()))?;
                    if inv.macs.insert(mac.clone()) {
                        break mac;
                    }
                };
                if let Some(a) = address {
                    inv.addresses.entry(vlan.tag).or_default().insert(a.ip);
                }
                // The guest-wide cap made explicit: the host applies and
                // reserves what the NIC carries.
                let rate_bps = rate_bps.or(g.spec.limits.nic_rate_bps);
                let spec = NicSpec { address, rate_bps, ..NicSpec::new(vlan.tag, mac) };
                if let (Some(uplink), Some(rate)) = (host.uplink_bps, spec.rate_bps)
                    && alloc.nic_bps + rate > uplink
                {
                    inv.release_nic(&spec);
                    return Err(ApiError::conflict(format!(
                        "host {} has {} of its {} bit/s uplink reserved by NIC limits; a {rate} bit/s NIC does not fit",
                        host.name, alloc.nic_bps, uplink
                    )));
                }
                HotplugChange::AddNic { nic: spec, index: g.spec.nics.len() as u32 }
            } else if let Some(memory) = req.memory {
                if memory <= g.spec.memory || !memory.bytes().is_multiple_of(MIB) {
                    return Err(ApiError::invalid(
                        "memory",
                        format!("memory can only grow, in whole MiB, from {} (asked {memory})", g.spec.memory),
                    ));
                }
                let free = host.memory.bytes().saturating_sub(alloc.memory);
                let more = memory.bytes() - g.spec.memory.bytes();
                if more > free {
                    return Err(ApiError::conflict(format!(
                        "host {} has {} memory free, {} more requested",
                        host.name,
                        ByteSize(free),
                        ByteSize(more)
                    )));
                }
                HotplugChange::SetMemory { memory }
            } else if let Some(grow) = req.grow_disk {
                let Some(disk) = g.spec.disks.get(grow.index as usize) else {
                    return Err(ApiError::invalid(
                        "grow_disk.index",
                        format!(
                            "guest {} has {} disk(s); there is no disk {}",
                            g.spec.name,
                            g.spec.disks.len(),
                            grow.index
                        ),
                    ));
                };
                if let Some(why) = g.spec.grow_refusal(grow.index as usize) {
                    return Err(ApiError {
                        field: Some("grow_disk.index".into()),
                        ..ApiError::conflict(format!("guest {}'s disk cannot grow: {why}", g.spec.name))
                    });
                }
                if grow.size <= disk.size || !grow.size.bytes().is_multiple_of(MIB) {
                    return Err(ApiError::invalid(
                        "grow_disk.size",
                        format!(
                            "disk {} of guest {} can only grow, in whole MiB, from {} (asked {})",
                            grow.index, g.spec.name, disk.size, grow.size
                        ),
                    ));
                }
                HotplugChange::GrowDisk { index: grow.index, size: grow.size }
            } else {
                let vcpus = req.vcpus.unwrap_or_default();
                if vcpus <= g.spec.vcpus || vcpus > 255 {
                    return Err(ApiError::invalid(
                        "vcpus",
                        format!("vCPUs can only grow, up to 255, from {} (asked {vcpus})", g.spec.vcpus),
                    ));
                }
                let limit = (f64::from(host.cores) * self.config.policy.vcpu_overcommit).floor() as u32;
                if alloc.vcpus + (vcpus - g.spec.vcpus) > limit {
                    return Err(ApiError::conflict(format!(
                        "host {} would have more than {limit} vCPUs allocated",
                        host.name
                    )));
                }
                HotplugChange::SetVcpus { vcpus }
            };
            let mut spec = g.spec.clone();
            apply_hotplug(&mut spec, &change);
            let pending = self.record_pending(&mut inv, &g, spec, describe_hotplug(&change));
            (g.id, change, pending)
        };
        let call = AgentCallKind::Hotplug { change: change.clone() };
        self.relay_change(ctx, key, id, pending, call, move |spec| apply_hotplug(spec, &change)).await
    }

    /// Relays `call` about guest `id` to its host; the host's refusal is a
    /// conflict that names its reason.
    async fn relay_done(&self, id: GuestId, call: AgentCallKind) -> Result<(), ApiError> {
        match self.relay(&id.to_string(), call).await? {
            (_, CallOutcome::Done) => Ok(()),
            (_, CallOutcome::Error { message }) => Err(ApiError::conflict(message)),
            (_, other) => Err(ApiError::unavailable(format!("the host answered with {other:?}"))),
        }
    }

    /// Records a change its host already made to guest `id`'s definition:
    /// a new generation, stored durably with the audit record, in the same
    /// write that clears the change's pending record; the guest as it is
    /// now.
    pub(crate) async fn commit_spec(
        &self,
        ctx: &Ctx,
        key: &str,
        id: GuestId,
        change: impl FnOnce(&mut GuestSpec),
    ) -> Result<GuestView, ApiError> {
        let (view, pending) = {
            let mut inv = self.lock();
            let mut g = inv.guests.get(&id).cloned().ok_or_else(|| ApiError::not_found("guest", key))?;
            inv.unindex_guest(&g);
            change(&mut g.spec);
            g.pending_spec = None;
            g.generation += 1;
            inv.index_guest(&g);
            inv.guests.insert(id, g.clone());
            let audit = Self::audit_op(&mut inv, ctx, Some(format!("guest/{}", g.spec.name)), "ok", 200);
            (Self::guest_view(&inv, &g), self.persister.enqueue(vec![put(guest_key(id), &g), audit]))
        };
        pending.durable().await?;
        Ok(view)
    }

    /// Change a guest's resource limits: checked here (values, the host's
    /// uplink), applied by its host (live if the guest runs, in its
    /// definition otherwise), recorded as pending before the host is asked
    /// and as the guest's limits once it did them (see `crate::changes`); a
    /// refused change leaves the guest exactly as it was. The host's uplink
    /// reservation follows at its next convergence (the generation moves).
    pub async fn set_limits(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        req: SetLimitsRequest,
    ) -> Result<GuestView, ApiError> {
        if req.is_empty() {
            return Err(ApiError::invalid(
                "body",
                "name at least one of cpu_cap_percent, cpu_shares, disk_bps, disk_iops, nic_rate_bps",
            ));
        }
        let (id, limits, pending) = {
            let mut inv = self.lock();
            let g = inv.find_guest(key).cloned().ok_or_else(|| ApiError::not_found("guest", key))?;
            let limits = req.apply_to(&g.spec.limits);
            limits.validate(g.spec.vcpus).map_err(|(field, msg)| ApiError::invalid(field, msg))?;
            if req.nic_rate_bps.is_some() {
                Self::check_nic_rate("nic_rate_bps", limits.nic_rate_bps)?;
            }
            // Only where its host holds its definition: a guest being made,
            // moved or removed has its limits changed once that is done.
            if !matches!(g.state, GuestState::Running | GuestState::Stopped | GuestState::Crashed) {
                return Err(ApiError::conflict(format!(
                    "guest {} is {}; its limits can change once it is running or stopped",
                    g.spec.name, g.state
                )));
            }
            // One change at a time (a pending one refuses): what the host
            // applied last is what is recorded last.
            Self::ensure_idle(&inv, &g)?;
            let host = inv
                .hosts
                .get(&g.host)
                .map(|h| h.info.clone())
                .ok_or_else(|| ApiError::not_found("host", &g.host.to_string()))?;
            let reserved = g.spec.nic_reservation();
            let wanted = GuestSpec { limits: limits.clone(), ..g.spec.clone() }.nic_reservation();
            let alloc = inv.allocated.get(&g.host).copied().unwrap_or_default();
            if let Some(uplink) = host.uplink_bps
                && wanted > reserved
                && alloc.nic_bps.saturating_sub(reserved) + wanted > uplink
            {
                return Err(ApiError {
                    field: Some("nic_rate_bps".into()),
                    ..ApiError::conflict(format!(
                        "host {} has {} of its {uplink} bit/s uplink reserved by NIC limits; guest {}'s NICs would \
                         reserve {wanted} bit/s instead of {reserved}, which does not fit",
                        host.name, alloc.nic_bps, g.spec.name
                    ))
                });
            }
            if limits == g.spec.limits {
                return Ok(Self::guest_view(&inv, &g));
            }
            let spec = GuestSpec { limits: limits.clone(), ..g.spec.clone() };
            let pending = self.record_pending(&mut inv, &g, spec, describe_limits(&g.spec.limits, &limits));
            (g.id, limits, pending)
        };
        let call = AgentCallKind::SetLimits { limits: limits.clone() };
        self.relay_change(ctx, key, id, pending, call, move |spec| spec.limits = limits).await
    }

    // ---- agent protocol ----------------------------------------------------------

    pub async fn register(&self, ctx: &Ctx, req: RegisterRequest) -> Result<RegisterResponse, ApiError> {
        validate_name(&req.name).map_err(|r| ApiError::invalid("name", format!("host name {:?} {r}", req.name)))?;
        if req.cores == 0 {
            return Err(ApiError::invalid("cores", "a host must offer at least one core"));
        }
        if req.memory.bytes() < 64 * MIB {
            return Err(ApiError::invalid("memory", "a host must offer at least 64M of memory"));
        }
        let (id, pending) = {
            let mut inv = self.lock();
            let existing = inv.host_names.get(&req.name).copied();
            let info = match existing.and_then(|id| inv.hosts.get(&id)) {
                Some(h) => {
                    let mut info = h.info.clone();
                    info.cores = req.cores;
                    info.memory = req.memory;
                    info.hypervisor = req.hypervisor;
                    info.uplink_bps = req.uplink_bps;
                    info.migration_address = req.migration_address;
                    info.state = info.state.apply(HostEvent::Registered).unwrap_or(info.state);
                    info
                }
                None => HostInfo {
                    id: HostId::new_v4(),
                    name: req.name.clone(),
                    cores: req.cores,
                    memory: req.memory,
                    hypervisor: req.hypervisor,
                    state: HostState::Up,
                    registered_at: now_rfc3339(),
                    uplink_bps: req.uplink_bps,
                    migration_address: req.migration_address,
                },
            };
            let id = info.id;
            let changed = inv.hosts.get(&id).map(|h| h.info != info).unwrap_or(true);
            inv.host_names.insert(info.name.clone(), id);
            let entry = inv.hosts.entry(id).or_insert_with(|| HostEntry::new(info.clone()));
            entry.info = info.clone();
            entry.last_seen = Some(Instant::now());
            let mut writes = Vec::new();
            if changed {
                writes.push(put(host_key(id), &info));
            }
            writes.push(self.renew_lease(id));
            writes.push(Self::audit_op(&mut inv, ctx, Some(format!("host/{}", info.name)), "ok", 200));
            (id, self.persister.enqueue(writes))
        };
        pending.durable().await?;
        // A registration of a known host is a new agent: the calls the old
        // one had are lost with it.
        self.fail_calls_to(id, "the host's agent restarted before answering");
        Ok(RegisterResponse {
            host_id: id,
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            lease_ms: Some(self.config.host_timeout.as_millis() as u64),
        })
    }

    pub async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse, ApiError> {
        let (pending, notify, poke, forget) = {
            let mut inv = self.lock();
            let inv = &mut *inv;
            let host =
                inv.hosts.get_mut(&req.host_id).ok_or_else(|| ApiError::not_found("host", &req.host_id.to_string()))?;
            host.last_seen = Some(Instant::now());
            host.pools = req.pools.clone();
            let poke = host.poke.clone();
            let mut w = Writes::default();
            w.ops.push(self.renew_lease(req.host_id));
            let next = host.info.state.apply(HostEvent::HeartbeatBack).unwrap_or(host.info.state);
            if next != host.info.state {
                tracing::info!(host = %host.info.name, "host is back up");
                host.info.state = next;
                w.ops.push(put(host_key(host.info.id), &host.info));
            }
            // Guests on shared storage this host still has though they were
            // restarted elsewhere: forgotten here — or, if this copy still
            // runs and the restarted one never came up (a host thought
            // dead that was only slow: its copy held the disk's lock),
            // taken back.
            let forget = crate::failover::reclaim(inv, req.host_id, &req.guests, &mut w);
            let mine = inv.by_host.get(&req.host_id).cloned().unwrap_or_default();
            if let Some(h) = inv.hosts.get_mut(&req.host_id) {
                h.orphans =
                    req.guests.iter().filter(|o| !mine.contains(&o.id) && !forget.contains(&o.id)).count() as u32;
            }
            for id in &req.destroyed {
                if mine.contains(id) {
                    finish_delete(inv, *id, &mut w);
                }
            }
            for id in &req.restarted {
                if let Some(g) = inv.guests.get_mut(id)
                    && g.host == req.host_id
                {
                    g.restarts += 1;
                    g.last_error = Some(format!("crashed; restarted by its host ({} restarts)", g.restarts));
                    tracing::warn!(guest = %g.spec.name, restarts = g.restarts, "guest crashed and was restarted");
                    w.ops.push(put(guest_key(*id), &*g));
                }
            }
            for f in &req.failures {
                if let Some(g) = inv.guests.get(&f.id)
                    && g.host == req.host_id
                    && g.generation == f.generation
                {
                    guest_failed(inv, f.id, &f.message, &mut w);
                }
            }
            let observed: std::collections::HashMap<GuestId, &ObservedGuest> =
                req.guests.iter().map(|o| (o.id, o)).collect();
            for id in &mine {
                advance(inv, *id, observed.get(id).copied(), &mut w);
            }
            let hour = crate::load::utc_hour(crate::now_ms());
            crate::load::record(inv, req.host_id, &req.guests, hour, self.config.load_flush, &mut w);
            (self.persister.enqueue(w.ops), w.ops_changed, poke, forget)
        };
        if notify {
            self.notify_ops();
        }
        pending.durable().await?;
        if let Some(ms) = req.wait_ms {
            // Hold the answer until there is news for this host, but well
            // within the liveness timeout.
            let cap = self.config.host_timeout / 3;
            let _ = tokio::time::timeout(Duration::from_millis(ms).min(cap), poke.notified()).await;
        }
        let calls = self.calls_lock().queued.remove(&req.host_id).unwrap_or_default();
        // Tell the agent only what is durable: a guest whose record a crash
        // could still lose must not be created on a host.
        let (guests, durable) = {
            let inv = self.lock();
            (Self::desired_for(&inv, req.host_id), self.persister.barrier())
        };
        durable.durable().await?;
        Ok(HeartbeatResponse { guests, calls, forget, lease_ms: Some(self.config.host_timeout.as_millis() as u64) })
    }

    /// The write that renews `host`'s lease from now. It is part of the
    /// heartbeat's (or registration's) batch, which is durable before the
    /// answer — and with it the lease — reaches the agent.
    fn renew_lease(&self, host: HostId) -> drove_store::Op {
        let now = crate::now_ms();
        let lease = drove_model::Lease {
            host,
            renewed_at_ms: now,
            expires_at_ms: now + self.config.host_timeout.as_millis() as u64,
        };
        put(lease_key(host), &lease)
    }

    /// What `host` should run, as its agent is told.
    fn desired_for(inv: &Inventory, host: HostId) -> Vec<DesiredGuest> {
        let Some(mine) = inv.by_host.get(&host) else { return Vec::new() };
        mine.iter()
            .filter_map(|id| inv.guests.get(id))
            .map(|g| DesiredGuest {
                id: g.id,
                generation: g.generation,
                state: desired_state(g),
                spec: g.spec.clone(),
                force_stop: inv.force_stop.contains(&g.id),
                restart_policy: g.restart_policy,
                migrating: g.migration.as_ref().is_some_and(|m| !m.state.committed()),
            })
            .collect()
    }

    // ---- relayed calls ------------------------------------------------------------

    fn calls_lock(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a call for the host of guest `key`; returns the call id.
    fn queue_call(
        &self,
        key: &str,
        make: impl FnOnce(u64) -> (AgentCallKind, Waiter),
    ) -> Result<(u64, GuestId), ApiError> {
        let (host, guest) = {
            let inv = self.lock();
            let g = inv.find_guest(key).ok_or_else(|| ApiError::not_found("guest", key))?;
            (g.host, g.id)
        };
        Ok((self.queue_call_on(host, guest, make)?, guest))
    }

    /// Queue a call about `guest` for `host` (which need not be the guest's
    /// host: a migration's target); returns the call id.
    fn queue_call_on(
        &self,
        host: HostId,
        guest: GuestId,
        make: impl FnOnce(u64) -> (AgentCallKind, Waiter),
    ) -> Result<u64, ApiError> {
        let inv = self.lock();
        let h = inv.hosts.get(&host).ok_or_else(|| ApiError::not_found("host", &host.to_string()))?;
        if matches!(h.info.state, HostState::Down | HostState::Standby | HostState::Waking) {
            return Err(ApiError::unavailable(format!("host {} is {}", h.info.name, h.info.state)));
        }
        let mut calls = self.calls_lock();
        calls.next_id += 1;
        let id = calls.next_id;
        let (kind, waiter) = make(id);
        calls.queued.entry(host).or_default().push(AgentCall { id, guest, kind });
        calls.waiting.insert(id, (host, waiter));
        drop(calls);
        h.poke.notify_one();
        Ok(id)
    }

    /// Relay a call about `guest` to `host` and wait up to `budget` for
    /// the answer; progress reports on the way update operation
    /// `progress_op`.
    pub async fn relay_on(
        &self,
        host: HostId,
        guest: GuestId,
        kind: AgentCallKind,
        budget: Duration,
        progress_op: Option<OperationId>,
    ) -> Result<CallOutcome, ApiError> {
        let (tx, rx) = oneshot::channel();
        let id = self.queue_call_on(host, guest, |_| (kind, Waiter::Call { tx, progress_op }))?;
        match tokio::time::timeout(budget, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            _ => {
                self.forget_call(id);
                Err(ApiError {
                    status: 504,
                    code: "host_timeout",
                    message: format!(
                        "host {host} did not answer about guest {guest} (within {}s, or its agent restarted)",
                        budget.as_secs()
                    ),
                    field: None,
                })
            }
        }
    }

    /// Ends the wait of every call to `host` that is still open: its agent
    /// restarted (or the host went down), so no answer will come. Each
    /// waiter sees "no answer" at once — not an answer, which a host might
    /// have given — and reconciles instead of waiting out its budget.
    pub(crate) fn fail_calls_to(&self, host: HostId, why: &str) {
        let dropped = {
            let mut calls = self.calls_lock();
            let ids: Vec<u64> = calls.waiting.iter().filter(|(_, (h, _))| *h == host).map(|(id, _)| *id).collect();
            calls.queued.remove(&host);
            ids.iter().filter_map(|id| calls.waiting.remove(id)).count()
        };
        if dropped > 0 {
            tracing::warn!(%host, calls = dropped, reason = why, "calls to the host will get no answer");
        }
    }

    fn forget_call(&self, id: u64) {
        let mut calls = self.calls_lock();
        calls.waiting.remove(&id);
        for q in calls.queued.values_mut() {
            q.retain(|c| c.id != id);
        }
    }

    /// Relay a call to the guest's host and wait for its answer, at most
    /// `CALL_TIMEOUT` beyond the call's own time limit.
    pub async fn relay(&self, key: &str, kind: AgentCallKind) -> Result<(GuestId, CallOutcome), ApiError> {
        let budget = CALL_TIMEOUT
            + match &kind {
                AgentCallKind::Exec { timeout_secs, .. } => Duration::from_secs(*timeout_secs),
                // Writing or loading a large memory state takes its time.
                AgentCallKind::Snapshot { .. } => Duration::from_secs(300),
                // Copying large disks takes its time; a move that outlasts
                // this is asked again, and answered once it is done.
                AgentCallKind::MoveStorage { .. } => Duration::from_secs(600),
                _ => Duration::ZERO,
            };
        let (tx, rx) = oneshot::channel();
        let (id, guest) = self.queue_call(key, |_| (kind, Waiter::Call { tx, progress_op: None }))?;
        match tokio::time::timeout(budget, rx).await {
            Ok(Ok(outcome)) => Ok((guest, outcome)),
            _ => {
                self.forget_call(id);
                Err(ApiError {
                    status: 504,
                    code: "host_timeout",
                    message: format!("the host of guest {key} did not answer within {}s", CALL_TIMEOUT.as_secs()),
                    field: None,
                })
            }
        }
    }

    /// Ask the guest's agent to connect its console to a new session.
    pub fn open_console(&self, key: &str) -> Result<(String, ConsoleRendezvous), ApiError> {
        let session = auth::mint_token().map_err(|e| ApiError::unavailable(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.consoles.lock().unwrap_or_else(|p| p.into_inner()).insert(session.clone(), tx);
        let s = session.clone();
        if let Err(e) =
            self.queue_call(key, |_| (AgentCallKind::Console { session: s.clone() }, Waiter::Console { session: s }))
        {
            self.consoles.lock().unwrap_or_else(|p| p.into_inner()).remove(&session);
            return Err(e);
        }
        Ok((session, rx))
    }

    /// Forget a console session nobody will join any more.
    pub fn close_console(&self, session: &str) {
        self.consoles.lock().unwrap_or_else(|p| p.into_inner()).remove(session);
    }

    /// The agent's side of a console session arrived.
    pub fn join_console(&self, session: &str, conn: hyper::upgrade::OnUpgrade) -> Result<(), ApiError> {
        let tx = self
            .consoles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session)
            .ok_or_else(|| ApiError::not_found("console session", session))?;
        self.calls_lock().waiting.retain(|_, (_, w)| !matches!(w, Waiter::Console { session: s } if s == session));
        tx.send(Ok(conn)).map_err(|_| ApiError::conflict("the operator left the console session"))
    }

    /// An agent answered a relayed call.
    pub fn complete_call(&self, result: CallResult) {
        if let CallOutcome::MigrationProgress { progress } = &result.outcome {
            // Not an answer: the call stays open.
            let op = match self.calls_lock().waiting.get(&result.id) {
                Some((_, Waiter::Call { progress_op, .. })) => *progress_op,
                _ => None,
            };
            if let Some(op) = op {
                self.report_migration_progress(op, progress);
            }
            return;
        }
        let waiter = self.calls_lock().waiting.remove(&result.id).map(|(_, w)| w);
        match (waiter, result.outcome) {
            (Some(Waiter::Call { tx, .. }), outcome) => {
                let _ = tx.send(outcome);
            }
            (Some(Waiter::Console { session }), CallOutcome::Error { message }) => {
                if let Some(tx) = self.consoles.lock().unwrap_or_else(|p| p.into_inner()).remove(&session) {
                    let _ = tx.send(Err(message));
                }
            }
            (Some(Waiter::Console { .. }), _) | (None, _) => {}
        }
    }

    // ---- monitor ---------------------------------------------------------------------

    /// One pass of the liveness and timeout checks; returns what it changed.
    pub async fn monitor_pass(&self) -> Result<usize, ApiError> {
        let (pending, changes, went_down) = {
            let mut inv = self.lock();
            let inv = &mut *inv;
            let mut w = Writes::default();
            let timeout = self.config.host_timeout;
            let grace_over = self.started.elapsed() > timeout;
            let mut went_down = Vec::new();
            for h in inv.hosts.values_mut() {
                let silent = match h.last_seen {
                    Some(t) => t.elapsed() > timeout,
                    None => grace_over,
                };
                if silent {
                    let next = h.info.state.apply(HostEvent::HeartbeatLost).unwrap_or(h.info.state);
                    if next != h.info.state {
                        tracing::warn!(host = %h.info.name, "host missed its heartbeats; marking it down");
                        h.info.state = next;
                        w.ops.push(put(host_key(h.info.id), &h.info));
                        went_down.push(h.info.id);
                    }
                }
            }
            let now = std::time::SystemTime::now();
            let expired: Vec<(GuestId, OperationId)> = inv
                .active_ops
                .iter()
                .filter(|(_, op)| {
                    inv.ops.get(op).is_some_and(|o| {
                        // Snapshot operations end by their driver, which
                        // finishes or undoes them whatever it takes.
                        !o.kind.is_driven()
                            && o.state == OperationState::Running
                            && humantime::parse_rfc3339(&o.created_at)
                                .ok()
                                .and_then(|t| now.duration_since(t).ok())
                                .is_some_and(|age| age > self.config.op_timeout)
                    })
                })
                .map(|(g, o)| (*g, *o))
                .collect();
            for (guest, _) in expired {
                let msg = format!("timed out after {}s", self.config.op_timeout.as_secs());
                guest_failed(inv, guest, &msg, &mut w);
                if let Some(g) = inv.guests.get(&guest) {
                    inv.poke(g.host);
                }
            }
            self.failover_pass(inv, &mut w);
            let n = w.ops.len();
            (self.persister.enqueue(w.ops), n, went_down)
        };
        for host in went_down {
            self.fail_calls_to(host, "the host went down before answering");
        }
        if changes > 0 {
            self.notify_ops();
        }
        pending.durable().await?;
        Ok(changes)
    }

    /// Counts for metrics.
    pub fn counts(&self) -> Counts {
        let inv = self.lock();
        let hosts = [HostState::Up, HostState::Maintenance, HostState::Down, HostState::Standby, HostState::Waking]
            .into_iter()
            .map(|s| (s, inv.hosts.values().filter(|h| h.info.state == s).count()))
            .collect();
        let mut guests: std::collections::HashMap<GuestState, usize> = Default::default();
        for g in inv.guests.values() {
            *guests.entry(g.state).or_default() += 1;
        }
        let guests = GuestState::ALL.iter().map(|s| (*s, guests.get(s).copied().unwrap_or(0))).collect();
        Counts { hosts, guests, active_operations: inv.active_ops.len() }
    }
}

/// Object counts for metrics.
#[derive(Debug, Clone)]
pub struct Counts {
    pub hosts: Vec<(HostState, usize)>,
    pub guests: Vec<(GuestState, usize)>,
    pub active_operations: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAction {
    Start,
    Stop { force: bool },
    Delete,
}

/// Takes the hosts running another member of anti-affinity `group` (other
/// than `except`) out of `capacities`. A `pinned` host among them is refused
/// naming the member; otherwise returns a note for a placement refusal.
pub(crate) fn keep_apart(
    inv: &Inventory,
    group: Option<&str>,
    except: Option<GuestId>,
    capacities: &mut [HostCapacity],
    pinned: Option<HostId>,
    field: &str,
) -> Result<String, ApiError> {
    let Some(group) = group else { return Ok(String::new()) };
    let members = inv.group_members(group, except);
    let name = |h: HostId| inv.hosts.get(&h).map_or_else(|| h.to_string(), |e| e.info.name.clone());
    if let Some((h, member)) = members.iter().find(|(h, _)| Some(*h) == pinned) {
        return Err(ApiError {
            field: Some(field.into()),
            ..ApiError::conflict(format!(
                "host {} runs guest {member} of anti-affinity group {group}: its members never share a host",
                name(*h)
            ))
        });
    }
    for c in capacities.iter_mut().filter(|c| members.iter().any(|(h, _)| *h == c.id)) {
        c.schedulable = false;
    }
    Ok(if members.is_empty() {
        String::new()
    } else {
        let hosts: Vec<String> = members.iter().map(|(h, _)| name(*h)).collect();
        format!(" ({} run guests of anti-affinity group {group})", hosts.join(", "))
    })
}

/// Store writes collected while handling one request.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    pub(crate) ops: Vec<Op>,
    pub(crate) ops_changed: bool,
}

fn desired_state(g: &Guest) -> DesiredState {
    match (g.state, g.intent) {
        (GuestState::Deleting | GuestState::Deleted, _) => DesiredState::Absent,
        (GuestState::Failed, _) => DesiredState::Stopped,
        (_, PowerIntent::Running) => DesiredState::Running,
        (_, PowerIntent::Stopped) => DesiredState::Stopped,
    }
}

pub(crate) fn apply(g: &mut Guest, e: GuestEvent) -> bool {
    match g.state.apply(e) {
        Ok(next) => {
            tracing::debug!(guest = %g.spec.name, from = %g.state, to = %next, event = ?e, "guest transition");
            g.state = next;
            true
        }
        Err(err) => {
            tracing::warn!(guest = %g.spec.name, error = %err, "ignoring transition");
            false
        }
    }
}

/// Update the active operation of `guest`: progress, or finish it.
fn progress_op(inv: &mut Inventory, guest: GuestId, step: &str, progress: u8, w: &mut Writes) {
    if let Some(op) = inv.active_ops.get(&guest).and_then(|id| inv.ops.get_mut(id))
        && op.state == OperationState::Running
        && op.step != step
    {
        op.step = step.to_owned();
        op.progress = progress;
        w.ops.push(put(op_key(op.id), &*op));
        w.ops_changed = true;
    }
}

pub(crate) fn finish_op(
    inv: &mut Inventory,
    guest: GuestId,
    event: OperationEvent,
    error: Option<String>,
    w: &mut Writes,
) {
    let Some(op_id) = inv.active_ops.get(&guest).copied() else { return };
    let Some(op) = inv.ops.get_mut(&op_id) else { return };
    match op.state.apply(event) {
        Ok(next) => op.state = next,
        Err(e) => {
            tracing::warn!(op = %op.id, error = %e, "ignoring operation transition");
            return;
        }
    }
    if error.is_some() {
        op.error = error;
    }
    match op.state {
        OperationState::Succeeded => {
            op.progress = 100;
            op.step = "done".into();
        }
        OperationState::RollingBack => op.step = "rolling back".into(),
        OperationState::Failed => op.step = "failed".into(),
        OperationState::Running => {}
    }
    if op.state.is_final() {
        op.finished_at = Some(now_rfc3339());
        inv.active_ops.remove(&guest);
        inv.force_stop.remove(&guest);
    }
    w.ops.push(put(op_key(op_id), &*op));
    w.ops_changed = true;
}

fn active_kind(inv: &Inventory, guest: GuestId) -> Option<(OperationKind, OperationState)> {
    inv.active_ops.get(&guest).and_then(|id| inv.ops.get(id)).map(|o| (o.kind, o.state))
}

/// Something the agent tried for `guest` failed (or an operation timed out).
fn guest_failed(inv: &mut Inventory, id: GuestId, message: &str, w: &mut Writes) {
    let Some(mut g) = inv.guests.get(&id).cloned() else { return };
    tracing::warn!(guest = %g.spec.name, error = message, "guest action failed");
    g.last_error = Some(message.to_owned());
    match active_kind(inv, id) {
        Some((OperationKind::CreateGuest, OperationState::Running)) => {
            // Leave nothing half-made: the host removes what it built, and the
            // record goes once it confirms.
            if apply(&mut g, GuestEvent::Delete) {
                g.generation += 1;
            }
            finish_op(inv, id, OperationEvent::Fail { undo: true }, Some(message.to_owned()), w);
        }
        Some((OperationKind::StartGuest, OperationState::Running)) => {
            apply(&mut g, GuestEvent::Failed);
            finish_op(inv, id, OperationEvent::Fail { undo: false }, Some(message.to_owned()), w);
        }
        Some((OperationKind::StopGuest, OperationState::Running)) => {
            finish_op(inv, id, OperationEvent::Fail { undo: false }, Some(message.to_owned()), w);
        }
        // Deletion and rollback keep going: the agent retries until it can
        // confirm, because a half-deleted guest must not be forgotten.
        Some(_) => {}
        None => {
            if g.state == GuestState::Starting {
                apply(&mut g, GuestEvent::Failed);
            }
        }
    }
    w.ops.push(put(guest_key(id), &g));
    inv.guests.insert(id, g);
}

/// The agent confirmed that `id` and its disks are gone.
fn finish_delete(inv: &mut Inventory, id: GuestId, w: &mut Writes) {
    let Some(g) = inv.guests.get(&id) else { return };
    if g.state != GuestState::Deleting {
        return;
    }
    let event = match active_kind(inv, id) {
        Some((_, OperationState::RollingBack)) => OperationEvent::RolledBack,
        _ => OperationEvent::Succeed,
    };
    finish_op(inv, id, event, None, w);
    if let Some(g) = inv.guests.remove(&id) {
        inv.unindex_guest(&g);
        w.ops.push(delete(guest_key(id)));
        crate::load::forget(inv, id, w);
    }
}

/// Move `id` along its lifecycle given what its host observes.
fn advance(inv: &mut Inventory, id: GuestId, observed: Option<&ObservedGuest>, w: &mut Writes) {
    let Some(mut g) = inv.guests.get(&id).cloned() else { return };
    // Mid-migration its source's copy pauses and vanishes by design; the
    // migration's driver decides what it means.
    if g.migration.as_ref().is_some_and(|m| !m.state.committed()) {
        return;
    }
    let obs = observed.map(|o| o.state);
    let before = g.clone();
    // Loop: one report can carry a guest through several steps (an agent
    // that provisioned and booted between two heartbeats).
    for _ in 0..4 {
        let state = g.state;
        match (g.state, obs) {
            (GuestState::Creating, Some(_)) => {
                apply(&mut g, GuestEvent::Provisioned);
                if g.intent == PowerIntent::Running {
                    apply(&mut g, GuestEvent::Start);
                    progress_op(inv, id, "booting", 60, w);
                } else {
                    finish_op(inv, id, OperationEvent::Succeed, None, w);
                }
            }
            (GuestState::Starting, Some(ObservedState::Running)) => {
                apply(&mut g, GuestEvent::Started);
                g.last_error = None;
                if let Some(f) = g.last_failover.as_mut().filter(|f| f.running_ms.is_none()) {
                    f.running_ms = Some(crate::now_ms());
                }
                if matches!(
                    active_kind(inv, id),
                    Some((OperationKind::CreateGuest | OperationKind::StartGuest, OperationState::Running))
                ) {
                    finish_op(inv, id, OperationEvent::Succeed, None, w);
                }
            }
            (GuestState::Starting, Some(ObservedState::Crashed)) => {
                guest_failed(inv, id, "guest crashed while starting", w);
                return;
            }
            // A guest with a change pending on its host keeps its record
            // (and generation) until the change is settled: a new
            // generation now would carry the spec without the change, and
            // the host would redefine the guest from it.
            (GuestState::Running, Some(ObservedState::Stopped)) if g.pending_spec.is_none() => {
                apply(&mut g, GuestEvent::Stopped);
                if g.restart_policy == RestartPolicy::Always {
                    // Its policy wants it up whatever stopped it.
                    apply(&mut g, GuestEvent::Start);
                    g.last_error = Some("powered itself off; started again (restart policy always)".into());
                } else {
                    // The guest OS powered itself off: respect that.
                    g.intent = PowerIntent::Stopped;
                }
                g.generation += 1;
            }
            (GuestState::Running, Some(ObservedState::Crashed) | None) => {
                apply(&mut g, GuestEvent::Crashed);
                g.last_error = Some(if obs.is_none() { "vanished from its host".into() } else { "crashed".into() });
            }
            (GuestState::Crashed, _) if g.intent == PowerIntent::Running && g.pending_spec.is_none() => {
                match g.restart_policy {
                    RestartPolicy::Always | RestartPolicy::OnFailure => {
                        apply(&mut g, GuestEvent::Start);
                        g.generation += 1;
                    }
                    // Left for the operator: it stays crashed, and off.
                    RestartPolicy::Never => {
                        g.intent = PowerIntent::Stopped;
                        g.generation += 1;
                    }
                }
            }
            (GuestState::Stopping, Some(ObservedState::Stopped | ObservedState::Crashed) | None) => {
                apply(&mut g, GuestEvent::Stopped);
                if matches!(active_kind(inv, id), Some((OperationKind::StopGuest, OperationState::Running))) {
                    finish_op(inv, id, OperationEvent::Succeed, None, w);
                }
                inv.force_stop.remove(&id);
            }
            (GuestState::Deleting, _) => progress_op(inv, id, "removing from host", 50, w),
            _ => {}
        }
        if g.state == state {
            break;
        }
    }
    if g.state == GuestState::Running
        && observed.is_some_and(|o| o.ready)
        && let Some(f) = g.last_failover.as_mut().filter(|f| f.ready_ms.is_none())
    {
        f.ready_ms = Some(crate::now_ms());
    }
    if g != before {
        w.ops.push(put(guest_key(id), &g));
        inv.guests.insert(id, g);
    }
}

/// Makes `change` in `spec`, as the host makes it in its definition.
fn apply_hotplug(spec: &mut GuestSpec, change: &HotplugChange) {
    match change {
        HotplugChange::AddDisk { size } => spec.disks.push(DiskSpec::qcow2(*size)),
        HotplugChange::AddNic { nic, .. } => spec.nics.push(nic.clone()),
        HotplugChange::SetMemory { memory } => spec.grow_memory_to(*memory),
        HotplugChange::SetVcpus { vcpus } => spec.grow_vcpus_to(*vcpus),
        HotplugChange::GrowDisk { index, size } => spec.grow_disk_to(*index as usize, *size),
    }
}

/// A hardware change, for people (a pending change's `what`).
fn describe_hotplug(change: &HotplugChange) -> String {
    match change {
        HotplugChange::AddDisk { size } => format!("add disk {size}"),
        HotplugChange::AddNic { nic, .. } => format!("add NIC {} on VLAN {}", nic.mac, nic.vlan),
        HotplugChange::SetMemory { memory } => format!("grow memory to {memory}"),
        HotplugChange::SetVcpus { vcpus } => format!("grow vCPUs to {vcpus}"),
        HotplugChange::GrowDisk { index, size } => format!("grow disk {index} to {size}"),
    }
}

/// A limits change, for people: the limits that change, old -> new.
fn describe_limits(old: &drove_model::ResourceLimits, new: &drove_model::ResourceLimits) -> String {
    fn show<T: std::fmt::Debug>(v: &Option<T>) -> String {
        v.as_ref().map_or_else(|| "none".to_owned(), |v| format!("{v:?}"))
    }
    let mut parts = Vec::new();
    let mut diff = |name: &str, a: String, b: String| {
        if a != b {
            parts.push(format!("{name} {a} -> {b}"));
        }
    };
    diff("cpu_cap_percent", show(&old.cpu_cap_percent), show(&new.cpu_cap_percent));
    diff("cpu_shares", show(&old.cpu_shares), show(&new.cpu_shares));
    diff("cpu_pin", format!("{:?}", old.cpu_pin), format!("{:?}", new.cpu_pin));
    diff("disk_bps", show(&old.disk_bps), show(&new.disk_bps));
    diff("disk_iops", show(&old.disk_iops), show(&new.disk_iops));
    diff("nic_rate_bps", show(&old.nic_rate_bps), show(&new.nic_rate_bps));
    format!("set limits {}", parts.join(", "))
}

/// An address that cannot be given: a conflict when it is taken or the
/// subnet is full, invalid input otherwise.
fn ipam_error(field: &str, e: drove_model::vlan::IpamError) -> ApiError {
    use drove_model::vlan::IpamError as E;
    match e {
        E::Taken { .. } | E::Exhausted { .. } => {
            ApiError { field: Some(field.to_owned()), ..ApiError::conflict(e.to_string()) }
        }
        E::NoSubnet { .. } | E::Outside { .. } | E::Gateway { .. } => {
            ApiError::invalid(&format!("{field}.ip"), e.to_string())
        }
    }
}

/// A locally administered unicast MAC in QEMU's 52:54:00 range.
fn random_mac() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 3];
    getrandom::fill(&mut b)?;
    Ok(format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]))
}

/// `qemu-img check` of a qcow2 image: its tables must be consistent (a
/// header that parses says nothing about the metadata behind it). Leaked
/// clusters are harmless and pass. An image is checked once, at import.
async fn check_image_integrity(path: &std::path::Path) -> Result<(), String> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2", "--output=json"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img check ({e}); is qemu-utils installed on the manager's host?"))?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let count = |key: &str| report.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
    // 0: clean, 3: only leaks; 2: corruptions, 1: the check itself failed.
    match out.status.code() {
        Some(0 | 3) => Ok(()),
        Some(2) => Err(format!("qemu-img check found {} corruption(s) in its tables", count("corruptions"))),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("no reason given").trim();
            Err(format!("qemu-img check could not read it: {why}"))
        }
    }
}
