//! SEV-SNP and TDX verification throughput on the real vectors, as the CA runs it for
//! one attestation answer (`verify_evidence`: the SNP report with its certificate table;
//! the TDX quote with the collateral read from its directory), on one thread.
//!
//! `cargo run --release -p ztid-bench --bin ztid-tee-bench [-- --secs S]`
//! (`--secs` or `ZTID_BENCH_SECONDS` per case, default 3). The vectors come from
//! `../shared/vectors` (or `ZTID_VECTORS`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use ztid_tests::at;
use ztid_verifier::{sev_snp, tdx};

/// SEV-SNP and TDX verification throughput on the real vectors (one thread), as a
/// markdown table.
#[derive(Parser, Debug)]
#[command(name = "ztid-tee-bench")]
struct Cli {
    /// Seconds of the timed loop per case.
    #[arg(
        long,
        value_name = "S",
        env = "ZTID_BENCH_SECONDS",
        default_value_t = 3.0
    )]
    secs: f64,
}

/// Times the first call (cold: for SEV-SNP the VEK's RSA signature is checked; later
/// calls find the pair in the verified-signature cache) and then a loop of `secs`.
fn rate(name: &str, secs: f64, mut f: impl FnMut()) {
    let t = Instant::now();
    f();
    let cold = t.elapsed().as_secs_f64() * 1000.0;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f();
        n += 1;
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "| {name} | {cold:.2} | {n} | {:.0} | {:.2} |",
        n as f64 / el,
        el * 1000.0 / n as f64
    );
}

fn main() {
    let secs = Cli::parse().secs;
    ztid_tests::vectors("tdx");
    let v: PathBuf = ztid_tests::vectors("snp").join("..");
    // Load and check the pinned AMD roots once, outside the timings.
    let chain_only =
        std::fs::read(v.join("snp/turin-virtee-sev-chain-only/vcek_turin.der")).unwrap();
    sev_snp::verify_vek_chain(&chain_only, None, at("2026-01-01T00:00:00Z")).unwrap();
    println!("| evidence | first (ms) | verifications | per second | ms each |");
    println!("|---|---|---|---|---|");

    let snp = |dir: &str, report: &[u8], vek: &[u8], when: &str, cfg: &str| {
        let vek = if vek.starts_with(b"-----") {
            pem::parse(vek).unwrap().into_contents()
        } else {
            vek.to_vec()
        };
        let kind = if dir.contains("vlek") { "vlek" } else { "vcek" };
        let mut ev = report.to_vec();
        ev.extend(sev_snp::encode_cert_table(&[(kind, &vek)]));
        let rd: [u8; 64] = report[0x50..0x90].try_into().unwrap();
        let verifier = sev_snp::SnpVerifier::from_config(&toml::from_str(cfg).unwrap()).unwrap();
        let now = at(when);
        rate(&format!("SEV-SNP {dir}"), secs, || {
            verifier.verify_evidence(&ev, &rd, now).unwrap();
        });
    };
    let read = |p: &str| std::fs::read(v.join(p)).unwrap();
    let milan = hex::decode(
        String::from_utf8(read("snp/milan-virtee-sev/report_milan.hex"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    snp(
        "milan-virtee-sev (v2, VCEK)",
        &milan,
        &read("snp/milan-virtee-sev/vcek_milan.der"),
        "2025-06-01T00:00:00Z",
        "",
    );
    snp(
        "milan-trustee-vlek (v3, VLEK)",
        &read("snp/milan-trustee-vlek/report.bin"),
        &read("snp/milan-trustee-vlek/vlek.der"),
        "2025-06-01T00:00:00Z",
        "allowed_vmpl = [1]",
    );
    snp(
        "genoa-trustee-azure (v3, VCEK)",
        &read("snp/genoa-trustee-azure/report.bin"),
        &read("snp/genoa-trustee-azure/vcek.pem"),
        "2026-01-01T00:00:00Z",
        "",
    );
    snp(
        "turin-microsoft (v5, VCEK)",
        &read("snp/turin-microsoft/report.bin"),
        &read("snp/turin-microsoft/vcek.pem"),
        "2026-06-01T00:00:00Z",
        "",
    );

    for (dir, when) in [
        ("v4-uptodate", "2025-07-01T00:00:00Z"),
        ("v5-td15ex-uptodate", "2026-10-20T00:00:00Z"),
    ] {
        let q = read(&format!("tdx/{dir}/quote.bin"));
        let parsed = dcap_report_data(&q);
        let cfg: toml::Table = toml::from_str(&format!(
            "collateral_dir = {:?}",
            v.join("tdx").join(dir).display().to_string()
        ))
        .unwrap();
        let verifier = tdx::TdxVerifier::from_config(&cfg).unwrap();
        let now = at(when);
        rate(&format!("TDX {dir}"), secs, || {
            verifier.verify_evidence(&q, &parsed, now).unwrap();
        });
    }
}

/// report_data of a TD quote: the last 64 bytes of the TD report body.
fn dcap_report_data(q: &[u8]) -> [u8; 64] {
    // v4: the body follows the 48-byte header; v5: after a 2-byte type and 4-byte size.
    // Every TD body starts with the TD 1.0 layout, whose report_data is at 520..584.
    let body = if u16::from_le_bytes([q[0], q[1]]) == 4 {
        48
    } else {
        54
    };
    q[body + 520..body + 584].try_into().unwrap()
}
