//! Spoofed and stale decisions against the running escalation stage (both
//! stages in-process on the mock cluster, a clock the test moves, SLAs of
//! seconds): decisions from approvers off the roster, for another lane, for
//! an unknown action, after the outcome, twice, with a forged escalation
//! level, from a later step's roster too early and the first step's roster
//! too late, with an empty approver, and in Avro under a wrong schema id.
//! Each is refused, counted under its reason, dead-lettered with its
//! headers, and changes no outcome.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use switchboard::changelog::ReadRecord;
use switchboard::clock::ManualClock;
use switchboard::decode::{SchemaDir, SchemaSource, encode_json_as_avro, frame};
use switchboard::matrix::Matrix;
use switchboard::metrics::Metrics;
use switchboard::stage::run_with_clock;

/// `tests/data/short-sla.yaml` (2-second SLAs; finance: fran, then the
/// finance lead fiona, then the manager morgan) plus a rule that also sends
/// external refunds to the customer lane (cora), so one action waits on two
/// lanes.
fn matrix_file(dir: &tempfile::TempDir) -> PathBuf {
    let base = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/short-sla.yaml"),
    )
    .expect("the short-SLA matrix");
    let text = base.replacen(
        "rules:\n",
        "rules:\n  - name: external-refund\n    lane: customer\n    when:\n      kind: refund.issue\n      signals.audience: external\n",
        1,
    );
    let path = dir.path().join("spoof.yaml");
    std::fs::write(&path, text).expect("the matrix written");
    Matrix::load(&path).expect("the test matrix loads");
    path
}

#[path = "common/escalation.rs"]
mod escalation;

use escalation::{EscalationBroker as Broker, T0};

/// Every outcome written so far, by action.
trait Outcomes {
    fn outcomes(&self) -> BTreeMap<String, Vec<String>>;
}

impl Outcomes for Broker {
    fn outcomes(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in self.read("approvals.outcomes") {
            let v: Value = serde_json::from_slice(r.payload.as_deref().expect("an outcome")).unwrap();
            out.entry(v["action_id"].as_str().unwrap().to_string())
                .or_default()
                .push(v["outcome"].as_str().unwrap().to_string());
        }
        out
    }
}

/// Sets the stop flag when dropped, so a failing test leaves nothing running.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn refused(metrics: &Metrics, reason: &str) -> u64 {
    metrics
        .decisions_rejected_total
        .with_label_values(&[reason])
        .get()
}

fn header<'a>(r: &'a ReadRecord, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spoofed_and_stale_decisions_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::new(&matrix_file(&dir));
    let t0: DateTime<Utc> = DateTime::parse_from_rfc3339(T0).unwrap().with_timezone(&Utc);
    let clock = Arc::new(ManualClock::new(t0));
    let metrics = Metrics::new();
    let stop = Stop(Arc::new(AtomicBool::new(false)));
    let handle = tokio::spawn(run_with_clock(
        broker.config.clone(),
        metrics.clone(),
        stop.0.clone(),
        clock.clone(),
    ));

    broker.action(
        "refund",
        json!({"kind": "refund.issue", "signals": {"amount": "500"}}),
    );
    broker.action(
        "both",
        json!({"kind": "refund.issue", "signals": {"amount": "500", "audience": "external"}}),
    );
    broker.action("extend", json!({"kind": "deadline.extend"}));
    let pending = |lane: &str| metrics.pending_approvals.with_label_values(&[lane]).get();
    broker.wait_for("the approvals held", |_| {
        pending("finance") == 2 && pending("customer") == 1 && pending("manager") == 1
    });

    // Accepted: the manager rejects `extend`; fran approves `both` on finance.
    broker.decide("extend", "manager", "reject", "morgan");
    broker.decide("both", "finance", "approve", "fran");
    broker.wait_for("the rejection", |b| b.outcomes().contains_key("extend"));

    // (reason, action key, record bytes) of every spoofed or stale decision.
    let mut spoofs: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    // Off the roster.
    spoofs.push((
        "not_on_roster",
        "refund",
        broker.decide("refund", "finance", "approve", "mallory"),
    ));
    // For another lane: one the action waits on, and one it does not.
    spoofs.push((
        "wrong_lane",
        "refund",
        broker.decide("refund", "customer", "approve", "cora"),
    ));
    spoofs.push((
        "wrong_lane",
        "refund",
        broker.decide("refund", "manager", "approve", "morgan"),
    ));
    // For an action nobody routed.
    spoofs.push((
        "not_pending",
        "ghost",
        broker.decide("ghost", "finance", "approve", "fran"),
    ));
    // After the outcome: the same approver changing their mind.
    spoofs.push((
        "not_pending",
        "extend",
        broker.decide("extend", "manager", "approve", "morgan"),
    ));
    // The same decision twice.
    spoofs.push((
        "already_decided",
        "both",
        broker.decide("both", "finance", "approve", "fran"),
    ));
    // A forged escalation level: a Decision has no such field.
    spoofs.push((
        "malformed",
        "refund",
        broker.decide_json(
            "refund",
            json!({"action_id": "refund", "lane": "finance", "verdict": "approve", "approver": "fiona",
                   "escalation_level": 1, "decided_at": T0}),
        ),
    ));
    // The next step's roster before the escalation happened.
    spoofs.push((
        "not_on_roster",
        "refund",
        broker.decide("refund", "finance", "approve", "fiona"),
    ));
    // No approver at all.
    spoofs.push((
        "malformed",
        "refund",
        broker.decide("refund", "finance", "approve", ""),
    ));
    spoofs.push((
        "malformed",
        "refund",
        broker.decide("refund", "finance", "approve", "  "),
    ));
    // Avro under the wrong schema ids: the action's (1), and one nobody has.
    let schema = SchemaDir::bundled().schema(2).expect("the decision schema");
    let body = encode_json_as_avro(
        &schema,
        &json!({"action_id": "refund", "lane": "finance", "verdict": "approve", "approver": "fran",
                "comment": null, "decided_at": T0}),
    )
    .expect("a decision in Avro");
    for id in [1, 99] {
        let bytes = frame(id, &body);
        broker.send_bytes("approvals.decisions", "refund", &bytes);
        spoofs.push(("malformed", "refund", bytes));
    }
    let count = |reason: &str, spoofs: &[(&str, &str, Vec<u8>)]| {
        spoofs.iter().filter(|(r, _, _)| *r == reason).count() as u64
    };
    broker.wait_for("every refusal at level 0", |_| {
        [
            "not_on_roster",
            "wrong_lane",
            "not_pending",
            "already_decided",
            "malformed",
        ]
        .iter()
        .all(|r| refused(&metrics, r) == count(r, &spoofs))
    });
    // The same decision in Avro under its own schema id is accepted, so the
    // refusals above were the schema id's doing: checked at the end, on
    // `refund` once fiona may decide.

    // The finance SLA passes: `refund` goes to the finance lead.
    clock.advance(TimeDelta::milliseconds(2100));
    broker.wait_for("the escalation to the finance lead", |b| {
        b.values("approvals.finance", "refund")
            .iter()
            .any(|p| p["escalation_level"] == 1 && p["reminder"] != json!(true))
    });
    // Now the first step's roster is too late.
    spoofs.push((
        "not_on_roster",
        "refund",
        broker.decide("refund", "finance", "approve", "fran"),
    ));
    broker.wait_for("the stale approver refused", |_| {
        refused(&metrics, "not_on_roster") == count("not_on_roster", &spoofs)
    });
    assert!(
        !broker.outcomes().contains_key("refund"),
        "no refusal closed refund"
    );
    assert!(!broker.outcomes().contains_key("both"), "no refusal closed both");

    // The finance lead approves, in Avro with the Decision's schema id.
    let fiona = encode_json_as_avro(
        &schema,
        &json!({"action_id": "refund", "lane": "finance", "verdict": "approve", "approver": "fiona",
                "comment": "checked", "decided_at": T0}),
    )
    .expect("a decision in Avro");
    broker.send_bytes("approvals.decisions", "refund", &frame(2, &fiona));
    broker.wait_for("refund's outcome", |b| b.outcomes().contains_key("refund"));

    let Stop(flag) = &stop;
    flag.store(true, Ordering::Relaxed);
    handle.await.expect("joined").expect("the stages stop cleanly");

    // Exactly the expected outcomes; `both` still waits on the customer lane.
    let outcomes = broker.outcomes();
    assert_eq!(
        outcomes,
        BTreeMap::from([
            ("extend".to_string(), vec!["rejected".to_string()]),
            ("refund".to_string(), vec!["approved".to_string()]),
        ])
    );
    let refund = broker.values("approvals.outcomes", "refund").pop().unwrap();
    assert_eq!(refund["verdicts"]["finance"]["approver"], "fiona");
    assert_eq!(refund["verdicts"]["finance"]["comment"], "checked");
    let extend = broker.values("approvals.outcomes", "extend").pop().unwrap();
    assert_eq!(extend["verdicts"]["manager"]["verdict"], "reject");
    assert_eq!(pending("finance"), 0);
    assert_eq!(pending("customer"), 1);
    assert_eq!(pending("manager"), 0);
    let accepted =
        |lane: &str, verdict: &str| metrics.decisions_total.with_label_values(&[lane, verdict]).get();
    assert_eq!(accepted("finance", "approve"), 2, "fran on both, fiona on refund");
    assert_eq!(accepted("manager", "reject"), 1);
    assert_eq!(accepted("manager", "approve"), 0);
    assert_eq!(accepted("customer", "approve"), 0);
    for reason in [
        "not_on_roster",
        "wrong_lane",
        "not_pending",
        "already_decided",
        "malformed",
    ] {
        assert_eq!(refused(&metrics, reason), count(reason, &spoofs), "{reason}");
    }

    // Each refusal is in the DLQ with its bytes, key and headers, in the
    // order sent per action.
    let dlq = broker.read("switchboard.dlq");
    assert_eq!(dlq.len(), spoofs.len(), "one dead letter per refused decision");
    for (reason, key, bytes) in &spoofs {
        let letter = dlq
            .iter()
            .find(|r| {
                r.payload.as_deref() == Some(bytes.as_slice())
                    && header(r, "switchboard.reason") == Some(reason)
            })
            .unwrap_or_else(|| panic!("{reason} decision {} in the DLQ", String::from_utf8_lossy(bytes)));
        assert_eq!(letter.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(
            header(letter, "switchboard.source.topic"),
            Some("approvals.decisions")
        );
        assert!(header(letter, "switchboard.error").is_some_and(|e| !e.is_empty()));
        assert!(header(letter, "switchboard.source.offset").is_some());
        assert!(header(letter, "switchboard.dead_at").is_some());
    }
}
