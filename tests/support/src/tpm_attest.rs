//! Shared by the TPM protocol tests and the TPM benchmark: the CA's context, the
//! agent's first message, one whole exchange, and a fixture with a provisioned swtpm.

use std::time::SystemTime;

use crate::swtpm::{LocalCa, Swtpm};
use ztid_attestation::{Error, RefusalKind};
use ztid_attestor::tpm::TpmAttestor;
use ztid_attestor::NodeAttestor;
use ztid_verifier::tpm::{TpmPolicy, TpmVerifier};
use ztid_verifier::{
    AttestationContext, AttestedNode, NodeVerifier, VerificationSession, VerifierStep,
};

/// The CA's context for an attempt whose CSR carries `key` (DER SubjectPublicKeyInfo).
pub fn ctx_at(key: &[u8], now: SystemTime) -> AttestationContext<'_> {
    AttestationContext {
        agent_public_key: key,
        now,
    }
}

pub fn ctx(key: &[u8]) -> AttestationContext<'_> {
    ctx_at(key, SystemTime::now())
}

/// What the agent sends first: it makes its key in the TPM, then the evidence. Returns
/// the evidence and the key's SubjectPublicKeyInfo (what its CSR would carry).
pub fn evidence(a: &mut TpmAttestor) -> (Vec<u8>, Vec<u8>) {
    let key = a.agent_key().expect("agent key").expect("a TPM key");
    let ev = a.initial_evidence().expect("initial evidence");
    (ev, key.spki().expect("spki"))
}

pub fn policy(ca: &LocalCa, extra: &str) -> TpmPolicy {
    let text = format!(
        "ek_ca_dir = {:?}\n{extra}",
        ca.trust_dir().display().to_string()
    );
    let table: toml::Table = toml::from_str(&text).expect("policy toml");
    TpmPolicy::from_table(&table, None).expect("policy")
}

pub fn challenge(step: VerifierStep) -> (Vec<u8>, Box<dyn VerificationSession>) {
    match step {
        VerifierStep::Challenge(c, s) => (c, s),
        VerifierStep::Attested(_) => panic!("expected a challenge"),
    }
}

pub fn attested(step: Result<VerifierStep, Error>) -> AttestedNode {
    match step.expect("attestation passes") {
        VerifierStep::Attested(n) => n,
        VerifierStep::Challenge(..) => panic!("expected a result"),
    }
}

/// The reason of a refusal of `kind`; panics on success, on any other error or on a
/// refusal of another kind.
pub fn refusal<T>(kind: RefusalKind, r: Result<T, Error>) -> String {
    match r {
        Err(Error::Refused(reason)) => {
            assert_eq!(reason.kind, kind, "refusal kind of {:?}", reason.detail);
            reason.detail
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got success"),
    }
}

/// Runs the whole exchange; returns the node and the messages.
pub fn attest(
    v: &TpmVerifier,
    a: &mut TpmAttestor,
) -> (AttestedNode, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let (ev, k) = evidence(a);
    let (c, session) = challenge(v.start(&ev, &ctx(&k)).expect("start"));
    let ans = a.answer(&c, &k).expect("answer");
    let node = attested(session.resume(&ans, &ctx(&k)));
    (node, ev, c, ans, k)
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub ca: LocalCa,
    pub tpm: Swtpm,
}

impl Fixture {
    /// A second TPM, under the same CA (`same_ca`) or a CA of its own.
    pub fn second_tpm(&self, same_ca: bool) -> (Swtpm, LocalCa) {
        let ca = if same_ca {
            LocalCa::new(self.dir.path(), "ca")
        } else {
            LocalCa::new(self.dir.path(), "other-ca")
        };
        let tpm = Swtpm::provision(&ca, &self.dir.path().join("tpm2"));
        (tpm, ca)
    }
}

pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::new(dir.path(), "ca");
    let tpm = Swtpm::provision(&ca, &dir.path().join("tpm1"));
    Fixture { dir, ca, tpm }
}

/// The blob of the agent key `a` made last.
pub fn a_key_blob(a: &mut TpmAttestor) -> ztid_hsm::TpmKeyBlob {
    match a.agent_key().unwrap().unwrap() {
        ztid_attestor::agent_key::AgentKey::Tpm(k) => k.blob().clone(),
        other => panic!("{other:?}"),
    }
}
