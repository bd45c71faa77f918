//! Beyond one process: the shared checkpoint, standby takeover with fencing, partitions.

mod common;

use std::time::Duration;

use common::{eventually, health_addr, http_get, order, TestEnv};
use mongodb::bson::{doc, Document};
use tokio_util::sync::CancellationToken;

const SHARED: &[(&str, &str)] = &[
    ("CHECKPOINT_STORE", "mongodb"),
    ("LEASE_TTL_MS", "2000"),
    ("LEASE_RENEW_MS", "400"),
];

fn shared_as(name: &'static str) -> Vec<(&'static str, &'static str)> {
    let mut env = SHARED.to_vec();
    env.push(("INSTANCE_ID", name));
    env
}

async fn checkpoint(t: &TestEnv) -> Document {
    t.db.collection::<Document>("archiver_checkpoints").find_one(doc! {}).await.unwrap().expect("a shared checkpoint")
}

/// Keeps delivering orders until cancelled; returns how many.
fn deliver_steadily(t: &TestEnv, refs: common::Refs, stop: CancellationToken) -> tokio::task::JoinHandle<u32> {
    let orders = t.orders();
    tokio::spawn(async move {
        let mut n = 0u32;
        while !stop.is_cancelled() {
            orders.insert_one(order(&refs, n, "livrée")).await.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        n
    })
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
    let writer = deliver_steadily(&t, refs, stop.clone());
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
        let out = history.run(&["batch", "--date-from", "2000-01-01", "--partitions", "3", "--partition", &i.to_string()]);
        assert!(out.status.success(), "{}", out.stderr);
        assert!(out.stdout.contains("0 already archived"), "{}", out.stdout);
    }
    history.assert_archive_matches_delivered().await;
    let bad = history.run(&["batch", "--date-from", "2000-01-01", "--partitions", "3", "--partition", "3"]);
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);
    history.cleanup().await;
    t.cleanup().await;
}
