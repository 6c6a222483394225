//! What a lane's inbox holds, as a pure fold over the records read: the
//! packets of the lane's topic, the outcomes, and the pending changelog.
//!
//! * One entry per (action, deciding lane): a topic may carry several
//!   lanes' packets for one action (a fallback step asks another lane's
//!   owner on that lane's topic), and each is answered on its own.
//! * The newest step wins: the highest `escalation_level`, and at the same
//!   level the later record (a reminder after its step).
//! * An entry's status comes from what is known about its action: an
//!   outcome closes it; the pending changelog (the escalation stage's own
//!   state) says whether its lane has decided or escalated past this step.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::decision::{LaneVerdict, Outcome, OutcomeKind};
use crate::packet::OwnedApprovalRequest;
use crate::pending::{OwnedPendingRecord, Status as PendingStatus};

/// An entry's identity: the action and the lane that decides it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub action_id: String,
    pub lane: String,
}

/// Where an entry stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Waiting for a decision at this step.
    Waiting,
    /// This lane has decided; other lanes of the action have not.
    Decided(LaneVerdict),
    /// The step passed its SLA and the next one asks someone else.
    Escalated {
        level: u32,
        assignee: String,
        topic: String,
    },
    /// The action has its outcome.
    Closed {
        outcome: OutcomeKind,
        closed_at: Option<DateTime<Utc>>,
    },
}

impl Status {
    pub fn is_waiting(&self) -> bool {
        matches!(self, Status::Waiting)
    }

    /// The label of `inbox.status` in JSON output.
    pub fn label(&self) -> &'static str {
        match self {
            Status::Waiting => "waiting",
            Status::Decided(_) => "decided",
            Status::Escalated { .. } => "escalated",
            Status::Closed { .. } => "closed",
        }
    }
}

/// An entry as shown: its newest packet and its status. `seq` grows with
/// every packet taken, so a caller can tell a new step from one it showed.
#[derive(Debug, Clone, PartialEq)]
pub struct Item<'a> {
    pub key: &'a Key,
    pub packet: &'a OwnedApprovalRequest,
    pub seq: u64,
    pub status: Status,
}

#[derive(Default)]
pub struct Inbox {
    entries: HashMap<Key, (u64, OwnedApprovalRequest)>,
    lanes_of: HashMap<String, Vec<String>>,
    outcomes: HashMap<String, Outcome<'static>>,
    pending: HashMap<String, OwnedPendingRecord>,
    seq: u64,
}

impl Inbox {
    pub fn new() -> Inbox {
        Inbox::default()
    }

    /// Takes a packet read from the lane's topic; returns the entry it
    /// changed, if it did (an older step read late changes nothing).
    pub fn packet(&mut self, packet: OwnedApprovalRequest) -> Option<Key> {
        let lane = packet.lane.as_deref()?.to_string();
        if !packet.review {
            return None;
        }
        let key = Key {
            action_id: packet.action_id.to_string(),
            lane,
        };
        let level = packet.escalation_level.unwrap_or(0);
        if let Some((_, old)) = self.entries.get(&key)
            && old.escalation_level.unwrap_or(0) > level
        {
            return None;
        }
        self.seq += 1;
        let lanes = self.lanes_of.entry(key.action_id.clone()).or_default();
        if !lanes.contains(&key.lane) {
            lanes.push(key.lane.clone());
        }
        self.entries.insert(key.clone(), (self.seq, packet));
        Some(key)
    }

    /// Takes an outcome; returns the entries of its action.
    pub fn outcome(&mut self, outcome: Outcome<'static>) -> Vec<Key> {
        let action_id = outcome.action_id.to_string();
        match self.outcomes.get(&action_id) {
            Some(known) if known.closed_at > outcome.closed_at => {}
            _ => {
                self.outcomes.insert(action_id.clone(), outcome);
            }
        }
        self.keys_of(&action_id)
    }

    /// Takes a pending-changelog record (`None`: a tombstone); returns the
    /// entries of its action.
    pub fn pending(&mut self, action_id: &str, record: Option<OwnedPendingRecord>) -> Vec<Key> {
        match record {
            None => {
                self.pending.remove(action_id);
            }
            Some(mut record) => match self.pending.get(action_id) {
                // A replayed older revision tells nothing new.
                Some(known) if known.revision > record.revision => {}
                _ => {
                    // The level-0 packets are most of a record and the lane's
                    // topic has them; the whole changelog is held here.
                    record.packets = Vec::new();
                    self.pending.insert(action_id.to_string(), record);
                }
            },
        }
        self.keys_of(action_id)
    }

    fn keys_of(&self, action_id: &str) -> Vec<Key> {
        self.lanes_of
            .get(action_id)
            .map(|lanes| {
                lanes
                    .iter()
                    .map(|lane| Key {
                        action_id: action_id.to_string(),
                        lane: lane.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn item(&self, key: &Key) -> Option<Item<'_>> {
        let (key, (seq, packet)) = self.entries.get_key_value(key)?;
        Some(Item {
            key,
            packet,
            seq: *seq,
            status: self.status(key, packet),
        })
    }

    /// Every entry, the most urgent first (earliest due time, then action id).
    pub fn items(&self) -> Vec<Item<'_>> {
        let mut items: Vec<Item<'_>> = self.entries.keys().filter_map(|k| self.item(k)).collect();
        items.sort_by(|a, b| (a.packet.sla_due, a.key).cmp(&(b.packet.sla_due, b.key)));
        items
    }

    fn status(&self, key: &Key, packet: &OwnedApprovalRequest) -> Status {
        // An outcome closes the packets sent before it; a packet sent after
        // it belongs to the same action_id sent again once the old one was
        // forgotten (`--closed-retention`).
        if let Some(outcome) = self.outcomes.get(&key.action_id)
            && outcome.closed_at >= packet.routed_at
        {
            return Status::Closed {
                outcome: outcome.outcome,
                closed_at: Some(outcome.closed_at),
            };
        }
        let Some(record) = self.pending.get(&key.action_id) else {
            return Status::Waiting;
        };
        if record.status == PendingStatus::Closed
            && let Some(outcome) = record.outcome
        {
            return Status::Closed {
                outcome,
                closed_at: record.closed_at,
            };
        }
        let Some(lane) = record.lanes.iter().find(|l| l.lane == key.lane) else {
            return Status::Waiting;
        };
        if let Some(verdict) = &lane.verdict {
            return Status::Decided(verdict.clone());
        }
        // The changelog may lag the packets (at least once writes it last):
        // only a later step than this packet's says it moved on.
        if lane.level > packet.escalation_level.unwrap_or(0) {
            return Status::Escalated {
                level: lane.level,
                assignee: lane.assignee.to_string(),
                topic: lane.topic.to_string(),
            };
        }
        Status::Waiting
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::decision::Verdict;
    use crate::ordered::Ordered;
    use crate::pending::LaneState;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-03-01T{s}Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    pub(crate) fn packet(id: &str, lane: &str, level: u32, routed: &str) -> OwnedApprovalRequest {
        serde_json::from_value(serde_json::json!({
            "action_id": id, "review": true, "lane": lane, "review_lanes": [lane],
            "rules": ["r"], "escalation_level": level, "assignee": "someone",
            "sla_due": t("10:00:02"), "context": {}, "missing_context": [],
            "summary": "s", "kind": "refund.issue", "agent_id": "agent",
            "target": {}, "occurred_at": t("10:00:00"), "enrichment": {},
            "matrix_version": "sha256:x", "routed_at": t(routed),
        }))
        .unwrap()
    }

    fn outcome(id: &str, kind: OutcomeKind, at: &str) -> Outcome<'static> {
        Outcome {
            action_id: Cow::Owned(id.into()),
            outcome: kind,
            verdicts: Ordered::default(),
            matrix_version: Cow::Borrowed("sha256:x"),
            closed_at: t(at),
            expired_lane: None,
        }
    }

    fn record(id: &str, revision: u64, lanes: &[(&str, u32, Option<Verdict>)]) -> OwnedPendingRecord {
        OwnedPendingRecord {
            action_id: Cow::Owned(id.into()),
            status: PendingStatus::Open,
            revision,
            matrix_version: Cow::Borrowed("sha256:x"),
            occurred_at: t("10:00:00"),
            routed_at: t("10:00:00"),
            lanes: lanes
                .iter()
                .map(|(lane, level, verdict)| LaneState {
                    lane: Cow::Owned(lane.to_string()),
                    level: *level,
                    role: Cow::Borrowed("role"),
                    assignee: Cow::Borrowed("next-one"),
                    roster: Cow::Owned(vec![]),
                    topic: Cow::Borrowed("approvals.manager"),
                    sla_due: t("10:00:04"),
                    remind_at: None,
                    verdict: verdict.map(|v| LaneVerdict {
                        verdict: v,
                        approver: "fran".into(),
                        decided_at: t("10:00:01"),
                        comment: None,
                    }),
                })
                .collect(),
            packets: vec![],
            outcome: None,
            closed_at: None,
        }
    }

    fn key(id: &str, lane: &str) -> Key {
        Key {
            action_id: id.into(),
            lane: lane.into(),
        }
    }

    fn waiting(inbox: &Inbox) -> Vec<(String, String, u32, bool)> {
        inbox
            .items()
            .into_iter()
            .filter(|i| i.status.is_waiting())
            .map(|i| {
                (
                    i.key.action_id.clone(),
                    i.key.lane.clone(),
                    i.packet.escalation_level.unwrap_or(0),
                    i.packet.reminder,
                )
            })
            .collect()
    }

    #[test]
    fn the_newest_step_of_each_lane_is_shown() {
        let mut inbox = Inbox::new();
        inbox.packet(packet("a", "finance", 0, "10:00:00"));
        let mut reminder = packet("a", "finance", 0, "10:00:01");
        reminder.reminder = true;
        assert!(inbox.packet(reminder).is_some());
        assert_eq!(waiting(&inbox), vec![("a".into(), "finance".into(), 0, true)]);
        inbox.packet(packet("a", "finance", 1, "10:00:02"));
        // A level-0 packet read late (a re-send) does not bring the old step back.
        assert_eq!(inbox.packet(packet("a", "finance", 0, "10:00:00")), None);
        assert_eq!(waiting(&inbox), vec![("a".into(), "finance".into(), 1, false)]);
        // Another lane's step for the same action on this topic is its own entry.
        inbox.packet(packet("a", "manager", 0, "10:00:00"));
        assert_eq!(inbox.items().len(), 2);
        // Packets that ask nobody are not entries.
        let mut allowed = packet("b", "finance", 0, "10:00:00");
        allowed.review = false;
        assert_eq!(inbox.packet(allowed), None);
    }

    #[test]
    fn an_outcome_closes_every_lane_of_its_action() {
        let mut inbox = Inbox::new();
        inbox.packet(packet("a", "finance", 0, "10:00:00"));
        inbox.packet(packet("a", "manager", 2, "10:00:04"));
        inbox.packet(packet("b", "finance", 0, "10:00:00"));
        let touched = inbox.outcome(outcome("a", OutcomeKind::Approved, "10:00:05"));
        assert_eq!(touched, vec![key("a", "finance"), key("a", "manager")]);
        assert_eq!(waiting(&inbox), vec![("b".into(), "finance".into(), 0, false)]);
        assert_eq!(
            inbox.item(&key("a", "manager")).unwrap().status,
            Status::Closed {
                outcome: OutcomeKind::Approved,
                closed_at: Some(t("10:00:05"))
            }
        );
        // The same action_id sent again after the old one was forgotten.
        inbox.packet(packet("a", "finance", 0, "10:00:09"));
        assert!(inbox.item(&key("a", "finance")).unwrap().status.is_waiting());
    }

    #[test]
    fn the_changelog_says_a_lane_decided_or_moved_on() {
        let mut inbox = Inbox::new();
        inbox.packet(packet("a", "finance", 0, "10:00:00"));
        inbox.packet(packet("a", "customer", 0, "10:00:00"));
        inbox.pending(
            "a",
            Some(record("a", 0, &[("finance", 0, None), ("customer", 0, None)])),
        );
        assert_eq!(waiting(&inbox).len(), 2);
        inbox.pending(
            "a",
            Some(record(
                "a",
                1,
                &[("finance", 0, Some(Verdict::Approve)), ("customer", 0, None)],
            )),
        );
        assert!(matches!(
            inbox.item(&key("a", "finance")).unwrap().status,
            Status::Decided(LaneVerdict {
                verdict: Verdict::Approve,
                ..
            })
        ));
        assert!(inbox.item(&key("a", "customer")).unwrap().status.is_waiting());
        // An older revision replayed changes nothing.
        inbox.pending(
            "a",
            Some(record("a", 0, &[("finance", 0, None), ("customer", 0, None)])),
        );
        assert!(!inbox.item(&key("a", "finance")).unwrap().status.is_waiting());
        // The customer step escalated elsewhere: no longer this inbox's to answer.
        inbox.pending(
            "a",
            Some(record(
                "a",
                2,
                &[("finance", 0, Some(Verdict::Approve)), ("customer", 1, None)],
            )),
        );
        assert_eq!(
            inbox.item(&key("a", "customer")).unwrap().status,
            Status::Escalated {
                level: 1,
                assignee: "next-one".into(),
                topic: "approvals.manager".into()
            }
        );
        // A changelog that lags the packets does not hide a newer step.
        inbox.packet(packet("a", "customer", 2, "10:00:05"));
        assert!(inbox.item(&key("a", "customer")).unwrap().status.is_waiting());
        // Closed in the changelog before the outcome is read.
        let mut closed = record("a", 3, &[]);
        closed.status = PendingStatus::Closed;
        closed.outcome = Some(OutcomeKind::Expired);
        inbox.pending("a", Some(closed));
        assert!(waiting(&inbox).is_empty());
        // A tombstone forgets the record; the entries keep their packets.
        inbox.pending("a", None);
        assert_eq!(waiting(&inbox).len(), 2);
    }

    #[test]
    fn items_come_most_urgent_first() {
        let mut inbox = Inbox::new();
        let mut late = packet("a", "finance", 0, "10:00:00");
        late.sla_due = Some(t("11:00:00"));
        inbox.packet(late);
        inbox.packet(packet("c", "finance", 0, "10:00:00"));
        inbox.packet(packet("b", "finance", 0, "10:00:00"));
        let order: Vec<&str> = inbox.items().iter().map(|i| i.key.action_id.as_str()).collect();
        assert_eq!(order, vec!["b", "c", "a"]);
    }
}
