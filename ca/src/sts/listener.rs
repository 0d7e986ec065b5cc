//! The token endpoint's HTTPS listener (docs/token-exchange.md, "The endpoint"): TLS
//! with the server's own SVID (which names `localhost`, the listen address and
//! `dns_names` when `[sts]` is set) and an optional client certificate that must chain
//! to the trust bundle; HTTP/1.1 within the listener limits ([`crate::listeners`]); and
//! the routes: `POST /token`, `POST /introspect`, `GET /jwks` and the RFC 8414 metadata.
//! Every answer is JSON with `Cache-Control: no-store`; every refusal is an OAuth error.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, PRAGMA,
    TRANSFER_ENCODING,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;
use ztid_spiffe::tls::AgentCertVerifier;

use super::error::{OAuthError, OAuthErrorCode};
use crate::core::CaCore;
use crate::listeners::{DescriptorBudget, Listener, Timeouts};
use crate::{Error, Result};

/// RFC 8693's grant type, the only one the endpoint supports.
pub const TOKEN_EXCHANGE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The RFC 8414 metadata path.
pub const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";
/// The media type both POST routes require.
const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

type Body = Full<Bytes>;

/// The routes, and the one method each answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Token,
    Introspect,
    Jwks,
    Metadata,
}

impl Route {
    fn of(path: &str) -> Option<Self> {
        match path {
            "/token" => Some(Self::Token),
            "/introspect" => Some(Self::Introspect),
            "/jwks" => Some(Self::Jwks),
            METADATA_PATH => Some(Self::Metadata),
            _ => None,
        }
    }

    fn method(self) -> Method {
        match self {
            Self::Token | Self::Introspect => Method::POST,
            Self::Jwks | Self::Metadata => Method::GET,
        }
    }
}

/// The server's current SVID on every handshake, so renewal needs no restart.
struct CurrentSvid(Arc<CaCore>);

impl std::fmt::Debug for CurrentSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CurrentSvid")
    }
}

impl ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.server_svid())
    }
}

/// TLS of the token endpoint: the server's SVID; a client certificate optional, and
/// when sent verified against the trust domain's X.509 roots (the node API's verifier,
/// which follows the bundle as it rotates). TLS 1.2 and 1.3: OAuth clients are HTTPS
/// libraries of every age.
pub fn tls_config(core: &Arc<CaCore>) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AgentCertVerifier::new(core.roots())))
        .with_cert_resolver(Arc::new(CurrentSvid(core.clone())));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The RFC 8414 authorization server metadata for `issuer`.
pub fn metadata(issuer: &str) -> serde_json::Value {
    json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}/token"),
        "jwks_uri": format!("{issuer}/jwks"),
        "introspection_endpoint": format!("{issuer}/introspect"),
        "grant_types_supported": [TOKEN_EXCHANGE_GRANT_TYPE],
        "token_endpoint_auth_methods_supported": ["tls_client_auth", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256", "ES384"],
        "introspection_endpoint_auth_methods_supported": ["tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": true,
        "response_types_supported": [],
    })
}

/// What the request handlers share.
struct Endpoint {
    core: Arc<CaCore>,
    metadata: Bytes,
    max_request_bytes: usize,
}

/// Serves the token endpoint (off unless `[sts]` is set), within the HTTP/1 listener
/// limits and the shared descriptor `budget`.
pub async fn spawn_sts(core: Arc<CaCore>, budget: &Arc<DescriptorBudget>) -> Result<()> {
    let Some(sts) = &core.config.sts else {
        return Ok(());
    };
    let tcp = tokio::net::TcpListener::bind(sts.listen)
        .await
        .map_err(Error::io(format!(
            "binding the token endpoint {}",
            sts.listen
        )))?;
    serve_sts(core, tcp, budget)
}

/// Serves the token endpoint of `core.config.sts` on `tcp`, already bound (tests bind
/// port 0); an error when `[sts]` is not set or not valid.
pub fn serve_sts(
    core: Arc<CaCore>,
    tcp: tokio::net::TcpListener,
    budget: &Arc<DescriptorBudget>,
) -> Result<()> {
    let Some(sts) = core.config.sts.clone() else {
        return Err(Error::Config("the token endpoint needs [sts]".into()));
    };
    sts.validate()?;
    let tls = tls_config(&core)?;
    let addr = tcp.local_addr().unwrap_or(sts.listen);
    let issuer = sts.issuer();
    let listener = Listener::with_immunity(
        "token endpoint",
        sts.max_connections,
        Timeouts::http1(&core.config.limits),
        Some(budget.clone()),
        Some(crate::listeners::immunity::workload_entries(
            core.trust_domain.clone(),
        )),
    );
    let endpoint = Arc::new(Endpoint {
        core,
        metadata: Bytes::from(metadata(&issuer).to_string()),
        max_request_bytes: sts.max_request_bytes,
    });
    crate::listeners::serve_http1_async(
        tcp,
        tokio_rustls::TlsAcceptor::from(tls),
        listener,
        move |peer, req| answer(endpoint.clone(), peer, req),
    );
    tracing::info!(%addr, %issuer, "token endpoint listening");
    Ok(())
}

/// One request's answer. A handler that panics answers `server_error` (the connection
/// task would otherwise end without an answer).
async fn answer(ep: Arc<Endpoint>, peer: Option<Bytes>, req: Request<Incoming>) -> Response<Body> {
    match AssertUnwindSafe(route(&ep, peer, req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::error!("token endpoint handler panicked");
            oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &OAuthError::new(OAuthErrorCode::ServerError, "internal error"),
            )
        }
    }
}

async fn route(ep: &Endpoint, peer: Option<Bytes>, req: Request<Incoming>) -> Response<Body> {
    let Some(route) = Route::of(req.uri().path()) else {
        return oauth_error(
            StatusCode::NOT_FOUND,
            &OAuthError::invalid_request("no such endpoint"),
        );
    };
    let method = route.method();
    if req.method() != method {
        let mut resp = oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            &OAuthError::invalid_request(format!("{} only", method.as_str())),
        );
        resp.headers_mut().insert(
            ALLOW,
            HeaderValue::from_static(if method == Method::POST {
                "POST"
            } else {
                "GET"
            }),
        );
        return resp;
    }
    match route {
        Route::Metadata => json_ok(ep.metadata.clone()),
        Route::Jwks => match crate::federation::oidc_jwks(&ep.core) {
            Ok(jwks) => json_ok(Bytes::from(jwks.to_string())),
            Err(e) => {
                tracing::error!(error = %e, "token endpoint: the JWKS could not be made");
                oauth_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &OAuthError::new(OAuthErrorCode::ServerError, "the key set is unavailable"),
                )
            }
        },
        Route::Token => {
            with_form(ep, req, |body| async move {
                super::exchange::token(&ep.core, peer.as_deref(), &body)
                    .await
                    .map(|t| Bytes::from(t.to_json()))
            })
            .await
        }
        Route::Introspect => {
            with_form(ep, req, |body| async move {
                super::introspect::introspect(&ep.core, peer.as_deref(), &body)
                    .await
                    .map(|v| Bytes::from(v.to_string()))
            })
            .await
        }
    }
}

/// Checks the content type, reads the bounded body and answers `handle`'s JSON (200)
/// or its OAuth error.
async fn with_form<'a, H, F>(ep: &'a Endpoint, req: Request<Incoming>, handle: H) -> Response<Body>
where
    H: FnOnce(Bytes) -> F,
    F: Future<Output = std::result::Result<Bytes, OAuthError>> + 'a,
{
    if !is_form(req.headers().get(CONTENT_TYPE)) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            &OAuthError::invalid_request(format!("Content-Type must be {FORM_CONTENT_TYPE}")),
        );
    }
    let body = match read_body(req, ep.max_request_bytes).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    match handle(body).await {
        Ok(json) => json_ok(json),
        Err(e) => oauth_error(e.code.status(), &e),
    }
}

/// `application/x-www-form-urlencoded`, parameters (a charset) allowed.
fn is_form(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(FORM_CONTENT_TYPE))
}

/// The request body, at most `max` bytes: a declared length over `max` is refused
/// before any of the body is read, a chunked body as soon as it passes `max`. A body
/// of unknown length (neither `Content-Length` nor chunked) is refused too. The
/// listener's request timeout bounds how long the read may take.
async fn read_body(
    req: Request<Incoming>,
    max: usize,
) -> std::result::Result<Bytes, Response<Body>> {
    let too_large = || {
        let mut resp = oauth_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &OAuthError::invalid_request(format!("request body larger than {max} bytes")),
        );
        // The rest of the body is not read: the connection cannot carry another request.
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        resp
    };
    let headers = req.headers();
    match headers.get(CONTENT_LENGTH) {
        Some(len) => {
            // hyper has already refused a malformed or repeated Content-Length.
            let declared = len.to_str().ok().and_then(|l| l.trim().parse::<u64>().ok());
            match declared {
                Some(n) if n <= max as u64 => {}
                Some(_) => return Err(too_large()),
                None => {
                    return Err(oauth_error(
                        StatusCode::BAD_REQUEST,
                        &OAuthError::invalid_request("malformed Content-Length"),
                    ))
                }
            }
        }
        None if is_chunked(headers) => {}
        None => {
            return Err(oauth_error(
                StatusCode::LENGTH_REQUIRED,
                &OAuthError::invalid_request("the request body needs a Content-Length"),
            ))
        }
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(_) => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            &OAuthError::invalid_request("the request body could not be read"),
        )),
    }
}

fn is_chunked(headers: &http::HeaderMap) -> bool {
    headers.get_all(TRANSFER_ENCODING).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
        })
    })
}

/// A JSON answer with the headers every answer of the endpoint carries (RFC 6749 §5.1:
/// token answers are not cached, and neither is anything else here).
fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn json_ok(body: Bytes) -> Response<Body> {
    json_response(StatusCode::OK, body)
}

fn oauth_error(status: StatusCode, e: &OAuthError) -> Response<Body> {
    json_response(status, Bytes::from(e.to_json()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_content_type_allows_parameters_only() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(is_form(Some(&v("application/x-www-form-urlencoded"))));
        assert!(is_form(Some(&v(
            "Application/X-WWW-Form-Urlencoded; charset=UTF-8"
        ))));
        assert!(!is_form(Some(&v("application/json"))));
        assert!(!is_form(Some(&v("application/x-www-form-urlencodedx"))));
        assert!(!is_form(None));
    }

    #[test]
    fn routes_answer_one_method_each() {
        assert_eq!(Route::of("/token").map(Route::method), Some(Method::POST));
        assert_eq!(
            Route::of("/introspect").map(Route::method),
            Some(Method::POST)
        );
        assert_eq!(Route::of("/jwks").map(Route::method), Some(Method::GET));
        assert_eq!(
            Route::of(METADATA_PATH).map(Route::method),
            Some(Method::GET)
        );
        assert_eq!(Route::of("/token/"), None);
        assert_eq!(Route::of("/"), None);
    }

    #[test]
    fn metadata_endpoints_hang_off_the_issuer() {
        let m = metadata("https://127.0.0.1:8443");
        assert_eq!(m["token_endpoint"], "https://127.0.0.1:8443/token");
        assert_eq!(m["jwks_uri"], "https://127.0.0.1:8443/jwks");
        assert_eq!(
            m["introspection_endpoint"],
            "https://127.0.0.1:8443/introspect"
        );
        assert_eq!(m["response_types_supported"], json!([]));
    }
}
