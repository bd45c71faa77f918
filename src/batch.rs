//! `archiver batch`: archives the delivered orders of a date range.

use tokio_util::sync::CancellationToken;

use crate::cli::BatchArgs;
use crate::config::Config;

/// Archives the range.
pub async fn run(_config: &Config, _args: &BatchArgs, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
