//! Avro binary → the JSON form (validated by the caller, `Decoder`, as JSON).
//!
//! The Avro schema (`schemas/agent_action.avsc`) mirrors the JSON form field
//! for field, with timestamps as `timestamp-millis` and `amount` as a string
//! (exact, and free of the fixed scale a `decimal` logical type would
//! impose). Going through the JSON form keeps one validation and one set of
//! error messages for both formats. The binary is read here, straight into
//! JSON text, walking the schema apache-avro parsed: its generic reader built
//! two trees per record and cost four times the JSON decode.

use apache_avro::schema::{Schema, UnionSchema};
use apache_avro::types::Value as Avro;
use apache_avro::writer::datum::GenericDatumWriter;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value as Json;

use super::DecodeError;

/// Caps what a hostile length prefix can make the Avro reader allocate. The
/// limit is process-wide in apache-avro, so the first decoder built sets it.
pub(super) fn bound_allocations(max_record_bytes: usize) {
    apache_avro::util::max_allocation_bytes(max_record_bytes.max(64 * 1024));
}

/// Reads one Avro datum (unframed) written with `schema` as its JSON form.
pub fn to_json_value(id: u32, schema: &Schema, body: &[u8]) -> Result<Json, DecodeError> {
    let text = to_json_text(id, schema, body)?;
    serde_json::from_slice(&text).map_err(|e| DecodeError::Avro {
        id,
        message: e.to_string(),
    })
}

/// Reads one Avro datum straight into JSON text: no tree of Avro values,
/// no tree of JSON values, one pass over the bytes.
///
/// Text is copied as it is and the whole JSON checked for UTF-8 once at the
/// end (a string at a time, std's check was a seventh of the reading); a
/// record that fails is read again checking each string, so the error
/// names the field.
pub(super) fn to_json_text(id: u32, schema: &Schema, body: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let out = read(id, schema, body, false)?;
    if super::utf8(&out).is_ok() {
        return Ok(out);
    }
    read(id, schema, body, true)?;
    // Only strings and map keys carry the record's bytes, and the checked
    // read found them all UTF-8: unreachable, but not worth a panic.
    Err(DecodeError::Avro {
        id,
        message: "text is not UTF-8".into(),
    })
}

fn read(id: u32, schema: &Schema, body: &[u8], check_text: bool) -> Result<Vec<u8>, DecodeError> {
    let bad = |message: String| DecodeError::Avro { id, message };
    let mut reader = Reader {
        root: schema,
        rest: body,
        out: Vec::with_capacity(body.len() * 2 + 64),
        check_text,
    };
    reader.value(schema, &mut Vec::new(), 0).map_err(bad)?;
    if !reader.rest.is_empty() {
        return Err(bad(format!(
            "{} bytes left over after the record",
            reader.rest.len()
        )));
    }
    Ok(reader.out)
}

/// How deep a record may nest: far beyond any AgentAction schema, and a
/// bound on recursion for a schema that refers to itself.
const MAX_DEPTH: usize = 32;

/// A datum being read: what is left of it and the JSON written so far.
struct Reader<'s, 'b> {
    /// For named references.
    root: &'s Schema,
    rest: &'b [u8],
    out: Vec<u8>,
    /// Check each string for UTF-8 as it is read (see [`to_json_text`]).
    check_text: bool,
}

impl<'s, 'b> Reader<'s, 'b> {
    /// Writes the value of `schema` at the front of the input; `path` names
    /// the field for errors (built only when one happens).
    fn value(&mut self, schema: &'s Schema, path: &mut Vec<&'s str>, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("{}: nested deeper than {MAX_DEPTH}", name(path)));
        }
        match schema {
            Schema::Null => self.out.extend_from_slice(b"null"),
            Schema::Boolean => match self.byte(path)? {
                0 => self.out.extend_from_slice(b"false"),
                1 => self.out.extend_from_slice(b"true"),
                other => return Err(format!("{}: {other} is not a boolean", name(path))),
            },
            Schema::Int => {
                let n = self.long(path)?;
                let n = i32::try_from(n).map_err(|_| format!("{}: {n} does not fit an int", name(path)))?;
                write_number(&mut self.out, n);
            }
            Schema::Long => {
                let n = self.long(path)?;
                write_number(&mut self.out, n);
            }
            Schema::Float => {
                let raw = self.take(4, path)?;
                let f = f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                self.float(f64::from(f));
            }
            Schema::Double => {
                let raw = self.take(8, path)?;
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(raw);
                self.float(f64::from_le_bytes(bytes));
            }
            Schema::String => {
                let text = self.string(path)?;
                crate::encode::write_text(&mut self.out, text);
            }
            Schema::Enum(e) => {
                let index = self.long(path)?;
                let symbol = usize::try_from(index)
                    .ok()
                    .and_then(|i| e.symbols.get(i))
                    .ok_or_else(|| format!("{}: enum index {index} out of range", name(path)))?;
                crate::encode::write_str(&mut self.out, symbol);
            }
            Schema::Union(union) => {
                let variant = self.variant(union, path)?;
                self.value(variant, path, depth + 1)?;
            }
            Schema::Array(array) => {
                self.out.push(b'[');
                let mut first = true;
                while let Some(count) = self.block(path)? {
                    for _ in 0..count {
                        if !std::mem::replace(&mut first, false) {
                            self.out.push(b',');
                        }
                        self.value(&array.items, path, depth + 1)?;
                    }
                }
                self.out.push(b']');
            }
            Schema::Map(map) => {
                self.out.push(b'{');
                let mut first = true;
                while let Some(count) = self.block(path)? {
                    for _ in 0..count {
                        if !std::mem::replace(&mut first, false) {
                            self.out.push(b',');
                        }
                        let key = self.string(path)?;
                        crate::encode::write_text(&mut self.out, key);
                        self.out.push(b':');
                        self.value(&map.types, path, depth + 1)?;
                    }
                }
                self.out.push(b'}');
            }
            Schema::Record(record) => {
                self.out.push(b'{');
                let mut first = true;
                for field in &record.fields {
                    path.push(&field.name);
                    // A field the record leaves null is left out of the
                    // JSON form, which reads a missing field as null: an
                    // action sets a few of its thirty optional fields, and
                    // writing and then reading the others' keys was a
                    // third of an Avro action's decoding.
                    let schema = match &field.schema {
                        Schema::Union(union) => self.variant(union, path)?,
                        other => other,
                    };
                    if matches!(schema, Schema::Null) {
                        path.pop();
                        continue;
                    }
                    if !std::mem::replace(&mut first, false) {
                        self.out.push(b',');
                    }
                    crate::encode::write_str(&mut self.out, &field.name);
                    self.out.push(b':');
                    self.value(schema, path, depth + 1)?;
                    path.pop();
                }
                self.out.push(b'}');
            }
            Schema::TimestampMillis => {
                let ms = self.long(path)?;
                self.timestamp(DateTime::from_timestamp_millis(ms), path)?;
            }
            Schema::TimestampMicros => {
                let us = self.long(path)?;
                self.timestamp(DateTime::from_timestamp_micros(us), path)?;
            }
            Schema::Ref { name: wanted } => {
                let named = find_named(self.root, wanted, 0)
                    .ok_or_else(|| format!("{}: the schema names no type {wanted}", name(path)))?;
                self.value(named, path, depth + 1)?;
            }
            other => {
                return Err(format!(
                    "{}: Avro type {} has no AgentAction meaning",
                    name(path),
                    format!("{other:?}").chars().take(40).collect::<String>()
                ));
            }
        }
        Ok(())
    }

    /// The branch of `union` the datum takes.
    fn variant(&mut self, union: &'s UnionSchema, path: &[&str]) -> Result<&'s Schema, String> {
        let index = self.long(path)?;
        usize::try_from(index)
            .ok()
            .and_then(|i| union.variants().get(i))
            .ok_or_else(|| format!("{}: union index {index} out of range", name(path)))
    }

    fn take(&mut self, n: usize, path: &[&str]) -> Result<&'b [u8], String> {
        let all: &'b [u8] = self.rest;
        if all.len() < n {
            return Err(format!("{}: the record ends early", name(path)));
        }
        let (head, rest) = all.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn byte(&mut self, path: &[&str]) -> Result<u8, String> {
        Ok(self.take(1, path)?[0])
    }

    /// A zig-zag varint, as Avro writes ints and longs.
    fn long(&mut self, path: &[&str]) -> Result<i64, String> {
        let zigzag = |value: u64| (value >> 1) as i64 ^ -((value & 1) as i64);
        // Most are one byte: union branches, lengths of short strings.
        if let Some((&b, rest)) = self.rest.split_first()
            && b & 0x80 == 0
        {
            self.rest = rest;
            return Ok(zigzag(u64::from(b)));
        }
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte(path)?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(zigzag(value));
            }
        }
        Err(format!("{}: a number longer than 64 bits", name(path)))
    }

    /// A string's bytes, checked for UTF-8 only when `check_text` says so.
    fn string(&mut self, path: &[&str]) -> Result<&'b [u8], String> {
        let len = self.long(path)?;
        let len = usize::try_from(len).map_err(|_| format!("{}: negative length {len}", name(path)))?;
        let bytes = self.take(len, path)?;
        if self.check_text && std::str::from_utf8(bytes).is_err() {
            return Err(format!("{}: text is not UTF-8", name(path)));
        }
        Ok(bytes)
    }

    /// The next block's item count of an array or map; `None` after the
    /// last. A negative count is followed by the block's size in bytes.
    fn block(&mut self, path: &[&str]) -> Result<Option<u64>, String> {
        let count = self.long(path)?;
        if count == 0 {
            return Ok(None);
        }
        if count < 0 {
            let _size = self.long(path)?;
        }
        let count = count.unsigned_abs();
        // Every item takes at least a byte but null: a count beyond what is
        // left is a lie (and a loop bound set by the input).
        if count > self.rest.len() as u64 + 1 {
            return Err(format!(
                "{}: {count} items announced, the record is shorter",
                name(path)
            ));
        }
        Ok(Some(count))
    }

    /// Non-finite floats become a string the validation then refuses by name.
    fn float(&mut self, f: f64) {
        if f.is_finite() {
            // serde_json writes a finite float that is valid JSON.
            let _ = serde_json::to_writer(&mut self.out, &f);
        } else {
            crate::encode::write_str(&mut self.out, &f.to_string());
        }
    }

    fn timestamp(&mut self, t: Option<DateTime<Utc>>, path: &[&str]) -> Result<(), String> {
        let t = t.ok_or_else(|| format!("{}: timestamp out of range", name(path)))?;
        // Years beyond 0–9999 are left to chrono's form, which the JSON
        // validation then refuses with the year in its message.
        let mut buf = [0u8; crate::rfc3339::LONGEST];
        match crate::rfc3339::format(&t, &mut buf) {
            Some(text) => crate::encode::write_str(&mut self.out, text),
            None => crate::encode::write_str(&mut self.out, &t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        }
        Ok(())
    }
}

fn write_number(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{n}");
}

/// The named type `wanted` defined somewhere in `schema`.
fn find_named<'s>(
    schema: &'s Schema,
    wanted: &apache_avro::schema::Name,
    depth: usize,
) -> Option<&'s Schema> {
    if depth > MAX_DEPTH {
        return None;
    }
    match schema {
        Schema::Record(r) if &r.name == wanted => Some(schema),
        Schema::Enum(e) if &e.name == wanted => Some(schema),
        Schema::Fixed(f) if &f.name == wanted => Some(schema),
        Schema::Record(r) => r
            .fields
            .iter()
            .find_map(|f| find_named(&f.schema, wanted, depth + 1)),
        Schema::Union(u) => u.variants().iter().find_map(|v| find_named(v, wanted, depth + 1)),
        Schema::Array(a) => find_named(&a.items, wanted, depth + 1),
        Schema::Map(m) => find_named(&m.types, wanted, depth + 1),
        _ => None,
    }
}

/// The dotted field path for an error.
fn name(path: &[&str]) -> String {
    if path.is_empty() {
        "(record)".to_string()
    } else {
        path.join(".")
    }
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
