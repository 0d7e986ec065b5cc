//! Issuance policy (Cedar): mints follow the node's verified claims; reloads take
//! effect for the next mint; a broken policy is refused and the old one stays.

use std::time::Duration;

use ztid_tests::*;

const TD: &str = "example.org";

fn node_id(agent: &Agent) -> String {
    agent.spiffe_id.rsplit('/').next().unwrap().to_string()
}

/// One fresh process fetching: a new instance, so a new mint.
fn fetch(agent: &Agent) -> CliResult {
    agent.cli(&["api", "fetch", "x509"])
}

#[test]
fn mints_follow_verified_claims_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("issuance.cedar");
    // Before any agent exists, only attestation is permitted.
    std::fs::write(
        &policy,
        r#"permit (principal, action == Action::"attest", resource);"#,
    )
    .unwrap();
    let server = Server::start_with(TD, &["--issuance-policy", policy.to_str().unwrap()]);
    let good = Agent::start(&server);
    let other = Agent::start(&server);
    // Mints only for nodes whose verified evidence is the good agent's token, 10 min at most.
    std::fs::write(
        &policy,
        format!(
            r#"permit (principal, action == Action::"attest", resource);
@id("enrolled-node")
permit (principal, action == Action::"mint_x509", resource)
when {{ context.node.method == "join-token" && context.node.selectors.contains("join-token:id:{}") && context.ttl <= 600 }};"#,
            node_id(&good)
        ),
    )
    .unwrap();
    wait_for("the policy reload", READY_TIMEOUT, || {
        server.log_text().contains("policy_reloaded").then_some(())
    });
    for a in [&good, &other] {
        entry_for_my_uid(
            &server,
            a,
            "spiffe://example.org/app",
            &["--x509-ttl", "600"],
        );
    }
    entry_for_my_uid(
        &server,
        &good,
        "spiffe://example.org/long",
        &["--x509-ttl", "3600", "--hint", "long"],
    );
    wait_for("an SVID from the enrolled node", READY_TIMEOUT, || {
        fetch(&good).ok.then_some(())
    });
    let ids = good
        .cli(&["api", "fetch", "x509", "--output", "json"])
        .stdout;
    assert!(
        ids.contains("spiffe://example.org/app/") && !ids.contains("spiffe://example.org/long/"),
        "the 1 h entry is refused: {ids}"
    );
    // The other node's claims fall outside the policy.
    std::thread::sleep(Duration::from_millis(1500)); // one sync: the entry is at the agent
    let r = fetch(&other);
    assert!(
        !r.ok && r.stderr.contains("issuance policy refuses mint_x509"),
        "{}",
        r.stderr
    );
    assert!(server.log_text().contains("no permit policy matches"));

    // A broken policy is refused with the parse error; the old policy stays.
    std::fs::write(
        &policy,
        "permit (principal, action, resource) when { context.ttl <= ",
    )
    .unwrap();
    wait_for("the refusal", READY_TIMEOUT, || {
        server
            .log_text()
            .contains("policy_reload_refused")
            .then_some(())
    });
    assert!(server.log_text().contains("does not parse"));
    assert!(fetch(&good).ok, "the previous policy still permits");

    // A valid reload takes effect for the next mint.
    std::fs::write(&policy, "@id(\"freeze\") forbid (principal, action, resource);\npermit (principal, action, resource);").unwrap();
    wait_for("the freeze to apply", READY_TIMEOUT, || {
        let r = fetch(&good);
        (!r.ok && r.stderr.contains("forbidden by freeze")).then_some(())
    });
    let audit = std::fs::read_to_string(server.data_dir().join("audit/audit.log")).unwrap();
    assert!(
        audit.contains("policy_reloaded")
            && audit.contains("policy_reload_refused")
            && audit.contains("x509_svid_refused")
    );
}

#[test]
fn a_broken_policy_stops_the_server_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("bad.cedar");
    std::fs::write(&policy, "permit (principal action resource);").unwrap();
    let out = std::process::Command::new(bin("ztid-server"))
        .args([
            "run",
            "--trust-domain",
            TD,
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
        ])
        .args([
            "--bind",
            &format!("127.0.0.1:{}", free_port()),
            "--issuance-policy",
            policy.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("does not parse"),
        "{stderr}"
    );
}
