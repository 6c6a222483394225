//! The escalation stage on a real broker: tansu as a child process, with
//! `switchboard run` instances as child processes in one consumer group
//! (at-least-once, since tansu refuses librdkafka's transactions; every
//! client sets `fetch.wait.max.ms` to 10 ms, as tansu holds fetches that
//! long). SLAs are seconds long (`tests/data/short-sla.yaml`) on the real
//! clock; every wait has a deadline.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::*;
use serde_json::{Value, json};
use switchboard::config::Config;
use switchboard::matrix::Matrix;

const GROUP: &str = "tansu-escalate";

fn short_sla() -> PathBuf {
    manifest_dir().join("tests/data/short-sla.yaml")
}

fn config(tansu: &Tansu) -> Config {
    tansu_config(tansu, &short_sla(), GROUP)
}

/// `switchboard run --stage STAGE` in `GROUP` with the short-SLA matrix.
fn instance(name: &str, tansu: &Tansu, stage: &str, addr: &str) -> Proc {
    Proc::spawn(name, tansu_instance(tansu, &short_sla(), stage, GROUP, addr))
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

/// A refund over the finance threshold for each id, keyed by it, occurring
/// `ahead` from now (the SLA clock starts then).
fn send_refunds(config: &Config, ids: &[String], ahead: TimeDelta) {
    let occurred_at = (Utc::now() + ahead).to_rfc3339();
    let producer = Producer::new(&config.bootstrap_servers);
    for id in ids {
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
}

fn is_reminder(p: &Value) -> bool {
    p["reminder"] == json!(true)
}

fn levels<'a>(packets: impl Iterator<Item = &'a Value>) -> Vec<i64> {
    packets
        .map(|p| p["escalation_level"].as_i64().unwrap_or(-1))
        .collect()
}

/// Each approval's chain ran exactly once: finance levels 0 and 1, the
/// manager step, reminders at most once per step, one `expired` outcome on
/// the finance lane.
fn every_step_once(records: &[switchboard::changelog::ReadRecord], ids: &[String]) {
    for id in ids {
        let finance = values(records, "approvals.finance", id);
        let manager = values(records, "approvals.manager", id);
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
        let outcomes = values(records, "approvals.outcomes", id);
        assert_eq!(outcomes.len(), 1, "{id}: one outcome");
        assert_eq!(outcomes[0]["outcome"], "expired");
        assert_eq!(outcomes[0]["expired_lane"], "finance");
    }
}

/// Two escalation instances share the pending partitions; one leaves the
/// group mid-SLA and the other restores its partitions from the changelog:
/// every step of every chain fires exactly once, reminders at most once,
/// and every approval ends with one `expired` outcome.
#[test]
fn a_rebalance_mid_sla_loses_and_doubles_no_escalation() {
    let tansu = Tansu::start();
    let config = config(&tansu);
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
    let ids: Vec<String> = (0..12).map(|i| format!("rb-{i}")).collect();
    send_refunds(&config, &ids, TimeDelta::seconds(5));
    wait_for(deadline(60), "every approval held, by both instances", || {
        let (ha, hb) = (held(&addrs[1]), held(&addrs[2]));
        ha > 0.0 && hb > 0.0 && ha + hb == ids.len() as f64
    });

    // Instance a leaves (SIGTERM: it finishes its batch and leaves the group).
    a.signal("TERM");
    a.wait_success(Duration::from_secs(30));
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

    every_step_once(&read_to_markers(&config, &topics), &ids);
}

/// Killed with SIGKILL in the middle of a burst of SLA expiries (as soon
/// as the first escalated packets are readable, before the batch that
/// writes them has committed) and started again, twice: every approval
/// gets each step of its chain and its expiry; none is skipped. At least
/// once, a step may be written again, but only as the same step (same
/// level), never as one more.
#[test]
fn sigkill_during_a_burst_of_expiries_skips_no_step() {
    let tansu = Tansu::start();
    let config = config(&tansu);
    let matrix = Matrix::load(&short_sla()).expect("the test matrix loads");
    ensure_topics(&config, &matrix);
    let group = format!("{GROUP}.escalate");
    let holds_all = |addr: &str| pending_partitions(addr) == 3.0;

    let route_addr = format!("127.0.0.1:{}", free_port());
    let _route = instance("route", &tansu, "route", &route_addr);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut first = instance("escalate-1", &tansu, "escalate", &addr);
    wait_for(
        deadline(60),
        "the escalation stage to hold every partition",
        || holds_all(&addr),
    );
    wait_for(deadline(60), "the route stage to be ready", || {
        http_get(&route_addr, "/readyz").is_some_and(|(s, _)| s == 200)
    });

    // 300 approvals whose SLA passes at one moment, a few seconds ahead.
    let ids: Vec<String> = (0..300 * soak()).map(|i| format!("burst-{i}")).collect();
    send_refunds(&config, &ids, TimeDelta::seconds(4));
    wait_for(deadline(60), "every approval held", || {
        held(&addr) == ids.len() as f64
    });

    let topics = ["approvals.finance", "approvals.manager", "approvals.outcomes"];
    let mut tail = Tail::new(&config, &topics);
    let steps_seen = |records: &[switchboard::changelog::ReadRecord], topic: &str| {
        records
            .iter()
            .filter(|r| r.topic == topic)
            .filter_map(|r| serde_json::from_slice::<Value>(r.payload.as_deref()?).ok())
            .filter(|p| !is_reminder(p) && p["escalation_level"].as_i64() > Some(0))
            .count()
    };
    // The first burst (level 1) starts: kill at once.
    assert!(
        tail.until(deadline(60), |r| steps_seen(r, "approvals.finance") > 0),
        "the first burst begins"
    );
    first.signal("KILL");
    assert!(!first.wait(Duration::from_secs(10)).success());

    // A new instance takes over; once the killed member is gone, a new
    // generation gives it every partition (tansu forms none on its own).
    let addr = format!("127.0.0.1:{}", free_port());
    let mut second = instance("escalate-2", &tansu, "escalate", &addr);
    let nudge = |addr: &str| {
        wait_for(deadline(90), "the new instance to hold every partition", || {
            if holds_all(addr) {
                return true;
            }
            nudge_group(&config, &group, &[&config.topics.pending], "range");
            holds_all(addr)
        })
    };
    nudge(&addr);
    // The second burst (the manager step) starts: kill again.
    assert!(
        tail.until(deadline(60), |r| steps_seen(r, "approvals.manager") > 0),
        "the second burst begins"
    );
    second.signal("KILL");
    assert!(!second.wait(Duration::from_secs(10)).success());

    let addr = format!("127.0.0.1:{}", free_port());
    let third = instance("escalate-3", &tansu, "escalate", &addr);
    nudge(&addr);
    assert!(
        tail.until(deadline(90), |records| {
            ids.iter()
                .all(|id| !values(records, "approvals.outcomes", id).is_empty())
        }),
        "every chain runs out and fails closed"
    );
    drop(third);

    let records = read_to_markers(&config, &topics);
    let mut copies = 0;
    for id in &ids {
        let finance = values(&records, "approvals.finance", id);
        let manager = values(&records, "approvals.manager", id);
        let mut levels: Vec<i64> = levels(finance.iter().chain(&manager).filter(|p| !is_reminder(p)));
        let written = levels.len();
        levels.dedup();
        copies += written - levels.len();
        assert_eq!(
            levels,
            vec![0, 1, 2],
            "{id}: every step, none skipped, none added"
        );
        let outcomes = values(&records, "approvals.outcomes", id);
        assert!(
            outcomes.iter().all(|o| o["outcome"] == "expired"),
            "{id}: {outcomes:?}"
        );
    }
    eprintln!(
        "{} approvals, 2 kills mid-burst, {copies} steps written again",
        ids.len()
    );
}

/// Rebalances mid-SLA: three escalation instances share the pending
/// partitions; one is killed with SIGKILL while every approval waits for
/// its SLA and, once the group has dropped it, a fourth joins and restores
/// the killed member's approvals from the changelog. Every step of every
/// chain fires exactly once, reminders at most once per step, and every
/// approval ends with one `expired` outcome. (The kill falls while nothing
/// is due, so no write is in flight and no copy is allowed.)
///
/// tansu 0.6.0 forms no new generation when it drops a member, so the
/// added instance's join is what shares the killed member's partition out;
/// the test waits for tansu to report the drop before adding it.
#[test]
fn three_instances_one_killed_one_added_fire_every_step_once() {
    let tansu = Tansu::start();
    let config = config(&tansu);
    let matrix = Matrix::load(&short_sla()).expect("the test matrix loads");
    ensure_topics(&config, &matrix);
    let group = format!("{GROUP}.escalate");

    let addrs: Vec<String> = (0..5).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let _route = instance("route", &tansu, "route", &addrs[0]);
    let mut members: Vec<Proc> = (1..4)
        .map(|i| instance(&format!("escalate-{i}"), &tansu, "escalate", &addrs[i]))
        .collect();
    wait_for(deadline(90), "three instances holding a partition each", || {
        addrs[1..4].iter().all(|a| pending_partitions(a) == 1.0)
    });
    wait_for(deadline(60), "the route stage to be ready", || {
        http_get(&addrs[0], "/readyz").is_some_and(|(s, _)| s == 200)
    });

    // The SLA clock starts well ahead, so the kill and the hand-over can
    // happen while nothing is due.
    let ids: Vec<String> = (0..30 * soak()).map(|i| format!("trio-{i}")).collect();
    send_refunds(&config, &ids, TimeDelta::seconds(12));
    let held_by = |range: &[String]| range.iter().map(|a| held(a)).sum::<f64>();
    wait_for(deadline(60), "every approval held, by all three", || {
        addrs[1..4].iter().all(|a| held(a) > 0.0) && held_by(&addrs[1..4]) == ids.len() as f64
    });

    let dropped = tansu.members_dropped(&group);
    members[1].signal("KILL");
    assert!(!members[1].wait(Duration::from_secs(10)).success());
    wait_for(deadline(60), "the broker to drop the killed member", || {
        tansu.members_dropped(&group) > dropped
    });
    members.push(instance("escalate-4", &tansu, "escalate", &addrs[4]));
    let live = [addrs[1].clone(), addrs[3].clone(), addrs[4].clone()];
    wait_for(
        deadline(90),
        "the live members to hold every partition and approval",
        || {
            pending_partitions(&addrs[4]) > 0.0
                && live.iter().map(|a| pending_partitions(a)).sum::<f64>() == 3.0
                && held_by(&live) == ids.len() as f64
        },
    );

    let topics = ["approvals.finance", "approvals.manager", "approvals.outcomes"];
    let mut tail = Tail::new(&config, &topics);
    assert!(
        tail.until(deadline(120), |records| {
            ids.iter()
                .all(|id| !values(records, "approvals.outcomes", id).is_empty())
        }),
        "every chain runs out and fails closed"
    );
    drop(members);

    every_step_once(&read_to_markers(&config, &topics), &ids);
}
