//! Several real `ztid-server`s on one PostgreSQL database (issue 13, points 2, 4 and 6),
//! the database started by the test harness (`initdb` into a temporary directory, its
//! own port: `ztid_test_support::postgres`), one database per test on a server the
//! tests share:
//!
//! - `kill -9` of the server an agent uses while workload instances hold
//!   `FetchX509SVID` streams and validate continuously: no validation fails, no
//!   stream ends, every instance's SVID is renewed through another server, and so is
//!   the agent's own;
//! - a join token redeemed at two servers at the same moment admits exactly one agent,
//!   round after round;
//! - `agent evict` and `agent ban` through one server: the agent's next call through
//!   another is refused with the reason;
//! - `datastore migrate` from the sled data directory of a real server run: the same
//!   server on PostgreSQL serves the same entries, agents and federation, another server
//!   of the cluster too, and the agent attested before the migration keeps working;
//! - the database stopped and started again (a server of the test's own) while entries
//!   are created, agents attested and SVIDs minted through every server and workload
//!   instances hold their streams: calls fail cleanly while it is down, the servers
//!   reconnect by themselves, every write a client was told succeeded is there through
//!   every server, every instance kept a valid SVID and renews it afterwards;
//! - X.509 rotation of every server's authority (prepare, activate, taint, revoke, each
//!   through its owner) while workload instances validate continuously: no validation
//!   fails, every instance moves to the new authority before the revoke, and the revoked
//!   authorities leave every server's bundle and the one the instances hold.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tonic::transport::Channel;
use tonic::Code;
use ztid_agent::node_client::{connect, AgentSvid};
use ztid_proto::admin::{self as apb, admin_client::AdminClient};
use ztid_proto::node as pb;
use ztid_spiffe::tls::{shared_roots, ServerSvidVerifier};
use ztid_test_support::postgres::TestPostgres;
use ztid_tests::*;

pub(super) const TD: &str = "example.org";

// ---------------------------------------------------------------------------------
// Fixtures

/// One PostgreSQL server shared by the tests of this module that run at the same time,
/// stopped when the last of them is done.
fn shared_postgres() -> Arc<TestPostgres> {
    static SHARED: Mutex<Weak<TestPostgres>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap();
    if let Some(pg) = slot.upgrade() {
        return pg;
    }
    let pg = Arc::new(TestPostgres::start());
    *slot = Arc::downgrade(&pg);
    pg
}

/// A database of its own on the shared server (or on a server of its own).
pub(super) struct Database {
    pg: Arc<TestPostgres>,
    url: String,
    /// Holds the password file.
    dir: tempfile::TempDir,
}

impl Database {
    pub(super) fn new(name: &str) -> Self {
        Self::on(shared_postgres(), name)
    }

    /// A database on a PostgreSQL server of its own, for a test that stops and starts
    /// the server (the shared one serves other tests meanwhile).
    fn on_own_server(name: &str) -> Self {
        Self::on(Arc::new(TestPostgres::start()), name)
    }

    /// The server of a database made by [`Database::on_own_server`], to stop and start.
    fn own_server(&mut self) -> &mut TestPostgres {
        Arc::get_mut(&mut self.pg).expect("a PostgreSQL server of this test's own")
    }

    fn on(pg: Arc<TestPostgres>, name: &str) -> Self {
        let url = pg.create_database(&format!("{name}_{}", std::process::id()));
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("password");
        std::fs::write(&pw, pg.password()).unwrap();
        // The server refuses a password file others may read.
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        Self { pg, url, dir }
    }

    /// The `[datastore]` table of a server on this database.
    fn datastore_toml(&self) -> String {
        format!(
            "[datastore]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
            self.url,
            self.dir.path().join("password").display()
        )
    }

    /// A config file `name` with `top` (top-level keys) and the `[datastore]` table.
    fn config(&self, name: &str, top: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, format!("{top}\n{}", self.datastore_toml())).unwrap();
        p
    }

    /// `n` servers on this database, each with its own data directory (keys, server id,
    /// audit log), `top` in their config.
    pub(super) fn servers(&self, n: usize, top: &str) -> Vec<Server> {
        (0..n)
            .map(|i| {
                let cfg = self.config(&format!("server-{i}"), top);
                Server::start_with(TD, &["--config", cfg.to_str().unwrap()])
            })
            .collect()
    }
}

/// The X.509 authorities in a server's bundle (hex serials).
fn bundle_serials(server: &Server) -> Vec<String> {
    bundle_roots(server)
        .iter()
        .map(|der| {
            use x509_parser::prelude::FromDer;
            let (_, c) = x509_parser::prelude::X509Certificate::from_der(der).unwrap();
            hex::encode(c.raw_serial())
        })
        .collect()
}

/// Waits until every server's bundle holds `n` X.509 authorities (the union of the
/// cluster's), and returns the bundle file of the first.
pub(super) fn cluster_bundle(servers: &[Server], n: usize) -> PathBuf {
    for s in servers {
        wait_for(
            "the cluster's authorities in every bundle",
            READY_TIMEOUT,
            || (bundle_serials(s).len() == n).then_some(()),
        );
    }
    servers[0].bundle_file()
}

pub(super) fn addrs(servers: &[Server]) -> String {
    servers
        .iter()
        .map(Server::addr)
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts `ztid-agent` with `--server SERVERS`, `bundle` and a join token, and waits
/// until its Workload API serves.
pub(super) fn start_agent(bundle: &Path, servers: &str, token: &str, extra: &[&str]) -> Agent {
    let dir = other_uid::scratch_dir();
    let socket = dir.path().join("api.sock");
    let log = dir.path().join("agent.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("ztid-agent"))
        .arg("run")
        .args(["--server", servers, "--trust-bundle"])
        .arg(bundle)
        .args(["--trust-domain", TD, "--join-token", token, "--socket"])
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--sync-interval", "1"])
        .args(extra)
        .stdin(Stdio::null())
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

/// The X.509 authority (hex serial, among `roots`) that signed the agent's own SVID.
fn agent_svid_authority(agent: &Agent, roots: &[Vec<u8>]) -> String {
    let chain: Vec<Vec<u8>> = pem::parse_many(
        std::fs::read(agent.data_dir().join("agent_svid.pem")).expect("agent SVID"),
    )
    .unwrap()
    .into_iter()
    .map(|p| p.into_contents())
    .collect();
    ztid_spiffe::svid::issuing_authority_of_chain(&chain, roots).unwrap_or_default()
}

/// The agent's own SVID file as it is now.
fn agent_svid_pem(agent: &Agent) -> Vec<u8> {
    std::fs::read(agent.data_dir().join("agent_svid.pem")).expect("agent SVID")
}

/// How many renewals of its own SVID the agent logged.
fn renewals_logged(agent: &Agent) -> usize {
    agent.proc.log_text().matches("agent SVID renewed").count()
}

/// The last 40 lines of the agent's log, for a failure message.
fn agent_log_tail(agent: &Agent) -> String {
    let log = agent.proc.log_text();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Index in `servers` of the server the agent calls now: the first of its list, or
/// the one it last switched to.
fn current_server(agent: &Agent, servers: &[Server]) -> usize {
    let to = super::agent_failover::switches(&agent.proc.log_text())
        .pop()
        .map(|(_, to)| to)
        .unwrap_or_else(|| servers[0].addr());
    servers
        .iter()
        .position(|s| s.addr() == to)
        .unwrap_or_else(|| panic!("the agent switched to {to}, not one of the test's servers"))
}

/// `GET /metrics` over plain HTTP/1.1: the value of an unlabelled sample.
fn metric(addr: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("agent metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape:\n{text}"))
}

// ---------------------------------------------------------------------------------
// Workload instances: `ztid-rotation-worker` processes, each holding a FetchX509SVID
// stream and validating what it holds every 500 ms and on every update.

#[derive(Default, Clone)]
struct View {
    /// The authority that signed the SVID held (hex serial).
    authority: String,
    updates: usize,
    /// The X.509 authorities of the bundle held (hex serials).
    bundle: Vec<String>,
    summary: Option<Value>,
    stream_error: Option<String>,
    /// Periodic validations made so far.
    checks: u64,
}

struct Workers {
    children: Vec<Child>,
    views: Arc<Mutex<Vec<View>>>,
}

impl Workers {
    fn spawn(agent: &Agent, n: usize) -> Self {
        let views = Arc::new(Mutex::new(vec![View::default(); n]));
        let mut children = Vec::with_capacity(n);
        for i in 0..n {
            let mut child = Command::new(bin("ztid-rotation-worker"))
                .env("SPIFFE_ENDPOINT_SOCKET", agent.endpoint())
                .env("ZTID_CHECK_INTERVAL_MS", "500")
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
                            g[i].updates += 1;
                            g[i].bundle = v["bundle"]
                                .as_array()
                                .map(|b| {
                                    b.iter()
                                        .filter_map(|x| x.as_str().map(str::to_string))
                                        .collect()
                                })
                                .unwrap_or_default();
                        }
                        Some("check") => g[i].checks = v["checks"].as_u64().unwrap_or_default(),
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

    fn all(&self, f: impl Fn(&View) -> bool) -> bool {
        self.views.lock().unwrap().iter().all(f)
    }

    /// `f` of every instance's view, in instance order.
    fn each<T, C: FromIterator<T>>(&self, f: impl Fn(&View) -> T) -> C {
        self.views.lock().unwrap().iter().map(f).collect()
    }

    fn authorities(&self) -> std::collections::BTreeSet<String> {
        self.each(|v| v.authority.clone())
    }

    /// Waits until every instance has validated what it holds `k` more times (each
    /// every 500 ms): so a test shows continuous validation after its last step by
    /// waiting on the workers, not by the clock.
    fn validate_more(&self, k: u64, timeout: Duration) {
        let before: Vec<u64> = self.each(|v| v.checks);
        wait_for(
            "more periodic validations by every instance",
            timeout,
            || {
                let g = self.views.lock().unwrap();
                g.iter()
                    .zip(&before)
                    .all(|(v, b)| v.checks >= b + k)
                    .then_some(())
            },
        );
    }

    /// Closes every worker's stdin and collects the summaries.
    fn finish(mut self) -> Vec<View> {
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

/// Asserts that no instance lost its stream or saw a failed validation; returns the
/// number of validations they made.
fn no_failed_validation(views: &[View]) -> u64 {
    let mut checks = 0;
    for (i, v) in views.iter().enumerate() {
        assert!(
            v.stream_error.is_none(),
            "instance {i}: {:?}",
            v.stream_error
        );
        let s = v.summary.as_ref().unwrap();
        assert_eq!(
            s["failures"], 0,
            "instance {i} saw a failed validation: {s}"
        );
        checks += s["checks"].as_u64().unwrap();
    }
    checks
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits up to `timeout` for `f`; on timeout shows the agent's log tail and laggards.
fn wait_or_dump(
    agent: &Agent,
    workers: &Workers,
    what: &str,
    timeout: Duration,
    f: impl Fn() -> bool,
) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            let views = workers.views.lock().unwrap();
            let lag: Vec<_> = views
                .iter()
                .enumerate()
                .filter(|(_, v)| v.stream_error.is_some() || v.updates == 0)
                .map(|(i, v)| (i, v.authority.clone(), v.stream_error.clone()))
                .take(5)
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}; laggards {lag:?}\nagent log tail:\n{}",
                agent_log_tail(agent)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------
// Node API calls from the test itself (for races and refusals that need exact timing)

fn verifier(roots: Vec<Vec<u8>>) -> Arc<ServerSvidVerifier> {
    Arc::new(ServerSvidVerifier::new(
        shared_roots(roots),
        format!("spiffe://{TD}/ztid/server"),
    ))
}

/// A node API client to `server`, as the agent `svid` (or anonymous).
pub(super) fn node(
    server: &Server,
    roots: &[Vec<u8>],
    svid: Option<&AgentSvid>,
) -> pb::node_client::NodeClient<tonic::transport::Channel> {
    connect(
        server.addr().parse().unwrap(),
        verifier(roots.to_vec()),
        svid.map(|s| s.certified_key().unwrap()),
    )
    .unwrap()
}

/// One join-token attestation: the agent's SVID, or the refusal.
pub(super) async fn attest(
    mut client: pb::node_client::NodeClient<tonic::transport::Channel>,
    token: String,
) -> Result<AgentSvid, tonic::Status> {
    let key = rcgen::KeyPair::generate().unwrap();
    // No URI SAN: the server assigns an agent its ID.
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let init = pb::AttestRequest {
        step: Some(pb::attest_request::Step::Init(pb::AttestInit {
            method: "join-token".into(),
            payload: token.into_bytes(),
            csr,
        })),
    };
    let mut inbound = client
        .attest(tokio_stream::iter(vec![init]))
        .await?
        .into_inner();
    match inbound.next().await {
        Some(Ok(pb::AttestResponse {
            step: Some(pb::attest_response::Step::Result(r)),
        })) => Ok(AgentSvid::from_parts(r.svid_chain, key.serialize_der()).unwrap()),
        Some(Err(s)) => Err(s),
        other => Err(tonic::Status::unknown(format!(
            "unexpected attestation answer: {other:?}"
        ))),
    }
}

fn agent_ids(server: &Server) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    let mut ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["spiffe_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

// ---------------------------------------------------------------------------------
// Tests

#[test]
fn a_server_killed_under_load_goes_unnoticed_by_workloads_and_the_agent_renews_elsewhere() {
    // 100 instances by default: about 55 s on 2 cores with the 3 servers, PostgreSQL
    // and the agent on the same cores, with a margin before their 30 s SVIDs expire
    // should renewals queue up. ZTID_CLUSTER_INSTANCES=200 is the figure.
    let n: usize = std::env::var("ZTID_CLUSTER_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let db = Database::new("cluster_kill");
    // A short agent SVID: the agent renews it half-way through its life, 20 s after
    // it was issued, within the test.
    let mut servers = db.servers(3, "agent_svid_ttl_seconds = 40");
    let bundle = cluster_bundle(&servers, 3);
    let roots = bundle_roots(&servers[0]);
    let metrics = format!("127.0.0.1:{}", free_port());
    let token = servers[1].token();
    let agent = start_agent(&bundle, &addrs(&servers), &token, &["--metrics", &metrics]);
    // Created through another server than the agent's: it reaches the agent all the same.
    entry_for_my_uid(
        &servers[2],
        &agent,
        "spiffe://example.org/fleet",
        &["--x509-ttl", "30"],
    );
    wait_for("the entry at the agent", READY_TIMEOUT, || {
        agent.cli(&["api", "fetch", "x509"]).ok.then_some(())
    });
    let started = Instant::now();
    let workers = Workers::spawn(&agent, n);
    wait_or_dump(
        &agent,
        &workers,
        "every instance's first SVID",
        Duration::from_secs(60),
        || workers.all(|v| !v.authority.is_empty()),
    );
    println!("{n} instances held an SVID after {:?}", started.elapsed());
    // Kill the server the agent uses now: the first of its list, unless a call slower
    // than the agent's timeouts on a loaded machine already moved it on. Every instance
    // then holds (or soon holds, after its renewal) an SVID of that server's authority.
    let current = current_server(&agent, &servers);
    wait_or_dump(
        &agent,
        &workers,
        "every instance's SVID from the authority of the server the agent uses",
        Duration::from_secs(60),
        || workers.authorities().len() == 1,
    );
    let killed_authority = workers.authorities().into_iter().next().unwrap();
    assert_eq!(
        current,
        current_server(&agent, &servers),
        "the agent moved on while its instances renewed:\n{}",
        agent_log_tail(&agent)
    );
    let agent_svid_before = agent_svid_pem(&agent);
    let renewals_before = renewals_logged(&agent);

    // kill -9 that server in the middle of the streams.
    let failovers_before = metric(&metrics, "ztid_agent_server_failovers_total");
    let mut killed = servers.remove(current).proc.take().unwrap();
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    let killed_at = Instant::now();

    wait_or_dump(
        &agent,
        &workers,
        "every instance renewed through another server",
        Duration::from_secs(60),
        || workers.all(|v| !v.authority.is_empty() && v.authority != killed_authority),
    );
    println!(
        "{n} instances renewed through the other servers {:?} after the kill",
        killed_at.elapsed()
    );
    wait_for(
        "the agent's own SVID renewed through another server",
        Duration::from_secs(60),
        || {
            let a = agent_svid_authority(&agent, &roots);
            // The agent logs the renewal after it wrote the file: both, or a read between
            // the two finds the new SVID but not yet the line.
            (agent_svid_pem(&agent) != agent_svid_before
                && !a.is_empty()
                && a != killed_authority
                && renewals_logged(&agent) > renewals_before)
                .then_some(())
        },
    );
    assert!(
        metric(&metrics, "ztid_agent_server_failovers_total") > failovers_before,
        "no failover counted:\n{}",
        agent_log_tail(&agent)
    );

    workers.validate_more(2, Duration::from_secs(60));
    let checks = no_failed_validation(&workers.finish());
    assert!(
        checks >= n as u64 * 2,
        "validated continuously ({checks} checks)"
    );
    println!("{n} instances, {checks} validations, 0 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_redeemed_at_two_servers_at_once_admits_exactly_one_agent() {
    const ROUNDS: usize = 30;
    let db = Database::new("cluster_token");
    let servers = db.servers(2, "");
    cluster_bundle(&servers, 2);
    let roots = bundle_roots(&servers[0]);
    let mut admitted = Vec::new();
    for round in 0..ROUNDS {
        let token = servers[round % 2].token();
        // Both calls connect first (lazily, on the first call) and go out together.
        let (a, b) = tokio::join!(
            attest(node(&servers[0], &roots, None), token.clone()),
            attest(node(&servers[1], &roots, None), token),
        );
        match (a, b) {
            (Ok(svid), Err(s)) | (Err(s), Ok(svid)) => {
                assert!(
                    s.message()
                        .contains("join token is unknown or was already used"),
                    "round {round}: {s:?}"
                );
                admitted.push(svid.spiffe_id);
            }
            (Ok(x), Ok(y)) => panic!(
                "round {round}: both servers admitted an agent: {} and {}",
                x.spiffe_id, y.spiffe_id
            ),
            (Err(x), Err(y)) => panic!("round {round}: neither admitted: {x:?} / {y:?}"),
        }
    }
    admitted.sort();
    admitted.dedup();
    assert_eq!(admitted.len(), ROUNDS);
    // Both servers list exactly the agents admitted.
    for s in &servers {
        assert_eq!(agent_ids(s), admitted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_and_ban_through_one_server_refuse_the_next_call_through_another() {
    let db = Database::new("cluster_evict");
    let servers = db.servers(2, "");
    cluster_bundle(&servers, 2);
    let roots = bundle_roots(&servers[0]);
    let (a, b) = (&servers[0], &servers[1]);
    let evicted = attest(node(a, &roots, None), a.token()).await.unwrap();
    let banned = attest(node(a, &roots, None), a.token()).await.unwrap();
    let sync = |svid: &AgentSvid| {
        let mut c = node(b, &roots, Some(svid));
        async move {
            c.sync_entries(pb::SyncEntriesRequest::default())
                .await
                .map(|_| ())
        }
    };
    // Both agents are served through B.
    sync(&evicted).await.unwrap();
    sync(&banned).await.unwrap();

    a.cli_ok(&["agent", "evict", &evicted.spiffe_id]);
    a.cli_ok(&["agent", "ban", &banned.spiffe_id]);
    let s = sync(&evicted).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    assert!(
        s.message().contains(&format!(
            "agent {} is not attested (evicted or unknown)",
            evicted.spiffe_id
        )),
        "{s:?}"
    );
    let s = sync(&banned).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message()
            .contains(&format!("agent {} is banned", banned.spiffe_id)),
        "{s:?}"
    );
    // Through A too, and B lists the ban.
    assert!(sync(&evicted).await.is_err());
    let (shown, _) = b.agent_record(&banned.spiffe_id);
    assert_eq!(shown["banned"], true, "{shown}");
    // Read from PostgreSQL by agent: a join token proves no hardware, so none recorded.
    assert_eq!(shown["banned_hardware"], serde_json::json!([]), "{shown}");
    assert!(!agent_ids(b).contains(&evicted.spiffe_id));
}

/// What `agent show` reads of a banned agent on PostgreSQL: the hardware bans recorded
/// with its ban (by the agent column's index), none of another agent's, ordered by agent
/// and identifier; gone once the ban is lifted.
#[test]
fn hardware_bans_are_read_by_agent_on_postgres() {
    use ztid_ca::datastore::{DataStore, HardwareBanRecord, PgOptions, PgStore};
    let db = Database::new("cluster_hw_bans");
    let store = PgStore::connect(PgOptions::new(
        db.url.clone(),
        Some(db.pg.password().to_string()),
        "hw-bans-test",
    ))
    .unwrap();
    let a = format!("spiffe://{TD}/ztid/agent/tpm/aa");
    let b = format!("spiffe://{TD}/ztid/agent/multi/bb");
    let ban = |identifier: &str, agent: &str| HardwareBanRecord {
        identifier: identifier.into(),
        agent: agent.into(),
        banned_at: 7,
    };
    store
        .put_hardware_bans(&[ban("tpm:ek-hash:02", &a), ban("tpm:ek-hash:01", &a)])
        .unwrap();
    store
        .put_hardware_bans(&[ban("tpm:ek-hash:01", &b), ban("tpm:ek-hash:03", &b)])
        .unwrap();
    assert_eq!(
        store
            .hardware_bans_of_agents(&[b.clone(), a.clone()])
            .unwrap(),
        vec![
            // By agent: `…/multi/bb` before `…/tpm/aa`.
            ban("tpm:ek-hash:01", &b),
            ban("tpm:ek-hash:03", &b),
            ban("tpm:ek-hash:01", &a),
            ban("tpm:ek-hash:02", &a),
        ]
    );
    assert!(store
        .hardware_bans_of_agents(&[format!("{a}a")])
        .unwrap()
        .is_empty());
    assert!(store.hardware_bans_of_agents(&[]).unwrap().is_empty());
    store.delete_hardware_bans(&a).unwrap();
    assert!(store
        .hardware_bans_of_agents(std::slice::from_ref(&a))
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .hardware_bans_of_agents(std::slice::from_ref(&b))
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_deployment_migrated_to_postgres_serves_the_same_state_to_the_same_agents() {
    let db = Database::new("cluster_migrate");
    // A server on sled, as deployed today, with a config file the test rewrites later.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("server.toml");
    // The agent renews its own SVID 20 s after issuance (half of its 40 s), after the
    // migration.
    let top = "agent_svid_ttl_seconds = 40";
    std::fs::write(&cfg, top).unwrap();
    let mut server = Server::start_with(TD, &["--config", cfg.to_str().unwrap()]);
    let mut agent = Agent::start(&server);
    entry_for_my_uid(
        &server,
        &agent,
        "spiffe://example.org/migrated",
        &["--x509-ttl", "30"],
    );
    for i in 0..5 {
        server.cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://example.org/other-{i}"),
            "--parent-id",
            &agent.spiffe_id,
            "--selector",
            &format!("unix:uid:{}", 50_000 + i),
        ]);
    }
    // A deleted entry: the newest change is a deletion.
    let gone = server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/gone",
        "--parent-id",
        &agent.spiffe_id,
        "--selector",
        "unix:uid:60000",
    ]);
    server.cli_ok(&["entry", "delete", &gone]);
    server.token();
    let other = Server::start("other.test");
    let other_bundle = other.bundle_file();
    server.cli_ok(&[
        "bundle",
        "set",
        "--trust-domain",
        "other.test",
        "--path",
        other_bundle.to_str().unwrap(),
    ]);
    drop(other);
    server.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "other.test",
        "--bundle-endpoint-url",
        "https://127.0.0.1:1/",
        "--profile",
        "https_web",
    ]);
    let c = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let held = fetch_when_ready(&c, "spiffe://example.org/migrated/").await;
    let list = |s: &Server, what: &[&str]| -> Value {
        let mut args = what.to_vec();
        args.extend(["--output", "json"]);
        let mut v: Value = serde_json::from_str(&s.cli_ok(&args)).unwrap();
        if let Some(a) = v.as_array_mut() {
            // By id where there is one (entries), else by the whole record.
            a.sort_by_key(|x| match x.get("id") {
                Some(id) => id.to_string(),
                None => x.to_string(),
            });
        }
        v
    };
    // Entries as served, without their revisions: the newest entry moves up to the
    // source's revision (its last change was a deletion), the others keep theirs.
    let without_revisions = |v: Value| -> Value {
        let mut v = v;
        for e in v.as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("revision");
        }
        v
    };
    let entries = without_revisions(list(&server, &["entry", "list"]));
    let agents: Vec<String> = agent_ids(&server);
    // Relationships without their poll state (the poller runs again after the start).
    let relationships = |s: &Server| -> Vec<(Value, Value, Value)> {
        let v = list(s, &["federation", "list"]);
        v["federations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["trust_domain"].clone(),
                    f["bundle_endpoint_url"].clone(),
                    f["profile"].clone(),
                )
            })
            .collect()
    };
    let federations = relationships(&server);
    assert_eq!(federations.len(), 1);
    let bundles = list(&server, &["bundle", "list"]);
    let x509 = list(&server, &["authority", "x509", "show"]);

    // Stopped (sled has one process per directory), migrated, started on PostgreSQL
    // with the same data directory (its keys) and port.
    server.proc.take().unwrap().stop();
    let out = Command::new(bin("ztid-server"))
        .args(["datastore", "migrate", "--from"])
        .arg(format!("sled:{}", server.data_dir().display()))
        .args([
            "--to",
            "postgres",
            "--datastore-url",
            &db.url,
            "--output",
            "json",
        ])
        .env("ZTID_DATASTORE_PASSWORD", db.pg.password())
        .output()
        .unwrap();
    let r = CliResult::from(out);
    assert!(r.ok, "datastore migrate failed: {}", r.stderr);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["entries"], 6, "{report}");
    assert_eq!(report["agents"], 1, "{report}");
    assert_eq!(report["join_tokens"], 1, "{report}");
    assert_eq!(report["federations"], 1, "{report}");
    assert_eq!(report["federated_bundles"], 1, "{report}");
    assert_eq!(report["audit_anchor"], true, "{report}");
    // Into a non-empty database: refused, with the reason, and nothing is written.
    let again = CliResult::from(
        Command::new(bin("ztid-server"))
            .args(["datastore", "migrate", "--from"])
            .arg(format!("sled:{}", server.data_dir().display()))
            .args(["--to", "postgres", "--datastore-url", &db.url])
            .env("ZTID_DATASTORE_PASSWORD", db.pg.password())
            .output()
            .unwrap(),
    );
    assert!(!again.ok);
    assert!(
        again.stderr.contains("the target datastore is not empty"),
        "{}",
        again.stderr
    );

    std::fs::write(&cfg, format!("{top}\n{}", db.datastore_toml())).unwrap();
    let restarted_at = unix_now();
    // The SVID it holds now ends before the renewal the test waits for below.
    assert!(agent_svid_not_after(&agent) < restarted_at + 39);
    server.restart();
    assert_eq!(
        without_revisions(list(&server, &["entry", "list"])),
        entries
    );
    assert_eq!(agent_ids(&server), agents);
    assert_eq!(relationships(&server), federations);
    assert_eq!(list(&server, &["bundle", "list"]), bundles);
    // The same authorities, now named after the server id of the data directory.
    let server_id = std::fs::read_to_string(server.data_dir().join("server-id")).unwrap();
    let mut expected = x509.clone();
    for a in expected.as_array_mut().unwrap() {
        assert_eq!(a["server_id"], "local", "{a}");
        a["server_id"] = Value::from(server_id.trim());
    }
    assert_eq!(list(&server, &["authority", "x509", "show"]), expected);
    // A second server of the cluster serves the same entries.
    let second_cfg = db.config("second", top);
    let second = Server::start_with(TD, &["--config", second_cfg.to_str().unwrap()]);
    assert_eq!(
        without_revisions(list(&second, &["entry", "list"])),
        entries
    );
    assert_eq!(agent_ids(&second), agents);

    // The agent attested before the migration keeps working: the SVID it holds is
    // still served, it is renewed (its TTL is 30 s), a new entry reaches it through its
    // incremental sync, and its own SVID is renewed.
    let served = fetch_when_ready(&c, "spiffe://example.org/migrated/").await;
    assert!(served.1 > unix_now(), "a valid SVID is served");
    entry_for_my_uid(&second, &agent, "spiffe://example.org/after", &["--shared"]);
    let start = Instant::now();
    fetch_when_ready(&c, "spiffe://example.org/after").await;
    println!(
        "an entry created after the migration reached the agent in {:?}",
        start.elapsed()
    );
    let renewed = wait_for_renewal(&c, &mut agent, &held.0, restarted_at).await;
    assert!(
        renewed.0 != held.0 && renewed.1 > held.1,
        "held notAfter {}, renewed {}, restarted at {restarted_at}",
        held.1,
        renewed.1
    );
    // Its own SVID (40 s) renewed by the server on PostgreSQL: notAfter at least 39 s
    // after the restart (one issued before the sled server stopped ends sooner: the
    // migration ran in between).
    wait_for(
        "the agent's own SVID renewed after the migration",
        Duration::from_secs(40),
        || (agent_svid_not_after(&agent) >= restarted_at + 39).then_some(()),
    );
    assert!(agent.proc.exited().is_none(), "{}", agent.proc.log_text());
}

/// The notAfter of the agent's own SVID, from its data directory.
fn agent_svid_not_after(agent: &Agent) -> i64 {
    let pem = std::fs::read(agent.data_dir().join("agent_svid.pem")).unwrap_or_default();
    let Some(leaf) = pem::parse_many(pem).ok().and_then(|p| p.into_iter().next()) else {
        return 0;
    };
    use x509_parser::prelude::FromDer;
    x509_parser::prelude::X509Certificate::from_der(leaf.contents())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .unwrap_or(0)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// This process's X509-SVID under `prefix` from the agent (leaf DER, notAfter), once it
/// has one.
async fn fetch_when_ready(c: &spiffe::WorkloadApiClient, prefix: &str) -> (Vec<u8>, i64) {
    let start = Instant::now();
    loop {
        // What the agent answered, for the failure message.
        let (found, seen) = match c.fetch_x509_context().await {
            Ok(ctx) => (
                ctx.svids()
                    .iter()
                    .find(|s| s.spiffe_id().to_string().starts_with(prefix))
                    .map(|s| s.leaf().as_bytes().to_vec()),
                format!(
                    "{:?}",
                    ctx.svids()
                        .iter()
                        .map(|s| s.spiffe_id().to_string())
                        .collect::<Vec<_>>()
                ),
            ),
            Err(e) => (None, e.to_string()),
        };
        if let Some(leaf) = found {
            use x509_parser::prelude::FromDer;
            let (_, cert) = x509_parser::prelude::X509Certificate::from_der(&leaf).unwrap();
            let not_after = cert.validity().not_after.timestamp();
            return (leaf, not_after);
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "no SVID under {prefix}; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for an SVID under `migrated/` other than `held` and signed at or after `since`
/// (Unix seconds, less 1 s): its lifetime is 30 s, so its notAfter is at least
/// `since + 29`.
async fn wait_for_renewal(
    c: &spiffe::WorkloadApiClient,
    agent: &mut Agent,
    held: &[u8],
    since: i64,
) -> (Vec<u8>, i64) {
    let start = Instant::now();
    loop {
        if let Some(st) = agent.proc.exited() {
            panic!("the agent exited ({st}):\n{}", agent.proc.log_text());
        }
        let s = fetch_when_ready(c, "spiffe://example.org/migrated/").await;
        if s.0 != held && s.1 >= since + 29 {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no renewed SVID after the migration"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------
// Calls under load while the database restarts

/// The database's state when a call started: up (before the stop), down, back.
const UP: usize = 0;
const DOWN: usize = 1;
const BACK: usize = 2;

/// The longest the test lets one call take: far above any answer of a server, whether
/// the database works or not, so a call that runs into it hung.
const CALL_DEADLINE: Duration = Duration::from_secs(20);

/// One failed call.
#[derive(Debug)]
#[allow(dead_code)] // Read through Debug in failure messages.
struct Failure {
    /// The database's state when it started.
    phase: usize,
    /// The gRPC code; `None` for a per-request error in an answered batch.
    code: Option<Code>,
    message: String,
    took: Duration,
}

/// What one stream of calls saw.
#[derive(Default)]
struct Calls {
    /// Answered calls, by the database's state when they started.
    ok: [usize; 3],
    /// Failed calls, the same way.
    failed: [usize; 3],
    failures: Vec<Failure>,
    /// What the client was told was written (entry ids, agent SPIFFE IDs).
    acked: Vec<String>,
}

/// The state every stream of calls reads.
#[derive(Clone, Default)]
struct Load {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

type CallError = (Option<Code>, String);

fn status(s: tonic::Status) -> CallError {
    (Some(s.code()), s.message().to_string())
}

/// Calls `call(k)` for k = 0, 1, … 50 ms apart until `load.stop`, each bounded by
/// [`CALL_DEADLINE`], and tallies the answers in `calls`.
async fn keep_calling<F, Fut>(load: Load, calls: Arc<Mutex<Calls>>, mut call: F)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<Option<String>, CallError>>,
{
    let mut k = 0;
    while !load.stop.load(Ordering::SeqCst) {
        let phase = load.phase.load(Ordering::SeqCst);
        let started = Instant::now();
        let r = tokio::time::timeout(CALL_DEADLINE, call(k)).await;
        let took = started.elapsed();
        k += 1;
        {
            let mut c = calls.lock().unwrap();
            match r {
                Ok(Ok(acked)) => {
                    c.ok[phase] += 1;
                    c.acked.extend(acked);
                }
                Ok(Err((code, message))) => {
                    c.failed[phase] += 1;
                    c.failures.push(Failure {
                        phase,
                        code,
                        message,
                        took,
                    });
                }
                Err(_) => {
                    c.failed[phase] += 1;
                    c.failures.push(Failure {
                        phase,
                        code: Some(Code::DeadlineExceeded),
                        message: format!(
                            "no answer within {CALL_DEADLINE:?} (the test's deadline)"
                        ),
                        took,
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin_client(server: &Server) -> AdminClient<Channel> {
    AdminClient::new(
        ztid_proto::transport::unix_channel(server.admin_socket())
            .await
            .expect("admin socket"),
    )
}

/// The ids of the entries under `parent` that `server` lists, every page.
async fn listed_entries(server: &Server, parent: &str) -> BTreeSet<String> {
    let mut c = admin_client(server).await;
    let mut ids = BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let r = c
            .list_entries(apb::ListEntriesRequest {
                parent_id: parent.into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(r.entries.into_iter().map(|e| e.id));
        if r.next_page_token.is_empty() {
            return ids;
        }
        page_token = r.next_page_token;
    }
}

/// The SPIFFE IDs of the agents `server` lists, every page.
async fn listed_agents(server: &Server) -> BTreeSet<String> {
    let mut c = admin_client(server).await;
    let mut ids = BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let r = c
            .list_agents(apb::ListAgentsRequest {
                page_size: 1000,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(r.agents.into_iter().map(|a| a.spiffe_id));
        if r.next_page_token.is_empty() {
            return ids;
        }
        page_token = r.next_page_token;
    }
}

#[test]
fn a_database_restart_under_load_loses_no_acknowledged_write_and_the_servers_reconnect() {
    // Enough to show instances keep and renew their SVIDs; the scale is the kill test's.
    const INSTANCES: usize = 20;
    const LOAD_PARENT: &str = "spiffe://example.org/restart-load";
    const MINTED: &str = "spiffe://example.org/minted";
    let test_started = Instant::now();
    // Its own PostgreSQL server: the shared one serves other tests meanwhile.
    let mut db = Database::on_own_server("cluster_restart");
    let mut servers = db.servers(3, "");
    let bundle = cluster_bundle(&servers, 3);
    let roots = bundle_roots(&servers[0]);
    // No SVIDs minted ahead: a new instance's first fetch must need the database (a
    // pooled SVID would answer it from the agent's memory while the database is down).
    let agent = start_agent(
        &bundle,
        &addrs(&servers),
        &servers[0].token(),
        &["--svid-pool-size", "0"],
    );
    // 20 s SVIDs, renewed at half-life: every instance renews after the restart.
    entry_for_my_uid(
        &servers[1],
        &agent,
        "spiffe://example.org/restart",
        &["--x509-ttl", "20"],
    );
    wait_for("the entry at the agent", READY_TIMEOUT, || {
        agent.cli(&["api", "fetch", "x509"]).ok.then_some(())
    });
    let workers = Workers::spawn(&agent, INSTANCES);
    wait_or_dump(
        &agent,
        &workers,
        "every instance's first SVID",
        Duration::from_secs(60),
        || workers.all(|v| !v.authority.is_empty()),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _rt = rt.enter();
    // A node of the test's own mints through every server.
    let minter = rt
        .block_on(attest(node(&servers[0], &roots, None), servers[0].token()))
        .unwrap();
    let mint_entry = servers[2].cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        MINTED,
        "--parent-id",
        &minter.spiffe_id,
        "--selector",
        "unix:uid:4242",
        "--shared",
    ]);

    // Through each server: entries created (admin API), join tokens created there and
    // redeemed at the next server (node API), X509-SVIDs minted (node API).
    let load = Load::default();
    let mut streams: Vec<(String, Arc<Mutex<Calls>>)> = Vec::new();
    let mut tasks = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        let mut stream = |what: String| {
            let calls = Arc::new(Mutex::new(Calls::default()));
            streams.push((format!("{what} through server {i}"), calls.clone()));
            calls
        };
        let admin = rt.block_on(admin_client(s));
        let calls = stream("entry create".into());
        tasks.push(rt.spawn(keep_calling(load.clone(), calls, move |k| {
            let mut admin = admin.clone();
            async move {
                let e = admin
                    .create_entry(pb::Entry {
                        spiffe_id: format!("spiffe://example.org/load/{i}/{k}"),
                        parent_id: LOAD_PARENT.into(),
                        selectors: vec![pb::Selector {
                            r#type: "unix".into(),
                            value: format!("uid:{}", 70_000 + k),
                        }],
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?;
                Ok(Some(e.into_inner().id))
            }
        })));

        let admin = rt.block_on(admin_client(s));
        let next = node(&servers[(i + 1) % servers.len()], &roots, None);
        let calls = stream(format!(
            "join token (redeemed at server {})",
            (i + 1) % servers.len()
        ));
        tasks.push(rt.spawn(keep_calling(load.clone(), calls, move |_| {
            let (mut admin, next) = (admin.clone(), next.clone());
            async move {
                let token = admin
                    .create_join_token(apb::CreateJoinTokenRequest::default())
                    .await
                    .map_err(status)?
                    .into_inner()
                    .token;
                let svid = attest(next, token).await.map_err(status)?;
                Ok(Some(svid.spiffe_id))
            }
        })));

        let client = node(s, &roots, Some(&minter));
        let calls = stream("X509-SVID mint".into());
        let entry = mint_entry.clone();
        tasks.push(rt.spawn(keep_calling(load.clone(), calls, move |_| {
            let (mut client, entry) = (client.clone(), entry.clone());
            async move {
                let r = client
                    .sign_x509_svids(pb::SignX509SvidsRequest {
                        requests: vec![pb::SvidRequest {
                            entry_id: entry,
                            csr: csr_for(MINTED),
                        }],
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                match r.results.into_iter().next().and_then(|r| r.result) {
                    Some(pb::svid_result::Result::Svid(_)) => Ok(None),
                    Some(pb::svid_result::Result::Error(e)) => Err((None, e)),
                    None => Err((None, "an empty answer".into())),
                }
            }
        })));
    }
    // Waits until every stream satisfies `f`; on timeout shows what each saw.
    let all_streams = |what: &str, timeout: Duration, f: &dyn Fn(&Calls) -> bool| {
        let start = Instant::now();
        while !streams.iter().all(|(_, c)| f(&c.lock().unwrap())) {
            if start.elapsed() > timeout {
                let seen: Vec<String> = streams
                    .iter()
                    .map(|(name, c)| {
                        let c = c.lock().unwrap();
                        format!(
                            "{name}: answered {:?}, failed {:?}, last failures {:?}",
                            c.ok,
                            c.failed,
                            c.failures.iter().rev().take(2).collect::<Vec<_>>()
                        )
                    })
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}:\n{}",
                    seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    };
    all_streams("calls answered through every server", READY_TIMEOUT, &|c| {
        c.ok[UP] >= 2
    });

    // The database stops (fast shutdown: sessions ended) under the load.
    load.phase.store(DOWN, Ordering::SeqCst);
    let stopped = Instant::now();
    db.own_server().stop();
    all_streams(
        "every stream of calls to meet the stopped database",
        READY_TIMEOUT,
        &|c| c.failed[DOWN] >= 1,
    );
    // A new instance needs an SVID minted for it (the entry is per instance): its
    // fetch is refused at once, saying why, while the running instances keep theirs.
    let fetch_started = Instant::now();
    let fetched = agent.cli(&["api", "fetch", "x509"]);
    assert!(
        !fetched.ok
            && fetched
                .stderr
                .contains("Unavailable: could not obtain an SVID")
            && fetched.stderr.contains("PostgreSQL"),
        "a new instance's fetch while the database is down: {fetched:?}"
    );
    assert!(fetch_started.elapsed() < CALL_DEADLINE);
    db.own_server().start_again();
    load.phase.store(BACK, Ordering::SeqCst);
    let outage = stopped.elapsed();
    let back = Instant::now();
    let updates_before: Vec<usize> = workers.each(|v| v.updates);
    // No server is restarted or told anything: each reconnects by itself.
    all_streams(
        "every stream of calls answered again, through every server",
        Duration::from_secs(60),
        &|c| c.ok[BACK] >= 2,
    );
    let recovered = back.elapsed();
    load.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        rt.block_on(t).unwrap();
    }

    // Refused calls were refused cleanly: the database's error, never a hang.
    let mut slowest_failure = Duration::ZERO;
    let mut codes = std::collections::BTreeMap::new();
    for (name, calls) in &streams {
        let c = calls.lock().unwrap();
        println!(
            "{name}: answered {:?}, failed {:?} (database up, down, back)",
            c.ok, c.failed
        );
        for f in &c.failures {
            // Unavailable (a database out of reach: try another server), or a mint's
            // per-CSR error in an answer (no code), saying why.
            assert!(
                matches!(f.code, None | Some(Code::Unavailable))
                    && f.message.contains("PostgreSQL"),
                "{name}: a call failed otherwise than with the database's error: {f:?}"
            );
            slowest_failure = slowest_failure.max(f.took);
            codes
                .entry(format!("{:?}", f.code))
                .or_insert_with(|| f.message.clone());
        }
    }
    println!("failed calls by code, with an example: {codes:#?}");
    // Everything a client was told was written is there, through every server.
    let acked = |what: &str| -> BTreeSet<String> {
        streams
            .iter()
            .filter(|(name, _)| name.starts_with(what))
            .flat_map(|(_, c)| c.lock().unwrap().acked.clone())
            .collect()
    };
    let (entries, agents) = (acked("entry create"), acked("join token"));
    for (i, s) in servers.iter().enumerate() {
        let listed = rt.block_on(listed_entries(s, LOAD_PARENT));
        let missing: Vec<_> = entries.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "server {i} lacks acknowledged entries {missing:?}"
        );
        let listed = rt.block_on(listed_agents(s));
        let missing: Vec<_> = agents.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "server {i} lacks admitted agents {missing:?}"
        );
    }
    println!(
        "database down {outage:?}, every server answering again {recovered:?} after its start; \
         slowest failed call {slowest_failure:?}; {} acknowledged entries and {} admitted agents \
         listed by all 3 servers",
        entries.len(),
        agents.len()
    );

    // Every instance kept a valid SVID (checked below) and renews it now.
    wait_or_dump(
        &agent,
        &workers,
        "every instance's SVID renewed after the restart",
        Duration::from_secs(40),
        || {
            let views = workers.views.lock().unwrap();
            views
                .iter()
                .zip(&updates_before)
                .all(|(v, b)| v.updates > *b)
        },
    );
    // Change notifications flow again: an authority prepared at one server is in every
    // server's bundle well before the 30 s fallback reload.
    let prepared_at = Instant::now();
    servers[1].cli_ok(&["authority", "x509", "prepare"]);
    for s in &servers {
        wait_for(
            "the prepared authority in every server's bundle",
            Duration::from_secs(20),
            || (bundle_serials(s).len() == 4).then_some(()),
        );
    }
    println!(
        "an authority prepared after the restart reached every bundle in {:?}",
        prepared_at.elapsed()
    );
    for (i, s) in servers.iter_mut().enumerate() {
        let proc = s.proc.as_mut().unwrap();
        assert!(proc.exited().is_none(), "server {i}:\n{}", proc.log_text());
    }

    no_failed_validation(&workers.finish());
    println!("test wall time {:?}", test_started.elapsed());
}

// ---------------------------------------------------------------------------------
// Rotation across the cluster

/// A server's id on PostgreSQL (`DATA_DIR/server-id`).
fn server_id(server: &Server) -> String {
    std::fs::read_to_string(server.data_dir().join("server-id"))
        .unwrap()
        .trim()
        .to_string()
}

/// The X.509 authorities `server` lists: every server's.
fn x509_authorities(server: &Server) -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&server.cli_ok(&["authority", "x509", "show", "--output", "json"]))
            .unwrap();
    v.as_array().unwrap().clone()
}

/// The id of server `owner`'s X.509 authority in `state`, as `server` lists it.
fn x509_authority_of(server: &Server, owner: &str, state: &str) -> String {
    let all = x509_authorities(server);
    all.iter()
        .find(|a| a["server_id"] == owner && a["state"] == state)
        .and_then(|a| a["id"].as_str())
        .unwrap_or_else(|| panic!("no {state} authority of server {owner}: {all:?}"))
        .to_string()
}

#[test]
fn x509_rotation_across_the_cluster_fails_no_validation_and_revoked_authorities_leave_every_bundle()
{
    // 100 instances by default: about 20 s with the 3 servers, PostgreSQL and the agent
    // on 2 cores shared with other work, where 200 took over 60 s to get their first
    // SVIDs. ZTID_CLUSTER_INSTANCES=200 is the figure (as for the kill test).
    let n: usize = std::env::var("ZTID_CLUSTER_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    // Waits that involve every instance: longer with more of them.
    let fleet_wait = Duration::from_secs(60).max(Duration::from_millis(500) * n as u32);
    let test_started = Instant::now();
    let db = Database::new("cluster_rotation");
    let servers = db.servers(3, "");
    let bundle = cluster_bundle(&servers, 3);
    let ids: Vec<String> = servers.iter().map(server_id).collect();
    let agent = start_agent(&bundle, &addrs(&servers), &servers[0].token(), &[]);
    entry_for_my_uid(&servers[1], &agent, "spiffe://example.org/fleet", &[]);
    wait_for("the entry at the agent", READY_TIMEOUT, || {
        agent.cli(&["api", "fetch", "x509"]).ok.then_some(())
    });
    // Each server's active authority, as another server lists it.
    let old: Vec<String> = ids
        .iter()
        .map(|id| x509_authority_of(&servers[2], id, "active"))
        .collect();
    let workers = Workers::spawn(&agent, n);
    // The agent uses the first server of its list, or another when that one does not
    // answer in time (a loaded machine).
    wait_or_dump(
        &agent,
        &workers,
        "every instance's first SVID",
        fleet_wait,
        || workers.all(|v| old.contains(&v.authority)),
    );
    println!(
        "{n} instances held an SVID {:?} into the test",
        test_started.elapsed()
    );

    // Prepare, each server its own: every server's bundle and every instance's holds
    // the six.
    let new: Vec<String> = servers
        .iter()
        .map(|s| {
            let out = s.cli_ok(&["authority", "x509", "prepare", "--output", "json"]);
            serde_json::from_str::<Value>(&out).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for s in &servers {
        wait_for(
            "the prepared authorities in every server's bundle",
            READY_TIMEOUT,
            || (bundle_serials(s).len() == 6).then_some(()),
        );
    }
    wait_or_dump(
        &agent,
        &workers,
        "the prepared authorities in every instance's bundle",
        fleet_wait,
        || workers.all(|v| new.iter().all(|id| v.bundle.contains(id))),
    );
    for s in &servers {
        s.cli_ok(&["authority", "x509", "activate"]);
    }
    for (i, id) in ids.iter().enumerate() {
        let other = &servers[(i + 1) % servers.len()];
        assert_eq!(x509_authority_of(other, id, "active"), new[i]);
    }

    // Taint and revoke go through the owner: another server refuses, naming it.
    let not_here = |verb: &str| {
        let r = servers[1].cli(&["authority", "x509", verb, &old[0]]);
        assert!(
            !r.ok
                && r.stderr.contains(&format!(
                    "x509 authority {} belongs to server {}: change it through that server's admin API",
                    old[0], ids[0]
                )),
            "{verb} through server 1: {}",
            r.stderr
        );
    };
    not_here("taint");
    let tainted_at = Instant::now();
    for (s, id) in servers.iter().zip(&old) {
        s.cli_ok(&["authority", "x509", "taint", id]);
    }
    not_here("revoke");
    wait_or_dump(
        &agent,
        &workers,
        "every instance renewed under a new authority",
        fleet_wait,
        || workers.all(|v| new.contains(&v.authority)),
    );
    println!(
        "after the taint, all {n} instances held an SVID under the new authority within {:?}",
        tainted_at.elapsed()
    );

    // Revoke through each owner: refused while an agent still depends on the authority
    // (it has not synced since the taint, or still holds an SVID under it).
    for (s, id) in servers.iter().zip(&old) {
        let mut refusals = Vec::new();
        wait_for("the revoke to be accepted", READY_TIMEOUT, || {
            let r = s.cli(&["authority", "x509", "revoke", id]);
            if !r.ok {
                refusals.push(r.stderr);
            }
            r.ok.then_some(())
        });
        for r in &refusals {
            assert!(
                r.contains(&format!("x509 authority {id} is still in use")),
                "a refused revoke says why: {r}"
            );
        }
    }
    // The revoked authorities are gone from every server's bundle and listing, from the
    // bundle every instance holds, and the agent's own SVID is under the new authority.
    let mut expected = new.clone();
    expected.sort();
    for s in &servers {
        wait_for(
            "only the new authorities in every server's bundle",
            READY_TIMEOUT,
            || {
                let mut b = bundle_serials(s);
                b.sort();
                (b == expected).then_some(())
            },
        );
        let listed = x509_authorities(s);
        assert!(
            listed
                .iter()
                .all(|a| !old.iter().any(|o| a["id"] == o.as_str())),
            "{listed:?}"
        );
    }
    wait_or_dump(
        &agent,
        &workers,
        "only the new authorities in every instance's bundle",
        fleet_wait,
        || {
            workers.all(|v| {
                let mut b = v.bundle.clone();
                b.sort();
                b == expected
            })
        },
    );
    println!(
        "the revoked authorities left every bundle {:?} after the taint",
        tainted_at.elapsed()
    );
    let own = agent_svid_authority(&agent, &bundle_roots(&servers[0]));
    assert!(new.contains(&own), "the agent's own SVID is under {own:?}");

    workers.validate_more(2, fleet_wait);
    let checks = no_failed_validation(&workers.finish());
    assert!(
        checks >= n as u64 * 2,
        "validated continuously ({checks} checks)"
    );
    println!(
        "{n} instances, {checks} validations, 0 failed; test wall time {:?}",
        test_started.elapsed()
    );
}
