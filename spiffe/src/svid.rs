//! X509-SVID checks shared by the CA and the agent: the SPIFFE ID a certificate
//! carries, and path validation of a chain against a trust domain's authorities.

use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::SpiffeId;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Error;

/// The SPIFFE ID of an X509-SVID leaf: exactly one URI SAN, a `spiffe://` ID in
/// canonical spelling ([`crate::spiffe_id::parse`]) with a non-root path, and CA=false.
pub fn spiffe_id_of_leaf(der: &[u8]) -> Result<SpiffeId, Error> {
    spiffe_id_of(&parse_whole(der)?)
}

/// What the node API reads of a peer's leaf, in one parse.
#[derive(Debug, Clone)]
pub struct LeafFacts {
    /// Its SPIFFE ID, checked as [`spiffe_id_of_leaf`] does.
    pub spiffe_id: SpiffeId,
    /// Its serial, as [`serial_hex`] spells it.
    pub serial_hex: String,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
    /// Lowercase hex SHA-256 of its DER SubjectPublicKeyInfo: the key a TLS peer
    /// presenting this leaf proved it holds.
    pub key_sha256: String,
}

/// Reads [`LeafFacts`] from a DER X509-SVID leaf.
pub fn leaf_facts(der: &[u8]) -> Result<LeafFacts, Error> {
    let cert = parse_whole(der)?;
    Ok(LeafFacts {
        spiffe_id: spiffe_id_of(&cert)?,
        serial_hex: hex::encode(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
        key_sha256: key_sha256_of(&cert),
    })
}

/// Lowercase hex SHA-256 of a certificate's DER SubjectPublicKeyInfo.
pub fn key_sha256(der: &[u8]) -> Result<String, Error> {
    Ok(key_sha256_of(&parse_whole(der)?))
}

fn key_sha256_of(cert: &X509Certificate<'_>) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        cert.public_key().raw,
    ))
}

fn parse_whole(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::InvalidSvid(format!("certificate does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::InvalidSvid(
            "trailing bytes after certificate".into(),
        ));
    }
    Ok(cert)
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, Error> {
    let mut uris = Vec::new();
    let mut is_ca = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::URI(u) = name {
                        uris.push(*u);
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
            _ => {}
        }
    }
    if is_ca {
        return Err(Error::InvalidSvid("leaf is a CA certificate".into()));
    }
    let [uri] = uris[..] else {
        return Err(Error::InvalidSvid(format!(
            "expected exactly one URI SAN, found {}",
            uris.len()
        )));
    };
    // Canonical spelling only: `SPIFFE://EXAMPLE.org/x` must not pass for `spiffe://example.org/x`.
    let id = crate::spiffe_id::parse(uri)?;
    if id.path().is_empty() {
        return Err(Error::InvalidSvid("leaf SPIFFE ID has no path".into()));
    }
    Ok(id)
}

/// Which EKU a chain must allow.
#[derive(Debug, Clone, Copy)]
pub enum Usage {
    /// TLS client (agents calling the node API).
    Client,
    /// TLS server (the server's node API endpoint).
    Server,
}

/// Validates `chain` (leaf first) against `roots` at `now` (RFC 5280 path validation
/// by rustls-webpki) and returns the leaf's SPIFFE ID.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'static>],
    now: UnixTime,
    usage: Usage,
) -> Result<SpiffeId, Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| Error::InvalidSvid("empty certificate chain".into()))?;
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    if anchors.is_empty() {
        return Err(Error::InvalidSvid("no usable trust anchors".into()));
    }
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| Error::InvalidSvid(format!("leaf does not parse: {e}")))?;
    let usage = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| Error::InvalidSvid(format!("chain does not validate: {e}")))?;
    spiffe_id_of_leaf(leaf)
}

/// The serial number of a certificate, as lowercase hex without leading zero bytes.
pub fn serial_hex(der: &[u8]) -> Result<String, Error> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::InvalidSvid(format!("certificate does not parse: {e}")))?;
    Ok(hex::encode(cert.raw_serial()))
}

/// `notAfter` of a certificate in Unix seconds.
pub fn not_after(der: &[u8]) -> Result<i64, Error> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::InvalidSvid(format!("certificate does not parse: {e}")))?;
    Ok(cert.validity().not_after.timestamp())
}

/// `notBefore` of a certificate in Unix seconds.
pub fn not_before(der: &[u8]) -> Result<i64, Error> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::InvalidSvid(format!("certificate does not parse: {e}")))?;
    Ok(cert.validity().not_before.timestamp())
}

/// Concatenates DER certificates (the Workload API's `bytes` chain encoding).
pub fn concat_der<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for c in certs {
        out.extend_from_slice(c);
    }
    out
}

/// PEM-encodes DER certificates.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> String {
    certs
        .into_iter()
        .map(|c| pem_lf(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect()
}

/// Parses every `CERTIFICATE` block of a PEM file.
pub fn certs_from_pem(text: &str) -> Result<Vec<Vec<u8>>, Error> {
    let blocks = pem::parse_many(text).map_err(|e| Error::Config(format!("bad PEM: {e}")))?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(Error::Config("no CERTIFICATE block in PEM".into()));
    }
    Ok(certs)
}

/// The authority that signed an SVID, as its id (hex serial of its CA certificate):
/// the first intermediate when the chain carries one (ztid under an upstream root),
/// else the bundle root matched by the leaf's authority key identifier.
pub fn issuing_authority_of_chain(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> Option<String> {
    match chain {
        [_, intermediate, ..] => serial_hex(intermediate).ok(),
        [leaf] => issuing_authority(leaf, roots),
        [] => None,
    }
}

/// The authority (hex serial of the CA certificate among `roots`) whose key signed
/// `leaf`, matched by the leaf's authority key identifier.
pub fn issuing_authority(leaf: &[u8], roots: &[Vec<u8>]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })?;
    roots.iter().find_map(|r| {
        let (_, ca) = X509Certificate::from_der(r).ok()?;
        let ski = ca
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })?;
        (ski == aki).then(|| hex::encode(ca.raw_serial()))
    })
}

/// PEM with Unix line endings (the `pem` crate defaults to CRLF).
pub fn pem_lf(p: &pem::Pem) -> String {
    pem::encode_config(
        p,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(uri: &str) -> Vec<u8> {
        leaf_with(uri, &rcgen::KeyPair::generate().unwrap())
    }

    fn leaf_with(uri: &str, key: &rcgen::KeyPair) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.to_string().try_into().unwrap())];
        p.self_signed(key).unwrap().der().to_vec()
    }

    #[test]
    fn leaf_facts_are_what_the_single_readers_say_and_the_key_is_the_spki_hash() {
        let key = rcgen::KeyPair::generate().unwrap();
        let der = leaf_with("spiffe://example.org/ztid/agent/x", &key);
        let f = leaf_facts(&der).unwrap();
        assert_eq!(f.spiffe_id, spiffe_id_of_leaf(&der).unwrap());
        assert_eq!(f.serial_hex, serial_hex(&der).unwrap());
        assert_eq!(f.not_after, not_after(&der).unwrap());
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        assert_eq!(
            f.key_sha256,
            hex::encode(ring::digest::digest(&ring::digest::SHA256, &spki))
        );
        assert_eq!(key_sha256(&der).unwrap(), f.key_sha256);
        // Another certificate for the same key has the same key hash; another key not.
        let again = leaf_with("spiffe://example.org/other", &key);
        assert_eq!(key_sha256(&again).unwrap(), f.key_sha256);
        let other = leaf("spiffe://example.org/ztid/agent/x");
        assert_ne!(key_sha256(&other).unwrap(), f.key_sha256);
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(leaf_facts(&trailing)
            .unwrap_err()
            .to_string()
            .contains("trailing bytes"));
    }

    #[test]
    fn a_leaf_id_is_read_only_in_canonical_spelling() {
        assert_eq!(
            spiffe_id_of_leaf(&leaf("spiffe://example.org/ztid/admin/root"))
                .unwrap()
                .to_string(),
            "spiffe://example.org/ztid/admin/root"
        );
        for uri in [
            "SPIFFE://EXAMPLE.ORG/ztid/admin/root",
            "spiffe://EXAMPLE.org/ztid/admin/root",
            "spiffe://example.org/ztid/admin/root/",
            "spiffe://example.org/ztid/%61dmin/root",
        ] {
            let e = spiffe_id_of_leaf(&leaf(uri)).unwrap_err().to_string();
            assert!(e.contains("not a canonical SPIFFE ID"), "{uri}: {e}");
        }
    }
}
