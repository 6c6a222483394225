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
//! * [`ordered`]: insertion-ordered maps for packets and reports.
//! * [`topics`]: the one place that names topics.
//! * [`config`]: the one configuration struct of a running process.
//! * [`kafka`]: client settings and topic creation.
//! * [`changelog`]: compacted topics read into memory (seen actions, directory).
//! * [`dedup`]: the seen-action index that stops redelivered actions.
//! * [`pending`]: the pending-approval record handed to the escalation stage.
//! * [`decision`]: Decisions lane consumers write, Outcomes agents wait on.
//! * [`escalation`]: the pure state machine of a pending approval and its timers.
//! * [`clock`]: the one clock seam.
//! * [`dlq`]: dead letters with their reasons.
//! * [`sink`]: writing a batch exactly once (transactions) or at least once.
//! * [`pipeline`]: at-least-once writes of several batches in flight at once.
//! * [`transactions`]: exactly-once writes, the next batch routed while one commits.
//! * [`reload`]: the live matrix and its hot reload.
//! * [`stage`]: the Kafka loops (the route stage) and `run`.
//! * [`demo`]: `switchboard demo`, on an in-process cluster.
//! * [`metrics`]: the one place Prometheus metrics are defined.
//! * [`http`]: the tiny server behind `/metrics`, `/healthz` and `/readyz`.
//! * [`properties`]: pass-through Kafka properties (file, flags, secret references).
//! * [`inbox`]: `switchboard inbox`, what waits at a lane, for a person.
//! * [`decide`]: `switchboard decide`, a person's answer as a Decision.
//! * [`cli`]: the command line; `main.rs` only calls it.
//! * [`alloc`]: the allocator's memory policy (freed memory kept for reuse).
//!
//! The core (decode → enrich → route → packet) is pure: plain values in,
//! plain values out, no Kafka, so it is unit-tested and benchmarked directly.

pub mod action;
pub mod alloc;
pub mod changelog;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decide;
pub mod decision;
pub mod decode;
pub mod dedup;
pub mod demo;
pub mod dlq;
pub mod encode;
pub mod enrich;
pub mod escalation;
pub mod explain;
pub mod held;
pub mod http;
pub mod inbox;
pub mod kafka;
pub mod matrix;
pub mod metrics;
pub mod ordered;
pub mod packet;
pub mod pending;
pub mod pipeline;
pub mod properties;
pub mod reload;
pub mod rfc3339;
pub mod route;
pub mod sink;
pub mod stage;
pub mod topics;
pub mod transactions;
