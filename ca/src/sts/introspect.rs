//! `POST /introspect`: RFC 7662 token introspection, for resource servers that want a
//! revocation to count before the token expires. Only this trust domain's workloads
//! may ask (an X509-SVID over mutual TLS): the answer says who holds which token.

use std::sync::Arc;

use serde_json::{json, Value};

use super::error::{OAuthError, OAuthErrorCode as Code};
use super::exchange::{mtls_client, refuse_reserved, refuse_revoked, server_error};
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
        Ok(access) => match inactive_reason(core, &access)? {
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

/// The introspecting party: a workload of this trust domain over mutual TLS, checked as
/// the token endpoint checks its callers: an SVID of this trust domain's authorities,
/// unexpired, its node still attested and not banned, not a ztid identity, not revoked.
fn authenticate(core: &CaCore, peer: Option<&[u8]>, t: i64) -> Result<String, OAuthError> {
    let leaf = peer.ok_or_else(|| {
        OAuthError::new(
            Code::InvalidClient,
            "introspection needs the caller's X509-SVID over mutual TLS (tls_client_auth)",
        )
    })?;
    let caller = mtls_client(core, leaf, t)?;
    refuse_reserved(core, &caller.spiffe_id)?;
    refuse_revoked(
        core,
        &caller.spiffe_id,
        caller.node.as_ref().map(|n| n.spiffe_id.as_str()),
        caller.issued_at,
        Code::UnauthorizedClient,
        "the client",
    )?;
    Ok(caller.spiffe_id)
}

/// Why a token that verifies is no longer active (`None`: it is): its subject, its
/// client or an actor of its chain revoked, or the grant that allowed it deleted. The
/// token endpoint asks the same of a subject token before acting on it.
pub(super) fn inactive_reason(
    core: &CaCore,
    a: &AccessToken,
) -> Result<Option<String>, OAuthError> {
    let server = |e: crate::Error| server_error(&e);
    // Each party against its own node: the subject's, and each actor's.
    let mut ids = vec![a.sub.as_str(), a.client_id.as_str()];
    ids.extend(a.act.iter());
    for id in ids {
        if let Some(r) = core
            .revocation_of(id, a.node_of(id), a.iat)
            .map_err(server)?
        {
            return Ok(Some(format!(
                "{id} was revoked by an operator ({} revocation of {})",
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
