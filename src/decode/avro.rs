//! Avro binary → the JSON form → the shared validation.
//!
//! The Avro schema (`schemas/agent_action.avsc`) mirrors the JSON form field
//! for field, with timestamps as `timestamp-millis` and `amount` as a string
//! (exact, and free of the fixed scale a `decimal` logical type would
//! impose). Going through the JSON form keeps one validation and one set of
//! error messages for both formats.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::Schema;
use apache_avro::types::Value as Avro;
use apache_avro::writer::datum::GenericDatumWriter;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value as Json};

use super::{DecodeError, json};
use crate::action::AgentAction;

/// Caps what a hostile length prefix can make the Avro reader allocate. The
/// limit is process-wide in apache-avro, so the first decoder built sets it.
pub(super) fn bound_allocations(max_record_bytes: usize) {
    apache_avro::util::max_allocation_bytes(max_record_bytes.max(64 * 1024));
}

pub(super) fn decode(id: u32, schema: &Schema, body: &[u8]) -> Result<AgentAction<'static>, DecodeError> {
    let as_json = to_json_value(id, schema, body)?;
    let bytes = serde_json::to_vec(&as_json).map_err(|e| DecodeError::Avro {
        id,
        message: e.to_string(),
    })?;
    json::decode(&bytes).map(AgentAction::into_owned)
}

/// Reads one Avro datum (unframed) written with `schema` as its JSON form.
pub fn to_json_value(id: u32, schema: &Schema, body: &[u8]) -> Result<Json, DecodeError> {
    let bad = |message: String| DecodeError::Avro { id, message };
    let reader = GenericDatumReader::builder(schema)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut rest = Strict(body);
    let value = reader.read_value(&mut rest).map_err(|e| bad(e.to_string()))?;
    if !rest.0.is_empty() {
        return Err(bad(format!("{} bytes left over after the record", rest.0.len())));
    }
    to_json(value, "").map_err(bad)
}

/// A reader that fails at the end of its input instead of returning 0 bytes:
/// apache-avro reads some types (a union index, a boolean, a string body) at
/// end of input as null, which would let a truncated record through with its
/// last fields, and so its review triggers, silently missing. The error is
/// deliberately not `UnexpectedEof`, which apache-avro also reads as null.
struct Strict<'a>(&'a [u8]);

impl std::io::Read for Strict<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the record ends early",
            ));
        }
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

fn to_json(value: Avro, path: &str) -> Result<Json, String> {
    Ok(match value {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => Json::Bool(b),
        Avro::Int(i) => Json::from(i),
        Avro::Long(i) => Json::from(i),
        // Non-finite floats become a string the validation then refuses by name.
        Avro::Float(f) => number(f64::from(f)),
        Avro::Double(f) => number(f),
        Avro::String(s) | Avro::Enum(_, s) => Json::String(s),
        Avro::Union(_, inner) => to_json(*inner, path)?,
        Avro::Array(items) => Json::Array(
            items
                .into_iter()
                .map(|v| to_json(v, path))
                .collect::<Result<_, _>>()?,
        ),
        Avro::Map(entries) => {
            let mut map = Map::new();
            for (k, v) in entries {
                let child = to_json(v, &format!("{path}.{k}"))?;
                map.insert(k, child);
            }
            Json::Object(map)
        }
        Avro::Record(fields) => {
            let mut map = Map::new();
            for (k, v) in fields {
                let child = to_json(v, &join(path, &k))?;
                map.insert(k, child);
            }
            Json::Object(map)
        }
        Avro::TimestampMillis(ms) => Json::String(rfc3339(DateTime::from_timestamp_millis(ms), path)?),
        Avro::TimestampMicros(us) => Json::String(rfc3339(DateTime::from_timestamp_micros(us), path)?),
        other => {
            return Err(format!(
                "{}: Avro type {other:?} has no AgentAction meaning",
                field_name(path)
            ));
        }
    })
}

fn number(f: f64) -> Json {
    serde_json::Number::from_f64(f).map_or_else(|| Json::String(f.to_string()), Json::Number)
}

fn rfc3339(t: Option<DateTime<Utc>>, path: &str) -> Result<String, String> {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .ok_or_else(|| format!("{}: timestamp out of range", field_name(path)))
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn field_name(path: &str) -> &str {
    if path.is_empty() { "(record)" } else { path }
}

/// Encodes an AgentAction in its JSON form as Avro binary for `schema`
/// (unframed; see [`super::frame`]). Producers of test data, the demo and the
/// benchmarks use it, so the Avro path is exercised with real encoder output.
pub fn encode_json_as_avro(schema: &Schema, action: &Json) -> Result<Vec<u8>, String> {
    let value = from_json(schema, Some(action), "")?;
    let writer = GenericDatumWriter::builder(schema)
        .build()
        .map_err(|e| e.to_string())?;
    writer.write_value_to_vec(value).map_err(|e| e.to_string())
}

fn from_json(schema: &Schema, json: Option<&Json>, path: &str) -> Result<Avro, String> {
    let json = json.filter(|j| !j.is_null());
    let wrong = |what: &str| format!("{}: expected {what}", field_name(path));
    Ok(match (schema, json) {
        (Schema::Null, None) => Avro::Null,
        (Schema::Union(union), json) => {
            let variants = union.variants();
            let mut last_err = wrong("a value");
            for (i, variant) in variants.iter().enumerate() {
                match from_json(variant, json, path) {
                    Ok(v) => return Ok(Avro::Union(i as u32, Box::new(v))),
                    Err(e) => last_err = e,
                }
            }
            return Err(last_err);
        }
        (Schema::Boolean, Some(Json::Bool(b))) => Avro::Boolean(*b),
        (Schema::Long, Some(Json::Number(n))) => Avro::Long(n.as_i64().ok_or_else(|| wrong("an integer"))?),
        (Schema::Int, Some(Json::Number(n))) => Avro::Int(
            n.as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| wrong("a 32-bit integer"))?,
        ),
        (Schema::Double, Some(Json::Number(n))) => Avro::Double(n.as_f64().ok_or_else(|| wrong("a number"))?),
        (Schema::String, Some(Json::String(s))) => Avro::String(s.clone()),
        (Schema::String, Some(Json::Number(n))) => Avro::String(n.to_string()),
        (Schema::Enum(e), Some(Json::String(s))) => {
            let index = e
                .symbols
                .iter()
                .position(|x| x == s)
                .ok_or_else(|| wrong("an enum symbol"))?;
            Avro::Enum(index as u32, s.clone())
        }
        (Schema::TimestampMillis, Some(Json::String(s))) => {
            let t = DateTime::parse_from_rfc3339(s).map_err(|_| wrong("an RFC 3339 timestamp"))?;
            Avro::TimestampMillis(t.timestamp_millis())
        }
        (Schema::Array(a), Some(Json::Array(items))) => Avro::Array(
            items
                .iter()
                .map(|i| from_json(&a.items, Some(i), path))
                .collect::<Result<_, _>>()?,
        ),
        (Schema::Map(m), Some(Json::Object(obj))) => Avro::Map(
            obj.iter()
                .map(|(k, v)| Ok((k.clone(), from_json(&m.types, Some(v), &format!("{path}.{k}"))?)))
                .collect::<Result<_, String>>()?,
        ),
        (Schema::Record(r), Some(Json::Object(obj))) => {
            if let Some(extra) = obj.keys().find(|k| !r.lookup.contains_key(*k)) {
                return Err(format!("{}: no such field in the Avro schema", join(path, extra)));
            }
            Avro::Record(
                r.fields
                    .iter()
                    .map(|f| {
                        Ok((
                            f.name.clone(),
                            from_json(&f.schema, obj.get(&f.name), &join(path, &f.name))?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            )
        }
        _ => return Err(wrong(&format!("{schema:?}").chars().take(40).collect::<String>())),
    })
}
