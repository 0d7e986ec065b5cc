//! Multi-factor node attestation end to end: a "confidential VM with a vTPM" made of a
//! swtpm and the test-only SEV-SNP signer behind a configfs-tsm tree, a real
//! `ztid-server` requiring both (`[attestors.multi] required`), and `ztid-agent
//! --attestor tpm,sev-snp`. The node alias that needs selectors of both methods is
//! granted, a workload under it gets its SVID; one factor alone, or one failing factor,
//! is refused with the factor named.
#![forbid(unsafe_code)]

use ztid_test_support::{snp_signer, swtpm};

use std::sync::Arc;
use std::time::Duration;

use snp_signer::{FakeTsm, TestChain, MEASUREMENT};
use swtpm::{LocalCa, Swtpm};
use ztid_attestor::agent_key::AgentKey;
use ztid_tests::*;
use ztid_verifier::tpm;

const TD: &str = "cvm.example.org";

fn refused(r: Result<Agent, String>, what: &str) -> String {
    match r {
        Err(log) => log,
        Ok(a) => panic!("{what} attested as {}", a.spiffe_id),
    }
}

/// A confidential VM with a vTPM, simulated: a swtpm under a local EK CA, and a fake
/// configfs-tsm serving one SEV-SNP launch signed by the test-only chain.
struct Cvm {
    fake: FakeTsm,
    tsm: tempfile::TempDir,
    chain: Arc<TestChain>,
    vtpm: Swtpm,
    ca: LocalCa,
    dir: tempfile::TempDir,
}

impl Cvm {
    fn new() -> Self {
        Self::build(false)
    }

    /// The guest runs under an SVSM whose vTPM is the swtpm: SEV-SNP reports asked for
    /// through the SVSM vTPM service carry its EK.
    fn with_svsm_vtpm() -> Self {
        Self::build(true)
    }

    fn build(svsm: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::new(dir.path(), "ca");
        let vtpm = Swtpm::provision(&ca, &dir.path().join("vtpm"));
        let chain = Arc::new(TestChain::new());
        let tsm = tempfile::tempdir().unwrap();
        let root = tsm.path().to_path_buf();
        let fake = if svsm {
            let ek = ztid_attestor::tpm_device::Tpm::open(&vtpm.tcti())
                .unwrap()
                .ek_public()
                .unwrap();
            FakeTsm::start_svsm(root, chain.clone(), ek)
        } else {
            FakeTsm::start(root, chain.clone(), None)
        };
        Self {
            fake,
            tsm,
            chain,
            vtpm,
            ca,
            dir,
        }
    }

    /// A server trusting this vTPM's EK CA and the SNP test chain: `top` holds
    /// top-level keys, `snp` extra `[attestors.sev_snp]` lines, `multi` the
    /// `[attestors.multi]` table's lines.
    fn server(&self, name: &str, top: &str, snp: &str, multi: &str) -> Server {
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "{top}\n[attestors.tpm]\nek_ca_dir = {:?}\n\
                 [attestors.sev_snp]\ntest_roots_dir = {:?}\n{snp}\n\
                 [attestors.multi]\n{multi}\n",
                self.ca.trust_dir().display().to_string(),
                self.chain.roots_dir().display().to_string(),
            ),
        )
        .unwrap();
        Server::start_with(TD, &["--config", &config.display().to_string()])
    }

    fn tcti(&self) -> String {
        self.vtpm.tcti()
    }

    fn tsm_root(&self) -> String {
        self.tsm.path().display().to_string()
    }

    /// `ztid-agent --attestor tpm,sev-snp` on this VM.
    fn agent(&self, server: &Server) -> Result<Agent, String> {
        self.agent_with(server, &self.tcti(), &[])
    }

    /// The same with another TPM and extra arguments.
    fn agent_with(&self, server: &Server, tcti: &str, extra: &[&str]) -> Result<Agent, String> {
        let tsm_root = self.tsm_root();
        let mut args = vec![
            "--attestor",
            "tpm,sev-snp",
            "--tpm-tcti",
            tcti,
            "--tsm-root",
            &tsm_root,
        ];
        args.extend_from_slice(extra);
        Agent::start_attested(server, &args)
    }

    fn ek_hash(&self) -> String {
        let mut t = ztid_attestor::tpm_device::Tpm::open(&self.tcti()).unwrap();
        tpm::ek_hash(&t.ek_public().unwrap()).unwrap()
    }
}

const REQUIRED: &str = "required = [\"tpm\", \"sev-snp\"]";

#[test]
fn tpm_and_sev_snp_together_or_not_at_all() {
    let cvm = Cvm::new();
    let ek_hash = {
        let mut t = ztid_attestor::tpm_device::Tpm::open(&cvm.tcti()).unwrap();
        tpm::ek_hash(&t.ek_public().unwrap()).unwrap()
    };
    let server = cvm.server("server", "", "", REQUIRED);
    let (tcti, tsm_root) = (cvm.tcti(), cvm.tsm_root());

    // The fleet alias needs a TPM EK and a launch measurement: only a node that proved
    // both belongs to it.
    let alias = format!("spiffe://{TD}/fleet/confidential");
    server.cli_ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        &alias,
        "--selector",
        &format!("tpm:ek-hash:{ek_hash}"),
        "--selector",
        &format!("sev-snp:measurement:{}", hex::encode(MEASUREMENT)),
    ]);
    let workload = format!("spiffe://{TD}/confidential-agent");
    server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &workload,
        "--parent-id",
        &alias,
        "--selector",
        &format!("unix:uid:{}", nix_uid()),
    ]);

    let agent = cvm
        .agent(&server)
        .unwrap_or_else(|log| panic!("{log}\nserver:\n{}", server.log_text()));
    let node_id = agent
        .spiffe_id
        .strip_prefix(&format!("spiffe://{TD}/ztid/agent/multi/"))
        .unwrap_or_else(|| panic!("{}", agent.spiffe_id));
    assert_eq!(node_id.len(), 64);
    assert_eq!(cvm.fake.served.lock().unwrap().len(), 1, "one SNP report");

    // The CA recorded both factors' selectors and put the node in the alias.
    let (shown, sels) = server.agent_record(&agent.spiffe_id);
    assert_eq!(shown["attestation_method"], "multi", "{shown}");
    for want in [
        "multi:method:tpm".to_string(),
        "multi:method:sev-snp".to_string(),
        format!("tpm:ek-hash:{ek_hash}"),
        format!("sev-snp:measurement:{}", hex::encode(MEASUREMENT)),
        format!("sev-snp:chip-id:{}", hex::encode(cvm.chain.chip_id)),
    ] {
        assert!(sels.contains(&want), "{want} missing from {sels:?}");
    }
    assert!(
        shown["aliases"].to_string().contains(&alias),
        "alias not granted: {shown}"
    );

    // The agent key is the TPM's, and the SNP report vouched for the same key.
    let data = agent.dir.path().join("data");
    let key = AgentKey::load(&data, &tcti).expect("agent key");
    assert!(
        key.pkcs8().is_none(),
        "the multi-factor agent key is in the TPM"
    );

    // A workload under the alias gets its SVID through the agent.
    let out = wait_for("the workload SVID under the alias", READY_TIMEOUT, || {
        let r = agent.cli(&["api", "fetch", "x509", "--output", "json"]);
        (r.ok && r.stdout.contains(&workload)).then_some(r.stdout)
    });
    assert!(out.contains(&workload), "{out}");
    drop(agent);

    // One factor alone is refused by the server's requirement, whichever it is.
    let log = refused(
        Agent::start_attested(&server, &["--attestor", "tpm", "--tpm-tcti", &tcti]),
        "the TPM alone",
    );
    assert!(
        log.contains(
            "this server requires sev-snp and tpm together in one attestation; tpm alone is not enough"
        ),
        "{log}"
    );
    let log = refused(
        Agent::start_attested(&server, &["--attestor", "sev-snp", "--tsm-root", &tsm_root]),
        "SEV-SNP alone",
    );
    assert!(log.contains("sev-snp alone is not enough"), "{log}");
    // A join token proves nothing about the machine: refused too.
    let log = refused(
        Agent::start_with_token(&server, &server.token()),
        "a join token",
    );
    assert!(log.contains("join-token alone is not enough"), "{log}");

    // Both factors, but one fails its policy: on a server that allows another launch
    // measurement, the whole attempt is refused, the factor is named, and the good TPM
    // factor does not help.
    let strict_server = cvm.server(
        "strict",
        "",
        &format!("measurements = [\"{}\"]", "00".repeat(48)),
        "",
    );
    let log = refused(
        cvm.agent(&strict_server),
        "a launch measurement off the allow-list with a good TPM",
    );
    let reason = format!(
        "sev-snp factor: measurement {} is not in the measurements allow-list",
        hex::encode(MEASUREMENT)
    );
    assert!(log.contains(&reason), "{log}");
    assert!(
        strict_server.log_text().contains(&reason),
        "the server logs which factor failed"
    );
    // Without a requirement, single methods still work on that server.
    let single = Agent::start_attested(&strict_server, &["--attestor", "tpm", "--tpm-tcti", &tcti])
        .unwrap_or_else(|log| panic!("{log}"));
    assert!(single.spiffe_id.contains("/ztid/agent/tpm/"));
    drop(single);
    assert_eq!(cvm.vtpm.leftovers(), "");
}

#[test]
fn multi_factor_renewal_attests_every_factor_again() {
    let cvm = Cvm::new();
    let server = cvm.server("server", "agent_svid_ttl_seconds = 12", "", REQUIRED);
    let tcti = cvm.tcti();
    let agent = cvm.agent(&server).unwrap_or_else(|log| panic!("{log}"));
    let data = agent.dir.path().join("data");
    let first_key = AgentKey::load(&data, &tcti).unwrap().spki().unwrap();

    // At half-life the agent attests again: a new TPM key, a fresh quote and
    // certification, a fresh SNP report bound to the new key; same node, same ID.
    wait_for(
        "a renewal by multi-factor re-attestation",
        Duration::from_secs(20),
        || {
            (server.log_text().matches("node_attested").count() >= 2
                && agent.proc.log_text().contains("agent SVID renewed"))
            .then_some(())
        },
    );
    assert!(
        cvm.fake.served.lock().unwrap().len() >= 2,
        "a new SNP report"
    );
    let (shown, _) = server.agent_record(&agent.spiffe_id);
    assert_eq!(shown["attestation_method"], "multi", "{shown}");
    let renewed_key = wait_for("the renewed key on disk", READY_TIMEOUT, || {
        let k = AgentKey::load(&data, &tcti)?.spki().ok()?;
        (k != first_key).then_some(k)
    });
    let leaf = pem::parse(std::fs::read(data.join("agent_svid.pem")).unwrap())
        .unwrap()
        .into_contents();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(cert.public_key().raw, renewed_key.as_slice());
    assert_eq!(
        spiffe_id_of(&leaf),
        agent.spiffe_id,
        "the same node identity"
    );
}

#[test]
fn svsm_vtpm_binding_ties_the_tpm_to_the_guest() {
    let cvm = Cvm::with_svsm_vtpm();
    let ek_hash = cvm.ek_hash();
    // The binding trusts SVSM reports, so the server insists on the SVSM launch
    // measurements and on VMPL 0 reports only: otherwise it does not start.
    let measured = format!("measurements = [\"{}\"]", hex::encode(MEASUREMENT));
    for (snp_extra, reason) in [
        (
            String::new(),
            "bind_vtpm trusts SVSM reports, so [attestors.sev_snp] measurements must list the SVSM launch measurements",
        ),
        (
            format!("{measured}\nallowed_vmpl = [0, 1]"),
            "bind_vtpm trusts SVSM reports, which are made at VMPL 0: [attestors.sev_snp] allowed_vmpl must be [0]",
        ),
    ] {
        let config = cvm.dir.path().join("refused.toml");
        std::fs::write(
            &config,
            format!(
                "[attestors.tpm]\nek_ca_dir = {:?}\n[attestors.sev_snp]\ntest_roots_dir = {:?}\n{snp_extra}\n\
                 [attestors.multi]\nbind_vtpm = true\n",
                cvm.ca.trust_dir().display().to_string(),
                cvm.chain.roots_dir().display().to_string(),
            ),
        )
        .unwrap();
        let out = std::process::Command::new(bin("ztid-server"))
            .args(["run", "--trust-domain", TD, "--data-dir"])
            .arg(cvm.dir.path().join("refused-data"))
            .args(["--bind", &format!("127.0.0.1:{}", free_port()), "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(reason),
            "{stderr}"
        );
    }
    let server = cvm.server(
        "server",
        "",
        &measured,
        &format!("{REQUIRED}\nbind_vtpm = true"),
    );

    // Reports through the SVSM vTPM service name the swtpm's EK: bound, attested.
    let agent = cvm
        .agent_with(&server, &cvm.tcti(), &["--sev-snp-svsm-vtpm"])
        .unwrap_or_else(|log| panic!("{log}\nserver:\n{}", server.log_text()));
    let (_, sels) = server.agent_record(&agent.spiffe_id);
    assert!(
        sels.contains(&format!("sev-snp:vtpm-ek-hash:{ek_hash}")),
        "{sels:?}"
    );
    assert!(sels.contains(&format!("tpm:ek-hash:{ek_hash}")), "{sels:?}");
    drop(agent);

    // A report not made through the SVSM says nothing about the TPM: refused.
    let log = refused(cvm.agent(&server), "a report without a vTPM manifest");
    assert!(
        log.contains(
            "[attestors.multi] bind_vtpm is set, but the SEV-SNP report carries no SVSM vTPM manifest"
        ),
        "{log}"
    );

    // Another machine's TPM (same manufacturer CA, genuine, healthy) paired with this
    // guest's report: refused, naming both EKs.
    let other = Swtpm::provision(&cvm.ca, &cvm.dir.path().join("other-tpm"));
    let other_hash = {
        let mut t = ztid_attestor::tpm_device::Tpm::open(&other.tcti()).unwrap();
        tpm::ek_hash(&t.ek_public().unwrap()).unwrap()
    };
    let log = refused(
        cvm.agent_with(&server, &other.tcti(), &["--sev-snp-svsm-vtpm"]),
        "another machine's TPM",
    );
    assert!(
        log.contains(&format!(
            "the SEV-SNP report's SVSM vTPM has EK {ek_hash}, but the TPM factor's EK is {other_hash}: not this guest's vTPM"
        )),
        "{log}"
    );
}

#[test]
fn an_uncertified_vtpm_ek_passes_only_bound_by_an_svsm_report() {
    use ztid_attestor::tpm::TpmAttestor;
    use ztid_attestor::tsm::TsmClient;
    use ztid_attestor::NodeAttestor;
    use ztid_verifier::multi::{Envelope, MultiVerifier, Part};
    use ztid_verifier::tpm::{InitialEvidence, TpmVerifier};
    use ztid_verifier::{AttestationContext, NodeVerifier, VerifierStep};

    let svsm = Cvm::with_svsm_vtpm();
    let plain = Cvm::new();
    let tpm_policy: toml::Table = toml::from_str(&format!(
        "ek_ca_dir = {:?}\nuncertified_ek = \"svsm-bound\"",
        svsm.ca.trust_dir().display().to_string()
    ))
    .unwrap();
    let multi = |cvm: &Cvm| {
        // The SVSM's launch measurement listed: without it the vTPM EK is not vouched for.
        let snp: toml::Table = toml::from_str(&format!(
            "test_roots_dir = {:?}\nmeasurements = [\"{}\"]",
            cvm.chain.roots_dir().display().to_string(),
            hex::encode(MEASUREMENT)
        ))
        .unwrap();
        MultiVerifier::new(
            vec![
                Arc::new(TpmVerifier::from_config(&tpm_policy).unwrap()),
                Arc::new(ztid_verifier::sev_snp::SnpVerifier::from_config(&snp).unwrap()),
            ],
            Default::default(),
        )
        .unwrap()
    };
    // One attempt: the TPM's evidence without its EK certificate (as an SVSM vTPM
    // sends it), the SNP report through the SVSM service or not.
    let attempt = |cvm: &Cvm, through_svsm: bool| {
        let mut tpm = TpmAttestor::with_tcti(&svsm.tcti());
        let key = tpm.agent_key().unwrap().unwrap().spki().unwrap();
        let mut ev: InitialEvidence =
            serde_json::from_slice(&tpm.initial_evidence().unwrap()).unwrap();
        ev.ek_cert.clear();
        let client = TsmClient::new(cvm.tsm.path(), "sev_guest");
        let mut snp = if through_svsm {
            ztid_attestor::sev_snp::SnpAttestor::through_svsm_vtpm(client).unwrap()
        } else {
            ztid_attestor::sev_snp::SnpAttestor::with_client(client).unwrap()
        };
        let ctx = AttestationContext {
            agent_public_key: &key,
            now: std::time::SystemTime::now(),
        };
        let env = Envelope {
            parts: vec![
                Part {
                    method: "tpm".into(),
                    data: serde_json::to_vec(&ev).unwrap(),
                },
                Part {
                    method: "sev-snp".into(),
                    data: snp.initial_evidence().unwrap(),
                },
            ],
        };
        let v = multi(cvm);
        let VerifierStep::Challenge(c, session) =
            v.start(&serde_json::to_vec(&env).unwrap(), &ctx).unwrap()
        else {
            panic!("expected a challenge")
        };
        let c: Envelope = serde_json::from_slice(&c).unwrap();
        let parts = c
            .parts
            .into_iter()
            .map(|p| {
                let data = match p.method.as_str() {
                    "tpm" => tpm.answer(&p.data, &key).unwrap(),
                    _ => snp.answer(&p.data, &key).unwrap(),
                };
                Part {
                    method: p.method,
                    data,
                }
            })
            .collect();
        let answer = serde_json::to_vec(&Envelope { parts }).unwrap();
        (
            session.resume(&answer, &ctx),
            serde_json::to_vec(&ev).unwrap(),
            key,
        )
    };

    // Bound by the SVSM report of this very vTPM: attested, and marked uncertified.
    let (r, ev, key) = attempt(&svsm, true);
    let VerifierStep::Attested(node) = r.unwrap_or_else(|e| panic!("{e}")) else {
        panic!("expected the node attested")
    };
    let sels: Vec<String> = node.selectors.iter().map(|s| s.to_string()).collect();
    assert!(sels.contains(&"tpm:ek-cert:none".to_string()), "{sels:?}");
    assert!(
        sels.contains(&format!("sev-snp:vtpm-ek-hash:{}", svsm.ek_hash())),
        "{sels:?}"
    );

    // Alone, the same TPM evidence is refused at once.
    let ctx = AttestationContext {
        agent_public_key: &key,
        now: std::time::SystemTime::now(),
    };
    let alone = TpmVerifier::from_config(&tpm_policy)
        .unwrap()
        .start(&ev, &ctx);
    assert!(
        matches!(&alone, Err(ztid_attestation::Error::Refused(m))
            if m.kind == ztid_attestation::RefusalKind::PolicyMismatch
                && m.detail == "a TPM whose EK has no certificate attests only together with an SEV-SNP report that binds it (--attestor tpm,sev-snp)"),
        "{:?}",
        alone.err()
    );

    // With an SNP report that carries no vTPM manifest: nothing vouches for the EK.
    let (r, _, _) = attempt(&plain, false);
    match r {
        Err(ztid_attestation::Error::Refused(m)) => assert_eq!(
            (m.kind, m.detail.as_str()),
            (
                ztid_attestation::RefusalKind::PolicyMismatch,
                "the TPM's EK has no certificate, so only an SEV-SNP report can vouch for it, but the SEV-SNP report carries no SVSM vTPM manifest (the agent asks for one with --sev-snp-svsm-vtpm)"
            )
        ),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an uncertified EK passed without binding"),
    }
}
