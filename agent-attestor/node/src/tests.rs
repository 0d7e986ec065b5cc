//! The node side refuses a challenge that binds its evidence to a key other than its own
//! CSR key, for every method that makes configfs-tsm evidence and for each part of
//! `multi`, before the hardware is asked for anything.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ztid_attestation::RefusalKind::KeyMismatch;

use crate::agent_key::{csr_spki, AgentKey};
use crate::multi::{self, MultiAttestor};
use crate::sev_snp::{SnpAttestor, REPORT_LEN};
use crate::tdx::TdxAttestor;
use crate::tsm::{binding, challenge, new_nonce, TsmClient};
use crate::{Error, NodeAttestor};

/// A configfs-tsm stand-in in a plain directory: answers each entry's 64-byte inblob
/// with `make(inblob)` and counts the reports it made.
struct FakeTsm {
    dir: tempfile::TempDir,
    made: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeTsm {
    fn start(make: fn(&[u8]) -> Vec<u8>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (root, made, stop) = (
            dir.path().to_path_buf(),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (m, s) = (made.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for e in std::fs::read_dir(&root).unwrap().flatten() {
                    let inblob = std::fs::read(e.path().join("inblob")).unwrap_or_default();
                    if inblob.len() == 64
                        && !e.path().join("outblob").exists()
                        && std::fs::write(e.path().join("outblob"), make(&inblob)).is_ok()
                    {
                        m.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            dir,
            made,
            stop,
            thread: Some(thread),
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn client(&self, provider: &'static str) -> TsmClient {
        TsmClient::new(PathBuf::from(self.root()), provider).with_timeout(Duration::from_secs(5))
    }

    /// Reports made so far.
    fn made(&self) -> usize {
        self.made.load(Ordering::Relaxed)
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

/// An SEV-SNP "report": zeros but for report_data at 0x50..0x90.
fn snp_report(report_data: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; REPORT_LEN];
    r[0x50..0x90].copy_from_slice(report_data);
    r
}

/// A TDX "quote": a version 4 header of TEE type TDX, then report_data.
fn tdx_quote(report_data: &[u8]) -> Vec<u8> {
    let mut q = vec![0u8; 48];
    q[0] = 4;
    q[4] = 0x81;
    q.extend_from_slice(report_data);
    q
}

/// The SPKI the CA reads from a fresh software agent key's CSR (what its challenges name).
fn agent_spki() -> Vec<u8> {
    let key = AgentKey::generate_software().unwrap();
    csr_spki(&key.csr().unwrap()).unwrap()
}

fn assert_key_mismatch(r: Result<Vec<u8>, Error>) {
    match r {
        Err(e) => {
            assert_eq!(e.refusal_kind(), Some(KeyMismatch), "{e}");
            assert!(
                e.to_string()
                    .contains("a key other than this agent's CSR key"),
                "{e}"
            );
        }
        Ok(_) => panic!("a challenge for another key was answered"),
    }
}

#[test]
fn csr_spki_is_the_agent_keys_spki() {
    let key = AgentKey::generate_software().unwrap();
    assert_eq!(csr_spki(&key.csr().unwrap()).unwrap(), key.spki().unwrap());
    assert!(csr_spki(b"not a CSR").is_err());
}

/// A man in the middle (`--insecure-bootstrap`) opens its own stream with its own CSR
/// and forwards the CA's challenge, which names its key: the SEV-SNP attestor refuses
/// it without asking the PSP for a report, and answers a challenge for its own key.
#[test]
fn sev_snp_answers_only_challenges_for_its_own_key() {
    let tsm = FakeTsm::start(snp_report);
    let mut a = SnpAttestor::with_client(tsm.client("sev_guest")).unwrap();
    let (own, foreign) = (agent_spki(), agent_spki());
    let nonce = new_nonce().unwrap();

    let relayed = challenge(&nonce, &foreign);
    assert_key_mismatch(a.answer(&relayed, &own));
    assert!(a.check_challenge(&relayed, &own).is_err());
    assert_eq!(
        tsm.made(),
        0,
        "no report was made for the relayed challenge"
    );
    assert_eq!(std::fs::read_dir(tsm.root()).unwrap().count(), 0);

    let mine = challenge(&nonce, &own);
    a.check_challenge(&mine, &own).unwrap();
    let evidence = a.answer(&mine, &own).unwrap();
    assert_eq!(evidence[0x50..0x90], binding(&nonce, &own));
    assert_eq!(tsm.made(), 1);
}

/// The same for TDX quotes.
#[test]
fn tdx_answers_only_challenges_for_its_own_key() {
    let tsm = FakeTsm::start(tdx_quote);
    let mut a = TdxAttestor::with_client(tsm.client("tdx_guest")).unwrap();
    let (own, foreign) = (agent_spki(), agent_spki());
    let nonce = new_nonce().unwrap();

    assert_key_mismatch(a.answer(&challenge(&nonce, &foreign), &own));
    assert_eq!(tsm.made(), 0, "no quote was made for the relayed challenge");

    let quote = a.answer(&challenge(&nonce, &own), &own).unwrap();
    assert_eq!(quote[48..], binding(&nonce, &own));
    assert_eq!(tsm.made(), 1);
}

/// Each part of a `multi` challenge is checked, and all of them before any factor makes
/// evidence: one part for another key refuses the challenge with nothing signed, even
/// when an earlier part names the agent's own key.
#[test]
fn multi_answers_only_when_every_part_is_for_its_own_key() {
    let snp = FakeTsm::start(snp_report);
    let tdx = FakeTsm::start(tdx_quote);
    let mut a = MultiAttestor::new(vec![
        Box::new(SnpAttestor::with_client(snp.client("sev_guest")).unwrap()),
        Box::new(TdxAttestor::with_client(tdx.client("tdx_guest")).unwrap()),
    ])
    .unwrap();
    let (own, foreign) = (agent_spki(), agent_spki());
    let nonce = new_nonce().unwrap();
    let envelope = |snp_key: &[u8], tdx_key: &[u8]| {
        multi::encode(&multi::Envelope {
            parts: vec![
                multi::Part {
                    method: "sev-snp".into(),
                    data: challenge(&nonce, snp_key),
                },
                multi::Part {
                    method: "tdx".into(),
                    data: challenge(&nonce, tdx_key),
                },
            ],
        })
        .unwrap()
    };

    for relayed in [
        envelope(&own, &foreign),
        envelope(&foreign, &own),
        envelope(&foreign, &foreign),
    ] {
        assert_key_mismatch(a.answer(&relayed, &own));
        assert!(a.check_challenge(&relayed, &own).is_err());
    }
    assert_eq!(
        (snp.made(), tdx.made()),
        (0, 0),
        "no evidence was made for a relayed challenge"
    );

    let answer = a.answer(&envelope(&own, &own), &own).unwrap();
    let parts = multi::parse(&answer, "answer").unwrap().parts;
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].data[0x50..0x90], binding(&nonce, &own));
    assert_eq!(parts[1].data[48..], binding(&nonce, &own));
    assert_eq!((snp.made(), tdx.made()), (1, 1));
}
