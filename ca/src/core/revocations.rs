//! The kill switch (issue 14, docs/token-exchange.md "Revocation: the kill switch"):
//! revocations of one instance, of every instance of an entry, or of everything issued
//! through a node (which is also banned).
//!
//! A revocation is stored in the datastore, so every server sees it, and kept until
//! every credential issued before it has expired. The token endpoint and the mint ask
//! [`CaCore::revocation_of`] on every request: it is served from the same in-memory
//! copy as the grants (see `grants.rs`), re-read from the store at least every
//! [`ACCESS_REFRESH_SECONDS`](super::grants::ACCESS_REFRESH_SECONDS): a revocation
//! written through one server counts on every other server within that bound, below an
//! agent's default sync interval (5 s); a server that cannot read the store for longer
//! than [`ACCESS_STALE_LIMIT_SECONDS`](super::grants::ACCESS_STALE_LIMIT_SECONDS)
//! fails these calls instead of answering from an old copy.

use serde_json::json;

use super::grants::{covering_ids, covers, AccessSnapshot};
use super::{now, CaCore};
use crate::datastore::{RevocationKind, RevocationRecord};
use crate::{Error, Result};

/// Longest revocation reason, bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// A revocation outlives every credential issued before it by this much (clock skew).
pub const REVOCATION_MARGIN_SECONDS: i64 = 60;
/// A revocation is kept at least this long, whatever the SVID lifetimes.
pub const MIN_REVOCATION_LIFETIME_SECONDS: i64 = 3600;
/// How far past an admin revocation's `revoked_at` a credential of that admin still
/// counts as issued before it: another server whose clock is ahead by up to this dated
/// what it issued before the revocation later than the revoking server's clock says. One
/// second short of the leaf backdate, so that a credential issued after the revocation
/// can be dated past this window without a `notBefore` in the future
/// ([`CaCore::admin_issue_time`]).
pub const ADMIN_REVOCATION_SKEW_SECONDS: i64 = crate::authority::LEAF_BACKDATE_SECONDS - 1;

impl AccessSnapshot {
    /// The revocation in force at `at` that kills a credential of `spiffe_id` issued
    /// through agent `node` (when known) at `issued_at` (see [`CaCore::revocation_of`]).
    pub(super) fn revocation_of(
        &self,
        spiffe_id: &str,
        node: Option<&str>,
        issued_at: i64,
        at: i64,
    ) -> Option<&RevocationRecord> {
        let by_id = covering_ids(spiffe_id)
            .filter_map(|id| self.revocations_by_id.get(id))
            .flatten();
        let by_node = node
            .and_then(|n| self.revocations_by_node.get(n))
            .into_iter()
            .flatten();
        by_id
            .chain(by_node)
            .filter_map(|&i| self.revocations.get(i))
            .filter(|r| r.expires_at > at)
            // Times are whole seconds: a credential issued in the revocation's own second
            // may have been issued before it, so it is covered (an agent mints nothing
            // under a revoked entry for 10 s after it; an admin's new credential is dated
            // past the window, see `CaCore::admin_issue_time`).
            .find(|r| match r.kind {
                RevocationKind::Instance => r.spiffe_id == spiffe_id,
                RevocationKind::Entry => {
                    covers(&r.spiffe_id, spiffe_id) && issued_at <= r.revoked_at
                }
                RevocationKind::Node => {
                    node == Some(r.target.as_str()) && issued_at <= r.revoked_at
                }
                RevocationKind::Admin => {
                    r.spiffe_id == spiffe_id
                        && issued_at <= r.revoked_at.saturating_add(ADMIN_REVOCATION_SKEW_SECONDS)
                }
            })
    }
}

impl CaCore {
    /// The revocation in force (`expires_at` after now) that kills a credential of
    /// `spiffe_id`, issued through agent `node` (if known) at `issued_at` (Unix
    /// seconds), if any:
    /// - an instance revocation of `spiffe_id` itself, whenever it was issued;
    /// - an entry revocation whose SPIFFE ID covers `spiffe_id` (equal, or it plus one
    ///   segment), for a credential issued before or in the second of `revoked_at`;
    /// - a node revocation of `node`, for a credential issued before or in the second
    ///   of `revoked_at`;
    /// - an admin revocation of `spiffe_id` itself (an admin identity), for a credential
    ///   issued up to [`ADMIN_REVOCATION_SKEW_SECONDS`] after `revoked_at`.
    ///
    /// Served from memory: a revocation written through any server of the cluster
    /// counts here within [`ACCESS_REFRESH_SECONDS`](super::grants::ACCESS_REFRESH_SECONDS)
    /// (2 s, below an agent's default sync interval); when the store cannot be read
    /// for longer than [`ACCESS_STALE_LIMIT_SECONDS`](super::grants::ACCESS_STALE_LIMIT_SECONDS)
    /// this fails rather than answer from an old copy.
    pub fn revocation_of(
        &self,
        spiffe_id: &str,
        node: Option<&str>,
        issued_at: i64,
    ) -> Result<Option<RevocationRecord>> {
        Ok(self
            .access
            .snapshot(self.store.as_ref())?
            .revocation_of(spiffe_id, node, issued_at, now())
            .cloned())
    }

    /// When a new credential of admin `spiffe_id` is issued (Unix seconds; its
    /// `notBefore` is this less the leaf backdate): now, or, while a revocation of that
    /// admin is in force, the first second past the window the revocation covers, so the
    /// new credential is never taken for one it revoked. `Precondition` when that second
    /// would put `notBefore` in the future: the revocation was dated by a server whose
    /// clock is ahead of this one's.
    pub fn admin_issue_time(&self, spiffe_id: &str) -> Result<i64> {
        let t = now();
        let revoked_at = self
            .access
            .snapshot(self.store.as_ref())?
            .revocations
            .iter()
            .filter(|r| {
                r.kind == RevocationKind::Admin && r.spiffe_id == spiffe_id && r.expires_at > t
            })
            .map(|r| r.revoked_at)
            .max();
        let Some(revoked_at) = revoked_at else {
            return Ok(t);
        };
        let issued = revoked_at
            .saturating_add(ADMIN_REVOCATION_SKEW_SECONDS + 1)
            .max(t);
        let ahead = issued - crate::authority::LEAF_BACKDATE_SECONDS - t;
        if ahead > 0 {
            return Err(Error::Precondition(format!(
                "{spiffe_id} was revoked at {} by a server whose clock is {ahead} s ahead of \
                 this one's; a new credential can be issued here in {ahead} s (check the \
                 servers' clocks)",
                ztid_human::rfc3339(revoked_at)
            )));
        }
        Ok(issued)
    }

    /// Every revocation in force (`expires_at` after now), ordered by kind and target:
    /// what the agents' sync carries. Served from memory, as [`Self::revocation_of`].
    pub fn revocations_in_force(&self) -> Result<Vec<RevocationRecord>> {
        let t = now();
        Ok(self
            .access
            .snapshot(self.store.as_ref())?
            .revocations
            .iter()
            .filter(|r| r.expires_at > t)
            .cloned()
            .collect())
    }

    /// Every stored revocation (read from the store), expired ones too until pruned.
    pub fn list_revocations(&self) -> Result<Vec<RevocationRecord>> {
        self.store.list_revocations()
    }

    /// How long a revocation made now must be kept: past every credential issued
    /// before it. `extra_ttls` are the lifetimes of the entries concerned (0: the
    /// server default, already counted).
    fn revocation_lifetime(&self, extra_ttls: impl IntoIterator<Item = i64>) -> i64 {
        let sts_max = self.config.sts.as_ref().map_or(0, |s| s.max_ttl_seconds);
        [
            self.config.x509_svid_ttl_seconds,
            self.config.jwt_svid_ttl_seconds,
            sts_max,
            MIN_REVOCATION_LIFETIME_SECONDS,
        ]
        .into_iter()
        .chain(extra_ttls)
        .max()
        .unwrap_or(MIN_REVOCATION_LIFETIME_SECONDS)
        .saturating_add(REVOCATION_MARGIN_SECONDS)
    }

    /// `target` as a SPIFFE ID of this trust domain, within the length bound.
    fn target_id(&self, target: &str) -> Result<spiffe::SpiffeId> {
        crate::limits::check_len("target (bytes)", target, crate::limits::MAX_SPIFFE_ID_BYTES)?;
        crate::entries::parse_id(&self.trust_domain, "target", target)
    }

    /// `target` as one kind of ztid's own identities (`is_kind`: "`what`", shaped
    /// `spiffe://TD/shape`).
    fn ztid_target(
        &self,
        target: &str,
        is_kind: fn(&spiffe::TrustDomain, &spiffe::SpiffeId) -> bool,
        what: &str,
        shape: &str,
    ) -> Result<spiffe::SpiffeId> {
        let id = self.target_id(target)?;
        if !is_kind(&self.trust_domain, &id) {
            return Err(Error::InvalidInput(format!(
                "target {target} is not {what} (spiffe://{}/{shape})",
                self.trust_domain
            )));
        }
        Ok(id)
    }

    /// Revokes `target` (`kind`: an instance's SPIFFE ID, an entry ID, an agent's
    /// SPIFFE ID), stores it, and records `instance_revoked`. A node revocation also
    /// bans the agent, as `BanAgent` does (an agent no longer known is only revoked).
    /// Revoking the same target again replaces the record (a later `revoked_at`).
    pub fn revoke(
        &self,
        kind: RevocationKind,
        target: &str,
        reason: &str,
        caller: &str,
    ) -> Result<RevocationRecord> {
        crate::limits::check_len("reason (bytes)", reason, MAX_REASON_BYTES)?;
        if reason.chars().any(char::is_control) {
            return Err(Error::InvalidInput(
                "reason must not hold control characters".into(),
            ));
        }
        let (spiffe_id, ttls): (String, Vec<i64>) = match kind {
            RevocationKind::Instance => {
                let id = self.target_id(target)?;
                if id.path().is_empty() {
                    return Err(Error::InvalidInput("target must have a path".into()));
                }
                // The entries the instance may be of: its own ID's and its parent's.
                let mut ttls = Vec::new();
                for candidate in covering_ids(target) {
                    let filter = crate::datastore::EntryFilter {
                        spiffe_id: Some(candidate.to_string()),
                        parent_id: None,
                    };
                    for e in self.store.list_entries(&filter)? {
                        ttls.extend([e.x509_ttl, e.jwt_ttl]);
                    }
                }
                (id.to_string(), ttls)
            }
            RevocationKind::Entry => {
                crate::limits::check_len(
                    "target (bytes)",
                    target,
                    crate::limits::MAX_OBJECT_ID_BYTES,
                )?;
                let entry = self
                    .store
                    .get_entry(target)?
                    .ok_or_else(|| Error::NotFound(format!("entry {target} does not exist")))?;
                (entry.spiffe_id, vec![entry.x509_ttl, entry.jwt_ttl])
            }
            RevocationKind::Node => {
                self.ztid_target(
                    target,
                    ztid_spiffe::spiffe_id::is_agent_id,
                    "an agent ID",
                    "ztid/agent/METHOD/NODE",
                )?;
                let filter = crate::datastore::EntryFilter {
                    spiffe_id: None,
                    parent_id: Some(target.to_string()),
                };
                let ttls = self
                    .store
                    .list_entries(&filter)?
                    .into_iter()
                    .flat_map(|e| [e.x509_ttl, e.jwt_ttl])
                    .collect();
                (String::new(), ttls)
            }
            RevocationKind::Admin => {
                let id = self.ztid_target(
                    target,
                    ztid_spiffe::spiffe_id::is_admin_id,
                    "an admin ID",
                    "ztid/admin/NAME",
                )?;
                // An admin credential lasts at most this server's `ca_ttl_seconds`
                // (`issue_admin_svid`), and never past its authority: kept until the last
                // of the cluster's X.509 authorities expires, whatever another server's
                // (or an earlier) `ca_ttl_seconds` allowed.
                let t = now();
                let authorities_last = self
                    .authorities
                    .cluster_list(crate::authority::Kind::X509)?
                    .iter()
                    .map(|(_, a)| a.not_after.saturating_sub(t))
                    .max()
                    .unwrap_or(0);
                (
                    id.to_string(),
                    vec![self.config.ca_ttl_seconds, authorities_last],
                )
            }
        };
        let revoked_at = now();
        let mut revocation = RevocationRecord {
            kind,
            target: target.to_string(),
            spiffe_id,
            revoked_at,
            expires_at: revoked_at.saturating_add(self.revocation_lifetime(ttls)),
            reason: reason.to_string(),
        };
        // Revoking an admin again never narrows the revocation in force (a server whose
        // clock is behind must not move it earlier).
        if kind == RevocationKind::Admin {
            if let Some(old) = self
                .store
                .list_revocations()?
                .into_iter()
                .find(|r| r.kind == RevocationKind::Admin && r.target == revocation.target)
            {
                revocation.revoked_at = revocation.revoked_at.max(old.revoked_at);
                revocation.expires_at = revocation.expires_at.max(old.expires_at);
            }
        }
        // Stored before the ban: once the call fails half way, what is stored still
        // kills the credentials (the ban can be made again).
        self.store.put_revocation(&revocation)?;
        self.access.invalidate();
        self.store.flush()?;
        let banned = match kind {
            RevocationKind::Node => match self.ban_agent(target) {
                Ok(_) => true,
                Err(Error::NotFound(_)) => false,
                Err(e) => return Err(e),
            },
            _ => false,
        };
        self.record(json!({"type": "instance_revoked", "caller": caller,
            "revocation": revocation, "agent_banned": banned}))?;
        tracing::warn!(event = "instance_revoked", caller, kind = kind.as_str(), target,
            spiffe_id = %revocation.spiffe_id, expires_at = revocation.expires_at, "revoked");
        Ok(revocation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(
        kind: RevocationKind,
        target: &str,
        spiffe_id: &str,
        revoked_at: i64,
    ) -> RevocationRecord {
        RevocationRecord {
            kind,
            target: target.into(),
            spiffe_id: spiffe_id.into(),
            revoked_at,
            expires_at: revoked_at + 100,
            reason: String::new(),
        }
    }

    const APP: &str = "spiffe://example.org/app";
    const INSTANCE: &str = "spiffe://example.org/app/0123456789abcdef0123456789abcdef";
    const NODE: &str = "spiffe://example.org/ztid/agent/join-token/n1";

    #[test]
    fn an_instance_revocation_kills_that_instance_whenever_issued() {
        let s = AccessSnapshot::build(
            Vec::new(),
            vec![rev(RevocationKind::Instance, INSTANCE, INSTANCE, 1000)],
        );
        assert!(s.revocation_of(INSTANCE, None, 500, 1001).is_some());
        assert!(s.revocation_of(INSTANCE, None, 5000, 1001).is_some());
        assert!(s.revocation_of(INSTANCE, Some(NODE), 5000, 1001).is_some());
        // Not its entry, nor a sibling, nor a child.
        assert!(s.revocation_of(APP, None, 500, 1001).is_none());
        assert!(s
            .revocation_of("spiffe://example.org/app/4567", None, 500, 1001)
            .is_none());
        assert!(s
            .revocation_of(&format!("{INSTANCE}/x"), None, 500, 1001)
            .is_none());
        // Expired (expires_at = 1100): no longer in force.
        assert!(s.revocation_of(INSTANCE, None, 500, 1100).is_none());
    }

    #[test]
    fn an_entry_revocation_kills_what_was_issued_before_it() {
        let s = AccessSnapshot::build(
            Vec::new(),
            vec![rev(RevocationKind::Entry, "e1", APP, 1000)],
        );
        assert!(s.revocation_of(INSTANCE, None, 999, 1001).is_some());
        assert!(s.revocation_of(APP, None, 999, 1001).is_some());
        // Issued in the revocation's own second: maybe before it, so covered.
        assert!(s.revocation_of(INSTANCE, None, 1000, 1001).is_some());
        assert!(s.revocation_of(INSTANCE, None, 1001, 1001).is_none());
        assert!(s
            .revocation_of(&format!("{INSTANCE}/x"), None, 999, 1001)
            .is_none());
        assert!(s
            .revocation_of("spiffe://example.org/apple", None, 999, 1001)
            .is_none());
        assert!(s.revocation_of(INSTANCE, None, 999, 1100).is_none());
    }

    #[test]
    fn an_admin_revocation_kills_that_admins_credentials_issued_before_it() {
        const ALICE: &str = "spiffe://example.org/ztid/admin/alice";
        let s = AccessSnapshot::build(
            Vec::new(),
            vec![rev(RevocationKind::Admin, ALICE, ALICE, 1000)],
        );
        assert!(s.revocation_of(ALICE, None, 999, 1001).is_some());
        // Issued in its second, or dated up to the skew window after it by a server
        // whose clock is ahead: covered. A new credential is dated past the window.
        assert!(s.revocation_of(ALICE, None, 1000, 1001).is_some());
        assert!(s
            .revocation_of(ALICE, None, 1000 + ADMIN_REVOCATION_SKEW_SECONDS, 1001)
            .is_some());
        assert!(s
            .revocation_of(ALICE, None, 1001 + ADMIN_REVOCATION_SKEW_SECONDS, 1001)
            .is_none());
        // Not another admin, nor what sits below or above the ID.
        for other in [
            "spiffe://example.org/ztid/admin/bob",
            "spiffe://example.org/ztid/admin",
            "spiffe://example.org/ztid/admin/alice/x",
        ] {
            assert!(s.revocation_of(other, None, 999, 1001).is_none(), "{other}");
        }
        assert!(s.revocation_of(ALICE, None, 999, 1100).is_none());
    }

    #[test]
    fn an_admin_revocation_names_an_admin_id_only() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        for target in [
            "spiffe://example.org/app",
            "spiffe://example.org/ztid/server",
            "spiffe://other.org/ztid/admin/alice",
        ] {
            let e = core
                .revoke(RevocationKind::Admin, target, "", "test")
                .unwrap_err();
            assert!(matches!(e, Error::InvalidInput(_)), "{target}: {e}");
        }
        assert!(core.list_revocations().unwrap().is_empty());
        let r = core
            .revoke(
                RevocationKind::Admin,
                "spiffe://example.org/ztid/admin/alice",
                "",
                "test",
            )
            .unwrap();
        assert_eq!(r.spiffe_id, "spiffe://example.org/ztid/admin/alice");
        // Kept as long as an admin credential may last: this server's CA lifetime, and
        // until the last of the cluster's X.509 authorities expires.
        assert!(r.expires_at >= r.revoked_at + core.config.ca_ttl_seconds);
        let last_authority = core
            .authorities
            .cluster_list(crate::authority::Kind::X509)
            .unwrap()
            .iter()
            .map(|(_, a)| a.not_after)
            .max()
            .unwrap();
        assert!(r.expires_at > last_authority);
        // Revoking again keeps the later time and expiry of the two (never narrows).
        let mut earlier = r.clone();
        earlier.revoked_at += 1000;
        earlier.expires_at += 1000;
        core.store.put_revocation(&earlier).unwrap();
        let again = core
            .revoke(
                RevocationKind::Admin,
                "spiffe://example.org/ztid/admin/alice",
                "",
                "test",
            )
            .unwrap();
        assert_eq!(
            (again.revoked_at, again.expires_at),
            (earlier.revoked_at, earlier.expires_at)
        );
    }

    /// An admin credential issued right after a revocation of that admin is dated past
    /// the window the revocation covers (so it works at once), with its `notBefore` never
    /// in the future; a revocation dated ahead of this server's clock (by another
    /// server's) makes issuing wait, said as a `Precondition`.
    #[test]
    fn an_admin_credential_issued_after_a_revocation_is_dated_past_it() {
        const ALICE: &str = "spiffe://example.org/ztid/admin/alice";
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let t = now();
        assert!(core.admin_issue_time(ALICE).unwrap() >= t);
        let r = core
            .revoke(RevocationKind::Admin, ALICE, "", "test")
            .unwrap();
        let issued = core.admin_issue_time(ALICE).unwrap();
        assert_eq!(issued, r.revoked_at + ADMIN_REVOCATION_SKEW_SECONDS + 1);
        assert!(issued - crate::authority::LEAF_BACKDATE_SECONDS <= now());
        assert!(core.revocation_of(ALICE, None, issued).unwrap().is_none());
        assert!(core
            .revocation_of(ALICE, None, issued - 1)
            .unwrap()
            .is_some());
        // Another admin is not held back.
        assert!(
            core.admin_issue_time("spiffe://example.org/ztid/admin/bob")
                .unwrap()
                <= now()
        );
        // Dated 30 s ahead by another server's clock.
        let mut ahead = r.clone();
        ahead.revoked_at = now() + 30;
        core.store.put_revocation(&ahead).unwrap();
        core.access.invalidate();
        match core.admin_issue_time(ALICE) {
            Err(Error::Precondition(why)) => assert!(why.contains("s ahead"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_node_revocation_kills_what_was_issued_through_it_before() {
        let s = AccessSnapshot::build(Vec::new(), vec![rev(RevocationKind::Node, NODE, "", 1000)]);
        assert!(s.revocation_of(INSTANCE, Some(NODE), 999, 1001).is_some());
        assert!(s.revocation_of(INSTANCE, Some(NODE), 1000, 1001).is_some());
        assert!(s.revocation_of(INSTANCE, Some(NODE), 1001, 1001).is_none());
        assert!(s.revocation_of(INSTANCE, None, 999, 1001).is_none());
        assert!(s
            .revocation_of(
                INSTANCE,
                Some("spiffe://example.org/ztid/agent/join-token/n2"),
                999,
                1001
            )
            .is_none());
        assert!(s.revocation_of(INSTANCE, Some(NODE), 999, 1100).is_none());
    }

    #[test]
    fn revoke_stores_what_each_kind_kills_and_a_node_revocation_bans_the_agent() {
        let (_dir, core, _, agent) = crate::core::testing::core_with_agent();
        let agent = agent.record.spiffe_id;
        let entry = core
            .create_entry(&ztid_proto::node::Entry {
                spiffe_id: APP.into(),
                parent_id: agent.clone(),
                selectors: vec![ztid_proto::node::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                ..Default::default()
            })
            .unwrap();
        let issued_before = now() - 1;

        let r = core
            .revoke(RevocationKind::Instance, INSTANCE, "leaked", "test")
            .unwrap();
        assert_eq!(
            (r.spiffe_id.as_str(), r.reason.as_str()),
            (INSTANCE, "leaked")
        );
        // Past every credential issued before it (defaults: 3600 s X509-SVIDs) + 60 s.
        assert_eq!(r.expires_at - r.revoked_at, 3660);
        // Counted at once by the server that wrote it.
        assert_eq!(
            core.revocation_of(INSTANCE, None, now() + 100).unwrap(),
            Some(r.clone())
        );

        let r = core
            .revoke(RevocationKind::Entry, &entry.id, "", "test")
            .unwrap();
        assert_eq!(r.spiffe_id, APP);
        let other = "spiffe://example.org/app/4567";
        assert!(core
            .revocation_of(other, None, issued_before)
            .unwrap()
            .is_some());

        let r = core
            .revoke(RevocationKind::Node, &agent, "", "test")
            .unwrap();
        assert_eq!(
            (r.target.as_str(), r.spiffe_id.as_str()),
            (agent.as_str(), "")
        );
        assert!(core.store.get_agent(&agent).unwrap().unwrap().banned);
        let elsewhere = "spiffe://example.org/db/1";
        assert!(core
            .revocation_of(elsewhere, Some(&agent), issued_before)
            .unwrap()
            .is_some());
        assert!(core
            .revocation_of(elsewhere, None, issued_before)
            .unwrap()
            .is_none());
        assert_eq!(core.revocations_in_force().unwrap().len(), 3);
        assert_eq!(core.list_revocations().unwrap().len(), 3);

        // Refusals, each of its kind, storing nothing.
        let refused = |kind, target: &str, reason: &str| {
            core.revoke(kind, target, reason, "test").unwrap_err()
        };
        assert!(matches!(
            refused(RevocationKind::Entry, "nope", ""),
            Error::NotFound(_)
        ));
        assert!(matches!(
            refused(RevocationKind::Instance, "spiffe://other.org/app/1", ""),
            Error::InvalidInput(_)
        ));
        assert!(matches!(
            refused(RevocationKind::Instance, "spiffe://example.org", ""),
            Error::InvalidInput(_)
        ));
        assert!(matches!(
            refused(RevocationKind::Node, APP, ""),
            Error::InvalidInput(_)
        ));
        assert!(matches!(
            refused(RevocationKind::Instance, INSTANCE, "a\nb"),
            Error::InvalidInput(_)
        ));
        assert!(matches!(
            refused(
                RevocationKind::Instance,
                INSTANCE,
                &"r".repeat(MAX_REASON_BYTES + 1)
            ),
            Error::InvalidInput(_)
        ));
        assert_eq!(core.list_revocations().unwrap().len(), 3);
    }

    #[test]
    fn grants_are_created_listed_and_deleted_through_the_core() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let req = crate::datastore::GrantRecord {
            id: String::new(),
            spiffe_id: APP.into(),
            audience: "https://mcp.example".into(),
            scopes: vec!["tools.read".into()],
            ttl_seconds: 0,
            max_per_minute: 0,
            node_selectors: Vec::new(),
            may_delegate: false,
            created_at: 0,
        };
        let g = core.create_grant(&req, "test").unwrap();
        assert_eq!(
            core.grants_for(INSTANCE, "https://mcp.example").unwrap(),
            std::slice::from_ref(&g)
        );
        assert_eq!(core.get_grant(&g.id).unwrap(), g);
        assert_eq!(
            core.list_grants(Some(APP)).unwrap(),
            std::slice::from_ref(&g)
        );
        assert!(core.list_grants(Some(INSTANCE)).unwrap().is_empty());
        // The [sts] maximum (its default without an [sts] table) bounds the TTL.
        let mut long = req.clone();
        long.ttl_seconds = crate::config::StsConfig::DEFAULT_MAX_TTL_SECONDS + 1;
        assert!(matches!(
            core.create_grant(&long, "test"),
            Err(Error::InvalidInput(_))
        ));
        assert_eq!(core.delete_grant(&g.id, "test").unwrap(), g);
        assert!(core
            .grants_for(INSTANCE, "https://mcp.example")
            .unwrap()
            .is_empty());
        assert!(matches!(
            core.delete_grant(&g.id, "test"),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(core.get_grant(&g.id), Err(Error::NotFound(_))));
    }

    #[test]
    fn the_first_revocation_in_force_is_found_among_several() {
        let mut expired = rev(RevocationKind::Instance, INSTANCE, INSTANCE, 0);
        expired.expires_at = 10;
        let s = AccessSnapshot::build(
            Vec::new(),
            vec![expired, rev(RevocationKind::Entry, "e1", APP, 1000)],
        );
        let found = s.revocation_of(INSTANCE, None, 500, 1001).unwrap();
        assert_eq!(found.kind, RevocationKind::Entry);
    }
}
