//! The PostgreSQL side: one server of the benchmark's own (`ztid_test_support`'s
//! `TestPostgres`: initdb into a temporary directory, its own port), the `[datastore]`
//! config of the ztid-servers on it, a loader `PgStore` in this process, the bulk load
//! of entries, and table sizes.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ztid_ca::datastore::{DataStore, EntryRecord, PgOptions, PgStore};
use ztid_spiffe::Selector;
use ztid_test_support::postgres::{self as tpg, TestPostgres};

use crate::{log, TD};

/// A database of the test PostgreSQL and what a server needs to use it.
pub struct Db {
    pub name: String,
    pub url: String,
    /// Holds the password file and the servers' config files.
    pub dir: tempfile::TempDir,
}

impl Db {
    pub fn new(pg: &TestPostgres, name: &str) -> Self {
        let url = if name == tpg::DATABASE {
            pg.url()
        } else {
            pg.create_database(name)
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("password");
        std::fs::write(&pw, pg.password()).expect("password file");
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("password file mode");
        Self {
            name: name.to_string(),
            url,
            dir,
        }
    }

    /// A server config file with this database as `[datastore]`.
    pub fn config(&self, file: &str) -> PathBuf {
        let p = self.dir.path().join(file);
        std::fs::write(
            &p,
            format!(
                "[datastore]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
                self.url,
                self.dir.path().join("password").display()
            ),
        )
        .expect("config file");
        p
    }

    /// A `PgStore` in this process (for bulk writes through the `DataStore` API).
    pub fn loader(&self, pg: &TestPostgres) -> PgStore {
        let mut o = PgOptions::new(
            self.url.clone(),
            Some(pg.password().to_string()),
            "ztid-pg-bench-loader",
        );
        o.max_connections = 8;
        PgStore::connect(o).expect("connect the loader store")
    }
}

/// The postmaster's pid (first line of `postmaster.pid` in the data directory).
pub fn postmaster_pid(pg: &TestPostgres) -> u32 {
    let f = std::fs::read_to_string(pg.dir().join("data/postmaster.pid")).expect("postmaster.pid");
    f.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("postmaster pid")
}

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The node id of fleet agent `k`: the parent of bulk entries `100k .. 100k+99`.
pub fn fleet_node_id(k: u64) -> String {
    format!("{:016x}", splitmix(k + 7))
}

/// Bulk entry `n` (the same shape as `ztid-bench`'s): 100 per agent parent, whose node
/// ids are the fleet's join-token ids, so fleet agent `k` has entries `100k..100k+99`.
pub fn bulk_entry(n: u64, now: i64) -> EntryRecord {
    EntryRecord {
        id: format!(
            "{:016x}{:016x}",
            splitmix(n),
            splitmix(n ^ 0xABCD_EF01_2345_6789)
        ),
        spiffe_id: format!("spiffe://{TD}/bulk/svc-{n}"),
        parent_id: format!(
            "spiffe://{TD}/ztid/agent/join-token/{}",
            fleet_node_id(n / 100)
        ),
        selectors: vec![Selector::parse(&format!("unix:uid:{}", 10_000 + n % 50_000)).unwrap()],
        x509_ttl: 0,
        jwt_ttl: 0,
        shared: false,
        dns_names: vec![],
        federates_with: vec![],
        node: false,
        hint: String::new(),
        revision: 0,
        created_at: now,
    }
}

/// `DataStore::create_entry` from `threads` threads, entries `from..` in order until
/// `to` or until `max` has passed; returns (the first entry not inserted, time).
pub fn api_insert(
    store: &dyn DataStore,
    from: u64,
    to: u64,
    threads: usize,
    max: Duration,
    now: i64,
) -> (u64, Duration) {
    let next = AtomicU64::new(from);
    let t0 = Instant::now();
    let deadline = t0 + max;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                if Instant::now() >= deadline {
                    break;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= to {
                    break;
                }
                store
                    .create_entry(bulk_entry(n, now))
                    .expect("create_entry");
            });
        }
    });
    (next.load(Ordering::Relaxed).min(to), t0.elapsed())
}

/// The store's identity key (`ca/src/datastore/mod.rs` `identity_key`, which is not
/// public): SHA-256 over SPIFFE ID, parent, kind and sorted selectors.
fn identity_key(e: &EntryRecord) -> Vec<u8> {
    let mut sels: Vec<String> = e.selectors.iter().map(|s| s.to_string()).collect();
    sels.sort();
    let text = format!(
        "{}\n{}\n{}\n{}",
        e.spiffe_id,
        e.parent_id,
        e.node,
        sels.join("\n")
    );
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .to_vec()
}

/// A psql as the superuser on database `db` over the Unix socket, reading SQL (and COPY
/// data) from its stdin.
fn psql_stdin(pg: &TestPostgres, db: &str) -> std::process::Child {
    let bin = tpg::bin_dir();
    let psql = if bin.join("psql").is_file() {
        bin.join("psql")
    } else {
        PathBuf::from("psql")
    };
    Command::new(psql)
        .arg("-h")
        .arg(pg.dir().join("sock"))
        .arg("-p")
        .arg(pg.port().to_string())
        .args(["-U", tpg::SUPERUSER, "-d", db])
        .args(["-v", "ON_ERROR_STOP=1", "-X", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("psql")
}

/// Loads entries `from..to` with `COPY` in one transaction, rows exactly as
/// `PgStore::create_entry` writes them (the record as its JSON, the identity key, one
/// revision each drawn after the current one, a change-log row each, the entry count),
/// while no server writes to the database. Returns the time.
pub fn copy_insert(pg: &TestPostgres, db: &Db, from: u64, to: u64, now: i64) -> Duration {
    let t0 = Instant::now();
    let rev0: u64 = pg
        .psql_in(&db.name, "SELECT value FROM ztid_revision")
        .parse()
        .expect("revision");
    let mut child = psql_stdin(pg, &db.name);
    {
        let stdin = child.stdin.take().expect("psql stdin");
        let mut w = std::io::BufWriter::with_capacity(1 << 20, stdin);
        writeln!(w, "BEGIN;").unwrap();
        writeln!(
            w,
            "COPY ztid_entries (id, spiffe_id, parent_id, node, identity, revision, record) FROM STDIN;"
        )
        .unwrap();
        for (i, n) in (from..to).enumerate() {
            let mut e = bulk_entry(n, now);
            e.revision = rev0 + 1 + i as u64;
            let json = serde_json::to_string(&e).unwrap();
            assert!(
                !json.contains(['\\', '\t', '\n', '\r']),
                "a record that COPY's text format would need escaped"
            );
            writeln!(
                w,
                "{}\t{}\t{}\tf\t\\\\x{}\t{}\t{}",
                e.id,
                e.spiffe_id,
                e.parent_id,
                hex::encode(identity_key(&e)),
                e.revision,
                json
            )
            .unwrap();
            if (i + 1) % 200_000 == 0 {
                log(format!("  … {} entry rows sent", i + 1));
            }
        }
        writeln!(w, "\\.").unwrap();
        writeln!(
            w,
            "COPY ztid_entry_changes (revision, entry_id, parent_id, node, deleted) FROM STDIN;"
        )
        .unwrap();
        for (i, n) in (from..to).enumerate() {
            let e = bulk_entry(n, now);
            writeln!(
                w,
                "{}\t{}\t{}\tf\tf",
                rev0 + 1 + i as u64,
                e.id,
                e.parent_id
            )
            .unwrap();
        }
        writeln!(w, "\\.").unwrap();
        let count = to - from;
        writeln!(
            w,
            "UPDATE ztid_revision SET value = {};\nUPDATE ztid_counters SET value = value + {count} WHERE name = 'entries';\nCOMMIT;",
            rev0 + count
        )
        .unwrap();
        w.flush().unwrap();
    }
    let st = child.wait().expect("psql");
    assert!(st.success(), "COPY of the bulk entries failed");
    t0.elapsed()
}

/// `VACUUM ANALYZE` of the entry tables (what autovacuum would do after a bulk load).
pub fn vacuum_analyze(pg: &TestPostgres, db: &Db) -> Duration {
    let t0 = Instant::now();
    pg.psql_in(&db.name, "VACUUM ANALYZE ztid_entries");
    pg.psql_in(&db.name, "VACUUM ANALYZE ztid_entry_changes");
    t0.elapsed()
}

/// Sizes in bytes: (entries heap+TOAST, entries indexes, changes heap, changes
/// indexes, whole database) and the entry count.
#[derive(Clone, Debug, Default)]
pub struct Sizes {
    pub entries: u64,
    pub entries_table: u64,
    pub entries_indexes: u64,
    pub changes_table: u64,
    pub changes_indexes: u64,
    pub database: u64,
}

pub fn sizes(pg: &TestPostgres, db: &Db) -> Sizes {
    let out = pg.psql_in(
        &db.name,
        "SELECT (SELECT count(*) FROM ztid_entries), \
         pg_table_size('ztid_entries'), pg_indexes_size('ztid_entries'), \
         pg_table_size('ztid_entry_changes'), pg_indexes_size('ztid_entry_changes'), \
         pg_database_size(current_database())",
    );
    let v: Vec<u64> = out.split('|').map(|x| x.trim().parse().unwrap()).collect();
    Sizes {
        entries: v[0],
        entries_table: v[1],
        entries_indexes: v[2],
        changes_table: v[3],
        changes_indexes: v[4],
        database: v[5],
    }
}

/// The PostgreSQL version and the settings that matter here.
pub fn settings(pg: &TestPostgres) -> String {
    pg.psql_in(
        "postgres",
        "SELECT current_setting('server_version') || ', fsync=' || current_setting('fsync') || \
         ', synchronous_commit=' || current_setting('synchronous_commit') || \
         ', shared_buffers=' || current_setting('shared_buffers')",
    )
}
