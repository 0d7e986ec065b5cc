//! A test-only SEV-SNP signer: an ARK → ASK → VCEK chain made with openssl (RSA-PSS-SHA384,
//! salt 48, VCEK serial 0, AMD's TCB and hwID extensions) that only a config naming it
//! in `test_roots_dir` trusts, reports signed with the VCEK key, and a fake configfs-tsm
//! provider that answers the agent's requests with such reports. Shared by the SNP,
//! KDS-fetch and multi-factor tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use ztid_verifier::sev_snp;

pub const PSS: &[&str] = &[
    "-sigopt",
    "rsa_padding_mode:pss",
    "-sigopt",
    "rsa_pss_saltlen:48",
    "-sigopt",
    "rsa_mgf1_md:sha384",
];
pub const MEASUREMENT: [u8; 48] = [0x5a; 48];
pub const HOST_DATA: [u8; 32] = [0x42; 32];
/// Milan TCB bytes: [bl, tee, 0, 0, 0, 0, snp, ucode].
pub const TCB: [u8; 8] = [3, 0, 0, 0, 0, 0, 8, 209];

pub fn ossl(dir: &Path, args: &[&str]) {
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
pub struct TestChain {
    pub dir: tempfile::TempDir,
    pub vcek_der: Vec<u8>,
    pub key: EcdsaKeyPair,
    pub chip_id: [u8; 64],
}

impl TestChain {
    #[allow(
        clippy::new_without_default,
        reason = "new() signs a fresh chain with openssl in a temp dir, not a default value"
    )]
    pub fn new() -> Self {
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

    pub fn roots_dir(&self) -> PathBuf {
        self.dir.path().join("roots")
    }

    /// `[attestors.sev_snp]` trusting this chain, plus `extra` lines.
    pub fn config(&self, extra: &str) -> toml::Table {
        toml::from_str(&format!(
            "test_roots_dir = {:?}\n{extra}",
            self.roots_dir().display().to_string()
        ))
        .unwrap()
    }

    /// A v3 Milan report carrying `report_data`, changed by `edit` before it is signed.
    pub fn report(&self, report_data: &[u8; 64], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
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
    pub fn cert_table(&self) -> Vec<u8> {
        sev_snp::encode_cert_table(&[("vcek", &self.vcek_der)])
    }

    /// Report ‖ certificate table, as the agent sends it.
    pub fn evidence(&self, report_data: &[u8; 64], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut e = self.report(report_data, edit);
        e.extend(self.cert_table());
        e
    }

    /// A CRL from the test ARK, valid for `days`, revoking the ASK if `revoke_ask`, issued
    /// when openssl runs: check it at a time read afterwards, or use [`TestChain::crl_at`].
    pub fn crl(&self, out_dir: &Path, revoke_ask: bool, days: u32) {
        self.gen_crl(out_dir, revoke_ask, days, None)
    }

    /// Like [`TestChain::crl`], with thisUpdate `this_update` (to the second) and
    /// nextUpdate `days` later: a test reads its clock once and both builds the CRL and
    /// verifies at that instant, so a second ticking in between cannot make the CRL "not
    /// yet valid".
    pub fn crl_at(&self, out_dir: &Path, revoke_ask: bool, this_update: SystemTime, days: u32) {
        let next_update = this_update + Duration::from_secs(u64::from(days) * 86400);
        self.gen_crl(out_dir, revoke_ask, days, Some((this_update, next_update)))
    }

    fn gen_crl(
        &self,
        out_dir: &Path,
        revoke_ask: bool,
        days: u32,
        dates: Option<(SystemTime, SystemTime)>,
    ) {
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
        let dates = dates.map(|(this, next)| (asn1_time(this), asn1_time(next)));
        if let Some((this, next)) = &dates {
            a.extend_from_slice(&["-crl_lastupdate", this, "-crl_nextupdate", next]);
        }
        a.extend_from_slice(PSS);
        ossl(d, &a);
    }
}

/// `t` as openssl's GeneralizedTime argument, UTC, to the second: YYYYMMDDHHMMSSZ.
fn asn1_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// One (outblob, auxblob) pair a fake provider served.
pub type Served = (Vec<u8>, Vec<u8>);

/// Answers configfs-tsm requests under `root` until dropped, as one guest (one launch:
/// every report carries the same REPORT_ID): signs a report for every new entry's
/// inblob, or replays a fixed answer.
pub struct FakeTsm {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Every (outblob, auxblob) served.
    pub served: Arc<Mutex<Vec<Served>>>,
}

impl FakeTsm {
    pub fn start(root: PathBuf, chain: Arc<TestChain>, replay: Option<(Vec<u8>, Vec<u8>)>) -> Self {
        Self::start_with(root, chain, replay, None)
    }

    /// A guest under an SVSM whose vTPM service has `manifest` (its EK `TPMT_PUBLIC`):
    /// requests naming the svsm service get a report over SHA-512(inblob ‖ manifest) and
    /// the manifest in `manifestblob`.
    pub fn start_svsm(root: PathBuf, chain: Arc<TestChain>, manifest: Vec<u8>) -> Self {
        Self::start_with(root, chain, None, Some(manifest))
    }

    fn start_with(
        root: PathBuf,
        chain: Arc<TestChain>,
        replay: Option<(Vec<u8>, Vec<u8>)>,
        manifest: Option<Vec<u8>>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(Vec::new()));
        let (s, sv) = (stop.clone(), served.clone());
        let mut launch = [0u8; 32];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut launch).unwrap();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                    let p = e.path();
                    let inblob = std::fs::read(p.join("inblob")).unwrap_or_default();
                    if inblob.len() != 64 || p.join("outblob").exists() {
                        continue;
                    }
                    let mut report_data: [u8; 64] = inblob.clone().try_into().unwrap();
                    let svsm = std::fs::read_to_string(p.join("service_provider"))
                        .is_ok_and(|v| v.trim() == "svsm");
                    if let (true, Some(m)) = (svsm, &manifest) {
                        assert_eq!(
                            std::fs::read_to_string(p.join("service_guid"))
                                .unwrap()
                                .trim(),
                            sev_snp::SVSM_VTPM_GUID
                        );
                        report_data = sev_snp::svsm_report_data(&report_data, m);
                        let _ = std::fs::write(p.join("manifestblob"), m);
                    }
                    let (out, aux) = match &replay {
                        Some(r) => r.clone(),
                        None => (
                            chain
                                .report(&report_data, |r| r[0x140..0x160].copy_from_slice(&launch)),
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
