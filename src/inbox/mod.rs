//! `switchboard inbox LANE`: what waits for a person at a lane.
//!
//! A plain reader (partitions assigned, no consumer group, nothing
//! committed, `read_committed`), so running it never disturbs the stages or
//! anyone else. It reads the lane's topic, `approvals.outcomes` and the
//! pending changelog from the beginning into an [`state::Inbox`], prints
//! the entries still waiting (the newest step of each), and with `follow`
//! keeps reading and prints each new step, and each entry it showed that
//! closes, as it arrives.

pub mod render;
pub mod state;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::BaseConsumer;

use crate::clock::Clock;
use crate::config::Config;
use crate::decision::Outcome;
use crate::kafka::{KafkaStageError, reader_config};
use crate::matrix::Matrix;
use crate::packet::OwnedApprovalRequest;
use crate::pending::OwnedPendingRecord;
use state::{Inbox, Key, Status};

/// How entries are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A block per entry for a person.
    Text,
    /// One JSON packet per line, with an `inbox` member.
    Json,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The lane's topic.
    pub topic: String,
    pub outcomes_topic: String,
    pub pending_topic: String,
    /// Also show entries that are no longer waiting (closed, decided,
    /// escalated elsewhere), marked as such.
    pub all: bool,
    /// Keep reading and print what arrives.
    pub follow: bool,
    pub output: Output,
}

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error(transparent)]
    Kafka(#[from] KafkaStageError),
    #[error("topic {0} does not exist (is the lane right? --matrix or --topic name its topic)")]
    NoTopic(String),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("rendering a packet as JSON: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The topic of `lane`: the matrix's, or `approvals.<lane>` without one.
pub fn lane_topic(lane: &str, matrix: Option<&Matrix>) -> Result<String, String> {
    match matrix {
        None => Ok(format!("approvals.{lane}")),
        Some(m) => m.lane(lane).map(|id| m.lanes[id].topic.clone()).ok_or_else(|| {
            let lanes: Vec<&str> = m.lanes.iter().map(|l| l.name.as_str()).collect();
            format!(
                "lane {lane:?} is not in the matrix (its lanes: {})",
                lanes.join(", ")
            )
        }),
    }
}

/// How long the first read may take to reach the end of the topics.
const CATCH_UP: Duration = Duration::from_secs(60);

/// Prints the inbox to `out`; with `follow`, keeps going until `stop`.
/// Returns how many entries were waiting after the first read.
pub fn run(
    config: &Config,
    options: &Options,
    out: &mut dyn Write,
    clock: &dyn Clock,
    stop: &AtomicBool,
) -> Result<usize, InboxError> {
    let consumer: BaseConsumer = reader_config(config)
        .create()
        .map_err(KafkaStageError::kafka("creating the inbox reader"))?;
    let targets = assign(&consumer, options)?;
    let mut inbox = Inbox::new();
    let mut printer = Printer {
        options,
        shown: HashMap::new(),
    };

    let deadline = Instant::now() + CATCH_UP;
    let mut watch = crate::changelog::EndWatch::new(targets);
    while !watch.reached(&consumer) && !stop.load(Ordering::Relaxed) {
        if Instant::now() >= deadline {
            tracing::warn!(
                limit = ?CATCH_UP,
                "the topics were not read to their end in time; showing what was read"
            );
            break;
        }
        let polled = consumer.poll(Duration::from_millis(100));
        watch.polled(polled.as_ref());
        if let Some(result) = polled {
            take(result, options, &mut inbox);
        }
    }
    // Records that are ready now (a broker may report a high watermark
    // short of the end) belong to the first listing too.
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(result) => {
                take(result, options, &mut inbox);
            }
            None => break,
        }
    }

    tracing::debug!(topic = %options.topic, entries = inbox.items().len(), "read to the end");
    let now = clock.now();
    let mut waiting = 0;
    for item in inbox.items() {
        if item.status.is_waiting() {
            waiting += 1;
        }
        if options.all || item.status.is_waiting() {
            printer.print(out, &item, now, false)?;
        }
    }
    if options.output == Output::Text {
        let summary = match waiting {
            0 => format!("nothing waiting on {}", options.topic),
            1 => format!("1 approval waiting on {}", options.topic),
            n => format!("{n} approvals waiting on {}", options.topic),
        };
        writeln!(out, "{summary}")?;
        if options.follow {
            writeln!(
                out,
                "following {}; new packets appear below (ctrl-c to stop)\n",
                options.topic
            )?;
        }
    }
    out.flush()?;
    if !options.follow {
        return Ok(waiting);
    }

    while !stop.load(Ordering::Relaxed) {
        let mut touched = BTreeSet::new();
        // Whatever is ready, then print once.
        let mut wait = Duration::from_millis(200);
        while let Some(result) = consumer.poll(wait) {
            touched.extend(take(result, options, &mut inbox));
            wait = Duration::ZERO;
            if touched.len() >= 1000 {
                break;
            }
        }
        let now = clock.now();
        for key in &touched {
            if let Some(item) = inbox.item(key) {
                printer.print_change(out, &item, now)?;
            }
        }
        out.flush()?;
    }
    Ok(waiting)
}

/// Assigns every partition of the three topics from the beginning; returns
/// the high watermarks to read to.
fn assign(consumer: &BaseConsumer, options: &Options) -> Result<Vec<(String, i32, i64)>, InboxError> {
    let topics: BTreeSet<&str> = [
        options.topic.as_str(),
        options.outcomes_topic.as_str(),
        options.pending_topic.as_str(),
    ]
    .into_iter()
    .collect();
    let topics: Vec<&str> = topics.into_iter().collect();
    let (targets, missing) = crate::changelog::assign_from_beginning(consumer, &topics, None)?;
    for topic in missing {
        if topic == options.topic {
            return Err(InboxError::NoTopic(topic));
        }
        tracing::warn!(%topic, "topic not found; reading it as empty");
    }
    tracing::debug!(partitions = targets.len(), "inbox reader assigned");
    Ok(targets)
}

/// Folds one polled record into the inbox; returns the entries it touched.
/// Records that do not parse are logged and skipped.
fn take<M: Message>(
    result: Result<M, rdkafka::error::KafkaError>,
    options: &Options,
    inbox: &mut Inbox,
) -> Vec<Key> {
    let m = match result {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "inbox reader error");
            return Vec::new();
        }
    };
    let skip = |what: &str, error: &dyn std::fmt::Display| {
        tracing::warn!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            error = %error,
            "skipping a record that is not {what}"
        );
    };
    let topic = m.topic();
    if topic == options.topic {
        let Some(bytes) = m.payload() else {
            return Vec::new();
        };
        match serde_json::from_slice::<OwnedApprovalRequest>(bytes) {
            Ok(packet) => inbox.packet(packet).into_iter().collect(),
            Err(e) => {
                skip("a packet", &e);
                Vec::new()
            }
        }
    } else if topic == options.outcomes_topic {
        let Some(bytes) = m.payload() else {
            return Vec::new();
        };
        match serde_json::from_slice::<Outcome<'static>>(bytes) {
            Ok(outcome) => inbox.outcome(outcome),
            Err(e) => {
                skip("an outcome", &e);
                Vec::new()
            }
        }
    } else if topic == options.pending_topic {
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            return Vec::new();
        };
        match m.payload().map(serde_json::from_slice::<OwnedPendingRecord>) {
            None => inbox.pending(key, None),
            Some(Ok(record)) => inbox.pending(key, Some(record)),
            Some(Err(e)) => {
                skip("a pending record", &e);
                Vec::new()
            }
        }
    } else {
        Vec::new()
    }
}

/// Prints entries and remembers what it printed of each, so following
/// prints a new step or a change of status once.
struct Printer<'a> {
    options: &'a Options,
    shown: HashMap<Key, (u64, Status)>,
}

impl Printer<'_> {
    fn print(
        &mut self,
        out: &mut dyn Write,
        item: &state::Item<'_>,
        now: chrono::DateTime<chrono::Utc>,
        update: bool,
    ) -> Result<(), InboxError> {
        match self.options.output {
            Output::Json => writeln!(out, "{}", render::json(item, now)?)?,
            Output::Text if update && !item.status.is_waiting() => write!(out, "{}", render::update(item))?,
            Output::Text => write!(out, "{}", render::text(item, now))?,
        }
        self.shown
            .insert(item.key.clone(), (item.seq, item.status.clone()));
        Ok(())
    }

    /// While following: a new step or reminder that waits, or a change of
    /// an entry already shown (or, with `all`, of any entry).
    fn print_change(
        &mut self,
        out: &mut dyn Write,
        item: &state::Item<'_>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), InboxError> {
        let before = self.shown.get(item.key);
        if before == Some(&(item.seq, item.status.clone())) {
            return Ok(());
        }
        if self.options.all || item.status.is_waiting() || before.is_some_and(|(_, s)| s.is_waiting()) {
            self.print(out, item, now, true)?;
        }
        Ok(())
    }
}
