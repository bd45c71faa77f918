//! Keeping leadership: the lease is renewed while this process writes, and leadership ends
//! (a cancellation token the writer obeys) before another process may take over.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Lease;
use crate::db::timed_out;
use crate::redact::scrub;

/// Renews the lease every `heartbeat`; cancels `leadership` as soon as the lease is lost or
/// cannot be renewed for most of its time to live, so this process stops writing before another
/// one may take over. Returns the lease and whether it was lost.
pub async fn keep(mut lease: Lease, heartbeat: Duration, leadership: CancellationToken) -> (Lease, bool) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(heartbeat) => {}
            _ = leadership.cancelled() => return (lease, false),
        }
        // A renewal must answer before the lease stops being surely ours; waiting longer would
        // let this process write while a standby may already have taken over.
        let fresh_for = lease.fresh_for(0.6);
        let renewed = tokio::time::timeout(fresh_for, lease.renew())
            .await
            .unwrap_or_else(|_| Err(timed_out("renewing the lease", fresh_for)));
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(epoch = lease.epoch(), "the lease was taken over");
                leadership.cancel();
                return (lease, true);
            }
            Err(e) if lease.is_fresh(0.6) => {
                tracing::warn!(error = %scrub(&e.to_string()), "could not renew the lease; retrying");
            }
            Err(e) => {
                tracing::warn!(error = %scrub(&e.to_string()),
                    "could not renew the lease in time; stepping down before it expires");
                leadership.cancel();
                return (lease, true);
            }
        }
    }
}
