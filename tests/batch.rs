//! `archiver batch` against a real server: date ranges, idempotence, both write paths, dry runs.

mod common;

use common::{order, TestEnv};
use mongodb::bson::{doc, Bson, DateTime, Document};

fn at(iso: &str) -> DateTime {
    DateTime::parse_rfc3339_str(iso).unwrap()
}

/// Delivered and other orders around the range [2026-03-01, 2026-03-03).
async fn seed_range(t: &TestEnv) -> Vec<Document> {
    let refs = t.seed_references().await;
    let dated = |n: u32, status: &str, iso: &str| {
        let mut o = order(&refs, n, status);
        o.insert("date_commande", at(iso));
        o
    };
    let docs = vec![
        dated(1, "livrée", "2026-02-28T23:59:59.999Z"),   // before
        dated(2, "livrée", "2026-03-01T00:00:00Z"),       // first instant: in
        dated(3, "livrée", "2026-03-02T12:00:00Z"),       // in
        dated(4, "en_livraison", "2026-03-02T12:00:00Z"), // not delivered
        dated(5, "annulée", "2026-03-02T13:00:00Z"),      // not delivered
        dated(6, "livrée", "2026-03-02T23:59:59.999Z"),   // last instant: in
        dated(7, "livrée", "2026-03-03T00:00:00Z"),       // end is exclusive
    ];
    t.orders().insert_many(docs.clone()).await.unwrap();
    docs
}

async fn archived_numbers(t: &TestEnv) -> Vec<String> {
    let mut numbers: Vec<String> = t
        .archive()
        .distinct("numero_commande", doc! {})
        .await
        .unwrap()
        .into_iter()
        .filter_map(|b| b.as_str().map(str::to_owned))
        .collect();
    numbers.sort();
    numbers
}

#[tokio::test(flavor = "multi_thread")]
async fn archives_exactly_the_delivered_orders_of_the_range_and_is_idempotent() {
    let t = TestEnv::new("range").await;
    seed_range(&t).await;
    let out = t.run(&["batch", "--date-from", "2026-03-01", "--date-to", "2026-03-03"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(archived_numbers(&t).await, ["CMD-000002", "CMD-000003", "CMD-000006"]);
    assert!(out.stdout.contains("3 matched, 3 newly archived, 0 already archived"), "{}", out.stdout);
    let doc = t.archive().find_one(doc! { "numero_commande": "CMD-000003" }).await.unwrap().unwrap();
    assert_eq!(doc.get_str("archive_source").unwrap(), "batch");
    assert_eq!(doc.get_document("client").unwrap().get_str("nom").unwrap(), "Martin");
    let first_run: Vec<Document> = collect(&t).await;

    let again = t.run(&["batch", "--date-from", "2026-03-01", "--date-to", "2026-03-03"]);
    assert!(again.status.success(), "{}", again.stderr);
    assert!(again.stdout.contains("3 matched, 0 newly archived, 3 already archived"), "{}", again.stdout);
    assert_eq!(collect(&t).await, first_run, "a second run must leave the archive unchanged");
    t.cleanup().await;
}

async fn collect(t: &TestEnv) -> Vec<Document> {
    use futures_util::TryStreamExt;
    t.archive().find(doc! {}).sort(doc! { "_id": 1 }).await.unwrap().try_collect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_archived_by_watch_is_not_duplicated() {
    let t = TestEnv::new("overlap").await;
    let docs = seed_range(&t).await;
    let id = docs[1].get_object_id("_id").unwrap();
    t.archive()
        .insert_one(doc! { "_id": id, "numero_commande": "CMD-000002", "archive_source": "watch" })
        .await
        .unwrap();
    let out = t.run(&["batch", "--date-from", "2026-03-01", "--date-to", "2026-03-03"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("2 newly archived, 1 already archived"), "{}", out.stdout);
    assert_eq!(t.archive().count_documents(doc! {}).await.unwrap(), 3);
    let kept = t.archive().find_one(doc! { "_id": id }).await.unwrap().unwrap();
    assert_eq!(kept.get_str("archive_source").unwrap(), "watch");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn both_write_paths_produce_identical_documents() {
    let client_side = TestEnv::new("path_client").await;
    let server_side = TestEnv::new("path_server").await;
    // The same orders (same ids) in two databases.
    let docs = seed_range(&client_side).await;
    for name in ["Client", "Livreur", "Restaurants", "Menu"] {
        let all: Vec<Document> = {
            use futures_util::TryStreamExt;
            client_side.db.collection::<Document>(name).find(doc! {}).await.unwrap().try_collect().await.unwrap()
        };
        server_side.db.collection::<Document>(name).insert_many(all).await.unwrap();
    }
    // Orders with broken references and odd values, to compare every rule of both paths.
    let mut broken = docs[2].clone();
    broken.insert("_id", mongodb::bson::oid::ObjectId::new());
    broken.insert("numero_commande", "CMD-000099");
    broken.insert("client_id", mongodb::bson::oid::ObjectId::new());
    broken.insert("items", vec![Bson::Document(doc! { "menu_id": 42, "quantite": "two" })]);
    let variant = |n: i32, changes: Document| {
        let mut o = docs[2].clone();
        o.insert("_id", mongodb::bson::oid::ObjectId::new());
        o.insert("numero_commande", format!("CMD-1000{n:02}"));
        for (k, v) in changes {
            o.insert(k, v);
        }
        o
    };
    let menu0 = docs[2].get_array("items").unwrap()[0].as_document().unwrap().get("menu_id").unwrap().clone();
    let odd = vec![
        broken,
        variant(1, doc! { "items": [5, { "quantite": 1 }, { "menu_id": Bson::Null, "quantite": 2 }] }),
        variant(
            2,
            doc! { "items": [{ "menu_id": menu0.clone(), "quantite": 3_i64 }, { "menu_id": menu0.clone(), "quantite": 1.5 }] },
        ),
        variant(3, doc! { "livreur_id": Bson::Null, "montant_total": "31" }),
        variant(4, doc! { "client_id": 77_i64, "restaurant_id": Bson::Null }),
        variant(5, doc! { "numero_commande": 12 }),
    ];
    // A numeric customer id, matched across integer types as MongoDB compares numbers by value.
    for t in [&client_side, &server_side] {
        t.db.collection::<Document>("Client").insert_one(doc! { "_id": 77_i32, "nom": "Numerique" }).await.unwrap();
    }
    client_side.orders().insert_many(odd.clone()).await.unwrap();
    server_side.orders().insert_many(docs).await.unwrap();
    server_side.orders().insert_many(odd).await.unwrap();

    let range = ["batch", "--date-from", "2026-03-01", "--date-to", "2026-03-03"];
    let a = client_side.run(&[&range[..], &["--write-path", "client"]].concat());
    let b = server_side.run(&[&range[..], &["--write-path", "server"]].concat());
    assert!(a.status.success() && b.status.success(), "{}\n{}", a.stderr, b.stderr);
    assert!(b.stdout.contains("9 newly archived"), "{}", b.stdout);
    // The time of writing differs, and only the client computes the order's digest (no server
    // operator does: `purge` compares the fields of documents without one).
    let strip = |mut docs: Vec<Document>, digest: bool| {
        for d in &mut docs {
            assert!(d.remove("archived_at").is_some());
            let found = d.remove("source_digest");
            assert_eq!(found.is_some(), digest, "{d}");
            if let Some(found) = found {
                assert!(found.as_str().is_some_and(|s| s.starts_with("sha256:")), "{found}");
            }
        }
        docs
    };
    let from_client = strip(collect(&client_side).await, true);
    let from_server = strip(collect(&server_side).await, false);
    assert_eq!(from_client.len(), 9, "3 orders of the range and 6 odd ones");
    assert_eq!(from_client, from_server);
    let flagged = from_client.iter().find(|d| d.get_str("numero_commande").unwrap() == "CMD-000099").unwrap();
    let anomalies: Vec<&str> = flagged.get_array("anomalies").unwrap().iter().filter_map(Bson::as_str).collect();
    assert_eq!(anomalies, ["client_introuvable", "menu_introuvable", "quantite_invalide"]);
    client_side.cleanup().await;
    server_side.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_and_bad_dates_write_nothing() {
    let t = TestEnv::new("dry").await;
    seed_range(&t).await;
    let samples = t.dir.path().join("samples.json");
    let out = t.run(&[
        "batch",
        "--date-from",
        "2026-03-01",
        "--date-to",
        "2026-03-03",
        "--dry-run",
        "--export-samples",
        samples.to_str().unwrap(),
        "--sample-size",
        "2",
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("3 delivered orders in the range would be archived"), "{}", out.stdout);
    assert!(out.stdout.contains("\"client\""), "samples are shown: {}", out.stdout);
    let exported: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&samples).unwrap()).unwrap();
    let exported = exported.as_array().unwrap();
    assert_eq!(exported.len(), 2);
    assert!(exported[0]["_id"]["$oid"].is_string(), "canonical extended JSON: {}", exported[0]);
    assert!(exported[0]["montant_total"]["$numberDouble"].is_string(), "{}", exported[0]);
    assert_eq!(exported[0]["archive_source"], "batch");

    for bad in ["last tuesday", "2026-02-30", "3 days"] {
        let out = t.run(&["batch", "--date-from", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", out.stderr);
        assert!(out.stderr.contains("YYYY-MM-DD"), "{}", out.stderr);
    }
    let reversed = t.run(&["batch", "--date-from", "2026-03-03", "--date-to", "2026-03-01"]);
    assert_eq!(reversed.status.code(), Some(2), "{}", reversed.stderr);
    let names = t.db.list_collection_names().await.unwrap();
    assert!(!names.contains(&"Commandes_archive".to_owned()), "{names:?}");
    let indexes = t.orders().list_index_names().await.unwrap();
    assert_eq!(indexes, ["_id_"], "a dry run creates no index");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_its_indexes_unless_told_not_to() {
    let t = TestEnv::new("indexes").await;
    seed_range(&t).await;
    let out = t.run(&["batch", "--date-from", "2026-03-01", "--skip-indexes"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(t.orders().list_index_names().await.unwrap(), ["_id_"]);
    let out = t.run(&["batch", "--date-from", "2026-03-01", "--chunk-size", "1", "--concurrency", "3"]);
    assert!(out.status.success(), "{}", out.stderr);
    let indexes = t.orders().list_index_names().await.unwrap();
    assert!(indexes.iter().any(|n| n.starts_with("numero_commande")), "{indexes:?}");
    assert!(indexes.iter().any(|n| n.starts_with("status_1_date_commande")), "{indexes:?}");
    assert!(out.stderr.contains("index present"), "{}", out.stderr);
    // 2026-03-01 onwards, open-ended: orders 2, 3, 6 and 7.
    assert_eq!(archived_numbers(&t).await, ["CMD-000002", "CMD-000003", "CMD-000006", "CMD-000007"]);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_run_leaves_its_outcome_in_the_metrics_file_and_a_failure_keeps_the_last_success() {
    let t = TestEnv::new("batch_metrics_file").await;
    seed_range(&t).await;
    let file = t.dir.path().join("textfile/archiver_batch.prom");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let value = |name: &str| -> Option<f64> {
        let text = std::fs::read_to_string(&file).unwrap();
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
    };
    let args = ["batch", "--date-from", "2026-03-01", "--date-to", "2026-03-03"];
    let out = t.archiver(&args).env("BATCH_METRICS_FILE", &file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&format!("database=\"{}\"", t.db_name)), "{text}");
    assert_eq!(value("archiver_batch_last_run_success"), Some(1.0));
    assert!(value("archiver_batch_last_run_orders_archived").unwrap() >= 1.0, "{text}");
    let range_end = chrono::DateTime::parse_from_rfc3339("2026-03-03T00:00:00Z").unwrap().timestamp() as f64;
    assert_eq!(value("archiver_batch_last_success_range_end_timestamp_seconds"), Some(range_end));
    let success = value("archiver_batch_last_success_timestamp_seconds").unwrap();

    // The database is unreachable: the run fails, says so in the file, keeps the last success.
    let out = t
        .archiver(&args)
        .env("BATCH_METRICS_FILE", &file)
        .env("MONGODB_URI", "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200")
        .env("RETRY_MAX_ATTEMPTS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(value("archiver_batch_last_run_success"), Some(0.0));
    assert_eq!(value("archiver_batch_last_success_timestamp_seconds"), Some(success));
    assert!(value("archiver_batch_last_run_timestamp_seconds").unwrap() >= success);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_typo_in_the_database_or_the_delivered_status_is_said_plainly_and_creates_nothing() {
    let t = TestEnv::new("typos").await;
    seed_range(&t).await;
    let args = ["batch", "--date-from", "2026-03-01", "--date-to", "2026-03-03"];

    // MONGODB_DB with a typo: exit 2, the collection's absence said, nothing created there.
    let typo_db = format!("{}_typo", t.db_name);
    let out = t.archiver(&args).env("MONGODB_DB", &typo_db).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("the orders collection Commandes does not exist in database {typo_db}")),
        "{stderr}"
    );
    assert!(stderr.contains("databases with one"), "{stderr}");
    let databases = t.client.list_database_names().await.unwrap();
    assert!(!databases.contains(&typo_db), "nothing created in {typo_db}");

    // DELIVERED_STATUS without its accent: exit 2, the statuses present named.
    let out = t.archiver(&args).env("DELIVERED_STATUS", "livree").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no order in Commandes has the status \"livree\""), "{stderr}");
    assert!(stderr.contains("\"livrée\""), "the statuses present: {stderr}");
    assert_eq!(t.archive_len().await, 0);

    // health says the same, and is unhealthy.
    for (var, value) in [("MONGODB_DB", typo_db.as_str()), ("DELIVERED_STATUS", "livree")] {
        let out = t.archiver(&["health"]).env(var, value).output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(1), "{report}");
        assert!(report["source"]["error"].as_str().is_some_and(|e| e.contains(value)), "{report}");

        // And config check fails on it, on the orders line.
        let out = t.archiver(&["config", "check"]).env(var, value).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.lines().any(|l| l.starts_with("FAIL") && l.contains("orders") && l.contains(value)), "{stdout}");
    }
    t.cleanup().await;
}
