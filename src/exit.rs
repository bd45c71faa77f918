//! Exit codes, the contract with service managers and cron scripts (also in `--help`).

use std::process::ExitCode;

use crate::checkpoint::CheckpointError;
use crate::db::ConnectError;
use crate::watch::WatchError;

/// Success, or stopped on request after saving the position.
pub const OK: u8 = 0;
/// Any failure not listed below.
pub const FAILURE: u8 = 1;
/// Usage or configuration error: nothing was done.
pub const USAGE: u8 = 2;
/// The resume token file is corrupt, unreadable or unwritable.
pub const CHECKPOINT: u8 = 3;
/// The change stream was invalidated (collection dropped or renamed).
pub const INVALIDATED: u8 = 4;
/// Another instance holds the token file.
pub const LOCKED: u8 = 5;
/// Killed by a second interrupt before the in-flight batch finished.
pub const INTERRUPTED: u8 = 130;

/// The exit code for a `watch` error.
pub fn for_watch_error(err: &WatchError) -> ExitCode {
    ExitCode::from(match err {
        WatchError::Checkpoint(_) => CHECKPOINT,
        WatchError::Connect(ConnectError::InvalidUri { .. }) => USAGE,
        WatchError::Locked(_) => LOCKED,
        WatchError::Usage(_) => USAGE,
        WatchError::Invalidated { .. } => INVALIDATED,
        _ => FAILURE,
    })
}

/// Whether a checkpoint error is about the file rather than the disk.
pub fn is_corrupt(err: &CheckpointError) -> bool {
    matches!(err, CheckpointError::Corrupt { .. } | CheckpointError::WrongNamespace { .. })
}

/// A usage error detected after parsing (a bad date, an impossible option combination): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error of `batch` or `simulate`: 2 for usage and configuration errors
/// anywhere in the chain, 1 otherwise.
pub fn for_error(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.is::<UsageError>()
            || cause.is::<crate::config::ConfigError>()
            || matches!(cause.downcast_ref::<ConnectError>(), Some(ConnectError::InvalidUri { .. }))
        {
            return USAGE;
        }
    }
    FAILURE
}
