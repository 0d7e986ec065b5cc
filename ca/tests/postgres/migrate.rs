//! `datastore migrate` (issue 13, point 6): a sled datastore populated by the real
//! server code (`CaCore`: entries, attested agents, join tokens, a federation
//! relationship, a federated bundle, a grant and a revocation, a prepared authority, the
//! audit anchor) copied into a PostgreSQL database started by the test harness;
//! everything is there
//! afterwards, under the migrated server's id, and an incremental sync from the
//! revision the source was at misses nothing written after. A second migration into
//! the now non-empty database is refused and changes nothing, and so is one into a
//! database where another server already keeps its CA state.

use std::path::Path;
use std::sync::Arc;

use ztid_ca::config::ServerConfig;
use ztid_ca::core::CaCore;
use ztid_ca::datastore::migrate::{self, MigrationReport};
use ztid_ca::datastore::{
    AgentRecord, CaState, DataStore, EntryFilter, EntryRecord, JoinTokenRecord, PgOptions, PgStore,
    SledStore,
};
use ztid_ca::Error;
use ztid_test_support::postgres::TestPostgres;

use crate::{run_test_in_child, Cluster, TD};

fn config(dir: &Path, td: &str) -> ServerConfig {
    ServerConfig {
        trust_domain: td.into(),
        data_dir: dir.to_path_buf(),
        ..ServerConfig::default()
    }
}

/// A CSR without a URI SAN (the server assigns an agent its ID).
fn agent_csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

/// Attests an agent with a fresh join token through the join-token verifier.
fn attest(core: &CaCore) -> AgentRecord {
    let (token, _) = core.create_join_token(600, None).unwrap();
    let csr = agent_csr();
    let pk = CaCore::csr_public_key(&csr).unwrap();
    let ctx = core.attestation_context(&pk);
    let step = core
        .verifier("join-token")
        .unwrap()
        .start(token.as_bytes(), &ctx)
        .unwrap();
    let ztid_verifier::VerifierStep::Attested(node) = step else {
        panic!("join-token attestation asked for a challenge");
    };
    core.complete_attestation(&node, &csr).unwrap().0
}

fn entry(spiffe_id: &str, parent: &str, selector: &str) -> ztid_proto::node::Entry {
    let (t, v) = selector.split_once(':').unwrap();
    ztid_proto::node::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![ztid_proto::node::Selector {
            r#type: t.into(),
            value: v.into(),
        }],
        ..Default::default()
    }
}

/// Populates a sled data directory through `CaCore`, as a running server would, in a
/// child process: the core's audit writer thread keeps the store (and sled's lock on
/// the directory) for as long as the process lives, as in a real server.
fn populate(data_dir: &Path, other_td_dir: &Path) {
    let out = run_test_in_child(
        POPULATE_TEST,
        POPULATE_ENV,
        &format!("{}\n{}", data_dir.display(), other_td_dir.display()),
    );
    assert!(
        out.status.success() && data_dir.join("datastore").is_dir(),
        "populating in a child process failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test [`populate`] runs in its child process, by its full path (`--exact`: module
/// prefix included).
const POPULATE_TEST: &str = "migrate::populate_in_this_process";
/// Where the child process populates (data directory, other trust domain's directory).
const POPULATE_ENV: &str = "ZTID_TEST_MIGRATE_POPULATE";

/// Not a check: the child process of [`populate`] (does nothing when run otherwise).
#[test]
fn populate_in_this_process() {
    let Ok(dirs) = std::env::var(POPULATE_ENV) else {
        return;
    };
    let (data_dir, other_td_dir) = dirs.split_once('\n').unwrap();
    populate_here(Path::new(data_dir), Path::new(other_td_dir));
}

fn populate_here(data_dir: &Path, other_td_dir: &Path) {
    // Another trust domain's bundle, made by a real CA too.
    let other = CaCore::open(config(other_td_dir, "other.org")).unwrap();
    let other_bundle = (*other.bundle()).clone();
    drop(other);

    let core = CaCore::open(config(data_dir, TD)).unwrap();
    let a = attest(&core);
    let b = attest(&core);
    for i in 0..12 {
        let parent = if i % 2 == 0 {
            &a.spiffe_id
        } else {
            &b.spiffe_id
        };
        core.create_entry(&entry(
            &format!("spiffe://{TD}/w{i}"),
            parent,
            &format!("unix:uid:{}", 1000 + i),
        ))
        .unwrap();
    }
    let mut node = entry(&format!("spiffe://{TD}/cluster"), "", "join-token:used");
    node.node = true;
    node.parent_id = String::new();
    core.create_entry(&node).unwrap();
    // The newest changes are deletions: the source's revision is above every entry's.
    let gone = core
        .create_entry(&entry(
            &format!("spiffe://{TD}/gone"),
            &a.spiffe_id,
            "unix:uid:7",
        ))
        .unwrap();
    core.delete_entry(&gone.id).unwrap();
    // One token left unredeemed.
    core.create_join_token(3600, Some(format!("spiffe://{TD}/cluster")))
        .unwrap();
    core.create_federation(
        ztid_ca::federation::FederationRecord {
            trust_domain: "other.org".into(),
            bundle_endpoint_url: "https://127.0.0.1:1/bundle".into(),
            profile: "https_web".into(),
            ..Default::default()
        },
        "test",
    )
    .unwrap();
    core.set_federated_bundle(other_bundle, ztid_ca::federation::Source::Operator("test"))
        .unwrap();
    core.prepare_authority(ztid_ca::authority::Kind::X509, "test")
        .unwrap();
    // Token exchange (issue 14): a grant and a revocation.
    core.create_grant(
        &ztid_ca::datastore::GrantRecord {
            id: String::new(),
            spiffe_id: format!("spiffe://{}/migrated/app", core.trust_domain),
            audience: "https://mcp.example".into(),
            scopes: vec!["tools.read".into()],
            ttl_seconds: 0,
            max_per_minute: 0,
            node_selectors: Vec::new(),
            may_delegate: false,
            created_at: 0,
        },
        "test",
    )
    .unwrap();
    core.revoke(
        ztid_ca::datastore::RevocationKind::Instance,
        &format!("spiffe://{}/migrated/app/0123", core.trust_domain),
        "test",
        "test",
    )
    .unwrap();
    // A hardware identifier recorded with an agent's ban.
    core.store
        .put_hardware_bans(&[ztid_ca::datastore::HardwareBanRecord {
            identifier: format!("tpm:ek-hash:{}", "ab".repeat(32)),
            agent: format!("spiffe://{TD}/ztid/agent/tpm/{}", "ab".repeat(32)),
            banned_at: 1,
        }])
        .unwrap();
    core.store.flush().unwrap();
    // The audit writer anchors the log in the datastore shortly after each write.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while core.store.audit_anchor().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "no audit anchor");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    core.store.flush().unwrap();
}

/// Everything a store holds for one server, comparable.
#[derive(Debug, PartialEq)]
struct Snapshot {
    entries: Vec<EntryRecord>,
    agents: Vec<AgentRecord>,
    tokens: Vec<([u8; 32], JoinTokenRecord)>,
    federations: Vec<Vec<u8>>,
    bundles: Vec<Vec<u8>>,
    grants: Vec<ztid_ca::datastore::GrantRecord>,
    revocations: Vec<ztid_ca::datastore::RevocationRecord>,
    hardware_bans: Vec<ztid_ca::datastore::HardwareBanRecord>,
    ca_state: Option<CaState>,
    anchor: Option<Vec<u8>>,
    revision: u64,
}

fn snapshot(s: &dyn DataStore) -> Snapshot {
    let mut entries = s.list_entries(&EntryFilter::default()).unwrap();
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    let mut agents = s.list_agents().unwrap();
    agents.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
    Snapshot {
        entries,
        agents,
        tokens: s.list_join_tokens().unwrap(),
        federations: s.list_federations().unwrap(),
        bundles: s.list_federated_bundles().unwrap(),
        grants: s.list_grants().unwrap(),
        revocations: s.list_revocations().unwrap(),
        hardware_bans: s.list_hardware_bans().unwrap(),
        ca_state: s.load_ca_state().unwrap(),
        anchor: s.audit_anchor().unwrap(),
        revision: s.current_revision().unwrap(),
    }
}

fn connect(pg: &TestPostgres, url: &str, server_id: &str) -> PgStore {
    PgStore::connect(PgOptions::new(
        url,
        Some(pg.password().to_string()),
        server_id,
    ))
    .unwrap()
}

#[test]
fn a_sled_deployment_moves_to_postgres_and_a_second_migration_is_refused() {
    let cluster = Cluster::new();
    let (pg, url, dir) = (&cluster.pg, &cluster.url, &cluster.dir);
    let data = dir.path().join("server");
    populate(&data, &dir.path().join("other"));

    let source = SledStore::open_as(&data.join("datastore"), "migrated-1").unwrap();
    let before = snapshot(&source);
    assert_eq!(before.entries.len(), 13);
    assert_eq!(before.agents.len(), 2);
    assert_eq!(before.tokens.len(), 1);
    assert_eq!(before.federations.len(), 1);
    assert_eq!(before.bundles.len(), 1);
    assert_eq!(before.grants.len(), 1);
    assert_eq!(before.revocations.len(), 1);
    assert_eq!(before.hardware_bans.len(), 1);
    let state = before.ca_state.clone().expect("CA state");
    assert_eq!(state.x509.len(), 2, "the active and the prepared authority");
    assert!(before.anchor.is_some());
    let newest = before.entries.iter().map(|e| e.revision).max().unwrap();
    assert!(before.revision > newest, "the newest change is a deletion");

    let target = connect(pg, url, "migrated-1");
    let report = migrate::migrate(&source, &target).unwrap();
    assert_eq!(
        report,
        MigrationReport {
            server_id: "migrated-1".into(),
            entries: 13,
            agents: 2,
            join_tokens: 1,
            federations: 1,
            federated_bundles: 1,
            grants: 1,
            revocations: 1,
            hardware_bans: 1,
            x509_authorities: 2,
            jwt_authorities: state.jwt.len(),
            audit_anchor: true,
            revision: before.revision,
        }
    );
    // The source was only read.
    assert_eq!(snapshot(&source), before);

    // Everything is there, the newest entry at the source's revision and every other
    // one at its own.
    let after = snapshot(&target);
    let mut expected = before.entries.clone();
    for e in &mut expected {
        if e.revision == newest {
            e.revision = before.revision;
        }
    }
    assert_eq!(after.entries, expected);
    assert_eq!(after.agents, before.agents);
    assert_eq!(after.tokens, before.tokens);
    assert_eq!(after.federations, before.federations);
    assert_eq!(after.bundles, before.bundles);
    assert_eq!(after.ca_state, before.ca_state);
    assert_eq!(after.anchor, before.anchor);
    assert_eq!(after.revision, before.revision);
    assert_eq!(
        target.cluster_ca_states().unwrap(),
        vec![("migrated-1".to_string(), state.clone())]
    );
    // Another server of the cluster sees the migrated authorities too.
    let other_server = connect(pg, url, "server-2");
    assert_eq!(other_server.cluster_ca_states().unwrap().len(), 1);
    assert!(other_server.load_ca_state().unwrap().is_none());
    drop(other_server);

    // An agent that synced the source's last revision misses nothing written after.
    let parent = before.agents[0].spiffe_id.clone();
    assert!(target
        .entry_changes_for_parent_since(&parent, before.revision)
        .unwrap()
        .is_empty());
    let mut new = before.entries[0].clone();
    new.id = "f".repeat(32);
    new.spiffe_id = format!("spiffe://{TD}/after-migration");
    new.parent_id = parent.clone();
    let created = target.create_entry(new).unwrap();
    assert!(created.revision > before.revision);
    let changes = target
        .entry_changes_for_parent_since(&parent, before.revision)
        .unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].entry_id, created.id);
    target.delete_entry(&created.id).unwrap();

    // A second migration into the now non-empty database: refused, nothing written.
    let now = snapshot(&target);
    let err = migrate::migrate(&source, &target).unwrap_err();
    assert!(matches!(err, Error::Precondition(_)), "{err}");
    assert!(
        err.to_string()
            .contains("the target datastore is not empty"),
        "{err}"
    );
    assert_eq!(snapshot(&target), now);
    drop(target);
    drop(source);
}

#[test]
fn a_database_where_another_server_keeps_its_ca_state_is_not_a_migration_target() {
    let cluster = Cluster::new();
    let (pg, url, dir) = (&cluster.pg, &cluster.url, &cluster.dir);
    let data = dir.path().join("server");
    populate(&data, &dir.path().join("other"));
    let source = SledStore::open_as(&data.join("datastore"), "migrated-1").unwrap();

    // A server of the new cluster already started: its CA state is in the database.
    let early: Arc<dyn DataStore> = Arc::new(connect(pg, url, "early"));
    early
        .store_ca_state(&source.load_ca_state().unwrap().unwrap())
        .unwrap();
    let target = connect(pg, url, "migrated-1");
    let err = migrate::migrate(&source, &target).unwrap_err();
    assert!(
        matches!(&err, Error::Precondition(m) if m.contains("1 servers' CA states")),
        "{err}"
    );
    assert_eq!(target.count_entries().unwrap(), 0);
    assert_eq!(target.count_agents().unwrap(), 0);
    assert_eq!(target.current_revision().unwrap(), 0);
    assert!(target.load_ca_state().unwrap().is_none());
}

#[test]
fn with_every_entry_deleted_the_target_still_starts_above_the_source_revision() {
    let cluster = Cluster::new();
    let (pg, url) = (&cluster.pg, &cluster.url);
    let dir = tempfile::tempdir().unwrap();
    let source = SledStore::open(dir.path()).unwrap();
    for i in 0..3 {
        let e = source
            .create_entry(EntryRecord {
                id: format!("{i:032x}"),
                spiffe_id: format!("spiffe://{TD}/w{i}"),
                parent_id: format!("spiffe://{TD}/ztid/agent/join-token/a"),
                selectors: vec![ztid_spiffe::Selector::parse("unix:uid:1").unwrap()],
                x509_ttl: 0,
                jwt_ttl: 0,
                shared: false,
                dns_names: vec![],
                federates_with: vec![],
                node: false,
                hint: String::new(),
                revision: 0,
                created_at: 0,
            })
            .unwrap();
        source.delete_entry(&e.id).unwrap();
    }
    let revision = source.current_revision().unwrap();
    assert!(revision > 0);
    let target = connect(pg, url, "s1");
    let report = migrate::migrate(&source, &target).unwrap();
    assert_eq!(report.entries, 0);
    assert!(report.revision >= revision, "{report:?}");
    assert_eq!(target.count_entries().unwrap(), 0);
    // And the target is no longer empty: its revision moved.
    assert!(matches!(
        migrate::migrate(&source, &target),
        Err(Error::Precondition(_))
    ));
}

/// `ztid-server datastore migrate` itself: the report, the server id it stored the
/// authorities under (the data directory's `server-id`, as `run` will read it), and
/// the one-line refusal of a second run.
#[test]
fn the_cli_migrates_under_the_data_directory_server_id_and_refuses_a_second_run() {
    let cluster = Cluster::new();
    let (pg, url, dir) = (&cluster.pg, &cluster.url, &cluster.dir);
    let data = dir.path().join("server");
    populate(&data, &dir.path().join("other"));
    let migrate_cli = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ztid-server"))
            .args(["datastore", "migrate", "--to", "postgres"])
            .args(extra)
            .env("ZTID_DATASTORE_PASSWORD", pg.password())
            .output()
            .unwrap()
    };
    let from = format!("sled:{}", data.display());
    let out = migrate_cli(&["--from", &from, "--datastore-url", url, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: MigrationReport = serde_json::from_slice(&out.stdout).unwrap();
    let server_id = std::fs::read_to_string(data.join("server-id")).unwrap();
    assert_eq!(report.server_id, server_id.trim());
    assert_eq!(
        (report.entries, report.agents, report.join_tokens),
        (13, 2, 1)
    );
    let target = connect(pg, url, server_id.trim());
    assert_eq!(
        target.load_ca_state().unwrap().unwrap().x509.len(),
        report.x509_authorities
    );

    let again = migrate_cli(&["--from", &from, "--datastore-url", url]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("the target datastore is not empty") && stderr.contains("13 entries"),
        "{stderr}"
    );
    // Refused before opening anything: a source that is not a sled data directory.
    let bad = migrate_cli(&["--from", "sled:/nonexistent", "--datastore-url", url]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("holds no sled datastore"));
}
