//! The SPIFFE bundle endpoint server: `https_spiffe` with the server's own SVID, or
//! `https_web` with a configured certificate; no client authentication.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;

use super::http::{http1_listener, internal_error, not_found, refuse_unless_get, respond, Body};
use super::{load_pem_certs, provider};
use crate::core::CaCore;
use crate::{Error, Result};

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
