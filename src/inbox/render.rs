//! How an inbox entry reads: a block of text for a person, or the packet as
//! one JSON line with an `inbox` member for scripts. Pure functions of the
//! entry and the time now.
//!
//! Everything an agent wrote (summary, payload, context) is shown with
//! control characters escaped, so no packet can move the cursor, recolour
//! or hide text on the approver's terminal.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};

use super::state::{Item, Status};
use crate::packet::{ContextValue, OwnedApprovalRequest};

/// The command line that answers `packet` (`--approve`; the person swaps in
/// `--reject` or `--needs-context`). `--by` names the approver when the
/// step's roster leaves no doubt, `APPROVER` otherwise.
pub fn decide_command(packet: &OwnedApprovalRequest) -> String {
    let lane = packet
        .decide
        .as_ref()
        .map(|d| d.lane.as_ref())
        .or(packet.lane.as_deref())
        .unwrap_or_default();
    let mut command = format!(
        "switchboard decide {} --lane {} --approve --by {}",
        shell_word(&packet.action_id),
        shell_word(lane),
        shell_word(approver(packet).unwrap_or("APPROVER"))
    );
    if let Some(decide) = &packet.decide
        && decide.topic != crate::topics::DECISIONS
    {
        let _ = write!(command, " --decisions-topic {}", shell_word(&decide.topic));
    }
    command
}

/// Who answers this step, when that is one person: the assignee when the
/// roster names them, or the roster's only member.
fn approver(packet: &OwnedApprovalRequest) -> Option<&str> {
    let roster = packet
        .decide
        .as_ref()
        .map(|d| d.roster.as_ref())
        .unwrap_or_default();
    match (packet.assignee.as_deref(), roster) {
        (Some(assignee), roster) if roster.iter().any(|p| p == assignee) => Some(assignee),
        (_, [only]) => Some(only.as_str()),
        _ => None,
    }
}

/// A word the shell reads back unchanged: as it is when it is plain,
/// single-quoted otherwise.
pub fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.,:/@%+=".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// One line of text with every control character escaped.
fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// "in 1h 12m", "overdue by 3m 5s", "now".
pub fn relative(due: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let delta = due - now;
    if delta.num_seconds() == 0 {
        return "due now".to_string();
    }
    let span = span(delta.abs());
    if delta > TimeDelta::zero() {
        format!("in {span}")
    } else {
        format!("overdue by {span}")
    }
}

/// The two largest units of a duration: "2d 3h", "1h 12m", "5m 3s", "42s"
/// (a zero second unit is left out: "1h", not "1h 0m").
fn span(delta: TimeDelta) -> String {
    const UNITS: [(i64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let secs = delta.num_seconds().max(0);
    let Some(first) = UNITS.iter().position(|(size, _)| secs >= *size) else {
        return "0s".to_string();
    };
    let (size, name) = UNITS[first];
    let mut out = format!("{}{name}", secs / size);
    if let Some((next, next_name)) = UNITS.get(first + 1) {
        let n = (secs % size) / next;
        if n > 0 {
            let _ = write!(out, " {n}{next_name}");
        }
    }
    out
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn context_value(value: &ContextValue<'_>) -> String {
    match value {
        ContextValue::Text(t) => clean(t),
        ContextValue::Count(n) => n.to_string(),
        ContextValue::Bool(b) => b.to_string(),
        ContextValue::List(items) => items.iter().map(|i| clean(i)).collect::<Vec<_>>().join(", "),
    }
}

/// What the status line says when the entry is no longer waiting.
fn status_line(status: &Status) -> Option<String> {
    Some(match status {
        Status::Waiting => return None,
        Status::Decided(v) => format!(
            "DECIDED: {} by {} at {}; other lanes still to decide",
            v.verdict.as_str(),
            clean(&v.approver),
            time(v.decided_at)
        ),
        Status::Escalated {
            level,
            assignee,
            topic,
        } => format!(
            "ESCALATED: now level {level}, {} on {}",
            clean(assignee),
            clean(topic)
        ),
        Status::Closed { outcome, closed_at } => {
            let label = serde_json::to_value(outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            match closed_at {
                Some(at) => format!("CLOSED: {label} at {}", time(*at)),
                None => format!("CLOSED: {label}"),
            }
        }
    })
}

/// A block of text for a person, ending with a blank line.
pub fn text(item: &Item<'_>, now: DateTime<Utc>) -> String {
    let p = item.packet;
    let mut out = String::new();
    let mut row = |label: &str, value: &str| {
        let _ = writeln!(out, "  {label:<10} {value}");
    };
    let lane = clean(&item.key.lane);
    let header = format!("{}  {}", clean(&p.action_id), clean(&p.summary));
    if let Some(status) = status_line(&item.status) {
        row("status", &status);
    }
    if p.reminder {
        let left = p
            .time_left_seconds
            .map(|s| format!(", {} left", span(TimeDelta::seconds(s.max(0)))))
            .unwrap_or_default();
        row("REMINDER", &format!("still waiting for a decision{left}"));
    }
    let others: Vec<String> = p
        .review_lanes
        .iter()
        .filter(|l| l.as_ref() != item.key.lane)
        .map(|l| clean(l))
        .collect();
    row(
        "lane",
        &if others.is_empty() {
            lane.clone()
        } else {
            format!("{lane} (also reviewed by {})", others.join(", "))
        },
    );
    row("kind", &clean(&p.kind));
    let mut agent = clean(&p.agent_id);
    let origin: Vec<String> = [("fleet", &p.fleet), ("tenant", &p.tenant)]
        .iter()
        .filter_map(|(name, v)| v.as_deref().map(|v| format!("{name} {}", clean(v))))
        .collect();
    if !origin.is_empty() {
        let _ = write!(agent, " ({})", origin.join(", "));
    }
    row("agent", &agent);
    let level = p.escalation_level.unwrap_or(0);
    let mut assigned = format!(
        "{}, escalation level {level}",
        clean(p.assignee.as_deref().unwrap_or("nobody named"))
    );
    if let Some(decide) = &p.decide
        && !decide.roster.is_empty()
    {
        let roster: Vec<String> = decide.roster.iter().map(|r| clean(r)).collect();
        let _ = write!(assigned, "; may decide: {}", roster.join(", "));
    }
    row("assigned", &assigned);
    row(
        "due",
        &match p.sla_due {
            Some(due) => format!("{} ({})", time(due), relative(due, now)),
            None => "no due time".to_string(),
        },
    );
    row(
        "rules",
        &p.rules.iter().map(|r| clean(r)).collect::<Vec<_>>().join(", "),
    );
    row(
        "missing",
        &if p.missing_context.is_empty() {
            "nothing".to_string()
        } else {
            p.missing_context
                .iter()
                .map(|m| clean(m))
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    if p.context.is_empty() {
        row("context", "none");
    }
    for (i, (name, value)) in p.context.0.iter().enumerate() {
        let line = format!("{}: {}", clean(name), context_value(value));
        row(if i == 0 { "context" } else { "" }, &line);
    }
    let target: Vec<String> = [
        ("system", p.target.system.as_deref()),
        ("resource", p.target.resource.as_deref()),
        ("account", p.target.account_id.as_deref()),
    ]
    .iter()
    .filter_map(|(name, v)| v.map(|v| format!("{name} {}", clean(v))))
    .chain(
        p.target
            .environment
            .and_then(|e| serde_json::to_value(e).ok())
            .and_then(|v| v.as_str().map(|e| format!("environment {e}"))),
    )
    .collect();
    if !target.is_empty() {
        row("target", &target.join(", "));
    }
    if let Some(reason) = &p.reason {
        row("reason", &clean(reason));
    }
    if let Some(payload) = &p.payload {
        for (i, line) in payload.lines().enumerate() {
            row(if i == 0 { "payload" } else { "" }, &format!("| {}", clean(line)));
        }
    }
    if item.status.is_waiting() {
        row("answer", &decide_command(p));
        row(
            "",
            "(or --reject / --needs-context instead of --approve; --comment TEXT to explain)",
        );
    }
    format!("{header}\n{out}\n")
}

/// Two lines for an entry shown before that no longer waits.
pub fn update(item: &Item<'_>) -> String {
    format!(
        "{}  {}\n  {:<10} {}\n  {:<10} {}\n\n",
        clean(&item.packet.action_id),
        clean(&item.packet.summary),
        "status",
        status_line(&item.status).unwrap_or_else(|| "waiting".to_string()),
        "lane",
        clean(&item.key.lane),
    )
}

/// The packet as one JSON line, with an `inbox` member: the status, the
/// seconds until due (negative when overdue) and the decide command line.
pub fn json(item: &Item<'_>, now: DateTime<Utc>) -> Result<String, serde_json::Error> {
    let mut value = serde_json::to_value(item.packet)?;
    let mut inbox = serde_json::json!({
        "status": item.status.label(),
        "decide_command": decide_command(item.packet),
    });
    if let Some(due) = item.packet.sla_due {
        inbox["due_in_seconds"] = (due - now).num_seconds().into();
    }
    match &item.status {
        Status::Waiting => {}
        Status::Decided(v) => inbox["verdict"] = serde_json::to_value(v)?,
        Status::Escalated {
            level,
            assignee,
            topic,
        } => {
            inbox["escalated"] = serde_json::json!({"level": level, "assignee": assignee, "topic": topic});
        }
        Status::Closed { outcome, closed_at } => {
            inbox["outcome"] = serde_json::to_value(outcome)?;
            if let Some(at) = closed_at {
                inbox["closed_at"] = serde_json::to_value(at)?;
            }
        }
    }
    if let Some(map) = value.as_object_mut() {
        map.insert("inbox".into(), inbox);
    }
    serde_json::to_string(&value)
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::decision::{LaneVerdict, OutcomeKind, Verdict};
    use crate::inbox::state::Key;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-03-01T{s}Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    fn refund() -> OwnedApprovalRequest {
        serde_json::from_value(serde_json::json!({
            "action_id": "refund-42", "review": true, "lane": "finance",
            "review_lanes": ["finance", "customer"], "rules": ["refund-over-threshold"],
            "escalation_level": 0, "assignee": "finance-approver",
            "sla_due": "2026-03-01T12:00:00Z",
            "context": {"amount": "250.00", "account": "acct-9", "recipients": 3},
            "missing_context": ["impact"],
            "summary": "Refund order 42\u{1b}[2K", "kind": "refund.issue", "agent_id": "billing-agent",
            "fleet": "billing", "target": {"account_id": "acct-9", "environment": "production"},
            "payload": "Refunded, sorry!\nSee you", "reason": "customer complaint",
            "occurred_at": "2026-03-01T10:00:00Z", "enrichment": {},
            "matrix_version": "sha256:x", "routed_at": "2026-03-01T10:00:00Z",
            "decide": {"topic": "approvals.decisions", "lane": "finance",
                "verdicts": ["approve", "reject", "needs_context"], "roster": ["fran"],
                "fields": ["action_id", "lane", "verdict", "approver", "comment", "decided_at"]},
        }))
        .unwrap()
    }

    fn key() -> Key {
        Key {
            action_id: "refund-42".into(),
            lane: "finance".into(),
        }
    }

    fn item<'a>(key: &'a Key, packet: &'a OwnedApprovalRequest, status: Status) -> Item<'a> {
        Item {
            key,
            packet,
            seq: 1,
            status,
        }
    }

    #[test]
    fn a_waiting_packet_reads_at_a_glance() {
        let (k, p) = (key(), refund());
        let text = text(&item(&k, &p, Status::Waiting), t("10:47:30"));
        for expected in [
            "refund-42  Refund order 42\\u{1b}[2K\n",
            "  lane       finance (also reviewed by customer)\n",
            "  kind       refund.issue\n",
            "  agent      billing-agent (fleet billing)\n",
            "  assigned   finance-approver, escalation level 0; may decide: fran\n",
            "  due        2026-03-01T12:00:00Z (in 1h 12m)\n",
            "  rules      refund-over-threshold\n",
            "  missing    impact\n",
            // (json! sorts keys; packets keep the matrix's order)
            "  context    account: acct-9\n             amount: 250.00\n             recipients: 3\n",
            "  target     account acct-9, environment production\n",
            "  reason     customer complaint\n",
            "  payload    | Refunded, sorry!\n             | See you\n",
            "  answer     switchboard decide refund-42 --lane finance --approve --by fran\n",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
        assert!(!text.contains('\u{1b}'), "control characters are escaped");
        assert!(!text.contains("status"), "{text}");
        assert!(!text.contains("REMINDER"), "{text}");
    }

    #[test]
    fn reminders_escalations_and_closed_entries_say_so() {
        let k = key();
        let mut p = refund();
        p.reminder = true;
        p.time_left_seconds = Some(95);
        p.escalation_level = Some(1);
        p.assignee = Some(Cow::Borrowed("lena"));
        if let Some(d) = p.decide.as_mut() {
            d.roster = Cow::Owned(vec!["fiona".into(), "lena".into()]);
        }
        let shown = text(&item(&k, &p, Status::Waiting), t("13:00:00"));
        assert!(
            shown.contains("  REMINDER   still waiting for a decision, 1m 35s left\n"),
            "{shown}"
        );
        assert!(
            shown.contains("lena, escalation level 1; may decide: fiona, lena"),
            "{shown}"
        );
        assert!(shown.contains("(overdue by 1h)"), "{shown}");
        assert!(shown.contains("--approve --by lena"), "{shown}");

        let closed = Status::Closed {
            outcome: OutcomeKind::NeedsContext,
            closed_at: Some(t("10:30:00")),
        };
        let shown = text(&item(&k, &p, closed.clone()), t("13:00:00"));
        assert!(
            shown.contains("  status     CLOSED: needs_context at 2026-03-01T10:30:00Z\n"),
            "{shown}"
        );
        assert!(
            !shown.contains("switchboard decide"),
            "nothing to answer: {shown}"
        );

        let decided = Status::Decided(LaneVerdict {
            verdict: Verdict::Approve,
            approver: "fran".into(),
            decided_at: t("10:20:00"),
            comment: None,
        });
        let shown = text(&item(&k, &p, decided), t("13:00:00"));
        assert!(shown.contains("DECIDED: approve by fran"), "{shown}");

        let line = json(&item(&k, &p, closed), t("13:00:00")).unwrap();
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["action_id"], "refund-42");
        assert_eq!(value["reminder"], true);
        assert_eq!(value["inbox"]["status"], "closed");
        assert_eq!(value["inbox"]["outcome"], "needs_context");
        assert_eq!(value["inbox"]["due_in_seconds"], -3600);
        // Still an ApprovalRequest to anyone who reads it as one.
        let back: OwnedApprovalRequest = serde_json::from_str(&line).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn the_decide_command_is_exact_and_safe_to_paste() {
        let mut p = refund();
        p.action_id = Cow::Borrowed("it's; rm -rf ~");
        if let Some(d) = p.decide.as_mut() {
            d.roster = Cow::Owned(vec!["fran".into(), "fatima".into()]);
            d.topic = Cow::Borrowed("team.decisions");
        }
        assert_eq!(
            decide_command(&p),
            r"switchboard decide 'it'\''s; rm -rf ~' --lane finance --approve --by APPROVER --decisions-topic team.decisions"
        );
    }

    #[test]
    fn spans_read_like_a_person_says_them() {
        let now = t("10:00:00");
        assert_eq!(relative(t("10:00:42"), now), "in 42s");
        assert_eq!(relative(t("10:05:03"), now), "in 5m 3s");
        assert_eq!(relative(t("11:00:00"), now), "in 1h");
        assert_eq!(relative(t("09:58:00"), now), "overdue by 2m");
        assert_eq!(relative(now, now), "due now");
        assert_eq!(span(TimeDelta::seconds(2 * 86_400 + 3 * 3600 + 59)), "2d 3h");
        assert_eq!(span(TimeDelta::seconds(3600 + 30)), "1h");
    }
}
