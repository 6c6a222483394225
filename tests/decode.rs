//! Decoding record bytes into AgentActions: the JSON form, Confluent-framed
//! Avro, and every way a record can be refused without panicking.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use switchboard::action::{Audience, DataClassification, Environment};
use switchboard::decode::{
    AGENT_ACTION_SCHEMA_ID, DEFAULT_MAX_RECORD_BYTES, DecodeError, Decoder, SchemaDir, SchemaError,
    SchemaSource, encode_json_as_avro, frame,
};

fn decoder() -> Decoder {
    Decoder::bundled()
}

fn dec(text: &str) -> Decimal {
    Decimal::from_str_exact(text).unwrap()
}

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

/// The smallest valid event; tests add or break fields on top of it.
fn minimal() -> Value {
    json!({
        "action_id": "a-1",
        "occurred_at": "2026-01-01T00:00:00Z",
        "agent_id": "agent-7",
        "kind": "refund.issue",
        "summary": "Refund order 42"
    })
}

/// An event with every field of DESIGN.md set.
fn full() -> Value {
    json!({
        "action_id": "a-123",
        "occurred_at": "2026-01-01T00:00:00Z",
        "agent_id": "support-agent-3",
        "fleet": "support",
        "tenant": "acme",
        "run_id": "run-99",
        "kind": "refund.issue",
        "summary": "Refund order 42 in full",
        "reason": "item arrived broken",
        "target": {
            "system": "billing",
            "resource": "order/42",
            "account_id": "acct-42",
            "environment": "production"
        },
        "signals": {
            "data_classification": "pii",
            "amount": "250.10",
            "currency": "USD",
            "recipient_count": 3,
            "audience": "external",
            "reversible": false,
            "rollback_path": "reverse the refund",
            "blast_radius": "one customer",
            "scope": "order 42",
            "destination": "customer inbox",
            "retention": "30 days",
            "incident_id": "inc-7",
            "impact": "keeps the customer",
            "alternatives": "store credit",
            "promises": "refund within 5 days",
            "permissions": ["billing:refund", "orders:read"],
            "deadline": "2026-01-01T00:10:00Z",
            "confidence": 0.75
        },
        "attributes": {"team": "growth", "ticket": "T-1"},
        "payload": "Refunded, sorry!"
    })
}

fn decode_json(value: &Value) -> Result<switchboard::action::AgentAction<'static>, DecodeError> {
    decoder()
        .decode(value.to_string().as_bytes())
        .map(switchboard::action::AgentAction::into_owned)
}

fn with_signal(key: &str, value: Value) -> Value {
    let mut v = minimal();
    v["signals"] = json!({ key: value });
    v
}

fn field_error(err: DecodeError) -> (String, String) {
    match err {
        DecodeError::Field { field, problem } => (field, problem),
        other => panic!("expected a field error, got {other:?}"),
    }
}

// ---------------------------------------------------------------- JSON ----

#[test]
fn full_event_keeps_every_field() {
    let a = decode_json(&full()).expect("full event decodes");
    assert_eq!(a.action_id, "a-123");
    assert_eq!(a.occurred_at, time("2026-01-01T00:00:00Z"));
    assert_eq!(a.agent_id, "support-agent-3");
    assert_eq!(a.fleet.as_deref(), Some("support"));
    assert_eq!(a.tenant.as_deref(), Some("acme"));
    assert_eq!(a.run_id.as_deref(), Some("run-99"));
    assert_eq!(a.kind, "refund.issue");
    assert_eq!(a.summary, "Refund order 42 in full");
    assert_eq!(a.reason.as_deref(), Some("item arrived broken"));
    assert_eq!(a.target.system.as_deref(), Some("billing"));
    assert_eq!(a.target.resource.as_deref(), Some("order/42"));
    assert_eq!(a.target.account_id.as_deref(), Some("acct-42"));
    assert_eq!(a.target.environment, Some(Environment::Production));
    let s = &a.signals;
    assert_eq!(s.data_classification, Some(DataClassification::Pii));
    assert_eq!(s.amount, Some(dec("250.10")));
    assert_eq!(s.amount.unwrap().to_string(), "250.10", "the scale is kept");
    assert_eq!(s.currency.as_deref(), Some("USD"));
    assert_eq!(s.recipient_count, Some(3));
    assert_eq!(s.audience, Some(Audience::External));
    assert_eq!(s.reversible, Some(false));
    assert_eq!(s.rollback_path.as_deref(), Some("reverse the refund"));
    assert_eq!(s.blast_radius.as_deref(), Some("one customer"));
    assert_eq!(s.scope.as_deref(), Some("order 42"));
    assert_eq!(s.destination.as_deref(), Some("customer inbox"));
    assert_eq!(s.retention.as_deref(), Some("30 days"));
    assert_eq!(s.incident_id.as_deref(), Some("inc-7"));
    assert_eq!(s.impact.as_deref(), Some("keeps the customer"));
    assert_eq!(s.alternatives.as_deref(), Some("store credit"));
    assert_eq!(s.promises.as_deref(), Some("refund within 5 days"));
    assert_eq!(
        s.permissions,
        vec!["billing:refund".to_string(), "orders:read".to_string()]
    );
    assert_eq!(s.deadline, Some(time("2026-01-01T00:10:00Z")));
    assert_eq!(s.confidence, Some(dec("0.75")));
    let attrs: BTreeMap<String, String> = [("team", "growth"), ("ticket", "T-1")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let got: BTreeMap<String, String> = a
        .attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got, attrs);
    assert_eq!(a.payload.as_deref(), Some("Refunded, sorry!"));
}

#[test]
fn full_event_serializes_back_to_the_same_json() {
    let a = decode_json(&full()).unwrap();
    let mut back = serde_json::to_value(&a).unwrap();
    // Decimals serialize as strings (serde-str); the input sent confidence as a number.
    let mut want = full();
    want["signals"]["confidence"] = json!("0.75");
    back["occurred_at"] = json!(time(back["occurred_at"].as_str().unwrap()).to_rfc3339());
    want["occurred_at"] = json!(time("2026-01-01T00:00:00Z").to_rfc3339());
    back["signals"]["deadline"] = json!(time(back["signals"]["deadline"].as_str().unwrap()).to_rfc3339());
    want["signals"]["deadline"] = json!(time("2026-01-01T00:10:00Z").to_rfc3339());
    assert_eq!(back, want);
    // And decoding the serialized form gives the same action again.
    let bytes = serde_json::to_vec(&a).unwrap();
    let again = decoder().decode(bytes.as_slice()).unwrap();
    assert_eq!(again, a);
}

/// Text without escapes is read in place from the record, not copied (the
/// route stage decodes every action; a copy per field was an allocation
/// per field); text with escapes is unescaped into a copy.
#[test]
fn text_is_borrowed_from_the_record_unless_it_has_escapes() {
    use std::borrow::Cow;
    let mut v = full();
    v["summary"] = json!("Refund \"order\" 42");
    let bytes = v.to_string().into_bytes();
    let action = decoder().decode(&bytes).unwrap();
    let borrowed = |text: &Cow<'_, str>| matches!(text, Cow::Borrowed(_));
    assert!(borrowed(&action.action_id));
    assert!(borrowed(&action.agent_id));
    assert!(borrowed(&action.kind));
    assert!(action.target.system.as_ref().is_some_and(borrowed));
    assert!(action.signals.destination.as_ref().is_some_and(borrowed));
    assert!(!action.signals.permissions.is_empty());
    assert!(action.signals.permissions.iter().all(borrowed));
    assert!(action.payload.as_ref().is_some_and(borrowed));
    assert!(!borrowed(&action.summary), "unescaped into a copy");
    assert_eq!(action.summary, "Refund \"order\" 42");
}

#[test]
fn minimal_event_has_no_optional_fields() {
    let a = decode_json(&minimal()).unwrap();
    assert_eq!(a.fleet, None);
    assert_eq!(a.reason, None);
    assert_eq!(a.target, Default::default());
    assert_eq!(a.signals, Default::default());
    assert!(a.attributes.is_empty());
    assert_eq!(a.payload, None);
}

#[test]
fn leading_whitespace_before_json_is_fine() {
    let text = format!("  \n\t{}", minimal());
    assert!(decoder().decode(text.as_bytes()).is_ok());
}

#[test]
fn empty_optional_strings_are_absent() {
    let mut v = minimal();
    v["reason"] = json!("");
    v["target"] = json!({"environment": "  "});
    v["signals"] = json!({"destination": "", "audience": ""});
    let a = decode_json(&v).unwrap();
    assert_eq!(a.reason, None);
    assert_eq!(a.target.environment, None);
    assert_eq!(a.signals.destination, None);
    assert_eq!(a.signals.audience, None);
}

#[test]
fn amount_string_is_exact() {
    let a = decode_json(&with_signal("amount", json!("100.00"))).unwrap();
    assert_eq!(a.signals.amount, Some(dec("100.00")));
    assert_eq!(a.signals.amount.unwrap().to_string(), "100.00");
    assert_eq!(a.signals.amount.unwrap().scale(), 2);
}

#[test]
fn amount_json_number_is_exact() {
    let a = decoder()
        .decode(br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","signals":{"amount":100.01}}"#)
        .unwrap();
    let amount = a.signals.amount.unwrap();
    assert_eq!(amount, dec("100.01"));
    assert_eq!(amount.to_string(), "100.01");
    assert!(amount > dec("100"));
    // Digits beyond f64 precision survive too.
    let a = decoder()
        .decode(br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","signals":{"amount":100.000000000000000001}}"#)
        .unwrap();
    assert_eq!(a.signals.amount, Some(dec("100.000000000000000001")));
    assert!(a.signals.amount.unwrap() > dec("100"));
}

#[test]
fn amount_in_scientific_notation_within_range_is_accepted() {
    let a = decoder()
        .decode(br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","signals":{"amount":1.5e2}}"#)
        .unwrap();
    assert_eq!(a.signals.amount, Some(dec("150")));
}

#[test]
fn amount_1e400_is_refused() {
    let err = decoder()
        .decode(br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","signals":{"amount":1e400}}"#)
        .unwrap_err();
    assert_eq!(err.to_string(), "signals.amount: 1e400 is not a decimal");
    assert_eq!(err.reason(), "invalid_field");
}

#[test]
fn amount_nan_is_refused() {
    let err = decode_json(&with_signal("amount", json!("NaN"))).unwrap_err();
    assert_eq!(err.to_string(), r#"signals.amount: "NaN" is not a decimal"#);
}

#[test]
fn amount_lots_is_refused_with_exact_message() {
    let err = decode_json(&with_signal("amount", json!("lots"))).unwrap_err();
    assert_eq!(err.to_string(), r#"signals.amount: "lots" is not a decimal"#);
    let (field, problem) = field_error(err);
    assert_eq!(field, "signals.amount");
    assert_eq!(problem, r#""lots" is not a decimal"#);
}

#[test]
fn amount_of_other_json_types_is_refused() {
    for bad in [json!(true), json!([1]), json!({"v": 1}), json!("")] {
        let err = decode_json(&with_signal("amount", bad.clone())).unwrap_err();
        assert!(
            err.to_string().starts_with("signals.amount: "),
            "{bad}: got {err}"
        );
    }
}

#[test]
fn negative_amount_is_refused() {
    let err = decode_json(&with_signal("amount", json!("-5.00"))).unwrap_err();
    assert_eq!(err.to_string(), "signals.amount: -5.00 is negative");
    let err = decode_json(&with_signal("amount", json!(-0.01))).unwrap_err();
    assert_eq!(err.to_string(), "signals.amount: -0.01 is negative");
    // Zero is not negative, whatever its sign.
    let a = decode_json(&with_signal("amount", json!("0"))).unwrap();
    assert_eq!(a.signals.amount, Some(Decimal::ZERO));
    assert!(decode_json(&with_signal("amount", json!("-0"))).is_ok());
}

#[test]
fn confidence_bounds() {
    for ok in ["0", "1", "0.5", "1.0", "0.000001"] {
        let a = decode_json(&with_signal("confidence", json!(ok))).unwrap();
        assert_eq!(a.signals.confidence, Some(dec(ok)));
    }
    let a = decode_json(&with_signal("confidence", json!(0.5))).unwrap();
    assert_eq!(a.signals.confidence, Some(dec("0.5")));
    let err = decode_json(&with_signal("confidence", json!(1.01))).unwrap_err();
    assert_eq!(err.to_string(), "signals.confidence: 1.01 is outside 0..1");
    let err = decode_json(&with_signal("confidence", json!(-0.1))).unwrap_err();
    assert_eq!(err.to_string(), "signals.confidence: -0.1 is outside 0..1");
    let err = decode_json(&with_signal("confidence", json!("high"))).unwrap_err();
    assert_eq!(err.to_string(), r#"signals.confidence: "high" is not a decimal"#);
}

#[test]
fn currency_must_be_iso_4217() {
    assert!(decode_json(&with_signal("currency", json!("EUR"))).is_ok());
    for bad in ["eur", "EURO", "E1R"] {
        let err = decode_json(&with_signal("currency", json!(bad))).unwrap_err();
        assert!(err.to_string().starts_with("signals.currency: "), "{bad}: {err}");
        assert!(err.to_string().contains(bad), "{err}");
    }
}

#[test]
fn missing_kind_names_kind() {
    let mut v = minimal();
    v.as_object_mut().unwrap().remove("kind");
    let err = decode_json(&v).unwrap_err();
    assert!(err.to_string().starts_with("kind:"), "{err}");
    assert_eq!(err.to_string(), "kind: is required");
    assert_eq!(err.reason(), "invalid_field");
}

#[test]
fn every_required_field_is_named_when_missing_or_empty() {
    for field in ["action_id", "occurred_at", "agent_id", "kind", "summary"] {
        let mut v = minimal();
        v.as_object_mut().unwrap().remove(field);
        let err = decode_json(&v).unwrap_err();
        assert_eq!(err.to_string(), format!("{field}: is required"));

        // Whitespace of every kind `trim` knows, the vertical tab and a
        // no-break space among them, is empty.
        for blank in ["   ", "\u{b}", "\u{b} \t", "\u{a0}", "\u{c}\r\n"] {
            let mut v = minimal();
            v[field] = json!(blank);
            let err = decode_json(&v).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{field}: must not be empty"),
                "{blank:?}"
            );
        }

        let mut v = minimal();
        v[field] = Value::Null;
        let err = decode_json(&v).unwrap_err();
        assert_eq!(err.to_string(), format!("{field}: is required"));
    }
}

#[test]
fn badly_formed_kinds_are_refused() {
    for bad in [
        "Data.Export",
        "data..export",
        ".data",
        "data.",
        "data export",
        "data.*",
    ] {
        let mut v = minimal();
        v["kind"] = json!(bad);
        let err = decode_json(&v).unwrap_err();
        assert!(err.to_string().starts_with("kind: "), "{bad}: {err}");
    }
    for good in ["custom", "feature_flag.toggle", "x-1.y2"] {
        let mut v = minimal();
        v["kind"] = json!(good);
        assert_eq!(decode_json(&v).unwrap().kind, good);
    }
}

#[test]
fn unknown_top_level_field_is_named() {
    let mut v = minimal();
    v["colour"] = json!("red");
    let err = decode_json(&v).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("unknown field `colour`"), "{text}");
    assert_eq!(err.reason(), "invalid_field");
}

#[test]
fn unknown_nested_fields_are_named_with_their_path() {
    let mut v = minimal();
    v["signals"] = json!({"amount": "5", "amout": "5"});
    let err = decode_json(&v).unwrap_err();
    let (field, problem) = field_error(err);
    assert!(field.starts_with("signals"), "{field}");
    assert!(problem.contains("unknown field `amout`"), "{problem}");
    assert!(
        !problem.contains(" at line "),
        "position suffix dropped: {problem}"
    );

    let mut v = minimal();
    v["target"] = json!({"env": "production"});
    let (field, problem) = field_error(decode_json(&v).unwrap_err());
    assert!(field.starts_with("target"), "{field}");
    assert!(problem.contains("unknown field `env`"), "{problem}");
}

#[test]
fn wrong_enum_values_name_the_field_and_the_allowed_values() {
    let mut v = minimal();
    v["target"] = json!({"environment": "prod"});
    let err = decode_json(&v).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"target.environment: "prod" is not one of production, staging, development"#
    );

    let err = decode_json(&with_signal("data_classification", json!("secret"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"signals.data_classification: "secret" is not one of public, internal, confidential, pii, regulated"#
    );

    let err = decode_json(&with_signal("audience", json!("everyone"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"signals.audience: "everyone" is not one of internal, external"#
    );
}

#[test]
fn wrong_types_name_the_field() {
    let err = decode_json(&with_signal("reversible", json!("no"))).unwrap_err();
    let (field, _) = field_error(err);
    assert_eq!(field, "signals.reversible");

    let err = decode_json(&with_signal("recipient_count", json!(-3))).unwrap_err();
    let (field, _) = field_error(err);
    assert_eq!(field, "signals.recipient_count");

    let err = decode_json(&with_signal("permissions", json!("admin"))).unwrap_err();
    let (field, _) = field_error(err);
    assert_eq!(field, "signals.permissions");

    let mut v = minimal();
    v["attributes"] = json!({"n": 5});
    let (field, _) = field_error(decode_json(&v).unwrap_err());
    assert_eq!(field, "attributes.n");

    let mut v = minimal();
    v["summary"] = json!(5);
    let (field, _) = field_error(decode_json(&v).unwrap_err());
    assert_eq!(field, "summary");
}

#[test]
fn bad_timestamps_are_refused() {
    for bad in [
        "yesterday",
        "2026-01-01",
        "2026-01-01 00:00:00",
        "2026-13-01T00:00:00Z",
        "",
    ] {
        let mut v = minimal();
        v["occurred_at"] = json!(bad);
        let err = decode_json(&v).unwrap_err();
        assert!(err.to_string().starts_with("occurred_at: "), "{bad}: {err}");
    }
    let mut v = minimal();
    v["occurred_at"] = json!("yesterday");
    let err = decode_json(&v).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(r#"occurred_at: "yesterday" is not an RFC 3339 timestamp"#),
        "{err}"
    );
    let err = decode_json(&with_signal("deadline", json!("soon"))).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(r#"signals.deadline: "soon" is not an RFC 3339 timestamp"#),
        "{err}"
    );
    // Milliseconds since the epoch are not RFC 3339 in the JSON form.
    let mut v = minimal();
    v["occurred_at"] = json!(1_767_225_600_000_i64);
    let (field, _) = field_error(decode_json(&v).unwrap_err());
    assert_eq!(field, "occurred_at");
}

#[test]
fn timestamps_with_offsets_are_normalised_to_utc() {
    let mut v = minimal();
    v["occurred_at"] = json!("2026-01-01T02:00:00+02:00");
    assert_eq!(decode_json(&v).unwrap().occurred_at, time("2026-01-01T00:00:00Z"));
}

#[test]
fn invalid_utf8_is_refused() {
    let mut bytes = br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"caf"#.to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(br#""}"#);
    let err = decoder().decode(&bytes).unwrap_err();
    assert!(
        matches!(err, DecodeError::Json(_) | DecodeError::Field { .. }),
        "{err:?}"
    );

    let mut bytes = br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","attributes":{"k":""#.to_vec();
    bytes.push(0xc3);
    bytes.extend_from_slice(br#""}}"#);
    assert!(decoder().decode(&bytes).is_err());
}

#[test]
fn truncated_json_is_refused() {
    let text = full().to_string();
    for cut in [1, 10, text.len() / 2, text.len() - 1] {
        let err = decoder().decode(&text.as_bytes()[..cut]).unwrap_err();
        assert!(matches!(err, DecodeError::Json(_)), "cut at {cut}: {err:?}");
        assert_eq!(err.reason(), "bad_json");
        assert!(err.to_string().starts_with("not valid JSON: "));
    }
}

#[test]
fn trailing_garbage_after_json_is_refused() {
    let text = format!("{} x", minimal());
    let err = decoder().decode(text.as_bytes()).unwrap_err();
    assert!(matches!(err, DecodeError::Json(_)), "{err:?}");
    // Two records glued together are not one record.
    let text = format!("{}{}", minimal(), minimal());
    assert!(decoder().decode(text.as_bytes()).is_err());
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    let depth = 10_000;
    let mut text = String::from(
        r#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"k","summary":"s","attributes":"#,
    );
    text.push_str(&"[".repeat(depth));
    text.push_str(&"]".repeat(depth));
    text.push('}');
    assert!(text.len() < DEFAULT_MAX_RECORD_BYTES);
    let err = decoder().decode(text.as_bytes()).unwrap_err();
    assert!(
        matches!(err, DecodeError::Json(_) | DecodeError::Field { .. }),
        "{err:?}"
    );

    // Deeply nested objects in an unknown place too.
    let mut text = String::from(r#"{"action_id":"a","signals":{"scope":"#);
    text.push_str(&r#"{"a":"#.repeat(depth));
    text.push_str(&"}".repeat(depth));
    text.push_str("}}");
    assert!(decoder().decode(text.as_bytes()).is_err());
}

#[test]
fn oversized_record_is_too_large() {
    let mut v = minimal();
    v["payload"] = json!("x".repeat(DEFAULT_MAX_RECORD_BYTES));
    let bytes = v.to_string().into_bytes();
    let err = decoder().decode(&bytes).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            size: bytes.len(),
            limit: DEFAULT_MAX_RECORD_BYTES
        }
    );
    assert_eq!(err.reason(), "too_large");
    // One byte over the limit, even of garbage, is refused before parsing.
    let err = decoder()
        .decode(&vec![b'{'; DEFAULT_MAX_RECORD_BYTES + 1])
        .unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { .. }));
    // A record of exactly the limit is parsed.
    let mut v = minimal();
    let base = v.to_string().len() + r#","payload":"""#.len();
    v["payload"] = json!("y".repeat(DEFAULT_MAX_RECORD_BYTES - base));
    let bytes = v.to_string().into_bytes();
    assert_eq!(bytes.len(), DEFAULT_MAX_RECORD_BYTES);
    assert!(decoder().decode(&bytes).is_ok());
}

#[test]
fn custom_limit_is_honoured() {
    let d = Decoder::new(Arc::new(SchemaDir::bundled()), 64);
    let err = d.decode(minimal().to_string().as_bytes()).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { limit: 64, .. }), "{err:?}");
}

#[test]
fn empty_and_unknown_formats() {
    assert_eq!(decoder().decode(b"").unwrap_err(), DecodeError::Empty);
    assert_eq!(decoder().decode(b"  \n ").unwrap_err(), DecodeError::Empty);
    assert_eq!(
        decoder().decode(b"[1,2]").unwrap_err(),
        DecodeError::UnknownFormat(b'[')
    );
    assert_eq!(
        decoder().decode(b"hello").unwrap_err(),
        DecodeError::UnknownFormat(b'h')
    );
}

#[test]
fn reason_labels() {
    let cases: Vec<(DecodeError, &str)> = vec![
        (DecodeError::Empty, "empty"),
        (DecodeError::TooLarge { size: 2, limit: 1 }, "too_large"),
        (DecodeError::UnknownFormat(1), "unknown_format"),
        (DecodeError::Json("x".into()), "bad_json"),
        (DecodeError::Truncated(3), "bad_framing"),
        (
            DecodeError::Schema {
                id: 9,
                source: SchemaError::Unknown,
            },
            "unknown_schema",
        ),
        (
            DecodeError::Avro {
                id: 1,
                message: "x".into(),
            },
            "bad_avro",
        ),
        (
            DecodeError::Field {
                field: "kind".into(),
                problem: "is required".into(),
            },
            "invalid_field",
        ),
    ];
    for (err, label) in cases {
        assert_eq!(err.reason(), label, "{err:?}");
    }
    // And from real records.
    assert_eq!(decoder().decode(b"").unwrap_err().reason(), "empty");
    assert_eq!(decoder().decode(b"x").unwrap_err().reason(), "unknown_format");
    assert_eq!(decoder().decode(b"{").unwrap_err().reason(), "bad_json");
    assert_eq!(decoder().decode(&[0, 0]).unwrap_err().reason(), "bad_framing");
    assert_eq!(
        decoder().decode(&frame(4242, &[])).unwrap_err().reason(),
        "unknown_schema"
    );
    assert_eq!(
        decoder()
            .decode(&frame(AGENT_ACTION_SCHEMA_ID, &[0xff]))
            .unwrap_err()
            .reason(),
        "bad_avro"
    );
    assert_eq!(decoder().decode(b"{}").unwrap_err().reason(), "invalid_field");
}

// ---------------------------------------------------------------- Avro ----

fn schema() -> apache_avro::Schema {
    apache_avro::Schema::parse_str(include_str!("../schemas/agent_action.avsc"))
        .expect("bundled schema parses")
}

fn avro_body(action: &Value) -> Vec<u8> {
    encode_json_as_avro(&schema(), action).expect("encodes")
}

/// Avro's zig-zag varint encoding of a long.
fn avro_long(n: i64) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        if z < 0x80 {
            out.push(z as u8);
            return out;
        }
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
}

/// An Avro string: its length, then its bytes.
fn avro_string(body: &mut Vec<u8>, s: &str) {
    body.extend(avro_long(s.len() as i64));
    body.extend_from_slice(s.as_bytes());
}

#[test]
fn avro_full_event_equals_json_decoding() {
    let json_action = decode_json(&full()).unwrap();
    let record = frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&full()));
    assert_eq!(&record[..5], &[0, 0, 0, 0, 1]);
    let avro_action = decoder().decode(&record).expect("avro decodes");
    assert_eq!(avro_action, json_action);
}

/// `decode_in` reads an Avro record's JSON form into the caller's buffer
/// and borrows the action's text from there (the route stage's way), with
/// the same result as `decode` and as the JSON form; a JSON record needs no
/// buffer.
#[test]
fn decode_in_borrows_an_avro_actions_text_from_the_scratch_buffer() {
    use std::borrow::Cow;
    let record = frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&full()));
    let mut scratch = Vec::new();
    let action = decoder().decode_in(&record, &mut scratch).expect("avro decodes");
    assert_eq!(action, decode_json(&full()).unwrap());
    assert_eq!(action, decoder().decode(&record).unwrap());
    assert!(matches!(action.summary, Cow::Borrowed(_)));
    assert!(matches!(action.payload, Some(Cow::Borrowed(_))));
    drop(action);
    assert!(!scratch.is_empty(), "the JSON form was read into the buffer");

    let json = full().to_string().into_bytes();
    let mut unused = Vec::new();
    let action = decoder().decode_in(&json, &mut unused).expect("json decodes");
    assert_eq!(action, decode_json(&full()).unwrap());
    drop(action);
    assert!(unused.is_empty());
}

#[test]
fn avro_minimal_event_equals_json_decoding() {
    let record = frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&minimal()));
    assert_eq!(
        decoder().decode(&record).unwrap(),
        decode_json(&minimal()).unwrap()
    );
}

#[test]
fn avro_amount_from_json_number_is_exact() {
    let v = with_signal("amount", json!(100.01));
    let record = frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&v));
    let a = decoder().decode(&record).unwrap();
    assert_eq!(a.signals.amount, Some(dec("100.01")));
}

#[test]
fn avro_runs_the_same_validation_as_json() {
    // The schema allows any string for amount; validation still refuses "lots".
    let v = with_signal("amount", json!("lots"));
    let err = decoder()
        .decode(&frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&v)))
        .unwrap_err();
    assert_eq!(err.to_string(), r#"signals.amount: "lots" is not a decimal"#);
    // And an empty kind, which Avro's string type allows.
    let mut v = minimal();
    v["kind"] = json!("");
    let err = decoder()
        .decode(&frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&v)))
        .unwrap_err();
    assert!(err.to_string().starts_with("kind:"), "{err}");
    // Confidence out of range as a double.
    let v = with_signal("confidence", json!(1.5));
    let err = decoder()
        .decode(&frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&v)))
        .unwrap_err();
    assert!(err.to_string().starts_with("signals.confidence:"), "{err}");
}

#[test]
fn encode_refuses_fields_the_schema_lacks() {
    let mut v = minimal();
    v["colour"] = json!("red");
    let err = encode_json_as_avro(&schema(), &v).unwrap_err();
    assert!(err.contains("colour"), "{err}");
}

#[test]
fn avro_unknown_schema_id() {
    let record = frame(77, &avro_body(&minimal()));
    let err = decoder().decode(&record).unwrap_err();
    assert_eq!(
        err,
        DecodeError::Schema {
            id: 77,
            source: SchemaError::Unknown
        }
    );
    assert!(err.to_string().contains("77"), "{err}");
}

#[test]
fn avro_wrong_magic_byte() {
    let mut record = frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&minimal()));
    record[0] = 1;
    assert_eq!(
        decoder().decode(&record).unwrap_err(),
        DecodeError::UnknownFormat(1)
    );
    record[0] = 0x7f;
    assert_eq!(
        decoder().decode(&record).unwrap_err(),
        DecodeError::UnknownFormat(0x7f)
    );
}

#[test]
fn avro_fewer_than_five_bytes_is_truncated() {
    for n in 1..5 {
        let record = vec![0u8; n];
        assert_eq!(decoder().decode(&record).unwrap_err(), DecodeError::Truncated(n));
    }
    // Exactly the framing and no body is an Avro problem, not framing.
    let err = decoder().decode(&frame(AGENT_ACTION_SCHEMA_ID, &[])).unwrap_err();
    assert!(matches!(err, DecodeError::Avro { id: 1, .. }), "{err:?}");
}

#[test]
fn avro_garbage_body() {
    for body in [
        vec![0xff; 3],
        vec![0x01, 0x02, 0x03, 0x04],
        b"not avro at all".to_vec(),
    ] {
        let err = decoder()
            .decode(&frame(AGENT_ACTION_SCHEMA_ID, &body))
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::Avro { id: 1, .. }),
            "{body:?}: {err:?}"
        );
    }
}

#[test]
fn avro_body_cut_anywhere_is_refused() {
    // Every cut, the optional fields at the end included: a record that
    // ends early never decodes with its last fields (and so their review
    // triggers) silently missing.
    let body = avro_body(&full());
    for cut in 1..body.len() {
        let err = decoder()
            .decode(&frame(AGENT_ACTION_SCHEMA_ID, &body[..cut]))
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::Avro { id: 1, .. }),
            "cut {cut}: {err:?}"
        );
    }
}

#[test]
fn avro_trailing_bytes() {
    let mut body = avro_body(&minimal());
    body.extend_from_slice(&[0, 0, 0]);
    let err = decoder()
        .decode(&frame(AGENT_ACTION_SCHEMA_ID, &body))
        .unwrap_err();
    match &err {
        DecodeError::Avro { id, message } => {
            assert_eq!(*id, AGENT_ACTION_SCHEMA_ID);
            assert!(message.contains("3 bytes left over"), "{message}");
        }
        other => panic!("expected an Avro error, got {other:?}"),
    }
}

#[test]
fn avro_huge_claimed_string_length_does_not_allocate() {
    // action_id claims to be 2^40 bytes (and then 2^62) long.
    for claimed in [1_i64 << 40, i64::MAX / 2, (64 * 1024 * 1024) as i64] {
        let mut body = avro_long(claimed);
        body.extend_from_slice(b"abc");
        let err = decoder()
            .decode(&frame(AGENT_ACTION_SCHEMA_ID, &body))
            .unwrap_err();
        assert!(matches!(err, DecodeError::Avro { id: 1, .. }), "{err:?}");
    }
    // A negative length is refused too.
    let mut body = avro_long(-5);
    body.extend_from_slice(b"abc");
    let err = decoder()
        .decode(&frame(AGENT_ACTION_SCHEMA_ID, &body))
        .unwrap_err();
    assert!(matches!(err, DecodeError::Avro { id: 1, .. }), "{err:?}");
}

#[test]
fn avro_huge_claimed_array_length_does_not_allocate() {
    // A valid record up to `signals.permissions`, which claims 2^40 items.
    let mut body = Vec::new();
    avro_string(&mut body, "a-1");
    body.extend(avro_long(1_767_225_600_000)); // occurred_at
    avro_string(&mut body, "agent");
    body.extend([0, 0, 0]); // fleet, tenant, run_id: null
    avro_string(&mut body, "k");
    avro_string(&mut body, "s");
    body.push(0); // reason: null
    body.push(0); // target: null
    body.extend(avro_long(1)); // signals: the record branch
    body.extend([0; 15]); // data_classification .. promises: null
    body.extend(avro_long(1)); // permissions: the array branch
    body.extend(avro_long(1 << 40)); // block of 2^40 strings
    body.extend_from_slice(b"\x02x");
    let err = decoder()
        .decode(&frame(AGENT_ACTION_SCHEMA_ID, &body))
        .unwrap_err();
    assert!(matches!(err, DecodeError::Avro { id: 1, .. }), "{err:?}");
}

/// A hand-encoded action: `summary`, one permission, and an attribute when
/// `attribute` is given; everything else minimal.
fn hand_written(summary: &[u8], permission: &[u8], attribute: Option<(&[u8], &[u8])>) -> Vec<u8> {
    let text = |body: &mut Vec<u8>, bytes: &[u8]| {
        body.extend(avro_long(bytes.len() as i64));
        body.extend_from_slice(bytes);
    };
    let mut body = Vec::new();
    text(&mut body, b"a-1");
    body.extend(avro_long(1_767_225_600_000));
    text(&mut body, b"agent");
    body.extend([0, 0, 0]);
    text(&mut body, b"k");
    text(&mut body, summary);
    body.extend([0, 0]); // reason, target
    body.extend(avro_long(1)); // signals present
    body.extend([0; 15]);
    body.extend(avro_long(1)); // permissions present
    body.extend(avro_long(1)); // one item
    text(&mut body, permission);
    body.push(0); // end of array
    body.extend([0, 0]); // deadline, confidence
    match attribute {
        Some((key, value)) => {
            body.extend(avro_long(1)); // attributes present
            body.extend(avro_long(1)); // one entry
            text(&mut body, key);
            text(&mut body, value);
            body.push(0); // end of map
        }
        None => body.push(0),
    }
    body.push(0); // payload
    frame(AGENT_ACTION_SCHEMA_ID, &body)
}

#[test]
fn avro_hand_written_minimal_record_decodes() {
    // Proves the hand encoding above matches the schema: same prefix, valid ending.
    let framed = hand_written(b"s", b"x", None);
    let a = decoder().decode(&framed).unwrap();
    assert_eq!(a.action_id, "a-1");
    assert_eq!(a.occurred_at, time("2026-01-01T00:00:00Z"));
    assert_eq!(a.signals.permissions, vec!["x".to_string()]);
}

/// Text that is not UTF-8 is refused with the field it is in, whether a
/// string field, an array item or a map key (the reader copies text as it
/// is and checks the whole record once; a record that fails is read again
/// to name the field).
#[test]
fn avro_text_that_is_not_utf8_is_refused_naming_its_field() {
    let record =
        |summary: &[u8], permission: &[u8], key: &[u8]| hand_written(summary, permission, Some((key, b"v1")));
    let good = record(b"caf\xc3\xa9", b"x", b"tier");
    let ok = decoder().decode(&good).expect("valid text decodes");
    assert_eq!(ok.summary, "café");
    assert_eq!(ok.attributes.get("tier").map(|v| v.as_ref()), Some("v1"));
    for (bad, field) in [
        (record(b"caf\xc3", b"x", b"tier"), "summary"),
        (record(b"s", b"\xff", b"tier"), "signals.permissions"),
        (record(b"s", b"x", b"t\xe9r"), "attributes"),
    ] {
        let err = decoder().decode(&bad).unwrap_err();
        assert!(matches!(err, DecodeError::Avro { id: 1, .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains(field) && message.contains("not UTF-8"),
            "{message}"
        );
    }
}

#[test]
fn avro_wrong_schema_for_the_body() {
    // Schema id 2 is the Decision schema: an AgentAction body does not fit it
    // or, if it happens to parse, is not a valid AgentAction.
    let record = frame(2, &avro_body(&full()));
    let err = decoder().decode(&record).unwrap_err();
    assert!(
        matches!(err, DecodeError::Avro { id: 2, .. } | DecodeError::Field { .. }),
        "{err:?}"
    );
}

// ------------------------------------------------------------- schemas ----

#[test]
fn schema_dir_loads_the_repository_folder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = SchemaDir::load(&root.join("schemas")).expect("schemas/ loads");
    let action = dir
        .schema(AGENT_ACTION_SCHEMA_ID)
        .expect("id 1 is the AgentAction");
    assert_eq!(*action, schema());
    assert!(dir.schema(2).is_ok(), "id 2 is the Decision");
    assert_eq!(dir.schema(3).unwrap_err(), SchemaError::Unknown);

    // Relative to the crate root, as integration tests run there.
    let relative = SchemaDir::load(Path::new("schemas")).expect("relative schemas/ loads");
    assert!(relative.schema(AGENT_ACTION_SCHEMA_ID).is_ok());

    // A decoder on the loaded folder decodes what the bundled one does.
    let d = Decoder::new(Arc::new(dir), DEFAULT_MAX_RECORD_BYTES);
    let record = frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&full()));
    assert_eq!(d.decode(&record).unwrap(), decoder().decode(&record).unwrap());
}

#[test]
fn schema_dir_reports_missing_and_invalid_folders() {
    let missing = SchemaDir::load(Path::new("/nonexistent/switchboard-schemas")).unwrap_err();
    assert!(matches!(missing, SchemaError::Read { .. }), "{missing:?}");

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("ids.json"), r#"{"1": "a.avsc"}"#).unwrap();
    std::fs::write(tmp.path().join("a.avsc"), r#"{"type": "recrod"}"#).unwrap();
    let invalid = SchemaDir::load(tmp.path()).unwrap_err();
    assert!(matches!(invalid, SchemaError::Invalid { .. }), "{invalid:?}");

    std::fs::write(tmp.path().join("ids.json"), r#"{"one": "a.avsc"}"#).unwrap();
    let bad_id = SchemaDir::load(tmp.path()).unwrap_err();
    assert!(matches!(bad_id, SchemaError::Invalid { .. }), "{bad_id:?}");

    std::fs::write(tmp.path().join("ids.json"), r#"{"1": "missing.avsc"}"#).unwrap();
    let unread = SchemaDir::load(tmp.path()).unwrap_err();
    assert!(matches!(unread, SchemaError::Read { .. }), "{unread:?}");
}

#[test]
fn bundled_schemas_match_the_repository_files() {
    let bundled = SchemaDir::bundled();
    let on_disk = SchemaDir::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")).unwrap();
    for id in [1, 2] {
        assert_eq!(*bundled.schema(id).unwrap(), *on_disk.schema(id).unwrap());
    }
}

#[test]
fn decimal_from_str_sanity() {
    // Guards the helper the tests above rely on.
    assert_eq!(dec("100.00"), Decimal::from_str("100").unwrap());
}

/// apache-avro reads a union index, boolean or string at end of input as
/// null; a record cut short must still be refused, never routed with its
/// last fields (and so its review triggers) missing.
#[test]
fn avro_records_cut_anywhere_are_refused() {
    let schema = apache_avro::Schema::parse_str(include_str!("../schemas/agent_action.avsc")).unwrap();
    let event = json!({"action_id": "a-1", "occurred_at": "2026-01-01T00:00:00Z", "agent_id": "ag",
        "kind": "deploy.release", "summary": "s",
        "target": {"environment": "production"},
        "signals": {"reversible": false, "permissions": ["admin"]}});
    let body = switchboard::decode::encode_json_as_avro(&schema, &event).unwrap();
    assert!(decoder().decode(&switchboard::decode::frame(1, &body)).is_ok());
    for cut in 0..body.len() {
        let framed = switchboard::decode::frame(1, &body[..cut]);
        let result = decoder().decode(&framed);
        assert!(
            result.is_err(),
            "a body cut at {cut} of {} bytes was accepted: {result:?}",
            body.len()
        );
    }
}

#[test]
fn empty_attribute_values_are_absent() {
    let a = decoder()
        .decode(br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"g","kind":"x.y","summary":"s","attributes":{"team":"","note":"  ","keep":"yes"}}"#)
        .unwrap();
    assert_eq!(a.attributes.len(), 1);
    assert_eq!(a.attributes.get("keep").map(|v| v.as_ref()), Some("yes"));
}
