//! Errors shared by every layer. Each layer has its own `thiserror` enum next to its code
//! ([`crate::db::ConnectError`], [`crate::checkpoint::StoreError`],
//! [`crate::commands::watch::WatchError`]); what lives here belongs to none of them.

/// A usage error detected after parsing (a bad date, an impossible option combination): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
