//! The pipeline never stalls silently and no error drops an order: outages of the archive under
//! load, checkpoint saves that fail while the reader is ahead, stops during a gap-fill, standby
//! options, liveness, and which archive errors are the orders' fault.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, health_addr, http_get, order, Delivery, Load, OwnServer, Pace, Refs, TestEnv, Watcher};
use mongodb::bson::{doc, Document};
use mongodb::{Client, Collection};

/// The archive collection of `t`'s database on another server.
async fn archive_on(server: &OwnServer, t: &TestEnv) -> Collection<Document> {
    Client::with_uri_str(&server.uri).await.unwrap().database(&t.db_name).collection("Commandes_archive")
}

/// Creates `t`'s archive collection with a validator no archive document can pass: a refusal of
/// the archive's own, never an order's fault.
async fn refuse_every_archive_document(t: &TestEnv) {
    let validator = doc! { "no_such_field": { "$exists": true } };
    t.db.run_command(doc! { "create": "Commandes_archive", "validator": validator }).await.unwrap();
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

/// A `watch` of `t` writing to its archive on `server`, retrying quickly.
async fn watch_with_archive_on(t: &TestEnv, server: &OwnServer) -> Watcher {
    t.watch().envs(QUICK_RETRIES).env("ARCHIVE_URI", &server.uri).start().await
}

/// What a test under load holds: the archive's own server, the test, its archive collection,
/// the watcher, and the load. (Dropped in reverse: the watcher and the load stop first.)
type UnderLoad = (OwnServer, TestEnv, Collection<Document>, Watcher, Load);

/// A `watch` writing to an archive on a server of its own, archiving 100 deliveries a second.
async fn archiving_under_load_to_own_archive(name: &str) -> UnderLoad {
    let archive_server = OwnServer::start("");
    let (t, refs) = TestEnv::seeded(name).await;
    let archive = archive_on(&archive_server, &t).await;
    let watch = watch_with_archive_on(&t, &archive_server).await;
    let load = Load::start(&t, refs, Delivery::Inserted, Pace::Pause(Duration::from_millis(10)));
    eventually(30, "archiving under load", || async { archive.count_documents(doc! {}).await.unwrap_or(0) > 20 }).await;
    (archive_server, t, archive, watch, load)
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
    let (archive_server, t, archive, mut watch, load) = archiving_under_load_to_own_archive("archiveoutage").await;

    // The archive goes away while deliveries go on: the reader runs ahead and fills the channel.
    archive_server.stop();
    tokio::time::sleep(Duration::from_secs(6)).await;
    archive_server.restart();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = load.finish().await;
    wait_all_archived(&t, &archive, 60, &watch).await;
    eprintln!("recovered {} ms after the archive came back ({delivered} deliveries)", restarted.elapsed().as_millis());
    t.assert_delivered_in(&archive).await;
    assert!(watch.log_contains("reopening the stream"), "the outage was seen: {}", watch.stderr());
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_an_archive_outage_exits_0_and_loses_nothing() {
    let (archive_server, t, archive, mut watch, load) = archiving_under_load_to_own_archive("termoutage").await;
    archive_server.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = Instant::now();
    watch.signal("TERM");
    let status = watch.wait(Duration::from_secs(20)).await;
    eprintln!("exited {} ms after SIGTERM", asked.elapsed().as_millis());
    assert_eq!(status.code(), Some(0), "{}", watch.stderr());
    load.finish().await;

    archive_server.restart();
    let mut watch = watch_with_archive_on(&t, &archive_server).await;
    wait_all_archived(&t, &archive, 60, &watch).await;
    t.assert_delivered_in(&archive).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_that_cannot_be_saved_under_load_exits_3() {
    let (t, refs) = TestEnv::seeded("saveload").await;
    let mut watch = t
        .watch()
        .envs(&[("BATCH_SIZE", "5"), ("RETRY_MAX_ATTEMPTS", "3"), ("RETRY_MAX_DELAY_MS", "200")])
        .start()
        .await;
    let load = Load::start(&t, refs, Delivery::Inserted, Pace::Pause(Duration::from_millis(5)));
    eventually(30, "archiving under load", || async { t.archive_len().await > 20 }).await;
    t.block_token_saves();
    let status = watch.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(3), "{}", watch.stderr());
    load.finish().await;

    t.unblock_token_saves();
    let mut watch = t.watch().start().await;
    let delivered = t.orders().count_documents(doc! { "status": "livrée" }).await.unwrap();
    t.wait_all_archived(delivered).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn liveness_fails_while_a_write_hangs_and_recovers_after() {
    let archive_server = OwnServer::start("");
    let (t, refs) = TestEnv::seeded("liveness").await;
    let archive = archive_on(&archive_server, &t).await;
    // The driver's own timeouts stay at their defaults, so the write really hangs for a while.
    let env =
        [("ARCHIVE_URI", archive_server.uri.as_str()), ("WRITE_TIMEOUT_MS", "30000"), ("LIVENESS_TIMEOUT_MS", "2000")];
    let mut watch = t.watch().envs(&env).start().await;
    let addr = health_addr(&watch);
    t.deliver(&refs, [0]).await;
    eventually(30, "first order archived", || async { archive.count_documents(doc! {}).await.unwrap_or(0) == 1 }).await;
    assert_eq!(http_get(&addr, "/health/live").0, 200);

    // A frozen archive accepts connections and never answers: the write in flight hangs.
    let pid_file = archive_server.dir.path().join("secantusd.pid");
    signal_pid_file(&pid_file, "STOP");
    let frozen = Instant::now();
    t.deliver(&refs, [1]).await;
    eventually(20, "/health/live answers 503", || async { http_get(&addr, "/health/live").0 == 503 }).await;
    eprintln!("liveness failed {} ms after the archive froze", frozen.elapsed().as_millis());
    let (_, body) = http_get(&addr, "/health/live");
    assert!(body.contains("stalled"), "{body}");
    signal_pid_file(&pid_file, "CONT");
    eventually(60, "both orders archived", || async { archive.count_documents(doc! {}).await.unwrap_or(0) == 2 }).await;
    eventually(10, "/health/live answers 200 again", || async { http_get(&addr, "/health/live").0 == 200 }).await;
    t.assert_delivered_in(&archive).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_on_another_unique_index_is_a_dead_letter_not_already_archived() {
    let (t, refs) = TestEnv::seeded("uniqueidx").await;
    t.unique_archive_index("numero_commande").await;
    let mut watch = t.watch().start().await;
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
    t.deliver(&refs, [8]).await;
    t.wait_archived(2).await;
    assert_eq!(errors.count_documents(doc! {}).await.unwrap(), 1);
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_that_refuses_every_order_alike_stops_the_run_without_dead_letters() {
    let (t, refs) = TestEnv::seeded("refuseall").await;
    refuse_every_archive_document(&t).await;
    t.deliver(&refs, 0..20).await;
    let out = t.run(&["batch", "--date-from", "2020-01-01"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let said = out.stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
    assert!(said.contains("the archive refuses the orders on its own account"), "{}", out.stderr);
    assert!(said.contains("20 of the documents refused: Document failed validation (code 121)"), "{said}");
    let errors = t.db.collection::<Document>("Commandes_archive_errors");
    assert_eq!(errors.count_documents(doc! {}).await.unwrap(), 0, "no order was dead-lettered");
    assert_eq!(t.archive_len().await, 0);

    // A validator that one order breaks is the archive's rule all the same: nothing is
    // dead-lettered, the run stops.
    t.db.run_command(
        doc! { "collMod": "Commandes_archive", "validator": { "numero_commande": { "$type": "string" } } },
    )
    .await
    .unwrap();
    let mut odd = order(&refs, 99, "livrée");
    odd.insert("numero_commande", 99);
    t.orders().insert_one(odd).await.unwrap();
    let out = t.run(&["batch", "--date-from", "2020-01-01"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert_eq!(errors.count_documents(doc! {}).await.unwrap(), 0, "no order was dead-lettered");

    // An order that cannot be stored as it is (its number taken by another order, on a unique
    // index of the archive) is narrowed down and dead-lettered, the others archived.
    t.db.run_command(doc! { "collMod": "Commandes_archive", "validator": {} }).await.unwrap();
    t.unique_archive_index("numero_commande").await;
    // A stray archive document holds the number of the odd order.
    t.archive().insert_one(doc! { "_id": "stray", "numero_commande": 99 }).await.unwrap();
    let out = t.run(&["batch", "--date-from", "2020-01-01"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(t.archive_len().await, 21, "the 20 orders and the stray document");
    assert_eq!(errors.count_documents(doc! {}).await.unwrap(), 1);
    let letter = errors.find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!(letter.get_i32("error_code").unwrap(), 11000, "{letter}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_validator_that_refuses_every_order_holds_them_at_light_load_until_it_is_lifted() {
    // Before: batches of one were dead-lettered one by one (the "whole batch refused alike"
    // rule needed two orders), the position moved past them, and none was ever archived.
    let (t, refs) = TestEnv::seeded("refuselight").await;
    refuse_every_archive_document(&t).await;
    let mut watch = t.watch().env("RETRY_MAX_DELAY_MS", "500").start().await;
    let health = health_addr(&watch);
    for n in 0..5 {
        t.deliver(&refs, [n]).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let errors = t.db.collection::<Document>("Commandes_archive_errors");
    assert_eq!(errors.count_documents(doc! {}).await.unwrap(), 0, "no order dead-lettered: {}", watch.stderr());
    assert_eq!(t.archive_len().await, 0);
    assert!(watch.is_running(), "{}", watch.stderr());
    let (status, body) = http_get(&health, "/health/ready");
    assert_eq!(status, 503, "{body}");
    assert!(watch.log_contains("the archive refuses the batch"), "{}", watch.stderr());

    t.db.run_command(doc! { "collMod": "Commandes_archive", "validator": {} }).await.unwrap();
    t.wait_all_archived(5).await;
    eventually(20, "ready again", || async { http_get(&health, "/health/ready").0 == 200 }).await;
    assert_eq!(errors.count_documents(doc! {}).await.unwrap(), 0);
    watch.stop_ok().await;
    t.assert_archive_matches_delivered().await;
}

/// A server of its own keeping only 50 oplog entries, where a `watch` archived one order and
/// stopped: what is delivered next can be pruned from its history.
async fn archived_once_on_a_short_oplog(name: &str) -> (OwnServer, TestEnv, Refs) {
    let (server, t, refs) = TestEnv::seeded_on_own_server(name, "--oplog-max-entries 50").await;
    let mut watch = t.watch().start().await;
    t.deliver(&refs, [0]).await;
    t.wait_archived(1).await;
    watch.stop_ok().await;
    (server, t, refs)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_gap_fill_stops_instead_of_refilling_forever() {
    let (_server, t, refs) = archived_once_on_a_short_oplog("fillstop").await;
    // Far more than the oplog keeps, and enough to fill for a while.
    for chunk in 0..10u32 {
        t.deliver(&refs, (0..1000).map(|n| 1 + chunk * 1000 + n)).await;
    }
    t.prune_oplog().await;

    let mut watch = t.watch().until("HISTORY LOST").await;
    watch.signal("TERM");
    let status = watch.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", watch.stderr());
    assert_eq!(watch.stderr().matches("HISTORY LOST").count(), 1, "no refill loop: {}", watch.stderr());

    // The next start fills again and finishes.
    let mut watch = t.watch().until("archive filled").await;
    t.wait_all_archived(10_001).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gap_fill_saves_the_time_its_position_was_taken() {
    // The archive on a server of its own: the fill's writes must not push its own starting
    // position out of the source's 50-entry oplog (they would in one server, and the fill would
    // run again from a later position).
    let (_server, t, refs) = TestEnv::seeded_on_own_server("filltime", "--oplog-max-entries 50").await;
    let archive_server = OwnServer::start("");
    let archive = archive_on(&archive_server, &t).await;
    let watch = || t.watch().env("ARCHIVE_URI", &archive_server.uri);
    let mut first = watch().start().await;
    t.deliver(&refs, [0]).await;
    eventually(30, "the first order archived", || async { archive.count_documents(doc! {}).await.unwrap() == 1 }).await;
    first.stop_ok().await;
    t.deliver(&refs, 1..3001).await;
    t.prune_oplog().await;

    let mut watch = watch().until("archive filled").await;
    wait_all_archived(&t, &archive, 60, &watch).await;
    watch.stop_ok().await;
    assert_eq!(watch.stderr().matches("HISTORY LOST").count(), 1, "{}", watch.stderr());
    let token: serde_json::Value = serde_json::from_str(&common::read(&t.token_file())).unwrap();
    let saved_position = chrono::DateTime::parse_from_rfc3339(token["last_event_wall_time"].as_str().unwrap()).unwrap();
    // Every filled document was written after the position was taken.
    let first_filled =
        archive.find_one(doc! { "archive_source": "batch" }).sort(doc! { "archived_at": 1 }).await.unwrap().unwrap();
    let first_filled = first_filled.get_datetime("archived_at").unwrap().timestamp_millis();
    assert!(
        saved_position.timestamp_millis() <= first_filled,
        "checkpoint time {saved_position} is after the fill began writing ({first_filled}): {token}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn first_leader_options_do_not_act_at_a_later_takeover() {
    let (t, refs) = TestEnv::seeded("armed").await;
    let mut leader = t.watch().shared_store("a").until("change stream open").await;
    t.deliver(&refs, [0]).await;
    t.wait_archived(1).await;
    let mut standby = t.watch().shared_store("b").args(["--reset-token", "--start-at", "now"]).until("standby").await;
    // The standby drops its first-leader options.
    standby.wait_for_log(10, "apply only to the first leader").await;
    leader.kill().await;
    // Delivered while nobody leads: the takeover must resume from the shared checkpoint.
    t.deliver(&refs, 1..6).await;
    standby.wait_for_log(30, "leadership acquired").await;
    t.wait_all_archived(6).await;
    assert!(standby.is_running(), "the standby must not exit: {}", standby.stderr());
    standby.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_the_byte_bound_is_written_in_slices_and_saved_once() {
    let (t, refs) = TestEnv::seeded("bytebound").await;
    // About 1 KB per archive document: 64 KiB holds about 60 of them.
    let mut watch = t.watch().envs(&[("BATCH_MAX_BYTES", "65536"), ("BATCH_MAX_WAIT_MS", "1000")]).start().await;
    t.deliver(&refs, [0]).await;
    t.wait_archived(1).await;
    t.deliver(&refs, 1..401).await;
    t.wait_all_archived(401).await;
    let sliced = watch.batch_field("slices").into_iter().max().unwrap();
    assert!(sliced >= 4, "a 400-order batch of ~1 KB documents under a 64 KiB bound: {}", watch.stderr());
    watch.stop_ok().await;
    // Restarted, nothing is replayed: the token was saved after the last slice.
    let mut watch = t.watch().start().await;
    t.deliver(&refs, [999]).await;
    t.wait_archived(402).await;
    let replayed = watch.batch_field("already_archived");
    assert!(replayed.iter().all(|&n| n == 0), "{}", watch.stderr());
    watch.stop_ok().await;
}
