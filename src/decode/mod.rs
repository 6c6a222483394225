//! Decode: record bytes → validated [`AgentAction`], or a [`DecodeError`]
//! that names the field and what was wrong.
//!
//! The first byte picks the format: `{` (after whitespace) is JSON, `0` is
//! Confluent-framed Avro (magic byte, 4-byte big-endian schema id, Avro
//! binary). Both end in the same validation ([`json`]), so an event means the
//! same thing whichever way it arrived. A decode error never panics and never
//! drops the record: the route stage sends it to the DLQ with
//! [`DecodeError::reason`] in its headers.

mod avro;
mod fast;
mod json;
mod schemas;

use std::sync::Arc;

use apache_avro::schema::Schema;

use crate::action::AgentAction;

pub use schemas::{AGENT_ACTION_SCHEMA_ID, SchemaDir, SchemaError, SchemaSource};

/// Records larger than this are refused before parsing: 960 KiB, under the
/// 1,000,000 bytes librdkafka's producer sends by default
/// ([`crate::config::DEFAULT_MESSAGE_MAX_BYTES`]), so that a refused
/// record's dead letter (its bytes plus switchboard's headers) can always be
/// written whole.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 960 * 1024;

/// Caps what a hostile Avro length prefix can make apache-avro allocate
/// (process-wide, set by the first call): [`Decoder::new`] calls it, and so
/// must a process that decodes only Decisions.
pub fn bound_avro_allocations(max_record_bytes: usize) {
    avro::bound_allocations(max_record_bytes);
}

/// A whole record's bytes as text. simdutf8 checks the 1.4 KB bench action
/// in 280 instructions where std's word-at-a-time check takes 690
/// (callgrind); its error says nothing of where, so a record that fails is
/// checked again by std for the place (it fails there too: both check the
/// same UTF-8).
pub(crate) fn utf8(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    simdutf8::basic::from_utf8(bytes).or_else(|_| std::str::from_utf8(bytes))
}

/// Why a record is not a valid AgentAction. The `Display` form is what an
/// operator reads in the DLQ header and the logs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("record is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("record is neither JSON nor Confluent-framed Avro (first byte 0x{0:02x})")]
    UnknownFormat(u8),
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("Confluent framing needs 5 bytes (magic byte and schema id), record has {0}")]
    Truncated(usize),
    #[error("schema id {id}: {source}")]
    Schema { id: u32, source: SchemaError },
    #[error("Avro record does not fit schema {id}: {message}")]
    Avro { id: u32, message: String },
    /// A field is missing, of the wrong type, or has a value out of its domain.
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
}

/// Every label [`DecodeError::reason`] can give.
pub const DEAD_LETTER_REASONS: &[&str] = &[
    "empty",
    "too_large",
    "unknown_format",
    "bad_json",
    "bad_framing",
    "unknown_schema",
    "bad_avro",
    "invalid_field",
];

impl DecodeError {
    pub(crate) fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        DecodeError::Field {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// A short, fixed label for metrics (`dead_letters_total{reason}`) and DLQ
    /// headers; the full message goes beside it.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::UnknownFormat(_) => "unknown_format",
            DecodeError::Json(_) => "bad_json",
            DecodeError::Truncated(_) => "bad_framing",
            DecodeError::Schema { .. } => "unknown_schema",
            DecodeError::Avro { .. } => "bad_avro",
            DecodeError::Field { .. } => "invalid_field",
        }
    }
}

/// Turns record bytes into actions. Cheap to clone; shared by every
/// partition's worker.
#[derive(Clone)]
pub struct Decoder {
    schemas: Arc<dyn SchemaSource>,
    max_bytes: usize,
}

impl Decoder {
    pub fn new(schemas: Arc<dyn SchemaSource>, max_bytes: usize) -> Self {
        avro::bound_allocations(max_bytes);
        Decoder { schemas, max_bytes }
    }

    /// A decoder with the schemas bundled in the binary (`schemas/`).
    pub fn bundled() -> Self {
        Decoder::new(Arc::new(SchemaDir::bundled()), DEFAULT_MAX_RECORD_BYTES)
    }

    /// Decodes one record. The action borrows text from `bytes` where it can;
    /// see [`AgentAction::into_owned`] to keep it longer. An Avro record's
    /// text is copied into the action: see [`Decoder::decode_in`].
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<AgentAction<'a>, DecodeError> {
        match self.format(bytes)? {
            Format::Json => json::decode(bytes),
            Format::Avro { id, schema, body } => {
                let text = avro::to_json_text(id, &schema, body)?;
                json::decode(&text).map(AgentAction::into_owned)
            }
        }
    }

    /// As [`Decoder::decode`], but an Avro record is read into `scratch` (as
    /// its JSON form) and the action borrows its text from there too: the
    /// route stage decodes every action, and copying an Avro action's text
    /// out of a buffer about to be dropped was an allocation per field.
    pub fn decode_in<'a>(
        &self,
        bytes: &'a [u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<AgentAction<'a>, DecodeError> {
        match self.format(bytes)? {
            Format::Json => json::decode(bytes),
            Format::Avro { id, schema, body } => {
                *scratch = avro::to_json_text(id, &schema, body)?;
                json::decode(scratch)
            }
        }
    }

    /// Which form the record is in, after the checks both forms share.
    fn format<'a>(&self, bytes: &'a [u8]) -> Result<Format<'a>, DecodeError> {
        if bytes.len() > self.max_bytes {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit: self.max_bytes,
            });
        }
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => Err(DecodeError::Empty),
            Some(b'{') => Ok(Format::Json),
            Some(0) if bytes[0] == 0 => {
                let (id, body) = split_frame(bytes)?;
                let schema = self
                    .schemas
                    .schema(id)
                    .map_err(|source| DecodeError::Schema { id, source })?;
                Ok(Format::Avro { id, schema, body })
            }
            Some(&other) => Err(DecodeError::UnknownFormat(other)),
        }
    }
}

enum Format<'a> {
    Json,
    /// Confluent-framed Avro: the schema id, its schema, the Avro body.
    Avro {
        id: u32,
        schema: Arc<Schema>,
        body: &'a [u8],
    },
}

/// Splits Confluent framing into the schema id and the Avro body.
fn split_frame(bytes: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match bytes {
        [0, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        _ => Err(DecodeError::Truncated(bytes.len())),
    }
}

/// Frames an Avro body the Confluent way; used by producers in tests, the
/// demo and benchmarks.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub use avro::{encode_json_as_avro, to_json_value as avro_to_json};

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::utf8;

    proptest! {
        /// The SIMD check accepts what std accepts, and a failure names
        /// the same place: arbitrary bytes, and text with one byte changed.
        #[test]
        fn utf8_agrees_with_std(
            bytes in proptest::collection::vec(any::<u8>(), 0..80),
            text in "\\PC{0,60}",
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut edited = text.into_bytes();
            if !edited.is_empty() {
                let i = at.index(edited.len());
                edited[i] = byte;
            }
            for b in [&bytes, &edited] {
                let ours = utf8(b).map_err(|e| e.valid_up_to());
                let std = std::str::from_utf8(b).map_err(|e| e.valid_up_to());
                prop_assert_eq!(ours, std);
            }
        }
    }
}
