//! rustls verifiers for the node API's mutual TLS, both ends.
//!
//! Neither end can use Web-PKI name checks: SVIDs carry a SPIFFE ID in a URI SAN and
//! no DNS name. So the server verifies agents' client certificates against the
//! current trust bundle (an agent may also connect without one, for `Attest` only;
//! every other RPC checks the peer certificate itself), and the agent verifies the
//! server's chain against its bundle and then requires the server's SPIFFE ID, issued
//! by an X.509 authority of its trust domain (see [`ServerSvidVerifier`]).
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

/// The agent's check of the server: the exact SPIFFE ID, in a chain to the bundle whose
/// leaf was signed by an X.509 authority of the server's trust domain.
///
/// Why the issuer: under an upstream root (`[upstream]`) the bundle is the
/// organisation's root, so a chain to the bundle proves only that *some* CA under that
/// root signed the leaf: another trust domain's CA, or the root itself, could sign
/// `spiffe://TD/ztid/server` and receive the agent's join token. ztid's authorities
/// (self-signed or upstream-signed) carry their trust domain's ID `spiffe://TD` as
/// their one URI SAN, as the X.509-SVID spec describes for signing certificates, so the
/// certificate that directly signed the server's SVID must carry exactly that.
#[derive(Debug)]
pub struct ServerSvidVerifier {
    roots: Option<SharedRoots>,
    expected_id: String,
    /// The URI SAN required of the leaf's issuer (`spiffe://TD`); `None` when not pinned
    /// ([`ServerSvidVerifier::foreign_endpoint`]), or when `expected_id` is not a canonical
    /// ID (then every leaf fails the ID check anyway).
    issuer_id: IssuerPin,
}

#[derive(Debug)]
enum IssuerPin {
    /// The trust domain's ID the issuing CA must carry.
    TrustDomain(String),
    /// No issuer check (another implementation's endpoint, see `foreign_endpoint`).
    Unpinned,
}

impl ServerSvidVerifier {
    /// Requires a chain to `roots` whose leaf carries exactly `expected_id` and was
    /// signed by a CA whose one URI SAN is `expected_id`'s trust domain ID (a ztid
    /// authority of that trust domain). The leaf's ID is accepted only in canonical
    /// spelling, so `expected_id` must be canonical too (build it with
    /// [`crate::spiffe_id`]); any other spelling matches nothing.
    pub fn new(roots: SharedRoots, expected_id: String) -> Self {
        let issuer_id = match crate::spiffe_id::parse(&expected_id) {
            Ok(id) => IssuerPin::TrustDomain(format!(
                "{}{}",
                crate::spiffe_id::SCHEME_PREFIX,
                id.trust_domain().as_str()
            )),
            // Nothing can match a non-canonical expected ID; pin to a value no CA has.
            Err(_) => IssuerPin::TrustDomain(String::new()),
        };
        Self {
            roots: Some(roots),
            expected_id,
            issuer_id,
        }
    }

    /// Chain to `roots` and the exact `expected_id`, without the issuer check: for a
    /// federated trust domain's bundle endpoint, which another SPIFFE implementation may
    /// serve with CA certificates that do not carry their trust domain's ID (the spec
    /// makes that optional). The roots there are the peer's own bundle.
    pub fn foreign_endpoint(roots: SharedRoots, expected_id: String) -> Self {
        Self {
            roots: Some(roots),
            expected_id,
            issuer_id: IssuerPin::Unpinned,
        }
    }

    /// Accepts any server certificate. Only for `--insecure-bootstrap`: the first
    /// attestation, whose answer carries the bundle every later connection checks.
    pub fn insecure_bootstrap() -> Self {
        Self {
            roots: None,
            expected_id: String::new(),
            issuer_id: IssuerPin::Unpinned,
        }
    }
}

/// The URI SANs of a certificate (empty when it has none).
fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative name: {e}"))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Why the CA certificate `issuer_der` is not an authority of the trust domain whose
/// ID is `td_id`, or `None` if it is: its URI SANs must be exactly `[td_id]`. Exact
/// string equality is identity equality because `td_id` is canonical.
fn issuer_refusal(issuer_der: &[u8], td_id: &str) -> Option<String> {
    match uri_sans(issuer_der) {
        Ok(uris) if matches!(uris.as_slice(), [only] if only == td_id) => None,
        Ok(uris) if uris.is_empty() => Some(format!(
            "the CA that signed it carries no URI SAN, so it is not an X.509 authority of {td_id}"
        )),
        Ok(uris) => Some(format!(
            "the CA that signed it carries URI SAN {}, so it is not an X.509 authority of {td_id}",
            uris.join(", ")
        )),
        Err(e) => Some(format!("the CA that signed it {e}")),
    }
}

/// Verifies `chain` to `roots` for server use, accepting only a path in which the
/// certificate that directly signed the leaf (the first intermediate, or the bundle
/// root itself) carries exactly the URI SAN `td_id`. Path building tries every path;
/// one that fails only this check is refused with its reason.
fn verify_issued_by_trust_domain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'static>],
    now: UnixTime,
    td_id: &str,
) -> Result<(), String> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "empty certificate chain".to_string())?;
    let anchors: Vec<(rustls_pki_types::TrustAnchor<'_>, &CertificateDer<'static>)> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok().map(|a| (a, r)))
        .collect();
    let trust_anchors: Vec<_> = anchors.iter().map(|(a, _)| a.clone()).collect();
    if trust_anchors.is_empty() {
        return Err("no usable trust anchors".into());
    }
    let ee =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("leaf does not parse: {e}"))?;
    let refused: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
    let check = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
        let issuer_der: Option<Vec<u8>> = match path.intermediate_certificates().next() {
            Some(ca) => Some(ca.der().as_ref().to_vec()),
            // The bundle root signed the leaf directly (a self-signed ztid authority).
            None => anchors
                .iter()
                .find(|(a, _)| {
                    a.subject.as_ref() == path.anchor().subject.as_ref()
                        && a.subject_public_key_info.as_ref()
                            == path.anchor().subject_public_key_info.as_ref()
                })
                .map(|(_, der)| der.as_ref().to_vec()),
        };
        let why = match issuer_der {
            Some(der) => issuer_refusal(&der, td_id),
            None => Some("the bundle root that signed it is not among the roots".into()),
        };
        match why {
            None => Ok(()),
            Some(why) => {
                *refused.borrow_mut() = Some(why);
                Err(webpki::Error::UnknownIssuer)
            }
        }
    };
    match ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &trust_anchors,
        intermediates,
        now,
        webpki::KeyUsage::server_auth(),
        None,
        Some(&check),
    ) {
        Ok(_) => Ok(()),
        // A path to the bundle exists, but not through an authority of the trust domain.
        Err(_) if refused.borrow().is_some() => Err(refused.take().unwrap_or_default()),
        Err(e) => Err(format!("chain does not validate: {e}")),
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
        let roots = roots.load();
        let id = verify_chain(&chain, &roots, now, Usage::Server).map_err(|e| {
            let text = e.to_string();
            // A ztid server (an agent's own) whose chain meets no root of the bundle (or
            // a root of the same name with another key): the bundle is another server's
            // or outdated. Say how to get the right one; the
            // federation poller (unpinned) keeps the bare reason.
            if matches!(self.issuer_id, IssuerPin::TrustDomain(_))
                && ["UnknownIssuer", "InvalidSignatureForPublicKey"]
                    .iter()
                    .any(|why| text.contains(why))
            {
                rustls::Error::General(format!(
                    "{text}: the server's certificate is not signed by any authority in this \
                     agent's trust bundle (another server's bundle, or an outdated one): export \
                     it again on the server with `ztid-server bundle show > FILE` and pass \
                     --trust-bundle FILE"
                ))
            } else {
                tls_error(e)
            }
        })?;
        // Both sides are canonical strings: equal strings are the same identity.
        if id.to_string() != self.expected_id {
            return Err(rustls::Error::General(format!(
                "server presented SPIFFE ID {id}, expected {}",
                self.expected_id
            )));
        }
        if let IssuerPin::TrustDomain(td_id) = &self.issuer_id {
            verify_issued_by_trust_domain(&chain, &roots, now, td_id).map_err(|why| {
                rustls::Error::General(format!(
                    "server certificate for {id} refused: {why} (under an upstream root, \
                     another CA under the same root cannot stand in for this server)"
                ))
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };

    const SERVER: &str = "spiffe://example.org/ztid/server";

    /// A CA with `uri` as its URI SAN (none if empty), self-signed or under `parent`.
    fn ca(uri: &str, parent: Option<&Issuer<'_, KeyPair>>) -> (Vec<u8>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("CA {uri}"));
        if !uri.is_empty() {
            p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        }
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = match parent {
            Some(parent) => p.signed_by(&key, parent).unwrap(),
            None => p.self_signed(&key).unwrap(),
        };
        let der = cert.der().to_vec();
        (der, Issuer::new(p, key))
    }

    fn leaf(uri: &str, issuer: &Issuer<'_, KeyPair>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.signed_by(&key, issuer).unwrap().der().to_vec()
    }

    fn verify(chain: Vec<Vec<u8>>, root: &[u8]) -> Result<(), String> {
        let verifier = ServerSvidVerifier::new(shared_roots(vec![root.to_vec()]), SERVER.into());
        let chain: Vec<CertificateDer<'static>> =
            chain.into_iter().map(CertificateDer::from).collect();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from("ztid").unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_server_svid_must_come_from_an_authority_of_the_trust_domain() {
        // Self-signed ztid authority (the bundle root signs the leaf directly).
        let (root, issuer) = ca("spiffe://example.org", None);
        verify(vec![leaf(SERVER, &issuer)], &root).unwrap();

        // Under an organisation root: ztid's intermediate carries spiffe://TD.
        let (org, org_issuer) = ca("", None);
        let (ztid, ztid_issuer) = ca("spiffe://example.org", Some(&org_issuer));
        verify(vec![leaf(SERVER, &ztid_issuer), ztid], &org).unwrap();

        // The organisation root itself, a sibling trust domain's CA, and CAs whose URI
        // SAN is the trust domain spelled otherwise or with more in it are refused.
        let e = verify(vec![leaf(SERVER, &org_issuer)], &org).unwrap_err();
        assert!(e.contains("carries no URI SAN"), "{e}");
        for uri in [
            "spiffe://other.org",
            "spiffe://EXAMPLE.org",
            "spiffe://example.org/",
            "spiffe://example.org/ztid/server",
        ] {
            let (sibling, sibling_issuer) = ca(uri, Some(&org_issuer));
            let e = verify(vec![leaf(SERVER, &sibling_issuer), sibling], &org).unwrap_err();
            assert!(
                e.contains(&format!("carries URI SAN {uri}, so it is not an X.509 authority of spiffe://example.org")),
                "{uri}: {e}"
            );
        }
        // A self-signed root that is not the trust domain's, trusted as the bundle.
        let (other_root, other_issuer) = ca("spiffe://other.org", None);
        let e = verify(vec![leaf(SERVER, &other_issuer)], &other_root).unwrap_err();
        assert!(e.contains("carries URI SAN spiffe://other.org"), "{e}");

        // The ID check still comes first, with its own reason.
        let e = verify(vec![leaf("spiffe://example.org/w", &issuer)], &root).unwrap_err();
        assert!(
            e.contains("server presented SPIFFE ID spiffe://example.org/w"),
            "{e}"
        );

        // An attacker adding ztid's genuine intermediate to its chain gains nothing:
        // the leaf's own issuer decides.
        let (sibling, sibling_issuer) = ca("spiffe://other.org", Some(&org_issuer));
        let (ztid2, _) = ca("spiffe://example.org", Some(&org_issuer));
        let e = verify(vec![leaf(SERVER, &sibling_issuer), ztid2, sibling], &org).unwrap_err();
        assert!(e.contains("not an X.509 authority"), "{e}");
    }

    #[test]
    fn another_servers_bundle_is_refused_with_the_way_to_the_right_one() {
        let (_, issuer) = ca("spiffe://example.org", None);
        let (other_root, _) = ca("spiffe://example.org", None);
        let e = verify(vec![leaf(SERVER, &issuer)], &other_root).unwrap_err();
        assert!(
            e.contains("ztid-server bundle show") && e.contains("--trust-bundle"),
            "{e}"
        );
    }

    #[test]
    fn a_foreign_endpoint_is_not_pinned_to_its_issuer() {
        let (org, org_issuer) = ca("", None);
        let verifier =
            ServerSvidVerifier::foreign_endpoint(shared_roots(vec![org.clone()]), SERVER.into());
        let l = CertificateDer::from(leaf(SERVER, &org_issuer));
        verifier
            .verify_server_cert(
                &l,
                &[],
                &ServerName::try_from("ztid").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap();
    }
}
