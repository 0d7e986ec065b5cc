//! What a CSR may ask for. The server never copies a request into a certificate: it
//! checks the CSR's signature (proof of possession), checks that the request asks
//! for nothing beyond the one identity the caller is entitled to, and then builds
//! the certificate from its own template, using only the CSR's public key.

use rcgen::{CertificateSigningRequestParams, IsCa, KeyUsagePurpose, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use spiffe::SpiffeId;

use crate::{Error, Result};

/// Which SPIFFE ID a CSR may carry.
#[derive(Debug, Clone)]
pub enum IdentityRule<'a> {
    /// Exactly this ID.
    Exact(&'a str),
    /// This ID followed by one path segment naming a process instance.
    Instance(&'a str),
    /// This ID, or no URI SAN at all (the server fills it in; used for agent SVIDs,
    /// whose ID the agent does not know before attestation).
    ExactOrAbsent(&'a str),
}

/// Longest instance segment accepted.
pub const MAX_INSTANCE_SEGMENT: usize = 64;

/// True for a valid per-instance segment.
pub fn is_instance_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_INSTANCE_SEGMENT
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Checks an ID against a rule.
pub fn check_identity(rule: &IdentityRule<'_>, requested: &str) -> Result<()> {
    let ok = match rule {
        IdentityRule::Exact(id) | IdentityRule::ExactOrAbsent(id) => requested == *id,
        IdentityRule::Instance(prefix) => requested
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(is_instance_segment),
    };
    if !ok {
        let wanted = match rule {
            IdentityRule::Instance(p) => format!("{p}/<instance>"),
            IdentityRule::Exact(id) | IdentityRule::ExactOrAbsent(id) => id.to_string(),
        };
        return Err(Error::PermissionDenied(format!(
            "CSR asks for {requested}, but the caller is entitled only to {wanted}"
        )));
    }
    SpiffeId::new(requested)
        .map_err(|e| Error::InvalidArgument(format!("CSR SPIFFE ID {requested}: {e}")))?;
    Ok(())
}

/// A CSR that passed policy.
pub struct CheckedCsr {
    /// The public key to certify.
    pub public_key: rcgen::PublicKey,
    /// The SPIFFE ID to put in the certificate.
    pub spiffe_id: String,
}

/// Parses `der`, verifies its signature and checks it against `rule` and the allowed DNS names.
pub fn check_csr(
    der: &[u8],
    rule: &IdentityRule<'_>,
    allowed_dns: &[String],
) -> Result<CheckedCsr> {
    if der.is_empty() || der.len() > 16 * 1024 {
        return Err(Error::InvalidArgument(
            "CSR is empty or larger than 16 KiB".into(),
        ));
    }
    let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
        .map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            Error::InvalidArgument("CSR signature does not verify".into())
        }
        rcgen::Error::UnsupportedExtension => {
            Error::InvalidArgument("CSR requests an extension the server does not grant".into())
        }
        other => Error::InvalidArgument(format!("malformed CSR: {other}")),
    })?;
    let alg = csr.public_key.algorithm();
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ECDSA_P384_SHA384 {
        return Err(Error::InvalidArgument(
            "CSR key must be ECDSA P-256 or P-384".into(),
        ));
    }
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(Error::PermissionDenied("CSR asks to be a CA".into()));
    }
    if csr
        .params
        .key_usages
        .iter()
        .any(|k| matches!(k, KeyUsagePurpose::KeyCertSign | KeyUsagePurpose::CrlSign))
    {
        return Err(Error::PermissionDenied(
            "CSR asks for certificate or CRL signing".into(),
        ));
    }
    let mut uris = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::URI(u) => uris.push(u.as_str().to_string()),
            SanType::DnsName(d) => {
                if !allowed_dns.iter().any(|a| a == d.as_str()) {
                    return Err(Error::PermissionDenied(format!(
                        "CSR asks for DNS name {}, which the entry does not grant",
                        d.as_str()
                    )));
                }
            }
            _ => {
                return Err(Error::PermissionDenied(
                    "CSR asks for a SAN type other than URI or DNS".into(),
                ))
            }
        }
    }
    let spiffe_id = match (uris.as_slice(), rule) {
        ([], IdentityRule::ExactOrAbsent(id)) => id.to_string(),
        ([one], _) => {
            check_identity(rule, one)?;
            one.clone()
        }
        ([], _) => return Err(Error::InvalidArgument("CSR has no URI SAN".into())),
        (many, _) => {
            return Err(Error::InvalidArgument(format!(
                "CSR must have exactly one URI SAN, has {}",
                many.len()
            )))
        }
    };
    Ok(CheckedCsr {
        public_key: csr.public_key,
        spiffe_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr(sans: Vec<SanType>, ca: bool) -> Vec<u8> {
        let kp = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        if ca {
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        p.serialize_request(&kp).unwrap().der().to_vec()
    }
    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_string().try_into().unwrap())
    }

    #[test]
    fn accepts_entitled_identities() {
        let c = check_csr(
            &csr(vec![uri("spiffe://td/w")], false),
            &IdentityRule::Exact("spiffe://td/w"),
            &[],
        )
        .unwrap();
        assert_eq!(c.spiffe_id, "spiffe://td/w");
        let c = check_csr(
            &csr(vec![uri("spiffe://td/w/i-abc")], false),
            &IdentityRule::Instance("spiffe://td/w"),
            &[],
        )
        .unwrap();
        assert_eq!(c.spiffe_id, "spiffe://td/w/i-abc");
        let c = check_csr(
            &csr(vec![], false),
            &IdentityRule::ExactOrAbsent("spiffe://td/ztid/agent/x"),
            &[],
        )
        .unwrap();
        assert_eq!(c.spiffe_id, "spiffe://td/ztid/agent/x");
        let dns = SanType::DnsName("db.local".to_string().try_into().unwrap());
        assert!(check_csr(
            &csr(vec![uri("spiffe://td/w"), dns], false),
            &IdentityRule::Exact("spiffe://td/w"),
            &["db.local".into()]
        )
        .is_ok());
    }

    #[test]
    fn refuses_everything_else_with_reason() {
        let err = |der: Vec<u8>, rule: IdentityRule<'_>| {
            check_csr(&der, &rule, &[]).err().unwrap().to_string()
        };
        assert!(err(
            csr(vec![uri("spiffe://td/admin")], false),
            IdentityRule::Exact("spiffe://td/w")
        )
        .contains("asks for spiffe://td/admin, but the caller is entitled only to spiffe://td/w"));
        assert!(err(
            csr(vec![uri("spiffe://td/w/a/b")], false),
            IdentityRule::Instance("spiffe://td/w")
        )
        .contains("entitled only"));
        assert!(err(
            csr(vec![uri("spiffe://td/wx")], false),
            IdentityRule::Instance("spiffe://td/w")
        )
        .contains("entitled only"));
        assert!(err(
            csr(vec![uri("spiffe://td/w"), uri("spiffe://td/v")], false),
            IdentityRule::Exact("spiffe://td/w")
        )
        .contains("exactly one URI SAN, has 2"));
        assert!(
            err(csr(vec![], false), IdentityRule::Exact("spiffe://td/w")).contains("no URI SAN")
        );
        assert!(err(
            csr(vec![uri("spiffe://td/w")], true),
            IdentityRule::Exact("spiffe://td/w")
        )
        .contains("asks to be a CA"));
        let dns = SanType::DnsName("evil.com".to_string().try_into().unwrap());
        assert!(err(
            csr(vec![uri("spiffe://td/w"), dns], false),
            IdentityRule::Exact("spiffe://td/w")
        )
        .contains("DNS name evil.com"));
        let mut bad_sig = csr(vec![uri("spiffe://td/w")], false);
        let n = bad_sig.len();
        bad_sig[n - 5] ^= 0xff;
        let e = err(bad_sig, IdentityRule::Exact("spiffe://td/w"));
        assert!(
            e.contains("signature does not verify") || e.contains("malformed CSR"),
            "{e}"
        );
        assert!(
            err(b"garbage".to_vec(), IdentityRule::Exact("spiffe://td/w"))
                .contains("malformed CSR")
        );
        assert!(err(vec![], IdentityRule::Exact("spiffe://td/w")).contains("empty"));
    }
}
