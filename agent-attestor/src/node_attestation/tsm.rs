//! Confidential-VM evidence through Linux configfs-tsm, and the challenge that binds it.
//!
//! Both SEV-SNP and TDX guests get hardware-signed evidence from the same kernel interface,
//! `/sys/kernel/config/tsm/report` (configfs-tsm, Linux 6.7+): create a directory under the
//! root, write the 64 bytes of report data to `inblob`, read the report (SNP) or quote (TDX)
//! from `outblob`, and for SNP the host's certificate table from `auxblob`. [`TsmClient`]
//! does exactly that and nothing that needs configfs itself, so tests drive it from a plain
//! directory in which a fake provider answers (it waits for `outblob` to appear).
//!
//! # The challenge
//!
//! The CA's challenge is `nonce (32 random bytes) ‖ the DER SubjectPublicKeyInfo of the
//! agent's CSR`, and the agent puts `SHA-512(nonce ‖ SPKI)` into the 64 bytes of
//! report_data. The CA keeps the nonce only in the attestation session ([`Pending`]),
//! which is consumed by the answer (single use) and expires [`CHALLENGE_TTL`] after it
//! was issued, measured with the context's clock. The CA checks all 64 bytes, so the
//! evidence is fresh (the nonce) and belongs to the key that will carry the identity
//! (the SPKI): a report captured from another node or an earlier attestation, or one
//! made for another agent key, does not verify.
//!
//! The SPKI travels in the challenge because the agent-side trait has no access to the
//! agent's CSR; the CA builds the challenge from the CSR it received on the same
//! server-authenticated stream, so a challenge cannot name a key other than the one the
//! CA will certify.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use super::AttestationContext;
use crate::Error;

/// Length of the CA's nonce.
pub const NONCE_LEN: usize = 32;
/// How long a challenge stays valid.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// Longest SubjectPublicKeyInfo accepted in a challenge (an RSA-8192 key fits).
const MAX_SPKI_LEN: usize = 2048;

/// `SHA-512(nonce ‖ spki)`: the report_data the agent must put into its evidence.
pub fn binding(nonce: &[u8], spki: &[u8]) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(nonce);
    ctx.update(spki);
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The challenge bytes for `nonce` and the agent's SPKI.
pub fn challenge(nonce: &[u8; NONCE_LEN], spki: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(NONCE_LEN + spki.len());
    c.extend_from_slice(nonce);
    c.extend_from_slice(spki);
    c
}

/// Agent side: the report_data a challenge asks for, after checking its shape.
pub fn report_data_for_challenge(challenge: &[u8]) -> Result<[u8; 64], Error> {
    if challenge.len() <= NONCE_LEN || challenge.len() > NONCE_LEN + MAX_SPKI_LEN {
        return Err(Error::Protocol(format!(
            "challenge must be a {NONCE_LEN}-byte nonce followed by a SubjectPublicKeyInfo, got {} bytes",
            challenge.len()
        )));
    }
    let (nonce, spki) = challenge.split_at(NONCE_LEN);
    use x509_parser::prelude::FromDer;
    match x509_parser::x509::SubjectPublicKeyInfo::from_der(spki) {
        Ok(([], _)) => Ok(binding(nonce, spki)),
        Ok(_) => Err(Error::Protocol(
            "challenge has trailing bytes after the SubjectPublicKeyInfo".into(),
        )),
        Err(e) => Err(Error::Protocol(format!(
            "challenge does not carry a DER SubjectPublicKeyInfo: {e}"
        ))),
    }
}

/// 32 fresh random bytes.
pub fn new_nonce() -> Result<[u8; NONCE_LEN], Error> {
    let mut n = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| Error::Config("the system random generator failed".into()))?;
    Ok(n)
}

/// CA side: the state of one issued challenge.
#[derive(Clone)]
pub struct Pending {
    nonce: [u8; NONCE_LEN],
    spki_digest: [u8; 32],
    issued_at: SystemTime,
}

impl Pending {
    /// A fresh challenge for the agent key in `ctx`: the state to keep and the bytes to send.
    pub fn issue(ctx: &AttestationContext<'_>) -> Result<(Self, Vec<u8>), Error> {
        if ctx.agent_public_key.is_empty() {
            return Err(Error::Protocol(
                "no agent public key to bind the evidence to".into(),
            ));
        }
        let nonce = new_nonce()?;
        let pending = Self {
            nonce,
            spki_digest: sha256(ctx.agent_public_key),
            issued_at: ctx.now,
        };
        Ok((pending, challenge(&nonce, ctx.agent_public_key)))
    }

    /// The report_data the answer must carry, if the challenge is still valid for
    /// this context: not expired, and the same agent key as when it was issued.
    pub fn expected_report_data(&self, ctx: &AttestationContext<'_>) -> Result<[u8; 64], Error> {
        let age = ctx
            .now
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO);
        if age > CHALLENGE_TTL {
            return Err(Error::Refused(format!(
                "challenge expired: answered after {}s, challenges are valid for {}s",
                age.as_secs(),
                CHALLENGE_TTL.as_secs()
            )));
        }
        if !bool::from(sha256(ctx.agent_public_key).ct_eq(&self.spki_digest)) {
            return Err(Error::Refused(
                "the agent key changed between the challenge and the answer".into(),
            ));
        }
        Ok(binding(&self.nonce, ctx.agent_public_key))
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, b).as_ref());
    out
}

/// Compares report_data with the expected value over all 64 bytes, in constant time.
pub fn check_report_data(actual: &[u8; 64], expected: &[u8; 64]) -> Result<(), Error> {
    if bool::from(actual.ct_eq(expected)) {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "report_data does not match the expected binding (SHA-512 of the CA's nonce and the agent key): got {}",
            hex::encode(actual)
        )))
    }
}

/// Pads an operator-supplied expected report_data (shorter values are zero-padded, as
/// tools that bind a 32-byte hash do) to 64 bytes.
pub fn pad_report_data(rd: &[u8]) -> Result<[u8; 64], Error> {
    if rd.len() > 64 {
        return Err(Error::Config(format!(
            "expected report_data is {} bytes; report_data has 64",
            rd.len()
        )));
    }
    let mut out = [0u8; 64];
    out[..rd.len()].copy_from_slice(rd);
    Ok(out)
}

/// RFC 3339 rendering of Unix seconds, for refusal reasons.
pub(crate) fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// Evidence files may hold hex (as some tools write reports); anything else is binary.
pub(crate) fn maybe_hex(b: &[u8]) -> Vec<u8> {
    let t: Vec<u8> = b
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if !t.is_empty() && t.len().is_multiple_of(2) && t.iter().all(|c| c.is_ascii_hexdigit()) {
        if let Ok(d) = hex::decode(&t) {
            return d;
        }
    }
    b.to_vec()
}

/// One report from configfs-tsm.
#[derive(Debug, Clone)]
pub struct TsmReport {
    /// The report (SNP) or quote (TDX).
    pub outblob: Vec<u8>,
    /// Auxiliary data: the SNP certificate table, when the host supplies one.
    pub auxblob: Option<Vec<u8>>,
    /// The provider that answered (`sev_guest`, `tdx_guest`), when the tree says.
    pub provider: Option<String>,
    /// The service manifest, when a service (an SVSM service) produced the report.
    pub manifest: Option<Vec<u8>>,
}

/// An SVSM service to ask configfs-tsm for a report through (SEV-SNP guests running
/// under an SVSM): the report is made at VMPL 0 by the SVSM, over SHA-512(inblob ‖
/// manifest).
#[derive(Debug, Clone)]
pub struct TsmService {
    /// `service_provider` (`svsm`).
    pub provider: String,
    /// `service_guid`.
    pub guid: String,
    /// `service_manifest_version`.
    pub manifest_version: u32,
}

/// A configfs-tsm report client rooted at `root` (normally `/sys/kernel/config/tsm/report`).
#[derive(Debug, Clone)]
pub struct TsmClient {
    root: PathBuf,
    provider: &'static str,
    privlevel: Option<u32>,
    service: Option<TsmService>,
    timeout: Duration,
}

impl TsmClient {
    /// A client expecting reports from `provider` (`sev_guest` or `tdx_guest`).
    pub fn new(root: impl Into<PathBuf>, provider: &'static str) -> Self {
        Self {
            root: root.into(),
            provider,
            privlevel: None,
            service: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// Asks for a report at this privilege level (SNP VMPL); unset leaves the kernel default (0).
    pub fn with_privlevel(mut self, level: u32) -> Self {
        self.privlevel = Some(level);
        self
    }

    /// Asks for reports through an SVSM service (and reads its manifest).
    pub fn with_service(mut self, service: TsmService) -> Self {
        self.service = Some(service);
        self
    }

    /// How long to wait for `outblob` in a tree that is not configfs (tests).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Gets one report carrying `report_data`.
    pub fn report(&self, report_data: &[u8; 64]) -> Result<TsmReport, Error> {
        if !self.root.is_dir() {
            return Err(Error::Config(format!(
                "configfs-tsm report directory {} does not exist (is this a confidential VM, with configfs mounted?)",
                self.root.display()
            )));
        }
        // A concurrent writer to the same entry bumps `generation`; retry then.
        for _ in 0..3 {
            let entry = Entry::create(&self.root)?;
            if let Some(p) = read_opt(&entry.path.join("provider"))? {
                let p = String::from_utf8_lossy(&p).trim().to_string();
                if !p.is_empty() && p != self.provider {
                    return Err(Error::Config(format!(
                        "configfs-tsm provider is {p:?}, but this attestor needs {:?}",
                        self.provider
                    )));
                }
            }
            if let Some(level) = self.privlevel {
                write(&entry.path.join("privlevel"), level.to_string().as_bytes())?;
            }
            if let Some(s) = &self.service {
                write(&entry.path.join("service_provider"), s.provider.as_bytes())?;
                write(&entry.path.join("service_guid"), s.guid.as_bytes())?;
                write(
                    &entry.path.join("service_manifest_version"),
                    s.manifest_version.to_string().as_bytes(),
                )?;
            }
            write(&entry.path.join("inblob"), report_data)?;
            let gen_before = read_generation(&entry.path)?;
            let outblob = self.read_outblob(&entry.path)?;
            let auxblob = read_opt(&entry.path.join("auxblob"))?.filter(|a| !a.is_empty());
            let manifest = match &self.service {
                Some(_) => Some(
                    read_opt(&entry.path.join("manifestblob"))?
                        .filter(|m| !m.is_empty())
                        .ok_or_else(|| {
                            Error::Protocol(
                                "configfs-tsm gave no service manifest (manifestblob)".into(),
                            )
                        })?,
                ),
                None => None,
            };
            let provider = read_opt(&entry.path.join("provider"))?
                .map(|p| String::from_utf8_lossy(&p).trim().to_string());
            if read_generation(&entry.path)? != gen_before {
                continue;
            }
            return Ok(TsmReport {
                outblob,
                auxblob,
                provider,
                manifest,
            });
        }
        Err(Error::Protocol(
            "configfs-tsm report kept changing under concurrent writers".into(),
        ))
    }

    fn read_outblob(&self, dir: &Path) -> Result<Vec<u8>, Error> {
        // configfs generates the report when outblob is read; a plain directory (tests)
        // has it only once the fake provider wrote it, so wait for that, within limits.
        let path = dir.join("outblob");
        let deadline = Instant::now() + self.timeout;
        loop {
            let missing = match std::fs::read(&path) {
                Ok(b) if !b.is_empty() => return Ok(b),
                Ok(_) => true,
                Err(e) if e.kind() == ErrorKind::NotFound => true,
                Err(e) => {
                    return Err(Error::Io {
                        context: format!("reading {}", path.display()),
                        source: e,
                    })
                }
            };
            if missing && Instant::now() >= deadline {
                return Err(Error::Protocol(format!(
                    "configfs-tsm gave no report in {} within {}s",
                    path.display(),
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One report directory, removed on drop.
struct Entry {
    path: PathBuf,
}

impl Entry {
    fn create(root: &Path) -> Result<Self, Error> {
        let mut id = [0u8; 8];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| Error::Config("the system random generator failed".into()))?;
        let path = root.join(format!("ztid-{}", hex::encode(id)));
        std::fs::create_dir(&path).map_err(Error::io(format!("creating {}", path.display())))?;
        Ok(Self { path })
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // configfs removes an entry with rmdir (its attribute files cannot be unlinked);
        // a plain directory needs its files removed first.
        if std::fs::remove_dir(&self.path).is_err() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn write(path: &Path, data: &[u8]) -> Result<(), Error> {
    std::fs::write(path, data).map_err(Error::io(format!("writing {}", path.display())))
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

fn read_generation(dir: &Path) -> Result<Option<String>, Error> {
    Ok(read_opt(&dir.join("generation"))?.map(|g| String::from_utf8_lossy(&g).trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn ctx(key: &[u8], secs: u64) -> AttestationContext<'_> {
        AttestationContext {
            agent_public_key: key,
            now: UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    fn spki() -> Vec<u8> {
        use rcgen::PublicKeyData;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        kp.subject_public_key_info()
    }

    #[test]
    fn challenge_binding_round_trip() {
        let key = spki();
        let (pending, c) = Pending::issue(&ctx(&key, 1000)).unwrap();
        let rd = report_data_for_challenge(&c).unwrap();
        assert_eq!(pending.expected_report_data(&ctx(&key, 1060)).unwrap(), rd);
        check_report_data(&rd, &rd).unwrap();
        let mut other = rd;
        other[63] ^= 1;
        let e = check_report_data(&other, &rd).unwrap_err().to_string();
        assert!(e.contains("report_data does not match"), "{e}");
    }

    #[test]
    fn challenge_expires_and_is_bound_to_the_key() {
        let key = spki();
        let (pending, _) = Pending::issue(&ctx(&key, 1000)).unwrap();
        let e = pending
            .expected_report_data(&ctx(&key, 1061))
            .unwrap_err()
            .to_string();
        assert!(e.contains("challenge expired"), "{e}");
        let other = spki();
        let e = pending
            .expected_report_data(&ctx(&other, 1001))
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent key changed"), "{e}");
    }

    #[test]
    fn malformed_challenges_are_refused() {
        assert!(report_data_for_challenge(&[0u8; 32]).is_err());
        let mut c = vec![0u8; 32];
        c.extend_from_slice(b"not der");
        assert!(report_data_for_challenge(&c).is_err());
    }

    #[test]
    fn client_from_a_plain_directory() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_path_buf();
        // A fake provider: answers every entry with inblob reversed.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let fake = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                for e in std::fs::read_dir(&r).unwrap().flatten() {
                    let inb = std::fs::read(e.path().join("inblob")).unwrap_or_default();
                    if inb.len() == 64 && !e.path().join("outblob").exists() {
                        let mut out = inb.clone();
                        out.reverse();
                        std::fs::write(e.path().join("auxblob"), b"aux").unwrap();
                        std::fs::write(e.path().join("outblob"), out).unwrap();
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let client = TsmClient::new(root.path(), "sev_guest");
        let mut rd = [0u8; 64];
        rd[0] = 7;
        let rep = client.report(&rd).unwrap();
        assert_eq!(rep.outblob[63], 7);
        assert_eq!(rep.auxblob.as_deref(), Some(&b"aux"[..]));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        fake.join().unwrap();
        // The entry is gone.
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        // A missing root is a configuration error.
        let e = TsmClient::new(root.path().join("nope"), "tdx_guest")
            .report(&rd)
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
    }
}
