//! The token endpoint's HTTPS listener, end to end over a real socket: a rustls client
//! that trusts only the trust bundle and checks the name `127.0.0.1` (what an OAuth
//! client in Python does with the bundle as its CA file), metadata, JWKS, the request
//! bounds and the refusals.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs,
    reason = "integration test: a panic is a failed test"
)]

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztid_ca::config::{ServerConfig, StsConfig};
use ztid_ca::core::CaCore;
use ztid_ca::listeners::DescriptorBudget;

struct Endpoint {
    _dir: tempfile::TempDir,
    core: Arc<CaCore>,
    addr: std::net::SocketAddr,
    client: Arc<rustls::ClientConfig>,
}

async fn endpoint() -> Endpoint {
    let dir = tempfile::tempdir().unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let core = CaCore::open(ServerConfig {
        trust_domain: "example.org".into(),
        data_dir: dir.path().into(),
        audit_enabled: false,
        sts: Some(StsConfig::on(addr)),
        ..Default::default()
    })
    .unwrap();
    ztid_ca::sts::listener::serve_sts(core.clone(), tcp, &Arc::new(DescriptorBudget::default()))
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for der in &core.bundle().x509_authorities {
        roots.add(CertificateDer::from(der.clone())).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Endpoint {
        _dir: dir,
        core,
        addr,
        client: Arc::new(client),
    }
}

struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// An OAuth error (RFC 6749 §5.2) with `code`, uncached.
    fn assert_oauth_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        assert_eq!(v["error"], code, "{v}");
        assert!(v["error_description"].is_string(), "{v}");
        assert_eq!(self.header("cache-control").as_deref(), Some("no-store"));
    }
}

impl Endpoint {
    /// Sends `request` (a whole HTTP/1.1 request, `Connection: close`) with the name
    /// `127.0.0.1` verified against the server's certificate, and reads the answer.
    async fn send_with(&self, client: Arc<rustls::ClientConfig>, request: &[u8]) -> Answer {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .expect("the endpoint's certificate is valid for 127.0.0.1 under the bundle");
        assert_eq!(tls.get_ref().1.alpn_protocol(), None);
        tls.write_all(request).await.unwrap();
        let mut raw = Vec::new();
        tls.read_to_end(&mut raw).await.unwrap();
        let text_end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP answer");
        let head = String::from_utf8(raw[..text_end].to_vec()).unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Answer {
            status,
            head,
            body: raw[text_end + 4..].to_vec(),
        }
    }

    async fn send(&self, request: &[u8]) -> Answer {
        self.send_with(self.client.clone(), request).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
    }

    async fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Answer {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.send(&req).await
    }
}

const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test]
async fn metadata_names_the_endpoints_under_the_issuer() {
    let ep = endpoint().await;
    let a = ep.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("cache-control").as_deref(), Some("no-store"));
    assert!(a
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let m = a.json();
    let issuer = format!("https://127.0.0.1:{}", ep.addr.port());
    assert_eq!(m["issuer"], issuer.as_str());
    assert_eq!(m["token_endpoint"], format!("{issuer}/token"));
    assert_eq!(m["jwks_uri"], format!("{issuer}/jwks"));
    assert_eq!(m["introspection_endpoint"], format!("{issuer}/introspect"));
    assert_eq!(
        m["grant_types_supported"],
        serde_json::json!(["urn:ietf:params:oauth:grant-type:token-exchange"])
    );
    assert_eq!(
        m["token_endpoint_auth_methods_supported"],
        serde_json::json!(["tls_client_auth", "private_key_jwt"])
    );
    assert_eq!(
        m["introspection_endpoint_auth_methods_supported"],
        serde_json::json!(["tls_client_auth"])
    );
    assert_eq!(m["tls_client_certificate_bound_access_tokens"], true);
    assert_eq!(
        m["token_endpoint_auth_signing_alg_values_supported"],
        serde_json::json!(["ES256", "ES384"])
    );
    assert_eq!(m["response_types_supported"], serde_json::json!([]));
}

#[tokio::test]
async fn jwks_holds_the_active_jwt_authority_for_signatures() {
    let ep = endpoint().await;
    let a = ep.get("/jwks").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("cache-control").as_deref(), Some("no-store"));
    let keys = a.json()["keys"].as_array().unwrap().clone();
    let active = ep.core.authorities.jwt().record().id.clone();
    let key = keys
        .iter()
        .find(|k| k["kid"] == active.as_str())
        .unwrap_or_else(|| panic!("kid {active} not in {keys:?}"));
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert_eq!(key["alg"], "ES256");
    assert!(key["x"].is_string() && key["y"].is_string());
    // Only JWT keys, each for signatures: no X.509 authority (`x5c`) is listed.
    for k in &keys {
        assert_eq!(k["use"], "sig", "{k}");
        assert!(k.get("x5c").is_none(), "{k}");
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused_unread_and_the_refusal_arrives() {
    let ep = endpoint().await;
    let max = StsConfig::DEFAULT_MAX_REQUEST_BYTES;
    // The whole body is sent before the answer is read: the server answers without
    // reading it, and must still close so that the client receives the 413 (not RST).
    let a = ep.post("/token", FORM, &vec![b'a'; max + 4096]).await;
    a.assert_oauth_error(413, "invalid_request");
    assert_eq!(
        a.json()["error_description"],
        format!("request body larger than {max} bytes")
    );
    // Chunked: refused once it passes the bound.
    let mut req = format!(
        "POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: {FORM}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        max + 1
    )
    .into_bytes();
    req.extend(vec![b'a'; max + 1]);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    ep.send(&req)
        .await
        .assert_oauth_error(413, "invalid_request");
    // No declared length at all.
    let a = ep
        .send(
            format!("POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {FORM}\r\n\r\n")
                .as_bytes(),
        )
        .await;
    a.assert_oauth_error(411, "invalid_request");
}

#[tokio::test]
async fn posts_need_a_form_and_routes_their_method() {
    let ep = endpoint().await;
    ep.post("/token", "application/json", b"{}")
        .await
        .assert_oauth_error(400, "invalid_request");
    ep.post("/introspect", "text/plain", b"token=x")
        .await
        .assert_oauth_error(400, "invalid_request");
    let a = ep.get("/token").await;
    a.assert_oauth_error(405, "invalid_request");
    assert_eq!(a.header("allow").as_deref(), Some("POST"));
    let a = ep.post("/jwks", FORM, b"").await;
    a.assert_oauth_error(405, "invalid_request");
    assert_eq!(a.header("allow").as_deref(), Some("GET"));
    ep.get("/nowhere")
        .await
        .assert_oauth_error(404, "invalid_request");
}

#[tokio::test]
async fn token_answers_what_the_exchange_answers() {
    let ep = endpoint().await;
    let body = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange";
    let a = ep
        .post(
            "/token",
            "application/x-www-form-urlencoded; charset=UTF-8",
            body,
        )
        .await;
    // No credentials: whatever the exchange refuses this with, the listener carries it.
    let expected = ztid_ca::sts::exchange::token(&ep.core, None, body)
        .await
        .expect_err("no caller credentials");
    a.assert_oauth_error(expected.code.status().as_u16(), expected.code.as_str());
    assert_eq!(
        a.json(),
        serde_json::from_str::<Value>(&expected.to_json()).unwrap()
    );
}

#[tokio::test]
async fn a_client_certificate_outside_the_trust_domain_is_refused() {
    let ep = endpoint().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["stranger.example".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for der in &ep.core.bundle().x509_authorities {
        roots.add(CertificateDer::from(der.clone())).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let tcp = TcpStream::connect(ep.addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    // TLS 1.3: the server judges the client's certificate after the client's handshake
    // completes, so the refusal shows on the first read.
    let refused = match tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
    {
        Err(_) => true,
        Ok(mut tls) => {
            let _ = tls
                .write_all(b"GET /jwks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            match tls.read_to_end(&mut buf).await {
                Err(_) => true,
                Ok(_) => buf.is_empty(),
            }
        }
    };
    assert!(refused, "a foreign client certificate was accepted");
}
