//! One conformance suite for every `DataStore`: each check runs against the sled store
//! (a temporary directory) and the PostgreSQL store (a server started by the test
//! harness, a fresh database per check). Then what only PostgreSQL has: several stores
//! on one database (a join token taken exactly once, out-of-order commits never missed
//! by a syncing reader, leader roles, notifications between stores), the database
//! restarting under the store, URL and TLS rules, schema versions.
//!
//! Refusals are asserted by their typed `ztid_ca::Error` variant, never by text.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs,
    reason = "integration test: a panic is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::TryRecvError;
use ztid_ca::datastore::{
    AgentRecord, AuthorityRecord, AuthorityState, CaState, ChangeTopic, DataStore, EntryFilter,
    EntryRecord, GrantRecord, HardwareBanRecord, JoinTokenRecord, PgOptions, PgStore,
    RevocationKind, RevocationRecord, SledStore,
};
use ztid_ca::limits::{MAX_ADMIN_REVOCATIONS, MAX_GRANTS, MAX_HARDWARE_BANS, MAX_REVOCATIONS};
use ztid_ca::{Error, StoreError};
use ztid_spiffe::Selector;
use ztid_test_support::postgres::TestPostgres;

// ---------------------------------------------------------------------------------
// Fixtures

/// Stores of one kind on one fresh database: `store(i)` is the i-th server's store
/// (PostgreSQL: its own connection pool and server id `server-i`; sled: one store
/// shared, since one process owns a sled directory).
trait Fixture {
    fn store(&self, i: usize) -> Arc<dyn DataStore>;
    /// Whether several servers share the database (PostgreSQL).
    fn clustered(&self) -> bool;
    /// Stores grants `g(0..grants)` and instance revocations `r(0..revocations)` (targets
    /// `spiffe://example.org/app/NNNNN`), as quickly as the store allows: the bound tests
    /// fill 10,000 of each, which one checked insert at a time takes minutes on
    /// PostgreSQL (the bound check counts the table in each transaction).
    fn prefill(
        &self,
        grants: usize,
        revocations: usize,
        g: &(dyn Fn(usize) -> GrantRecord + Sync),
        r: &(dyn Fn(usize) -> RevocationRecord + Sync),
    ) {
        std::thread::scope(|scope| {
            for t in 0..4 {
                let s = self.store(t % 2);
                scope.spawn(move || {
                    for i in (t..grants).step_by(4) {
                        s.put_grant(&g(i)).unwrap();
                    }
                    for i in (t..revocations).step_by(4) {
                        s.put_revocation(&r(i)).unwrap();
                    }
                });
            }
        });
    }
    /// Stores `n` hardware bans `tpm:ek-hash:<i as 64 hex digits>` for agent
    /// `spiffe://example.org/ztid/agent/tpm/filler`, as quickly as the store allows.
    fn prefill_hardware_bans(&self, n: usize) {
        let bans: Vec<HardwareBanRecord> = (0..n)
            .map(|i| hardware_ban(&filler_ek(i), "spiffe://example.org/ztid/agent/tpm/filler"))
            .collect();
        self.store(0).put_hardware_bans(&bans).unwrap();
    }
}

struct Sled {
    _dir: tempfile::TempDir,
    store: Arc<dyn DataStore>,
}

impl Sled {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn DataStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        Self { _dir: dir, store }
    }
}

impl Fixture for Sled {
    fn store(&self, _i: usize) -> Arc<dyn DataStore> {
        self.store.clone()
    }
    fn clustered(&self) -> bool {
        false
    }
}

/// One PostgreSQL server shared by the checks that run at the same time, stopped when
/// the last of them is done (a static would never be dropped, leaving it running).
fn shared_postgres() -> Arc<TestPostgres> {
    static SHARED: Mutex<Weak<TestPostgres>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap();
    if let Some(pg) = slot.upgrade() {
        return pg;
    }
    let pg = Arc::new(TestPostgres::start());
    *slot = Arc::downgrade(&pg);
    pg
}

fn fresh_database(pg: &TestPostgres) -> String {
    fresh_named_database(pg).0
}

/// A new database: its URL and its name.
fn fresh_named_database(pg: &TestPostgres) -> (String, String) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "conformance_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    (pg.create_database(&name), name)
}

fn connect(url: &str, password: &str, server_id: &str) -> PgStore {
    PgStore::connect(PgOptions::new(url, Some(password.to_string()), server_id))
        .unwrap_or_else(|e| panic!("connect {url} as {server_id}: {e}"))
}

struct Postgres {
    stores: Mutex<BTreeMap<usize, Arc<dyn DataStore>>>,
    url: String,
    database: String,
    pg: Arc<TestPostgres>,
}

impl Postgres {
    fn new() -> Self {
        let pg = shared_postgres();
        let (url, database) = fresh_named_database(&pg);
        Self {
            stores: Mutex::new(BTreeMap::new()),
            url,
            database,
            pg,
        }
    }
}

impl Fixture for Postgres {
    fn store(&self, i: usize) -> Arc<dyn DataStore> {
        self.stores
            .lock()
            .unwrap()
            .entry(i)
            .or_insert_with(|| {
                Arc::new(connect(
                    &self.url,
                    self.pg.password(),
                    &format!("server-{i}"),
                ))
            })
            .clone()
    }
    fn clustered(&self) -> bool {
        true
    }
    /// One INSERT per table from `generate_series`, each record the JSON of `g(0)` /
    /// `r(0)` with its id or target replaced (the store's own schema and record form).
    fn prefill(
        &self,
        grants: usize,
        revocations: usize,
        g: &(dyn Fn(usize) -> GrantRecord + Sync),
        r: &(dyn Fn(usize) -> RevocationRecord + Sync),
    ) {
        // The schema exists once a store has connected.
        let _ = self.store(0);
        let sample_grant = serde_json::to_string(&g(0)).unwrap().replace('\'', "''");
        let sample_rev = r(0);
        let rev_json = serde_json::to_string(&sample_rev)
            .unwrap()
            .replace('\'', "''");
        let kind = sample_rev.kind.as_str();
        let sql = format!(
            "INSERT INTO ztid_grants (id, record) SELECT 'g' || lpad(i::text, 5, '0'), \
               jsonb_set('{sample_grant}'::jsonb, '{{id}}', to_jsonb('g' || lpad(i::text, 5, '0'))) \
               FROM generate_series(0, {}) AS i; \
             INSERT INTO ztid_revocations (key, expires_at, record) \
               SELECT '{kind}' || chr(10) || 'spiffe://example.org/app/' || lpad(i::text, 5, '0'), {}, \
               jsonb_set(jsonb_set('{rev_json}'::jsonb, '{{target}}', \
                 to_jsonb('spiffe://example.org/app/' || lpad(i::text, 5, '0'))), \
                 '{{spiffe_id}}', to_jsonb('spiffe://example.org/app/' || lpad(i::text, 5, '0'))) \
               FROM generate_series(0, {}) AS i;",
            grants as i64 - 1,
            sample_rev.expires_at,
            revocations as i64 - 1,
        );
        self.pg.psql_in(&self.database, &sql);
        // What the stores counted or cached before the bulk insert is re-read from here.
        for (i, r) in [(0, &g(0)), (1, &g(1))] {
            assert_eq!(self.store(i).get_grant(&r.id).unwrap().as_ref(), Some(r));
        }
    }
    /// One INSERT from `generate_series` (one checked write per row takes minutes).
    fn prefill_hardware_bans(&self, n: usize) {
        let _ = self.store(0);
        let sql = format!(
            "INSERT INTO ztid_hardware_bans (identifier, agent, banned_at) \
               SELECT 'tpm:ek-hash:' || lpad(to_hex(i), 64, '0'), \
               'spiffe://example.org/ztid/agent/tpm/filler', 1 \
               FROM generate_series(0, {}) AS i;",
            n as i64 - 1
        );
        self.pg.psql_in(&self.database, &sql);
        assert_eq!(
            self.store(1).hardware_bans_of(&[filler_ek(0)]).unwrap(),
            vec![hardware_ban(
                &filler_ek(0),
                "spiffe://example.org/ztid/agent/tpm/filler"
            )]
        );
    }
}

/// Each check, once per store kind.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod sled {
            $(#[test] fn $check() { super::$check(&super::Sled::new()); })*
        }
        mod postgres {
            $(#[test] fn $check() { super::$check(&super::Postgres::new()); })*
        }
    };
}

conformance!(
    entries_indexes_and_change_log,
    update_entry_keeps_uniqueness_and_tells_both_parents,
    import_entry_keeps_id_and_revision,
    pages_are_ordered_by_id_and_complete,
    agents,
    agent_compare_and_swap,
    agent_compare_and_swap_races,
    join_tokens_are_taken_once,
    join_token_taken_exactly_once_by_racing_servers,
    ca_state_per_server_and_bundle_sequence,
    audit_anchor_per_server_only_moves_forward,
    federation_records,
    federated_bundle_compare_and_put,
    federated_bundle_never_outlives_its_relationship_deleted,
    changes_are_announced_to_every_server,
    leader_role_is_held_by_one_server,
    revisions_only_grow,
    a_syncing_reader_never_misses_a_change,
    callable_from_any_kind_of_thread,
    change_log_compaction_and_token_pruning,
    grants_are_stored_listed_and_deleted,
    revocations_are_keyed_by_kind_and_target_and_pruned,
    grants_and_revocations_are_bounded,
    hardware_bans_are_keyed_by_identifier_and_agent,
    hardware_bans_are_bounded,
);

// ---------------------------------------------------------------------------------
// Helpers

fn entry(id: &str, spiffe: &str, parent: &str, sel: &str) -> EntryRecord {
    EntryRecord {
        id: id.into(),
        spiffe_id: spiffe.into(),
        parent_id: parent.into(),
        selectors: vec![Selector::parse(sel).unwrap()],
        x509_ttl: 0,
        jwt_ttl: 0,
        shared: false,
        dns_names: vec![],
        federates_with: vec![],
        node: false,
        hint: String::new(),
        revision: 0,
        created_at: 7,
    }
}

fn agent(id: &str, serial: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: id.into(),
        method: "join_token".into(),
        selectors: vec![Selector::parse("join-token:id:x").unwrap()],
        granted_aliases: vec![],
        aliases: vec![],
        serial: serial.into(),
        previous_serial: None,
        previous_expires_at: 0,
        expires_at: 100,
        banned: false,
        attested_at: 1,
        evidence_digest: "00".into(),
        authorities_in_use: vec![],
        last_sync_at: 0,
        aliases_revision: 0,
        key_sha256: "ab".repeat(32),
        previous_key_sha256: None,
    }
}

fn authority(id: &str) -> AuthorityRecord {
    AuthorityRecord {
        id: id.into(),
        key_id: format!("key-{id}"),
        cert_der: vec![1, 2, 3],
        public_key: vec![4, 5],
        not_after: 1000,
        state: AuthorityState::Active,
        not_before: 1,
        tainted: false,
        tainted_at: 0,
        upstream_chain: vec![],
    }
}

fn ids(entries: &[EntryRecord]) -> Vec<&str> {
    entries.iter().map(|e| e.id.as_str()).collect()
}

fn changes(s: &dyn DataStore, parent: Option<&str>, after: u64) -> Vec<(String, bool)> {
    let c = match parent {
        Some(p) => s.entry_changes_for_parent_since(p, after).unwrap(),
        None => s.entry_changes_since(after).unwrap(),
    };
    c.into_iter().map(|c| (c.entry_id, c.deleted)).collect()
}

/// Receives topics until `want` arrives or `deadline` passes.
fn wait_for_topic(
    rx: &mut tokio::sync::broadcast::Receiver<ChangeTopic>,
    want: ChangeTopic,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(t) if t == want => return true,
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(5)),
            Err(TryRecvError::Closed) => return false,
        }
    }
    false
}

fn drain(rx: &mut tokio::sync::broadcast::Receiver<ChangeTopic>) {
    while !matches!(
        rx.try_recv(),
        Err(TryRecvError::Empty | TryRecvError::Closed)
    ) {}
}

// ---------------------------------------------------------------------------------
// Checks for every store

fn entries_indexes_and_change_log(f: &dyn Fixture) {
    let s = f.store(0);
    assert_eq!(s.current_revision().unwrap(), 0);
    assert_eq!(s.count_entries().unwrap(), 0);
    let (p1, p2) = ("spiffe://td/agent/p1", "spiffe://td/agent/p2");
    let a = s
        .create_entry(entry("a", "spiffe://td/w1", p1, "unix:uid:1"))
        .unwrap();
    let b = s
        .create_entry(entry("b", "spiffe://td/w2", p2, "unix:uid:1"))
        .unwrap();
    assert!(a.revision > 0 && b.revision > a.revision);
    assert_eq!(s.current_revision().unwrap(), b.revision);
    assert_eq!(s.get_entry("a").unwrap().unwrap(), a);
    assert_eq!(s.get_entry("zz").unwrap(), None);

    // The uniqueness rule: same SPIFFE ID, parent, kind and selectors (in any order).
    let dup = s.create_entry(entry("c", "spiffe://td/w1", p1, "unix:uid:1"));
    assert!(matches!(dup, Err(Error::AlreadyExists(_))), "{dup:?}");
    let same_id = s.create_entry(entry("a", "spiffe://td/other", p1, "unix:uid:9"));
    assert!(
        matches!(same_id, Err(Error::AlreadyExists(_))),
        "{same_id:?}"
    );
    assert_eq!(
        s.get_entry("c").unwrap(),
        None,
        "a refused create changes nothing"
    );
    assert_eq!(
        s.current_revision().unwrap(),
        b.revision,
        "a refused create draws no revision"
    );
    // Not the same identity: another kind, or other selectors.
    let mut node = entry("n", "spiffe://td/w1", p1, "unix:uid:1");
    node.node = true;
    let node = s.create_entry(node).unwrap();
    let mut two = entry("d", "spiffe://td/w1", p1, "unix:uid:1");
    two.selectors.push(Selector::parse("unix:gid:2").unwrap());
    s.create_entry(two.clone()).unwrap();
    let mut reordered = two.clone();
    reordered.id = "e".into();
    reordered.selectors.reverse();
    assert!(matches!(
        s.create_entry(reordered),
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(s.count_entries().unwrap(), 4);

    let by_parent = s
        .list_entries(&EntryFilter {
            parent_id: Some(p1.into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        ids(&by_parent),
        ["a", "n", "d"],
        "by SPIFFE ID, then revision"
    );
    let by_spiffe = s
        .list_entries(&EntryFilter {
            spiffe_id: Some("spiffe://td/w2".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(ids(&by_spiffe), ["b"]);
    let both = s
        .list_entries(&EntryFilter {
            parent_id: Some(p2.into()),
            spiffe_id: Some("spiffe://td/w1".into()),
        })
        .unwrap();
    assert!(both.is_empty());
    assert_eq!(s.list_entries(&EntryFilter::default()).unwrap().len(), 4);
    assert_eq!(ids(&s.node_entries().unwrap()), ["n"]);

    assert_eq!(changes(&*s, None, a.revision)[0], ("b".into(), false));
    assert_eq!(s.delete_entry("a").unwrap().unwrap(), a);
    assert_eq!(s.delete_entry("a").unwrap(), None);
    assert_eq!(s.count_entries().unwrap(), 3);
    assert_eq!(
        changes(&*s, Some(p1), 0),
        [
            ("a".into(), false),
            ("n".into(), false),
            ("d".into(), false),
            ("a".into(), true)
        ]
    );
    assert_eq!(changes(&*s, Some(p2), 0), [("b".into(), false)]);
    assert!(changes(&*s, Some(p2), b.revision).is_empty());
    assert!(
        changes(&*s, Some("spiffe://td/agent/"), 0).is_empty(),
        "a parent that is a prefix of another is not mixed up with it"
    );
    let all = s.entry_changes_since(0).unwrap();
    assert!(all.windows(2).all(|w| w[0].revision < w[1].revision));
    let last = all.last().unwrap();
    assert!(last.deleted && last.entry_id == "a" && last.parent_id == p1 && !last.node);
    assert_eq!(s.current_revision().unwrap(), last.revision);
    assert!(all.iter().any(|c| c.entry_id == "n" && c.node));
    // The identity is free again after the deletion.
    s.create_entry(entry("a2", "spiffe://td/w1", p1, "unix:uid:1"))
        .unwrap();
    assert!(node.revision < s.current_revision().unwrap());
    s.flush().unwrap();
}

fn update_entry_keeps_uniqueness_and_tells_both_parents(f: &dyn Fixture) {
    let s = f.store(0);
    let (p1, p2) = ("spiffe://td/agent/p1", "spiffe://td/agent/p2");
    let a = s
        .create_entry(entry("a", "spiffe://td/w1", p1, "unix:uid:1"))
        .unwrap();
    s.create_entry(entry("b", "spiffe://td/w2", p1, "unix:uid:1"))
        .unwrap();

    // Same parent: one new revision, created_at kept, fields replaced.
    let mut changed = a.clone();
    changed.x509_ttl = 60;
    changed.dns_names = vec!["w1.example".into()];
    changed.created_at = 999;
    let u = s.update_entry(changed).unwrap();
    assert!(u.revision > a.revision);
    assert_eq!(u.created_at, a.created_at);
    assert_eq!(s.get_entry("a").unwrap().unwrap(), u);
    assert_eq!(
        changes(&*s, Some(p1), a.revision).last().unwrap(),
        &("a".to_string(), false)
    );

    // Taking another entry's identity is refused, and changes nothing.
    let mut clash = u.clone();
    clash.spiffe_id = "spiffe://td/w2".into();
    let before = s.current_revision().unwrap();
    assert!(matches!(
        s.update_entry(clash),
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(s.get_entry("a").unwrap().unwrap(), u);
    assert_eq!(s.current_revision().unwrap(), before);
    // A missing entry.
    let missing = s.update_entry(entry("zz", "spiffe://td/x", p1, "unix:uid:5"));
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");

    // A new parent: the old parent's log has a deletion, the new one's the entry.
    let mut moved = u.clone();
    moved.parent_id = p2.into();
    let m = s.update_entry(moved).unwrap();
    assert!(m.revision > u.revision);
    assert_eq!(
        changes(&*s, Some(p1), u.revision),
        [("a".to_string(), true)]
    );
    assert_eq!(changes(&*s, Some(p2), 0), [("a".to_string(), false)]);
    let deletion = s.entry_changes_for_parent_since(p1, u.revision).unwrap();
    assert!(deletion[0].revision < m.revision);
    assert_eq!(
        ids(&s
            .list_entries(&EntryFilter {
                parent_id: Some(p1.into()),
                ..Default::default()
            })
            .unwrap()),
        ["b"]
    );
    // The old identity is free, the new one taken.
    s.create_entry(entry("c", "spiffe://td/w1", p1, "unix:uid:1"))
        .unwrap();
    assert!(matches!(
        s.create_entry(entry("d", "spiffe://td/w1", p2, "unix:uid:1")),
        Err(Error::AlreadyExists(_))
    ));
    // A node alias becoming a workload entry leaves the node index.
    let mut n = entry(
        "n",
        "spiffe://td/node",
        "spiffe://td/ztid/server",
        "unix:uid:3",
    );
    n.node = true;
    let mut n = s.create_entry(n).unwrap();
    assert_eq!(ids(&s.node_entries().unwrap()), ["n"]);
    n.node = false;
    s.update_entry(n).unwrap();
    assert!(s.node_entries().unwrap().is_empty());
    assert_eq!(s.count_entries().unwrap(), 4);
}

fn import_entry_keeps_id_and_revision(f: &dyn Fixture) {
    let s = f.store(0);
    let mut e = entry("imported", "spiffe://td/w", "spiffe://td/p", "unix:uid:1");
    e.revision = 500;
    e.created_at = 42;
    s.import_entry(e.clone()).unwrap();
    assert_eq!(s.get_entry("imported").unwrap().unwrap(), e);
    assert_eq!(s.current_revision().unwrap(), 500);
    assert_eq!(
        changes(&*s, Some("spiffe://td/p"), 0),
        [("imported".into(), false)]
    );
    assert_eq!(s.count_entries().unwrap(), 1);
    // Later revisions are drawn above it.
    let next = s
        .create_entry(entry(
            "next",
            "spiffe://td/w2",
            "spiffe://td/p",
            "unix:uid:1",
        ))
        .unwrap();
    assert!(next.revision > 500);
    // Never at or below a revision the store already has.
    let mut old = entry("old", "spiffe://td/w3", "spiffe://td/p", "unix:uid:1");
    old.revision = 500;
    let r = s.import_entry(old);
    assert!(matches!(r, Err(Error::Precondition(_))), "{r:?}");
    // The same uniqueness rule.
    let mut dup = entry("dup", "spiffe://td/w", "spiffe://td/p", "unix:uid:1");
    dup.revision = 10_000;
    assert!(matches!(s.import_entry(dup), Err(Error::AlreadyExists(_))));
}

fn pages_are_ordered_by_id_and_complete(f: &dyn Fixture) {
    let s = f.store(0);
    let parents = ["spiffe://td/agent/a", "spiffe://td/agent/b"];
    let mut all = BTreeSet::new();
    for i in 0..25u32 {
        // Ids not created in order.
        let id = format!("{:08x}", i.wrapping_mul(2_654_435_761));
        let spiffe = format!("spiffe://td/w{}", i % 3);
        s.create_entry(entry(
            &id,
            &spiffe,
            parents[(i % 2) as usize],
            &format!("unix:uid:{i}"),
        ))
        .unwrap();
        all.insert((id, spiffe, parents[(i % 2) as usize]));
    }
    let read_all = |filter: EntryFilter, page: usize| -> Vec<String> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let got = s
                .list_entries_page(&filter, after.as_deref(), page)
                .unwrap();
            assert!(got.len() <= page);
            let done = got.len() < page;
            after = got.last().map(|e| e.id.clone());
            out.extend(got.into_iter().map(|e| e.id));
            if done {
                return out;
            }
        }
    };
    let expect = |keep: &dyn Fn(&(String, String, &str)) -> bool| -> Vec<String> {
        all.iter()
            .filter(|e| keep(e))
            .map(|e| e.0.clone())
            .collect()
    };
    assert_eq!(read_all(EntryFilter::default(), 7), expect(&|_| true));
    assert_eq!(read_all(EntryFilter::default(), 1000), expect(&|_| true));
    let by_parent = EntryFilter {
        parent_id: Some(parents[1].into()),
        ..Default::default()
    };
    assert_eq!(read_all(by_parent, 4), expect(&|e| e.2 == parents[1]));
    let by_spiffe = EntryFilter {
        spiffe_id: Some("spiffe://td/w1".into()),
        ..Default::default()
    };
    assert_eq!(read_all(by_spiffe, 2), expect(&|e| e.1 == "spiffe://td/w1"));
    let both = EntryFilter {
        parent_id: Some(parents[0].into()),
        spiffe_id: Some("spiffe://td/w2".into()),
    };
    assert_eq!(
        read_all(both, 3),
        expect(&|e| e.2 == parents[0] && e.1 == "spiffe://td/w2")
    );
    assert!(s
        .list_entries_page(&EntryFilter::default(), Some("ffffffff"), 10)
        .unwrap()
        .is_empty());
    assert!(s
        .list_entries_page(&EntryFilter::default(), None, 0)
        .unwrap()
        .is_empty());

    let mut agent_ids: Vec<String> = (0..11)
        .map(|i| format!("spiffe://td/agent/{}", 10 - i))
        .collect();
    for id in &agent_ids {
        s.put_agent(&agent(id, "01")).unwrap();
    }
    agent_ids.sort();
    let mut got = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.list_agents_page(after.as_deref(), 3).unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|a| a.spiffe_id.clone());
        got.extend(page.into_iter().map(|a| a.spiffe_id));
    }
    assert_eq!(got, agent_ids);
    assert_eq!(s.count_agents().unwrap(), 11);
}

fn agents(f: &dyn Fixture) {
    let s = f.store(0);
    assert_eq!(s.count_agents().unwrap(), 0);
    let mut a = agent("spiffe://td/agent/x", "01");
    s.put_agent(&a).unwrap();
    assert_eq!(s.get_agent(&a.spiffe_id).unwrap().unwrap(), a);
    a.serial = "02".into();
    a.previous_serial = Some("01".into());
    a.banned = true;
    a.authorities_in_use = vec!["aa".into()];
    a.last_sync_at = 55;
    s.put_agent(&a).unwrap();
    assert_eq!(s.get_agent(&a.spiffe_id).unwrap().unwrap(), a);
    s.put_agent(&agent("spiffe://td/agent/w", "03")).unwrap();
    assert_eq!(
        s.list_agents()
            .unwrap()
            .iter()
            .map(|a| a.spiffe_id.as_str())
            .collect::<Vec<_>>(),
        ["spiffe://td/agent/w", "spiffe://td/agent/x"]
    );
    assert_eq!(s.count_agents().unwrap(), 2);
    assert_eq!(s.delete_agent(&a.spiffe_id).unwrap().unwrap(), a);
    assert_eq!(s.delete_agent(&a.spiffe_id).unwrap(), None);
    assert_eq!(s.get_agent(&a.spiffe_id).unwrap(), None);
    assert_eq!(s.count_agents().unwrap(), 1);
    // What one server writes, another reads.
    let other = f.store(1);
    assert!(other.get_agent("spiffe://td/agent/w").unwrap().is_some());
}

fn agent_compare_and_swap(f: &dyn Fixture) {
    let s = f.store(0);
    let other = f.store(1);
    let id = "spiffe://td/agent/cas";
    let a = agent(id, "01");
    let mut rx = other.subscribe_changes();
    drain(&mut rx);
    // None -> Some: creates only if absent.
    assert!(s.compare_and_swap_agent(id, None, Some(&a)).unwrap());
    assert!(wait_for_topic(&mut rx, ChangeTopic::Agents));
    assert_eq!(s.get_agent(id).unwrap().unwrap(), a);
    let mut b = a.clone();
    b.serial = "02".into();
    assert!(!other.compare_and_swap_agent(id, None, Some(&b)).unwrap());
    assert_eq!(s.get_agent(id).unwrap().unwrap(), a);
    // Some -> Some: only over the record expected; a mismatch writes nothing.
    let mut stale = a.clone();
    stale.last_sync_at = 99;
    assert!(!other
        .compare_and_swap_agent(id, Some(&stale), Some(&b))
        .unwrap());
    assert_eq!(s.get_agent(id).unwrap().unwrap(), a);
    assert!(other
        .compare_and_swap_agent(id, Some(&a), Some(&b))
        .unwrap());
    assert_eq!(s.get_agent(id).unwrap().unwrap(), b);
    assert!(!s.compare_and_swap_agent(id, Some(&a), Some(&a)).unwrap());
    assert_eq!(other.get_agent(id).unwrap().unwrap(), b);
    // None -> None: true only if absent, writes nothing.
    assert!(!s.compare_and_swap_agent(id, None, None).unwrap());
    assert!(s
        .compare_and_swap_agent("spiffe://td/agent/none", None, None)
        .unwrap());
    assert_eq!(s.get_agent("spiffe://td/agent/none").unwrap(), None);
    // Some -> None: deletes only if equal.
    assert!(!s.compare_and_swap_agent(id, Some(&a), None).unwrap());
    assert_eq!(s.get_agent(id).unwrap().unwrap(), b);
    drain(&mut rx);
    assert!(other.compare_and_swap_agent(id, Some(&b), None).unwrap());
    assert!(wait_for_topic(&mut rx, ChangeTopic::Agents));
    assert_eq!(s.get_agent(id).unwrap(), None);
    assert!(!s.compare_and_swap_agent(id, Some(&b), Some(&b)).unwrap());
    assert_eq!(s.get_agent(id).unwrap(), None);
    assert_eq!(s.count_agents().unwrap(), 0);
    // A record for another agent is refused.
    assert!(matches!(
        s.compare_and_swap_agent("spiffe://td/agent/other", None, Some(&a)),
        Err(Error::InvalidInput(_))
    ));
    assert_eq!(s.get_agent("spiffe://td/agent/other").unwrap(), None);
}

/// Many read-modify-writes through compare-and-swap on two servers at once: none is
/// lost (each thread bumps its own counter field, retrying on a failed swap).
fn agent_compare_and_swap_races(f: &dyn Fixture) {
    const THREADS: usize = 4;
    const ROUNDS: usize = 50;
    let id = "spiffe://td/agent/race";
    f.store(0).put_agent(&agent(id, "00")).unwrap();
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, start) = (f.store(t % 2), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..ROUNDS {
                    loop {
                        let cur = store.get_agent(id).unwrap().unwrap();
                        let mut new = cur.clone();
                        new.authorities_in_use.push(format!("t{t}"));
                        new.last_sync_at += 1;
                        if store
                            .compare_and_swap_agent(id, Some(&cur), Some(&new))
                            .unwrap()
                        {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let a = f.store(1).get_agent(id).unwrap().unwrap();
    assert_eq!(a.last_sync_at, (THREADS * ROUNDS) as i64);
    for t in 0..THREADS {
        let tag = format!("t{t}");
        assert_eq!(
            a.authorities_in_use.iter().filter(|x| **x == tag).count(),
            ROUNDS
        );
    }
}

fn token(id: &str, alias: Option<&str>) -> JoinTokenRecord {
    JoinTokenRecord {
        id: id.into(),
        expires_at: 1234,
        alias: alias.map(Into::into),
    }
}

fn join_tokens_are_taken_once(f: &dyn Fixture) {
    let s = f.store(0);
    let (h1, h2) = ([7u8; 32], [3u8; 32]);
    s.put_join_token(&h1, &token("x", Some("spiffe://td/alias")))
        .unwrap();
    s.put_join_token(&h2, &token("y", None)).unwrap();
    assert_eq!(
        s.list_join_tokens().unwrap(),
        [
            (h2, token("y", None)),
            (h1, token("x", Some("spiffe://td/alias")))
        ]
    );
    assert_eq!(
        s.take_join_token(&h1).unwrap(),
        Some(token("x", Some("spiffe://td/alias")))
    );
    assert_eq!(s.take_join_token(&h1).unwrap(), None);
    assert_eq!(
        f.store(1).take_join_token(&h2).unwrap(),
        Some(token("y", None))
    );
    assert_eq!(s.take_join_token(&h2).unwrap(), None);
    assert!(s.list_join_tokens().unwrap().is_empty());
}

/// Compaction removes changes below a revision (never the newest), raises the floor on
/// every server and never lowers it; pruning removes only tokens expired before a time.
fn change_log_compaction_and_token_pruning(f: &dyn Fixture) {
    let (s, other) = (f.store(0), f.store(1));
    let (pa, pb) = ("spiffe://td/agent/a", "spiffe://td/agent/b");
    assert_eq!(s.change_log_floor().unwrap(), 0);
    assert_eq!(s.compact_change_log(100).unwrap(), 0, "an empty log");
    let a1 = s
        .create_entry(entry("a1", "spiffe://td/w1", pa, "unix:uid:1"))
        .unwrap();
    let b1 = s
        .create_entry(entry("b1", "spiffe://td/w2", pb, "unix:uid:2"))
        .unwrap();
    let a2 = s
        .create_entry(entry("a2", "spiffe://td/w3", pa, "unix:uid:3"))
        .unwrap();
    s.delete_entry("b1").unwrap();
    let current = s.current_revision().unwrap();
    // Below b1: only a1 goes, from both logs.
    assert_eq!(s.compact_change_log(b1.revision).unwrap(), 1);
    assert_eq!(other.change_log_floor().unwrap(), a1.revision);
    assert_eq!(changes(&*other, Some(pa), 0), [("a2".into(), false)]);
    assert_eq!(changes(&*other, None, 0).len(), 3);
    // A lower point changes nothing and never lowers the floor.
    assert_eq!(other.compact_change_log(a1.revision).unwrap(), 0);
    assert_eq!(s.change_log_floor().unwrap(), a1.revision);
    // Past the end: everything but the newest change, which keeps the revision.
    assert_eq!(other.compact_change_log(u64::MAX - 1).unwrap(), 2);
    assert_eq!(s.current_revision().unwrap(), current);
    assert_eq!(s.change_log_floor().unwrap(), current - 1);
    assert_eq!(changes(&*s, None, 0), [("b1".into(), true)]);
    assert_eq!(changes(&*s, Some(pa), 0), []);
    assert_eq!(changes(&*s, Some(pb), a2.revision), [("b1".into(), true)]);
    // Entries themselves are untouched; new ones continue the revisions.
    assert_eq!(s.count_entries().unwrap(), 2);
    let a3 = s
        .create_entry(entry("a3", "spiffe://td/w4", pa, "unix:uid:4"))
        .unwrap();
    assert_eq!(a3.revision, current + 1);

    let expiring = |id: &str, expires_at: i64| JoinTokenRecord {
        id: id.into(),
        expires_at,
        alias: None,
    };
    s.put_join_token(&[1; 32], &expiring("old", 100)).unwrap();
    s.put_join_token(&[2; 32], &expiring("edge", 200)).unwrap();
    s.put_join_token(&[3; 32], &expiring("new", 300)).unwrap();
    assert_eq!(other.prune_join_tokens(200).unwrap(), 1);
    let left: Vec<String> = s
        .list_join_tokens()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.id)
        .collect();
    assert_eq!(left, ["edge", "new"]);
}

/// 8 threads on two servers take the same token at once, 200 times: exactly one gets it
/// each time.
fn join_token_taken_exactly_once_by_racing_servers(f: &dyn Fixture) {
    const THREADS: usize = 8;
    const ROUNDS: usize = 200;
    let stores = [f.store(0), f.store(1)];
    let start = Arc::new(Barrier::new(THREADS + 1));
    let done = Arc::new(Barrier::new(THREADS + 1));
    let winners = Arc::new(AtomicUsize::new(0));
    let round_hash = Arc::new(Mutex::new([0u8; 32]));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, start, done, winners, round_hash) = (
                stores[t % 2].clone(),
                start.clone(),
                done.clone(),
                winners.clone(),
                round_hash.clone(),
            );
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    start.wait();
                    let hash = *round_hash.lock().unwrap();
                    if store.take_join_token(&hash).unwrap().is_some() {
                        winners.fetch_add(1, Ordering::SeqCst);
                    }
                    done.wait();
                }
            })
        })
        .collect();
    for round in 0..ROUNDS {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&(round as u64).to_be_bytes());
        stores[round % 2]
            .put_join_token(&hash, &token(&format!("t{round}"), None))
            .unwrap();
        *round_hash.lock().unwrap() = hash;
        winners.store(0, Ordering::SeqCst);
        start.wait();
        done.wait();
        assert_eq!(
            winners.load(Ordering::SeqCst),
            1,
            "round {round}: the token must be taken exactly once"
        );
    }
    for w in workers {
        w.join().unwrap();
    }
}

fn ca_state_per_server_and_bundle_sequence(f: &dyn Fixture) {
    let a = f.store(0);
    assert_eq!(a.load_ca_state().unwrap(), None);
    assert!(a.cluster_ca_states().unwrap().is_empty());
    let state_a = CaState {
        x509: vec![authority("a1")],
        jwt: vec![authority("aj")],
        bundle_sequence: 9,
        retired_at: None,
    };
    a.store_ca_state(&state_a).unwrap();
    assert_eq!(a.load_ca_state().unwrap().as_ref(), Some(&state_a));
    let seq1 = a.next_bundle_sequence().unwrap();
    assert!(seq1 > 9, "above every stored bundle_sequence: {seq1}");
    let seq2 = a.next_bundle_sequence().unwrap();
    assert!(seq2 > seq1);
    if f.clustered() {
        let b = f.store(1);
        assert_eq!(
            b.load_ca_state().unwrap(),
            None,
            "each server its own state"
        );
        let state_b = CaState {
            x509: vec![authority("b1")],
            jwt: vec![],
            bundle_sequence: 40,
            retired_at: None,
        };
        b.store_ca_state(&state_b).unwrap();
        assert_eq!(
            a.cluster_ca_states().unwrap(),
            [
                (a.server_id().to_string(), state_a.clone()),
                (b.server_id().to_string(), state_b.clone())
            ]
        );
        assert_eq!(a.load_ca_state().unwrap().as_ref(), Some(&state_a));
        let seq3 = b.next_bundle_sequence().unwrap();
        assert!(seq3 > 40 && seq3 > seq2, "cluster-wide: {seq3}");
        assert!(a.next_bundle_sequence().unwrap() > seq3);
        // A retires B: only over the state it read; then B may not write its own again.
        let mut retired = state_b.clone();
        retired.retired_at = Some(77);
        let stale = CaState {
            bundle_sequence: 39,
            ..state_b.clone()
        };
        assert!(!a
            .compare_and_swap_peer_ca_state(b.server_id(), &stale, &retired)
            .unwrap());
        assert!(a
            .compare_and_swap_peer_ca_state(b.server_id(), &state_b, &retired)
            .unwrap());
        assert_eq!(b.load_ca_state().unwrap(), Some(retired.clone()));
        let e = b.store_ca_state(&state_b).unwrap_err();
        assert!(
            matches!(&e, Error::Precondition(m) if m.contains("retired")),
            "{e}"
        );
        assert_eq!(b.load_ca_state().unwrap(), Some(retired));
    } else {
        assert_eq!(
            a.cluster_ca_states().unwrap(),
            [(a.server_id().to_string(), state_a.clone())]
        );
        let e = a
            .compare_and_swap_peer_ca_state("another", &state_a, &state_a)
            .unwrap_err();
        assert!(matches!(&e, Error::Precondition(_)), "{e}");
    }
}

fn audit_anchor_per_server_only_moves_forward(f: &dyn Fixture) {
    let s = f.store(0);
    assert_eq!(s.audit_anchor().unwrap(), None);
    assert!(s.advance_audit_anchor(5, b"five").unwrap());
    assert!(s.advance_audit_anchor(9, b"nine").unwrap());
    assert!(!s.advance_audit_anchor(7, b"seven").unwrap());
    assert!(s.advance_audit_anchor(9, b"nine again").unwrap());
    assert_eq!(
        s.audit_anchor().unwrap().as_deref(),
        Some(&b"nine again"[..])
    );
    s.replace_audit_anchor(3, b"three").unwrap();
    assert_eq!(s.audit_anchor().unwrap().as_deref(), Some(&b"three"[..]));
    assert!(s.advance_audit_anchor(4, b"four").unwrap());
    if f.clustered() {
        let b = f.store(1);
        assert_eq!(
            b.audit_anchor().unwrap(),
            None,
            "each server its own anchor"
        );
        assert!(b.advance_audit_anchor(1, b"b-one").unwrap());
        assert_eq!(s.audit_anchor().unwrap().as_deref(), Some(&b"four"[..]));
    }
}

fn federation_records(f: &dyn Fixture) {
    let s = f.store(0);
    s.put_federated_bundle("b.example", b"bundle-b").unwrap();
    s.put_federated_bundle("a.example", b"bundle-a").unwrap();
    s.put_federated_bundle("b.example", b"bundle-b2").unwrap();
    assert_eq!(
        s.get_federated_bundle("b.example").unwrap().as_deref(),
        Some(&b"bundle-b2"[..])
    );
    assert_eq!(s.get_federated_bundle("c.example").unwrap(), None);
    assert_eq!(
        s.list_federated_bundles().unwrap(),
        [b"bundle-a".to_vec(), b"bundle-b2".to_vec()]
    );
    assert_eq!(
        s.delete_federated_bundle("a.example").unwrap().as_deref(),
        Some(&b"bundle-a"[..])
    );
    assert_eq!(s.delete_federated_bundle("a.example").unwrap(), None);
    s.put_federation("z.example", b"rel-z").unwrap();
    s.put_federation("y.example", b"rel-y").unwrap();
    assert_eq!(
        f.store(1).list_federations().unwrap(),
        [b"rel-y".to_vec(), b"rel-z".to_vec()]
    );
    assert_eq!(
        s.delete_federation("z.example").unwrap().as_deref(),
        Some(&b"rel-z"[..])
    );
    assert_eq!(s.delete_federation("z.example").unwrap(), None);
    assert_eq!(s.list_federations().unwrap(), [b"rel-y".to_vec()]);
}

fn federated_bundle_compare_and_put(f: &dyn Fixture) {
    let (s, other) = (f.store(0), f.store(1));
    let td = "peer.example";
    // Absent: only a writer that expects none stores.
    assert!(!s
        .compare_and_put_federated_bundle(td, Some(b"v0"), None, b"v1")
        .unwrap());
    assert!(s
        .compare_and_put_federated_bundle(td, None, None, b"v1")
        .unwrap());
    assert!(!other
        .compare_and_put_federated_bundle(td, None, None, b"v1b")
        .unwrap());
    // Present: the expected bytes, exactly.
    assert!(!other
        .compare_and_put_federated_bundle(td, Some(b"v0"), None, b"v2")
        .unwrap());
    assert!(other
        .compare_and_put_federated_bundle(td, Some(b"v1"), None, b"v2")
        .unwrap());
    assert_eq!(
        s.get_federated_bundle(td).unwrap().as_deref(),
        Some(&b"v2"[..])
    );
    // Bound to a relationship: absent, other bytes, or deleted means nothing written.
    assert!(!s
        .compare_and_put_federated_bundle(td, Some(b"v2"), Some(b"rel-1"), b"v3")
        .unwrap());
    s.put_federation(td, b"rel-1").unwrap();
    assert!(!s
        .compare_and_put_federated_bundle(td, Some(b"v2"), Some(b"rel-0"), b"v3")
        .unwrap());
    assert!(other
        .compare_and_put_federated_bundle(td, Some(b"v2"), Some(b"rel-1"), b"v3")
        .unwrap());
    // The relationship's own swap: exact bytes, and never onto a deleted one.
    assert!(!other
        .compare_and_swap_federation(td, b"rel-0", b"rel-2")
        .unwrap());
    assert!(other
        .compare_and_swap_federation(td, b"rel-1", b"rel-2")
        .unwrap());
    assert!(!s
        .compare_and_put_federated_bundle(td, Some(b"v3"), Some(b"rel-1"), b"v4")
        .unwrap());
    s.delete_federation(td).unwrap();
    assert!(!s
        .compare_and_swap_federation(td, b"rel-2", b"rel-3")
        .unwrap());
    assert_eq!(s.list_federations().unwrap(), Vec::<Vec<u8>>::new());
    assert_eq!(
        other.get_federated_bundle(td).unwrap().as_deref(),
        Some(&b"v3"[..])
    );
}

/// A relationship deleted through one server while another stores bundles bound to it:
/// once the delete has returned, no such store lands (on PostgreSQL the store holds
/// the relationship's row, so the delete either comes first or waits for it).
fn federated_bundle_never_outlives_its_relationship_deleted(f: &dyn Fixture) {
    let td = "peer.example";
    let (poller, operator) = (f.store(0), f.store(1));
    operator.put_federation(td, b"rel").unwrap();
    let (stores, tries) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (poller, stores, tries, stop) =
            (poller.clone(), stores.clone(), tries.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let cur = poller.get_federated_bundle(td).unwrap();
                n += 1;
                let next = n.to_string().into_bytes();
                if poller
                    .compare_and_put_federated_bundle(td, cur.as_deref(), Some(b"rel"), &next)
                    .unwrap()
                {
                    stores.fetch_add(1, Ordering::SeqCst);
                }
                tries.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // Let the writer land some stores, then cut the relationship.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stores.load(Ordering::SeqCst) < 20 {
        assert!(Instant::now() < deadline, "the writer stored nothing");
        std::thread::yield_now();
    }
    operator.delete_federation(td).unwrap();
    let at_delete = operator.get_federated_bundle(td).unwrap();
    assert!(at_delete.is_some());
    // The writer keeps trying after the delete (50 more tries); none of it may land.
    let after = tries.load(Ordering::SeqCst) + 50;
    while tries.load(Ordering::SeqCst) < after {
        assert!(Instant::now() < deadline, "the writer stopped trying");
        std::thread::yield_now();
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(
        poller.get_federated_bundle(td).unwrap(),
        at_delete,
        "a bundle bound to the deleted relationship was stored after the delete"
    );
}

fn grant(id: &str, spiffe_id: &str, audience: &str) -> GrantRecord {
    GrantRecord {
        id: id.into(),
        spiffe_id: spiffe_id.into(),
        audience: audience.into(),
        scopes: vec!["tools.read".into(), "tools.write".into()],
        ttl_seconds: 300,
        max_per_minute: 60,
        node_selectors: vec!["tpm:ek-hash:ab".into()],
        may_delegate: true,
        created_at: 1_700_000_000,
    }
}

fn grants_are_stored_listed_and_deleted(f: &dyn Fixture) {
    let s = f.store(0);
    assert_eq!(s.list_grants().unwrap(), []);
    assert_eq!(s.get_grant("b").unwrap(), None);
    let b = grant("b", "spiffe://example.org/app", "https://mcp.example");
    let a = grant("a", "spiffe://example.org/other", "aud");
    s.put_grant(&b).unwrap();
    s.put_grant(&a).unwrap();
    assert_eq!(s.get_grant("b").unwrap().as_ref(), Some(&b));
    // Every server sees it, ordered by id.
    assert_eq!(f.store(1).list_grants().unwrap(), [a.clone(), b.clone()]);
    // Put replaces.
    let mut b2 = b.clone();
    b2.scopes = vec!["only".into()];
    b2.may_delegate = false;
    s.put_grant(&b2).unwrap();
    assert_eq!(f.store(1).get_grant("b").unwrap().as_ref(), Some(&b2));
    assert_eq!(s.list_grants().unwrap().len(), 2);
    assert_eq!(f.store(1).delete_grant("b").unwrap().as_ref(), Some(&b2));
    assert_eq!(s.delete_grant("b").unwrap(), None);
    assert_eq!(s.get_grant("b").unwrap(), None);
    assert_eq!(s.list_grants().unwrap(), [a]);
}

fn revocation(
    kind: RevocationKind,
    target: &str,
    revoked_at: i64,
    expires_at: i64,
) -> RevocationRecord {
    RevocationRecord {
        kind,
        target: target.into(),
        spiffe_id: match kind {
            RevocationKind::Entry => "spiffe://example.org/app".into(),
            RevocationKind::Instance | RevocationKind::Admin => target.into(),
            RevocationKind::Node => String::new(),
        },
        revoked_at,
        expires_at,
        reason: "compromised".into(),
    }
}

fn revocations_are_keyed_by_kind_and_target_and_pruned(f: &dyn Fixture) {
    let s = f.store(0);
    assert_eq!(s.list_revocations().unwrap(), []);
    let node = revocation(
        RevocationKind::Node,
        "spiffe://example.org/ztid/agent/x/n1",
        100,
        200,
    );
    let entry = revocation(RevocationKind::Entry, "e1", 100, 300);
    let instance = revocation(
        RevocationKind::Instance,
        "spiffe://example.org/app/1",
        100,
        400,
    );
    // The same target under two kinds: two records.
    let instance_e1 = revocation(RevocationKind::Instance, "e1", 100, 500);
    let admin = revocation(
        RevocationKind::Admin,
        "spiffe://example.org/ztid/admin/alice",
        100,
        600,
    );
    for r in [&node, &instance, &entry, &instance_e1, &admin] {
        s.put_revocation(r).unwrap();
    }
    // Ordered by kind, then target; every server sees them.
    assert_eq!(
        f.store(1).list_revocations().unwrap(),
        [
            admin.clone(),
            entry.clone(),
            instance_e1.clone(),
            instance.clone(),
            node.clone()
        ]
    );
    // Revoking the same target again replaces the record.
    let entry_again = revocation(RevocationKind::Entry, "e1", 150, 350);
    f.store(1).put_revocation(&entry_again).unwrap();
    let listed = s.list_revocations().unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(listed[1], entry_again);
    // Pruning removes what expired before the time given, nothing else.
    assert_eq!(s.prune_revocations(200).unwrap(), 0);
    assert_eq!(s.prune_revocations(351).unwrap(), 2);
    assert_eq!(
        f.store(1).list_revocations().unwrap(),
        [admin, instance_e1, instance]
    );
    assert_eq!(s.prune_revocations(351).unwrap(), 0);
}

fn grants_and_revocations_are_bounded(f: &dyn Fixture) {
    let s = f.store(0);
    let g = |i: usize| grant(&format!("g{i:05}"), "spiffe://example.org/app", "aud");
    let r = |i: usize| {
        revocation(
            RevocationKind::Instance,
            &format!("spiffe://example.org/app/{i:05}"),
            1,
            2,
        )
    };
    // Filled to one short of each bound.
    f.prefill(MAX_GRANTS - 1, MAX_REVOCATIONS - 1, &g, &r);
    // The last slot, raced for by two servers: exactly one gets it.
    let winners = std::thread::scope(|scope| {
        let racers: Vec<_> = [MAX_GRANTS, MAX_GRANTS + 1]
            .into_iter()
            .enumerate()
            .map(|(t, i)| {
                let s = f.store(t);
                let g = &g;
                scope.spawn(move || s.put_grant(&g(i)))
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|h| h.join().unwrap()).collect();
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(matches!(e, Error::Precondition(_)), "{e:?}");
        }
        results.iter().filter(|r| r.is_ok()).count()
    });
    assert_eq!(winners, 1);
    assert_eq!(s.list_grants().unwrap().len(), MAX_GRANTS);
    // Full: a new one is refused, a replacement is not, and a deletion makes room.
    let e = s.put_grant(&g(MAX_GRANTS + 2)).unwrap_err();
    assert!(matches!(e, Error::Precondition(_)), "{e:?}");
    let mut replaced = g(0);
    replaced.audience = "other".into();
    s.put_grant(&replaced).unwrap();
    assert_eq!(s.get_grant("g00000").unwrap(), Some(replaced));
    s.delete_grant("g00001").unwrap().unwrap();
    s.put_grant(&g(MAX_GRANTS + 2)).unwrap();

    s.put_revocation(&r(MAX_REVOCATIONS - 1)).unwrap();
    let e = f.store(1).put_revocation(&r(MAX_REVOCATIONS)).unwrap_err();
    assert!(matches!(e, Error::Precondition(_)), "{e:?}");
    // Admin revocations are counted apart: a full kill switch table does not keep an
    // admin's credentials from being revoked, and they have a bound of their own.
    let admin = |i: usize| {
        revocation(
            RevocationKind::Admin,
            &format!("spiffe://example.org/ztid/admin/a{i:04}"),
            1,
            2,
        )
    };
    for i in 0..MAX_ADMIN_REVOCATIONS {
        f.store(i % 2).put_revocation(&admin(i)).unwrap();
    }
    let e = s.put_revocation(&admin(MAX_ADMIN_REVOCATIONS)).unwrap_err();
    assert!(
        matches!(&e, Error::Precondition(m) if m.contains("admin credential revocations")),
        "{e:?}"
    );
    let listed = f.store(1).list_revocations().unwrap();
    assert_eq!(listed.len(), MAX_REVOCATIONS + MAX_ADMIN_REVOCATIONS);
    assert!(listed[..MAX_ADMIN_REVOCATIONS]
        .iter()
        .all(|r| r.kind == RevocationKind::Admin));

    let mut again = r(0);
    again.expires_at = 10;
    s.put_revocation(&again).unwrap();
    assert_eq!(
        s.list_revocations().unwrap().len(),
        MAX_REVOCATIONS + MAX_ADMIN_REVOCATIONS
    );
    // Pruning makes room, in both.
    assert_eq!(
        s.prune_revocations(5).unwrap(),
        (MAX_REVOCATIONS - 1 + MAX_ADMIN_REVOCATIONS) as u64
    );
    s.put_revocation(&r(MAX_REVOCATIONS)).unwrap();
    s.put_revocation(&admin(MAX_ADMIN_REVOCATIONS)).unwrap();
}

fn changes_are_announced_to_every_server(f: &dyn Fixture) {
    let writer = f.store(0);
    // Another server's subscription (the same store when there is one server).
    let mut rx = f.store(1).subscribe_changes();
    drain(&mut rx);
    writer
        .create_entry(entry("a", "spiffe://td/w", "spiffe://td/p", "unix:uid:1"))
        .unwrap();
    assert!(wait_for_topic(&mut rx, ChangeTopic::Entries));
    let mut a = agent("spiffe://td/agent/x", "01");
    writer.put_agent(&a).unwrap();
    assert!(wait_for_topic(&mut rx, ChangeTopic::Agents));
    writer.store_ca_state(&CaState::default()).unwrap();
    assert!(wait_for_topic(&mut rx, ChangeTopic::Authorities));
    writer.put_federation("x.example", b"r").unwrap();
    assert!(wait_for_topic(&mut rx, ChangeTopic::Federation));
    a.banned = true;
    writer.put_agent(&a).unwrap();
    assert!(
        wait_for_topic(&mut rx, ChangeTopic::Agents),
        "a ban is announced"
    );
    writer.delete_agent(&a.spiffe_id).unwrap();
    assert!(
        wait_for_topic(&mut rx, ChangeTopic::Agents),
        "an eviction is announced"
    );
    writer.delete_entry("a").unwrap();
    assert!(wait_for_topic(&mut rx, ChangeTopic::Entries));
    // The bookkeeping of a sync is not announced: after it, the next thing received is
    // the entry change that follows it.
    writer.put_agent(&a).unwrap();
    assert!(wait_for_topic(&mut rx, ChangeTopic::Agents));
    drain(&mut rx);
    a.last_sync_at = 99;
    a.authorities_in_use = vec!["x".into()];
    writer.put_agent(&a).unwrap();
    writer
        .create_entry(entry("b", "spiffe://td/w", "spiffe://td/p", "unix:uid:1"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        match rx.try_recv() {
            Ok(t) => break t,
            Err(TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("no notification: {e:?}"),
        }
    };
    assert_eq!(first, ChangeTopic::Entries);
}

fn leader_role_is_held_by_one_server(f: &dyn Fixture) {
    let a = f.store(0);
    let guard = a.try_leader("federation").unwrap().expect("granted");
    assert!(guard.is_held());
    if !f.clustered() {
        return;
    }
    let b = f.store(1);
    assert!(b.try_leader("federation").unwrap().is_none(), "held by a");
    let other = b
        .try_leader("pruning")
        .unwrap()
        .expect("another role is free");
    assert!(other.is_held());
    drop(guard);
    // The lock goes with the session, which closes asynchronously.
    let deadline = Instant::now() + Duration::from_secs(10);
    let taken = loop {
        if let Some(g) = b.try_leader("federation").unwrap() {
            break g;
        }
        assert!(Instant::now() < deadline, "the role was not released");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(taken.is_held());
    assert!(a.try_leader("federation").unwrap().is_none());
}

fn revisions_only_grow(f: &dyn Fixture) {
    const THREADS: usize = 6;
    const EACH: usize = 40;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, seen) = (f.store(t % 3), seen.clone());
            std::thread::spawn(move || {
                let mut last = 0;
                for i in 0..EACH {
                    let e = store
                        .create_entry(entry(
                            &format!("t{t}-{i}"),
                            &format!("spiffe://td/w{t}"),
                            "spiffe://td/p",
                            &format!("unix:uid:{i}"),
                        ))
                        .unwrap();
                    assert!(e.revision > last, "one writer's revisions grow");
                    last = e.revision;
                    seen.lock().unwrap().push(e.revision);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let s = f.store(0);
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), THREADS * EACH, "no revision drawn twice");
    let log: Vec<u64> = s
        .entry_changes_since(0)
        .unwrap()
        .iter()
        .map(|c| c.revision)
        .collect();
    assert_eq!(
        log, seen,
        "the log holds each change once, in revision order"
    );
    assert_eq!(s.current_revision().unwrap(), *seen.last().unwrap());
    assert_eq!(s.count_entries().unwrap(), THREADS * EACH);
}

/// Writers on three servers create, move and delete entries concurrently while a reader
/// syncs "changes since the last revision I saw" every few milliseconds (the whole log,
/// and one parent's). The reader's replayed state equals the table at the end: no
/// change committed late with a lower revision was skipped.
fn a_syncing_reader_never_misses_a_change(f: &dyn Fixture) {
    const THREADS: usize = 6;
    const EACH: usize = 120;
    let parents = ["spiffe://td/agent/a", "spiffe://td/agent/b"];
    // Writers pause every CHECKPOINT writes until the reader has finished another poll,
    // so reads interleave with writes however fast the store is (no timing guess).
    const CHECKPOINT: usize = 10;
    let stop = Arc::new(AtomicBool::new(false));
    let poll_count = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (store, stop, poll_count) = (f.store(0), stop.clone(), poll_count.clone());
        std::thread::spawn(move || {
            let mut all = BTreeSet::new();
            let mut one = BTreeSet::new();
            let (mut last_all, mut last_one) = (0, 0);
            let mut polls = 0usize;
            loop {
                let finished = stop.load(Ordering::SeqCst);
                for c in store.entry_changes_since(last_all).unwrap() {
                    assert!(c.revision > last_all);
                    last_all = c.revision;
                    if c.deleted {
                        all.remove(&c.entry_id);
                    } else {
                        all.insert(c.entry_id);
                    }
                }
                for c in store
                    .entry_changes_for_parent_since(parents[0], last_one)
                    .unwrap()
                {
                    assert!(c.revision > last_one);
                    last_one = c.revision;
                    if c.deleted {
                        one.remove(&c.entry_id);
                    } else {
                        one.insert(c.entry_id);
                    }
                }
                polls += 1;
                poll_count.store(polls, Ordering::SeqCst);
                if finished {
                    return (all, one, polls);
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, poll_count) = (f.store(t % 3), poll_count.clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                let mut polls_seen = poll_count.load(Ordering::SeqCst);
                for i in 0..EACH {
                    if i % CHECKPOINT == CHECKPOINT - 1 {
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while poll_count.load(Ordering::SeqCst) <= polls_seen {
                            assert!(Instant::now() < deadline, "the reader stalled");
                            std::thread::yield_now();
                        }
                        polls_seen = poll_count.load(Ordering::SeqCst);
                    }
                    let id = format!("w{t}-{i}");
                    let e = store
                        .create_entry(entry(
                            &id,
                            &format!("spiffe://td/w{t}/{i}"),
                            parents[i % 2],
                            "unix:uid:1",
                        ))
                        .unwrap();
                    mine.push(e);
                    if i % 5 == 4 {
                        let gone = mine.remove(mine.len() / 2);
                        store.delete_entry(&gone.id).unwrap().unwrap();
                    }
                    if i % 7 == 6 {
                        let k = mine.len() / 3;
                        let mut moved = mine[k].clone();
                        moved.parent_id = parents[(i / 7) % 2].into();
                        mine[k] = store.update_entry(moved).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let (all, one, polls) = reader.join().unwrap();
    let s = f.store(0);
    let table: BTreeSet<String> = s
        .list_entries(&EntryFilter::default())
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let table_one: BTreeSet<String> = s
        .list_entries(&EntryFilter {
            parent_id: Some(parents[0].into()),
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert!(
        polls > 10,
        "the reader synced during the writes ({polls} polls)"
    );
    assert_eq!(table.len(), THREADS * (EACH - EACH / 5));
    assert_eq!(all, table, "the reader's state is the table's");
    assert_eq!(
        one, table_one,
        "one parent's reader's state is that parent's"
    );
}

fn callable_from_any_kind_of_thread(f: &dyn Fixture) {
    let s = f.store(0);
    s.put_agent(&agent("spiffe://td/agent/rt", "01")).unwrap();
    // A multi-thread runtime's worker (the server), directly and from spawn_blocking.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s2 = s.clone();
    rt.block_on(async move {
        let direct = tokio::spawn({
            let s = s2.clone();
            async move { s.get_agent("spiffe://td/agent/rt").unwrap().is_some() }
        });
        assert!(direct.await.unwrap());
        let s = s2.clone();
        let blocking = tokio::task::spawn_blocking(move || s.count_agents().unwrap())
            .await
            .unwrap();
        assert_eq!(blocking, 1);
        assert_eq!(s2.count_agents().unwrap(), 1, "in block_on itself");
    });
    // A current-thread runtime (some tests).
    let ct = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s3 = s.clone();
    ct.block_on(async move {
        assert_eq!(s3.count_agents().unwrap(), 1);
        let t = tokio::spawn({
            let s = s3.clone();
            async move { s.get_agent("spiffe://td/agent/rt").unwrap() }
        });
        assert!(t.await.unwrap().is_some());
    });
    // A store released inside a task does not panic.
    if f.clustered() {
        let extra = f.store(7);
        rt.block_on(async move { drop(extra) });
    }
}

// ---------------------------------------------------------------------------------
// PostgreSQL only

fn is_database_error<T>(r: &ztid_ca::Result<T>) -> bool {
    matches!(
        r,
        Err(Error::Store(
            StoreError::Database(_) | StoreError::Unreachable(_)
        ))
    )
}

/// The database restarts (a clean stop, then a crash) under two stores: calls made
/// while it is down fail with a datastore error, the first call after it is back
/// succeeds, leader roles held before are lost, and notifications flow again.
#[test]
fn postgres_restart_fails_calls_cleanly_then_recovers() {
    let mut pg = TestPostgres::start();
    let url = pg.url();
    let fast = |url: &str, id: &str, pw: &str| {
        let mut o = PgOptions::new(url, Some(pw.to_string()), id);
        o.connect_timeout = Duration::from_secs(2);
        o.call_timeout = Duration::from_secs(5);
        PgStore::connect(o).unwrap()
    };
    let a = fast(&url, "a", pg.password());
    let b = fast(&url, "b", pg.password());
    let mut rx = b.subscribe_changes();
    a.create_entry(entry(
        "before",
        "spiffe://td/w",
        "spiffe://td/p",
        "unix:uid:1",
    ))
    .unwrap();
    let guard = a.try_leader("federation").unwrap().unwrap();
    for crash in [false, true] {
        if crash {
            pg.kill();
        } else {
            pg.stop();
        }
        let t = Instant::now();
        let r = a.get_entry("before");
        assert!(is_database_error(&r), "during the outage: {r:?}");
        assert!(is_database_error(&a.create_entry(entry(
            "x",
            "spiffe://td/x",
            "spiffe://td/p",
            "unix:uid:1"
        ))),);
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "failed in bounded time"
        );
        assert!(!guard.is_held() || crash, "the role went with its session");
        pg.start_again();
        drain(&mut rx);
        assert_eq!(
            a.get_entry("before").unwrap().unwrap().id,
            "before",
            "the first call after the restart succeeds"
        );
        let id = format!("after-{crash}");
        a.create_entry(entry(
            &id,
            &format!("spiffe://td/{id}"),
            "spiffe://td/p",
            "unix:uid:1",
        ))
        .unwrap();
        assert!(b.get_entry(&id).unwrap().is_some());
        assert!(
            wait_for_topic(&mut rx, ChangeTopic::Entries),
            "notifications flow again after the listener reconnects"
        );
    }
    assert!(!guard.is_held());
    assert!(b.try_leader("federation").unwrap().is_some());
    assert_eq!(a.count_entries().unwrap(), 3);
    let revs: Vec<u64> = a
        .entry_changes_since(0)
        .unwrap()
        .iter()
        .map(|c| c.revision)
        .collect();
    assert_eq!(revs.len(), 3);
}

#[test]
fn postgres_url_rules() {
    let pg = shared_postgres();
    let url = fresh_database(&pg);
    // A password in the URL is refused before any connection.
    let with_password = url.replacen("ztid@", &format!("ztid:{}@", pg.password()), 1);
    let r = PgStore::connect(PgOptions::new(&with_password, None, "a"));
    assert!(matches!(r, Err(Error::Config(_))), "{:?}", r.err());
    let r = PgStore::connect(PgOptions::new(
        format!("{url}&password={}", pg.password()),
        None,
        "a",
    ));
    assert!(matches!(r, Err(Error::Config(_))), "{:?}", r.err());
    // Plaintext to a host that is not this machine is refused.
    let remote = url.replacen("127.0.0.1", "db.invalid", 1);
    let r = PgStore::connect(PgOptions::new(&remote, Some("x".into()), "a"));
    assert!(matches!(r, Err(Error::Config(_))), "{:?}", r.err());
    // A wrong password is the database's refusal.
    let r = PgStore::connect(PgOptions::new(&url, Some("wrong".into()), "a"));
    assert!(is_database_error(&r), "{:?}", r.err());
    // The Unix socket needs no TLS.
    let socket = pg.socket_url();
    let socket = format!(
        "{}/{}",
        &socket[..socket.rfind('/').unwrap()],
        db_name(&url)
    );
    let s = connect(&socket, pg.password(), "sock");
    assert_eq!(s.count_entries().unwrap(), 0);
}

/// Any role that may connect to the database may `NOTIFY ztid_changes` (PostgreSQL has
/// no privilege on notification channels). A flood of them from such a role must not
/// overrun a subscriber (which it takes as "anything may have changed": every agent
/// told to sync) nor reach it more than once per topic per coalescing window; and a real
/// change after the flood still reaches it.
#[test]
fn postgres_forged_notification_flood_is_coalesced() {
    let pg = shared_postgres();
    let (url, database) = fresh_named_database(&pg);
    let store = connect(&url, pg.password(), "server-0");
    let mut rx = store.subscribe_changes();
    drain(&mut rx);
    // A role with nothing granted, as a monitoring or another application's role would
    // be: connecting is all it needs (PUBLIC may connect to a new database).
    pg.psql_in(
        &database,
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mallory_notifies') THEN \
         CREATE ROLE mallory_notifies LOGIN PASSWORD 'mallory-pw'; END IF; END $$",
    );
    // Each COMMIT sends its notifications (duplicates merge only within a transaction).
    pg.psql_as(
        "mallory_notifies",
        "mallory-pw",
        &database,
        "DO $$ BEGIN FOR i IN 1..2000 LOOP \
         PERFORM pg_notify('ztid_changes', 'agents'); COMMIT; END LOOP; END $$",
    );
    // Take what the listener passes on until it has been quiet for longer than a held
    // topic waits (a window).
    let started = Instant::now();
    let mut received = 0;
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(3) {
        match rx.try_recv() {
            Ok(t) => {
                assert_eq!(t, ChangeTopic::Agents);
                received += 1;
                last = Instant::now();
            }
            Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("the flood overran the subscriber: {e:?}"),
        }
    }
    // At most a burst (the listener's coalesce_burst for agents, 8) a second, plus one
    // held, however long the flood took to arrive.
    let most = 8 * (started.elapsed().as_secs() as usize + 1) + 1;
    assert!(
        (1..=most).contains(&received),
        "2000 forged notifications reached the subscriber {received} times (at most {most})"
    );
    // Coalescing never drops: a real change right after still arrives.
    store
        .put_agent(&agent("spiffe://td/agent/after", "01"))
        .unwrap();
    assert!(wait_for_topic(&mut rx, ChangeTopic::Agents));
}

/// On PostgreSQL 14 (which the README supports) every role may create tables in schema
/// `public`. A role that gets to a new database before the first ztid-server does can
/// create the ztid tables itself, owned by it, record the migrations as done, and keep
/// reading and rewriting everything the servers store in them (entries, agents). A
/// server must refuse tables it does not own.
#[test]
fn postgres_refuses_tables_another_role_owns() {
    let pg = shared_postgres();
    let (url, database) = fresh_named_database(&pg);
    // PostgreSQL 14's default for schema public.
    pg.psql_in(
        &database,
        "GRANT CREATE ON SCHEMA public TO PUBLIC; \
         DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mallory_tables') THEN \
         CREATE ROLE mallory_tables LOGIN PASSWORD 'mallory-pw'; END IF; END $$",
    );
    let mut sql = String::from(
        "CREATE TABLE ztid_schema_migrations (version integer PRIMARY KEY, name text NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now());",
    );
    for m in [
        include_str!("../src/datastore/postgres/migrations/0001_initial.sql"),
        include_str!("../src/datastore/postgres/migrations/0002_grants_revocations.sql"),
        include_str!("../src/datastore/postgres/migrations/0003_admin_revocations.sql"),
        include_str!("../src/datastore/postgres/migrations/0004_hardware_bans.sql"),
    ] {
        sql.push_str(m);
        sql.push('\n');
    }
    sql.push_str(
        "INSERT INTO ztid_schema_migrations (version, name) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd'); \
         GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;",
    );
    pg.psql_as("mallory_tables", "mallory-pw", &database, &sql);
    let r = PgStore::connect(PgOptions::new(
        url.as_str(),
        Some(pg.password().to_string()),
        "server-0",
    ));
    match r {
        Err(Error::Store(StoreError::Database(m))) => {
            assert!(m.contains("owned by another role"), "{m}");
            assert!(m.contains("ztid_agents"), "names the tables: {m}");
        }
        Err(e) => panic!("not a database refusal: {e}"),
        Ok(_) => panic!("the server used tables another role owns"),
    }
}

fn db_name(url: &str) -> &str {
    &url[url.rfind('/').unwrap() + 1..url.find('?').unwrap_or(url.len())]
}

#[test]
fn postgres_tls_verifies_the_server() {
    let pg = TestPostgres::start_with_tls();
    let url = pg.url();
    assert!(url.contains("sslmode=verify-full"));
    let s = connect(&url, pg.password(), "tls");
    s.put_agent(&agent("spiffe://td/agent/tls", "01")).unwrap();
    assert_eq!(s.count_agents().unwrap(), 1);
    // By name: the certificate names localhost too.
    let by_name = url.replacen("127.0.0.1", "localhost", 1);
    assert_eq!(
        connect(&by_name, pg.password(), "tls2")
            .count_agents()
            .unwrap(),
        1
    );
    // Another CA: the handshake fails, nothing is sent.
    let (other_ca, _, _) = ztid_test_support::postgres::test_ca_and_server_cert("another CA");
    let wrong = pg.dir().join("wrong-ca.pem");
    std::fs::write(&wrong, other_ca).unwrap();
    let ca = pg.ca_cert_path().unwrap().display().to_string();
    let wrong_url = url.replacen(&ca, &wrong.display().to_string(), 1);
    let mut o = PgOptions::new(&wrong_url, Some(pg.password().into()), "tls3");
    o.connect_timeout = Duration::from_secs(3);
    o.call_timeout = Duration::from_secs(5);
    let r = PgStore::connect(o);
    assert!(is_database_error(&r), "{:?}", r.err());
    // The server certificate does not name this host.
    let unnamed = url.replacen("127.0.0.1", "127.0.0.2", 1);
    let mut o = PgOptions::new(&unnamed, Some(pg.password().into()), "tls4");
    o.connect_timeout = Duration::from_secs(3);
    o.call_timeout = Duration::from_secs(5);
    let r = PgStore::connect(o);
    assert!(is_database_error(&r), "{:?}", r.err());
}

#[test]
fn postgres_schema_migrates_once_and_refuses_a_newer_one() {
    let pg = shared_postgres();
    let url = fresh_database(&pg);
    // Four servers starting at once on an empty database: all start, one migrates.
    let starters: Vec<_> = (0..4)
        .map(|i| {
            let (url, pw) = (url.clone(), pg.password().to_string());
            std::thread::spawn(move || connect(&url, &pw, &format!("s{i}")))
        })
        .collect();
    let stores: Vec<PgStore> = starters.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(stores[3].current_revision().unwrap(), 0);
    let db = db_name(&url);
    assert_eq!(
        pg.psql_in(
            db,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM ztid_schema_migrations"
        ),
        (1..=PgStore::schema_version())
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    drop(stores);
    // A newer server migrated it: this one refuses to run.
    pg.psql_in(
        db,
        "INSERT INTO ztid_schema_migrations (version, name) VALUES (9999, 'from the future')",
    );
    let r = PgStore::connect(PgOptions::new(&url, Some(pg.password().into()), "old"));
    assert!(is_database_error(&r), "{:?}", r.err());
}

// ---------------------------------------------------------------------------------
// Hardware identifiers recorded with agent bans

fn hardware_ban(identifier: &str, agent: &str) -> HardwareBanRecord {
    HardwareBanRecord {
        identifier: identifier.into(),
        agent: agent.into(),
        banned_at: 1,
    }
}

/// The `i`-th filler identifier (`tpm:ek-hash:` and `i` as 64 hex digits).
fn filler_ek(i: usize) -> String {
    format!("tpm:ek-hash:{i:064x}")
}

fn hardware_bans_are_keyed_by_identifier_and_agent(f: &dyn Fixture) {
    let s = f.store(0);
    let ek = format!("tpm:ek-hash:{}", "ab".repeat(32));
    let chip = format!("sev-snp:chip-id:{}", "cd".repeat(64));
    let tpm_agent = format!("spiffe://example.org/ztid/agent/tpm/{}", "ab".repeat(32));
    let multi_agent = format!("spiffe://example.org/ztid/agent/multi/{}", "ef".repeat(32));
    assert!(s.list_hardware_bans().unwrap().is_empty());
    assert!(s
        .hardware_bans_of(std::slice::from_ref(&ek))
        .unwrap()
        .is_empty());

    s.put_hardware_bans(&[
        hardware_ban(&ek, &multi_agent),
        hardware_ban(&chip, &multi_agent),
    ])
    .unwrap();
    s.put_hardware_bans(&[hardware_ban(&ek, &tpm_agent)])
        .unwrap();
    // Nothing to record is no write.
    s.put_hardware_bans(&[]).unwrap();
    // Every server reads what one recorded, by identifier, ordered by identifier and
    // agent; an identifier no ban recorded finds nothing.
    let other = f.store(1);
    assert_eq!(
        other.hardware_bans_of(std::slice::from_ref(&ek)).unwrap(),
        vec![
            hardware_ban(&ek, &multi_agent),
            hardware_ban(&ek, &tpm_agent)
        ]
    );
    let unknown = format!("tpm:ek-hash:{}", "99".repeat(32));
    assert_eq!(
        other
            .hardware_bans_of(&[unknown.clone(), chip.clone()])
            .unwrap(),
        vec![hardware_ban(&chip, &multi_agent)]
    );
    assert!(other.hardware_bans_of(&[unknown]).unwrap().is_empty());
    assert!(other.hardware_bans_of(&[]).unwrap().is_empty());
    // An identifier is matched whole, never as a prefix of another.
    assert!(other
        .hardware_bans_of(&["tpm:ek-hash:ab".to_string()])
        .unwrap()
        .is_empty());
    assert_eq!(
        s.list_hardware_bans().unwrap(),
        vec![
            hardware_ban(&chip, &multi_agent),
            hardware_ban(&ek, &multi_agent),
            hardware_ban(&ek, &tpm_agent),
        ]
    );
    // Recorded again under the same identifier and agent: replaced, not added.
    let mut again = hardware_ban(&ek, &tpm_agent);
    again.banned_at = 9;
    s.put_hardware_bans(&[again.clone()]).unwrap();
    assert_eq!(s.list_hardware_bans().unwrap().len(), 3);
    assert_eq!(
        s.hardware_bans_of(std::slice::from_ref(&ek)).unwrap(),
        vec![hardware_ban(&ek, &multi_agent), again.clone()]
    );

    // Lifting one agent's ban removes what was recorded with it only.
    assert_eq!(other.delete_hardware_bans(&multi_agent).unwrap(), 2);
    assert_eq!(s.delete_hardware_bans(&multi_agent).unwrap(), 0);
    assert_eq!(
        s.hardware_bans_of(std::slice::from_ref(&ek)).unwrap(),
        vec![again]
    );
    assert!(s.hardware_bans_of(&[chip]).unwrap().is_empty());
    assert_eq!(s.delete_hardware_bans(&tpm_agent).unwrap(), 1);
    assert!(s.list_hardware_bans().unwrap().is_empty());
}

fn hardware_bans_are_bounded(f: &dyn Fixture) {
    let s = f.store(0);
    let agent = "spiffe://example.org/ztid/agent/multi/last";
    f.prefill_hardware_bans(MAX_HARDWARE_BANS - 1);
    // Two new ones with room for one: refused, and neither is written (all or none).
    let two = [
        hardware_ban(&filler_ek(MAX_HARDWARE_BANS), agent),
        hardware_ban(&filler_ek(MAX_HARDWARE_BANS + 1), agent),
    ];
    let e = s.put_hardware_bans(&two).unwrap_err();
    assert!(
        matches!(&e, Error::Precondition(m) if m.contains("hardware identifiers")),
        "{e:?}"
    );
    assert!(f
        .store(1)
        .hardware_bans_of(&[
            filler_ek(MAX_HARDWARE_BANS),
            filler_ek(MAX_HARDWARE_BANS + 1)
        ])
        .unwrap()
        .is_empty());
    // The last slot, raced for by two servers: exactly one gets it.
    let winners = std::thread::scope(|scope| {
        let racers: Vec<_> = two
            .iter()
            .enumerate()
            .map(|(t, ban)| {
                let s = f.store(t);
                scope.spawn(move || s.put_hardware_bans(std::slice::from_ref(ban)))
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|h| h.join().unwrap()).collect();
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(matches!(e, Error::Precondition(_)), "{e:?}");
        }
        results.iter().filter(|r| r.is_ok()).count()
    });
    assert_eq!(winners, 1);
    assert_eq!(s.list_hardware_bans().unwrap().len(), MAX_HARDWARE_BANS);
    // Full: a replacement is not refused; lifting a ban makes room.
    s.put_hardware_bans(&[hardware_ban(
        &filler_ek(0),
        "spiffe://example.org/ztid/agent/tpm/filler",
    )])
    .unwrap();
    let e = s
        .put_hardware_bans(&[hardware_ban(&filler_ek(MAX_HARDWARE_BANS + 2), agent)])
        .unwrap_err();
    assert!(matches!(e, Error::Precondition(_)), "{e:?}");
    assert_eq!(s.delete_hardware_bans(agent).unwrap(), 1);
    s.put_hardware_bans(&[hardware_ban(&filler_ek(MAX_HARDWARE_BANS + 2), agent)])
        .unwrap();
}
