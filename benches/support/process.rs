//! Runs the real `archiver` binary, as production would: one-shot commands (`simulate`, `batch`)
//! timed by wall clock, with their own CPU time and peak memory from `wait4`, and a long-running
//! `watch` whose memory and CPU are read from `/proc`.
//!
//! Every process gets a cleared environment holding only what the bench sets, and runs in the
//! bench's scratch directory: a developer's `.env`, `config/archiver.toml` or `BATCH_SIZE` must
//! not change the figures.

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

/// How long `watch` may take to open its stream, and to stop after SIGTERM.
const WATCH_START_TIMEOUT: Duration = Duration::from_secs(60);
const WATCH_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The `archiver` binary, pointed at the bench database.
#[derive(Debug)]
pub struct Archiver {
    binary: PathBuf,
    uri: String,
    database: String,
    /// Working directory of every process, and home of their output files.
    scratch: PathBuf,
    /// Numbers the output files, so each invocation keeps its own.
    invocations: AtomicUsize,
}

impl Archiver {
    /// `binary` run against `database` on `uri`, with output files under `scratch`.
    pub fn new(binary: PathBuf, uri: &str, database: &str, scratch: &Path) -> anyhow::Result<Archiver> {
        if !binary.is_file() {
            bail!("{} not found: build it first (cargo build --release)", binary.display());
        }
        Ok(Archiver {
            binary,
            uri: uri.to_owned(),
            database: database.to_owned(),
            scratch: scratch.to_owned(),
            invocations: AtomicUsize::new(0),
        })
    }

    /// A command with only the bench's environment: no log files, no HTTP listener.
    fn command(&self, label: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<(Command, PathBuf)> {
        let n = self.invocations.fetch_add(1, Ordering::Relaxed);
        let log = self.scratch.join(format!("{n:03}-{label}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .current_dir(&self.scratch)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("MONGODB_URI", &self.uri)
            .env("MONGODB_DB", &self.database)
            .env("LOG_DIR", "")
            .env("HTTP_ADDR", "off")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        Ok((command, log))
    }

    /// Runs `archiver ARGS` to completion and returns its wall time (process start to exit,
    /// as a cron job would see it). A non-zero exit is an error quoting the end of its output.
    pub async fn run(&self, label: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Duration> {
        self.run_measured(label, args, env).await.map(|(elapsed, _)| elapsed)
    }

    /// As [`Archiver::run`], and also returns what the `archiver` process itself used (its own
    /// CPU time and peak RSS, from the kernel's accounting of that one child when it is reaped):
    /// neither the bench's share nor the server's.
    pub async fn run_measured(
        &self,
        label: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<(Duration, Resources)> {
        let (mut command, log) = self.command(label, args, env)?;
        let started = Instant::now();
        let child = command.spawn().with_context(|| format!("starting {}", self.binary.display()))?;
        let (status, resources) =
            tokio::task::spawn_blocking(move || reap(child)).await?.context("waiting for archiver")?;
        let elapsed = started.elapsed();
        if !status.success() {
            bail!("archiver {} failed ({status}):\n{}", args.join(" "), tail(&log));
        }
        Ok((elapsed, resources))
    }

    fn token_file(&self, label: &str) -> PathBuf {
        self.scratch.join(format!("{label}.token.json"))
    }

    /// Starts `archiver watch` with its own resume token file (removed first, so the stream
    /// starts from now) and returns once the stream is open: `watch` saves its starting
    /// position as soon as the stream opens, so the token file appearing is the signal.
    pub async fn start_watch(&self, label: &str, env: &[(&str, String)]) -> anyhow::Result<WatchProcess> {
        let _ = std::fs::remove_file(self.token_file(label));
        self.resume_watch(label, env).await
    }

    /// Starts `archiver watch` with the resume token file a run of the same `label` left: it
    /// resumes after it.
    pub async fn resume_watch(&self, label: &str, env: &[(&str, String)]) -> anyhow::Result<WatchProcess> {
        let token = self.token_file(label);
        let mut env = env.to_vec();
        env.push(("RESUME_TOKEN_FILE", token.display().to_string()));
        let (mut command, log) = self.command(label, &["watch"], &env)?;
        let child = command.spawn().with_context(|| format!("starting {}", self.binary.display()))?;
        let mut watch = WatchProcess { child, log };
        let started = Instant::now();
        while !token.is_file() {
            if let Some(status) = watch.child.try_wait()? {
                bail!("archiver watch exited at start ({status}):\n{}", tail(&watch.log));
            }
            if started.elapsed() > WATCH_START_TIMEOUT {
                bail!("archiver watch did not open its stream in {WATCH_START_TIMEOUT:?}:\n{}", tail(&watch.log));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(watch)
    }
}

/// Resources used by a process: so far, from `/proc` (a running `watch`), or in all, from its
/// rusage when reaped (a one-shot command).
#[derive(Debug, Clone, Copy, Default)]
pub struct Resources {
    /// Peak resident set size (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
    /// User plus system CPU time, in seconds.
    pub cpu_secs: f64,
}

/// A running `archiver watch`; killed if dropped while still running, so that a failing case
/// never leaves one behind.
#[derive(Debug)]
pub struct WatchProcess {
    child: Child,
    log: PathBuf,
}

impl WatchProcess {
    /// Peak memory and CPU time so far. Read just before stopping: after exit `/proc` is gone.
    pub fn resources(&self) -> anyhow::Result<Resources> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let peak_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/PID/status")?;
        let cpu_secs = process_cpu_secs(pid).context("cannot read /proc/PID/stat")?;
        Ok(Resources { peak_rss_bytes: peak_kib * 1024, cpu_secs })
    }

    /// Stops it as a service manager would (SIGTERM: finish the batch, save the token, exit 0)
    /// and checks that it did.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().context("running kill")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("archiver watch exited with {status} after SIGTERM:\n{}", tail(&self.log));
                }
                return Ok(());
            }
            if started.elapsed() > WATCH_STOP_TIMEOUT {
                bail!("archiver watch did not stop within {WATCH_STOP_TIMEOUT:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails if the process has already exited: a dead `watch` would otherwise only show up
    /// as a timeout much later.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("archiver watch exited unexpectedly ({status}):\n{}", tail(&self.log)),
            None => Ok(()),
        }
    }
}

impl Drop for WatchProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU seconds used during a measured stretch of time.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuTimes {
    /// By the bench process and the `archiver` processes it waited for in the meantime (the
    /// kernel adds a child's time to its parent's once it has been waited for).
    pub client_secs: f64,
    /// By the database server, when its pid is known (`BENCH_SERVER_PID`).
    pub server_secs: Option<f64>,
}

/// Measures [`CpuTimes`] from `/proc` between `start` and `stop`: on a shared 2-core machine,
/// where the CPU went says more than the wall clock alone.
#[derive(Debug)]
pub struct CpuMeter {
    server_pid: Option<u32>,
    client_start: f64,
    server_start: Option<f64>,
}

impl CpuMeter {
    /// Starts measuring; `server_pid` is the database server's process, if known.
    pub fn start(server_pid: Option<u32>) -> CpuMeter {
        CpuMeter { server_pid, client_start: client_cpu_secs(), server_start: server_pid.and_then(process_cpu_secs) }
    }

    /// The CPU time used since `start`.
    pub fn stop(&self) -> CpuTimes {
        let server_now = self.server_pid.and_then(process_cpu_secs);
        CpuTimes {
            client_secs: client_cpu_secs() - self.client_start,
            server_secs: server_now.zip(self.server_start).map(|(now, start)| now - start),
        }
    }
}

/// The fields of `/proc/PID/stat` after the command name (which is in parentheses and may
/// contain spaces): index 11 is utime, 12 stime, 13 cutime, 14 cstime, in clock ticks.
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    Some(after_name.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

fn ticks_to_secs(fields: &[u64], range: std::ops::Range<usize>) -> Option<f64> {
    Some(fields.get(range)?.iter().sum::<u64>() as f64 / clock_ticks_per_sec())
}

/// User and system CPU seconds of a process.
fn process_cpu_secs(pid: u32) -> Option<f64> {
    ticks_to_secs(&stat_fields(&pid.to_string())?, 11..13)
}

/// CPU seconds of this process and of its waited-for children.
fn client_cpu_secs() -> f64 {
    stat_fields("self").and_then(|f| ticks_to_secs(&f, 11..15)).unwrap_or(0.0)
}

/// Kernel clock ticks per second (`getconf CLK_TCK`), which `/proc/PID/stat` counts in; 100 on
/// every Linux we know, used when `getconf` is missing.
fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Waits for `child` with `wait4`, which reaps it and returns its own rusage: exact CPU time
/// and peak RSS of that process alone, which `/proc` cannot give once it has exited (polling
/// `VmHWM` would miss a peak just before exit). The kernel still adds it to this process's
/// children's times, so [`CpuMeter`] counts it as before. Blocks: run it off the runtime.
fn reap(child: Child) -> anyhow::Result<(ExitStatus, Resources)> {
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers are to live locals of the types wait4 expects, and `pid` is
        // our own unreaped child (std only reaps in `wait`/`try_wait`, which are not called:
        // `child` is dropped unwaited, which neither kills nor waits).
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error).context("wait4");
        }
    }
    drop(child);
    let secs = |t: &libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let resources = Resources {
        // In KiB on Linux.
        peak_rss_bytes: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        cpu_secs: secs(&usage.ru_utime) + secs(&usage.ru_stime),
    };
    Ok((ExitStatus::from_raw(status), resources))
}

/// The last lines of a process's output, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(20);
    format!("{} (full output: {})", lines[from..].join("\n"), log.display())
}
