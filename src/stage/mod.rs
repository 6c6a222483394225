//! Stages: the Kafka loops that wire the pure core to topics.
//!
//! [`route`] reads `agent.actions` and writes packets, allowed records, dead
//! letters and pending state. Each stage runs on its own thread with
//! librdkafka's blocking clients (a transaction is a sequence of blocking
//! calls anyway); the async side (HTTP, signals, the matrix watcher) lives in
//! [`run`].

pub mod batch;
pub mod escalate;
pub mod helpers;
pub mod route;
mod run;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;

pub use run::{RunError, RunSummary, run, run_with_clock};

use crate::metrics::Metrics;

/// A consumer context that exports lag and logs rebalances. `assigned`
/// feeds readiness: an instance with no partitions is still serving its
/// group, but one that never got an assignment is not ready.
pub struct StageContext {
    pub metrics: Metrics,
    pub assigned: AtomicBool,
    /// Unready while every broker is unreachable.
    health: Option<crate::http::Health>,
    brokers_down: AtomicBool,
    /// Revocations so far: records polled before one belong to partitions
    /// that may have moved, see [`batch::poll_owned_batch`].
    revocations: AtomicU64,
    /// Run before partitions are revoked, while this instance still holds
    /// them: the route stage makes its batches in flight durable and
    /// commits their offsets there, so the partitions' next owner starts
    /// after them.
    on_revoke: Mutex<Option<RevokeHook>>,
    /// Run once partitions are assigned, before a record of theirs is
    /// polled: the route stage brings its seen index up to the changelog's
    /// end there (see [`crate::changelog::CatchUp`]).
    on_assign: Mutex<Option<AssignHook>>,
    /// Set when the broker refused an asynchronous offset commit.
    commit_refused: AtomicBool,
}

/// See [`StageContext::set_on_revoke`].
pub type RevokeHook = Box<dyn Fn(&BaseConsumer<StageContext>) + Send + Sync>;

/// See [`StageContext::set_on_assign`].
pub type AssignHook = Box<dyn Fn() + Send + Sync>;

impl StageContext {
    pub fn new(metrics: Metrics) -> Self {
        StageContext {
            metrics,
            assigned: AtomicBool::new(false),
            health: None,
            brokers_down: AtomicBool::new(false),
            revocations: AtomicU64::new(0),
            on_revoke: Mutex::new(None),
            on_assign: Mutex::new(None),
            commit_refused: AtomicBool::new(false),
        }
    }

    /// Sets (or with `None` clears) what runs before partitions are
    /// revoked. It runs on the thread polling the consumer, inside the poll.
    pub fn set_on_revoke(&self, hook: Option<RevokeHook>) {
        match self.on_revoke.lock() {
            Ok(mut slot) => *slot = hook,
            Err(poisoned) => *poisoned.into_inner() = hook,
        }
    }

    /// Sets (or with `None` clears) what runs once partitions are
    /// assigned. It runs on the thread polling the consumer, inside the
    /// poll, so no record of the new partitions is handed out before it
    /// returns.
    pub fn set_on_assign(&self, hook: Option<AssignHook>) {
        match self.on_assign.lock() {
            Ok(mut slot) => *slot = hook,
            Err(poisoned) => *poisoned.into_inner() = hook,
        }
    }

    /// Revocations so far.
    pub fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::Acquire)
    }

    /// Whether the broker refused an offset commit since the last call.
    pub fn take_commit_refused(&self) -> bool {
        self.commit_refused.swap(false, Ordering::AcqRel)
    }

    pub fn with_health(mut self, health: crate::http::Health) -> Self {
        self.health = Some(health);
        self
    }

    /// Notes a client error: when no broker is reachable the stage is
    /// unready until one is again.
    pub fn note_error(&self, error: &KafkaError) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
            && !self.brokers_down.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(%error, "no broker reachable; unready until one is");
            if let Some(health) = &self.health {
                health.set_ready(false, "no Kafka broker reachable");
            }
        }
    }

    /// A broker answered (statistics saw one up, or a batch committed).
    pub fn brokers_back(&self) {
        if self.brokers_down.swap(false, Ordering::AcqRel) {
            tracing::info!("a broker is reachable again");
            if let Some(health) = &self.health {
                health.set_ready(true, "");
            }
        }
    }
}

impl ClientContext for StageContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics
            .kafka_errors_total
            .with_label_values(&["client"])
            .inc();
        tracing::error!(%error, reason, "kafka client error");
        self.note_error(&error);
    }

    fn stats(&self, statistics: Statistics) {
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.brokers_back();
        }
        for (name, topic) in &statistics.topics {
            for (id, partition) in &topic.partitions {
                if let Some(lag) = lag(partition).filter(|_| *id >= 0) {
                    self.metrics.set_consumer_lag(name, *id, lag);
                }
            }
        }
    }
}

/// Records behind the end of a partition: from the consumer's position,
/// since with exactly-once the offsets are committed by the transactional
/// producer and librdkafka's own `consumer_lag` (from the committed offset
/// this consumer last saw) never moves. The end is the last stable offset,
/// as the stages read committed records only.
fn lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    if end >= 0 && p.app_offset >= 0 {
        Some((end - p.app_offset).max(0))
    } else {
        (p.consumer_lag >= 0).then_some(p.consumer_lag)
    }
}

impl StageContext {
    /// `assigned_partitions{topic}`: the stages use eager assignors, so an
    /// assignment is the whole set and a revocation takes it all.
    fn count_partitions(&self, tpl: &rdkafka::TopicPartitionList, assigned: bool) {
        let mut counts: std::collections::BTreeMap<String, i64> = Default::default();
        for e in tpl.elements() {
            *counts.entry(e.topic().to_string()).or_default() += i64::from(assigned);
            if !assigned {
                self.metrics.forget_consumer_lag(e.topic(), e.partition());
            }
        }
        for (topic, n) in counts {
            self.metrics
                .assigned_partitions
                .with_label_values(&[topic.as_str()])
                .set(n);
        }
    }
}

impl ConsumerContext for StageContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            let hook = match self.on_revoke.lock() {
                Ok(slot) => slot,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some(hook) = hook.as_ref() {
                hook(consumer);
            }
            self.revocations.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &rdkafka::TopicPartitionList,
    ) {
        if let Err(error) = result {
            self.metrics
                .kafka_errors_total
                .with_label_values(&["commit"])
                .inc();
            tracing::debug!(%error, "offset commit refused");
            self.commit_refused.store(true, Ordering::Release);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // First, so that the partitions count as assigned (the
                // metric, the log) once the stage can take their records.
                if tpl.count() > 0 {
                    let hook = match self.on_assign.lock() {
                        Ok(slot) => slot,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    if let Some(hook) = hook.as_ref() {
                        hook();
                    }
                }
                self.assigned.store(true, Ordering::Release);
                self.count_partitions(tpl, true);
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                self.count_partitions(tpl, false);
                tracing::info!(partitions = tpl.count(), "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// A name for this stage instance among the group's: the host (a pod name
/// on Kubernetes), the pid, and a counter, so instances on one machine or in
/// one process never share a transactional id. Zombies are fenced by the
/// consumer group generation that transactions carry (KIP-447), not by id.
pub fn instance_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{host}-{}-{n}", std::process::id())
}
