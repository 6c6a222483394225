//! Explain: the offline answer to "where would this action go, and why?".
//!
//! `switchboard explain` prints this for one event without touching Kafka,
//! using the same decoder, enrichment and router as the service. Its JSON
//! form is a contract (DESIGN.md); the text form is for people.

use std::fmt::Write as _;

use chrono::SecondsFormat;

use crate::action::AgentAction;
use crate::enrich::Enrichment;
use crate::matrix::Matrix;
use crate::ordered::Ordered;
use crate::packet;
use crate::route::route;

/// The explain report. Lane-keyed maps keep the matrix's lane order.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Explanation {
    pub action_id: String,
    pub review: bool,
    pub lanes: Vec<String>,
    pub rules: Vec<String>,
    pub missing_context: Ordered<String, Vec<String>>,
    pub sla_due: Ordered<String, String>,
    pub matrix_version: String,
}

pub fn explain(matrix: &Matrix, action: &AgentAction, enrichment: &Enrichment) -> Explanation {
    let routing = route(matrix, action, enrichment);
    let mut missing = Vec::new();
    let mut due = Vec::new();
    for hit in &routing.lanes {
        let lane = &matrix.lanes[hit.lane];
        let (_, absent) = packet::context(lane, action, enrichment);
        if !absent.is_empty() {
            missing.push((lane.name.clone(), absent.into_iter().map(String::from).collect()));
        }
        let at = packet::sla_due(action, lane.sla);
        due.push((lane.name.clone(), at.to_rfc3339_opts(SecondsFormat::Secs, true)));
    }
    Explanation {
        action_id: action.action_id.to_string(),
        review: routing.review(),
        lanes: routing.lane_names(matrix).into_iter().map(String::from).collect(),
        rules: routing.rule_names(matrix).into_iter().map(String::from).collect(),
        missing_context: Ordered(missing),
        sla_due: Ordered(due),
        matrix_version: matrix.version.clone(),
    }
}

impl Explanation {
    /// The readable form: one line of verdict, then one line per lane.
    pub fn to_text(&self, matrix: &Matrix) -> String {
        let mut out = String::new();
        if !self.review {
            let _ = writeln!(
                out,
                "{}: no review needed, goes to actions.allowed",
                self.action_id
            );
        } else {
            let _ = writeln!(
                out,
                "{}: needs review by {}",
                self.action_id,
                self.lanes.join(", ")
            );
        }
        for (lane_name, due) in &self.sla_due.0 {
            let Some(lane) = matrix.lane(lane_name).map(|l| &matrix.lanes[l]) else {
                continue;
            };
            let rules: Vec<&str> = matrix
                .rules
                .iter()
                .filter(|r| matrix.lanes[r.lane].name == *lane_name && self.rules.contains(&r.name))
                .map(|r| r.name.as_str())
                .collect();
            let _ = writeln!(out, "  {lane_name:<12} because {}", rules.join(", "));
            let _ = writeln!(
                out,
                "  {:<12} ask {} on {}, due {due}",
                "", lane.owner, lane.topic
            );
            if let Some((_, missing)) = self.missing_context.0.iter().find(|(l, _)| l == lane_name) {
                let _ = writeln!(out, "  {:<12} missing context: {}", "", missing.join(", "));
            }
        }
        let _ = writeln!(out, "matrix {}", self.matrix_version);
        out
    }
}
