//! SPIFFE ID names, against the real binaries: ztid's reserved names (the server's,
//! agents' and admins' identities) cannot be claimed by entries nor minted through
//! the CSR path in any spelling; an agent cannot choose its instance segment; IDs are
//! accepted in canonical spelling only at every entry point; the agent pins the
//! server's identity; and no admin role can reach a higher one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;
use ztid_agent::node_client::{connect, mtls_channel};
use ztid_proto::admin::{self as apb, admin_client::AdminClient};
use ztid_proto::node::{self as pb, node_client::NodeClient};
use ztid_spiffe::spiffe_id::new_instance_segment;
use ztid_spiffe::tls::{shared_roots, ServerSvidVerifier};
use ztid_tests::*;

const TD: &str = "example.org";
const SERVER_ID: &str = "spiffe://example.org/ztid/server";
const ROOT_ADMIN: &str = "spiffe://example.org/ztid/admin/root";

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

async fn admin_socket(server: &Server) -> AdminClient<Channel> {
    AdminClient::new(
        ztid_proto::transport::unix_channel(server.admin_socket())
            .await
            .expect("admin socket"),
    )
}

fn server_verifier(roots: Vec<Vec<u8>>) -> Arc<ServerSvidVerifier> {
    Arc::new(ServerSvidVerifier::new(
        shared_roots(roots),
        SERVER_ID.to_string(),
    ))
}

/// A node API client authenticated as `agent` (a compromised agent: its own SVID and key).
fn as_agent(server: &Server, agent: &Agent) -> NodeClient<Channel> {
    connect(
        server.addr().parse().unwrap(),
        server_verifier(bundle_roots(server)),
        Some(agent.own_svid().certified_key().unwrap()),
    )
    .unwrap()
}

fn workload_entry(spiffe_id: &str, parent_id: &str) -> pb::Entry {
    pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent_id.into(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: "uid:4321".into(),
        }],
        ..Default::default()
    }
}

/// Signs one raw CSR for `spiffe_id` under `entry`: the issued ID, or the refusal.
async fn sign(
    client: &mut NodeClient<Channel>,
    entry: &str,
    spiffe_id: &str,
) -> Result<String, String> {
    let r = client
        .sign_x509_svids(pb::SignX509SvidsRequest {
            requests: vec![pb::SvidRequest {
                entry_id: entry.into(),
                csr: csr_for(spiffe_id),
            }],
        })
        .await
        .expect("the batch is answered")
        .into_inner();
    match r.results.into_iter().next().and_then(|r| r.result) {
        Some(pb::svid_result::Result::Svid(s)) => Ok(s.spiffe_id),
        Some(pb::svid_result::Result::Error(e)) => Err(e),
        None => panic!("empty result"),
    }
}

/// Mints one JWT-SVID for `spiffe_id` under `entry`.
async fn mint_jwt(
    client: &mut NodeClient<Channel>,
    entry: &str,
    spiffe_id: &str,
) -> Result<String, String> {
    let r = client
        .mint_jwt_svids(pb::MintJwtSvidsRequest {
            requests: vec![pb::JwtRequest {
                entry_id: entry.into(),
                spiffe_id: spiffe_id.into(),
                audience: vec!["db".into()],
            }],
        })
        .await
        .expect("the batch is answered")
        .into_inner();
    match r.results.into_iter().next().and_then(|r| r.result) {
        Some(pb::jwt_result::Result::Svid(s)) => Ok(s.spiffe_id),
        Some(pb::jwt_result::Result::Error(e)) => Err(e),
        None => panic!("empty result"),
    }
}

/// `role` is refused `call` for its role (each role stays within its own calls).
fn assert_role_refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, call: &str, role: &str) {
    assert_status(
        r,
        Code::PermissionDenied,
        &format!("may not call {call}"),
        role,
    );
}

fn assert_status<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: Code,
    reason: &str,
    what: &str,
) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(
                s.message().contains(reason),
                "{what}: expected {reason:?}, got {:?}",
                s.message()
            );
        }
        Ok(v) => panic!("{what}: expected {code:?} ({reason}), got {v:?}"),
    }
}

/// Asserts that `id` cannot be claimed in any way an admin client names an ID (a
/// workload entry under `parent`, shared or not, a node alias, a join token's alias),
/// each refused as InvalidArgument with `reason`.
async fn assert_unclaimable(
    admin: &mut AdminClient<Channel>,
    id: &str,
    parent: &str,
    reason: &str,
) {
    for shared in [false, true] {
        let mut e = workload_entry(id, parent);
        e.shared = shared;
        let r = admin.create_entry(e).await;
        assert_status(
            r,
            Code::InvalidArgument,
            reason,
            &format!("entry {id} (shared: {shared})"),
        );
    }
    let alias = pb::Entry {
        spiffe_id: id.into(),
        node: true,
        selectors: vec![pb::Selector {
            r#type: "join-token".into(),
            value: "used".into(),
        }],
        ..Default::default()
    };
    let r = admin.create_entry(alias).await;
    assert_status(
        r,
        Code::InvalidArgument,
        reason,
        &format!("node alias {id}"),
    );
    let r = admin
        .create_join_token(apb::CreateJoinTokenRequest {
            ttl_seconds: 60,
            alias_spiffe_id: id.into(),
        })
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        reason,
        &format!("token alias {id}"),
    );
}

/// Every spelling of a reserved ID an operator might try, with the reason each gets.
fn reserved_spellings(tail: &str) -> Vec<(String, &'static str)> {
    let reserved = "reserved for ztid's own identities";
    let canonical = "not a canonical SPIFFE ID";
    let mut v = vec![
        (format!("spiffe://example.org/ztid{tail}"), reserved),
        (format!("spiffe://example.org/ZTID{tail}"), reserved),
        (format!("spiffe://example.org/zTiD{tail}"), reserved),
        (format!("spiffe://EXAMPLE.ORG/ztid{tail}"), canonical),
        (format!("SPIFFE://example.org/ztid{tail}"), canonical),
        (format!("spiffe://example.org/ztid{tail}/"), canonical),
        (format!("spiffe://example.org//ztid{tail}"), canonical),
        (format!("spiffe://example.org/./ztid{tail}"), canonical),
        (format!("spiffe://example.org/x/../ztid{tail}"), canonical),
        (format!("spiffe://example.org/%7atid{tail}"), canonical),
        (
            format!(
                "spiffe://example.org/ztid%2F{}",
                tail.trim_start_matches('/')
            ),
            canonical,
        ),
    ];
    if tail.is_empty() {
        v.push(("spiffe://example.org/ztid/".into(), canonical));
    }
    v
}

/// A child process killed when dropped (the harness's `Proc` waits for readiness we
/// do not want here: these agents are meant to fail).
struct Child(std::process::Child, PathBuf);

impl Child {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_agent(server_addr: &str, bundle: &Path, token: &str, dir: &Path) -> Child {
    let log = dir.join("agent.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("ztid-agent"))
        .args(["run", "--server", server_addr, "--trust-bundle"])
        .arg(bundle)
        .args(["--trust-domain", TD, "--join-token", token, "--socket"])
        .arg(dir.join("api.sock"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    Child(child, log)
}

/// What a fake node API server saw on one connection.
#[derive(Debug)]
enum Seen {
    /// The client refused the handshake.
    HandshakeRefused(String),
    /// The handshake completed; these are the application bytes the client sent.
    Data(Vec<u8>),
}

/// A fake node API endpoint presenting `chain`/`key`: it completes TLS 1.3 if the
/// client accepts it, answers the HTTP/2 preface, and reports what the client sent.
async fn fake_server(
    chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            chain
                .into_iter()
                .map(rustls_pki_types::CertificateDer::from)
                .collect(),
            rustls_pki_types::PrivateKeyDer::Pkcs8(key_der.into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let mut tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.send(Seen::HandshakeRefused(e.to_string()));
                        return;
                    }
                };
                // Server SETTINGS and an ACK of the client's, so the client sends its request.
                let _ = tls
                    .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0])
                    .await;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while got.len() < 64 * 1024 {
                    match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let _ = tx.send(Seen::Data(got));
            });
        }
    });
    (addr, rx)
}

/// An organisation root whose key the test holds (ztid runs under it as an
/// intermediate), so the test can make certificates ztid itself would never issue.
struct OrgRoot {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    cert_path: PathBuf,
}

impl OrgRoot {
    fn new(dir: &Path) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Org root");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = p.self_signed(&key).unwrap();
        let cert_path = dir.join("org.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(dir.join("org.key"), key.serialize_pem()).unwrap();
        // The server refuses an upstream key file others can read.
        std::fs::set_permissions(
            dir.join("org.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Self {
            cert,
            key,
            cert_path,
        }
    }

    fn config(&self, dir: &Path, extra: &str) -> PathBuf {
        let p = dir.join("server.toml");
        std::fs::write(
            &p,
            format!(
                "{extra}\n[upstream]\ncert = {:?}\nkey_file = {:?}\n",
                self.cert_path.display().to_string(),
                dir.join("org.key").display().to_string()
            ),
        )
        .unwrap();
        p
    }

    /// A leaf with `uri` as its one URI SAN, signed by the root: (chain, PKCS#8 key).
    fn leaf(&self, uri: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.to_string().try_into().unwrap())];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = rcgen::Issuer::from_ca_cert_der(self.cert.der(), &self.key).unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (vec![cert.der().to_vec()], key.serialize_der())
    }

    /// A leaf with `uri` signed by another CA under the root (another trust domain's,
    /// `ca_uri`), as a sibling authority under a shared organisation root would make it:
    /// (chain, PKCS#8 key).
    fn sibling_leaf(&self, ca_uri: &str, uri: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
        self.sibling_leaf_with_serial(ca_uri, uri, None)
    }

    /// Like [`OrgRoot::sibling_leaf`], with the leaf's serial number chosen (copied
    /// from a certificate ztid issued, say).
    fn sibling_leaf_with_serial(
        &self,
        ca_uri: &str,
        uri: &str,
        serial: Option<&[u8]>,
    ) -> (Vec<Vec<u8>>, Vec<u8>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Sibling CA");
        p.subject_alt_names = vec![rcgen::SanType::URI(ca_uri.to_string().try_into().unwrap())];
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let root = rcgen::Issuer::from_ca_cert_der(self.cert.der(), &self.key).unwrap();
        let ca = p.signed_by(&ca_key, &root).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.to_string().try_into().unwrap())];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = serial.map(rcgen::SerialNumber::from_slice);
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key).unwrap();
        let leaf = p.signed_by(&key, &issuer).unwrap();
        (
            vec![leaf.der().to_vec(), ca.der().to_vec()],
            key.serialize_der(),
        )
    }
}

// ---------------------------------------------------------------------------------
// Part 2: reserved names
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_cannot_claim_reserved_names_in_any_spelling() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    let mut admin = admin_socket(&server).await;
    // The reserved prefix without its trailing slash was the hole; every other spelling too.
    for tail in [
        "",
        "/server",
        "/agent/join-token/x",
        "/admin",
        "/admin/root",
    ] {
        for (id, reason) in reserved_spellings(tail) {
            assert_unclaimable(&mut admin, &id, &agent.spiffe_id, reason).await;
        }
    }
    // Parents under the reserved prefix must be exactly an agent ID.
    for parent in [
        SERVER_ID,
        "spiffe://example.org/ztid",
        "spiffe://example.org/ztid/admin/root",
        "spiffe://example.org/ZTID/agent/join-token/x",
    ] {
        let r = admin
            .create_entry(workload_entry("spiffe://example.org/w", parent))
            .await;
        assert_status(
            r,
            Code::InvalidArgument,
            "reserved and not an agent ID",
            parent,
        );
    }
    // The CLI says the same, in one line.
    let r = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ztid",
        "--parent-id",
        &agent.spiffe_id,
        "--selector",
        "unix:uid:1",
    ]);
    assert!(
        !r.ok && r.stderr.contains("reserved for ztid's own identities"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1);
    // Nothing was stored.
    assert_eq!(server.cli_ok(&["entry", "list", "--output", "json"]), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_agent_cannot_mint_reserved_ids_or_choose_its_instance_segment() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    let planner = entry_for_my_uid(&server, &agent, "spiffe://example.org/planner", &[]);
    let db = entry_for_my_uid(&server, &agent, "spiffe://example.org/db", &["--shared"]);
    let mut node = as_agent(&server, &agent);
    let seg = new_instance_segment().unwrap();
    // Controls: what the agent is entitled to is signed.
    let good = format!("spiffe://example.org/planner/{seg}");
    assert_eq!(sign(&mut node, &planner, &good).await.unwrap(), good);
    assert_eq!(
        sign(&mut node, &db, "spiffe://example.org/db")
            .await
            .unwrap(),
        "spiffe://example.org/db"
    );
    assert_eq!(mint_jwt(&mut node, &planner, &good).await.unwrap(), good);

    let reserved = "reserved for ztid's own identities, issued only by the server";
    for id in [
        SERVER_ID.to_string(),
        format!("{}/agent/x", "spiffe://example.org/ztid"),
        "spiffe://example.org/ztid/admin".to_string(),
        "spiffe://example.org/ztid/admin/root".to_string(),
        format!("spiffe://example.org/ztid/{seg}"),
        format!("spiffe://example.org/ZTID/{seg}"),
    ] {
        for entry in [&planner, &db] {
            let e = sign(&mut node, entry, &id).await.unwrap_err();
            assert!(e.contains(reserved), "X.509 {id}: {e}");
            let e = mint_jwt(&mut node, entry, &id).await.unwrap_err();
            assert!(e.contains(reserved), "JWT {id}: {e}");
        }
    }
    // An agent cannot pick a meaningful instance path: exactly 32 lowercase hex.
    let form = "an instance segment must be 32 lowercase hex characters, as agents generate it";
    for segment in [
        "admin".to_string(),
        "server".to_string(),
        "z".repeat(32),
        seg[..31].to_string(),
        format!("{seg}0"),
        seg.to_uppercase(),
    ] {
        let id = format!("spiffe://example.org/planner/{segment}");
        let e = sign(&mut node, &planner, &id).await.unwrap_err();
        assert!(e.contains(form), "X.509 {id}: {e}");
        let e = mint_jwt(&mut node, &planner, &id).await.unwrap_err();
        assert!(e.contains(form), "JWT {id}: {e}");
    }
    let e = sign(
        &mut node,
        &planner,
        &format!("spiffe://example.org/planner/{seg}/admin"),
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("entitled only to spiffe://example.org/planner/<instance>"),
        "{e}"
    );
    // Every refusal is logged with its reason; the audit log records them (aggregated
    // per agent and kind of refusal).
    let log = server.log_text();
    assert!(log.contains("x509_svid_refused") && log.contains(reserved) && log.contains(form));
    let audit = std::fs::read_to_string(server.data_dir().join("audit/audit.log")).unwrap();
    assert!(audit.contains("x509_svid_refused") && audit.contains(reserved));
}

/// A new agent, given a fresh join token, is pointed at a fake server presenting
/// `chain`: it refuses the TLS handshake, sends nothing, and logs `reason`. Returns that
/// log, and an agent that then attests at the real server with the same token (it
/// never left the first agent).
async fn agent_refuses_fake_server(
    server: &Server,
    bundle: &Path,
    (chain, key): (Vec<Vec<u8>>, Vec<u8>),
    what: &str,
    reason: &str,
) -> (String, Agent) {
    let token = server.token();
    let (addr, mut seen) = fake_server(chain, key).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = spawn_agent(&addr, bundle, &token, dir.path());
    let got = tokio::time::timeout(READY_TIMEOUT, seen.recv())
        .await
        .unwrap()
        .unwrap();
    match got {
        Seen::HandshakeRefused(why) => eprintln!("{what}: the agent refused ({why})"),
        Seen::Data(d) => panic!(
            "{what}: the agent completed TLS with a server certificate it must refuse and sent \
             {} bytes",
            d.len()
        ),
    }
    let log = wait_for("the agent's reason", READY_TIMEOUT, || {
        let l = agent.log();
        l.contains(reason).then_some(l)
    });
    assert!(!log.contains("node attested"), "{what}: {log}");
    drop(agent);
    let agent = Agent::start_with_token(server, &token).expect("the token was not given away");
    (log, agent)
}

/// The chain the attack used: whoever holds the server's identity receives an agent's
/// join token and can redeem it at the real server. The CSR path can no longer mint
/// that identity (see above); under an upstream root, any other CA under the same
/// root could still make it, so the agent also requires that the server's SVID was
/// signed by an X.509 authority of its trust domain (a CA whose URI SAN is
/// `spiffe://TD`). And the agent refuses any other identity, including the server's in
/// another spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_gives_its_join_token_only_to_the_server_identity() {
    let org_dir = tempfile::tempdir().unwrap();
    let org = OrgRoot::new(org_dir.path());
    let cfg = org.config(org_dir.path(), "");
    let server = Server::start_with(TD, &["--config", cfg.to_str().unwrap()]);
    let bundle = server.bundle_file();

    // 1. spiffe://TD/ztid/server signed by the organisation root itself, or by a sibling
    //    trust domain's CA under it: the chain leads to the bundle and the ID is exact,
    //    but the signer is no authority of example.org, so nothing is sent.
    for (who, (chain, key), reason) in [
        (
            "the organisation root",
            org.leaf(SERVER_ID),
            "the CA that signed it carries no URI SAN, so it is not an X.509 authority of \
             spiffe://example.org",
        ),
        (
            "a sibling trust domain's CA",
            org.sibling_leaf("spiffe://other.org", SERVER_ID),
            "the CA that signed it carries URI SAN spiffe://other.org, so it is not an X.509 \
             authority of spiffe://example.org",
        ),
    ] {
        let (log, agent) =
            agent_refuses_fake_server(&server, &bundle, (chain, key), who, reason).await;
        assert!(
            log.contains(&format!("server certificate for {SERVER_ID} refused")),
            "{who}: {log}"
        );
        assert!(agent
            .spiffe_id
            .starts_with("spiffe://example.org/ztid/agent/join-token/"));
    }

    // 2. Any other identity is refused by the agent before it sends anything: the
    //    server's ID spelled otherwise, a reserved sibling, an ordinary workload.
    for presented in [
        "SPIFFE://EXAMPLE.ORG/ztid/server",
        "spiffe://EXAMPLE.ORG/ztid/server",
        "spiffe://example.org/ZTID/server",
        "spiffe://example.org/ztid/server/x",
        "spiffe://example.org/ztid/admin/root",
        "spiffe://example.org/planner",
    ] {
        let expected = if presented.starts_with("spiffe://example.org/") {
            format!("server presented SPIFFE ID {presented}, expected {SERVER_ID}")
        } else {
            "not a canonical SPIFFE ID".to_string()
        };
        agent_refuses_fake_server(&server, &bundle, org.leaf(presented), presented, &expected)
            .await;
    }
}

// ---------------------------------------------------------------------------------
// Part 4: one rule for SPIFFE IDs
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_ids_are_refused_at_every_entry_point() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    let mut admin = admin_socket(&server).await;
    let canonical = "not a canonical SPIFFE ID";
    let spellings = [
        ("SPIFFE://example.org/planner", "scheme must be lowercase"),
        (
            "spiffe://EXAMPLE.org/planner",
            "trust domain must be lowercase",
        ),
        (
            "spiffe://Example.Org/planner",
            "trust domain must be lowercase",
        ),
        ("spiffe://example.org/%70lanner", "percent-encoding"),
        ("spiffe://example.org/planner/", "trailing slash"),
        ("spiffe://example.org//planner", "empty segment"),
        ("spiffe://example.org/./planner", "'.' or '..'"),
        (
            "spiffe://example.org:8443/planner",
            "trust domain may contain only",
        ),
    ];
    for (id, why) in spellings {
        // Admin API: entry IDs, parents, aliases, filters, agent IDs.
        let r = admin
            .create_entry(workload_entry(id, &agent.spiffe_id))
            .await;
        assert_status(r, Code::InvalidArgument, why, &format!("entry {id}"));
        let r = admin
            .create_entry(workload_entry("spiffe://example.org/w", id))
            .await;
        assert_status(r, Code::InvalidArgument, canonical, &format!("parent {id}"));
        let r = admin
            .create_join_token(apb::CreateJoinTokenRequest {
                ttl_seconds: 60,
                alias_spiffe_id: id.into(),
            })
            .await;
        assert_status(r, Code::InvalidArgument, why, &format!("alias {id}"));
        let r = admin
            .list_entries(apb::ListEntriesRequest {
                spiffe_id: id.into(),
                parent_id: String::new(),
                ..Default::default()
            })
            .await;
        assert_status(r, Code::InvalidArgument, why, &format!("filter {id}"));
    }
    let upper_agent = agent
        .spiffe_id
        .replacen("spiffe://example.org", "spiffe://EXAMPLE.ORG", 1);
    for r in [
        admin
            .get_agent(apb::AgentId {
                id: upper_agent.clone(),
            })
            .await,
        admin
            .evict_agent(apb::AgentId {
                id: upper_agent.clone(),
            })
            .await,
        admin
            .ban_agent(apb::AgentId {
                id: upper_agent.clone(),
            })
            .await,
    ] {
        assert_status(
            r,
            Code::InvalidArgument,
            "trust domain must be lowercase",
            "agent id",
        );
    }
    // The uppercase agent ID named a real agent under lenient parsing; it is untouched.
    let (shown, _) = server.agent_record(&agent.spiffe_id);
    assert_eq!(shown["banned"], false);
    // Trust domains: federates_with, federation and bundle commands.
    for f in [
        "OTHER.org",
        "SPIFFE://other.org",
        "spiffe://other.org/x",
        "other%2eorg",
    ] {
        let mut e = workload_entry("spiffe://example.org/w", &agent.spiffe_id);
        e.federates_with = vec![f.into()];
        let r = admin.create_entry(e).await;
        assert_status(r, Code::InvalidArgument, "federates_with", f);
        let r = admin
            .create_federation(apb::Federation {
                trust_domain: f.into(),
                bundle_endpoint_url: "https://127.0.0.1:1/".into(),
                profile: "https_web".into(),
                ..Default::default()
            })
            .await;
        assert_status(r, Code::InvalidArgument, "trust domain", f);
        let r = admin
            .set_federated_bundle(apb::SetFederatedBundleRequest {
                trust_domain: f.into(),
                format: "pem".into(),
                data: server.cli_ok(&["bundle", "show"]).into_bytes(),
            })
            .await;
        assert_status(r, Code::InvalidArgument, "trust domain", f);
    }
    let r = admin
        .create_federation(apb::Federation {
            trust_domain: "other.org".into(),
            bundle_endpoint_url: "https://127.0.0.1:1/".into(),
            profile: "https_spiffe".into(),
            endpoint_spiffe_id: "spiffe://OTHER.org/ztid/server".into(),
            trust_bundle: server.cli_ok(&["bundle", "show"]).into_bytes(),
            ..Default::default()
        })
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        "trust domain must be lowercase",
        "endpoint ID",
    );
    assert_eq!(
        server.cli_ok(&["entry", "list", "--output", "json"]),
        "[]",
        "nothing stored"
    );

    // Node API: CSR URI SANs and JWT-SVID requests, even for the entitled identity
    // spelled otherwise.
    let planner = entry_for_my_uid(&server, &agent, "spiffe://example.org/planner", &[]);
    let mut node = as_agent(&server, &agent);
    let seg = new_instance_segment().unwrap();
    for (id, why) in [
        (
            format!("SPIFFE://example.org/planner/{seg}"),
            "scheme must be lowercase",
        ),
        (
            format!("spiffe://EXAMPLE.ORG/planner/{seg}"),
            "trust domain must be lowercase",
        ),
        (
            format!("spiffe://example.org/%70lanner/{seg}"),
            "percent-encoding",
        ),
        (
            format!("spiffe://example.org/planner/{seg}/"),
            "trailing slash",
        ),
        (
            format!("spiffe://example.org/planner//{seg}"),
            "empty segment",
        ),
    ] {
        let e = sign(&mut node, &planner, &id).await.unwrap_err();
        assert!(e.contains(canonical) && e.contains(why), "X.509 {id}: {e}");
        let e = mint_jwt(&mut node, &planner, &id).await.unwrap_err();
        assert!(e.contains(canonical) && e.contains(why), "JWT {id}: {e}");
    }

    // Config: the server's trust domain and remote admin IDs, refused at start.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("ztid-server"))
        .args(["run", "--trust-domain", "EXAMPLE.org", "--data-dir"])
        .arg(dir.path().join("d"))
        .args(["--bind", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("trust domain must be lowercase"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------
// Part 3: no admin role reaches a higher one
// ---------------------------------------------------------------------------------

/// A remote admin client holding the credential in `dir` (from `admin credential issue`).
fn remote_admin(port: u16, dir: &Path) -> AdminClient<Channel> {
    let chain = pem::parse_many(std::fs::read(dir.join("svid.pem")).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    let key = pem::parse(std::fs::read(dir.join("svid.key")).unwrap())
        .unwrap()
        .into_contents();
    let roots = pem::parse_many(std::fs::read(dir.join("bundle.pem")).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    remote_admin_as(port, roots, chain, key)
}

fn remote_admin_as(
    port: u16,
    roots: Vec<Vec<u8>>,
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
) -> AdminClient<Channel> {
    // Built by hand, not through AgentSvid (which, like the server, reads only
    // canonical IDs): these tests present certificates ztid would never accept.
    let signer = rustls::crypto::ring::sign::any_ecdsa_type(
        &rustls_pki_types::PrivateKeyDer::Pkcs8(key.into()),
    )
    .unwrap();
    let identity = rustls::sign::CertifiedKey::new(
        chain
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect(),
        signer,
    );
    AdminClient::new(
        mtls_channel(
            format!("127.0.0.1:{port}").parse().unwrap(),
            server_verifier(roots),
            Some(Arc::new(identity)),
        )
        .unwrap(),
    )
}

/// Issues admin credential `name` on the server's host (its admin socket) into
/// `dir/name`, checks the ID and the key's mode, and returns that directory.
fn issue_admin_credential(server: &Server, dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(name);
    let id = server.cli_ok(&[
        "admin",
        "credential",
        "issue",
        "--name",
        name,
        "--write",
        d.to_str().unwrap(),
    ]);
    assert_eq!(id, format!("spiffe://example.org/ztid/admin/{name}"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("svid.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is owner-only");
    d
}

/// A server under an organisation root, with `ROOT_ADMIN` bound to authority-admin on a
/// remote admin port: (scratch directory, root, port, server).
fn server_under_org_root() -> (tempfile::TempDir, OrgRoot, u16, Server) {
    let org_dir = tempfile::tempdir().unwrap();
    let org = OrgRoot::new(org_dir.path());
    let port = free_port();
    let cfg = org.config(
        org_dir.path(),
        &roles_config(port, &[(ROOT_ADMIN, "authority-admin")]),
    );
    let server = Server::start_with(TD, &["--config", cfg.to_str().unwrap()]);
    (org_dir, org, port, server)
}

fn roles_config(port: u16, roles: &[(&str, &str)]) -> String {
    let mut s = format!("[remote_admin]\nbind = \"127.0.0.1:{port}\"\n[remote_admin.roles]\n");
    for (id, role) in roles {
        s.push_str(&format!("{id:?} = [{role:?}]\n"));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admin_role_reaches_a_higher_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("server.toml");
    let root_id = "spiffe://example.org/ztid/admin/root";
    std::fs::write(
        &cfg,
        roles_config(
            port,
            &[
                ("spiffe://example.org/ztid/admin/viewer", "viewer"),
                ("spiffe://example.org/ztid/admin/ops", "operator"),
                (root_id, "authority-admin"),
            ],
        ),
    )
    .unwrap();
    let server = Server::start_with(TD, &["--config", cfg.to_str().unwrap()]);
    let agent = Agent::start(&server);
    // Admin credentials come only from the server's host, over its admin socket.
    let creds = |name: &str| issue_admin_credential(&server, dir.path(), name);
    let mut viewer = remote_admin(port, &creds("viewer"));
    let mut ops = remote_admin(port, &creds("ops"));
    let mut root = remote_admin(port, &creds("root"));
    for c in [&mut viewer, &mut ops, &mut root] {
        c.health(apb::HealthRequest {})
            .await
            .expect("each credential works remotely");
    }

    // The old escalation: the operator makes an entry for the authority-admin's ID under
    // an agent it controls. Refused in every spelling, as an entry, alias or token alias.
    for (id, reason) in reserved_spellings("/admin/root") {
        assert_unclaimable(&mut ops, &id, &agent.spiffe_id, reason).await;
    }
    // Nor through an entry it may create plus a compromised agent's CSR.
    let ops_entry = ops
        .create_entry(workload_entry(
            "spiffe://example.org/ops/root",
            &agent.spiffe_id,
        ))
        .await
        .expect("an ordinary entry")
        .into_inner()
        .id;
    let mut node = as_agent(&server, &agent);
    let e = sign(&mut node, &ops_entry, root_id).await.unwrap_err();
    assert!(e.contains("reserved for ztid's own identities"), "{e}");
    let e = mint_jwt(&mut node, &ops_entry, root_id).await.unwrap_err();
    assert!(e.contains("reserved for ztid's own identities"), "{e}");

    // Nobody gets an admin credential remotely, whatever their role.
    let csr = csr_for(root_id);
    for (who, c) in [
        ("viewer", &mut viewer),
        ("operator", &mut ops),
        ("authority-admin", &mut root),
    ] {
        let r = c
            .issue_admin_svid(apb::IssueAdminSvidRequest {
                name: "root".into(),
                csr: csr.clone(),
                ttl_seconds: 0,
            })
            .await;
        assert_status(
            r,
            Code::PermissionDenied,
            "served only on the admin socket",
            who,
        );
    }
    // Each role stays within its own calls.
    let r = ops
        .prepare_authority(apb::AuthorityKind { kind: "jwt".into() })
        .await;
    assert_role_refused(r, "PrepareAuthority", "operator");
    let r = ops
        .set_federated_bundle(apb::SetFederatedBundleRequest {
            trust_domain: "other.org".into(),
            format: "pem".into(),
            data: b"x".to_vec(),
        })
        .await;
    assert_role_refused(r, "SetFederatedBundle", "operator");
    let r = viewer
        .create_entry(workload_entry("spiffe://example.org/v", &agent.spiffe_id))
        .await;
    assert_role_refused(r, "CreateEntry", "viewer");
    let r = root
        .create_entry(workload_entry("spiffe://example.org/r", &agent.spiffe_id))
        .await;
    assert_role_refused(r, "CreateEntry", "authority-admin");
    root.prepare_authority(apb::AuthorityKind { kind: "jwt".into() })
        .await
        .expect("the authority-admin keeps its own role");

    // Issuing is audited with the local caller.
    let audit = std::fs::read_to_string(server.data_dir().join("audit/audit.log")).unwrap();
    assert!(audit.contains("admin_svid_issued") && audit.contains(root_id));
    // A bad admin name is refused on the socket too.
    let r = server.cli(&[
        "admin",
        "credential",
        "issue",
        "--name",
        "Root",
        "--write",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!r.ok && r.stderr.contains("admin name"), "{}", r.stderr);
}

#[test]
fn remote_admin_roles_only_bind_admin_identities() {
    for (id, reason) in [
        (
            "spiffe://example.org/ops/root",
            "admin identities must be spiffe://example.org/ztid/admin/NAME",
        ),
        (
            "spiffe://example.org/ztid/server",
            "admin identities must be",
        ),
        (
            "spiffe://example.org/ztid/admin",
            "admin identities must be",
        ),
        (
            "spiffe://example.org/ztid/admin/a/b",
            "admin identities must be",
        ),
        (
            "spiffe://other.org/ztid/admin/root",
            "admin identities must be",
        ),
        (
            "SPIFFE://example.org/ztid/admin/root",
            "scheme must be lowercase",
        ),
        (
            "spiffe://EXAMPLE.ORG/ztid/admin/root",
            "trust domain must be lowercase",
        ),
        ("spiffe://example.org/ztid/admin/root/", "trailing slash"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("server.toml");
        std::fs::write(&cfg, roles_config(free_port(), &[(id, "authority-admin")])).unwrap();
        let out = Command::new(bin("ztid-server"))
            .args(["run", "--trust-domain", TD, "--data-dir"])
            .arg(dir.path().join("d"))
            .args(["--bind", &format!("127.0.0.1:{}", free_port()), "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{id}: the server must refuse to start"
        );
        assert!(err.contains(reason), "{id}: expected {reason:?}, got {err}");
    }
}

/// The admin check compares canonical IDs only: a certificate spelling the
/// authority-admin's ID in uppercase (made here under the organisation root, which
/// ztid itself would never issue) gets nothing, while the canonical one, issued by the
/// server, works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_check_accepts_only_the_canonical_spelling() {
    let (org_dir, org, port, server) = server_under_org_root();
    let roots = bundle_roots(&server);
    let creds = issue_admin_credential(&server, org_dir.path(), "root");
    remote_admin(port, &creds)
        .prepare_authority(apb::AuthorityKind { kind: "jwt".into() })
        .await
        .expect("the canonical admin ID is admitted");
    for spelled in [
        "SPIFFE://EXAMPLE.ORG/ztid/admin/root",
        "spiffe://EXAMPLE.org/ztid/admin/root",
        "spiffe://example.org/ztid/admin/root/",
        "spiffe://example.org/ztid/admin/%72oot",
        "spiffe://example.org/ZTID/admin/root",
    ] {
        let (chain, key) = org.leaf(spelled);
        let r = remote_admin_as(port, roots.clone(), chain, key)
            .prepare_authority(apb::AuthorityKind { kind: "jwt".into() })
            .await;
        let e = r.expect_err(spelled);
        // Non-canonical spellings fail the TLS handshake (the server reads no identity
        // from them, so no role is even looked up); the uppercase path segment is a
        // different, canonical ID, and it has no role.
        if spelled.contains("ZTID") {
            assert_eq!(e.code(), Code::PermissionDenied, "{spelled}: {e}");
            assert!(e.message().contains("has no admin role"), "{spelled}: {e}");
        } else {
            assert!(
                matches!(
                    e.code(),
                    Code::Unavailable | Code::Cancelled | Code::Unknown
                ),
                "{spelled}: a transport failure, not a role decision: {e}"
            );
        }
    }
    let audit = std::fs::read_to_string(server.data_dir().join("audit/audit.log")).unwrap();
    let allowed = audit
        .lines()
        .filter(|l| l.contains("\"admin_allowed\"") && l.contains("PrepareAuthority"))
        .count();
    assert_eq!(allowed, 1, "only the canonical admin was admitted");
    assert!(
        !audit.contains("SPIFFE://EXAMPLE.ORG"),
        "no other spelling was ever admitted"
    );
}

/// A selector from its `type:value` string.
fn selector(s: &str) -> pb::Selector {
    let (kind, value) = s.split_once(':').expect("type:value");
    pb::Selector {
        r#type: kind.into(),
        value: value.into(),
    }
}

/// A stored entry's request and how a server from before the rule let it differ.
type LegacyEntry = (pb::Entry, fn(&mut ztid_ca::datastore::EntryRecord));

/// Stops `server`, stores `entries` straight into its datastore as a server from before
/// the SPIFFE ID rule accepted them (each made valid from its request, then altered by
/// its function), and starts it again; returns the entries' ids.
fn store_legacy_entries(server: &mut Server, entries: Vec<LegacyEntry>) -> Vec<String> {
    use ztid_ca::datastore::{DataStore, SledStore};
    server.proc.take().unwrap().stop();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let ids = {
        let store = SledStore::open(&server.data_dir().join("datastore")).unwrap();
        let ids = entries
            .into_iter()
            .map(|(req, alter)| {
                let mut e = ztid_ca::entries::validate_new_entry(&td, &req, 3600, &[], 0).unwrap();
                alter(&mut e);
                store.create_entry(e).unwrap().id
            })
            .collect();
        store.flush().unwrap();
        ids
    };
    server.restart();
    // Named by a background check right after start.
    ztid_tests::wait_for(
        "legacy entries named at start",
        Duration::from_secs(30),
        || server.log_text().contains("entry_unusable").then_some(()),
    );
    ids
}

/// The attack's stored state: an entry for `spiffe://TD/ztid` (accepted before the fix)
/// left in the datastore of an upgraded server. It is named at start and mints nothing,
/// least of all the server's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_entry_for_the_reserved_prefix_mints_nothing() {
    let mut server = Server::start(TD);
    let agent = Agent::start(&server);
    let my_uid = format!("unix:uid:{}", nix_uid());
    let entry = pb::Entry {
        selectors: vec![selector(&my_uid)],
        ..workload_entry("spiffe://example.org/placeholder", &agent.spiffe_id)
    };
    let ids = store_legacy_entries(
        &mut server,
        vec![(entry, |e| e.spiffe_id = "spiffe://example.org/ztid".into())],
    );
    let entry_id = ids[0].clone();
    assert!(server
        .log_text()
        .contains("reserved for ztid's own identities"));
    let mut node = as_agent(&server, &agent);
    let seg = new_instance_segment().unwrap();
    for id in [
        SERVER_ID.to_string(),
        format!("spiffe://example.org/ztid/{seg}"),
    ] {
        let e = sign(&mut node, &entry_id, &id).await.unwrap_err();
        assert!(
            e.contains("reserved for ztid's own identities"),
            "{id}: {e}"
        );
        let e = mint_jwt(&mut node, &entry_id, &id).await.unwrap_err();
        assert!(
            e.contains("reserved for ztid's own identities"),
            "{id}: {e}"
        );
    }
}

// ---------------------------------------------------------------------------------
// The same attacks in other shapes
// ---------------------------------------------------------------------------------

/// A per-instance ID is the entry's ID plus a 32-hex segment, and the agent picks the
/// segment. So an entry whose own ID ended in such a segment (`…/web/<hex>`) was an
/// identity every agent entitled to `…/web` could mint: a compromised agent took the
/// ID of an entry that belongs to another agent. No claimable ID (entry, node alias,
/// token alias) may end in the instance form, so instance IDs and entry IDs never meet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_id_cannot_take_the_form_of_another_entrys_instance() {
    let server = Server::start(TD);
    let mallory = Agent::start(&server);
    let victim = Agent::start(&server);
    let web = entry_for_my_uid(&server, &mallory, "spiffe://example.org/web", &[]);
    let seg = new_instance_segment().unwrap();
    let taken = format!("spiffe://example.org/web/{seg}");
    let mut admin = admin_socket(&server).await;
    let form = "ends in a per-instance segment (32 lowercase hex characters)";
    assert_unclaimable(&mut admin, &taken, &victim.spiffe_id, form).await;
    // Only an exact instance segment is the instance form: IDs that merely contain
    // hex (shorter, uppercase, not last) are ordinary IDs.
    for ok in [
        format!("spiffe://example.org/web/{}", &seg[..31]),
        format!("spiffe://example.org/web/{}", seg.to_uppercase()),
        format!("spiffe://example.org/web/{seg}/db"),
    ] {
        admin
            .create_entry(workload_entry(&ok, &victim.spiffe_id))
            .await
            .unwrap_or_else(|s| panic!("{ok}: {}", s.message()));
    }
    // Mallory is still entitled to its own instances, which no entry can now name.
    let mut node = as_agent(&server, &mallory);
    assert_eq!(sign(&mut node, &web, &taken).await.unwrap(), taken);
}

/// `example.org.` is the server's own trust domain in DNS's other spelling. It was
/// accepted as a federated trust domain (its bundle then handed to workloads as a
/// foreign domain's, with an endpoint ID `spiffe://example.org./ztid/server`), in
/// `federates_with`, and as any ID's trust domain. A trust domain with an empty label
/// (leading, trailing or doubled dot) is refused at every entry point, like any other
/// non-canonical spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_own_trust_domain_cannot_come_back_with_a_trailing_dot() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    let mut admin = admin_socket(&server).await;
    let pem = std::fs::read(server.bundle_file()).unwrap();
    let label = "the trust domain has an empty label";
    for td in ["example.org.", ".example.org", "example..org"] {
        let r = admin
            .set_federated_bundle(apb::SetFederatedBundleRequest {
                trust_domain: td.into(),
                format: "pem".into(),
                data: pem.clone(),
            })
            .await;
        assert_status(r, Code::InvalidArgument, label, &format!("bundle set {td}"));
        let r = admin
            .create_federation(apb::Federation {
                trust_domain: td.into(),
                bundle_endpoint_url: "https://127.0.0.1:1/".into(),
                profile: "https_spiffe".into(),
                endpoint_spiffe_id: format!("spiffe://{td}/ztid/server"),
                trust_bundle: pem.clone(),
                ..Default::default()
            })
            .await;
        assert_status(r, Code::InvalidArgument, label, &format!("federation {td}"));
        let mut e = workload_entry("spiffe://example.org/w", &agent.spiffe_id);
        e.federates_with = vec![td.into()];
        assert_status(
            admin.create_entry(e).await,
            Code::InvalidArgument,
            label,
            &format!("federates_with {td}"),
        );
        let r = admin
            .create_entry(workload_entry(
                &format!("spiffe://{td}/w"),
                &agent.spiffe_id,
            ))
            .await;
        assert_status(r, Code::InvalidArgument, label, &format!("entry in {td}"));
    }
    // Nothing was stored.
    let feds = admin
        .list_federations(apb::ListFederationsRequest {})
        .await
        .unwrap()
        .into_inner();
    let bundles = admin
        .list_federated_bundles(apb::ListFederatedBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        feds.federations.is_empty() && bundles.bundles.is_empty(),
        "{feds:?} {bundles:?}"
    );
    // The server's own trust domain is held to the same rule.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("ztid-server"))
        .args(["run", "--trust-domain", "example.org.", "--data-dir"])
        .arg(dir.path().join("d"))
        .args(["--bind", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(label), "{err}");
}

/// Stored state from before the rule, in another shape: a node alias for the server's
/// ID and a workload entry whose parent is that alias. The alias still matched the
/// agent's selectors, so the agent was entitled to the entry and minted its ID. A
/// stored entry that the rule refuses is refused at every mint, whatever it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_entry_under_a_reserved_alias_mints_nothing() {
    let mut server = Server::start(TD);
    let agent = Agent::start(&server);
    let (_, agent_selectors) = server.agent_record(&agent.spiffe_id);
    let alias = pb::Entry {
        spiffe_id: "spiffe://example.org/placeholder".into(),
        node: true,
        selectors: agent_selectors.iter().map(|s| selector(s)).collect(),
        ..Default::default()
    };
    let my_uid = format!("unix:uid:{}", nix_uid());
    let entry = pb::Entry {
        selectors: vec![selector(&my_uid)],
        ..workload_entry(
            "spiffe://example.org/under-server",
            "spiffe://example.org/placeholder",
        )
    };
    let ids = store_legacy_entries(
        &mut server,
        vec![
            (alias, |e| e.spiffe_id = SERVER_ID.into()),
            (entry, |e| e.parent_id = SERVER_ID.into()),
        ],
    );
    let entry_id = ids[1].clone();
    // The agent's next sync gives it the alias.
    wait_for("the agent's aliases", READY_TIMEOUT, || {
        let (shown, _) = server.agent_record(&agent.spiffe_id);
        shown["aliases"]
            .to_string()
            .contains(SERVER_ID)
            .then_some(())
    });
    let mut node = as_agent(&server, &agent);
    let why = "reserved and not an agent ID";
    let id = format!(
        "spiffe://example.org/under-server/{}",
        new_instance_segment().unwrap()
    );
    let e = sign(&mut node, &entry_id, &id).await.unwrap_err();
    assert!(e.contains(why), "X.509 {id}: {e}");
    let e = mint_jwt(&mut node, &entry_id, &id).await.unwrap_err();
    assert!(e.contains(why), "JWT {id}: {e}");
}

/// Under an upstream root the bundle trusts the organisation's root, so another CA under
/// it (another trust domain's, or the root itself) could sign `spiffe://TD/ztid/admin/root`
/// and was admitted as the authority-admin. An admin identity now counts only in a
/// certificate one of this server's own authorities signed, including an authority
/// rotated out but not revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_identity_counts_only_from_this_servers_authorities() {
    let (org_dir, org, port, server) = server_under_org_root();
    let roots = bundle_roots(&server);
    let not_here = "is not in a current certificate this server's authority signed";
    for (what, (chain, key)) in [
        (
            "a sibling trust domain's CA",
            org.sibling_leaf("spiffe://other.org", ROOT_ADMIN),
        ),
        ("the organisation root", org.leaf(ROOT_ADMIN)),
    ] {
        let r = remote_admin_as(port, roots.clone(), chain, key)
            .prepare_authority(apb::AuthorityKind { kind: "jwt".into() })
            .await;
        assert_status(r, Code::PermissionDenied, not_here, what);
    }
    // The server's own credential works, and keeps working after the X.509 authority
    // that signed it is rotated out.
    let creds = issue_admin_credential(&server, org_dir.path(), "root");
    let mut root = remote_admin(port, &creds);
    for step in ["prepare", "activate"] {
        let kind = apb::AuthorityKind {
            kind: "x509".into(),
        };
        if step == "prepare" {
            root.prepare_authority(kind).await
        } else {
            root.activate_authority(kind).await
        }
        .unwrap_or_else(|s| panic!("{step}: {}", s.message()));
    }
    remote_admin(port, &creds)
        .health(apb::HealthRequest {})
        .await
        .expect("an admin credential from the previous authority still counts");
    let audit = std::fs::read_to_string(server.data_dir().join("audit/audit.log")).unwrap();
    assert!(audit.contains("admin_refused") && audit.contains(not_here));
    // An admin identity is no agent: the node API mints nothing for it.
    let pem_der = |f: &str| {
        pem::parse_many(std::fs::read(creds.join(f)).unwrap())
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect::<Vec<_>>()
    };
    let svid = ztid_agent::node_client::AgentSvid::from_parts(
        pem_der("svid.pem"),
        pem_der("svid.key").remove(0),
    )
    .unwrap();
    let mut node = connect(
        server.addr().parse().unwrap(),
        server_verifier(bundle_roots(&server)),
        Some(svid.certified_key().unwrap()),
    )
    .unwrap();
    let r = node
        .sign_x509_svids(pb::SignX509SvidsRequest {
            requests: vec![pb::SvidRequest {
                entry_id: "any".into(),
                csr: csr_for("spiffe://example.org/w"),
            }],
        })
        .await;
    assert_status(
        r,
        Code::Unauthenticated,
        &format!("agent {ROOT_ADMIN} is not attested"),
        "admin SVID at the node API",
    );
}

/// The other direction: under an upstream root the server's TLS layer accepts any chain
/// to the organisation's root, and an agent's ID and serial are no secret (they are in
/// the audit log and `agent list`). A CA under the same root copying both into a
/// certificate of its own is not the agent: the server admits only certificates its own
/// X.509 authorities signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_admits_an_agent_only_in_a_certificate_it_signed() {
    let (_org_dir, org, _port, server) = server_under_org_root();
    let agent = Agent::start(&server);
    let own = agent.own_svid();
    let serial = x509_parser::parse_x509_certificate(&own.chain[0])
        .unwrap()
        .1
        .raw_serial()
        .to_vec();
    // Control: the agent's own SVID is admitted.
    as_agent(&server, &agent)
        .sync_entries(pb::SyncEntriesRequest::default())
        .await
        .expect("the agent's own SVID is admitted");
    for (who, ca_uri) in [
        ("a sibling trust domain's CA", "spiffe://other.org"),
        (
            "a CA under the root claiming the trust domain",
            "spiffe://example.org",
        ),
    ] {
        let (chain, key) = org.sibling_leaf_with_serial(ca_uri, &agent.spiffe_id, Some(&serial));
        let forged = ztid_agent::node_client::AgentSvid::from_parts(chain, key).unwrap();
        let mut node = connect(
            server.addr().parse().unwrap(),
            server_verifier(bundle_roots(&server)),
            Some(forged.certified_key().unwrap()),
        )
        .unwrap();
        let r = node.sync_entries(pb::SyncEntriesRequest::default()).await;
        assert_status(
            r,
            Code::Unauthenticated,
            &format!(
                "{} is not in a certificate this server's X.509 authorities signed",
                agent.spiffe_id
            ),
            who,
        );
    }
}
