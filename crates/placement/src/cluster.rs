//! The placement engine's view of a cluster: hosts with capacities and
//! power states, guests with load profiles and placement rules, and which
//! guest runs where. Every decision function works on a [`Cluster`].
//!
//! A decision is "filters, then scores". The filters say whether a host may
//! take a guest at all ([`Misfit`] says why not): the host accepts guests
//! (powered on, schedulable), its capacity holds the guest in *every* time
//! slot and every dimension (within the [`Limits`], which carry HA reserve
//! and packing targets; a host already past a limit anywhere takes no
//! guest, not even one that adds nothing there), a vCPU is not faster than
//! the host's cores, no other member of the guest's anti-affinity group
//! runs there, and no guest of another security tier does. Among the hosts
//! that pass, a [`Strategy`] scores: most-packed (consolidate; prefers
//! hosts where the guest raises the per-slot peak least, so complementary
//! profiles share) or least-loaded (spread).
//!
//! Guests' data sits in one shared table and assignments in plain vectors,
//! so cloning a cluster to try a plan is cheap and no plan touches the
//! caller's copy unless the caller applies it.

// Per-dimension arrays (capacity, load, limits) are walked in lockstep;
// indexing them by dimension reads clearer than zipping four iterators.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::power::{PowerModel, PowerState};
use crate::profile::Profile;
use crate::resources::{DIMS, Dim, Resources};

/// A host's position in its [`Cluster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostIx(pub u32);

/// A guest's position in its [`Cluster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuestIx(pub u32);

impl HostIx {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl GuestIx {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// An anti-affinity group: at most one member per host (replicas of a
/// service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Group(pub u32);

/// A security tier: guests of different tiers never share a host. Guests
/// without a tier may share with anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tier(pub u16);

/// How willing we are to move a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mobility {
    /// Move when it helps.
    Free,
    /// Moved recently: move only to relieve a hot host, not to consolidate
    /// (this is what keeps rebalancing from thrashing).
    Reluctant,
    /// Never move (being migrated, pinned by the operator).
    Pinned,
}

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSpec {
    pub name: String,
    pub capacity: Resources,
    /// The most CPU one vCPU can use on this host (one core); 0 = no limit.
    pub core_speed: u32,
    pub power: PowerModel,
    pub state: PowerState,
    /// Administratively usable: not down, not in maintenance.
    pub schedulable: bool,
}

/// A guest as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestSpec {
    pub name: String,
    pub demand: Profile,
    pub vcpus: u32,
    /// Memory to copy when it migrates (the migration cost).
    pub migration_mib: u32,
    pub anti_affinity: Option<Group>,
    pub tier: Option<Tier>,
    /// Higher restarts first after a host failure.
    pub priority: u8,
    pub mobility: Mobility,
}

/// How much of each host a plan may fill.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Share of each dimension's capacity a plan may use (1.0 = all of it);
    /// HA reserve and packing targets lower it.
    pub usable: [f64; DIMS],
    /// Keep this many standard deviations of the host's summed CPU variance
    /// free on top of the planned CPU (0 = plan the profile values only).
    pub cpu_sigmas: f64,
}

impl Limits {
    /// The whole capacity of every dimension, no noise margin.
    pub const FULL: Limits = Limits { usable: [1.0; DIMS], cpu_sigmas: 0.0 };

    /// The same share of every dimension.
    pub fn uniform(share: f64) -> Self {
        Limits { usable: [share; DIMS], cpu_sigmas: 0.0 }
    }

    pub fn with_cpu(mut self, cpu_share: f64, cpu_sigmas: f64) -> Self {
        self.usable[Dim::Cpu.index()] = cpu_share;
        self.cpu_sigmas = cpu_sigmas;
        self
    }

    pub(crate) fn limit(&self, capacity: u32, d: usize) -> u64 {
        (f64::from(capacity) * self.usable[d]).floor().max(0.0) as u64
    }
}

/// How to choose among the hosts that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Consolidate: fill hosts, preferring those whose per-slot peak the
    /// guest raises least (complementary profiles).
    MostPacked,
    /// Spread: the host that stays least loaded at its peak.
    LeastLoaded,
}

/// Why a host may not take a guest.
#[derive(Debug, Clone, PartialEq)]
pub enum Misfit {
    NotAccepting { state: PowerState, schedulable: bool },
    Capacity { dim: Dim, slot: usize, needed: u64, limit: u64 },
    CpuMargin { slot: usize, needed: u64, limit: u64, sigmas: f64 },
    CoreSpeed { per_vcpu: u32, core_speed: u32 },
    AntiAffinity { group: Group },
    Tier { host: Tier, guest: Tier },
    AlreadyThere,
    Excluded,
}

impl Misfit {
    /// A short name of the filter that failed, for summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            Misfit::NotAccepting { .. } => "not accepting guests",
            Misfit::Capacity { dim: Dim::Cpu, .. } | Misfit::CpuMargin { .. } => "cpu",
            Misfit::Capacity { dim: Dim::Memory, .. } => "memory",
            Misfit::Capacity { dim: Dim::Net, .. } => "network",
            Misfit::Capacity { dim: Dim::Disk, .. } => "disk",
            Misfit::CoreSpeed { .. } => "core speed",
            Misfit::AntiAffinity { .. } => "anti-affinity",
            Misfit::Tier { .. } => "security tier",
            Misfit::AlreadyThere => "already there",
            Misfit::Excluded => "excluded",
        }
    }
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Misfit::NotAccepting { state, schedulable } => {
                if *schedulable {
                    write!(f, "host is {state}")
                } else {
                    write!(f, "host is not schedulable (down or in maintenance)")
                }
            }
            Misfit::Capacity { dim, slot, needed, limit } => {
                write!(f, "{dim} in slot {slot} would need {needed} {}, limit {limit}", dim.unit())
            }
            Misfit::CpuMargin { slot, needed, limit, sigmas } => {
                write!(f, "cpu in slot {slot} would need {needed} with a {sigmas}-sigma noise margin, limit {limit}")
            }
            Misfit::CoreSpeed { per_vcpu, core_speed } => {
                write!(f, "a vCPU needs {per_vcpu} cpu units, a core gives {core_speed}")
            }
            Misfit::AntiAffinity { group } => write!(f, "another member of anti-affinity group {} runs there", group.0),
            Misfit::Tier { host, guest } => write!(f, "host runs security tier {}, guest is tier {}", host.0, guest.0),
            Misfit::AlreadyThere => write!(f, "the guest already runs there"),
            Misfit::Excluded => write!(f, "excluded by the caller"),
        }
    }
}

/// No host can take a guest: how many hosts failed each filter, with one
/// example each.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no host can take guest {guest} ({})", summarise(.rejected))]
pub struct NoHost {
    pub guest: String,
    /// (filter, number of hosts, an example "host: reason").
    pub rejected: Vec<(&'static str, usize, String)>,
}

fn summarise(rejected: &[(&'static str, usize, String)]) -> String {
    if rejected.is_empty() {
        return "the cluster has no hosts".to_owned();
    }
    rejected.iter().map(|(kind, n, ex)| format!("{n} × {kind}, e.g. {ex}")).collect::<Vec<_>>().join("; ")
}

/// Why a cluster cannot be built as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("a cluster needs at least one time slot")]
    NoSlots,
    #[error("guest {guest} has a profile of {got} slots, the cluster plans {expected}")]
    SlotMismatch { guest: String, got: usize, expected: usize },
    #[error("host {host}: {dim} capacity {value} is too large (limit {max})")]
    TooLarge { host: String, dim: Dim, value: u32, max: u32 },
    #[error("guest {guest}: needs at least one vCPU")]
    NoVcpus { guest: String },
    #[error("{what} index {index} is not in this cluster")]
    UnknownIndex { what: &'static str, index: u32 },
}

const MEM: usize = Dim::Memory.index();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EmptyKey {
    capacity: Resources,
    core_speed: u32,
    state: PowerState,
    schedulable: bool,
    watts_per_unit: u64,
    extra: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct HostStats {
    peak: [u64; DIMS],
    argpeak: [u32; DIMS],
    min: [u64; DIMS],
}

/// Capacities above this are refused so that sums of loads cannot overflow.
const MAX_CAPACITY: u32 = 1 << 30;

#[derive(Debug, Default, Clone)]
struct GuestTable {
    specs: Vec<GuestSpec>,
    /// guests × slots × DIMS
    demand: Vec<u32>,
    /// guests × slots
    var: Vec<u32>,
    peak: Vec<[u32; DIMS]>,
    /// The slot of each dimension's peak, and the minimum over slots.
    argpeak: Vec<[u32; DIMS]>,
    min: Vec<[u32; DIMS]>,
    /// guests × slots: standard deviation of CPU (√var).
    sd: Vec<f64>,
}

/// Hosts, guests and where each guest runs.
#[derive(Debug, Clone)]
pub struct Cluster {
    slots: usize,
    hosts: Vec<HostSpec>,
    guests: Arc<GuestTable>,
    /// hosts × slots × DIMS: the summed demand of the guests on each host.
    load: Vec<u64>,
    /// hosts × slots: summed CPU variance, and its square root.
    var: Vec<u64>,
    sd: Vec<f64>,
    /// Per host and dimension: the peak over slots, its slot, the minimum
    /// (held memory not included). Bounds from these reject most hosts
    /// that cannot fit a guest without looking at every slot.
    stats: Vec<HostStats>,
    residents: Vec<Vec<GuestIx>>,
    tier: Vec<Option<(Tier, u32)>>,
    at: Vec<Option<HostIx>>,
    mobility: Vec<Mobility>,
    /// Where the members of each group run (a host appears once per member).
    groups: HashMap<Group, Vec<HostIx>>,
    /// Memory (MiB) each host still holds for guests that leave it in the
    /// plan being built: a live migration copies memory, so the source
    /// frees it only when the move is done, and a plan must fit while all
    /// its moves run at once.
    held: Vec<u64>,
    /// Each host's watts per unit of CPU work at 80 % load, and the best.
    watts_per_unit: Vec<f64>,
    best_watts_per_unit: f64,
}

impl Cluster {
    /// An empty cluster planning `slots` time slots per day.
    pub fn new(slots: usize) -> Result<Self, ClusterError> {
        if slots == 0 {
            return Err(ClusterError::NoSlots);
        }
        Ok(Cluster {
            slots,
            hosts: Vec::new(),
            guests: Arc::new(GuestTable::default()),
            load: Vec::new(),
            var: Vec::new(),
            sd: Vec::new(),
            stats: Vec::new(),
            residents: Vec::new(),
            tier: Vec::new(),
            at: Vec::new(),
            mobility: Vec::new(),
            groups: HashMap::new(),
            held: Vec::new(),
            watts_per_unit: Vec::new(),
            best_watts_per_unit: f64::INFINITY,
        })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn add_host(&mut self, spec: HostSpec) -> Result<HostIx, ClusterError> {
        for dim in Dim::ALL {
            let value = spec.capacity.get(dim);
            if value > MAX_CAPACITY {
                return Err(ClusterError::TooLarge { host: spec.name, dim, value, max: MAX_CAPACITY });
            }
        }
        let ix = HostIx(self.hosts.len() as u32);
        let wpu = spec.power.watts_per_unit(spec.capacity.cpu.max(1), 0.8);
        self.watts_per_unit.push(wpu);
        self.best_watts_per_unit = self.best_watts_per_unit.min(wpu);
        self.hosts.push(spec);
        self.load.extend(std::iter::repeat_n(0, self.slots * DIMS));
        self.var.extend(std::iter::repeat_n(0, self.slots));
        self.sd.extend(std::iter::repeat_n(0.0, self.slots));
        self.stats.push(HostStats::default());
        self.residents.push(Vec::new());
        self.tier.push(None);
        self.held.push(0);
        Ok(ix)
    }

    /// Add a guest, running on `on` (observed state: no filter is applied)
    /// or not placed yet.
    pub fn add_guest(&mut self, spec: GuestSpec, on: Option<HostIx>) -> Result<GuestIx, ClusterError> {
        if spec.demand.slots() != self.slots {
            return Err(ClusterError::SlotMismatch {
                guest: spec.name,
                got: spec.demand.slots(),
                expected: self.slots,
            });
        }
        if spec.vcpus == 0 {
            return Err(ClusterError::NoVcpus { guest: spec.name });
        }
        if let Some(h) = on {
            self.check_host(h)?;
        }
        let table = Arc::make_mut(&mut self.guests);
        let ix = GuestIx(table.specs.len() as u32);
        let mut argpeak = [0u32; DIMS];
        let mut min = [u32::MAX; DIMS];
        let peak = spec.demand.peak().to_array();
        for s in 0..self.slots {
            let a = spec.demand.slot_array(s);
            for d in 0..DIMS {
                if a[d] == peak[d] && a[d] > spec.demand.slot_array(argpeak[d] as usize)[d] {
                    argpeak[d] = s as u32;
                }
                min[d] = min[d].min(a[d]);
            }
            table.demand.extend_from_slice(&a);
            table.var.push(spec.demand.cpu_variance(s));
            table.sd.push(f64::from(spec.demand.cpu_variance(s)).sqrt());
        }
        table.peak.push(peak);
        table.argpeak.push(argpeak);
        table.min.push(min);
        self.mobility.push(spec.mobility);
        table.specs.push(spec);
        self.at.push(None);
        if let Some(h) = on {
            self.assign(ix, h);
        }
        Ok(ix)
    }

    fn check_host(&self, h: HostIx) -> Result<(), ClusterError> {
        if h.index() < self.hosts.len() { Ok(()) } else { Err(ClusterError::UnknownIndex { what: "host", index: h.0 }) }
    }

    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    pub fn guest_count(&self) -> usize {
        self.guests.specs.len()
    }

    pub fn hosts(&self) -> impl ExactSizeIterator<Item = HostIx> + use<> {
        (0..self.hosts.len() as u32).map(HostIx)
    }

    pub fn guests(&self) -> impl ExactSizeIterator<Item = GuestIx> + use<> {
        (0..self.guests.specs.len() as u32).map(GuestIx)
    }

    pub fn host(&self, h: HostIx) -> &HostSpec {
        &self.hosts[h.index()]
    }

    pub fn guest(&self, g: GuestIx) -> &GuestSpec {
        &self.guests.specs[g.index()]
    }

    pub fn set_power_state(&mut self, h: HostIx, state: PowerState) {
        self.hosts[h.index()].state = state;
    }

    pub fn set_schedulable(&mut self, h: HostIx, schedulable: bool) {
        self.hosts[h.index()].schedulable = schedulable;
    }

    pub fn mobility(&self, g: GuestIx) -> Mobility {
        self.mobility[g.index()]
    }

    pub fn set_mobility(&mut self, g: GuestIx, m: Mobility) {
        self.mobility[g.index()] = m;
    }

    /// Where a guest runs.
    pub fn host_of(&self, g: GuestIx) -> Option<HostIx> {
        self.at[g.index()]
    }

    /// The guests on a host.
    pub fn residents(&self, h: HostIx) -> &[GuestIx] {
        &self.residents[h.index()]
    }

    /// Summed demand of a host's guests in `slot`.
    pub fn load(&self, h: HostIx, slot: usize) -> Resources {
        let o = (h.index() * self.slots + slot) * DIMS;
        Resources::from_array(std::array::from_fn(|d| self.load[o + d].min(u64::from(u32::MAX)) as u32))
    }

    /// Summed CPU variance of a host's guests in `slot`.
    pub fn cpu_variance(&self, h: HostIx, slot: usize) -> u64 {
        self.var[h.index() * self.slots + slot]
    }

    /// A guest's demand in `slot`.
    pub fn demand(&self, g: GuestIx, slot: usize) -> Resources {
        let o = (g.index() * self.slots + slot) * DIMS;
        Resources::from_array(std::array::from_fn(|d| self.guests.demand[o + d]))
    }

    /// A guest's CPU variance in `slot`.
    pub fn demand_variance(&self, g: GuestIx, slot: usize) -> u32 {
        self.guests.var[g.index() * self.slots + slot]
    }

    /// A guest's per-dimension peak over the day.
    pub fn peak_demand(&self, g: GuestIx) -> Resources {
        Resources::from_array(self.guests.peak[g.index()])
    }

    /// Peak utilisation of a host per dimension over all slots, CPU with the
    /// noise margin of `limits` (1.0 = the whole capacity). A dimension of
    /// zero capacity reads 0 when unused and infinity when used.
    pub fn peak_utilisation(&self, h: HostIx, limits: &Limits) -> [f64; DIMS] {
        let cap = self.hosts[h.index()].capacity.to_array();
        let mut out = [0.0f64; DIMS];
        for s in 0..self.slots {
            let o = (h.index() * self.slots + s) * DIMS;
            for d in 0..DIMS {
                let mut level = self.load[o + d] as f64;
                if d == 0 {
                    level += limits.cpu_sigmas * (self.var[h.index() * self.slots + s] as f64).sqrt();
                }
                out[d] = out[d].max(ratio(level, cap[d]));
            }
        }
        out
    }

    /// The worst share of its usable limit a host reaches in any slot and
    /// dimension: above 1.0 the host breaks `limits`.
    pub fn pressure(&self, h: HostIx, limits: &Limits) -> f64 {
        let util = self.peak_utilisation(h, limits);
        (0..DIMS)
            .map(|d| {
                if limits.usable[d] > 0.0 {
                    util[d] / limits.usable[d]
                } else if util[d] > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                }
            })
            .fold(0.0, f64::max)
    }

    /// [`Cluster::pressure`] of host `h` if guest `g` (which runs there)
    /// left it.
    pub fn pressure_without(&self, h: HostIx, g: GuestIx, limits: &Limits) -> f64 {
        let cap = self.hosts[h.index()].capacity.to_array();
        let (slots, gi, hi) = (self.slots, g.index(), h.index());
        let mut worst = 0.0f64;
        for s in 0..slots {
            let (go, ho) = ((gi * slots + s) * DIMS, (hi * slots + s) * DIMS);
            for d in 0..DIMS {
                if limits.usable[d] <= 0.0 {
                    continue;
                }
                let mut level = self.load[ho + d].saturating_sub(u64::from(self.guests.demand[go + d])) as f64;
                if d == 0 && limits.cpu_sigmas > 0.0 {
                    let v = self.var[hi * slots + s].saturating_sub(u64::from(self.guests.var[gi * slots + s]));
                    level += limits.cpu_sigmas * (v as f64).sqrt();
                }
                worst = worst.max(ratio(level, cap[d]) / limits.usable[d]);
            }
        }
        worst
    }

    /// The most a host could still take per dimension in its fullest slot
    /// within `limits` (held memory counted, no noise margin).
    pub fn free(&self, h: HostIx, limits: &Limits) -> [u64; DIMS] {
        let cap = self.hosts[h.index()].capacity.to_array();
        let mut free: [u64; DIMS] = std::array::from_fn(|d| limits.limit(cap[d], d));
        for s in 0..self.slots {
            let o = (h.index() * self.slots + s) * DIMS;
            for (d, f) in free.iter_mut().enumerate() {
                let level = self.load[o + d] + if d == MEM { self.held[h.index()] } else { 0 };
                *f = f.saturating_sub(level).min(limits.limit(cap[d], d).saturating_sub(level));
            }
        }
        free
    }

    /// Run guest `g` on host `h` (moving it if it ran elsewhere). No filter
    /// is applied: decision functions check first, observed state is taken
    /// as it is.
    pub fn assign(&mut self, g: GuestIx, h: HostIx) {
        if self.at[g.index()] == Some(h) {
            return;
        }
        self.unassign(g);
        let (slots, gi, hi) = (self.slots, g.index(), h.index());
        for s in 0..slots {
            let (go, ho) = ((gi * slots + s) * DIMS, (hi * slots + s) * DIMS);
            for d in 0..DIMS {
                self.load[ho + d] += u64::from(self.guests.demand[go + d]);
            }
            self.var[hi * slots + s] += u64::from(self.guests.var[gi * slots + s]);
        }
        self.refresh(hi);
        self.residents[hi].push(g);
        let spec = &self.guests.specs[gi];
        if let Some(t) = spec.tier {
            match &mut self.tier[hi] {
                Some((_, n)) => *n += 1,
                slot @ None => *slot = Some((t, 1)),
            }
        }
        if let Some(grp) = spec.anti_affinity {
            self.groups.entry(grp).or_default().push(h);
        }
        self.at[gi] = Some(h);
    }

    /// Live-migrate `g` to `h` as part of a plan: like [`Cluster::assign`],
    /// but its old host keeps holding the guest's memory until the plan is
    /// done (see [`Cluster::held_memory`]).
    pub fn move_guest(&mut self, g: GuestIx, h: HostIx) {
        if let Some(from) = self.at[g.index()]
            && from != h
        {
            self.held[from.index()] += u64::from(self.guests.peak[g.index()][Dim::Memory.index()]);
        }
        self.assign(g, h);
    }

    /// Take back a [`Cluster::move_guest`] of `g` from `from`.
    pub fn cancel_move(&mut self, g: GuestIx, from: HostIx) {
        if self.at[g.index()] != Some(from) {
            let mem = u64::from(self.guests.peak[g.index()][Dim::Memory.index()]);
            self.held[from.index()] = self.held[from.index()].saturating_sub(mem);
            self.assign(g, from);
        }
    }

    /// Memory a host holds for guests still migrating away in this plan.
    pub fn held_memory(&self, h: HostIx) -> u64 {
        self.held[h.index()]
    }

    /// Take guest `g` off its host (it stops or is about to be re-placed).
    pub fn unassign(&mut self, g: GuestIx) {
        let Some(h) = self.at[g.index()] else { return };
        let (slots, gi, hi) = (self.slots, g.index(), h.index());
        for s in 0..slots {
            let (go, ho) = ((gi * slots + s) * DIMS, (hi * slots + s) * DIMS);
            for d in 0..DIMS {
                self.load[ho + d] -= u64::from(self.guests.demand[go + d]);
            }
            self.var[hi * slots + s] -= u64::from(self.guests.var[gi * slots + s]);
        }
        self.refresh(hi);
        if let Some(pos) = self.residents[hi].iter().position(|&x| x == g) {
            self.residents[hi].swap_remove(pos);
        }
        let spec = &self.guests.specs[gi];
        if spec.tier.is_some()
            && let Some((_, n)) = &mut self.tier[hi]
        {
            *n -= 1;
            if *n == 0 {
                self.tier[hi] = None;
            }
        }
        if let Some(list) = spec.anti_affinity.and_then(|grp| self.groups.get_mut(&grp))
            && let Some(pos) = list.iter().position(|&x| x == h)
        {
            list.swap_remove(pos);
        }
        self.at[gi] = None;
    }

    /// Recompute a host's √variance per slot and its peak/min statistics
    /// after its guests changed.
    fn refresh(&mut self, hi: usize) {
        let slots = self.slots;
        let mut st = HostStats { peak: [0; DIMS], argpeak: [0; DIMS], min: [u64::MAX; DIMS] };
        for s in 0..slots {
            self.sd[hi * slots + s] = (self.var[hi * slots + s] as f64).sqrt();
            let o = (hi * slots + s) * DIMS;
            for d in 0..DIMS {
                let v = self.load[o + d];
                if v > st.peak[d] {
                    st.peak[d] = v;
                    st.argpeak[d] = s as u32;
                }
                st.min[d] = st.min[d].min(v);
            }
        }
        self.stats[hi] = st;
    }

    /// The hosts where other members of `g`'s anti-affinity group run.
    fn group_hosts(&self, g: GuestIx) -> &[HostIx] {
        self.guest(g).anti_affinity.and_then(|grp| self.groups.get(&grp)).map_or(&[], Vec::as_slice)
    }

    /// Whether `h` may take `g` under `limits`; on success, the score of the
    /// move under `strategy` (lower is better).
    pub fn evaluate(&self, g: GuestIx, h: HostIx, limits: &Limits, strategy: Strategy) -> Result<f64, Misfit> {
        self.evaluate_with(g, h, limits, strategy, self.group_hosts(g))
    }

    /// Whether `h` may take `g` under `limits`.
    pub fn check(&self, g: GuestIx, h: HostIx, limits: &Limits) -> Result<(), Misfit> {
        self.evaluate(g, h, limits, Strategy::MostPacked).map(|_| ())
    }

    fn evaluate_with(
        &self,
        g: GuestIx,
        h: HostIx,
        limits: &Limits,
        strategy: Strategy,
        group_hosts: &[HostIx],
    ) -> Result<f64, Misfit> {
        let host = &self.hosts[h.index()];
        if !(host.schedulable && host.state.accepts_guests()) {
            return Err(Misfit::NotAccepting { state: host.state, schedulable: host.schedulable });
        }
        if self.at[g.index()] == Some(h) {
            return Err(Misfit::AlreadyThere);
        }
        let spec = &self.guests.specs[g.index()];
        if let (Some(gt), Some((ht, _))) = (spec.tier, self.tier[h.index()])
            && gt != ht
        {
            return Err(Misfit::Tier { host: ht, guest: gt });
        }
        if let Some(group) = spec.anti_affinity
            && group_hosts.contains(&h)
        {
            return Err(Misfit::AntiAffinity { group });
        }
        let gpeak = self.guests.peak[g.index()];
        if host.core_speed > 0 {
            let per_vcpu = gpeak[0].div_ceil(spec.vcpus);
            if per_vcpu > host.core_speed {
                return Err(Misfit::CoreSpeed { per_vcpu, core_speed: host.core_speed });
            }
        }
        self.fit_and_score(g, h, limits, strategy)
    }

    /// The slot-by-slot part of the filter, and the score. Bounds from the
    /// host's and the guest's peaks and minima reject most misfits at once;
    /// otherwise one pass over the slots, in integers, with a square root
    /// only where the CPU noise margin is tight.
    fn fit_and_score(&self, g: GuestIx, h: HostIx, limits: &Limits, strategy: Strategy) -> Result<f64, Misfit> {
        let cap = self.hosts[h.index()].capacity.to_array();
        let lim: [u64; DIMS] = std::array::from_fn(|d| limits.limit(cap[d], d));
        let slots = self.slots;
        let (gi, hi) = (g.index(), h.index());
        let gd = &self.guests.demand[gi * slots * DIMS..(gi + 1) * slots * DIMS];
        let hl = &self.load[hi * slots * DIMS..(hi + 1) * slots * DIMS];
        let held = self.held[hi];
        let extra = |d: usize| if d == MEM { held } else { 0 };
        let (st, garg) = (&self.stats[hi], &self.guests.argpeak[gi]);
        for d in 0..DIMS {
            // The likeliest slots to overflow: the host's peak and the
            // guest's peak. A hit there spares the pass over all slots.
            // The host's peak counts even where the guest adds nothing: a
            // host already past a limit (load observed above a target, or
            // memory held for guests leaving it) would still be past it
            // after the move, and a plan promises that every host it fills
            // ends within the limits.
            for slot in [st.argpeak[d] as usize, garg[d] as usize] {
                let needed = hl[slot * DIMS + d] + extra(d) + u64::from(gd[slot * DIMS + d]);
                if needed > lim[d] {
                    return Err(Misfit::Capacity { dim: Dim::ALL[d], slot, needed, limit: lim[d] });
                }
            }
        }
        let mut before = [0u64; DIMS];
        let mut after = [0u64; DIMS];
        let (mut cpu_before, mut cpu_after) = (0.0f64, 0.0f64);
        let z = limits.cpu_sigmas;
        let (hsd, gsd) = (&self.sd[hi * slots..(hi + 1) * slots], &self.guests.sd[gi * slots..(gi + 1) * slots]);
        for s in 0..slots {
            for d in 0..DIMS {
                let b = hl[s * DIMS + d] + extra(d);
                let add = u64::from(gd[s * DIMS + d]);
                let a = b + add;
                if a > lim[d] {
                    return Err(Misfit::Capacity { dim: Dim::ALL[d], slot: s, needed: a, limit: lim[d] });
                }
                before[d] = before[d].max(b);
                after[d] = after[d].max(a);
            }
            if z > 0.0 {
                let a = (hl[s * DIMS] + u64::from(gd[s * DIMS])) as f64;
                // √(V+v) ≤ √V + √v: when even the bound fits, no root is
                // needed; the score uses the bound (it only ranks hosts).
                let mut level = a + z * (hsd[s] + gsd[s]);
                if level > lim[0] as f64 {
                    let v = self.var[hi * slots + s] + u64::from(self.guests.var[gi * slots + s]);
                    level = a + z * (v as f64).sqrt();
                    if level > lim[0] as f64 {
                        return Err(Misfit::CpuMargin {
                            slot: s,
                            needed: level.ceil() as u64,
                            limit: lim[0],
                            sigmas: z,
                        });
                    }
                }
                cpu_before = cpu_before.max(hl[s * DIMS] as f64 + z * hsd[s]);
                cpu_after = cpu_after.max(level);
            }
        }
        let level = |d: usize, v: [u64; DIMS], cpu: f64| if d == 0 && z > 0.0 { cpu } else { v[d] as f64 };
        let mut cost = 0.0;
        match strategy {
            Strategy::MostPacked => {
                // Raise the peaks least (complementary profiles), then fill
                // the fullest host (best fit); among hosts equally full, the
                // one that does the work with fewer watts.
                for d in 0..DIMS {
                    if cap[d] > 0 {
                        let c = f64::from(cap[d]);
                        let (b, a) = (level(d, before, cpu_before), level(d, after, cpu_after));
                        cost += (a - b) / c - 0.1 * a / c;
                    }
                }
                cost += 0.05 * self.watts_per_unit[hi] / self.best_watts_per_unit;
            }
            Strategy::LeastLoaded => {
                let mut worst = 0.0f64;
                for d in 0..DIMS {
                    if cap[d] > 0 {
                        let u = level(d, after, cpu_after) / f64::from(cap[d]);
                        worst = worst.max(u);
                        cost += 0.01 * u;
                    }
                }
                cost += worst;
            }
        }
        Ok(cost)
    }

    /// The best host for `g` among those `allow` admits, or why there is
    /// none. Ties go to the lower host index, so decisions are repeatable.
    pub fn best_host(
        &self,
        g: GuestIx,
        limits: &Limits,
        strategy: Strategy,
        mut allow: impl FnMut(HostIx) -> bool,
    ) -> Result<(HostIx, f64), NoHost> {
        self.best_host_scored(g, limits, strategy, |h| allow(h).then_some(0.0))
    }

    /// Like [`Cluster::best_host`], with a caller's term added to each
    /// host's score; `None` excludes the host.
    pub fn best_host_scored(
        &self,
        g: GuestIx,
        limits: &Limits,
        strategy: Strategy,
        extra: impl FnMut(HostIx) -> Option<f64>,
    ) -> Result<(HostIx, f64), NoHost> {
        self.best_host_among(g, limits, strategy, self.hosts(), extra)
    }

    /// Like [`Cluster::best_host_scored`], looking only at `hosts` (a
    /// caller that knows which hosts are on saves scanning the others).
    pub fn best_host_among(
        &self,
        g: GuestIx,
        limits: &Limits,
        strategy: Strategy,
        hosts: impl IntoIterator<Item = HostIx>,
        mut extra: impl FnMut(HostIx) -> Option<f64>,
    ) -> Result<(HostIx, f64), NoHost> {
        let group_hosts = self.group_hosts(g);
        let mut best: Option<(HostIx, f64)> = None;
        let mut rejected: Vec<(&'static str, usize, String)> = Vec::new();
        let mut order: Vec<(f64, HostIx, Option<f64>)> = hosts.into_iter().map(|h| (0.0, h, extra(h))).collect();
        if strategy == Strategy::LeastLoaded {
            // A host's score is at least its current peak utilisation: visit
            // hosts from the least loaded and stop once no host left can
            // beat the best found (a failover plan then looks at a handful
            // of hosts, not all of them).
            for (bound, h, p) in &mut order {
                *bound = self.least_loaded_bound(*h) + p.unwrap_or(0.0);
            }
            order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        }
        // Empty hosts of the same make answer alike: evaluate one of each
        // (the first, which also wins ties) and skip its twins. In a large
        // cluster that is most of the hosts.
        let mut empty_seen: Vec<(EmptyKey, Option<Misfit>)> = Vec::new();
        for (bound, h, p) in order {
            if strategy == Strategy::LeastLoaded && best.is_some_and(|(_, c)| bound > c) {
                break;
            }
            let key = self.empty_key(h, p);
            if let Some(key) = &key
                && let Some((_, verdict)) = empty_seen.iter().find(|(k, _)| k == key)
            {
                if let Some(m) = verdict
                    && let Some((_, n, _)) = rejected.iter_mut().find(|(k, _, _)| *k == m.kind())
                {
                    *n += 1;
                }
                continue;
            }
            let r = match p {
                Some(p) => self.evaluate_with(g, h, limits, strategy, group_hosts).map(|c| c + p),
                None => Err(Misfit::Excluded),
            };
            if let Some(key) = key {
                empty_seen.push((key, r.as_ref().err().cloned()));
            }
            match r {
                Ok(cost) => {
                    if best.is_none_or(|(bh, c)| cost < c || (cost == c && h < bh)) {
                        best = Some((h, cost));
                    }
                }
                Err(m) => {
                    let kind = m.kind();
                    match rejected.iter_mut().find(|(k, _, _)| *k == kind) {
                        Some((_, n, _)) => *n += 1,
                        None => rejected.push((kind, 1, format!("{}: {m}", self.hosts[h.index()].name))),
                    }
                }
            }
        }
        best.ok_or_else(|| NoHost { guest: self.guest(g).name.clone(), rejected })
    }

    /// A lower bound of a host's least-loaded score: its peak utilisation
    /// now (a guest only adds to it).
    fn least_loaded_bound(&self, h: HostIx) -> f64 {
        let cap = self.hosts[h.index()].capacity.to_array();
        let st = &self.stats[h.index()];
        let (mut worst, mut sum) = (0.0f64, 0.0f64);
        for d in 0..DIMS {
            if cap[d] > 0 {
                let held = if d == MEM { self.held[h.index()] } else { 0 };
                let u = (st.peak[d] + held) as f64 / f64::from(cap[d]);
                worst = worst.max(u);
                sum += u;
            }
        }
        worst + 0.01 * sum
    }

    /// What makes an empty host's answer for any guest: its make and
    /// state, and the caller's term. `None` for a host that runs guests or
    /// holds memory.
    fn empty_key(&self, h: HostIx, extra: Option<f64>) -> Option<EmptyKey> {
        let hi = h.index();
        if !self.residents[hi].is_empty() || self.held[hi] != 0 {
            return None;
        }
        let spec = &self.hosts[hi];
        Some(EmptyKey {
            capacity: spec.capacity,
            core_speed: spec.core_speed,
            state: spec.state,
            schedulable: spec.schedulable,
            watts_per_unit: self.watts_per_unit[hi].to_bits(),
            extra: extra.map(f64::to_bits),
        })
    }

    /// Check the whole cluster against `limits` and the rules: every host
    /// within its limits in every slot and dimension, anti-affinity and
    /// tiers respected. Returns every violation found (empty = sound). Tests
    /// and callers that take observed state use it.
    pub fn violations(&self, limits: &Limits) -> Vec<String> {
        let mut out = Vec::new();
        for h in self.hosts() {
            let name = &self.hosts[h.index()].name;
            let cap = self.hosts[h.index()].capacity.to_array();
            for s in 0..self.slots {
                let o = (h.index() * self.slots + s) * DIMS;
                for d in 0..DIMS {
                    let lim = limits.limit(cap[d], d);
                    let level = self.load[o + d] + if d == MEM { self.held[h.index()] } else { 0 };
                    if level > lim {
                        out.push(format!("{name}: {} in slot {s} at {level}, limit {lim}", Dim::ALL[d]));
                    }
                }
                if limits.cpu_sigmas > 0.0 {
                    let level =
                        self.load[o] as f64 + limits.cpu_sigmas * (self.var[h.index() * self.slots + s] as f64).sqrt();
                    if level > limits.limit(cap[0], 0) as f64 + 1e-6 {
                        out.push(format!("{name}: cpu with noise margin in slot {s} at {level:.0}"));
                    }
                }
            }
            let mut seen_groups = Vec::new();
            let mut seen_tier: Option<Tier> = None;
            for &g in &self.residents[h.index()] {
                let spec = self.guest(g);
                if let Some(grp) = spec.anti_affinity {
                    if seen_groups.contains(&grp) {
                        out.push(format!("{name}: two members of anti-affinity group {}", grp.0));
                    }
                    seen_groups.push(grp);
                }
                if let Some(t) = spec.tier {
                    match seen_tier {
                        Some(other) if other != t => {
                            out.push(format!("{name}: security tiers {} and {} share the host", other.0, t.0))
                        }
                        _ => seen_tier = Some(t),
                    }
                }
            }
        }
        out
    }
}

fn ratio(level: f64, cap: u32) -> f64 {
    if cap > 0 {
        level / f64::from(cap)
    } else if level > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}
