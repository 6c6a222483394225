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

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::StageContext;
use super::batch::{InputRecord, next_offsets, poll_batch, rewind};
use crate::changelog::read_partition;
use crate::clock::Clock;
use crate::config::Config;
use crate::decision::Decision;
use crate::decode::SchemaSource;
use crate::dlq::{self, Failed};
use crate::escalation::{self, Effects, Refusal, Timer, TimerKind, Timers};
use crate::http::Health;
use crate::kafka::{KafkaStageError, escalation_consumer_config};
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
    /// action_id → (pending partition, record).
    records: HashMap<String, (i32, OwnedPendingRecord)>,
    timers: Timers,
    /// Pending partitions restored and held.
    partitions: BTreeSet<i32>,
    /// Allowed actions restored without their outcome yet.
    to_allow: Vec<String>,
    /// Approvals closed here whose closing record has not been read back
    /// yet: action_id → (partition, closing revision). Until it is, older
    /// records of ours still on their way back must not bring the approval
    /// back to life.
    closing: HashMap<String, (i32, u64)>,
    /// Closed actions whose record is still in the changelog: action_id →
    /// (partition, closing revision, when it is tombstoned). Older records
    /// of theirs read again (the group consumer replays from its committed
    /// offset after a restore) are ignored.
    closed: HashMap<String, (i32, u64, DateTime<Utc>)>,
    /// Undecided lanes of open approvals held, per lane: kept exact by
    /// adjusting it with every change rather than counting all state.
    open: HashMap<String, i64>,
}

impl State {
    /// Puts back a timer taken by a batch that did not become durable, if
    /// it still applies.
    fn reschedule(&mut self, timer: &Timer, now: DateTime<Utc>) {
        if timer.kind == TimerKind::Purge {
            if self.purge_is_due(timer) {
                self.timers.schedule_purge(&timer.action_id, timer.due);
            }
        } else if let Some((_, record)) = self.records.get(&timer.action_id)
            && escalation::is_current(record, timer, now)
        {
            self.timers.schedule(record);
        }
    }

    /// Whether a purge timer still names a closed action held here.
    fn purge_is_due(&self, timer: &Timer) -> bool {
        !self.records.contains_key(&timer.action_id)
            && self
                .closed
                .get(&timer.action_id)
                .is_some_and(|(_, _, at)| *at == timer.due)
    }

    /// Adds (`sign` = 1) or removes (-1) a record's undecided lanes from the
    /// per-lane counts.
    fn count(&mut self, record: &OwnedPendingRecord, sign: i64) {
        if record.status != Status::Open {
            return;
        }
        for lane in record.lanes.iter().filter(|l| l.verdict.is_none()) {
            *self.open.entry(lane.lane.to_string()).or_default() += sign;
        }
    }
}

/// What one batch will change once durable.
#[derive(Default)]
struct Work {
    outputs: Vec<Output>,
    /// action_id → (partition, new record) in the order decided.
    staged: HashMap<String, (i32, OwnedPendingRecord)>,
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
    purged: Vec<String>,
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
            let batch = poll_batch(&consumer, limit, first, config.batch_wait, &self.metrics);
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
            self.fire_due(&mut state, &mut work, now);
            if batch.is_empty() && work.outputs.is_empty() && work.staged.is_empty() {
                continue;
            }
            match sink.write(&work.outputs, &next_offsets(&batch), &consumer, &stop) {
                Ok(()) => {
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
        consumer.unsubscribe();
        tracing::info!(?summary, "escalation stage stopped");
        Ok(summary)
    }

    /// Restores newly assigned pending partitions from the changelog and
    /// drops revoked ones.
    fn sync_assignment(
        &self,
        consumer: &BaseConsumer<StageContext>,
        state: &mut State,
    ) -> Result<(), KafkaStageError> {
        let Ok(assignment) = consumer.assignment() else {
            return Ok(());
        };
        let pending = &self.config.topics.pending;
        let held: BTreeSet<i32> = assignment
            .elements_for_topic(pending)
            .iter()
            .map(|e| e.partition())
            .collect();
        if held == state.partitions {
            return Ok(());
        }
        let revoked: Vec<i32> = state.partitions.difference(&held).copied().collect();
        if !revoked.is_empty() {
            let dropped: Vec<OwnedPendingRecord> = state
                .records
                .iter()
                .filter(|(_, (p, _))| revoked.contains(p))
                .map(|(_, (_, r))| r.clone())
                .collect();
            for record in &dropped {
                state.count(record, -1);
            }
            state.records.retain(|_, (p, _)| !revoked.contains(p));
            state.closing.retain(|_, (p, _)| !revoked.contains(p));
            state.closed.retain(|_, (p, _, _)| !revoked.contains(p));
            state.to_allow.retain(|id| state.records.contains_key(id));
            state.timers.clear();
            for (_, record) in state.records.values() {
                state.timers.schedule(record);
            }
            for (id, (_, _, at)) in &state.closed {
                state.timers.schedule_purge(id, *at);
            }
            tracing::info!(?revoked, "pending partitions revoked; their approvals dropped");
        }
        for partition in held.difference(&state.partitions.clone()).copied() {
            self.health.set_ready(false, "restoring pending approvals");
            let started = std::time::Instant::now();
            let committed = committed_offset(consumer, pending, partition);
            let records = read_partition(
                &self.config,
                pending,
                partition,
                committed,
                Duration::from_secs(300),
            )?;
            let mut restored = 0usize;
            for r in records {
                let Some(key) = r.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                match r
                    .payload
                    .as_deref()
                    .map(serde_json::from_slice::<OwnedPendingRecord>)
                {
                    None => {
                        state.records.remove(key);
                    }
                    Some(Ok(record)) => {
                        let newer = state
                            .records
                            .get(key)
                            .is_none_or(|(_, old)| record.revision > old.revision);
                        if newer {
                            state.records.insert(key.to_string(), (partition, record));
                        }
                    }
                    Some(Err(e)) => tracing::warn!(key, error = %e, "unreadable pending record skipped"),
                }
            }
            let retention = self.config.closed_retention;
            let closed = &mut state.closed;
            let timers = &mut state.timers;
            state.records.retain(|id, (p, r)| {
                if r.status != Status::Closed {
                    return true;
                }
                let at = escalation::purge_at(r.closed_at.unwrap_or(r.routed_at), retention);
                closed.insert(id.clone(), (*p, r.revision, at));
                timers.schedule_purge(id, at);
                false
            });
            let mine: Vec<(String, OwnedPendingRecord)> = state
                .records
                .iter()
                .filter(|(_, (p, _))| *p == partition)
                .map(|(id, (_, r))| (id.clone(), r.clone()))
                .collect();
            for (id, record) in mine {
                restored += 1;
                state.count(&record, 1);
                match record.status {
                    Status::Open => state.timers.schedule(&record),
                    Status::Allowed => state.to_allow.push(id),
                    Status::Closed => {}
                }
            }
            self.publish_counts(state);
            tracing::info!(partition, restored, elapsed = ?started.elapsed(), "pending partition restored");
        }
        state.partitions = held;
        self.health.set_ready(true, "");
        Ok(())
    }

    /// The record as this batch sees it: staged changes first.
    fn current<'s>(
        &self,
        state: &'s State,
        work: &'s Work,
        id: &str,
    ) -> Option<&'s (i32, OwnedPendingRecord)> {
        work.staged.get(id).or_else(|| state.records.get(id))
    }

    fn on_pending(&self, input: &InputRecord, state: &State, work: &mut Work, now: DateTime<Utc>) {
        let Some(id) = input.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()) else {
            return;
        };
        let Some(payload) = input.payload.as_deref() else {
            return;
        };
        let record: OwnedPendingRecord = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key = id, error = %e, "unreadable pending record skipped");
                return;
            }
        };
        if state
            .closing
            .get(id)
            .is_some_and(|(_, closed)| *closed == record.revision)
        {
            // Our closing record is back: nothing older of ours can follow it.
            work.read_back.push(id.to_string());
            return;
        }
        if self
            .current(state, work, id)
            .is_some_and(|(_, old)| old.revision >= record.revision)
            || state
                .closing
                .get(id)
                .is_some_and(|(_, closed)| *closed >= record.revision)
            || state
                .closed
                .get(id)
                .is_some_and(|(_, closed, _)| *closed >= record.revision)
        {
            // Our own changelog write coming back, or an older state.
            return;
        }
        match record.status {
            Status::Open | Status::Closed => {
                work.staged.insert(id.to_string(), (input.partition, record));
            }
            Status::Allowed => {
                let effects = escalation::allow(&record, now);
                self.stage(work, input.partition, effects);
            }
        }
    }

    fn on_decision(&self, input: &InputRecord, state: &State, work: &mut Work, now: DateTime<Utc>) {
        let refuse = |work: &mut Work, refusal: Refusal, detail: String| {
            tracing::info!(reason = refusal.reason(), %detail, "decision refused");
            work.refused.push(refusal.reason());
            work.outputs.push(dlq::dead_letter(
                &self.config.topics.dlq,
                Failed {
                    topic: &input.topic,
                    partition: input.partition,
                    offset: input.offset,
                    key: input.key.as_deref(),
                    payload: input.payload.as_deref(),
                    headers: &input.headers,
                },
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
        let partition = *partition;
        match escalation::decide(record, &decision, now) {
            Ok(effects) => {
                let latency =
                    (decision.decided_at - record.routed_at).num_milliseconds().max(0) as f64 / 1000.0;
                work.decisions.push((
                    decision.lane.clone(),
                    decision.verdict.as_str().to_string(),
                    latency,
                ));
                self.stage(work, partition, effects);
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
            if let Some((partition, record)) = self.current(state, work, &id).cloned()
                && record.status == Status::Allowed
            {
                self.stage(work, partition, escalation::allow(&record, now));
            }
        }
    }

    /// Fires every reminder and SLA due by `now`, in due order.
    fn fire_due(&self, state: &mut State, work: &mut Work, now: DateTime<Utc>) {
        let matrix = self.matrix.current();
        while let Some(timer) = state.timers.pop_due(now) {
            let effects = match timer.kind {
                TimerKind::Purge => {
                    if state.purge_is_due(&timer) {
                        work.outputs.push(Output {
                            topic: self.config.topics.pending.clone(),
                            key: Some(timer.action_id.as_bytes().to_vec()),
                            payload: None,
                            headers: Vec::new(),
                        });
                        work.purged.push(timer.action_id.clone());
                    }
                    None
                }
                kind => match self.current(state, work, &timer.action_id) {
                    Some((partition, record)) if escalation::is_current(record, &timer, now) => {
                        let effects = if kind == TimerKind::Remind {
                            escalation::remind(record, timer.lane, now)
                        } else {
                            escalation::fire(record, timer.lane, &matrix, now)
                        };
                        Some((*partition, effects))
                    }
                    _ => None,
                },
            };
            work.popped.push(timer);
            if let Some((partition, effects)) = effects {
                self.stage(work, partition, effects);
            }
        }
    }

    /// Turns effects into outputs and a staged record.
    fn stage(&self, work: &mut Work, partition: i32, effects: Effects) {
        let topics = &self.config.topics;
        let key = effects.record.action_id.as_bytes().to_vec();
        for (topic, packet) in &effects.packets {
            if let Ok(bytes) = serde_json::to_vec(packet) {
                work.outputs.push(Output {
                    topic: topic.clone(),
                    key: Some(key.clone()),
                    payload: Some(bytes),
                    headers: Vec::new(),
                });
            }
        }
        if let Some((from, to)) = &effects.escalation {
            work.escalations.push((from.clone(), to.clone()));
            if let Some(lane) = effects.packets.first().and_then(|(_, p)| p.lane.as_deref()) {
                work.breaches.push(lane.to_string());
            }
        }
        if let Some(lane) = &effects.reminded {
            work.reminders.push(lane.clone());
        }
        if let Some(outcome) = &effects.outcome {
            if let Some(lane) = &outcome.expired_lane {
                work.breaches.push(lane.to_string());
            }
            if let Ok(bytes) = serde_json::to_vec(outcome) {
                work.outputs.push(Output {
                    topic: topics.outcomes.clone(),
                    key: Some(key.clone()),
                    payload: Some(bytes),
                    headers: Vec::new(),
                });
                work.outcomes += 1;
            }
        }
        if let Ok(bytes) = serde_json::to_vec(&effects.record) {
            work.outputs.push(Output {
                topic: topics.pending.clone(),
                key: Some(key),
                payload: Some(bytes),
                headers: Vec::new(),
            });
        }
        work.staged
            .insert(effects.record.action_id.to_string(), (partition, effects.record));
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
            state.closing.remove(id);
        }
        for id in &work.purged {
            state.closed.remove(id);
        }
        if !work.purged.is_empty() {
            tracing::debug!(purged = work.purged.len(), "closed actions tombstoned");
        }
        for (id, (partition, record)) in work.staged {
            if !state.partitions.contains(&partition) {
                continue;
            }
            if let Some((_, old)) = state.records.get(&id).cloned() {
                state.count(&old, -1);
            }
            state.count(&record, 1);
            if record.status == Status::Closed {
                state.records.remove(&id);
                let at = escalation::purge_at(
                    record.closed_at.unwrap_or(record.routed_at),
                    self.config.closed_retention,
                );
                state.timers.schedule_purge(&id, at);
                state.closed.insert(id.clone(), (partition, record.revision, at));
                state.closing.insert(id, (partition, record.revision));
            } else {
                state.timers.schedule(&record);
                state.records.insert(id, (partition, record));
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
                .with_label_values(&[lane.as_str()])
                .set(*n);
        }
    }
}

/// The group's committed offset of one partition (0 when none).
fn committed_offset(consumer: &BaseConsumer<StageContext>, topic: &str, partition: i32) -> i64 {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(committed) => committed
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(0),
        Err(e) => {
            tracing::warn!(topic, partition, error = %e, "committed offset unknown; restoring to the high watermark");
            0
        }
    }
}

/// The escalation stage's consumer group, beside the route stage's.
pub fn escalation_group(group_id: &str) -> String {
    format!("{group_id}.escalate")
}
