//! Packet: the ApprovalRequest a lane's specialist decides on at a glance.
//!
//! A packet carries what the lane's context list asks for, says plainly what
//! is missing, when the decision is due, and how to answer, so the approver
//! never has to reconstruct the agent's run. Building one is pure: the route
//! stage supplies the clock reading as `routed_at`.

use std::borrow::Cow;
use std::sync::LazyLock;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::action::{AgentAction, Target};
use crate::enrich::Enrichment;
use crate::matrix::{ContextSource, Lane, Matrix, Val};
use crate::ordered::Ordered;
use crate::route::{LaneHit, Routing};

/// The verdicts a Decision may carry.
pub const VERDICTS: &[Cow<'static, str>] = &[
    Cow::Borrowed("approve"),
    Cow::Borrowed("reject"),
    Cow::Borrowed("needs_context"),
];

/// The fields of a Decision, listed in each packet's `decide`.
pub const DECISION_FIELDS: &[Cow<'static, str>] = &[
    Cow::Borrowed("action_id"),
    Cow::Borrowed("lane"),
    Cow::Borrowed("verdict"),
    Cow::Borrowed("approver"),
    Cow::Borrowed("comment"),
    Cow::Borrowed("decided_at"),
];

/// One lane's approval request (or, with `review: false`, the record of an
/// action let through). Field names are the contract of DESIGN.md.
///
/// Built packets borrow from the action and the matrix, because the route
/// stage serializes them at once and a copy per field per lane would be most
/// of its cost; deserialized packets own their data
/// ([`OwnedApprovalRequest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequest<'a> {
    pub action_id: Cow<'a, str>,
    pub review: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<Cow<'a, str>>,
    /// Every lane that must approve this action, so each approver sees who else is asked.
    pub review_lanes: Vec<Cow<'a, str>>,
    /// The rules that fired for this lane.
    pub rules: Vec<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation_level: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<Cow<'a, str>>,
    #[serde(
        serialize_with = "crate::rfc3339::option",
        deserialize_with = "crate::rfc3339::deserialize_option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sla_due: Option<DateTime<Utc>>,
    /// A second copy of a packet still undecided, sent when most of the
    /// step's SLA has passed; same action, lane and level as the first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reminder: bool,
    /// With a reminder: whole seconds left until `sla_due`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_left_seconds: Option<i64>,
    /// The lane's context fields in the matrix's order.
    pub context: Context<'a>,
    pub missing_context: Vec<Cow<'a, str>>,
    pub summary: Cow<'a, str>,
    pub kind: Cow<'a, str>,
    pub agent_id: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Cow<'a, str>>,
    pub target: Cow<'a, Target<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'a, str>>,
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub occurred_at: DateTime<Utc>,
    pub enrichment: Cow<'a, Enrichment>,
    pub matrix_version: Cow<'a, str>,
    #[serde(
        serialize_with = "crate::rfc3339::serialize",
        deserialize_with = "crate::rfc3339::deserialize"
    )]
    pub routed_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decide: Option<Decide<'a>>,
}

/// Context field name → value, in the matrix's order.
pub type Context<'a> = Ordered<Cow<'a, str>, ContextValue<'a>>;

/// A packet read back from a topic.
pub type OwnedApprovalRequest = ApprovalRequest<'static>;

/// How a lane consumer answers: write a Decision with these `fields`, keyed
/// by the action_id, to `topic`, as one of `roster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decide<'a> {
    pub topic: Cow<'a, str>,
    pub lane: Cow<'a, str>,
    #[serde(serialize_with = "verdicts_json")]
    pub verdicts: Cow<'a, [Cow<'a, str>]>,
    pub roster: Cow<'a, [String]>,
    #[serde(serialize_with = "fields_json")]
    pub fields: Cow<'a, [Cow<'a, str>]>,
}

/// `verdicts` and `fields` are the same two lists in every packet (nine
/// strings, about 4% of the route stage's instructions for a two-lane
/// action when encoded one by one), so they are written from their JSON
/// text, made once. Serializers other than the stages' see the same JSON:
/// serde_json's raw values are written as they are.
// serde's `serialize_with` hands over a reference to the field's own type.
#[allow(clippy::ptr_arg)]
fn verdicts_json<S: serde::Serializer>(list: &Cow<'_, [Cow<'_, str>]>, s: S) -> Result<S::Ok, S::Error> {
    static JSON: LazyLock<Option<Box<RawValue>>> = LazyLock::new(|| list_json(VERDICTS));
    constant_list(list, VERDICTS, JSON.as_deref(), s)
}

#[allow(clippy::ptr_arg)]
fn fields_json<S: serde::Serializer>(list: &Cow<'_, [Cow<'_, str>]>, s: S) -> Result<S::Ok, S::Error> {
    static JSON: LazyLock<Option<Box<RawValue>>> = LazyLock::new(|| list_json(DECISION_FIELDS));
    constant_list(list, DECISION_FIELDS, JSON.as_deref(), s)
}

fn constant_list<S: serde::Serializer>(
    list: &[Cow<'_, str>],
    constant: &[Cow<'static, str>],
    json: Option<&RawValue>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match json {
        Some(json) if std::ptr::eq(list, constant) || list == constant => json.serialize(s),
        _ => list.serialize(s),
    }
}

/// A list of strings always serializes; were it ever not to, packets fall
/// back to writing the list string by string.
fn list_json(list: &[Cow<'static, str>]) -> Option<Box<RawValue>> {
    serde_json::value::to_raw_value(list).ok()
}

/// A context value as an approver reads it. Money and times are text, so no
/// consumer reads an amount through a float.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ContextValue<'a> {
    Text(Cow<'a, str>),
    Count(u64),
    Bool(bool),
    List(Vec<Cow<'a, str>>),
}

impl<'a> ContextValue<'a> {
    fn from_val(v: Val<'a>) -> Option<Self> {
        Some(match v {
            Val::Absent => return None,
            Val::Text(t) => ContextValue::Text(Cow::Borrowed(t)),
            Val::Decimal(d) => ContextValue::Text(Cow::Owned(crate::matrix::decimal_text(d))),
            Val::Count(n) => ContextValue::Count(n),
            Val::Bool(b) => ContextValue::Bool(b),
            Val::List(items) => ContextValue::List(items.iter().map(|i| Cow::Borrowed(i.as_ref())).collect()),
            Val::Time(t) => ContextValue::Text(Cow::Owned(t.to_rfc3339_opts(SecondsFormat::Secs, true))),
        })
    }
}

/// Everything a packet is built from besides the lane.
pub struct PacketInput<'a> {
    pub matrix: &'a Matrix,
    pub action: &'a AgentAction<'a>,
    pub enrichment: &'a Enrichment,
    pub routing: &'a Routing,
    pub decisions_topic: &'a str,
    pub routed_at: DateTime<Utc>,
}

/// When a lane must decide: `occurred_at` + SLA, or the action's own
/// deadline when that is earlier. A deadline never extends an SLA.
pub fn sla_due(action: &AgentAction, sla: std::time::Duration) -> DateTime<Utc> {
    let by_sla = TimeDelta::from_std(sla)
        .ok()
        .and_then(|d| action.occurred_at.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    match action.signals.deadline {
        Some(deadline) if deadline < by_sla => deadline,
        _ => by_sla,
    }
}

/// The lane's context fields that are present, and the names of the required
/// ones that are not.
pub fn context<'a>(
    lane: &'a Lane,
    action: &'a AgentAction<'a>,
    enrichment: &'a Enrichment,
) -> (Context<'a>, Vec<Cow<'a, str>>) {
    let mut present = Vec::with_capacity(lane.context.len() + lane.optional_context.len());
    let mut missing = Vec::new();
    let resolve = |source: &'a ContextSource| -> Option<ContextValue<'a>> {
        match source {
            ContextSource::Value(v) => Some(ContextValue::Text(Cow::Borrowed(v))),
            ContextSource::Fields(fields) => fields
                .iter()
                .map(|f| f.get(action, enrichment))
                .find(Val::is_present)
                .and_then(ContextValue::from_val),
        }
    };
    for item in &lane.context {
        match resolve(&item.source) {
            Some(v) => present.push((Cow::Borrowed(item.name.as_str()), v)),
            None => missing.push(Cow::Borrowed(item.name.as_str())),
        }
    }
    for item in &lane.optional_context {
        if let Some(v) = resolve(&item.source) {
            present.push((Cow::Borrowed(item.name.as_str()), v));
        }
    }
    (Ordered(present), missing)
}

/// The level-0 packet for one lane the action reached.
pub fn for_lane<'a>(input: &PacketInput<'a>, hit: &LaneHit) -> ApprovalRequest<'a> {
    let matrix = input.matrix;
    let lane = &matrix.lanes[hit.lane];
    let (context, missing_context) = context(lane, input.action, input.enrichment);
    let mut packet = base(input, context, missing_context);
    packet.review = true;
    packet.lane = Some(Cow::Borrowed(&lane.name));
    packet.rules = hit
        .rules
        .iter()
        .map(|r| Cow::Borrowed(matrix.rules[*r].name.as_str()))
        .collect();
    packet.escalation_level = Some(0);
    packet.assignee = Some(Cow::Borrowed(&lane.owner));
    packet.sla_due = Some(sla_due(input.action, lane.sla));
    packet.decide = Some(Decide {
        topic: Cow::Borrowed(input.decisions_topic),
        lane: Cow::Borrowed(&lane.name),
        verdicts: Cow::Borrowed(VERDICTS),
        roster: Cow::Borrowed(&lane.roster),
        fields: Cow::Borrowed(DECISION_FIELDS),
    });
    packet
}

/// The packet for an action no lane must review (`actions.allowed`).
pub fn allowed<'a>(input: &PacketInput<'a>) -> ApprovalRequest<'a> {
    base(input, Context::default(), Vec::new())
}

fn base<'a>(
    input: &PacketInput<'a>,
    context: Context<'a>,
    missing_context: Vec<Cow<'a, str>>,
) -> ApprovalRequest<'a> {
    let a = input.action;
    let borrowed = |v: &'a Option<Cow<'a, str>>| v.as_deref().map(Cow::Borrowed);
    ApprovalRequest {
        action_id: Cow::Borrowed(&a.action_id),
        review: false,
        lane: None,
        review_lanes: input
            .routing
            .lane_names(input.matrix)
            .into_iter()
            .map(Cow::Borrowed)
            .collect(),
        rules: Vec::new(),
        escalation_level: None,
        assignee: None,
        sla_due: None,
        reminder: false,
        time_left_seconds: None,
        context,
        missing_context,
        summary: Cow::Borrowed(&a.summary),
        kind: Cow::Borrowed(&a.kind),
        agent_id: Cow::Borrowed(&a.agent_id),
        fleet: borrowed(&a.fleet),
        tenant: borrowed(&a.tenant),
        target: Cow::Borrowed(&a.target),
        payload: borrowed(&a.payload),
        reason: borrowed(&a.reason),
        occurred_at: a.occurred_at,
        enrichment: Cow::Borrowed(input.enrichment),
        matrix_version: Cow::Borrowed(&input.matrix.version),
        routed_at: input.routed_at,
        decide: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(verdicts: Vec<Cow<'static, str>>, fields: Vec<Cow<'static, str>>) -> Decide<'static> {
        Decide {
            topic: Cow::Borrowed("approvals.decisions"),
            lane: Cow::Borrowed("finance"),
            verdicts: Cow::Owned(verdicts),
            roster: Cow::Owned(vec!["fin-lead".to_string()]),
            fields: Cow::Owned(fields),
        }
    }

    /// The lists written from their made-once JSON, the same lists built
    /// by hand (as a packet read back has them), and other lists: each
    /// encoded by the stages' encoder and by serde_json, and read back.
    #[test]
    fn decide_lists_are_written_as_they_are() {
        let constant = Decide {
            verdicts: Cow::Borrowed(VERDICTS),
            fields: Cow::Borrowed(DECISION_FIELDS),
            ..decide(Vec::new(), Vec::new())
        };
        let rebuilt = decide(VERDICTS.to_vec(), DECISION_FIELDS.to_vec());
        let other = decide(
            vec![Cow::Borrowed("approve"), Cow::Borrowed("say \"no\"")],
            vec![Cow::Borrowed("action_id")],
        );
        for d in [&constant, &rebuilt, &other] {
            let ours = crate::encode::to_vec(d).expect("encodes");
            let theirs = serde_json::to_vec(d).expect("serializes");
            assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
            let back: Decide<'static> = serde_json::from_slice(&ours).expect("reads back");
            assert_eq!(&back, d);
        }
        let text = String::from_utf8(crate::encode::to_vec(&constant).expect("encodes")).expect("UTF-8");
        assert!(
            text.contains(r#""verdicts":["approve","reject","needs_context"]"#),
            "{text}"
        );
        assert!(
            text.contains(r#""fields":["action_id","lane","verdict","approver","comment","decided_at"]"#),
            "{text}"
        );
    }
}
