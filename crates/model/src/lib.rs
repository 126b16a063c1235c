//! drove's domain model: pure types and state machines, no I/O.
//!
//! Everything the manager stores and the API exposes is defined here: typed
//! identifiers ([`id`]), sizes ([`units`]), hosts ([`host`]), guests and their
//! lifecycle ([`guest`]), VLANs ([`vlan`]) and long-running operations
//! ([`operation`]). State machines live next to their types, each with a
//! diagram, an enum of events and one function that decides transitions.

pub mod guest;
pub mod host;
pub mod id;
pub mod image;
pub mod load;
pub mod migration;
pub mod operation;
pub mod snapshot;
pub mod units;
pub mod vlan;

pub use guest::{
    CloneMode, CloneSource, DiskFormat, DiskSpec, Guest, GuestEvent, GuestSpec, GuestState, InvalidGuestTransition,
    NicSpec, PendingSpec, PowerIntent, Priority, ResourceLimits, RestartPolicy,
};
pub use host::{HostInfo, HostState, HypervisorKind, Lease};
pub use id::{GuestId, HostId, OperationId, SnapshotId, TypedId};
pub use load::{LoadSample, LoadSlot, MeasuredLoad};
pub use operation::{Operation, OperationKind, OperationState};
pub use snapshot::{RestoreOutcome, Snapshot, SnapshotKind, SnapshotState};
pub use units::ByteSize;
pub use uuid;
pub use vlan::{NicAddress, Vlan, VlanTag};
