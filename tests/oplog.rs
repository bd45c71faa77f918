//! Oplog headroom: `watch` exports the source oplog's window and how much longer it could stop
//! before its saved position leaves it, warns once when that falls under the threshold, and
//! `health` shows both; without the privilege to read `local`, it says so once and carries on.
//! Each test runs its own server with a small oplog (50 entries), as the lost-history test does.

mod common;

use std::time::Duration;

use common::{eventually, health_addr, http_get, OwnServer, TestEnv, Watcher};
use mongodb::bson::{doc, Document};
use mongodb::Client;
use serde_json::Value;

const CAPPED: &str = "--oplog-max-entries 50";

/// The value of the sample `name` in watch's /metrics, if it is there.
fn gauge(watch: &Watcher, name: &str) -> Option<f64> {
    let (status, body) = http_get(&health_addr(watch), "/metrics");
    assert_eq!(status, 200);
    let sample = |l: &str| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned);
    common::unlabelled(&body).lines().find_map(sample).map(|v| v.trim().parse().unwrap())
}

/// `archiver health` with `vars`: its exit code and JSON report.
fn health(t: &TestEnv, vars: &[(&str, &str)]) -> (Option<i32>, Value) {
    let out = t.archiver(&["health"]).envs(vars.iter().copied()).output().unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("health printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), report)
}

/// Writes that have nothing to do with orders, enough to roll a 50-entry oplog over.
async fn noise(t: &TestEnv, n: i32) {
    for i in 0..n {
        t.db.collection::<Document>("noise").insert_one(doc! { "n": i }).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_exports_the_window_and_headroom_and_health_shows_them() {
    let (_server, t, refs) = TestEnv::seeded_on_own_server("oplog_gauges", CAPPED).await;
    // This server's oplog is seconds old, so any headroom is below the 6 h default: a zero
    // threshold is never crossed by a position inside the oplog.
    let mut watch = t.watch().env("OPLOG_HEADROOM_WARN_SECS", "0").start().await;
    t.deliver(&refs, 0..3).await;
    t.wait_archived(3).await;
    eventually(15, "both oplog gauges on /metrics", || async {
        gauge(&watch, "archiver_oplog_headroom_seconds").is_some()
    })
    .await;
    let window = gauge(&watch, "archiver_oplog_window_seconds").expect("window gauge");
    let headroom = gauge(&watch, "archiver_oplog_headroom_seconds").expect("headroom gauge");
    assert!(window >= 0.0, "window {window}");
    // The position was saved a moment ago, after the oplog's first entry and before its last
    // (to within the second of `hello`'s last write date, and the time since the reading).
    assert!((0.0..=window + 5.0).contains(&headroom), "headroom {headroom}, window {window}");
    // At least one comparison with the threshold (one a second) after the gauges appeared.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = watch.stop_ok().await;
    assert!(!log.contains("OPLOG HEADROOM LOW"), "a position inside the oplog is not below 0 s:\n{log}");

    let (code, report) = health(&t, &[("OPLOG_HEADROOM_WARN_SECS", "0")]);
    assert_eq!(code, Some(0), "{report:#}");
    let oplog = &report["oplog"];
    assert_eq!(oplog["status"], "ok", "{report:#}");
    let window = oplog["window_seconds"].as_f64().expect("window_seconds");
    let headroom = oplog["headroom_seconds"].as_f64().expect("headroom_seconds");
    assert!(window >= 0.0 && (0.0..=window + 5.0).contains(&headroom), "{oplog:#}");
    let first = oplog["first"].as_str().expect("first").parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    let last = oplog["last"].as_str().expect("last").parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert!(first <= last, "{oplog:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn headroom_under_the_threshold_is_warned_once() {
    let (_server, t, refs) = TestEnv::seeded_on_own_server("oplog_warn", CAPPED).await;
    // No oplog of 50 entries covers 11 days: below the threshold from the first reading on.
    let mut watch = t.watch().env("OPLOG_HEADROOM_WARN_SECS", "999999").start().await;
    watch.wait_for_log(15, "OPLOG HEADROOM LOW").await;
    // New positions, and several more comparisons with the threshold, still below it.
    t.deliver(&refs, 0..3).await;
    t.wait_archived(3).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = watch.stop_ok().await;
    assert_eq!(log.matches("OPLOG HEADROOM LOW").count(), 1, "one warning per crossing:\n{log}");
    let line = log.lines().find(|l| l.contains("OPLOG HEADROOM LOW")).unwrap();
    assert!(line.contains("WARN") && line.contains("threshold_secs=999999"), "{line}");

    let (code, report) = health(&t, &[("OPLOG_HEADROOM_WARN_SECS", "999999")]);
    assert_eq!(code, Some(0), "a warning does not make the report unhealthy: {report:#}");
    assert_eq!(report["status"], "healthy", "{report:#}");
    assert_eq!(report["oplog"]["status"], "warning", "{report:#}");
    assert_eq!(report["oplog"]["warn_below_seconds"], 999999, "{report:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn headroom_shrinks_while_watch_is_stopped_until_the_position_leaves_the_oplog() {
    let (_server, t, refs) = TestEnv::seeded_on_own_server("oplog_shrinks", CAPPED).await;
    let mut watch = t.watch().start().await;
    t.deliver(&refs, 0..3).await;
    t.wait_archived(3).await;
    watch.stop_ok().await;
    let (_, before) = health(&t, &[]);
    let before = before["oplog"]["headroom_seconds"].as_f64().unwrap_or_else(|| panic!("{before:#}"));

    // Stopped: the oplog rolls on past the saved position.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    noise(&t, 100).await;
    t.prune_oplog().await;
    let (code, after) = health(&t, &[]);
    assert_eq!(code, Some(0), "{after:#}");
    let oplog = &after["oplog"];
    let headroom = oplog["headroom_seconds"].as_f64().unwrap_or_else(|| panic!("{after:#}"));
    assert!(headroom < before, "headroom {headroom} s after the oplog rolled, {before} s before");
    assert!(headroom < 0.0, "the position is out of a 50-entry oplog after 100 writes: {oplog:#}");
    assert_eq!(oplog["status"], "warning", "{oplog:#}");
    assert!(oplog["warning"].as_str().unwrap_or_default().contains("left the oplog"), "{oplog:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_privilege_to_read_local_watch_says_so_once_and_archives_on() {
    let server = OwnServer::start("--auth");
    // The first user is created through the localhost exception; the archiver's own user may
    // only read and write its database.
    let admin = Client::with_uri_str(&server.uri).await.unwrap();
    admin
        .database("admin")
        .run_command(doc! { "createUser": "admin", "pwd": "admin-pw", "roles": [{ "role": "root", "db": "admin" }] })
        .await
        .unwrap();
    let with_user = |user: &str, pwd: &str, source: &str| {
        server.uri.replacen("mongodb://", &format!("mongodb://{user}:{pwd}@"), 1).replacen(
            "/?",
            &format!("/?authSource={source}&"),
            1,
        )
    };
    let t = TestEnv::with_uri("oplog_noauth", with_user("admin", "admin-pw", "admin")).await;
    t.db.run_command(
        doc! { "createUser": "archiver", "pwd": "archiver-pw", "roles": [{ "role": "readWrite", "db": &t.db_name }] },
    )
    .await
    .unwrap();
    let restricted = with_user("archiver", "archiver-pw", &t.db_name);
    let refs = t.seed_references().await;

    let mut watch =
        t.watch().env("MONGODB_URI", restricted.as_str()).env("OPLOG_HEADROOM_WARN_SECS", "999999").start().await;
    watch.wait_for_log(15, "cannot read the oplog window").await;
    t.deliver(&refs, 0..3).await;
    t.wait_all_archived(3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = common::unlabelled(&http_get(&health_addr(&watch), "/metrics").1);
    assert!(!metrics.contains("archiver_oplog"), "no oplog series without the privilege:\n{metrics}");
    assert!(metrics.contains("archiver_orders_archived_total 3"), "{metrics}");
    let log = watch.stop_ok().await;
    assert_eq!(log.matches("cannot read the oplog window").count(), 1, "said once:\n{log}");
    assert!(log.contains("no privilege to read local.oplog.rs"), "{log}");
    assert!(!log.contains("OPLOG HEADROOM LOW"), "no headroom to warn about:\n{log}");

    let (code, report) = health(&t, &[("MONGODB_URI", restricted.as_str())]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["status"], "healthy", "{report:#}");
    assert_eq!(report["oplog"]["status"], "unavailable", "{report:#}");
    assert_eq!(report["oplog"]["reason"], "no privilege to read local.oplog.rs", "{report:#}");
    assert!(!report.to_string().contains("archiver-pw"), "no password in the report");
}

/// A quiet stream is not about to leave the oplog: its saved token advances with the oplog
/// (other collections' writes here; the servers' own no-op writes in production), so the token's
/// age stays small however long ago the last delivery was.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_stream_keeps_its_position_current() {
    let t = TestEnv::new("oplog_quiet").await;
    let refs = t.seed_references().await;
    let watch = t.watch().start().await;
    t.deliver(&refs, 0..1).await;
    t.wait_archived(1).await;
    // Seven seconds without a delivery, while the oplog moves on.
    for i in 0..35 {
        t.db.collection::<Document>("noise").insert_one(doc! { "n": i }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let age = gauge(&watch, "archiver_resume_token_age_seconds").expect("token age");
    assert!(age < 4.0, "the token's age counts from the last delivery ({age} s): {}", watch.tail());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_stream_whose_position_advances_is_not_reported_out_of_the_oplog() {
    // The saved position of an idle stream stands for the moment it was read up to, not for
    // the last delivery: `health` used to count the headroom from the delivery and report the
    // position gone from the oplog while `watch` was keeping it current.
    let (_server, t, refs) = TestEnv::seeded_on_own_server("oplog_quiet", CAPPED).await;
    let mut watch = t.watch().start().await;
    t.deliver(&refs, [0]).await;
    t.wait_archived(1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    noise(&t, 100).await;
    t.prune_oplog().await;
    // Past the once-a-second save of the idle stream's advancing position.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (code, report) = health(&t, &[("OPLOG_HEADROOM_WARN_SECS", "0")]);
    assert_eq!(code, Some(0), "{report:#}");
    let oplog = &report["oplog"];
    let headroom = oplog["headroom_seconds"].as_f64().unwrap_or_else(|| panic!("{report:#}"));
    assert!(headroom >= 0.0, "the idle position is current, yet {headroom} s: {oplog:#}");
    assert_ne!(oplog["status"], "warning", "{oplog:#}");
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oplog_still_filling_up_is_not_low_on_headroom() {
    // A fresh replica set: its oplog is seconds old, far under a one-hour threshold, but holds
    // 1 KB of its 1000 MB, so at this pace it drops nothing for days. SecantusDB keeps no
    // storage statistics: the proxy answers `$collStats` as mongod would.
    let (_server, t, refs) = TestEnv::seeded_on_own_server("oplog_filling", CAPPED).await;
    let wire = common::wire::Injector::start(common::proxy::upstream_of(&t.uri)).await;
    wire.answer_oplog_fill(1 << 10, 1000 << 20);
    // A window of at least a second (the newest entry's time has whole seconds).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let vars = [("MONGODB_URI", wire.uri(&t.uri)), ("OPLOG_HEADROOM_WARN_SECS", "3600".to_owned())];
    let mut watch = t.watch().envs(&vars).start().await;
    t.deliver(&refs, 0..3).await;
    t.wait_archived(3).await;
    eventually(15, "the headroom gauge", || async { gauge(&watch, "archiver_oplog_headroom_seconds").is_some() }).await;
    let window = gauge(&watch, "archiver_oplog_window_seconds").unwrap();
    let headroom = gauge(&watch, "archiver_oplog_headroom_seconds").unwrap();
    assert!(window < 3600.0 && headroom > 3600.0, "headroom {headroom}, window {window}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = watch.stop_ok().await;
    assert!(!log.contains("OPLOG HEADROOM LOW"), "an oplog still filling up is not low:\n{log}");
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (_, report) = health(&t, &vars);
    assert!(report["oplog"]["seconds_until_full"].as_f64().unwrap() > 0.0, "{report:#}");

    // The same oplog full (its fill unknown reads as full): the warning is back.
    wire.answer_oplog_fill(995 << 20, 1000 << 20);
    let mut watch = t.watch().envs(&vars).start().await;
    watch.wait_for_log(15, "OPLOG HEADROOM LOW").await;
    watch.stop_ok().await;
}
