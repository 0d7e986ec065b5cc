//! Agent failover between servers (issue 13, point 4): the real `ztid-agent` given a
//! `--server` list moves past servers that do not answer (a port where nothing listens,
//! a listener that accepts and never speaks TLS), keeps serving the SVIDs it holds while
//! no server answers, and resumes renewing once its server is back.
//!
//! Here every "other server" is a dead or silent address next to one real `ztid-server`;
//! several real servers sharing one PostgreSQL database (and a `kill -9` of one of them
//! under load) are tested with the PostgreSQL datastore, separately.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use spiffe::WorkloadApiClient;
use x509_parser::prelude::{FromDer, X509Certificate};
use ztid_tests::*;

const TD: &str = "example.org";

/// Starts `ztid-agent` with `--server SERVERS` (the harness's `Agent` names one server)
/// and waits until its Workload API serves.
fn start_agent(server: &Server, servers: &str, extra: &[&str]) -> Agent {
    let dir = other_uid::scratch_dir();
    let bundle = server.bundle_file();
    let token = server.token();
    let socket = dir.path().join("api.sock");
    let log = dir.path().join("agent.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("ztid-agent"))
        .arg("run")
        .args(["--server", servers, "--trust-bundle"])
        .arg(&bundle)
        .args(["--trust-domain", TD, "--join-token", &token, "--socket"])
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--sync-interval", "1"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut proc = Proc { child, log };
    wait_for("ztid-agent to serve", READY_TIMEOUT, || {
        if let Some(st) = proc.exited() {
            panic!("ztid-agent exited ({st}):\n{}", proc.log_text());
        }
        (socket.exists()
            && agent_cli(&["healthcheck", "--socket", &socket.display().to_string()]).ok)
            .then_some(())
    });
    let pem = std::fs::read_to_string(dir.path().join("data/agent_svid.pem")).unwrap();
    let spiffe_id = spiffe_id_of(&pem::parse(pem).unwrap().into_contents());
    Agent {
        proc,
        dir,
        spiffe_id,
    }
}

/// `GET /metrics` over plain HTTP/1.1: the body.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("agent metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of an unlabelled sample.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape:\n{text}"))
}

fn failovers(metrics: &str) -> f64 {
    sample(&scrape(metrics), "ztid_agent_server_failovers_total")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// This process's X509-SVID from the agent, once entries have reached it: the leaf
/// (DER) and its notAfter.
async fn fetch(c: &WorkloadApiClient) -> Result<(Vec<u8>, i64), String> {
    let svid = c.fetch_x509_svid().await.map_err(|e| e.to_string())?;
    let leaf = svid.leaf().as_bytes().to_vec();
    let (_, cert) = X509Certificate::from_der(&leaf).map_err(|e| e.to_string())?;
    let not_after = cert.validity().not_after.timestamp();
    assert!(
        svid.spiffe_id()
            .to_string()
            .starts_with("spiffe://example.org/failover/"),
        "{}",
        svid.spiffe_id()
    );
    Ok((leaf, not_after))
}

async fn fetch_when_ready(c: &WorkloadApiClient) -> (Vec<u8>, i64) {
    let start = Instant::now();
    loop {
        match fetch(c).await {
            Ok(s) => return s,
            Err(e) => {
                assert!(start.elapsed() < READY_TIMEOUT, "no SVID: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Switches the agent logged, as (from, to).
pub(super) fn switches(log: &str) -> Vec<(String, String)> {
    let log = strip_ansi(log);
    let field = |l: &str, k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
    };
    log.lines()
        .filter(|l| l.contains("server_failover"))
        .filter_map(|l| Some((field(l, "from=")?, field(l, "to=")?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_attests_and_serves_through_the_first_server_that_answers() {
    let server = Server::start(TD);
    // Nothing listens here: connections are refused at once.
    let dead = format!("127.0.0.1:{}", free_port());
    // This one accepts TCP connections (the kernel's backlog) and never speaks TLS.
    let silent_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = silent_listener.local_addr().unwrap().to_string();
    let metrics = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let agent = start_agent(
        &server,
        &format!("{silent},{dead}, {}", server.addr()),
        &["--metrics", &metrics],
    );
    // The silent server costs one TLS-handshake timeout (3 s), not the 10 s of before
    // nor a hang.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let log = agent.proc.log_text();
    assert_eq!(
        switches(&log),
        vec![
            (silent.clone(), dead.clone()),
            (dead.clone(), server.addr())
        ],
        "{log}"
    );
    assert_eq!(failovers(&metrics), 2.0);

    entry_for_my_uid(
        &server,
        &agent,
        "spiffe://example.org/failover",
        &["--x509-ttl", "600"],
    );
    let c = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let (_, not_after) = fetch_when_ready(&c).await;
    assert!(not_after > now() + 500);
    let jwt = agent.cli(&["api", "fetch", "jwt", "--audience", "https://x.example"]);
    assert!(jwt.ok, "{}", jwt.stderr);

    // Syncs, minting and the agent's calls stay on the server that answers.
    let synced = server.cli_ok(&["agent", "show", &agent.spiffe_id, "--output", "json"]);
    assert!(synced.contains(&agent.spiffe_id));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(failovers(&metrics), 2.0, "{}", agent.proc.log_text());
    assert_eq!(
        sample(&scrape(&metrics), "ztid_agent_sync_failures_total"),
        0.0
    );
    drop(silent_listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_keep_their_svid_while_no_server_answers_and_renewals_resume() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "agent_svid_ttl_seconds = 40\n").unwrap();
    let mut server = Server::start_with(TD, &["--config", cfg.to_str().unwrap()]);
    let dead = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut agent = start_agent(
        &server,
        &format!("{dead},{}", server.addr()),
        &["--metrics", &metrics],
    );
    // A short lifetime: the agent wants to renew (at half-life, 15 s) while the server
    // is away.
    entry_for_my_uid(
        &server,
        &agent,
        "spiffe://example.org/failover",
        &["--x509-ttl", "30"],
    );
    let c = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let (leaf, not_after) = fetch_when_ready(&c).await;

    // The only real server goes away.
    let before = failovers(&metrics);
    server.proc.take().unwrap().stop();
    let renew_due = not_after - 15;
    // Until well past the renewal time, the workload keeps fetching the same, valid SVID.
    let mut fetches = 0;
    while now() < renew_due + 3 {
        let (again, _) = fetch(&c)
            .await
            .unwrap_or_else(|e| panic!("FetchX509SVID failed with the server away: {e}"));
        assert!(again == leaf, "the SVID held is served");
        assert!(now() < not_after, "and still valid");
        assert!(agent.proc.exited().is_none(), "{}", agent.proc.log_text());
        fetches += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(fetches >= 10, "{fetches}");
    let log = agent.proc.log_text();
    assert!(
        log.contains("no server answers; serving the workload SVIDs held"),
        "{log}"
    );
    assert!(switches(&log).len() >= 2, "{log}");
    let scraped = scrape(&metrics);
    assert!(
        sample(&scraped, "ztid_agent_server_failovers_total") > before,
        "{scraped}"
    );
    assert!(sample(&scraped, "ztid_agent_sync_failures_total") >= 1.0);

    // Back on the same port and data directory: renewals resume.
    let back = now();
    server.restart();
    let renewed = wait_for_renewal(&c, &leaf).await;
    assert!(renewed.1 > not_after, "a new, later SVID");
    wait_for("the agent's own SVID renewed", READY_TIMEOUT, || {
        agent
            .proc
            .log_text()
            .contains("agent SVID renewed")
            .then_some(())
    });
    wait_for("a successful sync", READY_TIMEOUT, || {
        (sample(
            &scrape(&metrics),
            "ztid_agent_last_sync_success_timestamp_seconds",
        ) >= back as f64)
            .then_some(())
    });
    assert!(agent.proc.exited().is_none());
    // Workloads never saw the outage: the SVID they hold was valid throughout.
    assert!(now() < renewed.1);
}

async fn wait_for_renewal(c: &WorkloadApiClient, old: &[u8]) -> (Vec<u8>, i64) {
    let start = Instant::now();
    loop {
        if let Ok(s) = fetch(c).await {
            if s.0 != old {
                return s;
            }
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "no renewed SVID after the server came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
