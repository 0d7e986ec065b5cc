//! The lifecycle tests of [`AuthoritySet`]: prepare, activate, taint and revoke with
//! their refusals across restarts, and the automatic rotation schedule.

use std::sync::Arc;

use spiffe::TrustDomain;
use ztid_hsm::{KeyManager, SoftwareKeyManager};

use super::{AuthoritySet, Kind, Lifetimes};
use crate::datastore::{DataStore, SledStore};
use crate::Error;

fn set(dir: &std::path::Path, now: i64) -> AuthoritySet {
    let km: Arc<dyn KeyManager> = Arc::new(SoftwareKeyManager::open(dir.join("keys")).unwrap());
    let store: Arc<dyn DataStore> = Arc::new(SledStore::open(&dir.join("db")).unwrap());
    AuthoritySet::open(
        TrustDomain::new("example.org").unwrap(),
        km,
        store,
        Lifetimes {
            x509: 600,
            jwt: 600,
            refresh_hint: 60,
        },
        None,
        now,
    )
    .unwrap()
}

/// The text of a refusal by the authorities' lifecycle, once its kind is checked.
fn precondition(e: Error) -> String {
    assert!(matches!(e, Error::Precondition(_)), "{e}");
    e.to_string()
}

#[test]
fn lifecycle_with_refusals_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first;
    let prepared;
    {
        let s = set(dir.path(), 1000);
        first = s.x509().record().id.clone();
        let seq0 = s.bundle().sequence;
        // Nothing to activate yet; the active one cannot be tainted or revoked.
        assert!(s
            .activate(Kind::X509, 1000)
            .map_err(precondition)
            .unwrap_err()
            .contains("run prepare first"));
        assert!(s
            .taint(Kind::X509, &first, 1000)
            .map_err(precondition)
            .unwrap_err()
            .contains("is active"));
        assert!(s
            .revoke(Kind::X509, &first, 1000, |_| None)
            .map_err(precondition)
            .unwrap_err()
            .contains("not tainted"));
        assert_eq!(s.bundle().sequence, seq0, "refusals change nothing");

        prepared = s.prepare(Kind::X509, 1001).unwrap().id;
        assert!(s
            .prepare(Kind::X509, 1001)
            .map_err(precondition)
            .unwrap_err()
            .contains("prepared already"));
        let b = s.bundle();
        assert_eq!(
            b.x509_authorities.len(),
            2,
            "a prepared authority is published at once"
        );
        assert_eq!(b.sequence, seq0 + 1);
        assert_eq!(s.x509().record().id, first, "but does not sign yet");
    }
    // Restart between prepare and activate: resumes with the prepared one.
    let s = set(dir.path(), 1002);
    assert_eq!(s.x509().record().id, first);
    assert_eq!(s.activate(Kind::X509, 1003).unwrap().id, prepared);
    assert_eq!(s.x509().record().id, prepared);
    let seq = s.bundle().sequence;
    s.taint(Kind::X509, &first, 1004).unwrap();
    assert_eq!(s.bundle().tainted, vec![first.clone()]);
    assert_eq!(s.bundle().sequence, seq + 1);
    drop(s);
    // Restart between taint and revoke.
    let s = set(dir.path(), 1005);
    assert_eq!(s.bundle().tainted, vec![first.clone()]);
    let err = s
        .revoke(Kind::X509, &first, 1006, |_| {
            Some("agent A holds SVIDs signed by it".into())
        })
        .unwrap_err();
    assert!(precondition(err).contains("still in use: agent A"));
    assert_eq!(s.bundle().x509_authorities.len(), 2);
    s.revoke(Kind::X509, &first, 1007, |_| None).unwrap();
    let b = s.bundle();
    assert_eq!(b.x509_authorities.len(), 1);
    assert!(b.tainted.is_empty());
    assert!(s.list(Kind::X509).unwrap().iter().all(|a| a.id != first));
}

#[test]
fn automatic_rotation_follows_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let s = set(dir.path(), 0);
    let first = s.jwt().record().id.clone();
    assert!(s.tick(100).unwrap().is_empty(), "plenty of life left");
    // TTL 600: prepare when < 300 left (t > 300), activate when < 100 left (t > 500).
    let c = s.tick(301).unwrap();
    assert!(c
        .iter()
        .any(|c| c.kind == Kind::Jwt && c.action == "prepared"));
    assert!(c
        .iter()
        .any(|c| c.kind == Kind::X509 && c.action == "prepared"));
    assert_eq!(s.jwt().record().id, first);
    let c = s.tick(501).unwrap();
    assert!(c
        .iter()
        .any(|c| c.kind == Kind::Jwt && c.action == "activated"));
    assert_ne!(s.jwt().record().id, first);
    assert_eq!(
        s.bundle().jwt_authorities.len(),
        2,
        "the old key still vouches for live tokens"
    );
    let c = s.tick(601).unwrap();
    assert!(c
        .iter()
        .any(|c| c.kind == Kind::Jwt && c.action == "expired" && c.id == first));
    assert_eq!(s.bundle().jwt_authorities.len(), 1);
}
