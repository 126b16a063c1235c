//! The per-host agent: registers its host, heartbeats, and converges the
//! guests on its hypervisor to the desired state the manager returns.
//!
//! The loop is a reconciler: each heartbeat carries what the hypervisor
//! observes and brings back what the manager wants; the difference becomes
//! at most one action per guest, run in its own task so a slow boot never
//! delays heartbeats or other guests. Every action is idempotent, so after
//! an agent or manager restart the same loop simply carries on. A deleted
//! guest is reported back as destroyed only after the hypervisor removed it.
//!
//! Each heartbeat also reports what each guest with a process used since
//! the agent last sampled it (at most every `usage_every`): rates taken
//! from two readings of its cumulative counters ([`Hypervisor::usage`]) of
//! the same process. A first reading, and the first after a restart, gives
//! none; the manager learns each guest's daily load profile from the rest.
//!
//! Each answered heartbeat renews the host's lease with the manager. An
//! agent whose lease ran out and that cannot reach any of its isolation
//! addresses is cut off: the manager will restart its guests elsewhere, so
//! it fences itself — hard-stops every guest and starts none until it has
//! the lease again (see docs/adr/0011-ha-leases-and-fencing.md):
//!
//! ```text
//!   ┌────────┐ lease ran out and isolated ┌────────┐
//!   │ Leased │ ─────────────────────────► │ Fenced │  kills any guest it runs
//!   └────────┘ ◄───────────────────────── └────────┘
//!        ▲        heartbeat answered          │
//!        │   (lease ran out, not isolated:    │
//!        └──  the manager is down; guests ◄───┘
//!             keep running, none start)
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drove_api::{
    AgentCall, AgentCallKind, CallOutcome, CallResult, DesiredGuest, DesiredState, GuestFailure, HeartbeatRequest,
    MigrateCall, ObservedGuest, ObservedState, RegisterRequest,
};
use drove_client::{Client, ClientError};
use drove_hypervisor::{GuestConfig, GuestStatus, GuestUsage, HvError, Hypervisor, RuntimeState, StopMode};
use drove_model::{GuestId, GuestSpec, HostId, LoadSample, NicSpec, ResourceLimits, RestartPolicy};
use drove_net::{HostNetwork, NetError, NicAttachment, NoNetwork};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Host name, unique in the data centre.
    pub name: String,
    pub stop_timeout: Duration,
    /// Wait this long before retrying a failed action of one generation.
    pub retry_after: Duration,
    /// Backoff between restarts of a crashing guest: the first restart is
    /// immediate, then this, doubling up to `restart_backoff_max`.
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// A guest running this long without a crash starts its backoff afresh.
    pub restart_stable_after: Duration,
    /// The host side of guests' NICs (taps on VLAN segments).
    pub network: Arc<dyn HostNetwork>,
    /// The uplink guests' NIC limits reserve, reported to the manager.
    pub uplink_bps: Option<u64>,
    /// This host's migration network address: incoming migrations listen
    /// there. Without one the host takes no migrations.
    pub migration_address: Option<std::net::IpAddr>,
    /// Addresses whose reachability tells a cut-off host from a dead
    /// manager (a TCP connect that is answered, even refused, counts).
    /// Empty: the manager's own address.
    pub isolation_addresses: Vec<std::net::SocketAddr>,
    /// How often each guest's resource use is sampled (at most once per
    /// heartbeat): the interval its reported rates average over.
    pub usage_every: Duration,
}

impl AgentConfig {
    pub fn new(name: &str) -> Self {
        AgentConfig {
            name: name.to_owned(),
            stop_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(5),
            restart_backoff: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(60),
            restart_stable_after: Duration::from_secs(60),
            network: Arc::new(NoNetwork),
            uplink_bps: None,
            migration_address: None,
            isolation_addresses: Vec::new(),
            usage_every: Duration::from_secs(10),
        }
    }
}

/// The host's lease, as far as this agent knows.
#[derive(Debug, Default)]
struct Lease {
    /// What the manager grants per answered heartbeat; `None` until it said
    /// (no fencing before the first registration).
    duration: Option<Duration>,
    /// Until when the last answered heartbeat holds it, counted from when
    /// that heartbeat was sent (the manager counts from when it got it: a
    /// little later, so the agent's view runs out first).
    valid_until: Option<Instant>,
    fenced: bool,
}

impl Lease {
    fn expired(&self, now: Instant) -> bool {
        self.duration.is_some() && self.valid_until.is_some_and(|t| now >= t)
    }
}

/// How long a readiness probe waits for a started guest's OS (a guest
/// without a guest agent never answers).
const READY_PATIENCE: Duration = Duration::from_secs(180);

/// Why an action on a guest failed.
#[derive(Debug, thiserror::Error)]
enum ActError {
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    #[error("changing the host side of its NICs (taps, VLAN segments)")]
    Network(#[from] NetError),
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading host resources from the hypervisor")]
    Resources(#[source] HvError),
    #[error("registering host {name} with the manager")]
    Register {
        name: String,
        #[source]
        source: ClientError,
    },
}

/// What action tasks report back for the next heartbeat.
#[derive(Debug, Default)]
struct Reports {
    failures: Vec<GuestFailure>,
    destroyed: HashSet<GuestId>,
    /// Last failed generation per guest and when, to pace retries.
    failed_at: HashMap<GuestId, (u64, Instant)>,
    /// Crashed guests restarted since the last delivered heartbeat.
    restarted: Vec<GuestId>,
    /// Restart pacing per guest.
    backoff: HashMap<GuestId, Backoff>,
}

/// When a crashing guest may be restarted next.
#[derive(Debug, Clone, Copy, Default)]
struct Backoff {
    /// Wait before restarting after the next crash.
    delay: Duration,
    /// When the current crash's restart is due, once the crash was seen.
    restart_at: Option<Instant>,
    /// Since when it has been seen running.
    running_since: Option<Instant>,
}

#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    client: Client,
    hv: Arc<dyn Hypervisor>,
    reports: Arc<Mutex<Reports>>,
    wake: Arc<Notify>,
    actions: Mutex<HashMap<GuestId, JoinHandle<()>>>,
    lease: Mutex<Lease>,
    ready: Mutex<Readiness>,
    sampler: Mutex<Sampler>,
}

/// The last reading of each guest's counters, that the next one takes its
/// rates from.
#[derive(Debug, Default)]
struct Sampler {
    last: HashMap<GuestId, (GuestUsage, Instant)>,
}

impl Sampler {
    /// Whether guest `id` is due for a reading at `now`.
    fn due(&self, id: GuestId, now: Instant, every: Duration) -> bool {
        self.last.get(&id).is_none_or(|(_, at)| now.saturating_duration_since(*at) >= every)
    }

    /// Keeps `reading`, made at `at`, and returns the rates since the
    /// previous reading if that was of the same process (see
    /// [`GuestUsage::rate_since`]). Either way `reading` is the base of the
    /// next rate.
    fn take(&mut self, id: GuestId, reading: GuestUsage, at: Instant) -> Option<LoadSample> {
        let (before, then) = self.last.insert(id, (reading, at))?;
        reading.rate_since(&before, at.saturating_duration_since(then))
    }

    /// Forgets guests that have no process any more.
    fn keep(&mut self, live: &HashSet<GuestId>) {
        self.last.retain(|id, _| live.contains(id));
    }
}

/// What the agent knows of its guests' OSes.
#[derive(Debug, Default)]
struct Readiness {
    /// Guests whose OS is up, with the VMM pid it was seen up in (a new
    /// process boots again).
    up: HashMap<GuestId, Option<u32>>,
    /// Guests being probed.
    probing: HashSet<GuestId>,
}

fn to_observed(s: &GuestStatus) -> ObservedGuest {
    ObservedGuest {
        id: s.id,
        generation: s.generation,
        ready: false,
        load: None,
        state: match s.state {
            RuntimeState::Stopped => ObservedState::Stopped,
            RuntimeState::Running => ObservedState::Running,
            RuntimeState::Paused => ObservedState::Paused,
            RuntimeState::Crashed => ObservedState::Crashed,
        },
    }
}

/// What to do for one guest, given desired and observed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Define (or refresh the generation of) the guest, then maybe start it.
    Ensure {
        start: bool,
    },
    Resume,
    Stop {
        force: bool,
    },
    Destroy,
    /// Nothing to do on the hypervisor; tell the manager it is gone.
    ConfirmAbsent,
}

fn plan(d: &DesiredGuest, observed: Option<&GuestStatus>) -> Option<Action> {
    use RuntimeState as R;
    let state = observed.map(|o| o.state);
    let stale = observed.is_some_and(|o| o.generation < d.generation);
    match (d.state, state) {
        (DesiredState::Absent, None) => Some(Action::ConfirmAbsent),
        (DesiredState::Absent, Some(_)) => Some(Action::Destroy),
        (DesiredState::Running, None | Some(R::Stopped | R::Crashed)) => Some(Action::Ensure { start: true }),
        (DesiredState::Running, Some(R::Paused)) => Some(Action::Resume),
        (DesiredState::Running, Some(R::Running)) => stale.then_some(Action::Ensure { start: false }),
        (DesiredState::Stopped, None) => Some(Action::Ensure { start: false }),
        (DesiredState::Stopped, Some(R::Running | R::Paused)) => Some(Action::Stop { force: d.force_stop }),
        (DesiredState::Stopped, Some(R::Stopped | R::Crashed)) => stale.then_some(Action::Ensure { start: false }),
    }
}

impl Agent {
    pub fn new(config: AgentConfig, client: Client, hv: Arc<dyn Hypervisor>) -> Arc<Agent> {
        Arc::new(Agent {
            config,
            client,
            hv,
            reports: Default::default(),
            wake: Arc::new(Notify::new()),
            actions: Mutex::new(HashMap::new()),
            lease: Mutex::new(Lease::default()),
            ready: Mutex::new(Default::default()),
            sampler: Mutex::new(Sampler::default()),
        })
    }

    /// Whether the guest's OS is known up in its current process; starts a
    /// probe (one per guest) for a running guest not known up yet.
    fn ready(self: &Arc<Self>, s: &GuestStatus) -> bool {
        if s.state != RuntimeState::Running {
            return false;
        }
        let mut r = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        if r.up.get(&s.id) == Some(&s.pid) {
            return true;
        }
        if r.probing.insert(s.id) {
            let (me, id, pid) = (self.clone(), s.id, s.pid);
            tokio::spawn(async move {
                let deadline = Instant::now() + READY_PATIENCE;
                while Instant::now() < deadline {
                    if me.hv.guest_ready(id).await.unwrap_or(false) {
                        me.ready.lock().unwrap_or_else(|p| p.into_inner()).up.insert(id, pid);
                        me.wake.notify_one();
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                me.ready.lock().unwrap_or_else(|p| p.into_inner()).probing.remove(&id);
            });
        }
        false
    }

    fn lock_lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the agent has fenced itself (its guests are stopped and none
    /// starts until the manager answers again).
    pub fn fenced(&self) -> bool {
        self.lock_lease().fenced
    }

    /// The manager answered a heartbeat sent at `sent`.
    fn renewed(&self, sent: Instant, lease: Option<Duration>) {
        let mut l = self.lock_lease();
        if lease.is_some() {
            l.duration = lease;
        }
        if let Some(d) = l.duration {
            l.valid_until = Some(sent + d);
        }
        if l.fenced && !l.expired(Instant::now()) {
            l.fenced = false;
            tracing::warn!(host = %self.config.name, "lease regained; guests may start again");
        }
    }

    /// Whether any isolation address answers.
    async fn reachable(&self) -> bool {
        let mut addrs = self.config.isolation_addresses.clone();
        if addrs.is_empty()
            && let Some(a) = manager_address(self.client.endpoint()).await
        {
            addrs.push(a);
        }
        for a in addrs {
            let attempt = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(a)).await;
            match attempt {
                Ok(Ok(_)) => return true,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
                _ => {}
            }
        }
        false
    }

    /// The fencing watchdog: runs apart from the heartbeat loop, whose
    /// requests may hang for as long as a cut link lets them.
    async fn watch_lease(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tick.tick().await;
            let (expired, fenced) = {
                let l = self.lock_lease();
                (l.expired(Instant::now()), l.fenced)
            };
            if !expired {
                warned = false;
                continue;
            }
            if !fenced {
                if self.reachable().await {
                    if !warned {
                        tracing::warn!(
                            host = %self.config.name,
                            "lease ran out but the network answers: the manager is down; guests keep running"
                        );
                        warned = true;
                    }
                    continue;
                }
                let mut l = self.lock_lease();
                if !l.expired(Instant::now()) {
                    continue; // renewed meanwhile
                }
                l.fenced = true;
                drop(l);
                tracing::error!(
                    host = %self.config.name,
                    "lease ran out and this host is cut off: fencing (hard-stopping every guest)"
                );
                for (_, h) in self.actions.lock().unwrap_or_else(|p| p.into_inner()).drain() {
                    h.abort();
                }
            }
            // Fenced: nothing runs here, whatever an aborted action left.
            self.stop_all().await;
        }
    }

    async fn stop_all(&self) {
        let Ok(list) = self.hv.list().await else { return };
        for g in list.iter().filter(|g| matches!(g.state, RuntimeState::Running | RuntimeState::Paused)) {
            match self.hv.stop(g.id, StopMode::Force).await {
                Ok(()) => tracing::warn!(guest = %g.id, "fenced: guest hard-stopped"),
                Err(e) => tracing::error!(guest = %g.id, error = %e, "fenced: cannot stop guest"),
            }
        }
    }

    /// Drops this host's copy of a guest that belongs elsewhere, and the
    /// host side of its first `nics` NICs: forgotten when its disks are on
    /// shared storage, destroyed when they are this host's own (a
    /// migration's copy that lost). A copy already gone is fine.
    async fn discard(&self, id: GuestId, nics: usize) -> Result<(), ActError> {
        match self.hv.forget(id).await {
            Err(HvError::Unsupported { .. }) => self.hv.destroy(id).await,
            other => other,
        }
        .or_else(|e| if matches!(e, HvError::NotFound { .. }) { Ok(()) } else { Err(e) })?;
        Ok(self.config.network.detach(&self.nic_devices(id, 0..nics)).await?)
    }

    async fn register(&self) -> Result<(HostId, Duration), AgentError> {
        let res = self.hv.resources().await.map_err(AgentError::Resources)?;
        let req = RegisterRequest {
            name: self.config.name.clone(),
            cores: res.cores,
            memory: res.memory,
            hypervisor: self.hv.kind(),
            uplink_bps: self.config.uplink_bps,
            migration_address: self.config.migration_address,
        };
        let r = self
            .client
            .register(&req)
            .await
            .map_err(|source| AgentError::Register { name: self.config.name.clone(), source })?;
        if let Some(ms) = r.lease_ms {
            self.lock_lease().duration = Some(Duration::from_millis(ms));
        }
        Ok((r.host_id, Duration::from_millis(r.heartbeat_interval_ms.max(10))))
    }

    /// Register (retrying until the manager answers), then heartbeat and
    /// converge until `shutdown` resolves. Guests keep running after it.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        // Before any guest starts: the uplink's shaping (kept as it is for
        // the guests already running).
        if let Err(e) = self.config.network.prepare().await {
            tracing::error!(error = %e, cause = %source_chain(&e), "cannot set up the host network; guests' NICs may fail");
        }
        let watchdog = tokio::spawn(self.clone().watch_lease());
        let mut backoff = Duration::from_millis(200);
        let mut registration: Option<(HostId, Duration)> = None;
        loop {
            let interval = match registration {
                None => match self.register().await {
                    Ok((id, every)) => {
                        tracing::info!(host = %self.config.name, %id, "registered with the manager");
                        registration = Some((id, every));
                        backoff = Duration::from_millis(200);
                        Duration::ZERO
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, cause = %source_chain(&e), "registration failed; retrying");
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        backoff
                    }
                },
                // The manager paces long polls; no pause between them.
                Some((id, every)) => match self.beat(id, every).await {
                    Ok(true) => Duration::ZERO,
                    Ok(false) => every,
                    Err(e) if Client::is_unknown_host(&e) => {
                        tracing::warn!("manager does not know this host; registering again");
                        registration = None;
                        Duration::ZERO
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, cause = %source_chain(&e), "heartbeat failed; will retry");
                        every
                    }
                },
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(interval) => {}
                _ = self.wake.notified() => {}
            }
        }
        watchdog.abort();
        tracing::info!(host = %self.config.name, "agent stopping; guests keep running");
    }

    /// One heartbeat and the convergence it calls for.
    /// One heartbeat; returns whether it was a long poll (so the next one can
    /// follow at once).
    async fn beat(self: &Arc<Self>, host_id: HostId, interval: Duration) -> Result<bool, ClientError> {
        let statuses = match self.hv.list().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "listing guests failed; reporting none");
                Vec::new()
            }
        };
        let (failures, restarted, destroyed) = {
            let mut r = self.lock_reports();
            (
                std::mem::take(&mut r.failures),
                std::mem::take(&mut r.restarted),
                r.destroyed.iter().copied().collect::<Vec<_>>(),
            )
        };
        {
            let present: HashSet<GuestId> = statuses.iter().map(|s| s.id).collect();
            self.ready.lock().unwrap_or_else(|p| p.into_inner()).up.retain(|id, _| present.contains(id));
        }
        let mut loads = self.sample_usage(&statuses).await;
        let req = HeartbeatRequest {
            host_id,
            guests: statuses
                .iter()
                .map(|s| ObservedGuest { ready: self.ready(s), load: loads.remove(&s.id), ..to_observed(s) })
                .collect(),
            failures: failures.clone(),
            restarted: restarted.clone(),
            destroyed: destroyed.clone(),
            wait_ms: None,
            pools: match self.hv.pools().await {
                Ok(pools) => pools
                    .into_iter()
                    .map(|p| drove_api::PoolReport { name: p.name, capacity: p.capacity, free: p.free })
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "measuring the storage pools failed; reporting none");
                    Vec::new()
                }
            },
        };
        // Long-poll only when nothing is in flight here: then only the
        // manager can have news. While actions run, answer at once and let
        // their completion (or the interval) pace the next beat, so no
        // request is ever cancelled half-way.
        let busy = {
            let mut actions = self.actions.lock().unwrap_or_else(|p| p.into_inner());
            actions.retain(|_, h| !h.is_finished());
            !actions.is_empty()
        };
        let req = HeartbeatRequest { wait_ms: (!busy).then_some(interval.as_millis() as u64), ..req };
        let sent = Instant::now();
        let resp = self.client.heartbeat(&req).await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                // Not delivered: report these again next time.
                let mut r = self.lock_reports();
                r.failures.extend(failures);
                r.restarted.extend(restarted);
                return Err(e);
            }
        };
        {
            let mut r = self.lock_reports();
            for id in &destroyed {
                r.destroyed.remove(id);
            }
        }
        self.renewed(sent, resp.lease_ms.map(Duration::from_millis));
        if self.fenced() {
            // Answered too late to hold the lease: still fenced.
            return Ok(false);
        }
        for id in resp.forget {
            let me = self.clone();
            tokio::spawn(async move {
                // Its NIC count is the manager's to know: all that may exist.
                match me.discard(id, drove_model::guest::MAX_NICS).await {
                    Ok(()) => tracing::info!(guest = %id, "forgot a guest that now runs on another host"),
                    Err(e) => tracing::warn!(guest = %id, error = %e, "cannot forget a guest that moved away"),
                }
            });
        }
        for call in resp.calls {
            let me = self.clone();
            tokio::spawn(async move { me.answer(call).await });
        }
        let by_id: HashMap<GuestId, &GuestStatus> = statuses.iter().map(|s| (s.id, s)).collect();
        let mut actions = self.actions.lock().unwrap_or_else(|p| p.into_inner());
        actions.retain(|_, h| !h.is_finished());
        for d in resp.guests {
            // Hands off while it is being migrated away: its steps come as
            // calls, and resuming its paused copy could run it twice.
            if d.migrating || actions.contains_key(&d.id) {
                continue;
            }
            let observed = by_id.get(&d.id).copied();
            if !self.may_restart(&d, observed) {
                continue;
            }
            let Some(action) = plan(&d, observed) else { continue };
            if action == Action::ConfirmAbsent {
                self.lock_reports().destroyed.insert(d.id);
                continue;
            }
            let retry_later =
                self.lock_reports().failed_at.get(&d.id).is_some_and(|(generation, at)| {
                    *generation == d.generation && at.elapsed() < self.config.retry_after
                });
            if retry_later {
                continue;
            }
            let me = self.clone();
            actions.insert(d.id, tokio::spawn(async move { me.act(d, action).await }));
        }
        Ok(req.wait_ms.is_some() && actions.is_empty())
    }

    /// Reads the counters of each guest with a process that is due, and
    /// returns the rates of those with an earlier reading of the same
    /// process. A guest whose reading fails (its process just went, an
    /// operation holds it) has no rate this time; the next reading covers
    /// the gap.
    async fn sample_usage(&self, statuses: &[GuestStatus]) -> HashMap<GuestId, LoadSample> {
        let live: HashSet<GuestId> = statuses.iter().filter(|s| s.pid.is_some()).map(|s| s.id).collect();
        let every = self.config.usage_every;
        let due: Vec<GuestId> = {
            let mut sampler = self.sampler.lock().unwrap_or_else(|p| p.into_inner());
            sampler.keep(&live);
            let now = Instant::now();
            live.iter().copied().filter(|id| sampler.due(*id, now, every)).collect()
        };
        let mut rates = HashMap::new();
        for id in due {
            match self.hv.usage(id).await {
                Ok(reading) => {
                    let at = Instant::now();
                    let rate = self.sampler.lock().unwrap_or_else(|p| p.into_inner()).take(id, reading, at);
                    if let Some(rate) = rate {
                        rates.insert(id, rate);
                    }
                }
                Err(HvError::Unsupported { .. }) => return HashMap::new(),
                Err(e) => tracing::debug!(guest = %id, error = %e, "cannot read the guest's usage this time"),
            }
        }
        rates
    }

    /// The restart policy and its backoff: whether a guest that should run
    /// may be (re)started now. Counts each crash restart for the manager.
    fn may_restart(&self, d: &DesiredGuest, observed: Option<&GuestStatus>) -> bool {
        let now = Instant::now();
        let mut r = self.lock_reports();
        match observed.map(|o| o.state) {
            Some(RuntimeState::Running) => {
                let b = r.backoff.entry(d.id).or_default();
                let since = *b.running_since.get_or_insert(now);
                if since.elapsed() >= self.config.restart_stable_after {
                    b.delay = Duration::ZERO;
                }
                true
            }
            Some(RuntimeState::Crashed) if d.state == DesiredState::Running => {
                if d.restart_policy == RestartPolicy::Never {
                    return false;
                }
                let b = r.backoff.entry(d.id).or_default();
                let due = *b.restart_at.get_or_insert(now + b.delay);
                if now < due {
                    return false;
                }
                b.restart_at = None;
                b.running_since = None;
                b.delay = (b.delay * 2).clamp(self.config.restart_backoff, self.config.restart_backoff_max);
                tracing::warn!(guest = %d.spec.name, next_delay = ?b.delay, "guest crashed; restarting it");
                r.restarted.push(d.id);
                true
            }
            _ => true,
        }
    }

    fn lock_reports(&self) -> std::sync::MutexGuard<'_, Reports> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn act(&self, d: DesiredGuest, action: Action) {
        let id = d.id;
        let result: Result<(), ActError> = match action {
            Action::Ensure { start } => {
                async {
                    let config = GuestConfig { id, generation: d.generation, spec: d.spec.clone() };
                    self.attach_nics(id, &d.spec).await?;
                    self.hv.create(&config).await?;
                    if start {
                        self.hv.start(id).await?;
                    }
                    Ok(())
                }
                .await
            }
            Action::Resume => self.hv.resume(id).await.map_err(Into::into),
            Action::Stop { force } => {
                let mode =
                    if force { StopMode::Force } else { StopMode::Graceful { timeout: self.config.stop_timeout } };
                self.hv.stop(id, mode).await.map_err(Into::into)
            }
            Action::Destroy => {
                async {
                    self.hv.destroy(id).await?;
                    self.config.network.detach(&self.nic_devices(id, 0..d.spec.nics.len())).await?;
                    Ok(())
                }
                .await
            }
            Action::ConfirmAbsent => Ok(()),
        };
        let mut r = self.lock_reports();
        match result {
            Ok(()) => {
                tracing::info!(guest = %d.spec.name, ?action, "done");
                r.failed_at.remove(&id);
                if action == Action::Destroy {
                    r.destroyed.insert(id);
                }
            }
            Err(e) => {
                let message = format!("{e}: {}", source_chain(&e));
                tracing::warn!(guest = %d.spec.name, ?action, error = %message, "action failed");
                r.failed_at.insert(id, (d.generation, Instant::now()));
                r.failures.push(GuestFailure { id, generation: d.generation, message });
            }
        }
        drop(r);
        // Tell the manager now rather than at the next tick.
        self.wake.notify_one();
    }
}

impl Agent {
    /// The host devices of the guest's NICs with these indexes (none for a
    /// backend without host-side NICs).
    fn nic_devices(&self, id: GuestId, indexes: std::ops::Range<usize>) -> Vec<String> {
        indexes.filter_map(|i| self.hv.nic_device(id, i)).collect()
    }

    /// Puts each NIC's host device on its VLAN's segment. Idempotent: on a
    /// restart or re-adoption, what is in place stays untouched.
    async fn attach_nics(&self, id: GuestId, spec: &GuestSpec) -> Result<(), NetError> {
        for (i, nic) in spec.nics.iter().enumerate() {
            if let Some(dev) = self.hv.nic_device(id, i) {
                self.config.network.attach(&attachment(&dev, nic, &spec.limits)).await?;
            }
        }
        Ok(())
    }

    /// Hot-adds a NIC: its host device first, removed again if QEMU refuses.
    async fn hotplug_nic(&self, id: GuestId, nic: NicSpec, index: usize) -> Result<(), ActError> {
        let device = self.hv.nic_device(id, index);
        if let Some(dev) = &device {
            // The manager wrote the guest-wide cap into a hot-added NIC.
            self.config.network.attach(&attachment(dev, &nic, &Default::default())).await?;
        }
        let result = self.hv.hotplug(id, &drove_hypervisor::Hotplug::AddNic { nic }).await;
        if result.is_err()
            && let Some(dev) = device
            && let Err(e) = self.config.network.detach(&[dev]).await
        {
            tracing::warn!(guest = %id, error = %e, "cannot remove the tap of a NIC that was not added");
        }
        Ok(result?)
    }

    /// Answer a call the manager relayed from an operator.
    async fn answer(&self, call: AgentCall) {
        let outcome = match call.kind {
            AgentCallKind::ConsoleLog { max_bytes } => match self.hv.console_log(call.guest, max_bytes).await {
                Ok(bytes) => CallOutcome::ConsoleLog { text: String::from_utf8_lossy(&bytes).into_owned() },
                Err(e) => CallOutcome::Error { message: format!("{e}: {}", source_chain(&e)) },
            },
            AgentCallKind::Console { session } => match self.hv.console(call.guest).await {
                Ok(mut console) => match self.client.agent_console(&session).await {
                    Ok(mut upgraded) => {
                        let _ = tokio::io::copy_bidirectional(&mut console, &mut upgraded).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not open the console session with the manager");
                        return;
                    }
                },
                Err(e) => CallOutcome::Error { message: format!("{e}") },
            },
            AgentCallKind::Exec { command, input, timeout_secs } => {
                let mut req = drove_hypervisor::ExecRequest::new(command[0].clone(), command[1..].to_vec());
                req.input = input.map(String::into_bytes);
                req.timeout = Duration::from_secs(timeout_secs);
                match self.hv.exec(call.guest, &req).await {
                    Ok(r) => CallOutcome::Exec(drove_api::ExecResponse {
                        exit_code: r.exit_code,
                        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
                    }),
                    Err(e) => CallOutcome::Error { message: format!("{e}: {}", source_chain(&e)) },
                }
            }
            AgentCallKind::Reset => match self.hv.reset(call.guest).await {
                Ok(()) => CallOutcome::Done,
                Err(e) => CallOutcome::Error { message: format!("{e}: {}", source_chain(&e)) },
            },
            AgentCallKind::Hotplug { change } => {
                use drove_api::HotplugChange as C;
                use drove_hypervisor::Hotplug as H;
                let plug =
                    |change: H| async move { self.hv.hotplug(call.guest, &change).await.map_err(ActError::from) };
                let result = match change {
                    C::AddNic { nic, index } => self.hotplug_nic(call.guest, nic, index as usize).await,
                    C::AddDisk { size } => plug(H::AddDisk { size }).await,
                    C::SetMemory { memory } => plug(H::SetMemory { memory }).await,
                    C::SetVcpus { vcpus } => plug(H::SetVcpus { vcpus }).await,
                    C::GrowDisk { index, size } => plug(H::GrowDisk { index, size }).await,
                };
                match result {
                    Ok(()) => CallOutcome::Done,
                    Err(e) => CallOutcome::Error { message: format!("{e}: {}", source_chain(&e)) },
                }
            }
            // The host side of the NICs (the uplink reservation) follows the
            // new rates at the convergence the generation change brings.
            AgentCallKind::SetLimits { limits } => match self.hv.set_limits(call.guest, &limits).await {
                Ok(()) => CallOutcome::Done,
                Err(e) => CallOutcome::Error { message: format!("{e}: {}", source_chain(&e)) },
            },
            AgentCallKind::MoveStorage { to } => match self.hv.move_storage(call.guest, to).await {
                Ok(moved) => CallOutcome::StorageMoved { moved },
                Err(e) => CallOutcome::Error { message: format!("{e}: {}", source_chain(&e)) },
            },
            AgentCallKind::Definition => match self.hv.definition(call.guest).await {
                Ok(config) => CallOutcome::Definition { spec: Box::new(config.spec) },
                Err(e) => CallOutcome::Error { message: format!("{e}: {}", source_chain(&e)) },
            },
            AgentCallKind::Snapshot { call: snapshot } => self.snapshot(call.guest, snapshot).await,
            AgentCallKind::Migrate { call: step } => self.migrate(call.id, call.guest, step).await,
            AgentCallKind::Interfaces => match self.hv.guest_interfaces(call.guest).await {
                Ok(list) => CallOutcome::Interfaces {
                    interfaces: list
                        .into_iter()
                        .map(|i| drove_api::GuestInterface { name: i.name, mac: i.mac, addresses: i.addresses })
                        .collect(),
                },
                Err(e) => CallOutcome::Error { message: format!("{e}: {}", source_chain(&e)) },
            },
        };
        if let Err(e) = self.client.post_result(&CallResult { id: call.id, outcome }).await {
            tracing::warn!(error = %e, call = call.id, "could not deliver a call result");
        }
    }
}

fn attachment<'a>(device: &'a str, nic: &'a NicSpec, limits: &ResourceLimits) -> NicAttachment<'a> {
    NicAttachment { device, vlan: nic.vlan, mac: &nic.mac, rate_bps: nic.effective_rate(limits) }
}

impl Agent {
    /// Runs one relayed step of a live migration.
    async fn migrate(&self, call_id: u64, guest: GuestId, step: MigrateCall) -> CallOutcome {
        let err = |e: &dyn std::error::Error| CallOutcome::Error { message: format!("{e}: {}", source_chain(e)) };
        match step {
            MigrateCall::Prepare { generation, spec, key } => {
                let Some(listen) = self.config.migration_address else {
                    return CallOutcome::Error {
                        message: format!(
                            "host {} has no migration address (drove agent --migration-address)",
                            self.config.name
                        ),
                    };
                };
                if let Err(e) = self.attach_nics(guest, &spec).await {
                    return err(&e);
                }
                let ports = (drove_net::cmd::free_port(listen), drove_net::cmd::free_port(listen));
                let (Ok(port), Ok(nbd_port)) = ports else {
                    return CallOutcome::Error { message: format!("no free port on migration address {listen}") };
                };
                let disks = drove_hypervisor::migration::DiskTransfer::for_storage(spec.storage);
                let config = GuestConfig { id: guest, generation, spec: *spec };
                let req = drove_hypervisor::migration::Incoming { listen, port, nbd_port, disks, key };
                match self.hv.migrate_incoming(&config, &req).await {
                    Ok(()) => CallOutcome::Prepared { listen, port, nbd_port },
                    Err(e) => err(&e),
                }
            }
            MigrateCall::Send { outgoing } => {
                // Progress goes to the manager as it comes, the latest only.
                let (tx, mut rx) = tokio::sync::watch::channel(None);
                let client = self.client.clone();
                let forward = tokio::spawn(async move {
                    while rx.changed().await.is_ok() {
                        let Some(progress) = *rx.borrow_and_update() else { continue };
                        let result = CallResult { id: call_id, outcome: CallOutcome::MigrationProgress { progress } };
                        let _ = client.post_result(&result).await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
                let report = |p| {
                    let _ = tx.send(Some(p));
                };
                let result = self.hv.migrate_out(guest, &outgoing, &report).await;
                drop(tx);
                let _ = forward.await;
                match result {
                    Ok(stats) => CallOutcome::Sent { stats },
                    Err(e) => err(&e),
                }
            }
            MigrateCall::Finish { await_console } => {
                match self.hv.migrate_finish(guest, Duration::from_secs(60), await_console).await {
                    Ok(done) => CallOutcome::Finished { done },
                    Err(e) => err(&e),
                }
            }
            MigrateCall::Cancel => match self.hv.migrate_cancel(guest).await {
                Ok(()) => CallOutcome::Done,
                Err(HvError::MigrationCompleted { .. }) => CallOutcome::MigrationCompleted,
                Err(e) => err(&e),
            },
            MigrateCall::Resume => match self.hv.resume(guest).await {
                Ok(()) => CallOutcome::Done,
                // Running already: a repeat.
                Err(HvError::InvalidState { state: RuntimeState::Running, .. }) => CallOutcome::Done,
                Err(e) => err(&e),
            },
            MigrateCall::Status => match self.hv.status(guest).await {
                Ok(s) => CallOutcome::GuestState { state: Some(to_observed(&s).state) },
                Err(HvError::NotFound { .. }) => CallOutcome::GuestState { state: None },
                Err(e) => err(&e),
            },
            MigrateCall::Discard { nics } => match self.discard(guest, nics as usize).await {
                Ok(()) => CallOutcome::Done,
                Err(e) => err(&e),
            },
        }
    }

    /// Runs a relayed snapshot action on the hypervisor.
    async fn snapshot(&self, guest: GuestId, call: drove_api::SnapshotCall) -> CallOutcome {
        use drove_api::{HostSnapshot, SnapshotCall};
        let host = |s: drove_hypervisor::SnapshotInfo| HostSnapshot {
            name: s.name,
            kind: s.kind,
            created_unix: s.created_unix,
            vm_state_size: s.vm_state_size,
        };
        let result = match call {
            SnapshotCall::Create { name, kind } => self
                .hv
                .snapshot_create(guest, &name, kind)
                .await
                .map(|s| CallOutcome::Snapshots { snapshots: vec![host(s)] }),
            SnapshotCall::List => self
                .hv
                .snapshot_list(guest)
                .await
                .map(|l| CallOutcome::Snapshots { snapshots: l.into_iter().map(host).collect() }),
            SnapshotCall::Delete { name } => self.hv.snapshot_delete(guest, &name).await.map(|()| CallOutcome::Done),
            SnapshotCall::Restore { name } => {
                self.hv.snapshot_restore(guest, &name).await.map(|outcome| CallOutcome::Restored { outcome })
            }
        };
        result.unwrap_or_else(|e| CallOutcome::Error { message: format!("{e}: {}", source_chain(&e)) })
    }
}

/// The manager's socket address, from its endpoint URL
/// (`http://host:port`).
async fn manager_address(endpoint: &str) -> Option<std::net::SocketAddr> {
    let rest = endpoint.split("://").nth(1).unwrap_or(endpoint);
    let authority = rest.split('/').next()?;
    let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    tokio::net::lookup_host(with_port).await.ok()?.next()
}

/// The causes of an error, joined, for one-line messages.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    if parts.is_empty() { "no further detail".into() } else { parts.join(": ") }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn desired(state: DesiredState, generation: u64) -> DesiredGuest {
        let guest = drove_hypervisor::sim::sample_guest(0);
        DesiredGuest {
            id: guest.id,
            generation,
            state,
            force_stop: false,
            restart_policy: RestartPolicy::Always,
            spec: guest.spec,
            migrating: false,
        }
    }

    fn status(d: &DesiredGuest, state: RuntimeState, generation: u64) -> GuestStatus {
        GuestStatus { id: d.id, state, generation, pid: None }
    }

    fn reading(pid: u32, started: u64, cpu_ms: u64) -> GuestUsage {
        GuestUsage {
            pid,
            started,
            cpu_ns: cpu_ms * 1_000_000,
            memory_bytes: 64 << 20,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            disk_read_bytes: 0,
            disk_written_bytes: 0,
        }
    }

    #[test]
    fn a_rate_needs_two_readings_of_the_same_process() {
        let id = GuestId::new_v4();
        let mut s = Sampler::default();
        let t0 = Instant::now();
        assert_eq!(s.take(id, reading(10, 1, 0), t0), None, "the first reading has nothing to compare with");
        let r = s.take(id, reading(10, 1, 1500), t0 + Duration::from_secs(2)).expect("a rate");
        assert!((r.cpu_millicores - 750.0).abs() < 1e-6, "{r:?}");
        assert_eq!(r.interval_ms, 2000);
        // Restarted: a new process, its counters from zero. No rate (not a
        // negative one), and the new reading is the next one's base.
        assert_eq!(s.take(id, reading(11, 9, 100), t0 + Duration::from_secs(4)), None);
        let r = s.take(id, reading(11, 9, 300), t0 + Duration::from_secs(5)).expect("a rate");
        assert!((r.cpu_millicores - 200.0).abs() < 1e-6, "{r:?}");
    }

    #[test]
    fn readings_come_at_most_every_interval_and_gone_guests_are_forgotten() {
        let (a, b) = (GuestId::new_v4(), GuestId::new_v4());
        let mut s = Sampler::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        assert!(s.due(a, t0, every), "never read: due");
        let _ = s.take(a, reading(1, 1, 0), t0);
        let _ = s.take(b, reading(2, 1, 0), t0);
        assert!(!s.due(a, t0 + Duration::from_secs(9), every));
        assert!(s.due(a, t0 + every, every));
        s.keep(&HashSet::from([b]));
        assert!(s.due(a, t0 + Duration::from_secs(1), every), "a forgotten guest starts afresh");
        assert!(!s.due(b, t0 + Duration::from_secs(1), every));
    }

    #[test]
    fn plans_converge_and_settle() {
        let d = desired(DesiredState::Running, 2);
        assert_eq!(plan(&d, None), Some(Action::Ensure { start: true }));
        assert_eq!(plan(&d, Some(&status(&d, RuntimeState::Crashed, 2))), Some(Action::Ensure { start: true }));
        assert_eq!(plan(&d, Some(&status(&d, RuntimeState::Running, 2))), None);
        assert_eq!(plan(&d, Some(&status(&d, RuntimeState::Running, 1))), Some(Action::Ensure { start: false }));
        let d = desired(DesiredState::Stopped, 1);
        assert_eq!(plan(&d, Some(&status(&d, RuntimeState::Running, 1))), Some(Action::Stop { force: false }));
        assert_eq!(plan(&d, Some(&status(&d, RuntimeState::Stopped, 1))), None);
        let d = desired(DesiredState::Absent, 3);
        assert_eq!(plan(&d, Some(&status(&d, RuntimeState::Running, 1))), Some(Action::Destroy));
        assert_eq!(plan(&d, None), Some(Action::ConfirmAbsent));
    }
}
