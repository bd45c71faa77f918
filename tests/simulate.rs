//! `archiver simulate` against a real server: reproducible data that follows the data model,
//! `--drop` and adding runs, usage errors that write nothing, and live mode.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{Output, TestEnv};
use futures_util::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};

const REFERENCE_COLLECTIONS: [&str; 4] = ["Client", "Livreur", "Restaurants", "Menu"];
const END_DATE: &str = "2026-01-01";

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "archiver exited with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
}

async fn all(t: &TestEnv, collection: &str) -> Vec<Document> {
    t.db.collection::<Document>(collection)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

async fn count(t: &TestEnv, collection: &str, filter: Document) -> u64 {
    t.db.collection::<Document>(collection).count_documents(filter).await.unwrap()
}

fn ids(docs: &[Document]) -> HashSet<ObjectId> {
    docs.iter().map(|d| d.get_object_id("_id").unwrap()).collect()
}

fn numbers(orders: &[Document]) -> Vec<String> {
    let mut numbers: Vec<String> = orders.iter().map(|o| o.get_str("numero_commande").unwrap().to_owned()).collect();
    numbers.sort();
    numbers
}

fn expected_numbers(n: u64) -> Vec<String> {
    (1..=n).map(|i| format!("CMD-{i:06}")).collect()
}

/// Numbers of the live summary line: status changes, delivered, cancelled, orders created.
fn live_summary(stdout: &str) -> [u64; 4] {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("simulate live:"))
        .unwrap_or_else(|| panic!("no live summary on stdout:\n{stdout}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|w| !w.is_empty() && !w.contains('.'))
        .map(|w| w.parse().unwrap())
        .collect();
    [numbers[0], numbers[1], numbers[2], numbers[3]]
}

#[tokio::test]
async fn same_seed_gives_identical_data_and_another_seed_does_not() {
    let a = TestEnv::new("sim_seed_a").await;
    let b = TestEnv::new("sim_seed_b").await;
    let c = TestEnv::new("sim_seed_c").await;
    let args = ["simulate", "--count", "300", "--seed", "42", "--end-date", END_DATE, "--days", "10"];
    assert_success(&a.run(&args));
    assert_success(&b.run(&args));
    let mut other = args;
    other[4] = "43";
    assert_success(&c.run(&other));

    for collection in REFERENCE_COLLECTIONS.iter().chain(&["Commandes"]) {
        let (docs_a, docs_b) = (all(&a, collection).await, all(&b, collection).await);
        assert!(!docs_a.is_empty(), "{collection} is empty");
        assert_eq!(docs_a, docs_b, "{collection} differs between two runs with the same seed");
        let docs_c = all(&c, collection).await;
        assert!(ids(&docs_a).is_disjoint(&ids(&docs_c)), "{collection}: another seed gave the same ids");
    }

    // Dates come from --end-date and --days, not from the clock; ids carry the order date.
    let from = "2025-12-22T00:00:00Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp_millis();
    let to = "2026-01-01T00:00:00Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp_millis();
    for order in all(&a, "Commandes").await {
        let placed = order.get_datetime("date_commande").unwrap().timestamp_millis();
        assert!((from..to).contains(&placed), "date_commande out of range: {order}");
        let id_secs = order.get_object_id("_id").unwrap().timestamp().timestamp_millis() / 1000;
        assert_eq!(id_secs, placed / 1000, "the id's timestamp is not the order date: {order}");
    }
    for t in [a, b, c] {
        t.cleanup().await;
    }
}

#[tokio::test]
async fn seeded_orders_follow_the_data_model() {
    let t = TestEnv::new("sim_model").await;
    let out = t.run(&["simulate", "--count", "2000", "--seed", "7", "--p-delivered", "0.4", "--end-date", END_DATE]);
    assert_success(&out);
    assert!(out.stdout.contains("inserted 2000 Commandes"), "{}", out.stdout);

    let clients = all(&t, "Client").await;
    let livreurs = all(&t, "Livreur").await;
    let restaurants = all(&t, "Restaurants").await;
    let menu = all(&t, "Menu").await;
    let orders = all(&t, "Commandes").await;
    assert_eq!(orders.len(), 2000);
    assert_eq!((clients.len(), livreurs.len(), restaurants.len()), (400, 100, 40));
    assert!((200..=600).contains(&menu.len()), "{} menu entries for 40 restaurants", menu.len());
    assert_eq!(numbers(&orders), expected_numbers(2000), "numero_commande not CMD-000001..CMD-002000, unique");

    for client in &clients {
        let adresse = client.get_document("adresse").unwrap();
        assert!(client.get_str("email").unwrap().contains('@'), "{client}");
        assert!(!client.get_str("telephone").unwrap().is_empty() && !client.get_str("nom").unwrap().is_empty());
        assert!(!adresse.get_str("rue").unwrap().is_empty() && !adresse.get_str("ville").unwrap().is_empty());
        let code = adresse.get_str("code_postal").unwrap();
        assert!(code.len() == 5 && code.chars().all(|c| c.is_ascii_digit()), "{client}");
    }

    let client_ids = ids(&clients);
    let livreur_ids = ids(&livreurs);
    let restaurant_ids = ids(&restaurants);
    let dishes: HashMap<ObjectId, (ObjectId, f64)> = menu
        .iter()
        .map(|m| {
            (m.get_object_id("_id").unwrap(), (m.get_object_id("restaurant_id").unwrap(), m.get_f64("prix").unwrap()))
        })
        .collect();
    let mut by_status: HashMap<String, usize> = HashMap::new();
    for order in &orders {
        let status = order.get_str("status").unwrap();
        *by_status.entry(status.to_owned()).or_default() += 1;
        assert!(client_ids.contains(&order.get_object_id("client_id").unwrap()), "unknown client: {order}");
        let restaurant = order.get_object_id("restaurant_id").unwrap();
        assert!(restaurant_ids.contains(&restaurant), "unknown restaurant: {order}");
        let placed = order.get_datetime("date_commande").unwrap();
        let items = order.get_array("items").unwrap();
        assert!((1..=5).contains(&items.len()), "{order}");
        let mut sum = 0.0;
        for item in items {
            let item = item.as_document().unwrap();
            let (dish_restaurant, prix) = dishes[&item.get_object_id("menu_id").unwrap()];
            assert_eq!(dish_restaurant, restaurant, "a dish from another restaurant: {order}");
            let quantite = item.get_i32("quantite").unwrap();
            assert!(quantite >= 1);
            sum += prix * f64::from(quantite);
        }
        let total = order.get_f64("montant_total").unwrap();
        assert!((total - sum).abs() < 0.005, "montant_total {total} is not the items' sum {sum}: {order}");
        match status {
            "livrée" => {
                let delivered = order.get_datetime("date_livraison").unwrap();
                assert!(delivered >= placed, "delivered before ordered: {order}");
                assert!(livreur_ids.contains(&order.get_object_id("livreur_id").unwrap()), "{order}");
            }
            "en_attente" => {
                assert_eq!(order.get("livreur_id"), Some(&Bson::Null), "{order}");
                assert_eq!(order.get("date_livraison"), Some(&Bson::Null), "{order}");
            }
            "en_preparation" | "en_livraison" | "annulée" => {
                assert_eq!(order.get("date_livraison"), Some(&Bson::Null), "{order}");
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    let delivered = by_status.get("livrée").copied().unwrap_or(0) as f64 / 2000.0;
    assert!((0.33..=0.47).contains(&delivered), "delivered fraction {delivered}: {by_status:?}");
    for status in ["en_attente", "en_preparation", "en_livraison", "annulée"] {
        assert!(by_status.get(status).copied().unwrap_or(0) > 0, "no {status}: {by_status:?}");
    }
    assert!(by_status["annulée"] < 200, "cancelled is not a small share: {by_status:?}");
    t.cleanup().await;
}

#[tokio::test]
async fn drop_empties_first_and_without_drop_a_run_adds() {
    let t = TestEnv::new("sim_drop").await;
    assert_success(&t.run(&["simulate", "--count", "100", "--seed", "1", "--end-date", END_DATE]));
    let clients_before = all(&t, "Client").await;

    // Same seed again, no --drop: new orders after the existing ones, references reused.
    assert_success(&t.run(&["simulate", "--count", "50", "--seed", "1", "--end-date", END_DATE]));
    let orders = all(&t, "Commandes").await;
    assert_eq!(orders.len(), 150);
    assert_eq!(numbers(&orders), expected_numbers(150));
    assert_eq!(all(&t, "Client").await, clients_before, "references were not reused as they were");

    t.archive().insert_one(doc! { "_id": 1 }).await.unwrap();
    t.db.collection::<Document>("Commandes_archive_errors").insert_one(doc! { "_id": 1 }).await.unwrap();
    t.db.collection::<Document>("Autre").insert_one(doc! { "_id": 1 }).await.unwrap();

    let out = t.run(&["simulate", "--count", "30", "--seed", "1", "--end-date", END_DATE, "--drop"]);
    assert_success(&out);
    let orders = all(&t, "Commandes").await;
    assert_eq!(numbers(&orders), expected_numbers(30), "--drop did not empty the orders first");
    assert_eq!(count(&t, "Client", doc! {}).await, 10, "--drop did not empty the customers first");
    assert_eq!(count(&t, "Commandes_archive", doc! {}).await, 0);
    assert_eq!(count(&t, "Commandes_archive_errors", doc! {}).await, 0);
    assert_eq!(count(&t, "Autre", doc! {}).await, 1, "--drop dropped a collection it does not own");
    t.cleanup().await;
}

#[tokio::test]
async fn invalid_arguments_exit_2_and_write_nothing() {
    let t = TestEnv::new("sim_usage").await;
    t.orders().insert_one(doc! { "_id": 1, "numero_commande": "CMD-000001" }).await.unwrap();
    for args in [
        &["simulate", "--drop", "--p-delivered", "1.5"][..],
        &["simulate", "--drop", "--p-delivered=-0.2"],
        &["simulate", "--drop", "--live", "--rate", "0"],
        &["simulate", "--drop", "--duration", "3"],
    ] {
        let out = t.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}\n{}", out.stdout, out.stderr);
    }
    let out = t.run(&["simulate", "--p-delivered", "1.5"]);
    assert!(out.stderr.contains("--p-delivered"), "the error does not name the option: {}", out.stderr);
    assert_eq!(count(&t, "Commandes", doc! {}).await, 1, "a refused run touched the orders");
    let mut names = t.db.list_collection_names().await.unwrap();
    names.sort();
    assert_eq!(names, ["Commandes"], "a refused run created collections");
    t.cleanup().await;
}

#[tokio::test]
async fn live_mode_moves_orders_to_delivery_and_summarizes() {
    let t = TestEnv::new("sim_live").await;
    assert_success(&t.run(&["simulate", "--count", "200", "--seed", "5", "--p-delivered", "0.2"]));
    let delivered = doc! { "status": "livrée" };
    let delivered_before = count(&t, "Commandes", delivered.clone()).await;

    let started = Instant::now();
    let out = t.run(&["simulate", "--count", "0", "--seed", "6", "--live", "--rate", "50", "--duration", "3"]);
    assert_success(&out);
    assert!(started.elapsed() < Duration::from_secs(20), "live mode ran {:?}", started.elapsed());
    let [changes, delivered_live, _cancelled, created] = live_summary(&out.stdout);
    assert!(changes >= 60, "{changes} status changes in 3 s at 50/s: {}", out.stdout);
    assert!(out.stderr.contains("live simulation stopped"), "no summary event: {}", out.stderr);

    let delivered_after = count(&t, "Commandes", delivered.clone()).await;
    assert!(delivered_after > delivered_before, "no delivery in live mode");
    assert_eq!(delivered_after - delivered_before, delivered_live, "the summary miscounts deliveries");
    assert_eq!(count(&t, "Commandes", doc! {}).await, 200 + created, "the summary miscounts new orders");
    for order in all(&t, "Commandes").await {
        if order.get_str("status").unwrap() == "livrée" {
            let placed = order.get_datetime("date_commande").unwrap();
            assert!(order.get_datetime("date_livraison").unwrap() >= placed, "{order}");
            assert!(order.get_object_id("livreur_id").is_ok(), "{order}");
        }
    }
    assert_eq!(numbers(&all(&t, "Commandes").await), expected_numbers(200 + created));
    t.cleanup().await;
}

#[tokio::test]
async fn live_mode_on_an_empty_database_stops_cleanly_on_sigterm() {
    let t = TestEnv::new("sim_live_term").await;
    let child = t
        .archiver(&["simulate", "--count", "0", "--live", "--rate", "40"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    // Until it has created orders, i.e. it seeded the references and is running.
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&t, "Commandes", doc! {}).await < 5 {
        assert!(Instant::now() < deadline, "live mode created no orders");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = tokio::time::timeout(Duration::from_secs(20), waited)
        .await
        .expect("live mode did not stop within 20 s of SIGTERM")
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let [changes, _, _, created] = live_summary(&stdout);
    assert!(changes > 0 && created >= 5, "{stdout}");
    assert_eq!(count(&t, "Commandes", doc! {}).await, created);
    for collection in REFERENCE_COLLECTIONS {
        assert!(count(&t, collection, doc! {}).await > 0, "{collection} not seeded");
    }
    t.cleanup().await;
}

#[tokio::test]
async fn numbering_continues_after_the_highest_number_compared_as_a_number() {
    let t = TestEnv::new("sim_numbers").await;
    t.orders()
        .insert_many([
            doc! { "numero_commande": "CMD-999999" },
            doc! { "numero_commande": "CMD-1000000" },
            doc! { "numero_commande": "ZZZ-2000000" },
            doc! { "numero_commande": 5_000_000 },
        ])
        .await
        .unwrap();
    assert_success(&t.run(&["simulate", "--count", "3", "--seed", "2"]));
    for n in ["CMD-1000001", "CMD-1000002", "CMD-1000003"] {
        assert_eq!(count(&t, "Commandes", doc! { "numero_commande": n }).await, 1, "{n} missing or repeated");
    }
    assert_eq!(count(&t, "Commandes", doc! {}).await, 7);
    t.cleanup().await;
}
