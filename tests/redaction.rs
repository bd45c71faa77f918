//! Credentials never reach the console, the JSON report or the log files, whatever shape the
//! connection string is in: the real binary, with `MONGODB_URI` set to each form that once leaked.

mod common;

use std::path::Path;

use common::{Output, TestEnv};

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Every log file under `dir`, concatenated.
fn logs(dir: &Path) -> String {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return String::new();
    };
    let mut text = String::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&logs(&path));
        } else {
            text.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()));
        }
    }
    text
}

/// Runs `archiver ARGS` with `MONGODB_URI` = `uri`, failing fast when nothing answers.
fn run_with_uri(t: &TestEnv, uri: &str, args: &[&str]) -> Output {
    let out = t
        .archiver(args)
        .env("MONGODB_URI", uri)
        .env("RETRY_MAX_ATTEMPTS", "1")
        .env("MONGODB_SERVER_SELECTION_TIMEOUT_MS", "500")
        .env("MONGODB_CONNECT_TIMEOUT_MS", "500")
        .output()
        .expect("run archiver");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts that none of `secrets` was printed or logged by `out` (run in `t`'s directory).
fn assert_nothing_leaked(t: &TestEnv, what: &str, out: &Output, secrets: &[&str]) {
    let logged = logs(&t.dir.path().join("logs"));
    for secret in secrets {
        for (place, text) in [("stdout", &out.stdout), ("stderr", &out.stderr), ("the log files", &logged)] {
            assert!(
                !text.contains(secret),
                "{what}: {secret:?} appears in {place}:\n{text}\n(stdout: {}\nstderr: {})",
                out.stdout,
                out.stderr
            );
        }
    }
}

const BATCH: &[&str] = &["batch", "--date-from", "2020-01-01", "--date-to", "2020-01-02"];
const HEALTH: &[&str] = &["health"];

/// A connection string that cannot be used, the secrets in it, and the exit codes of `batch` and
/// `health` the README's table gives for it.
struct BadUri {
    what: &'static str,
    uri: String,
    secrets: &'static [&'static str],
    batch_exit: i32,
    health_exit: i32,
}

fn bad_uris() -> Vec<BadUri> {
    let port = closed_port();
    let at = format!("127.0.0.1:{port}");
    vec![
        // Rejected by the driver (this build cannot use it): a configuration error, 2.
        BadUri {
            what: "tlsCertificateKeyFilePassword",
            uri: format!("mongodb://{at}/?tls=true&tlsCertificateKeyFilePassword=TlsKeyPw4821"),
            secrets: &["TlsKeyPw4821"],
            batch_exit: 2,
            health_exit: 2,
        },
        BadUri {
            what: "proxyPassword",
            uri: format!("mongodb://{at}/?proxyHost=localhost&proxyUsername=px&proxyPassword=ProxyPw6642"),
            secrets: &["ProxyPw6642"],
            batch_exit: 2,
            health_exit: 2,
        },
        // Needs a driver feature this build does not have: rejected as invalid too.
        BadUri {
            what: "MONGODB-AWS credentials",
            uri: format!(
                "mongodb://AKIAEXAMPLE:AwsSecretKey2290@{at}/?authMechanism=MONGODB-AWS\
                 &authMechanismProperties=AWS_SESSION_TOKEN:AwsSessTok9317"
            ),
            secrets: &["AwsSecretKey2290", "AwsSessTok9317"],
            batch_exit: 2,
            health_exit: 2,
        },
        // A well-formed URI whose server is down: 1 after the retries, which log the URI.
        BadUri {
            what: "AWS_SESSION_TOKEN, server down",
            uri: format!(
                "mongodb://u:DownPw5512@{at}/?authSource=admin\
                 &authMechanismProperties=AWS_SESSION_TOKEN:AwsSessTok4406"
            ),
            secrets: &["DownPw5512", "AwsSessTok4406"],
            batch_exit: 1,
            health_exit: 1,
        },
        // Rejected by our own validation before anything runs: 2 for both.
        BadUri {
            what: "password holding ?",
            uri: format!("mongodb://u:Pq?ss7305@{at}"),
            secrets: &["Pq?ss7305", "ss7305"],
            batch_exit: 2,
            health_exit: 2,
        },
        BadUri {
            what: "password holding @ and options",
            uri: format!("mongodb://u:Pw@ss5731@{at}/db?tlsCertificateKeyFilePassword=TlsKeyPw1188"),
            secrets: &["ss5731", "TlsKeyPw1188"],
            batch_exit: 2,
            health_exit: 2,
        },
        BadUri {
            what: "password holding / # :",
            uri: format!("mongodb://u:Pw/x#y:Zk4471@{at}/db"),
            secrets: &["Zk4471"],
            batch_exit: 2,
            health_exit: 2,
        },
        BadUri {
            what: "no scheme",
            uri: format!("admin:NoSchemePw3390@{at}/db"),
            secrets: &["NoSchemePw3390"],
            batch_exit: 2,
            health_exit: 2,
        },
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn no_form_of_bad_uri_prints_its_secrets() {
    for bad in bad_uris() {
        for (args, expected) in [(BATCH, bad.batch_exit), (HEALTH, bad.health_exit)] {
            // A fresh directory each time, so that the log files checked are this run's.
            let t = TestEnv::new("redact").await;
            let out = run_with_uri(&t, &bad.uri, args);
            let what = format!("{} ({})", bad.what, args[0]);
            assert_nothing_leaked(&t, &what, &out, bad.secrets);
            assert_eq!(out.status.code(), Some(expected), "{what}: {}{}", out.stdout, out.stderr);
            // Still says what is wrong, naming the setting or the host.
            let said = format!("{}{}", out.stdout, out.stderr);
            assert!(
                said.contains("MONGODB_URI") || said.contains("127.0.0.1"),
                "{what}: the error names neither the setting nor the host: {said}"
            );
        }
    }
}

/// The URI is valid and the server answers, but refuses the credentials: failure (1), and
/// whatever the server says, neither the password nor the session token is repeated.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_refused_by_the_server_are_not_printed() {
    let t = TestEnv::new("redact_auth").await;
    let rest = t.uri.strip_prefix("mongodb://").expect("a mongodb:// test server URI");
    // The test server's own credentials, if any, are replaced by unknown ones.
    let hosts_on = rest.split_once('@').map_or(rest, |(_, after)| after);
    let options = match (hosts_on.contains('?'), hosts_on.ends_with('/')) {
        (true, _) => "&",
        (false, true) => "?",
        (false, false) => "/?",
    };
    let with_credentials = format!(
        "mongodb://redactuser:SrvPw7713%21@{hosts_on}{options}\
         authMechanismProperties=AWS_SESSION_TOKEN:SrvTok3381"
    );
    for args in [BATCH, HEALTH] {
        let out = run_with_uri(&t, &with_credentials, args);
        assert_nothing_leaked(&t, args[0], &out, &["SrvPw7713", "SrvTok3381"]);
        assert_eq!(out.status.code(), Some(1), "{}: {out:?}", args[0]);
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_env_file_is_reported_without_its_content() {
    let t = TestEnv::new("redact_env").await;
    t.db.create_collection("Commandes").await.unwrap();
    std::fs::write(
        t.dir.path().join(".env"),
        "LOG_LEVEL=info\nMONGODB_URI mongodb://u:EnvFilePw8812@127.0.0.1:1/\nOTHER=1\n",
    )
    .unwrap();
    let out = t.run(BATCH);
    assert_nothing_leaked(&t, ".env", &out, &["EnvFilePw8812", "u:EnvFile"]);
    assert!(out.stderr.contains(".env") && out.stderr.contains("line 2"), "{}", out.stderr);
    // The environment's MONGODB_URI (the test server) is used: the run itself succeeds.
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_value_the_configuration_parser_panics_on_is_a_clear_error_without_the_value() {
    // figment's environment parser panics on a backslash before a multi-byte character; the
    // default panic hook printed the whole value, password included, before it was caught.
    let t = TestEnv::new("redact_panic").await;
    let out = t
        .archiver(BATCH)
        .env("ARCHIVER_MONGODB__URI", "\"mongodb://u:S3cretPanic€\\x@127.0.0.1:1/\"")
        .output()
        .expect("run archiver");
    let out = Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_nothing_leaked(&t, "a value figment panics on", &out, &["S3cretPanic", "u:S3cret"]);
    assert_eq!(out.status.code(), Some(2), "a configuration error: {out:?}");
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(out.stderr.contains("cannot be parsed"), "{}", out.stderr);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_strings_can_come_from_files_that_are_never_printed() {
    let t = TestEnv::new("uri_file").await;
    t.db.create_collection("Commandes").await.unwrap();
    let run = |vars: &[(&str, &std::path::Path)], keep_uri: bool| {
        let mut cmd = t.archiver(BATCH);
        if !keep_uri {
            cmd.env_remove("MONGODB_URI");
        }
        cmd.envs(vars.iter().map(|(k, v)| (*k, v.as_os_str())));
        let out = cmd.output().expect("run archiver");
        Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    // As systemd's LoadCredential= or a secret volume leaves it: the URI and a line break.
    let file = t.dir.path().join("mongodb_uri");
    std::fs::write(&file, format!("{}\n", t.uri)).unwrap();
    let out = run(&[("MONGODB_URI_FILE", &file), ("ARCHIVE_URI_FILE", &file)], false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // Both a URI and its file: which one wins would be a guess.
    let out = run(&[("MONGODB_URI_FILE", &file)], true);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Unreadable, empty, or several lines: named, never shown.
    let secret = t.dir.path().join("secret_uri");
    std::fs::write(&secret, "mongodb://u:FileSecret77@127.0.0.1:1/\nsecond line\n").unwrap();
    let out = run(&[("MONGODB_URI_FILE", &secret)], false);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("secret_uri") && out.stderr.contains("more than one line"), "{out:?}");
    assert_nothing_leaked(&t, "a URI file", &out, &["FileSecret77"]);
    let missing = t.dir.path().join("no_such_file");
    let out = run(&[("MONGODB_URI_FILE", &missing)], false);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("no_such_file"), "{out:?}");
    t.cleanup().await;
}
