//! Batches: polling records from a stage's consumer, the offsets that
//! commit them, and rewinding when a batch was not made durable. Shared by
//! both stages.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::StageContext;
use crate::metrics::Metrics;

pub use crate::kafka::{Input, InputRecord};

/// `events_consumed_total{topic}` for a batch once it is durable.
pub fn count_consumed(metrics: &Metrics, batch: &[impl Input]) {
    let mut by_topic: BTreeMap<&str, u64> = BTreeMap::new();
    for r in batch {
        *by_topic.entry(r.view().topic).or_default() += 1;
    }
    for (topic, n) in by_topic {
        metrics
            .events_consumed_total
            .with_label_values(&[topic])
            .inc_by(n);
    }
}

/// Polls up to `limit` records: waits up to `first` for the first, then up to
/// `wait` more for the rest, so a quiet topic costs no CPU and a busy one
/// fills batches. The records stay librdkafka's: a stage that keeps them
/// past its next poll copies them ([`InputRecord::copy_of`]).
pub fn poll_batch<'c>(
    consumer: &'c BaseConsumer<StageContext>,
    limit: usize,
    first: Duration,
    wait: Duration,
    metrics: &Metrics,
) -> Vec<BorrowedMessage<'c>> {
    poll(consumer, limit, first, wait, metrics, false)
}

/// [`poll_batch`], less the records polled before a revocation during the
/// poll: their partitions may have moved, and the offsets committed before
/// they were revoked are where their next owner (maybe this instance again,
/// whose position the new assignment resets to them) reads them from.
pub fn poll_owned_batch<'c>(
    consumer: &'c BaseConsumer<StageContext>,
    limit: usize,
    first: Duration,
    wait: Duration,
    metrics: &Metrics,
) -> Vec<BorrowedMessage<'c>> {
    poll(consumer, limit, first, wait, metrics, true)
}

fn poll<'c>(
    consumer: &'c BaseConsumer<StageContext>,
    limit: usize,
    first: Duration,
    wait: Duration,
    metrics: &Metrics,
    owned_only: bool,
) -> Vec<BorrowedMessage<'c>> {
    let mut batch = Vec::new();
    let deadline = Instant::now() + wait;
    let mut revocations = consumer.context().revocations();
    while batch.len() < limit {
        let timeout = if batch.is_empty() {
            first
        } else {
            whole_millis(deadline.saturating_duration_since(Instant::now()))
        };
        let last_look = !batch.is_empty() && timeout.is_zero();
        let polled = consumer.poll(timeout);
        if owned_only {
            let now = consumer.context().revocations();
            if now != revocations {
                revocations = now;
                if !batch.is_empty() {
                    tracing::info!(
                        records = batch.len(),
                        "dropping records polled before a revocation"
                    );
                    batch.clear();
                }
            }
        }
        match polled {
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => {
                metrics.kafka_errors_total.with_label_values(&["consume"]).inc();
                consumer.context().note_error(&e);
                tracing::warn!(error = %e, "consumer error");
                break;
            }
            None => {
                if batch.is_empty() || last_look || Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    batch
}

/// The whole milliseconds of `wait`. rust-rdkafka hands librdkafka only the
/// whole milliseconds of a poll's timeout and polls out the fraction left
/// with no timeout, in a busy loop; so a batch is closed when less than a
/// millisecond of its wait is left, after one last look that does not wait.
fn whole_millis(wait: Duration) -> Duration {
    Duration::from_millis(wait.as_millis() as u64)
}

/// The offsets to commit after a batch: one past the last record of each
/// partition.
pub fn next_offsets(batch: &[impl Input]) -> TopicPartitionList {
    let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for r in batch {
        let r = r.view();
        let e = last.entry((r.topic, r.partition)).or_insert(r.offset);
        *e = (*e).max(r.offset);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in last {
        // Adding to a fresh list cannot fail for a valid partition number.
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1));
    }
    tpl
}

/// Moves the consumer back to the first record of each partition in the
/// batch, so a batch that was not made durable is read again.
pub fn rewind(consumer: &BaseConsumer<StageContext>, batch: &[impl Input]) {
    seek_to(consumer, &starts(batch));
}

/// The offset of each partition's first record in the batch: where
/// [`seek_to`] rewinds it to.
pub fn starts(batch: &[impl Input]) -> Vec<(String, i32, i64)> {
    let mut first: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for r in batch {
        let r = r.view();
        let e = first.entry((r.topic, r.partition)).or_insert(r.offset);
        *e = (*e).min(r.offset);
    }
    first
        .into_iter()
        .map(|((topic, partition), offset)| (topic.to_string(), partition, offset))
        .collect()
}

/// Moves the consumer to `starts` ([`starts`] of a batch).
pub fn seek_to(consumer: &BaseConsumer<StageContext>, starts: &[(String, i32, i64)]) {
    for (topic, partition, offset) in starts {
        if let Err(e) = consumer.seek(
            topic,
            *partition,
            Offset::Offset(*offset),
            Duration::from_secs(10),
        ) {
            // The partition may have moved to another instance in a
            // rebalance; its new owner starts from the committed offset.
            tracing::info!(%topic, partition, error = %e, "could not rewind partition");
        }
    }
}
