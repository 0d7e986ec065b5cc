//! `ztid-agent api fetch token`: an RFC 8693 token exchange at the server's token
//! endpoint (docs/token-exchange.md), authenticated with the caller's own X509-SVID.
//!
//! The caller's SVID and trust bundle come from the Workload API, as for `api fetch
//! x509`. The request is an HTTP/1.1 `POST` of a form over TLS with that SVID as client
//! certificate (RFC 8705 `tls_client_auth`: the token is bound to it); the endpoint's
//! certificate must chain to the trust bundle's X.509 authorities and name the host of
//! the endpoint's URL (DNS name or IP address), as any HTTPS server's, and it must be the
//! server's own SVID: `spiffe://TD/ztid/server`, signed by an authority of TD (see
//! [`EndpointVerifier`]). The host name alone is not enough: every workload SVID chains
//! to the same bundle and carries its entry's DNS names. The whole exchange
//! is bounded in time ([`EXCHANGE_TIMEOUT`]) and the answer in size
//! ([`MAX_RESPONSE_BYTES`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use zeroize::Zeroizing;

/// The `grant_type` of a token exchange.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Environment variable naming the token endpoint when `--token-endpoint` is not given.
pub const TOKEN_ENDPOINT_ENV: &str = "ZTID_TOKEN_ENDPOINT";
/// Time for the whole exchange: resolving, connecting, the handshake, the answer.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from the endpoint.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest endpoint URL accepted.
const MAX_URL_BYTES: usize = 2048;

/// Why a token exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Neither `--token-endpoint` nor the environment names the endpoint.
    #[error("no token endpoint: pass --token-endpoint https://SERVER:PORT/token or set {TOKEN_ENDPOINT_ENV}")]
    NoEndpoint,
    /// The endpoint URL is not an `https://HOST[:PORT][/PATH]` URL.
    #[error("token endpoint {url:?}: {why}")]
    BadEndpoint {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The request's parameters are unusable.
    #[error("{0}")]
    BadRequest(String),
    /// The caller's SVID or bundle cannot be used for TLS.
    #[error("the workload's SVID cannot be used: {0}")]
    Identity(String),
    /// No connection, a failed handshake, a broken HTTP exchange.
    #[error("cannot reach the token endpoint {endpoint}: {why}")]
    Transport {
        /// host:port.
        endpoint: String,
        /// What failed.
        why: String,
    },
    /// No answer within [`EXCHANGE_TIMEOUT`].
    #[error("the token endpoint {0} did not answer within {EXCHANGE_TIMEOUT:?}")]
    Timeout(String),
    /// The endpoint's OAuth error answer (RFC 6749 §5.2).
    #[error("token endpoint refused: {error}: {description}")]
    Refused {
        /// The `error` code.
        error: String,
        /// The `error_description` (empty when absent).
        description: String,
    },
    /// An answer that is neither a token nor an OAuth error.
    #[error("unexpected answer from the token endpoint: {0}")]
    BadAnswer(String),
}

/// What the exchange asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `resource`: an absolute URI (RFC 8707).
    Resource(String),
    /// `audience`: a logical name.
    Audience(String),
}

/// The parameters of one token-exchange request made with mTLS client authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeRequest {
    /// The one target.
    pub target: Target,
    /// Requested scopes (none: every scope the grant allows).
    pub scopes: Vec<String>,
    /// Who may act for the caller with the new token (`may_act`).
    pub may_act: Option<String>,
}

/// Appends `s` to `out`, encoded as `application/x-www-form-urlencoded` (the WHATWG
/// serializer): ASCII letters, digits and `*-._` as they are, space as `+`, every other
/// byte of its UTF-8 as `%XX`.
fn form_encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => {
                use std::fmt::Write;
                // Writing to a String cannot fail.
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
}

/// A form body of `pairs`, in order.
pub fn form_encode<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (name, value) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        form_encode_into(&mut out, name);
        out.push('=');
        form_encode_into(&mut out, value);
    }
    out
}

impl ExchangeRequest {
    /// The request's form body: `grant_type`, the target, `scope` (space-separated,
    /// left out when none is asked) and `may_act`.
    pub fn form(&self) -> Result<String, ExchangeError> {
        for s in &self.scopes {
            // A scope token is printable ASCII without space or `"`/`\` (RFC 6749 §3.3):
            // a space inside one would silently split it into two.
            if s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
            {
                return Err(ExchangeError::BadRequest(format!(
                    "--scope {s:?} is not a scope token (printable ASCII, no space, no \" or \\)"
                )));
            }
        }
        let scope = self.scopes.join(" ");
        let mut pairs = vec![("grant_type", TOKEN_EXCHANGE_GRANT)];
        match &self.target {
            Target::Resource(r) => pairs.push(("resource", r)),
            Target::Audience(a) => pairs.push(("audience", a)),
        }
        if !scope.is_empty() {
            pairs.push(("scope", &scope));
        }
        if let Some(m) = &self.may_act {
            pairs.push(("may_act", m));
        }
        Ok(form_encode(pairs))
    }
}

/// The endpoint's successful answer (RFC 8693 §2.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TokenResponse {
    /// The token.
    pub access_token: String,
    /// Its type (an access token).
    pub issued_token_type: String,
    /// `Bearer`.
    pub token_type: String,
    /// Seconds it is valid.
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// The granted scopes, space-separated.
    #[serde(default)]
    pub scope: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// At most `max` characters of `s`, for messages quoting what a server sent.
fn excerpt(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// Reads the endpoint's answer: the token on a 2xx status, the OAuth error otherwise.
pub fn parse_response(status: StatusCode, body: &[u8]) -> Result<TokenResponse, ExchangeError> {
    let text = String::from_utf8_lossy(body);
    if status.is_success() {
        let token: TokenResponse = serde_json::from_slice(body).map_err(|e| {
            ExchangeError::BadAnswer(format!(
                "HTTP {status} with a body that is not a token answer ({e}): {}",
                excerpt(&text, 200)
            ))
        })?;
        if token.access_token.is_empty() {
            return Err(ExchangeError::BadAnswer(
                "the answer's access_token is empty".into(),
            ));
        }
        return Ok(token);
    }
    match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(e) => Err(ExchangeError::Refused {
            error: excerpt(&e.error, 100),
            description: excerpt(e.error_description.as_deref().unwrap_or_default(), 1000),
        }),
        Err(_) => Err(ExchangeError::BadAnswer(format!(
            "HTTP {status}: {}",
            excerpt(&text, 200)
        ))),
    }
}

/// A parsed token endpoint URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host as in the URL (IPv6 without brackets).
    pub host: String,
    /// Port (443 when the URL names none).
    pub port: u16,
    /// Path and query to `POST` to (`/token` when the URL has no path).
    pub path: String,
    /// The `Host` header.
    pub authority: String,
}

impl Endpoint {
    /// Parses `https://HOST[:PORT][/PATH]`.
    pub fn parse(url: &str) -> Result<Self, ExchangeError> {
        let bad = |why: &str| ExchangeError::BadEndpoint {
            url: excerpt(url, 200),
            why: why.into(),
        };
        if url.len() > MAX_URL_BYTES {
            return Err(bad("longer than 2048 bytes"));
        }
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must be an https:// URL"));
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("must not carry credentials"));
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => "/token".to_string(),
            Some(p) => p.to_string(),
        };
        Ok(Self {
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(443),
            path,
            authority: authority.as_str().to_string(),
        })
    }

    fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The endpoint to use: `--token-endpoint`, else [`TOKEN_ENDPOINT_ENV`].
pub fn endpoint_url(flag: Option<&str>) -> Result<String, ExchangeError> {
    match flag {
        Some(u) if !u.is_empty() => Ok(u.to_string()),
        _ => match std::env::var(TOKEN_ENDPOINT_ENV) {
            Ok(u) if !u.is_empty() => Ok(u),
            _ => Err(ExchangeError::NoEndpoint),
        },
    }
}

/// The caller's credentials for the exchange, from the Workload API.
pub struct ClientIdentity {
    /// Its X509-SVID chain, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// Its PKCS#8 DER private key.
    pub key: Zeroizing<Vec<u8>>,
    /// The trust bundle's X.509 authorities, DER.
    pub roots: Vec<Vec<u8>>,
    /// The SPIFFE ID the endpoint's certificate must carry: the server's own,
    /// `spiffe://TD/ztid/server` of the caller's trust domain.
    pub server_id: String,
}

/// The endpoint's certificate check: the usual HTTPS one (a chain to the bundle naming
/// the URL's host), then the server's own SPIFFE ID, issued by an authority of its trust
/// domain ([`ztid_spiffe::tls::ServerSvidVerifier`]). The first alone would take any
/// workload whose entry names the host (as a DNS name) for the token endpoint.
#[derive(Debug)]
pub struct EndpointVerifier {
    web: Arc<rustls::client::WebPkiServerVerifier>,
    server: ztid_spiffe::tls::ServerSvidVerifier,
}

impl EndpointVerifier {
    /// Checks chains against `roots` (DER) and requires `server_id`.
    pub fn new(roots: &[Vec<u8>], server_id: &str) -> Result<Self, ExchangeError> {
        let bad = |e: &dyn std::fmt::Display| ExchangeError::Identity(e.to_string());
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store
                .add(CertificateDer::from(r.clone()))
                .map_err(|e| bad(&format!("a bundle authority is unusable: {e}")))?;
        }
        if store.is_empty() {
            return Err(bad(&"the trust bundle has no X.509 authority"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let web =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .map_err(|e| bad(&e))?;
        let server = ztid_spiffe::tls::ServerSvidVerifier::new(
            ztid_spiffe::tls::shared_roots(roots.to_vec()),
            server_id.to_string(),
        );
        Ok(Self { web, server })
    }
}

impl ServerCertVerifier for EndpointVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.web
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        self.server
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.web.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.web.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.web.supported_verify_schemes()
    }
}

fn tls_config(id: &ClientIdentity) -> Result<rustls::ClientConfig, ExchangeError> {
    let bad = |e: &dyn std::fmt::Display| ExchangeError::Identity(e.to_string());
    let verifier = EndpointVerifier::new(&id.roots, &id.server_id)?;
    let chain: Vec<CertificateDer<'static>> =
        id.chain.iter().cloned().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.to_vec()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Makes the exchange at `endpoint` as `id`: the token, or why not.
pub async fn exchange(
    endpoint: &Endpoint,
    id: &ClientIdentity,
    request: &ExchangeRequest,
) -> Result<(TokenResponse, Bytes), ExchangeError> {
    let form = request.form()?;
    let config = tls_config(id)?;
    match tokio::time::timeout(EXCHANGE_TIMEOUT, post(endpoint, config, form)).await {
        Ok(r) => r,
        Err(_) => Err(ExchangeError::Timeout(endpoint.address())),
    }
}

/// The `POST` itself: the token and the answer's body as received.
async fn post(
    endpoint: &Endpoint,
    config: rustls::ClientConfig,
    form: String,
) -> Result<(TokenResponse, Bytes), ExchangeError> {
    let transport = |why: String| ExchangeError::Transport {
        endpoint: endpoint.address(),
        why,
    };
    let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| {
        transport(format!(
            "{:?} is not a DNS name or IP address: {e}",
            endpoint.host
        ))
    })?;
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| transport(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| transport(format!("TLS: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| transport(format!("HTTP: {e}")))?;
    // Ends with the exchange (this task is dropped with the runtime of the CLI verb).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(Method::POST)
        .uri(endpoint.path.as_str())
        .header(header::HOST, endpoint.authority.as_str())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .header(header::CONTENT_LENGTH, form.len())
        .body(Full::new(Bytes::from(form)))
        .map_err(|e| ExchangeError::BadRequest(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| transport(format!("HTTP: {e}")))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ExchangeError::BadAnswer(format!(
                    "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                ))
            } else {
                transport(format!("reading the answer: {e}"))
            }
        })?
        .to_bytes();
    let token = parse_response(status, &body)?;
    Ok((token, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_escapes_what_the_form_syntax_uses() {
        assert_eq!(form_encode([("a", "b")]), "a=b");
        assert_eq!(
            form_encode([("resource", "https://mcp.example.org:8443/tools?x=1&y=2")]),
            "resource=https%3A%2F%2Fmcp.example.org%3A8443%2Ftools%3Fx%3D1%26y%3D2"
        );
        assert_eq!(
            form_encode([("scope", "tools.read tools.write")]),
            "scope=tools.read+tools.write"
        );
        assert_eq!(form_encode([("x", "a+b%c~*-._")]), "x=a%2Bb%25c%7E*-._");
        // UTF-8, byte by byte.
        assert_eq!(form_encode([("audience", "é")]), "audience=%C3%A9");
        assert_eq!(form_encode([("a", ""), ("b", "c")]), "a=&b=c");
    }

    #[test]
    fn the_request_form_has_the_grant_target_scopes_and_may_act() {
        let req = ExchangeRequest {
            target: Target::Resource("https://tools.example.org/mcp".into()),
            scopes: vec!["tools.read".into(), "tools:write".into()],
            may_act: Some("spiffe://example.org/orchestrator".into()),
        };
        assert_eq!(
            req.form().unwrap(),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange\
             &resource=https%3A%2F%2Ftools.example.org%2Fmcp\
             &scope=tools.read+tools%3Awrite\
             &may_act=spiffe%3A%2F%2Fexample.org%2Forchestrator"
        );
        let req = ExchangeRequest {
            target: Target::Audience("billing api".into()),
            scopes: vec![],
            may_act: None,
        };
        assert_eq!(
            req.form().unwrap(),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&audience=billing+api",
            "no scope parameter when none is asked"
        );
        for bad in ["two words", "", "quo\"te", "back\\slash", "tab\t"] {
            let req = ExchangeRequest {
                target: Target::Audience("a".into()),
                scopes: vec![bad.into()],
                may_act: None,
            };
            assert!(
                matches!(req.form(), Err(ExchangeError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_token_answer_is_read() {
        let body = br#"{"access_token":"eyJ.x.y","issued_token_type":"urn:ietf:params:oauth:token-type:access_token",
            "token_type":"Bearer","expires_in":300,"scope":"tools.read"}"#;
        let t = parse_response(StatusCode::OK, body).unwrap();
        assert_eq!(t.access_token, "eyJ.x.y");
        assert_eq!(t.expires_in, Some(300));
        assert_eq!(t.scope.as_deref(), Some("tools.read"));
        assert_eq!(t.token_type, "Bearer");
        // Optional members may be absent; unknown ones are ignored.
        let t = parse_response(
            StatusCode::OK,
            br#"{"access_token":"t","issued_token_type":"x","token_type":"Bearer","extra":1}"#,
        )
        .unwrap();
        assert_eq!((t.expires_in, t.scope), (None, None));
        assert!(matches!(
            parse_response(StatusCode::OK, b"<html>"),
            Err(ExchangeError::BadAnswer(_))
        ));
        assert!(matches!(
            parse_response(
                StatusCode::OK,
                br#"{"access_token":"","issued_token_type":"x","token_type":"Bearer"}"#
            ),
            Err(ExchangeError::BadAnswer(_))
        ));
    }

    #[test]
    fn an_oauth_error_is_reported_with_its_code_and_description() {
        let e = parse_response(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_target","error_description":"no grant names this audience"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "token endpoint refused: invalid_target: no grant names this audience"
        );
        let e =
            parse_response(StatusCode::UNAUTHORIZED, br#"{"error":"invalid_client"}"#).unwrap_err();
        assert_eq!(e.to_string(), "token endpoint refused: invalid_client: ");
        let e = parse_response(StatusCode::BAD_GATEWAY, b"upstream\ndown").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unexpected answer from the token endpoint: HTTP 502 Bad Gateway: upstream down"
        );
    }

    #[test]
    fn endpoint_urls() {
        let e = Endpoint::parse("https://127.0.0.1:8443/token").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("127.0.0.1", 8443, "/token")
        );
        assert_eq!(e.authority, "127.0.0.1:8443");
        let e = Endpoint::parse("https://localhost:8443").unwrap();
        assert_eq!(e.path, "/token", "no path: the endpoint's /token");
        let e = Endpoint::parse("https://[::1]/oauth/token").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("::1", 443, "/oauth/token")
        );
        assert_eq!(e.address(), "[::1]:443");
        for bad in [
            "http://localhost:8443/token",
            "localhost:8443",
            "https://u:p@h/token",
            "https:///token",
            "",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(ExchangeError::BadEndpoint { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn no_endpoint_says_how_to_name_one() {
        assert_eq!(
            ExchangeError::NoEndpoint.to_string(),
            "no token endpoint: pass --token-endpoint https://SERVER:PORT/token or set ZTID_TOKEN_ENDPOINT"
        );
        assert_eq!(
            endpoint_url(Some("https://h/token")).unwrap(),
            "https://h/token"
        );
    }

    /// A CA, and a certificate it signs for `sans` with `eku`: (cert DER, key PKCS#8).
    struct TestCa {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        der: Vec<u8>,
    }

    impl TestCa {
        fn new() -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            params.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://example.org".try_into().unwrap(),
            )];
            let der = params.self_signed(&key).unwrap().der().to_vec();
            Self {
                issuer: rcgen::Issuer::new(params, key),
                der,
            }
        }

        fn leaf(
            &self,
            sans: Vec<rcgen::SanType>,
            eku: rcgen::ExtendedKeyUsagePurpose,
        ) -> (Vec<u8>, Vec<u8>) {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans;
            params.extended_key_usages = vec![eku];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.der().to_vec(), key.serialize_der())
        }
    }

    /// What the test endpoint saw of one request.
    #[derive(Debug)]
    struct Seen {
        path: String,
        content_type: String,
        body: String,
        client_cert: bool,
    }

    const SERVER_ID: &str = "spiffe://example.org/ztid/server";

    /// An HTTPS endpoint on 127.0.0.1 with the server's SVID naming only `localhost`, that
    /// requires a client certificate of `ca` and answers every request with `answer`.
    async fn endpoint(
        ca: &TestCa,
        answer: (StatusCode, String),
    ) -> (u16, tokio::sync::mpsc::Receiver<Seen>) {
        endpoint_as(ca, SERVER_ID, answer).await
    }

    /// [`endpoint`] with the SVID of `spiffe_id` (and the DNS name `localhost`).
    async fn endpoint_as(
        ca: &TestCa,
        spiffe_id: &str,
        answer: (StatusCode, String),
    ) -> (u16, tokio::sync::mpsc::Receiver<Seen>) {
        use hyper::service::service_fn;
        let (cert, key) = ca.leaf(
            vec![
                rcgen::SanType::DnsName("localhost".try_into().unwrap()),
                rcgen::SanType::URI(spiffe_id.try_into().unwrap()),
            ],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der.clone())).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(cert)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let client_cert = tls.get_ref().1.peer_certificates().is_some();
                let tx = tx.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        let answer = answer.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let content_type = req
                                .headers()
                                .get(header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let _ = tx
                                .send(Seen {
                                    path,
                                    content_type,
                                    body: String::from_utf8(body.to_vec()).unwrap(),
                                    client_cert,
                                })
                                .await;
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(answer.0)
                                    .header(header::CONTENT_TYPE, "application/json")
                                    .body(Full::new(Bytes::from(answer.1)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (port, rx)
    }

    fn identity(ca: &TestCa) -> ClientIdentity {
        let (cert, key) = ca.leaf(
            vec![rcgen::SanType::URI(
                "spiffe://example.org/w/0123456789abcdef0123456789abcdef"
                    .try_into()
                    .unwrap(),
            )],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        ClientIdentity {
            chain: vec![cert],
            key: Zeroizing::new(key),
            roots: vec![ca.der.clone()],
            server_id: SERVER_ID.into(),
        }
    }

    fn request() -> ExchangeRequest {
        ExchangeRequest {
            target: Target::Resource("https://tools.example.org/mcp".into()),
            scopes: vec!["tools.read".into()],
            may_act: None,
        }
    }

    #[tokio::test]
    async fn the_exchange_posts_the_form_over_mutual_tls_and_reads_the_token() {
        let ca = TestCa::new();
        let answer = r#"{"access_token":"tok","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":300,"scope":"tools.read"}"#;
        let (port, mut seen) = endpoint(&ca, (StatusCode::OK, answer.into())).await;
        let url = format!("https://localhost:{port}/token");
        let (token, body) = exchange(&Endpoint::parse(&url).unwrap(), &identity(&ca), &request())
            .await
            .unwrap();
        assert_eq!(token.access_token, "tok");
        assert_eq!(body.as_ref(), answer.as_bytes(), "the answer as it came");
        let seen = seen.recv().await.unwrap();
        assert_eq!(seen.path, "/token");
        assert_eq!(seen.content_type, "application/x-www-form-urlencoded");
        assert_eq!(seen.body, request().form().unwrap());
        assert!(seen.client_cert, "the SVID was the client certificate");
    }

    #[tokio::test]
    async fn a_refusal_an_unnamed_server_and_a_foreign_one_are_errors() {
        let ca = TestCa::new();
        let refusal = r#"{"error":"invalid_target","error_description":"no grant names https://tools.example.org/mcp"}"#;
        let (port, _seen) = endpoint(&ca, (StatusCode::BAD_REQUEST, refusal.into())).await;
        let at = |host: &str| Endpoint::parse(&format!("https://{host}:{port}/token")).unwrap();
        let e = exchange(&at("localhost"), &identity(&ca), &request())
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "token endpoint refused: invalid_target: no grant names https://tools.example.org/mcp"
        );
        // The certificate names localhost, not 127.0.0.1: the name is checked.
        let e = exchange(&at("127.0.0.1"), &identity(&ca), &request())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ExchangeError::Transport { why, .. } if why.starts_with("TLS")),
            "{e}"
        );
        // A bundle that does not hold the endpoint's authority.
        let mut foreign = identity(&ca);
        foreign.roots = vec![TestCa::new().der];
        let e = exchange(&at("localhost"), &foreign, &request())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ExchangeError::Transport { why, .. } if why.starts_with("TLS")),
            "{e}"
        );
    }

    /// A workload whose entry names the endpoint's host (`localhost`) as a DNS name holds
    /// an SVID that chains to the bundle and names that host: the HTTPS check alone took
    /// it for the token endpoint, which then saw the caller's request and answered with
    /// a token of its own making. Only the server's own SVID is the endpoint.
    #[tokio::test]
    async fn a_workload_svid_naming_the_host_is_not_the_endpoint() {
        let ca = TestCa::new();
        let forged = r#"{"access_token":"forged","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer"}"#;
        let (port, mut seen) = endpoint_as(
            &ca,
            "spiffe://example.org/web/0123456789abcdef0123456789abcdef",
            (StatusCode::OK, forged.into()),
        )
        .await;
        let url = format!("https://localhost:{port}/token");
        let e = exchange(&Endpoint::parse(&url).unwrap(), &identity(&ca), &request())
            .await
            .expect_err("a workload passed for the token endpoint");
        assert!(
            matches!(&e, ExchangeError::Transport { why, .. } if why.starts_with("TLS")),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("expected spiffe://example.org/ztid/server"),
            "{e}"
        );
        assert!(seen.try_recv().is_err(), "the request reached the impostor");
    }
}
