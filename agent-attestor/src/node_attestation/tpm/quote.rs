//! Quote verification, in this order: the signature over the raw `TPMS_ATTEST` bytes with
//! the AK (nothing is parsed before it verifies), then the parse (magic, type, no trailing
//! bytes), then `extraData` against the nonce, the PCR selection against the one asked
//! for, and the PCR digest against the PCR values the node sent.

use std::collections::{BTreeMap, BTreeSet};

use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use subtle::ConstantTimeEq;

use super::wire::{self, alg, curve, Attest, Attested, PcrBank, PublicKey, Signature};
use crate::Error;

/// Largest `TPMS_ATTEST` accepted.
pub const MAX_ATTEST: usize = 1024;

fn refused(s: impl Into<String>) -> Error {
    Error::Refused(s.into())
}

fn fixed(b: &[u8], len: usize) -> Result<Vec<u8>, Error> {
    let n = b.iter().take_while(|&&x| x == 0).count();
    let b = &b[n..];
    if b.len() > len {
        return Err(refused("ECDSA signature component is too long"));
    }
    let mut out = vec![0u8; len - b.len()];
    out.extend_from_slice(b);
    Ok(out)
}

fn strip(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|&&x| x == 0).count();
    &b[n..]
}

/// Verifies `sig_raw` (a `TPMT_SIGNATURE`) over `msg` with the key `key`. A key whose
/// scheme is set (every restricted signing key) only accepts signatures of that scheme.
pub fn verify_signature(key: &wire::Public, msg: &[u8], sig_raw: &[u8]) -> Result<(), Error> {
    let sig = Signature::parse(sig_raw)?;
    let (scheme, hash) = match &sig {
        Signature::Rsa { scheme, hash, .. } => (*scheme, *hash),
        Signature::Ecdsa { hash, .. } => (alg::ECDSA, *hash),
    };
    if let Some(ks) = key.scheme {
        if ks != (scheme, hash) {
            return Err(refused(format!(
                "signature scheme 0x{scheme:04x}/0x{hash:04x} is not the key's scheme 0x{:04x}/0x{:04x}",
                ks.0, ks.1
            )));
        }
    }
    let bad_sig = || refused("signature does not verify");
    match (&key.key, &sig) {
        (PublicKey::Ecc { curve: c, x, y }, Signature::Ecdsa { hash, r, s }) => {
            let (len, a): (usize, &'static signature::EcdsaVerificationAlgorithm) =
                match (*c, *hash) {
                    (curve::NIST_P256, alg::SHA256) => (32, &signature::ECDSA_P256_SHA256_FIXED),
                    (curve::NIST_P384, alg::SHA384) => (48, &signature::ECDSA_P384_SHA384_FIXED),
                    _ => {
                        return Err(refused(format!(
                            "unsupported ECDSA curve/hash 0x{c:04x}/0x{hash:04x}"
                        )))
                    }
                };
            let point = wire::ecc_point(x, y, len)?;
            let mut rs = fixed(r, len)?;
            rs.extend(fixed(s, len)?);
            UnparsedPublicKey::new(a, &point)
                .verify(msg, &rs)
                .map_err(|_| bad_sig())
        }
        (
            PublicKey::Rsa {
                modulus, exponent, ..
            },
            Signature::Rsa { scheme, hash, sig },
        ) => {
            let params: &'static signature::RsaParameters = match (*scheme, *hash) {
                (alg::RSASSA, alg::SHA256) => &signature::RSA_PKCS1_2048_8192_SHA256,
                (alg::RSASSA, alg::SHA384) => &signature::RSA_PKCS1_2048_8192_SHA384,
                (alg::RSASSA, alg::SHA512) => &signature::RSA_PKCS1_2048_8192_SHA512,
                (alg::RSAPSS, alg::SHA256) => &signature::RSA_PSS_2048_8192_SHA256,
                (alg::RSAPSS, alg::SHA384) => &signature::RSA_PSS_2048_8192_SHA384,
                (alg::RSAPSS, alg::SHA512) => &signature::RSA_PSS_2048_8192_SHA512,
                _ => {
                    return Err(refused(format!(
                        "unsupported RSA signature scheme/hash 0x{scheme:04x}/0x{hash:04x}"
                    )))
                }
            };
            let e = exponent.to_be_bytes();
            RsaPublicKeyComponents {
                n: strip(modulus),
                e: strip(&e),
            }
            .verify(params, msg, sig)
            .map_err(|_| bad_sig())
        }
        _ => Err(refused("signature algorithm does not match the key type")),
    }
}

/// What a verified quote attests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedQuote {
    /// The parsed `TPMS_ATTEST` (its signature verified).
    pub attest: Attest,
    /// The PCR values (sha256 bank) the quote's digest covers.
    pub pcrs: BTreeMap<u8, Vec<u8>>,
}

/// Verifies a quote by `ak` over `nonce` of the sha256 PCRs `selection`, whose values the
/// node sent as `pcr_values`.
pub fn verify_quote(
    ak: &wire::Public,
    attest_raw: &[u8],
    sig_raw: &[u8],
    nonce: &[u8],
    selection: &BTreeSet<u8>,
    pcr_values: &BTreeMap<u8, Vec<u8>>,
) -> Result<VerifiedQuote, Error> {
    if attest_raw.len() > MAX_ATTEST {
        return Err(refused("quote TPMS_ATTEST is too large"));
    }
    verify_signature(ak, attest_raw, sig_raw)
        .map_err(|e| refused(format!("quote signature check failed: {}", reason(&e))))?;
    let attest = Attest::parse(attest_raw)?;
    let Attested::Quote {
        selection: banks,
        digest,
    } = &attest.attested
    else {
        return Err(refused(
            "TPMS_ATTEST is not a quote (type is not TPM_ST_ATTEST_QUOTE)",
        ));
    };
    if attest.extra_data.len() != nonce.len()
        || !bool::from(attest.extra_data.as_slice().ct_eq(nonce))
    {
        return Err(refused(
            "quote extraData does not match this attempt's nonce (stale or replayed quote)",
        ));
    }
    let want = vec![PcrBank {
        hash: alg::SHA256,
        pcrs: selection.clone(),
    }];
    // A bank with an empty selection selects nothing; ignore it when comparing.
    let got: Vec<PcrBank> = banks
        .iter()
        .filter(|b| !b.pcrs.is_empty())
        .cloned()
        .collect();
    if got != want {
        return Err(refused(format!(
            "quote PCR selection {} is not the requested sha256:{}",
            describe_banks(&got),
            list(selection)
        )));
    }
    let sent: BTreeSet<u8> = pcr_values.keys().copied().collect();
    if &sent != selection {
        return Err(refused(format!(
            "PCR values sent are for PCRs {}, not the quoted {}",
            list(&sent),
            list(selection)
        )));
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (i, v) in pcr_values {
        if v.len() != 32 {
            return Err(refused(format!("PCR {i} value is not 32 bytes")));
        }
        ctx.update(v);
    }
    if ctx.finish().as_ref() != digest.as_slice() {
        return Err(refused(
            "PCR values sent do not match the quote's PCR digest",
        ));
    }
    Ok(VerifiedQuote {
        attest,
        pcrs: pcr_values.clone(),
    })
}

fn reason(e: &Error) -> String {
    match e {
        Error::Refused(r) => r.clone(),
        other => other.to_string(),
    }
}

/// `0,1,7`.
pub fn list(pcrs: &BTreeSet<u8>) -> String {
    pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

fn describe_banks(banks: &[PcrBank]) -> String {
    if banks.is_empty() {
        return "(empty)".into();
    }
    banks
        .iter()
        .map(|b| {
            let name = match b.hash {
                alg::SHA1 => "sha1".to_string(),
                alg::SHA256 => "sha256".to_string(),
                alg::SHA384 => "sha384".to_string(),
                alg::SHA512 => "sha512".to_string(),
                h => format!("0x{h:04x}"),
            };
            format!("{name}:{}", list(&b.pcrs))
        })
        .collect::<Vec<_>>()
        .join("+")
}
