//! `TPM2_MakeCredential` in software (TPM 2.0 Part 1 §24 "Credential Protection",
//! Part 3 §12.6), so a CA without a TPM can challenge a node: only the TPM that holds the
//! EK's private key can recover the secret, and it releases it only for an object with
//! exactly the name the credential was bound to (here the AK).
//!
//! The seed and its encryption to the EK (Part 4 `CryptSecretEncrypt`):
//! - RSA EK: `seed` = random, the size of the EK's nameAlg digest;
//!   `encryptedSecret` = RSA-OAEP(EK, hash = nameAlg, label = `"IDENTITY\0"`, seed);
//! - ECC EK (NIST P-256 or P-384): an ephemeral key pair (`dE`, `QeU`) on the EK's curve,
//!   `Z` = x-coordinate of `dE · QsB` (`QsB` the EK's public point),
//!   `seed` = KDFe(nameAlg, Z, `"IDENTITY"`, QeU.x, QsB.x, digest bits);
//!   `encryptedSecret` = the marshalled `TPMS_ECC_POINT` `QeU` (x and y as `TPM2B`).
//!
//! Then for either:
//! - `symKey` = KDFa(nameAlg, seed, `"STORAGE"`, AK name, ∅, EK symmetric key bits);
//!   `encIdentity` = AES-CFB(symKey, IV = 0, `TPM2B_DIGEST(secret)`);
//! - `hmacKey` = KDFa(nameAlg, seed, `"INTEGRITY"`, ∅, ∅, digest bits);
//!   `outerHMAC` = HMAC(nameAlg, hmacKey, encIdentity || AK name);
//! - `credentialBlob` (the body of a `TPM2B_ID_OBJECT`) = `TPM2B_DIGEST(outerHMAC) || encIdentity`.
//!
//! nameAlg and the symmetric algorithm are the EK's own (from its `TPMT_PUBLIC`): SHA-256
//! and AES-128-CFB for the TCG low-range templates (RSA-2048, P-256), SHA-384 and
//! AES-256-CFB for the high-range ones (P-384, RSA-3072).

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use rsa::{BigUint, Oaep, RsaPublicKey};
use zeroize::Zeroizing;

use super::wire::{alg, curve, digest_len, ecc_point, Public, PublicKey};
use crate::Error;
use ztid_attestation::RefusalKind::{Malformed, Unsupported};

/// A credential for the TPM: the two inputs of `TPM2_ActivateCredential`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Body of the `TPM2B_ID_OBJECT`.
    pub blob: Vec<u8>,
    /// Body of the `TPM2B_ENCRYPTED_SECRET`.
    pub encrypted_secret: Vec<u8>,
}

fn hmac_alg(hash: u16) -> Result<ring::hmac::Algorithm, Error> {
    match hash {
        alg::SHA256 => Ok(ring::hmac::HMAC_SHA256),
        alg::SHA384 => Ok(ring::hmac::HMAC_SHA384),
        alg::SHA512 => Ok(ring::hmac::HMAC_SHA512),
        other => Err(Error::refused(
            Unsupported,
            format!("EK nameAlg 0x{other:04x} is not supported for credential activation"),
        )),
    }
}

/// KDFa (TPM 2.0 Part 1 §11.4.10.2, SP 800-108 counter mode with HMAC).
pub fn kdfa(
    hash: u16,
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>, Error> {
    let k = ring::hmac::Key::new(hmac_alg(hash)?, key);
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 64);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut ctx = ring::hmac::Context::with_key(&k);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(bytes);
    if !bits.is_multiple_of(8) {
        // Not a multiple of 8 bits, so at least one byte.
        if let Some(first) = out.first_mut() {
            *first &= (1u8 << (bits % 8)) - 1;
        }
    }
    Ok(out)
}

/// KDFe (TPM 2.0 Part 1 §11.4.10.3, the SP 800-56A concatenation KDF): blocks
/// H(counter || Z || label || 0x00 || partyUInfo || partyVInfo), counter from 1, the
/// first `bits` bits kept. Unlike KDFa, the length is not hashed.
pub fn kdfe(
    hash: u16,
    z: &[u8],
    label: &str,
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>, Error> {
    let a = super::wire::ring_digest(hash).ok_or_else(|| {
        Error::refused(
            Unsupported,
            format!("EK nameAlg 0x{hash:04x} is not supported for credential activation"),
        )
    })?;
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 64);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut ctx = ring::digest::Context::new(a);
        ctx.update(&counter.to_be_bytes());
        ctx.update(z);
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(party_u);
        ctx.update(party_v);
        out.extend_from_slice(ctx.finish().as_ref());
        counter += 1;
    }
    out.truncate(bytes);
    if !bits.is_multiple_of(8) {
        // Not a multiple of 8 bits, so at least one byte.
        if let Some(first) = out.first_mut() {
            *first &= (1u8 << (bits % 8)) - 1;
        }
    }
    Ok(out)
}

/// The ECC half of `CryptSecretEncrypt`: a fresh ephemeral key on the EK's curve, the seed
/// from KDFe over the ECDH x-coordinate, and the ephemeral point as `TPMS_ECC_POINT`.
fn ecdh_seed(ek: &Public, hash: u16) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let PublicKey::Ecc { curve: c, x, y } = &ek.key else {
        return Err(Error::refused(
            Unsupported,
            "ECDH credential protection needs an ECC EK",
        ));
    };
    let (agreement_alg, len): (&'static ring::agreement::Algorithm, usize) = match *c {
        curve::NIST_P256 => (&ring::agreement::ECDH_P256, 32),
        curve::NIST_P384 => (&ring::agreement::ECDH_P384, 48),
        other => {
            return Err(Error::refused(Unsupported, format!(
                "EK curve 0x{other:04x} is not supported for credential activation (NIST P-256 or P-384)"
            )))
        }
    };
    let ek_point = ecc_point(x, y, len)?;
    let rng = ring::rand::SystemRandom::new();
    let ephemeral = ring::agreement::EphemeralPrivateKey::generate(agreement_alg, &rng)
        .map_err(|_| Error::Config("no system randomness".into()))?;
    let public = ephemeral
        .compute_public_key()
        .map_err(|_| Error::Config("ECDH public key computation failed".into()))?;
    // Uncompressed SEC1: 04 || x || y, each `len` bytes.
    let public = public.as_ref();
    if public.len() != 1 + 2 * len {
        return Err(Error::Config("unexpected ECDH public key size".into()));
    }
    let (eph_x, eph_y) = public
        .get(1..)
        .and_then(|xy| xy.split_at_checked(len))
        .ok_or_else(|| Error::Config("unexpected ECDH public key size".into()))?;
    let dlen = digest_len(hash).unwrap_or(0) as u32;
    // ring checks that the EK point is on the curve (and not the point at infinity).
    let seed = ring::agreement::agree_ephemeral(
        ephemeral,
        &ring::agreement::UnparsedPublicKey::new(agreement_alg, &ek_point),
        |z| kdfe(hash, z, "IDENTITY", eph_x, x, dlen * 8),
    )
    .map_err(|_| Error::refused(Malformed, "EK public point is not a point on its curve"))??;
    let mut encrypted_secret = Vec::with_capacity(4 + 2 * len);
    for c in [eph_x, eph_y] {
        encrypted_secret.extend_from_slice(&(c.len() as u16).to_be_bytes());
        encrypted_secret.extend_from_slice(c);
    }
    Ok((seed, encrypted_secret))
}

fn oaep_encrypt(ek: &Public, hash: u16, seed: &[u8]) -> Result<Vec<u8>, Error> {
    let PublicKey::Rsa {
        modulus, exponent, ..
    } = &ek.key
    else {
        return Err(Error::refused(
            Unsupported,
            "RSA-OAEP seed encryption needs an RSA EK (an ECC EK's seed comes from ECDH)",
        ));
    };
    let key = RsaPublicKey::new(BigUint::from_bytes_be(modulus), BigUint::from(*exponent))
        .map_err(|e| Error::refused(Malformed, format!("EK public key is unusable: {e}")))?;
    let mut rng = rand_core::OsRng;
    let ct = match hash {
        alg::SHA256 => key.encrypt(
            &mut rng,
            Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
            seed,
        ),
        alg::SHA384 => key.encrypt(
            &mut rng,
            Oaep::new_with_label::<sha2::Sha384, _>("IDENTITY\0"),
            seed,
        ),
        alg::SHA512 => key.encrypt(
            &mut rng,
            Oaep::new_with_label::<sha2::Sha512, _>("IDENTITY\0"),
            seed,
        ),
        other => {
            return Err(Error::refused(
                Unsupported,
                format!("EK nameAlg 0x{other:04x} is not supported for credential activation"),
            ))
        }
    };
    ct.map_err(|e| Error::refused(Malformed, format!("RSA-OAEP to the EK failed: {e}")))
}

fn aes_cfb_encrypt(key: &[u8], data: &mut [u8]) -> Result<(), Error> {
    let iv = [0u8; 16];
    match key.len() {
        16 => cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(key, &iv)
            .map_err(|_| Error::refused(Unsupported, "bad AES key"))?
            .encrypt(data),
        32 => cfb_mode::Encryptor::<aes::Aes256>::new_from_slices(key, &iv)
            .map_err(|_| Error::refused(Unsupported, "bad AES key"))?
            .encrypt(data),
        _ => return Err(Error::refused(Unsupported, "unsupported AES key size")),
    }
    Ok(())
}

/// The EK's symmetric key size, if it is a TCG-template storage key (AES-128/256-CFB).
fn sym_bits(ek: &Public) -> Result<u32, Error> {
    match ek.symmetric {
        Some((alg::AES, bits @ (128 | 256), alg::CFB)) => Ok(bits as u32),
        _ => Err(Error::refused(
            Unsupported,
            "EK is not a storage key with AES-CFB (not a TCG template EK)",
        )),
    }
}

/// The EK nameAlg's digest size, if supported.
fn ek_digest_len(ek: &Public) -> Result<usize, Error> {
    match ek.name_alg {
        alg::SHA256 | alg::SHA384 | alg::SHA512 => Ok(digest_len(ek.name_alg).unwrap_or(0)),
        other => Err(Error::refused(
            Unsupported,
            format!("EK nameAlg 0x{other:04x} is not supported for credential activation"),
        )),
    }
}

/// The part common to RSA and ECC EKs: `secret` protected under `seed` for `object_name`.
fn protect(
    ek: &Public,
    object_name: &[u8],
    secret: &[u8],
    seed: &[u8],
    encrypted_secret: Vec<u8>,
) -> Result<Credential, Error> {
    let hash = ek.name_alg;
    let dlen = ek_digest_len(ek)?;
    let sym_bits = sym_bits(ek)?;
    let sym_key = kdfa(hash, seed, "STORAGE", object_name, &[], sym_bits)?;
    let mut enc_identity = (secret.len() as u16).to_be_bytes().to_vec();
    enc_identity.extend_from_slice(secret);
    aes_cfb_encrypt(&sym_key, &mut enc_identity)?;
    let hmac_key = kdfa(hash, seed, "INTEGRITY", &[], &[], (dlen * 8) as u32)?;
    let k = ring::hmac::Key::new(hmac_alg(hash)?, &hmac_key);
    let mut ctx = ring::hmac::Context::with_key(&k);
    ctx.update(&enc_identity);
    ctx.update(object_name);
    let outer = ctx.sign();
    let mut blob = (outer.as_ref().len() as u16).to_be_bytes().to_vec();
    blob.extend_from_slice(outer.as_ref());
    blob.extend_from_slice(&enc_identity);
    Ok(Credential {
        blob,
        encrypted_secret,
    })
}

fn check_inputs(ek: &Public, secret: &[u8]) -> Result<usize, Error> {
    let dlen = ek_digest_len(ek)?;
    if secret.is_empty() || secret.len() > dlen {
        return Err(Error::refused(
            Unsupported,
            "credential secret must be 1..=digest size bytes",
        ));
    }
    sym_bits(ek)?;
    Ok(dlen)
}

/// MakeCredential for an RSA `ek` with a caller-chosen `seed` (for known-answer tests).
/// An ECC EK's seed comes out of an ephemeral ECDH and cannot be chosen.
pub fn make_credential_with_seed(
    ek: &Public,
    object_name: &[u8],
    secret: &[u8],
    seed: &[u8],
) -> Result<Credential, Error> {
    let dlen = check_inputs(ek, secret)?;
    if seed.len() != dlen {
        return Err(Error::refused(
            Unsupported,
            "credential seed size differs from the EK nameAlg",
        ));
    }
    let encrypted_secret = oaep_encrypt(ek, ek.name_alg, seed)?;
    protect(ek, object_name, secret, seed, encrypted_secret)
}

/// MakeCredential: `secret` for whichever TPM holds `ek` (RSA, or ECC on NIST P-256/P-384),
/// released only to the object named `object_name` (the AK's name).
pub fn make_credential(
    ek: &Public,
    object_name: &[u8],
    secret: &[u8],
) -> Result<Credential, Error> {
    let dlen = check_inputs(ek, secret)?;
    match &ek.key {
        PublicKey::Rsa { .. } => {
            let mut seed = Zeroizing::new(vec![0u8; dlen]);
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
                .map_err(|_| Error::Config("no system randomness".into()))?;
            make_credential_with_seed(ek, object_name, secret, &seed)
        }
        PublicKey::Ecc { .. } => {
            let (seed, encrypted_secret) = ecdh_seed(ek, ek.name_alg)?;
            let seed = Zeroizing::new(seed);
            protect(ek, object_name, secret, &seed, encrypted_secret)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_lengths_and_determinism() {
        let a = kdfa(alg::SHA256, b"seed", "STORAGE", b"name", &[], 128).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(
            a,
            kdfa(alg::SHA256, b"seed", "STORAGE", b"name", &[], 128).unwrap()
        );
        let b = kdfa(alg::SHA256, b"seed", "INTEGRITY", &[], &[], 256).unwrap();
        assert_eq!(b.len(), 32);
        let c = kdfa(alg::SHA256, b"seed", "X", &[], &[], 520).unwrap();
        assert_eq!(c.len(), 65);
        // The first block depends on the requested length (it is part of the input).
        assert_ne!(
            c[..32],
            kdfa(alg::SHA256, b"seed", "X", &[], &[], 256).unwrap()[..]
        );
    }

    #[test]
    fn kdfe_known_answer() {
        // KDFe is the SP 800-56A concatenation KDF with OtherInfo = label || 0x00 ||
        // partyUInfo || partyVInfo. RFC 7518 Appendix C (ECDH-ES for A128GCM, Alice and Bob)
        // publishes a Concat KDF vector whose OtherInfo starts with a zero byte, so with an
        // empty label it is KDFe with partyUInfo = the rest of that OtherInfo.
        let z: [u8; 32] = [
            158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let mut other_info = vec![0, 0, 0, 7];
        other_info.extend_from_slice(b"A128GCM");
        other_info.extend_from_slice(&[0, 0, 0, 5]);
        other_info.extend_from_slice(b"Alice");
        other_info.extend_from_slice(&[0, 0, 0, 3]);
        other_info.extend_from_slice(b"Bob");
        other_info.extend_from_slice(&[0, 0, 0, 128]);
        assert_eq!(other_info[0], 0);
        let k = kdfe(alg::SHA256, &z, "", &other_info[1..], &[], 128).unwrap();
        assert_eq!(
            k,
            [86, 170, 141, 234, 248, 35, 109, 32, 92, 34, 40, 205, 113, 167, 16, 26]
        );
        // The label is hashed with its terminating zero, then U and V; the length is not
        // hashed (a shorter output is a prefix of a longer one).
        let long = kdfe(alg::SHA256, &z, "IDENTITY", b"u", b"v", 512).unwrap();
        let short = kdfe(alg::SHA256, &z, "IDENTITY", b"u", b"v", 256).unwrap();
        assert_eq!(long.len(), 64);
        assert_eq!(&long[..32], &short[..]);
        let mut manual = ring::digest::Context::new(&ring::digest::SHA256);
        manual.update(&1u32.to_be_bytes());
        manual.update(&z);
        manual.update(b"IDENTITY\0uv");
        assert_eq!(short, manual.finish().as_ref());
        assert_eq!(
            kdfe(alg::SHA384, &z, "IDENTITY", b"u", b"v", 384)
                .unwrap()
                .len(),
            48
        );
        assert!(kdfe(alg::SHA1, &z, "IDENTITY", b"u", b"v", 160).is_err());
    }

    /// A TCG-template-like ECC EK `TPMT_PUBLIC` (restricted decrypt, AES-CFB) for `point`.
    fn ecc_ek(curve_id: u16, name_alg: u16, aes_bits: u16, point: &[u8]) -> Public {
        let len = (point.len() - 1) / 2;
        let mut t = Vec::new();
        t.extend(alg::ECC.to_be_bytes());
        t.extend(name_alg.to_be_bytes());
        t.extend(0x0003_00b2u32.to_be_bytes());
        t.extend(0u16.to_be_bytes()); // authPolicy (empty here)
        t.extend(alg::AES.to_be_bytes());
        t.extend(aes_bits.to_be_bytes());
        t.extend(alg::CFB.to_be_bytes());
        t.extend(alg::NULL.to_be_bytes()); // scheme
        t.extend(curve_id.to_be_bytes());
        t.extend(alg::NULL.to_be_bytes()); // kdf
        for c in [&point[1..1 + len], &point[1 + len..]] {
            t.extend((len as u16).to_be_bytes());
            t.extend_from_slice(c);
        }
        Public::parse(&t).unwrap()
    }

    fn ephemeral_point(a: &'static ring::agreement::Algorithm) -> Vec<u8> {
        let rng = ring::rand::SystemRandom::new();
        let k = ring::agreement::EphemeralPrivateKey::generate(a, &rng).unwrap();
        k.compute_public_key().unwrap().as_ref().to_vec()
    }

    #[test]
    fn ecc_credentials_have_the_tpm_layout() {
        let name = [0u8, 0x0b]
            .iter()
            .chain(&[7u8; 32])
            .copied()
            .collect::<Vec<_>>();
        for (c, a, hash, bits, len) in [
            (
                curve::NIST_P256,
                &ring::agreement::ECDH_P256,
                alg::SHA256,
                128,
                32usize,
            ),
            (
                curve::NIST_P384,
                &ring::agreement::ECDH_P384,
                alg::SHA384,
                256,
                48,
            ),
        ] {
            let ek = ecc_ek(c, hash, bits, &ephemeral_point(a));
            let cred = make_credential(&ek, &name, &[1u8; 32]).unwrap();
            // encryptedSecret = TPMS_ECC_POINT: TPM2B x || TPM2B y, each the curve size, and
            // a point on the curve (ring accepts it as a peer key).
            let es = &cred.encrypted_secret;
            assert_eq!(es.len(), 4 + 2 * len);
            assert_eq!(u16::from_be_bytes([es[0], es[1]]) as usize, len);
            assert_eq!(u16::from_be_bytes([es[2 + len], es[3 + len]]) as usize, len);
            let point = ecc_point(&es[2..2 + len], &es[4 + len..], len).unwrap();
            let probe =
                ring::agreement::EphemeralPrivateKey::generate(a, &ring::rand::SystemRandom::new())
                    .unwrap();
            ring::agreement::agree_ephemeral(
                probe,
                &ring::agreement::UnparsedPublicKey::new(a, &point),
                |_| (),
            )
            .expect("the ephemeral point is on the curve");
            // credentialBlob = TPM2B outer HMAC (nameAlg size) || AES-CFB(TPM2B secret).
            let d = digest_len(hash).unwrap();
            assert_eq!(u16::from_be_bytes([cred.blob[0], cred.blob[1]]) as usize, d);
            assert_eq!(cred.blob.len(), 2 + d + 2 + 32);
            // Fresh ephemeral key each time.
            assert_ne!(
                make_credential(&ek, &name, &[1u8; 32])
                    .unwrap()
                    .encrypted_secret,
                cred.encrypted_secret
            );
        }
    }

    #[test]
    fn ecc_ek_refusals() {
        let p = ephemeral_point(&ring::agreement::ECDH_P256);
        // A point off the curve (y changed).
        let mut off = p.clone();
        off[64] ^= 1;
        let ek = ecc_ek(curve::NIST_P256, alg::SHA256, 128, &off);
        assert!(matches!(
            make_credential(&ek, b"name", &[1]),
            Err(Error::Refused(r)) if r.kind == Malformed && r.detail == "EK public point is not a point on its curve"
        ));
        // An unsupported curve (P-521, 0x0005) and a chosen seed.
        let mut t = ecc_ek(curve::NIST_P256, alg::SHA256, 128, &p).raw;
        t[18..20].copy_from_slice(&5u16.to_be_bytes());
        let ek = Public::parse(&t).unwrap();
        assert!(matches!(
            make_credential(&ek, b"name", &[1]),
            Err(Error::Refused(r)) if r.kind == Unsupported && r.detail.starts_with("EK curve 0x0005 is not supported")
        ));
        let ek = ecc_ek(curve::NIST_P256, alg::SHA256, 128, &p);
        assert!(matches!(
            make_credential_with_seed(&ek, b"name", &[1], &[0u8; 32]),
            Err(Error::Refused(r)) if r.kind == Unsupported && r.detail.starts_with("RSA-OAEP seed encryption needs an RSA EK")
        ));
    }
}
