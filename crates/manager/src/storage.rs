//! Storage moves: all of a guest's disks to another pool (its host's local
//! one, or the shared one every host sees), live while it runs — vSphere's
//! "Storage vMotion". The host does the copy and the switch
//! ([`drove_hypervisor::Hypervisor::move_storage`]); the manager checks the
//! request, keeps the operation durable, and records the new pool in the
//! guest's spec once the host says it is done:
//!
//! ```text
//!  request ──► checks (pool, state, snapshots, templates, migrations)
//!          ──► the operation, running, and the audit record: one store
//!              transaction
//!          ──► relay `move_storage` to the guest's host (a task of this
//!              manager)
//!          ──► storage_moved: the spec's new pool (a new generation) and the
//!                             move's figures, the operation succeeds: one
//!                             transaction
//!              error:         the operation fails; the spec keeps its pool
//!                             (the host left the guest on its old files)
//!              no answer (timeout, host down, manager restarted):
//!                             ask again — the host's move is idempotent, a
//!                             guest already on the pool is answered at once
//! ```
//!
//! So the spec never names a pool the host has not switched to, and a move
//! the host finished is recorded even when its answer was lost. After a
//! manager restart, [`Manager::resume_storage_moves`] (called by the
//! monitor) picks up every move nobody drives.

use std::sync::Arc;
use std::time::Duration;

use drove_api::{AgentCallKind, CallOutcome, MoveStorageRequest, OperationAccepted};
use drove_model::guest::{Storage, StorageMoved};
use drove_model::operation::OperationEvent;
use drove_model::{GuestId, GuestState, OperationId, OperationKind, OperationState};

use crate::core::{ApiError, Ctx, Manager};
use crate::inventory::{guest_key, op_key, put};
use crate::now_rfc3339;

/// How long a driver waits before asking a host again.
const RETRY: Duration = Duration::from_secs(1);

impl Manager {
    /// Move every disk of guest `key` to pool `req.to`.
    pub async fn move_storage(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        req: MoveStorageRequest,
    ) -> Result<OperationAccepted, ApiError> {
        let to = req.to;
        let (accepted, pending) = {
            let mut inv = self.lock();
            let mut g = inv.find_guest(key).cloned().ok_or_else(|| ApiError::not_found("guest", key))?;
            let name = &g.spec.name.clone();
            if g.migration.is_some() {
                return Err(ApiError::conflict(format!(
                    "guest {name} is being migrated; move its disks before or after the migration"
                )));
            }
            Self::ensure_idle(&inv, &g)?;
            if g.spec.storage == to {
                return Err(ApiError {
                    field: Some("to".into()),
                    ..ApiError::conflict(format!("guest {name}'s disks are on the {to} pool already"))
                });
            }
            if !matches!(g.state, GuestState::Running | GuestState::Stopped | GuestState::Crashed) {
                return Err(ApiError::conflict(format!(
                    "guest {name} is {}; its disks can move while it runs or is stopped",
                    g.state
                )));
            }
            if let Some(why) = g.spec.storage_move_refusal() {
                return Err(ApiError::conflict(format!("guest {name}'s disks cannot move: {why}")));
            }
            if g.template {
                return Err(ApiError::conflict(format!(
                    "guest {name} is a template: clones may be thin overlays on its disk files, which must stay \
                     where they are"
                )));
            }
            if !g.snapshots.is_empty() {
                let names: Vec<&str> = g.snapshots.iter().map(|s| s.name.as_str()).collect();
                return Err(ApiError::conflict(format!(
                    "guest {name} has snapshots ({}), which live inside its disk files and a move would drop; \
                     delete them first",
                    names.join(", ")
                )));
            }
            let host = inv.hosts.get(&g.host).ok_or_else(|| ApiError::not_found("host", &g.host.to_string()))?;
            if to == Storage::Shared && !host.has_shared_pool() {
                return Err(ApiError {
                    field: Some("to".into()),
                    ..ApiError::conflict(format!(
                        "host {} of guest {name} reports no shared pool (drove agent --shared-dir)",
                        host.info.name
                    ))
                });
            }
            let step = format!("moving its disks from the {} pool to the {to} pool", g.spec.storage);
            g.moving_storage = Some(to);
            self.begin_driven_op(&mut inv, ctx, &g, OperationKind::MoveStorage, &step)
        };
        let accepted = self.durable_driven_op(accepted, pending).await?;
        self.spawn_move_driver(accepted.guest, to);
        Ok(accepted)
    }

    /// Starts a driver for every storage move nobody drives (after a
    /// manager restart): it asks the host again, which answers at once if
    /// the move was done.
    pub fn resume_storage_moves(self: &Arc<Self>) {
        let (orphaned, aimless): (Vec<(GuestId, OperationId, Option<Storage>)>, _) = {
            let inv = self.lock();
            inv.active_ops
                .iter()
                .filter(|(_, op)| {
                    inv.ops.get(op).is_some_and(|o| o.kind == OperationKind::MoveStorage && !o.state.is_final())
                })
                .map(|(g, op)| (*g, *op, inv.guests.get(g).and_then(|g| g.moving_storage)))
                .filter(|(g, _, _)| self.claim_driver(*g))
                .partition(|(_, _, to)| to.is_some())
        };
        // A record without its target pool (changed by hand): nothing to
        // finish, and it must not stay running forever.
        for (guest, op, _) in aimless {
            self.settle_move(guest, op, Err("the guest's record names no pool to move to".into()));
            self.release_driver(guest);
        }
        for (guest, _, to) in orphaned {
            let Some(to) = to else { continue };
            tracing::info!(%guest, %to, "resuming a storage move");
            self.spawn_move_driver(guest, to);
        }
    }

    /// Drives the storage move of a claimed `guest` until it is final.
    fn spawn_move_driver(self: &Arc<Self>, guest: GuestId, to: Storage) {
        let me = self.clone();
        self.spawn_background(async move {
            while let Some(op) = me.pending_move(guest) {
                match me.relay(&guest.to_string(), AgentCallKind::MoveStorage { to }).await {
                    Ok((_, CallOutcome::StorageMoved { moved })) => {
                        me.settle_move(guest, op, Ok(moved));
                        break;
                    }
                    Ok((_, CallOutcome::Error { message })) => {
                        me.settle_move(guest, op, Err(message));
                        break;
                    }
                    Ok((_, other)) => {
                        tracing::warn!(%guest, ?other, "unexpected answer to a storage move; asking again");
                    }
                    Err(e) => {
                        tracing::warn!(%guest, error = %e, "no answer to a storage move; asking again");
                    }
                }
                tokio::time::sleep(RETRY).await;
            }
            me.release_driver(guest);
        });
    }

    /// The guest's storage move in progress, if there still is one (a
    /// guest delete supersedes it).
    fn pending_move(&self, guest: GuestId) -> Option<OperationId> {
        let inv = self.lock();
        let op = inv.active_ops.get(&guest).and_then(|o| inv.ops.get(o))?;
        (op.kind == OperationKind::MoveStorage && !op.state.is_final() && inv.guests.contains_key(&guest))
            .then_some(op.id)
    }

    /// Ends move `op` of `guest`: on success the new pool goes into its
    /// spec (a new generation) with the move's figures, in the same
    /// transaction as the operation's end.
    fn settle_move(&self, guest: GuestId, op: OperationId, result: Result<StorageMoved, String>) {
        let pending = {
            let mut inv = self.lock();
            if inv.active_ops.get(&guest) != Some(&op) {
                return;
            }
            let Some(mut g) = inv.guests.get(&guest).cloned() else { return };
            let Some(mut o) = inv.ops.get(&op).cloned() else { return };
            let event = match &result {
                Ok(_) => OperationEvent::Succeed,
                Err(_) => OperationEvent::Fail { undo: false },
            };
            o.state = o.state.apply(event).unwrap_or(OperationState::Failed);
            g.moving_storage = None;
            match result {
                Ok(moved) => {
                    inv.unindex_guest(&g);
                    g.spec.storage = moved.to;
                    g.generation += 1;
                    inv.index_guest(&g);
                    o.step = summary(&moved);
                    o.progress = 100;
                    g.last_storage_move = Some(moved);
                }
                Err(error) => {
                    tracing::warn!(guest = %g.spec.name, %error, "storage move failed");
                    o.step = "failed; the disks stay where they were".into();
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
        // and the next manager resumes the move, which the host answers at
        // once.
        tokio::spawn(async move {
            if let Err(e) = pending.durable().await {
                tracing::error!(error = %e, "recording the end of a storage move failed");
            }
        });
    }
}

/// One line for people: "moved 3 disks ... local → shared live, 1.0G in 4.2 s".
pub fn summary(m: &StorageMoved) -> String {
    let how = if m.live { "live, the guest kept running" } else { "offline" };
    if m.from == m.to {
        return format!("its disks were on the {} pool already", m.to);
    }
    format!(
        "moved its disks from the {} pool to the {} pool ({how}): {} copied in {:.1} s",
        m.from,
        m.to,
        drove_model::ByteSize(m.bytes),
        m.duration_ms as f64 / 1000.0
    )
}
