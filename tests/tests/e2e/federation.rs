//! Federation between two trust domains (two real servers, two real agents on
//! loopback), the bundle endpoint in both profiles, refusals with their reasons, and
//! OIDC discovery checked by an independent JWT library.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztid_proto::workload::{self as wpb, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use ztid_spiffe::tls::{shared_roots, AgentCertVerifier, ServerSvidVerifier};
use ztid_tests::*;

type Raw = SpiffeWorkloadApiClient<tonic::transport::Channel>;

async fn raw(agent: &Agent) -> Raw {
    SpiffeWorkloadApiClient::new(
        ztid_proto::transport::unix_channel(agent.socket())
            .await
            .unwrap(),
    )
}

fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert(ztid_proto::WORKLOAD_API_HEADER, "true".parse().unwrap());
    r
}

/// Opens FetchX509SVID once the caller is entitled.
async fn x509_stream(c: &mut Raw) -> tonic::Streaming<wpb::X509svidResponse> {
    let start = Instant::now();
    loop {
        match c.fetch_x509svid(req(wpb::X509svidRequest {})).await {
            Ok(s) => return s.into_inner(),
            Err(e) => {
                assert!(start.elapsed() < READY_TIMEOUT, "no SVID: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Next message on `s` satisfying `ok`, within `timeout`.
async fn until(
    s: &mut tonic::Streaming<wpb::X509svidResponse>,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&wpb::X509svidResponse) -> bool,
) -> wpb::X509svidResponse {
    tokio::time::timeout(timeout, async {
        loop {
            let m = s.message().await.expect("stream").expect("open stream");
            if ok(&m) {
                return m;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn split_der(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = <x509_parser::prelude::X509Certificate as x509_parser::prelude::FromDer<
            _,
        >>::from_der(der)
        .expect("DER certificate");
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    out
}

fn pem_of(certs: &[Vec<u8>]) -> String {
    certs
        .iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

/// A server config file with a short refresh hint.
fn config_file(dir: &std::path::Path, name: &str, extra: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("bundle_refresh_hint_seconds = 2\n{extra}")).unwrap();
    p.display().to_string()
}

fn server_with_endpoint(td: &str, cfg_dir: &std::path::Path, extra: &[&str]) -> (Server, u16) {
    let port = free_port();
    let ep = format!("127.0.0.1:{port}");
    let cfg = config_file(cfg_dir, &format!("{td}.toml"), "");
    let mut args = vec!["--config", cfg.as_str(), "--bundle-endpoint", ep.as_str()];
    args.extend_from_slice(extra);
    (Server::start_with(td, &args), port)
}

fn federate(a: &Server, b: &Server, b_port: u16) {
    let url = format!("https://127.0.0.1:{b_port}/");
    let bundle = b.bundle_file();
    let id = format!("spiffe://{}/ztid/server", b.trust_domain);
    a.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        &b.trust_domain,
        "--bundle-endpoint-url",
        &url,
        "--profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        &id,
        "--trust-bundle",
        bundle.to_str().unwrap(),
    ]);
}

struct Svid {
    id: String,
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    federated: HashMap<String, Vec<u8>>,
}

fn svid_of(m: &wpb::X509svidResponse) -> Svid {
    let s = &m.svids[0];
    Svid {
        id: s.spiffe_id.clone(),
        chain: split_der(&s.x509_svid),
        key: s.x509_svid_key.clone(),
        federated: m.federated_bundles.clone(),
    }
}

fn certified(s: &Svid) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        s.chain.iter().cloned().map(CertificateDer::from).collect(),
        PrivateKeyDer::Pkcs8(s.key.clone().into()),
    )
}

fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> String {
    spiffe_id_of(certs.expect("peer certificates")[0].as_ref())
}

/// Mutual TLS between the two workloads: each side checks the other's chain against
/// the federated bundle and its exact SPIFFE ID.
async fn mutual_tls(a: &Svid, a_td: &str, b: &Svid, b_td: &str) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let a_roots = split_der(&b.federated[&format!("spiffe://{a_td}")]);
    let b_roots = split_der(&a.federated[&format!("spiffe://{b_td}")]);
    let (chain, key) = certified(b);
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(AgentCertVerifier::mandatory(shared_roots(
            a_roots,
        ))))
        .with_single_cert(chain, key)
        .unwrap();
    let (chain, key) = certified(a);
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerSvidVerifier::new(
            shared_roots(b_roots),
            b.id.clone(),
        )))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let expected_client = a.id.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg))
            .accept(tcp)
            .await
            .expect("server handshake");
        let client = peer_id(tls.get_ref().1.peer_certificates());
        assert_eq!(
            client, expected_client,
            "server checks the client's SPIFFE ID"
        );
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.ok();
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect(ServerName::try_from("workload").unwrap(), tcp)
        .await
        .expect("client handshake (server SPIFFE ID checked by the verifier)");
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_domains_federate_mtls_openssl_and_rotation() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let (a, a_port) = server_with_endpoint("a.test", cfg_dir.path(), &[]);
    let (b, b_port) = server_with_endpoint("b.test", cfg_dir.path(), &[]);
    federate(&a, &b, b_port);
    federate(&b, &a, a_port);
    let agent_a = Agent::start(&a);
    let agent_b = Agent::start(&b);
    entry_for_my_uid(
        &a,
        &agent_a,
        "spiffe://a.test/wa",
        &["--federates-with", "b.test"],
    );
    entry_for_my_uid(
        &b,
        &agent_b,
        "spiffe://b.test/wb",
        &["--federates-with", "a.test"],
    );

    let mut ca = raw(&agent_a).await;
    let mut cb = raw(&agent_b).await;
    let mut sa = x509_stream(&mut ca).await;
    let mut sb = x509_stream(&mut cb).await;
    let wait = Duration::from_secs(20);
    let ma = until(&mut sa, wait, "b.test's bundle in A", |m| {
        m.federated_bundles.contains_key("spiffe://b.test")
    })
    .await;
    let mb = until(&mut sb, wait, "a.test's bundle in B", |m| {
        m.federated_bundles.contains_key("spiffe://a.test")
    })
    .await;
    let (wa, wb) = (svid_of(&ma), svid_of(&mb));
    assert!(wa.id.starts_with("spiffe://a.test/wa/"));
    assert!(wb.id.starts_with("spiffe://b.test/wb/"));
    assert_eq!(wa.federated.len(), 1, "only the domains it federates with");
    assert_eq!(
        split_der(&wa.federated["spiffe://b.test"]),
        bundle_roots(&b),
        "A's workload holds exactly B's bundle"
    );
    let list: Value =
        serde_json::from_str(&a.cli_ok(&["bundle", "list", "--output", "json"])).unwrap();
    assert_eq!(list["bundles"][0]["trust_domain"], "b.test");
    let fed: Value =
        serde_json::from_str(&a.cli_ok(&["federation", "show", "b.test", "--output", "json"]))
            .unwrap();
    assert_eq!(fed["last_error"], "", "{fed}");

    mutual_tls(&wa, "a.test", &wb, "b.test").await;
    mutual_tls(&wb, "b.test", &wa, "a.test").await;

    // openssl agrees: B's SVID verifies against the bundle A's workload received.
    let d = tempfile::tempdir().unwrap();
    let roots = d.path().join("b-fed.pem");
    std::fs::write(&roots, pem_of(&split_der(&wa.federated["spiffe://b.test"]))).unwrap();
    let leaf = d.path().join("wb.pem");
    std::fs::write(&leaf, pem_of(&wb.chain[..1])).unwrap();
    let r = openssl(&[
        "verify",
        "-CAfile",
        roots.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(r.ok, "openssl verify: {} {}", r.stdout, r.stderr);
    let own = d.path().join("a-own.pem");
    std::fs::write(&own, pem_of(&bundle_roots(&a))).unwrap();
    let r = openssl(&[
        "verify",
        "-CAfile",
        own.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(!r.ok, "B's SVID must not verify against A's own bundle");

    // Rotation in B reaches A's open stream within a refresh hint (+ sync), no restart.
    let before = split_der(&wa.federated["spiffe://b.test"]).len();
    b.cli_ok(&["authority", "x509", "prepare"]);
    let t0 = Instant::now();
    let m = until(
        &mut sa,
        Duration::from_secs(15),
        "B's new authority in A",
        |m| {
            m.federated_bundles
                .get("spiffe://b.test")
                .is_some_and(|d| split_der(d).len() == before + 1)
        },
    )
    .await;
    assert_eq!(
        split_der(&m.federated_bundles["spiffe://b.test"]),
        bundle_roots(&b)
    );
    eprintln!("rotation reached domain A's workload in {:?}", t0.elapsed());
    // The server logs the update after it stored it (what reached the workload).
    wait_for("the update in domain A's log", READY_TIMEOUT, || {
        a.log_text()
            .contains("federated_bundle_updated")
            .then_some(())
    });
}

/// A self-signed CA and a leaf for 127.0.0.1 signed by it (https_web).
fn web_pki(dir: &std::path::Path, name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca = p.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut lp = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    lp.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let issuer = rcgen::Issuer::from_params(&p, &ca_key);
    let leaf = lp.signed_by(&leaf_key, &issuer).unwrap();
    let w = |f: &str, s: String| {
        let path = dir.join(f);
        std::fs::write(&path, s).unwrap();
        path.display().to_string()
    };
    (
        w(&format!("{name}-ca.pem"), ca.pem()),
        w(&format!("{name}-leaf.pem"), leaf.pem()),
        w(&format!("{name}-leaf.key"), leaf_key.serialize_pem()),
    )
}

fn refused(server: &Server, args: &[&str], reason: &str) {
    let r = server.cli(args);
    assert!(!r.ok, "{args:?} must be refused");
    assert!(
        r.stderr.contains(reason),
        "{args:?}: expected {reason:?} in {:?}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_refusals_each_with_its_reason() {
    let d = tempfile::tempdir().unwrap();
    let (good_ca, leaf, key) = web_pki(d.path(), "good");
    let (other_ca, _, _) = web_pki(d.path(), "other");
    let roots = d.path().join("web-roots.pem");
    std::fs::copy(&other_ca, &roots).unwrap();
    let (b, b_port) = server_with_endpoint("b.test", d.path(), &[]);
    let (web, web_port) = server_with_endpoint(
        "web.test",
        d.path(),
        &[
            "--bundle-endpoint-cert",
            &leaf,
            "--bundle-endpoint-key",
            &key,
        ],
    );
    let a = Server::start_with(
        "a.test",
        &["--federation-web-roots", roots.to_str().unwrap()],
    );

    // https_spiffe endpoint presenting another SPIFFE ID than configured.
    let url = format!("https://127.0.0.1:{b_port}/");
    let bundle = b.bundle_file();
    a.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "b.test",
        "--bundle-endpoint-url",
        &url,
        "--profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://b.test/not-the-server",
        "--trust-bundle",
        bundle.to_str().unwrap(),
    ]);
    refused(
        &a,
        &["federation", "refresh", "b.test"],
        "expected spiffe://b.test/not-the-server",
    );
    // An initial bundle of another trust domain is refused outright...
    let a_bundle = a.bundle_file();
    refused(
        &a,
        &[
            "federation",
            "create",
            "--trust-domain",
            "b.test",
            "--bundle-endpoint-url",
            &url,
            "--profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            "spiffe://b.test/ztid/server",
            "--trust-bundle",
            a_bundle.to_str().unwrap(),
        ],
        "claims trust domain a.test, not b.test",
    );
    // ...and an endpoint whose chain does not lead to the trust bundle is refused.
    a.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "b.test",
        "--bundle-endpoint-url",
        &url,
        "--profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://b.test/ztid/server",
        "--trust-bundle",
        &other_ca,
    ]);
    refused(
        &a,
        &["federation", "refresh", "b.test"],
        "endpoint TLS authentication failed",
    );
    let none = a.cli(&["bundle", "list", "--output", "json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&none.stdout).unwrap()["bundles"],
        serde_json::json!([]),
        "refusals change nothing"
    );
    a.cli_ok(&["federation", "delete", "b.test"]);

    // https_web endpoint whose certificate does not chain to the configured roots.
    let web_url = format!("https://127.0.0.1:{web_port}/");
    a.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "web.test",
        "--bundle-endpoint-url",
        &web_url,
        "--profile",
        "https_web",
    ]);
    refused(
        &a,
        &["federation", "refresh", "web.test"],
        "endpoint TLS authentication failed",
    );
    // The right roots (read on every fetch) make the same endpoint acceptable.
    std::fs::copy(&good_ca, &roots).unwrap();
    let out = a.cli_ok(&["federation", "refresh", "web.test"]);
    assert!(out.contains("web.test"), "{out}");
    drop(web);

    // Out-of-band bundles: each malformed document refused with its reason.
    let b_json = b.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    let doc: Value = serde_json::from_str(&b_json).unwrap();
    let seq = doc["spiffe_sequence"].as_u64().unwrap();
    let write = |name: &str, v: &Value| {
        let p = d.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p.display().to_string()
    };
    let set = |p: &str| {
        vec![
            "bundle",
            "set",
            "--trust-domain",
            "b.test",
            "--format",
            "spiffe",
            "--path",
        ]
        .into_iter()
        .map(String::from)
        .chain([p.to_string()])
        .collect::<Vec<_>>()
    };
    let run = |args: Vec<String>, reason: &str| {
        refused(
            &a,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            reason,
        )
    };
    let good = write("good.json", &doc);
    a.cli_ok(&set(&good).iter().map(String::as_str).collect::<Vec<_>>());
    let mut lower = doc.clone();
    lower["spiffe_sequence"] = serde_json::json!(seq - 1);
    run(
        set(&write("lower.json", &lower)),
        &format!("spiffe_sequence {} is lower than the stored {seq}", seq - 1),
    );
    let mut dup = doc.clone();
    let k = dup["keys"][0].clone();
    dup["keys"].as_array_mut().unwrap().push(k);
    run(set(&write("dup.json", &dup)), "duplicate");
    let mut nokid = doc.clone();
    for k in nokid["keys"].as_array_mut().unwrap() {
        if k["use"] == "jwt-svid" {
            k.as_object_mut().unwrap().remove("kid");
        }
    }
    run(
        set(&write("nokid.json", &nokid)),
        "jwt-svid key without kid",
    );
    let mut malformed = doc.clone();
    malformed["keys"][0]["x5c"] = serde_json::json!(["bm90IGEgY2VydA=="]);
    run(
        set(&write("malformed.json", &malformed)),
        "malformed x509-svid key 0",
    );
    run(
        set(&write(
            "nokeys.json",
            &serde_json::json!({"spiffe_sequence": seq + 1}),
        )),
        "no keys",
    );
    // B's bundle claimed for another trust domain.
    let other = write("other.json", &doc);
    refused(
        &a,
        &[
            "bundle",
            "set",
            "--trust-domain",
            "c.test",
            "--format",
            "spiffe",
            "--path",
            &other,
        ],
        "claims trust domain b.test, not c.test",
    );
    refused(
        &a,
        &[
            "bundle",
            "set",
            "--trust-domain",
            "a.test",
            "--format",
            "spiffe",
            "--path",
            &good,
        ],
        "own trust domain",
    );
    let log = a.log_text();
    assert!(
        log.contains("federated_bundle_refused"),
        "refusals are logged"
    );
    let list: Value =
        serde_json::from_str(&a.cli_ok(&["bundle", "list", "--output", "json"])).unwrap();
    assert_eq!(
        list["bundles"].as_array().unwrap().len(),
        2,
        "b.test and web.test only"
    );
    assert_eq!(
        list["bundles"][0]["sequence"].as_u64().unwrap(),
        seq,
        "refusals changed nothing"
    );

    // A workload without --federates-with never gets b.test's bundle.
    let agent = Agent::start(&a);
    entry_for_my_uid(&a, &agent, "spiffe://a.test/plain", &[]);
    let mut c = raw(&agent).await;
    let mut s = x509_stream(&mut c).await;
    let m = s.message().await.unwrap().unwrap();
    assert!(
        m.federated_bundles.is_empty(),
        "no federated bundle in FetchX509SVID"
    );
    let xb = c
        .fetch_x509_bundles(req(wpb::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        xb.bundles.keys().collect::<Vec<_>>(),
        vec!["spiffe://a.test"]
    );
    let jb = c
        .fetch_jwt_bundles(req(wpb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        jb.bundles.keys().collect::<Vec<_>>(),
        vec!["spiffe://a.test"]
    );
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_discovery_alone_validates_jwt_svids_with_jsonwebtoken() {
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let issuer = format!("http://{bind}");
    let server = Server::start_with(
        "example.org",
        &["--oidc-bind", &bind, "--oidc-issuer", &issuer],
    );
    let agent = Agent::start(&server);
    entry_for_my_uid(
        &server,
        &agent,
        "spiffe://example.org/oidc",
        &["--jwt-ttl", "2"],
    );
    let mut c = raw(&agent).await;
    x509_stream(&mut c).await;
    let token = c
        .fetch_jwtsvid(req(wpb::JwtsvidRequest {
            audience: vec!["vault".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();

    let doc: Value =
        serde_json::from_str(&http_get(&bind, "/.well-known/openid-configuration")).unwrap();
    assert_eq!(doc["issuer"], issuer.as_str());
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    assert_eq!(
        doc["response_types_supported"],
        serde_json::json!(["id_token"])
    );
    assert_eq!(
        doc["subject_types_supported"],
        serde_json::json!(["public"])
    );
    let jwks_path = doc["jwks_uri"]
        .as_str()
        .unwrap()
        .strip_prefix(&issuer)
        .unwrap()
        .to_string();
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&http_get(&bind, &jwks_path)).unwrap();

    let header = jsonwebtoken::decode_header(&token).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.leeway = 0;
    v.set_issuer(&[issuer.as_str()]);
    v.set_audience(&["vault"]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v)
        .expect("valid JWT-SVID")
        .claims;
    assert!(claims["sub"]
        .as_str()
        .unwrap()
        .starts_with("spiffe://example.org/oidc"));
    assert_eq!(claims["iss"], issuer.as_str());

    let mut wrong = v.clone();
    wrong.set_audience(&["someone-else"]);
    let e = jsonwebtoken::decode::<Value>(&token, &key, &wrong).expect_err("wrong audience");
    assert!(
        matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidAudience),
        "{e:?}"
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    let e = jsonwebtoken::decode::<Value>(&token, &key, &v).expect_err("expired");
    assert!(
        matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature),
        "{e:?}"
    );
}
