//! Rule conditions: a small boolean language over field values.
//!
//! Conditions are evaluated for every rule on every event, so they are plain
//! data checked once at load time: patterns are pre-split, thresholds are
//! already decimals, and an absent field never matches anything but
//! `present: false`.

use rust_decimal::Decimal;

use super::field::{Field, Val};
use crate::action::AgentAction;
use crate::enrich::Enrichment;

#[derive(Debug, Clone)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Test(Field, Matcher),
}

#[derive(Debug, Clone)]
pub enum Matcher {
    /// The value (or, for a list, any element) matches one of the patterns.
    OneOf(Vec<Pattern>),
    /// The field is present (non-empty for lists) or absent.
    Present(bool),
    /// Every comparison holds, exactly, on a decimal or count.
    Compare(Vec<(Cmp, Decimal)>),
    /// A boolean field has this value (absent is neither).
    Is(bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    /// `data.*` is stored as `data.`: any value that starts with it.
    Prefix(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Above,
    AtLeast,
    Below,
    AtMost,
}

impl Cmp {
    pub const NAMES: &'static [&'static str] = &["above", "at_least", "below", "at_most"];

    pub fn parse(name: &str) -> Option<Cmp> {
        match name {
            "above" => Some(Cmp::Above),
            "at_least" => Some(Cmp::AtLeast),
            "below" => Some(Cmp::Below),
            "at_most" => Some(Cmp::AtMost),
            _ => None,
        }
    }

    fn holds(self, value: Decimal, threshold: Decimal) -> bool {
        match self {
            Cmp::Above => value > threshold,
            Cmp::AtLeast => value >= threshold,
            Cmp::Below => value < threshold,
            Cmp::AtMost => value <= threshold,
        }
    }
}

impl Pattern {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(p) => p == value,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
        }
    }
}

impl Condition {
    pub fn eval(&self, action: &AgentAction, enrichment: &Enrichment) -> bool {
        match self {
            Condition::All(cs) => cs.iter().all(|c| c.eval(action, enrichment)),
            Condition::Any(cs) => cs.iter().any(|c| c.eval(action, enrichment)),
            Condition::Not(c) => !c.eval(action, enrichment),
            Condition::Test(field, matcher) => matcher.matches(&field.get(action, enrichment)),
        }
    }

    /// Every field the condition reads (for tooling and tests).
    pub fn fields(&self) -> Vec<&Field> {
        match self {
            Condition::All(cs) | Condition::Any(cs) => cs.iter().flat_map(Condition::fields).collect(),
            Condition::Not(c) => c.fields(),
            Condition::Test(f, _) => vec![f],
        }
    }
}

impl Matcher {
    pub fn matches(&self, value: &Val<'_>) -> bool {
        match (self, value) {
            (Matcher::Present(want), v) => v.is_present() == *want,
            (Matcher::OneOf(ps), Val::Text(t)) => ps.iter().any(|p| p.matches(t)),
            (Matcher::OneOf(ps), Val::List(items)) => items.iter().any(|i| ps.iter().any(|p| p.matches(i))),
            (Matcher::Compare(cmps), Val::Decimal(d)) => cmps.iter().all(|(c, t)| c.holds(*d, *t)),
            (Matcher::Compare(cmps), Val::Count(n)) => {
                cmps.iter().all(|(c, t)| c.holds(Decimal::from(*n), *t))
            }
            (Matcher::Is(want), Val::Bool(b)) => b == want,
            _ => false,
        }
    }
}
