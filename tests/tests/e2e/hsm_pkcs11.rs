//! The CA's keys in a real PKCS#11 token, end to end: `ztid-server run
//! --key-manager pkcs11` against SoftHSM2 (Debian's `softhsm2`, installed by
//! `scripts/install-deps.sh`), a real agent and workload, and OpenSC's
//! `pkcs11-tool` as an independent reader of the token.
//!
//! SoftHSM2 finds its tokens through `SOFTHSM2_CONF`; this process sets it once,
//! before spawning anything, and the server, the agent and `pkcs11-tool` inherit it.

use ztid_test_support::softhsm as support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use spiffe::{JwtSvid, WorkloadApiClient};
use support::{init_tokens, module};
use x509_parser::prelude::{FromDer, X509Certificate};
use ztid_ca::datastore::{DataStore, SledStore};
use ztid_tests::*;

const TD: &str = "example.org";
const PIN: &str = "1234";
/// The token the server uses, and the one the refusals must leave empty.
const CA_TOKEN: &str = "e2e-ca";
const NEG_TOKEN: &str = "e2e-neg";

/// Held for the whole of each test that uses the shared SoftHSM2 directory: SoftHSM2
/// reads every token of its token directory at C_Initialize, and a token file another
/// process is writing at that moment fails that read (`GetTokenInfo`), so these tests
/// take turns.
static SOFTHSM_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// SoftHSM2 for this process: a config in a temp dir, its tokens initialised, and a
/// PIN file (0600). Returns the scratch directory.
fn softhsm() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        init_tokens(dir.path(), &[CA_TOKEN, NEG_TOKEN], PIN, "5678");
        write_private(&dir.path().join("pin"), &format!("{PIN}\n"));
        write_private(&dir.path().join("wrong-pin"), "wrongpin-98761\n");
        dir
    })
    .path()
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `pkcs11-tool --module M --token-label TOKEN --login --pin 1234 ARGS`.
fn pkcs11_tool(token: &str, args: &[&str]) -> Output {
    Command::new("pkcs11-tool")
        .arg("--module")
        .arg(module())
        .args(["--token-label", token, "--login", "--pin", PIN])
        .args(args)
        .output()
        .expect(
            "pkcs11-tool must be installed: run scripts/install-deps.sh (Debian package opensc)",
        )
}

/// The private keys in `token` as `pkcs11-tool` lists them: (label, access line).
fn token_private_keys(token: &str) -> Vec<(String, String)> {
    let out = pkcs11_tool(token, &["--list-objects", "--type", "privkey"]);
    assert!(
        out.status.success(),
        "pkcs11-tool --list-objects: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut keys = Vec::new();
    let mut label = None;
    for line in text.lines() {
        if line.starts_with("Private Key Object") {
            label = None;
        } else if let Some(l) = line.trim().strip_prefix("label:") {
            label = Some(l.trim().to_string());
        } else if let Some(a) = line.trim().strip_prefix("Access:") {
            keys.push((
                label.clone().expect("label before access"),
                a.trim().to_string(),
            ));
        }
    }
    keys
}

/// Exactly one X.509 and one JWT authority key (labelled by the authority ids).
fn assert_authority_keys(keys: &[(String, String)]) {
    let count = |prefix: &str| keys.iter().filter(|(l, _)| l.starts_with(prefix)).count();
    assert_eq!(
        (count("x509-"), count("jwt-")),
        (1, 1),
        "one X.509 and one JWT authority key: {keys:?}"
    );
}

/// The token's public key for `label` as DER SubjectPublicKeyInfo, read by `pkcs11-tool`.
fn token_public_key(token: &str, label: &str) -> Vec<u8> {
    let file = tempfile::NamedTempFile::new().unwrap();
    let out = pkcs11_tool(
        token,
        &[
            "--read-object",
            "--type",
            "pubkey",
            "--label",
            label,
            "--output-file",
            &file.path().display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "pkcs11-tool --read-object {label}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(file.path()).unwrap()
}

fn pkcs11_args<'a>(token: &'a str, pin_file: &'a str, module: &'a str) -> Vec<&'a str> {
    vec![
        "--key-manager",
        "pkcs11",
        "--pkcs11-module",
        module,
        "--pkcs11-token",
        token,
        "--pkcs11-pin-file",
        pin_file,
    ]
}

/// Fails if any regular file under `dir` holds an EC private key: PEM armour, a
/// PKCS#8 `PrivateKeyInfo` for id-ecPublicKey, or a SEC1 `ECPrivateKey` for P-256.
fn assert_no_private_key_under(dir: &Path) {
    // PrivateKeyInfo: version 0, then AlgorithmIdentifier { id-ecPublicKey, ... }.
    const PKCS8_EC: &[u8] = &[
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
    ];
    // ECPrivateKey: version 1, OCTET STRING of 32 bytes ...
    const SEC1_HEAD: &[u8] = &[0x02, 0x01, 0x01, 0x04, 0x20];
    // ... then [0] { prime256v1 }.
    const SEC1_PARAMS: &[u8] = &[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let ft = entry.file_type().unwrap();
            if ft.is_dir() {
                assert_ne!(
                    entry.file_name(),
                    "keys",
                    "no software key directory with the pkcs11 key manager: {}",
                    path.display()
                );
                stack.push(path);
                continue;
            }
            if !ft.is_file() {
                continue; // the admin socket
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
            assert!(
                !has(b"PRIVATE KEY"),
                "PEM private key in {}",
                path.display()
            );
            assert!(
                !has(PKCS8_EC),
                "PKCS#8 EC private key in {}",
                path.display()
            );
            let sec1 = bytes
                .windows(SEC1_HEAD.len() + 32 + SEC1_PARAMS.len())
                .any(|w| w.starts_with(SEC1_HEAD) && w.ends_with(SEC1_PARAMS));
            assert!(!sec1, "SEC1 EC private key in {}", path.display());
        }
    }
    assert!(files > 0, "the data directory holds the datastore");
}

async fn fetch_when_ready(c: &WorkloadApiClient) -> spiffe::X509Svid {
    let start = Instant::now();
    loop {
        match c.fetch_x509_svid().await {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    start.elapsed() < READY_TIMEOUT,
                    "no SVID after {READY_TIMEOUT:?}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Verifies `leaf_der`'s signature with the CA certificate's key, and its issuer.
fn assert_signed_by(leaf_der: &[u8], ca_der: &[u8], what: &str) {
    let (_, leaf) = X509Certificate::from_der(leaf_der).unwrap();
    let (_, ca) = X509Certificate::from_der(ca_der).unwrap();
    assert_eq!(leaf.issuer(), ca.subject(), "{what}: issuer is the CA");
    leaf.verify_signature(Some(ca.public_key()))
        .unwrap_or_else(|e| panic!("{what} does not verify against the bundle's CA: {e}"));
}

fn b64url(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_signs_every_svid_with_keys_that_live_only_in_the_token() {
    let _turn = SOFTHSM_TURN.lock().await;
    let dir = softhsm();
    let (pin, m) = (
        dir.join("pin").display().to_string(),
        module().display().to_string(),
    );
    let mut server = Server::start_with(TD, &pkcs11_args(CA_TOKEN, &pin, &m));

    // The token holds the authorities' keys: sensitive and never extractable.
    // (Other server keys, such as the audit log's, may sit beside them: every key
    // the server made must be locked in the token alike.)
    let keys = token_private_keys(CA_TOKEN);
    assert_authority_keys(&keys);
    for (label, access) in &keys {
        let flags: Vec<&str> = access.split(", ").collect();
        for want in ["sensitive", "always sensitive", "never extractable"] {
            assert!(
                flags.contains(&want),
                "{label}: {want} missing in {access:?}"
            );
        }
        assert!(!flags.contains(&"extractable"), "{label} is extractable");
    }
    let token_spkis: Vec<Vec<u8>> = keys
        .iter()
        .map(|(label, _)| token_public_key(CA_TOKEN, label))
        .collect();

    // The bundle's CA certificate carries a token key; its JWT key is the other one.
    let bundle: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    let jwks = bundle["keys"].as_array().expect("keys");
    let x509: Vec<&serde_json::Value> = jwks.iter().filter(|k| k["use"] == "x509-svid").collect();
    assert_eq!(x509.len(), 1, "one X.509 authority");
    let ca_der = base64::engine::general_purpose::STANDARD
        .decode(x509[0]["x5c"][0].as_str().unwrap())
        .unwrap();
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let ca_spki = ca.public_key().raw.to_vec();
    assert!(
        token_spkis.contains(&ca_spki),
        "the CA certificate's public key is a token key"
    );
    let jwt_key = jwks
        .iter()
        .find(|k| k["use"] == "jwt-svid")
        .expect("a JWT authority");
    let mut jwt_point = vec![0x04];
    jwt_point.extend(b64url(jwt_key["x"].as_str().unwrap()));
    jwt_point.extend(b64url(jwt_key["y"].as_str().unwrap()));
    assert!(
        token_spkis
            .iter()
            .any(|s| s != &ca_spki && s.ends_with(&jwt_point)),
        "the JWT authority's key is the token's other key"
    );

    // An agent attests and a workload fetches: every certificate verifies against
    // the bundle, so the token signed them.
    let agent = Agent::start(&server);
    let agent_pem = std::fs::read_to_string(agent.data_dir().join("agent_svid.pem")).unwrap();
    let agent_der = pem::parse(agent_pem).unwrap().into_contents();
    assert_signed_by(&agent_der, &ca_der, "agent SVID");
    entry_for_my_uid(&server, &agent, "spiffe://example.org/hsm-workload", &[]);
    let c = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("connect");
    let svid = fetch_when_ready(&c).await;
    assert!(svid
        .spiffe_id()
        .to_string()
        .starts_with("spiffe://example.org/hsm-workload/"));
    assert_signed_by(svid.leaf().as_bytes(), &ca_der, "workload X509-SVID");
    let bundles = c.fetch_x509_bundles().await.unwrap();
    let own = bundles
        .get(&spiffe::TrustDomain::new(TD).unwrap())
        .expect("own bundle");
    assert_eq!(own.authorities()[0].as_bytes(), &ca_der[..]);

    // JWT-SVIDs are signed by the token too (the fixed r||s path) and validate offline.
    let jwt = c.fetch_jwt_svid(["db"], None).await.expect("JWT-SVID");
    let jwt_bundles = c.fetch_jwt_bundles().await.unwrap();
    JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["db"])
        .expect("JWT-SVID validates against the JWT bundle");

    // No CA private key anywhere in the data directory.
    assert_no_private_key_under(&server.data_dir());

    // A restart logs in again and finds the same keys: same CA, and new agents attest.
    server.restart();
    let after: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    assert_eq!(after, bundle, "same authorities after a restart");
    let agent2 = Agent::start(&server);
    let pem2 = std::fs::read_to_string(agent2.data_dir().join("agent_svid.pem")).unwrap();
    assert_signed_by(
        &pem::parse(pem2).unwrap().into_contents(),
        &ca_der,
        "agent SVID after restart",
    );
    assert_eq!(token_private_keys(CA_TOKEN), keys, "no new keys on restart");
    assert_no_private_key_under(&server.data_dir());
}

/// Runs `ztid-server run` that must fail fast; returns its stderr.
fn run_must_fail(data_dir: &Path, extra: &[&str]) -> String {
    let mut child = Command::new(bin("ztid-server"))
        .arg("run")
        .args(["--trust-domain", TD, "--data-dir"])
        .arg(data_dir)
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(extra)
        .env_remove("ZTID_PKCS11_PIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ztid-server");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ztid-server kept running; it must refuse to start:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let out = child.wait_with_output().unwrap();
    assert!(!status.success(), "ztid-server must exit non-zero");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The one `error:` line of a failed run.
fn error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "exactly one error line:\n{stderr}");
    lines[0]
}

fn assert_no_ca_state(data_dir: &Path) {
    if data_dir.join("datastore").exists() {
        let store = SledStore::open(&data_dir.join("datastore")).expect("open datastore");
        assert!(
            store.load_ca_state().unwrap().is_none(),
            "no authority was created"
        );
    }
    if data_dir.exists() {
        assert_no_private_key_under_or_empty(data_dir);
    }
    assert!(
        token_private_keys(NEG_TOKEN).is_empty(),
        "nothing was created in the token"
    );
}

fn assert_no_private_key_under_or_empty(dir: &Path) {
    assert!(!dir.join("keys").exists(), "no software key directory");
    let has_files = std::fs::read_dir(dir).unwrap().next().is_some();
    if has_files {
        assert_no_private_key_under(dir);
    }
}

#[test]
fn wrong_pin_missing_token_or_open_pin_file_refuse_to_start() {
    let _turn = SOFTHSM_TURN.blocking_lock();
    let dir = softhsm();
    let m = module().display().to_string();
    let scratch = tempfile::tempdir().unwrap();

    // A wrong PIN: one clear line naming the PIN problem, never the PIN.
    let data = scratch.path().join("wrong-pin");
    let wrong = dir.join("wrong-pin").display().to_string();
    let stderr = run_must_fail(&data, &pkcs11_args(NEG_TOKEN, &wrong, &m));
    let line = error_line(&stderr);
    assert!(
        line.contains("PIN is incorrect") && line.contains(NEG_TOKEN),
        "{line}"
    );
    assert!(
        !stderr.contains("wrongpin-98761"),
        "the PIN leaked:\n{stderr}"
    );
    assert_no_ca_state(&data);

    // A token that is not there: named, with the tokens that are.
    let data = scratch.path().join("missing-token");
    let pin = dir.join("pin").display().to_string();
    let stderr = run_must_fail(&data, &pkcs11_args("e2e-absent", &pin, &m));
    let line = error_line(&stderr);
    assert!(line.contains("no token labelled \"e2e-absent\""), "{line}");
    assert!(
        line.contains(CA_TOKEN) || line.contains(NEG_TOKEN),
        "{line}"
    );
    assert_no_ca_state(&data);

    // A PIN file others can read is refused before the token is touched.
    let open_pin = scratch.path().join("open-pin");
    std::fs::write(&open_pin, "open-55667788\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open_pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let data = scratch.path().join("open-pin-file");
    let open_pin = open_pin.display().to_string();
    let stderr = run_must_fail(&data, &pkcs11_args(NEG_TOKEN, &open_pin, &m));
    let line = error_line(&stderr);
    assert!(
        line.contains("PIN file") && line.contains("chmod 600"),
        "{line}"
    );
    assert!(
        !stderr.contains("open-55667788"),
        "the PIN leaked:\n{stderr}"
    );
    assert_no_ca_state(&data);

    // The same token with the right PIN works afterwards: the refusals changed nothing.
    let server = Server::start_with(TD, &pkcs11_args(NEG_TOKEN, &pin, &m));
    assert_authority_keys(&token_private_keys(NEG_TOKEN));
    drop(server);
}
