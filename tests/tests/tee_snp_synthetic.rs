//! SEV-SNP with a test-only signer: an ARK → ASK → VCEK chain made here with openssl
//! (RSA-PSS-SHA384, salt 48, VCEK serial 0, AMD's TCB and hwID extensions) that only a
//! config naming it in `test_roots_dir` trusts, and reports signed with the VCEK key.
//!
//! It covers what real captured reports cannot: checks behind the signature (chip ID, TCB
//! against the VCEK, CPUID, debug policy, VMPL), AMD CRLs, the challenge protocol with
//! the agent side reading through a configfs-tsm tree, and the whole system: server,
//! agent with `--attestor sev-snp`, a workload's SVID, and a replayed report refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use serde_json::Value;
use ztid_agent_attestor::node_attestation::tsm::TsmClient;
use ztid_agent_attestor::node_attestation::{
    sev_snp, AttestationContext, NodeAttestor, NodeVerifier, VerifierStep,
};
use ztid_agent_attestor::{Error, Selector};
use ztid_tests::*;

const PSS: &[&str] = &[
    "-sigopt",
    "rsa_padding_mode:pss",
    "-sigopt",
    "rsa_pss_saltlen:48",
    "-sigopt",
    "rsa_mgf1_md:sha384",
];
const MEASUREMENT: [u8; 48] = [0x5a; 48];
const HOST_DATA: [u8; 32] = [0x42; 32];
/// Milan TCB bytes: [bl, tee, 0, 0, 0, 0, snp, ucode].
const TCB: [u8; 8] = [3, 0, 0, 0, 0, 0, 8, 209];

fn ossl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed (scripts/install-deps.sh)");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A test ARK/ASK/VCEK chain and the VCEK's signing key.
struct TestChain {
    dir: tempfile::TempDir,
    vcek_der: Vec<u8>,
    key: EcdsaKeyPair,
    chip_id: [u8; 64],
}

impl TestChain {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("roots")).unwrap();
        let mut chip_id = [0u8; 64];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut chip_id).unwrap();
        for (k, alg) in [
            ("ark.key", "rsa_keygen_bits:2048"),
            ("ask.key", "rsa_keygen_bits:2048"),
        ] {
            ossl(
                d,
                &["genpkey", "-algorithm", "RSA", "-pkeyopt", alg, "-out", k],
            );
        }
        ossl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-out",
                "vcek.key",
            ],
        );
        std::fs::write(
            d.join("ca.ext"),
            "basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\n",
        )
        .unwrap();
        std::fs::write(
            d.join("vcek.ext"),
            format!(
                "1.3.6.1.4.1.3704.1.3.1=ASN1:INTEGER:{}\n1.3.6.1.4.1.3704.1.3.2=ASN1:INTEGER:{}\n\
                 1.3.6.1.4.1.3704.1.3.3=ASN1:INTEGER:{}\n1.3.6.1.4.1.3704.1.3.8=ASN1:INTEGER:{}\n\
                 1.3.6.1.4.1.3704.1.4=DER:{}\n1.3.6.1.4.1.3704.1.2=ASN1:IA5STRING:Milan-B0\n",
                TCB[0],
                TCB[1],
                TCB[6],
                TCB[7],
                hex::encode(chip_id)
            ),
        )
        .unwrap();
        let mut a = vec![
            "req",
            "-x509",
            "-new",
            "-key",
            "ark.key",
            "-subj",
            "/O=ztid test/CN=ARK-Milan",
            "-days",
            "3650",
            "-sha384",
            "-set_serial",
            "1",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "roots/ark.pem",
        ];
        a.extend_from_slice(PSS);
        ossl(d, &a);
        ossl(
            d,
            &[
                "req",
                "-new",
                "-key",
                "ask.key",
                "-subj",
                "/O=ztid test/CN=SEV-Milan",
                "-out",
                "ask.csr",
            ],
        );
        let mut a = vec![
            "x509",
            "-req",
            "-in",
            "ask.csr",
            "-CA",
            "roots/ark.pem",
            "-CAkey",
            "ark.key",
            "-set_serial",
            "2",
            "-days",
            "3650",
            "-sha384",
            "-extfile",
            "ca.ext",
            "-out",
            "roots/ask.pem",
        ];
        a.extend_from_slice(PSS);
        ossl(d, &a);
        ossl(
            d,
            &[
                "req",
                "-new",
                "-key",
                "vcek.key",
                "-subj",
                "/O=ztid test/CN=SEV-VCEK",
                "-out",
                "vcek.csr",
            ],
        );
        let mut a = vec![
            "x509",
            "-req",
            "-in",
            "vcek.csr",
            "-CA",
            "roots/ask.pem",
            "-CAkey",
            "ask.key",
            "-set_serial",
            "0",
            "-days",
            "3650",
            "-sha384",
            "-extfile",
            "vcek.ext",
            "-outform",
            "der",
            "-out",
            "vcek.der",
        ];
        a.extend_from_slice(PSS);
        ossl(d, &a);
        let key_pem = std::fs::read(d.join("vcek.key")).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P384_SHA384_FIXED_SIGNING,
            pem::parse(key_pem).unwrap().contents(),
            &SystemRandom::new(),
        )
        .expect("P-384 PKCS#8 key");
        Self {
            vcek_der: std::fs::read(d.join("vcek.der")).unwrap(),
            dir,
            key,
            chip_id,
        }
    }

    fn roots_dir(&self) -> PathBuf {
        self.dir.path().join("roots")
    }

    /// `[attestors.sev_snp]` trusting this chain, plus `extra` lines.
    fn config(&self, extra: &str) -> toml::Table {
        toml::from_str(&format!(
            "test_roots_dir = {:?}\n{extra}",
            self.roots_dir().display().to_string()
        ))
        .unwrap()
    }

    /// A v3 Milan report carrying `report_data`, changed by `edit` before it is signed.
    fn report(&self, report_data: &[u8; 64], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut r = vec![0u8; 0x4A0];
        let mut report_id = [0u8; 32];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut report_id).unwrap();
        r[0..4].copy_from_slice(&3u32.to_le_bytes());
        r[4..8].copy_from_slice(&1u32.to_le_bytes()); // guest SVN
        r[8..16].copy_from_slice(&0x30000u64.to_le_bytes()); // policy: SMT, reserved bit 17
        r[0x34..0x38].copy_from_slice(&1u32.to_le_bytes()); // ECDSA P-384 SHA-384
        r[0x38..0x40].copy_from_slice(&TCB); // current TCB
        r[0x50..0x90].copy_from_slice(report_data);
        r[0x90..0xC0].copy_from_slice(&MEASUREMENT);
        r[0xC0..0xE0].copy_from_slice(&HOST_DATA);
        r[0x140..0x160].copy_from_slice(&report_id);
        r[0x160..0x180].fill(0xff); // no migration agent
        r[0x180..0x188].copy_from_slice(&TCB); // reported TCB
        r[0x188] = 0x19; // CPUID family: Milan
        r[0x189] = 0x01;
        r[0x18A] = 0x01;
        r[0x1A0..0x1E0].copy_from_slice(&self.chip_id);
        r[0x1E0..0x1E8].copy_from_slice(&TCB); // committed
        r[0x1E8..0x1EB].copy_from_slice(&[21, 55, 1]);
        r[0x1EC..0x1EF].copy_from_slice(&[21, 55, 1]);
        r[0x1F0..0x1F8].copy_from_slice(&TCB); // launch
        edit(&mut r);
        let sig = self.key.sign(&SystemRandom::new(), &r[..0x2A0]).unwrap();
        let sig = sig.as_ref();
        // r and s little-endian in 72-byte fields.
        for (i, b) in sig[..48].iter().rev().enumerate() {
            r[0x2A0 + i] = *b;
        }
        for (i, b) in sig[48..].iter().rev().enumerate() {
            r[0x2E8 + i] = *b;
        }
        r
    }

    /// The host's certificate table with the VCEK (the configfs-tsm auxblob).
    fn cert_table(&self) -> Vec<u8> {
        sev_snp::encode_cert_table(&[("vcek", &self.vcek_der)])
    }

    /// Report ‖ certificate table, as the agent sends it.
    fn evidence(&self, report_data: &[u8; 64], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut e = self.report(report_data, edit);
        e.extend(self.cert_table());
        e
    }

    /// A CRL from the test ARK, valid for `days`, revoking the ASK if `revoke_ask`.
    fn crl(&self, out_dir: &Path, revoke_ask: bool, days: u32) {
        let d = self.dir.path();
        let ca = d.join(format!("ca-{revoke_ask}-{days}"));
        std::fs::create_dir_all(&ca).unwrap();
        std::fs::write(ca.join("index.txt"), "").unwrap();
        std::fs::write(ca.join("crlnumber"), "01\n").unwrap();
        std::fs::write(
            ca.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca=d\n[d]\ndatabase={}/index.txt\ncrlnumber={}/crlnumber\ndefault_md=sha384\ndefault_crl_days={days}\n",
                ca.display(),
                ca.display()
            ),
        )
        .unwrap();
        let cnf = ca.join("ca.cnf").display().to_string();
        if revoke_ask {
            ossl(
                d,
                &[
                    "ca",
                    "-config",
                    &cnf,
                    "-revoke",
                    "roots/ask.pem",
                    "-keyfile",
                    "ark.key",
                    "-cert",
                    "roots/ark.pem",
                ],
            );
        }
        let out = out_dir.join("amd.crl").display().to_string();
        let mut a = vec![
            "ca",
            "-config",
            &cnf,
            "-gencrl",
            "-keyfile",
            "ark.key",
            "-cert",
            "roots/ark.pem",
            "-out",
            &out,
        ];
        a.extend_from_slice(PSS);
        ossl(d, &a);
    }
}

fn refusal<T>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::Refused(m)) => m,
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
    let m = refusal(sev_snp::verify_offline(
        &ev,
        None,
        None,
        now(),
        &toml::Table::new(),
    ));
    assert_eq!(
        m,
        "no pinned AMD signing key named \"SEV-Milan\" (the ASK issuer); the VCEK does not chain to a pinned ARK"
    );
}

#[test]
fn checks_behind_the_signature_name_their_rule() {
    let c = TestChain::new();
    type Edit = Box<dyn Fn(&mut [u8])>;
    let cases: Vec<(Edit, String)> = vec![
        (
            Box::new(|r: &mut [u8]| r[0x1A0] ^= 1),
            format!(
                "report chip_id {}{} does not match the VCEK hwID {}",
                hex::encode([c.chip_id[0] ^ 1]),
                hex::encode(&c.chip_id[1..]),
                hex::encode(c.chip_id)
            ),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x187] = 210),
            "reported TCB (bl=3 tee=0 snp=8 ucode=210) differs from the TCB the VCEK certifies (bl=3 tee=0 snp=8 ucode=209)".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x189] = 0x11),
            "report CPUID family 0x19 model 0x11 is a Genoa processor, but the VCEK is for Milan".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x0A] |= 0x08),
            "guest policy 0xb0000 allows debugging (bit 19): the host can read and change guest memory".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x30] = 1),
            "report VMPL 1 is not allowed (allowed_vmpl = [0])".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x48] = 7 << 2),
            "the report is not signed (KEY_INFO.SIGNING_KEY = none)".into(),
        ),
        (
            Box::new(|r: &mut [u8]| r[0x48] = 1 << 2),
            "the report is signed by a VLEK, but neither the evidence nor the collateral holds a VLEK certificate".into(),
        ),
    ];
    for (edit, reason) in cases {
        let ev = c.evidence(&[7; 64], |r| edit(r));
        assert_eq!(refusal(offline(&c, &ev, "", None)), reason);
    }
    // Policy keys on a signed report.
    let ev = c.evidence(&[7; 64], |_| {});
    let m = refusal(offline(&c, &ev, "[min_tcb.milan]\nsnp = 9", None));
    assert_eq!(
        m,
        "reported TCB snp 8 is below the minimum 9 for Milan (min_tcb)"
    );
    let m = refusal(offline(&c, &ev, "min_guest_svn = 2", None));
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
    let m = refusal(sev_snp::verify_offline(
        &ev,
        Some(crl_dir.path()),
        None,
        later,
        &c.config(""),
    ));
    assert!(m.starts_with("CRL amd.crl expired at "), "{m}");
    // A CRL revoking the ASK.
    let crl_dir = tempfile::tempdir().unwrap();
    c.crl(crl_dir.path(), true, 1);
    let m = refusal(offline(&c, &ev, "", Some(crl_dir.path())));
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
    let m = refusal(offline(&c, &ev, "", Some(crl_dir.path())));
    assert_eq!(m, "CRL amd.crl signature does not verify under ARK-Milan");
}

/// One (outblob, auxblob) pair a fake provider served.
type Served = (Vec<u8>, Vec<u8>);

/// Answers configfs-tsm requests under `root` until dropped: signs a report for every
/// new entry's inblob, or replays a fixed answer.
struct FakeTsm {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Every (outblob, auxblob) served.
    served: Arc<Mutex<Vec<Served>>>,
}

impl FakeTsm {
    fn start(root: PathBuf, chain: Arc<TestChain>, replay: Option<(Vec<u8>, Vec<u8>)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(Vec::new()));
        let (s, sv) = (stop.clone(), served.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                    let p = e.path();
                    let inblob = std::fs::read(p.join("inblob")).unwrap_or_default();
                    if inblob.len() != 64 || p.join("outblob").exists() {
                        continue;
                    }
                    let (out, aux) = match &replay {
                        Some(r) => r.clone(),
                        None => (
                            chain.report(&inblob.clone().try_into().unwrap(), |_| {}),
                            chain.cert_table(),
                        ),
                    };
                    let _ = std::fs::write(p.join("auxblob"), &aux);
                    let _ = std::fs::write(p.join("outblob.tmp"), &out);
                    let _ = std::fs::rename(p.join("outblob.tmp"), p.join("outblob"));
                    sv.lock().unwrap().push((out, aux));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            thread: Some(thread),
            served,
        }
    }
}

impl Drop for FakeTsm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn protocol_through_the_agent_attestor_and_a_tsm_tree() {
    let chain = Arc::new(TestChain::new());
    let tsm = tempfile::tempdir().unwrap();
    let _fake = FakeTsm::start(tsm.path().to_path_buf(), chain.clone(), None);
    let verifier = sev_snp::SnpVerifier::from_config(&chain.config("")).unwrap();
    let mut attestor =
        sev_snp::SnpAttestor::with_client(TsmClient::new(tsm.path(), "sev_guest")).unwrap();
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
    let answer = attestor.answer(&challenge).unwrap();
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
    let m = refusal(session.resume(&answer, &ctx));
    assert!(
        m.starts_with("report_data does not match the expected binding"),
        "{m}"
    );
    // An answer for another agent key is refused.
    let VerifierStep::Challenge(challenge, session) = verifier.start(b"", &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let answer = attestor.answer(&challenge).unwrap();
    let other = spki();
    let ctx2 = AttestationContext {
        agent_public_key: &other,
        now: ctx.now,
    };
    assert_eq!(
        refusal(session.resume(&answer, &ctx2)),
        "the agent key changed between the challenge and the answer"
    );
    // A late answer is refused.
    let VerifierStep::Challenge(challenge, session) = verifier.start(b"", &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let answer = attestor.answer(&challenge).unwrap();
    let late = AttestationContext {
        agent_public_key: &key,
        now: ctx.now + Duration::from_secs(61),
    };
    assert!(refusal(session.resume(&answer, &late)).starts_with("challenge expired"));
    // A report for the right nonce but a key the agent did not bind (forged report_data).
    let VerifierStep::Challenge(challenge, session) = verifier.start(b"", &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let mut rd = [0u8; 64];
    rd.copy_from_slice(
        &ring::digest::digest(&ring::digest::SHA512, &challenge[..32]).as_ref()[..64],
    );
    let forged = chain.evidence(&rd, |_| {});
    assert!(refusal(session.resume(&forged, &ctx)).starts_with("report_data does not match"));
    // Each attestation of one launch gets the same node ID; another launch another.
    let VerifierStep::Challenge(challenge, session) = verifier.start(b"", &ctx).unwrap() else {
        panic!("expected a challenge");
    };
    let rd =
        ztid_agent_attestor::node_attestation::tsm::report_data_for_challenge(&challenge).unwrap();
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
    use ztid_agent_attestor::agent::node_client::connect;
    use ztid_agent_attestor::tls::{shared_roots, ServerSvidVerifier};
    use ztid_proto::node as pb;
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
    let shown: Value =
        serde_json::from_str(&server.cli_ok(&["--output", "json", "agent", "show", &agent_id]))
            .unwrap();
    let sels: Vec<String> = shown["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
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
