//! The figures a run reports, defined as in shared/data/README.md (and
//! docs/adr/0004-sim-metrics.md for the interpretation):
//!
//! - energy: the hosts' wall power integrated over the simulated time, kWh;
//! - SLATAH: the share of active host time during which a host's CPU
//!   demand is at or above its capacity (the host runs at 100 %), summed
//!   over all hosts: Σ overload time / Σ active time;
//! - PDM: the CPU lost to migrations (10 % of a VM's demand while it
//!   migrates) as a share of all CPU the VMs asked for:
//!   Σ lost MIPS·s / Σ requested MIPS·s;
//! - SLAV = SLATAH × PDM; ESV = energy (kWh) × SLAV (a fraction);
//! - migrations: how many were started.
//!
//! The papers also define SLATAH and PDM as means over hosts and VMs; those
//! are reported too (`*_mean_*`), the headline ones are the aggregates the
//! reference figures were computed with.

use serde::Serialize;

use crate::scenario::ModelKind;

/// Σ overload time / Σ active time (0 when no host was ever active).
pub fn slatah(overload_s: f64, active_s: f64) -> f64 {
    if active_s > 0.0 { overload_s / active_s } else { 0.0 }
}

/// Σ CPU lost to migrations / Σ CPU requested (0 when nothing was asked).
pub fn pdm(degraded_mips_s: f64, requested_mips_s: f64) -> f64 {
    if requested_mips_s > 0.0 { degraded_mips_s / requested_mips_s } else { 0.0 }
}

pub fn slav(slatah: f64, pdm: f64) -> f64 {
    slatah * pdm
}

pub fn esv(energy_kwh: f64, slav: f64) -> f64 {
    energy_kwh * slav
}

pub fn kwh(joules: f64) -> f64 {
    joules / 3.6e6
}

/// Mean of `num/den` over the pairs whose `den` is positive.
pub fn mean_ratio(pairs: impl Iterator<Item = (f64, f64)>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (num, den) in pairs {
        if den > 0.0 {
            sum += num / den;
            n += 1;
        }
    }
    if n > 0 { sum / n as f64 } else { 0.0 }
}

/// What one run of one policy measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub policy: String,
    pub model: ModelKind,
    pub trace: String,
    pub hosts: usize,
    pub vms: usize,
    pub simulated_secs: f64,
    pub energy_kwh: f64,
    pub slatah_pct: f64,
    pub pdm_pct: f64,
    pub slav_pct: f64,
    /// energy (kWh) × SLAV (fraction)
    pub esv: f64,
    pub migrations: u64,
    /// Hosts active at the end of an interval, averaged over the day.
    pub mean_active_hosts: f64,
    pub max_active_hosts: usize,
    /// The per-host mean of SLATAH (the papers' formula), percent.
    pub slatah_mean_per_host_pct: f64,
    /// The per-VM mean of PDM (the papers' formula), percent.
    pub pdm_mean_per_vm_pct: f64,
    /// Seconds of wall time the simulation took (trace loading excluded).
    pub wall_secs: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_combine_as_defined() {
        assert_eq!(slatah(30.0, 600.0), 0.05);
        assert_eq!(slatah(0.0, 0.0), 0.0);
        assert_eq!(pdm(7.0, 10_000.0), 0.0007);
        assert!((slav(0.05, 0.0007) - 0.000035).abs() < 1e-15);
        assert!((esv(200.0, 0.000035) - 0.007).abs() < 1e-12);
        assert_eq!(kwh(3.6e6), 1.0);
        assert_eq!(mean_ratio([(1.0, 2.0), (5.0, 0.0), (1.0, 4.0)].into_iter()), 0.375);
    }
}
