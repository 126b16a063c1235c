//! When a guest writes to its serial console, seen from the host.
//!
//! QEMU appends the guest's console output to the serial log as the guest
//! writes it, a character at a time. A watcher thread waits on that file
//! with inotify, reads what was appended, and notes the host time of each
//! write that ends a line. Around a live migration this gives the
//! pause as the guest's own output shows it: the source's last write
//! before QEMU stopped the guest, and the target's first after it resumed.
//! The watch also keeps the longest silence between two writes since it
//! began: on the source, any stall while the guest is copied (a host too
//! busy to run it, QEMU's lock held) shows there. It only means something
//! for a guest that writes steadily (a ticker, a log line every few
//! milliseconds): [`ConsoleWatch::steady_before`] says whether it did.
//!
//! A thread rather than a task: the agent's runtime is busy during a
//! migration, and a late wake-up would show as a longer pause.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::inotify;

/// Writes remembered; older ones are dropped (a guest writing every
/// millisecond fills it in about four seconds, more than any question
/// asked of it needs).
const KEPT: usize = 4096;
/// How often the thread looks whether it should stop.
const STOP_CHECK: Duration = Duration::from_millis(50);
/// A guest writes "steadily" with at least this many writes in the second
/// before a moment, the last of them at most [`STEADY_MAX_SILENCE_US`]
/// before it: one write in 100 ms or more often.
const STEADY_WRITES: usize = 10;
const STEADY_WINDOW_US: u64 = 1_000_000;
const STEADY_MAX_SILENCE_US: u64 = 100_000;

/// Host times (Unix microseconds) of a guest's console writes.
#[derive(Debug)]
pub(super) struct ConsoleWatch {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Seen {
    /// The last [`KEPT`] writes.
    writes: VecDeque<u64>,
    /// The longest time between two writes since the watch began, µs.
    longest_gap_us: u64,
}

impl Seen {
    fn note(&mut self, at_us: u64) {
        if let Some(&last) = self.writes.back() {
            self.longest_gap_us = self.longest_gap_us.max(at_us.saturating_sub(last));
        }
        if self.writes.len() == KEPT {
            self.writes.pop_front();
        }
        self.writes.push_back(at_us);
    }
}

/// How a guest wrote to its console up to a moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Steady {
    /// Its last write at or before the moment (Unix microseconds).
    pub last_us: u64,
    /// The median time between its writes in the second before, µs.
    pub interval_us: u64,
}

impl ConsoleWatch {
    /// Starts watching the log at `path` (it must exist). Stops when
    /// dropped.
    pub(super) fn start(path: &Path) -> std::io::Result<Self> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        inotify::add_watch(&fd, path, inotify::WatchFlags::MODIFY)?;
        let mut log = std::fs::File::open(path)?;
        std::io::Seek::seek(&mut log, std::io::SeekFrom::End(0))?;
        let watch = ConsoleWatch { seen: Arc::default(), stop: Arc::default() };
        let (seen, stop) = (watch.seen.clone(), watch.stop.clone());
        std::thread::Builder::new().name("console-watch".into()).spawn(move || observe(&fd, log, &seen, &stop))?;
        Ok(watch)
    }

    /// The first write after `since_us`, waiting up to `wait` for it.
    pub(super) async fn first_after(&self, since_us: u64, wait: Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(t) = self.writes().iter().copied().find(|t| *t > since_us) {
                return Some(t);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// How the guest wrote up to `at_us`, if it wrote steadily.
    pub(super) fn steady_before(&self, at_us: u64) -> Option<Steady> {
        steady(self.writes().make_contiguous(), at_us)
    }

    /// The longest silence between two of the guest's writes since the
    /// watch began, µs (0 before its second write).
    pub(super) fn longest_gap_us(&self) -> u64 {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).longest_gap_us
    }

    fn writes(&self) -> VecDeque<u64> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).writes.clone()
    }
}

impl Drop for ConsoleWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn steady(writes: &[u64], at_us: u64) -> Option<Steady> {
    let recent: Vec<u64> = writes.iter().copied().filter(|t| *t <= at_us && at_us - t <= STEADY_WINDOW_US).collect();
    let last_us = *recent.last()?;
    if recent.len() < STEADY_WRITES || at_us - last_us > STEADY_MAX_SILENCE_US {
        return None;
    }
    let mut gaps: Vec<u64> = recent.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_unstable();
    Some(Steady { last_us, interval_us: gaps[gaps.len() / 2] })
}

fn observe(fd: &OwnedFd, mut log: std::fs::File, seen: &Mutex<Seen>, stop: &AtomicBool) {
    let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: STOP_CHECK.as_nanos() as i64 };
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut appended = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "console watch ends");
                return;
            }
        }
        let now = crate::unix_us();
        let mut reader = inotify::Reader::new(fd.as_fd(), &mut buf);
        while reader.next().is_ok() {}
        // Several writes read at once happened at (about) the same time.
        appended.clear();
        if let Err(e) = std::io::Read::read_to_end(&mut log, &mut appended) {
            tracing::debug!(error = %e, "console watch ends");
            return;
        }
        if appended.contains(&b'\n') {
            seen.lock().unwrap_or_else(PoisonError::into_inner).note(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_writing_every_few_milliseconds_is_steady_and_a_quiet_one_is_not() {
        let at = 10_000_000;
        let ticking: Vec<u64> = (0..300).map(|i| at - 900_000 + i * 3_000).collect();
        let s = steady(&ticking, at).expect("steady");
        assert_eq!(s.last_us, at - 900_000 + 299 * 3_000);
        assert_eq!(s.interval_us, 3_000);
        // The same writes, but silent for the last 200 ms.
        assert_eq!(steady(&ticking, at + 200_000), None);
        // A line a second is no measure of a pause of milliseconds.
        let slow: Vec<u64> = (0..5).map(|i| at - i * 1_000_000).rev().collect();
        assert_eq!(steady(&slow, at), None);
        assert_eq!(steady(&[], at), None);
    }

    #[test]
    fn the_longest_silence_is_kept_past_the_writes_remembered() {
        let mut seen = Seen::default();
        seen.note(1_000);
        assert_eq!(seen.longest_gap_us, 0, "one write is no silence");
        seen.note(41_000);
        // Many more writes than are remembered, close together.
        for i in 0..(2 * KEPT as u64) {
            seen.note(42_000 + i * 1_000);
        }
        assert_eq!(seen.writes.len(), KEPT);
        assert_eq!(seen.longest_gap_us, 40_000, "the 40 ms stall early on is not forgotten");
    }

    #[tokio::test]
    async fn the_watch_notes_appends_to_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serial.log");
        std::fs::write(&path, b"boot\n").expect("write");
        let watch = ConsoleWatch::start(&path).expect("watch");
        let before = crate::unix_us();
        assert_eq!(watch.first_after(before, Duration::from_millis(20)).await, None, "nothing written yet");
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("open");
        for _ in 0..12 {
            // A character at a time, as QEMU writes a serial line: a line
            // counts once.
            std::io::Write::write_all(&mut f, b"t").expect("append");
            std::thread::sleep(Duration::from_millis(1));
            std::io::Write::write_all(&mut f, b"\n").expect("append");
            std::thread::sleep(Duration::from_millis(5));
        }
        let first = watch.first_after(before, Duration::from_secs(2)).await.expect("a write seen");
        assert!(first >= before);
        let s = watch.steady_before(crate::unix_us()).expect("steady writes");
        assert!(s.interval_us >= 5_000 && s.interval_us < 50_000, "{s:?}");
        assert!(watch.longest_gap_us() >= s.interval_us, "longest {} µs", watch.longest_gap_us());
    }
}
