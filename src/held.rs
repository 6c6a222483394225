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
//! Records of one approval are near copies of each other's structure (field
//! names, the matrix version, rosters, topics, the `decide` block), so the
//! bytes are compressed with zstd against a dictionary: the first record
//! seen whose first lane is the same, used as raw content. Dictionaries are
//! never replaced (a held blob names the one it was compressed with), and
//! their number is capped so a changelog of odd shapes cannot grow them
//! without bound; past the cap, records are compressed without one.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::IgnoredAny;
use zstd::zstd_safe::{CCtx, CDict, DCtx, DDict};

use crate::escalation::{LaneClock, Timer, clock_is_current};
use crate::pending::{OwnedPendingRecord, Status};

/// zstd level for held records: the fastest positive level. With a
/// dictionary it compresses a bench record (2 KB) to about 30 bytes at
/// about 4 µs; higher levels cost more time for almost nothing.
const LEVEL: i32 = 1;
/// At most this many dictionaries (one per first lane seen).
const MAX_DICTIONARIES: usize = 64;
/// The blob's first byte when it was compressed without a dictionary.
const NO_DICTIONARY: u8 = u8::MAX;
/// Records larger than this are never a dictionary (a dictionary is kept
/// for the process's life, twice: prepared for compression and for
/// decompression).
const MAX_DICTIONARY_BYTES: usize = 64 * 1024;
/// A held record never decompresses to more than this (the producer's
/// largest message is far smaller); a frame claiming more is corrupt.
const MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("pending record is not readable: {0}")]
    Json(#[from] serde_json::Error),
    #[error("held record does not decompress: {0}")]
    Compression(String),
}

/// One compression dictionary, prepared for both directions.
struct Dictionary {
    compress: CDict<'static>,
    decompress: DDict<'static>,
}

#[derive(Default)]
struct Dictionaries {
    /// First lane name → index in `list`.
    by_shape: HashMap<Arc<str>, u8>,
    list: Vec<Arc<Dictionary>>,
}

/// What every held approval shares: compression dictionaries and interned
/// lane names. Shared by the threads that restore partitions in parallel.
#[derive(Default)]
pub struct Store {
    dictionaries: RwLock<Dictionaries>,
    lanes: RwLock<HashMap<Arc<str>, ()>>,
}

thread_local! {
    /// Compression and decompression contexts are costly to create (their
    /// work space is allocated on first use), so each thread keeps one.
    static CONTEXTS: RefCell<(CCtx<'static>, DCtx<'static>, Vec<u8>)> =
        RefCell::new((CCtx::create(), DCtx::create(), Vec::new()));
}

impl Store {
    /// The one shared copy of a lane name.
    pub fn intern(&self, lane: &str) -> Arc<str> {
        // A poisoned lock only means another thread panicked while holding
        // it; the map itself is always whole (inserts are single calls).
        if let Some((name, ())) = self
            .lanes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get_key_value(lane)
        {
            return name.clone();
        }
        let mut lanes = self.lanes.write().unwrap_or_else(|e| e.into_inner());
        if let Some((name, ())) = lanes.get_key_value(lane) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(lane);
        lanes.insert(name.clone(), ());
        name
    }

    /// The dictionary for records whose first lane is `shape`, made from
    /// `sample` when there is none yet and there is room.
    fn dictionary(&self, shape: &str, sample: &[u8]) -> Option<(u8, Arc<Dictionary>)> {
        {
            let dicts = self.dictionaries.read().unwrap_or_else(|e| e.into_inner());
            if let Some(&i) = dicts.by_shape.get(shape) {
                return dicts.list.get(i as usize).map(|d| (i, d.clone()));
            }
            if dicts.list.len() >= MAX_DICTIONARIES || sample.len() > MAX_DICTIONARY_BYTES {
                return None;
            }
        }
        let mut dicts = self.dictionaries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&i) = dicts.by_shape.get(shape) {
            return dicts.list.get(i as usize).map(|d| (i, d.clone()));
        }
        if dicts.list.len() >= MAX_DICTIONARIES {
            return None;
        }
        let dictionary = Arc::new(Dictionary {
            compress: CDict::try_create(sample, LEVEL)?,
            decompress: DDict::try_create(sample)?,
        });
        let index = u8::try_from(dicts.list.len()).ok()?;
        dicts.list.push(dictionary.clone());
        let shape = self.intern(shape);
        dicts.by_shape.insert(shape, index);
        Some((index, dictionary))
    }

    fn dictionary_at(&self, index: u8) -> Option<Arc<Dictionary>> {
        let dicts = self.dictionaries.read().unwrap_or_else(|e| e.into_inner());
        dicts.list.get(index as usize).cloned()
    }

    /// `bytes` compressed: the dictionary's index, then a zstd frame.
    fn pack(&self, shape: &str, bytes: &[u8]) -> Result<Box<[u8]>, HeldError> {
        let dictionary = self.dictionary(shape, bytes);
        CONTEXTS.with(|cell| {
            let (cctx, _, buffer) = &mut *cell.borrow_mut();
            buffer.clear();
            buffer.reserve(zstd::zstd_safe::compress_bound(bytes.len()));
            let (index, written) = match &dictionary {
                Some((index, d)) => (*index, cctx.compress_using_cdict(buffer, bytes, &d.compress)),
                None => (NO_DICTIONARY, cctx.compress(buffer, bytes, LEVEL)),
            };
            written
                .map_err(|code| HeldError::Compression(zstd::zstd_safe::get_error_name(code).to_string()))?;
            let mut blob = Vec::with_capacity(buffer.len() + 1);
            blob.push(index);
            blob.extend_from_slice(buffer);
            Ok(blob.into_boxed_slice())
        })
    }

    /// The bytes [`Store::pack`] was given.
    fn unpack(&self, blob: &[u8]) -> Result<Vec<u8>, HeldError> {
        let broken = |what: &str| HeldError::Compression(what.to_string());
        let (&index, frame) = blob.split_first().ok_or_else(|| broken("empty blob"))?;
        let size = zstd::zstd_safe::get_frame_content_size(frame)
            .ok()
            .flatten()
            .filter(|n| *n <= MAX_RECORD_BYTES)
            .ok_or_else(|| broken("frame without a plausible content size"))?;
        // Bounded by MAX_RECORD_BYTES just above, so it fits any usize.
        let mut out = Vec::with_capacity(size as usize);
        let dictionary = match index {
            NO_DICTIONARY => None,
            i => Some(
                self.dictionary_at(i)
                    .ok_or_else(|| broken("unknown dictionary"))?,
            ),
        };
        CONTEXTS.with(|cell| {
            let (_, dctx, _) = &mut *cell.borrow_mut();
            match &dictionary {
                Some(d) => dctx.decompress_using_ddict(&mut out, frame, &d.decompress),
                None => dctx.decompress(&mut out, frame),
            }
            .map_err(|code| broken(zstd::zstd_safe::get_error_name(code)))
        })?;
        Ok(out)
    }
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

/// The part of a pending record read without touching its packets.
#[derive(Debug, Deserialize)]
pub struct Head<'a> {
    pub revision: u64,
    pub status: Status,
    pub routed_at: DateTime<Utc>,
    #[serde(default)]
    pub closed_at: Option<DateTime<Utc>>,
    #[serde(borrow)]
    pub lanes: Vec<LaneHead<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct LaneHead<'a> {
    #[serde(borrow)]
    pub lane: Cow<'a, str>,
    pub sla_due: DateTime<Utc>,
    #[serde(default)]
    pub remind_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub verdict: Option<IgnoredAny>,
}

impl<'a> Head<'a> {
    /// Reads the head of a changelog record. The packets are only checked
    /// to be JSON; a record whose packets do not parse is found out when
    /// it is next used ([`Held::record`]).
    pub fn parse(bytes: &'a [u8]) -> Result<Head<'a>, HeldError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

impl Held {
    /// Holds a changelog record of which `head` was read from `bytes`.
    pub fn from_head(
        store: &Store,
        partition: i32,
        head: &Head<'_>,
        bytes: &[u8],
    ) -> Result<Held, HeldError> {
        let shape = head.lanes.first().map_or("", |l| &l.lane);
        Ok(Held {
            partition,
            revision: head.revision,
            status: head.status,
            lanes: head
                .lanes
                .iter()
                .map(|l| HeldLane {
                    lane: store.intern(&l.lane),
                    clock: LaneClock {
                        sla_due: l.sla_due,
                        remind_at: l.remind_at,
                        decided: l.verdict.is_some(),
                    },
                })
                .collect(),
            blob: store.pack(shape, bytes)?,
        })
    }

    /// Holds `record`, whose changelog JSON is `bytes`.
    pub fn from_record(
        store: &Store,
        partition: i32,
        record: &OwnedPendingRecord,
        bytes: &[u8],
    ) -> Result<Held, HeldError> {
        let shape = record.lanes.first().map_or("", |l| &*l.lane);
        Ok(Held {
            partition,
            revision: record.revision,
            status: record.status,
            lanes: record
                .lanes
                .iter()
                .map(|l| HeldLane {
                    lane: store.intern(&l.lane),
                    clock: LaneClock::of(l),
                })
                .collect(),
            blob: store.pack(shape, bytes)?,
        })
    }

    /// The full record, parsed again.
    pub fn record(&self, store: &Store) -> Result<OwnedPendingRecord, HeldError> {
        let bytes = store.unpack(&self.blob)?;
        Ok(serde_json::from_slice(&bytes)?)
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
