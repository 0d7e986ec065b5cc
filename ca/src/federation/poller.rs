//! Polling relationships' bundle endpoints: the TLS client per profile, one fetch,
//! storing what it brought, and the loop that polls each per its refresh hint.

use std::collections::BTreeMap;
use std::path::PathBuf;
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
use crate::{Error, RefusalKind, Result};

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

/// Polls every relationship per its refresh hint, forever.
pub fn spawn_poller(core: Arc<CaCore>) {
    tokio::spawn(async move {
        let mut due: BTreeMap<String, i64> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
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
}
