//! The AgentAction: what an agent asks to do, after decoding and validation.
//!
//! Every later stage (enrichment, routing, packets, timers) works on this one
//! validated type, so none of them re-checks the wire format. Money and
//! confidence are `Decimal`s: the policy compares them exactly, never as floats.
//!
//! Text borrows from the record it was decoded from wherever JSON allows
//! (no escapes), because copying twenty strings per event would be a large
//! share of routing's cost; [`AgentAction::into_owned`] detaches one.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A validated action. Optional fields are `None` when the agent did not send
/// them; rules treat an absent field as "does not match", never as a default.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentAction<'a> {
    pub action_id: Cow<'a, str>,
    pub occurred_at: DateTime<Utc>,
    pub agent_id: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Cow<'a, str>>,
    pub kind: Cow<'a, str>,
    pub summary: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'a, str>>,
    pub target: Target<'a>,
    pub signals: Signals<'a>,
    #[serde(skip_serializing_if = "Attributes::is_empty")]
    pub attributes: Attributes<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Cow<'a, str>>,
}

/// An action's `attributes`: key → value, sorted by key, each key once.
///
/// A sorted vector rather than a map: an action carries a handful of
/// attributes, read by the few rules that name one, and a `BTreeMap` built,
/// searched and dropped per action cost about 1,000 instructions of the
/// core's 26,000 (callgrind) where a vector is one allocation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attributes<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'a> Attributes<'a> {
    /// Pairs whose keys are distinct, or `None` when a key repeats (how a
    /// repeat is refused is the decoder's business).
    pub fn distinct(mut pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>) -> Option<Self> {
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let repeats = pairs.windows(2).any(|w| w[0].0 == w[1].0);
        (!repeats).then_some(Attributes(pairs))
    }

    pub fn get(&self, key: &str) -> Option<&Cow<'a, str>> {
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Sets `key` to `value`, replacing any value it had.
    pub fn insert(&mut self, key: Cow<'a, str>, value: Cow<'a, str>) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    /// Keeps the pairs `keep` says yes to, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.0.retain(|(k, v)| keep(k, v));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A map's semantics: a key given twice keeps its last value.
impl<'a> FromIterator<(Cow<'a, str>, Cow<'a, str>)> for Attributes<'a> {
    fn from_iter<I: IntoIterator<Item = (Cow<'a, str>, Cow<'a, str>)>>(pairs: I) -> Self {
        let map: BTreeMap<_, _> = pairs.into_iter().collect();
        Attributes(map.into_iter().collect())
    }
}

impl Serialize for Attributes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// What the action touches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Target<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
}

/// The facts rules decide on and the context approvers read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Signals<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_classification: Option<DataClassification>,
    /// Money in major units of `currency`, exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<Audience>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reversible: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_path: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blast_radius: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impact: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alternatives: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promises: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<Cow<'a, str>>,
    /// The action's own deadline: it can only make an SLA earlier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// The model's own confidence, 0..=1, exact so that 0.5 is exactly 0.5.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<Decimal>,
}

fn own(v: Cow<'_, str>) -> Cow<'static, str> {
    Cow::Owned(v.into_owned())
}

fn own_opt(v: Option<Cow<'_, str>>) -> Option<Cow<'static, str>> {
    v.map(own)
}

impl AgentAction<'_> {
    /// The same action, owning all its text.
    pub fn into_owned(self) -> AgentAction<'static> {
        AgentAction {
            action_id: own(self.action_id),
            occurred_at: self.occurred_at,
            agent_id: own(self.agent_id),
            fleet: own_opt(self.fleet),
            tenant: own_opt(self.tenant),
            run_id: own_opt(self.run_id),
            kind: own(self.kind),
            summary: own(self.summary),
            reason: own_opt(self.reason),
            target: self.target.into_owned(),
            signals: self.signals.into_owned(),
            attributes: Attributes(
                self.attributes
                    .0
                    .into_iter()
                    .map(|(k, v)| (own(k), own(v)))
                    .collect(),
            ),
            payload: own_opt(self.payload),
        }
    }
}

impl Target<'_> {
    pub fn into_owned(self) -> Target<'static> {
        Target {
            system: own_opt(self.system),
            resource: own_opt(self.resource),
            account_id: own_opt(self.account_id),
            environment: self.environment,
        }
    }
}

impl Signals<'_> {
    pub fn into_owned(self) -> Signals<'static> {
        Signals {
            data_classification: self.data_classification,
            amount: self.amount,
            currency: own_opt(self.currency),
            recipient_count: self.recipient_count,
            audience: self.audience,
            reversible: self.reversible,
            rollback_path: own_opt(self.rollback_path),
            blast_radius: own_opt(self.blast_radius),
            scope: own_opt(self.scope),
            destination: own_opt(self.destination),
            retention: own_opt(self.retention),
            incident_id: own_opt(self.incident_id),
            impact: own_opt(self.impact),
            alternatives: own_opt(self.alternatives),
            promises: own_opt(self.promises),
            permissions: self.permissions.into_iter().map(own).collect(),
            deadline: self.deadline,
            confidence: self.confidence,
        }
    }
}

/// Declares a closed string vocabulary once: the enum, its wire names, and
/// parsing, so the decoder, the matrix loader and serialization agree.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every wire name, in declaration order (used in error messages).
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some(Self::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary!(
    /// Where the action runs; production is what engineering guards.
    Environment {
        Production => "production",
        Staging => "staging",
        Development => "development",
    }
);

vocabulary!(
    /// How sensitive the data is; the top three are what security guards.
    DataClassification {
        Public => "public",
        Internal => "internal",
        Confidential => "confidential",
        Pii => "pii",
        Regulated => "regulated",
    }
);

vocabulary!(
    /// Who will see the result; external audiences are the customer lane's.
    Audience {
        Internal => "internal",
        External => "external",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&'static str, &'static str)]) -> Vec<(Cow<'static, str>, Cow<'static, str>)> {
        items
            .iter()
            .map(|&(k, v)| (Cow::Borrowed(k), Cow::Borrowed(v)))
            .collect()
    }

    #[test]
    fn attributes_are_found_by_key_whatever_order_they_came_in() {
        let a = Attributes::distinct(pairs(&[("tier", "gold"), ("channel", "email"), ("region", "eu")]))
            .expect("keys are distinct");
        assert_eq!(a.get("tier").map(|v| v.as_ref()), Some("gold"));
        assert_eq!(a.get("channel").map(|v| v.as_ref()), Some("email"));
        assert_eq!(a.get("region").map(|v| v.as_ref()), Some("eu"));
        assert_eq!(a.get("team"), None);
        assert_eq!(
            serde_json::to_string(&a).expect("serializes"),
            r#"{"channel":"email","region":"eu","tier":"gold"}"#
        );
    }

    #[test]
    fn a_repeated_key_is_not_distinct() {
        assert!(Attributes::distinct(pairs(&[("tier", "free"), ("x", "1"), ("tier", "gold")])).is_none());
        assert!(Attributes::distinct(pairs(&[])).is_some_and(|a| a.is_empty()));
    }

    #[test]
    fn insert_replaces_and_retain_filters_like_a_map() {
        let mut a: Attributes = pairs(&[("b", "2"), ("a", "1"), ("b", "3")]).into_iter().collect();
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [("a", "1"), ("b", "3")],
            "a map keeps the last"
        );
        a.insert(Cow::Borrowed("c"), Cow::Borrowed(""));
        a.insert(Cow::Borrowed("a"), Cow::Borrowed("9"));
        assert_eq!(a.iter().collect::<Vec<_>>(), [("a", "9"), ("b", "3"), ("c", "")]);
        a.retain(|_, v| !v.is_empty());
        assert_eq!(a.len(), 2);
        assert_eq!(a.get("c"), None);
    }
}
