//! What the demo prints: where each action went and why, the decisions and
//! what became of them, the reminders and escalations as the SLAs passed,
//! and the outcomes agents receive.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::changelog::ReadRecord;
use crate::dlq;
use crate::packet::OwnedApprovalRequest;

/// Everything the demo read back, by topic.
pub struct Seen<'a> {
    pub records: &'a [ReadRecord],
    pub dlq: &'a str,
    pub actions: &'a str,
    pub decisions: &'a str,
    pub outcomes: &'a str,
    pub allowed: &'a str,
}

impl Seen<'_> {
    fn packets(&self) -> impl Iterator<Item = (&ReadRecord, OwnedApprovalRequest)> {
        self.records
            .iter()
            .filter(|r| r.topic.starts_with("approvals.") || r.topic == self.allowed)
            .filter(|r| r.topic != self.decisions && r.topic != self.outcomes)
            .filter_map(|r| Some((r, serde_json::from_slice(r.payload.as_deref()?).ok()?)))
    }

    fn header<'r>(r: &'r ReadRecord, name: &str) -> std::borrow::Cow<'r, str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v))
            .unwrap_or_default()
    }

    fn dead(&self, source: &str) -> impl Iterator<Item = &ReadRecord> {
        self.records
            .iter()
            .filter(move |r| r.topic == self.dlq && Self::header(r, dlq::SOURCE_TOPIC) == source)
    }
}

/// Where each action went at level 0: lanes, rules, missing context.
pub fn routing(seen: &Seen<'_>, ids: &[String]) {
    println!("Routed (level-0 packets):");
    println!(
        "  {:<38} {:<22} {:<44} missing context",
        "action", "lanes", "rules"
    );
    println!("  {}", "-".repeat(128));
    for id in ids {
        let first: Vec<OwnedApprovalRequest> = seen
            .packets()
            .filter(|(r, p)| r.key.as_deref() == Some(id.as_bytes()) && !p.reminder)
            .filter(|(_, p)| p.escalation_level.unwrap_or(0) == 0)
            .map(|(_, p)| p)
            .collect();
        let review: Vec<&OwnedApprovalRequest> = first.iter().filter(|p| p.review).collect();
        let (lanes, rules, missing) = if review.is_empty() {
            ("(allowed)".to_string(), "-".to_string(), "-".to_string())
        } else {
            let lanes: Vec<&str> = review.iter().filter_map(|p| p.lane.as_deref()).collect();
            let rules: Vec<&str> = review
                .iter()
                .flat_map(|p| p.rules.iter().map(|r| r.as_ref()))
                .collect();
            let missing: Vec<String> = review
                .iter()
                .filter(|p| !p.missing_context.is_empty())
                .map(|p| {
                    let fields: Vec<&str> = p.missing_context.iter().map(|m| m.as_ref()).collect();
                    format!("{}: {}", p.lane.as_deref().unwrap_or("?"), fields.join(", "))
                })
                .collect();
            (lanes.join(", "), rules.join(", "), missing.join("; "))
        };
        println!("  {id:<38} {lanes:<22} {rules:<44} {missing}");
    }
    println!("\n  Dead letters (switchboard.dlq, from {}):", seen.actions);
    for r in seen.dead(seen.actions) {
        println!(
            "    offset {}: {} ({})",
            Seen::header(r, dlq::SOURCE_OFFSET),
            Seen::header(r, dlq::REASON),
            Seen::header(r, dlq::ERROR)
        );
    }
}

/// Each decision sent, and whether it was accepted or refused (refusals go
/// to the DLQ with their reason).
pub fn decisions(seen: &Seen<'_>, sent: &[(String, Vec<u8>)]) {
    println!("\nDecisions (approvals.decisions):");
    for (key, bytes) in sent {
        let decision: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
        let refused = seen
            .dead(seen.decisions)
            .find(|r| r.payload.as_deref() == Some(bytes.as_slice()));
        let result = match refused {
            Some(r) => format!(
                "REFUSED: {} ({})",
                Seen::header(r, dlq::REASON),
                Seen::header(r, dlq::ERROR)
            ),
            None => "accepted".to_string(),
        };
        println!(
            "  {key:<38} {:<12} {:<14} by {:<10} {result}",
            decision["lane"].as_str().unwrap_or("?"),
            decision["verdict"].as_str().unwrap_or("?"),
            decision["approver"].as_str().unwrap_or("?"),
        );
    }
}

/// Reminders and escalations in the order they were sent.
pub fn escalations(seen: &Seen<'_>, start: DateTime<Utc>) {
    println!("\nReminders and escalations (every SLA cut to seconds for the demo):");
    let mut later: Vec<(&ReadRecord, OwnedApprovalRequest)> = seen
        .packets()
        .filter(|(_, p)| p.reminder || p.escalation_level.unwrap_or(0) > 0)
        .collect();
    later.sort_by_key(|(_, p)| p.routed_at);
    for (r, p) in later {
        let at = (p.routed_at - start).num_milliseconds() as f64 / 1000.0;
        let lane = p.lane.as_deref().unwrap_or("?");
        let who = p.assignee.as_deref().unwrap_or("?");
        let level = p.escalation_level.unwrap_or(0);
        if p.reminder {
            let left = p
                .sla_due
                .map(|due| (due - p.routed_at).num_milliseconds() as f64 / 1000.0)
                .unwrap_or_default();
            println!(
                "  +{at:>5.1}s  {:<38} {lane:<12} reminder to {who} (level {level}, {left:.1} s left) on {}",
                p.action_id, r.topic
            );
        } else {
            println!(
                "  +{at:>5.1}s  {:<38} {lane:<12} SLA passed: level {level}, asks {who} on {}",
                p.action_id, r.topic
            );
        }
    }
}

/// The outcome of every action, as agents read it.
pub fn outcomes(seen: &Seen<'_>, ids: &[String]) {
    println!("\nOutcomes (approvals.outcomes; agents treat expired as rejected):");
    for id in ids {
        let outcome: Option<Value> = seen
            .records
            .iter()
            .filter(|r| r.topic == seen.outcomes && r.key.as_deref() == Some(id.as_bytes()))
            .filter_map(|r| serde_json::from_slice(r.payload.as_deref()?).ok())
            .next_back();
        let Some(o) = outcome else {
            println!("  {id:<38} (still pending)");
            continue;
        };
        let mut detail: Vec<String> = o["verdicts"]
            .as_object()
            .map(|v| {
                v.iter()
                    .map(|(lane, v)| {
                        format!(
                            "{lane}: {} by {}",
                            v["verdict"].as_str().unwrap_or("?"),
                            v["approver"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(lane) = o["expired_lane"].as_str() {
            detail.push(format!("the {lane} chain ran out"));
        }
        if detail.is_empty() {
            detail.push("no review needed".into());
        }
        println!(
            "  {id:<38} {:<14} {}",
            o["outcome"].as_str().unwrap_or("?"),
            detail.join("; ")
        );
    }
}
