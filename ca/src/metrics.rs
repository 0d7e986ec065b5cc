//! Telemetry of `ztid-server`: Prometheus metrics, `/live` and `/ready` on the
//! `--metrics ADDR:PORT` listener (off by default; the listener itself is the
//! agent crate's [`ztid_telemetry::listen`]).
//!
//! Counters are fed by one-line hooks in [`crate::core`] and [`crate::node_api`];
//! gauges are computed when scraped, from state that is cheap to read: the
//! authorities (a handful of records), per-agent mint rates (kept here, in memory),
//! the agent list (sampled at most every 30 s), and the entry count (counted once at
//! start, then kept up to date by the create/delete hooks: a scrape never lists the
//! entries).
//!
//! Every label has a bounded set of values. In particular there is no per-agent
//! series: "one node minting far above its usual rate" is detected here, against
//! each agent's own baseline, and surfaces as `ztid_agent_mint_rate_high_total` plus
//! a warning log event `agent_mint_rate_high` naming the agent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use ztid_telemetry::{encode, listen, register, GrpcMetricsLayer, Probe, LATENCY_BUCKETS};

use crate::audit::AuditError;
use crate::authorities::Kind;
use crate::core::CaCore;
use crate::datastore::AuthorityState;
use crate::{Error, RefusalKind, Result};
use ztid_attestation::RefusalKind as AttestationRefusal;

/// Known node attestation methods; anything else a client names is `unknown`.
const METHODS: &[&str] = &["join-token", "tpm", "sev-snp", "tdx"];
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
/// How often the agent list may be re-read.
const AGENT_SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// How often the audit log verifies itself (the first run is at start).
const AUDIT_VERIFY_EVERY: Duration = Duration::from_secs(30 * 60);

struct ServerMetrics {
    registry: Registry,
    issued: IntCounterVec,
    issue_seconds: HistogramVec,
    node_calls: IntCounterVec,
    attestations: IntCounterVec,
    attestation_failures: IntCounterVec,
    refusals: IntCounterVec,
    authority_expiry: IntGaugeVec,
    authority_lifetime: IntGaugeVec,
    authority_prepared: IntGaugeVec,
    agents: IntGaugeVec,
    entries: IntGauge,
    mint_rate_max: Gauge,
    mint_rate_high: IntCounter,
    audit_records: IntCounter,
    audit_writable: IntGauge,
    audit_verify_ok: IntGauge,
    audit_verify_failures: IntCounter,
    audit_verify_last_success: IntGauge,
    audit_verify_seconds: Gauge,
    audit_verify_records: IntGauge,
    audit_tamper_detected: IntGauge,
    audit_quarantined: IntCounter,
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
static METRICS: LazyLock<ServerMetrics> = LazyLock::new(|| {
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
// Hooks.
// ---------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------
// Reasons: short, stable labels derived from errors.
// ---------------------------------------------------------------------------------

fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown")
}

/// Why a node attestation by `method` was refused, as one of a fixed set of labels:
/// one `match` on the error's kind.
pub fn attestation_reason(method: &str, e: &Error) -> &'static str {
    use ztid_attestation::Error as A;
    use RefusalKind as K;
    match e {
        Error::Attestation(A::Refused(r)) => attestation_refusal_label(method, r.kind()),
        Error::Attestation(
            A::Protocol(_)
            | A::InvalidSelector(_)
            | A::InvalidSpiffeId(_)
            | A::InvalidSvid(_)
            | A::InvalidJwt(_),
        ) => "protocol",
        Error::Refused(r) => match r.kind() {
            K::Banned => "banned",
            K::UnknownMethod => "unknown_method",
            K::BadCsr | K::CsrNotGranted => "csr_invalid",
            K::NotEntitled
            | K::UnusableEntry
            | K::IssuancePolicy
            | K::CallNotAllowed
            | K::UntrustedEndpoint => "permission_denied",
            K::NoCredential
            | K::UnknownAgent
            | K::StaleCredential
            | K::BadCredential
            | K::RenewByAttesting
            | K::RateExceeded => "other",
        },
        Error::InvalidInput(_) => "invalid_request",
        _ => "other",
    }
}

/// The label of a verifier's refusal. The values are those this server has always
/// used (dashboards and alerts name them), so several kinds share one;
/// `collateral_unavailable` is new: a KDS/PCS outage is not evidence of an attack.
fn attestation_refusal_label(method: &str, kind: AttestationRefusal) -> &'static str {
    use AttestationRefusal as R;
    match kind {
        R::TokenUnknown => "token_unknown",
        R::TokenExpired => "token_expired",
        R::Malformed if method == "join-token" => "token_malformed",
        R::Malformed | R::Unsupported => "malformed_evidence",
        R::Expired => "evidence_expired",
        R::BadSignature => "bad_signature",
        R::UntrustedChain | R::Revoked => "untrusted_chain",
        R::CollateralUnavailable => "collateral_unavailable",
        R::KeyMismatch | R::Replay => "challenge_failed",
        R::PolicyMismatch => "policy_mismatch",
        _ => "evidence_refused",
    }
}

/// Why the node API refused a call or one request in it, as one of a fixed set of
/// labels: one `match` on the error's kind.
pub fn refusal_reason(e: &Error) -> &'static str {
    use RefusalKind as K;
    match e {
        Error::Refused(r) => match r.kind() {
            K::NoCredential => "no_svid",
            K::UnknownAgent => "unknown_agent",
            K::StaleCredential => "stale_svid",
            K::BadCredential => "bad_svid",
            K::Banned => "banned",
            K::NotEntitled => "not_entitled",
            K::BadCsr | K::CsrNotGranted => "csr_refused",
            K::UnknownMethod => "invalid_request",
            K::UnusableEntry | K::IssuancePolicy | K::CallNotAllowed | K::UntrustedEndpoint => {
                "permission_denied"
            }
            K::RenewByAttesting | K::RateExceeded => "other",
        },
        Error::NotFound(_) => "no_entry",
        Error::InvalidInput(_) => "invalid_request",
        Error::Audit(AuditError::Unavailable(_)) => "audit_unavailable",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------------
// Per-agent mint rates, bounded: one small record per active agent, no label per agent.
// ---------------------------------------------------------------------------------

/// Weight of the last minute in an agent's usual rate (an EWMA over about an hour).
const BASELINE_ALPHA: f64 = 1.0 / 60.0;
/// Minutes an agent is watched before its rate can be called unusual.
const WARMUP_MINUTES: i64 = 10;
/// "Far above": this many times the usual per-minute rate...
const HIGH_FACTOR: f64 = 10.0;
/// ...and at least this many SVIDs in the minute.
const HIGH_FLOOR: u32 = 60;
/// One warning per agent at most this often, in minutes.
const WARN_EVERY_MINUTES: i64 = 5;
/// Agents idle this long are forgotten, in minutes.
const FORGET_AFTER_MINUTES: i64 = 180;

static START: LazyLock<Instant> = LazyLock::new(Instant::now);

fn minute_now() -> i64 {
    (START.elapsed().as_secs() / 60) as i64
}

#[derive(Debug, Clone)]
struct AgentRate {
    first_minute: i64,
    minute: i64,
    current: u32,
    previous: u32,
    /// EWMA of per-minute counts, biased towards 0 until enough minutes are folded in.
    baseline: f64,
    /// Minutes folded into `baseline`.
    folded: i64,
    warned_minute: i64,
}

#[derive(Default)]
struct Rates(Mutex<HashMap<String, AgentRate>>);

static RATES: LazyLock<Rates> = LazyLock::new(Rates::default);

impl AgentRate {
    fn new(minute: i64) -> Self {
        Self {
            first_minute: minute,
            minute,
            current: 0,
            previous: 0,
            baseline: 0.0,
            folded: 0,
            warned_minute: i64::MIN / 2,
        }
    }

    /// Moves the window to `minute`, folding finished minutes into the baseline.
    fn roll(&mut self, minute: i64) {
        if minute <= self.minute {
            return;
        }
        let gap = minute - self.minute;
        self.baseline =
            self.baseline * (1.0 - BASELINE_ALPHA) + self.current as f64 * BASELINE_ALPHA;
        if gap > 1 {
            let idle = (gap - 1).min(10_000) as i32;
            self.baseline *= (1.0 - BASELINE_ALPHA).powi(idle);
        }
        self.folded = self.folded.saturating_add(gap);
        self.previous = if gap == 1 { self.current } else { 0 };
        self.current = 0;
        self.minute = minute;
    }

    /// The usual SVIDs per minute: the EWMA corrected for its start at 0.
    fn usual(&self) -> f64 {
        let weight = 1.0 - (1.0 - BASELINE_ALPHA).powi(self.folded.min(10_000) as i32);
        if weight > 0.0 {
            self.baseline / weight
        } else {
            0.0
        }
    }

    /// SVIDs over the last 60 s, interpolating the previous minute.
    fn last_minute(&self, minute: i64, into_minute: f64) -> f64 {
        match minute - self.minute {
            0 => self.previous as f64 * (1.0 - into_minute) + self.current as f64,
            1 => self.current as f64 * (1.0 - into_minute),
            _ => 0.0,
        }
    }
}

impl Rates {
    /// Counts one mint; returns `(this minute, usual per minute)` when it is far above usual
    /// (at most once per agent per few minutes).
    fn note(&self, agent: &str, minute: i64) -> Option<(u32, f64)> {
        let mut map = self.0.lock().ok()?;
        let r = match map.get_mut(agent) {
            Some(r) => r,
            None => map
                .entry(agent.to_string())
                .or_insert_with(|| AgentRate::new(minute)),
        };
        r.roll(minute);
        r.current = r.current.saturating_add(1);
        let high = minute - r.first_minute >= WARMUP_MINUTES
            && r.current >= HIGH_FLOOR
            && r.current as f64 > HIGH_FACTOR * r.usual()
            && minute - r.warned_minute >= WARN_EVERY_MINUTES;
        if high {
            r.warned_minute = minute;
            return Some((r.current, r.usual()));
        }
        None
    }

    /// The highest last-minute count over all agents; forgets long-idle agents.
    fn max_last_minute(&self) -> f64 {
        let Ok(mut map) = self.0.lock() else {
            return 0.0;
        };
        let minute = minute_now();
        let into = (START.elapsed().as_secs() % 60) as f64 / 60.0;
        map.retain(|_, r| minute - r.minute < FORGET_AFTER_MINUTES);
        map.values()
            .map(|r| r.last_minute(minute, into))
            .fold(0.0, f64::max)
    }
}

// ---------------------------------------------------------------------------------
// Scrape-time state.
// ---------------------------------------------------------------------------------

static SERVING: AtomicBool = AtomicBool::new(false);
static AGENTS_DIRTY: AtomicBool = AtomicBool::new(true);
static ENTRIES_DELTA: AtomicI64 = AtomicI64::new(0);

struct ServerProbe {
    core: Arc<CaCore>,
    agents_sampled: Mutex<Option<Instant>>,
    /// One scrape at a time, so concurrent scrapes never see a half-refreshed gauge.
    scrape: tokio::sync::Mutex<()>,
}

fn now() -> i64 {
    crate::core::now()
}

impl ServerProbe {
    fn refresh_authorities(&self) {
        let m = &*METRICS;
        m.authority_expiry.reset();
        m.authority_lifetime.reset();
        let t = now();
        for kind in [Kind::X509, Kind::Jwt] {
            let Ok(list) = self.core.authorities.list(kind) else {
                continue;
            };
            let mut prepared = 0;
            for a in &list {
                let state = match a.state {
                    AuthorityState::Prepared => "prepared",
                    AuthorityState::Active => "active",
                    AuthorityState::Old if a.tainted => "tainted",
                    AuthorityState::Old => "old",
                };
                if a.state == AuthorityState::Prepared {
                    prepared = 1;
                }
                let labels = [kind.as_str(), a.id.as_str(), state];
                m.authority_expiry
                    .with_label_values(&labels)
                    .set(a.not_after - t);
                if a.not_before > 0 {
                    m.authority_lifetime
                        .with_label_values(&labels)
                        .set(a.not_after - a.not_before);
                }
            }
            m.authority_prepared
                .with_label_values(&[kind.as_str()])
                .set(prepared);
        }
    }

    async fn refresh_agents(&self) {
        let due = {
            let Ok(last) = self.agents_sampled.lock() else {
                return;
            };
            AGENTS_DIRTY.load(Ordering::Relaxed)
                || last.is_none_or(|t| t.elapsed() >= AGENT_SAMPLE_EVERY)
        };
        if !due {
            return;
        }
        AGENTS_DIRTY.store(false, Ordering::Relaxed);
        if let Ok(mut last) = self.agents_sampled.lock() {
            *last = Some(Instant::now());
        }
        let store = self.core.store.clone();
        let Ok(Ok(agents)) = tokio::task::spawn_blocking(move || store.list_agents()).await else {
            tracing::warn!("metrics: could not list agents");
            return;
        };
        let t = now();
        let (mut active, mut expired, mut banned) = (0, 0, 0);
        for a in &agents {
            if a.banned {
                banned += 1;
            } else if a.expires_at > t {
                active += 1;
            } else {
                expired += 1;
            }
        }
        for (state, n) in [("active", active), ("expired", expired), ("banned", banned)] {
            METRICS.agents.with_label_values(&[state]).set(n);
        }
    }

    async fn refresh_audit(&self) {
        let Some(audit) = &self.core.audit else {
            return;
        };
        let ok = tokio::time::timeout(Duration::from_secs(1), audit.durable(audit.last_seq()))
            .await
            .is_ok_and(|r| r.is_ok());
        METRICS.audit_writable.set(ok as i64);
    }
}

impl Probe for ServerProbe {
    async fn metrics(&self) -> String {
        let _one = self.scrape.lock().await;
        self.refresh_authorities();
        self.refresh_agents().await;
        self.refresh_audit().await;
        METRICS.mint_rate_max.set(RATES.max_last_minute());
        encode(&METRICS.registry)
    }

    async fn ready(&self) -> std::result::Result<(), String> {
        if !SERVING.load(Ordering::SeqCst) {
            return Err("the node API and admin socket are not serving yet".into());
        }
        let store = self.core.store.clone();
        match tokio::task::spawn_blocking(move || store.current_revision()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("datastore: {e}")),
            Err(e) => return Err(format!("datastore check: {e}")),
        }
        if let Some(audit) = &self.core.audit {
            audit
                .durable(audit.last_seq())
                .await
                .map_err(|e| format!("audit log: {e}"))?;
        }
        Ok(())
    }
}

/// Counts the entries once (in the background); the hooks keep the count current.
fn count_entries(core: &Arc<CaCore>) {
    let store = core.store.clone();
    tokio::task::spawn_blocking(move || {
        let before = ENTRIES_DELTA.load(Ordering::Relaxed);
        match store.count_entries() {
            Ok(n) => {
                // From now on the gauge is this count plus the changes since it began (a
                // change racing the count may be counted twice: close enough, and rare).
                BASE_ENTRIES.store(n as i64 - before, Ordering::Relaxed);
                ENTRIES_COUNTED.store(true, Ordering::Relaxed);
                refresh_entries();
                let _ = METRICS.registry.register(Box::new(METRICS.entries.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "metrics: could not count entries"),
        }
    });
}

static BASE_ENTRIES: AtomicI64 = AtomicI64::new(0);
static ENTRIES_COUNTED: AtomicBool = AtomicBool::new(false);

fn refresh_entries() {
    if ENTRIES_COUNTED.load(Ordering::Relaxed) {
        METRICS
            .entries
            .set(BASE_ENTRIES.load(Ordering::Relaxed) + ENTRIES_DELTA.load(Ordering::Relaxed));
    }
}

/// Runs `audit verify` on the live log now and then. A torn last line being written
/// while it reads is not a failure: it is retried.
fn spawn_audit_self_check(core: &Arc<CaCore>) {
    let Some(audit) = core.audit.clone() else {
        return;
    };
    let dir = core.config.data_dir.join("audit");
    let km = core.key_manager.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(AUDIT_VERIFY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if audit.last_seq() == 0 {
                // A new, empty log: nothing is signed yet, so there is nothing to walk.
                METRICS.audit_verify_ok.set(1);
                METRICS.audit_verify_records.set(0);
                METRICS.audit_verify_last_success.set(now());
                continue;
            }
            let (dir, km) = (dir.clone(), km.clone());
            let started = Instant::now();
            let result = tokio::task::spawn_blocking(move || {
                let mut last = crate::audit::verify(&dir, km.as_ref());
                for _ in 1..3 {
                    match &last {
                        // A batch still being appended (no line end yet, or not yet
                        // followed by its seal): read again.
                        Err(e) if e.is_live_tail() => {
                            std::thread::sleep(Duration::from_secs(1));
                            last = crate::audit::verify(&dir, km.as_ref());
                        }
                        _ => break,
                    }
                }
                last.map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("self-check task: {e}")));
            METRICS
                .audit_verify_seconds
                .set(started.elapsed().as_secs_f64());
            match result {
                Ok(r) => {
                    METRICS.audit_verify_ok.set(1);
                    METRICS.audit_verify_last_success.set(now());
                    METRICS.audit_verify_records.set(r.records as i64);
                    tracing::info!(
                        event = "audit_verified",
                        records = r.records,
                        checkpoints = r.checkpoints,
                        "audit log self-check passed"
                    );
                }
                Err(e) => {
                    METRICS.audit_verify_ok.set(0);
                    METRICS.audit_verify_failures.inc();
                    tracing::error!(event = "audit_verify_failed", error = %e, "audit log self-check FAILED");
                }
            }
        }
    });
}

/// Starts telemetry when `--metrics` is set: binds the listener, counts the entries,
/// starts the audit self-check. Returns the bound address.
pub async fn spawn(core: &Arc<CaCore>) -> Result<Option<SocketAddr>> {
    let Some(addr) = core.config.metrics else {
        return Ok(None);
    };
    LazyLock::force(&METRICS);
    LazyLock::force(&START);
    count_entries(core);
    spawn_audit_self_check(core);
    let probe = Arc::new(ServerProbe {
        core: core.clone(),
        agents_sampled: Mutex::new(None),
        scrape: tokio::sync::Mutex::new(()),
    });
    let local = listen(addr, Arc::new(EntriesRefresh(probe)))
        .await
        .map_err(Error::io(format!("binding the metrics listener on {addr}")))?;
    Ok(Some(local))
}

/// Refreshes the entry gauge before delegating (kept apart so the probe stays testable).
struct EntriesRefresh(Arc<ServerProbe>);

impl Probe for EntriesRefresh {
    async fn metrics(&self) -> String {
        refresh_entries();
        self.0.metrics().await
    }
    async fn ready(&self) -> std::result::Result<(), String> {
        self.0.ready().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztid_attestation::Error as A;

    #[test]
    fn reasons_are_short_and_stable() {
        use ztid_attestation::RefusalKind as R;
        let r = |method: &str, kind: R| {
            attestation_reason(method, &Error::Attestation(A::refused(kind, "any text")))
        };
        for (kind, label) in [
            (R::TokenExpired, "token_expired"),
            (R::TokenUnknown, "token_unknown"),
            (R::BadSignature, "bad_signature"),
            (R::PolicyMismatch, "policy_mismatch"),
            (R::Expired, "evidence_expired"),
            (R::Replay, "challenge_failed"),
            (R::KeyMismatch, "challenge_failed"),
            (R::UntrustedChain, "untrusted_chain"),
            (R::Revoked, "untrusted_chain"),
            (R::Unsupported, "malformed_evidence"),
            (R::CollateralUnavailable, "collateral_unavailable"),
        ] {
            assert_eq!(r("tpm", kind), label, "{kind:?}");
        }
        assert_eq!(r("join-token", R::Malformed), "token_malformed");
        assert_eq!(r("tpm", R::Malformed), "malformed_evidence");
        assert_eq!(
            attestation_reason("tpm", &Error::Attestation(A::Protocol("x".into()))),
            "protocol"
        );
        let refused = |k: RefusalKind| Error::refused(k, "any text: the kind decides");
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::Banned)),
            "banned"
        );
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::BadCsr)),
            "csr_invalid"
        );
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::CsrNotGranted)),
            "csr_invalid"
        );
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::UnknownMethod)),
            "unknown_method"
        );
        assert_eq!(
            attestation_reason("tpm", &refused(RefusalKind::IssuancePolicy)),
            "permission_denied"
        );
        assert_eq!(
            attestation_reason("tpm", &Error::InvalidInput("x".into())),
            "invalid_request"
        );
        assert_eq!(
            attestation_reason("tpm", &Error::Internal("disk".into())),
            "other"
        );
        for (kind, label) in [
            (RefusalKind::NoCredential, "no_svid"),
            (RefusalKind::UnknownAgent, "unknown_agent"),
            (RefusalKind::StaleCredential, "stale_svid"),
            (RefusalKind::BadCredential, "bad_svid"),
            (RefusalKind::Banned, "banned"),
            (RefusalKind::NotEntitled, "not_entitled"),
            (RefusalKind::BadCsr, "csr_refused"),
            (RefusalKind::CsrNotGranted, "csr_refused"),
            (RefusalKind::IssuancePolicy, "permission_denied"),
            (RefusalKind::RateExceeded, "other"),
        ] {
            assert_eq!(refusal_reason(&refused(kind)), label, "{kind:?}");
        }
        assert_eq!(refusal_reason(&Error::NotFound("e".into())), "no_entry");
        assert_eq!(
            refusal_reason(&Error::Audit(AuditError::Unavailable(
                "audit writer stopped".into()
            ))),
            "audit_unavailable"
        );
        assert_eq!(method_label("join-token"), "join-token");
        assert_eq!(method_label("../../etc"), "unknown");
    }

    #[test]
    fn a_burst_far_above_the_usual_rate_is_flagged_once() {
        let rates = Rates::default();
        // Ten minutes at 5 per minute: the usual rate.
        for minute in 0..12 {
            for _ in 0..5 {
                assert_eq!(rates.note("a", minute), None);
            }
        }
        // Then a burst in minute 12: flagged once, when it crosses the floor.
        let flagged: Vec<_> = (0..500).filter_map(|_| rates.note("a", 12)).collect();
        assert_eq!(flagged.len(), 1);
        assert_eq!(flagged[0].0, HIGH_FLOOR);
        // A new agent bursting at once is not flagged (no baseline yet).
        assert!((0..500).all(|_| rates.note("b", 12).is_none()));
        // A steady heavy minter is not flagged either.
        for minute in 0..30 {
            for _ in 0..200 {
                assert_eq!(rates.note("c", minute), None);
            }
        }
    }

    #[test]
    fn last_minute_interpolates() {
        let mut r = AgentRate::new(0);
        r.current = 100;
        r.roll(1);
        r.current = 10;
        assert_eq!(r.last_minute(1, 0.5), 60.0);
        assert_eq!(r.last_minute(2, 0.5), 5.0);
        assert_eq!(r.last_minute(3, 0.5), 0.0);
    }
}
