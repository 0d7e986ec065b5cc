//! The Workload API end to end: real server, real agent, real socket, and
//! off-the-shelf SPIFFE clients (the `spiffe` crate, py-spiffe, openssl).

use std::time::Duration;

use spiffe::{JwtSvid, SpiffeId, WorkloadApiClient};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};
use ztid_tests::*;

const TD: &str = "example.org";

async fn client(agent: &Agent) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("connect to the agent socket")
}

/// Waits until this process is entitled (entries reach the agent by sync).
async fn fetch_when_ready(c: &WorkloadApiClient) -> spiffe::X509Svid {
    let start = std::time::Instant::now();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_svid_meets_every_rule_and_chains_with_openssl() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(&server, &agent, "spiffe://example.org/planner", &[]);
    let c = client(&agent).await;
    let svid = fetch_when_ready(&c).await;

    let prefix = "spiffe://example.org/planner/";
    let id = svid.spiffe_id().to_string();
    assert!(
        id.starts_with(prefix),
        "per-instance ID {id} extends the entry's ID"
    );
    assert_eq!(id.len(), prefix.len() + 32, "one 128-bit instance segment");

    let leaf_der = svid.leaf().as_bytes();
    let (_, leaf) = X509Certificate::from_der(leaf_der).unwrap();
    let mut uris = 0;
    let mut saw = (false, false, false);
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                uris += san
                    .general_names
                    .iter()
                    .filter(|n| matches!(n, GeneralName::URI(_)))
                    .count();
            }
            ParsedExtension::BasicConstraints(bc) => {
                assert!(!bc.ca, "leaf must not be a CA");
                saw.0 = true;
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ext.critical, "keyUsage must be critical");
                assert!(ku.digital_signature());
                assert!(
                    !ku.key_cert_sign()
                        && !ku.crl_sign()
                        && !ku.key_encipherment()
                        && !ku.key_agreement()
                );
                saw.1 = true;
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                saw.2 = true;
            }
            _ => {}
        }
    }
    assert_eq!(uris, 1, "exactly one URI SAN");
    assert_eq!(
        saw,
        (true, true, true),
        "basicConstraints, keyUsage and EKU present"
    );
    let serial = leaf.raw_serial();
    assert!(
        serial.len() >= 8 && serial.iter().take(8).any(|b| *b != 0),
        "serial carries at least 64 bits"
    );
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        (3600..=3600 + 15).contains(&lifetime),
        "default TTL of 1h (+ backdating), got {lifetime}"
    );

    // The CA's own expiry bounds the SVID.
    let bundles = c.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let bundle = bundles.get(&td).expect("own trust domain bundle");
    let (_, ca) = X509Certificate::from_der(bundle.authorities()[0].as_bytes()).unwrap();
    assert!(leaf.validity().not_after <= ca.validity().not_after);
    assert!(
        ca.subject()
            .to_string()
            .contains(&hex::encode(ca.raw_serial())),
        "CA subject carries its serial"
    );

    // openssl cross-checks the chain against the bundle.
    let dir = tempfile::tempdir().unwrap();
    let leaf_pem = dir.path().join("leaf.pem");
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(
        &leaf_pem,
        pem::encode(&pem::Pem::new("CERTIFICATE", leaf_der.to_vec())),
    )
    .unwrap();
    std::fs::write(
        &ca_pem,
        pem::encode(&pem::Pem::new(
            "CERTIFICATE",
            bundle.authorities()[0].as_bytes().to_vec(),
        )),
    )
    .unwrap();
    let v = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        ca_pem.to_str().unwrap(),
        leaf_pem.to_str().unwrap(),
    ]);
    assert!(
        v.ok && v.stdout.contains(": OK"),
        "openssl verify: {} {}",
        v.stdout,
        v.stderr
    );

    // The key in the response belongs to the certificate.
    let spki = leaf.public_key().subject_public_key.data.to_vec();
    let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        svid.private_key().as_ref(),
        &ring::rand::SystemRandom::new(),
    )
    .expect("PKCS#8 P-256 key");
    assert_eq!(
        ring::signature::KeyPair::public_key(&kp).as_ref(),
        &spki[..]
    );

    // The server logged the issuance with serial and agent.
    let log = server.log_text();
    assert!(
        log.contains("x509_svid_issued") && log.contains(&hex::encode(serial)),
        "issuance is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svid_validates_via_api_and_independently() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(
        &server,
        &agent,
        "spiffe://example.org/planner",
        &["--jwt-ttl", "120"],
    );
    let c = client(&agent).await;
    let x509 = fetch_when_ready(&c).await;

    let jwt = c
        .fetch_jwt_svid(["db", "cache"], None)
        .await
        .expect("JWT-SVID");
    assert_eq!(
        jwt.spiffe_id(),
        x509.spiffe_id(),
        "the JWT names the same instance identity"
    );
    assert!(!jwt.key_id().is_empty(), "kid is set");
    let lifetime = jwt.expiry().unix_timestamp()
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!(
        (100..=120).contains(&lifetime),
        "entry JWT TTL applies, got {lifetime}"
    );

    // Through the agent.
    let validated = c
        .validate_jwt_token("db", jwt.token())
        .await
        .expect("ValidateJWTSVID accepts");
    assert_eq!(validated.spiffe_id(), jwt.spiffe_id());
    let err = c
        .validate_jwt_token("web", jwt.token())
        .await
        .expect_err("wrong audience refused");
    assert!(format!("{err:?}").contains("audience"), "{err:?}");

    // Independently, with the JWT bundle only.
    let bundles = c.fetch_jwt_bundles().await.expect("JWT bundles");
    let offline = JwtSvid::parse_and_validate(jwt.token(), &bundles, &["cache"])
        .expect("verifies with the JWT bundle");
    assert_eq!(offline.spiffe_id(), jwt.spiffe_id());
    assert!(JwtSvid::parse_and_validate(jwt.token(), &bundles, &["other"]).is_err());

    // Asking for an identity the caller does not hold.
    let other = SpiffeId::new("spiffe://example.org/admin").unwrap();
    let err = c
        .fetch_jwt_svid(["db"], Some(&other))
        .await
        .expect_err("foreign SPIFFE ID refused");
    assert!(
        format!("{err:?}").contains("NoIdentityIssued"),
        "PermissionDenied maps to NoIdentityIssued: {err:?}"
    );
}

fn fetch_as_process(agent: &Agent, dir: &std::path::Path) -> serde_json::Value {
    fetch_x509_as_process(agent, "entry to reach the agent", dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_get_distinct_identities_and_shared_entries_one() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(&server, &agent, "spiffe://example.org/worker", &[]);
    let agent_bin = bin("ztid-agent");
    let path_sel = format!(
        "unix:path:{}",
        std::fs::canonicalize(&agent_bin).unwrap().display()
    );
    server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/shared-tool",
        "--parent-id",
        &agent.spiffe_id,
        "--selector",
        &path_sel,
        "--shared",
    ]);

    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Wait until both entries are there, then run two separate processes.
    wait_for("both entries at the agent", READY_TIMEOUT, || {
        let v = fetch_as_process(&agent, d1.path());
        (v["svids"].as_array().map(|a| a.len()) == Some(2)).then_some(())
    });
    let a = fetch_as_process(&agent, d1.path());
    let b = fetch_as_process(&agent, d2.path());
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["svids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["spiffe_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (ia, ib) = (ids(&a), ids(&b));
    let per_a = ia
        .iter()
        .find(|i| i.starts_with("spiffe://example.org/worker/"))
        .expect("per-instance SVID");
    let per_b = ib
        .iter()
        .find(|i| i.starts_with("spiffe://example.org/worker/"))
        .expect("per-instance SVID");
    assert_ne!(per_a, per_b, "two processes get two identities");
    assert!(ia.contains(&"spiffe://example.org/shared-tool".to_string()));
    assert!(ib.contains(&"spiffe://example.org/shared-tool".to_string()));

    let key_of = |dir: &std::path::Path, id: &str, ids: &[String]| {
        let i = ids.iter().position(|x| x == id).unwrap();
        std::fs::read(dir.join(format!("svid.{i}.key"))).unwrap()
    };
    assert_ne!(
        key_of(d1.path(), per_a, &ia),
        key_of(d2.path(), per_b, &ib),
        "per-instance keys differ"
    );
    assert_eq!(
        key_of(d1.path(), "spiffe://example.org/shared-tool", &ia),
        key_of(d2.path(), "spiffe://example.org/shared-tool", &ib),
        "a shared entry gives both processes the same SVID"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d1.path().join("svid.0.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "written keys are owner-only");

    // The same process keeps its identity across calls.
    let c = client(&agent).await;
    let first = fetch_when_ready(&c).await;
    let second = c.fetch_x509_svid().await.unwrap();
    assert_eq!(first.spiffe_id(), second.spiffe_id());
    assert_ne!(first.spiffe_id().to_string(), *per_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_is_pushed_on_open_stream_before_expiry() {
    use futures::StreamExt;
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(
        &server,
        &agent,
        "spiffe://example.org/short",
        &["--x509-ttl", "6"],
    );
    let c = client(&agent).await;
    fetch_when_ready(&c).await;
    let mut stream = c.stream_x509_svids().await.expect("stream");
    let first = stream.next().await.expect("first message").expect("svid");
    let (_, cert) = X509Certificate::from_der(first.leaf().as_bytes()).unwrap();
    let first_serial = cert.raw_serial().to_vec();
    let first_expiry = cert.validity().not_after.timestamp();
    let next = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("a rotated SVID is pushed")
        .expect("stream open")
        .expect("svid");
    let pushed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (_, cert2) = X509Certificate::from_der(next.leaf().as_bytes()).unwrap();
    assert_ne!(cert2.raw_serial(), &first_serial[..], "a new certificate");
    assert_eq!(
        next.spiffe_id(),
        first.spiffe_id(),
        "same instance identity after rotation"
    );
    assert_ne!(
        next.private_key().as_ref(),
        first.private_key().as_ref(),
        "a new key"
    );
    assert!(
        pushed_at < first_expiry,
        "pushed at {pushed_at}, before the old one expired at {first_expiry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_keeps_ca_entries_and_agents() {
    let mut server = Server::start(TD);
    let agent = Agent::start(&server);
    let entry = entry_for_my_uid(&server, &agent, "spiffe://example.org/keep", &[]);
    let bundle_before = server.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    let agents_before = server.cli_ok(&["agent", "list", "--output", "json"]);
    server.restart();
    assert_eq!(
        server.cli_ok(&["bundle", "show", "--format", "spiffe"]),
        bundle_before,
        "same CA after restart"
    );
    assert_eq!(
        server.cli_ok(&["agent", "list", "--output", "json"]),
        agents_before,
        "same agents after restart"
    );
    let shown = server.cli_ok(&["entry", "show", &entry, "--output", "json"]);
    assert!(shown.contains("spiffe://example.org/keep"));
    // The running agent keeps working against the restarted server.
    let c = client(&agent).await;
    let svid = fetch_when_ready(&c).await;
    assert!(svid
        .spiffe_id()
        .to_string()
        .starts_with("spiffe://example.org/keep/"));
    let jwt = c
        .fetch_jwt_svid(["db"], None)
        .await
        .expect("minting after restart");
    assert_eq!(jwt.spiffe_id(), svid.spiffe_id());
}

#[test]
fn py_spiffe_fetches_and_validates_unmodified() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(&server, &agent, "spiffe://example.org/pyagent", &[]);
    wait_for("entry at the agent", READY_TIMEOUT, || {
        agent.cli(&["api", "fetch", "x509"]).ok.then_some(())
    });
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/py_spiffe_client.py");
    let out = std::process::Command::new(python())
        .arg(script)
        .arg(agent.endpoint())
        .arg("db")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "py-spiffe failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = v["x509_spiffe_id"].as_str().unwrap();
    assert!(id.starts_with("spiffe://example.org/pyagent/"), "{v}");
    assert_eq!(v["chain_length"], 1);
    assert_eq!(v["context_svids"], 1);
    assert_eq!(v["x509_bundle_authorities"], 1);
    assert_eq!(v["jwt_spiffe_id"], id);
    assert_eq!(v["validated_spiffe_id"], id);
    assert_eq!(v["offline_spiffe_id"], id);
    assert_eq!(v["wrong_audience_refused"], true);
}

/// The nice value of each thread of `pid`, by thread name.
fn thread_nice_values(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let dir = t.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name start at field 3 (state); nice is field 19.
        let nice = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16))
            .and_then(|v| v.parse().ok());
        if let Some(nice) = nice {
            out.push((comm.trim().to_string(), nice));
        }
    }
    out
}

/// The Workload API is answered on a thread of its own at the agent's priority; the
/// runtime's threads (syncs, renewals, refilling the SVID pool) run 10 nice levels
/// lower, so background work yields the CPU to answering a workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_runs_at_a_lower_priority_than_the_workload_api() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(&server, &agent, "spiffe://example.org/priority", &[]);
    let c = client(&agent).await;
    fetch_when_ready(&c).await;
    let threads = thread_nice_values(agent.proc.child.id());
    let main = threads
        .iter()
        .find(|(name, _)| name == "ztid-agent")
        .map(|(_, n)| *n)
        .expect("the agent's main thread");
    let api: Vec<i64> = threads
        .iter()
        .filter(|(name, _)| name == "workload-api")
        .map(|(_, n)| *n)
        .collect();
    assert!(!api.is_empty(), "a Workload API thread: {threads:?}");
    assert!(
        api.iter().all(|n| *n == main),
        "the Workload API's threads run at the agent's priority: {threads:?}"
    );
    let workers: Vec<i64> = threads
        .iter()
        .filter(|(name, _)| name == "tokio-runtime-w" || name == "tokio-rt-worker")
        .map(|(_, n)| *n)
        .collect();
    assert!(!workers.is_empty(), "runtime threads: {threads:?}");
    for n in workers {
        assert_eq!(
            n,
            (main + 10).min(19),
            "a runtime thread runs 10 nice levels lower: {threads:?}"
        );
    }
}
