//! The server core on PostgreSQL (issue 13): `CaCore` opened on a database the test
//! harness starts (`initdb` into a temporary directory), alone and as several servers
//! on one database.
//!
//! - one server: the `[datastore]` settings and their refusals, the stable server id,
//!   minting, and a restart that keeps entries, agents and authorities;
//! - two servers (two data directories, two server ids): each bundle is the union of
//!   both servers' X.509 and JWT authorities; a prepare, activate, taint or revoke
//!   through one server reaches the other's bundle after the change notification;
//!   another server's authority cannot be tainted or revoked (the owner is named);
//!   an eviction or ban through one server refuses the agent's next call at the other;
//!   the federation poller runs on exactly one of them;
//! - a second process under a running server's id does not start, a running server
//!   cannot be retired, and a stopped one retired through another server has every
//!   authority tainted, never starts again, and its authorities leave the bundle by a
//!   revoke through the other server once no agent depends on them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use ztid_ca::authority::Kind;
use ztid_ca::config::{DatastoreKind, ServerConfig};
use ztid_ca::core::{AuthenticatedAgent, CaCore};
use ztid_ca::datastore::EntryRecord;
use ztid_ca::{Error, RefusalKind};
use ztid_verifier::AttestedNode;

use crate::{attest, csr, wait_for, Cluster, DEADLINE, TD};

// ---------------------------------------------------------------------------------
// Helpers

fn refusal_kind<T: std::fmt::Debug>(r: ztid_ca::Result<T>) -> RefusalKind {
    match r {
        Err(Error::Refused(refusal)) => refusal.kind(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn x509_ids(core: &CaCore) -> Vec<String> {
    core.list_cluster_authorities(Kind::X509)
        .unwrap()
        .into_iter()
        .map(|(_, a)| a.id)
        .collect()
}

/// Whether `core`'s bundle holds the certificate of X.509 authority `id` (of any server).
fn bundle_has_x509(core: &CaCore, cert: &[u8]) -> bool {
    core.bundle().x509_authorities.iter().any(|c| c == cert)
}

fn bundle_has_jwt(core: &CaCore, kid: &str) -> bool {
    core.bundle().jwt_authorities.iter().any(|k| k.kid == kid)
}

/// The certificate of this server's active X.509 authority and its active JWT kid.
fn own_active(core: &CaCore) -> (Vec<u8>, String) {
    (
        core.authorities.x509().record().cert_der.clone(),
        core.authorities.jwt().record().id.clone(),
    )
}

// ---------------------------------------------------------------------------------
// One server

#[test]
fn datastore_settings_and_their_refusals() {
    let run = |args: &[&str]| {
        let cli = ztid_ca::cli::Cli::try_parse_from(
            ["ztid-server", "run", "--trust-domain", TD]
                .iter()
                .chain(args)
                .copied(),
        )
        .unwrap();
        let ztid_ca::cli::Command::Run(a) = cli.command else {
            panic!("not run")
        };
        ztid_ca::cli::run_config(&a, None).unwrap()
    };
    let c = run(&[]);
    assert_eq!(c.datastore.kind, DatastoreKind::Sled, "sled by default");
    c.validate().unwrap();
    let c = run(&[
        "--datastore",
        "postgres",
        "--datastore-url",
        "postgres://ztid@db:5432/ztid",
    ]);
    assert_eq!(c.datastore.kind, DatastoreKind::Postgres);
    assert_eq!(
        c.datastore.url.as_deref(),
        Some("postgres://ztid@db:5432/ztid")
    );
    c.validate().unwrap();
    // A URL without postgres, postgres without a URL.
    let e = run(&["--datastore-url", "postgres://ztid@db/ztid"])
        .validate()
        .unwrap_err();
    assert!(
        matches!(&e, Error::Config(m) if m.contains("--datastore postgres")),
        "{e}"
    );
    let e = run(&["--datastore", "postgres"]).validate().unwrap_err();
    assert!(
        matches!(&e, Error::Config(m) if m.contains("--datastore-url")),
        "{e}"
    );
    // No password on the command line: there is no flag for it.
    assert!(
        ztid_ca::cli::Cli::try_parse_from(["ztid-server", "run", "--datastore-password", "x"])
            .is_err()
    );
    // The config file: [datastore] with unknown keys refused.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("server.toml");
    std::fs::write(
        &f,
        "trust_domain = \"example.org\"\n[datastore]\nkind = \"postgres\"\nurl = \"postgres://ztid@db/ztid\"\npassword_file = \"/run/secrets/db\"\n",
    )
    .unwrap();
    let c = ServerConfig::from_file(&f).unwrap();
    assert_eq!(c.datastore.kind, DatastoreKind::Postgres);
    assert_eq!(
        c.datastore.password_file.as_deref(),
        Some(Path::new("/run/secrets/db"))
    );
    std::fs::write(&f, "[datastore]\npassword = \"x\"\n").unwrap();
    assert!(matches!(
        ServerConfig::from_file(&f).unwrap_err(),
        Error::Config(_)
    ));
}

#[test]
fn a_password_file_others_may_read_is_refused() {
    let cluster = Cluster::new();
    let pw = cluster.dir.path().join("db-password");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = CaCore::open(cluster.config("a")).err().unwrap();
    assert!(
        matches!(&e, Error::Config(m) if m.contains("accessible to others")),
        "{e}"
    );
    assert!(!e.to_string().contains(cluster.pg.password()));
}

#[test]
fn one_server_on_postgres_mints_and_keeps_its_state_across_restarts() {
    let cluster = Cluster::new();
    let (server_id, entry_id, agent_id, x509_id, jwt_id);
    {
        let core = cluster.open("a");
        // The server id: generated once, owner-only, what the store runs as.
        let file = cluster.dir.path().join("a").join("server-id");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        server_id = std::fs::read_to_string(&file).unwrap().trim().to_string();
        assert_eq!(core.server_id(), server_id);
        assert_eq!(core.store.server_id(), server_id);

        let (agent, leaf) = attest(&core, "node-1");
        agent_id = agent.spiffe_id.clone();
        let entry = core
            .create_entry(&ztid_proto::node::Entry {
                spiffe_id: format!("spiffe://{TD}/web"),
                parent_id: agent_id.clone(),
                selectors: vec![ztid_proto::node::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                shared: true,
                ..Default::default()
            })
            .unwrap();
        entry_id = entry.id.clone();
        let caller = core.authenticate_agent(Some(&leaf)).unwrap();
        let (id, svid) = core
            .sign_workload_svid(
                &caller,
                &entry_id,
                &csr(vec![rcgen::SanType::URI(
                    format!("spiffe://{TD}/web").try_into().unwrap(),
                )]),
            )
            .unwrap();
        assert_eq!(id, format!("spiffe://{TD}/web"));
        let roots: Vec<rustls_pki_types::CertificateDer<'static>> = core
            .bundle()
            .x509_authorities
            .iter()
            .cloned()
            .map(Into::into)
            .collect();
        let chain: Vec<rustls_pki_types::CertificateDer<'_>> =
            svid.chain.iter().map(|c| c.as_slice().into()).collect();
        ztid_spiffe::svid::verify_chain(
            &chain,
            &roots,
            rustls_pki_types::UnixTime::now(),
            ztid_spiffe::svid::Usage::Client,
        )
        .unwrap();
        let (token, _) = core
            .mint_jwt_svid(&caller, &entry_id, &id, &["https://api".into()])
            .unwrap();
        let bundle = core.bundle();
        ztid_spiffe::jwt::validate(&token, "https://api", ztid_ca::core::now(), |_| {
            Some(bundle.jwt_authorities.clone())
        })
        .unwrap();
        x509_id = core.authorities.x509().record().id.clone();
        jwt_id = core.authorities.jwt().record().id.clone();
    }
    // Restarted: same id, same authorities, the entry and the agent are still there.
    let core = cluster.open("a");
    assert_eq!(core.server_id(), server_id);
    assert_eq!(core.authorities.x509().record().id, x509_id);
    assert_eq!(core.authorities.jwt().record().id, jwt_id);
    assert_eq!(
        core.store.get_entry(&entry_id).unwrap().unwrap().id,
        entry_id
    );
    assert!(core.store.get_agent(&agent_id).unwrap().is_some());
    let all: Vec<EntryRecord> = core.store.list_entries(&Default::default()).unwrap();
    assert_eq!(all.len(), 1);
}

// ---------------------------------------------------------------------------------
// Two servers on one database

#[test]
fn the_bundle_of_every_server_is_the_union_of_their_authorities() {
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    assert_ne!(a.server_id(), b.server_id());
    let (a_x509, a_jwt) = own_active(&a);
    let (b_x509, b_jwt) = own_active(&b);
    for (name, core) in [("a", &a), ("b", &b)] {
        wait_for(
            &format!("server {name}'s bundle to hold both servers' authorities"),
            || {
                bundle_has_x509(core, &a_x509)
                    && bundle_has_x509(core, &b_x509)
                    && bundle_has_jwt(core, &a_jwt)
                    && bundle_has_jwt(core, &b_jwt)
            },
        );
    }
    assert_eq!(a.bundle().sequence, b.bundle().sequence);
    assert_eq!(a.bundle().x509_authorities, b.bundle().x509_authorities);
    // The listing names each authority's server.
    for kind in [Kind::X509, Kind::Jwt] {
        let list = b.list_cluster_authorities(kind).unwrap();
        let owners: Vec<&str> = list.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(owners.len(), 2, "{owners:?}");
        assert!(owners.contains(&a.server_id()) && owners.contains(&b.server_id()));
        let own: Vec<_> = list.iter().filter(|(s, _)| s == b.server_id()).collect();
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].1, b.list_authorities(kind).unwrap()[0]);
    }
}

#[test]
fn authority_lifecycle_through_one_server_reaches_the_other() {
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    let seq = |c: &CaCore| c.bundle().sequence;
    wait_for("both servers to see each other", || {
        x509_ids(&a).len() == 2 && seq(&a) == seq(&b)
    });

    for kind in [Kind::X509, Kind::Jwt] {
        let old = a.list_authorities(kind).unwrap()[0].clone();
        let in_bundle = |c: &CaCore, r: &ztid_ca::datastore::AuthorityRecord| match kind {
            Kind::X509 => bundle_has_x509(c, &r.cert_der),
            Kind::Jwt => bundle_has_jwt(c, &r.id),
        };
        // Prepare on A: B publishes it.
        let before = seq(&b);
        let prepared = a.prepare_authority(kind, "test").unwrap();
        wait_for("B to publish A's prepared authority", || {
            in_bundle(&b, &prepared)
        });
        assert!(seq(&b) > before, "a new bundle has a higher sequence");
        // Activate and taint on A: B's bundle names the taint.
        a.activate_authority(kind, "test").unwrap();
        let before = seq(&b);
        a.taint_authority(kind, &old.id, "test").unwrap();
        wait_for("B to publish A's taint", || {
            b.bundle().tainted.contains(&old.id)
        });
        assert!(seq(&b) > before);
        // B cannot change A's authority: the refusal names A.
        for r in [
            b.taint_authority(kind, &old.id, "test"),
            b.revoke_authority(kind, &old.id, "test"),
        ] {
            let e = r.unwrap_err();
            assert!(
                matches!(&e, Error::Precondition(m) if m.contains(a.server_id())),
                "{e}"
            );
        }
        let e = b
            .taint_authority(kind, "no-such-authority", "test")
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        // Revoke on A: gone from B's bundle too.
        let before = seq(&b);
        a.revoke_authority(kind, &old.id, "test").unwrap();
        wait_for("B to drop A's revoked authority", || {
            !in_bundle(&b, &old) && !b.bundle().tainted.contains(&old.id)
        });
        assert!(seq(&b) > before);
        assert!(!in_bundle(&a, &old));
    }
    // Both converge on one bundle.
    wait_for("one bundle on both servers", || {
        let (x, y) = (a.bundle(), b.bundle());
        x.sequence == y.sequence
            && x.x509_authorities == y.x509_authorities
            && x.jwt_authorities == y.jwt_authorities
    });
}

#[test]
fn a_stopped_server_is_retired_through_another_and_its_authorities_leave_the_bundle() {
    use ztid_ca::core::sync::SyncRequest;
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    let b_id = b.server_id().to_string();
    let (b_x509, b_jwt) = own_active(&b);
    wait_for("A to know B's authority", || bundle_has_x509(&a, &b_x509));
    // A second process under B's id does not start.
    let e = match CaCore::open(cluster.config("b")) {
        Ok(_) => panic!("a second B started"),
        Err(e) => e,
    };
    assert!(
        matches!(&e, Error::Precondition(m) if m.contains("another ztid-server runs")),
        "{e}"
    );
    // B runs: it cannot be retired; nor can the server asked.
    for (server, what) in [(b_id.as_str(), "is running"), (a.server_id(), "talking to")] {
        let e = a.retire_server(server, "test").unwrap_err();
        assert!(
            matches!(&e, Error::Precondition(m) if m.contains(what)),
            "{e}"
        );
    }
    let e = a.retire_server("no-such-server", "test").unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    // An agent attested through B holds an SVID of B's authority.
    let (agent, leaf) = attest(&b, "node-of-b");
    drop(b);
    let before = a.bundle().sequence;
    let retired = wait_for_ok("B's liveness lock to be released", || {
        a.retire_server(&b_id, "test")
    });
    assert_eq!(retired.len(), 2, "{retired:?}");
    assert!(retired.iter().all(|(_, r)| r.tainted), "{retired:?}");
    let bundle = a.bundle();
    assert!(bundle.sequence > before, "agents fetch the new bundle");
    for id in [&b_jwt, &retired[0].1.id] {
        assert!(
            bundle.tainted.contains(id),
            "{id} tainted: {:?}",
            bundle.tainted
        );
    }
    let e = a.retire_server(&b_id, "test").unwrap_err();
    assert!(
        matches!(&e, Error::Precondition(m) if m.contains("retired already")),
        "{e}"
    );
    // B never starts again.
    let e = match CaCore::open(cluster.config("b")) {
        Ok(_) => panic!("a retired B started"),
        Err(e) => e,
    };
    assert!(
        matches!(&e, Error::Precondition(m) if m.contains("retired")),
        "{e}"
    );
    // Its authorities are revoked through A once the agent has synced since the taint
    // and reports neither in use.
    let at_a = a.authenticate_agent(Some(&leaf)).unwrap();
    assert_eq!(at_a.record.spiffe_id, agent.spiffe_id);
    let x509_id = retired
        .iter()
        .find(|(k, _)| *k == Kind::X509)
        .map(|(_, r)| r.id.clone())
        .unwrap();
    let e = a
        .revoke_authority(Kind::X509, &x509_id, "test")
        .unwrap_err();
    assert!(
        matches!(&e, Error::Precondition(m) if m.contains("has not synced")),
        "{e}"
    );
    wait_for("a second after the taint", || {
        ztid_ca::core::now() > retired[0].1.tainted_at
    });
    a.sync_entries(&at_a, SyncRequest::default()).unwrap();
    a.revoke_authority(Kind::X509, &x509_id, "test").unwrap();
    a.revoke_authority(Kind::Jwt, &b_jwt, "test").unwrap();
    let bundle = a.bundle();
    assert!(!bundle_has_x509(&a, &b_x509) && !bundle_has_jwt(&a, &b_jwt));
    assert!(bundle.tainted.is_empty(), "{:?}", bundle.tainted);
    assert!(a
        .list_cluster_authorities(Kind::X509)
        .unwrap()
        .iter()
        .all(|(server, _)| *server != b_id));
    // The agent's SVID of the revoked authority is refused now.
    assert!(a.authenticate_agent(Some(&leaf)).is_err());
}

/// Retries `f` until it succeeds or the deadline passes.
fn wait_for_ok<T, E: std::fmt::Display>(what: &str, mut f: impl FnMut() -> Result<T, E>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => assert!(Instant::now() < end, "timed out waiting for {what}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn evict_and_ban_through_one_server_refuse_the_next_call_at_the_other() {
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    let (a_x509, _) = own_active(&a);
    let (b_x509, _) = own_active(&b);
    wait_for("B to know A's authority", || bundle_has_x509(&b, &a_x509));
    wait_for("A to know B's authority", || bundle_has_x509(&a, &b_x509));

    // Attested through A, the agent is accepted by B (failover).
    let (agent, leaf_a) = attest(&a, "node-evict");
    let at_b: AuthenticatedAgent = b.authenticate_agent(Some(&leaf_a)).unwrap();
    assert_eq!(at_b.record.spiffe_id, agent.spiffe_id);
    // Evicted through A: B refuses the next call.
    a.evict_agent(&agent.spiffe_id).unwrap();
    assert_eq!(
        refusal_kind(b.authenticate_agent(Some(&leaf_a))),
        RefusalKind::UnknownAgent
    );

    // Attested again, through B this time; banned through A: B refuses, and so does
    // attesting again through B.
    let (agent, leaf_b) = attest(&b, "node-evict");
    a.authenticate_agent(Some(&leaf_b)).unwrap();
    a.ban_agent(&agent.spiffe_id).unwrap();
    assert_eq!(
        refusal_kind(b.authenticate_agent(Some(&leaf_b))),
        RefusalKind::Banned
    );
    let node = AttestedNode {
        method: "join_token",
        node_id: "node-evict".into(),
        selectors: vec![],
        aliases: vec![],
        evidence_digest: [7; 32],
    };
    assert_eq!(
        refusal_kind(b.complete_attestation(&node, &csr(vec![]))),
        RefusalKind::Banned
    );
}

#[test]
fn a_certificate_of_a_revoked_peer_authority_is_refused() {
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    let (old_cert, _) = own_active(&a);
    wait_for("B to know A's authority", || bundle_has_x509(&b, &old_cert));
    let (agent, leaf) = attest(&a, "node-revoke");
    b.authenticate_agent(Some(&leaf)).unwrap();
    // A rotates away from the authority that signed the agent's SVID and revokes it
    // once the agent is gone.
    let old = a.authorities.x509().record().id.clone();
    a.prepare_authority(Kind::X509, "test").unwrap();
    a.activate_authority(Kind::X509, "test").unwrap();
    a.taint_authority(Kind::X509, &old, "test").unwrap();
    a.evict_agent(&agent.spiffe_id).unwrap();
    a.revoke_authority(Kind::X509, &old, "test").unwrap();
    wait_for("B to drop the revoked authority", || {
        !bundle_has_x509(&b, &old_cert)
    });
    // Even with the agent record back, no certificate of the revoked authority passes.
    b.store.put_agent(&agent).unwrap();
    assert_eq!(
        refusal_kind(b.authenticate_agent(Some(&leaf))),
        RefusalKind::BadCredential
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_federation_poller_runs_on_exactly_one_server() {
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    let pa = ztid_ca::federation::spawn_poller(a.clone());
    let pb = ztid_ca::federation::spawn_poller(b.clone());
    let end = Instant::now() + DEADLINE;
    while !(pa.is_leader() || pb.is_leader()) {
        assert!(Instant::now() < end, "no server took the polling role");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (leader, follower) = if pa.is_leader() {
        (&pa, &pb)
    } else {
        (&pb, &pa)
    };
    assert!(!follower.is_leader(), "both servers poll");
    // The role is taken: nobody else gets it while the leader holds it.
    assert!(a
        .store
        .try_leader(ztid_ca::federation::poller::POLLER_ROLE)
        .unwrap()
        .is_none());
    // The leader stops (its session ends): the other takes over.
    leader.stop();
    let end = Instant::now() + DEADLINE;
    while !follower.is_leader() {
        assert!(
            Instant::now() < end,
            "the other server never took the polling role"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    follower.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_names_the_server_of_each_authority() {
    use ztid_proto::admin::admin_server::Admin;
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    let api = ztid_ca::api::admin::AdminApi::new(b.clone());
    for kind in ["x509", "jwt"] {
        let list = api
            .list_authorities(tonic::Request::new(ztid_proto::admin::AuthorityKind {
                kind: kind.into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .authorities;
        assert_eq!(list.len(), 2, "{list:?}");
        for (server, other) in [(&a, &b), (&b, &a)] {
            let own: Vec<_> = list
                .iter()
                .filter(|x| x.server_id == server.server_id())
                .collect();
            assert_eq!(
                own.len(),
                1,
                "{kind}: one authority of {}",
                server.server_id()
            );
            assert_ne!(own[0].server_id, other.server_id());
        }
        // Only this server's own key backend is known.
        for x in &list {
            assert_eq!(
                x.key_backend.is_empty(),
                x.server_id != b.server_id(),
                "{x:?}"
            );
        }
    }
    // What a lifecycle call answers names this server.
    let prepared = api
        .prepare_authority(tonic::Request::new(ztid_proto::admin::AuthorityKind {
            kind: "jwt".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prepared.server_id, b.server_id());
    // Tainting A's authority through B: refused, naming A.
    let a_jwt = a.authorities.jwt().record().id.clone();
    let e = api
        .taint_authority(tonic::Request::new(ztid_proto::admin::AuthorityRef {
            kind: "jwt".into(),
            id: a_jwt,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(a.server_id()), "{e:?}");
}

/// A sync (or renewal) racing an eviction or a ban through another server never undoes
/// it: every write of an agent is a compare-and-swap on the record as stored, so the
/// sync either lands before the ban or eviction, or is refused by it.
#[test]
fn a_sync_racing_a_ban_or_an_eviction_never_undoes_it() {
    use std::sync::Barrier;
    use ztid_ca::core::sync::SyncRequest;
    const ROUNDS: usize = 25;
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    let (a_x509, _) = own_active(&a);
    let (b_x509, _) = own_active(&b);
    wait_for("B to know A's authority", || bundle_has_x509(&b, &a_x509));
    wait_for("A to know B's authority", || bundle_has_x509(&a, &b_x509));
    let sync = |core: &CaCore, agent: &AuthenticatedAgent| {
        core.sync_entries(
            agent,
            SyncRequest {
                authorities_in_use: vec!["some-authority".into()],
                ..Default::default()
            },
        )
    };
    let race = |first: &(dyn Fn() -> Option<RefusalKind> + Sync), second: &(dyn Fn() + Sync)| {
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                barrier.wait();
                first()
            });
            barrier.wait();
            second();
            t.join().unwrap()
        })
    };
    let mut refused = 0;
    for round in 0..ROUNDS {
        // Ban through A while B syncs the agent it authenticated just before.
        let (agent, leaf) = attest(&a, &format!("node-ban-{round}"));
        let at_b = b.authenticate_agent(Some(&leaf)).unwrap();
        let outcome = race(
            &|| sync(&b, &at_b).err().map(|e| refusal_kind::<()>(Err(e))),
            &|| {
                a.ban_agent(&agent.spiffe_id).unwrap();
            },
        );
        if let Some(kind) = outcome {
            assert_eq!(kind, RefusalKind::Banned, "round {round}");
            refused += 1;
        }
        for core in [&a, &b] {
            assert_eq!(
                refusal_kind(core.authenticate_agent(Some(&leaf))),
                RefusalKind::Banned,
                "round {round}: the ban was undone"
            );
        }

        // Evict through A while B syncs.
        let (agent, leaf) = attest(&a, &format!("node-evict-{round}"));
        let at_b = b.authenticate_agent(Some(&leaf)).unwrap();
        let outcome = race(
            &|| sync(&b, &at_b).err().map(|e| refusal_kind::<()>(Err(e))),
            &|| {
                a.evict_agent(&agent.spiffe_id).unwrap();
            },
        );
        if let Some(kind) = outcome {
            assert_eq!(kind, RefusalKind::UnknownAgent, "round {round}");
            refused += 1;
        }
        for core in [&a, &b] {
            assert_eq!(
                refusal_kind(core.authenticate_agent(Some(&leaf))),
                RefusalKind::UnknownAgent,
                "round {round}: the evicted agent came back"
            );
        }
        assert_eq!(
            a.store.get_agent(&agent.spiffe_id).unwrap(),
            None,
            "round {round}: the evicted agent is stored"
        );
    }
    eprintln!("{refused} of {} syncs were refused by the race", 2 * ROUNDS);
}

/// A sync racing a renewal through another server never puts the old serial back: the
/// renewed SVID stays current.
#[test]
fn a_sync_racing_a_renewal_keeps_the_new_serial() {
    use std::sync::Barrier;
    use ztid_ca::core::sync::SyncRequest;
    const ROUNDS: usize = 25;
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    let (a_x509, _) = own_active(&a);
    let (b_x509, _) = own_active(&b);
    wait_for("B to know A's authority", || bundle_has_x509(&b, &a_x509));
    wait_for("A to know B's authority", || bundle_has_x509(&a, &b_x509));
    let node = AttestedNode {
        method: "join-token",
        node_id: "node-renew".into(),
        selectors: vec![],
        aliases: vec![],
        evidence_digest: [7; 32],
    };
    let (agent, leaf) = a.complete_attestation(&node, &csr(vec![])).unwrap();
    let mut leaf = leaf.chain[0].clone();
    for round in 0..ROUNDS {
        let at_a = a.authenticate_agent(Some(&leaf)).unwrap();
        let at_b = b.authenticate_agent(Some(&leaf)).unwrap();
        let barrier = Barrier::new(2);
        let renewed = std::thread::scope(|s| {
            let t = s.spawn(|| {
                barrier.wait();
                b.sync_entries(&at_b, SyncRequest::default()).unwrap();
            });
            barrier.wait();
            let renewed = a.renew_agent(&at_a, &csr(vec![])).unwrap();
            t.join().unwrap();
            renewed
        });
        leaf = renewed.chain[0].clone();
        for core in [&a, &b] {
            core.authenticate_agent(Some(&leaf))
                .unwrap_or_else(|e| panic!("round {round}: the renewed SVID is refused: {e}"));
        }
        assert_eq!(
            b.store.get_agent(&agent.spiffe_id).unwrap().unwrap().serial,
            renewed.serial,
            "round {round}"
        );
    }
}
