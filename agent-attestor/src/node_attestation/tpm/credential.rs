//! `TPM2_MakeCredential` in software (TPM 2.0 Part 1 §24 "Credential Protection",
//! Part 3 §12.6), so a CA without a TPM can challenge a node: only the TPM that holds the
//! EK's private key can recover the secret, and it releases it only for an object with
//! exactly the name the credential was bound to (here the AK).
//!
//! For an RSA EK:
//! - `seed` = random, the size of the EK's nameAlg digest;
//!   `encryptedSecret` = RSA-OAEP(EK, hash = nameAlg, label = `"IDENTITY\0"`, seed);
//! - `symKey` = KDFa(nameAlg, seed, `"STORAGE"`, AK name, ∅, EK symmetric key bits);
//!   `encIdentity` = AES-CFB(symKey, IV = 0, `TPM2B_DIGEST(secret)`);
//! - `hmacKey` = KDFa(nameAlg, seed, `"INTEGRITY"`, ∅, ∅, digest bits);
//!   `outerHMAC` = HMAC(nameAlg, hmacKey, encIdentity || AK name);
//! - `credentialBlob` (the body of a `TPM2B_ID_OBJECT`) = `TPM2B_DIGEST(outerHMAC) || encIdentity`.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use rsa::{BigUint, Oaep, RsaPublicKey};

use super::wire::{alg, digest_len, Public, PublicKey};
use crate::Error;

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
        other => Err(Error::Refused(format!(
            "EK nameAlg 0x{other:04x} is not supported for credential activation"
        ))),
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
        out[0] &= (1u8 << (bits % 8)) - 1;
    }
    Ok(out)
}

fn oaep_encrypt(ek: &Public, hash: u16, seed: &[u8]) -> Result<Vec<u8>, Error> {
    let PublicKey::Rsa {
        modulus, exponent, ..
    } = &ek.key
    else {
        return Err(Error::Refused(
            "credential activation needs an RSA EK".into(),
        ));
    };
    let key = RsaPublicKey::new(BigUint::from_bytes_be(modulus), BigUint::from(*exponent))
        .map_err(|e| Error::Refused(format!("EK public key is unusable: {e}")))?;
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
            return Err(Error::Refused(format!(
                "EK nameAlg 0x{other:04x} is not supported for credential activation"
            )))
        }
    };
    ct.map_err(|e| Error::Refused(format!("RSA-OAEP to the EK failed: {e}")))
}

fn aes_cfb_encrypt(key: &[u8], data: &mut [u8]) -> Result<(), Error> {
    let iv = [0u8; 16];
    match key.len() {
        16 => cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(key, &iv)
            .map_err(|_| Error::Refused("bad AES key".into()))?
            .encrypt(data),
        32 => cfb_mode::Encryptor::<aes::Aes256>::new_from_slices(key, &iv)
            .map_err(|_| Error::Refused("bad AES key".into()))?
            .encrypt(data),
        _ => return Err(Error::Refused("unsupported AES key size".into())),
    }
    Ok(())
}

/// MakeCredential for `ek` with a caller-chosen `seed` (for known-answer tests).
pub fn make_credential_with_seed(
    ek: &Public,
    object_name: &[u8],
    secret: &[u8],
    seed: &[u8],
) -> Result<Credential, Error> {
    let hash = ek.name_alg;
    let dlen = digest_len(hash).unwrap_or(0);
    if seed.len() != dlen {
        return Err(Error::Refused(
            "credential seed size differs from the EK nameAlg".into(),
        ));
    }
    if secret.is_empty() || secret.len() > dlen {
        return Err(Error::Refused(
            "credential secret must be 1..=digest size bytes".into(),
        ));
    }
    let sym_bits = match ek.symmetric {
        Some((alg::AES, bits @ (128 | 256), alg::CFB)) => bits,
        _ => {
            return Err(Error::Refused(
                "EK is not a storage key with AES-CFB (not a TCG template EK)".into(),
            ))
        }
    };
    let encrypted_secret = oaep_encrypt(ek, hash, seed)?;
    let sym_key = kdfa(hash, seed, "STORAGE", object_name, &[], sym_bits as u32)?;
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

/// MakeCredential: `secret` for whichever TPM holds `ek`, released only to the object
/// named `object_name` (the AK's name).
pub fn make_credential(
    ek: &Public,
    object_name: &[u8],
    secret: &[u8],
) -> Result<Credential, Error> {
    let dlen = digest_len(ek.name_alg).ok_or_else(|| {
        Error::Refused(format!(
            "EK nameAlg 0x{:04x} is not supported for credential activation",
            ek.name_alg
        ))
    })?;
    let mut seed = vec![0u8; dlen];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| Error::Config("no system randomness".into()))?;
    make_credential_with_seed(ek, object_name, secret, &seed)
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
}
