//! What must hold for any input to the four entry points hostile bytes
//! reach: [`Decoder::decode`] (agent actions, JSON or Confluent Avro),
//! [`Decision::decode`] and [`Matrix::parse`].
//!
//! Each check panics with the input's story when an invariant breaks, which
//! is what libFuzzer records as a crash and what fails a test. Beyond "no
//! panic", the checks are:
//!
//! * a refused record has a DLQ reason from [`DEAD_LETTER_REASONS`] and a
//!   message; one over the size limit is `too_large`, an empty one `empty`;
//! * an accepted action is valid (required fields present and not blank,
//!   blank optional text absent, a dotted kind, an amount that is finite,
//!   non-negative and exact, a confidence within 0..1, an ISO currency);
//! * an accepted action re-encoded as JSON decodes to the same action, and
//!   re-encoded as Avro decodes to the same action up to what Avro carries
//!   (timestamps in milliseconds, confidence as a double);
//! * an accepted decision names its action, lane and approver, and comes
//!   back the same through JSON and through Avro;
//! * a matrix text gives the same result (and the same version) every time
//!   it is parsed; an accepted matrix is consistent (every lane, rule and
//!   step refers to lanes that exist) and routes every bundled sample.

#![allow(dead_code)]

use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use switchboard::action::AgentAction;
use switchboard::decision::Decision;
use switchboard::decode::{
    AGENT_ACTION_SCHEMA_ID, DEAD_LETTER_REASONS, DEFAULT_MAX_RECORD_BYTES, Decoder, SchemaDir, SchemaSource,
    encode_json_as_avro, frame,
};
use switchboard::enrich::{Directory, enrich};
use switchboard::explain::explain;
use switchboard::matrix::{Matrix, MatrixError};

/// The id `schemas/ids.json` gives `decision.avsc`.
pub const DECISION_SCHEMA_ID: u32 = 2;

/// The size limit of [`decoder`]: the service's default.
pub const LIMIT: usize = DEFAULT_MAX_RECORD_BYTES;

/// The bundled samples (`deploy/samples`), routed through every matrix that
/// loads.
pub const SAMPLES: &[&str] = &[
    include_str!("../../deploy/samples/customer-data-export.json"),
    include_str!("../../deploy/samples/deadline-extension.json"),
    include_str!("../../deploy/samples/external-apology.json"),
    include_str!("../../deploy/samples/low-confidence-draft.json"),
    include_str!("../../deploy/samples/permission-grant.json"),
    include_str!("../../deploy/samples/production-config-change.json"),
    include_str!("../../deploy/samples/production-export-to-partner.json"),
    include_str!("../../deploy/samples/refund-over-threshold.json"),
    include_str!("../../deploy/samples/routine-search.json"),
    include_str!("../../deploy/samples/small-refund.json"),
];

/// The bundled schemas, as the service loads them by default.
pub fn schemas() -> &'static SchemaDir {
    static SCHEMAS: OnceLock<SchemaDir> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        // As `switchboard run` does before any stage decodes.
        switchboard::decode::bound_avro_allocations(LIMIT);
        SchemaDir::bundled()
    })
}

/// A decoder as the route stage builds one: bundled schemas, default limit.
pub fn decoder() -> &'static Decoder {
    static DECODER: OnceLock<Decoder> = OnceLock::new();
    DECODER.get_or_init(|| Decoder::new(Arc::new(schemas().clone()), LIMIT))
}

fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() > 400 {
        let head: String = text.chars().take(400).collect();
        format!("{head:?}… ({} bytes)", bytes.len())
    } else {
        format!("{text:?}")
    }
}

// ------------------------------------------------------------- actions ----

/// Decodes one record with `decoder` (whose limit must be [`LIMIT`]) and
/// checks every invariant; returns the action when it was accepted.
pub fn check_action_record(decoder: &Decoder, bytes: &[u8]) -> Option<AgentAction<'static>> {
    match decoder.decode(bytes) {
        Err(e) => {
            let reason = e.reason();
            assert!(DEAD_LETTER_REASONS.contains(&reason), "unknown reason {reason}");
            assert!(!e.to_string().trim().is_empty(), "an error without a message");
            assert_eq!(
                reason == "too_large",
                bytes.len() > LIMIT,
                "{bytes_len} bytes refused as {reason}: {e}",
                bytes_len = bytes.len()
            );
            let blank = bytes.iter().all(|b| b.is_ascii_whitespace());
            assert_eq!(
                reason == "empty",
                blank && bytes.len() <= LIMIT,
                "refused as {reason}: {e}"
            );
            None
        }
        Ok(action) => {
            assert!(bytes.len() <= LIMIT, "a record over the limit was accepted");
            let action = action.into_owned();
            check_action(&action, bytes);
            check_json_round_trip(decoder, &action);
            check_avro_round_trip(decoder, &action);
            Some(action)
        }
    }
}

fn not_blank(field: &str, value: &str, input: &[u8]) {
    assert!(
        !value.trim().is_empty(),
        "{field} accepted blank ({value:?}) from {}",
        show(input)
    );
}

/// What every accepted action satisfies.
pub fn check_action(a: &AgentAction<'_>, input: &[u8]) {
    for (field, value) in [
        ("action_id", &a.action_id),
        ("agent_id", &a.agent_id),
        ("kind", &a.kind),
        ("summary", &a.summary),
    ] {
        not_blank(field, value, input);
    }
    let optional = [
        ("fleet", &a.fleet),
        ("tenant", &a.tenant),
        ("run_id", &a.run_id),
        ("reason", &a.reason),
        ("payload", &a.payload),
        ("target.system", &a.target.system),
        ("target.resource", &a.target.resource),
        ("target.account_id", &a.target.account_id),
        ("signals.currency", &a.signals.currency),
        ("signals.rollback_path", &a.signals.rollback_path),
        ("signals.blast_radius", &a.signals.blast_radius),
        ("signals.scope", &a.signals.scope),
        ("signals.destination", &a.signals.destination),
        ("signals.retention", &a.signals.retention),
        ("signals.incident_id", &a.signals.incident_id),
        ("signals.impact", &a.signals.impact),
        ("signals.alternatives", &a.signals.alternatives),
        ("signals.promises", &a.signals.promises),
    ];
    for (field, value) in optional {
        if let Some(v) = value {
            not_blank(field, v, input);
        }
    }
    for (key, value) in a.attributes.iter() {
        not_blank(&format!("attributes.{key}"), value, input);
    }
    assert!(
        a.kind.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        }),
        "kind {:?} accepted",
        a.kind
    );
    if let Some(amount) = a.signals.amount {
        // A Decimal cannot be NaN or infinite; it must also be exact text.
        assert!(amount >= Decimal::ZERO, "negative amount {amount} accepted");
        assert_eq!(
            Decimal::from_str_exact(&amount.to_string()).ok(),
            Some(amount),
            "amount {amount} does not read back"
        );
    }
    if let Some(c) = a.signals.confidence {
        assert!(
            (Decimal::ZERO..=Decimal::ONE).contains(&c),
            "confidence {c} accepted"
        );
    }
    if let Some(c) = &a.signals.currency {
        assert!(
            c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()),
            "currency {c:?} accepted"
        );
    }
}

/// The action written back in its JSON form decodes to itself.
pub fn check_json_round_trip(decoder: &Decoder, action: &AgentAction<'static>) {
    let json = serde_json::to_vec(action).expect("an action serializes");
    if json.len() > LIMIT {
        return;
    }
    let again = decoder.decode(&json).unwrap_or_else(|e| {
        panic!(
            "an accepted action, written as JSON, is refused: {e}\n{}",
            show(&json)
        )
    });
    assert_eq!(
        &again.into_owned(),
        action,
        "JSON round trip changed the action: {}",
        show(&json)
    );
}

fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).expect("a millisecond timestamp in range")
}

/// A decimal as it comes back from an Avro double: written by serde_json,
/// read back exactly.
fn through_double(d: Decimal) -> (f64, Decimal) {
    let f: f64 = d.to_string().parse().expect("a decimal reads as f64");
    let text = serde_json::to_string(&f).expect("a finite double");
    let back = if text.contains(['e', 'E']) {
        Decimal::from_scientific(&text)
    } else {
        Decimal::from_str(&text)
    };
    (f, back.expect("a double's text is a decimal"))
}

/// The action written as Avro (schema id 1) decodes to itself, with its
/// timestamps in milliseconds and its confidence through a double, which
/// is what the schema carries.
pub fn check_avro_round_trip(decoder: &Decoder, action: &AgentAction<'static>) {
    if action
        .signals
        .recipient_count
        .is_some_and(|n| i64::try_from(n).is_err())
    {
        return; // an Avro long cannot carry it
    }
    let schema = schemas()
        .schema(AGENT_ACTION_SCHEMA_ID)
        .expect("the bundled action schema");
    let mut value = serde_json::to_value(action).expect("an action serializes");
    let mut expected = action.clone();
    expected.occurred_at = to_millis(action.occurred_at);
    expected.signals.deadline = action.signals.deadline.map(to_millis);
    if let Some(c) = action.signals.confidence {
        let (f, back) = through_double(c);
        value["signals"]["confidence"] = serde_json::json!(f);
        expected.signals.confidence = Some(back);
    }
    let body = encode_json_as_avro(&schema, &value)
        .unwrap_or_else(|e| panic!("an accepted action does not encode as Avro: {e}\n{value}"));
    let framed = frame(AGENT_ACTION_SCHEMA_ID, &body);
    if framed.len() > LIMIT {
        return;
    }
    let again = decoder
        .decode(&framed)
        .unwrap_or_else(|e| panic!("an accepted action, written as Avro, is refused: {e}\n{value}"));
    assert_eq!(
        again.into_owned(),
        expected,
        "Avro round trip changed the action: {value}"
    );
}

// ----------------------------------------------------------- decisions ----

/// Decodes one decision record and checks every invariant; returns the
/// decision when it was accepted.
pub fn check_decision_record(bytes: &[u8]) -> Option<Decision> {
    match Decision::decode(bytes, schemas()) {
        Err(e) => {
            assert!(!e.to_string().trim().is_empty(), "a refusal without a message");
            None
        }
        Ok(d) => {
            for (field, value) in [
                ("action_id", &d.action_id),
                ("lane", &d.lane),
                ("approver", &d.approver),
            ] {
                not_blank(field, value, bytes);
            }
            let json = serde_json::to_vec(&d).expect("a decision serializes");
            let again = Decision::decode(&json, schemas()).unwrap_or_else(|e| {
                panic!(
                    "an accepted decision, written as JSON, is refused: {e}\n{}",
                    show(&json)
                )
            });
            assert_eq!(again, d, "JSON round trip changed the decision");

            let schema = schemas()
                .schema(DECISION_SCHEMA_ID)
                .expect("the bundled decision schema");
            let value = serde_json::to_value(&d).expect("a decision serializes");
            let body = encode_json_as_avro(&schema, &value)
                .unwrap_or_else(|e| panic!("an accepted decision does not encode as Avro: {e}\n{value}"));
            let again = Decision::decode(&frame(DECISION_SCHEMA_ID, &body), schemas()).unwrap_or_else(|e| {
                panic!("an accepted decision, written as Avro, is refused: {e}\n{value}")
            });
            let mut expected = d.clone();
            expected.decided_at = to_millis(d.decided_at);
            assert_eq!(again, expected, "Avro round trip changed the decision");
            Some(d)
        }
    }
}

// ------------------------------------------------------------- matrices ----

/// Parses `text` twice and checks every invariant; returns the matrix when
/// it was accepted.
pub fn check_matrix_text(text: &str) -> Option<Matrix> {
    let first = Matrix::parse(text, "fuzz");
    let second = Matrix::parse(text, "fuzz");
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a.version, b.version, "the version changed between two parses"),
        (Err(a), Err(b)) => assert_eq!(a, b, "the refusal changed between two parses"),
        (a, b) => panic!("two parses disagree: {:?} / {:?}", a.is_ok(), b.is_ok()),
    }
    let matrix = match first {
        Err(MatrixError::Invalid {
            file,
            line,
            col,
            message,
        }) => {
            assert_eq!(file, "fuzz");
            assert!(!message.trim().is_empty(), "a refusal without a message");
            // YAML breaks lines at \n, \r\n and a lone \r alike.
            let lines = text
                .replace("\r\n", "\n")
                .replace('\r', "\n")
                .lines()
                .count()
                .max(1);
            assert!(
                line >= 1 && line <= lines + 1 && col >= 1,
                "position {line}:{col} outside a {lines}-line text: {message}"
            );
            return None;
        }
        Err(MatrixError::Read { .. }) => panic!("parsing text cannot fail to read"),
        Ok(m) => m,
    };
    let hex = matrix
        .version
        .strip_prefix("sha256:")
        .expect("the version is sha256:…");
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "version {}",
        matrix.version
    );
    assert!(!matrix.lanes.is_empty(), "a matrix without lanes");
    let lanes = matrix.lanes.len();
    for lane in &matrix.lanes {
        assert!(!lane.roster.is_empty(), "lane {} has an empty roster", lane.name);
        assert!(!lane.sla.is_zero(), "lane {} has a zero SLA", lane.name);
        assert!(!lane.topic.is_empty(), "lane {} has no topic", lane.name);
        for step in &lane.escalation {
            assert!(step.lane < lanes, "a step of {} names no lane", lane.name);
            assert!(
                !step.roster.is_empty(),
                "a step of {} has an empty roster",
                lane.name
            );
            assert!(
                !step.assignee.trim().is_empty(),
                "a step of {} asks nobody",
                lane.name
            );
        }
    }
    for rule in &matrix.rules {
        assert!(rule.lane < lanes, "rule {} names no lane", rule.name);
    }
    let _ = matrix.run_tests();
    let directory = Directory::default();
    for sample in SAMPLES {
        let action = decoder()
            .decode(sample.as_bytes())
            .expect("a bundled sample decodes");
        let enrichment = enrich(&matrix, &action, &directory);
        let report = explain(&matrix, &action, &enrichment);
        assert_eq!(report.review, !report.lanes.is_empty());
        assert_eq!(report.matrix_version, matrix.version);
        for lane in &report.lanes {
            assert!(matrix.lane(lane).is_some(), "routed to unknown lane {lane}");
        }
    }
    Some(matrix)
}
