//! Confidential-VM evidence through Linux configfs-tsm, and the challenge that binds it.
//!
//! Both SEV-SNP and TDX guests get hardware-signed evidence from the same kernel interface,
//! `/sys/kernel/config/tsm/report` (configfs-tsm, Linux 6.7+): create a directory under the
//! root, write the 64 bytes of report data to `inblob`, read the report (SNP) or quote (TDX)
//! from `outblob`, and for SNP the host's certificate table from `auxblob`. `ztid_attestor::tsm::TsmClient`
//! does exactly that and nothing that needs configfs itself, so tests drive it from a plain
//! directory in which a fake provider answers (it waits for `outblob` to appear).
//!
//! # The challenge
//!
//! The CA's challenge is `nonce (32 random bytes) ‖ the DER SubjectPublicKeyInfo of the
//! agent's CSR`, and the agent puts `SHA-512(nonce ‖ SPKI)` into the 64 bytes of
//! report_data. The CA keeps the nonce only in the attestation session (`ztid_verifier::tsm::Pending`),
//! which is consumed by the answer (single use) and expires [`CHALLENGE_TTL`] after it
//! was issued, measured with the context's clock. The CA checks all 64 bytes, so the
//! evidence is fresh (the nonce) and belongs to the key that will carry the identity
//! (the SPKI): a report captured from another node or an earlier attestation, or one
//! made for another agent key, does not verify.
//!
//! The CA builds the challenge from the CSR it received on the same stream, so a
//! challenge names the key the CA will certify for that stream. That stream is not
//! always this agent's: under `--insecure-bootstrap` the agent does not authenticate the
//! server, and a man in the middle can open its own stream to the CA with its own CSR
//! and forward the CA's challenge (naming the attacker's key) to the agent. So the agent
//! answers only a challenge whose SPKI is its own CSR's: [`report_data_for_challenge`]
//! takes that SPKI and refuses any other (a [`KeyMismatch`] refusal) before any evidence
//! is made, and every method that makes configfs-tsm evidence derives its report_data
//! through it.

use std::time::Duration;

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use crate::Error;
use crate::RefusalKind::{KeyMismatch, Replay};

/// Length of the CA's nonce.
pub const NONCE_LEN: usize = 32;
/// How long a challenge stays valid.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// Longest SubjectPublicKeyInfo accepted in a challenge (an RSA-8192 key fits).
const MAX_SPKI_LEN: usize = 2048;

/// `SHA-512(nonce ‖ spki)`: the report_data the agent must put into its evidence.
pub fn binding(nonce: &[u8], spki: &[u8]) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(nonce);
    ctx.update(spki);
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The challenge bytes for `nonce` and the agent's SPKI.
pub fn challenge(nonce: &[u8; NONCE_LEN], spki: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(NONCE_LEN + spki.len());
    c.extend_from_slice(nonce);
    c.extend_from_slice(spki);
    c
}

/// Agent side: the report_data a challenge asks for, after checking its shape and that
/// the key it binds is `own_spki`, the DER SubjectPublicKeyInfo of the CSR this agent
/// sent on the stream. A challenge naming any other key is refused ([`KeyMismatch`]):
/// answering it would bind this node's evidence to a key someone else holds (a
/// challenge relayed from another client's stream).
pub fn report_data_for_challenge(challenge: &[u8], own_spki: &[u8]) -> Result<[u8; 64], Error> {
    if challenge.len() <= NONCE_LEN || challenge.len() > NONCE_LEN + MAX_SPKI_LEN {
        return Err(Error::Protocol(format!(
            "challenge must be a {NONCE_LEN}-byte nonce followed by a SubjectPublicKeyInfo, got {} bytes",
            challenge.len()
        )));
    }
    let (nonce, spki) = challenge.split_at(NONCE_LEN);
    use x509_parser::prelude::FromDer;
    match x509_parser::x509::SubjectPublicKeyInfo::from_der(spki) {
        Ok(([], _)) if spki == own_spki => Ok(binding(nonce, spki)),
        Ok(([], _)) => Err(Error::refused(
            KeyMismatch,
            "the challenge binds the evidence to a key other than this agent's CSR key \
             (a challenge relayed from another client's attestation stream?): no evidence made",
        )),
        Ok(_) => Err(Error::Protocol(
            "challenge has trailing bytes after the SubjectPublicKeyInfo".into(),
        )),
        Err(e) => Err(Error::Protocol(format!(
            "challenge does not carry a DER SubjectPublicKeyInfo: {e}"
        ))),
    }
}

/// 32 fresh random bytes.
pub fn new_nonce() -> Result<[u8; NONCE_LEN], Error> {
    let mut n = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| Error::Config("the system random generator failed".into()))?;
    Ok(n)
}

/// Compares report_data with the expected value over all 64 bytes, in constant time.
pub fn check_report_data(actual: &[u8; 64], expected: &[u8; 64]) -> Result<(), Error> {
    if bool::from(actual.ct_eq(expected)) {
        Ok(())
    } else {
        Err(Error::refused(Replay, format!(
            "report_data does not match the expected binding (SHA-512 of the CA's nonce and the agent key): got {}",
            hex::encode(actual)
        )))
    }
}

/// Pads an operator-supplied expected report_data (shorter values are zero-padded, as
/// tools that bind a 32-byte hash do) to 64 bytes.
pub fn pad_report_data(rd: &[u8]) -> Result<[u8; 64], Error> {
    let mut out = [0u8; 64];
    let Some(prefix) = out.get_mut(..rd.len()) else {
        return Err(Error::Config(format!(
            "expected report_data is {} bytes; report_data has 64",
            rd.len()
        )));
    };
    prefix.copy_from_slice(rd);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spki() -> Vec<u8> {
        use rcgen::PublicKeyData;
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .subject_public_key_info()
    }

    /// The agent answers a challenge for its own CSR key with SHA-512(nonce ‖ SPKI) and
    /// refuses one for any other key (a challenge relayed from another client's stream
    /// under `--insecure-bootstrap`): the evidence would be bound to the other key.
    #[test]
    fn a_challenge_is_answered_only_for_the_agents_own_key() {
        let own = spki();
        let nonce = new_nonce().unwrap();
        let rd = report_data_for_challenge(&challenge(&nonce, &own), &own).unwrap();
        assert_eq!(rd, binding(&nonce, &own));

        let foreign = spki();
        let e = report_data_for_challenge(&challenge(&nonce, &foreign), &own).unwrap_err();
        assert_eq!(e.refusal_kind(), Some(KeyMismatch), "{e}");
        assert!(
            e.to_string()
                .contains("a key other than this agent's CSR key"),
            "{e}"
        );
        // No own key (none known) answers nothing either.
        let e = report_data_for_challenge(&challenge(&nonce, &own), &[]).unwrap_err();
        assert_eq!(e.refusal_kind(), Some(KeyMismatch), "{e}");
    }

    #[test]
    fn malformed_challenges_are_refused_before_the_key_is_compared() {
        let own = spki();
        let e = report_data_for_challenge(&[0u8; 32], &own).unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        let mut c = vec![0u8; 32];
        c.extend_from_slice(b"not der");
        let e = report_data_for_challenge(&c, b"not der").unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        let mut c = challenge(&[0u8; NONCE_LEN], &own);
        c.push(0);
        let e = report_data_for_challenge(&c, &own).unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
    }
}
