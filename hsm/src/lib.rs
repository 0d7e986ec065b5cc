//! Key management for ztid's authorities.
//!
//! Every private key that signs for the trust domain (X.509 CA keys, JWT keys,
//! later the audit key) lives behind [`KeyManager`]. The authorities in `ztid-ca`
//! only ever hold a key *id*: they ask the key manager for signatures and public
//! keys, so the backend (software files today; PKCS#11 tokens and TPM-resident
//! keys behind the same trait) is a configuration choice that the rest of the
//! server cannot see.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod software;

pub use software::SoftwareKeyManager;

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
    if point.len() != 65 || point[0] != 0x04 {
        return Err(Error::Crypto("not an uncompressed P-256 point"));
    }
    let mut spki = Vec::with_capacity(91);
    spki.extend_from_slice(&P256_SPKI_PREFIX);
    spki.extend_from_slice(point);
    Ok(spki)
}

/// Extracts the uncompressed point from a P-256 `SubjectPublicKeyInfo`.
pub fn p256_point_from_spki(spki: &[u8]) -> Result<&[u8]> {
    if spki.len() == 91 && spki[..26] == P256_SPKI_PREFIX {
        Ok(&spki[26..])
    } else {
        Err(Error::Crypto("not a P-256 SubjectPublicKeyInfo"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
