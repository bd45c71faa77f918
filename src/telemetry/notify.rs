//! systemd notifications: READY, STOPPING, and the watchdog that pings only while the pipeline
//! makes progress.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Telemetry;

/// What is told to the service manager.
#[derive(Debug, Clone, Copy)]
pub(super) enum Notice<'a> {
    Ready,
    Status(&'a str),
    Stopping,
    Watchdog,
    /// The start (or stop) may take this many more microseconds from now.
    ExtendTimeout(u32),
}

/// Tells systemd (through `NOTIFY_SOCKET`; outside systemd, nothing happens).
#[cfg(unix)]
pub(super) fn send(notices: &[Notice<'_>]) {
    use sd_notify::NotifyState;
    let states: Vec<NotifyState<'_>> = notices
        .iter()
        .map(|n| match *n {
            Notice::Ready => NotifyState::Ready,
            Notice::Status(s) => NotifyState::Status(s),
            Notice::Stopping => NotifyState::Stopping,
            Notice::Watchdog => NotifyState::Watchdog,
            Notice::ExtendTimeout(usec) => NotifyState::ExtendTimeoutUsec(usec),
        })
        .collect();
    if let Err(e) = sd_notify::notify(&states) {
        tracing::debug!(error = %e, "systemd notification failed");
    }
}

/// No systemd off Unix (Windows services run under NSSM, which watches the process itself).
#[cfg(not(unix))]
pub(super) fn send(_notices: &[Notice<'_>]) {}

/// The systemd watchdog interval, when systemd asked for pings.
#[cfg(unix)]
fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

#[cfg(not(unix))]
fn watchdog_interval() -> Option<Duration> {
    None
}

/// Pings the systemd watchdog at half its interval while the pipeline makes progress: a
/// responsive runtime whose pipeline is stuck on pending work is not alive, and systemd should
/// restart it (the token never passed unarchived work, so a restart loses nothing).
pub fn spawn_watchdog(telemetry: Arc<Telemetry>, shutdown: CancellationToken) {
    let Some(interval) = watchdog_interval() else { return };
    tracing::info!(interval_ms = interval.as_millis() as u64, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(100)));
        let mut warned = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            match telemetry.stalled_for() {
                None => {
                    warned = false;
                    send(&[Notice::Watchdog]);
                }
                Some(quiet) if !warned => {
                    warned = true;
                    tracing::error!(
                        no_progress_ms = quiet.as_millis() as u64,
                        "the pipeline made no progress on pending work; no longer pinging the watchdog"
                    );
                }
                Some(_) => {}
            }
        }
    });
}
