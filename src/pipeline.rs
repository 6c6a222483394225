//! At-least-once writes, pipelined across batches.
//!
//! Writing a batch at least once takes three waits on the broker: its
//! outputs acknowledged, then its changelog records acknowledged, then its
//! offsets committed. Done one batch at a time the stage sits idle through
//! all three, so the [`Pipeline`] keeps several batches in flight instead:
//! while batch N's writes travel, the stage reads and routes batch N+1.
//! What must stay in order still is:
//!
//! * per batch, its changelog records are sent only once every other output
//!   of the batch is acknowledged: a changelog record marks an action seen,
//!   and an action seen whose packets are not durable would be lost (after a
//!   crash its redelivery would be dropped as a duplicate);
//! * offsets are committed only for batches whose every write is
//!   acknowledged, and batches complete in the order they were read, so an
//!   offset never moves past a record whose writes are still in flight.
//!
//! Offsets are committed asynchronously (a failed commit is repeated with
//! the latest offsets; the records behind it would only come back as
//! duplicates), and synchronously by [`Pipeline::drain`] before partitions
//! are revoked or the stage stops.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::sink::{DELIVERY_POLL, FLUSH_SLICE, Output, Sink};

/// How a batch's writes stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Lane packets, allowed records and dead letters on their way.
    Outputs,
    /// Every output acknowledged; the changelog records on their way.
    Changelog,
    /// Every write acknowledged: the offsets may be committed.
    Done,
}

/// One batch in flight and the caller's bookkeeping `T`, handed back when
/// the batch is durable (or abandoned).
struct InFlight<T> {
    /// Ticket of `outputs[0]`; output `i` is sent with `first + i`
    /// (wrapping), the opaque its delivery report comes back with.
    first: usize,
    /// Outputs first, then from `split` on the changelog records.
    outputs: Vec<Output>,
    split: usize,
    phase: Phase,
    /// Reports still expected for the current phase's sends.
    unacked: usize,
    /// Indexes whose delivery (or enqueue) failed, to be sent again.
    failed: Vec<usize>,
    retry_at: Instant,
    backoff: Duration,
    /// The last delivery report for this batch (or when it was sent).
    progress: Instant,
    /// Next offset per partition once this batch is durable.
    offsets: Vec<(String, i32, i64)>,
    records: usize,
    done: T,
}

/// What a stop or a revocation did to the batches in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every batch durable and its offsets committed (or refused, logged).
    Complete,
    /// Given up (stop requested, or the broker away past the deadline): the
    /// batches left were handed back through [`Pipeline::take_abandoned`],
    /// their offsets not committed, so they are read again.
    Abandoned,
}

/// At-least-once writes of many batches at once; see the module docs.
pub struct Pipeline<T> {
    sink: Sink,
    /// The pending changelog's topic: its records go in the second phase.
    changelog: String,
    batches: VecDeque<InFlight<T>>,
    next_ticket: usize,
    /// Next offset per partition that every completed batch reaches.
    durable: BTreeMap<(String, i32), i64>,
    completed: Vec<(T, usize)>,
    abandoned: Vec<T>,
    /// Set while marked unready because writes are not acknowledged.
    unready: bool,
    commit_errors: u64,
}

impl<T> Pipeline<T> {
    pub fn new(sink: Sink, changelog: String) -> Pipeline<T> {
        Pipeline {
            sink,
            changelog,
            batches: VecDeque::new(),
            next_ticket: 0,
            durable: BTreeMap::new(),
            completed: Vec::new(),
            abandoned: Vec::new(),
            unready: false,
            commit_errors: 0,
        }
    }

    /// Batches in flight.
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Input records in flight.
    pub fn records(&self) -> usize {
        self.batches.iter().map(|b| b.records).sum()
    }

    /// Offset commits the broker refused so far.
    pub fn commit_errors(&self) -> u64 {
        self.commit_errors
    }

    /// Starts a batch: sends its outputs (its changelog records wait for
    /// them). `offsets` are one past the batch's last record per partition;
    /// `records` how many input records it holds.
    pub fn push(&mut self, outputs: Vec<Output>, offsets: &TopicPartitionList, records: usize, done: T) {
        let (mut first_phase, changelog): (Vec<Output>, Vec<Output>) =
            outputs.into_iter().partition(|o| o.topic != self.changelog);
        let split = first_phase.len();
        first_phase.extend(changelog);
        let now = Instant::now();
        let mut batch = InFlight {
            first: self.next_ticket,
            split,
            phase: Phase::Outputs,
            unacked: 0,
            failed: Vec::new(),
            retry_at: now,
            backoff: Duration::from_millis(100),
            progress: now,
            offsets: offsets
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.topic().to_string(), e.partition(), o)),
                    _ => None,
                })
                .collect(),
            records,
            done,
            outputs: first_phase,
        };
        self.next_ticket = self.next_ticket.wrapping_add(batch.outputs.len().max(1));
        self.send_range(&mut batch, 0..split);
        self.batches.push_back(batch);
    }

    fn send_range(&self, batch: &mut InFlight<T>, range: std::ops::Range<usize>) {
        for index in range {
            self.send_one(batch, index);
        }
    }

    fn send_one(&self, batch: &mut InFlight<T>, index: usize) {
        match self
            .sink
            .send(&batch.outputs[index], batch.first.wrapping_add(index))
        {
            Ok(()) => batch.unacked += 1,
            Err(error) => {
                tracing::warn!(%error, topic = %batch.outputs[index].topic, "output not enqueued; will send it again");
                Self::note_failure(batch, index);
            }
        }
    }

    fn note_failure(batch: &mut InFlight<T>, index: usize) {
        if batch.failed.is_empty() {
            batch.retry_at = Instant::now() + batch.backoff;
        }
        batch.failed.push(index);
    }

    /// Takes delivery reports, moves batches on (changelog records after
    /// their outputs, failed sends again after a backoff), and commits the
    /// offsets of the batches at the front that are durable.
    pub fn service<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let reports = self.sink.take_reports();
        if !reports.is_empty() {
            self.apply(reports);
        }
        let now = Instant::now();
        let mut batches = std::mem::take(&mut self.batches);
        let mut retrying = false;
        for batch in batches.iter_mut() {
            self.advance(batch, now);
            retrying |= !batch.failed.is_empty();
        }
        self.batches = batches;
        let stalled = self
            .batches
            .front()
            .is_some_and(|b| now.duration_since(b.progress) >= FLUSH_SLICE);
        if retrying || stalled {
            if !self.unready {
                self.unready = true;
                self.sink.set_ready(
                    false,
                    if retrying {
                        "outputs refused by the broker; retrying"
                    } else {
                        "outputs not acknowledged by the broker; waiting"
                    },
                );
            }
        } else if self.unready {
            self.unready = false;
            self.sink.set_ready(true, "");
        }
        self.complete_front(consumer);
    }

    fn apply(&mut self, reports: Vec<(usize, Option<KafkaError>)>) {
        let now = Instant::now();
        for (ticket, error) in reports {
            // A report for an abandoned batch finds none and is ignored.
            let Some(batch) = self
                .batches
                .iter_mut()
                .find(|b| ticket.wrapping_sub(b.first) < b.outputs.len())
            else {
                continue;
            };
            let index = ticket.wrapping_sub(batch.first);
            batch.unacked = batch.unacked.saturating_sub(1);
            batch.progress = now;
            if let Some(error) = error {
                tracing::warn!(%error, topic = %batch.outputs[index].topic, "output not acknowledged; will send it again");
                Self::note_failure(batch, index);
            }
        }
    }

    fn advance(&self, batch: &mut InFlight<T>, now: Instant) {
        if !batch.failed.is_empty() && now >= batch.retry_at {
            // Only what failed goes again (librdkafka retries the rest
            // itself), so an outage leaves no extra copies behind.
            let failed = std::mem::take(&mut batch.failed);
            tracing::warn!(failed = failed.len(), backoff = ?batch.backoff, "sending refused outputs again");
            batch.backoff = (batch.backoff * 2).min(Duration::from_secs(5));
            for index in failed {
                self.send_one(batch, index);
            }
        }
        if batch.unacked > 0 || !batch.failed.is_empty() {
            return;
        }
        match batch.phase {
            Phase::Outputs => {
                batch.phase = Phase::Changelog;
                batch.progress = now;
                let all = batch.outputs.len();
                self.send_range(batch, batch.split..all);
                if batch.unacked == 0 && batch.failed.is_empty() {
                    batch.phase = Phase::Done;
                }
            }
            Phase::Changelog => batch.phase = Phase::Done,
            Phase::Done => {}
        }
    }

    /// Pops the durable batches at the front, in order, and commits their
    /// offsets without waiting.
    fn complete_front<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let mut any = false;
        while self.batches.front().is_some_and(|b| b.phase == Phase::Done) {
            let Some(batch) = self.batches.pop_front() else {
                break;
            };
            for (topic, partition, offset) in batch.offsets {
                let next = self.durable.entry((topic, partition)).or_insert(offset);
                *next = (*next).max(offset);
            }
            self.completed.push((batch.done, batch.records));
            any = true;
        }
        if any {
            self.recommit(consumer);
        }
    }

    /// Commits, without waiting, every offset made durable so far: as
    /// batches complete, and after the broker refused an earlier commit
    /// (reported to the consumer context), so a quiet partition does not
    /// keep records it has long written uncommitted.
    pub fn recommit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let tpl = self.durable_offsets();
        if tpl.count() > 0
            && let Err(error) = consumer.commit(&tpl, CommitMode::Async)
        {
            self.commit_failed(&error);
        }
    }

    fn durable_offsets(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &self.durable {
            // Adding to a fresh list cannot fail for a valid partition.
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        tpl
    }

    fn commit_failed(&mut self, error: &KafkaError) {
        self.commit_errors += 1;
        tracing::warn!(%error, "offsets not committed; the records will be read again as duplicates");
    }

    /// Waits about `wait` for delivery reports, then services them.
    pub fn wait<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, wait: Duration) {
        self.sink.poll_reports(wait);
        self.service(consumer);
    }

    /// Batches made durable since the last call, oldest first, with their
    /// record counts.
    pub fn take_completed(&mut self) -> Vec<(T, usize)> {
        std::mem::take(&mut self.completed)
    }

    /// Batches given up by [`Pipeline::drain`] since the last call.
    pub fn take_abandoned(&mut self) -> Vec<T> {
        std::mem::take(&mut self.abandoned)
    }

    /// Makes every batch in flight durable and commits all offsets,
    /// waiting: before partitions are revoked (their new owner starts from
    /// these offsets) and when the stage stops. Gives up, abandoning what is
    /// left, when `stopping` and nothing moved for a second (the broker is
    /// away; a stop must be obeyed), or after `limit` (a revocation cannot
    /// wait for ever: the group would evict the instance).
    pub fn drain<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        stopping: &dyn Fn() -> bool,
        limit: Duration,
    ) -> Drained {
        let started = Instant::now();
        self.service(consumer);
        while let Some(front) = self.batches.front() {
            let still = Instant::now().duration_since(front.progress);
            if (stopping() && still >= FLUSH_SLICE) || started.elapsed() >= limit {
                tracing::warn!(
                    batches = self.batches.len(),
                    records = self.records(),
                    "giving up on batches in flight; their records will be read again"
                );
                self.abandoned
                    .extend(std::mem::take(&mut self.batches).into_iter().map(|b| b.done));
                if self.unready {
                    self.unready = false;
                    self.sink.set_ready(true, "");
                }
                return Drained::Abandoned;
            }
            self.wait(consumer, DELIVERY_POLL);
        }
        let tpl = self.durable_offsets();
        if tpl.count() > 0
            && let Err(error) = consumer.commit(&tpl, CommitMode::Sync)
        {
            self.commit_failed(&error);
        }
        Drained::Complete
    }

    /// Forgets the offsets of partitions this instance no longer holds
    /// (after a revocation they are another instance's to commit).
    pub fn forget_offsets(&mut self) {
        self.durable.clear();
    }
}
