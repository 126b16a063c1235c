//! Rebalancing (DRS): relieve hot hosts, optionally even out load, within a
//! migration budget and with hysteresis so that it never thrashes.
//!
//! Hysteresis comes from two sets of [`Limits`]: a host is *hot* above
//! `hot`, is relieved only down to `target`, and a receiver may only be
//! filled up to `target` (below `hot`). So a move never makes a new hot
//! host, and a host that was just relieved needs a real rise in load, not
//! noise, to become hot again. Guests moved recently are
//! [`Mobility::Reluctant`]: moved again only when no other guest helps.
//! The budget caps the migrations of one round; whatever it leaves undone
//! is reported, and the next round picks it up.
//!
//! Every move carries its reason, so an operator (or the manual mode of
//! the reconciler) sees why before it happens.

use crate::cluster::{Cluster, GuestIx, HostIx, Limits, Mobility, NoHost, Strategy};
use crate::power::PowerState;

/// Why a guest should move.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MoveReason {
    /// Its host is above the hot limits (pressure: share of the limit
    /// reached at the host's worst slot and dimension; above 1 = over).
    Hot { pressure_before: f64, pressure_after: f64 },
    /// Hosts are unbalanced: the spread of peak CPU utilisation between the
    /// busiest and the idlest host.
    Imbalance { spread_before: f64, spread_after: f64 },
    /// Its host is being emptied to go into standby.
    Evacuate,
}

/// A live migration to make.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Move {
    pub guest: GuestIx,
    pub from: HostIx,
    pub to: HostIx,
    pub reason: MoveReason,
}

impl Move {
    /// One line an operator can read.
    pub fn explain(&self, cluster: &Cluster) -> String {
        let (g, from, to) =
            (&cluster.guest(self.guest).name, &cluster.host(self.from).name, &cluster.host(self.to).name);
        let mib = cluster.guest(self.guest).migration_mib;
        match self.reason {
            MoveReason::Hot { pressure_before, pressure_after } => format!(
                "move {g} ({mib} MiB to copy) from {from} to {to}: {from} is hot, at {:.0} % of its target load, {:.0} % after",
                pressure_before * 100.0,
                pressure_after * 100.0
            ),
            MoveReason::Imbalance { spread_before, spread_after } => format!(
                "move {g} ({mib} MiB to copy) from {from} to {to}: cpu spread between hosts {:.0} points, {:.0} after",
                spread_before * 100.0,
                spread_after * 100.0
            ),
            MoveReason::Evacuate => {
                format!("move {g} ({mib} MiB to copy) from {from} to {to}: emptying {from} for standby")
            }
        }
    }
}

/// Rebalancing knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalanceParams {
    /// A host above these limits is hot.
    pub hot: Limits,
    /// Hot hosts are relieved down to, and receivers filled up to, these.
    pub target: Limits,
    /// How receivers are chosen: most-packed keeps hosts free for standby,
    /// least-loaded spreads.
    pub strategy: Strategy,
    /// Migrations per round.
    pub max_moves: usize,
    /// Also even out hosts whose peak CPU utilisation differs by more than
    /// this (0.3 = 30 points); `None` relieves hot hosts only.
    pub imbalance: Option<f64>,
    /// When no running host can take a guest, wake a standby host.
    pub allow_wake: bool,
}

/// What a rebalancing round proposes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BalancePlan {
    pub moves: Vec<Move>,
    /// Standby hosts to wake (moves onto them wait until they are on).
    pub wake: Vec<HostIx>,
    /// Hot hosts the round could not relieve, and why.
    pub unresolved: Vec<(HostIx, String)>,
}

/// The standby hosts in the order DPM wakes them: most efficient at
/// `target` CPU first (fewest watts per unit of work).
pub fn standby_by_efficiency(cluster: &Cluster, target_cpu: f64) -> Vec<HostIx> {
    let mut v: Vec<(f64, HostIx)> = cluster
        .hosts()
        .filter(|&h| cluster.host(h).state == PowerState::Standby && cluster.host(h).schedulable)
        .map(|h| (cluster.host(h).power.watts_per_unit(cluster.host(h).capacity.cpu, target_cpu), h))
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    v.into_iter().map(|(_, h)| h).collect()
}

/// Propose moves that relieve hot hosts (and even out load if asked).
pub fn rebalance(cluster: &Cluster, p: &BalanceParams) -> BalancePlan {
    let mut scratch = cluster.clone();
    let mut plan = BalancePlan::default();
    let mut hot: Vec<(f64, HostIx)> = scratch
        .hosts()
        .filter(|&h| scratch.host(h).state.is_powered() && !scratch.residents(h).is_empty())
        .map(|h| (scratch.pressure(h, &p.hot), h))
        .filter(|&(pr, _)| pr > 1.0)
        .collect();
    hot.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut is_hot = vec![false; scratch.host_count()];
    for &(_, h) in &hot {
        is_hot[h.index()] = true;
    }
    let mut standby = standby_by_efficiency(&scratch, p.target.usable[0]);
    standby.reverse(); // pop() takes the most efficient
    for &(_, h) in &hot {
        relieve(&mut scratch, h, p, &is_hot, &mut standby, &mut plan);
    }
    if let Some(spread) = p.imbalance {
        even_out(&mut scratch, p, spread, &is_hot, &mut plan);
    }
    plan
}

fn relieve(
    scratch: &mut Cluster,
    h: HostIx,
    p: &BalanceParams,
    is_hot: &[bool],
    standby: &mut Vec<HostIx>,
    plan: &mut BalancePlan,
) {
    loop {
        let before = scratch.pressure(h, &p.target);
        if before <= 1.0 {
            return;
        }
        if plan.moves.len() >= p.max_moves {
            plan.unresolved.push((h, format!("migration budget of {} moves spent", p.max_moves)));
            return;
        }
        // Candidates: free guests before reluctant ones; among them, those
        // whose leaving alone cools the host, cheapest to copy first; then
        // the others by relief per MiB copied.
        let mut cands: Vec<(u8, bool, f64, GuestIx, f64)> = scratch
            .residents(h)
            .iter()
            .filter(|&&g| scratch.mobility(g) != Mobility::Pinned)
            .map(|&g| {
                let after = scratch.pressure_without(h, g, &p.target);
                let mib = f64::from(scratch.guest(g).migration_mib.max(1));
                let reluctant = u8::from(scratch.mobility(g) == Mobility::Reluctant);
                let resolves = after <= 1.0;
                let key = if resolves { mib } else { -(before - after) / mib };
                (reluctant, !resolves, key, g, after)
            })
            .filter(|c| c.4 < before)
            .collect();
        cands.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.total_cmp(&b.2)).then(a.3.cmp(&b.3)));
        let mut moved = false;
        let mut why: Option<NoHost> = None;
        for &(_, _, _, g, after) in &cands {
            // A running host with room, else (if allowed) a woken one.
            let to = match scratch.best_host(g, &p.target, p.strategy, |x| x != h && !is_hot[x.index()]) {
                Ok((to, _)) => Some(to),
                Err(e) => {
                    let woken = if p.allow_wake { wake_one(scratch, g, &p.target, standby) } else { None };
                    match woken {
                        Some(to) => plan.wake.push(to),
                        None => {
                            why.get_or_insert(e);
                        }
                    }
                    woken
                }
            };
            if let Some(to) = to {
                scratch.move_guest(g, to);
                scratch.set_mobility(g, Mobility::Reluctant);
                plan.moves.push(Move {
                    guest: g,
                    from: h,
                    to,
                    reason: MoveReason::Hot { pressure_before: before, pressure_after: after },
                });
                moved = true;
                break;
            }
        }
        if !moved {
            let reason = match why {
                Some(e) => e.to_string(),
                None => "no guest can move".to_owned(),
            };
            plan.unresolved.push((h, reason));
            return;
        }
    }
}

/// Wake the most efficient standby host that can take `g`; it counts as
/// on in `scratch` from now on.
fn wake_one(scratch: &mut Cluster, g: GuestIx, limits: &Limits, standby: &mut Vec<HostIx>) -> Option<HostIx> {
    for i in (0..standby.len()).rev() {
        let h = standby[i];
        scratch.set_power_state(h, PowerState::On);
        if scratch.check(g, h, limits).is_ok() {
            standby.remove(i);
            return Some(h);
        }
        scratch.set_power_state(h, PowerState::Standby);
    }
    None
}

fn even_out(scratch: &mut Cluster, p: &BalanceParams, spread: f64, is_hot: &[bool], plan: &mut BalancePlan) {
    let cpu = |c: &Cluster, h: HostIx| c.peak_utilisation(h, &p.target)[0];
    while plan.moves.len() < p.max_moves {
        let on: Vec<HostIx> = scratch.hosts().filter(|&h| scratch.host(h).state.accepts_guests()).collect();
        let Some(&hi) = on.iter().max_by(|&&a, &&b| cpu(scratch, a).total_cmp(&cpu(scratch, b)).then(b.cmp(&a))) else {
            return;
        };
        let Some(&lo) = on.iter().min_by(|&&a, &&b| cpu(scratch, a).total_cmp(&cpu(scratch, b)).then(a.cmp(&b))) else {
            return;
        };
        let (uh, ul) = (cpu(scratch, hi), cpu(scratch, lo));
        let before = uh - ul;
        if before <= spread || hi == lo || is_hot[lo.index()] {
            return;
        }
        // The free guest whose move narrows the spread most.
        let mut best: Option<(f64, GuestIx)> = None;
        for g in scratch.residents(hi).to_vec() {
            if scratch.mobility(g) != Mobility::Free || scratch.check(g, lo, &p.target).is_err() {
                continue;
            }
            // Try the move in place and take it back: cheaper than a clone.
            scratch.assign(g, lo);
            let (a, b) = (cpu(scratch, hi), cpu(scratch, lo));
            scratch.assign(g, hi);
            let after = a.max(b) - a.min(b);
            if after < before - 1e-9 && best.is_none_or(|(b, _)| after < b) {
                best = Some((after, g));
            }
        }
        let Some((after, g)) = best else { return };
        scratch.move_guest(g, lo);
        scratch.set_mobility(g, Mobility::Reluctant);
        plan.moves.push(Move {
            guest: g,
            from: hi,
            to: lo,
            reason: MoveReason::Imbalance { spread_before: before, spread_after: after },
        });
    }
}
