//! The route stage: `agent.actions` → lane topics, `actions.allowed`,
//! `switchboard.dlq`, and the pending changelog.
//!
//! Per batch: poll records, take the live matrix once, decode → enrich →
//! route → build packets for every record (partitions in parallel, each
//! partition in order), drop actions already seen, then hand every output and
//! the next offsets to the [`Sink`] as one unit. Only once the sink reports
//! the batch durable are its actions marked seen and its metrics counted; a
//! batch that was not made durable is rewound and handled again.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::StageContext;
use super::batch::{Input, next_offsets, poll_owned_batch, rewind, seek_to, starts};
use super::helpers::Helpers;
use crate::changelog::TableReader;
use crate::clock::Clock;
use crate::config::{Config, Guarantee};
use crate::decode::Decoder;
use crate::dedup::SeenIndex;
use crate::dlq;
use crate::encode::{self, Raw};
use crate::enrich::{Directory, enrich};
use crate::http::Health;
use crate::kafka::{CLOSE_LIMIT, KafkaStageError, close_consumer, consumer_config};
use crate::matrix::{LaneId, Matrix, RuleId};
use crate::metrics::Metrics;
use crate::packet::{self, PacketInput};
use crate::pending::{LaneState, PendingRecord, Status};
use crate::pipeline::Pipeline;
use crate::reload::MatrixHandle;
use crate::route::route;
use crate::sink::{DELIVERY_POLL, Output, Sink, SinkError};
use crate::transactions::{Open, Transactions};

/// Everything the route stage shares with the rest of the process.
/// Room kept free in every routed output for what the escalation stage adds
/// to the pending record later (steps, assignees, rosters), plus per lane
/// for its verdict (a Decision's approver and comment are bounded, see
/// [`crate::decision`]).
pub const GROWTH_ROOM: usize = 16 * 1024;
pub const GROWTH_ROOM_PER_LANE: usize = 8 * 1024;

pub struct RouteStage {
    pub config: Arc<Config>,
    pub matrix: Arc<MatrixHandle>,
    pub decoder: Decoder,
    pub directory: Arc<Directory>,
    pub seen: Arc<SeenIndex>,
    pub metrics: Metrics,
    pub health: Health,
    /// Time for packets and latency; see [`crate::clock`].
    pub clock: Arc<dyn Clock>,
}

/// What handling one record produced.
#[derive(Debug)]
pub enum Handled {
    Routed(Routed),
    Dead { output: Output, reason: &'static str },
}

#[derive(Debug)]
pub struct Routed {
    pub action_id: String,
    pub occurred_at: DateTime<Utc>,
    pub outputs: Vec<Output>,
    /// (lane, rule) pairs that fired, as indexes into the matrix the
    /// record was routed with; empty when allowed.
    pub fired: Vec<(LaneId, RuleId)>,
}

/// What a run did, for `--max-events` callers and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RouteSummary {
    pub handled: u64,
    pub routed: u64,
    pub allowed: u64,
    pub dead: u64,
    pub duplicates: u64,
}

impl RouteStage {
    /// Runs until `stop` is set or `--max-events` records are committed.
    pub fn run(&self, stop: Arc<AtomicBool>) -> Result<RouteSummary, KafkaStageError> {
        let config = &self.config;
        let (seen_reader, _directory_reader) = self.start_readers(stop.clone())?;

        let consumer: BaseConsumer<StageContext> = consumer_config(config, &config.group_id)
            .create_with_context(StageContext::new(self.metrics.clone()).with_health(self.health.clone()))
            .map_err(KafkaStageError::kafka("creating the route consumer"))?;
        let catch_up = seen_reader.catch_up();
        let metrics = self.metrics.clone();
        consumer.context().set_on_assign(Some(Box::new(move || {
            let started = Instant::now();
            let caught_up = catch_up.now(CATCH_UP_LIMIT);
            metrics
                .seen_catch_up_seconds
                .observe(started.elapsed().as_secs_f64());
            if caught_up {
                tracing::debug!(took = ?started.elapsed(), "seen index caught up with the changelog");
            } else {
                metrics.kafka_errors_total.with_label_values(&["catch_up"]).inc();
                tracing::error!(
                    limit = ?CATCH_UP_LIMIT,
                    "the seen index did not catch up with the changelog; routing the new partitions anyway: \
                     an action their last owner routed and its agent sends again may open a second approval"
                );
            }
        })));
        consumer
            .subscribe(&[config.topics.actions.as_str()])
            .map_err(KafkaStageError::kafka("subscribing to the actions topic"))?;
        let sink = Sink::new(
            config,
            &format!("{}-route-{}", config.group_id, super::instance_id()),
        )
        .map_err(KafkaStageError::kafka("creating the route producer"))?
        .with_health(self.health.clone());
        sink.warm_up(config, &self.matrix.current());
        self.health.set_ready(true, "");
        tracing::info!(topic = %config.topics.actions, guarantee = ?config.guarantee, "route stage running");

        let summary = std::thread::scope(|scope| {
            let helpers = Helpers::per_core(scope, MAX_HELPERS, "route-helper");
            match config.guarantee {
                Guarantee::ExactlyOnce => self.run_transactions(&consumer, sink, &stop, &helpers),
                Guarantee::AtLeastOnce => Ok(self.run_pipelined(&consumer, sink, &stop, &helpers)),
            }
        })?;
        self.health.set_ready(false, "shutting down");
        close_consumer(consumer, CLOSE_LIMIT);
        tracing::info!(?summary, "route stage stopped");
        Ok(summary)
    }

    /// How many records the next batch may take: `--max-events` counts the
    /// ones in flight too.
    fn limit(&self, handled: u64) -> usize {
        match self.config.max_events {
            Some(max) => max.saturating_sub(handled).min(self.config.batch_size as u64) as usize,
            None => self.config.batch_size,
        }
    }

    /// Exactly once: one transaction per batch, with its offsets. While a
    /// batch's transaction is open, its records travelling, this thread
    /// reads and routes the next batch (see [`crate::transactions`]).
    /// Actions in the open transaction count as seen for the batch after
    /// it, as in flight at least once.
    fn run_transactions<'s>(
        &'s self,
        consumer: &'s BaseConsumer<StageContext>,
        sink: Sink,
        stop: &AtomicBool,
        helpers: &Helpers<'s>,
    ) -> Result<RouteSummary, KafkaStageError> {
        let config = &self.config;
        let txns: Arc<Mutex<Transactions<InFlightBatch>>> = Arc::new(Mutex::new(Transactions::new(sink)));
        {
            let txns = txns.clone();
            consumer
                .context()
                .set_on_revoke(Some(Box::new(move |_| lock(&txns).finish())));
        }
        let mut in_flight = InFlightIds::default();
        let mut summary = RouteSummary::default();
        let mut backoff = Duration::from_millis(50);
        let result = 'run: loop {
            let (open, records) = {
                let t = lock(&txns);
                (t.is_open(), t.records() as u64)
            };
            let limit = if stop.load(Ordering::Relaxed) {
                0
            } else {
                self.limit(summary.handled + records)
            };
            if limit == 0 && !open {
                break Ok(());
            }
            let mut next = if limit > 0 {
                // With a transaction open, only what has arrived: its
                // commit waits for this.
                let first = if open {
                    Duration::ZERO
                } else {
                    Duration::from_millis(100)
                };
                let batch = poll_owned_batch(consumer, limit, first, config.batch_wait, &self.metrics);
                (!batch.is_empty()).then(|| {
                    let batch = Arc::new(batch);
                    let matrix = self.matrix.current();
                    let handled = self.handle_batch(&batch, &matrix, self.clock.now(), helpers);
                    let (outputs, fresh, counts) = self.assemble(handled, &mut in_flight);
                    let done = InFlightBatch {
                        topics: batch_topic_counts(&batch),
                        matrix,
                        fresh,
                        counts,
                    };
                    (batch, outputs, done)
                })
            } else {
                None
            };
            let finished = {
                let mut t = lock(&txns);
                t.finish();
                t.take_finished()
            };
            for (batch, result) in finished {
                match result {
                    Ok(()) => {
                        backoff = Duration::from_millis(50);
                        let completed = vec![(batch.done, batch.records)];
                        self.settle(consumer, completed, Vec::new(), &mut in_flight, &mut summary);
                    }
                    Err(SinkError::Fatal(reason)) => break 'run Err(reason),
                    Err(error) => {
                        // Read again from its start; the next batch, read
                        // past it, goes too.
                        if let Some((next, _, done)) = next.take() {
                            rewind(consumer, &next);
                            forget(&mut in_flight, &done);
                        }
                        seek_to(consumer, &batch.starts);
                        forget(&mut in_flight, &batch.done);
                        self.back_off(&error, batch.records, &mut backoff);
                    }
                }
            }
            let Some((batch, outputs, done)) = next else {
                continue;
            };
            let open = Open {
                starts: starts(&batch),
                records: batch.len(),
                done,
            };
            let sent = lock(&txns).send(&outputs, &next_offsets(&batch), consumer, open);
            match sent {
                Ok(()) => {}
                Err((_, SinkError::Fatal(reason))) => break Err(reason),
                Err((open, error)) => {
                    rewind(consumer, &batch);
                    forget(&mut in_flight, &open.done);
                    self.back_off(&error, open.records, &mut backoff);
                }
            }
        };
        consumer.context().set_on_revoke(None);
        result.map(|()| summary).map_err(|reason| {
            self.health.set_ready(false, &reason);
            KafkaStageError::Other(reason)
        })
    }

    /// A batch that was not made durable: counted, and the stage unready
    /// through a backoff before the batch is read again.
    fn back_off(&self, error: &SinkError, records: usize, backoff: &mut Duration) {
        self.metrics
            .transactions_total
            .with_label_values(&["abort"])
            .inc();
        let reason = error.to_string();
        self.health.set_ready(false, &reason);
        tracing::warn!(%reason, records, "batch not durable; handling it again");
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        self.health.set_ready(true, "");
    }

    /// At least once: batches pipelined (see [`crate::pipeline`]); this
    /// thread reads and routes the next batch while earlier ones are written.
    /// Actions in flight count as seen for the batches after them, and are
    /// marked seen for good once their batch is durable.
    fn run_pipelined<'s>(
        &'s self,
        consumer: &'s BaseConsumer<StageContext>,
        sink: Sink,
        stop: &Arc<AtomicBool>,
        helpers: &Helpers<'s>,
    ) -> RouteSummary {
        let config = &self.config;
        let pipeline: Arc<Mutex<Pipeline<InFlightBatch>>> =
            Arc::new(Mutex::new(Pipeline::new(sink, config.topics.pending.clone())));
        {
            let pipeline = pipeline.clone();
            let stop = stop.clone();
            consumer.context().set_on_revoke(Some(Box::new(move |consumer| {
                let mut pipeline = lock(&pipeline);
                let stopping = || stop.load(Ordering::Relaxed);
                pipeline.drain(consumer, &stopping, REVOKE_DRAIN_LIMIT);
                pipeline.forget_offsets();
            })));
        }
        // Action ids of the batches in flight.
        let mut in_flight = InFlightIds::default();
        let mut summary = RouteSummary::default();
        loop {
            let (completed, abandoned) = {
                let mut p = lock(&pipeline);
                p.service(consumer);
                if consumer.context().take_commit_refused() {
                    p.recommit(consumer);
                }
                (p.take_completed(), p.take_abandoned())
            };
            self.settle(consumer, completed, abandoned, &mut in_flight, &mut summary);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let (depth, records) = {
                let p = lock(&pipeline);
                (p.len(), p.records() as u64)
            };
            let limit = self.limit(summary.handled + records);
            if limit == 0 && depth == 0 {
                break;
            }
            if limit == 0 || depth >= MAX_IN_FLIGHT {
                lock(&pipeline).wait(consumer, DELIVERY_POLL);
                continue;
            }
            // With writes in flight the consumer is polled in short waits so
            // their acknowledgements are taken promptly.
            let first = if depth > 0 {
                DELIVERY_POLL
            } else {
                Duration::from_millis(100)
            };
            let polling = Instant::now();
            let batch = Arc::new(poll_owned_batch(
                consumer,
                limit,
                first,
                config.batch_wait,
                &self.metrics,
            ));
            if batch.is_empty() {
                continue;
            }
            let matrix = self.matrix.current();
            let started = Instant::now();
            let polled = started.duration_since(polling);
            let handled = self.handle_batch(&batch, &matrix, self.clock.now(), helpers);
            let routed = started.elapsed();
            // Batches the revocation hook finished or gave up while polling
            // are settled before this one is checked for duplicates.
            let (completed, abandoned) = {
                let mut p = lock(&pipeline);
                (p.take_completed(), p.take_abandoned())
            };
            self.settle(consumer, completed, abandoned, &mut in_flight, &mut summary);
            let (outputs, fresh, counts) = self.assemble(handled, &mut in_flight);
            let offsets = next_offsets(&batch);
            let done = InFlightBatch {
                topics: batch_topic_counts(&batch),
                matrix,
                fresh,
                counts,
            };
            lock(&pipeline).push(outputs, &offsets, batch.len(), done);
            tracing::debug!(records = batch.len(), ?polled, ?routed, elapsed = ?started.elapsed(), "batch sent");
        }
        // Stopping (or --max-events reached): the batches in hand are
        // finished and committed unless the broker is away.
        let (completed, abandoned) = {
            let mut p = lock(&pipeline);
            let stopping = || true;
            p.drain(consumer, &stopping, REVOKE_DRAIN_LIMIT);
            (p.take_completed(), p.take_abandoned())
        };
        self.settle(consumer, completed, abandoned, &mut in_flight, &mut summary);
        consumer.context().set_on_revoke(None);
        summary
    }

    /// Bookkeeping for batches the pipeline finished or gave up.
    fn settle(
        &self,
        consumer: &BaseConsumer<StageContext>,
        completed: Vec<(InFlightBatch, usize)>,
        abandoned: Vec<InFlightBatch>,
        in_flight: &mut InFlightIds,
        summary: &mut RouteSummary,
    ) {
        for (done, records) in completed {
            consumer.context().brokers_back();
            for r in &done.fresh {
                in_flight.remove(&r.action_id);
            }
            summary.add(records, &done.counts);
            self.committed(&done.topics, &done.matrix, done.fresh, &done.counts);
        }
        for done in abandoned {
            forget(in_flight, &done);
        }
    }

    /// Starts the readers of the pending changelog (seen actions) and the
    /// directory topics, and waits until both have caught up: routing before
    /// would let a redelivered action through.
    fn start_readers(&self, stop: Arc<AtomicBool>) -> Result<(TableReader, TableReader), KafkaStageError> {
        let seen = self.seen.clone();
        let seen_reader = TableReader::spawn(
            &self.config,
            "pending",
            vec![self.config.topics.pending.clone()],
            Box::new(move |_, key, value| match (std::str::from_utf8(key), value) {
                (Ok(id), Some(_)) => seen.note(id),
                (Ok(id), None) => seen.remove(id),
                _ => {}
            }),
            stop.clone(),
        )?;
        let matrix = self.matrix.current();
        let tables: BTreeMap<String, String> = matrix
            .directory
            .iter()
            .map(|t| (t.topic.clone(), t.name.clone()))
            .collect();
        let directory = self.directory.clone();
        let directory_reader = TableReader::spawn(
            &self.config,
            "directory",
            tables.keys().cloned().collect(),
            Box::new(move |topic, key, value| {
                if let Some(table) = tables.get(topic)
                    && !directory.apply(table, key, value)
                {
                    tracing::warn!(%topic, "directory record is not a JSON object; ignored");
                }
            }),
            stop.clone(),
        )?;
        self.health
            .set_ready(false, "loading the pending changelog and directory");
        while !stop.load(Ordering::Relaxed) {
            if seen_reader.wait_caught_up(&stop, Duration::from_secs(1))
                && directory_reader.wait_caught_up(&stop, Duration::from_secs(1))
            {
                break;
            }
        }
        tracing::info!(
            seen = self.seen.len(),
            directory = self.directory.len(),
            "state restored"
        );
        Ok((seen_reader, directory_reader))
    }

    /// Handles a batch, shared with the helpers when it is large enough to
    /// pay for waking them: handling one record is pure, so the batch is cut
    /// into contiguous slices, and joining their results in slice order
    /// keeps the batch's order (which the duplicate check after it relies
    /// on).
    pub fn handle_batch<'s, R: Input + Send + 's>(
        &'s self,
        batch: &Arc<Vec<R>>,
        matrix: &Arc<Matrix>,
        now: DateTime<Utc>,
        helpers: &Helpers<'s>,
    ) -> Vec<Handled> {
        if helpers.is_empty() || batch.len() < PARALLEL_FROM {
            return batch.iter().map(|r| self.handle(r, matrix, now)).collect();
        }
        let slice = batch.len().div_ceil(helpers.len() + 1);
        let results: Vec<_> = (slice..batch.len())
            .step_by(slice)
            .enumerate()
            .map(|(i, from)| {
                let (batch, matrix) = (batch.clone(), matrix.clone());
                helpers.run(i, move || {
                    let to = (from + slice).min(batch.len());
                    batch[from..to]
                        .iter()
                        .map(|r| self.handle(r, &matrix, now))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // This thread takes the first slice rather than waiting idle.
        let mut handled: Vec<Handled> = batch[..slice]
            .iter()
            .map(|r| self.handle(r, matrix, now))
            .collect();
        handled.reserve(batch.len() - slice);
        for result in results {
            match result.recv() {
                Ok(part) => handled.extend(part),
                // handle() does not panic on input; if it ever did, the
                // stage stops rather than dropping records (the scope
                // re-raises the helper's panic).
                Err(_) => panic!("a routing helper stopped with its slice of the batch unhandled"),
            }
        }
        // One result per record, in order: a record without one would be
        // committed unwritten.
        debug_assert_eq!(
            handled.len(),
            batch.len(),
            "every record of the batch handled once"
        );
        handled
    }

    /// Handles one record: never fails, every record becomes outputs or a
    /// dead letter.
    pub fn handle(&self, record: &impl Input, matrix: &Matrix, now: DateTime<Utc>) -> Handled {
        let started = Instant::now();
        let record = record.view();
        let dead = |reason: &'static str, error: &str| Handled::Dead {
            output: dlq::dead_letter(
                &self.config.topics.dlq,
                record,
                reason,
                error,
                now,
                self.config.max_message_bytes(),
            ),
            reason,
        };
        let Some(payload) = record.payload else {
            return dead("empty", "record has no value");
        };
        let mut scratch = Vec::new();
        let action = match self.decoder.decode_in(payload, &mut scratch) {
            Ok(a) => a,
            Err(e) => return dead(e.reason(), &e.to_string()),
        };
        let enrichment = enrich(matrix, &action, &self.directory);
        let routing = route(matrix, &action, &enrichment);
        let input = PacketInput {
            matrix,
            action: &action,
            enrichment: &enrichment,
            routing: &routing,
            decisions_topic: &self.config.topics.decisions,
            routed_at: now,
        };
        // Each packet is serialized once: its bytes go to its topic and,
        // embedded as they are, into the pending record.
        let mut packets: Vec<(&str, Vec<u8>)> = Vec::with_capacity(routing.lanes.len().max(1));
        // A packet carries most of the action's text plus a kilobyte or so
        // of its own (rules, context, deadlines, how to decide).
        let packet_capacity = payload.len() + 1024;
        let mut fired = Vec::new();
        let mut lanes = Vec::with_capacity(routing.lanes.len());
        for hit in &routing.lanes {
            let lane = &matrix.lanes[hit.lane];
            let packet = packet::for_lane(&input, hit);
            match encode::to_vec_with_capacity(&packet, packet_capacity) {
                Ok(bytes) => packets.push((&lane.topic, bytes)),
                Err(e) => return dead("internal", &format!("serializing the packet: {e}")),
            }
            fired.extend(hit.rules.iter().map(|r| (hit.lane, *r)));
            let sla_due = packet
                .sla_due
                .unwrap_or_else(|| packet::sla_due(&action, lane.sla));
            let remind_at = lane
                .remind
                .and_then(|share| share.of_window(action.occurred_at, sla_due))
                .filter(|at| *at > now);
            lanes.push(LaneState::opened(lane, sla_due, remind_at));
        }
        // The pending record carries the review lanes' packets, which
        // escalations are built from; an allowed action's packet is never
        // needed again (its outcome is `approved` with no verdicts), so it
        // goes to its topic only.
        let pending = PendingRecord {
            action_id: Cow::Borrowed(&action.action_id),
            status: if routing.review() {
                Status::Open
            } else {
                Status::Allowed
            },
            revision: 0,
            matrix_version: Cow::Borrowed(&matrix.version),
            occurred_at: action.occurred_at,
            routed_at: now,
            lanes,
            packets: packets.iter().map(|(_, bytes)| Raw(bytes)).collect(),
            outcome: None,
            closed_at: None,
        };
        let pending_capacity = 512 + packets.iter().map(|(_, bytes)| bytes.len() + 512).sum::<usize>();
        let pending = match encode::to_vec_with_capacity(&pending, pending_capacity) {
            Ok(bytes) => bytes,
            Err(e) => return dead("internal", &format!("serializing the pending record: {e}")),
        };
        if !routing.review() {
            match encode::to_vec_with_capacity(&packet::allowed(&input), packet_capacity) {
                Ok(bytes) => packets.push((&self.config.topics.allowed, bytes)),
                Err(e) => return dead("internal", &format!("serializing the packet: {e}")),
            }
        }
        let key = action.action_id.as_bytes().to_vec();
        let mut outputs = Vec::with_capacity(packets.len() + 1);
        for (topic, bytes) in packets {
            outputs.push(Output {
                topic: topic.to_string(),
                key: Some(key.clone()),
                payload: Some(bytes),
                headers: Vec::new(),
            });
        }
        outputs.push(Output {
            topic: self.config.topics.pending.clone(),
            key: Some(key),
            payload: Some(pending),
            headers: Vec::new(),
        });
        // Every output must stay writable, now and as the escalation stage
        // adds verdicts and steps to the pending record: one the producer
        // refused would be retried forever and stop the stage here.
        let limit = self
            .config
            .max_message_bytes()
            .saturating_sub(GROWTH_ROOM + GROWTH_ROOM_PER_LANE * routing.lanes.len());
        if let Some(big) = outputs.iter().find(|o| o.wire_size() > limit) {
            return dead(
                "too_large",
                &format!(
                    "its record for {} would be {} bytes, over the {limit}-byte limit of what switchboard writes \
                     (message.max.bytes less room for the approval's later revisions)",
                    big.topic,
                    big.wire_size()
                ),
            );
        }
        self.metrics
            .route_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        Handled::Routed(Routed {
            action_id: action.action_id.to_string(),
            occurred_at: action.occurred_at,
            outputs,
            fired,
        })
    }

    /// Drops actions already seen (earlier, in a batch still in flight, or
    /// earlier in this batch) and flattens the rest into the batch's
    /// outputs; their ids join `in_flight`.
    fn assemble(
        &self,
        handled: Vec<Handled>,
        in_flight: &mut InFlightIds,
    ) -> (Vec<Output>, Vec<Routed>, Counts) {
        let mut outputs = Vec::with_capacity(handled.len() * 3);
        let mut fresh: Vec<Routed> = Vec::with_capacity(handled.len());
        let mut counts = Counts::default();
        for h in handled {
            match h {
                Handled::Dead { output, reason } => {
                    outputs.push(output);
                    counts.dead += 1;
                    *counts.dead_by_reason.entry(reason).or_default() += 1;
                }
                Handled::Routed(mut r) => {
                    if self.seen.contains(&r.action_id) || !in_flight.insert(r.action_id.clone()) {
                        counts.duplicates += 1;
                        continue;
                    }
                    if r.fired.is_empty() {
                        counts.allowed += 1;
                    } else {
                        counts.routed += 1;
                    }
                    outputs.append(&mut r.outputs);
                    fresh.push(r);
                }
            }
        }
        (outputs, fresh, counts)
    }

    /// Bookkeeping once a batch is durable: its actions are seen, and its
    /// metrics count (routed actions per lane and rule added up for the
    /// batch first: a labelled counter costs a hashed lookup per use).
    fn committed(
        &self,
        topics: &BTreeMap<String, u64>,
        matrix: &Matrix,
        fresh: Vec<Routed>,
        counts: &Counts,
    ) {
        let m = &self.metrics;
        m.transactions_total.with_label_values(&["commit"]).inc();
        for (topic, n) in topics {
            m.events_consumed_total.with_label_values(&[topic]).inc_by(*n);
        }
        m.events_allowed_total.inc_by(counts.allowed);
        m.duplicates_total.inc_by(counts.duplicates);
        for (reason, n) in &counts.dead_by_reason {
            m.dead_letters_total.with_label_values(&[reason]).inc_by(*n);
        }
        let now = self.clock.now();
        let mut routed: BTreeMap<(LaneId, RuleId), u64> = BTreeMap::new();
        for r in fresh {
            for pair in &r.fired {
                *routed.entry(*pair).or_default() += 1;
            }
            let latency = (now - r.occurred_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
            m.end_to_end_latency_seconds.observe(latency);
            self.seen.insert(r.action_id);
        }
        for ((lane, rule), n) in routed {
            if let (Some(lane), Some(rule)) = (matrix.lanes.get(lane), matrix.rules.get(rule)) {
                m.events_routed_total
                    .with_label_values(&[lane.name.as_str(), rule.name.as_str()])
                    .inc_by(n);
            }
        }
    }
}

/// The smallest batch shared with the helpers: waking one and taking its
/// results back costs about as much as handling a record or two; the
/// slices must be worth it.
const PARALLEL_FROM: usize = 32;

/// Helper threads beyond the loop thread, at most.
const MAX_HELPERS: usize = 3;

/// How many batches the at-least-once pipeline keeps in flight: enough to
/// route one while the writes of those before it travel, few enough to
/// bound memory (each holds its outputs until acknowledged: at most 1,000
/// records of a few KB each). Measured on tansu with actions arriving
/// steadily at 16,000/s, where batches are small: p50 latency 1.3 s with
/// 4 in flight, 0.44 s with 16, 0.42 s with 64; bulk throughput alike.
const MAX_IN_FLIGHT: usize = 16;

/// Action ids of the batches in flight (agents' ids: a seeded hasher, as
/// the seen index's).
type InFlightIds = HashSet<String, foldhash::fast::RandomState>;

/// How long a revocation (or a stop) waits for the batches in flight
/// before giving up on them: well inside the group's max.poll.interval.ms.
const REVOKE_DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// How long an assignment waits for the seen index to catch up with the
/// changelog before routing anyway (and saying so): long enough for a
/// reader behind by a burst, well inside the group's max.poll.interval.ms,
/// as the wait runs inside a poll.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);

/// What the route stage keeps of a batch in flight, for when it is durable.
struct InFlightBatch {
    topics: BTreeMap<String, u64>,
    /// The matrix the batch was routed with, which its `fired` indexes.
    matrix: Arc<Matrix>,
    fresh: Vec<Routed>,
    counts: Counts,
}

/// A batch that was not made durable: its actions leave the in-flight set,
/// to be routed again when their records come back.
fn forget(in_flight: &mut InFlightIds, done: &InFlightBatch) {
    for r in &done.fresh {
        in_flight.remove(&r.action_id);
    }
}

/// Records per input topic of a batch.
fn batch_topic_counts(batch: &[impl Input]) -> BTreeMap<String, u64> {
    let mut by_topic: BTreeMap<String, u64> = BTreeMap::new();
    for r in batch {
        let topic = r.view().topic;
        if let Some(n) = by_topic.get_mut(topic) {
            *n += 1;
        } else {
            by_topic.insert(topic.to_string(), 1);
        }
    }
    by_topic
}

/// The lock of the pipeline (or the transactions); it is only ever taken
/// on the stage's own thread (the revocation hook runs inside the
/// consumer's poll, between two uses), so a poisoned lock only means a
/// panic already unwinding, and its state is still the truth about what
/// was sent.
fn lock<T>(writes: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match writes.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl RouteSummary {
    fn add(&mut self, records: usize, counts: &Counts) {
        self.handled += records as u64;
        self.routed += counts.routed;
        self.allowed += counts.allowed;
        self.dead += counts.dead;
        self.duplicates += counts.duplicates;
    }
}

#[derive(Debug, Default)]
struct Counts {
    routed: u64,
    allowed: u64,
    dead: u64,
    duplicates: u64,
    dead_by_reason: BTreeMap<&'static str, u64>,
}
