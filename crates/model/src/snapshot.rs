//! Snapshots of a guest and the tree they form.
//!
//! A snapshot is a named point-in-time state of all of a guest's disks,
//! optionally with its memory ([`SnapshotKind`]). The manager keeps each
//! guest's snapshots in its record, as a tree: a snapshot's parent is the
//! snapshot the guest's state descended from when it was taken (the last
//! one taken or restored: [`crate::Guest::current_snapshot`]).
//!
//! A snapshot record has a lifecycle of its own, so that an operation
//! interrupted by a crash can be finished or undone from what is stored:
//!
//! ```text
//!   (none) ── take ──► Creating ── taken ──► Ready ── delete ──► Deleting ── deleted ──► (none)
//!                         │                   │ ▲
//!                         └── failed ──► (none)│ └── restored / failed ── Restoring ◄── restore
//! ```
//!
//! [`SnapshotState::apply`] decides the transitions.

use serde::{Deserialize, Serialize};

use crate::{ByteSize, SnapshotId};

/// The prefix of the transient snapshots a host takes of a running guest to
/// clone it from one instant: never listed, never a user's snapshot name.
pub const CLONE_SNAPSHOT_PREFIX: &str = "drove-clone-";

/// What a snapshot holds besides the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// All disks at one instant, crash-consistent; the guest is not paused.
    /// A restore of a running guest reboots it from those disks.
    Disk,
    /// The disks plus memory and device state: a restore resumes the guest
    /// exactly where it was. Needs a running guest.
    Memory,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Disk => "disk",
            SnapshotKind::Memory => "memory",
        }
    }
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a restore brought the guest back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestoreOutcome {
    /// A memory snapshot loaded into the running guest: it carries on
    /// exactly where it was (same process).
    Live,
    /// A disk snapshot of a running guest: stopped, disks rolled back,
    /// started again.
    Restarted,
    /// A guest that was not running: its disks were rolled back and it
    /// stays stopped (a memory snapshot's memory state is not used).
    DisksOnly,
}

impl RestoreOutcome {
    /// One line for people.
    pub fn describe(self) -> &'static str {
        match self {
            RestoreOutcome::Live => "memory and disks restored live; the guest resumed where it was",
            RestoreOutcome::Restarted => "guest stopped, disks rolled back, guest started again",
            RestoreOutcome::DisksOnly => "disks rolled back; the guest was not running and stays stopped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    /// Being taken: it may or may not exist on the host yet.
    Creating,
    Ready,
    /// Being restored (it stays afterwards).
    Restoring,
    /// Being deleted: it may or may not still exist on the host.
    Deleting,
}

impl std::fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
            SnapshotState::Restoring => "restoring",
            SnapshotState::Deleting => "deleting",
        })
    }
}

/// What can happen to a snapshot record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotEvent {
    /// The host has it.
    Taken,
    Restore,
    /// A restore ended (done or failed); the snapshot is unchanged.
    RestoreEnded,
    Delete,
    /// A delete failed; the snapshot is still there.
    DeleteFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {state} snapshot cannot take event {event:?}")]
pub struct InvalidSnapshotTransition {
    pub state: SnapshotState,
    pub event: SnapshotEvent,
}

impl SnapshotState {
    /// The one function that decides snapshot transitions (the record's
    /// removal, after `Creating` fails or `Deleting` succeeds, is not a
    /// state).
    pub fn apply(self, event: SnapshotEvent) -> Result<SnapshotState, InvalidSnapshotTransition> {
        use SnapshotEvent as E;
        use SnapshotState as S;
        match (self, event) {
            (S::Creating, E::Taken) => Ok(S::Ready),
            (S::Ready, E::Restore) => Ok(S::Restoring),
            (S::Restoring, E::RestoreEnded) => Ok(S::Ready),
            (S::Ready, E::Delete) => Ok(S::Deleting),
            (S::Deleting, E::DeleteFailed) => Ok(S::Ready),
            (S::Creating | S::Ready | S::Restoring | S::Deleting, _) => {
                Err(InvalidSnapshotTransition { state: self, event })
            }
        }
    }

    pub fn is_settled(self) -> bool {
        self == SnapshotState::Ready
    }
}

/// A snapshot as the manager records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Snapshot {
    pub id: SnapshotId,
    /// Unique among the guest's snapshots.
    pub name: String,
    pub kind: SnapshotKind,
    pub state: SnapshotState,
    /// The snapshot the guest's state descended from when this one was
    /// taken; `None` at the root.
    pub parent: Option<String>,
    /// RFC 3339, as the manager recorded the request.
    pub created_at: String,
    /// Size of the saved memory and device state (zero for disk snapshots;
    /// unknown until taken).
    pub vm_state_size: Option<ByteSize>,
}

/// The names of `name`'s children in `snapshots`.
pub fn children<'a>(snapshots: &'a [Snapshot], name: &str) -> Vec<&'a str> {
    snapshots.iter().filter(|s| s.parent.as_deref() == Some(name)).map(|s| s.name.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_diagram() {
        use SnapshotEvent as E;
        use SnapshotState as S;
        assert_eq!(S::Creating.apply(E::Taken), Ok(S::Ready));
        assert_eq!(S::Ready.apply(E::Restore).and_then(|s| s.apply(E::RestoreEnded)), Ok(S::Ready));
        assert_eq!(S::Ready.apply(E::Delete).and_then(|s| s.apply(E::DeleteFailed)), Ok(S::Ready));
        assert!(S::Creating.apply(E::Delete).is_err());
        assert!(S::Deleting.apply(E::Restore).is_err());
        assert!(S::Restoring.apply(E::Delete).is_err());
        assert!(!S::Creating.is_settled() && S::Ready.is_settled());
    }
}
