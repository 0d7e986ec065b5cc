//! Issuance policy (ABAC) in Cedar: when configured, every node attestation and every
//! mint must be *permitted* by the policy; Cedar denies anything no `permit` matches,
//! and any `forbid` that matches wins.
//!
//! The request each policy sees:
//! - `principal`: `Agent::"<agent SPIFFE ID>"` (for `attest`, the agent being created);
//! - `action`: `Action::"attest"`, `Action::"mint_x509"`, `Action::"mint_jwt"` or
//!   `Action::"exchange"` (an access token at the token endpoint, docs/token-exchange.md);
//! - `resource`: `Identity::"<SPIFFE ID to be issued>"`;
//! - `context`: `{ spiffe_id, ttl, now, hour_utc, node: { agent, method, selectors },
//!   entry: { id, spiffe_id, parent_id, shared } }` (no `entry` for `attest`), where
//!   `node.selectors` is the set of selectors the node's *verified* evidence proved
//!   (`tpm:pcr:7:…`, `sev-snp:measurement:…`, `tdx:mrtd:…`, `join-token:used`, …).
//!   For `exchange`, the context also has `audience`, `scopes` (a set), `client_id`,
//!   `chain` (the actors, newest first) and `depth`; `principal` is the caller's node
//!   (`Agent::"unknown"` when the caller authenticated with a JWT-SVID, which proves no
//!   node), and `resource` the token's subject. With a policy file, exchanges need a
//!   `permit` like everything else: a policy written before exchanges existed denies them.
//!
//! Example: only nodes attested by TPM with PCR 7 as enrolled, at most 1 h SVIDs:
//! ```text
//! permit (principal, action == Action::"attest", resource);
//! permit (principal, action in [Action::"mint_x509", Action::"mint_jwt"], resource)
//! when { context.node.method == "tpm" &&
//!        context.node.selectors.contains("tpm:pcr:7:<hex>") && context.ttl <= 3600 };
//! ```
//!
//! The file is re-read when it changes; a file that does not parse is refused with
//! the parser's message and the previous policy stays in force.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityId, EntityTypeName, EntityUid, PolicySet,
    Request,
};
use serde_json::{json, Value};

use crate::{Error, RefusalKind, Result};

/// What is being decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A node attestation that passed its method's checks.
    Attest,
    /// An X509-SVID.
    MintX509,
    /// A JWT-SVID.
    MintJwt,
    /// An access token at the token endpoint.
    Exchange,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Attest => "attest",
            Action::MintX509 => "mint_x509",
            Action::MintJwt => "mint_jwt",
            Action::Exchange => "exchange",
        }
    }
}

/// The facts a decision is made on.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// The agent (principal).
    pub agent: &'a str,
    /// Its attestation method.
    pub method: &'a str,
    /// Selectors proved by its evidence.
    pub node_selectors: Vec<String>,
    /// The SPIFFE ID to be issued.
    pub spiffe_id: &'a str,
    /// The requested lifetime, seconds.
    pub ttl: i64,
    /// The entry, for mints.
    pub entry: Option<Value>,
    /// Unix seconds.
    pub now: i64,
    /// More context members (the exchange's audience, scopes, chain), merged in.
    pub extra: Option<serde_json::Map<String, Value>>,
}

/// A loaded policy file, reloaded when it changes.
pub struct IssuancePolicy {
    path: PathBuf,
    policies: ArcSwap<PolicySet>,
    loaded_mtime: Mutex<Option<SystemTime>>,
    authorizer: Authorizer,
}

fn parse(path: &Path) -> Result<(PolicySet, Option<SystemTime>)> {
    let text = std::fs::read_to_string(path).map_err(Error::io(format!(
        "reading issuance policy {}",
        path.display()
    )))?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let set = PolicySet::from_str(&text).map_err(|e| {
        let detail: Vec<String> = std::iter::once(e.to_string())
            .chain(miette_sources(&e).into_iter().filter(|s| !s.is_empty()))
            .collect();
        Error::Config(format!(
            "issuance policy {} does not parse: {}",
            path.display(),
            detail.join(": ")
        ))
    })?;
    Ok((set, mtime))
}

/// Cedar's parse errors carry their detail in related diagnostics.
fn miette_sources(e: &cedar_policy::ParseErrors) -> Vec<String> {
    e.iter().map(|x| x.to_string()).collect()
}

fn uid(type_name: &str, id: &str) -> Result<EntityUid> {
    let t = EntityTypeName::from_str(type_name)
        .map_err(|e| Error::Config(format!("entity type {type_name}: {e}")))?;
    Ok(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

impl IssuancePolicy {
    /// Loads `path`; a policy that does not parse is an error.
    pub fn load(path: &Path) -> Result<Self> {
        let (set, mtime) = parse(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            policies: ArcSwap::from_pointee(set),
            loaded_mtime: Mutex::new(mtime),
            authorizer: Authorizer::new(),
        })
    }

    /// Re-reads the file if it changed. `Ok(true)`: a new policy is in force;
    /// `Err`: the new file was refused and the old policy stays.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut loaded = self
            .loaded_mtime
            .lock()
            .map_err(|_| Error::Internal("policy lock poisoned".into()))?;
        if mtime == *loaded {
            return Ok(false);
        }
        // Remember the attempt either way, so a broken file is reported once.
        *loaded = mtime;
        let (set, _) = parse(&self.path)?;
        self.policies.store(std::sync::Arc::new(set));
        Ok(true)
    }

    /// Permits or refuses; the refusal names the deciding policies.
    pub fn authorize(&self, action: Action, f: &Facts<'_>) -> Result<()> {
        let hour_utc = (f.now.rem_euclid(86_400)) / 3600;
        let mut context = json!({
            "spiffe_id": f.spiffe_id,
            "ttl": f.ttl,
            "now": f.now,
            "hour_utc": hour_utc,
            "node": {"agent": f.agent, "method": f.method, "selectors": f.node_selectors},
        });
        if let Some(obj) = context.as_object_mut() {
            if let Some(e) = &f.entry {
                obj.insert("entry".into(), e.clone());
            }
            for (k, v) in f.extra.iter().flatten() {
                obj.insert(k.clone(), v.clone());
            }
        }
        let context = Context::from_json_value(context, None)
            .map_err(|e| Error::Config(format!("policy context: {e}")))?;
        let request = Request::new(
            uid("Agent", f.agent)?,
            uid("Action", action.name())?,
            uid("Identity", f.spiffe_id)?,
            context,
            None,
        )
        .map_err(|e| Error::Config(format!("policy request: {e}")))?;
        let policies = self.policies.load();
        let response = self
            .authorizer
            .is_authorized(&request, &policies, &Entities::empty());
        if response.decision() == Decision::Allow {
            return Ok(());
        }
        // Name policies by their `@id("…")` annotation when they have one.
        let deciding: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| {
                policies
                    .policy(id)
                    .and_then(|p| p.annotation("id"))
                    .map(str::to_string)
                    .unwrap_or_else(|| id.to_string())
            })
            .collect();
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        let why = if !deciding.is_empty() {
            format!("forbidden by {}", deciding.join(", "))
        } else if !errors.is_empty() {
            format!("policy errors: {}", errors.join("; "))
        } else {
            "no permit policy matches".to_string()
        };
        Err(Error::refused(
            RefusalKind::IssuancePolicy,
            format!(
                "issuance policy refuses {} of {} for {}: {why}",
                action.name(),
                f.spiffe_id,
                f.agent
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(selectors: &[&str], ttl: i64) -> Facts<'static> {
        Facts {
            agent: "spiffe://td/ztid/agent/tpm/ab",
            method: "tpm",
            node_selectors: selectors.iter().map(|s| s.to_string()).collect(),
            spiffe_id: "spiffe://td/app/1",
            ttl,
            entry: Some(
                json!({"id": "e1", "spiffe_id": "spiffe://td/app", "parent_id": "p", "shared": false}),
            ),
            now: 1_000_000,
            extra: None,
        }
    }

    #[test]
    fn claims_ttl_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.cedar");
        std::fs::write(
            &path,
            r#"@id("tpm-pcr7") permit (principal, action == Action::"mint_x509", resource)
               when { context.node.method == "tpm" && context.node.selectors.contains("tpm:pcr:7:aa") && context.ttl <= 3600 };"#,
        )
        .unwrap();
        let p = IssuancePolicy::load(&path).unwrap();
        assert!(p
            .authorize(Action::MintX509, &facts(&["tpm:pcr:7:aa"], 3600))
            .is_ok());
        let e = p
            .authorize(Action::MintX509, &facts(&["tpm:pcr:7:bb"], 3600))
            .unwrap_err();
        assert_eq!(e.refusal_kind(), Some(RefusalKind::IssuancePolicy), "{e}");
        let e = e.to_string();
        assert!(e.contains("no permit policy matches"), "{e}");
        assert!(
            p.authorize(Action::MintX509, &facts(&["tpm:pcr:7:aa"], 7200))
                .is_err(),
            "TTL over the limit"
        );
        assert!(
            p.authorize(Action::MintJwt, &facts(&["tpm:pcr:7:aa"], 60))
                .is_err(),
            "only what is permitted"
        );

        // A broken file is refused with the parse error; the old policy stays.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(
            &path,
            "permit (principal, action, resource) when { context.ttl <=",
        )
        .unwrap();
        let e = p.reload_if_changed().unwrap_err().to_string();
        assert!(e.contains("does not parse"), "{e}");
        assert!(p
            .authorize(Action::MintX509, &facts(&["tpm:pcr:7:aa"], 3600))
            .is_ok());

        // A valid change takes effect for the next decision.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, r#"@id("lockdown") forbid (principal, action, resource); permit (principal, action, resource);"#).unwrap();
        assert!(p.reload_if_changed().unwrap());
        let e = p
            .authorize(Action::MintX509, &facts(&["tpm:pcr:7:aa"], 60))
            .unwrap_err();
        assert_eq!(e.refusal_kind(), Some(RefusalKind::IssuancePolicy), "{e}");
        let e = e.to_string();
        assert!(e.contains("forbidden by lockdown"), "{e}");
    }
}
