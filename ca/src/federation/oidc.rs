//! OIDC discovery: the discovery document and the JWT authorities as a JWKS, on their
//! own plain-HTTP listener.

use std::sync::Arc;

use serde_json::json;

use super::http::{http1_listener, internal_error, not_found, refuse_unless_get, respond, Body};
use crate::core::CaCore;
use crate::{Error, Result};

/// The OIDC discovery document for `issuer`.
pub fn oidc_document(issuer: &str) -> serde_json::Value {
    let base = issuer.trim_end_matches('/');
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{base}/keys"),
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    })
}

/// The JWT authorities as a JWKS for OIDC relying parties (`use: sig`, `alg: ES256`).
pub fn oidc_jwks(core: &CaCore) -> Result<serde_json::Value> {
    let jwks: serde_json::Value = serde_json::from_str(
        &core
            .bundle()
            .jwks_json()
            .map_err(|e| Error::Certificate(e.to_string()))?,
    )?;
    let keys = jwks
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut k| {
            // Each key is a JWK object (jwks_json writes them).
            if let Some(obj) = k.as_object_mut() {
                let alg = if obj.get("crv").and_then(|c| c.as_str()) == Some("P-384") {
                    "ES384"
                } else {
                    "ES256"
                };
                obj.insert("use".into(), json!("sig"));
                obj.insert("alg".into(), json!(alg));
            }
            k
        })
        .collect::<Vec<_>>();
    Ok(json!({ "keys": keys }))
}

/// Serves OIDC discovery on its own plain-HTTP listener (off unless `[oidc]` is set),
/// within the HTTP/1 listener limits ([`crate::listeners`]).
pub async fn spawn_oidc(
    core: Arc<CaCore>,
    budget: &Arc<crate::listeners::DescriptorBudget>,
) -> Result<()> {
    let Some(oidc) = core.config.oidc.clone() else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(oidc.bind)
        .await
        .map_err(Error::io(format!(
            "binding the OIDC listener {}",
            oidc.bind
        )))?;
    tracing::info!(addr = %oidc.bind, issuer = %oidc.issuer, "OIDC discovery listening");
    let bounded = http1_listener(
        "OIDC discovery",
        core.config.limits.oidc_max_connections,
        &core,
        budget,
    );
    let issuer = oidc.issuer;
    crate::listeners::serve_http1(listener, None, bounded, move |req| {
        oidc_response(&core, &issuer, req)
    });
    Ok(())
}

fn oidc_response(
    core: &CaCore,
    issuer: &str,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    if let Some(refused) = refuse_unless_get(req) {
        return refused;
    }
    match req.uri().path() {
        "/.well-known/openid-configuration" => respond(
            http::StatusCode::OK,
            "application/json",
            oidc_document(issuer).to_string(),
        ),
        "/keys" => match oidc_jwks(core) {
            Ok(j) => respond(http::StatusCode::OK, "application/json", j.to_string()),
            Err(e) => internal_error(&e),
        },
        _ => not_found(),
    }
}
