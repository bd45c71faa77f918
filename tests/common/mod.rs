//! Shared helpers of the black-box tests: a real server (from `MONGODB_TEST_URI`, which
//! `scripts/test.sh` provides), one fresh database per test, and the real `archiver` binary.
#![allow(dead_code)]

pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use mongodb::{Client, Collection, Database};

/// The server under test.
pub fn server_uri() -> String {
    std::env::var("MONGODB_TEST_URI").unwrap_or_else(|_| {
        panic!(
            "MONGODB_TEST_URI is not set: run the tests with scripts/test.sh, which starts a \
             SecantusDB server, or point MONGODB_TEST_URI at a MongoDB replica set"
        )
    })
}

/// One test's isolated database, working directory and binary environment.
pub struct TestEnv {
    pub client: Client,
    pub db: Database,
    pub db_name: String,
    pub dir: tempfile::TempDir,
    pub uri: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestEnv {
    pub async fn new(name: &str) -> TestEnv {
        Self::with_uri(name, server_uri()).await
    }

    pub async fn with_uri(name: &str, uri: String) -> TestEnv {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let db_name = format!("t_{}_{}_{}", name, std::process::id(), n);
        let client = Client::with_uri_str(&uri).await.expect("test client");
        let db = client.database(&db_name);
        db.drop().await.ok();
        TestEnv { client, db, db_name, dir: tempfile::tempdir().unwrap(), uri }
    }

    pub fn orders(&self) -> Collection<Document> {
        self.db.collection("Commandes")
    }

    pub fn archive(&self) -> Collection<Document> {
        self.db.collection("Commandes_archive")
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("state/resume_token.json")
    }

    /// A command for the real binary, isolated in this test's directory and database.
    pub fn archiver(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_archiver"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MONGODB_URI", &self.uri)
            .env("MONGODB_DB", &self.db_name)
            .env("RESUME_TOKEN_FILE", self.token_file())
            .env("LOG_DIR", self.dir.path().join("logs"))
            .env("BATCH_MAX_WAIT_MS", "50")
            .env("RETRY_MAX_ATTEMPTS", "3")
            .env("RETRY_MAX_DELAY_MS", "500")
            .env("LOG_LEVEL", "info")
            .env("HTTP_ADDR", "127.0.0.1:0");
        cmd
    }

    /// Runs the binary to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.archiver(args).output().expect("run archiver");
        Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts `archiver watch` and waits until its stream is open (the token file exists).
    pub async fn start_watch(&self, extra_env: &[(&str, &str)]) -> Watcher {
        self.start_watch_with(&[], extra_env).await
    }

    /// `start_watch` with extra arguments.
    pub async fn start_watch_args(&self, args: &[&str]) -> Watcher {
        self.start_watch_with(args, &[]).await
    }

    async fn start_watch_with(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Watcher {
        let watcher = self.spawn_watch(args, extra_env, "change stream open").await;
        let token = self.token_file();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !token.exists() {
            assert!(Instant::now() < deadline, "no token file: {}", watcher.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        watcher
    }

    /// Starts `archiver watch` and waits until its log says `marker`.
    pub async fn spawn_watch(&self, args: &[&str], extra_env: &[(&str, &str)], marker: &str) -> Watcher {
        let log = self.dir.path().join(format!("watch-{}.stderr", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let mut cmd = self.archiver(&[&["watch"][..], args].concat());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn archiver watch");
        let mut watcher = Watcher { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !watcher.log_contains(marker) {
            if let Some(status) = watcher.child.try_wait().unwrap() {
                panic!("watch exited early with {status}: {}", watcher.stderr());
            }
            assert!(Instant::now() < deadline, "watch never logged {marker:?}: {}", watcher.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        watcher
    }

    /// Reference documents: one client, courier, restaurant and two dishes.
    pub async fn seed_references(&self) -> Refs {
        let refs = Refs {
            client: ObjectId::new(),
            livreur: ObjectId::new(),
            restaurant: ObjectId::new(),
            menu: [ObjectId::new(), ObjectId::new()],
        };
        let adresse = doc! { "rue": "12 rue de la Paix", "ville": "Lyon", "code_postal": "69002" };
        self.db
            .collection::<Document>("Client")
            .insert_one(doc! {
                "_id": refs.client, "nom": "Martin", "prenom": "Claire", "email": "claire@example.fr",
                "telephone": "+33 6 12 34 56 78", "adresse": adresse.clone(),
            })
            .await
            .unwrap();
        self.db
            .collection::<Document>("Livreur")
            .insert_one(doc! {
                "_id": refs.livreur, "nom": "Durand", "prenom": "Paul", "telephone": "+33 7 00 00 00 01",
                "vehicule": "vélo",
            })
            .await
            .unwrap();
        self.db
            .collection::<Document>("Restaurants")
            .insert_one(doc! {
                "_id": refs.restaurant, "nom": "Chez Mario", "cuisine": "italienne", "adresse": adresse,
            })
            .await
            .unwrap();
        self.db.collection::<Document>("Menu").insert_many([
            doc! { "_id": refs.menu[0], "restaurant_id": refs.restaurant, "nom": "Pizza", "prix": 12.5, "categorie": "plat" },
            doc! { "_id": refs.menu[1], "restaurant_id": refs.restaurant, "nom": "Tiramisu", "prix": 6.0, "categorie": "dessert" },
        ]).await.unwrap();
        refs
    }

    /// Waits until the archive holds `n` documents (and checks it does not go past).
    pub async fn wait_archived(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let count = self.archive().count_documents(doc! {}).await.unwrap();
            assert!(count <= n, "archive holds {count} documents, expected {n}");
            if count == n {
                return;
            }
            assert!(Instant::now() < deadline, "archive holds {count} documents after 30 s, expected {n}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts every delivered order in the source is archived exactly once, and nothing else is.
    pub async fn assert_archive_matches_delivered(&self) {
        let delivered: Vec<Bson> = self.orders().distinct("_id", doc! { "status": "livrée" }).await.unwrap();
        let archived: Vec<Bson> = self.archive().distinct("_id", doc! {}).await.unwrap();
        let total = self.archive().count_documents(doc! {}).await.unwrap();
        assert_eq!(total as usize, archived.len(), "duplicate archive documents");
        let mut d: Vec<String> = delivered.iter().map(|b| b.to_string()).collect();
        let mut a: Vec<String> = archived.iter().map(|b| b.to_string()).collect();
        d.sort();
        a.sort();
        assert_eq!(a, d, "archive ids differ from delivered ids");
    }

    pub async fn cleanup(self) {
        self.db.drop().await.ok();
    }
}

/// Ids of the seeded references.
#[derive(Debug, Clone, Copy)]
pub struct Refs {
    pub client: ObjectId,
    pub livreur: ObjectId,
    pub restaurant: ObjectId,
    pub menu: [ObjectId; 2],
}

/// An order following the data model, in status `status`.
pub fn order(refs: &Refs, n: u32, status: &str) -> Document {
    let delivered = status == "livrée";
    doc! {
        "_id": ObjectId::new(),
        "numero_commande": format!("CMD-{n:06}"),
        "client_id": refs.client,
        "restaurant_id": refs.restaurant,
        "livreur_id": if status == "en_attente" { Bson::Null } else { Bson::ObjectId(refs.livreur) },
        "items": [
            { "menu_id": refs.menu[0], "quantite": 2 },
            { "menu_id": refs.menu[1], "quantite": 1 },
        ],
        "status": status,
        "date_commande": DateTime::from_millis(1_763_700_000_000 + i64::from(n) * 1000),
        "date_livraison": if delivered { Bson::DateTime(DateTime::now()) } else { Bson::Null },
        "montant_total": 31.0,
    }
}

/// Output of a finished run.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A running `archiver watch`.
pub struct Watcher {
    pub child: Child,
    pub log: PathBuf,
}

impl Watcher {
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.stderr().contains(needle)
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// Waits for exit, up to `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "watch did not exit in {timeout:?}: {}", self.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and the exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait(Duration::from_secs(20)).await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a file or returns an empty string.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A SecantusDB server owned by one test, for faults no shared deployment can take (restarts,
/// a pruned oplog). Started through the project's own script.
pub struct OwnServer {
    pub dir: tempfile::TempDir,
    pub uri: String,
    pub port: u16,
    extra_args: String,
}

impl OwnServer {
    pub fn start(extra_args: &str) -> OwnServer {
        let dir = tempfile::tempdir().unwrap();
        let (uri, port) = Self::launch(dir.path(), 0, extra_args);
        OwnServer { dir, uri, port, extra_args: extra_args.to_owned() }
    }

    fn launch(dir: &Path, port: u16, extra_args: &str) -> (String, u16) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/secantusd.sh");
        let out = Command::new("bash")
            .arg(&script)
            .args(["start", dir.to_str().unwrap(), &port.to_string()])
            .env("SECANTUS_EXTRA_ARGS", extra_args)
            .output()
            .expect("run scripts/secantusd.sh");
        assert!(out.status.success(), "server did not start: {}", String::from_utf8_lossy(&out.stderr));
        let uri = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let port = uri.rsplit(':').next().unwrap().split('/').next().unwrap().parse().unwrap();
        (uri, port)
    }

    pub fn stop(&self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/secantusd.sh");
        let ok = Command::new("bash").arg(script).args(["stop", self.dir.path().to_str().unwrap()]).status().unwrap();
        assert!(ok.success());
    }

    /// Starts again on the same data and port.
    pub fn restart(&self) {
        let (uri, _) = Self::launch(self.dir.path(), self.port, &self.extra_args);
        assert_eq!(uri, self.uri);
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Delivers an order every `every` until `stop` is cancelled; returns how many.
pub fn deliver_steadily(
    t: &TestEnv,
    refs: Refs,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u32> {
    let orders = t.orders();
    tokio::spawn(async move {
        let mut n = 0u32;
        while !stop.is_cancelled() {
            orders.insert_one(order(&refs, n, "livrée")).await.unwrap();
            n += 1;
            tokio::time::sleep(every).await;
        }
        n
    })
}

/// Polls `check` until it holds, for up to `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The address `watch` logged for its health endpoints.
pub fn health_addr(watcher: &Watcher) -> String {
    let log = watcher.stderr();
    let line = log.lines().find(|l| l.contains("health and metrics served")).expect("health endpoint logged");
    let addr = line.split("addr=").nth(1).unwrap();
    addr.split_whitespace().next().unwrap().to_owned()
}

/// A minimal HTTP GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to health endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}
