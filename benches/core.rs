//! Decode + enrich + route + packet build for one realistic ~1 KB JSON action
//! through the default matrix: the per-event cost of the pure core, which
//! must stay small next to Kafka I/O (target: at most 3 µs per event).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchboard::clock::SystemClock;
use switchboard::config::Config;
use switchboard::decode::Decoder;
use switchboard::enrich::{Directory, enrich};
use switchboard::http::Health;
use switchboard::kafka::InputRecord;
use switchboard::matrix::Matrix;
use switchboard::metrics::Metrics;
use switchboard::packet::{self, PacketInput};
use switchboard::reload::MatrixHandle;
use switchboard::route::route;
use switchboard::stage::route::RouteStage;

fn core(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let matrix = Matrix::load(&root.join("deploy/matrix.yaml")).expect("default matrix loads");
    let event = std::fs::read(root.join("benches/data/action-1k.json")).expect("bench event exists");
    let decoder = Decoder::bundled();
    let directory = Directory::default();
    directory.upsert(
        "accounts",
        "acct-4471",
        [("name", "Initech GmbH"), ("tier", "enterprise"), ("lead", "lena")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );

    let mut group = c.benchmark_group("core");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode", |b| {
        b.iter(|| decoder.decode(black_box(&event)).map(|a| a.kind.len()))
    });
    group.bench_function("decode_route_packet", |b| {
        b.iter(|| {
            let action = decoder.decode(black_box(&event)).expect("bench event is valid");
            let enrichment = enrich(&matrix, &action, &directory);
            let routing = route(&matrix, &action, &enrichment);
            let input = PacketInput {
                matrix: &matrix,
                action: &action,
                enrichment: &enrichment,
                routing: &routing,
                decisions_topic: "approvals.decisions",
                routed_at: Utc::now(),
            };
            let packets: Vec<_> = routing
                .lanes
                .iter()
                .map(|hit| packet::for_lane(&input, hit))
                .collect();
            black_box(&packets);
        })
    });
    group.bench_function("decode_route_packet_serialize", |b| {
        b.iter(|| {
            let action = decoder.decode(black_box(&event)).expect("bench event is valid");
            let enrichment = enrich(&matrix, &action, &directory);
            let routing = route(&matrix, &action, &enrichment);
            let input = PacketInput {
                matrix: &matrix,
                action: &action,
                enrichment: &enrichment,
                routing: &routing,
                decisions_topic: "approvals.decisions",
                routed_at: Utc::now(),
            };
            let bytes: Vec<Vec<u8>> = routing
                .lanes
                .iter()
                .map(|hit| serde_json::to_vec(&packet::for_lane(&input, hit)).expect("packets serialize"))
                .collect();
            black_box(bytes)
        })
    });
    // The route stage's whole per-record work: the above, plus the pending
    // record and every output, as `RouteStage::handle` does it.
    let config = Config::new("unused:9092", root.join("deploy/matrix.yaml"));
    let stage = RouteStage {
        matrix: MatrixHandle::load(&config.matrix_path, Metrics::new()).expect("default matrix loads"),
        config: Arc::new(config),
        decoder: Decoder::bundled(),
        directory: Arc::new(directory),
        seen: Arc::default(),
        metrics: Metrics::new(),
        health: Health::new(),
        clock: Arc::new(SystemClock),
    };
    let record = InputRecord {
        topic: "agent.actions".into(),
        partition: 0,
        offset: 0,
        key: Some(b"bench".to_vec()),
        payload: Some(event.clone()),
        headers: Vec::new(),
    };
    let current = stage.matrix.current();
    group.bench_function("route_stage_handle", |b| {
        b.iter(|| black_box(stage.handle(black_box(&record), &current, Utc::now())))
    });
    group.finish();
}

criterion_group!(benches, core);
criterion_main!(benches);

/// The binary's allocator (see `src/main.rs`), so the figure is the shipped one.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
