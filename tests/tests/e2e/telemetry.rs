//! Telemetry: the `--metrics` listener of the real server and agent processes, after
//! real traffic (the Workload API and Envoy SDS on its socket). Counters must move as the
//! traffic says, `/live` and `/ready` must answer, and Debian's `promtool` must accept
//! both scrapes and the alert rules.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ztid_proto::workload::{self as wpb, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use ztid_tests::*;

const TD: &str = "example.org";

/// `GET path` over plain HTTP/1.1; returns (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").expect("metrics endpoint answers");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// One sample: metric name and labels.
type Series = (String, BTreeMap<String, String>);

/// Parses the text exposition (no escapes in ztid's label values).
fn parse(text: &str) -> Vec<(Series, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (
                (name.to_string(), labels),
                value.parse().expect("sample value"),
            )
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include `labels` (None if there is none).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = parse(text)
        .into_iter()
        .filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

fn at_least(text: &str, name: &str, labels: &[(&str, &str)], min: f64) {
    let v = value(text, name, labels);
    assert!(
        v.is_some_and(|v| v >= min),
        "{name}{labels:?} should be >= {min}, is {v:?}; scrape:\n{text}"
    );
}

/// Waits until a fresh scrape of `addr` satisfies `ok`; returns that scrape.
fn wait_scrape(addr: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(what, READY_TIMEOUT, || {
            let text = scrape(addr);
            let pass = ok(&text);
            last = text.clone();
            pass.then_some(text)
        })
    }));
    found.unwrap_or_else(|_| panic!("timed out waiting for {what}; last scrape:\n{last}"))
}

fn promtool() -> PathBuf {
    let ok = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "promtool is missing: run scripts/install-deps.sh (it installs Debian's `prometheus` package, which ships promtool)"
    );
    PathBuf::from("promtool")
}

/// `promtool check metrics` on a scrape: parse errors and lint problems both fail.
fn promtool_check_metrics(text: &str, what: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the {what} scrape:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn ready(addr: &str) -> bool {
    http_get(addr, "/ready").is_some_and(|(s, _)| s == 200)
}

/// Fetches an X509-SVID and a JWT-SVID from this test process (which stays alive, so
/// the agent holds its instance), and makes one call refused by the missing header.
fn with_header<T>(mut r: tonic::Request<T>) -> tonic::Request<T> {
    r.metadata_mut()
        .insert(ztid_proto::WORKLOAD_API_HEADER, "true".parse().unwrap());
    r
}

fn workload_traffic(agent: &Agent) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = ztid_proto::transport::unix_channel(agent.socket())
            .await
            .unwrap();
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let mut stream = client
            .fetch_x509svid(with_header(tonic::Request::new(wpb::X509svidRequest {})))
            .await
            .expect("X509-SVID stream opens")
            .into_inner();
        let first = stream.message().await.unwrap().expect("an X509-SVID");
        assert_eq!(first.svids.len(), 1);
        let jwt = client
            .fetch_jwtsvid(with_header(tonic::Request::new(wpb::JwtsvidRequest {
                audience: vec!["telemetry".into()],
                spiffe_id: String::new(),
            })))
            .await
            .expect("JWT-SVID");
        assert_eq!(jwt.get_ref().svids.len(), 1);
        let err = client
            .fetch_jwtsvid(wpb::JwtsvidRequest {
                audience: vec!["telemetry".into()],
                spiffe_id: String::new(),
            })
            .await
            .expect_err("refused without the security header");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let channel = ztid_proto::transport::unix_channel(agent.socket())
            .await
            .unwrap();
        sds_traffic(channel).await;
    });
}

/// Envoy's SDS on the same socket: a fetch served, one refused, a stream opened.
async fn sds_traffic(channel: tonic::transport::Channel) {
    use ztid_proto::envoy_sds::envoy::service::discovery::v3::DiscoveryRequest;
    use ztid_proto::envoy_sds::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    let req = |names: &[&str]| DiscoveryRequest {
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
        ..Default::default()
    };
    let mut sds = SecretDiscoveryServiceClient::new(channel);
    let fetched = sds
        .fetch_secrets(req(&["default", "ROOTCA"]))
        .await
        .expect("SDS fetch");
    assert_eq!(fetched.get_ref().resources.len(), 2);
    let err = sds
        .fetch_secrets(req(&["spiffe://example.org/not-mine"]))
        .await
        .expect_err("a name this process may not be served");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(req(&["default"])).await.unwrap();
    let mut stream = sds
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("SDS stream opens")
        .into_inner();
    let first = stream
        .message()
        .await
        .unwrap()
        .expect("the first SDS response");
    assert_eq!(first.resources.len(), 1);
}

#[test]
fn server_and_agent_metrics_after_real_traffic() {
    let server_metrics = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start_with(TD, &["--metrics", &server_metrics]);
    assert_eq!(
        http_get(&server_metrics, "/live").map(|(s, _)| s),
        Some(200)
    );
    wait_for("server /ready", READY_TIMEOUT, || {
        ready(&server_metrics).then_some(())
    });
    assert_eq!(
        http_get(&server_metrics, "/nope").map(|(s, _)| s),
        Some(404)
    );

    // A refused attestation: a token the server never issued.
    let refused = Agent::start_with_token(&server, "0123456789abcdef-not-a-token");
    assert!(refused.is_err(), "a made-up token must not attest");

    // A real agent with its own telemetry listener.
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start_with_args(&server, &["--metrics", &agent_metrics]);
    assert_eq!(http_get(&agent_metrics, "/live").map(|(s, _)| s), Some(200));
    wait_for("agent /ready", READY_TIMEOUT, || {
        ready(&agent_metrics).then_some(())
    });

    // A workload without an entry is refused (PermissionDenied) ...
    let r = agent.cli(&["api", "fetch", "x509"]);
    assert!(!r.ok, "no entry yet, so no identity: {}", r.stdout);
    // ... then gets its SVIDs once its entry exists.
    entry_for_my_uid(&server, &agent, "spiffe://example.org/telemetry", &[]);
    wait_for("the entry to reach the agent", READY_TIMEOUT, || {
        agent.cli(&["api", "fetch", "x509"]).ok.then_some(())
    });
    workload_traffic(&agent);

    // A refused node API call: an evicted agent's next sync.
    let evicted = Agent::start(&server);
    server.cli_ok(&["agent", "evict", &evicted.spiffe_id]);

    let s = wait_scrape(&server_metrics, "server counters", |t| {
        value(
            t,
            "ztid_node_api_refusals_total",
            &[("reason", "unknown_agent")],
        )
        .is_some_and(|v| v >= 1.0)
            && value(t, "ztid_entries", &[]) == Some(1.0)
    });
    at_least(
        &s,
        "ztid_attestations_total",
        &[("method", "join-token"), ("outcome", "passed")],
        2.0,
    );
    at_least(
        &s,
        "ztid_attestations_total",
        &[("method", "join-token"), ("outcome", "refused")],
        1.0,
    );
    at_least(
        &s,
        "ztid_attestation_failures_total",
        &[("method", "join-token"), ("reason", "token_unknown")],
        1.0,
    );
    at_least(&s, "ztid_svids_issued_total", &[("kind", "x509")], 1.0);
    at_least(&s, "ztid_svids_issued_total", &[("kind", "jwt")], 1.0);
    at_least(&s, "ztid_svids_issued_total", &[("kind", "agent")], 2.0);
    at_least(
        &s,
        "ztid_svid_issue_seconds_count",
        &[("rpc", "SignX509Svids")],
        1.0,
    );
    at_least(
        &s,
        "ztid_svid_issue_seconds_count",
        &[("rpc", "MintJwtSvids")],
        1.0,
    );
    at_least(
        &s,
        "ztid_node_api_calls_total",
        &[("rpc", "SyncEntries"), ("outcome", "OK")],
        1.0,
    );
    at_least(
        &s,
        "ztid_node_api_calls_total",
        &[("rpc", "SyncEntries"), ("outcome", "Unauthenticated")],
        1.0,
    );
    at_least(&s, "ztid_agents", &[("state", "active")], 1.0);
    at_least(&s, "ztid_agent_mint_rate_max", &[], 1.0);
    at_least(&s, "ztid_audit_records_total", &[], 5.0);
    assert_eq!(value(&s, "ztid_audit_writable", &[]), Some(1.0));
    assert_eq!(value(&s, "ztid_agent_mint_rate_high_total", &[]), Some(0.0));
    for kind in ["x509", "jwt"] {
        let left = value(
            &s,
            "ztid_authority_expiry_seconds",
            &[("kind", kind), ("state", "active")],
        )
        .expect("active authority expiry");
        assert!(left > 0.0 && left <= 30.0 * 86400.0, "{kind}: {left}");
        assert_eq!(
            value(&s, "ztid_authority_prepared", &[("kind", kind)]),
            Some(0.0)
        );
    }
    // Preparing a successor shows at once.
    server.cli_ok(&["authority", "x509", "prepare"]);
    let s = scrape(&server_metrics);
    assert_eq!(
        value(&s, "ztid_authority_prepared", &[("kind", "x509")]),
        Some(1.0)
    );
    assert!(value(
        &s,
        "ztid_authority_expiry_seconds",
        &[("kind", "x509"), ("state", "prepared")]
    )
    .is_some());
    promtool_check_metrics(&s, "ztid-server");

    let a = wait_scrape(&agent_metrics, "agent counters", |t| {
        value(t, "ztid_workload_instances", &[]).is_some_and(|v| v >= 1.0)
    });
    at_least(
        &a,
        "ztid_workload_api_calls_total",
        &[("rpc", "FetchX509SVID"), ("outcome", "PermissionDenied")],
        1.0,
    );
    at_least(
        &a,
        "ztid_workload_api_calls_total",
        &[("rpc", "FetchX509SVID"), ("outcome", "OK")],
        2.0,
    );
    at_least(
        &a,
        "ztid_workload_api_calls_total",
        &[("rpc", "FetchJWTSVID"), ("outcome", "OK")],
        1.0,
    );
    at_least(
        &a,
        "ztid_workload_api_calls_total",
        &[("rpc", "FetchJWTSVID"), ("outcome", "InvalidArgument")],
        1.0,
    );
    at_least(
        &a,
        "ztid_workload_api_seconds_count",
        &[("rpc", "FetchX509SVID")],
        3.0,
    );
    at_least(
        &a,
        "ztid_sds_calls_total",
        &[("rpc", "FetchSecrets"), ("outcome", "OK")],
        1.0,
    );
    at_least(
        &a,
        "ztid_sds_calls_total",
        &[("rpc", "FetchSecrets"), ("outcome", "InvalidArgument")],
        1.0,
    );
    at_least(
        &a,
        "ztid_sds_calls_total",
        &[("rpc", "StreamSecrets"), ("outcome", "OK")],
        1.0,
    );
    at_least(
        &a,
        "ztid_sds_seconds_count",
        &[("rpc", "FetchSecrets")],
        2.0,
    );
    assert_eq!(
        value(
            &a,
            "ztid_workload_api_calls_total",
            &[("rpc", "unknown"), ("outcome", "OK")]
        ),
        None,
        "SDS calls are not counted as Workload API calls"
    );
    at_least(
        &a,
        "ztid_workload_svids_minted_total",
        &[("kind", "x509")],
        1.0,
    );
    at_least(
        &a,
        "ztid_workload_svids_minted_total",
        &[("kind", "jwt")],
        1.0,
    );
    at_least(&a, "ztid_agent_svid_expiry_seconds", &[], 60.0);
    at_least(
        &a,
        "ztid_agent_last_sync_success_timestamp_seconds",
        &[],
        1.0,
    );
    assert_eq!(value(&a, "ztid_agent_sync_failures_total", &[]), Some(0.0));
    promtool_check_metrics(&a, "ztid-agent");

    // The server goes away: the agent's syncs fail and say so; it still serves.
    if let Some(mut p) = server.proc.take() {
        p.stop();
    }
    assert!(
        http_get(&server_metrics, "/live").is_none(),
        "the server's listener went with it"
    );
    let a = wait_scrape(&agent_metrics, "agent sync failures", |t| {
        value(t, "ztid_agent_sync_failures_total", &[]).is_some_and(|v| v >= 1.0)
    });
    assert!(
        ready(&agent_metrics),
        "the agent still serves its workloads"
    );
    promtool_check_metrics(&a, "ztid-agent (server down)");
    drop(evicted);
}

#[test]
fn audit_self_check_passes_then_reports_a_tampered_log() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start_with(TD, &["--metrics", &metrics]);
    for _ in 0..3 {
        server.token();
    }
    // The self-check runs at start: restart so it walks real records.
    server.restart();
    let s = wait_scrape(&metrics, "a passing audit self-check", |t| {
        value(t, "ztid_audit_verify_records", &[]).is_some_and(|v| v >= 3.0)
    });
    assert_eq!(value(&s, "ztid_audit_verify_ok", &[]), Some(1.0));
    assert_eq!(
        value(&s, "ztid_audit_verify_failures_total", &[]),
        Some(0.0)
    );
    at_least(
        &s,
        "ztid_audit_verify_last_success_timestamp_seconds",
        &[],
        1.0,
    );

    // Change one byte of the first record: the next check (at the next start) must fail.
    let log = server.data_dir().join("audit/audit.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes
        .windows(b"join_token_created".len())
        .position(|w| w == b"join_token_created")
        .expect("a join_token_created record");
    bytes[at] = b'J';
    std::fs::write(&log, &bytes).unwrap();
    server.restart();
    let s = wait_scrape(&metrics, "a failing audit self-check", |t| {
        value(t, "ztid_audit_verify_failures_total", &[]).is_some_and(|v| v >= 1.0)
    });
    assert_eq!(value(&s, "ztid_audit_verify_ok", &[]), Some(0.0));
    wait_for("the audit_verify_failed log event", READY_TIMEOUT, || {
        server
            .log_text()
            .contains("audit_verify_failed")
            .then_some(())
    });
    promtool_check_metrics(&s, "ztid-server (tampered audit log)");
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy_dir();
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new(promtool())
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
