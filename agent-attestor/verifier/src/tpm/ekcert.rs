//! EK certificate checks against a directory of TPM manufacturer CA certificates.
//!
//! EK certificates do not fit Web-PKI path validators (empty subjects, a critical SAN
//! holding a directoryName with TCG attributes, TCG key purposes), so this module checks
//! what applies to them, the way Keylime and SPIRE's TPM plugins do:
//! - the certificate parses as DER with nothing after it, and is not signed with SHA-1;
//! - it is valid at the verification time;
//! - if it has an extended key usage, that includes `tcg-kp-EKCertificate` (2.23.133.8.1);
//! - its signature verifies with the key of a CA certificate from the directory whose
//!   subject is its issuer; that CA certificate is valid at the verification time, is a CA
//!   (basicConstraints cA, keyCertSign if keyUsage is present) and, if it is not
//!   self-issued and its own issuer is in the directory too, is checked the same way up to
//!   a self-issued root (every certificate in the directory is trusted, so an operator may
//!   pin an intermediate);
//! - its public key is the EK public key the node sent (same RSA modulus and exponent,
//!   or same curve and point).

use std::collections::HashMap;
use std::path::Path;

use x509_parser::prelude::*;

use super::wire::{self, PublicKey};
use crate::Error;
use ztid_attestation::RefusalKind::{self, Expired, KeyMismatch, Malformed, UntrustedChain};

/// `tcg-kp-EKCertificate`.
pub const OID_TCG_KP_EK_CERTIFICATE: &str = "2.23.133.8.1";
/// `tcg-at-tpmManufacturer`.
pub const OID_TPM_MANUFACTURER: &str = "2.23.133.2.1";
/// `tcg-at-tpmModel`.
pub const OID_TPM_MODEL: &str = "2.23.133.2.2";
/// `tcg-at-tpmVersion`.
pub const OID_TPM_VERSION: &str = "2.23.133.2.3";

const MAX_CHAIN: usize = 5;

fn refused(kind: RefusalKind, s: impl Into<String>) -> Error {
    Error::refused(kind, s)
}

/// The trusted manufacturer CA certificates.
#[derive(Debug, Clone, Default)]
pub struct EkCaStore {
    certs: Vec<Vec<u8>>,
    by_subject: HashMap<Vec<u8>, Vec<usize>>,
}

/// What a verified EK certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkInfo {
    /// Issuer DN of the EK certificate (RFC 4514 text).
    pub issuer: String,
    /// `tcg-at-tpmManufacturer`, e.g. `id:00001014`.
    pub manufacturer: Option<String>,
    /// `tcg-at-tpmModel`.
    pub model: Option<String>,
    /// `tcg-at-tpmVersion`.
    pub version: Option<String>,
    /// Subjects of the CA certificates the EK certificate chained to, issuer first.
    pub chain: Vec<String>,
}

impl EkInfo {
    /// For an EK that came without a certificate (nothing vouched for it yet).
    pub fn uncertified() -> Self {
        Self {
            issuer: String::new(),
            manufacturer: None,
            model: None,
            version: None,
            chain: Vec::new(),
        }
    }
}

impl EkCaStore {
    /// Loads every certificate in `dir` (`.pem`/`.crt`/`.cer` may hold several PEM
    /// certificates; `.der` one DER certificate).
    pub fn load_dir(dir: &Path) -> Result<Self, Error> {
        let entries = std::fs::read_dir(dir)
            .map_err(Error::io(format!("reading ek_ca_dir {}", dir.display())))?;
        let mut ders = Vec::new();
        let mut names: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        for p in names {
            let ext = p
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            if !matches!(ext.as_str(), "pem" | "crt" | "cer" | "der") {
                continue;
            }
            let bytes = std::fs::read(&p).map_err(Error::io(format!("reading {}", p.display())))?;
            if bytes.first() != Some(&0x30) {
                let blocks = ::pem::parse_many(&bytes)
                    .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
                for b in blocks.into_iter().filter(|b| b.tag() == "CERTIFICATE") {
                    ders.push(b.into_contents());
                }
            } else {
                ders.push(bytes);
            }
        }
        let store = Self::from_der_certs(ders)
            .map_err(|e| Error::Config(format!("ek_ca_dir {}: {e}", dir.display())))?;
        if store.certs.is_empty() {
            return Err(Error::Config(format!(
                "ek_ca_dir {} holds no certificate (.pem, .crt, .cer or .der)",
                dir.display()
            )));
        }
        Ok(store)
    }

    /// A store of DER certificates.
    pub fn from_der_certs(ders: Vec<Vec<u8>>) -> Result<Self, Error> {
        let mut by_subject: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
        for (i, d) in ders.iter().enumerate() {
            let (_, c) = X509Certificate::from_der(d)
                .map_err(|e| Error::Config(format!("a CA certificate does not parse: {e}")))?;
            by_subject
                .entry(c.subject().as_raw().to_vec())
                .or_default()
                .push(i);
        }
        Ok(Self {
            certs: ders,
            by_subject,
        })
    }

    /// Number of certificates.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// True if the store holds no certificate.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    fn issuers_of<'s>(&'s self, cert: &X509Certificate<'_>) -> Vec<&'s [u8]> {
        self.by_subject
            .get(cert.issuer().as_raw())
            .map(|v| {
                v.iter()
                    .filter_map(|&i| self.certs.get(i).map(Vec::as_slice))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks `cert` (already checked itself) up the directory; `depth` counts CAs so far.
    fn chain_up(
        &self,
        cert: &X509Certificate<'_>,
        what: &str,
        now: i64,
        depth: usize,
        chain: &mut Vec<String>,
    ) -> Result<(), Error> {
        if depth >= MAX_CHAIN {
            return Err(refused(
                UntrustedChain,
                format!("EK certificate chain is longer than {MAX_CHAIN} CA certificates"),
            ));
        }
        let candidates = self.issuers_of(cert);
        if candidates.is_empty() {
            return Err(refused(
                UntrustedChain,
                format!(
                    "{what} is not issued by any CA in ek_ca_dir (its issuer is {})",
                    cert.issuer()
                ),
            ));
        }
        let mut last_err = None;
        for der in candidates {
            let Ok((_, ca)) = X509Certificate::from_der(der) else {
                continue;
            };
            if cert.verify_signature(Some(ca.public_key())).is_err() {
                last_err = Some(refused(
                    UntrustedChain,
                    format!(
                        "{what} signature does not verify with the key of CA {}",
                        ca.subject()
                    ),
                ));
                continue;
            }
            check_ca(&ca, now)?;
            chain.push(ca.subject().to_string());
            let self_issued = ca.subject().as_raw() == ca.issuer().as_raw();
            if self_issued || self.issuers_of(&ca).is_empty() {
                // A root, or an operator-pinned intermediate.
                return Ok(());
            }
            let name = format!("CA certificate {}", ca.subject());
            return self.chain_up(&ca, &name, now, depth + 1, chain);
        }
        Err(last_err.unwrap_or_else(|| {
            refused(
                UntrustedChain,
                format!("{what}: no usable issuer in ek_ca_dir"),
            )
        }))
    }

    /// Verifies an EK certificate for the EK public key `ek` at `now` (Unix seconds).
    pub fn verify(&self, cert_der: &[u8], ek: &wire::Public, now: i64) -> Result<EkInfo, Error> {
        let (rest, cert) = X509Certificate::from_der(cert_der)
            .map_err(|e| refused(Malformed, format!("EK certificate does not parse: {e}")))?;
        if !rest.is_empty() {
            return Err(refused(
                Malformed,
                "EK certificate has trailing bytes after its DER",
            ));
        }
        check_not_sha1(&cert, "EK certificate")?;
        check_validity(&cert, "EK certificate", now)?;
        match cert.extended_key_usage() {
            Ok(None) => {}
            Ok(Some(eku)) => {
                if !eku
                    .value
                    .other
                    .iter()
                    .any(|o| o.to_id_string() == OID_TCG_KP_EK_CERTIFICATE)
                {
                    return Err(refused(
                        UntrustedChain,
                        "EK certificate has an extended key usage without tcg-kp-EKCertificate (2.23.133.8.1)",
                    ));
                }
            }
            Err(e) => {
                return Err(refused(
                    Malformed,
                    format!("EK certificate extended key usage is malformed: {e}"),
                ))
            }
        }
        key_matches(&cert, ek)?;
        let mut chain = Vec::new();
        self.chain_up(&cert, "EK certificate", now, 0, &mut chain)?;
        let mut info = EkInfo {
            issuer: cert.issuer().to_string(),
            manufacturer: None,
            model: None,
            version: None,
            chain,
        };
        tcg_attributes(&cert, &mut info);
        Ok(info)
    }
}

fn check_not_sha1(cert: &X509Certificate<'_>, what: &str) -> Result<(), Error> {
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    // sha1WithRSAEncryption, sha1WithRSA (OIW), ecdsa-with-SHA1
    if matches!(
        oid.as_str(),
        "1.2.840.113549.1.1.5" | "1.3.14.3.2.29" | "1.2.840.10045.4.1"
    ) {
        return Err(refused(
            UntrustedChain,
            format!("{what} is signed with SHA-1"),
        ));
    }
    Ok(())
}

fn check_validity(cert: &X509Certificate<'_>, what: &str, now: i64) -> Result<(), Error> {
    let v = cert.validity();
    if now < v.not_before.timestamp() {
        return Err(refused(
            Expired,
            format!("{what} is not valid yet (notBefore {})", v.not_before),
        ));
    }
    if now > v.not_after.timestamp() {
        return Err(refused(
            Expired,
            format!("{what} has expired (notAfter {})", v.not_after),
        ));
    }
    Ok(())
}

fn check_ca(ca: &X509Certificate<'_>, now: i64) -> Result<(), Error> {
    let what = format!("CA certificate {}", ca.subject());
    check_validity(ca, &what, now)?;
    check_not_sha1(ca, &what)?;
    match ca.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(None) if ca.version() == X509Version::V1 => {}
        Ok(_) => {
            return Err(refused(
                UntrustedChain,
                format!("{what} is not a CA (basicConstraints cA is not set)"),
            ))
        }
        Err(e) => {
            return Err(refused(
                Malformed,
                format!("{what} basicConstraints is malformed: {e}"),
            ))
        }
    }
    match ca.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err(refused(
            UntrustedChain,
            format!("{what} keyUsage does not allow keyCertSign"),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(refused(
            Malformed,
            format!("{what} keyUsage is malformed: {e}"),
        )),
    }
}

fn strip(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

fn key_matches(cert: &X509Certificate<'_>, ek: &wire::Public) -> Result<(), Error> {
    let mismatch = || {
        refused(
            KeyMismatch,
            "EK certificate public key is not the EK public key sent",
        )
    };
    let parsed = cert.public_key().parsed().map_err(|e| {
        refused(
            Malformed,
            format!("EK certificate public key does not parse: {e}"),
        )
    })?;
    match (&ek.key, parsed) {
        (
            PublicKey::Rsa {
                modulus, exponent, ..
            },
            x509_parser::public_key::PublicKey::RSA(rsa),
        ) => {
            if strip(rsa.modulus) != strip(modulus)
                || strip(rsa.exponent) != strip(&exponent.to_be_bytes())
            {
                return Err(mismatch());
            }
        }
        (PublicKey::Ecc { .. }, x509_parser::public_key::PublicKey::EC(point)) => {
            // Compare the whole SPKI semantics: curve OID and point.
            let ours = ek.spki_der()?;
            let (_, our_spki) = SubjectPublicKeyInfo::from_der(&ours)
                .map_err(|_| refused(Malformed, "EK public key cannot be encoded"))?;
            let our_curve = our_spki
                .algorithm
                .parameters
                .as_ref()
                .map(|p| p.as_bytes().to_vec());
            let their_curve = cert
                .public_key()
                .algorithm
                .parameters
                .as_ref()
                .map(|p| p.as_bytes().to_vec());
            if our_curve != their_curve || our_spki.subject_public_key.data.as_ref() != point.data()
            {
                return Err(mismatch());
            }
        }
        _ => return Err(mismatch()),
    }
    Ok(())
}

fn tcg_attributes(cert: &X509Certificate<'_>, info: &mut EkInfo) {
    let mut names: Vec<&X509Name<'_>> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DirectoryName(dn) = n {
                names.push(dn);
            }
        }
    }
    names.push(cert.subject());
    for dn in names {
        for a in dn.iter_attributes() {
            let Ok(v) = a.as_str() else { continue };
            let v = v.trim_matches(char::from(0)).to_string();
            if v.is_empty() {
                continue;
            }
            let slot = match a.attr_type().to_id_string().as_str() {
                OID_TPM_MANUFACTURER => &mut info.manufacturer,
                OID_TPM_MODEL => &mut info.model,
                OID_TPM_VERSION => &mut info.version,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(v);
            }
        }
    }
}
