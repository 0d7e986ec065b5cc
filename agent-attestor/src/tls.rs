//! rustls verifiers for the node API's mutual TLS, both ends.
//!
//! Neither end can use Web-PKI name checks: SVIDs carry a SPIFFE ID in a URI SAN and
//! no DNS name. So the server verifies agents' client certificates against the
//! current trust bundle (an agent may also connect without one, for `Attest` only;
//! every other RPC checks the peer certificate itself), and the agent verifies the
//! server's chain against its bundle and then requires the server's SPIFFE ID.
//! Both read the bundle through an [`ArcSwap`] so a rotated bundle takes effect on
//! the next handshake without rebuilding any TLS config.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::svid::{verify_chain, Usage};

/// The trust domain's X.509 authorities (DER), swappable at run time.
pub type SharedRoots = Arc<ArcSwap<Vec<CertificateDer<'static>>>>;

/// Builds a [`SharedRoots`] from DER certificates.
pub fn shared_roots(roots: Vec<Vec<u8>>) -> SharedRoots {
    Arc::new(ArcSwap::from_pointee(
        roots.into_iter().map(CertificateDer::from).collect(),
    ))
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn tls_error(e: crate::Error) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

/// The server's check of agents' client certificates.
#[derive(Debug)]
pub struct AgentCertVerifier {
    roots: SharedRoots,
    mandatory: bool,
}

impl AgentCertVerifier {
    /// Verifies client chains against `roots`; a client may also present none (the
    /// node API, where `Attest` comes before any SVID and every other RPC checks).
    pub fn new(roots: SharedRoots) -> Self {
        Self {
            roots,
            mandatory: false,
        }
    }

    /// Like [`AgentCertVerifier::new`], but a handshake without a certificate fails.
    pub fn mandatory(roots: SharedRoots) -> Self {
        Self {
            roots,
            mandatory: true,
        }
    }
}

impl ClientCertVerifier for AgentCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        verify_chain(&chain, &self.roots.load(), now, Usage::Client).map_err(tls_error)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The agent's check of the server: chain to the bundle, then the exact SPIFFE ID.
#[derive(Debug)]
pub struct ServerSvidVerifier {
    roots: Option<SharedRoots>,
    expected_id: String,
}

impl ServerSvidVerifier {
    /// Requires a chain to `roots` whose leaf carries exactly `expected_id`. The leaf's
    /// ID is accepted only in canonical spelling, so `expected_id` must be canonical
    /// too (build it with [`crate::spiffe_id`]); any other spelling matches nothing.
    pub fn new(roots: SharedRoots, expected_id: String) -> Self {
        Self {
            roots: Some(roots),
            expected_id,
        }
    }

    /// Accepts any server certificate. Only for `--insecure-bootstrap`: the first
    /// attestation, whose answer carries the bundle every later connection checks.
    pub fn insecure_bootstrap() -> Self {
        Self {
            roots: None,
            expected_id: String::new(),
        }
    }
}

impl ServerCertVerifier for ServerSvidVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let id = verify_chain(&chain, &roots.load(), now, Usage::Server).map_err(tls_error)?;
        // Both sides are canonical strings: equal strings are the same identity.
        if id.to_string() != self.expected_id {
            return Err(rustls::Error::General(format!(
                "server presented SPIFFE ID {id}, expected {}",
                self.expected_id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
