//! Dead letters: records switchboard cannot handle go to `switchboard.dlq`
//! unchanged, with headers that say why and where they came from. Nothing
//! read is ever dropped.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::kafka::RecordView;
use crate::sink::Output;

/// Header names on every dead letter.
pub const REASON: &str = "switchboard.reason";
pub const ERROR: &str = "switchboard.error";
pub const SOURCE_TOPIC: &str = "switchboard.source.topic";
pub const SOURCE_PARTITION: &str = "switchboard.source.partition";
pub const SOURCE_OFFSET: &str = "switchboard.source.offset";
pub const DEAD_AT: &str = "switchboard.dead_at";
/// On a dead letter too large to write whole (see [`dead_letter`]): the
/// size of the value, headers or key left out. The record itself stays at
/// its source topic, partition and offset.
pub const PAYLOAD_OMITTED: &str = "switchboard.payload_omitted";
pub const HEADERS_OMITTED: &str = "switchboard.headers_omitted";
pub const KEY_OMITTED: &str = "switchboard.key_omitted";

/// The `switchboard.error` header is cut to this many bytes: messages quote
/// the offending value, which can be nearly as large as the record.
pub const MAX_ERROR_BYTES: usize = 1024;

/// The dead letter for a record: its original key and bytes, its original
/// headers, then switchboard's. `reason` is a short label (also the metric
/// label); `error` the full message (cut to [`MAX_ERROR_BYTES`]).
///
/// A dead letter must fit in `max_bytes` (the producer's
/// `message.max.bytes`): one that did not would be refused on every retry
/// and stop the stage at that record for good. So when the whole record
/// does not fit (it was over the size limit to begin with), its value is
/// left out, then its original headers, then its key, each noted in a
/// header with its size ([`PAYLOAD_OMITTED`], [`HEADERS_OMITTED`],
/// [`KEY_OMITTED`]); the source headers say where the original still is.
pub fn dead_letter(
    dlq_topic: &str,
    record: RecordView<'_>,
    reason: &str,
    error: &str,
    now: DateTime<Utc>,
    max_bytes: usize,
) -> Output {
    let origin = record;
    let mut headers = record.headers();
    let originals = headers.len();
    headers.push((REASON.into(), reason.as_bytes().to_vec()));
    headers.push((ERROR.into(), cut(error, MAX_ERROR_BYTES).into_bytes()));
    headers.push((SOURCE_TOPIC.into(), origin.topic.as_bytes().to_vec()));
    headers.push((SOURCE_PARTITION.into(), origin.partition.to_string().into_bytes()));
    headers.push((SOURCE_OFFSET.into(), origin.offset.to_string().into_bytes()));
    headers.push((
        DEAD_AT.into(),
        now.to_rfc3339_opts(SecondsFormat::Millis, true).into_bytes(),
    ));
    let mut out = Output {
        topic: dlq_topic.to_string(),
        key: record.key.map(<[u8]>::to_vec),
        payload: record.payload.map(<[u8]>::to_vec),
        headers,
    };
    if out.wire_size() > max_bytes
        && let Some(payload) = out.payload.take()
    {
        out.headers
            .push((PAYLOAD_OMITTED.into(), payload.len().to_string().into_bytes()));
    }
    if out.wire_size() > max_bytes && originals > 0 {
        out.headers.drain(..originals);
        out.headers
            .push((HEADERS_OMITTED.into(), originals.to_string().into_bytes()));
    }
    if out.wire_size() > max_bytes
        && let Some(key) = out.key.take()
    {
        out.headers
            .push((KEY_OMITTED.into(), key.len().to_string().into_bytes()));
    }
    out
}

/// `text` cut to at most `max` bytes on a character boundary, marked with
/// an ellipsis when cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
