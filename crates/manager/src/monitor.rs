//! The liveness and timeout reconciler: marks silent hosts down and fails
//! (rolling back) operations that overran, and resumes snapshot operations,
//! storage moves and pending hardware/limits changes nobody drives (after a
//! restart or a lost answer). Each pass is idempotent.

use std::sync::Arc;

use crate::core::Manager;

pub async fn run(m: Arc<Manager>) {
    // Fine enough that a failover starts within a quarter second of its
    // host's lease and margin running out.
    let period =
        (m.config.host_timeout / 8).clamp(std::time::Duration::from_millis(50), std::time::Duration::from_millis(250));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = m.monitor_pass().await {
            tracing::error!(error = %e, "monitor pass failed");
        }
        m.resume_snapshot_ops();
        m.resume_storage_moves();
        m.resume_migrations();
        m.resume_drains();
        m.resume_pending_changes();
    }
}
