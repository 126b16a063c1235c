//! Live migration with QEMU: `-incoming defer` on the target, `migrate` on
//! the source, disks mirrored over NBD when the hosts do not share them.
//!
//! ```text
//!  target                                   source
//!  ──────                                   ──────
//!  create (empty disks, or links to the
//!    shared ones), launch
//!    -incoming defer      (inmigrate)
//!  [tls-creds-psk endpoint=server]
//!  [nbd-server-start, block-export-add
//!    disk{i} writable]
//!  migrate-incoming tcp:listen:port
//!    (Nagle off on QEMU's listeners)
//!                                           [blockdev-add nbd → target's disk{i}
//!                                            blockdev-mirror sync=full,
//!                                              copy-mode=write-blocking
//!                                            … until every job is ready]
//!                                           migrate-set-capabilities
//!                                             (pause-before-switchover with a mirror)
//!                                           migrate tcp:target:port
//!                                           … active: RAM rounds
//!                                           pre-switchover (paused):
//!                                             block-job-cancel each mirror (in
//!                                             sync: write-blocking), migrate-continue
//!  (RESUME event: the guest runs here)      completed: postmigrate, paused for good
//!  migrate_finish: nbd-server-stop
//! ```
//!
//! With `write-blocking`, once a mirror is ready every guest write reaches
//! the target before it completes, so at switchover the target's disks hold
//! exactly what the source's do; the jobs are cancelled (not completed:
//! the source keeps its own disks) while the guest is paused. A failure
//! before `completed` leaves the source running (QEMU resumes it itself;
//! `migrate_cancel` makes sure), and the target is destroyed by the caller.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use drove_model::GuestId;
use serde_json::{Value, json};

use super::console_watch::ConsoleWatch;
use super::error::QemuError;
use super::guest_dir::GuestDir;
use super::{QemuHypervisor, Slot, backend, cmdline, live_pid};
use crate::migration::{
    DiskTransfer, Incoming, IncomingDone, MigrationKey, MigrationProgress, MigrationStats, Outgoing, TransferPhase,
};
use crate::{GuestConfig, HvError, RuntimeState};

const TLS_SERVER: &str = "drove-mig-tls-server";
const TLS_CLIENT: &str = "drove-mig-tls-client";
pub(super) const POLL: Duration = Duration::from_millis(20);
/// Around the switchover the guest is paused: every poll interval there
/// is pause the guest sees.
const FAST_POLL: Duration = Duration::from_millis(2);
/// The name under which QEMU gets the migration stream drove opened.
const MIGRATION_FD: &str = "drove-migration";
/// How long a target waits for the first console output of a guest that
/// wrote steadily on its source (a guest's silence after a resume is tens
/// of milliseconds under TCG).
const CONSOLE_WAIT: Duration = Duration::from_secs(1);
/// Connecting the migration stream (the target listens already).
const STREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause QEMU first aims at, as a share of the one allowed; see
/// [`DowntimeTarget`].
const FIRST_TARGET_DIVISOR: u64 = 5;
/// Dirty-sync rounds QEMU gets at one target before it is raised.
const ROUNDS_PER_TARGET: u64 = 2;

/// The pause QEMU aims at during one migration: tight at first, raised
/// step by step towards the operator's limit while the guest does not
/// converge. QEMU stops the guest as soon as it *expects* the rest to go
/// within its `downtime-limit`, and the last round (its bitmap sync, the
/// pages, TLS) takes longer than it expects: with the limit itself as
/// target, an idle guest paused 45 ms p50 against a 50 ms limit, with a
/// fifth of it 21 ms (`drove bench migrate`, same machine, same hour). A
/// busy guest that cannot get that low still gets the whole limit, a few
/// rounds later (oVirt's migration policies step their downtime alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DowntimeTarget {
    now_ms: u64,
    limit_ms: u64,
    /// The dirty-sync count when `now_ms` was set.
    since_round: u64,
}

impl DowntimeTarget {
    fn new(limit_ms: u64) -> Self {
        // Round 1 is the bulk copy: the first target gets the rounds after it.
        DowntimeTarget { now_ms: (limit_ms / FIRST_TARGET_DIVISOR).clamp(1, limit_ms.max(1)), limit_ms, since_round: 1 }
    }

    /// The new target, if the guest has not converged at this one for
    /// [`ROUNDS_PER_TARGET`] rounds: QEMU still expects a longer pause.
    fn raise(&mut self, round: u64, expected_ms: u64) -> Option<u64> {
        if self.now_ms >= self.limit_ms || expected_ms <= self.now_ms || round < self.since_round + ROUNDS_PER_TARGET {
            return None;
        }
        self.now_ms = (self.now_ms * 2).min(self.limit_ms);
        self.since_round = round;
        Some(self.now_ms)
    }
}

/// A transfer that moves no byte for this long is given up: a cut link
/// stalls TCP for minutes before anything fails by itself.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The stream's bandwidth cap when none is asked for: 10 GiB/s.
pub const UNLIMITED_BANDWIDTH: u64 = 10 << 30;
/// How long the memory copy may run with QEMU expecting a longer pause
/// than allowed before the migration is given up as not converging.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Watches guest `id`'s console for the pause as its output shows it; a
/// migration goes on without it (the figure is then unmeasured).
fn watch_console(dir: &GuestDir, id: GuestId) -> Option<ConsoleWatch> {
    ConsoleWatch::start(&dir.serial_log_path())
        .inspect_err(|e| tracing::debug!(guest = %id, error = %e, "cannot watch the console"))
        .ok()
}

fn nbd_node(i: usize) -> String {
    format!("drove-mig-nbd{i}")
}

fn mirror_job(i: usize) -> String {
    format!("drove-mig-mirror{i}")
}

/// GnuTLS's cipher order for the migration's TLS: its defaults with
/// ChaCha20-Poly1305 moved last, so both ends agree on AES-GCM. This GnuTLS
/// picked ChaCha20 although the CPUs have AES-NI, and the target decrypted
/// the stream in software: 5 ms of an idle guest's pause went to it (perf
/// on the target's main thread between STOP and RESUME). ChaCha20 stays
/// for peers without AES-GCM. QEMU appends its PSK key exchanges.
pub(super) const TLS_PRIORITY: &str = "NORMAL:-CHACHA20-POLY1305:+CHACHA20-POLY1305";

/// Writes the PSK file QEMU's `tls-creds-psk` reads (`<dir>/keys.psk`:
/// `identity:hexkey`), readable by us only; returns the directory.
fn write_key(dir: &GuestDir, key: &MigrationKey) -> Result<PathBuf, QemuError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tls = dir.root().join("tls");
    std::fs::create_dir_all(&tls).map_err(|e| QemuError::io("creating", &tls, e))?;
    let path = tls.join("keys.psk");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| QemuError::io("writing", &path, e))?;
    std::io::Write::write_all(&mut f, format!("{}:{}\n", key.identity, key.key_hex).as_bytes())
        .map_err(|e| QemuError::io("writing", &path, e))?;
    Ok(tls)
}

fn inet(host: std::net::IpAddr, port: u16) -> Value {
    json!({ "type": "inet", "host": host.to_string(), "port": port.to_string() })
}

pub(super) fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path).and_then(Value::as_u64).unwrap_or(0)
}

impl QemuHypervisor {
    pub(super) async fn incoming(&self, config: &GuestConfig, req: &Incoming) -> Result<(), HvError> {
        const OP: &str = "migrate_incoming";
        let id = config.id;
        if let Some(reason) = config.spec.migration_refusal() {
            return Err(HvError::DiskKind { id, op: OP, reason });
        }
        let shared = config.spec.storage == drove_model::guest::Storage::Shared;
        if shared != (req.disks == DiskTransfer::Shared) {
            return Err(HvError::Unsupported {
                op: OP,
                backend: drove_model::HypervisorKind::Qemu,
                reason: format!(
                    "guest {id} has its disks on {} storage: they must be {}",
                    config.spec.storage,
                    if shared { "shared, not mirrored" } else { "mirrored" }
                ),
            });
        }
        self.migration_supported(OP).await?;
        // Defines the guest and makes its (empty) disks, idempotently; a
        // guest on shared storage links the disks its source runs on.
        crate::Hypervisor::create(self, config).await?;
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        let config = self.record(&dir, id, OP)?;
        let (state, pid) = self.observe(&dir, &mut slot).await.map_err(backend(OP, id))?;
        if let Some(pid) = pid {
            let status = slot.query_status(&dir, pid).await.map_err(backend(OP, id))?;
            if status == "inmigrate" {
                return Ok(()); // waiting already
            }
            return Err(HvError::InvalidState { id, op: OP, state });
        }
        let tls = match &req.key {
            Some(key) => Some(write_key(&dir, key).map_err(backend(OP, id))?),
            None => None,
        };
        self.launch(&dir, &mut slot, &config, true).await.map_err(backend(OP, id))?;
        let result = self.listen(&dir, &mut slot, &config, req, tls).await;
        if result.is_ok() {
            // Before the guest can run here, so its first write is seen.
            slot.console = watch_console(&dir, id);
        }
        if result.is_err()
            && let Some(pid) = live_pid(&dir)
            && let Err(e) = super::terminate(&dir, &mut slot, pid).await
        {
            tracing::error!(guest = %id, error = %e, "cannot end the QEMU of a failed incoming migration");
        }
        result.map_err(backend(OP, id))
    }

    async fn listen(
        &self,
        dir: &GuestDir,
        slot: &mut Slot,
        config: &GuestConfig,
        req: &Incoming,
        tls: Option<PathBuf>,
    ) -> Result<(), QemuError> {
        let pid = dir.read_pid().ok_or_else(|| QemuError::PidFile { path: dir.pid_path(), content: String::new() })?;
        let mut tls_creds = None;
        if let Some(tls) = tls {
            slot.execute(
                dir,
                pid,
                "object-add",
                Some(json!({ "qom-type": "tls-creds-psk", "id": TLS_SERVER, "endpoint": "server",
                             "dir": tls.to_string_lossy(), "priority": TLS_PRIORITY })),
            )
            .await?;
            slot.execute(dir, pid, "migrate-set-parameters", Some(json!({ "tls-creds": TLS_SERVER }))).await?;
            tls_creds = Some(TLS_SERVER);
        }
        if req.disks == DiskTransfer::Mirror && !config.spec.disks.is_empty() {
            // nbd-server-start still takes the legacy (nested) address form.
            let mut args = json!({ "addr": { "type": "inet", "data": { "host": req.listen.to_string(),
                                                                       "port": req.nbd_port.to_string() } } });
            if let Some(creds) = tls_creds {
                args["tls-creds"] = json!(creds);
            }
            slot.execute(dir, pid, "nbd-server-start", Some(args)).await?;
            if let Err(e) = no_delay_on_listener(pid, req.nbd_port) {
                tracing::warn!(guest = %config.id, error = %e, "cannot turn Nagle off for the disk mirror");
            }
            for i in 0..config.spec.disks.len() {
                slot.execute(
                    dir,
                    pid,
                    "block-export-add",
                    Some(json!({ "type": "nbd", "id": format!("drove-mig-export{i}"), "node-name": format!("disk{i}"),
                                 "name": format!("disk{i}"), "writable": true })),
                )
                .await?;
            }
        }
        slot.execute(
            dir,
            pid,
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
            { "capability": "events", "state": true } ] })),
        )
        .await?;
        slot.execute(dir, pid, "migrate-incoming", Some(json!({ "uri": format!("tcp:{}:{}", req.listen, req.port) })))
            .await?;
        if let Err(e) = no_delay_on_listener(pid, req.port) {
            tracing::warn!(guest = %config.id, error = %e, "cannot turn Nagle off for the migration stream; its TLS handshake may stall the guest");
        }
        tracing::info!(guest = %config.id, listen = %req.listen, port = req.port, "waiting for the migration stream");
        Ok(())
    }

    /// Refuses a TCG migration on a QEMU known to corrupt busy guests, and
    /// one on a QEMU whose release we cannot tell.
    async fn migration_supported(&self, op: &'static str) -> Result<(), HvError> {
        if self.accel().await != super::ResolvedAccel::Tcg {
            return Ok(());
        }
        let min = super::QemuVersion::TCG_MIGRATION_MIN;
        let reason = match self.qemu_version().await {
            Some(v) if v >= min => return Ok(()),
            Some(v) => format!(
                "QEMU {v} loses a busy guest's memory writes when it migrates under TCG; \
                 live migration needs QEMU {min} or newer (scripts/install-deps.sh installs it)"
            ),
            None => format!(
                "cannot tell the QEMU release ({} --version); live migration under TCG needs QEMU {min} or newer",
                self.config().qemu_binary.display()
            ),
        };
        Err(HvError::Unsupported { op, backend: drove_model::HypervisorKind::Qemu, reason })
    }

    pub(super) async fn outgoing(
        &self,
        id: GuestId,
        req: &Outgoing,
        progress: &(dyn Fn(MigrationProgress) + Send + Sync),
    ) -> Result<MigrationStats, HvError> {
        const OP: &str = "migrate_out";
        self.migration_supported(OP).await?;
        let guest = self.guest(id);
        guest.cancel_migration.store(false, Ordering::SeqCst);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        let config = self.record(&dir, id, OP)?;
        if let Some(reason) = config.spec.migration_refusal() {
            return Err(HvError::DiskKind { id, op: OP, reason });
        }
        // Remembered: `status` and `list` answer from it for the length of
        // the transfer instead of waiting for it.
        let (state, pid) = self.observe_and_remember(&guest, &dir, &mut slot).await.map_err(backend(OP, id))?;
        let Some(pid) = pid.filter(|_| matches!(state, RuntimeState::Running | RuntimeState::Paused)) else {
            return Err(HvError::InvalidState { id, op: OP, state });
        };
        let outgoing = outgoing_path(&dir);
        let line = format!("{} {} {}\n", req.target, req.port, req.nbd_port);
        std::fs::write(&outgoing, line).map_err(|e| backend(OP, id)(QemuError::io("writing", &outgoing, e)))?;
        let auto_converge = self.accel().await == super::ResolvedAccel::Kvm;
        let disks = config.spec.disks.len();
        let console = watch_console(&dir, id);
        let mut run = Outbound { dir: &dir, slot: &mut slot, pid, disks, mirrors: 0, auto_converge };
        let result = run.migrate(req, progress, &guest.cancel_migration).await.map(|stats| {
            let steady = stats.stopped_at_us.zip(console.as_ref()).and_then(|(at, c)| c.steady_before(at));
            MigrationStats {
                console_last_us: steady.map(|s| s.last_us),
                console_interval_us: steady.map(|s| s.interval_us),
                console_copy_gap_us: steady.and(console.as_ref()).map(ConsoleWatch::longest_gap_us),
                ..stats
            }
        });
        if let Err(e) = &result {
            tracing::warn!(guest = %id, error = %e, "migration failed; the guest stays here");
            sever(req.target, [req.port, req.nbd_port]).await;
            run.abort().await;
        }
        let _ = std::fs::remove_file(&outgoing);
        result.map_err(backend(OP, id))
    }

    pub(super) async fn finish_incoming(
        &self,
        id: GuestId,
        timeout: Duration,
        await_console: bool,
    ) -> Result<IncomingDone, HvError> {
        const OP: &str = "migrate_finish";
        let guest = self.guest(id);
        let mut slot = guest.change().await;
        let dir = self.dir(id);
        self.record(&dir, id, OP)?;
        self.observe_and_remember(&guest, &dir, &mut slot).await.map_err(backend(OP, id))?;
        let deadline = Instant::now() + timeout;
        loop {
            let Some(pid) = live_pid(&dir) else {
                return Err(backend(OP, id)(QemuError::UnexpectedRunState {
                    status: "gone".into(),
                    after: "the incoming migration",
                }));
            };
            let status = slot.query_status(&dir, pid).await.map_err(backend(OP, id))?;
            match status.as_str() {
                "running" => break,
                "inmigrate" if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                _ => {
                    // The guest's last words say why (a panic message):
                    // this copy is about to be destroyed with its log.
                    let console = crate::tail_file(&dir.serial_log_path(), 8192).await.unwrap_or_default();
                    let console = String::from_utf8_lossy(&console);
                    let lines: Vec<&str> = console.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                    let from = |n: usize| lines[lines.len().saturating_sub(n)..].join(" | ");
                    tracing::warn!(guest = %id, %status, console = %from(60), "incoming migration failed");
                    let last: Vec<&str> = lines[lines.len().saturating_sub(3)..].to_vec();
                    let status =
                        if last.is_empty() { status } else { format!("{status}; its console: {}", last.join(" | ")) };
                    return Err(backend(OP, id)(QemuError::UnexpectedRunState {
                        status,
                        after: "the incoming migration",
                    }));
                }
            }
        }
        // Before anything that could fail and drop the connection with
        // what it saw.
        let resumed_at_us = slot.qmp.as_ref().and_then(|(_, c)| c.last_seen("RESUME"));
        let pid = live_pid(&dir).unwrap_or_default();
        // Serving the disks is over; nothing else may write them now.
        if let Err(e) = slot.execute(&dir, pid, "nbd-server-stop", None).await {
            tracing::debug!(guest = %id, error = %e, "no NBD server to stop");
        }
        let _ = std::fs::remove_dir_all(dir.root().join("tls"));
        tracing::info!(guest = %id, "the migrated guest runs here");
        let console = slot.console.take();
        drop(slot);
        let console_first_us = match (await_console, resumed_at_us, console) {
            (true, Some(resumed), Some(console)) => console.first_after(resumed, CONSOLE_WAIT).await,
            _ => None,
        };
        Ok(IncomingDone { resumed_at_us, console_first_us })
    }

    pub(super) async fn cancel_outgoing(&self, id: GuestId) -> Result<(), HvError> {
        const OP: &str = "migrate_cancel";
        let guest = self.guest(id);
        // Tells a running `outgoing` to give up; it holds the lock until it has.
        guest.cancel_migration.store(true, Ordering::SeqCst);
        let mut slot = guest.change().await;
        guest.cancel_migration.store(false, Ordering::SeqCst);
        let dir = self.dir(id);
        self.record(&dir, id, OP)?;
        // Readers answer from this while the abort takes its time.
        self.observe_and_remember(&guest, &dir, &mut slot).await.map_err(backend(OP, id))?;
        let Some(pid) = live_pid(&dir) else {
            return Err(HvError::InvalidState { id, op: OP, state: RuntimeState::Stopped });
        };
        let disks = self.record(&dir, id, OP)?.spec.disks.len();
        if let Some((target, port, nbd_port)) = read_outgoing(&dir) {
            sever(target, [port, nbd_port]).await;
        }
        let mut run = Outbound { dir: &dir, slot: &mut slot, pid, disks, mirrors: disks, auto_converge: false };
        run.abort().await;
        let _ = std::fs::remove_file(outgoing_path(&dir));
        let status = run.slot.query_status(&dir, pid).await.map_err(backend(OP, id))?;
        match status.as_str() {
            "running" => Ok(()),
            // Sent: the target may run the guest already. Only whoever knows
            // it does not may resume this copy (`resume`).
            "postmigrate" => Err(HvError::MigrationCompleted { id }),
            // A pause for the final round that the abort ended.
            _ => {
                run.slot.execute(&dir, pid, "cont", None).await.map_err(backend(OP, id))?;
                super::announce(&dir, run.slot, pid).await;
                Ok(())
            }
        }
    }
}

/// Turns Nagle's algorithm off on the socket the QEMU `pid` listens on at
/// `port`; the connections it accepts inherit that. QEMU's listeners leave
/// Nagle on: on the migration port, the TLS handshake's second server
/// flight then waited for the source's delayed ACK of the first, 44 ms
/// instead of 1 in a third of the migrations, all inside the source's
/// `migrate` command with QEMU's big lock held, so the guest stood still
/// for it (traced: `qio_channel_tls_handshake_*` beside the guest's console
/// writes). QEMU takes a migration socket drove opens only as a connected
/// one, which would need an accept racing the source; it is simpler to
/// reach into QEMU's listener (`pidfd_getfd`, as root may).
fn no_delay_on_listener(pid: u32, port: u16) -> std::io::Result<()> {
    use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
    let process = i32::try_from(pid).ok().and_then(Pid::from_raw);
    let process = process.ok_or_else(|| std::io::Error::other(format!("no process {pid}")))?;
    let pidfd = pidfd_open(process, PidfdFlags::empty())?;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if !std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")) {
            continue;
        }
        let Some(number) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // Gone since the listing (a connection QEMU closed): not ours.
        let Ok(fd) = pidfd_getfd(&pidfd, number, PidfdGetfdFlags::empty()) else { continue };
        let listening = rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false);
        let bound = rustix::net::getsockname(&fd).ok().and_then(|a| std::net::SocketAddr::try_from(a).ok());
        if listening && bound.is_some_and(|a| a.port() == port) {
            rustix::net::sockopt::set_tcp_nodelay(&fd, true)?;
            return Ok(());
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("QEMU {pid} listens on no port {port}")))
}

/// Where a migration of this guest is being sent: `<guest dir>/outgoing`
/// holds "ADDRESS PORT NBD_PORT" while one may be in flight, so that a
/// cancel (also from a restarted agent) can sever its connections.
fn outgoing_path(dir: &GuestDir) -> PathBuf {
    dir.root().join("outgoing")
}

fn read_outgoing(dir: &GuestDir) -> Option<(std::net::IpAddr, u16, u16)> {
    let text = std::fs::read_to_string(outgoing_path(dir)).ok()?;
    let mut parts = text.split_whitespace();
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Destroys this host's TCP connections to the target's migration and NBD
/// ports (`ss -K`). Aborting a transfer over a dead link otherwise waits
/// for TCP to give up (many minutes), with QEMU's main loop stuck draining
/// the NBD requests in flight. Best effort: a kernel without socket
/// destruction only makes the abort slow.
async fn sever(target: std::net::IpAddr, ports: [u16; 2]) {
    for port in ports {
        let dst = target.to_string();
        let port = port.to_string();
        if let Err(e) = drove_net::cmd::run("ss", &["-K", "dst", &dst, "dport", "=", &port]).await {
            tracing::debug!(%target, port, error = %e, "cannot destroy the connections of an aborted migration");
        }
    }
}

/// Notices a transfer that stopped moving.
pub(super) struct Stall {
    last: u64,
    since: Instant,
}

impl Stall {
    pub(super) fn new() -> Self {
        Stall { last: 0, since: Instant::now() }
    }

    pub(super) fn check(&mut self, progress: u64, what: &str) -> Result<(), QemuError> {
        if progress != self.last {
            self.last = progress;
            self.since = Instant::now();
        } else if self.since.elapsed() > STALL_TIMEOUT {
            return Err(QemuError::UnexpectedRunState {
                status: format!("no progress {what} for {}s (is the migration link down?)", STALL_TIMEOUT.as_secs()),
                after: "migrate",
            });
        }
        Ok(())
    }
}

/// The source side of one migration.
struct Outbound<'a> {
    dir: &'a GuestDir,
    slot: &'a mut Slot,
    pid: u32,
    disks: usize,
    /// How many mirror jobs (and NBD nodes) may exist.
    mirrors: usize,
    /// Throttle a guest that dirties memory faster than it can be sent
    /// (QEMU's auto-converge). Off under TCG: QEMU 7.2's throttling there
    /// lost guest memory writes in our tests (the guest oopsed on its
    /// target), so a TCG guest that does not converge is given up instead.
    auto_converge: bool,
}

impl Outbound<'_> {
    /// Opens the migration stream to `to` itself, with Nagle's algorithm
    /// off, and hands it to QEMU as [`MIGRATION_FD`]. QEMU's own `tcp:`
    /// transport leaves Nagle on, so the last small writes of the
    /// switchover (device state, the end marker) waited for the target's
    /// delayed ACK of the write before: 10 to 30 ms more pause, in about
    /// half the migrations of an idle guest (traced with QEMU's
    /// `vmstate_downtime_*` events: the source was done, the target had
    /// not received).
    async fn stream_to(&mut self, to: std::net::SocketAddr) -> Result<(), QemuError> {
        use std::os::fd::AsFd;
        let connect = |source| QemuError::MigrationConnect { to, source };
        let stream = tokio::time::timeout(STREAM_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(to))
            .await
            .map_err(|_| connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        stream.set_nodelay(true).map_err(connect)?;
        let (dir, pid) = (self.dir, self.pid);
        let client = self.slot.client(dir, pid).await?;
        let sent = client.send_fd(MIGRATION_FD, stream.as_fd()).await;
        if sent.is_err() {
            self.slot.qmp = None;
        }
        // QEMU holds its own copy now; ours closes with `stream`.
        sent.map_err(|source| QemuError::Qmp { pid, socket: dir.qmp_path(), source })
    }

    async fn qmp(&mut self, command: &str, args: Value) -> Result<Value, QemuError> {
        let args = if args.is_null() { None } else { Some(args) };
        self.slot.execute(self.dir, self.pid, command, args).await
    }

    async fn migrate(
        &mut self,
        req: &Outgoing,
        progress: &(dyn Fn(MigrationProgress) + Send + Sync),
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<MigrationStats, QemuError> {
        let started = Instant::now();
        // QMP stamps events with the wall clock.
        let started_us =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let cancelled = || cancel.load(Ordering::SeqCst);
        let gave_up = || QemuError::UnexpectedRunState { status: "cancelled".into(), after: "a cancel request" };
        let mut tls_creds = None;
        if let Some(key) = &req.key {
            let tls = write_key(self.dir, key)?;
            let _ = self.qmp("object-del", json!({ "id": TLS_CLIENT })).await;
            self.qmp(
                "object-add",
                json!({ "qom-type": "tls-creds-psk", "id": TLS_CLIENT, "endpoint": "client",
                        "dir": tls.to_string_lossy(), "username": key.identity, "priority": TLS_PRIORITY }),
            )
            .await?;
            tls_creds = Some(TLS_CLIENT);
        }
        let mirror = req.disks == DiskTransfer::Mirror && self.disks > 0;
        if mirror {
            let top = self.top_nodes().await?;
            self.mirrors = self.disks;
            for (i, node) in top.iter().enumerate() {
                let mut server = json!({ "driver": "nbd", "node-name": nbd_node(i), "server": inet(req.target, req.nbd_port),
                                         "export": format!("disk{i}") });
                if let Some(creds) = tls_creds {
                    server["tls-creds"] = json!(creds);
                }
                self.qmp("blockdev-add", server).await?;
                self.qmp(
                    "blockdev-mirror",
                    json!({ "job-id": mirror_job(i), "device": node, "target": nbd_node(i), "sync": "full",
                            "copy-mode": "write-blocking", "auto-dismiss": true }),
                )
                .await?;
            }
            let mut stall = Stall::new();
            loop {
                if cancelled() {
                    return Err(gave_up());
                }
                let jobs = self.qmp("query-block-jobs", Value::Null).await?;
                let jobs: Vec<&Value> = jobs.as_array().map(|a| a.iter().collect()).unwrap_or_default();
                let ours: Vec<&&Value> = jobs
                    .iter()
                    .filter(|j| {
                        j.get("device").and_then(Value::as_str).is_some_and(|d| d.starts_with("drove-mig-mirror"))
                    })
                    .collect();
                if ours.len() < self.disks {
                    return Err(QemuError::UnexpectedRunState {
                        status: "mirror job ended".into(),
                        after: "mirroring",
                    });
                }
                let (done, len): (u64, u64) =
                    ours.iter().fold((0, 0), |(d, l), j| (d + u(j, "/offset"), l + u(j, "/len")));
                stall.check(done, "mirroring the disks")?;
                progress(MigrationProgress {
                    phase: TransferPhase::Disks,
                    transferred: done,
                    remaining: len.saturating_sub(done),
                    dirty_rate: 0,
                    expected_downtime_ms: 0,
                });
                if ours.iter().all(|j| j.get("ready").and_then(Value::as_bool) == Some(true)) {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        let caps = json!({ "capabilities": [
            { "capability": "events", "state": true },
            { "capability": "auto-converge", "state": self.auto_converge },
            { "capability": "pause-before-switchover", "state": mirror },
        ] });
        self.qmp("migrate-set-capabilities", caps).await?;
        // "Unlimited" is a large but sane figure: QEMU 7.2 mis-paces the
        // iterations of a guest that dirties memory when the cap is near
        // u64::MAX (its guest came up corrupted on the target in our tests).
        let bandwidth = if req.max_bandwidth == 0 { UNLIMITED_BANDWIDTH } else { req.max_bandwidth };
        let mut target = DowntimeTarget::new(req.downtime_limit_ms);
        let mut params = json!({ "downtime-limit": target.now_ms, "max-bandwidth": bandwidth });
        if let Some(creds) = tls_creds {
            params["tls-creds"] = json!(creds);
        }
        self.qmp("migrate-set-parameters", params).await?;
        // Drop events from before: the STOP we want is this migration's.
        if let Some((_, c)) = self.slot.qmp.as_mut() {
            c.take_events();
        }
        self.stream_to(std::net::SocketAddr::new(req.target, req.port)).await?;
        self.qmp("migrate", json!({ "uri": format!("fd:{MIGRATION_FD}") })).await?;
        let mut stall = Stall::new();
        let mut over_limit_since: Option<Instant> = None;
        let info = loop {
            if cancelled() {
                return Err(gave_up());
            }
            let info = self.qmp("query-migrate", Value::Null).await?;
            if info.get("status").and_then(Value::as_str) == Some("active") {
                stall.check(u(&info, "/ram/transferred"), "copying memory")?;
                let expected = u(&info, "/expected-downtime");
                if let Some(ms) = target.raise(u(&info, "/ram/dirty-sync-count"), expected) {
                    tracing::debug!(
                        target_ms = ms,
                        expected_ms = expected,
                        "not converging yet: a longer pause allowed"
                    );
                    self.qmp("migrate-set-parameters", json!({ "downtime-limit": ms })).await?;
                }
                // Not converging: QEMU keeps expecting a longer pause than
                // allowed. Given up rather than copying forever.
                if expected > req.downtime_limit_ms && u(&info, "/ram/dirty-sync-count") > 2 {
                    let since = *over_limit_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > CONVERGE_TIMEOUT {
                        let mib = |v: u64| v / (1 << 20);
                        return Err(QemuError::UnexpectedRunState {
                            status: format!(
                                "not converging for {}s: the guest dirties {} MiB/s and the pause would be {expected} ms, \
                                 over the {} ms limit (allow a longer pause, or migrate when it is quieter)",
                                CONVERGE_TIMEOUT.as_secs(),
                                mib(u(&info, "/ram/dirty-pages-rate") * u(&info, "/ram/page-size").max(4096)),
                                req.downtime_limit_ms
                            ),
                            after: "migrate",
                        });
                    }
                } else {
                    over_limit_since = None;
                }
            }
            let status = info.get("status").and_then(Value::as_str).unwrap_or_default().to_owned();
            match status.as_str() {
                "completed" => break info,
                "failed" | "cancelled" => {
                    let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given").to_owned();
                    return Err(QemuError::UnexpectedRunState { status: format!("{status}: {why}"), after: "migrate" });
                }
                "pre-switchover" => {
                    progress(self.progress(&info, TransferPhase::Switchover));
                    self.cancel_mirrors(false).await?;
                    self.qmp("migrate-continue", json!({ "state": "pre-switchover" })).await?;
                }
                _ => progress(self.progress(&info, TransferPhase::Memory)),
            }
            // Near the end, a pause-before-switchover waits for us: look
            // often then.
            let near_end = status == "device" || u(&info, "/ram/remaining") < (16 << 20);
            tokio::time::sleep(if mirror && near_end { FAST_POLL } else { POLL }).await;
        };
        self.remove_nbd_nodes().await;
        // This migration's pause: a STOP seen since it began.
        let stopped_at_us = self.slot.qmp.as_ref().and_then(|(_, c)| c.last_seen("STOP")).filter(|t| *t >= started_us);
        let stats = MigrationStats {
            total_ms: started.elapsed().as_millis() as u64,
            qemu_downtime_ms: u(&info, "/downtime"),
            transferred: u(&info, "/ram/transferred"),
            stopped_at_us,
            console_last_us: None,
            console_interval_us: None,
            console_copy_gap_us: None,
        };
        progress(MigrationProgress {
            phase: TransferPhase::Done,
            transferred: stats.transferred,
            remaining: 0,
            dirty_rate: 0,
            expected_downtime_ms: 0,
        });
        Ok(stats)
    }

    fn progress(&self, info: &Value, phase: TransferPhase) -> MigrationProgress {
        MigrationProgress {
            phase,
            transferred: u(info, "/ram/transferred"),
            remaining: u(info, "/ram/remaining"),
            dirty_rate: u(info, "/ram/dirty-pages-rate") * u(info, "/ram/page-size").max(4096),
            expected_downtime_ms: u(info, "/expected-downtime"),
        }
    }

    /// The node each disk's device reads from ([`cmdline::root_nodes`]).
    async fn top_nodes(&mut self) -> Result<Vec<String>, QemuError> {
        let named = self.qmp("query-named-block-nodes", json!({ "flat": true })).await?;
        Ok(cmdline::root_nodes(&named, self.disks))
    }

    /// Ends the mirror jobs without switching the source to the target
    /// (the source keeps its disks) and waits until they are gone. `force`
    /// abandons them at once, requests in flight to the target included
    /// (a dead link would hold them for minutes); without it a ready mirror
    /// first brings the target in sync.
    async fn cancel_mirrors(&mut self, force: bool) -> Result<(), QemuError> {
        for i in 0..self.mirrors {
            if let Err(e) = self.qmp("block-job-cancel", json!({ "device": mirror_job(i), "force": force })).await {
                tracing::debug!(job = %mirror_job(i), error = %e, "no mirror job to cancel");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let jobs = self.qmp("query-block-jobs", Value::Null).await?;
            let left = jobs
                .as_array()
                .into_iter()
                .flatten()
                .filter(|j| j.get("device").and_then(Value::as_str).is_some_and(|d| d.starts_with("drove-mig-mirror")))
                .count();
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(QemuError::Timeout {
                    what: "ending the disk mirrors".into(),
                    after: Duration::from_secs(30),
                });
            }
            tokio::time::sleep(FAST_POLL).await;
        }
    }

    async fn remove_nbd_nodes(&mut self) {
        for i in 0..self.mirrors {
            let _ = self.qmp("blockdev-del", json!({ "node-name": nbd_node(i) })).await;
        }
        let _ = self.qmp("object-del", json!({ "id": TLS_CLIENT })).await;
        let _ = std::fs::remove_dir_all(self.dir.root().join("tls"));
    }

    /// Undoes what a migration left on the source: the stream, the mirror
    /// jobs and their NBD nodes. The guest keeps running here (QEMU resumes
    /// it after a failed or cancelled migration).
    async fn abort(&mut self) {
        if let Ok(info) = self.qmp("query-migrate", Value::Null).await {
            let status = info.get("status").and_then(Value::as_str).unwrap_or_default().to_owned();
            if !matches!(status.as_str(), "completed" | "failed" | "cancelled" | "") {
                let _ = self.qmp("migrate_cancel", Value::Null).await;
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    let done = self.qmp("query-migrate", Value::Null).await.ok().is_some_and(|i| {
                        matches!(i.get("status").and_then(Value::as_str), Some("cancelled" | "failed" | "completed"))
                    });
                    if done {
                        break;
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }
        if let Err(e) = self.cancel_mirrors(true).await {
            tracing::warn!(error = %e, "cannot end the disk mirrors of an aborted migration");
        }
        self.remove_nbd_nodes().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn nagle_goes_off_on_the_listener_of_the_port_asked_and_its_connections() {
        use rustix::net::sockopt::tcp_nodelay as get_tcp_nodelay;
        let ours = std::process::id();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!get_tcp_nodelay(&listener).unwrap());
        no_delay_on_listener(ours, port).unwrap();
        assert!(get_tcp_nodelay(&listener).unwrap());
        assert!(!get_tcp_nodelay(&other).unwrap(), "only the port asked for");
        // What the handshake needs: the accepted connection inherits it.
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(get_tcp_nodelay(&accepted).unwrap());
        // A port nothing listens on (the client's own, connected) is an error.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = no_delay_on_listener(ours, free).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    }

    #[test]
    fn the_pause_target_starts_tight_and_rises_to_the_limit_only_while_not_converging() {
        let mut t = DowntimeTarget::new(50);
        assert_eq!(t.now_ms, 10);
        // Converging (QEMU expects less than the target): never raised.
        assert_eq!(t.raise(5, 8), None);
        // Not converging: raised every two rounds, doubling, up to the limit.
        assert_eq!(t.raise(2, 30), None, "round 1 was the bulk copy");
        assert_eq!(t.raise(3, 30), Some(20));
        assert_eq!(t.raise(4, 30), None);
        assert_eq!(t.raise(5, 30), Some(40));
        assert_eq!(t.raise(7, 90), Some(50));
        assert_eq!(t.raise(20, 90), None, "never past the limit");
        // Small limits keep a target of at least 1 ms and at most the limit.
        assert_eq!(DowntimeTarget::new(3).now_ms, 1);
        assert_eq!(DowntimeTarget::new(1).now_ms, 1);
    }
}
