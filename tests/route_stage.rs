//! The route stage on Kafka (issue "route stage on real Kafka"): real
//! librdkafka clients against librdkafka's in-process mock cluster, which
//! speaks the real protocol, transactions included. Each test has a cluster
//! of its own, so tests run in parallel; every wait has a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use switchboard::config::Guarantee;
use switchboard::enrich::Directory;
use switchboard::matrix::Matrix;
use switchboard::metrics::Metrics;

/// Records over this size go to the DLQ in the tests that send such records.
const MAX_RECORD_BYTES: usize = 8 * 1024;

/// ~200 records: valid samples (JSON and Avro, some without a key) with
/// invalid records of every kind in between, routed with `max_events`; then
/// every output topic is read back with a read_committed reader.
fn routes_a_mixed_batch(guarantee: Guarantee) {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let mut config = route_config(&kafka.bootstrap(), &default_matrix_path(), guarantee);
    config.max_record_bytes = MAX_RECORD_BYTES;
    kafka.create_topics(&config, &matrix);

    let valid = valid_cases("mix", 182);
    let invalid = invalid_cases("mix", MAX_RECORD_BYTES);
    let (n_valid, n_invalid) = (valid.len(), invalid.len());
    let cases = interleave(valid, invalid);
    let n = cases.len();
    send_cases(&kafka.bootstrap(), &config.topics.actions, &cases);

    config.max_events = Some(n as u64);
    let metrics = Metrics::new();
    let summary = run_stage(config.clone(), metrics.clone(), Duration::from_secs(60));
    assert_eq!(summary.handled, n as u64, "{summary:?}");
    assert_eq!(summary.dead, n_invalid as u64, "{summary:?}");
    assert_eq!(summary.routed + summary.allowed, n_valid as u64, "{summary:?}");
    assert_eq!(summary.duplicates, 0, "{summary:?}");

    let inputs = read(&config, &[&config.topics.actions]);
    assert_eq!(inputs.len(), n, "every input is on the topic");
    let outputs = Outputs::read(&config, &matrix);
    let versions = check_outputs(
        &config,
        &one_version(matrix.clone()),
        &Directory::default(),
        &cases,
        &inputs,
        &outputs,
    );
    assert_eq!(versions.len(), n_valid);

    // The metrics agree with the topics.
    assert_eq!(
        metrics
            .events_consumed_total
            .with_label_values(&[config.topics.actions.as_str()])
            .get(),
        n as u64
    );
    assert_eq!(metrics.events_allowed_total.get(), summary.allowed);
    // Every rule that fired for a lane counts once per packet on it.
    let mut fired: BTreeMap<(String, String), u64> = BTreeMap::new();
    for lane in &matrix.lanes {
        for record in outputs.by_topic.get(&lane.topic).into_iter().flatten() {
            let packet: serde_json::Value =
                serde_json::from_slice(record.payload.as_deref().unwrap_or_default())
                    .expect("packets are JSON");
            for rule in packet["rules"].as_array().expect("a packet lists its rules") {
                let rule = rule.as_str().expect("rule names are text").to_string();
                *fired.entry((lane.name.clone(), rule)).or_default() += 1;
            }
        }
    }
    assert!(fired.len() > 3, "the mix fires several rules: {fired:?}");
    for ((lane, rule), count) in &fired {
        assert_eq!(
            metrics.events_routed_total.with_label_values(&[lane, rule]).get(),
            *count,
            "events_routed_total{{lane={lane},rule={rule}}}"
        );
    }
    let mut by_reason: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &cases {
        if let Expect::Dead(reason) = c.expect {
            *by_reason.entry(reason).or_default() += 1;
        }
    }
    for (reason, count) in by_reason {
        assert_eq!(
            metrics.dead_letters_total.with_label_values(&[reason]).get(),
            count,
            "dead_letters_total{{reason={reason}}}"
        );
    }
    if guarantee == Guarantee::ExactlyOnce {
        assert!(metrics.transactions_total.with_label_values(&["commit"]).get() > 0);
        assert_eq!(metrics.transactions_total.with_label_values(&["abort"]).get(), 0);
    }
    // The group's offsets are at the end of every partition. (The mock
    // cluster acknowledges TxnOffsetCommit without storing the offsets, so
    // only plain commits can be read back there.)
    if guarantee == Guarantee::AtLeastOnce {
        let committed = committed_offsets(&config, &config.group_id, &config.topics.actions);
        for (partition, end) in end_offsets(&inputs) {
            assert_eq!(
                committed.get(&partition),
                Some(&end),
                "committed offset of partition {partition}"
            );
        }
    }
}

#[test]
fn exactly_once_routes_every_record_to_exactly_one_destination() {
    routes_a_mixed_batch(Guarantee::ExactlyOnce);
}

#[test]
fn at_least_once_routes_every_record_to_exactly_one_destination() {
    routes_a_mixed_batch(Guarantee::AtLeastOnce);
}

/// The same action_id twice on one partition and once more on another (in
/// its other encoding), then a restart of the stage in the same group and the same actions
/// once more: no action ever gets a second packet on any lane, and every
/// copy is counted as a duplicate.
#[test]
fn a_redelivered_action_never_opens_a_second_approval() {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let mut config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::ExactlyOnce);
    quick_rejoin(&mut config);
    kafka.create_topics(&config, &matrix);
    let actions = &config.topics.actions;

    let originals = valid_cases("redo", 20);
    let fresh_1 = valid_cases("redo-fresh", 10);
    let mut wave_1 = Vec::new();
    for (i, c) in originals.iter().enumerate() {
        wave_1.push(c.clone().on(0));
        if i % 2 == 0 {
            // Right behind the original, likely in the same batch.
            wave_1.push(c.clone().on(0));
        }
    }
    for (i, c) in originals.iter().enumerate() {
        if i % 2 == 1 {
            wave_1.push(c.clone().on(0));
        }
    }
    for c in &originals {
        // The same action in the other encoding, on another partition.
        wave_1.push(other_encoding(c).on(1));
    }
    wave_1.extend(fresh_1.iter().cloned());
    send_cases(&kafka.bootstrap(), actions, &wave_1);

    let mut first = config.clone();
    first.max_events = Some(wave_1.len() as u64);
    let metrics = Metrics::new();
    let summary = run_stage(first, metrics.clone(), Duration::from_secs(60));
    let duplicates_1 = (wave_1.len() - originals.len() - fresh_1.len()) as u64;
    assert_eq!(summary.duplicates, duplicates_1, "{summary:?}");
    assert_eq!(metrics.duplicates_total.get(), duplicates_1);
    assert_eq!(
        summary.routed + summary.allowed,
        (originals.len() + fresh_1.len()) as u64
    );
    let inputs = read(&config, &[actions]);
    check_outputs(
        &config,
        &one_version(matrix.clone()),
        &Directory::default(),
        &wave_1,
        &inputs,
        &Outputs::read(&config, &matrix),
    );

    // The agents retry everything after the restart, and send a few new ones.
    let fresh_2 = valid_cases("redo-late", 5);
    let mut wave_2: Vec<Case> = originals.iter().map(|c| c.clone().on(2)).collect();
    wave_2.extend(fresh_1.iter().map(other_encoding));
    wave_2.extend(fresh_2.iter().cloned());
    send_cases(&kafka.bootstrap(), actions, &wave_2);

    // A new stage in the same group resumes from the committed offsets.
    let inputs = read(&config, &[actions]);
    let committed: i64 = committed_offsets(&config, &config.group_id, actions)
        .values()
        .sum();
    let remaining = inputs.len() as u64 - committed as u64;
    let mut second = config.clone();
    second.max_events = Some(remaining);
    let metrics = Metrics::new();
    let summary = run_stage(second, metrics.clone(), Duration::from_secs(60));
    assert_eq!(summary.handled, remaining);
    assert_eq!(
        summary.routed + summary.allowed,
        fresh_2.len() as u64,
        "only new actions are routed: {summary:?}"
    );
    assert_eq!(metrics.duplicates_total.get(), remaining - fresh_2.len() as u64);

    let all: Vec<Case> = wave_1.into_iter().chain(wave_2).collect();
    check_outputs(
        &config,
        &one_version(matrix.clone()),
        &Directory::default(),
        &all,
        &inputs,
        &Outputs::read(&config, &matrix),
    );
}

/// The same case as Avro when it was JSON, and as JSON when it was Avro.
fn other_encoding(case: &Case) -> Case {
    let payload = case.payload.as_deref().expect("a valid case");
    let id = case.action_id().expect("a valid case");
    let json = if payload.first() == Some(&b'{') {
        serde_json::from_slice::<serde_json::Value>(payload).unwrap()
    } else {
        let sample = samples()
            .into_iter()
            .find(|(name, _)| id.ends_with(name.as_str()))
            .expect("ids end with the sample's name")
            .1;
        with_id(&sample, id)
    };
    let mut other = case.clone();
    other.payload = Some(if payload.first() == Some(&b'{') {
        avro(&json)
    } else {
        json.to_string().into_bytes()
    });
    other
}

const ENRICH_MATRIX: &str = r#"
description: Enrichment under test.
directory:
  accounts:
    key: target.account_id
lanes:
  key-accounts:
    sla: 1h
    owner: key-account-desk
    roster: [vera]
    context:
      account: [enrichment.accounts.name, target.account_id]
    optional_context:
      tier: enrichment.accounts.tier
      lead: enrichment.accounts.lead
    escalation:
      - assignee: account-lead
        from: enrichment.accounts.lead
  ops:
    sla: 30m
    owner: ops-oncall
    roster: [otto]
rules:
  - name: enterprise-account
    lane: key-accounts
    when:
      enrichment.accounts.tier: enterprise
  - name: config-change
    lane: ops
    when:
      kind: config.change
"#;

fn account_action(id: &str, account: &str) -> Vec<u8> {
    serde_json::json!({
        "action_id": id,
        "occurred_at": "2026-01-01T09:00:00Z",
        "agent_id": "support-agent",
        "kind": "ticket.update",
        "summary": "Close the ticket",
        "target": {"system": "helpdesk", "account_id": account}
    })
    .to_string()
    .into_bytes()
}

/// A `directory.accounts` record produced before the run is joined onto the
/// packet and fires a rule on `enrichment.accounts.tier`; records produced
/// while the stage runs (a new account, a changed one) are used for later
/// actions.
#[test]
fn directory_records_enrich_packets_and_fire_rules() {
    let kafka = MockKafka::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("matrix.yaml");
    std::fs::write(&path, ENRICH_MATRIX).unwrap();
    let matrix = Matrix::load(&path).expect("the test matrix is valid");
    let config = route_config(&kafka.bootstrap(), &path, Guarantee::ExactlyOnce);
    kafka.create_topics(&config, &matrix);
    let accounts = "directory.accounts";
    let vip = "approvals.key-accounts";
    let allowed = config.topics.allowed.clone();
    let actions = config.topics.actions.clone();

    kafka.produce(
        accounts,
        Some(b"acct-1"),
        Some(br#"{"name": "Initech", "tier": "enterprise", "lead": "lena"}"#),
    );
    kafka.produce(
        accounts,
        Some(b"acct-9"),
        Some(br#"{"name": "Globex", "tier": "standard", "lead": "gil"}"#),
    );
    for (id, account) in [("e-1", "acct-1"), ("e-9", "acct-9"), ("e-3", "acct-3")] {
        kafka.produce(&actions, Some(id.as_bytes()), Some(&account_action(id, account)));
    }

    let stage = StageThread::start(config.clone(), Metrics::new());
    let mut tail = Tail::new(&config, &[vip, "approvals.ops", &allowed]);
    assert!(
        tail.until(deadline(30), |records| ["e-1", "e-9", "e-3"]
            .iter()
            .all(|id| has_key(records, id))),
        "the first actions are routed"
    );
    // Known before the run: joined, and the tier rule fires.
    let e1: Vec<_> = tail.keyed("e-1").collect();
    assert_eq!(e1.len(), 1, "one output for e-1");
    assert_eq!(e1[0].topic, vip);
    let p = json(e1[0]);
    assert_eq!(
        p["enrichment"]["accounts"],
        serde_json::json!({"name": "Initech", "tier": "enterprise", "lead": "lena"})
    );
    assert_eq!(p["rules"], serde_json::json!(["enterprise-account"]));
    assert_eq!(p["lane"], "key-accounts");
    assert_eq!(p["context"]["account"], "Initech");
    assert_eq!(p["context"]["tier"], "enterprise");
    assert_eq!(p["context"]["lead"], "lena");
    assert_eq!(p["matrix_version"], matrix.version.as_str());
    // Known but not enterprise: joined, allowed.
    let e9: Vec<_> = tail.keyed("e-9").collect();
    assert_eq!((e9.len(), e9[0].topic.as_str()), (1, allowed.as_str()));
    assert_eq!(json(e9[0])["enrichment"]["accounts"]["tier"], "standard");
    // Unknown: nothing joined, allowed.
    let e3: Vec<_> = tail.keyed("e-3").collect();
    assert_eq!((e3.len(), e3[0].topic.as_str()), (1, allowed.as_str()));
    assert_eq!(json(e3[0])["enrichment"], serde_json::json!({}));

    // A new account while the stage runs: the directory feed is asynchronous,
    // so actions are sent until one is routed with it; every later one is.
    let producer = Producer::new(&kafka.bootstrap());
    producer.send(
        accounts,
        None,
        Some(b"acct-2"),
        Some(br#"{"name": "Umbrella", "tier": "enterprise", "lead": "uma"}"#),
    );
    producer.flush();
    let first = route_until(&producer, &mut tail, &actions, "new", "acct-2", |r| {
        r.topic == vip
    });
    assert_eq!(json(&first)["enrichment"]["accounts"]["name"], "Umbrella");
    for i in 0..3 {
        let r = route_one(
            &producer,
            &mut tail,
            &actions,
            &format!("new-after-{i}"),
            "acct-2",
        );
        assert_eq!(r.topic, vip, "later actions use the new record");
        assert_eq!(json(&r)["context"]["account"], "Umbrella");
    }

    // A changed account: later actions see the new tier.
    producer.send(
        accounts,
        None,
        Some(b"acct-1"),
        Some(br#"{"name": "Initech", "tier": "standard", "lead": "lena"}"#),
    );
    producer.flush();
    route_until(&producer, &mut tail, &actions, "changed", "acct-1", |r| {
        r.topic == allowed
    });
    let r = route_one(&producer, &mut tail, &actions, "changed-after", "acct-1");
    assert_eq!(r.topic, allowed);
    assert_eq!(json(&r)["enrichment"]["accounts"]["tier"], "standard");

    stage.stop(Duration::from_secs(30));
}

fn has_key(records: &[switchboard::changelog::ReadRecord], key: &str) -> bool {
    records.iter().any(|r| r.key.as_deref() == Some(key.as_bytes()))
}

/// Sends one action for `account` and returns its one output.
fn route_one(
    producer: &Producer,
    tail: &mut Tail,
    actions: &str,
    id: &str,
    account: &str,
) -> switchboard::changelog::ReadRecord {
    producer.send(
        actions,
        None,
        Some(id.as_bytes()),
        Some(&account_action(id, account)),
    );
    producer.flush();
    assert!(
        tail.until(deadline(20), |records| has_key(records, id)),
        "{id} is routed"
    );
    let out: Vec<_> = tail.keyed(id).cloned().collect();
    assert_eq!(out.len(), 1, "{id} has one output: {out:?}");
    out.into_iter().next().unwrap()
}

/// Sends actions `{prefix}-0`, `{prefix}-1`… for `account` until one's
/// output satisfies `done` (within 20 s); returns that output.
fn route_until(
    producer: &Producer,
    tail: &mut Tail,
    actions: &str,
    prefix: &str,
    account: &str,
    done: impl Fn(&switchboard::changelog::ReadRecord) -> bool,
) -> switchboard::changelog::ReadRecord {
    let until = deadline(20);
    for i in 0.. {
        let r = route_one(producer, tail, actions, &format!("{prefix}-{i}"), account);
        if done(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < until,
            "{prefix}: the directory change is never used"
        );
    }
    unreachable!()
}

/// Writes `text` to `path` the way editors and Kubernetes do: a new file
/// renamed over the old, so a reader never sees half a file.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Under a steady stream of actions, the matrix file is rewritten several
/// times, alternating a valid changed matrix (other SLAs, a higher refund
/// threshold) and invalid ones. Every action is routed wholly by one valid
/// version (its packets, lanes, rules and SLAs all agree with it), both
/// versions serve, the invalid ones are refused and counted, and nothing is
/// lost or doubled.
#[test]
fn hot_reload_under_load_routes_each_action_by_one_valid_version() {
    let kafka = MockKafka::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("matrix.yaml");
    let default = std::fs::read_to_string(default_matrix_path()).unwrap();
    // The inline cases are for `switchboard check`; v2 would fail some.
    let v1_text = default.split("\ntests:").next().unwrap().to_string();
    let refund = "      kind: [refund.issue, credit.issue]\n      signals.amount: {above: 100}";
    assert!(v1_text.contains(refund), "the default matrix has the refund rule");
    let v2_text = v1_text
        .replace(refund, &refund.replace("{above: 100}", "{above: 5000}"))
        .replace("sla: 2h", "sla: 3h")
        .replace("sla: 15m", "sla: 20m");
    let invalid_syntax = format!("{v1_text}\n  - name: [unclosed\n");
    let invalid_lane = v2_text.replace("lane: finance", "lane: treasury");
    let v1 = Matrix::parse(&v1_text, "v1").expect("v1 is valid");
    let v2 = Matrix::parse(&v2_text, "v2").expect("v2 is valid");
    assert_ne!(v1.version, v2.version);
    assert!(Matrix::parse(&invalid_syntax, "bad").is_err());
    assert!(Matrix::parse(&invalid_lane, "bad").is_err());
    std::fs::write(&path, &v1_text).unwrap();

    let config = route_config(&kafka.bootstrap(), &path, Guarantee::ExactlyOnce);
    kafka.create_topics(&config, &v1);
    let metrics = Metrics::new();
    let stage = StageThread::start(config.clone(), metrics.clone());

    // A steady stream of actions until told to stop.
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let producing = producing.clone();
        let bootstrap = kafka.bootstrap();
        let topic = config.topics.actions.clone();
        std::thread::spawn(move || {
            let producer = Producer::new(&bootstrap);
            let mut sent = Vec::new();
            let mut i = 0;
            while producing.load(Ordering::Relaxed) {
                for case in valid_cases(&format!("load-{i}"), 10) {
                    producer.send(&topic, None, case.key.as_deref(), case.payload.as_deref());
                    sent.push(case);
                }
                producer.flush();
                i += 1;
                // A steady rate, not a wait for anything.
                std::thread::sleep(Duration::from_millis(20));
            }
            sent
        })
    };

    let pending_topic = config.topics.pending.clone();
    let mut tail = Tail::new(&config, &[&pending_topic]);
    let with_version = |records: &[switchboard::changelog::ReadRecord], version: &str| {
        records
            .iter()
            .filter(|r| json(r)["matrix_version"] == version)
            .count()
    };
    let reloads = |result: &str| metrics.matrix_reloads_total.with_label_values(&[result]).get();
    assert!(
        tail.until(deadline(30), |r| with_version(r, &v1.version) >= 20),
        "v1 serves"
    );

    let steps: [(&str, &str); 6] = [
        (&invalid_syntax, "error"),
        (&v2_text, "ok"),
        (&invalid_lane, "error"),
        (&v1_text, "ok"),
        (&invalid_syntax, "error"),
        (&v2_text, "ok"),
    ];
    let (mut ok, mut error) = (0, 0);
    for (text, result) in steps {
        // The version about to serve, and how many actions it routed so far.
        let serving = (result == "ok").then(|| {
            let new = if *text == v2_text { &v2 } else { &v1 };
            (new, with_version(&tail.records, &new.version))
        });
        replace_file(&path, text);
        if result == "ok" {
            ok += 1;
        } else {
            error += 1;
        }
        wait_for(
            deadline(20),
            &format!("reload #{} ({result})", ok + error),
            || reloads("ok") >= ok && reloads("error") >= error,
        );
        assert_eq!(reloads("ok"), ok, "only valid versions are swapped in");
        if let Some((new, before)) = serving {
            assert!(
                tail.until(deadline(20), |r| with_version(r, &new.version) >= before + 10),
                "the new version serves under load"
            );
        }
    }

    producing.store(false, Ordering::Relaxed);
    let sent = producer.join().expect("the producer thread");
    assert!(
        tail.until(deadline(30), |r| r.len() >= sent.len()),
        "every action is routed ({} sent)",
        sent.len()
    );
    stage.stop(Duration::from_secs(30));

    let versions = BTreeMap::from([(v1.version.clone(), v1.clone()), (v2.version.clone(), v2.clone())]);
    let inputs = read(&config, &[&config.topics.actions]);
    assert_eq!(inputs.len(), sent.len());
    let used = check_outputs(
        &config,
        &versions,
        &Directory::default(),
        &sent,
        &inputs,
        &Outputs::read(&config, &v1),
    );
    let by_version: BTreeSet<&String> = used.values().collect();
    assert_eq!(by_version.len(), 2, "both versions routed actions");
    assert!(reloads("error") >= 3);
    assert_eq!(
        metrics
            .matrix_info
            .with_label_values(&[v2.version.as_str()])
            .get(),
        1,
        "matrix_info names the live version"
    );
}

/// `switchboard run` as operators start it: configured by SWITCHBOARD_*
/// variables and one `--kafka` pass-through flag. While it runs, /metrics
/// has every route-stage metric that has been touched and /readyz says
/// ready; it exits 0 once `--max-events` records are handled.
#[test]
fn switchboard_run_from_the_environment_serves_metrics_and_exits_at_max_events() {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::ExactlyOnce);
    kafka.create_topics(&config, &matrix);
    let invalid: Vec<Case> = invalid_cases("env", switchboard::decode::DEFAULT_MAX_RECORD_BYTES)
        .into_iter()
        .filter(|c| matches!(c.expect, Expect::Dead("bad_json" | "unknown_schema")))
        .collect();
    let first = interleave(valid_cases("env", 30), invalid);
    let second = valid_cases("env-late", 10);
    let total = first.len() + second.len();
    send_cases(&kafka.bootstrap(), &config.topics.actions, &first);

    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = switchboard_command();
    cmd.args(["run", "--kafka", "statistics.interval.ms=500"])
        .env("SWITCHBOARD_BOOTSTRAP_SERVERS", kafka.bootstrap())
        .env("SWITCHBOARD_MATRIX", default_matrix_path())
        .env("SWITCHBOARD_STAGE", "route")
        .env("SWITCHBOARD_GUARANTEE", "exactly-once")
        .env("SWITCHBOARD_GROUP_ID", "env-group")
        .env("SWITCHBOARD_METRICS_ADDR", &addr)
        .env("SWITCHBOARD_MAX_EVENTS", total.to_string())
        .env("SWITCHBOARD_LOG_FORMAT", "json");
    let mut proc = Proc::spawn("switchboard-run", cmd);

    wait_for(deadline(30), "/readyz to answer 200", || {
        http_get(&addr, "/readyz").is_some_and(|(status, _)| status == 200)
    });
    let consumed = r#"switchboard_events_consumed_total{topic="agent.actions"}"#;
    let metrics_up = wait_until(deadline(30), || {
        let m = scrape(&addr);
        metric(&m, consumed) == Some(first.len() as f64) && m.contains("switchboard_consumer_lag{")
    });
    assert!(
        metrics_up,
        "the first records in /metrics, with consumer lag:\n{}",
        scrape(&addr)
    );
    assert!(proc.try_status().is_none(), "still running below --max-events");
    let m = scrape(&addr);
    for name in [
        "switchboard_events_consumed_total{",
        "switchboard_events_routed_total{lane=",
        "switchboard_events_allowed_total ",
        "switchboard_dead_letters_total{reason=\"bad_json\"}",
        "switchboard_dead_letters_total{reason=\"unknown_schema\"}",
        "switchboard_duplicates_total ",
        "switchboard_route_duration_seconds_bucket{",
        "switchboard_route_duration_seconds_count ",
        "switchboard_end_to_end_latency_seconds_bucket{",
        "switchboard_end_to_end_latency_seconds_count ",
        "switchboard_matrix_info{version=",
        "switchboard_consumer_lag{partition=",
        "switchboard_transactions_total{result=\"commit\"}",
    ] {
        assert!(m.contains(name), "/metrics has {name}:\n{m}");
    }
    assert_eq!(
        metric(
            &m,
            &format!("switchboard_matrix_info{{version=\"{}\"}}", matrix.version)
        ),
        Some(1.0)
    );
    assert!(
        metric(&m, "switchboard_route_duration_seconds_count").is_some_and(|n| n >= 30.0),
        "every valid action was timed"
    );
    assert!(metric(&m, "switchboard_events_allowed_total").unwrap() > 0.0);

    send_cases(&kafka.bootstrap(), &config.topics.actions, &second);
    proc.wait_success(Duration::from_secs(30));

    let all: Vec<Case> = first.into_iter().chain(second).collect();
    let inputs = read(&config, &[&config.topics.actions]);
    check_outputs(
        &config,
        &one_version(matrix.clone()),
        &Directory::default(),
        &all,
        &inputs,
        &Outputs::read(&config, &matrix),
    );
}

/// SIGTERM while actions keep arriving: the process finishes the batch in
/// hand and exits 0; what it wrote is committed and whole (each partition's
/// handled records are a prefix, each routed exactly once), and a restart
/// in the same group handles the rest without redoing any of it.
#[test]
fn sigterm_exits_zero_with_its_committed_work_intact() {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let mut config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::ExactlyOnce);
    quick_rejoin(&mut config);
    config.group_id = "term-group".into();
    kafka.create_topics(&config, &matrix);
    let first = valid_cases("term", 100);
    send_cases(&kafka.bootstrap(), &config.topics.actions, &first);

    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = switchboard_command();
    cmd.args(["run", "--bootstrap-servers", &kafka.bootstrap(), "--matrix"])
        .arg(default_matrix_path())
        .args([
            "--stage",
            "route",
            "--group-id",
            "term-group",
            "--metrics-addr",
            &addr,
        ])
        .args([
            "--kafka",
            "session.timeout.ms=3000",
            "--kafka",
            "heartbeat.interval.ms=300",
        ]);
    let mut proc = Proc::spawn("switchboard-run", cmd);
    let consumed = |addr: &str| {
        metric(
            &scrape(addr),
            r#"switchboard_events_consumed_total{topic="agent.actions"}"#,
        )
    };
    wait_for(deadline(30), "the first records routed", || {
        consumed(&addr) == Some(first.len() as f64)
    });

    // More actions keep coming while the signal arrives.
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let producing = producing.clone();
        let bootstrap = kafka.bootstrap();
        let topic = config.topics.actions.clone();
        std::thread::spawn(move || {
            let producer = Producer::new(&bootstrap);
            let mut sent = Vec::new();
            let mut i = 0;
            while producing.load(Ordering::Relaxed) && i < 100 {
                for case in valid_cases(&format!("term-{i}"), 5) {
                    producer.send(&topic, None, case.key.as_deref(), case.payload.as_deref());
                    sent.push(case);
                }
                producer.flush();
                i += 1;
                // A steady rate, not a wait for anything.
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        })
    };
    wait_for(deadline(30), "records of the stream routed", || {
        consumed(&addr).is_some_and(|n| n >= first.len() as f64 + 20.0)
    });
    proc.signal("TERM");
    proc.wait_success(Duration::from_secs(30));
    producing.store(false, Ordering::Relaxed);
    let streamed = producer.join().expect("the producer thread");

    // What the process committed: whole batches, so a prefix of each
    // partition, every action in it routed exactly once.
    let all: Vec<Case> = first.iter().cloned().chain(streamed).collect();
    let inputs = read(&config, &[&config.topics.actions]);
    assert_eq!(inputs.len(), all.len());
    let outputs = Outputs::read(&config, &matrix);
    let handled = |r: &switchboard::changelog::ReadRecord| {
        let payload = r.payload.as_deref().unwrap();
        let id = if payload[0] == b'{' {
            serde_json::from_slice::<serde_json::Value>(payload).unwrap()["action_id"]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            all.iter()
                .find(|c| c.payload.as_deref() == Some(payload))
                .and_then(|c| c.action_id())
                .unwrap()
                .to_string()
        };
        !outputs.keyed(&config.topics.pending, &id).is_empty()
    };
    let mut done = 0;
    for partition in end_offsets(&inputs).keys() {
        let mut flags: Vec<(i64, bool)> = inputs
            .iter()
            .filter(|r| r.partition == *partition)
            .map(|r| (r.offset, handled(r)))
            .collect();
        flags.sort();
        let prefix = flags.iter().take_while(|(_, h)| *h).count();
        assert!(
            flags[prefix..].iter().all(|(_, h)| !h),
            "partition {partition}: handled records are a prefix: {flags:?}"
        );
        done += prefix;
    }
    assert!(
        done >= first.len() + 20,
        "the batches before the signal are committed"
    );
    let handled_inputs: Vec<_> = inputs.iter().filter(|r| handled(r)).cloned().collect();
    check_outputs(
        &config,
        &one_version(matrix.clone()),
        &Directory::default(),
        &all,
        &handled_inputs,
        &outputs,
    );

    // A restart in the same group: from the committed offsets (the mock
    // cluster keeps none from transactions, so from the start), what was
    // committed is recognised, the rest is routed once.
    let committed: i64 = committed_offsets(&config, &config.group_id, &config.topics.actions)
        .values()
        .sum();
    let remaining = inputs.len() as u64 - committed as u64;
    let mut restart = config.clone();
    restart.max_events = Some(remaining);
    let metrics = Metrics::new();
    let summary = run_stage(restart, metrics.clone(), Duration::from_secs(60));
    let fresh = (inputs.len() - done) as u64;
    assert_eq!(summary.routed + summary.allowed, fresh, "{summary:?}");
    assert_eq!(metrics.duplicates_total.get(), remaining - fresh);
    check_outputs(
        &config,
        &one_version(matrix.clone()),
        &Directory::default(),
        &all,
        &inputs,
        &Outputs::read(&config, &matrix),
    );
}

/// Exactly once through a fenced producer: `switchboard run` (a child
/// process, on the mock cluster, transactions on) has its transaction
/// commit answered with PRODUCER_FENCED, as when a newer instance took over
/// its work. It must stop at once with a failing exit (going on could
/// double the batch), and the instance started after it must route what is
/// left so that a read_committed reader sees every action in exactly one
/// destination set, each packet exactly once.
///
/// Why fenced at commit, not SIGKILL at a random moment: librdkafka's mock
/// cluster writes no transaction markers and keeps no aborted-transaction
/// index (its Fetch answers with an empty list and the last stable offset
/// at the log end), so a read_committed reader there sees the records of a
/// transaction that never committed. A kill between two produce requests of
/// one transaction would leave half a batch visible, which a real broker
/// hides; asserting on it would test the mock, not switchboard. A fenced
/// commit comes after every record of the batch was delivered, so what the
/// mock shows is whole, and on a real broker the batch is aborted instead;
/// either way the next instance must route each action once.
#[test]
fn a_fenced_producer_stops_and_its_successor_routes_every_action_once() {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let mut config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::ExactlyOnce);
    quick_rejoin(&mut config);
    config.group_id = "fence-group".into();
    kafka.create_topics(&config, &matrix);
    let instance = |name: &str, addr: &str| {
        let mut cmd = switchboard_command();
        cmd.args(["run", "--bootstrap-servers", &kafka.bootstrap(), "--matrix"])
            .arg(default_matrix_path())
            .args([
                "--stage",
                "route",
                "--group-id",
                "fence-group",
                "--metrics-addr",
                addr,
            ])
            .args(["--batch-size", "20"])
            .args([
                "--kafka",
                "session.timeout.ms=3000",
                "--kafka",
                "heartbeat.interval.ms=300",
            ]);
        Proc::spawn(name, cmd)
    };
    let consumed = |addr: &str| {
        metric(
            &scrape(addr),
            r#"switchboard_events_consumed_total{topic="agent.actions"}"#,
        )
        .unwrap_or(0.0)
    };

    // A first wave routed and committed normally.
    let mut sent = valid_cases("fence-a", 100);
    send_cases(&kafka.bootstrap(), &config.topics.actions, &sent);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut first = instance("fenced", &addr);
    wait_for(deadline(60), "the first wave routed", || {
        consumed(&addr) >= sent.len() as f64
    });

    // The next commit is answered "fenced"; the instance must give up.
    kafka.cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let wave = valid_cases("fence-b", 100);
    send_cases(&kafka.bootstrap(), &config.topics.actions, &wave);
    sent.extend(wave);
    let status = first.wait(Duration::from_secs(60));
    assert!(!status.success(), "a fenced instance exits failing: {status:?}");
    let log = first.log();
    assert!(log.contains("fenced"), "the instance says it was fenced:\n{log}");

    // Its successor routes the rest; more actions arrive meanwhile.
    let wave = valid_cases("fence-c", 100);
    send_cases(&kafka.bootstrap(), &config.topics.actions, &wave);
    sent.extend(wave);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut last = instance("successor", &addr);
    wait_routed(&config, sent.len(), deadline(120));
    last.signal("TERM");
    last.wait_success(Duration::from_secs(30));
    check_sent(&config, &matrix, &sent);
}

/// Exactly once through rebalances under load. While actions keep coming
/// the stage always has a transaction open (it routes the next batch while
/// one commits), so a second instance joining, and the first leaving, each
/// revoke partitions whose transaction is open; it is committed before they
/// go. Every action ends at exactly one destination. (The mock cluster
/// keeps no transactional offsets, see above, so here each new owner reads
/// its partitions from the start and the seen index drops what was routed;
/// on Kafka it reads from the offsets the revocation committed.)
#[test]
fn instances_joining_and_leaving_under_load_route_every_action_once() {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let mut config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::ExactlyOnce);
    quick_rejoin(&mut config);
    config.batch_size = 20;
    kafka.create_topics(&config, &matrix);
    let actions = config.topics.actions.clone();
    let consumed = |m: &Metrics| m.events_consumed_total.with_label_values(&[&actions]).get();

    let stream = Stream::start(&config, "rebalance", 30);
    let (first_metrics, second_metrics) = (Metrics::new(), Metrics::new());
    let first = StageThread::start(config.clone(), first_metrics.clone());
    wait_for(deadline(60), "the first instance routing", || {
        consumed(&first_metrics) >= 100
    });
    let second = StageThread::start(config.clone(), second_metrics.clone());
    wait_for(deadline(60), "the second instance routing", || {
        consumed(&second_metrics) >= 100
    });
    let before = consumed(&second_metrics);
    first.stop(Duration::from_secs(60));
    wait_for(deadline(60), "the second instance routing alone", || {
        consumed(&second_metrics) >= before + 200
    });
    let sent = stream.stop();
    wait_routed(&config, sent.len(), deadline(60));
    second.stop(Duration::from_secs(60));
    check_sent(&config, &matrix, &sent);
}

/// A partition's new owner routes none of its records before its seen
/// index has read the changelog to its end: an action the last owner
/// routed, sent again right after the handover, is recognised, and the
/// heir's handover is one more catch-up it waited for
/// (`seen_catch_up_seconds`). (A tail far behind at the handover is what
/// `tests/table_reader.rs` holds a reader to.)
#[test]
fn a_new_owner_catches_up_and_recognises_what_the_last_owner_routed() {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let mut config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::AtLeastOnce);
    quick_rejoin(&mut config);
    config.partitions = 2;
    kafka.create_topics(&config, &matrix);
    let actions = config.topics.actions.clone();
    let held = |m: &Metrics| m.assigned_partitions.with_label_values(&[&actions]).get();
    let consumed = |m: &Metrics| m.events_consumed_total.with_label_values(&[&actions]).get();
    let metrics = [Metrics::new(), Metrics::new()];
    let mut stages: Vec<Option<StageThread>> = metrics
        .iter()
        .map(|m| Some(StageThread::start(config.clone(), m.clone())))
        .collect();
    wait_for(deadline(60), "each instance holding a partition", || {
        metrics.iter().all(|m| held(m) == 1)
    });

    let case = valid_cases("handover", 1).remove(0).on(0);
    send_cases(&kafka.bootstrap(), &actions, std::slice::from_ref(&case));
    wait_for(deadline(60), "the action routed", || {
        metrics.iter().map(consumed).sum::<u64>() == 1
    });
    let owner = (0..2)
        .find(|i| consumed(&metrics[*i]) == 1)
        .expect("one routed it");
    let heir = 1 - owner;
    let catch_ups = metrics[heir].seen_catch_up_seconds.get_sample_count();
    stages[owner]
        .take()
        .expect("running")
        .stop(Duration::from_secs(60));
    wait_for(deadline(60), "the heir holding both partitions", || {
        held(&metrics[heir]) == 2
    });
    assert!(
        metrics[heir].seen_catch_up_seconds.get_sample_count() > catch_ups,
        "the heir's assignment waited for its seen index"
    );

    send_cases(&kafka.bootstrap(), &actions, std::slice::from_ref(&case));
    wait_for(deadline(60), "the heir handling the action sent again", || {
        consumed(&metrics[heir]) == 1
    });
    let summary = stages[heir]
        .take()
        .expect("running")
        .stop(Duration::from_secs(60));
    assert_eq!(
        (summary.duplicates, summary.routed, summary.allowed),
        (1, 0, 0),
        "the heir recognised the action and opened no second approval: {summary:?}"
    );
}

/// A record's own headers travel with it: the dead letter of a bad record
/// carries them first, in order and byte for byte (a header without a
/// value as an empty one), then switchboard's. The stage reads records
/// where librdkafka holds them, so this is also the check that it reads
/// their headers from there.
fn a_dead_letter_keeps_the_record_headers(guarantee: Guarantee) {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let mut config = route_config(&kafka.bootstrap(), &default_matrix_path(), guarantee);
    kafka.create_topics(&config, &matrix);

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()
        .expect("a producer");
    let headers = || {
        OwnedHeaders::new()
            .insert(Header {
                key: "traceparent",
                value: Some(b"00-4bf92f3577b34da6-00f067aa0ba902b7-01".as_slice()),
            })
            .insert(Header {
                key: "empty",
                value: None::<&[u8]>,
            })
            .insert(Header {
                key: "bytes",
                value: Some([0u8, 255, 10].as_slice()),
            })
    };
    let valid = valid_cases("hdr", 1).remove(0);
    for (key, payload) in [
        (b"hdr-bad".as_slice(), b"{not json".as_slice()),
        (
            valid.key.as_deref().expect("a key"),
            valid.payload.as_deref().expect("a value"),
        ),
    ] {
        producer
            .send(
                BaseRecord::to(&config.topics.actions)
                    .key(key)
                    .payload(payload)
                    .headers(headers()),
            )
            .map_err(|(e, _)| e)
            .expect("sent");
    }
    producer.flush(Duration::from_secs(10)).expect("acknowledged");

    config.max_events = Some(2);
    let summary = run_stage(config.clone(), Metrics::new(), Duration::from_secs(60));
    assert_eq!(
        (summary.dead, summary.routed + summary.allowed),
        (1, 1),
        "{summary:?}"
    );

    let letters = read(&config, &[&config.topics.dlq]);
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.key.as_deref(), Some(b"hdr-bad".as_slice()));
    assert_eq!(letter.payload.as_deref(), Some(b"{not json".as_slice()));
    let original: Vec<(&str, &[u8])> = letter.headers[..3]
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    assert_eq!(
        original,
        vec![
            (
                "traceparent",
                b"00-4bf92f3577b34da6-00f067aa0ba902b7-01".as_slice()
            ),
            ("empty", b"".as_slice()),
            ("bytes", [0u8, 255, 10].as_slice()),
        ]
    );
    assert_eq!(header(letter, "switchboard.reason"), Some("bad_json"));
    assert!(
        letter.headers[3..]
            .iter()
            .all(|(k, _)| k.starts_with("switchboard.")),
        "the originals, then switchboard's only: {:?}",
        letter.headers
    );
}

#[test]
fn a_dead_letter_keeps_the_record_headers_at_least_once() {
    a_dead_letter_keeps_the_record_headers(Guarantee::AtLeastOnce);
}

#[test]
fn a_dead_letter_keeps_the_record_headers_exactly_once() {
    a_dead_letter_keeps_the_record_headers(Guarantee::ExactlyOnce);
}
