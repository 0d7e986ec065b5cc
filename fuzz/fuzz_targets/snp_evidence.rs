//! SEV-SNP evidence through the CA's verifier (`ztid_verifier::sev_snp::SnpVerifier::
//! verify_evidence`): the framing (`ztid_attestation::sev_snp::split_evidence`: SVSM
//! manifest, report, certificate table), the certificate table, the report parser (the
//! `sev` crate plus ztid's TCB decoding), the AMD chain, the report signature and the
//! policy checks. The expected report_data is taken from the report itself, so inputs
//! that keep a real signature reach the checks after it.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use ztid_verifier::sev_snp::{split_evidence, SnpVerifier};

/// 2026-06-01: inside the validity of the vectors' Milan, Genoa and Turin VCEKs.
const NOW: u64 = 1_780_272_000;

fn verifier() -> &'static SnpVerifier {
    static V: OnceLock<SnpVerifier> = OnceLock::new();
    V.get_or_init(|| SnpVerifier::from_config(&toml::Table::new()).expect("the default policy"))
}

fuzz_target!(|data: &[u8]| {
    let mut expected = [0u8; 64];
    if let Ok(e) = split_evidence(data) {
        assert!(e.report.len() == ztid_verifier::sev_snp::REPORT_LEN);
        expected.copy_from_slice(&e.report[0x50..0x90]);
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
    let _ = verifier().verify_evidence(data, &expected, now);
});
