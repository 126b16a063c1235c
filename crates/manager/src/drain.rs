//! Draining a host: maintenance on (no new guests), then every guest
//! live-migrated away, a few at a time, each to the host placement picks
//! at that moment. A migration in flight holds its room on its target, so
//! successive picks spread the guests by free capacity instead of piling
//! them onto one host.
//!
//! The drain is an operation on the host (kind `drain`, its target the
//! host's id). It ends when no guest is left on the host that could move;
//! guests that cannot (not running: their disks stay on the host; no host
//! has room; a failed migration) are named with the reason and fail the
//! drain clearly. It is idempotent: a manager restart resumes it from
//! whatever guests the host still has.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use drove_api::MigrateRequest;
use drove_model::operation::OperationEvent;
use drove_model::{GuestId, GuestState, HostId, Operation, OperationId, OperationKind, OperationState};

use crate::core::{ApiError, Ctx, Manager};
use crate::inventory::{op_key, put};
use crate::now_rfc3339;

/// Migrations at a time, unless asked otherwise.
pub const DEFAULT_PARALLEL: u32 = 2;
const TICK: Duration = Duration::from_millis(200);

impl Manager {
    /// Starts draining host `key` (or hands back the drain under way).
    pub async fn drain_host(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        parallel: Option<u32>,
    ) -> Result<Operation, ApiError> {
        let parallel = parallel.unwrap_or(DEFAULT_PARALLEL);
        if !(1..=64).contains(&parallel) {
            return Err(ApiError::invalid("parallel", format!("parallel must be 1..=64, got {parallel}")));
        }
        let host = self.lock().find_host(key).map(|h| h.info.id).ok_or_else(|| ApiError::not_found("host", key))?;
        if let Some(op) = self.drain_op(host) {
            return Ok(op);
        }
        self.set_maintenance(ctx, key, true).await?;
        let (op, pending) = {
            let mut inv = self.lock();
            let h = inv.hosts.get(&host).ok_or_else(|| ApiError::not_found("host", key))?;
            let n = inv.by_host.get(&host).map_or(0, |s| s.len());
            let op = Operation {
                id: OperationId::new_v4(),
                kind: OperationKind::DrainHost,
                target: *host.as_uuid(),
                target_name: h.info.name.clone(),
                state: OperationState::Running,
                step: format!("draining: {n} guests to move, {parallel} at a time"),
                progress: 0,
                error: None,
                principal: ctx.principal.name.clone(),
                created_at: now_rfc3339(),
                finished_at: None,
            };
            inv.ops.insert(op.id, op.clone());
            let audit = Self::audit_op(&mut inv, ctx, Some(format!("host/{}", op.target_name)), "ok", 202);
            (op.clone(), self.persister().enqueue(vec![put(op_key(op.id), &op), audit]))
        };
        self.notify_ops();
        pending.durable().await?;
        self.spawn_drain(host, op.id, ctx.clone(), parallel);
        Ok(op)
    }

    /// The drain of `host` in progress, if any.
    fn drain_op(&self, host: HostId) -> Option<Operation> {
        let inv = self.lock();
        inv.ops
            .values()
            .find(|o| o.kind == OperationKind::DrainHost && o.target == *host.as_uuid() && !o.state.is_final())
            .cloned()
    }

    /// Restarts the driver of every drain without one (after a restart).
    pub fn resume_drains(self: &Arc<Self>) {
        let orphans: Vec<(HostId, OperationId, String)> = {
            let inv = self.lock();
            inv.ops
                .values()
                .filter(|o| o.kind == OperationKind::DrainHost && !o.state.is_final())
                .map(|o| (HostId::from_uuid(o.target), o.id, o.principal.clone()))
                .collect()
        };
        for (host, op, principal) in orphans {
            if self.migration_drivers.lock().unwrap_or_else(|p| p.into_inner()).draining.insert(op) {
                tracing::info!(%host, "resuming a host drain");
                let ctx = Ctx {
                    principal: crate::auth::Principal { name: principal, role: crate::auth::Role::Admin },
                    action: format!("drain host {host} (resumed)"),
                };
                self.spawn_drain(host, op, ctx, DEFAULT_PARALLEL);
            }
        }
    }

    fn spawn_drain(self: &Arc<Self>, host: HostId, op: OperationId, ctx: Ctx, parallel: u32) {
        self.migration_drivers.lock().unwrap_or_else(|p| p.into_inner()).draining.insert(op);
        let me = self.clone();
        self.spawn_background(async move {
            me.drain(host, op, &ctx, parallel).await;
            me.migration_drivers.lock().unwrap_or_else(|p| p.into_inner()).draining.remove(&op);
        });
    }

    async fn drain(self: &Arc<Self>, host: HostId, op: OperationId, ctx: &Ctx, parallel: u32) {
        // Migrations this drain started, by guest.
        let mut running: HashMap<GuestId, OperationId> = HashMap::new();
        let mut moved: BTreeMap<String, u32> = BTreeMap::new();
        let mut stuck: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let (left, in_maintenance) = {
                let inv = self.lock();
                let Some(h) = inv.hosts.get(&host) else { return };
                let guests: Vec<(GuestId, String, GuestState, bool)> = inv
                    .by_host
                    .get(&host)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| inv.guests.get(id))
                    .map(|g| (g.id, g.spec.name.clone(), g.state, inv.active_ops.contains_key(&g.id)))
                    .collect();
                (guests, h.info.state == drove_model::HostState::Maintenance)
            };
            if !in_maintenance {
                self.end_drain(op, Err("stopped: the host left maintenance".into()));
                return;
            }
            // Migrations that ended.
            let ended: Vec<(GuestId, Operation)> = {
                let inv = self.lock();
                running
                    .iter()
                    .filter_map(|(g, o)| inv.ops.get(o).filter(|o| o.state.is_final()).map(|o| (*g, o.clone())))
                    .collect()
            };
            for (guest, o) in ended {
                running.remove(&guest);
                let (name, now_on) = {
                    let inv = self.lock();
                    let g = inv.guests.get(&guest);
                    let name = g.map_or_else(|| guest.to_string(), |g| g.spec.name.clone());
                    let on = g.and_then(|g| inv.hosts.get(&g.host)).map(|h| h.info.name.clone()).unwrap_or_default();
                    (name, on)
                };
                if o.state == OperationState::Succeeded {
                    *moved.entry(now_on).or_default() += 1;
                } else {
                    stuck.insert(name, format!("migration failed: {}", o.error.unwrap_or_default()));
                }
            }
            for (id, name, state, busy) in &left {
                if stuck.contains_key(name) || running.contains_key(id) {
                    continue;
                }
                if *state != GuestState::Running {
                    stuck.insert(
                        name.clone(),
                        format!(
                            "{state}: only running guests move live (its disks are on this host); start or delete it"
                        ),
                    );
                    continue;
                }
                if *busy || running.len() >= parallel as usize {
                    continue;
                }
                match self.migrate_guest(ctx, &id.to_string(), MigrateRequest::default()).await {
                    Ok(acc) => {
                        running.insert(*id, acc.operation.id);
                    }
                    Err(e) => {
                        stuck.insert(name.clone(), e.message);
                    }
                }
            }
            let total = moved.values().sum::<u32>() as usize + left.len();
            let done = moved.values().sum::<u32>() as usize;
            let spread = moved.iter().map(|(h, n)| format!("{h}: {n}")).collect::<Vec<_>>().join(", ");
            let step = format!(
                "moved {done} of {total} ({}), {} in flight, {} cannot move",
                if spread.is_empty() { "none yet".into() } else { spread.clone() },
                running.len(),
                stuck.len()
            );
            self.drain_progress(op, &step, (done * 100 / total.max(1)) as u8);
            if running.is_empty() && left.iter().all(|(_, name, ..)| stuck.contains_key(name)) {
                let result = if stuck.is_empty() {
                    Ok(format!("drained: moved {done} guests ({})", if spread.is_empty() { "none" } else { &spread }))
                } else {
                    let why: Vec<String> = stuck.iter().map(|(g, r)| format!("{g} ({r})")).collect();
                    Err(format!("moved {done}; {} cannot move: {}", stuck.len(), why.join("; ")))
                };
                self.end_drain(op, result);
                return;
            }
            tokio::time::sleep(TICK).await;
        }
    }

    fn drain_progress(&self, op: OperationId, step: &str, progress: u8) {
        let changed = {
            let mut inv = self.lock();
            match inv.ops.get_mut(&op) {
                Some(o) if o.step != step => {
                    o.step = step.to_owned();
                    o.progress = progress;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.notify_ops();
        }
    }

    fn end_drain(&self, op: OperationId, result: Result<String, String>) {
        let pending = {
            let mut inv = self.lock();
            let Some(o) = inv.ops.get_mut(&op) else { return };
            let event = if result.is_ok() { OperationEvent::Succeed } else { OperationEvent::Fail { undo: false } };
            o.state = o.state.apply(event).unwrap_or(OperationState::Failed);
            match result {
                Ok(step) => {
                    o.step = step;
                    o.progress = 100;
                }
                Err(e) => {
                    o.step = "failed".into();
                    o.error = Some(e);
                }
            }
            o.finished_at = Some(now_rfc3339());
            let o = o.clone();
            self.persister().enqueue(vec![put(op_key(op), &o)])
        };
        self.notify_ops();
        tokio::spawn(async move {
            if let Err(e) = pending.durable().await {
                tracing::error!(error = %e, "recording the end of a drain failed");
            }
        });
    }
}
