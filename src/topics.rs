//! The one place that names switchboard's topics.
//!
//! Lane topics are named by the matrix (one per lane); directory topics by the
//! matrix's `directory` tables. Everything else is here, with the defaults of
//! DESIGN.md, and every stage reads names from a [`Topics`] value so a
//! deployment can rename them all from the command line.

/// Default names from DESIGN.md.
pub const ACTIONS: &str = "agent.actions";
pub const ALLOWED: &str = "actions.allowed";
pub const DECISIONS: &str = "approvals.decisions";
pub const OUTCOMES: &str = "approvals.outcomes";
pub const PENDING: &str = "switchboard.pending";
pub const DLQ: &str = "switchboard.dlq";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Where agents publish the actions they want to take.
    pub actions: String,
    /// Actions the matrix lets through without review.
    pub allowed: String,
    /// Where lane consumers write their verdicts.
    pub decisions: String,
    /// What agents wait on: one outcome per action.
    pub outcomes: String,
    /// Compacted changelog of pending approvals, keyed by action_id.
    pub pending: String,
    /// Records that could not be handled, unchanged, with reasons in headers.
    pub dlq: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            actions: ACTIONS.into(),
            allowed: ALLOWED.into(),
            decisions: DECISIONS.into(),
            outcomes: OUTCOMES.into(),
            pending: PENDING.into(),
            dlq: DLQ.into(),
        }
    }
}
