//! Exactly-once writes, the next batch routed while one commits.
//!
//! A producer has one transaction open at a time, so batches cannot be in
//! flight together as they are at least once ([`crate::pipeline`]). What can
//! overlap is the wait: once batch N's records and offsets are sent in its
//! transaction they travel on librdkafka's threads, and the stage reads and
//! routes batch N+1 meanwhile. Only then is N committed, and N+1 sent in a
//! transaction of its own. Done one after the other, the stage's thread sat
//! idle through every acknowledgement wait: on the mock cluster that wait
//! was about 4 ms of a 1,000-record batch's 9, routing about 2.
//!
//! A revocation commits the open transaction before the partitions go (the
//! offsets it commits are where their next owner reads from); its result
//! comes back to the stage's loop as any other does, through
//! [`Transactions::take_finished`].

use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::topic_partition_list::TopicPartitionList;

use crate::sink::{Output, Sink, SinkError};

/// A batch whose transaction is sent and not yet finished, with the
/// caller's bookkeeping `T`.
pub struct Open<T> {
    /// Where each of the batch's partitions starts: read again from there
    /// if the transaction aborts.
    pub starts: Vec<(String, i32, i64)>,
    pub records: usize,
    pub done: T,
}

/// A batch whose transaction committed (`Ok`) or was aborted.
pub type Finished<T> = (Open<T>, Result<(), SinkError>);

/// At most one transaction open, committed when the next batch is ready or
/// its partitions are revoked.
pub struct Transactions<T> {
    sink: Sink,
    open: Option<Open<T>>,
    finished: Vec<Finished<T>>,
}

impl<T> Transactions<T> {
    pub fn new(sink: Sink) -> Transactions<T> {
        Transactions {
            sink,
            open: None,
            finished: Vec::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Records of the batch in the open transaction.
    pub fn records(&self) -> usize {
        self.open.as_ref().map_or(0, |o| o.records)
    }

    /// Opens a transaction for a batch and sends its outputs and its
    /// consumer offsets in it (finishing the one open before, if any). On
    /// an error the transaction is aborted and the batch handed back.
    pub fn send<C: ConsumerContext>(
        &mut self,
        outputs: &[Output],
        offsets: &TopicPartitionList,
        consumer: &BaseConsumer<C>,
        batch: Open<T>,
    ) -> Result<(), (Open<T>, SinkError)> {
        self.finish();
        match self.sink.send_transaction(outputs, offsets, consumer) {
            Ok(()) => {
                self.open = Some(batch);
                Ok(())
            }
            Err(e) => Err((batch, e)),
        }
    }

    /// Commits the open transaction, if any (once its records are
    /// acknowledged); the outcome waits in [`Transactions::take_finished`].
    pub fn finish(&mut self) {
        if let Some(open) = self.open.take() {
            let result = self.sink.commit_transaction();
            self.finished.push((open, result));
        }
    }

    /// The batches finished since the last call, oldest first.
    pub fn take_finished(&mut self) -> Vec<Finished<T>> {
        std::mem::take(&mut self.finished)
    }
}
