//! Logging: human-readable (or JSON) lines on stderr, and the same events in daily rolling files
//! under `LOG_DIR`, the oldest deleted past `LOG_RETENTION_DAYS`. `RUST_LOG` wins over
//! `LOG_LEVEL` when set. Under systemd, standard error already goes to the journal: unless
//! `LOG_DIR` says otherwise, no files are written there, so nothing is kept twice.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings};

/// Keeps the file writer flushing; drop it last, at exit.
pub type LogGuard = Option<WorkerGuard>;

fn layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => fmt::layer().with_writer(writer).with_ansi(ansi).with_target(false).boxed(),
        LogFormat::Json => fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(writer).boxed(),
    }
}

/// Installs the global subscriber. Returns the file writer's guard and, when the log directory
/// cannot be used, a warning to log once logging works.
pub fn init(settings: &LogSettings, file_prefix: &str) -> (LogGuard, Option<String>) {
    // The Delta Lake libraries narrate each table read at INFO, and log at ERROR a table that
    // does not exist yet (which archiver then creates): their failures reach archiver's own
    // errors, so they are heard from only when RUST_LOG asks.
    let quiet = ",buoyant_kernel=off,buoyant_kernel_engine=warn,deltalake_core=error";
    let filter = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(format!("{}{quiet}", settings.level)))
            .unwrap_or_else(|_| EnvFilter::new(format!("info{quiet}")))
    };
    let console = layer(settings.format, std::io::stderr, std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter());
    let mut warning = None;
    let dir = log_dir(settings, std::env::var_os("JOURNAL_STREAM").is_some());
    let (file_layer, guard) = if dir.trim().is_empty() {
        (None, None)
    } else {
        match std::fs::create_dir_all(dir).map(|_| {
            let builder = tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix(file_prefix)
                .filename_suffix("log");
            // The appender deletes the oldest files of this prefix when it opens one, at start
            // and at each daily rotation.
            match settings.retention_days {
                0 => builder,
                days => builder.max_log_files(days),
            }
            .build(dir)
        }) {
            Ok(Ok(appender)) => {
                let (writer, guard) = tracing_appender::non_blocking(appender);
                (Some(layer(settings.format, writer, false).with_filter(filter())), Some(guard))
            }
            Ok(Err(e)) => {
                warning = Some(format!("log files disabled: cannot write in {dir}: {e}"));
                (None, None)
            }
            Err(e) => {
                warning = Some(format!("log files disabled: cannot create {dir}: {e}"));
                (None, None)
            }
        }
    };
    let _ = tracing_subscriber::registry().with(console).with(file_layer).try_init();
    (guard, warning)
}

/// The directory of the log files: `LOG_DIR` when set; unset, `logs`, or none when standard
/// error goes to the journal (systemd sets `JOURNAL_STREAM` for a service whose output it keeps).
fn log_dir(settings: &LogSettings, journal: bool) -> &str {
    match settings.dir.as_deref() {
        Some(dir) => dir,
        None if journal => "",
        None => "logs",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_the_journal_files_are_written_only_when_asked_for() {
        let unset = LogSettings::default();
        assert_eq!(log_dir(&unset, false), "logs");
        assert_eq!(log_dir(&unset, true), "");
        let set = LogSettings { dir: Some("/var/log/archiver".to_owned()), ..LogSettings::default() };
        assert_eq!(log_dir(&set, true), "/var/log/archiver");
        let off = LogSettings { dir: Some(String::new()), ..LogSettings::default() };
        assert_eq!(log_dir(&off, false), "");
    }
}
