//! Live migration between two hosts' hypervisors: the types both ends and
//! the manager's driver share.
//!
//! ```text
//!   target  migrate_incoming(config, Incoming)  guest defined, disks made, NICs
//!                                              ready; QEMU waits for the stream
//!                                              (and serves its disks over NBD
//!                                              when they are mirrored)
//!   source  migrate_out(id, Outgoing)           disks mirrored to the target, RAM
//!                                              copied; the source pauses for the
//!                                              last round and stays paused
//!   target  migrate_finish(id)                  the guest runs here; NBD stopped
//!   source  destroy(id)                         the old copy is gone
//!
//!   undo, while the target never ran: target destroy(id), source
//!   migrate_cancel(id): the guest runs on (or again) on the source.
//! ```
//!
//! The stream (and the NBD disk mirror) is encrypted with TLS using a
//! pre-shared key the manager mints for each migration and hands to both
//! agents over their authenticated channel.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A TLS pre-shared key for one migration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationKey {
    pub identity: String,
    /// The key, hex.
    pub key_hex: String,
}

impl std::fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationKey").field("identity", &self.identity).field("key_hex", &"<redacted>").finish()
    }
}

/// How the guest's disks reach the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskTransfer {
    /// Both hosts see the same disk files.
    Shared,
    /// Copied to the target during the migration (block mirror over NBD).
    Mirror,
}

/// What the target prepares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The target's migration address, where it listens.
    pub listen: IpAddr,
    /// The port of the migration stream.
    pub port: u16,
    /// The port of the NBD server for mirrored disks.
    pub nbd_port: u16,
    pub disks: DiskTransfer,
    pub key: Option<MigrationKey>,
}

/// What the source sends, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    pub target: IpAddr,
    pub port: u16,
    pub nbd_port: u16,
    pub disks: DiskTransfer,
    pub key: Option<MigrationKey>,
    /// The longest pause QEMU aims for in the final round.
    pub downtime_limit_ms: u64,
    /// Bandwidth cap of the stream, bytes per second (0: unlimited).
    pub max_bandwidth: u64,
}

/// Where a running migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Disks are being copied to the target.
    Disks,
    /// Memory is being copied; the guest runs.
    Memory,
    /// The guest is paused for the last round.
    Switchover,
    Done,
}

/// Progress of an outgoing migration, as QEMU reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub phase: MigrationPhase,
    /// Bytes sent so far (disks and memory).
    pub transferred: u64,
    /// Bytes still to send, as of now.
    pub remaining: u64,
    /// Memory the guest dirties, bytes per second.
    pub dirty_rate: u64,
    /// QEMU's estimate of the final pause, milliseconds.
    pub expected_downtime_ms: u64,
}

/// How an outgoing migration went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// From the start of the disk copy to completion, milliseconds.
    pub total_ms: u64,
    /// The pause as the source's QEMU measured it, milliseconds.
    pub qemu_downtime_ms: u64,
    pub transferred: u64,
    /// When the source paused the guest for the last round (Unix time,
    /// microseconds, host clock): with the target's resume time, the
    /// downtime as seen from outside the guest.
    pub stopped_at_us: Option<u64>,
}

/// The target's side, once the guest runs there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingDone {
    /// When the guest resumed on the target (Unix time, microseconds).
    pub resumed_at_us: Option<u64>,
}
