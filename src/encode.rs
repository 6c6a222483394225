//! JSON for what the route stage writes, fast enough for its hot path.
//!
//! Packets and pending records are almost all text, and serde_json escapes
//! text one byte at a time through a lookup table: two fifths of the route
//! stage's work per record went there. This is a serde `Serializer` that
//! writes the same compact JSON, byte for byte (the tests compare it with
//! serde_json on every shape it meets), but looks for characters to escape
//! eight bytes at a time. It also embeds JSON that is already encoded
//! ([`Raw`]), so the pending record carries each packet's bytes instead of
//! encoding every packet a second time.
//!
//! Numbers, booleans and everything rare are written exactly as serde_json
//! writes them (floats through serde_json itself).

use serde::ser::{self, Serialize};

/// Why a value could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The value's own `Serialize` refused.
    #[error("{0}")]
    Custom(String),
    /// JSON object keys are text (integers and booleans are quoted, as
    /// serde_json does); anything else has no JSON form.
    #[error("a map key must be a string, a number or a boolean")]
    KeyMustBeAString,
}

impl ser::Error for EncodeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        EncodeError::Custom(msg.to_string())
    }
}

/// Encodes `value` as compact JSON.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    to_vec_with_capacity(value, 1024)
}

/// [`to_vec`] into a buffer of `capacity` bytes to begin with: a caller
/// that can tell how long the JSON will be saves the buffer's regrowth
/// (copying what was written so far, once or twice per record).
pub fn to_vec_with_capacity<T: Serialize + ?Sized>(
    value: &T,
    capacity: usize,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(capacity);
    value.serialize(&mut Encoder {
        out: &mut out,
        raw: false,
    })?;
    Ok(out)
}

/// JSON already encoded, written as it is. Only this module's encoder knows
/// it: anything else (serde_json included) would write it as a string.
#[derive(Debug, Clone, Copy)]
pub struct Raw<'a>(pub &'a [u8]);

const RAW: &str = "$switchboard::encode::Raw";

/// The struct name serde_json's `RawValue` serializes under (its one field,
/// named the same, holds the JSON text): written as it is here too, as
/// serde_json writes it.
const SERDE_JSON_RAW: &str = "$serde_json::private::RawValue";

impl Serialize for Raw<'_> {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_newtype_struct(RAW, &RawInner(self.0))
    }
}

/// The bytes as serde bytes (not a sequence of numbers), so the encoder can
/// take them whole.
struct RawInner<'a>(&'a [u8]);

impl Serialize for RawInner<'_> {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

struct Encoder<'o> {
    out: &'o mut Vec<u8>,
    /// Set by [`Raw`]'s wrapper for the bytes that follow it.
    raw: bool,
}

/// Writes `s` as a JSON string: quotes, and escapes for `"`, `\` and the
/// control characters, as serde_json writes them.
///
/// Most text the stages write needs no escape (and a hundred strings per
/// action are short: keys, names, times), so that case is one scan and one
/// copy; only text holding an escape goes through [`write_escaped`].
#[inline]
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    write_text(out, s.as_bytes());
}

/// [`write_str`] for text whose UTF-8 the caller checks as a whole later
/// (the Avro reader's output): bytes of 0x80 and up are copied as they
/// are, like the letters of valid text.
#[inline]
pub(crate) fn write_text(out: &mut Vec<u8>, bytes: &[u8]) {
    let at = first_escape(bytes, 0);
    if at < bytes.len() {
        return write_escaped(out, bytes, at);
    }
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    out.extend_from_slice(bytes);
    out.push(b'"');
}

/// [`write_str`] for text whose first escape is at `at`.
#[cold]
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8], at: usize) {
    out.reserve(bytes.len() + 8);
    out.push(b'"');
    let mut start = 0;
    let mut at = at;
    while let Some(&b) = bytes.get(at) {
        out.extend_from_slice(&bytes[start..at]);
        match ESCAPE[b as usize] {
            b'u' => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 0xF) as usize],
                ]);
            }
            letter => out.extend_from_slice(&[b'\\', letter]),
        }
        start = at + 1;
        at = first_escape(bytes, start);
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The index of the first byte at or after `from` that needs an escape, or
/// the length when none does. Text of sixteen bytes or more is tested a
/// block at a time ([`block_mask`], the last block overlapping the one
/// before it), shorter text as one or two words ([`escape_mask`]).
///
/// The JSON reader ([`crate::decode`]) finds the end of every string with
/// it (the closing quote is such a byte), so finding the place matters as
/// much as finding none: most strings end within their first block.
pub(crate) fn first_escape(bytes: &[u8], from: usize) -> usize {
    let Some(rest) = bytes.get(from..) else {
        return bytes.len();
    };
    match first_in(rest) {
        Some(at) => from + at,
        None => bytes.len(),
    }
}

fn first_in(rest: &[u8]) -> Option<usize> {
    let lowest = |at: usize, mask: u32| (mask != 0).then(|| at + mask.trailing_zeros() as usize);
    if rest.len() < 16 {
        return first_in_short(rest);
    }
    let mut at = 0;
    while let Some((block, _)) = rest[at..].split_first_chunk::<16>() {
        let found = lowest(at, block_mask(block));
        if found.is_some() {
            return found;
        }
        at += 16;
    }
    if at == rest.len() {
        return None;
    }
    // The last sixteen bytes: those before `at` were clean already.
    let last = rest.len() - 16;
    let (_, block) = rest.split_last_chunk::<16>()?;
    lowest(at, block_mask(block) >> (at - last))
}

/// Text under sixteen bytes: one word, or two overlapping ones.
fn first_in_short(rest: &[u8]) -> Option<usize> {
    let lowest = |at: usize, mask: u64| (mask != 0).then(|| at + (mask.trailing_zeros() / 8) as usize);
    if rest.len() < 8 {
        return lowest(0, escape_mask(short_word(rest)));
    }
    let word = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&rest[at..at + 8]);
        u64::from_le_bytes(word)
    };
    // The second word's flags below the first's end are ones the first
    // word would have shown already.
    lowest(0, escape_mask(word(0))).or_else(|| lowest(rest.len() - 8, escape_mask(word(rest.len() - 8))))
}

/// Text shorter than a word as one word, each byte in its place: read in
/// two overlapping halves (a byte read twice lands in the same place), the
/// places after the text filled with a letter, which needs no escape.
fn short_word(bytes: &[u8]) -> u64 {
    debug_assert!(bytes.len() < 8, "longer text is read word by word");
    const FILL: u64 = 0x4141_4141_4141_4141;
    let n = bytes.len();
    let two = |at: usize| {
        let mut half = [0u8; 2];
        half.copy_from_slice(&bytes[at..at + 2]);
        u64::from(u16::from_le_bytes(half)) << (8 * at)
    };
    let four = |at: usize| {
        let mut half = [0u8; 4];
        half.copy_from_slice(&bytes[at..at + 4]);
        u64::from(u32::from_le_bytes(half)) << (8 * at)
    };
    let text = match n {
        0 => return FILL,
        1 => u64::from(bytes[0]),
        2..=3 => two(0) | two(n - 2),
        _ => four(0) | four(n - 4),
    };
    text | (FILL << (8 * n))
}

/// Bit `i` set when byte `i` of `block` needs an escape: a control
/// character, `"` or `\`. Five SSE2 instructions where x86-64 has them
/// (it always does), which is why [`first_escape`] goes by these blocks.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
fn block_mask(block: &[u8; 16]) -> u32 {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    // SAFETY: the load reads exactly the sixteen bytes `block` refers to
    // (unaligned loads allow any address), and SSE2, all these need, is
    // enabled (the cfg).
    unsafe {
        let v = _mm_loadu_si128(block.as_ptr().cast());
        let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        // Unsigned `b <= 0x1F` as `min(b, 0x1F) == b`: bytes of 0x80 and
        // up (UTF-8 beyond ASCII) are never flagged.
        let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1F)), v);
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
fn block_mask(block: &[u8; 16]) -> u32 {
    block_mask_portable(block)
}

/// [`block_mask`] in plain Rust: the one other targets use, and the one the
/// vector version is tested against.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
fn block_mask_portable(block: &[u8; 16]) -> u32 {
    block.iter().enumerate().fold(0, |mask, (i, &b)| {
        mask | (u32::from(b < 0x20 || b == b'"' || b == b'\\') << i)
    })
}

/// The high bit of each byte of `word` (little-endian) that is below 0x20,
/// a `"` or a `\`, or 0 when none is. (Bytes of 0x80 and up, UTF-8 beyond
/// ASCII, are never escaped.) Only the lowest flag is sure: a flagged
/// byte's borrow can flag bytes above it too, never below, which is all
/// [`first_escape`] needs.
fn escape_mask(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * b'"' as u64);
    let backslash = word ^ (ONES * b'\\' as u64);
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x;
    (below_space | zero_in(quote) | zero_in(backslash)) & HIGHS
}

/// serde_json's table: the letter after `\`, `u` for `\u00XX`, 0 for none.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = b'u';
        i += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0A] = b'n';
    table[0x0C] = b'f';
    table[0x0D] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

fn write_display(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{n}");
}

impl<'a, 'o> ser::Serializer for &'a mut Encoder<'o> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Compound<'a, 'o>;
    type SerializeTuple = Compound<'a, 'o>;
    type SerializeTupleStruct = Compound<'a, 'o>;
    type SerializeTupleVariant = Compound<'a, 'o>;
    type SerializeMap = Compound<'a, 'o>;
    type SerializeStruct = Compound<'a, 'o>;
    type SerializeStructVariant = Compound<'a, 'o>;

    fn serialize_bool(self, v: bool) -> Result<(), EncodeError> {
        self.out.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), EncodeError> {
        self.serialize_i64(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<(), EncodeError> {
        self.serialize_i64(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<(), EncodeError> {
        self.serialize_i64(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<(), EncodeError> {
        write_display(self.out, v);
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> Result<(), EncodeError> {
        write_display(self.out, v);
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<(), EncodeError> {
        self.serialize_u64(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<(), EncodeError> {
        self.serialize_u64(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<(), EncodeError> {
        self.serialize_u64(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<(), EncodeError> {
        if v < 10 {
            self.out.push(b'0' + v as u8);
        } else {
            write_display(self.out, v);
        }
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Result<(), EncodeError> {
        write_display(self.out, v);
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), EncodeError> {
        serde_json::to_writer(&mut *self.out, &v).map_err(|e| EncodeError::Custom(e.to_string()))
    }
    fn serialize_f64(self, v: f64) -> Result<(), EncodeError> {
        serde_json::to_writer(&mut *self.out, &v).map_err(|e| EncodeError::Custom(e.to_string()))
    }
    fn serialize_char(self, v: char) -> Result<(), EncodeError> {
        write_str(self.out, v.encode_utf8(&mut [0u8; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), EncodeError> {
        if self.raw {
            self.out.extend_from_slice(v.as_bytes());
            return Ok(());
        }
        write_str(self.out, v);
        Ok(())
    }
    /// As serde_json: an array of numbers. Inside [`Raw`], the bytes
    /// themselves (see `serialize_newtype_struct`).
    fn serialize_bytes(self, v: &[u8]) -> Result<(), EncodeError> {
        if self.raw {
            self.out.extend_from_slice(v);
            return Ok(());
        }
        use ser::SerializeSeq;
        let mut seq = self.serialize_seq(Some(v.len()))?;
        for b in v {
            seq.serialize_element(b)?;
        }
        seq.end()
    }
    fn serialize_none(self) -> Result<(), EncodeError> {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), EncodeError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), EncodeError> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), EncodeError> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), EncodeError> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        if name == RAW {
            self.raw = true;
            let written = value.serialize(&mut *self);
            self.raw = false;
            return written;
        }
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.out.push(b'{');
        write_str(self.out, variant);
        self.out.push(b':');
        value.serialize(&mut *self)?;
        self.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Compound<'a, 'o>, EncodeError> {
        self.out.push(b'[');
        Ok(Compound::new(self, b"]"))
    }
    fn serialize_tuple(self, len: usize) -> Result<Compound<'a, 'o>, EncodeError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Compound<'a, 'o>, EncodeError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'o>, EncodeError> {
        self.out.push(b'{');
        write_str(self.out, variant);
        self.out.extend_from_slice(b":[");
        Ok(Compound::new(self, b"]}"))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'a, 'o>, EncodeError> {
        self.out.push(b'{');
        Ok(Compound::new(self, b"}"))
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Compound<'a, 'o>, EncodeError> {
        if name == SERDE_JSON_RAW {
            let mut verbatim = Compound::new(self, b"");
            verbatim.verbatim = true;
            return Ok(verbatim);
        }
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'o>, EncodeError> {
        self.out.push(b'{');
        write_str(self.out, variant);
        self.out.extend_from_slice(b":{");
        Ok(Compound::new(self, b"}}"))
    }
}

/// An array or object being written.
pub struct Compound<'a, 'o> {
    enc: &'a mut Encoder<'o>,
    first: bool,
    close: &'static [u8],
    /// serde_json's `RawValue`: its one field's text written as it is,
    /// without braces or a key.
    verbatim: bool,
}

impl<'a, 'o> Compound<'a, 'o> {
    fn new(enc: &'a mut Encoder<'o>, close: &'static [u8]) -> Self {
        Compound {
            enc,
            first: true,
            close,
            verbatim: false,
        }
    }

    fn separate(&mut self) {
        if !std::mem::replace(&mut self.first, false) {
            self.enc.out.push(b',');
        }
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.separate();
        value.serialize(&mut *self.enc)
    }

    /// A struct's field. Its name is a `&'static str` from a derive: a Rust
    /// identifier or a `rename` in a type of this crate, never text that
    /// needs an escape, so it is copied without a scan (debug builds check).
    fn field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), EncodeError> {
        if self.verbatim {
            self.enc.raw = true;
            let written = value.serialize(&mut *self.enc);
            self.enc.raw = false;
            return written;
        }
        debug_assert_eq!(
            first_escape(key.as_bytes(), 0),
            key.len(),
            "field name {key:?} needs an escape"
        );
        let out = &mut *self.enc.out;
        out.reserve(key.len() + 4);
        if !std::mem::replace(&mut self.first, false) {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        value.serialize(&mut *self.enc)
    }

    fn close(self) -> Result<(), EncodeError> {
        self.enc.out.extend_from_slice(self.close);
        Ok(())
    }
}

/// Arrays, tuples and their kin: elements, comma-separated.
macro_rules! elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Compound<'_, '_> {
            type Ok = ();
            type Error = EncodeError;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
                self.element(value)
            }
            fn end(self) -> Result<(), EncodeError> {
                self.close()
            }
        }
    )*};
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), EncodeError> {
        self.separate();
        key.serialize(KeyEncoder { out: self.enc.out })?;
        self.enc.out.push(b':');
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut *self.enc)
    }
    fn end(self) -> Result<(), EncodeError> {
        self.close()
    }
}

/// Structs and struct variants: named fields.
macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Compound<'_, '_> {
            type Ok = ();
            type Error = EncodeError;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), EncodeError> {
                self.field(key, value)
            }
            fn end(self) -> Result<(), EncodeError> {
                self.close()
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

/// Map keys: text as it is, integers and booleans quoted (as serde_json).
struct KeyEncoder<'o> {
    out: &'o mut Vec<u8>,
}

impl KeyEncoder<'_> {
    fn quoted(self, n: impl std::fmt::Display) -> Result<(), EncodeError> {
        self.out.push(b'"');
        write_display(self.out, n);
        self.out.push(b'"');
        Ok(())
    }
}

/// Numbers and booleans as keys: quoted, as serde_json writes them.
macro_rules! quoted {
    ($($name:ident($ty:ty)),*) => {
        $(fn $name(self, v: $ty) -> Result<(), EncodeError> {
            self.quoted(v)
        })*
    };
}

/// Everything else has no key form.
macro_rules! refuse {
    ($($name:ident($($arg:ty),*) -> $ret:ty;)*) => {
        $(fn $name(self, $(_: $arg),*) -> Result<$ret, EncodeError> {
            Err(EncodeError::KeyMustBeAString)
        })*
    };
}

impl ser::Serializer for KeyEncoder<'_> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = ser::Impossible<(), EncodeError>;
    type SerializeTuple = ser::Impossible<(), EncodeError>;
    type SerializeTupleStruct = ser::Impossible<(), EncodeError>;
    type SerializeTupleVariant = ser::Impossible<(), EncodeError>;
    type SerializeMap = ser::Impossible<(), EncodeError>;
    type SerializeStruct = ser::Impossible<(), EncodeError>;
    type SerializeStructVariant = ser::Impossible<(), EncodeError>;

    fn serialize_str(self, v: &str) -> Result<(), EncodeError> {
        write_str(self.out, v);
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), EncodeError> {
        write_str(self.out, v.encode_utf8(&mut [0u8; 4]));
        Ok(())
    }
    quoted! {
        serialize_bool(bool), serialize_i8(i8), serialize_i16(i16), serialize_i32(i32),
        serialize_i64(i64), serialize_i128(i128), serialize_u8(u8), serialize_u16(u16),
        serialize_u32(u32), serialize_u64(u64), serialize_u128(u128)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), EncodeError> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        value.serialize(self)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), EncodeError> {
        Err(EncodeError::KeyMustBeAString)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), EncodeError> {
        Err(EncodeError::KeyMustBeAString)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), EncodeError> {
        Err(EncodeError::KeyMustBeAString)
    }
    refuse! {
        serialize_f32(f32) -> ();
        serialize_f64(f64) -> ();
        serialize_bytes(&[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_seq(Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(usize) -> Self::SerializeTuple;
        serialize_tuple_struct(&'static str, usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Self::SerializeTupleVariant;
        serialize_map(Option<usize>) -> Self::SerializeMap;
        serialize_struct(&'static str, usize) -> Self::SerializeStruct;
        serialize_struct_variant(&'static str, u32, &'static str, usize) -> Self::SerializeStructVariant;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde::Serialize;
    use serde_json::Value;

    use super::*;

    fn same<T: Serialize + ?Sized>(value: &T) {
        let ours = to_vec(value).expect("encodes");
        let theirs = serde_json::to_vec(value).expect("serde_json encodes");
        assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
    }

    #[test]
    fn text_that_needs_escapes_is_written_as_serde_json_writes_it() {
        for s in [
            "",
            "plain",
            "exactly8",
            "a \"quoted\" word and a back\\slash, then more text to fill words",
            "\u{0}\u{1}\u{7}\u{8}\t\n\u{b}\u{c}\r\u{1f} \u{7f}",
            "ünïcödé – “quotes” 🚀 and \"real\" ones",
            "long run of safe bytes, long run of safe bytes, long run of safe bytes\"",
        ] {
            same(s);
        }
    }

    #[test]
    fn an_escape_at_any_place_of_short_text_is_found() {
        for len in 0..=12 {
            same(&"a".repeat(len));
            for at in 0..len {
                for escape in ['"', '\\', '\u{0}', '\n', '\u{1f}'] {
                    let mut text: Vec<char> = "abcdefghijkl".chars().take(len).collect();
                    text[at] = escape;
                    same(&text.into_iter().collect::<String>());
                }
            }
        }
    }

    #[test]
    fn serde_json_raw_values_are_written_as_they_are_as_serde_json_writes_them() {
        #[derive(Serialize)]
        struct Holder {
            before: u8,
            packets: Vec<Box<serde_json::value::RawValue>>,
            after: Option<Box<serde_json::value::RawValue>>,
        }
        let raw = |text: &str| serde_json::value::RawValue::from_string(text.to_string()).unwrap();
        let holder = Holder {
            before: 1,
            packets: vec![raw(r#"{"a":"\u00e9\n","b":[1,2.5e3,null]}"#), raw("  \"text\" ")],
            after: Some(raw("true")),
        };
        assert_eq!(to_vec(&holder).unwrap(), serde_json::to_vec(&holder).unwrap());
    }

    #[test]
    fn the_vector_block_test_agrees_with_the_plain_one_on_every_byte_everywhere() {
        for at in 0..16 {
            for byte in 0..=255u8 {
                // Around it, bytes that need no escape (one above and one
                // below each flagged range) and UTF-8 beyond ASCII.
                let mut block = *b"! #[]\x7f\x80\xff\xc3\xa9A~ 0z@";
                block[at] = byte;
                assert_eq!(
                    block_mask(&block),
                    block_mask_portable(&block),
                    "{byte:#x} at {at}"
                );
                let flagged = byte < 0x20 || byte == b'"' || byte == b'\\';
                assert_eq!(block_mask(&block), u32::from(flagged) << at, "{byte:#x} at {at}");
            }
        }
    }

    #[test]
    fn the_first_byte_to_escape_is_found_exactly_wherever_it_is() {
        // A second escape (and bytes just above one, where a borrow could
        // flag a clean byte) after the first must not move it.
        for len in 0..80 {
            // Clean text that sits next to the flagged ranges.
            let clean: Vec<u8> = (0..len).map(|i| b"! #]\x80\xff"[i % 6]).collect();
            assert_eq!(first_escape(&clean, 0), len);
            for at in 0..len {
                for (first, after) in [(b'"', b'\\'), (0x1f, b'"'), (0, 0x21), (b'\\', 0x20)] {
                    let mut text = clean.clone();
                    text[at] = first;
                    if at + 1 < len {
                        text[at + 1] = after;
                    }
                    if at + 3 < len {
                        text[at + 3] = b'"';
                    }
                    for from in [0, at / 2, at] {
                        assert_eq!(first_escape(&text, from), at, "len {len}, at {at}, from {from}");
                    }
                }
            }
        }
    }

    #[derive(Serialize)]
    enum Shape {
        Unit,
        Newtype(u32),
        Tuple(i8, String),
        Struct { a: Option<bool>, b: Vec<u8> },
    }

    #[derive(Serialize)]
    struct Every {
        shapes: Vec<Shape>,
        map: BTreeMap<i32, &'static str>,
        bools: BTreeMap<bool, ()>,
        float: f64,
        nan: f64,
        small: f32,
        big: u128,
        negative: i64,
        unit: (),
        empty: Vec<u8>,
        empty_map: BTreeMap<String, u8>,
        c: char,
        tuple: (u8, &'static str),
    }

    #[test]
    fn every_serde_shape_is_written_as_serde_json_writes_it() {
        same(&Every {
            shapes: vec![
                Shape::Unit,
                Shape::Newtype(7),
                Shape::Tuple(-3, "x".into()),
                Shape::Struct {
                    a: None,
                    b: vec![1, 2],
                },
            ],
            map: [(-1, "minus"), (10, "ten")].into_iter().collect(),
            bools: [(true, ()), (false, ())].into_iter().collect(),
            float: 1.5e300,
            nan: f64::NAN,
            small: 0.1,
            big: u128::MAX,
            negative: i64::MIN,
            unit: (),
            empty: Vec::new(),
            empty_map: BTreeMap::new(),
            c: '"',
            tuple: (0, "t"),
        });
    }

    #[test]
    fn raw_json_is_embedded_as_it_is() {
        let inner = to_vec(&serde_json::json!({"k": ["v", 1]})).expect("encodes");
        let outer = to_vec(&vec![Raw(&inner), Raw(b"null")]).expect("encodes");
        assert_eq!(outer, br#"[{"k":["v",1]},null]"#);
    }

    #[test]
    fn keys_that_are_not_text_are_refused() {
        let map: BTreeMap<Vec<u8>, u8> = [(vec![1], 1)].into_iter().collect();
        assert!(matches!(to_vec(&map), Err(EncodeError::KeyMustBeAString)));
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[\"\\\\\\x00-\\x1f a-z]{0,40}".prop_map(Value::String),
            // Long runs with a rare escape, anywhere across blocks and words.
            "[a-z \u{e9}]{0,90}[\"\\\\\\x00-\\x1f]?[a-z ]{0,90}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_value_is_written_as_serde_json_writes_it(value in any_json()) {
            let ours = to_vec(&value).expect("encodes");
            let theirs = serde_json::to_vec(&value).expect("serde_json encodes");
            prop_assert_eq!(ours, theirs);
        }
    }
}
