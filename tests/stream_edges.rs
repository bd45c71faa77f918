//! The change stream's edges: deliveries the filter must see whatever the shape of the update,
//! transactions that deliver an order and change its references, a saved position that keeps
//! advancing whatever the traffic, and references that change kind under a running `watch`.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{Mode, Proxy};
use common::{order, Refs, TestEnv};
use mongodb::bson::{doc, oid::ObjectId, Document};

/// A `watch` of `t` that keeps the references it reads (its stream carries their changes), once
/// it archived one order (number 0), so that the references it read are kept.
async fn keeping_references_after_one_order(t: &TestEnv, refs: &Refs) -> common::Watcher {
    let watch = t.watch().start().await;
    assert!(watch.log_contains("references_kept=true"), "{}", watch.stderr());
    t.deliver(refs, [0]).await;
    t.wait_archived(1).await;
    watch
}

/// The resume token saved in `t`'s token file.
fn saved_token(t: &TestEnv) -> serde_json::Value {
    let text = std::fs::read_to_string(t.token_file()).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text).map(|v| v["resume_token"].clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dotted_status_field_is_matched_whatever_the_update_sets() {
    let (t, refs) = TestEnv::seeded("dottedstatus").await;
    let mut watch = t.watch().env("ARCHIVER_ORDERS__FIELDS__STATUS", "suivi.etat").start().await;
    let orders: Vec<Document> = (0..20)
        .map(|n| {
            let mut o = order(&refs, n, "en_livraison");
            o.remove("status");
            o.insert("suivi", doc! { "etat": "en_livraison", "depuis": n });
            o
        })
        .collect();
    t.orders().insert_many(&orders).await.unwrap();
    for (n, o) in orders.iter().enumerate() {
        let id = o.get("_id").unwrap();
        let update = match n % 3 {
            // The dotted path itself: the change event names it as one field "suivi.etat".
            0 => doc! { "$set": { "suivi.etat": "livrée" } },
            // The parent document as a whole.
            1 => doc! { "$set": { "suivi": { "etat": "livrée", "depuis": 0 } } },
            // The dotted path with another field of the parent.
            _ => doc! { "$set": { "suivi.etat": "livrée", "suivi.depuis": 99 } },
        };
        t.orders().update_one(doc! { "_id": id }, update).await.unwrap();
    }
    // Not deliveries: another field of the parent, and another value.
    t.orders().update_many(doc! {}, doc! { "$set": { "suivi.note": "livrée" } }).await.unwrap();
    t.wait_archived(20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(t.archive_len().await, 20);
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_saved_position_advances_under_reference_traffic_alone() {
    let (t, refs) = TestEnv::seeded("reftraffic").await;
    let mut watch = keeping_references_after_one_order(&t, &refs).await;
    // The orders collection quiet, a customer edited every 50 ms.
    let clients = t.db.collection::<Document>("Client");
    let mut last = saved_token(&t);
    let mut advances = 0;
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(6) {
        n += 1;
        clients.update_one(doc! { "_id": refs.client }, doc! { "$set": { "telephone": n } }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = saved_token(&t);
        if now != last {
            advances += 1;
            last = now;
        }
    }
    assert!(advances >= 3, "the saved position advanced {advances} times in 6 s: {}", watch.stderr());
    let log = watch.stop_ok().await;
    assert!(!log.contains("HISTORY LOST"), "{log}");
    // A watch that does not keep references resumes from that position with nothing lost.
    t.deliver(&refs, [1, 2]).await;
    let mut watch = t.watch().env("REFERENCE_CACHE_ENTRIES", "0").start().await;
    t.wait_all_archived(3).await;
    let log = watch.stop_ok().await;
    assert!(!log.contains("HISTORY LOST"), "{log}");
    t.assert_archive_matches_delivered().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reference_collection_replaced_by_a_view_is_never_kept_stale() {
    let (t, refs) = TestEnv::seeded("laterview").await;
    let mut watch = keeping_references_after_one_order(&t, &refs).await;
    // The couriers move to another collection, and a view takes the old name.
    let source = t.db.collection::<Document>("Livreur_source");
    source.insert_one(doc! { "_id": refs.livreur, "nom": "Avant", "vehicule": "vélo" }).await.unwrap();
    t.db.collection::<Document>("Livreur").drop().await.unwrap();
    t.db.run_command(doc! { "create": "Livreur", "viewOn": "Livreur_source", "pipeline": [] }).await.unwrap();
    t.deliver(&refs, [1]).await;
    t.wait_archived(2).await;
    // A change of the view's collection, which no event of the stream names.
    source.update_one(doc! { "_id": refs.livreur }, doc! { "$set": { "nom": "Après" } }).await.unwrap();
    t.deliver(&refs, [2]).await;
    t.wait_archived(3).await;
    watch.stop_ok().await;
    let courier = |n: u32| {
        let archive = t.archive();
        async move {
            let numero = format!("CMD-{n:06}");
            let d = archive.find_one(doc! { "numero_commande": numero }).await.unwrap().unwrap();
            d.get_document("livreur").map(|l| l.get_str("nom").unwrap_or_default().to_owned()).unwrap_or_default()
        }
    };
    assert_eq!(courier(1).await, "Avant");
    assert_eq!(courier(2).await, "Après", "the courier as of the delivery, not as first read through the view");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_that_delivers_an_order_and_renames_its_customer_archives_the_new_name() {
    let (t, refs) = TestEnv::seeded("txnrefs").await;
    let clients = t.db.collection::<Document>("Client");
    let customers: Vec<ObjectId> = (0..150).map(|_| ObjectId::new()).collect();
    let customer_docs = customers.iter().map(|id| doc! { "_id": id, "nom": "Avant", "prenom": "Léa" });
    clients.insert_many(customer_docs).await.unwrap();
    let for_customer = |n: usize, status: &str| {
        let mut o = order(&refs, n as u32, status);
        o.insert("client_id", customers[n]);
        o
    };
    let mut watch = t.watch().start().await;
    assert!(watch.log_contains("references_kept=true"), "{}", watch.stderr());
    // Every customer is in the cache before the transactions start.
    let first: Vec<Document> = (0..customers.len()).map(|n| for_customer(n, "livrée")).collect();
    t.orders().insert_many(&first).await.unwrap();
    t.wait_archived(150).await;
    let orders: Vec<Document> = (0..customers.len()).map(|n| for_customer(n, "en_livraison")).collect();
    t.orders().insert_many(&orders).await.unwrap();
    for (n, o) in orders.iter().enumerate() {
        let mut session = t.client.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        t.orders()
            .update_one(doc! { "_id": o.get("_id") }, doc! { "$set": { "status": "livrée" } })
            .session(&mut session)
            .await
            .unwrap();
        clients
            .update_one(doc! { "_id": customers[n] }, doc! { "$set": { "nom": "Après" } })
            .session(&mut session)
            .await
            .unwrap();
        session.commit_transaction().await.unwrap();
        // The writer goes idle between transactions, so that batches are cut right after a
        // delivery is read.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.wait_archived(300).await;
    watch.stop_ok().await;
    let mut stale = Vec::new();
    for o in &orders {
        let archived = t.archive().find_one(doc! { "_id": o.get("_id") }).await.unwrap().unwrap();
        let name = archived.get_document("client").unwrap().get_str("nom").unwrap().to_owned();
        if name != "Après" {
            stale.push(archived.get_str("numero_commande").unwrap().to_owned());
        }
    }
    assert!(
        stale.is_empty(),
        "{} of {} archived with the customer from before their transaction: {:?}",
        stale.len(),
        orders.len(),
        &stale[..stale.len().min(10)]
    );
}

/// The peak resident memory of a process, in MiB (Linux).
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_large_orders_is_enriched_a_slice_at_a_time() {
    // Slices used to be sized by a moving average of the documents written: a burst of large
    // orders after small ones was enriched and written whole.
    // On a server of its own: the test server keeps large oplog entries in memory, and every
    // change stream on it reads them.
    let (_server, t, refs) = TestEnv::seeded_on_own_server("largeburst", "").await;
    // A slow archive, so that the burst arrives while a write is under way and makes one batch.
    let archive = Proxy::for_uri(&t.uri).await;
    archive.set_mode(Mode::Latency(Duration::from_millis(150)));
    let mut watch = t.watch().env("BATCH_MAX_BYTES", "1048576").env("ARCHIVE_URI", archive.uri(&t.uri)).start().await;
    t.deliver(&refs, 0..50).await;
    t.wait_archived(50).await;
    // 40 orders of about 1 MB each (more once enriched), behind 20 small ones, all delivered by
    // one update while a write is under way.
    let item = doc! { "menu_id": refs.menu[0], "quantite": 2, "note": "x".repeat(40) };
    for n in 51..111 {
        let mut o = order(&refs, n, "en_livraison");
        if n >= 71 {
            o.insert("items", vec![item.clone(); 13_000]);
        }
        t.orders().insert_one(o).await.unwrap();
    }
    t.deliver(&refs, [50]).await;
    t.orders().update_many(doc! { "status": "en_livraison" }, doc! { "$set": { "status": "livrée" } }).await.unwrap();
    t.wait_archived_within(111, 120).await;
    let peak = peak_rss_mib(watch.child.id());
    watch.stop_ok().await;
    // What the burst weighs whole: 40 MB of orders, and more of archive documents.
    assert!(peak < 100, "peak RSS {peak} MiB while archiving 40 orders of 1 MB with BATCH_MAX_BYTES=1 MiB");
    t.assert_archive_matches_delivered().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_of_almost_16_mb_delivered_by_an_update_is_archived() {
    // 15.9 MB as stored: with the update's description its change event reaches 16 MB on the
    // server. The stream projects each event to a few fields before it leaves the server, and the
    // archive document keeps the order's own fields only: archived like any other.
    // On a server of its own, as above.
    let (_server, t, refs) = TestEnv::seeded_on_own_server("sixteenmb", "").await;
    let mut watch = t.watch().start().await;
    let mut big = order(&refs, 1, "en_livraison");
    big.insert("instructions", "x".repeat(15_900_000));
    let id = big.get_object_id("_id").unwrap();
    t.orders().insert_one(big).await.unwrap();
    t.orders()
        .update_one(doc! { "_id": id }, doc! { "$set": { "status": "livrée", "note": "y".repeat(50_000) } })
        .await
        .unwrap();
    t.deliver(&refs, [2]).await;
    t.wait_all_archived(2).await;
    t.deliver(&refs, [3]).await;
    t.wait_all_archived(3).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_event_too_large_to_send_is_read_past_and_its_order_archived() {
    // The server's answer to a change event over 16 MB (which SecantusDB never gives) on the
    // stream's getMore, then on each resume from the same position: `watch` used to exit.
    let (t, refs) = TestEnv::seeded("toolarge").await;
    let wire = common::wire::Injector::start(common::proxy::upstream_of(&t.uri)).await;
    let mut watch = t.watch().env("MONGODB_URI", wire.uri(&t.uri)).env("RETRY_MAX_DELAY_MS", "500").start().await;
    t.deliver(&refs, [0]).await;
    t.wait_archived(1).await;
    wire.fail_with_too_large(1, 2);
    t.deliver(&refs, [1, 2]).await;
    common::eventually(30, "the stream meets every injected answer", || async { wire.injected() == 3 }).await;
    t.wait_all_archived(3).await;
    assert!(watch.log_contains("too large for the server to send"), "{}", watch.stderr());
    assert!(watch.is_running(), "{}", watch.stderr());
    // Streaming goes on as before.
    t.deliver(&refs, [3]).await;
    t.wait_all_archived(4).await;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reference_cache_reports_its_hits_misses_invalidations_and_size() {
    let (t, refs) = TestEnv::seeded("cache_metrics").await;
    let watch = keeping_references_after_one_order(&t, &refs).await;
    let addr = common::health_addr(&watch);
    let value = |metrics: &str, name: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name}:\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // A batch's cache counts are reported just after its documents are written: the metrics are
    // read once they count the references of `batches` batches (five an order).
    let metrics_after = |batches: f64| {
        let addr = addr.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let metrics = common::unlabelled(&common::http_get(&addr, "/metrics").1);
                let named = value(&metrics, "archiver_reference_cache_hits_total")
                    + value(&metrics, "archiver_reference_cache_misses_total");
                if named >= 5.0 * batches {
                    return metrics;
                }
                assert!(std::time::Instant::now() < deadline, "the batch's counts are not reported:\n{metrics}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    let metrics = metrics_after(1.0).await;
    // The first order read its customer, courier, restaurant and dishes.
    let misses = value(&metrics, "archiver_reference_cache_misses_total");
    assert!(misses >= 4.0, "{metrics}");
    assert!(value(&metrics, "archiver_reference_cache_entries") >= 4.0, "{metrics}");
    assert_eq!(value(&metrics, "archiver_reference_cache_enabled"), 1.0, "{metrics}");

    // The same references again: all found in the cache.
    t.deliver(&refs, [1]).await;
    t.wait_archived(2).await;
    let metrics = metrics_after(2.0).await;
    assert!(value(&metrics, "archiver_reference_cache_hits_total") >= 4.0, "{metrics}");
    assert_eq!(value(&metrics, "archiver_reference_cache_misses_total"), misses, "{metrics}");

    // The customer changes: forgotten, then read again for the next order.
    t.db.collection::<Document>("Client")
        .update_one(doc! { "_id": refs.client }, doc! { "$set": { "nom": "Durand" } })
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    t.deliver(&refs, [2]).await;
    t.wait_archived(3).await;
    let metrics = metrics_after(3.0).await;
    assert!(value(&metrics, "archiver_reference_cache_invalidations_total") >= 1.0, "{metrics}");
    assert_eq!(value(&metrics, "archiver_reference_cache_misses_total"), misses + 1.0, "{metrics}");
    let mut watch = watch;
    watch.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_privilege_to_watch_the_database_it_is_said_once_however_often_the_stream_reopens() {
    let server = common::OwnServer::start("--auth");
    let admin = mongodb::Client::with_uri_str(&server.uri).await.unwrap();
    admin
        .database("admin")
        .run_command(doc! { "createUser": "admin", "pwd": "admin-pw", "roles": [{ "role": "root", "db": "admin" }] })
        .await
        .unwrap();
    let with_user = |user: &str, source: &str| {
        let uri = server.uri.replacen("mongodb://", &format!("mongodb://{user}:{user}-pw@"), 1);
        uri.replacen("/?", &format!("/?authSource={source}&"), 1)
    };
    let t = TestEnv::with_uri("privilege_once", with_user("admin", "admin")).await;
    let refs = t.seed_references().await;
    // The orders collection may be watched, the references read; the database may not be
    // watched. The archive is in a database of its own, read and written freely.
    let read = |collection: &str, actions: Vec<&str>| {
        doc! { "resource": { "db": &t.db_name, "collection": collection }, "actions": actions }
    };
    let archive_db = format!("{}_archive", t.db_name);
    t.db.run_command(doc! {
        "createRole": "ordersOnly",
        "privileges": [
            read("Commandes", vec!["find", "changeStream"]),
            read("Client", vec!["find"]), read("Livreur", vec!["find"]),
            read("Restaurants", vec!["find"]), read("Menu", vec!["find"]),
            read("", vec!["listCollections"]),
        ],
        "roles": [],
    })
    .await
    .unwrap();
    t.db.run_command(doc! { "createUser": "archiver", "pwd": "archiver-pw",
    "roles": ["ordersOnly", { "role": "readWrite", "db": &archive_db }] })
        .await
        .unwrap();
    let proxy = Proxy::for_uri(&server.uri).await;
    let uri = proxy.uri(&with_user("archiver", &t.db_name));
    let mut watch = t
        .watch()
        .envs(&[("MONGODB_URI", uri.as_str()), ("ARCHIVE_DB", archive_db.as_str()), ("STREAM_TIMEOUT_MS", "1000")])
        .start()
        .await;
    let archive = t.client.database(&archive_db).collection::<Document>("Commandes_archive");
    let archived = |n: u64| {
        let archive = archive.clone();
        async move { archive.count_documents(doc! {}).await.unwrap() == n }
    };
    t.deliver(&refs, [0]).await;
    common::eventually(20, "the first order archived", || archived(1)).await;
    // Two reopenings of the stream: a silent network, past the stream's timeout.
    for n in [1, 2] {
        let reopened = watch.stderr().matches("change stream open").count();
        proxy.set_mode(Mode::Blackhole);
        common::eventually(30, "the silent stream given up", || async { watch.log_contains("does not answer") }).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.set_mode(Mode::Pass);
        t.deliver(&refs, [n]).await;
        common::eventually(30, "an order archived after the reopening", || archived(u64::from(n) + 1)).await;
        let now = watch.stderr().matches("change stream open").count();
        assert!(now > reopened, "the stream reopened:\n{}", watch.stderr());
    }
    let metrics = common::unlabelled(&common::http_get(&common::health_addr(&watch), "/metrics").1);
    assert!(metrics.contains("archiver_reference_cache_enabled 0"), "{metrics}");
    assert!(!metrics.contains("archiver_reconnects_total 0"), "the stream did reopen:\n{}", watch.stderr());
    let log = watch.stop_ok().await;
    assert_eq!(log.matches("no privilege to watch the whole source database").count(), 1, "said once:\n{log}");
    t.client.database(&archive_db).drop().await.ok();
}
