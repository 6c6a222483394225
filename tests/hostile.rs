//! Hostile input against the four entry points the fuzz targets drive
//! (`fuzz/`): `Decoder::decode` (JSON and Confluent Avro),
//! `Decision::decode` and `Matrix::parse`, with the fuzzers' own invariants
//! (`fuzz/src/invariants.rs`, compiled in here). The fuzzers need a nightly
//! toolchain and run for minutes (`fuzz/run.sh`); this suite runs on the
//! stable toolchain in seconds:
//!
//! * every checked-in seed of `fuzz/corpus/<target>/`;
//! * the malformed-record corpus of `common/malformed.rs`, each record
//!   refused with the reason it is expected to have;
//! * proptest mutations of the seeds (cuts, byte flips, insertions,
//!   splices) and random values in every field of a valid action;
//! * the regressions of what fuzzing and the hostile-input tests found.

#[path = "../fuzz/src/invariants.rs"]
mod invariants;
#[path = "common/malformed.rs"]
mod malformed;

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::{Value, json};
use switchboard::decision::Decision;
use switchboard::matrix::Matrix;

use invariants::{check_action_record, check_decision_record, check_matrix_text, decoder, schemas};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The seed files of one fuzz target, by name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|e| e.expect("a seed").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("a readable seed"))
        })
        .collect();
    out.sort();
    assert!(
        (5..=60).contains(&out.len()),
        "fuzz/corpus/{target} has a few dozen seeds at most, found {}",
        out.len()
    );
    for (name, bytes) in &out {
        assert!(bytes.len() <= 64 * 1024, "seed {target}/{name} is small");
    }
    out
}

// ---------------------------------------------------------- seed corpus ----

#[test]
fn the_json_seeds_meet_every_invariant() {
    let mut accepted = 0;
    for (name, bytes) in seeds("decode_json") {
        let decoded = check_action_record(decoder(), &bytes);
        let expect_ok = !name.starts_with("bad-");
        assert_eq!(decoded.is_some(), expect_ok, "seed decode_json/{name}");
        accepted += usize::from(expect_ok);
    }
    assert!(accepted >= 10);
}

#[test]
fn the_avro_seeds_meet_every_invariant_and_match_their_json_samples() {
    let json_seeds = seeds("decode_json");
    for (name, body) in seeds("decode_avro") {
        // The fuzz target puts the framing in front; so does this test.
        let framed = switchboard::decode::frame(1, &body);
        let decoded = check_action_record(decoder(), &framed);
        let expect_ok = name.starts_with("sample-") || name.starts_with("hand-");
        assert_eq!(decoded.is_some(), expect_ok, "seed decode_avro/{name}");
        // A sample's Avro encoding is the same action as its JSON form.
        if let Some(stem) = name.strip_prefix("sample-").and_then(|n| n.strip_suffix(".avro")) {
            let (_, json) = json_seeds
                .iter()
                .find(|(n, _)| *n == format!("sample-{stem}.json"))
                .expect("the sample's JSON seed");
            let from_json = decoder().decode(json).expect("the JSON sample").into_owned();
            assert_eq!(decoded.unwrap(), from_json, "{name}");
        }
    }
}

#[test]
fn the_decision_seeds_meet_every_invariant() {
    for (name, bytes) in seeds("decision") {
        let decoded = check_decision_record(&bytes);
        assert_eq!(
            decoded.is_some(),
            !name.starts_with("bad-"),
            "seed decision/{name}"
        );
        check_decision_record(&switchboard::decode::frame(
            invariants::DECISION_SCHEMA_ID,
            &bytes,
        ));
    }
}

#[test]
fn the_matrix_seeds_meet_every_invariant() {
    for (name, bytes) in seeds("matrix") {
        let text = std::str::from_utf8(&bytes).expect("a matrix seed is text");
        let loaded = check_matrix_text(text);
        assert_eq!(loaded.is_some(), !name.starts_with("bad-"), "seed matrix/{name}");
    }
}

/// The default matrix seed is the default matrix, so fuzzing starts from
/// the real policy.
#[test]
fn the_matrix_seed_is_the_default_matrix() {
    let seed = std::fs::read_to_string(corpus_dir("matrix").join("default.yaml")).unwrap();
    let real =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/matrix.yaml")).unwrap();
    assert_eq!(
        Matrix::parse(&seed, "seed").unwrap().version,
        Matrix::parse(&real, "real").unwrap().version,
        "fuzz/corpus/matrix/default.yaml is a copy of deploy/matrix.yaml"
    );
}

// ---------------------------------------------------- malformed records ----

#[test]
fn every_malformed_record_is_refused_with_its_reason() {
    let corpus = malformed::corpus("hostile");
    assert!(corpus.len() >= 1000, "{} records", corpus.len());
    let mut by_reason = std::collections::BTreeMap::<&str, usize>::new();
    for record in &corpus {
        let reason = match &record.payload {
            None => "empty",
            Some(bytes) => {
                assert!(
                    check_action_record(decoder(), bytes).is_none(),
                    "{}: accepted",
                    record.name
                );
                decoder().decode(bytes).unwrap_err().reason()
            }
        };
        assert!(
            record.reasons.contains(&reason),
            "{}: refused as {reason}, expected one of {:?}",
            record.name,
            record.reasons
        );
        *by_reason.entry(reason).or_default() += 1;
    }
    // Every way of being refused is exercised.
    for reason in switchboard::decode::DEAD_LETTER_REASONS {
        assert!(
            by_reason.contains_key(reason),
            "no record refused as {reason}: {by_reason:?}"
        );
    }
}

// ------------------------------------------------------------- proptest ----

/// A seed of `target` picked by index, and a mutation of it.
#[derive(Debug, Clone)]
enum Mutation {
    Cut(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Splice(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), 1..=255_u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (
            any::<usize>(),
            prop::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    Just(b'{'),
                    Just(b'['),
                    Just(b'"'),
                    Just(b'\\'),
                    Just(b'0'),
                    Just(b'e'),
                    Just(0)
                ],
                1..8
            )
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1..64_usize).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Splice(a, b)),
    ]
}

fn apply(seed: &[u8], other: &[u8], m: &[Mutation]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for m in m {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Cut(i) => bytes.truncate(at(*i, bytes.len())),
            Mutation::Flip(i, x) if !bytes.is_empty() => {
                let i = i % bytes.len();
                bytes[i] ^= x;
            }
            Mutation::Flip(..) => {}
            Mutation::Insert(i, b) => {
                let i = at(*i, bytes.len());
                bytes.splice(i..i, b.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let i = at(*i, bytes.len());
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
            Mutation::Splice(a, b) => {
                let a = at(*a, bytes.len());
                let b = at(*b, other.len());
                bytes.truncate(a);
                bytes.extend_from_slice(&other[b..]);
            }
        }
    }
    bytes
}

fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds(target);
    let n = seeds.len();
    (0..n, 0..n, prop::collection::vec(mutation(), 1..4))
        .prop_map(move |(a, b, m)| apply(&seeds[a].1, &seeds[b].1, &m))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_actions_keep_the_invariants(bytes in mutated("decode_json")) {
        check_action_record(decoder(), &bytes);
    }

    #[test]
    fn mutated_avro_bodies_keep_the_invariants(bytes in mutated("decode_avro")) {
        check_action_record(decoder(), &switchboard::decode::frame(1, &bytes));
    }

    #[test]
    fn mutated_decisions_keep_the_invariants(bytes in mutated("decision")) {
        check_decision_record(&bytes);
        check_decision_record(&switchboard::decode::frame(invariants::DECISION_SCHEMA_ID, &bytes));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_matrices_keep_the_invariants(bytes in mutated("matrix")) {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            check_matrix_text(text);
        }
    }
}

/// Any JSON value, a few levels deep, with the awkward numbers and strings.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z.]{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("production"),
            Just("external"),
            Just("pii"),
            Just("2026-01-01T00:00:00Z"),
            Just("1e3"),
            Just("NaN"),
            Just("-0"),
            Just("0.5"),
            Just("EUR"),
            Just(" "),
            Just("")
        ]
        .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "action_id",
    "occurred_at",
    "agent_id",
    "fleet",
    "kind",
    "summary",
    "payload",
    "target",
    "target.environment",
    "target.account_id",
    "signals",
    "signals.amount",
    "signals.currency",
    "signals.confidence",
    "signals.recipient_count",
    "signals.reversible",
    "signals.permissions",
    "signals.deadline",
    "signals.data_classification",
    "signals.audience",
    "attributes",
    "attributes.tier",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random values in up to three fields of a valid action, in JSON and
    /// (when it encodes) Avro: whatever is accepted keeps the invariants.
    #[test]
    fn random_field_values_keep_the_invariants(
        changes in prop::collection::vec((0..FIELDS.len(), any_json()), 1..4)
    ) {
        let mut action = json!({
            "action_id": "p-1", "occurred_at": "2026-01-01T00:00:00Z", "agent_id": "a",
            "kind": "refund.issue", "summary": "s", "signals": {"amount": "5"}
        });
        for (field, value) in changes {
            let path: Vec<&str> = FIELDS[field].split('.').collect();
            let mut at = &mut action;
            for part in &path[..path.len() - 1] {
                if !at[*part].is_object() {
                    at[*part] = json!({});
                }
                at = &mut at[*part];
            }
            at[path[path.len() - 1]] = value;
        }
        check_action_record(decoder(), action.to_string().as_bytes());
    }
}

// ---------------------------------------------------------- regressions ----

fn minimal_with_signals(signals: &str) -> Vec<u8> {
    format!(
        r#"{{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","signals":{signals}}}"#
    )
    .into_bytes()
}

/// A string amount is the exact decimal text; an exponent in it is how a
/// float formatted as text looks (Python's `str(1e-05)`, Java's `1E+3`),
/// so it is refused rather than read as a number (the JSON number `1e3` is
/// still a number).
#[test]
fn an_exponent_inside_a_string_amount_is_refused() {
    for amount in [r#""1e3""#, r#""1E+3""#, r#""1.5e2""#, r#"" 1e3 ""#] {
        let err = decoder()
            .decode(&minimal_with_signals(&format!(r#"{{"amount":{amount}}}"#)))
            .unwrap_err();
        assert_eq!(err.reason(), "invalid_field", "{amount}");
        assert!(err.to_string().starts_with("signals.amount: "), "{err}");
    }
    let err = decoder()
        .decode(&minimal_with_signals(r#"{"confidence":"0.5e0"}"#))
        .unwrap_err();
    assert!(err.to_string().starts_with("signals.confidence: "), "{err}");
    // Numbers keep their JSON meaning.
    let a = decoder()
        .decode(&minimal_with_signals(r#"{"amount":1e3}"#))
        .unwrap()
        .into_owned();
    assert_eq!(a.signals.amount.unwrap().to_string(), "1000");
    let a = decoder()
        .decode(&minimal_with_signals(r#"{"amount":"1000.50"}"#))
        .unwrap()
        .into_owned();
    assert_eq!(a.signals.amount.unwrap().to_string(), "1000.50");
}

/// A deeply nested matrix is refused with a position, not by overflowing
/// the stack: saphyr refuses flow nesting past its own limit, but 100,000
/// nested block lists (`- - - … x`, 200 KB) were read into a tree whose
/// drop recurses per level, and `switchboard check` aborted with a stack
/// overflow. The loader now refuses more than 64 levels of any kind.
#[test]
fn a_deeply_nested_matrix_is_refused() {
    for (what, text) in [
        (
            "flow lists",
            format!("lanes: {}\nrules: []\n", malformed::nested_arrays(10_000)),
        ),
        (
            "flow mappings",
            format!("lanes: {}1{}\n", "{a: ".repeat(10_000), "}".repeat(10_000)),
        ),
        ("block lists", format!("lanes:\n  {}x\n", "- ".repeat(100_000))),
    ] {
        let err = Matrix::parse(&text, "deep.yaml").unwrap_err().to_string();
        eprintln!("{what}: {err}");
        assert!(
            err.contains("nested deeper than") || err.contains("recursion limit exceeded"),
            "{what}: {err}"
        );
    }
    // A policy nests a few levels; twenty `not`s deep still loads.
    let text = format!(
        "lanes: {{ops: {{sla: 1m, owner: o, roster: [x]}}}}\nrules:\n  - name: r\n    lane: ops\n    when: {}{{kind: a.b}}{}\n",
        "{not: ".repeat(20),
        "}".repeat(20)
    );
    Matrix::parse(&text, "ok.yaml").unwrap();
}

/// `switchboard check` on a 100,000-deep matrix: refused (exit 2), not a
/// crash.
#[test]
fn switchboard_check_refuses_a_deeply_nested_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.yaml");
    // 100,000 block lists (200 KB): without the depth limit this aborted
    // with a stack overflow (saphyr refuses deep *flow* nesting itself).
    std::fs::write(&path, format!("lanes:\n  {}x\n", "- ".repeat(100_000))).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("nested deeper than 64 levels"), "{stderr}");
}

/// A decision is a short record: fields beyond their limits are refused
/// (a megabyte comment would be carried in every later revision of the
/// approval's changelog record and in its outcome).
#[test]
fn oversized_decision_fields_are_refused() {
    let decision = |approver: &str, comment: &str| {
        json!({"action_id": "a", "lane": "finance", "verdict": "approve", "approver": approver,
               "comment": comment, "decided_at": "2026-01-01T00:00:00Z"})
        .to_string()
    };
    assert!(Decision::decode(decision("fran", &"c".repeat(4096)).as_bytes(), schemas()).is_ok());
    let err = Decision::decode(decision("fran", &"c".repeat(4097)).as_bytes(), schemas()).unwrap_err();
    assert!(err.to_string().starts_with("comment: "), "{err}");
    let err = Decision::decode(decision(&"f".repeat(257), "").as_bytes(), schemas()).unwrap_err();
    assert!(err.to_string().starts_with("approver: "), "{err}");
}

/// A dead letter always fits what the producer may write: a record the
/// producer refused would be retried forever and stop the stage at it. The
/// error header is cut; the value, original headers and key are left out in
/// that order, each noted with its size.
#[test]
fn a_dead_letter_always_fits_the_producer_limit() {
    use switchboard::dlq::dead_letter;
    use switchboard::kafka::{Input, InputRecord};
    let now = chrono::Utc::now();
    let limit = switchboard::config::DEFAULT_MESSAGE_MAX_BYTES;
    let big = vec![b'x'; 2 * 1024 * 1024];
    let headers = vec![("trace".to_string(), vec![b'h'; 1_100_000])];
    let error = "kind: \"".to_string() + &"K".repeat(900 * 1024) + "\" is not a dotted verb";
    fn failed(key: Option<&[u8]>, payload: Option<&[u8]>) -> InputRecord {
        InputRecord {
            topic: "agent.actions".into(),
            partition: 1,
            offset: 7,
            key: key.map(<[u8]>::to_vec),
            payload: payload.map(<[u8]>::to_vec),
            headers: Vec::new(),
        }
    }
    let header = |o: &switchboard::sink::Output, name: &str| {
        o.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
    };

    // Within the limit: everything kept, the long message cut to 1 KiB.
    let small = dead_letter(
        "dlq",
        failed(Some(b"k"), Some(&big[..900_000])).view(),
        "invalid_field",
        &error,
        now,
        limit,
    );
    assert!(small.wire_size() <= limit);
    assert_eq!(small.payload.as_ref().map(Vec::len), Some(900_000));
    let cut = header(&small, "switchboard.error").unwrap();
    assert!(
        cut.len() <= 1024 && cut.ends_with('…') && cut.starts_with("kind: \"KKK"),
        "{}",
        cut.len()
    );

    // Over it: the value is left out.
    let over = dead_letter(
        "dlq",
        failed(Some(b"k"), Some(&big)).view(),
        "too_large",
        "record is 2 MB",
        now,
        limit,
    );
    assert!(over.wire_size() <= limit);
    assert_eq!(over.payload, None);
    assert_eq!(
        header(&over, "switchboard.payload_omitted").as_deref(),
        Some("2097152")
    );
    assert_eq!(over.key.as_deref(), Some(&b"k"[..]));

    // Huge original headers, then a huge key, go too.
    let mut with_headers = failed(None, Some(b"{}"));
    with_headers.headers = headers;
    let letter = dead_letter("dlq", with_headers.view(), "invalid_field", "x", now, limit);
    assert!(letter.wire_size() <= limit);
    assert_eq!(
        header(&letter, "switchboard.payload_omitted").as_deref(),
        Some("2")
    );
    assert_eq!(
        header(&letter, "switchboard.headers_omitted").as_deref(),
        Some("1")
    );
    assert!(header(&letter, "trace").is_none());
    let key = vec![b'k'; 1_500_000];
    let letter = dead_letter(
        "dlq",
        failed(Some(&key), Some(b"{}")).view(),
        "invalid_field",
        "x",
        now,
        limit,
    );
    assert!(letter.wire_size() <= limit);
    assert_eq!(letter.key, None);
    assert_eq!(
        header(&letter, "switchboard.key_omitted").as_deref(),
        Some("1500000")
    );
    assert_eq!(
        header(&letter, "switchboard.reason").as_deref(),
        Some("invalid_field")
    );
}

/// Found by the `decision` fuzzer: an Avro decision whose timestamp-millis
/// is in the year -5219 was accepted (chrono's parser takes years outside
/// 0000-9999), so the outcome would carry a `decided_at` that is not RFC
/// 3339 to every agent. `decided_at` is now read as strict RFC 3339, in
/// JSON and in Avro.
#[test]
fn a_decision_time_outside_rfc_3339_is_refused() {
    let found = std::fs::read(corpus_dir("decision").join("bad-avro-year-minus-5219.avro")).unwrap();
    let err = Decision::decode(&found, schemas()).unwrap_err();
    assert!(
        err.to_string().contains("decided_at") || err.to_string().contains("RFC 3339"),
        "{err}"
    );
    for at in [
        "+10000-01-01T00:00:00Z",
        "-0001-01-01T00:00:00Z",
        "2026-03-01 10:00:00",
    ] {
        let json = json!({"action_id": "a", "lane": "finance", "verdict": "approve", "approver": "fran",
                          "decided_at": at});
        let err = Decision::decode(json.to_string().as_bytes(), schemas()).unwrap_err();
        assert!(err.to_string().contains("RFC 3339"), "{at}: {err}");
    }
    let json = json!({"action_id": "a", "lane": "finance", "verdict": "approve", "approver": "fran",
                      "decided_at": "2026-03-01T10:00:00.5+01:00"});
    let d = Decision::decode(json.to_string().as_bytes(), schemas()).unwrap();
    assert_eq!(d.decided_at.to_rfc3339(), "2026-03-01T09:00:00.500+00:00");
}

/// An attribute given twice was read as its last value (serde's maps keep
/// the last silently) while rules match attributes: refused now, like a
/// duplicate field of the action.
#[test]
fn a_duplicate_attribute_is_refused() {
    let record = br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","attributes":{"tier":"free","tier":"enterprise"}}"#;
    let err = decoder().decode(record).unwrap_err();
    assert_eq!(err.reason(), "invalid_field");
    assert!(err.to_string().contains("duplicate attribute \"tier\""), "{err}");
    // Distinct keys, escaped or not, still decode, borrowed or owned.
    let ok = br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","attributes":{"tier":"free","t\u0069er2":"caf\u00e9","blank":""}}"#;
    let a = decoder().decode(ok).unwrap();
    assert_eq!(a.attributes.len(), 2);
    assert_eq!(a.attributes.get("tier2").map(|v| v.as_ref()), Some("café"));
    for bad in [r#"{"tier":1}"#, r#"{"tier":null}"#, r#"["tier"]"#] {
        let record = format!(
            r#"{{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"k","summary":"s","attributes":{bad}}}"#
        );
        let err = decoder().decode(record.as_bytes()).unwrap_err();
        assert!(err.to_string().starts_with("attributes"), "{bad}: {err}");
    }
}
