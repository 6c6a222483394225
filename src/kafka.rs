//! Kafka clients: how switchboard configures librdkafka, and the topics it
//! creates. Stages get their consumers and producers from here, so every
//! client carries the same bootstrap servers and the operator's `--kafka`
//! pass-through properties (TLS, SASL, timeouts).

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;
use crate::matrix::Matrix;
use crate::properties::is_secret;

/// Errors at the Kafka edge, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum KafkaStageError {
    #[error("{context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },
    #[error("{0}")]
    Other(String),
}

impl KafkaStageError {
    /// Wraps a Kafka error with what was being done. librdkafka quotes a
    /// refused property value in its message; for a secret-looking key the
    /// value is left out.
    pub fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> KafkaStageError {
        let context = context.into();
        move |source| match source {
            KafkaError::ClientConfig(_, _, key, _) if is_secret(&key) => KafkaStageError::Other(format!(
                "{context}: librdkafka refuses the value of Kafka property {key} (not shown)"
            )),
            source => KafkaStageError::Kafka { context, source },
        }
    }
}

// Every client switchboard creates is configured by one of the functions
// below, and each applies the operator's pass-through properties
// (`--kafka-config`, `--kafka`: TLS, SASL, timeouts) after switchboard's
// own; the unit tests at the end check that each one carries them.

/// Properties every client shares (the admin client that creates topics
/// uses exactly these). Pass-through properties come last so an operator
/// can override anything switchboard sets.
pub fn base_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap_servers);
    c.set("client.id", "switchboard");
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// A consumer that commits only what switchboard tells it to, and reads
/// only committed records (other stages write in transactions).
///
/// A partition whose pre-fetched queue is over librdkafka's thresholds is
/// fetched again after `fetch.queue.backoff.ms`, one second by default.
/// Some brokers (tansu 0.6.0) answer a fetch with everything a partition
/// holds, whatever its size limits: one answer of 55 MB put two of three
/// partitions over the thresholds, and the third, whose answer had not
/// come, waited out the whole second with the stage idle once it had
/// drained the other two (in the pipeline bench, both the copy loop and
/// the route stage, every run). Ten milliseconds instead: a partition over
/// its thresholds is then only checked again, not fetched, so a stage that
/// is behind pays nothing for the shorter wait.
pub fn consumer_config(config: &Config, group_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap_servers);
    c.set("client.id", "switchboard");
    c.set("group.id", group_id);
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    c.set("auto.offset.reset", "earliest");
    c.set("isolation.level", "read_committed");
    c.set("enable.partition.eof", "false");
    c.set("statistics.interval.ms", "5000");
    c.set("fetch.wait.max.ms", "10");
    c.set("fetch.queue.backoff.ms", "10");
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// A group-less reader for changelogs and directory tables: assigned every
/// partition, reading from the beginning.
pub fn reader_config(config: &Config) -> ClientConfig {
    let mut c = consumer_config(config, "switchboard-reader");
    // Lag of a group-less reader means nothing; stats would only add noise.
    c.set("statistics.interval.ms", "0");
    // Pass-through properties still come last.
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// The reader that restores one changelog partition: a whole partition is
/// read as fast as the broker gives it, so each fetch may carry more of it
/// than a tailing consumer needs (librdkafka's default is 1 MiB per
/// partition per fetch), while the pre-fetched queue, which is resident
/// memory on top of the restored state, stays well under the default 64 MiB.
/// Pass-through properties still come last.
pub fn restore_reader_config(config: &Config) -> ClientConfig {
    let mut c = reader_config(config);
    c.set("max.partition.fetch.bytes", "8388608");
    c.set("fetch.max.bytes", "16777216");
    c.set("queued.max.messages.kbytes", "16384");
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// The escalation stage's group consumer. Co-partitioning: partition p of
/// pending and of decisions go to the same instance only with the range
/// assignor, so that one setting is not the operator's to change.
pub fn escalation_consumer_config(config: &Config, group_id: &str) -> ClientConfig {
    let mut c = consumer_config(config, group_id);
    c.set("partition.assignment.strategy", "range");
    c
}

/// The producer of `switchboard decide`: idempotent, acknowledged by every
/// in-sync replica, with switchboard's partitioner (a decision must land on
/// its pending record's partition), and giving up after 30 s unless the
/// operator sets a delivery timeout.
pub fn decision_producer_config(config: &Config) -> ClientConfig {
    let mut c = producer_config(config, None);
    if config.kafka.get("message.timeout.ms").is_none() && config.kafka.get("delivery.timeout.ms").is_none() {
        c.set("message.timeout.ms", "30000");
    }
    c
}

/// An idempotent producer; `transactional_id` makes it transactional.
pub fn producer_config(config: &Config, transactional_id: Option<&str>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap_servers);
    c.set("client.id", "switchboard");
    c.set("enable.idempotence", "true");
    c.set("acks", "all");
    c.set("linger.ms", "2");
    c.set("batch.num.messages", "10000");
    c.set("queue.buffering.max.messages", "200000");
    c.set("compression.type", "lz4");
    // The Java client's key hashing, so that records keyed by action_id land
    // on the same partition whoever writes them: the escalation stage relies
    // on pending records and decisions being co-partitioned.
    c.set("partitioner", "murmur2_random");
    if let Some(id) = transactional_id {
        c.set("transactional.id", id);
        // Bounds how long a killed instance's open transaction can hold back
        // read_committed readers; a batch commits in milliseconds.
        c.set("transaction.timeout.ms", "10000");
    }
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// Every topic the stages write or read that switchboard owns: the fixed
/// ones of [`crate::topics::Topics`] and one per matrix lane. Directory topics
/// belong to whoever feeds them and are not created.
pub fn owned_topics(config: &Config, matrix: &Matrix) -> BTreeSet<String> {
    let t = &config.topics;
    let mut names: BTreeSet<String> = [
        &t.actions,
        &t.allowed,
        &t.decisions,
        &t.outcomes,
        &t.pending,
        &t.dlq,
    ]
    .into_iter()
    .cloned()
    .collect();
    names.extend(matrix.lanes.iter().map(|l| l.topic.clone()));
    names
}

/// Creates the topics that do not exist yet; `switchboard.pending` is
/// compacted. Existing topics are left as they are.
pub async fn ensure_topics(config: &Config, matrix: &Matrix) -> Result<(), KafkaStageError> {
    let admin: AdminClient<DefaultClientContext> = base_config(config)
        .create()
        .map_err(KafkaStageError::kafka("creating the admin client"))?;
    // Only what is missing is created, so clusters without CreateTopics
    // support (librdkafka's mock cluster) work when topics are made ahead.
    let existing: BTreeSet<String> = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(30))
        .map_err(KafkaStageError::kafka("listing topics"))?
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_string())
        .collect();
    let names: Vec<String> = owned_topics(config, matrix)
        .into_iter()
        .filter(|t| !existing.contains(t))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            let topic = NewTopic::new(
                name,
                config.partitions,
                TopicReplication::Fixed(config.replication_factor),
            );
            if *name == config.topics.pending {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .map_err(KafkaStageError::kafka("creating topics"))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, partitions = config.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaStageError::Other(format!("creating topic {name}: {code}")));
            }
        }
    }
    Ok(())
}

/// How long a consumer's close may take: a LeaveGroup round trip and the
/// revocation it brings, well under a second on a healthy broker.
pub const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Closes a consumer (leaving its group, if it joined one), waiting at
/// most `limit`; returns whether it closed in that time.
///
/// Dropping an rdkafka consumer closes it, and waits for as long as the
/// close takes, which can be forever: for a LeaveGroup answer that does not
/// come, or for an assignment that arrived mid-close to be revoked
/// (librdkafka #4884). A stage stuck there would never exit on SIGTERM,
/// however finished its work. So the drop runs on a thread of its own, and
/// past the limit it is left there: the process is on its way out and takes
/// the thread with it, the broker drops the member at its session timeout,
/// and the offsets of everything done were committed before the close
/// began. Records the close still delivers are dropped uncommitted, for the
/// partitions' next owner to read again.
pub fn close_consumer<C>(consumer: BaseConsumer<C>, limit: Duration) -> bool
where
    C: ConsumerContext + 'static,
    BaseConsumer<C>: Send,
{
    let (closed, done) = std::sync::mpsc::channel();
    let closing = std::thread::Builder::new()
        .name("consumer-close".into())
        .spawn(move || {
            drop(consumer);
            let _ = closed.send(());
        });
    if let Err(error) = closing {
        // The consumer went down with the closure: dropped on this thread.
        tracing::warn!(%error, "no thread to close the consumer on; closed it here");
        return true;
    }
    match done.recv_timeout(limit) {
        Ok(()) => true,
        Err(_) => {
            tracing::error!(
                limit_s = limit.as_secs(),
                "the consumer did not close in time; the broker drops it from its group at the session timeout"
            );
            false
        }
    }
}

/// An input record as a stage reads it, borrowed from wherever it is held.
/// The route stage is done with a batch before it polls the next, so it
/// reads librdkafka's messages where they lie (a copy of every record and
/// its headers was ~2% of the route step's samples); the escalation stage
/// and the tests hold [`InputRecord`] copies.
pub trait Input: Sync {
    fn view(&self) -> RecordView<'_>;
}

/// The parts of an input record a stage reads, and a dead letter carries on.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    headers: ViewHeaders<'a>,
}

#[derive(Debug, Clone, Copy)]
enum ViewHeaders<'a> {
    Copied(&'a [(String, Vec<u8>)]),
    /// The message itself: librdkafka parses headers when asked for them.
    Kafka(&'a rdkafka::message::BorrowedMessage<'a>),
}

impl RecordView<'_> {
    /// The record's headers, copied: only a dead letter carries them on, so
    /// librdkafka parses them only for one.
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        use rdkafka::message::Headers;
        match self.headers {
            ViewHeaders::Copied(headers) => headers.to_vec(),
            ViewHeaders::Kafka(message) => rdkafka::Message::headers(message)
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

impl Input for rdkafka::message::BorrowedMessage<'_> {
    fn view(&self) -> RecordView<'_> {
        use rdkafka::Message;
        RecordView {
            topic: self.topic(),
            partition: self.partition(),
            offset: self.offset(),
            key: self.key(),
            payload: self.payload(),
            headers: ViewHeaders::Kafka(self),
        }
    }
}

impl Input for InputRecord {
    fn view(&self) -> RecordView<'_> {
        RecordView {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            headers: ViewHeaders::Copied(&self.headers),
        }
    }
}

/// One record, copied out of librdkafka so it can outlive the poll and be
/// shared between threads.
#[derive(Debug, Clone)]
pub struct InputRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl InputRecord {
    pub fn copy_of<M: rdkafka::Message>(m: &M) -> InputRecord {
        use rdkafka::message::Headers;
        InputRecord {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::properties::KafkaProperties;

    fn secured() -> Config {
        Config::client(
            "broker:9093",
            KafkaProperties(vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
                ("sasl.username".into(), "switchboard".into()),
                ("sasl.password".into(), "hunter2".into()),
                ("ssl.ca.location".into(), "/etc/kafka/ca.pem".into()),
                // Set by switchboard too: the operator's value wins.
                ("statistics.interval.ms".into(), "60000".into()),
            ]),
        )
    }

    /// Every client switchboard creates, by the function that configures it.
    fn every_client(config: &Config) -> Vec<(&'static str, ClientConfig)> {
        vec![
            ("admin client (topic creation)", base_config(config)),
            ("route consumer", consumer_config(config, "switchboard")),
            (
                "escalation consumer",
                escalation_consumer_config(config, "switchboard.escalate"),
            ),
            ("changelog, directory and inbox readers", reader_config(config)),
            ("pending restore reader", restore_reader_config(config)),
            (
                "transactional producer",
                producer_config(config, Some("switchboard-route-1")),
            ),
            ("at-least-once producer", producer_config(config, None)),
            ("decide producer", decision_producer_config(config)),
        ]
    }

    #[test]
    fn every_client_carries_the_security_settings() {
        let config = secured();
        for (name, client) in every_client(&config) {
            for (key, value) in config.kafka.iter() {
                assert_eq!(client.get(key), Some(value.as_str()), "{name}: {key}");
            }
            assert_eq!(client.get("bootstrap.servers"), Some("broker:9093"), "{name}");
        }
    }

    /// librdkafka is built with TLS (OpenSSL) and SCRAM: every client
    /// accepts the settings of a SASL_SSL cluster. (Creating a client does
    /// not connect; nothing listens on port 9.)
    #[test]
    fn every_client_can_be_created_for_a_sasl_ssl_cluster() {
        use rdkafka::consumer::BaseConsumer;
        use rdkafka::producer::BaseProducer;
        let config = Config::client(
            "127.0.0.1:9",
            KafkaProperties(vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
                ("sasl.username".into(), "switchboard".into()),
                ("sasl.password".into(), "hunter2".into()),
                ("ssl.ca.location".into(), "probe".into()),
                ("ssl.endpoint.identification.algorithm".into(), "https".into()),
            ]),
        );
        let admin: Result<AdminClient<DefaultClientContext>, _> = base_config(&config).create();
        assert!(admin.is_ok(), "admin client: {:?}", admin.err());
        for (name, client) in every_client(&config) {
            let created = if name.contains("producer") {
                client.create::<BaseProducer>().map(drop)
            } else {
                client.create::<BaseConsumer>().map(drop)
            };
            assert!(created.is_ok(), "{name}: {:?}", created.err());
        }
    }

    #[test]
    fn pass_through_overrides_switchboard_defaults_but_not_its_invariants() {
        let mut config = secured();
        config.kafka.push(("client.id".into(), "finance-team".into()));
        config
            .kafka
            .push(("partition.assignment.strategy".into(), "roundrobin".into()));
        config.kafka.push(("message.timeout.ms".into(), "5000".into()));
        for (name, client) in every_client(&config) {
            assert_eq!(client.get("client.id"), Some("finance-team"), "{name}");
        }
        // Co-partitioning needs the range assignor whatever the operator says.
        let escalation = escalation_consumer_config(&config, "g");
        assert_eq!(escalation.get("partition.assignment.strategy"), Some("range"));
        let decide = decision_producer_config(&config);
        assert_eq!(decide.get("message.timeout.ms"), Some("5000"));
        assert_eq!(decide.get("partitioner"), Some("murmur2_random"));
        assert_eq!(
            decision_producer_config(&secured()).get("message.timeout.ms"),
            Some("30000")
        );
        assert_eq!(
            reader_config(&config).get("isolation.level"),
            Some("read_committed")
        );
        assert_eq!(reader_config(&config).get("enable.auto.commit"), Some("false"));
    }

    #[test]
    fn debug_of_a_config_hides_the_password() {
        let shown = format!("{:?}", secured());
        assert!(shown.contains("SASL_SSL"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn a_refused_secret_value_is_not_quoted() {
        let error = KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"hunter2\" for configuration property \"sasl.password\"".into(),
            "sasl.password".into(),
            "hunter2".into(),
        );
        let message = KafkaStageError::kafka("creating a reader")(error).to_string();
        assert!(message.contains("sasl.password"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}
