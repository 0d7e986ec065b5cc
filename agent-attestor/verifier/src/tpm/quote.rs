//! Quote verification, in this order: the signature over the raw `TPMS_ATTEST` bytes with
//! the AK (nothing is parsed before it verifies), then the parse (magic, type, no trailing
//! bytes), then `extraData` against the nonce, the PCR selection against the one asked
//! for, and the PCR digest against the PCR values the node sent.

use std::collections::{BTreeMap, BTreeSet};

use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use subtle::ConstantTimeEq;

use super::wire::{self, alg, curve, Attest, Attested, PcrBank, PublicKey, Signature};
use crate::Error;
use ztid_attestation::RefusalKind::{
    self, BadSignature, Malformed, PolicyMismatch, Replay, Unsupported,
};

/// Largest `TPMS_ATTEST` accepted.
pub const MAX_ATTEST: usize = 1024;

fn refused(kind: RefusalKind, s: impl Into<String>) -> Error {
    Error::refused(kind, s)
}

fn fixed(b: &[u8], len: usize) -> Result<Vec<u8>, Error> {
    let b = strip(b);
    if b.len() > len {
        return Err(refused(Malformed, "ECDSA signature component is too long"));
    }
    let mut out = vec![0u8; len - b.len()];
    out.extend_from_slice(b);
    Ok(out)
}

fn strip(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

/// Verifies `sig_raw` (a `TPMT_SIGNATURE`) over `msg` with the key `key`. A key whose
/// scheme is set (every restricted signing key) only accepts signatures of that scheme.
/// Returns the signature's hash algorithm (a quote's PCR digest is made with it).
pub fn verify_signature(key: &wire::Public, msg: &[u8], sig_raw: &[u8]) -> Result<u16, Error> {
    let sig = Signature::parse(sig_raw)?;
    let (scheme, hash) = match &sig {
        Signature::Rsa { scheme, hash, .. } => (*scheme, *hash),
        Signature::Ecdsa { hash, .. } => (alg::ECDSA, *hash),
    };
    if let Some(ks) = key.scheme {
        if ks != (scheme, hash) {
            return Err(refused(BadSignature, format!(
                "signature scheme 0x{scheme:04x}/0x{hash:04x} is not the key's scheme 0x{:04x}/0x{:04x}",
                ks.0, ks.1
            )));
        }
    }
    let bad_sig = || refused(BadSignature, "signature does not verify");
    match (&key.key, &sig) {
        (PublicKey::Ecc { curve: c, x, y }, Signature::Ecdsa { hash, r, s }) => {
            let (len, a): (usize, &'static signature::EcdsaVerificationAlgorithm) =
                match (*c, *hash) {
                    (curve::NIST_P256, alg::SHA256) => (32, &signature::ECDSA_P256_SHA256_FIXED),
                    (curve::NIST_P384, alg::SHA384) => (48, &signature::ECDSA_P384_SHA384_FIXED),
                    _ => {
                        return Err(refused(
                            Unsupported,
                            format!("unsupported ECDSA curve/hash 0x{c:04x}/0x{hash:04x}"),
                        ))
                    }
                };
            let point = wire::ecc_point(x, y, len)?;
            let mut rs = fixed(r, len)?;
            rs.extend(fixed(s, len)?);
            UnparsedPublicKey::new(a, &point)
                .verify(msg, &rs)
                .map_err(|_| bad_sig())?;
            Ok(*hash)
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
                    return Err(refused(
                        Unsupported,
                        format!(
                            "unsupported RSA signature scheme/hash 0x{scheme:04x}/0x{hash:04x}"
                        ),
                    ))
                }
            };
            let e = exponent.to_be_bytes();
            RsaPublicKeyComponents {
                n: strip(modulus),
                e: strip(&e),
            }
            .verify(params, msg, sig)
            .map_err(|_| bad_sig())?;
            Ok(*hash)
        }
        _ => Err(refused(
            BadSignature,
            "signature algorithm does not match the key type",
        )),
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
        return Err(refused(Malformed, "quote TPMS_ATTEST is too large"));
    }
    let signed_with = verify_signature(ak, attest_raw, sig_raw).map_err(|e| {
        e.reworded(BadSignature, |r| {
            format!("quote signature check failed: {r}")
        })
    })?;
    let attest = Attest::parse(attest_raw)?;
    let Attested::Quote {
        selection: banks,
        digest,
    } = &attest.attested
    else {
        return Err(refused(
            Malformed,
            "TPMS_ATTEST is not a quote (type is not TPM_ST_ATTEST_QUOTE)",
        ));
    };
    if attest.extra_data.len() != nonce.len()
        || !bool::from(attest.extra_data.as_slice().ct_eq(nonce))
    {
        return Err(refused(
            Replay,
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
        return Err(refused(
            PolicyMismatch,
            format!(
                "quote PCR selection {} is not the requested sha256:{}",
                describe_banks(&got),
                list(selection)
            ),
        ));
    }
    let sent: BTreeSet<u8> = pcr_values.keys().copied().collect();
    if &sent != selection {
        return Err(refused(
            Malformed,
            format!(
                "PCR values sent are for PCRs {}, not the quoted {}",
                list(&sent),
                list(selection)
            ),
        ));
    }
    // TPM2_Quote digests the PCR values with its signing scheme's hash (a P-384 AK's
    // is SHA-384), whichever bank they come from.
    let mut ctx = ring::digest::Context::new(pcr_digest_algorithm(signed_with)?);
    for (i, v) in pcr_values {
        if v.len() != 32 {
            return Err(refused(Malformed, format!("PCR {i} value is not 32 bytes")));
        }
        ctx.update(v);
    }
    if ctx.finish().as_ref() != digest.as_slice() {
        return Err(refused(
            BadSignature,
            "PCR values sent do not match the quote's PCR digest",
        ));
    }
    Ok(VerifiedQuote {
        attest,
        pcrs: pcr_values.clone(),
    })
}

/// The digest of a quote signed with hash `alg` (every hash `verify_signature` accepts).
fn pcr_digest_algorithm(alg: u16) -> Result<&'static ring::digest::Algorithm, Error> {
    match alg {
        alg::SHA256 => Ok(&ring::digest::SHA256),
        alg::SHA384 => Ok(&ring::digest::SHA384),
        alg::SHA512 => Ok(&ring::digest::SHA512),
        other => Err(refused(
            Unsupported,
            format!("quote signed with hash 0x{other:04x}, not SHA-256/384/512"),
        )),
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

#[cfg(test)]
mod tests {
    //! Quotes signed by a software key standing in for an AK, so the checks that a real
    //! TPM never trips (magic, type, trailing bytes, selection) run on validly signed bytes.
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
        ECDSA_P384_SHA384_FIXED_SIGNING,
    };

    struct SoftAk {
        key: EcdsaKeyPair,
        public: wire::Public,
        /// A coordinate's (and a signature half's) length.
        len: usize,
    }

    fn soft_ak() -> SoftAk {
        soft_ak_on(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            curve::NIST_P256,
            alg::SHA256,
            32,
        )
    }

    /// A P-384 AK with the TCG high-range scheme (ECDSA with SHA-384).
    fn soft_p384_ak() -> SoftAk {
        soft_ak_on(
            &ECDSA_P384_SHA384_FIXED_SIGNING,
            curve::NIST_P384,
            alg::SHA384,
            48,
        )
    }

    fn soft_ak_on(
        signing: &'static EcdsaSigningAlgorithm,
        curve_id: u16,
        hash: u16,
        len: usize,
    ) -> SoftAk {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).unwrap();
        let point = key.public_key().as_ref().to_vec();
        let mut t = Vec::new();
        t.extend(alg::ECC.to_be_bytes());
        t.extend(hash.to_be_bytes());
        let attrs = wire::attr::FIXED_TPM
            | wire::attr::FIXED_PARENT
            | wire::attr::SENSITIVE_DATA_ORIGIN
            | wire::attr::USER_WITH_AUTH
            | wire::attr::RESTRICTED
            | wire::attr::SIGN_ENCRYPT;
        t.extend(attrs.to_be_bytes());
        t.extend(0u16.to_be_bytes()); // authPolicy
        t.extend(alg::NULL.to_be_bytes()); // symmetric
        t.extend(alg::ECDSA.to_be_bytes());
        t.extend(hash.to_be_bytes());
        t.extend(curve_id.to_be_bytes());
        t.extend(alg::NULL.to_be_bytes()); // kdf
        for c in [&point[1..1 + len], &point[1 + len..1 + 2 * len]] {
            t.extend((len as u16).to_be_bytes());
            t.extend_from_slice(c);
        }
        SoftAk {
            key,
            public: wire::Public::parse(&t).unwrap(),
            len,
        }
    }

    impl SoftAk {
        fn sign(&self, msg: &[u8], hash: u16) -> Vec<u8> {
            let sig = self.key.sign(&SystemRandom::new(), msg).unwrap();
            let sig = sig.as_ref();
            let mut out = alg::ECDSA.to_be_bytes().to_vec();
            out.extend(hash.to_be_bytes());
            for c in [&sig[..self.len], &sig[self.len..]] {
                out.extend((self.len as u16).to_be_bytes());
                out.extend_from_slice(c);
            }
            out
        }
    }

    fn values() -> BTreeMap<u8, Vec<u8>> {
        (0..8u8).map(|i| (i, vec![i; 32])).collect()
    }

    fn attest(magic: u32, typ: u16, nonce: &[u8], bank: u16, trailing: &[u8]) -> Vec<u8> {
        attest_digested(magic, typ, nonce, bank, trailing, &ring::digest::SHA256)
    }

    /// A quote of `bank`'s PCRs whose PCR digest is made with `digest` (a TPM uses its
    /// signing scheme's hash).
    fn attest_digested(
        magic: u32,
        typ: u16,
        nonce: &[u8],
        bank: u16,
        trailing: &[u8],
        digest: &'static ring::digest::Algorithm,
    ) -> Vec<u8> {
        let mut a = magic.to_be_bytes().to_vec();
        a.extend(typ.to_be_bytes());
        a.extend(0u16.to_be_bytes()); // qualifiedSigner
        a.extend((nonce.len() as u16).to_be_bytes());
        a.extend_from_slice(nonce);
        a.extend(1234u64.to_be_bytes()); // clock
        a.extend(1u32.to_be_bytes()); // resetCount
        a.extend(0u32.to_be_bytes()); // restartCount
        a.push(1); // safe
        a.extend(0x2019_1023u64.to_be_bytes()); // firmwareVersion
        let sel: BTreeSet<u8> = (0..8).collect();
        a.extend(wire::marshal_pcr_selection(bank, &sel));
        let mut h = ring::digest::Context::new(digest);
        values().values().for_each(|v| h.update(v));
        let d = h.finish();
        a.extend((d.as_ref().len() as u16).to_be_bytes());
        a.extend_from_slice(d.as_ref());
        a.extend_from_slice(trailing);
        a
    }

    fn check(ak: &SoftAk, a: &[u8], sig_hash: u16) -> Result<VerifiedQuote, Error> {
        let sel: BTreeSet<u8> = (0..8).collect();
        verify_quote(
            &ak.public,
            a,
            &ak.sign(a, sig_hash),
            b"nonce",
            &sel,
            &values(),
        )
    }

    /// The detail of a refusal of `kind`.
    fn refusal(kind: RefusalKind, r: Result<VerifiedQuote, Error>) -> String {
        match r {
            Err(Error::Refused(s)) if s.kind == kind => s.detail,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_good_quote_passes() {
        let ak = soft_ak();
        let q = check(
            &ak,
            &attest(
                wire::TPM_GENERATED,
                wire::ST_ATTEST_QUOTE,
                b"nonce",
                alg::SHA256,
                &[],
            ),
            alg::SHA256,
        )
        .unwrap();
        assert_eq!(q.attest.clock.reset_count, 1);
        assert_eq!(q.attest.firmware_version, 0x2019_1023);
    }

    #[test]
    fn a_p384_aks_quote_passes_with_its_pcr_digest_made_with_sha384() {
        let ak = soft_p384_ak();
        let quote = |digest| {
            attest_digested(
                wire::TPM_GENERATED,
                wire::ST_ATTEST_QUOTE,
                b"nonce",
                alg::SHA256,
                &[],
                digest,
            )
        };
        let q = check(&ak, &quote(&ring::digest::SHA384), alg::SHA384).unwrap();
        assert_eq!(q.pcrs, values());
        // The sha256 bank's values digested with SHA-256 is not what this AK's TPM signs.
        assert_eq!(
            refusal(
                BadSignature,
                check(&ak, &quote(&ring::digest::SHA256), alg::SHA384)
            ),
            "PCR values sent do not match the quote's PCR digest"
        );
    }

    #[test]
    fn validly_signed_but_malformed_quotes_are_refused() {
        let ak = soft_ak();
        let q = |k, m, t, n: &[u8], b, tr: &[u8]| {
            refusal(k, check(&ak, &attest(m, t, n, b, tr), alg::SHA256))
        };
        assert_eq!(
            q(
                Malformed,
                0xff54_4348,
                wire::ST_ATTEST_QUOTE,
                b"nonce",
                alg::SHA256,
                &[]
            ),
            "TPMS_ATTEST magic is 0xff544348, not TPM_GENERATED_VALUE (0xff544347)"
        );
        assert_eq!(
            q(
                Malformed,
                wire::TPM_GENERATED,
                0x8014,
                b"nonce",
                alg::SHA256,
                &[]
            ),
            "TPMS_ATTEST type is 0x8014, not a quote or certify"
        );
        assert_eq!(
            q(
                Malformed,
                wire::TPM_GENERATED,
                wire::ST_ATTEST_QUOTE,
                b"nonce",
                alg::SHA256,
                &[0]
            ),
            "malformed TPMS_ATTEST (1 trailing bytes)"
        );
        assert_eq!(
            q(
                Replay,
                wire::TPM_GENERATED,
                wire::ST_ATTEST_QUOTE,
                b"other",
                alg::SHA256,
                &[]
            ),
            "quote extraData does not match this attempt's nonce (stale or replayed quote)"
        );
        assert_eq!(
            q(
                PolicyMismatch,
                wire::TPM_GENERATED,
                wire::ST_ATTEST_QUOTE,
                b"nonce",
                alg::SHA1,
                &[]
            ),
            "quote PCR selection sha1:0,1,2,3,4,5,6,7 is not the requested sha256:0,1,2,3,4,5,6,7"
        );
        // A certify structure (parses, right magic) is not a quote.
        let mut c = wire::TPM_GENERATED.to_be_bytes().to_vec();
        c.extend(wire::ST_ATTEST_CERTIFY.to_be_bytes());
        c.extend([0, 0, 0, 5]);
        c.extend(b"nonce");
        c.extend([0u8; 25]);
        c.extend([0, 2, 0xaa, 0xbb, 0, 0]);
        assert_eq!(
            refusal(Malformed, check(&ak, &c, alg::SHA256)),
            "TPMS_ATTEST is not a quote (type is not TPM_ST_ATTEST_QUOTE)"
        );
        // A signature claiming another hash than the AK's scheme.
        let a = attest(
            wire::TPM_GENERATED,
            wire::ST_ATTEST_QUOTE,
            b"nonce",
            alg::SHA256,
            &[],
        );
        assert!(refusal(BadSignature, check(&ak, &a, alg::SHA384)).starts_with(
            "quote signature check failed: signature scheme 0x0018/0x000c is not the key's scheme"
        ));
        // Garbage never panics the parsers.
        let mut x: u32 = 12345;
        for len in 0..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = wire::Attest::parse(&buf);
            let _ = wire::Public::parse(&buf);
            let _ = wire::Signature::parse(&buf);
        }
    }
}
