//! Who may call which admin RPC. Deny by default.
//!
//! - On the admin Unix socket the caller is the kernel's SO_PEERCRED uid; only the
//!   configured uids (default: the server's own) get in, with every right.
//! - On the remote admin listener (mutual TLS, off by default) the caller is the
//!   SPIFFE ID of its X509-SVID; it gets the roles the config binds to that ID and
//!   nothing else: an unknown ID has no role and every call is refused.
//!
//! No role can reach a higher one: remote roles bind only to admin identities,
//! `spiffe://TD/ztid/admin/NAME` (the config refuses any other ID at start), which
//! sit under the reserved prefix that no entry may claim and no workload CSR may name;
//! they are issued only by `IssueAdminSvid`, which is served on the admin socket alone
//! ([`LOCAL_ONLY`]). The caller's ID is read in canonical spelling only, so the string
//! lookup is an identity comparison. And an admin identity counts only in a certificate
//! the cluster's own X.509 authorities signed: under an upstream root the bundle trusts
//! the organisation's root, so any other CA under it (another trust domain's, say) could
//! otherwise sign `spiffe://TD/ztid/admin/root` itself. Several servers on one database
//! are one cluster: an admin SVID issued by server A is admitted by server B's remote
//! admin API (its roles are B's config), as an agent attested through A is by B (see
//! `core/agent_auth.rs` for why that is no wider trust). The issuers are the X.509
//! authorities in the servers' CA states, never the upstream root nor a federated
//! bundle, and never a tainted one (its key may be in the wrong hands; a retired
//! server's authorities are all tainted): see [`own_issuers`].
//!
//! Every decision, allowed or refused, is audited; refusals through [`RefusalAudit`]
//! (one by one up to its bounds per caller, with the peer's address, then summarised),
//! so any SVID of the trust domain that reaches the remote listener cannot turn calls it
//! has no role for into a flood of audit records. The check runs as a tower layer in
//! front of the admin service, where the RPC's path is visible.

use std::collections::HashMap;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

use crate::audit::AuditLog;
use crate::core::CaCore;
use crate::middleware::{Checked, GrpcResponse, PerRequest, ResponseFuture};
use crate::refusal_audit::RefusalAudit;
pub use crate::roles::Role;
use crate::{Error, RefusalKind};

/// RPCs no remote role grants, whatever the config: only the admin socket's uids,
/// on the server's host, may call them.
pub const LOCAL_ONLY: &[&str] = &["IssueAdminSvid", "RevokeAdminCredentials"];

/// The path prefix of every admin RPC.
const ADMIN_SERVICE_PREFIX: &str = "/ztid.admin.v1.Admin/";

/// A CA whose leaves may carry an admin identity: its certificate, and whether it is
/// tainted (then what it signed carries no admin role: see [`own_issuers`]).
#[derive(Debug, Clone)]
pub struct AdminIssuer {
    /// The CA certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Tainted: suspected compromised, on its way out.
    pub tainted: bool,
}

/// The CAs whose leaves may carry an admin identity, read at each call (authorities
/// rotate, and are tainted and revoked).
pub type AdminIssuers = Arc<dyn Fn() -> Vec<AdminIssuer> + Send + Sync>;

/// The cluster's own X.509 authorities: every server's on the shared database (this
/// server's alone on sled), prepared, active and old, as of the last cluster reload (a
/// revoked one is gone): the only issuers of admin identities. Not the upstream root
/// and no federated bundle. None readable: no remote admin is admitted.
///
/// A tainted authority is listed as such, and an admin certificate it signed carries no
/// role: a taint says its key may be in the wrong hands, and a revocation waits until
/// every agent has moved off it (possibly long), so otherwise whoever holds the key
/// could sign `spiffe://TD/ztid/admin/NAME` for any configured admin and act with its
/// roles (create join tokens, say, whose agents outlive the authority). Admins issue
/// a new credential (`ztid-server admin credential issue`), signed by the active one.
pub fn own_issuers(core: &Arc<CaCore>) -> AdminIssuers {
    let core = core.clone();
    Arc::new(move || {
        core.authorities
            .cluster_list(crate::authority::Kind::X509)
            .map(|all| {
                all.into_iter()
                    .map(|(_, a)| AdminIssuer {
                        cert: a.cert_der.into(),
                        tainted: a.tainted,
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// When the admin credentials of an admin ID (its first argument) issued at a time (the
/// second, Unix seconds) were revoked, if they were: read at each call, from the
/// revocations every server of the cluster shares (`RevokeAdminCredentials`).
pub type AdminRevocations = Arc<dyn Fn(&str, i64) -> crate::Result<Option<i64>> + Send + Sync>;

/// The cluster's admin credential revocations ([`CaCore::revocation_of`]: served from
/// memory, re-read from the store within seconds, an error when the store has been
/// unreadable too long, which refuses the call).
pub fn own_revocations(core: &Arc<CaCore>) -> AdminRevocations {
    let core = core.clone();
    Arc::new(move |id, issued_at| {
        Ok(core
            .revocation_of(id, None, issued_at)?
            .map(|r| r.revoked_at))
    })
}

/// Which of the cluster's authorities signed a remote admin's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuerVerdict {
    /// An untainted authority of the cluster, and the certificate is current.
    Cluster,
    /// A tainted authority of the cluster: no role counts.
    Tainted,
    /// None of the cluster's authorities (or the certificate is not current).
    Foreign,
}

/// The authenticated admin caller, put into request extensions for the handlers.
#[derive(Debug, Clone)]
pub struct AdminCaller(pub String);

/// The policy: local uids and remote SPIFFE IDs with their roles.
pub struct AdminPolicy {
    local_uids: Vec<u32>,
    /// What a refused local caller can do ([`Self::local_next_step`]).
    local_next_step: String,
    remote_roles: HashMap<String, Vec<Role>>,
    issuers: AdminIssuers,
    revocations: AdminRevocations,
    audit: Option<Arc<AuditLog>>,
    refusals: Arc<RefusalAudit>,
}

/// A refused call: who (as far as known), why, and a short stable label of why.
type Refused = (String, String, &'static str);

impl AdminPolicy {
    /// A policy admitting `local_uids` on the socket and `remote_roles` over mTLS, in
    /// certificates signed by one of `issuers` and not revoked in `revocations`;
    /// refusals are audited within `refusals`' bounds (its summaries are written by a
    /// flusher the caller spawns on `audit`).
    pub fn new(
        local_uids: Vec<u32>,
        remote_roles: HashMap<String, Vec<Role>>,
        issuers: AdminIssuers,
        revocations: AdminRevocations,
        audit: Option<Arc<AuditLog>>,
        refusals: Arc<RefusalAudit>,
    ) -> Self {
        Self {
            local_next_step: Self::local_next_step(&local_uids),
            local_uids,
            remote_roles,
            issuers,
            revocations,
            audit,
            refusals,
        }
    }

    /// What a refused local caller can do, for the refusal it receives (not for the
    /// audit record, which keeps the short reason): the admitted uids, by name where
    /// this host knows them. Made once, so a flood of refused calls reads no user
    /// database.
    fn local_next_step(local_uids: &[u32]) -> String {
        let named: Vec<(u32, Option<String>)> = local_uids
            .iter()
            .map(|&uid| {
                let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name);
                (uid, name)
            })
            .collect();
        let users: Vec<String> = named
            .iter()
            .map(|(uid, name)| match name {
                Some(n) => format!("{n} (uid {uid})"),
                None => format!("uid {uid}"),
            })
            .collect();
        // One admitted user with a name (the usual case): the exact command.
        let run_as = match named.as_slice() {
            [(_, Some(name))] => format!("`sudo -u {name} ztid-server ...`"),
            _ => "`sudo -u USER ztid-server ...`".to_string(),
        };
        format!(
            "this server admits {} on its admin socket: run the command as that user ({run_as}), or add the uid to admin_uids in the server's config",
            users.join(", ")
        )
    }

    /// Whether `uid` is admitted on the admin socket.
    pub fn admits_uid(&self, uid: u32) -> bool {
        self.local_uids.contains(&uid)
    }

    /// True if `leaf` (DER) was signed by one of the admin issuers, the cluster's own
    /// authorities ([`own_issuers`]), and is current. Its chain to the bundle was
    /// already checked by TLS; this pins the last link. A remote caller's roles count
    /// only when it holds.
    pub fn issued_by_cluster(&self, leaf: &[u8]) -> bool {
        self.issuer_of(leaf) == IssuerVerdict::Cluster
    }

    /// Which of the admin issuers ([`own_issuers`]) signed `leaf` (DER), if any, with
    /// the certificate current: an untainted one, a tainted one, or none.
    pub fn issuer_of(&self, leaf: &[u8]) -> IssuerVerdict {
        let (tainted, current): (Vec<AdminIssuer>, Vec<AdminIssuer>) =
            (self.issuers)().into_iter().partition(|i| i.tainted);
        let signed_by = |issuers: Vec<AdminIssuer>| {
            let roots: Vec<CertificateDer<'static>> = issuers.into_iter().map(|i| i.cert).collect();
            !roots.is_empty()
                && ztid_spiffe::svid::verify_chain(
                    &[CertificateDer::from(leaf)],
                    &roots,
                    UnixTime::now(),
                    ztid_spiffe::svid::Usage::Client,
                )
                .is_ok()
        };
        if signed_by(current) {
            IssuerVerdict::Cluster
        } else if signed_by(tainted) {
            IssuerVerdict::Tainted
        } else {
            IssuerVerdict::Foreign
        }
    }

    /// Decides one call; `Ok(caller)` or `Err((caller, reason, label))`.
    pub fn decide(&self, ext: &http::Extensions, path: &str) -> Result<String, Refused> {
        // The method is the one segment after the service: the role table is keyed by
        // it, so a path with more segments is no admin RPC (the router would not serve
        // it either, but the decision does not rest on that).
        let Some(method) = path
            .strip_prefix(ADMIN_SERVICE_PREFIX)
            .filter(|m| !m.is_empty() && !m.contains('/'))
        else {
            return Err((
                "unknown".into(),
                format!("{path} is not an admin RPC"),
                "admin_unknown_rpc",
            ));
        };
        if let Some(info) = ext.get::<UdsConnectInfo>() {
            let Some(cred) = info.peer_cred else {
                return Err((
                    "unknown".into(),
                    "admin caller has no peer credentials".into(),
                    "admin_no_peer_credentials",
                ));
            };
            let who = format!("uid:{} pid:{}", cred.uid(), cred.pid().unwrap_or(0));
            return if self.admits_uid(cred.uid()) {
                Ok(who)
            } else {
                Err((
                    who,
                    format!("uid {} may not use the admin API", cred.uid()),
                    "admin_uid_not_admitted",
                ))
            };
        }
        if let Some(info) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
            let leaf = info
                .peer_certs()
                .and_then(|c| c.first().map(|c| c.as_ref().to_vec()));
            let Some(leaf) = leaf else {
                return Err((
                    "unknown".into(),
                    "remote admin call without an X509-SVID".into(),
                    "admin_no_svid",
                ));
            };
            return self.decide_remote(&leaf, method);
        }
        Err((
            "unknown".into(),
            "admin call over an unknown transport".into(),
            "admin_unknown_transport",
        ))
    }

    /// Decides one call of `method` by a remote caller whose TLS leaf (DER, its chain
    /// to the bundle already checked by TLS) is `leaf`.
    pub fn decide_remote(&self, leaf: &[u8], method: &str) -> Result<String, Refused> {
        let id = ztid_spiffe::svid::spiffe_id_of_leaf(leaf)
            .map(|i| i.to_string())
            .map_err(|e| {
                (
                    "unknown".into(),
                    format!("remote admin certificate: {e}"),
                    "admin_bad_svid",
                )
            })?;
        if LOCAL_ONLY.contains(&method) {
            return Err((
                id,
                format!("{method} is served only on the admin socket, on the server's host"),
                "admin_local_only",
            ));
        }
        let roles = self.remote_roles.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        if !roles.is_empty() {
            match self.issuer_of(leaf) {
                IssuerVerdict::Cluster => {}
                IssuerVerdict::Tainted => {
                    return Err((
                        id.clone(),
                        format!(
                            "{id} is in a certificate signed by a tainted authority, which \
                             grants no admin role; issue a new admin credential on the \
                             server's host (`ztid-server admin credential issue`)"
                        ),
                        "admin_issuer_tainted",
                    ))
                }
                IssuerVerdict::Foreign => {
                    return Err((
                        id.clone(),
                        format!(
                            "{id} is not in a current certificate this server's authority \
                             signed (nor another server's of its cluster); admin identities \
                             come only from `ztid-server admin credential issue`"
                        ),
                        "admin_not_issued_here",
                    ))
                }
            }
            self.refuse_revoked(&id, leaf)?;
        }
        if roles.iter().any(|r| r.allows(method)) {
            Ok(id)
        } else if roles.is_empty() {
            Err((
                id.clone(),
                format!("{id} has no admin role"),
                "admin_no_role",
            ))
        } else {
            Err((
                id.clone(),
                format!("{id} ({roles:?}) may not call {method}"),
                "admin_role_lacks_call",
            ))
        }
    }

    /// Refuses a credential of admin `id` (its leaf, DER) issued before a revocation of
    /// that ID's credentials, or when the revocations cannot be read (fail closed).
    fn refuse_revoked(&self, id: &str, leaf: &[u8]) -> Result<(), Refused> {
        // A leaf whose issue time cannot be read counts as issued before any revocation.
        let issued_at = crate::authority::leaf_issued_at(leaf).unwrap_or(i64::MIN);
        match (self.revocations)(id, issued_at) {
            Ok(None) => Ok(()),
            Ok(Some(revoked_at)) => Err((
                id.to_string(),
                format!(
                    "{id}'s admin credentials issued before {} are revoked, this one \
                     included; issue a new one on the server's host (`ztid-server admin \
                     credential issue`)",
                    ztid_human::rfc3339(revoked_at)
                ),
                "admin_credential_revoked",
            )),
            Err(e) => Err((
                id.to_string(),
                format!("the admin credential revocations cannot be read, so no remote admin call is admitted: {e}"),
                "admin_revocations_unavailable",
            )),
        }
    }

    fn audit_allowed(&self, caller: &str, method: &str) {
        if let Some(a) = &self.audit {
            let _ = a.append(serde_json::json!({
                "type": "admin_allowed", "caller": caller, "call": method, "reason": "",
            }));
        }
    }

    /// Audits a refusal within the bounds, counted per caller (per address when the
    /// caller is unknown).
    fn audit_refused(&self, ext: &http::Extensions, refused: &Refused, method: &str) {
        let Some(a) = &self.audit else { return };
        let (caller, reason, label) = refused;
        let peer = ext
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr());
        let key = match peer {
            Some(p) if caller == "unknown" => p.ip().to_string(),
            _ => caller.clone(),
        };
        self.refusals.record(
            a,
            &key,
            peer.map(|p| p.to_string()).as_deref(),
            label,
            serde_json::json!({"type": "admin_refused", "caller": caller, "call": method,
                "reason": reason}),
        );
    }
}

/// The tower layer enforcing an [`AdminPolicy`].
#[derive(Clone)]
pub struct AdminAuthzLayer(pub Arc<AdminPolicy>);

impl<S> tower::Layer<S> for AdminAuthzLayer {
    type Service = Checked<Self, S>;
    fn layer(&self, inner: S) -> Self::Service {
        Checked::new(self.clone(), inner)
    }
}

impl PerRequest for AdminAuthzLayer {
    fn handle<S, B>(&self, mut ready: S, mut req: http::Request<B>) -> ResponseFuture<S::Error>
    where
        S: tower::Service<http::Request<B>, Response = GrpcResponse> + Send + 'static,
        S::Future: Send,
        B: Send + 'static,
    {
        let policy = &self.0;
        let path = req.uri().path().to_string();
        let method = path.rsplit('/').next().unwrap_or_default().to_string();
        match policy.decide(req.extensions(), &path) {
            Ok(caller) => {
                policy.audit_allowed(&caller, &method);
                req.extensions_mut().insert(AdminCaller(caller));
                Box::pin(async move { ready.call(req).await })
            }
            Err(refused) => {
                let (caller, reason, _) = &refused;
                tracing::warn!(event = "admin_refused", caller = %caller, call = %method, reason = %reason, "admin call refused");
                policy.audit_refused(req.extensions(), &refused, &method);
                let message = if refused.2 == "admin_uid_not_admitted" {
                    format!("{}: {}", refused.1, policy.local_next_step)
                } else {
                    refused.1
                };
                let refusal = Error::refused(RefusalKind::CallNotAllowed, message);
                let resp = tonic::Status::from(refusal).into_http();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_uid_is_told_who_is_admitted_and_what_to_run() {
        let step = AdminPolicy::local_next_step(&[0]);
        assert!(step.contains("root (uid 0)"), "{step}");
        assert!(step.contains("`sudo -u root ztid-server ...`"), "{step}");
        assert!(step.contains("admin_uids"), "{step}");
        // A uid no user has: named by number, the command left generic.
        let step = AdminPolicy::local_next_step(&[4_000_000_001]);
        assert!(
            step.contains("uid 4000000001") && step.contains("sudo -u USER"),
            "{step}"
        );
    }

    #[test]
    fn roles_grant_only_their_calls() {
        assert!(Role::Viewer.allows("ListEntries"));
        assert!(!Role::Viewer.allows("CreateEntry"));
        assert!(Role::Operator.allows("CreateEntry") && Role::Operator.allows("BanAgent"));
        // The entry batches, update and counts: the same roles as their single calls.
        for m in ["UpdateEntry", "BatchCreateEntries", "BatchDeleteEntries"] {
            assert!(Role::Operator.allows(m) && !Role::Viewer.allows(m), "{m}");
            assert!(!Role::AuthorityAdmin.allows(m), "{m}");
        }
        for m in ["CountEntries", "CountAgents"] {
            for role in [Role::Viewer, Role::Operator, Role::AuthorityAdmin] {
                assert!(role.allows(m), "{role:?} {m}");
            }
        }
        assert!(!Role::Operator.allows("RevokeAuthority"));
        assert!(
            Role::AuthorityAdmin.allows("RevokeAuthority")
                && !Role::AuthorityAdmin.allows("CreateJoinToken")
        );
        assert!(!Role::Operator.allows("SomethingNew"), "deny by default");
        for role in [Role::Viewer, Role::Operator, Role::AuthorityAdmin] {
            for m in LOCAL_ONLY {
                assert!(!role.allows(m), "{role:?} must not grant {m}");
            }
        }
        assert_eq!(Role::parse("authority-admin"), Some(Role::AuthorityAdmin));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn grant_and_revocation_writes_need_the_operator_role() {
        for m in ["CreateGrant", "DeleteGrant", "RevokeInstance"] {
            assert!(Role::Operator.allows(m), "{m}");
            assert!(!Role::Viewer.allows(m), "{m}");
            assert!(!Role::AuthorityAdmin.allows(m), "{m}");
        }
        for m in ["ListGrants", "GetGrant", "ListRevocations"] {
            for role in [Role::Viewer, Role::Operator, Role::AuthorityAdmin] {
                assert!(role.allows(m), "{role:?} {m}");
            }
        }
    }

    /// A policy binding `alice` to `roles`, with the cluster's issuers of `core`.
    fn policy_of(core: &Arc<CaCore>, roles: Vec<Role>) -> AdminPolicy {
        AdminPolicy::new(
            vec![0],
            HashMap::from([("spiffe://example.org/ztid/admin/alice".to_string(), roles)]),
            own_issuers(core),
            own_revocations(core),
            None,
            Arc::new(RefusalAudit::new(
                10,
                100,
                std::time::Duration::from_secs(60),
            )),
        )
    }

    /// An admin SVID leaf (DER) for `name`, issued by `core`'s active authority.
    fn admin_leaf(core: &CaCore, name: &str) -> Vec<u8> {
        let csr = crate::core::testing::fresh_csr();
        let (_, leaf) = core.issue_admin_svid(name, &csr, 3600, "test").unwrap();
        leaf.chain.first().unwrap().clone()
    }

    #[test]
    fn an_admin_credential_signed_by_a_tainted_authority_carries_no_role() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let policy = policy_of(&core, vec![Role::AuthorityAdmin]);
        let before = admin_leaf(&core, "alice");
        assert_eq!(
            policy.decide_remote(&before, "PrepareAuthority"),
            Ok("spiffe://example.org/ztid/admin/alice".to_string())
        );
        // Rotation alone keeps it: the old authority still counts.
        let old = core.authorities.x509().record().id.clone();
        core.prepare_authority(crate::authority::Kind::X509, "test")
            .unwrap();
        core.activate_authority(crate::authority::Kind::X509, "test")
            .unwrap();
        assert!(policy.decide_remote(&before, "ListEntries").is_ok());
        // Tainted: whoever holds its key could sign any admin's ID. Refused, for every
        // call, with the way out.
        core.taint_authority(crate::authority::Kind::X509, &old, "test")
            .unwrap();
        for method in ["ListEntries", "TaintAuthority", "RevokeAuthority"] {
            let (who, reason, label) = policy.decide_remote(&before, method).unwrap_err();
            assert_eq!(label, "admin_issuer_tainted", "{method}");
            assert_eq!(who, "spiffe://example.org/ztid/admin/alice");
            assert!(
                reason.contains("signed by a tainted authority")
                    && reason.contains("admin credential issue"),
                "{reason}"
            );
        }
        assert_eq!(policy.issuer_of(&before), IssuerVerdict::Tainted);
        assert!(!policy.issued_by_cluster(&before));
        // A new credential, from the active authority, has the roles again.
        let after = admin_leaf(&core, "alice");
        assert_eq!(policy.issuer_of(&after), IssuerVerdict::Cluster);
        assert!(policy.decide_remote(&after, "RevokeAuthority").is_ok());
    }

    #[test]
    fn a_revoked_admin_credential_carries_no_role_and_a_new_one_does() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let policy = policy_of(&core, vec![Role::Operator]);
        let stolen = admin_leaf(&core, "alice");
        let bob = admin_leaf(&core, "bob");
        assert!(policy.decide_remote(&stolen, "CreateEntry").is_ok());
        // Revoked in the second it was issued: revocations count whole seconds, and the
        // credential may have been issued before the revocation in that second.
        let _revocation = core
            .revoke(
                crate::datastore::RevocationKind::Admin,
                "spiffe://example.org/ztid/admin/alice",
                "laptop stolen",
                "test",
            )
            .unwrap();
        for method in ["CreateEntry", "ListEntries"] {
            let (who, reason, label) = policy.decide_remote(&stolen, method).unwrap_err();
            assert_eq!(label, "admin_credential_revoked", "{method}");
            assert_eq!(who, "spiffe://example.org/ztid/admin/alice");
            assert!(
                reason.contains("are revoked") && reason.contains("admin credential issue"),
                "{reason}"
            );
        }
        // Another admin's credential is untouched (it has no role here either way).
        assert_eq!(
            policy.decide_remote(&bob, "ListEntries").unwrap_err().2,
            "admin_no_role"
        );
        // A credential issued right after the revocation has the roles again: it is
        // dated past the revocation's window, without a notBefore in the future.
        let fresh = admin_leaf(&core, "alice");
        let not_before = ztid_spiffe::svid::not_before(&fresh).unwrap();
        assert!(not_before <= crate::core::now(), "{not_before}");
        assert!(policy.decide_remote(&fresh, "CreateEntry").is_ok());
        assert!(policy.decide_remote(&stolen, "CreateEntry").is_err());
    }

    #[test]
    fn unreadable_revocations_refuse_every_remote_admin() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let policy = AdminPolicy::new(
            vec![0],
            HashMap::from([(
                "spiffe://example.org/ztid/admin/alice".to_string(),
                vec![Role::Viewer],
            )]),
            own_issuers(&core),
            Arc::new(|_, _| Err(Error::Internal("store down".into()))),
            None,
            Arc::new(RefusalAudit::new(
                10,
                100,
                std::time::Duration::from_secs(60),
            )),
        );
        let alice = admin_leaf(&core, "alice");
        let (_, reason, label) = policy.decide_remote(&alice, "ListEntries").unwrap_err();
        assert_eq!(label, "admin_revocations_unavailable");
        assert!(reason.contains("store down"), "{reason}");
    }

    #[test]
    fn a_remote_admin_gets_exactly_its_roles_and_never_a_local_only_call() {
        let (_dir, core, agent_leaf, _) = crate::core::testing::core_with_agent();
        let policy = policy_of(&core, vec![Role::Operator]);
        let alice = admin_leaf(&core, "alice");
        assert!(policy.decide_remote(&alice, "CreateEntry").is_ok());
        let (_, reason, label) = policy
            .decide_remote(&alice, "PrepareAuthority")
            .unwrap_err();
        assert_eq!(label, "admin_role_lacks_call");
        assert!(reason.contains("may not call PrepareAuthority"), "{reason}");
        for local in ["IssueAdminSvid", "RevokeAdminCredentials"] {
            let (_, reason, label) = policy.decide_remote(&alice, local).unwrap_err();
            assert_eq!(label, "admin_local_only");
            assert!(
                reason.contains("served only on the admin socket"),
                "{reason}"
            );
        }
        // An admin ID no role names, and an agent's SVID: no role at all.
        let bob = admin_leaf(&core, "bob");
        for leaf in [&bob, &agent_leaf] {
            let (_, reason, label) = policy.decide_remote(leaf, "ListEntries").unwrap_err();
            assert_eq!(label, "admin_no_role");
            assert!(reason.contains("has no admin role"), "{reason}");
        }
    }

    #[test]
    fn an_admin_id_signed_outside_the_cluster_is_refused() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let (_other_dir, other, _, _) = crate::core::testing::core_with_agent();
        let policy = policy_of(&core, vec![Role::Viewer]);
        // Same trust domain, same admin name, another server's authority.
        let forged = admin_leaf(&other, "alice");
        let (_, reason, label) = policy.decide_remote(&forged, "ListEntries").unwrap_err();
        assert_eq!(label, "admin_not_issued_here");
        assert!(reason.contains("not in a current certificate"), "{reason}");
        assert_eq!(policy.issuer_of(&forged), IssuerVerdict::Foreign);
    }

    /// A policy with no remote admins, no authorities and root as the only local admin.
    fn policy_with_no_admins() -> AdminPolicy {
        AdminPolicy::new(
            vec![0],
            HashMap::new(),
            Arc::new(Vec::new),
            Arc::new(|_, _| Ok(None)),
            None,
            Arc::new(RefusalAudit::new(
                10,
                100,
                std::time::Duration::from_secs(60),
            )),
        )
    }

    #[test]
    fn a_path_with_more_segments_than_a_method_is_no_admin_rpc() {
        let p = policy_with_no_admins();
        let ext = http::Extensions::new();
        for path in [
            "/ztid.admin.v1.Admin/IssueAdminSvid/ListEntries",
            "/ztid.admin.v1.Admin/",
            "/ztid.admin.v1.Admin//",
            "/x/ztid.admin.v1.Admin/ListEntries",
        ] {
            let (_, reason, label) = p.decide(&ext, path).unwrap_err();
            assert_eq!(label, "admin_unknown_rpc", "{path}");
            assert!(reason.contains("not an admin RPC"), "{path}: {reason}");
        }
    }

    #[test]
    fn unknown_transport_and_paths_are_refused() {
        let p = policy_with_no_admins();
        let ext = http::Extensions::new();
        let (_, reason, label) = p
            .decide(&ext, "/ztid.admin.v1.Admin/ListEntries")
            .unwrap_err();
        assert_eq!(label, "admin_unknown_transport");
        assert!(reason.contains("unknown transport"));
        let (_, reason, label) = p.decide(&ext, "/ztid.node.v1.Node/Attest").unwrap_err();
        assert_eq!(label, "admin_unknown_rpc");
        assert!(reason.contains("not an admin RPC"));
    }
}
