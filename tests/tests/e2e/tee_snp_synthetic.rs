//! SEV-SNP with a test-only signer: an ARK → ASK → VCEK chain made here with openssl
//! (RSA-PSS-SHA384, salt 48, VCEK serial 0, AMD's TCB and hwID extensions) that only a
//! config naming it in `test_roots_dir` trusts, and reports signed with the VCEK key.
//!
//! It covers what real captured reports cannot: checks behind the signature (chip ID, TCB
//! against the VCEK, CPUID, debug policy, VMPL), AMD CRLs, the challenge protocol with
//! the agent side reading through a configfs-tsm tree, and the whole system: server,
//! agent with `--attestor sev-snp`, a workload's SVID, and a replayed report refused.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{
    self, BadSignature, CollateralUnavailable, Expired, KeyMismatch, Malformed, PolicyMismatch,
    Replay, Revoked, UntrustedChain,
};
use ztid_attestor::tsm::TsmClient;
use ztid_attestor::NodeAttestor;
use ztid_spiffe::Selector;
use ztid_tests::*;
use ztid_verifier::{sev_snp, AttestationContext, NodeVerifier, VerifierStep};

use snp_signer::{FakeTsm, TestChain, HOST_DATA, MEASUREMENT};
use ztid_test_support::snp_signer;

/// The reason of a refusal of `kind`.
fn refusal<T>(kind: RefusalKind, r: Result<T, Error>) -> String {
    match r {
        Err(Error::Refused(m)) => {
            assert_eq!(m.kind, kind, "refusal kind of {:?}", m.detail);
            m.detail
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got success"),
    }
}

fn spki() -> Vec<u8> {
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::PublicKeyData::subject_public_key_info(&k)
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn offline(
    chain: &TestChain,
    ev: &[u8],
    extra: &str,
    collateral: Option<&Path>,
) -> Result<Value, Error> {
    sev_snp::verify_offline(ev, collateral, None, now(), &chain.config(extra))
}

#[test]
fn synthetic_report_verifies_only_under_the_test_roots() {
    let c = TestChain::new();
    let ev = c.evidence(&[7; 64], |_| {});
    let claims = offline(&c, &ev, "", None).unwrap();
    assert_eq!(claims["trust_anchor"], "ARK-Milan (test root)");
    assert_eq!(claims["product"], "Milan");
    assert_eq!(claims["measurement"], hex::encode(MEASUREMENT));
    assert_eq!(claims["chip_id"], hex::encode(c.chip_id));
    assert_eq!(claims["crl_checked"], false);
    // Without test_roots_dir nothing trusts it.
    let m = refusal(
        UntrustedChain,
        sev_snp::verify_offline(&ev, None, None, now(), &toml::Table::new()),
    );
    assert_eq!(
        m,
        "no pinned AMD signing key named \"SEV-Milan\" (the ASK issuer); the VCEK does not chain to a pinned ARK"
    );
}

#[test]
fn checks_behind_the_signature_name_their_rule() {
    let c = TestChain::new();
    type Edit = Box<dyn Fn(&mut [u8])>;
    let cases: Vec<(Edit, RefusalKind, String)> = vec![
        (
            Box::new(|r: &mut [u8]| r[0x1A0] ^= 1),
            KeyMismatch,
            format!(
                "report chip_id {}{} does not match the VCEK hwID {}",
                hex::encode([c.chip_id[0] ^ 1]),
                hex::encode(&c.chip_id[1..]),
                hex::encode(c.chip_id)
            ),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x187] = 210),
            KeyMismatch,
            "reported TCB (bl=3 tee=0 snp=8 ucode=210) differs from the TCB the VCEK certifies (bl=3 tee=0 snp=8 ucode=209)".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x189] = 0x11),
            KeyMismatch,
            "report CPUID family 0x19 model 0x11 is a Genoa processor, but the VCEK is for Milan".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x0A] |= 0x08),
            PolicyMismatch,
            "guest policy 0xb0000 allows debugging (bit 19): the host can read and change guest memory".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x30] = 1),
            PolicyMismatch,
            "report VMPL 1 is not allowed (allowed_vmpl = [0])".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x48] = 7 << 2),
            BadSignature,
            "the report is not signed (KEY_INFO.SIGNING_KEY = none)".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x48] = 1 << 2),
            CollateralUnavailable,
            "the report is signed by a VLEK, but neither the evidence nor the collateral holds a VLEK certificate".into(),
        ),
    ];
    for (edit, kind, reason) in cases {
        let ev = c.evidence(&[7; 64], |r| edit(r));
        assert_eq!(refusal(kind, offline(&c, &ev, "", None)), reason);
    }
    // Policy keys on a signed report.
    let ev = c.evidence(&[7; 64], |_| {});
    let m = refusal(
        PolicyMismatch,
        offline(&c, &ev, "[min_tcb.milan]\nsnp = 9", None),
    );
    assert_eq!(
        m,
        "reported TCB snp 8 is below the minimum 9 for Milan (min_tcb)"
    );
    let m = refusal(PolicyMismatch, offline(&c, &ev, "min_guest_svn = 2", None));
    assert_eq!(m, "guest SVN 1 is below min_guest_svn 2");
    offline(
        &c,
        &ev,
        &format!(
            "measurements = [\"{}\"]\nhost_data = [\"{}\"]\n[min_tcb.milan]\nsnp = 8\nmicrocode = 209",
            hex::encode(MEASUREMENT),
            hex::encode(HOST_DATA)
        ),
        None,
    )
    .unwrap();
}

#[test]
fn amd_crls_are_checked() {
    let c = TestChain::new();
    let ev = c.evidence(&[7; 64], |_| {});
    let crl_dir = tempfile::tempdir().unwrap();
    c.crl(crl_dir.path(), false, 1);
    let claims = offline(&c, &ev, "", Some(crl_dir.path())).unwrap();
    assert_eq!(claims["crl_checked"], true);
    // The same CRL two days later has expired.
    let later = now() + Duration::from_secs(2 * 86400);
    let m = refusal(
        Expired,
        sev_snp::verify_offline(&ev, Some(crl_dir.path()), None, later, &c.config("")),
    );
    assert!(m.starts_with("CRL amd.crl expired at "), "{m}");
    // A CRL revoking the ASK.
    let crl_dir = tempfile::tempdir().unwrap();
    c.crl(crl_dir.path(), true, 1);
    let m = refusal(Revoked, offline(&c, &ev, "", Some(crl_dir.path())));
    assert_eq!(m, "ASK SEV-Milan (serial 02) is revoked by CRL amd.crl");
    // A CRL whose signature was tampered with.
    let p = crl_dir.path().join("amd.crl");
    let der = pem::parse(std::fs::read(&p).unwrap())
        .unwrap()
        .into_contents();
    let mut bad = der.clone();
    let n = bad.len();
    bad[n - 5] ^= 1;
    std::fs::write(&p, &bad).unwrap();
    let m = refusal(UntrustedChain, offline(&c, &ev, "", Some(crl_dir.path())));
    assert_eq!(m, "CRL amd.crl signature does not verify under ARK-Milan");
}

#[test]
fn protocol_through_the_agent_attestor_and_a_tsm_tree() {
    let chain = Arc::new(TestChain::new());
    let tsm = tempfile::tempdir().unwrap();
    let _fake = FakeTsm::start(tsm.path().to_path_buf(), chain.clone(), None);
    let verifier = sev_snp::SnpVerifier::from_config(&chain.config("")).unwrap();
    let mut attestor =
        ztid_attestor::sev_snp::SnpAttestor::with_client(TsmClient::new(tsm.path(), "sev_guest"))
            .unwrap();
    let key = spki();
    let ctx = AttestationContext {
        agent_public_key: &key,
        now: now(),
    };
    let first = attestor.initial_evidence().unwrap();
    assert!(first.is_empty());
    let VerifierStep::Challenge(challenge, session) = verifier.start(&first, &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let answer = attestor.answer(&challenge, &key).unwrap();
    let VerifierStep::Attested(node) = session.resume(&answer, &ctx).unwrap() else {
        panic!("expected the node to be attested");
    };
    assert_eq!(node.method, "sev-snp");
    assert_eq!(node.node_id.len(), 32);
    let want = [
        format!("sev-snp:measurement:{}", hex::encode(MEASUREMENT)),
        "sev-snp:policy:30000".to_string(),
        format!("sev-snp:host-data:{}", hex::encode(HOST_DATA)),
        format!("sev-snp:chip-id:{}", hex::encode(chain.chip_id)),
    ];
    for w in want {
        assert!(
            node.selectors.contains(&Selector::parse(&w).unwrap()),
            "{w} in {:?}",
            node.selectors
        );
    }
    // The same answer replayed into a new session (a new nonce) is refused.
    let VerifierStep::Challenge(_, session) = verifier.start(b"", &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let m = refusal(Replay, session.resume(&answer, &ctx));
    assert!(
        m.starts_with("report_data does not match the expected binding"),
        "{m}"
    );
    // An answer for another agent key is refused.
    let VerifierStep::Challenge(challenge, session) = verifier.start(b"", &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let answer = attestor.answer(&challenge, &key).unwrap();
    let other = spki();
    let ctx2 = AttestationContext {
        agent_public_key: &other,
        now: ctx.now,
    };
    assert_eq!(
        refusal(KeyMismatch, session.resume(&answer, &ctx2)),
        "the agent key changed between the challenge and the answer"
    );
    // A late answer is refused.
    let VerifierStep::Challenge(challenge, session) = verifier.start(b"", &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let answer = attestor.answer(&challenge, &key).unwrap();
    let late = AttestationContext {
        agent_public_key: &key,
        now: ctx.now + Duration::from_secs(61),
    };
    assert!(refusal(Replay, session.resume(&answer, &late)).starts_with("challenge expired"));
    // A report for the right nonce but a key the agent did not bind (forged report_data).
    let VerifierStep::Challenge(challenge, session) = verifier.start(b"", &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let mut rd = [0u8; 64];
    rd.copy_from_slice(
        &ring::digest::digest(&ring::digest::SHA512, &challenge[..32]).as_ref()[..64],
    );
    let forged = chain.evidence(&rd, |_| {});
    assert!(
        refusal(Replay, session.resume(&forged, &ctx)).starts_with("report_data does not match")
    );
    // Each attestation of one launch gets the same node ID; another launch another.
    let VerifierStep::Challenge(challenge, session) = verifier.start(b"", &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let rd = ztid_verifier::tsm::report_data_for_challenge(&challenge, &key).unwrap();
    let VerifierStep::Attested(other_launch) =
        session.resume(&chain.evidence(&rd, |_| {}), &ctx).unwrap()
    else {
        panic!("expected the node to be attested");
    };
    assert_ne!(
        other_launch.node_id, node.node_id,
        "a new REPORT_ID is a new launch"
    );
}

// ---- the whole system ----

struct AgentProc {
    child: Child,
    dir: tempfile::TempDir,
}

impl AgentProc {
    fn spawn(server: &Server, tsm_root: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new(bin("ztid-agent"))
            .arg("run")
            .arg("--server")
            .arg(server.addr())
            .arg("--trust-bundle")
            .arg(server.bundle_file())
            .arg("--attestor")
            .arg("sev-snp")
            .arg("--tsm-root")
            .arg(tsm_root)
            .arg("--socket")
            .arg(dir.path().join("api.sock"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--sync-interval")
            .arg("1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn ztid-agent");
        Self { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn socket(&self) -> String {
        self.dir.path().join("api.sock").display().to_string()
    }

    /// Waits until the Workload API answers; `Err(log)` if the agent exits first.
    fn ready(&mut self) -> Result<String, String> {
        let start = std::time::Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Err(format!("ztid-agent exited ({st}):\n{}", self.log()));
            }
            if Path::new(&self.socket()).exists()
                && agent_cli(&["healthcheck", "--socket", &self.socket()]).ok
            {
                let pem =
                    std::fs::read_to_string(self.dir.path().join("data/agent_svid.pem")).unwrap();
                return Ok(spiffe_id_of(pem::parse(pem).unwrap().contents()));
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!("agent not ready:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the node API's Attest stream by hand for `sev-snp`, answering the challenge with
/// `evidence`; returns the server's refusal message.
fn replay_attestation(server: &Server, evidence: &[u8]) -> String {
    use ztid_agent::node_client::connect;
    use ztid_proto::node as pb;
    use ztid_spiffe::tls::{shared_roots, ServerSvidVerifier};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let roots = pem::parse_many(server.cli_ok(&["bundle", "show"]))
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect();
        let verifier = Arc::new(ServerSvidVerifier::new(
            shared_roots(roots),
            "spiffe://example.org/ztid/server".to_string(),
        ));
        let mut client = connect(server.addr().parse().unwrap(), verifier, None).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::AttestRequest {
            step: Some(pb::attest_request::Step::Init(pb::AttestInit {
                method: "sev-snp".into(),
                payload: Vec::new(),
                csr,
            })),
        })
        .await
        .unwrap();
        let mut inbound = client
            .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        loop {
            match inbound.message().await {
                Ok(Some(pb::AttestResponse {
                    step: Some(pb::attest_response::Step::Challenge(c)),
                })) => {
                    assert!(c.len() > 32, "a nonce and the CSR key");
                    tx.send(pb::AttestRequest {
                        step: Some(pb::attest_request::Step::ChallengeResponse(
                            evidence.to_vec(),
                        )),
                    })
                    .await
                    .unwrap();
                }
                Ok(Some(other)) => panic!("the replay must not attest: {other:?}"),
                Ok(None) => panic!("stream ended without a refusal"),
                Err(status) => return status.message().to_string(),
            }
        }
    })
}

#[test]
fn end_to_end_agent_attests_with_sev_snp_and_a_workload_gets_its_svid() {
    let chain = Arc::new(TestChain::new());
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "[attestors.sev_snp]\ntest_roots_dir = {:?}\nmeasurements = [\"{}\"]\n",
            chain.roots_dir().display().to_string(),
            hex::encode(MEASUREMENT)
        ),
    )
    .unwrap();
    let server = Server::start_with("example.org", &["--config", cfg.to_str().unwrap()]);

    let tsm = tempfile::tempdir().unwrap();
    let fake = FakeTsm::start(tsm.path().to_path_buf(), chain.clone(), None);
    let mut agent = AgentProc::spawn(&server, tsm.path());
    let agent_id = agent
        .ready()
        .unwrap_or_else(|log| panic!("{log}\nserver:\n{}", server.log_text()));
    assert!(
        agent_id.starts_with("spiffe://example.org/ztid/agent/sev-snp/"),
        "{agent_id}"
    );
    let node_id = agent_id.rsplit('/').next().unwrap();
    assert_eq!(node_id.len(), 32);
    // One report was made, for a fresh nonce bound to the agent's key.
    let served = fake.served.lock().unwrap().clone();
    assert_eq!(served.len(), 1);

    // The CA recorded the selectors the report proved.
    let (_, sels) = server.agent_record(&agent_id);
    assert!(
        sels.contains(&format!("sev-snp:measurement:{}", hex::encode(MEASUREMENT))),
        "{sels:?}"
    );
    assert!(
        sels.contains(&"sev-snp:policy:30000".to_string()),
        "{sels:?}"
    );

    // A workload on this node gets its SVID.
    let uid = format!("unix:uid:{}", nix_uid());
    server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/confidential-app",
        "--parent-id",
        &agent_id,
        "--selector",
        &uid,
    ]);
    let r = wait_for("the workload's SVID", READY_TIMEOUT, || {
        let r = agent_cli(&[
            "api",
            "fetch",
            "x509",
            "--output",
            "json",
            "--socket",
            &agent.socket(),
        ]);
        r.ok.then_some(r)
    });
    let svid: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        svid.to_string()
            .contains("spiffe://example.org/confidential-app"),
        "{svid}"
    );

    // A client replaying the first attestation's report (with its certificate table) in
    // answer to a new challenge: refused, since its report_data is bound to the first
    // nonce and the first agent's key. (An honest agent would not even send it: its
    // attestor checks the report it got carries the report_data it asked for.)
    let refused = replay_attestation(
        &server,
        &[served[0].0.clone(), served[0].1.clone()].concat(),
    );
    assert!(
        refused.starts_with("attestation refused: report_data does not match the expected binding"),
        "{refused}"
    );
    let slog = server.log_text();
    assert!(
        slog.contains("report_data does not match the expected binding"),
        "{slog}"
    );
    assert_eq!(
        fake.served.lock().unwrap().len(),
        1,
        "the replay made no new report"
    );
    drop(fake);
}

#[test]
fn svsm_vtpm_manifests_are_bound_and_only_at_vmpl_0() {
    let chain = TestChain::new();
    // Even where VMPL 1 reports are allowed, a manifest only counts from the SVSM.
    let v = sev_snp::SnpVerifier::from_config(&chain.config("allowed_vmpl = [0, 1]")).unwrap();
    let binding = [7u8; 64];
    let manifest = b"not a TPMT_PUBLIC".to_vec();
    let evidence = |vmpl: u8, report_data: [u8; 64]| {
        let mut e = b"ZTIDSVSM".to_vec();
        e.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
        e.extend_from_slice(&manifest);
        e.extend(chain.evidence(&report_data, |r| r[0x30] = vmpl));
        e
    };
    let bound = sev_snp::svsm_report_data(&binding, &manifest);
    // report_data must be SHA-512(binding ‖ manifest), not the binding alone.
    assert!(refusal(
        Replay,
        v.verify_evidence(&evidence(0, binding), &binding, now())
    )
    .starts_with("report_data does not match the expected binding"),);
    assert_eq!(
        refusal(
            PolicyMismatch,
            v.verify_evidence(&evidence(1, bound), &binding, now())
        ),
        "a report carrying an SVSM vTPM manifest must be made at VMPL 0 (by the SVSM), not VMPL 1"
    );
    assert!(refusal(
        Malformed,
        v.verify_evidence(&evidence(0, bound), &binding, now())
    )
    .starts_with("the SVSM vTPM manifest is not an EK TPMT_PUBLIC"));
    // Malformed framing.
    let mut cut = evidence(0, bound);
    cut.truncate(20);
    assert_eq!(
        refusal(Malformed, v.verify_evidence(&cut, &binding, now())),
        "SEV-SNP evidence ends inside its service manifest"
    );
}
