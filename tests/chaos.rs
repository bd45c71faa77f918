//! A chaos soak: three `archiver watch` instances share a checkpoint store with a lease (one
//! leads, two stand by), reach the source through the fault proxy (tests/common/proxy.rs) and
//! write to an archive on a server of its own, which also holds the shared checkpoint and the
//! lease. Orders are delivered at a steady rate, and every 2 to 5 s one fault is drawn at random:
//! the leader killed (SIGKILL) and replaced under the same instance name, the leader frozen
//! (SIGSTOP) for a few seconds, the archive server restarted, the source blackholed for a few
//! seconds, a standby restarted. Once the faults stop and heal, every delivered order must be
//! archived exactly once and enriched, nothing else archived, and all three instances alive,
//! each exiting 0 on SIGTERM.
//!
//! `CHAOS_SECONDS` (default 60) sets how long faults are injected; `CHAOS_SEED` replays a run's
//! choices (which fault, when, for how long). The seed is printed first, each fault as it is
//! injected, and a failure repeats the seed with the faults so far and the tails of the logs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::{Mode, Proxy};
use common::{health_addr, order, probe, Delivery, Load, OwnServer, Pace, Refs, TestEnv, Watcher};
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::{Client, Collection, Database};
use tokio_util::sync::CancellationToken;

/// Settings that make each outage show and heal within seconds: short retry delays and server
/// selection, an archive write or checkpoint save abandoned after 5 s, a stream silent for 2 s
/// beyond its await time reported (and reopened after six times that: a connection the
/// blackhole swallowed stays silent after the heal). The lease is `common::SHARED_STORE`'s.
const CHAOS_SETTINGS: &[(&str, &str)] = &[
    ("RETRY_MAX_ATTEMPTS", "100"),
    ("RETRY_MAX_DELAY_MS", "1000"),
    ("MONGODB_SERVER_SELECTION_TIMEOUT_MS", "1000"),
    ("MONGODB_CONNECT_TIMEOUT_MS", "1000"),
    ("WRITE_TIMEOUT_MS", "5000"),
    ("STREAM_TIMEOUT_MS", "2000"),
];

/// The instance names; a killed instance is replaced under its own name.
const INSTANCES: [&str; 3] = ["chaos-a", "chaos-b", "chaos-c"];

/// Steady traffic through every fault, light enough for a 2-core machine that also runs two
/// servers and three watchers.
const DELIVERIES_PER_SECOND: u32 = 50;

/// How long a fault soak lasts by default (`CHAOS_SECONDS`), and the fewest faults such a run
/// injects: it goes on past its time until it has.
const DEFAULT_SECONDS: u64 = 60;
const FEWEST_FAULTS: u32 = 10;

/// How long the end waits for every delivered order to be archived: generous, since the last
/// fault may have just ended on a loaded machine.
const CATCH_UP: Duration = Duration::from_secs(120);

/// How long a started instance may take to lead or stand by, and a stopped one to exit.
const START_WAIT: Duration = Duration::from_secs(60);
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// How long a leader is looked for when a fault targets it: leadership may be changing hands
/// after the previous fault.
const LEADER_WAIT: Duration = Duration::from_secs(15);

/// SplitMix64: a tiny deterministic generator, so that a seed replays a run's choices.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A duration between `low_ms` and `high_ms` milliseconds, both included.
    fn millis(&mut self, low_ms: u64, high_ms: u64) -> Duration {
        Duration::from_millis(low_ms + self.next_u64() % (high_ms - low_ms + 1))
    }
}

/// The seed of this run: `CHAOS_SEED`, or else the clock.
fn chaos_seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(seed) => seed.trim().parse().unwrap_or_else(|e| panic!("CHAOS_SEED={seed:?} is not a u64: {e}")),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    }
}

/// How long faults are injected: `CHAOS_SECONDS`, default 60.
fn chaos_duration() -> Duration {
    let seconds = match std::env::var("CHAOS_SECONDS") {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| panic!("CHAOS_SECONDS={s:?} is not a number of seconds: {e}")),
        Err(_) => DEFAULT_SECONDS,
    };
    Duration::from_secs(seconds)
}

/// The faults a run draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL the leader, then start a replacement under its instance name.
    KillLeader,
    /// SIGSTOP the leader for 1 to 4 s, then SIGCONT: it may wake past its lease.
    FreezeLeader,
    /// Stop the archive server (SIGTERM), 1 to 4 s down, start it again on the same data: the
    /// archive, the shared checkpoint and the lease all go away together.
    RestartArchive,
    /// The source swallows every byte for 1 to 4 s.
    BlackholeSource,
    /// SIGTERM a standby, which must exit 0, and start it again.
    RestartStandby,
}

impl Fault {
    const ALL: [Fault; 5] =
        [Fault::KillLeader, Fault::FreezeLeader, Fault::RestartArchive, Fault::BlackholeSource, Fault::RestartStandby];
}

/// Deals the faults in rounds of the five kinds shuffled, so that every kind occurs in any ten
/// faults in a row, in an order the seed decides.
#[derive(Default)]
struct Deck {
    round: Vec<Fault>,
}

impl Deck {
    fn deal(&mut self, rng: &mut Rng) -> Fault {
        if self.round.is_empty() {
            self.round = Fault::ALL.to_vec();
            for i in (1..self.round.len()).rev() {
                self.round.swap(i, rng.below(i + 1));
            }
        }
        self.round.pop().unwrap()
    }
}

/// Orders that are never delivered (cancelled), inserted alongside the deliveries, so that
/// "nothing else is archived" is checked against real traffic. Stopped when dropped.
struct Decoys {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<u32>,
}

impl Decoys {
    /// About ten a second.
    fn start(t: &TestEnv, refs: Refs) -> Decoys {
        let orders = t.orders();
        let stop = CancellationToken::new();
        let running = stop.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u32;
            while !running.is_cancelled() {
                orders.insert_one(order(&refs, 1_000_000 + n, "annulée")).await.expect("insert a cancelled order");
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        });
        Decoys { stop, task }
    }

    /// Stops inserting; how many were inserted.
    async fn finish(mut self) -> u32 {
        self.stop.cancel();
        (&mut self.task).await.expect("decoy task")
    }
}

impl Drop for Decoys {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// The role an instance reports on `/health/ready` (`leader` or `standby`), if it answers.
async fn role(addr: &str) -> Option<&'static str> {
    let (_, body) = probe(addr, "/health/ready").await?;
    ["leader", "standby"].into_iter().find(|role| body.contains(&format!("\"role\":\"{role}\"")))
}

/// One running `watch` of the soak.
struct Instance {
    name: &'static str,
    watcher: Watcher,
    /// Its health and metrics endpoint.
    addr: String,
}

/// The system under chaos and the story of the run. On a panic it prints the seed, the faults
/// injected so far and the tails of the logs, whichever assertion failed.
struct Chaos<'a> {
    // Dropped in this order: the watchers (killed) before the servers they talk to.
    instances: Vec<Instance>,
    /// Instances killed or restarted, kept for their logs.
    retired: Vec<Instance>,
    proxy: Arc<Proxy>,
    archive_server: OwnServer,
    archive_db: Database,
    t: &'a TestEnv,
    seed: u64,
    rng: Rng,
    started: Instant,
    story: Vec<String>,
}

impl<'a> Chaos<'a> {
    /// The archive's own server and a proxy in front of the source; no instance yet.
    async fn new(t: &'a TestEnv, seed: u64) -> Chaos<'a> {
        let archive_server = OwnServer::start("");
        let archive_db = Client::with_uri_str(&archive_server.uri).await.expect("archive client").database(&t.db_name);
        let proxy = Proxy::for_uri(&t.uri).await;
        Chaos {
            instances: Vec::new(),
            retired: Vec::new(),
            proxy,
            archive_server,
            archive_db,
            t,
            seed,
            rng: Rng(seed),
            started: Instant::now(),
            story: Vec::new(),
        }
    }

    fn archive(&self) -> Collection<Document> {
        self.archive_db.collection("Commandes_archive")
    }

    /// What every assertion message starts with, so that any failure can be replayed.
    fn replay(&self) -> String {
        format!("[chaos, replay with CHAOS_SEED={}]", self.seed)
    }

    /// Logs a step of the run, with its time since the start, and keeps it for the story.
    fn say(&mut self, what: impl Into<String>) {
        let line = format!("+{:6.1} s  {}", self.started.elapsed().as_secs_f64(), what.into());
        eprintln!("chaos {line}");
        self.story.push(line);
    }

    /// The seed, every step so far and the tails of the logs: the story of a failure.
    fn story(&self) -> String {
        let mut story = format!("{} the run so far:\n{}\n", self.replay(), self.story.join("\n"));
        let last_retired = self.retired.last().into_iter().map(|i| (i, "retired"));
        for (instance, state) in self.instances.iter().map(|i| (i, "current")).chain(last_retired) {
            story.push_str(&format!(
                "\n--- {} ({state}, pid {}), last lines of {}:\n{}\n",
                instance.name,
                instance.watcher.child.id(),
                instance.watcher.log.display(),
                instance.watcher.tail()
            ));
        }
        story
    }

    /// Starts instance `name` and waits until it leads or stands by.
    async fn start_instance(&self, name: &'static str) -> Instance {
        let mut watcher = self
            .t
            .watch()
            .shared_store(name)
            .envs(CHAOS_SETTINGS)
            .env("MONGODB_URI", self.proxy.uri(&self.t.uri))
            .env("ARCHIVE_URI", &self.archive_server.uri)
            .until("health and metrics served")
            .await;
        let addr = health_addr(&watcher);
        let deadline = Instant::now() + START_WAIT;
        while !watcher.log_contains("leadership acquired")
            && !watcher.log_contains("standby: another instance holds the lease")
        {
            if let Some(status) = watcher.child.try_wait().unwrap() {
                panic!("{} {name} exited with {status} at start:\n{}", self.replay(), watcher.tail());
            }
            assert!(
                Instant::now() < deadline,
                "{} {name} neither leads nor stands by after {START_WAIT:?}",
                self.replay()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Instance { name, watcher, addr }
    }

    /// Replaces instance `index` by a new process of the same name; the old one must have exited.
    async fn replace(&mut self, index: usize) {
        let replacement = self.start_instance(self.instances[index].name).await;
        let old = std::mem::replace(&mut self.instances[index], replacement);
        self.retired.push(old);
        let role = role(&self.instances[index].addr).await.unwrap_or("unknown");
        self.say(format!("    {} started again ({role})", self.instances[index].name));
    }

    /// How leadership moved during the run, from every log (retired instances' too): how many
    /// times each instance took the lease, and how many of those were takeovers from another.
    fn leadership_record(&self) -> String {
        let mut by_instance = Vec::new();
        let mut takeovers = 0;
        for name in INSTANCES {
            let mut acquired = 0;
            for instance in self.instances.iter().chain(&self.retired).filter(|i| i.name == name) {
                for line in instance.watcher.stderr().lines().filter(|l| l.contains("leadership acquired")) {
                    acquired += 1;
                    takeovers += usize::from(line.contains("previous_leader=Some"));
                }
            }
            by_instance.push(format!("{name} {acquired}"));
        }
        format!("leadership taken {} ({takeovers} takeovers from another instance)", by_instance.join(", "))
    }

    /// Who holds the lease, according to the archive server (`None` if it does not answer).
    async fn lease_holder(&self) -> Option<String> {
        let leases = self.archive_db.collection::<Document>("archiver_leases");
        let lease = tokio::time::timeout(Duration::from_secs(3), leases.find_one(doc! {})).await.ok()?.ok()??;
        lease.get_str("holder").ok().map(str::to_owned)
    }

    /// The instance that leads, by its `/health/ready` role (and by the lease if, for a moment,
    /// two say they lead); `None` if none does within `LEADER_WAIT`.
    async fn find_leader(&self) -> Option<usize> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let mut leaders = Vec::new();
            for (i, instance) in self.instances.iter().enumerate() {
                if role(&instance.addr).await == Some("leader") {
                    leaders.push(i);
                }
            }
            match leaders[..] {
                [one] => return Some(one),
                [first, ..] => {
                    let holder = self.lease_holder().await;
                    let by_lease = leaders.iter().copied().find(|&i| holder.as_deref() == Some(self.instances[i].name));
                    return Some(by_lease.unwrap_or(first));
                }
                [] if Instant::now() >= deadline => return None,
                [] => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The leader, or a random instance (said in the log) when none leads right now.
    async fn leader_or_any(&mut self) -> usize {
        if let Some(leader) = self.find_leader().await {
            return leader;
        }
        let any = self.rng.below(self.instances.len());
        self.say(format!("    no instance leads after {LEADER_WAIT:?}; {} is the target", self.instances[any].name));
        any
    }

    /// A random instance that stands by, or else one that does not lead.
    async fn a_standby(&mut self) -> usize {
        let mut roles = Vec::new();
        for instance in &self.instances {
            roles.push(role(&instance.addr).await);
        }
        let standbys: Vec<usize> = (0..roles.len()).filter(|&i| roles[i] == Some("standby")).collect();
        let candidates = if standbys.is_empty() {
            (0..roles.len()).filter(|&i| roles[i] != Some("leader")).collect()
        } else {
            standbys
        };
        match candidates.len() {
            0 => self.rng.below(self.instances.len()),
            n => candidates[self.rng.below(n)],
        }
    }

    /// Waits until instance `index` exits, and asserts it exits 0.
    async fn assert_exits_0(&mut self, index: usize) {
        let deadline = Instant::now() + EXIT_WAIT;
        let status = loop {
            if let Some(status) = self.instances[index].watcher.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} {} did not exit within {EXIT_WAIT:?} of SIGTERM",
                self.replay(),
                self.instances[index].name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            status.code(),
            Some(0),
            "{} {} exited with {status} on SIGTERM",
            self.replay(),
            self.instances[index].name
        );
    }

    /// Asserts every instance is still running: none may die of a fault it did not receive.
    fn assert_all_running(&mut self, when: &str) {
        let replay = self.replay();
        for instance in &mut self.instances {
            if let Some(status) = instance.watcher.child.try_wait().unwrap() {
                panic!("{replay} {} exited with {status} {when}", instance.name);
            }
        }
    }

    /// Injects `fault` (number `n`) and heals it.
    async fn inject(&mut self, n: u32, fault: Fault) {
        match fault {
            Fault::KillLeader => {
                let leader = self.leader_or_any().await;
                self.say(format!("#{n} SIGKILL the leader {}", self.instances[leader].name));
                self.instances[leader].watcher.kill().await;
                // A standby takes over once the dead leader's lease expires, fencing its epoch;
                // only then does the killed instance start again (a replacement under the same
                // name started at once would take its own lease straight back).
                match self.find_leader().await {
                    Some(next) => {
                        let name = self.instances[next].name;
                        self.say(format!("    {name} took over"));
                    }
                    None => self.say(format!("    no standby took over within {LEADER_WAIT:?}")),
                }
                self.replace(leader).await;
            }
            Fault::FreezeLeader => {
                let leader = self.leader_or_any().await;
                let frozen = self.rng.millis(1000, 4000);
                self.say(format!("#{n} SIGSTOP the leader {} for {frozen:?}", self.instances[leader].name));
                self.instances[leader].watcher.signal("STOP");
                tokio::time::sleep(frozen).await;
                self.instances[leader].watcher.signal("CONT");
                self.say(format!("    {} SIGCONT", self.instances[leader].name));
            }
            Fault::RestartArchive => {
                let down = self.rng.millis(1000, 4000);
                self.say(format!("#{n} stop the archive server (SIGTERM), down for {down:?}"));
                self.archive_server.stop();
                tokio::time::sleep(down).await;
                self.archive_server.restart();
                self.say("    archive server started again");
            }
            Fault::BlackholeSource => {
                let silent = self.rng.millis(1000, 4000);
                self.say(format!("#{n} blackhole the source for {silent:?}"));
                self.proxy.set_mode(Mode::Blackhole);
                tokio::time::sleep(silent).await;
                self.proxy.set_mode(Mode::Pass);
                self.say("    source passes again");
            }
            Fault::RestartStandby => {
                let standby = self.a_standby().await;
                self.say(format!("#{n} restart the standby {} (SIGTERM)", self.instances[standby].name));
                self.instances[standby].watcher.signal("TERM");
                self.assert_exits_0(standby).await;
                self.replace(standby).await;
            }
        }
    }

    /// Asserts the archive holds each delivered order exactly once, enriched from its
    /// references, and nothing else; and that no order was dead-lettered.
    async fn assert_archived_exactly_once(&self) {
        let replay = self.replay();
        let delivered: Vec<Document> =
            self.t.orders().find(doc! { "status": "livrée" }).await.unwrap().try_collect().await.unwrap();
        let archived: Vec<Document> = self.archive().find(doc! {}).await.unwrap().try_collect().await.unwrap();
        let id = |d: &Document| d.get("_id").map(Bson::to_string).unwrap_or_default();
        let by_id: std::collections::HashMap<String, &Document> = delivered.iter().map(|d| (id(d), d)).collect();
        let mut seen = std::collections::HashSet::new();
        let mut duplicated = Vec::new();
        let mut unexpected = Vec::new();
        let mut misenriched = Vec::new();
        for doc in &archived {
            let doc_id = id(doc);
            if !seen.insert(doc_id.clone()) {
                duplicated.push(doc_id);
            } else if let Some(order) = by_id.get(&doc_id) {
                if let Some(problem) = enrichment_problem(doc, order) {
                    misenriched.push(format!("{doc_id}: {problem}"));
                }
            } else {
                unexpected.push(doc_id);
            }
        }
        let missing: Vec<&String> = by_id.keys().filter(|id| !seen.contains(*id)).collect();
        let first = |ids: &[String]| ids.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        assert!(duplicated.is_empty(), "{replay} {} orders archived twice: {}", duplicated.len(), first(&duplicated));
        assert!(
            missing.is_empty(),
            "{replay} {} of {} delivered orders not archived: {:?}",
            missing.len(),
            delivered.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        assert!(
            unexpected.is_empty(),
            "{replay} {} undelivered orders archived: {}",
            unexpected.len(),
            first(&unexpected)
        );
        assert!(misenriched.is_empty(), "{replay} {} wrongly enriched: {}", misenriched.len(), first(&misenriched));
        let dead_letters = self.archive_db.collection::<Document>("Commandes_archive_errors");
        let letters = dead_letters.count_documents(doc! {}).await.unwrap();
        assert_eq!(letters, 0, "{replay} valid orders were dead-lettered");
    }
}

impl Drop for Chaos<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.story());
        }
    }
}

/// What is wrong with `archived` as the archive document of `order` (the references of
/// `TestEnv::seed_references`), if anything.
fn enrichment_problem(archived: &Document, order: &Document) -> Option<String> {
    for field in ["numero_commande", "status", "date_commande", "date_livraison", "montant_total"] {
        if archived.get(field) != order.get(field) {
            return Some(format!("{field} is {:?}, the order's {:?}", archived.get(field), order.get(field)));
        }
    }
    let text = |path: &[&str]| -> Option<String> {
        let (last, documents) = path.split_last()?;
        let mut at = archived;
        for key in documents {
            at = at.get_document(key).ok()?;
        }
        at.get_str(last).ok().map(str::to_owned)
    };
    let expected = [
        (&["client", "nom"][..], "Martin"),
        (&["client", "adresse", "ville"][..], "Lyon"),
        (&["livreur", "vehicule"][..], "vélo"),
        (&["restaurant", "nom"][..], "Chez Mario"),
        (&["archive_source"][..], "watch"),
    ];
    for (path, value) in expected {
        if text(path).as_deref() != Some(value) {
            return Some(format!("{} is {:?}, expected {value:?}", path.join("."), text(path)));
        }
    }
    let items: Vec<(Option<&str>, Option<f64>)> = archived
        .get_array("items")
        .map(|items| {
            items
                .iter()
                .filter_map(Bson::as_document)
                .map(|item| (item.get_str("nom").ok(), item.get_f64("sous_total").ok()))
                .collect()
        })
        .unwrap_or_default();
    if items != [(Some("Pizza"), Some(25.0)), (Some("Tiramisu"), Some(6.0))] {
        return Some(format!("items are {items:?}"));
    }
    match archived.get_array("anomalies") {
        Ok(anomalies) if anomalies.is_empty() => None,
        other => Some(format!("anomalies: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_watchers_under_random_faults_archive_every_delivered_order_exactly_once() {
    let seed = chaos_seed();
    let duration = chaos_duration();
    // At least ten faults in a default run, however slow each one is to inject on this machine.
    let fewest_faults = if duration >= Duration::from_secs(DEFAULT_SECONDS) { FEWEST_FAULTS } else { 0 };
    eprintln!(
        "chaos: CHAOS_SEED={seed}, {} s of faults (CHAOS_SECONDS), at least {fewest_faults} of them",
        duration.as_secs()
    );
    let (t, refs) = TestEnv::seeded("chaos").await;
    let mut chaos = Chaos::new(&t, seed).await;

    // The first instance leads from the start; the other two stand by.
    let first = chaos.start_instance(INSTANCES[0]).await;
    chaos.instances.push(first);
    for name in &INSTANCES[1..] {
        let standby = chaos.start_instance(name).await;
        chaos.instances.push(standby);
    }
    let load = Load::start(&t, refs, Delivery::Alternating, Pace::PerSecond(DELIVERIES_PER_SECOND));
    let decoys = Decoys::start(&t, refs);
    let archiving_deadline = Instant::now() + START_WAIT;
    while chaos.archive().count_documents(doc! {}).await.unwrap_or(0) == 0 {
        assert!(Instant::now() < archiving_deadline, "{} nothing archived before the first fault", chaos.replay());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    chaos.say(format!("three instances up, {DELIVERIES_PER_SECOND} deliveries/s archived; faults begin"));

    let mut deck = Deck::default();
    let mut injected = Vec::new();
    let faults_began = Instant::now();
    // The next fault starts 2 to 5 s after the previous one started, or as soon as that one is
    // healed if it took longer.
    let mut next_fault = faults_began + chaos.rng.millis(2000, 5000);
    loop {
        tokio::time::sleep_until(next_fault.into()).await;
        let fault_started = Instant::now();
        if fault_started - faults_began >= duration && injected.len() as u32 >= fewest_faults {
            break;
        }
        let fault = deck.deal(&mut chaos.rng);
        chaos.inject(injected.len() as u32 + 1, fault).await;
        injected.push(fault);
        chaos.assert_all_running(&format!("after fault #{} ({fault:?})", injected.len()));
        next_fault = fault_started + chaos.rng.millis(2000, 5000);
    }
    let faulty_for = faults_began.elapsed();
    let count = |kind: Fault| injected.iter().filter(|&&f| f == kind).count();
    let kinds: Vec<String> = Fault::ALL.iter().map(|&kind| format!("{kind:?} {}", count(kind))).collect();
    chaos.say(format!("faults end: {} in {:.1} s ({})", injected.len(), faulty_for.as_secs_f64(), kinds.join(", ")));
    assert!(
        injected.len() as u32 >= fewest_faults,
        "{} only {} faults injected in {faulty_for:?}",
        chaos.replay(),
        injected.len()
    );

    // The end: no more traffic, every fault healed (each heals itself; the proxy once more for
    // certain), then the archive must catch up.
    let delivered = load.finish().await;
    let cancelled = decoys.finish().await;
    chaos.proxy.set_mode(Mode::Pass);
    let stopped = Instant::now();
    chaos.say(format!("load stopped: {delivered} orders delivered, {cancelled} cancelled ones"));
    let delivered = u64::from(delivered);
    loop {
        let archived = chaos.archive().count_documents(doc! {}).await.ok();
        assert!(
            archived.is_none_or(|n| n <= delivered),
            "{} the archive holds {archived:?} documents, only {delivered} orders delivered",
            chaos.replay()
        );
        if archived == Some(delivered) {
            break;
        }
        assert!(
            stopped.elapsed() < CATCH_UP,
            "{} {archived:?} of {delivered} delivered orders archived {CATCH_UP:?} after the faults ended",
            chaos.replay()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    chaos.say(format!("all {delivered} archived {:.1} s after the load stopped", stopped.elapsed().as_secs_f64()));
    chaos.assert_archived_exactly_once().await;
    let record = chaos.leadership_record();
    chaos.say(record);

    chaos.assert_all_running("at the end");
    for i in 0..chaos.instances.len() {
        chaos.instances[i].watcher.signal("TERM");
        chaos.assert_exits_0(i).await;
        chaos.say(format!("{} exited 0 on SIGTERM", chaos.instances[i].name));
    }
}
