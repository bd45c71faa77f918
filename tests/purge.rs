//! `archiver purge` against a real server: only archived, unchanged, old-enough delivered orders
//! leave the source; everything else is kept and reported; a concurrent edit is never lost; a
//! killed purge loses nothing and a rerun finishes.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{order, TestEnv};
use mongodb::bson::{doc, DateTime, Document};

/// The bound of these tests: every `order()` is placed in November 2025.
const OLDER_THAN: &str = "2026-01-01";

async fn ids(t: &TestEnv, filter: Document) -> HashSet<String> {
    let found: Vec<Document> =
        futures_util::TryStreamExt::try_collect(t.orders().find(filter).projection(doc! { "_id": 1 }).await.unwrap())
            .await
            .unwrap();
    found.iter().map(|d| d.get_object_id("_id").unwrap().to_hex()).collect()
}

/// A fresh database with `n` delivered orders from before [`OLDER_THAN`], all archived by
/// `batch`.
async fn archived_orders(name: &str, n: u32) -> (TestEnv, Vec<Document>) {
    let (t, refs) = TestEnv::seeded(name).await;
    let orders: Vec<Document> = (0..n).map(|n| order(&refs, n, "livrée")).collect();
    t.orders().insert_many(&orders).await.unwrap();
    assert!(t.run(&["batch", "--date-from", "2020-01-01"]).status.success());
    (t, orders)
}

fn id_of(d: &Document) -> String {
    d.get_object_id("_id").unwrap().to_hex()
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_deletes_exactly_the_archived_unchanged_old_orders_and_keeps_the_rest() {
    let (t, refs) = TestEnv::seeded("purge_exact").await;
    let old: Vec<Document> = (0..10).map(|n| order(&refs, n, "livrée")).collect();
    let undelivered: Vec<Document> = (10..13).map(|n| order(&refs, n, "en_livraison")).collect();
    let mut recent = order(&refs, 13, "livrée");
    recent.insert("date_commande", DateTime::now());
    let mut future = order(&refs, 14, "livrée");
    future.insert("date_commande", DateTime::parse_rfc3339_str("2030-01-01T00:00:00Z").unwrap());
    t.orders().insert_many(old.iter().chain(&undelivered).chain([&recent, &future])).await.unwrap();
    let out = t.run(&["batch", "--date-from", "2020-01-01"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(t.archive_len().await, 12);

    // One order edited after it was archived, one archive document lost.
    let changed = id_of(&old[0]);
    t.orders().update_one(doc! { "_id": old[0].get("_id") }, doc! { "$set": { "montant_total": 99.0 } }).await.unwrap();
    let missing = id_of(&old[1]);
    t.archive().delete_one(doc! { "_id": old[1].get("_id") }).await.unwrap();
    let before = ids(&t, doc! {}).await;

    let dry = t.run(&["purge", "--older-than", OLDER_THAN, "--dry-run"]);
    assert_eq!(dry.status.code(), Some(6), "{}{}", dry.stdout, dry.stderr);
    assert!(dry.stdout.contains("8 archived and unchanged would be purged"), "{}", dry.stdout);
    assert!(dry.stdout.contains(&changed) && dry.stdout.contains(&missing), "{}", dry.stdout);
    assert_eq!(ids(&t, doc! {}).await, before, "a dry run deletes nothing");

    let backup = t.dir.path().join("purged.jsonl");
    let out = t.run(&["purge", "--older-than", OLDER_THAN, "--backup", backup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6), "kept orders make exit 6: {}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("8 purged of 8 eligible"), "{}", out.stdout);
    let purged: HashSet<String> = old[2..].iter().map(id_of).collect();
    let left = ids(&t, doc! {}).await;
    let expected: HashSet<String> = before.difference(&purged).cloned().collect();
    assert_eq!(left, expected, "exactly the archived, unchanged, old-enough delivered orders are gone");
    for kept in [&changed, &missing, &id_of(&recent), &id_of(&future)] {
        assert!(left.contains(kept), "{kept} must be kept");
    }
    assert_eq!(ids(&t, doc! { "status": "en_livraison" }).await.len(), 3, "undelivered orders are never touched");
    // The backup holds exactly what was deleted, each line an order in canonical extended JSON.
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&backup).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let backed_up: HashSet<String> = lines.iter().map(|l| l["_id"]["$oid"].as_str().unwrap().to_owned()).collect();
    assert_eq!(backed_up, purged);
    assert!(lines.iter().all(|l| l["montant_total"]["$numberDouble"].is_string()), "canonical extended JSON");
    assert_eq!(t.archive_len().await, 11, "the archive is never touched");

    // --rearchive replaces the changed order's copy, then purges it; the missing one stays.
    let out = t.run(&["purge", "--older-than", OLDER_THAN, "--rearchive"]);
    assert_eq!(out.status.code(), Some(6), "{}{}", out.stdout, out.stderr);
    assert!(!ids(&t, doc! {}).await.contains(&changed));
    let copy = t.archive().find_one(doc! { "_id": old[0].get("_id") }).await.unwrap().unwrap();
    assert_eq!(copy.get_f64("montant_total").unwrap(), 99.0, "the archive holds the order as it was deleted");
    assert!(ids(&t, doc! {}).await.contains(&missing));

    // Once archived, the last one goes too, and nothing is left to report: exit 0.
    assert!(t.run(&["verify", "--date-from", "2020-01-01", "--repair"]).stdout.contains("repaired"));
    let out = t.run(&["purge", "--older-than", OLDER_THAN]);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("1 purged of 1 eligible"), "{}", out.stdout);
    assert_eq!(ids(&t, doc! {}).await.len(), 5, "recent, future and undelivered orders remain");
    // The archive copies of purged orders are not orphans: verify stays consistent.
    let out = t.run(&["verify", "--date-from", "2020-01-01"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("purged: 10 archive documents"), "{}", out.stdout);
    assert_eq!(t.archive().count_documents(doc! { "purged_at": { "$exists": true } }).await.unwrap(), 10);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edit_during_the_purge_is_never_lost() {
    let (t, orders) = archived_orders("purge_concurrent", 300).await;

    // A slow purge (about 3 s), and edits of every order, in another order, meanwhile.
    let purge = t
        .archiver(&["purge", "--older-than", OLDER_THAN, "--batch-size", "10", "--max-per-sec", "100"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut edited = HashSet::new();
    for d in orders.iter().rev() {
        let result =
            t.orders().update_one(doc! { "_id": d.get("_id") }, doc! { "$inc": { "montant_total": 1.0 } }).await;
        if result.unwrap().modified_count == 1 {
            edited.insert(id_of(d));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = purge.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(6), "edited orders are kept, and reported: {stdout}");
    let left = ids(&t, doc! {}).await;
    let lost: Vec<&String> = edited.difference(&left).collect();
    assert!(lost.is_empty(), "edits lost with their orders: {lost:?}");
    // Only the copies of orders actually deleted are marked purged.
    let marked = t.archive().count_documents(doc! { "purged_at": { "$exists": true } }).await.unwrap();
    assert_eq!(marked as usize, orders.len() - left.len());
    // The race was real: some orders were purged before their edit, some edited before the purge.
    assert!(!edited.is_empty() && left.len() < orders.len(), "edited {}, left {}", edited.len(), left.len());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_purge_loses_nothing_and_a_rerun_finishes() {
    let (t, orders) = archived_orders("purge_kill", 400).await;

    let mut purge = t
        .archiver(&["purge", "--older-than", OLDER_THAN, "--batch-size", "20", "--max-per-sec", "200"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::eventually(20, "the purge under way", || async {
        t.orders().count_documents(doc! {}).await.unwrap() < 400
    })
    .await;
    purge.kill().unwrap();
    purge.wait().unwrap();
    let left = t.orders().count_documents(doc! {}).await.unwrap();
    assert!(left > 0, "killed before the end");
    // Every order is in the source or, unchanged, in the archive.
    let archived: HashSet<String> = {
        let all: Vec<Document> =
            futures_util::TryStreamExt::try_collect(t.archive().find(doc! {}).await.unwrap()).await.unwrap();
        all.iter().map(id_of).collect()
    };
    assert_eq!(archived.len(), 400);
    let source = ids(&t, doc! {}).await;
    assert!(orders.iter().all(|d| source.contains(&id_of(d)) || archived.contains(&id_of(d))));

    let out = t.run(&["purge", "--older-than", OLDER_THAN]);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(&format!("{left} purged of {left} eligible")), "{}", out.stdout);
    assert_eq!(t.orders().count_documents(doc! {}).await.unwrap(), 0);
    assert_eq!(t.archive_len().await, 400);
    assert_eq!(t.archive().count_documents(doc! { "purged_at": { "$exists": true } }).await.unwrap(), 400);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bound_in_the_future_is_refused() {
    let (t, refs) = TestEnv::seeded("purge_future").await;
    t.deliver(&refs, 0..3).await;
    let out = t.run(&["purge", "--older-than", "2999-01-01"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("future"), "{}", out.stderr);
    assert_eq!(t.orders().count_documents(doc! {}).await.unwrap(), 3);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rearchive_deletes_an_order_only_once_the_archive_holds_its_exact_copy() {
    // A status stored in an array matches the delivered filter of the server: these orders are
    // archived, then changed. Before the fix `purge --rearchive` judged them undelivered on the
    // client, left their copies as they were, and deleted them anyway: the change was lost.
    let (t, refs) = TestEnv::seeded("purge_rearchive_array").await;
    let orders: Vec<Document> = (0..5)
        .map(|n| {
            let mut order = order(&refs, n, "livrée");
            order.insert("status", vec!["livrée"]);
            order.insert("montant_total", 42.0);
            order
        })
        .collect();
    t.orders().insert_many(&orders).await.unwrap();
    assert!(t.run(&["batch", "--date-from", "2020-01-01"]).status.success());
    assert_eq!(t.archive_len().await, 5);
    t.orders().update_many(doc! {}, doc! { "$set": { "montant_total": 777.0 } }).await.unwrap();

    let out = t.run(&["purge", "--older-than", OLDER_THAN, "--rearchive"]);
    let source = t.orders().find(doc! {}).await.unwrap();
    let left: Vec<Document> = futures_util::TryStreamExt::try_collect(source).await.unwrap();
    let archive = t.archive().find(doc! {}).await.unwrap();
    let copies: Vec<Document> = futures_util::TryStreamExt::try_collect(archive).await.unwrap();
    for copy in &copies {
        let id = copy.get("_id").unwrap();
        let in_source = left.iter().any(|o| o.get("_id") == Some(id));
        let amount = copy.get_f64("montant_total").unwrap();
        assert!(in_source || amount == 777.0, "{id} deleted while its archive copy says {amount}: {}", out.stdout);
    }
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(left.is_empty(), "archived again, then purged: {}", out.stdout);
    t.cleanup().await;
}
