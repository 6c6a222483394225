//! Timestamps as the outputs write them, without going through `core::fmt`.
//!
//! Every packet and pending record carries several times, and chrono writes
//! each one through `Display` and serde's `collect_str`, character by
//! character through the JSON escaper: a fifth of the route stage's
//! serialization. This writes the same text (chrono's serde form: RFC 3339,
//! `Z`, as many fraction digits as needed in groups of three) into a stack
//! buffer and hands it over whole. The text is byte-identical to chrono's,
//! so readers see no difference; years chrono writes with a sign (before 0
//! or after 9999) are left to chrono.
//!
//! Reading them back is the same story the other way: chrono's relaxed
//! RFC 3339 parser took a fifth of the escalation stage's parse of a held
//! record, ten times in every record. [`deserialize`] reads the form
//! [`format`] writes directly and hands anything else to chrono's own
//! deserializer, so what is accepted, and every error, stays chrono's.

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Timelike, Utc};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// `2026-11-26T02:44:16.123456789Z` is the longest form within years 0–9999.
pub const LONGEST: usize = 30;

/// Writes `t` into `buf` and returns the text, or `None` for a year outside
/// 0–9999.
pub fn format<'b>(t: &DateTime<Utc>, buf: &'b mut [u8; LONGEST]) -> Option<&'b str> {
    let naive = t.naive_utc();
    let year = naive.year();
    if !(0..=9999).contains(&year) {
        return None;
    }
    let mut second = naive.second();
    let mut nano = naive.nanosecond();
    // A leap second is written as second 60.
    if nano >= 1_000_000_000 {
        second += 1;
        nano -= 1_000_000_000;
    }
    let year = year as u32;
    two(&mut buf[0..2], year / 100);
    two(&mut buf[2..4], year % 100);
    buf[4] = b'-';
    two(&mut buf[5..7], naive.month());
    buf[7] = b'-';
    two(&mut buf[8..10], naive.day());
    buf[10] = b'T';
    two(&mut buf[11..13], naive.hour());
    buf[13] = b':';
    two(&mut buf[14..16], naive.minute());
    buf[16] = b':';
    two(&mut buf[17..19], second);
    let mut len = 19;
    let (digits, value) = if nano == 0 {
        (0, 0)
    } else if nano.is_multiple_of(1_000_000) {
        (3, nano / 1_000_000)
    } else if nano.is_multiple_of(1_000) {
        (6, nano / 1_000)
    } else {
        (9, nano)
    };
    if digits > 0 {
        buf[len] = b'.';
        let mut rest = value;
        for i in (0..digits).rev() {
            buf[len + 1 + i] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        len += 1 + digits;
    }
    buf[len] = b'Z';
    len += 1;
    let text = &buf[..len];
    debug_assert!(text.is_ascii(), "only digits and separators are written");
    // SAFETY: every byte of `text` was written above, each an ASCII digit
    // (`b'0'` plus a value under 10) or separator, and ASCII is UTF-8.
    // (std's check was a third of this function's instructions, ten times
    // per routed action.)
    Some(unsafe { std::str::from_utf8_unchecked(text) })
}

fn two(out: &mut [u8], n: u32) {
    out[0] = b'0' + (n / 10 % 10) as u8;
    out[1] = b'0' + (n % 10) as u8;
}

/// For `#[serde(serialize_with = "crate::rfc3339::serialize")]`.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; LONGEST];
    match format(t, &mut buf) {
        Some(text) => serializer.serialize_str(text),
        None => t.serialize(serializer),
    }
}

/// For optional times: `#[serde(serialize_with = "crate::rfc3339::option")]`.
pub fn option<S: Serializer>(t: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
    struct Fast<'a>(&'a DateTime<Utc>);
    impl Serialize for Fast<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serialize(self.0, serializer)
        }
    }
    match t {
        Some(t) => serializer.serialize_some(&Fast(t)),
        None => serializer.serialize_none(),
    }
}

/// Reads `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (a fraction of 1 to 9 digits,
/// second 60 for a leap second), the form [`format`] writes; `None` for
/// anything else, including dates and times that do not exist.
pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    // Two digits at `at` as a number (a byte below '0' wraps past 9).
    let two = |at: usize| -> Option<u32> {
        let (tens, ones) = (b[at].wrapping_sub(b'0'), b[at + 1].wrapping_sub(b'0'));
        (tens < 10 && ones < 10).then(|| u32::from(tens) * 10 + u32::from(ones))
    };
    let year = two(0)? * 100 + two(2)?;
    let (month, day) = (two(5)?, two(8)?);
    let (hour, minute, second) = (two(11)?, two(14)?, two(17)?);
    let (nano, end) = match b[19] {
        b'.' => {
            let mut nano = 0u32;
            let mut n = 0;
            while let Some(d @ b'0'..=b'9') = b.get(20 + n).copied() {
                if n == 9 {
                    return None;
                }
                nano = nano * 10 + u32::from(d - b'0');
                n += 1;
            }
            if n == 0 {
                return None;
            }
            (nano * 10u32.pow(9 - n as u32), 20 + n)
        }
        _ => (0, 19),
    };
    if b.get(end..) != Some(b"Z".as_slice()) {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    let time = match second {
        60 => NaiveTime::from_hms_nano_opt(hour, minute, 59, nano + 1_000_000_000)?,
        _ => NaiveTime::from_hms_nano_opt(hour, minute, second, nano)?,
    };
    Some(date.and_time(time).and_utc())
}

/// For times: `#[serde(deserialize_with = "crate::rfc3339::deserialize")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<DateTime<Utc>, D::Error> {
    de.deserialize_str(TimeVisitor)
}

/// For optional times: `#[serde(deserialize_with =
/// "crate::rfc3339::deserialize_option", default)]`.
pub fn deserialize_option<'de, D: Deserializer<'de>>(de: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    struct Fast(DateTime<Utc>);
    impl<'de> Deserialize<'de> for Fast {
        fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            deserialize(de).map(Fast)
        }
    }
    Ok(Option::<Fast>::deserialize(de)?.map(|Fast(t)| t))
}

struct TimeVisitor;

impl Visitor<'_> for TimeVisitor {
    type Value = DateTime<Utc>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an RFC 3339 timestamp")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        match parse(text) {
            Some(t) => Ok(t),
            None => DateTime::<Utc>::deserialize(de::value::StrDeserializer::<E>::new(text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};
    use proptest::prelude::*;

    use super::*;

    fn both(t: DateTime<Utc>) -> (String, String) {
        let mut ours = Vec::new();
        serialize(&t, &mut serde_json::Serializer::new(&mut ours)).expect("writing to a Vec");
        let chrono = serde_json::to_string(&t).expect("chrono writes every time");
        (String::from_utf8(ours).expect("JSON is UTF-8"), chrono)
    }

    #[test]
    fn every_fraction_width_and_the_edges_match_chrono() {
        let base = Utc
            .with_ymd_and_hms(2026, 11, 26, 2, 44, 16)
            .single()
            .expect("a valid time");
        for nanos in [
            0,
            1,
            999,
            1_000,
            120_000,
            1_000_000,
            5_000_000,
            123_456_789,
            999_999_999,
        ] {
            let t = base + chrono::TimeDelta::nanoseconds(nanos);
            let (ours, chrono) = both(t);
            assert_eq!(ours, chrono);
        }
        for (y, m, d) in [
            (0, 1, 1),
            (9, 2, 3),
            (999, 12, 31),
            (9999, 12, 31),
            (-1, 1, 1),
            (10000, 1, 1),
        ] {
            let t = NaiveDate::from_ymd_opt(y, m, d)
                .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 7))
                .expect("a valid date")
                .and_utc();
            let (ours, chrono) = both(t);
            assert_eq!(ours, chrono);
        }
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .expect("a leap second")
            .and_utc();
        let (ours, chrono) = both(leap);
        assert_eq!(ours, chrono);
        assert!(ours.contains(":60.5"), "{ours}");
    }

    #[test]
    fn options_match_chrono() {
        let t = Some(
            Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
                .single()
                .expect("a valid time"),
        );
        for t in [t, None] {
            let mut ours = Vec::new();
            option(&t, &mut serde_json::Serializer::new(&mut ours)).expect("writing to a Vec");
            assert_eq!(ours, serde_json::to_vec(&t).expect("chrono writes every time"));
        }
    }

    /// What chrono's own deserializer makes of `text`, and ours.
    fn read_both(text: &str) -> (Result<DateTime<Utc>, String>, Result<DateTime<Utc>, String>) {
        let json = serde_json::Value::String(text.to_string());
        let chrono = serde_json::from_value::<DateTime<Utc>>(json.clone()).map_err(|e| e.to_string());
        let ours = deserialize(json).map_err(|e| e.to_string());
        (ours, chrono)
    }

    #[test]
    fn times_read_back_as_chrono_reads_them() {
        for text in [
            "2026-11-26T02:44:16Z",
            "2026-11-26T02:44:16.5Z",
            "2026-11-26T02:44:16.123456789Z",
            "2016-12-31T23:59:60.5Z",
            "2026-02-29T00:00:00Z",
            "2024-02-29T00:00:00Z",
            "2026-11-26T24:00:00Z",
            "2026-11-26T02:44:16.1234567891Z",
            "2026-11-26T02:44:16+01:00",
            "2026-11-26 02:44:16Z",
            "2026-11-26t02:44:16z",
            "2026-11-26T02:44:16.Z",
            "2026-11-26T02:44:16",
            "+10000-01-01T00:00:00Z",
            "not a time",
        ] {
            let (ours, chrono) = read_both(text);
            assert_eq!(ours, chrono, "{text}");
        }
        assert!(
            parse("2026-11-26T02:44:16.5Z").is_some(),
            "the written form takes the fast path"
        );
    }

    proptest! {
        #[test]
        fn any_time_matches_chrono(secs in -100_000_000_000i64..300_000_000_000, nanos in 0u32..2_000_000_000) {
            if let Some(t) = DateTime::from_timestamp(secs, nanos) {
                let (ours, chrono) = both(t);
                prop_assert_eq!(&ours, &chrono);
                // And back: the text read as chrono reads it, to the same time.
                let text: String = serde_json::from_str(&ours).expect("a JSON string");
                let (back, chrono_back) = read_both(&text);
                prop_assert_eq!(&back, &chrono_back);
                prop_assert_eq!(back, Ok(t));
            }
        }

        #[test]
        fn any_text_of_the_shape_reads_as_chrono_reads_it(
            text in "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-2][0-9]:[0-6][0-9]:[0-6][0-9](\\.[0-9]{0,10})?Z?",
        ) {
            let (ours, chrono) = read_both(&text);
            prop_assert_eq!(ours, chrono);
        }
    }
}
