//! `archiver verify`: reconciliation report, exit codes, and repair.

mod common;

use common::{order, TestEnv};
use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime};

#[tokio::test(flavor = "multi_thread")]
async fn reports_missing_and_orphaned_ids_per_day_and_repairs() {
    let t = TestEnv::new("verify").await;
    let refs = t.seed_references().await;
    let dated = |n: u32, iso: &str| {
        let mut o = order(&refs, n, "livrée");
        o.insert("date_commande", DateTime::parse_rfc3339_str(iso).unwrap());
        o
    };
    let orders =
        vec![dated(1, "2026-05-01T10:00:00Z"), dated(2, "2026-05-01T11:00:00Z"), dated(3, "2026-05-02T09:00:00Z")];
    t.orders().insert_many(orders.clone()).await.unwrap();
    let range = ["--date-from", "2026-05-01", "--date-to", "2026-05-03"];
    assert!(t.run(&[&["batch"][..], &range].concat()).status.success());

    let ok = t.run(&[&["verify"][..], &range].concat());
    assert_eq!(ok.status.code(), Some(0), "{}{}", ok.stdout, ok.stderr);
    assert!(ok.stdout.contains("consistent"), "{}", ok.stdout);

    // One archived order lost, one stray archive document, one order no longer delivered.
    let lost = orders[0].get_object_id("_id").unwrap();
    t.archive().delete_one(doc! { "_id": lost }).await.unwrap();
    let stray = ObjectId::new();
    t.archive()
        .insert_one(
            doc! { "_id": stray, "date_commande": DateTime::parse_rfc3339_str("2026-05-02T12:00:00Z").unwrap() },
        )
        .await
        .unwrap();
    let undelivered = orders[2].get_object_id("_id").unwrap();
    t.orders().update_one(doc! { "_id": undelivered }, doc! { "$set": { "status": "annulée" } }).await.unwrap();

    let out = t.run(&[&["verify", "--json"][..], &range].concat());
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["consistent"], false);
    assert_eq!(report["missing"], serde_json::json!([lost.to_hex()]));
    let mut orphans: Vec<String> =
        report["orphaned"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    orphans.sort();
    let mut expected = vec![stray.to_hex(), undelivered.to_hex()];
    expected.sort();
    assert_eq!(orphans, expected);
    assert_eq!(
        report["days"][0],
        serde_json::json!({"day": "2026-05-01", "source": 2, "archive": 1, "missing": 1, "orphaned": 0, "purged": 0})
    );
    assert_eq!(
        report["days"][1],
        serde_json::json!({"day": "2026-05-02", "source": 0, "archive": 2, "missing": 0, "orphaned": 2, "purged": 0})
    );

    let human = t.run(&[&["verify"][..], &range].concat());
    assert!(human.stdout.contains("DIFFERENT") && human.stdout.contains(&lost.to_hex()), "{}", human.stdout);

    let repaired = t.run(&[&["verify", "--repair", "--json"][..], &range].concat());
    let report: serde_json::Value = serde_json::from_str(&repaired.stdout).unwrap();
    assert_eq!(report["repaired"], 1);
    assert_eq!(report["missing"], serde_json::json!([]));
    assert_eq!(repaired.status.code(), Some(1), "orphans remain: the archive is never pruned");
    assert!(t.archive().find_one(doc! { "_id": lost }).await.unwrap().is_some());

    t.archive().delete_many(doc! { "_id": { "$in": [stray, undelivered] } }).await.unwrap();
    let clean = t.run(&[&["verify"][..], &range].concat());
    assert_eq!(clean.status.code(), Some(0), "{}", clean.stdout);
    let bad = t.run(&["verify", "--date-from", "soon"]);
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);
    t.cleanup().await;
}

/// MongoDB compares ids by value across numeric types (`{_id: 1}` and `{_id: NumberLong(1)}`
/// are one key); verify used to compare them by type, and reported such an order both missing
/// and orphaned.
#[tokio::test(flavor = "multi_thread")]
async fn numerically_equal_ids_of_other_types_are_the_same_order() {
    let t = TestEnv::new("verify_numeric").await;
    let refs = t.seed_references().await;
    let day = DateTime::parse_rfc3339_str("2026-05-01T10:00:00Z").unwrap();
    let pairs = [
        (Bson::Int32(1), Bson::Int64(1)),
        (Bson::Int64(2), Bson::Double(2.0)),
        (Bson::Double(3.0), Bson::Int32(3)),
        (Bson::Document(doc! { "shop": 4 }), Bson::Document(doc! { "shop": 4_i64 })),
    ];
    for (n, (source_id, archived_id)) in pairs.iter().enumerate() {
        let mut o = order(&refs, n as u32, "livrée");
        o.insert("_id", source_id.clone());
        o.insert("date_commande", day);
        t.orders().insert_one(o).await.unwrap();
        t.archive().insert_one(doc! { "_id": archived_id.clone(), "date_commande": day }).await.unwrap();
    }
    let range = ["--date-from", "2026-05-01", "--date-to", "2026-05-02"];
    let out = t.run(&[&["verify", "--json"][..], &range].concat());
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["missing"], serde_json::json!([]));
    assert_eq!(report["orphaned"], serde_json::json!([]));
    assert_eq!(report["source_delivered"], 4);
    assert_eq!(report["archived"], 4);

    // A different number is still a different order.
    t.archive().delete_one(doc! { "_id": 3 }).await.unwrap();
    t.archive().insert_one(doc! { "_id": 3.5, "date_commande": day }).await.unwrap();
    let out = t.run(&[&["verify", "--json"][..], &range].concat());
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["missing"], serde_json::json!(["3.0"]));
    assert_eq!(report["orphaned"], serde_json::json!(["3.5"]));
    t.cleanup().await;
}

/// The repair checks what it archived chunk by chunk; it used to name every missing id in one
/// `$in`, past the 16 MB command limit for about 800,000 ObjectIds.
#[tokio::test(flavor = "multi_thread")]
async fn repair_of_more_missing_orders_than_one_chunk() {
    let t = TestEnv::new("verify_chunks").await;
    let refs = t.seed_references().await;
    // Verify queries 1,000 ids at a time: two and a half chunks.
    let count = 2_500u32;
    t.orders().insert_many((0..count).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    let range = ["--date-from", "2000-01-01"];
    let out = t.run(&[&["verify", "--json"][..], &range].concat());
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["missing"].as_array().unwrap().len(), count as usize);

    let out = t.run(&[&["verify", "--repair", "--json"][..], &range].concat());
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["repaired"], count);
    assert_eq!(report["missing"], serde_json::json!([]));
    assert_eq!(report["consistent"], true);
    t.assert_archive_matches_delivered().await;
    t.cleanup().await;
}
