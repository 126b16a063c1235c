//! Measured load: what a guest uses, as its host's agent reports it, and
//! the daily profile the manager learns from those reports.
//!
//! An agent samples each running guest's cumulative counters (CPU time,
//! resident memory, NIC and disk bytes) and reports the *rates* over the
//! interval since its previous sample ([`LoadSample`]). The manager folds
//! each rate into a [`MeasuredLoad`]: 24 slots, one per UTC hour of the
//! manager's clock, each a time-weighted exponential average.
//!
//! # Why an exponential average, weighted by time
//!
//! A slot must say what the guest typically does at that hour, lately more
//! than long ago, whatever the sampling rate. Each sample therefore weighs
//! by the time it covers, and older samples fade with a time constant of
//! [`SLOT_TIME_CONSTANT`] of *sampled* time in the slot: three hours, so a
//! slot (sampled for an hour a day) reflects roughly the last three days at
//! that hour, with yesterday counting most. The average is bias-corrected
//! (it tracks the weight it has gathered), so the first sample is the
//! slot's value at once rather than a pull from zero.
//!
//! Next to the mean, each slot keeps the exponentially weighted *variance*
//! of CPU around it. We plan with the mean rather than a peak or a high
//! percentile: a peak of minute-long samples is dominated by one burst,
//! and a percentile needs a histogram per slot; the variance, in squared
//! milli-cores, is what the placement engine takes to keep room for
//! jitter across many guests (`Limits::cpu_sigmas`), which is the sound way
//! to cover bursts of independent guests.
//!
//! A slot is trusted once it has [`MIN_SAMPLES`] samples; before that a
//! planner falls back to what it would do without measurements.

use serde::{Deserialize, Serialize};

/// Slots of a measured profile: one per hour of the day, like
/// [`crate::guest::LoadProfile`].
pub const HOURS: usize = 24;

/// The hour of the day (UTC) of Unix time `unix_ms`: the slot a measured
/// profile files it under, and where planners start their hours ahead.
pub fn utc_hour(unix_ms: u64) -> usize {
    ((unix_ms / 3_600_000) % HOURS as u64) as usize
}

/// [`utc_hour`] of the wall clock now.
pub fn utc_hour_now() -> usize {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    utc_hour(ms)
}

/// How fast a slot forgets, in seconds of time sampled in that slot.
pub const SLOT_TIME_CONSTANT: f64 = 3.0 * 3600.0;

/// Samples a slot needs before a planner uses it instead of its default:
/// with agents sampling every 10 s, five minutes of that hour. Fewer could
/// be one unusual minute (a boot, a backup).
pub const MIN_SAMPLES: u64 = 30;

/// A guest's resource use over one sampling interval, as rates.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoadSample {
    /// How long the interval was, in milliseconds.
    pub interval_ms: u64,
    /// CPU used by the guest's VMM (all its threads), in milli-cores:
    /// 1000 is one host core busy all the time.
    pub cpu_millicores: f64,
    /// Resident memory of the VMM at the end of the interval, MiB.
    pub memory_mib: f64,
    /// Received by the guest, Mbit/s.
    pub net_rx_mbps: f64,
    /// Sent by the guest, Mbit/s.
    pub net_tx_mbps: f64,
    /// Read from its disks, Mbit/s.
    pub disk_read_mbps: f64,
    /// Written to its disks, Mbit/s.
    pub disk_write_mbps: f64,
}

/// One hour of a measured profile.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoadSlot {
    /// Samples folded in, ever.
    pub samples: u64,
    /// The weight the average holds, 0..=1 (1 - e^(-sampled time / time
    /// constant)): what bias-corrects it.
    pub weight: f64,
    pub cpu_millicores: f64,
    /// Variance of CPU around the mean, squared milli-cores.
    pub cpu_variance: f64,
    pub memory_mib: f64,
    pub net_rx_mbps: f64,
    pub net_tx_mbps: f64,
    pub disk_read_mbps: f64,
    pub disk_write_mbps: f64,
}

impl LoadSlot {
    /// Whether a planner may use this slot.
    pub fn trusted(&self) -> bool {
        self.samples >= MIN_SAMPLES
    }

    /// Folds in `s`, weighted by its interval.
    pub fn record(&mut self, s: &LoadSample) {
        // A zero interval carries no information; the agent never sends one,
        // but a sample must never divide by nothing.
        let dt = (s.interval_ms as f64 / 1000.0).max(1e-3);
        let alpha = 1.0 - (-dt / SLOT_TIME_CONSTANT).exp();
        let kept = self.weight * (1.0 - alpha);
        let weight = kept + alpha;
        let mix = |old: f64, new: f64| (old * kept + new * alpha) / weight;
        let cpu = mix(self.cpu_millicores, s.cpu_millicores);
        // The weighted variance around the new mean: the old spread moved
        // to the new mean, plus the new sample's deviation.
        let old_dev = self.cpu_millicores - cpu;
        let new_dev = s.cpu_millicores - cpu;
        self.cpu_variance = ((self.cpu_variance + old_dev * old_dev) * kept + new_dev * new_dev * alpha) / weight;
        self.cpu_millicores = cpu;
        self.memory_mib = mix(self.memory_mib, s.memory_mib);
        self.net_rx_mbps = mix(self.net_rx_mbps, s.net_rx_mbps);
        self.net_tx_mbps = mix(self.net_tx_mbps, s.net_tx_mbps);
        self.disk_read_mbps = mix(self.disk_read_mbps, s.disk_read_mbps);
        self.disk_write_mbps = mix(self.disk_write_mbps, s.disk_write_mbps);
        self.weight = weight;
        self.samples += 1;
    }
}

/// What a guest has been measured to use, per UTC hour of the day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MeasuredLoad {
    /// [`HOURS`] slots; slot `h` covers h:00..h:59 UTC.
    pub hours: Vec<LoadSlot>,
    /// The last sample reported, with the hour it went into.
    #[serde(default)]
    pub last: Option<LoadSample>,
    #[serde(default)]
    pub last_hour: Option<u8>,
}

impl Default for MeasuredLoad {
    fn default() -> Self {
        MeasuredLoad { hours: vec![LoadSlot::default(); HOURS], last: None, last_hour: None }
    }
}

impl MeasuredLoad {
    /// Folds `s` into slot `hour` (taken modulo [`HOURS`]). A stored profile
    /// of another length (none is written so) is reset rather than
    /// trusted.
    pub fn record(&mut self, hour: usize, s: &LoadSample) {
        if self.hours.len() != HOURS {
            *self = MeasuredLoad::default();
        }
        let hour = hour % HOURS;
        self.hours[hour].record(s);
        self.last = Some(*s);
        self.last_hour = Some(hour as u8);
    }

    /// Slot `hour` if a planner may use it.
    pub fn trusted(&self, hour: usize) -> Option<&LoadSlot> {
        self.hours.get(hour).filter(|s| s.trusted())
    }

    /// How many hours have enough samples.
    pub fn trusted_hours(&self) -> usize {
        self.hours.iter().filter(|s| s.trusted()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(mc: f64, secs: u64) -> LoadSample {
        LoadSample { interval_ms: secs * 1000, cpu_millicores: mc, memory_mib: 100.0, ..LoadSample::default() }
    }

    #[test]
    fn the_first_sample_is_the_slot_value_at_once() {
        let mut p = MeasuredLoad::default();
        p.record(5, &cpu(800.0, 10));
        let s = p.hours[5];
        assert!((s.cpu_millicores - 800.0).abs() < 1e-6, "{s:?}");
        assert!((s.memory_mib - 100.0).abs() < 1e-6, "{s:?}");
        assert_eq!(s.cpu_variance, 0.0);
        assert_eq!(s.samples, 1);
        assert_eq!(p.hours.iter().filter(|s| s.samples > 0).count(), 1, "only hour 5 moved");
        assert_eq!(p.last_hour, Some(5));
    }

    #[test]
    fn a_slot_follows_a_level_change_at_its_time_constant() {
        let mut p = MeasuredLoad::default();
        // Long history at 200, then one time constant's worth at 1000.
        for _ in 0..1000 {
            p.record(3, &cpu(200.0, 60));
        }
        let steps = (SLOT_TIME_CONSTANT / 60.0) as usize;
        for _ in 0..steps {
            p.record(3, &cpu(1000.0, 60));
        }
        let v = p.hours[3].cpu_millicores;
        // 1 - 1/e of the way: 200 + 800 * 0.632 = 706 (the history's own
        // weight is just short of 1, hence a little more).
        assert!((690.0..730.0).contains(&v), "{v}");
        // Both levels are in the window: a spread of hundreds of milli-cores.
        assert!(p.hours[3].cpu_variance.sqrt() > 200.0, "{:?}", p.hours[3]);
    }

    #[test]
    fn samples_weigh_by_the_time_they_cover_not_by_their_number() {
        let mut a = MeasuredLoad::default();
        a.record(0, &cpu(0.0, 600));
        a.record(0, &cpu(1000.0, 60));
        let mut b = MeasuredLoad::default();
        b.record(0, &cpu(0.0, 60));
        b.record(0, &cpu(1000.0, 600));
        // Ten minutes idle then one busy < one idle then ten busy.
        let (va, vb) = (a.hours[0].cpu_millicores, b.hours[0].cpu_millicores);
        assert!((va - 1000.0 / 11.0).abs() < 5.0, "{va}");
        assert!((vb - 10000.0 / 11.0).abs() < 5.0, "{vb}");
    }

    #[test]
    fn a_slot_is_trusted_from_min_samples_on() {
        let mut p = MeasuredLoad::default();
        for i in 0..MIN_SAMPLES {
            assert!(p.trusted(7).is_none(), "trusted after {i}");
            p.record(7 + HOURS, &cpu(500.0, 10));
        }
        assert!(p.trusted(7).is_some());
        assert_eq!(p.trusted_hours(), 1);
    }

    #[test]
    fn a_profile_survives_json_and_older_records_without_last() {
        let mut p = MeasuredLoad::default();
        p.record(23, &cpu(123.0, 10));
        let json = serde_json::to_vec(&p).expect("serializes");
        let back: MeasuredLoad = serde_json::from_slice(&json).expect("reads back");
        // JSON floats come back to within their last bit.
        assert_eq!((back.hours.len(), back.last, back.last_hour), (p.hours.len(), p.last, p.last_hour));
        for (a, b) in back.hours.iter().zip(&p.hours) {
            assert_eq!(a.samples, b.samples);
            assert!((a.weight - b.weight).abs() < 1e-15 && (a.cpu_millicores - b.cpu_millicores).abs() < 1e-9);
        }
        let bare = serde_json::json!({ "hours": vec![LoadSlot::default(); HOURS] });
        let old: MeasuredLoad = serde_json::from_value(bare).expect("an older record reads");
        assert_eq!(old.last, None);
        assert_eq!(old.hours.len(), HOURS);
    }
}
