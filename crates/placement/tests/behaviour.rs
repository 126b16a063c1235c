//! The engine's behaviour on small, hand-built clusters.

#![allow(clippy::unwrap_used)]

use drove_placement::{
    BalanceParams, Cluster, ConsolidateParams, Dim, FailoverParams, Group, GuestIx, GuestSpec, HostIx, HostSpec,
    Limits, Misfit, Mobility, MoveReason, PowerModel, PowerState, Profile, Resources, Strategy, Tier, cluster_headroom,
    consolidate, failover, place_all, plan_power, rebalance, wake_ahead, what_if_add, what_if_lose,
};

const G4: [f64; 11] = [86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0];
const G5: [f64; 11] = [93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0];

fn host(name: &str, cpu: u32, mem: u32) -> HostSpec {
    HostSpec {
        name: name.into(),
        capacity: Resources::new(cpu, mem, 1000, 4000),
        core_speed: 0,
        power: PowerModel::spec_power(G5, 5.0).unwrap(),
        state: PowerState::On,
        schedulable: true,
    }
}

fn guest(name: &str, slots: &[u32], mem: u32) -> GuestSpec {
    GuestSpec {
        name: name.into(),
        demand: Profile::from_slots(slots.iter().map(|&c| Resources::new(c, mem, 0, 0)).collect()).unwrap(),
        vcpus: 1,
        migration_mib: mem.max(1),
        anti_affinity: None,
        tier: None,
        priority: 50,
        mobility: Mobility::Free,
    }
}

fn build(hosts: Vec<HostSpec>, guests: Vec<GuestSpec>) -> (Cluster, Vec<HostIx>, Vec<GuestIx>) {
    let slots = guests.first().map_or(1, |g| g.demand.slots());
    let mut c = Cluster::new(slots).unwrap();
    let hs = hosts.into_iter().map(|h| c.add_host(h).unwrap()).collect();
    let gs = guests.into_iter().map(|g| c.add_guest(g, None).unwrap()).collect();
    (c, hs, gs)
}

#[test]
fn complementary_profiles_share_a_host_and_equal_ones_do_not() {
    // Day (slots 1-2 busy) and night (slots 0 and 3 busy) guests, each with
    // a daily peak of 60 % of a host: by peaks they need a host each; by
    // per-slot peaks a day guest and a night guest share.
    let day = [10, 600, 600, 10];
    let night = [600, 10, 10, 600];
    let (mut c, hs, gs) = build(
        vec![host("a", 1000, 4096), host("b", 1000, 4096)],
        vec![
            guest("day1", &day, 512),
            guest("day2", &day, 512),
            guest("night1", &night, 512),
            guest("night2", &night, 512),
        ],
    );
    let plan = place_all(&mut c, &gs, &Limits::FULL, Strategy::MostPacked);
    assert!(plan.unplaced.is_empty(), "{:?}", plan.unplaced);
    for &h in &hs {
        let names: Vec<&str> = c.residents(h).iter().map(|&g| c.guest(g).name.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("day")) && names.iter().any(|n| n.starts_with("night")),
            "{names:?}"
        );
    }
}

#[test]
fn a_4_gbps_hba_carries_at_most_four_guests_busy_at_1_gbps() {
    let busy = |i: usize| GuestSpec {
        demand: Profile::flat(Resources::new(10, 256, 0, 1000), 1).unwrap(),
        ..guest(&format!("io{i}"), &[10], 256)
    };
    let (mut c, _, gs) = build(vec![host("a", 100_000, 65_536)], (0..5).map(busy).collect());
    let plan = place_all(&mut c, &gs, &Limits::FULL, Strategy::MostPacked);
    assert_eq!(plan.placed.len(), 4);
    let (_, why) = &plan.unplaced[0];
    assert!(why.to_string().contains("disk in slot 0 would need 5000 Mbit/s, limit 4000"), "{why}");
}

#[test]
fn replicas_spread_and_security_tiers_never_share() {
    let mut gs: Vec<GuestSpec> =
        (0..3).map(|i| GuestSpec { anti_affinity: Some(Group(7)), ..guest(&format!("db{i}"), &[10], 100) }).collect();
    gs.push(GuestSpec { tier: Some(Tier(1)), ..guest("dmz", &[10], 100) });
    gs.push(GuestSpec { tier: Some(Tier(2)), ..guest("internal", &[10], 100) });
    let (mut c, hs, g) = build(vec![host("a", 10_000, 8192), host("b", 10_000, 8192), host("c", 10_000, 8192)], gs);
    let plan = place_all(&mut c, &g[..3], &Limits::FULL, Strategy::MostPacked);
    assert!(plan.unplaced.is_empty());
    assert!(hs.iter().all(|&h| c.residents(h).len() == 1), "three replicas on three hosts, even when packing");
    let dmz_host = place_all(&mut c, &g[3..4], &Limits::FULL, Strategy::MostPacked).placed[0].1;
    assert!(matches!(c.check(g[4], dmz_host, &Limits::FULL), Err(Misfit::Tier { .. })));
    let fourth = GuestSpec { anti_affinity: Some(Group(7)), ..guest("db3", &[10], 100) };
    let g4 = c.add_guest(fourth, None).unwrap();
    let err = c.best_host(g4, &Limits::FULL, Strategy::MostPacked, |_| true).unwrap_err();
    assert!(err.to_string().contains("3 × anti-affinity"), "{err}");
}

#[test]
fn a_host_keeps_the_memory_of_guests_migrating_away_until_the_plan_is_done() {
    let (mut c, hs, gs) = build(
        vec![host("a", 10_000, 1000), host("b", 10_000, 1000)],
        vec![guest("leaving", &[10], 600), guest("arriving", &[10], 600)],
    );
    c.assign(gs[0], hs[0]);
    c.assign(gs[1], hs[1]);
    c.move_guest(gs[0], hs[1]);
    assert_eq!(c.held_memory(hs[0]), 600);
    // While "leaving" is still being copied, "a" has no room for another
    // 600 MiB guest, although the plan took "leaving" off it.
    assert!(matches!(c.check(gs[1], hs[0], &Limits::FULL), Err(Misfit::Capacity { .. })));
    c.cancel_move(gs[0], hs[0]);
    assert_eq!(c.held_memory(hs[0]), 0);
    assert_eq!(c.host_of(gs[0]), Some(hs[0]));
}

#[test]
fn failover_restarts_high_priority_first_on_distinct_least_loaded_hosts() {
    let mut guests: Vec<GuestSpec> =
        (0..3).map(|i| GuestSpec { priority: 10 * i as u8, ..guest(&format!("g{i}"), &[100], 100) }).collect();
    guests.push(guest("busy", &[4000], 100));
    let hosts =
        vec![host("failed", 10_000, 8192), host("x", 10_000, 8192), host("y", 10_000, 8192), host("z", 10_000, 8192)];
    let (mut c, hs, gs) = build(hosts, guests);
    for &g in &gs[..3] {
        c.assign(g, hs[0]);
    }
    c.assign(gs[3], hs[1]);
    let plan = failover(&c, hs[0], &FailoverParams::default());
    assert!(plan.unplaced.is_empty());
    let order: Vec<&str> = plan.restarts.iter().map(|r| c.guest(r.guest).name.as_str()).collect();
    assert_eq!(order, ["g2", "g1", "g0"]);
    let mut targets: Vec<HostIx> = plan.restarts.iter().map(|r| r.host).collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), 3, "no two restarts on one host while another can take one");
    assert_eq!(plan.restarts[0].host, hs[2], "least loaded first (x runs a busy guest)");
    assert!(plan.restarts.iter().all(|r| r.wave == 0));
    let what_if = what_if_lose(&c, hs[0], &FailoverParams::default());
    assert_eq!(what_if, plan);
}

#[test]
fn rebalancing_relieves_a_hot_host_with_the_cheapest_move_and_says_why() {
    let (mut c, hs, gs) = build(
        vec![host("hot", 1000, 8192), host("cool", 1000, 8192)],
        vec![guest("big-mem", &[400], 4000), guest("small-mem", &[400], 500), guest("third", &[300], 500)],
    );
    for &g in &gs {
        c.assign(g, hs[0]);
    }
    let params = BalanceParams {
        hot: Limits::uniform(1.0).with_cpu(0.9, 0.0),
        target: Limits::uniform(1.0).with_cpu(0.8, 0.0),
        strategy: Strategy::LeastLoaded,
        max_moves: 4,
        imbalance: None,
        allow_wake: false,
    };
    let plan = rebalance(&c, &params);
    assert_eq!(plan.moves.len(), 1, "{plan:?}");
    let m = plan.moves[0];
    assert_eq!((c.guest(m.guest).name.as_str(), m.from, m.to), ("small-mem", hs[0], hs[1]));
    assert!(matches!(m.reason, MoveReason::Hot { .. }));
    let why = m.explain(&c);
    assert_eq!(
        why,
        "move small-mem (500 MiB to copy) from hot to cool: hot is hot, at 138 % of its target load, 87 % after"
    );
    // Within the budget only: none allowed, the host stays hot and says so.
    let plan = rebalance(&c, &BalanceParams { max_moves: 0, ..params });
    assert!(plan.moves.is_empty());
    assert_eq!(plan.unresolved.len(), 1);
    assert!(plan.unresolved[0].1.contains("budget"), "{:?}", plan.unresolved);
}

#[test]
fn a_host_past_its_target_in_one_dimension_receives_no_guest_even_one_that_leaves_it_alone() {
    // "backup" keeps host "busy-disk" at 75 % of its disk bandwidth in the
    // night slot: past the 70 % target, below the hot limit. The guest that
    // relieves "hot" needs no disk at all, yet "busy-disk" may not take it:
    // a receiver ends within the target everywhere, or receives nothing.
    let backup = GuestSpec {
        demand: Profile::from_slots(vec![Resources::new(0, 512, 0, 3000), Resources::new(0, 512, 0, 0)]).unwrap(),
        ..guest("backup", &[0, 0], 512)
    };
    let (mut c, hs, gs) = build(
        vec![host("hot", 1000, 8192), host("busy-disk", 1000, 8192), host("idle", 1000, 8192)],
        vec![guest("web", &[500, 500], 512), guest("app", &[500, 500], 512), backup],
    );
    c.assign(gs[0], hs[0]);
    c.assign(gs[1], hs[0]);
    c.assign(gs[2], hs[1]);
    let params = BalanceParams {
        hot: Limits::uniform(1.0).with_cpu(0.9, 0.0),
        target: Limits::uniform(0.7),
        strategy: Strategy::MostPacked,
        max_moves: 4,
        imbalance: None,
        allow_wake: false,
    };
    let plan = rebalance(&c, &params);
    assert_eq!(plan.moves.len(), 1, "{plan:?}");
    assert_eq!((plan.moves[0].from, plan.moves[0].to), (hs[0], hs[2]), "{plan:?}");
    assert!(plan.unresolved.is_empty(), "{plan:?}");
    match c.check(gs[0], hs[1], &params.target) {
        Err(Misfit::Capacity { dim: Dim::Disk, slot: 0, needed: 3000, limit: 2800 }) => {}
        other => panic!("busy-disk is past its disk target already: {other:?}"),
    }
}

#[test]
fn consolidation_empties_the_light_host_and_keeps_the_efficient_one() {
    let mut g4 = host("g4", 3720, 4096);
    g4.power = PowerModel::spec_power(G4, 5.0).unwrap();
    let (mut c, hs, gs) = build(
        vec![g4, host("g5", 5320, 4096), host("spare", 5320, 4096)],
        vec![guest("a", &[1000], 0), guest("b", &[1200], 0)],
    );
    c.assign(gs[0], hs[0]);
    c.assign(gs[1], hs[1]);
    c.set_power_state(hs[2], PowerState::Standby);
    let params = ConsolidateParams {
        target: Limits::FULL.with_cpu(0.8, 0.0),
        below: 0.7,
        max_moves: 10,
        max_hosts: 10,
        min_on: 1,
    };
    let plan = consolidate(&c, &params);
    assert_eq!(plan.standby, vec![hs[0]], "the G4 does the same work with more watts");
    assert_eq!(plan.moves.len(), 1);
    assert_eq!((plan.moves[0].guest, plan.moves[0].to), (gs[0], hs[1]));
    // Moved guests are reluctant: nothing moves for consolidation.
    c.set_mobility(gs[0], Mobility::Reluctant);
    assert!(consolidate(&c, &params).moves.iter().all(|m| m.guest != gs[0]));
}

#[test]
fn hosts_wake_ahead_of_a_slot_whose_load_the_hosts_on_cannot_carry() {
    // Two slots: now, and an hour ahead when both guests peak.
    let (mut c, hs, gs) = build(
        vec![host("on", 4000, 4096), host("off-1", 4000, 4096), host("off-2", 4000, 4096)],
        vec![guest("a", &[500, 2500], 512), guest("b", &[500, 2500], 512)],
    );
    c.assign(gs[0], hs[0]);
    c.assign(gs[1], hs[0]);
    c.set_power_state(hs[1], PowerState::Standby);
    c.set_power_state(hs[2], PowerState::Standby);
    let target = Limits::FULL.with_cpu(0.7, 0.0);
    // 5000 milli-cores ahead; one host carries 2800 within the target: one
    // more host (2 × 2800 ≥ 5000), not two.
    assert_eq!(wake_ahead(&c, &target, 1).len(), 1);
    let params = ConsolidateParams { target, below: 0.7, max_moves: 10, max_hosts: 10, min_on: 1 };
    let plan = plan_power(&c, &params);
    assert_eq!(plan.wake.len(), 1);
    assert!(plan.moves.is_empty() && plan.standby.is_empty(), "a round that wakes does not empty: {plan:?}");
    // Memory counts too: 5 GiB of guests need a second 4 GiB host.
    let (mut c, hs, gs) = build(
        vec![host("on", 8000, 4096), host("off", 8000, 4096)],
        vec![guest("a", &[100], 2560), guest("b", &[100], 2560)],
    );
    c.assign(gs[0], hs[0]);
    c.assign(gs[1], hs[0]);
    c.set_power_state(hs[1], PowerState::Standby);
    assert_eq!(wake_ahead(&c, &target, 1), vec![hs[1]]);
    // And `min_on` is kept whatever the load.
    let (mut c, hs, _) = build(vec![host("on", 8000, 4096), host("off", 8000, 4096)], vec![guest("a", &[100], 64)]);
    c.set_power_state(hs[1], PowerState::Standby);
    assert_eq!(wake_ahead(&c, &target, 2), vec![hs[1]]);
    assert!(wake_ahead(&c, &target, 1).is_empty());
}

#[test]
fn a_quiet_cluster_consolidates_but_not_a_host_whose_load_rises_within_the_window() {
    let quiet = |ahead: u32| {
        let (mut c, hs, gs) = build(
            vec![host("h1", 4000, 4096), host("h2", 4000, 4096), host("h3", 4000, 4096)],
            vec![guest("a", &[300, 300], 256), guest("b", &[300, ahead], 256), guest("c", &[300, 300], 256)],
        );
        for i in 0..3 {
            c.assign(gs[i], hs[i]);
        }
        c
    };
    let params = ConsolidateParams {
        target: Limits::FULL.with_cpu(0.7, 0.0),
        below: 0.5,
        max_moves: 10,
        max_hosts: 10,
        min_on: 1,
    };
    let plan = plan_power(&quiet(300), &params);
    assert!(plan.wake.is_empty());
    assert_eq!(plan.standby.len(), 2, "{plan:?}");
    assert_eq!(plan.moves.len(), 2);
    // Guest b peaks within the window: its host stays on, and nothing else
    // has room for it at its peak next to the others.
    let c = quiet(2600);
    let plan = plan_power(&c, &params);
    let b_host = c.host_of(GuestIx(1)).unwrap();
    assert!(!plan.standby.contains(&b_host), "{plan:?}");
    // An empty host stays on when the others could not carry the load
    // ahead without it: emptying it would only wake it next round.
    let (mut c, hs, gs) = build(
        vec![host("h1", 4000, 4096), host("h2", 4000, 4096)],
        vec![guest("a", &[300, 2000], 256), guest("b", &[300, 2000], 256)],
    );
    c.assign(gs[0], hs[0]);
    c.assign(gs[1], hs[0]);
    let plan = plan_power(&c, &params);
    assert!(plan.wake.is_empty() && plan.standby.is_empty() && plan.moves.is_empty(), "{plan:?}");
    // Unschedulable hosts (maintenance, down) are not emptied by DPM.
    let mut c = quiet(300);
    for h in c.hosts().collect::<Vec<_>>() {
        c.set_schedulable(h, false);
    }
    let plan = plan_power(&c, &params);
    assert!(plan.standby.is_empty() && plan.moves.is_empty(), "{plan:?}");
}

#[test]
fn headroom_and_what_if_add_answer_capacity_questions() {
    let (mut c, hs, gs) =
        build(vec![host("a", 1000, 4096), host("b", 1000, 4096)], vec![guest("day", &[100, 700], 1024)]);
    c.assign(gs[0], hs[0]);
    let limits = Limits::uniform(0.9);
    let free = cluster_headroom(&c, &limits);
    assert_eq!(free.iter().map(|r| r.cpu).collect::<Vec<_>>(), vec![1700, 1100]);
    let like = guest("like-day", &[100, 700], 1024);
    let w = what_if_add(&c, &like, 5, &limits, Strategy::MostPacked).unwrap();
    assert_eq!(w.fits, 1, "only host b has 700 left in the busy slot");
    assert!(w.first_failure.unwrap().to_string().contains("cpu"));
}
