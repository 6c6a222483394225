//! The common JSON action read in one pass, without serde.
//!
//! serde_json's derived reader was a third of the route stage's
//! instructions per record (callgrind): it matches every key against the
//! field names in turn and goes through `Option`'s and the visitors'
//! indirections for every value. An action as agents send it is plain: one
//! object, text without escapes, a few numbers and
//! booleans. This reader takes exactly that and fills the same
//! [`WireAction`] the serde reader fills, so validation is shared.
//!
//! It gives up (`None`) on anything else: an escape or a control character
//! in any text, a number that is not a plain unsigned integer where one is
//! expected, a value of the wrong type, a field unknown or given twice, an
//! attribute given twice, anything after the object. The caller then reads
//! the record with serde_json, which accepts or refuses it and says why, so
//! the fast path changes no result: what it accepts, serde_json reads the
//! same (property-tested against it).

use std::borrow::Cow;

use super::json::{Attributes, Raw, Str, WireAction, WireSignals, WireTarget, WireText};
use crate::action;
use crate::encode::first_escape;

/// Reads `text` as a [`WireAction`], or `None` when it is not the plain
/// case (see the module docs).
pub(super) fn read(text: &str) -> Option<WireAction<'_>> {
    let mut r = Reader { text, at: 0 };
    let mut wire = WireAction::default();
    let mut seen = Seen::default();
    r.object(|r, key| {
        match key {
            "action_id" => wire.action_id = seen.text(0, r)?,
            "occurred_at" => wire.occurred_at = seen.text(1, r)?,
            "agent_id" => wire.agent_id = seen.text(2, r)?,
            "fleet" => wire.fleet = seen.text(3, r)?,
            "tenant" => wire.tenant = seen.text(4, r)?,
            "run_id" => wire.run_id = seen.text(5, r)?,
            "kind" => wire.kind = seen.text(6, r)?,
            "summary" => wire.summary = seen.text(7, r)?,
            "reason" => wire.reason = seen.text(8, r)?,
            "payload" => wire.payload = seen.text(9, r)?,
            "target" => {
                seen.first(10)?;
                wire.target = r.nullable(Reader::target)?;
            }
            "signals" => {
                seen.first(11)?;
                wire.signals = r.nullable(Reader::signals)?;
            }
            "attributes" => {
                seen.first(12)?;
                wire.attributes = r.nullable(Reader::attributes)?;
            }
            _ => return None,
        }
        Some(())
    })?;
    r.blank();
    (r.at == text.len()).then_some(wire)
}

/// Which fields were read, so one given twice is left to serde (which
/// refuses it).
#[derive(Default)]
struct Seen(u64);

impl Seen {
    fn first(&mut self, field: u32) -> Option<()> {
        let bit = 1u64 << field;
        if self.0 & bit != 0 {
            return None;
        }
        self.0 |= bit;
        Some(())
    }

    fn text<'a>(&mut self, field: u32, r: &mut Reader<'a>) -> Option<WireText<'a>> {
        self.first(field)?;
        r.nullable(|r| r.string().map(|s| Str(Cow::Borrowed(s))))
    }
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    /// Skips JSON's whitespace: space, tab, line feed, carriage return.
    fn blank(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.blank();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        let end = self.at + word.len();
        (self.bytes().get(self.at..end)? == word.as_bytes()).then(|| self.at = end)
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let end = first_escape(self.bytes(), start);
        if self.bytes().get(end) != Some(&b'"') {
            return None;
        }
        self.at = end + 1;
        // Both ends are ASCII quotes, so the slice falls on char boundaries.
        self.text.get(start..end)
    }

    /// `null` as `None`, anything else read by `value`.
    fn nullable<T>(&mut self, value: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        self.blank();
        if self.peek()? == b'n' {
            self.literal("null")?;
            return Some(None);
        }
        value(self).map(Some)
    }

    /// An object: each key handed to `field`, which reads its value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.items(b'{', b'}', |r| {
            let key = r.string()?;
            r.eat(b':')?;
            field(r, key)
        })
    }

    /// Comma-separated items between `open` and `close`, each read by
    /// `item`; none at all is fine, a comma before `close` is not.
    fn items(&mut self, open: u8, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(open)?;
        self.blank();
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            item(self)?;
            self.blank();
            match self.peek()? {
                b',' => self.at += 1,
                b if b == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn boolean(&mut self) -> Option<bool> {
        self.blank();
        if self.peek()? == b't' {
            self.literal("true").map(|()| true)
        } else {
            self.literal("false").map(|()| false)
        }
    }

    /// A non-negative integer in plain digits that fits a u64.
    fn unsigned(&mut self) -> Option<u64> {
        self.blank();
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        // No digits, a leading zero, or a fraction or exponent: serde's case.
        let plain = digits > 0 && (digits == 1 || self.bytes()[start] != b'0');
        (plain && !matches!(self.peek(), Some(b'.' | b'e' | b'E'))).then_some(n)
    }

    /// A string or a number, as the raw JSON text serde's `RawValue` would
    /// borrow: a string without escapes, or a number in JSON's grammar.
    fn raw(&mut self) -> Option<Raw<'a>> {
        self.blank();
        let start = self.at;
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        self.text.get(start..self.at).map(Raw)
    }

    /// A JSON number: `-`, then `0` or digits not starting with `0`, then
    /// an optional fraction and exponent, each with at least one digit.
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }

    fn target(&mut self) -> Option<WireTarget<'a>> {
        let mut target = WireTarget::default();
        let mut seen = Seen::default();
        self.object(|r, key| {
            match key {
                "system" => target.system = seen.text(0, r)?,
                "resource" => target.resource = seen.text(1, r)?,
                "account_id" => target.account_id = seen.text(2, r)?,
                "environment" => target.environment = seen.text(3, r)?,
                _ => return None,
            }
            Some(())
        })?;
        Some(target)
    }

    fn signals(&mut self) -> Option<WireSignals<'a>> {
        let mut s = WireSignals::default();
        let mut seen = Seen::default();
        self.object(|r, key| {
            match key {
                "data_classification" => s.data_classification = seen.text(0, r)?,
                "currency" => s.currency = seen.text(1, r)?,
                "audience" => s.audience = seen.text(2, r)?,
                "rollback_path" => s.rollback_path = seen.text(3, r)?,
                "blast_radius" => s.blast_radius = seen.text(4, r)?,
                "scope" => s.scope = seen.text(5, r)?,
                "destination" => s.destination = seen.text(6, r)?,
                "retention" => s.retention = seen.text(7, r)?,
                "incident_id" => s.incident_id = seen.text(8, r)?,
                "impact" => s.impact = seen.text(9, r)?,
                "alternatives" => s.alternatives = seen.text(10, r)?,
                "promises" => s.promises = seen.text(11, r)?,
                "deadline" => s.deadline = seen.text(12, r)?,
                "amount" => {
                    seen.first(13)?;
                    s.amount = r.nullable(Reader::raw)?;
                }
                "confidence" => {
                    seen.first(14)?;
                    s.confidence = r.nullable(Reader::raw)?;
                }
                "recipient_count" => {
                    seen.first(15)?;
                    s.recipient_count = r.nullable(Reader::unsigned)?;
                }
                "reversible" => {
                    seen.first(16)?;
                    s.reversible = r.nullable(Reader::boolean)?;
                }
                "permissions" => {
                    seen.first(17)?;
                    s.permissions = r.nullable(Reader::strings)?;
                }
                _ => return None,
            }
            Some(())
        })?;
        Some(s)
    }

    fn strings(&mut self) -> Option<Vec<Str<'a>>> {
        let mut out = Vec::new();
        self.items(b'[', b']', |r| {
            out.push(Str(Cow::Borrowed(r.string()?)));
            Some(())
        })?;
        Some(out)
    }

    fn attributes(&mut self) -> Option<Attributes<'a>> {
        let mut pairs = Vec::new();
        self.object(|r, key| {
            pairs.push((Cow::Borrowed(key), Cow::Borrowed(r.string()?)));
            Some(())
        })?;
        // A key given twice: serde's reader refuses it, and says so.
        action::Attributes::distinct(pairs).map(Attributes)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::json::decode_with;
    use super::read;

    /// Text as agents send it: no escapes, every type as expected.
    const PLAIN: &str = r#"{"action_id":"act-1","occurred_at":"2026-03-14T09:26:53.589Z","agent_id":"a",
        "fleet":"f","tenant":"t","run_id":"r","kind":"refund.issue","summary":"s","reason":"why",
        "target":{"system":"billing","resource":"inv/1","account_id":"acct-1","environment":"production"},
        "signals":{"data_classification":"pii","amount":"1249.00","currency":"EUR","recipient_count":3,
        "audience":"external","reversible":false,"rollback_path":"p","blast_radius":"b","scope":"s",
        "destination":"d","retention":"r","incident_id":"i","impact":"i","alternatives":"a","promises":"p",
        "permissions":["billing:admin","x"],"deadline":"2026-03-14T11:00:00Z","confidence":0.82},
        "attributes":{"ticket":"SUP-1","tier":"gold"},"payload":"Hello, ünïcödé 🚀"}"#;

    #[test]
    fn plain_actions_take_the_fast_path_and_read_as_serde_reads_them() {
        let bench = include_str!("../../benches/data/action-1k.json");
        for text in [
            PLAIN,
            bench,
            " {} ",
            r#"{"target":null,"signals":{},"attributes":{}}"#,
        ] {
            assert!(read(text).is_some(), "not read: {text}");
            assert_eq!(
                decode_with(text.as_bytes(), true),
                decode_with(text.as_bytes(), false)
            );
        }
        assert!(decode_with(PLAIN.as_bytes(), true).is_ok());
    }

    #[test]
    fn anything_else_is_left_to_serde() {
        for text in [
            r#"{"summary":"a \"quoted\" word"}"#,
            "{\"summary\":\"tab\tinside\"}",
            r#"{"kind":"a","kind":"b"}"#,
            r#"{"attributes":{"t":"a","t":"b"}}"#,
            r#"{"unknown":1}"#,
            r#"{"signals":{"recipient_count":3.0}}"#,
            r#"{"signals":{"recipient_count":03}}"#,
            r#"{"signals":{"recipient_count":-1}}"#,
            r#"{"signals":{"recipient_count":18446744073709551616}}"#,
            r#"{"signals":{"amount":true}}"#,
            r#"{"target":["billing"]}"#,
            r#"{"kind":"a",}"#,
            r#"{"kind":"a"} x"#,
            r#"{"kind":nul}"#,
            r#"{"kind":nullx}"#,
            r#"{"signals":{"reversible":truex}}"#,
        ] {
            assert!(read(text).is_none(), "read: {text}");
        }
    }

    /// A value as the generator writes it: mostly plain text, then every
    /// other JSON type, escapes (valid or not), and near misses.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => "[a-zA-Z0-9 ._:-]{0,12}".prop_map(|s| format!("\"{s}\"")),
            1 => any::<String>().prop_map(|s| serde_json::Value::String(s).to_string()),
            1 => "[a\"\\\\\\x00-\\x1f]{0,4}".prop_map(|s| format!("\"{s}\"")),
            4 => prop::sample::select(vec![
                "null", "true", "false", "0", "12", "-3", "1.5", "1e2", "007", "0.82", "18446744073709551615",
                "18446744073709551616", "[]", "{}", "[\"a\",\"b\"]", "[\"a\",1]", "nul", "\"2026-03-14T09:26:53Z\"",
                "\"refund.issue\"", "\"production\"", "\"pii\"", "\"external\"", "\"EUR\"", "\"1249.00\"",
                "\"1e3\"", "-0", "1.", ".5", "1e", "--1", "01", "-01", "1.5e+3", "2E-2", "-", "0.5.1", "1e+", "1.e3",
            ])
            .prop_map(String::from),
        ]
    }

    /// A value that fits `key` most of the time (so most generated actions
    /// are valid, and most of those plain), anything [`value`] gives else.
    fn value_for(key: &'static str) -> impl Strategy<Value = String> {
        let good: Vec<&'static str> = match key {
            "occurred_at" | "deadline" => vec!["\"2026-03-14T09:26:53Z\"", "\"2026-03-14T11:00:00.5+01:00\""],
            "kind" => vec!["\"refund.issue\"", "\"data.export\""],
            "environment" => vec!["\"production\"", "\"staging\"", "\"development\""],
            "data_classification" => vec!["\"pii\"", "\"public\"", "\"regulated\""],
            "audience" => vec!["\"internal\"", "\"external\""],
            "currency" => vec!["\"EUR\"", "\"USD\""],
            "amount" => vec!["\"1249.00\"", "20", "0.5", "1.5e2"],
            "confidence" => vec!["0.82", "\"0.35\"", "1"],
            "recipient_count" => vec!["3", "0", "120"],
            "reversible" => vec!["true", "false"],
            "permissions" => vec!["[\"billing:admin\"]", "[]", "[\"a\",\"b\"]"],
            _ => vec![],
        };
        let good = if good.is_empty() {
            "[a-zA-Z0-9 ._:-]{1,12}".prop_map(|s| format!("\"{s}\"")).boxed()
        } else {
            prop::sample::select(good).prop_map(String::from).boxed()
        };
        prop_oneof![19 => good, 1 => value()]
    }

    /// An object of distinct keys (now and then one given twice), each
    /// with [`value_for`] it, spaced at random.
    fn object(keys: &'static [&'static str], all: bool) -> impl Strategy<Value = String> {
        let size = if all {
            keys.len()..keys.len() + 1
        } else {
            0..keys.len().min(6)
        };
        (prop::sample::subsequence(keys, size), prop::bool::weighted(0.1))
            .prop_flat_map(|(mut keys, twice)| {
                if twice && let Some(first) = keys.first().copied() {
                    keys.push(first);
                }
                keys.into_iter()
                    .map(|k| (Just(k), value_for(k), "[ \t\n\r]{0,2}"))
                    .collect::<Vec<_>>()
            })
            .prop_map(|pairs| {
                let fields: Vec<String> = pairs
                    .into_iter()
                    .map(|(k, v, ws)| format!("{ws}\"{k}\"{ws}:{ws}{v}{ws}"))
                    .collect();
                format!("{{{}}}", fields.join(","))
            })
    }

    const TOP: &[&str] = &["fleet", "tenant", "run_id", "reason", "payload", "other"];
    const TARGET: &[&str] = &["system", "resource", "account_id", "environment", "other"];
    const SIGNALS: &[&str] = &[
        "data_classification",
        "currency",
        "audience",
        "rollback_path",
        "deadline",
        "amount",
        "confidence",
        "recipient_count",
        "reversible",
        "permissions",
        "impact",
        "other",
    ];
    const ATTRIBUTES: &[&str] = &["ticket", "tier", "channel"];

    /// An action: the required fields, then optional ones, nested objects
    /// and whitespace, any of which may break it in a way serde sees.
    fn action() -> impl Strategy<Value = String> {
        (
            object(&["action_id", "occurred_at", "agent_id", "kind", "summary"], true),
            object(TOP, false),
            object(TARGET, false),
            object(SIGNALS, false),
            object(ATTRIBUTES, false),
            any::<u8>(),
        )
            .prop_map(|(required, top, target, signals, attributes, pick)| {
                let mut fields: Vec<String> = Vec::new();
                for part in [&required, &top] {
                    let inner = &part[1..part.len() - 1];
                    if !inner.is_empty() {
                        fields.push(inner.to_string());
                    }
                }
                for (bit, name, body) in [
                    (1, "target", &target),
                    (2, "signals", &signals),
                    (4, "attributes", &attributes),
                ] {
                    if pick & bit != 0 {
                        fields.push(format!("\"{name}\":{body}"));
                    }
                }
                format!("{{{}}}", fields.join(","))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn whatever_the_fast_reader_accepts_reads_as_serde_reads_it(text in action()) {
            prop_assert_eq!(decode_with(text.as_bytes(), true), decode_with(text.as_bytes(), false));
        }

        #[test]
        fn so_does_any_edit_of_an_action(text in action(), at in any::<usize>(), op in 0u8..3, byte in any::<u8>()) {
            let mut bytes = text.into_bytes();
            let at = at % (bytes.len() + 1);
            match op {
                0 if at < bytes.len() => { bytes.remove(at); }
                1 => bytes.insert(at, byte),
                _ if at < bytes.len() => bytes[at] = byte,
                _ => {}
            }
            prop_assert_eq!(decode_with(&bytes, true), decode_with(&bytes, false));
        }
    }
}
