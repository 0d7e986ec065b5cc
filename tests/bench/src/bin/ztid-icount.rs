//! Instruction-count scenarios for the hot paths, run under callgrind by
//! `scripts/icount.sh` (results in `docs/performance.md`, "Instruction counts (callgrind)").
//!
//! `ztid-icount SCENARIO N` sets the scenario up, then runs its operation N times. The
//! script runs each scenario twice, with N and N + K, in separate processes, and reports
//! (count(N + K) − count(N)) / K instructions per operation, so that the setup (and the
//! process start) cancels out, as rustls's `ci-bench` does.
//!
//! `ztid-icount prepare` (not under valgrind) makes the TPM evidence with swtpm once and
//! keeps it in `target/icount/tpm/`; the SEV-SNP and TDX scenarios read the real vectors
//! (`../shared/vectors` or `ZTID_VECTORS`).
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use clap::Parser;
use ztid_tests::at;
use ztid_verifier::tpm::{quote, wire, EvidenceFile};
use ztid_verifier::{sev_snp, tdx};

/// One hot path, N times (for callgrind; see `scripts/icount.sh`).
#[derive(Parser, Debug)]
#[command(name = "ztid-icount")]
struct Cli {
    /// `prepare`, or a scenario: mint, tpm-quote, tpm-evidence, snp-warm, snp-cold, tdx.
    scenario: String,
    /// Operations to run after the setup.
    #[arg(default_value_t = 0)]
    n: u64,
}

fn main() {
    let cli = Cli::parse();
    match cli.scenario.as_str() {
        "prepare" => prepare(),
        "mint" => mint(cli.n),
        "tpm-quote" => tpm_quote(cli.n),
        "tpm-evidence" => tpm_evidence(cli.n),
        "snp-warm" => snp(cli.n, true),
        "snp-cold" => snp(cli.n, false),
        "tdx" => tdx_quote(cli.n),
        other => {
            eprintln!("unknown scenario {other:?}");
            std::process::exit(2);
        }
    }
}

fn work_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("icount")
}

/// swtpm evidence (EK certificate, EK, AK, quote over 32 bytes of 9 of sha256 PCRs 0-7)
/// and the EK CA's trust directory, kept for the TPM scenarios.
fn prepare() {
    let dir = work_dir().join("tpm");
    let ek_ca = dir.join("ek-ca");
    std::fs::create_dir_all(&ek_ca).unwrap();
    let f = ztid_test_support::tpm_attest::fixture();
    let ev = ztid_attestor::tpm::capture_evidence(&f.tpm.tcti(), &[9u8; 32]).unwrap();
    std::fs::write(dir.join("evidence.json"), ev).unwrap();
    for e in std::fs::read_dir(f.ca.trust_dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ek_ca.join(e.file_name())).unwrap();
    }
    eprintln!("TPM evidence in {}", dir.display());
}

fn tpm_file() -> (Vec<u8>, EvidenceFile) {
    let p = work_dir().join("tpm/evidence.json");
    let raw = std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (run `ztid-icount prepare` first)", p.display()));
    let file = serde_json::from_slice(&raw).unwrap();
    (raw, file)
}

/// The quote check the CA makes per attestation, and that the TPM bench compares with
/// Keylime's `checkquote`: the AK parsed from its TPMT_PUBLIC, then the signature, the
/// nonce, the PCR selection and the PCR digest.
fn tpm_quote(n: u64) {
    let (_, f) = tpm_file();
    let nonce = hex::decode(&f.nonce).unwrap();
    let pcrs: BTreeSet<u8> = f.pcrs.keys().copied().collect();
    for _ in 0..n {
        let ak = wire::Public::parse(&f.ak_pub).unwrap();
        quote::verify_quote(&ak, &f.quote, &f.signature, &nonce, &pcrs, &f.pcrs).unwrap();
    }
}

/// The whole offline check of a TPM evidence file (`ztid-server evidence verify`): the EK
/// CA directory read, the EK certificate chain, EK and AK checks, the quote.
fn tpm_evidence(n: u64) {
    let (raw, _) = tpm_file();
    let ek_ca = work_dir().join("tpm/ek-ca");
    let cfg = toml::Table::new();
    let now = SystemTime::now();
    for _ in 0..n {
        ztid_verifier::tpm::verify_offline(&raw, Some(&ek_ca), None, now, &cfg).unwrap();
    }
}

/// SEV-SNP Milan v2 with its VCEK in the certificate table, as the CA gets it. The
/// verified-signature and parsed-certificate caches are process-wide, so "cold" is the
/// first verification in the process (`snp-cold 0` against `snp-cold 1`: the VCEK's
/// RSA-4096 signature checked, the pinned AMD roots loaded and checked once), and "warm"
/// every verification after one unmeasured first one.
fn snp(n: u64, warm: bool) {
    let v = ztid_tests::vectors("snp");
    let report = hex::decode(
        String::from_utf8(std::fs::read(v.join("milan-virtee-sev/report_milan.hex")).unwrap())
            .unwrap()
            .trim(),
    )
    .unwrap();
    let vek = std::fs::read(v.join("milan-virtee-sev/vcek_milan.der")).unwrap();
    let mut ev = report.clone();
    ev.extend(sev_snp::encode_cert_table(&[("vcek", &vek)]));
    let rd: [u8; 64] = report[0x50..0x90].try_into().unwrap();
    let now = at("2025-06-01T00:00:00Z");
    let cfg = toml::Table::new();
    let verifier = sev_snp::SnpVerifier::from_config(&cfg).unwrap();
    if warm {
        verifier.verify_evidence(&ev, &rd, now).unwrap();
    }
    for _ in 0..n {
        verifier.verify_evidence(&ev, &rd, now).unwrap();
    }
}

/// TDX v4 quote with the collateral read from its directory each time, as the CA does.
fn tdx_quote(n: u64) {
    let v = ztid_tests::vectors("tdx").join("v4-uptodate");
    let q = std::fs::read(v.join("quote.bin")).unwrap();
    // report_data: the last 64 bytes of the TD 1.0 body, after the 48-byte v4 header.
    let rd: [u8; 64] = q[48 + 520..48 + 584].try_into().unwrap();
    let cfg: toml::Table =
        toml::from_str(&format!("collateral_dir = {:?}", v.display().to_string())).unwrap();
    let verifier = tdx::TdxVerifier::from_config(&cfg).unwrap();
    let now = at("2025-07-01T00:00:00Z");
    for _ in 0..n {
        verifier.verify_evidence(&q, &rd, now).unwrap();
    }
}

/// One workload X509-SVID minted as the node API's `SignX509SVIDs` handler does it for a
/// batch of one CSR, minus the network and TLS: the agent authenticated from its leaf,
/// the entry and CSR checked, the leaf signed, the `x509_svid_issued` record written and
/// the audit barrier (its `fdatasync`) awaited. The CSR is made once, in the setup (the
/// agent makes it, not the CA).
fn mint(n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let core: Arc<ztid_ca::core::CaCore> =
            ztid_ca::core::CaCore::open(ztid_ca::config::ServerConfig {
                trust_domain: "example.org".into(),
                data_dir: dir.path().into(),
                ..Default::default()
            })
            .unwrap();
        let kp = rcgen::KeyPair::generate().unwrap();
        let agent_csr = rcgen::CertificateParams::default()
            .serialize_request(&kp)
            .unwrap()
            .der()
            .to_vec();
        let node = ztid_verifier::AttestedNode {
            method: "join_token",
            node_id: "n1".into(),
            selectors: vec![ztid_spiffe::Selector::parse("join-token:id:n1").unwrap()],
            aliases: vec![],
            evidence_digest: [7; 32],
        };
        let (record, leaf) = core.complete_attestation(&node, &agent_csr).unwrap();
        let leaf = leaf.chain.first().unwrap().clone();
        let entry = core
            .create_entry(&ztid_proto::node::Entry {
                spiffe_id: "spiffe://example.org/w".into(),
                parent_id: record.spiffe_id.clone(),
                selectors: vec![ztid_proto::node::Selector {
                    r#type: "unix".into(),
                    value: "uid:0".into(),
                }],
                ..Default::default()
            })
            .unwrap();
        let wkey = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(
                "spiffe://example.org/w/0123456789abcdef0123456789abcdef",
            )
            .unwrap(),
        )];
        let csr = params.serialize_request(&wkey).unwrap().der().to_vec();
        core.audit_barrier().await.unwrap();
        for _ in 0..n {
            let agent = core.authenticate_agent(Some(&leaf)).unwrap();
            core.sign_workload_svid(&agent, &entry.id, &csr).unwrap();
            core.audit_barrier().await.unwrap();
        }
    });
}
