//! Each guest's measured load profile, learnt from its host's reports.
//!
//! Agents report, per guest with a process, the rates it used since their
//! previous sample (`ObservedGuest::load`). The manager folds each into the
//! guest's [`MeasuredLoad`] at the UTC hour of *its own* clock (hosts'
//! clocks may disagree; one clock keeps every guest's hours comparable).
//! How a slot averages, and when a planner trusts it, is
//! `drove_model::load`'s business; the placement model's use of it is in
//! [`crate::drs`].
//!
//! Durability at a bounded rate: a profile changes with every heartbeat,
//! but losing its last minute costs nothing worth a store write per guest
//! per heartbeat. Each guest's profile is written (`load/<guest id>`) in the
//! heartbeat's batch when it was last written at least
//! [`ManagerConfig::load_flush`](crate::ManagerConfig::load_flush) ago, or
//! into another hour than the sample's (so every hour's last samples reach
//! the store before the slot goes quiet for a day). A restarted manager
//! reads them back and carries on; a deleted guest's goes with its record.
//! Reports of a guest from a host it is not placed on are ignored (a
//! leftover copy somewhere else is not this guest's load).

use std::time::{Duration, Instant};

use drove_api::ObservedGuest;
use drove_model::{GuestId, HostId, MeasuredLoad};

use crate::core::Writes;
use crate::inventory::{Inventory, load_key, put};

/// A guest's profile and when it last went to the store.
#[derive(Debug, Clone, Default)]
pub struct LoadEntry {
    pub profile: MeasuredLoad,
    /// When this process last wrote it, and into which hour it had last
    /// recorded then; `None`: not since this manager started.
    flushed: Option<(Instant, usize)>,
}

impl LoadEntry {
    pub fn loaded(profile: MeasuredLoad) -> Self {
        LoadEntry { profile, flushed: None }
    }

    /// Folds `sample` into `hour` and says whether the profile is due to be
    /// written, as of `now`.
    fn record(&mut self, hour: usize, sample: &drove_model::LoadSample, now: Instant, every: Duration) -> bool {
        self.profile.record(hour, sample);
        let due = self.flushed.is_none_or(|(at, h)| h != hour || now.saturating_duration_since(at) >= every);
        if due {
            self.flushed = Some((now, hour));
        }
        due
    }
}

pub use drove_model::load::utc_hour;

/// Folds the rates `host` reported into the profiles of the guests placed
/// on it, at `hour`, adding the writes that are due to `w`.
pub(crate) fn record(
    inv: &mut Inventory,
    host: HostId,
    observed: &[ObservedGuest],
    hour: usize,
    every: Duration,
    w: &mut Writes,
) {
    let now = Instant::now();
    for o in observed {
        let Some(sample) = &o.load else { continue };
        if inv.guests.get(&o.id).is_none_or(|g| g.host != host) {
            continue;
        }
        let entry = inv.load.entry(o.id).or_default();
        if entry.record(hour, sample, now, every) {
            w.ops.push(put(load_key(o.id), &entry.profile));
        }
    }
}

/// Forgets a guest's profile, in memory and in the store.
pub(crate) fn forget(inv: &mut Inventory, id: GuestId, w: &mut Writes) {
    if inv.load.remove(&id).is_some() {
        w.ops.push(crate::inventory::delete(load_key(id)));
    }
}

#[cfg(test)]
mod tests {
    use drove_model::LoadSample;

    use super::*;

    fn sample(mc: f64) -> LoadSample {
        LoadSample { interval_ms: 1000, cpu_millicores: mc, ..LoadSample::default() }
    }

    #[test]
    fn a_profile_is_written_at_most_once_per_interval_and_at_each_new_hour() {
        let mut e = LoadEntry::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(60);
        assert!(e.record(4, &sample(1.0), t0, every), "the first sample since start is written");
        for s in 1..60 {
            assert!(!e.record(4, &sample(1.0), t0 + Duration::from_secs(s), every), "written again after {s} s");
        }
        assert!(e.record(4, &sample(1.0), t0 + every, every));
        assert!(e.record(5, &sample(1.0), t0 + every + Duration::from_secs(1), every), "a new hour is written");
        assert_eq!(e.profile.hours[4].samples, 61);
        assert_eq!(e.profile.hours[5].samples, 1);
    }

    #[test]
    fn hours_are_utc_hours_of_the_day() {
        assert_eq!(utc_hour(0), 0);
        assert_eq!(utc_hour(3_600_000 * 24 + 3_600_000 * 13 + 59_999), 13);
    }
}
