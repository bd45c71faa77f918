//! The application: dispatches a parsed command line to its command, handles the signals, and
//! maps every outcome to an exit code, the contract with service managers and cron scripts
//! (also in `--help`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::checkpoint::StoreError;
use crate::cli::{Cli, Command, ConfigCommand};
use crate::commands::config as config_check;
use crate::commands::health::Verdict;
use crate::commands::watch::{self, StartPosition, WatchError, WatchOptions};
use crate::commands::{batch, health, purge, simulate, verify};
use crate::config::{Config, ConfigError};
use crate::db::{cause_in_one_line, ConnectError};
use crate::error::UsageError;
use crate::pipeline::scan::DateRange;
use crate::pipeline::sink::OpenError;
use crate::redact::scrub;
use crate::telemetry::{self};

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
/// `purge` finished, but kept some orders: changed since archived, or missing from the archive.
pub const KEPT: u8 = 6;
/// Killed by a second interrupt before the in-flight batch finished.
pub const INTERRUPTED: u8 = 130;

/// The exit code for a `watch` error.
pub fn for_watch_error(err: &WatchError) -> ExitCode {
    ExitCode::from(match err {
        WatchError::Checkpoint(StoreError::Locked(_)) => LOCKED,
        // The shared store's database refused (not a file a person must fix), a newer leader
        // took over, or the archive table failed: a failure like any other.
        WatchError::Checkpoint(StoreError::Database { .. } | StoreError::Fenced(_) | StoreError::Table { .. }) => {
            FAILURE
        }
        WatchError::Checkpoint(_) => CHECKPOINT,
        WatchError::Connect(ConnectError::InvalidUri { .. }) => USAGE,
        WatchError::Usage(_) => USAGE,
        WatchError::Invalidated { .. } => INVALIDATED,
        _ => FAILURE,
    })
}

/// An error and its causes in one line for a person, scrubbed of credentials: each cause is
/// added unless the message already says it, and a driver error is told by its cause (what the
/// server or the network said), not by the driver's description of the whole topology.
pub fn describe<'a>(chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut message = String::new();
    for error in chain {
        let text = match error.downcast_ref::<mongodb::error::Error>() {
            Some(driver) => cause_in_one_line(driver),
            None => error.to_string(),
        };
        let text = text.lines().next().unwrap_or_default().trim();
        if text.is_empty() || message.to_lowercase().contains(&text.to_lowercase()) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(text);
    }
    scrub(&message)
}

/// The chain of `error`: itself, then its sources.
fn chain_of<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// The exit code for an error of `batch` or `simulate`: 2 for usage and configuration errors
/// anywhere in the chain, 1 otherwise.
pub fn for_error(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.is::<UsageError>()
            || cause.is::<ConfigError>()
            || matches!(cause.downcast_ref::<OpenError>(), Some(OpenError::Misconfigured(_)))
            || matches!(cause.downcast_ref::<ConnectError>(), Some(ConnectError::InvalidUri { .. }))
        {
            return USAGE;
        }
    }
    FAILURE
}

/// Runs the command of `cli`; stops its work cleanly on the first SIGINT/SIGTERM.
/// `named` tells, for `config show`, which named variable or flag set each key it holds.
pub async fn run(cli: Cli, config: Config, named: std::collections::BTreeMap<String, String>) -> ExitCode {
    let shutdown = CancellationToken::new();
    tokio::spawn(handle_signals(shutdown.clone()));
    match cli.command {
        Command::Watch(args) => {
            let start = match args.start_at.as_deref().map(StartPosition::parse).transpose() {
                Ok(start) => start,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(USAGE);
                }
            };
            let options = WatchOptions { reset_token: args.reset_token, start, catch_up: args.catch_up };
            let telemetry = Arc::new(telemetry::Telemetry::labelled(vec![
                ("stream".to_owned(), crate::coordination::partition::stream_name(&config)),
                (
                    "partition".to_owned(),
                    format!("{}/{}", config.coordination.partition, config.coordination.partitions),
                ),
            ]));
            if let Ok(Some(addr)) = config.http_addr() {
                if let Err(e) = telemetry::serve(addr, telemetry.clone(), shutdown.clone()).await {
                    eprintln!("error: cannot serve health and metrics on {addr}: {e} (set HTTP_ADDR, or `off`)");
                    return ExitCode::from(FAILURE);
                }
            }
            telemetry.set_liveness_timeout(Duration::from_millis(config.watch.liveness_timeout_ms));
            telemetry::spawn_watchdog(telemetry.clone(), shutdown.clone());
            match watch::run(&config, options, telemetry, shutdown).await {
                Ok(()) => ExitCode::from(OK),
                Err(e) => {
                    let message = describe(chain_of(&e));
                    tracing::error!(error = %message, "watch stopped");
                    eprintln!("error: {message}");
                    for_watch_error(&e)
                }
            }
        }
        Command::Batch(args) => {
            let outcome = batch::run(&config, &batch_options(&args), shutdown).await;
            if let (Some(path), false) = (&config.batch.metrics_file, args.dry_run) {
                record_batch_run(&config, path, &outcome);
            }
            match outcome {
                Ok(_) => ExitCode::from(OK),
                Err(e) => report_failure("batch", &e),
            }
        }
        Command::Verify(args) => {
            let range = match DateRange::parse(&args.date_from, args.date_to.as_deref(), chrono::Utc::now()) {
                Ok(range) => range,
                Err(e) => return report_failure("verify", &e.into()),
            };
            match verify::run(&config, range, args.repair, shutdown).await {
                Ok(report) => {
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                    } else {
                        print!("{}", verify::render(&report));
                    }
                    tracing::info!(
                        consistent = report.consistent,
                        delivered = report.source_delivered,
                        archived = report.archived,
                        missing = report.missing.len(),
                        orphaned = report.orphaned.len(),
                        repaired = report.repaired,
                        "verify finished"
                    );
                    ExitCode::from(if report.consistent { OK } else { FAILURE })
                }
                Err(e) => report_failure("verify", &e),
            }
        }
        Command::Health(args) if args.probe.is_some() => {
            let probe = args.probe.expect("matched");
            let (answered, said) = health::ask_running_watch(&config, probe).await;
            println!("{said}");
            ExitCode::from(if answered { OK } else { FAILURE })
        }
        Command::Health(_) => {
            let (report, verdict) = health::run(&config).await;
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            ExitCode::from(match verdict {
                Verdict::Healthy => OK,
                Verdict::Unhealthy => FAILURE,
                Verdict::Misconfigured => USAGE,
            })
        }
        Command::Compact(args) => match maintain(&config, Maintenance::Compact(args.date_from, args.date_to)).await {
            Ok(()) => ExitCode::from(OK),
            Err(e) => report_failure("compact", &e),
        },
        Command::Vacuum(args) => match maintain(&config, Maintenance::Vacuum(args.retention_days)).await {
            Ok(()) => ExitCode::from(OK),
            Err(e) => report_failure("vacuum", &e),
        },
        Command::Purge(args) => match purge::run(&config, &purge_options(&args), shutdown).await {
            Ok(summary) if summary.skipped_any() => ExitCode::from(KEPT),
            Ok(_) => ExitCode::from(OK),
            Err(e) => report_failure("purge", &e),
        },
        Command::Config(ConfigCommand::Show) => {
            let file = Config::file_read(cli.global.config.as_deref()).ok().flatten();
            let environment: Vec<(String, String)> = std::env::vars().collect();
            let settings = crate::config::sources::settings(&config, file, &named, &environment);
            print!("{}", crate::config::sources::render(&settings));
            ExitCode::from(OK)
        }
        Command::Config(ConfigCommand::Check) => {
            let checks = config_check::run(&config).await;
            print!("{}", config_check::render(&checks));
            ExitCode::from(if config_check::failed(&checks) { FAILURE } else { OK })
        }
        Command::Config(ConfigCommand::Reference) => {
            print!("{}", crate::config::reference::markdown());
            ExitCode::from(OK)
        }
        Command::Simulate(args) => match simulate::run(&config, &simulate_options(&args), shutdown).await {
            Ok(_) => ExitCode::from(OK),
            Err(e) => report_failure("simulate", &e),
        },
    }
}

/// Prints a failure (scrubbed of credentials) and picks its exit code.
fn report_failure(command: &str, error: &anyhow::Error) -> ExitCode {
    let message = describe(error.chain());
    tracing::error!(command, error = %message, "failed");
    eprintln!("error: {message}");
    ExitCode::from(for_error(error))
}

/// The options of `batch`, from its command line.
fn batch_options(args: &crate::cli::BatchArgs) -> batch::BatchOptions {
    batch::BatchOptions {
        date_from: args.date_from.clone(),
        date_to: args.date_to.clone(),
        dry_run: args.dry_run,
        export_samples: args.export_samples.clone(),
        sample_size: args.sample_size,
    }
}

/// The options of `purge`, from its command line.
fn purge_options(args: &crate::cli::PurgeArgs) -> purge::PurgeOptions {
    purge::PurgeOptions {
        older_than: args.older_than.clone(),
        date_from: args.date_from.clone(),
        dry_run: args.dry_run,
        batch_size: args.batch_size,
        max_per_sec: args.max_per_sec,
        backup: args.backup.clone(),
        rearchive: args.rearchive,
    }
}

/// The options of `simulate`, from its command line.
fn simulate_options(args: &crate::cli::SimulateArgs) -> simulate::SimulateOptions {
    simulate::SimulateOptions {
        count: args.count,
        seed: args.seed,
        p_delivered: args.p_delivered,
        days: args.days,
        end_date: args.end_date,
        drop: args.drop,
        live: args.live,
        rate: args.rate,
        duration: args.duration,
    }
}

/// A maintenance of the archive table.
enum Maintenance {
    /// Compact the days between these (inclusive).
    Compact(Option<chrono::NaiveDate>, Option<chrono::NaiveDate>),
    /// Vacuum, keeping this many days.
    Vacuum(u32),
}

/// Runs `compact` or `vacuum` on the configured archive (a Delta table), and prints the result.
async fn maintain(config: &Config, maintenance: Maintenance) -> anyhow::Result<()> {
    let policy = crate::db::RetryPolicy::bounded(&config.retry);
    let dbs = crate::db::connect(config, &policy).await?;
    let archiver = if config.archive.sink == crate::config::ArchiveSink::Delta {
        // A table that is not there is a mistyped ARCHIVE_TABLE_URI, not an empty table to make.
        let opened = crate::pipeline::sink::Archiver::open_existing_table(config, &dbs).await?;
        opened.ok_or_else(|| {
            crate::pipeline::sink::OpenError::Misconfigured(format!(
                "there is no Delta table at ARCHIVE_TABLE_URI={}: nothing to maintain (is the URI right?)",
                config.lake.table_uri.as_deref().unwrap_or_default()
            ))
        })?
    } else {
        crate::pipeline::sink::Archiver::open(config, &dbs, crate::pipeline::document::ArchiveSource::Batch).await?
    };
    match maintenance {
        Maintenance::Compact(from, to) => {
            let done = archiver.compact(from, to).await?;
            tracing::info!(days = done.days, files_removed = done.files_removed, files_added = done.files_added,
                rows = done.rows, version = ?done.version, "compact finished");
            println!(
                "compact: {} days rewritten, {} files into {}, {} rows unchanged; log checkpointed",
                done.days, done.files_removed, done.files_added, done.rows
            );
        }
        Maintenance::Vacuum(days) => {
            let deleted = archiver.vacuum(chrono::Duration::days(i64::from(days))).await?;
            tracing::info!(files_deleted = deleted, retention_days = days, "vacuum finished");
            println!("vacuum: {deleted} unreferenced files older than {days} days deleted");
        }
    }
    Ok(())
}

/// Leaves the outcome of a batch run in `BATCH_METRICS_FILE`. A file that cannot be written is
/// an error in the log, not a failed run: the orders are archived either way.
fn record_batch_run(config: &Config, path: &str, outcome: &anyhow::Result<batch::BatchSummary>) {
    let now = chrono::Utc::now();
    let run = telemetry::textfile::BatchRun {
        ended_at: now,
        success: outcome.is_ok(),
        range_end: outcome.as_ref().ok().and_then(|s| s.range).and_then(|r| r.to).map_or(now, |to| to.min(now)),
        orders_archived: outcome.as_ref().map_or(0, |s| s.written.inserted),
    };
    let partition = format!("{}/{}", config.coordination.partition, config.coordination.partitions);
    let labels = [("database", config.mongodb.database.as_str()), ("partition", partition.as_str())];
    if let Err(e) = telemetry::textfile::write_batch_run(std::path::Path::new(path), &labels, &run) {
        tracing::error!(file = path, error = %e, "the batch metrics file cannot be written");
    }
}

/// First SIGINT/SIGTERM: finish the batch in flight, save, exit 0. Second: exit at once.
async fn handle_signals(shutdown: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("shutdown requested; finishing the batch in flight (signal again to exit at once)");
    shutdown.cancel();
    wait_for_signal().await;
    eprintln!("second signal: exiting at once; the last batch will be replayed on restart");
    std::process::exit(i32::from(INTERRUPTED));
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
