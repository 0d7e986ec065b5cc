//! The issuance policy as the core asks it: one check per mint, and reloading the
//! file when it changes.

use serde_json::json;

use super::{now, AuthenticatedAgent, CaCore};
use crate::datastore::EntryRecord;
use crate::Result;

impl CaCore {
    /// Asks the issuance policy, if there is one. `audience`: a JWT-SVID's audiences
    /// (`context.audience`), so the policy can say who may get a token for whom.
    pub(super) fn check_policy(
        &self,
        action: crate::policy::Action,
        agent: &AuthenticatedAgent,
        entry: &EntryRecord,
        spiffe_id: &str,
        ttl: i64,
        audience: Option<&[String]>,
    ) -> Result<()> {
        let Some(p) = &self.policy else { return Ok(()) };
        p.authorize(
            action,
            &crate::policy::Facts {
                agent: &agent.record.spiffe_id,
                method: &agent.record.method,
                node_selectors: agent
                    .record
                    .selectors
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                spiffe_id,
                ttl,
                entry: Some(json!({"id": entry.id, "spiffe_id": entry.spiffe_id,
                    "parent_id": entry.parent_id, "shared": entry.shared})),
                now: now(),
                extra: audience.map(|a| {
                    let mut m = serde_json::Map::new();
                    m.insert("audience".into(), json!(a));
                    m
                }),
            },
        )
    }

    /// Re-reads the issuance policy if its file changed; a broken file is refused
    /// (logged and audited with the parse error) and the old policy stays.
    pub fn reload_policy(&self) {
        let Some(p) = &self.policy else { return };
        match p.reload_if_changed() {
            Ok(false) => {}
            Ok(true) => {
                tracing::warn!(event = "policy_reloaded", "issuance policy reloaded");
                let _ = self.record(json!({"type": "policy_reloaded"}));
            }
            Err(e) => {
                tracing::error!(event = "policy_reload_refused", error = %e, "issuance policy refused; the previous policy stays in force");
                let _ =
                    self.record(json!({"type": "policy_reload_refused", "error": e.to_string()}));
            }
        }
    }
}
