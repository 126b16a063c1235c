//! Snapshot operations: take, delete and restore a guest's snapshots,
//! durably, with undo.
//!
//! The host's hypervisor is the source of truth for which snapshots exist;
//! the guest's record holds the tree (parents) and says which snapshot an
//! operation is working on ([`SnapshotState`]). Each operation is:
//!
//! ```text
//!  request ──► record the snapshot as Creating/Deleting/Restoring and the
//!              operation as running, in one store transaction (audited)
//!          ──► relay the action to the guest's host (a task of this manager)
//!          ──► answer: settle the record and finish the operation
//!              no answer (timeout, host down, manager restarted):
//!                create  → ask the host for its list: there → finish;
//!                          absent → delete it there (idempotent) and undo
//!                delete  → delete again (idempotent), then finish
//!                restore → restore again (idempotent), then finish
//! ```
//!
//! A failed create is undone on the host as well (a reply may be lost after
//! the snapshot was taken), and a failed delete is checked against the
//! host's list (a delete may fail half-way). So a crash anywhere leaves
//! neither a snapshot on the host that no record names nor a record of a
//! snapshot the host lacks. After a manager restart, [`Manager::resume_snapshot_ops`]
//! (called by the monitor) picks up every snapshot operation nobody drives.

use std::sync::Arc;
use std::time::Duration;

use drove_api::{
    AgentCallKind, CallOutcome, CreateSnapshotRequest, HostSnapshot, OperationAccepted, SnapshotCall, SnapshotList,
};
use drove_model::guest::validate_name;
use drove_model::snapshot::{CLONE_SNAPSHOT_PREFIX, SnapshotEvent, children};
use drove_model::{
    GuestId, GuestState, OperationId, OperationKind, OperationState, RestoreOutcome, Snapshot, SnapshotId,
    SnapshotKind, SnapshotState,
};

use crate::core::{ApiError, Ctx, Manager};
use crate::inventory::{guest_key, op_key, put};
use crate::now_rfc3339;

/// How long a driver waits before asking a host again.
const RETRY: Duration = Duration::from_secs(1);

/// What one attempt of a driver achieved.
enum Attempt {
    /// The operation is final.
    Settled,
    /// Nothing known yet: ask the host again (reconciling, not repeating
    /// blindly).
    Retry,
}

impl Manager {
    pub async fn list_snapshots(&self, key: &str) -> Result<SnapshotList, ApiError> {
        self.read(|inv| {
            inv.find_guest(key).map(|g| SnapshotList {
                guest: g.id,
                current: g.current_snapshot.clone(),
                snapshots: g.snapshots.clone(),
            })
        })
        .await?
        .ok_or_else(|| ApiError::not_found("guest", key))
    }

    /// Take snapshot `req.name` of guest `key`.
    pub async fn create_snapshot(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        req: CreateSnapshotRequest,
    ) -> Result<OperationAccepted, ApiError> {
        validate_name(&req.name).map_err(|r| ApiError::invalid("name", format!("snapshot name {:?} {r}", req.name)))?;
        let kind = if req.memory { SnapshotKind::Memory } else { SnapshotKind::Disk };
        if req.name.starts_with(CLONE_SNAPSHOT_PREFIX) {
            return Err(ApiError::invalid(
                "name",
                format!("snapshot names starting with {:?} are drove's own", CLONE_SNAPSHOT_PREFIX),
            ));
        }
        self.start(ctx, key, OperationKind::CreateSnapshot, |_, g| {
            if g.snapshots.iter().any(|s| s.name == req.name) {
                return Err(ApiError::conflict(format!(
                    "guest {} already has a snapshot named {:?}",
                    g.spec.name, req.name
                )));
            }
            if g.spec.disks.is_empty() {
                return Err(ApiError::conflict(format!("guest {} has no disks to snapshot", g.spec.name)));
            }
            if let Some(why) = g.spec.snapshot_refusal() {
                return Err(ApiError::conflict(format!("guest {} cannot be snapshotted: {why}", g.spec.name)));
            }
            match (kind, g.state) {
                (_, GuestState::Running) | (SnapshotKind::Disk, GuestState::Stopped) => {}
                (SnapshotKind::Memory, s) => {
                    return Err(ApiError::conflict(format!(
                        "guest {} is {s}; a snapshot with memory needs it running (take a disk snapshot instead)",
                        g.spec.name
                    )));
                }
                (SnapshotKind::Disk, s) => {
                    return Err(ApiError::conflict(format!(
                        "guest {} is {s}; snapshots are taken of running or stopped guests",
                        g.spec.name
                    )));
                }
            }
            g.snapshots.push(Snapshot {
                id: SnapshotId::new_v4(),
                name: req.name.clone(),
                kind,
                state: SnapshotState::Creating,
                parent: g.current_snapshot.clone(),
                created_at: now_rfc3339(),
                vm_state_size: None,
            });
            Ok(format!("taking {kind} snapshot {}", req.name))
        })
        .await
    }

    /// Delete snapshot `name` of guest `key`. One with children is refused
    /// unless `force`: then its children are re-parented to its parent
    /// (internal snapshots share data by reference counts, so no child
    /// loses anything).
    pub async fn delete_snapshot(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        name: &str,
        force: bool,
    ) -> Result<OperationAccepted, ApiError> {
        self.start(ctx, key, OperationKind::DeleteSnapshot, |inv, g| {
            let users = crate::clones::snapshot_users(inv, g.id, name);
            if !users.is_empty() {
                return Err(ApiError::conflict(format!(
                    "snapshot {name} of guest {} is being copied into clones ({}); delete it once they are made",
                    g.spec.name,
                    users.join(", ")
                )));
            }
            let kids = children(&g.snapshots, name).join(", ");
            let snap = find(g, name)?;
            if !kids.is_empty() && !force {
                return Err(ApiError::conflict(format!(
                    "snapshot {name} of guest {} has children ({kids}); delete them first, or use --force to \
                     delete it anyway (its children then hang from its parent and keep all their data)",
                    g.spec.name
                )));
            }
            snap.state = snap.state.apply(SnapshotEvent::Delete).map_err(|e| ApiError::conflict(e.to_string()))?;
            Ok(format!("deleting snapshot {name}"))
        })
        .await
    }

    /// Roll guest `key` back to snapshot `name`.
    pub async fn restore_snapshot(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        name: &str,
    ) -> Result<OperationAccepted, ApiError> {
        self.start(ctx, key, OperationKind::RestoreSnapshot, |_, g| {
            let guest = g.spec.name.clone();
            let state = g.state;
            let snap = find(g, name)?;
            if !matches!(state, GuestState::Running | GuestState::Stopped) {
                return Err(ApiError::conflict(format!(
                    "guest {guest} is {state}; a snapshot is restored into a running or stopped guest"
                )));
            }
            snap.state = snap.state.apply(SnapshotEvent::Restore).map_err(|e| ApiError::conflict(e.to_string()))?;
            Ok(format!("restoring snapshot {name}"))
        })
        .await
    }

    /// Starts the operation: `change` checks the guest and marks its
    /// snapshot; the guest, the operation and the audit record are written
    /// in one transaction, then a driver takes over.
    async fn start(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        kind: OperationKind,
        change: impl FnOnce(&crate::inventory::Inventory, &mut drove_model::Guest) -> Result<String, ApiError>,
    ) -> Result<OperationAccepted, ApiError> {
        let (accepted, pending) = {
            let mut inv = self.lock();
            let mut g = inv.find_guest(key).cloned().ok_or_else(|| ApiError::not_found("guest", key))?;
            Self::ensure_idle(&inv, &g)?;
            if matches!(g.state, GuestState::Creating | GuestState::Deleting | GuestState::Deleted) {
                return Err(ApiError::conflict(format!("guest {} is {}", g.spec.name, g.state)));
            }
            if g.template {
                return Err(ApiError::conflict(format!(
                    "guest {} is a template: its disks and snapshots never change (clones may be overlays on them)",
                    g.spec.name
                )));
            }
            let step = change(&inv, &mut g)?;
            self.begin_driven_op(&mut inv, ctx, &g, kind, &step)
        };
        let accepted = self.durable_driven_op(accepted, pending).await?;
        self.spawn_driver(accepted.guest, true);
        Ok(accepted)
    }

    /// Records operation `kind` on guest `g` (changed as it begins) and
    /// claims its driver for this process. Claimed under the inventory
    /// lock, which the caller holds: the monitor never starts a second,
    /// reconciling driver for an operation just begun.
    pub(crate) fn begin_driven_op(
        &self,
        inv: &mut crate::inventory::Inventory,
        ctx: &Ctx,
        g: &drove_model::Guest,
        kind: OperationKind,
        step: &str,
    ) -> (OperationAccepted, crate::persist::Pending) {
        let mut op = Self::new_op(kind, g, &ctx.principal, step);
        op.progress = 10;
        self.claim_driver(g.id);
        let pending = self.record_guest_op(inv, ctx, g, &op);
        (OperationAccepted { operation: op, guest: g.id }, pending)
    }

    /// Waits until a [`Self::begin_driven_op`] record is durable; if it
    /// cannot be, the claim is given back and the caller starts no driver.
    pub(crate) async fn durable_driven_op(
        &self,
        accepted: OperationAccepted,
        pending: crate::persist::Pending,
    ) -> Result<OperationAccepted, ApiError> {
        self.notify_ops();
        if let Err(e) = pending.durable().await {
            self.release_driver(accepted.guest);
            return Err(e.into());
        }
        Ok(accepted)
    }

    /// Starts a driver for every snapshot operation that has none (after a
    /// manager restart, or a driver that died): it reconciles with the host
    /// first, as it cannot know what a predecessor already did.
    pub fn resume_snapshot_ops(self: &Arc<Self>) {
        let orphaned: Vec<GuestId> = {
            let inv = self.lock();
            inv.active_ops
                .iter()
                .filter(|(_, op)| inv.ops.get(op).is_some_and(|o| o.kind.is_snapshot() && !o.state.is_final()))
                .map(|(g, _)| *g)
                .filter(|g| self.claim_driver(*g))
                .collect()
        };
        for guest in orphaned {
            tracing::info!(%guest, "resuming a snapshot operation");
            self.spawn_driver(guest, false);
        }
    }

    /// Aborts this manager's driver tasks (the server is stopping).
    pub fn abort_background(&self) {
        for task in self.background.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            task.abort();
        }
    }

    /// Marks `guest`'s operation (a snapshot or a storage move) or its
    /// pending change (see `crate::changes`) as driven here; false if it
    /// already is.
    pub(crate) fn claim_driver(&self, guest: GuestId) -> bool {
        self.snapshot_drivers.lock().unwrap_or_else(|p| p.into_inner()).insert(guest)
    }

    pub(crate) fn release_driver(&self, guest: GuestId) {
        self.snapshot_drivers.lock().unwrap_or_else(|p| p.into_inner()).remove(&guest);
    }

    /// Drives the snapshot operation of a claimed `guest` until it is final.
    fn spawn_driver(self: &Arc<Self>, guest: GuestId, fresh: bool) {
        let me = self.clone();
        self.spawn_background(async move {
            let mut fresh = fresh;
            me.fail_without_snapshot(guest);
            while let Some((op, kind, snap)) = me.pending(guest) {
                match me.attempt(guest, op, kind, &snap, fresh).await {
                    Attempt::Settled => break,
                    Attempt::Retry => {
                        fresh = false;
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
            me.release_driver(guest);
        });
    }

    /// The guest's snapshot operation in progress and the snapshot it works
    /// on, if there still is one (a guest delete supersedes it).
    fn pending(&self, guest: GuestId) -> Option<(OperationId, OperationKind, Snapshot)> {
        let inv = self.lock();
        let op = inv.active_ops.get(&guest).and_then(|o| inv.ops.get(o))?;
        if !op.kind.is_snapshot() || op.state.is_final() {
            return None;
        }
        let g = inv.guests.get(&guest)?;
        let snap = g.snapshots.iter().find(|s| !s.state.is_settled())?;
        Some((op.id, op.kind, snap.clone()))
    }

    /// Fails a snapshot operation whose guest has no snapshot in progress
    /// (a record changed by hand, or by an older manager): there is nothing
    /// to finish or undo, and it must not stay running forever.
    fn fail_without_snapshot(&self, guest: GuestId) {
        let op = {
            let inv = self.lock();
            let Some(op) = inv.active_ops.get(&guest).and_then(|o| inv.ops.get(o)) else { return };
            let busy = inv.guests.get(&guest).is_some_and(|g| g.snapshots.iter().any(|s| !s.state.is_settled()));
            if !op.kind.is_snapshot() || op.state.is_final() || busy {
                return;
            }
            op.id
        };
        self.settle(guest, op, Err("no snapshot of the guest is in progress".to_owned()), |_| {});
    }

    /// Relays one snapshot action; `None` when the answer is unknown (no
    /// answer, host down).
    async fn ask(&self, guest: GuestId, call: SnapshotCall) -> Option<CallOutcome> {
        match self.relay(&guest.to_string(), AgentCallKind::Snapshot { call }).await {
            Ok((_, outcome)) => Some(outcome),
            Err(e) => {
                tracing::warn!(%guest, error = %e, "no answer to a snapshot action; will reconcile");
                None
            }
        }
    }

    /// The host's complete snapshots of `guest`, or `None` if it cannot say
    /// (an error names the reason: the guest is not on the host).
    async fn host_list(&self, guest: GuestId) -> Option<Result<Vec<HostSnapshot>, String>> {
        match self.ask(guest, SnapshotCall::List).await? {
            CallOutcome::Snapshots { snapshots } => Some(Ok(snapshots)),
            CallOutcome::Error { message } => Some(Err(message)),
            _ => None,
        }
    }

    async fn attempt(
        &self,
        guest: GuestId,
        op: OperationId,
        kind: OperationKind,
        snap: &Snapshot,
        fresh: bool,
    ) -> Attempt {
        let name = snap.name.clone();
        match kind {
            OperationKind::CreateSnapshot if fresh => {
                match self.ask(guest, SnapshotCall::Create { name: name.clone(), kind: snap.kind }).await {
                    Some(CallOutcome::Snapshots { snapshots }) => {
                        let taken = snapshots.into_iter().find(|s| s.name == name);
                        self.created(guest, op, &name, taken.map(|s| s.vm_state_size));
                        Attempt::Settled
                    }
                    Some(CallOutcome::Error { message }) => self.undo_create(guest, op, &name, message).await,
                    _ => Attempt::Retry,
                }
            }
            OperationKind::CreateSnapshot => match self.host_list(guest).await {
                Some(Ok(list)) => match list.into_iter().find(|s| s.name == name) {
                    Some(s) => {
                        self.created(guest, op, &name, Some(s.vm_state_size));
                        Attempt::Settled
                    }
                    None => {
                        let why = "interrupted before the host had taken it".to_owned();
                        self.undo_create(guest, op, &name, why).await
                    }
                },
                // The host cannot have it (the guest is not there).
                Some(Err(message)) => {
                    self.settle(guest, op, Err(message), |g| g.snapshots.retain(|s| s.name != name));
                    Attempt::Settled
                }
                None => Attempt::Retry,
            },
            OperationKind::DeleteSnapshot => match self.ask(guest, SnapshotCall::Delete { name: name.clone() }).await {
                Some(CallOutcome::Done) => {
                    self.deleted(guest, op, &name);
                    Attempt::Settled
                }
                Some(CallOutcome::Error { message }) => match self.host_list(guest).await {
                    // Still complete on the host: the delete did not happen.
                    Some(Ok(list)) if list.iter().any(|s| s.name == name) => {
                        self.settle(guest, op, Err(message), |g| set_state(g, &name, SnapshotEvent::DeleteFailed));
                        Attempt::Settled
                    }
                    // Gone or partial: it is no snapshot any more.
                    Some(Ok(_)) => {
                        self.deleted(guest, op, &name);
                        Attempt::Settled
                    }
                    _ => Attempt::Retry,
                },
                _ => Attempt::Retry,
            },
            OperationKind::RestoreSnapshot => {
                match self.ask(guest, SnapshotCall::Restore { name: name.clone() }).await {
                    Some(CallOutcome::Restored { outcome }) => {
                        self.settle(guest, op, Ok(restored_step(&name, outcome)), |g| {
                            set_state(g, &name, SnapshotEvent::RestoreEnded);
                            g.current_snapshot = Some(name.clone());
                        });
                        Attempt::Settled
                    }
                    Some(CallOutcome::Error { message }) => {
                        self.settle(guest, op, Err(message), |g| set_state(g, &name, SnapshotEvent::RestoreEnded));
                        Attempt::Settled
                    }
                    _ => Attempt::Retry,
                }
            }
            OperationKind::CreateGuest
            | OperationKind::StartGuest
            | OperationKind::StopGuest
            | OperationKind::DeleteGuest
            | OperationKind::MigrateGuest
            | OperationKind::DrainHost
            | OperationKind::MoveStorage => Attempt::Settled,
        }
    }

    fn created(&self, guest: GuestId, op: OperationId, name: &str, size: Option<drove_model::ByteSize>) {
        let step = format!("snapshot {name} taken");
        self.settle(guest, op, Ok(step), |g| {
            set_state(g, name, SnapshotEvent::Taken);
            if let Some(s) = g.snapshots.iter_mut().find(|s| s.name == name) {
                s.vm_state_size = size;
            }
            g.current_snapshot = Some(name.to_owned());
        });
    }

    fn deleted(&self, guest: GuestId, op: OperationId, name: &str) {
        self.settle(guest, op, Ok(format!("snapshot {name} deleted")), |g| {
            let parent = g.snapshots.iter().find(|s| s.name == name).and_then(|s| s.parent.clone());
            g.snapshots.retain(|s| s.name != name);
            for s in &mut g.snapshots {
                if s.parent.as_deref() == Some(name) {
                    s.parent = parent.clone();
                }
            }
            if g.current_snapshot.as_deref() == Some(name) {
                g.current_snapshot = parent;
            }
        });
    }

    /// A create failed or was interrupted: remove whatever the host may have
    /// (a lost reply, a half-made snapshot), then the record.
    async fn undo_create(&self, guest: GuestId, op: OperationId, name: &str, why: String) -> Attempt {
        match self.ask(guest, SnapshotCall::Delete { name: name.to_owned() }).await {
            Some(CallOutcome::Done) => {
                self.settle(guest, op, Err(format!("{why}; undone")), |g| g.snapshots.retain(|s| s.name != name));
                Attempt::Settled
            }
            _ => Attempt::Retry,
        }
    }

    /// Ends operation `op` of `guest` (if it is still the active one):
    /// `change` settles the guest's record, `result` is the step of a
    /// success or the error of a failure. One transaction.
    fn settle(
        &self,
        guest: GuestId,
        op: OperationId,
        result: Result<String, String>,
        change: impl FnOnce(&mut drove_model::Guest),
    ) {
        let pending = {
            let mut inv = self.lock();
            if inv.active_ops.get(&guest) != Some(&op) {
                return;
            }
            let Some(mut g) = inv.guests.get(&guest).cloned() else { return };
            let Some(mut o) = inv.ops.get(&op).cloned() else { return };
            change(&mut g);
            let event = match &result {
                Ok(_) => drove_model::operation::OperationEvent::Succeed,
                Err(_) => drove_model::operation::OperationEvent::Fail { undo: false },
            };
            o.state = o.state.apply(event).unwrap_or(OperationState::Failed);
            match result {
                Ok(step) => {
                    o.step = step;
                    o.progress = 100;
                }
                Err(error) => {
                    tracing::warn!(guest = %g.spec.name, op = %o.kind, %error, "snapshot operation failed");
                    o.step = "failed".into();
                    o.error = Some(error);
                }
            }
            o.finished_at = Some(now_rfc3339());
            inv.active_ops.remove(&guest);
            inv.ops.insert(op, o.clone());
            inv.guests.insert(guest, g.clone());
            self.persister().enqueue(vec![put(guest_key(guest), &g), put(op_key(op), &o)])
        };
        self.notify_ops();
        // The answer goes to nobody: a failed write poisons the persister
        // and the next manager resumes the operation from the store.
        tokio::spawn(async move {
            if let Err(e) = pending.durable().await {
                tracing::error!(error = %e, "recording the end of a snapshot operation failed");
            }
        });
    }
}

fn find<'a>(g: &'a mut drove_model::Guest, name: &str) -> Result<&'a mut Snapshot, ApiError> {
    let guest = g.spec.name.clone();
    g.snapshots
        .iter_mut()
        .find(|s| s.name == name)
        .ok_or_else(|| ApiError::not_found(&format!("snapshot of guest {guest}"), name))
}

fn set_state(g: &mut drove_model::Guest, name: &str, event: SnapshotEvent) {
    if let Some(s) = g.snapshots.iter_mut().find(|s| s.name == name) {
        match s.state.apply(event) {
            Ok(next) => s.state = next,
            Err(e) => tracing::warn!(snapshot = name, error = %e, "ignoring snapshot transition"),
        }
    }
}

fn restored_step(name: &str, outcome: RestoreOutcome) -> String {
    format!("restored {name}: {}", outcome.describe())
}
