//! JSON wire form of an AgentAction and the one validation every format ends
//! in.
//!
//! Deserialization borrows strings from the record where it can; numbers that
//! must be exact (amount, confidence) are read as raw JSON text and parsed as
//! decimals, so `100.01` is never rounded through a float.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::DecodeError;
use crate::action::{self, AgentAction, Audience, DataClassification, Environment, Signals, Target};

type Text<'a> = Option<Cow<'a, str>>;
/// A text field as read: [`Str`], since serde's `borrow` does not reach
/// through an `Option` (an `Option<Cow<str>>` field is always copied).
pub(super) type WireText<'a> = Option<Str<'a>>;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireAction<'a> {
    #[serde(borrow, default)]
    pub(super) action_id: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) occurred_at: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) agent_id: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) fleet: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) tenant: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) run_id: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) kind: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) summary: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) reason: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) target: Option<WireTarget<'a>>,
    #[serde(borrow, default)]
    pub(super) signals: Option<WireSignals<'a>>,
    #[serde(borrow, default)]
    pub(super) attributes: Option<Attributes<'a>>,
    #[serde(borrow, default)]
    pub(super) payload: WireText<'a>,
}

/// `attributes`, refusing a key given twice: serde's maps keep the last
/// value silently, and rules match attributes, so `{"tier": "free", "tier":
/// "enterprise"}` would be routed on one value while a log or a reviewer
/// reading the first saw the other. (Duplicate fields of the action itself
/// are refused by serde already.)
pub(super) struct Attributes<'a>(pub(super) action::Attributes<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Attributes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Attributes<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of strings")
            }

            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut out = BTreeMap::new();
                while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
                    let Str(value) = map.next_value::<Str<'de>>()?;
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("duplicate attribute {key:?}")));
                    }
                    out.insert(key, value);
                }
                Ok(Attributes(out.into_iter().collect()))
            }
        }
        de.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A string borrowed from the record when it has no escapes.
pub(super) struct Str<'a>(pub(super) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Str<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        de.deserialize_str(Visit(std::marker::PhantomData))
    }
}

/// A value's JSON text as the record has it (a string with its quotes, or
/// a number), for decimals, which are read from either.
pub(super) struct Raw<'a>(pub(super) &'a str);

impl<'de: 'a, 'a> Deserialize<'de> for Raw<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        <&'de RawValue>::deserialize(de).map(|raw| Raw(raw.get()))
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireTarget<'a> {
    #[serde(borrow, default)]
    pub(super) system: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) resource: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) account_id: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) environment: WireText<'a>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireSignals<'a> {
    #[serde(borrow, default)]
    pub(super) data_classification: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) amount: Option<Raw<'a>>,
    #[serde(borrow, default)]
    pub(super) currency: WireText<'a>,
    #[serde(default)]
    pub(super) recipient_count: Option<u64>,
    #[serde(borrow, default)]
    pub(super) audience: WireText<'a>,
    #[serde(default)]
    pub(super) reversible: Option<bool>,
    #[serde(borrow, default)]
    pub(super) rollback_path: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) blast_radius: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) scope: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) destination: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) retention: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) incident_id: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) impact: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) alternatives: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) promises: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) permissions: Option<Vec<Str<'a>>>,
    #[serde(borrow, default)]
    pub(super) deadline: WireText<'a>,
    #[serde(borrow, default)]
    pub(super) confidence: Option<Raw<'a>>,
}

/// Decodes and validates one JSON AgentAction.
///
/// The fast path deserializes without tracking the field path, which costs an
/// allocation per key; only a record that fails is parsed again with
/// tracking, to name the field in the error.
///
/// UTF-8 is checked once for the whole record, which is cheaper than
/// serde_json's check of every string when reading from bytes.
pub(super) fn decode(bytes: &[u8]) -> Result<AgentAction<'_>, DecodeError> {
    decode_with(bytes, true)
}

/// [`decode`], with or without the [`fast`](super::fast) reader first
/// (without only for the tests that hold one against the other).
pub(super) fn decode_with(bytes: &[u8], fast: bool) -> Result<AgentAction<'_>, DecodeError> {
    let text = super::utf8(bytes)
        .map_err(|e| DecodeError::Json(format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    if fast && let Some(wire) = super::fast::read(text) {
        return validate(wire);
    }
    match serde_json::from_str::<WireAction>(text) {
        Ok(wire) => validate(wire),
        Err(_) => Err(explain_failure(text)),
    }
}

fn explain_failure(text: &str) -> DecodeError {
    let mut de = serde_json::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, WireAction>(&mut de) {
        Err(e) => wire_error(e),
        Ok(_) => match de.end() {
            Err(e) => DecodeError::Json(e.to_string()),
            // Both parses read the same bytes; reaching here means serde_json
            // disagreed with itself, which it does not. Still no panic.
            Ok(()) => DecodeError::Json("the record could not be parsed".into()),
        },
    }
}

/// Keeps the field path serde saw and drops serde_json's position suffix,
/// which means nothing to someone reading a DLQ header.
fn wire_error(err: serde_path_to_error::Error<serde_json::Error>) -> DecodeError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return DecodeError::Json(inner.to_string());
    }
    let message = inner.to_string();
    let message = match message.rfind(" at line ") {
        Some(cut) => message[..cut].to_string(),
        None => message,
    };
    let field = if path == "." { "(record)".to_string() } else { path };
    DecodeError::field(field, message)
}

fn validate(w: WireAction<'_>) -> Result<AgentAction<'_>, DecodeError> {
    let target = w.target.map(validate_target).transpose()?.unwrap_or_default();
    let signals = w.signals.map(validate_signals).transpose()?.unwrap_or_default();
    Ok(AgentAction {
        action_id: required(w.action_id, "action_id")?,
        occurred_at: timestamp(&required(w.occurred_at, "occurred_at")?, "occurred_at")?,
        agent_id: required(w.agent_id, "agent_id")?,
        fleet: optional(w.fleet),
        tenant: optional(w.tenant),
        run_id: optional(w.run_id),
        kind: kind(required(w.kind, "kind")?)?,
        summary: required(w.summary, "summary")?,
        reason: optional(w.reason),
        target,
        signals,
        // Like optional fields, an empty attribute says nothing.
        attributes: w
            .attributes
            .map_or_else(Default::default, |Attributes(mut attributes)| {
                attributes.retain(|_, v| !blank(v));
                attributes
            }),
        payload: optional(w.payload),
    })
}

fn validate_target(w: WireTarget<'_>) -> Result<Target<'_>, DecodeError> {
    Ok(Target {
        system: optional(w.system),
        resource: optional(w.resource),
        account_id: optional(w.account_id),
        environment: vocabulary(
            w.environment,
            "target.environment",
            Environment::parse,
            Environment::NAMES,
        )?,
    })
}

fn validate_signals(w: WireSignals<'_>) -> Result<Signals<'_>, DecodeError> {
    let amount = w.amount.map(|raw| decimal(raw, "signals.amount")).transpose()?;
    if let Some(a) = amount
        && a.is_sign_negative()
        && !a.is_zero()
    {
        return Err(DecodeError::field("signals.amount", format!("{a} is negative")));
    }
    let confidence = w
        .confidence
        .map(|raw| decimal(raw, "signals.confidence"))
        .transpose()?;
    if let Some(c) = confidence
        && (c < Decimal::ZERO || c > Decimal::ONE)
    {
        return Err(DecodeError::field(
            "signals.confidence",
            format!("{c} is outside 0..1"),
        ));
    }
    let currency = optional(w.currency);
    if let Some(c) = &currency
        && !(c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
    {
        return Err(DecodeError::field(
            "signals.currency",
            format!("{c:?} is not an ISO 4217 code (three capital letters)"),
        ));
    }
    Ok(Signals {
        data_classification: vocabulary(
            w.data_classification,
            "signals.data_classification",
            DataClassification::parse,
            DataClassification::NAMES,
        )?,
        amount,
        currency,
        recipient_count: w.recipient_count,
        audience: vocabulary(w.audience, "signals.audience", Audience::parse, Audience::NAMES)?,
        reversible: w.reversible,
        rollback_path: optional(w.rollback_path),
        blast_radius: optional(w.blast_radius),
        scope: optional(w.scope),
        destination: optional(w.destination),
        retention: optional(w.retention),
        incident_id: optional(w.incident_id),
        impact: optional(w.impact),
        alternatives: optional(w.alternatives),
        promises: optional(w.promises),
        permissions: w
            .permissions
            .map(|p| p.into_iter().map(|s| s.0).collect())
            .unwrap_or_default(),
        deadline: optional(w.deadline)
            .map(|d| timestamp(&d, "signals.deadline"))
            .transpose()?,
        confidence,
    })
}

fn required<'a>(value: WireText<'a>, field: &str) -> Result<Cow<'a, str>, DecodeError> {
    match value.map(|s| s.0) {
        None => Err(DecodeError::field(field, "is required")),
        Some(v) if blank(&v) => Err(DecodeError::field(field, "must not be empty")),
        Some(v) => Ok(v),
    }
}

/// An empty optional string carries nothing, so it is treated as absent:
/// `destination: ""` must not count as "the data leaves".
fn optional(value: WireText<'_>) -> Text<'_> {
    value.map(|s| s.0).filter(|v| !blank(v))
}

/// Empty or only whitespace; the first byte settles it for almost every
/// real value, so this costs far less than `trim`. Only a printable ASCII
/// byte settles it: control bytes include whitespace `is_ascii_whitespace`
/// leaves out (the vertical tab), which `trim` removes.
fn blank(v: &str) -> bool {
    match v.as_bytes().first() {
        None => true,
        Some(b) if (b'!'..0x80).contains(b) => false,
        Some(_) => v.trim().is_empty(),
    }
}

fn kind(kind: Cow<'_, str>) -> Result<Cow<'_, str>, DecodeError> {
    let well_formed = kind.split('.').all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    });
    if well_formed {
        Ok(kind)
    } else {
        Err(DecodeError::field(
            "kind",
            format!("{kind:?} is not a dotted verb like \"data.export\""),
        ))
    }
}

fn vocabulary<T>(
    value: WireText<'_>,
    field: &str,
    parse: fn(&str) -> Option<T>,
    names: &[&str],
) -> Result<Option<T>, DecodeError> {
    match optional(value) {
        None => Ok(None),
        Some(v) => parse(&v)
            .map(Some)
            .ok_or_else(|| DecodeError::field(field, format!("{v:?} is not one of {}", names.join(", ")))),
    }
}

fn timestamp(text: &str, field: &str) -> Result<DateTime<Utc>, DecodeError> {
    // Times as agents mostly write them are read without chrono's parser
    // (the same result, property-tested in `rfc3339`); anything else, and
    // every error, is chrono's.
    if let Some(t) = crate::rfc3339::parse(text) {
        return Ok(t);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DecodeError::field(field, format!("{text:?} is not an RFC 3339 timestamp ({e})")))
}

/// Parses a JSON number or string as an exact decimal. The raw text is used,
/// so `1e400`, `NaN` or `"lots"` are refused rather than rounded.
///
/// A JSON number may have an exponent (`1.5e2` is 150). A string is the
/// exact decimal text and may not: `"1e3"` or `"1E+3"` is what a float
/// formatted as text looks like (Python's `str(1e-05)`, Java's
/// `BigDecimal.toString`), the very rounding the string form exists to
/// avoid, so the agent is told to send plain digits instead.
fn decimal(Raw(text): Raw<'_>, field: &str) -> Result<Decimal, DecodeError> {
    let not_decimal = || DecodeError::field(field, format!("{text} is not a decimal"));
    let inner: Cow<'_, str> = if text.starts_with('"') {
        // A quoted decimal has no escapes; one with any is unquoted by
        // serde_json.
        let inner: Cow<'_, str> = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            Some(inner) if !inner.contains(['\\', '"']) => Cow::Borrowed(inner),
            _ => serde_json::from_str(text).map_err(|_| not_decimal())?,
        };
        if inner.contains(['e', 'E']) {
            if Decimal::from_scientific(inner.trim()).is_err() {
                return Err(not_decimal());
            }
            return Err(DecodeError::field(
                field,
                format!(
                    "{text} is not a plain decimal: write the digits (or a JSON number) instead of an exponent"
                ),
            ));
        }
        inner
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Cow::Borrowed(text)
    } else {
        return Err(not_decimal());
    };
    let inner = inner.trim();
    let parsed = if inner.contains(['e', 'E']) {
        Decimal::from_scientific(inner)
    } else {
        Decimal::from_str_exact(inner)
    };
    parsed.map_err(|_| not_decimal())
}
