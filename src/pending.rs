//! Pending approvals: the record the route stage leaves in the compacted
//! `switchboard.pending` changelog for every action it handles, keyed by
//! `action_id`.
//!
//! It is the hand-off to the escalation stage (what is awaited, from whom, by
//! when) and the memory that makes redelivered actions recognisable.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::packet::ApprovalRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for the review lanes.
    Open,
    /// Let through without review; the outcome is `approved`.
    Allowed,
    /// An outcome was written.
    Closed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRecord<'a> {
    pub action_id: String,
    pub status: Status,
    pub matrix_version: String,
    pub occurred_at: DateTime<Utc>,
    pub routed_at: DateTime<Utc>,
    /// One state per review lane, in lane order.
    pub lanes: Vec<LaneState>,
    /// The level-0 packet of each review lane (or the allowed packet), which
    /// escalated packets are built from.
    pub packets: Vec<ApprovalRequest<'a>>,
}

/// Where one review lane stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneState {
    pub lane: String,
    /// 0 for the lane's own owner, then 1, 2… along its chain.
    pub level: u32,
    pub sla_due: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
}
