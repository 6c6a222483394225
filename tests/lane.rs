//! Working a lane end to end on librdkafka's mock cluster: both stages run
//! in-process on a clock the test moves, and a person's tools run as the
//! built binary: `switchboard inbox` shows what waits (and only that, the
//! newest step of each), `switchboard decide` answers, and the escalation
//! stage accepts or refuses the answer. Every wait has a deadline.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::*;
use serde_json::{Value, json};
use switchboard::clock::ManualClock;
use switchboard::config::{Config, Stage};
use switchboard::matrix::Matrix;
use switchboard::metrics::Metrics;

const T0: &str = "2026-03-01T10:00:00Z";

/// Two lanes with SLAs of seconds; finance's packet must carry an impact
/// the test's actions never give, so `missing_context` has something in it.
const MATRIX: &str = r#"
lanes:
  finance:
    sla: 2s
    owner: finance-approver
    roster: [fran]
    context:
      amount: signals.amount
      impact: signals.impact
    escalation:
      - assignee: finance-lead
        roster: [fiona]
  customer:
    sla: 2s
    owner: customer-owner
    roster: [cora]
rules:
  - name: refund-over-threshold
    lane: finance
    when:
      kind: refund.issue
      signals.amount: {above: 100}
  - name: external-message
    lane: customer
    when:
      kind: email.send
      signals.audience: external
"#;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(T0).unwrap().with_timezone(&Utc)
}

/// Both stages on their own thread and runtime, on `clock`; stopped on drop.
struct Stages {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl Stages {
    fn start(config: Config, metrics: Metrics, clock: Arc<ManualClock>) -> Stages {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime
                .block_on(switchboard::stage::run_with_clock(config, metrics, flag, clock))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Stages {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Stages {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take()
            && wait_until(deadline(30), || handle.is_finished())
        {
            match handle.join() {
                Ok(Err(e)) if !std::thread::panicking() => panic!("the stages failed: {e}"),
                _ => {}
            }
        }
    }
}

struct Lane {
    kafka: MockKafka,
    config: Config,
    clock: Arc<ManualClock>,
    metrics: Metrics,
    _dir: tempfile::TempDir,
}

impl Lane {
    fn new() -> Lane {
        let kafka = MockKafka::new();
        let dir = tempfile::tempdir().expect("a temp dir");
        let matrix_path = dir.path().join("matrix.yaml");
        std::fs::write(&matrix_path, MATRIX).expect("writing the matrix");
        let matrix = Matrix::load(&matrix_path).expect("the test matrix loads");
        let mut config = Config::new(kafka.bootstrap(), &matrix_path);
        config.stage = Stage::All;
        config.partitions = 2;
        config.batch_wait = Duration::from_millis(1);
        quick_rejoin(&mut config);
        kafka.create_topics(&config, &matrix);
        Lane {
            kafka,
            config,
            clock: Arc::new(ManualClock::new(t0())),
            metrics: Metrics::new(),
            _dir: dir,
        }
    }

    fn start(&self) -> Stages {
        Stages::start(self.config.clone(), self.metrics.clone(), self.clock.clone())
    }

    fn action(&self, id: &str, fields: Value) {
        let mut event = json!({
            "action_id": id, "occurred_at": T0, "agent_id": "billing-agent", "summary": id,
        });
        for (k, v) in fields.as_object().expect("fields are an object") {
            event[k] = v.clone();
        }
        let producer = Producer::new(&self.kafka.bootstrap());
        producer.send(
            "agent.actions",
            None,
            Some(id.as_bytes()),
            Some(event.to_string().as_bytes()),
        );
        producer.flush();
    }

    fn refund(&self, id: &str, summary: &str, amount: &str) {
        self.action(
            id,
            json!({"kind": "refund.issue", "summary": summary, "signals": {"amount": amount}}),
        );
    }

    fn values(&self, topic: &str, id: &str) -> Vec<Value> {
        read(&self.config, &[topic])
            .iter()
            .filter(|r| r.key.as_deref() == Some(id.as_bytes()))
            .filter_map(|r| serde_json::from_slice(r.payload.as_deref()?).ok())
            .collect()
    }

    fn outcome(&self, id: &str) -> Option<Value> {
        self.values("approvals.outcomes", id).pop()
    }

    fn held(&self, lane: &str) -> i64 {
        self.metrics.pending_approvals.with_label_values(&[lane]).get()
    }

    fn refused(&self, reason: &str) -> u64 {
        self.metrics
            .decisions_rejected_total
            .with_label_values(&[reason])
            .get()
    }

    /// `switchboard ARGS… --bootstrap-servers B` as a child process.
    fn spawn(&self, name: &str, args: &[&str]) -> Proc {
        let mut cmd = switchboard_command();
        cmd.args(args)
            .args(["--bootstrap-servers", &self.kafka.bootstrap()]);
        Proc::spawn(name, cmd)
    }

    /// Runs a command to a 0 exit and returns its standard output.
    fn run(&self, name: &str, args: &[&str]) -> String {
        let mut proc = self.spawn(name, args);
        proc.wait_success(Duration::from_secs(60));
        proc.stdout()
    }

    fn inbox(&self, extra: &[&str]) -> String {
        let mut args = vec!["inbox", "finance"];
        args.extend_from_slice(extra);
        self.run("inbox", &args)
    }
}

/// The blocks of a text inbox, by their first line's action id.
fn blocks<'a>(text: &'a str, id: &str) -> Vec<&'a str> {
    text.split("\n\n")
        .filter(|b| b.starts_with(&format!("{id}  ")))
        .collect()
}

fn matrix_file(dir: &Path) -> PathBuf {
    let path = dir.join("matrix.yaml");
    std::fs::write(&path, MATRIX).expect("writing the matrix");
    path
}

#[test]
fn inbox_shows_what_waits_and_decide_answers_it() {
    let lane = Lane::new();
    let _stages = lane.start();
    lane.refund("refund-1", "Refund order 42", "500");
    lane.refund("refund-2", "Refund order 43", "700");
    lane.action(
        "email-1",
        json!({"kind": "email.send", "signals": {"audience": "external"}}),
    );
    wait_for(deadline(30), "both refunds held by the escalation stage", || {
        lane.held("finance") == 2 && lane.held("customer") == 1
    });

    // What a person at the finance lane sees.
    let shown = lane.inbox(&[]);
    let refund1 = blocks(&shown, "refund-1");
    assert_eq!(refund1.len(), 1, "one block for refund-1:\n{shown}");
    for expected in [
        "refund-1  Refund order 42\n",
        "  lane       finance\n",
        "  kind       refund.issue\n",
        "  agent      billing-agent\n",
        "  assigned   finance-approver, escalation level 0; may decide: fran\n",
        "  due        2026-03-01T10:00:02Z (overdue by ",
        "  rules      refund-over-threshold\n",
        "  missing    impact\n",
        "  context    amount: 500\n",
        "  answer     switchboard decide refund-1 --lane finance --approve --by fran",
    ] {
        assert!(refund1[0].contains(expected), "{expected:?} in:\n{shown}");
    }
    assert_eq!(blocks(&shown, "refund-2").len(), 1, "{shown}");
    assert!(!shown.contains("email-1"), "another lane's approval:\n{shown}");
    assert!(
        shown.ends_with("2 approvals waiting on approvals.finance\n"),
        "{shown}"
    );

    // The same as JSON lines; --matrix resolves the lane's topic.
    let dir = tempfile::tempdir().unwrap();
    let matrix = matrix_file(dir.path());
    let json_lines = lane.inbox(&["--format", "json", "--matrix", matrix.to_str().unwrap()]);
    let packets: Vec<Value> = json_lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let ids: Vec<&str> = packets.iter().filter_map(|p| p["action_id"].as_str()).collect();
    assert_eq!(ids, vec!["refund-1", "refund-2"], "{json_lines}");
    assert_eq!(packets[0]["missing_context"], json!(["impact"]));
    assert_eq!(packets[0]["inbox"]["status"], "waiting");
    assert_eq!(
        packets[0]["inbox"]["decide_command"],
        "switchboard decide refund-1 --lane finance --approve --by fran"
    );

    // fran approves refund-1: the stage accepts it and the outcome follows.
    let said = lane.run(
        "decide-fran",
        &[
            "decide",
            "refund-1",
            "--lane",
            "finance",
            "--approve",
            "--by",
            "fran",
            "--comment",
            "ok",
        ],
    );
    assert!(said.contains("written to approvals.decisions"), "{said}");
    wait_for(deadline(30), "refund-1's outcome", || {
        lane.outcome("refund-1").is_some()
    });
    let outcome = lane.outcome("refund-1").unwrap();
    assert_eq!(outcome["outcome"], "approved", "{outcome}");
    assert_eq!(outcome["verdicts"]["finance"]["approver"], "fran");
    assert_eq!(outcome["verdicts"]["finance"]["comment"], "ok");

    // Someone off the roster: written, but refused by the stage.
    lane.run(
        "decide-mallory",
        &[
            "decide",
            "refund-2",
            "--lane",
            "finance",
            "--approve",
            "--by",
            "mallory",
        ],
    );
    wait_for(deadline(30), "mallory's decision refused", || {
        lane.refused("not_on_roster") == 1
    });
    assert_eq!(lane.outcome("refund-2"), None);

    // The inbox no longer lists the decided action; the history marks it closed.
    let shown = lane.inbox(&[]);
    assert!(blocks(&shown, "refund-1").is_empty(), "{shown}");
    assert_eq!(blocks(&shown, "refund-2").len(), 1, "{shown}");
    assert!(
        shown.ends_with("1 approval waiting on approvals.finance\n"),
        "{shown}"
    );
    let history = lane.inbox(&["--from-beginning"]);
    let closed = blocks(&history, "refund-1");
    assert_eq!(closed.len(), 1, "{history}");
    assert!(
        closed[0].contains("  status     CLOSED: approved at "),
        "{history}"
    );
    assert!(!closed[0].contains("switchboard decide"), "{history}");

    // refund-2's SLA passes: only its newest step is shown, for the lead.
    lane.clock.advance(TimeDelta::seconds(3));
    wait_for(deadline(30), "refund-2 escalated", || {
        lane.values("approvals.finance", "refund-2")
            .iter()
            .any(|p| p["escalation_level"] == 1)
    });
    let shown = lane.inbox(&[]);
    let refund2 = blocks(&shown, "refund-2");
    assert_eq!(refund2.len(), 1, "only the newest step:\n{shown}");
    assert!(
        refund2[0].contains("  assigned   finance-lead, escalation level 1; may decide: fiona\n"),
        "{shown}"
    );
    assert!(refund2[0].contains("--approve --by fiona"), "{shown}");
}

#[test]
fn inbox_follow_prints_new_packets_as_they_arrive() {
    let lane = Lane::new();
    let _stages = lane.start();
    let mut follow = lane.spawn("inbox-follow", &["inbox", "finance", "--follow"]);
    wait_for(deadline(30), "the first listing", || {
        follow.stdout().contains("nothing waiting on approvals.finance\n")
    });

    lane.refund("late-1", "Refund order 77", "900");
    wait_for(deadline(30), "the new packet printed", || {
        follow.stdout().contains("late-1  Refund order 77\n")
    });
    let printed = follow.stdout();
    assert!(
        printed.contains("switchboard decide late-1 --lane finance --approve --by fran"),
        "{printed}"
    );
    assert!(
        follow.try_status().is_none(),
        "still following:\n{}",
        follow.log()
    );

    // Answered elsewhere: the follower says it closed.
    wait_for(deadline(30), "late-1 held", || lane.held("finance") == 1);
    lane.run(
        "decide",
        &[
            "decide", "late-1", "--lane", "finance", "--reject", "--by", "fran",
        ],
    );
    wait_for(deadline(30), "the closing printed", || {
        follow.stdout().contains("  status     CLOSED: rejected at ")
    });

    // A plain reader: nothing committed under the readers' group id.
    let committed = committed_offsets(&lane.config, "switchboard-reader", "approvals.finance");
    assert!(committed.is_empty(), "{committed:?}");
    follow.signal("KILL");
}

#[test]
fn inbox_refuses_a_lane_the_matrix_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let matrix = matrix_file(dir.path());
    let mut cmd = switchboard_command();
    cmd.args([
        "inbox",
        "treasury",
        "--bootstrap-servers",
        "127.0.0.1:9",
        "--matrix",
    ])
    .arg(&matrix);
    let mut proc = Proc::spawn("inbox", cmd);
    let status = proc.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", proc.log());
    assert!(
        proc.log()
            .contains("lane \"treasury\" is not in the matrix (its lanes: finance, customer)"),
        "{}",
        proc.log()
    );
}
