//! The CA side of the configfs-tsm challenge (see `ztid_attestation::tsm`): the state of
//! one issued challenge, single use and valid for [`CHALLENGE_TTL`].

use std::time::{Duration, SystemTime};

use subtle::ConstantTimeEq;

pub use ztid_attestation::tsm::*;
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{KeyMismatch, Replay};

use crate::AttestationContext;

/// RFC 3339 rendering of Unix seconds, for refusal reasons: the one spelling both CLIs
/// print (`ztid-human`).
pub use ztid_human::rfc3339;

/// Evidence files may hold hex (as some tools write reports); anything else is binary.
pub fn maybe_hex(b: &[u8]) -> Vec<u8> {
    let t: Vec<u8> = b
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if !t.is_empty() && t.len().is_multiple_of(2) && t.iter().all(|c| c.is_ascii_hexdigit()) {
        if let Ok(d) = hex::decode(&t) {
            return d;
        }
    }
    b.to_vec()
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut o = [0u8; 32];
    o.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
    o
}

/// CA side: the state of one issued challenge.
#[derive(Clone)]
pub struct Pending {
    nonce: [u8; NONCE_LEN],
    spki_digest: [u8; 32],
    issued_at: SystemTime,
}

impl Pending {
    /// A fresh challenge for the agent key in `ctx`: the state to keep and the bytes to send.
    pub fn issue(ctx: &AttestationContext<'_>) -> Result<(Self, Vec<u8>), Error> {
        if ctx.agent_public_key.is_empty() {
            return Err(Error::Protocol(
                "no agent public key to bind the evidence to".into(),
            ));
        }
        let nonce = new_nonce()?;
        let pending = Self {
            nonce,
            spki_digest: sha256(ctx.agent_public_key),
            issued_at: ctx.now,
        };
        Ok((pending, challenge(&nonce, ctx.agent_public_key)))
    }

    /// The report_data the answer must carry, if the challenge is still valid for
    /// this context: not expired, and the same agent key as when it was issued.
    pub fn expected_report_data(&self, ctx: &AttestationContext<'_>) -> Result<[u8; 64], Error> {
        let age = ctx
            .now
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO);
        if age > CHALLENGE_TTL {
            return Err(Error::refused(
                Replay,
                format!(
                    "challenge expired: answered after {}s, challenges are valid for {}s",
                    age.as_secs(),
                    CHALLENGE_TTL.as_secs()
                ),
            ));
        }
        if !bool::from(sha256(ctx.agent_public_key).ct_eq(&self.spki_digest)) {
            return Err(Error::refused(
                KeyMismatch,
                "the agent key changed between the challenge and the answer",
            ));
        }
        Ok(binding(&self.nonce, ctx.agent_public_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn ctx(key: &[u8], secs: u64) -> AttestationContext<'_> {
        AttestationContext {
            agent_public_key: key,
            now: UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    fn spki() -> Vec<u8> {
        use rcgen::PublicKeyData;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        kp.subject_public_key_info()
    }

    #[test]
    fn challenge_binding_round_trip() {
        let key = spki();
        let (pending, c) = Pending::issue(&ctx(&key, 1000)).unwrap();
        let rd = report_data_for_challenge(&c, &key).unwrap();
        assert_eq!(pending.expected_report_data(&ctx(&key, 1060)).unwrap(), rd);
        check_report_data(&rd, &rd).unwrap();
        let mut other = rd;
        other[63] ^= 1;
        let e = check_report_data(&other, &rd).unwrap_err();
        assert_eq!(e.refusal_kind(), Some(Replay), "{e}");
        let e = e.to_string();
        assert!(e.contains("report_data does not match"), "{e}");
    }

    #[test]
    fn challenge_expires_and_is_bound_to_the_key() {
        let key = spki();
        let (pending, _) = Pending::issue(&ctx(&key, 1000)).unwrap();
        let e = pending.expected_report_data(&ctx(&key, 1061)).unwrap_err();
        assert_eq!(e.refusal_kind(), Some(Replay), "{e}");
        let e = e.to_string();
        assert!(e.contains("challenge expired"), "{e}");
        let other = spki();
        let e = pending
            .expected_report_data(&ctx(&other, 1001))
            .unwrap_err();
        assert_eq!(e.refusal_kind(), Some(KeyMismatch), "{e}");
        let e = e.to_string();
        assert!(e.contains("agent key changed"), "{e}");
    }

    /// The relay under `--insecure-bootstrap`: a man in the middle opens its own stream
    /// with its own CSR and forwards the CA's challenge (bound to its key) to a victim
    /// agent. The victim refuses it, since the challenge's key is not its own CSR key, so
    /// its TEE never makes the report_data the CA expects on the attacker's stream.
    #[test]
    fn a_challenge_relayed_from_another_stream_is_refused_by_the_agent() {
        let victim_key = spki();
        let mitm_key = spki();
        let (pending, relayed) = Pending::issue(&ctx(&mitm_key, 1000)).unwrap();
        let e = report_data_for_challenge(&relayed, &victim_key).unwrap_err();
        assert_eq!(e.refusal_kind(), Some(KeyMismatch), "{e}");
        let e = e.to_string();
        assert!(e.contains("a key other than this agent's CSR key"), "{e}");
        // What the victim would answer for its own key does not fit the attacker's stream.
        let own = binding(&relayed[..NONCE_LEN], &victim_key);
        let expected = pending.expected_report_data(&ctx(&mitm_key, 1001)).unwrap();
        let e = check_report_data(&own, &expected).unwrap_err();
        assert_eq!(e.refusal_kind(), Some(Replay), "{e}");
    }

    #[test]
    fn malformed_challenges_are_refused() {
        let key = spki();
        assert!(report_data_for_challenge(&[0u8; 32], &key).is_err());
        let mut c = vec![0u8; 32];
        c.extend_from_slice(b"not der");
        assert!(report_data_for_challenge(&c, &key).is_err());
    }
}
