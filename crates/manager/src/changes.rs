//! Hardware and limits changes of a guest, made by its host and recorded
//! durably on both sides without a window where they disagree unknowingly.
//!
//! The host applies a change and records it in its own definition; the
//! manager records it as the guest's new spec (a new generation). Were the
//! manager to record only after the host answered, a crash or a lost answer
//! in between would leave the manager's spec behind the host's, and the
//! next generation it sends would redefine the guest without the change
//! (a hot-added disk gone from the definition). So each change is:
//!
//! ```text
//!  request ──► record the spec it leads to as the guest's pending spec
//!          ──► relay the change to the guest's host
//!          ──► done    → the new spec, generation + 1, pending cleared (one write)
//!              refused → ask the host for its definition (a host can fail
//!                        after the change took): has it → as done; lacks it
//!                        → pending cleared, the refusal returned
//!              not sent (host down) → pending cleared, the error returned
//!              no answer (timeout)  → left pending; the monitor settles it:
//!                  ask the host for its definition:
//!                    has the change    → record it (generation + 1)
//!                    lacks the change  → clear it, say so in last_error
//!                    neither           → leave it, warn
//! ```
//!
//! While a change is pending, no other change or operation starts on the
//! guest ([`Manager::ensure_idle`]), and one task at a time drives it: the
//! request's (which runs on when its caller goes away, so that nobody takes
//! a change still on its way to the host for one it never got), or, once
//! that gave up, the monitor's settler.

use std::sync::Arc;
use std::time::Duration;

use drove_api::{AgentCallKind, CallOutcome, GuestView};
use drove_model::guest::same_hardware;
use drove_model::{GuestId, GuestSpec, HostState, PendingSpec};

use crate::core::{ApiError, Ctx, Manager};
use crate::inventory::{Inventory, guest_key, put};
use crate::now_rfc3339;
use crate::persist::Pending;

/// How long the settler waits before asking a host again about a change it
/// could not settle (the host's definition matched neither spec, or the
/// host did not answer).
const RETRY: Duration = Duration::from_secs(5);

/// Releases a guest's claim (see [`Manager::claim_driver`]) when dropped,
/// however its driver ends.
pub(crate) struct Driving(Arc<Manager>, GuestId);

impl Drop for Driving {
    fn drop(&mut self) {
        self.0.release_driver(self.1);
    }
}

impl Manager {
    /// Records, under the inventory lock, that `g`'s host is about to be
    /// asked for a change (`what`) leading to `spec`, and claims the guest
    /// for the caller; the returned write must be durable before the host
    /// is asked.
    pub(crate) fn record_pending(
        self: &Arc<Self>,
        inv: &mut Inventory,
        g: &drove_model::Guest,
        spec: GuestSpec,
        what: String,
    ) -> (Pending, Driving) {
        let mut g = g.clone();
        g.pending_spec = Some(PendingSpec { spec, what, since: now_rfc3339() });
        inv.guests.insert(g.id, g.clone());
        // Nobody settles it while this request drives it.
        self.claim_driver(g.id);
        (self.persister.enqueue(vec![put(guest_key(g.id), &g)]), Driving(self.clone(), g.id))
    }

    /// Relays the pending change of guest `id` (recorded by
    /// [`Self::record_pending`]) and settles it by the host's answer:
    /// `change` makes the new spec from the current one. Driven to its end
    /// by a task of its own, also when the caller goes away.
    pub(crate) async fn relay_change(
        self: &Arc<Self>,
        ctx: &Ctx,
        key: &str,
        id: GuestId,
        (recorded, driving): (Pending, Driving),
        call: AgentCallKind,
        change: impl FnOnce(&mut GuestSpec) + Send + 'static,
    ) -> Result<GuestView, ApiError> {
        let (me, ctx, key) = (self.clone(), ctx.clone(), key.to_owned());
        let task = self.spawn_background(async move {
            let _driving = driving;
            me.drive_change(&ctx, &key, id, recorded, call, change).await
        });
        task.await.unwrap_or_else(|_| {
            Err(ApiError::unavailable(
                "the manager is stopping; the change stays pending and is settled when it is back",
            ))
        })
    }

    async fn drive_change(
        &self,
        ctx: &Ctx,
        key: &str,
        id: GuestId,
        recorded: Pending,
        call: AgentCallKind,
        change: impl FnOnce(&mut GuestSpec),
    ) -> Result<GuestView, ApiError> {
        if let Err(e) = recorded.durable().await {
            self.forget_pending(id, None).await;
            return Err(e.into());
        }
        match self.relay(&id.to_string(), call).await {
            Ok((_, CallOutcome::Done)) => self.commit_spec(ctx, key, id, change).await,
            // Not taken at its word: a host can fail after the change took
            // (a later step, its own record); its definition says which.
            Ok((_, CallOutcome::Error { message })) => match self.settle_by_definition(ctx, id, None).await {
                Settlement::Made(view) => {
                    tracing::warn!(guest = %id, error = %message, "the host reported an error after making the change");
                    Ok(*view)
                }
                Settlement::NotMade => Err(ApiError::conflict(message)),
                Settlement::Unknown => Err(ApiError::unavailable(format!(
                    "{message}; whether the host made the change is not known yet: it stays pending and is settled \
                     when the host answers"
                ))),
            },
            Ok((_, other)) => Err(ApiError::unavailable(format!(
                "the host answered with {other:?}; the change stays pending and is settled when the host answers"
            ))),
            // Asked and not answered: the host may have made it.
            Err(e) if e.status == 504 => Err(ApiError {
                message: format!("{}; the change stays pending and is settled when the host answers", e.message),
                ..e
            }),
            // Never sent (the host is down, the guest gone).
            Err(e) => {
                self.forget_pending(id, None).await;
                Err(e)
            }
        }
    }

    /// Clears guest `id`'s pending change, which its host did not make:
    /// durably, with `why` as its last error when given, releasing the MACs
    /// and addresses of NICs only the pending spec had.
    async fn forget_pending(&self, id: GuestId, why: Option<String>) {
        let write = {
            let mut inv = self.lock();
            let Some(mut g) = inv.guests.get(&id).cloned() else { return };
            let released: Vec<drove_model::NicSpec> = crate::inventory::pending_nics(&g).cloned().collect();
            if g.pending_spec.take().is_none() {
                return;
            }
            for nic in &released {
                inv.release_nic(nic);
            }
            if why.is_some() {
                g.last_error = why;
            }
            inv.guests.insert(id, g.clone());
            self.persister.enqueue(vec![put(guest_key(id), &g)])
        };
        if let Err(e) = write.durable().await {
            // Still pending in the store: settled again after a restart.
            tracing::error!(guest = %id, error = %e, "could not record that a pending change was not made");
        }
    }

    /// Settles the pending changes nobody drives (their request gave up, or
    /// the manager restarted), on hosts that are up; one task per guest.
    /// Called by the monitor.
    pub fn resume_pending_changes(self: &Arc<Self>) {
        let due: Vec<GuestId> = {
            let inv = self.lock();
            inv.guests
                .values()
                .filter(|g| g.pending_spec.is_some())
                .filter(|g| inv.hosts.get(&g.host).is_some_and(|h| h.info.state == HostState::Up))
                .map(|g| g.id)
                .filter(|id| self.claim_driver(*id))
                .collect()
        };
        for id in due {
            let me = self.clone();
            self.spawn_background(async move {
                let settled = me.settle_pending(id).await;
                if !settled {
                    tokio::time::sleep(RETRY).await;
                }
                me.release_driver(id);
            });
        }
    }

    /// Settles guest `id`'s pending change nobody drives (see
    /// [`Self::settle_by_definition`]); false when it stays pending.
    async fn settle_pending(&self, id: GuestId) -> bool {
        let Some(pending) =
            self.read(|inv| inv.guests.get(&id).and_then(|g| g.pending_spec.clone())).await.ok().flatten()
        else {
            return true;
        };
        let ctx = crate::drs::reconciler_ctx("system", &format!("settle pending change: {}", pending.what));
        let why = format!("{} (asked {}) was not made: its host never got it", pending.what, pending.since);
        !matches!(self.settle_by_definition(&ctx, id, Some(why)).await, Settlement::Unknown)
    }

    /// Asks guest `id`'s host for its definition and settles the pending
    /// change by it: recorded (as `ctx`) if the host has it, cleared (with
    /// `why_not` as the guest's last error) if the host has the spec from
    /// before. Nothing pending counts as not made.
    async fn settle_by_definition(&self, ctx: &Ctx, id: GuestId, why_not: Option<String>) -> Settlement {
        let Some(pending) =
            self.read(|inv| inv.guests.get(&id).and_then(|g| g.pending_spec.clone())).await.ok().flatten()
        else {
            return Settlement::NotMade;
        };
        let on_host = match self.relay(&id.to_string(), AgentCallKind::Definition).await {
            Ok((_, CallOutcome::Definition { spec })) => spec,
            Ok((_, other)) => {
                tracing::warn!(guest = %id, answer = ?other, "cannot read the guest's definition on its host");
                return Settlement::Unknown;
            }
            Err(e) => {
                tracing::warn!(guest = %id, error = %e.message, "cannot ask the guest's host for its definition");
                return Settlement::Unknown;
            }
        };
        let current = self.read(|inv| inv.guests.get(&id).map(|g| g.spec.clone())).await.ok().flatten();
        let Some(current) = current else { return Settlement::NotMade };
        if same_hardware(&pending.spec, &on_host) {
            tracing::info!(guest = %id, change = %pending.what, "the host made a pending change; recording it");
            let made = pending.spec;
            // The hardware as the host has it; anything else stays as now.
            let result = self
                .commit_spec(ctx, &id.to_string(), id, |spec| {
                    spec.vcpus = made.vcpus;
                    spec.memory = made.memory;
                    spec.disks = made.disks;
                    spec.nics = made.nics;
                    spec.limits = made.limits;
                    spec.hot_added = made.hot_added;
                })
                .await;
            match result {
                Ok(view) => Settlement::Made(Box::new(view)),
                Err(e) => {
                    tracing::error!(guest = %id, error = %e.message, "could not record a change its host made");
                    Settlement::Unknown
                }
            }
        } else if same_hardware(&current, &on_host) {
            tracing::info!(guest = %id, change = %pending.what, "the host did not make a pending change; forgetting it");
            self.forget_pending(id, why_not).await;
            Settlement::NotMade
        } else {
            tracing::warn!(
                guest = %id,
                change = %pending.what,
                "the host's definition matches neither the guest's spec nor its pending change; left pending"
            );
            Settlement::Unknown
        }
    }
}

/// What a host's definition says of a pending change.
enum Settlement {
    /// The host has it; recorded, the guest as it is now.
    Made(Box<GuestView>),
    /// The host has the spec from before; the pending change is cleared.
    NotMade,
    /// Not known (the host did not answer, or has something else); it
    /// stays pending.
    Unknown,
}
