//! Harness for ztid's end-to-end tests: starts the real `ztid-server` and
//! `ztid-agent` binaries as processes, waits on readiness (socket present and
//! health answered, never a fixed sleep), and kills what it started on drop.
#![forbid(unsafe_code)]

pub mod other_uid;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long any readiness wait may take before the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding the built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("ZTID_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a ztid binary; fails loudly if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`) or set ZTID_BIN_DIR",
        p.display()
    );
    p
}

/// Polls `f` every 25 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running child process that is killed when dropped.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its combined log file.
    pub log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn");
        Self { child, log }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Exit status if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while self.exited().is_none() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Result of one CLI call.
#[derive(Debug)]
pub struct CliResult {
    /// Exit success.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for CliResult {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A running ztid-server in its own temporary directory.
pub struct Server {
    /// The process.
    pub proc: Option<Proc>,
    /// Scratch directory (data dir is `dir/server`).
    pub dir: tempfile::TempDir,
    /// Trust domain.
    pub trust_domain: String,
    /// Node API port.
    pub port: u16,
    /// Extra `run` arguments.
    extra: Vec<String>,
}

impl Server {
    /// Starts a server for `trust_domain` and waits until its admin API answers.
    pub fn start(trust_domain: &str) -> Self {
        Self::start_with(trust_domain, &[])
    }

    /// Starts a server with extra `run` arguments.
    pub fn start_with(trust_domain: &str, extra: &[&str]) -> Self {
        let mut s = Self {
            proc: None,
            dir: tempfile::tempdir().expect("tempdir"),
            trust_domain: trust_domain.to_string(),
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.launch();
        s
    }

    /// Data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    /// Admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir().join("admin.sock")
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let log = self.dir.path().join(format!(
            "server-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let mut cmd = Command::new(bin("ztid-server"));
        cmd.arg("run")
            .arg("--trust-domain")
            .arg(&self.trust_domain)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--bind")
            .arg(self.addr())
            .args(&self.extra);
        let mut p = Proc::spawn(&mut cmd, log);
        wait_for("ztid-server to answer healthcheck", READY_TIMEOUT, || {
            if let Some(st) = p.exited() {
                panic!("ztid-server exited early ({st}):\n{}", p.log_text());
            }
            (self.admin_socket().exists() && self.cli(&["healthcheck"]).ok).then_some(())
        });
        self.proc = Some(p);
    }

    /// Stops the server (SIGTERM) and starts it again on the same data directory.
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
        self.launch();
    }

    /// Runs `ztid-server --admin-socket … ARGS`.
    pub fn cli(&self, args: &[&str]) -> CliResult {
        Command::new(bin("ztid-server"))
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .args(args)
            .output()
            .expect("run ztid-server cli")
            .into()
    }

    /// Runs a CLI verb that must succeed; returns its stdout trimmed.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let r = self.cli(args);
        assert!(r.ok, "ztid-server {args:?} failed: {}", r.stderr);
        r.stdout.trim().to_string()
    }

    /// What `agent show --output json` says of `agent`, and its selectors as strings.
    pub fn agent_record(&self, agent: &str) -> (serde_json::Value, Vec<String>) {
        let shown: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["agent", "show", agent, "--output", "json"]))
                .expect("agent show JSON");
        let selectors = shown["selectors"]
            .as_array()
            .expect("selectors")
            .iter()
            .map(|s| s.as_str().expect("selector string").to_string())
            .collect();
        (shown, selectors)
    }

    /// A new join token.
    pub fn token(&self) -> String {
        self.cli_ok(&["token", "generate"])
    }

    /// The bundle as PEM, written to a file in the scratch dir.
    pub fn bundle_file(&self) -> PathBuf {
        let pem = self.cli_ok(&["bundle", "show"]);
        let p = self.dir.path().join("bundle.pem");
        std::fs::write(&p, pem + "\n").expect("write bundle");
        p
    }

    /// Server log so far.
    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}

/// A running ztid-agent.
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Scratch directory.
    pub dir: tempfile::TempDir,
    /// The agent's SPIFFE ID.
    pub spiffe_id: String,
}

impl Agent {
    /// Workload API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// `unix:///…` endpoint.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts an agent with a fresh join token and waits until its socket serves.
    pub fn start(server: &Server) -> Self {
        let token = server.token();
        Self::start_with_token(server, &token).expect("agent starts")
    }

    /// Spawns an agent with `token`; `Err(log)` if it exits before serving.
    pub fn start_with_token(server: &Server, token: &str) -> Result<Self, String> {
        Self::start_with_token_args(server, token, &[])
    }

    /// Starts an agent with a fresh join token and extra `run` arguments.
    pub fn start_with_args(server: &Server, extra: &[&str]) -> Self {
        let token = server.token();
        Self::start_with_token_args(server, &token, extra).expect("agent starts")
    }

    /// Like [`Agent::start_with_token`], with extra `run` arguments.
    pub fn start_with_token_args(
        server: &Server,
        token: &str,
        extra: &[&str],
    ) -> Result<Self, String> {
        let mut args = vec!["--join-token", token];
        args.extend_from_slice(extra);
        Self::start_attested(server, &args)
    }

    /// Spawns an agent with `args` choosing its attestation (`--attestor tpm --tpm-tcti
    /// …`, `--join-token …`) and waits until its socket serves; `Err(log)` if it exits
    /// first.
    pub fn start_attested(server: &Server, args: &[&str]) -> Result<Self, String> {
        Self::start_in(server, other_uid::scratch_dir(), args)
    }

    /// Stops this agent and starts it again with the same data directory and `args`
    /// (a restart: it resumes with its persisted SVID and key).
    pub fn restart_with(self, server: &Server, args: &[&str]) -> Result<Self, String> {
        let Agent { proc, dir, .. } = self;
        drop(proc);
        let _ = std::fs::remove_file(dir.path().join("api.sock"));
        Self::start_in(server, dir, args)
    }

    fn start_in(server: &Server, dir: tempfile::TempDir, args: &[&str]) -> Result<Self, String> {
        let bundle = server.bundle_file();
        let mut cmd = Command::new(bin("ztid-agent"));
        cmd.arg("run")
            .arg("--server")
            .arg(server.addr())
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--trust-domain")
            .arg(&server.trust_domain)
            .arg("--socket")
            .arg(dir.path().join("api.sock"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--sync-interval")
            .arg("1")
            .args(args)
            // libtss2 logs every TPM error response to stderr; the agent reports its own.
            .env("TSS2_LOG", "all+none");
        let mut proc = Proc::spawn(&mut cmd, dir.path().join("agent.log"));
        let socket = dir.path().join("api.sock");
        let ready = {
            let start = Instant::now();
            loop {
                if let Some(st) = proc.exited() {
                    break Err(format!("ztid-agent exited ({st}):\n{}", proc.log_text()));
                }
                if socket.exists()
                    && agent_cli(&["healthcheck", "--socket", &socket.display().to_string()]).ok
                {
                    break Ok(());
                }
                if start.elapsed() > READY_TIMEOUT {
                    break Err(format!(
                        "ztid-agent not ready after {READY_TIMEOUT:?}:\n{}",
                        proc.log_text()
                    ));
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        };
        ready?;
        let pem = std::fs::read_to_string(dir.path().join("data/agent_svid.pem"))
            .map_err(|e| e.to_string())?;
        let der = pem::parse(pem).map_err(|e| e.to_string())?.into_contents();
        let spiffe_id = spiffe_id_of(&der);
        Ok(Self {
            proc,
            dir,
            spiffe_id,
        })
    }

    /// The agent's own SVID and key, from its data directory (to call the node API as it).
    pub fn own_svid(&self) -> ztid_agent::node_client::AgentSvid {
        let chain = pem::parse_many(
            std::fs::read(self.data_dir().join("agent_svid.pem")).expect("agent SVID"),
        )
        .expect("PEM")
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
        let key = std::fs::read(self.data_dir().join("agent_key.pk8")).expect("agent key");
        ztid_agent::node_client::AgentSvid::from_parts(chain, key).expect("agent SVID parses")
    }

    /// Runs `ztid-agent ARGS --socket <this agent>`.
    pub fn cli(&self, args: &[&str]) -> CliResult {
        let mut all: Vec<&str> = args.to_vec();
        let s = self.socket().display().to_string();
        all.push("--socket");
        all.push(&s);
        agent_cli(&all)
    }
}

/// Runs `ztid-agent ARGS`.
pub fn agent_cli(args: &[&str]) -> CliResult {
    Command::new(bin("ztid-agent"))
        .args(args)
        .output()
        .expect("run ztid-agent")
        .into()
}

/// Runs `ztid-agent api fetch x509 --output json --write <dir>` (a new process of this
/// uid) until it succeeds, waiting for `what`, and returns its JSON answer.
pub fn fetch_x509_as_process(agent: &Agent, what: &str, dir: &Path) -> serde_json::Value {
    let r = wait_for(what, READY_TIMEOUT, || {
        let r = agent.cli(&[
            "api",
            "fetch",
            "x509",
            "--output",
            "json",
            "--write",
            dir.to_str().unwrap(),
        ]);
        r.ok.then_some(r)
    });
    serde_json::from_str(&r.stdout).expect("json output")
}

/// `s` without ANSI escape sequences (CSI: ESC, parameters, a final letter), as the
/// agent's coloured log needs before matching.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The single URI SAN of a certificate.
pub fn spiffe_id_of(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).expect("certificate parses");
    let san = cert
        .subject_alternative_name()
        .expect("SAN ok")
        .expect("SAN present");
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .expect("URI SAN")
}

/// Creates a per-instance workload entry for the current uid under `agent`; returns its id.
pub fn entry_for_my_uid(server: &Server, agent: &Agent, spiffe_id: &str, extra: &[&str]) -> String {
    let uid = format!("unix:uid:{}", nix_uid());
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        &agent.spiffe_id,
        "--selector",
        &uid,
    ];
    args.extend_from_slice(extra);
    server.cli_ok(&args)
}

/// The uid of this process (from /proc, to stay free of unsafe code).
pub fn nix_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("uid")
}

/// Where the Python venv with py-spiffe lives: `ZTID_PYTHON`, else `<workspace>/.venv/bin/python`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("ZTID_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-deps.sh (it creates the venv with py-spiffe) or set ZTID_PYTHON",
        p.display()
    );
    p
}

/// Runs `openssl ARGS`; fails loudly if openssl is not installed.
pub fn openssl(args: &[&str]) -> CliResult {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed (scripts/install-deps.sh)")
        .into()
}

/// A PKCS#10 CSR for `spiffe_id` with a fresh P-256 key.
pub fn csr_for(spiffe_id: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id.to_string().try_into().expect("URI"),
    )];
    p.serialize_request(&key).expect("CSR").der().to_vec()
}

/// The server's bundle as DER certificates.
pub fn bundle_roots(server: &Server) -> Vec<Vec<u8>> {
    pem::parse_many(server.cli_ok(&["bundle", "show"]))
        .expect("PEM bundle")
        .into_iter()
        .map(|p| p.into_contents())
        .collect()
}

/// The shared SEV-SNP/TDX vectors for `kind` (`snp` or `tdx`): `../shared/vectors/<kind>`
/// beside the checkout, or `$ZTID_VECTORS/<kind>`. Panics, naming the path, when they
/// are missing: a test that needs them must fail loudly, not pass without them.
pub fn vectors(kind: &str) -> PathBuf {
    let root = std::env::var_os("ZTID_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors"));
    let dir = root.join(kind);
    assert!(
        dir.join("README.md").is_file(),
        "{kind} test vectors not found at {} (set ZTID_VECTORS to the shared vectors directory)",
        dir.display()
    );
    dir
}

/// An RFC 3339 time (`2025-06-01T00:00:00Z`) as a `SystemTime`, for pinning the clock.
pub fn at(rfc: &str) -> std::time::SystemTime {
    let t = time::OffsetDateTime::parse(rfc, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    std::time::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp() as u64)
}

/// The reason of an attestation refusal of `kind`; panics on success, on any other error
/// or on a refusal of another kind.
pub fn refusal<T>(
    kind: ztid_attestation::RefusalKind,
    r: Result<T, ztid_attestation::Error>,
) -> String {
    match r {
        Err(ztid_attestation::Error::Refused(m)) => {
            assert_eq!(m.kind, kind, "refusal kind of {:?}", m.detail);
            m.detail
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got success"),
    }
}
