//! `archiver config check`, `config show` and `config reference`, against the real binary.

mod common;

use common::{order, TestEnv};

/// The lines of `config check` that start with `status` and name `what`.
fn line<'a>(stdout: &'a str, status: &str, what: &str) -> Option<&'a str> {
    stdout.lines().find(|l| l.starts_with(status) && l.contains(what))
}

#[tokio::test(flavor = "multi_thread")]
async fn config_check_passes_on_a_working_deployment_and_reads_only() {
    let (t, refs) = TestEnv::seeded("check_ok").await;
    t.orders().insert_many((0..3).map(|n| order(&refs, n, "livrée"))).await.unwrap();
    let before: Vec<String> = t.db.list_collection_names().await.unwrap();
    let out = t.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    for what in ["source", "orders", "change stream on the orders", "references Client", "checkpoint"] {
        assert!(line(&out.stdout, "ok", what).is_some(), "no ok line for {what}:\n{}", out.stdout);
    }
    assert!(out.stdout.contains("config check: ok"), "{}", out.stdout);
    // Indexes not created yet are a warning, and the check creates nothing.
    assert!(line(&out.stdout, "warn", "index Commandes_archive").is_some(), "{}", out.stdout);
    let mut after: Vec<String> = t.db.list_collection_names().await.unwrap();
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after, "config check created nothing");
    assert!(!t.token_file().exists(), "nor a token file");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn config_check_fails_naming_the_privilege_a_deployment_lacks() {
    let (t, refs) = TestEnv::seeded("check_privilege").await;
    t.orders().insert_one(order(&refs, 1, "livrée")).await.unwrap();
    // The user may read but not open change streams (no `changeStream` action).
    let wire = common::wire::Injector::start(common::proxy::upstream_of(&t.uri)).await;
    wire.deny_change_streams();
    let out = t.archiver(&["config", "check"]).env("MONGODB_URI", wire.uri(&t.uri)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let failed = line(&stdout, "FAIL", "change stream on the orders").unwrap_or_else(|| panic!("{stdout}"));
    assert!(failed.contains("changeStream") && failed.contains(&t.db_name), "{failed}");
    assert!(line(&stdout, "warn", "change stream on the database").is_some(), "{stdout}");
    assert!(line(&stdout, "ok", "references Client").is_some(), "reading is allowed: {stdout}");
    assert!(stdout.contains("config check: FAILED"), "{stdout}");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn config_check_fails_on_an_unreachable_source_and_a_bad_configuration_is_exit_2() {
    let t = TestEnv::new("check_down").await;
    let out = t
        .archiver(&["config", "check"])
        .env("MONGODB_URI", "mongodb://app:Hunter2x@127.0.0.1:9/?serverSelectionTimeoutMS=500")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(line(&stdout, "FAIL", "source").is_some(), "{stdout}");
    assert!(!stdout.contains("Hunter2x") && !String::from_utf8_lossy(&out.stderr).contains("Hunter2x"));

    // A value of watch's is checked too (the service's environment is the one to check).
    let out = t.archiver(&["config", "check"]).env("BATCH_SIZE", "0").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn config_show_gives_each_value_its_source_and_masks_passwords() {
    let t = TestEnv::new("show").await;
    std::fs::write(t.dir.path().join("archiver.toml"), "[batch]\nchunk_size = 250\n").unwrap();
    let uri = "mongodb://app:Hunter2x@db1:27017/";
    let out = t
        .archiver(&["config", "show", "--config", "archiver.toml", "--archive-collection", "Archive"])
        .env("MONGODB_URI", uri)
        .env("ARCHIVER_WATCH__BATCH_MAX_WAIT_MS", "75")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("Hunter2x"), "{stdout}");
    let setting = |key: &str| {
        stdout.lines().find(|l| l.starts_with(&format!("{key} = "))).unwrap_or_else(|| panic!("{key}:\n{stdout}"))
    };
    assert!(setting("mongodb.uri").contains("app:***@db1") && setting("mongodb.uri").ends_with("# MONGODB_URI"));
    assert!(setting("archive.collection").ends_with("# flag --archive-collection"), "{stdout}");
    assert!(setting("batch.chunk_size").ends_with("# file archiver.toml"), "{stdout}");
    // BATCH_MAX_WAIT_MS of the test's environment wins over the generic variable.
    assert!(setting("watch.batch_max_wait_ms").ends_with("# BATCH_MAX_WAIT_MS"), "{stdout}");
    assert!(setting("watch.batch_size").ends_with("# default"), "{stdout}");
    t.cleanup().await;
}

/// The manual's configuration reference is what the code generates: a key added, renamed or
/// documented differently without regenerating it fails here.
#[test]
fn the_manual_holds_the_generated_configuration_reference() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_archiver"))
        .args(["config", "reference"])
        .env_clear()
        .env("MONGODB_URI", "not a uri: the reference needs no configuration")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let generated = String::from_utf8(out.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/src/reference/configuration.md");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "docs/src/reference/configuration.md is not the generated reference: run \
         `cargo run -- config reference > docs/src/reference/configuration.md`"
    );
    for key in
        ["`watch.batch_size`", "`BATCH_SIZE`", "`lake.table_uri`", "`ARCHIVE_TABLE_URI`", "`MONGODB_COMPRESSORS`"]
    {
        assert!(generated.contains(key), "{key} is in the reference");
    }
}
