//! Escalation: the state machine of one pending approval, as pure functions.
//!
//! Given the current [`PendingRecord`], a decision or a due SLA produces the
//! next record plus what to publish: an escalated packet on the next step's
//! lane topic, and, when the approval ends, its [`Outcome`]. The escalation
//! stage only feeds these functions from Kafka and writes what they return,
//! so every rule here (who may decide, what closes an approval, how a chain
//! ends) is tested without a broker.
//!
//! Fail closed: when the last step of a chain passes its SLA, or the lane no
//! longer exists in the live matrix, the outcome is `expired`.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use crate::decision::{Decision, LaneVerdict, Outcome, OutcomeKind, Verdict};
use crate::matrix::{Field, Matrix};
use crate::ordered::Ordered;
use crate::packet::OwnedApprovalRequest;
use crate::pending::{HeldPacket, LaneState, OwnedPendingRecord, Status};

/// What a decision or a timer changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Effects {
    /// The next state, to write to the changelog.
    pub record: OwnedPendingRecord,
    /// Escalated packets: (topic, packet).
    pub packets: Vec<(String, OwnedApprovalRequest)>,
    pub outcome: Option<Outcome<'static>>,
    /// (from role, to role) for `escalations_total`.
    pub escalation: Option<(String, String)>,
    /// The lane reminded, for `reminders_total`.
    pub reminded: Option<String>,
}

/// A level-0 packet that no longer parses, found when a step's packet is to
/// be built from it: the approval is left as it is and the error logged, as
/// for a held record that does not parse at all.
#[derive(Debug, thiserror::Error)]
#[error("the level-0 packet of lane {lane} does not parse: {source}")]
pub struct UnreadablePacket {
    pub lane: String,
    #[source]
    pub source: serde_json::Error,
}

/// Why a decision was refused; the label of `decisions_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a Decision at all.
    Malformed,
    /// No approval is pending for the action (unknown, or already closed).
    NotPending,
    /// The action is not pending on that lane.
    WrongLane,
    /// That lane has already decided.
    AlreadyDecided,
    /// The approver is not on the roster of the lane's current step.
    NotOnRoster,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::Malformed,
        Refusal::NotPending,
        Refusal::WrongLane,
        Refusal::AlreadyDecided,
        Refusal::NotOnRoster,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::NotPending => "not_pending",
            Refusal::WrongLane => "wrong_lane",
            Refusal::AlreadyDecided => "already_decided",
            Refusal::NotOnRoster => "not_on_roster",
        }
    }
}

/// Applies a decision to a pending record, or says why it may not.
pub fn decide(
    record: &OwnedPendingRecord,
    decision: &Decision,
    now: DateTime<Utc>,
) -> Result<Effects, Refusal> {
    if record.status != Status::Open {
        return Err(Refusal::NotPending);
    }
    let index = record
        .lanes
        .iter()
        .position(|l| l.lane == decision.lane)
        .ok_or(Refusal::WrongLane)?;
    let lane = &record.lanes[index];
    if lane.verdict.is_some() {
        return Err(Refusal::AlreadyDecided);
    }
    if !lane.may_decide(&decision.approver) {
        return Err(Refusal::NotOnRoster);
    }
    let mut next = record.clone();
    next.revision += 1;
    next.lanes[index].verdict = Some(LaneVerdict {
        verdict: decision.verdict,
        approver: decision.approver.clone(),
        decided_at: decision.decided_at,
        comment: decision.comment.clone(),
    });
    let ends = match decision.verdict {
        Verdict::Reject => Some(OutcomeKind::Rejected),
        Verdict::NeedsContext => Some(OutcomeKind::NeedsContext),
        Verdict::Approve if next.lanes.iter().all(|l| l.verdict.is_some()) => Some(OutcomeKind::Approved),
        Verdict::Approve => None,
    };
    let outcome = ends.map(|kind| close(&mut next, kind, None, now));
    Ok(Effects {
        record: next,
        packets: Vec::new(),
        outcome,
        escalation: None,
        reminded: None,
    })
}

/// The SLA of lane `index` passed without a decision: ask the next step of
/// its chain, or end the approval as expired when there is none.
pub fn fire(
    record: &OwnedPendingRecord,
    index: usize,
    matrix: &Matrix,
    now: DateTime<Utc>,
) -> Result<Effects, UnreadablePacket> {
    let mut next = record.clone();
    next.revision += 1;
    let state = &record.lanes[index];
    let step = matrix
        .lane(&state.lane)
        .and_then(|lane| matrix.chain(lane).get(state.level as usize));
    let (Some(step), Some(packet)) = (step, record.packets.get(index)) else {
        let outcome = close(&mut next, OutcomeKind::Expired, Some(state.lane.to_string()), now);
        return Ok(Effects {
            record: next,
            packets: Vec::new(),
            outcome: Some(outcome),
            escalation: None,
            reminded: None,
        });
    };
    let packet = parse(packet, state)?;
    let assignee = step
        .from
        .as_ref()
        .and_then(|field| resolve(field, &packet))
        .unwrap_or_else(|| step.assignee.clone());
    let sla_due = TimeDelta::from_std(step.sla)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let topic = matrix.lanes[step.lane].topic.clone();
    let mut roster = step.roster.clone();
    if assignee != step.assignee && !roster.contains(&assignee) {
        roster.push(assignee.clone());
    }
    next.lanes[index] = LaneState {
        lane: state.lane.clone(),
        level: state.level + 1,
        role: Cow::Owned(step.assignee.clone()),
        assignee: Cow::Owned(assignee),
        roster: Cow::Owned(roster),
        topic: Cow::Owned(topic.clone()),
        sla_due,
        remind_at: step.remind.and_then(|share| share.of_window(now, sla_due)),
        verdict: None,
    };
    let escalated = step_packet(packet, &next.lanes[index], now);
    Ok(Effects {
        escalation: Some((state.role.to_string(), step.assignee.clone())),
        record: next,
        packets: vec![(topic, escalated)],
        outcome: None,
        reminded: None,
    })
}

fn parse(packet: &HeldPacket, state: &LaneState<'_>) -> Result<OwnedApprovalRequest, UnreadablePacket> {
    packet.parse().map_err(|source| UnreadablePacket {
        lane: state.lane.to_string(),
        source,
    })
}

/// Most of lane `index`'s step SLA passed without a decision: send the
/// step's packet again to the same assignee, marked as a reminder, once.
pub fn remind(
    record: &OwnedPendingRecord,
    index: usize,
    now: DateTime<Utc>,
) -> Result<Effects, UnreadablePacket> {
    let mut next = record.clone();
    next.revision += 1;
    next.lanes[index].remind_at = None;
    let state = &record.lanes[index];
    let packets = match record.packets.get(index) {
        Some(packet) => {
            let mut reminder = step_packet(parse(packet, state)?, state, now);
            reminder.reminder = true;
            reminder.time_left_seconds = Some((state.sla_due - now).num_seconds().max(0));
            vec![(state.topic.to_string(), reminder)]
        }
        None => Vec::new(),
    };
    Ok(Effects {
        record: next,
        packets,
        outcome: None,
        escalation: None,
        reminded: Some(state.lane.to_string()),
    })
}

/// The packet of a lane's current step: its level-0 packet with the step's
/// level, assignee, due time and roster.
fn step_packet(
    packet: OwnedApprovalRequest,
    state: &LaneState<'_>,
    now: DateTime<Utc>,
) -> OwnedApprovalRequest {
    let mut out = packet;
    out.escalation_level = Some(state.level);
    out.assignee = Some(Cow::Owned(state.assignee.to_string()));
    out.sla_due = Some(state.sla_due);
    out.routed_at = now;
    if let Some(decide) = out.decide.as_mut() {
        decide.roster = Cow::Owned(state.roster.to_vec());
    }
    out
}

/// Ends an allowed action: its outcome is `approved` with no verdicts.
pub fn allow(record: &OwnedPendingRecord, now: DateTime<Utc>) -> Effects {
    let mut next = record.clone();
    next.revision += 1;
    let outcome = close(&mut next, OutcomeKind::Approved, None, now);
    Effects {
        record: next,
        packets: Vec::new(),
        outcome: Some(outcome),
        escalation: None,
        reminded: None,
    }
}

/// Marks the record closed (dropping the packets, which are no longer
/// needed) and builds the outcome.
fn close(
    record: &mut OwnedPendingRecord,
    kind: OutcomeKind,
    expired_lane: Option<String>,
    now: DateTime<Utc>,
) -> Outcome<'static> {
    record.status = Status::Closed;
    record.outcome = Some(kind);
    record.closed_at = Some(now);
    record.packets.clear();
    Outcome {
        action_id: record.action_id.clone(),
        outcome: kind,
        verdicts: Ordered(
            record
                .lanes
                .iter()
                .filter_map(|l| l.verdict.clone().map(|v| (l.lane.clone(), v)))
                .collect(),
        ),
        matrix_version: record.matrix_version.clone(),
        closed_at: now,
        expired_lane: expired_lane.map(Cow::Owned),
    }
}

/// Who a step's `from` names, found in what enrichment added to the packet.
fn resolve(field: &Field, packet: &OwnedApprovalRequest) -> Option<String> {
    match field {
        Field::Enrichment { table, field } => packet
            .enrichment
            .get(table)
            .and_then(|record| record.get(field))
            .filter(|v| !v.trim().is_empty())
            .cloned(),
        _ => None,
    }
}

/// What a timer does when it comes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// Re-send the step's packet as a reminder.
    Remind,
    /// The step's SLA passed: escalate or expire.
    Sla,
    /// A closed action's retention passed: tombstone its pending record.
    Purge,
}

/// One entry of the timer queue; ordered by due time first. The action id
/// is the held approval's own shared copy, so an entry costs no allocation
/// of its own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    pub due: DateTime<Utc>,
    pub action_id: Arc<str>,
    /// Index of the lane in the record.
    pub lane: usize,
    pub kind: TimerKind,
}

impl Timer {
    /// The SLA and the reminder of every undecided lane of an open
    /// approval, given each lane's clock in lane order.
    pub fn of_clocks<'a>(
        action_id: &'a Arc<str>,
        clocks: impl Iterator<Item = LaneClock> + 'a,
    ) -> impl Iterator<Item = Timer> + 'a {
        clocks
            .enumerate()
            .filter(|(_, clock)| !clock.decided)
            .flat_map(move |(lane, clock)| {
                let timer = move |due, kind| Timer {
                    due,
                    action_id: action_id.clone(),
                    lane,
                    kind,
                };
                std::iter::once(timer(clock.sla_due, TimerKind::Sla))
                    .chain(clock.remind_at.map(|at| timer(at, TimerKind::Remind)))
            })
    }

    /// The tombstone of a closed action's record.
    pub fn purge(action_id: &Arc<str>, at: DateTime<Utc>) -> Timer {
        Timer {
            due: at,
            action_id: action_id.clone(),
            lane: 0,
            kind: TimerKind::Purge,
        }
    }
}

/// Built from many entries at once: sorted, then the tree is built in one
/// pass.
impl FromIterator<Timer> for Timers {
    fn from_iter<I: IntoIterator<Item = Timer>>(entries: I) -> Timers {
        Timers {
            queue: entries.into_iter().collect(),
        }
    }
}

/// Due reminders and SLAs of pending lanes, ordered by time, so firing what
/// is due never scans all state. An entry that no longer matches its record
/// (the lane decided or moved on) is skipped when it comes up
/// ([`is_current`]).
#[derive(Debug, Default)]
pub struct Timers {
    queue: BTreeSet<Timer>,
}

impl Timers {
    /// Schedules the SLA and the reminder of every undecided lane of an
    /// open record.
    pub fn schedule(&mut self, record: &OwnedPendingRecord) {
        if record.status != Status::Open {
            return;
        }
        let id: Arc<str> = Arc::from(&*record.action_id);
        self.schedule_clocks(&id, record.lanes.iter().map(LaneClock::of));
    }

    /// Schedules the SLA and the reminder of every undecided lane of an
    /// open approval, given each lane's clock in lane order.
    pub fn schedule_clocks(&mut self, action_id: &Arc<str>, clocks: impl Iterator<Item = LaneClock>) {
        self.queue.extend(Timer::of_clocks(action_id, clocks));
    }

    /// Schedules the tombstone of a closed action's record.
    pub fn schedule_purge(&mut self, action_id: &Arc<str>, at: DateTime<Utc>) {
        self.queue.insert(Timer::purge(action_id, at));
    }

    /// Moves every entry of `other` here, in time linear in both (a
    /// restored partition's timers join in one step, where inserting a
    /// million one by one took seconds).
    pub fn append(&mut self, other: &mut Timers) {
        self.queue.append(&mut other.queue);
    }

    /// Removes and returns the next entry due at or before `now`.
    pub fn pop_due(&mut self, now: DateTime<Utc>) -> Option<Timer> {
        match self.queue.first() {
            Some(timer) if timer.due <= now => self.queue.pop_first(),
            _ => None,
        }
    }

    /// When the next timer is due.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.queue.first().map(|t| t.due)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Drops every entry (a partition was revoked).
    pub fn clear(&mut self) {
        self.queue.clear();
    }
}

/// Whether a popped reminder or SLA timer still describes the record at
/// `now`: the record open, the lane undecided, and its due time unchanged.
/// A reminder whose SLA has passed too is stale: the escalation says more
/// than it would. (Purges are checked against the closed actions held.)
pub fn is_current(record: &OwnedPendingRecord, timer: &Timer, now: DateTime<Utc>) -> bool {
    clock_is_current(
        record.status == Status::Open,
        record.lanes.get(timer.lane).map(LaneClock::of),
        timer,
        now,
    )
}

/// What the timers of one lane depend on: enough to tell a current timer
/// from a stale one without the rest of the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneClock {
    pub sla_due: DateTime<Utc>,
    pub remind_at: Option<DateTime<Utc>>,
    pub decided: bool,
}

impl LaneClock {
    pub fn of(lane: &LaneState<'_>) -> LaneClock {
        LaneClock {
            sla_due: lane.sla_due,
            remind_at: lane.remind_at,
            decided: lane.verdict.is_some(),
        }
    }
}

/// [`is_current`] for an approval that is `open` or not, whose timer's lane
/// has `clock` (`None`: no such lane).
pub fn clock_is_current(open: bool, clock: Option<LaneClock>, timer: &Timer, now: DateTime<Utc>) -> bool {
    open && clock.is_some_and(|l| {
        !l.decided
            && match timer.kind {
                TimerKind::Sla => l.sla_due == timer.due,
                TimerKind::Remind => l.remind_at == Some(timer.due) && l.sla_due > now,
                TimerKind::Purge => false,
            }
    })
}

/// When a closed action's record is tombstoned.
pub fn purge_at(closed_at: DateTime<Utc>, retention: std::time::Duration) -> DateTime<Utc> {
    TimeDelta::from_std(retention)
        .ok()
        .and_then(|r| closed_at.checked_add_signed(r))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}
