//! Dead letters: records switchboard cannot handle go to `switchboard.dlq`
//! unchanged, with headers that say why and where they came from. Nothing
//! read is ever dropped.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::sink::Output;

/// Header names on every dead letter.
pub const REASON: &str = "switchboard.reason";
pub const ERROR: &str = "switchboard.error";
pub const SOURCE_TOPIC: &str = "switchboard.source.topic";
pub const SOURCE_PARTITION: &str = "switchboard.source.partition";
pub const SOURCE_OFFSET: &str = "switchboard.source.offset";
pub const DEAD_AT: &str = "switchboard.dead_at";

/// A record that could not be handled, as it was read.
#[derive(Debug, Clone, Copy)]
pub struct Failed<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: &'a [(String, Vec<u8>)],
}

/// The dead letter for a record: its original key and bytes, its original
/// headers, then switchboard's. `reason` is a short label (also the metric
/// label); `error` the full message.
pub fn dead_letter(
    dlq_topic: &str,
    record: Failed<'_>,
    reason: &str,
    error: &str,
    now: DateTime<Utc>,
) -> Output {
    let origin = record;
    let mut headers = record.headers.to_vec();
    headers.push((REASON.into(), reason.as_bytes().to_vec()));
    headers.push((ERROR.into(), error.as_bytes().to_vec()));
    headers.push((SOURCE_TOPIC.into(), origin.topic.as_bytes().to_vec()));
    headers.push((SOURCE_PARTITION.into(), origin.partition.to_string().into_bytes()));
    headers.push((SOURCE_OFFSET.into(), origin.offset.to_string().into_bytes()));
    headers.push((
        DEAD_AT.into(),
        now.to_rfc3339_opts(SecondsFormat::Millis, true).into_bytes(),
    ));
    Output {
        topic: dlq_topic.to_string(),
        key: record.key.map(<[u8]>::to_vec),
        payload: record.payload.map(<[u8]>::to_vec),
        headers,
    }
}
