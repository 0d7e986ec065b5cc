//! The session key: an Ed25519 key made at every start, kept only in memory, that
//! seals each batch the writer makes durable. A checkpoint signed by the audit key
//! (in the key manager) binds it to the log, so the slow, guarded key signs once per
//! start and then every 10 s, while each batch costs one fast in-memory signature in
//! the same `fdatasync`. When the process ends the key is gone: whoever edits the log
//! of a stopped (or crashed) server cannot seal what they append.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use super::format::seal_message;
use crate::AuditError;
use crate::Result;

/// This run's sealing key.
pub(crate) struct SessionKey {
    pair: Ed25519KeyPair,
    public_b64: String,
}

impl SessionKey {
    /// A fresh key.
    pub(crate) fn generate() -> Result<Self> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| AuditError::Unavailable("audit session key: no randomness".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| AuditError::Unavailable("audit session key: unusable".into()))?;
        let public_b64 = B64.encode(pair.public_key().as_ref());
        Ok(Self { pair, public_b64 })
    }

    /// Base64 public key, as checkpoints carry it.
    pub(crate) fn public_b64(&self) -> &str {
        &self.public_b64
    }

    /// Base64 signature for a seal at `seq` after the line hashing to `prev`.
    pub(crate) fn seal(&self, seq: u64, prev: &str) -> String {
        B64.encode(self.pair.sign(&seal_message(seq, prev)).as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::format::seal_verifies;

    #[test]
    fn a_seal_verifies_only_for_its_key_and_position() {
        let k = SessionKey::generate().unwrap();
        let other = SessionKey::generate().unwrap();
        let sig = k.seal(7, "ab");
        assert!(seal_verifies(k.public_b64(), 7, "ab", &sig));
        assert!(!seal_verifies(k.public_b64(), 8, "ab", &sig));
        assert!(!seal_verifies(k.public_b64(), 7, "ac", &sig));
        assert!(!seal_verifies(other.public_b64(), 7, "ab", &sig));
        assert!(!seal_verifies("not base64!", 7, "ab", &sig));
    }
}
