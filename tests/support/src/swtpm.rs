//! Used by `tests/tests/{tpm_*,hsm_tpm,multi_factor}.rs`, `hsm/tests/tpm_keys.rs` and
//! the TPM benchmark: one `swtpm socket` per test, on its own ports and state
//! directory, provisioned by `tests/tpm/provision.sh` under a per-test (or shared, for
//! "same manufacturer") project-local swtpm-localca. Killed on drop. Fails loudly when
//! swtpm is missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fails the test (never skips) if a tool the TPM tests need is missing.
pub fn require_tools() {
    for tool in [
        "swtpm",
        "swtpm_setup",
        "swtpm_localca",
        "certtool",
        "tpm2_pcrextend",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is missing: the TPM tests need swtpm, swtpm-tools, gnutls-bin and tpm2-tools; run scripts/install-deps.sh"
        );
    }
}

/// A local manufacturer CA (swtpm-localca state), created on first provisioning.
pub struct LocalCa {
    /// Its directory (keys included: never hand this one to the server).
    pub dir: PathBuf,
}

impl LocalCa {
    /// A CA under `parent/name`.
    pub fn new(parent: &Path, name: &str) -> Self {
        Self {
            dir: parent.join(name),
        }
    }

    /// Directory with the CA certificates only (root and issuer): the server's `--tpm-ek-ca`.
    pub fn trust_dir(&self) -> PathBuf {
        self.dir.join("trust")
    }
}

/// A running swtpm.
pub struct Swtpm {
    child: Option<Child>,
    /// TPM state directory.
    pub state: PathBuf,
    /// Data port.
    pub port: u16,
    /// Control port.
    pub ctrl: u16,
    log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn script() -> PathBuf {
    // This crate is tests/support; the script stays beside the TPM tests.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tpm/provision.sh")
}

impl Swtpm {
    /// Provisions a new TPM state in `state` under `ca` and starts swtpm on it.
    pub fn provision(ca: &LocalCa, state: &Path) -> Self {
        require_tools();
        let out = Command::new("bash")
            .arg(script())
            .arg(&ca.dir)
            .arg(state)
            .output()
            .expect("run tests/tpm/provision.sh");
        assert!(
            out.status.success(),
            "provisioning swtpm failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self::start(state)
    }

    /// Starts swtpm on a state directory (a fresh, unprovisioned TPM if it is empty).
    pub fn start(state: &Path) -> Self {
        require_tools();
        std::fs::create_dir_all(state).expect("swtpm state dir");
        for _ in 0..20 {
            // libtss2's swtpm TCTI expects the control port right after the data port.
            let port = free_port();
            if port == u16::MAX || std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_err() {
                continue;
            }
            let ctrl = port + 1;
            let log = state.join(format!("swtpm-{port}.log"));
            let child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .arg("--log")
                .arg(format!("file={},level=1", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn swtpm");
            let mut s = Self {
                child: Some(child),
                state: state.to_path_buf(),
                port,
                ctrl,
                log,
            };
            if s.wait_ready() {
                return s;
            }
            s.stop();
        }
        panic!("swtpm did not start on {}", state.display());
    }

    fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false; // exited (port taken?)
            }
            // The control port answers without taking the one data connection swtpm serves.
            if std::net::TcpStream::connect(("127.0.0.1", self.ctrl)).is_ok()
                && std::net::TcpStream::connect_timeout(
                    &([127, 0, 0, 1], self.port).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The TCTI string for this TPM.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Runs a tpm2-tools command against this TPM (in `cwd`).
    pub fn tpm2(&self, cwd: &Path, tool: &str, args: &[&str]) -> Output {
        Command::new(tool)
            .args(args)
            .current_dir(cwd)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .env("TSS2_LOG", "all+none")
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e} (run scripts/install-deps.sh)"))
    }

    /// Like [`Swtpm::tpm2`], asserting success; returns stdout.
    pub fn tpm2_ok(&self, cwd: &Path, tool: &str, args: &[&str]) -> String {
        let o = self.tpm2(cwd, tool, args);
        assert!(
            o.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Extends sha256 PCR `pcr` with `digest_hex` (tpm2_pcrextend).
    pub fn pcr_extend(&self, pcr: u8, digest_hex: &str) {
        self.tpm2_ok(
            &self.state,
            "tpm2_pcrextend",
            &[&format!("{pcr}:sha256={digest_hex}")],
        );
    }

    /// Transient objects and loaded sessions left in the TPM (tpm2_getcap).
    pub fn leftovers(&self) -> String {
        let t = self.tpm2_ok(&self.state, "tpm2_getcap", &["handles-transient"]);
        let s = self.tpm2_ok(&self.state, "tpm2_getcap", &["handles-loaded-session"]);
        format!("{}{}", t.trim(), s.trim())
    }

    /// swtpm's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops swtpm (the state stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}
