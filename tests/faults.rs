//! Broker faults on librdkafka's mock cluster, exactly once: request errors
//! injected into the route stage's transactions, and the broker taken
//! down and brought back while actions wait. The stage aborts, backs off
//! and retries, reports itself unready meanwhile, and in the end every
//! record is in exactly one destination set, seen exactly once by a
//! read_committed reader.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use switchboard::config::Guarantee;
use switchboard::metrics::Metrics;

#[test]
fn injected_errors_and_a_broker_outage_lose_and_double_nothing() {
    let kafka = MockKafka::new();
    let matrix = default_matrix();
    let mut config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::ExactlyOnce);
    let addr = format!("127.0.0.1:{}", free_port());
    config.metrics_addr = Some(addr.clone());
    kafka.create_topics(&config, &matrix);
    let metrics = Metrics::new();
    let consumed = || {
        metrics
            .events_consumed_total
            .with_label_values(&[config.topics.actions.as_str()])
            .get() as usize
    };
    let stage = StageThread::start(config.clone(), metrics.clone());
    let mut sent = valid_cases("before", 30);
    send_cases(&kafka.bootstrap(), &config.topics.actions, &sent);
    wait_for(deadline(60), "the first wave routed", || consumed() == sent.len());

    // Watch readiness from the side while the faults last.
    let unready_seen = Arc::new(AtomicBool::new(false));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (seen, watching, addr) = (unready_seen.clone(), watching.clone(), addr.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                if http_get(&addr, "/readyz").is_some_and(|(status, _)| status == 503) {
                    seen.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // The transaction's AddPartitionsToTxn requests fail: once with an
    // error librdkafka retries by itself, then with one that makes the
    // transaction abortable. (Only the stage's transactional producer sends
    // these; the test's own producer is not disturbed.)
    kafka.cluster().request_errors(
        RDKafkaApiKey::AddPartitionsToTxn,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        ],
    );
    let wave = valid_cases("errors", 30);
    send_cases(&kafka.bootstrap(), &config.topics.actions, &wave);
    sent.extend(wave);
    wait_for(deadline(60), "the second wave routed despite the errors", || {
        consumed() == sent.len()
    });
    assert!(
        metrics.transactions_total.with_label_values(&["abort"]).get() >= 1,
        "the failed transaction was aborted and done again"
    );

    // The broker goes away with actions waiting, and comes back.
    let wave = valid_cases("outage", 30);
    send_cases(&kafka.bootstrap(), &config.topics.actions, &wave);
    sent.extend(wave);
    kafka.cluster().broker_down(1).expect("the broker goes down");
    wait_for(deadline(30), "the stage to notice the outage", || {
        metrics.kafka_errors_total.with_label_values(&["consume"]).get() > 0
            || metrics.transactions_total.with_label_values(&["abort"]).get() > 1
            || unready_seen.load(Ordering::Relaxed)
    });
    kafka.cluster().broker_up(1).expect("the broker comes back");
    wait_for(deadline(90), "everything routed after the outage", || {
        consumed() == sent.len()
    });
    watching.store(false, Ordering::Relaxed);
    watcher.join().expect("the watcher");
    stage.stop(Duration::from_secs(30));
    assert!(
        unready_seen.load(Ordering::Relaxed),
        "/readyz reported the stage unready while it retried"
    );

    check_sent(&config, &matrix, &sent);
}

/// A stage's consumer leaves its group when the stage stops, and the close
/// waits for the broker's answer. When the answer does not come (here every
/// response is held back a minute), the close is given up at its limit so
/// the process can exit; when it comes, the close completes.
#[test]
fn a_consumer_close_the_broker_does_not_answer_is_given_up_at_its_limit() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use switchboard::kafka::{close_consumer, consumer_config};
    use switchboard::stage::StageContext;

    let kafka = MockKafka::new();
    let config = route_config(&kafka.bootstrap(), &default_matrix_path(), Guarantee::AtLeastOnce);
    kafka.create_topic(&config.topics.actions, 3);
    let joined = |group: &str| -> BaseConsumer<StageContext> {
        let consumer: BaseConsumer<StageContext> = consumer_config(&config, group)
            .create_with_context(StageContext::new(Metrics::new()))
            .expect("a consumer");
        consumer
            .subscribe(&[config.topics.actions.as_str()])
            .expect("subscribed");
        let limit = deadline(30);
        while !consumer.context().assigned.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < limit, "no assignment within 30 s");
            consumer.poll(Duration::from_millis(50));
        }
        consumer
    };

    assert!(
        close_consumer(joined("answered"), Duration::from_secs(10)),
        "a close the broker answers completes"
    );

    let stuck = joined("unanswered");
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::from_secs(60))
        .expect("delaying the broker");
    assert!(
        !close_consumer(stuck, Duration::from_secs(1)),
        "a close waiting on the broker's answer is reported as not done"
    );
}
