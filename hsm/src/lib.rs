//! Key management for ztid: signing keys behind one trait, [`KeyManager`]
//! (generate, public key, sign, list, destroy), which never hands out private key
//! material.
//!
//! Every private key that signs for the trust domain (the X.509 authorities' keys,
//! the JWT keys, the audit key) lives behind it. The server only ever holds a key
//! *id*: it asks the key manager for signatures and public keys, so the backend is
//! a configuration choice (`key_manager`) the rest of the server cannot see. Three
//! backends exist, all ECDSA P-256:
//!
//! - `SoftwareKeyManager`: keys generated with `ring`, stored as PKCS#8 files
//!   (directory 0700, files 0600). Always built.
//! - `Pkcs11KeyManager`: keys generated inside a PKCS#11 token (an HSM, a smart
//!   card, SoftHSM2), sensitive and not extractable. Cargo feature `pkcs11`
//!   (`cryptoki`).
//! - `TpmKeyManager`: keys created inside a TPM 2.0 under its storage key, kept as
//!   SRK-wrapped blobs that no other TPM can load. Cargo feature `tpm`
//!   (`tss-esapi`, which links libtss2). The node's TPM attestor uses the `tpm`
//!   module's functions and `TpmKeyBlob` for the agent's own TPM-resident key.
//!
//! Both features are on by default. A binary that needs neither token turns
//! default features off and enables only what it uses, so node binaries need not
//! link PKCS#11 (the agent needs at most `tpm`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod key_files;
#[cfg(feature = "pkcs11")]
mod pkcs11;
mod software;
#[cfg(feature = "tpm")]
pub mod tpm;

#[cfg(feature = "pkcs11")]
pub use pkcs11::Pkcs11KeyManager;
pub use software::SoftwareKeyManager;
#[cfg(feature = "tpm")]
pub use tpm::{TpmKeyBlob, TpmKeyManager};

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key id has characters outside `[A-Za-z0-9._-]` or is empty/too long.
    #[error("invalid key id {0:?}: use 1-128 characters from [A-Za-z0-9._-]")]
    InvalidKeyId(String),
    /// No key with that id.
    #[error("key {0:?} not found")]
    NotFound(String),
    /// A key with that id exists already.
    #[error("key {0:?} already exists")]
    AlreadyExists(String),
    /// Stored key material could not be parsed.
    #[error("key {id:?} is corrupt: {reason}")]
    Corrupt {
        /// The key id.
        id: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The cryptographic library failed.
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
    /// Reading or writing the key store failed.
    #[error("key store I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("PKCS#11 module {path}: {reason}")]
    Pkcs11Module {
        /// The module path as configured.
        path: String,
        /// Why it could not be used.
        reason: String,
    },
    /// No token with that label is present in the module's slots.
    #[error("no token labelled {label:?} in PKCS#11 module {module} (tokens present: {present})")]
    TokenNotFound {
        /// The label asked for.
        label: String,
        /// The module searched.
        module: String,
        /// The labels of the tokens that are present, for the operator.
        present: String,
    },
    /// Logging in to the token failed; the message names the PIN problem, never the PIN.
    #[error("PKCS#11 login to token {token:?} failed: {reason}")]
    Login {
        /// The token label.
        token: String,
        /// What was wrong (e.g. "the PIN is incorrect").
        reason: &'static str,
    },
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {operation} failed: {reason}")]
    Pkcs11 {
        /// What was being done.
        operation: &'static str,
        /// The module's answer.
        reason: String,
    },
    /// A TPM command (or opening the TPM) failed.
    #[error("TPM {operation} failed: {reason}")]
    Tpm {
        /// What was being done.
        operation: &'static str,
        /// The TPM's (or the TSS's) answer.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Key algorithms a key manager can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA over NIST P-256 with SHA-256 (`ES256`).
    EcdsaP256,
}

/// How a signature is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureFormat {
    /// ASN.1 DER `Ecdsa-Sig-Value`, as X.509 certificates carry it.
    Der,
    /// Fixed-width `r || s`, as JWS (`ES256`) carries it.
    Fixed,
}

/// A public key as the key manager reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The algorithm of the key.
    pub algorithm: KeyAlgorithm,
    /// DER `SubjectPublicKeyInfo`.
    pub spki_der: Vec<u8>,
    /// The raw public key (for P-256, the uncompressed SEC1 point, 65 bytes).
    pub raw: Vec<u8>,
}

/// Generates, uses and destroys signing keys without ever handing out private key material.
pub trait KeyManager: Send + Sync {
    /// Creates a new key under `key_id`; fails if one exists.
    fn generate(&self, key_id: &str, algorithm: KeyAlgorithm) -> Result<PublicKey>;
    /// The public half of `key_id`.
    fn public_key(&self, key_id: &str) -> Result<PublicKey>;
    /// Signs `message` (hashing it as the algorithm prescribes) with `key_id`.
    fn sign(&self, key_id: &str, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>>;
    /// Every key id this manager holds.
    fn list(&self) -> Result<Vec<String>>;
    /// Destroys `key_id` irrecoverably.
    fn destroy(&self, key_id: &str) -> Result<()>;
    /// A short name of the backend, for logs and `authority show`.
    fn backend_name(&self) -> &'static str;
}

/// Checks a key id before it is used as a file name or token label.
pub fn validate_key_id(key_id: &str) -> Result<()> {
    let ok = !key_id.is_empty()
        && key_id.len() <= 128
        && !key_id.starts_with('.')
        && key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidKeyId(key_id.to_string()))
    }
}

/// DER `SubjectPublicKeyInfo` prefix for an uncompressed P-256 point
/// (id-ecPublicKey, prime256v1, BIT STRING of 66 bytes).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Wraps an uncompressed P-256 point into a DER `SubjectPublicKeyInfo`.
pub fn p256_spki_from_point(point: &[u8]) -> Result<Vec<u8>> {
    if point.len() != 65 || point.first() != Some(&0x04) {
        return Err(Error::Crypto("not an uncompressed P-256 point"));
    }
    let mut spki = Vec::with_capacity(91);
    spki.extend_from_slice(&P256_SPKI_PREFIX);
    spki.extend_from_slice(point);
    Ok(spki)
}

/// Extracts the uncompressed point from a P-256 `SubjectPublicKeyInfo`.
pub fn p256_point_from_spki(spki: &[u8]) -> Result<&[u8]> {
    match spki.strip_prefix(P256_SPKI_PREFIX.as_slice()) {
        Some(point) if point.len() == 65 => Ok(point),
        _ => Err(Error::Crypto("not a P-256 SubjectPublicKeyInfo")),
    }
}

/// Converts a fixed-width `r || s` ECDSA signature (as PKCS#11's `CKM_ECDSA` and JWS
/// carry it) to an ASN.1 DER `Ecdsa-Sig-Value` (`SEQUENCE { INTEGER r, INTEGER s }`),
/// as X.509 carries it. Each integer is minimal: leading zero bytes are dropped and a
/// zero byte is prepended when the high bit is set, so it stays positive.
pub fn fixed_to_der(sig: &[u8]) -> Result<Vec<u8>> {
    // Up to P-521 (2 x 66 bytes); r and s have the same width.
    if sig.is_empty() || !sig.len().is_multiple_of(2) || sig.len() > 132 {
        return Err(Error::Crypto(
            "fixed-width ECDSA signature has a bad length",
        ));
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    let mut body = Vec::with_capacity(sig.len() + 6);
    for int in [r, s] {
        let mut int = int;
        while let [0, rest @ ..] = int {
            int = rest;
        }
        let Some(&lead) = int.first() else {
            return Err(Error::Crypto("ECDSA signature component is zero"));
        };
        let pad = lead & 0x80 != 0;
        body.push(0x02);
        push_der_len(&mut body, int.len() + usize::from(pad));
        if pad {
            body.push(0x00);
        }
        body.extend_from_slice(int);
    }
    let mut der = Vec::with_capacity(body.len() + 3);
    der.push(0x30);
    push_der_len(&mut der, body.len());
    der.extend_from_slice(&body);
    Ok(der)
}

/// DER definite length, for lengths below 256 (all that ECDSA signatures need).
fn push_der_len(out: &mut Vec<u8>, len: usize) {
    debug_assert!(len < 256);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        out.push(0x81);
        out.push(len as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_to_der_encodes_minimal_positive_integers() {
        // Plain: no high bit, no leading zero.
        let mut sig = vec![0x11u8; 32];
        sig.extend([0x22u8; 32]);
        let der = fixed_to_der(&sig).unwrap();
        assert_eq!(der.len(), 2 + 2 * 34);
        assert_eq!(&der[..4], &[0x30, 68, 0x02, 32]);
        assert_eq!(&der[4..36], &[0x11; 32]);
        assert_eq!(&der[36..38], &[0x02, 32]);

        // High bit set on r: a 0x00 is prepended; leading zeros on s are dropped.
        let mut sig = vec![0x80u8; 32];
        let mut s = vec![0u8; 3];
        s.extend([0x7fu8; 29]);
        sig.extend(&s);
        let der = fixed_to_der(&sig).unwrap();
        assert_eq!(&der[..5], &[0x30, 2 + 33 + 2 + 29, 0x02, 33, 0x00]);
        assert_eq!(&der[5..37], &[0x80; 32]);
        assert_eq!(&der[37..39], &[0x02, 29]);
        assert_eq!(&der[39..], &[0x7f; 29]);

        // Leading zeros followed by a high-bit byte: strip, then pad once.
        let mut sig = vec![0u8, 0u8, 0x90];
        sig.extend([1u8; 29]);
        sig.extend([0u8; 31]);
        sig.push(0x05);
        let der = fixed_to_der(&sig).unwrap();
        assert_eq!(&der[..5], &[0x30, 2 + 31 + 2 + 1, 0x02, 31, 0x00]);
        assert_eq!(der[5], 0x90);
        assert_eq!(&der[der.len() - 3..], &[0x02, 1, 0x05]);

        // Long-form length (P-521 sized, both halves high-bit): 2 x (2 + 67) = 138 > 127.
        let der = fixed_to_der(&[0xffu8; 132]).unwrap();
        assert_eq!(&der[..3], &[0x30, 0x81, 138]);

        for bad in [&[][..], &[1u8; 63][..], &[0u8; 64][..], &[1u8; 134][..]] {
            assert!(fixed_to_der(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fixed_to_der_matches_ring_signatures() {
        use ring::rand::SystemRandom;
        use ring::signature::{
            EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
            ECDSA_P256_SHA256_FIXED_SIGNING,
        };
        let rng = SystemRandom::new();
        let pk8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk8.as_ref(), &rng).unwrap();
        let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
        // Enough signatures that high-bit and short components both occur.
        let (mut padded, mut short) = (0, 0);
        for i in 0..400u32 {
            let msg = i.to_be_bytes();
            let fixed = key.sign(&rng, &msg).unwrap();
            let fixed = fixed.as_ref();
            padded += usize::from(fixed[0] & 0x80 != 0);
            short += usize::from(fixed[0] == 0 || fixed[32] == 0);
            let der = fixed_to_der(fixed).unwrap();
            verifier
                .verify(&msg, &der)
                .expect("DER from fixed verifies");
        }
        assert!(padded > 100, "high-bit r seen {padded} times");
        let _ = short;
    }

    #[test]
    fn key_ids_are_checked() {
        for good in ["x509-ca-1", "jwt.abc_DEF"] {
            assert!(validate_key_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../etc/passwd",
            "a/b",
            ".hidden",
            "sp ace",
            &"a".repeat(129),
        ] {
            assert!(
                matches!(validate_key_id(bad), Err(Error::InvalidKeyId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn spki_round_trip() {
        let mut point = vec![4u8];
        point.extend([7u8; 64]);
        let spki = p256_spki_from_point(&point).unwrap();
        assert_eq!(p256_point_from_spki(&spki).unwrap(), &point[..]);
        assert!(p256_spki_from_point(&point[1..]).is_err());
        assert!(p256_point_from_spki(&spki[1..]).is_err());
    }
}
