//! A PostgreSQL server of a test's own (feature `postgres`): `initdb` into a temporary
//! directory, `postgres` on a free loopback port and a Unix socket in that directory,
//! a database and a password role for the code under test, stopped and removed on drop.
//! Never the system service: the binaries come from `PATH` or Debian's
//! `/usr/lib/postgresql/*/bin` (package `postgresql`, installed by
//! `scripts/install-deps.sh`).
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI does), every
//! server-side program (`initdb`, `postgres`, `pg_ctl`) runs as `nobody` (uid and gid
//! 65534, the uid `ztid-tests`' other-uid tests use), in a directory it owns under a
//! temporary directory every uid can traverse; `psql` stays in this process's uid and
//! connects as the superuser over the socket (trust for local connections only). TCP
//! connections need the role's password (scram-sha-256).
//!
//! With [`TestPostgres::start_with_tls`] the server also speaks TLS with a certificate
//! for `127.0.0.1` and `localhost` signed by a test CA, so a client can verify it
//! (`sslmode=verify-full`) against [`TestPostgres::ca_cert_path`].
//!
//! Waits are polls with a deadline (`pg_isready`), never fixed sleeps. Panics say what
//! failed and show the end of the server log.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The uid and gid the server runs as when this process is root.
const NOBODY: u32 = 65534;
/// The role and database the code under test uses.
pub const USER: &str = "ztid";
/// The database the code under test uses.
pub const DATABASE: &str = "ztid";
/// The superuser `initdb` creates (local socket, trust).
pub const SUPERUSER: &str = "ztid_admin";
/// How long a start or stop may take before the harness gives up.
const DEADLINE: Duration = Duration::from_secs(60);

/// One running (or stopped) PostgreSQL server.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    port: u16,
    password: String,
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

/// The test CA and the server's certificate files.
struct TlsFiles {
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// Whether this process runs as root (then the server runs as `nobody`).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: the first of `PATH` that has
/// all three, else the newest `/usr/lib/postgresql/<version>/bin`.
pub fn bin_dir() -> PathBuf {
    let tools = ["initdb", "pg_ctl", "postgres", "pg_isready"];
    let has_all = |d: &Path| tools.iter().all(|t| d.join(t).is_file());
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(d) = std::env::split_paths(&path).find(|d| has_all(d)) {
            return d;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_all(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d).unwrap_or_else(|| {
        panic!(
            "PostgreSQL is missing: initdb, pg_ctl, postgres and pg_isready are neither on PATH nor in \
             /usr/lib/postgresql/*/bin; the PostgreSQL tests need Debian's `postgresql` (run scripts/install-deps.sh)"
        )
    })
}

/// `psql` (the client): beside the server binaries or on `PATH`.
fn psql(bin: &Path) -> PathBuf {
    let beside = bin.join("psql");
    if beside.is_file() {
        return beside;
    }
    PathBuf::from("psql")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

/// A temporary directory under a root every uid can traverse (`$TMPDIR`, `/tmp`,
/// `/var/tmp`), mode 0755.
fn reachable_tempdir() -> tempfile::TempDir {
    let traversable = |d: &Path| {
        d.ancestors()
            .all(|a| std::fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
    };
    let root = [
        std::env::temp_dir(),
        PathBuf::from("/tmp"),
        PathBuf::from("/var/tmp"),
    ]
    .into_iter()
    .find(|d| d.is_dir() && (!is_root() || traversable(d)))
    .expect("a temporary directory the server's uid can traverse");
    let dir = tempfile::Builder::new()
        .prefix("ztid-pg-")
        .tempdir_in(root)
        .expect("temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("temporary directory mode");
    dir
}

/// A directory (or file) the server's uid owns, with `mode`.
fn own(path: &Path, mode: u32) {
    if is_root() {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn random_password() -> String {
    // Not a secret worth a CSPRNG dependency: unique per server, never reused.
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl TestPostgres {
    /// Starts a server without TLS (loopback TCP and a Unix socket).
    pub fn start() -> Self {
        Self::init(false)
    }

    /// Starts a server that also speaks TLS with a certificate under a test CA.
    pub fn start_with_tls() -> Self {
        Self::init(true)
    }

    fn init(tls: bool) -> Self {
        let bin = bin_dir();
        let dir = reachable_tempdir();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        for d in [&data, &socket_dir] {
            std::fs::create_dir(d).expect("create directory");
        }
        own(&data, 0o700);
        own(&socket_dir, 0o755);
        let pwfile = dir.path().join("superuser-password");
        std::fs::write(&pwfile, random_password()).expect("superuser password file");
        own(&pwfile, 0o600);
        check(
            "initdb",
            Self::server_command(&bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "--username",
                    SUPERUSER,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .output(),
        );
        let tls = tls.then(|| Self::write_tls_files(dir.path()));
        let mut pg = Self {
            log: dir.path().join("postgres.log"),
            dir,
            bin,
            data,
            socket_dir,
            port: 0,
            password: random_password(),
            tls,
            child: None,
        };
        // A free port can be taken between the probe and the server's bind: try others.
        let mut tries = 0;
        loop {
            pg.port = free_port();
            match pg.try_start() {
                Ok(()) => break,
                Err(log) if tries < 3 && log.contains("could not bind") => tries += 1,
                Err(log) => panic!("postgres did not start:\n{log}"),
            }
        }
        pg.psql_as_superuser(
            "postgres",
            &format!("CREATE ROLE {USER} LOGIN PASSWORD '{}'", pg.password),
        );
        pg.psql_as_superuser(
            "postgres",
            &format!("CREATE DATABASE {DATABASE} OWNER {USER}"),
        );
        pg
    }

    /// A command running a server-side program as the server's uid.
    fn server_command(program: &Path) -> Command {
        let mut c = Command::new(program);
        if is_root() {
            c.uid(NOBODY).gid(NOBODY).env("HOME", "/");
        }
        c.current_dir("/");
        c
    }

    fn write_tls_files(dir: &Path) -> TlsFiles {
        let (ca_pem, server_pem, key_pem) = test_ca_and_server_cert("ztid test PostgreSQL CA");
        let files = TlsFiles {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        };
        std::fs::write(&files.ca_cert, ca_pem).expect("CA file");
        std::fs::write(&files.server_cert, server_pem).expect("server certificate");
        std::fs::write(&files.server_key, key_pem).expect("server key");
        own(&files.server_cert, 0o644);
        own(&files.server_key, 0o600);
        files
    }

    /// Starts the server on `self.port`; on failure returns the server log.
    fn try_start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let mut cmd = Self::server_command(&self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Tests only: no fsync (a killed server keeps what the kernel has, which is
            // every commit: synchronous_commit stays on), more connections than the
            // default for several stores with their pools, listeners and leaders.
            .args(["-c", "fsync=off", "-c", "max_connections=300"])
            .args([
                "-c",
                "shared_buffers=32MB",
                "-c",
                "log_min_messages=warning",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(t) = &self.tls {
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", t.server_cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", t.server_key.display()));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run postgres: {e}"))?;
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("postgres exited ({status}):\n{}", self.log_tail()));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-t", "1", "-d", "postgres"])
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-U")
                .arg(SUPERUSER)
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "postgres not ready after {DEADLINE:?}:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last 4 KiB of the server log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read(&self.log).unwrap_or_default();
        let from = log.len().saturating_sub(4096);
        String::from_utf8_lossy(&log[from..]).into_owned()
    }

    /// `postgres://ztid@127.0.0.1:PORT/ztid?sslmode=…`: no password in it. Without TLS
    /// `sslmode=disable` (loopback); with TLS `verify-full` against the test CA.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    /// [`url`](Self::url) for another database of the same server.
    pub fn url_for(&self, database: &str) -> String {
        let base = format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port);
        match &self.tls {
            Some(t) => format!(
                "{base}?sslmode=verify-full&sslrootcert={}",
                t.ca_cert.display()
            ),
            None => format!("{base}?sslmode=disable"),
        }
    }

    /// Creates a database owned by the test role (a fresh one per test on a shared
    /// server) and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "database name {name:?}: lowercase letters, digits and _ only"
        );
        self.psql_as_superuser("postgres", &format!("CREATE DATABASE {name} OWNER {USER}"));
        self.url_for(name)
    }

    /// Runs SQL as the superuser in database `database` (see [`psql`](Self::psql)).
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        self.psql_as_superuser(database, sql)
    }

    /// The same database over the Unix socket (no TLS there).
    pub fn socket_url(&self) -> String {
        format!(
            "postgres://{USER}@{}:{}/{DATABASE}",
            percent_encode_path(&self.socket_dir),
            self.port
        )
    }

    /// The role's password (for `password_file` or `ZTID_DATASTORE_PASSWORD`).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The test CA that signed the server certificate (TLS servers only).
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_cert.as_path())
    }

    /// The server's temporary directory (for files a test writes beside it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let out = Self::server_command(&self.bin.join("pg_ctl"))
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "-m", mode])
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            // pg_ctl could not stop it: do not leave a server behind.
            let _ = child.kill();
        }
        let _ = child.wait();
        // Backends of an immediate stop exit on their own; wait until the socket is gone.
        let deadline = Instant::now() + DEADLINE;
        while self.data.join("postmaster.pid").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A clean stop (`pg_ctl stop -m fast`): open sessions are ended, the server shuts
    /// down. [`start`](Self::start_again) brings it back on the same port.
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    /// A crash (`pg_ctl stop -m immediate`): every process quits without a shutdown
    /// checkpoint; the next start runs crash recovery.
    pub fn kill(&mut self) {
        self.pg_ctl_stop("immediate");
    }

    /// Starts a stopped server again, on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        if let Err(log) = self.try_start() {
            panic!("postgres did not start again:\n{log}");
        }
    }

    /// Stops (fast) and starts again.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    fn psql_as_superuser(&self, database: &str, sql: &str) -> String {
        let out = check(
            "psql",
            Command::new(psql(&self.bin))
                .arg("-h")
                .arg(&self.socket_dir)
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-U", SUPERUSER, "-d", database])
                .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql])
                .output(),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs SQL as `role` (its password `password`) in `database`, over TCP like the
    /// code under test, and returns psql's unaligned, tuples-only output, trimmed.
    pub fn psql_as(&self, role: &str, password: &str, database: &str, sql: &str) -> String {
        let out = check(
            "psql",
            Command::new(psql(&self.bin))
                .env("PGPASSWORD", password)
                .env("PGSSLMODE", "prefer")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", role, "-d", database])
                .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql])
                .output(),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs SQL as the superuser in the test database and returns psql's unaligned,
    /// tuples-only output, trimmed (one row a line, columns split by `|`).
    pub fn psql(&self, sql: &str) -> String {
        self.psql_as_superuser(DATABASE, sql)
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.pg_ctl_stop("immediate");
    }
}

fn percent_encode_path(p: &Path) -> String {
    let mut out = String::new();
    for b in p.as_os_str().as_encoded_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(*b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A self-signed test CA and a server certificate it signed for `127.0.0.1` and
/// `localhost`: (CA PEM, server certificate PEM, server key PEM). Another call gives
/// another CA, which is how a test gets a CA that does not match.
pub fn test_ca_and_server_cert(ca_name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    params
        .distinguished_name
        .push(DnType::CommonName, "ztid test PostgreSQL");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_restarts_survives_a_kill_and_cleans_up() {
        let mut pg = TestPostgres::start_with_tls();
        let dir = pg.dir().to_path_buf();
        assert!(pg.url().contains("sslmode=verify-full"));
        assert!(!pg.url().contains(pg.password()));
        pg.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (1);");
        pg.restart();
        pg.psql("INSERT INTO t VALUES (2);");
        pg.kill();
        assert!(!pg.is_running());
        pg.start_again();
        assert_eq!(pg.psql("SELECT sum(v) FROM t"), "3");
        assert_eq!(
            pg.psql("SELECT rolname FROM pg_roles WHERE rolname = 'ztid'"),
            "ztid"
        );
        drop(pg);
        assert!(!dir.exists(), "the data directory is removed on drop");
    }
}
