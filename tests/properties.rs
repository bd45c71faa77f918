//! Property tests of the pure parsers: URI redaction, the dates of `batch`, the resume-token file
//! and the configuration. Whatever they are given, they answer (a value or an error) and never
//! panic; redaction never lets a generated secret through.
#![allow(clippy::result_large_err)] // figment::Jail's closures return figment's own error type

use std::path::Path;

use archiver::checkpoint::{Checkpoint, CheckpointFile};
use archiver::config::{Config, Overrides};
use archiver::pipeline::scan::{parse_date, DateRange};
use archiver::redact::{redact_invalid_uri, redact_uri, register_uri, scrub};
use chrono::{DateTime, Utc};
use mongodb::bson::{self, doc, Bson, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use proptest::prelude::*;

/// Secrets are upper-case letters; everything else in a generated URI is lower-case letters,
/// digits and punctuation, so a secret can only appear in the output if it leaked.
fn secret() -> impl Strategy<Value = String> {
    "[A-Z]{4,12}"
}

/// A password: one secret, or two around a character that should have been percent-encoded.
fn password() -> impl Strategy<Value = (String, Vec<String>)> {
    prop_oneof![
        secret().prop_map(|s| (s.clone(), vec![s])),
        (secret(), prop::sample::select(vec!["?", "/", "@", "#", ":", "&", "="]), secret())
            .prop_map(|(a, delimiter, b)| (format!("{a}{delimiter}{b}"), vec![a, b])),
    ]
}

/// A connection string holding secrets, and those secrets.
fn uri_with_secrets() -> impl Strategy<Value = (String, Vec<String>)> {
    let option_name = prop::sample::select(vec![
        "tlsCertificateKeyFilePassword",
        "proxyPassword",
        "authMechanismProperties",
        "mySecret",
        "apiToken",
    ]);
    (
        prop::sample::select(vec!["mongodb", "mongodb+srv"]),
        "[a-z][a-z0-9]{0,7}",
        password(),
        "[a-z][a-z0-9.-]{0,10}(:[0-9]{1,5})?(,[a-z][a-z0-9]{0,6})?",
        "(/[a-z0-9]{0,8})?",
        option_name,
        secret(),
        any::<bool>(),
    )
        .prop_map(|(scheme, user, (password, mut secrets), hosts, path, option, option_secret, first)| {
            let value = if option == "authMechanismProperties" {
                format!("AWS_SESSION_TOKEN:{option_secret}")
            } else {
                option_secret.clone()
            };
            let options = if first {
                format!("{option}={value}&w=majority")
            } else {
                format!("retrywrites=true&{option}={value}")
            };
            let path = if path.is_empty() { "/".to_owned() } else { path };
            secrets.push(option_secret);
            (format!("{scheme}://{user}:{password}@{hosts}{path}?{options}"), secrets)
        })
}

fn assert_hidden(shown: &str, secrets: &[String]) -> Result<(), TestCaseError> {
    for secret in secrets {
        prop_assert!(!shown.contains(secret.as_str()), "{secret} in {shown}");
    }
    Ok(())
}

proptest! {
    #[test]
    fn redaction_never_panics(text in "\\PC*", bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let lossy = String::from_utf8_lossy(&bytes);
        for input in [text.as_str(), lossy.as_ref(), &format!("mongodb://{text}"), &format!("mongodb://{lossy}@")] {
            let _ = redact_uri(input);
            let _ = redact_invalid_uri(input);
            let _ = scrub(input);
        }
    }

    #[test]
    fn redaction_hides_every_generated_secret((uri, secrets) in uri_with_secrets()) {
        assert_hidden(&redact_uri(&uri), &secrets)?;
        assert_hidden(&redact_invalid_uri(&uri), &secrets)?;
        assert_hidden(&scrub(&format!("error: cannot use {uri} now")), &secrets)?;
        // Quoted without the URI, as driver errors do: registered secrets are masked too.
        register_uri(&uri);
        assert_hidden(&scrub(&format!("got {}", secrets.join(" and "))), &secrets)?;
    }

    #[test]
    fn dates_never_panic(from in "\\PC{0,30}", to in proptest::option::of("\\PC{0,30}"), secs in -8_000_000_000_000i64..8_000_000_000_000) {
        let now = DateTime::<Utc>::from_timestamp(secs, 0).unwrap_or_else(Utc::now);
        let _ = parse_date(&from, now);
        let _ = DateRange::parse(&from, to.as_deref(), now);
    }

    #[test]
    fn relative_dates_answer_or_refuse(n in "[0-9]{1,25}", unit in "[dhmDHM]", secs in -8_000_000_000_000i64..8_000_000_000_000) {
        let now = DateTime::<Utc>::from_timestamp(secs, 0).unwrap_or_else(Utc::now);
        if let Ok(date) = parse_date(&format!("{n}{unit}"), now) {
            prop_assert!(date <= now);
        }
    }

    #[test]
    fn token_text_never_panics(text in "\\PC*") {
        let _ = Checkpoint::from_json(&text);
    }

    #[test]
    fn checkpoint_json_round_trips(checkpoint in checkpoint()) {
        prop_assert_eq!(Checkpoint::from_json(&checkpoint.to_json()), Ok(checkpoint));
    }
}

/// A checkpoint with any token, namespace and times a real one could hold.
fn checkpoint() -> impl Strategy<Value = Checkpoint> {
    let time = (0i64..7_000_000_000_000, 0u32..1_000_000).prop_map(|(ms, ns)| {
        DateTime::<Utc>::from_timestamp_millis(ms).unwrap() + chrono::Duration::nanoseconds(i64::from(ns))
    });
    (
        "[0-9A-F]{2,80}",
        "\\PC{1,40}",
        proptest::option::of((any::<u32>(), any::<u32>())),
        proptest::option::of(time.clone()),
        time.clone(),
        proptest::option::of(time),
    )
        .prop_map(|(data, namespace, cluster_time, wall_time, saved_at, position_time)| {
            let resume_token: ResumeToken = bson::from_bson(Bson::Document(doc! { "_data": data })).unwrap();
            Checkpoint {
                resume_token,
                namespace,
                last_event_cluster_time: cluster_time.map(|(time, increment)| Timestamp { time, increment }),
                last_event_wall_time: wall_time,
                saved_at,
                position_time,
                fill: None,
            }
        })
}

proptest! {
    // These touch the disk or the process environment: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn token_file_with_any_bytes_loads_or_errs(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        std::fs::write(&path, &bytes).unwrap();
        let _ = CheckpointFile::new(&path).load("livraison.Commandes");
        prop_assert_eq!(std::fs::read(&path).unwrap(), bytes, "load never changes the file");
    }

    #[test]
    fn token_file_save_then_load_round_trips(checkpoint in checkpoint()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/token.json");
        CheckpointFile::new(&path).save(&checkpoint).unwrap();
        let loaded = CheckpointFile::new(&path).load(&checkpoint.namespace).unwrap();
        prop_assert_eq!(loaded, Some(checkpoint));
    }

    #[test]
    fn configuration_values_never_panic(
        batch_size in "\\PC{0,12}",
        pool in "\\PC{0,8}",
        compressors in "\\PC{0,16}",
        tls in "\\PC{0,6}",
        http_addr in "\\PC{0,24}",
        partitions in "\\PC{0,6}",
        (uri, secrets) in prop_oneof![
            uri_with_secrets(),
            // Without its scheme, or with the wrong one: rejected by validation.
            uri_with_secrets().prop_map(|(uri, secrets)| (uri.replacen("mongodb://", "", 1), secrets)),
            uri_with_secrets().prop_map(|(uri, secrets)| (uri.replacen("mongodb", "postgres", 1), secrets)),
        ],
    ) {
        let mut outcome = Ok(());
        figment::Jail::expect_with(|jail| {
            jail.set_env("ARCHIVER_WATCH__BATCH_SIZE", &batch_size);
            jail.set_env("MONGODB_MAX_POOL_SIZE", &pool);
            jail.set_env("MONGODB_COMPRESSORS", &compressors);
            jail.set_env("MONGODB_TLS", &tls);
            jail.set_env("ARCHIVER_WATCH__HTTP_ADDR", &http_addr);
            jail.set_env("ARCHIVER_COORDINATION__PARTITIONS", &partitions);
            jail.set_env("ARCHIVER_MONGODB__URI", &uri);
            if let Err(e) = Config::load(None::<&Path>, Overrides::default()) {
                // Whatever is wrong, the URI's secrets are not in the message.
                outcome = assert_hidden(&e.to_string(), &secrets);
            }
            Ok(())
        });
        outcome?;
    }
}

/// The date fix seen from outside: a span reaching before the calendar is a usage error (exit 2,
/// nothing done), where it used to panic (exit 101). No server is needed: dates are checked
/// before connecting.
#[test]
fn huge_relative_date_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_archiver"))
        .args(["batch", "--date-from", "999999999d"])
        .current_dir(dir.path())
        .env_clear()
        .env("LOG_DIR", dir.path().join("logs"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("too far back"), "{stderr}");
}
