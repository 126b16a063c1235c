//! Placement: pure decisions about where guests go. No I/O — the same code
//! serves the live manager and the simulator (`drove sim`).
//!
//! Two layers:
//!
//! - [`place`]: the manager's admission of one new guest today — memory is
//!   never overcommitted, vCPUs up to a ratio, the host with the most free
//!   memory wins (ties by fewest vCPUs, then id, so decisions repeat).
//! - The engine ([`Cluster`] and the decision functions around it): a
//!   multi-resource model (CPU, memory, NIC and disk/HBA bandwidth), each
//!   guest with a load profile over the day, filters (capacity in every
//!   slot, anti-affinity, security tiers, host state, HA reserve) and scores
//!   (most-packed with complementary profiles, least-loaded, migration
//!   cost). On top of it:
//!
//! | function | question it answers | used by |
//! |---|---|---|
//! | [`place_all`] | where do these new guests go? | admission, `drove bench placement` |
//! | [`failover`] | host X died: where does each guest restart, in which wave? | HA |
//! | [`rebalance`] | which hosts are hot, which guests move where, and why? | DRS, the simulator |
//! | [`consolidate`], [`wake_for_demand`], [`wake_ahead`], [`plan_power`] | which hosts can go to standby, which must wake? | DPM, the simulator |
//! | [`headroom`], [`what_if_add`], [`what_if_lose`] | how much room is left per time of day? | capacity planning |
//! | [`PowerModel`] | how many watts at this load? | DPM, the simulator |
//! | [`History`], [`daily_profile`] | what do measurements predict? | the simulator, profiles from agents |
//!
//! Decision functions take a `&Cluster` and return a plan; they never
//! change the caller's cluster. Hosts and guests are addressed by their
//! index in the cluster ([`HostIx`], [`GuestIx`]); mapping them to typed
//! ids is the caller's business, which keeps the hot loops on flat arrays.

pub mod balance;
pub mod capacity;
pub mod cluster;
pub mod dpm;
pub mod forecast;
pub mod plan;
pub mod power;
pub mod profile;
pub mod resources;

pub use balance::{BalanceParams, BalancePlan, Move, MoveReason, rebalance, standby_by_efficiency};
pub use capacity::{Headroom, WhatIfAdd, cluster_headroom, headroom, what_if_add, what_if_lose};
pub use cluster::{
    Cluster, ClusterError, Group, GuestIx, GuestSpec, HostIx, HostSpec, Limits, Misfit, Mobility, NoHost, Strategy,
    Tier,
};
pub use dpm::{ConsolidateParams, ConsolidationPlan, PowerPlan, consolidate, plan_power, wake_ahead, wake_for_demand};
pub use forecast::{History, daily_profile};
pub use plan::{FailoverParams, FailoverPlan, PlacementPlan, Restart, failover, packing_order, place_all};
pub use power::{InvalidPowerTransition, PowerEvent, PowerModel, PowerModelError, PowerState};
pub use profile::{Profile, ProfileError};
pub use resources::{DIMS, Dim, Resources};

use drove_model::{ByteSize, HostId};

/// What placement needs to know of a host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCapacity {
    pub id: HostId,
    pub name: String,
    /// Whether the host takes new guests (up, not in maintenance).
    pub schedulable: bool,
    pub cores: u32,
    pub memory: ByteSize,
    pub allocated_vcpus: u32,
    pub allocated_memory: ByteSize,
    /// The host's uplink (what its guests' traffic to other hosts shares),
    /// bits per second; `None`: not managed.
    pub uplink_bps: Option<u64>,
    /// The sum of the NIC rate limits of its guests: bandwidth reserved on
    /// the uplink.
    pub allocated_nic_bps: u64,
}

impl HostCapacity {
    /// Counts `req` as placed here.
    pub fn hold(&mut self, req: &Request) {
        self.allocated_vcpus += req.vcpus;
        self.allocated_memory = ByteSize(self.allocated_memory.bytes() + req.memory.bytes());
        self.allocated_nic_bps += req.nic_bps;
    }

    fn free_memory(&self) -> u64 {
        self.memory.bytes().saturating_sub(self.allocated_memory.bytes())
    }
    fn vcpu_limit(&self, policy: &Policy) -> u64 {
        (f64::from(self.cores) * policy.vcpu_overcommit).floor() as u64
    }
    /// Why `req` does not fit here now, if it does not.
    fn misfit(&self, req: &Request, policy: &Policy) -> Option<String> {
        if !self.schedulable {
            return Some(format!("host {} is not accepting guests", self.name));
        }
        if req.memory.bytes() > self.free_memory() {
            return Some(format!(
                "host {} has {} memory free, {} requested",
                self.name,
                ByteSize(self.free_memory()),
                req.memory
            ));
        }
        let vcpus = u64::from(self.allocated_vcpus) + u64::from(req.vcpus);
        if vcpus > self.vcpu_limit(policy) {
            return Some(format!(
                "host {} would have {vcpus} vCPUs allocated, limit {} ({} cores x {})",
                self.name,
                self.vcpu_limit(policy),
                self.cores,
                policy.vcpu_overcommit
            ));
        }
        if let Some(uplink) = self.uplink_bps
            && self.allocated_nic_bps + req.nic_bps > uplink
        {
            return Some(format!(
                "host {} has {} of its {} uplink reserved by NIC limits, {} more requested",
                self.name,
                Mbit(self.allocated_nic_bps),
                Mbit(uplink),
                Mbit(req.nic_bps)
            ));
        }
        None
    }
    /// Whether `req` could fit on this host if it were empty.
    fn could_ever_hold(&self, req: &Request, policy: &Policy) -> bool {
        req.memory <= self.memory
            && u64::from(req.vcpus) <= self.vcpu_limit(policy)
            && self.uplink_bps.is_none_or(|u| req.nic_bps <= u)
    }
}

/// The resources a new guest asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub vcpus: u32,
    pub memory: ByteSize,
    /// The sum of its NICs' rate limits, bits per second (NICs without a
    /// limit reserve nothing: they share what is left, fairly).
    pub nic_bps: u64,
}

impl Request {
    /// What a guest of `spec` asks for.
    pub fn of(spec: &drove_model::GuestSpec) -> Self {
        Request { vcpus: spec.vcpus, memory: spec.memory, nic_bps: spec.nic_reservation() }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} vCPUs and {} memory", self.vcpus, self.memory)?;
        if self.nic_bps > 0 {
            write!(f, " and {} of uplink", Mbit(self.nic_bps))?;
        }
        Ok(())
    }
}

/// Bits per second, printed in Mbit/s.
struct Mbit(u64);

impl std::fmt::Display for Mbit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} Mbit/s", self.0 as f64 / 1e6)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// vCPUs allowed per physical core.
    pub vcpu_overcommit: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { vcpu_overcommit: 4.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no host is registered")]
    NoHosts,
    #[error("no host can ever hold {request} (largest host: {largest_cores} cores, {largest_memory}{largest_uplink})")]
    TooLarge { request: String, largest_cores: u32, largest_memory: ByteSize, largest_uplink: String },
    #[error("no host has room for {request} now ({hosts} hosts checked; most free memory: {most_free})")]
    NoRoom { request: String, hosts: usize, most_free: ByteSize },
    #[error("{reason}")]
    PinnedMisfit { host: HostId, reason: String },
    #[error("pinned host {0} is not known")]
    UnknownHost(HostId),
}

/// Choose a host for `req`. With `pinned`, only that host is considered.
pub fn place(
    hosts: &[HostCapacity],
    req: Request,
    pinned: Option<HostId>,
    policy: &Policy,
) -> Result<HostId, PlacementError> {
    if let Some(id) = pinned {
        let host = hosts.iter().find(|h| h.id == id).ok_or(PlacementError::UnknownHost(id))?;
        return match host.misfit(&req, policy) {
            None => Ok(id),
            Some(reason) => Err(PlacementError::PinnedMisfit { host: id, reason }),
        };
    }
    if hosts.is_empty() {
        return Err(PlacementError::NoHosts);
    }
    if !hosts.iter().any(|h| h.could_ever_hold(&req, policy)) {
        let largest = hosts.iter().max_by_key(|h| (h.memory, h.cores)).ok_or(PlacementError::NoHosts)?;
        let uplinks: Option<Vec<u64>> = hosts.iter().map(|h| h.uplink_bps).collect();
        let largest_uplink = match uplinks.and_then(|u| u.into_iter().max()) {
            Some(u) if req.nic_bps > 0 => format!("; largest uplink {}", Mbit(u)),
            _ => String::new(),
        };
        return Err(PlacementError::TooLarge {
            request: req.to_string(),
            largest_cores: largest.cores,
            largest_memory: largest.memory,
            largest_uplink,
        });
    }
    hosts
        .iter()
        .filter(|h| h.misfit(&req, policy).is_none())
        .max_by(|a, b| {
            a.free_memory().cmp(&b.free_memory()).then(b.allocated_vcpus.cmp(&a.allocated_vcpus)).then(b.id.cmp(&a.id))
        })
        .map(|h| h.id)
        .ok_or_else(|| PlacementError::NoRoom {
            request: req.to_string(),
            hosts: hosts.len(),
            most_free: ByteSize(
                hosts.iter().filter(|h| h.schedulable).map(HostCapacity::free_memory).max().unwrap_or(0),
            ),
        })
}

/// A guest of a failed host, to restart elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evacuee<G> {
    pub guest: G,
    pub request: Request,
    /// Higher restarts first.
    pub priority: u8,
    /// Its anti-affinity group: never onto a host with another member.
    pub group: Option<String>,
}

/// The anti-affinity groups each host holds members of.
pub type HostGroups = std::collections::HashMap<HostId, std::collections::HashSet<String>>;

/// Where the guests of a failed host restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPlan<G> {
    /// In restart order: highest priority first. `wave` counts the guests
    /// placed on the same host before this one, divided by the per-host
    /// limit: wave 0 boots at once, wave 1 when a host's wave 0 is up, ...
    pub restarts: Vec<(G, HostId, usize)>,
    /// Guests no survivor can hold, with the reason.
    pub unplaced: Vec<(G, String)>,
}

/// Plan the restart of a failed host's guests on the `hosts` that survive
/// (pass only those): highest priority first (then larger first, as in
/// first-fit-decreasing), each onto the host that already got the fewest of
/// them — so no two land together while another host could take one — and
/// among those the one with the most free memory, never onto a host with a
/// member of its anti-affinity group (`groups`). `taken` counts guests each
/// host already got in this failover (earlier passes); `per_host` sets the
/// waves.
pub fn plan_restarts<G: Clone>(
    hosts: &[HostCapacity],
    evacuees: &[Evacuee<G>],
    taken: &std::collections::HashMap<HostId, usize>,
    groups: &HostGroups,
    per_host: usize,
    policy: &Policy,
) -> RestartPlan<G> {
    let mut hosts = hosts.to_vec();
    let mut groups = groups.clone();
    let apart = |groups: &HostGroups, e: &Evacuee<G>, h: &HostCapacity| {
        e.group.as_ref().is_none_or(|g| !groups.get(&h.id).is_some_and(|on| on.contains(g)))
    };
    let mut count: Vec<usize> = hosts.iter().map(|h| taken.get(&h.id).copied().unwrap_or(0)).collect();
    let mut order: Vec<&Evacuee<G>> = evacuees.iter().collect();
    order.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(b.request.memory.cmp(&a.request.memory))
            .then(b.request.vcpus.cmp(&a.request.vcpus))
    });
    let mut plan = RestartPlan { restarts: Vec::new(), unplaced: Vec::new() };
    for e in order {
        let best = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.misfit(&e.request, policy).is_none() && apart(&groups, e, h))
            .min_by(|(i, a), (j, b)| {
                count[*i].cmp(&count[*j]).then(b.free_memory().cmp(&a.free_memory())).then(a.id.cmp(&b.id))
            })
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let h = &mut hosts[i];
                h.hold(&e.request);
                if let Some(g) = &e.group {
                    groups.entry(h.id).or_default().insert(g.clone());
                }
                plan.restarts.push((e.guest.clone(), h.id, count[i] / per_host.max(1)));
                count[i] += 1;
            }
            None => {
                let reason = match place(&hosts, e.request, None, policy) {
                    Err(err) => err.to_string(),
                    Ok(_) => match &e.group {
                        Some(g) => format!("every survivor with room runs a guest of its anti-affinity group {g}"),
                        None => "no surviving host fits it".to_owned(),
                    },
                };
                plan.unplaced.push((e.guest.clone(), reason));
            }
        }
    }
    plan
}

/// Whether the cluster keeps room to restart every guest after any
/// `failures` hosts fail: the hosts holding the most memory are assumed
/// lost (the worst case for memory, which is never overcommitted), and
/// their `restartable` guests must fit on the rest. `Err` says which guest
/// would not fit and why.
pub fn check_reserve<G: Clone + std::fmt::Display>(
    hosts: &[HostCapacity],
    restartable: &std::collections::HashMap<HostId, Vec<Evacuee<G>>>,
    groups: &HostGroups,
    failures: usize,
    policy: &Policy,
) -> Result<(), String> {
    if failures == 0 {
        return Ok(());
    }
    let mut by_load: Vec<&HostCapacity> = hosts.iter().collect();
    by_load.sort_by(|a, b| b.allocated_memory.cmp(&a.allocated_memory).then(a.id.cmp(&b.id)));
    if by_load.len() <= failures {
        return Err(format!("{} hosts cannot tolerate {failures} host failures", by_load.len()));
    }
    let (lost, rest) = by_load.split_at(failures);
    let survivors: Vec<HostCapacity> = rest.iter().map(|h| (*h).clone()).collect();
    let evacuees: Vec<Evacuee<G>> =
        lost.iter().flat_map(|h| restartable.get(&h.id).cloned().unwrap_or_default()).collect();
    let plan = plan_restarts(&survivors, &evacuees, &Default::default(), groups, 1, policy);
    match plan.unplaced.first() {
        None => Ok(()),
        Some((g, why)) => {
            let names: Vec<&str> = lost.iter().map(|h| h.name.as_str()).collect();
            Err(format!("if {} failed, guest {g} could not restart: {why}", names.join(" and ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn host(n: u8, cores: u32, mem_gib: u64) -> HostCapacity {
        HostCapacity {
            id: HostId::from_uuid(uuid_from(n)),
            name: format!("h{n}"),
            schedulable: true,
            cores,
            memory: ByteSize::gib(mem_gib),
            allocated_vcpus: 0,
            allocated_memory: ByteSize(0),
            uplink_bps: None,
            allocated_nic_bps: 0,
        }
    }

    fn uuid_from(n: u8) -> drove_model::uuid::Uuid {
        drove_model::uuid::Uuid::from_bytes([n; 16])
    }

    #[test]
    fn spreads_to_most_free_memory() {
        let mut hosts = vec![host(1, 4, 8), host(2, 4, 8)];
        hosts[0].allocated_memory = ByteSize::gib(2);
        let req = Request { vcpus: 1, memory: ByteSize::gib(1), nic_bps: 0 };
        assert_eq!(place(&hosts, req, None, &Policy::default()), Ok(hosts[1].id));
    }

    #[test]
    fn refuses_what_no_host_can_hold_and_says_why() {
        let hosts = vec![host(1, 4, 8)];
        let req = Request { vcpus: 1, memory: ByteSize::gib(9), nic_bps: 0 };
        let err = place(&hosts, req, None, &Policy::default()).expect_err("too large");
        assert!(matches!(err, PlacementError::TooLarge { .. }), "{err}");
        let req = Request { vcpus: 17, memory: ByteSize::gib(1), nic_bps: 0 };
        assert!(matches!(place(&hosts, req, None, &Policy::default()), Err(PlacementError::TooLarge { .. })));
    }

    #[test]
    fn skips_unschedulable_and_full_hosts() {
        let mut hosts = vec![host(1, 4, 8), host(2, 4, 8)];
        hosts[0].schedulable = false;
        hosts[1].allocated_memory = ByteSize::gib(8);
        let req = Request { vcpus: 1, memory: ByteSize::gib(1), nic_bps: 0 };
        assert!(matches!(place(&hosts, req, None, &Policy::default()), Err(PlacementError::NoRoom { .. })));
        let pinned = place(&hosts, req, Some(hosts[0].id), &Policy::default());
        assert!(matches!(pinned, Err(PlacementError::PinnedMisfit { .. })));
    }

    #[test]
    fn nic_limits_reserve_the_uplink() {
        let mut hosts = vec![host(1, 64, 64)];
        hosts[0].uplink_bps = Some(1_000_000_000);
        let req = Request { vcpus: 1, memory: ByteSize::mib(128), nic_bps: 100_000_000 };
        // Ten 100 Mbit/s guests fit a 1 Gbit/s uplink, the eleventh does not.
        for _ in 0..10 {
            assert_eq!(place(&hosts, req, None, &Policy::default()), Ok(hosts[0].id));
            hosts[0].allocated_nic_bps += req.nic_bps;
        }
        let err = place(&hosts, req, Some(hosts[0].id), &Policy::default()).expect_err("uplink full");
        assert!(err.to_string().contains("1000 Mbit/s uplink reserved"), "{err}");
        let unlimited = Request { nic_bps: 0, ..req };
        assert!(place(&hosts, unlimited, None, &Policy::default()).is_ok(), "best-effort NICs reserve nothing");
        let huge = Request { nic_bps: 2_000_000_000, ..req };
        assert!(matches!(place(&hosts, huge, None, &Policy::default()), Err(PlacementError::TooLarge { .. })));
    }

    fn evacuee(n: u32, mib: u64, priority: u8) -> Evacuee<u32> {
        Evacuee {
            guest: n,
            request: Request { vcpus: 1, memory: ByteSize::mib(mib), nic_bps: 0 },
            priority,
            group: None,
        }
    }

    #[test]
    fn restarts_keep_an_anti_affinity_group_apart() {
        let hosts: Vec<HostCapacity> = (1..=3).map(|n| host(n, 8, 8)).collect();
        let mut groups = HostGroups::default();
        groups.entry(hosts[0].id).or_default().insert("db".into());
        let member = |n| Evacuee { group: Some("db".to_owned()), ..evacuee(n, 512, 50) };
        let plan = plan_restarts(
            &hosts,
            &[member(1), member(2), member(3)],
            &Default::default(),
            &groups,
            2,
            &Policy::default(),
        );
        let on: Vec<HostId> = plan.restarts.iter().map(|r| r.1).collect();
        assert_eq!(on.len(), 2, "{plan:?}");
        assert!(!on.contains(&hosts[0].id), "onto a host with a member: {plan:?}");
        assert_ne!(on[0], on[1]);
        assert_eq!(plan.unplaced.len(), 1);
        assert!(plan.unplaced[0].1.contains("anti-affinity group db"), "{}", plan.unplaced[0].1);
    }

    #[test]
    fn restarts_spread_one_per_host_before_doubling_up() {
        let hosts: Vec<HostCapacity> = (1..=3).map(|n| host(n, 8, 8)).collect();
        let guests: Vec<Evacuee<u32>> = (0..6).map(|n| evacuee(n, 512, 50)).collect();
        let plan = plan_restarts(&hosts, &guests, &Default::default(), &Default::default(), 1, &Policy::default());
        assert!(plan.unplaced.is_empty());
        for h in &hosts {
            assert_eq!(plan.restarts.iter().filter(|r| r.1 == h.id).count(), 2, "{plan:?}");
        }
        // One per host per wave.
        assert_eq!(plan.restarts.iter().filter(|r| r.2 == 0).count(), 3);
    }

    #[test]
    fn restarts_go_highest_priority_first_and_say_what_does_not_fit() {
        let hosts = vec![host(1, 8, 1)];
        let guests = vec![evacuee(1, 600, 10), evacuee(2, 600, 90)];
        let plan = plan_restarts(&hosts, &guests, &Default::default(), &Default::default(), 2, &Policy::default());
        assert_eq!(plan.restarts, vec![(2, hosts[0].id, 0)]);
        assert_eq!(plan.unplaced.len(), 1);
        assert_eq!(plan.unplaced[0].0, 1);
        assert!(plan.unplaced[0].1.contains("memory"), "{}", plan.unplaced[0].1);
    }

    #[test]
    fn reserve_check_assumes_the_fullest_hosts_fail() {
        let mut hosts: Vec<HostCapacity> = (1..=3).map(|n| host(n, 8, 4)).collect();
        hosts[0].allocated_memory = ByteSize::gib(3);
        hosts[1].allocated_memory = ByteSize::gib(2);
        let mut on: std::collections::HashMap<HostId, Vec<Evacuee<u32>>> = Default::default();
        on.insert(hosts[0].id, (0..3).map(|n| evacuee(n, 1024, 50)).collect());
        on.insert(hosts[1].id, (3..5).map(|n| evacuee(n, 1024, 50)).collect());
        // Losing h1 (3 GiB): 2 GiB free on h2 and 4 GiB on h3 hold it.
        assert_eq!(check_reserve(&hosts, &on, &Default::default(), 1, &Policy::default()), Ok(()));
        // Losing h1 and h2 (5 GiB): h3 has 4 GiB.
        let err =
            check_reserve(&hosts, &on, &Default::default(), 2, &Policy::default()).expect_err("too little reserve");
        assert!(err.contains("h1 and h2"), "{err}");
        assert!(check_reserve(&hosts, &on, &Default::default(), 3, &Policy::default()).is_err());
    }

    proptest! {
        /// A restart plan never overcommits a survivor and places a guest
        /// on a host that already got one only when every host that fits
        /// it got as many.
        #[test]
        fn restart_plans_never_overcommit(
            sizes in prop::collection::vec((1u32..4, 64u64..2048, 0u8..100), 1..40),
            hosts_n in 1u8..6,
        ) {
            let policy = Policy::default();
            let hosts: Vec<HostCapacity> = (1..=hosts_n).map(|n| host(n, 4, 4)).collect();
            let guests: Vec<Evacuee<usize>> = sizes.iter().enumerate().map(|(i, &(vcpus, mib, priority))| Evacuee {
                guest: i,
                request: Request { vcpus, memory: ByteSize::mib(mib), nic_bps: 0 },
                priority,
                group: None,
            }).collect();
            let plan = plan_restarts(&hosts, &guests, &Default::default(), &Default::default(), 2, &policy);
            prop_assert_eq!(plan.restarts.len() + plan.unplaced.len(), guests.len());
            let mut held = hosts.clone();
            for (g, h, _) in &plan.restarts {
                let host = held.iter_mut().find(|x| x.id == *h).expect("a known host");
                let req = guests[*g].request;
                prop_assert!(host.misfit(&req, &policy).is_none());
                host.hold(&req);
            }
            // Priorities come in order.
            let prios: Vec<u8> = plan.restarts.iter().map(|(g, _, _)| guests[*g].priority).collect();
            prop_assert!(prios.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    proptest! {
        /// Placing guests one by one never overcommits memory or the vCPU
        /// ratio on any host, and only fails when no host has room.
        #[test]
        fn never_overcommits(reqs in prop::collection::vec((1u32..8, 1u64..4096), 1..200)) {
            let policy = Policy::default();
            let mut hosts: Vec<HostCapacity> = (1..=5).map(|n| host(n, 4, 8)).collect();
            for (vcpus, mib) in reqs {
                let req = Request { vcpus, memory: ByteSize::mib(mib), nic_bps: 0 };
                match place(&hosts, req, None, &policy) {
                    Ok(id) => {
                        let h = hosts.iter_mut().find(|h| h.id == id).expect("placed on a known host");
                        h.hold(&req);
                        prop_assert!(h.allocated_memory <= h.memory);
                        prop_assert!(f64::from(h.allocated_vcpus) <= f64::from(h.cores) * policy.vcpu_overcommit);
                    }
                    Err(_) => {
                        prop_assert!(hosts.iter().all(|h| h.misfit(&req, &policy).is_some()));
                    }
                }
            }
        }
    }
}
