//! Live migration types, shared with the manager and the API: see
//! [`drove_model::migration`] for the protocol.

pub use drove_model::migration::{
    DiskTransfer, Incoming, IncomingDone, MigrationKey, MigrationProgress, MigrationStats, Outgoing, TransferPhase,
};
