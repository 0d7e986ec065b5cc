//! Authenticity checks made before (and right after) anything is fetched from Intel PCS,
//! against the pinned Intel SGX Root CA.
//!
//! A quote names its platform (FMSPC) and PCK CA in its PCK certificate, and the TCB info
//! URL is built from that FMSPC, so before any request the quote's PCK certificate chain
//! (its certification data: PCK certificate, PCK Platform or Processor CA, optionally the
//! root) must verify up to the pinned root: each link's ECDSA P-256/SHA-256 signature, the
//! issuer name equal to the signer's subject, every certificate (the root included) valid
//! at the verification time, and each signer a CA. A made-up FMSPC then costs no request.
//! Revocation is not checked here (the PCK CRL is among what is fetched): dcap-qvl checks
//! it, with everything else, when the quote is verified.
//!
//! Fetched collateral is checked the same way before it is cached ([`check_collateral`]):
//! the PCK CRL's, TCB info's and QE identity's issuer chains up to the pinned root, the
//! signature of each item by its issuer, the root CA CRL's signature by the root. It is
//! then cached even when the quote that caused the fetch fails, so replaying a genuine
//! PCK certificate with a made-up quote fetches a platform's collateral once per validity
//! period, not once per attempt.
//!
//! The root is dcap-qvl's own (`TrustedRootCA.der`, which dcap-qvl 0.7 does not export):
//! `IntelSGXRootCA.der` here is a byte-for-byte copy (CN=Intel SGX Root CA, SHA-256
//! `44a0196b…74d3`); a test checks that dcap-qvl verifies quotes with it as its root.
//! dcap-qvl extracts the chain (`intel::extract_cert_chain`, used here) but its chain
//! verification is private and wants the CRLs that are not fetched yet; so x509-parser
//! parses and ring verifies (Intel's PKI is ECDSA P-256/SHA-256 throughout, the only
//! algorithm accepted): no new dependency. A quote carrying only its PCK certificate
//! (certification data type 4, no issuer chain) fails this check: it is never fetched
//! for (dcap-qvl could not verify it with fetched collateral either, which carries no
//! PCK chain).

use dcap_qvl::quote::Quote;
use dcap_qvl::QuoteCollateralV3;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::tsm::rfc3339;
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{Malformed, UntrustedChain};

/// The Intel SGX Root CA (DER), as dcap-qvl pins it.
pub(crate) const INTEL_SGX_ROOT_CA_DER: &[u8] = include_bytes!("IntelSGXRootCA.der");

/// Most certificates below the root in a chain (Intel's have one or two).
const MAX_CHAIN: usize = 3;

/// A platform whose PCK certificate chain verified: its FMSPC and PCK CA
/// (`processor` or `platform`).
pub(crate) type Platform = ([u8; 6], &'static str);

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], c)) => Ok(c),
        Ok(_) => Err(format!("{what} has bytes after its certificate")),
        Err(e) => Err(format!("{what} is not a DER certificate: {e}")),
    }
}

/// The subject's common name (or the whole subject), for messages.
fn name(c: &X509Certificate<'_>) -> String {
    c.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| c.subject().to_string())
}

fn valid_at(c: &X509Certificate<'_>, what: &str, at: i64) -> Result<(), String> {
    let v = c.validity();
    let (from, until) = (v.not_before.timestamp(), v.not_after.timestamp());
    if at < from || at > until {
        return Err(format!(
            "{what} ({}) is not valid at {} (valid from {} to {})",
            name(c),
            rfc3339(at),
            rfc3339(from),
            rfc3339(until)
        ));
    }
    Ok(())
}

/// An ECDSA P-256/SHA-256 signature (`sig`, ASN.1 or raw r‖s per `raw`) over `signed` by
/// `issuer`'s key.
fn signed_by(issuer: &X509Certificate<'_>, signed: &[u8], sig: &[u8], raw: bool) -> Result<(), ()> {
    let alg = if raw {
        &ECDSA_P256_SHA256_FIXED
    } else {
        &ECDSA_P256_SHA256_ASN1
    };
    UnparsedPublicKey::new(alg, issuer.public_key().subject_public_key.data.as_ref())
        .verify(signed, sig)
        .map_err(|_| ())
}

/// `cert` (named `what`) is issued and signed by `issuer`.
fn link(
    cert: &X509Certificate<'_>,
    issuer: &X509Certificate<'_>,
    what: &str,
) -> Result<(), String> {
    if cert.issuer().as_raw() != issuer.subject().as_raw() {
        return Err(format!(
            "{what} ({}) is issued by {:?}, not by {:?}",
            name(cert),
            cert.issuer().to_string(),
            issuer.subject().to_string()
        ));
    }
    if cert.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(format!(
            "{what} ({}) is not signed with ECDSA P-256/SHA-256",
            name(cert)
        ));
    }
    signed_by(
        issuer,
        cert.tbs_certificate.as_ref(),
        cert.signature_value.data.as_ref(),
        false,
    )
    .map_err(|()| {
        format!(
            "the signature of {what} ({}) by {} does not verify",
            name(cert),
            name(issuer)
        )
    })
}

/// Checks that `chain` (DER, leaf first; the root at the end optional, and if present
/// the pinned root byte for byte) verifies up to the pinned root at `at`; `what` names
/// the leaf.
pub(crate) fn verify_chain(chain: &[Vec<u8>], at: i64, what: &str) -> Result<(), String> {
    let root = parse(INTEL_SGX_ROOT_CA_DER, "the pinned Intel SGX Root CA")?;
    let below = match chain.split_last() {
        None => return Err(format!("no certificate for {what}")),
        Some((last, rest)) if last.as_slice() == INTEL_SGX_ROOT_CA_DER => rest,
        Some(_) => chain,
    };
    if below.is_empty() {
        return Err(format!("{what} is missing: the chain holds only the root"));
    }
    if below.len() > MAX_CHAIN {
        return Err(format!(
            "the chain of {what} holds {} certificates below the root (at most {MAX_CHAIN})",
            below.len()
        ));
    }
    let certs = below
        .iter()
        .enumerate()
        .map(|(i, der)| {
            if i == 0 {
                parse(der, what)
            } else {
                parse(der, &format!("issuer certificate {i} of {what}"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    valid_at(&root, "the pinned Intel SGX Root CA", at)?;
    for (i, cert) in certs.iter().enumerate() {
        let this = if i == 0 {
            what.to_string()
        } else {
            format!("issuer certificate {i} of {what}")
        };
        valid_at(cert, &this, at)?;
        let issuer = certs.get(i + 1).unwrap_or(&root);
        if !issuer.is_ca() {
            return Err(format!(
                "{} signs {this} but is not a CA certificate",
                name(issuer)
            ));
        }
        link(cert, issuer, &this)?;
    }
    Ok(())
}

/// The quote's PCK certificate chain verified up to the pinned root at `at`, and the
/// FMSPC and PCK CA read from the verified PCK certificate; refused
/// ([`UntrustedChain`]) otherwise, before any request is made for it.
pub(crate) fn authentic_platform(quote: &Quote, at: i64) -> Result<Platform, Error> {
    let chain = dcap_qvl::intel::extract_cert_chain(quote).map_err(|e| {
        Error::refused(
            Malformed,
            format!("cannot read the quote's PCK certificate chain: {e:#}"),
        )
    })?;
    verify_chain(&chain, at, "the PCK certificate").map_err(|e| {
        Error::refused(
            UntrustedChain,
            format!(
                "the quote's PCK certificate chain does not verify to the pinned Intel SGX Root CA, so nothing is fetched from Intel PCS for it: {e}"
            ),
        )
    })?;
    let leaf = chain.first().map(Vec::as_slice).unwrap_or_default();
    let fmspc = dcap_qvl::intel::parse_pck_extension(leaf)
        .map_err(|e| {
            Error::refused(
                Malformed,
                format!("cannot read the FMSPC from the quote's PCK certificate: {e:#}"),
            )
        })?
        .fmspc;
    let ca = dcap_qvl::intel::pck_ca(leaf)
        .map_err(|e| Error::refused(Malformed, format!("cannot read the quote's PCK CA: {e:#}")))?
        .as_id_str();
    Ok((fmspc, ca))
}

/// The DER certificates of a PEM chain.
fn pem_chain(pem_text: &str, what: &str) -> Result<Vec<Vec<u8>>, String> {
    let certs = pem::parse_many(pem_text)
        .map_err(|e| format!("the issuer chain of {what} is not PEM: {e}"))?;
    Ok(certs
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect())
}

/// `chain_pem` verifies up to the pinned root at `at`; its first certificate (DER).
fn issuer_of(chain_pem: &str, what: &str, at: i64) -> Result<Vec<u8>, String> {
    let chain = pem_chain(chain_pem, what)?;
    verify_chain(&chain, at, &format!("the issuer of {what}"))?;
    chain
        .into_iter()
        .next()
        .ok_or_else(|| format!("the issuer chain of {what} is empty"))
}

/// A CRL (DER) signed by `issuer` and current at `at`.
fn check_crl(
    crl_der: &[u8],
    issuer: &X509Certificate<'_>,
    what: &str,
    at: i64,
) -> Result<(), String> {
    let (_, crl) = CertificateRevocationList::from_der(crl_der)
        .map_err(|e| format!("{what} is not a DER CRL: {e}"))?;
    if crl.issuer().as_raw() != issuer.subject().as_raw() {
        return Err(format!("{what} is not issued by {}", name(issuer)));
    }
    if crl.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(format!("{what} is not signed with ECDSA P-256/SHA-256"));
    }
    signed_by(
        issuer,
        crl.tbs_cert_list.as_ref(),
        crl.signature_value.data.as_ref(),
        false,
    )
    .map_err(|()| {
        format!(
            "the signature of {what} by {} does not verify",
            name(issuer)
        )
    })?;
    let (issued, next) = (
        crl.last_update().timestamp(),
        crl.next_update().map(|t| t.timestamp()),
    );
    if at < issued || next.is_some_and(|n| at > n) {
        return Err(format!("{what} is not current at {}", rfc3339(at)));
    }
    Ok(())
}

/// The PCK CRL and its issuer chain.
pub(crate) fn check_pck_crl(chain_pem: &str, crl_der: &[u8], at: i64) -> Result<(), String> {
    let issuer_der = issuer_of(chain_pem, "the PCK CRL", at)?;
    let issuer = parse(&issuer_der, "the PCK CRL issuer")?;
    check_crl(crl_der, &issuer, "the PCK CRL", at)
}

/// The root CA CRL, signed by the pinned root.
pub(crate) fn check_root_crl(crl_der: &[u8], at: i64) -> Result<(), String> {
    let root = parse(INTEL_SGX_ROOT_CA_DER, "the pinned Intel SGX Root CA")?;
    check_crl(crl_der, &root, "the root CA CRL", at)
}

/// A signed TCB info or QE identity (`what`): the issuer chain, the raw r‖s signature
/// over the exact JSON bytes, and the issue and next-update dates around `at`.
pub(crate) fn check_signed(
    chain_pem: &str,
    json: &str,
    sig: &[u8],
    what: &str,
    at: i64,
) -> Result<(), String> {
    let issuer_der = issuer_of(chain_pem, what, at)?;
    let issuer = parse(&issuer_der, &format!("the issuer of {what}"))?;
    signed_by(&issuer, json.as_bytes(), sig, true).map_err(|()| {
        format!(
            "the signature of {what} by {} does not verify",
            name(&issuer)
        )
    })?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Dated {
        issue_date: String,
        next_update: String,
    }
    let d: Dated = serde_json::from_str(json).map_err(|e| format!("{what} is malformed: {e}"))?;
    let t = |s: &str| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map(|t| t.unix_timestamp())
            .map_err(|e| format!("{what} has a bad date {s:?}: {e}"))
    };
    if at < t(&d.issue_date)? || at > t(&d.next_update)? {
        return Err(format!("{what} is not current at {}", rfc3339(at)));
    }
    Ok(())
}

/// Every item of fetched collateral for `platform` authentic and current at `at`: the
/// check that lets it be cached before (or without) a quote verifying with it.
pub(crate) fn check_collateral(
    c: &QuoteCollateralV3,
    fmspc: &[u8; 6],
    at: i64,
) -> Result<(), String> {
    check_pck_crl(&c.pck_crl_issuer_chain, &c.pck_crl, at)?;
    check_signed(
        &c.tcb_info_issuer_chain,
        &c.tcb_info,
        &c.tcb_info_signature,
        "the TCB info",
        at,
    )?;
    if super::tcb_info_fmspc(c).as_deref() != Some(hex::encode(fmspc).as_str()) {
        return Err(format!(
            "the TCB info is not for FMSPC {}",
            hex::encode(fmspc)
        ));
    }
    check_signed(
        &c.qe_identity_issuer_chain,
        &c.qe_identity,
        &c.qe_identity_signature,
        "the QE identity",
        at,
    )?;
    check_root_crl(&c.root_ca_crl, at)
}
