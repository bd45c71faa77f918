//! `archiver watch` against a real server: what gets archived, how, and what survives restarts,
//! kills and bad token files.

mod common;

use std::time::Duration;

use common::{order, TestEnv};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};

#[tokio::test(flavor = "multi_thread")]
async fn delivered_update_replace_and_insert_are_archived_enriched() {
    let (t, refs) = TestEnv::seeded("kinds").await;
    let updated = order(&refs, 1, "en_livraison");
    let replaced = order(&refs, 2, "en_preparation");
    t.orders().insert_many([updated.clone(), replaced.clone()]).await.unwrap();
    let mut watch = t.watch().start().await;

    let id_updated = updated.get_object_id("_id").unwrap();
    t.orders()
        .update_one(
            doc! { "_id": id_updated },
            doc! { "$set": { "status": "livrée", "date_livraison": mongodb::bson::DateTime::now() } },
        )
        .await
        .unwrap();
    let mut replacement = replaced.clone();
    replacement.insert("status", "livrée");
    t.orders().replace_one(doc! { "_id": replaced.get_object_id("_id").unwrap() }, replacement).await.unwrap();
    let inserted = order(&refs, 3, "livrée");
    t.orders().insert_one(inserted.clone()).await.unwrap();
    t.wait_archived(3).await;

    let archived = t.archive().find_one(doc! { "_id": id_updated }).await.unwrap().unwrap();
    assert_eq!(archived.get_str("numero_commande").unwrap(), "CMD-000001");
    assert_eq!(archived.get_str("status").unwrap(), "livrée");
    assert_eq!(archived.get_str("archive_source").unwrap(), "watch");
    assert!(archived.get_datetime("archived_at").is_ok());
    assert!(archived.get_datetime("date_livraison").is_ok());
    assert_eq!(archived.get_f64("montant_total").unwrap(), 31.0);
    let client = archived.get_document("client").unwrap();
    assert_eq!(client.get_str("nom").unwrap(), "Martin");
    assert_eq!(client.get_str("email").unwrap(), "claire@example.fr");
    assert_eq!(client.get_document("adresse").unwrap().get_str("ville").unwrap(), "Lyon");
    assert!(!client.contains_key("_id"));
    assert_eq!(archived.get_document("livreur").unwrap().get_str("vehicule").unwrap(), "vélo");
    assert_eq!(archived.get_document("restaurant").unwrap().get_str("cuisine").unwrap(), "italienne");
    let items = archived.get_array("items").unwrap();
    assert_eq!(items.len(), 2);
    let first = items[0].as_document().unwrap();
    assert_eq!(first.get_object_id("menu_id").unwrap(), refs.menu[0]);
    assert_eq!(first.get_str("nom").unwrap(), "Pizza");
    assert_eq!(first.get_f64("prix").unwrap(), 12.5);
    assert_eq!(first.get_i32("quantite").unwrap(), 2);
    assert_eq!(first.get_f64("sous_total").unwrap(), 25.0);
    assert_eq!(items[1].as_document().unwrap().get_str("nom").unwrap(), "Tiramisu");
    assert!(archived.get_array("anomalies").unwrap().is_empty());
    let keys: Vec<&str> = archived.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "_id",
            "numero_commande",
            "status",
            "date_commande",
            "date_livraison",
            "montant_total",
            "client",
            "livreur",
            "restaurant",
            "items",
            "archived_at",
            "archive_source",
            "anomalies",
            "source_digest"
        ]
    );
    t.assert_archive_matches_delivered().await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn non_delivered_changes_and_later_edits_are_not_archived() {
    let (t, refs) = TestEnv::seeded("filter").await;
    let mut watch = t.watch().start().await;
    let pending = order(&refs, 1, "en_attente");
    let id = pending.get_object_id("_id").unwrap();
    t.orders().insert_one(pending).await.unwrap();
    for status in ["en_preparation", "en_livraison"] {
        t.orders().update_one(doc! { "_id": id }, doc! { "$set": { "status": status } }).await.unwrap();
    }
    t.orders().insert_one(order(&refs, 2, "annulée")).await.unwrap();
    t.orders().update_one(doc! { "_id": id }, doc! { "$set": { "status": "livrée" } }).await.unwrap();
    t.wait_archived(1).await;
    // Edits after delivery must not create a second document.
    t.orders().update_one(doc! { "_id": id }, doc! { "$set": { "montant_total": 40.0 } }).await.unwrap();
    let mut replacement = t.orders().find_one(doc! { "_id": id }).await.unwrap().unwrap();
    replacement.insert("note", "replaced after delivery");
    t.orders().replace_one(doc! { "_id": id }, replacement).await.unwrap();
    // A marker delivery proves the stream has moved past the edits.
    t.orders().insert_one(order(&refs, 3, "livrée")).await.unwrap();
    t.wait_archived(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.wait_all_archived(2).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_resumes_after_saved_token_without_gap_or_duplicate() {
    let (t, refs) = TestEnv::seeded("restart").await;
    let mut watch = t.watch().start().await;
    t.deliver(&refs, 0..20).await;
    t.wait_archived(20).await;
    let log = watch.stop_ok().await;
    assert!(log.contains("watch stopped"), "{log}");

    // While it is down: deliveries it must not miss.
    t.deliver(&refs, 20..50).await;
    let pending = order(&refs, 99, "en_livraison");
    let pending_id = pending.get_object_id("_id").unwrap();
    t.orders().insert_one(pending).await.unwrap();
    t.orders().update_one(doc! { "_id": pending_id }, doc! { "$set": { "status": "livrée" } }).await.unwrap();

    let mut watch = t.watch().start().await;
    assert!(watch.log_contains("resuming after the saved token"), "{}", watch.stderr());
    t.wait_all_archived(51).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_a_burst_loses_nothing() {
    let (t, refs) = TestEnv::seeded("sigkill").await;
    let mut watch = t.watch().env("BATCH_SIZE", "50").start().await;
    let writer = {
        let orders = t.orders();
        tokio::spawn(async move {
            for chunk in 0..20u32 {
                let docs: Vec<Document> = (0..50).map(|n| order(&refs, chunk * 50 + n, "livrée")).collect();
                orders.insert_many(docs).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Kill it while the burst is being archived.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while t.archive_len().await < 100 {
        assert!(std::time::Instant::now() < deadline, "nothing archived: {}", watch.stderr());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    watch.kill().await;
    writer.await.unwrap();
    let mut watch = t.watch().start().await;
    t.wait_all_archived(1000).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_token_file_fails_clearly_and_is_left_untouched() {
    let t = TestEnv::new("corrupt").await;
    let path = t.token_file();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "{\"version\": 1, \"resume_token\": ").unwrap();
    let out = t.run(&["watch"]);
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
    assert!(out.stderr.contains(&path.display().to_string()), "{}", out.stderr);
    assert!(out.stderr.contains("corrupt"), "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"version\": 1, \"resume_token\": ");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_stream_still_advances_the_saved_token() {
    let (t, refs) = TestEnv::seeded("idle").await;
    let mut watch = t.watch().start().await;
    let before = std::fs::read_to_string(t.token_file()).unwrap();
    // Changes the filter drops: the stream stays idle for `watch`, but the oplog moves on.
    let pending = order(&refs, 1, "en_attente");
    let id = pending.get_object_id("_id").unwrap();
    t.orders().insert_one(pending).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        t.orders().update_one(doc! { "_id": id }, doc! { "$set": { "montant_total": f64::from(n) } }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = std::fs::read_to_string(t.token_file()).unwrap();
        let token = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["resume_token"].clone();
        if token(&now) != token(&before) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "token never advanced: {now}");
    }
    assert_eq!(t.archive_len().await, 0);
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_references_are_flagged_not_dropped() {
    let (t, refs) = TestEnv::seeded("anomalies").await;
    let mut watch = t.watch().start().await;
    let mut broken = order(&refs, 1, "livrée");
    broken.insert("client_id", ObjectId::new());
    broken.insert("livreur_id", ObjectId::new());
    broken.insert("items", vec![Bson::Document(doc! { "menu_id": ObjectId::new(), "quantite": 1 })]);
    let mut malformed = order(&refs, 2, "livrée");
    malformed.remove("numero_commande");
    malformed.insert("items", "not an array");
    malformed.insert("restaurant_id", "abc");
    t.orders().insert_many([broken.clone(), malformed.clone()]).await.unwrap();
    t.wait_archived(2).await;

    let doc1 = t.archive().find_one(doc! { "_id": broken.get_object_id("_id").unwrap() }).await.unwrap().unwrap();
    let anomalies: Vec<&str> = doc1.get_array("anomalies").unwrap().iter().filter_map(Bson::as_str).collect();
    assert_eq!(anomalies, ["client_introuvable", "livreur_introuvable", "menu_introuvable"]);
    assert_eq!(doc1.get("client"), Some(&Bson::Null));
    let item = doc1.get_array("items").unwrap()[0].as_document().unwrap().clone();
    assert_eq!(item.get("nom"), Some(&Bson::Null));
    assert_eq!(item.get("sous_total"), Some(&Bson::Null));
    assert_eq!(doc1.get_document("restaurant").unwrap().get_str("nom").unwrap(), "Chez Mario");

    let doc2 = t.archive().find_one(doc! { "_id": malformed.get_object_id("_id").unwrap() }).await.unwrap().unwrap();
    let anomalies: Vec<&str> = doc2.get_array("anomalies").unwrap().iter().filter_map(Bson::as_str).collect();
    assert_eq!(anomalies, ["numero_commande_invalide", "restaurant_introuvable", "items_invalides"]);
    assert!(doc2.get_array("items").unwrap().is_empty());
    watch.stop_ok().await;
}

/// `watch` is a service: an unreachable server is retried without end (readiness 503 meanwhile)
/// rather than left to a supervisor's restarts, whatever `RETRY_MAX_ATTEMPTS` says; SIGTERM still
/// stops it at once, with exit 0. The password never shows, in text or JSON logs.
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_server_is_retried_without_end_and_without_leaking_the_password() {
    let t = TestEnv::new("unreachable").await;
    let uri = "mongodb://archivist:Sup3rS3cret@127.0.0.1:1/?serverSelectionTimeoutMS=200";
    let env = [("MONGODB_URI", uri), ("RETRY_MAX_ATTEMPTS", "1"), ("RETRY_MAX_ELAPSED_MS", "1")];
    let mut watch = t.watch().envs(&env).until("health and metrics served").await;
    let addr = common::health_addr(&watch);
    // Well past both bounds (one retry, 1 ms), it is still trying, and says so.
    common::eventually(30, "a third attempt", || async { watch.log_contains("attempt=3") }).await;
    assert!(watch.child.try_wait().unwrap().is_none(), "watch gave up: {}", watch.stderr());
    assert_eq!(common::http_get(&addr, "/health/ready").0, 503);
    // The same for alerting, without a probe: the readiness gauge.
    assert!(common::unlabelled(&common::http_get(&addr, "/metrics").1).lines().any(|l| l == "archiver_ready 0"));
    assert!(watch.log_contains("not reachable yet; retrying"), "{}", watch.stderr());
    assert!(watch.stop().await.success(), "{}", watch.stderr());
    let stderr = watch.stderr();
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("Sup3rS3cret"), "{stderr}");
    let logs = std::fs::read_dir(t.dir.path().join("logs")).unwrap().next().unwrap().unwrap().path();
    let file = common::read(&logs);
    assert!(file.contains("not reachable yet"), "log file: {file}");
    assert!(!file.contains("Sup3rS3cret"));

    // JSON logs for shippers: one object per line, with structured fields.
    let mut watch = t.watch().envs(&[("MONGODB_URI", uri), ("LOG_FORMAT", "json")]).until("\"attempt\":2").await;
    assert!(watch.stop().await.success());
    let stderr = watch.stderr();
    let events: Vec<serde_json::Value> = stderr.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let retry = events.iter().find(|e| e["attempt"] == 1).unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(retry["level"], "WARN");
    assert!(retry["retry_in_ms"].as_u64().is_some(), "{retry}");
    assert!(retry["message"].as_str().unwrap().contains("mongodb://127.0.0.1:1"), "{retry}");
    assert!(!stderr.contains("Sup3rS3cret"));
}

/// The archived document of the order numbered `n`.
async fn archived(t: &TestEnv, n: u32) -> Document {
    let numero = format!("CMD-{n:06}");
    t.archive().find_one(doc! { "numero_commande": &numero }).await.unwrap().unwrap_or_else(|| panic!("{numero}"))
}

fn anomalies(archived: &Document) -> Vec<&str> {
    archived.get_array("anomalies").unwrap().iter().filter_map(Bson::as_str).collect()
}

/// `watch` keeps the references it has read, and its stream carries their changes, so an order
/// delivered after a change sees it: an edited customer, a customer inserted after an order
/// named it in vain, a deleted courier, a dropped menu, a menu rebuilt aside and renamed onto it.
#[tokio::test(flavor = "multi_thread")]
async fn references_changed_while_watching_show_in_the_orders_delivered_after() {
    let (t, refs) = TestEnv::seeded("refchange").await;
    let mut watch = t.watch().start().await;
    assert!(watch.log_contains("references_kept=true"), "{}", watch.stderr());
    let clients = t.db.collection::<Document>("Client");
    t.deliver(&refs, [1]).await;
    t.wait_archived(1).await;

    clients.update_one(doc! { "_id": refs.client }, doc! { "$set": { "nom": "Bernard" } }).await.unwrap();
    t.deliver(&refs, [2]).await;
    t.wait_archived(2).await;

    let newcomer = ObjectId::new();
    let mut early = order(&refs, 3, "livrée");
    early.insert("client_id", newcomer);
    t.orders().insert_one(early).await.unwrap();
    t.wait_archived(3).await;
    clients.insert_one(doc! { "_id": newcomer, "nom": "Petit", "prenom": "Léa" }).await.unwrap();
    let mut late = order(&refs, 4, "livrée");
    late.insert("client_id", newcomer);
    t.orders().insert_one(late).await.unwrap();
    t.wait_archived(4).await;

    t.db.collection::<Document>("Livreur").delete_one(doc! { "_id": refs.livreur }).await.unwrap();
    t.deliver(&refs, [5]).await;
    t.wait_archived(5).await;
    t.db.collection::<Document>("Menu").drop().await.unwrap();
    t.deliver(&refs, [6]).await;
    t.wait_archived(6).await;
    // A menu rebuilt aside, then renamed onto the reference collection (as `$out` does).
    let rebuilt = t.db.collection::<Document>("Menu_rebuilt");
    rebuilt
        .insert_many([
            doc! { "_id": refs.menu[0], "nom": "Pizza royale", "prix": 14.0 },
            doc! { "_id": refs.menu[1], "nom": "Tiramisu", "prix": 6.0 },
        ])
        .await
        .unwrap();
    let rename = doc! {
        "renameCollection": format!("{}.Menu_rebuilt", t.db_name),
        "to": format!("{}.Menu", t.db_name),
        "dropTarget": true,
    };
    t.client.database("admin").run_command(rename).await.unwrap();
    t.deliver(&refs, [7]).await;
    t.wait_archived(7).await;
    watch.stop_ok().await;

    let client_name = |d: &Document| d.get_document("client").unwrap().get_str("nom").unwrap().to_owned();
    assert_eq!(client_name(&archived(&t, 1).await), "Martin");
    assert_eq!(client_name(&archived(&t, 2).await), "Bernard", "an edit shows in the orders after it");
    assert_eq!(anomalies(&archived(&t, 3).await), ["client_introuvable"]);
    assert_eq!(client_name(&archived(&t, 4).await), "Petit", "an insert shows in the orders after it");
    let fifth = archived(&t, 5).await;
    assert_eq!(fifth.get("livreur"), Some(&Bson::Null), "a deletion shows in the orders after it");
    assert_eq!(anomalies(&fifth), ["livreur_introuvable"]);
    assert_eq!(anomalies(&archived(&t, 6).await), ["livreur_introuvable", "menu_introuvable"]);
    let seventh = archived(&t, 7).await;
    assert_eq!(anomalies(&seventh), ["livreur_introuvable"], "a collection renamed onto Menu shows");
    let item = seventh.get_array("items").unwrap()[0].as_document().unwrap().clone();
    assert_eq!(item.get_str("nom").unwrap(), "Pizza royale");
    t.assert_archive_matches_delivered().await;
}

/// A token saved by a stream of the orders collection alone (`REFERENCE_CACHE_ENTRIES=0`, or a
/// version before references were kept) resumes the stream of the whole database: nothing
/// delivered in between is missed or filled again, and the reverse holds too, also when the
/// last events read were changes of references.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_of_either_stream_resumes_the_other() {
    let (t, refs) = TestEnv::seeded("tokenkinds").await;
    let mut watch = t.watch().env("REFERENCE_CACHE_ENTRIES", "0").start().await;
    assert!(watch.log_contains("references_kept=false"), "{}", watch.stderr());
    t.deliver(&refs, 0..5).await;
    t.wait_archived(5).await;
    watch.stop_ok().await;
    t.deliver(&refs, 5..10).await;

    let mut watch = t.watch().start().await;
    assert!(watch.log_contains("references_kept=true"), "{}", watch.stderr());
    t.wait_all_archived(10).await;
    t.deliver(&refs, 10..15).await;
    t.wait_all_archived(15).await;
    // The last events this stream reads are reference changes, which a stream of the orders
    // collection alone does not carry: their position must not be the one saved.
    let clients = t.db.collection::<Document>("Client");
    for name in ["Bernard", "Petit"] {
        clients.update_one(doc! { "_id": refs.client }, doc! { "$set": { "nom": name } }).await.unwrap();
    }
    // Past the once-a-second save of an idle stream's position.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = watch.stop_ok().await;
    assert!(!log.contains("HISTORY LOST"), "{log}");
    t.deliver(&refs, 15..20).await;

    let mut watch = t.watch().env("REFERENCE_CACHE_ENTRIES", "0").start().await;
    t.wait_all_archived(20).await;
    let log = watch.stop_ok().await;
    assert!(!log.contains("HISTORY LOST"), "{log}");
}
