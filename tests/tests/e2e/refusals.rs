//! Every bad input gets a clear error and changes nothing: each test asserts the
//! refusal and its reason, against real processes.

use std::sync::Arc;
use std::time::Duration;

use ztid_agent::node_client::connect;
use ztid_proto::node as pb;
use ztid_proto::workload::{self as wpb, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use ztid_spiffe::tls::{shared_roots, ServerSvidVerifier};
use ztid_tests::*;

const TD: &str = "example.org";

fn verifier(server: &Server) -> Arc<ServerSvidVerifier> {
    Arc::new(ServerSvidVerifier::new(
        shared_roots(bundle_roots(server)),
        format!("spiffe://{TD}/ztid/server"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_security_header_is_invalid_argument() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(&server, &agent, "spiffe://example.org/w", &[]);
    let channel = ztid_proto::transport::unix_channel(agent.socket())
        .await
        .unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let err = raw
        .fetch_x509svid(wpb::X509svidRequest {})
        .await
        .expect_err("refused without the header");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
    let err = raw
        .fetch_jwtsvid(wpb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // A wrong value is as bad as none.
    let mut req = tonic::Request::new(wpb::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "false".parse().unwrap());
    assert_eq!(
        raw.fetch_x509svid(req).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // The WIT profile is not offered, as the spec requires it to say.
    let mut req = tonic::Request::new(wpb::WitsvidRequest {
        spiffe_id: String::new(),
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    assert_eq!(
        raw.fetch_witsvid(req).await.unwrap_err().code(),
        tonic::Code::Unimplemented
    );
}

#[test]
fn caller_without_entry_is_permission_denied() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    // No entry at all for this uid.
    let r = agent.cli(&["api", "fetch", "x509"]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("PermissionDenied") && r.stderr.contains("no identity issued"),
        "{}",
        r.stderr
    );
    // An entry for another uid does not help this one.
    server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/other",
        "--parent-id",
        &agent.spiffe_id,
        "--selector",
        "unix:uid:4242",
    ]);
    // Proving an absence needs time to pass: one sync interval (1 s) plus margin.
    std::thread::sleep(Duration::from_millis(1500));
    let r = agent.cli(&["api", "fetch", "jwt", "--audience", "x"]);
    assert!(
        !r.ok && r.stderr.contains("no identity issued"),
        "{}",
        r.stderr
    );
    // A process of another uid is refused too.
    {
        let staging = other_uid::Staging::new(other_uid::NOBODY);
        // Staged a moment ago: spawned past a brief "text file busy" (another test
        // thread's fork may still hold the copy's write descriptor).
        let out = other_uid::output_staged(
            staging
                .command_as(
                    &staging.bin("ztid-agent"),
                    other_uid::NOBODY,
                    other_uid::NOBODY,
                )
                .args([
                    "api",
                    "fetch",
                    "x509",
                    "--socket",
                    agent.socket().to_str().unwrap(),
                ]),
        )
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("no identity issued"),
            "{stderr}"
        );
    }
    let log = std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap();
    assert!(log.contains("workload_refused"), "refusals are logged");
}

#[test]
fn expired_and_reused_join_tokens_are_refused() {
    let server = Server::start(TD);
    let short = server.cli_ok(&["token", "generate", "--ttl", "1", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&short).unwrap();
    let expires_at = v["expires_at"].as_i64().unwrap();
    wait_for("the token to expire", Duration::from_secs(5), || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (now >= expires_at).then_some(())
    });
    let err = Agent::start_with_token(&server, v["token"].as_str().unwrap())
        .err()
        .expect("expired token refused");
    assert!(err.contains("join token has expired"), "{err}");

    let token = server.token();
    let _first = Agent::start_with_token(&server, &token).expect("first use attests");
    let err = Agent::start_with_token(&server, &token)
        .err()
        .expect("second use refused");
    assert!(
        err.contains("join token is unknown or was already used"),
        "{err}"
    );
    let err = Agent::start_with_token(&server, "not-a-token")
        .err()
        .expect("unknown token refused");
    assert!(
        err.contains("join token is unknown or was already used"),
        "{err}"
    );
    assert!(
        !server.log_text().contains(&token),
        "tokens never reach the log"
    );
    let agents: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(
        agents.as_array().unwrap().len(),
        1,
        "refused attempts create no agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_api_refuses_foreign_csrs_and_callers_without_svid() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    let entry = entry_for_my_uid(&server, &agent, "spiffe://example.org/w", &["--shared"]);
    let addr = server.addr().parse().unwrap();

    // No client certificate: only Attest is reachable.
    let mut anon = connect(addr, verifier(&server), None).unwrap();
    let err = anon
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(err.message(), "node API call without an agent SVID");

    let svid = agent.own_svid();
    let mut client = connect(addr, verifier(&server), Some(svid.certified_key().unwrap())).unwrap();
    let sign = |csr: Vec<u8>| pb::SignX509SvidsRequest {
        requests: vec![pb::SvidRequest {
            entry_id: entry.clone(),
            csr,
        }],
    };
    let ok = client
        .sign_x509_svids(sign(csr_for("spiffe://example.org/w")))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(ok.results[0].result, Some(pb::svid_result::Result::Svid(_))),
        "the entitled identity is signed"
    );
    for (csr, reason) in [
        (csr_for("spiffe://example.org/admin"), "CSR asks for spiffe://example.org/admin, but the caller is entitled only to spiffe://example.org/w"),
        (csr_for(&format!("{}/x", agent.spiffe_id)), "reserved for ztid's own identities, issued only by the server"),
        (b"not a csr".to_vec(), "malformed CSR"),
    ] {
        let r = client.sign_x509_svids(sign(csr)).await.unwrap().into_inner();
        match &r.results[0].result {
            Some(pb::svid_result::Result::Error(e)) => assert!(e.contains(reason), "{e}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    let r = client
        .sign_x509_svids(pb::SignX509SvidsRequest {
            requests: vec![pb::SvidRequest {
                entry_id: "nope".into(),
                csr: csr_for("spiffe://example.org/w"),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(&r.results[0].result, Some(pb::svid_result::Result::Error(e)) if e.contains("entry nope does not exist"))
    );
    let r = client
        .mint_jwt_svids(pb::MintJwtSvidsRequest {
            requests: vec![pb::JwtRequest {
                entry_id: entry.clone(),
                spiffe_id: "spiffe://example.org/root".into(),
                audience: vec!["a".into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(&r.results[0].result, Some(pb::jwt_result::Result::Error(e)) if e.contains("entitled only"))
    );
    assert!(
        server.log_text().contains("x509_svid_refused"),
        "refusals are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_and_banned_agents_are_refused_on_their_next_call() {
    let server = Server::start(TD);
    let evicted = Agent::start(&server);
    let banned = Agent::start(&server);
    let addr = server.addr().parse().unwrap();
    let svid_e = evicted.own_svid();
    let svid_b = banned.own_svid();

    server.cli_ok(&["agent", "evict", &evicted.spiffe_id]);
    let mut c = connect(
        addr,
        verifier(&server),
        Some(svid_e.certified_key().unwrap()),
    )
    .unwrap();
    let err = c.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(
        err.message()
            .contains("is not attested (evicted or unknown)"),
        "{}",
        err.message()
    );

    server.cli_ok(&["agent", "ban", &banned.spiffe_id]);
    let mut c = connect(
        addr,
        verifier(&server),
        Some(svid_b.certified_key().unwrap()),
    )
    .unwrap();
    let err = c
        .sync_entries(pb::SyncEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("is banned"), "{}", err.message());

    // Both agents notice on their next sync and stop serving.
    let mut evicted = evicted;
    let status = wait_for("the evicted agent to stop", READY_TIMEOUT, || {
        evicted.proc.exited()
    });
    assert!(!status.success());
    assert!(evicted
        .proc
        .log_text()
        .contains("no longer recognises this agent"));
    assert!(
        !evicted.data_dir().join("agent_key.pk8").exists(),
        "an evicted agent forgets its credentials"
    );
    let mut banned = banned;
    assert!(
        !wait_for("the banned agent to stop", READY_TIMEOUT, || banned
            .proc
            .exited())
        .success()
    );
    let shown = server.cli_ok(&["agent", "show", &banned.spiffe_id, "--output", "json"]);
    assert!(shown.contains("\"banned\":true"));
}

#[test]
fn malformed_entries_are_refused_and_change_nothing() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    let before = server.cli_ok(&["entry", "list", "--output", "json"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--spiffe-id",
                "http://example.org/x",
                "--parent-id",
                &agent.spiffe_id,
                "--selector",
                "unix:uid:1",
            ],
            "not a canonical SPIFFE ID",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a/../b",
                "--parent-id",
                &agent.spiffe_id,
                "--selector",
                "unix:uid:1",
            ],
            "not a canonical SPIFFE ID",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://other.org/x",
                "--parent-id",
                &agent.spiffe_id,
                "--selector",
                "unix:uid:1",
            ],
            "not in trust domain example.org",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                &agent.spiffe_id,
                "--selector",
                "kube:ns:default",
            ],
            "unknown selector type \"kube\"",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                &agent.spiffe_id,
                "--selector",
                "unix:uid:abc",
            ],
            "bad value",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                &agent.spiffe_id,
                "--selector",
                "join-token:used",
            ],
            "cannot be used in a workload entry",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/ztid/agent/fake",
                "--parent-id",
                &agent.spiffe_id,
                "--selector",
                "unix:uid:1",
            ],
            "reserved",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                "spiffe://example.org/ztid/server",
                "--selector",
                "unix:uid:1",
            ],
            "is reserved and not an agent ID",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                &agent.spiffe_id,
                "--selector",
                "unix:uid:1",
                "--x509-ttl=-5",
            ],
            "x509 TTL",
        ),
    ];
    for (args, reason) in cases {
        let mut all = vec!["entry", "create"];
        all.extend_from_slice(args);
        let r = server.cli(&all);
        assert!(!r.ok, "{args:?} must be refused");
        assert!(
            r.stderr.contains(reason),
            "{args:?}: expected {reason:?}, got {}",
            r.stderr
        );
        assert_eq!(
            r.stderr.trim().lines().count(),
            1,
            "one clear line on stderr"
        );
    }
    let dup = [
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/x",
        "--parent-id",
        &agent.spiffe_id,
        "--selector",
        "unix:uid:1",
    ];
    server.cli_ok(&dup);
    let r = server.cli(&dup);
    assert!(
        !r.ok && r.stderr.contains("same SPIFFE ID, parent and selectors"),
        "{}",
        r.stderr
    );
    let after: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["entry", "list", "--output", "json"])).unwrap();
    assert_eq!(before, "[]");
    assert_eq!(
        after.as_array().unwrap().len(),
        1,
        "only the one valid entry was stored"
    );
    let r = server.cli(&["entry", "show", "0000"]);
    assert!(!r.ok && r.stderr.contains("entry 0000 does not exist"));
}

/// A process asking again and again for what it is refused writes a few refusal lines
/// to the agent's log, not one per request (each uid's refusal lines of one kind are
/// bounded per 10 s window; every refusal is still answered as one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_process_asking_in_a_loop_writes_a_few_log_lines() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    let channel = ztid_proto::transport::unix_channel(agent.socket())
        .await
        .unwrap();
    let mut client = SpiffeWorkloadApiClient::new(channel);
    const ASKED: usize = 200;
    for _ in 0..ASKED {
        let mut req = tonic::Request::new(wpb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        });
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        let err = client.fetch_jwtsvid(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().starts_with("no identity issued"), "{err}");
    }
    let log = std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("workload_refused"))
        .count();
    // 5 a window; the loop may span a few windows on a slow machine.
    assert!(
        (1..=ASKED / 10).contains(&lines),
        "{lines} refusal lines for {ASKED} refused requests"
    );
}

/// Whoever steals an X.509 authority's key from the server's disk can sign a
/// certificate for an agent's ID and current serial; with a key of their own it is
/// refused, because the agent's record binds its serial to the agent's key (and the
/// TLS handshake proves the caller holds the certificate's key). The agent's own SVID
/// keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_forged_with_a_stolen_authority_key_is_not_the_agent() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    let addr = server.addr().parse().unwrap();
    let genuine = agent.own_svid();
    let genuine_leaf = genuine.chain[0].clone();
    let serial = ztid_spiffe::svid::serial_hex(&genuine_leaf).unwrap();

    // The thief's loot: every key in the server's key directory, and the bundle's roots.
    let roots = bundle_roots(&server);
    let keys: Vec<rcgen::KeyPair> = std::fs::read_dir(server.data_dir().join("keys"))
        .unwrap()
        .filter_map(|e| {
            let pkcs8 = std::fs::read(e.unwrap().path()).ok()?;
            rcgen::KeyPair::try_from(pkcs8.as_slice()).ok()
        })
        .collect();
    let (ca_der, ca_key) = roots
        .iter()
        .find_map(|root| {
            let (_, cert) = x509_parser::parse_x509_certificate(root).unwrap();
            let spki = cert.public_key().raw.to_vec();
            keys.iter()
                .find(|k| rcgen::PublicKeyData::subject_public_key_info(*k) == spki)
                .map(|k| (root.clone(), k))
        })
        .expect("the X.509 authority's key is among the server's key files");
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der.clone().into(), ca_key).unwrap();
    let thief = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(
        &hex::decode(&serial).unwrap(),
    ));
    params.subject_alt_names = vec![rcgen::SanType::URI(
        agent.spiffe_id.clone().try_into().unwrap(),
    )];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let forged = params.signed_by(&thief, &issuer).unwrap().der().to_vec();
    let forged_svid =
        ztid_agent::node_client::AgentSvid::from_parts(vec![forged.clone()], thief.serialize_der())
            .unwrap();

    // It passes TLS (it chains to the bundle) and names the current serial...
    assert_eq!(ztid_spiffe::svid::serial_hex(&forged).unwrap(), serial);
    let mut c = connect(
        addr,
        verifier(&server),
        Some(forged_svid.certified_key().unwrap()),
    )
    .unwrap();
    // ...and is refused, syncing as renewing.
    let err = c
        .sync_entries(pb::SyncEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unauthenticated,
        "{}",
        err.message()
    );
    assert!(
        err.message()
            .contains("for another key than the one it was issued"),
        "{}",
        err.message()
    );
    let err = c.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unauthenticated,
        "{}",
        err.message()
    );

    // The agent itself is unaffected.
    let mut c = connect(
        addr,
        verifier(&server),
        Some(genuine.certified_key().unwrap()),
    )
    .unwrap();
    c.sync_entries(pb::SyncEntriesRequest::default())
        .await
        .expect("the agent's own SVID");
}
