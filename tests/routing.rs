//! Routing: each rule of the default matrix, each matcher of the matrix
//! language, the packets built from a routing, and properties that must hold
//! for any action.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use proptest::sample::select;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use switchboard::action::{AgentAction, Audience, DataClassification, Environment};
use switchboard::decode::Decoder;
use switchboard::enrich::{Directory, Enrichment, enrich};
use switchboard::matrix::{Field, Matrix};
use switchboard::packet::{self, PacketInput};
use switchboard::route::{Routing, route};

// ------------------------------------------------------------- helpers ----

fn default_matrix() -> &'static Matrix {
    static M: OnceLock<Matrix> = OnceLock::new();
    M.get_or_init(|| {
        Matrix::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/matrix.yaml"))
            .expect("deploy/matrix.yaml loads")
    })
}

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

/// Decodes an event (through the real decoder), filling in the required
/// fields a test does not care about.
fn action(fields: Value) -> AgentAction<'static> {
    let mut event = json!({
        "action_id": "a-1",
        "occurred_at": "2026-01-01T00:00:00Z",
        "agent_id": "agent",
        "kind": "document.draft",
        "summary": "something"
    });
    for (k, v) in fields.as_object().expect("an object") {
        event[k] = v.clone();
    }
    Decoder::bundled()
        .decode(event.to_string().as_bytes())
        .map(AgentAction::into_owned)
        .unwrap_or_else(|e| panic!("test event is valid: {e}: {event}"))
}

fn lanes_of(m: &Matrix, a: &AgentAction) -> Vec<String> {
    lanes_with(m, a, &Enrichment::new())
}

fn lanes_with(m: &Matrix, a: &AgentAction, e: &Enrichment) -> Vec<String> {
    route(m, a, e)
        .lane_names(m)
        .into_iter()
        .map(String::from)
        .collect()
}

fn rules_of(m: &Matrix, a: &AgentAction) -> Vec<String> {
    route(m, a, &Enrichment::new())
        .rule_names(m)
        .into_iter()
        .map(String::from)
        .collect()
}

/// Default-matrix lanes for an event.
fn lanes(fields: Value) -> Vec<String> {
    lanes_of(default_matrix(), &action(fields))
}

fn rules(fields: Value) -> Vec<String> {
    rules_of(default_matrix(), &action(fields))
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ------------------------------------------------- default matrix rules ----

#[test]
fn data_movement_goes_to_security() {
    for kind in ["data.export", "data.share", "data.delete"] {
        assert_eq!(lanes(json!({"kind": kind})), ["security"], "{kind}");
        assert_eq!(rules(json!({"kind": kind})), ["data-movement"], "{kind}");
    }
    assert!(lanes(json!({"kind": "data.read"})).is_empty());
    assert!(lanes(json!({"kind": "data.exports"})).is_empty());
    assert!(lanes(json!({"kind": "data"})).is_empty());
}

#[test]
fn sensitive_data_leaving_goes_to_security() {
    for class in ["confidential", "pii", "regulated"] {
        let leaving_by_destination = json!({"kind": "report.generate", "signals": {"data_classification": class, "destination": "partner"}});
        assert_eq!(lanes(leaving_by_destination.clone()), ["security"], "{class}");
        assert_eq!(rules(leaving_by_destination), ["sensitive-data-leaving"]);
        let leaving_by_audience = json!({"kind": "report.generate", "signals": {"data_classification": class, "audience": "external"}});
        assert_eq!(lanes(leaving_by_audience), ["security"], "{class}");
        let staying = json!({"kind": "report.generate", "signals": {"data_classification": class, "audience": "internal"}});
        assert!(lanes(staying).is_empty(), "{class}");
        let nowhere = json!({"kind": "report.generate", "signals": {"data_classification": class}});
        assert!(lanes(nowhere).is_empty(), "{class}");
    }
    for class in ["public", "internal"] {
        let v = json!({"kind": "report.generate", "signals": {"data_classification": class, "destination": "partner", "audience": "external"}});
        assert!(lanes(v).is_empty(), "{class}");
    }
    // Leaving without a classification is not sensitive.
    assert!(lanes(json!({"kind": "report.generate", "signals": {"destination": "partner"}})).is_empty());
    // An empty destination is no destination.
    assert!(
        lanes(
            json!({"kind": "report.generate", "signals": {"data_classification": "pii", "destination": ""}})
        )
        .is_empty()
    );
}

#[test]
fn access_changes_go_to_security() {
    for kind in [
        "permission.grant",
        "permission.revoke",
        "permission.anything.else",
        "access.request",
        "role.change",
    ] {
        assert_eq!(lanes(json!({"kind": kind})), ["security"], "{kind}");
        assert_eq!(rules(json!({"kind": kind})), ["access-change"], "{kind}");
    }
    for kind in ["permission", "permissions.grant", "access.revoke", "role.read"] {
        assert!(lanes(json!({"kind": kind})).is_empty(), "{kind}");
    }
}

#[test]
fn requested_permissions_go_to_security() {
    let v = json!({"kind": "ticket.update", "signals": {"permissions": ["billing:read"]}});
    assert_eq!(lanes(v.clone()), ["security"]);
    assert_eq!(rules(v), ["permissions-requested"]);
    assert!(lanes(json!({"kind": "ticket.update", "signals": {"permissions": []}})).is_empty());
    assert_eq!(
        rules(json!({"kind": "permission.grant", "signals": {"permissions": ["a"]}})),
        ["access-change", "permissions-requested"]
    );
}

#[test]
fn finance_thresholds_are_exact() {
    for kind in ["refund.issue", "credit.issue"] {
        for (amount, fires) in [
            ("100", false),
            ("100.00", false),
            ("99.99", false),
            ("0", false),
            ("100.01", true),
            ("100.001", true),
            ("100.0000000001", true),
            ("1000000", true),
        ] {
            let v = json!({"kind": kind, "signals": {"amount": amount}});
            let want: &[&str] = if fires { &["finance"] } else { &[] };
            assert_eq!(lanes(v.clone()), want, "{kind} {amount}");
            if fires {
                assert_eq!(rules(v), ["refund-over-threshold"]);
            }
        }
        assert!(lanes(json!({"kind": kind})).is_empty(), "no amount");
    }
    for kind in ["discount.apply", "payment.send", "invoice.adjust"] {
        assert_eq!(
            lanes(json!({"kind": kind, "signals": {"amount": "100.01"}})),
            ["finance"]
        );
        assert_eq!(
            rules(json!({"kind": kind, "signals": {"amount": "101"}})),
            ["payment-over-threshold"]
        );
        assert!(lanes(json!({"kind": kind, "signals": {"amount": "100.00"}})).is_empty());
    }
    // Over the threshold but not a money kind.
    assert!(lanes(json!({"kind": "report.generate", "signals": {"amount": "5000"}})).is_empty());
}

#[test]
fn json_number_amounts_compare_exactly() {
    let m = default_matrix();
    let over = Decoder::bundled()
        .decode(br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","signals":{"amount":100.01}}"#)
        .unwrap();
    assert_eq!(lanes_of(m, &over), ["finance"]);
    let at = Decoder::bundled()
        .decode(br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","signals":{"amount":100.000}}"#)
        .unwrap();
    assert!(lanes_of(m, &at).is_empty());
    // 100.00000000000000001 rounds to 100.0 as an f64; as a decimal it is over.
    let tiny = Decoder::bundled()
        .decode(br#"{"action_id":"a","occurred_at":"2026-01-01T00:00:00Z","agent_id":"x","kind":"refund.issue","summary":"s","signals":{"amount":100.00000000000000001}}"#)
        .unwrap();
    assert_eq!(lanes_of(m, &tiny), ["finance"]);
}

#[test]
fn pricing_and_budget_always_go_to_finance() {
    assert_eq!(rules(json!({"kind": "pricing.exception"})), ["pricing-exception"]);
    assert_eq!(
        rules(json!({"kind": "pricing.exception", "signals": {"amount": "1"}})),
        ["pricing-exception"]
    );
    assert_eq!(rules(json!({"kind": "budget.exceed"})), ["budget-exceeded"]);
    assert_eq!(
        lanes(json!({"kind": "budget.exceed", "target": {"environment": "production"}})),
        ["finance"]
    );
}

#[test]
fn production_changes_go_to_engineering() {
    for kind in [
        "deploy.release",
        "deploy.rollback",
        "deploy.canary",
        "config.change",
        "infra.change",
        "db.migrate",
        "feature_flag.toggle",
    ] {
        let prod = json!({"kind": kind, "target": {"environment": "production"}});
        assert_eq!(lanes(prod.clone()), ["engineering"], "{kind}");
        assert_eq!(rules(prod), ["production-change"], "{kind}");
        for env in ["staging", "development"] {
            assert!(
                lanes(json!({"kind": kind, "target": {"environment": env}})).is_empty(),
                "{kind} {env}"
            );
        }
        assert!(
            lanes(json!({"kind": kind})).is_empty(),
            "{kind} without an environment"
        );
    }
    assert!(lanes(json!({"kind": "deploy", "target": {"environment": "production"}})).is_empty());
}

#[test]
fn irreversible_production_actions_go_to_engineering() {
    let v = json!({"kind": "ticket.update", "target": {"environment": "production"}, "signals": {"reversible": false}});
    assert_eq!(rules(v), ["irreversible-in-production"]);
    let reversible = json!({"kind": "ticket.update", "target": {"environment": "production"}, "signals": {"reversible": true}});
    assert!(lanes(reversible).is_empty());
    let unknown = json!({"kind": "ticket.update", "target": {"environment": "production"}});
    assert!(lanes(unknown).is_empty(), "absent reversible never matches false");
    let staging = json!({"kind": "ticket.update", "target": {"environment": "staging"}, "signals": {"reversible": false}});
    assert!(lanes(staging).is_empty());
    let both = json!({"kind": "db.migrate", "target": {"environment": "production"}, "signals": {"reversible": false}});
    assert_eq!(rules(both), ["production-change", "irreversible-in-production"]);
}

#[test]
fn external_messages_go_to_the_customer_lane() {
    for kind in ["message.send", "email.send", "post.publish", "ticket.reply"] {
        let v = json!({"kind": kind, "signals": {"audience": "external"}});
        assert_eq!(lanes(v.clone()), ["customer"], "{kind}");
        assert_eq!(rules(v), ["external-message"]);
        assert!(lanes(json!({"kind": kind, "signals": {"audience": "internal"}})).is_empty());
        assert!(lanes(json!({"kind": kind})).is_empty());
    }
    assert!(lanes(json!({"kind": "document.draft", "signals": {"audience": "external"}})).is_empty());
}

#[test]
fn authority_exceptions_go_to_a_manager() {
    for kind in ["deadline.extend", "priority.change", "scope.exception"] {
        assert_eq!(rules(json!({"kind": kind})), ["authority-exception"], "{kind}");
    }
}

#[test]
fn low_confidence_is_a_last_resort() {
    assert_eq!(
        rules(json!({"signals": {"confidence": "0.49"}})),
        ["low-confidence"]
    );
    assert_eq!(lanes(json!({"signals": {"confidence": 0}})), ["manager"]);
    assert!(lanes(json!({"signals": {"confidence": "0.5"}})).is_empty());
    assert!(lanes(json!({"signals": {"confidence": "0.50"}})).is_empty());
    assert!(lanes(json!({"signals": {"confidence": 1}})).is_empty());
    assert!(lanes(json!({})).is_empty(), "no confidence is not low confidence");
    // A specialist owns the risk: the manager is not added.
    let v = json!({"kind": "refund.issue", "signals": {"amount": "500", "confidence": 0.1}});
    assert_eq!(lanes(v.clone()), ["finance"]);
    assert_eq!(rules(v), ["refund-over-threshold"]);
    let v = json!({"kind": "data.export", "target": {"environment": "production"}, "signals": {"reversible": false, "confidence": 0.1}});
    assert_eq!(lanes(v), ["security", "engineering"]);
    // The manager already owns it: both manager rules are reported.
    let v = json!({"kind": "priority.change", "signals": {"confidence": 0.2}});
    assert_eq!(lanes(v.clone()), ["manager"]);
    assert_eq!(rules(v), ["authority-exception", "low-confidence"]);
}

#[test]
fn several_lanes_in_matrix_lane_order() {
    let v =
        json!({"kind": "post.publish", "signals": {"audience": "external", "data_classification": "pii"}});
    assert_eq!(lanes(v.clone()), ["security", "customer"]);
    assert_eq!(rules(v), ["sensitive-data-leaving", "external-message"]);
    let v = json!({"kind": "role.change", "target": {"environment": "production"}, "signals": {"reversible": false, "permissions": ["admin"]}});
    assert_eq!(lanes(v.clone()), ["security", "engineering"]);
    assert_eq!(
        rules(v),
        [
            "access-change",
            "permissions-requested",
            "irreversible-in-production"
        ]
    );
    let r = route(
        default_matrix(),
        &action(json!({"kind": "pricing.exception", "signals": {"permissions": ["x"]}})),
        &Enrichment::new(),
    );
    assert!(r.review());
    let ids: Vec<usize> = r.lanes.iter().map(|h| h.lane).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "lane ids ascend: {ids:?}");
}

#[test]
fn routine_work_needs_no_review() {
    let r = route(
        default_matrix(),
        &action(json!({"kind": "custom.thing", "attributes": {"team": "growth"}})),
        &Enrichment::new(),
    );
    assert!(!r.review());
    assert_eq!(r, Routing::default());
}

// ----------------------------------------------------- inline matchers ----

/// A matrix with lanes `a`, `b`, `c`, an `accounts` table, and one rule `r`
/// in lane `a` whose condition is `when` (flow-style YAML).
fn one_rule(when: &str) -> Matrix {
    let text = format!(
        "\
directory:
  accounts:
    key: target.account_id
lanes:
  a: {{sla: 10m, owner: a-owner, roster: [ann]}}
  b: {{sla: 20m, owner: b-owner, roster: [ben]}}
  c: {{sla: 30m, owner: c-owner, roster: [cat]}}
rules:
  - name: r
    lane: a
    when: {when}
"
    );
    Matrix::parse(&text, "inline.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn fires(when: &str, event: Value) -> bool {
    fires_with(when, event, &Enrichment::new())
}

fn fires_with(when: &str, event: Value, e: &Enrichment) -> bool {
    let m = one_rule(when);
    let got = lanes_with(&m, &action(event), e);
    assert!(got.is_empty() || got == ["a"], "{got:?}");
    !got.is_empty()
}

#[test]
fn exact_kind() {
    let w = "{kind: data.export}";
    assert!(fires(w, json!({"kind": "data.export"})));
    for other in ["data.exports", "data", "data.export.all", "x.data.export"] {
        assert!(!fires(w, json!({"kind": other})), "{other}");
    }
    let w = "{kind: [a.b, c.d]}";
    assert!(fires(w, json!({"kind": "a.b"})));
    assert!(fires(w, json!({"kind": "c.d"})));
    assert!(!fires(w, json!({"kind": "a.d"})));
}

#[test]
fn prefix_pattern() {
    let w = "{kind: data.*}";
    for yes in ["data.export", "data.x", "data.export.all"] {
        assert!(fires(w, json!({"kind": yes})), "{yes}");
    }
    for no in ["data", "database.drop", "metadata.export", "x.data.y"] {
        assert!(!fires(w, json!({"kind": no})), "{no}");
    }
    let w = "{kind: a.b.*}";
    assert!(fires(w, json!({"kind": "a.b.c"})));
    assert!(!fires(w, json!({"kind": "a.bc"})));
    assert!(!fires(w, json!({"kind": "a.b"})));
    // Patterns apply to any text field, and to list elements.
    assert!(fires(
        "{target.system: billing.*}",
        json!({"target": {"system": "billing.eu"}})
    ));
    assert!(fires(
        "{signals.permissions: admin.*}",
        json!({"signals": {"permissions": ["read", "admin.all"]}})
    ));
    assert!(!fires(
        "{signals.permissions: admin.*}",
        json!({"signals": {"permissions": ["read", "admin"]}})
    ));
}

#[test]
fn enum_fields() {
    let w = "{target.environment: production}";
    assert!(fires(w, json!({"target": {"environment": "production"}})));
    assert!(!fires(w, json!({"target": {"environment": "staging"}})));
    assert!(!fires(w, json!({})));
    let w = "{signals.data_classification: [pii, regulated]}";
    assert!(fires(w, json!({"signals": {"data_classification": "regulated"}})));
    assert!(!fires(
        w,
        json!({"signals": {"data_classification": "confidential"}})
    ));
    assert!(fires(
        "{signals.audience: external}",
        json!({"signals": {"audience": "external"}})
    ));
}

#[test]
fn present_true_and_false() {
    let yes = "{signals.destination: {present: true}}";
    let no = "{signals.destination: {present: false}}";
    assert!(fires(yes, json!({"signals": {"destination": "s3://x"}})));
    assert!(!fires(no, json!({"signals": {"destination": "s3://x"}})));
    for absent in [
        json!({}),
        json!({"signals": {}}),
        json!({"signals": {"destination": ""}}),
        json!({"signals": {"destination": "   "}}),
    ] {
        assert!(!fires(yes, absent.clone()), "{absent}");
        assert!(fires(no, absent.clone()), "{absent}");
    }
    let yes = "{signals.permissions: {present: true}}";
    let no = "{signals.permissions: {present: false}}";
    assert!(fires(yes, json!({"signals": {"permissions": ["a"]}})));
    assert!(
        !fires(yes, json!({"signals": {"permissions": []}})),
        "an empty list is absent"
    );
    assert!(fires(no, json!({"signals": {"permissions": []}})));
    assert!(fires(no, json!({})));
    // Present works on every type.
    assert!(fires(
        "{signals.amount: {present: true}}",
        json!({"signals": {"amount": "0"}})
    ));
    assert!(fires(
        "{signals.reversible: {present: true}}",
        json!({"signals": {"reversible": false}})
    ));
    assert!(fires(
        "{signals.deadline: {present: true}}",
        json!({"signals": {"deadline": "2026-01-01T00:00:00Z"}})
    ));
    assert!(fires(
        "{target.environment: {present: false}}",
        json!({"target": {"environment": ""}})
    ));
    assert!(fires("{reason: {present: false}}", json!({"reason": ""})));
}

#[test]
fn decimal_comparisons_at_their_boundaries() {
    let cases: &[(&str, &[(&str, bool)])] = &[
        (
            "{signals.amount: {above: 100}}",
            &[
                ("99.99", false),
                ("100", false),
                ("100.00", false),
                ("100.01", true),
            ],
        ),
        (
            "{signals.amount: {at_least: 100}}",
            &[
                ("99.99", false),
                ("100", true),
                ("100.000", true),
                ("100.01", true),
            ],
        ),
        (
            "{signals.amount: {below: 100}}",
            &[
                ("99.99", true),
                ("100", false),
                ("100.00", false),
                ("100.01", false),
            ],
        ),
        (
            "{signals.amount: {at_most: 100}}",
            &[
                ("99.99", true),
                ("100", true),
                ("100.00", true),
                ("100.01", false),
            ],
        ),
        (
            "{signals.amount: {above: 99.995}}",
            &[
                ("99.99", false),
                ("99.995", false),
                ("99.996", true),
                ("100", true),
            ],
        ),
        (
            "{signals.amount: {above: 10, at_most: 20}}",
            &[("10", false), ("10.01", true), ("20", true), ("20.01", false)],
        ),
        (
            "{signals.amount: {above: \"100\"}}",
            &[("100", false), ("100.01", true)],
        ),
        (
            "{signals.confidence: {below: 0.5}}",
            &[
                ("0.49", true),
                ("0.499999", true),
                ("0.5", false),
                ("0.50", false),
                ("0", true),
            ],
        ),
        (
            "{signals.confidence: {at_least: 0.5}}",
            &[("0.49", false), ("0.5", true), ("1", true)],
        ),
    ];
    for (when, values) in cases {
        let field = if when.contains("confidence") {
            "confidence"
        } else {
            "amount"
        };
        for (value, want) in *values {
            assert_eq!(
                fires(when, json!({"signals": {field: value}})),
                *want,
                "{when} with {value}"
            );
        }
        assert!(!fires(when, json!({})), "{when}: absent never compares");
    }
}

#[test]
fn count_comparisons() {
    let w = "{signals.recipient_count: {at_least: 1000}}";
    assert!(fires(w, json!({"signals": {"recipient_count": 1000}})));
    assert!(!fires(w, json!({"signals": {"recipient_count": 999}})));
    assert!(!fires(w, json!({})));
    assert!(fires(
        "{signals.recipient_count: {below: 1}}",
        json!({"signals": {"recipient_count": 0}})
    ));
}

#[test]
fn booleans() {
    let f = "{signals.reversible: false}";
    let t = "{signals.reversible: true}";
    assert!(fires(f, json!({"signals": {"reversible": false}})));
    assert!(!fires(f, json!({"signals": {"reversible": true}})));
    assert!(!fires(f, json!({})), "absent reversible never matches false");
    assert!(!fires(f, json!({"signals": {}})));
    assert!(fires(t, json!({"signals": {"reversible": true}})));
    assert!(!fires(t, json!({"signals": {"reversible": false}})));
    assert!(!fires(t, json!({})));
    // `not` of a boolean test does match absent, as written.
    assert!(fires("{not: {signals.reversible: true}}", json!({})));
}

#[test]
fn attributes() {
    let w = "{attributes.team: growth}";
    assert!(fires(w, json!({"attributes": {"team": "growth"}})));
    assert!(!fires(w, json!({"attributes": {"team": "platform"}})));
    assert!(!fires(w, json!({"attributes": {"squad": "growth"}})));
    assert!(!fires(w, json!({})));
    assert!(fires(
        "{attributes.flow: checkout.*}",
        json!({"attributes": {"flow": "checkout.eu"}})
    ));
    assert!(fires(
        "{attributes.team: {present: false}}",
        json!({"attributes": {"other": "x"}})
    ));
    // A key with dots in it.
    assert!(fires("{attributes.a.b: c}", json!({"attributes": {"a.b": "c"}})));
}

#[test]
fn enrichment_fields() {
    let w = "{enrichment.accounts.tier: enterprise}";
    let mut e = Enrichment::new();
    e.insert(
        "accounts".into(),
        std::sync::Arc::new(BTreeMap::from([("tier".to_string(), "enterprise".to_string())])),
    );
    assert!(fires_with(w, json!({}), &e));
    e.insert(
        "accounts".into(),
        std::sync::Arc::new(BTreeMap::from([("tier".to_string(), "free".to_string())])),
    );
    assert!(!fires_with(w, json!({}), &e));
    assert!(
        !fires_with(w, json!({}), &Enrichment::new()),
        "no record, no match"
    );
    assert!(fires_with(
        "{enrichment.accounts.tier: {present: false}}",
        json!({}),
        &Enrichment::new()
    ));

    // Through the real join: the table is keyed by target.account_id.
    let m = one_rule(w);
    let dir = Directory::default();
    dir.upsert(
        "accounts",
        "acct-1",
        BTreeMap::from([("tier".to_string(), "enterprise".to_string())]),
    );
    let hit = action(json!({"target": {"account_id": "acct-1"}}));
    assert_eq!(lanes_with(&m, &hit, &enrich(&m, &hit, &dir)), ["a"]);
    let miss = action(json!({"target": {"account_id": "acct-2"}}));
    assert!(lanes_with(&m, &miss, &enrich(&m, &miss, &dir)).is_empty());
    let keyless = action(json!({}));
    assert!(enrich(&m, &keyless, &dir).is_empty());
}

#[test]
fn combinators() {
    // A mapping with several tests is `all`.
    let w = "{kind: a.b, signals.audience: external}";
    assert!(fires(
        w,
        json!({"kind": "a.b", "signals": {"audience": "external"}})
    ));
    assert!(!fires(w, json!({"kind": "a.b"})));
    assert!(!fires(w, json!({"signals": {"audience": "external"}})));

    let w = "{any: [{kind: a.b}, {signals.audience: external}]}";
    assert!(fires(w, json!({"kind": "a.b"})));
    assert!(fires(w, json!({"signals": {"audience": "external"}})));
    assert!(!fires(w, json!({"kind": "c.d"})));

    let w = "{all: [{kind: a.*}, {signals.amount: {above: 5}}]}";
    assert!(fires(w, json!({"kind": "a.b", "signals": {"amount": "6"}})));
    assert!(!fires(w, json!({"kind": "a.b", "signals": {"amount": "5"}})));

    let w = "{not: {kind: a.*}}";
    assert!(fires(w, json!({"kind": "b.c"})));
    assert!(!fires(w, json!({"kind": "a.c"})));

    let w = "{kind: x.y, not: {any: [{target.environment: production}, {signals.reversible: false}]}}";
    assert!(fires(
        w,
        json!({"kind": "x.y", "target": {"environment": "staging"}})
    ));
    assert!(!fires(
        w,
        json!({"kind": "x.y", "target": {"environment": "production"}})
    ));
    assert!(!fires(
        w,
        json!({"kind": "x.y", "signals": {"reversible": false}})
    ));
    assert!(!fires(w, json!({"kind": "z.y"})));
}

#[test]
fn only_when_no_other_lane() {
    let text = "\
lanes:
  a: {sla: 10m, owner: a-owner, roster: [ann]}
  b: {sla: 20m, owner: b-owner, roster: [ben]}
  m: {sla: 1h, owner: boss, roster: [bea]}
rules:
  - {name: fallback, lane: m, only_when_no_other_lane: true, when: {attributes.unsure: yes}}
  - {name: to-a, lane: a, when: {kind: a.*}}
  - {name: to-m, lane: m, when: {kind: m.*}}
  - {name: fallback-b, lane: b, only_when_no_other_lane: true, when: {attributes.b: yes}}
";
    let m = Matrix::parse(text, "inline.yaml").unwrap();
    let l = |v: Value| lanes_of(&m, &action(v));
    let r = |v: Value| rules_of(&m, &action(v));
    assert_eq!(l(json!({"attributes": {"unsure": "yes"}})), ["m"]);
    assert_eq!(l(json!({"kind": "a.x", "attributes": {"unsure": "yes"}})), ["a"]);
    assert_eq!(
        r(json!({"kind": "a.x", "attributes": {"unsure": "yes"}})),
        ["to-a"]
    );
    // Its own lane firing does not block it.
    assert_eq!(
        r(json!({"kind": "m.x", "attributes": {"unsure": "yes"}})),
        ["fallback", "to-m"],
        "matrix order"
    );
    // Two fallbacks do not block each other (judged against primary rules only).
    assert_eq!(
        l(json!({"attributes": {"unsure": "yes", "b": "yes"}})),
        ["b", "m"]
    );
    assert_eq!(
        l(json!({"kind": "a.x", "attributes": {"unsure": "yes", "b": "yes"}})),
        ["a"]
    );
}

// -------------------------------------------------------------- packets ----
//
// Packets are checked in their serialized JSON form: that is the contract
// lane consumers read (DESIGN.md), whatever the Rust representation.

fn packet_input<'a>(m: &'a Matrix, a: &'a AgentAction, e: &'a Enrichment, r: &'a Routing) -> PacketInput<'a> {
    PacketInput {
        matrix: m,
        action: a,
        enrichment: e,
        routing: r,
        decisions_topic: "approvals.decisions",
        routed_at: time("2026-01-01T00:00:05Z"),
    }
}

/// The JSON packet of every lane the action reaches, by lane name.
fn lane_packets(m: &Matrix, a: &AgentAction, e: &Enrichment) -> BTreeMap<String, Value> {
    let r = route(m, a, e);
    let input = packet_input(m, a, e, &r);
    r.lanes
        .iter()
        .map(|hit| {
            let p = packet::for_lane(&input, hit);
            assert!(p.review);
            assert_eq!(p.escalation_level, Some(0));
            (m.lanes[hit.lane].name.clone(), serde_json::to_value(&p).unwrap())
        })
        .collect()
}

fn due(p: &Value) -> DateTime<Utc> {
    time(p["sla_due"].as_str().expect("sla_due is a timestamp"))
}

#[test]
fn finance_packet_carries_its_context() {
    let m = default_matrix();
    let a = action(json!({
        "action_id": "a-77",
        "kind": "refund.issue",
        "fleet": "support",
        "tenant": "acme",
        "payload": "Refunded!",
        "target": {"account_id": "acct-7"},
        "signals": {"amount": "300.50", "currency": "EUR", "audience": "external", "data_classification": "pii"}
    }));
    let mut e = Enrichment::new();
    e.insert(
        "accounts".into(),
        std::sync::Arc::new(BTreeMap::from([
            ("name".to_string(), "Initech".to_string()),
            ("tier".to_string(), "enterprise".to_string()),
        ])),
    );
    let packets = lane_packets(m, &a, &e);
    assert_eq!(packets.keys().collect::<Vec<_>>(), ["finance", "security"]);
    let p = &packets["finance"];
    assert_eq!(p["action_id"], json!("a-77"));
    assert_eq!(p["review"], json!(true));
    assert_eq!(p["lane"], json!("finance"));
    assert_eq!(p["review_lanes"], json!(["security", "finance"]));
    assert_eq!(
        p["rules"],
        json!(["refund-over-threshold"]),
        "only this lane's rules"
    );
    assert_eq!(packets["security"]["rules"], json!(["sensitive-data-leaving"]));
    assert_eq!(p["escalation_level"], json!(0));
    assert_eq!(p["assignee"], json!("finance-approver"));
    let ctx = &p["context"];
    assert_eq!(ctx["amount"], json!("300.50"), "money stays an exact string");
    assert_eq!(ctx["account"], json!("Initech"), "the first present source wins");
    assert_eq!(ctx["account_tier"], json!("enterprise"));
    assert_eq!(ctx["currency"], json!("EUR"));
    assert!(
        ctx["policy_threshold"].as_str().unwrap().starts_with("100 "),
        "{ctx}"
    );
    assert!(ctx.get("impact").is_none());
    assert_eq!(p["missing_context"], json!(["impact"]));
    assert_eq!(due(p), time("2026-01-01T02:00:00Z"));
    assert_eq!(due(&packets["security"]), time("2026-01-01T00:30:00Z"));
    assert_eq!(p["matrix_version"], json!(m.version));
    assert_eq!(
        time(p["routed_at"].as_str().unwrap()),
        time("2026-01-01T00:00:05Z")
    );
    assert_eq!(
        time(p["occurred_at"].as_str().unwrap()),
        time("2026-01-01T00:00:00Z")
    );
    assert_eq!(p["kind"], json!("refund.issue"));
    assert_eq!(p["summary"], json!("something"));
    assert_eq!(p["agent_id"], json!("agent"));
    assert_eq!(p["fleet"], json!("support"));
    assert_eq!(p["tenant"], json!("acme"));
    assert_eq!(p["payload"], json!("Refunded!"));
    assert_eq!(p["target"]["account_id"], json!("acct-7"));
    assert_eq!(p["enrichment"]["accounts"]["name"], json!("Initech"));
    let decide = &p["decide"];
    assert_eq!(decide["topic"], json!("approvals.decisions"));
    assert_eq!(decide["lane"], json!("finance"));
    assert_eq!(decide["roster"], json!(["fran", "fatima"]));
    assert_eq!(decide["verdicts"], json!(["approve", "reject", "needs_context"]));
    for f in ["action_id", "lane", "verdict", "approver", "decided_at"] {
        assert!(
            decide["fields"].as_array().unwrap().contains(&json!(f)),
            "{f}: {decide}"
        );
    }

    // Without the directory record, the account falls back to the account id.
    let packets = lane_packets(m, &a, &Enrichment::new());
    assert_eq!(packets["finance"]["context"]["account"], json!("acct-7"));
    assert!(packets["finance"]["context"].get("account_tier").is_none());
}

#[test]
fn packet_context_matches_packet_context_fn() {
    let m = default_matrix();
    let a = action(
        json!({"kind": "data.share", "reason": "audit", "signals": {"rollback_path": "undo", "permissions": ["p"]}}),
    );
    let e = Enrichment::new();
    let lane = &m.lanes[m.lane("security").unwrap()];
    let (present, missing) = packet::context(lane, &a, &e);
    let missing: Vec<String> = missing.iter().map(|c| c.to_string()).collect();
    assert_eq!(missing, strs(&["scope", "destination"]));
    let keys: Vec<String> = present.keys().map(|k| k.to_string()).collect();
    // The matrix's order: required fields first, then optional ones.
    assert_eq!(keys, strs(&["reason", "retention_or_rollback", "permissions"]));
    let p = &lane_packets(m, &a, &e)["security"];
    assert_eq!(p["missing_context"], json!(missing));
    assert_eq!(p["context"], serde_json::to_value(&present).unwrap());
}

#[test]
fn missing_context_lists_absent_required_fields_in_order() {
    let m = default_matrix();
    let e = Enrichment::new();
    let p = &lane_packets(m, &action(json!({"kind": "data.share"})), &e)["security"];
    assert_eq!(
        p["missing_context"],
        json!(["scope", "destination", "reason", "retention_or_rollback"])
    );
    assert_eq!(p["context"], json!({}));

    let a = action(
        json!({"kind": "data.share", "reason": "audit", "signals": {"rollback_path": "undo", "permissions": ["p"], "recipient_count": 4}}),
    );
    let p = &lane_packets(m, &a, &e)["security"];
    assert_eq!(p["missing_context"], json!(["scope", "destination"]));
    assert_eq!(p["context"]["reason"], json!("audit"));
    assert_eq!(p["context"]["retention_or_rollback"], json!("undo"));
    assert_eq!(p["context"]["permissions"], json!(["p"]));

    // Counts stay numbers, booleans stay booleans.
    let a = action(json!({"kind": "email.send", "signals": {"audience": "external", "recipient_count": 4}}));
    assert_eq!(
        lane_packets(m, &a, &e)["customer"]["context"]["recipient_count"],
        json!(4)
    );
    let a = action(
        json!({"kind": "db.migrate", "target": {"environment": "production"}, "signals": {"reversible": false}}),
    );
    assert_eq!(
        lane_packets(m, &a, &e)["engineering"]["context"]["reversible"],
        json!(false)
    );
}

#[test]
fn sla_due_is_occurred_at_plus_the_lane_sla() {
    let m = default_matrix();
    let a = action(json!({"occurred_at": "2026-03-01T10:00:00Z"}));
    for (lane, minutes) in [
        ("security", 30),
        ("finance", 120),
        ("engineering", 15),
        ("customer", 15),
        ("manager", 240),
    ] {
        let sla = m.lanes[m.lane(lane).unwrap()].sla;
        assert_eq!(
            packet::sla_due(&a, sla),
            time("2026-03-01T10:00:00Z") + TimeDelta::minutes(minutes),
            "{lane}"
        );
    }
}

#[test]
fn deadline_tightens_but_never_loosens_the_sla() {
    let m = default_matrix();
    let e = Enrichment::new();
    let base = json!({"kind": "deploy.release", "target": {"environment": "production"}});
    let with_deadline = |d: &str| {
        let mut v = base.clone();
        v["signals"] = json!({"deadline": d});
        action(v)
    };
    // Engineering: 15 minutes.
    let p = &lane_packets(m, &with_deadline("2026-01-01T00:10:00Z"), &e)["engineering"];
    assert_eq!(due(p), time("2026-01-01T00:10:00Z"));
    assert_eq!(p["context"]["timing"], json!("2026-01-01T00:10:00Z"));

    let p = &lane_packets(m, &with_deadline("2026-01-01T05:00:00Z"), &e)["engineering"];
    assert_eq!(
        due(p),
        time("2026-01-01T00:15:00Z"),
        "a later deadline never loosens"
    );

    let sla = m.lanes[m.lane("engineering").unwrap()].sla;
    assert_eq!(
        packet::sla_due(&with_deadline("2026-01-01T00:15:00Z"), sla),
        time("2026-01-01T00:15:00Z")
    );
    assert_eq!(
        packet::sla_due(&with_deadline("2025-12-31T23:00:00Z"), sla),
        time("2025-12-31T23:00:00Z"),
        "a deadline already past is still the deadline"
    );

    let p = &lane_packets(m, &action(base.clone()), &e)["engineering"];
    assert_eq!(due(p), time("2026-01-01T00:15:00Z"));

    // One deadline, several lanes: each is tightened only if it is earlier.
    let a = action(
        json!({"kind": "role.change", "target": {"environment": "production"}, "signals": {"reversible": false, "deadline": "2026-01-01T00:20:00Z"}}),
    );
    let packets = lane_packets(m, &a, &e);
    assert_eq!(due(&packets["security"]), time("2026-01-01T00:20:00Z"));
    assert_eq!(due(&packets["engineering"]), time("2026-01-01T00:15:00Z"));
}

#[test]
fn packet_serializes_with_the_contract_field_names() {
    let m = default_matrix();
    let a = action(json!({"kind": "email.send", "payload": "Hi", "signals": {"audience": "external"}}));
    let p = &lane_packets(m, &a, &Enrichment::new())["customer"];
    for key in [
        "action_id",
        "review",
        "lane",
        "review_lanes",
        "rules",
        "escalation_level",
        "assignee",
        "sla_due",
        "context",
        "missing_context",
        "summary",
        "kind",
        "agent_id",
        "target",
        "payload",
        "enrichment",
        "matrix_version",
        "routed_at",
        "decide",
    ] {
        assert!(p.get(key).is_some(), "{key} missing from {p}");
    }
    assert_eq!(p["lane"], json!("customer"));
    assert_eq!(p["assignee"], json!("customer-owner"));
    assert_eq!(p["missing_context"], json!(["promises", "account", "deadline"]));
    assert_eq!(p["context"]["exact_copy"], json!("Hi"));
    assert_eq!(p["context"]["audience"], json!("external"));
}

#[test]
fn allowed_packet_has_no_lane() {
    let m = default_matrix();
    let e = Enrichment::new();
    let a = action(json!({"action_id": "a-ok", "kind": "document.draft", "signals": {"confidence": 0.9}}));
    let r = route(m, &a, &e);
    assert!(!r.review());
    let p = packet::allowed(&packet_input(m, &a, &e, &r));
    assert!(!p.review);
    assert!(p.lane.is_none());
    assert_eq!(p.escalation_level, None);
    assert_eq!(p.sla_due, None);
    let v = serde_json::to_value(&p).unwrap();
    let obj = v.as_object().unwrap();
    assert!(!obj.contains_key("lane"), "{v}");
    for absent in ["escalation_level", "assignee", "sla_due", "decide"] {
        assert!(!obj.contains_key(absent), "{absent} in {v}");
    }
    assert_eq!(v["review"], json!(false));
    assert_eq!(v["action_id"], json!("a-ok"));
    assert_eq!(v["review_lanes"], json!([]));
    assert_eq!(v["rules"], json!([]));
    assert_eq!(v["context"], json!({}));
    assert_eq!(v["missing_context"], json!([]));
    assert_eq!(v["matrix_version"], json!(m.version));
    assert_eq!(v["kind"], json!("document.draft"));
}

// ----------------------------------------------------------- properties ----

const KINDS: &[&str] = &[
    "data.export",
    "data.share",
    "data.delete",
    "data.read",
    "permission.grant",
    "permission.revoke",
    "access.request",
    "role.change",
    "refund.issue",
    "credit.issue",
    "pricing.exception",
    "discount.apply",
    "payment.send",
    "invoice.adjust",
    "budget.exceed",
    "deploy.release",
    "deploy.rollback",
    "config.change",
    "infra.change",
    "db.migrate",
    "feature_flag.toggle",
    "message.send",
    "email.send",
    "post.publish",
    "ticket.reply",
    "deadline.extend",
    "priority.change",
    "scope.exception",
    "document.draft",
    "ticket.update",
    "search.run",
    "report.generate",
    // Near misses of the patterns.
    "deploy.canary",
    "permission.audit",
    "permission",
    "deploy",
];

fn arb_kind() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(KINDS).prop_map(String::from),
        1 => "[a-z]{1,8}(\\.[a-z_]{1,8}){0,2}",
    ]
}

fn arb_amount() -> impl Strategy<Value = Option<Decimal>> {
    proptest::option::of(prop_oneof![
        (9_990i64..=10_010).prop_map(|c| Decimal::new(c, 2)),
        (0i64..1_000_000).prop_map(|c| Decimal::new(c, 2)),
    ])
}

fn arb_confidence() -> impl Strategy<Value = Option<Decimal>> {
    proptest::option::of(prop_oneof![
        (45i64..=55).prop_map(|c| Decimal::new(c, 2)),
        (0i64..=100).prop_map(|c| Decimal::new(c, 2)),
    ])
}

fn arb_action() -> impl Strategy<Value = AgentAction<'static>> {
    (
        arb_kind(),
        proptest::option::of(select(
            &[
                Environment::Production,
                Environment::Staging,
                Environment::Development,
            ][..],
        )),
        proptest::option::of(select(
            &[
                DataClassification::Public,
                DataClassification::Internal,
                DataClassification::Confidential,
                DataClassification::Pii,
                DataClassification::Regulated,
            ][..],
        )),
        proptest::option::of(select(&[Audience::Internal, Audience::External][..])),
        arb_amount(),
        arb_confidence(),
        proptest::option::of(any::<bool>()),
        proptest::option::of(select(&["s3://bucket", "partner-sftp"][..]).prop_map(String::from)),
        proptest::collection::vec(
            select(&["repo:write", "billing:read", "admin"][..]).prop_map(String::from),
            0..3,
        ),
        proptest::collection::btree_map("[a-z]{1,5}", "[a-z]{0,5}", 0..3),
    )
        .prop_map(
            |(
                kind,
                env,
                class,
                audience,
                amount,
                confidence,
                reversible,
                destination,
                permissions,
                attributes,
            )| {
                let mut a = action(json!({}));
                a.kind = kind.into();
                a.target.environment = env;
                a.signals.data_classification = class;
                a.signals.audience = audience;
                a.signals.amount = amount;
                a.signals.confidence = confidence;
                a.signals.reversible = reversible;
                a.signals.destination = destination.map(Into::into);
                a.signals.permissions = permissions.into_iter().map(Into::into).collect();
                a.attributes = attributes
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect();
                a
            },
        )
}

/// Lane names and, per lane, the set of rule names.
fn outcome(m: &Matrix, r: &Routing) -> BTreeMap<String, BTreeSet<String>> {
    r.lanes
        .iter()
        .map(|h| {
            (
                m.lanes[h.lane].name.clone(),
                h.rules.iter().map(|id| m.rules[*id].name.clone()).collect(),
            )
        })
        .collect()
}

/// DESIGN.md's table of the default policy, written independently of the matrix.
fn design_lanes(a: &AgentAction) -> Vec<&'static str> {
    let k: &str = &a.kind;
    let s = &a.signals;
    let prod = a.target.environment == Some(Environment::Production);
    let sensitive = matches!(
        s.data_classification,
        Some(DataClassification::Confidential | DataClassification::Pii | DataClassification::Regulated)
    );
    let leaves = s.destination.is_some() || s.audience == Some(Audience::External);
    let over_100 = s.amount.is_some_and(|x| x > Decimal::ONE_HUNDRED);
    let security = ["data.export", "data.share", "data.delete"].contains(&k)
        || (sensitive && leaves)
        || k.starts_with("permission.")
        || ["access.request", "role.change"].contains(&k)
        || !s.permissions.is_empty();
    let finance = ([
        "refund.issue",
        "credit.issue",
        "discount.apply",
        "payment.send",
        "invoice.adjust",
    ]
    .contains(&k)
        && over_100)
        || k == "pricing.exception"
        || k == "budget.exceed";
    // Production, and either a change kind or irreversible.
    let change = k.starts_with("deploy.")
        || [
            "config.change",
            "infra.change",
            "db.migrate",
            "feature_flag.toggle",
        ]
        .contains(&k);
    let engineering = prod && (change || s.reversible == Some(false));
    let customer = ["message.send", "email.send", "post.publish", "ticket.reply"].contains(&k)
        && s.audience == Some(Audience::External);
    let others = security || finance || engineering || customer;
    let manager = ["deadline.extend", "priority.change", "scope.exception"].contains(&k)
        || (!others && s.confidence.is_some_and(|c| c < Decimal::new(5, 1)));
    [
        ("security", security),
        ("finance", finance),
        ("engineering", engineering),
        ("customer", customer),
        ("manager", manager),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(name, _)| name)
    .collect()
}

/// Attribute keys the matrix's rules read.
fn attribute_keys_read(m: &Matrix) -> BTreeSet<String> {
    m.rules
        .iter()
        .flat_map(|r| r.when.fields())
        .filter_map(|f| match f {
            Field::Attribute(k) => Some(k.clone()),
            _ => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn routing_is_deterministic(a in arb_action()) {
        let m = default_matrix();
        let e = Enrichment::new();
        let first = route(m, &a, &e);
        let second = route(m, &a.clone(), &e);
        prop_assert_eq!(&first, &second);
        // And the rules within each lane come in matrix order.
        for hit in &first.lanes {
            prop_assert!(hit.rules.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn default_matrix_matches_the_design_table(a in arb_action()) {
        let m = default_matrix();
        let got = route(m, &a, &Enrichment::new());
        prop_assert_eq!(got.lane_names(m), design_lanes(&a), "{:?}", a);
    }

    #[test]
    fn unread_attributes_never_change_the_lanes(
        a in arb_action(),
        key in "[a-z]{1,10}",
        value in "[a-z0-9 ]{0,10}",
    ) {
        let m = default_matrix();
        let key = format!("x_{key}");
        prop_assume!(!attribute_keys_read(m).contains(&key));
        let e = Enrichment::new();
        let before = route(m, &a, &e);
        let mut b = a.clone();
        b.attributes.insert(key.into(), value.into());
        let after = route(m, &b, &e);
        prop_assert_eq!(before, after);
    }

    #[test]
    fn low_confidence_fires_only_when_no_other_lane_did(a in arb_action()) {
        let m = default_matrix();
        let e = Enrichment::new();
        let routing = route(m, &a, &e);
        let names = routing.rule_names(m);
        let low_fired = names.contains(&"low-confidence");

        // The routing the primary rules alone give.
        let mut primary_only = m.clone();
        primary_only.rules.retain(|r| !r.only_when_no_other_lane);
        let primary_lanes = route(&primary_only, &a, &e).lane_names(&primary_only).into_iter().map(String::from).collect::<Vec<_>>();
        let is_low = a.signals.confidence.is_some_and(|c| c < Decimal::new(5, 1));

        if low_fired {
            prop_assert_eq!(routing.lane_names(m), vec!["manager"]);
            prop_assert!(primary_lanes.iter().all(|l| l == "manager"), "{:?}", primary_lanes);
        }
        prop_assert_eq!(low_fired, is_low && primary_lanes.iter().all(|l| l == "manager"));
        if !low_fired {
            prop_assert_eq!(routing.lane_names(m), primary_lanes.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }

    #[test]
    fn permuting_rules_never_changes_the_outcome(
        a in arb_action(),
        order in Just((0..default_matrix().rules.len()).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let m = default_matrix();
        let mut shuffled = m.clone();
        shuffled.rules = order.iter().map(|i| m.rules[*i].clone()).collect();
        let e = Enrichment::new();
        let before = route(m, &a, &e);
        let after = route(&shuffled, &a, &e);
        prop_assert_eq!(before.lane_names(m), after.lane_names(&shuffled));
        prop_assert_eq!(outcome(m, &before), outcome(&shuffled, &after));
    }
}
