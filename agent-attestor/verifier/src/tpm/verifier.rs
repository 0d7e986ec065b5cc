//! The CA side of the exchange: [`TpmVerifier`] checks the initial evidence and sends the
//! credential and nonce; its session checks the answer (activated secret, quote,
//! certification, PCR policy) and names the node with [`selectors_for`].

use std::collections::BTreeMap;
use std::time::SystemTime;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use ztid_attestation::tpm::{parse_json, refused, to_json};
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{PolicyMismatch, Replay};
use ztid_spiffe::Selector;

use super::keys::{check_agent_key, check_keys, verify_certification, CheckedKeys};
use super::{
    credential, quote, Answer, Challenge, InitialEvidence, TpmPolicy, CHALLENGE_TTL, METHOD,
};
use crate::{AttestationContext, AttestedNode, NodeVerifier, VerificationSession, VerifierStep};

/// The selectors a passed attestation proves.
pub fn selectors_for(
    keys: &CheckedKeys,
    pcrs: &BTreeMap<u8, Vec<u8>>,
) -> Result<Vec<Selector>, Error> {
    let mut out = vec![Selector::new(METHOD, &format!("ek-hash:{}", keys.node_id))?];
    for (i, v) in pcrs {
        out.push(Selector::new(
            METHOD,
            &format!("pcr:{i}:{}", hex::encode(v)),
        )?);
    }
    if let Some(m) = &keys.ek_info.manufacturer {
        if let Ok(s) = Selector::new(METHOD, &format!("manufacturer:{m}")) {
            out.push(s);
        }
    }
    if keys.ek_info.chain.is_empty() {
        out.push(Selector::new(METHOD, "ek-cert:none")?);
    } else if let Ok(s) = Selector::new(METHOD, &format!("ek-issuer:{}", keys.ek_info.issuer)) {
        out.push(s);
    }
    Ok(out)
}

fn random(n: usize) -> Result<Vec<u8>, Error> {
    let mut v = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut v)
        .map_err(|_| Error::Config("no system randomness".into()))?;
    Ok(v)
}

/// CA side.
pub struct TpmVerifier {
    policy: std::sync::Arc<TpmPolicy>,
}

impl TpmVerifier {
    /// Builds the verifier from its TOML table (`[attestors.tpm]` in the server config).
    pub fn from_config(config: &toml::Table) -> Result<Self, Error> {
        Ok(Self::new(TpmPolicy::from_table(config, None)?))
    }

    /// A verifier for `policy`.
    pub fn new(policy: TpmPolicy) -> Self {
        Self {
            policy: std::sync::Arc::new(policy),
        }
    }
}

impl NodeVerifier for TpmVerifier {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn start(&self, evidence: &[u8], ctx: &AttestationContext<'_>) -> Result<VerifierStep, Error> {
        self.begin(evidence, ctx, false)
    }

    fn start_as_factor(
        &self,
        evidence: &[u8],
        ctx: &AttestationContext<'_>,
    ) -> Result<VerifierStep, Error> {
        self.begin(evidence, ctx, true)
    }
}

impl TpmVerifier {
    /// `as_factor`: part of a multi-factor attempt, where an EK without certificate may
    /// pass (if `uncertified_ek` allows) because the combination must bind it.
    fn begin(
        &self,
        evidence: &[u8],
        ctx: &AttestationContext<'_>,
        as_factor: bool,
    ) -> Result<VerifierStep, Error> {
        let ev: InitialEvidence = parse_json(evidence, "TPM initial evidence")?;
        if ev.ek_cert.is_empty() && !as_factor {
            return Err(refused(
                PolicyMismatch,
                "a TPM whose EK has no certificate attests only together with an SEV-SNP report that binds it (--attestor tpm,sev-snp)",
            ));
        }
        let keys = check_keys(&self.policy, &ev.ek_cert, &ev.ek_pub, &ev.ak_pub, ctx.now)?;
        let agent_key_name = check_agent_key(&ev.agent_key_pub, ctx.agent_public_key)?;
        let secret = Zeroizing::new(random(32)?);
        let nonce = random(32)?;
        let cred = credential::make_credential(&keys.ek, &keys.ak_name, &secret)?;
        let challenge = to_json(&Challenge {
            credential_blob: cred.blob,
            encrypted_secret: cred.encrypted_secret,
            nonce: nonce.clone(),
            pcrs: self.policy.pcrs.iter().copied().collect(),
        })?;
        let mut transcript = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [evidence, &challenge] {
            transcript.update(&(part.len() as u64).to_be_bytes());
            transcript.update(part);
        }
        Ok(VerifierStep::Challenge(
            challenge,
            Box::new(TpmSession {
                policy: self.policy.clone(),
                keys,
                agent_key_name,
                secret,
                nonce,
                issued_at: ctx.now,
                transcript,
            }),
        ))
    }
}

/// The CA's state between the challenge and the answer.
struct TpmSession {
    policy: std::sync::Arc<TpmPolicy>,
    keys: CheckedKeys,
    agent_key_name: Vec<u8>,
    secret: Zeroizing<Vec<u8>>,
    nonce: Vec<u8>,
    issued_at: SystemTime,
    transcript: ring::digest::Context,
}

impl VerificationSession for TpmSession {
    fn resume(
        self: Box<Self>,
        answer: &[u8],
        ctx: &AttestationContext<'_>,
    ) -> Result<VerifierStep, Error> {
        let s = *self;
        match ctx.now.duration_since(s.issued_at) {
            Ok(d) if d > CHALLENGE_TTL => {
                return Err(refused(
                    Replay,
                    format!(
                        "TPM challenge expired (answered after {} s, limit {} s)",
                        d.as_secs(),
                        CHALLENGE_TTL.as_secs()
                    ),
                ))
            }
            _ => {}
        }
        let a: Answer = parse_json(answer, "TPM challenge answer")?;
        if a.secret.len() != s.secret.len() || !bool::from(a.secret.as_slice().ct_eq(&s.secret)) {
            return Err(refused(
                Replay,
                "credential activation failed: the secret returned is not the one sealed to the EK for this AK \
                 (the AK is not in the TPM that holds the EK, or the answer is from another attempt)",
            ));
        }
        let q = quote::verify_quote(
            &s.keys.ak,
            &a.quote,
            &a.signature,
            &s.nonce,
            &s.policy.pcrs,
            &a.pcrs,
        )?;
        verify_certification(
            &s.keys.ak,
            &a.certify,
            &a.certify_signature,
            &s.nonce,
            &s.agent_key_name,
        )?;
        s.policy.check_pcrs(&s.keys.node_id, &q.pcrs)?;
        let mut transcript = s.transcript;
        transcript.update(&(answer.len() as u64).to_be_bytes());
        transcript.update(answer);
        let mut evidence_digest = [0u8; 32];
        evidence_digest.copy_from_slice(transcript.finish().as_ref());
        Ok(VerifierStep::Attested(AttestedNode {
            method: METHOD,
            node_id: s.keys.node_id.clone(),
            selectors: selectors_for(&s.keys, &q.pcrs)?,
            aliases: Vec::new(),
            evidence_digest,
        }))
    }
}
