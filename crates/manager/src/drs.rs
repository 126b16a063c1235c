//! The rebalancer (DRS): a reconciler that, every `interval`, models the
//! live cluster for the placement engine and asks [`rebalance`] which
//! migrations would relieve hot hosts. In `manual` mode it only records
//! them (`GET /v1/drs`, `drove drs`); in `full` mode it also starts them,
//! as the principal `drs`, audited like any migration.
//!
//! It never thrashes:
//! - a host is relieved only above `hot` and only down to `target`
//!   (hysteresis between the two);
//! - at most `max_moves` migrations per round;
//! - a guest DRS moved is left alone for `cooldown`, and one that is not
//!   running or has an operation in flight is left out.
//!
//! The same [`Model`] serves `drove plan` (capacity, balance, power), so the
//! recommendations an operator previews are the ones the reconciler makes.
//! How the live system maps onto the model:
//!
//! | model | from |
//! |---|---|
//! | host CPU | cores × 1000 milli-cores |
//! | host memory | the memory the agent offers, in MiB |
//! | host network, disk | not reported yet: an ample 10,000 Mbit/s each |
//! | host schedulable | state `up` (maintenance and down hosts take no guests) |
//! | guest CPU per hour | vCPUs × 1000 × its `load_profile` hour; without one, its measured milli-cores that hour (a trusted slot, capped at its vCPUs); else [`DEFAULT_CPU_FRACTION`] |
//! | guest CPU variance per hour | the measured slot's, where its CPU came from it; else 0 |
//! | guest memory | its memory in MiB, all day (reserved, whatever it touches) |
//! | guest network, disk per hour | measured (received + sent, read + written, Mbit/s) in a trusted slot; else 0 |
//!
//! Configured before measured: an operator's `load_profile` says what the
//! guest *will* do (a batch job that starts next week, a sale), which no
//! measurement of the past knows; an operator who wants measurement drops
//! the profile. Not the larger of the two: that would make a profile that
//! lowers a guest's plan (a guest whose busy month is over) useless. A
//! measured slot counts once it has `drove_model::load::MIN_SAMPLES`
//! samples (five minutes of that hour at the agents' default sampling);
//! hours without enough fall back per hour, so a guest measured only by
//! day is planned by measurement by day and by default at night.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drove_api::{DrsMove, DrsRound, DrsUnresolved, GuestView, HostView, MigrateRequest};
use drove_model::{ByteSize, GuestId, GuestState, HostState};
use drove_placement::{
    BalanceParams, Cluster, ClusterError, GuestIx, GuestSpec, HostIx, HostSpec, Limits, Mobility, Move, MoveReason,
    PowerModel, PowerState, Profile, ProfileError, Resources, Strategy, rebalance,
};

use crate::core::{Ctx, Manager};

/// CPU units per core (the model's CPU unit is the milli-core).
pub const MILLI: u32 = 1000;
/// A guest without a load profile is planned at this share of its vCPUs
/// all day: the manager admits 4 vCPUs per core, so a host full by
/// admission is exactly full in the plan.
pub const DEFAULT_CPU_FRACTION: f32 = 0.25;
/// Network and disk bandwidth assumed per host (Mbit/s) while agents do not
/// report them; guests demand none, so these never limit a plan.
pub const AMPLE_MBPS: u32 = 10_000;
/// Slots per day: one per hour, like `load_profile`.
pub const SLOTS: usize = 24;

/// Why the live cluster could not be modelled.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("building the cluster model: {0}")]
    Cluster(#[from] ClusterError),
    #[error("guest {guest}: its load profile: {source}")]
    Profile { guest: String, source: ProfileError },
}

/// The cluster model and the names and ids behind its indices.
#[derive(Debug)]
pub struct Model {
    pub cluster: Cluster,
    /// Per host index: (id, state).
    pub hosts: Vec<(String, HostState)>,
    /// Per guest index: id.
    pub guest_ids: Vec<String>,
    /// Guests planned from a configured load profile.
    pub profiled: usize,
    /// Guests without one planned from measurements for at least one hour.
    pub measured: usize,
}

fn mib_down(b: ByteSize) -> u32 {
    (b.bytes() / (1024 * 1024)).min(u64::from(u32::MAX)) as u32
}

fn mib_up(b: ByteSize) -> u32 {
    b.bytes().div_ceil(1024 * 1024).min(u64::from(u32::MAX)) as u32
}

/// The hours of the day a model covers: `hours` from `start` (UTC hour),
/// wrapping past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub hours: usize,
}

impl Window {
    pub const DAY: Window = Window { start: 0, hours: SLOTS };

    /// `hours` from the current UTC hour.
    pub fn ahead(hours: usize) -> Window {
        Window { start: drove_model::load::utc_hour_now(), hours: hours.clamp(1, SLOTS) }
    }

    /// The day's hour of each slot.
    fn hours(self) -> impl Iterator<Item = usize> {
        (0..self.hours).map(move |i| (self.start + i) % SLOTS)
    }
}

/// A host's power state as the placement engine sees it.
fn power_state(state: HostState) -> PowerState {
    match state {
        HostState::Standby => PowerState::Standby,
        HostState::Waking => PowerState::Waking,
        HostState::Up | HostState::Maintenance | HostState::Down => PowerState::On,
    }
}

impl Model {
    /// The whole day.
    pub fn build(hosts: &[HostView], guests: &[GuestView], power: PowerModel) -> Result<Model, ModelError> {
        Self::build_window(hosts, guests, power, Window::DAY)
    }

    /// The hours of `window` only: what power management looks at.
    pub fn build_window(
        hosts: &[HostView],
        guests: &[GuestView],
        power: PowerModel,
        window: Window,
    ) -> Result<Model, ModelError> {
        let mut cluster = Cluster::new(window.hours)?;
        let mut by_id: HashMap<String, HostIx> = HashMap::new();
        let mut hosts_out = Vec::new();
        let mut sorted: Vec<&HostView> = hosts.iter().collect();
        sorted.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        for h in sorted {
            let ix = cluster.add_host(HostSpec {
                name: h.info.name.clone(),
                capacity: Resources::new(
                    h.info.cores.saturating_mul(MILLI),
                    mib_down(h.info.memory),
                    AMPLE_MBPS,
                    AMPLE_MBPS,
                ),
                core_speed: MILLI,
                power,
                state: power_state(h.info.state),
                // Standby and waking hosts take guests once on; their power
                // state keeps them out until then.
                schedulable: matches!(h.info.state, HostState::Up | HostState::Standby | HostState::Waking),
            })?;
            by_id.insert(h.info.id.to_string(), ix);
            hosts_out.push((h.info.id.to_string(), h.info.state));
        }
        let mut guest_ids = Vec::new();
        let mut profiled = 0;
        let mut measured = 0;
        let mut sorted: Vec<&GuestView> = guests.iter().collect();
        sorted.sort_by(|a, b| a.guest.spec.name.cmp(&b.guest.spec.name));
        for g in sorted {
            let Some(&on) = by_id.get(&g.guest.host.to_string()) else { continue };
            let (spec, from_measurement) = guest_spec(g, window)?;
            profiled += usize::from(g.guest.spec.load_profile.is_some());
            measured += usize::from(from_measurement);
            cluster.add_guest(spec, Some(on))?;
            guest_ids.push(g.guest.id.to_string());
        }
        Ok(Model { cluster, hosts: hosts_out, guest_ids, profiled, measured })
    }

    pub fn host_name(&self, h: HostIx) -> &str {
        &self.cluster.host(h).name
    }

    pub fn guest_name(&self, g: GuestIx) -> &str {
        &self.cluster.guest(g).name
    }

    /// A host by name or id.
    pub fn find_host(&self, key: &str) -> Option<HostIx> {
        self.cluster.hosts().find(|&h| self.host_name(h) == key || self.hosts[h.index()].0 == key)
    }

    /// A move of the plan made on (a copy of) this model's `cluster`, as
    /// the API shows it, not started.
    pub fn recommendation(&self, cluster: &Cluster, mv: &Move) -> DrsMove {
        DrsMove {
            guest: self.guest_name(mv.guest).to_owned(),
            from: self.host_name(mv.from).to_owned(),
            to: self.host_name(mv.to).to_owned(),
            kind: move_kind(&mv.reason).into(),
            reason: mv.explain(cluster),
            operation: None,
            error: None,
        }
    }

    /// A guest by name or id.
    pub fn find_guest(&self, key: &str) -> Option<GuestIx> {
        self.cluster.guests().find(|&g| self.guest_name(g) == key || self.guest_ids[g.index()] == key)
    }
}

/// A live guest as the placement engine sees it over `window` (see the
/// module's table), and whether any hour of it comes from measurement.
fn guest_spec(g: &GuestView, window: Window) -> Result<(GuestSpec, bool), ModelError> {
    let spec = &g.guest.spec;
    let other = Resources::new(0, mib_up(spec.memory), 0, 0);
    let full = f64::from(spec.vcpus.max(1)) * f64::from(MILLI);
    // Per slot of the window: the measured slot of its hour to plan from,
    // if any.
    let slots: Vec<Option<&drove_model::LoadSlot>> = window
        .hours()
        .map(|h| match &spec.load_profile {
            Some(_) => None,
            None => g.measured_load.as_ref().and_then(|m| m.trusted(h)),
        })
        .collect();
    let hourly: Vec<f32> = match &spec.load_profile {
        Some(p) => window.hours().map(|h| p.hourly_cpu.get(h).copied().unwrap_or(DEFAULT_CPU_FRACTION)).collect(),
        None => slots
            .iter()
            .map(|s| s.map_or(DEFAULT_CPU_FRACTION, |s| (s.cpu_millicores / full).clamp(0.0, 1.0) as f32))
            .collect(),
    };
    let profile_error = |source| ModelError::Profile { guest: spec.name.clone(), source };
    let mut demand = Profile::from_hourly(spec.vcpus, MILLI, &hourly, other).map_err(profile_error)?;
    let from_measurement = slots.iter().any(Option::is_some);
    if from_measurement {
        let whole = |v: f64| v.max(0.0).round().min(f64::from(u32::MAX)) as u32;
        let hours = demand
            .iter()
            .zip(&slots)
            .map(|(r, s)| match s {
                Some(s) => Resources {
                    net_mbps: whole(s.net_rx_mbps + s.net_tx_mbps),
                    disk_mbps: whole(s.disk_read_mbps + s.disk_write_mbps),
                    ..r
                },
                None => r,
            })
            .collect();
        let variance = slots.iter().map(|s| s.map_or(0, |s| whole(s.cpu_variance))).collect();
        demand = Profile::from_slots(hours).and_then(|p| p.with_cpu_variance(variance)).map_err(profile_error)?;
    }
    let spec = GuestSpec {
        name: spec.name.clone(),
        demand,
        vcpus: spec.vcpus,
        migration_mib: mib_up(spec.memory),
        anti_affinity: None,
        tier: None,
        priority: spec.priority.0,
        mobility: Mobility::Free,
    };
    Ok((spec, from_measurement))
}

/// How far the rebalancer acts on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DrsMode {
    /// Recommend only: an operator runs the moves (`drove vm migrate`).
    /// (Placement of new guests is always automatic: this is what vSphere
    /// calls "partially automated" for placement plus manual moves.)
    #[default]
    Manual,
    /// Migrate on its own only off a host whose guests demand more than
    /// it has (contention now, in the model's current hour or any hour);
    /// recommend the moves that relieve a host that is merely hot.
    Partial,
    /// Start the recommended migrations itself.
    Full,
}

impl DrsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DrsMode::Manual => "manual",
            DrsMode::Partial => "partial",
            DrsMode::Full => "full",
        }
    }
}

impl FromStr for DrsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "manual" => Ok(DrsMode::Manual),
            "partial" => Ok(DrsMode::Partial),
            "full" => Ok(DrsMode::Full),
            other => Err(format!(
                "unknown DRS mode {other:?}: manual (recommend only), partial (migrate off hosts over capacity) or full (migrate)"
            )),
        }
    }
}

/// The rebalancer's settings.
#[derive(Debug, Clone)]
pub struct DrsConfig {
    pub mode: DrsMode,
    pub interval: Duration,
    /// Share of CPU and memory above which a host is hot, and the share it
    /// is relieved down to.
    pub hot: f64,
    pub target: f64,
    /// Migrations per round, at most.
    pub max_moves: usize,
    /// A guest DRS moved is not moved again for this long.
    pub cooldown: Duration,
}

impl DrsConfig {
    /// A round with these settings, run `at`, that found nothing yet.
    fn empty_round(&self, at: String) -> DrsRound {
        DrsRound {
            mode: self.mode.as_str().into(),
            at,
            interval_secs: self.interval.as_secs(),
            hot: self.hot,
            target: self.target,
            moves: Vec::new(),
            unresolved: Vec::new(),
            held: 0,
        }
    }
}

impl Default for DrsConfig {
    fn default() -> Self {
        DrsConfig {
            mode: DrsMode::Manual,
            interval: Duration::from_secs(300),
            hot: 0.8,
            target: 0.7,
            max_moves: 2,
            cooldown: Duration::from_secs(3600),
        }
    }
}

/// What the reconciler remembers between rounds (not durable: after a
/// restart the first round recomputes everything, and the cool-down of
/// guests moved before it starts afresh from their last migration's end
/// as the manager saw it, which it does not know: it errs towards moving).
#[derive(Debug, Default)]
pub struct DrsState {
    last: Option<DrsRound>,
    moved: HashMap<GuestId, Instant>,
    /// The migrations the last round started: until they end, the model
    /// would count their guests on their old hosts and none on their
    /// targets, so no new round runs.
    inflight: Vec<drove_model::OperationId>,
}

/// CPU and memory limited to `share`; network and disk are not measured.
pub fn limits(share: f64) -> Limits {
    Limits { usable: [share, share, 1.0, 1.0], cpu_sigmas: 0.0 }
}

/// The power model plans assume when an operator gives none.
pub fn default_power() -> PowerModel {
    // Cannot fail: constant, valid figures.
    PowerModel::linear(100.0, 250.0, 0.9, 5.0).unwrap_or_else(|_| unreachable!("valid constant power model"))
}

/// The move's kind as the API names it.
pub fn move_kind(reason: &MoveReason) -> &'static str {
    match reason {
        MoveReason::Hot { .. } => "hot",
        MoveReason::Imbalance { .. } => "imbalance",
        MoveReason::Evacuate => "evacuate",
    }
}

/// Who a reconciler acts as: principal `name`, audited with `action`.
pub(crate) fn reconciler_ctx(name: &str, action: &str) -> Ctx {
    Ctx {
        principal: crate::auth::Principal { name: name.into(), role: crate::auth::Role::Admin },
        action: action.into(),
    }
}

pub async fn run(m: Arc<Manager>) {
    every(m.config.drs.interval, || async {
        m.drs_round().await;
    })
    .await;
}

/// Runs `round` every `interval` (100 ms at least) for ever, the first one
/// an interval after the start, so that hosts have reported by then. A
/// round that overruns delays the next rather than bunching them. The
/// timer of the DRS and DPM reconcilers.
pub(crate) async fn every<F, Fut>(interval: Duration, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // immediate
    loop {
        tick.tick().await;
        round().await;
    }
}

impl Manager {
    /// The last round, or an empty one before the first.
    pub fn drs_status(&self) -> DrsRound {
        let last = self.drs.lock().unwrap_or_else(|p| p.into_inner()).last.clone();
        last.unwrap_or_else(|| self.config.drs.empty_round(String::new()))
    }

    /// One reconciler pass: model, recommend, and in full mode migrate.
    pub async fn drs_round(self: &Arc<Self>) -> DrsRound {
        let c = self.config.drs.clone();
        let mut round = c.empty_round(crate::now_rfc3339());
        {
            let inv = self.lock();
            let mut st = self.drs.lock().unwrap_or_else(|p| p.into_inner());
            st.inflight.retain(|op| inv.ops.get(op).is_some_and(|o| !o.state.is_final()));
            if !st.inflight.is_empty() {
                tracing::debug!(inflight = st.inflight.len(), "DRS waits for its migrations");
                return st.last.clone().unwrap_or(round);
            }
        }
        let (hosts, guests) = match (self.list_hosts().await, self.list_guests().await) {
            (Ok(h), Ok(g)) => (h, g),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "DRS round skipped: cannot read the inventory");
                return round;
            }
        };
        let model = match Model::build(&hosts, &guests, default_power()) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "DRS round skipped");
                round.unresolved.push(DrsUnresolved { host: String::new(), reason: e.to_string() });
                return self.keep_round(round);
            }
        };
        let mut cluster = model.cluster.clone();
        round.held = self.hold_guests(&model, &mut cluster, &guests, Mobility::Pinned);
        let params = BalanceParams {
            hot: limits(c.hot),
            target: limits(c.target),
            strategy: Strategy::LeastLoaded,
            max_moves: c.max_moves,
            imbalance: None,
            allow_wake: false,
        };
        let plan = rebalance(&cluster, &params);
        round.unresolved = plan
            .unresolved
            .iter()
            .map(|(h, why)| DrsUnresolved { host: model.host_name(*h).to_owned(), reason: why.clone() })
            .collect();
        let ctx = reconciler_ctx("drs", "rebalance (DRS)");
        for mv in &plan.moves {
            let mut out = model.recommendation(&cluster, mv);
            // Pressure is against the target share: times it, the share of
            // the host's capacity its guests demand.
            let contended =
                matches!(mv.reason, MoveReason::Hot { pressure_before, .. } if pressure_before * c.target > 1.0);
            if (c.mode == DrsMode::Full || (c.mode == DrsMode::Partial && contended))
                && let Some(op) = self.start_move(&ctx, &model, mv, &mut out).await
            {
                self.drs.lock().unwrap_or_else(|p| p.into_inner()).inflight.push(op);
            }
            round.moves.push(out);
        }
        self.keep_round(round)
    }

    /// Marks in `cluster` (a copy of `model`'s) the guests a round must
    /// leave where they are: not running, or busy with an operation
    /// (pinned), and moved by DRS or DPM within the cool-down (`moved_as`).
    /// Returns how many.
    pub(crate) fn hold_guests(
        &self,
        model: &Model,
        cluster: &mut Cluster,
        guests: &[GuestView],
        moved_as: Mobility,
    ) -> usize {
        let busy: std::collections::HashSet<GuestId> = self.lock().active_ops.keys().copied().collect();
        let moved = self.recently_moved();
        // By id, so that each model guest is looked up once (finding a
        // model guest by key is a scan: quadratic at 50,000 guests).
        let held: HashMap<String, Mobility> = guests
            .iter()
            .filter_map(|g| {
                let id = g.guest.id;
                if g.guest.state != GuestState::Running || busy.contains(&id) {
                    Some((id.to_string(), Mobility::Pinned))
                } else {
                    moved.contains(&id).then(|| (id.to_string(), moved_as))
                }
            })
            .collect();
        let mut n = 0;
        for ix in model.cluster.guests() {
            if let Some(&m) = held.get(&model.guest_ids[ix.index()]) {
                cluster.set_mobility(ix, m);
                n += 1;
            }
        }
        n
    }

    /// Starts `mv` as a migration by `ctx`, recording in `out` the
    /// operation or why it could not start; the guest cools down.
    pub(crate) async fn start_move(
        self: &Arc<Self>,
        ctx: &Ctx,
        model: &Model,
        mv: &Move,
        out: &mut DrsMove,
    ) -> Option<drove_model::OperationId> {
        let guest_id = &model.guest_ids[mv.guest.index()];
        let req = MigrateRequest { to: Some(out.to.clone()), ..Default::default() };
        match self.migrate_guest(ctx, guest_id, req).await {
            Ok(acc) => {
                out.operation = Some(acc.operation.id);
                if let Ok(id) = guest_id.parse::<GuestId>() {
                    self.note_moved(id);
                }
                tracing::info!(principal = %ctx.principal.name, guest = %out.guest, from = %out.from, to = %out.to, reason = %out.reason, "migrates");
                Some(acc.operation.id)
            }
            Err(e) => {
                out.error = Some(e.message);
                None
            }
        }
    }

    /// Guests DRS or DPM moved within the cool-down: neither moves them
    /// again for balance or power (so the two never undo each other).
    pub(crate) fn recently_moved(&self) -> std::collections::HashSet<GuestId> {
        let mut st = self.drs.lock().unwrap_or_else(|p| p.into_inner());
        let cooldown = self.config.drs.cooldown;
        st.moved.retain(|_, at| at.elapsed() < cooldown);
        st.moved.keys().copied().collect()
    }

    pub(crate) fn note_moved(&self, id: GuestId) {
        self.drs.lock().unwrap_or_else(|p| p.into_inner()).moved.insert(id, Instant::now());
    }

    fn keep_round(&self, round: DrsRound) -> DrsRound {
        self.drs.lock().unwrap_or_else(|p| p.into_inner()).last = Some(round.clone());
        round
    }
}
