//! `POST /introspect`: RFC 7662 token introspection. Being built (issue 14).

use std::sync::Arc;

use super::error::{OAuthError, OAuthErrorCode};
use crate::core::CaCore;

/// Handles one introspection request: `peer` is the TLS client certificate (leaf DER),
/// `body` the form-encoded request body (already bounded). Answers the RFC 7662 JSON
/// object (`{"active": false}` for any token that is not active).
pub async fn introspect(
    _core: &Arc<CaCore>,
    _peer: Option<&[u8]>,
    _body: &[u8],
) -> Result<serde_json::Value, OAuthError> {
    Err(OAuthError::new(
        OAuthErrorCode::ServerError,
        "introspection is being built",
    ))
}
