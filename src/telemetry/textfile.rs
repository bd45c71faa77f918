//! The outcome of `archiver batch` as a Prometheus text file, for node_exporter's textfile
//! collector (or any agent that reads the format). A nightly batch lives for minutes and serves
//! no `/metrics`: it leaves its result in a file the host's exporter reads, and the alerts
//! `ArchiverBatchFailed` and `ArchiverBatchStale` watch it. The last success survives a failed
//! run: it is read back from the file the failed run replaces.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicU64;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// One run of `archiver batch`, as the file reports it.
#[derive(Debug, Clone)]
pub struct BatchRun {
    /// When the run ended.
    pub ended_at: DateTime<Utc>,
    /// Whether it archived its whole range.
    pub success: bool,
    /// The (exclusive) end of the range it archived; the end of the run for an open range.
    pub range_end: DateTime<Utc>,
    /// Orders it newly archived.
    pub orders_archived: u64,
}

type FloatGauges = Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>;

const LAST_SUCCESS: &str = "archiver_batch_last_success_timestamp_seconds";
const LAST_SUCCESS_RANGE_END: &str = "archiver_batch_last_success_range_end_timestamp_seconds";

/// Writes `run` to `path` atomically (a temp file renamed over it), readable by the exporter's
/// user (0644: the file holds no secret). `labels` tell apart the jobs that share a host.
pub fn write_batch_run(path: &Path, labels: &[(&str, &str)], run: &BatchRun) -> std::io::Result<()> {
    let labels: Vec<(String, String)> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let previous = std::fs::read_to_string(path).unwrap_or_default();
    let (last_success, last_range_end) = if run.success {
        (Some(seconds(run.ended_at)), Some(seconds(run.range_end)))
    } else {
        (sample(&previous, LAST_SUCCESS), sample(&previous, LAST_SUCCESS_RANGE_END))
    };

    // A family with no sample when the value is unknown: the series is absent, not 0.
    let gauge = |value: Option<f64>| {
        let family = FloatGauges::default();
        if let Some(value) = value {
            family.get_or_create(&labels).set(value);
        }
        family
    };
    let mut registry = Registry::with_prefix("archiver");
    registry.register(
        "batch_last_run_timestamp_seconds",
        "When the last batch run ended",
        gauge(Some(seconds(run.ended_at))),
    );
    registry.register(
        "batch_last_run_success",
        "1 when the last batch run archived its whole range, 0 when it failed",
        gauge(Some(f64::from(u8::from(run.success)))),
    );
    registry.register(
        "batch_last_run_orders_archived",
        "Orders the last batch run newly archived",
        gauge(Some(run.orders_archived as f64)),
    );
    registry.register(
        "batch_last_success_timestamp_seconds",
        "When the last successful batch run ended",
        gauge(last_success),
    );
    registry.register(
        "batch_last_success_range_end_timestamp_seconds",
        "The end of the date range the last successful batch run archived",
        gauge(last_range_end),
    );
    let mut text = String::new();
    encode(&mut text, &registry).map_err(std::io::Error::other)?;

    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new().prefix(".archiver-batch").suffix(".tmp").tempfile_in(dir)?;
    file.write_all(text.as_bytes())?;
    file.as_file().sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// The value of the first sample of `name` in a text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(success: bool, day: u32) -> BatchRun {
        let at = |d: u32| chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 3, d, 2, 30, 0).unwrap();
        BatchRun { ended_at: at(day), success, range_end: at(day), orders_archived: 7 }
    }

    #[test]
    fn a_failed_run_keeps_the_last_success_of_the_file_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archiver_batch.prom");
        let labels = [("database", "livraison"), ("partition", "0/1")];

        write_batch_run(&path, &labels, &run(false, 1)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("archiver_batch_last_run_success{database=\"livraison\",partition=\"0/1\"} 0"), "{text}");
        assert_eq!(sample(&text, LAST_SUCCESS), None, "no success yet: the series is absent\n{text}");

        write_batch_run(&path, &labels, &run(true, 2)).unwrap();
        let success = sample(&std::fs::read_to_string(&path).unwrap(), LAST_SUCCESS).unwrap();
        assert_eq!(success, seconds(run(true, 2).ended_at));

        write_batch_run(&path, &labels, &run(false, 3)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(sample(&text, LAST_SUCCESS), Some(success), "{text}");
        assert_eq!(sample(&text, "archiver_batch_last_run_success"), Some(0.0));
        assert_eq!(sample(&text, "archiver_batch_last_run_timestamp_seconds"), Some(seconds(run(false, 3).ended_at)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        }
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temp file left behind");
    }
}
