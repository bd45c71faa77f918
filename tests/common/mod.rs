//! Shared helpers of the black-box tests: a real server (from `MONGODB_TEST_URI`, which
//! `scripts/test.sh` provides), one fresh database per test, and the real `archiver` binary.
#![allow(dead_code)]

pub mod proxy;
#[allow(dead_code)]
pub mod s3;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use mongodb::{Client, Collection, Database};
use tokio_util::sync::CancellationToken;

/// The server under test.
pub fn server_uri() -> String {
    std::env::var("MONGODB_TEST_URI").unwrap_or_else(|_| {
        panic!(
            "MONGODB_TEST_URI is not set: run the tests with scripts/test.sh, which starts a \
             SecantusDB server, or point MONGODB_TEST_URI at a MongoDB replica set"
        )
    })
}

/// The shared checkpoint store and its lease. A renewal must answer within 60 % of the TTL less
/// the renewal interval (1.3 s here): on two shared cores under load, a 2 s TTL made leaders step
/// down for slowness alone.
pub const SHARED_STORE: &[(&str, &str)] =
    &[("CHECKPOINT_STORE", "mongodb"), ("LEASE_TTL_MS", "3000"), ("LEASE_RENEW_MS", "500")];

/// One test's isolated database, working directory and binary environment. Dropping it drops
/// the database, also when the test fails, so a failed run leaves nothing on the server; the
/// directory goes with its `TempDir`.
pub struct TestEnv {
    pub client: Client,
    pub db: Database,
    pub db_name: String,
    pub dir: tempfile::TempDir,
    pub uri: String,
    dropped: bool,
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
        TestEnv { client, db, db_name, dir: tempfile::tempdir().unwrap(), uri, dropped: false }
    }

    /// A server of its own started with `server_args`, and on it a fresh database with the
    /// references of `seed_references`; the server stops when the first value is dropped.
    #[allow(dead_code)]
    pub async fn seeded_on_own_server(name: &str, server_args: &str) -> (OwnServer, TestEnv, Refs) {
        let server = OwnServer::start(server_args);
        let t = TestEnv::with_uri(name, server.uri.clone()).await;
        let refs = t.seed_references().await;
        (server, t, refs)
    }

    /// A fresh database on the server under test, with the references of `seed_references`.
    pub async fn seeded(name: &str) -> (TestEnv, Refs) {
        let t = Self::new(name).await;
        let refs = t.seed_references().await;
        (t, refs)
    }

    /// A new client to the same server and database, after the server restarted.
    pub async fn reconnect(&mut self) {
        self.client = Client::with_uri_str(&self.uri).await.expect("test client");
        self.db = self.client.database(&self.db_name);
    }

    pub fn orders(&self) -> Collection<Document> {
        self.db.collection("Commandes")
    }

    pub fn archive(&self) -> Collection<Document> {
        self.db.collection("Commandes_archive")
    }

    /// A unique index of the archive on `field`: what an order may collide on without being
    /// the same order.
    pub async fn unique_archive_index(&self, field: &str) {
        let unique = mongodb::options::IndexOptions::builder().unique(true).build();
        let index = mongodb::IndexModel::builder().keys(doc! { field: 1 }).options(unique).build();
        self.archive().create_index(index).await.unwrap();
    }

    /// How many documents the archive holds.
    pub async fn archive_len(&self) -> u64 {
        self.archive().count_documents(doc! {}).await.unwrap()
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("state/resume_token.json")
    }

    /// Makes every save of the token file fail, as on a full or read-only disk, whoever runs the
    /// test (root ignores permissions): its directory moves away and a plain file takes its
    /// place. Returns where the directory went. (The temp file's name is random, so a save
    /// cannot be blocked by taking that name.)
    pub fn block_token_saves(&self) -> PathBuf {
        let state = self.token_file().parent().unwrap().to_path_buf();
        let moved = state.with_file_name("state.moved");
        std::fs::rename(&state, &moved).unwrap();
        // A save under way may make the directory again in between (seen under load): it is
        // removed, with the newer token it may hold (the moved, older one is then resumed
        // from: a replay, which is idempotent), until the plain file takes its place.
        loop {
            match std::fs::write(&state, "not a directory") {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
                    let _ = std::fs::remove_dir_all(&state);
                }
                Err(e) => panic!("blocking the token saves: {e}"),
            }
        }
        moved
    }

    /// Undoes `block_token_saves`.
    pub fn unblock_token_saves(&self) {
        let state = self.token_file().parent().unwrap().to_path_buf();
        std::fs::remove_file(&state).unwrap();
        std::fs::rename(state.with_file_name("state.moved"), &state).unwrap();
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

    /// An `archiver watch` of this test, to configure and start.
    pub fn watch(&self) -> WatchRun<'_> {
        WatchRun { t: self, args: Vec::new(), vars: Vec::new() }
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
        self.wait_archived_within(n, 30).await;
    }

    /// [`TestEnv::wait_archived`], for work that takes longer than usual on a loaded machine.
    pub async fn wait_archived_within(&self, n: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let count = self.archive().count_documents(doc! {}).await.unwrap();
            assert!(count <= n, "archive holds {count} documents, expected {n}");
            if count == n {
                return;
            }
            assert!(Instant::now() < deadline, "archive holds {count} documents after {secs} s, expected {n}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts every delivered order in the source is archived exactly once, and nothing else is.
    pub async fn assert_archive_matches_delivered(&self) {
        self.assert_delivered_in(&self.archive()).await;
    }

    /// `assert_archive_matches_delivered` for an archive collection elsewhere.
    pub async fn assert_delivered_in(&self, archive: &Collection<Document>) {
        let delivered: Vec<Bson> = self.orders().distinct("_id", doc! { "status": "livrée" }).await.unwrap();
        let archived: Vec<Bson> = archive.distinct("_id", doc! {}).await.unwrap();
        let total = archive.count_documents(doc! {}).await.unwrap();
        assert_eq!(total as usize, archived.len(), "duplicate archive documents");
        let mut d: Vec<String> = delivered.iter().map(|b| b.to_string()).collect();
        let mut a: Vec<String> = archived.iter().map(|b| b.to_string()).collect();
        d.sort();
        a.sort();
        assert_eq!(a, d, "archive ids differ from delivered ids");
    }

    /// Drops what the server's oplog holds (a SecantusDB admin command, for the lost-history
    /// tests on a server of their own).
    pub async fn prune_oplog(&self) {
        self.client.database("admin").run_command(doc! { "secantusAdmin.pruneOplog": 1 }).await.unwrap();
    }

    /// Inserts the orders numbered `numbers`, delivered.
    pub async fn deliver(&self, refs: &Refs, numbers: impl IntoIterator<Item = u32>) {
        self.orders().insert_many(numbers.into_iter().map(|n| order(refs, n, "livrée"))).await.unwrap();
    }

    /// Waits until the archive holds `n` documents, then asserts they are exactly the delivered
    /// orders.
    pub async fn wait_all_archived(&self, n: u64) {
        self.wait_archived(n).await;
        self.assert_archive_matches_delivered().await;
    }

    /// Drops the database now (dropping the `TestEnv` does it otherwise).
    pub async fn cleanup(mut self) {
        self.db.drop().await.ok();
        self.dropped = true;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop cannot await, and the test's runtime may be gone or single-threaded: a thread of
        // its own with a client of its own. A short server selection, since the server may be
        // the one a failed test left stopped.
        let (uri, db_name) = (self.uri.clone(), self.db_name.clone());
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut options = mongodb::options::ClientOptions::parse(&uri).await.ok()?;
                options.server_selection_timeout = Some(Duration::from_secs(2));
                let client = Client::with_options(options).ok()?;
                client.database(&db_name).drop().await.ok()
            })
        });
        let _ = dropping.join();
    }
}

/// An `archiver watch` being configured: the test's environment plus these arguments and
/// variables (later ones win).
pub struct WatchRun<'a> {
    t: &'a TestEnv,
    args: Vec<String>,
    vars: Vec<(String, String)>,
}

impl WatchRun<'_> {
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.push((key.into(), value.into()));
        self
    }

    pub fn envs<K: AsRef<str>, V: AsRef<str>>(mut self, vars: &[(K, V)]) -> Self {
        self.vars.extend(vars.iter().map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())));
        self
    }

    /// The shared checkpoint store (`SHARED_STORE`), as instance `instance`.
    pub fn shared_store(self, instance: &str) -> Self {
        self.envs(SHARED_STORE).env("INSTANCE_ID", instance)
    }

    /// Its own token file, in the test's directory.
    pub fn token_file(self, name: &str) -> Self {
        let path = self.t.dir.path().join(name);
        self.env("RESUME_TOKEN_FILE", path.to_str().unwrap())
    }

    /// Partition `partition` of `partitions`.
    pub fn partition(self, partition: u32, partitions: u32) -> Self {
        self.env("PARTITIONS", partitions.to_string()).env("PARTITION", partition.to_string())
    }

    /// Starts it and waits until its stream is open and the token file saved.
    pub async fn start(self) -> Watcher {
        let token = self.t.token_file();
        let watcher = self.until("change stream open").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !token.exists() {
            assert!(Instant::now() < deadline, "no token file: {}", watcher.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        watcher
    }

    /// Starts it and waits until its log says `marker`.
    pub async fn until(self, marker: &str) -> Watcher {
        let log = self.t.dir.path().join(format!("watch-{}.stderr", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let mut cmd = self.t.archiver(&["watch"]);
        cmd.args(&self.args).envs(self.vars);
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

/// A running `archiver watch`, killed if it is still running when dropped (a failed test
/// leaves no process behind).
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

    /// The last 40 lines of its log, for failure messages.
    pub fn tail(&self) -> String {
        let log = self.stderr();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until its log says `needle`, for up to `secs` seconds.
    pub async fn wait_for_log(&self, secs: u64, needle: &str) {
        eventually(secs, needle, || async { self.log_contains(needle) }).await;
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The values of field `name` in its "batch archived" lines, each of which must carry it.
    pub fn batch_field(&self, name: &str) -> Vec<u64> {
        let log = self.stderr();
        let field = format!(" {name}=");
        log.lines()
            .filter(|l| l.contains("batch archived"))
            .map(|l| {
                let value = l.split(&field).nth(1).unwrap_or_else(|| panic!("no {name} in: {l}"));
                value.split_whitespace().next().unwrap().parse().unwrap_or_else(|_| panic!("{name} in: {l}"))
            })
            .collect()
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

    /// SIGTERM; asserts a clean exit (0) and returns the log.
    pub async fn stop_ok(&mut self) -> String {
        let status = self.stop().await;
        assert_eq!(status.code(), Some(0), "watch exited with {status}:\n{}", self.tail());
        self.stderr()
    }

    /// SIGKILL, and waits until it is gone.
    pub async fn kill(&mut self) {
        self.signal("KILL");
        self.wait(Duration::from_secs(10)).await;
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
        assert!(self.try_stop(), "scripts/secantusd.sh stop failed");
    }

    fn try_stop(&self) -> bool {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/secantusd.sh");
        let stopped = Command::new("bash").arg(script).args(["stop", self.dir.path().to_str().unwrap()]).status();
        stopped.is_ok_and(|status| status.success())
    }

    /// Starts again on the same data and port.
    pub fn restart(&self) {
        let (uri, _) = Self::launch(self.dir.path(), self.port, &self.extra_args);
        assert_eq!(uri, self.uri);
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        // No assertion here: a panic while a failed test unwinds would abort the whole binary.
        self.try_stop();
    }
}

/// How the orders of a `Load` get delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Inserted already delivered.
    Inserted,
    /// Inserted in delivery, then updated to delivered: an update event in the stream.
    Updated,
    /// One of each in turn, so both kinds of change event are in the stream.
    Alternating,
}

/// How a `Load` paces its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// A pause of this long after each delivery.
    Pause(Duration),
    /// About this many deliveries a second, whatever each one takes.
    PerSecond(u32),
}

/// Steady deliveries from the test's own client while the test does something else. Stopped
/// when dropped, so a failed test does not write on into a database being dropped.
pub struct Load {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<u32>,
}

impl Load {
    pub fn start(t: &TestEnv, refs: Refs, delivery: Delivery, pace: Pace) -> Load {
        let orders = t.orders();
        let stop = CancellationToken::new();
        let running = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = match pace {
                Pace::PerSecond(n) => Some(tokio::time::interval(Duration::from_secs(1) / n)),
                Pace::Pause(_) => None,
            };
            if let Some(tick) = &mut tick {
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            let mut n = 0u32;
            while !running.is_cancelled() {
                if let Some(tick) = &mut tick {
                    tick.tick().await;
                }
                let by_update = match delivery {
                    Delivery::Inserted => false,
                    Delivery::Updated => true,
                    Delivery::Alternating => !n.is_multiple_of(2),
                };
                if by_update {
                    let o = order(&refs, n, "en_livraison");
                    let id = o.get_object_id("_id").unwrap();
                    orders.insert_one(o).await.expect("insert an order");
                    let delivered = doc! { "$set": { "status": "livrée", "date_livraison": DateTime::now() } };
                    orders.update_one(doc! { "_id": id }, delivered).await.expect("deliver an order");
                } else {
                    orders.insert_one(order(&refs, n, "livrée")).await.expect("deliver an order");
                }
                n += 1;
                if let Pace::Pause(pause) = pace {
                    tokio::time::sleep(pause).await;
                }
            }
            n
        });
        Load { stop, task }
    }

    /// Stops delivering; how many orders were delivered.
    pub async fn finish(mut self) -> u32 {
        self.stop.cancel();
        (&mut self.task).await.expect("load task")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
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

/// One probe request with short timeouts, `None` if the endpoint does not answer (the process
/// may be gone or frozen).
pub async fn probe(addr: &str, path: &str) -> Option<(u16, String)> {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let addr: std::net::SocketAddr = addr.parse().ok()?;
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()))
    })
    .await
    .ok()
    .flatten()
}

/// A `/metrics` text with the `stream` and `partition` labels that `watch` puts on every series
/// taken out (`archiver_ready{stream="…",partition="0/1"} 1` reads `archiver_ready 1`), for
/// tests about values rather than labels.
pub fn unlabelled(metrics: &str) -> String {
    let mut out = String::new();
    for line in metrics.lines() {
        match (line.starts_with('#'), line.find('{'), line.rfind('}')) {
            (false, Some(open), Some(close)) if open < close => {
                let kept: Vec<&str> = line[open + 1..close]
                    .split("\",")
                    .map(|l| l.trim_end_matches('"'))
                    .filter(|l| !l.is_empty() && !l.starts_with("stream=") && !l.starts_with("partition="))
                    .collect();
                out.push_str(&line[..open]);
                if !kept.is_empty() {
                    out.push('{');
                    out.push_str(&kept.iter().map(|l| format!("{l}\"")).collect::<Vec<_>>().join(","));
                    out.push('}');
                }
                out.push_str(&line[close + 1..]);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
