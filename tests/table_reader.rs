//! Table readers (`src/changelog.rs`) on the mock cluster: a catch-up asked
//! for while records keep coming returns only once everything the topic
//! held at that moment has been applied. The route stage asks for one at
//! every assignment, so that the seen index holds every action the
//! partitions' last owner routed before a record of theirs is routed here.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use switchboard::changelog::TableReader;
use switchboard::config::Config;

const TOPIC: &str = "table";
const LIMIT: Duration = Duration::from_secs(30);

/// Holds a reader's thread at its next record while closed: a reader
/// behind the topic, as one is under load, without a sleep.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let closed = self.closed.lock().unwrap();
        drop(self.opened.wait_while(closed, |closed| *closed).unwrap());
    }
}

/// A mock cluster with `TOPIC` (3 partitions) and a reader of it that
/// keeps the keys it has applied, each once through the gate.
struct Table {
    kafka: MockKafka,
    reader: TableReader,
    keys: Arc<Mutex<HashSet<Vec<u8>>>>,
    gate: Arc<Gate>,
}

impl Table {
    fn new() -> Table {
        let kafka = MockKafka::new();
        kafka.create_topic(TOPIC, 3);
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Gate::default());
        let keys: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
        let (applied, passing) = (keys.clone(), gate.clone());
        let config = Config::new(kafka.bootstrap(), PathBuf::new());
        let reader = TableReader::spawn(
            &config,
            "table",
            vec![TOPIC.to_string()],
            Box::new(move |_, key, _| {
                passing.pass();
                applied.lock().unwrap().insert(key.to_vec());
            }),
            stop.clone(),
        )
        .expect("the reader starts");
        assert!(reader.wait_caught_up(&stop, LIMIT), "the empty table is read");
        Table {
            kafka,
            reader,
            keys,
            gate,
        }
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("action-{i:05}").into_bytes()
}

#[test]
fn a_catch_up_returns_once_everything_written_before_it_is_applied() {
    let table = Table::new();
    let catch_up = table.reader.catch_up();
    for round in 0..3 {
        // The reader falls behind by everything written in the round.
        table.gate.set(true);
        let producer = Producer::new(&table.kafka.bootstrap());
        for i in round * 2_000..(round + 1) * 2_000 {
            producer.send(TOPIC, None, Some(&key(i)), Some(b"{}"));
        }
        producer.flush();
        table.gate.set(false);
        // No wait of the test's own: the catch-up is the wait.
        assert!(catch_up.now(LIMIT), "round {round}: caught up within {LIMIT:?}");
        let keys = table.keys.lock().unwrap();
        let missing = (0..(round + 1) * 2_000)
            .filter(|i| !keys.contains(&key(*i)))
            .count();
        assert_eq!(
            missing, 0,
            "round {round}: keys written before the catch-up but not applied"
        );
    }
}

/// A changelog written in transactions, as the exactly-once stages write
/// it, read committed. On a real broker each transaction ends in a commit
/// marker that no record reaches, which is why the catch-up compares the
/// reader's positions, not its records' offsets, with the ends; the mock
/// cluster writes no markers (README, *Faults*), and tansu 0.6.0 refuses
/// librdkafka's transactions, so what this checks here is a catch-up over
/// a transactional writer's committed records.
#[test]
fn a_catch_up_reads_a_transactional_writers_committed_records() {
    let table = Table::new();
    table.gate.set(true);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", table.kafka.bootstrap())
        .set("transactional.id", "table-writer")
        .create()
        .expect("a transactional producer");
    producer.init_transactions(LIMIT).expect("transactions");
    for batch in 0..3 {
        producer.begin_transaction().expect("a transaction");
        for i in batch * 100..(batch + 1) * 100 {
            let k = key(i);
            producer
                .send(BaseRecord::<[u8], [u8]>::to(TOPIC).key(&k).payload(b"{}"))
                .expect("enqueued");
        }
        producer.commit_transaction(LIMIT).expect("committed");
    }
    table.gate.set(false);
    assert!(
        table.reader.catch_up().now(LIMIT),
        "not caught up within {LIMIT:?}"
    );
    assert_eq!(table.keys.lock().unwrap().len(), 300);
}
