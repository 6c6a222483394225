//! The one place switchboard's Prometheus metrics are defined.
//!
//! Names and labels are part of the contract (DESIGN.md, "Metrics"): every
//! metric has the prefix `switchboard_`, durations are in seconds and
//! counters end in `_total`. Stages never create metrics of their own; they
//! get a [`Metrics`] (cheap to clone) and update its fields, for example
//! `metrics.events_consumed_total.with_label_values(&[topic]).inc()`.
//!
//! Each [`Metrics`] owns its own [`Registry`] rather than using prometheus's
//! global default one, so tests (and benches) can build as many as they like
//! without name clashes.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The kinds of `kafka_errors_total`: an error a client reported
/// (`client`), a failed poll (`consume`), an offset commit the broker
/// refused (`commit`), and a seen index that could not read the changelog
/// to its end at an assignment (`catch_up`).
pub const KAFKA_ERROR_KINDS: [&str; 4] = ["client", "consume", "commit", "catch_up"];

/// Prefix of every metric name.
pub const NAMESPACE: &str = "switchboard";

/// `route_duration_seconds`: routing is pure CPU work measured in
/// microseconds, so buckets run from 1 µs to 100 ms in 1-2.5-5 steps.
const ROUTE_BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
];

/// `end_to_end_latency_seconds`: event time to packet durable, 1 ms .. 60 s.
const END_TO_END_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// `seen_catch_up_seconds`: an assignment's wait for the seen index, from
/// a millisecond (caught up already) to the 30 s it waits at most.
const CATCH_UP_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// `decision_latency_seconds`: humans decide in seconds to a day, 1 s .. 24 h.
const DECISION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
    43200.0, 86400.0,
];

/// Every switchboard metric, registered in a registry of its own.
///
/// Cloning is cheap: the registry and every metric handle are `Arc`-backed,
/// so clones update and export the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Serialises [`Metrics::set_matrix_version`] so two concurrent reloads
    /// cannot leave two `matrix_info` series behind.
    matrix_version_lock: Arc<Mutex<()>>,

    /// `switchboard_events_consumed_total{topic}`: records read per input
    /// topic; the denominator for every other rate and the first thing to
    /// check when nothing seems to happen.
    pub events_consumed_total: IntCounterVec,
    /// `switchboard_events_routed_total{lane,rule}`: actions sent to a lane
    /// for review, by the rule that sent them, so policy owners can see which
    /// rules generate the review load.
    pub events_routed_total: IntCounterVec,
    /// `switchboard_events_allowed_total`: actions the matrix let through
    /// without review; with `events_routed_total` it gives the review ratio.
    pub events_allowed_total: IntCounter,
    /// `switchboard_dead_letters_total{reason}`: records written to the DLQ,
    /// by short fixed reason; any sustained rate needs a human.
    pub dead_letters_total: IntCounterVec,
    /// `switchboard_duplicates_total`: redelivered actions recognised and not
    /// routed again; a spike means a producer or a rebalance is replaying.
    pub duplicates_total: IntCounter,
    /// `switchboard_route_duration_seconds`: time spent in the pure routing
    /// core per action; catches a matrix that became expensive to evaluate.
    pub route_duration_seconds: Histogram,
    /// `switchboard_seen_catch_up_seconds`: how long each assignment of
    /// `agent.actions` partitions waited for the seen index to read the
    /// changelog to its end before routing them; long waits mean the index's
    /// tail runs far behind, and handovers stall for it.
    pub seen_catch_up_seconds: Histogram,
    /// `switchboard_end_to_end_latency_seconds`: event time to approval
    /// packet durable; what an agent waiting on a lane actually experiences
    /// before a human can even see the request.
    pub end_to_end_latency_seconds: Histogram,
    /// `switchboard_pending_approvals{lane}`: approvals awaiting a verdict
    /// per lane; the backlog each team of approvers faces.
    pub pending_approvals: IntGaugeVec,
    /// `switchboard_escalations_total{from,to}`: approvals moved along an
    /// escalation chain, from one lane to the next.
    pub escalations_total: IntCounterVec,
    /// `switchboard_sla_breaches_total{lane}`: approvals whose SLA expired
    /// before a verdict; the lane is under-staffed or the SLA is wrong.
    pub sla_breaches_total: IntCounterVec,
    /// `switchboard_reminders_total{lane}`: reminders sent to approvers who
    /// have not yet decided.
    pub reminders_total: IntCounterVec,
    /// `switchboard_decisions_total{lane,verdict}`: verdicts accepted per
    /// lane and verdict (approve, reject, ...).
    pub decisions_total: IntCounterVec,
    /// `switchboard_decision_latency_seconds{lane}`: packet written to
    /// verdict accepted; how long humans take per lane.
    pub decision_latency_seconds: HistogramVec,
    /// `switchboard_decisions_rejected_total{reason}`: decision records
    /// refused (unknown action, wrong lane, late, malformed, ...); non-zero
    /// means an approver tool or a person is doing something wrong.
    pub decisions_rejected_total: IntCounterVec,
    /// `switchboard_matrix_reloads_total{result}`: matrix hot reloads, with
    /// `result` = `"ok"` or `"error"`; an error keeps the previous matrix.
    pub matrix_reloads_total: IntCounterVec,
    /// `switchboard_matrix_info{version}`: always 1 for the live matrix
    /// version only; set it with [`Metrics::set_matrix_version`].
    pub matrix_info: IntGaugeVec,
    /// `switchboard_consumer_lag{topic,partition}`: records behind the high
    /// watermark per partition; set it with [`Metrics::set_consumer_lag`].
    pub consumer_lag: IntGaugeVec,
    /// `switchboard_assigned_partitions{topic}`: partitions of each input
    /// topic this instance holds; an instance at 0 after a rebalance serves
    /// nothing, and the sum over a group shows every partition owned.
    pub assigned_partitions: IntGaugeVec,
    /// `switchboard_transactions_total{result}`: Kafka transactions by
    /// `result` = `"commit"` or `"abort"`; aborts mean redelivery work.
    pub transactions_total: IntCounterVec,
    /// `switchboard_kafka_errors_total{kind}`: errors reported by the Kafka
    /// clients, by one of [`KAFKA_ERROR_KINDS`], so SREs can tell broker
    /// trouble from ours.
    pub kafka_errors_total: IntCounterVec,
}

impl Metrics {
    /// Builds every metric and registers it in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        Metrics {
            events_consumed_total: register(
                r,
                counter_vec(
                    "events_consumed_total",
                    "Records consumed, by input topic.",
                    &["topic"],
                ),
            ),
            events_routed_total: register(
                r,
                counter_vec(
                    "events_routed_total",
                    "Actions routed to a lane for review, by lane and rule.",
                    &["lane", "rule"],
                ),
            ),
            events_allowed_total: register(
                r,
                counter("events_allowed_total", "Actions allowed without review."),
            ),
            dead_letters_total: register(
                r,
                counter_vec(
                    "dead_letters_total",
                    "Records written to the dead-letter topic, by reason.",
                    &["reason"],
                ),
            ),
            duplicates_total: register(
                r,
                counter(
                    "duplicates_total",
                    "Redelivered actions recognised and not routed again.",
                ),
            ),
            route_duration_seconds: register(
                r,
                histogram(
                    "route_duration_seconds",
                    "Time spent routing one action, in seconds.",
                    ROUTE_BUCKETS,
                ),
            ),
            seen_catch_up_seconds: register(
                r,
                histogram(
                    "seen_catch_up_seconds",
                    "Time an assignment waited for the seen index to reach the changelog's end, in seconds.",
                    CATCH_UP_BUCKETS,
                ),
            ),
            end_to_end_latency_seconds: register(
                r,
                histogram(
                    "end_to_end_latency_seconds",
                    "Event time to approval packet durable, in seconds.",
                    END_TO_END_BUCKETS,
                ),
            ),
            pending_approvals: register(
                r,
                gauge_vec(
                    "pending_approvals",
                    "Approvals awaiting a verdict, by lane.",
                    &["lane"],
                ),
            ),
            escalations_total: register(
                r,
                counter_vec(
                    "escalations_total",
                    "Approvals escalated from one lane to another.",
                    &["from", "to"],
                ),
            ),
            sla_breaches_total: register(
                r,
                counter_vec(
                    "sla_breaches_total",
                    "Approvals whose SLA expired before a verdict, by lane.",
                    &["lane"],
                ),
            ),
            reminders_total: register(
                r,
                counter_vec(
                    "reminders_total",
                    "Reminders sent to approvers, by lane.",
                    &["lane"],
                ),
            ),
            decisions_total: register(
                r,
                counter_vec(
                    "decisions_total",
                    "Verdicts accepted, by lane and verdict.",
                    &["lane", "verdict"],
                ),
            ),
            decision_latency_seconds: register(
                r,
                histogram_vec(
                    "decision_latency_seconds",
                    "Approval packet written to verdict accepted, in seconds, by lane.",
                    &["lane"],
                    DECISION_BUCKETS,
                ),
            ),
            decisions_rejected_total: register(
                r,
                counter_vec(
                    "decisions_rejected_total",
                    "Decision records refused, by reason.",
                    &["reason"],
                ),
            ),
            matrix_reloads_total: register(
                r,
                counter_vec(
                    "matrix_reloads_total",
                    "Matrix reloads, by result (ok or error).",
                    &["result"],
                ),
            ),
            matrix_info: register(
                r,
                gauge_vec(
                    "matrix_info",
                    "Always 1, labelled with the live matrix version.",
                    &["version"],
                ),
            ),
            consumer_lag: register(
                r,
                gauge_vec(
                    "consumer_lag",
                    "Records behind the high watermark, by topic and partition.",
                    &["topic", "partition"],
                ),
            ),
            assigned_partitions: register(
                r,
                gauge_vec(
                    "assigned_partitions",
                    "Partitions of each input topic this instance is assigned.",
                    &["topic"],
                ),
            ),
            transactions_total: register(
                r,
                counter_vec(
                    "transactions_total",
                    "Kafka transactions, by result (commit or abort).",
                    &["result"],
                ),
            ),
            kafka_errors_total: register(
                r,
                counter_vec(
                    "kafka_errors_total",
                    "Errors reported by the Kafka client, by kind.",
                    &["kind"],
                ),
            ),
            matrix_version_lock: Arc::new(Mutex::new(())),
            registry,
        }
    }

    /// Exports `switchboard_matrix_info{version}` = 1 for `version` only,
    /// dropping the series of any previous version.
    pub fn set_matrix_version(&self, version: &str) {
        let _guard = self
            .matrix_version_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.matrix_info.reset();
        self.matrix_info.with_label_values(&[version]).set(1);
    }

    /// Creates every series whose labels are known in advance at zero, so
    /// `rate()` and `increase()` see the first event and dashboards show
    /// each lane before it has traffic. Creating a series never changes one
    /// that exists.
    pub fn prepare(&self, matrix: &crate::matrix::Matrix) {
        for result in ["ok", "error"] {
            self.matrix_reloads_total.with_label_values(&[result]);
        }
        for result in ["commit", "abort"] {
            self.transactions_total.with_label_values(&[result]);
        }
        for kind in KAFKA_ERROR_KINDS {
            self.kafka_errors_total.with_label_values(&[kind]);
        }
        for reason in crate::decode::DEAD_LETTER_REASONS {
            self.dead_letters_total.with_label_values(&[reason]);
        }
        for refusal in crate::escalation::Refusal::ALL {
            self.decisions_rejected_total
                .with_label_values(&[refusal.reason()]);
        }
        for lane in &matrix.lanes {
            let name = lane.name.as_str();
            self.pending_approvals.with_label_values(&[name]);
            self.sla_breaches_total.with_label_values(&[name]);
            self.reminders_total.with_label_values(&[name]);
            for verdict in ["approve", "reject", "needs_context"] {
                self.decisions_total.with_label_values(&[name, verdict]);
            }
        }
        for rule in &matrix.rules {
            let lane = matrix.lanes[rule.lane].name.as_str();
            self.events_routed_total
                .with_label_values(&[lane, rule.name.as_str()]);
        }
    }

    /// Forgets the lag of partitions this instance no longer holds, so a
    /// sum over instances counts each partition once.
    pub fn forget_consumer_lag(&self, topic: &str, partition: i32) {
        let partition = partition.to_string();
        let _ = self
            .consumer_lag
            .remove_label_values(&[topic, partition.as_str()]);
    }

    /// Sets `switchboard_consumer_lag{topic,partition}` to `lag` records.
    pub fn set_consumer_lag(&self, topic: &str, partition: i32, lag: i64) {
        let partition = partition.to_string();
        self.consumer_lag
            .with_label_values(&[topic, partition.as_str()])
            .set(lag);
    }

    /// The registry the metrics live in, for collectors defined elsewhere
    /// (none today) and for tests.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every metric in the Prometheus text exposition format (version
    /// 0.0.4, content type [`prometheus::TEXT_FORMAT`]).
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut buf = String::new();
        if let Err(err) = TextEncoder::new().encode_utf8(&families, &mut buf) {
            // Cannot happen for the metrics above (valid names, gathered
            // families are never empty); keep what was encoded and say so.
            tracing::error!(error = %err, "encoding metrics failed");
        }
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

// Constructors for the fixed definitions above. They only fail on an invalid
// metric or label name or bucket list, all of which are literals in this
// file and checked by the unit tests, and registration only fails on a
// duplicate name, which a fresh registry cannot hold.

const STATIC_DEFINITION: &str = "metric definitions are static literals with valid names, labels and buckets";

fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("each metric name is registered once in a fresh registry");
    collector
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::with_opts(opts(name, help)).expect(STATIC_DEFINITION)
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(opts(name, help), labels).expect(STATIC_DEFINITION)
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(opts(name, help), labels).expect(STATIC_DEFINITION)
}

fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets.to_vec())
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(histogram_opts(name, help, buckets)).expect(STATIC_DEFINITION)
}

fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(histogram_opts(name, help, buckets), labels).expect(STATIC_DEFINITION)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name DESIGN.md promises, plus the SRE extras.
    const NAMES: &[&str] = &[
        "switchboard_events_consumed_total",
        "switchboard_events_routed_total",
        "switchboard_events_allowed_total",
        "switchboard_dead_letters_total",
        "switchboard_duplicates_total",
        "switchboard_route_duration_seconds",
        "switchboard_end_to_end_latency_seconds",
        "switchboard_seen_catch_up_seconds",
        "switchboard_pending_approvals",
        "switchboard_escalations_total",
        "switchboard_sla_breaches_total",
        "switchboard_reminders_total",
        "switchboard_decisions_total",
        "switchboard_decision_latency_seconds",
        "switchboard_decisions_rejected_total",
        "switchboard_matrix_reloads_total",
        "switchboard_matrix_info",
        "switchboard_consumer_lag",
        "switchboard_assigned_partitions",
        "switchboard_transactions_total",
        "switchboard_kafka_errors_total",
    ];

    fn touch_all(m: &Metrics) {
        m.events_consumed_total
            .with_label_values(&["agent.actions"])
            .inc();
        m.events_routed_total
            .with_label_values(&["finance", "large-payment"])
            .inc();
        m.events_allowed_total.inc();
        m.dead_letters_total.with_label_values(&["decode"]).inc();
        m.duplicates_total.inc();
        m.route_duration_seconds.observe(3e-6);
        m.end_to_end_latency_seconds.observe(0.02);
        m.seen_catch_up_seconds.observe(0.003);
        m.pending_approvals.with_label_values(&["finance"]).set(2);
        m.escalations_total
            .with_label_values(&["team-lead", "director"])
            .inc();
        m.sla_breaches_total.with_label_values(&["finance"]).inc();
        m.reminders_total.with_label_values(&["finance"]).inc();
        m.decisions_total.with_label_values(&["finance", "approve"]).inc();
        m.decision_latency_seconds
            .with_label_values(&["finance"])
            .observe(42.0);
        m.decisions_rejected_total
            .with_label_values(&["unknown_action"])
            .inc();
        m.matrix_reloads_total.with_label_values(&["ok"]).inc();
        m.set_matrix_version("v1");
        m.set_consumer_lag("agent.actions", 3, 17);
        m.assigned_partitions.with_label_values(&["agent.actions"]).set(3);
        m.transactions_total.with_label_values(&["commit"]).inc();
        m.kafka_errors_total.with_label_values(&["consume"]).inc();
    }

    #[test]
    fn every_metric_is_rendered_once_touched() {
        let m = Metrics::new();
        touch_all(&m);
        let text = m.render();
        for name in NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
        // Exactly the families above, nothing else.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(types, NAMES.len(), "unexpected families in:\n{text}");
        assert!(text.contains("switchboard_consumer_lag{partition=\"3\",topic=\"agent.actions\"} 17"));
        assert!(text.contains("switchboard_events_routed_total{lane=\"finance\",rule=\"large-payment\"} 1"));
    }

    #[test]
    fn metric_types_match_the_design() {
        let m = Metrics::new();
        touch_all(&m);
        let text = m.render();
        for (name, kind) in [
            ("switchboard_events_allowed_total", "counter"),
            ("switchboard_route_duration_seconds", "histogram"),
            ("switchboard_end_to_end_latency_seconds", "histogram"),
            ("switchboard_decision_latency_seconds", "histogram"),
            ("switchboard_pending_approvals", "gauge"),
            ("switchboard_matrix_info", "gauge"),
            ("switchboard_consumer_lag", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} is not a {kind}"
            );
        }
    }

    #[test]
    fn buckets_cover_the_documented_ranges() {
        for buckets in [
            ROUTE_BUCKETS,
            END_TO_END_BUCKETS,
            CATCH_UP_BUCKETS,
            DECISION_BUCKETS,
        ] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        }
        assert_eq!(ROUTE_BUCKETS.first(), Some(&1e-6));
        assert_eq!(ROUTE_BUCKETS.last(), Some(&0.1));
        assert_eq!(END_TO_END_BUCKETS.first(), Some(&0.001));
        assert_eq!(END_TO_END_BUCKETS.last(), Some(&60.0));
        assert_eq!(DECISION_BUCKETS.first(), Some(&1.0));
        assert_eq!(DECISION_BUCKETS.last(), Some(&86_400.0));
    }

    #[test]
    fn set_matrix_version_keeps_only_the_live_version() {
        let m = Metrics::new();
        m.set_matrix_version("v1");
        m.set_matrix_version("v2");
        m.set_matrix_version("v3");
        let text = m.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("switchboard_matrix_info{"))
            .collect();
        assert_eq!(series, ["switchboard_matrix_info{version=\"v3\"} 1"]);
    }

    #[test]
    fn clones_share_series_and_instances_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.clone().events_allowed_total.inc_by(5);
        assert_eq!(a.events_allowed_total.get(), 5);
        assert_eq!(b.events_allowed_total.get(), 0);
        assert!(a.render().contains("switchboard_events_allowed_total 5\n"));
    }

    #[test]
    fn prepared_series_start_at_zero_and_keep_their_values() {
        let m = Metrics::new();
        m.pending_approvals.with_label_values(&["finance"]).set(4);
        let matrix = crate::matrix::Matrix::parse(include_str!("../deploy/matrix.yaml"), "matrix.yaml")
            .expect("the default matrix loads");
        m.prepare(&matrix);
        let text = m.render();
        for series in [
            "switchboard_matrix_reloads_total{result=\"error\"} 0",
            "switchboard_dead_letters_total{reason=\"bad_json\"} 0",
            "switchboard_decisions_rejected_total{reason=\"not_on_roster\"} 0",
            "switchboard_reminders_total{lane=\"customer\"} 0",
            "switchboard_sla_breaches_total{lane=\"security\"} 0",
            "switchboard_decisions_total{lane=\"manager\",verdict=\"needs_context\"} 0",
            "switchboard_events_routed_total{lane=\"finance\",rule=\"refund-over-threshold\"} 0",
            "switchboard_pending_approvals{lane=\"engineering\"} 0",
            "switchboard_pending_approvals{lane=\"finance\"} 4",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn revoked_partitions_lose_their_lag() {
        let m = Metrics::new();
        m.set_consumer_lag("agent.actions", 0, 5);
        m.set_consumer_lag("agent.actions", 1, 7);
        m.forget_consumer_lag("agent.actions", 0);
        let text = m.render();
        assert!(!text.contains("partition=\"0\""), "{text}");
        assert!(text.contains("switchboard_consumer_lag{partition=\"1\",topic=\"agent.actions\"} 7"));
    }
}
