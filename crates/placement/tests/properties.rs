//! Properties of every plan the engine makes, over random clusters: no plan
//! overcommits a host in any slot or dimension, and none breaks
//! anti-affinity or puts two security tiers on one host.

#![allow(clippy::unwrap_used)]

use drove_placement::{
    BalanceParams, Cluster, ConsolidateParams, DIMS, FailoverParams, Group, GuestIx, GuestSpec, HostIx, HostSpec,
    Limits, Mobility, PowerModel, PowerState, Profile, Resources, Strategy as Pick, Tier, consolidate, failover,
    place_all, rebalance,
};
use proptest::prelude::*;

const SLOTS: usize = 4;

fn power() -> PowerModel {
    PowerModel::spec_power([86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0], 5.0).unwrap()
}

fn arb_host() -> impl Strategy<Value = HostSpec> {
    (
        1000u32..8000,
        1024u32..8192,
        100u32..2000,
        prop_oneof![Just(0u32), 1000u32..4000],
        prop_oneof![Just(0u32), 500u32..3000],
        prop_oneof![
            6 => Just(PowerState::On),
            1 => Just(PowerState::Standby),
            1 => Just(PowerState::Consolidating),
            1 => Just(PowerState::Waking),
        ],
        prop::bool::weighted(0.9),
    )
        .prop_map(|(cpu, mem, net, disk, core_speed, state, schedulable)| HostSpec {
            name: String::new(),
            capacity: Resources::new(cpu, mem, net, disk),
            core_speed,
            power: power(),
            state,
            schedulable,
        })
}

fn arb_guest() -> impl Strategy<Value = GuestSpec> {
    (
        prop::collection::vec((0u32..3000, 0u32..3000, 0u32..400, prop_oneof![Just(0u32), 0u32..1500]), SLOTS),
        prop::collection::vec(0u32..250_000, SLOTS),
        1u32..4,
        prop::option::weighted(0.5, 0u32..4),
        prop::option::weighted(0.4, 0u16..3),
        0u8..3,
        prop_oneof![4 => Just(Mobility::Free), 1 => Just(Mobility::Reluctant), 1 => Just(Mobility::Pinned)],
        1u32..4096,
    )
        .prop_map(|(slots, var, vcpus, group, tier, priority, mobility, migration_mib)| GuestSpec {
            name: String::new(),
            demand: Profile::from_slots(slots.into_iter().map(|(c, m, n, d)| Resources::new(c, m, n, d)).collect())
                .unwrap()
                .with_cpu_variance(var)
                .unwrap(),
            vcpus,
            migration_mib,
            anti_affinity: group.map(Group),
            tier: tier.map(Tier),
            priority,
            mobility,
        })
}

fn arb_limits() -> impl Strategy<Value = Limits> {
    (prop::array::uniform4(0.5f64..=1.0), prop_oneof![Just(0.0f64), 0.0f64..2.0])
        .prop_map(|(usable, cpu_sigmas)| Limits { usable, cpu_sigmas })
}

fn cluster(hosts: Vec<HostSpec>, guests: Vec<GuestSpec>) -> (Cluster, Vec<GuestIx>) {
    let mut c = Cluster::new(SLOTS).unwrap();
    for (i, mut h) in hosts.into_iter().enumerate() {
        h.name = format!("h{i}");
        c.add_host(h).unwrap();
    }
    let mut gs = Vec::new();
    for (i, mut g) in guests.into_iter().enumerate() {
        g.name = format!("g{i}");
        gs.push(c.add_guest(g, None).unwrap());
    }
    (c, gs)
}

/// Whether host `h` is within `limits` in every slot and dimension
/// (memory still held for guests migrating away counted).
fn within(c: &Cluster, h: HostIx, limits: &Limits) -> Result<(), String> {
    let cap = c.host(h).capacity.to_array();
    for s in 0..c.slots() {
        let load = c.load(h, s).to_array();
        for d in 0..DIMS {
            let level = u64::from(load[d]) + if d == 1 { c.held_memory(h) } else { 0 };
            let limit = (f64::from(cap[d]) * limits.usable[d]).floor() as u64;
            if level > limit {
                return Err(format!("{}: dim {d} slot {s}: {level} > {limit}", c.host(h).name));
            }
        }
        if limits.cpu_sigmas > 0.0 {
            let level = f64::from(load[0]) + limits.cpu_sigmas * (c.cpu_variance(h, s) as f64).sqrt();
            let limit = (f64::from(cap[0]) * limits.usable[0]).floor();
            if level > limit + 1e-6 {
                return Err(format!("{}: cpu with margin slot {s}: {level} > {limit}", c.host(h).name));
            }
        }
    }
    Ok(())
}

/// Anti-affinity and tier breaches on host `h`.
fn rules(c: &Cluster, h: HostIx) -> Result<(), String> {
    let mut groups = Vec::new();
    let mut tier = None;
    for &g in c.residents(h) {
        let spec = c.guest(g);
        if let Some(grp) = spec.anti_affinity {
            if groups.contains(&grp) {
                return Err(format!("{}: group {} twice", c.host(h).name, grp.0));
            }
            groups.push(grp);
        }
        if let Some(t) = spec.tier {
            if tier.is_some_and(|x| x != t) {
                return Err(format!("{}: tiers mixed", c.host(h).name));
            }
            tier = Some(t);
        }
    }
    Ok(())
}

fn accepts(c: &Cluster, h: HostIx) -> bool {
    c.host(h).schedulable && c.host(h).state.accepts_guests()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Placing many guests never overcommits any host in any slot and
    /// dimension, never breaks a rule, uses only hosts that accept guests,
    /// and leaves a guest out only when no host could take it.
    #[test]
    fn placement_never_overcommits_or_breaks_rules(
        hosts in prop::collection::vec(arb_host(), 1..8),
        guests in prop::collection::vec(arb_guest(), 0..40),
        limits in arb_limits(),
        spread in any::<bool>(),
    ) {
        let (mut c, gs) = cluster(hosts, guests);
        let strategy = if spread { Pick::LeastLoaded } else { Pick::MostPacked };
        let plan = place_all(&mut c, &gs, &limits, strategy);
        prop_assert_eq!(plan.placed.len() + plan.unplaced.len(), gs.len());
        for h in c.hosts() {
            prop_assert!(within(&c, h, &limits).is_ok(), "{:?}", within(&c, h, &limits));
            prop_assert!(rules(&c, h).is_ok(), "{:?}", rules(&c, h));
            prop_assert!(c.residents(h).is_empty() || accepts(&c, h));
        }
        prop_assert!(c.violations(&limits).is_empty(), "{:?}", c.violations(&limits));
        for (g, _) in &plan.unplaced {
            for h in c.hosts() {
                prop_assert!(c.check(*g, h, &limits).is_err(), "{} was left out but fits on {}", c.guest(*g).name, c.host(h).name);
            }
        }
    }

    /// A failover plan restarts guests only on surviving hosts that accept
    /// guests, highest priority first, and the survivors stay within limits
    /// and rules.
    #[test]
    fn failover_plans_are_sound(
        hosts in prop::collection::vec(arb_host(), 2..8),
        guests in prop::collection::vec(arb_guest(), 1..40),
        limits in arb_limits(),
        failed in any::<prop::sample::Index>(),
    ) {
        let (mut c, gs) = cluster(hosts, guests);
        place_all(&mut c, &gs, &limits, Pick::MostPacked);
        let failed = HostIx(failed.index(c.host_count()) as u32);
        let victims = c.residents(failed).len();
        let params = FailoverParams { limits, ..FailoverParams::default() };
        let plan = failover(&c, failed, &params);
        prop_assert_eq!(plan.restarts.len() + plan.unplaced.len(), victims);
        for w in plan.restarts.windows(2) {
            prop_assert!(c.guest(w[0].guest).priority >= c.guest(w[1].guest).priority, "highest priority first");
        }
        for g in c.residents(failed).to_vec() {
            c.unassign(g);
        }
        for r in &plan.restarts {
            prop_assert!(r.host != failed && accepts(&c, r.host));
            c.assign(r.guest, r.host);
        }
        for h in c.hosts() {
            prop_assert!(within(&c, h, &limits).is_ok(), "{:?}", within(&c, h, &limits));
            prop_assert!(rules(&c, h).is_ok(), "{:?}", rules(&c, h));
        }
    }

    /// Rebalancing moves each guest at most once, never a pinned one, only
    /// to hosts that accept guests, and every receiver ends within the
    /// target limits (memory of guests still leaving it counted) and the
    /// rules.
    #[test]
    fn rebalancing_never_overcommits_a_receiver(
        hosts in prop::collection::vec(arb_host(), 2..8),
        guests in prop::collection::vec(arb_guest(), 1..40),
        target in arb_limits(),
        spread in any::<bool>(),
        max_moves in 0usize..20,
    ) {
        let (mut c, gs) = cluster(hosts, guests);
        // Observed state: CPU may be far over (hot hosts), rules hold.
        let loose = Limits { usable: [3.0, 1.0, 1.0, 1.0], cpu_sigmas: 0.0 };
        place_all(&mut c, &gs, &loose, Pick::MostPacked);
        let hot = Limits { usable: [target.usable[0] * 1.1, 1.0, 1.0, 1.0], cpu_sigmas: 0.0 };
        let params = BalanceParams {
            hot,
            target,
            strategy: if spread { Pick::LeastLoaded } else { Pick::MostPacked },
            max_moves,
            imbalance: spread.then_some(0.2),
            allow_wake: true,
        };
        let plan = rebalance(&c, &params);
        prop_assert!(plan.moves.len() <= max_moves);
        let mut moved = std::collections::HashSet::new();
        let mut receivers = std::collections::HashSet::new();
        for &h in &plan.wake {
            prop_assert_eq!(c.host(h).state, PowerState::Standby);
            c.set_power_state(h, PowerState::On);
        }
        for m in &plan.moves {
            prop_assert!(moved.insert(m.guest), "moved twice");
            prop_assert!(c.mobility(m.guest) != Mobility::Pinned);
            prop_assert_eq!(c.host_of(m.guest), Some(m.from));
            prop_assert!(accepts(&c, m.to));
            c.move_guest(m.guest, m.to);
            receivers.insert(m.to);
        }
        for h in c.hosts() {
            prop_assert!(rules(&c, h).is_ok(), "{:?}", rules(&c, h));
        }
        for &h in &receivers {
            prop_assert!(within(&c, h, &target).is_ok(), "{:?}", within(&c, h, &target));
        }
    }

    /// Consolidation empties a host completely or not at all, puts only
    /// emptied hosts into standby, and every receiver ends within limits and
    /// rules.
    #[test]
    fn consolidation_never_overcommits_a_receiver(
        hosts in prop::collection::vec(arb_host(), 2..8),
        guests in prop::collection::vec(arb_guest(), 1..40),
        target in arb_limits(),
        min_on in 0usize..3,
    ) {
        let (mut c, gs) = cluster(hosts, guests);
        place_all(&mut c, &gs, &target, Pick::LeastLoaded);
        let params = ConsolidateParams { target, below: 0.9, max_moves: 1000, max_hosts: 1000, min_on };
        let plan = consolidate(&c, &params);
        let mut receivers = std::collections::HashSet::new();
        for m in &plan.moves {
            prop_assert_eq!(c.mobility(m.guest), Mobility::Free);
            prop_assert!(plan.standby.contains(&m.from), "moves only empty hosts");
            prop_assert!(accepts(&c, m.to) && !plan.standby.contains(&m.to));
            c.move_guest(m.guest, m.to);
            receivers.insert(m.to);
        }
        for &h in &plan.standby {
            prop_assert!(c.residents(h).is_empty(), "{} still holds guests", c.host(h).name);
        }
        for h in c.hosts() {
            prop_assert!(rules(&c, h).is_ok(), "{:?}", rules(&c, h));
        }
        for &h in &receivers {
            prop_assert!(within(&c, h, &target).is_ok(), "{:?}", within(&c, h, &target));
        }
    }

    /// DRS and DPM planned in one round (hot hosts relieved, then light
    /// hosts emptied, on the same cluster): all moves run at once, so a
    /// host that sends guests away still holds their memory while it
    /// receives others; no receiver is overcommitted even then.
    #[test]
    fn a_round_of_relief_and_consolidation_fits_while_all_moves_run(
        hosts in prop::collection::vec(arb_host(), 2..8),
        guests in prop::collection::vec(arb_guest(), 1..40),
        target in arb_limits(),
    ) {
        let (mut c, gs) = cluster(hosts, guests);
        let loose = Limits { usable: [3.0, 1.0, 1.0, 1.0], cpu_sigmas: 0.0 };
        place_all(&mut c, &gs, &loose, Pick::MostPacked);
        let params = BalanceParams {
            hot: Limits { usable: [target.usable[0], 1.0, 1.0, 1.0], cpu_sigmas: 0.0 },
            target,
            strategy: Pick::MostPacked,
            max_moves: 100,
            imbalance: None,
            allow_wake: false,
        };
        let bal = rebalance(&c, &params);
        let mut receivers = std::collections::HashSet::new();
        for m in &bal.moves {
            c.move_guest(m.guest, m.to);
            c.set_mobility(m.guest, Mobility::Reluctant);
            receivers.insert(m.to);
        }
        let plan = consolidate(&c, &ConsolidateParams { target, below: 2.0, max_moves: 1000, max_hosts: 1000, min_on: 0 });
        for m in &plan.moves {
            c.move_guest(m.guest, m.to);
            receivers.insert(m.to);
        }
        for &h in &receivers {
            prop_assert!(within(&c, h, &target).is_ok(), "{:?}", within(&c, h, &target));
            prop_assert!(rules(&c, h).is_ok(), "{:?}", rules(&c, h));
        }
    }
}
