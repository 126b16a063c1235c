//! `drove bench placement`: the placement engine at data-centre scale on a
//! synthetic cluster (deterministic, seeded): place N guests with daily
//! profiles onto M hosts, plan the failover of a host running 100 guests,
//! and run one rebalancing round with hot hosts.
//!
//! The cluster: hosts of 64 cores (64,000 milli-cores), 512 GiB, 2 × 10
//! Gbit/s, a 16 Gbit/s HBA; guests of 1-4 vCPUs and 2-16 GiB, a third busy
//! by day, a third by night (batch), a third flat, each with CPU jitter; a
//! fifth are replicas of 3-replica services (anti-affinity), a quarter
//! belong to one of three security tiers; 10 % of every host is kept as HA
//! reserve.

use std::time::Instant;

use drove_placement::{
    BalanceParams, Cluster, FailoverParams, Group, GuestIx, GuestSpec, HostIx, HostSpec, Limits, Mobility, PowerModel,
    PowerState, Profile, Resources, Strategy, Tier, failover, place_all, rebalance,
};
use serde::Serialize;

/// What the placement bench measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlacementFigures {
    pub hosts: usize,
    pub guests: usize,
    pub slots: usize,
    pub place_all_ms: f64,
    pub placed: usize,
    pub unplaced: usize,
    pub hosts_used: usize,
    pub failover_guests: usize,
    pub failover_ms: f64,
    pub failover_restarted: usize,
    pub failover_targets: usize,
    pub failover_waves: usize,
    pub hot_hosts: usize,
    pub rebalance_ms: f64,
    pub rebalance_moves: usize,
    pub rebalance_unresolved: usize,
}

/// splitmix64: a tiny deterministic generator (no dependency for a bench).
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn host_spec(i: usize) -> HostSpec {
    HostSpec {
        name: format!("host-{i:04}"),
        capacity: Resources::new(64_000, 512 * 1024, 20_000, 16_000),
        core_speed: 1000,
        power: PowerModel::linear(250.0, 500.0, 0.9, 10.0).expect("valid figures"),
        state: PowerState::On,
        schedulable: true,
    }
}

fn guest_spec(rng: &mut Rng, i: usize, slots: usize, groups: &mut u32) -> GuestSpec {
    let vcpus = [1u32, 1, 2, 4][rng.below(4) as usize];
    let mem_gib = [2u32, 4, 8, 16][rng.below(4) as usize];
    let busy = 0.3 + 0.6 * rng.unit();
    let kind = rng.below(3);
    let demand: Vec<Resources> = (0..slots)
        .map(|s| {
            let hour = s * 24 / slots;
            let share = match kind {
                0 if (8..20).contains(&hour) => busy,
                1 if hour < 6 => busy,
                0 | 1 => 0.1 * busy,
                _ => 0.5 * busy,
            };
            let cpu = (f64::from(vcpus) * 1000.0 * share).ceil() as u32;
            let io = if rng.below(10) == 0 { 1000 } else { 50 };
            Resources::new(cpu, mem_gib * 1024, 100, io)
        })
        .collect();
    let var: Vec<u32> = demand.iter().map(|r| (f64::from(r.cpu) * 0.2).powi(2) as u32).collect();
    let anti_affinity = if rng.below(5) == 0 {
        *groups += 1;
        Some(Group(*groups / 3))
    } else {
        None
    };
    let tier = (rng.below(4) == 0).then(|| Tier(rng.below(3) as u16));
    GuestSpec {
        name: format!("guest-{i:05}"),
        demand: Profile::from_slots(demand).and_then(|p| p.with_cpu_variance(var)).expect("slots match"),
        vcpus,
        migration_mib: mem_gib * 1024,
        anti_affinity,
        tier,
        priority: rng.below(100) as u8,
        mobility: Mobility::Free,
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Run the bench. `repeat` times the failover and rebalance plans (they
/// are quick; the median is reported).
pub fn placement(hosts: usize, guests: usize, slots: usize, repeat: usize) -> PlacementFigures {
    let mut rng = Rng(0x5eed);
    let mut c = Cluster::new(slots.max(1)).expect("at least one slot");
    for i in 0..hosts.max(2) {
        c.add_host(host_spec(i)).expect("capacities within limits");
    }
    let mut groups = 0;
    // Host 0 runs 100 small guests already: the host that will fail.
    let small = |i: usize| GuestSpec {
        name: format!("small-{i:03}"),
        demand: Profile::flat(Resources::new(100, 1024, 10, 10), c.slots()).expect("slots"),
        vcpus: 1,
        migration_mib: 1024,
        anti_affinity: None,
        tier: None,
        priority: (i % 100) as u8,
        mobility: Mobility::Free,
    };
    let victims: Vec<_> = (0..100).map(small).collect();
    for spec in victims {
        c.add_guest(spec, Some(HostIx(0))).expect("valid guest");
    }
    let new: Vec<GuestIx> = (0..guests)
        .map(|i| c.add_guest(guest_spec(&mut rng, i, c.slots(), &mut groups), None).expect("valid guest"))
        .collect();
    // Keep 10 % of every host for HA; spread no more than needed.
    let admission = Limits { usable: [0.9; 4], cpu_sigmas: 1.0 };
    // The failing host keeps exactly its 100 guests.
    c.set_schedulable(HostIx(0), false);
    let t = Instant::now();
    let plan = place_all(&mut c, &new, &admission, Strategy::MostPacked);
    let place_all_ms = ms(t);
    c.set_schedulable(HostIx(0), true);
    let hosts_used = c.hosts().filter(|&h| !c.residents(h).is_empty()).count();

    let params = FailoverParams::default();
    let mut times = Vec::new();
    let mut fo = failover(&c, HostIx(0), &params);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        fo = failover(&c, HostIx(0), &params);
        times.push(ms(t));
    }
    let failover_ms = median(&mut times);
    let mut targets: Vec<HostIx> = fo.restarts.iter().map(|r| r.host).collect();
    targets.sort();
    targets.dedup();

    // Make 2 % of the hosts hot: each gets busy guests beyond its limits.
    let mut hot_hosts = 0;
    for k in 0..(hosts / 50).max(1) {
        let h = HostIx((1 + k * 50 % (hosts - 1).max(1)) as u32);
        for j in 0..6 {
            let spec = GuestSpec {
                name: format!("burst-{k}-{j}"),
                demand: Profile::flat(Resources::new(4000, 4096, 100, 50), c.slots()).expect("slots"),
                vcpus: 4,
                migration_mib: 4096,
                anti_affinity: None,
                tier: None,
                priority: 50,
                mobility: Mobility::Free,
            };
            c.add_guest(spec, Some(h)).expect("valid guest");
        }
        hot_hosts += 1;
    }
    let bal = BalanceParams {
        hot: Limits { usable: [0.95, 1.0, 1.0, 1.0], cpu_sigmas: 1.0 },
        target: admission,
        strategy: Strategy::LeastLoaded,
        max_moves: 500,
        imbalance: None,
        allow_wake: false,
    };
    let mut times = Vec::new();
    let mut rb = rebalance(&c, &bal);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        rb = rebalance(&c, &bal);
        times.push(ms(t));
    }
    PlacementFigures {
        hosts: c.host_count(),
        guests,
        slots: c.slots(),
        place_all_ms,
        placed: plan.placed.len(),
        unplaced: plan.unplaced.len(),
        hosts_used,
        failover_guests: 100,
        failover_ms,
        failover_restarted: fo.restarts.len(),
        failover_targets: targets.len(),
        failover_waves: fo.restarts.iter().map(|r| r.wave + 1).max().unwrap_or(0),
        hot_hosts,
        rebalance_ms: median(&mut times),
        rebalance_moves: rb.moves.len(),
        rebalance_unresolved: rb.unresolved.len(),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_places_everything_and_plans_soundly() {
        let f = placement(40, 1500, 24, 1);
        assert_eq!(f.placed + f.unplaced, 1500);
        assert_eq!(f.unplaced, 0, "{f:?}");
        assert_eq!(f.failover_restarted, 100);
        assert!(f.rebalance_moves > 0 && f.rebalance_unresolved == 0, "{f:?}");
    }
}
