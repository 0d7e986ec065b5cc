//! ztid-ca on PostgreSQL (issue 13), against a PostgreSQL server the test harness
//! starts (`initdb` into a temporary directory): one server shared by the tests that
//! run at the same time, a fresh database of its own for each test. One test binary
//! (one link, not one per file); each module is one area:
//!
//! - [`server`]: `CaCore` on PostgreSQL, alone and as several servers on one database;
//! - [`audit`]: `ztid-server audit verify` and `accept-rollback` against each server's
//!   own anchor in the database;
//! - [`admin_authz`]: an admin SVID of one server admitted by every server of its
//!   cluster, and only by those;
//! - [`server_list`]: `ztid-server server list`;
//! - [`migrate`]: `datastore migrate` from sled into PostgreSQL.
//!
//! Run one area with `cargo test -p ztid-ca --test postgres <module>::`. The datastore
//! conformance suite (every check on sled and on PostgreSQL) is `--test
//! datastore_conformance`.
//!
//! Every wait is a poll of a condition with a deadline, never a fixed sleep.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs,
    reason = "integration test: a panic is a failed test"
)]

mod admin_authz;
mod audit;
mod migrate;
mod server;
mod server_list;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ztid_ca::config::{DatastoreKind, ServerConfig};
use ztid_ca::core::CaCore;
use ztid_ca::datastore::AgentRecord;
use ztid_test_support::postgres::TestPostgres;
use ztid_verifier::AttestedNode;

pub(crate) const TD: &str = "example.org";
pub(crate) const DEADLINE: Duration = Duration::from_secs(20);

/// One PostgreSQL server shared by the tests running at the same time, stopped when
/// the last of them is done (a static would never be dropped, leaving it running).
pub(crate) fn shared_postgres() -> Arc<TestPostgres> {
    static SHARED: Mutex<Weak<TestPostgres>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap();
    if let Some(pg) = slot.upgrade() {
        return pg;
    }
    let pg = Arc::new(TestPostgres::start());
    *slot = Arc::downgrade(&pg);
    pg
}

/// A fresh database of its own for one test; its URL.
pub(crate) fn fresh_database(pg: &TestPostgres) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    pg.create_database(&format!(
        "test_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// One test's database on the shared server, and a directory holding the password
/// file every server of the test reads and each server's data directory.
pub(crate) struct Cluster {
    pub(crate) pg: Arc<TestPostgres>,
    pub(crate) url: String,
    pub(crate) dir: tempfile::TempDir,
}

impl Cluster {
    pub(crate) fn new() -> Self {
        let pg = shared_postgres();
        let url = fresh_database(&pg);
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("db-password");
        std::fs::write(&pw, format!("{}\n", pg.password())).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self { pg, url, dir }
    }

    /// The password file (owner-only).
    pub(crate) fn password_file(&self) -> PathBuf {
        self.dir.path().join("db-password")
    }

    /// Server `name`'s data directory.
    pub(crate) fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Another fresh database on the same PostgreSQL server (another cluster); its URL.
    pub(crate) fn another_database(&self) -> String {
        fresh_database(&self.pg)
    }

    /// The config of server `name` (its own data directory) on this test's database.
    pub(crate) fn config(&self, name: &str) -> ServerConfig {
        self.config_on(&self.url, name)
    }

    /// The config of server `name` (its own data directory) on the database at `url`.
    pub(crate) fn config_on(&self, url: &str, name: &str) -> ServerConfig {
        let mut c = ServerConfig {
            trust_domain: TD.into(),
            data_dir: self.data_dir(name),
            ..Default::default()
        };
        c.datastore.kind = DatastoreKind::Postgres;
        c.datastore.url = Some(url.into());
        c.datastore.password_file = Some(self.password_file());
        c
    }

    /// Opens server `name` on this test's database.
    pub(crate) fn open(&self, name: &str) -> Arc<CaCore> {
        self.open_config(self.config(name))
    }

    /// Opens a server with `config`; a failure shows the end of the PostgreSQL log.
    pub(crate) fn open_config(&self, config: ServerConfig) -> Arc<CaCore> {
        let dir = config.data_dir.display().to_string();
        CaCore::open(config).unwrap_or_else(|e| {
            panic!(
                "opening server {dir} on PostgreSQL: {e}\n{}",
                self.pg.log_tail()
            )
        })
    }
}

/// Polls `cond` until it holds or the deadline passes.
pub(crate) fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A CSR of a fresh key with `sans`.
pub(crate) fn csr(sans: Vec<rcgen::SanType>) -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = sans;
    p.serialize_request(&kp).unwrap().der().to_vec()
}

/// Attests node `node_id` through `core` (as a join-token agent would be, without
/// the token) and returns its record and the DER of its SVID.
pub(crate) fn attest(core: &CaCore, node_id: &str) -> (AgentRecord, Vec<u8>) {
    let node = AttestedNode {
        method: "join_token",
        node_id: node_id.into(),
        selectors: vec![],
        aliases: vec![],
        evidence_digest: [7; 32],
    };
    let (record, leaf) = core.complete_attestation(&node, &csr(vec![])).unwrap();
    (record, leaf.chain[0].clone())
}

/// Runs test `path` of this binary (its full path: `module::name`) alone in a child
/// process with `env` set to `value`, and returns its output. A path that names no
/// test would run nothing and succeed, so the child must say it ran exactly one test;
/// the caller checks the test's effect too.
pub(crate) fn run_test_in_child(path: &str, env: &str, value: &str) -> std::process::Output {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", path, "--nocapture", "--test-threads=1"])
        .env(env, value)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == "running 1 test"),
        "the child process did not run test {path}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
