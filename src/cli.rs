//! The command line of DESIGN.md. Each subcommand parses its flags here and
//! hands plain values to the library; exit codes are part of the contract.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};

use crate::config::{Config, Guarantee, Stage};
use crate::decision::Verdict;
use crate::decode::Decoder;
use crate::enrich::{Directory, Record, enrich};
use crate::explain::explain;
use crate::matrix::Matrix;
use crate::metrics::Metrics;
use crate::properties::{KafkaProperties, PropertiesError, Property};
use crate::topics::Topics;

#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Routes AI-agent actions to the human approver who owns the risk"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the stages against a Kafka cluster.
    Run(Box<RunArgs>),
    /// Route bundled sample actions through an in-process Kafka cluster and
    /// show where each went and why.
    Demo,
    /// Show where one action would go and why, without Kafka.
    ///
    /// Exit status: 0 routed, 1 invalid event, 2 invalid matrix.
    Explain {
        /// The matrix file.
        #[arg(long, env = "SWITCHBOARD_MATRIX")]
        matrix: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text, env = "SWITCHBOARD_FORMAT")]
        format: Format,
        /// Directory records to enrich with, as JSON: {"table": {"key": {"field": "value"}}}.
        #[arg(long, env = "SWITCHBOARD_DIRECTORY")]
        directory: Option<PathBuf>,
        /// A JSON AgentAction file, or `-` for standard input.
        event: PathBuf,
    },
    /// Validate a matrix and run the test cases written in it.
    ///
    /// Exit status: 0 all cases pass, 1 a case fails, 2 invalid matrix.
    Check {
        /// The matrix file.
        file: PathBuf,
    },
    /// Show the approvals waiting at a lane: the newest step of each, with
    /// what is missing, who is asked, when it is due and how to answer.
    ///
    /// A plain reader: no consumer group, nothing committed.
    /// Exit status: 0 shown, 1 Kafka failed, 2 invalid configuration.
    Inbox(Box<InboxArgs>),
    /// Answer an approval: write a Decision to approvals.decisions and wait
    /// for the broker's acknowledgement.
    ///
    /// Exit status: 0 written, 1 not written, 2 invalid configuration.
    Decide(Box<DecideArgs>),
}

/// How switchboard reaches Kafka; the same for `run`, `inbox` and `decide`.
#[derive(Debug, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, HOST:PORT[,HOST:PORT…].
    #[arg(long, env = "SWITCHBOARD_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    /// A librdkafka property passed through (TLS, SASL, timeouts); repeatable;
    /// overrides --kafka-config. Values may hold ${env:NAME} and ${file:/path}.
    /// From the environment: comma-separated KEY=VALUE pairs (never shown in --help).
    #[arg(
        long = "kafka",
        value_name = "KEY=VALUE",
        env = "SWITCHBOARD_KAFKA",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub kafka: Vec<Property>,
    /// A properties file of librdkafka properties (key=value lines, # comments),
    /// applied before --kafka. Values may hold ${env:NAME} and ${file:/path}.
    #[arg(long, value_name = "FILE", env = "SWITCHBOARD_KAFKA_CONFIG")]
    pub kafka_config: Option<PathBuf>,
}

impl KafkaArgs {
    /// The pass-through properties: the file's, then the flags', with every
    /// secret reference resolved.
    pub fn properties(&self) -> Result<KafkaProperties, PropertiesError> {
        crate::properties::load(self.kafka_config.as_deref(), &self.kafka)
    }
}

#[derive(Debug, clap::Args)]
pub struct InboxArgs {
    /// The lane whose approvals to show.
    pub lane: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The matrix, to find the lane's topic (default: approvals.<LANE>).
    #[arg(long, env = "SWITCHBOARD_MATRIX")]
    pub matrix: Option<PathBuf>,
    /// The lane's topic, overriding the matrix.
    #[arg(long, env = "SWITCHBOARD_TOPIC")]
    pub topic: Option<String>,
    /// Show the whole history of the lane's topic: also the approvals that
    /// closed, were decided or escalated elsewhere, marked as such. Without
    /// it, only what still waits.
    #[arg(long)]
    pub from_beginning: bool,
    /// Keep running and print new packets (and the closing of those shown)
    /// as they arrive.
    #[arg(long)]
    pub follow: bool,
    /// Output format: text for people, json for one packet per line.
    #[arg(long, value_enum, default_value_t = Format::Text, env = "SWITCHBOARD_FORMAT")]
    pub format: Format,
    #[arg(long, default_value = crate::topics::OUTCOMES, env = "SWITCHBOARD_OUTCOMES_TOPIC")]
    pub outcomes_topic: String,
    #[arg(long, default_value = crate::topics::PENDING, env = "SWITCHBOARD_PENDING_TOPIC")]
    pub pending_topic: String,
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("verdict").required(true).args(["approve", "reject", "needs_context"])))]
pub struct DecideArgs {
    /// The action to answer.
    pub action_id: String,
    /// The lane deciding (the packet's `lane`).
    #[arg(long, env = "SWITCHBOARD_LANE")]
    pub lane: String,
    /// Approve the action on this lane.
    #[arg(long)]
    pub approve: bool,
    /// Reject it; closes the approval as rejected.
    #[arg(long)]
    pub reject: bool,
    /// Ask the agent for more context; closes the approval as needs_context.
    #[arg(long)]
    pub needs_context: bool,
    /// Who decides: a name on the roster of the lane's current step.
    #[arg(long, env = "SWITCHBOARD_BY")]
    pub by: String,
    /// Why, for the agent and the record.
    #[arg(long)]
    pub comment: Option<String>,
    #[arg(long, default_value = crate::topics::DECISIONS, env = "SWITCHBOARD_DECISIONS_TOPIC")]
    pub decisions_topic: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

impl DecideArgs {
    fn verdict(&self) -> Verdict {
        if self.approve {
            Verdict::Approve
        } else if self.reject {
            Verdict::Reject
        } else {
            Verdict::NeedsContext
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The matrix file; watched and reloaded on change or SIGHUP.
    #[arg(long, env = "SWITCHBOARD_MATRIX")]
    pub matrix: PathBuf,
    /// Which stages this process runs.
    #[arg(long, value_enum, default_value_t = Stage::All, env = "SWITCHBOARD_STAGE")]
    pub stage: Stage,
    /// Delivery guarantee between input offsets and outputs.
    #[arg(long, value_enum, default_value_t = Guarantee::ExactlyOnce, env = "SWITCHBOARD_GUARANTEE")]
    pub guarantee: Guarantee,
    /// Consumer group; instances of a stage scale out by sharing it.
    #[arg(long, default_value = "switchboard", env = "SWITCHBOARD_GROUP_ID")]
    pub group_id: String,
    /// Address of /metrics, /healthz and /readyz (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:9464", env = "SWITCHBOARD_METRICS_ADDR")]
    pub metrics_addr: String,
    /// Exit 0 once this many input records are handled and committed.
    #[arg(long, env = "SWITCHBOARD_MAX_EVENTS")]
    pub max_events: Option<u64>,
    /// Partitions of the topics switchboard creates.
    #[arg(long, default_value_t = 3, env = "SWITCHBOARD_PARTITIONS")]
    pub partitions: i32,
    /// Replication factor of the topics switchboard creates.
    #[arg(long, default_value_t = 1, env = "SWITCHBOARD_REPLICATION_FACTOR")]
    pub replication_factor: i32,
    /// Records larger than this go to the DLQ unparsed.
    #[arg(long, default_value_t = crate::decode::DEFAULT_MAX_RECORD_BYTES, env = "SWITCHBOARD_MAX_RECORD_BYTES")]
    pub max_record_bytes: usize,
    /// Records per transaction (or per commit) at most.
    #[arg(long, default_value_t = 1000, env = "SWITCHBOARD_BATCH_SIZE")]
    pub batch_size: usize,
    /// Milliseconds a batch waits for more records once it has one (0:
    /// it takes what the consumer already holds and closes).
    #[arg(long, default_value_t = 0, env = "SWITCHBOARD_BATCH_WAIT_MS")]
    pub batch_wait_ms: u64,
    /// How long a closed action is remembered (and a redelivery of it
    /// refused) before its pending record is tombstoned: 7d, 36h, 90m…
    #[arg(long, default_value = "7d", env = "SWITCHBOARD_CLOSED_RETENTION", value_parser = parse_retention)]
    pub closed_retention: std::time::Duration,
    /// A folder with ids.json and Avro schemas (default: the bundled ones).
    #[arg(long, env = "SWITCHBOARD_SCHEMAS")]
    pub schemas: Option<PathBuf>,
    #[arg(long, default_value = crate::topics::ACTIONS, env = "SWITCHBOARD_ACTIONS_TOPIC")]
    pub actions_topic: String,
    #[arg(long, default_value = crate::topics::ALLOWED, env = "SWITCHBOARD_ALLOWED_TOPIC")]
    pub allowed_topic: String,
    #[arg(long, default_value = crate::topics::DECISIONS, env = "SWITCHBOARD_DECISIONS_TOPIC")]
    pub decisions_topic: String,
    #[arg(long, default_value = crate::topics::OUTCOMES, env = "SWITCHBOARD_OUTCOMES_TOPIC")]
    pub outcomes_topic: String,
    #[arg(long, default_value = crate::topics::PENDING, env = "SWITCHBOARD_PENDING_TOPIC")]
    pub pending_topic: String,
    #[arg(long, default_value = crate::topics::DLQ, env = "SWITCHBOARD_DLQ_TOPIC")]
    pub dlq_topic: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SWITCHBOARD_LOG_FORMAT")]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The configuration of `run`; fails when a pass-through property or
    /// its secret cannot be read.
    pub fn into_config(self) -> Result<Config, PropertiesError> {
        let kafka = self.kafka.properties()?;
        let mut c = Config::new(self.kafka.bootstrap_servers, self.matrix);
        c.stage = self.stage;
        c.guarantee = self.guarantee;
        c.group_id = self.group_id;
        c.metrics_addr = Some(self.metrics_addr).filter(|a| !a.is_empty());
        c.max_events = self.max_events;
        c.kafka = kafka;
        c.partitions = self.partitions;
        c.replication_factor = self.replication_factor;
        c.max_record_bytes = self.max_record_bytes;
        c.batch_size = self.batch_size.max(1);
        c.batch_wait = std::time::Duration::from_millis(self.batch_wait_ms);
        c.schemas_dir = self.schemas;
        c.closed_retention = self.closed_retention;
        c.topics = Topics {
            actions: self.actions_topic,
            allowed: self.allowed_topic,
            decisions: self.decisions_topic,
            outcomes: self.outcomes_topic,
            pending: self.pending_topic,
            dlq: self.dlq_topic,
        };
        Ok(c)
    }
}

fn parse_retention(s: &str) -> Result<std::time::Duration, String> {
    crate::matrix::parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration like 7d, 36h or 90m"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Exit statuses shared by `explain` and `check`.
const EXIT_INVALID_EVENT: u8 = 1;
const EXIT_INVALID_MATRIX: u8 = 2;
/// `run`, `inbox`, `decide`: the configuration (properties, secrets, matrix) is unusable.
const EXIT_INVALID_CONFIG: u8 = 2;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run_cmd(*args),
        Command::Demo => crate::demo::main(),
        Command::Explain {
            matrix,
            format,
            directory,
            event,
        } => explain_cmd(&matrix, format, directory.as_deref(), &event),
        Command::Check { file } => check_cmd(&file),
        Command::Inbox(args) => inbox_cmd(*args),
        Command::Decide(args) => decide_cmd(*args),
    }
}

fn run_cmd(args: RunArgs) -> ExitCode {
    init_logging(args.log_format);
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "invalid Kafka configuration");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    if config.stage == Stage::Route && crate::alloc::keep_freed_memory() {
        tracing::info!(
            "freed memory is kept for reuse (the route stage alone; MIMALLOC_PURGE_DELAY overrides)"
        );
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    match runtime.block_on(crate::stage::run(config, Metrics::new(), stop)) {
        Ok(summary) => {
            tracing::info!(?summary, "exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "switchboard stopped");
            ExitCode::FAILURE
        }
    }
}

/// Structured logs on stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Only warnings and errors, for commands whose output is for people.
pub fn init_logging_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The runtime of every command that talks to Kafka: the stages run on
/// their own threads, so two workers serve the HTTP endpoint and signals.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// The pass-through Kafka properties of a lane tool, or its exit status.
fn lane_kafka(args: &KafkaArgs) -> Result<KafkaProperties, ExitCode> {
    args.properties().map_err(|e| {
        eprintln!("invalid Kafka configuration: {e}");
        ExitCode::from(EXIT_INVALID_CONFIG)
    })
}

fn inbox_cmd(args: InboxArgs) -> ExitCode {
    init_logging_quiet();
    let kafka = match lane_kafka(&args.kafka) {
        Ok(k) => k,
        Err(code) => return code,
    };
    let topic = match args.topic {
        Some(topic) => topic,
        None => {
            let matrix = match args.matrix.as_deref().map(Matrix::load).transpose() {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("invalid matrix: {e}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            match crate::inbox::lane_topic(&args.lane, matrix.as_ref()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            }
        }
    };
    let config = Config::client(args.kafka.bootstrap_servers, kafka);
    let options = crate::inbox::Options {
        topic,
        outcomes_topic: args.outcomes_topic,
        pending_topic: args.pending_topic,
        all: args.from_beginning,
        follow: args.follow,
        output: match args.format {
            Format::Text => crate::inbox::Output::Text,
            Format::Json => crate::inbox::Output::Json,
        },
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut out = std::io::stdout().lock();
    match crate::inbox::run(&config, &options, &mut out, &crate::clock::SystemClock, &stop) {
        Ok(_) => ExitCode::SUCCESS,
        // `switchboard inbox finance | head`: the reader left; nothing is wrong.
        Err(crate::inbox::InboxError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard inbox: {e}");
            ExitCode::FAILURE
        }
    }
}

fn decide_cmd(args: DecideArgs) -> ExitCode {
    init_logging_quiet();
    let kafka = match lane_kafka(&args.kafka) {
        Ok(k) => k,
        Err(code) => return code,
    };
    let decision = match crate::decide::decision(
        &args.action_id,
        &args.lane,
        args.verdict(),
        &args.by,
        args.comment.as_deref(),
        chrono::Utc::now(),
    ) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("switchboard decide: {e}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let config = Config::client(args.kafka.bootstrap_servers, kafka);
    match crate::decide::send(&config, &args.decisions_topic, &decision) {
        Ok(at) => {
            println!(
                "{} {} on lane {} by {}: written to {} (partition {}, offset {})",
                decision.verdict.as_str(),
                decision.action_id,
                decision.lane,
                decision.approver,
                at.topic,
                at.partition,
                at.offset,
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard decide: {e}");
            ExitCode::FAILURE
        }
    }
}

fn explain_cmd(matrix_path: &Path, format: Format, directory: Option<&Path>, event: &Path) -> ExitCode {
    let matrix = match Matrix::load(matrix_path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("invalid matrix: {e}");
            return ExitCode::from(EXIT_INVALID_MATRIX);
        }
    };
    let directory = match directory.map(read_directory).transpose() {
        Ok(d) => d.unwrap_or_default(),
        Err(e) => {
            eprintln!("invalid directory file: {e}");
            return ExitCode::from(EXIT_INVALID_EVENT);
        }
    };
    let bytes = match read_input(event) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot read event {}: {e}", event.display());
            return ExitCode::from(EXIT_INVALID_EVENT);
        }
    };
    let action = match Decoder::bundled().decode(&bytes) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("invalid event: {e}");
            return ExitCode::from(EXIT_INVALID_EVENT);
        }
    };
    let enrichment = enrich(&matrix, &action, &directory);
    let report = explain(&matrix, &action, &enrichment);
    match format {
        Format::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("cannot render the report: {e}");
                return ExitCode::FAILURE;
            }
        },
        Format::Text => print!("{}", report.to_text(&matrix)),
    }
    ExitCode::SUCCESS
}

fn check_cmd(file: &Path) -> ExitCode {
    let matrix = match Matrix::load(file) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("invalid matrix: {e}");
            return ExitCode::from(EXIT_INVALID_MATRIX);
        }
    };
    let report = matrix.run_tests();
    for failure in &report.failures {
        eprintln!(
            "{}:{}:{}: test {:?} failed: {}",
            matrix.source, failure.pos.line, failure.pos.col, failure.name, failure.problem
        );
    }
    println!(
        "{}: {} lanes, {} rules; {} test cases passed, {} failed; version {}",
        matrix.source,
        matrix.lanes.len(),
        matrix.rules.len(),
        report.passed,
        report.failures.len(),
        matrix.version
    );
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID_EVENT)
    }
}

fn read_input(path: &Path) -> std::io::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(path)
    }
}

fn read_directory(path: &Path) -> Result<Directory, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tables: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Record>> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let directory = Directory::default();
    for (table, records) in tables {
        for (key, record) in records {
            directory.upsert(&table, &key, record);
        }
    }
    Ok(directory)
}
