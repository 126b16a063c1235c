//! The trace simulator behind `drove sim`: replays recorded workload traces
//! (shared/data/planetlab) through a placement policy in simulated time and
//! reports energy, SLA violations (SLATAH, PDM, SLAV, ESV) and migrations.
//!
//! ```text
//!  trace dir ──load──► Trace ──► Scenario (hosts, VMs, model) ──► run(policy)
//!                                                                   │
//!      every interval: VMs take their new demand ─► policy decides ─┤
//!      inside it: migrations finish, hosts wake, books are kept  ◄──┘
//!                                                                   ▼
//!                                                                Report
//! ```
//!
//! The default policy, [`policy::drove`], decides with the same placement
//! engine as the live manager (`drove-placement`: [`drove_placement::rebalance`]
//! for hot hosts, [`drove_placement::consolidate`] for power); the classic
//! baselines of the literature ([`policy::baseline`]: no power management,
//! DVFS, THR/IQR/MAD/LR with MMT) run on the same world for comparison.
//!
//! Only [`trace`] touches the file system; the rest is pure and
//! deterministic: the same inputs give the same figures.

pub mod bench;
pub mod metrics;
pub mod policy;
pub mod scenario;
pub mod trace;
pub mod world;

pub use metrics::Report;
pub use policy::{Policy, UnknownPolicy, by_name};
pub use scenario::{HostDef, Model, ModelKind, Scenario, ScenarioError, VmDef};
pub use trace::{Trace, TraceError, load_dir};
pub use world::{Accounting, Action, ActionError, View, World};

/// A run stopped because the policy asked for something impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("policy {policy}: initial placement")]
    Initial {
        policy: String,
        #[source]
        source: ActionError,
    },
    #[error("policy {policy} in interval {slot}: {action:?}")]
    Action {
        policy: String,
        slot: usize,
        action: Action,
        #[source]
        source: ActionError,
    },
}

/// Simulate `scenario` under `policy`. `progress(done, total)` is called
/// after every interval.
pub fn run(
    scenario: &Scenario,
    policy: &mut dyn Policy,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report, SimError> {
    let started = std::time::Instant::now();
    let mut world = World::new(scenario, policy.accounting());
    let intervals = scenario.model.intervals;
    let lag = scenario.model.observe_lag;
    let mut observed = vec![0.0; scenario.vms.len()];
    for slot in 0..intervals {
        let t0 = slot as f64 * scenario.interval_secs;
        world.begin_interval(slot);
        for (vm, o) in observed.iter_mut().enumerate() {
            // With a lag, the first intervals are known only by the VMs'
            // declared size.
            *o = if slot >= lag { scenario.demand_mips(vm, slot - lag) } else { f64::from(scenario.vms[vm].mips) };
        }
        if slot == 0 {
            let hosts = policy.initial(&world.view(slot, &observed));
            world.place_initial(&hosts).map_err(|source| SimError::Initial { policy: policy.name(), source })?;
        } else {
            let actions = policy.decide(&world.view(slot, &observed));
            for action in actions {
                world.apply(action).map_err(|source| SimError::Action {
                    policy: policy.name(),
                    slot,
                    action,
                    source,
                })?;
            }
        }
        world.run_until(t0 + scenario.interval_secs);
        progress(slot + 1, intervals);
    }
    Ok(report(scenario, &world, policy.name(), started.elapsed().as_secs_f64()))
}

fn report(sc: &Scenario, w: &World<'_>, policy: String, wall_secs: f64) -> Report {
    let energy_j: f64 = w.books.iter().map(|b| b.energy_j).sum();
    let overload: f64 = w.books.iter().map(|b| b.overload_s).sum();
    let active: f64 = w.books.iter().map(|b| b.active_s).sum();
    let slatah = metrics::slatah(overload, active);
    let pdm = metrics::pdm(w.degraded_mips_s, w.requested_mips_s);
    let slav = metrics::slav(slatah, pdm);
    let energy_kwh = metrics::kwh(energy_j);
    let samples = &w.active_host_samples;
    Report {
        policy,
        model: sc.model.kind,
        trace: sc.source.clone(),
        hosts: sc.hosts.len(),
        vms: sc.vms.len(),
        simulated_secs: w.time(),
        energy_kwh,
        slatah_pct: slatah * 100.0,
        pdm_pct: pdm * 100.0,
        slav_pct: slav * 100.0,
        esv: metrics::esv(energy_kwh, slav),
        migrations: w.migrations_started,
        mean_active_hosts: samples.iter().sum::<usize>() as f64 / samples.len().max(1) as f64,
        max_active_hosts: samples.iter().copied().max().unwrap_or(0),
        slatah_mean_per_host_pct: 100.0 * metrics::mean_ratio(w.books.iter().map(|b| (b.overload_s, b.active_s))),
        pdm_mean_per_vm_pct: 100.0
            * metrics::mean_ratio(w.vm_degraded.iter().copied().zip(w.vm_requested.iter().copied())),
        wall_secs,
    }
}
