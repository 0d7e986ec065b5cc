//! Root rotation from the CLI under load: every workload instance keeps a chain that
//! validates against the bundle it holds, through prepare → activate → taint → revoke,
//! with server restarts between the steps.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use ztid_tests::*;

const TD: &str = "example.org";

#[derive(Default, Clone)]
struct WorkerView {
    authority: String,
    bundle: Vec<String>,
    summary: Option<Value>,
    stream_error: Option<String>,
}

struct Workers {
    children: Vec<Child>,
    views: Arc<Mutex<Vec<WorkerView>>>,
}

impl Workers {
    fn spawn(agent: &Agent, n: usize) -> Self {
        let views = Arc::new(Mutex::new(vec![WorkerView::default(); n]));
        let mut children = Vec::with_capacity(n);
        for i in 0..n {
            let mut child = Command::new(bin("ztid-rotation-worker"))
                .env("SPIFFE_ENDPOINT_SOCKET", agent.endpoint())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn worker");
            let out = child.stdout.take().unwrap();
            let views = views.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    let mut g = views.lock().unwrap();
                    match v["event"].as_str() {
                        Some("update") => {
                            g[i].authority =
                                v["authority"].as_str().unwrap_or_default().to_string();
                            g[i].bundle = v["bundle"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|b| b.as_str().unwrap().to_string())
                                .collect();
                        }
                        Some("summary") => g[i].summary = Some(v),
                        Some("stream_error") => g[i].stream_error = Some(line.clone()),
                        _ => {}
                    }
                }
            });
            children.push(child);
        }
        Self { children, views }
    }

    fn all(&self, f: impl Fn(&WorkerView) -> bool) -> bool {
        self.views.lock().unwrap().iter().all(f)
    }

    fn finish(mut self) -> Vec<WorkerView> {
        for c in &mut self.children {
            drop(c.stdin.take());
        }
        wait_for("worker summaries", READY_TIMEOUT, || {
            self.all(|v| v.summary.is_some()).then_some(())
        });
        for c in &mut self.children {
            let _ = c.wait();
        }
        let views = self.views.lock().unwrap().clone();
        views
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits up to 60 s; on timeout prints the agent's log tail and the laggards first.
fn wait_for_or_dump(agent: &Agent, workers: &Workers, what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > Duration::from_secs(60) {
            let log = agent.proc.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let views = workers.views.lock().unwrap();
            let lag: Vec<_> = views
                .iter()
                .enumerate()
                .filter(|(_, v)| v.authority.is_empty() || v.stream_error.is_some())
                .map(|(i, v)| (i, v.authority.clone(), v.stream_error.clone()))
                .take(5)
                .collect();
            panic!(
                "timed out waiting for {what}; laggards {lag:?}\nagent log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn authorities(server: &Server, kind: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(&server.cli_ok(&["authority", kind, "show", "--output", "json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn id_in_state(server: &Server, kind: &str, state: &str) -> String {
    authorities(server, kind)
        .iter()
        .find(|a| a["state"] == state)
        .map(|a| a["id"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no {state} {kind} authority"))
}

#[test]
fn x509_rotation_under_load_never_fails_a_validation() {
    let n: usize = std::env::var("ZTID_ROTATION_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(&server, &agent, "spiffe://example.org/fleet", &[]);
    wait_for("entry at the agent", READY_TIMEOUT, || {
        agent.cli(&["api", "fetch", "x509"]).ok.then_some(())
    });

    let old = id_in_state(&server, "x509", "active");
    let workers = Workers::spawn(&agent, n);
    wait_for("every worker's first SVID", Duration::from_secs(60), || {
        workers.all(|v| v.authority == old).then_some(())
    });

    // Negative steps first: each refused with its reason, nothing changed.
    let r = server.cli(&["authority", "x509", "revoke", &old]);
    assert!(
        !r.ok && r.stderr.contains("is not tainted: taint it first"),
        "{}",
        r.stderr
    );
    let r = server.cli(&["authority", "x509", "taint", &old]);
    assert!(!r.ok && r.stderr.contains("is active"), "{}", r.stderr);
    let r = server.cli(&["authority", "x509", "activate"]);
    assert!(
        !r.ok && r.stderr.contains("run prepare first"),
        "{}",
        r.stderr
    );

    let prepared = server.cli_ok(&["authority", "x509", "prepare", "--output", "json"]);
    let new: String = serde_json::from_str::<Value>(&prepared).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    server.restart(); // between prepare and activate
    assert_eq!(
        id_in_state(&server, "x509", "prepared"),
        new,
        "restart resumes with the prepared authority"
    );
    assert_eq!(id_in_state(&server, "x509", "active"), old);
    wait_for(
        "the prepared authority in every bundle",
        Duration::from_secs(30),
        || workers.all(|v| v.bundle.contains(&new)).then_some(()),
    );

    server.cli_ok(&["authority", "x509", "activate"]);
    assert_eq!(id_in_state(&server, "x509", "active"), new);
    server.cli_ok(&["authority", "x509", "taint", &old]);
    let tainted_at = Instant::now();
    server.restart(); // between taint and revoke
    assert!(
        authorities(&server, "x509")
            .iter()
            .any(|a| a["id"] == old.as_str() && a["tainted"] == true),
        "taint survives a restart"
    );
    wait_for_or_dump(
        &agent,
        &workers,
        "every worker on the new authority",
        || workers.all(|v| v.authority == new),
    );
    let n_seconds = tainted_at.elapsed();
    println!(
        "after taint, all {n} instances held an SVID under the new authority within {n_seconds:?}"
    );

    // Revoke succeeds once every agent has synced and reported the old authority unused.
    let revoke_started = Instant::now();
    let mut refusals = Vec::new();
    wait_for("revoke to be accepted", Duration::from_secs(30), || {
        let r = server.cli(&["authority", "x509", "revoke", &old]);
        if !r.ok {
            refusals.push(r.stderr);
        }
        r.ok.then_some(())
    });
    for r in &refusals {
        assert!(r.contains("still in use"), "a refused revoke says why: {r}");
    }
    println!(
        "revoke accepted {:?} after the rotation completed",
        revoke_started.elapsed()
    );
    wait_for(
        "the old authority gone from every bundle",
        Duration::from_secs(30),
        || workers.all(|v| !v.bundle.contains(&old)).then_some(()),
    );
    assert!(!server
        .cli_ok(&["bundle", "show", "--format", "spiffe"])
        .is_empty());
    assert!(authorities(&server, "x509")
        .iter()
        .all(|a| a["id"] != old.as_str()));
    let bundle_pem = server.cli_ok(&["bundle", "show"]);
    assert_eq!(
        bundle_pem.matches("BEGIN CERTIFICATE").count(),
        1,
        "only the new authority is left"
    );

    let views = workers.finish();
    let mut checks = 0;
    for (i, v) in views.iter().enumerate() {
        assert!(v.stream_error.is_none(), "worker {i}: {:?}", v.stream_error);
        let s = v.summary.as_ref().unwrap();
        assert_eq!(s["failures"], 0, "worker {i} saw a validation failure: {s}");
        checks += s["checks"].as_u64().unwrap();
    }
    assert!(
        checks > n as u64 * 4,
        "validation ran continuously ({checks} checks)"
    );
    let log = server.log_text();
    assert!(
        log.contains("authority_changed") && log.contains("uid:"),
        "authority changes are logged with the caller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_rotation_keeps_tokens_valid_until_expiry_and_drops_revoked_keys() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    entry_for_my_uid(
        &server,
        &agent,
        "spiffe://example.org/jwt",
        &["--jwt-ttl", "4"],
    );
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    wait_for("entry at the agent", READY_TIMEOUT, || {
        agent.cli(&["api", "fetch", "x509"]).ok.then_some(())
    });
    let old = id_in_state(&server, "jwt", "active");
    let token_old = client.fetch_jwt_svid(["db"], None).await.unwrap();
    assert_eq!(token_old.key_id(), old);

    server.cli_ok(&["authority", "jwt", "prepare"]);
    server.cli_ok(&["authority", "jwt", "activate"]);
    let new = id_in_state(&server, "jwt", "active");
    assert_ne!(new, old);
    // The old token still validates after the switch (the old key stays in the bundle).
    client
        .validate_jwt_token("db", token_old.token())
        .await
        .expect("old token valid after activate");
    server.cli_ok(&["authority", "jwt", "taint", &old]);
    client
        .validate_jwt_token("db", token_old.token())
        .await
        .expect("old token valid after taint");
    // New tokens come from the new key once the agent has the taint (cached ones are dropped).
    let token_new = wait_for_async_token(&client, &new).await;
    client
        .validate_jwt_token("db", token_new.token())
        .await
        .expect("new token valid");

    // Revoke is refused while a live token signed by the old key is out there.
    let r = server.cli(&["authority", "jwt", "revoke", &old]);
    assert!(!r.ok && r.stderr.contains("still in use"), "{}", r.stderr);
    wait_for(
        "revoke after the old token expired",
        Duration::from_secs(20),
        || {
            server
                .cli(&["authority", "jwt", "revoke", &old])
                .ok
                .then_some(())
        },
    );
    let bundles_gone = wait_for(
        "the revoked key gone from the JWT bundle",
        Duration::from_secs(10),
        || {
            let out = std::process::Command::new(bin("ztid-server"))
                .args([
                    "--admin-socket",
                    server.admin_socket().to_str().unwrap(),
                    "bundle",
                    "show",
                    "--format",
                    "spiffe",
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            (!text.contains(&old)).then_some(text)
        },
    );
    assert!(bundles_gone.contains(&new));
    let err = client
        .validate_jwt_token("db", token_old.token())
        .await
        .expect_err("a token signed by a revoked key never validates");
    assert!(
        format!("{err:?}").contains("not in the bundle") || format!("{err:?}").contains("expired"),
        "{err:?}"
    );
}

async fn wait_for_async_token(client: &spiffe::WorkloadApiClient, kid: &str) -> spiffe::JwtSvid {
    let start = Instant::now();
    loop {
        let t = client.fetch_jwt_svid(["db"], None).await.unwrap();
        if t.key_id() == kid {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no token from the new key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
