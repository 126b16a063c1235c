//! Power management (DPM): at quiet times, empty the hosts whose guests fit
//! elsewhere and put them into standby; when load is predicted to rise,
//! wake hosts ahead of need.
//!
//! Which hosts to empty: the lightest first, where "light" is weighed by
//! efficiency (a host that burns more watts per unit of work looks lighter,
//! so the efficient hosts stay on). A host is emptied only if *all* its
//! guests fit on the hosts that stay on, under the `target` limits; a host
//! that cannot be emptied keeps its guests, no guest moves for nothing.
//! Receivers of one round are not emptied in the same round, and guests
//! that moved recently ([`Mobility::Reluctant`]) pin their host: both keep
//! DPM from undoing its own work (thrashing).

use crate::balance::{Move, MoveReason, standby_by_efficiency};
use crate::cluster::{Cluster, GuestIx, HostIx, Limits, Mobility, Strategy};
use crate::plan::packing_order;
use crate::power::PowerState;
use crate::resources::DIMS;

/// Consolidation knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConsolidateParams {
    /// Receivers may be filled up to these limits.
    pub target: Limits,
    /// Only hosts whose peak CPU (with the noise margin of `target`) is
    /// below this share of the CPU limit are candidates: hysteresis against
    /// the hot threshold, and no guest moves to empty a busy host.
    pub below: f64,
    /// Migrations per round.
    pub max_moves: usize,
    /// Hosts emptied per round.
    pub max_hosts: usize,
    /// Never fewer powered hosts than this (spare for failures and for the
    /// time a host takes to wake).
    pub min_on: usize,
}

/// What a consolidation round proposes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConsolidationPlan {
    pub moves: Vec<Move>,
    /// Hosts to put into standby once their guests have left (empty hosts
    /// go at once).
    pub standby: Vec<HostIx>,
}

/// Propose which hosts to empty and put into standby.
pub fn consolidate(cluster: &Cluster, p: &ConsolidateParams) -> ConsolidationPlan {
    let mut scratch = cluster.clone();
    let mut plan = ConsolidationPlan::default();
    let mut on = scratch.hosts().filter(|&h| scratch.host(h).state.is_powered()).count();
    let best_efficiency = scratch
        .hosts()
        .map(|h| scratch.host(h).power.watts_per_unit(scratch.host(h).capacity.cpu, p.target.usable[0]))
        .fold(f64::INFINITY, f64::min);
    let mut cands: Vec<(f64, HostIx)> = scratch
        .hosts()
        .filter(|&h| scratch.host(h).state.accepts_guests() && scratch.host(h).schedulable)
        .filter(|&h| scratch.residents(h).iter().all(|&g| scratch.mobility(g) == Mobility::Free))
        .map(|h| {
            // CPU is what changes over the day; memory and bandwidth are
            // checked on the receivers, they do not make a host "busy".
            let pressure = cpu_pressure(&scratch, h, &p.target);
            let efficiency = scratch.host(h).power.watts_per_unit(scratch.host(h).capacity.cpu, p.target.usable[0]);
            (pressure * best_efficiency / efficiency, pressure, h)
        })
        .filter(|&(_, pressure, _)| pressure < p.below)
        .map(|(key, _, h)| (key, h))
        .collect();
    cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut leaving = vec![false; scratch.host_count()];
    let mut receiving = vec![false; scratch.host_count()];
    // Only hosts that are on can receive; scanning just those keeps a round
    // cheap when most of a large cluster sleeps.
    let on_hosts: Vec<HostIx> = scratch.hosts().filter(|&h| scratch.host(h).state.accepts_guests()).collect();
    // The most any receiver can take per dimension: receivers only fill up
    // during a round, so this bound stays true and rejects hopeless
    // candidates without a search.
    let mut most_free = [0u64; DIMS];
    for &h in &on_hosts {
        let f = scratch.free(h, &p.target);
        for d in 0..DIMS {
            most_free[d] = most_free[d].max(f[d]);
        }
    }
    for (_, h) in cands {
        if on <= p.min_on || plan.standby.len() >= p.max_hosts {
            break;
        }
        if receiving[h.index()] {
            continue;
        }
        let mut guests: Vec<GuestIx> = scratch.residents(h).to_vec();
        if plan.moves.len() + guests.len() > p.max_moves {
            continue;
        }
        let hopeless = guests.iter().any(|&g| {
            let peak = scratch.peak_demand(g).to_array();
            (0..DIMS).any(|d| u64::from(peak[d]) > most_free[d])
        });
        if hopeless {
            continue;
        }
        packing_order(&scratch, &mut guests);
        leaving[h.index()] = true;
        let mut tentative: Vec<Move> = Vec::with_capacity(guests.len());
        for &g in &guests {
            let found = scratch.best_host_among(g, &p.target, Strategy::MostPacked, on_hosts.iter().copied(), |x| {
                (!leaving[x.index()]).then_some(0.0)
            });
            match found {
                Ok((to, _)) => {
                    scratch.move_guest(g, to);
                    tentative.push(Move { guest: g, from: h, to, reason: MoveReason::Evacuate });
                }
                Err(_) => break,
            }
        }
        if tentative.len() < guests.len() {
            // Not all fit: undo, the host stays on with all its guests.
            for m in &tentative {
                scratch.cancel_move(m.guest, h);
            }
            leaving[h.index()] = false;
            continue;
        }
        for m in &tentative {
            receiving[m.to.index()] = true;
            scratch.set_mobility(m.guest, Mobility::Reluctant);
        }
        plan.moves.extend(tentative);
        plan.standby.push(h);
        scratch.set_power_state(h, PowerState::Standby);
        on -= 1;
    }
    plan
}

/// Peak CPU (with the noise margin) as a share of the CPU limit.
fn cpu_pressure(c: &Cluster, h: HostIx, limits: &Limits) -> f64 {
    let share = limits.usable[0];
    if share > 0.0 { c.peak_utilisation(h, limits)[0] / share } else { f64::INFINITY }
}

/// Standby hosts to wake so that the hosts on (or waking) can carry
/// `cpu_needed` within `target`: most efficient first.
pub fn wake_for_demand(cluster: &Cluster, cpu_needed: f64, target: &Limits) -> Vec<HostIx> {
    let share = target.usable[0];
    let mut have: f64 = cluster
        .hosts()
        .filter(|&h| {
            matches!(cluster.host(h).state, PowerState::On | PowerState::Waking) && cluster.host(h).schedulable
        })
        .map(|h| f64::from(cluster.host(h).capacity.cpu) * share)
        .sum();
    let mut wake = Vec::new();
    for h in standby_by_efficiency(cluster, share) {
        if have >= cpu_needed {
            break;
        }
        have += f64::from(cluster.host(h).capacity.cpu) * share;
        wake.push(h);
    }
    wake
}

/// Standby hosts to wake so that the hosts on (or waking) can carry every
/// guest's demand in every slot and dimension within `target`, and so that
/// at least `min_on` hosts are on: most efficient first.
///
/// Unlike [`wake_for_demand`] (the simulator's, fed one observed slot and
/// a CPU figure), this reads the cluster's own profiles: given the slots
/// ahead, it wakes hosts before the load arrives. The sum is a necessary
/// condition, not a packing: a host that turns hot for want of a fit is
/// the rebalancer's to solve ([`crate::rebalance`] with `allow_wake`).
pub fn wake_ahead(cluster: &Cluster, target: &Limits, min_on: usize) -> Vec<HostIx> {
    let mut gap = Gap::of(cluster, target);
    let mut wake = Vec::new();
    for h in standby_by_efficiency(cluster, target.usable[0]) {
        if gap.covered(min_on) {
            break;
        }
        gap.add(cluster, h, target);
        wake.push(h);
    }
    wake
}

/// What the hosts on can carry within a target, against the most the
/// guests demand in any slot.
struct Gap {
    have: [u64; DIMS],
    need: [u64; DIMS],
    on: usize,
}

impl Gap {
    fn of(cluster: &Cluster, target: &Limits) -> Gap {
        let mut gap = Gap { have: [0; DIMS], need: [0; DIMS], on: 0 };
        for h in cluster.hosts() {
            let spec = cluster.host(h);
            if matches!(spec.state, PowerState::On | PowerState::Waking) && spec.schedulable {
                gap.add(cluster, h, target);
            }
        }
        for s in 0..cluster.slots() {
            let mut total = [0u64; DIMS];
            for h in cluster.hosts() {
                for (t, l) in total.iter_mut().zip(cluster.load(h, s).to_array()) {
                    *t += u64::from(l);
                }
            }
            for (n, t) in gap.need.iter_mut().zip(total) {
                *n = (*n).max(t);
            }
        }
        gap
    }

    fn usable(cluster: &Cluster, h: HostIx, target: &Limits) -> [u64; DIMS] {
        let cap = cluster.host(h).capacity.to_array();
        std::array::from_fn(|d| target.limit(cap[d], d))
    }

    fn add(&mut self, cluster: &Cluster, h: HostIx, target: &Limits) {
        for (have, u) in self.have.iter_mut().zip(Self::usable(cluster, h, target)) {
            *have += u;
        }
        self.on += 1;
    }

    fn remove(&mut self, cluster: &Cluster, h: HostIx, target: &Limits) {
        for (have, u) in self.have.iter_mut().zip(Self::usable(cluster, h, target)) {
            *have = have.saturating_sub(u);
        }
        self.on = self.on.saturating_sub(1);
    }

    fn covered(&self, min_on: usize) -> bool {
        self.on >= min_on && (0..DIMS).all(|d| self.have[d] >= self.need[d])
    }
}

/// What one power management round proposes: wake hosts, or consolidate
/// guests and put emptied hosts into standby; never both.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PowerPlan {
    pub wake: Vec<HostIx>,
    pub moves: Vec<Move>,
    pub standby: Vec<HostIx>,
}

/// One round of power management over the slots the cluster holds (give it
/// the hours ahead, and hosts wake before the load comes, while hosts whose
/// guests' load rises within them are not emptied).
///
/// Waking comes first: a round that must wake a host does not also empty
/// one (that would be thrashing by construction).
///
/// `p.target` is also what the hosts on must carry the load ahead within.
pub fn plan_power(cluster: &Cluster, p: &ConsolidateParams) -> PowerPlan {
    let wake = wake_ahead(cluster, &p.target, p.min_on);
    if !wake.is_empty() {
        return PowerPlan { wake, ..Default::default() };
    }
    let c = consolidate(cluster, p);
    // A host goes only if the hosts left on still carry the load ahead: an
    // empty host fits "everything" it holds, and emptying it only for the
    // next round to wake it again is thrashing.
    let mut gap = Gap::of(cluster, &p.target);
    let mut plan = PowerPlan::default();
    for h in c.standby {
        gap.remove(cluster, h, &p.target);
        if gap.covered(p.min_on) {
            plan.standby.push(h);
        } else {
            gap.add(cluster, h, &p.target);
        }
    }
    plan.moves = c.moves.into_iter().filter(|m| plan.standby.contains(&m.from)).collect();
    plan
}
