//! Beyond one process: the shared checkpoint, standby takeover with fencing, partitions.

mod common;

use std::time::Duration;

use archiver::coordination::partition::partition_expr;
use common::{eventually, health_addr, http_get, order, Delivery, Load, Pace, TestEnv, Watcher, SHARED_STORE};
use futures_util::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, Document};

async fn checkpoint(t: &TestEnv) -> Document {
    t.db.collection::<Document>("archiver_checkpoints").find_one(doc! {}).await.unwrap().expect("a shared checkpoint")
}

/// Instance `leader` leading on the shared store, then instance `standby` standing by.
async fn leader_and_standby(t: &TestEnv, leader: &str, standby: &str) -> (Watcher, Watcher) {
    let leader = t.watch().shared_store(leader).until("change stream open").await;
    let standby = t.watch().shared_store(standby).until("standby: another instance holds the lease").await;
    (leader, standby)
}

/// `partitions` workers, each on its partition with a token file of its own, streaming.
async fn partition_workers(t: &TestEnv, partitions: u32) -> Vec<Watcher> {
    let mut workers = Vec::new();
    for i in 0..partitions {
        let worker = t.watch().token_file(&format!("token-{i}.json")).partition(i, partitions);
        workers.push(worker.until("change stream open").await);
    }
    workers
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_checkpoint_store_resumes_like_the_file() {
    let (t, refs) = TestEnv::seeded("sharedcp").await;
    let mut a = t.watch().shared_store("a").until("change stream open").await;
    t.deliver(&refs, 0..10).await;
    t.wait_archived(10).await;
    a.stop_ok().await;
    let cp = checkpoint(&t).await;
    assert_eq!(cp.get_str("_id").unwrap(), format!("{}.Commandes", t.db_name));
    assert!(cp.get_document("resume_token").is_ok(), "{cp}");
    assert!(!t.token_file().exists(), "no token file with the shared store");
    t.deliver(&refs, 10..25).await;
    let mut a = t.watch().shared_store("a").until("change stream open").await;
    assert!(a.log_contains("resuming after the saved token"), "{}", a.stderr());
    t.wait_all_archived(25).await;
    a.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_when_the_leader_dies_and_nothing_is_lost() {
    let (t, refs) = TestEnv::seeded("takeover").await;
    let (mut leader, mut standby) = leader_and_standby(&t, "leader", "standby").await;
    let standby_addr = health_addr(&standby);
    let (code, body) = http_get(&standby_addr, "/health/ready");
    assert_eq!(code, 200);
    assert!(body.contains("\"role\":\"standby\""), "{body}");

    let load = Load::start(&t, refs, Delivery::Inserted, Pace::Pause(Duration::from_millis(10)));
    tokio::time::sleep(Duration::from_millis(800)).await;
    leader.kill().await;
    let killed_at = std::time::Instant::now();
    standby.wait_for_log(20, "leadership acquired").await;
    let takeover = killed_at.elapsed();
    assert!(takeover < Duration::from_secs(10), "takeover took {takeover:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let delivered = load.finish().await;
    t.wait_all_archived(u64::from(delivered)).await;
    let (_, body) = http_get(&standby_addr, "/health/ready");
    assert!(body.contains("\"role\":\"leader\""), "{body}");
    let metrics = common::unlabelled(&http_get(&standby_addr, "/metrics").1);
    assert!(metrics.contains("archiver_takeovers_total 1"), "{metrics}");
    assert!(metrics.contains("archiver_leader 1"), "{metrics}");
    assert_eq!(checkpoint(&t).await.get_i64("epoch").unwrap(), 2);
    standby.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_past_its_lease_cannot_write_when_it_wakes() {
    let (t, refs) = TestEnv::seeded("stale").await;
    let (mut old, mut new) = leader_and_standby(&t, "old", "new").await;
    t.deliver(&refs, 0..5).await;
    t.wait_archived(5).await;

    old.signal("STOP");
    new.wait_for_log(20, "leadership acquired").await;
    t.deliver(&refs, 5..15).await;
    t.wait_archived(15).await;
    let before_wake = checkpoint(&t).await;
    assert_eq!(before_wake.get_i64("epoch").unwrap(), 2);

    // Deliveries land while the old leader wakes up with its stale view.
    old.signal("CONT");
    t.deliver(&refs, 15..25).await;
    old.wait_for_log(20, "back to standby").await;
    t.wait_all_archived(25).await;
    let after = checkpoint(&t).await;
    assert_eq!(after.get_i64("epoch").unwrap(), 2, "the stale leader must not own the checkpoint: {after}");
    assert!(old.is_running(), "the old leader stays on as a standby");
    new.stop_ok().await;
    old.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_workers_archive_every_order_exactly_once() {
    let (t, refs) = TestEnv::seeded("partitions").await;
    let mut workers = partition_workers(&t, 3).await;
    t.deliver(&refs, 0..300).await;
    t.wait_all_archived(300).await;
    let mut total = 0;
    for w in &mut workers {
        let log = w.stop_ok().await;
        let inserted: u64 = w.batch_field("inserted").iter().sum();
        assert!((50..=150).contains(&inserted), "uneven share {inserted}: {log}");
        assert!(w.batch_field("already_archived").iter().all(|&n| n == 0), "overlapping partitions: {log}");
        total += inserted;
    }
    assert_eq!(total, 300, "each order archived by exactly one worker");

    // batch splits a history the same way.
    let (history, refs) = TestEnv::seeded("partitions_batch").await;
    history.deliver(&refs, 0..200).await;
    for i in 0..3 {
        let out =
            history.run(&["batch", "--date-from", "2000-01-01", "--partitions", "3", "--partition", &i.to_string()]);
        assert!(out.status.success(), "{}", out.stderr);
        assert!(out.stdout.contains("0 already archived"), "{}", out.stdout);
    }
    history.assert_archive_matches_delivered().await;
    let bad = history.run(&["batch", "--date-from", "2000-01-01", "--partitions", "3", "--partition", "3"]);
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);
}

/// Ids of every shape an order may carry; the partition expression used to fail on some (too
/// short for its two-character key, or without a `$toString` form), and one such order then
/// broke every partitioned stream and query.
fn odd_ids() -> Vec<Bson> {
    vec![
        Bson::Int32(0),
        Bson::Int32(7),
        Bson::String("a".into()),
        Bson::String(String::new()),
        Bson::Document(doc! { "x": 1 }),
        Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes: vec![1, 2, 3] }),
        Bson::Int64(1_234_567_890_123),
        Bson::Double(2.5),
        Bson::ObjectId(ObjectId::new()),
        Bson::String(format!("commande-{}", "x".repeat(300))),
    ]
}

fn order_with_id(refs: &common::Refs, n: u32, id: Bson) -> Document {
    let mut o = order(refs, n, "livrée");
    o.insert("_id", id);
    o
}

/// The partition expression as it was before it was made total: it must keep mapping
/// ObjectIds the same way, or existing deployments' partitions would move.
fn former_partition_expr(id_path: &str, partitions: u32) -> Document {
    let hex_digit = |from_end: i32| -> Bson {
        Bson::Document(doc! { "$max": [0, { "$indexOfCP": [
            "0123456789abcdef",
            { "$toLower": { "$substrCP": ["$$id", { "$subtract": [{ "$strLenCP": "$$id" }, from_end] }, 1] } },
        ] }] })
    };
    doc! { "$let": {
        "vars": { "id": { "$toString": id_path } },
        "in": { "$mod": [{ "$add": [{ "$multiply": [16, hex_digit(2)] }, hex_digit(1)] }, i64::from(partitions)] },
    } }
}

#[tokio::test(flavor = "multi_thread")]
async fn object_ids_keep_their_partition_and_every_id_has_exactly_one() {
    let t = TestEnv::new("partition_expr").await;
    let ids = t.db.collection::<Document>("ids");
    let oids: Vec<ObjectId> = (0..600).map(|_| ObjectId::new()).collect();
    ids.insert_many(oids.iter().map(|id| doc! { "_id": id })).await.unwrap();
    for partitions in [2u32, 3, 7, 256] {
        let rows: Vec<Document> = ids
            .aggregate([doc! { "$project": {
                "new": partition_expr("$_id", partitions),
                "old": former_partition_expr("$_id", partitions),
            } }])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(rows.len(), oids.len());
        for row in &rows {
            let oid = row.get_object_id("_id").unwrap();
            // The key is the ObjectId's last byte (its counter's low byte).
            let expected = i64::from(oid.bytes()[11]) % i64::from(partitions);
            let as_i64 =
                |v: &Bson| v.as_i64().or_else(|| v.as_i32().map(i64::from)).or_else(|| v.as_f64().map(|f| f as i64));
            assert_eq!(as_i64(row.get("old").unwrap()), Some(expected), "{row}");
            assert_eq!(as_i64(row.get("new").unwrap()), Some(expected), "{row}");
        }
    }

    // Every other id evaluates to one partition in range, where the former expression failed.
    let odd = t.db.collection::<Document>("odd");
    odd.insert_many(odd_ids().into_iter().map(|id| doc! { "_id": id })).await.unwrap();
    let rows: Vec<Document> = odd
        .aggregate([doc! { "$project": { "p": partition_expr("$_id", 3) } }])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows.len(), odd_ids().len());
    for row in rows {
        let p = row.get("p").and_then(|v| v.as_i64().or_else(|| v.as_i32().map(i64::from))).unwrap_or(-1);
        assert!((0..3).contains(&p), "{row}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_and_verify_partition_ids_of_every_type() {
    let (t, refs) = TestEnv::seeded("partition_odd_batch").await;
    let ids = odd_ids();
    t.orders()
        .insert_many(ids.iter().enumerate().map(|(n, id)| order_with_id(&refs, n as u32, id.clone())))
        .await
        .unwrap();
    let mut archived = 0;
    for i in 0..3 {
        let out = t.run(&["batch", "--date-from", "2000-01-01", "--partitions", "3", "--partition", &i.to_string()]);
        assert!(out.status.success(), "partition {i}: {}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("0 already archived"), "{}", out.stdout);
        let newly: u64 =
            out.stdout.split(" newly archived").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
        archived += newly;
    }
    assert_eq!(archived, ids.len() as u64, "each order archived by exactly one partition");
    t.assert_archive_matches_delivered().await;
    for i in 0..3 {
        let out = t.run(&["verify", "--date-from", "2000-01-01", "--partitions", "3", "--partition", &i.to_string()]);
        assert_eq!(out.status.code(), Some(0), "partition {i}: {}{}", out.stdout, out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_watch_keeps_archiving_after_ids_of_every_type() {
    let (t, refs) = TestEnv::seeded("partition_odd_watch").await;
    let mut workers = partition_workers(&t, 3).await;
    let ids = odd_ids();
    for (n, id) in ids.iter().enumerate() {
        t.orders().insert_one(order_with_id(&refs, n as u32, id.clone())).await.unwrap();
    }
    // Ordinary orders delivered after them must still flow through every partition.
    let later = 60u32;
    t.deliver(&refs, 100..100 + later).await;
    let total = ids.len() as u64 + u64::from(later);
    t.wait_all_archived(total).await;
    // Each order went to exactly one worker: an id whose partition could not be evaluated
    // must neither stop the streams nor be handed to several partitions.
    let mut received = 0;
    for w in &mut workers {
        assert!(w.is_running(), "a worker died: {}", w.stderr());
        let log = w.stop_ok().await;
        assert!(w.batch_field("already_archived").iter().all(|&n| n == 0), "overlapping partitions: {log}");
        received += w.batch_field("orders").iter().sum::<u64>();
    }
    assert_eq!(received, total, "each order streamed to exactly one partition");
}

/// A configured `STREAM_NAME` used to be shared by every partition: one lease (so only one
/// partition had a leader) and one checkpoint (so a partition's position passed the others').
#[tokio::test(flavor = "multi_thread")]
async fn partitions_with_a_stream_name_each_have_their_own_lease_and_checkpoint() {
    let (t, refs) = TestEnv::seeded("partition_names").await;
    let mut workers = Vec::new();
    for i in 0..2 {
        let worker = t.watch().shared_store(&format!("p{i}")).env("STREAM_NAME", "eu").partition(i, 2);
        workers.push(worker.until("change stream open").await);
    }
    t.deliver(&refs, 0..40).await;
    t.wait_all_archived(40).await;
    for w in &mut workers {
        w.stop_ok().await;
    }
    let mut streams: Vec<String> =
        t.db.collection::<Document>("archiver_checkpoints")
            .distinct("_id", doc! {})
            .await
            .unwrap()
            .into_iter()
            .map(|id| id.as_str().unwrap().to_owned())
            .collect();
    streams.sort();
    assert_eq!(streams, ["eu#0of2", "eu#1of2"]);
}

/// `archiver health` with `env` added: its exit code and its JSON report.
fn health(t: &TestEnv, env: &[(&str, &str)]) -> (Option<i32>, serde_json::Value) {
    let out = t.archiver(&["health"]).envs(env.iter().copied()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    (out.status.code(), report)
}

/// `archiver health` used to read the token file under the unpartitioned stream name (an error
/// for a partition's file) and never the shared store.
#[tokio::test(flavor = "multi_thread")]
async fn health_reports_the_partition_checkpoint_from_the_file_or_the_shared_store() {
    let (t, refs) = TestEnv::seeded("partition_health").await;
    let token = t.dir.path().join("token-1.json");
    let token = token.to_str().unwrap().to_owned();
    let file_env = [("RESUME_TOKEN_FILE", token.as_str()), ("PARTITIONS", "3"), ("PARTITION", "1")];
    let mut watch = t.watch().envs(&file_env).until("change stream open").await;
    t.deliver(&refs, 0..30).await;
    // Its share of the 30 is about a third, but not a fixed number.
    eventually(20, "the partition to archive its orders", || async { t.archive_len().await > 0 }).await;
    watch.stop_ok().await;
    let (code, report) = health(&t, &file_env);
    assert_eq!(code, Some(0), "{report}");
    let cp = &report["resume_token"];
    assert_eq!(cp["status"], "ok", "{report}");
    assert_eq!(cp["store"], "file");
    assert_eq!(cp["file"], token.as_str());
    assert_eq!(cp["stream"], format!("{}.Commandes#1of3", t.db_name));

    // The shared store: the partition's checkpoint document and who holds its lease.
    let env = [SHARED_STORE, &[("INSTANCE_ID", "keeper"), ("PARTITIONS", "3"), ("PARTITION", "2")]].concat();
    let mut leader = t.watch().envs(&env).until("change stream open").await;
    let stream = format!("{}.Commandes#2of3", t.db_name);
    let checkpoints = t.db.collection::<Document>("archiver_checkpoints");
    t.deliver(&refs, 30..60).await;
    eventually(20, "the partition's checkpoint", || async {
        checkpoints
            .find_one(doc! { "_id": &stream })
            .await
            .unwrap()
            .is_some_and(|d| d.get_document("resume_token").is_ok())
    })
    .await;
    let (code, report) = health(&t, &env);
    assert_eq!(code, Some(0), "{report}");
    let cp = &report["resume_token"];
    assert_eq!(cp["status"], "ok", "{report}");
    assert_eq!(cp["store"], "mongodb");
    assert_eq!(cp["stream"], stream.as_str());
    assert!(cp["age_seconds"].as_f64().unwrap() >= 0.0, "{report}");
    assert_eq!(cp["lease"]["holder"], "keeper", "{report}");
    assert_eq!(cp["lease"]["expired"], false, "{report}");
    leader.stop_ok().await;
    // Stopped, the leader released its lease: no instance leads, which is not healthy.
    let (code, report) = health(&t, &env);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["resume_token"]["lease"]["expired"], true, "{report}");

    // Another partition of the shared store has no checkpoint yet: reported missing, not the
    // first partition's.
    let (_, report) = health(&t, &[SHARED_STORE, &[("PARTITIONS", "3"), ("PARTITION", "0")]].concat());
    assert_eq!(report["resume_token"]["status"], "missing", "{report}");
    assert_eq!(report["resume_token"]["lease"]["holder"], serde_json::Value::Null, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_ids_spread_over_the_partitions() {
    // UUIDs as order ids: on a server that converts binary data to strings (MongoDB 8.0 and
    // this test server), they used to land all in partition 0.
    let (t, refs) = TestEnv::seeded("partition_binary").await;
    let uuids = (0..90u32).map(|n| {
        let bytes: Vec<u8> =
            (0..16u32).map(|i| (n.wrapping_mul(2_654_435_761).rotate_left(i * 5) >> 3) as u8).collect();
        Bson::Binary(Binary { subtype: BinarySubtype::Uuid, bytes })
    });
    t.orders().insert_many(uuids.enumerate().map(|(n, id)| order_with_id(&refs, n as u32, id))).await.unwrap();
    let mut shares = Vec::new();
    for i in 0..3 {
        let out = t.run(&["batch", "--date-from", "2000-01-01", "--partitions", "3", "--partition", &i.to_string()]);
        assert!(out.status.success(), "partition {i}: {}{}", out.stdout, out.stderr);
        let newly: u64 =
            out.stdout.split(" newly archived").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
        shares.push(newly);
    }
    assert_eq!(shares.iter().sum::<u64>(), 90, "each order in exactly one partition: {shares:?}");
    assert!(shares.iter().all(|&n| (15..=45).contains(&n)), "uneven shares {shares:?}");
    t.assert_archive_matches_delivered().await;
}
