//! Field paths: how the matrix names a fact about an action.
//!
//! Rules, packet context and escalation assignees all point at facts with the
//! same dotted paths DESIGN.md uses for the event (`kind`,
//! `target.environment`, `signals.amount`), plus `attributes.<key>` and
//! `enrichment.<table>.<field>`. Resolving a path once at load time to a
//! [`Field`] keeps routing free of string lookups.

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;

use crate::action::{AgentAction, Audience, DataClassification, Environment};
use crate::enrich::Enrichment;

/// What kind of value a field holds; decides which matchers it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Text,
    /// A closed vocabulary: matcher values are checked against it at load.
    Enum(&'static [&'static str]),
    Decimal,
    Count,
    Bool,
    List,
    Time,
}

/// A resolved field path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Field {
    Builtin(Builtin),
    Attribute(String),
    Enrichment { table: String, field: String },
}

macro_rules! builtins {
    ($($variant:ident => $path:literal : $ty:expr),+ $(,)?) => {
        /// The fields of the AgentAction itself.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Builtin { $($variant),+ }

        impl Builtin {
            pub const ALL: &'static [Builtin] = &[$(Builtin::$variant),+];

            pub fn path(self) -> &'static str {
                match self { $(Builtin::$variant => $path),+ }
            }

            pub fn field_type(self) -> FieldType {
                match self { $(Builtin::$variant => $ty),+ }
            }

            fn parse(path: &str) -> Option<Builtin> {
                match path { $($path => Some(Builtin::$variant),)+ _ => None }
            }
        }
    };
}

builtins! {
    ActionId => "action_id": FieldType::Text,
    OccurredAt => "occurred_at": FieldType::Time,
    AgentId => "agent_id": FieldType::Text,
    Fleet => "fleet": FieldType::Text,
    Tenant => "tenant": FieldType::Text,
    RunId => "run_id": FieldType::Text,
    Kind => "kind": FieldType::Text,
    Summary => "summary": FieldType::Text,
    Reason => "reason": FieldType::Text,
    Payload => "payload": FieldType::Text,
    TargetSystem => "target.system": FieldType::Text,
    TargetResource => "target.resource": FieldType::Text,
    TargetAccountId => "target.account_id": FieldType::Text,
    TargetEnvironment => "target.environment": FieldType::Enum(Environment::NAMES),
    DataClassification => "signals.data_classification": FieldType::Enum(DataClassification::NAMES),
    Amount => "signals.amount": FieldType::Decimal,
    Currency => "signals.currency": FieldType::Text,
    RecipientCount => "signals.recipient_count": FieldType::Count,
    Audience => "signals.audience": FieldType::Enum(Audience::NAMES),
    Reversible => "signals.reversible": FieldType::Bool,
    RollbackPath => "signals.rollback_path": FieldType::Text,
    BlastRadius => "signals.blast_radius": FieldType::Text,
    Scope => "signals.scope": FieldType::Text,
    Destination => "signals.destination": FieldType::Text,
    Retention => "signals.retention": FieldType::Text,
    IncidentId => "signals.incident_id": FieldType::Text,
    Impact => "signals.impact": FieldType::Text,
    Alternatives => "signals.alternatives": FieldType::Text,
    Promises => "signals.promises": FieldType::Text,
    Permissions => "signals.permissions": FieldType::List,
    Deadline => "signals.deadline": FieldType::Time,
    Confidence => "signals.confidence": FieldType::Decimal,
}

/// A field's value in one action, borrowed where possible.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Absent,
    Text(&'a str),
    Decimal(Decimal),
    Count(u64),
    Bool(bool),
    List(&'a [Cow<'a, str>]),
    Time(DateTime<Utc>),
}

impl Field {
    /// Resolves a dotted path, or says why it names nothing.
    pub fn parse(path: &str) -> Result<Field, String> {
        if let Some(b) = Builtin::parse(path) {
            return Ok(Field::Builtin(b));
        }
        if let Some(key) = path.strip_prefix("attributes.") {
            if key.is_empty() {
                return Err("attributes.<key> needs a key".into());
            }
            return Ok(Field::Attribute(key.to_string()));
        }
        if let Some(rest) = path.strip_prefix("enrichment.") {
            return match rest.split_once('.') {
                Some((table, field)) if !table.is_empty() && !field.is_empty() => Ok(Field::Enrichment {
                    table: table.to_string(),
                    field: field.to_string(),
                }),
                _ => Err("enrichment fields are written enrichment.<table>.<field>".into()),
            };
        }
        Err(format!(
            "unknown field {path:?}; fields are the event's ({}, …), attributes.<key> or enrichment.<table>.<field>",
            [
                "kind",
                "target.environment",
                "signals.amount",
                "signals.data_classification"
            ]
            .join(", ")
        ))
    }

    pub fn path(&self) -> Cow<'_, str> {
        match self {
            Field::Builtin(b) => Cow::Borrowed(b.path()),
            Field::Attribute(key) => Cow::Owned(format!("attributes.{key}")),
            Field::Enrichment { table, field } => Cow::Owned(format!("enrichment.{table}.{field}")),
        }
    }

    pub fn field_type(&self) -> FieldType {
        match self {
            Field::Builtin(b) => b.field_type(),
            Field::Attribute(_) | Field::Enrichment { .. } => FieldType::Text,
        }
    }

    /// Reads this field from an action and its enrichment. Inlined: it runs
    /// for every condition and context field, sixty times for the core
    /// bench's action, and its callers know which arms they can reach
    /// (−1.7% of the core's instructions).
    #[inline]
    pub fn get<'a>(&self, a: &'a AgentAction<'_>, enrichment: &'a Enrichment) -> Val<'a> {
        fn text<'v>(v: &'v Option<Cow<'_, str>>) -> Val<'v> {
            v.as_deref().map_or(Val::Absent, Val::Text)
        }
        let s = &a.signals;
        match self {
            Field::Builtin(b) => match b {
                Builtin::ActionId => Val::Text(&a.action_id),
                Builtin::OccurredAt => Val::Time(a.occurred_at),
                Builtin::AgentId => Val::Text(&a.agent_id),
                Builtin::Fleet => text(&a.fleet),
                Builtin::Tenant => text(&a.tenant),
                Builtin::RunId => text(&a.run_id),
                Builtin::Kind => Val::Text(&a.kind),
                Builtin::Summary => Val::Text(&a.summary),
                Builtin::Reason => text(&a.reason),
                Builtin::Payload => text(&a.payload),
                Builtin::TargetSystem => text(&a.target.system),
                Builtin::TargetResource => text(&a.target.resource),
                Builtin::TargetAccountId => text(&a.target.account_id),
                Builtin::TargetEnvironment => a
                    .target
                    .environment
                    .map_or(Val::Absent, |e| Val::Text(e.as_str())),
                Builtin::DataClassification => s
                    .data_classification
                    .map_or(Val::Absent, |c| Val::Text(c.as_str())),
                Builtin::Amount => s.amount.map_or(Val::Absent, Val::Decimal),
                Builtin::Currency => text(&s.currency),
                Builtin::RecipientCount => s.recipient_count.map_or(Val::Absent, Val::Count),
                Builtin::Audience => s.audience.map_or(Val::Absent, |x| Val::Text(x.as_str())),
                Builtin::Reversible => s.reversible.map_or(Val::Absent, Val::Bool),
                Builtin::RollbackPath => text(&s.rollback_path),
                Builtin::BlastRadius => text(&s.blast_radius),
                Builtin::Scope => text(&s.scope),
                Builtin::Destination => text(&s.destination),
                Builtin::Retention => text(&s.retention),
                Builtin::IncidentId => text(&s.incident_id),
                Builtin::Impact => text(&s.impact),
                Builtin::Alternatives => text(&s.alternatives),
                Builtin::Promises => text(&s.promises),
                Builtin::Permissions => Val::List(&s.permissions),
                Builtin::Deadline => s.deadline.map_or(Val::Absent, Val::Time),
                Builtin::Confidence => s.confidence.map_or(Val::Absent, Val::Decimal),
            },
            Field::Attribute(key) => a
                .attributes
                .get(key.as_str())
                .map_or(Val::Absent, |v| Val::Text(v)),
            Field::Enrichment { table, field } => enrichment
                .get(table)
                .and_then(|record| record.get(field))
                .map_or(Val::Absent, |v| Val::Text(v)),
        }
    }
}

impl Val<'_> {
    /// Present means there is something for an approver to read: an empty
    /// permissions list is as absent as a missing one.
    pub fn is_present(&self) -> bool {
        match self {
            Val::Absent => false,
            Val::List(items) => !items.is_empty(),
            _ => true,
        }
    }

    /// The value as it appears in a packet's `context`. Decimals stay strings
    /// so that no consumer reads money through a float.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Val::Absent => J::Null,
            Val::Text(t) => J::String((*t).to_string()),
            Val::Decimal(d) => J::String(decimal_text(*d)),
            Val::Count(n) => J::from(*n),
            Val::Bool(b) => J::Bool(*b),
            Val::List(items) => J::Array(items.iter().map(|i| J::String(i.to_string())).collect()),
            Val::Time(t) => J::String(t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        }
    }
}

/// A decimal as `Decimal`'s `Display` writes it (sign, every digit of its
/// scale), without the formatting machinery: rust_decimal divides its
/// 96-bit mantissa digit by digit, which was 2% of the core's instructions
/// for the one amount a finance packet carries. Mantissas beyond 64 bits go
/// to `Display`.
pub fn decimal_text(d: Decimal) -> String {
    let Ok(mut n) = u64::try_from(d.mantissa().unsigned_abs()) else {
        return d.to_string();
    };
    let mut buf = [0u8; 20];
    let mut start = buf.len();
    loop {
        start -= 1;
        // n % 10 < 10: the cast keeps every digit.
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = &buf[start..];
    let scale = d.scale() as usize;
    let mut out = String::with_capacity(digits.len() + scale + 3);
    if d.is_sign_negative() {
        out.push('-');
    }
    let push = |out: &mut String, ascii: &[u8]| ascii.iter().for_each(|&b| out.push(char::from(b)));
    if digits.len() > scale {
        let (whole, fraction) = digits.split_at(digits.len() - scale);
        push(&mut out, whole);
        if scale > 0 {
            out.push('.');
            push(&mut out, fraction);
        }
    } else {
        out.push_str("0.");
        (digits.len()..scale).for_each(|_| out.push('0'));
        push(&mut out, digits);
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Every sign, scale and mantissa, the 64-bit ones and those beyond
        /// (which `Display` writes itself), zero and negative zero included.
        #[test]
        fn decimal_text_is_what_display_writes(
            lo in any::<u32>(),
            mid in any::<u32>(),
            hi in prop_oneof![Just(0u32), any::<u32>()],
            negative in any::<bool>(),
            scale in 0u32..=28,
            zero in any::<bool>(),
        ) {
            let (lo, mid) = if zero { (0, 0) } else { (lo, mid) };
            let hi = if zero { 0 } else { hi };
            let d = Decimal::from_parts(lo, mid, hi, negative, scale);
            prop_assert_eq!(decimal_text(d), d.to_string());
        }
    }

    #[test]
    fn decimal_text_of_amounts_as_agents_send_them() {
        for text in [
            "1249.00",
            "0.5",
            "-3",
            "0.001",
            "100",
            "-0.00",
            "79228162514264337593543950335",
        ] {
            let d: Decimal = text.parse().expect("a decimal");
            assert_eq!(decimal_text(d), d.to_string(), "{text}");
        }
    }
}
