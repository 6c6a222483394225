//! Route: which lanes must review an action, and which rules sent it there.
//!
//! Every rule is evaluated; an action goes to every lane with a rule that
//! fired (each domain risk to its owner). Rules marked
//! `only_when_no_other_lane` are evaluated after the others and fire only if
//! no other lane was reached, which is how "low confidence goes to a manager"
//! stays a last resort. The result never depends on the order of the rules.

use crate::action::AgentAction;
use crate::enrich::Enrichment;
use crate::matrix::{LaneId, Matrix, RuleId};

/// The lanes an action reached, in the matrix's lane order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub lanes: Vec<LaneHit>,
}

/// One lane an action reached and the rules (in matrix order) that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneHit {
    pub lane: LaneId,
    pub rules: Vec<RuleId>,
}

impl Routing {
    /// Whether any human must review the action.
    pub fn review(&self) -> bool {
        !self.lanes.is_empty()
    }

    pub fn lane_names<'m>(&self, matrix: &'m Matrix) -> Vec<&'m str> {
        self.lanes
            .iter()
            .map(|h| matrix.lanes[h.lane].name.as_str())
            .collect()
    }

    /// Every rule that fired, lane by lane.
    pub fn rule_names<'m>(&self, matrix: &'m Matrix) -> Vec<&'m str> {
        self.lanes
            .iter()
            .flat_map(|h| h.rules.iter().map(|r| matrix.rules[*r].name.as_str()))
            .collect()
    }
}

pub fn route(matrix: &Matrix, action: &AgentAction, enrichment: &Enrichment) -> Routing {
    let mut fired: Vec<(LaneId, RuleId)> = Vec::new();
    let mut has_fallbacks = false;
    for (id, rule) in matrix.rules.iter().enumerate() {
        if rule.only_when_no_other_lane {
            has_fallbacks = true;
        } else if rule.when.eval(action, enrichment) {
            fired.push((rule.lane, id));
        }
    }
    if has_fallbacks {
        // Judged against the primary rules only, so two fallback rules never
        // depend on each other's order.
        let primary: Vec<LaneId> = fired.iter().map(|(lane, _)| *lane).collect();
        for (id, rule) in matrix.rules.iter().enumerate() {
            if rule.only_when_no_other_lane
                && primary.iter().all(|lane| *lane == rule.lane)
                && rule.when.eval(action, enrichment)
            {
                fired.push((rule.lane, id));
            }
        }
    }
    fired.sort_unstable();
    let mut lanes: Vec<LaneHit> = Vec::new();
    for (lane, rule) in fired {
        match lanes.last_mut() {
            Some(hit) if hit.lane == lane => hit.rules.push(rule),
            _ => lanes.push(LaneHit {
                lane,
                rules: vec![rule],
            }),
        }
    }
    Routing { lanes }
}
