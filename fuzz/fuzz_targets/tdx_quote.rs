//! TDX quotes: the framing (`ztid_attestation::tdx::check_header`, `declared_len`), the
//! quote parser the verifier hands accepted quotes to (`dcap_qvl::quote::Quote::parse`),
//! and, when the shared vectors are present, the whole CA-side check
//! (`ztid_verifier::tdx::TdxVerifier::verify_evidence`) against the real collateral of
//! `tdx/v4-uptodate` (`$ZTID_VECTORS`, default `../shared/vectors` from the repository),
//! at a time inside that collateral's validity, expecting the quote's own report_data.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use ztid_attestation::tdx::{check_header, declared_len, MAX_QUOTE};
use ztid_verifier::tdx::TdxVerifier;

/// 2025-07-01: inside the v4-uptodate collateral's validity.
const NOW: u64 = 1_751_328_000;
/// Offset of report_data in a version 4 quote (48-byte header, then the TD report).
const V4_REPORT_DATA: usize = 48 + 520;

fn verifier() -> Option<&'static TdxVerifier> {
    static V: OnceLock<Option<TdxVerifier>> = OnceLock::new();
    V.get_or_init(|| {
        let vectors = std::env::var_os("ZTID_VECTORS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors")
            });
        let dir = vectors.join("tdx/v4-uptodate");
        if !dir.join("collateral.json").is_file() {
            eprintln!(
                "tdx_quote: no collateral at {}; header and parser only",
                dir.display()
            );
            return None;
        }
        let mut config = toml::Table::new();
        config.insert("collateral_dir".into(), dir.display().to_string().into());
        Some(TdxVerifier::from_config(&config).expect("a TDX config with a collateral directory"))
    })
    .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let header_ok = check_header(data).is_ok();
    if data.len() >= 2 {
        let version = u16::from_le_bytes([data[0], data[1]]);
        let _ = declared_len(data, version);
    }
    if !header_ok {
        return;
    }
    assert!((48..=MAX_QUOTE).contains(&data.len()));
    let _ = dcap_qvl::quote::Quote::parse(data);
    if let Some(v) = verifier() {
        let mut expected = [0u8; 64];
        if let Some(rd) = data.get(V4_REPORT_DATA..V4_REPORT_DATA + 64) {
            expected.copy_from_slice(rd);
        }
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
        let _ = v.verify_evidence(data, &expected, now);
    }
});
