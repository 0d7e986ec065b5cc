//! Every bound the server puts on what callers send and on how they connect, in one
//! place, with the checks that enforce them. The README's "Limits" section lists each
//! one and where it applies.
//!
//! - Input bounds (counts and lengths) are checked at the API edge, before anything is
//!   parsed further, stored, signed or audited: a request over a bound is refused with
//!   `InvalidArgument` and the bound it broke, and changes nothing.
//! - Rates (JWT-SVID mints) are refused with `ResourceExhausted` and the reason.
//! - Listener bounds (timeouts, connection caps) are [`LimitsConfig`], the `[limits]`
//!   table of the server config, enforced by [`crate::listeners`].
//!
//! Values are what a demanding SPIRE deployment needs, with room (SPIRE's own bound on
//! an entry hint is 1,024 bytes, for example).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use ztid_proto::node as pb;
pub use ztid_spiffe::limits::{
    at_most, normalize_audiences, AudienceError, Exceeded, MAX_JWT_AUDIENCES,
    MAX_JWT_AUDIENCE_BYTES,
};

use crate::{Error, RefusalKind, Result};

// ---------------------------------------------------------------------------------
// Input bounds.
// ---------------------------------------------------------------------------------

/// Longest SPIFFE ID, bytes (the SPIFFE ID spec's bound on the whole URI).
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;
/// Most selectors in one registration entry.
pub const MAX_SELECTORS_PER_ENTRY: usize = 64;
/// Longest selector type (`unix`, `k8s`, `tpm`), bytes.
pub const MAX_SELECTOR_TYPE_BYTES: usize = 64;
/// Longest selector value, bytes (Linux's PATH_MAX, for `unix:path:`).
pub const MAX_SELECTOR_VALUE_BYTES: usize = 4096;
/// Most DNS names in one entry (each is a SAN of every SVID it yields).
pub const MAX_DNS_NAMES_PER_ENTRY: usize = 32;
/// Most trust domains one entry federates with.
pub const MAX_FEDERATES_WITH_PER_ENTRY: usize = 32;
/// Longest entry hint, bytes (sent with every SVID of the entry; SPIRE's bound).
pub const MAX_HINT_BYTES: usize = 1024;
/// Longest object id in a request (entry ids are 32 hex digits, authority ids a serial
/// or a kid).
pub const MAX_OBJECT_ID_BYTES: usize = 128;
/// Longest trust domain name (a DNS name).
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;
/// Longest URL (a federation's bundle endpoint).
pub const MAX_URL_BYTES: usize = 2048;
/// Longest short keyword (a bundle format, an authority kind, a federation profile,
/// an attestation method).
pub const MAX_KEYWORD_BYTES: usize = 64;
/// Largest bundle an operator may upload (`bundle set`, a federation's initial bundle);
/// the same bound as a bundle fetched from a federation's endpoint.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// Most token-exchange grants that may exist (each is read into every server's memory).
pub const MAX_GRANTS: usize = 10_000;
/// Most revocations that may be stored (each is read into every server's memory and
/// sent to the agents).
pub const MAX_REVOCATIONS: usize = 10_000;
/// Most admin credential revocations in force (`admin credential revoke`), counted apart
/// from [`MAX_REVOCATIONS`]: an operator filling the kill switch's table must not be able
/// to keep an admin's stolen credential from being revoked.
pub const MAX_ADMIN_REVOCATIONS: usize = 1_000;
/// Most hardware identifiers recorded with agent bans (`tpm:ek-hash:…`,
/// `sev-snp:chip-id:…`; one to three per banned agent). Looked up by key at each
/// attestation, never read whole; bounded so bans cannot grow the table without end.
pub const MAX_HARDWARE_BANS: usize = 100_000;
/// Longest join token lifetime.
pub const MAX_JOIN_TOKEN_TTL_SECONDS: i64 = 30 * 24 * 3600;
/// Most CSRs, or JWT-SVID requests, in one node API batch.
pub const MAX_BATCH: usize = 1000;
/// Largest CSR (agent or workload), bytes. An RSA-4096 CSR with every SAN allowed is
/// well under this.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Largest attestation message (first evidence or one challenge response): a TDX quote
/// with its certificate chain or a TPM quote set is a few KiB.
pub const MAX_ATTESTATION_MESSAGE_BYTES: usize = 1 << 20;
/// Most authority ids an agent may report in use in one sync (each is stored).
pub const MAX_AUTHORITIES_IN_USE: usize = 64;
/// Delegated identity calls one sync may report (the agent sends at most 256).
pub const MAX_DELEGATED_REPORTS: usize = 256;
/// Identities one reported delegated call may name.
pub const MAX_DELEGATED_REPORT_IDS: usize = 64;
/// Bytes of a reported delegated call's target (its selectors or pid).
pub const MAX_DELEGATED_TARGET_BYTES: usize = 8192;
/// KiB of delegated call reports one agent may have audited one by one per refusal audit
/// interval (`refusal_audit_interval_seconds`); the rest are counted into one
/// `delegated_reports_summarised` record. A report the agent makes is a few hundred
/// bytes; without a bound, an agent syncing in a loop could fill the audit disk.
pub const DELEGATED_REPORT_KIB_PER_AGENT: u32 = 256;
/// KiB of delegated call reports audited one by one per interval from all agents.
pub const DELEGATED_REPORT_KIB_PER_INTERVAL: u32 = 16 << 10;
/// Largest gRPC message the node API decodes (batches of CSRs, attestation evidence).
pub const NODE_API_MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Largest gRPC message the admin API decodes (a bundle upload and its framing).
pub const ADMIN_API_MAX_MESSAGE_BYTES: usize = 4 << 20;
/// How long the server waits for each attestation message from the agent.
pub const ATTEST_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one whole attestation may take, whatever the number of challenges.
pub const ATTEST_TOTAL_TIMEOUT: Duration = Duration::from_secs(120);
/// A `WatchChanges` stream whose notice stays unread this long is ended with an error
/// (the agent resyncs); nothing more than that one notice is kept for it meanwhile.
pub const WATCH_UNREAD_CUTOFF: Duration = Duration::from_secs(30);
/// How often a `WatchChanges` stream checks its agent's credential again (besides at
/// every agent change): an evicted or banned agent's stream ends.
pub const WATCH_RECHECK_INTERVAL: Duration = Duration::from_secs(30);
/// Most concurrent HTTP/2 streams per gRPC connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Largest HTTP/2 header list a client may send, bytes (gRPC metadata is small).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Streams a client may open and reset before the server has accepted them, at once
/// (HTTP/2 "rapid reset", CVE-2023-44487); over it the connection is sent away.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 32;
/// Streams the server may reset because of the client's errors over one connection's
/// life (streams over [`MAX_STREAMS_PER_CONNECTION`] refused, malformed frames,
/// "MadeYouReset" tricks) before it sends the connection away. A conforming client never
/// draws one; without it a client holding its 64 streams could have streams refused at
/// line rate for the whole request timeout.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// Largest HTTP/1 request head buffered by the OIDC and bundle endpoints, bytes.
pub const MAX_HTTP1_HEAD_BYTES: usize = 16 * 1024;
/// Descriptors kept free of every network listener: the admin socket's connections,
/// the audit log, the datastore, the key manager, logs, and accepting (and closing) one
/// connection over a cap.
pub const RESERVED_DESCRIPTORS: u64 = 128;
/// How long connections get to finish when the server stops, before they are closed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `what` holds at most `limit` bytes.
pub fn check_len(what: &'static str, value: &str, limit: usize) -> Result<()> {
    at_most(what, value.len(), limit).map_err(invalid)
}

/// `what` holds at most `limit` items.
pub fn check_count(what: &'static str, count: usize, limit: usize) -> Result<()> {
    at_most(what, count, limit).map_err(invalid)
}

fn invalid(e: Exceeded) -> Error {
    Error::InvalidInput(e.to_string())
}

/// The bounds of a registration entry (admin `CreateEntry`), checked before anything
/// else about it: every count and every length.
pub fn check_entry(req: &pb::Entry) -> Result<()> {
    check_len("spiffe_id (bytes)", &req.spiffe_id, MAX_SPIFFE_ID_BYTES)?;
    check_len("parent_id (bytes)", &req.parent_id, MAX_SPIFFE_ID_BYTES)?;
    check_len("hint (bytes)", &req.hint, MAX_HINT_BYTES)?;
    check_count("selectors", req.selectors.len(), MAX_SELECTORS_PER_ENTRY)?;
    for s in &req.selectors {
        check_len("selector type (bytes)", &s.r#type, MAX_SELECTOR_TYPE_BYTES)?;
        check_len("selector value (bytes)", &s.value, MAX_SELECTOR_VALUE_BYTES)?;
    }
    check_count("dns_names", req.dns_names.len(), MAX_DNS_NAMES_PER_ENTRY)?;
    for d in &req.dns_names {
        // A DNS name is at most 253 bytes; the name check says more.
        check_len("DNS name (bytes)", d, 253)?;
    }
    check_count(
        "federates_with",
        req.federates_with.len(),
        MAX_FEDERATES_WITH_PER_ENTRY,
    )?;
    for f in &req.federates_with {
        check_len(
            "federates_with trust domain (bytes)",
            f,
            "spiffe://".len() + MAX_TRUST_DOMAIN_BYTES,
        )?;
    }
    Ok(())
}

/// The first message of an attestation.
pub fn check_attest_init(init: &pb::AttestInit) -> Result<()> {
    check_len(
        "attestation method (bytes)",
        &init.method,
        MAX_KEYWORD_BYTES,
    )?;
    at_most(
        "attestation payload (bytes)",
        init.payload.len(),
        MAX_ATTESTATION_MESSAGE_BYTES,
    )
    .map_err(invalid)?;
    check_csr_size("agent CSR (bytes)", &init.csr)
}

/// One challenge response of an attestation.
pub fn check_challenge_response(answer: &[u8]) -> Result<()> {
    at_most(
        "attestation challenge response (bytes)",
        answer.len(),
        MAX_ATTESTATION_MESSAGE_BYTES,
    )
    .map_err(invalid)
}

/// A CSR's size (a refusal of a bad CSR, as an unparsable one is).
pub fn check_csr_size(what: &'static str, csr: &[u8]) -> Result<()> {
    at_most(what, csr.len(), MAX_CSR_BYTES)
        .map_err(|e| Error::refused(RefusalKind::BadCsr, e.to_string()))
}

/// A node API batch's size.
pub fn check_batch(what: &'static str, count: usize) -> Result<()> {
    check_count(what, count, MAX_BATCH)
}

/// An agent's entry sync request.
pub fn check_sync(req: &pb::SyncEntriesRequest) -> Result<()> {
    check_count(
        "authorities_in_use",
        req.authorities_in_use.len(),
        MAX_AUTHORITIES_IN_USE,
    )?;
    for a in &req.authorities_in_use {
        check_len("authority id (bytes)", a, MAX_OBJECT_ID_BYTES)?;
    }
    check_count(
        "delegated_subscriptions",
        req.delegated_subscriptions.len(),
        MAX_DELEGATED_REPORTS,
    )?;
    for d in &req.delegated_subscriptions {
        check_len("delegated method (bytes)", &d.method, MAX_OBJECT_ID_BYTES)?;
        check_len("delegate (bytes)", &d.delegate, MAX_SPIFFE_ID_BYTES)?;
        check_len(
            "delegated target (bytes)",
            &d.target,
            MAX_DELEGATED_TARGET_BYTES,
        )?;
        check_count(
            "delegated spiffe_ids",
            d.spiffe_ids.len(),
            MAX_DELEGATED_REPORT_IDS,
        )?;
        for id in &d.spiffe_ids {
            check_len("delegated spiffe_id (bytes)", id, MAX_SPIFFE_ID_BYTES)?;
        }
    }
    Ok(())
}

/// One JWT-SVID request in a node API batch; returns the audience normalised.
pub fn check_jwt_request(r: &pb::JwtRequest) -> Result<Vec<String>> {
    check_len("entry_id (bytes)", &r.entry_id, MAX_OBJECT_ID_BYTES)?;
    check_len("spiffe_id (bytes)", &r.spiffe_id, MAX_SPIFFE_ID_BYTES)?;
    normalize_audiences(&r.audience).map_err(|e| Error::InvalidInput(e.to_string()))
}

// ---------------------------------------------------------------------------------
// Rates.
// ---------------------------------------------------------------------------------

/// A token bucket per key: `per_minute` tokens, refilled continuously. Keys idle long
/// enough to be full again are forgotten, so the map stays as small as the set of
/// active keys.
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `per_minute` per key (0: unlimited).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The bound.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes `n` tokens for `key`; `false` (nothing taken) when fewer are left.
    pub fn take(&self, key: &str, n: u32) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let cap = f64::from(self.per_minute);
        let rate = cap / 60.0;
        let now = Instant::now();
        let Ok(mut b) = self.buckets.lock() else {
            return false;
        };
        if b.len() > 10_000 {
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < cap
            });
        }
        let (tokens, at) = b.entry(key.to_string()).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(cap);
        *at = now;
        if *tokens >= f64::from(n) {
            *tokens -= f64::from(n);
            true
        } else {
            false
        }
    }
}

// ---------------------------------------------------------------------------------
// Listener limits: the `[limits]` table.
// ---------------------------------------------------------------------------------

/// `[limits]` in the server config: timeouts and connection caps of every listener, and
/// the bounds on audit records of refused calls and on JWT-SVID mints. Every key has a
/// default; see the README's "Limits" section for what applies where.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Time allowed for a TLS handshake (node API, remote admin, bundle endpoint).
    pub tls_handshake_timeout_seconds: u64,
    /// Time allowed from accepting a connection to its first complete request head
    /// (every listener); on HTTP/1 listeners, also for every later request head.
    pub request_header_timeout_seconds: u64,
    /// A gRPC connection (node API, admin socket, remote admin) with no request in
    /// flight for this long is closed. HTTP/1 listeners use the header timeout.
    pub idle_timeout_seconds: u64,
    /// Longest a request may stay in flight (its answer read by the client included)
    /// before its connection is closed.
    pub request_timeout_seconds: u64,
    /// Connections the node API holds at once.
    pub node_api_max_connections: usize,
    /// `WatchChanges` streams (change notices to agents) the node API holds at once;
    /// past it an agent is refused and polls. One per agent: a new one ends the old.
    pub node_api_max_watch_streams: usize,
    /// Connections the remote admin API holds at once.
    pub remote_admin_max_connections: usize,
    /// Connections the admin Unix socket holds at once (within the reserved descriptors).
    pub admin_socket_max_connections: usize,
    /// Connections the bundle endpoint holds at once.
    pub bundle_endpoint_max_connections: usize,
    /// Connections the OIDC discovery listener holds at once.
    pub oidc_max_connections: usize,
    /// Refused unauthenticated calls are audited one by one up to this many per peer
    /// address per interval; the rest are counted into one summary record.
    pub refusals_audited_per_peer: u32,
    /// ...and up to this many per interval from all peers together.
    pub refusals_audited_per_interval: u32,
    /// The interval, seconds.
    pub refusal_audit_interval_seconds: u64,
    /// JWT-SVIDs one agent may have minted for one entry per minute (0: unlimited).
    pub jwt_mints_per_agent_entry_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            tls_handshake_timeout_seconds: 10,
            request_header_timeout_seconds: 10,
            idle_timeout_seconds: 120,
            request_timeout_seconds: 300,
            node_api_max_connections: 4096,
            node_api_max_watch_streams: 4096,
            remote_admin_max_connections: 64,
            admin_socket_max_connections: 32,
            bundle_endpoint_max_connections: 256,
            oidc_max_connections: 256,
            refusals_audited_per_peer: 10,
            refusals_audited_per_interval: 100,
            refusal_audit_interval_seconds: 60,
            jwt_mints_per_agent_entry_per_minute: 1200,
        }
    }
}

impl LimitsConfig {
    /// Refuses values that would switch a bound off or make the server unusable.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            (
                "tls_handshake_timeout_seconds",
                self.tls_handshake_timeout_seconds,
            ),
            (
                "request_header_timeout_seconds",
                self.request_header_timeout_seconds,
            ),
            ("idle_timeout_seconds", self.idle_timeout_seconds),
            ("request_timeout_seconds", self.request_timeout_seconds),
            (
                "refusal_audit_interval_seconds",
                self.refusal_audit_interval_seconds,
            ),
        ] {
            if v == 0 || v > 3600 {
                return Err(Error::Config(format!(
                    "[limits] {name} must be between 1 and 3600"
                )));
            }
        }
        for (name, v) in [
            ("node_api_max_connections", self.node_api_max_connections),
            (
                "node_api_max_watch_streams",
                self.node_api_max_watch_streams,
            ),
            (
                "remote_admin_max_connections",
                self.remote_admin_max_connections,
            ),
            (
                "admin_socket_max_connections",
                self.admin_socket_max_connections,
            ),
            (
                "bundle_endpoint_max_connections",
                self.bundle_endpoint_max_connections,
            ),
            ("oidc_max_connections", self.oidc_max_connections),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("[limits] {name} must be positive")));
            }
        }
        if self.admin_socket_max_connections as u64 > RESERVED_DESCRIPTORS / 2 {
            return Err(Error::Config(format!(
                "[limits] admin_socket_max_connections must be at most {} (it lives in the reserved descriptors)",
                RESERVED_DESCRIPTORS / 2
            )));
        }
        Ok(())
    }

    /// The TLS handshake timeout.
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.tls_handshake_timeout_seconds)
    }

    /// The request header timeout.
    pub fn request_header_timeout(&self) -> Duration {
        Duration::from_secs(self.request_header_timeout_seconds)
    }

    /// The idle timeout of gRPC connections.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_seconds)
    }

    /// The longest a request may stay in flight.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> pb::Entry {
        pb::Entry {
            spiffe_id: "spiffe://example.org/w".into(),
            parent_id: "spiffe://example.org/p".into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:0".into(),
            }],
            ..Default::default()
        }
    }

    fn refusal(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn entry_bounds() {
        check_entry(&entry()).unwrap();
        let mut e = entry();
        e.hint = "h".repeat(MAX_HINT_BYTES);
        check_entry(&e).unwrap();
        e.hint.push('h');
        assert_eq!(
            refusal(check_entry(&e)),
            "hint (bytes) exceeds the limit: 1025 given, at most 1024 allowed"
        );
        let mut e = entry();
        e.selectors = vec![e.selectors[0].clone(); MAX_SELECTORS_PER_ENTRY + 1];
        assert!(refusal(check_entry(&e)).starts_with("selectors exceeds the limit: 65 given"));
        let mut e = entry();
        e.dns_names = vec!["a.example".into(); MAX_DNS_NAMES_PER_ENTRY + 1];
        assert!(refusal(check_entry(&e)).starts_with("dns_names exceeds"));
        let mut e = entry();
        e.federates_with = vec!["b.test".into(); MAX_FEDERATES_WITH_PER_ENTRY + 1];
        assert!(refusal(check_entry(&e)).starts_with("federates_with exceeds"));
        let mut e = entry();
        e.selectors[0].value = "v".repeat(MAX_SELECTOR_VALUE_BYTES + 1);
        assert!(refusal(check_entry(&e)).starts_with("selector value (bytes) exceeds"));
    }

    #[test]
    fn an_oversized_csr_is_a_bad_csr() {
        let e = check_csr_size("agent CSR (bytes)", &[0; MAX_CSR_BYTES + 1]).unwrap_err();
        assert_eq!(e.refusal_kind(), Some(RefusalKind::BadCsr), "{e}");
        assert!(e
            .to_string()
            .starts_with("agent CSR (bytes) exceeds the limit"));
        check_csr_size("agent CSR (bytes)", &[0; MAX_CSR_BYTES]).unwrap();
    }

    #[test]
    fn rate_limiter_refills() {
        let r = RateLimiter::new(60);
        assert!(r.take("a", 60));
        assert!(!r.take("a", 1), "the bucket is empty");
        assert!(r.take("b", 1), "keys are independent");
        assert!(RateLimiter::new(0).take("a", 1_000_000), "0 is unlimited");
    }

    #[test]
    fn config_defaults_validate() {
        LimitsConfig::default().validate().unwrap();
        let c = LimitsConfig {
            idle_timeout_seconds: 0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}
