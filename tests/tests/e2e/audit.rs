//! The audit log end to end: a mint storm cut by `kill -9`, then `audit verify` and a
//! check that every serial an agent received was recorded exactly once; tampering
//! caught through the CLI; and the attacks of issue 11 part 5 by someone who can edit
//! the files of a stopped server: (a) a hash-linked record appended after the last
//! signature, (b) the log cut back with the `head.json` of that point restored,
//! (c) a forged record appended for the next start to chain onto; plus checkpoints
//! exported for an off-host witness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use ztid_agent::node_client::connect;
use ztid_proto::node as pb;
use ztid_spiffe::tls::{shared_roots, ServerSvidVerifier};
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

/// `ztid-server audit ARGS --data-dir <server's>`: (exit code, stdout, stderr).
fn audit_cli(server: &Server, args: &[&str]) -> (i32, String, String) {
    let o = std::process::Command::new(bin("ztid-server"))
        .arg("audit")
        .args(args)
        .args(["--data-dir", server.data_dir().to_str().unwrap()])
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn log_lines(server: &Server) -> Vec<String> {
    std::fs::read_to_string(server.data_dir().join("audit/audit.log"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn put_lines(server: &Server, lines: &[String]) {
    std::fs::write(
        server.data_dir().join("audit/audit.log"),
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

/// The log, its `head.json` and its sync journal as they were at one point, to put back
/// later (a rollback an attacker with the disk could do; the later journal left in
/// place would complete the log again).
struct LogSnapshot {
    lines: Vec<String>,
    head: Vec<u8>,
    journal: Vec<u8>,
}

impl LogSnapshot {
    /// Of a stopped server.
    fn take(server: &Server) -> Self {
        LogSnapshot {
            lines: log_lines(server),
            head: std::fs::read(server.data_dir().join("audit/head.json")).unwrap(),
            journal: std::fs::read(server.data_dir().join("audit/audit.wal")).unwrap(),
        }
    }

    fn restore(&self, server: &Server) {
        put_lines(server, &self.lines);
        std::fs::write(server.data_dir().join("audit/head.json"), &self.head).unwrap();
        std::fs::write(server.data_dir().join("audit/audit.wal"), &self.journal).unwrap();
    }
}

/// A server that has issued one token, running again, and the log of that point.
fn server_with_early_snapshot() -> (Server, LogSnapshot) {
    let mut server = Server::start(TD);
    server.token();
    server.proc.as_mut().unwrap().stop();
    let early = LogSnapshot::take(&server);
    server.restart();
    (server, early)
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

/// Appends a record that chains correctly to the last one: what anyone who can write
/// the file can do without any key. Returns it.
fn append_linked_record(server: &Server, event: &str) -> String {
    let mut lines = log_lines(server);
    let last = lines.last().unwrap().clone();
    let seq = serde_json::from_str::<Value>(&last).unwrap()["seq"]
        .as_u64()
        .unwrap();
    let forged = format!(
        "{{\"seq\":{},\"time_ms\":1,\"prev\":\"{}\",\"event\":{event}}}",
        seq + 1,
        sha256_hex(last.as_bytes())
    );
    lines.push(forged.clone());
    put_lines(server, &lines);
    forged
}

/// Starts `ztid-server run` on the server's data directory and expects it to refuse:
/// returns (exit code, output).
fn start_expecting_refusal(server: &Server) -> (i32, String) {
    let mut child = std::process::Command::new(bin("ztid-server"))
        .args(["run", "--trust-domain", TD, "--data-dir"])
        .arg(server.data_dir())
        .args(["--bind", &server.addr()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("ztid-server to refuse to start", READY_TIMEOUT, || {
        child.try_wait().unwrap()
    });
    let out = child.wait_with_output().unwrap();
    (
        status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `GET /metrics` over plain HTTP/1.1.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
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

/// How many calls mint at once, with how many CSRs each, over how many connections.
struct Storm {
    clients: usize,
    csrs_per_call: usize,
    connections: usize,
    /// Serials to receive before the kill.
    before_kill: usize,
}

/// Mints with `storm.clients` concurrent calls, kills the server with SIGKILL while
/// calls are in flight, restarts it: `audit verify` passes and every serial a client
/// received is in the log exactly once.
fn kill_9_during(storm: Storm) {
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
    let clients: Vec<_> = (0..storm.connections)
        .map(|_| connect(addr, verifier.clone(), Some(svid.certified_key().unwrap())).unwrap())
        .collect();
    let csrs: Vec<Vec<u8>> = (0..64)
        .map(|_| csr_for("spiffe://example.org/storm"))
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most_in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..storm.clients {
        let (mut c, received, stop, csrs, entry) = (
            clients[t % clients.len()].clone(),
            received.clone(),
            stop.clone(),
            csrs.clone(),
            entry.clone(),
        );
        let (in_flight, most_in_flight) = (in_flight.clone(), most_in_flight.clone());
        let per_call = storm.csrs_per_call;
        tasks.push(rt.spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let mut i = t;
            while !stop.load(Relaxed) {
                let req = pb::SignX509SvidsRequest {
                    requests: (0..per_call)
                        .map(|k| pb::SvidRequest {
                            entry_id: entry.clone(),
                            csr: csrs[(i + k) % csrs.len()].clone(),
                        })
                        .collect(),
                };
                i += per_call;
                most_in_flight.fetch_max(in_flight.fetch_add(1, Relaxed) + 1, Relaxed);
                let answer = c.sign_x509_svids(req).await;
                in_flight.fetch_sub(1, Relaxed);
                match answer {
                    Ok(r) => {
                        for res in r.into_inner().results {
                            if let Some(pb::svid_result::Result::Svid(s)) = res.result {
                                let serial =
                                    ztid_spiffe::svid::serial_hex(&s.cert_chain[0]).unwrap();
                                received.lock().unwrap().push(serial);
                            }
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }
    wait_for("the storm to mint", Duration::from_secs(60), || {
        (received.lock().unwrap().len() > storm.before_kill).then_some(())
    });
    // kill -9 while requests are in flight.
    let in_flight_at_kill = in_flight.load(std::sync::atomic::Ordering::Relaxed);
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
    assert!(received.len() > storm.before_kill);
    for s in &received {
        assert_eq!(
            logged.get(s),
            Some(&1),
            "serial {s} received by a client must be in the log exactly once"
        );
    }
    assert!(
        logged.values().all(|n| *n == 1),
        "no serial is logged twice"
    );
    let most = most_in_flight.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        most >= storm.clients / 2,
        "the storm had {most} calls in flight at most, not the {} it is about",
        storm.clients
    );
    let log = std::fs::read_to_string(server.data_dir().join("audit/audit.log")).unwrap();
    println!(
        "{} clients: {} serials received, {} logged, all received ones present exactly once; {} calls in flight at the kill (at most {}), {} seals (batches) in the log",
        storm.clients,
        received.len(),
        logged.len(),
        in_flight_at_kill,
        most,
        log.matches("\"seal\":").count()
    );
}

#[test]
fn kill_9_during_a_mint_storm_loses_no_issued_serial() {
    kill_9_during(Storm {
        clients: 8,
        csrs_per_call: 4,
        connections: 1,
        before_kill: 300,
    });
}

/// Many small batches in flight at once: 32 calls of one CSR over two connections,
/// so the writer seals and syncs batch after batch while calls keep arriving.
#[test]
fn kill_9_with_many_batches_in_flight_loses_no_issued_serial() {
    kill_9_during(Storm {
        clients: 32,
        csrs_per_call: 1,
        connections: 2,
        before_kill: 600,
    });
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
    // Change one byte of an event record: the next one no longer chains to it.
    let mut changed: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    let i = changed.iter().position(|l| l.contains("\"type\"")).unwrap();
    changed[i] = changed[i].replacen("\"type\"", "\"tYpe\"", 1);
    std::fs::write(
        &path,
        changed.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let r = audit_verify(&server);
    assert!(
        !r.ok
            && r.stderr
                .contains(&format!("record {}: does not chain", i + 2)),
        "{}",
        r.stderr
    );
    // Cut the tail: read back from the sync journal, which holds the run's batches, and
    // said so; named once the journal is gone too.
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
        r.ok && r
            .stdout
            .contains("bytes of it were read from audit.wal, not audit.log"),
        "{}",
        r.stdout
    );
    let journal = server.data_dir().join("audit/audit.wal");
    let journal_bytes = std::fs::read(&journal).unwrap();
    std::fs::remove_file(&journal).unwrap();
    let r = audit_verify(&server);
    assert!(
        !r.ok && r.stderr.contains("records were cut from the end"),
        "{}",
        r.stderr
    );
    std::fs::write(&journal, journal_bytes).unwrap();
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

/// (a) A correctly hash-linked record after the last signature needs no key; `audit
/// verify` must fail on it unless told `--allow-unsigned-tail`.
#[test]
fn a_hash_linked_record_after_the_last_signature_fails_verify() {
    let mut server = Server::start(TD);
    server.token();
    server.proc.as_mut().unwrap().stop();
    let (code, out, err) = audit_cli(&server, &["verify"]);
    assert_eq!(code, 0, "a cleanly stopped log is fully signed: {err}");
    assert!(
        out.contains("audit log OK") && !out.contains("signed by no one"),
        "{out}"
    );
    let n = log_lines(&server).len();
    append_linked_record(&server, r#"{"type":"entry_deleted","caller":"attacker"}"#);
    let (code, _, err) = audit_cli(&server, &["verify"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "records {} to {} come after the last signature (record {n}): nothing signed them",
            n + 1,
            n + 1
        )),
        "{err}"
    );
    // Only when explicitly allowed (a live server's batch in flight), and said so.
    let (code, out, err) = audit_cli(&server, &["verify", "--allow-unsigned-tail"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1 later records signed by no one, accepted by --allow-unsigned-tail"),
        "{out}"
    );
}

/// (b) Stop, cut the log back, restore the `head.json` of that point: the datastore
/// anchor (outside the audit directory) catches it, in `audit verify` and at start.
#[test]
fn a_log_cut_back_with_its_old_head_restored_is_refused() {
    let (mut server, early) = server_with_early_snapshot();
    let early_lines = &early.lines;
    for _ in 0..3 {
        server.token();
    }
    server.proc.as_mut().unwrap().stop();
    let full = log_lines(&server).len();
    early.restore(&server);

    let (code, _, err) = audit_cli(&server, &["verify"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "the log ends at record {} but the datastore anchor is at record {full}: records were cut from the end (the log was rolled back)",
            early_lines.len()
        )),
        "{err}"
    );
    let (code, out) = start_expecting_refusal(&server);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "the datastore anchor is at record {full} but the last record the server signed is {}: signed records were cut from the log (rolled back); refusing to continue the chain",
            early_lines.len()
        )),
        "{out}"
    );
    assert_eq!(
        &log_lines(&server),
        early_lines,
        "the refused start wrote nothing"
    );

    // The operator's explicit decision is recorded in the log, and the chain goes on.
    let (code, out, err) = audit_cli(
        &server,
        &[
            "accept-rollback",
            "--reason",
            "restored from the 02:00 backup",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("accepted"), "{out}");
    server.restart();
    server.token();
    server.proc.as_mut().unwrap().stop();
    let (code, _, err) = audit_cli(&server, &["verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(log_lines(&server)
        .iter()
        .any(|l| l.contains("audit_rollback_accepted") && l.contains("02:00 backup")));
}

/// (c) A forged record appended while the server is stopped is not chained onto (nor
/// signed over) at the next start: it is set aside in quarantine.log, an error is
/// logged and the alert metric raised.
#[test]
fn a_record_forged_while_stopped_is_quarantined_not_chained_onto() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start_with(TD, &["--metrics", &metrics]);
    server.token();
    server.proc.as_mut().unwrap().stop();
    let signed = log_lines(&server);
    let forged = append_linked_record(
        &server,
        r#"{"type":"admin_call","caller":"uid:0","method":"forged"}"#,
    );
    server.restart();
    server.token();
    let text = scrape(&metrics);
    assert_eq!(
        metric(&text, "ztid_audit_tamper_detected"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "ztid_audit_quarantined_records_total"),
        Some(1.0)
    );
    assert!(server.log_text().contains("audit_tamper_detected"));
    server.proc.as_mut().unwrap().stop();

    let now = log_lines(&server);
    assert_eq!(
        &now[..signed.len()],
        &signed[..],
        "the signed part is untouched"
    );
    assert!(
        !now.contains(&forged),
        "the forged record is not in the log"
    );
    assert!(
        now.iter()
            .any(|l| l.contains("audit_unsigned_records_quarantined")),
        "the log records what was set aside"
    );
    let quarantine =
        std::fs::read_to_string(server.data_dir().join("audit/quarantine.log")).unwrap();
    assert!(quarantine.contains(&forged), "kept aside, never deleted");
    let (code, _, err) = audit_cli(&server, &["verify"]);
    assert_eq!(
        code, 0,
        "the chain continued from the last signed record: {err}"
    );
}

/// Checkpoints for an off-host witness: a later log extends one; a log cut back
/// before it, or rewritten at it, is refused.
#[test]
fn an_exported_checkpoint_proves_the_log_extends_it() {
    let (mut server, early) = server_with_early_snapshot();
    let early_lines = &early.lines;
    server.token();
    // Taken from the live server's log.
    let cp_file = server.dir.path().join("witness-checkpoint.json");
    let (code, out, err) = audit_cli(&server, &["checkpoint", "--out", cp_file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let cp: Value = serde_json::from_str(&std::fs::read_to_string(&cp_file).unwrap()).unwrap();
    let cp_seq = cp["seq"].as_u64().unwrap();
    assert!(
        out.contains(&format!("audit checkpoint at record {cp_seq} written to")),
        "{out}"
    );
    for k in ["hash", "time_ms", "key_id", "public_key", "sig"] {
        assert!(!cp[k].is_null(), "the checkpoint names its {k}");
    }
    server.token();
    server.proc.as_mut().unwrap().stop();
    let cp_arg = ["verify", "--checkpoint", cp_file.to_str().unwrap()];
    let (code, out, err) = audit_cli(&server, &cp_arg);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("extends checkpoint {}", cp_file.display())),
        "{out}"
    );
    let full = log_lines(&server);

    // Rewritten at the checkpoint's record (a fork).
    let mut forked = full.clone();
    let i = cp_seq as usize - 1;
    forked[i] = forked[i].replacen("\"time_ms\":", "\"time_ms\":1", 1);
    put_lines(&server, &forked);
    let (code, _, err) = audit_cli(&server, &cp_arg);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "record {cp_seq}: differs from checkpoint {} (record {cp_seq}",
            cp_file.display()
        )) && err.contains("the log was rewritten (forked) from there on"),
        "{err}"
    );

    // Cut back to before the checkpoint, with that point's head.json.
    early.restore(&server);
    let (code, _, err) = audit_cli(&server, &cp_arg);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "the log ends at record {} but checkpoint {} (record {cp_seq}",
            early_lines.len(),
            cp_file.display()
        )) && err.contains("records were cut from the end (the log was rolled back)"),
        "{err}"
    );

    // A checkpoint edited by hand is refused for its signature.
    put_lines(&server, &full);
    let mut edited = cp.clone();
    edited["seq"] = serde_json::json!(1);
    std::fs::write(&cp_file, edited.to_string()).unwrap();
    let (code, _, err) = audit_cli(&server, &cp_arg);
    assert_eq!(code, 1);
    assert!(err.contains("signature does not verify"), "{err}");
}
