//! What a CSR may ask for. The server never copies a request into a certificate: it
//! checks the CSR's signature (proof of possession), checks that the request asks
//! for nothing beyond the one identity the caller is entitled to, and then builds
//! the certificate from its own template, using only the CSR's public key.

use rcgen::{CertificateSigningRequestParams, IsCa, KeyUsagePurpose, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use ztid_spiffe::spiffe_id::{self, INSTANCE_SEGMENT_LEN};

use crate::{Error, RefusalKind, Result};

/// Which SPIFFE ID a CSR may carry.
#[derive(Debug, Clone)]
pub enum IdentityRule<'a> {
    /// Exactly this entry ID (a shared entry).
    Shared(&'a str),
    /// This entry ID followed by one per-instance segment, in exactly the form agents
    /// generate ([`spiffe_id::is_instance_segment`]): 32 lowercase hex characters.
    Instance(&'a str),
    /// An ID the server itself assigned (an agent's, after attestation, or an admin's
    /// on the admin socket): exactly this ID, or no URI SAN at all (the server fills
    /// it in). The only rule under which a reserved (`/ztid/...`) ID is issued.
    Assigned(&'a str),
}

/// Checks a requested ID against a rule; returns it (canonical, so equal strings
/// are equal identities).
///
/// Whatever the entry says, a workload rule ([`IdentityRule::Shared`] or
/// [`IdentityRule::Instance`]) never yields an ID under ztid's reserved prefix: the
/// server's, agents' and admins' identities are issued only by the server itself.
pub fn check_identity(rule: &IdentityRule<'_>, requested: &str) -> Result<String> {
    let id = spiffe_id::parse(requested).map_err(|e| {
        Error::refused(RefusalKind::BadCsr, format!("CSR SPIFFE ID: {}", reason(e)))
    })?;
    let not_entitled = |entitled: &str| {
        Error::refused(
            RefusalKind::CsrNotGranted,
            format!("CSR asks for {requested}, but the caller is entitled only to {entitled}"),
        )
    };
    let (entry, per_instance) = match rule {
        IdentityRule::Assigned(own) => {
            // The server's own identity is issued by the server to itself, never for a CSR.
            if spiffe_id::is_server_id(id.trust_domain(), &id) {
                return Err(Error::refused(RefusalKind::CsrNotGranted, format!(
                    "CSR asks for {requested}, the server's own identity, which is never issued for a CSR"
                )));
            }
            return if requested == *own {
                Ok(id.to_string())
            } else {
                Err(not_entitled(own))
            };
        }
        IdentityRule::Shared(entry) => (*entry, false),
        IdentityRule::Instance(entry) => (*entry, true),
    };
    if spiffe_id::is_reserved(&id) {
        return Err(Error::refused(RefusalKind::CsrNotGranted, format!(
            "CSR asks for {requested}, which is under spiffe://{}/{}/: reserved for ztid's own identities, issued only by the server",
            id.trust_domain(),
            spiffe_id::RESERVED_SEGMENT
        )));
    }
    if !per_instance {
        return if requested == entry {
            Ok(id.to_string())
        } else {
            Err(not_entitled(entry))
        };
    }
    match requested
        .strip_prefix(entry)
        .and_then(|rest| rest.strip_prefix('/'))
    {
        Some(segment) if spiffe_id::is_instance_segment(segment) => Ok(id.to_string()),
        Some(segment) if !segment.contains('/') => Err(Error::refused(RefusalKind::CsrNotGranted, format!(
            "CSR asks for {requested}, but an instance segment must be {INSTANCE_SEGMENT_LEN} lowercase hex characters, as agents generate it"
        ))),
        _ => Err(not_entitled(&format!("{entry}/<instance>"))),
    }
}

/// The reason text of a refused SPIFFE ID.
pub fn reason(e: ztid_spiffe::Error) -> String {
    match e {
        ztid_spiffe::Error::InvalidSpiffeId(m) => m,
        other => other.to_string(),
    }
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
        return Err(Error::refused(
            RefusalKind::BadCsr,
            "CSR is empty or larger than 16 KiB",
        ));
    }
    let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
        .map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            Error::refused(RefusalKind::BadCsr, "CSR signature does not verify")
        }
        rcgen::Error::UnsupportedExtension => Error::refused(
            RefusalKind::BadCsr,
            "CSR requests an extension the server does not grant",
        ),
        other => Error::refused(RefusalKind::BadCsr, format!("malformed CSR: {other}")),
    })?;
    let alg = csr.public_key.algorithm();
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ECDSA_P384_SHA384 {
        return Err(Error::refused(
            RefusalKind::BadCsr,
            "CSR key must be ECDSA P-256 or P-384",
        ));
    }
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(Error::refused(
            RefusalKind::CsrNotGranted,
            "CSR asks to be a CA",
        ));
    }
    if csr
        .params
        .key_usages
        .iter()
        .any(|k| matches!(k, KeyUsagePurpose::KeyCertSign | KeyUsagePurpose::CrlSign))
    {
        return Err(Error::refused(
            RefusalKind::CsrNotGranted,
            "CSR asks for certificate or CRL signing",
        ));
    }
    let mut uris = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::URI(u) => uris.push(u.as_str().to_string()),
            SanType::DnsName(d) => {
                if !allowed_dns.iter().any(|a| a == d.as_str()) {
                    return Err(Error::refused(
                        RefusalKind::CsrNotGranted,
                        format!(
                            "CSR asks for DNS name {}, which the entry does not grant",
                            d.as_str()
                        ),
                    ));
                }
            }
            _ => {
                return Err(Error::refused(
                    RefusalKind::CsrNotGranted,
                    "CSR asks for a SAN type other than URI or DNS",
                ))
            }
        }
    }
    let spiffe_id = match (uris.as_slice(), rule) {
        ([], IdentityRule::Assigned(id)) => check_identity(rule, id)?,
        ([one], _) => check_identity(rule, one)?,
        ([], _) => return Err(Error::refused(RefusalKind::BadCsr, "CSR has no URI SAN")),
        (many, _) => {
            return Err(Error::refused(
                RefusalKind::BadCsr,
                format!("CSR must have exactly one URI SAN, has {}", many.len()),
            ))
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

    const SEG: &str = "0123456789abcdef0123456789abcdef";

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
            &IdentityRule::Shared("spiffe://td/w"),
            &[],
        )
        .unwrap();
        assert_eq!(c.spiffe_id, "spiffe://td/w");
        let c = check_csr(
            &csr(vec![uri(&format!("spiffe://td/w/{SEG}"))], false),
            &IdentityRule::Instance("spiffe://td/w"),
            &[],
        )
        .unwrap();
        assert_eq!(c.spiffe_id, format!("spiffe://td/w/{SEG}"));
        let c = check_csr(
            &csr(vec![], false),
            &IdentityRule::Assigned("spiffe://td/ztid/agent/x"),
            &[],
        )
        .unwrap();
        assert_eq!(c.spiffe_id, "spiffe://td/ztid/agent/x");
        let dns = SanType::DnsName("db.local".to_string().try_into().unwrap());
        assert!(check_csr(
            &csr(vec![uri("spiffe://td/w"), dns], false),
            &IdentityRule::Shared("spiffe://td/w"),
            &["db.local".into()]
        )
        .is_ok());
    }

    fn refusal(rule: IdentityRule<'_>, requested: &str) -> Error {
        check_csr(&csr(vec![uri(requested)], false), &rule, &[])
            .err()
            .unwrap_or_else(|| panic!("{requested} under {rule:?} must be refused"))
    }

    #[test]
    fn reserved_ids_are_never_issued_to_workloads() {
        // An entry may (from an old datastore) name the reserved prefix itself; its
        // "instances" are still refused.
        for (entry, requested) in [
            ("spiffe://td/ztid", "spiffe://td/ztid/server"),
            ("spiffe://td/ztid", &format!("spiffe://td/ztid/{SEG}")),
            ("spiffe://td/ZTID", &format!("spiffe://td/ZTID/{SEG}")),
            (
                "spiffe://td/ztid/admin",
                &format!("spiffe://td/ztid/admin/{SEG}"),
            ),
        ] {
            let e = refusal(IdentityRule::Instance(entry), requested);
            assert!(
                e.refusal_kind() == Some(RefusalKind::CsrNotGranted)
                    && e.to_string().contains("reserved for ztid's own identities"),
                "{requested}: {e}"
            );
        }
        let e = refusal(
            IdentityRule::Shared("spiffe://td/ztid/server"),
            "spiffe://td/ztid/server",
        );
        assert!(
            e.refusal_kind() == Some(RefusalKind::CsrNotGranted)
                && e.to_string().contains("reserved"),
            "{e}"
        );
        // Not even a rule that names it by mistake issues the server's own identity.
        let rule = IdentityRule::Assigned("spiffe://td/ztid/server");
        for der in [
            csr(vec![uri("spiffe://td/ztid/server")], false),
            csr(vec![], false),
        ] {
            let e = check_csr(&der, &rule, &[]).err().unwrap();
            assert!(
                e.refusal_kind() == Some(RefusalKind::CsrNotGranted)
                    && e.to_string().contains("the server's own identity"),
                "{e}"
            );
        }
    }

    #[test]
    fn instance_segments_have_one_form() {
        for seg in [
            "admin",
            "server",
            &SEG[..31],
            &format!("{SEG}0"),
            &SEG.to_uppercase(),
            "i-abc",
        ] {
            let e = refusal(
                IdentityRule::Instance("spiffe://td/w"),
                &format!("spiffe://td/w/{seg}"),
            );
            assert!(
                e.refusal_kind() == Some(RefusalKind::CsrNotGranted)
                    && e.to_string().contains("32 lowercase hex characters"),
                "{seg}: {e}"
            );
        }
        let e = refusal(
            IdentityRule::Instance("spiffe://td/w"),
            &format!("spiffe://td/w/{SEG}/x"),
        );
        assert!(
            e.to_string()
                .contains("entitled only to spiffe://td/w/<instance>"),
            "{e}"
        );
    }

    #[test]
    fn non_canonical_ids_are_invalid() {
        for requested in [
            "SPIFFE://td/w",
            "spiffe://TD/w",
            "spiffe://td/w/",
            "spiffe://td/%77",
            "spiffe://td//w",
        ] {
            let e = refusal(IdentityRule::Shared("spiffe://td/w"), requested);
            assert!(
                e.refusal_kind() == Some(RefusalKind::BadCsr)
                    && e.to_string().contains("not a canonical SPIFFE ID"),
                "{requested}: {e}"
            );
        }
        let e = refusal(
            IdentityRule::Assigned("spiffe://td/ztid/agent/x"),
            "SPIFFE://td/ztid/agent/x",
        );
        assert_eq!(e.refusal_kind(), Some(RefusalKind::BadCsr), "{e}");
    }

    #[test]
    fn refuses_everything_else_with_reason() {
        // Each refusal's text, once its kind is checked: what is malformed (`BadCsr`)
        // or asks for more than the rule grants (`CsrNotGranted`).
        let kind_of = |der: &[u8], rule: &IdentityRule<'_>| {
            check_csr(der, rule, &[])
                .err()
                .and_then(|e| e.refusal_kind())
        };
        let err = |der: Vec<u8>, rule: IdentityRule<'_>| {
            let e = check_csr(&der, &rule, &[]).err().unwrap();
            assert!(
                matches!(
                    e.refusal_kind(),
                    Some(RefusalKind::BadCsr | RefusalKind::CsrNotGranted)
                ),
                "{e}"
            );
            e.to_string()
        };
        let w = IdentityRule::Shared("spiffe://td/w");
        let two_uris = csr(vec![uri("spiffe://td/w"), uri("spiffe://td/v")], false);
        assert_eq!(kind_of(&two_uris, &w), Some(RefusalKind::BadCsr));
        let ca = csr(vec![uri("spiffe://td/w")], true);
        assert_eq!(kind_of(&ca, &w), Some(RefusalKind::CsrNotGranted));
        assert_eq!(kind_of(b"garbage", &w), Some(RefusalKind::BadCsr));
        assert!(err(
            csr(vec![uri("spiffe://td/admin")], false),
            IdentityRule::Shared("spiffe://td/w")
        )
        .contains("asks for spiffe://td/admin, but the caller is entitled only to spiffe://td/w"));
        assert!(err(
            csr(vec![uri(&format!("spiffe://td/wx/{SEG}"))], false),
            IdentityRule::Instance("spiffe://td/w")
        )
        .contains("entitled only"));
        assert!(err(
            csr(vec![uri("spiffe://td/ztid/agent/y")], false),
            IdentityRule::Assigned("spiffe://td/ztid/agent/x")
        )
        .contains("entitled only to spiffe://td/ztid/agent/x"));
        assert!(err(
            csr(vec![uri("spiffe://td/w"), uri("spiffe://td/v")], false),
            IdentityRule::Shared("spiffe://td/w")
        )
        .contains("exactly one URI SAN, has 2"));
        assert!(
            err(csr(vec![], false), IdentityRule::Shared("spiffe://td/w")).contains("no URI SAN")
        );
        assert!(err(
            csr(vec![uri("spiffe://td/w")], true),
            IdentityRule::Shared("spiffe://td/w")
        )
        .contains("asks to be a CA"));
        let dns = SanType::DnsName("evil.com".to_string().try_into().unwrap());
        assert!(err(
            csr(vec![uri("spiffe://td/w"), dns], false),
            IdentityRule::Shared("spiffe://td/w")
        )
        .contains("DNS name evil.com"));
        let mut bad_sig = csr(vec![uri("spiffe://td/w")], false);
        let n = bad_sig.len();
        bad_sig[n - 5] ^= 0xff;
        let e = err(bad_sig, IdentityRule::Shared("spiffe://td/w"));
        assert!(
            e.contains("signature does not verify") || e.contains("malformed CSR"),
            "{e}"
        );
        assert!(
            err(b"garbage".to_vec(), IdentityRule::Shared("spiffe://td/w"))
                .contains("malformed CSR")
        );
        assert!(err(vec![], IdentityRule::Shared("spiffe://td/w")).contains("empty"));
    }
}
