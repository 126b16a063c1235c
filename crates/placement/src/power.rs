//! Power: what a host draws at a given load, and the power states a host
//! goes through when the cluster consolidates guests at quiet times.
//!
//! ```text
//!                    drain (DPM picked it)                  emptied
//!   ┌──────┐ ─────────────────────────► ┌───────────────┐ ─────────► ┌─────────┐
//!   │  On  │                            │ Consolidating │            │ Standby │
//!   └──────┘ ◄───────────────────────── └───────────────┘            └─────────┘
//!     ▲  │         cancel (load rose)                                   │  ▲
//!     │  └──────────────── sleep (already empty) ─────────────────────────┘  │
//!     │                                                                 wake │
//!     │                        ready (after the wake-up time)        ┌────────┐
//!     └──────────────────────────────────────────────────────────── │ Waking │
//!                                                                    └────────┘
//! ```
//!
//! Only `On` hosts take new guests. `Consolidating` hosts keep running their
//! guests while these are migrated away; `Waking` hosts draw power but can
//! take guests only once `ready`. Every transition is named in
//! [`PowerEvent`] and [`PowerState::apply`] is the one place that decides
//! which are valid.

use std::fmt;

/// Where a host is in its power life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerState {
    On,
    Consolidating,
    Standby,
    Waking,
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerState::On => "on",
            PowerState::Consolidating => "consolidating",
            PowerState::Standby => "standby",
            PowerState::Waking => "waking",
        })
    }
}

/// What can happen to a host's power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// DPM chose the host to be emptied.
    Drain,
    /// Load rose again before the host was empty: keep it.
    Cancel,
    /// The host holds no guests any more: put it into standby.
    Sleep,
    /// Load is predicted to rise: power the host up.
    Wake,
    /// The host finished booting and its agent reports in.
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("host cannot go through {event:?} while {state}")]
pub struct InvalidPowerTransition {
    pub state: PowerState,
    pub event: PowerEvent,
}

impl PowerState {
    /// The one place that decides power transitions.
    pub fn apply(self, event: PowerEvent) -> Result<PowerState, InvalidPowerTransition> {
        use PowerEvent::*;
        use PowerState::*;
        match (self, event) {
            (On, Drain) => Ok(Consolidating),
            (Consolidating, Cancel) => Ok(On),
            (On | Consolidating, Sleep) => Ok(Standby),
            (Standby, Wake) => Ok(Waking),
            (Waking, Ready) => Ok(On),
            (On, Cancel | Wake | Ready)
            | (Consolidating, Drain | Wake | Ready)
            | (Standby, Drain | Cancel | Sleep | Ready)
            | (Waking, Drain | Cancel | Sleep | Wake) => Err(InvalidPowerTransition { state: self, event }),
        }
    }

    /// Whether new guests may be placed on a host in this state.
    pub fn accepts_guests(self) -> bool {
        self == PowerState::On
    }

    /// Whether the host draws its running power (as opposed to standby).
    pub fn is_powered(self) -> bool {
        !matches!(self, PowerState::Standby)
    }
}

/// Wall power of a host as a function of its CPU utilisation: linear
/// interpolation between the draws measured at 0, 10, …, 100 % load (the
/// SPECpower way), plus the draw in standby.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerModel {
    points: [f64; 11],
    standby_watts: f64,
}

/// Why a power model is not plausible.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum PowerModelError {
    #[error("power at {percent} % load is {watts} W: must be finite, positive and not below the draw at lower load")]
    NotMonotonic { percent: u32, watts: f64 },
    #[error("PSU efficiency {0} is not a fraction in (0, 1]")]
    Efficiency(f64),
    #[error("standby draw {0} W must be finite, non-negative and below the idle draw")]
    Standby(f64),
}

impl PowerModel {
    /// A SPECpower table: wall watts at 0, 10, …, 100 % CPU.
    pub fn spec_power(points: [f64; 11], standby_watts: f64) -> Result<Self, PowerModelError> {
        let mut prev = 0.0;
        for (i, &w) in points.iter().enumerate() {
            if !w.is_finite() || w <= 0.0 || w < prev {
                return Err(PowerModelError::NotMonotonic { percent: i as u32 * 10, watts: w });
            }
            prev = w;
        }
        if !standby_watts.is_finite() || standby_watts < 0.0 || standby_watts >= points[0] {
            return Err(PowerModelError::Standby(standby_watts));
        }
        Ok(PowerModel { points, standby_watts })
    }

    /// A model built from component figures: the DC draw of the server idle
    /// and busy (e.g. an idle server ~50 % of full power; a CPU ~30 W idle,
    /// ~120 W busy), turned into wall watts by the PSU efficiency.
    pub fn linear(
        idle_dc_watts: f64,
        busy_dc_watts: f64,
        psu_efficiency: f64,
        standby_watts: f64,
    ) -> Result<Self, PowerModelError> {
        if !(psu_efficiency > 0.0 && psu_efficiency <= 1.0) {
            return Err(PowerModelError::Efficiency(psu_efficiency));
        }
        let points = std::array::from_fn(|i| {
            (idle_dc_watts + (busy_dc_watts - idle_dc_watts) * i as f64 / 10.0) / psu_efficiency
        });
        PowerModel::spec_power(points, standby_watts)
    }

    /// Wall watts at `utilisation` (clamped to 0..=1).
    pub fn watts(&self, utilisation: f64) -> f64 {
        let u = if utilisation.is_nan() { 0.0 } else { utilisation.clamp(0.0, 1.0) };
        let x = u * 10.0;
        let i = (x.floor() as usize).min(9);
        let frac = x - i as f64;
        self.points[i] + (self.points[i + 1] - self.points[i]) * frac
    }

    pub fn idle_watts(&self) -> f64 {
        self.points[0]
    }

    pub fn peak_watts(&self) -> f64 {
        self.points[10]
    }

    pub fn standby_watts(&self) -> f64 {
        self.standby_watts
    }

    /// Watts per unit of CPU work when the host runs at `utilisation` of a
    /// capacity of `capacity` units: lower is more efficient. DPM keeps the
    /// most efficient hosts on and puts the others into standby.
    pub fn watts_per_unit(&self, capacity: u32, utilisation: f64) -> f64 {
        let work = f64::from(capacity) * utilisation.clamp(1e-3, 1.0);
        self.watts(utilisation) / work
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G4: [f64; 11] = [86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0];

    #[test]
    fn interpolates_between_spec_power_points() {
        let m = PowerModel::spec_power(G4, 5.0).expect("valid table");
        assert_eq!(m.watts(0.0), 86.0);
        assert_eq!(m.watts(1.0), 117.0);
        assert!((m.watts(0.05) - 87.7).abs() < 1e-9);
        assert!((m.watts(0.95) - 115.5).abs() < 1e-9);
        assert_eq!(m.watts(1.7), 117.0, "overload draws full power, no more");
        assert_eq!(m.watts(-1.0), 86.0);
    }

    #[test]
    fn linear_model_accounts_for_psu_losses() {
        // An idle server at ~50 % of full power; 85 % efficient PSU.
        let m = PowerModel::linear(100.0, 200.0, 0.85, 5.0).expect("valid");
        assert!((m.watts(0.0) - 100.0 / 0.85).abs() < 1e-9);
        assert!((m.watts(0.5) - 150.0 / 0.85).abs() < 1e-9);
        assert!(PowerModel::linear(100.0, 200.0, 1.2, 5.0).is_err());
        assert!(PowerModel::spec_power([1.0, 0.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.1).is_err());
    }

    #[test]
    fn power_transitions_follow_the_diagram() {
        use PowerEvent::*;
        use PowerState::*;
        assert_eq!(On.apply(Drain), Ok(Consolidating));
        assert_eq!(Consolidating.apply(Sleep), Ok(Standby));
        assert_eq!(Standby.apply(Wake), Ok(Waking));
        assert_eq!(Waking.apply(Ready), Ok(On));
        assert_eq!(Consolidating.apply(Cancel), Ok(On));
        assert!(Standby.apply(Drain).is_err());
        assert!(Waking.apply(Sleep).is_err(), "a host finishes waking before it sleeps");
        assert!(On.accepts_guests() && !Waking.accepts_guests() && !Consolidating.accepts_guests());
    }
}
