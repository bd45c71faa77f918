//! Repeated measurements and their summaries: the `timed` runner (median and spread of several
//! runs) and nearest-rank percentiles for latency distributions.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::process::{CpuMeter, CpuTimes};

/// The median and spread of several samples of one figure.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Every sample, in run order: the JSON keeps them so later analyses need not re-run.
    pub samples: Vec<f64>,
    /// Median (mean of the two middle samples for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises `samples`; an empty list gives NaNs rather than a panic, so that a case that
    /// produced nothing still shows up in the report.
    pub fn of(samples: Vec<f64>) -> Summary {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Summary {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            samples,
        }
    }

    /// A figure measured once.
    pub fn single(value: f64) -> Summary {
        Summary::of(vec![value])
    }
}

/// What every timed run reports: orders handled, wall time and CPU time of its timed part.
pub trait Throughput {
    /// Orders handled.
    fn orders(&self) -> u64;
    /// Wall time.
    fn elapsed(&self) -> Duration;
    /// CPU time meanwhile.
    fn cpu(&self) -> CpuTimes;

    /// Orders per second.
    fn orders_per_sec(&self) -> f64 {
        rate(self.orders(), self.elapsed())
    }
}

/// The plainest run: `orders` handled in `elapsed`, using `cpu`.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Orders handled by the timed part.
    pub orders: u64,
    /// Wall time of the timed part.
    pub elapsed: Duration,
    /// CPU used meanwhile, by the client side and by the server.
    pub cpu: CpuTimes,
}

impl Throughput for Run {
    fn orders(&self) -> u64 {
        self.orders
    }
    fn elapsed(&self) -> Duration {
        self.elapsed
    }
    fn cpu(&self) -> CpuTimes {
        self.cpu
    }
}

impl Run {
    /// Times `work`, which handles `orders`, and the CPU it uses (the server's too when its
    /// pid is known).
    pub async fn measure(
        orders: u64,
        server_pid: Option<u32>,
        work: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Run> {
        let meter = CpuMeter::start(server_pid);
        let started = Instant::now();
        work.await?;
        Ok(Run { orders, elapsed: started.elapsed(), cpu: meter.stop() })
    }
}

/// Median CPU microseconds per order of a case, client side and server side.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuPerOrder {
    /// The bench process and the `archiver` processes it ran.
    pub client_us: f64,
    /// The database server; `None` when its pid is unknown.
    pub server_us: Option<f64>,
}

impl CpuPerOrder {
    /// The medians over `runs` of their CPU times per order.
    pub fn of<T: Throughput>(runs: &[T]) -> CpuPerOrder {
        let per_order = |secs: f64, run: &T| secs * 1e6 / run.orders().max(1) as f64;
        let client = summarize(runs, |r| per_order(r.cpu().client_secs, r));
        let server: Option<Vec<f64>> = runs.iter().map(|r| r.cpu().server_secs.map(|s| per_order(s, r))).collect();
        CpuPerOrder { client_us: client.median, server_us: server.map(|s| Summary::of(s).median) }
    }
}

/// `count` per second of `elapsed`.
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Runs `run` `runs` times, one after the other, logging each run's throughput to stderr.
///
/// Each call prepares its own run (drops the archive, resets orders) and times only what is
/// measured, so set-up never counts; the closure gets the run index.
pub async fn timed<T, F, Fut>(label: &str, runs: usize, mut run: F) -> anyhow::Result<Vec<T>>
where
    T: Throughput,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut results = Vec::with_capacity(runs);
    for index in 0..runs {
        let result = run(index).await.map_err(|e| e.context(format!("{label}, run {}", index + 1)))?;
        eprintln!("  {label}: run {}/{runs}: {:.0} orders/s", index + 1, result.orders_per_sec());
        results.push(result);
    }
    Ok(results)
}

/// The summary of one figure over several runs.
pub fn summarize<T>(runs: &[T], figure: impl Fn(&T) -> f64) -> Summary {
    Summary::of(runs.iter().map(figure).collect())
}

/// The nearest-rank percentile `p` (0–100) of `sorted`, NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
