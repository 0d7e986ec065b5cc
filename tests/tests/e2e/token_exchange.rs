//! Token exchange end to end (issue 14): the real `ztid-server` with its token endpoint
//! (`--sts`), a real `ztid-agent`, and third-party parts on the other side: Python agent
//! processes that get their SVIDs through unmodified py-spiffe and exchange them
//! (`python/sts_agent.py`), a protected MCP server built with FastMCP whose own JWT/JWKS
//! verifier takes ztid as its authorization server (`python/sts_mcp_server.py`), PyJWT
//! (`python/sts_verify.py`) and the `jsonwebtoken` crate checking tokens from the
//! metadata and JWKS alone, and a resource that checks the token's `cnf` against its
//! connection's client certificate (`python/sts_bound_resource.py`).
//!
//! One server, agent and MCP server serve every case of one test function: starting
//! them is most of the cost, and CI's budget is tight.
//!
//! Every workload role (the MCP agent, the orchestrator, its sub-agent and sub-sub-agent,
//! a short-lived-token agent, a stranger with no grant) is its own process with its own
//! SVID: each runs a copy of the venv's interpreter at a path of its own, so the agent
//! tells them apart by their `unix:path` selector and each gets its own entry.

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use ztid_tests::*;

const TD: &str = "example.org";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// A resource no MCP server here is: tokens for it must be refused by the MCP server.
const OTHER_RESOURCE: &str = "https://other.example/mcp";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The claims of a JWT, unverified (what the test inspects after the checks).
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    serde_json::from_slice(&B64.decode(payload).expect("base64url claims")).expect("JSON claims")
}

/// `application/x-www-form-urlencoded`, every byte but the unreserved ones escaped.
fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A child process killed on drop, its stdout and stderr in files.
struct Background {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Background {
    fn spawn(cmd: &mut Command, dir: &Path, name: &str) -> Self {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn");
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Its first stdout line as JSON, once written (its readiness line).
    fn ready_line(&mut self, what: &str) -> Value {
        wait_for(what, READY_TIMEOUT, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{what}: exited ({st}):\n{}", self.log());
            }
            let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
            let line = out.lines().next()?;
            out.contains('\n')
                .then(|| serde_json::from_str(line).expect("readiness line is JSON"))
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the venv's interpreter at `root/<role>/bin/python`, using the venv's
/// packages (a `pyvenv.cfg` beside it naming the base installation, `site-packages`
/// linked to the venv's): a process running it has a `unix:path` selector of its own.
fn role_python(root: &Path, role: &str) -> PathBuf {
    let info = Command::new(python())
        .args([
            "-c",
            "import os, sys, sysconfig\n\
             print(os.path.realpath(sys.executable))\n\
             print(sysconfig.get_paths()['purelib'])\n\
             print('%d.%d' % sys.version_info[:2])",
        ])
        .output()
        .expect("run the venv's python");
    assert!(info.status.success(), "{info:?}");
    let info = String::from_utf8(info.stdout).unwrap();
    let mut lines = info.lines();
    let (real, purelib, version) = (
        PathBuf::from(lines.next().unwrap()),
        PathBuf::from(lines.next().unwrap()),
        lines.next().unwrap().to_string(),
    );
    let dir = root.join(role);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join(format!("lib/python{version}"))).unwrap();
    let exe = dir.join("bin/python");
    std::fs::copy(&real, &exe).unwrap();
    std::fs::write(
        dir.join("pyvenv.cfg"),
        format!(
            "home = {}\ninclude-system-site-packages = false\nversion = {version}\n",
            real.parent().unwrap().display()
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        &purelib,
        dir.join(format!("lib/python{version}/site-packages")),
    )
    .unwrap();
    std::fs::canonicalize(exe).unwrap()
}

/// One workload role: its own interpreter (so its own entry) and that entry's ID.
struct Role {
    name: &'static str,
    exe: PathBuf,
    /// The entry's SPIFFE ID (instances extend it by one segment).
    spiffe_id: String,
}

/// Everything the cases share, and a tally of the exchange attempts they made.
struct Env {
    server: Server,
    agent: Agent,
    sts_addr: String,
    issuer: String,
    bundle: PathBuf,
    roots: Vec<Vec<u8>>,
    scratch: tempfile::TempDir,
    granted: Cell<usize>,
    refused: Cell<usize>,
}

impl Env {
    fn start() -> Self {
        let scratch = tempfile::tempdir().unwrap();
        let sts_addr = format!("127.0.0.1:{}", free_port());
        // A depth cap below the default, so a chain of three actors reaches it; refusals
        // audited one by one whatever their number, so every attempt has its receipt
        // (the defaults summarise a caller's refusals past 10 per minute).
        let config = scratch.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                "[sts]\nlisten = \"{sts_addr}\"\nmax_delegation_depth = 2\n\n\
                 [limits]\nrefusals_audited_per_peer = 1000\nrefusals_audited_per_interval = 1000\n"
            ),
        )
        .unwrap();
        let server = Server::start_with(
            TD,
            &["--config", config.to_str().unwrap(), "--sts", &sts_addr],
        );
        let agent = Agent::start(&server);
        let bundle = server.bundle_file();
        let roots = bundle_roots(&server);
        let env = Self {
            issuer: format!("https://{sts_addr}"),
            sts_addr,
            server,
            agent,
            bundle,
            roots,
            scratch,
            granted: Cell::new(0),
            refused: Cell::new(0),
        };
        wait_for("the token endpoint's metadata", READY_TIMEOUT, || {
            env.try_https(
                "GET",
                "/.well-known/oauth-authorization-server",
                "",
                b"",
                None,
            )
            .ok()
            .filter(|(status, _)| *status == 200)
        });
        env
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// A role with its own interpreter and entry (`spiffe://example.org/<name>`).
    fn role(&self, name: &'static str) -> Role {
        let exe = role_python(&self.dir("roles"), name);
        let spiffe_id = format!("spiffe://{TD}/{name}");
        self.server.cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            &spiffe_id,
            "--parent-id",
            &self.agent.spiffe_id,
            "--selector",
            &format!("unix:path:{}", exe.display()),
        ]);
        Role {
            name,
            exe,
            spiffe_id,
        }
    }

    fn grant(&self, role: &Role, audience: &str, scopes: &[&str], extra: &[&str]) -> String {
        let mut args = vec![
            "grant",
            "create",
            "--spiffe-id",
            &role.spiffe_id,
            "--audience",
            audience,
        ];
        for s in scopes {
            args.extend_from_slice(&["--scope", s]);
        }
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", "json"]);
        let out = self.server.cli_ok(&args);
        let g: Value = serde_json::from_str(&out).expect("grant create --output json");
        g["id"].as_str().expect("grant id").to_string()
    }

    /// Runs `sts_agent.py MODE ARGS` as `role`; its JSON line. Counts exchange attempts.
    fn agent_py(&self, role: &Role, mode: &str, args: &[&str]) -> Value {
        let out = Command::new(&role.exe)
            .arg(script("sts_agent.py"))
            .arg(mode)
            .args(["--sts", &self.issuer, "--socket", &self.agent.endpoint()])
            .args(args)
            .output()
            .expect("run sts_agent.py");
        assert!(
            out.status.success(),
            "sts_agent.py {mode} as {} failed:\n{}",
            role.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "sts_agent.py output is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let attempt = match mode {
            "exchange" | "delegate" => Some(&v),
            "call" => v.get("exchange"),
            _ => None,
        };
        if let Some(a) = attempt {
            self.tally(a["ok"] == true);
        }
        v
    }

    fn tally(&self, granted: bool) {
        let c = if granted {
            &self.granted
        } else {
            &self.refused
        };
        c.set(c.get() + 1);
    }

    /// One HTTPS request to the token endpoint, presenting the X509-SVID saved in
    /// `cred` (a directory `sts_agent.py --save` wrote) when given.
    fn try_https(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
        cred: Option<&Path>,
    ) -> std::io::Result<(u16, Value)> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut store = rustls::RootCertStore::empty();
        for r in &self.roots {
            store.add(CertificateDer::from(r.clone())).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store);
        let config = match cred {
            Some(dir) => {
                let chain = pem::parse_many(std::fs::read(dir.join("svid.pem")).unwrap())
                    .unwrap()
                    .into_iter()
                    .map(|p| CertificateDer::from(p.into_contents()))
                    .collect();
                let key = pem::parse(std::fs::read(dir.join("key.pem")).unwrap()).unwrap();
                builder
                    .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(key.into_contents().into()))
                    .unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let conn =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
        let tcp = TcpStream::connect(&self.sts_addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.sts_addr,
            body.len()
        );
        if !content_type.is_empty() {
            req.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes())?;
        tls.write_all(body)?;
        let mut raw = Vec::new();
        match tls.read_to_end(&mut raw) {
            Ok(_) => {}
            // A peer that closes without close_notify: what arrived is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(e),
        }
        Ok(parse_http(&raw))
    }

    fn https(&self, method: &str, path: &str, body: &[u8], cred: Option<&Path>) -> (u16, Value) {
        let ct = if method == "POST" {
            "application/x-www-form-urlencoded"
        } else {
            ""
        };
        self.try_https(method, path, ct, body, cred)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A `POST /token` from Rust (bad input, polling); counted as an exchange attempt.
    fn token_post(&self, body: &[u8], cred: Option<&Path>) -> (u16, Value) {
        let (status, v) = self.https("POST", "/token", body, cred);
        self.tally(status == 200 && v.get("access_token").is_some());
        (status, v)
    }

    /// RFC 7662 introspection, authenticated with the SVID saved in `cred`.
    fn introspect(&self, token: &str, cred: &Path) -> Value {
        let (status, v) = self.https(
            "POST",
            "/introspect",
            form(&[("token", token)]).as_bytes(),
            Some(cred),
        );
        assert_eq!(status, 200, "introspection answers 200: {v}");
        v
    }

    /// Verifies an access token with the `jsonwebtoken` crate from the metadata and
    /// JWKS alone: signature (ES256), `iss`, `aud`, `exp`, and the `at+jwt` type.
    fn rust_verify(&self, token: &str, audience: &str) -> Result<Value, String> {
        let (status, meta) =
            self.https("GET", "/.well-known/oauth-authorization-server", b"", None);
        assert_eq!(status, 200, "{meta}");
        assert_eq!(meta["issuer"], self.issuer.as_str());
        let jwks_uri = meta["jwks_uri"].as_str().expect("jwks_uri");
        let path = jwks_uri
            .strip_prefix(&self.issuer)
            .unwrap_or_else(|| panic!("jwks_uri {jwks_uri} is on the issuer"));
        let (status, jwks) = self.https("GET", path, b"", None);
        assert_eq!(status, 200, "{jwks}");
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).expect("a JWK Set");
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        if header.typ.as_deref() != Some("at+jwt") {
            return Err(format!("typ {:?}, not at+jwt", header.typ));
        }
        let kid = header.kid.ok_or("no kid")?;
        let jwk = jwks
            .find(&kid)
            .ok_or(format!("kid {kid} not in the JWKS"))?;
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&[audience]);
        v.set_issuer(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 0;
        jsonwebtoken::decode::<Value>(token, &key, &v)
            .map(|d| d.claims)
            .map_err(|e| e.to_string())
    }

    /// The audit events of the server's log, in order.
    fn audit_events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.server.data_dir().join("audit/audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|r| r["event"].clone())
            .collect()
    }
}

/// Status and JSON body of an HTTP/1.1 answer (content-length or chunked).
fn parse_http(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP status line: {head}"));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    let v = serde_json::from_str(&body).unwrap_or_else(|_| json!({ "raw": body }));
    (status, v)
}

/// Asserts an OAuth refusal: the error code, and a phrase of its description.
#[track_caller]
fn refused(v: &Value, code: &str, phrase: &str) {
    eprintln!("refusal: {} ({})", v["error"], v["error_description"]);
    // sts_agent.py lifts error and error_description to the top, as the body has them.
    assert_eq!(v["error"], code, "refusal code: {v}");
    let d = v["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        d.contains(&phrase.to_lowercase()),
        "the description names the cause ({phrase:?}): {v}"
    );
    assert!(
        v.pointer("/response/access_token").is_none() && v.get("access_token").is_none(),
        "nothing issued: {v}"
    );
}

#[track_caller]
fn granted(v: &Value) -> String {
    assert_eq!(v["ok"], true, "exchange granted: {v}");
    v["response"]["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// A JWT signed ES256 by a key of our own making (no ztid authority's).
fn foreign_jwt(claims: &Value) -> String {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let header = json!({"alg": "ES256", "kid": "foreign-key", "typ": "JWT"});
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = key.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

/// SHA-256 of the leaf certificate saved in `dir`, base64url: RFC 8705's `x5t#S256`.
fn thumbprint(dir: &Path) -> String {
    let leaf = pem::parse_many(std::fs::read(dir.join("svid.pem")).unwrap()).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, leaf[0].contents());
    B64.encode(digest.as_ref())
}

fn id_in(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("id.txt"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn agents_exchange_svids_for_scoped_bound_tokens_and_mcp_checks_them() {
    let env = Env::start();

    // Third-party resource servers, configured with nothing but the issuer and bundle.
    let mut mcp = Background::spawn(
        Command::new(python())
            .arg(script("sts_mcp_server.py"))
            .args(["--issuer", &env.issuer, "--bundle"])
            .arg(&env.bundle)
            // FastMCP logs through rich: one line per reason, not wrapped at 80.
            .env("COLUMNS", "400"),
        env.scratch.path(),
        "mcp-server",
    );
    let mut bound_server = Background::spawn(
        Command::new(python())
            .arg(script("sts_bound_resource.py"))
            .args(["--issuer", &env.issuer, "--bundle"])
            .arg(&env.bundle)
            .arg("--dir")
            .arg(env.scratch.path()),
        env.scratch.path(),
        "bound-resource",
    );
    let mcp_url = mcp.ready_line("the MCP server")["listening"]
        .as_str()
        .unwrap()
        .to_string();
    let ready = bound_server.ready_line("the bound-token resource");
    let bound_url = ready["listening"].as_str().unwrap().to_string();
    let bound_ca = ready["ca"].as_str().unwrap().to_string();

    // Roles (each its own entry) and what they are granted: deny by default.
    let tool_agent = env.role("mcp-agent");
    let brief = env.role("brief-agent");
    let stranger = env.role("stranger");
    let orchestrator = env.role("orchestrator");
    let sub = env.role("sub-agent");
    let subsub = env.role("sub-sub-agent");
    let fourth = env.role("fourth-agent");
    env.grant(&tool_agent, &mcp_url, &["tools.read"], &[]);
    env.grant(
        &tool_agent,
        OTHER_RESOURCE,
        &["tools.read", "tools.write"],
        &[],
    );
    env.grant(&tool_agent, &bound_url, &["notes.read"], &[]);
    env.grant(&brief, &mcp_url, &["tools.read"], &["--ttl", "1"]);
    env.grant(
        &orchestrator,
        &mcp_url,
        &["tools.read", "tools.write", "tools.admin"],
        &[],
    );
    env.grant(
        &sub,
        &mcp_url,
        &["tools.read", "tools.write"],
        &["--may-delegate"],
    );
    env.grant(
        &subsub,
        &mcp_url,
        &["tools.read", "tools.admin"],
        &["--may-delegate"],
    );
    env.grant(&fourth, &mcp_url, &["tools.read"], &["--may-delegate"]);
    let dirs: Vec<PathBuf> = ["a1", "a2", "s1", "o", "b", "c", "d"]
        .iter()
        .map(|d| env.dir(d))
        .collect();
    let [a1, a2, s1, o, b, c, d] = &dirs[..] else {
        unreachable!()
    };
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let (a1s, a2s, s1s, os_, bs, cs, ds) =
        (arg(a1), arg(a2), arg(s1), arg(o), arg(b), arg(c), arg(d));
    // The MCP server as the target of an exchange (and, for `call`, the server called).
    let target = ["--resource", mcp_url.as_str(), "--mcp", mcp_url.as_str()];
    let with = |extra: &[&str]| -> Vec<String> {
        target.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |role: &Role, mode: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.agent_py(role, mode, &args)
    };

    // --- The first tool: one process gets its SVID through py-spiffe, exchanges it over
    // mTLS and calls read_notes with FastMCP's client. ---
    let v = run(
        &tool_agent,
        "call",
        with(&[
            "--scope",
            "tools.read",
            "--tool",
            "read_notes",
            "--save",
            &a1s,
        ]),
    );
    assert_eq!(v["ok"], true, "read_notes with a tools.read token: {v}");
    assert_eq!(v["result"], json!(["first note"]));
    let r = &v["exchange"]["response"];
    let read_token = r["access_token"].as_str().unwrap().to_string();
    assert_eq!(r["token_type"], "Bearer");
    assert_eq!(r["issued_token_type"], ACCESS_TOKEN_TYPE);
    assert_eq!(r["scope"], "tools.read");
    assert_eq!(r["expires_in"], 300, "default TTL of 5 minutes");
    let a1_id = id_in(a1);
    assert!(a1_id.starts_with(&format!("{}/", tool_agent.spiffe_id)));
    let claims = claims_of(&read_token);
    assert_eq!(
        claims["sub"],
        a1_id.as_str(),
        "sub is the caller's instance"
    );
    assert_eq!(claims["client_id"], claims["sub"]);
    assert_eq!(claims["aud"], mcp_url.as_str());
    assert_eq!(claims["iss"], env.issuer.as_str());
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        300
    );
    assert_eq!(
        claims["ztid_node"]["agent"],
        env.agent.spiffe_id.as_str(),
        "the caller's node, verified: {claims}"
    );

    // --- The second tool: scope not granted, at the exchange and at the MCP server. ---
    let v = run(
        &tool_agent,
        "exchange",
        with(&["--scope", "tools.read tools.write", "--load", &a1s]),
    );
    refused(&v, "invalid_scope", "scope tools.write is not granted");

    // --- A token for another resource (granted there; the MCP server must refuse it). ---
    let v = run(
        &tool_agent,
        "exchange",
        vec![
            "--resource".into(),
            OTHER_RESOURCE.into(),
            "--scope".into(),
            "tools.read".into(),
            "--load".into(),
            a1s.clone(),
        ],
    );
    let other_token = granted(&v);
    assert_eq!(claims_of(&other_token)["aud"], OTHER_RESOURCE);

    // --- An identity with no grant. ---
    let v = run(
        &stranger,
        "exchange",
        with(&["--scope", "tools.read", "--save", &s1s]),
    );
    refused(&v, "invalid_target", "no grant lets");

    // --- The JWT-SVID as subject_token (no client certificate): a bearer token, no cnf;
    // and as an RFC 7523 client assertion. ---
    for auth in ["jwt", "assertion"] {
        let v = run(
            &tool_agent,
            "exchange",
            with(&["--scope", "tools.read", "--auth", auth, "--load", &a1s]),
        );
        let t = claims_of(&granted(&v));
        assert_eq!(t["sub"], a1_id.as_str(), "{auth}: {t}");
        assert!(
            t.get("cnf").is_none(),
            "{auth}: not sender-constrained: {t}"
        );
    }

    // --- A token that expires (the grant's TTL is 1 s); used after its exp below. ---
    let v = run(&brief, "exchange", with(&["--scope", "tools.read"]));
    let brief_token = granted(&v);
    assert_eq!(v["response"]["expires_in"], 1, "{v}");

    // --- A bound token: cnf is the SVID's thumbprint, and only that key can use it. ---
    let v = run(
        &tool_agent,
        "exchange",
        vec![
            "--resource".into(),
            bound_url.clone(),
            "--scope".into(),
            "notes.read".into(),
            "--load".into(),
            a1s.clone(),
        ],
    );
    let bound_token = granted(&v);
    let info = env.introspect(&bound_token, a1);
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(
        info["cnf"]["x5t#S256"],
        thumbprint(a1).as_str(),
        "cnf names the SVID the agent used: {info}"
    );
    assert_eq!(claims_of(&bound_token)["cnf"], info["cnf"]);
    let bound_call = |load: Option<&str>| {
        let mut args: Vec<String> = [
            "--url",
            &bound_url,
            "--server-ca",
            &bound_ca,
            "--token",
            &bound_token,
        ]
        .map(String::from)
        .to_vec();
        match load {
            Some(d) => args.extend(["--load".to_string(), d.to_string()]),
            None => args.push("--no-cert".into()),
        }
        run(&tool_agent, "bound", args)
    };
    let v = bound_call(Some(&a1s));
    assert_eq!(v["ok"], true, "the holder of the key: {v}");
    assert_eq!(v["sub"], a1_id.as_str());
    let v = bound_call(Some(&s1s));
    assert_eq!(
        v["status"], 401,
        "replayed with another client certificate: {v}"
    );
    assert!(
        v["reason"].as_str().unwrap().contains("does not match"),
        "{v}"
    );
    let v = bound_call(None);
    assert_eq!(
        v["status"], 401,
        "replayed without a client certificate: {v}"
    );
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("no client certificate"),
        "{v}"
    );

    // --- The copyable example (examples/python) against the same resource: its own
    // process, SVID from SPIFFE_ENDPOINT_SOCKET, mTLS exchange, bound call. ---
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/fetch_token_and_call.py");
    let out = Command::new(&tool_agent.exe)
        .arg(example)
        .args([&env.issuer, &bound_url, "notes.read"])
        .env("SPIFFE_ENDPOINT_SOCKET", env.agent.endpoint())
        // The resource's own self-signed certificate, as the "system" CA of that process.
        .env("SSL_CERT_FILE", &bound_ca)
        .output()
        .unwrap();
    env.tally(true);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && printed.starts_with("200 "),
        "the example: {printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_str(&printed[4..]).unwrap();
    assert!(answer["sub"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{}/", tool_agent.spiffe_id)));

    // --- Delegation: orchestrator -> sub-agent -> sub-sub-agent, each its own process
    // with its own SVID (fetched through py-spiffe in that process). ---
    let v = run(
        &orchestrator,
        "exchange",
        with(&[
            "--scope",
            "tools.read tools.write tools.admin",
            "--save",
            &os_,
        ]),
    );
    let o_token = granted(&v);
    let o_id = id_in(o);
    let delegate = |role: &Role, how: &str, dir: &str, subject: &str, scope: &str| {
        run(
            role,
            "delegate",
            with(&["--scope", scope, "--subject-token", subject, how, dir]),
        )
    };
    let v = delegate(&sub, "--save", &bs, &o_token, "tools.read tools.write");
    let b_token = granted(&v);
    let b_id = id_in(b);
    let bc = claims_of(&b_token);
    assert_eq!(
        bc["sub"],
        o_id.as_str(),
        "sub stays the orchestrator's: {bc}"
    );
    assert_eq!(bc["client_id"], b_id.as_str());
    assert_eq!(bc["act"], json!({ "sub": b_id }));
    assert_eq!(
        bc["scope"], "tools.read tools.write",
        "narrowed at the first hop"
    );
    let v = delegate(&subsub, "--save", &cs, &b_token, "tools.read");
    let c_token = granted(&v);
    let c_id = id_in(c);
    let cc = claims_of(&c_token);
    assert_eq!(cc["sub"], o_id.as_str());
    assert_eq!(cc["client_id"], c_id.as_str());
    assert_eq!(
        cc["act"],
        json!({"sub": c_id, "act": {"sub": b_id}}),
        "the chain names the instances, newest outermost"
    );
    assert_eq!(
        cc["scope"], "tools.read",
        "narrowed again at the second hop"
    );
    assert!(cc["exp"].as_u64() <= claims_of(&o_token)["exp"].as_u64());
    // Widening: tools.admin is in the sub-sub-agent's grant, not in the token it acts on.
    let v = delegate(&subsub, "--load", &cs, &b_token, "tools.read tools.admin");
    refused(
        &v,
        "invalid_scope",
        "tools.admin is wider than the subject token",
    );
    // Depth: a third actor exceeds max_delegation_depth = 2.
    let v = delegate(&fourth, "--save", &ds, &c_token, "tools.read");
    refused(&v, "unauthorized_client", "max_delegation_depth");
    // Acting without delegation in one's grant.
    let v = delegate(&tool_agent, "--load", &a1s, &o_token, "tools.read");
    refused(&v, "unauthorized_client", "--may-delegate");
    // may_act: the orchestrator names who may act for it; anyone else is refused.
    let v = run(
        &orchestrator,
        "exchange",
        with(&[
            "--scope",
            "tools.read",
            "--may-act",
            &sub.spiffe_id,
            "--load",
            &os_,
        ]),
    );
    let o_restricted = granted(&v);
    assert_eq!(
        claims_of(&o_restricted)["may_act"],
        json!({ "sub": sub.spiffe_id })
    );
    let v = delegate(&subsub, "--load", &cs, &o_restricted, "tools.read");
    refused(
        &v,
        "invalid_grant",
        &format!("may_act does not name {}", id_in(c)),
    );
    granted(&delegate(&sub, "--load", &bs, &o_restricted, "tools.read"));

    // --- `ztid-agent api fetch token`: the agent's own CLI as a workload (its entry
    // selects the ztid-agent executable) makes the same mTLS exchange. ---
    let cli_id = format!("spiffe://{TD}/agent-cli");
    let agent_exe = std::fs::canonicalize(bin("ztid-agent")).unwrap();
    env.server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &cli_id,
        "--parent-id",
        &env.agent.spiffe_id,
        "--selector",
        &format!("unix:path:{}", agent_exe.display()),
    ]);
    env.server.cli_ok(&[
        "grant",
        "create",
        "--spiffe-id",
        &cli_id,
        "--audience",
        &mcp_url,
        "--scope",
        "tools.read",
    ]);
    let fetch_token = |scope: &str| {
        env.agent.cli(&[
            "api",
            "fetch",
            "token",
            "--resource",
            &mcp_url,
            "--scope",
            scope,
            "--token-endpoint",
            &env.issuer,
            "--output",
            "json",
        ])
    };
    // Until the entry reaches the agent the CLI holds no SVID and asks nothing.
    let r = wait_for("ztid-agent api fetch token", READY_TIMEOUT, || {
        let r = fetch_token("tools.read");
        r.ok.then_some(r)
    });
    env.tally(true);
    let answer: Value = serde_json::from_str(&r.stdout).expect("the endpoint's JSON");
    let t = claims_of(answer["access_token"].as_str().unwrap());
    assert!(
        t["sub"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{cli_id}/")),
        "{t}"
    );
    assert!(
        t["cnf"]["x5t#S256"].is_string(),
        "bound to the CLI's SVID: {t}"
    );
    let r = fetch_token("tools.write");
    env.tally(false);
    assert!(
        !r.ok && r.stderr.contains("token endpoint refused: invalid_scope"),
        "{r:?}"
    );

    // --- The MCP server (FastMCP's own verifier) on each token, in one client process:
    // the delegated token is accepted, the others refused with their cause. ---
    let exp = claims_of(&brief_token)["exp"].as_u64().unwrap();
    wait_for("the 1 s token to expire", READY_TIMEOUT, || {
        (now() > exp).then_some(())
    });
    let calls = json!([
        {"token": c_token, "tool": "read_notes"},
        {"token": read_token, "tool": "write_note", "args": {"text": "x"}},
        {"token": other_token, "tool": "read_notes"},
        {"token": brief_token, "tool": "read_notes"},
    ]);
    let v = run(
        &subsub,
        "calls",
        vec![
            "--mcp".into(),
            mcp_url.clone(),
            "--calls".into(),
            calls.to_string(),
        ],
    );
    let results = v["results"].as_array().expect("results");
    assert_eq!(
        results[0]["ok"], true,
        "the delegated token calls read_notes: {v}"
    );
    assert_eq!(
        results[1]["ok"], false,
        "write_note without tools.write: {v}"
    );
    assert!(
        results[1]["reason"]
            .as_str()
            .unwrap()
            .contains("insufficient scope (required: tools.write)"),
        "the MCP server names the missing scope: {v}"
    );
    for (i, cause) in [(2, "audience mismatch"), (3, "token expired")] {
        assert_eq!(results[i]["ok"], false, "{cause}: {v}");
        assert_eq!(results[i]["http_status"], 401, "{cause}: {v}");
        assert!(
            results[i]["www_authenticate"]
                .as_str()
                .unwrap()
                .contains("invalid_token"),
            "{v}"
        );
        assert!(
            mcp.log().contains(cause),
            "FastMCP's verifier names the cause ({cause}):\n{}",
            mcp.log()
        );
    }

    // --- Independent checks from the metadata and JWKS alone: PyJWT and jsonwebtoken. ---
    let out = Command::new(python())
        .arg(script("sts_verify.py"))
        .args(["--issuer", &env.issuer, "--bundle"])
        .arg(&env.bundle)
        .args(["--audience", &mcp_url])
        .args([&read_token, &c_token, &other_token, &brief_token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pyjwt: Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = pyjwt["results"].as_array().unwrap();
    for r in &results[..2] {
        assert_eq!(r["ok"], true, "PyJWT accepts the token: {pyjwt}");
        assert_eq!(r["header"]["typ"], "at+jwt");
        assert_eq!(r["header"]["alg"], "ES256");
    }
    assert!(
        results[2]["error"].as_str().unwrap().contains("Audience"),
        "PyJWT refuses another resource's token: {pyjwt}"
    );
    assert!(
        results[3]["error"].as_str().unwrap().contains("xpired"),
        "PyJWT refuses the expired token: {pyjwt}"
    );
    for t in [&read_token, &c_token] {
        let claims = env.rust_verify(t, &mcp_url).expect("jsonwebtoken accepts");
        assert_eq!(claims["scope"], "tools.read");
    }
    assert!(env
        .rust_verify(&other_token, &mcp_url)
        .unwrap_err()
        .contains("Audience"));
    assert!(env
        .rust_verify(&brief_token, &mcp_url)
        .unwrap_err()
        .contains("Expired"));

    // --- Bad input: a clear OAuth error each, nothing issued. ---
    let exchange_form = |subject: &str, subject_type: &str| {
        form(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("resource", &mcp_url),
            ("subject_token", subject),
            ("subject_token_type", subject_type),
        ])
    };
    let (st, v) = env.token_post(b"grant_type=%ZZ&resource=x", Some(a1));
    assert_eq!(st, 400);
    refused(&v, "invalid_request", "percent-escape");
    let (st, v) = env.token_post(
        form(&[("grant_type", "client_credentials"), ("resource", &mcp_url)]).as_bytes(),
        Some(a1),
    );
    assert_eq!(st, 400);
    refused(
        &v,
        "unsupported_grant_type",
        "client_credentials is not supported",
    );
    let (st, v) = env.token_post(exchange_form(&"a".repeat(9000), JWT_TYPE).as_bytes(), None);
    assert_eq!(st, 400);
    refused(&v, "invalid_request", "token too large");
    let none_jwt = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(
            json!({"sub": a1_id, "aud": [env.issuer], "exp": now() + 300, "iat": now()})
                .to_string()
        )
    );
    let (st, v) = env.token_post(exchange_form(&none_jwt, JWT_TYPE).as_bytes(), None);
    // The design allows either code (the caller failed to authenticate, or its token is
    // invalid); the cause must be the algorithm.
    let code = v["error"].as_str().unwrap_or_default().to_string();
    assert!(
        ["invalid_client", "invalid_grant"].contains(&code.as_str()),
        "alg none: {st} {v}"
    );
    refused(&v, &code, "unsupported algorithm");
    // A JWT-SVID where an access token this server issued is expected.
    let jwt_svid = std::fs::read_to_string(o.join("jwt.txt")).unwrap();
    let (st, v) = env.token_post(
        exchange_form(jwt_svid.trim(), ACCESS_TOKEN_TYPE).as_bytes(),
        Some(b),
    );
    assert_eq!(st, 400, "{v}");
    refused(&v, "invalid_grant", "not an access token");
    // Tokens signed by a key of another trust domain, naming one of ours or one of its.
    for sub_claim in [a1_id.clone(), "spiffe://other.org/agent".to_string()] {
        let forged = foreign_jwt(&json!({
            "sub": sub_claim, "aud": [env.issuer], "exp": now() + 300, "iat": now()
        }));
        let (st, v) = env.token_post(exchange_form(&forged, JWT_TYPE).as_bytes(), None);
        assert_eq!(st, 401, "{sub_claim}: {v}");
        let cause = if sub_claim.starts_with("spiffe://other.org/") {
            "no bundle for trust domain other.org"
        } else {
            "is not in the bundle of example.org"
        };
        refused(&v, "invalid_client", cause);
    }

    // --- The kill switch: a revoked instance is refused and its tokens go inactive. ---
    let v = run(
        &tool_agent,
        "exchange",
        with(&["--scope", "tools.read", "--save", &a2s]),
    );
    let a2_token = granted(&v);
    let a2_id = id_in(a2);
    assert_ne!(a2_id, a1_id, "a second process is a second instance");
    assert_eq!(env.introspect(&a2_token, a1)["active"], true);
    env.server
        .cli_ok(&["instance", "revoke", &a2_id, "--reason", "e2e kill switch"]);
    let start = Instant::now();
    let v = loop {
        let v = run(
            &tool_agent,
            "exchange",
            with(&["--scope", "tools.read", "--load", &a2s]),
        );
        if v["ok"] == false || start.elapsed() > READY_TIMEOUT {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    refused(&v, "unauthorized_client", "revoked by an operator");
    let info = env.introspect(&a2_token, a1);
    assert_eq!(info, json!({"active": false}), "a revoked instance's token");
    assert_eq!(
        env.introspect(&read_token, a1)["active"],
        true,
        "another instance of the same entry is untouched"
    );
    // Revoking an actor deactivates every token with it in the act chain.
    assert_eq!(env.introspect(&c_token, a1)["active"], true);
    env.server.cli_ok(&[
        "instance",
        "revoke",
        &b_id,
        "--reason",
        "e2e: the sub-agent",
    ]);
    let info = wait_for("the chain's token to go inactive", READY_TIMEOUT, || {
        let info = env.introspect(&c_token, a1);
        (info["active"] == false).then_some(info)
    });
    assert_eq!(info, json!({"active": false}));
    assert_eq!(
        env.introspect(&o_token, a1)["active"],
        true,
        "the orchestrator's own token is untouched"
    );

    // --- Audit: one receipt per exchange attempt, and the log verifies. ---
    let (want_granted, want_refused) = (env.granted.get(), env.refused.get());
    let count = |t: &str| env.audit_events().iter().filter(|e| e["type"] == t).count();
    wait_for("a receipt for every exchange", READY_TIMEOUT, || {
        (count("token_exchanged") >= want_granted && count("token_refused") >= want_refused)
            .then_some(())
    });
    assert_eq!(
        count("token_exchanged"),
        want_granted,
        "one receipt per token issued"
    );
    assert_eq!(
        count("token_refused"),
        want_refused,
        "one receipt per refusal"
    );
    drop(mcp);
    drop(bound_server);
    let mut env = env;
    env.server.proc.as_mut().unwrap().stop();
    let data_dir = env.server.data_dir();
    let verify = || -> CliResult {
        Command::new(bin("ztid-server"))
            .args(["audit", "verify", "--data-dir", data_dir.to_str().unwrap()])
            .output()
            .unwrap()
            .into()
    };
    let ok = verify();
    assert!(ok.ok && ok.stdout.contains("audit log OK"), "{ok:?}");
    // Editing one receipt (the scope it records) is detected.
    let path = data_dir.join("audit/audit.log");
    let orig = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = orig.lines().map(str::to_string).collect();
    let i = lines
        .iter()
        .position(|l| l.contains("token_exchanged") && l.contains("tools.read"))
        .expect("a token_exchanged receipt naming tools.read");
    lines[i] = lines[i].replacen("tools.read", "tools.write", 1);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let r = verify();
    assert!(!r.ok && r.stderr.contains("does not chain"), "{r:?}");
    std::fs::write(&path, orig).unwrap();
    // Who obtained what on whose behalf, offline: every token issued with the
    // orchestrator as subject (its two own, the sub-agent's two, the sub-sub-agent's).
    let shown = Command::new(bin("ztid-server"))
        .args(["audit", "show", "--subject", &orchestrator.spiffe_id])
        .args([
            "--type",
            "token_exchanged",
            "--output",
            "json",
            "--data-dir",
        ])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(shown.status.success(), "{shown:?}");
    let receipts: Vec<Value> = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON record a line"))
        .collect();
    assert_eq!(
        receipts.len(),
        5,
        "receipts naming the orchestrator: {receipts:#?}"
    );
    let texts: Vec<String> = receipts.iter().map(Value::to_string).collect();
    for id in [&o_id, &b_id, &c_id] {
        assert!(
            texts.iter().any(|t| t.contains(id.as_str())),
            "{id} is named in the orchestrator's receipts"
        );
    }
}
