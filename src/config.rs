//! The one configuration struct of a running switchboard, built from the
//! command line and `SWITCHBOARD_*` environment variables (see `cli`).
//!
//! Defaults are written next to their fields with where they come from, so
//! an operator reading `--help` and this file sees the same story.

use std::path::PathBuf;
use std::time::Duration;

use crate::properties::KafkaProperties;
use crate::topics::Topics;

/// Which stages a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Route,
    Escalate,
    All,
}

/// The delivery guarantee between input offsets and output records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Guarantee {
    /// Kafka transactions: outputs and input offsets commit atomically.
    ExactlyOnce,
    /// Offsets are committed only after every output is acknowledged.
    AtLeastOnce,
}

/// A week: longer than any agent's retry window, short enough that the
/// changelog does not grow without bound.
pub const DEFAULT_CLOSED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// librdkafka's default `message.max.bytes`: the largest record its
/// producer sends unless the operator raises it with `--kafka`.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

#[derive(Debug, Clone)]
pub struct Config {
    pub bootstrap_servers: String,
    pub matrix_path: PathBuf,
    pub stage: Stage,
    pub guarantee: Guarantee,
    /// Consumer group shared by every instance of a stage; instances scale
    /// out by joining it.
    pub group_id: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; loopback by
    /// default so metrics are not exposed by accident.
    pub metrics_addr: Option<String>,
    /// Exit 0 after this many input records are handled and committed.
    pub max_events: Option<u64>,
    /// librdkafka properties passed through unchanged (TLS, SASL, timeouts),
    /// applied after switchboard's own so they win. References to secrets
    /// are already resolved; `Debug` prints secret values as `***`.
    pub kafka: KafkaProperties,
    pub topics: Topics,
    /// Partitions for topics switchboard creates.
    pub partitions: i32,
    pub replication_factor: i32,
    /// Records above this size go to the DLQ without being parsed.
    pub max_record_bytes: usize,
    /// Records handled per transaction or per commit at most.
    pub batch_size: usize,
    /// How long a batch waits for more records once it has one.
    pub batch_wait: Duration,
    /// Avro schemas by id; the bundled `schemas/` when absent.
    pub schemas_dir: Option<PathBuf>,
    /// How long a closed action's record stays in `switchboard.pending`
    /// before it is tombstoned. Within it a redelivered action is
    /// recognised and not routed again; after it the changelog (and every
    /// instance's memory of the action) is compacted away.
    pub closed_retention: Duration,
}

impl Config {
    /// The largest record switchboard's producers may write:
    /// `message.max.bytes` as passed through with `--kafka`, or librdkafka's
    /// default. A larger output would be refused by the producer on every
    /// retry and stop the stage, so outputs are kept under it.
    pub fn max_message_bytes(&self) -> usize {
        self.kafka
            .iter()
            .rev()
            .find(|(k, _)| k == "message.max.bytes")
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
    }

    /// A configuration with every default, for tests, the demo and benches.
    pub fn new(bootstrap_servers: impl Into<String>, matrix_path: impl Into<PathBuf>) -> Self {
        Config {
            bootstrap_servers: bootstrap_servers.into(),
            matrix_path: matrix_path.into(),
            stage: Stage::All,
            guarantee: Guarantee::ExactlyOnce,
            group_id: "switchboard".into(),
            metrics_addr: None,
            max_events: None,
            kafka: KafkaProperties::default(),
            topics: Topics::default(),
            partitions: 3,
            replication_factor: 1,
            max_record_bytes: crate::decode::DEFAULT_MAX_RECORD_BYTES,
            batch_size: 1000,
            // None: a batch takes what the consumer holds and closes. On
            // the mock cluster at half load the route stage's p99 was
            // 2.6 to 3.1 ms lower than with 2 ms (three alternating
            // pairs), bulk throughput and latency on tansu the same.
            batch_wait: Duration::ZERO,
            schemas_dir: None,
            closed_retention: DEFAULT_CLOSED_RETENTION,
        }
    }

    /// A configuration for tools that only talk to Kafka (`inbox`,
    /// `decide`): no matrix, no stages.
    pub fn client(bootstrap_servers: impl Into<String>, kafka: KafkaProperties) -> Self {
        let mut config = Config::new(bootstrap_servers, PathBuf::new());
        config.kafka = kafka;
        config
    }
}
