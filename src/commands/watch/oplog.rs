//! The oplog headroom watch: how much longer this process could stop before its saved position
//! leaves the source oplog. The window is read at start and every minute into the telemetry,
//! which computes the headroom from the saved position; a warning is logged each time the
//! headroom falls below the threshold. A user who may not read `local.oplog.rs` is told once,
//! and the gauges stay absent: the archive itself does not depend on it.

use std::sync::Arc;
use std::time::Duration;

use mongodb::Client;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::oplog::{read_window, OplogError};
use crate::redact::scrub;
use crate::telemetry::Telemetry;

/// How often the window is read: the oplog's first entry moves slowly, and each reading is two
/// small queries.
const READ_EVERY: Duration = Duration::from_secs(60);

/// Longest wait for one reading of the window.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the headroom is compared with the threshold: a new saved position, or the first
/// one after a start, is noticed within this time without reading the oplog again.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Reads the oplog window of `source` and watches the headroom until `stop`, or until the
/// window turns out to be unreadable.
pub(super) async fn monitor(source: Client, telemetry: Arc<Telemetry>, warn_below: Duration, stop: CancellationToken) {
    let warn_below_secs = warn_below.as_secs_f64();
    let mut next_read = Instant::now();
    let mut read_failing = false;
    let mut below = false;
    loop {
        if Instant::now() >= next_read {
            next_read = Instant::now() + READ_EVERY;
            // Bounded, and dropped at shutdown: a silent network must not hold this task.
            let reading = tokio::select! {
                reading = tokio::time::timeout(READ_TIMEOUT, read_window(&source)) => reading,
                _ = stop.cancelled() => return,
            };
            let failure = match reading {
                Ok(Ok(Some(window))) => {
                    read_failing = false;
                    telemetry.oplog_window_read(&window);
                    None
                }
                Ok(Ok(None)) => {
                    telemetry.oplog_window_unknown();
                    tracing::warn!("the source has no oplog to read: oplog metrics disabled");
                    return;
                }
                Ok(Err(OplogError::Refused { reason, .. })) => {
                    telemetry.oplog_window_unknown();
                    tracing::warn!(reason = %reason, "cannot read the oplog window: oplog metrics disabled");
                    return;
                }
                Ok(Err(OplogError::Transient(e))) => Some(scrub(&e.to_string())),
                Err(_) => Some(format!("no answer within {} s", READ_TIMEOUT.as_secs())),
            };
            if let Some(error) = failure {
                // The stream meets the same outage and says so; one line per outage here.
                if !read_failing {
                    tracing::info!(error = %error, "cannot read the oplog window for now; trying again in a minute");
                }
                read_failing = true;
            }
        }
        if let Some(headroom) = telemetry.oplog_headroom_seconds() {
            let was_below = below;
            below = headroom < warn_below_secs;
            if below && !was_below {
                tracing::warn!(
                    headroom_secs = headroom.round() as i64,
                    threshold_secs = warn_below.as_secs(),
                    "OPLOG HEADROOM LOW: a stop longer than the headroom would take the saved position out of \
                     the source oplog (lost history, then a gap-fill); enlarge the oplog or keep watch running"
                );
            } else if was_below && !below {
                tracing::info!(
                    headroom_secs = headroom.round() as i64,
                    threshold_secs = warn_below.as_secs(),
                    "oplog headroom back above the threshold"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}
