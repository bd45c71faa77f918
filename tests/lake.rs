//! The archive as a Delta Lake table (`ARCHIVE_SINK=delta`): `batch` writes typed rows, one per
//! order however often it runs and however many run at once, and an independent implementation
//! (the Python `deltalake` package) reads them back.

mod common;

use std::time::Duration;

use std::path::Path;
use std::process::Command;

use common::{order, Refs, TestEnv};
use mongodb::bson::{oid::ObjectId, Bson, DateTime, Document};
use serde_json::Value;

/// Reads the table at `table` with the Python `deltalake` package (scripts/lake-read.py).
fn read_back(table: &Path) -> Value {
    read_back_at(table.to_str().unwrap(), &[])
}

/// [`read_back_at`], `None` while there is no table to read.
fn try_read_back_at(uri: &str, env: &[(&str, String)]) -> Option<Value> {
    std::panic::catch_unwind(|| read_back_at(uri, env)).ok()
}

/// Reads the table at `uri` (a path, or s3:// with the server's variables in `env`).
fn read_back_at(uri: &str, env: &[(&str, String)]) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = Command::new("bash").arg(root.join("scripts/lake-venv.sh")).output().expect("run scripts/lake-venv.sh");
    assert!(venv.status.success(), "the Python reader cannot be set up: {}", String::from_utf8_lossy(&venv.stderr));
    let python = String::from_utf8_lossy(&venv.stdout).trim().to_owned();
    let out = Command::new(python)
        .arg(root.join("scripts/lake-read.py"))
        .arg(uri)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run the reader");
    assert!(out.status.success(), "the Python reader failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("the reader prints JSON")
}

/// Delivered orders on two days, one of them with anomalies (no such customer, a text amount),
/// and orders not delivered.
async fn seed(t: &TestEnv, refs: &Refs) -> Vec<Document> {
    let at = |iso: &str| DateTime::parse_rfc3339_str(iso).unwrap();
    let dated = |n: u32, status: &str, ordered: &str, delivered: &str| {
        let mut o = order(refs, n, status);
        o.insert("date_commande", at(ordered));
        o.insert("date_livraison", if status == "livrée" { Bson::DateTime(at(delivered)) } else { Bson::Null });
        o
    };
    let mut orders: Vec<Document> = (0..20)
        .map(|n| {
            let day = if n % 2 == 0 { "2026-03-01" } else { "2026-03-02" };
            dated(n, "livrée", &format!("{day}T10:00:00Z"), &format!("{day}T11:30:00Z"))
        })
        .collect();
    orders[3].insert("client_id", ObjectId::new());
    orders[5].insert("montant_total", "trente");
    orders.push(dated(20, "en_livraison", "2026-03-01T10:00:00Z", ""));
    t.orders().insert_many(orders.clone()).await.unwrap();
    orders.into_iter().filter(|o| o.get_str("status") == Ok("livrée")).collect()
}

/// A seeded database (see [`seed`]) archived once by `batch` into a table of its own: the test
/// environment, its references, the delivered orders, the table's directory and the variables
/// that name it.
async fn archived_into_a_table(
    name: &str,
) -> (TestEnv, Refs, Vec<Document>, std::path::PathBuf, [(&'static str, String); 2]) {
    let (t, refs) = TestEnv::seeded(name).await;
    let delivered = seed(&t, &refs).await;
    let table = t.dir.path().join("lake/orders");
    let lake = [("ARCHIVE_SINK", "delta".to_owned()), ("ARCHIVE_TABLE_URI", format!("file://{}", table.display()))];
    let out = t.archiver(&[&["batch"][..], &RANGE].concat()).envs(lake.clone()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (t, refs, delivered, table, lake)
}

/// A seeded database whose `watch` writes a table of its own, committing every second: the
/// test environment, its references, the table's directory and the variables that name it.
async fn watching_a_table(name: &str) -> (TestEnv, Refs, std::path::PathBuf, [(&'static str, String); 3]) {
    let (t, refs) = TestEnv::seeded(name).await;
    let table = t.dir.path().join("lake/orders");
    let lake = [
        ("ARCHIVE_SINK", "delta".to_owned()),
        ("ARCHIVE_TABLE_URI", format!("file://{}", table.display())),
        ("LAKE_COMMIT_SECS", "1".to_owned()),
    ];
    (t, refs, table, lake)
}

/// Whether the table at `table` holds `n` rows (false while there is no table).
async fn committed(table: &Path, n: u64) -> bool {
    table.join("_delta_log").exists() && read_back(table)["rows"] == n
}

/// Asserts that the table at `table` holds `n` rows, one per order (`log` said on failure).
fn assert_one_row_per_order(table: &Path, n: u64, log: &str) {
    let read = read_back(table);
    assert_eq!((read["rows"].as_u64(), read["distinct_ids"].as_u64()), (Some(n), Some(n)), "{log}");
}

/// The range `seed` delivers in.
const RANGE: [&str; 4] = ["--date-from", "2026-03-01", "--date-to", "2026-03-03"];

#[tokio::test(flavor = "multi_thread")]
async fn batch_writes_one_typed_row_per_order_however_often_it_runs() {
    let (t, refs) = TestEnv::seeded("lake_batch").await;
    let delivered = seed(&t, &refs).await;
    let table = t.dir.path().join("lake/orders");
    let uri = format!("file://{}", table.display());
    let args = ["batch", "--date-from", "2026-03-01", "--date-to", "2026-03-03"];
    let lake = [("ARCHIVE_SINK", "delta"), ("ARCHIVE_TABLE_URI", uri.as_str())];
    let out = t.archiver(&args).envs(lake).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("20 matched, 20 newly archived, 0 already archived, 2 with anomalies"), "{stdout}");
    assert_eq!(t.archive_len().await, 0, "nothing written to the archive collection");

    // Again: nothing added.
    let again = t.archiver(&args).envs(lake).output().unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(stdout.contains("0 newly archived, 20 already archived"), "{stdout}");

    let read = read_back(&table);
    assert_eq!(read["rows"], 20, "{read}");
    assert_eq!(read["distinct_ids"], 20, "{read}");
    assert_eq!(read["partitions"], serde_json::json!(["delivery_date"]), "{read}");
    let types = &read["types"];
    for (column, expected) in [
        ("_id", "string"),
        ("date_commande", "timestamp[us, tz=UTC]"),
        ("date_livraison", "timestamp[us, tz=UTC]"),
        ("montant_total", "double"),
        ("archived_at", "timestamp[us, tz=UTC]"),
        ("anomalies", "list<element: string>"),
        ("document", "string"),
        ("delivery_date", "date32[day]"),
    ] {
        assert_eq!(types[column], expected, "column {column}: {types}");
    }
    assert!(types["client"].as_str().unwrap().starts_with("struct<nom: string"), "{types}");
    assert!(types["items"].as_str().unwrap().contains("prix: double"), "{types}");
    for order in &delivered {
        let id = order.get_object_id("_id").unwrap().to_hex();
        let row = &read["by_id"][&id];
        let number = order.get_str("numero_commande").unwrap();
        assert_eq!(row["numero_commande"], number, "{row}");
        assert_eq!(row["items"], 2, "{row}");
        assert_eq!(row["document_has_id"], true, "{row}");
        let delivered_on = order.get_datetime("date_livraison").unwrap().try_to_rfc3339_string().unwrap();
        assert_eq!(row["delivery_date"].as_str().unwrap(), &delivered_on[..10], "{row}");
        match number {
            "CMD-000003" => {
                assert_eq!(row["client_nom"], Value::Null, "{row}");
                assert_eq!(row["anomalies"], serde_json::json!(["client_introuvable"]), "{row}");
            }
            "CMD-000005" => {
                // A value that does not fit its column is null there; the document keeps it.
                assert_eq!(row["montant_total"], Value::Null, "{row}");
                assert_eq!(row["anomalies"], serde_json::json!(["montant_total_invalide"]), "{row}");
            }
            _ => {
                assert_eq!(row["montant_total"], 31.0, "{row}");
                assert_eq!(row["client_nom"], "Martin", "{row}");
            }
        }
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_racing_on_one_table_write_each_order_once() {
    let (t, refs) = TestEnv::seeded("lake_race").await;
    seed(&t, &refs).await;
    let table = t.dir.path().join("lake/orders");
    let uri = format!("file://{}", table.display());
    // Small chunks and commits: many commits from each, interleaved.
    let run = || {
        t.archiver(&["batch", "--date-from", "2026-03-01", "--date-to", "2026-03-03", "--chunk-size", "3"])
            .envs([("ARCHIVE_SINK", "delta"), ("ARCHIVE_TABLE_URI", uri.as_str())])
            .spawn()
            .unwrap()
    };
    // Three at once, from before the table exists: its creation is raced too.
    let mut runs: Vec<_> = (0..3).map(|_| run()).collect();
    for child in &mut runs {
        assert!(child.wait().unwrap().success());
    }
    let read = read_back(&table);
    assert_eq!(read["rows"], 20, "{read}");
    assert_eq!(read["distinct_ids"], 20, "{read}");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_of_other_columns_is_refused() {
    let (t, refs) = TestEnv::seeded("lake_layout").await;
    seed(&t, &refs).await;
    let table = t.dir.path().join("lake/orders");
    let uri = format!("file://{}", table.display());
    let lake = [("ARCHIVE_SINK", "delta"), ("ARCHIVE_TABLE_URI", uri.as_str())];
    let args = ["batch", "--date-from", "2026-03-01", "--date-to", "2026-03-03"];
    assert!(t.archiver(&args).envs(lake).output().unwrap().status.success());
    // Other customer fields: other columns.
    let out = t.archiver(&args).envs(lake).env("ARCHIVER_LOOKUPS__CLIENT__FIELDS", "[\"nom\"]").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("columns differ"), "{stderr}");
    assert_eq!(read_back(&table)["rows"], 20, "the table is left as it was");

    let out = t.archiver(&args).env("ARCHIVE_SINK", "delta").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no table named");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ARCHIVE_TABLE_URI"));
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_commits_rows_with_its_position_and_a_killed_watch_resumes_from_the_table() {
    let (t, refs, table, lake) = watching_a_table("lake_watch").await;
    let rows = |n: u64| committed(&table, n);
    let mut watch = t.watch().envs(&lake).until("change stream open").await;
    t.deliver(&refs, 0..10).await;
    common::eventually(30, "10 rows committed", || rows(10)).await;
    assert!(!t.token_file().exists(), "the position is in the table, not in a token file");

    // Killed with rows delivered and perhaps not committed; more delivered while it is down.
    t.deliver(&refs, 10..15).await;
    watch.kill().await;
    t.deliver(&refs, 15..20).await;
    let mut watch = t.watch().envs(&lake).until("change stream open").await;
    assert!(watch.log_contains("resuming after the saved token"), "{}", watch.stderr());
    t.deliver(&refs, 20..25).await;
    common::eventually(30, "25 rows committed", || rows(25)).await;
    let log = watch.stop_ok().await;
    let read = read_back(&table);
    assert_eq!((read["rows"].as_u64(), read["distinct_ids"].as_u64()), (Some(25), Some(25)), "{log}");
    let sources: Vec<&Value> = read["by_id"].as_object().unwrap().values().collect();
    assert_eq!(sources.len(), 25);

    // health reports the table, and the position watch keeps in it.
    let out = t.archiver(&["health"]).envs(lake.clone()).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_eq!(report["archive"]["sink"], "delta", "{report}");
    assert!(report["archive"]["files"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["resume_token"]["status"], "ok", "{report}");
    assert_eq!(report["resume_token"]["store"], "table", "{report}");
    t.cleanup().await;
}

/// A `watch` stopped (SIGTERM) long before its next commit is due commits the rows waiting
/// with the position that covers them: nothing waits for a commit that never comes, and the
/// next start resumes after those rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_watch_commits_the_rows_waiting_and_its_next_start_resumes_after_them() {
    let (t, refs, table, mut lake) = watching_a_table("lake_sigterm").await;
    lake[2].1 = "3600".to_owned();
    let archived = |watch: &common::Watcher| {
        let log = watch.stderr();
        log.lines()
            .filter(|line| line.contains("batch archived"))
            .filter_map(|line| line.split("inserted=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let mut watch = t.watch().envs(&lake).until("change stream open").await;
    t.deliver(&refs, 0..10).await;
    common::eventually(30, "10 orders archived", || std::future::ready(archived(&watch) == 10)).await;
    assert_eq!(read_back(&table)["rows"], 0, "committed before LAKE_COMMIT_SECS: {}", watch.stderr());
    // The metrics count the rows written to data files, before their commit.
    let metrics = common::unlabelled(&common::http_get(&common::health_addr(&watch), "/metrics").1);
    assert!(metrics.lines().any(|line| line == "archiver_orders_archived_total 10"), "{metrics}");
    let log = watch.stop_ok().await;
    assert_one_row_per_order(&table, 10, &log);

    let mut watch = t.watch().envs(&lake).until("change stream open").await;
    assert!(watch.log_contains("resuming after the saved token"), "{}", watch.stderr());
    t.deliver(&refs, 10..13).await;
    common::eventually(30, "3 more orders archived", || std::future::ready(archived(&watch) == 3)).await;
    let log = watch.stop_ok().await;
    assert_one_row_per_order(&table, 13, &log);
    t.cleanup().await;
}

/// `batch` run over the orders `watch` is archiving at the same time, on the same table: both
/// write the same orders, each commit racing the other's, and each order has one row.
#[tokio::test(flavor = "multi_thread")]
async fn batch_overlapping_watch_on_one_table_leaves_one_row_per_order() {
    let (t, refs, table, lake) = watching_a_table("lake_batch_and_watch").await;
    let mut watch = t.watch().envs(&lake).until("change stream open").await;
    t.deliver(&refs, 0..15).await;
    // `common::order` dates its orders on 2025-11-21.
    let batch = || {
        t.archiver(&["batch", "--chunk-size", "2", "--date-from", "2025-11-21", "--date-to", "2025-11-22"])
            .envs(lake.iter().map(|(k, v)| (*k, v)))
            .spawn()
            .unwrap()
    };
    let mut first = batch();
    t.deliver(&refs, 15..30).await;
    let mut second = batch();
    assert!(first.wait().unwrap().success());
    assert!(second.wait().unwrap().success());
    let all_in = || async { table.join("_delta_log").exists() && read_back(&table)["distinct_ids"] == 30 };
    common::eventually(30, "every order committed", all_in).await;
    let log = watch.stop_ok().await;
    assert_one_row_per_order(&table, 30, &log);
    t.cleanup().await;
}

/// `watch --catch-up` (and a gap-fill, which runs the same fill) archives the orders delivered
/// before it started into the table it watches for, never into the archive collection.
#[tokio::test(flavor = "multi_thread")]
async fn a_catch_up_archives_into_the_table_and_its_position_is_the_tables() {
    let (t, refs, table, lake) = watching_a_table("lake_catch_up").await;
    // Delivered before any watch ran.
    t.deliver(&refs, 0..12).await;
    let mut watch = t.watch().args(["--catch-up"]).envs(&lake).until("change stream open").await;
    common::eventually(30, "12 rows committed", || committed(&table, 12)).await;
    t.deliver(&refs, 12..15).await;
    common::eventually(30, "15 rows committed", || committed(&table, 15)).await;
    let log = watch.stop_ok().await;
    assert_eq!(t.archive_len().await, 0, "the catch-up wrote into the archive collection: {log}");
    let read = read_back(&table);
    assert_eq!((read["rows"].as_u64(), read["distinct_ids"].as_u64()), (Some(15), Some(15)), "{log}");
    assert!(!t.token_file().exists(), "the position is in the table, not in a token file: {log}");
    t.cleanup().await;
}

/// A data file that cannot be written loses the rows waiting with the writer: watch commits no
/// position past them, stops (exit 1), and its next start archives them from the table's last
/// commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_data_file_that_cannot_be_written_stops_watch_and_its_restart_loses_nothing() {
    let (t, refs, table, lake) = watching_a_table("lake_unwritable").await;
    let mut watch = t.watch().envs(&lake).until("change stream open").await;
    t.deliver(&refs, 0..5).await;
    common::eventually(30, "5 rows committed", || committed(&table, 5)).await;

    // The day's directory becomes a file (root ignores permissions): its next data file cannot
    // be created.
    let day = std::fs::read_dir(&table)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("delivery_date="))
        .expect("the day's directory");
    let moved = table.join("moved-away");
    std::fs::rename(&day, &moved).unwrap();
    std::fs::write(&day, "not a directory").unwrap();
    t.deliver(&refs, 5..10).await;
    let status = watch.wait(Duration::from_secs(90)).await;
    assert_eq!(status.code(), Some(1), "{}", watch.stderr());
    assert!(watch.stderr().contains("were lost"), "{}", watch.stderr());

    // The directory back, the next start archives the five from the table's last commit.
    std::fs::remove_file(&day).unwrap();
    std::fs::rename(&moved, &day).unwrap();
    let mut watch = t.watch().envs(&lake).until("change stream open").await;
    common::eventually(30, "10 rows committed", || committed(&table, 10)).await;
    let log = watch.stop_ok().await;
    assert_one_row_per_order(&table, 10, &log);
    t.cleanup().await;
}

/// The data files of the table's directory (referenced or not).
fn parquet_files(table: &Path) -> usize {
    fn walk(dir: &Path, n: &mut usize) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, n);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(table, &mut n);
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn compact_while_watch_writes_and_vacuum_leave_every_row_once_in_fewer_files() {
    let (t, refs, table, lake) = watching_a_table("lake_compact").await;
    let rows = |n: u64| committed(&table, n);
    let mut watch = t.watch().envs(&lake).until("change stream open").await;
    // Deliveries in waves, a commit (a file of today's partition) each.
    for wave in 0..4u32 {
        t.deliver(&refs, wave * 5..wave * 5 + 5).await;
        common::eventually(30, "the wave committed", || rows(u64::from(wave) * 5 + 5)).await;
    }
    let before = parquet_files(&table);
    assert!(before >= 4, "{before} files");

    // Compacted while watch keeps committing.
    t.deliver(&refs, 20..25).await;
    let out = t.archiver(&["compact"]).envs(lake.clone()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replaced: usize = stdout.split(" files into 1").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(replaced >= 4, "the waves' files made into one: {stdout}");
    t.deliver(&refs, 25..30).await;
    common::eventually(30, "every delivery committed", || rows(30)).await;
    // The default retention keeps what a reader of an older version may still read.
    let out = t.archiver(&["vacuum"]).envs(lake.clone()).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("vacuum: 0 "), "{}", String::from_utf8_lossy(&out.stdout));
    watch.stop_ok().await;

    let before_vacuum = parquet_files(&table);
    let out = t.archiver(&["vacuum", "--retention-days", "0"]).envs(lake.clone()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The files the compaction replaced are gone.
    let after = parquet_files(&table);
    assert!(
        after + replaced <= before_vacuum,
        "{after} files after vacuum, {before_vacuum} before, {replaced} replaced"
    );
    let read = read_back(&table);
    assert_eq!((read["rows"].as_u64(), read["distinct_ids"].as_u64()), (Some(30), Some(30)), "{read}");
    assert!(table.join("_delta_log/_last_checkpoint").exists(), "compact checkpoints the log");

    // On the collection, neither applies.
    let out = t.archiver(&["compact"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A table that is not there (a mistyped URI) is refused, and not made.
    let missing = t.dir.path().join("lake/typo");
    for command in [&["compact"][..], &["vacuum"]] {
        let out = t
            .archiver(command)
            .envs([
                ("ARCHIVE_SINK", "delta".to_owned()),
                ("ARCHIVE_TABLE_URI", format!("file://{}", missing.display())),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(stderr.contains("there is no Delta table"), "{stderr}");
        assert!(!missing.join("_delta_log").exists(), "{command:?} made a table");
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_compares_the_table_with_the_source_and_repair_fills_it() {
    let (t, refs, delivered, table, lake) = archived_into_a_table("lake_verify").await;
    let verify = |extra: &[&str]| {
        let out = t.archiver(&[&["verify", "--json"][..], &RANGE, extra].concat()).envs(lake.clone()).output().unwrap();
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), report)
    };
    let (code, report) = verify(&[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!((report["source_delivered"].as_u64(), report["archived"].as_u64()), (Some(20), Some(20)), "{report}");

    // One more delivered order in the range, not archived; one archived order cancelled since.
    let mut late = order(&refs, 30, "livrée");
    late.insert("date_commande", DateTime::parse_rfc3339_str("2026-03-02T09:00:00Z").unwrap());
    t.orders().insert_one(&late).await.unwrap();
    let cancelled = delivered[7].get_object_id("_id").unwrap();
    t.orders()
        .update_one(mongodb::bson::doc! { "_id": cancelled }, mongodb::bson::doc! { "$set": { "status": "annulée" } })
        .await
        .unwrap();
    let (code, report) = verify(&[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["missing"], serde_json::json!([late.get_object_id("_id").unwrap().to_hex()]), "{report}");
    assert_eq!(report["orphaned"], serde_json::json!([cancelled.to_hex()]), "{report}");

    let (_, report) = verify(&["--repair"]);
    assert_eq!(report["repaired"], 1, "{report}");
    assert_eq!(report["missing"], serde_json::json!([]), "{report}");
    assert_eq!(read_back(&table)["rows"], 21);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_deletes_only_orders_whose_row_in_the_table_has_their_digest() {
    let (t, refs, delivered, table, lake) = archived_into_a_table("lake_purge").await;
    // Changed since archived: its row's digest is another order's now.
    let changed = delivered[4].get_object_id("_id").unwrap();
    t.orders()
        .update_one(mongodb::bson::doc! { "_id": changed }, mongodb::bson::doc! { "$set": { "montant_total": 99.0 } })
        .await
        .unwrap();
    // Delivered in the range, never archived.
    let mut late = order(&refs, 40, "livrée");
    late.insert("date_commande", DateTime::parse_rfc3339_str("2026-03-02T09:00:00Z").unwrap());
    t.orders().insert_one(&late).await.unwrap();

    let out = t
        .archiver(&["purge", "--older-than", "2026-03-03", "--date-from", "2026-03-01"])
        .envs(lake.clone())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(6), "some kept: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<Document> = futures_util::TryStreamExt::try_collect(
        t.orders().find(mongodb::bson::doc! { "status": "livrée" }).await.unwrap(),
    )
    .await
    .unwrap();
    let mut left: Vec<ObjectId> = left.iter().map(|o| o.get_object_id("_id").unwrap()).collect();
    left.sort();
    let mut expected = vec![changed, late.get_object_id("_id").unwrap()];
    expected.sort();
    assert_eq!(left, expected, "only the changed and the unarchived orders stay: {stdout}");
    assert_eq!(read_back(&table)["rows"], 20, "the table keeps every row");

    // verify counts the purged rows as purged, not orphaned.
    let out = t.archiver(&[&["verify", "--json"][..], &RANGE].concat()).envs(lake.clone()).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["purged"], 19, "{report}");
    assert_eq!(report["orphaned"], serde_json::json!([]), "{report}");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_s3_batches_run_twice_or_racing_and_a_killed_watch_leave_one_row_per_order() {
    let (t, refs) = TestEnv::seeded("lake_s3").await;
    seed(&t, &refs).await;
    let s3 = common::s3::S3Server::start("archive");
    let mut env: Vec<(&str, String)> = s3.env();
    env.push(("ARCHIVE_SINK", "delta".to_owned()));
    let at = |uri: &str| {
        let mut env = env.clone();
        env.push(("ARCHIVE_TABLE_URI", uri.to_owned()));
        env
    };
    let range = ["--date-from", "2026-03-01", "--date-to", "2026-03-03"];

    // batch, then again: one row per order.
    let once = at("s3://archive/once");
    for expected in ["20 newly archived", "0 newly archived, 20 already archived"] {
        let out = t
            .archiver(&[&["batch"][..], &range].concat())
            .envs(once.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(expected), "{stdout}");
    }
    let read = read_back_at("s3://archive/once", &env);
    assert_eq!((read["rows"].as_u64(), read["distinct_ids"].as_u64()), (Some(20), Some(20)), "{read}");

    // Three at once, from before the table exists: the store's conditional writes decide.
    let raced = at("s3://archive/raced");
    let mut runs: Vec<_> = (0..3)
        .map(|_| {
            t.archiver(&[&["batch", "--chunk-size", "3"][..], &range].concat())
                .envs(raced.iter().map(|(k, v)| (*k, v.as_str())))
                .spawn()
                .unwrap()
        })
        .collect();
    for run in &mut runs {
        assert!(run.wait().unwrap().success());
    }
    let read = read_back_at("s3://archive/raced", &env);
    assert_eq!((read["rows"].as_u64(), read["distinct_ids"].as_u64()), (Some(20), Some(20)), "{read}");

    // watch, killed, restarted: resumes from the table's last commit.
    let mut streamed = at("s3://archive/streamed");
    streamed.push(("LAKE_COMMIT_SECS", "1".to_owned()));
    let rows = |n: u64| {
        let env = env.clone();
        async move { try_read_back_at("s3://archive/streamed", &env).is_some_and(|read| read["rows"].as_u64() == Some(n)) }
    };
    let mut watch = t.watch().envs(&streamed).until("change stream open").await;
    t.deliver(&refs, 100..105).await;
    common::eventually(30, "5 rows on S3", || rows(5)).await;
    t.deliver(&refs, 105..110).await;
    watch.kill().await;
    let mut watch = t.watch().envs(&streamed).until("change stream open").await;
    t.deliver(&refs, 110..115).await;
    common::eventually(30, "15 rows on S3", || rows(15)).await;
    let log = watch.stop_ok().await;
    assert!(!log.contains("archiver-test-secret"), "no secret printed:\n{log}");
    let read = read_back_at("s3://archive/streamed", &env);
    assert_eq!(read["distinct_ids"].as_u64(), Some(15), "{read}");

    // compact, then vacuum with no retention, on the store: the rows stay, once each.
    for command in [&["compact"][..], &["vacuum", "--retention-days", "0"]] {
        let out = t.archiver(command).envs(streamed.iter().map(|(k, v)| (*k, v))).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{command:?}: {said}");
        assert!(!said.contains("archiver-test-secret"), "no secret printed:\n{said}");
        if command[0] == "compact" {
            assert!(said.contains(" files into 1"), "watch's commits made into one file: {said}");
        }
    }
    let read = read_back_at("s3://archive/streamed", &env);
    assert_eq!((read["rows"].as_u64(), read["distinct_ids"].as_u64()), (Some(15), Some(15)), "{read}");
    t.cleanup().await;
}
