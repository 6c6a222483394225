//! The escalation state machine without Kafka: who may decide, what closes
//! an approval, how a chain is walked and how it ends, and the timer queue.

use std::borrow::Cow;
use std::path::Path;

use chrono::{DateTime, TimeDelta, Utc};
use switchboard::decision::{Decision, OutcomeKind, Verdict};
use switchboard::escalation::{self, Refusal, Timer, TimerKind, Timers};
use switchboard::matrix::Matrix;
use switchboard::pending::{HeldPacket, LaneState, OwnedPendingRecord, Status};

fn t(s: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + TimeDelta::seconds(s)
}

fn matrix() -> Matrix {
    Matrix::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/short-sla.yaml")).unwrap()
}

fn lane(name: &str, role: &str, roster: &[&str], due: i64) -> LaneState<'static> {
    LaneState {
        lane: Cow::Owned(name.into()),
        level: 0,
        role: Cow::Owned(role.into()),
        assignee: Cow::Owned(role.into()),
        roster: Cow::Owned(roster.iter().map(|s| s.to_string()).collect()),
        topic: Cow::Owned(format!("approvals.{name}")),
        sla_due: t(due),
        remind_at: None,
        verdict: None,
    }
}

fn held(packet: &switchboard::packet::OwnedApprovalRequest) -> HeldPacket {
    HeldPacket::of(packet).expect("a packet encodes")
}

/// A record pending on finance and customer, with real level-0 packets.
fn record() -> OwnedPendingRecord {
    let packet: switchboard::packet::OwnedApprovalRequest = serde_json::from_value(serde_json::json!({
        "action_id": "a-1", "review": true, "lane": "finance", "review_lanes": ["finance", "customer"],
        "rules": ["refund-over-threshold"], "escalation_level": 0, "assignee": "finance-approver",
        "sla_due": "2026-03-01T10:00:02Z", "context": {}, "missing_context": [], "summary": "s",
        "kind": "refund.issue", "agent_id": "g", "target": {}, "occurred_at": "2026-03-01T10:00:00Z",
        "enrichment": {"accounts": {"lead": "lena"}}, "matrix_version": "v1",
        "routed_at": "2026-03-01T10:00:00Z",
        "decide": {"topic": "approvals.decisions", "lane": "finance", "verdicts": ["approve"],
                   "roster": ["fran"], "fields": ["action_id"]}
    }))
    .unwrap();
    let mut customer = packet.clone();
    customer.lane = Some(Cow::Borrowed("customer"));
    OwnedPendingRecord {
        action_id: Cow::Borrowed("a-1"),
        status: Status::Open,
        revision: 0,
        matrix_version: Cow::Borrowed("v1"),
        occurred_at: t(0),
        routed_at: t(0),
        lanes: vec![
            lane("finance", "finance-approver", &["fran"], 2),
            lane("customer", "customer-owner", &["cora"], 2),
        ],
        packets: vec![held(&packet), held(&customer)],
        outcome: None,
        closed_at: None,
    }
}

fn decision(lane: &str, verdict: Verdict, approver: &str) -> Decision {
    Decision {
        action_id: "a-1".into(),
        lane: lane.into(),
        verdict,
        approver: approver.into(),
        comment: None,
        decided_at: t(1),
    }
}

#[test]
fn approved_only_when_every_lane_approves() {
    let r = record();
    let first = escalation::decide(&r, &decision("finance", Verdict::Approve, "fran"), t(1)).unwrap();
    assert!(first.outcome.is_none());
    assert_eq!(first.record.revision, 1);
    let second = escalation::decide(
        &first.record,
        &decision("customer", Verdict::Approve, "cora"),
        t(1),
    )
    .unwrap();
    let outcome = second.outcome.unwrap();
    assert_eq!(outcome.outcome, OutcomeKind::Approved);
    assert_eq!(outcome.verdicts.len(), 2);
    assert_eq!(second.record.status, Status::Closed);
    assert!(
        second.record.packets.is_empty(),
        "closed records drop their packets"
    );
}

#[test]
fn one_rejection_or_request_for_context_ends_it() {
    let r = record();
    let rejected = escalation::decide(&r, &decision("customer", Verdict::Reject, "cora"), t(1)).unwrap();
    assert_eq!(rejected.outcome.unwrap().outcome, OutcomeKind::Rejected);
    let asked = escalation::decide(&r, &decision("finance", Verdict::NeedsContext, "fran"), t(1)).unwrap();
    assert_eq!(asked.outcome.unwrap().outcome, OutcomeKind::NeedsContext);
}

#[test]
fn refusals() {
    let r = record();
    let refuse = |r: &OwnedPendingRecord, d: Decision| escalation::decide(r, &d, t(1)).unwrap_err();
    assert_eq!(
        refuse(&r, decision("finance", Verdict::Approve, "mallory")),
        Refusal::NotOnRoster
    );
    assert_eq!(
        refuse(&r, decision("finance", Verdict::Approve, "cora")),
        Refusal::NotOnRoster
    );
    assert_eq!(
        refuse(&r, decision("security", Verdict::Approve, "fran")),
        Refusal::WrongLane
    );
    let once = escalation::decide(&r, &decision("finance", Verdict::Approve, "fran"), t(1)).unwrap();
    assert_eq!(
        refuse(&once.record, decision("finance", Verdict::Reject, "fran")),
        Refusal::AlreadyDecided
    );
    let closed = escalation::decide(&r, &decision("finance", Verdict::Reject, "fran"), t(1)).unwrap();
    assert_eq!(
        refuse(&closed.record, decision("customer", Verdict::Approve, "cora")),
        Refusal::NotPending
    );
}

#[test]
fn the_chain_is_walked_then_expires() {
    let m = matrix();
    let r = record();
    // finance: finance-approver → finance-lead → manager (lane), each 2 s.
    let one = escalation::fire(&r, 0, &m, t(2)).expect("its packets parse");
    let (topic, packet) = &one.packets[0];
    assert_eq!(topic, "approvals.finance");
    assert_eq!(packet.escalation_level, Some(1));
    assert_eq!(packet.assignee.as_deref(), Some("finance-lead"));
    assert_eq!(
        packet.sla_due,
        Some(t(4)),
        "each step starts its own SLA when it fires"
    );
    assert_eq!(
        one.escalation,
        Some(("finance-approver".into(), "finance-lead".into()))
    );
    assert!(one.record.lanes[0].may_decide("fiona"));
    assert!(!one.record.lanes[0].may_decide("fran"));
    let two = escalation::fire(&one.record, 0, &m, t(4)).expect("its packets parse");
    assert_eq!(two.packets[0].0, "approvals.manager");
    assert_eq!(two.packets[0].1.lane.as_deref(), Some("finance"));
    assert_eq!(two.record.lanes[0].level, 2);
    assert!(two.record.lanes[0].may_decide("morgan"));
    let end = escalation::fire(&two.record, 0, &m, t(6)).expect("its packets parse");
    assert!(end.packets.is_empty());
    let outcome = end.outcome.unwrap();
    assert_eq!(outcome.outcome, OutcomeKind::Expired);
    assert_eq!(outcome.expired_lane.as_deref(), Some("finance"));
}

#[test]
fn assignees_resolve_from_enrichment() {
    let m = matrix();
    let r = record();
    let step = escalation::fire(&r, 1, &m, t(2)).expect("its packets parse");
    assert_eq!(step.packets[0].1.assignee.as_deref(), Some("lena"));
    assert!(step.record.lanes[1].may_decide("lena"));
    // Without the directory record the role name is shown, and only the roster decides.
    let mut bare = record();
    let mut customer = bare.packets[1].parse().unwrap();
    customer.enrichment = Cow::Owned(Default::default());
    bare.packets[1] = held(&customer);
    let step = escalation::fire(&bare, 1, &m, t(2)).expect("its packets parse");
    assert_eq!(step.packets[0].1.assignee.as_deref(), Some("account-lead"));
    assert!(!step.record.lanes[1].may_decide("account-lead"));
}

#[test]
fn a_packet_that_no_longer_parses_is_reported_when_a_step_needs_it() {
    let m = matrix();
    let mut r = record();
    r.packets[0] = serde_json::from_str(r#"{"lane":5}"#).expect("any JSON is held");
    let fired = escalation::fire(&r, 0, &m, t(2)).expect_err("no step without its packet");
    assert_eq!(fired.lane, "finance");
    assert!(escalation::remind(&r, 0, t(2)).is_err());
    // The other lane's packet is not needed for it, nor read.
    assert!(escalation::fire(&r, 1, &m, t(2)).is_ok());
    // The record is written back with the packet as it was.
    let written = switchboard::encode::to_vec(&r).unwrap();
    let back: OwnedPendingRecord = serde_json::from_slice(&written).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.packets[0].json(), r#"{"lane":5}"#);
}

#[test]
fn a_lane_missing_from_the_live_matrix_fails_closed() {
    let m = matrix();
    let mut r = record();
    r.lanes[0].lane = Cow::Borrowed("legal");
    let end = escalation::fire(&r, 0, &m, t(2)).expect("its packets parse");
    assert_eq!(end.outcome.unwrap().outcome, OutcomeKind::Expired);
}

#[test]
fn allowed_actions_are_approved_without_verdicts() {
    let mut r = record();
    r.status = Status::Allowed;
    r.lanes.clear();
    let done = escalation::allow(&r, t(0));
    let outcome = done.outcome.unwrap();
    assert_eq!(outcome.outcome, OutcomeKind::Approved);
    assert!(outcome.verdicts.is_empty());
    assert_eq!(done.record.status, Status::Closed);
}

#[test]
fn timers_pop_in_due_order_and_only_when_due() {
    let mut timers = Timers::default();
    let mut a = record();
    a.lanes[0].sla_due = t(5);
    a.lanes[1].sla_due = t(3);
    timers.schedule(&a);
    let mut b = record();
    b.action_id = Cow::Borrowed("b");
    b.lanes[0].verdict = Some(switchboard::decision::LaneVerdict {
        verdict: Verdict::Approve,
        approver: "fran".into(),
        decided_at: t(0),
        comment: None,
    });
    b.lanes[1].sla_due = t(4);
    timers.schedule(&b);
    assert_eq!(timers.len(), 3, "decided lanes are not scheduled");
    assert_eq!(timers.next_due(), Some(t(3)));
    assert!(timers.pop_due(t(2)).is_none());
    let order: Vec<(DateTime<Utc>, String, usize)> = std::iter::from_fn(|| timers.pop_due(t(10)))
        .map(|timer| (timer.due, timer.action_id.to_string(), timer.lane))
        .collect();
    assert_eq!(
        order,
        vec![
            (t(3), "a-1".to_string(), 1),
            (t(4), "b".to_string(), 1),
            (t(5), "a-1".to_string(), 0)
        ]
    );
    // An entry that no longer matches its record is recognised as stale.
    let sla = |due: i64, lane: usize| Timer {
        due: t(due),
        action_id: "a-1".into(),
        lane,
        kind: TimerKind::Sla,
    };
    assert!(escalation::is_current(&a, &sla(5, 0), t(5)));
    assert!(!escalation::is_current(&a, &sla(4, 0), t(5)));
    assert!(!escalation::is_current(&b, &sla(0, 0), t(5)));
}

#[test]
fn reminders_fall_at_their_share_of_each_step() {
    use switchboard::matrix::Percent;
    let p80 = Percent::new(80).unwrap();
    assert_eq!(p80.of_window(t(0), t(10)), Some(t(8)));
    assert_eq!(
        p80.of_window(t(10), t(10)),
        None,
        "an empty window has no reminder"
    );
    assert_eq!(Percent::new(0), None);
    assert_eq!(Percent::new(100), None);

    // A step fired at t(2) with a 2 s SLA is reminded at 80 % of it.
    let m = matrix();
    let one = escalation::fire(&record(), 0, &m, t(2)).expect("its packets parse");
    assert_eq!(one.record.lanes[0].sla_due, t(4));
    assert_eq!(
        one.record.lanes[0].remind_at,
        Some(t(2) + TimeDelta::milliseconds(1600))
    );
}

#[test]
fn a_reminder_resends_the_current_step_once() {
    let m = matrix();
    let mut r = escalation::fire(&record(), 0, &m, t(2))
        .expect("its packets parse")
        .record;
    let at = r.lanes[0].remind_at.expect("the step has a reminder");
    let timer = Timer {
        due: at,
        action_id: "a-1".into(),
        lane: 0,
        kind: TimerKind::Remind,
    };
    assert!(escalation::is_current(&r, &timer, at));
    let reminded = escalation::remind(&r, 0, at).expect("its packets parse");
    let (topic, packet) = &reminded.packets[0];
    assert_eq!(topic, "approvals.finance", "the same lane's topic as the step");
    assert!(packet.reminder);
    assert_eq!(
        packet.escalation_level,
        Some(1),
        "the step's level, not a new one"
    );
    assert_eq!(packet.assignee.as_deref(), Some("finance-lead"));
    assert_eq!(packet.sla_due, Some(t(4)));
    assert_eq!(packet.time_left_seconds, Some(0), "0.4 s left rounds down");
    assert_eq!(
        packet.decide.as_ref().unwrap().roster.as_ref(),
        ["fiona".to_string()]
    );
    assert_eq!(reminded.reminded.as_deref(), Some("finance"));
    assert!(reminded.escalation.is_none() && reminded.outcome.is_none());
    assert_eq!(reminded.record.revision, r.revision + 1);
    assert!(
        !escalation::is_current(&reminded.record, &timer, at),
        "sent once: the record no longer has it due"
    );
    // A reminder that comes up after its SLA passed (a restart, say) is
    // dropped: the escalation goes instead.
    assert!(!escalation::is_current(&r, &timer, t(4)));
    // A decided lane gets no reminder.
    r.lanes[0].verdict = Some(switchboard::decision::LaneVerdict {
        verdict: Verdict::Approve,
        approver: "fiona".into(),
        decided_at: t(3),
        comment: None,
    });
    assert!(!escalation::is_current(&r, &timer, at));
}

#[test]
fn timers_schedule_reminders_beside_slas() {
    let mut r = record();
    r.lanes[0].remind_at = Some(t(1));
    let mut timers = Timers::default();
    timers.schedule(&r);
    assert_eq!(timers.len(), 3);
    let first = timers.pop_due(t(10)).unwrap();
    assert_eq!((first.due, first.lane, first.kind), (t(1), 0, TimerKind::Remind));
}

#[test]
fn decisions_decode_from_json_and_framed_avro() {
    use switchboard::decode::{SchemaDir, encode_json_as_avro, frame};
    let schemas = SchemaDir::bundled();
    let json = serde_json::json!({"action_id": "a-1", "lane": "finance", "verdict": "needs_context",
        "approver": "fran", "comment": "which account?", "decided_at": "2026-03-01T10:00:01Z"});
    let from_json = Decision::decode(json.to_string().as_bytes(), &schemas).unwrap();
    assert_eq!(from_json.verdict, Verdict::NeedsContext);
    assert_eq!(from_json.decided_at, t(1));
    let schema = apache_avro::Schema::parse_str(include_str!("../schemas/decision.avsc")).unwrap();
    let avro = frame(2, &encode_json_as_avro(&schema, &json).unwrap());
    assert_eq!(Decision::decode(&avro, &schemas).unwrap(), from_json);
    // Not decisions: refused with a reason, never a panic.
    for bad in [
        &b"not json"[..],
        br#"{"action_id":"a","lane":"l","verdict":"maybe","approver":"x","decided_at":"2026-03-01T10:00:01Z"}"#,
        br#"{"action_id":"a","lane":"l","verdict":"approve","approver":" ","decided_at":"2026-03-01T10:00:01Z"}"#,
        br#"{"action_id":"a","lane":"l","verdict":"approve","approver":"x"}"#,
        &[0, 0, 0, 0, 9, 1, 2][..],
        &[0, 0][..],
    ] {
        assert!(Decision::decode(bad, &schemas).is_err(), "{bad:?}");
    }
}
