//! The JSON messages of node attestation: the multi-factor envelope
//! (`ztid_attestation::multi::parse`, which must re-encode to an envelope that parses),
//! and the `tpm` messages (`InitialEvidence`, `Challenge`, `Answer` through
//! `ztid_attestation::tpm::parse_json`, and the offline evidence file through
//! `ztid_verifier::tpm::verify_offline`), with the TPM structures they carry; also the
//! configfs-tsm challenge the agent receives (`tsm::report_data_for_challenge`). Each
//! part of an envelope is fed to the same parsers.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use ztid_attestation::tpm::wire::{Attest, Public, Signature};
use ztid_attestation::tpm::{parse_json, Answer, Challenge, InitialEvidence};
use ztid_attestation::{multi, tsm};

fn tpm_config() -> &'static toml::Table {
    static C: OnceLock<toml::Table> = OnceLock::new();
    // No EK CA directory: EKs without a certificate are allowed (SVSM-bound), so the
    // policy needs no files; EK certificates are still parsed and checked.
    C.get_or_init(|| toml::from_str("uncertified_ek = \"svsm-bound\"").expect("constant config"))
}

fn messages(data: &[u8]) {
    if let Ok(m) = parse_json::<InitialEvidence>(data, "initial evidence") {
        for b in [&m.ek_pub, &m.ak_pub, &m.agent_key_pub] {
            let _ = Public::parse(b);
        }
    }
    let _ = parse_json::<Challenge>(data, "challenge");
    if let Ok(a) = parse_json::<Answer>(data, "answer") {
        let _ = Attest::parse(&a.quote);
        let _ = Attest::parse(&a.certify);
        let _ = Signature::parse(&a.signature);
        let _ = Signature::parse(&a.certify_signature);
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_272_000);
    let _ = ztid_verifier::tpm::verify_offline(data, None, None, now, tpm_config());
    // The key the challenge names as the agent's own, so the accepting path is reached too.
    let _ = tsm::report_data_for_challenge(data, data.get(tsm::NONCE_LEN..).unwrap_or_default());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = multi::parse(data, "message") {
        for p in &env.parts {
            messages(&p.data);
        }
        let bytes = multi::encode(&env).expect("an envelope encodes");
        let again = multi::parse(&bytes, "message").expect("an encoded envelope parses");
        assert_eq!(again.parts.len(), env.parts.len());
        for (a, b) in again.parts.iter().zip(&env.parts) {
            assert_eq!((&a.method, &a.data), (&b.method, &b.data));
        }
    }
    messages(data);
});
