//! The escalation stage end to end on librdkafka's mock cluster, with a
//! clock the test moves (no sleeping through SLAs): decisions accepted only
//! from the current step's roster, escalations along the chain, expiry that
//! fails closed, allowed actions approved, and timers that survive a restart.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use switchboard::clock::ManualClock;
use switchboard::config::{Config, Stage};
use switchboard::metrics::Metrics;
use switchboard::stage::{RunSummary, run_with_clock};

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(T0).unwrap().with_timezone(&Utc)
}

#[path = "common/escalation.rs"]
mod escalation;

use escalation::{EscalationBroker as Broker, T0};

impl Broker {
    /// Both stages with `tests/data/short-sla.yaml`.
    fn short_sla() -> Broker {
        Broker::new(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/short-sla.yaml"))
    }
}

/// Reminders told apart from the packets that ask someone.
trait Steps {
    /// Packets on `topic` for `key` that ask someone (reminders left out).
    fn steps(&self, topic: &str, key: &str) -> Vec<Value>;
    /// Reminders on `topic` for `key`.
    fn reminders(&self, topic: &str, key: &str) -> Vec<Value>;
}

impl Steps for Broker {
    fn steps(&self, topic: &str, key: &str) -> Vec<Value> {
        split_reminders(self, topic, key).0
    }

    fn reminders(&self, topic: &str, key: &str) -> Vec<Value> {
        split_reminders(self, topic, key).1
    }
}

fn split_reminders(broker: &Broker, topic: &str, key: &str) -> (Vec<Value>, Vec<Value>) {
    broker
        .values(topic, key)
        .into_iter()
        .partition(|p| p["reminder"] != json!(true))
}

/// Sets the stop flag when dropped, so a failing test never leaves the
/// stages running (the runtime would wait for them forever).
struct Stop(Arc<AtomicBool>);

impl Stop {
    fn store(&self, value: bool, order: Ordering) {
        self.0.store(value, order);
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs both stages in the background until the returned flag is set.
fn start(
    broker: &Broker,
    clock: Arc<ManualClock>,
    metrics: Metrics,
) -> (
    Stop,
    tokio::task::JoinHandle<Result<RunSummary, switchboard::stage::RunError>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = tokio::spawn(run_with_clock(
        broker.config.clone(),
        metrics,
        stop.clone(),
        clock,
    ));
    (Stop(stop), handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_escalations_and_outcomes() {
    let broker = Broker::short_sla();
    let clock = Arc::new(ManualClock::new(t0()));
    let metrics = Metrics::new();
    let (stop, handle) = start(&broker, clock.clone(), metrics.clone());
    broker.send(
        "directory.accounts",
        "acct-1",
        &json!({"name": "Initech", "lead": "lena"}),
    );

    broker.action(
        "refund",
        json!({"kind": "refund.issue", "signals": {"amount": "500"}}),
    );
    broker.action(
        "small",
        json!({"kind": "refund.issue", "signals": {"amount": "5"}}),
    );
    broker.action("email", json!({"kind": "email.send", "target": {"account_id": "acct-1"}, "signals": {"audience": "external"}}));
    broker.action("extend", json!({"kind": "deadline.extend"}));

    // Allowed actions are approved at once, with no verdicts.
    broker.wait_for("the allowed action's outcome", |b| b.outcome("small").is_some());
    let small = broker.outcome("small").unwrap();
    assert_eq!(small["outcome"], "approved");
    assert_eq!(small["verdicts"], json!({}));

    // Wait until the three review packets exist, so the decisions find their approvals.
    broker.wait_for("the review packets", |b| {
        !b.steps("approvals.finance", "refund").is_empty()
            && !b.steps("approvals.customer", "email").is_empty()
            && !b.steps("approvals.manager", "extend").is_empty()
    });
    broker.wait_for("the pending approvals to be held", |_| {
        metrics.pending_approvals.with_label_values(&["finance"]).get() == 1
    });

    // Someone off the roster, and the right person on the wrong lane: refused.
    broker.decide("refund", "finance", "approve", "mallory");
    broker.decide("refund", "customer", "approve", "cora");
    // The manager rejects; the customer owner approves.
    broker.decide("extend", "manager", "reject", "morgan");
    broker.decide("email", "customer", "approve", "cora");
    broker.wait_for("two outcomes", |b| {
        b.outcome("extend").is_some() && b.outcome("email").is_some()
    });
    let extend = broker.outcome("extend").unwrap();
    assert_eq!(extend["outcome"], "rejected");
    assert_eq!(extend["verdicts"]["manager"]["approver"], "morgan");
    assert_eq!(broker.outcome("email").unwrap()["outcome"], "approved");
    // A second verdict after the outcome changes nothing.
    broker.decide("extend", "manager", "approve", "morgan");
    broker.wait_for("the refusals", |_| {
        metrics
            .decisions_rejected_total
            .with_label_values(&["not_on_roster"])
            .get()
            == 1
            && metrics
                .decisions_rejected_total
                .with_label_values(&["wrong_lane"])
                .get()
                == 1
            && metrics
                .decisions_rejected_total
                .with_label_values(&["not_pending"])
                .get()
                == 1
    });
    assert_eq!(broker.values("approvals.outcomes", "extend").len(), 1);
    let dlq = broker.read("switchboard.dlq");
    let reasons: Vec<String> = dlq
        .iter()
        .flat_map(|r| r.headers.iter().filter(|(k, _)| k == "switchboard.reason"))
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect();
    for reason in ["not_on_roster", "wrong_lane", "not_pending"] {
        assert!(reasons.iter().any(|r| r == reason), "{reason} in {reasons:?}");
    }

    // The finance SLA passes: the finance lead is asked, on the finance topic.
    clock.advance(TimeDelta::seconds(3));
    broker.wait_for("the first escalation", |b| {
        b.steps("approvals.finance", "refund").len() == 2
    });
    let level1 = broker.steps("approvals.finance", "refund").pop().unwrap();
    assert_eq!(level1["escalation_level"], 1);
    assert_eq!(level1["assignee"], "finance-lead");
    assert_eq!(level1["lane"], "finance");
    assert_eq!(level1["decide"]["roster"], json!(["fiona"]));
    // The level-0 approver may no longer decide.
    broker.decide("refund", "finance", "approve", "fran");
    broker.wait_for("the stale approver refused", |_| {
        metrics
            .decisions_rejected_total
            .with_label_values(&["not_on_roster"])
            .get()
            == 2
    });

    // The customer lane's step resolves the account lead from enrichment.
    broker.action(
        "email-2",
        json!({"kind": "email.send", "occurred_at": "2026-03-01T10:00:03Z",
            "target": {"account_id": "acct-1"}, "signals": {"audience": "external"}}),
    );
    broker.wait_for("the second email's packet", |b| {
        !b.steps("approvals.customer", "email-2").is_empty()
    });
    clock.advance(TimeDelta::seconds(3));
    broker.wait_for("the second escalation", |b| {
        b.steps("approvals.manager", "refund").len() == 1
            && b.steps("approvals.customer", "email-2").len() == 2
    });
    let to_lead = broker.steps("approvals.customer", "email-2").pop().unwrap();
    assert_eq!(to_lead["assignee"], "lena");
    let to_manager = broker.steps("approvals.manager", "refund").pop().unwrap();
    assert_eq!(to_manager["escalation_level"], 2);
    assert_eq!(to_manager["lane"], "finance");
    assert_eq!(to_manager["assignee"], "manager");
    // The resolved lead may decide at that step.
    broker.decide("email-2", "customer", "approve", "lena");
    broker.wait_for("the lead's approval", |b| b.outcome("email-2").is_some());
    let email2 = broker.outcome("email-2").unwrap();
    assert_eq!(email2["verdicts"]["customer"]["approver"], "lena", "{email2}");

    // The last step passes too: the approval fails closed.
    clock.advance(TimeDelta::seconds(3));
    broker.wait_for("the expiry", |b| b.outcome("refund").is_some());
    let refund = broker.outcome("refund").unwrap();
    assert_eq!(refund["outcome"], "expired");
    assert_eq!(refund["expired_lane"], "finance");
    // Metrics count a batch once it is durable, which is after its outputs
    // can be read: the expiry's batch may not be counted yet.
    broker.wait_for("the expiry's batch counted", |_| {
        metrics.sla_breaches_total.with_label_values(&["finance"]).get() >= 3
    });
    assert_eq!(
        metrics
            .escalations_total
            .with_label_values(&["finance-approver", "finance-lead"])
            .get(),
        1
    );
    assert_eq!(
        metrics
            .escalations_total
            .with_label_values(&["finance-lead", "manager"])
            .get(),
        1
    );
    assert_eq!(
        metrics.sla_breaches_total.with_label_values(&["finance"]).get(),
        3
    );
    assert_eq!(metrics.pending_approvals.with_label_values(&["finance"]).get(), 0);

    stop.store(true, Ordering::Relaxed);
    handle.await.expect("joined").expect("stages stop cleanly");
    // Each action has exactly one outcome.
    for id in ["refund", "small", "email", "extend", "email-2"] {
        assert_eq!(broker.values("approvals.outcomes", id).len(), 1, "{id}");
    }
    drop(broker.cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timer_that_fell_due_while_stopped_fires_once_on_restart() {
    let broker = Broker::short_sla();
    let clock = Arc::new(ManualClock::new(t0()));
    let (stop, handle) = start(&broker, clock.clone(), Metrics::new());
    broker.action(
        "refund",
        json!({"kind": "refund.issue", "signals": {"amount": "500"}}),
    );
    broker.wait_for("the packet", |b| {
        !b.steps("approvals.finance", "refund").is_empty()
    });
    // Let the escalation stage take the pending record in before stopping.
    broker.wait_for("the pending record held", |b| {
        !b.values("switchboard.pending", "refund").is_empty()
    });
    stop.store(true, Ordering::Relaxed);
    handle.await.expect("joined").expect("stages stop cleanly");

    // Nothing runs while the SLA passes.
    clock.advance(TimeDelta::seconds(3));
    let metrics = Metrics::new();
    let (stop, handle) = start(&broker, clock.clone(), metrics.clone());
    broker.wait_for("the escalation on restore", |b| {
        b.steps("approvals.finance", "refund").len() == 2
    });
    // Restart again: the fired step is in the changelog, so it is not fired twice.
    stop.store(true, Ordering::Relaxed);
    handle.await.expect("joined").expect("stages stop cleanly");
    let (stop, handle) = start(&broker, clock.clone(), Metrics::new());
    broker.action(
        "marker",
        json!({"kind": "refund.issue", "signals": {"amount": "5"}}),
    );
    broker.wait_for("the restarted stage to be working", |b| {
        b.outcome("marker").is_some()
    });
    assert_eq!(broker.steps("approvals.finance", "refund").len(), 2);
    assert!(broker.outcome("refund").is_none());
    stop.store(true, Ordering::Relaxed);
    handle.await.expect("joined").expect("stages stop cleanly");
    assert_eq!(
        metrics
            .escalations_total
            .with_label_values(&["finance-approver", "finance-lead"])
            .get(),
        1
    );
}

/// Two escalation instances share the partitions; one stops mid-SLA and
/// the other takes its approvals over: every due step fires exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 6)]
async fn a_partition_moved_to_another_instance_keeps_its_timers() {
    let broker = Broker::short_sla();
    let clock = Arc::new(ManualClock::new(t0()));
    let with_stage = |stage: Stage| {
        let mut b = broker.config.clone();
        b.stage = stage;
        b
    };
    let spawn = |config: Config, metrics: Metrics| {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = tokio::spawn(run_with_clock(config, metrics, stop.clone(), clock.clone()));
        (Stop(stop), handle)
    };
    let (route_stop, route) = spawn(with_stage(Stage::Route), Metrics::new());
    let (a_stop, a) = spawn(with_stage(Stage::Escalate), Metrics::new());
    let (b_stop, b) = spawn(with_stage(Stage::Escalate), Metrics::new());

    let ids: Vec<String> = (0..12).map(|i| format!("refund-{i}")).collect();
    for id in &ids {
        broker.action(id, json!({"kind": "refund.issue", "signals": {"amount": "500"}}));
    }
    broker.wait_for("every packet", |b| {
        ids.iter().all(|id| b.steps("approvals.finance", id).len() == 1)
    });
    // Both instances hold approvals before one of them goes away.
    let marker = "marker-0";
    broker.action(
        marker,
        json!({"kind": "refund.issue", "signals": {"amount": "5"}}),
    );
    broker.wait_for("the instances to be working", |b| b.outcome(marker).is_some());

    a_stop.store(true, Ordering::Relaxed);
    a.await.expect("joined").expect("instance a stops cleanly");
    clock.advance(TimeDelta::seconds(3));
    broker.wait_for("every approval escalated by the survivor", |b| {
        ids.iter().all(|id| b.steps("approvals.finance", id).len() == 2)
    });
    // One more step for every approval, and no step twice.
    clock.advance(TimeDelta::seconds(3));
    broker.wait_for("the manager step", |b| {
        ids.iter().all(|id| b.steps("approvals.manager", id).len() == 1)
    });
    for id in &ids {
        let finance = broker.steps("approvals.finance", id);
        let levels: Vec<i64> = finance
            .iter()
            .map(|p| p["escalation_level"].as_i64().unwrap())
            .collect();
        assert_eq!(levels, vec![0, 1], "{id}");
        assert_eq!(broker.steps("approvals.manager", id).len(), 1, "{id}");
        assert!(broker.outcome(id).is_none(), "{id} still pending at the manager");
    }
    b_stop.store(true, Ordering::Relaxed);
    route_stop.store(true, Ordering::Relaxed);
    b.await.expect("joined").expect("instance b stops cleanly");
    route.await.expect("joined").expect("route stops cleanly");
}

/// A `switchboard run` child process, killed with SIGKILL on drop if still running.
struct Child(std::process::Child);

impl Child {
    fn spawn(broker: &Broker) -> Child {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["run", "--stage", "all", "--metrics-addr", "", "--partitions", "2"])
            .args([
                "--kafka",
                "session.timeout.ms=6000",
                "--kafka",
                "heartbeat.interval.ms=500",
            ])
            .env("SWITCHBOARD_BOOTSTRAP_SERVERS", &broker.config.bootstrap_servers)
            .env("SWITCHBOARD_MATRIX", &broker.config.matrix_path)
            .env(
                "RUST_LOG",
                std::env::var("CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("switchboard starts");
        Child(child)
    }

    fn kill9(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILL mid-SLA, twice: each due step still fires exactly once, on the
/// real clock with SLAs of seconds.
#[test]
fn sigkill_mid_sla_neither_loses_nor_repeats_a_step() {
    let broker = Broker::short_sla();
    // The SLA clock starts at occurred_at: a few seconds ahead, so the first
    // process has time to join its group and route before the SLA passes.
    let now = (Utc::now() + TimeDelta::seconds(6)).to_rfc3339();
    let mut first = Child::spawn(&broker);
    let ids: Vec<String> = (0..6).map(|i| format!("k-{i}")).collect();
    for id in &ids {
        broker.action(
            id,
            json!({"kind": "refund.issue", "occurred_at": now, "signals": {"amount": "500"}}),
        );
    }
    broker.wait_for("the level-0 packets", |b| {
        ids.iter().all(|id| b.steps("approvals.finance", id).len() == 1)
    });
    broker.wait_for("the pending records", |b| {
        ids.iter()
            .all(|id| !b.values("switchboard.pending", id).is_empty())
    });
    first.kill9();

    // The SLA (2 s) passes while a new process starts and restores.
    let mut second = Child::spawn(&broker);
    broker.wait_for("the first escalation of every approval", |b| {
        ids.iter().all(|id| b.steps("approvals.finance", id).len() == 2)
    });
    second.kill9();

    let _third = Child::spawn(&broker);
    broker.wait_for("the manager step of every approval", |b| {
        ids.iter().all(|id| b.steps("approvals.manager", id).len() == 1)
    });
    for id in &ids {
        let levels = |packets: Vec<Value>| -> Vec<i64> {
            packets
                .iter()
                .map(|p| p["escalation_level"].as_i64().unwrap())
                .collect()
        };
        assert_eq!(
            levels(broker.steps("approvals.finance", id)),
            vec![0, 1],
            "{id}: no step lost or repeated"
        );
        // A reminder may be skipped when its step's SLA passed while nothing
        // ran, but never sent twice for one step.
        let mut reminded = levels(broker.reminders("approvals.finance", id));
        let sent = reminded.len();
        reminded.dedup();
        assert_eq!(reminded.len(), sent, "{id}: a reminder repeated: {reminded:?}");
    }
}

/// Most of a step's SLA passes: the step's assignee gets the packet again,
/// marked as a reminder, once per step; then the chain moves on as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reminder_goes_out_once_per_step_before_it_escalates() {
    let broker = Broker::short_sla();
    let clock = Arc::new(ManualClock::new(t0()));
    let metrics = Metrics::new();
    let (stop, handle) = start(&broker, clock.clone(), metrics.clone());
    broker.action(
        "refund",
        json!({"kind": "refund.issue", "signals": {"amount": "500"}}),
    );
    broker.wait_for("the level-0 packet", |b| {
        !b.steps("approvals.finance", "refund").is_empty()
    });
    broker.wait_for("the approval held", |_| {
        metrics.pending_approvals.with_label_values(&["finance"]).get() == 1
    });
    assert!(broker.reminders("approvals.finance", "refund").is_empty());

    // 80 % of the 2 s SLA: 1.6 s after occurred_at.
    clock.advance(TimeDelta::milliseconds(1700));
    broker.wait_for("the level-0 reminder", |b| {
        b.reminders("approvals.finance", "refund").len() == 1
    });
    let reminder = broker.reminders("approvals.finance", "refund").pop().unwrap();
    assert_eq!(reminder["escalation_level"], 0);
    assert_eq!(reminder["assignee"], "finance-approver");
    assert_eq!(reminder["time_left_seconds"], 0);
    assert_eq!(reminder["sla_due"], "2026-03-01T10:00:02Z");
    assert_eq!(reminder["decide"]["roster"], json!(["fran"]));
    // Counted once its batch is durable, which is after it can be read.
    broker.wait_for("the reminder counted", |_| {
        metrics.reminders_total.with_label_values(&["finance"]).get() >= 1
    });
    assert_eq!(metrics.reminders_total.with_label_values(&["finance"]).get(), 1);

    // The SLA passes: the step escalates; it gets its own reminder at 80 %
    // of its own SLA (fired at 10:00:02.1, due 10:00:04.1, reminded at 03.7).
    clock.advance(TimeDelta::milliseconds(400));
    broker.wait_for("the first escalation", |b| {
        b.steps("approvals.finance", "refund").len() == 2
    });
    clock.advance(TimeDelta::milliseconds(1700));
    broker.wait_for("the level-1 reminder", |b| {
        b.reminders("approvals.finance", "refund").len() == 2
    });
    let reminder = broker.reminders("approvals.finance", "refund").pop().unwrap();
    assert_eq!(reminder["escalation_level"], 1);
    assert_eq!(reminder["assignee"], "finance-lead");
    assert_eq!(reminder["decide"]["roster"], json!(["fiona"]));

    // A decision after the reminder closes it; no more reminders or steps.
    broker.decide("refund", "finance", "approve", "fiona");
    broker.wait_for("the outcome", |b| b.outcome("refund").is_some());
    assert_eq!(broker.outcome("refund").unwrap()["outcome"], "approved");
    clock.advance(TimeDelta::seconds(10));
    broker.action(
        "marker",
        json!({"kind": "refund.issue", "signals": {"amount": "5"}}),
    );
    broker.wait_for("the stage to pass the marker", |b| b.outcome("marker").is_some());
    assert_eq!(broker.reminders("approvals.finance", "refund").len(), 2);
    assert_eq!(broker.steps("approvals.finance", "refund").len(), 2);
    assert_eq!(metrics.reminders_total.with_label_values(&["finance"]).get(), 2);
    stop.store(true, Ordering::Relaxed);
    handle.await.expect("joined").expect("stages stop cleanly");
}

/// A closed action is remembered for `closed_retention`, then its pending
/// record is tombstoned once, whether the retention passes while the stage
/// runs or while it is stopped; after that a redelivery is a new action.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_actions_are_tombstoned_after_their_retention() {
    let mut broker = Broker::short_sla();
    broker.config.closed_retention = Duration::from_secs(60);
    // At least once: the mock cluster keeps no offsets committed in
    // transactions, so a restart there would read every input again.
    broker.config.guarantee = switchboard::config::Guarantee::AtLeastOnce;
    let clock = Arc::new(ManualClock::new(t0()));
    let first = Metrics::new();
    let (stop, handle) = start(&broker, clock.clone(), first.clone());
    broker.action("early", json!({"kind": "deadline.extend"}));
    broker.action("late", json!({"kind": "deadline.extend"}));
    broker.wait_for("both held", |_| {
        first.pending_approvals.with_label_values(&["manager"]).get() == 2
    });
    broker.decide("early", "manager", "reject", "morgan");
    broker.wait_for("the first outcome", |b| b.outcome("early").is_some());
    let tombstones = |b: &Broker, id: &str| {
        b.read("switchboard.pending")
            .iter()
            .filter(|r| r.key.as_deref() == Some(id.as_bytes()) && r.payload.is_none())
            .count()
    };
    assert_eq!(tombstones(&broker, "early"), 0, "remembered within the retention");

    // The other one's chain runs out 30 s later: it closes as expired.
    clock.advance(TimeDelta::seconds(30));
    broker.wait_for("the second outcome", |b| b.outcome("late").is_some());
    assert_eq!(broker.outcome("late").unwrap()["outcome"], "expired");
    // The first one's retention passes while the stage runs; not the other's.
    clock.advance(TimeDelta::seconds(31));
    broker.wait_for("the tombstone", |b| tombstones(b, "early") == 1);
    stop.store(true, Ordering::Relaxed);
    handle.await.expect("joined").expect("stages stop cleanly");
    assert_eq!(tombstones(&broker, "late"), 0);

    // Restarted after the retention: the restored closed record is purged.
    clock.advance(TimeDelta::seconds(61));
    let metrics = Metrics::new();
    let (stop, handle) = start(&broker, clock.clone(), metrics.clone());
    broker.wait_for("the restored record's tombstone", |b| tombstones(b, "late") == 1);
    // Forgotten: sent again, it is a new action with a new approval.
    broker.action("early", json!({"kind": "deadline.extend"}));
    broker.wait_for("the redelivery routed as new", |b| {
        b.steps("approvals.manager", "early").len() == 2
    });
    assert_eq!(metrics.duplicates_total.get(), 0);
    stop.store(true, Ordering::Relaxed);
    handle.await.expect("joined").expect("stages stop cleanly");
    assert_eq!(tombstones(&broker, "early"), 1, "purged once");
    assert_eq!(tombstones(&broker, "late"), 1, "purged once");
}
