//! The metric formulas checked against hand-computed values on tiny
//! synthetic data centres (no trace files needed).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use drove_placement::PowerModel;
use drove_sim::world::View;
use drove_sim::{Action, HostDef, Model, ModelKind, Policy, Report, Scenario, SimError, VmDef};

/// 100 W idle, 200 W busy, linear; 5 W in standby.
fn power() -> PowerModel {
    PowerModel::spec_power(std::array::from_fn(|i| 100.0 + 10.0 * i as f64), 5.0).unwrap()
}

/// 2 cores × 1000 MIPS, 1 Gbit/s (so migrations copy at 500 Mbit/s).
fn host(i: usize) -> HostDef {
    HostDef { name: format!("h{i}"), cores: 2, core_mips: 1000, ram_mb: 1024, bw_mbps: 1000, power: power() }
}

fn vm(i: usize, mips: u32, ram_mb: u32) -> VmDef {
    VmDef { name: format!("vm{i}"), vcpus: 1, mips, ram_mb, bw_mbps: 100 }
}

/// A policy that does what the test says, and remembers what it saw.
#[derive(Debug, Default)]
struct Scripted {
    initial: Vec<usize>,
    at: HashMap<usize, Vec<Action>>,
    seen: Vec<Vec<f64>>,
}

impl Policy for Scripted {
    fn name(&self) -> String {
        "scripted".to_owned()
    }
    fn initial(&mut self, view: &View<'_>) -> Vec<usize> {
        self.seen.push(view.observed.to_vec());
        self.initial.clone()
    }
    fn decide(&mut self, view: &View<'_>) -> Vec<Action> {
        self.seen.push(view.observed.to_vec());
        self.at.remove(&view.slot).unwrap_or_default()
    }
}

fn run(sc: &Scenario, p: &mut Scripted) -> Report {
    drove_sim::run(sc, p, &mut |_, _| {}).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

const J_PER_KWH: f64 = 3.6e6;

#[test]
fn energy_and_slatah_without_migrations() {
    // 4 samples = 3 intervals of 300 s in the reference model.
    let sc = Scenario::new(
        "synthetic".into(),
        vec![host(0)],
        vec![vm(0, 1000, 100), vm(1, 1000, 100)],
        vec![vec![50, 100, 100, 0], vec![50, 100, 0, 0]],
        300.0,
        Model::reference(4),
    )
    .unwrap();
    let r = run(&sc, &mut Scripted { initial: vec![0, 0], ..Default::default() });
    // 1000 MIPS (150 W), 2000 MIPS (200 W, at 100 %: overloaded), 1000 MIPS.
    let joules = 150.0 * 300.0 + 200.0 * 300.0 + 150.0 * 300.0;
    assert!(close(r.energy_kwh, joules / J_PER_KWH), "{}", r.energy_kwh);
    assert!(close(r.slatah_pct, 100.0 * 300.0 / 900.0), "{}", r.slatah_pct);
    assert_eq!(r.pdm_pct, 0.0);
    assert_eq!(r.slav_pct, 0.0);
    assert_eq!(r.migrations, 0);
    assert_eq!(r.simulated_secs, 900.0);
}

#[test]
fn a_migration_loads_both_hosts_and_costs_ten_percent_of_the_vm() {
    // vm0 (1000 MIPS, 625 MB: 625 × 8 / 500 = 10 s to copy) moves at 300 s.
    let sc = Scenario::new(
        "synthetic".into(),
        vec![host(0), host(1)],
        vec![vm(0, 1000, 625), vm(1, 1000, 100)],
        vec![vec![100, 100, 100], vec![50, 50, 50]],
        300.0,
        Model::reference(3),
    )
    .unwrap();
    let mut p = Scripted { initial: vec![0, 0], ..Default::default() };
    p.at.insert(1, vec![Action::Migrate { vm: 0, to: 1 }]);
    let r = run(&sc, &mut p);
    let joules = 175.0 * 300.0 // h0 at 1500 MIPS
        + 175.0 * 10.0 + 150.0 * 10.0 // both carry vm0 while it copies
        + 125.0 * 290.0 + 150.0 * 290.0; // after: h0 500 MIPS, h1 1000 MIPS
    assert!(close(r.energy_kwh, joules / J_PER_KWH), "{} vs {}", r.energy_kwh, joules / J_PER_KWH);
    let requested = 1500.0 * 600.0;
    let lost = 0.1 * 1000.0 * 10.0;
    assert!(close(r.pdm_pct, 100.0 * lost / requested), "{}", r.pdm_pct);
    // The papers' per-VM mean: vm0 lost 1000 of 600,000, vm1 nothing.
    assert!(close(r.pdm_mean_per_vm_pct, 100.0 * (1000.0 / 600_000.0) / 2.0), "{}", r.pdm_mean_per_vm_pct);
    assert_eq!(r.slatah_pct, 0.0);
    assert_eq!(r.migrations, 1);
}

#[test]
fn overload_counts_until_the_migration_relieves_the_host() {
    let sc = Scenario::new(
        "synthetic".into(),
        vec![host(0), host(1)],
        vec![vm(0, 1000, 625), vm(1, 1500, 100)],
        vec![vec![100, 100, 100], vec![50, 100, 100]],
        300.0,
        Model::reference(3),
    )
    .unwrap();
    let mut p = Scripted { initial: vec![0, 0], ..Default::default() };
    p.at.insert(1, vec![Action::Migrate { vm: 0, to: 1 }]);
    let r = run(&sc, &mut p);
    // Interval 0: 1750 MIPS. Interval 1: 2500 MIPS on h0 (overloaded, full
    // power) for the 10 s of the copy, then 1500; h1 1000 from 300 s.
    let joules = 187.5 * 300.0 + 200.0 * 10.0 + 150.0 * 10.0 + 175.0 * 290.0 + 150.0 * 290.0;
    assert!(close(r.energy_kwh, joules / J_PER_KWH), "{}", r.energy_kwh);
    let active = 600.0 + 300.0;
    assert!(close(r.slatah_pct, 100.0 * 10.0 / active), "{}", r.slatah_pct);
    let pdm = 0.1 * 1000.0 * 10.0 / (1750.0 * 300.0 + 2500.0 * 300.0);
    assert!(close(r.pdm_pct, 100.0 * pdm), "{}", r.pdm_pct);
    assert!(close(r.slav_pct, 100.0 * (10.0 / active) * pdm), "{}", r.slav_pct);
    assert!(close(r.esv, r.energy_kwh * (10.0 / active) * pdm), "{}", r.esv);
    // Per host: h0 10 s of 600, h1 none of 300.
    assert!(close(r.slatah_mean_per_host_pct, 100.0 * (10.0 / 600.0) / 2.0), "{}", r.slatah_mean_per_host_pct);
}

#[test]
fn realistic_model_wakes_hosts_slowly_and_reports_the_past() {
    // Every sample is an interval; hosts wake in 120 s; standby draws 5 W.
    let model = Model::realistic(2);
    assert_eq!((model.kind, model.intervals, model.wake_secs, model.observe_lag), (ModelKind::Realistic, 2, 120.0, 1));
    let sc = Scenario::new(
        "synthetic".into(),
        vec![host(0), host(1)],
        vec![vm(0, 1000, 625), vm(1, 1000, 100)],
        vec![vec![100, 100], vec![50, 50]],
        300.0,
        model,
    )
    .unwrap();
    let mut p = Scripted { initial: vec![0, 0], ..Default::default() };
    p.at.insert(1, vec![Action::Migrate { vm: 0, to: 1 }]);
    let r = run(&sc, &mut p);
    // Nothing measured before the first interval: the declared sizes; then
    // the interval that just ended.
    assert_eq!(p.seen, vec![vec![1000.0, 1000.0], vec![1000.0, 500.0]]);
    let h0 = 175.0 * 300.0 + 175.0 * 130.0 + 125.0 * 170.0;
    // h1: standby, then waking at idle power (not active), then the copy
    // (10 s) and vm0.
    let h1 = 5.0 * 300.0 + 100.0 * 120.0 + 150.0 * 10.0 + 150.0 * 170.0;
    assert!(close(r.energy_kwh, (h0 + h1) / J_PER_KWH), "{} vs {}", r.energy_kwh, (h0 + h1) / J_PER_KWH);
    assert!(close(r.pdm_pct, 100.0 * (0.1 * 1000.0 * 10.0) / (1500.0 * 600.0)), "{}", r.pdm_pct);
    assert_eq!(r.simulated_secs, 600.0);
}

#[test]
fn realistic_model_shares_migration_bandwidth() {
    // Two 500 MB VMs leave h0 at once: each gets half of h0's 500 Mbit/s,
    // so both take 16 s instead of 8.
    let sc = Scenario::new(
        "synthetic".into(),
        vec![host(0), host(1), host(2)],
        vec![vm(0, 1000, 500), vm(1, 1000, 500)],
        vec![vec![100, 100, 100], vec![100, 100, 100]],
        300.0,
        Model { wake_secs: 0.0, ..Model::realistic(3) },
    )
    .unwrap();
    let mut p = Scripted { initial: vec![0, 0], ..Default::default() };
    p.at.insert(1, vec![Action::Migrate { vm: 0, to: 1 }, Action::Migrate { vm: 1, to: 2 }]);
    let r = run(&sc, &mut p);
    let requested = 2000.0 * 900.0;
    assert!(close(r.pdm_pct, 100.0 * (2.0 * 0.1 * 1000.0 * 16.0) / requested), "{}", r.pdm_pct);
}

#[test]
fn impossible_actions_stop_the_run_with_a_reason() {
    let sc = Scenario::new(
        "synthetic".into(),
        vec![host(0), host(1)],
        vec![vm(0, 1000, 700), vm(1, 1000, 700)],
        vec![vec![10, 10, 10], vec![10, 10, 10]],
        300.0,
        Model::realistic(3),
    )
    .unwrap();
    // Memory counts in every model at the first placement: 1400 MB > 1024.
    let err = drove_sim::run(&sc, &mut Scripted { initial: vec![0, 0], ..Default::default() }, &mut |_, _| {})
        .expect_err("memory is enforced at first placement");
    assert!(matches!(err, SimError::Initial { .. }), "{err}");
    let mut p = Scripted { initial: vec![0, 1], ..Default::default() };
    p.at.insert(1, vec![Action::Migrate { vm: 0, to: 1 }]);
    let err = drove_sim::run(&sc, &mut p, &mut |_, _| {}).expect_err("host 1 has no memory left for vm0");
    assert_eq!(
        err.to_string(),
        "policy scripted in interval 1: Migrate { vm: 0, to: 1 }",
        "the cause is in the source chain"
    );
    let cause = std::error::Error::source(&err).map(ToString::to_string);
    assert_eq!(cause.as_deref(), Some("host 1 has 324 MB of memory free, VM 0 needs 700 MB"));
}
