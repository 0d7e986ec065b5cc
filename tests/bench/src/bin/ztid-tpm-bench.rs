//! TPM attestation benchmark (results in `docs/performance.md`): enrolment wall time on
//! swtpm, CA-side verification cost per attestation, ECC vs RSA MakeCredential, and the
//! latency of one signature by the TPM-resident agent key.
//!
//! `cargo run --release -p ztid-bench --bin ztid-tpm-bench`
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::time::SystemTime;

use clap::Parser;
use ztid_attestor::tpm::{self, EkKind, TpmAttestor};
use ztid_attestor::tpm_device::Tpm;
// The TPM exchange and swtpm fixture, shared with tests/tests/e2e/tpm_protocol.rs.
use ztid_test_support::tpm_attest::*;
use ztid_verifier::tpm::{credential, quote, wire, InitialEvidence, TpmVerifier};
use ztid_verifier::NodeVerifier;

/// TPM attestation costs on swtpm: enrolment wall time, CA-side verification per
/// attestation, MakeCredential for RSA and ECC EKs, one TPM-resident agent key signature.
#[derive(Parser, Debug)]
#[command(name = "ztid-tpm-bench")]
struct Cli {}

fn main() {
    let Cli {} = Cli::parse();
    let f = fixture();
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let pol = policy(&f.ca, "");
    // Enrolment wall time: agent (TPM work) + CA, in-process, over swtpm's TCP socket.
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..10 {
        let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
        let t = std::time::Instant::now();
        last = Some(attest(&v, &mut a));
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "enrolment on swtpm (EK cert read, EK+AK create, CA start, activation, quote, CA resume): min {:?} median {:?} max {:?}",
        times[0], times[5], times[9]
    );
    let (_, ev, _, _, k) = last.unwrap();
    let ev_parsed: InitialEvidence = serde_json::from_slice(&ev).unwrap();

    // CA side only, one core.
    let n = 2000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        ztid_verifier::tpm::check_keys(
            &pol,
            &ev_parsed.ek_cert,
            &ev_parsed.ek_pub,
            &ev_parsed.ak_pub,
            SystemTime::now(),
        )
        .unwrap();
    }
    let keys_s = t.elapsed().as_secs_f64() / n as f64;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let _ = challenge(v.start(&ev, &ctx(&k)).unwrap());
    }
    let start_s = t.elapsed().as_secs_f64() / n as f64;
    // A quote to verify repeatedly.
    let nonce = [9u8; 32];
    let pcrs: BTreeSet<u8> = (0..8).collect();
    let file: tpm::EvidenceFile =
        serde_json::from_slice(&tpm::capture_evidence(&f.tpm.tcti(), &nonce).unwrap()).unwrap();
    let ak = wire::Public::parse(&file.ak_pub).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        quote::verify_quote(&ak, &file.quote, &file.signature, &nonce, &pcrs, &file.pcrs).unwrap();
        pol.check_pcrs("x", &file.pcrs).unwrap();
    }
    let quote_s = t.elapsed().as_secs_f64() / n as f64;
    let ek = wire::Public::parse(&ev_parsed.ek_pub).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        credential::make_credential(&ek, &ak.name().unwrap(), &[1u8; 32]).unwrap();
    }
    let cred_s = t.elapsed().as_secs_f64() / n as f64;
    // The same for the TPM's ECC P-384 EK (ephemeral ECDH + KDFe instead of RSA-OAEP).
    let ecc_ek = wire::Public::parse(
        &Tpm::open_with_ek(&f.tpm.tcti(), EkKind::Ecc)
            .unwrap()
            .ek_public()
            .unwrap(),
    )
    .unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        credential::make_credential(&ecc_ek, &ak.name().unwrap(), &[1u8; 32]).unwrap();
    }
    let ecc_cred_s = t.elapsed().as_secs_f64() / n as f64;
    // The agent key's certification, checked as the CA does.
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let blob = a_key_blob(&mut a);
    let ak_blob = Tpm::open(&f.tpm.tcti()).unwrap().create_ak().unwrap();
    let (cert, cert_sig) = Tpm::open(&f.tpm.tcti())
        .unwrap()
        .certify_with(&ak_blob, &blob, &nonce)
        .unwrap();
    let cert_ak = wire::Public::parse(&ak_blob.public_bytes().unwrap()).unwrap();
    let key_name = wire::Public::parse(&blob.public_area().unwrap())
        .unwrap()
        .name()
        .unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        ztid_verifier::tpm::verify_certification(&cert_ak, &cert, &cert_sig, &nonce, &key_name)
            .unwrap();
    }
    let certify_s = t.elapsed().as_secs_f64() / n as f64;
    eprintln!(
        "CA side per attestation: EK cert + key checks {:.3} ms, start (checks + agent key + MakeCredential + challenge) {:.3} ms, \
         MakeCredential alone {:.3} ms, quote verify + PCR policy {:.3} ms, agent key certification {:.3} ms",
        keys_s * 1e3,
        start_s * 1e3,
        cred_s * 1e3,
        quote_s * 1e3,
        certify_s * 1e3
    );
    eprintln!(
        "=> full CA-side verifications per second (one core): {:.0}",
        1.0 / (start_s + quote_s + certify_s)
    );
    eprintln!(
        "MakeCredential for the ECC P-384 EK: {:.3} ms (RSA-2048: {:.3} ms)",
        ecc_cred_s * 1e3,
        cred_s * 1e3
    );
    // Agent side: one signature by the TPM-resident agent key (what each mTLS handshake
    // to the server costs), on swtpm over TCP.
    let key = ztid_attestor::agent_key::TpmAgentKey::new(&f.tpm.tcti(), blob).unwrap();
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = std::time::Instant::now();
        key.sign(b"a TLS 1.3 CertificateVerify message").unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "TPM agent key signature on swtpm (open, SRK, load, sign, flush): min {:?} median {:?} p95 {:?}",
        times[0], times[25], times[47]
    );
}
