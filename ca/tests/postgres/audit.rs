//! `ztid-server audit verify` and `accept-rollback` on PostgreSQL (issue 13, point 7):
//! two servers on one database each keep their own hash-chained log in their data
//! directory and their own anchor in the database under their server id; `audit
//! verify` opens the store the server is configured with, checks that server's log
//! against that server's anchor, and names the server it checked.
//!
//! - both servers issue something and stop; `verify_server` and the CLI (`--config`,
//!   and `--datastore postgres --datastore-url`, text and JSON) name each server's own
//!   id and the anchor its log reaches;
//! - one server's log cut back to an earlier copy (log and signed head both restored,
//!   so the directory alone looks whole) is refused against its PostgreSQL anchor
//!   (`VerifyError::RolledBack` naming that server), while the other still verifies;
//!   `accept-rollback` writes the anchor back in PostgreSQL and verify passes again;
//! - a data directory that never ran on PostgreSQL (no `server-id`) is refused without
//!   creating an id.
use std::path::Path;

use serde_json::Value;
use ztid_ca::audit::VerifyError;
use ztid_ca::cli::{verify_server, AuditVerifyError};
use ztid_ca::config::{DatastoreKind, ServerConfig};
use ztid_ca::core::CaCore;

use crate::{attest, run_test_in_child, Cluster, TD};

/// What this module needs of a test's cluster besides the shared fixtures: a server's
/// config as a file, its id, a session of it in a child process, the CLI.
impl Cluster {
    /// The same config as [`Cluster::config`], as a TOML file (for `--config`).
    fn config_file(&self, name: &str) -> std::path::PathBuf {
        let f = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &f,
            format!(
                "trust_domain = \"{TD}\"\ndata_dir = \"{}\"\n[datastore]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
                self.data_dir(name).display(),
                self.url,
                self.password_file().display()
            ),
        )
        .unwrap();
        f
    }

    fn server_id(&self, name: &str) -> String {
        std::fs::read_to_string(self.data_dir(name).join("server-id"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Starts server `name`, attests `nodes` through it (audited events), and stops it
    /// cleanly (its log ends with a seal, its anchors name that seal), in a child
    /// process: a core's audit writer thread lives as long as its process (it would
    /// append an idle checkpoint 10 s later), as in a real server.
    fn run_and_stop(&self, name: &str, nodes: &[&str]) {
        let out = run_test_in_child(
            RUN_TEST,
            RUN_ENV,
            &format!("{}\n{}", self.config_file(name).display(), nodes.join(",")),
        );
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(RAN),
            "running server {name} in a child process failed:\n{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.pg.log_tail()
        );
    }

    /// `ztid-server audit ARGS` with the database password in the environment.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_ztid-server"))
            .arg("audit")
            .args(args)
            .env("ZTID_DATASTORE_PASSWORD", self.pg.password())
            .output()
            .unwrap()
    }
}

/// The test [`Cluster::run_and_stop`] runs in its child process, by its full path
/// (`--exact`: module prefix included).
const RUN_TEST: &str = "audit::run_a_server_in_this_process";
/// Where the child process of [`Cluster::run_and_stop`] finds its server: the config
/// file, then the nodes to attest (comma-separated).
const RUN_ENV: &str = "ZTID_TEST_AUDIT_RUN_SERVER";
/// What the child prints when its server ran and stopped cleanly.
const RAN: &str = "server ran and stopped";

/// Not a check: the child process of [`Cluster::run_and_stop`] (does nothing when run
/// otherwise).
#[test]
fn run_a_server_in_this_process() {
    let Ok(spec) = std::env::var(RUN_ENV) else {
        return;
    };
    let (config, nodes) = spec.split_once('\n').unwrap();
    let core = CaCore::open(ServerConfig::from_file(Path::new(config)).unwrap()).unwrap();
    for n in nodes.split(',').filter(|n| !n.is_empty()) {
        attest(&core, n);
    }
    let log = core.audit.clone().expect("the audit log is on by default");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(log.close())
        .unwrap();
    println!("{RAN}");
}

fn log_len(data_dir: &Path) -> u64 {
    std::fs::read_to_string(data_dir.join("audit/audit.log"))
        .unwrap()
        .lines()
        .count() as u64
}

/// A copy of the audit log and its signed head, as a backup would hold them.
struct Snapshot {
    log: Vec<u8>,
    head: Vec<u8>,
    /// The sync journal of that point (the later one would complete the log again).
    journal: Vec<u8>,
}

impl Snapshot {
    fn take(data_dir: &Path) -> Self {
        Self {
            log: std::fs::read(data_dir.join("audit/audit.log")).unwrap(),
            head: std::fs::read(data_dir.join("audit/head.json")).unwrap(),
            journal: std::fs::read(data_dir.join("audit/audit.wal")).unwrap(),
        }
    }

    fn restore(&self, data_dir: &Path) {
        std::fs::write(data_dir.join("audit/audit.log"), &self.log).unwrap();
        std::fs::write(data_dir.join("audit/head.json"), &self.head).unwrap();
        std::fs::write(data_dir.join("audit/audit.wal"), &self.journal).unwrap();
    }
}

fn json_out(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn each_server_verifies_its_own_log_against_its_own_postgres_anchor() {
    let cluster = Cluster::new();
    cluster.run_and_stop("a", &["node-a1", "node-a2"]);
    cluster.run_and_stop("b", &["node-b1"]);
    let (id_a, id_b) = (cluster.server_id("a"), cluster.server_id("b"));
    assert_ne!(id_a, id_b);

    // In process: each server's own id, its whole log, its own anchor at its last record.
    for (name, id) in [("a", &id_a), ("b", &id_b)] {
        let v = verify_server(&cluster.config(name), false, &[]).unwrap();
        let records = log_len(&cluster.data_dir(name));
        assert_eq!(&v.server_id, id);
        assert_eq!(v.datastore, DatastoreKind::Postgres);
        assert_eq!(v.report.records, records);
        assert_eq!(v.datastore_note, None);
        let anchor = v.anchor.expect("the PostgreSQL anchor was checked");
        assert_eq!(
            anchor.anchor.seq, records,
            "a cleanly stopped server's anchor names its last record (the seal)"
        );
        assert_eq!(
            anchor.source,
            format!("the datastore anchor of server {id} (PostgreSQL)")
        );
        assert!(v.report.anchors_reached.contains(&anchor.source));
    }

    // The CLI, JSON: server a through --config, server b through the flags `run` takes.
    let config_a = cluster.config_file("a");
    let a = json_out(&cluster.cli(&[
        "verify",
        "--config",
        config_a.to_str().unwrap(),
        "--output",
        "json",
    ]));
    let dir_b = cluster.data_dir("b");
    let b = json_out(&cluster.cli(&[
        "verify",
        "--data-dir",
        dir_b.to_str().unwrap(),
        "--datastore",
        "postgres",
        "--datastore-url",
        &cluster.url,
        "--output",
        "json",
    ]));
    for (v, name, id) in [(&a, "a", &id_a), (&b, "b", &id_b)] {
        let records = log_len(&cluster.data_dir(name));
        assert_eq!(v["ok"], true);
        assert_eq!(v["server_id"], id.as_str());
        assert_eq!(v["datastore"], "postgres");
        assert_eq!(v["records"], records);
        assert_eq!(v["anchor"]["seq"], records);
        assert_eq!(
            v["anchor"]["source"],
            format!("the datastore anchor of server {id} (PostgreSQL)")
        );
        assert_eq!(v["datastore_anchor"], Value::Null, "nothing left unchecked");
    }
    // Text: the server, then what it reached.
    let out = cluster.cli(&["verify", "--config", config_a.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let records = log_len(&cluster.data_dir("a"));
    assert!(
        text.starts_with(&format!("server {id_a} (postgres datastore): audit log ")),
        "{text}"
    );
    assert!(
        text.contains(&format!("audit log OK: {records} records")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "extends the datastore anchor of server {id_a} (PostgreSQL) (record {records})"
        )),
        "{text}"
    );
}

#[test]
fn a_log_cut_back_is_refused_against_its_postgres_anchor_until_accepted() {
    let cluster = Cluster::new();
    let dir_a = cluster.data_dir("a");
    cluster.run_and_stop("a", &["node-a1"]);
    // A backup of a's audit directory: whole and signed on its own.
    let early = Snapshot::take(&dir_a);
    let early_len = log_len(&dir_a);
    cluster.run_and_stop("a", &["node-a2", "node-a3"]);
    cluster.run_and_stop("b", &["node-b1"]);
    let full_len = log_len(&dir_a);
    assert!(full_len > early_len);
    let (id_a, id_b) = (cluster.server_id("a"), cluster.server_id("b"));

    early.restore(&dir_a);
    let e = verify_server(&cluster.config("a"), false, &[]).unwrap_err();
    let AuditVerifyError::Log {
        server_id, error, ..
    } = &e
    else {
        panic!("expected a refusal of a's log, got {e:?}");
    };
    assert_eq!(server_id, &id_a);
    match error.as_ref() {
        VerifyError::RolledBack { last, anchor, at } => {
            assert_eq!((*last, *at), (early_len, full_len));
            assert_eq!(
                anchor,
                &format!("the datastore anchor of server {id_a} (PostgreSQL)")
            );
        }
        other => panic!("expected the log of a rolled back against its anchor, got {other:?}"),
    }
    // Server b's log and anchor are its own: untouched by a's.
    let b = verify_server(&cluster.config("b"), false, &[]).unwrap();
    assert_eq!(b.server_id, id_b);
    assert_eq!(
        b.anchor.unwrap().anchor.seq,
        log_len(&cluster.data_dir("b"))
    );

    // The CLI refuses too (exit 1), naming the server.
    let config_a = cluster.config_file("a");
    let out = cluster.cli(&["verify", "--config", config_a.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&format!("of server {id_a}:")), "{err}");

    // The operator's decision: the anchor in PostgreSQL restarts from the log as it is.
    let out = cluster.cli(&[
        "accept-rollback",
        "--config",
        config_a.to_str().unwrap(),
        "--reason",
        "restored from the 02:00 backup",
        "--output",
        "json",
    ]);
    let v = json_out(&out);
    assert_eq!(v["server_id"], id_a.as_str());
    assert_eq!(v["datastore"], "postgres");
    assert_eq!(v["accepted"].as_array().unwrap().len(), 1, "{v}");
    let after = verify_server(&cluster.config("a"), false, &[]).unwrap();
    assert_eq!(after.server_id, id_a);
    let records = log_len(&dir_a);
    assert!(records > early_len, "the acceptance is recorded in the log");
    assert_eq!(after.anchor.unwrap().anchor.seq, records);
    // And b's anchor was not touched by a's acceptance.
    let b = verify_server(&cluster.config("b"), false, &[]).unwrap();
    assert_eq!(
        b.anchor.unwrap().anchor.seq,
        log_len(&cluster.data_dir("b"))
    );
}

#[test]
fn a_data_directory_that_never_ran_on_postgres_is_refused_without_an_id() {
    let cluster = Cluster::new();
    let dir = cluster.data_dir("never");
    std::fs::create_dir_all(&dir).unwrap();
    let e = verify_server(&cluster.config("never"), false, &[]).unwrap_err();
    assert!(
        matches!(&e, AuditVerifyError::Config(m) if m.contains("server-id")),
        "{e}"
    );
    assert!(!dir.join("server-id").exists(), "no id was made up");
}
