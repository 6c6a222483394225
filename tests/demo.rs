//! `switchboard demo`, run as a person would: nothing but the binary.

mod common;

use std::time::Duration;

use common::{Proc, default_matrix, switchboard_command};

/// The demo is done within 30 s and shows every lane, dead letters, a
/// decision accepted and one refused, a reminder, escalations, and every
/// kind of outcome.
#[test]
fn demo_shows_routing_decisions_escalations_and_outcomes() {
    let mut cmd = switchboard_command();
    cmd.arg("demo");
    let mut proc = Proc::spawn("switchboard-demo", cmd);
    proc.wait_success(Duration::from_secs(30));
    let out = proc.stdout();
    for lane in default_matrix().lanes.iter().map(|l| l.name.as_str()) {
        assert!(out.contains(lane), "the demo names lane {lane}:\n{out}");
    }
    let line = |needle: &str, also: &str| out.lines().any(|l| l.contains(needle) && l.contains(also));
    assert!(line("bad_json", "offset"), "a dead letter:\n{out}");
    assert!(
        line("demo-02-refund-over-threshold", "accepted"),
        "an accepted decision:\n{out}"
    );
    assert!(
        line("mallory", "REFUSED: not_on_roster"),
        "a refused decision:\n{out}"
    );
    assert!(
        line("demo-05-external-apology", "by lena"),
        "the escalated lead decides:\n{out}"
    );
    assert!(line("reminder to", "level 0"), "a reminder:\n{out}");
    assert!(line("SLA passed: level 1", "approvals."), "an escalation:\n{out}");
    assert!(
        line("SLA passed: level 2", "approvals.manager"),
        "a chain walked on:\n{out}"
    );
    for (id, outcome) in [
        ("demo-02-refund-over-threshold", "approved"),
        ("demo-03-small-refund", "approved"),
        ("demo-10-production-export-to-partner", "approved"),
        ("demo-07-deadline-extension", "rejected"),
        ("demo-08-low-confidence-draft", "needs_context"),
        ("demo-06-permission-grant", "expired"),
    ] {
        assert!(
            out.lines()
                .skip_while(|l| !l.starts_with("Outcomes"))
                .any(|l| l.contains(id) && l.contains(outcome)),
            "{id} ends {outcome}:\n{out}"
        );
    }
}
