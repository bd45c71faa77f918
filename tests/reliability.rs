//! The pipeline never stalls silently and no error drops an order: outages of the archive under
//! load, checkpoint saves that fail while the reader is ahead, stops during a gap-fill, standby
//! options, liveness, and which archive errors are the orders' fault.

mod common;

use std::time::{Duration, Instant};

use common::{deliver_steadily, eventually, health_addr, http_get, order, OwnServer, TestEnv, Watcher};
use mongodb::bson::{doc, Bson, Document};
use mongodb::{Client, Collection};
use tokio_util::sync::CancellationToken;

/// The archive collection of `t`'s database on another server.
async fn archive_on(server: &OwnServer, t: &TestEnv) -> Collection<Document> {
    Client::with_uri_str(&server.uri).await.unwrap().database(&t.db_name).collection("Commandes_archive")
}

/// Asserts that `archive` holds every delivered order of `t` exactly once, and nothing else.
async fn assert_exactly_the_delivered(t: &TestEnv, archive: &Collection<Document>) {
    let mut delivered: Vec<String> =
        t.orders().distinct("_id", doc! { "status": "livrée" }).await.unwrap().iter().map(Bson::to_string).collect();
    let mut archived: Vec<String> =
        archive.distinct("_id", doc! {}).await.unwrap().iter().map(Bson::to_string).collect();
    assert_eq!(archive.count_documents(doc! {}).await.unwrap() as usize, archived.len(), "duplicates");
    delivered.sort();
    archived.sort();
    assert_eq!(archived, delivered, "archive ids differ from delivered ids");
}

/// Sends a signal to the process whose pid is in `pid_file`.
fn signal_pid_file(pid_file: &std::path::Path, signal: &str) {
    let pid = std::fs::read_to_string(pid_file).unwrap();
    let ok = std::process::Command::new("kill").args([&format!("-{signal}"), pid.trim()]).status().unwrap();
    assert!(ok.success(), "kill -{signal} {pid}");
}

/// Settings that make an outage show within seconds in a test.
const QUICK_RETRIES: &[(&str, &str)] = &[
    ("BATCH_SIZE", "5"),
    ("RETRY_MAX_ATTEMPTS", "60"),
    ("RETRY_MAX_DELAY_MS", "1000"),
    ("MONGODB_SERVER_SELECTION_TIMEOUT_MS", "1000"),
    ("MONGODB_CONNECT_TIMEOUT_MS", "1000"),
    ("WRITE_TIMEOUT_MS", "3000"),
];

fn with_archive<'a>(server: &'a OwnServer, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = QUICK_RETRIES.to_vec();
    env.push(("ARCHIVE_URI", server.uri.as_str()));
    env.extend_from_slice(extra);
    env
}

/// What a test under load holds: the archive's own server, the test, its archive collection,
/// the watcher, and the load (its stop switch and task).
type UnderLoad = (OwnServer, TestEnv, Collection<Document>, Watcher, CancellationToken, tokio::task::JoinHandle<u32>);

/// A `watch` writing to an archive on a server of its own, archiving 100 deliveries a second.
async fn archiving_under_load_to_own_archive(name: &str) -> UnderLoad {
    let archive_server = OwnServer::start("");
    let t = TestEnv::new(name).await;
    let archive = archive_on(&archive_server, &t).await;
    let refs = t.seed_references().await;
    let watch = t.start_watch(&with_archive(&archive_server, &[])).await;
    let stop = CancellationToken::new();
    let load = deliver_steadily(&t, refs, Duration::from_millis(10), stop.clone());
    eventually(30, "archiving under load", || async { archive.count_documents(doc! {}).await.unwrap_or(0) > 20 }).await;
    (archive_server, t, archive, watch, stop, load)
}

/// Waits until `archive` holds every delivered order of `t`, up to `secs`.
async fn wait_all_archived(t: &TestEnv, archive: &Collection<Document>, secs: u64, watch: &Watcher) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let delivered = t.orders().count_documents(doc! { "status": "livrée" }).await.unwrap();
        let archived = archive.count_documents(doc! {}).await.unwrap_or(0);
        if archived >= delivered {
            return;
        }
        assert!(Instant::now() < deadline, "{archived} of {delivered} archived after {secs} s: {}", watch.stderr());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_outage_under_load_is_survived_and_watch_still_stops_on_sigterm() {
    let (archive_server, t, archive, mut watch, stop, load) =
        archiving_under_load_to_own_archive("archiveoutage").await;

    // The archive goes away while deliveries go on: the reader runs ahead and fills the channel.
    archive_server.stop();
    tokio::time::sleep(Duration::from_secs(6)).await;
    archive_server.restart();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let delivered = load.await.unwrap();
    wait_all_archived(&t, &archive, 60, &watch).await;
    eprintln!("recovered {} ms after the archive came back ({delivered} deliveries)", restarted.elapsed().as_millis());
    assert_exactly_the_delivered(&t, &archive).await;
    assert!(watch.log_contains("reopening the stream"), "the outage was seen: {}", watch.stderr());
    assert_eq!(watch.stop().await.code(), Some(0), "{}", watch.stderr());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_an_archive_outage_exits_0_and_loses_nothing() {
    let (archive_server, t, archive, mut watch, stop, load) = archiving_under_load_to_own_archive("termoutage").await;
    archive_server.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = Instant::now();
    watch.signal("TERM");
    let status = watch.wait(Duration::from_secs(20)).await;
    eprintln!("exited {} ms after SIGTERM", asked.elapsed().as_millis());
    assert_eq!(status.code(), Some(0), "{}", watch.stderr());
    stop.cancel();
    load.await.unwrap();

    archive_server.restart();
    let mut watch = t.start_watch(&with_archive(&archive_server, &[])).await;
    wait_all_archived(&t, &archive, 60, &watch).await;
    assert_exactly_the_delivered(&t, &archive).await;
    assert!(watch.stop().await.success());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_that_cannot_be_saved_under_load_exits_3() {
    let t = TestEnv::new("saveload").await;
    let refs = t.seed_references().await;
    let mut watch =
        t.start_watch(&[("BATCH_SIZE", "5"), ("RETRY_MAX_ATTEMPTS", "3"), ("RETRY_MAX_DELAY_MS", "200")]).await;
    let stop = CancellationToken::new();
    let load = deliver_steadily(&t, refs, Duration::from_millis(5), stop.clone());
    eventually(30, "archiving under load", || async { t.archive().count_documents(doc! {}).await.unwrap() > 20 }).await;
    // The token's directory replaced by a file: every save fails, whoever runs the test.
    let state = t.token_file().parent().unwrap().to_path_buf();
    let moved = state.with_file_name("state.moved");
    std::fs::rename(&state, &moved).unwrap();
    std::fs::write(&state, b"not a directory").unwrap();
    let status = watch.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(3), "{}", watch.stderr());
    stop.cancel();
    load.await.unwrap();

    std::fs::remove_file(&state).unwrap();
    std::fs::rename(&moved, &state).unwrap();
    let mut watch = t.start_watch(&[]).await;
    let delivered = t.orders().count_documents(doc! { "status": "livrée" }).await.unwrap();
    t.wait_archived(delivered).await;
    t.assert_archive_matches_delivered().await;
    assert!(watch.stop().await.success());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn liveness_fails_while_a_write_hangs_and_recovers_after() {
    let archive_server = OwnServer::start("");
    let t = TestEnv::new("liveness").await;
    let archive = archive_on(&archive_server, &t).await;
    let refs = t.seed_references().await;
    // The driver's own timeouts stay at their defaults, so the write really hangs for a while.
    let env =
        [("ARCHIVE_URI", archive_server.uri.as_str()), ("WRITE_TIMEOUT_MS", "30000"), ("LIVENESS_TIMEOUT_MS", "2000")];
    let mut watch = t.start_watch(&env).await;
    let addr = health_addr(&watch);
    t.orders().insert_one(order(&refs, 0, "livrée")).await.unwrap();
    eventually(30, "first order archived", || async { archive.count_documents(doc! {}).await.unwrap_or(0) == 1 }).await;
    assert_eq!(http_get(&addr, "/health/live").0, 200);

    // A frozen archive accepts connections and never answers: the write in flight hangs.
    let pid_file = archive_server.dir.path().join("secantusd.pid");
    signal_pid_file(&pid_file, "STOP");
    let frozen = Instant::now();
    t.orders().insert_one(order(&refs, 1, "livrée")).await.unwrap();
    eventually(20, "/health/live answers 503", || async { http_get(&addr, "/health/live").0 == 503 }).await;
    eprintln!("liveness failed {} ms after the archive froze", frozen.elapsed().as_millis());
    let (_, body) = http_get(&addr, "/health/live");
    assert!(body.contains("stalled"), "{body}");
    signal_pid_file(&pid_file, "CONT");
    eventually(60, "both orders archived", || async { archive.count_documents(doc! {}).await.unwrap_or(0) == 2 }).await;
    eventually(10, "/health/live answers 200 again", || async { http_get(&addr, "/health/live").0 == 200 }).await;
    assert_exactly_the_delivered(&t, &archive).await;
    assert!(watch.stop().await.success());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_on_another_unique_index_is_a_dead_letter_not_already_archived() {
    let t = TestEnv::new("uniqueidx").await;
    let refs = t.seed_references().await;
    t.archive()
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "numero_commande": 1 })
                .options(mongodb::options::IndexOptions::builder().unique(true).build())
                .build(),
        )
        .await
        .unwrap();
    let mut watch = t.start_watch(&[]).await;
    let first = order(&refs, 7, "livrée");
    t.orders().insert_one(first.clone()).await.unwrap();
    t.wait_archived(1).await;
    // Another order with the same number: not archived, and not silently counted as archived.
    let twin = order(&refs, 7, "livrée");
    let twin_id = twin.get_object_id("_id").unwrap();
    t.orders().insert_one(twin).await.unwrap();
    let errors = t.db.collection::<Document>("Commandes_archive_errors");
    eventually(20, "the twin is dead-lettered", || async {
        errors.count_documents(doc! { "order_id": twin_id }).await.unwrap() == 1
    })
    .await;
    let letter = errors.find_one(doc! { "order_id": twin_id }).await.unwrap().unwrap();
    assert_eq!(letter.get_i32("error_code").unwrap(), 11000, "{letter}");
    assert!(letter.get_str("reason").unwrap().contains("numero_commande"), "{letter}");
    // A replay of the first order is still "already archived", never a dead letter.
    t.orders()
        .update_one(
            doc! { "_id": first.get_object_id("_id").unwrap() },
            doc! { "$set": { "status": "livrée", "note": "replayed" } },
        )
        .await
        .unwrap();
    t.orders().insert_one(order(&refs, 8, "livrée")).await.unwrap();
    t.wait_archived(2).await;
    assert_eq!(errors.count_documents(doc! {}).await.unwrap(), 1);
    assert!(watch.stop().await.success());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_that_refuses_every_order_alike_stops_the_run_without_dead_letters() {
    let t = TestEnv::new("refuseall").await;
    let refs = t.seed_references().await;
    // A validator no archive document can pass: the archive's fault, not the orders'.
    t.db.run_command(doc! { "create": "Commandes_archive", "validator": { "no_such_field": { "$exists": true } } })
        .await
        .unwrap();
    t.orders().insert_many((0..20).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    let out = t.run(&["batch", "--date-from", "2020-01-01"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("refused every order"), "{}", out.stderr);
    let errors = t.db.collection::<Document>("Commandes_archive_errors");
    assert_eq!(errors.count_documents(doc! {}).await.unwrap(), 0, "no order was dead-lettered");
    assert_eq!(t.archive().count_documents(doc! {}).await.unwrap(), 0);

    // The same validator with one order that breaks it differently is still narrowed down.
    t.db.run_command(
        doc! { "collMod": "Commandes_archive", "validator": { "numero_commande": { "$type": "string" } } },
    )
    .await
    .unwrap();
    let mut odd = order(&refs, 99, "livrée");
    odd.insert("numero_commande", 99);
    t.orders().insert_one(odd).await.unwrap();
    let out = t.run(&["batch", "--date-from", "2020-01-01"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(t.archive().count_documents(doc! {}).await.unwrap(), 20);
    assert_eq!(errors.count_documents(doc! {}).await.unwrap(), 1);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_gap_fill_stops_instead_of_refilling_forever() {
    let server = OwnServer::start("--oplog-max-entries 50");
    let t = TestEnv::with_uri("fillstop", server.uri.clone()).await;
    let refs = t.seed_references().await;
    let mut watch = t.start_watch(&[]).await;
    t.orders().insert_one(order(&refs, 0, "livrée")).await.unwrap();
    t.wait_archived(1).await;
    assert!(watch.stop().await.success());
    // Far more than the oplog keeps, and enough to fill for a while.
    for chunk in 0..10u32 {
        t.orders().insert_many((0..1000).map(|n| order(&refs, 1 + chunk * 1000 + n, "livrée"))).await.unwrap();
    }
    t.client.database("admin").run_command(doc! { "secantusAdmin.pruneOplog": 1 }).await.unwrap();

    let mut watch = t.spawn_watch(&[], &[], "HISTORY LOST").await;
    watch.signal("TERM");
    let status = watch.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", watch.stderr());
    assert_eq!(watch.stderr().matches("HISTORY LOST").count(), 1, "no refill loop: {}", watch.stderr());

    // The next start fills again and finishes.
    let mut watch = t.spawn_watch(&[], &[], "archive filled").await;
    t.wait_archived(10_001).await;
    t.assert_archive_matches_delivered().await;
    assert!(watch.stop().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gap_fill_saves_the_time_its_position_was_taken() {
    let server = OwnServer::start("--oplog-max-entries 50");
    let t = TestEnv::with_uri("filltime", server.uri.clone()).await;
    let refs = t.seed_references().await;
    let mut watch = t.start_watch(&[]).await;
    t.orders().insert_one(order(&refs, 0, "livrée")).await.unwrap();
    t.wait_archived(1).await;
    assert!(watch.stop().await.success());
    t.orders().insert_many((1..3001).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    t.client.database("admin").run_command(doc! { "secantusAdmin.pruneOplog": 1 }).await.unwrap();

    let mut watch = t.spawn_watch(&[], &[], "archive filled").await;
    t.wait_archived(3001).await;
    assert!(watch.stop().await.success());
    let token: serde_json::Value = serde_json::from_str(&common::read(&t.token_file())).unwrap();
    let saved_position = chrono::DateTime::parse_from_rfc3339(token["last_event_wall_time"].as_str().unwrap()).unwrap();
    // Every filled document was written after the position was taken.
    let first_filled = t
        .archive()
        .find_one(doc! { "archive_source": "batch" })
        .sort(doc! { "archived_at": 1 })
        .await
        .unwrap()
        .unwrap();
    let first_filled = first_filled.get_datetime("archived_at").unwrap().timestamp_millis();
    assert!(
        saved_position.timestamp_millis() <= first_filled,
        "checkpoint time {saved_position} is after the fill began writing ({first_filled})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn first_leader_options_do_not_act_at_a_later_takeover() {
    let t = TestEnv::new("armed").await;
    let refs = t.seed_references().await;
    let shared = |name: &'static str| {
        vec![
            ("CHECKPOINT_STORE", "mongodb"),
            ("LEASE_TTL_MS", "3000"),
            ("LEASE_RENEW_MS", "500"),
            ("INSTANCE_ID", name),
        ]
    };
    let mut leader = t.spawn_watch(&[], &shared("a"), "change stream open").await;
    t.orders().insert_one(order(&refs, 0, "livrée")).await.unwrap();
    t.wait_archived(1).await;
    let mut standby = t.spawn_watch(&["--reset-token", "--start-at", "now"], &shared("b"), "standby").await;
    eventually(10, "the standby drops its first-leader options", || async {
        standby.log_contains("apply only to the first leader")
    })
    .await;
    leader.signal("KILL");
    leader.wait(Duration::from_secs(10)).await;
    // Delivered while nobody leads: the takeover must resume from the shared checkpoint.
    t.orders().insert_many((1..6).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    eventually(30, "the standby takes over", || async { standby.log_contains("leadership acquired") }).await;
    t.wait_archived(6).await;
    t.assert_archive_matches_delivered().await;
    assert!(standby.child.try_wait().unwrap().is_none(), "the standby must not exit: {}", standby.stderr());
    assert!(standby.stop().await.success());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_the_byte_bound_is_written_in_slices_and_saved_once() {
    let t = TestEnv::new("bytebound").await;
    let refs = t.seed_references().await;
    // About 1 KB per archive document: 64 KiB holds about 60 of them.
    let mut watch = t.start_watch(&[("BATCH_MAX_BYTES", "65536"), ("BATCH_MAX_WAIT_MS", "1000")]).await;
    t.orders().insert_one(order(&refs, 0, "livrée")).await.unwrap();
    t.wait_archived(1).await;
    t.orders().insert_many((1..401).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    t.wait_archived(401).await;
    t.assert_archive_matches_delivered().await;
    let log = watch.stderr();
    let sliced = log
        .lines()
        .filter(|l| l.contains("batch archived"))
        .filter_map(|l| l.split("slices=").nth(1)?.split_whitespace().next()?.parse::<usize>().ok())
        .max()
        .unwrap();
    assert!(sliced >= 4, "a 400-order batch of ~1 KB documents under a 64 KiB bound: {log}");
    assert!(watch.stop().await.success());
    // Restarted, nothing is replayed: the token was saved after the last slice.
    let mut watch = t.start_watch(&[]).await;
    t.orders().insert_one(order(&refs, 999, "livrée")).await.unwrap();
    t.wait_archived(402).await;
    let replayed =
        watch.stderr().lines().filter(|l| l.contains("batch archived")).any(|l| !l.contains("already_archived=0 "));
    assert!(!replayed, "{}", watch.stderr());
    assert!(watch.stop().await.success());
    t.cleanup().await;
}
