//! The recorded PlanetLab traces, end to end: loading, the no-power-
//! management baseline against CloudSim's published figure, and the drove
//! policy against the targets of issue 8 on both days.
//!
//! The traces live in shared/data/planetlab next to the repository (set
//! DROVE_TRACE_DIR to the `planetlab` directory elsewhere). A missing
//! directory fails these tests: they are not skipped silently.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use drove_sim::{ModelKind, Report, Scenario, Trace};

fn trace_dir() -> PathBuf {
    let dir = match std::env::var_os("DROVE_TRACE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/planetlab"),
    };
    assert!(
        dir.is_dir(),
        "trace directory {} is missing: these tests need the PlanetLab traces (shared/data/planetlab); \
         set DROVE_TRACE_DIR to their location",
        dir.display()
    );
    dir
}

fn load(day: &str) -> Trace {
    drove_sim::load_dir(&trace_dir().join(day)).unwrap()
}

fn simulate(trace: &Trace, policy: &str, kind: ModelKind) -> Report {
    let sc = Scenario::planetlab(trace, 800, kind).unwrap();
    let mut p = drove_sim::by_name(policy).unwrap();
    drove_sim::run(&sc, p.as_mut(), &mut |_, _| {}).unwrap()
}

#[test]
fn both_days_load_completely() {
    for (day, vms) in [("20110303", 1052), ("20110306", 898)] {
        let t = load(day);
        assert_eq!((t.vms(), t.len()), (vms, 288), "{day}");
        assert!(t.names.iter().any(|n| n.contains(' ')), "{day}: names with spaces are kept");
        assert!(t.samples.iter().flatten().all(|&v| v <= 100));
    }
}

#[test]
fn no_power_management_matches_cloudsim_exactly() {
    // 800 hosts at peak power (400 × 117 W + 400 × 135 W) over 86,100 s.
    let r = simulate(&load("20110303"), "npa", ModelKind::Reference);
    assert!((r.energy_kwh - 2410.80).abs() < 0.005, "{}", r.energy_kwh);
    assert_eq!(r.migrations, 0);
}

#[test]
fn drove_policy_meets_the_targets_on_both_days() {
    for day in ["20110303", "20110306"] {
        let r = simulate(&load(day), "drove", ModelKind::Reference);
        eprintln!(
            "{day}: {:.2} kWh, SLATAH {:.3} %, PDM {:.4} %, SLAV {:.6} %, {} migrations",
            r.energy_kwh, r.slatah_pct, r.pdm_pct, r.slav_pct, r.migrations
        );
        assert!(r.energy_kwh <= 168.0, "{day}: {} kWh", r.energy_kwh);
        assert!(r.slav_pct <= 0.0035, "{day}: SLAV {} %", r.slav_pct);
        assert!(r.migrations <= 5000, "{day}: {} migrations", r.migrations);
    }
}

#[test]
fn drove_policy_beats_the_best_baseline_on_the_realistic_model() {
    let t = load("20110303");
    let drove = simulate(&t, "drove", ModelKind::Realistic);
    let thr = simulate(&t, "thr-mmt:0.8", ModelKind::Realistic);
    assert!(drove.energy_kwh < thr.energy_kwh, "drove {} kWh, thr-mmt {} kWh", drove.energy_kwh, thr.energy_kwh);
    assert!(drove.migrations < thr.migrations);
}
