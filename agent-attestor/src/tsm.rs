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
//! The SPKI travels in the challenge because the agent-side trait has no access to the
//! agent's CSR; the CA builds the challenge from the CSR it received on the same
//! server-authenticated stream, so a challenge cannot name a key other than the one the
//! CA will certify.

use std::time::Duration;

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use crate::Error;
use crate::RefusalKind::Replay;

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

/// Agent side: the report_data a challenge asks for, after checking its shape.
pub fn report_data_for_challenge(challenge: &[u8]) -> Result<[u8; 64], Error> {
    if challenge.len() <= NONCE_LEN || challenge.len() > NONCE_LEN + MAX_SPKI_LEN {
        return Err(Error::Protocol(format!(
            "challenge must be a {NONCE_LEN}-byte nonce followed by a SubjectPublicKeyInfo, got {} bytes",
            challenge.len()
        )));
    }
    let (nonce, spki) = challenge.split_at(NONCE_LEN);
    use x509_parser::prelude::FromDer;
    match x509_parser::x509::SubjectPublicKeyInfo::from_der(spki) {
        Ok(([], _)) => Ok(binding(nonce, spki)),
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
