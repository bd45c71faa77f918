//! Beyond one process: the shared checkpoint, standby takeover with fencing, partitions.

mod common;

use std::time::Duration;

use archiver::coordination::partition::partition_expr;
use common::{eventually, health_addr, http_get, order, TestEnv};
use futures_util::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, Document};
use tokio_util::sync::CancellationToken;

const SHARED: &[(&str, &str)] = &[("CHECKPOINT_STORE", "mongodb"), ("LEASE_TTL_MS", "3000"), ("LEASE_RENEW_MS", "500")];

fn shared_as(name: &'static str) -> Vec<(&'static str, &'static str)> {
    let mut env = SHARED.to_vec();
    env.push(("INSTANCE_ID", name));
    env
}

async fn checkpoint(t: &TestEnv) -> Document {
    t.db.collection::<Document>("archiver_checkpoints").find_one(doc! {}).await.unwrap().expect("a shared checkpoint")
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_checkpoint_store_resumes_like_the_file() {
    let t = TestEnv::new("sharedcp").await;
    let refs = t.seed_references().await;
    let mut a = t.spawn_watch(&[], &shared_as("a"), "change stream open").await;
    t.orders().insert_many((0..10).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    t.wait_archived(10).await;
    assert!(a.stop().await.success());
    let cp = checkpoint(&t).await;
    assert_eq!(cp.get_str("_id").unwrap(), format!("{}.Commandes", t.db_name));
    assert!(cp.get_document("resume_token").is_ok(), "{cp}");
    assert!(!t.token_file().exists(), "no token file with the shared store");
    t.orders().insert_many((10..25).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    let mut a = t.spawn_watch(&[], &shared_as("a"), "change stream open").await;
    assert!(a.log_contains("resuming after the saved token"), "{}", a.stderr());
    t.wait_archived(25).await;
    t.assert_archive_matches_delivered().await;
    assert!(a.stop().await.success());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_when_the_leader_dies_and_nothing_is_lost() {
    let t = TestEnv::new("takeover").await;
    let refs = t.seed_references().await;
    let mut leader = t.spawn_watch(&[], &shared_as("leader"), "change stream open").await;
    let mut standby = t.spawn_watch(&[], &shared_as("standby"), "standby: another instance holds the lease").await;
    let standby_addr = health_addr(&standby);
    let (code, body) = http_get(&standby_addr, "/health/ready");
    assert_eq!(code, 200);
    assert!(body.contains("\"role\":\"standby\""), "{body}");

    let stop = CancellationToken::new();
    let writer = common::deliver_steadily(&t, refs, Duration::from_millis(10), stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    leader.signal("KILL");
    leader.wait(Duration::from_secs(10)).await;
    let killed_at = std::time::Instant::now();
    eventually(20, "the standby to take over", || async { standby.log_contains("leadership acquired") }).await;
    let takeover = killed_at.elapsed();
    assert!(takeover < Duration::from_secs(10), "takeover took {takeover:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.cancel();
    let delivered = writer.await.unwrap();
    t.wait_archived(u64::from(delivered)).await;
    t.assert_archive_matches_delivered().await;
    let (_, body) = http_get(&standby_addr, "/health/ready");
    assert!(body.contains("\"role\":\"leader\""), "{body}");
    let (_, metrics) = http_get(&standby_addr, "/metrics");
    assert!(metrics.contains("archiver_takeovers_total 1"), "{metrics}");
    assert!(metrics.contains("archiver_leader 1"), "{metrics}");
    assert_eq!(checkpoint(&t).await.get_i64("epoch").unwrap(), 2);
    assert!(standby.stop().await.success());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_past_its_lease_cannot_write_when_it_wakes() {
    let t = TestEnv::new("stale").await;
    let refs = t.seed_references().await;
    let mut old = t.spawn_watch(&[], &shared_as("old"), "change stream open").await;
    let mut new = t.spawn_watch(&[], &shared_as("new"), "standby: another instance holds the lease").await;
    t.orders().insert_many((0..5).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    t.wait_archived(5).await;

    old.signal("STOP");
    eventually(20, "the standby to take over", || async { new.log_contains("leadership acquired") }).await;
    t.orders().insert_many((5..15).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    t.wait_archived(15).await;
    let before_wake = checkpoint(&t).await;
    assert_eq!(before_wake.get_i64("epoch").unwrap(), 2);

    // Deliveries land while the old leader wakes up with its stale view.
    old.signal("CONT");
    t.orders().insert_many((15..25).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    eventually(20, "the old leader to step down", || async { old.log_contains("back to standby") }).await;
    t.wait_archived(25).await;
    t.assert_archive_matches_delivered().await;
    let after = checkpoint(&t).await;
    assert_eq!(after.get_i64("epoch").unwrap(), 2, "the stale leader must not own the checkpoint: {after}");
    assert!(old.child.try_wait().unwrap().is_none(), "the old leader stays on as a standby");
    assert!(new.stop().await.success());
    assert!(old.stop().await.success());
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_workers_archive_every_order_exactly_once() {
    let t = TestEnv::new("partitions").await;
    let refs = t.seed_references().await;
    let mut workers = Vec::new();
    for i in 0..3 {
        let token = t.dir.path().join(format!("token-{i}.json"));
        let token = token.to_str().unwrap().to_owned();
        let partition = i.to_string();
        let env = [("RESUME_TOKEN_FILE", token.as_str()), ("PARTITIONS", "3"), ("PARTITION", partition.as_str())];
        workers.push(t.spawn_watch(&[], &env, "change stream open").await);
    }
    t.orders().insert_many((0..300).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    t.wait_archived(300).await;
    t.assert_archive_matches_delivered().await;
    let mut total = 0;
    for w in &mut workers {
        assert!(w.stop().await.success());
        let log = w.stderr();
        let inserted: u64 = log
            .lines()
            .filter(|l| l.contains("batch archived"))
            .map(|l| l.split("inserted=").nth(1).unwrap().split_whitespace().next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert!((50..=150).contains(&inserted), "uneven share {inserted}: {log}");
        assert!(!log.contains("already_archived=1"), "overlapping partitions: {log}");
        total += inserted;
    }
    assert_eq!(total, 300, "each order archived by exactly one worker");

    // batch splits a history the same way.
    let history = TestEnv::new("partitions_batch").await;
    let refs = history.seed_references().await;
    history.orders().insert_many((0..200).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    for i in 0..3 {
        let out =
            history.run(&["batch", "--date-from", "2000-01-01", "--partitions", "3", "--partition", &i.to_string()]);
        assert!(out.status.success(), "{}", out.stderr);
        assert!(out.stdout.contains("0 already archived"), "{}", out.stdout);
    }
    history.assert_archive_matches_delivered().await;
    let bad = history.run(&["batch", "--date-from", "2000-01-01", "--partitions", "3", "--partition", "3"]);
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);
    history.cleanup().await;
    t.cleanup().await;
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
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_and_verify_partition_ids_of_every_type() {
    let t = TestEnv::new("partition_odd_batch").await;
    let refs = t.seed_references().await;
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
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_watch_keeps_archiving_after_ids_of_every_type() {
    let t = TestEnv::new("partition_odd_watch").await;
    let refs = t.seed_references().await;
    let mut workers = Vec::new();
    for i in 0..3 {
        let token = t.dir.path().join(format!("token-{i}.json"));
        let token = token.to_str().unwrap().to_owned();
        let partition = i.to_string();
        let env = [("RESUME_TOKEN_FILE", token.as_str()), ("PARTITIONS", "3"), ("PARTITION", partition.as_str())];
        workers.push(t.spawn_watch(&[], &env, "change stream open").await);
    }
    let ids = odd_ids();
    for (n, id) in ids.iter().enumerate() {
        t.orders().insert_one(order_with_id(&refs, n as u32, id.clone())).await.unwrap();
    }
    // Ordinary orders delivered after them must still flow through every partition.
    let later = 60u32;
    t.orders().insert_many((100..100 + later).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    let total = ids.len() as u64 + u64::from(later);
    t.wait_archived(total).await;
    t.assert_archive_matches_delivered().await;
    // Each order went to exactly one worker: an id whose partition could not be evaluated
    // must neither stop the streams nor be handed to several partitions.
    let mut received = 0;
    for w in &mut workers {
        assert!(w.child.try_wait().unwrap().is_none(), "a worker died: {}", w.stderr());
        assert!(w.stop().await.success(), "{}", w.stderr());
        let log = w.stderr();
        for line in log.lines().filter(|l| l.contains("batch archived")) {
            let field = |name: &str| -> u64 {
                let value = line.split(&format!(" {name}=")).nth(1).unwrap();
                value.split_whitespace().next().unwrap().parse().unwrap()
            };
            assert_eq!(field("already_archived"), 0, "overlapping partitions: {log}");
            received += field("orders");
        }
    }
    assert_eq!(received, total, "each order streamed to exactly one partition");
    t.cleanup().await;
}

/// A configured `STREAM_NAME` used to be shared by every partition: one lease (so only one
/// partition had a leader) and one checkpoint (so a partition's position passed the others').
#[tokio::test(flavor = "multi_thread")]
async fn partitions_with_a_stream_name_each_have_their_own_lease_and_checkpoint() {
    let t = TestEnv::new("partition_names").await;
    let refs = t.seed_references().await;
    let mut workers = Vec::new();
    for i in 0..2 {
        let partition = i.to_string();
        let mut env = shared_as(if i == 0 { "p0" } else { "p1" });
        env.push(("STREAM_NAME", "eu"));
        env.push(("PARTITIONS", "2"));
        let env: Vec<(&str, &str)> = env.into_iter().chain([("PARTITION", partition.as_str())]).collect();
        workers.push(t.spawn_watch(&[], &env, "change stream open").await);
    }
    t.orders().insert_many((0..40).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    t.wait_archived(40).await;
    t.assert_archive_matches_delivered().await;
    for w in &mut workers {
        assert!(w.stop().await.success(), "{}", w.stderr());
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
    t.cleanup().await;
}

/// `archiver health` used to read the token file under the unpartitioned stream name (an error
/// for a partition's file) and never the shared store.
#[tokio::test(flavor = "multi_thread")]
async fn health_reports_the_partition_checkpoint_from_the_file_or_the_shared_store() {
    let t = TestEnv::new("partition_health").await;
    let refs = t.seed_references().await;
    let token = t.dir.path().join("token-1.json");
    let token = token.to_str().unwrap().to_owned();
    let file_env = [("RESUME_TOKEN_FILE", token.as_str()), ("PARTITIONS", "3"), ("PARTITION", "1")];
    let mut watch = t.spawn_watch(&[], &file_env, "change stream open").await;
    t.orders().insert_many((0..30).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    // Its share of the 30 is about a third, but not a fixed number.
    eventually(20, "the partition to archive its orders", || async {
        t.archive().count_documents(doc! {}).await.unwrap() > 0
    })
    .await;
    assert!(watch.stop().await.success());
    let mut health = t.archiver(&["health"]);
    health.envs(file_env);
    let out = health.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let cp = &report["resume_token"];
    assert_eq!(cp["status"], "ok", "{report}");
    assert_eq!(cp["store"], "file");
    assert_eq!(cp["file"], token.as_str());
    assert_eq!(cp["stream"], format!("{}.Commandes#1of3", t.db_name));

    // The shared store: the partition's checkpoint document and who holds its lease.
    let mut env = shared_as("keeper");
    env.extend([("PARTITIONS", "3"), ("PARTITION", "2")]);
    let mut leader = t.spawn_watch(&[], &env, "change stream open").await;
    let stream = format!("{}.Commandes#2of3", t.db_name);
    let checkpoints = t.db.collection::<Document>("archiver_checkpoints");
    t.orders().insert_many((30..60).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    eventually(20, "the partition's checkpoint", || async {
        checkpoints
            .find_one(doc! { "_id": &stream })
            .await
            .unwrap()
            .is_some_and(|d| d.get_document("resume_token").is_ok())
    })
    .await;
    let mut health = t.archiver(&["health"]);
    health.envs(env.iter().copied());
    let out = health.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let cp = &report["resume_token"];
    assert_eq!(cp["status"], "ok", "{report}");
    assert_eq!(cp["store"], "mongodb");
    assert_eq!(cp["stream"], stream.as_str());
    assert!(cp["age_seconds"].as_f64().unwrap() >= 0.0, "{report}");
    assert_eq!(cp["lease"]["holder"], "keeper", "{report}");
    assert_eq!(cp["lease"]["expired"], false, "{report}");
    assert!(leader.stop().await.success());

    // Another partition of the shared store has no checkpoint yet: reported missing, not the
    // first partition's.
    let mut health = t.archiver(&["health"]);
    health.envs(SHARED.iter().copied()).env("PARTITIONS", "3").env("PARTITION", "0");
    let out = health.output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["resume_token"]["status"], "missing", "{report}");
    assert_eq!(report["resume_token"]["lease"]["holder"], serde_json::Value::Null, "{report}");
    t.cleanup().await;
}
