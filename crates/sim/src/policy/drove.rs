//! drove's own policy: the placement engine of the live manager, fed with
//! what monitoring knows, every interval.
//!
//! Each VM's next-interval CPU is modelled as its last observed value plus
//! a random jump whose variance is measured from its recent history (an
//! hour of samples, shrunk towards the jumpiness of all VMs so far). The
//! engine packs hosts so that the summed demand plus `sigmas` standard
//! deviations of the summed jumps fits: independent jumps partly cancel, so
//! a host of twenty noisy VMs needs far less headroom than twenty times one
//! VM's. Each interval:
//!
//! 1. [`drove_placement::rebalance`] relieves hot hosts (demand above
//!    capacity), cheapest migration first, onto hosts that stay within the
//!    target margin, waking the most efficient standby host if none can;
//! 2. [`drove_placement::consolidate`] empties the lightest hosts whose VMs
//!    all fit elsewhere under a stricter margin, and puts them to standby;
//! 3. in the realistic model, [`drove_placement::wake_for_demand`] wakes
//!    hosts ahead of need, since waking takes minutes.
//!
//! Hysteresis (hot at the capacity, filled only to the margin, emptied only
//! when light) and a cool-down on VMs that just moved keep it from
//! thrashing. Nothing in it looks at the future of the trace.

use drove_placement::{
    BalanceParams, Cluster, ConsolidateParams, GuestSpec, History, HostIx, HostSpec, Limits, Mobility, PowerState,
    Profile, Resources, Strategy, consolidate, place_all, rebalance, wake_for_demand,
};

use crate::policy::Policy;
use crate::world::{Action, View};

/// The knobs of the drove policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DroveParams {
    /// Samples of history used to measure a VM's jumps.
    pub window: usize,
    /// The pooled jumpiness of all VMs counts as this many samples.
    pub prior_weight: f64,
    /// A host is hot above this share of its CPU plus `hot_sigmas`.
    pub hot_share: f64,
    pub hot_sigmas: f64,
    /// Receivers of a migration are filled up to this share with this
    /// many standard deviations of margin.
    pub target_share: f64,
    pub target_sigmas: f64,
    /// Receivers of a consolidation: stricter, so that consolidating does
    /// not make the next hot host.
    pub consolidate_share: f64,
    pub consolidate_sigmas: f64,
    /// Only hosts below this pressure (relative to the consolidation
    /// limits) are emptied.
    pub consolidate_below: f64,
    /// Migrations per interval.
    pub max_moves: usize,
    /// Intervals a VM that moved stays reluctant to move again.
    pub cooldown: usize,
    /// Realistic model: keep this much more CPU on (or waking) than the
    /// VMs are predicted to need.
    pub spare: f64,
}

impl Default for DroveParams {
    fn default() -> Self {
        DroveParams {
            window: 12,
            prior_weight: 6.0,
            hot_share: 1.0,
            hot_sigmas: 0.0,
            target_share: 1.0,
            target_sigmas: 1.5,
            consolidate_share: 1.0,
            consolidate_sigmas: 2.0,
            consolidate_below: 0.7,
            max_moves: 2000,
            cooldown: 12,
            spare: 0.1,
        }
    }
}

/// The drove policy.
#[derive(Debug, Clone)]
pub struct Drove {
    p: DroveParams,
    hist: Vec<History>,
    /// Interval of each VM's last move.
    moved_at: Vec<Option<usize>>,
    /// Pooled squared one-step changes relative to VM MIPS², and count.
    pooled: (f64, f64),
}

impl Default for Drove {
    fn default() -> Self {
        Drove::new(DroveParams::default())
    }
}

/// Relative jump variance assumed before anything was observed (a jump of
/// 10 % of the VM's MIPS).
const PRIOR_REL_VAR: f64 = 0.01;

/// A VM never measured is planned at half its declared CPU (a 2:1 vCPU
/// overcommit, as operators admit unknown guests) and without a jump
/// margin: how much it jumps is learnt from its first reports.
const UNSEEN_CPU_SHARE: f64 = 0.5;

impl Drove {
    pub fn new(p: DroveParams) -> Self {
        Drove { p, hist: Vec::new(), moved_at: Vec::new(), pooled: (0.0, 0.0) }
    }

    fn observe(&mut self, view: &View<'_>) {
        let sc = view.scenario;
        if self.hist.len() != sc.vms.len() {
            self.hist = vec![History::new(self.p.window); sc.vms.len()];
            self.moved_at = vec![None; sc.vms.len()];
        }
        for (vm, h) in self.hist.iter_mut().enumerate() {
            let v = view.observed[vm];
            if let Some(last) = h.last() {
                let rel = (v - last) / f64::from(sc.vms[vm].mips);
                self.pooled.0 += rel * rel;
                self.pooled.1 += 1.0;
            }
            h.push(v);
        }
    }

    fn prior_rel_var(&self) -> f64 {
        if self.pooled.1 > 0.0 { self.pooled.0 / self.pooled.1 } else { PRIOR_REL_VAR }
    }

    /// The engine's view: one time slot (the next interval), CPU with its
    /// jump variance, memory where the model counts it.
    fn cluster(&self, view: &View<'_>, initial: bool) -> Cluster {
        let sc = view.scenario;
        let memory = initial || sc.model.memory_always;
        let mut c = Cluster::new(1).expect("one slot is a valid cluster");
        let reference = sc.model.kind == crate::ModelKind::Reference;
        // Memory the world holds for VMs the engine sees elsewhere (the
        // source of an unfinished migration): keep it off the capacity.
        let mut ram_seen = vec![0u32; sc.hosts.len()];
        for vm in 0..sc.vms.len() {
            if let Some(h) = self.engine_host(view, vm) {
                ram_seen[h] += sc.vms[vm].ram_mb;
            }
        }
        for (h, host) in sc.hosts.iter().enumerate() {
            let state = if initial {
                PowerState::On
            } else if reference {
                if view.host_vms[h].is_empty() && view.host_incoming[h].is_empty() {
                    PowerState::Standby
                } else {
                    PowerState::On
                }
            } else {
                view.host_state[h]
            };
            let hidden = if memory && !initial { view.host_ram[h].saturating_sub(ram_seen[h]) } else { 0 };
            let spec = HostSpec {
                name: host.name.clone(),
                capacity: Resources::new(host.mips(), host.ram_mb.saturating_sub(hidden), 0, 0),
                core_speed: host.core_mips,
                power: host.power,
                state,
                schedulable: true,
            };
            c.add_host(spec).expect("host capacities are far below the engine's limit");
        }
        let prior = self.prior_rel_var();
        // Monitoring has not reported yet (realistic model, first
        // interval): only the declared size is known.
        let unseen = view.slot < sc.model.observe_lag;
        for (vm, def) in sc.vms.iter().enumerate() {
            let mips2 = f64::from(def.mips).powi(2);
            let (cpu, var) = if unseen {
                (UNSEEN_CPU_SHARE * f64::from(def.mips), 0.0)
            } else {
                let var = match self.hist.get(vm) {
                    Some(h) => h.step_variance_with_prior(prior * mips2, self.p.prior_weight),
                    None => prior * mips2,
                };
                (view.observed[vm], var)
            };
            let cpu = cpu.max(0.0).ceil() as u32;
            let mem = if memory { def.ram_mb } else { 0 };
            let demand = Profile::flat(Resources::new(cpu, mem, 0, 0), 1)
                .and_then(|p| p.with_cpu_variance(vec![var.round().min(f64::from(u32::MAX)) as u32]))
                .expect("a one-slot profile with one variance");
            let mobility = if view.vm_migrating[vm] {
                Mobility::Pinned
            } else if self.moved_at.get(vm).copied().flatten().is_some_and(|t| view.slot < t + self.p.cooldown) {
                Mobility::Reluctant
            } else {
                Mobility::Free
            };
            let spec = GuestSpec {
                name: def.name.clone(),
                demand,
                vcpus: def.vcpus,
                migration_mib: def.ram_mb,
                anti_affinity: None,
                tier: None,
                priority: 0,
                mobility,
            };
            let on = if initial { None } else { self.engine_host(view, vm).map(|h| HostIx(h as u32)) };
            c.add_guest(spec, on).expect("profiles have the cluster's one slot");
        }
        c
    }

    /// Where the engine considers a VM to be: a migrating VM already at its
    /// target.
    fn engine_host(&self, view: &View<'_>, vm: usize) -> Option<usize> {
        if view.vm_migrating[vm]
            && let Some(h) = view.host_incoming.iter().position(|inc| inc.contains(&vm))
        {
            return Some(h);
        }
        view.vm_host[vm]
    }

    fn limits(&self, share: f64, sigmas: f64) -> Limits {
        Limits::FULL.with_cpu(share, sigmas)
    }
}

impl Policy for Drove {
    fn name(&self) -> String {
        "drove".to_owned()
    }

    fn initial(&mut self, view: &View<'_>) -> Vec<usize> {
        self.observe(view);
        let mut c = self.cluster(view, true);
        let all: Vec<_> = c.guests().collect();
        let target = self.limits(self.p.target_share, self.p.target_sigmas);
        let plan = place_all(&mut c, &all, &target, Strategy::MostPacked);
        if !plan.unplaced.is_empty() {
            // CPU is no hard limit at the start (nothing has run yet):
            // whatever did not fit with margin goes where memory allows.
            let rest: Vec<_> = plan.unplaced.iter().map(|(g, _)| *g).collect();
            place_all(&mut c, &rest, &Limits::FULL.with_cpu(f64::from(u32::MAX), 0.0), Strategy::MostPacked);
        }
        c.guests().map(|g| c.host_of(g).map_or(0, |h| h.index())).collect()
    }

    fn decide(&mut self, view: &View<'_>) -> Vec<Action> {
        self.observe(view);
        let sc = view.scenario;
        let mut c = self.cluster(view, false);
        let hot = self.limits(self.p.hot_share, self.p.hot_sigmas);
        let target = self.limits(self.p.target_share, self.p.target_sigmas);
        let cons = self.limits(self.p.consolidate_share, self.p.consolidate_sigmas);
        let mut actions = Vec::new();

        let bal = rebalance(
            &c,
            &BalanceParams {
                hot,
                target,
                strategy: Strategy::MostPacked,
                max_moves: self.p.max_moves,
                imbalance: None,
                allow_wake: true,
            },
        );
        for &h in &bal.wake {
            c.set_power_state(h, PowerState::On);
            actions.push(Action::Wake { host: h.index() });
        }
        for m in &bal.moves {
            c.move_guest(m.guest, m.to);
            c.set_mobility(m.guest, Mobility::Reluctant);
        }

        let plan = consolidate(
            &c,
            &ConsolidateParams {
                target: cons,
                below: self.p.consolidate_below,
                max_moves: self.p.max_moves.saturating_sub(bal.moves.len()),
                max_hosts: usize::MAX,
                min_on: 1,
            },
        );
        for m in &plan.moves {
            c.move_guest(m.guest, m.to);
        }
        for &h in &plan.standby {
            c.set_power_state(h, PowerState::Standby);
        }
        for m in bal.moves.iter().chain(&plan.moves) {
            actions.push(Action::Migrate { vm: m.guest.index(), to: m.to.index() });
            self.moved_at[m.guest.index()] = Some(view.slot);
        }
        if sc.model.kind == crate::ModelKind::Realistic {
            for &h in &plan.standby {
                actions.push(Action::Standby { host: h.index() });
            }
            // Wake ahead: the VMs' demand with its margin, plus spare.
            let total: f64 = view.observed.iter().sum();
            let var: f64 = c.guests().map(|g| f64::from(c.demand_variance(g, 0))).sum();
            let need = (total + self.p.target_sigmas * var.sqrt()) * (1.0 + self.p.spare);
            for h in wake_for_demand(&c, need, &target) {
                actions.push(Action::Wake { host: h.index() });
            }
        }
        actions
    }
}
