//! Operating switchboard (README, "Operating it"): the Grafana dashboard and
//! the Prometheus alert rules are checked against the metrics a running
//! `switchboard run` really exposes, and the deployment files (Kubernetes
//! manifests, docker-compose.yml, Prometheus and Grafana provisioning)
//! against the invariants they must keep.
//!
//! `promtool check rules` / `test rules` and the schema validators run from
//! `tests/run.sh`; here, `promtool` parses every dashboard query.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use chrono::{TimeDelta, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard::config::Guarantee;
use switchboard::matrix::Matrix;

use common::*;

const DASHBOARD: &str = "deploy/grafana/dashboards/switchboard.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const PROMETHEUS: &str = "deploy/prometheus/prometheus.yml";
const K8S: &str = "deploy/k8s";
const COMPOSE: &str = "docker-compose.yml";

/// Labels Prometheus adds to every series it scrapes (`job`, `instance`) and
/// the `stage` label both scrape configurations set (prometheus.yml's
/// static labels, the PodMonitor's relabelling).
const TARGET_LABELS: &[&str] = &["job", "instance", "stage"];

// ------------------------------------------------------------ reading ----

fn path(relative: &str) -> PathBuf {
    manifest_dir().join(relative)
}

fn text(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

/// Every document of a YAML file as JSON values, with `<<` merge keys
/// applied (docker-compose.yml uses them).
fn yaml_docs(relative: &str) -> Vec<Value> {
    let source = text(relative);
    serde_yaml_ng::Deserializer::from_str(&source)
        .map(|doc| {
            let mut value =
                serde_yaml_ng::Value::deserialize(doc).unwrap_or_else(|e| panic!("{relative}: {e}"));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{relative}: merge keys: {e}"));
            serde_json::to_value(value).unwrap_or_else(|e| panic!("{relative}: not JSON-like: {e}"))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml(relative: &str) -> Value {
    let mut docs = yaml_docs(relative);
    assert_eq!(docs.len(), 1, "{relative} is one YAML document");
    docs.remove(0)
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is a string, not {v}"))
}

fn array<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is a list, not {v}"))
}

// ------------------------------------------- queries and expositions ----

/// Every `expr` in the dashboard (panels, rows' panels, anything nested).
fn dashboard_exprs() -> Vec<(String, String)> {
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", Value::String(expr)) => out.push((title.to_string(), expr.clone())),
                        _ => walk(value, title, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, title, out)),
            _ => {}
        }
    }
    let dashboard: Value = serde_json::from_str(&text(DASHBOARD)).expect("the dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard, "dashboard", &mut out);
    out
}

/// Every alert of alerts.yml: (name, expr).
fn alert_exprs() -> Vec<(String, String)> {
    let rules = yaml(ALERTS);
    let mut out = Vec::new();
    for group in array(&rules["groups"], "groups") {
        for rule in array(&group["rules"], "rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("a named rule");
            out.push((name.to_string(), str_of(&rule["expr"], "expr").to_string()));
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The switchboard metric names an expression uses (identifiers starting
/// with `switchboard_`), each with the label names of its `{…}` matchers.
fn metrics_in(expr: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let bytes = expr.as_bytes();
    let ident = |b: u8| is_ident(char::from(b));
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !ident(bytes[i - 1]);
        if starts_word && bytes[i..].starts_with(b"switchboard_") {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let labels = out.entry(expr[start..i].to_string()).or_default();
            let rest = expr[i..].trim_start();
            if let Some(inside) = rest.strip_prefix('{') {
                let end = inside.find('}').expect("a closed matcher");
                labels.extend(matcher_labels(&inside[..end]));
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Label names of a matcher list `a="x", b=~"y"` (values may hold commas).
fn matcher_labels(inside: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = inside.trim();
    while !rest.is_empty() {
        let name_end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        out.push(rest[..name_end].to_string());
        let Some(quote) = rest.find('"') else { break };
        let after = &rest[quote + 1..];
        let mut close = None;
        let mut escaped = false;
        for (k, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    close = Some(k);
                    break;
                }
                _ => escaped = false,
            }
        }
        let close = close.expect("a closed label value");
        rest = after[close + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    out
}

/// Label names of `by (…)` and `without (…)` clauses.
fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for keyword in ["by", "without"] {
        let mut from = 0;
        while let Some(pos) = expr[from..].find(keyword).map(|p| from + p) {
            from = pos + keyword.len();
            let before_ok = pos == 0 || !expr[..pos].ends_with(is_ident);
            let rest = expr[from..].trim_start();
            if before_ok && rest.starts_with('(') {
                let close = rest.find(')').expect("a closed grouping");
                out.extend(
                    rest[1..close]
                        .split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                );
            }
        }
    }
    out
}

/// What a text exposition has: every series name (a histogram family gives
/// `_bucket`, `_sum` and `_count`) with the label names seen on its samples.
fn exposition(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                panic!("a malformed TYPE line: {line}")
            };
            out.entry(name.to_string()).or_default();
            let suffixes: &[&str] = match kind {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["_sum", "_count"],
                _ => &[],
            };
            for suffix in suffixes {
                out.entry(format!("{name}{suffix}")).or_default();
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name_end = line.find(|c: char| !is_ident(c)).unwrap_or(line.len());
            let labels = out.entry(line[..name_end].to_string()).or_default();
            if line[name_end..].starts_with('{') {
                let close = line.rfind('}').expect("closed labels");
                labels.extend(matcher_labels(&line[name_end + 1..close]));
            }
        }
    }
    out
}

/// What is wrong with `expr` against an exposition: metric names it does
/// not have, and label names (in matchers and groupings) that no series of
/// the expression's metrics carries.
fn problems(source: &str, expr: &str, exposed: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let used = metrics_in(expr);
    let mut out = Vec::new();
    let mut available: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
    for name in used.keys() {
        match exposed.get(name) {
            Some(labels) => available.extend(labels.iter().cloned()),
            None => out.push(format!("{source}: {name} is not exposed (in `{expr}`)")),
        }
    }
    if used.is_empty() {
        return out;
    }
    let mut labels: BTreeSet<String> = used.values().flatten().cloned().collect();
    labels.extend(grouping_labels(expr));
    for label in labels {
        if !available.contains(&label) {
            out.push(format!(
                "{source}: label {label} is on none of {:?} (in `{expr}`)",
                used.keys().collect::<Vec<_>>()
            ));
        }
    }
    out
}

#[test]
fn the_query_parsers_find_names_and_labels() {
    let used = metrics_in(
        r#"histogram_quantile(0.5, sum by (lane, le) (rate(switchboard_decision_latency_seconds_bucket{lane!="a,b", x=~"y\"z"}[1h]))) / up{job="switchboard"} + my_switchboard_x"#,
    );
    assert_eq!(
        used,
        BTreeMap::from([(
            "switchboard_decision_latency_seconds_bucket".to_string(),
            BTreeSet::from(["lane".to_string(), "x".to_string()])
        )])
    );
    assert_eq!(
        grouping_labels("sum by(a, b) (x) + count without (c) (y) + standby(z)"),
        BTreeSet::from(["a".into(), "b".into(), "c".into()])
    );
    let exposed = exposition(
        "# HELP switchboard_h h\n# TYPE switchboard_h histogram\nswitchboard_h_bucket{lane=\"x\",le=\"1\"} 1\n# TYPE switchboard_c counter\nswitchboard_c{reason=\"a\"} 2\n",
    );
    assert!(exposed.contains_key("switchboard_h_sum") && exposed.contains_key("switchboard_h_count"));
    assert!(
        problems(
            "t",
            "sum by (lane, le) (rate(switchboard_h_bucket[5m]))",
            &exposed
        )
        .is_empty()
    );
    assert!(problems("t", "sum by (reason, instance) (switchboard_c)", &exposed).is_empty());
    assert_eq!(problems("t", "sum by (lane) (switchboard_c)", &exposed).len(), 1);
    assert_eq!(problems("t", "switchboard_missing_total", &exposed).len(), 1);
}

// ------------------------------------------------- a running instance ----

fn scraped(addr: &str, series: &str) -> Option<f64> {
    metric(&scrape(addr), series)
}

/// Replaces `path` with `text` atomically, as an editor or the kubelet does.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("writing the new matrix");
    std::fs::rename(&tmp, path).expect("replacing the matrix");
}

/// Starts `switchboard run --stage all` on a mock cluster and drives it
/// until every family the dashboard and the alerts need has samples:
/// routing, dead letters, SLA breaches, escalations and reminders (2-second
/// SLAs), accepted and refused decisions, lag, and a refused and an
/// accepted matrix reload. Then every switchboard metric name and label a
/// panel or an alert uses must be in the exposition.
#[test]
fn dashboard_and_alerts_use_only_metrics_a_running_switchboard_exposes() {
    let started = Instant::now();
    let kafka = MockKafka::new();
    let dir = tempfile::tempdir().expect("a temp dir");
    let matrix_path = dir.path().join("matrix.yaml");
    let short_sla = std::fs::read_to_string(path("tests/data/short-sla.yaml")).expect("the short-SLA matrix");
    std::fs::write(&matrix_path, &short_sla).expect("writing the matrix");
    let matrix = Matrix::load(&matrix_path).expect("the short-SLA matrix loads");
    let mut config = route_config(&kafka.bootstrap(), &matrix_path, Guarantee::ExactlyOnce);
    // One partition: decisions land with their pending record whatever
    // the test producer's partitioner.
    config.partitions = 1;
    kafka.create_topics(&config, &matrix);

    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = switchboard_command();
    cmd.args([
        "run",
        "--stage",
        "all",
        "--bootstrap-servers",
        &kafka.bootstrap(),
        "--matrix",
    ])
    .arg(&matrix_path)
    .args(["--partitions", "1", "--group-id", "ops", "--metrics-addr", &addr])
    .args(["--batch-wait-ms", "1", "--kafka", "statistics.interval.ms=200"]);
    let proc = Proc::spawn("switchboard-ops", cmd);
    wait_for(deadline(60), "/readyz to answer 200", || {
        http_get(&addr, "/readyz").is_some_and(|(status, _)| status == 200)
    });

    let producer = Producer::new(&kafka.bootstrap());
    let send = |topic: &str, key: &str, value: &Value| {
        producer.send(
            topic,
            None,
            Some(key.as_bytes()),
            Some(value.to_string().as_bytes()),
        );
        producer.flush();
    };

    // 1. An approval that stays open (its SLA starts in an hour), decided
    //    once by someone off the roster (refused) and once by its owner.
    let later = (Utc::now() + TimeDelta::hours(1)).to_rfc3339();
    send(
        &config.topics.actions,
        "ops-decided",
        &json!({
            "action_id": "ops-decided", "occurred_at": later, "agent_id": "ops-test",
            "kind": "refund.issue", "summary": "Refund to decide", "signals": {"amount": "500"}
        }),
    );
    let finance = r#"switchboard_pending_approvals{lane="finance"}"#;
    wait_for(deadline(30), "the escalation stage to hold the approval", || {
        scraped(&addr, finance) == Some(1.0)
    });
    let roster = &matrix
        .lanes
        .iter()
        .find(|l| l.name == "finance")
        .expect("a finance lane")
        .roster;
    for approver in ["mallory", roster[0].as_str()] {
        send(
            &config.topics.decisions,
            "ops-decided",
            &json!({
                "action_id": "ops-decided", "lane": "finance", "verdict": "approve",
                "approver": approver, "decided_at": Utc::now().to_rfc3339()
            }),
        );
    }
    wait_for(deadline(30), "one refused and one accepted decision", || {
        let m = scrape(&addr);
        metric(
            &m,
            r#"switchboard_decisions_total{lane="finance",verdict="approve"}"#,
        ) == Some(1.0)
            && metric(
                &m,
                r#"switchboard_decisions_rejected_total{reason="not_on_roster"}"#,
            ) == Some(1.0)
    });

    // 2. The samples, a day old: every review lane's SLA has passed, so each
    //    approval breaches, escalates, is reminded on its next step and
    //    runs down its chain. And one record that is not JSON.
    let day_ago = (Utc::now() - TimeDelta::days(1)).to_rfc3339();
    for (_, sample) in samples() {
        let mut action = sample.clone();
        action["occurred_at"] = Value::String(day_ago.clone());
        send(
            &config.topics.actions,
            str_of(&action["action_id"], "action_id"),
            &action,
        );
    }
    producer.send(
        &config.topics.actions,
        None,
        Some(b"ops-garbage"),
        Some(b"{not json"),
    );
    producer.flush();
    let families = [
        "switchboard_events_routed_total",
        "switchboard_dead_letters_total",
        "switchboard_sla_breaches_total",
        "switchboard_escalations_total",
        "switchboard_reminders_total",
        "switchboard_consumer_lag",
        "switchboard_decision_latency_seconds",
    ];
    wait_for(
        deadline(60),
        "routing, dead letters, breaches, escalations, reminders and lag",
        || {
            let m = scrape(&addr);
            families.iter().all(|f| m.contains(&format!("# TYPE {f} ")))
        },
    );

    // 3. A refused reload (the old matrix keeps serving), then a valid one.
    replace_file(&matrix_path, "lanes: {}\nrules: [\n");
    wait_for(deadline(30), "the refused reload to be counted", || {
        scraped(&addr, r#"switchboard_matrix_reloads_total{result="error"}"#).is_some_and(|n| n >= 1.0)
    });
    let edited = short_sla.replacen("sla: 2s", "sla: 3s", 1);
    replace_file(&matrix_path, &edited);
    let version = Matrix::load(&matrix_path)
        .expect("the edited matrix loads")
        .version;
    assert_ne!(version, matrix.version, "the edit changes the version");
    let live = format!("switchboard_matrix_info{{version=\"{version}\"}}");
    wait_for(deadline(30), "the edited matrix to go live", || {
        let m = scrape(&addr);
        metric(&m, &live) == Some(1.0)
            && metric(&m, r#"switchboard_matrix_reloads_total{result="ok"}"#).is_some_and(|n| n >= 1.0)
    });

    let text = scrape(&addr);
    let exposed = exposition(&text);
    let mut wrong = Vec::new();
    let dashboard = dashboard_exprs();
    assert!(
        dashboard.len() >= 20,
        "the dashboard's queries were found: {dashboard:?}"
    );
    for (panel, expr) in &dashboard {
        wrong.extend(problems(&format!("dashboard panel {panel:?}"), expr, &exposed));
    }
    let alerts = alert_exprs();
    assert!(alerts.len() >= 6, "the alerts were found: {alerts:?}");
    for (alert, expr) in &alerts {
        wrong.extend(problems(&format!("alert {alert}"), expr, &exposed));
    }
    assert!(
        wrong.is_empty(),
        "queries use what a running switchboard does not expose:\n{}\n\n/metrics:\n{text}",
        wrong.join("\n")
    );
    drop(proc);
    eprintln!(
        "ran switchboard and checked {} queries in {:?}",
        dashboard.len() + alerts.len(),
        started.elapsed()
    );
}

/// The dashboard shows everything issue 6 asks of it, and the alerts watch
/// what should wake someone: each by the metric it needs.
#[test]
fn dashboard_and_alerts_cover_what_operators_need() {
    let dashboard: BTreeSet<String> = dashboard_exprs()
        .iter()
        .flat_map(|(_, e)| metrics_in(e).into_keys())
        .collect();
    for needed in [
        "switchboard_events_routed_total",
        "switchboard_events_allowed_total",
        "switchboard_dead_letters_total",
        "switchboard_route_duration_seconds_bucket",
        "switchboard_end_to_end_latency_seconds_bucket",
        "switchboard_pending_approvals",
        "switchboard_sla_breaches_total",
        "switchboard_escalations_total",
        "switchboard_reminders_total",
        "switchboard_decision_latency_seconds_bucket",
        "switchboard_decisions_rejected_total",
        "switchboard_consumer_lag",
        "switchboard_matrix_info",
        "switchboard_matrix_reloads_total",
    ] {
        assert!(dashboard.contains(needed), "no dashboard panel shows {needed}");
    }
    let alerts: BTreeSet<String> = alert_exprs()
        .iter()
        .flat_map(|(_, e)| metrics_in(e).into_keys())
        .collect();
    for needed in [
        "switchboard_sla_breaches_total",
        "switchboard_consumer_lag",
        "switchboard_dead_letters_total",
        "switchboard_matrix_reloads_total",
        "switchboard_events_consumed_total",
        "switchboard_events_routed_total",
        "switchboard_pending_approvals",
    ] {
        assert!(alerts.contains(needed), "no alert watches {needed}");
    }
    // Every panel has a query and reads the dashboard's datasource variable;
    // ids are unique and no two panels cover the same grid cell.
    let json: Value = serde_json::from_str(&text(DASHBOARD)).expect("the dashboard is JSON");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeMap::new();
    for panel in array(&json["panels"], "panels") {
        let title = str_of(&panel["title"], "a panel title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel id")),
            "panel {title}: a unique id"
        );
        let grid = |k: &str| panel["gridPos"][k].as_u64().expect("a grid position");
        assert!(
            grid("x") + grid("w") <= 24,
            "panel {title} fits the 24-column grid"
        );
        for x in grid("x")..grid("x") + grid("w") {
            for y in grid("y")..grid("y") + grid("h") {
                if let Some(other) = cells.insert((x, y), title) {
                    panic!("panels {other} and {title} overlap at ({x}, {y})");
                }
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            !array(&panel["targets"], "targets").is_empty(),
            "panel {} has a query",
            panel["title"]
        );
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {}",
            panel["title"]
        );
    }
}

/// promtool parses every dashboard query (Grafana's `$__…` intervals
/// replaced by durations), as `promtool check rules` does the alerts in
/// tests/run.sh.
#[test]
fn every_dashboard_query_is_valid_promql() {
    let rules: Vec<Value> = dashboard_exprs()
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h");
            json!({"record": format!("dashboard:query_{i}"), "expr": expr})
        })
        .collect();
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("dashboard-rules.yml");
    let doc = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).expect("writing the rules");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool is needed (Debian's prometheus package; tests/run.sh installs it): {e}")
        });
    assert!(
        out.status.success(),
        "promtool refuses a dashboard query:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// -------------------------------------------------------- kubernetes ----

fn k8s_resources() -> Vec<Value> {
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    array(&kustomization["resources"], "resources")
        .iter()
        .flat_map(|file| yaml_docs(&format!("{K8S}/{}", str_of(file, "a resource"))))
        .collect()
}

fn of_kind<'a>(resources: &'a [Value], kind: &str) -> Vec<&'a Value> {
    resources.iter().filter(|r| r["kind"] == kind).collect()
}

/// Whether a label selector's `matchLabels` select pods with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let wanted = selector.as_object().expect("a selector");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| &labels[k] == v)
}

/// Bytes of a Kubernetes memory quantity (`256Mi`, `1Gi`).
fn memory_bytes(quantity: &str) -> u64 {
    let (number, unit) = quantity.split_at(
        quantity
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(quantity.len()),
    );
    let n: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("a memory quantity: {quantity}"));
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("an unexpected memory unit {other} in {quantity}"),
    }
}

fn env_of(container: &Value) -> BTreeMap<String, String> {
    array(&container["env"], "env")
        .iter()
        .map(|e| {
            (
                str_of(&e["name"], "env name").to_string(),
                str_of(&e["value"], "env value").to_string(),
            )
        })
        .collect()
}

/// Whether `switchboard run --help` names `var` (`[env: VAR=value]`, or
/// `[env: VAR]` for a variable whose value it hides, as SWITCHBOARD_KAFKA).
fn reads_env(help: &str, var: &str) -> bool {
    help.contains(&format!("[env: {var}=")) || help.contains(&format!("[env: {var}]"))
}

/// `switchboard run --help`: the flags and their SWITCHBOARD_* variables.
fn run_help() -> String {
    let out = switchboard_command()
        .args(["run", "--help"])
        .output()
        .expect("switchboard run --help");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

#[test]
fn kubernetes_manifests_keep_their_invariants() {
    let all = k8s_resources();
    let help = run_help();

    // The matrix ConfigMap: generated from a copy of deploy/matrix.yaml,
    // without a name hash so updates swap the mounted files in place.
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    let generators = array(&kustomization["configMapGenerator"], "configMapGenerator");
    assert_eq!(generators.len(), 1, "one generated ConfigMap: the matrix");
    let generator = &generators[0];
    let configmap = str_of(&generator["name"], "the ConfigMap name");
    assert_eq!(generator["files"], json!(["matrix.yaml"]));
    assert_eq!(
        generator["options"]["disableNameSuffixHash"], true,
        "a hashed name would roll the pods instead of hot-reloading"
    );
    assert_eq!(
        text(&format!("{K8S}/matrix.yaml")),
        text("deploy/matrix.yaml"),
        "deploy/k8s/matrix.yaml is a copy of deploy/matrix.yaml: cp deploy/matrix.yaml deploy/k8s/"
    );

    let deployments = of_kind(&all, "Deployment");
    let mut stages = BTreeMap::new();
    let mut group_ids = BTreeSet::new();
    for deployment in &deployments {
        let name = str_of(&deployment["metadata"]["name"], "a name");
        let pod = &deployment["spec"]["template"];
        let pod_labels = &pod["metadata"]["labels"];
        assert!(
            selects(&deployment["spec"]["selector"]["matchLabels"], pod_labels),
            "{name}: the selector selects its own pods"
        );
        let containers = array(&pod["spec"]["containers"], "containers");
        assert_eq!(containers.len(), 1, "{name}: one container");
        let c = &containers[0];
        let args: Vec<&str> = array(&c["args"], "args")
            .iter()
            .map(|a| str_of(a, "an arg"))
            .collect();
        let stage = match args.as_slice() {
            ["run", "--stage", stage] => *stage,
            other => panic!("{name}: args are `run --stage <stage>`, not {other:?}"),
        };
        stages.insert(stage.to_string(), (*deployment).clone());
        let env = env_of(c);
        for var in env.keys() {
            assert!(
                var.starts_with("SWITCHBOARD_"),
                "{name}: {var} is a switchboard setting"
            );
            assert!(
                reads_env(&help, var),
                "{name}: {var} is read by `switchboard run` (see its --help)"
            );
        }
        group_ids.insert(env.get("SWITCHBOARD_GROUP_ID").cloned().expect("a group id"));
        assert!(
            env.contains_key("SWITCHBOARD_BOOTSTRAP_SERVERS"),
            "{name}: the brokers"
        );

        // Probes on the metrics port.
        let metrics_addr = env
            .get("SWITCHBOARD_METRICS_ADDR")
            .expect("SWITCHBOARD_METRICS_ADDR");
        assert!(
            metrics_addr.starts_with("0.0.0.0:"),
            "{name}: metrics served beyond the pod's loopback"
        );
        let port: u64 = metrics_addr.rsplit(':').next().unwrap().parse().expect("a port");
        let ports = array(&c["ports"], "ports");
        let port_number = |p: &Value| -> u64 {
            match p {
                Value::Number(n) => n.as_u64().unwrap(),
                Value::String(named) => ports
                    .iter()
                    .find(|cp| cp["name"] == named.as_str())
                    .and_then(|cp| cp["containerPort"].as_u64())
                    .unwrap_or_else(|| panic!("{name}: no container port named {named}")),
                other => panic!("{name}: a probe port {other}"),
            }
        };
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{name}: {probe}");
            assert_eq!(
                port_number(&get["port"]),
                port,
                "{name}: {probe} on the metrics port"
            );
        }

        // The matrix: a whole-ConfigMap directory mount, never a subPath.
        let matrix = PathBuf::from(env.get("SWITCHBOARD_MATRIX").expect("SWITCHBOARD_MATRIX"));
        let volumes = array(&pod["spec"]["volumes"], "volumes");
        let mounts = array(&c["volumeMounts"], "volumeMounts");
        let mount = mounts
            .iter()
            .find(|m| Path::new(str_of(&m["mountPath"], "mountPath")) == matrix.parent().unwrap())
            .unwrap_or_else(|| panic!("{name}: the matrix's folder is a mount"));
        assert!(
            mount.get("subPath").is_none() && mount.get("subPathExpr").is_none(),
            "{name}: no subPath"
        );
        assert_eq!(mount["readOnly"], true, "{name}: the matrix is mounted read-only");
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mount's volume");
        assert_eq!(
            volume["configMap"]["name"], configmap,
            "{name}: the matrix comes from the ConfigMap"
        );
        assert!(
            volume["configMap"].get("items").is_none(),
            "{name}: the ConfigMap's file keeps its name"
        );
        assert_eq!(matrix.file_name().unwrap(), "matrix.yaml");

        // Non-root, read-only root filesystem, nothing to escalate.
        let pod_sc = &pod["spec"]["securityContext"];
        let sc = &c["securityContext"];
        assert!(
            pod_sc["runAsNonRoot"] == true || sc["runAsNonRoot"] == true,
            "{name}: runs as non-root"
        );
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");

        // Resources requested, memory bounded.
        let resources = &c["resources"];
        assert!(resources["requests"]["cpu"].is_string(), "{name}: a CPU request");
        let request = memory_bytes(str_of(&resources["requests"]["memory"], "a memory request"));
        let limit = memory_bytes(str_of(&resources["limits"]["memory"], "a memory limit"));
        assert!(limit >= request, "{name}: the limit holds the request");

        // A disruption budget that covers exactly this stage's pods.
        let budgets: Vec<_> = of_kind(&all, "PodDisruptionBudget")
            .into_iter()
            .filter(|b| selects(&b["spec"]["selector"]["matchLabels"], pod_labels))
            .collect();
        assert_eq!(budgets.len(), 1, "{name}: one PodDisruptionBudget");
        assert!(
            budgets[0]["spec"]["maxUnavailable"].is_number()
                || budgets[0]["spec"]["minAvailable"].is_number(),
            "{name}: the budget sets a bound"
        );
        for other in &deployments {
            if other["metadata"]["name"] != deployment["metadata"]["name"] {
                assert!(
                    !selects(
                        &budgets[0]["spec"]["selector"]["matchLabels"],
                        &other["spec"]["template"]["metadata"]["labels"]
                    ),
                    "{name}: its budget does not count the other stage's pods"
                );
            }
        }

        // Scraped: the Service and the PodMonitor select it, on its metrics port.
        let service = of_kind(&all, "Service");
        assert!(
            service.iter().any(|s| selects(&s["spec"]["selector"], pod_labels)
                && array(&s["spec"]["ports"], "ports")
                    .iter()
                    .any(|p| port_number(&p["targetPort"]) == port)),
            "{name}: a Service reaches its metrics port"
        );
        let monitors = of_kind(&all, "PodMonitor");
        assert!(
            monitors
                .iter()
                .any(|m| selects(&m["spec"]["selector"]["matchLabels"], pod_labels)
                    && array(&m["spec"]["podMetricsEndpoints"], "endpoints")
                        .iter()
                        .any(|e| port_number(&e["port"]) == port && e["path"] == "/metrics")),
            "{name}: a PodMonitor scrapes its /metrics"
        );
    }
    assert_eq!(
        stages.keys().collect::<Vec<_>>(),
        ["escalate", "route"],
        "a Deployment per stage"
    );
    assert_eq!(
        group_ids.len(),
        1,
        "both stages in one consumer group: {group_ids:?}"
    );

    // The route stage about 200m / 256Mi; the escalation stage sized for a
    // backlog of pending approvals (~1 GiB per million, see escalate.yaml).
    let requests = |stage: &str| {
        stages[stage]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"].clone()
    };
    assert_eq!(requests("route"), json!({"cpu": "200m", "memory": "256Mi"}));
    assert!(memory_bytes(str_of(&requests("escalate")["memory"], "memory")) >= 1 << 30);
    assert!(
        text(&format!("{K8S}/escalate.yaml")).contains("1 GiB per million"),
        "escalate.yaml explains its memory"
    );

    // The PodMonitor gives the labels the alerts and the dashboard read.
    let monitor = &of_kind(&all, "PodMonitor")[0];
    assert_eq!(monitor["spec"]["jobLabel"], "app.kubernetes.io/name");
    for deployment in stages.values() {
        assert_eq!(
            deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
            "switchboard"
        );
    }
    let relabel = array(
        &monitor["spec"]["podMetricsEndpoints"][0]["relabelings"],
        "relabelings",
    );
    assert!(
        relabel.iter().any(|r| r["targetLabel"] == "stage"
            && r["sourceLabels"] == json!(["__meta_kubernetes_pod_label_app_kubernetes_io_component"])),
        "the PodMonitor sets the stage label"
    );
}

// ----------------------------------------------------------- compose ----

/// A bind mount `host:container[:mode]` of a compose service, host path
/// resolved against the repository.
fn bind_mounts(service: &Value) -> Vec<(PathBuf, String)> {
    service["volumes"]
        .as_array()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| {
            let spec = str_of(v, "a volume");
            let mut parts = spec.split(':');
            let host = parts.next()?;
            let container = parts.next()?;
            host.starts_with("./")
                .then(|| (manifest_dir().join(&host[2..]), container.to_string()))
        })
        .collect()
}

/// The host file a service sees at `container_path`, through its bind mounts.
fn host_path(service: &Value, container_path: &str) -> Option<PathBuf> {
    bind_mounts(service).into_iter().find_map(|(host, container)| {
        Path::new(container_path)
            .strip_prefix(&container)
            .ok()
            .map(|rest| host.join(rest))
    })
}

#[test]
fn compose_file_wires_the_stack() {
    let compose = yaml(COMPOSE);
    let services = compose["services"].as_object().expect("services");
    for name in [
        "kafka",
        "switchboard-route",
        "switchboard-escalate",
        "prometheus",
        "grafana",
        "samples",
    ] {
        let service = services.get(name).unwrap_or_else(|| panic!("a {name} service"));
        assert!(
            !array(&service["healthcheck"]["test"], "a health check").is_empty(),
            "{name} has a health check"
        );
        for (host, _) in bind_mounts(service) {
            assert!(host.exists(), "{name} mounts {} which exists", host.display());
        }
    }
    assert!(
        str_of(&services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"], "roles").contains("controller"),
        "Kafka in KRaft mode"
    );

    let help = run_help();
    let mut group_ids = BTreeSet::new();
    for stage in ["route", "escalate"] {
        let service = &services[&format!("switchboard-{stage}")];
        assert_eq!(service["command"], json!(["run", "--stage", stage]));
        assert!(
            path(str_of(&service["build"]["dockerfile"], "the Dockerfile")).exists(),
            "built from deploy/Dockerfile"
        );
        let env = service["environment"].as_object().expect("an environment");
        for var in env.keys() {
            assert!(reads_env(&help, var), "{var} is read by `switchboard run`");
        }
        group_ids.insert(str_of(&env["SWITCHBOARD_GROUP_ID"], "the group id").to_string());
        let matrix = str_of(&env["SWITCHBOARD_MATRIX"], "the matrix path");
        let on_host = host_path(service, matrix).expect("the matrix is mounted");
        assert_eq!(
            on_host,
            path("deploy/matrix.yaml"),
            "switchboard-{stage} serves deploy/matrix.yaml"
        );
        let mount_of_matrix = bind_mounts(service)
            .into_iter()
            .find(|(_, c)| Path::new(matrix).starts_with(c))
            .unwrap();
        assert!(
            mount_of_matrix.0.is_dir(),
            "switchboard-{stage}: the matrix's folder is mounted, so a replaced file is seen"
        );
        assert_eq!(env["SWITCHBOARD_METRICS_ADDR"], "0.0.0.0:9464");
    }
    assert_eq!(group_ids.len(), 1, "both stages use one group id");

    // Prometheus scrapes both stages with the alert rules loaded.
    let prometheus = &services["prometheus"];
    let config_path =
        host_path(prometheus, "/etc/prometheus/prometheus.yml").expect("prometheus.yml mounted");
    assert_eq!(config_path, path(PROMETHEUS));
    let config = yaml(PROMETHEUS);
    assert_eq!(config["rule_files"], json!(["alerts.yml"]));
    assert!(host_path(prometheus, "/etc/prometheus/alerts.yml").is_some_and(|p| p == path(ALERTS)));
    let targets: BTreeSet<String> = array(&config["scrape_configs"], "scrape_configs")
        .iter()
        .filter(|c| c["job_name"] == "switchboard")
        .flat_map(|c| array(&c["static_configs"], "static_configs").clone())
        .flat_map(|s| array(&s["targets"], "targets").clone())
        .map(|t| str_of(&t, "a target").to_string())
        .collect();
    assert_eq!(
        targets,
        BTreeSet::from([
            "switchboard-route:9464".to_string(),
            "switchboard-escalate:9464".to_string()
        ])
    );

    // Grafana: provisioning mounted, the provider's folder is where the
    // dashboards are mounted, the datasource is the compose Prometheus.
    let grafana = &services["grafana"];
    let provider = yaml("deploy/grafana/provisioning/dashboards/switchboard.yml");
    let folder = str_of(&provider["providers"][0]["options"]["path"], "the provider path");
    assert_eq!(
        host_path(grafana, &format!("{folder}/switchboard.json")),
        Some(path(DASHBOARD)),
        "the provider loads the dashboard"
    );
    assert_eq!(
        host_path(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml"),
        Some(path("deploy/grafana/provisioning/datasources/prometheus.yml"))
    );
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(datasources["datasources"][0]["type"], "prometheus");
    assert_eq!(datasources["datasources"][0]["url"], "http://prometheus:9090");

    // The producer sends the samples once the route stage is ready.
    let samples = &services["samples"];
    assert_eq!(host_path(samples, "/samples"), Some(path("deploy/samples")));
    assert_eq!(
        samples["depends_on"]["switchboard-route"]["condition"],
        "service_healthy"
    );
}
