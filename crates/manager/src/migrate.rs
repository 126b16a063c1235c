//! Live migration as a durable operation: the manager drives the two hosts
//! through the steps of `drove_model::migration`, recording each state on
//! the guest before acting on it, so that any crash is followed by
//! reconciliation from what the store says.
//!
//! ```text
//!  state        action                                    next
//!  Preparing    target: Prepare (NICs, disks, listen)     Sending | RollingBack
//!  Sending      source: Send (mirror disks, copy RAM)     Finishing | reconcile
//!  Finishing    target: Finish (runs here?)               commit → Cleaning | reconcile
//!  Cleaning     source: Discard                           done (guest on target)
//!  RollingBack  target: Discard; source: Cancel/Resume    done (guest on source)
//! ```
//!
//! The commit is one store write: the guest's host becomes the target while
//! the target runs it. Until then the source's copy is the guest (its agent
//! leaves it alone: `DesiredGuest::migrating`), after it the target's.
//!
//! A step whose answer is lost (timeout, host down, manager restart) is
//! never repeated blindly. A lost `Send` is reconciled by asking the target
//! whether it runs the guest (then the migration completed: commit) and
//! otherwise cancelling the send on the source; a source whose send had
//! completed refuses the cancel, and is resumed only once the target's copy
//! is discarded. So there is never a moment with two running copies, and
//! never one with none but for the switchover itself.
//!
//! The TLS key of a migration is minted here and kept in memory only: a
//! manager that restarts before the transfer began rolls it back rather
//! than re-sending with a key it no longer has.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use drove_api::{AgentCallKind, CallOutcome, MigrateCall, MigrateRequest, ObservedState, OperationAccepted};
use drove_model::migration::{
    DiskTransfer, IncomingDone, Migration, MigrationEvent, MigrationKey, MigrationProgress, MigrationResult,
    MigrationState, Outgoing, TransferPhase,
};
use drove_model::operation::OperationEvent;
use drove_model::{GuestId, GuestState, HostId, OperationId, OperationKind, OperationState};
use drove_placement::Request;

use crate::core::{ApiError, Ctx, Manager};
use crate::inventory::{guest_key, op_key, put};
use crate::now_rfc3339;

/// Pause between attempts when a host does not answer.
const RETRY: Duration = Duration::from_secs(1);
/// How long a target may take to set up, and to report the guest running.
const PREPARE_BUDGET: Duration = Duration::from_secs(120);
const FINISH_BUDGET: Duration = Duration::from_secs(90);
const QUICK_BUDGET: Duration = Duration::from_secs(30);
/// The default pause QEMU aims for in the final round.
pub const DEFAULT_DOWNTIME_MS: u64 = 50;

/// In-memory state of this manager's migration drivers.
#[derive(Debug, Default)]
pub struct Drivers {
    /// Guests whose migration a task of this manager drives.
    driving: std::collections::HashSet<GuestId>,
    /// Keys of the migrations this manager started (never persisted).
    keys: HashMap<GuestId, MigrationKey>,
    /// Operations the operator asked to cancel.
    cancelled: std::collections::HashSet<OperationId>,
    /// Why a send failed, for the rollback's reason (kept across the
    /// reconciliation's retries).
    send_errors: HashMap<GuestId, String>,
    /// Drain operations a task of this manager drives.
    pub(crate) draining: std::collections::HashSet<OperationId>,
}

impl Manager {
    fn drivers(&self) -> std::sync::MutexGuard<'_, Drivers> {
        self.migration_drivers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start migrating guest `key` (running) to `req.to` or a host placement
    /// picks.
    pub async fn migrate_guest(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        req: MigrateRequest,
    ) -> Result<OperationAccepted, ApiError> {
        let downtime_limit_ms = req.downtime_limit_ms.unwrap_or(DEFAULT_DOWNTIME_MS);
        if !(1..=60_000).contains(&downtime_limit_ms) {
            return Err(ApiError::invalid(
                "downtime_limit_ms",
                format!("the downtime limit must be 1..=60000 ms, got {downtime_limit_ms}"),
            ));
        }
        let key_bytes = crate::auth::mint_token().map_err(|e| ApiError::unavailable(e.to_string()))?;
        let (accepted, pending) = {
            let mut inv = self.lock();
            let mut g = inv.find_guest(key).cloned().ok_or_else(|| ApiError::not_found("guest", key))?;
            Self::ensure_idle(&inv, &g)?;
            if g.state != GuestState::Running {
                return Err(ApiError::conflict(format!(
                    "guest {} is {}; only a running guest is live-migrated (start it, or stop it and start it \
                     elsewhere)",
                    g.spec.name, g.state
                )));
            }
            if let Some(why) = g.spec.migration_refusal() {
                return Err(ApiError::conflict(format!("guest {} cannot be live-migrated: {why}", g.spec.name)));
            }
            let source = inv.hosts.get(&g.host).ok_or_else(|| ApiError::not_found("host", &g.host.to_string()))?;
            let source_name = source.info.name.clone();
            let mut capacities = self.capacities(&inv);
            // Never onto itself.
            for c in capacities.iter_mut().filter(|c| c.id == g.host) {
                c.schedulable = false;
            }
            let pinned = match &req.to {
                None => None,
                Some(to) => {
                    let h = inv
                        .find_host(to)
                        .ok_or_else(|| ApiError::invalid("to", format!("host {to:?} does not exist")))?;
                    if h.info.id == g.host {
                        return Err(ApiError::invalid(
                            "to",
                            format!("guest {} already runs on {to}; name another host", g.spec.name),
                        ));
                    }
                    Some(h.info.id)
                }
            };
            let request = Request::of(&g.spec);
            let apart = crate::core::keep_apart(
                &inv,
                g.spec.anti_affinity.as_deref(),
                Some(g.id),
                &mut capacities,
                pinned,
                "to",
            )?;
            let target =
                drove_placement::place(&capacities, request, pinned, &self.config.policy).map_err(|e| ApiError {
                    field: Some("to".into()),
                    ..ApiError::conflict(format!("no host can take the guest: {e}{apart}"))
                })?;
            let target_entry =
                inv.hosts.get(&target).ok_or_else(|| ApiError::not_found("host", &target.to_string()))?;
            if target_entry.info.migration_address.is_none() {
                return Err(ApiError::conflict(format!(
                    "host {} has no migration network address (its agent runs without --migration-address)",
                    target_entry.info.name
                )));
            }
            let target_name = target_entry.info.name.clone();
            let step = format!("preparing {target_name} to receive the guest from {source_name}");
            let mut op = Self::new_op(OperationKind::MigrateGuest, &g, &ctx.principal, &step);
            op.progress = 5;
            inv.unindex_guest(&g);
            g.migration = Some(Migration {
                op: op.id,
                source: g.host,
                target,
                state: MigrationState::Preparing,
                listen: None,
                port: 0,
                nbd_port: 0,
                downtime_limit_ms,
                max_bandwidth: req.max_bandwidth.unwrap_or(0),
                started_at: now_rfc3339(),
                error: None,
                stats: None,
            });
            // Indexed with the migration: its room on the target is held.
            inv.index_guest(&g);
            {
                let mut d = self.drivers();
                d.driving.insert(g.id);
                d.keys.insert(g.id, MigrationKey { identity: format!("drove-{}", g.id), key_hex: key_bytes });
            }
            let pending = self.record_guest_op(&mut inv, ctx, &g, &op);
            (OperationAccepted { operation: op, guest: g.id }, pending)
        };
        self.notify_ops();
        if let Err(e) = pending.durable().await {
            self.drivers().driving.remove(&accepted.guest);
            return Err(e.into());
        }
        self.spawn_migration_driver(accepted.guest, true);
        Ok(accepted)
    }

    /// Asks the migration of operation `op` to stop: before its commit it
    /// rolls back (the guest keeps running on its source); after, it is too
    /// late and refused.
    pub async fn cancel_migration(&self, op: OperationId) -> Result<(), ApiError> {
        let (guest, source, state) = {
            let inv = self.lock();
            let o = inv.ops.get(&op).ok_or_else(|| ApiError::not_found("operation", &op.to_string()))?;
            if o.kind != OperationKind::MigrateGuest {
                return Err(ApiError::conflict(format!("operation {op} ({}) cannot be cancelled", o.kind)));
            }
            if o.state.is_final() {
                return Err(ApiError::conflict(format!("operation {op} is {} already", o.state)));
            }
            let guest = GuestId::from_uuid(o.target);
            let m = inv.guests.get(&guest).and_then(|g| g.migration.clone());
            let Some(m) = m.filter(|m| m.op == op) else {
                return Err(ApiError::conflict(format!("operation {op} has no migration in progress")));
            };
            if m.state.committed() {
                return Err(ApiError::conflict(format!(
                    "operation {op} is past its commit: the guest runs on its new host already"
                )));
            }
            (guest, m.source, m.state)
        };
        self.drivers().cancelled.insert(op);
        if state == MigrationState::Sending {
            // Interrupts the send in flight; its failure makes the driver
            // reconcile, which finds the source running and rolls back.
            let _ = self
                .relay_on(source, guest, AgentCallKind::Migrate { call: MigrateCall::Cancel }, QUICK_BUDGET, None)
                .await;
        }
        Ok(())
    }

    /// Starts a driver for every migration without one (after a manager
    /// restart).
    pub fn resume_migrations(self: &Arc<Self>) {
        let orphaned: Vec<GuestId> = {
            let inv = self.lock();
            let mut d = self.drivers();
            inv.guests
                .values()
                .filter(|g| g.migration.is_some())
                .map(|g| g.id)
                .filter(|id| d.driving.insert(*id))
                .collect()
        };
        for guest in orphaned {
            tracing::info!(%guest, "resuming a migration");
            self.spawn_migration_driver(guest, false);
        }
    }

    /// Drives the migration of `guest` to its end. `fresh`: it was just
    /// started here, so its state is this driver's own doing; a state found
    /// instead (after a restart, or a step without answer) is reconciled
    /// with the hosts before anything is repeated.
    fn spawn_migration_driver(self: &Arc<Self>, guest: GuestId, fresh: bool) {
        let me = self.clone();
        self.spawn_background(async move {
            let mut fresh = fresh;
            while let Some(m) = me.migration_of(guest) {
                let answered = me.step(guest, &m, fresh).await.is_ok();
                let moved = me.migration_of(guest).is_none_or(|now| now.state != m.state);
                // Entered by this driver's own transition: act on it.
                fresh = answered && moved;
                if !answered {
                    tokio::time::sleep(RETRY).await;
                }
            }
            let mut d = me.drivers();
            d.driving.remove(&guest);
            d.keys.remove(&guest);
            d.send_errors.remove(&guest);
        });
    }

    fn migration_of(&self, guest: GuestId) -> Option<Migration> {
        self.lock().guests.get(&guest).and_then(|g| g.migration.clone())
    }

    /// One step. `Err` when a host did not answer: try again shortly.
    async fn step(&self, guest: GuestId, m: &Migration, fresh: bool) -> Result<(), ()> {
        let cancelled = self.drivers().cancelled.contains(&m.op);
        let call = |host: HostId, call: MigrateCall, budget: Duration| {
            self.relay_on(host, guest, AgentCallKind::Migrate { call }, budget, Some(m.op))
        };
        match m.state {
            MigrationState::Preparing => {
                if cancelled {
                    return self.abort(guest, m, "cancelled by the operator").await;
                }
                let Some(key) = self.drivers().keys.get(&guest).cloned() else {
                    return self.abort(guest, m, "the manager restarted before the transfer began").await;
                };
                let Some((generation, spec)) = self.lock().guests.get(&guest).map(|g| (g.generation, g.spec.clone()))
                else {
                    return Ok(());
                };
                // The target gets empty disks that the mirror fills (or
                // links the shared ones): not a clone of anything there (a
                // template's overlay arrives as a standalone disk, or stays
                // the overlay it is on the shared pool).
                let spec = drove_model::GuestSpec { clone_of: None, ..spec };
                let prepare = MigrateCall::Prepare { generation, spec: Box::new(spec), key: Some(key) };
                match call(m.target, prepare, PREPARE_BUDGET).await {
                    Ok(CallOutcome::Prepared { listen, port, nbd_port }) => {
                        self.transition(guest, m, MigrationEvent::Prepared, "sending the guest", 15, |m, _| {
                            m.listen = Some(listen);
                            m.port = port;
                            m.nbd_port = nbd_port;
                        })
                        .await;
                        Ok(())
                    }
                    Ok(CallOutcome::Error { message }) => {
                        self.abort(guest, m, &format!("the target could not prepare: {message}")).await
                    }
                    Ok(other) => self.abort(guest, m, &format!("the target answered {other:?}")).await,
                    Err(e) => self.abort(guest, m, &format!("the target did not answer: {}", e.message)).await,
                }
            }
            MigrationState::Sending => {
                let key = self.drivers().keys.get(&guest).cloned();
                let (true, Some(key), Some(target)) = (fresh && !cancelled, key, m.listen) else {
                    return self.reconcile_send(guest, m).await;
                };
                let storage = self.lock().guests.get(&guest).map(|g| g.spec.storage).unwrap_or_default();
                let outgoing = Outgoing {
                    target,
                    port: m.port,
                    nbd_port: m.nbd_port,
                    disks: DiskTransfer::for_storage(storage),
                    key: Some(key),
                    downtime_limit_ms: m.downtime_limit_ms,
                    max_bandwidth: m.max_bandwidth,
                };
                // A send takes as long as the disks and RAM need: no budget
                // but the operation's own safety net.
                let budget = Duration::from_secs(6 * 3600);
                match call(m.source, MigrateCall::Send { outgoing }, budget).await {
                    Ok(CallOutcome::Sent { stats }) => {
                        self.transition(
                            guest,
                            m,
                            MigrationEvent::Sent,
                            "waiting for the target to run the guest",
                            90,
                            |m, _| {
                                m.stats = Some(stats);
                            },
                        )
                        .await;
                        Ok(())
                    }
                    Ok(other) => {
                        tracing::warn!(%guest, answer = ?other, "the send failed; reconciling");
                        if let CallOutcome::Error { message } = &other {
                            self.drivers().send_errors.insert(guest, message.clone());
                        }
                        self.reconcile_send(guest, m).await
                    }
                    Err(e) => {
                        tracing::warn!(%guest, error = %e.message, "no answer to the send; reconciling");
                        self.reconcile_send(guest, m).await
                    }
                }
            }
            MigrationState::Finishing => {
                let await_console = m.stats.is_some_and(|s| s.console_last_us.is_some());
                match call(m.target, MigrateCall::Finish { await_console }, FINISH_BUDGET).await {
                    Ok(CallOutcome::Finished { done }) => {
                        self.commit(guest, m, Some(done)).await;
                        Ok(())
                    }
                    Ok(other) => {
                        tracing::warn!(%guest, answer = ?other, "the target did not finish; asking it");
                        match self.state_on(m.target, guest).await? {
                            Some(ObservedState::Running) => {
                                self.commit(guest, m, None).await;
                                Ok(())
                            }
                            _ => self.abort(guest, m, &format!("the target did not take over: {other:?}")).await,
                        }
                    }
                    Err(_) => Err(()),
                }
            }
            MigrationState::Cleaning => {
                let nics = self.lock().guests.get(&guest).map_or(0, |g| g.spec.nics.len() as u32);
                match call(m.source, MigrateCall::Discard { nics }, QUICK_BUDGET).await {
                    Ok(CallOutcome::Done) => {
                        self.transition(guest, m, MigrationEvent::Cleaned, "done", 100, |_, _| {}).await;
                        Ok(())
                    }
                    other => {
                        tracing::warn!(%guest, answer = ?other, "cannot remove the source's copy yet; will retry");
                        Err(())
                    }
                }
            }
            MigrationState::RollingBack => {
                let nics = self.lock().guests.get(&guest).map_or(0, |g| g.spec.nics.len() as u32);
                // The target's copy first: only then may the source's run.
                match call(m.target, MigrateCall::Discard { nics }, QUICK_BUDGET).await {
                    Ok(CallOutcome::Done) => {}
                    Ok(other) => {
                        tracing::warn!(%guest, answer = ?other, "cannot discard the target's copy yet");
                        return Err(());
                    }
                    Err(e) if e.status == 503 => {
                        // A down target runs nothing of it; its agent finds
                        // the leftover as an orphan.
                        tracing::warn!(%guest, "the target is down; its copy is left for its agent to report");
                    }
                    Err(_) => return Err(()),
                }
                match self.state_on(m.source, guest).await? {
                    Some(ObservedState::Running) => {}
                    Some(ObservedState::Paused) => {
                        match call(m.source, MigrateCall::Cancel, QUICK_BUDGET).await {
                            Ok(CallOutcome::Done) => {}
                            // Completed: the target's copy is gone, so this
                            // one may run again.
                            Ok(CallOutcome::MigrationCompleted) => {
                                match call(m.source, MigrateCall::Resume, QUICK_BUDGET).await {
                                    Ok(CallOutcome::Done) => {}
                                    _ => return Err(()),
                                }
                            }
                            _ => return Err(()),
                        }
                    }
                    // Not running there (stopped or gone): the usual
                    // reconciliation restarts it per its restart policy.
                    _ => {}
                }
                let error = m.error.clone().unwrap_or_else(|| "rolled back".into());
                self.transition(guest, m, MigrationEvent::RolledBack, &format!("rolled back: {error}"), 100, |_, _| {})
                    .await;
                Ok(())
            }
        }
    }

    /// The send ended without a clear answer: find out where the guest is.
    async fn reconcile_send(&self, guest: GuestId, m: &Migration) -> Result<(), ()> {
        if self.state_on(m.target, guest).await? == Some(ObservedState::Running) {
            return self.sent_after_all(guest, m).await;
        }
        let cancel = self
            .relay_on(m.source, guest, AgentCallKind::Migrate { call: MigrateCall::Cancel }, QUICK_BUDGET, None)
            .await;
        match cancel {
            Ok(CallOutcome::Done) => {
                let why = if self.drivers().cancelled.contains(&m.op) {
                    "cancelled by the operator".to_owned()
                } else {
                    let error = self.drivers().send_errors.get(&guest).cloned();
                    error.map_or_else(|| "the transfer failed".into(), |e| format!("migration: {e}"))
                };
                self.abort(guest, m, &why).await
            }
            Ok(CallOutcome::MigrationCompleted) => {
                // The send completed: the target takes over in a moment, or
                // it failed to and the rollback resumes the source.
                tokio::time::sleep(Duration::from_millis(500)).await;
                match self.state_on(m.target, guest).await? {
                    Some(ObservedState::Running) => self.sent_after_all(guest, m).await,
                    _ => self.abort(guest, m, "the transfer completed but the target does not run the guest").await,
                }
            }
            // No clear answer (the source is down, or its agent restarted
            // just now): ask again.
            _ => Err(()),
        }
    }

    async fn sent_after_all(&self, guest: GuestId, m: &Migration) -> Result<(), ()> {
        self.transition(guest, m, MigrationEvent::Sent, "the target runs the guest", 90, |_, _| {}).await;
        Ok(())
    }

    /// The guest's state on `host` (`None`: absent there); `Err` without an
    /// answer.
    async fn state_on(&self, host: HostId, guest: GuestId) -> Result<Option<ObservedState>, ()> {
        match self.relay_on(host, guest, AgentCallKind::Migrate { call: MigrateCall::Status }, QUICK_BUDGET, None).await
        {
            Ok(CallOutcome::GuestState { state }) => Ok(state),
            _ => Err(()),
        }
    }

    /// Before the commit: roll back, recording why.
    async fn abort(&self, guest: GuestId, m: &Migration, why: &str) -> Result<(), ()> {
        tracing::warn!(%guest, reason = why, "migration rolls back");
        let why = why.to_owned();
        self.transition(guest, m, MigrationEvent::Abort, "rolling back", 50, |m, _| m.error = Some(why)).await;
        Ok(())
    }

    /// The target runs the guest: it is the target's now.
    async fn commit(&self, guest: GuestId, m: &Migration, done: Option<IncomingDone>) {
        // Recorded with the `sent` step; absent when the send's answer was
        // lost and the target was found running instead.
        let stats = m.stats;
        let (from, to) = {
            let inv = self.lock();
            let name = |h: HostId| inv.hosts.get(&h).map(|e| e.info.name.clone()).unwrap_or_else(|| h.to_string());
            (name(m.source), name(m.target))
        };
        let ms = |us: u64| us as f64 / 1000.0;
        let between = |from: Option<u64>, to: Option<u64>| Some(ms(to?.saturating_sub(from?)));
        let downtime_ms = between(stats.and_then(|s| s.stopped_at_us), done.and_then(|d| d.resumed_at_us));
        let console_pause_gap_ms =
            between(stats.and_then(|s| s.console_last_us), done.and_then(|d| d.console_first_us));
        let console_copy_gap_ms = stats.and_then(|s| s.console_copy_gap_us).map(ms);
        let console_gap_ms = console_pause_gap_ms.map(|pause| console_copy_gap_ms.map_or(pause, |c| c.max(pause)));
        let result = MigrationResult {
            from: from.clone(),
            to: to.clone(),
            downtime_ms,
            qemu_downtime_ms: stats.map_or(0, |s| s.qemu_downtime_ms),
            console_gap_ms,
            console_pause_gap_ms,
            console_interval_ms: console_gap_ms.and(stats.and_then(|s| s.console_interval_us)).map(ms),
            total_ms: stats.map_or(0, |s| s.total_ms),
            transferred: stats.map_or(0, |s| s.transferred),
            finished_at: now_rfc3339(),
        };
        tracing::info!(%guest, %from, %to, ?downtime_ms, ?console_gap_ms, "migration committed");
        let step = format!("running on {to}; removing the copy on {from}");
        self.transition(guest, m, MigrationEvent::Finished, &step, 95, move |_, g| {
            g.last_migration = Some(result);
            g.last_error = None;
            // Mirrored disks arrived whole: it depends on no template any
            // more. Disks on the shared pool stayed where they were: an
            // overlay there still stands on its template's file.
            let overlay_on_pool = g.spec.storage == drove_model::guest::Storage::Shared
                && g.spec.clone_of.as_ref().is_some_and(|c| c.mode == drove_model::CloneMode::Overlay);
            if !overlay_on_pool {
                g.spec.clone_of = None;
            }
        })
        .await;
    }

    /// Applies `event` to the guest's migration (and `change` to it), with
    /// the operation's step and progress, durably; a migration that ends
    /// is removed from the guest and its operation finished.
    async fn transition(
        &self,
        guest: GuestId,
        m: &Migration,
        event: MigrationEvent,
        step: &str,
        progress: u8,
        change: impl FnOnce(&mut Migration, &mut drove_model::Guest),
    ) {
        let pending = {
            let mut inv = self.lock();
            let Some(mut g) = inv.guests.get(&guest).cloned() else { return };
            let Some(mut current) = g.migration.clone().filter(|c| c.op == m.op && c.state == m.state) else {
                return; // moved on meanwhile
            };
            let next = match current.state.apply(event) {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(%guest, error = %e, "ignoring a migration transition");
                    return;
                }
            };
            change(&mut current, &mut g);
            inv.unindex_guest(&g);
            if event == MigrationEvent::Finished {
                // The commit: from here on the guest is the target's.
                g.host = current.target;
            }
            let mut writes = Vec::new();
            if let Some(mut op) = inv.ops.get(&current.op).cloned() {
                op.step = step.to_owned();
                op.progress = progress;
                if next.is_none() {
                    let ok = event == MigrationEvent::Cleaned;
                    let ev = if ok { OperationEvent::Succeed } else { OperationEvent::Fail { undo: false } };
                    op.state = op.state.apply(ev).unwrap_or(OperationState::Failed);
                    if !ok {
                        op.error = current.error.clone();
                    }
                    op.finished_at = Some(now_rfc3339());
                    inv.active_ops.remove(&guest);
                }
                writes.push(put(op_key(op.id), &op));
                inv.ops.insert(op.id, op);
            }
            g.migration = next.map(|state| Migration { state, ..current });
            inv.index_guest(&g);
            inv.guests.insert(guest, g.clone());
            inv.poke(g.host);
            writes.insert(0, put(guest_key(guest), &g));
            self.persister().enqueue(writes)
        };
        self.notify_ops();
        if let Err(e) = pending.durable().await {
            // A poisoned persister: the next manager resumes from the store.
            tracing::error!(%guest, error = %e, "recording a migration step failed");
        }
    }

    /// A progress report of a send in flight: shown on the operation (not
    /// persisted; the next report replaces it).
    pub(crate) fn report_migration_progress(&self, op: OperationId, p: &MigrationProgress) {
        {
            let mut inv = self.lock();
            let Some(o) = inv.ops.get_mut(&op) else { return };
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            o.step = match p.phase {
                TransferPhase::Disks => {
                    format!("mirroring disks: {:.0} MiB sent, {:.0} MiB to go", mib(p.transferred), mib(p.remaining))
                }
                TransferPhase::Memory => format!(
                    "copying memory: {:.0} MiB sent, {:.0} MiB to go, dirtying {:.1} MiB/s, expected pause {} ms",
                    mib(p.transferred),
                    mib(p.remaining),
                    mib(p.dirty_rate),
                    p.expected_downtime_ms
                ),
                TransferPhase::Switchover => "switching over (guest paused)".to_owned(),
                TransferPhase::Done => "sent; waiting for the target".to_owned(),
            };
            let total = p.transferred + p.remaining;
            let share = (p.transferred * 70).checked_div(total).unwrap_or(0);
            o.progress = 15 + share.min(70) as u8;
        }
        self.notify_ops();
    }
}
