//! What the demo feeds switchboard: the default matrix with SLAs of seconds,
//! the bundled sample actions (stamped with the time the demo runs, so their
//! SLAs start now), a directory record, and a few records that are not
//! actions at all.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::decode::{AGENT_ACTION_SCHEMA_ID, encode_json_as_avro, frame};

/// The default matrix, compiled in.
pub const MATRIX: &str = include_str!("../../deploy/matrix.yaml");

/// Every SLA of the demo's matrix: long enough for the demo's decisions to
/// land on the first step, short enough to watch chains run out.
pub const DEMO_SLA: Duration = Duration::from_secs(3);

const SAMPLES: &[(&str, &str)] = &[
    (
        "customer-data-export",
        include_str!("../../deploy/samples/customer-data-export.json"),
    ),
    (
        "refund-over-threshold",
        include_str!("../../deploy/samples/refund-over-threshold.json"),
    ),
    (
        "small-refund",
        include_str!("../../deploy/samples/small-refund.json"),
    ),
    (
        "production-config-change",
        include_str!("../../deploy/samples/production-config-change.json"),
    ),
    (
        "external-apology",
        include_str!("../../deploy/samples/external-apology.json"),
    ),
    (
        "permission-grant",
        include_str!("../../deploy/samples/permission-grant.json"),
    ),
    (
        "deadline-extension",
        include_str!("../../deploy/samples/deadline-extension.json"),
    ),
    (
        "low-confidence-draft",
        include_str!("../../deploy/samples/low-confidence-draft.json"),
    ),
    (
        "routine-search",
        include_str!("../../deploy/samples/routine-search.json"),
    ),
    (
        "production-export-to-partner",
        include_str!("../../deploy/samples/production-export-to-partner.json"),
    ),
];

/// The default matrix with every `sla:` (lanes and steps) cut to
/// [`DEMO_SLA`]; routing, packets and chains are exactly the default's.
pub fn demo_matrix() -> String {
    let sla = format!("{}s", DEMO_SLA.as_secs());
    MATRIX
        .lines()
        .map(|line| match line.split_once("sla:") {
            Some((indent, _)) if indent.trim().is_empty() || indent.trim() == "-" => {
                format!("{indent}sla: {sla}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect()
}

/// Moves the sample to `now`: `occurred_at` becomes `now` and the action's
/// own deadline keeps its distance from it.
fn shift_times(value: &mut serde_json::Value, now: DateTime<Utc>) -> Result<(), String> {
    let at = |v: &serde_json::Value| -> Result<DateTime<Utc>, String> {
        v.as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
            .ok_or_else(|| format!("{v} is not a time"))
    };
    let offset = now - at(&value["occurred_at"])?;
    let stamp = |t: DateTime<Utc>| serde_json::Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true));
    value["occurred_at"] = stamp(now);
    if let Some(deadline) = value.pointer_mut("/signals/deadline") {
        *deadline = stamp(at(deadline)? + offset);
    }
    Ok(())
}

pub struct Input {
    pub action_id: Option<String>,
    pub bytes: Vec<u8>,
}

/// The samples as JSON, one of them as Confluent-framed Avro (so both
/// formats are shown), a redelivery, and two records that are not actions.
pub fn inputs(now: DateTime<Utc>) -> Result<Vec<Input>, String> {
    let schema = apache_avro::Schema::parse_str(include_str!("../../schemas/agent_action.avsc"))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, text) in SAMPLES {
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("sample {name}: {e}"))?;
        shift_times(&mut value, now).map_err(|e| format!("sample {name}: {e}"))?;
        let id = value["action_id"].as_str().map(String::from);
        let bytes = if *name == "production-config-change" {
            frame(
                AGENT_ACTION_SCHEMA_ID,
                &encode_json_as_avro(&schema, &value).map_err(|e| format!("sample {name}: {e}"))?,
            )
        } else {
            serde_json::to_vec(&value).map_err(|e| format!("sample {name}: {e}"))?
        };
        out.push(Input { action_id: id, bytes });
    }
    out.push(Input {
        action_id: None,
        bytes: b"{\"action_id\": \"broken-1\", \"kind\": ".to_vec(),
    });
    out.push(Input {
        action_id: None,
        bytes: br#"{"action_id":"broken-2","occurred_at":"2026-01-01T09:00:00Z","agent_id":"a","summary":"no kind"}"#.to_vec(),
    });
    // An agent retrying: the same action again must not open a second approval.
    if let Some(refund) = out.get(1) {
        out.push(Input {
            action_id: refund.action_id.clone(),
            bytes: refund.bytes.clone(),
        });
    }
    Ok(out)
}

/// A producer partitioning like switchboard's own (murmur2), as every
/// decision writer must so decisions land beside their pending record.
pub fn producer(bootstrap: &str) -> Result<BaseProducer, String> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", "murmur2_random")
        .create()
        .map_err(|e| format!("creating the demo's producer: {e}"))
}

/// Sends records and waits until they are acknowledged.
pub fn send(producer: &BaseProducer, topic: &str, records: &[(String, Vec<u8>)]) -> Result<(), String> {
    for (key, bytes) in records {
        producer
            .send(BaseRecord::to(topic).key(key).payload(bytes))
            .map_err(|(e, _)| format!("publishing to {topic}: {e}"))?;
    }
    producer
        .flush(Duration::from_secs(10))
        .map_err(|e| format!("publishing to {topic}: {e}"))
}

/// The directory record the customer lane's escalation resolves its
/// account lead from.
pub fn accounts() -> Vec<(String, Vec<u8>)> {
    vec![(
        "acct-4471".into(),
        br#"{"name": "Initech GmbH", "tier": "enterprise", "lead": "lena"}"#.to_vec(),
    )]
}
