//! `switchboard demo`: both stages on an in-process Kafka cluster
//! (librdkafka's mock cluster, real protocol, transactions included), the
//! default matrix with SLAs of seconds, and the bundled sample actions.
//! It shows where each action went and why, decisions accepted and
//! refused, reminders and escalations as SLAs pass, and the outcomes. It
//! needs nothing but the binary.

mod inputs;
mod report;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::mocking::MockCluster;
use serde_json::json;

use crate::changelog::{ReadRecord, read_all};
use crate::config::{Config, Stage};
use crate::matrix::Matrix;
use crate::metrics::Metrics;
use crate::packet::OwnedApprovalRequest;
use inputs::{DEMO_SLA, Input};

pub fn main() -> ExitCode {
    crate::cli::init_logging_quiet();
    let runtime = match crate::cli::runtime() {
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

/// How a planned decision picks its approver.
enum Approver {
    /// The first person on the roster of the lane's current step.
    Roster,
    /// The assignee of the lane's current step (resolved from the directory).
    Assignee,
    /// Someone named, whether or not they may decide.
    Named(&'static str),
}

/// The decisions made right after routing.
const FIRST_DECISIONS: &[(&str, &str, &str, Approver)] = &[
    (
        "demo-02-refund-over-threshold",
        "finance",
        "approve",
        Approver::Roster,
    ),
    (
        "demo-10-production-export-to-partner",
        "security",
        "approve",
        Approver::Roster,
    ),
    (
        "demo-10-production-export-to-partner",
        "engineering",
        "approve",
        Approver::Roster,
    ),
    (
        "demo-06-permission-grant",
        "security",
        "approve",
        Approver::Named("mallory"),
    ),
    (
        "demo-07-deadline-extension",
        "manager",
        "reject",
        Approver::Roster,
    ),
    (
        "demo-08-low-confidence-draft",
        "manager",
        "needs_context",
        Approver::Roster,
    ),
];

/// The decision made once the customer lane's SLA passed and its account
/// lead was asked.
const AFTER_ESCALATION: (&str, &str, &str, Approver) = (
    "demo-05-external-apology",
    "customer",
    "approve",
    Approver::Assignee,
);

/// The whole demo must finish well within half a minute.
const LIMIT: Duration = Duration::from_secs(25);

async fn demo() -> Result<(), String> {
    let started = Instant::now();
    let cluster = MockCluster::new(1).map_err(|e| format!("starting the mock cluster: {e}"))?;
    let dir = std::env::temp_dir().join(format!("switchboard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let matrix_path = dir.join("matrix.yaml");
    let matrix_text = inputs::demo_matrix();
    std::fs::write(&matrix_path, &matrix_text).map_err(|e| format!("{}: {e}", matrix_path.display()))?;
    let result = run(&cluster, &matrix_path, &matrix_text, started).await;
    let _ = std::fs::remove_dir_all(&dir);
    drop(cluster);
    result
}

async fn run(
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    matrix_path: &std::path::Path,
    matrix_text: &str,
    started: Instant,
) -> Result<(), String> {
    let bootstrap = cluster.bootstrap_servers();
    let mut config = Config::new(bootstrap.clone(), matrix_path);
    config.stage = Stage::All;
    config.partitions = 3;
    config.batch_wait = Duration::from_millis(5);
    let matrix = Matrix::parse(matrix_text, "demo matrix").map_err(|e| e.to_string())?;
    // The mock cluster has no CreateTopics API: topics are made on it directly.
    for topic in crate::kafka::owned_topics(&config, &matrix)
        .iter()
        .chain(["directory.accounts".to_string()].iter())
    {
        cluster
            .create_topic(topic, config.partitions, 1)
            .map_err(|e| format!("creating {topic}: {e}"))?;
    }
    let topics = config.topics.clone();
    let mut all: Vec<&str> = matrix.lanes.iter().map(|l| l.topic.as_str()).collect();
    all.extend([
        topics.allowed.as_str(),
        topics.dlq.as_str(),
        topics.outcomes.as_str(),
        topics.decisions.as_str(),
    ]);
    let read = || read_all(&config, &all, Duration::from_secs(10)).map_err(|e| e.to_string());
    let deadline = started + LIMIT;
    let producer = inputs::producer(&bootstrap)?;
    inputs::send(&producer, "directory.accounts", &inputs::accounts())?;
    let metrics = Metrics::new();
    let stop = Arc::new(AtomicBool::new(false));
    let stages = tokio::spawn(crate::stage::run(config.clone(), metrics.clone(), stop.clone()));
    let _stop_on_error = StopOnDrop(stop.clone());

    // SLA clocks start when an action occurs: stamp the samples once both
    // stages hold their partitions, so joining the groups costs no SLA time.
    wait(deadline, "both stages to join their groups", || {
        let held = |topic: &str| metrics.assigned_partitions.with_label_values(&[topic]).get() > 0;
        Ok(held(&config.topics.actions) && held(&config.topics.pending))
    })
    .await?;
    let start = Utc::now();
    let records = inputs::inputs(start)?;
    println!("switchboard demo: an in-process Kafka cluster at {bootstrap}, the default matrix");
    println!(
        "with every SLA cut to {} s, {} sample actions (JSON and Avro), two broken records and one redelivery.\n",
        DEMO_SLA.as_secs(),
        records.iter().filter(|r| r.action_id.is_some()).count() - 1
    );
    let keyed: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|r: &Input| (r.action_id.clone().unwrap_or_default(), r.bytes.clone()))
        .collect();
    inputs::send(&producer, &config.topics.actions, &keyed)?;
    let mut ids: Vec<String> = Vec::new();
    for id in records.iter().filter_map(|r| r.action_id.clone()) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }

    // Every action routed, and every review lane held by the escalation stage.
    wait(deadline, "every action routed and held", || {
        let seen = read()?;
        let level0 = level0_reviews(&seen);
        let held: i64 = matrix
            .lanes
            .iter()
            .map(|l| metrics.pending_approvals.with_label_values(&[&l.name]).get())
            .sum();
        let done = ids
            .iter()
            .all(|id| seen.iter().any(|r| r.key.as_deref() == Some(id.as_bytes())));
        Ok(done && held == level0 as i64)
    })
    .await?;
    let mut sent = Vec::new();
    let seen = read()?;
    for plan in FIRST_DECISIONS {
        sent.push(decision(&seen, plan)?);
    }
    inputs::send(&producer, &topics.decisions, &sent)?;

    // The customer lane's SLA passes; its account lead (from the directory) decides.
    let (id, lane, ..) = AFTER_ESCALATION;
    wait(deadline, "the customer lane's escalation", || {
        let seen = read()?;
        Ok(current_step(&seen, id, lane).is_some_and(|p| p.escalation_level == Some(1)))
    })
    .await?;
    let late = decision(&read()?, &AFTER_ESCALATION)?;
    inputs::send(&producer, &topics.decisions, std::slice::from_ref(&late))?;
    sent.push(late);

    // The rest run out their chains and fail closed.
    wait(deadline, "every outcome", || {
        let seen = read()?;
        Ok(ids.iter().all(|id| {
            seen.iter()
                .any(|r| r.topic == topics.outcomes && r.key.as_deref() == Some(id.as_bytes()))
        }))
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    let summary = stages
        .await
        .map_err(|e| format!("the stages stopped abnormally: {e}"))?
        .map_err(|e| e.to_string())?;

    let records = read()?;
    let seen = report::Seen {
        records: &records,
        dlq: &topics.dlq,
        actions: &topics.actions,
        decisions: &topics.decisions,
        outcomes: &topics.outcomes,
        allowed: &topics.allowed,
    };
    report::routing(&seen, &ids);
    report::decisions(&seen, &sent);
    report::escalations(&seen, start);
    report::outcomes(&seen, &ids);
    let route = summary.route.unwrap_or_default();
    let escalate = summary.escalate.unwrap_or_default();
    println!(
        "\n{} records routed: {} sent for review, {} allowed, {} dead letters, {} redelivery recognised and not routed again.",
        route.handled, route.routed, route.allowed, route.dead, route.duplicates
    );
    println!(
        "{} decisions accepted, {} refused; {} escalations; {} outcomes.",
        escalate.decisions, escalate.refused, escalate.escalations, escalate.outcomes
    );
    println!("Exactly once: every output and input offset was committed in Kafka transactions.");
    println!(
        "Done in {:.1} s. Try: switchboard explain --matrix deploy/matrix.yaml deploy/samples/refund-over-threshold.json",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Stops the stages however the demo ends, so an error never leaves them
/// running (the runtime would wait for them).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Polls `check` until it holds or the deadline passes.
async fn wait(
    deadline: Instant,
    what: &str,
    mut check: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn packets(seen: &[ReadRecord]) -> impl Iterator<Item = OwnedApprovalRequest> + '_ {
    seen.iter()
        .filter(|r| r.topic.starts_with("approvals."))
        .filter_map(|r| serde_json::from_slice::<OwnedApprovalRequest>(r.payload.as_deref()?).ok())
        .filter(|p| p.review && !p.reminder)
}

/// How many lane packets were sent at level 0.
fn level0_reviews(seen: &[ReadRecord]) -> usize {
    packets(seen).filter(|p| p.escalation_level == Some(0)).count()
}

/// The newest step packet of `id` on `lane`.
fn current_step(seen: &[ReadRecord], id: &str, lane: &str) -> Option<OwnedApprovalRequest> {
    packets(seen)
        .filter(|p| p.action_id == id && p.lane.as_deref() == Some(lane))
        .max_by_key(|p| p.escalation_level)
}

/// A Decision for `plan`, answering the lane's current step.
fn decision(seen: &[ReadRecord], plan: &(&str, &str, &str, Approver)) -> Result<(String, Vec<u8>), String> {
    let (id, lane, verdict, approver) = plan;
    let step = current_step(seen, id, lane).ok_or_else(|| format!("no packet for {id} on {lane}"))?;
    let approver = match approver {
        Approver::Named(name) => name.to_string(),
        Approver::Assignee => step.assignee.as_deref().unwrap_or_default().to_string(),
        Approver::Roster => step
            .decide
            .as_ref()
            .and_then(|d| d.roster.first().cloned())
            .unwrap_or_default(),
    };
    let value = json!({
        "action_id": id, "lane": lane, "verdict": verdict, "approver": approver,
        "comment": "from switchboard demo", "decided_at": Utc::now(),
    });
    Ok((id.to_string(), value.to_string().into_bytes()))
}
