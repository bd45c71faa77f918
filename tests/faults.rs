//! Never lose, never duplicate: lost history, server restarts, kills, unwritable tokens, two
//! instances, invalidation, explicit start positions, dead letters.

mod common;

use std::time::Duration;

use common::{eventually, order, Delivery, Load, Pace, TestEnv};
use mongodb::bson::{doc, Document};

#[tokio::test(flavor = "multi_thread")]
async fn lost_history_is_filled_automatically() {
    let (_server, t, refs) = TestEnv::seeded_on_own_server("lost", "--oplog-max-entries 50").await;
    let mut watch = t.watch().start().await;
    t.deliver(&refs, 0..5).await;
    t.wait_archived(5).await;
    watch.stop_ok().await;

    // While it is down, far more changes than the oplog keeps, some of them deliveries.
    let pending: Vec<Document> = (100..160).map(|n| order(&refs, n, "en_livraison")).collect();
    t.orders().insert_many(pending.clone()).await.unwrap();
    for o in pending.iter().take(30) {
        t.orders()
            .update_one(
                doc! { "_id": o.get_object_id("_id").unwrap() },
                doc! { "$set": { "status": "livrée", "date_livraison": mongodb::bson::DateTime::now() } },
            )
            .await
            .unwrap();
    }
    for n in 0..100 {
        t.db.collection::<Document>("noise").insert_one(doc! { "n": n }).await.unwrap();
    }
    t.prune_oplog().await;

    let mut watch = t.watch().start().await;
    t.wait_all_archived(35).await;
    assert!(watch.log_contains("HISTORY LOST"), "{}", watch.stderr());
    assert!(watch.log_contains("archive filled"), "{}", watch.stderr());
    // And it streams again afterwards, from a position it can resume.
    t.deliver(&refs, [500]).await;
    t.wait_archived(36).await;
    watch.stop_ok().await;
    let mut watch = t.watch().start().await;
    t.deliver(&refs, [501]).await;
    t.wait_all_archived(37).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn database_restart_mid_stream_loses_nothing() {
    let (server, mut t, refs) = TestEnv::seeded_on_own_server("dbrestart", "").await;
    let mut watch = t.watch().envs(&[("RETRY_MAX_ATTEMPTS", "30"), ("RETRY_MAX_DELAY_MS", "1000")]).start().await;
    t.deliver(&refs, 0..10).await;
    t.wait_archived(10).await;
    server.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart();
    t.reconnect().await;
    t.deliver(&refs, 10..30).await;
    t.wait_all_archived(30).await;
    // The driver's own resume or our backoff may absorb the outage; either way watch stays up.
    assert!(watch.is_running(), "watch must survive the restart: {}", watch.stderr());
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_sigkills_during_steady_deliveries_lose_and_duplicate_nothing() {
    let (t, refs) = TestEnv::seeded("kills").await;
    // The first start records the position; every delivery after it must be archived.
    t.watch().start().await.stop_ok().await;
    let load = Load::start(&t, refs, Delivery::Updated, Pace::Pause(Duration::from_millis(5)));
    for round in 0..20u64 {
        let mut watch = t.watch().env("BATCH_SIZE", "20").start().await;
        tokio::time::sleep(Duration::from_millis(100 + (round * 37) % 300)).await;
        watch.kill().await;
    }
    let delivered = load.finish().await;
    assert!(delivered > 100, "only {delivered} deliveries during the test");
    let mut watch = t.watch().start().await;
    t.wait_all_archived(u64::from(delivered)).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unwritable_token_never_runs_ahead_of_the_archive() {
    let (t, refs) = TestEnv::seeded("unwritable").await;
    let mut watch = t.watch().start().await;
    t.deliver(&refs, [1]).await;
    t.wait_archived(1).await;
    // The stream's position also moves past the archive's own write (same database), and is
    // saved within a second: past that, the next save is the next batch's.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let saved = std::fs::read_to_string(t.token_file()).unwrap();
    let moved = t.block_token_saves();
    t.deliver(&refs, [2]).await;
    let status = watch.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(3), "{}", watch.stderr());
    assert!(watch.log_contains("cannot write the resume token file"), "{}", watch.stderr());
    assert!(watch.log_contains("holding new batches"), "retries first: {}", watch.stderr());
    let kept = moved.join(t.token_file().file_name().unwrap());
    assert_eq!(std::fs::read_to_string(kept).unwrap(), saved, "token must not advance");
    assert_eq!(t.archive_len().await, 2, "the batch itself was archived before the save");

    t.unblock_token_saves();
    let mut watch = t.watch().start().await;
    t.deliver(&refs, [3]).await;
    t.wait_all_archived(3).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_on_the_same_token_file_refuses_to_start() {
    let t = TestEnv::new("twice").await;
    let mut first = t.watch().start().await;
    let second = t.run(&["watch"]);
    assert_eq!(second.status.code(), Some(5), "{}", second.stderr);
    assert!(second.stderr.contains("already running"), "{}", second.stderr);
    assert!(first.is_running());
    first.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_collection_stops_with_exit_code_4() {
    let (t, refs) = TestEnv::seeded("invalidate").await;
    let mut watch = t.watch().start().await;
    t.deliver(&refs, [1]).await;
    t.wait_archived(1).await;
    t.orders().drop().await.unwrap();
    let status = watch.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(4), "{}", watch.stderr());
    assert!(watch.log_contains("invalidated"), "{}", watch.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn start_positions_are_explicit() {
    let (t, refs) = TestEnv::seeded("start").await;
    t.deliver(&refs, [1]).await;
    // A token exists: --start-at is refused rather than silently ignored.
    t.watch().start().await.stop_ok().await;
    let out = t.run(&["watch", "--start-at", "now"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--reset-token"), "{}", out.stderr);
    let out = t.run(&["watch", "--reset-token", "--start-at", "last week"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);

    // Delivered while stopped, then an explicit reset: those are skipped, as asked...
    t.deliver(&refs, [2]).await;
    let mut watch = t.watch().args(["--reset-token"]).start().await;
    assert!(watch.log_contains("resume token reset"), "{}", watch.stderr());
    t.deliver(&refs, [3]).await;
    t.wait_archived(1).await;
    watch.stop_ok().await;
    // ...and --catch-up archives every delivered order still missing.
    let mut watch = t.watch().args(["--catch-up"]).start().await;
    t.wait_all_archived(3).await;
    assert!(watch.log_contains("catch-up"), "{}", watch.stderr());
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_the_archive_refuses_go_to_dead_letters_and_the_stream_goes_on() {
    let (t, refs) = TestEnv::seeded("deadletter").await;
    // A unique index of the archive that the refused order collides on: it cannot be stored as
    // it is, whatever the archive's rules.
    t.unique_archive_index("numero_commande").await;
    // A stray archive document holds the number of the refused order.
    t.archive().insert_one(doc! { "_id": "stray", "numero_commande": "CMD-000001" }).await.unwrap();
    let mut watch = t.watch().start().await;
    let refused = order(&refs, 1, "livrée");
    let refused_id = refused.get_object_id("_id").unwrap();
    t.orders().insert_many([order(&refs, 2, "livrée"), refused, order(&refs, 3, "livrée")]).await.unwrap();
    t.wait_archived(3).await;
    let errors = t.db.collection::<Document>("Commandes_archive_errors");
    eventually(20, "dead letter recorded", || async { errors.count_documents(doc! {}).await.unwrap() == 1 }).await;
    let letter = errors.find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!(letter.get_object_id("order_id").unwrap(), refused_id);
    assert_eq!(letter.get_i32("error_code").unwrap(), 11000, "{letter}");
    assert!(letter.get_str("reason").is_ok());
    assert!(letter.get_i32("attempts").unwrap() >= 1);
    assert!(letter.get_datetime("event_time").is_ok(), "the delivery event's time: {letter}");
    t.deliver(&refs, [4]).await;
    t.wait_archived(4).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_orders_are_archived_or_dead_lettered_never_dropped() {
    use mongodb::bson::{oid::ObjectId, Bson};
    let (t, refs) = TestEnv::seeded("huge").await;
    // A dish whose long description makes each enriched item ~400 bytes.
    let long_dish = ObjectId::new();
    t.db.collection::<Document>("Menu")
        .insert_one(doc! { "_id": long_dish, "nom": "x".repeat(350), "prix": 1.0 })
        .await
        .unwrap();
    let mut watch = t.watch().start().await;
    // 5,000 items: large but fine.
    let mut big = order(&refs, 1, "livrée");
    big.insert(
        "items",
        (0..5000).map(|_| Bson::Document(doc! { "menu_id": refs.menu[0], "quantite": 1 })).collect::<Vec<_>>(),
    );
    // 60,000 items: about 3 MB as an order, over 16 MB once enriched.
    let mut too_big = order(&refs, 2, "livrée");
    too_big.insert(
        "items",
        (0..60_000).map(|_| Bson::Document(doc! { "menu_id": long_dish, "quantite": 2 })).collect::<Vec<_>>(),
    );
    let too_big_id = too_big.get_object_id("_id").unwrap();
    t.orders().insert_many([big.clone(), too_big, order(&refs, 3, "livrée")]).await.unwrap();
    // Enriching the oversized order again at each step of the bisection takes a debug build
    // tens of seconds on a loaded machine.
    t.wait_archived_within(2, 120).await;
    let errors = t.db.collection::<Document>("Commandes_archive_errors");
    eventually(60, "oversized order dead-lettered", || async {
        errors.count_documents(doc! { "order_id": too_big_id }).await.unwrap() == 1
    })
    .await;
    // Refused before it is sent, with its size, and counted.
    let letter = errors.find_one(doc! { "order_id": too_big_id }).await.unwrap().unwrap();
    assert!(letter.get_i64("size_bytes").unwrap_or_default() > 16 * 1024 * 1024, "{letter}");
    assert!(letter.get_str("reason").unwrap().contains("over the archive's limit"), "{letter}");
    let metrics = common::unlabelled(&common::http_get(&common::health_addr(&watch), "/metrics").1);
    assert!(metrics.contains("archiver_orders_too_large_total 1"), "{metrics}");
    let archived = t.archive().find_one(doc! { "_id": big.get_object_id("_id").unwrap() }).await.unwrap().unwrap();
    assert_eq!(archived.get_array("items").unwrap().len(), 5000);
    assert!(archived.get_array("anomalies").unwrap().is_empty());
    // The stream goes on past it.
    t.deliver(&refs, [4]).await;
    t.wait_archived(3).await;
    assert!(watch.log_contains("dead-letter"), "{}", watch.stderr());
    watch.stop_ok().await;
}
