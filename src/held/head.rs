//! The head of a pending record: what the escalation stage reads of every
//! changelog record it restores or reads back (revision, status, lane
//! clocks), without the packets that make up most of its bytes.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use super::HeldError;
use crate::pending::Status;

/// The part of a pending record read without touching its packets.
#[derive(Debug, Deserialize)]
pub struct Head<'a> {
    pub revision: u64,
    pub status: Status,
    #[serde(deserialize_with = "crate::rfc3339::deserialize")]
    pub routed_at: DateTime<Utc>,
    #[serde(default, deserialize_with = "crate::rfc3339::deserialize_option")]
    pub closed_at: Option<DateTime<Utc>>,
    #[serde(borrow)]
    pub lanes: Vec<LaneHead<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct LaneHead<'a> {
    #[serde(borrow)]
    pub lane: Cow<'a, str>,
    #[serde(deserialize_with = "crate::rfc3339::deserialize")]
    pub sla_due: DateTime<Utc>,
    #[serde(default, deserialize_with = "crate::rfc3339::deserialize_option")]
    pub remind_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub verdict: Option<IgnoredAny>,
}

impl<'a> Head<'a> {
    /// Reads the head of a changelog record. Records are written with their
    /// packets after the lanes ([`crate::pending::PendingRecord`]'s field
    /// order), so the read stops at the packets when it has every field it
    /// needs: skipping them was most of a restore's parsing. A record whose
    /// packets do not parse is found out when it is next used
    /// ([`super::Held::record`]). Anything else (another field order, a
    /// closed record, a broken head) is read whole, and its error is the
    /// whole read's.
    pub fn parse(bytes: &'a [u8]) -> Result<Head<'a>, HeldError> {
        let mut head = None;
        let mut reader = serde_json::Deserializer::from_slice(bytes);
        // The read is abandoned at the packets, which serde reports as an
        // error; whether the head was complete is what counts.
        let _ = UpToPackets(&mut head).deserialize(&mut reader);
        match head {
            Some(head) => Ok(head),
            None => Ok(serde_json::from_slice(bytes)?),
        }
    }
}

/// Reads a record's fields up to its packets into the slot, which stays
/// empty unless every field of the head was read before them.
struct UpToPackets<'s, 'a>(&'s mut Option<Head<'a>>);

impl<'de, 's> DeserializeSeed<'de> for UpToPackets<'s, 'de> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, 's> Visitor<'de> for UpToPackets<'s, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a pending record")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let (mut revision, mut status, mut routed_at, mut lanes) = (None, None, None, None);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "revision" => revision = Some(map.next_value()?),
                "status" => status = Some(map.next_value()?),
                "routed_at" => routed_at = Some(map.next_value()?),
                "lanes" => lanes = Some(map.next_value()?),
                "packets" => break,
                // A closed record's clock is after the packets; a closed
                // record has none, and is small: read it whole.
                "closed_at" => return Err(de::Error::custom("read whole")),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if let (Some(revision), Some(status), Some(routed_at), Some(lanes)) =
            (revision, status, routed_at, lanes)
            && status != Status::Closed
        {
            *self.0 = Some(Head {
                revision,
                status,
                routed_at,
                closed_at: None,
                lanes,
            });
        }
        Err(de::Error::custom("stopped at the packets"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LANES: &str = r#"[{"lane":"finance","level":0,"role":"r","assignee":"r","roster":["fran"],
        "topic":"approvals.finance","sla_due":"2026-01-01T02:00:00Z","remind_at":"2026-01-01T01:00:00Z"},
        {"lane":"security","sla_due":"2026-01-01T00:30:00Z","verdict":{"verdict":"approve"}}]"#;

    fn whole(bytes: &[u8]) -> Head<'_> {
        serde_json::from_slice(bytes).unwrap()
    }

    fn same(a: &Head<'_>, b: &Head<'_>) {
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn the_read_stops_at_the_packets_with_the_head_it_would_read_whole() {
        let record = format!(
            r#"{{"action_id":"a-1","status":"open","revision":4,"matrix_version":"sha256:x",
            "occurred_at":"2026-01-01T00:00:00Z","routed_at":"2026-01-01T00:00:01Z",
            "lanes":{LANES},"packets":[{{"payload":"not read"}}]}}"#
        );
        let head = Head::parse(record.as_bytes()).unwrap();
        same(&head, &whole(record.as_bytes()));
        assert_eq!((head.revision, head.lanes.len()), (4, 2));
        assert!(head.lanes[1].verdict.is_some() && head.lanes[0].verdict.is_none());
        // What follows the packets is not read: a broken tail is found out
        // when the record is next parsed whole.
        let cut = &record.as_bytes()[..record.find(r#""packets""#).unwrap() + 12];
        same(&Head::parse(cut).unwrap(), &head);
    }

    #[test]
    fn other_records_are_read_whole() {
        // Closed (its clock follows the packets' place), packets first, no
        // packets at all.
        for record in [
            format!(
                r#"{{"status":"closed","revision":9,"routed_at":"2026-01-01T00:00:01Z","lanes":{LANES},
                "outcome":"approved","closed_at":"2026-01-01T00:20:00Z"}}"#
            ),
            format!(
                r#"{{"packets":[{{}}],"status":"open","revision":1,"routed_at":"2026-01-01T00:00:01Z","lanes":{LANES}}}"#
            ),
            r#"{"status":"allowed","revision":0,"routed_at":"2026-01-01T00:00:01Z","lanes":[]}"#.to_string(),
        ] {
            let head = Head::parse(record.as_bytes()).unwrap();
            same(&head, &whole(record.as_bytes()));
        }
        let closed = format!(
            r#"{{"status":"closed","revision":9,"routed_at":"2026-01-01T00:00:01Z","lanes":{LANES},"closed_at":"2026-01-01T00:20:00Z"}}"#
        );
        assert!(Head::parse(closed.as_bytes()).unwrap().closed_at.is_some());
    }

    #[test]
    fn a_broken_head_is_the_whole_reads_error() {
        for record in [
            r#"{"status":"open","revision":1,"routed_at":"2026-01-01T00:00:01Z","packets":[]}"#,
            r#"{"status":"open","revision":"one","routed_at":"2026-01-01T00:00:01Z","lanes":[],"packets":[]}"#,
            r#"{"status":"open","#,
            "[]",
            "",
        ] {
            let error = Head::parse(record.as_bytes()).unwrap_err().to_string();
            let expected = serde_json::from_str::<Head<'_>>(record).unwrap_err().to_string();
            assert!(error.ends_with(&expected), "{record}: {error} vs {expected}");
        }
    }
}
