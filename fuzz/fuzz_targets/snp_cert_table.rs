//! The SEV-SNP certificate table (GHCB layout: GUID, offset, length entries, then the
//! blobs) and the AMD certificates and CRLs in it: the input follows an all-zero report
//! in `SnpVerifier::verify_evidence`, which parses the table (and every VCEK, VLEK, ASK,
//! ARK and CRL entry, with AMD's extensions) before looking at the report. The same bytes
//! are also checked as a VCEK/VLEK certificate alone (`verify_vek_chain`).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use ztid_verifier::sev_snp::{verify_vek_chain, SnpVerifier, REPORT_LEN};

const NOW: u64 = 1_780_272_000;

fn verifier() -> &'static SnpVerifier {
    static V: OnceLock<SnpVerifier> = OnceLock::new();
    V.get_or_init(|| SnpVerifier::from_config(&toml::Table::new()).expect("the default policy"))
}

fuzz_target!(|data: &[u8]| {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
    let mut evidence = vec![0u8; REPORT_LEN];
    evidence.extend_from_slice(data);
    let _ = verifier().verify_evidence(&evidence, &[0u8; 64], now);
    let _ = verify_vek_chain(data, None, now);
});
