//! Test cases written inside the matrix, run by `switchboard check`.
//!
//! A policy owner states, next to the rules, what must happen to a concrete
//! action. Each case goes through the real decoder, enrichment and router, so
//! a passing `check` means the running service routes those actions the same
//! way.

use std::collections::{BTreeMap, BTreeSet};

use super::{Matrix, Pos};
use crate::decode::Decoder;
use crate::enrich::Enrichment;
use crate::packet;
use crate::route::route;

#[derive(Debug, Clone)]
pub struct TestCase {
    pub name: String,
    pub pos: Pos,
    /// The event in its JSON form, required fields defaulted.
    pub event_json: String,
    /// The directory records the case assumes were found.
    pub enrichment: Enrichment,
    /// The lanes the event must reach; empty means "allowed without review".
    pub lanes: Vec<String>,
    /// When given, exactly the rules that must fire.
    pub rules: Option<Vec<String>>,
    /// When given, lane → exactly the context fields reported missing.
    pub missing_context: Option<BTreeMap<String, Vec<String>>>,
}

#[derive(Debug, Clone, Default)]
pub struct CaseReport {
    pub passed: usize,
    pub failures: Vec<CaseFailure>,
}

#[derive(Debug, Clone)]
pub struct CaseFailure {
    pub name: String,
    pub pos: Pos,
    pub problem: String,
}

pub(super) fn run(matrix: &Matrix) -> CaseReport {
    let decoder = Decoder::bundled();
    let mut report = CaseReport::default();
    for case in &matrix.tests {
        match check(matrix, &decoder, case) {
            Ok(()) => report.passed += 1,
            Err(problem) => report.failures.push(CaseFailure {
                name: case.name.clone(),
                pos: case.pos,
                problem,
            }),
        }
    }
    report
}

fn check(matrix: &Matrix, decoder: &Decoder, case: &TestCase) -> Result<(), String> {
    let action = decoder
        .decode(case.event_json.as_bytes())
        .map_err(|e| format!("the event is not a valid AgentAction: {e}"))?;
    let routing = route(matrix, &action, &case.enrichment);
    let got: BTreeSet<&str> = routing.lane_names(matrix).into_iter().collect();
    let want: BTreeSet<&str> = case.lanes.iter().map(String::as_str).collect();
    if got != want {
        return Err(format!(
            "expected lanes [{}], got [{}] (rules fired: [{}])",
            join(&want),
            join(&got),
            routing.rule_names(matrix).join(", ")
        ));
    }
    if let Some(rules) = &case.rules {
        let got: BTreeSet<&str> = routing.rule_names(matrix).into_iter().collect();
        let want: BTreeSet<&str> = rules.iter().map(String::as_str).collect();
        if got != want {
            return Err(format!("expected rules [{}], got [{}]", join(&want), join(&got)));
        }
    }
    if let Some(missing) = &case.missing_context {
        for (lane_name, want) in missing {
            let Some(lane) = matrix.lane(lane_name) else {
                return Err(format!("unknown lane {lane_name:?}"));
            };
            if !routing.lanes.iter().any(|h| h.lane == lane) {
                return Err(format!(
                    "missing_context names lane {lane_name:?}, which the event does not reach"
                ));
            }
            let (_, got) = packet::context(&matrix.lanes[lane], &action, &case.enrichment);
            let got: BTreeSet<&str> = got.iter().map(|c| c.as_ref()).collect();
            let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
            if got != want {
                return Err(format!(
                    "lane {lane_name}: expected missing context [{}], got [{}]",
                    join(&want),
                    join(&got)
                ));
            }
        }
    }
    Ok(())
}

fn join(set: &BTreeSet<&str>) -> String {
    set.iter().copied().collect::<Vec<_>>().join(", ")
}
