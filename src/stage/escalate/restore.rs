//! Restoring the escalation stage's state when `switchboard.pending`
//! partitions are assigned, and dropping it when they are revoked: every
//! newly assigned partition of the changelog is read from the beginning,
//! in parallel, into the approvals, closed actions and timers it holds,
//! and the group consumer is sought past what the restore read.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::{EscalateStage, State};
use crate::changelog::read_partition_each;
use crate::escalation::{self, Timer, Timers};
use crate::held::{ById, Head, Held, Store};
use crate::kafka::KafkaStageError;
use crate::pending::Status;
use crate::stage::StageContext;

/// What one partition's changelog restored, before it joins the state.
#[derive(Default)]
struct Restored {
    records: ById<Held>,
    /// Closed actions: action_id → (closing revision, when to tombstone).
    closed: ById<(u64, DateTime<Utc>)>,
    read: u64,
    /// The offset after the last record applied (see `State::restored_to`).
    applied_to: i64,
    /// The timers of `records` and `closed`, and the undecided lanes of
    /// `records` per lane: worked out on the restoring thread, so joining
    /// the state only moves them.
    timers: Timers,
    open: HashMap<Arc<str>, i64>,
}

impl Restored {
    /// Works out the timers and lane counts of what was read.
    fn schedule(&mut self) {
        let mut open: HashMap<Arc<str>, i64> = HashMap::new();
        let mut timers = Vec::with_capacity(self.records.len() + self.closed.len());
        for (id, held) in &self.records {
            for lane in held.undecided() {
                match open.get_mut(lane) {
                    Some(n) => *n += 1,
                    None => {
                        open.insert(lane.clone(), 1);
                    }
                }
            }
            if held.status == Status::Open {
                timers.extend(Timer::of_clocks(id, held.lanes.iter().map(|l| l.clock)));
            }
        }
        for (id, (_, at)) in &self.closed {
            timers.push(Timer::purge(id, *at));
        }
        self.timers = timers.into_iter().collect();
        self.open = open;
    }
}

impl EscalateStage {
    /// Restores newly assigned pending partitions from the changelog and
    /// drops revoked ones.
    pub(super) fn sync_assignment(
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
            for partition in &revoked {
                for held in state.records.leave(*partition).into_values() {
                    state.count(held.undecided().map(|l| &**l), -1);
                }
            }
            state.closing.retain(|_, (p, _)| !revoked.contains(p));
            state.restored_to.retain(|p, _| !revoked.contains(p));
            state.closed.retain(|_, (p, _, _)| !revoked.contains(p));
            state.to_allow.retain(|id| state.records.contains_key(id));
            state.timers.clear();
            for (id, held) in state.records.iter() {
                state
                    .timers
                    .schedule_clocks(id, held.lanes.iter().map(|l| l.clock));
            }
            for (id, (_, _, at)) in &state.closed {
                state.timers.schedule_purge(id, *at);
            }
            tracing::info!(?revoked, "pending partitions revoked; their approvals dropped");
        }
        let assigned: Vec<(i32, i64)> = held
            .difference(&state.partitions)
            .map(|&p| (p, committed_offset(consumer, pending, p)))
            .collect();
        if !assigned.is_empty() {
            self.health.set_ready(false, "restoring pending approvals");
            // The group consumer would fetch these partitions while the
            // restore reads them too: paused, it fetches nothing until it is
            // sought to where the restore ended.
            let mut fresh = TopicPartitionList::new();
            for (partition, _) in &assigned {
                fresh.add_partition(pending, *partition);
            }
            if let Err(e) = consumer.pause(&fresh) {
                tracing::warn!(error = %e, "pending partitions not paused for the restore");
            }
            let started = std::time::Instant::now();
            for (partition, restored) in self.restore_all(&state.store, &assigned) {
                let restored = restored?;
                let count = restored.records.len();
                let committed = assigned
                    .iter()
                    .find(|(p, _)| *p == partition)
                    .map_or(0, |(_, c)| *c);
                if restored.applied_to > committed {
                    seek(consumer, pending, partition, restored.applied_to);
                }
                state.restored_to.insert(partition, restored.applied_to);
                self.join(state, partition, restored);
                tracing::info!(partition, restored = count, elapsed = ?started.elapsed(), "pending partition restored");
            }
            if let Err(e) = consumer.resume(&fresh) {
                return Err(KafkaStageError::Other(format!(
                    "resuming the restored pending partitions: {e}"
                )));
            }
            self.publish_counts(state);
        }
        state.partitions = held;
        self.health.set_ready(true, "");
        Ok(())
    }

    /// Restores `assigned` (partition, committed offset) in parallel, a
    /// few partitions at a time: reading and compressing a changelog
    /// partition keeps a core busy, and partitions are independent. At
    /// least four at once even on fewer cores: with one thread per core, 3
    /// partitions on 2 cores took two rounds, the second on one core.
    fn restore_all(
        &self,
        store: &Arc<Store>,
        assigned: &[(i32, i64)],
    ) -> Vec<(i32, Result<Restored, KafkaStageError>)> {
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(4)
            .min(assigned.len().max(1));
        let next = AtomicUsize::new(0);
        let mut out: Vec<(i32, Result<Restored, KafkaStageError>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        while let Some(&(partition, committed)) =
                            assigned.get(next.fetch_add(1, Ordering::Relaxed))
                        {
                            done.push((partition, self.restore(store, partition, committed)));
                        }
                        done
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![(
                            -1,
                            Err(KafkaStageError::Other("a restore thread panicked".into())),
                        )]
                    })
                })
                .collect()
        });
        out.sort_by_key(|(p, _)| *p);
        out
    }

    /// Reads one partition of the changelog and keeps the newest revision
    /// of each action: open and allowed ones held, closed ones remembered.
    fn restore(&self, store: &Store, partition: i32, committed: i64) -> Result<Restored, KafkaStageError> {
        let retention = self.config.closed_retention;
        let mut out = Restored::default();
        let records = &mut out.records;
        let closed = &mut out.closed;
        (out.read, out.applied_to) = read_partition_each(
            &self.config,
            &self.config.topics.pending,
            partition,
            committed,
            Duration::from_secs(300),
            |key, payload| {
                let Some(key) = key.and_then(|k| std::str::from_utf8(k).ok()) else {
                    return;
                };
                let Some(bytes) = payload else {
                    records.remove(key);
                    closed.remove(key);
                    return;
                };
                let head = match Head::parse(bytes) {
                    Ok(head) => head,
                    Err(e) => return tracing::warn!(key, error = %e, "unreadable pending record skipped"),
                };
                let newest = records
                    .get(key)
                    .map(|h| h.revision)
                    .or_else(|| closed.get(key).map(|(r, _)| *r));
                if newest.is_some_and(|r| head.revision <= r) {
                    return;
                }
                if head.status == Status::Closed {
                    let at = escalation::purge_at(head.closed_at.unwrap_or(head.routed_at), retention);
                    let id = records
                        .remove_entry(key)
                        .map_or_else(|| Arc::from(key), |(k, _)| k);
                    closed.insert(id, (head.revision, at));
                    return;
                }
                match Held::from_head(store, partition, &head, bytes) {
                    Ok(held) => {
                        let id = closed.remove_entry(key).map(|(k, _)| k);
                        match records.get_mut(key) {
                            Some(slot) => *slot = held,
                            None => {
                                records.insert(id.unwrap_or_else(|| Arc::from(key)), held);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(key, error = %e, "pending record not held"),
                }
            },
        )?;
        out.schedule();
        Ok(out)
    }

    /// Adds a restored partition to the state: counts, timers, allowed
    /// actions still to close.
    fn join(&self, state: &mut State, partition: i32, mut restored: Restored) {
        state.timers.append(&mut restored.timers);
        for (lane, n) in restored.open {
            *state.open.entry(lane).or_default() += n;
        }
        state.to_allow.extend(
            restored
                .records
                .iter()
                .filter(|(_, held)| held.status == Status::Allowed)
                .map(|(id, _)| id.clone()),
        );
        state.records.join(partition, restored.records);
        state.closed.extend(
            restored
                .closed
                .into_iter()
                .map(|(id, (revision, at))| (id, (partition, revision, at))),
        );
    }
}

/// Moves the group consumer's position on a restored partition to where
/// the restore ended, so it does not read the changelog a second time.
/// Best effort: if the seek fails, the records before `offset` are read
/// and skipped by offset instead (`State::restored_to`).
fn seek(consumer: &BaseConsumer<StageContext>, topic: &str, partition: i32, offset: i64) {
    if let Err(e) = consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10)) {
        tracing::warn!(topic, partition, offset, error = %e, "not sought past the restored records; they are read and skipped");
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
