//! The escalation stage on a real broker: tansu as a child process, with
//! `switchboard run` instances as child processes in one consumer group
//! (at-least-once, since tansu refuses librdkafka's transactions; every
//! client sets `fetch.wait.max.ms` to 10 ms, as tansu holds fetches that
//! long). SLAs are seconds long (`tests/data/short-sla.yaml`) on the real
//! clock; every wait has a deadline.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use chrono::{TimeDelta, Utc};
use common::*;
use serde_json::{Value, json};
use switchboard::config::{Config, Guarantee};
use switchboard::matrix::Matrix;

const GROUP: &str = "tansu-escalate";

fn short_sla() -> PathBuf {
    manifest_dir().join("tests/data/short-sla.yaml")
}

fn tansu_config(tansu: &Tansu) -> Config {
    let mut config = route_config(&tansu.bootstrap(), &short_sla(), Guarantee::AtLeastOnce);
    config.kafka.push(("fetch.wait.max.ms".into(), "10".into()));
    config.partitions = 3;
    config.group_id = GROUP.into();
    config
}

/// `switchboard run --stage STAGE --guarantee at-least-once` in `GROUP`.
fn instance(name: &str, tansu: &Tansu, stage: &str, addr: &str) -> Proc {
    let mut cmd = switchboard_command();
    cmd.args(["run", "--bootstrap-servers", &tansu.bootstrap(), "--matrix"])
        .arg(short_sla())
        .args([
            "--stage",
            stage,
            "--guarantee",
            "at-least-once",
            "--partitions",
            "3",
        ])
        .args(["--group-id", GROUP, "--metrics-addr", addr])
        .args(["--kafka", "fetch.wait.max.ms=10"])
        .args([
            "--kafka",
            "session.timeout.ms=6000",
            "--kafka",
            "heartbeat.interval.ms=500",
        ]);
    Proc::spawn(name, cmd)
}

fn gauge(addr: &str, series: &str) -> f64 {
    metric(&scrape(addr), series).unwrap_or(0.0)
}

fn pending_partitions(addr: &str) -> f64 {
    gauge(
        addr,
        r#"switchboard_assigned_partitions{topic="switchboard.pending"}"#,
    )
}

fn held(addr: &str) -> f64 {
    gauge(addr, r#"switchboard_pending_approvals{lane="finance"}"#)
}

/// Parsed values for `id` among `records` of `topic`.
fn values(records: &[switchboard::changelog::ReadRecord], topic: &str, id: &str) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r.topic == topic && r.key.as_deref() == Some(id.as_bytes()))
        .filter_map(|r| serde_json::from_slice(r.payload.as_deref()?).ok())
        .collect()
}

fn is_reminder(p: &Value) -> bool {
    p["reminder"] == json!(true)
}

fn levels<'a>(packets: impl Iterator<Item = &'a Value>) -> Vec<i64> {
    packets
        .map(|p| p["escalation_level"].as_i64().unwrap_or(-1))
        .collect()
}

/// Two escalation instances share the pending partitions; one leaves the
/// group mid-SLA and the other restores its partitions from the changelog:
/// every step of every chain fires exactly once, reminders at most once,
/// and every approval ends with one `expired` outcome.
#[test]
fn a_rebalance_mid_sla_loses_and_doubles_no_escalation() {
    let tansu = Tansu::start();
    let config = tansu_config(&tansu);
    let matrix = Matrix::load(&short_sla()).expect("the test matrix loads");
    ensure_topics(&config, &matrix);

    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let _route = instance("route", &tansu, "route", &addrs[0]);
    let mut a = instance("escalate-a", &tansu, "escalate", &addrs[1]);
    let b = instance("escalate-b", &tansu, "escalate", &addrs[2]);
    wait_for(
        deadline(60),
        "both escalation instances to share the partitions",
        || {
            let (pa, pb) = (pending_partitions(&addrs[1]), pending_partitions(&addrs[2]));
            pa > 0.0 && pb > 0.0 && pa + pb == 3.0
        },
    );
    wait_for(deadline(60), "the route stage to be ready", || {
        http_get(&addrs[0], "/readyz").is_some_and(|(s, _)| s == 200)
    });

    // The SLA clock starts at occurred_at: a few seconds ahead, so routing
    // and the hand-over happen before the first reminder (80 % of 2 s).
    let occurred_at = (Utc::now() + TimeDelta::seconds(5)).to_rfc3339();
    let ids: Vec<String> = (0..12).map(|i| format!("rb-{i}")).collect();
    let producer = Producer::new(&config.bootstrap_servers);
    for id in &ids {
        let action = json!({
            "action_id": id, "occurred_at": occurred_at, "agent_id": "billing-agent",
            "summary": "refund", "kind": "refund.issue", "signals": {"amount": "500"},
        });
        producer.send(
            &config.topics.actions,
            None,
            Some(id.as_bytes()),
            Some(action.to_string().as_bytes()),
        );
    }
    producer.flush();
    wait_for(deadline(60), "every approval held, by both instances", || {
        let (ha, hb) = (held(&addrs[1]), held(&addrs[2]));
        ha > 0.0 && hb > 0.0 && ha + hb == ids.len() as f64
    });

    // Instance a leaves (SIGTERM: it finishes its batch and leaves the group).
    a.signal("TERM");
    a.wait_success(std::time::Duration::from_secs(30));
    wait_for(deadline(60), "b to hold every partition and approval", || {
        pending_partitions(&addrs[2]) == 3.0 && held(&addrs[2]) == ids.len() as f64
    });

    let topics = ["approvals.finance", "approvals.manager", "approvals.outcomes"];
    let mut tail = Tail::new(&config, &topics);
    let ended = tail.until(deadline(90), |records| {
        ids.iter()
            .all(|id| !values(records, "approvals.outcomes", id).is_empty())
    });
    assert!(ended, "every chain runs out and fails closed");
    drop(b);

    let records = read_to_markers(&config, &topics);
    for id in &ids {
        let finance = values(&records, "approvals.finance", id);
        let manager = values(&records, "approvals.manager", id);
        assert_eq!(
            levels(finance.iter().filter(|p| !is_reminder(p))),
            vec![0, 1],
            "{id}: each finance step once"
        );
        assert_eq!(
            levels(manager.iter().filter(|p| !is_reminder(p))),
            vec![2],
            "{id}: the manager step once"
        );
        let reminded: Vec<i64> = levels(finance.iter().chain(&manager).filter(|p| is_reminder(p)));
        let distinct: BTreeSet<i64> = reminded.iter().copied().collect();
        assert_eq!(
            reminded.len(),
            distinct.len(),
            "{id}: a reminder repeated: {reminded:?}"
        );
        let outcomes = values(&records, "approvals.outcomes", id);
        assert_eq!(outcomes.len(), 1, "{id}: one outcome");
        assert_eq!(outcomes[0]["outcome"], "expired");
        assert_eq!(outcomes[0]["expired_lane"], "finance");
    }
}
