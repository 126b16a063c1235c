//! The resource dimensions placement packs, in integer units so that sums
//! are exact and "fits" never depends on rounding.
//!
//! | dimension | unit | example |
//! |---|---|---|
//! | CPU | the cluster's choice: MIPS in the simulator, milli-cores live | a 2-core host = 2000 |
//! | memory | MiB | 4 GiB = 4096 |
//! | network | Mbit/s of NIC bandwidth | 1 Gbit/s = 1000 |
//! | disk | Mbit/s of disk / HBA bandwidth | a 4 Gb/s HBA = 4000 |
//!
//! A 4 Gb/s HBA therefore carries at most four guests that are busy at
//! 1 Gb/s in the same slot: the disk dimension is checked like every other.

use std::fmt;

/// Number of resource dimensions.
pub const DIMS: usize = 4;

/// One resource dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Cpu,
    Memory,
    Net,
    Disk,
}

impl Dim {
    pub const ALL: [Dim; DIMS] = [Dim::Cpu, Dim::Memory, Dim::Net, Dim::Disk];

    pub const fn index(self) -> usize {
        self as usize
    }

    pub const fn unit(self) -> &'static str {
        match self {
            Dim::Cpu => "cpu units",
            Dim::Memory => "MiB",
            Dim::Net | Dim::Disk => "Mbit/s",
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dim::Cpu => "cpu",
            Dim::Memory => "memory",
            Dim::Net => "network",
            Dim::Disk => "disk",
        })
    }
}

/// An amount of every dimension: a host's capacity or a guest's demand in
/// one time slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Resources {
    pub cpu: u32,
    pub memory_mib: u32,
    pub net_mbps: u32,
    pub disk_mbps: u32,
}

impl Resources {
    pub const ZERO: Resources = Resources { cpu: 0, memory_mib: 0, net_mbps: 0, disk_mbps: 0 };

    pub const fn new(cpu: u32, memory_mib: u32, net_mbps: u32, disk_mbps: u32) -> Self {
        Resources { cpu, memory_mib, net_mbps, disk_mbps }
    }

    pub const fn to_array(self) -> [u32; DIMS] {
        [self.cpu, self.memory_mib, self.net_mbps, self.disk_mbps]
    }

    pub const fn from_array(a: [u32; DIMS]) -> Self {
        Resources { cpu: a[0], memory_mib: a[1], net_mbps: a[2], disk_mbps: a[3] }
    }

    pub const fn get(self, dim: Dim) -> u32 {
        self.to_array()[dim.index()]
    }

    /// The per-dimension maximum of two amounts.
    pub fn max(self, other: Resources) -> Resources {
        let (a, b) = (self.to_array(), other.to_array());
        Resources::from_array(std::array::from_fn(|d| a[d].max(b[d])))
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu {}, memory {} MiB, network {} Mbit/s, disk {} Mbit/s",
            self.cpu, self.memory_mib, self.net_mbps, self.disk_mbps
        )
    }
}
