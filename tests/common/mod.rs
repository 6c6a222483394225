//! Shared harness of the Kafka integration tests (`route_stage.rs` on
//! librdkafka's in-process mock cluster, `route_tansu.rs` on a real tansu
//! broker), modeled on rust-rdkafka's `tests/utils.rs`.
//!
//! * [`MockKafka`]: a one-broker mock cluster per test; it has no
//!   CreateTopics API, so topics are made on it directly.
//! * [`Tansu`]: a `tansu broker` child process on a free loopback port,
//!   killed on drop.
//! * [`Producer`], [`Tail`], [`read`]: real Kafka clients that write inputs
//!   and read outputs back (read_committed).
//! * [`StageThread`]: `switchboard::stage::run` in-process on its own thread
//!   and runtime; [`Proc`]: `switchboard run` as a child process. Both are
//!   stopped on drop, so a failing test leaks nothing.
//! * [`Cases`]: the inputs a test sends and what the matrix says must happen
//!   to each; [`check_outputs`] compares that with what is on the topics.
//!
//! Every wait has a deadline ([`wait_until`]); nothing sleeps for a fixed time
//! instead of waiting for a condition.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::DateTime;
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer as _, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;
use switchboard::action::AgentAction;
use switchboard::changelog::{ReadRecord, read_all};
use switchboard::config::{Config, Guarantee, Stage};
use switchboard::decode::{AGENT_ACTION_SCHEMA_ID, Decoder, SchemaDir, encode_json_as_avro, frame};
use switchboard::enrich::{Directory, enrich};
use switchboard::matrix::Matrix;
use switchboard::metrics::Metrics;
use switchboard::packet::OwnedApprovalRequest;
use switchboard::route::route;
use switchboard::stage::route::RouteSummary;

// ------------------------------------------------------------- waiting ----

/// A deadline `secs` from now.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// Polls `condition` every 20 ms until it holds (true) or `deadline` passes
/// (false, after one last look).
pub fn wait_until(deadline: Instant, mut condition: impl FnMut() -> bool) -> bool {
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return condition();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_until`], failing the test with `what` when the deadline passes.
#[track_caller]
pub fn wait_for(deadline: Instant, what: &str, condition: impl FnMut() -> bool) {
    assert!(wait_until(deadline, condition), "timed out waiting for {what}");
}

/// Library logs in test output when `RUST_LOG` asks for them.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("a bound address").port()
}

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn default_matrix_path() -> PathBuf {
    manifest_dir().join("deploy/matrix.yaml")
}

pub fn default_matrix() -> Matrix {
    Matrix::load(&default_matrix_path()).expect("deploy/matrix.yaml loads")
}

/// A route-stage configuration with every default but the stage.
pub fn route_config(bootstrap: &str, matrix_path: &Path, guarantee: Guarantee) -> Config {
    let mut config = Config::new(bootstrap, matrix_path);
    config.stage = Stage::Route;
    config.guarantee = guarantee;
    config
}

// ---------------------------------------------------------- mock kafka ----

/// For a group that is joined again after its last member left: the mock
/// cluster then holds the next JoinGroup for the member's session timeout
/// less a second (a real broker makes the group Empty at once), so members
/// get a short session timeout.
pub fn quick_rejoin(config: &mut Config) {
    config.kafka.push(("session.timeout.ms".into(), "3000".into()));
    config.kafka.push(("heartbeat.interval.ms".into(), "300".into()));
}

/// The soak factor: `SWITCHBOARD_SOAK=N` makes the crash and rebalance
/// tests run N times longer (N times the kills, the kill-and-add cycles,
/// the approvals in a burst). 1, the suite's size, when unset.
pub fn soak() -> usize {
    std::env::var("SWITCHBOARD_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// librdkafka's in-process mock cluster (one broker), one per test.
pub struct MockKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
}

impl MockKafka {
    pub fn new() -> MockKafka {
        init_logging();
        let cluster = MockCluster::new(1).expect("starting the mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        MockKafka { cluster, bootstrap }
    }

    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.cluster
            .create_topic(name, partitions, 1)
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    }

    /// Every topic switchboard owns for `matrix`, and the matrix's directory
    /// topics, with `config.partitions` partitions.
    pub fn create_topics(&self, config: &Config, matrix: &Matrix) {
        let mut names = switchboard::kafka::owned_topics(config, matrix);
        names.extend(matrix.directory.iter().map(|t| t.topic.clone()));
        for name in names {
            self.create_topic(&name, config.partitions);
        }
    }

    /// Writes one record and waits until the broker has it.
    pub fn produce(&self, topic: &str, key: Option<&[u8]>, bytes: Option<&[u8]>) {
        let producer = Producer::new(&self.bootstrap);
        producer.send(topic, None, key, bytes);
        producer.flush();
    }

    /// Every committed record of `topics` as of now.
    pub fn read(&self, config: &Config, topics: &[&str]) -> Vec<ReadRecord> {
        read(config, topics)
    }

    /// The cluster itself, for fault injection.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}

impl Default for MockKafka {
    fn default() -> Self {
        MockKafka::new()
    }
}

// --------------------------------------------------------------- tansu ----

/// The `tansu` binary: on PATH, in `$CARGO_HOME/bin` or in `~/.cargo/bin`.
pub fn tansu_binary() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin/tansu"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/tansu"));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("the tansu binary (0.6.0) is needed: `cargo install tansu --version 0.6.0 --locked` (tests/run.sh does it)")
    })
}

/// A tansu broker as a child process on a free loopback port, with
/// in-memory storage ([`Tansu::start`]) or SQLite storage that survives a
/// restart ([`Tansu::start_persistent`]); killed on drop.
pub struct Tansu {
    child: Option<Child>,
    port: u16,
    storage: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tansu {
    pub fn start() -> Tansu {
        Tansu::start_with(|_| "memory://tansu/".to_string())
    }

    /// Storage in a SQLite file, so [`Tansu::restart`] keeps every topic.
    pub fn start_persistent() -> Tansu {
        // tansu reads the path as relative to its working directory, which
        // is the broker's own temporary directory.
        Tansu::start_with(|_| "sqlite://tansu.db".to_string())
    }

    fn start_with(storage: impl FnOnce(&Path) -> String) -> Tansu {
        init_logging();
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut tansu = Tansu {
            child: None,
            port: 0,
            storage: storage(dir.path()),
            log: dir.path().join("tansu.log"),
            _dir: dir,
        };
        // Another process may take the port between the probe and tansu's
        // bind; then tansu exits and a new port is tried.
        for _ in 0..5 {
            tansu.port = free_port();
            if tansu.launch() {
                return tansu;
            }
        }
        panic!("tansu did not start; its last log:\n{}", tansu.log());
    }

    /// The broker's process id while it runs (the benchmark reads its CPU
    /// time).
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the broker process on `self.port`; false if it did not come up.
    fn launch(&mut self) -> bool {
        let binary = tansu_binary();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("the tansu log");
        let err = out.try_clone().expect("the tansu log");
        let mut child = Command::new(&binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &self.storage,
            ])
            .current_dir(self._dir.path())
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            // Its info level logs every request; its group coordinator's
            // says when a member is dropped, which tests wait for.
            .env(
                "RUST_LOG",
                "warn,tansu_broker::coordinator::group::administrator=info",
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .dies_with_parent()
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let port = self.port;
        let until = deadline(30);
        let listening = wait_until(until, || {
            matches!(child.try_wait(), Ok(Some(_)))
                || TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
                    .is_ok()
        });
        if matches!(child.try_wait(), Ok(Some(_))) || !listening {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        self.child = Some(child);
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("a metadata client");
        wait_for(until, "tansu to answer a metadata request", || {
            probe.fetch_metadata(None, Duration::from_secs(1)).is_ok()
        });
        true
    }

    /// Kills the broker (clients see it vanish mid-request).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        let came_up = wait_until(deadline(30), || self.launch());
        assert!(came_up, "tansu restarted on port {}", self.port);
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many members of `group` the broker has dropped for missed
    /// heartbeats so far (from its coordinator's log).
    pub fn members_dropped(&self, group: &str) -> usize {
        let needle = format!(" for {group} in generation");
        self.log()
            .lines()
            .filter(|l| l.contains("missed heartbeat for ") && l.contains(&needle))
            .count()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- tansu log (tail) ---\n{}", tail(&self.log(), 40));
        }
    }
}

/// Makes `group` form a new generation: a plain consumer joins (taking a
/// share for a moment, never committing) and leaves. tansu 0.6.0 does not
/// start a new generation when it drops a member for missed heartbeats, so
/// a survivor's SyncGroup would keep returning its old share. `assignor`
/// must be one the group's members speak.
pub fn nudge_group(config: &Config, group: &str, topics: &[&str], assignor: &str) {
    let nudge: BaseConsumer = switchboard::kafka::consumer_config(config, group)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("partition.assignment.strategy", assignor)
        .create()
        .expect("a nudging consumer");
    nudge.subscribe(topics).expect("subscribing");
    wait_for(deadline(60), "the nudging consumer to get a share", || {
        let _ = nudge.poll(Duration::from_millis(100));
        nudge.assignment().is_ok_and(|a| a.count() > 0)
    });
    nudge.unsubscribe();
    // Dropping it closes it and leaves the group.
}

/// Creates every topic switchboard owns for `matrix` through the AdminClient,
/// as `switchboard run` does at start (for brokers with CreateTopics).
pub fn ensure_topics(config: &Config, matrix: &Matrix) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(60),
                switchboard::kafka::ensure_topics(config, matrix),
            )
            .await
        })
        .expect("creating topics in time")
        .expect("creating topics");
}

// --------------------------------------------------------- on tansu ----

/// The test's own clients against tansu: at-least-once (tansu refuses
/// librdkafka's transactions), 10 ms fetch waits (tansu holds a fetch that
/// long even with records ready), 3 partitions, group `group`.
pub fn tansu_config(tansu: &Tansu, matrix: &Path, group: &str) -> Config {
    let mut config = route_config(&tansu.bootstrap(), matrix, Guarantee::AtLeastOnce);
    config.kafka.push(("fetch.wait.max.ms".into(), "10".into()));
    config.partitions = 3;
    config.group_id = group.into();
    config
}

/// `switchboard ARGS… --bootstrap-servers B --kafka fetch.wait.max.ms=10`.
pub fn on_tansu(tansu: &Tansu, args: &[&str]) -> Command {
    let mut cmd = switchboard_command();
    cmd.args(args)
        .args(["--bootstrap-servers", &tansu.bootstrap()])
        .args(["--kafka", "fetch.wait.max.ms=10"]);
    cmd
}

/// `switchboard run --stage STAGE --guarantee at-least-once` in `group` on
/// tansu, serving metrics on `addr`. A short session timeout lets the group
/// notice a killed instance in seconds.
pub fn tansu_instance(tansu: &Tansu, matrix: &Path, stage: &str, group: &str, addr: &str) -> Command {
    let mut cmd = on_tansu(tansu, &["run", "--stage", stage, "--guarantee", "at-least-once"]);
    cmd.arg("--matrix")
        .arg(matrix)
        .args(["--partitions", "3", "--group-id", group, "--metrics-addr", addr])
        .args([
            "--kafka",
            "session.timeout.ms=6000",
            "--kafka",
            "heartbeat.interval.ms=500",
        ]);
    cmd
}

// ------------------------------------------------------------- clients ----

/// Counts failed deliveries, so a test never mistakes a lost input for a
/// routing bug.
#[derive(Default)]
pub struct Deliveries {
    failed: Mutex<Vec<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.lock().unwrap().push(e.to_string());
        }
    }
}

/// A plain (non-transactional) producer of test inputs.
pub struct Producer {
    producer: BaseProducer<Deliveries>,
}

impl Producer {
    pub fn new(bootstrap: &str) -> Producer {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "1")
            .set("message.timeout.ms", "30000")
            .create_with_context(Deliveries::default())
            .expect("creating a producer");
        Producer { producer }
    }

    /// Enqueues one record (to `partition`, or by key).
    pub fn send(&self, topic: &str, partition: Option<i32>, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = payload {
            record = record.payload(v);
        }
        let until = deadline(30);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < until =>
                {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => panic!("producing to {topic}: {e}"),
            }
        }
    }

    /// Waits until every record sent is acknowledged; fails on any loss.
    pub fn flush(&self) {
        self.producer
            .flush(Duration::from_secs(30))
            .expect("inputs acknowledged in time");
        let failed = std::mem::take(&mut *self.producer.context().failed.lock().unwrap());
        assert!(failed.is_empty(), "inputs not delivered: {failed:?}");
    }
}

/// Every committed record of `topics` as of now.
pub fn read(config: &Config, topics: &[&str]) -> Vec<ReadRecord> {
    read_all(config, topics, Duration::from_secs(30)).unwrap_or_else(|e| panic!("reading {topics:?}: {e}"))
}

/// A read_committed reader of whole topics that keeps what it read, for
/// waiting on outputs while a stage runs.
pub struct Tail {
    consumer: BaseConsumer,
    pub records: Vec<ReadRecord>,
}

impl Tail {
    /// Reads every partition of `topics` (which must exist) from the beginning.
    pub fn new(config: &Config, topics: &[&str]) -> Tail {
        let consumer: BaseConsumer = switchboard::kafka::reader_config(config)
            .create()
            .expect("creating a reader");
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
            for t in metadata.topics() {
                assert!(t.error().is_none(), "topic {topic} exists");
                for p in t.partitions() {
                    assignment
                        .add_partition_offset(topic, p.id(), Offset::Beginning)
                        .unwrap();
                }
            }
        }
        consumer.assign(&assignment).expect("assigning the reader");
        Tail {
            consumer,
            records: Vec::new(),
        }
    }

    /// Takes whatever has arrived, for up to `limit`.
    pub fn poll(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        while let Some(m) = self.consumer.poll(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50)),
        ) {
            match m {
                Ok(m) => self.records.push(ReadRecord::copy_of(&m)),
                Err(e) => eprintln!("tail: {e}"),
            }
            if Instant::now() >= until {
                break;
            }
        }
    }

    /// Reads until `condition` holds on everything read so far, or `deadline`.
    pub fn until(&mut self, deadline: Instant, mut condition: impl FnMut(&[ReadRecord]) -> bool) -> bool {
        loop {
            if condition(&self.records) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.poll(Duration::from_millis(100));
        }
    }

    /// The records read so far whose key is `key`.
    pub fn keyed<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a ReadRecord> + 'a {
        self.records
            .iter()
            .filter(move |r| r.key.as_deref() == Some(key.as_bytes()))
    }
}

/// The key of the end markers of [`read_to_markers`].
pub const END_MARKER: &[u8] = b"__switchboard_test_end__";

/// Every record of `topics`, read to an end marker this function writes to
/// each of their partitions first, so the end is known without ListOffsets
/// (tansu 0.6.0 answers a "latest" ListOffsets with the base offset of the
/// newest batch plus one, which is short of the end when that batch holds
/// several records). Only for topics no stage reads any more.
pub fn read_to_markers(config: &Config, topics: &[&str]) -> Vec<ReadRecord> {
    let producer = Producer::new(&config.bootstrap_servers);
    let probe: BaseConsumer = switchboard::kafka::reader_config(config)
        .create()
        .expect("a metadata client");
    let mut ends = BTreeSet::new();
    for topic in topics {
        let metadata = probe
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            producer.send(topic, Some(p.id()), Some(END_MARKER), Some(b"end"));
            ends.insert((topic.to_string(), p.id()));
        }
    }
    producer.flush();
    let mut tail = Tail::new(config, topics);
    let complete = tail.until(deadline(60), |records| {
        let seen: BTreeSet<(String, i32)> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(END_MARKER))
            .map(|r| (r.topic.clone(), r.partition))
            .collect();
        seen == ends
    });
    assert!(complete, "reading {topics:?} to their end markers");
    tail.records
        .into_iter()
        .filter(|r| r.key.as_deref() != Some(END_MARKER))
        .collect()
}

/// A client of `group`'s offsets, with the partitions of `topic`.
fn offsets_client(config: &Config, group: &str, topic: &str) -> (BaseConsumer, Vec<i32>) {
    let consumer: BaseConsumer = switchboard::kafka::consumer_config(config, group)
        .create()
        .expect("creating an offsets client");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let partitions = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    (consumer, partitions)
}

/// The offsets `group` has committed on `topic`, by partition (absent when
/// nothing is committed).
pub fn committed_offsets(config: &Config, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let (consumer, partitions) = offsets_client(config, group, topic);
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// How many records of `topic` lie past what `group` has committed: the
/// most a member killed now can have been handling, so the most whose
/// outputs its successor may write again.
pub fn uncommitted(config: &Config, group: &str, topic: &str) -> i64 {
    let committed = committed_offsets(config, group, topic);
    let (consumer, partitions) = offsets_client(config, group, topic);
    partitions
        .into_iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            high - committed.get(&p).copied().unwrap_or(low).max(low)
        })
        .sum()
}

/// The most lanes any of `cases` is routed to under `matrix`: how many
/// packets one action handled twice can write twice.
pub fn max_lanes(config: &Config, matrix: &Matrix, cases: &[Case]) -> usize {
    let decoder = Decoder::new(Arc::new(SchemaDir::bundled()), config.max_record_bytes);
    cases
        .iter()
        .filter_map(|c| c.payload.as_deref())
        .filter_map(|payload| decoder.decode(payload).ok())
        .map(|action| expected_routing(matrix, &Directory::default(), &action).len())
        .max()
        .unwrap_or(0)
}

/// One past the last offset of each partition in `records`.
pub fn end_offsets(records: &[ReadRecord]) -> BTreeMap<i32, i64> {
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for r in records {
        let e = ends.entry(r.partition).or_default();
        *e = (*e).max(r.offset + 1);
    }
    ends
}

/// Child processes (brokers, switchboard instances) that end with the
/// test or bench that started them, however it ends: `Drop` kills them
/// when it unwinds, but an abort (a librdkafka assertion, a double panic)
/// skips it and left brokers running behind a finished run.
pub trait DiesWithParent {
    fn dies_with_parent(&mut self) -> &mut Self;
}

impl DiesWithParent for Command {
    fn dies_with_parent(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only prctl runs, which is
        // async-signal-safe and touches no memory of the parent. The
        // signal comes when the spawning thread ends: each test (and the
        // bench) starts its processes from the thread that waits for them.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

// ------------------------------------------------- switchboard in-process ----

/// `switchboard::stage::run` on its own thread and runtime; stopped on drop.
pub struct StageThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<RouteSummary, String>>>,
}

impl StageThread {
    pub fn start(config: Config, metrics: Metrics) -> StageThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("route-stage".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let summary = runtime
                    .block_on(switchboard::stage::run(config, metrics, flag))
                    .map_err(|e| e.to_string())?;
                summary
                    .route
                    .ok_or_else(|| "the route stage did not run".to_string())
            })
            .expect("starting the stage thread");
        StageThread {
            stop,
            handle: Some(handle),
        }
    }

    /// Waits (without stopping it) until the stage returns, e.g. at
    /// `max_events`; fails the test after `limit`.
    pub fn wait(mut self, limit: Duration) -> RouteSummary {
        self.join(limit)
    }

    /// Sets the stop flag and waits for the stage to return.
    pub fn stop(mut self, limit: Duration) -> RouteSummary {
        self.stop.store(true, Ordering::Relaxed);
        self.join(limit)
    }

    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    fn join(&mut self, limit: Duration) -> RouteSummary {
        let handle = self.handle.take().expect("joined once");
        if !wait_until(Instant::now() + limit, || handle.is_finished()) {
            self.stop.store(true, Ordering::Relaxed);
            self.handle = Some(handle);
            panic!("the route stage did not finish within {limit:?}");
        }
        match handle.join() {
            Ok(Ok(summary)) => summary,
            Ok(Err(e)) => panic!("the route stage failed: {e}"),
            Err(_) => panic!("the route stage panicked"),
        }
    }
}

impl Drop for StageThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            // The stage checks its stop flag at least every poll (100 ms).
            if wait_until(deadline(30), || handle.is_finished()) {
                let _ = handle.join();
            }
        }
    }
}

/// Runs the stage until it returns at `config.max_events`.
pub fn run_stage(config: Config, metrics: Metrics, limit: Duration) -> RouteSummary {
    assert!(config.max_events.is_some(), "run_stage needs max_events");
    StageThread::start(config, metrics).wait(limit)
}

// ------------------------------------------------ switchboard processes ----

/// `switchboard` with none of the caller's SWITCHBOARD_* variables, so a
/// test configures it alone.
pub fn switchboard_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SWITCHBOARD_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

/// A spawned `switchboard` process: killed on drop (its log printed when
/// the test is failing), signalled with `kill(1)`.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Every thread's stack of a running process (gdb, when the machine has
/// it), so a process that does not exit says where it waits.
fn stacks(pid: u32) -> String {
    let out = Command::new("timeout")
        .args([
            "60",
            "gdb",
            "-batch",
            "-p",
            &pid.to_string(),
            "-ex",
            "thread apply all bt",
        ])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("Thread ") || l.starts_with('#'))
            .map(|l| l.chars().take(160).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n"),
        Ok(out) => format!("(gdb failed: {})", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("(no gdb: {e})"),
    }
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(dir.path().join(format!("{name}.out"))).expect("an output file");
        let err = std::fs::File::create(&log).expect("a log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .dies_with_parent()
            .spawn()
            .expect("spawning switchboard");
        Proc {
            child: Some(child),
            name: name.to_string(),
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (TERM, KILL, HUP…) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to exit; fails the test after `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let until = Instant::now() + limit;
        let mut status = None;
        wait_until(until, || {
            status = self.try_status();
            status.is_some()
        });
        let status = status.unwrap_or_else(|| {
            panic!(
                "{} did not exit within {limit:?}; where its threads are:\n{}\nlog:\n{}",
                self.name,
                stacks(self.pid()),
                tail(&self.log(), 40)
            )
        });
        self.child = None;
        status
    }

    /// Waits for a 0 exit.
    pub fn wait_success(&mut self, limit: Duration) {
        let status = self.wait(limit);
        assert!(
            status.success(),
            "{} exited with {status}; log:\n{}",
            self.name,
            tail(&self.log(), 60)
        );
    }

    /// What it wrote on stderr (its logs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What it wrote on stdout.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("out")).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} log (tail) ---\n{}", self.name, tail(&self.log(), 60));
        }
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ------------------------------------------------------------------ http ----

/// `GET path` on `addr`: status and body, or None when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The value of the sample `series` (name with labels, exactly as
/// rendered) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The metrics of a running process, or an empty text when it is not up.
pub fn scrape(addr: &str) -> String {
    match http_get(addr, "/metrics") {
        Some((200, body)) => body,
        _ => String::new(),
    }
}

// -------------------------------------------------------------- inputs ----

/// The sample actions of `deploy/samples`, by file name.
pub fn samples() -> Vec<(String, Value)> {
    let dir = manifest_dir().join("deploy/samples");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .expect("deploy/samples")
        .map(|e| e.expect("a sample").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("a readable sample");
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).expect("a JSON sample"))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 10, "the samples are there");
    out
}

/// A sample with another action_id.
pub fn with_id(sample: &Value, id: &str) -> Value {
    let mut v = sample.clone();
    v["action_id"] = Value::String(id.to_string());
    v
}

fn action_schema() -> apache_avro::Schema {
    let text = std::fs::read_to_string(manifest_dir().join("schemas/agent_action.avsc")).expect("the schema");
    apache_avro::Schema::parse_str(&text).expect("a valid schema")
}

/// The action as Confluent-framed Avro, schema id 1.
pub fn avro(action: &Value) -> Vec<u8> {
    frame(AGENT_ACTION_SCHEMA_ID, &avro_body(action))
}

/// The unframed Avro body of an action.
pub fn avro_body(action: &Value) -> Vec<u8> {
    encode_json_as_avro(&action_schema(), action).unwrap_or_else(|e| panic!("encoding {action} as Avro: {e}"))
}

/// One input record and what must become of it.
#[derive(Debug, Clone)]
pub struct Case {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Explicit partition, or by key.
    pub partition: Option<i32>,
    pub expect: Expect,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// A valid action with this id.
    Action(String),
    /// A dead letter with this reason.
    Dead(&'static str),
}

impl Case {
    pub fn json(id: &str, action: &Value) -> Case {
        Case {
            key: Some(id.as_bytes().to_vec()),
            payload: Some(action.to_string().into_bytes()),
            partition: None,
            expect: Expect::Action(id.to_string()),
        }
    }

    pub fn dead(key: &str, payload: Option<Vec<u8>>, reason: &'static str) -> Case {
        Case {
            key: Some(key.as_bytes().to_vec()),
            payload,
            partition: None,
            expect: Expect::Dead(reason),
        }
    }

    pub fn on(mut self, partition: i32) -> Case {
        self.partition = Some(partition);
        self
    }

    pub fn action_id(&self) -> Option<&str> {
        match &self.expect {
            Expect::Action(id) => Some(id),
            Expect::Dead(_) => None,
        }
    }
}

/// Sends every case to `topic` and waits until all are acknowledged.
pub fn send_cases(bootstrap: &str, topic: &str, cases: &[Case]) {
    let producer = Producer::new(bootstrap);
    for c in cases {
        producer.send(topic, c.partition, c.key.as_deref(), c.payload.as_deref());
    }
    producer.flush();
}

/// A batch of valid actions from the samples: `n` distinct ids
/// `{prefix}-{i}`, every third one as Avro, every eleventh without a key.
pub fn valid_cases(prefix: &str, n: usize) -> Vec<Case> {
    let samples = samples();
    (0..n)
        .map(|i| {
            let (name, sample) = &samples[i % samples.len()];
            let id = format!("{prefix}-{i:04}-{name}");
            let action = with_id(sample, &id);
            let mut case = Case::json(&id, &action);
            if i % 3 == 1 {
                case.payload = Some(avro(&action));
            }
            if i % 11 == 5 {
                case.key = None;
            }
            case
        })
        .collect()
}

/// Records that are not valid actions, one or more of every kind, with the
/// DLQ reason each must carry. `max_record_bytes` is the stage's limit.
pub fn invalid_cases(prefix: &str, max_record_bytes: usize) -> Vec<Case> {
    let samples = samples();
    let sample = |i: usize| with_id(&samples[i % samples.len()].1, &format!("{prefix}-bad-{i}"));
    let key = |i: usize| format!("{prefix}-bad-{i}");
    let mut out = Vec::new();
    // Not JSON.
    out.push(Case::dead(
        &key(0),
        Some(format!(r#"{{"action_id": "{}", "kind": "#, key(0)).into_bytes()),
        "bad_json",
    ));
    out.push(Case::dead(
        &key(1),
        Some(b"{not json at all}".to_vec()),
        "bad_json",
    ));
    out.push(Case::dead(
        &key(2),
        Some(format!(r#"{{"action_id": "{}",, }}"#, key(2)).into_bytes()),
        "bad_json",
    ));
    // Wrong magic byte: framing that starts with 1, and plain text.
    let mut wrong_magic = avro(&sample(3));
    wrong_magic[0] = 1;
    out.push(Case::dead(&key(3), Some(wrong_magic), "unknown_format"));
    out.push(Case::dead(
        &key(4),
        Some(b"hello, agent".to_vec()),
        "unknown_format",
    ));
    // Unknown schema id 99.
    out.push(Case::dead(
        &key(5),
        Some(frame(99, &avro_body(&sample(5)))),
        "unknown_schema",
    ));
    out.push(Case::dead(
        &key(6),
        Some(frame(99, &avro_body(&sample(6)))),
        "unknown_schema",
    ));
    // Missing kind, in JSON and with the amount of an action.
    for i in [7, 8] {
        let mut action = sample(i);
        action.as_object_mut().unwrap().remove("kind");
        out.push(Case::dead(
            &key(i),
            Some(action.to_string().into_bytes()),
            "invalid_field",
        ));
    }
    // An amount that is not a number.
    for i in [9, 10] {
        let mut action = sample(i);
        action["kind"] = "refund.issue".into();
        action["signals"] = serde_json::json!({"amount": "lots", "currency": "EUR"});
        out.push(Case::dead(
            &key(i),
            Some(action.to_string().into_bytes()),
            "invalid_field",
        ));
    }
    // Over the size limit, though otherwise a valid action.
    for i in [11, 12] {
        let mut action = sample(i);
        action["payload"] = "x".repeat(max_record_bytes + 10).into();
        out.push(Case::dead(
            &key(i),
            Some(action.to_string().into_bytes()),
            "too_large",
        ));
    }
    // Empty value, and no value at all.
    out.push(Case::dead(&key(13), Some(Vec::new()), "empty"));
    out.push(Case::dead(&key(14), None, "empty"));
    // A frame too short for a schema id, and a body that is not the schema's.
    out.push(Case::dead(&key(15), Some(vec![0, 0, 0]), "bad_framing"));
    out.push(Case::dead(
        &key(16),
        Some(frame(AGENT_ACTION_SCHEMA_ID, &[0x02, 0xff, 0xff])),
        "bad_avro",
    ));
    // A dead letter without a key keeps having none.
    let mut keyless = Case::dead(&key(17), Some(b"[1, 2, 3]".to_vec()), "unknown_format");
    keyless.key = None;
    out.push(keyless);
    out
}

/// Interleaves `b` into `a` evenly (deterministically).
pub fn interleave(a: Vec<Case>, b: Vec<Case>) -> Vec<Case> {
    let step = (a.len() / b.len().max(1)).max(1);
    let mut b = b.into_iter();
    let mut out = Vec::new();
    for (i, c) in a.into_iter().enumerate() {
        if i % step == step / 2
            && let Some(x) = b.next()
        {
            out.push(x);
        }
        out.push(c);
    }
    out.extend(b);
    out
}

// ------------------------------------------------------------- outputs ----

/// What the route stage must do with one action under `matrix`: the lanes
/// (names, matrix order) with their rules; empty when it is allowed.
pub fn expected_routing(
    matrix: &Matrix,
    directory: &Directory,
    action: &AgentAction,
) -> Vec<(String, Vec<String>)> {
    let enrichment = enrich(matrix, action, directory);
    let routing = route(matrix, action, &enrichment);
    routing
        .lanes
        .iter()
        .map(|hit| {
            (
                matrix.lanes[hit.lane].name.clone(),
                hit.rules.iter().map(|r| matrix.rules[*r].name.clone()).collect(),
            )
        })
        .collect()
}

pub fn header<'a>(r: &'a ReadRecord, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

pub fn packet(r: &ReadRecord) -> OwnedApprovalRequest {
    serde_json::from_slice(r.payload.as_deref().expect("a packet has a value"))
        .unwrap_or_else(|e| panic!("a packet on {}: {e}", r.topic))
}

pub fn json(r: &ReadRecord) -> Value {
    serde_json::from_slice(r.payload.as_deref().expect("a value")).expect("a JSON value")
}

/// Every output topic of the route stage for `matrix`, the pending
/// changelog included.
pub fn output_topics(config: &Config, matrix: &Matrix) -> Vec<String> {
    let mut topics: Vec<String> = matrix.lanes.iter().map(|l| l.topic.clone()).collect();
    topics.sort();
    topics.dedup();
    topics.push(config.topics.allowed.clone());
    topics.push(config.topics.dlq.clone());
    topics.push(config.topics.pending.clone());
    topics
}

/// The outputs of a route stage, by topic and by (topic, key).
pub struct Outputs {
    pub by_topic: BTreeMap<String, Vec<ReadRecord>>,
    by_key: HashMap<(String, Vec<u8>), Vec<usize>>,
}

impl Outputs {
    pub fn new(records: Vec<ReadRecord>) -> Outputs {
        let mut by_topic: BTreeMap<String, Vec<ReadRecord>> = BTreeMap::new();
        let mut by_key: HashMap<(String, Vec<u8>), Vec<usize>> = HashMap::new();
        for r in records {
            let list = by_topic.entry(r.topic.clone()).or_default();
            if let Some(key) = &r.key {
                by_key
                    .entry((r.topic.clone(), key.clone()))
                    .or_default()
                    .push(list.len());
            }
            list.push(r);
        }
        Outputs { by_topic, by_key }
    }

    pub fn read(config: &Config, matrix: &Matrix) -> Outputs {
        let topics = output_topics(config, matrix);
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        Outputs::new(read(config, &names))
    }

    /// [`Outputs::read`] with [`read_to_markers`], for tansu.
    pub fn read_to_markers(config: &Config, matrix: &Matrix) -> Outputs {
        let topics = output_topics(config, matrix);
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        Outputs::new(read_to_markers(config, &names))
    }

    pub fn topic(&self, topic: &str) -> &[ReadRecord] {
        self.by_topic.get(topic).map_or(&[], Vec::as_slice)
    }

    pub fn keyed(&self, topic: &str, key: &str) -> Vec<&ReadRecord> {
        self.by_key
            .get(&(topic.to_string(), key.as_bytes().to_vec()))
            .map(|hits| hits.iter().map(|i| &self.by_topic[topic][*i]).collect())
            .unwrap_or_default()
    }
}

/// How many packets [`check_outputs_with`] accepts per lane and action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packets {
    /// Exactly one.
    Once,
    /// One, or identical copies of it (every field but `routed_at`): what
    /// at-least-once delivery may leave when an instance dies after writing
    /// an action's packets and before writing its pending record, so that
    /// the instance taking over handles the action again. The approval is
    /// still opened once: one pending record.
    IdenticalCopies,
}

/// Checks the contract of the route stage for `inputs` (as read back from
/// the actions topic, so partitions and offsets are known) against
/// `outputs`: every valid action on exactly its lanes (one packet each) or
/// on `actions.allowed`, with one pending record; every invalid record
/// exactly once in the DLQ, unchanged, with its headers. `versions` maps a
/// matrix version to the matrix that may have routed an action (one entry
/// unless the matrix was reloaded). Returns the version each action was
/// routed by.
pub fn check_outputs(
    config: &Config,
    versions: &BTreeMap<String, Matrix>,
    directory: &Directory,
    cases: &[Case],
    inputs: &[ReadRecord],
    outputs: &Outputs,
) -> BTreeMap<String, String> {
    check_outputs_with(config, versions, directory, cases, inputs, outputs, Packets::Once).0
}

/// [`check_outputs`], accepting `packets_accepted`; also returns the number
/// of packet copies found.
pub fn check_outputs_with(
    config: &Config,
    versions: &BTreeMap<String, Matrix>,
    directory: &Directory,
    cases: &[Case],
    inputs: &[ReadRecord],
    outputs: &Outputs,
    packets_accepted: Packets,
) -> (BTreeMap<String, String>, usize) {
    let actions_topic = config.topics.actions.as_str();
    let any_matrix = versions.values().next().expect("a matrix");
    let lane_topics: BTreeMap<String, String> = any_matrix
        .lanes
        .iter()
        .map(|l| (l.topic.clone(), l.name.clone()))
        .collect();
    // Inputs to their cases, by (key, value).
    let by_bytes: HashMap<RecordBytes<'_>, &Case> = cases
        .iter()
        .map(|c| ((c.key.as_deref(), c.payload.as_deref()), c))
        .collect();
    // The decoder the stage has (its size limit is process-wide for Avro).
    let decoder = Decoder::new(Arc::new(SchemaDir::bundled()), config.max_record_bytes);
    let find_case = |r: &ReadRecord| -> &Case {
        by_bytes
            .get(&(r.key.as_deref(), r.payload.as_deref()))
            .copied()
            .or_else(|| {
                // Kafka may hand back an empty value as no value.
                cases.iter().find(|c| {
                    c.key.as_deref() == r.key.as_deref()
                        && normalise(c.payload.as_deref()) == normalise(r.payload.as_deref())
                })
            })
            .unwrap_or_else(|| panic!("input at {}/{} is one of the test's", r.partition, r.offset))
    };

    // Dead letters, by the source position in their headers.
    let mut dead: BTreeMap<(i32, i64), Vec<&ReadRecord>> = BTreeMap::new();
    for d in outputs.topic(&config.topics.dlq) {
        assert_eq!(
            header(d, "switchboard.source.topic"),
            Some(actions_topic),
            "source topic header"
        );
        let partition: i32 = header(d, "switchboard.source.partition")
            .and_then(|p| p.parse().ok())
            .expect("a source partition header");
        let offset: i64 = header(d, "switchboard.source.offset")
            .and_then(|p| p.parse().ok())
            .expect("a source offset header");
        dead.entry((partition, offset)).or_default().push(d);
    }

    let mut versions_used = BTreeMap::new();
    let mut expected_lane_records = 0usize;
    let mut expected_allowed = 0usize;
    let mut expected_pending = 0usize;
    let mut expected_dead = 0usize;
    let mut seen_ids = BTreeSet::new();
    let mut copies = 0;
    for input in inputs {
        let case = find_case(input);
        let at = format!("input {}/{}", input.partition, input.offset);
        match &case.expect {
            Expect::Dead(reason) => {
                expected_dead += 1;
                let letters = dead
                    .get(&(input.partition, input.offset))
                    .cloned()
                    .unwrap_or_default();
                assert_eq!(letters.len(), 1, "{at} ({reason}) is dead-lettered exactly once");
                let d = letters[0];
                assert_eq!(d.key, input.key, "{at}: the dead letter keeps the key");
                assert_eq!(
                    normalise(d.payload.as_deref()),
                    normalise(input.payload.as_deref()),
                    "{at}: the dead letter keeps the bytes"
                );
                assert_eq!(
                    d.payload, input.payload,
                    "{at}: the dead letter keeps the bytes exactly"
                );
                assert_eq!(
                    header(d, "switchboard.reason"),
                    Some(*reason),
                    "{at}: reason header"
                );
                assert!(
                    header(d, "switchboard.error").is_some_and(|e| !e.is_empty()),
                    "{at}: an error header"
                );
                let dead_at = header(d, "switchboard.dead_at").expect("a dead_at header");
                DateTime::parse_from_rfc3339(dead_at).expect("dead_at is RFC 3339");
            }
            Expect::Action(id) => {
                assert!(
                    !dead.contains_key(&(input.partition, input.offset)),
                    "{at} ({id}) is valid and not dead-lettered"
                );
                if !seen_ids.insert(id.clone()) {
                    // A redelivery: checked once, with the first.
                    continue;
                }
                let pending = outputs.keyed(&config.topics.pending, id);
                assert_eq!(pending.len(), 1, "{id}: one pending record");
                let pending = json(pending[0]);
                let version = pending["matrix_version"]
                    .as_str()
                    .expect("a pending version")
                    .to_string();
                let matrix = versions
                    .get(&version)
                    .unwrap_or_else(|| panic!("{id}: routed by version {version}, one of the test's"));
                let payload = input.payload.as_deref().expect("a valid action has a value");
                let action = decoder
                    .decode(payload)
                    .unwrap_or_else(|e| panic!("{id} is a valid test action: {e}"));
                let routing = expected_routing(matrix, directory, &action);
                let lanes: Vec<&str> = routing.iter().map(|(l, _)| l.as_str()).collect();
                expected_pending += 1;
                let pending_lanes: Vec<&str> = pending["lanes"]
                    .as_array()
                    .expect("pending lanes")
                    .iter()
                    .map(|l| l["lane"].as_str().expect("a lane name"))
                    .collect();
                assert_eq!(pending_lanes, lanes, "{id}: pending lanes");
                assert_eq!(
                    pending["status"],
                    if lanes.is_empty() { "allowed" } else { "open" },
                    "{id}: pending status"
                );
                // The pending record carries each level-0 packet exactly as
                // its lane received it, in lane order, and an allowed
                // action's record none. (A crash between a batch's outputs
                // and its changelog records can leave an earlier copy on the
                // topic too: the one carried is among them.)
                let topics: Vec<&str> = lanes
                    .iter()
                    .map(|lane| {
                        lane_topics
                            .iter()
                            .find(|(_, l)| l.as_str() == *lane)
                            .map(|(topic, _)| topic.as_str())
                            .expect("a routed lane has a topic")
                    })
                    .collect();
                let carried = pending["packets"].as_array().cloned().unwrap_or_default();
                assert_eq!(
                    carried.len(),
                    topics.len(),
                    "{id}: one packet carried per review lane"
                );
                for (packet, topic) in carried.iter().zip(&topics) {
                    assert!(
                        outputs.keyed(topic, id).iter().any(|copy| json(copy) == *packet),
                        "{id}: the pending record carries a packet {topic} received"
                    );
                }
                for (topic, lane) in &lane_topics {
                    let packets = outputs.keyed(topic, id);
                    let rules = routing.iter().find(|(l, _)| l == lane).map(|(_, r)| r);
                    match rules {
                        None => assert!(packets.is_empty(), "{id}: nothing on {topic}"),
                        Some(rules) => {
                            expected_lane_records += packets.len();
                            copies += check_copies(&packets, packets_accepted, id, topic);
                            let p = packet(packets[0]);
                            assert_eq!(p.action_id, id.as_str(), "{id}: packet action_id");
                            assert!(p.review, "{id}: a lane packet asks for review");
                            assert_eq!(p.lane.as_deref(), Some(lane.as_str()), "{id}: packet lane");
                            assert_eq!(p.matrix_version, version.as_str(), "{id}: one version per action");
                            assert_eq!(p.review_lanes, lanes, "{id}: review lanes");
                            assert_eq!(&p.rules, rules, "{id}: rules of {lane}");
                            assert_eq!(p.escalation_level, Some(0));
                            let l = &matrix.lanes[matrix.lane(lane).unwrap()];
                            assert_eq!(p.assignee.as_deref(), Some(l.owner.as_str()), "{id}: assignee");
                            assert_eq!(
                                p.sla_due,
                                Some(switchboard::packet::sla_due(&action, l.sla)),
                                "{id}: sla_due by the version's SLA"
                            );
                            assert_eq!(
                                p.decide.as_ref().map(|d| d.topic.as_ref()),
                                Some(config.topics.decisions.as_str())
                            );
                        }
                    }
                }
                let allowed = outputs.keyed(&config.topics.allowed, id);
                if lanes.is_empty() {
                    expected_allowed += allowed.len();
                    copies += check_copies(&allowed, packets_accepted, id, &config.topics.allowed);
                    let p = packet(allowed[0]);
                    assert!(!p.review, "{id}: allowed packets need no review");
                    assert_eq!(p.lane, None);
                    assert!(p.review_lanes.is_empty());
                    assert_eq!(p.matrix_version, version.as_str());
                } else {
                    assert!(allowed.is_empty(), "{id}: not allowed");
                }
                versions_used.insert(id.clone(), version);
            }
        }
    }
    // Nothing else was written.
    let lane_records: usize = lane_topics.keys().map(|t| outputs.topic(t).len()).sum();
    assert_eq!(lane_records, expected_lane_records, "no other lane packets");
    assert_eq!(
        outputs.topic(&config.topics.allowed).len(),
        expected_allowed,
        "no other allowed records"
    );
    assert_eq!(
        outputs.topic(&config.topics.dlq).len(),
        expected_dead,
        "no other dead letters"
    );
    assert_eq!(
        outputs.topic(&config.topics.pending).len(),
        expected_pending,
        "no other pending records"
    );
    (versions_used, copies)
}

/// Checks the packets of one action on one topic against `accepted`;
/// returns how many are copies of the first.
fn check_copies(packets: &[&ReadRecord], accepted: Packets, id: &str, topic: &str) -> usize {
    match accepted {
        Packets::Once => assert_eq!(packets.len(), 1, "{id}: exactly one packet on {topic}"),
        Packets::IdenticalCopies => assert!(!packets.is_empty(), "{id}: a packet on {topic}"),
    }
    let without_time = |r: &ReadRecord| {
        let mut v = json(r);
        v.as_object_mut().expect("a packet object").remove("routed_at");
        v
    };
    let first = without_time(packets[0]);
    for copy in &packets[1..] {
        assert_eq!(
            without_time(copy),
            first,
            "{id}: a second packet on {topic} is a copy"
        );
    }
    packets.len() - 1
}

/// A record's key and value.
type RecordBytes<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// A value with "empty" and "none" taken as the same.
fn normalise(p: Option<&[u8]>) -> Option<&[u8]> {
    p.filter(|p| !p.is_empty())
}

/// Every case sent is on the actions topic, and each went where the one
/// matrix says (no directory), read back read_committed.
pub fn check_sent(config: &Config, matrix: &Matrix, sent: &[Case]) {
    let inputs = read(config, &[&config.topics.actions]);
    assert_eq!(inputs.len(), sent.len());
    check_outputs(
        config,
        &one_version(matrix.clone()),
        &Directory::default(),
        sent,
        &inputs,
        &Outputs::read(config, matrix),
    );
}

/// Waits until every one of `n` distinct actions has a pending record.
pub fn wait_routed(config: &Config, n: usize, deadline: Instant) {
    let mut tail = Tail::new(config, &[&config.topics.pending]);
    assert!(
        tail.until(deadline, |r| routed_ids(r) >= n),
        "every action routed in the end"
    );
}

/// The only version a matrix routes with, as `check_outputs` wants it.
pub fn one_version(matrix: Matrix) -> BTreeMap<String, Matrix> {
    BTreeMap::from([(matrix.version.clone(), matrix)])
}

// ------------------------------------------------------ steady streams ----

/// A producer thread sending valid actions round-robin over the three
/// partitions, `per_burst` every 25 ms, until stopped; returns what it sent.
pub struct Stream {
    running: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<Vec<Case>>>,
}

impl Stream {
    pub fn start(config: &Config, prefix: &str, per_burst: usize) -> Stream {
        let running = Arc::new(AtomicBool::new(true));
        let sent = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (running.clone(), sent.clone());
        let bootstrap = config.bootstrap_servers.clone();
        let topic = config.topics.actions.clone();
        let prefix = prefix.to_string();
        let handle = std::thread::spawn(move || {
            let producer = Producer::new(&bootstrap);
            let mut cases = Vec::new();
            let mut burst = 0;
            while flag.load(Ordering::Relaxed) {
                for (i, case) in valid_cases(&format!("{prefix}-{burst}"), per_burst)
                    .into_iter()
                    .enumerate()
                {
                    let case = case.on(i as i32 % 3);
                    producer.send(
                        &topic,
                        case.partition,
                        case.key.as_deref(),
                        case.payload.as_deref(),
                    );
                    cases.push(case);
                }
                producer.flush();
                count.store(cases.len(), Ordering::Relaxed);
                burst += 1;
                // A steady rate, not a wait for anything.
                std::thread::sleep(Duration::from_millis(25));
            }
            cases
        });
        Stream {
            running,
            sent,
            handle: Some(handle),
        }
    }

    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> Vec<Case> {
        self.running.store(false, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("the producer thread")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The number of distinct actions with a pending record so far.
pub fn routed_ids(records: &[switchboard::changelog::ReadRecord]) -> usize {
    records
        .iter()
        .filter_map(|r| r.key.as_deref())
        .collect::<std::collections::HashSet<_>>()
        .len()
}
