//! The audit log end to end: a mint storm cut by `kill -9`, then `audit verify` and a
//! check that every serial an agent received was recorded exactly once; tampering
//! caught through the CLI.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use ztid_agent_attestor::agent::node_client::connect;
use ztid_agent_attestor::tls::{shared_roots, ServerSvidVerifier};
use ztid_proto::node as pb;
use ztid_tests::*;

const TD: &str = "example.org";

fn audit_verify(server: &Server) -> CliResult {
    std::process::Command::new(bin("ztid-server"))
        .args([
            "audit",
            "verify",
            "--data-dir",
            server.data_dir().to_str().unwrap(),
        ])
        .output()
        .unwrap()
        .into()
}

fn issued_serials(server: &Server) -> HashMap<String, usize> {
    let log = std::fs::read_to_string(server.data_dir().join("audit/audit.log")).unwrap();
    let mut counts = HashMap::new();
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["event"]["type"] == "x509_svid_issued" {
            *counts
                .entry(v["event"]["serial"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn kill_9_during_a_mint_storm_loses_no_issued_serial() {
    let mut server = Server::start(TD);
    let agent = Agent::start(&server);
    let entry = entry_for_my_uid(&server, &agent, "spiffe://example.org/storm", &["--shared"]);
    let roots = bundle_roots(&server);
    let addr = server.addr().parse().unwrap();
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let svid = agent.own_svid();
    let verifier = Arc::new(ServerSvidVerifier::new(
        shared_roots(roots),
        format!("spiffe://{TD}/ztid/server"),
    ));
    let _guard = rt.enter();
    let client = connect(addr, verifier, Some(svid.certified_key().unwrap())).unwrap();
    let csrs: Vec<Vec<u8>> = (0..64)
        .map(|_| csr_for("spiffe://example.org/storm"))
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (mut c, received, stop, csrs, entry) = (
            client.clone(),
            received.clone(),
            stop.clone(),
            csrs.clone(),
            entry.clone(),
        );
        tasks.push(rt.spawn(async move {
            let mut i = t;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = pb::SignX509SvidsRequest {
                    requests: (0..4)
                        .map(|k| pb::SvidRequest {
                            entry_id: entry.clone(),
                            csr: csrs[(i + k) % csrs.len()].clone(),
                        })
                        .collect(),
                };
                i += 4;
                match c.sign_x509_svids(req).await {
                    Ok(r) => {
                        for res in r.into_inner().results {
                            if let Some(pb::svid_result::Result::Svid(s)) = res.result {
                                let serial =
                                    ztid_agent_attestor::svid::serial_hex(&s.cert_chain[0])
                                        .unwrap();
                                received.lock().unwrap().push(serial);
                            }
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }
    wait_for("the storm to mint", Duration::from_secs(30), || {
        (received.lock().unwrap().len() > 300).then_some(())
    });
    // kill -9 while requests are in flight.
    server.proc.as_mut().unwrap().child.kill().unwrap();
    let _ = server.proc.as_mut().unwrap().child.wait();
    std::thread::sleep(Duration::from_millis(200)); // let in-flight calls fail against the dead server
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = rt.block_on(t);
    }
    server.restart();
    let v = audit_verify(&server);
    assert!(v.ok, "audit verify after kill -9: {}", v.stderr);
    assert!(v.stdout.contains("audit log OK"), "{}", v.stdout);
    let logged = issued_serials(&server);
    let received = received.lock().unwrap().clone();
    assert!(received.len() > 300);
    for s in &received {
        assert_eq!(
            logged.get(s),
            Some(&1),
            "serial {s} received by the agent must be in the log exactly once"
        );
    }
    assert!(
        logged.values().all(|n| *n == 1),
        "no serial is logged twice"
    );
    println!(
        "{} serials received, {} logged, all received ones present exactly once",
        received.len(),
        logged.len()
    );
}

#[test]
fn audit_verify_names_tampering_through_the_cli() {
    let mut server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(&server, &agent, "spiffe://example.org/a", &[]);
    wait_for("entry", READY_TIMEOUT, || {
        agent.cli(&["api", "fetch", "x509"]).ok.then_some(())
    });
    server.proc.as_mut().unwrap().stop();
    let ok = audit_verify(&server);
    assert!(ok.ok, "{}", ok.stderr);
    let path = server.data_dir().join("audit/audit.log");
    let orig = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = orig.lines().collect();
    assert!(lines.len() >= 5);
    // Change one byte of the third record: the fourth no longer chains to it.
    let mut changed: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    changed[2] = changed[2].replacen("\"type\"", "\"tYpe\"", 1);
    std::fs::write(
        &path,
        changed.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let r = audit_verify(&server);
    assert!(
        !r.ok && r.stderr.contains("record 4: does not chain"),
        "{}",
        r.stderr
    );
    // Cut the tail.
    std::fs::write(
        &path,
        lines[..lines.len() - 2]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let r = audit_verify(&server);
    assert!(
        !r.ok && r.stderr.contains("records were cut from the end"),
        "{}",
        r.stderr
    );
    std::fs::write(&path, &orig).unwrap();
    assert!(audit_verify(&server).ok);
    let events: Vec<Value> = orig
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].clone())
        .collect();
    for t in [
        "node_attested",
        "entry_created",
        "admin_call",
        "x509_svid_issued",
        "join_token_created",
    ] {
        assert!(
            events.iter().any(|e| e["type"] == t),
            "the log holds a {t} event"
        );
    }
}
