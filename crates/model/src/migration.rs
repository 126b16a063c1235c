//! Live migration: the manager's record of one on its guest (a durable
//! multi-step operation with undo) and the messages the manager and the
//! two hosts' agents and hypervisors exchange to carry it out.
//!
//! The record's phases, as the manager drives them:
//!
//! ```text
//!             prepared            sent              finished (commit: the guest's
//!  Preparing ─────────► Sending ───────► Finishing ──────────► Cleaning   host is the
//!      │                  │                  │                  │          target now)
//!      │ failed/cancel    │ failed/cancel    │ failed           │ cleaned
//!      ▼                  ▼                  ▼                  ▼
//!  RollingBack ◄──────────┴──────────────────┘                done
//!      │ rolled back
//!      ▼
//!    done (the guest runs on its source)
//! ```
//!
//! Only `finished` moves the guest: the target reported it running there.
//! Before that, the source's copy is the guest; after it, the target's is,
//! and the source's is only ever removed. A `sent` whose answer was lost is
//! reconciled by asking both hosts (see the manager's `migrate` module).
//!
//! The transfer itself:
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

use crate::{HostId, OperationId};

/// A TLS pre-shared key for one migration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskTransfer {
    /// Both hosts see the same disk files.
    Shared,
    /// Copied to the target during the migration (block mirror over NBD).
    Mirror,
}

impl DiskTransfer {
    /// How the disks of a guest on `storage` travel.
    pub fn for_storage(storage: crate::guest::Storage) -> Self {
        match storage {
            crate::guest::Storage::Local => DiskTransfer::Mirror,
            crate::guest::Storage::Shared => DiskTransfer::Shared,
        }
    }
}

/// What the target prepares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Incoming {
    /// The target's migration address, where it listens.
    #[schema(value_type = String)]
    pub listen: IpAddr,
    /// The port of the migration stream.
    pub port: u16,
    /// The port of the NBD server for mirrored disks.
    pub nbd_port: u16,
    pub disks: DiskTransfer,
    pub key: Option<MigrationKey>,
}

/// What the source sends, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Outgoing {
    #[schema(value_type = String)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferPhase {
    /// Disks are being copied to the target.
    Disks,
    /// Memory is being copied; the guest runs.
    Memory,
    /// The guest is paused for the last round.
    Switchover,
    Done,
}

/// Progress of an outgoing migration, as QEMU reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationProgress {
    pub phase: TransferPhase,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The guest's last console output before that pause (Unix time,
    /// microseconds), when it wrote to its console steadily: the start of
    /// the pause as the guest's own output shows it.
    #[serde(default)]
    pub console_last_us: Option<u64>,
    /// How often it wrote before the pause (the median interval,
    /// microseconds): the resolution of a pause measured from its output.
    #[serde(default)]
    pub console_interval_us: Option<u64>,
    /// With such a guest: the longest silence of its console while it ran
    /// here during the migration, before the pause (a stall while it was
    /// copied), microseconds.
    #[serde(default)]
    pub console_copy_gap_us: Option<u64>,
}

/// The target's side, once the guest runs there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IncomingDone {
    /// When the guest resumed on the target (Unix time, microseconds).
    pub resumed_at_us: Option<u64>,
    /// The guest's first console output here (Unix time, microseconds),
    /// when the target was asked to wait for it.
    #[serde(default)]
    pub console_first_us: Option<u64>,
}

/// Where a migration is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    Preparing,
    Sending,
    Finishing,
    Cleaning,
    RollingBack,
}

/// What happens to a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationEvent {
    /// The target waits for the stream.
    Prepared,
    /// The source sent everything.
    Sent,
    /// The target runs the guest (the commit).
    Finished,
    /// The source's copy is gone.
    Cleaned,
    /// A step failed, or the operator cancelled, before the commit.
    Abort,
    /// The target's copy is gone and the source runs the guest.
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a migration that is {state:?} cannot take {event:?}")]
pub struct MigrationTransitionError {
    pub state: MigrationState,
    pub event: MigrationEvent,
}

impl MigrationState {
    pub const ALL: [MigrationState; 5] = [
        MigrationState::Preparing,
        MigrationState::Sending,
        MigrationState::Finishing,
        MigrationState::Cleaning,
        MigrationState::RollingBack,
    ];

    /// The next state; `Ok(None)` when the migration is over.
    pub fn apply(self, event: MigrationEvent) -> Result<Option<MigrationState>, MigrationTransitionError> {
        use MigrationEvent as E;
        use MigrationState as S;
        match (self, event) {
            (S::Preparing, E::Prepared) => Ok(Some(S::Sending)),
            (S::Sending, E::Sent) => Ok(Some(S::Finishing)),
            (S::Finishing, E::Finished) => Ok(Some(S::Cleaning)),
            (S::Cleaning, E::Cleaned) => Ok(None),
            (S::Preparing | S::Sending | S::Finishing, E::Abort) => Ok(Some(S::RollingBack)),
            (S::RollingBack, E::RolledBack) => Ok(None),
            (state, event) => Err(MigrationTransitionError { state, event }),
        }
    }

    /// Whether the guest belongs to the target now.
    pub fn committed(self) -> bool {
        self == MigrationState::Cleaning
    }
}

/// A migration in progress, recorded on its guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Migration {
    pub op: OperationId,
    pub source: HostId,
    pub target: HostId,
    pub state: MigrationState,
    /// Where the target listens, once it is prepared.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub listen: Option<IpAddr>,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub nbd_port: u16,
    pub downtime_limit_ms: u64,
    /// Bytes per second, 0: unlimited.
    pub max_bandwidth: u64,
    pub started_at: String,
    /// Why it is rolling back.
    #[serde(default)]
    pub error: Option<String>,
    /// What the source reported once it sent everything.
    #[serde(default)]
    pub stats: Option<MigrationStats>,
}

/// How the last migration of a guest went, kept on the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationResult {
    pub from: String,
    pub to: String,
    /// The guest's pause as seen from outside it: from the source pausing
    /// it to the target resuming it (host clocks).
    pub downtime_ms: Option<f64>,
    /// The pause as the source's QEMU measured it.
    pub qemu_downtime_ms: u64,
    /// The longest silence of the guest's console over the whole
    /// migration: the larger of `console_pause_gap_ms` and any stall while
    /// it was copied. Measured only for a guest that writes to its console
    /// steadily (the test image's ticker does).
    #[serde(default)]
    pub console_gap_ms: Option<f64>,
    /// The pause as the guest's own output shows it: the silence from its
    /// last output on the source to its first on the target (host clocks).
    #[serde(default)]
    pub console_pause_gap_ms: Option<f64>,
    /// How often that guest wrote to its console before the pause, ms: the
    /// resolution of `console_gap_ms`.
    #[serde(default)]
    pub console_interval_ms: Option<f64>,
    pub total_ms: u64,
    pub transferred: u64,
    pub finished_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_finish_commits_and_nothing_after_it_rolls_back() {
        use MigrationEvent as E;
        use MigrationState as S;
        assert_eq!(S::Preparing.apply(E::Prepared), Ok(Some(S::Sending)));
        assert_eq!(S::Finishing.apply(E::Finished), Ok(Some(S::Cleaning)));
        assert!(S::Cleaning.committed() && !S::Finishing.committed());
        assert!(S::Cleaning.apply(E::Abort).is_err(), "after the commit there is no way back");
        assert!(S::RollingBack.apply(E::Finished).is_err());
        assert_eq!(S::RollingBack.apply(E::RolledBack), Ok(None));
        // Every state has a way out.
        for s in S::ALL {
            let ends = [E::Prepared, E::Sent, E::Finished, E::Cleaned, E::Abort, E::RolledBack]
                .iter()
                .any(|e| s.apply(*e).is_ok());
            assert!(ends, "{s:?} is a dead end");
        }
    }
}
