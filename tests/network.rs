//! What real networks do, through a fault-injecting proxy (tests/common/proxy.rs) between the real
//! `archiver watch` and a real server: a silent (blackholed) archive or source, resets and
//! refusals, a leader cut off from the cluster while a standby runs, and slow round trips. Each
//! runs under steady deliveries and checks that nothing is lost or duplicated, that readiness
//! says what is going on, and how the process ends. Detection and recovery times are printed
//! (`--nocapture`) for the record; only documented bounds are asserted.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::{Mode, Proxy};
use common::{eventually, health_addr, probe, Delivery, Load, Pace, Refs, TestEnv, WatchRun, Watcher};
use mongodb::bson::{doc, Document};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Enough retries to ride out the outages below; a short cap so recovery follows the heal
/// quickly (the backoff cap is not what these tests are about).
const RIDE_OUT: &[(&str, &str)] = &[("RETRY_MAX_ATTEMPTS", "100"), ("RETRY_MAX_DELAY_MS", "1000")];

/// An unanswered archive write is abandoned and retried after this (default 60 s): short, so
/// that an outage of a few seconds is seen and waited out within the test's time.
const QUICK_WRITE_TIMEOUT: &[(&str, &str)] = &[("WRITE_TIMEOUT_MS", "5000")];

/// The shipped defaults of what the tests' environment otherwise shortens, for the readiness
/// bound that is documented "with the default settings".
const DEFAULTS: &[(&str, &str)] =
    &[("BATCH_MAX_WAIT_MS", "100"), ("RETRY_MAX_ATTEMPTS", "10"), ("RETRY_MAX_DELAY_MS", "30000")];

/// The longest a silent source may go unreported by readiness, with the default settings: the
/// README promises about 10 s (`STREAM_TIMEOUT_MS`); this leaves room for the probe's polling.
const READINESS_BOUND: Duration = Duration::from_secs(15);

/// A test's seeded database and a proxy in front of its server (`proxy.uri(&t.uri)` reaches
/// it through the proxy).
async fn behind_proxy(name: &str) -> (TestEnv, Refs, Arc<Proxy>) {
    let (t, refs) = TestEnv::seeded(name).await;
    let proxy = Proxy::for_uri(&t.uri).await;
    (t, refs, proxy)
}

/// A `watch` of `t` whose archive is reached through `proxy`, riding out outages.
fn archiving_through<'a>(t: &'a TestEnv, proxy: &Proxy) -> WatchRun<'a> {
    t.watch().envs(RIDE_OUT).env("ARCHIVE_URI", proxy.uri(&t.uri))
}

/// Starts about 100 deliveries a second, half inserted delivered and half updated to delivered
/// (both kinds of change event), and waits until `watch` archives them and is ready. Its probe
/// address, and the load.
async fn under_load(t: &TestEnv, refs: Refs, watch: &Watcher) -> (String, Load) {
    let addr = health_addr(watch);
    let load = Load::start(t, refs, Delivery::Alternating, Pace::PerSecond(100));
    wait_streaming(t, watch, &addr).await;
    (addr, load)
}

/// Stops the load and waits up to a minute until `watch` archived every delivered order,
/// exactly once: how many, and how long the catching up took.
async fn drain(t: &TestEnv, load: Load, watch: &Watcher) -> (u32, Duration) {
    let delivered = load.finish().await;
    let caught_up = all_archived(t, watch, delivered, Duration::from_secs(60)).await;
    t.assert_archive_matches_delivered().await;
    (delivered, caught_up)
}

/// The warnings and errors of a watcher's log: what it noticed of a fault, and when.
fn warnings(watcher: &Watcher) -> String {
    let log = watcher.stderr();
    log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect::<Vec<_>>().join("\n")
}

/// Polls `/health/ready` until it answers `code`, for up to `within`; how long that took.
async fn ready_turns(addr: &str, code: u16, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if probe(addr, "/health/ready").await.is_some_and(|(c, _)| c == code) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The value of an unlabelled metric, 0 if absent.
async fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = probe(addr, "/metrics").await.expect("metrics served");
    common::unlabelled(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap_or(0.0))
}

/// Sum of the counters that record a fault being seen and handled.
async fn faults_counted(addr: &str) -> f64 {
    metric(addr, "archiver_retries_total").await
        + metric(addr, "archiver_reconnects_total").await
        + metric(addr, "archiver_write_errors_total").await
}

/// Waits until the archive holds `n` documents, for up to `within`; how long that took.
async fn all_archived(t: &TestEnv, watcher: &Watcher, n: u32, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let count = t.archive_len().await;
        assert!(count <= u64::from(n), "archive holds {count} documents, only {n} delivered");
        if count == u64::from(n) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "archive holds {count} of {n} delivered orders {within:?} after the heal; watch log:\n{}",
            watcher.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps the fault on until readiness drops or `longest` passes, then `linger` more; how long
/// readiness took to drop, if it did.
async fn hold_fault(addr: &str, longest: Duration, linger: Duration) -> Option<Duration> {
    let started = Instant::now();
    let detected = ready_turns(addr, 503, longest).await;
    let until = started + detected.map_or(longest, |d| d + linger).min(longest);
    tokio::time::sleep_until(until.into()).await;
    detected
}

/// Waits until the stream is archiving through the proxy before a fault starts.
async fn wait_streaming(t: &TestEnv, watcher: &Watcher, addr: &str) {
    let started = Instant::now();
    while t.archive_len().await == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "nothing archived before the fault:\n{}", watcher.tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready_turns(addr, 200, Duration::from_secs(10)).await.is_some(), "not ready before the fault");
}

// --- the proxy itself, against a local echo server ---

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `message` and reads its echo, giving up after `within`.
async fn round_trip(stream: &mut TcpStream, message: &[u8], within: Duration) -> std::io::Result<Vec<u8>> {
    stream.write_all(message).await?;
    let mut echoed = vec![0u8; message.len()];
    match tokio::time::timeout(within, stream.read_exact(&mut echoed)).await {
        Ok(read) => read.map(|_| echoed),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[tokio::test]
async fn the_proxy_passes_delays_swallows_resets_and_refuses() {
    let proxy = Proxy::start(echo_server().await).await;
    let quick = Duration::from_secs(2);
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut open, b"pass", quick).await.unwrap(), b"pass");

    // Latency: both directions, on the open connection too.
    proxy.set_mode(Mode::Latency(Duration::from_millis(150)));
    let started = Instant::now();
    assert_eq!(round_trip(&mut open, b"slow", quick).await.unwrap(), b"slow");
    assert!(started.elapsed() >= Duration::from_millis(300), "round trip took {:?}", started.elapsed());

    // Blackhole: the open connection and a new one stay open and silent.
    proxy.set_mode(Mode::Blackhole);
    let silent = Duration::from_millis(500);
    let err = round_trip(&mut open, b"lost", silent).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    let mut during = TcpStream::connect(proxy.addr()).await.expect("a blackhole still accepts");
    let err = round_trip(&mut during, b"lost", silent).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    // Back to Pass: new connections work; the blackholed ones lost their bytes and stay silent.
    proxy.set_mode(Mode::Pass);
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut fresh, b"back", quick).await.unwrap(), b"back");
    let err = round_trip(&mut during, b"more", silent).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    // Reset: the open connection is reset, and so is a new one.
    proxy.set_mode(Mode::Reset);
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(quick, fresh.read(&mut buf)).await.expect("reset at once");
    assert!(matches!(read, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{read:?}");
    let mut reset = TcpStream::connect(proxy.addr()).await.expect("accepted, then reset");
    let read = tokio::time::timeout(quick, reset.read(&mut buf)).await.expect("reset at once");
    assert!(matches!(read, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{read:?}");

    // Refuse: the port refuses; an open connection is closed.
    proxy.set_mode(Mode::Pass);
    let mut before = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut before, b"once", quick).await.unwrap(), b"once");
    proxy.set_mode(Mode::Refuse);
    let read = tokio::time::timeout(quick, before.read(&mut buf)).await.expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let mut refused = false;
    // The accept loop closes its listener as soon as it sees the switch.
    for _ in 0..20 {
        match TcpStream::connect(proxy.addr()).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(refused, "the port still accepts");
    proxy.set_mode(Mode::Pass);
    let mut again = None;
    for _ in 0..20 {
        if let Ok(s) = TcpStream::connect(proxy.addr()).await {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut again = again.expect("the same port accepts again");
    assert_eq!(round_trip(&mut again, b"again", quick).await.unwrap(), b"again");
}

#[tokio::test]
async fn proxied_uris_keep_credentials_and_force_a_direct_connection() {
    let upstream = common::proxy::upstream_of("mongodb://127.0.0.1:27017/?directConnection=true");
    assert_eq!(upstream, "127.0.0.1:27017".parse().unwrap());
    assert_eq!(common::proxy::upstream_of("mongodb://u:p@localhost:1234,h2:5/db").port(), 1234);
    let proxy = Proxy::start(upstream).await;
    let at = proxy.addr();
    assert_eq!(
        proxy.uri("mongodb://127.0.0.1:27017/?directConnection=true"),
        format!("mongodb://{at}/?directConnection=true")
    );
    assert_eq!(
        proxy.uri("mongodb://u:p@h1:1,h2:2/db?tls=false"),
        format!("mongodb://u:p@{at}/db?tls=false&directConnection=true")
    );
    assert_eq!(proxy.uri("mongodb://h1:1"), format!("mongodb://{at}/?directConnection=true"));
}

// --- archive faults ---

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_archive_under_load_is_waited_out_and_archiving_resumes() {
    let (t, refs, proxy) = behind_proxy("net_archive_silent").await;
    let mut watch = archiving_through(&t, &proxy).envs(QUICK_WRITE_TIMEOUT).until("change stream open").await;
    let (addr, load) = under_load(&t, refs, &watch).await;

    proxy.set_mode(Mode::Blackhole);
    let outage = Duration::from_secs(20);
    let started = Instant::now();
    let detected = ready_turns(&addr, 503, outage).await;
    tokio::time::sleep_until((started + outage).into()).await;
    let during = t.archive_len().await;
    proxy.set_mode(Mode::Pass);
    let healed = Instant::now();
    eprintln!("archive blackholed {outage:?}: readiness 503 after {detected:?}; {during} archived at the heal");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (delivered, _) = drain(&t, load, &watch).await;
    let caught_up = healed.elapsed();
    let ready_again = ready_turns(&addr, 200, Duration::from_secs(30)).await.map(|_| healed.elapsed());
    eprintln!(
        "archive healed: all {delivered} archived {caught_up:?} after the heal; ready again {ready_again:?} after it"
    );
    assert!(detected.is_some(), "/health/ready stayed 200 through a {outage:?} archive outage:\n{}", watch.tail());
    assert!(ready_again.is_some(), "/health/ready not 200 after the heal:\n{}", watch.tail());
    assert!(faults_counted(&addr).await >= 1.0, "no retry, reconnect or write error counted");
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_an_archive_outage_exits_0_promptly_and_a_restart_loses_nothing() {
    let (t, refs, proxy) = behind_proxy("net_archive_sigterm").await;
    let mut watch = archiving_through(&t, &proxy).until("change stream open").await;
    let (_, load) = under_load(&t, refs, &watch).await;
    proxy.set_mode(Mode::Blackhole);
    // Long enough for a batch write to be caught in the outage.
    tokio::time::sleep(Duration::from_secs(5)).await;
    watch.signal("TERM");
    let asked = Instant::now();
    let status = watch.wait(Duration::from_secs(15)).await;
    eprintln!("SIGTERM during an archive outage: exited {status} after {:?}", asked.elapsed());
    assert_eq!(status.code(), Some(0), "{}", watch.tail());

    proxy.set_mode(Mode::Pass);
    // The saved position never runs ahead of the archive: a plain restart archives the rest.
    let delivered = load.finish().await;
    let mut again = t.watch().envs(RIDE_OUT).until("change stream open").await;
    all_archived(&t, &again, delivered, Duration::from_secs(60)).await;
    t.assert_archive_matches_delivered().await;
    again.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_that_resets_or_refuses_under_load_is_waited_out() {
    let (t, refs, proxy) = behind_proxy("net_archive_reset").await;
    let mut watch = archiving_through(&t, &proxy).envs(QUICK_WRITE_TIMEOUT).until("change stream open").await;
    let (addr, load) = under_load(&t, refs, &watch).await;

    for fault in [Mode::Reset, Mode::Refuse] {
        proxy.set_mode(fault);
        let detected = hold_fault(&addr, Duration::from_secs(20), Duration::from_secs(3)).await;
        proxy.set_mode(Mode::Pass);
        let recovered = ready_turns(&addr, 200, Duration::from_secs(30)).await;
        eprintln!("archive {fault:?}: readiness 503 after {detected:?}, 200 again {recovered:?} after the heal");
        assert!(detected.is_some(), "/health/ready stayed 200 while the archive was {fault:?}:\n{}", watch.tail());
        assert!(recovered.is_some(), "/health/ready not 200 after the archive {fault:?}:\n{}", watch.tail());
        assert!(watch.is_running(), "watch exited:\n{}", watch.tail());
    }
    let (delivered, caught_up) = drain(&t, load, &watch).await;
    eprintln!("archive reset and refused: all {delivered} archived {caught_up:?} after the load stopped");
    assert!(faults_counted(&addr).await >= 2.0, "the two faults were not counted");
    watch.stop_ok().await;
}

// --- source faults ---

#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_goes_silent_or_resets_is_detected_in_time_and_waited_out() {
    let (t, refs, proxy) = behind_proxy("net_source").await;
    // The archive stays reachable (its own client, direct); only the source goes through the
    // proxy. Default settings, since the readiness bound is documented for them.
    let mut watch = t
        .watch()
        .envs(DEFAULTS)
        .env("MONGODB_URI", proxy.uri(&t.uri))
        .env("ARCHIVE_URI", &t.uri)
        .until("change stream open")
        .await;
    let (addr, load) = under_load(&t, refs, &watch).await;

    let mut silent_detection = None;
    for fault in [Mode::Blackhole, Mode::Reset] {
        proxy.set_mode(fault);
        // Held well past the bound, so that a late detection is measured rather than missed.
        let detected = hold_fault(&addr, Duration::from_secs(40), Duration::from_secs(3)).await;
        proxy.set_mode(Mode::Pass);
        let healed = Instant::now();
        let recovered = ready_turns(&addr, 200, Duration::from_secs(60)).await;
        let backlog = t.archive_len().await;
        eprintln!(
            "source {fault:?}: readiness 503 after {detected:?}, 200 again {recovered:?} after the heal \
             ({backlog} archived {:?} after it)",
            healed.elapsed()
        );
        assert!(detected.is_some(), "/health/ready stayed 200 while the source was {fault:?}:\n{}", watch.tail());
        assert!(recovered.is_some(), "/health/ready not 200 after the source {fault:?}:\n{}", watch.tail());
        if fault == Mode::Blackhole {
            silent_detection = detected;
        }
    }
    drain(&t, load, &watch).await;
    // After the silence, the stream was reopened by archiver (silent six times STREAM_TIMEOUT_MS,
    // or failed as the driver saw the connection die), or it answered again by itself once the
    // network healed (what the proxy held back was delivered late); a reset one the driver may
    // resume by itself. Either way the silence ended in one of these, not in a stall.
    let reopened = metric(&addr, "archiver_reconnects_total").await >= 1.0;
    assert!(
        reopened || watch.log_contains("the change stream answers again"),
        "no reopening, no late answer:\n{}",
        watch.tail()
    );
    watch.stop_ok().await;
    let silent_detection = silent_detection.unwrap();
    assert!(
        silent_detection <= READINESS_BOUND,
        "a silent source was reported after {silent_detection:?}, more than {READINESS_BOUND:?}:\n{}",
        warnings(&watch)
    );
}

// --- shared checkpoint store and leadership ---

async fn shared_checkpoint(t: &TestEnv) -> Document {
    t.db.collection::<Document>("archiver_checkpoints").find_one(doc! {}).await.unwrap().expect("a shared checkpoint")
}

/// Byte offsets of `needle` in a log.
fn positions(log: &str, needle: &str) -> Vec<usize> {
    log.match_indices(needle).map(|(i, _)| i).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_store_that_goes_silent_makes_the_leader_step_down_then_resume() {
    let (t, refs, proxy) = behind_proxy("net_store").await;
    // The shared checkpoint and the lease live in the archive database, behind the proxy.
    let mut watch = t
        .watch()
        .shared_store("solo")
        .envs(QUICK_WRITE_TIMEOUT)
        .env("ARCHIVE_URI", proxy.uri(&t.uri))
        .until("change stream open")
        .await;
    let (addr, load) = under_load(&t, refs, &watch).await;

    proxy.set_mode(Mode::Blackhole);
    let started = Instant::now();
    // The lease cannot be renewed either: the promise is to stop writing before it expires
    // (src/coordination/leadership.rs, keep), rather than to exit.
    watch.wait_for_log(15, "stepping down").await;
    let stepped_down = started.elapsed();
    let mut not_leading = None;
    while started.elapsed() < Duration::from_secs(15) {
        let answer = probe(&addr, "/health/ready").await;
        if answer.as_ref().is_some_and(|(code, body)| *code == 503 || body.contains("\"role\":\"standby\"")) {
            not_leading = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep_until((started + Duration::from_secs(15)).into()).await;
    assert!(watch.is_running(), "watch exited during the outage:\n{}", watch.tail());
    proxy.set_mode(Mode::Pass);
    let healed = Instant::now();
    eventually(30, "leadership taken again", || async { positions(&watch.stderr(), "leadership acquired").len() >= 2 })
        .await;
    let relead = healed.elapsed();
    drain(&t, load, &watch).await;
    eprintln!(
        "checkpoint store blackholed: stepped down after {stepped_down:?}, not leading per /health/ready \
         after {not_leading:?}, leader again {relead:?} after the heal"
    );
    assert!(not_leading.is_some(), "still ready as leader during the outage:\n{}", watch.tail());
    let checkpoint = shared_checkpoint(&t).await;
    assert!(checkpoint.get_i64("epoch").unwrap() >= 2, "{checkpoint}");
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_cut_off_from_the_cluster_is_replaced_and_stops_writing() {
    let (t, refs, proxy) = behind_proxy("net_leader").await;
    // The leader reaches source and archive through the proxy; the standby directly.
    let mut leader =
        t.watch().shared_store("leader").env("MONGODB_URI", proxy.uri(&t.uri)).until("change stream open").await;
    let mut standby = t.watch().shared_store("standby").until("standby: another instance holds the lease").await;
    let standby_addr = health_addr(&standby);
    let (leader_addr, load) = under_load(&t, refs, &leader).await;

    proxy.set_mode(Mode::Blackhole);
    let cut = Instant::now();
    standby.wait_for_log(20, "leadership acquired").await;
    let takeover = cut.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set_mode(Mode::Pass);
    let healed = Instant::now();
    // Once it can see the cluster again, the old leader finds the lease taken and stands by.
    let mut standing_by = None;
    while healed.elapsed() < Duration::from_secs(30) {
        if probe(&leader_addr, "/health/ready").await.is_some_and(|(_, body)| body.contains("\"role\":\"standby\"")) {
            standing_by = Some(healed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drain(&t, load, &standby).await;
    eprintln!(
        "leader cut off: standby took over after {takeover:?}; old leader standing by {standing_by:?} after the heal"
    );
    assert!(standing_by.is_some(), "the old leader does not stand by after the heal:\n{}", leader.tail());
    // It wrote nothing after it learnt it had lost the lease.
    let log = leader.stderr();
    let lost = ["stepping down", "the lease was taken over", "leadership lost"]
        .iter()
        .filter_map(|needle| positions(&log, needle).first().copied())
        .min()
        .unwrap_or_else(|| panic!("the old leader never noticed it lost the lease:\n{}", leader.tail()));
    assert!(
        !log[lost..].contains("batch archived"),
        "the old leader archived after losing the lease:\n{}\nthe standby:\n{}",
        leader.tail(),
        standby.tail()
    );
    let checkpoint = shared_checkpoint(&t).await;
    assert_eq!(checkpoint.get_i64("epoch").unwrap(), 2, "{checkpoint}");
    let metrics = common::unlabelled(&probe(&standby_addr, "/metrics").await.unwrap().1);
    assert!(metrics.contains("archiver_takeovers_total 1"), "{metrics}");
    assert_eq!(metric(&leader_addr, "archiver_leader").await, 0.0);
    leader.stop_ok().await;
    standby.stop_ok().await;
}

// --- slow networks ---

#[tokio::test(flavor = "multi_thread")]
async fn round_trips_of_200_ms_under_load_lose_and_duplicate_nothing() {
    let (t, refs, proxy) = behind_proxy("net_latency").await;
    // 100 ms each way: every round trip to the source and the archive takes 200 ms more.
    proxy.set_mode(Mode::Latency(Duration::from_millis(100)));
    let mut watch = t.watch().env("MONGODB_URI", proxy.uri(&t.uri)).until("change stream open").await;
    let (addr, load) = under_load(&t, refs, &watch).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (delivered, caught_up) = drain(&t, load, &watch).await;
    let batches = metric(&addr, "archiver_batches_total").await;
    eprintln!("200 ms round trips: {delivered} delivered, all archived {caught_up:?} after the load stopped, in {batches} batches");
    assert!(probe(&addr, "/health/ready").await.is_some_and(|(code, _)| code == 200), "not ready under latency");
    assert_eq!(metric(&addr, "archiver_orders_already_archived_total").await, 0.0, "replays under mere latency");
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_catch_up_rides_out_a_source_outage_instead_of_exiting() {
    // The fill's own reads (its stream's opening, the count, the cursor) were not retried: a
    // connection reset during a catch-up ended `watch` with exit 1.
    let (t, refs, proxy) = behind_proxy("fill_outage").await;
    for thousand in 0..20 {
        t.deliver(&refs, thousand * 1000..(thousand + 1) * 1000).await;
    }
    // A slow source, so that the catch-up is under way when the connections are reset.
    proxy.set_mode(Mode::Latency(Duration::from_millis(100)));
    let watch = t
        .watch()
        .envs(RIDE_OUT)
        .env("MONGODB_URI", proxy.uri(&t.uri))
        .env("BATCH_CHUNK_SIZE", "100")
        .env("BATCH_CONCURRENCY", "1")
        // Longer than the driver's own retry of a read waits for a server.
        .env("MONGODB_SERVER_SELECTION_TIMEOUT_MS", "1000")
        .args(["--catch-up"]);
    let mut watch = watch.until("starting from now").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(t.archive_len().await < 20_000, "the catch-up is still under way: {}", watch.stderr());
    proxy.set_mode(Mode::Reset);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set_mode(Mode::Pass);
    t.wait_archived_within(20_000, 180).await;
    watch.wait_for_log(60, "change stream open").await;
    assert!(watch.is_running(), "{}", watch.tail());
    t.assert_archive_matches_delivered().await;
    watch.stop_ok().await;
}
