//! Load profiles: what a guest needs in each time slot of the day.
//!
//! The scheduler plans with the *peak* of each slot, not the peak of the
//! day. A guest that runs batch jobs at night and one that serves users by
//! day each have a high daily peak, but their per-slot peaks interleave, so
//! one host carries both (statistical multiplexing):
//!
//! ```text
//!  cpu ▲          day guest            night guest           both on one host
//!      │       ┌──────────┐        ┌──┐            ┌──┐   ┌──┐┌──────────┐┌──┐
//!      │       │          │        │  │            │  │   │  ││          ││  │
//!      │───────┘          └─────   │  └────────────┘  │   │  └┘          └┘  │
//!      └──────────────────────►    └──────────────────►   └──────────────────►
//!       0h                  24h     0h              24h    peak = max of the two,
//!                                                          not their sum
//! ```
//!
//! A slot may also carry a CPU *variance*: how much the guest's CPU use
//! jitters around the slot's value. Placement can keep a number of standard
//! deviations of the summed variance free, which packs many independent,
//! noisy guests far tighter than adding up their individual peaks would
//! (the sum of n independent jitters grows like the square root of n).

use crate::resources::{DIMS, Resources};

/// Why a profile cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("a load profile needs at least one slot")]
    Empty,
    #[error("{what} has {got} slots, expected {expected}")]
    SlotCount { what: &'static str, got: usize, expected: usize },
    #[error("hourly load value {value} at hour {hour} is not a fraction between 0.0 and 1.0")]
    Fraction { hour: usize, value: f32 },
}

/// A guest's demand per time slot of a day, plus optional CPU variance per
/// slot (in squared CPU units).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    slots: Vec<Resources>,
    cpu_var: Vec<u32>,
}

impl Profile {
    /// The same demand in every one of `slots` slots.
    pub fn flat(demand: Resources, slots: usize) -> Result<Self, ProfileError> {
        if slots == 0 {
            return Err(ProfileError::Empty);
        }
        Ok(Profile { slots: vec![demand; slots], cpu_var: vec![0; slots] })
    }

    /// One demand per slot.
    pub fn from_slots(slots: Vec<Resources>) -> Result<Self, ProfileError> {
        if slots.is_empty() {
            return Err(ProfileError::Empty);
        }
        let n = slots.len();
        Ok(Profile { slots, cpu_var: vec![0; n] })
    }

    /// Attach CPU variance per slot (squared CPU units).
    pub fn with_cpu_variance(mut self, var: Vec<u32>) -> Result<Self, ProfileError> {
        if var.len() != self.slots.len() {
            return Err(ProfileError::SlotCount {
                what: "the CPU variance",
                got: var.len(),
                expected: self.slots.len(),
            });
        }
        self.cpu_var = var;
        Ok(self)
    }

    /// A guest described the way the model crate does: `vcpus` at
    /// `cpu_per_vcpu` each, busy by the given hourly fractions, with
    /// constant memory, network and disk demand. One slot per fraction:
    /// 24 for a day, fewer for the hours of a window.
    pub fn from_hourly(
        vcpus: u32,
        cpu_per_vcpu: u32,
        hourly_cpu: &[f32],
        other: Resources,
    ) -> Result<Self, ProfileError> {
        let full = u64::from(vcpus) * u64::from(cpu_per_vcpu);
        let mut slots = Vec::with_capacity(24);
        for (hour, &f) in hourly_cpu.iter().enumerate() {
            if !(0.0..=1.0).contains(&f) {
                return Err(ProfileError::Fraction { hour, value: f });
            }
            // Round up (never plan less than asked), but not for the float
            // noise of an f32 fraction: 0.1 of 2000 is 200, not 201.
            let cpu = (full as f64 * f64::from(f) - 1e-3).ceil().clamp(0.0, f64::from(u32::MAX)) as u32;
            slots.push(Resources { cpu, ..other });
        }
        Profile::from_slots(slots)
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    pub fn slot(&self, i: usize) -> Resources {
        self.slots[i]
    }

    pub fn cpu_variance(&self, i: usize) -> u32 {
        self.cpu_var[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = Resources> + '_ {
        self.slots.iter().copied()
    }

    /// The per-dimension peak over the day.
    pub fn peak(&self) -> Resources {
        self.slots.iter().fold(Resources::ZERO, |a, &b| a.max(b))
    }

    /// Fold into `slots` equal buckets, keeping each bucket's peak (and its
    /// largest variance): 288 five-minute samples become 24 hourly slots.
    /// `slots` must divide the current number of slots.
    pub fn resample(&self, slots: usize) -> Result<Profile, ProfileError> {
        if slots == 0 {
            return Err(ProfileError::Empty);
        }
        if !self.slots.len().is_multiple_of(slots) {
            return Err(ProfileError::SlotCount {
                what: "a resampled profile",
                got: slots,
                expected: self.slots.len(),
            });
        }
        let k = self.slots.len() / slots;
        let out = self.slots.chunks(k).map(|c| c.iter().fold(Resources::ZERO, |a, &b| a.max(b))).collect();
        let var = self.cpu_var.chunks(k).map(|c| c.iter().copied().max().unwrap_or(0)).collect();
        Profile::from_slots(out)?.with_cpu_variance(var)
    }

    /// Demand of slot `i` as an array (the engine's layout).
    pub(crate) fn slot_array(&self, i: usize) -> [u32; DIMS] {
        self.slots[i].to_array()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hourly_profile_scales_vcpus_and_rejects_bad_fractions() {
        let mut hourly = vec![0.1f32; 24];
        hourly[3] = 1.0;
        let p = Profile::from_hourly(2, 1000, &hourly, Resources::new(0, 512, 10, 0)).expect("valid profile");
        assert_eq!(p.slots(), 24);
        assert_eq!(p.slot(0).cpu, 200);
        assert_eq!(p.slot(3).cpu, 2000);
        assert_eq!(p.peak(), Resources::new(2000, 512, 10, 0));
        hourly[5] = 1.5;
        let err = Profile::from_hourly(2, 1000, &hourly, Resources::ZERO).expect_err("1.5 is no fraction");
        assert_eq!(err, ProfileError::Fraction { hour: 5, value: 1.5 });
    }

    #[test]
    fn resample_keeps_bucket_peaks() {
        let slots = (0..6).map(|i| Resources::new(i * 10, 1, 0, 0)).collect();
        let p = Profile::from_slots(slots).expect("non-empty").with_cpu_variance(vec![1, 9, 2, 3, 4, 0]).expect("6");
        let r = p.resample(2).expect("2 divides 6");
        assert_eq!(r.slot(0).cpu, 20);
        assert_eq!(r.slot(1).cpu, 50);
        assert_eq!(r.cpu_variance(0), 9);
        assert_eq!(r.cpu_variance(1), 4);
        assert!(p.resample(4).is_err());
    }
}
