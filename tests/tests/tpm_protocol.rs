//! TPM attestation at the library level against real swtpm instances: the agent half
//! (`TpmAttestor`, tss-esapi) talking to the CA half (`TpmVerifier`, pure software), the
//! negative cases each asserting its refusal reason, and cross-checks with tpm2-tools.
#![forbid(unsafe_code)]

#[path = "../tpm/swtpm.rs"]
mod swtpm;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

use swtpm::{LocalCa, Swtpm};
use ztid_agent_attestor::node_attestation::tpm::{
    self, credential, device::Tpm, quote, wire, Answer, Challenge, InitialEvidence, TpmAttestor,
    TpmPolicy, TpmVerifier,
};
use ztid_agent_attestor::node_attestation::{
    AttestationContext, AttestedNode, NodeAttestor, NodeVerifier, VerificationSession, VerifierStep,
};
use ztid_agent_attestor::Error;

fn ctx_at(now: SystemTime) -> AttestationContext<'static> {
    AttestationContext {
        agent_public_key: &[],
        now,
    }
}

fn ctx() -> AttestationContext<'static> {
    ctx_at(SystemTime::now())
}

fn policy(ca: &LocalCa, extra: &str) -> TpmPolicy {
    let text = format!(
        "ek_ca_dir = {:?}\n{extra}",
        ca.trust_dir().display().to_string()
    );
    let table: toml::Table = toml::from_str(&text).expect("policy toml");
    TpmPolicy::from_table(&table, None).expect("policy")
}

fn challenge(step: VerifierStep) -> (Vec<u8>, Box<dyn VerificationSession>) {
    match step {
        VerifierStep::Challenge(c, s) => (c, s),
        VerifierStep::Attested(_) => panic!("expected a challenge"),
    }
}

fn attested(step: Result<VerifierStep, Error>) -> AttestedNode {
    match step.expect("attestation passes") {
        VerifierStep::Attested(n) => n,
        VerifierStep::Challenge(..) => panic!("expected a result"),
    }
}

fn refusal<T>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::Refused(reason)) => reason,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got success"),
    }
}

/// Runs the whole exchange; returns the node and the messages.
fn attest(v: &TpmVerifier, a: &mut TpmAttestor) -> (AttestedNode, Vec<u8>, Vec<u8>, Vec<u8>) {
    let ev = a.initial_evidence().expect("initial evidence");
    let (c, session) = challenge(v.start(&ev, &ctx()).expect("start"));
    let ans = a.answer(&c).expect("answer");
    let node = attested(session.resume(&ans, &ctx()));
    (node, ev, c, ans)
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}

struct Fixture {
    dir: tempfile::TempDir,
    ca: LocalCa,
    tpm: Swtpm,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::new(dir.path(), "ca");
    let tpm = Swtpm::provision(&ca, &dir.path().join("tpm1"));
    Fixture { dir, ca, tpm }
}

#[test]
fn tpm_enrolment_round_trip_and_identity() {
    let f = fixture();
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let t = std::time::Instant::now();
    let (node, ev, _, _) = attest(&v, &mut a);
    eprintln!("enrolment (agent+CA, swtpm): {:?}", t.elapsed());

    // node id = SHA-256 of the EK certificate's SubjectPublicKeyInfo, as openssl sees it.
    let ev: InitialEvidence = serde_json::from_slice(&ev).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&ev.ek_cert).unwrap();
    assert_eq!(node.node_id, sha256_hex(cert.public_key().raw));
    assert_eq!(node.node_id.len(), 64);
    assert_eq!(node.method, "tpm");
    let sels: Vec<String> = node.selectors.iter().map(|s| s.to_string()).collect();
    assert!(
        sels.contains(&format!("tpm:ek-hash:{}", node.node_id)),
        "{sels:?}"
    );
    assert!(
        sels.contains(&"tpm:manufacturer:id:00001014".to_string()),
        "{sels:?}"
    );
    assert!(
        sels.contains(&"tpm:ek-issuer:CN=swtpm-localca".to_string()),
        "{sels:?}"
    );
    let zero = "0".repeat(64);
    for i in 0..8 {
        assert!(sels.contains(&format!("tpm:pcr:{i}:{zero}")), "{sels:?}");
    }
    // Nothing left loaded in the TPM (no resource manager on swtpm's TCTI).
    assert_eq!(
        f.tpm.leftovers(),
        "",
        "transient objects or sessions leaked"
    );
}
