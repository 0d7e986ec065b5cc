//! `POST /introspect`: RFC 7662 token introspection, for resource servers that want a
//! revocation to count before the token expires. Only this trust domain's workloads
//! may ask (an X509-SVID over mutual TLS): the answer says who holds which token.

use std::sync::Arc;

use serde_json::{json, Value};

use super::error::{OAuthError, OAuthErrorCode as Code};
use super::form::introspect_request;
use super::token::{self, AccessToken};
use crate::core::{now, CaCore};

fn inactive() -> Value {
    json!({"active": false})
}

/// Handles one introspection request: `peer` is the TLS client certificate (leaf DER),
/// `body` the form-encoded request body (already bounded). Answers the RFC 7662 JSON
/// object (`{"active": false}` for any token that is not active).
pub async fn introspect(
    core: &Arc<CaCore>,
    peer: Option<&[u8]>,
    body: &[u8],
) -> Result<Value, OAuthError> {
    let cfg = core.config.sts.as_ref().ok_or_else(|| {
        OAuthError::new(Code::ServerError, "the token endpoint is not configured")
    })?;
    let t = now();
    let caller = authenticate(core, peer, t)?;
    let jwt = introspect_request(body)?;
    let keys = core.bundle().jwt_authorities.clone();
    let answer = match token::verify(&jwt, &keys, &cfg.issuer(), t, cfg.max_delegation_depth) {
        Ok(access) => match still_active(core, &access)? {
            None => active(&access),
            Some(why) => {
                tracing::info!(event = "token_inactive", jti = %access.jti, subject = %access.sub, reason = %why, caller = %caller, "introspection: token revoked");
                inactive()
            }
        },
        Err(e) => {
            tracing::debug!(event = "token_inactive", reason = %e.description, caller = %caller, "introspection: token not valid");
            inactive()
        }
    };
    Ok(answer)
}

/// The introspecting party: a workload of this trust domain over mutual TLS.
fn authenticate(core: &CaCore, peer: Option<&[u8]>, t: i64) -> Result<String, OAuthError> {
    let bad = |why: &str| OAuthError::new(Code::InvalidClient, why);
    let leaf = peer.ok_or_else(|| {
        bad("introspection needs the caller's X509-SVID over mutual TLS (tls_client_auth)")
    })?;
    if !core.issued_by_own_authority(leaf) {
        return Err(bad(
            "the client certificate is not an X509-SVID this trust domain's authorities signed",
        ));
    }
    let exp = ztid_spiffe::svid::not_after(leaf).map_err(|e| bad(&e.to_string()))?;
    if t >= exp {
        return Err(bad("the client's X509-SVID has expired"));
    }
    ztid_spiffe::svid::spiffe_id_of_leaf(leaf)
        .map(|id| id.to_string())
        .map_err(|e| bad(&e.to_string()))
}

/// Why a token that verifies is no longer active (`None`: it is): its subject, its
/// client or an actor of its chain revoked, or the grant that allowed it deleted.
fn still_active(core: &CaCore, a: &AccessToken) -> Result<Option<String>, OAuthError> {
    let server = |e: crate::Error| OAuthError::new(Code::ServerError, e.to_string());
    let node = a
        .node
        .as_ref()
        .and_then(|n| n.get("agent"))
        .and_then(Value::as_str);
    let mut ids = vec![(a.sub.as_str(), None), (a.client_id.as_str(), node)];
    ids.extend(a.act.iter().map(|actor| (actor, None)));
    for (id, node) in ids {
        if let Some(r) = core.revocation_of(id, node, a.iat).map_err(server)? {
            return Ok(Some(format!(
                "{id} revoked ({} revocation of {})",
                r.kind, r.target
            )));
        }
    }
    if core.store.get_grant(&a.grant).map_err(server)?.is_none() {
        return Ok(Some(format!("grant {} was deleted", a.grant)));
    }
    Ok(None)
}

fn active(a: &AccessToken) -> Value {
    let mut claims = a.to_claims();
    claims.insert("active".into(), json!(true));
    claims.insert("token_type".into(), json!("Bearer"));
    Value::Object(claims)
}
