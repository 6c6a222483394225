//! Both stages on librdkafka's mock cluster for the escalation tests: a
//! one-broker cluster with every topic the matrix needs (two partitions),
//! a producer partitioning like switchboard's own (decisions must land
//! beside their pending record), and readers of whole topics.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use serde_json::{Value, json};
use switchboard::changelog::{ReadRecord, read_all};
use switchboard::config::{Config, Stage};
use switchboard::matrix::Matrix;

/// The time every test action occurs and every test decision is made.
pub const T0: &str = "2026-03-01T10:00:00Z";

pub struct EscalationBroker {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub config: Config,
    producer: BaseProducer,
}

impl EscalationBroker {
    pub fn new(matrix_path: &Path) -> EscalationBroker {
        switchboard::cli::init_logging(switchboard::cli::LogFormat::Text);
        let cluster = MockCluster::new(1).expect("mock cluster starts");
        let mut config = Config::new(cluster.bootstrap_servers(), matrix_path);
        config.stage = Stage::All;
        config.partitions = 2;
        config.batch_wait = Duration::from_millis(1);
        // The mock cluster holds a restarted member's partitions until the old
        // member's session times out; keep that short.
        config.kafka.push(("session.timeout.ms".into(), "6000".into()));
        config.kafka.push(("heartbeat.interval.ms".into(), "500".into()));
        let matrix = Matrix::load(matrix_path).expect("test matrix loads");
        for topic in switchboard::kafka::owned_topics(&config, &matrix)
            .iter()
            .chain(["directory.accounts".to_string()].iter())
        {
            cluster
                .create_topic(topic, config.partitions, 1)
                .expect("topic created");
        }
        // The same partitioner as switchboard's producers, as DESIGN requires
        // of decision writers: decisions must land with their pending record.
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("partitioner", "murmur2_random")
            .create()
            .expect("producer");
        EscalationBroker {
            cluster,
            config,
            producer,
        }
    }

    /// Writes one record and waits until the broker has it.
    pub fn send_bytes(&self, topic: &str, key: &str, bytes: &[u8]) {
        self.producer
            .send(BaseRecord::to(topic).key(key).payload(bytes))
            .map_err(|(e, _)| e)
            .expect("enqueued");
        self.producer.flush(Duration::from_secs(10)).expect("flushed");
    }

    pub fn send(&self, topic: &str, key: &str, value: &Value) {
        self.send_bytes(topic, key, value.to_string().as_bytes());
    }

    /// An action occurring at [`T0`], with `fields` added.
    pub fn action(&self, id: &str, fields: Value) {
        let mut event = json!({
            "action_id": id, "occurred_at": T0, "agent_id": "agent-1", "summary": id,
        });
        for (k, v) in fields.as_object().expect("fields are an object") {
            event[k] = v.clone();
        }
        self.send("agent.actions", id, &event);
    }

    /// Sends `decision` as JSON; returns its bytes.
    pub fn decide_json(&self, id: &str, decision: Value) -> Vec<u8> {
        let bytes = decision.to_string().into_bytes();
        self.send_bytes("approvals.decisions", id, &bytes);
        bytes
    }

    pub fn decide(&self, id: &str, lane: &str, verdict: &str, approver: &str) -> Vec<u8> {
        self.decide_json(
            id,
            json!({"action_id": id, "lane": lane, "verdict": verdict, "approver": approver, "decided_at": T0}),
        )
    }

    pub fn read(&self, topic: &str) -> Vec<ReadRecord> {
        read_all(&self.config, &[topic], Duration::from_secs(10)).expect("topic readable")
    }

    /// Values on `topic` for `key`, parsed.
    pub fn values(&self, topic: &str, key: &str) -> Vec<Value> {
        self.read(topic)
            .into_iter()
            .filter(|r| r.key.as_deref() == Some(key.as_bytes()))
            .filter_map(|r| serde_json::from_slice(r.payload.as_deref()?).ok())
            .collect()
    }

    /// Waits (polling, with a deadline) until `check` holds.
    pub fn wait_for(&self, what: &str, mut check: impl FnMut(&EscalationBroker) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The newest outcome of `id`.
    pub fn outcome(&self, id: &str) -> Option<Value> {
        self.values("approvals.outcomes", id).pop()
    }
}
