//! Admin authorization, deny by default: every admin RPC refused without the role and
//! allowed with it over the remote (mTLS) admin API; unknown SPIFFE IDs and socket
//! callers with another uid refused; every decision audited.

use std::sync::Arc;

use ztid_agent::node_client::{mtls_channel, AgentSvid};
use ztid_proto::admin::{self as pb, admin_client::AdminClient};
use ztid_proto::node as npb;
use ztid_spiffe::tls::{shared_roots, ServerSvidVerifier};
use ztid_tests::*;

const TD: &str = "example.org";
const IDS: [&str; 4] = ["viewer", "operator", "authz", "stranger"];

/// Calls every admin RPC once; returns (name, permission denied?).
async fn call_all(c: &mut AdminClient<tonic::transport::Channel>) -> Vec<(&'static str, bool)> {
    macro_rules! probe {
        ($name:expr, $call:expr) => {{
            let r = $call.await;
            ($name, matches!(&r, Err(s) if s.code() == tonic::Code::PermissionDenied))
        }};
    }
    let entry = npb::Entry {
        spiffe_id: "spiffe://example.org/x".into(),
        parent_id: "spiffe://example.org/ztid/agent/join-token/none".into(),
        selectors: vec![npb::Selector {
            r#type: "unix".into(),
            value: "uid:1".into(),
        }],
        ..Default::default()
    };
    let id = || pb::EntryId { id: "nope".into() };
    let agent = || pb::AgentId {
        id: "spiffe://example.org/ztid/agent/join-token/none".into(),
    };
    let kind = || pb::AuthorityKind { kind: "jwt".into() };
    let aref = || pb::AuthorityRef {
        kind: "jwt".into(),
        id: "nope".into(),
    };
    let td = || pb::TrustDomainRef {
        trust_domain: "other.org".into(),
    };
    vec![
        probe!("Health", c.health(pb::HealthRequest {})),
        probe!(
            "ListEntries",
            c.list_entries(pb::ListEntriesRequest::default())
        ),
        probe!("GetEntry", c.get_entry(id())),
        probe!(
            "ListAgents",
            c.list_agents(pb::ListAgentsRequest::default())
        ),
        probe!("GetAgent", c.get_agent(agent())),
        probe!("GetBundle", c.get_bundle(pb::GetBundleRequest {})),
        probe!("ListAuthorities", c.list_authorities(kind())),
        probe!(
            "CreateJoinToken",
            c.create_join_token(pb::CreateJoinTokenRequest::default())
        ),
        probe!("CreateEntry", c.create_entry(entry.clone())),
        probe!("DeleteEntry", c.delete_entry(id())),
        probe!("UpdateEntry", c.update_entry(entry.clone())),
        probe!(
            "CountEntries",
            c.count_entries(pb::CountEntriesRequest::default())
        ),
        probe!(
            "CountAgents",
            c.count_agents(pb::CountAgentsRequest::default())
        ),
        probe!(
            "BatchCreateEntries",
            c.batch_create_entries(pb::BatchCreateEntriesRequest {
                entries: vec![entry.clone()]
            })
        ),
        probe!(
            "BatchDeleteEntries",
            c.batch_delete_entries(pb::BatchDeleteEntriesRequest {
                ids: vec!["nope".into()]
            })
        ),
        probe!("EvictAgent", c.evict_agent(agent())),
        probe!("BanAgent", c.ban_agent(agent())),
        probe!("PrepareAuthority", c.prepare_authority(kind())),
        probe!("ActivateAuthority", c.activate_authority(kind())),
        probe!("TaintAuthority", c.taint_authority(aref())),
        probe!("RevokeAuthority", c.revoke_authority(aref())),
        probe!(
            "SetFederatedBundle",
            c.set_federated_bundle(pb::SetFederatedBundleRequest {
                trust_domain: "other.org".into(),
                format: "pem".into(),
                data: b"x".to_vec()
            })
        ),
        probe!(
            "ListFederatedBundles",
            c.list_federated_bundles(pb::ListFederatedBundlesRequest::default())
        ),
        probe!("DeleteFederatedBundle", c.delete_federated_bundle(td())),
        probe!(
            "CreateFederation",
            c.create_federation(pb::Federation {
                trust_domain: "other.org".into(),
                ..Default::default()
            })
        ),
        probe!(
            "ListFederations",
            c.list_federations(pb::ListFederationsRequest::default())
        ),
        probe!("GetFederation", c.get_federation(td())),
        probe!("DeleteFederation", c.delete_federation(td())),
        probe!("RefreshFederation", c.refresh_federation(td())),
        // Served only on the admin socket: no remote role grants them.
        probe!(
            "IssueAdminSvid",
            c.issue_admin_svid(pb::IssueAdminSvidRequest {
                name: "x".into(),
                csr: vec![],
                ttl_seconds: 0
            })
        ),
        probe!(
            "RevokeAdminCredentials",
            c.revoke_admin_credentials(pb::RevokeAdminCredentialsRequest {
                name: "authz".into(),
                reason: String::new(),
            })
        ),
    ]
}

fn expected_allowed(role: &str, rpc: &str) -> bool {
    let read = [
        "Health",
        "ListEntries",
        "GetEntry",
        "ListAgents",
        "GetAgent",
        "CountEntries",
        "CountAgents",
        "GetBundle",
        "ListAuthorities",
        "ListFederatedBundles",
        "ListFederations",
        "GetFederation",
    ];
    let operate = [
        "CreateJoinToken",
        "CreateEntry",
        "DeleteEntry",
        "UpdateEntry",
        "BatchCreateEntries",
        "BatchDeleteEntries",
        "EvictAgent",
        "BanAgent",
        "RefreshFederation",
    ];
    let authority = [
        "PrepareAuthority",
        "ActivateAuthority",
        "TaintAuthority",
        "RevokeAuthority",
        "SetFederatedBundle",
        "DeleteFederatedBundle",
        "CreateFederation",
        "DeleteFederation",
    ];
    match role {
        "viewer" => read.contains(&rpc),
        "operator" => read.contains(&rpc) || operate.contains(&rpc),
        "authz" => read.contains(&rpc) || authority.contains(&rpc),
        _ => false,
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Waits on the clock (a few ms at a time) until the Unix second is past `t`.
fn wait_until_second_after(t: i64) {
    while unix_now() <= t {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Issues admin `who` a credential into `creds` on `server`'s host and connects to its
/// remote admin API on `port` with it.
fn remote_admin(
    server: &Server,
    creds: &std::path::Path,
    who: &str,
    port: u16,
) -> AdminClient<tonic::transport::Channel> {
    let id = server.cli_ok(&[
        "admin",
        "credential",
        "issue",
        "--name",
        who,
        "--write",
        creds.to_str().unwrap(),
    ]);
    assert_eq!(id, format!("spiffe://example.org/ztid/admin/{who}"));
    let chain = pem::parse_many(std::fs::read(creds.join("svid.pem")).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    let key = pem::parse(std::fs::read(creds.join("svid.key")).unwrap())
        .unwrap()
        .into_contents();
    let roots: Vec<Vec<u8>> = pem::parse_many(std::fs::read(creds.join("bundle.pem")).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    let identity = AgentSvid::from_parts(chain, key).unwrap();
    let verifier = Arc::new(ServerSvidVerifier::new(
        shared_roots(roots),
        format!("spiffe://{TD}/ztid/server"),
    ));
    let channel = mtls_channel(
        format!("127.0.0.1:{port}").parse().unwrap(),
        verifier,
        Some(identity.certified_key().unwrap()),
    )
    .unwrap();
    AdminClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_admin_roles_gate_every_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("server.toml");
    // Remote roles bind only admin identities (spiffe://TD/ztid/admin/NAME), which
    // only `admin credential issue` on the admin socket makes.
    std::fs::write(
        &cfg,
        format!(
            "[remote_admin]\nbind = \"127.0.0.1:{port}\"\n[remote_admin.roles]\n\"spiffe://example.org/ztid/admin/viewer\" = [\"viewer\"]\n\"spiffe://example.org/ztid/admin/operator\" = [\"operator\"]\n\"spiffe://example.org/ztid/admin/authz\" = [\"authority-admin\"]\n"
        ),
    )
    .unwrap();
    let server = Server::start_with(TD, &["--config", cfg.to_str().unwrap()]);
    for who in IDS {
        let mut client = remote_admin(&server, &dir.path().join(who), who, port);
        for (rpc, denied) in call_all(&mut client).await {
            assert_eq!(
                !denied,
                expected_allowed(who, rpc),
                "{who} calling {rpc}: denied={denied}"
            );
        }
    }

    // A lost credential is revoked on the server's host: refused from then on, while a
    // new one for the same admin has its role (revocations count whole seconds: the
    // waits are for the clock to pass the issue and the revocation).
    let lost = dir.path().join("operator-lost");
    let mut thief = remote_admin(&server, &lost, "operator", port);
    thief.health(pb::HealthRequest {}).await.unwrap();
    wait_until_second_after(unix_now());
    server.cli_ok(&[
        "admin",
        "credential",
        "revoke",
        "--name",
        "operator",
        "--reason",
        "laptop lost",
    ]);
    let refused = thief.health(pb::HealthRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("are revoked"),
        "{}",
        refused.message()
    );
    wait_until_second_after(unix_now());
    let mut renewed = remote_admin(&server, &dir.path().join("operator-new"), "operator", port);
    renewed.health(pb::HealthRequest {}).await.unwrap();
    assert!(thief.health(pb::HealthRequest {}).await.is_err());
    // Without any client certificate the TLS handshake itself fails.
    let verifier = Arc::new(ServerSvidVerifier::new(
        shared_roots(bundle_roots(&server)),
        format!("spiffe://{TD}/ztid/server"),
    ));
    let mut anon = AdminClient::new(
        mtls_channel(format!("127.0.0.1:{port}").parse().unwrap(), verifier, None).unwrap(),
    );
    assert!(anon.health(pb::HealthRequest {}).await.is_err());

    let log = std::fs::read_to_string(server.data_dir().join("audit/audit.log")).unwrap();
    assert!(
        log.contains("\"admin_refused\"")
            && log.contains("spiffe://example.org/ztid/admin/stranger has no admin role"),
        "refusals audited"
    );
    assert!(
        log.contains("\"admin_allowed\"")
            && log.contains("spiffe://example.org/ztid/admin/operator"),
        "allowed calls audited with the caller"
    );
}

#[test]
fn socket_callers_with_another_uid_are_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    // Admit only a uid that is not ours.
    let other = if nix_uid() == 4242 { 4243 } else { 4242 };
    std::fs::write(&cfg, format!("admin_uids = [{other}]\n")).unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let mut proc = std::process::Command::new(bin("ztid-server"))
        .args([
            "run",
            "--trust-domain",
            TD,
            "--data-dir",
            data.to_str().unwrap(),
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = data.join("admin.sock");
    let r = wait_for("the admin socket to answer", READY_TIMEOUT, || {
        if !sock.exists() {
            return None;
        }
        let out = std::process::Command::new(bin("ztid-server"))
            .args(["--admin-socket", sock.to_str().unwrap(), "agent", "list"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (!stderr.contains("cannot reach")).then_some((out.status.success(), stderr))
    });
    assert!(!r.0, "refused");
    assert!(
        r.1.contains(&format!("uid {} may not use the admin API", nix_uid())),
        "{}",
        r.1
    );
    let log = wait_for("the refusal in the audit log", READY_TIMEOUT, || {
        let l = std::fs::read_to_string(data.join("audit/audit.log")).ok()?;
        l.contains("\"admin_refused\"").then_some(l)
    });
    assert!(log.contains("may not use the admin API"));
    let _ = proc.kill();
    let _ = proc.wait();
}
