//! The simulated data centre: where every VM runs, which migrations are in
//! flight, each host's power state — and the books from which the metrics
//! come.
//!
//! Time advances interval by interval (5 minutes for PlanetLab). At the
//! start of an interval every VM takes its new demand and the policy
//! decides; inside it, time jumps from event to event (a migration ends, a
//! host finishes waking). Between two events nothing changes, so each
//! host's power and overload are integrated exactly: the books of a host
//! are brought up to date right before anything about it changes.
//!
//! Host power states follow [`drove_placement::PowerState`]. In the
//! reference model they are bookkeeping only (a host with no VM is off and
//! comes back instantly); in the realistic model a host must be woken and
//! is usable only `wake_secs` later, migrations to it wait meanwhile, and a
//! host told to go to standby while it still holds VMs consolidates first.

use drove_placement::{PowerEvent, PowerState};

use crate::scenario::{ModelKind, Scenario};

/// What a policy asks the world to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Live-migrate a VM. To a host in standby, the world wakes it first.
    Migrate { vm: usize, to: usize },
    /// Power a standby host up.
    Wake { host: usize },
    /// Put a host into standby, consolidating (waiting for its VMs to
    /// leave) first if it still holds any.
    Standby { host: usize },
}

/// How host power is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accounting {
    /// No power management: every host draws its peak all the time.
    AlwaysPeak,
    /// Power follows load (and state).
    Measured,
}

/// A policy asked for something the world cannot do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error("VM {vm} does not exist")]
    NoVm { vm: usize },
    #[error("host {host} does not exist")]
    NoHost { host: usize },
    #[error("VM {vm} is placed twice or not at all by the initial placement")]
    BadInitial { vm: usize },
    #[error("VM {vm} is not running anywhere")]
    NotRunning { vm: usize },
    #[error("VM {vm} is already migrating")]
    AlreadyMigrating { vm: usize },
    #[error("VM {vm} already runs on host {host}")]
    SameHost { vm: usize, host: usize },
    #[error("host {host} has {free} MB of memory free, VM {vm} needs {need} MB")]
    Memory { vm: usize, host: usize, free: u32, need: u32 },
    #[error("host {host} is {state} and takes no VMs")]
    NotAccepting { host: usize, state: PowerState },
    #[error("host {host}: {source}")]
    Power {
        host: usize,
        #[source]
        source: drove_placement::InvalidPowerTransition,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HostBooks {
    last_t: f64,
    pub energy_j: f64,
    pub active_s: f64,
    pub overload_s: f64,
}

#[derive(Debug, Clone, Copy)]
struct Migration {
    vm: usize,
    from: usize,
    to: usize,
    remaining_mbit: f64,
    rate_mbps: f64,
    /// The target is still waking: the copy has not started.
    waiting: bool,
}

/// The state the policy may look at.
#[derive(Debug)]
pub struct View<'a> {
    pub scenario: &'a Scenario,
    /// The interval that starts now.
    pub slot: usize,
    /// What the policy knows of each VM's demand (MIPS): the current
    /// sample, or an older one when the model observes with a lag.
    pub observed: &'a [f64],
    pub vm_host: &'a [Option<usize>],
    /// Migrating, or waiting for its target to wake.
    pub vm_migrating: &'a [bool],
    pub host_state: &'a [PowerState],
    /// VMs on each host (including those migrating away).
    pub host_vms: &'a [Vec<usize>],
    /// VMs migrating to each host.
    pub host_incoming: &'a [Vec<usize>],
    /// Memory counted on each host (MB).
    pub host_ram: &'a [u32],
}

/// The simulated data centre.
#[derive(Debug)]
pub struct World<'s> {
    sc: &'s Scenario,
    accounting: Accounting,
    t: f64,
    demand: Vec<f64>,
    vm_host: Vec<Option<usize>>,
    vm_migrating: Vec<bool>,
    /// Host whose memory holds the VM's reservation (reference: only the
    /// first placement counts).
    vm_ram_on: Vec<Option<usize>>,
    host_vms: Vec<Vec<usize>>,
    host_incoming: Vec<Vec<usize>>,
    host_state: Vec<PowerState>,
    host_wake_at: Vec<f64>,
    host_ram: Vec<u32>,
    host_load: Vec<f64>,
    pub(crate) books: Vec<HostBooks>,
    migrations: Vec<Migration>,
    pub(crate) requested_mips_s: f64,
    pub(crate) degraded_mips_s: f64,
    pub(crate) vm_requested: Vec<f64>,
    pub(crate) vm_degraded: Vec<f64>,
    pub(crate) migrations_started: u64,
    pub(crate) active_host_samples: Vec<usize>,
}

impl<'s> World<'s> {
    pub fn new(sc: &'s Scenario, accounting: Accounting) -> Self {
        let (n, m) = (sc.hosts.len(), sc.vms.len());
        World {
            sc,
            accounting,
            t: 0.0,
            demand: vec![0.0; m],
            vm_host: vec![None; m],
            vm_migrating: vec![false; m],
            vm_ram_on: vec![None; m],
            host_vms: vec![Vec::new(); n],
            host_incoming: vec![Vec::new(); n],
            host_state: vec![PowerState::Standby; n],
            host_wake_at: vec![0.0; n],
            host_ram: vec![0; n],
            host_load: vec![0.0; n],
            books: vec![HostBooks::default(); n],
            migrations: Vec::new(),
            requested_mips_s: 0.0,
            degraded_mips_s: 0.0,
            vm_requested: vec![0.0; m],
            vm_degraded: vec![0.0; m],
            migrations_started: 0,
            active_host_samples: Vec::new(),
        }
    }

    pub fn time(&self) -> f64 {
        self.t
    }

    fn reference(&self) -> bool {
        self.sc.model.kind == ModelKind::Reference
    }

    /// Start interval `slot`: every VM takes its demand of that interval.
    pub fn begin_interval(&mut self, slot: usize) {
        let dt = self.sc.interval_secs;
        for vm in 0..self.sc.vms.len() {
            let d = self.sc.demand_mips(vm, slot);
            self.demand[vm] = d;
            self.requested_mips_s += d * dt;
            self.vm_requested[vm] += d * dt;
        }
        self.recompute_loads();
    }

    /// Host loads from scratch (all books are up to date at an interval
    /// boundary, so nothing is lost).
    fn recompute_loads(&mut self) {
        self.host_load.iter_mut().for_each(|l| *l = 0.0);
        for vm in 0..self.sc.vms.len() {
            if let Some(h) = self.vm_host[vm] {
                self.host_load[h] += self.demand[vm];
            }
        }
        for m in &self.migrations {
            if !m.waiting {
                self.host_load[m.to] += self.demand[m.vm];
            }
        }
    }

    /// What the policy sees now.
    pub fn view<'a>(&'a self, slot: usize, observed: &'a [f64]) -> View<'a> {
        View {
            scenario: self.sc,
            slot,
            observed,
            vm_host: &self.vm_host,
            vm_migrating: &self.vm_migrating,
            host_state: &self.host_state,
            host_vms: &self.host_vms,
            host_incoming: &self.host_incoming,
            host_ram: &self.host_ram,
        }
    }

    /// Bring host `h`'s books up to now.
    fn settle(&mut self, h: usize) {
        let b = &mut self.books[h];
        let dt = self.t - b.last_t;
        if dt <= 0.0 {
            return;
        }
        b.last_t = self.t;
        let host = &self.sc.hosts[h];
        let cap = f64::from(host.mips());
        let load = self.host_load[h];
        let util = (load / cap).min(1.0);
        let (watts, active) = match (self.accounting, self.sc.model.kind) {
            (Accounting::AlwaysPeak, _) => (host.power.peak_watts(), load > 0.0),
            // A host with no load is switched off at once.
            (Accounting::Measured, ModelKind::Reference) => {
                if load > 0.0 {
                    (host.power.watts(util), true)
                } else {
                    (0.0, false)
                }
            }
            (Accounting::Measured, ModelKind::Realistic) => match self.host_state[h] {
                PowerState::On | PowerState::Consolidating => (host.power.watts(util), true),
                PowerState::Waking => (host.power.idle_watts(), false),
                PowerState::Standby => (host.power.standby_watts(), false),
            },
        };
        b.energy_j += watts * dt;
        if active {
            b.active_s += dt;
            if load >= cap {
                b.overload_s += dt;
            }
        }
    }

    /// Reference model: a host is on exactly when it has something to run.
    fn refresh_reference_state(&mut self, h: usize) {
        if self.reference() {
            let busy = !self.host_vms[h].is_empty() || !self.host_incoming[h].is_empty();
            self.host_state[h] = if busy { PowerState::On } else { PowerState::Standby };
        }
    }

    /// Place every VM at the start (`hosts[vm]`). Memory counts here in
    /// every model.
    pub fn place_initial(&mut self, hosts: &[usize]) -> Result<(), ActionError> {
        if hosts.len() != self.sc.vms.len() {
            return Err(ActionError::BadInitial { vm: hosts.len().min(self.sc.vms.len()) });
        }
        for (vm, &h) in hosts.iter().enumerate() {
            if h >= self.sc.hosts.len() {
                return Err(ActionError::NoHost { host: h });
            }
            let need = self.sc.vms[vm].ram_mb;
            let free = self.sc.hosts[h].ram_mb.saturating_sub(self.host_ram[h]);
            if need > free {
                return Err(ActionError::Memory { vm, host: h, free, need });
            }
            self.host_ram[h] += need;
            self.vm_ram_on[vm] = Some(h);
            self.vm_host[vm] = Some(h);
            self.host_vms[h].push(vm);
            self.host_load[h] += self.demand[vm];
            self.host_state[h] = PowerState::On;
        }
        Ok(())
    }

    /// Carry out one action at the current time.
    pub fn apply(&mut self, action: Action) -> Result<(), ActionError> {
        match action {
            Action::Migrate { vm, to } => self.start_migration(vm, to),
            Action::Wake { host } => self.wake(host),
            Action::Standby { host } => self.standby(host),
        }
    }

    fn check_host(&self, host: usize) -> Result<(), ActionError> {
        if host < self.sc.hosts.len() { Ok(()) } else { Err(ActionError::NoHost { host }) }
    }

    fn transition(&mut self, host: usize, event: PowerEvent) -> Result<(), ActionError> {
        self.settle(host);
        let next = self.host_state[host].apply(event).map_err(|source| ActionError::Power { host, source })?;
        self.host_state[host] = next;
        Ok(())
    }

    fn wake(&mut self, host: usize) -> Result<(), ActionError> {
        self.check_host(host)?;
        if self.reference() {
            return Ok(());
        }
        match self.host_state[host] {
            PowerState::Standby => {
                self.transition(host, PowerEvent::Wake)?;
                self.host_wake_at[host] = self.t + self.sc.model.wake_secs;
                if self.sc.model.wake_secs <= 0.0 {
                    self.finish_waking(host);
                }
                Ok(())
            }
            PowerState::Consolidating => self.transition(host, PowerEvent::Cancel),
            PowerState::On | PowerState::Waking => Ok(()),
        }
    }

    fn standby(&mut self, host: usize) -> Result<(), ActionError> {
        self.check_host(host)?;
        if self.reference() {
            return Ok(());
        }
        match self.host_state[host] {
            PowerState::Standby | PowerState::Consolidating => Ok(()),
            PowerState::Waking => Err(ActionError::Power {
                host,
                source: drove_placement::InvalidPowerTransition { state: PowerState::Waking, event: PowerEvent::Sleep },
            }),
            PowerState::On => {
                if self.host_vms[host].is_empty() && self.host_incoming[host].is_empty() {
                    self.transition(host, PowerEvent::Sleep)
                } else {
                    self.transition(host, PowerEvent::Drain)
                }
            }
        }
    }

    fn finish_waking(&mut self, host: usize) {
        self.settle(host);
        self.host_state[host] = PowerState::On;
        for i in 0..self.migrations.len() {
            if self.migrations[i].to == host && self.migrations[i].waiting {
                self.migrations[i].waiting = false;
                let vm = self.migrations[i].vm;
                self.host_load[host] += self.demand[vm];
            }
        }
        self.recompute_rates();
    }

    fn start_migration(&mut self, vm: usize, to: usize) -> Result<(), ActionError> {
        if vm >= self.sc.vms.len() {
            return Err(ActionError::NoVm { vm });
        }
        self.check_host(to)?;
        let from = self.vm_host[vm].ok_or(ActionError::NotRunning { vm })?;
        if self.vm_migrating[vm] {
            return Err(ActionError::AlreadyMigrating { vm });
        }
        if from == to {
            return Err(ActionError::SameHost { vm, host: to });
        }
        let mut waiting = false;
        if !self.reference() {
            match self.host_state[to] {
                PowerState::On => {}
                PowerState::Standby => {
                    self.wake(to)?;
                    waiting = self.host_state[to] == PowerState::Waking;
                }
                PowerState::Waking => waiting = true,
                state @ PowerState::Consolidating => return Err(ActionError::NotAccepting { host: to, state }),
            }
        }
        if self.sc.model.memory_always {
            let need = self.sc.vms[vm].ram_mb;
            let free = self.sc.hosts[to].ram_mb.saturating_sub(self.host_ram[to]);
            if need > free {
                return Err(ActionError::Memory { vm, host: to, free, need });
            }
            self.host_ram[to] += need;
        }
        self.settle(from);
        self.settle(to);
        if !waiting {
            self.host_load[to] += self.demand[vm];
        }
        self.host_incoming[to].push(vm);
        self.vm_migrating[vm] = true;
        self.migrations.push(Migration {
            vm,
            from,
            to,
            remaining_mbit: f64::from(self.sc.vms[vm].ram_mb) * 8.0,
            rate_mbps: 0.0,
            waiting,
        });
        self.migrations_started += 1;
        self.refresh_reference_state(to);
        self.recompute_rates();
        Ok(())
    }

    /// Each migration copies at half the target's NIC (reference), or at
    /// its fair share of the source's and the target's migration bandwidth
    /// when they carry several migrations at once (realistic).
    fn recompute_rates(&mut self) {
        let shared = self.sc.model.shared_migration_bandwidth;
        let mut busy = vec![0u32; if shared { self.sc.hosts.len() } else { 0 }];
        if shared {
            for m in self.migrations.iter().filter(|m| !m.waiting) {
                busy[m.from] += 1;
                busy[m.to] += 1;
            }
        }
        for m in &mut self.migrations {
            m.rate_mbps = if m.waiting {
                0.0
            } else if shared {
                (self.sc.migration_mbps(m.from) / f64::from(busy[m.from]))
                    .min(self.sc.migration_mbps(m.to) / f64::from(busy[m.to]))
            } else {
                self.sc.migration_mbps(m.to)
            };
        }
    }

    /// Run until `end`: migrations progress and finish, hosts finish
    /// waking, books are kept.
    pub fn run_until(&mut self, end: f64) {
        loop {
            let mut next = end;
            for m in self.migrations.iter().filter(|m| !m.waiting && m.rate_mbps > 0.0) {
                next = next.min(self.t + m.remaining_mbit / m.rate_mbps);
            }
            for h in 0..self.sc.hosts.len() {
                if self.host_state[h] == PowerState::Waking {
                    next = next.min(self.host_wake_at[h]);
                }
            }
            let dt = next - self.t;
            if dt > 0.0 {
                for m in &mut self.migrations {
                    if !m.waiting {
                        m.remaining_mbit -= m.rate_mbps * dt;
                        // 10 % of the VM's CPU is lost while it migrates.
                        let lost = 0.1 * self.demand[m.vm] * dt;
                        self.degraded_mips_s += lost;
                        self.vm_degraded[m.vm] += lost;
                    }
                }
                self.t = next;
            }
            let mut changed = false;
            let mut i = 0;
            while i < self.migrations.len() {
                let m = self.migrations[i];
                if !m.waiting && m.remaining_mbit <= 1e-6 {
                    self.migrations.swap_remove(i);
                    self.finish_migration(m);
                    changed = true;
                } else {
                    i += 1;
                }
            }
            for h in 0..self.sc.hosts.len() {
                if self.host_state[h] == PowerState::Waking && self.host_wake_at[h] <= self.t {
                    self.finish_waking(h);
                    changed = true;
                }
            }
            if changed {
                self.recompute_rates();
            }
            if self.t >= end && !changed {
                break;
            }
        }
        for h in 0..self.sc.hosts.len() {
            self.settle(h);
        }
        let reference = self.reference();
        let active = (0..self.sc.hosts.len())
            .filter(|&h| if reference { self.host_load[h] > 0.0 } else { self.host_state[h] != PowerState::Standby })
            .count();
        self.active_host_samples.push(active);
    }

    fn finish_migration(&mut self, m: Migration) {
        self.settle(m.from);
        self.settle(m.to);
        let d = self.demand[m.vm];
        self.host_load[m.from] -= d;
        if self.host_vms[m.from].len() == 1 && self.host_incoming[m.from].is_empty() {
            // Exactly zero, not a rounding residue: an empty host is off.
            self.host_load[m.from] = 0.0;
        }
        if let Some(p) = self.host_vms[m.from].iter().position(|&v| v == m.vm) {
            self.host_vms[m.from].swap_remove(p);
        }
        if let Some(p) = self.host_incoming[m.to].iter().position(|&v| v == m.vm) {
            self.host_incoming[m.to].swap_remove(p);
        }
        self.host_vms[m.to].push(m.vm);
        self.vm_host[m.vm] = Some(m.to);
        self.vm_migrating[m.vm] = false;
        if self.vm_ram_on[m.vm] == Some(m.from) {
            self.host_ram[m.from] -= self.sc.vms[m.vm].ram_mb;
            self.vm_ram_on[m.vm] = None;
        }
        if self.sc.model.memory_always {
            self.vm_ram_on[m.vm] = Some(m.to);
        }
        self.refresh_reference_state(m.from);
        if self.host_state[m.from] == PowerState::Consolidating
            && self.host_vms[m.from].is_empty()
            && self.host_incoming[m.from].is_empty()
        {
            self.host_state[m.from] = PowerState::Standby;
        }
    }
}
