//! Pending approvals: the record kept per action in the compacted
//! `switchboard.pending` changelog, keyed by `action_id`.
//!
//! The route stage writes the first one (revision 0): what each review lane
//! must decide, who is asked, by when, and the level-0 packets escalations
//! are built from. The escalation stage writes every later state with a
//! higher revision, so a reader replaying the changelog (after a restart or
//! a rebalance) always ends on the newest state and never goes back. A
//! closed action keeps a small closed record: it is the memory that makes a
//! redelivered action recognisable.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::decision::{LaneVerdict, OutcomeKind};
use crate::packet::ApprovalRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for the review lanes.
    Open,
    /// Let through without review; the outcome `approved` is still to be written.
    Allowed,
    /// The outcome is written.
    Closed,
}

/// `P` is how packets are held: parsed ([`ApprovalRequest`], the default,
/// for whoever reads the changelog) or already encoded ([`crate::encode::Raw`], for
/// the route stage, which writes each packet to its lane anyway and so
/// embeds those bytes instead of serializing every packet twice).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRecord<'a, P = ApprovalRequest<'a>> {
    pub action_id: Cow<'a, str>,
    pub status: Status,
    /// 0 when routed; +1 with every change.
    pub revision: u64,
    pub matrix_version: Cow<'a, str>,
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub occurred_at: DateTime<Utc>,
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub routed_at: DateTime<Utc>,
    /// One state per review lane, in lane order.
    pub lanes: Vec<LaneState<'a>>,
    /// The level-0 packet of each review lane, in the same order (none for
    /// an allowed action, none once closed).
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub packets: Vec<P>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<OutcomeKind>,
    #[serde(
        serialize_with = "crate::rfc3339::option",
        deserialize_with = "crate::rfc3339::deserialize_option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub closed_at: Option<DateTime<Utc>>,
}

/// A pending record read back from the changelog, its packets as they were
/// written.
pub type OwnedPendingRecord = PendingRecord<'static, HeldPacket>;

/// A level-0 packet as a pending record read back holds it: its JSON,
/// written back as it is and parsed only when a step's packet is built from
/// it. (Parsed, a timer burst parsed and wrote again every packet of every
/// approval it touched, where a step needs one.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HeldPacket(Box<RawValue>);

impl HeldPacket {
    /// A packet as the route stage writes it.
    pub fn of(packet: &ApprovalRequest<'_>) -> Result<HeldPacket, crate::encode::EncodeError> {
        let json = crate::encode::to_vec(packet)?;
        // The encoder writes JSON, in UTF-8.
        let text = String::from_utf8(json).map_err(|e| crate::encode::EncodeError::Custom(e.to_string()))?;
        RawValue::from_string(text)
            .map(HeldPacket)
            .map_err(|e| crate::encode::EncodeError::Custom(e.to_string()))
    }

    /// The packet, parsed.
    pub fn parse(&self) -> Result<ApprovalRequest<'static>, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    pub fn json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for HeldPacket {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

/// Where one review lane stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneState<'a> {
    pub lane: Cow<'a, str>,
    /// 0 for the lane's own owner, then 1, 2… along its chain.
    pub level: u32,
    /// The role asked at this level (as the matrix names it).
    pub role: Cow<'a, str>,
    /// The person or role asked: the role, or who enrichment resolved it to.
    pub assignee: Cow<'a, str>,
    /// Who may decide at this level.
    pub roster: Cow<'a, [String]>,
    /// Where this level's packet went.
    pub topic: Cow<'a, str>,
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub sla_due: DateTime<Utc>,
    /// When this level's reminder is due; `None` once it is sent, or when
    /// the matrix asks for none or the moment had passed before the level
    /// began.
    #[serde(
        serialize_with = "crate::rfc3339::option",
        deserialize_with = "crate::rfc3339::deserialize_option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub remind_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<LaneVerdict>,
}

impl<'a> LaneState<'a> {
    /// A lane as routing opens it: level 0, asking the lane's owner.
    pub fn opened(
        lane: &'a crate::matrix::Lane,
        sla_due: DateTime<Utc>,
        remind_at: Option<DateTime<Utc>>,
    ) -> LaneState<'a> {
        LaneState {
            lane: Cow::Borrowed(&lane.name),
            level: 0,
            role: Cow::Borrowed(&lane.owner),
            assignee: Cow::Borrowed(&lane.owner),
            roster: Cow::Borrowed(&lane.roster),
            topic: Cow::Borrowed(&lane.topic),
            sla_due,
            remind_at,
            verdict: None,
        }
    }

    /// Whether `approver` may decide at this lane's current level.
    pub fn may_decide(&self, approver: &str) -> bool {
        self.roster.iter().any(|p| p == approver) || (self.assignee != self.role && self.assignee == approver)
    }
}
