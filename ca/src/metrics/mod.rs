//! Telemetry of `ztid-server`: Prometheus metrics, `/live` and `/ready` on the
//! `--metrics ADDR:PORT` listener (off by default; the listener itself is the
//! agent crate's [`ztid_telemetry::listen`]).
//!
//! Counters are fed by one-line hooks in [`crate::core`] and [`crate::api::node`];
//! gauges are computed when scraped (by [`crate::probe`], which serves them), from state that is cheap to read: the
//! authorities (a handful of records), per-agent mint rates (kept here, in memory),
//! the agent list (sampled at most every 30 s), and the entry count (counted once at
//! start, then kept up to date by the create/delete hooks: a scrape never lists the
//! entries).
//!
//! Every label has a bounded set of values. In particular there is no per-agent
//! series: "one node minting far above its usual rate" is detected here, against
//! each agent's own baseline, and surfaces as `ztid_agent_mint_rate_high_total` plus
//! a warning log event `agent_mint_rate_high` naming the agent.

mod hooks;
pub(crate) mod instruments;
mod labels;
pub(crate) mod rates;

pub use hooks::{
    agent_svid_issued, attestation_passed, attestation_refused, audit_appended,
    audit_tamper_detected, entries_changed, node_api_layer, node_api_refused, set_serving,
    svid_issued,
};
pub use labels::{attestation_reason, refusal_reason};
