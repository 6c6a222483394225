//! The AgentAction: what an agent asks to do, after decoding and validation.
//!
//! Every later stage (enrichment, routing, packets, timers) works on this one
//! validated type, so none of them re-checks the wire format. Money and
//! confidence are `Decimal`s: the policy compares them exactly, never as floats.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A validated action. Optional fields are `None` when the agent did not send
/// them; rules treat an absent field as "does not match", never as a default.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentAction {
    pub action_id: String,
    pub occurred_at: DateTime<Utc>,
    pub agent_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub kind: String,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub target: Target,
    pub signals: Signals,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

/// What the action touches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
}

/// The facts rules decide on and the context approvers read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Signals {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_classification: Option<DataClassification>,
    /// Money in major units of `currency`, exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<Audience>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reversible: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blast_radius: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alternatives: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promises: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// The action's own deadline: it can only make an SLA earlier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// The model's own confidence, 0..=1, exact so that 0.5 is exactly 0.5.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<Decimal>,
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
