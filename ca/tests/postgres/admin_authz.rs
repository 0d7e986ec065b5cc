//! The remote admin API's issuer check on several servers (issue 13): an admin SVID
//! issued by server A (`IssueAdminSvid`, on A's admin socket) is admitted by server
//! B's policy, since A and B are one cluster on one database; the issuers are the
//! X.509 authorities of the servers' CA states only, so a CA merely under the same
//! upstream root, a server of another cluster, and an authority revoked on A are
//! refused.
//!
//! The decision is [`AdminPolicy::issued_by_cluster`], the check `decide` applies to a
//! remote caller with a role before its roles count (the mTLS connection info that
//! carries the peer certificate into `decide` cannot be built outside tonic).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use ztid_ca::api::admin::authz::{own_issuers, own_revocations, AdminPolicy};
use ztid_ca::authority::Kind;
use ztid_ca::config::UpstreamConfig;
use ztid_ca::core::CaCore;
use ztid_ca::refusal_audit::RefusalAudit;

use crate::{wait_for, Cluster, TD};

/// Server `core`'s remote admin policy (as `server::run` builds it), one role bound.
fn policy(core: &Arc<CaCore>) -> AdminPolicy {
    AdminPolicy::new(
        vec![],
        HashMap::from([(
            format!("spiffe://{TD}/ztid/admin/alice"),
            vec![ztid_ca::api::admin::authz::Role::Viewer],
        )]),
        own_issuers(core),
        own_revocations(core),
        None,
        Arc::new(RefusalAudit::new(10, 100, Duration::from_secs(60))),
    )
}

/// An admin SVID for `alice` issued by `core` (the leaf, DER).
fn admin_svid(core: &CaCore) -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&kp)
        .unwrap()
        .der()
        .to_vec();
    let (id, leaf) = core
        .issue_admin_svid("alice", &csr, 3600, "uid:0 pid:1")
        .unwrap();
    assert_eq!(id, format!("spiffe://{TD}/ztid/admin/alice"));
    leaf.chain[0].clone()
}

fn x509_count(core: &CaCore) -> usize {
    core.authorities.cluster_x509_certs().unwrap().len()
}

#[test]
fn an_admin_svid_of_one_server_is_admitted_by_every_server_of_its_cluster_only() {
    // Database "one" (this test's) and database "two": two clusters.
    let db = Cluster::new();
    let two = db.another_database();
    let a = db.open("one-a");
    let b = db.open("one-b");
    let other = db.open_config(db.config_on(&two, "two-c"));
    wait_for("A and B to see each other's authority", || {
        x509_count(&a) == 2 && x509_count(&b) == 2
    });
    let (from_a, from_b, from_other) = (admin_svid(&a), admin_svid(&b), admin_svid(&other));
    let (policy_a, policy_b) = (policy(&a), policy(&b));
    assert!(policy_b.issued_by_cluster(&from_a), "A's admin SVID at B");
    assert!(policy_a.issued_by_cluster(&from_b), "B's admin SVID at A");
    assert!(policy_b.issued_by_cluster(&from_b) && policy_a.issued_by_cluster(&from_a));
    // A server of the same trust domain on another database is another cluster.
    assert!(!policy_b.issued_by_cluster(&from_other));
    assert!(!policy(&other).issued_by_cluster(&from_a));

    // A's authority revoked (after a new one is active and the old tainted): the
    // SVIDs it signed are refused at B too, once B has reloaded A's state.
    let old = a.authorities.x509().record().id.clone();
    a.prepare_authority(Kind::X509, "test").unwrap();
    a.activate_authority(Kind::X509, "test").unwrap();
    a.taint_authority(Kind::X509, &old, "test").unwrap();
    a.revoke_authority(Kind::X509, &old, "test").unwrap();
    wait_for("B to drop A's revoked authority", || {
        !policy_b.issued_by_cluster(&from_a)
    });
    assert!(!policy_a.issued_by_cluster(&from_a));
    // A's new authority issues admin SVIDs B admits.
    let renewed = admin_svid(&a);
    wait_for("B to admit A's new authority", || {
        policy_b.issued_by_cluster(&renewed)
    });
    assert!(policy_b.issued_by_cluster(&from_b));
}

/// Under an upstream root the bundle trusts the root; a certificate the root (or any
/// other CA under it) signed carries no admin identity at any server.
#[test]
fn under_an_upstream_root_only_the_cluster_authorities_issue_admin_identities() {
    let db = Cluster::new();
    // The organisation's root.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::default();
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "organisation root");
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root_cert = root_params.self_signed(&root_key).unwrap();
    let cert_file = db.dir.path().join("upstream.pem");
    let key_file = db.dir.path().join("upstream.key");
    std::fs::write(&cert_file, root_cert.pem()).unwrap();
    std::fs::write(&key_file, root_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let upstream = UpstreamConfig {
        cert: cert_file,
        key_file: Some(key_file),
        key_id: None,
        bundle: None,
    };
    let mut ca = db.config("up-a");
    ca.upstream = Some(upstream.clone());
    let mut cb = db.config("up-b");
    cb.upstream = Some(upstream);
    let a = db.open_config(ca);
    let b = db.open_config(cb);
    wait_for("A and B to see each other's authority", || {
        x509_count(&a) == 2 && x509_count(&b) == 2
    });
    assert!(
        b.bundle()
            .x509_authorities
            .iter()
            .any(|c| c.as_slice() == root_cert.der().as_ref()),
        "the bundle trusts the upstream root"
    );
    let policy_b = policy(&b);
    assert!(policy_b.issued_by_cluster(&admin_svid(&a)), "A's, at B");

    // The root itself signs an admin identity: refused.
    let issuer = rcgen::Issuer::new(root_params, root_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{TD}/ztid/admin/alice")
            .try_into()
            .unwrap(),
    )];
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let forged = leaf.signed_by(&leaf_key, &issuer).unwrap();
    assert!(!policy_b.issued_by_cluster(forged.der().as_ref()));
}
