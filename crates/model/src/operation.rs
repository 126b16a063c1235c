//! Long-running operations: an id the caller can poll, progress, and a final
//! result that survives manager restarts.
//!
//! ```text
//!   Running ──── succeed ────► Succeeded
//!      │
//!      ├──── fail (nothing to undo) ─────────────► Failed
//!      │
//!      └──── fail ──► RollingBack ── rolled_back ──► Failed
//! ```

use serde::{Deserialize, Serialize};

use crate::OperationId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    CreateGuest,
    StartGuest,
    StopGuest,
    DeleteGuest,
    CreateSnapshot,
    DeleteSnapshot,
    RestoreSnapshot,
    MigrateGuest,
    /// Live-migrate every guest off a host (the target is the host's id).
    DrainHost,
    /// Move a guest's disks to another pool (live while it runs).
    MoveStorage,
}

impl OperationKind {
    /// Snapshot operations are driven by the manager itself (relayed calls
    /// with reconciliation), not by agent reports.
    pub fn is_snapshot(self) -> bool {
        matches!(self, OperationKind::CreateSnapshot | OperationKind::DeleteSnapshot | OperationKind::RestoreSnapshot)
    }

    /// Operations a manager task drives to the end itself (finishing or
    /// undoing them whatever it takes), rather than agents' reports: no
    /// timeout may cut them short.
    pub fn is_driven(self) -> bool {
        self.is_snapshot()
            || matches!(self, OperationKind::MigrateGuest | OperationKind::DrainHost | OperationKind::MoveStorage)
    }
}

impl std::fmt::Display for OperationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OperationKind::CreateGuest => "create-guest",
            OperationKind::StartGuest => "start-guest",
            OperationKind::StopGuest => "stop-guest",
            OperationKind::DeleteGuest => "delete-guest",
            OperationKind::CreateSnapshot => "create-snapshot",
            OperationKind::DeleteSnapshot => "delete-snapshot",
            OperationKind::RestoreSnapshot => "restore-snapshot",
            OperationKind::MigrateGuest => "migrate",
            OperationKind::DrainHost => "drain",
            OperationKind::MoveStorage => "move-storage",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    RollingBack,
    Succeeded,
    Failed,
}

impl OperationState {
    pub fn is_final(self) -> bool {
        matches!(self, OperationState::Succeeded | OperationState::Failed)
    }
}

impl std::fmt::Display for OperationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OperationState::Running => "running",
            OperationState::RollingBack => "rolling_back",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationEvent {
    Succeed,
    /// Failed; `undo` says whether there is work to roll back.
    Fail {
        undo: bool,
    },
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {state} operation cannot take event {event:?}")]
pub struct InvalidOperationTransition {
    pub state: OperationState,
    pub event: OperationEvent,
}

impl OperationState {
    pub fn apply(self, event: OperationEvent) -> Result<OperationState, InvalidOperationTransition> {
        use OperationEvent as E;
        use OperationState as S;
        match (self, event) {
            (S::Running, E::Succeed) => Ok(S::Succeeded),
            (S::Running, E::Fail { undo: false }) => Ok(S::Failed),
            (S::Running, E::Fail { undo: true }) => Ok(S::RollingBack),
            (S::RollingBack, E::RolledBack) => Ok(S::Failed),
            (S::Running | S::RollingBack | S::Succeeded | S::Failed, _) => {
                Err(InvalidOperationTransition { state: self, event })
            }
        }
    }
}

/// A long-running operation as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operation {
    pub id: OperationId,
    pub kind: OperationKind,
    /// The object it acts on (a guest id for guest operations).
    pub target: uuid::Uuid,
    /// The target's name, for people.
    pub target_name: String,
    pub state: OperationState,
    /// The step in progress or last completed, for people.
    pub step: String,
    /// 0..=100.
    pub progress: u8,
    /// Failure reason, once failed.
    pub error: Option<String>,
    /// Who asked for it.
    pub principal: String,
    pub created_at: String,
    pub finished_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn event() -> impl Strategy<Value = OperationEvent> {
        prop::sample::select(vec![
            OperationEvent::Succeed,
            OperationEvent::Fail { undo: false },
            OperationEvent::Fail { undo: true },
            OperationEvent::RolledBack,
        ])
    }

    proptest! {
        /// Final states are absorbing and reached at most once.
        #[test]
        fn final_states_are_absorbing(events in prop::collection::vec(event(), 0..16)) {
            let mut s = OperationState::Running;
            let mut finals = 0;
            for e in events {
                if let Ok(next) = s.apply(e) {
                    prop_assert!(!s.is_final());
                    if next.is_final() { finals += 1; }
                    s = next;
                }
            }
            prop_assert!(finals <= 1);
        }
    }
}
