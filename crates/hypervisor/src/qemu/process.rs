//! QEMU processes we did not parent.
//!
//! Guests are launched with `-daemonize`, so their QEMU is re-parented to
//! init (or the nearest subreaper) and outlives the agent. That has two
//! consequences handled here:
//!
//! * We cannot `wait()` for them: we poll `/proc/<pid>` instead. A process
//!   that exited but was not yet reaped by its new parent is a zombie; it
//!   counts as gone.
//! * A pid from a pid file may by now belong to an unrelated process (the
//!   guest died and the number was reused). A pid only counts as the guest's
//!   QEMU when its command line contains the guest's own QMP socket path,
//!   which no other process has any reason to mention.

use std::path::Path;
use std::time::Duration;

use rustix::process::{Pid, Signal};

use super::error::QemuError;

/// How often we look whether a process is gone.
const POLL: Duration = Duration::from_millis(25);

/// Whether `pid` is a live (not zombie) process whose command line contains
/// `marker`.
pub fn is_guest_process(pid: u32, marker: &Path) -> bool {
    if !is_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let marker = marker.as_os_str().as_encoded_bytes();
    !marker.is_empty() && cmdline.windows(marker.len()).any(|w| w == marker)
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the command name, which is in parentheses and
    // may itself contain spaces and parentheses: look after the last ')'.
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X") | Some("x"))
}

pub fn kill(pid: u32) -> Result<(), QemuError> {
    signal(pid, Signal::KILL, "SIGKILL")
}

fn signal(pid: u32, sig: Signal, name: &'static str) -> Result<(), QemuError> {
    let raw = i32::try_from(pid).ok().and_then(Pid::from_raw);
    let Some(target) = raw else {
        return Err(QemuError::Signal {
            pid,
            signal: name,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    };
    match rustix::process::kill_process(target, sig) {
        Ok(()) => Ok(()),
        // Gone already: what we wanted.
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(QemuError::Signal { pid, signal: name, source: e.into() }),
    }
}

/// Waits until `pid` is gone; returns whether it went within `timeout`.
pub async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// SIGKILLs `pid` and waits for it to be gone.
pub async fn kill_and_wait(pid: u32, timeout: Duration) -> Result<(), QemuError> {
    kill(pid)?;
    if wait_gone(pid, timeout).await { Ok(()) } else { Err(QemuError::Unkillable { pid, after: timeout }) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn tells_live_processes_by_their_command_line_and_kills_them() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("qmp.sock");
        // `sleep` does not mention the marker; `sh -c '...marker...'` does.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("sleep 30; echo {}", marker.display()))
            // The orphaned `sleep` must not hold the test's output open.
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(is_alive(pid));
        // Until the child has exec'd, /proc shows our own command line.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !is_guest_process(pid, &marker) {
            assert!(std::time::Instant::now() < deadline, "{pid} never showed the marker");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_guest_process(pid, &dir.path().join("other.sock")));
        kill(pid).unwrap();
        // Our own child stays a zombie until reaped: it must count as gone.
        assert!(wait_gone(pid, Duration::from_secs(10)).await);
        assert!(!is_guest_process(pid, &marker));
        child.wait().unwrap();
        // Signalling a process that is gone is not an error.
        kill(pid).unwrap();
    }
}
