//! Confidential-VM evidence through Linux configfs-tsm: [`TsmClient`] creates a report
//! directory, writes report data to `inblob` and reads `outblob` (and `auxblob`). The
//! challenge format is `ztid_attestation::tsm`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
pub use ztid_attestation::tsm::*;
use ztid_attestation::Error;

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
                        // The client removes the entry once it has read it, so it may be
                        // going away under us: a failed write is that, not an error.
                        if std::fs::write(e.path().join("auxblob"), b"aux").is_ok() {
                            let _ = std::fs::write(e.path().join("outblob"), out);
                        }
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
