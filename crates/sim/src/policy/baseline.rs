//! The classic baselines, re-implemented after CloudSim 3.0.3's power
//! package so that anyone can compare policies side by side on the same
//! world and the same books:
//!
//! - `npa`: no power management; every host draws its peak power all day.
//! - `dvfs`: power follows load, VMs never move.
//! - `thr-mmt`, `iqr-mmt`, `mad-mmt`, `lr-mmt`: every interval, find the
//!   overloaded hosts (a static threshold; 1 − s × the interquartile range
//!   or the median absolute deviation of the host's recent utilisation; or
//!   a linear regression over the last ten values predicting the next, × s),
//!   move VMs off them smallest memory first (minimum migration time) until
//!   they are not overloaded, place those VMs where power rises least
//!   (PABFD), then try to empty the least utilised hosts one after another
//!   onto the others. The first 12 (10 for LR) intervals, without enough
//!   history, use a static threshold of 0.7, as CloudSim does.
//!
//! Both initial placements are CloudSim's: first fit by the VMs' full MIPS,
//! memory and bandwidth for `npa`/`dvfs`; for the migrating policies the
//! host where the VM's full MIPS raise power least.

use std::cmp::Ordering;

use crate::policy::Policy;
use crate::scenario::Scenario;
use crate::world::{Accounting, Action, View};

/// Utilisation samples kept per VM (CloudSim's `HISTORY_LENGTH`).
const HISTORY: usize = 30;

/// How overload is detected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Detector {
    /// Static threshold on utilisation.
    Thr(f64),
    /// 1 − s × interquartile range of the host's history.
    Iqr(f64),
    /// 1 − s × median absolute deviation of the host's history.
    Mad(f64),
    /// Local regression: predicted utilisation × s ≥ 1.
    Lr(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Npa,
    Dvfs,
    Migrating(Detector),
}

/// One of the classic policies.
#[derive(Debug, Clone)]
pub struct Classic {
    kind: Kind,
    /// Per VM: utilisation (fraction of its MIPS), newest first.
    hist: Vec<Vec<f64>>,
}

impl Classic {
    pub fn npa() -> Self {
        Classic { kind: Kind::Npa, hist: Vec::new() }
    }

    pub fn dvfs() -> Self {
        Classic { kind: Kind::Dvfs, hist: Vec::new() }
    }

    pub fn migrating(detector: Detector) -> Self {
        Classic { kind: Kind::Migrating(detector), hist: Vec::new() }
    }

    fn observe(&mut self, view: &View<'_>) {
        let sc = view.scenario;
        if self.hist.len() != sc.vms.len() {
            self.hist = vec![Vec::with_capacity(HISTORY); sc.vms.len()];
        }
        for (vm, h) in self.hist.iter_mut().enumerate() {
            h.insert(0, view.observed[vm] / f64::from(sc.vms[vm].mips));
            h.truncate(HISTORY);
        }
    }
}

impl Policy for Classic {
    fn name(&self) -> String {
        match self.kind {
            Kind::Npa => "npa".to_owned(),
            Kind::Dvfs => "dvfs".to_owned(),
            Kind::Migrating(Detector::Thr(t)) => format!("thr-mmt:{t}"),
            Kind::Migrating(Detector::Iqr(s)) => format!("iqr-mmt:{s}"),
            Kind::Migrating(Detector::Mad(s)) => format!("mad-mmt:{s}"),
            Kind::Migrating(Detector::Lr(s)) => format!("lr-mmt:{s}"),
        }
    }

    fn accounting(&self) -> Accounting {
        if self.kind == Kind::Npa { Accounting::AlwaysPeak } else { Accounting::Measured }
    }

    fn initial(&mut self, view: &View<'_>) -> Vec<usize> {
        self.observe(view);
        let sc = view.scenario;
        let mut st = Reserved::new(sc);
        let mut out = Vec::with_capacity(sc.vms.len());
        for vm in 0..sc.vms.len() {
            let fits: Vec<usize> = (0..sc.hosts.len()).filter(|&h| st.fits(sc, vm, h)).collect();
            let chosen = match self.kind {
                Kind::Npa | Kind::Dvfs => fits.first().copied(),
                Kind::Migrating(d) => {
                    // Without history every detector falls back to THR 0.7;
                    // CloudSim has not updated host utilisation yet, so the
                    // power "before" is that of an idle host for all.
                    let thr = if let Detector::Thr(t) = d { t } else { 0.7 };
                    let mut best: Option<(f64, usize)> = None;
                    for h in fits {
                        let cap = f64::from(sc.hosts[h].mips());
                        let after = (st.mips[h] + f64::from(sc.vms[vm].mips)) / cap;
                        if st.mips[h] > 0.0 && after > thr {
                            continue;
                        }
                        let diff = sc.hosts[h].power.watts(after) - sc.hosts[h].power.idle_watts();
                        if best.is_none_or(|(b, _)| diff < b) {
                            best = Some((diff, h));
                        }
                    }
                    best.map(|(_, h)| h)
                }
            };
            // Should no host fit (never with the standard experiment), take
            // the first with memory left: the world checks memory.
            let h = chosen.unwrap_or_else(|| (0..sc.hosts.len()).find(|&h| st.ram_fits(sc, vm, h)).unwrap_or(0));
            st.add(sc, vm, h);
            out.push(h);
        }
        out
    }

    fn decide(&mut self, view: &View<'_>) -> Vec<Action> {
        self.observe(view);
        match self.kind {
            Kind::Npa | Kind::Dvfs => Vec::new(),
            Kind::Migrating(d) => Optimiser::new(view, &self.hist, d).optimise(),
        }
    }
}

/// Full-MIPS, memory and bandwidth reservations of the initial placement.
struct Reserved {
    mips: Vec<f64>,
    ram: Vec<u32>,
    bw: Vec<u32>,
}

impl Reserved {
    fn new(sc: &Scenario) -> Self {
        let n = sc.hosts.len();
        Reserved { mips: vec![0.0; n], ram: vec![0; n], bw: vec![0; n] }
    }

    fn ram_fits(&self, sc: &Scenario, vm: usize, h: usize) -> bool {
        self.ram[h] + sc.vms[vm].ram_mb <= sc.hosts[h].ram_mb
    }

    fn fits(&self, sc: &Scenario, vm: usize, h: usize) -> bool {
        let (v, host) = (&sc.vms[vm], &sc.hosts[h]);
        v.mips.div_ceil(v.vcpus) <= host.core_mips
            && self.mips[h] + f64::from(v.mips) <= f64::from(host.mips())
            && self.ram_fits(sc, vm, h)
            && self.bw[h] + v.bw_mbps <= host.bw_mbps
    }

    fn add(&mut self, sc: &Scenario, vm: usize, h: usize) {
        self.mips[h] += f64::from(sc.vms[vm].mips);
        self.ram[h] += sc.vms[vm].ram_mb;
        self.bw[h] += sc.vms[vm].bw_mbps;
    }
}

/// One round of CloudSim's `optimizeAllocation` on a virtual copy of the
/// placement.
struct Optimiser<'a> {
    view: &'a View<'a>,
    hist: &'a [Vec<f64>],
    detector: Detector,
    /// Virtual placement: VMs per host, MIPS per host, memory per host.
    vms: Vec<Vec<usize>>,
    mips: Vec<f64>,
    ram: Vec<u32>,
    /// Host utilisation history: Σ VM history × VM MIPS / host MIPS.
    hhist: Vec<[f64; HISTORY]>,
    hlen: Vec<usize>,
    /// Utilisation at the start of the round (what CloudSim's hosts report).
    real_util: Vec<f64>,
}

impl<'a> Optimiser<'a> {
    fn new(view: &'a View<'a>, hist: &'a [Vec<f64>], detector: Detector) -> Self {
        let sc = view.scenario;
        let n = sc.hosts.len();
        let mut o = Optimiser {
            view,
            hist,
            detector,
            vms: vec![Vec::new(); n],
            mips: vec![0.0; n],
            ram: view.host_ram.to_vec(),
            hhist: vec![[0.0; HISTORY]; n],
            hlen: vec![0; n],
            real_util: vec![0.0; n],
        };
        for h in 0..n {
            for &vm in view.host_vms[h].iter().chain(&view.host_incoming[h]) {
                o.vms[h].push(vm);
                o.add_load(vm, h);
            }
            o.real_util[h] = (o.mips[h] / f64::from(sc.hosts[h].mips())).min(1.0);
        }
        o
    }

    fn add_load(&mut self, vm: usize, h: usize) {
        let sc = self.view.scenario;
        self.mips[h] += self.view.observed[vm];
        let w = f64::from(sc.vms[vm].mips) / f64::from(sc.hosts[h].mips());
        for (i, u) in self.hist[vm].iter().enumerate() {
            self.hhist[h][i] += u * w;
        }
        self.hlen[h] = self.hlen[h].max(self.hist[vm].len());
    }

    fn remove_load(&mut self, vm: usize, h: usize) {
        let sc = self.view.scenario;
        self.mips[h] -= self.view.observed[vm];
        let w = f64::from(sc.vms[vm].mips) / f64::from(sc.hosts[h].mips());
        for (i, u) in self.hist[vm].iter().enumerate() {
            self.hhist[h][i] -= u * w;
        }
        if self.vms[h].is_empty() {
            self.mips[h] = 0.0;
            self.hhist[h] = [0.0; HISTORY];
            self.hlen[h] = 0;
        }
    }

    fn create(&mut self, vm: usize, h: usize) {
        self.vms[h].push(vm);
        self.add_load(vm, h);
        if self.view.scenario.model.memory_always {
            self.ram[h] += self.view.scenario.vms[vm].ram_mb;
        }
    }

    fn destroy(&mut self, vm: usize, h: usize) {
        if let Some(p) = self.vms[h].iter().position(|&v| v == vm) {
            self.vms[h].remove(p);
        }
        self.remove_load(vm, h);
        if self.view.scenario.model.memory_always {
            self.ram[h] -= self.view.scenario.vms[vm].ram_mb;
        }
    }

    fn utilisation(&self, h: usize) -> f64 {
        self.mips[h] / f64::from(self.view.scenario.hosts[h].mips())
    }

    /// The host history, newest first, without its tail of zeros.
    fn history(&self, h: usize) -> &[f64] {
        let mut n = self.hlen[h];
        while n > 0 && self.hhist[h][n - 1] <= 1e-12 {
            n -= 1;
        }
        &self.hhist[h][..n]
    }

    fn overloaded(&self, h: usize) -> bool {
        let u = self.utilisation(h);
        match self.detector {
            Detector::Thr(t) => u > t,
            Detector::Iqr(s) | Detector::Mad(s) => {
                let hist = self.history(h);
                let nonzero = hist.iter().take_while(|&&v| v > 0.0).count();
                if nonzero < 12 {
                    return u > 0.7;
                }
                let spread = if let Detector::Iqr(_) = self.detector { iqr(hist) } else { mad(hist) };
                u > 1.0 - s * spread
            }
            Detector::Lr(s) => {
                let hist = self.history(h);
                if hist.len() < 10 {
                    return u > 0.7;
                }
                let sc = self.view.scenario;
                let max_mig = self.vms[h].iter().map(|&vm| sc.migration_secs(vm, h)).fold(0.0, f64::max);
                let ahead = (max_mig / sc.interval_secs).ceil();
                let (a, b) = linear_fit(&hist[..10]);
                (a + b * (10.0 + ahead)) * s >= 1.0
            }
        }
    }

    fn overloaded_after(&mut self, vm: usize, h: usize) -> bool {
        self.create(vm, h);
        let over = self.overloaded(h);
        self.destroy(vm, h);
        over
    }

    /// CloudSim's `isSuitableForVm` for a VM that is already running: its
    /// current demand fits the host's free MIPS and one core; memory only
    /// when the model enforces it; the host is not being emptied.
    fn suitable(&self, vm: usize, h: usize) -> bool {
        let sc = self.view.scenario;
        let (v, host) = (&sc.vms[vm], &sc.hosts[h]);
        let d = self.view.observed[vm];
        if self.view.host_state[h] == drove_placement::PowerState::Consolidating {
            return false;
        }
        d / f64::from(v.vcpus) <= f64::from(host.core_mips)
            && self.mips[h] + d <= f64::from(host.mips())
            && (!sc.model.memory_always || self.ram[h] + v.ram_mb <= host.ram_mb)
    }

    /// PABFD: the suitable host, not excluded, whose power rises least.
    fn find_host(&mut self, vm: usize, excluded: &[bool]) -> Option<usize> {
        let sc = self.view.scenario;
        let mut best: Option<(f64, usize)> = None;
        for (h, &excluded) in excluded.iter().enumerate() {
            if excluded || !self.suitable(vm, h) {
                continue;
            }
            if self.mips[h] > 0.0 && self.overloaded_after(vm, h) {
                continue;
            }
            let cap = f64::from(sc.hosts[h].mips());
            let after = (self.mips[h] + self.view.observed[vm]) / cap;
            if after > 1.0 {
                continue;
            }
            let p = &sc.hosts[h].power;
            let diff = p.watts(after) - p.watts(self.mips[h] / cap);
            if best.is_none_or(|(b, _)| diff < b) {
                best = Some((diff, h));
            }
        }
        best.map(|(_, h)| h)
    }

    fn sort_by_demand(&self, vms: &mut [usize]) {
        let o = self.view.observed;
        vms.sort_by(|&a, &b| o[b].partial_cmp(&o[a]).unwrap_or(Ordering::Equal));
    }

    fn optimise(mut self) -> Vec<Action> {
        let sc = self.view.scenario;
        let n = sc.hosts.len();
        let migrating = self.view.vm_migrating;
        // 1. Overloaded hosts and the VMs that leave them (minimum
        //    migration time: least memory first).
        let over: Vec<usize> = (0..n).filter(|&h| !self.vms[h].is_empty() && self.overloaded(h)).collect();
        let mut to_move = Vec::new();
        for &h in &over {
            loop {
                let pick = self.vms[h]
                    .iter()
                    .copied()
                    .filter(|&vm| !migrating[vm] && self.view.vm_host[vm] == Some(h))
                    .min_by_key(|&vm| sc.vms[vm].ram_mb);
                let Some(vm) = pick else { break };
                self.destroy(vm, h);
                to_move.push((vm, h));
                if !self.overloaded(h) {
                    break;
                }
            }
        }
        // 2. Place them, largest demand first, never on an overloaded host.
        let mut excluded = vec![false; n];
        for &h in &over {
            excluded[h] = true;
        }
        let mut vms: Vec<usize> = to_move.iter().map(|&(vm, _)| vm).collect();
        self.sort_by_demand(&mut vms);
        let mut actions = Vec::new();
        let mut received = vec![false; n];
        for vm in vms {
            if let Some(h) = self.find_host(vm, &excluded) {
                self.create(vm, h);
                received[h] = true;
                actions.push(Action::Migrate { vm, to: h });
            }
        }
        // 3. Empty under-utilised hosts, least utilised first, onto hosts
        //    that are neither overloaded, off, nor tried already.
        let off: Vec<bool> = (0..n).map(|h| self.real_util[h] <= 0.0).collect();
        let mut excl_under: Vec<bool> = (0..n).map(|h| excluded[h] || off[h] || received[h]).collect();
        let mut excl_place: Vec<bool> = (0..n).map(|h| excluded[h] || off[h]).collect();
        loop {
            let cand = (0..n)
                .filter(|&h| !excl_under[h] && self.real_util[h] > 0.0 && self.real_util[h] < 1.0)
                .filter(|&h| self.view.host_incoming[h].is_empty())
                .filter(|&h| self.vms[h].iter().any(|&vm| !migrating[vm]))
                .min_by(|&a, &b| self.real_util[a].partial_cmp(&self.real_util[b]).unwrap_or(Ordering::Equal));
            let Some(u) = cand else { break };
            excl_under[u] = true;
            excl_place[u] = true;
            let mut vms: Vec<usize> = self.vms[u].iter().copied().filter(|&vm| !migrating[vm]).collect();
            self.sort_by_demand(&mut vms);
            let mut placed = Vec::new();
            for &vm in &vms {
                match self.find_host(vm, &excl_place) {
                    Some(h) => {
                        self.create(vm, h);
                        placed.push((vm, h));
                    }
                    None => break,
                }
            }
            if placed.len() < vms.len() {
                for (vm, h) in placed {
                    self.destroy(vm, h);
                }
                continue;
            }
            for (vm, h) in placed {
                excl_under[h] = true;
                actions.push(Action::Migrate { vm, to: h });
            }
        }
        // Realistic model: an emptied host goes to standby (CloudSim
        // switches it off at once).
        if !sc.model.memory_always {
            return actions;
        }
        let mut leaving = vec![0usize; n];
        for a in &actions {
            if let Action::Migrate { vm, .. } = *a
                && let Some(h) = self.view.vm_host[vm]
            {
                leaving[h] += 1;
            }
        }
        for (h, &left) in leaving.iter().enumerate() {
            let powered = self.view.host_state[h] == drove_placement::PowerState::On;
            let incoming = actions.iter().any(|a| matches!(*a, Action::Migrate { to, .. } if to == h));
            if powered && !incoming && self.view.host_incoming[h].is_empty() && left == self.view.host_vms[h].len() {
                actions.push(Action::Standby { host: h });
            }
        }
        actions
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

fn sorted(data: &[f64]) -> Vec<f64> {
    let mut v = data.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// Median absolute deviation.
pub fn mad(data: &[f64]) -> f64 {
    let m = median(&sorted(data));
    let dev: Vec<f64> = data.iter().map(|v| (v - m).abs()).collect();
    median(&sorted(&dev))
}

/// Interquartile range with CloudSim's quartile positions.
pub fn iqr(data: &[f64]) -> f64 {
    let v = sorted(data);
    let n = v.len() as f64;
    let q1 = ((0.25 * (n + 1.0)).round() as usize).saturating_sub(1).min(v.len() - 1);
    let q3 = ((0.75 * (n + 1.0)).round() as usize).saturating_sub(1).min(v.len() - 1);
    v[q3] - v[q1]
}

/// Least squares line through the points (1, y_oldest) … (n, y_newest),
/// given newest first; returns (intercept, slope). CloudSim's "loess" with
/// its tricube weights reduces to this (the weights are never applied).
pub fn linear_fit(newest_first: &[f64]) -> (f64, f64) {
    let n = newest_first.len() as f64;
    let (mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0);
    for (i, &y) in newest_first.iter().rev().enumerate() {
        let x = i as f64 + 1.0;
        sx += x;
        sy += y;
        sxx += x * x;
        sxy += x * y;
    }
    let denom = n * sxx - sx * sx;
    if denom == 0.0 {
        return (sy / n.max(1.0), 0.0);
    }
    let b = (n * sxy - sx * sy) / denom;
    ((sy - b * sx) / n, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_match_hand_computed_values() {
        assert_eq!(mad(&[1.0, 2.0, 3.0, 4.0, 100.0]), 1.0);
        // CloudSim positions for n = 8: q1 = round(2.25) - 1 = 1, q3 = round(6.75) - 1 = 6
        assert_eq!(iqr(&[8.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]), 5.0);
        let (a, b) = linear_fit(&[0.5, 0.4, 0.3, 0.2]);
        assert!((a - 0.1).abs() < 1e-12 && (b - 0.1).abs() < 1e-12, "{a} {b}");
    }
}
