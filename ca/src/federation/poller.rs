//! Polling relationships' bundle endpoints: the TLS client per profile, one fetch,
//! storing what it brought, and the loop that polls each per its refresh hint.
//!
//! Once per cluster: the loop polls only while this server holds the cluster-wide
//! role [`POLLER_ROLE`] ([`DataStore::try_leader`](crate::datastore::DataStore::try_leader):
//! a PostgreSQL session advisory lock; always granted on sled, where the server is
//! alone). A server without it tries again every [`LEADER_RETRY`]. Why this is enough:
//! the lock is held by exactly one session at a time and released by PostgreSQL when
//! that session's connection dies, so a dead or partitioned leader gives the role up
//! without anyone deciding it; the leader checks it still holds the role before every
//! round (`LeaderGuard::is_held`), so once the lock is lost it stops before another
//! server's first round can overlap more than the round in flight. That overlap, and
//! everything else, is harmless: a fetch only stores a bundle, and storing the same
//! bundle twice changes nothing. Relationships and bundles are read from the
//! datastore on every round and every sync, so what the leader stores is served by
//! every server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use ztid_spiffe::bundle::TrustBundle;

use super::bundles::sniff_format;
use super::records::{FederationRecord, Source, Stored};
use super::{load_pem_certs, parse_bundle, parse_endpoint_url, provider};
use crate::core::{now, CaCore};
use crate::datastore::LeaderGuard;
use crate::{Error, RefusalKind, Result};

/// The cluster-wide role held by the one server that polls bundle endpoints.
pub const POLLER_ROLE: &str = "federation-poller";
/// How often a server without the polling role tries to take it.
pub const LEADER_RETRY: Duration = Duration::from_secs(5);

/// Largest bundle document accepted from an endpoint.
const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// Time allowed for one bundle endpoint fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The poll interval of a bundle that carries no `spiffe_refresh_hint` (or 0), before
/// the configured bounds: SPIRE's default. Not the lower bound: a peer that sends no
/// hint is not asking to be polled every second.
pub const MISSING_HINT_SECONDS: i64 = 300;
/// The longest wait after failed polls (see `poll_interval`).
pub const FAILED_POLL_BACKOFF_MAX_SECONDS: i64 = 300;
/// How often a poll's status is written again after another writer changed the
/// relationship's record in between (it is not written to a relationship changed).
const STATUS_ATTEMPTS: usize = 3;

impl CaCore {
    /// Fetches a relationship's endpoint once and stores the bundle. A refusal is
    /// logged, audited and recorded in the relationship; nothing else changes.
    pub async fn refresh_federation(&self, td: &str) -> Result<(TrustBundle, Stored)> {
        let (polled, f) = self.federation_with_bytes(td)?;
        let result = self.fetch_and_store(&f, &polled).await;
        // The poll is recorded in the relationship as it stands now, and only if it is
        // still the one polled: one deleted or replaced meanwhile, through this server
        // or another, is not written back (a swap of the exact bytes read).
        for _ in 0..STATUS_ATTEMPTS {
            let Ok((raw, mut current)) = self.federation_with_bytes(&f.trust_domain) else {
                break;
            };
            if !current.same_relationship(&f) {
                break;
            }
            current.last_refresh_at = now();
            current.last_error = match &result {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            };
            let new = serde_json::to_vec(&current)?;
            if self
                .store
                .compare_and_swap_federation(&current.trust_domain, &raw, &new)?
            {
                break;
            }
        }
        result
    }

    /// Why a bundle fetched for `f` was not stored: its relationship was deleted or
    /// replaced while the endpoint was fetched (an endpoint may hold a fetch for up to
    /// [`FETCH_TIMEOUT`]), or while the bundle was stored.
    fn relationship_gone(&self, f: &FederationRecord) -> Result<String> {
        let td = &f.trust_domain;
        Ok(match self.federation(td) {
            Ok(current) if current.same_relationship(f) => format!(
                "the federation with {td} was written while its endpoint was fetched; \
                 the bundle {} sent is not stored (the next poll fetches it again)",
                f.bundle_endpoint_url
            ),
            Ok(_) => format!(
                "the federation with {td} was changed while its endpoint was fetched; \
                 the bundle {} sent is not stored",
                f.bundle_endpoint_url
            ),
            Err(Error::NotFound(_)) => format!(
                "the federation with {td} was deleted while its endpoint was fetched; \
                 the bundle {} sent is not stored",
                f.bundle_endpoint_url
            ),
            Err(e) => return Err(e),
        })
    }

    /// Fetches `f`'s endpoint and stores the bundle only while `f` (stored as `polled`)
    /// still stands, checked in the same datastore step as the write.
    async fn fetch_and_store(
        &self,
        f: &FederationRecord,
        polled: &[u8],
    ) -> Result<(TrustBundle, Stored)> {
        let source = Source::Endpoint(&f.bundle_endpoint_url);
        let body = match fetch_bundle_document(self, f).await {
            Ok(b) => b,
            Err(e) => {
                self.refuse_bundle(&f.trust_domain, source, &e.to_string());
                return Err(e);
            }
        };
        let bundle = match parse_bundle(&f.trust_domain, "spiffe", &body, 0) {
            Ok(b) => b,
            Err(e) => {
                self.refuse_bundle(&f.trust_domain, source, &e.to_string());
                return Err(e);
            }
        };
        // The check and the store are one step on the datastore (a transaction that
        // holds the relationship's row on PostgreSQL): an operator who deletes or moves
        // a relationship (cutting off its endpoint), through any server, does not see
        // an answer its old endpoint held back stored afterwards.
        let stored = {
            let _writes = self.federation_writes();
            self.store_federated_bundle(bundle, source, Some(polled))?
        };
        let Some(stored) = stored else {
            let why = self.relationship_gone(f)?;
            self.refuse_bundle(&f.trust_domain, source, &why);
            return Err(Error::Precondition(why));
        };
        Ok((
            self.federated_bundle(&f.trust_domain)?.unwrap_or_default(),
            stored,
        ))
    }

    /// Seconds until a relationship's next poll, after `failures` failed polls in a
    /// row: the stored bundle's refresh hint ([`MISSING_HINT_SECONDS`] when it has
    /// none), bounded by config. After a failure it retries at the lower bound (at
    /// least 1 s), doubling with each further failure up to the hint's interval and at
    /// most [`FAILED_POLL_BACKOFF_MAX_SECONDS`]: a peer that is down, or answers
    /// garbage, is not asked every second for as long as it stays so.
    fn poll_interval(&self, f: &FederationRecord, failures: u32) -> i64 {
        let min = self.config.federation_min_refresh_seconds.max(1);
        let max = self.config.federation_max_refresh_seconds.max(min);
        let hint = self
            .federated_bundle(&f.trust_domain)
            .ok()
            .flatten()
            .map(|b| b.refresh_hint_seconds)
            .filter(|h| *h > 0)
            .unwrap_or(MISSING_HINT_SECONDS);
        let interval = hint.clamp(min, max);
        if failures == 0 {
            return interval;
        }
        let backoff = min.saturating_mul(1_i64 << (failures - 1).min(30));
        backoff
            .min(interval.min(FAILED_POLL_BACKOFF_MAX_SECONDS))
            .max(min)
    }
}

/// The TLS client config for a relationship's profile.
fn client_config(core: &CaCore, f: &FederationRecord) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate(e.to_string()))?;
    let config = match f.profile.as_str() {
        "https_spiffe" => {
            // The endpoint's chain must lead to the stored bundle of its trust domain
            // (or, before the first fetch, to the configured initial bundle).
            let roots = match core.federated_bundle(&f.trust_domain)? {
                Some(b) => b.x509_authorities,
                None if !f.trust_bundle.is_empty() => {
                    parse_bundle(
                        &f.trust_domain,
                        sniff_format(f.trust_bundle.as_bytes()),
                        f.trust_bundle.as_bytes(),
                        0,
                    )?
                    .x509_authorities
                }
                None => {
                    return Err(Error::Precondition(format!(
                        "no trust bundle of {} to authenticate its endpoint",
                        f.trust_domain
                    )))
                }
            };
            let verifier = ztid_spiffe::tls::ServerSvidVerifier::foreign_endpoint(
                ztid_spiffe::tls::shared_roots(roots),
                f.endpoint_spiffe_id.clone(),
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
        _ => {
            let path = core
                .config
                .federation_web_roots
                .clone()
                .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
            let data =
                std::fs::read(&path).map_err(Error::io(format!("reading {}", path.display())))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in load_pem_certs(&data)? {
                let _ = roots.add(c);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(config)
}

/// GETs the bundle document of a relationship's endpoint.
async fn fetch_bundle_document(core: &CaCore, f: &FederationRecord) -> Result<Vec<u8>> {
    let (host, port, path) = parse_endpoint_url(&f.bundle_endpoint_url)?;
    let config = client_config(core, f)?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| Error::InvalidInput(format!("endpoint host {host:?}: {e}")))?;
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| Error::Federation(format!("connecting to {host}:{port}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| {
                Error::refused(
                    RefusalKind::UntrustedEndpoint,
                    format!("endpoint TLS authentication failed: {e}"),
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Error::Federation(format!("HTTP: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(path)
            .header(http::header::HOST, host_header(&host, port))
            .header(http::header::ACCEPT, "application/json")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Error::Federation(format!("HTTP: {e}")))?;
        if resp.status() != http::StatusCode::OK {
            return Err(Error::Federation(format!(
                "bundle endpoint answered {}",
                resp.status()
            )));
        }
        let body = Limited::new(resp.into_body(), MAX_BUNDLE_BYTES)
            .collect()
            .await
            .map_err(|e| Error::Federation(format!("reading the bundle: {e}")))?
            .to_bytes();
        Ok(body.to_vec())
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| Error::Federation("bundle endpoint timed out".into()))?
}

/// The `Host` header for an endpoint: an IPv6 literal in brackets (RFC 9110 §7.2).
fn host_header(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A running poller.
#[derive(Debug)]
pub struct PollerHandle {
    leader: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl PollerHandle {
    /// Whether this server holds the polling role (polls for the cluster).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Stops polling; the role is released with it.
    pub fn stop(&self) {
        self.task.abort();
        self.leader.store(false, Ordering::SeqCst);
    }
}

/// Whether `role` is held, taking it if it is free (at most every [`LEADER_RETRY`]).
fn hold_role(
    core: &CaCore,
    role: &mut Option<LeaderGuard>,
    next_try: &mut tokio::time::Instant,
    leader: &AtomicBool,
) -> bool {
    if role.as_ref().is_some_and(LeaderGuard::is_held) {
        return true;
    }
    if role.take().is_some() {
        leader.store(false, Ordering::SeqCst);
        tracing::warn!(
            role = POLLER_ROLE,
            "lost the federation polling role (its database session ended); trying to take it again"
        );
    }
    let t = tokio::time::Instant::now();
    if t < *next_try {
        return false;
    }
    *next_try = t + LEADER_RETRY;
    match core.store.try_leader(POLLER_ROLE) {
        Ok(Some(g)) => {
            *role = Some(g);
            leader.store(true, Ordering::SeqCst);
            tracing::info!(
                role = POLLER_ROLE,
                server_id = core.store.server_id(),
                "this server polls the federated bundle endpoints for the cluster"
            );
            true
        }
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(role = POLLER_ROLE, error = %e, "could not ask for the federation polling role");
            false
        }
    }
}

/// Polls every relationship per its refresh hint, while this server holds the
/// polling role, until stopped.
pub fn spawn_poller(core: Arc<CaCore>) -> PollerHandle {
    let leader = Arc::new(AtomicBool::new(false));
    let flag = leader.clone();
    let task = tokio::spawn(async move {
        let mut due: BTreeMap<String, i64> = BTreeMap::new();
        // Failed polls in a row, per relationship (the backoff of `poll_interval`).
        let mut failures: BTreeMap<String, u32> = BTreeMap::new();
        // Polls run side by side, one per relationship at most: an endpoint holding
        // its answer (up to FETCH_TIMEOUT) delays no other relationship's poll.
        let mut in_flight: tokio::task::JoinSet<bool> = tokio::task::JoinSet::new();
        let mut polling: BTreeMap<tokio::task::Id, String> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut role: Option<LeaderGuard> = None;
        let mut next_try = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let (id, ok) = match done {
                        Ok((id, ok)) => (id, ok),
                        // Aborted (the role was lost: nothing to count) or panicked (a
                        // failed poll).
                        Err(e) => (e.id(), false),
                    };
                    let Some(td) = polling.remove(&id) else { continue };
                    let failed = if ok {
                        0
                    } else {
                        failures.get(&td).map_or(1, |n| n.saturating_add(1))
                    };
                    failures.insert(td.clone(), failed);
                    if let Ok(f) = core.federation(&td) {
                        due.insert(td, now() + core.poll_interval(&f, failed));
                    }
                    continue;
                }
            }
            if !hold_role(&core, &mut role, &mut next_try, &flag) {
                // The next leader polls everything once at first.
                due.clear();
                in_flight.abort_all();
                polling.clear();
                continue;
            }
            let feds = match core.federations() {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "listing federation relationships failed");
                    continue;
                }
            };
            due.retain(|td, _| feds.iter().any(|f| &f.trust_domain == td));
            failures.retain(|td, _| feds.iter().any(|f| &f.trust_domain == td));
            let t = now();
            for f in feds {
                if polling.values().any(|td| *td == f.trust_domain) {
                    continue;
                }
                let next = due.get(&f.trust_domain).copied().unwrap_or(0);
                // A relationship created or refreshed meanwhile is polled at once.
                let fresh = f.last_refresh_at == 0;
                if t < next && !fresh {
                    continue;
                }
                if fresh {
                    // A new or replaced relationship starts without a backoff.
                    failures.remove(&f.trust_domain);
                }
                let td = f.trust_domain.clone();
                let core = core.clone();
                let poll = in_flight.spawn(async move {
                    let r = core.refresh_federation(&f.trust_domain).await;
                    if let Err(e) = &r {
                        tracing::warn!(trust_domain = %f.trust_domain, error = %e, "federation poll failed");
                    }
                    r.is_ok()
                });
                polling.insert(poll.id(), td);
            }
        }
    });
    PollerHandle {
        leader,
        task: task.abort_handle(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PEER: &str = "b.test";
    const PEER_ENDPOINT_ID: &str = "spiffe://b.test/endpoint";

    use crate::core::testing::empty_core as core;

    /// A peer trust domain's CA (its bundle) and a bundle endpoint certificate it signed.
    struct Peer {
        ca_der: Vec<u8>,
        ca_pem: String,
        tls: Arc<rustls::ServerConfig>,
    }

    fn peer() -> Peer {
        peer_of(PEER, PEER_ENDPOINT_ID)
    }

    fn peer_of(td: &str, endpoint_id: &str) -> Peer {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://{td}").try_into().unwrap(),
        )];
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{td} CA"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::default();
        leaf.subject_alt_names = vec![rcgen::SanType::URI(endpoint_id.try_into().unwrap())];
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf_cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        Peer {
            ca_der: ca_cert.der().to_vec(),
            ca_pem: ca_cert.pem(),
            tls: Arc::new(tls),
        }
    }

    fn bundle_json(ca_der: &[u8], sequence: u64) -> String {
        serde_json::json!({
            "keys": [{"kty": "EC", "use": "x509-svid",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(ca_der)]}],
            "spiffe_sequence": sequence,
            "spiffe_refresh_hint": 60,
        })
        .to_string()
    }

    /// A bundle endpoint that reads one request, says so on `asked`, and answers with
    /// `body` only once `release` fires: a fetch held in flight as long as the test wants.
    async fn held_endpoint(
        tls: Arc<rustls::ServerConfig>,
        body: String,
    ) -> (
        String,
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/", listener.local_addr().unwrap());
        let (asked_tx, asked_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = tokio_rustls::TlsAcceptor::from(tls)
                .accept(tcp)
                .await
                .unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed before its request");
                head.extend_from_slice(&buf[..n]);
            }
            let _ = asked_tx.send(());
            let _ = release_rx.await;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
        (url, asked_rx, release_tx)
    }

    /// A relationship with `p`, created, and a poll of it whose endpoint has been asked
    /// and holds its answer (sequence 7) until `release` fires: the relationship's URL,
    /// the poll and `release`.
    async fn poll_held_at_its_endpoint(
        core: &Arc<CaCore>,
        p: &Peer,
    ) -> (
        String,
        tokio::task::JoinHandle<Result<(TrustBundle, Stored)>>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (url, asked, release) = held_endpoint(p.tls.clone(), bundle_json(&p.ca_der, 7)).await;
        core.create_federation(relationship(&url, p), "test")
            .unwrap();
        let poll = tokio::spawn({
            let core = core.clone();
            async move { core.refresh_federation(PEER).await }
        });
        asked.await.unwrap();
        (url, poll, release)
    }

    fn relationship(url: &str, p: &Peer) -> FederationRecord {
        FederationRecord {
            trust_domain: PEER.into(),
            bundle_endpoint_url: url.into(),
            profile: "https_spiffe".into(),
            endpoint_spiffe_id: PEER_ENDPOINT_ID.into(),
            trust_bundle: p.ca_pem.clone(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_fetch_in_flight_when_its_relationship_is_deleted_stores_nothing() {
        let (_dir, core) = core();
        let p = peer();
        let (_, poll, release) = poll_held_at_its_endpoint(&core, &p).await;
        // The operator cuts the peer off while its endpoint holds the poll's answer.
        core.delete_federation(PEER, "test").unwrap();
        release.send(()).unwrap();
        let err = poll.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Precondition(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("the federation with b.test was deleted while its endpoint was fetched"),
            "{err}"
        );
        assert!(
            core.federated_bundle(PEER).unwrap().is_none(),
            "a deleted relationship's in-flight poll stored its bundle"
        );
        assert!(core.federation(PEER).is_err());
    }

    #[tokio::test]
    async fn a_fetch_in_flight_when_its_relationship_is_replaced_neither_stores_nor_reverts() {
        let (_dir, core) = core();
        let p = peer();
        let (url, poll, release) = poll_held_at_its_endpoint(&core, &p).await;
        // The operator moves the relationship to another endpoint meanwhile.
        let moved = FederationRecord {
            bundle_endpoint_url: "https://127.0.0.1:9/".into(),
            ..relationship(&url, &p)
        };
        core.create_federation(moved, "test").unwrap();
        release.send(()).unwrap();
        let err = poll.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Precondition(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("the federation with b.test was changed while its endpoint was fetched"),
            "{err}"
        );
        assert!(
            core.federated_bundle(PEER).unwrap().is_none(),
            "the old endpoint's answer was stored under the new relationship"
        );
        let now = core.federation(PEER).unwrap();
        assert_eq!(
            now.bundle_endpoint_url, "https://127.0.0.1:9/",
            "the poll wrote the replaced relationship back over the operator's change"
        );
        assert_eq!(
            now.last_refresh_at, 0,
            "the new relationship is polled at once"
        );
        assert!(now.last_error.is_empty());
    }

    #[tokio::test]
    async fn an_undisturbed_fetch_stores_the_bundle_and_records_the_poll() {
        let (_dir, core) = core();
        let p = peer();
        let (_, poll, release) = poll_held_at_its_endpoint(&core, &p).await;
        release.send(()).unwrap();
        let (b, stored) = poll.await.unwrap().unwrap();
        assert_eq!(stored, Stored::Updated);
        assert_eq!(b.sequence, 7);
        assert_eq!(b.x509_authorities, vec![p.ca_der.clone()]);
        let f = core.federation(PEER).unwrap();
        assert!(f.last_refresh_at > 0);
        assert!(f.last_error.is_empty());
    }

    /// A peer that sends no refresh hint is polled at SPIRE's default, not at the lower
    /// bound; a failing one is retried at the lower bound, then less and less often, up
    /// to its normal interval and at most five minutes (it used to be asked every
    /// second for as long as it failed).
    #[test]
    fn polls_back_off_after_failures_and_a_missing_hint_is_not_one_second() {
        let (_dir, core) = core();
        let f = FederationRecord {
            trust_domain: PEER.into(),
            ..Default::default()
        };
        // No bundle yet, or one without a hint: the default.
        assert_eq!(core.poll_interval(&f, 0), MISSING_HINT_SECONDS);
        let p = peer();
        let set = |hint: Option<i64>, sequence: u64| {
            let mut doc: serde_json::Value =
                serde_json::from_str(&bundle_json(&p.ca_der, sequence)).unwrap();
            match hint {
                Some(h) => doc["spiffe_refresh_hint"] = h.into(),
                None => {
                    doc.as_object_mut().unwrap().remove("spiffe_refresh_hint");
                }
            }
            core.set_federated_bundle_from(PEER, "spiffe", doc.to_string().as_bytes(), "test")
                .unwrap();
        };
        set(None, 1);
        assert_eq!(core.poll_interval(&f, 0), MISSING_HINT_SECONDS);
        set(Some(0), 2);
        assert_eq!(core.poll_interval(&f, 0), MISSING_HINT_SECONDS);
        set(Some(60), 3);
        assert_eq!(core.poll_interval(&f, 0), 60);
        // Failures: 1, 2, 4, ... seconds, never past the hint's interval.
        let backoff: Vec<i64> = (1..=8).map(|n| core.poll_interval(&f, n)).collect();
        assert_eq!(backoff, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        // A long hint: the backoff stops at five minutes.
        set(Some(3600), 4);
        assert_eq!(core.poll_interval(&f, 0), 3600);
        assert_eq!(core.poll_interval(&f, 30), FAILED_POLL_BACKOFF_MAX_SECONDS);
        assert_eq!(
            core.poll_interval(&f, u32::MAX),
            FAILED_POLL_BACKOFF_MAX_SECONDS
        );
    }

    #[test]
    fn an_ipv6_endpoint_is_asked_with_its_address_in_brackets() {
        let (host, port, _) =
            crate::federation::relationships::parse_endpoint_url("https://[::1]:8443/b").unwrap();
        assert_eq!(host_header(&host, port), "[::1]:8443");
        assert_eq!(host_header("b.test", 443), "b.test:443");
    }

    /// The poller asks every due relationship side by side: an endpoint that holds its
    /// answer (a hostile or hung peer, up to the 10 s fetch timeout) delays no other
    /// relationship's poll. They used to be polled one after another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_endpoint_delays_no_other_relationships_poll() {
        let (_dir, core) = core();
        // "a.test" sorts first, and its endpoint never answers.
        let hung = peer_of("a.test", "spiffe://a.test/endpoint");
        let (hung_url, hung_asked, _never) =
            held_endpoint(hung.tls.clone(), bundle_json(&hung.ca_der, 1)).await;
        core.create_federation(
            FederationRecord {
                trust_domain: "a.test".into(),
                endpoint_spiffe_id: "spiffe://a.test/endpoint".into(),
                ..relationship(&hung_url, &hung)
            },
            "test",
        )
        .unwrap();
        let p = peer();
        let (url, asked, release) = held_endpoint(p.tls.clone(), bundle_json(&p.ca_der, 7)).await;
        tokio::spawn(async move {
            if asked.await.is_ok() {
                let _ = release.send(());
            }
        });
        core.create_federation(relationship(&url, &p), "test")
            .unwrap();
        let poller = spawn_poller(core.clone());
        hung_asked.await.unwrap();
        // Well within the hung fetch's timeout.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        while core.federated_bundle(PEER).unwrap().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "b.test's poll waited behind a.test's held one"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(core.federated_bundle(PEER).unwrap().unwrap().sequence, 7);
        assert!(core.federated_bundle("a.test").unwrap().is_none());
        poller.stop();
    }
}
