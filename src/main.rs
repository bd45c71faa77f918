//! The `archiver` binary: parse, configure, log, run, and turn the outcome into an exit code.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use archiver::cli::{Cli, Command};
use archiver::config::Config;
use archiver::redact::scrub;
use archiver::watch::{self, StartPosition, WatchOptions};
use archiver::{exit, logging};

fn main() -> ExitCode {
    // A missing .env is normal; a broken one is worth a word but not a failure.
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("warning: {}", dotenv_warning(&e));
        }
    }
    let cli = Cli::parse();
    let config = match Config::load(cli.global.config.as_deref(), cli.overrides()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let (_log_guard, log_warning) = logging::init(&config.log, "archiver");
    if let Some(warning) = log_warning {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    runtime.block_on(run(cli, config))
}

async fn run(cli: Cli, config: Config) -> ExitCode {
    let shutdown = CancellationToken::new();
    tokio::spawn(handle_signals(shutdown.clone()));
    match cli.command {
        Command::Watch(args) => {
            let start = match args.start_at.as_deref().map(StartPosition::parse).transpose() {
                Ok(start) => start,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(exit::USAGE);
                }
            };
            let options = WatchOptions { reset_token: args.reset_token, start, catch_up: args.catch_up };
            let telemetry = std::sync::Arc::new(archiver::health::Telemetry::new());
            if let Ok(Some(addr)) = config.http_addr() {
                if let Err(e) = archiver::health::serve(addr, telemetry.clone(), shutdown.clone()).await {
                    eprintln!("error: cannot serve health and metrics on {addr}: {e} (set HTTP_ADDR, or `off`)");
                    return ExitCode::from(exit::FAILURE);
                }
            }
            telemetry.set_liveness_timeout(std::time::Duration::from_millis(config.watch.liveness_timeout_ms));
            archiver::health::spawn_watchdog(telemetry.clone(), shutdown.clone());
            match watch::run(&config, options, telemetry, shutdown).await {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) => {
                    let message = scrub(&e.to_string());
                    tracing::error!(error = %message, "watch stopped");
                    eprintln!("error: {message}");
                    exit::for_watch_error(&e)
                }
            }
        }
        Command::Batch(args) => match archiver::batch::run(&config, &args, shutdown).await {
            Ok(_) => ExitCode::from(exit::OK),
            Err(e) => report_failure("batch", &e),
        },
        Command::Verify(args) => {
            let range =
                match archiver::batch::DateRange::parse(&args.date_from, args.date_to.as_deref(), chrono::Utc::now()) {
                    Ok(range) => range,
                    Err(e) => return report_failure("verify", &e.into()),
                };
            match archiver::verify::run(&config, range, args.repair, shutdown).await {
                Ok(report) => {
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                    } else {
                        print!("{}", archiver::verify::render(&report));
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
                    ExitCode::from(if report.consistent { exit::OK } else { exit::FAILURE })
                }
                Err(e) => report_failure("verify", &e),
            }
        }
        Command::Health(_) => {
            use archiver::health::check::Verdict;
            let (report, verdict) = archiver::health::check::run(&config).await;
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            ExitCode::from(match verdict {
                Verdict::Healthy => exit::OK,
                Verdict::Unhealthy => exit::FAILURE,
                Verdict::Misconfigured => exit::USAGE,
            })
        }
        Command::Simulate(args) => match archiver::simulate::run(&config, &args, shutdown).await {
            Ok(_) => ExitCode::from(exit::OK),
            Err(e) => report_failure("simulate", &e),
        },
    }
}

/// Describes a `.env` problem without its content: dotenvy's own message quotes the malformed
/// line, which is typically `MONGODB_URI=…` with a password in it.
fn dotenv_warning(error: &dotenvy::Error) -> String {
    match error {
        dotenvy::Error::LineParse(text, _) => {
            // The variables before this line were loaded; dotenvy stops at it.
            let line = std::fs::read_to_string(".env")
                .ok()
                .and_then(|content| line_number_of(&content, text))
                .map_or_else(|| "a line".to_owned(), |n| format!("line {n}"));
            format!(".env: {line} is malformed (content not shown); it and the lines after it were ignored")
        }
        // I/O errors name the failure, never the content.
        other => format!("ignoring .env: {other}"),
    }
}

/// The 1-based number of the line where `text` (a line, or several) starts in `content`.
fn line_number_of(content: &str, text: &str) -> Option<usize> {
    let first = text.lines().next().filter(|l| !l.trim().is_empty())?;
    content.lines().position(|line| line.contains(first)).map(|i| i + 1)
}

/// Prints a failure (scrubbed of credentials) and picks its exit code.
fn report_failure(command: &str, error: &anyhow::Error) -> ExitCode {
    let message = scrub(&format!("{error:#}"));
    tracing::error!(command, error = %message, "failed");
    eprintln!("error: {message}");
    ExitCode::from(exit::for_error(error))
}

/// First SIGINT/SIGTERM: finish the batch in flight, save, exit 0. Second: exit at once.
async fn handle_signals(shutdown: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("shutdown requested; finishing the batch in flight (signal again to exit at once)");
    shutdown.cancel();
    wait_for_signal().await;
    eprintln!("second signal: exiting at once; the last batch will be replayed on restart");
    std::process::exit(i32::from(exit::INTERRUPTED));
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
