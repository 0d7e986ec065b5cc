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

impl CaCore {
    /// Fetches a relationship's endpoint once and stores the bundle. A refusal is
    /// logged, audited and recorded in the relationship; nothing else changes.
    pub async fn refresh_federation(&self, td: &str) -> Result<(TrustBundle, Stored)> {
        let mut f = self.federation(td)?;
        let result = self.fetch_and_store(&f).await;
        f.last_refresh_at = now();
        f.last_error = match &result {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        // The relationship may have been deleted meanwhile: only update a live one.
        if self.federation(&f.trust_domain).is_ok() {
            self.store
                .put_federation(&f.trust_domain, &serde_json::to_vec(&f)?)?;
        }
        result
    }

    async fn fetch_and_store(&self, f: &FederationRecord) -> Result<(TrustBundle, Stored)> {
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
        let stored = self.set_federated_bundle(bundle, source)?;
        Ok((
            self.federated_bundle(&f.trust_domain)?.unwrap_or_default(),
            stored,
        ))
    }

    /// Seconds until a relationship's next poll: the stored bundle's refresh hint,
    /// bounded by config; a failed poll retries at the lower bound (at least 1 s).
    fn poll_interval(&self, f: &FederationRecord) -> i64 {
        let min = self.config.federation_min_refresh_seconds.max(1);
        let max = self.config.federation_max_refresh_seconds.max(min);
        if !f.last_error.is_empty() {
            return min;
        }
        let hint = self
            .federated_bundle(&f.trust_domain)
            .ok()
            .flatten()
            .map_or(min, |b| b.refresh_hint_seconds);
        hint.clamp(min, max)
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
            .header(http::header::HOST, format!("{host}:{port}"))
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
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut role: Option<LeaderGuard> = None;
        let mut next_try = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if !hold_role(&core, &mut role, &mut next_try, &flag) {
                // The next leader polls everything once at first.
                due.clear();
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
            let t = now();
            for f in feds {
                let next = due.get(&f.trust_domain).copied().unwrap_or(0);
                // A relationship created or refreshed meanwhile is polled at once.
                let fresh = f.last_refresh_at == 0;
                if t < next && !fresh {
                    continue;
                }
                let r = core.refresh_federation(&f.trust_domain).await;
                if let Err(e) = &r {
                    tracing::warn!(trust_domain = %f.trust_domain, error = %e, "federation poll failed");
                }
                let f = core.federation(&f.trust_domain).unwrap_or(f);
                due.insert(f.trust_domain.clone(), now() + core.poll_interval(&f));
            }
        }
    });
    PollerHandle {
        leader,
        task: task.abort_handle(),
    }
}
