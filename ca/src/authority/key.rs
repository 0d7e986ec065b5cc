//! The signing key every authority uses: [`ManagedKey`], a key held in the key manager
//! that rcgen can sign with (its private half never leaves the manager), and the random
//! serials and ids authorities are named by. The bottom of the folder: it imports
//! nothing from the other authority files, so `upstream.rs` (whose key may be a
//! managed one) no longer imports the X.509 authority that imports it.

use std::sync::Arc;

use rcgen::{PublicKeyData, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use ztid_hsm::{KeyManager, SignatureFormat};

use crate::{Error, Result};

/// A key in the key manager, usable by rcgen as an issuer key.
pub struct ManagedKey {
    km: Arc<dyn KeyManager>,
    key_id: String,
    public_raw: Vec<u8>,
}

impl ManagedKey {
    /// Looks up `key_id` in `km`.
    pub fn load(km: Arc<dyn KeyManager>, key_id: &str) -> Result<Self> {
        let public = km.public_key(key_id)?;
        Ok(Self {
            km,
            key_id: key_id.to_string(),
            public_raw: public.raw,
        })
    }
}

impl PublicKeyData for ManagedKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public_raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for ManagedKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.km
            .sign(&self.key_id, msg, SignatureFormat::Der)
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

/// 16 random bytes, high bit cleared so the DER INTEGER stays positive: 127 bits of
/// entropy, well over the 64 the CA/B baseline asks for.
pub fn random_serial() -> Result<Vec<u8>> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Certificate("no randomness".into()))?;
    b[0] &= 0x7f;
    if b[0] == 0 {
        b[0] = 1; // keep the full length so serials never collide by truncation
    }
    Ok(b.to_vec())
}

/// Random hex id of `n` bytes.
pub fn random_hex(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Certificate("no randomness".into()))?;
    Ok(hex::encode(b))
}
