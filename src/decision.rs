//! Decisions and outcomes: what lane consumers answer and what agents wait on.
//!
//! A Decision arrives on `approvals.decisions` as JSON or as Confluent-framed
//! Avro (`schemas/decision.avsc`); it is only parsed and checked for shape
//! here. Whether it may change anything (pending, on that lane, from someone
//! on the roster, not a second verdict) is the escalation state machine's
//! call ([`crate::escalation`]).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::decode::SchemaSource;
use crate::ordered::Ordered;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Reject,
    NeedsContext,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Approve => "approve",
            Verdict::Reject => "reject",
            Verdict::NeedsContext => "needs_context",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    pub action_id: String,
    pub lane: String,
    pub verdict: Verdict,
    pub approver: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// RFC 3339, read strictly: chrono's own parser also takes years
    /// beyond 0000–9999 (`+10000-…`, or `-5219-…` from an Avro
    /// timestamp-millis), which the outcome would then carry to agents
    /// whose RFC 3339 parsers refuse it.
    #[serde(deserialize_with = "rfc3339")]
    pub decided_at: DateTime<Utc>,
}

fn rfc3339<'de, D: serde::Deserializer<'de>>(de: D) -> Result<DateTime<Utc>, D::Error> {
    let text = Cow::<'de, str>::deserialize(de)?;
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 timestamp ({e})")))
}

/// The longest approver name accepted, in bytes.
pub const MAX_APPROVER_BYTES: usize = 256;
/// The longest comment accepted, in bytes: a decision's comment is carried
/// in every later revision of the approval's changelog record and in its
/// outcome, so it is a note, not a document.
pub const MAX_COMMENT_BYTES: usize = 4096;

/// Why a decision record is not a Decision at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedDecision(pub String);

impl Decision {
    /// Parses a decision record (JSON, or Avro with Confluent framing).
    pub fn decode(bytes: &[u8], schemas: &dyn SchemaSource) -> Result<Decision, MalformedDecision> {
        let decision: Decision = match bytes.first() {
            Some(0) => {
                let [0, a, b, c, d, body @ ..] = bytes else {
                    return Err(MalformedDecision("Confluent framing needs 5 bytes".into()));
                };
                let id = u32::from_be_bytes([*a, *b, *c, *d]);
                let schema = schemas
                    .schema(id)
                    .map_err(|e| MalformedDecision(format!("schema id {id}: {e}")))?;
                let json = crate::decode::avro_to_json(id, &schema, body)
                    .map_err(|e| MalformedDecision(e.to_string()))?;
                serde_json::from_value(json).map_err(|e| MalformedDecision(e.to_string()))?
            }
            _ => serde_json::from_slice(bytes).map_err(|e| MalformedDecision(e.to_string()))?,
        };
        for (field, value) in [
            ("action_id", &decision.action_id),
            ("lane", &decision.lane),
            ("approver", &decision.approver),
        ] {
            if value.trim().is_empty() {
                return Err(MalformedDecision(format!("{field}: must not be empty")));
            }
        }
        for (field, value, max) in [
            ("approver", decision.approver.as_str(), MAX_APPROVER_BYTES),
            (
                "comment",
                decision.comment.as_deref().unwrap_or(""),
                MAX_COMMENT_BYTES,
            ),
        ] {
            if value.len() > max {
                return Err(MalformedDecision(format!(
                    "{field}: {} bytes, over the {max}-byte limit",
                    value.len()
                )));
            }
        }
        Ok(decision)
    }
}

/// How an approval ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Approved,
    Rejected,
    NeedsContext,
    /// The fallback chain ran out: agents must treat it as a rejection.
    Expired,
}

/// One lane's verdict in an outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneVerdict {
    pub verdict: Verdict,
    pub approver: String,
    #[serde(serialize_with = "crate::rfc3339::serialize")]
    pub decided_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// The record on `approvals.outcomes` an agent waits on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome<'a> {
    pub action_id: Cow<'a, str>,
    pub outcome: OutcomeKind,
    /// Lane → verdict, for the lanes that decided.
    pub verdicts: Ordered<Cow<'a, str>, LaneVerdict>,
    pub matrix_version: Cow<'a, str>,
    #[serde(serialize_with = "crate::rfc3339::serialize")]
    pub closed_at: DateTime<Utc>,
    /// For `expired`: the lane whose chain ran out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_lane: Option<Cow<'a, str>>,
}
