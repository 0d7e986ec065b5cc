//! Federation with other trust domains (SPIFFE Federation spec) and OIDC discovery.
//!
//! - Federated bundles: one per trust domain, stored apart from this domain's own
//!   bundle and never merged with it or with each other. A bundle whose
//!   `spiffe_sequence` is lower than the stored one is ignored.
//! - Relationships: (trust domain, bundle endpoint URL, profile) polled per the
//!   fetched bundle's `spiffe_refresh_hint`, bounded by config.
//! - The bundle endpoint server (`https_spiffe` with the server's own SVID, or
//!   `https_web` with a configured certificate), no client authentication.
//! - The OIDC discovery document and its JWKS on their own listener.
//!
//! Every change and every refusal is logged and audited with its reason.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use serde_json::json;
use ztid_spiffe::bundle::TrustBundle;
use ztid_spiffe::jwt::JwtKey;

use crate::core::{now, CaCore};
use crate::{Error, Result};

/// Largest bundle document accepted from an endpoint.
const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// Time allowed for one bundle endpoint fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// `[[federation]]` in the server config, and the stored relationship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The federated trust domain (`example.org`).
    pub trust_domain: String,
    /// Its bundle endpoint (`https://...`).
    pub bundle_endpoint_url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// `https_spiffe`: the SPIFFE ID the endpoint must present.
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    /// `https_spiffe`: initial trust bundle (SPIFFE JSON or PEM), used while no bundle
    /// of the domain is stored. In config: a file path; stored: its contents.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
}

/// A stored relationship.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationRecord {
    /// The federated trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint URL.
    pub bundle_endpoint_url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// `https_spiffe`: expected endpoint SPIFFE ID.
    pub endpoint_spiffe_id: String,
    /// Initial trust bundle text (SPIFFE JSON or PEM), may be empty.
    pub trust_bundle: String,
    /// Last poll attempt, Unix seconds.
    #[serde(default)]
    pub last_refresh_at: i64,
    /// Why the last poll failed (empty: it succeeded).
    #[serde(default)]
    pub last_error: String,
}

/// A stored federated bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BundleRecord {
    trust_domain: String,
    x509_authorities: Vec<String>,
    jwt_authorities: Vec<(String, String)>,
    sequence: u64,
    refresh_hint_seconds: i64,
    updated_at: i64,
}

impl From<&TrustBundle> for BundleRecord {
    fn from(b: &TrustBundle) -> Self {
        Self {
            trust_domain: b.trust_domain.clone(),
            x509_authorities: b.x509_authorities.iter().map(hex::encode).collect(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| (k.kid.clone(), hex::encode(&k.spki)))
                .collect(),
            sequence: b.sequence,
            refresh_hint_seconds: b.refresh_hint_seconds,
            updated_at: now(),
        }
    }
}

impl BundleRecord {
    fn to_bundle(&self) -> Result<TrustBundle> {
        let bad = |_| Error::Store("corrupt federated bundle record".into());
        Ok(TrustBundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities: self
                .x509_authorities
                .iter()
                .map(|h| hex::decode(h).map_err(bad))
                .collect::<Result<_>>()?,
            jwt_authorities: self
                .jwt_authorities
                .iter()
                .map(|(kid, spki)| {
                    Ok(JwtKey {
                        kid: kid.clone(),
                        spki: hex::decode(spki).map_err(bad)?,
                    })
                })
                .collect::<Result<_>>()?,
            sequence: self.sequence,
            refresh_hint_seconds: self.refresh_hint_seconds,
            tainted: Vec::new(),
        })
    }
}

/// Where a federated bundle came from (for logs and audit).
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// `bundle set` by an operator.
    Operator(&'a str),
    /// A bundle endpoint poll.
    Endpoint(&'a str),
}

impl Source<'_> {
    fn describe(&self) -> String {
        match self {
            Source::Operator(c) => format!("operator {c}"),
            Source::Endpoint(u) => format!("endpoint {u}"),
        }
    }
}

/// What storing a federated bundle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// The bundle is new or newer and now in force.
    Updated,
    /// Same sequence and content as the stored one: nothing to do.
    Unchanged,
}

/// Parses a bundle file in `format` (`pem` or `spiffe`) for `td`; a PEM bundle gets
/// sequence `pem_sequence` (it has none of its own).
pub fn parse_bundle(td: &str, format: &str, data: &[u8], pem_sequence: u64) -> Result<TrustBundle> {
    let refused = |e: ztid_spiffe::Error| match e {
        ztid_spiffe::Error::Refused(r) => Error::InvalidArgument(r),
        other => Error::InvalidArgument(other.to_string()),
    };
    match format {
        "spiffe" => {
            let text = std::str::from_utf8(data)
                .map_err(|_| Error::InvalidArgument("bundle is not UTF-8".into()))?;
            TrustBundle::from_spiffe_json(td, text).map_err(refused)
        }
        "pem" => TrustBundle::from_pem(td, data, pem_sequence).map_err(refused),
        other => Err(Error::InvalidArgument(format!(
            "unknown bundle format {other:?} (pem, spiffe)"
        ))),
    }
}

/// Sniffs the format of an initial trust bundle: JSON or PEM.
fn sniff_format(data: &[u8]) -> &'static str {
    if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        "spiffe"
    } else {
        "pem"
    }
}

fn check_trust_domain(core: &CaCore, td: &str) -> Result<String> {
    // One rule for names and IDs: canonical spelling only (ztid_spiffe::spiffe_id).
    let parsed = ztid_spiffe::spiffe_id::parse_trust_domain(td).map_err(|e| {
        Error::InvalidArgument(format!("trust domain {}", crate::csr_policy::reason(e)))
    })?;
    if parsed == core.trust_domain {
        return Err(Error::InvalidArgument(
            "cannot federate with this server's own trust domain".into(),
        ));
    }
    Ok(parsed.to_string())
}

/// A stable digest of every federated bundle (never 0).
fn version_of(bundles: &[TrustBundle]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for b in bundles {
        ctx.update(b.trust_domain.as_bytes());
        ctx.update(&[0]);
        ctx.update(&b.sequence.to_be_bytes());
        for der in &b.x509_authorities {
            ctx.update(&(der.len() as u64).to_be_bytes());
            ctx.update(der);
        }
        for k in &b.jwt_authorities {
            ctx.update(k.kid.as_bytes());
            ctx.update(&[0]);
            ctx.update(&k.spki);
        }
        ctx.update(&[0xff]);
    }
    let d = ctx.finish();
    let v = u64::from_be_bytes(d.as_ref()[..8].try_into().expect("8 bytes"));
    v.max(1)
}

impl CaCore {
    /// The stored bundle of a federated trust domain.
    pub fn federated_bundle(&self, td: &str) -> Result<Option<TrustBundle>> {
        match self.store.get_federated_bundle(td)? {
            Some(v) => Ok(Some(
                serde_json::from_slice::<BundleRecord>(&v)?.to_bundle()?,
            )),
            None => Ok(None),
        }
    }

    /// Every federated bundle, ordered by trust domain.
    pub fn federated_bundles(&self) -> Result<Vec<TrustBundle>> {
        self.store
            .list_federated_bundles()?
            .iter()
            .map(|v| serde_json::from_slice::<BundleRecord>(v)?.to_bundle())
            .collect()
    }

    /// For an agent's sync: every federated bundle and their version, unless the
    /// agent already holds that version.
    pub fn federated_for_sync(&self, held_version: u64) -> Result<Option<(Vec<TrustBundle>, u64)>> {
        let all = self.federated_bundles()?;
        let v = version_of(&all);
        Ok((v != held_version).then_some((all, v)))
    }

    fn refuse_bundle(&self, td: &str, source: Source<'_>, reason: &str) {
        tracing::warn!(event = "federated_bundle_refused", trust_domain = td, source = %source.describe(), reason, "federated bundle refused; nothing changed");
        if let Err(e) = self.record(
            json!({"type": "federated_bundle_refused", "trust_domain": td,
            "source": source.describe(), "reason": reason}),
        ) {
            tracing::error!(error = %e, "could not audit a federated bundle refusal");
        }
    }

    /// Stores a federated bundle unless its sequence is lower than the stored one.
    /// Refusals are logged and audited with their reason and change nothing.
    pub fn set_federated_bundle(&self, bundle: TrustBundle, source: Source<'_>) -> Result<Stored> {
        let td = check_trust_domain(self, &bundle.trust_domain)?;
        let stored = self.federated_bundle(&td)?;
        if let Some(s) = &stored {
            if bundle.sequence < s.sequence {
                let reason = format!(
                    "spiffe_sequence {} is lower than the stored {}; bundle ignored",
                    bundle.sequence, s.sequence
                );
                self.refuse_bundle(&td, source, &reason);
                return Err(Error::FailedPrecondition(reason));
            }
            let same = s.x509_authorities == bundle.x509_authorities
                && s.jwt_authorities == bundle.jwt_authorities;
            if bundle.sequence == s.sequence && same {
                if s.refresh_hint_seconds != bundle.refresh_hint_seconds {
                    self.store.put_federated_bundle(
                        &td,
                        &serde_json::to_vec(&BundleRecord::from(&bundle))?,
                    )?;
                }
                return Ok(Stored::Unchanged);
            }
            if bundle.sequence == s.sequence && bundle.sequence != 0 {
                let reason = format!(
                    "content changed but spiffe_sequence stayed {}; bundle ignored",
                    bundle.sequence
                );
                self.refuse_bundle(&td, source, &reason);
                return Err(Error::FailedPrecondition(reason));
            }
        }
        let mut bundle = bundle;
        bundle.trust_domain = td.clone();
        self.store
            .put_federated_bundle(&td, &serde_json::to_vec(&BundleRecord::from(&bundle))?)?;
        self.store.flush()?;
        self.record(
            json!({"type": "federated_bundle_updated", "trust_domain": td,
            "source": source.describe(), "sequence": bundle.sequence,
            "previous_sequence": stored.as_ref().map(|s| s.sequence),
            "x509_authorities": bundle.x509_authorities.len(),
            "jwt_authorities": bundle.jwt_authorities.iter().map(|k| &k.kid).collect::<Vec<_>>()}),
        )?;
        tracing::warn!(event = "federated_bundle_updated", trust_domain = %td, source = %source.describe(),
            sequence = bundle.sequence, x509_authorities = bundle.x509_authorities.len(),
            jwt_authorities = bundle.jwt_authorities.len(), "federated bundle updated");
        Ok(Stored::Updated)
    }

    /// `bundle set`: parses and stores an out-of-band bundle.
    pub fn set_federated_bundle_from(
        &self,
        td: &str,
        format: &str,
        data: &[u8],
        caller: &str,
    ) -> Result<(TrustBundle, Stored)> {
        let td = check_trust_domain(self, td)?;
        let pem_seq = self.federated_bundle(&td)?.map_or(1, |b| b.sequence + 1);
        let bundle = match parse_bundle(&td, format, data, pem_seq) {
            Ok(b) => b,
            Err(e) => {
                self.refuse_bundle(&td, Source::Operator(caller), &e.to_string());
                return Err(e);
            }
        };
        let stored = self.set_federated_bundle(bundle, Source::Operator(caller))?;
        Ok((self.federated_bundle(&td)?.unwrap_or_default(), stored))
    }

    /// Deletes a federated bundle.
    pub fn delete_federated_bundle(&self, td: &str, caller: &str) -> Result<TrustBundle> {
        let td = check_trust_domain(self, td)?;
        let b = self
            .federated_bundle(&td)?
            .ok_or_else(|| Error::NotFound(format!("no bundle of {td} is stored")))?;
        self.store.delete_federated_bundle(&td)?;
        self.store.flush()?;
        self.record(
            json!({"type": "federated_bundle_deleted", "trust_domain": td, "caller": caller}),
        )?;
        tracing::warn!(event = "federated_bundle_deleted", trust_domain = %td, caller, "federated bundle deleted");
        Ok(b)
    }

    /// Every federation relationship.
    pub fn federations(&self) -> Result<Vec<FederationRecord>> {
        self.store
            .list_federations()?
            .iter()
            .map(|v| Ok(serde_json::from_slice(v)?))
            .collect()
    }

    /// One relationship.
    pub fn federation(&self, td: &str) -> Result<FederationRecord> {
        let td = check_trust_domain(self, td)?;
        self.federations()?
            .into_iter()
            .find(|f| f.trust_domain == td)
            .ok_or_else(|| Error::NotFound(format!("no federation with {td}")))
    }

    /// Creates or replaces a relationship after checking it.
    pub fn create_federation(
        &self,
        mut f: FederationRecord,
        caller: &str,
    ) -> Result<FederationRecord> {
        f.trust_domain = check_trust_domain(self, &f.trust_domain)?;
        parse_endpoint_url(&f.bundle_endpoint_url)?;
        match f.profile.as_str() {
            "https_spiffe" => {
                let id =
                    ztid_spiffe::spiffe_id::parse(&f.endpoint_spiffe_id).map_err(|e| {
                        Error::InvalidArgument(format!(
                            "https_spiffe needs --endpoint-spiffe-id: {}",
                            crate::csr_policy::reason(e)
                        ))
                    })?;
                if id.trust_domain().to_string() != f.trust_domain {
                    return Err(Error::InvalidArgument(format!(
                        "endpoint SPIFFE ID {} is not in {}",
                        f.endpoint_spiffe_id, f.trust_domain
                    )));
                }
                if f.trust_bundle.is_empty() && self.federated_bundle(&f.trust_domain)?.is_none() {
                    return Err(Error::InvalidArgument(format!(
                        "https_spiffe needs --trust-bundle: no bundle of {} is stored",
                        f.trust_domain
                    )));
                }
                if !f.trust_bundle.is_empty() {
                    parse_bundle(
                        &f.trust_domain,
                        sniff_format(f.trust_bundle.as_bytes()),
                        f.trust_bundle.as_bytes(),
                        0,
                    )?;
                }
            }
            "https_web" => {
                if !f.endpoint_spiffe_id.is_empty() {
                    return Err(Error::InvalidArgument(
                        "--endpoint-spiffe-id is for the https_spiffe profile".into(),
                    ));
                }
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown profile {other:?} (https_web, https_spiffe)"
                )))
            }
        }
        f.last_refresh_at = 0;
        f.last_error.clear();
        self.store
            .put_federation(&f.trust_domain, &serde_json::to_vec(&f)?)?;
        self.store.flush()?;
        self.record(
            json!({"type": "federation_created", "trust_domain": f.trust_domain,
            "url": f.bundle_endpoint_url, "profile": f.profile,
            "endpoint_spiffe_id": f.endpoint_spiffe_id, "caller": caller}),
        )?;
        tracing::warn!(event = "federation_created", trust_domain = %f.trust_domain, url = %f.bundle_endpoint_url, profile = %f.profile, caller, "federation relationship created");
        Ok(f)
    }

    /// Deletes a relationship (the stored bundle stays until `bundle delete`).
    pub fn delete_federation(&self, td: &str, caller: &str) -> Result<FederationRecord> {
        let td = check_trust_domain(self, td)?;
        let v = self
            .store
            .delete_federation(&td)?
            .ok_or_else(|| Error::NotFound(format!("no federation with {td}")))?;
        self.store.flush()?;
        self.record(json!({"type": "federation_deleted", "trust_domain": td, "caller": caller}))?;
        tracing::warn!(event = "federation_deleted", trust_domain = %td, caller, "federation relationship deleted");
        Ok(serde_json::from_slice(&v)?)
    }

    /// Applies `[[federation]]` from config (at start).
    pub fn apply_configured_federations(&self) -> Result<()> {
        for c in self.config.federation.clone() {
            let trust_bundle = match &c.trust_bundle {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(Error::io(format!("reading {}", p.display())))?,
                None => String::new(),
            };
            let rec = FederationRecord {
                trust_domain: c.trust_domain.clone(),
                bundle_endpoint_url: c.bundle_endpoint_url.clone(),
                profile: c.profile.clone(),
                endpoint_spiffe_id: c.endpoint_spiffe_id.clone().unwrap_or_default(),
                trust_bundle,
                ..Default::default()
            };
            let existing = self.federation(&c.trust_domain).ok();
            let same = existing.as_ref().is_some_and(|e| {
                e.bundle_endpoint_url == rec.bundle_endpoint_url
                    && e.profile == rec.profile
                    && e.endpoint_spiffe_id == rec.endpoint_spiffe_id
                    && e.trust_bundle == rec.trust_bundle
            });
            if !same {
                self.create_federation(rec, "config")?;
            }
        }
        Ok(())
    }

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

/// Splits an endpoint URL; it must be `https` without userinfo (Federation spec).
pub fn parse_endpoint_url(url: &str) -> Result<(String, u16, String)> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("bundle endpoint URL {url:?}: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(Error::InvalidArgument(format!(
            "bundle endpoint URL {url:?} must use https"
        )));
    }
    let auth = uri.authority().ok_or_else(|| {
        Error::InvalidArgument(format!("bundle endpoint URL {url:?} has no host"))
    })?;
    if auth.as_str().contains('@') {
        return Err(Error::InvalidArgument(format!(
            "bundle endpoint URL {url:?} must not carry userinfo"
        )));
    }
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let path = uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    Ok((host, auth.port_u16().unwrap_or(443), path))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_pem_certs(data: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    Ok(pem::parse_many(data)
        .map_err(|e| Error::Config(format!("PEM: {e}")))?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
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
                    return Err(Error::FailedPrecondition(format!(
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
        .map_err(|e| Error::InvalidArgument(format!("endpoint host {host:?}: {e}")))?;
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| Error::FailedPrecondition(format!("connecting to {host}:{port}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| {
                Error::PermissionDenied(format!("endpoint TLS authentication failed: {e}"))
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Error::FailedPrecondition(format!("HTTP: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(path)
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::ACCEPT, "application/json")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Error::FailedPrecondition(format!("HTTP: {e}")))?;
        if resp.status() != http::StatusCode::OK {
            return Err(Error::FailedPrecondition(format!(
                "bundle endpoint answered {}",
                resp.status()
            )));
        }
        let body = Limited::new(resp.into_body(), MAX_BUNDLE_BYTES)
            .collect()
            .await
            .map_err(|e| Error::FailedPrecondition(format!("reading the bundle: {e}")))?
            .to_bytes();
        Ok(body.to_vec())
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| Error::FailedPrecondition("bundle endpoint timed out".into()))?
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

/// The server's current SVID, for the `https_spiffe` bundle endpoint.
struct OwnSvid(Arc<CaCore>);

impl std::fmt::Debug for OwnSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnSvid")
    }
}

impl ResolvesServerCert for OwnSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.server_svid())
    }
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn bundle_endpoint_tls(core: &Arc<CaCore>) -> Result<Arc<rustls::ServerConfig>> {
    let resolver: Arc<dyn ResolvesServerCert> = match (
        &core.config.bundle_endpoint_cert,
        &core.config.bundle_endpoint_key,
    ) {
        (Some(cert), Some(key)) => {
            let chain = load_pem_certs(
                &std::fs::read(cert).map_err(Error::io(format!("reading {}", cert.display())))?,
            )?;
            let key_pem = pem::parse(
                std::fs::read(key).map_err(Error::io(format!("reading {}", key.display())))?,
            )
            .map_err(|e| Error::Config(format!("{}: {e}", key.display())))?;
            let der = PrivateKeyDer::Pkcs8(key_pem.into_contents().into());
            let signer = rustls::crypto::ring::sign::any_supported_type(&der)
                .map_err(|e| Error::Config(format!("bundle endpoint key: {e}")))?;
            Arc::new(FixedCert(Arc::new(CertifiedKey::new(chain, signer))))
        }
        (None, None) => Arc::new(OwnSvid(core.clone())),
        _ => {
            return Err(Error::Config(
                "bundle_endpoint_cert and bundle_endpoint_key go together".into(),
            ))
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type Body = Full<Bytes>;

fn respond(status: http::StatusCode, ctype: &str, body: String) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

/// Both HTTP/1 endpoints answer GET only.
fn refuse_unless_get(req: &http::Request<hyper::body::Incoming>) -> Option<http::Response<Body>> {
    (req.method() != http::Method::GET).then(|| {
        respond(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        )
    })
}

fn not_found() -> http::Response<Body> {
    respond(
        http::StatusCode::NOT_FOUND,
        "text/plain",
        "not found\n".into(),
    )
}

fn internal_error(e: &dyn std::fmt::Display) -> http::Response<Body> {
    respond(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        format!("{e}\n"),
    )
}

fn bundle_endpoint_response(
    core: &CaCore,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    if let Some(refused) = refuse_unless_get(req) {
        return refused;
    }
    if req.uri().path() != "/" {
        return not_found();
    }
    match core.bundle().to_spiffe_json() {
        Ok(j) => respond(http::StatusCode::OK, "application/json; charset=utf-8", j),
        Err(e) => internal_error(&e),
    }
}

/// The connection limits of one of the HTTP/1 endpoints, sharing the TCP listeners'
/// descriptor `budget`.
fn http1_listener(
    name: &'static str,
    max_connections: usize,
    core: &CaCore,
    budget: &Arc<crate::listeners::DescriptorBudget>,
) -> Arc<crate::listeners::Listener> {
    let limits = &core.config.limits;
    crate::listeners::Listener::new(
        name,
        max_connections,
        crate::listeners::Timeouts::http1(limits),
        Some(budget.clone()),
    )
}

/// Serves the SPIFFE bundle endpoint (off unless `bundle_endpoint` is set), within the
/// HTTP/1 listener limits ([`crate::listeners`]).
pub async fn spawn_bundle_endpoint(
    core: Arc<CaCore>,
    budget: &Arc<crate::listeners::DescriptorBudget>,
) -> Result<()> {
    let Some(addr) = core.config.bundle_endpoint else {
        return Ok(());
    };
    let tls = bundle_endpoint_tls(&core)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(Error::io(format!("binding the bundle endpoint {addr}")))?;
    let profile = if core.config.bundle_endpoint_cert.is_some() {
        "https_web"
    } else {
        "https_spiffe"
    };
    tracing::info!(%addr, profile, "bundle endpoint listening");
    let bounded = http1_listener(
        "bundle endpoint",
        core.config.limits.bundle_endpoint_max_connections,
        &core,
        budget,
    );
    crate::listeners::serve_http1(
        listener,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
        bounded,
        move |req| bundle_endpoint_response(&core, req),
    );
    Ok(())
}

/// The OIDC discovery document for `issuer`.
pub fn oidc_document(issuer: &str) -> serde_json::Value {
    let base = issuer.trim_end_matches('/');
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{base}/keys"),
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    })
}

/// The JWT authorities as a JWKS for OIDC relying parties (`use: sig`, `alg: ES256`).
pub fn oidc_jwks(core: &CaCore) -> Result<serde_json::Value> {
    let jwks: serde_json::Value = serde_json::from_str(
        &core
            .bundle()
            .jwks_json()
            .map_err(|e| Error::Certificate(e.to_string()))?,
    )?;
    let keys = jwks["keys"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut k| {
            k["use"] = json!("sig");
            k["alg"] = json!(if k["crv"] == "P-384" {
                "ES384"
            } else {
                "ES256"
            });
            k
        })
        .collect::<Vec<_>>();
    Ok(json!({ "keys": keys }))
}

/// Serves OIDC discovery on its own plain-HTTP listener (off unless `[oidc]` is set),
/// within the HTTP/1 listener limits ([`crate::listeners`]).
pub async fn spawn_oidc(
    core: Arc<CaCore>,
    budget: &Arc<crate::listeners::DescriptorBudget>,
) -> Result<()> {
    let Some(oidc) = core.config.oidc.clone() else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(oidc.bind)
        .await
        .map_err(Error::io(format!(
            "binding the OIDC listener {}",
            oidc.bind
        )))?;
    tracing::info!(addr = %oidc.bind, issuer = %oidc.issuer, "OIDC discovery listening");
    let bounded = http1_listener(
        "OIDC discovery",
        core.config.limits.oidc_max_connections,
        &core,
        budget,
    );
    let issuer = oidc.issuer;
    crate::listeners::serve_http1(listener, None, bounded, move |req| {
        oidc_response(&core, &issuer, req)
    });
    Ok(())
}

fn oidc_response(
    core: &CaCore,
    issuer: &str,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    if let Some(refused) = refuse_unless_get(req) {
        return refused;
    }
    match req.uri().path() {
        "/.well-known/openid-configuration" => respond(
            http::StatusCode::OK,
            "application/json",
            oidc_document(issuer).to_string(),
        ),
        "/keys" => match oidc_jwks(core) {
            Ok(j) => respond(http::StatusCode::OK, "application/json", j.to_string()),
            Err(e) => internal_error(&e),
        },
        _ => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        assert_eq!(
            parse_endpoint_url("https://127.0.0.1:8443/").unwrap(),
            ("127.0.0.1".into(), 8443, "/".into())
        );
        assert!(parse_endpoint_url("http://a.test/").is_err());
        assert!(parse_endpoint_url("https://u:p@a.test/").is_err());
    }

    #[test]
    fn versions_differ() {
        let a = TrustBundle {
            trust_domain: "a.test".into(),
            sequence: 1,
            ..Default::default()
        };
        let mut b = a.clone();
        b.sequence = 2;
        assert_ne!(version_of(std::slice::from_ref(&a)), version_of(&[b]));
        assert_ne!(version_of(&[]), 0);
    }
}
