//! OAuth errors (RFC 6749 §5.2, RFC 8693 §2.2.2, RFC 8707 §2): the code a client acts
//! on and a description a person reads.

use serde_json::json;

/// The error codes the token and introspection endpoints answer.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthErrorCode {
    /// Malformed, missing, repeated or oversized parameter; wrong token type.
    InvalidRequest,
    /// The caller did not authenticate (no, bad, expired or foreign SVID).
    InvalidClient,
    /// The subject or actor token is invalid, expired, revoked, or may not be acted for.
    InvalidGrant,
    /// The caller is authenticated but not allowed (revoked, node, depth, policy, rate).
    UnauthorizedClient,
    /// A `grant_type` other than token exchange.
    UnsupportedGrantType,
    /// A scope that is not granted, or wider than the subject token's.
    InvalidScope,
    /// No grant names this resource or audience, or more than one target.
    InvalidTarget,
    /// The server failed (its store, its keys); nothing was issued.
    ServerError,
    /// The datastore is unreachable for now; retry.
    TemporarilyUnavailable,
}

impl OAuthErrorCode {
    /// The RFC's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidScope => "invalid_scope",
            Self::InvalidTarget => "invalid_target",
            Self::ServerError => "server_error",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
        }
    }

    /// The HTTP status (RFC 6749 §5.2: 400, and 401 for a client that failed to
    /// authenticate).
    pub fn status(self) -> http::StatusCode {
        match self {
            Self::InvalidClient => http::StatusCode::UNAUTHORIZED,
            Self::ServerError => http::StatusCode::INTERNAL_SERVER_ERROR,
            Self::TemporarilyUnavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

impl std::fmt::Display for OAuthErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the code and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {description}")]
pub struct OAuthError {
    /// What the client acts on.
    pub code: OAuthErrorCode,
    /// What a person reads (ASCII, as `error_description` must be).
    pub description: String,
}

impl OAuthError {
    /// A refusal with `code` because of `description`.
    pub fn new(code: OAuthErrorCode, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
        }
    }

    /// `invalid_request` because of `description`.
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(OAuthErrorCode::InvalidRequest, description)
    }

    /// The JSON body: `{"error": …, "error_description": …}`. RFC 6749 limits the
    /// description to printable ASCII without `"` and `\`; anything else is replaced.
    pub fn to_json(&self) -> String {
        let description: String = self
            .description
            .chars()
            .map(|c| match c {
                ' ' | '!' | '#'..='[' | ']'..='~' => c,
                _ => '?',
            })
            .collect();
        json!({"error": self.code.as_str(), "error_description": description}).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_code_and_keeps_description_ascii() {
        let e = OAuthError::new(OAuthErrorCode::InvalidScope, "scope \"x\" not granted: é");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"], "invalid_scope");
        assert_eq!(v["error_description"], "scope ?x? not granted: ?");
        assert_eq!(
            OAuthErrorCode::InvalidClient.status(),
            http::StatusCode::UNAUTHORIZED
        );
    }
}
