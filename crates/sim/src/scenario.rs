//! What is simulated: the hosts, the VMs with their demand over time, and
//! the model of the world (reference or realistic).
//!
//! The *reference* model is the one behind the published CloudSim figures
//! (shared/data/README.md): CPU is the only resource after a VM's first
//! placement, a host with no load draws nothing and is back instantly,
//! migrations take a fixed time (RAM over half the target's bandwidth), the
//! policy sees each 5-minute sample when it starts. The *realistic* model
//! keeps memory enforced, hosts go to standby (drawing a little) and take
//! time to wake, concurrent migrations share a host's migration bandwidth,
//! and the policy sees a sample only once its interval is over (monitoring
//! reports the past, not the future).

use drove_placement::{PowerModel, PowerModelError};

use crate::trace::Trace;

/// A physical host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostDef {
    pub name: String,
    pub cores: u32,
    pub core_mips: u32,
    pub ram_mb: u32,
    pub bw_mbps: u32,
    pub power: PowerModel,
}

impl HostDef {
    pub fn mips(&self) -> u32 {
        self.cores * self.core_mips
    }
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDef {
    pub name: String,
    pub vcpus: u32,
    /// MIPS of its vCPUs together: 100 % in the trace means this much.
    pub mips: u32,
    pub ram_mb: u32,
    pub bw_mbps: u32,
}

/// Which world the simulation models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Reference,
    Realistic,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Reference => "reference",
            ModelKind::Realistic => "realistic",
        })
    }
}

/// The knobs that make a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    pub kind: ModelKind,
    /// Memory limits every placement and migration, not only the first.
    pub memory_always: bool,
    /// Seconds from "wake" until a standby host takes guests (0 = at once).
    pub wake_secs: f64,
    /// Concurrent migrations share a host's migration bandwidth.
    pub shared_migration_bandwidth: bool,
    /// The policy sees demand this many samples late (0 = the current one).
    pub observe_lag: usize,
    /// Sample intervals simulated.
    pub intervals: usize,
}

impl Model {
    /// The reference model over a trace of `samples` samples: like
    /// CloudSim, the day is the `samples - 1` intervals between the first
    /// and the last sample (288 samples: 86,100 s), each sample holding for
    /// the interval it starts.
    pub fn reference(samples: usize) -> Self {
        Model {
            kind: ModelKind::Reference,
            memory_always: false,
            wake_secs: 0.0,
            shared_migration_bandwidth: false,
            observe_lag: 0,
            intervals: samples.saturating_sub(1),
        }
    }

    /// The realistic model: every sample is an interval (288 samples: the
    /// whole 86,400 s), hosts wake in two minutes, the policy sees the past.
    pub fn realistic(samples: usize) -> Self {
        Model {
            kind: ModelKind::Realistic,
            memory_always: true,
            wake_secs: 120.0,
            shared_migration_bandwidth: true,
            observe_lag: 1,
            intervals: samples,
        }
    }

    pub fn of_kind(kind: ModelKind, samples: usize) -> Self {
        match kind {
            ModelKind::Reference => Model::reference(samples),
            ModelKind::Realistic => Model::realistic(samples),
        }
    }
}

/// A complete simulation input.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub source: String,
    pub hosts: Vec<HostDef>,
    pub vms: Vec<VmDef>,
    /// `demand[vm][sample]` in percent of the VM's MIPS.
    pub demand: Vec<Vec<u8>>,
    pub interval_secs: f64,
    pub model: Model,
}

/// Why a scenario cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScenarioError {
    #[error("the trace has no VMs")]
    NoVms,
    #[error("--hosts must be at least 1")]
    NoHosts,
    #[error("VM {vm} has {got} samples, the model simulates {needed}")]
    ShortTrace { vm: String, got: usize, needed: usize },
    #[error("power model of {host}")]
    Power {
        host: &'static str,
        #[source]
        source: PowerModelError,
    },
}

/// SPECpower figures of the HP ProLiant ML110 G4 (watts at 0, 10, …, 100 %).
pub const G4_WATTS: [f64; 11] = [86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0];
/// SPECpower figures of the HP ProLiant ML110 G5.
pub const G5_WATTS: [f64; 11] = [93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0];
/// Standby draw in the realistic model (BMC and PSU standby rail).
pub const STANDBY_WATTS: f64 = 8.0;

/// MIPS and RAM (MB) of the four VM types of the standard experiment.
pub const VM_TYPES: [(u32, u32); 4] = [(2500, 870), (2000, 1740), (1000, 1740), (500, 613)];

impl Scenario {
    /// The standard experiment on a PlanetLab trace: `hosts` hosts, half
    /// ML110 G4 (2 × 1860 MIPS), half G5 (2 × 2660 MIPS), 4 GiB and
    /// 1 Gbit/s each, host i of type i mod 2; VM i of type i mod 4, 1 vCPU,
    /// 100 Mbit/s; 300 s between samples.
    pub fn planetlab(trace: &Trace, hosts: usize, kind: ModelKind) -> Result<Scenario, ScenarioError> {
        if trace.is_empty() {
            return Err(ScenarioError::NoVms);
        }
        if hosts == 0 {
            return Err(ScenarioError::NoHosts);
        }
        let standby = match kind {
            ModelKind::Reference => 0.0,
            ModelKind::Realistic => STANDBY_WATTS,
        };
        let g4 =
            PowerModel::spec_power(G4_WATTS, standby).map_err(|source| ScenarioError::Power { host: "G4", source })?;
        let g5 =
            PowerModel::spec_power(G5_WATTS, standby).map_err(|source| ScenarioError::Power { host: "G5", source })?;
        let hosts = (0..hosts)
            .map(|i| {
                let (name, core_mips, power) = if i % 2 == 0 { ("g4", 1860, g4) } else { ("g5", 2660, g5) };
                HostDef { name: format!("{name}-{i:03}"), cores: 2, core_mips, ram_mb: 4096, bw_mbps: 1000, power }
            })
            .collect();
        let vms = trace
            .names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let (mips, ram_mb) = VM_TYPES[i % 4];
                VmDef { name: name.clone(), vcpus: 1, mips, ram_mb, bw_mbps: 100 }
            })
            .collect();
        Scenario::new(trace.source.clone(), hosts, vms, trace.samples.clone(), 300.0, Model::of_kind(kind, trace.len()))
    }

    /// A scenario from parts (tests build small ones by hand).
    pub fn new(
        source: String,
        hosts: Vec<HostDef>,
        vms: Vec<VmDef>,
        demand: Vec<Vec<u8>>,
        interval_secs: f64,
        model: Model,
    ) -> Result<Scenario, ScenarioError> {
        if vms.is_empty() {
            return Err(ScenarioError::NoVms);
        }
        if hosts.is_empty() {
            return Err(ScenarioError::NoHosts);
        }
        for (vm, d) in vms.iter().zip(&demand) {
            if d.len() < model.intervals {
                return Err(ScenarioError::ShortTrace { vm: vm.name.clone(), got: d.len(), needed: model.intervals });
            }
        }
        Ok(Scenario { source, hosts, vms, demand, interval_secs, model })
    }

    /// What VM `vm` asks for in interval `slot`, in MIPS.
    pub fn demand_mips(&self, vm: usize, slot: usize) -> f64 {
        f64::from(self.demand[vm][slot]) / 100.0 * f64::from(self.vms[vm].mips)
    }

    /// Seconds to migrate `vm` to `host` with the host's migration
    /// bandwidth to itself: RAM over half the NIC (the other half carries
    /// the VMs' own traffic).
    pub fn migration_secs(&self, vm: usize, host: usize) -> f64 {
        f64::from(self.vms[vm].ram_mb) * 8.0 / self.migration_mbps(host)
    }

    /// Bandwidth a host gives migrations, Mbit/s.
    pub fn migration_mbps(&self, host: usize) -> f64 {
        f64::from(self.hosts[host].bw_mbps) / 2.0
    }
}
