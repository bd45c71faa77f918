//! Operating `watch` as a service: probes, metrics, the `health` command, systemd notify.

mod common;

use std::time::Duration;

use common::{eventually, health_addr, http_get, order, OwnServer, TestEnv};
use mongodb::bson::doc;

#[tokio::test(flavor = "multi_thread")]
async fn probes_and_metrics_report_the_stream() {
    let (t, refs) = TestEnv::seeded("probes").await;
    let mut watch = t.watch().start().await;
    let addr = health_addr(&watch);
    assert_eq!(http_get(&addr, "/health/live").0, 200);
    assert_eq!(http_get(&addr, "/health/startup").0, 200);
    let (code, body) = http_get(&addr, "/health/ready");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("ready"));
    let mut broken = order(&refs, 2, "livrée");
    broken.insert("client_id", mongodb::bson::oid::ObjectId::new());
    t.orders().insert_many([order(&refs, 1, "livrée"), broken]).await.unwrap();
    t.wait_archived(2).await;
    // The rows are in the archive before the write is counted: wait for the count.
    eventually(10, "the archived orders counted", || async {
        common::unlabelled(&http_get(&addr, "/metrics").1).contains("archiver_orders_archived_total 2")
    })
    .await;
    let (code, labelled) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    // Every series says which stream and partition it is of.
    let stream = format!("stream=\"{}.Commandes\",partition=\"0/1\"", t.db_name);
    assert!(labelled.contains(&format!("archiver_ready{{{stream}}} 1")), "{labelled}");
    let metrics = common::unlabelled(&labelled);
    for expected in [
        "archiver_orders_archived_total 2",
        "archiver_ready 1",
        "archiver_events_received_total 2",
        "archiver_anomalies_total 1",
        "archiver_batches_total",
        "archiver_batch_duration_seconds_count",
        "archiver_lag_seconds_count",
        "archiver_seconds_since_last_checkpoint",
        "archiver_resume_token_age_seconds",
        "archiver_reconnects_total 0",
        "archiver_build_info{version=\"",
    ] {
        assert!(metrics.contains(expected), "{expected} not in:\n{metrics}");
    }
    assert_eq!(http_get(&addr, "/nope").0, 404);
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_goes_503_while_the_database_is_down_and_back() {
    let server = OwnServer::start("");
    let uri = format!("{}&serverSelectionTimeoutMS=1000", server.uri);
    let t = TestEnv::with_uri("ready", uri).await;
    let refs = t.seed_references().await;
    let mut watch = t.watch().envs(&[("RETRY_MAX_ATTEMPTS", "60"), ("RETRY_MAX_DELAY_MS", "500")]).start().await;
    let addr = health_addr(&watch);
    assert_eq!(http_get(&addr, "/health/ready").0, 200);
    server.stop();
    eventually(30, "ready to turn 503", || async { http_get(&addr, "/health/ready").0 == 503 }).await;
    assert_eq!(http_get(&addr, "/health/live").0, 200, "alive while reconnecting");
    server.restart();
    eventually(30, "ready to come back", || async { http_get(&addr, "/health/ready").0 == 200 }).await;
    let client = mongodb::Client::with_uri_str(&server.uri).await.unwrap();
    let orders = client.database(&t.db_name).collection::<mongodb::bson::Document>("Commandes");
    orders.insert_one(order(&refs, 1, "livrée")).await.unwrap();
    let archive = client.database(&t.db_name).collection::<mongodb::bson::Document>("Commandes_archive");
    eventually(20, "delivery archived after the outage", || async {
        archive.count_documents(doc! {}).await.unwrap() == 1
    })
    .await;
    let metrics = common::unlabelled(&http_get(&addr, "/metrics").1);
    assert!(!metrics.contains("archiver_reconnects_total 0"), "{metrics}");
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_command_reports_components_as_json() {
    let (t, refs) = TestEnv::seeded("health").await;
    t.orders().insert_one(order(&refs, 1, "en_attente")).await.unwrap();
    let out = t.run(&["health"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["status"], "healthy");
    assert_eq!(report["source"]["status"], "ok");
    assert!(report["source"]["replica_set"].is_string(), "{report}");
    assert!(report["source"]["server_version"].is_string(), "{report}");
    assert_eq!(report["source"]["collections"]["Commandes"], true);
    assert_eq!(report["archive"]["present"], false);
    assert_eq!(report["resume_token"]["status"], "missing");

    t.watch().start().await.stop_ok().await;
    let out = t.run(&["health"]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["resume_token"]["status"], "ok");
    assert!(report["resume_token"]["age_seconds"].as_f64().unwrap() >= 0.0);

    std::fs::write(t.token_file(), "garbage").unwrap();
    let out = t.run(&["health"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["status"], "unhealthy");
    assert_eq!(report["resume_token"]["status"], "error");

    let out = t
        .archiver(&["health"])
        .env("MONGODB_URI", "mongodb://ops:T0pS3cret@127.0.0.1:1/?serverSelectionTimeoutMS=300")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // One line: the hosts (never the user info) and the cause.
    assert!(
        stdout.contains("unhealthy")
            && stdout.contains("cannot reach MongoDB at mongodb://127.0.0.1:1 (connection refused)"),
        "{stdout}"
    );
    assert!(!stdout.contains("T0pS3cret") && !String::from_utf8_lossy(&out.stderr).contains("T0pS3cret"));
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_notifications_ready_watchdog_stopping() {
    let t = TestEnv::new("notify").await;
    let socket_path = t.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut watch =
        t.watch().env("NOTIFY_SOCKET", socket_path.to_str().unwrap()).env("WATCHDOG_USEC", "400000").start().await;
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
        let n = socket.recv(&mut buf).expect("notification before timeout");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    watch.signal("TERM");
    while !seen.contains("STOPPING=1") {
        let n = socket.recv(&mut buf).expect("STOPPING before timeout");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(watch.wait(Duration::from_secs(20)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_tells_systemd_it_is_ready_and_keeps_the_watchdog_fed() {
    // Before: READY=1 only once leading, so under `Type=notify` every standby of the documented
    // HA setup was killed at its start timeout and restarted, forever.
    let t = TestEnv::new("notify_standby").await;
    let mut leader = t.watch().shared_store("a").until("change stream open").await;
    let socket_path = t.dir.path().join("standby.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut standby = t
        .watch()
        .shared_store("b")
        .env("NOTIFY_SOCKET", socket_path.to_str().unwrap())
        .env("WATCHDOG_USEC", "400000")
        .until("standby: another instance holds the lease")
        .await;
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(seen.contains("READY=1") && seen.matches("WATCHDOG=1").count() >= 3) {
        assert!(std::time::Instant::now() < deadline, "no READY=1 in 20 s: {seen:?}");
        let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("{e}; notified so far: {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    assert!(seen.contains("STATUS=standby"), "{seen}");
    standby.stop_ok().await;
    leader.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_settings_are_applied_and_validated_at_start() {
    let t = TestEnv::new("connsettings").await;
    t.db.create_collection("Commandes").await.unwrap();
    let ok = t
        .archiver(&["health"])
        .env("MONGODB_APP_NAME", "archiver-test")
        .env("MONGODB_MAX_POOL_SIZE", "4")
        .env("MONGODB_COMPRESSORS", "zstd,snappy")
        .env("MONGODB_CONNECT_TIMEOUT_MS", "2000")
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stdout));
    for (var, value, expected) in [
        ("MONGODB_MAX_POOL_SIZE", "lots", "lots"),
        ("MONGODB_COMPRESSORS", "lz4", "lz4"),
        ("MONGODB_TLS_CA_FILE", "/nonexistent/ca.pem", "/nonexistent/ca.pem"),
    ] {
        let out = t.archiver(&["watch"]).env(var, value).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(stderr.contains(expected), "{var}={value}: {stderr}");
    }
    let bad_uri = t.archiver(&["watch"]).env("MONGODB_URI", "mongodb://u:pw@h/?maxPoolSize=x").output().unwrap();
    let stderr = String::from_utf8_lossy(&bad_uri.stderr);
    assert_eq!(bad_uri.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid connection string") && !stderr.contains(":pw@"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_probe_asks_the_running_watch_not_the_databases() {
    // For a container's health check: a stalled or frozen `watch` is unhealthy, a database
    // outage that `watch` rides out is not its concern.
    let t = TestEnv::new("probe").await;
    let mut watch = t.watch().start().await;
    let addr = health_addr(&watch);
    let probe = |which: &str| {
        let out = t.archiver(&["health", "--probe", which]).env("HTTP_ADDR", &addr).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, said) = probe("live");
    assert_eq!(code, Some(0), "{said}");
    assert!(said.starts_with("200"), "{said}");
    assert_eq!(probe("ready").0, Some(0));
    watch.signal("STOP");
    let (code, said) = probe("live");
    watch.signal("CONT");
    assert_eq!(code, Some(1), "a frozen watch is not live: {said}");
    assert!(said.contains("did not answer"), "{said}");
    watch.stop_ok().await;
    let (code, said) = probe("live");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("does not answer"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_catch_up_at_start_asks_systemd_for_more_start_time_while_it_advances() {
    // A catch-up or gap-fill runs before the stream opens, hence before READY=1: under
    // `Type=notify` a long one was killed at the start timeout and started over, forever.
    let (t, refs) = TestEnv::seeded("notify_fill").await;
    for thousand in 0..5 {
        t.deliver(&refs, thousand * 1000..(thousand + 1) * 1000).await;
    }
    let socket_path = t.dir.path().join("fill.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut watch = t
        .watch()
        .env("NOTIFY_SOCKET", socket_path.to_str().unwrap())
        .env("BATCH_CHUNK_SIZE", "200")
        .args(["--catch-up"])
        .until("change stream open")
        .await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !seen.iter().any(|m: &String| m.contains("READY=1")) {
        let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("{e}; notified so far: {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let extended = seen.iter().position(|m| m.contains("EXTEND_TIMEOUT_USEC=")).expect("more start time asked for");
    let ready = seen.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(extended < ready, "{seen:?}");
    assert!(seen[extended].contains("STATUS=filling"), "{seen:?}");
    t.wait_all_archived(5000).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_catch_up_killed_midway_is_continued_by_the_next_start_not_begun_again() {
    // A catch-up saved its progress only at its end: killed by a start timeout (or anything
    // else) it began again at the next start, from the first order, forever.
    let (t, refs) = TestEnv::seeded("fill_continues").await;
    for thousand in 0..20 {
        t.deliver(&refs, thousand * 1000..(thousand + 1) * 1000).await;
    }
    let catch_up = t.watch().env("BATCH_CHUNK_SIZE", "200").env("BATCH_CONCURRENCY", "1").args(["--catch-up"]);
    let mut watch = catch_up.until("starting from now").await;
    // Killed once it has saved some progress (once a second), whatever the machine's pace.
    let saved_progress = || std::fs::read_to_string(t.token_file()).is_ok_and(|s| s.contains("\"after\": {"));
    eventually(120, "the catch-up under way, its progress saved", || async {
        t.archive_len().await >= 4000 && saved_progress()
    })
    .await;
    watch.kill().await;
    // A write the server had already received when the process died still lands.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = t.archive_len().await;
    assert!(before < 20_000, "killed midway ({before} archived)");

    // Restarted as a service manager would, without --catch-up: the fill goes on where it stopped.
    let mut watch = t.watch().env("BATCH_CHUNK_SIZE", "200").until("change stream open").await;
    assert!(watch.log_contains("continuing a fill"), "{}", watch.stderr());
    t.wait_all_archived(20_000).await;
    let log = watch.stop_ok().await;
    let filled = log.lines().find(|l| l.contains("archive filled")).unwrap_or_else(|| panic!("{log}"));
    let field = |name: &str| -> u64 {
        let value = filled.split(&format!(" {name}=")).nth(1).unwrap_or_else(|| panic!("{filled}"));
        value.split_whitespace().next().unwrap().parse().unwrap()
    };
    // Only what was done after the last saved progress (a second at most) is read again, not
    // everything done before the kill.
    assert!(field("already_archived") < before, "{filled} ({before} archived before the kill)");
    assert_eq!(field("newly_archived") + before, 20_000, "{filled}");
    // And a later start has nothing left to continue.
    let mut watch = t.watch().until("change stream open").await;
    assert!(!watch.log_contains("continuing a fill"), "{}", watch.stderr());
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn log_files_are_kept_for_the_retention_period_and_not_at_all_under_the_journal() {
    let (t, _refs) = TestEnv::seeded("log_retention").await;
    t.db.create_collection("Commandes").await.unwrap();
    let logs = t.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // Five old daily files, created in order a day apart as far as the appender can tell (it
    // goes by creation time), and a file of someone else's that retention must not touch.
    for day in 1..=5 {
        std::fs::write(logs.join(format!("archiver.2026-01-0{day}.log")), "old\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(logs.join("batch-cron.log"), "not ours\n").unwrap();
    let args = ["batch", "--date-from", "2026-01-01", "--date-to", "2026-01-02"];
    let out = t.archiver(&args).env("LOG_RETENTION_DAYS", "3").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut kept: Vec<String> =
        std::fs::read_dir(&logs).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    kept.sort();
    let today = format!("archiver.{}.log", chrono::Utc::now().format("%Y-%m-%d"));
    assert_eq!(kept, ["archiver.2026-01-04.log", "archiver.2026-01-05.log", today.as_str(), "batch-cron.log"]);

    // Under systemd (standard error kept by the journal) with LOG_DIR unset: no files at all;
    // unset elsewhere: ./logs.
    let cwd = t.dir.path().join("service");
    std::fs::create_dir_all(&cwd).unwrap();
    let unset = |journal: bool| {
        let mut cmd = t.archiver(&args);
        cmd.env_remove("LOG_DIR").current_dir(&cwd);
        if journal {
            cmd.env("JOURNAL_STREAM", "8:12345");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("batch"), "the log lines reach standard error");
        cwd.join("logs").exists()
    };
    assert!(!unset(true), "no log directory under the journal");
    assert!(unset(false), "./logs by default elsewhere");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_connection_string_says_which_variable_and_which_part_is_wrong() {
    let t = TestEnv::new("invalid_uri").await;
    let cases = [
        ("MONGODB_URI", "mongodb://archiver:s3cret@db1/?tls=maybe", "in the options (after ?)", "tls"),
        ("MONGODB_URI", "mongodb://archiver:s3cret@db1:notaport/", "in the host list", "port"),
        ("ARCHIVE_URI", "mongodb://archiver:s3cret@db1/?authMechanism=FOO", "in the options (after ?)", "FOO"),
    ];
    for (var, uri, part, reason) in cases {
        let out = t.archiver(&["batch", "--date-from", "2026-01-01"]).env(var, uri).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(line.contains(&format!("invalid connection string {var}")), "{line}");
        assert!(line.contains(part) && line.contains(reason), "{line}");
        assert!(!line.contains("Kind:") && !line.contains("labels:"), "the driver's debugging fields: {line}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
}
