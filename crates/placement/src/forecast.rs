//! From measured load to what placement plans with.
//!
//! Agents (or a trace) report each guest's use every few minutes. Two
//! things come out of that history:
//! - for the next few minutes: the last value and how much the load jumps
//!   from one sample to the next (the variance of one-step changes), which
//!   the engine turns into a noise margin ([`crate::Limits::cpu_sigmas`]);
//! - for the day: a [`Profile`] of per-slot peaks, for capacity planning
//!   and profile-aware packing ([`daily_profile`]).
//!
//! A guest seen for only a few samples borrows strength from a prior (the
//! jumpiness of guests in general), so its margin is neither zero nor
//! absurd on its first minutes.

use crate::profile::{Profile, ProfileError};
use crate::resources::Resources;

/// The recent measurements of one guest, newest last, in a fixed window.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    buf: Vec<f64>,
    head: usize,
    len: usize,
}

impl History {
    /// A window of the `window` newest samples (at least 2).
    pub fn new(window: usize) -> Self {
        History { buf: vec![0.0; window.max(2)], head: 0, len: 0 }
    }

    pub fn push(&mut self, v: f64) {
        self.buf[self.head] = v;
        self.head = (self.head + 1) % self.buf.len();
        self.len = (self.len + 1).min(self.buf.len());
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The samples, newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = f64> + '_ {
        let n = self.buf.len();
        (1..=self.len).map(move |i| self.buf[(self.head + n - i) % n])
    }

    pub fn last(&self) -> Option<f64> {
        self.newest_first().next()
    }

    pub fn max(&self) -> Option<f64> {
        self.newest_first().reduce(f64::max)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.len > 0).then(|| self.newest_first().sum::<f64>() / self.len as f64)
    }

    /// Sum of squared one-step changes and how many changes there are.
    fn step_squares(&self) -> (f64, usize) {
        let mut it = self.newest_first();
        let Some(mut prev) = it.next() else { return (0.0, 0) };
        let (mut sum, mut n) = (0.0, 0);
        for v in it {
            sum += (prev - v) * (prev - v);
            n += 1;
            prev = v;
        }
        (sum, n)
    }

    /// Mean square of the one-step changes in the window; `None` with fewer
    /// than two samples.
    pub fn step_variance(&self) -> Option<f64> {
        let (sum, n) = self.step_squares();
        (n > 0).then(|| sum / n as f64)
    }

    /// [`History::step_variance`] shrunk towards `prior` as if the prior
    /// were `prior_weight` extra observed changes.
    pub fn step_variance_with_prior(&self, prior: f64, prior_weight: f64) -> f64 {
        let (sum, n) = self.step_squares();
        (sum + prior * prior_weight) / (n as f64 + prior_weight).max(f64::MIN_POSITIVE)
    }
}

/// A daily profile from evenly spaced CPU samples over one day: each of
/// `slots` slots gets the peak of its samples and the variance of its
/// samples around their mean; the other dimensions are constant.
pub fn daily_profile(cpu_samples: &[u32], other: Resources, slots: usize) -> Result<Profile, ProfileError> {
    if slots == 0 || cpu_samples.is_empty() {
        return Err(ProfileError::Empty);
    }
    if !cpu_samples.len().is_multiple_of(slots) {
        return Err(ProfileError::SlotCount { what: "a day of samples", got: cpu_samples.len(), expected: slots });
    }
    let k = cpu_samples.len() / slots;
    let mut out = Vec::with_capacity(slots);
    let mut var = Vec::with_capacity(slots);
    for chunk in cpu_samples.chunks(k) {
        let peak = chunk.iter().copied().max().unwrap_or(0);
        let mean = chunk.iter().map(|&v| f64::from(v)).sum::<f64>() / chunk.len() as f64;
        let v = chunk.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / chunk.len() as f64;
        out.push(Resources { cpu: peak, ..other });
        var.push(v.round().min(f64::from(u32::MAX)) as u32);
    }
    Profile::from_slots(out)?.with_cpu_variance(var)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_a_window_and_measures_jumps() {
        let mut h = History::new(3);
        assert_eq!(h.step_variance(), None);
        for v in [10.0, 20.0, 10.0, 40.0] {
            h.push(v);
        }
        assert_eq!(h.newest_first().collect::<Vec<_>>(), vec![40.0, 10.0, 20.0]);
        assert_eq!(h.last(), Some(40.0));
        assert_eq!(h.max(), Some(40.0));
        assert_eq!(h.mean(), Some(70.0 / 3.0));
        // changes 30 and 10: (900 + 100) / 2
        assert_eq!(h.step_variance(), Some(500.0));
        // prior 100 worth 2 changes: (1000 + 200) / 4
        assert_eq!(h.step_variance_with_prior(100.0, 2.0), 300.0);
    }

    #[test]
    fn daily_profile_keeps_slot_peaks() {
        let samples = [1, 3, 5, 5, 0, 10];
        let p = daily_profile(&samples, Resources::new(0, 64, 0, 0), 3).expect("3 divides 6");
        assert_eq!(p.iter().map(|r| r.cpu).collect::<Vec<_>>(), vec![3, 5, 10]);
        assert_eq!(p.slot(0).memory_mib, 64);
        assert_eq!(p.cpu_variance(0), 1);
        assert_eq!(p.cpu_variance(2), 25);
        assert!(daily_profile(&samples, Resources::ZERO, 4).is_err());
    }
}
