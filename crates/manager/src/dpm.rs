//! Power management (DPM): a reconciler that, every `interval`, models the
//! hours ahead (`lookahead`) of the live cluster and asks the placement
//! engine's [`plan_power`] — the code the simulator replays traces with —
//! whether hosts must wake for the load to come, or whether some can be
//! emptied and put into standby. In `manual` mode it only records that
//! (`GET /v1/dpm`, `drove plan dpm`); in `full` mode it acts, as the
//! principal `dpm`, audited, through the configured [`PowerDriver`].
//!
//! A host goes into standby in steps, each safe to stop after:
//!
//! ```text
//!  plan: host X can be emptied ──► migrate its guests away (DPM's own
//!  migrations, like any other) ──► X is empty: under the inventory lock,
//!  check again that nothing is placed on or migrating to X and that HA
//!  keeps its reserve without X, then Up ──sleep──► Standby (durable;
//!  from here nothing is placed on X) ──► driver: power X off
//! ```
//!
//! If the driver fails, the host is woken again (it is on, after all): its
//! next heartbeat makes it `up`. A manager that restarts between standby
//! and the driver finds a standby host whose agent still reports in, and
//! powers it off again. Waking is the other way round: driver first, then
//! `waking`; the host is `up` when its agent registers, and `down` if it
//! does not within `wake_timeout`.
//!
//! It does not thrash: hosts are emptied only well below the target
//! (`below`), a round that must wake a host empties none, guests moved
//! recently by DPM or DRS stay where they are (their hosts are not
//! emptied), and no round plans while any migration is in flight (the
//! model would see its guest on the old host).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drove_api::{DpmHostAction, DpmRound, HostView};
use drove_model::host::HostEvent;
use drove_model::{HostId, HostState, OperationId, OperationKind};
use drove_placement::{ConsolidateParams, Mobility, plan_power};

use crate::core::{ApiError, Ctx, Manager};
use crate::drs::{Model, Window, default_power, limits, reconciler_ctx};
use crate::inventory::{host_key, put};
use crate::power::{NoDriver, PowerAction, PowerDriver, PowerTarget};

/// How far power management acts on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DpmMode {
    /// No rounds at all.
    Off,
    /// Recommend only: an operator runs `drove host standby|wake`.
    #[default]
    Manual,
    /// Migrate, power off and wake on its own.
    Full,
}

impl DpmMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DpmMode::Off => "off",
            DpmMode::Manual => "manual",
            DpmMode::Full => "full",
        }
    }
}

impl FromStr for DpmMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(DpmMode::Off),
            "manual" => Ok(DpmMode::Manual),
            "full" => Ok(DpmMode::Full),
            other => Err(format!("unknown DPM mode {other:?}: off, manual (recommend only) or full (act)")),
        }
    }
}

/// Power management's settings.
#[derive(Debug, Clone)]
pub struct DpmConfig {
    pub mode: DpmMode,
    pub interval: Duration,
    /// Hours of load profiles ahead that hosts on must carry.
    pub lookahead_hours: usize,
    /// Share of CPU and memory the hosts on may be planned to (receivers
    /// of consolidation fill up to it).
    pub target: f64,
    /// Only hosts whose peak CPU in the window is below this share of the
    /// target are emptied.
    pub below: f64,
    pub max_moves: usize,
    /// Hosts emptied per round.
    pub max_hosts: usize,
    /// Never fewer hosts on than this.
    pub min_on: usize,
    /// A woken host that has not reported in after this long is down.
    pub wake_timeout: Duration,
    pub driver: Arc<dyn PowerDriver>,
}

impl Default for DpmConfig {
    fn default() -> Self {
        DpmConfig {
            mode: DpmMode::Manual,
            interval: Duration::from_secs(300),
            lookahead_hours: 2,
            target: 0.7,
            below: 0.5,
            max_moves: 4,
            max_hosts: 1,
            min_on: 1,
            wake_timeout: Duration::from_secs(600),
            driver: Arc::new(NoDriver),
        }
    }
}

impl DpmConfig {
    fn empty_round(&self, at: String) -> DpmRound {
        DpmRound {
            mode: self.mode.as_str().into(),
            driver: self.driver.name().into(),
            at,
            interval_secs: self.interval.as_secs(),
            lookahead_hours: self.lookahead_hours as u32,
            hosts_on: 0,
            hosts_standby: 0,
            watts_now: 0.0,
            watts_saved: 0.0,
            wake: Vec::new(),
            moves: Vec::new(),
            standby: Vec::new(),
            waiting: None,
            errors: Vec::new(),
        }
    }
}

/// What the reconciler remembers between rounds. Not durable: the store
/// holds the host states, and a restarted manager finds what is left
/// (standby hosts still on, waking hosts) from them.
#[derive(Debug, Default)]
pub struct DpmState {
    last: Option<DpmRound>,
    /// Hosts being emptied for standby, and DPM's migrations off them.
    emptying: HashMap<HostId, Vec<OperationId>>,
    /// When each waking host was powered on.
    woken: HashMap<HostId, Instant>,
    /// When each standby host was powered off: a heartbeat later than a
    /// little after that means it is still on.
    off_at: HashMap<HostId, Instant>,
    /// Errors since the last round.
    errors: Vec<String>,
}

pub async fn run(m: Arc<Manager>) {
    if m.config.dpm.mode == DpmMode::Off {
        return;
    }
    crate::drs::every(m.config.dpm.interval, || async {
        m.dpm_round().await;
    })
    .await;
}

fn dpm_ctx(action: &str) -> Ctx {
    reconciler_ctx("dpm", action)
}

fn target(v: &HostView) -> PowerTarget {
    PowerTarget { name: v.info.name.clone(), id: v.info.id.to_string() }
}

impl Manager {
    fn dpm_state(&self) -> std::sync::MutexGuard<'_, DpmState> {
        self.dpm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last round, or an empty one before the first.
    pub fn dpm_status(&self) -> DpmRound {
        self.dpm_state().last.clone().unwrap_or_else(|| self.config.dpm.empty_round(String::new()))
    }

    fn dpm_error(&self, e: String) {
        tracing::warn!(error = %e, "DPM");
        self.dpm_state().errors.push(e);
    }

    /// Put an empty host into standby and power it off: `drove host
    /// standby`, and DPM's last step. Refused, with the reason, while any
    /// guest is placed on or migrating to the host, or when HA would lose
    /// its reserve. The audit record says how it ended (a failed driver
    /// included).
    pub async fn standby_host(&self, ctx: &Ctx, key: &str) -> Result<HostView, ApiError> {
        let (view, pending) = {
            let mut inv = self.lock();
            let h = inv.find_host(key).ok_or_else(|| ApiError::not_found("host", key))?;
            let (id, state, name) = (h.info.id, h.info.state, h.info.name.clone());
            let next = state.apply(HostEvent::Sleep).map_err(|_| {
                ApiError::conflict(format!("host {name} is {state}: only an up host can go into standby"))
            })?;
            let placed = inv.by_host.get(&id).map_or(0, |s| s.len());
            let incoming = inv.guests.values().filter(|g| g.migration.as_ref().is_some_and(|m| m.target == id)).count();
            if placed + incoming > 0 {
                return Err(ApiError::conflict(format!(
                    "host {name} holds {placed} guest(s) and receives {incoming}: empty it first (`drove host drain {name}`)"
                )));
            }
            if let Some(h) = inv.hosts.get_mut(&id) {
                h.info.state = next;
            }
            if let Some(short) = self.reserve_shortfall(&inv, None) {
                if let Some(h) = inv.hosts.get_mut(&id) {
                    h.info.state = state;
                }
                return Err(ApiError::conflict(format!("host {name} must stay on for HA: {short}")));
            }
            // Durable before the driver acts: from here nothing is placed
            // on it, whatever happens to this manager.
            let h = inv.hosts.get(&id).ok_or_else(|| ApiError::not_found("host", key))?;
            (Self::host_view(&inv, h), self.persister.enqueue(vec![put(host_key(id), &h.info)]))
        };
        pending.durable().await?;
        let outcome = self.power_off(&view).await;
        let (result, status) = match &outcome {
            Ok(()) => ("ok", 200),
            Err(e) => ("failed", e.status),
        };
        let pending = {
            let mut inv = self.lock();
            let w = Self::audit_op(&mut inv, ctx, Some(format!("host/{}", view.info.name)), result, status);
            self.persister.enqueue(vec![w])
        };
        pending.durable().await?;
        outcome?;
        tracing::info!(host = %view.info.name, principal = %ctx.principal.name, "host in standby, powered off");
        Ok(view)
    }

    /// Power a standby host off; if the driver fails, wake it again (it is
    /// still on) and report why.
    async fn power_off(&self, view: &HostView) -> Result<(), ApiError> {
        let Err(e) = self.config.dpm.driver.power(&target(view), PowerAction::Off).await else {
            self.dpm_state().off_at.insert(view.info.id, Instant::now());
            return Ok(());
        };
        let why = e.to_string();
        let undo = self.set_power_state(view.info.id, HostEvent::Wake);
        if let Ok(pending) = undo {
            pending.durable().await?;
            self.dpm_state().woken.insert(view.info.id, Instant::now());
        }
        Err(ApiError::upstream("power_failed", format!("{why}; {} stays on", view.info.name)))
    }

    /// Apply a power event to a host's state, durably (the caller awaits).
    fn set_power_state(&self, id: HostId, event: HostEvent) -> Result<crate::persist::Pending, ApiError> {
        let mut inv = self.lock();
        let h = inv.hosts.get_mut(&id).ok_or_else(|| ApiError::not_found("host", &id.to_string()))?;
        let next = h.info.state.apply(event).map_err(|e| ApiError::conflict(e.to_string()))?;
        h.info.state = next;
        let w = put(host_key(id), &h.info);
        Ok(self.persister.enqueue(vec![w]))
    }

    /// Power a host on (`drove host wake`, and DPM ahead of load): from
    /// standby, or a host that is down.
    pub async fn wake_host(&self, ctx: &Ctx, key: &str) -> Result<HostView, ApiError> {
        let view = self.get_host(key).await?;
        let (id, state, name) = (view.info.id, view.info.state, view.info.name.clone());
        if state.apply(HostEvent::Wake).is_err() {
            return Err(ApiError::conflict(format!(
                "host {name} is {state}: only a host in standby or down can be woken"
            )));
        }
        // The driver first: if it fails, the host is still where it was.
        // If the manager stops right after it, the host comes up anyway
        // and its agent's registration makes it `up`.
        if let Err(e) = self.config.dpm.driver.power(&target(&view), PowerAction::On).await {
            return Err(ApiError::upstream("power_failed", e.to_string()));
        }
        let (view, pending) = {
            let mut inv = self.lock();
            let h = inv.hosts.get_mut(&id).ok_or_else(|| ApiError::not_found("host", key))?;
            // It may have registered meanwhile (a fast boot): then it is up.
            if let Ok(next) = h.info.state.apply(HostEvent::Wake) {
                h.info.state = next;
            }
            let mut writes = vec![put(host_key(id), &h.info)];
            let h = inv.hosts.get(&id).ok_or_else(|| ApiError::not_found("host", key))?;
            let view = Self::host_view(&inv, h);
            writes.push(Self::audit_op(&mut inv, ctx, Some(format!("host/{name}")), "ok", 200));
            (view, self.persister.enqueue(writes))
        };
        pending.durable().await?;
        self.dpm_state().woken.insert(id, Instant::now());
        tracing::info!(host = %name, principal = %ctx.principal.name, "host woken");
        Ok(view)
    }

    /// Carry on what earlier rounds (or a manager before a restart) began:
    /// hosts that did not wake in time, standby hosts still on, emptied
    /// hosts ready for standby. Returns the hosts still being emptied.
    async fn dpm_settle(&self, hosts: &[HostView]) -> usize {
        let timeout = self.config.dpm.wake_timeout;
        let full = self.config.dpm.mode == DpmMode::Full;
        for h in hosts {
            let id = h.info.id;
            match h.info.state {
                HostState::Waking => {
                    let since = *self.dpm_state().woken.entry(id).or_insert_with(Instant::now);
                    if since.elapsed() > timeout {
                        self.dpm_state().woken.remove(&id);
                        if let Ok(p) = self.set_power_state(id, HostEvent::WakeTimedOut) {
                            let _ = p.durable().await;
                        }
                        self.dpm_error(format!(
                            "host {} did not report in within {timeout:?} of waking: down",
                            h.info.name
                        ));
                    }
                }
                // Its agent still reports in: the power-off never happened
                // (a manager that stopped in between) or did not work.
                HostState::Standby
                    if full
                        && self.still_on(id)
                        && let Err(e) = self.power_off(h).await =>
                {
                    self.dpm_error(e.message);
                }
                _ => {}
            }
        }
        // Emptied hosts go into standby; hosts whose guests did not all
        // leave are given up (the next round plans afresh).
        let emptying: Vec<(HostId, Vec<OperationId>)> =
            self.dpm_state().emptying.iter().map(|(h, ops)| (*h, ops.clone())).collect();
        let mut still = 0;
        for (host, ops) in emptying {
            let running = {
                let inv = self.lock();
                ops.iter().any(|op| inv.ops.get(op).is_some_and(|o| !o.state.is_final()))
            };
            if running {
                still += 1;
                continue;
            }
            self.dpm_state().emptying.remove(&host);
            let ctx = dpm_ctx("standby (DPM)");
            match self.standby_host(&ctx, &host.to_string()).await {
                Ok(_) => {}
                Err(e) => self.dpm_error(format!("not putting host {host} into standby: {}", e.message)),
            }
        }
        still
    }

    /// Whether a standby host's agent reported in after it was powered off
    /// (allowing a heartbeat that was under way), or, when this manager
    /// did not power it off (it restarted since), at all lately.
    fn still_on(&self, id: HostId) -> bool {
        let off_at = self.dpm_state().off_at.get(&id).copied();
        let inv = self.lock();
        let Some(seen) = inv.hosts.get(&id).and_then(|h| h.last_seen) else { return false };
        match off_at {
            Some(off) => seen > off + 2 * self.config.heartbeat_interval,
            None => seen.elapsed() <= self.config.host_timeout,
        }
    }

    /// One reconciler pass.
    pub async fn dpm_round(self: &Arc<Self>) -> DpmRound {
        let c = self.config.dpm.clone();
        let mut round = c.empty_round(crate::now_rfc3339());
        let hosts = match self.list_hosts().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "DPM round skipped: cannot read the hosts");
                return round;
            }
        };
        let emptying = self.dpm_settle(&hosts).await;
        round.errors = std::mem::take(&mut self.dpm_state().errors);
        let (hosts, guests) = match (self.list_hosts().await, self.list_guests().await) {
            (Ok(h), Ok(g)) => (h, g),
            (Err(e), _) | (_, Err(e)) => {
                round.errors.push(format!("cannot read the inventory: {e}"));
                return self.keep_dpm_round(round);
            }
        };
        let model = match Model::build_window(&hosts, &guests, default_power(), Window::ahead(c.lookahead_hours)) {
            Ok(m) => m,
            Err(e) => {
                round.errors.push(e.to_string());
                return self.keep_dpm_round(round);
            }
        };
        self.dpm_watts(&model, &mut round);
        let migrating = {
            let inv = self.lock();
            inv.active_ops
                .values()
                .filter_map(|op| inv.ops.get(op))
                .filter(|o| o.kind == OperationKind::MigrateGuest)
                .count()
        };
        if emptying > 0 || migrating > 0 {
            round.waiting = Some(format!("{migrating} migration(s) in flight; planning resumes once they end"));
            return self.keep_dpm_round(round);
        }
        let mut cluster = model.cluster.clone();
        // Hosts of recently moved guests are not emptied (consolidation
        // leaves hosts with reluctant guests alone).
        self.hold_guests(&model, &mut cluster, &guests, Mobility::Reluctant);
        let params = ConsolidateParams {
            target: limits(c.target),
            below: c.below,
            max_moves: c.max_moves,
            max_hosts: c.max_hosts,
            min_on: c.min_on,
        };
        let plan = plan_power(&cluster, &params);
        let host_id = |ix: drove_placement::HostIx| model.hosts[ix.index()].0.parse::<HostId>().ok();
        let full = c.mode == DpmMode::Full;
        for &h in &plan.wake {
            let name = model.host_name(h).to_owned();
            let mut act = DpmHostAction {
                host: name.clone(),
                reason: format!(
                    "the hosts on cannot carry the guests' load of the next {} hour(s) within {:.0} %",
                    c.lookahead_hours,
                    c.target * 100.0
                ),
                done: false,
                error: None,
            };
            if full {
                match self.wake_host(&dpm_ctx("wake (DPM)"), &name).await {
                    Ok(_) => act.done = true,
                    Err(e) => act.error = Some(e.message),
                }
            }
            round.wake.push(act);
        }
        let mut moves_of: HashMap<String, Vec<OperationId>> = HashMap::new();
        for mv in &plan.moves {
            let mut out = model.recommendation(&cluster, mv);
            if full && let Some(op) = self.start_move(&dpm_ctx("consolidate (DPM)"), &model, mv, &mut out).await {
                moves_of.entry(out.from.clone()).or_default().push(op);
            }
            round.moves.push(out);
        }
        for &h in &plan.standby {
            let name = model.host_name(h).to_owned();
            let n = plan.moves.iter().filter(|m| m.from == h).count();
            let mut act = DpmHostAction {
                host: name.clone(),
                reason: format!(
                    "its {n} guest(s) fit on the other hosts within {:.0} % for the next {} hour(s)",
                    c.target * 100.0,
                    c.lookahead_hours
                ),
                done: false,
                error: None,
            };
            if full && let Some(id) = host_id(h) {
                let failed = round.moves.iter().filter(|m| m.from == name).find_map(|m| m.error.clone());
                if let Some(e) = failed {
                    act.error = Some(format!("a guest could not be moved: {e}"));
                } else if let Some(ops) = moves_of.remove(&name) {
                    // Standby once its guests have left (a later round).
                    self.dpm_state().emptying.insert(id, ops);
                } else {
                    match self.standby_host(&dpm_ctx("standby (DPM)"), &name).await {
                        Ok(_) => act.done = true,
                        Err(e) => act.error = Some(e.message),
                    }
                }
            }
            round.standby.push(act);
        }
        self.keep_dpm_round(round)
    }

    /// Estimated watts now and saved by the hosts in standby.
    fn dpm_watts(&self, model: &Model, round: &mut DpmRound) {
        let c = &model.cluster;
        for h in c.hosts() {
            let spec = c.host(h);
            match model.hosts[h.index()].1 {
                HostState::Standby => {
                    round.hosts_standby += 1;
                    round.watts_now += spec.power.standby_watts();
                    round.watts_saved += spec.power.idle_watts() - spec.power.standby_watts();
                }
                HostState::Down => {}
                _ => {
                    round.hosts_on += 1;
                    let cap = f64::from(spec.capacity.cpu.max(1));
                    let util = f64::from(c.load(h, 0).cpu) / cap;
                    round.watts_now += spec.power.watts(util.min(1.0));
                }
            }
        }
    }

    fn keep_dpm_round(&self, round: DpmRound) -> DpmRound {
        self.dpm_state().last = Some(round.clone());
        round
    }
}
