//! Physical hosts and their administrative, liveness and power state.
//!
//! ```text
//!            heartbeat lost                 enter_maintenance
//!    ┌────┐ ───────────────► ┌──────┐    (from Up, Down, Standby, Waking)
//!    │ Up │                  │ Down │  ──────────────────────► ┌─────────────┐
//!    └────┘ ◄─────────────── └──────┘                          │ Maintenance │
//!    ▲ ▲ │     heartbeat back   │ ▲                             └──────┬──────┘
//!    │ └─┼──────────────────────┼─┼── exit_maintenance ───────────────┘
//!    │   │                      │ │  (to Down if the host is not heard from)
//!    │   │ sleep (empty)   wake │ │ wake timed out
//!    │   ▼                      ▼ │
//!    │ ┌─────────┐  wake   ┌────────┐
//!    │ │ Standby │ ──────► │ Waking │
//!    │ └─────────┘         └────────┘
//!    │      │ registered        │ heartbeat back / registered
//!    └──────┴───────────────────┘
//! ```
//!
//! Maintenance and standby are sticky: a host in standby is powered off on
//! purpose, so silence is expected and never makes it `Down` (it holds no
//! guests to fail over), and the last heartbeats of an agent being powered
//! off do not bring it back. Only a new agent registering (someone powered
//! the host on) or a wake does. A host that does not report in within the
//! wake timeout is `Down`.

use serde::{Deserialize, Serialize};

use crate::{ByteSize, HostId};

/// Which hypervisor backend a host's agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HypervisorKind {
    /// QEMU driven directly over QMP.
    Qemu,
    /// The simulated backend (tests and scale runs).
    Sim,
}

impl std::fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Sim => "sim",
        })
    }
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qemu" => Ok(Self::Qemu),
            "sim" => Ok(Self::Sim),
            other => Err(format!("unknown hypervisor {other:?} (expected qemu or sim)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heard from recently; accepts new guests.
    Up,
    /// Administratively out of service; takes no new guests.
    Maintenance,
    /// Not heard from within the heartbeat timeout.
    Down,
    /// Emptied and powered off by power management (or an operator) to
    /// save energy; takes no guests until woken.
    Standby,
    /// Powered on again and booting; takes guests once its agent reports.
    Waking,
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostState::Up => "up",
            HostState::Maintenance => "maintenance",
            HostState::Down => "down",
            HostState::Standby => "standby",
            HostState::Waking => "waking",
        })
    }
}

/// A host's lease on life as the manager's store holds it
/// (`leases/<host id>`).
///
/// Every heartbeat the manager answers renews it, durably, before the
/// answer goes out: the agent only ever holds a lease the store knows of.
/// The agent counts its copy from when it sent the heartbeat, so its copy
/// always runs out first. Times are the manager's wall clock, in
/// milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub host: HostId,
    /// When the heartbeat that renewed it arrived.
    pub renewed_at_ms: u64,
    pub expires_at_ms: u64,
}

/// What can happen to a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostEvent {
    HeartbeatLost,
    HeartbeatBack,
    EnterMaintenance,
    /// Leave maintenance; `alive` says whether the host is currently heard from.
    ExitMaintenance {
        alive: bool,
    },
    /// A new agent registered: the host was (re)started.
    Registered,
    /// Power it off; the manager sends this only for a host without guests.
    Sleep,
    /// Power it on.
    Wake,
    /// A woken host did not report in within the wake timeout.
    WakeTimedOut,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host cannot go through {event:?} while {state}")]
pub struct InvalidHostTransition {
    pub state: HostState,
    pub event: HostEvent,
}

impl HostState {
    /// The one place that decides host transitions.
    pub fn apply(self, event: HostEvent) -> Result<HostState, InvalidHostTransition> {
        use HostEvent::*;
        use HostState::*;
        let next = match (self, event) {
            (Up | Waking, HeartbeatBack | Registered) | (Standby, Registered) => Up,
            (Down, HeartbeatBack | Registered) => Up,
            (Up, HeartbeatLost) => Down,
            (Down, HeartbeatLost) => Down,
            (Maintenance, HeartbeatLost | HeartbeatBack | Registered) => Maintenance,
            (Standby, HeartbeatLost | HeartbeatBack) => Standby,
            (Waking, HeartbeatLost) => Waking,
            (Up | Down | Standby | Waking, EnterMaintenance) => Maintenance,
            (Maintenance, ExitMaintenance { alive }) => {
                if alive {
                    Up
                } else {
                    Down
                }
            }
            (Up, Sleep) => Standby,
            (Standby | Down, Wake) => Waking,
            (Waking, WakeTimedOut) => Down,
            (Maintenance, EnterMaintenance)
            | (Up | Down | Standby | Waking, ExitMaintenance { .. })
            | (Down | Maintenance | Standby | Waking, Sleep)
            | (Up | Maintenance | Waking, Wake)
            | (Up | Down | Maintenance | Standby, WakeTimedOut) => {
                return Err(InvalidHostTransition { state: self, event });
            }
        };
        Ok(next)
    }

    /// Whether new guests may be placed here.
    pub fn schedulable(self) -> bool {
        self == HostState::Up
    }
}

/// A registered host as the manager knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostInfo {
    pub id: HostId,
    pub name: String,
    /// Logical CPUs the agent offers to guests.
    pub cores: u32,
    /// Memory the agent offers to guests.
    pub memory: ByteSize,
    pub hypervisor: HypervisorKind,
    pub state: HostState,
    /// When the agent first registered (RFC 3339).
    pub registered_at: String,
    /// The host's uplink for guest traffic, bits per second, which guests'
    /// NIC limits reserve; `None`: not managed.
    #[serde(default)]
    pub uplink_bps: Option<u64>,
    /// Where live migrations to this host go (its migration network).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub migration_address: Option<std::net::IpAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintenance_is_sticky_and_exit_follows_liveness() {
        let s = HostState::Up.apply(HostEvent::EnterMaintenance).expect("enter");
        assert_eq!(s.apply(HostEvent::HeartbeatLost), Ok(HostState::Maintenance));
        assert_eq!(s.apply(HostEvent::ExitMaintenance { alive: false }), Ok(HostState::Down));
        assert_eq!(s.apply(HostEvent::ExitMaintenance { alive: true }), Ok(HostState::Up));
        assert!(s.apply(HostEvent::EnterMaintenance).is_err());
        assert!(HostState::Up.apply(HostEvent::ExitMaintenance { alive: true }).is_err());
    }

    #[test]
    fn standby_is_sticky_until_woken_or_registered() {
        let s = HostState::Up.apply(HostEvent::Sleep).expect("sleep");
        assert_eq!(s, HostState::Standby);
        // Silence is expected, and the last heartbeats of an agent being
        // powered off do not bring it back.
        assert_eq!(s.apply(HostEvent::HeartbeatLost), Ok(HostState::Standby));
        assert_eq!(s.apply(HostEvent::HeartbeatBack), Ok(HostState::Standby));
        // Someone powered it on by hand: its new agent registers.
        assert_eq!(s.apply(HostEvent::Registered), Ok(HostState::Up));
        let w = s.apply(HostEvent::Wake).expect("wake");
        assert_eq!(w, HostState::Waking);
        assert_eq!(w.apply(HostEvent::HeartbeatLost), Ok(HostState::Waking));
        assert_eq!(w.apply(HostEvent::HeartbeatBack), Ok(HostState::Up));
        assert_eq!(w.apply(HostEvent::WakeTimedOut), Ok(HostState::Down));
        // A dead host can be powered on too.
        assert_eq!(HostState::Down.apply(HostEvent::Wake), Ok(HostState::Waking));
    }

    #[test]
    fn only_a_running_host_sleeps_and_only_a_sleeping_or_dead_one_wakes() {
        for state in [HostState::Down, HostState::Maintenance, HostState::Standby, HostState::Waking] {
            assert!(state.apply(HostEvent::Sleep).is_err(), "{state} slept");
        }
        for state in [HostState::Up, HostState::Maintenance, HostState::Waking] {
            assert!(state.apply(HostEvent::Wake).is_err(), "{state} woke");
        }
        assert!(HostState::Up.apply(HostEvent::WakeTimedOut).is_err());
        for state in [HostState::Up, HostState::Down, HostState::Standby, HostState::Waking] {
            assert_eq!(state.apply(HostEvent::EnterMaintenance), Ok(HostState::Maintenance));
        }
    }
}
