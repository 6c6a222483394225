//! Loading the matrix: every refusal names `file:line:column` and a reason;
//! a matrix that loads has its version and escalation chains resolved.

use std::path::Path;
use std::time::Duration;

use switchboard::matrix::{Field, Matrix, MatrixError, Step};

const FILE: &str = "policy.yaml";

/// Loads `text`, expecting a refusal; returns (line, column, message) after
/// checking the Display form is exactly `file:line:column: message`.
fn refuse(text: &str) -> (usize, usize, String) {
    let err = Matrix::parse(text, FILE).expect_err("the matrix must be refused");
    match &err {
        MatrixError::Invalid {
            file,
            line,
            col,
            message,
        } => {
            assert_eq!(file, FILE);
            assert_eq!(err.to_string(), format!("{FILE}:{line}:{col}: {message}"));
            (*line, *col, message.clone())
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

fn assert_refused(text: &str, line: usize, col: usize, needle: &str) {
    let (l, c, message) = refuse(text);
    assert_eq!((l, c), (line, col), "wrong position for {message:?} in:\n{text}");
    assert!(message.contains(needle), "{message:?} should contain {needle:?}");
}

fn load(text: &str) -> Matrix {
    Matrix::parse(text, FILE).unwrap_or_else(|e| panic!("matrix should load: {e}\n{text}"))
}

/// A valid matrix the refusals below differ from by one line.
const VALID: &str = "\
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    roster: [sasha]
rules:
  - name: export
    lane: sec
    when:
      kind: data.export
";

#[test]
fn the_base_matrix_loads() {
    let m = load(VALID);
    assert_eq!(m.lanes.len(), 1);
    assert_eq!(m.lanes[0].name, "sec");
    assert_eq!(m.lanes[0].topic, "approvals.sec");
    assert_eq!(m.lanes[0].sla, Duration::from_secs(30 * 60));
    assert_eq!(m.rules.len(), 1);
    assert_eq!(m.rules[0].pos.line, 7);
    assert_eq!(m.source, FILE);
}

#[test]
fn the_default_matrix_loads() {
    let m = Matrix::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/matrix.yaml")).unwrap();
    let names: Vec<&str> = m.lanes.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["security", "finance", "engineering", "customer", "manager"]
    );
    assert!(m.tests.len() >= 40);
}

#[test]
fn missing_file_is_a_read_error() {
    let err = Matrix::load(Path::new("/nonexistent/matrix.yaml")).unwrap_err();
    assert!(matches!(err, MatrixError::Read { .. }), "{err:?}");
    assert!(err.to_string().starts_with("/nonexistent/matrix.yaml: "), "{err}");
}

#[test]
fn unknown_top_level_key() {
    let text = format!("{VALID}colour: red\n");
    assert_refused(&text, 11, 1, r#"unknown key "colour" in the matrix"#);
    let (_, _, message) = refuse(&text);
    assert!(message.contains("lanes"), "lists the allowed keys: {message}");
}

#[test]
fn unknown_lane_key() {
    let text = "\
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    colour: red
    roster: [sasha]
rules:
  - name: export
    lane: sec
    when:
      kind: data.export
";
    assert_refused(text, 5, 5, r#"unknown key "colour" in lane "sec""#);
}

#[test]
fn unknown_rule_key() {
    let text = "\
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    roster: [sasha]
rules:
  - name: export
    lane: sec
    priority: 1
    when:
      kind: data.export
";
    assert_refused(text, 9, 5, r#"unknown key "priority" in a rule"#);
}

#[test]
fn unknown_step_key() {
    let text = "\
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    roster: [sasha]
    escalation:
      - assignee: lead
        wait: 5m
rules:
  - name: export
    lane: sec
    when:
      kind: data.export
";
    assert_refused(text, 8, 9, r#"unknown key "wait" in an escalation step"#);
}

#[test]
fn unknown_lane_in_a_rule() {
    let text = VALID.replace("    lane: sec\n", "    lane: ops\n");
    assert_refused(&text, 8, 11, r#"unknown lane "ops" (lanes: sec)"#);
}

#[test]
fn unknown_lane_in_an_escalation_step_and_then() {
    let text = VALID.replace(
        "    roster: [sasha]\n",
        "    roster: [sasha]\n    escalation:\n      - lane: ops\n",
    );
    assert_refused(&text, 7, 15, r#"unknown lane "ops""#);
    let text = VALID.replace("    roster: [sasha]\n", "    roster: [sasha]\n    then: ops\n");
    assert_refused(&text, 6, 11, r#"unknown lane "ops""#);
}

#[test]
fn bad_patterns() {
    for (pattern, col) in [
        ("data*", 13),
        ("\"*.export\"", 13),
        ("\"*\"", 13),
        ("data.*.x", 13),
        ("da*ta.*", 13),
    ] {
        let text = VALID.replace("kind: data.export", &format!("kind: {pattern}"));
        assert_refused(&text, 10, col, "bad pattern");
    }
    // In a list, the position is the bad item's.
    let text = VALID.replace("kind: data.export", "kind: [data.export, data*]");
    assert_refused(&text, 10, 27, r#"bad pattern "data*""#);
    // A wildcard on an enum field is not one of its values.
    let text = VALID.replace("kind: data.export", "target.environment: prod.*");
    assert_refused(&text, 10, 27, "is not one of production, staging, development");
}

#[test]
fn good_patterns_load() {
    for pattern in ["data.*", "data.export.*", "x"] {
        load(&VALID.replace("kind: data.export", &format!("kind: {pattern}")));
    }
}

#[test]
fn duplicate_rule_names() {
    let text = format!("{VALID}  - name: export\n    lane: sec\n    when:\n      kind: data.share\n");
    assert_refused(&text, 11, 11, r#"duplicate rule name "export" (first at line 7)"#);
}

#[test]
fn bad_rule_and_lane_names() {
    let text = VALID.replace("name: export", "name: Export");
    assert_refused(&text, 7, 11, "rule name \"Export\" must be lowercase");
    let text = VALID
        .replace("  sec:\n", "  Sec:\n")
        .replace("lane: sec", "lane: Sec");
    assert_refused(&text, 2, 3, "lane name \"Sec\" must be lowercase");
}

#[test]
fn duplicate_yaml_keys() {
    let text = VALID.replace("    sla: 30m\n", "    sla: 30m\n    sla: 1h\n");
    assert_refused(&text, 4, 5, r#"duplicate key "sla" in lane "sec""#);
    // Duplicate lanes.
    let text = VALID.replace(
        "rules:\n",
        "  sec:\n    sla: 1h\n    owner: x\n    roster: [y]\nrules:\n",
    );
    assert_refused(&text, 6, 3, r#"duplicate key "sec" in `lanes`"#);
    // Duplicate field in a condition.
    let text = VALID.replace(
        "      kind: data.export\n",
        "      kind: data.export\n      kind: data.share\n",
    );
    assert_refused(&text, 11, 7, r#"duplicate key "kind""#);
    // Duplicate top-level key.
    let text = format!("{VALID}rules: []\n");
    assert_refused(&text, 11, 1, r#"duplicate key "rules" in the matrix"#);
}

const LOOPING: &str = "\
lanes:
  a:
    sla: 10m
    owner: a-owner
    roster: [ann]
    then: b
  b:
    sla: 20m
    owner: b-owner
    roster: [ben]
    then: a
rules:
  - name: r
    lane: a
    when:
      kind: x
";

#[test]
fn escalation_chains_that_loop_via_then() {
    assert_refused(LOOPING, 11, 11, "escalation chain loops: a → b → a");
}

#[test]
fn escalation_chain_that_continues_into_itself() {
    let text = VALID.replace("    roster: [sasha]\n", "    roster: [sasha]\n    then: sec\n");
    assert_refused(&text, 6, 11, "escalation chain loops: sec → sec");
}

#[test]
fn longer_then_loop_is_found() {
    let text = "\
lanes:
  a:
    sla: 10m
    owner: a-owner
    roster: [ann]
    then: b
  b:
    sla: 20m
    owner: b-owner
    roster: [ben]
    then: c
  c:
    sla: 20m
    owner: c-owner
    roster: [cat]
    then: b
rules:
  - name: r
    lane: a
    when:
      kind: x
";
    assert_refused(text, 16, 11, "escalation chain loops: a → b → c → b");
}

#[test]
fn a_step_repeated_in_a_chain() {
    let text = "\
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    roster: [sasha]
    escalation:
      - assignee: lead
        roster: [lee]
      - assignee: lead
rules:
  - name: export
    lane: sec
    when:
      kind: data.export
";
    assert_refused(
        text,
        9,
        9,
        r#"escalation chain of "sec" asks "lead" on lane "sec" twice"#,
    );
    // The same lane asked twice through its owner default.
    let text = "\
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    roster: [sasha]
    escalation: [{lane: boss}, {lane: boss}]
  boss:
    sla: 1h
    owner: the-boss
    roster: [bea]
rules:
  - name: export
    lane: sec
    when:
      kind: data.export
";
    assert_refused(text, 6, 32, r#"asks "the-boss" on lane "boss" twice"#);
}

#[test]
fn a_step_needs_an_assignee_or_a_lane() {
    let text = VALID.replace(
        "    roster: [sasha]\n",
        "    roster: [sasha]\n    escalation:\n      - sla: 5m\n",
    );
    assert_refused(&text, 7, 9, "an escalation step needs an `assignee` or a `lane`");
}

#[test]
fn unparsable_amount() {
    let text = VALID.replace("kind: data.export", "signals.amount: {above: 1oo}");
    assert_refused(&text, 10, 31, r#""1oo" is not a decimal amount"#);
    for bad in ["1e2", "ten", "\"\"", "1.2.3", "0x10"] {
        let text = VALID.replace("kind: data.export", &format!("signals.amount: {{above: {bad}}}"));
        let (line, col, message) = refuse(&text);
        assert_eq!((line, col), (10, 31), "{bad}: {message}");
    }
}

#[test]
fn unknown_comparison_and_wrong_matchers() {
    let text = VALID.replace("kind: data.export", "signals.amount: {over: 100}");
    assert_refused(&text, 10, 24, r#"unknown comparison "over""#);
    let text = VALID.replace("kind: data.export", "signals.amount: 100");
    assert_refused(&text, 10, 23, "signals.amount is a number");
    let text = VALID.replace("kind: data.export", "kind: {above: 1}");
    assert_refused(&text, 10, 13, "kind is not a number");
    let text = VALID.replace("kind: data.export", "signals.reversible: maybe");
    assert_refused(&text, 10, 27, "signals.reversible is true or false");
    let text = VALID.replace("kind: data.export", "signals.deadline: tomorrow");
    assert_refused(&text, 10, 25, "signals.deadline is a time");
    let text = VALID.replace("kind: data.export", "signals.destination: {present: yes}");
    assert_refused(&text, 10, 38, "`present` is true or false");
    let text = VALID.replace("kind: data.export", "signals.amount: {present: true, above: 1}");
    assert_refused(&text, 10, 24, "`present` stands alone");
}

#[test]
fn unknown_field_path() {
    let text = VALID.replace("kind: data.export", "signals.amout: {above: 1}");
    assert_refused(&text, 10, 7, r#"unknown field "signals.amout""#);
    let text = VALID.replace("kind: data.export", "attributes.: x");
    assert_refused(&text, 10, 7, "attributes.<key> needs a key");
    // In a context list, the position is the bad path's.
    let text = VALID.replace(
        "    roster: [sasha]\n",
        "    roster: [sasha]\n    context:\n      scope: [signals.scope, signals.scop]\n",
    );
    assert_refused(&text, 7, 30, r#"unknown field "signals.scop""#);
}

#[test]
fn enrichment_field_without_a_directory_table() {
    let text = VALID.replace("kind: data.export", "enrichment.x.y: z");
    assert_refused(
        &text,
        10,
        7,
        r#"enrichment.x.y: no directory table "x" is declared under `directory`"#,
    );
    let text = VALID.replace("kind: data.export", "enrichment.x: z");
    assert_refused(&text, 10, 7, "enrichment.<table>.<field>");
    // With the table declared it loads.
    let text = format!(
        "directory:\n  x:\n    key: target.account_id\n{}",
        VALID.replace("kind: data.export", "enrichment.x.y: z")
    );
    let m = load(&text);
    assert_eq!(m.directory.len(), 1);
    assert_eq!(m.directory[0].topic, "directory.x");
}

#[test]
fn directory_table_key_must_be_a_text_field() {
    let text = format!("directory:\n  x:\n    key: signals.amount\n{VALID}");
    assert_refused(&text, 3, 10, "a table's key must be a text field of the action");
}

#[test]
fn bad_sla_duration() {
    for (bad, col) in [
        ("30 minutes", 10),
        ("0m", 10),
        ("m", 10),
        ("\"\"", 10),
        ("-5m", 10),
        ("1.5h", 10),
    ] {
        let text = VALID.replace("sla: 30m", &format!("sla: {bad}"));
        let (line, c, message) = refuse(&text);
        assert_eq!((line, c), (3, col), "{bad}: {message}");
    }
    let text = VALID.replace("sla: 30m", "sla: 30 minutes");
    assert_refused(
        &text,
        3,
        10,
        r#""30 minutes" is not a duration like 90s, 15m, 2h or 1h30m"#,
    );
}

#[test]
fn durations_parse() {
    for (text, secs) in [
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1d", 86_400),
    ] {
        let m = load(&VALID.replace("sla: 30m", &format!("sla: {text}")));
        assert_eq!(m.lanes[0].sla, Duration::from_secs(secs), "{text}");
    }
    let m = load(&VALID.replace("sla: 30m", "sla: 500ms"));
    assert_eq!(m.lanes[0].sla, Duration::from_millis(500));
}

#[test]
fn missing_required_lane_keys() {
    let text = VALID.replace("    sla: 30m\n", "");
    assert_refused(&text, 3, 5, "lane \"sec\" needs `sla`");
    let text = VALID.replace("    owner: sec-oncall\n", "");
    assert_refused(&text, 3, 5, "lane \"sec\" needs `owner`");
    let text = VALID.replace("    roster: [sasha]\n", "");
    assert_refused(&text, 3, 5, "lane \"sec\" needs `roster`");
}

#[test]
fn empty_roster() {
    let text = VALID.replace("roster: [sasha]", "roster: []");
    assert_refused(&text, 5, 13, "a roster must name at least one approver");
    let text = VALID.replace(
        "    roster: [sasha]\n",
        "    roster: [sasha]\n    escalation:\n      - assignee: lead\n        roster: []\n",
    );
    assert_refused(&text, 8, 17, "a roster must name at least one approver");
    let text = VALID.replace("roster: [sasha]", "roster: [\"\"]");
    assert_refused(&text, 5, 14, "must be a non-empty string");
}

#[test]
fn yaml_aliases_are_refused() {
    let text = "\
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    roster: &people [sasha]
  ops:
    sla: 30m
    owner: ops-oncall
    roster: *people
rules:
  - name: export
    lane: sec
    when:
      kind: data.export
";
    assert_refused(text, 9, 13, "YAML aliases are not allowed");
}

#[test]
fn yaml_tags_are_refused() {
    let text = VALID.replace("sla: 30m", "sla: !!str 30m");
    assert_refused(&text, 3, 10, "YAML tags are not allowed");
}

#[test]
fn yaml_syntax_errors() {
    let text = VALID.replace("roster: [sasha]", "roster: [sasha");
    let (line, col, message) = refuse(&text);
    assert!(line >= 5, "{line}:{col}: {message}");
    assert!(col >= 1);
    assert!(!message.is_empty());

    // A tab-indented line.
    let text = "lanes:\n  sec:\n\tsla: 30m\n";
    let (line, _, message) = refuse(text);
    assert_eq!(line, 3, "{message}");

    // A key without a value where a mapping continues wrongly.
    let text = "lanes:\n  sec: x\n   y: z\n";
    let (line, _, _) = refuse(text);
    assert_eq!(line, 3);
}

#[test]
fn more_than_one_document() {
    let text = format!("{VALID}---\n{VALID}");
    let (line, col, message) = refuse(&text);
    assert_eq!((line, col), (11, 1), "{message}");
    assert!(message.contains("single YAML document"));
}

#[test]
fn empty_file() {
    for text in ["", "\n\n", "# only a comment\n"] {
        let err = Matrix::parse(text, FILE).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{FILE}:1:1: the matrix file is empty"),
            "{text:?}"
        );
    }
}

#[test]
fn the_matrix_must_be_a_mapping_with_lanes_and_rules() {
    assert_refused("- a\n- b\n", 1, 1, "the matrix must be a mapping, found a list");
    assert_refused("description: x\nrules: []\n", 1, 1, "the matrix needs `lanes`");
    let text = VALID.split("rules:").next().unwrap().to_string();
    assert_refused(&text, 1, 1, "the matrix needs `rules`");
    let text = format!("{}rules: []\n", VALID.split("rules:").next().unwrap());
    assert_refused(&text, 6, 8, "`rules` must hold at least one rule");
    assert_refused(
        "lanes: {}\nrules: []\n",
        1,
        8,
        "`lanes` must name at least one lane",
    );
}

#[test]
fn invalid_enum_value() {
    let text = VALID.replace("kind: data.export", "target.environment: prod");
    assert_refused(
        &text,
        10,
        27,
        r#"target.environment: "prod" is not one of production, staging, development"#,
    );
    let text = VALID.replace("kind: data.export", "signals.audience: [internal, outside]");
    assert_refused(
        &text,
        10,
        36,
        r#"signals.audience: "outside" is not one of internal, external"#,
    );
}

#[test]
fn bad_combinators() {
    let text = VALID.replace("kind: data.export", "any: []");
    assert_refused(&text, 10, 12, "`any` needs at least one condition");
    let text = VALID.replace("kind: data.export", "any: {kind: x}");
    assert_refused(&text, 10, 12, "`any` must be a list");
    let text = VALID.replace("      kind: data.export\n", "      not: [kind: x]\n");
    assert_refused(&text, 10, 12, "a condition is a mapping of tests");
    let text = VALID.replace("    when:\n      kind: data.export\n", "    when: {}\n");
    assert_refused(&text, 9, 11, "a condition needs at least one test");
}

#[test]
fn duplicate_topics_are_refused() {
    let text = VALID.replace(
        "rules:\n",
        "  ops:\n    topic: approvals.sec\n    sla: 1h\n    owner: o\n    roster: [p]\nrules:\n",
    );
    assert_refused(
        &text,
        7,
        5,
        r#"lanes "sec" and "ops" both use topic "approvals.sec""#,
    );
    let text = VALID.replace("    sla: 30m\n", "    topic: \"bad topic\"\n    sla: 30m\n");
    assert_refused(&text, 3, 12, "is not a valid Kafka topic name");
}

#[test]
fn bad_inline_tests_are_refused() {
    let text = format!("{VALID}tests:\n  - name: t\n    event: {{kind: x}}\n    lanes: [ops]\n");
    assert_refused(&text, 14, 13, r#"unknown lane "ops""#);
    let text =
        format!("{VALID}tests:\n  - name: t\n    event: {{kind: x}}\n    lanes: []\n    rules: [nope]\n");
    assert_refused(&text, 15, 13, r#"unknown rule "nope""#);
    let text = format!("{VALID}tests:\n  - name: t\n    event: {{kind: x}}\n");
    assert_refused(&text, 12, 5, "test \"t\" needs `lanes`");
    let text = format!(
        "{VALID}tests:\n  - name: t\n    event: {{kind: x}}\n    lanes: []\n  - name: t\n    event: {{kind: y}}\n    lanes: []\n"
    );
    assert_refused(&text, 15, 5, r#"duplicate test name "t""#);
}

// ------------------------------------------------------------- version ----

fn is_version(v: &str) -> bool {
    v.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

const POLICY: &str = "\
# A policy.
description: two lanes
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    roster: [sasha, sam]
    escalation:
      - assignee: sec-lead
  fin:
    sla: 2h
    owner: fin-approver
    roster: [fran]
rules:
  - name: export
    lane: sec
    when:
      kind: [data.export, data.share]
  - name: refund
    lane: fin
    when:
      kind: refund.issue
      signals.amount: {above: 100}
tests:
  - name: refund over
    event: {kind: refund.issue, signals: {amount: \"101\"}}
    lanes: [fin]
";

#[test]
fn version_is_sha256_hex() {
    let m = load(POLICY);
    assert!(is_version(&m.version), "{}", m.version);
    assert_eq!(m.version.len(), "sha256:".len() + 64);
    assert_eq!(load(POLICY).version, m.version, "deterministic");
}

#[test]
fn version_ignores_formatting_comments_and_key_order() {
    let base = load(POLICY).version;
    let reformatted = "\
description: 'two lanes'   # quoted now
rules:
- {name: export, lane: sec, when: {kind: [data.export, data.share]}}
- when:
    signals.amount:
      above: 100
    kind: refund.issue
  lane: fin
  name: refund
lanes:
  fin: {roster: [fran], owner: fin-approver, sla: 2h}
  sec:
    roster:
      - sasha
      - sam
    escalation: [{assignee: sec-lead}]
    owner: \"sec-oncall\"
    sla: 30m
";
    assert_eq!(load(reformatted).version, base);
    let commented = POLICY.replace(
        "    sla: 2h\n",
        "    # finance is slower\n    sla: 2h   # two hours\n",
    );
    assert_eq!(load(&commented).version, base);
    // Source name does not matter either.
    assert_eq!(Matrix::parse(POLICY, "other.yaml").unwrap().version, base);
}

#[test]
fn version_ignores_tests() {
    let base = load(POLICY).version;
    let no_tests = POLICY.split("tests:").next().unwrap();
    assert_eq!(load(no_tests).version, base);
    let more_tests =
        format!("{POLICY}  - name: export\n    event: {{kind: data.export}}\n    lanes: [sec]\n");
    let m = load(&more_tests);
    assert_eq!(m.tests.len(), 2);
    assert_eq!(m.version, base);
}

#[test]
fn version_changes_with_meaning() {
    let base = load(POLICY).version;
    let sla = POLICY.replace("sla: 2h", "sla: 3h");
    assert_ne!(load(&sla).version, base, "an SLA change");
    let rule = POLICY.replace("above: 100", "above: 200");
    assert_ne!(load(&rule).version, base, "a threshold change");
    let kinds = POLICY.replace("[data.export, data.share]", "[data.export]");
    assert_ne!(load(&kinds).version, base, "a rule's kinds");
    let roster = POLICY.replace("[fran]", "[fran, fatima]");
    assert_ne!(load(&roster).version, base, "a roster");
    let lane = POLICY.replace("    lane: fin\n", "    lane: sec\n");
    assert_ne!(load(&lane).version, base, "a rule's lane");
    let versions = [&sla, &rule, &kinds, &roster, &lane]
        .iter()
        .map(|t| load(t).version)
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(versions.len(), 5, "each change gives its own version");
}

// -------------------------------------------------------------- chains ----

const CHAINS: &str = "\
directory:
  accounts:
    key: target.account_id
lanes:
  a:
    sla: 10m
    owner: a-owner
    roster: [ann]
    escalation:
      - assignee: a-lead
      - assignee: a-boss
        sla: 1h
        roster: [bob]
    then: b
  b:
    sla: 20m
    owner: b-owner
    roster: [ben]
    escalation:
      - assignee: b-lead
    then: c
  c:
    sla: 2h
    owner: c-owner
    roster: [cat]
  d:
    sla: 5m
    owner: d-owner
    roster: [dan]
    escalation:
      - lane: c
      - lane: a
        assignee: a-special
      - assignee: account-lead
        from: enrichment.accounts.lead
rules:
  - name: r
    lane: a
    when:
      kind: x
";

fn summary(m: &Matrix, chain: &[Step]) -> Vec<(String, String, u64, Vec<String>)> {
    chain
        .iter()
        .map(|s| {
            (
                m.lanes[s.lane].name.clone(),
                s.assignee.clone(),
                s.sla.as_secs() / 60,
                s.roster.clone(),
            )
        })
        .collect()
}

fn row(lane: &str, assignee: &str, minutes: u64, roster: &[&str]) -> (String, String, u64, Vec<String>) {
    (
        lane.to_string(),
        assignee.to_string(),
        minutes,
        roster.iter().map(|r| r.to_string()).collect(),
    )
}

#[test]
fn then_flattens_into_the_next_lanes_owner_and_steps() {
    let m = load(CHAINS);
    let a = m.lane("a").unwrap();
    assert_eq!(
        summary(&m, m.chain(a)),
        vec![
            row("a", "a-lead", 10, &["ann"]),
            row("a", "a-boss", 60, &["bob"]),
            row("b", "b-owner", 20, &["ben"]),
            row("b", "b-lead", 20, &["ben"]),
            row("c", "c-owner", 120, &["cat"]),
        ]
    );
    let b = m.lane("b").unwrap();
    assert_eq!(
        summary(&m, m.chain(b)),
        vec![
            row("b", "b-lead", 20, &["ben"]),
            row("c", "c-owner", 120, &["cat"])
        ]
    );
    let c = m.lane("c").unwrap();
    assert!(m.chain(c).is_empty());
}

#[test]
fn step_defaults_come_from_the_chain_owner_sla_and_the_target_lane_roster() {
    let m = load(CHAINS);
    let d = m.lane("d").unwrap();
    let chain = m.chain(d);
    assert_eq!(
        summary(&m, chain),
        vec![
            // A lane step asks that lane's owner, with its roster, on d's SLA.
            row("c", "c-owner", 5, &["cat"]),
            row("a", "a-special", 5, &["ann"]),
            row("d", "account-lead", 5, &["dan"]),
        ]
    );
    assert_eq!(chain[0].from, None);
    assert_eq!(
        chain[2].from,
        Some(Field::Enrichment {
            table: "accounts".into(),
            field: "lead".into()
        })
    );
    // Steps without `lane` stay on the chain owner's lane (and topic).
    assert_eq!(m.lanes[chain[2].lane].topic, "approvals.d");
}

#[test]
fn default_matrix_chains() {
    let m = Matrix::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/matrix.yaml")).unwrap();
    let chain = |lane: &str| summary(&m, m.chain(m.lane(lane).unwrap()));
    assert_eq!(
        chain("security"),
        vec![
            row("security", "security-lead", 30, &["lee"]),
            row("manager", "manager", 30, &["morgan", "max"]),
        ]
    );
    assert_eq!(
        chain("finance"),
        vec![
            row("finance", "finance-lead", 120, &["fiona"]),
            row("manager", "manager", 120, &["morgan", "max"]),
        ]
    );
    assert_eq!(
        chain("engineering"),
        vec![
            row("engineering", "incident-owner", 15, &["erin", "eli"]),
            row("manager", "manager", 15, &["morgan", "max"]),
        ]
    );
    assert_eq!(
        chain("customer"),
        vec![
            row("customer", "account-lead", 15, &["cora", "cal"]),
            row("manager", "manager", 15, &["morgan", "max"]),
        ]
    );
    assert_eq!(chain("manager"), vec![row("manager", "director", 240, &["dana"])]);
    let customer = m.chain(m.lane("customer").unwrap());
    assert_eq!(
        customer[0].from,
        Some(Field::Enrichment {
            table: "accounts".into(),
            field: "lead".into()
        })
    );
    let sla = |lane: &str| m.lanes[m.lane(lane).unwrap()].sla.as_secs() / 60;
    assert_eq!(
        [
            sla("security"),
            sla("finance"),
            sla("engineering"),
            sla("customer"),
            sla("manager")
        ],
        [30, 120, 15, 15, 240]
    );
}

#[test]
fn lane_topics_default_and_override() {
    let m = load(&VALID.replace("    sla: 30m\n", "    topic: sec.approvals\n    sla: 30m\n"));
    assert_eq!(m.lanes[0].topic, "sec.approvals");
    assert_eq!(load(VALID).lanes[0].topic, "approvals.sec");
}

#[test]
fn inline_tests_are_loaded_with_positions() {
    let m = load(POLICY);
    assert_eq!(m.tests.len(), 1);
    let t = &m.tests[0];
    assert_eq!(t.name, "refund over");
    assert_eq!((t.pos.line, t.pos.col), (25, 5));
    assert_eq!(t.lanes, vec!["fin".to_string()]);
    let report = m.run_tests();
    assert_eq!(report.passed, 1);
    assert!(report.failures.is_empty());
}

#[test]
fn failing_inline_test_is_reported_with_its_position() {
    let m = load(&POLICY.replace("    lanes: [fin]\n", "    lanes: [sec]\n"));
    let report = m.run_tests();
    assert_eq!(report.passed, 0);
    assert_eq!(report.failures.len(), 1);
    let f = &report.failures[0];
    assert_eq!(f.name, "refund over");
    assert_eq!((f.pos.line, f.pos.col), (25, 5));
    assert!(
        f.problem.contains("expected lanes [sec], got [fin]"),
        "{}",
        f.problem
    );
}

#[test]
fn default_matrix_inline_tests_pass() {
    let m = Matrix::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/matrix.yaml")).unwrap();
    let report = m.run_tests();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.passed, m.tests.len());
}

/// `then:` must not re-ask a step the chain already asked, nor the owner.
#[test]
fn then_cannot_repeat_a_step() {
    let text = "lanes:\n  sec:\n    sla: 30m\n    owner: sec-oncall\n    roster: [sasha]\n    escalation:\n      - lane: boss\n    then: boss\n  boss:\n    sla: 1h\n    owner: the-boss\n    roster: [bea]\nrules:\n  - name: r\n    lane: sec\n    when:\n      kind: x\n";
    assert_refused(text, 8, 11, "twice through `then`");
}

#[test]
fn a_step_cannot_ask_the_lane_owner_again() {
    let text = "lanes:\n  sec:\n    sla: 30m\n    owner: sec-oncall\n    roster: [sasha]\n    escalation:\n      - lane: sec\nrules:\n  - name: r\n    lane: sec\n    when:\n      kind: x\n";
    assert_refused(text, 7, 9, r#"asks "sec-oncall" on lane "sec" twice"#);
}

#[test]
fn reminders_default_to_80_percent_and_steps_inherit_their_lanes() {
    use switchboard::matrix::Percent;
    let m = load(VALID);
    assert_eq!(m.lanes[0].remind, Percent::new(80));
    let text = "\
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    roster: [sasha]
    remind: 50%
    escalation:
      - assignee: lead
        roster: [lee]
      - assignee: ciso
        roster: [cy]
        remind: off
    then: boss
  boss:
    sla: 1h
    owner: the-boss
    roster: [bea]
    remind: 90%
rules:
  - name: export
    lane: sec
    when:
      kind: data.export
";
    let m = load(text);
    let reminds: Vec<Option<u8>> = m.lanes[0]
        .escalation
        .iter()
        .map(|s| s.remind.map(Percent::get))
        .collect();
    assert_eq!(m.lanes[0].remind.map(Percent::get), Some(50));
    assert_eq!(
        reminds,
        [Some(50), None, Some(90)],
        "own setting, then inherited, then the lane continued into"
    );
}

#[test]
fn bad_reminders() {
    for bad in ["0%", "100%", "80", "eighty%", "-5%", "on"] {
        let text = VALID.replace(
            "    roster: [sasha]\n",
            &format!("    roster: [sasha]\n    remind: {bad}\n"),
        );
        assert_refused(
            &text,
            6,
            13,
            "is not a reminder: write a share of the SLA from 1% to 99%, or off",
        );
    }
}
