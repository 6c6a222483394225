//! Table readers: whole compacted topics read into memory and kept current.
//!
//! The seen-action index (from `switchboard.pending`) and the enrichment
//! directory (from `directory.<table>`) are both "every key's latest value
//! of a compacted topic". A reader is assigned every partition (no consumer
//! group: every instance needs the whole table), reads from the beginning,
//! reports when it has caught up with the high watermarks it saw at start,
//! and then keeps tailing until told to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::kafka::{CLOSE_LIMIT, KafkaStageError, close_consumer, reader_config, restore_reader_config};

/// Where a whole-topic read stops: (topic, partition, high watermark seen
/// when it began), for the partitions that held anything.
pub type Ends = Vec<(String, i32, i64)>;

/// Assigns every partition of `topics` (only partition `only` when given)
/// from the beginning and returns their ends, plus the topics that do not
/// exist (for the caller to refuse or read as empty).
pub fn assign_from_beginning(
    consumer: &BaseConsumer,
    topics: &[&str],
    only: Option<i32>,
) -> Result<(Ends, Vec<String>), KafkaStageError> {
    let timeout = Duration::from_secs(10);
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    let mut missing = Vec::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(KafkaStageError::kafka(format!("reading metadata of {topic}")))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == *topic && t.error().is_none() && !t.partitions().is_empty());
        let Some(found) = found else {
            missing.push(topic.to_string());
            continue;
        };
        for p in found
            .partitions()
            .iter()
            .filter(|p| only.is_none_or(|o| o == p.id()))
        {
            assignment
                .add_partition_offset(topic, p.id(), Offset::Beginning)
                .map_err(KafkaStageError::kafka("building the assignment"))?;
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .map_err(KafkaStageError::kafka(format!("reading watermarks of {topic}")))?;
            if high > 0 {
                ends.push((topic.to_string(), p.id(), high));
            }
        }
    }
    consumer
        .assign(&assignment)
        .map_err(KafkaStageError::kafka("assigning a reader"))?;
    Ok((ends, missing))
}

/// Receives each record: topic, key, and value (`None` for a tombstone).
pub type Apply = Box<dyn FnMut(&str, &[u8], Option<&[u8]>) + Send>;

/// A running reader; dropping it stops and joins its thread.
pub struct TableReader {
    caught_up: Arc<AtomicBool>,
    halt: Arc<AtomicBool>,
    catch_up: CatchUp,
    handle: Option<JoinHandle<()>>,
}

/// Asks a running [`TableReader`] to read up to the topics' ends as they
/// are now. The route stage asks at every assignment, before it routes a
/// record of the partitions it was given: their last owner's pending
/// records must be in the seen index by then, or an action that owner
/// routed and its agent sent again could open a second approval.
#[derive(Clone)]
pub struct CatchUp {
    requests: mpsc::Sender<mpsc::Sender<()>>,
}

impl CatchUp {
    /// Waits until the reader has read everything its topics held when
    /// asked (up to the last stable offsets, as it reads committed records
    /// only), or `limit` passes; says whether it has.
    pub fn now(&self, limit: Duration) -> bool {
        let (reply, done) = mpsc::channel();
        self.requests.send(reply).is_ok() && done.recv_timeout(limit).is_ok()
    }
}

impl TableReader {
    /// Starts reading `topics`. Topics that do not exist are read as empty.
    pub fn spawn(
        config: &Config,
        name: &str,
        topics: Vec<String>,
        mut apply: Apply,
        stop: Arc<AtomicBool>,
    ) -> Result<TableReader, KafkaStageError> {
        let consumer: BaseConsumer = reader_config(config)
            .create()
            .map_err(KafkaStageError::kafka(format!("creating the {name} reader")))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let (targets, missing) = assign_from_beginning(&consumer, &names, None)?;
        for topic in missing {
            tracing::info!(%topic, reader = name, "topic not found; reading it as empty");
        }
        let caught_up = Arc::new(AtomicBool::new(targets.is_empty()));
        let flag = caught_up.clone();
        let halt = Arc::new(AtomicBool::new(false));
        let halted = halt.clone();
        let (requests, asked) = mpsc::channel::<mpsc::Sender<()>>();
        let reader = name.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("{name}-reader"))
            .spawn(move || {
                let mut records = 0u64;
                let mut watch = EndWatch::new(targets);
                // A catch-up asked for: where it ends, and whom to tell.
                let mut asking: Option<(EndWatch, Vec<mpsc::Sender<()>>)> = None;
                while !stop.load(Ordering::Relaxed) && !halted.load(Ordering::Relaxed) {
                    let mut replies: Vec<_> = asked.try_iter().collect();
                    if !replies.is_empty() {
                        // Ends read now cover an earlier request's too.
                        if let Some((_, earlier)) = asking.take() {
                            replies.extend(earlier);
                        }
                        asking = Some((EndWatch::new(ends_now(&consumer)), replies));
                    }
                    // Short polls: an idle reader notices a catch-up asked
                    // for only between them, and the stage waits on it.
                    let polled = consumer.poll(Duration::from_millis(10));
                    watch.polled(polled.as_ref());
                    if let Some((asked_watch, _)) = asking.as_mut() {
                        asked_watch.polled(polled.as_ref());
                    }
                    match polled {
                        Some(Ok(m)) => {
                            records += 1;
                            apply(m.topic(), m.key().unwrap_or_default(), m.payload());
                        }
                        Some(Err(e)) => tracing::warn!(reader = %reader, error = %e, "table reader error"),
                        None => {}
                    }
                    if !flag.load(Ordering::Relaxed) && watch.reached(&consumer) {
                        tracing::info!(reader = %reader, records, "table caught up");
                        flag.store(true, Ordering::Release);
                    }
                    if let Some((asked_watch, replies)) = asking.as_mut()
                        && asked_watch.reached(&consumer)
                    {
                        for reply in replies.drain(..) {
                            // The asker may have given up waiting.
                            let _ = reply.send(());
                        }
                        asking = None;
                    }
                }
                close_consumer(consumer, CLOSE_LIMIT);
            })
            .map_err(|e| KafkaStageError::Other(format!("starting the {name} reader: {e}")))?;
        Ok(TableReader {
            caught_up,
            halt,
            catch_up: CatchUp { requests },
            handle: Some(handle),
        })
    }

    /// A handle that asks this reader to catch up (see [`CatchUp`]).
    pub fn catch_up(&self) -> CatchUp {
        self.catch_up.clone()
    }

    /// Whether everything present at start has been read.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Waits (polling the flag) until caught up, `stop` is set, or `limit` passes.
    pub fn wait_caught_up(&self, stop: &AtomicBool, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while !self.caught_up() && !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
            std::thread::park_timeout(Duration::from_millis(20));
        }
        self.caught_up()
    }
}

impl Drop for TableReader {
    fn drop(&mut self) {
        self.halt.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            // The thread checks `halt` at least every 100 ms, then closes
            // its consumer within `CLOSE_LIMIT`.
            let _ = h.join();
        }
    }
}

/// Tells when a whole-topic read has reached its ends. Asking librdkafka
/// for positions is a round trip to its main thread (asked after every
/// record, it was 40% of a restore's time), so it is asked only when a
/// record reaches its partition's end or the queue runs dry: the end may
/// be a transaction marker, which no record reaches.
pub struct EndWatch {
    targets: Ends,
    check: bool,
}

impl EndWatch {
    pub fn new(targets: Ends) -> EndWatch {
        EndWatch { targets, check: true }
    }

    /// Notes what a poll returned: a record (`Some(Ok)`), an error, or
    /// nothing.
    pub fn polled<M: Message>(&mut self, polled: Option<&Result<M, rdkafka::error::KafkaError>>) {
        self.check |= match polled {
            Some(Ok(m)) => self.targets.iter().any(|(topic, partition, end)| {
                *partition == m.partition() && m.offset() + 1 >= *end && topic == m.topic()
            }),
            Some(Err(_)) | None => true,
        };
    }

    /// Whether every partition's position has reached its end.
    pub fn reached(&mut self, consumer: &BaseConsumer) -> bool {
        std::mem::take(&mut self.check) && reached(consumer, &self.targets)
    }
}

/// The ends of every partition `consumer` is assigned, as they are now:
/// the last stable offsets, since a reader reads committed records only
/// (librdkafka lists offsets at the consumer's isolation level). A
/// partition whose end cannot be read now is left out (its records still
/// come; the catch-up just does not wait for them), rather than hold the
/// stage.
fn ends_now(consumer: &BaseConsumer) -> Ends {
    let Ok(assignment) = consumer.assignment() else {
        return Vec::new();
    };
    assignment
        .elements()
        .iter()
        .filter_map(|e| {
            match consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10)) {
                Ok((_, high)) => (high > 0).then(|| (e.topic().to_string(), e.partition(), high)),
                Err(error) => {
                    tracing::warn!(topic = e.topic(), partition = e.partition(), %error, "cannot read a partition's end");
                    None
                }
            }
        })
        .collect()
}

/// Positions (which step over transaction markers, unlike the offsets of
/// records) have reached every start-time high watermark.
fn reached(consumer: &BaseConsumer, targets: &[(String, i32, i64)]) -> bool {
    let Ok(positions) = consumer.position() else {
        return false;
    };
    targets.iter().all(|(topic, partition, high)| {
        matches!(
            positions.find_partition(topic, *partition).map(|e| e.offset()),
            Some(Offset::Offset(pos)) if pos >= *high
        )
    })
}

/// A record read back by [`read_all`].
pub type ReadRecord = crate::kafka::InputRecord;

/// Reads every committed record of `topics` as of now (up to the high
/// watermarks seen at the start), giving up after `limit`. For the demo,
/// tests and tools that inspect outputs.
pub fn read_all(
    config: &Config,
    topics: &[&str],
    limit: Duration,
) -> Result<Vec<ReadRecord>, KafkaStageError> {
    read_partitions(config, topics, None, 0, limit)
}

/// Like [`read_all`], for one partition of one topic. It reads at least to
/// `at_least` (see [`read_partition_each`]).
pub fn read_partition(
    config: &Config,
    topic: &str,
    partition: i32,
    at_least: i64,
    limit: Duration,
) -> Result<Vec<ReadRecord>, KafkaStageError> {
    let mut out = Vec::new();
    let consumer: BaseConsumer = reader_config(config)
        .create()
        .map_err(KafkaStageError::kafka("creating a reader"))?;
    read_each(&consumer, &[topic], Some(partition), at_least, limit, |m| {
        out.push(ReadRecord::copy_of(m))
    })?;
    Ok(out)
}

/// How the escalation stage restores a partition's state: hands each record
/// of one partition of `topic` (key, value; `None` for a tombstone) to
/// `each` as it is read, so a restore never holds the whole partition's
/// bytes at once. It reads at least to `at_least` (the group's committed
/// offset), even when the broker reports a lower high watermark: what lies
/// before the committed offset the group consumer will not read again, so
/// the restore must. Returns how many records it read and the offset after
/// the last one it handed to `each` (0 for none).
pub fn read_partition_each(
    config: &Config,
    topic: &str,
    partition: i32,
    at_least: i64,
    limit: Duration,
    mut each: impl FnMut(Option<&[u8]>, Option<&[u8]>),
) -> Result<(u64, i64), KafkaStageError> {
    let consumer: BaseConsumer = restore_reader_config(config)
        .create()
        .map_err(KafkaStageError::kafka("creating a restore reader"))?;
    let mut records = 0u64;
    let mut after = 0i64;
    let mut apply = |m: &rdkafka::message::BorrowedMessage<'_>| {
        records += 1;
        after = after.max(m.offset() + 1);
        each(m.key(), m.payload())
    };
    read_each(&consumer, &[topic], Some(partition), at_least, limit, &mut apply)?;
    // What the last fetch brought past the high watermark is read too: a
    // broker may report a watermark short of records it serves (tansu
    // 0.6.0 does, by whole batches), and the group consumer, sought to
    // where this read ends, would wait for them until the next write.
    while let Some(polled) = consumer.poll(Duration::ZERO) {
        match polled {
            Ok(m) => apply(&m),
            Err(e) => tracing::warn!(error = %e, "reader error"),
        }
    }
    Ok((records, after))
}

fn read_partitions(
    config: &Config,
    topics: &[&str],
    only: Option<i32>,
    at_least: i64,
    limit: Duration,
) -> Result<Vec<ReadRecord>, KafkaStageError> {
    let consumer: BaseConsumer = reader_config(config)
        .create()
        .map_err(KafkaStageError::kafka("creating a reader"))?;
    let mut out = Vec::new();
    read_each(&consumer, topics, only, at_least, limit, |m| {
        out.push(ReadRecord::copy_of(m))
    })?;
    Ok(out)
}

fn read_each(
    consumer: &BaseConsumer,
    topics: &[&str],
    only: Option<i32>,
    at_least: i64,
    limit: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), KafkaStageError> {
    let (mut targets, _) = assign_from_beginning(consumer, topics, only)?;
    // The committed offset may lie beyond what the broker calls the end.
    for (_, _, end) in &mut targets {
        *end = (*end).max(at_least);
    }
    if targets.is_empty()
        && at_least > 0
        && let (Some(topic), Some(partition)) = (topics.first(), only)
    {
        targets.push((topic.to_string(), partition, at_least));
    }
    if targets.is_empty() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + limit;
    let mut watch = EndWatch::new(targets);
    while !watch.reached(consumer) {
        if std::time::Instant::now() >= deadline {
            return Err(KafkaStageError::Other(format!(
                "reading {topics:?} did not reach the end within {limit:?}"
            )));
        }
        let polled = consumer.poll(Duration::from_millis(100));
        watch.polled(polled.as_ref());
        match polled {
            Some(Ok(m)) => each(&m),
            Some(Err(e)) => tracing::warn!(error = %e, "reader error"),
            None => {}
        }
    }
    Ok(())
}
