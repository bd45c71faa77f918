//! The retry bounds, as a user sees them: a one-shot command facing a refused connection gives
//! up within `RETRY_MAX_ELAPSED_MS` (plus one attempt), no wait exceeds `RETRY_MAX_DELAY_MS`
//! (jitter included), and the error is one line a person can act on.

mod common;

use std::time::{Duration, Instant};

use common::TestEnv;

/// A port where nothing listens: every connection is refused at once.
const REFUSED: &str = "mongodb://archivist:R3tryS3cret@127.0.0.1:1/?serverSelectionTimeoutMS=200";

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_connection_fails_batch_within_the_total_deadline_and_no_wait_exceeds_the_cap() {
    let t = TestEnv::new("retry_bound").await;
    let started = Instant::now();
    let out = t
        .archiver(&["batch", "--date-from", "2020-01-01"])
        .env("MONGODB_URI", REFUSED)
        .env("RETRY_MAX_ATTEMPTS", "1000")
        .env("RETRY_MAX_DELAY_MS", "400")
        .env("RETRY_MAX_ELAPSED_MS", "3000")
        .env("LOG_FORMAT", "json")
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The documented bound: the deadline, plus the attempt under way (a 200 ms server
    // selection), plus the process's own start (generous: a loaded CI machine).
    assert!(took >= Duration::from_millis(3000), "gave up early, after {took:?}: {stderr}");
    assert!(took < Duration::from_millis(3000 + 200 + 3000), "gave up late, after {took:?}: {stderr}");

    let events: Vec<serde_json::Value> = stderr.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let waits: Vec<u64> = events.iter().filter_map(|e| e["retry_in_ms"].as_u64()).collect();
    assert!(waits.len() >= 5, "it kept trying until the deadline: {waits:?}");
    assert!(waits.iter().all(|w| *w <= 400), "a wait exceeded the cap: {waits:?}");
    // Jittered: the waits at the cap are not all the same.
    assert!(waits.iter().any(|w| *w != waits[waits.len() - 1]) || waits.len() < 3, "{waits:?}");

    // One line, with the host, the cause and the effort; no topology dump, no password.
    let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(error.contains("cannot reach MongoDB at mongodb://127.0.0.1:1 (connection refused) after"), "{error}");
    assert!(error.contains(&format!("after {} attempts over 3.", waits.len() + 1)), "{error}");
    assert!(!stderr.contains("Topology"), "{stderr}");
    assert!(!stderr.contains("R3tryS3cret"), "{stderr}");
    t.cleanup().await;
}

/// `verify` and `health` are bounded the same way; `health` tries once.
#[tokio::test(flavor = "multi_thread")]
async fn verify_and_health_give_up_on_a_refused_connection() {
    let t = TestEnv::new("retry_other").await;
    for (args, bound) in [(&["verify", "--date-from", "2020-01-01"][..], 2000), (&["health"][..], 0)] {
        let started = Instant::now();
        let out = t
            .archiver(args)
            .env("MONGODB_URI", REFUSED)
            .env("RETRY_MAX_ATTEMPTS", "1000")
            .env("RETRY_MAX_DELAY_MS", "300")
            .env("RETRY_MAX_ELAPSED_MS", "2000")
            .output()
            .unwrap();
        let took = started.elapsed();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{}: {text}", args[0]);
        assert!(took < Duration::from_millis(bound + 200 + 3000), "{} took {took:?}: {text}", args[0]);
        assert!(text.contains("connection refused"), "{}: {text}", args[0]);
        assert!(!text.contains("R3tryS3cret"), "{}: {text}", args[0]);
    }
    t.cleanup().await;
}
