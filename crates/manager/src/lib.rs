//! The manager: owner of the data centre's desired state.
//!
//! Everything it knows lives in the [`drove_store::Store`]; an in-memory
//! [`inventory::Inventory`] mirrors it for fast reads and decisions. A
//! mutation takes the inventory lock, validates, changes memory, and hands
//! the matching store writes to the [`persist::Persister`] *while still
//! holding the lock*, so store writes land in the same order as memory
//! changes; the caller is answered only once its writes are durable. The
//! persister merges queued writes into one store transaction (group commit),
//! which is what makes thousands of durable creations per second possible.
//!
//! Agents pull their desired state with each heartbeat and push what they
//! observe; [`core`] turns observations into guest and operation
//! transitions. [`snapshots`] takes, deletes and restores guests' snapshots
//! through relayed calls, finishing or undoing them from what the host
//! has. [`migrate`] live-migrates guests between hosts as a durable
//! operation with one commit point; [`drain`] empties a host that way.
//! [`monitor`] marks silent hosts down,
//! times out stuck operations and resumes undriven snapshot operations and
//! migrations. [`load`] learns each guest's daily load profile from what
//! its host measures. [`http`] serves the `/v1` API.

pub mod auth;
pub mod changes;
pub mod clones;
pub mod core;
pub mod dpm;
pub mod drain;
pub mod drs;
pub mod failover;
pub mod http;
pub mod inventory;
pub mod load;
pub mod migrate;
pub mod monitor;
pub mod persist;
pub mod power;
pub mod snapshots;
pub mod storage;

pub use core::{Manager, ManagerConfig};
pub use http::{ApiDoc, router};

use std::net::SocketAddr;
use std::sync::Arc;

/// Run the manager's HTTP server and background tasks until `shutdown`
/// resolves.
pub async fn serve(
    manager: Arc<Manager>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Aborted on drop, so a cancelled `serve` leaves no task holding the
    // manager (and its store) alive.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _monitor = AbortOnDrop(tokio::spawn(monitor::run(manager.clone())));
    let _drs = AbortOnDrop(tokio::spawn(drs::run(manager.clone())));
    let _dpm = AbortOnDrop(tokio::spawn(dpm::run(manager.clone())));
    // Snapshot drivers end with the server too (a restarted manager
    // resumes their operations from the store).
    struct AbortBackground(Arc<Manager>);
    impl Drop for AbortBackground {
        fn drop(&mut self) {
            self.0.abort_background();
        }
    }
    let _drivers = AbortBackground(manager.clone());
    let app = router(manager).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// RFC 3339 timestamp of now, to the millisecond.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
