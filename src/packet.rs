//! Packet: the ApprovalRequest a lane's specialist decides on at a glance.
//!
//! A packet carries what the lane's context list asks for, says plainly what
//! is missing, when the decision is due, and how to answer, so the approver
//! never has to reconstruct the agent's run. Building one is pure: the route
//! stage supplies the clock reading as `routed_at`.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::action::{AgentAction, Target};
use crate::enrich::Enrichment;
use crate::matrix::{ContextSource, Lane, Matrix, Val};
use crate::route::{LaneHit, Routing};

/// The verdicts a Decision may carry.
pub const VERDICTS: &[&str] = &["approve", "reject", "needs_context"];

/// One lane's approval request (or, with `review: false`, the record of an
/// action let through). Field names are the contract of DESIGN.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub action_id: String,
    pub review: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// Every lane that must approve this action, so each approver sees who else is asked.
    pub review_lanes: Vec<String>,
    /// The rules that fired for this lane.
    pub rules: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation_level: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_due: Option<DateTime<Utc>>,
    pub context: BTreeMap<String, Json>,
    pub missing_context: Vec<String>,
    pub summary: String,
    pub kind: String,
    pub agent_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub target: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub enrichment: Enrichment,
    pub matrix_version: String,
    pub routed_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decide: Option<Decide>,
}

/// How a lane consumer answers: write a Decision with these fields, keyed by
/// `key`, to `topic`, as one of `roster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decide {
    pub topic: String,
    pub key: String,
    pub lane: String,
    pub verdicts: Vec<String>,
    pub roster: Vec<String>,
    pub fields: Vec<String>,
}

/// Everything a packet is built from besides the lane.
pub struct PacketInput<'a> {
    pub matrix: &'a Matrix,
    pub action: &'a AgentAction,
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
pub fn context(
    lane: &Lane,
    action: &AgentAction,
    enrichment: &Enrichment,
) -> (BTreeMap<String, Json>, Vec<String>) {
    let mut present = BTreeMap::new();
    let mut missing = Vec::new();
    let resolve = |source: &ContextSource| -> Option<Json> {
        match source {
            ContextSource::Value(v) => Some(Json::String(v.clone())),
            ContextSource::Fields(fields) => fields
                .iter()
                .map(|f| f.get(action, enrichment))
                .find(Val::is_present)
                .map(|v| v.to_json()),
        }
    };
    for item in &lane.context {
        match resolve(&item.source) {
            Some(v) => {
                present.insert(item.name.clone(), v);
            }
            None => missing.push(item.name.clone()),
        }
    }
    for item in &lane.optional_context {
        if let Some(v) = resolve(&item.source) {
            present.insert(item.name.clone(), v);
        }
    }
    (present, missing)
}

/// The level-0 packet for one lane the action reached.
pub fn for_lane(input: &PacketInput<'_>, hit: &LaneHit) -> ApprovalRequest {
    let lane = &input.matrix.lanes[hit.lane];
    let (context, missing_context) = context(lane, input.action, input.enrichment);
    let mut packet = base(input, context, missing_context);
    packet.review = true;
    packet.lane = Some(lane.name.clone());
    packet.rules = hit
        .rules
        .iter()
        .map(|r| input.matrix.rules[*r].name.clone())
        .collect();
    packet.escalation_level = Some(0);
    packet.assignee = Some(lane.owner.clone());
    packet.sla_due = Some(sla_due(input.action, lane.sla));
    packet.decide = Some(Decide {
        topic: input.decisions_topic.to_string(),
        key: input.action.action_id.clone(),
        lane: lane.name.clone(),
        verdicts: VERDICTS.iter().map(|v| v.to_string()).collect(),
        roster: lane.roster.clone(),
        fields: [
            "action_id",
            "lane",
            "verdict",
            "approver",
            "comment",
            "decided_at",
        ]
        .iter()
        .map(|f| f.to_string())
        .collect(),
    });
    packet
}

/// The packet for an action no lane must review (`actions.allowed`).
pub fn allowed(input: &PacketInput<'_>) -> ApprovalRequest {
    base(input, BTreeMap::new(), Vec::new())
}

fn base(
    input: &PacketInput<'_>,
    context: BTreeMap<String, Json>,
    missing_context: Vec<String>,
) -> ApprovalRequest {
    let a = input.action;
    ApprovalRequest {
        action_id: a.action_id.clone(),
        review: false,
        lane: None,
        review_lanes: input
            .routing
            .lane_names(input.matrix)
            .into_iter()
            .map(String::from)
            .collect(),
        rules: Vec::new(),
        escalation_level: None,
        assignee: None,
        sla_due: None,
        context,
        missing_context,
        summary: a.summary.clone(),
        kind: a.kind.clone(),
        agent_id: a.agent_id.clone(),
        fleet: a.fleet.clone(),
        tenant: a.tenant.clone(),
        target: a.target.clone(),
        payload: a.payload.clone(),
        reason: a.reason.clone(),
        occurred_at: a.occurred_at,
        enrichment: input.enrichment.clone(),
        matrix_version: input.matrix.version.clone(),
        routed_at: input.routed_at,
        decide: None,
    }
}
