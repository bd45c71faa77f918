//! The one way to retry: exponential backoff with jitter (`backon`'s), capped (the cap holds
//! after the jitter), bounded in attempts and in total time, every attempt logged.
//!
//! The one-shot commands (`batch`, `verify`, `health`, `simulate`) use [`RetryPolicy::bounded`]:
//! an unreachable server fails them within `RETRY_MAX_ELAPSED_MS` plus one attempt, so a cron
//! job learns it within about a minute. `watch` uses [`RetryPolicy::unbounded`] for database
//! outages: a service keeps trying (with `/health/ready` at 503) rather than exit, since a
//! restart would reconnect no better and a supervisor's restart limits (systemd's start limit,
//! Kubernetes' crash-loop backoff of up to 5 minutes) would only delay the recovery.

use std::fmt;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::config::RetrySettings;
use crate::redact::scrub;

/// How a sequence of attempts is spaced and bounded.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The first wait (nominal; each wait is drawn in its upper half).
    pub initial_delay: Duration,
    /// No wait is longer than this, jitter included.
    pub max_delay: Duration,
    /// Retries after the first attempt; `None`: no limit.
    pub max_retries: Option<usize>,
    /// No retry starts after this much time since the first attempt; `None`: no limit.
    pub max_elapsed: Option<Duration>,
}

impl RetryPolicy {
    /// The configured bounds (`RETRY_MAX_ATTEMPTS`, where 0 means no retry at all, and
    /// `RETRY_MAX_ELAPSED_MS`, where 0 means no time limit): for commands that must end.
    pub fn bounded(settings: &RetrySettings) -> Self {
        RetryPolicy {
            max_retries: Some(settings.max_attempts),
            max_elapsed: (settings.max_elapsed_ms > 0).then(|| Duration::from_millis(settings.max_elapsed_ms)),
            ..Self::unbounded(settings)
        }
    }

    /// The configured spacing without an end: for `watch`'s database outages.
    pub fn unbounded(settings: &RetrySettings) -> Self {
        let initial_delay = Duration::from_millis(settings.initial_delay_ms.max(1));
        RetryPolicy {
            initial_delay,
            max_delay: Duration::from_millis(settings.max_delay_ms).max(initial_delay),
            max_retries: None,
            max_elapsed: None,
        }
    }

    /// The waits between attempts, starting now.
    pub fn schedule(&self) -> Schedule {
        // backon's jitter adds up to 100 % to a delay, after its own cap. Halving the exponential
        // and clamping the result keeps every wait in [d/2, d] of the nominal delay d, and
        // never above `max_delay`: instances that failed together still spread out at the cap.
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.initial_delay / 2)
            .with_max_delay(self.max_delay / 2)
            .with_factor(2.0)
            .with_jitter();
        builder = match self.max_retries {
            Some(n) => builder.with_max_times(n),
            None => builder.without_max_times(),
        };
        Schedule {
            delays: builder.build(),
            max_delay: self.max_delay,
            deadline: self.max_elapsed.map(|limit| Instant::now() + limit),
        }
    }
}

/// The waits of one sequence of attempts.
#[derive(Debug)]
pub struct Schedule {
    delays: ExponentialBackoff,
    max_delay: Duration,
    deadline: Option<Instant>,
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.delays.next()?.min(self.max_delay);
        match self.deadline {
            None => Some(delay),
            // The last wait is shortened to end at the deadline: one more attempt, then stop.
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                (!left.is_zero()).then(|| delay.min(left))
            }
        }
    }
}

/// An operation that failed for good: its last error, and how hard it was tried.
#[derive(Debug)]
pub struct Exhausted<E> {
    /// The last error.
    pub error: E,
    /// Attempts made (1 when the error was not worth retrying).
    pub attempts: usize,
    /// From the first attempt to the last failure.
    pub elapsed: Duration,
}

impl<E: fmt::Display> fmt::Display for Exhausted<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (after {} attempts over {})", self.error, self.attempts, human_duration(self.elapsed))
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Exhausted<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// `1m02s`, `4.2s`: for people.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Runs `operation` until it succeeds, fails with an error `retryable` refuses, or `policy`'s
/// bounds are reached; each retry is logged as a warning that starts with `what` (what failed,
/// and what it means meanwhile). A cancelled `shutdown` cuts the current wait short and ends the
/// sequence after one more attempt.
pub async fn retry<T, E: fmt::Display + 'static>(
    policy: &RetryPolicy,
    what: &str,
    retryable: impl Fn(&E) -> bool,
    shutdown: Option<&CancellationToken>,
    mut operation: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, Exhausted<E>> {
    let started = Instant::now();
    let mut delays = policy.schedule();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let error = match operation().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let stopped = shutdown.is_some_and(CancellationToken::is_cancelled);
        let delay = if retryable(&error) && !stopped { delays.next() } else { None };
        let Some(delay) = delay else {
            return Err(Exhausted { error, attempts, elapsed: started.elapsed() });
        };
        // A driver error is logged by its cause: its own text describes the whole topology.
        let cause = match (&error as &dyn std::any::Any).downcast_ref::<mongodb::error::Error>() {
            Some(driver) => super::cause_in_one_line(driver),
            None => scrub(&error.to_string()),
        };
        tracing::warn!(attempt = attempts, retry_in_ms = delay.as_millis() as u64, error = %cause, "{what}; retrying");
        match shutdown {
            Some(token) => {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = token.cancelled() => {}
                }
            }
            None => tokio::time::sleep(delay).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_attempts: usize, max_elapsed_ms: u64) -> RetrySettings {
        RetrySettings { max_attempts, initial_delay_ms: 100, max_delay_ms: 300, max_elapsed_ms }
    }

    #[test]
    fn no_wait_exceeds_the_cap_whatever_the_jitter() {
        for _ in 0..200 {
            let delays: Vec<Duration> = RetryPolicy::bounded(&settings(12, 0)).schedule().collect();
            assert_eq!(delays.len(), 12);
            assert!(delays.iter().all(|d| *d <= Duration::from_millis(300)), "{delays:?}");
            // Jittered, but not below half the nominal delay.
            assert!(delays[0] >= Duration::from_millis(50), "{delays:?}");
            assert!(delays[11] >= Duration::from_millis(150), "{delays:?}");
        }
    }

    #[test]
    fn the_total_deadline_ends_the_schedule() {
        let mut schedule = RetryPolicy::bounded(&settings(1000, 1)).schedule();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(schedule.next(), None);
        let policy = RetryPolicy::bounded(&settings(1000, 60_000));
        assert!(policy.schedule().take(100).all(|d| d <= Duration::from_millis(300)));
    }

    #[test]
    fn unbounded_never_ends() {
        assert_eq!(RetryPolicy::unbounded(&settings(1, 1)).schedule().take(10_000).count(), 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_only_what_is_retryable_and_counts_attempts() {
        let policy = RetryPolicy::bounded(&settings(5, 0));
        let calls = std::cell::Cell::new(0);
        let out: Result<(), _> = retry(
            &policy,
            "test",
            |e: &&str| *e == "transient",
            None,
            async || {
                calls.set(calls.get() + 1);
                Err("transient")
            },
        )
        .await;
        let err = out.unwrap_err();
        assert_eq!((err.attempts, calls.get()), (6, 6));
        let out: Result<(), _> = retry(&policy, "test", |e: &&str| *e == "transient", None, async || Err("bad")).await;
        assert_eq!(out.unwrap_err().attempts, 1);
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human_duration(Duration::from_millis(62_400)), "1m02s");
        assert_eq!(human_duration(Duration::from_millis(4_200)), "4.2s");
    }
}
