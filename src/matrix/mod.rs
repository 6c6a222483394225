//! The matrix: lanes, the rules that send actions to them, what each lane's
//! packet must carry, and how each lane escalates.
//!
//! A matrix is loaded from YAML ([`load`]), validated completely before it can
//! serve, and then immutable: a reload builds a new one and swaps it in whole,
//! so every event is routed by exactly one [`Matrix::version`].

mod cases;
mod condition;
mod field;
mod load;
mod yaml;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

pub use cases::{CaseFailure, CaseReport, TestCase};
pub use condition::{Cmp, Condition, Matcher, Pattern};
pub use field::{Builtin, Field, FieldType, Val, decimal_text};
pub use load::{MatrixError, parse_duration};
pub use yaml::Pos;

/// Index of a lane in [`Matrix::lanes`]; lanes keep the file's order, which is
/// the order they are reported in.
pub type LaneId = usize;
/// Index of a rule in [`Matrix::rules`].
pub type RuleId = usize;

#[derive(Debug, Clone)]
pub struct Matrix {
    /// `sha256:` of the canonical policy (everything but `tests`), stamped on
    /// every packet so a decision can be traced to the rules that made it.
    pub version: String,
    /// Where the matrix came from, for messages.
    pub source: String,
    pub lanes: Vec<Lane>,
    pub rules: Vec<Rule>,
    pub directory: Vec<DirectoryTable>,
    pub tests: Vec<TestCase>,
}

#[derive(Debug, Clone)]
pub struct Lane {
    pub name: String,
    /// The topic this lane's packets are written to.
    pub topic: String,
    /// How long the lane's own owner has to decide.
    pub sla: Duration,
    /// The role asked at escalation level 0.
    pub owner: String,
    /// Who may decide at level 0.
    pub roster: Vec<String>,
    /// When the owner gets a reminder, as a share of the SLA; `None` for
    /// never. Steps without their own setting inherit it.
    pub remind: Option<Percent>,
    /// Fields the packet must carry; absent ones are listed as missing.
    pub context: Vec<ContextItem>,
    /// Fields the packet carries when present, never reported missing.
    pub optional_context: Vec<ContextItem>,
    /// Fallback steps after the owner, each with every default resolved.
    pub escalation: Vec<Step>,
}

/// One fallback step: who is asked next when the previous step's SLA passes.
#[derive(Debug, Clone)]
pub struct Step {
    /// The lane whose topic carries the escalated packet.
    pub lane: LaneId,
    /// The role asked; shown when `from` resolves to nobody.
    pub assignee: String,
    /// Where to find the person for this role, e.g. `enrichment.accounts.lead`.
    pub from: Option<Field>,
    /// Who may decide at this step (the resolved assignee may too).
    pub roster: Vec<String>,
    pub sla: Duration,
    /// When this step's assignee is reminded, as a share of its SLA.
    pub remind: Option<Percent>,
}

/// A reminder goes out at this share of a step's SLA unless the matrix says
/// otherwise: late enough not to nag, early enough to act on.
pub const DEFAULT_REMIND: Percent = Percent(80);

/// A share from 1 % to 99 %: a reminder at 0 % would double the packet and
/// one at 100 % would arrive with the escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(u8);

impl Percent {
    pub fn new(n: u8) -> Option<Percent> {
        (1..=99).contains(&n).then_some(Percent(n))
    }

    pub fn get(self) -> u8 {
        self.0
    }

    /// The moment this share of the window from `start` to `due` has passed,
    /// or `None` when the window is empty.
    pub fn of_window(self, start: DateTime<Utc>, due: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let window = i128::from((due - start).num_milliseconds());
        if window <= 0 {
            return None;
        }
        let offset = i64::try_from(window * i128::from(self.0) / 100).ok()?;
        start.checked_add_signed(TimeDelta::milliseconds(offset))
    }
}

#[derive(Debug, Clone)]
pub struct ContextItem {
    /// The key in the packet's `context` and in `missing_context`.
    pub name: String,
    pub source: ContextSource,
}

#[derive(Debug, Clone)]
pub enum ContextSource {
    /// The first of these fields that is present.
    Fields(Vec<Field>),
    /// A fixed value from the policy itself, such as a threshold.
    Value(String),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub lane: LaneId,
    pub when: Condition,
    /// Fires only when no rule of another lane fired ("send uncertainty to a
    /// manager only when no specialist owns the risk").
    pub only_when_no_other_lane: bool,
    pub pos: Pos,
}

/// A reference table joined onto actions (see [`crate::enrich`]).
#[derive(Debug, Clone)]
pub struct DirectoryTable {
    pub name: String,
    /// The compacted topic that feeds it.
    pub topic: String,
    /// The action field whose value is the table's key.
    pub key: Field,
}

impl Matrix {
    /// Loads and validates a matrix file.
    pub fn load(path: &std::path::Path) -> Result<Matrix, MatrixError> {
        load::load_file(path)
    }

    /// Parses and validates matrix text; `source` names it in messages.
    pub fn parse(text: &str, source: &str) -> Result<Matrix, MatrixError> {
        load::load_str(text, source)
    }

    pub fn lane(&self, name: &str) -> Option<LaneId> {
        self.lanes.iter().position(|l| l.name == name)
    }

    /// The fallback chain of a lane: its escalation steps, then those of the
    /// lane it continues into, if any. Level `n` (n ≥ 1) is `chain[n - 1]`.
    pub fn chain(&self, lane: LaneId) -> &[Step] {
        &self.lanes[lane].escalation
    }

    /// Runs the test cases written in the matrix.
    pub fn run_tests(&self) -> CaseReport {
        cases::run(self)
    }
}
