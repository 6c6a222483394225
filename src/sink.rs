//! Sink: writes a batch's output records and commits its input offsets,
//! under the configured delivery guarantee.
//!
//! * Exactly once: one Kafka transaction per batch holds every output and
//!   the consumer offsets (`send_offsets_to_transaction`), so a reader with
//!   `isolation.level=read_committed` sees a batch wholly or not at all.
//! * At least once: every output must be acknowledged (failed ones are sent
//!   again, with backoff, until they are) before the offsets are committed.
//!
//! A batch the sink could not make durable is reported as
//! [`SinkError::Retry`]; the stage rewinds its consumer and handles the batch
//! again. Only errors that no retry can fix are [`SinkError::Fatal`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::TopicPartitionList;

use crate::config::{Config, Guarantee};
use crate::kafka::{owned_topics, producer_config};
use crate::matrix::Matrix;

/// How long [`Sink::warm_up`] may take in all.
const WARM_UP_LIMIT: Duration = Duration::from_secs(5);

/// One record to write. `payload: None` is a tombstone.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A generous bound on what librdkafka adds to a record's key, value and
/// header bytes when it checks `message.max.bytes`.
pub const RECORD_OVERHEAD: usize = 512;

impl Output {
    /// The record's size as the producer's `message.max.bytes` check sees
    /// it, rounded up.
    pub fn wire_size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + RECORD_OVERHEAD
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The batch is not durable; handle it again.
    #[error("batch not written, will retry: {0}")]
    Retry(String),
    /// The producer cannot go on (fenced by a newer instance, or a fatal
    /// librdkafka error); the stage must stop.
    #[error("producer failed: {0}")]
    Fatal(String),
    /// At least once: every output is acknowledged but the offsets were not
    /// committed; the records will come back and must be recognised as seen.
    #[error("outputs written but offsets not committed: {0}")]
    CommitFailed(String),
    /// Shutdown was requested while outputs were still unacknowledged.
    #[error("shut down before the batch was acknowledged")]
    Interrupted,
}

/// Collects delivery reports by the opaque each record was sent with (its
/// index in the batch, or the pipeline's ticket): `None` when acknowledged.
/// Reports arrive on the producer's own polling thread (a
/// `ThreadedProducer`), which also frees librdkafka's copies of the
/// acknowledged records: work the stage's loop thread, the busiest
/// thread of a stage, used to do itself.
#[derive(Default)]
pub struct DeliveryTracker {
    reports: Mutex<Reports>,
    /// Reports received in all, counted under the lock above: a wait for
    /// the next one watches it move.
    received: AtomicU64,
    arrived: Condvar,
}

/// What the tracker's lock guards.
#[derive(Default)]
struct Reports {
    taken: Vec<(usize, Option<KafkaError>)>,
    /// Threads waiting on `arrived`. A report wakes them only when there
    /// are some: a wake is a system call, and reports come two per action
    /// while the stage's thread is mostly busy, not waiting.
    waiting: usize,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        let error = result.as_ref().err().map(|(error, _)| error.clone());
        let mut reports = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
        reports.taken.push((index, error));
        self.received.fetch_add(1, Ordering::Relaxed);
        let wake = reports.waiting > 0;
        drop(reports);
        if wake {
            self.arrived.notify_all();
        }
    }
}

/// How long one flush waits before the sink checks its stop flag and
/// reports itself unready.
pub(crate) const FLUSH_SLICE: Duration = Duration::from_secs(1);

/// How long one wait for delivery reports lasts at most when none comes.
pub(crate) const DELIVERY_POLL: Duration = Duration::from_millis(1);

pub struct Sink {
    producer: ThreadedProducer<DeliveryTracker>,
    guarantee: Guarantee,
    timeout: Duration,
    /// The pending changelog, whose records say an action was handled. At
    /// least once, they are written only after every other output of the
    /// batch is acknowledged: a crash in between leaves outputs without
    /// their record (the action is handled again), never a record without
    /// its outputs (a redelivery taken for a duplicate, its packet lost).
    changelog: String,
    /// Marked unready while outputs wait for a broker that is away.
    health: Option<crate::http::Health>,
}

impl Sink {
    /// Creates the producer; in exactly-once mode `transactional_id` must be
    /// unique per instance and stable across its restarts, so a restarted
    /// instance fences its zombie.
    pub fn new(config: &Config, transactional_id: &str) -> Result<Sink, KafkaError> {
        let id = (config.guarantee == Guarantee::ExactlyOnce).then_some(transactional_id);
        let producer: ThreadedProducer<DeliveryTracker> =
            producer_config(config, id).create_with_context(DeliveryTracker::default())?;
        let sink = Sink {
            producer,
            guarantee: config.guarantee,
            timeout: Duration::from_secs(30),
            changelog: config.topics.pending.clone(),
            health: None,
        };
        if sink.guarantee == Guarantee::ExactlyOnce {
            sink.producer.init_transactions(sink.timeout)?;
        }
        Ok(sink)
    }

    /// Writes `outputs` and commits `offsets` for `consumer`'s group.
    pub fn write<C: ConsumerContext>(
        &self,
        outputs: &[Output],
        offsets: &TopicPartitionList,
        consumer: &BaseConsumer<C>,
        stop: &AtomicBool,
    ) -> Result<(), SinkError> {
        match self.guarantee {
            Guarantee::ExactlyOnce => self.write_transaction(outputs, offsets, consumer),
            Guarantee::AtLeastOnce => {
                let (changelog, rest): (Vec<&Output>, Vec<&Output>) =
                    outputs.iter().partition(|o| o.topic == self.changelog);
                self.write_acknowledged(&rest, stop)?;
                self.write_acknowledged(&changelog, stop)?;
                if offsets.count() == 0 {
                    return Ok(());
                }
                consumer
                    .commit(offsets, CommitMode::Sync)
                    .map_err(|e| SinkError::CommitFailed(e.to_string()))
            }
        }
    }

    fn write_transaction<C: ConsumerContext>(
        &self,
        outputs: &[Output],
        offsets: &TopicPartitionList,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), SinkError> {
        self.send_transaction(outputs, offsets, consumer)?;
        self.commit_transaction()
    }

    /// Exactly once, the first half of a batch's write: begins a
    /// transaction and sends `outputs` and `offsets` in it. The transaction
    /// stays open, its records travelling, until [`Sink::commit_transaction`];
    /// on an error it is aborted.
    pub(crate) fn send_transaction<C: ConsumerContext>(
        &self,
        outputs: &[Output],
        offsets: &TopicPartitionList,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), SinkError> {
        self.producer
            .begin_transaction()
            .map_err(|e| self.txn_error("beginning", e))?;
        let result = (|| {
            for (index, output) in outputs.iter().enumerate() {
                self.send(output, index)
                    .map_err(|e| self.txn_error("producing", e))?;
            }
            if offsets.count() > 0 {
                let group = consumer
                    .group_metadata()
                    .ok_or_else(|| SinkError::Retry("consumer has no group metadata yet".into()))?;
                self.producer
                    .send_offsets_to_transaction(offsets, &group, self.timeout)
                    .map_err(|e| self.txn_error("adding offsets to", e))?;
            }
            Ok(())
        })();
        self.abort_on_retry(result)
    }

    /// Exactly once, the second half: commits the transaction
    /// [`Sink::send_transaction`] opened (aborting it on an error).
    pub(crate) fn commit_transaction(&self) -> Result<(), SinkError> {
        // Every record acknowledged first: rust-rdkafka's
        // `commit_transaction` flushes before it commits, and its flush
        // waits in 100 ms polls that run their whole length (see
        // `wait_delivered`), so with any record still in flight, which the
        // linger makes the rule, each transaction took 100 ms however fast
        // the broker answered. A record that is not acknowledged in time is
        // left to the commit's own flush and its errors, as before.
        self.wait_delivered(self.timeout);
        let result = self
            .producer
            .commit_transaction(self.timeout)
            .map_err(|e| self.txn_error("committing", e));
        let result = self.abort_on_retry(result);
        // Delivery reports matter only at least once: those of this
        // transaction, and of any aborted before it, are dropped.
        self.take_failures();
        result
    }

    /// Aborts the open transaction when `result` says the batch is to be
    /// handled again.
    fn abort_on_retry(&self, result: Result<(), SinkError>) -> Result<(), SinkError> {
        if let Err(SinkError::Retry(reason)) = &result {
            tracing::warn!(%reason, "aborting transaction");
            if let Err(e) = self.producer.abort_transaction(self.timeout) {
                return Err(self.txn_error("aborting", e));
            }
        }
        result
    }

    fn txn_error(&self, doing: &str, error: KafkaError) -> SinkError {
        let fatal = match &error {
            KafkaError::Transaction(e) => e.is_fatal(),
            _ => false,
        };
        let fenced = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        );
        if fatal || fenced {
            SinkError::Fatal(format!("{doing} the transaction: {error}"))
        } else {
            SinkError::Retry(format!("{doing} the transaction: {error}"))
        }
    }

    /// Learns where the partitions of every topic switchboard owns are
    /// ([`owned_topics`]) before the first batch. The
    /// producer otherwise asks per topic on its first record there, and
    /// holds that record until the answer comes: with a lane topic or two
    /// first met in each early batch, a started stage wrote nothing durable
    /// for most of a second. A topic that cannot be looked up now is left
    /// to the first record: the look-ups stop at the first that fails (a
    /// broker away at start-up costs one [`WARM_UP_LIMIT`], not one per topic).
    pub fn warm_up(&self, config: &Config, matrix: &Matrix) {
        let deadline = Instant::now() + WARM_UP_LIMIT;
        for topic in owned_topics(config, matrix) {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(error) = self.producer.client().fetch_metadata(Some(&topic), left) {
                tracing::info!(%topic, %error, "output topics not looked up ahead of their first records");
                return;
            }
        }
    }

    /// Reports readiness into `health`: unready while outputs are retried.
    pub fn with_health(mut self, health: crate::http::Health) -> Sink {
        self.health = Some(health);
        self
    }

    /// Sends every output and waits until each one is acknowledged, sending
    /// failed ones again with backoff. A write that is not acknowledged
    /// within a second marks the stage unready until it is. Never gives up
    /// while the broker is away: offsets must not move past unwritten
    /// outputs. Only outputs whose delivery failed are sent again (librdkafka
    /// itself retries the rest until `message.timeout.ms`), so an outage
    /// leaves no copies behind.
    fn write_acknowledged(&self, outputs: &[&Output], stop: &AtomicBool) -> Result<(), SinkError> {
        if outputs.is_empty() {
            return Ok(());
        }
        let mut pending: Vec<usize> = (0..outputs.len()).collect();
        let mut backoff = Duration::from_millis(100);
        let mut retrying = false;
        let mut unready = |why: &str| {
            if !retrying {
                retrying = true;
                self.set_ready(false, why);
            }
        };
        let result = 'write: loop {
            let mut enqueue_error = None;
            for &index in &pending {
                if let Err(e) = self.send(outputs[index], index) {
                    enqueue_error = Some(e);
                    break;
                }
            }
            // Wait in slices, so a broker that is away is noticed (and a
            // stop obeyed) within a second.
            while !self.wait_delivered(FLUSH_SLICE) {
                if stop.load(Ordering::Relaxed) {
                    break 'write Err(SinkError::Interrupted);
                }
                unready("outputs not acknowledged by the broker; waiting");
            }
            let failed = self.take_failures();
            if enqueue_error.is_none() && failed.is_empty() {
                break Ok(());
            }
            if stop.load(Ordering::Relaxed) {
                break Err(SinkError::Interrupted);
            }
            unready("outputs refused by the broker; retrying");
            tracing::warn!(
                failed = failed.len(),
                enqueue = ?enqueue_error,
                ?backoff,
                "outputs not acknowledged; sending them again"
            );
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
            // A refused enqueue left the rest of the batch unsent: all of it
            // goes again (the at-least-once contract allows the copies).
            pending = if enqueue_error.is_none() {
                failed.into_iter().map(|(i, _)| i).collect()
            } else {
                (0..outputs.len()).collect()
            };
        };
        if retrying {
            self.set_ready(true, "");
        }
        result
    }

    /// Waits up to `slice` until every record enqueued so far is
    /// acknowledged or has failed, serving delivery reports meanwhile; true
    /// when none is left. Not `Producer::flush`: rust-rdkafka's flush serves
    /// delivery reports in 100 ms polls that always run their full length,
    /// so every flush took at least 100 ms however fast the broker answered.
    fn wait_delivered(&self, slice: Duration) -> bool {
        let deadline = Instant::now() + slice;
        loop {
            if self.producer.in_flight_count() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.poll_reports(DELIVERY_POLL);
        }
    }

    pub(crate) fn set_ready(&self, ready: bool, reason: &str) {
        if let Some(health) = &self.health {
            health.set_ready(ready, reason);
        }
    }

    /// Enqueues one record, waiting for room when the local queue is full.
    pub(crate) fn send(&self, output: &Output, index: usize) -> Result<(), KafkaError> {
        let headers = (!output.headers.is_empty()).then(|| {
            output.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                })
            })
        });
        let mut record: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(&output.topic, index);
        if let Some(key) = &output.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &output.payload {
            record = record.payload(payload.as_slice());
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        let started = Instant::now();
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < self.timeout =>
                {
                    record = back;
                    self.poll_reports(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn take_failures(&self) -> Vec<(usize, KafkaError)> {
        self.take_reports()
            .into_iter()
            .filter_map(|(index, error)| error.map(|e| (index, e)))
            .collect()
    }

    /// Every delivery report received since the last call.
    pub(crate) fn take_reports(&self) -> Vec<(usize, Option<KafkaError>)> {
        let mut reports = self
            .producer
            .context()
            .reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut reports.taken)
    }

    /// Waits until a delivery report arrives or `wait` is over (reports are
    /// then taken with [`Sink::take_reports`]). The producer's thread serves
    /// them; this thread only sleeps. (Polling here was worse than it
    /// looked: rust-rdkafka hands librdkafka only the whole milliseconds
    /// of a poll's timeout and polls out the rest with no timeout in a busy
    /// loop, so every 1 ms wait spun a core.)
    pub(crate) fn poll_reports(&self, wait: Duration) {
        let tracker = self.producer.context();
        let mut reports = tracker.reports.lock().unwrap_or_else(PoisonError::into_inner);
        let before = tracker.received.load(Ordering::Relaxed);
        // Counted under the lock a report is added under: a report either
        // came before (and the wait below sees the count moved) or sees
        // this waiter and wakes it.
        reports.waiting += 1;
        let (mut reports, _) = tracker
            .arrived
            .wait_timeout_while(reports, wait, |_| {
                tracker.received.load(Ordering::Relaxed) == before
            })
            .unwrap_or_else(PoisonError::into_inner);
        reports.waiting -= 1;
    }
}
