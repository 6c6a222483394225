//! The command line as scripts and operators use it: the built binary, its
//! output and its exit statuses.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use switchboard::matrix::Matrix;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    // The flags also read SWITCHBOARD_* variables; keep the caller's out.
    for var in [
        "SWITCHBOARD_MATRIX",
        "SWITCHBOARD_FORMAT",
        "SWITCHBOARD_DIRECTORY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn default_matrix_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/matrix.yaml")
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn run_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // The binary may exit before reading stdin (an invalid matrix is judged
    // first), so a broken pipe here is not a failure.
    if let Err(e) = child.stdin.take().unwrap().write_all(input) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const REFUND: &str = r#"{
  "action_id": "a-123",
  "occurred_at": "2026-01-01T00:00:00Z",
  "agent_id": "support-agent",
  "kind": "refund.issue",
  "summary": "Refund order 42",
  "payload": "Refunded, sorry!",
  "target": {"account_id": "acct-9"},
  "signals": {"amount": "250.00", "currency": "USD", "audience": "external", "deadline": "2026-01-01T03:00:00Z"}
}"#;

const EMAIL: &str = r#"{
  "action_id": "a-124",
  "occurred_at": "2026-01-01T00:00:00Z",
  "agent_id": "support-agent",
  "kind": "email.send",
  "summary": "Apologise for the outage",
  "payload": "We are sorry.",
  "target": {"account_id": "acct-9"},
  "signals": {"audience": "external", "deadline": "2026-01-01T00:10:00Z"}
}"#;

const CONTRACT_KEYS: [&str; 7] = [
    "action_id",
    "review",
    "lanes",
    "rules",
    "missing_context",
    "sla_due",
    "matrix_version",
];

fn explain_json(matrix: &Path, event: &Path) -> Value {
    let o = run(&["explain", "--matrix", s(matrix), "--format", "json", s(event)]);
    assert_eq!(code(&o), 0, "stderr: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("explain prints one JSON object");
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = CONTRACT_KEYS.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "exactly the keys of DESIGN.md");
    v
}

// --------------------------------------------------------------- check ----

#[test]
fn check_default_matrix_passes() {
    let path = default_matrix_path();
    let o = run(&["check", s(&path)]);
    assert_eq!(code(&o), 0, "stdout: {}\nstderr: {}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    let passed: usize = out
        .split(" test cases passed")
        .next()
        .and_then(|before| before.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pass count in {out:?}"));
    assert!(passed >= 40, "{passed} cases: {out}");
    assert!(out.contains("0 failed"), "{out}");
    let version = Matrix::load(&path).unwrap().version;
    assert!(out.contains(&version), "check reports the version: {out}");
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}

#[test]
fn check_reports_a_failing_case_with_its_position() {
    let text = std::fs::read_to_string(default_matrix_path()).unwrap();
    let name = "refund of 100.01 goes to finance";
    let header = format!("  - name: {name}\n");
    let start = text.find(&header).expect("the default matrix has this case");
    let line = text[..start].lines().count() + 1;
    let expect = "    lanes: [finance]\n";
    let at = start + text[start..].find(expect).unwrap();
    let broken = format!("{}    lanes: []\n{}", &text[..at], &text[at + expect.len()..]);

    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "matrix.yaml", &broken);
    let o = run(&["check", s(&path)]);
    assert_eq!(code(&o), 1, "stdout: {}\nstderr: {}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    let want = format!("{}:{line}:5: test \"{name}\" failed", path.display());
    assert!(err.contains(&want), "{want:?} not in {err:?}");
    assert!(err.contains("expected lanes [], got [finance]"), "{err}");
    assert_eq!(err.lines().count(), 1, "only the one case fails: {err}");
    assert!(stdout(&o).contains(", 1 failed"), "{}", stdout(&o));
}

const BROKEN: &str = "\
lanes:
  sec:
    sla: 30m
    owner: sec-oncall
    roster: [sasha]
rules:
  - name: export
    lane: sec
    when:
      kind: data*
";

#[test]
fn check_refuses_a_broken_matrix_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "broken.yaml", BROKEN);
    let o = run(&["check", s(&path)]);
    assert_eq!(code(&o), 2, "stderr: {}", stderr(&o));
    let err = stderr(&o);
    let want = format!("{}:10:13: bad pattern", path.display());
    assert!(err.contains(&want), "{want:?} not in {err:?}");
}

#[test]
fn check_refuses_a_missing_file() {
    let o = run(&["check", "/nonexistent/matrix.yaml"]);
    assert_eq!(code(&o), 2, "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/matrix.yaml"));
}

// ------------------------------------------------------------- explain ----

#[test]
fn explain_json_refund_over_100() {
    let dir = tempfile::tempdir().unwrap();
    let event = write(&dir, "refund.json", REFUND);
    let v = explain_json(&default_matrix_path(), &event);
    assert_eq!(v["action_id"], json!("a-123"));
    assert_eq!(v["review"], json!(true));
    assert_eq!(v["lanes"], json!(["finance"]));
    assert_eq!(v["rules"], json!(["refund-over-threshold"]));
    assert_eq!(v["missing_context"], json!({"finance": ["impact"]}));
    assert_eq!(v["sla_due"], json!({"finance": "2026-01-01T02:00:00Z"}));
    assert_eq!(
        v["matrix_version"],
        json!(Matrix::load(&default_matrix_path()).unwrap().version)
    );
}

#[test]
fn explain_json_external_email() {
    let dir = tempfile::tempdir().unwrap();
    let event = write(&dir, "email.json", EMAIL);
    let v = explain_json(&default_matrix_path(), &event);
    assert_eq!(v["lanes"], json!(["customer"]));
    assert_eq!(v["rules"], json!(["external-message"]));
    assert_eq!(v["missing_context"], json!({"customer": ["promises"]}));
    // The deadline (00:10) is earlier than the 15-minute SLA.
    assert_eq!(v["sla_due"], json!({"customer": "2026-01-01T00:10:00Z"}));
}

#[test]
fn explain_json_refund_and_external_message_in_one_matrix() {
    // The example of DESIGN.md: a matrix where an external message is the
    // customer lane's whatever its kind, so one refund reaches both lanes.
    let matrix = "\
lanes:
  finance: {sla: 2h, owner: finance-approver, roster: [fran], context: {impact: signals.impact}}
  customer: {sla: 15m, owner: customer-owner, roster: [cora], context: {promises: signals.promises}}
rules:
  - name: refund-over-threshold
    lane: finance
    when: {kind: refund.issue, signals.amount: {above: 100}}
  - name: external-message
    lane: customer
    when: {signals.audience: external}
";
    let dir = tempfile::tempdir().unwrap();
    let matrix = write(&dir, "m.yaml", matrix);
    let event = write(
        &dir,
        "refund.json",
        &REFUND.replace(
            "\"deadline\": \"2026-01-01T03:00:00Z\"",
            "\"impact\": \"one account\"",
        ),
    );
    let o = run(&["explain", "--matrix", s(&matrix), "--format", "json", s(&event)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["lanes"], json!(["finance", "customer"]));
    assert_eq!(v["rules"], json!(["refund-over-threshold", "external-message"]));
    assert_eq!(v["missing_context"], json!({"customer": ["promises"]}));
    assert_eq!(
        v["sla_due"],
        json!({"finance": "2026-01-01T02:00:00Z", "customer": "2026-01-01T00:15:00Z"})
    );
    // Lane-keyed maps keep the matrix's lane order in the text.
    let f = text.find("\"finance\": \"2026").unwrap();
    let c = text.find("\"customer\": \"2026").unwrap();
    assert!(f < c, "{text}");
}

#[test]
fn explain_json_when_no_review_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let event = write(&dir, "ok.json", &REFUND.replace("250.00", "100.00"));
    let v = explain_json(&default_matrix_path(), &event);
    assert_eq!(v["review"], json!(false));
    assert_eq!(v["lanes"], json!([]));
    assert_eq!(v["rules"], json!([]));
    assert_eq!(v["missing_context"], json!({}));
    assert_eq!(v["sla_due"], json!({}));
}

#[test]
fn explain_reads_the_event_from_stdin() {
    let path = default_matrix_path();
    let o = run_stdin(
        &["explain", "--matrix", s(&path), "--format", "json", "-"],
        REFUND.as_bytes(),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["action_id"], json!("a-123"));
    assert_eq!(v["lanes"], json!(["finance"]));
}

#[test]
fn explain_refuses_an_event_without_kind() {
    let mut event: Value = serde_json::from_str(REFUND).unwrap();
    event.as_object_mut().unwrap().remove("kind");
    let o = run_stdin(
        &[
            "explain",
            "--matrix",
            s(&default_matrix_path()),
            "--format",
            "json",
            "-",
        ],
        event.to_string().as_bytes(),
    );
    assert_eq!(code(&o), 1, "stdout: {}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("kind: is required"), "{err}");
    assert!(stdout(&o).is_empty(), "nothing on stdout: {}", stdout(&o));
}

#[test]
fn explain_refuses_invalid_events() {
    let path = default_matrix_path();
    for (input, needle) in [
        (&b"{\"action_id\": "[..], "not valid JSON"),
        (&b""[..], "empty"),
        (&br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","signals":{"amount":"lots"}}"#[..], r#"signals.amount: "lots" is not a decimal"#),
    ] {
        let o = run_stdin(&["explain", "--matrix", s(&path), "--format", "json", "-"], input);
        assert_eq!(code(&o), 1, "{:?}", String::from_utf8_lossy(input));
        assert!(stderr(&o).contains(needle), "{needle:?} not in {}", stderr(&o));
    }
    let o = run(&["explain", "--matrix", s(&path), "/nonexistent/event.json"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("/nonexistent/event.json"), "{}", stderr(&o));
}

#[test]
fn explain_refuses_a_broken_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let matrix = write(&dir, "broken.yaml", BROKEN);
    let event = write(&dir, "refund.json", REFUND);
    let o = run(&["explain", "--matrix", s(&matrix), "--format", "json", s(&event)]);
    assert_eq!(code(&o), 2, "stdout: {}", stdout(&o));
    let want = format!("{}:10:13:", matrix.display());
    assert!(stderr(&o).contains(&want), "{want:?} not in {}", stderr(&o));
    assert!(stdout(&o).is_empty());
    // The matrix is judged first, even when the event is bad too.
    let o = run_stdin(&["explain", "--matrix", s(&matrix), "-"], b"{}");
    assert_eq!(code(&o), 2);
}

#[test]
fn explain_text_mentions_the_lane_and_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let event = write(&dir, "refund.json", REFUND);
    let o = run(&[
        "explain",
        "--matrix",
        s(&default_matrix_path()),
        "--format",
        "text",
        s(&event),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("a-123"), "{out}");
    assert!(out.contains("finance"), "{out}");
    assert!(out.contains("refund-over-threshold"), "{out}");
    assert!(out.contains("finance-approver"), "asks the owner: {out}");
    assert!(out.contains("impact"), "names the missing context: {out}");
    assert!(!out.contains("customer"), "{out}");

    // Text is the default format.
    let o = run(&["explain", "--matrix", s(&default_matrix_path()), s(&event)]);
    assert_eq!(stdout(&o), out);

    // An allowed action says so.
    let ok = write(&dir, "ok.json", &REFUND.replace("250.00", "99.99"));
    let o = run(&["explain", "--matrix", s(&default_matrix_path()), s(&ok)]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("no review needed"), "{}", stdout(&o));
}

#[test]
fn explain_uses_the_directory_file_for_enrichment() {
    let matrix = "\
directory:
  accounts:
    key: target.account_id
lanes:
  vip: {sla: 1h, owner: vip-desk, roster: [vera]}
rules:
  - name: enterprise-account
    lane: vip
    when: {enrichment.accounts.tier: enterprise}
";
    let dir = tempfile::tempdir().unwrap();
    let matrix = write(&dir, "m.yaml", matrix);
    let event = write(&dir, "refund.json", REFUND);
    let directory = write(
        &dir,
        "directory.json",
        r#"{"accounts": {"acct-9": {"tier": "enterprise", "name": "Initech"}}}"#,
    );
    let o = run(&[
        "explain",
        "--matrix",
        s(&matrix),
        "--format",
        "json",
        "--directory",
        s(&directory),
        s(&event),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["lanes"], json!(["vip"]));
    // Without the directory the rule cannot fire.
    let v = explain_json(&matrix, &event);
    assert_eq!(v["lanes"], json!([]));
}

#[test]
fn explain_and_check_report_the_same_version() {
    let dir = tempfile::tempdir().unwrap();
    let event = write(&dir, "email.json", EMAIL);
    let v = explain_json(&default_matrix_path(), &event);
    let version = v["matrix_version"].as_str().unwrap().to_string();
    assert!(version.starts_with("sha256:") && version.len() == 71, "{version}");
    let o = run(&["check", s(&default_matrix_path())]);
    assert!(stdout(&o).contains(&version));
}

#[test]
fn unknown_format_is_a_usage_error() {
    let o = run(&[
        "explain",
        "--matrix",
        s(&default_matrix_path()),
        "--format",
        "yaml",
        "-",
    ]);
    assert_eq!(code(&o), 2, "clap's usage error");
    assert!(stderr(&o).contains("yaml"), "{}", stderr(&o));
}
