//! Hooks: one-line calls from the CA core, the audit log and the node API. They only record
//! into the static instruments (and the per-agent mint rates); they read no server state.

use std::sync::atomic::Ordering;

use ztid_telemetry::GrpcMetricsLayer;

use super::instruments::{AGENTS_DIRTY, ENTRIES_DELTA, METRICS, SERVING};
use super::labels::{attestation_reason, method_label, refusal_reason};
use super::rates::{minute_now, RATES};
use crate::Error;

/// Node API methods, as in `/ztid.node.v1.Node/<rpc>`.
const NODE_RPCS: &[&str] = &[
    "Attest",
    "RenewAgent",
    "SignX509Svids",
    "MintJwtSvids",
    "SyncEntries",
    "FetchBundle",
];
/// The node API methods that mint, timed into `ztid_svid_issue_seconds`.
const ISSUE_RPCS: &[&str] = &["SignX509Svids", "MintJwtSvids"];

/// Hook: a workload SVID (`kind` = `x509` or `jwt`) was issued to `agent`.
pub fn svid_issued(kind: &'static str, agent: &str) {
    METRICS.issued.with_label_values(&[kind]).inc();
    if let Some((per_minute, baseline)) = RATES.note(agent, minute_now()) {
        METRICS.mint_rate_high.inc();
        tracing::warn!(
            event = "agent_mint_rate_high",
            agent,
            per_minute,
            usual_per_minute = format!("{baseline:.1}"),
            "an agent is minting far above its usual rate"
        );
    }
}

/// Hook: an agent SVID was issued (attestation or renewal).
pub fn agent_svid_issued() {
    METRICS.issued.with_label_values(&["agent"]).inc();
}

/// Hook: a node attestation passed.
pub fn attestation_passed(method: &str) {
    METRICS
        .attestations
        .with_label_values(&[method_label(method), "passed"])
        .inc();
    AGENTS_DIRTY.store(true, Ordering::Relaxed);
}

/// Hook: a node attestation was refused with `e`.
pub fn attestation_refused(method: &str, e: &Error) {
    let method = method_label(method);
    METRICS
        .attestations
        .with_label_values(&[method, "refused"])
        .inc();
    METRICS
        .attestation_failures
        .with_label_values(&[method, attestation_reason(method, e)])
        .inc();
}

/// Hook: a node API call, or one SVID request in it, was refused with `e`.
pub fn node_api_refused(e: &Error) {
    METRICS
        .refusals
        .with_label_values(&[refusal_reason(e)])
        .inc();
}

/// Hook: the audit log found tampering at start (`records` set aside, possibly 0).
pub fn audit_tamper_detected(records: u64) {
    METRICS.audit_tamper_detected.set(1);
    METRICS.audit_quarantined.inc_by(records);
}

/// Hook: a record was appended to the audit log.
pub fn audit_appended() {
    METRICS.audit_records.inc();
}

/// Hook: `delta` entries were created (+1) or deleted (-1).
pub fn entries_changed(delta: i64) {
    ENTRIES_DELTA.fetch_add(delta, Ordering::Relaxed);
}

/// The layer that counts node API calls and times the minting ones (on the node API server).
pub fn node_api_layer() -> GrpcMetricsLayer {
    GrpcMetricsLayer::new(
        "ztid.node.v1.Node",
        NODE_RPCS,
        Some(METRICS.node_calls.clone()),
        Some(METRICS.issue_seconds.clone()),
        ISSUE_RPCS,
    )
}

/// Hook: the node API and the admin socket are bound and about to be served (`true`),
/// or the server is stopping (`false`).
pub fn set_serving(serving: bool) {
    SERVING.store(serving, Ordering::SeqCst);
}
