//! The malformed-record corpus (`common/malformed.rs`, over a thousand
//! records) through a running `switchboard run --stage route` on the mock
//! cluster: every record ends in `switchboard.dlq` with its reason and its
//! original key and bytes, nothing reaches a lane or `actions.allowed`, a
//! valid action sent after them is routed, and the process's memory stays
//! bounded.

mod common;
#[path = "common/malformed.rs"]
mod malformed;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::json;
use switchboard::config::Guarantee;

use common::{
    MockKafka, Proc, deadline, default_matrix, default_matrix_path, free_port, header, http_get, json, read,
    route_config, samples, scrape, switchboard_command, wait_for, with_id,
};

/// What the route process may hold at its peak (VmHWM) after the corpus
/// (about 7 MB of records, the largest 2 MB): librdkafka's fetch buffers and
/// queues, the batch in hand, the runtime. Far below what a leak of every
/// record, or a copy per nesting level, would need.
const PEAK_RSS_LIMIT_KB: u64 = 300 * 1024;

/// A record by its key and value.
type RecordId<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// A `/proc/<pid>/status` field in kB.
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the child's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Sum of every sample of a metric family (all label sets).
fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_thousand_malformed_records_end_in_the_dlq_and_the_service_keeps_serving() {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::ExactlyOnce);
    kafka.create_topics(&config, &matrix);
    let corpus = malformed::corpus("svc");
    assert!(corpus.len() >= 1000);

    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = switchboard_command();
    cmd.env("RUST_LOG", "warn")
        .args(["run", "--bootstrap-servers", &kafka.bootstrap(), "--matrix"])
        .arg(default_matrix_path())
        .args([
            "--stage",
            "route",
            "--group-id",
            "hostile",
            "--metrics-addr",
            &addr,
        ]);
    let mut proc = Proc::spawn("switchboard-route", cmd);
    wait_for(deadline(30), "/readyz to answer 200", || {
        http_get(&addr, "/readyz").is_some_and(|(status, _)| status == 200)
    });
    let rss_ready = proc_status_kb(proc.pid(), "VmRSS");

    // A producer that may send records over the broker's usual 1 MB, as a
    // misconfigured agent fleet with a raised topic limit could.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("message.max.bytes", "10000000")
        .set("linger.ms", "5")
        .create()
        .expect("a producer");
    let send = |key: Option<&[u8]>, payload: Option<&[u8]>| {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&config.topics.actions);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        let mut record = Some(record);
        while let Some(r) = record.take() {
            if let Err((e, back)) = producer.send(r) {
                assert!(
                    matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        )
                    ),
                    "producing: {e}"
                );
                producer.poll(Duration::from_millis(10));
                record = Some(back);
            }
        }
    };
    for r in &corpus {
        send(r.key.as_deref(), r.payload.as_deref());
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("the corpus is written");

    let n = corpus.len() as f64;
    wait_for(deadline(90), "every malformed record dead-lettered", || {
        metric_sum(&scrape(&addr), "switchboard_dead_letters_total") == n
    });
    // Then valid actions: a large external email whose packet (the copy
    // twice: payload and context) still fits, one whose packet would not
    // (refused as too large rather than wedging the producer), and a
    // refund. The service still serves.
    let sample = |name: &str| {
        samples()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .expect("the sample")
    };
    let mut fits = with_id(&sample("external-apology"), "svc-large-ok");
    fits["payload"] = json!("p".repeat(300 * 1024));
    let mut too_big = with_id(&sample("external-apology"), "svc-large-too-big");
    too_big["payload"] = json!("p".repeat(600 * 1024));
    let valid = with_id(&sample("refund-over-threshold"), "svc-after");
    for action in [&fits, &too_big, &valid] {
        let id = action["action_id"].as_str().unwrap();
        send(Some(id.as_bytes()), Some(action.to_string().as_bytes()));
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("the valid actions are written");
    wait_for(deadline(30), "the valid actions routed", || {
        let m = scrape(&addr);
        metric_sum(&m, "switchboard_events_routed_total") >= 2.0
            && metric_sum(&m, "switchboard_dead_letters_total") == n + 1.0
    });
    let rss_after = proc_status_kb(proc.pid(), "VmRSS");
    let peak = proc_status_kb(proc.pid(), "VmHWM");
    eprintln!("route process: VmRSS {rss_ready} kB ready, {rss_after} kB after; peak {peak} kB");
    assert!(
        peak < PEAK_RSS_LIMIT_KB,
        "peak RSS {peak} kB over {PEAK_RSS_LIMIT_KB} kB"
    );
    proc.signal("TERM");
    proc.wait_success(Duration::from_secs(30));

    // Every input record is accounted for by its partition and offset.
    let inputs = read(&config, &[&config.topics.actions]);
    assert_eq!(inputs.len(), corpus.len() + 3);
    let too_big_bytes = too_big.to_string().into_bytes();
    let too_big_record = malformed::Malformed {
        name: "a valid email whose packet would be too large".into(),
        key: Some(b"svc-large-too-big".to_vec()),
        payload: Some(too_big_bytes),
        reasons: &["too_large"],
    };
    let expected: HashMap<RecordId<'_>, &malformed::Malformed> = corpus
        .iter()
        .chain([&too_big_record])
        .map(|r| ((r.key.as_deref(), r.payload.as_deref()), r))
        .collect();
    let by_offset: HashMap<(i32, i64), _> = inputs.iter().map(|r| ((r.partition, r.offset), r)).collect();
    let dlq = read(&config, &[&config.topics.dlq]);
    assert_eq!(
        dlq.len(),
        corpus.len() + 1,
        "one dead letter per malformed record"
    );
    let mut reasons = BTreeMap::<String, usize>::new();
    let mut seen = std::collections::HashSet::new();
    let mut omitted = 0;
    for letter in &dlq {
        let reason = header(letter, "switchboard.reason").expect("a reason header");
        assert!(header(letter, "switchboard.error").is_some_and(|e| !e.is_empty()));
        assert_eq!(header(letter, "switchboard.source.topic"), Some("agent.actions"));
        let partition: i32 = header(letter, "switchboard.source.partition")
            .unwrap()
            .parse()
            .unwrap();
        let offset: i64 = header(letter, "switchboard.source.offset")
            .unwrap()
            .parse()
            .unwrap();
        assert!(seen.insert((partition, offset)), "one dead letter per input");
        let input = by_offset[&(partition, offset)];
        let record = expected[&(input.key.as_deref(), input.payload.as_deref())];
        assert!(
            record.reasons.contains(&reason),
            "{}: dead-lettered as {reason}, expected one of {:?}",
            record.name,
            record.reasons
        );
        assert_eq!(letter.key, input.key, "{}: the key is kept", record.name);
        match header(letter, "switchboard.payload_omitted") {
            // Only a record too large for any producer to write again loses
            // its bytes in the DLQ (they stay at the source offset).
            Some(size) => {
                assert_eq!(reason, "too_large", "{}", record.name);
                let original = input.payload.as_ref().expect("a value").len();
                assert!(original > 1_000_000, "{}: {original} bytes omitted", record.name);
                assert_eq!(size, original.to_string());
                assert_eq!(letter.payload, None);
                omitted += 1;
            }
            None => assert_eq!(
                letter.payload, input.payload,
                "{}: the bytes are kept",
                record.name
            ),
        }
        *reasons.entry(reason.to_string()).or_default() += 1;
    }
    eprintln!("dead letters by reason: {reasons:?}");
    assert_eq!(omitted, 1, "only the 2 MB record's bytes are left out");

    // Nothing but the valid action reached a lane, actions.allowed or the
    // pending changelog.
    let mut outputs: Vec<String> = matrix.lanes.iter().map(|l| l.topic.clone()).collect();
    outputs.push(config.topics.allowed.clone());
    outputs.push(config.topics.pending.clone());
    let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    let routed = read(&config, &refs);
    assert!(!routed.is_empty());
    for r in &routed {
        assert!(
            [&b"svc-after"[..], b"svc-large-ok"].contains(&r.key.as_deref().unwrap_or_default()),
            "only the valid actions on {}",
            r.topic
        );
    }
    let large = routed
        .iter()
        .find(|r| r.topic == "approvals.customer")
        .map(json)
        .expect("the large email on the customer lane");
    assert_eq!(large["action_id"], json!("svc-large-ok"));
    let packet = routed
        .iter()
        .find(|r| r.topic == "approvals.finance")
        .map(json)
        .expect("the valid refund on the finance lane");
    assert_eq!(packet["action_id"], json!("svc-after"));
}
