//! TPM node attestation end to end: the real `ztid-server` (verifier from
//! `--tpm-ek-ca` / `[attestors.tpm]`) and `ztid-agent --attestor tpm` on a swtpm, then a
//! workload fetching its SVID through that agent; PCR policy refusals; the offline
//! `evidence verify --kind tpm` CLI.
#![forbid(unsafe_code)]

use ztid_test_support::swtpm;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use swtpm::{LocalCa, Swtpm};
use ztid_tests::{bin, entry_for_my_uid, wait_for, Agent, Server, READY_TIMEOUT};
use ztid_verifier::tpm;

const TD: &str = "tpm.example.org";

/// Starts `ztid-agent --attestor tpm`; `Err(log)` if it exits before serving.
fn start_tpm_agent(server: &Server, tcti: &str, extra: &[&str]) -> Result<Agent, String> {
    let mut args = vec!["--attestor", "tpm", "--tpm-tcti", tcti];
    args.extend_from_slice(extra);
    Agent::start_attested(server, &args)
}

/// Waits until the server's metrics listener at `addr` counts a refused `tpm` attestation
/// with `reason`, the label the server derives from the refusal's kind
/// (`ztid_attestation::RefusalKind`), not from its text.
fn wait_for_tpm_refusal(addr: &str, reason: &str) {
    use std::io::{Read, Write};
    let series = format!("ztid_attestation_failures_total{{method=\"tpm\",reason=\"{reason}\"}} ");
    let count = || -> Option<f64> {
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
    };
    wait_for(
        &format!("a tpm refusal counted as {reason}"),
        READY_TIMEOUT,
        || count().filter(|n| *n >= 1.0),
    );
}

/// The node id the CA will give this TPM: SHA-256 of the EK certificate's public key.
fn ek_hash_of(tpm: &Swtpm) -> String {
    let mut t = ztid_attestor::tpm_device::Tpm::open(&tpm.tcti()).expect("open TPM");
    tpm::ek_hash(&t.ek_public().expect("EK")).expect("hash")
}

fn provision(dir: &Path) -> (LocalCa, Swtpm) {
    let ca = LocalCa::new(dir, "ca");
    let tpm = Swtpm::provision(&ca, &dir.join("tpm"));
    (ca, tpm)
}

#[test]
fn tpm_agent_attests_and_a_workload_fetches_its_svid() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, swtpm) = provision(dir.path());
    let hash = ek_hash_of(&swtpm);
    let server = Server::start_with(TD, &["--tpm-ek-ca", &ca.trust_dir().display().to_string()]);
    let t = Instant::now();
    let agent = start_tpm_agent(&server, &swtpm.tcti(), &[]).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "TPM enrolment, agent start to Workload API ready: {:?}",
        t.elapsed()
    );
    assert_eq!(
        agent.spiffe_id,
        format!("spiffe://{TD}/ztid/agent/tpm/{hash}")
    );

    // The server recorded the method and the selectors the evidence proved.
    let (shown, sels) = server.agent_record(&agent.spiffe_id);
    assert_eq!(shown["attestation_method"], "tpm", "{shown}");
    for want in [
        format!("tpm:ek-hash:{hash}"),
        "tpm:manufacturer:id:00001014".to_string(),
        "tpm:ek-issuer:CN=swtpm-localca".to_string(),
        format!("tpm:pcr:7:{}", "0".repeat(64)),
    ] {
        assert!(sels.contains(&want), "{want} missing from {sels:?}");
    }

    // A workload entry under the TPM agent; the workload fetches its SVID via the agent.
    let workload = format!("spiffe://{TD}/tpm-workload");
    entry_for_my_uid(&server, &agent, &workload, &[]);
    let out = wait_for(
        "the workload SVID through the TPM agent",
        READY_TIMEOUT,
        || {
            let r = agent.cli(&["api", "fetch", "x509", "--output", "json"]);
            (r.ok && r.stdout.contains(&workload)).then_some(r.stdout)
        },
    );
    assert!(out.contains(&workload), "{out}");

    // The same TPM attesting with its ECC EK (`--tpm-ek ecc`) is another node: the ID is
    // the hash of the ECC EK.
    let ecc_hash = {
        let mut t = ztid_attestor::tpm_device::Tpm::open_with_ek(
            &swtpm.tcti(),
            ztid_attestor::tpm_device::EkKind::Ecc,
        )
        .expect("open TPM");
        tpm::ek_hash(&t.ek_public().expect("ECC EK")).expect("hash")
    };
    assert_ne!(ecc_hash, hash);
    let ecc_agent = start_tpm_agent(&server, &swtpm.tcti(), &["--tpm-ek", "ecc"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ecc_agent.spiffe_id,
        format!("spiffe://{TD}/ztid/agent/tpm/{ecc_hash}")
    );
    drop(ecc_agent);

    // The agent's key lives in the TPM: its data directory holds the SRK-wrapped blob
    // and no PKCS#8 key, and its SVID certifies exactly that key. Entry sync and the
    // workload's SVID above went over mTLS handshakes the TPM signed.
    let data = agent.dir.path().join("data");
    assert!(!data.join("agent_key.pk8").exists());
    let key =
        ztid_attestor::agent_key::AgentKey::load(&data, &swtpm.tcti()).expect("agent_key.tpmkey");
    assert!(key.pkcs8().is_none(), "a TPM key has no exportable form");
    let leaf = pem::parse(std::fs::read(data.join("agent_svid.pem")).unwrap())
        .unwrap()
        .into_contents();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(cert.public_key().raw, key.spki().unwrap().as_slice());

    // A restart resumes with the persisted SVID: the key is loaded from its blob into the
    // same TPM and signs the new mTLS connection; the workload is served again.
    let agent = agent
        .restart_with(&server, &["--attestor", "tpm", "--tpm-tcti", &swtpm.tcti()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        agent
            .proc
            .log_text()
            .contains("resuming with the persisted agent SVID"),
        "{}",
        agent.proc.log_text()
    );
    let fresh_workload = format!("spiffe://{TD}/tpm-workload-after-restart");
    entry_for_my_uid(&server, &agent, &fresh_workload, &[]);
    wait_for(
        "a new entry synced over the restarted agent's TPM-signed mTLS",
        READY_TIMEOUT,
        || {
            let r = agent.cli(&["api", "fetch", "x509", "--output", "json"]);
            (r.ok && r.stdout.contains(&fresh_workload)).then_some(())
        },
    );
    // The agent holds no TPM connection and left nothing loaded.
    assert_eq!(swtpm.leftovers(), "");

    // A ban records the TPM's EK hash, and the operator sees it: in what `agent ban`
    // prints, in `agent show` (text and JSON), and only for the banned agent in
    // `agent list` (the ECC EK's agent was not banned).
    let want = format!("tpm:ek-hash:{hash}");
    let banned = server.cli_ok(&["agent", "ban", &agent.spiffe_id]);
    assert!(
        banned.contains(&format!("Banned hardware {want}")),
        "{banned}"
    );
    let shown = server.cli_ok(&["agent", "show", &agent.spiffe_id]);
    assert!(shown.contains("Banned        : true"), "{shown}");
    assert!(
        shown.contains(&format!("Banned hardware: {want}")),
        "{shown}"
    );
    let (json, _) = server.agent_record(&agent.spiffe_id);
    assert_eq!(json["banned_hardware"], serde_json::json!([want]), "{json}");
    let listed: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for a in listed {
        let expected = if a["spiffe_id"] == agent.spiffe_id.as_str() {
            serde_json::json!([want])
        } else {
            serde_json::json!([])
        };
        assert_eq!(a["banned_hardware"], expected, "{a}");
    }
}

#[test]
fn tpm_attestation_refusals_reach_the_agent_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, swtpm) = provision(dir.path());
    let hash = ek_hash_of(&swtpm);
    let zero = "0".repeat(64);
    // PCR 7 must stay at its enrolment value.
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[attestors.tpm]\nek_ca_dir = {:?}\npcrs = [0, 1, 2, 3, 4, 5, 6, 7]\n\
             [attestors.tpm.pcr_policy.{hash}]\npcrs = {{ 7 = \"{zero}\" }}\n",
            ca.trust_dir().display().to_string()
        ),
    )
    .unwrap();
    let metrics = format!("127.0.0.1:{}", ztid_tests::free_port());
    let server = Server::start_with(
        TD,
        &[
            "--config",
            &config.display().to_string(),
            "--metrics",
            &metrics,
        ],
    );
    let agent = start_tpm_agent(&server, &swtpm.tcti(), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        agent.spiffe_id,
        format!("spiffe://{TD}/ztid/agent/tpm/{hash}")
    );
    drop(agent);

    // After enrolment the boot state changes: the next attestation is refused, and both
    // sides say which PCR failed.
    swtpm.pcr_extend(7, &"42".repeat(32));
    let err = match start_tpm_agent(&server, &swtpm.tcti(), &[]) {
        Err(e) => e,
        Ok(_) => panic!("attestation with a changed PCR 7 passed"),
    };
    assert!(
        err.contains("PCR policy not met: PCR 7 is ")
            && err.contains(&format!("but policy {hash} allows {zero}")),
        "{err}"
    );
    assert!(
        server.log_text().contains("PCR policy not met: PCR 7 is"),
        "the server logs the refusal with the PCR"
    );
    wait_for_tpm_refusal(&metrics, "policy_mismatch");

    // An EK that is not on the allow-list, on a server that otherwise trusts its CA.
    let config2 = dir.path().join("server2.toml");
    std::fs::write(
        &config2,
        format!(
            "[attestors.tpm]\nek_ca_dir = {:?}\nallowed_ek_hashes = [\"{}\"]\n",
            ca.trust_dir().display().to_string(),
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let metrics2 = format!("127.0.0.1:{}", ztid_tests::free_port());
    let server2 = Server::start_with(
        TD,
        &[
            "--config",
            &config2.display().to_string(),
            "--metrics",
            &metrics2,
        ],
    );
    let err = match start_tpm_agent(&server2, &swtpm.tcti(), &[]) {
        Err(e) => e,
        Ok(_) => panic!("an EK off the allow-list attested"),
    };
    assert!(
        err.contains(&format!("EK {hash} is not in allowed_ek_hashes")),
        "{err}"
    );
    wait_for_tpm_refusal(&metrics2, "policy_mismatch");

    // A TPM from another manufacturer CA.
    let other_ca = LocalCa::new(dir.path(), "other-ca");
    let other = Swtpm::provision(&other_ca, &dir.path().join("other-tpm"));
    let err = match start_tpm_agent(&server, &other.tcti(), &[]) {
        Err(e) => e,
        Ok(_) => panic!("an EK from an untrusted CA attested"),
    };
    assert!(
        err.contains(
            "EK certificate signature does not verify with the key of CA CN=swtpm-localca"
        ),
        "{err}"
    );
    wait_for_tpm_refusal(&metrics, "untrusted_chain");
    let agents: serde_json::Value =
        serde_json::from_str(&server2.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(
        agents.as_array().unwrap().len(),
        0,
        "refusals create no agent"
    );
}

#[test]
fn tpm_evidence_verify_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, swtpm) = provision(dir.path());
    let nonce = [7u8; 32];
    let evidence = ztid_attestor::tpm::capture_evidence(&swtpm.tcti(), &nonce).expect("capture");
    let file = dir.path().join("evidence.json");
    std::fs::write(&file, &evidence).unwrap();
    let trust = ca.trust_dir().display().to_string();
    let run = |args: &[&str]| {
        let o = Command::new(bin("ztid-server"))
            .args(["evidence", "verify", "--kind", "tpm", "--evidence"])
            .arg(&file)
            .args(args)
            .output()
            .expect("ztid-server");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&[
        "--collateral",
        &trust,
        "--report-data",
        &hex::encode(nonce),
        "--output",
        "json",
    ]);
    assert!(ok, "{out}{err}");
    let claims: serde_json::Value = serde_json::from_str(out.trim()).expect("json claims");
    assert_eq!(claims["node_id"], ek_hash_of(&swtpm));
    assert_eq!(claims["nonce_checked"], true);
    let (ok, out, err) = run(&["--collateral", &trust, "--report-data", "00"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("evidence nonce differs from the expected --report-data"),
        "{err}"
    );
    // The CA directory can come from the config instead.
    let config = dir.path().join("server.toml");
    std::fs::write(&config, format!("[attestors.tpm]\nek_ca_dir = {trust:?}\n")).unwrap();
    let (ok, out, err) = run(&["--config", &config.display().to_string()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("not proven offline"), "{out}");
}

/// Continuous attestation: every agent SVID renewal is a fresh quote; once the node's
/// PCRs leave its policy, renewal is refused (logged with the failing PCR) and, when the
/// agent's SVID runs out, its workloads get no new SVIDs.
#[test]
fn tpm_renewal_is_a_fresh_quote_and_a_changed_pcr_ends_issuance() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, swtpm) = provision(dir.path());
    let hash = ek_hash_of(&swtpm);
    let zero = "0".repeat(64);
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "agent_svid_ttl_seconds = 12\n[attestors.tpm]\nek_ca_dir = {:?}\n\
             [attestors.tpm.pcr_policy.{hash}]\npcrs = {{ 7 = \"{zero}\" }}\n",
            ca.trust_dir().display().to_string()
        ),
    )
    .unwrap();
    let server = Server::start_with(TD, &["--config", &config.display().to_string()]);
    let agent = start_tpm_agent(&server, &swtpm.tcti(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let workload = format!("spiffe://{TD}/continuous");
    entry_for_my_uid(&server, &agent, &workload, &[]);
    wait_for("a workload SVID", READY_TIMEOUT, || {
        agent.cli(&["api", "fetch", "x509"]).ok.then_some(())
    });

    // The renewal at half-life is a second attestation with a fresh quote.
    wait_for(
        "a renewal by re-attestation",
        Duration::from_secs(20),
        || {
            (server.log_text().matches("node_attested").count() >= 2
                && agent.proc.log_text().contains("agent SVID renewed"))
            .then_some(())
        },
    );

    swtpm.pcr_extend(7, &"42".repeat(32));
    wait_for("the renewal to be refused", Duration::from_secs(20), || {
        (agent.proc.log_text().contains("agent_renewal_failed")
            && agent.proc.log_text().contains("PCR policy not met: PCR 7"))
        .then_some(())
    });
    assert!(
        server.log_text().contains("PCR policy not met: PCR 7 is"),
        "the server logs the failing PCR"
    );
    // Once the last SVID the node earned runs out, nothing more is minted for it.
    wait_for("no new workload SVIDs", Duration::from_secs(30), || {
        let r = agent.cli(&["api", "fetch", "x509"]);
        (!r.ok).then_some(())
    });
}
