//! Working a lane on a real broker: tansu as a child process, `switchboard
//! run --stage all` at least once (tansu refuses librdkafka's transactions),
//! and a person's `inbox` and `decide` as the built binary. Every client
//! sets `fetch.wait.max.ms` to 10 ms, as tansu holds fetches that long.
//! Every wait has a deadline.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::*;
use serde_json::{Value, json};
use switchboard::matrix::Matrix;

fn short_sla() -> PathBuf {
    manifest_dir().join("tests/data/short-sla.yaml")
}

fn switchboard(tansu: &Tansu, name: &str, args: &[&str]) -> Proc {
    Proc::spawn(name, on_tansu(tansu, args))
}

fn finished(tansu: &Tansu, name: &str, args: &[&str]) -> String {
    let mut proc = switchboard(tansu, name, args);
    proc.wait_success(Duration::from_secs(60));
    proc.stdout()
}

#[test]
fn inbox_and_decide_on_tansu() {
    let tansu = Tansu::start();
    let config = tansu_config(&tansu, &short_sla(), "tansu-lane");
    let matrix = Matrix::load(&short_sla()).expect("the test matrix loads");
    ensure_topics(&config, &matrix);
    let addr = format!("127.0.0.1:{}", free_port());
    let _stages = Proc::spawn(
        "run",
        tansu_instance(&tansu, &short_sla(), "all", "tansu-lane", &addr),
    );
    wait_for(deadline(60), "the stages to be ready", || {
        http_get(&addr, "/readyz").is_some_and(|(s, _)| s == 200)
    });

    // The SLA clock starts at occurred_at: two minutes ahead, so nothing
    // reminds or escalates while the test runs.
    let occurred_at = (Utc::now() + TimeDelta::minutes(2)).to_rfc3339();
    let action = json!({
        "action_id": "tansu-refund", "occurred_at": occurred_at, "agent_id": "billing-agent",
        "summary": "Refund order 99 on tansu", "kind": "refund.issue", "signals": {"amount": "450"},
    });
    let producer = Producer::new(&config.bootstrap_servers);
    producer.send(
        &config.topics.actions,
        None,
        Some(b"tansu-refund"),
        Some(action.to_string().as_bytes()),
    );
    producer.flush();
    wait_for(deadline(60), "the approval held", || {
        metric(&scrape(&addr), r#"switchboard_pending_approvals{lane="finance"}"#) == Some(1.0)
    });

    let shown = finished(&tansu, "inbox", &["inbox", "finance"]);
    for expected in [
        "tansu-refund  Refund order 99 on tansu\n",
        "  assigned   finance-approver, escalation level 0; may decide: fran\n",
        "  context    amount: 450\n",
        "  answer     switchboard decide tansu-refund --lane finance --approve --by fran\n",
        "1 approval waiting on approvals.finance\n",
    ] {
        assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
    }

    let said = finished(
        &tansu,
        "decide",
        &[
            "decide",
            "tansu-refund",
            "--lane",
            "finance",
            "--approve",
            "--by",
            "fran",
        ],
    );
    assert!(said.contains("written to approvals.decisions"), "{said}");
    let mut outcomes = Tail::new(&config, &[config.topics.outcomes.as_str()]);
    let closed = outcomes.until(deadline(60), |records| {
        records
            .iter()
            .any(|r| r.key.as_deref() == Some(b"tansu-refund".as_slice()))
    });
    assert!(closed, "the outcome arrives");
    let outcome: Value = outcomes
        .keyed("tansu-refund")
        .find_map(|r| serde_json::from_slice(r.payload.as_deref()?).ok())
        .expect("a JSON outcome");
    assert_eq!(outcome["outcome"], "approved", "{outcome}");

    let shown = finished(&tansu, "inbox-after", &["inbox", "finance"]);
    assert!(!shown.contains("tansu-refund"), "{shown}");
    assert!(
        shown.ends_with("nothing waiting on approvals.finance\n"),
        "{shown}"
    );
    let history = finished(&tansu, "inbox-history", &["inbox", "finance", "--from-beginning"]);
    assert!(
        history.contains("tansu-refund  Refund order 99 on tansu\n  status     CLOSED: approved at "),
        "{history}"
    );
}
