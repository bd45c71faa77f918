//! The `archiver` binary: parse, configure, log, run, and turn the outcome into an exit code.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use archiver::app::{self, FAILURE, USAGE};
use archiver::cli::{Cli, Command, ConfigCommand};
use archiver::config::Config;
use archiver::logging;

fn main() -> ExitCode {
    // Before anything can panic: no panic message reaches the user unredacted.
    archiver::redact::install_panic_hook();
    // A missing .env is normal; a broken one is worth a word but not a failure.
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("warning: {}", dotenv_warning(&e));
        }
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The reference is the same whatever the configuration, which may not even load.
    if let Command::Config(ConfigCommand::Reference) = cli.command {
        print!("{}", archiver::config::reference::markdown());
        return ExitCode::SUCCESS;
    }
    let config = match cli.overrides().and_then(|overrides| Config::load(cli.global.config.as_deref(), overrides)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let (_log_guard, log_warning) = logging::init(&config.log, "archiver");
    if let Some(warning) = log_warning {
        tracing::warn!("{warning}");
    }
    // The threads for blocking calls (a local table's file operations, among others) are
    // bounded: tokio's default of 512 let a `watch` into a table grow to dozens of them, each
    // with its share of the allocator's memory, and its RSS with them.
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().max_blocking_threads(BLOCKING_THREADS).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                return ExitCode::from(FAILURE);
            }
        };
    let named = archiver::cli::named_sources(&matches);
    runtime.block_on(app::run(cli, config, named))
}

/// Threads for blocking calls, at most.
const BLOCKING_THREADS: usize = 8;

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
