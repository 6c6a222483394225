//! The pipeline benchmark: switchboard against the physical limit of the
//! broker it runs on, measured side by side in one run (these machines are
//! shared and noisy, so only ratios from one run mean much).
//!
//! `cargo bench --bench pipeline` runs, in one process:
//!
//! 1. tansu 0.6.0 on a free loopback port (memory storage), N synthetic
//!    AgentActions (~1 KB JSON, a realistic mix of kinds) loaded into a
//!    topic of P partitions;
//! 2. the physical limit: a plain librdkafka loop copying every record
//!    unchanged to one topic, offsets committed after delivery, with the
//!    same client settings switchboard uses, and pipelined as the route
//!    stage is (batches in flight while earlier ones are acknowledged);
//! 3. switchboard's route stage on the same records, at-least-once (tansu
//!    refuses librdkafka's transactions), until all N are committed; then
//!    the same pair again on the actions encoded as Confluent-framed Avro;
//!    and the floor under the stage: the passthrough's loop writing, for
//!    every action, the records the stage writes for one (made ahead by
//!    the stage's own code, so the loop decodes, routes and encodes
//!    nothing): what the contract's writes alone cost on this broker;
//! 4. the same pair exactly once on librdkafka's mock cluster (the copy
//!    loop then commits each batch in a transaction too);
//! 5. end-to-end latency at a fixed offered rate of half the route stage's
//!    measured throughput: event time to packet readable (a reader with
//!    1 ms fetch waits on every output topic), on tansu and again at the
//!    same rate on the mock cluster, whose fetches cost the same however
//!    much it holds (each fetch on tansu 0.6.0 lists every batch its
//!    partition has stored, so latency there climbs through a run, the
//!    passthrough's too; the table shows how long the broker took to
//!    acknowledge the input beside each); and exactly once on the mock
//!    cluster at half the exactly-once throughput, where a packet is
//!    readable once its batch's transaction commits;
//! 6. the escalation stage as a child process: restoring K pending
//!    approvals from the changelog (time, resident memory), and T timers
//!    falling due together (time until every escalation is durable);
//!
//! then prints one table and a last line `ratio: route/passthrough = X.XX`.
//! Throughput is timed from the moment a consumer holds its partitions to
//! the moment the last offset is committed, for both loops alike.
//!
//! Flags (after `--`): `--records N` (200000), `--partitions P` (3),
//! `--eos-records N` (N/4), `--latency-secs S` (10), `--pending K`
//! (1000000), `--timers T` (100000), `--only STEPS` (a comma-separated
//! subset of `route,floor,avro,latency,latency-mock,eos,latency-eos,restore,timers`),
//! `--rate R` (the latency steps' offered rate when the route step, or for
//! `latency-eos` the `eos` step, is skipped). Under `cargo test` (no `--bench`
//! flag) it runs every step at a small size, as a smoke test that fails
//! if any step does not finish.
//!
//! Environment: `BENCH_PROGRESS=1` prints how many actions the route stage
//! committed in each 250 ms (a steady run tells from one with stalls);
//! `BENCH_STAGE_LOG` (a `RUST_LOG` filter) shows the stages' own logs;
//! `BENCH_KAFKA="key=value,..."` adds client properties to both the
//! passthrough's and the route stage's clients (to try producer or consumer
//! settings side by side); `BENCH_BATCH_WAIT_MS` sets the stages'
//! `--batch-wait-ms`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, consumer::CommitMode};
use switchboard::clock::SystemClock;
use switchboard::config::{Config, Guarantee, Stage};
use switchboard::decode::Decoder;
use switchboard::http::Health;
use switchboard::kafka::InputRecord;
use switchboard::kafka::{consumer_config, producer_config};
use switchboard::metrics::Metrics;
use switchboard::reload::MatrixHandle;
use switchboard::sink::Output;
use switchboard::stage::route::{Handled, RouteStage};

use common::{Proc, Tansu, free_port, manifest_dir, scrape, switchboard_command};

/// A placeholder as long as an RFC 3339 time with milliseconds, replaced
/// in place when a record is sent at a chosen moment.
const TIME_SLOT: &str = "2000-01-01T00:00:00.000Z";

struct Args {
    records: usize,
    partitions: i32,
    eos_records: usize,
    latency_secs: u64,
    pending: usize,
    timers: usize,
    full: bool,
    /// Steps to run (`--only route,latency,eos,restore,timers`); all when empty.
    only: Vec<String>,
    /// Offered rate for the latency step when the route step is skipped.
    rate: Option<usize>,
}

impl Args {
    fn parse() -> Args {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let full = argv.iter().any(|a| a == "--bench");
        let value = |name: &str| -> Option<usize> {
            argv.iter()
                .position(|a| a == name)
                .and_then(|i| argv.get(i + 1))
                .and_then(|v| v.replace('_', "").parse().ok())
        };
        let records = value("--records").unwrap_or(if full { 200_000 } else { 3_000 });
        Args {
            records,
            partitions: value("--partitions").map(|p| p as i32).unwrap_or(3),
            eos_records: value("--eos-records").unwrap_or(records / 4),
            latency_secs: value("--latency-secs").unwrap_or(if full { 10 } else { 2 }) as u64,
            pending: value("--pending").unwrap_or(if full { 1_000_000 } else { 2_000 }),
            timers: value("--timers").unwrap_or(if full { 100_000 } else { 1_000 }),
            full,
            only: argv
                .iter()
                .position(|a| a == "--only")
                .and_then(|i| argv.get(i + 1))
                .map(|v| v.split(',').map(str::to_string).collect())
                .unwrap_or_default(),
            rate: value("--rate"),
        }
    }

    fn runs(&self, step: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == step)
    }
}

/// One line of the result table.
struct Row {
    broker: &'static str,
    what: String,
    records: usize,
    seconds: f64,
    note: String,
}

fn main() {
    // The binary's memory policy, for the route stage measured in this process.
    switchboard::alloc::keep_freed_memory();
    let args = Args::parse();
    // The in-process route stage logs too when BENCH_STAGE_LOG asks.
    if let Ok(filter) = std::env::var("BENCH_STAGE_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_ansi(false)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let matrix_path = manifest_dir().join("deploy/matrix.yaml");
    let mut rows = Vec::new();

    let mut ratio = f64::NAN;
    let mut floor_ratio = f64::NAN;
    let mut avro_ratio = f64::NAN;
    let mut route = f64::NAN;
    let throughput = args.runs("route") || args.runs("floor");
    if throughput || args.runs("avro") || args.runs("latency") {
        // ---- tansu: throughput, at least once ----
        eprintln!(
            "== tansu: loading {} actions into {} partitions",
            args.records, args.partitions
        );
        let tansu = Tansu::start();
        let bootstrap = tansu.bootstrap();
        let input = "bench.actions";
        create_topics(&runtime, &bootstrap, &[input, "bench.copy"], args.partitions);
        let config = stage_config(
            &bootstrap,
            &matrix_path,
            input,
            Guarantee::AtLeastOnce,
            args.partitions,
        );
        if throughput {
            let actions = synthetic(args.records, "t");
            let loaded = load(&bootstrap, input, &actions);
            rows.push(Row {
                broker: "tansu",
                what: "load (plain producer)".into(),
                records: args.records,
                seconds: loaded,
                note: format!("{:.0} bytes per action", mean_size(&actions)),
            });
            eprintln!("== tansu: passthrough");
            let cpu = Cpu::now(&tansu);
            let pass = passthrough(&bootstrap, input, "bench.copy", args.records, false);
            rows.push(cpu.row(
                &tansu,
                throughput_row("tansu", "passthrough, at least once", args.records, pass),
            ));
            if args.runs("route") {
                eprintln!("== tansu: route stage");
                let cpu = Cpu::now(&tansu);
                route = run_route(&runtime, config.clone(), args.records);
                rows.push(cpu.row(
                    &tansu,
                    throughput_row("tansu", "route stage, at least once", args.records, route),
                ));
                ratio = pass / route;
            }
            if args.runs("floor") {
                eprintln!("== tansu: floor (the stage's writes, nothing routed)");
                let sample = &actions[..actions.len().min(FLOOR_SAMPLE)];
                let writes = stage_writes(&config, sample, "floor.");
                create_topics(&runtime, &bootstrap, &floor_topics(&writes), args.partitions);
                let bytes: usize = writes
                    .iter()
                    .flatten()
                    .map(|o| o.key.as_ref().map_or(0, Vec::len) + o.payload.as_ref().map_or(0, Vec::len))
                    .sum();
                let records: usize = writes.iter().map(Vec::len).sum();
                let cpu = Cpu::now(&tansu);
                let seconds = floor(&bootstrap, input, &writes, args.records);
                let mut row =
                    throughput_row("tansu", "floor: the stage's writes alone", args.records, seconds);
                row.note += &format!(
                    " ({:.2} records, {:.0} bytes per action)",
                    records as f64 / sample.len() as f64,
                    bytes as f64 / sample.len() as f64
                );
                rows.push(cpu.row(&tansu, row));
                floor_ratio = pass / seconds;
            }
        }

        if args.runs("avro") {
            // ---- tansu: the same pair on Confluent-framed Avro input ----
            eprintln!("== tansu: {} actions as Avro", args.records);
            let avro_input = "bench.avro";
            create_topics(
                &runtime,
                &bootstrap,
                &[avro_input, "bench.avro.copy"],
                args.partitions,
            );
            let actions = as_avro(&synthetic(args.records, "a"));
            load(&bootstrap, avro_input, &actions);
            let cpu = Cpu::now(&tansu);
            let pass = passthrough(&bootstrap, avro_input, "bench.avro.copy", args.records, false);
            rows.push(cpu.row(
                &tansu,
                throughput_row(
                    "tansu",
                    &format!("passthrough, Avro ({:.0} B each)", mean_size(&actions)),
                    args.records,
                    pass,
                ),
            ));
            let mut avro = config.clone();
            avro.topics.actions = avro_input.into();
            avro.group_id = "bench-avro".into();
            let cpu = Cpu::now(&tansu);
            let route = run_route(&runtime, avro, args.records);
            rows.push(cpu.row(
                &tansu,
                throughput_row("tansu", "route stage, Avro, at least once", args.records, route),
            ));
            avro_ratio = pass / route;
        }

        drop(tansu);
        if args.runs("latency") {
            // ---- tansu: latency at half the measured route throughput ----
            // On a broker of its own: tansu 0.6.0's fetches list every
            // batch a partition holds, and the steps before left 400,000
            // actions' outputs in the route stage's topics and none in the
            // copy loop's, so on their broker the stage's latency grew with
            // what had run before (p99 753 ms after them, 162 ms alone).
            let tansu = Tansu::start();
            let bootstrap = tansu.bootstrap();
            let config = stage_config(
                &bootstrap,
                &matrix_path,
                input,
                Guarantee::AtLeastOnce,
                args.partitions,
            );
            let rate = latency_rate(&args, route);
            eprintln!(
                "== tansu: latency at {rate:.0} actions/s for {} s",
                args.latency_secs
            );
            let create = |names: &[&str]| create_topics(&runtime, &bootstrap, names, args.partitions);
            let (copy, stage) = latency_pair(
                &runtime,
                &create,
                config,
                args.partitions,
                rate,
                args.latency_secs,
            );
            rows.extend(latency_rows(
                "tansu",
                "latency",
                rate,
                args.latency_secs,
                copy,
                stage,
            ));
        }
    }

    if args.runs("latency-mock") {
        // ---- mock cluster: latency at the same rate, on a broker whose
        // fetches cost the same however much it holds ----
        let rate = latency_rate(&args, route);
        eprintln!(
            "== mock cluster: latency at {rate:.0} actions/s for {} s",
            args.latency_secs
        );
        rows.extend(mock_latency(
            &runtime,
            &matrix_path,
            &args,
            Guarantee::AtLeastOnce,
            rate,
        ));
    }

    let mut eos_ratio = f64::NAN;
    let mut eos_route = f64::NAN;
    if args.runs("eos") {
        // ---- mock cluster: exactly once ----
        let input = "bench.actions";
        eprintln!("== mock cluster: exactly once, {} actions", args.eos_records);
        let mock = MockCluster::new(1).expect("the mock cluster starts");
        let mock_bootstrap = mock.bootstrap_servers();
        let probe = stage_config(
            &mock_bootstrap,
            &matrix_path,
            input,
            Guarantee::ExactlyOnce,
            args.partitions,
        );
        create_mock_topics(&mock, &probe, &["bench.copy"], args.partitions);
        let eos_actions = synthetic(args.eos_records, "m");
        load(&mock_bootstrap, input, &eos_actions);
        let eos_pass = passthrough(&mock_bootstrap, input, "bench.copy", args.eos_records, true);
        rows.push(throughput_row(
            "mock",
            "passthrough, exactly once",
            args.eos_records,
            eos_pass,
        ));
        eos_route = run_route(&runtime, probe, args.eos_records);
        rows.push(throughput_row(
            "mock",
            "route stage, exactly once",
            args.eos_records,
            eos_route,
        ));
        eos_ratio = eos_pass / eos_route;
        drop(mock);
    }

    if args.runs("latency-eos") {
        // ---- mock cluster: latency exactly once, at half the exactly-once
        // throughput; a packet is readable (read_committed) once its
        // batch's transaction commits ----
        let rate = match args.rate {
            Some(rate) => rate as f64,
            None if eos_route.is_finite() => (args.eos_records as f64 / eos_route / 2.0).max(10.0),
            None => 1_000.0,
        };
        eprintln!(
            "== mock cluster: latency exactly once at {rate:.0} actions/s for {} s",
            args.latency_secs
        );
        rows.extend(mock_latency(
            &runtime,
            &matrix_path,
            &args,
            Guarantee::ExactlyOnce,
            rate,
        ));
    }

    if args.runs("restore") {
        // ---- tansu: the escalation stage ----
        eprintln!("== tansu: restoring {} pending approvals", args.pending);
        let tansu = Tansu::start();
        let (read, restore, rss) = restore(&runtime, &tansu, &matrix_path, args.partitions, args.pending);
        rows.push(Row {
            broker: "tansu",
            what: "changelog read back (plain reader)".into(),
            records: args.pending,
            seconds: read,
            note: "the restore's limit: every partition read in parallel, nothing done".into(),
        });
        rows.push(Row {
            broker: "tansu",
            what: "escalation: restore pending".into(),
            records: args.pending,
            seconds: restore,
            note: format!("resident {:.0} MiB (peak {:.0} MiB)", rss.0, rss.1),
        });
        drop(tansu);
    }
    if args.runs("timers") {
        eprintln!("== tansu: {} timers falling due together", args.timers);
        let tansu = Tansu::start();
        let fired = fire_together(&runtime, &tansu, &matrix_path, args.partitions, args.timers);
        rows.push(Row {
            broker: "tansu",
            what: "escalation: timers due together".into(),
            records: args.timers,
            seconds: fired,
            note: "from the due time to every escalation durable".into(),
        });
        drop(tansu);
    }

    print_table(&rows, &args);
    println!(
        "ratio: route/passthrough = {:.2} (floor/passthrough: {:.2}; Avro input: {:.2}; exactly once on the mock cluster: {:.2})",
        ratio, floor_ratio, avro_ratio, eos_ratio
    );
}

// ------------------------------------------------------------- inputs ----

/// `n` actions of a realistic mix (every lane, several at once, and
/// actions that need no review), each about 1 KB, keyed by action_id.
/// Their `occurred_at` is [`TIME_SLOT`], to be stamped when sent.
fn synthetic(n: usize, prefix: &str) -> Vec<(String, Vec<u8>)> {
    const KINDS: &[(&str, &str)] = &[
        ("refund.issue", r#""amount":"1249.00","currency":"EUR""#),
        ("refund.issue", r#""amount":"20.00","currency":"EUR""#),
        (
            "data.export",
            r#""data_classification":"pii","destination":"s3://partner""#,
        ),
        ("permission.grant", r#""permissions":["billing:admin"]"#),
        (
            "deploy.release",
            r#""reversible":true,"rollback_path":"helm rollback""#,
        ),
        ("email.send", r#""audience":"external","recipient_count":3"#),
        ("deadline.extend", r#""impact":"two days late""#),
        ("document.draft", r#""confidence":0.35"#),
        ("search.run", r#""confidence":0.9"#),
        ("report.generate", r#""audience":"internal""#),
        ("ticket.update", r#""scope":"one ticket""#),
        ("config.change", r#""reversible":false"#),
    ];
    let filler = "Customer wrote in twice about the same charge; the agent checked the invoice history, the card processor's log and the account notes before proposing this action. ";
    (0..n)
        .map(|i| {
            let (kind, signals) = KINDS[i % KINDS.len()];
            let id = format!("{prefix}-{i:09}");
            let environment = if i % 3 == 0 { "production" } else { "staging" };
            let json = format!(
                concat!(
                    r#"{{"action_id":"{id}","occurred_at":"{slot}","agent_id":"agent-{agent}","fleet":"bench","tenant":"acme","#,
                    r#""run_id":"run-{run}","kind":"{kind}","summary":"Bench action {i} of kind {kind}","reason":"{reason}","#,
                    r#""target":{{"system":"billing","resource":"invoice/{i}","account_id":"acct-{acct}","environment":"{env}"}},"#,
                    r#""signals":{{{signals}}},"attributes":{{"ticket":"SUP-{i}"}},"payload":"{payload}"}}"#
                ),
                id = id,
                slot = TIME_SLOT,
                agent = i % 50,
                run = i / 10,
                kind = kind,
                i = i,
                reason = &filler[..120],
                acct = i % 1000,
                env = environment,
                signals = signals,
                payload = &filler[..filler.len().min(180)].repeat(2),
            );
            (id, json.into_bytes())
        })
        .collect()
}

/// The same actions as Confluent-framed Avro (schema id 1), stamped with
/// a fixed time: Avro carries it as timestamp-millis, not as text to
/// stamp in place, and the throughput steps do not read it.
fn as_avro(actions: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let time = format!("\"{}\"", Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true));
    actions
        .iter()
        .map(|(key, json)| {
            let text = String::from_utf8_lossy(json).replace(&format!("\"{TIME_SLOT}\""), &time);
            let value: serde_json::Value = serde_json::from_str(&text).expect("a synthetic action is JSON");
            (key.clone(), common::avro(&value))
        })
        .collect()
}

/// CPU time of this process (the loop measured and its clients) and of the
/// broker, taken before a step: on two shared cores, throughput follows the
/// CPU each action costs both, and CPU time varies far less between runs
/// than wall time does.
struct Cpu {
    here: f64,
    broker: f64,
}

impl Cpu {
    fn now(tansu: &Tansu) -> Cpu {
        Cpu {
            here: cpu_seconds("self"),
            broker: tansu.pid().map_or(f64::NAN, |pid| cpu_seconds(&pid.to_string())),
        }
    }

    /// `row` with the CPU per record spent since `self`.
    fn row(self, tansu: &Tansu, row: Row) -> Row {
        let after = Cpu::now(tansu);
        let per = |seconds: f64| seconds / row.records as f64 * 1e6;
        Row {
            note: format!(
                "{}; CPU/action {:.1} µs + broker {:.1} µs",
                row.note,
                per(after.here - self.here),
                per(after.broker - self.broker)
            ),
            ..row
        }
    }
}

/// User + system CPU seconds of a process, from `/proc/PID/stat` (in
/// clock ticks of 1/100 s: Linux's USER_HZ, fixed at 100 for /proc).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses:
    // state is the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn mean_size(actions: &[(String, Vec<u8>)]) -> f64 {
    actions.iter().map(|(_, b)| b.len()).sum::<usize>() as f64 / actions.len().max(1) as f64
}

/// Writes `time` into the record's time slot.
fn stamp(bytes: &mut [u8], time: DateTime<Utc>) {
    let slot = find(bytes, TIME_SLOT.as_bytes());
    stamp_at(bytes, slot, time);
}

/// [`stamp`] where the slot was found already.
fn stamp_at(bytes: &mut [u8], slot: Option<usize>, time: DateTime<Utc>) {
    let text = time.to_rfc3339_opts(SecondsFormat::Millis, true);
    if let Some(at) = slot
        && text.len() == TIME_SLOT.len()
    {
        bytes[at..at + text.len()].copy_from_slice(text.as_bytes());
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn create_topics(runtime: &tokio::runtime::Runtime, bootstrap: &str, names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("an admin client");
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = runtime
        .block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .expect("creating topics");
    for r in results {
        if let Err((topic, code)) = r {
            assert!(
                code == rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "creating {topic}: {code}"
            );
        }
    }
}

/// Every topic the route stage with `config` reads or writes, and `extra`,
/// on the mock cluster (which answers no CreateTopics of its own).
fn create_mock_topics<C: ClientContext>(
    mock: &MockCluster<'_, C>,
    config: &Config,
    extra: &[&str],
    partitions: i32,
) {
    let matrix = switchboard::matrix::Matrix::load(&config.matrix_path).expect("the default matrix loads");
    for topic in switchboard::kafka::owned_topics(config, &matrix)
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .chain(["directory.accounts", "directory.incidents"])
    {
        mock.create_topic(topic, partitions, 1).expect("a mock topic");
    }
}

/// Produces every action (stamped now) and waits for the acknowledgements.
fn load(bootstrap: &str, topic: &str, actions: &[(String, Vec<u8>)]) -> f64 {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("compression.type", "lz4")
        .create()
        .expect("a producer");
    let started = Instant::now();
    let now = Utc::now();
    for (key, bytes) in actions {
        let mut bytes = bytes.clone();
        stamp(&mut bytes, now);
        send(&producer, topic, key.as_bytes(), &bytes);
    }
    producer
        .flush(Duration::from_secs(300))
        .expect("every action acknowledged");
    started.elapsed().as_secs_f64()
}

fn send<C: rdkafka::producer::ProducerContext<DeliveryOpaque = ()>>(
    producer: &BaseProducer<C>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
) {
    send_with(producer, topic, key, payload, ());
}

/// [`send`] with the opaque its delivery report comes back with.
fn send_with<C: rdkafka::producer::ProducerContext>(
    producer: &BaseProducer<C>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    opaque: C::DeliveryOpaque,
) {
    let mut record = BaseRecord::with_opaque_to(topic, opaque)
        .key(key)
        .payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((
                rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                back,
            )) => {
                record = back;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => panic!("producing to {topic}: {e}"),
        }
    }
}

// -------------------------------------------------------- passthrough ----

/// Records whether the consumer holds partitions yet.
#[derive(Default)]
struct Assigned(AtomicBool);

impl ClientContext for Assigned {}

impl ConsumerContext for Assigned {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.0.store(tpl.count() > 0, Ordering::Release);
        }
    }
}

/// The physical limit: consume every record of `input` and produce it
/// unchanged to `output`, committing offsets only once every copy before
/// them is acknowledged. At least once it keeps batches in flight as the
/// route stage does ([`copy_pipelined`]); exactly once it commits each
/// batch in a transaction with its offsets, as the stage does too.
/// Returns seconds from assignment to the last commit.
fn passthrough(bootstrap: &str, input: &str, output: &str, n: usize, exactly_once: bool) -> f64 {
    let mut config = Config::new(bootstrap, PathBuf::new());
    config.kafka.0.extend(extra_kafka());
    let group = if exactly_once {
        "bench-pass-eos"
    } else {
        "bench-pass"
    };
    let consumer: BaseConsumer<Assigned> = consumer_config(&config, group)
        .create_with_context(Assigned::default())
        .expect("the passthrough consumer");
    consumer.subscribe(&[input]).expect("subscribing");
    if !exactly_once {
        let producer: BaseProducer<Acks> = producer_config(&config, None)
            .create_with_context(Acks::default())
            .expect("the passthrough producer");
        warm_up(producer.client(), output);
        return copy_pipelined(&consumer, &producer, input, n, |message, id| {
            send_with(
                &producer,
                output,
                message.key().unwrap_or_default(),
                message.payload().unwrap_or_default(),
                id,
            );
            1
        });
    }
    let producer: BaseProducer = producer_config(&config, Some("bench-passthrough"))
        .create()
        .expect("the passthrough producer");
    warm_up(producer.client(), output);
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("transactions");
    let mut started = None;
    let mut copied = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while copied < n {
        assert!(
            Instant::now() < deadline,
            "the passthrough copied {copied} of {n}"
        );
        producer.begin_transaction().expect("a transaction");
        // Before the assignment, short polls: the clock starts when it comes.
        let first = Duration::from_millis(if started.is_none() { 1 } else { 100 });
        let offsets = copy_batch(&consumer, &producer, output, 1000.min(n - copied), first, |_| ());
        if started.is_none() && consumer.context().0.load(Ordering::Acquire) {
            started = Some(Instant::now());
        }
        copied += offsets.records;
        let tpl = offsets.list(input);
        if tpl.count() > 0 {
            let metadata = consumer.group_metadata().expect("group metadata");
            producer
                .send_offsets_to_transaction(&tpl, &metadata, Duration::from_secs(30))
                .expect("offsets in the transaction");
        }
        // Acknowledged before the commit, as the stage's sink does:
        // rust-rdkafka's commit flushes in 100 ms polls that run their
        // whole length while any copy is in flight.
        wait_delivered(&producer, Duration::from_secs(60));
        producer
            .commit_transaction(Duration::from_secs(30))
            .expect("committing");
    }
    started.map(|s| s.elapsed().as_secs_f64()).unwrap_or_default()
}

/// Learns where `topic`'s partitions are before the clock starts, as the
/// stages learn theirs (`Sink::warm_up`): librdkafka otherwise holds the
/// first records for a topic until it has looked it up (most of a second
/// on tansu, which the copy loops used to count).
fn warm_up<C: ClientContext>(client: &rdkafka::client::Client<C>, topic: &str) {
    client
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .expect("the output topic's metadata");
}

/// One batch as the stages take one: up to `limit` records, waiting
/// `first` for the first and 2 ms for each next, each copied to `output`
/// with the opaque `opaque(copies so far)`.
fn copy_batch<C: rdkafka::producer::ProducerContext>(
    consumer: &BaseConsumer<Assigned>,
    producer: &BaseProducer<C>,
    output: &str,
    limit: usize,
    first: Duration,
    opaque: impl Fn(usize) -> C::DeliveryOpaque,
) -> NextOffsets {
    write_batch(consumer, limit, first, |message, records| {
        send_with(
            producer,
            output,
            message.key().unwrap_or_default(),
            message.payload().unwrap_or_default(),
            opaque(records),
        );
        1
    })
}

/// One batch as the stages take one (up to `limit` records, waiting
/// `first` for the first and 2 ms for each next), each handed to `write`
/// with the records so far, which returns how many records it produced.
fn write_batch(
    consumer: &BaseConsumer<Assigned>,
    limit: usize,
    first: Duration,
    mut write: impl FnMut(&rdkafka::message::BorrowedMessage<'_>, usize) -> usize,
) -> NextOffsets {
    let mut next = NextOffsets::default();
    let mut wait = first;
    while next.records < limit {
        let Some(message) = consumer.poll(wait) else { break };
        let message = message.expect("consuming");
        next.sent += write(&message, next.records);
        next.by_partition
            .insert(message.partition(), message.offset() + 1);
        next.records += 1;
        wait = Duration::from_millis(2);
    }
    next
}

/// Where a batch leaves each partition it read, and how many records it held.
#[derive(Default)]
struct NextOffsets {
    by_partition: BTreeMap<i32, i64>,
    records: usize,
    /// Records produced for them.
    sent: usize,
}

impl NextOffsets {
    fn list(&self, topic: &str) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in &self.by_partition {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .expect("an offset");
        }
        tpl
    }
}

/// Batches of the pipelined copy loop in flight at most: the route
/// stage's own bound (`MAX_IN_FLIGHT` in `src/stage/route.rs`).
const COPY_IN_FLIGHT: usize = 16;

/// The at-least-once copy loop pipelined as the route stage's is: it reads
/// and copies the next batch while earlier ones travel, and commits
/// (asynchronously; the last one synchronously) the offsets of the batches
/// at the front whose every copy is acknowledged. A loop that waited for
/// each batch's acknowledgements and commit before reading on was
/// round-trip bound, not a limit: the route stage outran it.
fn copy_pipelined(
    consumer: &BaseConsumer<Assigned>,
    producer: &BaseProducer<Acks>,
    input: &str,
    n: usize,
    mut write: impl FnMut(&rdkafka::message::BorrowedMessage<'_>, usize) -> usize,
) -> f64 {
    struct InFlight {
        offsets: NextOffsets,
        acked: usize,
    }
    // Batch `first_id + i` is `in_flight[i]`; a copy's opaque is its batch id.
    let mut in_flight: std::collections::VecDeque<InFlight> = Default::default();
    let mut first_id = 0usize;
    let (mut copied, mut committed) = (0, 0);
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while committed < n {
        assert!(
            Instant::now() < deadline,
            "the passthrough committed {committed} of {n}"
        );
        producer.poll(Duration::ZERO);
        for (id, ok) in producer.context().take() {
            assert!(ok, "a copy was not acknowledged");
            in_flight[id - first_id].acked += 1;
        }
        let mut done = NextOffsets::default();
        while in_flight.front().is_some_and(|b| b.acked == b.offsets.sent) {
            let batch = in_flight.pop_front().expect("checked");
            first_id += 1;
            done.records += batch.offsets.records;
            done.by_partition.extend(batch.offsets.by_partition);
        }
        if done.records > 0 {
            committed += done.records;
            let mode = if committed == n {
                CommitMode::Sync
            } else {
                CommitMode::Async
            };
            consumer
                .commit(&done.list(input), mode)
                .expect("committing offsets");
        }
        if copied == n || in_flight.len() >= COPY_IN_FLIGHT {
            // Acknowledgements come on the producer's next poll; no busy wait.
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        // Before the assignment, short polls: the clock starts when it
        // comes. With copies in flight, short polls too, so their
        // acknowledgements are taken promptly, as the stage does.
        let first = Duration::from_millis(if started.is_none() || !in_flight.is_empty() {
            1
        } else {
            100
        });
        let id = first_id + in_flight.len();
        let offsets = write_batch(consumer, 1000.min(n - copied), first, |message, _| {
            write(message, id)
        });
        if started.is_none() && consumer.context().0.load(Ordering::Acquire) {
            started = Some(Instant::now());
        }
        if offsets.records > 0 {
            copied += offsets.records;
            in_flight.push_back(InFlight { offsets, acked: 0 });
        }
    }
    started.map(|s| s.elapsed().as_secs_f64()).unwrap_or_default()
}

/// The pipelined copy loop's acknowledgements: (batch id, delivered),
/// taken by the loop after each producer poll.
#[derive(Default)]
struct Acks(std::sync::Mutex<Vec<(usize, bool)>>);

impl Acks {
    fn take(&self) -> Vec<(usize, bool)> {
        std::mem::take(&mut *self.0.lock().expect("not poisoned"))
    }
}

impl ClientContext for Acks {}

impl rdkafka::producer::ProducerContext for Acks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, id: usize) {
        self.0.lock().expect("not poisoned").push((id, result.is_ok()));
    }
}

/// Waits until every record `producer` holds is acknowledged, serving
/// delivery reports between 200 µs sleeps (the sink instead lets its
/// producer's own thread serve them and waits on a condition). Not
/// `Producer::flush`, nor `poll` with a timeout: rust-rdkafka's polls run
/// their whole timeout (flush's 100 ms slices made every batch that waited
/// on it, and every `commit_transaction`, which flushes the same way, cost
/// at least 100 ms) and spend its last millisecond polling in a busy loop.
fn wait_delivered<C: rdkafka::producer::ProducerContext>(producer: &BaseProducer<C>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while producer.in_flight_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "copies not acknowledged within {limit:?}"
        );
        producer.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_micros(200));
    }
}

// -------------------------------------------------------------- floor ----

/// Actions whose writes the floor cycles through: enough for the mix of
/// kinds, lanes and sizes, few enough (a few megabytes) to stay in cache as
/// the stage's freshly encoded records are.
const FLOOR_SAMPLE: usize = 2_000;

/// The records the route stage writes for an action, as DESIGN.md has it
/// write them (the packet on each review lane's topic, or on
/// `actions.allowed`, and the action's record in `switchboard.pending`),
/// for each of `actions`, made ahead of any clock by the stage's own
/// [`RouteStage::handle`], each bound for `prefix` + its topic.
fn stage_writes(config: &Config, actions: &[(String, Vec<u8>)], prefix: &str) -> Vec<Vec<Output>> {
    let stage = RouteStage {
        matrix: MatrixHandle::load(&config.matrix_path, Metrics::new()).expect("the bench's matrix loads"),
        config: Arc::new(config.clone()),
        decoder: Decoder::bundled(),
        directory: Arc::default(),
        seen: Arc::default(),
        metrics: Metrics::new(),
        health: Health::new(),
        clock: Arc::new(SystemClock),
    };
    let matrix = stage.matrix.current();
    let now = Utc::now();
    actions
        .iter()
        .map(|(key, bytes)| {
            let record = InputRecord {
                topic: config.topics.actions.clone(),
                partition: 0,
                offset: 0,
                key: Some(key.as_bytes().to_vec()),
                payload: Some(bytes.clone()),
                headers: Vec::new(),
            };
            match stage.handle(&record, &matrix, now) {
                Handled::Routed(mut routed) => {
                    for output in &mut routed.outputs {
                        output.topic.insert_str(0, prefix);
                    }
                    routed.outputs
                }
                Handled::Dead { reason, .. } => panic!("a synthetic action was dead-lettered: {reason}"),
            }
        })
        .collect()
}

/// The floor under the route stage: the pipelined passthrough writing, for
/// each action it reads, what the stage writes for an action (the next of
/// `writes`, [`stage_writes`] of a sample of the same actions, to topics of
/// their own, keyed by the action read), and nothing else: no decoding,
/// routing, encoding or duplicate check in the loop. However little
/// switchboard's own work cost, the stage could not beat this on the same
/// broker. Returns seconds from assignment to the last commit.
fn floor(bootstrap: &str, input: &str, writes: &[Vec<Output>], n: usize) -> f64 {
    let mut config = Config::new(bootstrap, PathBuf::new());
    config.kafka.0.extend(extra_kafka());
    let consumer: BaseConsumer<Assigned> = consumer_config(&config, "bench-floor")
        .create_with_context(Assigned::default())
        .expect("the floor's consumer");
    consumer.subscribe(&[input]).expect("subscribing");
    let producer: BaseProducer<Acks> = producer_config(&config, None)
        .create_with_context(Acks::default())
        .expect("the floor's producer");
    for topic in floor_topics(writes) {
        warm_up(producer.client(), topic);
    }
    let mut next = writes.iter().cycle();
    copy_pipelined(&consumer, &producer, input, n, |message, id| {
        let outputs = next.next().expect("a cycle of a non-empty sample");
        for output in outputs {
            send_with(
                &producer,
                &output.topic,
                message.key().unwrap_or_default(),
                output.payload.as_deref().unwrap_or_default(),
                id,
            );
        }
        outputs.len()
    })
}

fn floor_topics(writes: &[Vec<Output>]) -> Vec<&str> {
    let topics: BTreeSet<&str> = writes.iter().flatten().map(|o| o.topic.as_str()).collect();
    topics.into_iter().collect()
}

// -------------------------------------------------------- route stage ----

fn stage_config(
    bootstrap: &str,
    matrix: &std::path::Path,
    input: &str,
    guarantee: Guarantee,
    partitions: i32,
) -> Config {
    let mut config = Config::new(bootstrap, matrix);
    config.stage = Stage::Route;
    config.guarantee = guarantee;
    config.group_id = format!("bench-route-{guarantee:?}").to_lowercase();
    config.topics.actions = input.into();
    config.partitions = partitions;
    config.kafka.0.extend(extra_kafka());
    if let Some(ms) = std::env::var("BENCH_BATCH_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.batch_wait = Duration::from_millis(ms);
    }
    config
}

/// `BENCH_KAFKA="key=value,..."`: client properties for both loops.
fn extra_kafka() -> Vec<(String, String)> {
    std::env::var("BENCH_KAFKA")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs the route stage until `n` records are committed; returns seconds
/// from assignment to the last commit (read from its own metrics, which
/// count a batch once it is durable).
fn run_route(runtime: &tokio::runtime::Runtime, mut config: Config, n: usize) -> f64 {
    config.max_events = Some(n as u64);
    let metrics = Metrics::new();
    let stop = Arc::new(AtomicBool::new(false));
    let input = config.topics.actions.clone();
    let handle = runtime.spawn(switchboard::stage::run(config, metrics.clone(), stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(900);
    while metrics.assigned_partitions.with_label_values(&[&input]).get() == 0 {
        assert!(
            !handle.is_finished(),
            "the route stage stopped before its assignment"
        );
        assert!(Instant::now() < deadline, "the route stage got no partitions");
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    let consumed = || metrics.events_consumed_total.with_label_values(&[&input]).get();
    // BENCH_PROGRESS=1: actions committed in each 250 ms, to tell a steady
    // run from one with stalls.
    let progress = std::env::var_os("BENCH_PROGRESS").is_some();
    let mut marks: Vec<u64> = Vec::new();
    while consumed() < n as u64 {
        if progress && started.elapsed() >= Duration::from_millis(250) * marks.len() as u32 {
            marks.push(consumed());
        }
        assert!(
            !handle.is_finished() || consumed() >= n as u64,
            "the route stage stopped early"
        );
        assert!(
            Instant::now() < deadline,
            "the route stage committed {} of {n}",
            consumed()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = started.elapsed().as_secs_f64();
    if progress {
        marks.push(consumed());
        let steps: Vec<String> = marks.windows(2).map(|w| (w[1] - w[0]).to_string()).collect();
        eprintln!("committed per 250 ms: {}", steps.join(" "));
    }
    let summary = runtime
        .block_on(handle)
        .expect("the stage joins")
        .expect("the stage ends cleanly");
    let route = summary.route.expect("a route summary");
    assert_eq!(route.handled, n as u64, "{route:?}");
    assert_eq!(route.dead, 0, "synthetic actions are valid: {route:?}");
    // Each synthetic action is unique: every one routed or allowed once,
    // or the step measured less work than it claims.
    assert_eq!(route.routed + route.allowed, n as u64, "{route:?}");
    elapsed
}

/// The latency steps' offered rate: `--rate`, else half the route stage's
/// measured throughput, else 1,000/s.
fn latency_rate(args: &Args, route_seconds: f64) -> f64 {
    match args.rate {
        Some(rate) => rate as f64,
        None if route_seconds.is_finite() => (args.records as f64 / route_seconds / 2.0).max(10.0),
        None => 1_000.0,
    }
}

fn throughput_row(broker: &'static str, what: &str, records: usize, seconds: f64) -> Row {
    Row {
        broker,
        what: what.into(),
        records,
        seconds,
        note: format!("{:.0} actions/s", records as f64 / seconds),
    }
}

// ------------------------------------------------------------ latency ----

/// Offers actions at `rate` per second for `secs` seconds, each stamped
/// when sent, while the route stage runs; a reader with 1 ms fetch waits
/// takes every packet as it becomes readable. Returns each action's
/// latency in milliseconds (to its last packet).
/// What carries actions to packets in a latency run.
enum Carrier {
    /// The route stage with this configuration (its input topic, outputs
    /// the lane topics and `actions.allowed`).
    Stage(Box<Config>),
    /// The physical limit: the plain copy loop from `input` to `output`.
    Copy {
        bootstrap: String,
        input: String,
        output: String,
        exactly_once: bool,
    },
}

/// Offers `rate` actions a second for `secs` to the carrier, after a
/// warm-up, and returns each measured action's latency in milliseconds:
/// from its `occurred_at` (stamped as it is sent) to the moment a reader
/// with 1 ms fetch waits holds its last output.
fn latency(
    runtime: &tokio::runtime::Runtime,
    create: &dyn Fn(&[&str]),
    carrier: Carrier,
    partitions: i32,
    rate: f64,
    secs: u64,
) -> LatencyRun {
    let n = (rate * secs as f64) as usize;
    let (bootstrap, input, outputs, reader_config) = match &carrier {
        Carrier::Stage(config) => {
            let matrix =
                switchboard::matrix::Matrix::load(&config.matrix_path).expect("the default matrix loads");
            let mut outputs: Vec<String> = matrix.lanes.iter().map(|l| l.topic.clone()).collect();
            outputs.push(config.topics.allowed.clone());
            // The stage's topics exist already when the route step ran
            // before; with `--only latency` they are made here, so their
            // ends can be read.
            let owned: Vec<String> = switchboard::kafka::owned_topics(config, &matrix)
                .into_iter()
                .collect();
            let owned: Vec<&str> = owned.iter().map(String::as_str).collect();
            create(&owned);
            (
                config.bootstrap_servers.clone(),
                config.topics.actions.clone(),
                outputs,
                switchboard::kafka::reader_config(config),
            )
        }
        Carrier::Copy {
            bootstrap,
            input,
            output,
            ..
        } => {
            create(&[input, output]);
            let config = Config::new(bootstrap, PathBuf::new());
            (
                bootstrap.clone(),
                input.clone(),
                vec![output.clone()],
                switchboard::kafka::reader_config(&config),
            )
        }
    };
    let mut reader_config = reader_config;
    let reader: BaseConsumer = reader_config
        .set("fetch.wait.max.ms", "1")
        .create()
        .expect("a reader");
    // From each partition's end as of now, resolved before anything is
    // sent (`Offset::End` would be resolved at the first fetch, after some
    // packets may already be there). Older records read by mistake (tansu
    // reports a short end) are left out by their key prefix below.
    let mut assignment = TopicPartitionList::new();
    for topic in &outputs {
        for p in 0..partitions {
            let (_, high) = reader
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("the output's end");
            assignment
                .add_partition_offset(topic, p, Offset::Offset(high))
                .expect("an assignment");
        }
    }
    reader.assign(&assignment).expect("assigning the reader");

    // Unmeasured actions at the offered rate before the measured ones.
    let ramp_n = (rate * RAMP.as_secs_f64()) as usize;
    // The carrier runs until it has handled every action.
    let total = WARM_UP + ramp_n + n;
    let metrics = Metrics::new();
    let done: Box<dyn Fn() -> bool + '_> = match carrier {
        Carrier::Stage(mut config) => {
            config.max_events = Some(total as u64);
            let handle = runtime.spawn(switchboard::stage::run(
                *config,
                metrics.clone(),
                Arc::new(AtomicBool::new(false)),
            ));
            let handle = Arc::new(std::sync::Mutex::new(Some(handle)));
            Box::new(move || {
                let mut slot = handle.lock().expect("not poisoned");
                if slot.as_ref().is_some_and(|h| h.is_finished()) {
                    let summary = runtime
                        .block_on(slot.take().expect("checked"))
                        .expect("the stage joins")
                        .expect("the stage ends cleanly");
                    assert_eq!(summary.route.map(|r| r.handled), Some(total as u64));
                }
                slot.is_none()
            })
        }
        Carrier::Copy {
            bootstrap,
            input,
            output,
            exactly_once,
        } => {
            let handle =
                std::thread::spawn(move || passthrough(&bootstrap, &input, &output, total, exactly_once));
            Box::new(move || handle.is_finished())
        }
    };

    let actions = synthetic(n, "lat");
    let ramp = synthetic(ramp_n, "ramp");
    let warm_up = synthetic(WARM_UP, "warm");
    let warm = Arc::new(AtomicBool::new(false));
    let warmed = warm.clone();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent_count = sent.clone();
    // When each measured action was handed to the producer: the reader
    // takes its latency from here by the index in its key, not by parsing
    // every output (which cost the reader, on the same two cores, more
    // than the carrier it measures).
    let sent_at: Arc<Vec<std::sync::OnceLock<Instant>>> =
        Arc::new((0..n).map(|_| std::sync::OnceLock::new()).collect());
    let stamped = sent_at.clone();
    let acks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let delivered = Delivered(Arc::default(), sent_at.clone(), acks.clone());
    let delivered_count = delivered.0.clone();
    let topic = input.clone();
    // Where each action's time goes, found before the clock starts.
    let slots: Vec<Option<usize>> = ramp
        .iter()
        .chain(&actions)
        .map(|(_, b)| find(b, TIME_SLOT.as_bytes()))
        .collect();
    let sender = std::thread::Builder::new()
        .name("bench-sender".into())
        .spawn(move || {
            // As an agent's client would: librdkafka's default linger.
            let producer: BaseProducer<Delivered> = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("linger.ms", "5")
                .create_with_context(delivered)
                .expect("a producer");
            // Warm-up actions first, measured ones once they were all read
            // back: the carrier's start (its first fetch and assignment) is
            // not part of its latency under a steady load.
            for (key, bytes) in warm_up {
                let mut bytes = bytes;
                stamp(&mut bytes, Utc::now());
                send(&producer, &topic, key.as_bytes(), &bytes);
            }
            let warm_deadline = Instant::now() + Duration::from_secs(120);
            while !warmed.load(Ordering::Relaxed) {
                assert!(
                    Instant::now() < warm_deadline,
                    "the warm-up actions were not read back within 120 s"
                );
                producer.poll(Duration::ZERO);
                std::thread::sleep(Duration::from_millis(1));
            }
            // Then the ramp and the measured actions as one schedule: the
            // measured ones meet a carrier already running at the rate.
            let started = Instant::now();
            for (j, (key, bytes)) in ramp.into_iter().chain(actions).enumerate() {
                // Slept for, not spun for (a spinning sender took most of a
                // core from the carrier it measures), and in steps of a
                // millisecond: the actions due within one go together, each
                // stamped as it goes.
                let due = started + Duration::from_secs_f64(j as f64 / rate);
                let ahead = due.saturating_duration_since(Instant::now());
                if ahead >= Duration::from_millis(1) {
                    std::thread::sleep(ahead);
                }
                producer.poll(Duration::ZERO);
                let mut bytes = bytes;
                stamp_at(&mut bytes, slots[j], Utc::now());
                if let Some(i) = j.checked_sub(ramp_n) {
                    let _ = stamped[i].set(Instant::now());
                    sent_count.store(i + 1, Ordering::Relaxed);
                }
                send(&producer, &topic, key.as_bytes(), &bytes);
            }
            wait_delivered(&producer, Duration::from_secs(60));
        })
        .expect("the sender starts");

    // Each measured action's latency to its last output so far.
    let mut last: Vec<Option<f64>> = vec![None; n];
    let mut read_back = 0;
    let mut warm_seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(secs + 120);
    let mut done_at = None;
    let mut progress = Instant::now();
    while Instant::now() < deadline {
        if progress.elapsed() >= Duration::from_secs(1) {
            progress = Instant::now();
            eprintln!(
                "   sent {} (acknowledged {}), read back {read_back}",
                sent.load(Ordering::Relaxed),
                delivered_count
                    .load(Ordering::Relaxed)
                    .saturating_sub(WARM_UP + ramp_n),
            );
        }
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(5)) {
            let received = Instant::now();
            let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                continue;
            };
            if key.starts_with("warm-") {
                warm_seen.insert(key.to_string());
                if warm_seen.len() == WARM_UP {
                    warm.store(true, Ordering::Relaxed);
                }
                continue;
            }
            let Some(i) = key.strip_prefix("lat-").and_then(|i| i.parse::<usize>().ok()) else {
                continue;
            };
            if let Some(at) = sent_at.get(i).and_then(|s| s.get()) {
                let ms = received.duration_since(*at).as_secs_f64() * 1000.0;
                let slot = &mut last[i];
                if slot.is_none() {
                    read_back += 1;
                }
                *slot = Some(slot.map_or(ms, |m| m.max(ms)));
            }
        }
        if done_at.is_none() && done() {
            done_at = Some(Instant::now());
        }
        // Once the carrier is done, give the reader a moment to see the last batch.
        if done_at.is_some_and(|d| d.elapsed() > Duration::from_millis(500) && read_back >= n) {
            break;
        }
    }
    sender.join().expect("the sender finishes");
    assert!(done(), "the carrier handled every action");
    assert_eq!(read_back, n, "every offered action was read back");
    // How latency moved through the run: on tansu 0.6.0 it climbs, because
    // each fetch there lists every batch its partition has stored.
    for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
        let tenths: Vec<String> = last
            .chunks(n.div_ceil(10).max(1))
            .map(|chunk| {
                let v: Vec<f64> = chunk.iter().flatten().copied().collect();
                format!("{:.0}", quantile(&v, q))
            })
            .collect();
        eprintln!("   {label} ms by tenth of the run: {}", tenths.join(" "));
    }
    let acks = std::mem::take(&mut *acks.lock().expect("not poisoned"));
    LatencyRun {
        latencies: last.into_iter().flatten().collect(),
        acks,
    }
}

/// The latency pair on a mock cluster of its own, with `guarantee`.
fn mock_latency(
    runtime: &tokio::runtime::Runtime,
    matrix_path: &std::path::Path,
    args: &Args,
    guarantee: Guarantee,
    rate: f64,
) -> Vec<Row> {
    let mock = MockCluster::new(1).expect("the mock cluster starts");
    let mock_bootstrap = mock.bootstrap_servers();
    let config = stage_config(
        &mock_bootstrap,
        matrix_path,
        "bench.latency",
        guarantee,
        args.partitions,
    );
    create_mock_topics(
        &mock,
        &config,
        &["bench.latency.in", "bench.latency.copy"],
        args.partitions,
    );
    let (copy, stage) = latency_pair(runtime, &|_| {}, config, args.partitions, rate, args.latency_secs);
    let measure = match guarantee {
        Guarantee::ExactlyOnce => "latency exactly once",
        Guarantee::AtLeastOnce => "latency",
    };
    latency_rows("mock", measure, rate, args.latency_secs, copy, stage)
}

/// The latency step on one broker: the passthrough, then the route stage
/// with `config` (its input and group made the latency step's own), at the
/// same rate, both with `config`'s guarantee. `create` makes topics there (the mock cluster answers no
/// CreateTopics: its topics are made beforehand).
fn latency_pair(
    runtime: &tokio::runtime::Runtime,
    create: &dyn Fn(&[&str]),
    mut config: Config,
    partitions: i32,
    rate: f64,
    secs: u64,
) -> (LatencyRun, LatencyRun) {
    let copy = latency(
        runtime,
        create,
        Carrier::Copy {
            bootstrap: config.bootstrap_servers.clone(),
            input: "bench.latency.in".into(),
            output: "bench.latency.copy".into(),
            exactly_once: config.guarantee == Guarantee::ExactlyOnce,
        },
        partitions,
        rate,
        secs,
    );
    config.topics.actions = "bench.latency".into();
    config.group_id = "bench-latency".into();
    create(&["bench.latency"]);
    let stage = latency(
        runtime,
        create,
        Carrier::Stage(Box::new(config)),
        partitions,
        rate,
        secs,
    );
    (copy, stage)
}

/// What a latency run measured, in milliseconds.
struct LatencyRun {
    /// Each action, from being handed to the producer to its last output
    /// in a reader's hands.
    latencies: Vec<f64>,
    /// Each action, from being handed to the producer to the broker's
    /// acknowledgement: how long the broker took to take the input in,
    /// which on tansu grows with what else it serves.
    acks: Vec<f64>,
}

/// The table's lines for a latency pair on one broker.
fn latency_rows(
    broker: &'static str,
    measure: &str,
    rate: f64,
    secs: u64,
    copy: LatencyRun,
    stage: LatencyRun,
) -> Vec<Row> {
    [("passthrough", copy), ("route stage", stage)]
        .into_iter()
        .map(|(what, run)| Row {
            broker,
            what: format!("{measure} at {rate:.0}/s: {what}"),
            records: run.latencies.len(),
            seconds: secs as f64,
            note: format!(
                "p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms (input acked: p99 {:.1} ms)",
                quantile(&run.latencies, 0.5),
                quantile(&run.latencies, 0.99),
                quantile(&run.latencies, 0.999),
                quantile(&run.acks, 0.99),
            ),
        })
        .collect()
}

/// Actions sent, and read back, before the latency step's measured ones:
/// the carrier has started (its assignment, its first fetch).
const WARM_UP: usize = 100;

/// Then actions at the offered rate, not measured, before the measured
/// ones. Both carriers' first half second at the rate, in a fresh process,
/// had a p99 of 135 to 183 ms (their heaps and the broker's log growing,
/// the input producer's own acknowledgements slow too) against about 21
/// ms for the passthrough after it: the start of a load, not its latency.
const RAMP: Duration = Duration::from_secs(1);

/// Counts the acknowledged records of the latency step's producer, and
/// times each measured one from when it was handed over.
struct Delivered(
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<Vec<std::sync::OnceLock<Instant>>>,
    Arc<std::sync::Mutex<Vec<f64>>>,
);

impl ClientContext for Delivered {}

impl rdkafka::producer::ProducerContext for Delivered {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Ok(m) = result {
            self.0.fetch_add(1, Ordering::Relaxed);
            if let Some(at) = m
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.strip_prefix("lat-"))
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| self.1.get(i))
                .and_then(|s| s.get())
            {
                self.2
                    .lock()
                    .expect("not poisoned")
                    .push(at.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
}

fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

// --------------------------------------------------------- escalation ----

/// `k` open pending records due at `due`, each with a level-0 packet built
/// by the library from a realistic action, produced to `topic`.
fn load_pending(bootstrap: &str, topic: &str, k: usize, due: DateTime<Utc>, prefix: &str) {
    let root = manifest_dir();
    let matrix =
        switchboard::matrix::Matrix::load(&root.join("deploy/matrix.yaml")).expect("the default matrix");
    let event = std::fs::read(root.join("benches/data/action-1k.json")).expect("the bench action");
    let decoder = switchboard::decode::Decoder::bundled();
    let action = decoder.decode(&event).expect("the bench action is valid");
    let directory = switchboard::enrich::Directory::default();
    let enrichment = switchboard::enrich::enrich(&matrix, &action, &directory);
    let routing = switchboard::route::route(&matrix, &action, &enrichment);
    let input = switchboard::packet::PacketInput {
        matrix: &matrix,
        action: &action,
        enrichment: &enrichment,
        routing: &routing,
        decisions_topic: "approvals.decisions",
        routed_at: Utc::now(),
    };
    let hit = routing.lanes.first().expect("the bench action needs review");
    let lane = &matrix.lanes[hit.lane];
    let packet = switchboard::packet::for_lane(&input, hit);
    // Serialized as the route stage writes it (its field order matters:
    // the restore reads a record's head up to its packets).
    use std::borrow::Cow;
    let template = serde_json::to_string(&switchboard::pending::PendingRecord {
        action_id: Cow::Borrowed("ACTION_ID"),
        status: switchboard::pending::Status::Open,
        revision: 0,
        matrix_version: Cow::Borrowed(&matrix.version),
        occurred_at: action.occurred_at,
        routed_at: Utc::now(),
        lanes: vec![switchboard::pending::LaneState::opened(lane, due, None)],
        packets: vec![packet],
        outcome: None,
        closed_at: None,
    })
    .expect("a pending record serializes");
    let original_id = action.action_id.to_string();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .create()
        .expect("a producer");
    for i in 0..k {
        let id = format!("{prefix}-{i:09}");
        let record = template.replace("ACTION_ID", &id).replace(&original_id, &id);
        send(&producer, topic, id.as_bytes(), record.as_bytes());
    }
    producer
        .flush(Duration::from_secs(600))
        .expect("every pending record acknowledged");
}

fn escalation_process(
    tansu: &Tansu,
    matrix: &std::path::Path,
    partitions: i32,
    pending_topic: &str,
    addr: &str,
) -> Proc {
    let mut cmd = switchboard_command();
    // BENCH_STAGE_LOG (a RUST_LOG filter) shows the stage's own log after
    // each escalation step, to see where its time went.
    cmd.env(
        "RUST_LOG",
        std::env::var("BENCH_STAGE_LOG").unwrap_or_else(|_| "warn".into()),
    )
    .args(["run", "--bootstrap-servers", &tansu.bootstrap(), "--matrix"])
    .arg(matrix)
    .args(["--stage", "escalate", "--guarantee", "at-least-once"])
    .args(["--partitions", &partitions.to_string(), "--metrics-addr", addr])
    .args(["--pending-topic", pending_topic, "--group-id", pending_topic])
    .args(["--kafka", "fetch.wait.max.ms=10"]);
    Proc::spawn("escalate", cmd)
}

fn sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// VmRSS and VmHWM of a process, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Loads `k` pending approvals due in a day, reads them back with plain
/// readers (the restore's physical limit: the stage's reader settings, one
/// thread per partition, nothing done with the records), then starts the
/// escalation stage and times it until it holds them all; returns both
/// times and the stage's memory.
fn restore(
    runtime: &tokio::runtime::Runtime,
    tansu: &Tansu,
    matrix: &std::path::Path,
    partitions: i32,
    k: usize,
) -> (f64, f64, (f64, f64)) {
    let topic = "bench.pending.restore";
    create_topics(runtime, &tansu.bootstrap(), &[topic], partitions);
    load_pending(&tansu.bootstrap(), topic, k, Utc::now() + TimeDelta::days(1), "r");
    let mut config = Config::new(tansu.bootstrap(), PathBuf::new());
    config.kafka.0.push(("fetch.wait.max.ms".into(), "10".into()));
    // Each partition read by its own consumer until all k are in: tansu
    // 0.6.0's high watermarks can fall short of what a reader then reads,
    // so the count decides.
    let read = std::sync::atomic::AtomicU64::new(0);
    let read_started = Instant::now();
    std::thread::scope(|scope| {
        for p in 0..partitions {
            let (config, read) = (&config, &read);
            scope.spawn(move || {
                let consumer: BaseConsumer = switchboard::kafka::restore_reader_config(config)
                    .create()
                    .expect("a plain reader");
                let mut assignment = TopicPartitionList::new();
                assignment
                    .add_partition_offset(topic, p, Offset::Beginning)
                    .expect("an assignment");
                consumer.assign(&assignment).expect("assigning");
                let deadline = Instant::now() + Duration::from_secs(900);
                while read.load(Ordering::Relaxed) < k as u64 {
                    assert!(
                        Instant::now() < deadline,
                        "the plain readers read {read:?} of {k}"
                    );
                    if let Some(Ok(_)) = consumer.poll(Duration::from_millis(10)) {
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let read_secs = read_started.elapsed().as_secs_f64();
    let addr = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let process = escalation_process(tansu, matrix, partitions, topic, &addr);
    let deadline = started + Duration::from_secs(900);
    loop {
        let text = scrape(&addr);
        if sum(&text, "switchboard_pending_approvals") >= k as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restored {} of {k}",
            sum(&text, "switchboard_pending_approvals")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rss = memory(process.pid());
    show_log(&process);
    (read_secs, elapsed, rss)
}

/// Loads `t` pending approvals all due at one moment a little after the
/// stage has restored them; returns seconds from that moment until every
/// escalation is durable (counted by the stage once its batch is acknowledged).
fn fire_together(
    runtime: &tokio::runtime::Runtime,
    tansu: &Tansu,
    matrix: &std::path::Path,
    partitions: i32,
    t: usize,
) -> f64 {
    let topic = "bench.pending.timers";
    create_topics(runtime, &tansu.bootstrap(), &[topic], partitions);
    // Far enough ahead for the load and the restore, which are timed above.
    let lead = Duration::from_secs(20 + (t / 10_000) as u64);
    let due = Utc::now() + TimeDelta::from_std(lead).expect("a short lead");
    load_pending(&tansu.bootstrap(), topic, t, due, "f");
    let addr = format!("127.0.0.1:{}", free_port());
    let process = escalation_process(tansu, matrix, partitions, topic, &addr);
    let deadline = Instant::now() + lead + Duration::from_secs(600);
    loop {
        if sum(&scrape(&addr), "switchboard_pending_approvals") >= t as f64 {
            break;
        }
        assert!(
            Utc::now() < due,
            "the {t} approvals were not restored before they fell due; raise the lead"
        );
        assert!(Instant::now() < deadline, "restoring the timers");
        std::thread::sleep(Duration::from_millis(20));
    }
    loop {
        let escalated = sum(&scrape(&addr), "switchboard_escalations_total");
        if escalated >= t as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "escalated {escalated} of {t}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let seconds = (Utc::now() - due).num_milliseconds() as f64 / 1000.0;
    show_log(&process);
    seconds
}

/// The stage's log, when BENCH_STAGE_LOG asked for one.
fn show_log(process: &Proc) {
    if std::env::var_os("BENCH_STAGE_LOG").is_some() {
        eprintln!("--- {} log\n{}", process.name, process.log_text());
    }
}

// -------------------------------------------------------------- table ----

fn print_table(rows: &[Row], args: &Args) {
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU")
        .to_string();
    println!();
    println!(
        "switchboard pipeline benchmark ({}; {} cores; {} partitions; {})",
        cpus,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        args.partitions,
        if args.full { "full size" } else { "smoke size" }
    );
    let width = rows.iter().map(|r| r.what.len()).max().unwrap_or(0).max(38);
    println!(
        "{:<6} {:<width$} {:>10} {:>9}  notes",
        "broker", "measure", "records", "seconds"
    );
    println!("{}", "-".repeat(width + 62));
    for r in rows {
        println!(
            "{:<6} {:<width$} {:>10} {:>9.2}  {}",
            r.broker, r.what, r.records, r.seconds, r.note
        );
    }
}

/// The binary's allocator (see `src/main.rs`): the route stage runs in this
/// process, so its figure is the shipped one only with the same allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
