//! The server's Prometheus instruments, built once on first use, and the few atomics the
//! hooks set for the scrape to read. Nothing here reads server state.

use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::LazyLock;

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use ztid_telemetry::{register, LATENCY_BUCKETS};

pub(crate) struct ServerMetrics {
    pub(crate) registry: Registry,
    pub(crate) issued: IntCounterVec,
    pub(crate) issue_seconds: HistogramVec,
    pub(crate) node_calls: IntCounterVec,
    pub(crate) attestations: IntCounterVec,
    pub(crate) attestation_failures: IntCounterVec,
    pub(crate) refusals: IntCounterVec,
    pub(crate) authority_expiry: IntGaugeVec,
    pub(crate) authority_lifetime: IntGaugeVec,
    pub(crate) authority_prepared: IntGaugeVec,
    pub(crate) agents: IntGaugeVec,
    pub(crate) entries: IntGauge,
    pub(crate) mint_rate_max: Gauge,
    pub(crate) mint_rate_high: IntCounter,
    pub(crate) audit_records: IntCounter,
    pub(crate) audit_writable: IntGauge,
    pub(crate) audit_verify_ok: IntGauge,
    pub(crate) audit_verify_failures: IntCounter,
    pub(crate) audit_verify_last_success: IntGauge,
    pub(crate) audit_verify_seconds: Gauge,
    pub(crate) audit_verify_records: IntGauge,
    pub(crate) audit_tamper_detected: IntGauge,
    pub(crate) audit_quarantined: IntCounter,
}

#[allow(
    clippy::expect_used,
    reason = "called only while building METRICS, with constant names, help texts and labels, which prometheus accepts"
)]
fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid"),
    )
}

#[allow(
    clippy::expect_used,
    reason = "called only while building METRICS, with constant names, help texts and labels, which prometheus accepts"
)]
fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid"),
    )
}

#[allow(
    clippy::expect_used,
    reason = "constant metric names, help texts and labels, which prometheus accepts; the first use builds them, in every test too"
)]
pub(crate) static METRICS: LazyLock<ServerMetrics> = LazyLock::new(|| {
    let r = Registry::new();
    ServerMetrics {
        issued: counter_vec(
            &r,
            "ztid_svids_issued_total",
            "SVIDs issued, by kind: x509 and jwt (workload SVIDs), agent (agent SVIDs at attestation and renewal).",
            &["kind"],
        ),
        issue_seconds: register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "ztid_svid_issue_seconds",
                    "Latency of the node API calls that mint (SignX509Svids, MintJwtSvids), audit sync included, seconds.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["rpc"],
            )
            .expect("valid"),
        ),
        node_calls: counter_vec(
            &r,
            "ztid_node_api_calls_total",
            "Node API calls by method and gRPC status code at the start of the response.",
            &["rpc", "outcome"],
        ),
        attestations: counter_vec(
            &r,
            "ztid_attestations_total",
            "Node attestations by method and outcome (passed, refused).",
            &["method", "outcome"],
        ),
        attestation_failures: counter_vec(
            &r,
            "ztid_attestation_failures_total",
            "Refused node attestations by method and a short, stable reason.",
            &["method", "reason"],
        ),
        refusals: counter_vec(
            &r,
            "ztid_node_api_refusals_total",
            "Node API refusals (an agent not authenticated, or one SVID request refused) by reason.",
            &["reason"],
        ),
        authority_expiry: gauge_vec(
            &r,
            "ztid_authority_expiry_seconds",
            "Seconds until an authority's not_after (negative once past).",
            &["kind", "id", "state"],
        ),
        authority_lifetime: gauge_vec(
            &r,
            "ztid_authority_lifetime_seconds",
            "An authority's whole validity (not_after - not_before), seconds.",
            &["kind", "id", "state"],
        ),
        authority_prepared: gauge_vec(
            &r,
            "ztid_authority_prepared",
            "1 when a prepared successor authority of this kind exists, else 0.",
            &["kind"],
        ),
        agents: gauge_vec(
            &r,
            "ztid_agents",
            "Attested agents by state (active, expired: its SVID lapsed, banned); sampled at most every 30 s.",
            &["state"],
        ),
        entries: IntGauge::new(
            "ztid_entries",
            "Registration entries (node aliases included).",
        )
        .expect("valid"),
        mint_rate_max: register(
            &r,
            Gauge::new(
                "ztid_agent_mint_rate_max",
                "The highest number of workload SVIDs one agent minted over the last minute.",
            )
            .expect("valid"),
        ),
        mint_rate_high: register(
            &r,
            IntCounter::new(
                "ztid_agent_mint_rate_high_total",
                "Times an agent minted far above its own usual rate (the log event agent_mint_rate_high names it).",
            )
            .expect("valid"),
        ),
        audit_records: register(
            &r,
            IntCounter::new(
                "ztid_audit_records_total",
                "Security events appended to the audit log since start.",
            )
            .expect("valid"),
        ),
        audit_writable: register(
            &r,
            IntGauge::new(
                "ztid_audit_writable",
                "1 while the audit log makes records durable (issuance stops when it cannot), else 0; absent when the audit log is disabled.",
            )
            .expect("valid"),
        ),
        audit_verify_ok: register(
            &r,
            IntGauge::new(
                "ztid_audit_verify_ok",
                "1 when the last periodic audit self-check (hash chain, checkpoint and head signatures) passed, 0 when it failed.",
            )
            .expect("valid"),
        ),
        audit_verify_failures: register(
            &r,
            IntCounter::new(
                "ztid_audit_verify_failures_total",
                "Periodic audit self-checks that failed (the log event audit_verify_failed names the first bad record).",
            )
            .expect("valid"),
        ),
        audit_verify_last_success: register(
            &r,
            IntGauge::new(
                "ztid_audit_verify_last_success_timestamp_seconds",
                "Unix time of the last audit self-check that passed (0: none yet).",
            )
            .expect("valid"),
        ),
        audit_verify_seconds: register(
            &r,
            Gauge::new(
                "ztid_audit_verify_seconds",
                "Duration of the last audit self-check, seconds.",
            )
            .expect("valid"),
        ),
        audit_verify_records: register(
            &r,
            IntGauge::new(
                "ztid_audit_verify_records",
                "Records the last passing audit self-check walked.",
            )
            .expect("valid"),
        ),
        audit_tamper_detected: register(
            &r,
            IntGauge::new(
                "ztid_audit_tamper_detected",
                "1 when this start found the audit log tampered with: records after the last one the server signed (set aside in audit/quarantine.log, see ztid_audit_quarantined_records_total), a head.json the audit key did not sign, or a rollback an operator accepted; the log event audit_tamper_detected says which. 0 otherwise.",
            )
            .expect("valid"),
        ),
        audit_quarantined: register(
            &r,
            IntCounter::new(
                "ztid_audit_quarantined_records_total",
                "Audit records set aside at start (moved to audit/quarantine.log, not chained onto) because nothing the server signed covers them.",
            )
            .expect("valid"),
        ),
        registry: r,
    }
});

// ---------------------------------------------------------------------------------
// Scrape-time state.
// ---------------------------------------------------------------------------------

pub(crate) static SERVING: AtomicBool = AtomicBool::new(false);
pub(crate) static AGENTS_DIRTY: AtomicBool = AtomicBool::new(true);
pub(crate) static ENTRIES_DELTA: AtomicI64 = AtomicI64::new(0);
