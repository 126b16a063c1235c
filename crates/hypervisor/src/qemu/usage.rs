//! A guest's cumulative resource counters ([`crate::Hypervisor::usage`]),
//! read from where the host keeps them:
//!
//! | counter | from |
//! |---|---|
//! | process identity | `/proc/<pid>/stat`: the pid and its start time (field 22) |
//! | CPU time | the guest's cgroup (`cgroup.rs`, `cpu_stat`); without one, `/proc/<pid>/stat` utime + stime (all threads) |
//! | resident memory | `/proc/<pid>/status` `VmRSS` |
//! | NIC bytes | `/sys/class/net/<tap>/statistics` of each NIC's tap, swapped: what the tap receives, the guest sent |
//! | disk bytes | QMP `query-blockstats`, summed over the guest's drives |
//!
//! The cgroup comes first because it also counts what QEMU's helper
//! processes (if any) use on the guest's behalf, and it is what a CPU cap
//! limits, so a capped guest's usage reads against its cap. A NIC without a
//! tap (left out at start) counts nothing.

use std::path::Path;

use drove_model::GuestId;

use super::cgroup::Hierarchy;
use super::error::QemuError;
use super::guest_dir::GuestDir;
use super::{QemuHypervisor, Slot, live_pid};
use crate::{GuestUsage, HvError, RuntimeState};

/// Why a counter could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {field} we can read: {content:?}")]
    Parse { path: String, field: &'static str, content: String },
    #[error("asking QEMU for its block statistics")]
    BlockStats(#[source] Box<QemuError>),
}

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcStat {
    /// utime + stime, clock ticks.
    pub cpu_ticks: u64,
    /// When it started, clock ticks since boot.
    pub started: u64,
}

/// Parses the text of `/proc/<pid>/stat`.
pub(super) fn parse_proc_stat(path: &str, text: &str) -> Result<ProcStat, UsageError> {
    let parse = |field| UsageError::Parse { path: path.to_owned(), field, content: text.to_owned() };
    // The command name is in parentheses and may hold spaces and ')':
    // fields are counted after the last ')'. There, index 0 is field 3
    // (the state), so field N is index N - 3.
    let rest = text.rfind(')').map(|i| &text[i + 1..]).ok_or_else(|| parse("command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize, name| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).ok_or_else(|| parse(name));
    Ok(ProcStat {
        cpu_ticks: field(14, "utime")?.saturating_add(field(15, "stime")?),
        started: field(22, "starttime")?,
    })
}

/// `VmRSS` from the text of `/proc/<pid>/status`, in bytes.
pub(super) fn parse_rss(path: &str, text: &str) -> Result<u64, UsageError> {
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| UsageError::Parse { path: path.to_owned(), field: "VmRSS", content: text.to_owned() })
}

/// Bytes read and written, summed over the drives `query-blockstats`
/// lists.
pub(super) fn sum_blockstats(reply: &serde_json::Value) -> (u64, u64) {
    let Some(list) = reply.as_array() else { return (0, 0) };
    list.iter().fold((0, 0), |(r, w), dev| {
        let stat = |k: &str| dev.get("stats").and_then(|s| s.get(k)).and_then(serde_json::Value::as_u64).unwrap_or(0);
        (r + stat("rd_bytes"), w + stat("wr_bytes"))
    })
}

fn read(path: &str) -> Result<String, UsageError> {
    std::fs::read_to_string(path).map_err(|source| UsageError::Read { path: path.to_owned(), source })
}

/// A tap's counter; 0 for a tap that is not there.
fn tap_counter(tap: &str, name: &str) -> u64 {
    let path = Path::new("/sys/class/net").join(tap).join("statistics").join(name);
    std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

impl QemuHypervisor {
    pub(super) async fn guest_usage(&self, id: GuestId) -> Result<GuestUsage, HvError> {
        const OP: &str = "usage";
        let dir = self.dir(id);
        let config = self.record(&dir, id, OP)?;
        let guest = self.guest(id);
        let Some(pid) = live_pid(&dir) else {
            let state = guest.seen().map_or(RuntimeState::Stopped, |(s, _)| s);
            return Err(HvError::InvalidState { id, op: OP, state });
        };
        let fail = |e: UsageError| HvError::Backend { op: OP, id, source: Box::new(e) };
        let stat_path = format!("/proc/{pid}/stat");
        let stat = parse_proc_stat(&stat_path, &read(&stat_path).map_err(fail)?).map_err(fail)?;
        let cpu_ns = match cgroup_cpu_ns(&dir) {
            Some(ns) => ns,
            None => {
                let hz = rustix::param::clock_ticks_per_second().max(1);
                stat.cpu_ticks.saturating_mul(1_000_000_000) / hz
            }
        };
        let status_path = format!("/proc/{pid}/status");
        let memory_bytes = parse_rss(&status_path, &read(&status_path).map_err(fail)?).map_err(fail)?;
        let (mut net_rx_bytes, mut net_tx_bytes) = (0, 0);
        for index in 0..config.spec.nics.len() {
            let tap = Self::tap_name(id, index);
            net_rx_bytes += tap_counter(&tap, "tx_bytes");
            net_tx_bytes += tap_counter(&tap, "rx_bytes");
        }
        // Never waits behind an operation (a graceful stop may take
        // minutes, and heartbeats ask): busy means no reading this time.
        let Ok(mut slot) = guest.ops.try_lock() else {
            return Err(HvError::Backend {
                op: OP,
                id,
                source: "an operation on the guest holds its QMP connection".into(),
            });
        };
        let (disk_read_bytes, disk_written_bytes) =
            block_bytes(&dir, &mut slot, pid).await.map_err(|e| fail(UsageError::BlockStats(Box::new(e))))?;
        Ok(GuestUsage {
            pid,
            started: stat.started,
            cpu_ns,
            memory_bytes,
            net_rx_bytes,
            net_tx_bytes,
            disk_read_bytes,
            disk_written_bytes,
        })
    }
}

/// CPU time of the guest's cgroup, if it has one.
fn cgroup_cpu_ns(dir: &GuestDir) -> Option<u64> {
    let hierarchy = Hierarchy::detect().ok().flatten()?;
    let cgroup = hierarchy.named(dir.cgroup_name());
    // A guest started without one has no directory: its stat fails.
    cgroup.cpu_stat().ok().map(|s| s.usage.as_nanos().min(u128::from(u64::MAX)) as u64)
}

async fn block_bytes(dir: &GuestDir, slot: &mut Slot, pid: u32) -> Result<(u64, u64), QemuError> {
    let reply = slot.execute(dir, pid, "query-blockstats", None).await?;
    Ok(sum_blockstats(&reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        // A command name with a space and a parenthesis, as a hostile or
        // odd process may have.
        let text = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 150 0 0 20 0 3 0 987654 1000000 200 18446744073709551615";
        let s = parse_proc_stat("stat", text).expect("parses");
        assert_eq!(s, ProcStat { cpu_ticks: 400, started: 987654 });
        assert!(parse_proc_stat("stat", "4242 (qemu) S 1 2").is_err(), "too short");
        assert!(parse_proc_stat("stat", "no parenthesis").is_err());
    }

    #[test]
    fn rss_is_read_in_kib() {
        let text = "Name:\tqemu\nVmPeak:\t  900 kB\nVmRSS:\t  2048 kB\nThreads:\t3\n";
        assert_eq!(parse_rss("status", text).expect("parses"), 2048 * 1024);
        assert!(parse_rss("status", "Name:\tkthread\n").is_err(), "a kernel thread has none");
    }

    #[test]
    fn blockstats_are_summed_over_drives() {
        let reply = serde_json::json!([
            { "device": "disk0", "stats": { "rd_bytes": 100, "wr_bytes": 7 } },
            { "device": "disk1", "stats": { "rd_bytes": 50, "wr_bytes": 3 } },
            { "device": "cd", "stats": {} },
        ]);
        assert_eq!(sum_blockstats(&reply), (150, 10));
        assert_eq!(sum_blockstats(&serde_json::json!({})), (0, 0));
    }
}
