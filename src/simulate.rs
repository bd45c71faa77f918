//! `archiver simulate`: realistic fake data for development and demos.

use tokio_util::sync::CancellationToken;

use crate::cli::SimulateArgs;
use crate::config::Config;

/// Seeds (and in live mode keeps delivering) orders.
pub async fn run(_config: &Config, _args: &SimulateArgs, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
