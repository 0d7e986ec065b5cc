//! Authority rotation: listing, prepare, activate, taint, revoke (each logged and
//! audited), and the periodic housekeeping that rotates automatically.
//!
//! On a cluster every server rotates its own authorities: `prepare` and `activate`
//! act on the authorities of the server the operator talks to, and `taint` and
//! `revoke` of another server's authority are refused with the owning server's id
//! (see `AuthoritySet::not_own`). Why refuse rather than write the other server's
//! row: its keys are in its key manager (a revoke destroys the key, which only the
//! owner can do), and each CA state has exactly one writer, so no change can be
//! lost between a peer's write and the owner's next commit of its in-memory state.
//! The listing shows every server's authorities with their owner.

use serde_json::json;

use super::{now, CaCore};
use crate::authority::Kind;
use crate::datastore::AuthorityRecord;
use crate::Result;

impl CaCore {
    /// Every authority of a kind this server owns.
    pub fn list_authorities(&self, kind: Kind) -> Result<Vec<AuthorityRecord>> {
        self.authorities.list(kind)
    }

    /// Every server's authorities of a kind with the id of the server that owns each,
    /// re-read from the datastore first (an operator asking wants the current state).
    pub fn list_cluster_authorities(&self, kind: Kind) -> Result<Vec<(String, AuthorityRecord)>> {
        self.authorities.reload_cluster(now())?;
        self.authorities.cluster_list(kind)
    }

    /// This server's id (the owner of the authorities it changes).
    pub fn server_id(&self) -> &str {
        self.store.server_id()
    }

    fn log_authority_change(&self, caller: &str, kind: Kind, action: &str, r: &AuthorityRecord) {
        if let Err(e) = self.record(
            json!({"type": "authority_changed", "caller": caller, "kind": kind.as_str(),
            "action": action, "authority": r.id, "tainted": r.tainted, "not_after": r.not_after,
            "bundle_sequence": self.bundle().sequence}),
        ) {
            tracing::error!(error = %e, "could not audit an authority change");
        }
        tracing::warn!(
            event = "authority_changed",
            caller,
            kind = kind.as_str(),
            action,
            authority = %r.id,
            state = ?r.state,
            tainted = r.tainted,
            not_after = r.not_after,
            bundle_sequence = self.bundle().sequence,
            "authority {action}"
        );
    }

    /// Prepares a new authority of `kind`.
    pub fn prepare_authority(&self, kind: Kind, caller: &str) -> Result<AuthorityRecord> {
        let r = self.authorities.prepare(kind, now())?;
        self.log_authority_change(caller, kind, "prepared", &r);
        Ok(r)
    }

    /// Activates the prepared authority of `kind`; the server's own SVID moves to it at once.
    pub fn activate_authority(&self, kind: Kind, caller: &str) -> Result<AuthorityRecord> {
        let r = self.authorities.activate(kind, now())?;
        self.log_authority_change(caller, kind, "activated", &r);
        if kind == Kind::X509 {
            self.force_renew_server_svid()?;
        }
        Ok(r)
    }

    /// Taints an old authority of `kind`.
    pub fn taint_authority(&self, kind: Kind, id: &str, caller: &str) -> Result<AuthorityRecord> {
        let r = self.authorities.taint(kind, id, now())?;
        self.log_authority_change(caller, kind, "tainted", &r);
        if kind == Kind::X509 {
            self.force_renew_server_svid()?;
        }
        Ok(r)
    }

    /// Revokes a tainted authority once no agent depends on it.
    pub fn revoke_authority(&self, kind: Kind, id: &str, caller: &str) -> Result<AuthorityRecord> {
        let agents = self.store.list_agents()?;
        let t = now();
        let r = self.authorities.revoke(kind, id, t, |a| {
            agents
                .iter()
                .filter(|g| !g.banned && g.expires_at > t)
                .find_map(|g| {
                    // `<=`: a sync in the second of the taint may have come just before it.
                    if g.last_sync_at <= a.tainted_at {
                        Some(format!(
                            "agent {} has not synced since the taint",
                            g.spiffe_id
                        ))
                    } else if g.authorities_in_use.iter().any(|u| u == &a.id) {
                        Some(format!(
                            "agent {} still holds credentials it signed",
                            g.spiffe_id
                        ))
                    } else {
                        None
                    }
                })
        })?;
        self.log_authority_change(caller, kind, "revoked", &r);
        Ok(r)
    }

    /// Periodic work: automatic rotation, pruning of expired authorities, server SVID
    /// renewal, and the fallback reload of the other servers' authorities.
    pub fn housekeeping(&self) -> Result<()> {
        self.keep_liveness();
        self.maybe_reload_cluster();
        for c in self.authorities.tick(now())? {
            self.record(json!({"type": "authority_changed", "caller": "automatic rotation", "kind": c.kind.as_str(),
                "action": c.action, "authority": c.id}))?;
            tracing::warn!(event = "authority_changed", caller = "automatic rotation", kind = c.kind.as_str(), action = c.action, authority = %c.id, "authority {}", c.action);
            if c.kind == Kind::X509 && c.action == "activated" {
                self.force_renew_server_svid()?;
            }
        }
        self.maybe_renew_server_svid()
    }
}
