//! switchboard routes AI-agent actions to the human approver who owns the
//! risk: authority tradeoffs go up, domain-risk decisions go sideways to the
//! specialist who owns that risk.
//!
//! The crate follows the data, one module per stage:
//!
//! * [`action`]: the validated AgentAction every stage works on.
//! * [`decode`]: record bytes (JSON, or Confluent-framed Avro) → AgentAction,
//!   or an error naming the field.
//! * [`enrich`]: joins an action with the matrix's directory tables.
//! * [`matrix`]: the routing policy: lanes, rules, context, escalation
//!   chains and inline test cases, loaded from YAML and fully validated.
//! * [`route`]: action + matrix → the lanes that must review it.
//! * [`packet`]: the ApprovalRequest each lane receives.
//! * [`explain`]: the offline report behind `switchboard explain`.
//! * [`topics`]: the one place that names topics.
//! * [`cli`]: the command line; `main.rs` only calls it.
//!
//! The core (decode → enrich → route → packet) is pure: plain values in,
//! plain values out, no Kafka, so it is unit-tested and benchmarked directly.

pub mod action;
pub mod cli;
pub mod decode;
pub mod enrich;
pub mod explain;
pub mod matrix;
pub mod packet;
pub mod route;
pub mod topics;
