//! A deterministic corpus of malformed AgentAction records (more than a
//! thousand), each with the dead-letter reasons it may be refused with.
//! `tests/hostile.rs` checks the decoder on them directly;
//! `tests/hostile_service.rs` sends them through a running route stage.
//!
//! Every record is built from one of the bundled samples (`deploy/samples`)
//! broken one way, so a refusal can only come from the breakage.

#![allow(dead_code)]

use serde_json::{Value, json};
use switchboard::decode::{AGENT_ACTION_SCHEMA_ID, DEFAULT_MAX_RECORD_BYTES, encode_json_as_avro, frame};

/// One malformed record.
#[derive(Debug, Clone)]
pub struct Malformed {
    /// What was done to it, for messages.
    pub name: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The dead-letter reasons it may carry.
    pub reasons: &'static [&'static str],
}

const BAD_JSON: &[&str] = &["bad_json"];
const INVALID_FIELD: &[&str] = &["invalid_field"];
const BAD_AVRO: &[&str] = &["bad_avro", "bad_framing"];
const UNKNOWN_FORMAT: &[&str] = &["unknown_format"];
const UNKNOWN_SCHEMA: &[&str] = &["unknown_schema"];
const TOO_LARGE: &[&str] = &["too_large"];
const EMPTY: &[&str] = &["empty"];

fn samples() -> Vec<(String, Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/samples");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .expect("deploy/samples")
        .map(|e| e.expect("a sample").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("a readable sample");
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).expect("a JSON sample"))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 10, "the samples are there");
    out
}

fn avro_body(action: &Value) -> Vec<u8> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/agent_action.avsc"),
    )
    .expect("the schema");
    let schema = apache_avro::Schema::parse_str(&text).expect("a valid schema");
    encode_json_as_avro(&schema, action).unwrap_or_else(|e| panic!("encoding {action} as Avro: {e}"))
}

/// Sets `path` (dotted) in `v` to `value`, creating objects on the way.
fn set(v: &mut Value, path: &str, value: Value) {
    let mut at = v;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        if !at[*part].is_object() {
            at[*part] = json!({});
        }
        at = &mut at[*part];
    }
    at[parts[parts.len() - 1]] = value;
}

/// Inserts `text` right after the first `{` of `json` (or of the object
/// under `"key":{`).
fn insert_after(json: &str, anchor: &str, text: &str) -> String {
    let at = json.find(anchor).expect("anchor in the record") + anchor.len();
    format!("{}{}{}", &json[..at], text, &json[at..])
}

/// Nested JSON arrays `depth` deep.
pub fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// The corpus. Keys are unique (`<prefix>-<n>`) except that every
/// seventh record has none.
pub fn corpus(prefix: &str) -> Vec<Malformed> {
    let samples = samples();
    let mut out: Vec<Malformed> = Vec::new();
    let mut push = |name: String, payload: Option<Vec<u8>>, reasons: &'static [&'static str]| {
        let n = out.len();
        let key = (n % 7 != 3).then(|| format!("{prefix}-{n}").into_bytes());
        out.push(Malformed {
            name,
            key,
            payload,
            reasons,
        });
    };
    for (i, (sample_name, base)) in samples.iter().enumerate() {
        let mut sample = base.clone();
        sample["action_id"] = json!(format!("{prefix}-{sample_name}"));
        let text = sample.to_string();
        let framed = frame(AGENT_ACTION_SCHEMA_ID, &avro_body(&sample));

        // Truncated JSON and Avro, at ten points each.
        for k in 1..=10 {
            let cut = text.len() * k / 11;
            push(
                format!("{sample_name}: JSON cut at {cut}"),
                Some(text.as_bytes()[..cut].to_vec()),
                BAD_JSON,
            );
            let cut = 5 + (framed.len() - 5) * k / 11;
            push(
                format!("{sample_name}: Avro cut at {cut}"),
                Some(framed[..cut].to_vec()),
                BAD_AVRO,
            );
        }

        // Wrong types, field by field.
        let wrong: &[(&str, Value)] = &[
            ("action_id", json!(42)),
            ("action_id", Value::Null),
            ("occurred_at", json!(1767225600000_i64)),
            ("occurred_at", json!("yesterday")),
            ("agent_id", json!(["a"])),
            ("fleet", json!(7)),
            ("tenant", json!({"id": "t"})),
            ("kind", json!(true)),
            ("kind", json!("Refund Issue")),
            ("summary", json!(1.5)),
            ("summary", json!("")),
            ("reason", json!(false)),
            ("payload", json!([1, 2])),
            ("target", json!("crm")),
            ("target.environment", json!("prod")),
            ("target.account_id", json!(4471)),
            ("signals", json!([1])),
            ("signals.data_classification", json!("secret")),
            ("signals.recipient_count", json!("3")),
            ("signals.recipient_count", json!(-1)),
            ("signals.recipient_count", json!(2.5)),
            ("signals.audience", json!(1)),
            ("signals.reversible", json!("true")),
            ("signals.permissions", json!("admin")),
            ("signals.permissions", json!([1])),
            ("signals.deadline", json!("tomorrow")),
            ("signals.currency", json!("euro")),
            ("attributes", json!(["tier"])),
            ("attributes", json!({"tier": 1})),
        ];
        for (field, value) in wrong {
            let mut v = sample.clone();
            set(&mut v, field, value.clone());
            push(
                format!("{sample_name}: {field} = {value}"),
                Some(v.to_string().into_bytes()),
                INVALID_FIELD,
            );
        }

        // Amounts and confidences that are not exact, finite, in range.
        let amounts: &[&str] = &[
            "1e400",
            "-1e400",
            "\"NaN\"",
            "\"nan\"",
            "\"Infinity\"",
            "\"-inf\"",
            "-1",
            "\"-1\"",
            "\"1e3\"",
            "\"1E+3\"",
            "\"1e400\"",
            "\"0x10\"",
            "\"\"",
            "\"1,000\"",
            "\"12 EUR\"",
            "true",
        ];
        for amount in amounts {
            let mut v = sample.clone();
            set(&mut v, "signals.amount", json!("PLACEHOLDER"));
            let record = v.to_string().replace("\"PLACEHOLDER\"", amount);
            push(
                format!("{sample_name}: amount {amount}"),
                Some(record.into_bytes()),
                INVALID_FIELD,
            );
        }
        for confidence in [
            "1.5",
            "-0.1",
            "\"NaN\"",
            "2",
            "\"1.0000001\"",
            "1e400",
            "\"0.5e1\"",
        ] {
            let mut v = sample.clone();
            set(&mut v, "signals.confidence", json!("PLACEHOLDER"));
            let record = v.to_string().replace("\"PLACEHOLDER\"", confidence);
            push(
                format!("{sample_name}: confidence {confidence}"),
                Some(record.into_bytes()),
                INVALID_FIELD,
            );
        }

        // Unknown fields, at the top and inside target and signals.
        for field in [
            "signal",
            "Kind",
            "escalation_level",
            "target.env",
            "signals.amt",
            "signals.lane",
        ] {
            let mut v = sample.clone();
            set(&mut v, field, json!("x"));
            push(
                format!("{sample_name}: unknown field {field}"),
                Some(v.to_string().into_bytes()),
                INVALID_FIELD,
            );
        }

        // Duplicate keys: the first and second copies disagree.
        let mut with_signals = sample.clone();
        set(&mut with_signals, "signals.amount", json!("5"));
        set(&mut with_signals, "target.environment", json!("staging"));
        set(&mut with_signals, "attributes.tier", json!("free"));
        let ws = with_signals.to_string();
        for (anchor, dup) in [
            ("{", r#""action_id":"other","#),
            ("{", r#""kind":"search.run","#),
            (r#""signals":{"#, r#""amount":"100000","#),
            (r#""target":{"#, r#""environment":"production","#),
            (r#""attributes":{"#, r#""tier":"enterprise","#),
        ] {
            push(
                format!("{sample_name}: duplicate {dup}"),
                Some(insert_after(&ws, anchor, dup).into_bytes()),
                INVALID_FIELD,
            );
        }

        // Invalid UTF-8 inside the summary.
        for bad in [&[0xff_u8][..], &[0xc3], &[0xc0, 0xaf], &[0xed, 0xa0, 0x80]] {
            let at = text.find("\"summary\":\"").expect("a summary") + 11;
            let mut bytes = text.as_bytes()[..at].to_vec();
            bytes.extend_from_slice(bad);
            bytes.extend_from_slice(&text.as_bytes()[at..]);
            push(
                format!("{sample_name}: invalid UTF-8 {bad:02x?}"),
                Some(bytes),
                BAD_JSON,
            );
        }

        // Wrong schema ids (2 is the Decision's schema, not an action's).
        let body = &framed[5..];
        for id in [0_u32, 3, 99, 256, u32::MAX] {
            push(
                format!("{sample_name}: schema id {id}"),
                Some(frame(id, body)),
                UNKNOWN_SCHEMA,
            );
        }
        push(
            format!("{sample_name}: an action under the Decision's schema id"),
            Some(frame(2, body)),
            &["bad_avro", "invalid_field"],
        );

        // Wrong magic bytes.
        for magic in [1_u8, 2, 0xff, b'[', b'"', b'x'] {
            let mut bytes = framed.clone();
            bytes[0] = magic;
            push(
                format!("{sample_name}: magic byte {magic:#04x}"),
                Some(bytes),
                UNKNOWN_FORMAT,
            );
        }

        // Deep nesting, in three places, every tenth sample a bit deeper.
        let depth = if i % 10 == 0 { 10_000 } else { 1_000 + i };
        for (field, reasons) in [
            ("attributes", &["bad_json", "invalid_field"][..]),
            ("signals.amount", &["bad_json", "invalid_field"][..]),
            ("payload", &["bad_json", "invalid_field"][..]),
        ] {
            let mut v = sample.clone();
            set(&mut v, field, json!("PLACEHOLDER"));
            let record = v.to_string().replace("\"PLACEHOLDER\"", &nested_arrays(depth));
            push(
                format!("{sample_name}: {field} nested {depth} deep"),
                Some(record.into_bytes()),
                reasons,
            );
        }
    }

    // Shapes that are no action at all.
    push(
        "nested arrays 10,000 deep".into(),
        Some(nested_arrays(10_000).into_bytes()),
        UNKNOWN_FORMAT,
    );
    push(
        "a JSON string".into(),
        Some(b"\"an action\"".to_vec()),
        UNKNOWN_FORMAT,
    );
    push("a JSON null".into(), Some(b"null".to_vec()), UNKNOWN_FORMAT);
    push("an empty object".into(), Some(b"{}".to_vec()), INVALID_FIELD);
    push("an empty value".into(), Some(Vec::new()), EMPTY);
    push("only whitespace".into(), Some(b" \n\t ".to_vec()), EMPTY);
    push("no value at all".into(), None, EMPTY);
    push("a lone magic byte".into(), Some(vec![0]), &["bad_framing"]);
    push(
        "a frame with no body".into(),
        Some(frame(AGENT_ACTION_SCHEMA_ID, &[])),
        BAD_AVRO,
    );

    // Huge strings: over the size limit, and large but under it.
    let (_, base) = &samples[0];
    let limit = DEFAULT_MAX_RECORD_BYTES;
    for (label, size) in [("2 MB", 2 * 1024 * 1024), ("1 byte over the limit", limit + 1)] {
        let mut v = base.clone();
        v["action_id"] = json!(format!("{prefix}-huge"));
        v["summary"] = json!("");
        let overhead = v.to_string().len();
        v["summary"] = json!("s".repeat(size - overhead));
        let bytes = v.to_string().into_bytes();
        assert_eq!(bytes.len(), size);
        push(
            format!("summary making the record {label}"),
            Some(bytes),
            TOO_LARGE,
        );
    }
    for (label, size, what) in [
        ("500 KB, no kind", 500 * 1024, "kind"),
        ("500 KB, an unknown field", 500 * 1024, "unknown"),
        ("just under the limit, an invalid kind", limit - 100, "bad-kind"),
        (
            "just under the limit, in Avro, a bad currency",
            limit - 100,
            "avro-currency",
        ),
    ] {
        let mut v = base.clone();
        v["action_id"] = json!(format!("{prefix}-large-{what}"));
        let reasons = INVALID_FIELD;
        let (field, filler): (&str, &dyn Fn(usize) -> Value) = match what {
            "kind" => {
                v.as_object_mut().unwrap().remove("kind");
                ("summary", &|n| json!("s".repeat(n)))
            }
            "unknown" => ("padding", &|n| json!("p".repeat(n))),
            "bad-kind" => ("kind", &|n| json!("K".repeat(n))),
            _ => {
                v["signals"]["currency"] = json!("c".repeat(40));
                ("payload", &|n| json!("p".repeat(n)))
            }
        };
        v[field] = json!("");
        let encode = |v: &Value| {
            if what == "avro-currency" {
                frame(AGENT_ACTION_SCHEMA_ID, &avro_body(v))
            } else {
                v.to_string().into_bytes()
            }
        };
        let overhead = encode(&v).len();
        v[field] = filler(size - overhead);
        let bytes = encode(&v);
        assert!(
            bytes.len() <= limit && bytes.len() + 16 >= size,
            "{label}: {} bytes",
            bytes.len()
        );
        push(format!("large record: {label}"), Some(bytes), reasons);
    }
    out
}
