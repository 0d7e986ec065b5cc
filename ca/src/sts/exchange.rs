//! `POST /token`: RFC 8693 token exchange. Being built (issue 14).

use std::sync::Arc;

use super::error::{OAuthError, OAuthErrorCode};
use crate::core::CaCore;

/// A successful exchange (RFC 8693 §2.2.1).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenResponse {
    /// The issued access token (RFC 9068 `at+jwt`).
    pub access_token: String,
    /// Always `urn:ietf:params:oauth:token-type:access_token`.
    pub issued_token_type: &'static str,
    /// Always `Bearer` (a bound token's binding is in its `cnf`).
    pub token_type: &'static str,
    /// Seconds until `exp`.
    pub expires_in: i64,
    /// The granted scopes, space-separated.
    pub scope: String,
}

impl TokenResponse {
    /// The JSON body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Handles one token request: `peer` is the TLS client certificate (leaf DER) when the
/// caller sent one, `body` the form-encoded request body (already bounded).
pub async fn token(
    _core: &Arc<CaCore>,
    _peer: Option<&[u8]>,
    _body: &[u8],
) -> Result<TokenResponse, OAuthError> {
    Err(OAuthError::new(
        OAuthErrorCode::ServerError,
        "token exchange is being built",
    ))
}
