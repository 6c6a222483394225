//! Held approvals: how the escalation stage keeps a million open approvals
//! in memory.
//!
//! A pending record is about 2 KB of JSON (its level-0 packets are most of
//! it) and about 9 KB once parsed into owned structs, yet the stage reads
//! the packets only when a timer fires, a reminder goes out or a decision
//! arrives. So each approval is held as its changelog bytes, compressed,
//! beside the little the stage needs on every tick without parsing: the
//! revision, the status, and per lane its name (shared with every other
//! approval on that lane), due times and whether it has decided. The full
//! record is parsed again ([`Held::record`]) only when something happens to
//! the approval.
//!
//! `head` reads what every record needs without its packets, `store`
//! compresses the bytes.

mod head;
mod store;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

pub use self::head::{Head, LaneHead};
pub use self::store::Store;
use crate::escalation::{LaneClock, Timer, clock_is_current};
use crate::pending::{OwnedPendingRecord, Status};

#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("pending record is not readable: {0}")]
    Json(#[from] serde_json::Error),
    #[error("held record does not decompress: {0}")]
    Compression(String),
}

/// Held approvals by action id. Ids come from agents, so the hasher is
/// seeded at random; foldhash rather than the standard SipHash because a
/// restore hashes every id of the changelog several times (SipHash and
/// rehashing were a fifth of joining a million restored approvals).
pub type ById<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// The approvals an instance holds, by partition and then by action id. A
/// restored partition joins as the map its restore built, and a revoked
/// one leaves as a whole: merging a million restored approvals into one
/// map took about a second. An id lives in one partition (the changelog is
/// keyed by it), so a lookup without the partition asks each, of which an
/// instance holds a few.
#[derive(Default)]
pub struct Approvals {
    partitions: Vec<(i32, ById<Held>)>,
}

impl Approvals {
    pub fn get(&self, id: &str) -> Option<&Held> {
        self.partitions.iter().find_map(|(_, m)| m.get(id))
    }

    /// The held copy of the id (shared with the approval's timers) and the approval.
    pub fn get_key_value(&self, id: &str) -> Option<(&Arc<str>, &Held)> {
        self.partitions.iter().find_map(|(_, m)| m.get_key_value(id))
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    pub fn remove(&mut self, id: &str) -> Option<Held> {
        self.partitions.iter_mut().find_map(|(_, m)| m.remove(id))
    }

    /// Holds `held` in its partition's map.
    pub fn insert(&mut self, id: Arc<str>, held: Held) {
        let partition = held.partition;
        match self.partitions.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, m)) => {
                m.insert(id, held);
            }
            None => self.partitions.push((partition, ById::from_iter([(id, held)]))),
        }
    }

    /// Adds a restored partition's approvals.
    pub fn join(&mut self, partition: i32, mut restored: ById<Held>) {
        match self.partitions.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, m)) if m.len() >= restored.len() => m.extend(restored),
            Some((_, m)) => {
                restored.extend(std::mem::take(m));
                *m = restored;
            }
            None => self.partitions.push((partition, restored)),
        }
    }

    /// Drops a revoked partition's approvals and returns them.
    pub fn leave(&mut self, partition: i32) -> ById<Held> {
        match self.partitions.iter().position(|(p, _)| *p == partition) {
            Some(i) => self.partitions.swap_remove(i).1,
            None => ById::default(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Held)> {
        self.partitions.iter().flat_map(|(_, m)| m.iter())
    }

    pub fn len(&self) -> usize {
        self.partitions.iter().map(|(_, m)| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One lane of a held approval: what its timers and the per-lane gauge need.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldLane {
    pub lane: Arc<str>,
    pub clock: LaneClock,
}

/// An approval held by the escalation stage.
#[derive(Debug)]
pub struct Held {
    /// The `switchboard.pending` partition it came from.
    pub partition: i32,
    pub revision: u64,
    pub status: Status,
    pub lanes: Box<[HeldLane]>,
    /// The record's JSON, compressed ([`Store::pack`]).
    blob: Box<[u8]>,
}

impl Held {
    /// Holds a changelog record of which `head` was read from `bytes`.
    pub fn from_head(
        store: &Store,
        partition: i32,
        head: &Head<'_>,
        bytes: &[u8],
    ) -> Result<Held, HeldError> {
        let lanes = head.lanes.iter().map(|l| {
            let clock = LaneClock {
                sla_due: l.sla_due,
                remind_at: l.remind_at,
                decided: l.verdict.is_some(),
            };
            (&*l.lane, clock)
        });
        Held::hold(store, partition, head.revision, head.status, lanes, bytes)
    }

    /// Holds `record`, whose changelog JSON is `bytes`.
    pub fn from_record(
        store: &Store,
        partition: i32,
        record: &OwnedPendingRecord,
        bytes: &[u8],
    ) -> Result<Held, HeldError> {
        let lanes = record.lanes.iter().map(|l| (&*l.lane, LaneClock::of(l)));
        Held::hold(store, partition, record.revision, record.status, lanes, bytes)
    }

    /// The one way an approval is held: lane names interned, the bytes
    /// compressed against the dictionary of the first lane's records.
    fn hold<'l>(
        store: &Store,
        partition: i32,
        revision: u64,
        status: Status,
        lanes: impl Iterator<Item = (&'l str, LaneClock)>,
        bytes: &[u8],
    ) -> Result<Held, HeldError> {
        let lanes: Box<[HeldLane]> = lanes
            .map(|(lane, clock)| HeldLane {
                lane: store.intern(lane),
                clock,
            })
            .collect();
        let blob = store.pack(lanes.first().map_or("", |l| &*l.lane), bytes)?;
        Ok(Held {
            partition,
            revision,
            status,
            lanes,
            blob,
        })
    }

    /// The full record, parsed again.
    pub fn record(&self, store: &Store) -> Result<OwnedPendingRecord, HeldError> {
        let bytes = store.unpack(&self.blob)?;
        // One UTF-8 check for the whole record costs less than serde_json's
        // check of each string when reading from bytes.
        match crate::decode::utf8(&bytes) {
            Ok(text) => Ok(serde_json::from_str(text)?),
            Err(_) => Ok(serde_json::from_slice(&bytes)?),
        }
    }

    /// [`crate::escalation::is_current`] without parsing the record.
    pub fn is_current(&self, timer: &Timer, now: DateTime<Utc>) -> bool {
        clock_is_current(
            self.status == Status::Open,
            self.lanes.get(timer.lane).map(|l| l.clock),
            timer,
            now,
        )
    }

    /// The lanes still to decide, when the approval is open.
    pub fn undecided(&self) -> impl Iterator<Item = &Arc<str>> {
        let open = self.status == Status::Open;
        self.lanes
            .iter()
            .filter(move |l| open && !l.clock.decided)
            .map(|l| &l.lane)
    }

    /// Heap bytes owned by this approval alone (shared lane names and
    /// dictionaries not counted), for tests and sizing.
    pub fn heap_bytes(&self) -> usize {
        self.lanes.len() * std::mem::size_of::<HeldLane>() + self.blob.len()
    }
}

#[cfg(test)]
mod tests {
    use super::store::{MAX_DICTIONARIES, NO_DICTIONARY};
    use super::*;
    use crate::escalation::TimerKind;

    fn record_json(id: &str, lane: &str, due: &str, verdict: bool) -> Vec<u8> {
        let verdict = if verdict {
            r#","verdict":{"verdict":"approve","approver":"fran","decided_at":"2026-01-01T00:00:00Z"}"#
        } else {
            ""
        };
        format!(
            r#"{{"action_id":"{id}","status":"open","revision":3,"matrix_version":"sha256:abc",
            "occurred_at":"2026-01-01T00:00:00Z","routed_at":"2026-01-01T00:00:01Z",
            "lanes":[{{"lane":"{lane}","level":0,"role":"r","assignee":"r","roster":["fran"],
            "topic":"approvals.{lane}","sla_due":"{due}","remind_at":"2026-01-01T00:10:00Z"{verdict}}}]}}"#
        )
        .into_bytes()
    }

    #[test]
    fn a_held_record_parses_back_to_what_was_read() {
        let store = Store::default();
        let bytes = record_json("a-1", "finance", "2026-01-01T02:00:00Z", false);
        let head = Head::parse(&bytes).unwrap();
        let held = Held::from_head(&store, 2, &head, &bytes).unwrap();
        let expected: OwnedPendingRecord = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(held.record(&store).unwrap(), expected);
        assert_eq!((held.partition, held.revision, held.status), (2, 3, Status::Open));
        assert_eq!(held.lanes[0].clock, LaneClock::of(&expected.lanes[0]));
        // The same through the parsed record.
        let again = Held::from_record(&store, 2, &expected, &bytes).unwrap();
        assert_eq!(again.record(&store).unwrap(), expected);
        assert_eq!(again.lanes, held.lanes);
    }

    #[test]
    fn approvals_are_found_by_id_across_partitions_and_leave_by_partition() {
        let store = Store::default();
        let held = |id: &str, partition: i32| {
            let bytes = record_json(id, "finance", "2026-01-01T02:00:00Z", false);
            Held::from_head(&store, partition, &Head::parse(&bytes).unwrap(), &bytes).unwrap()
        };
        let mut approvals = Approvals::default();
        approvals.insert(Arc::from("a-1"), held("a-1", 0));
        let mut restored = ById::default();
        restored.insert(Arc::from("a-2"), held("a-2", 1));
        restored.insert(Arc::from("a-3"), held("a-3", 1));
        approvals.join(1, restored);
        // A partition joined where one is already held keeps both.
        approvals.join(0, ById::from_iter([(Arc::from("a-4"), held("a-4", 0))]));
        assert_eq!(approvals.len(), 4);
        assert_eq!(approvals.get("a-3").map(|h| h.partition), Some(1));
        assert_eq!(approvals.get_key_value("a-1").map(|(k, _)| &**k), Some("a-1"));
        assert!(approvals.contains_key("a-4") && !approvals.contains_key("a-5"));
        assert_eq!(approvals.remove("a-2").map(|h| h.partition), Some(1));
        assert!(approvals.get("a-2").is_none());
        let left = approvals.leave(0);
        assert_eq!(left.len(), 2);
        assert!(left.contains_key("a-1") && left.contains_key("a-4"));
        let ids: Vec<&str> = approvals.iter().map(|(id, _)| &**id).collect();
        assert_eq!(ids, ["a-3"]);
        assert!(approvals.leave(0).is_empty());
    }

    #[test]
    fn lane_names_are_shared_and_records_compress_against_their_lanes_dictionary() {
        let store = Store::default();
        let first = record_json("a-1", "finance", "2026-01-01T02:00:00Z", false);
        let second = record_json("a-2", "finance", "2026-01-01T03:00:00Z", true);
        let a = Held::from_head(&store, 0, &Head::parse(&first).unwrap(), &first).unwrap();
        let b = Held::from_head(&store, 0, &Head::parse(&second).unwrap(), &second).unwrap();
        assert!(Arc::ptr_eq(&a.lanes[0].lane, &b.lanes[0].lane));
        assert!(
            b.blob.len() * 4 < second.len(),
            "{} bytes held for {}",
            b.blob.len(),
            second.len()
        );
        assert!(b.lanes[0].clock.decided);
        assert_eq!(b.undecided().count(), 0);
        assert_eq!(
            a.undecided().map(|l| l.to_string()).collect::<Vec<_>>(),
            ["finance"]
        );
        assert!(b.heap_bytes() < 200, "{} heap bytes", b.heap_bytes());
    }

    #[test]
    fn past_the_dictionary_cap_records_are_still_held_whole() {
        let store = Store::default();
        for i in 0..MAX_DICTIONARIES + 3 {
            let lane = format!("lane-{i}");
            let bytes = record_json("a", &lane, "2026-01-01T02:00:00Z", false);
            let held = Held::from_head(&store, 0, &Head::parse(&bytes).unwrap(), &bytes).unwrap();
            let expected: OwnedPendingRecord = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(held.record(&store).unwrap(), expected);
            assert_eq!(held.blob[0] == NO_DICTIONARY, i >= MAX_DICTIONARIES);
        }
    }

    #[test]
    fn a_corrupt_blob_is_an_error_not_a_panic() {
        let store = Store::default();
        let bytes = record_json("a-1", "finance", "2026-01-01T02:00:00Z", false);
        let mut held = Held::from_head(&store, 0, &Head::parse(&bytes).unwrap(), &bytes).unwrap();
        held.blob = vec![7, 1, 2, 3].into_boxed_slice();
        assert!(matches!(held.record(&store), Err(HeldError::Compression(_))));
        held.blob = Box::new([]);
        assert!(held.record(&store).is_err());
        assert!(Head::parse(b"{\"revision\": 1}").is_err());
    }

    #[test]
    fn timers_are_checked_against_the_held_clocks() {
        let store = Store::default();
        let bytes = record_json("a-1", "finance", "2026-01-01T02:00:00Z", false);
        let held = Held::from_head(&store, 0, &Head::parse(&bytes).unwrap(), &bytes).unwrap();
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let timer = |due: &str, kind| Timer {
            due: at(due),
            action_id: Arc::from("a-1"),
            lane: 0,
            kind,
        };
        let now = at("2026-01-01T02:00:00Z");
        assert!(held.is_current(&timer("2026-01-01T02:00:00Z", TimerKind::Sla), now));
        assert!(!held.is_current(&timer("2026-01-01T01:00:00Z", TimerKind::Sla), now));
        // The reminder's SLA has passed by `now`: stale.
        assert!(!held.is_current(&timer("2026-01-01T00:10:00Z", TimerKind::Remind), now));
        assert!(held.is_current(
            &timer("2026-01-01T00:10:00Z", TimerKind::Remind),
            at("2026-01-01T00:10:00Z")
        ));
        let other_lane = Timer {
            lane: 1,
            ..timer("2026-01-01T02:00:00Z", TimerKind::Sla)
        };
        assert!(!held.is_current(&other_lane, now));
    }
}
