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
    /// `prepare`, or a scenario: mint, tpm-quote, tpm-evidence, snp-warm, snp-cold, tdx,
    /// workload-fetch.
    scenario: String,
    /// Operations to run after the setup.
    #[arg(default_value_t = 0)]
    n: u64,
    /// `workload-fetch` only: rounds of N fetches counted in the one agent process.
    #[arg(default_value_t = 3)]
    repeat: u64,
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
        "workload-fetch" => workload_fetch(cli.n, cli.repeat),
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

/// The functions whose calls callgrind counts in the `workload-fetch` scenario
/// (`--collect-atstart=no --toggle-collect=GLOB`: collection is on while one of them runs,
/// in the thread that runs it; none of them calls another, which would toggle it off).
/// Two are hyper's and tokio's, which a refactor of the agent does not rename; the third
/// is the agent's connection task, into which hyper's connection future is inlined (the
/// scenario fails if any of them counts nothing).
const FETCH_TOGGLES: [&str; 3] = [
    // One HTTP/2 request: the tower layers' futures (metrics), tonic's routing, the
    // Workload API handler (`SpiffeWorkloadApi::fetch_x509svid`: caller, entitlement,
    // instance, reconcile), the first response message built and encoded, handed to h2.
    "<hyper::proto::h2::server::H2Stream<F,B,Ex> as core::future::future::Future>::poll",
    // The connection: h2 frames read and written on the socket, HPACK, the `:authority`
    // check, the service's `call` for each new stream, the accept-time binding awaited.
    "ztid_agent::workload_listener::serve_connection::{{closure}}",
    // Work the agent moves off its async workers (`spawn_blocking`): the peer's
    // attestation at accept and its re-check on each request (/proc reads).
    "<tokio::runtime::blocking::task::BlockingTask<T> as core::future::future::Future>::poll",
];

/// Pause after each counted fetch (see `workload_fetch`).
const SETTLE_MS: u64 = 30;

/// One Workload API `FetchX509SVID` answered by the real release `ztid-agent`, run under
/// callgrind beside a real `ztid-server` (the agent started as the e2e harness starts it,
/// with `valgrind` in front). Collection is on only inside [`FETCH_TOGGLES`], so the
/// agent's background work (sync with the server every second, timers) is not counted.
/// After a warm-up (the identity minted and held), each of `repeat` rounds counts `n`
/// fetches on one held connection (`held`), then `n` fetches each on a new connection
/// (`new`: accept, attestation, HTTP/2 handshake, fetch), between `callgrind_control -z`
/// and `-d`; prints `held FILE` / `new FILE` for each dump. The client is the `spiffe`
/// crate in this process (not counted).
fn workload_fetch(n: u64, repeat: u64) {
    use std::process::Command;
    use std::time::{Duration, Instant};
    use ztid_tests::{agent_cli, bin, other_uid, wait_for, Agent, Proc, Server};

    let out = work_dir().join("fetch");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(&out).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let server = Server::start("example.org");
    let token = server.token();
    let bundle = server.bundle_file();
    let dir = other_uid::scratch_dir();
    let socket = dir.path().join("api.sock");
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind").arg(format!(
        "--callgrind-out-file={}",
        out.join("agent.callgrind").display()
    ));
    // ZTID_ICOUNT_FETCH_WHOLE=1: the whole agent process between zero and dump (its
    // background work too), the cross-check that the toggles miss no per-fetch work.
    if std::env::var_os("ZTID_ICOUNT_FETCH_WHOLE").is_none() {
        cmd.arg("--collect-atstart=no");
        for t in FETCH_TOGGLES {
            cmd.arg(format!("--toggle-collect={t}"));
        }
    }
    // The arguments of tests/src/lib.rs's Agent::start_in (which cannot put valgrind in
    // front, nor wait the minutes an agent takes to start under it).
    cmd.arg(bin("ztid-agent"))
        .arg("run")
        .arg("--server")
        .arg(server.addr())
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--trust-domain")
        .arg(&server.trust_domain)
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--sync-interval")
        .arg("1")
        .arg("--join-token")
        .arg(&token)
        .env("TSS2_LOG", "all+none")
        .stdin(std::process::Stdio::null());
    let log = dir.path().join("agent.log");
    let f = std::fs::File::create(&log).unwrap();
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    let mut proc = Proc {
        child: cmd.spawn().unwrap(),
        log,
    };
    let pid = proc.child.id().to_string();
    let sock = socket.display().to_string();
    wait_for(
        "ztid-agent under valgrind to answer healthcheck",
        Duration::from_secs(600),
        || {
            if let Some(st) = proc.exited() {
                panic!("ztid-agent exited ({st}):\n{}", proc.log_text());
            }
            (socket.exists() && agent_cli(&["healthcheck", "--socket", &sock]).ok).then_some(())
        },
    );
    let pem = std::fs::read_to_string(dir.path().join("data/agent_svid.pem")).unwrap();
    let spiffe_id = ztid_tests::spiffe_id_of(&pem::parse(pem).unwrap().into_contents());
    let agent = Agent {
        proc,
        dir,
        spiffe_id,
    };
    ztid_tests::entry_for_my_uid(&server, &agent, "spiffe://example.org/icount", &[]);

    let control = |what: &str| {
        let o = Command::new("callgrind_control")
            .arg(what)
            .arg(&pid)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "callgrind_control {what} {pid}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    // Each dump is a new file agent.callgrind.<k>: the newest after `-d` is this round's.
    let dumped = |what: &str| {
        let before: BTreeSet<PathBuf> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        control("-d");
        let f = wait_for("the callgrind dump", Duration::from_secs(120), || {
            std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| !before.contains(p))
        });
        // The file is complete once its totals line is written.
        wait_for(
            "the callgrind dump's totals",
            Duration::from_secs(120),
            || {
                std::fs::read_to_string(&f)
                    .ok()
                    .filter(|t| t.lines().any(|l| l.starts_with("totals:")))
            },
        );
        println!("{what} {}", f.display());
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = agent.endpoint();
    rt.block_on(async {
        let held = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .unwrap();
        let start = Instant::now();
        // The entry reaches the agent at its next sync; then the identity is minted.
        while let Err(e) = held.fetch_x509_svid().await {
            assert!(start.elapsed() < Duration::from_secs(300), "no SVID: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let fresh = || async {
            let c = spiffe::WorkloadApiClient::connect_to(&endpoint)
                .await
                .unwrap();
            c.fetch_x509_svid().await.unwrap();
        };
        // Warm-up: the agent's lazily built state, allocator pools, both paths.
        for _ in 0..5 {
            held.fetch_x509_svid().await.unwrap();
            fresh().await;
        }
        // A pause after each fetch lets the agent finish with it (the client's RST_STREAM
        // read, the stream task ended) before the next one arrives: without it, whether
        // those frames are read together with the next request's or apart follows timing,
        // and the held count took one of two values 6 % apart.
        let settle = || tokio::time::sleep(Duration::from_millis(SETTLE_MS));
        for _ in 0..repeat {
            control("-z");
            for _ in 0..n {
                held.fetch_x509_svid().await.unwrap();
                settle().await;
            }
            dumped("held");
            control("-z");
            for _ in 0..n {
                fresh().await;
                settle().await;
            }
            dumped("new");
        }
    });
    let mut agent = agent;
    agent.proc.stop();
    drop(server);
}
