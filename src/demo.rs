//! `switchboard demo`: the whole route stage on an in-process Kafka cluster
//! (librdkafka's mock cluster, real protocol, transactions included), fed
//! with bundled sample actions, then a table of where each one went and why.
//! It needs nothing but the binary.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::changelog::read_all;
use crate::config::{Config, Stage};
use crate::decode::{AGENT_ACTION_SCHEMA_ID, encode_json_as_avro, frame};
use crate::metrics::Metrics;
use crate::packet::OwnedApprovalRequest;

/// The default matrix and the sample actions, compiled in.
const MATRIX: &str = include_str!("../deploy/matrix.yaml");
const SAMPLES: &[(&str, &str)] = &[
    (
        "customer-data-export",
        include_str!("../deploy/samples/customer-data-export.json"),
    ),
    (
        "refund-over-threshold",
        include_str!("../deploy/samples/refund-over-threshold.json"),
    ),
    (
        "small-refund",
        include_str!("../deploy/samples/small-refund.json"),
    ),
    (
        "production-config-change",
        include_str!("../deploy/samples/production-config-change.json"),
    ),
    (
        "external-apology",
        include_str!("../deploy/samples/external-apology.json"),
    ),
    (
        "permission-grant",
        include_str!("../deploy/samples/permission-grant.json"),
    ),
    (
        "deadline-extension",
        include_str!("../deploy/samples/deadline-extension.json"),
    ),
    (
        "low-confidence-draft",
        include_str!("../deploy/samples/low-confidence-draft.json"),
    ),
    (
        "routine-search",
        include_str!("../deploy/samples/routine-search.json"),
    ),
    (
        "production-export-to-partner",
        include_str!("../deploy/samples/production-export-to-partner.json"),
    ),
];

pub fn main() -> ExitCode {
    crate::cli::init_logging_quiet();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<(), String> {
    let started = Instant::now();
    let cluster = MockCluster::new(1).map_err(|e| format!("starting the mock cluster: {e}"))?;
    let bootstrap = cluster.bootstrap_servers();
    let dir = std::env::temp_dir().join(format!("switchboard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let matrix_path = dir.join("matrix.yaml");
    std::fs::write(&matrix_path, MATRIX).map_err(|e| format!("{}: {e}", matrix_path.display()))?;

    println!("switchboard demo: an in-process Kafka cluster at {bootstrap}, the default matrix,");
    println!(
        "and {} sample actions (JSON and Avro), two broken records and one redelivery.\n",
        SAMPLES.len()
    );

    let mut config = Config::new(bootstrap.clone(), &matrix_path);
    config.stage = Stage::Route;
    config.partitions = 3;
    let matrix = crate::matrix::Matrix::parse(MATRIX, "deploy/matrix.yaml").map_err(|e| e.to_string())?;
    // The mock cluster has no CreateTopics API: topics are made on it directly.
    for topic in crate::kafka::owned_topics(&config, &matrix)
        .iter()
        .chain(["directory.accounts".to_string()].iter())
    {
        cluster
            .create_topic(topic, config.partitions, 1)
            .map_err(|e| format!("creating {topic}: {e}"))?;
    }

    let records = inputs()?;
    config.max_events = Some(records.len() as u64);
    publish(&bootstrap, &config.topics.actions, &records)?;

    let stop = Arc::new(AtomicBool::new(false));
    let summary = crate::stage::run(config.clone(), Metrics::new(), stop)
        .await
        .map_err(|e| e.to_string())?
        .route
        .unwrap_or_default();

    let mut topics: Vec<&str> = matrix.lanes.iter().map(|l| l.topic.as_str()).collect();
    topics.push(&config.topics.allowed);
    topics.push(&config.topics.dlq);
    let outputs = read_all(&config, &topics, Duration::from_secs(10)).map_err(|e| e.to_string())?;

    println!("{:<38} {:<22} {:<44} missing context", "action", "lanes", "rules");
    println!("{}", "-".repeat(130));
    let mut shown: Vec<String> = Vec::new();
    for (id, _) in records
        .iter()
        .filter_map(|r| r.action_id.as_ref().map(|id| (id, r)))
    {
        if shown.contains(id) {
            continue;
        }
        shown.push(id.clone());
        let packets: Vec<OwnedApprovalRequest> = outputs
            .iter()
            .filter(|o| o.topic != config.topics.dlq && o.key.as_deref() == Some(id.as_bytes()))
            .filter_map(|o| serde_json::from_slice(o.payload.as_deref()?).ok())
            .collect();
        let review: Vec<&OwnedApprovalRequest> = packets.iter().filter(|p| p.review).collect();
        let (lanes, rules, missing) = if review.is_empty() {
            ("(allowed)".to_string(), "-".to_string(), "-".to_string())
        } else {
            (
                review
                    .iter()
                    .filter_map(|p| p.lane.as_deref())
                    .collect::<Vec<_>>()
                    .join(", "),
                review
                    .iter()
                    .flat_map(|p| p.rules.iter().map(|r| r.as_ref()))
                    .collect::<Vec<_>>()
                    .join(", "),
                review
                    .iter()
                    .filter(|p| !p.missing_context.is_empty())
                    .map(|p| {
                        let fields: Vec<&str> = p.missing_context.iter().map(|m| m.as_ref()).collect();
                        format!("{}: {}", p.lane.as_deref().unwrap_or("?"), fields.join(", "))
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        };
        println!("{id:<38} {lanes:<22} {rules:<44} {missing}");
    }
    println!("\ndead letters (switchboard.dlq):");
    for o in outputs.iter().filter(|o| o.topic == config.topics.dlq) {
        let header = |name: &str| {
            o.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        println!(
            "  offset {} of {}: {} ({})",
            header(crate::dlq::SOURCE_OFFSET),
            header(crate::dlq::SOURCE_TOPIC),
            header(crate::dlq::REASON),
            header(crate::dlq::ERROR)
        );
    }
    println!(
        "\n{} records handled: {} sent for review, {} allowed, {} dead letters, {} redelivery recognised and not routed again.",
        summary.handled, summary.routed, summary.allowed, summary.dead, summary.duplicates
    );
    println!("Exactly once: every output and input offset was committed in Kafka transactions.");
    println!(
        "Done in {:.1} s. Try: switchboard explain --matrix deploy/matrix.yaml deploy/samples/refund-over-threshold.json",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    drop(cluster);
    Ok(())
}

struct Input {
    action_id: Option<String>,
    bytes: Vec<u8>,
}

/// The samples as JSON, one of them again as Confluent-framed Avro (so both
/// formats are shown), a redelivery, and two records that are not actions.
fn inputs() -> Result<Vec<Input>, String> {
    let schema = apache_avro::Schema::parse_str(include_str!("../schemas/agent_action.avsc"))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, text) in SAMPLES {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("sample {name}: {e}"))?;
        let id = value["action_id"].as_str().map(String::from);
        let bytes = if *name == "production-config-change" {
            frame(
                AGENT_ACTION_SCHEMA_ID,
                &encode_json_as_avro(&schema, &value).map_err(|e| format!("sample {name}: {e}"))?,
            )
        } else {
            text.as_bytes().to_vec()
        };
        out.push(Input { action_id: id, bytes });
    }
    out.push(Input {
        action_id: None,
        bytes: b"{\"action_id\": \"broken-1\", \"kind\": ".to_vec(),
    });
    out.push(Input {
        action_id: None,
        bytes: br#"{"action_id":"broken-2","occurred_at":"2026-01-01T09:00:00Z","agent_id":"a","summary":"no kind"}"#.to_vec(),
    });
    // An agent retrying: the same action again must not open a second approval.
    out.push(Input {
        action_id: None,
        bytes: SAMPLES[1].1.as_bytes().to_vec(),
    });
    Ok(out)
}

fn publish(bootstrap: &str, topic: &str, records: &[Input]) -> Result<(), String> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| format!("creating the sample producer: {e}"))?;
    let accounts = br#"{"name": "Initech GmbH", "tier": "enterprise", "lead": "lena"}"#;
    producer
        .send(
            BaseRecord::to("directory.accounts")
                .key("acct-4471")
                .payload(&accounts[..]),
        )
        .map_err(|(e, _)| format!("publishing the directory record: {e}"))?;
    for r in records {
        let key = r.action_id.clone().unwrap_or_default();
        producer
            .send(BaseRecord::to(topic).key(&key).payload(&r.bytes))
            .map_err(|(e, _)| format!("publishing a sample: {e}"))?;
    }
    producer
        .flush(Duration::from_secs(10))
        .map_err(|e| format!("publishing the samples: {e}"))
}
