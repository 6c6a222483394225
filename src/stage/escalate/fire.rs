//! Firing the SLA timers that are due: reminders, escalations along the
//! fallback chain, expiries and the purge of closed actions, a large burst
//! worked out on every core; and turning each change into the outputs and
//! the staged record its batch writes.

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{EscalateStage, Hold, Staged, State, Work};
use crate::escalation::{self, Effects, Timer, TimerKind};
use crate::held::{Held, Store};
use crate::pending::Status;
use crate::sink::Output;

/// Bursts of at least this many actions falling due at once are fired on
/// every core; below it a thread costs more than it saves.
const PARALLEL_BURST: usize = 512;

/// One action's due timers, in due order.
type Job<'t> = Vec<&'t Timer>;

/// A worker's share of the jobs and what it made of them (`None`: it panicked).
type Worked<'j, 't> = (&'j [Job<'t>], Option<Vec<Vec<Prepared>>>);

/// A change worked out and serialized, ready to join the batch.
struct Prepared {
    partition: i32,
    outputs: Vec<Output>,
    escalation: Option<(String, String)>,
    /// The lane whose SLA passed (an escalation or an expiry).
    breach: Option<String>,
    reminded: Option<String>,
    /// Whether an outcome is among the outputs.
    outcome: bool,
    staged: Staged,
}

impl EscalateStage {
    /// Fires every reminder and SLA due by `now`. A large burst (thousands
    /// of SLAs falling due together) is worked out on every core: each
    /// action's timers in due order on one thread, actions in parallel, so
    /// the outcome is the same as one thread firing them in due order.
    pub(super) fn fire_due(&self, state: &mut State, work: &mut Work, now: DateTime<Utc>) {
        let matrix = self.matrix.current();
        let mut due: Vec<Timer> = Vec::new();
        while let Some(timer) = state.timers.pop_due(now) {
            if timer.kind == TimerKind::Purge {
                if state.purge_is_due(&timer) {
                    work.outputs.push(Output {
                        topic: self.config.topics.pending.clone(),
                        key: Some(timer.action_id.as_bytes().to_vec()),
                        payload: None,
                        headers: Vec::new(),
                    });
                    work.purged.push(timer.action_id.clone());
                }
                work.popped.push(timer);
            } else {
                due.push(timer);
            }
        }
        if due.is_empty() {
            return;
        }
        // Each action's timers, in due order, as one job.
        let mut jobs: Vec<Job> = Vec::new();
        let mut job_of: HashMap<&str, usize> = HashMap::new();
        for timer in &due {
            let next = jobs.len();
            let i = *job_of.entry(&timer.action_id).or_insert(next);
            if i == next {
                jobs.push(Vec::new());
            }
            jobs[i].push(timer);
        }
        let fire = |job: &[&Timer]| -> Vec<Prepared> {
            let mut out: Vec<Prepared> = Vec::new();
            for timer in job {
                let mine = out.last().map(|p| (p.partition, Cow::Borrowed(&p.staged.record)));
                let current = match mine {
                    Some(current) => Some(current),
                    None => self.current(state, work, &timer.action_id),
                };
                let Some((partition, record)) = current else {
                    continue;
                };
                if !escalation::is_current(&record, timer, now) {
                    continue;
                }
                let effects = if timer.kind == TimerKind::Remind {
                    escalation::remind(&record, timer.lane, now)
                } else {
                    escalation::fire(&record, timer.lane, &matrix, now)
                };
                let effects = match effects {
                    Ok(effects) => effects,
                    Err(e) => {
                        tracing::error!(action_id = %timer.action_id, error = %e, "held approval unreadable; left alone");
                        continue;
                    }
                };
                if let Some(prepared) = self.prepare(&state.store, partition, effects) {
                    out.push(prepared);
                }
            }
            out
        };
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut lost: Vec<Timer> = Vec::new();
        let prepared: Vec<Vec<Prepared>> = if jobs.len() < PARALLEL_BURST || workers < 2 {
            jobs.iter().map(|job| fire(job)).collect()
        } else {
            let chunk = jobs.len().div_ceil(workers);
            let results: Vec<Worked> = std::thread::scope(|scope| {
                let handles: Vec<_> = jobs
                    .chunks(chunk)
                    .map(|chunk| {
                        (
                            chunk,
                            scope.spawn(|| chunk.iter().map(|job| fire(job)).collect::<Vec<_>>()),
                        )
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(chunk, h)| (chunk, h.join().ok()))
                    .collect()
            });
            let mut prepared = Vec::new();
            for (chunk, result) in results {
                match result {
                    Some(done) => prepared.extend(done),
                    None => {
                        // A worker runs only the pure state machine and
                        // serde_json; should it panic all the same, its
                        // timers go back in the queue rather than being lost.
                        tracing::error!(
                            timers = chunk.len(),
                            "a timer worker panicked; its timers are put back"
                        );
                        lost.extend(chunk.iter().flatten().map(|t| (*t).clone()));
                    }
                }
            }
            prepared
        };
        for prepared in prepared.into_iter().flatten() {
            self.apply(work, prepared);
        }
        drop(job_of);
        drop(jobs);
        for timer in &lost {
            state.reschedule(timer, now);
        }
        work.popped.extend(due);
    }

    /// Turns effects into outputs and a staged record.
    pub(super) fn stage(&self, store: &Store, work: &mut Work, partition: i32, effects: Effects) {
        if let Some(prepared) = self.prepare(store, partition, effects) {
            self.apply(work, prepared);
        }
    }

    /// Serializes what a change writes (the pure, costly half of staging,
    /// safe to run on any thread).
    fn prepare(&self, store: &Store, partition: i32, effects: Effects) -> Option<Prepared> {
        let topics = &self.config.topics;
        let key = effects.record.action_id.as_bytes().to_vec();
        let mut outputs = Vec::with_capacity(effects.packets.len() + 2);
        for (topic, packet) in &effects.packets {
            if let Ok(bytes) = crate::encode::to_vec(packet) {
                outputs.push(Output {
                    topic: topic.clone(),
                    key: Some(key.clone()),
                    payload: Some(bytes),
                    headers: Vec::new(),
                });
            }
        }
        let breach = match (&effects.escalation, &effects.outcome) {
            (Some(_), _) => effects
                .packets
                .first()
                .and_then(|(_, p)| p.lane.as_deref())
                .map(str::to_string),
            (None, Some(outcome)) => outcome.expired_lane.as_deref().map(str::to_string),
            (None, None) => None,
        };
        let mut outcome = false;
        if let Some(o) = &effects.outcome
            && let Ok(bytes) = crate::encode::to_vec(o)
        {
            outputs.push(Output {
                topic: topics.outcomes.clone(),
                key: Some(key.clone()),
                payload: Some(bytes),
                headers: Vec::new(),
            });
            outcome = true;
        }
        let bytes = match crate::encode::to_vec(&effects.record) {
            Ok(bytes) => bytes,
            Err(e) => {
                // Our own struct always serializes; were it ever not to,
                // memory must not move ahead of the changelog.
                tracing::error!(action_id = %effects.record.action_id, error = %e, "pending record not serializable; not staged");
                return None;
            }
        };
        // Held now, on whichever thread works the change out; should that
        // fail, holding is tried again (and the error logged) once durable.
        let hold = match effects.record.status {
            Status::Closed => Hold::Bytes(Vec::new()),
            _ => match Held::from_record(store, partition, &effects.record, &bytes) {
                Ok(held) => Hold::Ready(held),
                Err(_) => Hold::Bytes(bytes.clone()),
            },
        };
        outputs.push(Output {
            topic: topics.pending.clone(),
            key: Some(key),
            payload: Some(bytes),
            headers: Vec::new(),
        });
        Some(Prepared {
            partition,
            outputs,
            escalation: effects.escalation,
            breach,
            reminded: effects.reminded,
            outcome,
            staged: Staged {
                partition,
                record: effects.record,
                hold,
            },
        })
    }

    /// Adds a prepared change to the batch.
    fn apply(&self, work: &mut Work, prepared: Prepared) {
        work.outputs.extend(prepared.outputs);
        if let Some(escalation) = prepared.escalation {
            work.escalations.push(escalation);
        }
        if let Some(lane) = prepared.breach {
            work.breaches.push(lane);
        }
        if let Some(lane) = prepared.reminded {
            work.reminders.push(lane);
        }
        if prepared.outcome {
            work.outcomes += 1;
        }
        work.staged
            .insert(prepared.staged.record.action_id.to_string(), prepared.staged);
    }
}
