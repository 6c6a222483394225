//! `switchboard decide`: a person at a lane answers an approval by writing
//! a Decision to `approvals.decisions`, keyed by the action_id, with
//! switchboard's partitioner so that it lands on the partition of the
//! action's pending record (see the README's "Co-partitioning").
//!
//! Writing the Decision is all this does: whether it counts (the approval is
//! still open, on that lane, and the approver is on the current step's
//! roster) is the escalation stage's call, visible on `approvals.outcomes`
//! and in `decisions_rejected_total{reason}`.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::ClientContext;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

use crate::config::Config;
use crate::decision::{Decision, Verdict};
use crate::kafka::{KafkaStageError, decision_producer_config};

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("cannot encode the decision: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Kafka(#[from] KafkaStageError),
    #[error("the decision was not written to {topic}: {reason}")]
    NotDelivered { topic: String, reason: String },
    #[error("the decision was not acknowledged by the broker within {0:?}")]
    Timeout(Duration),
}

/// Where the broker stored a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A Decision with the fields DESIGN.md gives it, refusing empty names
/// (the escalation stage would refuse them as malformed).
pub fn decision(
    action_id: &str,
    lane: &str,
    verdict: Verdict,
    approver: &str,
    comment: Option<&str>,
    decided_at: DateTime<Utc>,
) -> Result<Decision, DecideError> {
    for (field, value) in [("the action id", action_id), ("--lane", lane), ("--by", approver)] {
        if value.trim().is_empty() {
            return Err(DecideError::Empty(field));
        }
    }
    Ok(Decision {
        action_id: action_id.to_string(),
        lane: lane.to_string(),
        verdict,
        approver: approver.to_string(),
        comment: comment.filter(|c| !c.is_empty()).map(str::to_string),
        decided_at,
    })
}

/// Keeps the one delivery report.
#[derive(Default)]
struct Report {
    result: Mutex<Option<Result<(i32, i64), String>>>,
}

impl ClientContext for Report {}

impl ProducerContext for Report {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        use rdkafka::Message as _;
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.to_string()),
        };
        if let Ok(mut slot) = self.result.lock() {
            *slot = Some(outcome);
        }
    }
}

/// Writes `decision` as JSON to `topic`, keyed by its action_id, and waits
/// for the broker's acknowledgement.
pub fn send(config: &Config, topic: &str, decision: &Decision) -> Result<Delivered, DecideError> {
    let producer: BaseProducer<Report> = decision_producer_config(config)
        .create_with_context(Report::default())
        .map_err(KafkaStageError::kafka("creating the decision producer"))?;
    let payload = serde_json::to_vec(decision)?;
    producer
        .send(
            BaseRecord::to(topic)
                .key(decision.action_id.as_bytes())
                .payload(&payload),
        )
        .map_err(|(e, _)| DecideError::NotDelivered {
            topic: topic.to_string(),
            reason: e.to_string(),
        })?;
    // The delivery timeout (30 s unless the operator sets one) reports a
    // failure before this gives up.
    let limit = delivery_timeout(config) + Duration::from_secs(10);
    // flush() also serves the delivery report; its own error only says that
    // the limit passed, which the missing report below says too.
    let _ = producer.flush(limit);
    let report = producer.context().result.lock().ok().and_then(|mut r| r.take());
    match report {
        Some(Ok((partition, offset))) => {
            tracing::debug!(topic, partition, offset, "decision acknowledged");
            Ok(Delivered {
                topic: topic.to_string(),
                partition,
                offset,
            })
        }
        Some(Err(reason)) => Err(DecideError::NotDelivered {
            topic: topic.to_string(),
            reason,
        }),
        None => Err(DecideError::Timeout(limit)),
    }
}

fn delivery_timeout(config: &Config) -> Duration {
    decision_producer_config(config)
        .get("message.timeout.ms")
        .or_else(|| config.kafka.get("delivery.timeout.ms"))
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_decision_has_the_design_fields() {
        let d = decision(
            "a-1",
            "finance",
            Verdict::NeedsContext,
            "fran",
            Some("which order?"),
            at(),
        )
        .unwrap();
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "action_id": "a-1", "lane": "finance", "verdict": "needs_context",
                "approver": "fran", "comment": "which order?", "decided_at": "2026-03-01T10:00:00Z",
            })
        );
        // What the escalation stage reads back.
        let read = Decision::decode(
            &serde_json::to_vec(&d).unwrap(),
            &crate::decode::SchemaDir::bundled(),
        )
        .unwrap();
        assert_eq!(read, d);
    }

    #[test]
    fn empty_names_are_refused() {
        assert!(matches!(
            decision("a-1", "finance", Verdict::Approve, " ", None, at()),
            Err(DecideError::Empty("--by"))
        ));
        assert!(matches!(
            decision("", "finance", Verdict::Approve, "fran", None, at()),
            Err(DecideError::Empty(_))
        ));
        let d = decision("a-1", "finance", Verdict::Approve, "fran", Some(""), at()).unwrap();
        assert_eq!(d.comment, None);
    }
}
