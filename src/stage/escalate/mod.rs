//! The escalation stage: `switchboard.pending` + `approvals.decisions` →
//! escalated packets, `approvals.outcomes`, and the pending changelog.
//!
//! State is partitioned like the topics: an instance holds the pending
//! approvals of the `switchboard.pending` partitions it is assigned, rebuilt
//! from that partition of the changelog when it is assigned and dropped when
//! it is revoked. Decisions are co-partitioned with pending records (both
//! keyed by `action_id`, same partition count, the range assignor), so the
//! instance that holds an approval is the one that sees its decisions.
//!
//! Per batch: apply new pending records and decisions, fire the SLAs that are
//! due, and hand every output, the changelog updates and the input offsets
//! to the [`Sink`] as one unit. In-memory state changes only once that unit
//! is durable, so an aborted batch is simply done again, and a timer fires
//! exactly once however the process stops.
//!
//! Here: the loop, and what pending records and decisions change;
//! [`restore`] rebuilds a partition's state when it is assigned, and
//! [`fire`] fires the timers that fall due.

mod fire;
mod restore;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::StageContext;
use super::batch::{Input, InputRecord, next_offsets, poll_batch, rewind};
use crate::clock::Clock;
use crate::config::Config;
use crate::decision::Decision;
use crate::decode::SchemaSource;
use crate::dlq;
use crate::escalation::{self, Refusal, Timer, TimerKind, Timers};
use crate::held::{Approvals, ById, Head, Held, Store};
use crate::http::Health;
use crate::kafka::{CLOSE_LIMIT, KafkaStageError, close_consumer, escalation_consumer_config};
use crate::metrics::Metrics;
use crate::pending::{OwnedPendingRecord, Status};
use crate::reload::MatrixHandle;
use crate::sink::{Output, Sink, SinkError};

pub struct EscalateStage {
    pub config: Arc<Config>,
    pub matrix: Arc<MatrixHandle>,
    pub schemas: Arc<dyn SchemaSource>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Metrics,
    pub health: Health,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EscalateSummary {
    pub handled: u64,
    pub decisions: u64,
    pub refused: u64,
    pub escalations: u64,
    pub outcomes: u64,
}

/// The approvals this instance holds.
#[derive(Default)]
struct State {
    /// Dictionaries and lane names every held approval shares.
    store: Arc<Store>,
    /// action_id → the approval, held compactly ([`Held`]). The key is the
    /// one copy of the id, shared by the approval's timers.
    records: Approvals,
    timers: Timers,
    /// Pending partitions restored and held.
    partitions: BTreeSet<i32>,
    /// Allowed actions restored without their outcome yet.
    to_allow: Vec<Arc<str>>,
    /// Approvals closed here whose closing record has not been read back
    /// yet: action_id → (partition, closing revision). Until it is, older
    /// records of ours still on their way back must not bring the approval
    /// back to life.
    closing: ById<(i32, u64)>,
    /// Closed actions whose record is still in the changelog: action_id →
    /// (partition, closing revision, when it is tombstoned). Older records
    /// of theirs read again (the group consumer replays from its committed
    /// offset after a restore) are ignored.
    closed: ById<(i32, u64, DateTime<Utc>)>,
    /// Undecided lanes of open approvals held, per lane: kept exact by
    /// adjusting it with every change rather than counting all state.
    open: HashMap<Arc<str>, i64>,
    /// Per restored partition, the offset after the last record the restore
    /// applied. The group consumer is sought there after a restore; should
    /// the seek fail, it replays from its committed offset and skips what
    /// lies before it without parsing it again.
    restored_to: HashMap<i32, i64>,
}

impl State {
    /// Puts back a timer taken by a batch that did not become durable, if
    /// it still applies.
    fn reschedule(&mut self, timer: &Timer, now: DateTime<Utc>) {
        if timer.kind == TimerKind::Purge {
            if self.purge_is_due(timer) {
                self.timers.schedule_purge(&timer.action_id, timer.due);
            }
        } else if let Some((id, held)) = self.records.get_key_value(&timer.action_id)
            && held.is_current(timer, now)
        {
            self.timers
                .schedule_clocks(id, held.lanes.iter().map(|l| l.clock));
        }
    }

    /// Whether a purge timer still names a closed action held here.
    fn purge_is_due(&self, timer: &Timer) -> bool {
        !self.records.contains_key(&timer.action_id)
            && self
                .closed
                .get(&*timer.action_id)
                .is_some_and(|(_, _, at)| *at == timer.due)
    }

    /// Adds (`sign` = 1) or removes (-1) undecided lanes of an open
    /// approval from the per-lane counts.
    fn count<'a>(&mut self, undecided: impl Iterator<Item = &'a str>, sign: i64) {
        for lane in undecided {
            match self.open.get_mut(lane) {
                Some(n) => *n += sign,
                None => {
                    self.open.insert(self.store.intern(lane), sign);
                }
            }
        }
    }

    /// The shared copy of an id held here, or a new one.
    fn key(&self, id: &str) -> Arc<str> {
        self.records
            .get_key_value(id)
            .map(|(k, _)| k.clone())
            .or_else(|| self.closed.get_key_value(id).map(|(k, _)| k.clone()))
            .unwrap_or_else(|| Arc::from(id))
    }
}

/// The undecided lanes of a parsed record, when it is open.
fn undecided(record: &OwnedPendingRecord) -> impl Iterator<Item = &str> {
    let open = record.status == Status::Open;
    record
        .lanes
        .iter()
        .filter(move |l| open && l.verdict.is_none())
        .map(|l| &*l.lane)
}

/// A record changed by the batch: the new state and what memory will
/// hold once the batch is durable: the approval already held (compressed
/// where the change was worked out, on every core for a burst of timers),
/// or its changelog JSON to hold then.
struct Staged {
    partition: i32,
    record: OwnedPendingRecord,
    hold: Hold,
}

enum Hold {
    Ready(Held),
    Bytes(Vec<u8>),
}

/// What one batch will change once durable.
#[derive(Default)]
struct Work {
    outputs: Vec<Output>,
    /// action_id → the new record.
    staged: HashMap<String, Staged>,
    /// Timer entries taken from the queue, put back if the batch fails.
    popped: Vec<Timer>,
    decisions: Vec<(String, String, f64)>,
    refused: Vec<&'static str>,
    /// (from role, to role) of each escalation.
    escalations: Vec<(String, String)>,
    /// Lanes whose SLA passed (an escalation or an expiry).
    breaches: Vec<String>,
    /// Lanes reminded.
    reminders: Vec<String>,
    /// Closed actions whose record this batch tombstones.
    purged: Vec<Arc<str>>,
    /// Closed approvals whose closing record was read back.
    read_back: Vec<String>,
    outcomes: u64,
}

impl EscalateStage {
    pub fn run(&self, stop: Arc<AtomicBool>) -> Result<EscalateSummary, KafkaStageError> {
        let config = &self.config;
        let topics = &config.topics;
        let client = escalation_consumer_config(config, &escalation_group(&config.group_id));
        let consumer: BaseConsumer<StageContext> = client
            .create_with_context(StageContext::new(self.metrics.clone()).with_health(self.health.clone()))
            .map_err(KafkaStageError::kafka("creating the escalation consumer"))?;
        consumer
            .subscribe(&[topics.pending.as_str(), topics.decisions.as_str()])
            .map_err(KafkaStageError::kafka("subscribing to pending and decisions"))?;
        let sink = Sink::new(
            config,
            &format!("{}-escalate-{}", config.group_id, super::instance_id()),
        )
        .map_err(KafkaStageError::kafka("creating the escalation producer"))?
        .with_health(self.health.clone());
        sink.warm_up(config, &self.matrix.current());
        self.health.set_ready(true, "");
        tracing::info!(guarantee = ?config.guarantee, "escalation stage running");

        let mut state = State::default();
        let mut summary = EscalateSummary::default();
        let mut backoff = Duration::from_millis(50);
        while !stop.load(Ordering::Relaxed) {
            let limit = match config.max_events {
                Some(max) if summary.handled >= max => break,
                Some(max) => (max - summary.handled).min(config.batch_size as u64) as usize,
                None => config.batch_size,
            };
            self.sync_assignment(&consumer, &mut state)?;
            let first = match state.timers.next_due() {
                Some(due) => (due - self.clock.now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .min(Duration::from_millis(100)),
                None => Duration::from_millis(100),
            };
            // Copied: records are kept past the next poll here.
            let batch: Vec<InputRecord> =
                poll_batch(&consumer, limit, first, config.batch_wait, &self.metrics)
                    .iter()
                    .map(InputRecord::copy_of)
                    .collect();
            let now = self.clock.now();
            let mut work = Work::default();
            for record in &batch {
                if record.topic == topics.pending {
                    self.on_pending(record, &state, &mut work, now);
                } else {
                    self.on_decision(record, &state, &mut work, now);
                }
            }
            self.allow_restored(&mut state, &mut work, now);
            let firing = std::time::Instant::now();
            self.fire_due(&mut state, &mut work, now);
            if batch.is_empty() && work.outputs.is_empty() && work.staged.is_empty() {
                continue;
            }
            let writing = std::time::Instant::now();
            match sink.write(&work.outputs, &next_offsets(&batch), &consumer, &stop) {
                Ok(()) => {
                    tracing::debug!(
                        records = batch.len(),
                        timers = work.popped.len(),
                        outputs = work.outputs.len(),
                        fire = ?writing.duration_since(firing),
                        write = ?writing.elapsed(),
                        "escalation batch durable"
                    );
                    consumer.context().brokers_back();
                    super::batch::count_consumed(&self.metrics, &batch);
                    summary.handled += batch.len() as u64;
                    summary.decisions += work.decisions.len() as u64;
                    summary.refused += work.refused.len() as u64;
                    summary.escalations += work.escalations.len() as u64;
                    summary.outcomes += work.outcomes;
                    self.committed(&mut state, work);
                    backoff = Duration::from_millis(50);
                }
                Err(SinkError::Retry(reason) | SinkError::CommitFailed(reason)) => {
                    // Nothing of the batch is applied: put the timers back and
                    // read the records again.
                    self.metrics
                        .transactions_total
                        .with_label_values(&["abort"])
                        .inc();
                    tracing::warn!(%reason, "escalation batch not durable; doing it again");
                    for timer in work.popped {
                        state.reschedule(&timer, now);
                    }
                    rewind(&consumer, &batch);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(SinkError::Interrupted) => break,
                Err(SinkError::Fatal(reason)) => {
                    self.health.set_ready(false, &reason);
                    return Err(KafkaStageError::Other(reason));
                }
            }
        }
        self.health.set_ready(false, "shutting down");
        close_consumer(consumer, CLOSE_LIMIT);
        tracing::info!(?summary, "escalation stage stopped");
        Ok(summary)
    }

    /// The newest revision of an action as this batch sees it.
    fn revision(&self, state: &State, work: &Work, id: &str) -> Option<u64> {
        match work.staged.get(id) {
            Some(staged) => Some(staged.record.revision),
            None => state.records.get(id).map(|h| h.revision),
        }
    }

    /// The record as this batch sees it (staged changes first), parsed;
    /// `None` when none is held, or it no longer parses (logged).
    fn current<'s>(
        &self,
        state: &'s State,
        work: &'s Work,
        id: &str,
    ) -> Option<(i32, Cow<'s, OwnedPendingRecord>)> {
        if let Some(staged) = work.staged.get(id) {
            return Some((staged.partition, Cow::Borrowed(&staged.record)));
        }
        let held = state.records.get(id)?;
        match held.record(&state.store) {
            Ok(record) => Some((held.partition, Cow::Owned(record))),
            Err(e) => {
                tracing::error!(action_id = id, error = %e, "held approval unreadable; left alone");
                None
            }
        }
    }

    fn on_pending(&self, input: &InputRecord, state: &State, work: &mut Work, now: DateTime<Utc>) {
        let Some(id) = input.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()) else {
            return;
        };
        let Some(payload) = input.payload.as_deref() else {
            return;
        };
        if state
            .restored_to
            .get(&input.partition)
            .is_some_and(|after| input.offset < *after)
        {
            // The restore applied it already.
            return;
        }
        // The head first: most records read here are our own writes coming
        // back, or (after a restore) records the restore has already read,
        // and those need no full parse.
        let revision = match Head::parse(payload) {
            Ok(head) => head.revision,
            Err(e) => {
                tracing::warn!(key = id, error = %e, "unreadable pending record skipped");
                return;
            }
        };
        if state
            .closing
            .get(id)
            .is_some_and(|(_, closed)| *closed == revision)
        {
            // Our closing record is back: nothing older of ours can follow it.
            work.read_back.push(id.to_string());
            return;
        }
        if self.revision(state, work, id).is_some_and(|old| old >= revision)
            || state
                .closing
                .get(id)
                .is_some_and(|(_, closed)| *closed >= revision)
            || state
                .closed
                .get(id)
                .is_some_and(|(_, closed, _)| *closed >= revision)
        {
            // Our own changelog write coming back, or an older state.
            return;
        }
        let record: OwnedPendingRecord = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key = id, error = %e, "unreadable pending record skipped");
                return;
            }
        };
        match record.status {
            Status::Open | Status::Closed => {
                work.staged.insert(
                    id.to_string(),
                    Staged {
                        partition: input.partition,
                        record,
                        hold: Hold::Bytes(payload.to_vec()),
                    },
                );
            }
            Status::Allowed => {
                let effects = escalation::allow(&record, now);
                self.stage(&state.store, work, input.partition, effects);
            }
        }
    }
    fn on_decision(&self, input: &InputRecord, state: &State, work: &mut Work, now: DateTime<Utc>) {
        let refuse = |work: &mut Work, refusal: Refusal, detail: String| {
            tracing::info!(reason = refusal.reason(), %detail, "decision refused");
            work.refused.push(refusal.reason());
            work.outputs.push(dlq::dead_letter(
                &self.config.topics.dlq,
                input.view(),
                refusal.reason(),
                &detail,
                now,
                self.config.max_message_bytes(),
            ));
        };
        let limit = self.config.max_record_bytes;
        let decision = match input.payload.as_deref().map(|p| {
            if p.len() > limit {
                Err(format!(
                    "record is {} bytes, over the {limit}-byte limit",
                    p.len()
                ))
            } else {
                Decision::decode(p, self.schemas.as_ref()).map_err(|e| e.to_string())
            }
        }) {
            Some(Ok(d)) => d,
            Some(Err(e)) => return refuse(work, Refusal::Malformed, e),
            None => return refuse(work, Refusal::Malformed, "empty record".into()),
        };
        let Some((partition, record)) = self.current(state, work, &decision.action_id) else {
            return refuse(
                work,
                Refusal::NotPending,
                format!("no approval is pending for {}", decision.action_id),
            );
        };
        let record = record.into_owned();
        match escalation::decide(&record, &decision, now) {
            Ok(effects) => {
                let latency =
                    (decision.decided_at - record.routed_at).num_milliseconds().max(0) as f64 / 1000.0;
                work.decisions.push((
                    decision.lane.clone(),
                    decision.verdict.as_str().to_string(),
                    latency,
                ));
                self.stage(&state.store, work, partition, effects);
            }
            Err(refusal) => refuse(
                work,
                refusal,
                format!(
                    "{} by {:?} on lane {:?} for {}",
                    decision.verdict.as_str(),
                    decision.approver,
                    decision.lane,
                    decision.action_id
                ),
            ),
        }
    }

    fn allow_restored(&self, state: &mut State, work: &mut Work, now: DateTime<Utc>) {
        for id in std::mem::take(&mut state.to_allow) {
            let effects = match self.current(state, work, &id) {
                Some((partition, record)) if record.status == Status::Allowed => {
                    Some((partition, escalation::allow(&record, now)))
                }
                _ => None,
            };
            if let Some((partition, effects)) = effects {
                self.stage(&state.store, work, partition, effects);
            }
        }
    }

    /// Applies a durable batch to memory and metrics.
    fn committed(&self, state: &mut State, work: Work) {
        let m = &self.metrics;
        m.transactions_total.with_label_values(&["commit"]).inc();
        for (lane, verdict, latency) in &work.decisions {
            m.decisions_total
                .with_label_values(&[lane.as_str(), verdict.as_str()])
                .inc();
            m.decision_latency_seconds
                .with_label_values(&[lane.as_str()])
                .observe(*latency);
        }
        for reason in &work.refused {
            m.decisions_rejected_total.with_label_values(&[reason]).inc();
        }
        for (from, to) in &work.escalations {
            m.escalations_total
                .with_label_values(&[from.as_str(), to.as_str()])
                .inc();
        }
        for lane in &work.breaches {
            m.sla_breaches_total.with_label_values(&[lane.as_str()]).inc();
        }
        for lane in &work.reminders {
            m.reminders_total.with_label_values(&[lane.as_str()]).inc();
        }
        for id in &work.read_back {
            state.closing.remove(id.as_str());
        }
        for id in &work.purged {
            state.closed.remove(id);
        }
        if !work.purged.is_empty() {
            tracing::debug!(purged = work.purged.len(), "closed actions tombstoned");
        }
        for (id, staged) in work.staged {
            let Staged {
                partition,
                record,
                hold,
            } = staged;
            if !state.partitions.contains(&partition) {
                continue;
            }
            let key = state.key(&id);
            if let Some(old) = state.records.remove(&key) {
                state.count(old.undecided().map(|l| &**l), -1);
            }
            state.count(undecided(&record), 1);
            if record.status == Status::Closed {
                let at = escalation::purge_at(
                    record.closed_at.unwrap_or(record.routed_at),
                    self.config.closed_retention,
                );
                state.timers.schedule_purge(&key, at);
                state.closed.insert(key.clone(), (partition, record.revision, at));
                state.closing.insert(key, (partition, record.revision));
            } else {
                let held = match hold {
                    Hold::Ready(held) => Ok(held),
                    Hold::Bytes(bytes) => Held::from_record(&state.store, partition, &record, &bytes),
                };
                match held {
                    Ok(held) => {
                        state
                            .timers
                            .schedule_clocks(&key, held.lanes.iter().map(|l| l.clock));
                        state.records.insert(key, held);
                    }
                    Err(e) => {
                        // Not held, so not counted either.
                        state.count(undecided(&record), -1);
                        tracing::error!(action_id = %id, error = %e, "approval could not be held; dropped from memory");
                    }
                }
            }
        }
        self.publish_counts(state);
    }

    /// `pending_approvals{lane}` from the kept counts (a handful of lanes,
    /// never a scan of the approvals).
    fn publish_counts(&self, state: &State) {
        for (lane, n) in &state.open {
            self.metrics
                .pending_approvals
                .with_label_values(&[&**lane])
                .set(*n);
        }
    }
}

/// The escalation stage's consumer group, beside the route stage's.
pub fn escalation_group(group_id: &str) -> String {
    format!("{group_id}.escalate")
}
