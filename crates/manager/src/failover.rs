//! High availability: the guests of a failed host restart on the survivors.
//!
//! A host's lease is renewed by each heartbeat. Once it has run out *and*
//! the fencing margin has passed, the host's agent — if it is alive but cut
//! off — has stopped its guests (see the agent's fencing), so they may
//! start elsewhere without ever running twice:
//!
//! ```text
//!  last heartbeat        lease runs out          + fencing margin
//!  ──────┬──────────────────────┬───────────────────────┬────────────►
//!        │                      │ host Down;            │ failover: each
//!        │                      │ a cut-off agent       │ shared-storage guest
//!        │                      │ kills its guests      │ reassigned to a survivor
//! ```
//!
//! The failover is a reconciler, not a script: each monitor pass takes the
//! guests still assigned to a failed host and reassigns the next few
//! (highest priority first, spread by [`drove_placement::plan_restarts`]),
//! as long as survivors have fewer than `failover_per_host` (and the
//! cluster fewer than `failover_total`) failover boots in flight — a boot
//! lasts until the guest's OS is up (its guest agent answers), so the
//! throttle spreads a boot storm, not just QEMU launches. A
//! reassignment is one durable write of the guest record — its new host,
//! a new generation and a [`FailoverRecord`] — so a manager that dies
//! mid-failover simply carries on after its restart, and a guest is never
//! assigned to two hosts. The failed host, when it is heard from again, is
//! told to forget its stale copies (their disks stay on the pool).
//!
//! Only guests on shared storage move: a guest whose disks are on the
//! failed host waits for it (its state says so).

use std::collections::HashMap;

use drove_api::{FailoverPlanView, PlannedRestart, StrandedGuest};
use drove_model::guest::{FailoverRecord, Storage};
use drove_model::{CloneMode, Guest, GuestEvent, GuestId, GuestState, HostId, PowerIntent};
use drove_placement::{Evacuee, HostCapacity, Request, plan_restarts};

use crate::core::{ApiError, Manager, Writes, apply, finish_op};
use crate::inventory::{Inventory, guest_key, put};

/// How long a failover restart counts against the boot throttle at most.
const BOOT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// Why a guest of a failed host cannot restart elsewhere, if it cannot.
fn immovable(g: &Guest) -> Option<String> {
    if g.spec.storage != Storage::Shared {
        return Some("its disks are on that host: it restarts when the host is back".into());
    }
    if g.template {
        return Some("it is a template (its clones use its disks where they are)".into());
    }
    if g.spec.clone_of.as_ref().is_some_and(|c| c.mode == CloneMode::Overlay || g.state == GuestState::Creating) {
        return Some("it is a clone still bound to its source's disks there".into());
    }
    if g.migration.is_some() {
        return Some("its migration decides where it runs".into());
    }
    if g.moving_storage.is_some() {
        // After the host's switch its files are on the host, whatever the
        // spec says: only the host can tell.
        return Some("its disks were moving between pools: it restarts when the host is back".into());
    }
    match g.state {
        GuestState::Creating | GuestState::Deleting | GuestState::Deleted => {
            Some(format!("it is {}: its operation finishes on that host", g.state))
        }
        _ => None,
    }
}

/// Whether it is started on the survivor.
fn restarts(g: &Guest) -> bool {
    g.intent == PowerIntent::Running && g.restart_policy.restarts_after_failure()
}

/// `g` as the planner sees it, known by `key`.
fn evacuee<K>(g: &Guest, key: K) -> Evacuee<K> {
    Evacuee {
        guest: key,
        request: Request::of(&g.spec),
        priority: g.spec.priority.0,
        group: g.spec.anti_affinity.clone(),
    }
}

impl Manager {
    /// How long `host` has been silent as far as this process knows: since
    /// its last heartbeat, or since this manager started.
    fn silent_for(&self, h: &crate::inventory::HostEntry) -> std::time::Duration {
        h.last_seen.map_or(self.started.elapsed(), |t| t.elapsed())
    }

    /// One pass of the failover reconciler, under the inventory lock.
    pub(crate) fn failover_pass(&self, inv: &mut Inventory, w: &mut Writes) {
        let dead_after = self.config.host_timeout + self.config.fencing_margin;
        let mut failed: Vec<(String, HostId, u64)> = inv
            .hosts
            .values()
            .filter_map(|h| {
                let silent = self.silent_for(h);
                (silent > dead_after).then(|| (h.info.name.clone(), h.info.id, silent.as_millis() as u64))
            })
            .collect();
        if failed.is_empty() {
            return;
        }
        failed.sort();
        let now = crate::now_ms();
        let per_host = self.config.failover_per_host.max(1);
        // Failover boots in flight, per survivor and in all.
        // A restart boots until its OS is up (its guest agent answers), or
        // for BOOT_PATIENCE at most: a guest without an agent never says.
        let mut booting: HashMap<HostId, usize> = HashMap::new();
        for g in inv.guests.values() {
            let boots = matches!(g.state, GuestState::Starting | GuestState::Running)
                && g.last_failover.as_ref().is_some_and(|f| {
                    f.ready_ms.is_none() && now.saturating_sub(f.at_ms) < BOOT_PATIENCE.as_millis() as u64
                });
            if boots {
                *booting.entry(g.host).or_default() += 1;
            }
        }
        let mut total: usize = booting.values().sum();
        for (name, host, silent_ms) in failed {
            // This failover's restarts all came after the host's last
            // heartbeat (or this manager's start); earlier ones did not.
            let silent_since = now.saturating_sub(silent_ms);
            let mine: Vec<GuestId> = inv.by_host.get(&host).map(|s| s.iter().copied().collect()).unwrap_or_default();
            // Guests that restart first: ones moved stopped must not take
            // the room of ones that run.
            let mut movable = Vec::new();
            let mut stopped = Vec::new();
            for id in mine {
                let Some(g) = inv.guests.get(&id) else { continue };
                match immovable(g) {
                    None if restarts(g) => movable.push(evacuee(g, g.id)),
                    None => stopped.push(evacuee(g, g.id)),
                    Some(why) => {
                        // Said once; a running guest is not running now.
                        let msg = format!("host {name} failed; {why}");
                        if g.last_error.as_deref() != Some(msg.as_str()) {
                            let mut g = g.clone();
                            if matches!(g.state, GuestState::Running | GuestState::Starting | GuestState::Stopping)
                                && g.migration.is_none()
                            {
                                apply(&mut g, GuestEvent::Crashed);
                            }
                            g.last_error = Some(msg);
                            w.ops.push(put(guest_key(id), &g));
                            inv.guests.insert(id, g);
                        }
                    }
                }
            }
            let mut waiting = false;
            for (start, evacuees) in [(true, movable), (false, stopped)] {
                // Stopped guests move once every running one has a host.
                if evacuees.is_empty() || (!start && waiting) {
                    continue;
                }
                // Survivors: heard from within the lease, taking guests.
                let survivors: Vec<HostCapacity> = self
                    .capacities(inv)
                    .into_iter()
                    .filter(|c| c.schedulable && c.id != host)
                    .filter(|c| inv.hosts.get(&c.id).is_some_and(|h| self.silent_for(h) < self.config.host_timeout))
                    .collect();
                // What each survivor already got from this host in this failover.
                let mut taken: HashMap<HostId, usize> = HashMap::new();
                for g in inv.guests.values() {
                    if g.last_failover.as_ref().is_some_and(|f| f.from == name && f.at_ms >= silent_since) {
                        *taken.entry(g.host).or_default() += 1;
                    }
                }
                // The failed host's own members do not hold the others back.
                let mut groups = inv.host_groups();
                groups.remove(&host);
                let plan = plan_restarts(&survivors, &evacuees, &taken, &groups, per_host, &self.config.policy);
                for (id, target, _) in plan.restarts {
                    let busy = booting.get(&target).copied().unwrap_or(0);
                    if start && (busy >= per_host || total >= self.config.failover_total.max(1)) {
                        waiting = true;
                        continue; // a later pass, when boots have finished
                    }
                    if self.reassign(inv, id, &name, target, silent_ms, w) && start {
                        *booting.entry(target).or_default() += 1;
                        total += 1;
                    }
                }
                for (id, reason) in plan.unplaced {
                    let msg = format!("host {name} failed; no survivor can hold it: {reason}");
                    if let Some(g) = inv.guests.get_mut(&id)
                        && g.last_error.as_deref() != Some(msg.as_str())
                    {
                        tracing::error!(guest = %g.spec.name, %reason, "cannot restart a guest of a failed host");
                        g.last_error = Some(msg);
                        w.ops.push(put(guest_key(id), &*g));
                    }
                }
            }
        }
    }

    /// Whether the cluster keeps room to restart every guest that would
    /// restart after `inv.ha.tolerate_failures` host failures, with
    /// `extra` (a guest about to be created or started) counted in; the
    /// shortfall if not.
    pub(crate) fn reserve_shortfall(&self, inv: &Inventory, extra: Option<(&Guest, bool)>) -> Option<String> {
        let failures = inv.ha.tolerate_failures as usize;
        if failures == 0 {
            return None;
        }
        let mut hosts: Vec<HostCapacity> = self
            .capacities(inv)
            .into_iter()
            // Hosts that are off cannot take restarts now (a standby host
            // takes minutes to wake).
            .filter(|c| {
                inv.hosts.get(&c.id).is_some_and(|h| {
                    !matches!(
                        h.info.state,
                        drove_model::HostState::Down | drove_model::HostState::Standby | drove_model::HostState::Waking
                    )
                })
            })
            .collect();
        let mut restartable: HashMap<HostId, Vec<Evacuee<String>>> = HashMap::new();
        let named = |g: &Guest| evacuee(g, g.spec.name.clone());
        for g in inv.guests.values() {
            if restarts(g) && immovable(g).is_none() && extra.is_none_or(|(x, _)| x.id != g.id) {
                restartable.entry(g.host).or_default().push(named(g));
            }
        }
        if let Some((g, new)) = extra {
            if new && let Some(h) = hosts.iter_mut().find(|h| h.id == g.host) {
                h.hold(&Request::of(&g.spec));
            }
            // It restarts after a failure if it runs on shared storage.
            if g.spec.storage == Storage::Shared && g.restart_policy.restarts_after_failure() {
                restartable.entry(g.host).or_default().push(named(g));
            }
        }
        drove_placement::check_reserve(&hosts, &restartable, &inv.host_groups(), failures, &self.config.policy).err()
    }

    /// Admission control: `Err` when `g` (created now when `new`, else
    /// started) would eat into the HA reserve and the settings refuse it.
    pub(crate) fn ha_admit(&self, inv: &Inventory, g: &Guest, new: bool) -> Result<(), ApiError> {
        if g.spec.storage != Storage::Shared && !new {
            return Ok(());
        }
        let Some(why) = self.reserve_shortfall(inv, Some((g, new))) else { return Ok(()) };
        let verb = if new { "creating" } else { "starting" };
        let msg = format!(
            "{verb} guest {} would leave too little reserve to tolerate {} host failure(s): {why}",
            g.spec.name, inv.ha.tolerate_failures
        );
        match inv.ha.admission {
            drove_api::Admission::Refuse => Err(ApiError::conflict(msg)),
            drove_api::Admission::Warn => {
                tracing::warn!("{msg} (admitted: admission mode is warn)");
                Ok(())
            }
        }
    }

    /// Moves guest `id` of failed host `from` to `to`: the one write that
    /// decides where it runs.
    fn reassign(
        &self,
        inv: &mut Inventory,
        id: GuestId,
        from: &str,
        to: HostId,
        silent_ms: u64,
        w: &mut Writes,
    ) -> bool {
        let Some(mut g) = inv.guests.get(&id).cloned() else { return false };
        let to_name = inv.hosts.get(&to).map(|h| h.info.name.clone()).unwrap_or_else(|| to.to_string());
        // Whatever it was doing there ended with the host.
        if let Some(op) = inv.active_ops.get(&id).and_then(|o| inv.ops.get(o))
            && !op.kind.is_driven()
        {
            let msg = format!("host {from} failed");
            finish_op(inv, id, drove_model::operation::OperationEvent::Fail { undo: false }, Some(msg), w);
        }
        let start = restarts(&g);
        inv.unindex_guest(&g);
        if matches!(g.state, GuestState::Running | GuestState::Starting | GuestState::Stopping) {
            apply(&mut g, GuestEvent::Crashed);
        }
        if start {
            apply(&mut g, GuestEvent::Start);
        } else if g.state == GuestState::Crashed {
            // Off by its restart policy: stopped where it now lives.
            g.intent = PowerIntent::Stopped;
        }
        g.host = to;
        g.generation += 1;
        g.last_error = Some(if start {
            format!("host {from} failed; restarted on {to_name}")
        } else {
            format!("host {from} failed; moved to {to_name}, stopped")
        });
        g.last_failover = Some(FailoverRecord {
            from: from.to_owned(),
            to: to_name.clone(),
            at_ms: crate::now_ms(),
            detect_ms: silent_ms,
            running_ms: None,
            ready_ms: None,
        });
        tracing::warn!(guest = %g.spec.name, %from, to = %to_name, start, "failover: guest reassigned");
        w.ops.push(put(guest_key(id), &g));
        inv.index_guest(&g);
        inv.guests.insert(id, g);
        inv.poke(to);
        true
    }

    /// What would happen to `host`'s guests if it failed now.
    pub fn failover_plan(&self, host: &str) -> Result<FailoverPlanView, ApiError> {
        let inv = self.lock();
        let entry = inv.find_host(host).ok_or_else(|| ApiError::not_found("host", host))?;
        let (id, name) = (entry.info.id, entry.info.name.clone());
        let mut stranded = Vec::new();
        let mut movable = Vec::new();
        let mine: Vec<&Guest> = inv.by_host.get(&id).into_iter().flatten().filter_map(|g| inv.guests.get(g)).collect();
        for g in &mine {
            match immovable(g) {
                None => movable.push(evacuee(g, g.id)),
                Some(reason) => stranded.push(StrandedGuest { guest: g.spec.name.clone(), reason }),
            }
        }
        let survivors: Vec<HostCapacity> =
            self.capacities(&inv).into_iter().filter(|c| c.schedulable && c.id != id).collect();
        let mut groups = inv.host_groups();
        groups.remove(&id);
        let plan = plan_restarts(
            &survivors,
            &movable,
            &HashMap::new(),
            &groups,
            self.config.failover_per_host,
            &self.config.policy,
        );
        let host_name = |h: HostId| inv.hosts.get(&h).map(|e| e.info.name.clone()).unwrap_or_else(|| h.to_string());
        let restarts = plan
            .restarts
            .iter()
            .filter_map(|(g, to, wave)| {
                let g = inv.guests.get(g)?;
                Some(PlannedRestart {
                    guest: g.spec.name.clone(),
                    to: host_name(*to),
                    wave: *wave,
                    priority: g.spec.priority.0,
                    start: restarts(g),
                })
            })
            .collect();
        for (g, reason) in plan.unplaced {
            if let Some(g) = inv.guests.get(&g) {
                stranded.push(StrandedGuest { guest: g.spec.name.clone(), reason });
            }
        }
        Ok(FailoverPlanView { host: name, restarts, stranded })
    }
}

impl Manager {
    /// The HA settings and whether the reserve holds now.
    pub fn ha_status(&self) -> drove_api::HaStatus {
        let inv = self.lock();
        drove_api::HaStatus { settings: inv.ha, shortfall: self.reserve_shortfall(&inv, None) }
    }

    /// Changes the HA settings. Taking effect for the next create or start:
    /// what runs already is not stopped, but the status says whether the
    /// reserve holds.
    pub async fn set_ha(
        &self,
        ctx: &crate::core::Ctx,
        settings: drove_api::HaSettings,
    ) -> Result<drove_api::HaStatus, ApiError> {
        let (status, pending) = {
            let mut inv = self.lock();
            if settings.tolerate_failures as usize >= inv.hosts.len().max(1) {
                return Err(ApiError::invalid(
                    "tolerate_failures",
                    format!(
                        "cannot tolerate {} host failures with {} hosts",
                        settings.tolerate_failures,
                        inv.hosts.len()
                    ),
                ));
            }
            inv.ha = settings;
            let status = drove_api::HaStatus { settings, shortfall: self.reserve_shortfall(&inv, None) };
            let writes = vec![
                put(crate::inventory::HA_SETTINGS_KEY.to_owned(), &settings),
                Self::audit_op(&mut inv, ctx, Some("settings/ha".into()), "ok", 200),
            ];
            (status, self.persister.enqueue(writes))
        };
        pending.durable().await?;
        Ok(status)
    }
}

/// What `host` reports of guests on shared storage assigned elsewhere (not
/// migrating): each is to be forgotten there, except one that still runs
/// there while its restart elsewhere never came up — that one is assigned
/// back to `host`, where it runs. Returns the guests to forget.
pub(crate) fn reclaim(
    inv: &mut Inventory,
    host: HostId,
    observed: &[drove_api::ObservedGuest],
    w: &mut Writes,
) -> Vec<GuestId> {
    let mut forget = Vec::new();
    for o in observed {
        let Some(g) = inv.guests.get(&o.id) else { continue };
        if g.host == host || g.migration.is_some() || g.spec.storage != Storage::Shared {
            continue;
        }
        let runs_here = o.state == drove_api::ObservedState::Running;
        let up_there = matches!(g.state, GuestState::Running | GuestState::Stopping);
        if !runs_here || up_there {
            forget.push(o.id);
            continue;
        }
        let mut g = g.clone();
        let from = inv.hosts.get(&g.host).map_or_else(|| g.host.to_string(), |h| h.info.name.clone());
        let here = inv.hosts.get(&host).map_or_else(|| host.to_string(), |h| h.info.name.clone());
        let prev = g.host;
        inv.unindex_guest(&g);
        if g.state != GuestState::Starting {
            apply(&mut g, GuestEvent::Start);
        }
        apply(&mut g, GuestEvent::Started);
        g.intent = PowerIntent::Running;
        g.host = host;
        g.generation += 1;
        g.last_error = Some(format!("{here} came back with it running; its restart on {from} never came up"));
        tracing::warn!(guest = %g.spec.name, %here, %from, "a guest thought lost runs on its old host: taken back");
        w.ops.push(put(guest_key(g.id), &g));
        inv.index_guest(&g);
        inv.guests.insert(g.id, g);
        // Its other host learns to forget its copy.
        inv.poke(prev);
    }
    forget
}
