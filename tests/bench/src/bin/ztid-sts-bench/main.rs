//! `ztid-sts-bench`: a benchmark (not a test) of the token endpoint (issue 14,
//! docs/token-exchange.md) of a real release `ztid-server`. On this machine it measures
//! `POST /token` exchanges per second and their p50/p99 latency at 1 and at 16 requests
//! in flight (keep-alive HTTPS/1.1 connections), for
//!
//! - **direct, mTLS**: the subject presents its X.509-SVID as the TLS client certificate;
//! - **direct, JWT-SVID**: the subject sends its JWT-SVID (`aud` = the issuer) as
//!   `subject_token`, no client certificate;
//! - **delegated, mTLS**: the delegate presents its X.509-SVID and exchanges the subject's
//!   access token (`subject_token`) for a token with `act`;
//! - **delegated, JWT actor**: the same with the delegate's JWT-SVID as `actor_token`
//!   and no client certificate;
//!
//! next to the raw ES256 signing rate of ring in this process in the same run, and
//! writes the section "## Token exchange (issue 14)" of `docs/performance.md`.
//!
//! Run: `cargo build --release -p ztid-bench --bin ztid-sts-bench` then
//! `target/release/ztid-sts-bench` (it builds release `ztid-server` and `ztid-agent` first
//! unless `ZTID_BENCH_NO_BUILD` or `ZTID_BIN_DIR` is set). Options: `--secs S`,
//! `--in-flight 1,16`, `--wait-quiet S`, `--quick`, `--no-doc`, `--out PATH`.
#![forbid(unsafe_code)]

#[allow(dead_code)]
#[path = "../ztid-bench/disk.rs"]
mod disk;
#[allow(dead_code)]
#[path = "../ztid-bench/measure.rs"]
mod measure;

mod client;
mod load;
mod raw;
mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use ztid_tests::{bundle_roots, entry_for_my_uid, free_port, Agent, Server, READY_TIMEOUT};

use client::{claims_of, form, ClientCert, Endpoint, ACCESS_TOKEN_TYPE, GRANT_TYPE, JWT_TYPE};
use measure::{log, us};

pub const TD: &str = "bench.test";
/// The subject's entry (every instance of it is `SUBJECT_ID/<instance>`).
pub const SUBJECT_ID: &str = "spiffe://bench.test/sts-subject";
/// The delegate's entry.
pub const DELEGATE_ID: &str = "spiffe://bench.test/sts-delegate";
/// The target both grants name.
pub const AUDIENCE: &str = "https://bench.example/";
/// The request parameter naming the target: RFC 8707's `resource`, an absolute URI.
pub const TARGET_PARAM: &str = "resource";

/// Token endpoint (issue 14) of a real ztid-server: exchanges per second and p50/p99,
/// direct and delegated, at 1 and 16 requests in flight, against the raw ES256 rate.
#[derive(Parser, Debug, Clone)]
#[command(name = "ztid-sts-bench")]
pub struct Opts {
    /// Seconds of each measured window [default: 5; --quick 1].
    #[arg(long, value_name = "S", value_parser = positive_secs)]
    pub secs: Option<f64>,
    /// Seconds of warm-up before each window.
    #[arg(long, value_name = "S", default_value_t = 1.0, value_parser = non_negative_secs)]
    pub warmup: f64,
    /// Requests in flight (one keep-alive connection each), one window per value.
    #[arg(long = "in-flight", value_delimiter = ',', default_values_t = [1usize, 16],
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=200))]
    pub in_flight: Vec<usize>,
    /// At most this many seconds of waiting for other processes to leave the machine
    /// idle first [default: 60; --quick 0].
    #[arg(long = "wait-quiet", value_name = "S", value_parser = non_negative_secs)]
    pub wait_quiet: Option<f64>,
    /// A short smoke run: 1 s windows, no waiting, no document.
    #[arg(long)]
    pub quick: bool,
    /// Do not write docs/performance.md.
    #[arg(long = "no-doc", conflicts_with = "out")]
    pub no_doc: bool,
    /// Write the section into this file instead of docs/performance.md.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

impl Opts {
    pub fn secs(&self) -> f64 {
        self.secs.unwrap_or(if self.quick { 1.0 } else { 5.0 })
    }
    pub fn dur(&self) -> Duration {
        Duration::from_secs_f64(self.secs())
    }
    pub fn warm(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }
    pub fn wait_quiet(&self) -> f64 {
        self.wait_quiet
            .unwrap_or(if self.quick { 0.0 } else { 60.0 })
    }
    /// Where the section goes, if anywhere.
    pub fn doc(&self) -> Option<PathBuf> {
        if self.no_doc {
            None
        } else if let Some(out) = &self.out {
            Some(out.clone())
        } else if self.quick {
            None
        } else {
            Some(workspace_root().join("docs/performance.md"))
        }
    }
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn non_negative_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number of seconds")),
    }
}

/// The workspace root (this crate is `tests/bench`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf()
}

/// Builds `ztid-server` and `ztid-agent` in this binary's profile (a no-op when up to
/// date; skipped with `ZTID_BIN_DIR` or `ZTID_BENCH_NO_BUILD`) and points the harness at
/// them. Whether this is a release build.
fn build_binaries() -> bool {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("bin dir").to_path_buf();
    let release = dir.file_name().is_some_and(|n| n == "release");
    if std::env::var_os("ZTID_BIN_DIR").is_some() {
        return release;
    }
    if std::env::var_os("ZTID_BENCH_NO_BUILD").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "--bin",
            "ztid-server",
            "--bin",
            "ztid-agent",
        ]);
        if release {
            cmd.arg("--release");
        }
        log("building ztid-server and ztid-agent (no-op when up to date)");
        assert!(cmd.status().expect("cargo").success(), "cargo build failed");
    }
    if !release {
        log("WARNING: not a release build; figures are meaningless");
    }
    std::env::set_var("ZTID_BIN_DIR", &dir);
    release
}

/// One kind of exchange the benchmark drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    DirectMtls,
    DirectJwt,
    DelegatedMtls,
    DelegatedJwtActor,
}

impl Case {
    pub const ALL: [Case; 4] = [
        Case::DirectMtls,
        Case::DirectJwt,
        Case::DelegatedMtls,
        Case::DelegatedJwtActor,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Case::DirectMtls => "direct, mTLS (subject's X.509-SVID)",
            Case::DirectJwt => "direct, JWT-SVID as `subject_token`",
            Case::DelegatedMtls => "delegated, actor over mTLS",
            Case::DelegatedJwtActor => "delegated, actor's JWT-SVID as `actor_token`",
        }
    }

    pub fn delegated(self) -> bool {
        matches!(self, Case::DelegatedMtls | Case::DelegatedJwtActor)
    }
}

/// The credentials the exchanges need, from the Workload API.
struct Credentials {
    subject_id: String,
    delegate_id: String,
    subject_cert: ClientCert,
    delegate_cert: ClientCert,
    subject_jwt: String,
    delegate_jwt: String,
}

/// Fetches both X.509-SVIDs of this process (subject and delegate entries both select
/// its uid), then a JWT-SVID of each with `aud` = the issuer.
async fn credentials(endpoint: &str, issuer: &str) -> Credentials {
    let c = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .expect("connect to the agent");
    let start = Instant::now();
    let (subject, delegate) = loop {
        let svids = c.fetch_all_x509_svids().await.unwrap_or_default();
        let find = |prefix: &str| {
            svids
                .iter()
                .find(|s| s.spiffe_id().to_string().starts_with(&format!("{prefix}/")))
                .cloned()
        };
        if let (Some(s), Some(d)) = (find(SUBJECT_ID), find(DELEGATE_ID)) {
            break (s, d);
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "the agent did not serve both SVIDs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cert = |s: &spiffe::X509Svid| ClientCert {
        chain: s
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        key: s.private_key().as_bytes().to_vec(),
    };
    let jwt = |id: spiffe::SpiffeId| {
        let c = &c;
        async move {
            c.fetch_jwt_svid([issuer], Some(&id))
                .await
                .expect("JWT-SVID with aud = the issuer")
                .token()
                .to_string()
        }
    };
    Credentials {
        subject_id: subject.spiffe_id().to_string(),
        delegate_id: delegate.spiffe_id().to_string(),
        subject_cert: cert(&subject),
        delegate_cert: cert(&delegate),
        subject_jwt: jwt(subject.spiffe_id().clone()).await,
        delegate_jwt: jwt(delegate.spiffe_id().clone()).await,
    }
}

/// Waits until the token endpoint answers its metadata; returns the issuer.
async fn wait_sts(ep: &Endpoint) -> String {
    let start = Instant::now();
    loop {
        let answer = match client::Conn::open(ep).await {
            Ok(mut c) => c
                .call(
                    "GET",
                    "/.well-known/oauth-authorization-server",
                    None::<Bytes>,
                )
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match answer {
            Ok((status, body)) if status == http::StatusCode::OK => {
                let v: serde_json::Value = serde_json::from_slice(&body).expect("metadata JSON");
                return v["issuer"].as_str().expect("issuer").to_string();
            }
            other => {
                assert!(
                    start.elapsed() < READY_TIMEOUT,
                    "the token endpoint did not answer its metadata: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Endpoint and form of one case.
fn request_of(
    case: Case,
    creds: &Credentials,
    subject_token: &str,
    sts: SocketAddr,
    roots: &[Vec<u8>],
) -> (Endpoint, Bytes) {
    let mut pairs: Vec<(&str, &str)> = vec![("grant_type", GRANT_TYPE), (TARGET_PARAM, AUDIENCE)];
    let cert = match case {
        Case::DirectMtls => {
            pairs.push(("scope", "read write"));
            Some(&creds.subject_cert)
        }
        Case::DirectJwt => {
            pairs.extend([
                ("scope", "read write"),
                ("subject_token", creds.subject_jwt.as_str()),
                ("subject_token_type", JWT_TYPE),
            ]);
            None
        }
        Case::DelegatedMtls => {
            pairs.extend([
                ("scope", "read"),
                ("subject_token", subject_token),
                ("subject_token_type", ACCESS_TOKEN_TYPE),
            ]);
            Some(&creds.delegate_cert)
        }
        Case::DelegatedJwtActor => {
            pairs.extend([
                ("scope", "read"),
                ("subject_token", subject_token),
                ("subject_token_type", ACCESS_TOKEN_TYPE),
                ("actor_token", creds.delegate_jwt.as_str()),
                ("actor_token_type", JWT_TYPE),
            ]);
            None
        }
    };
    let ep = Endpoint {
        addr: sts,
        tls: client::tls_config(roots, cert),
    };
    (ep, form(&pairs))
}

/// One exchange of `case`, its token's claims checked against what the case asked.
async fn check_case(case: Case, creds: &Credentials, ep: &Endpoint, body: Bytes) -> String {
    let token = client::exchange_once(ep, body)
        .await
        .unwrap_or_else(|e| panic!("{} refused: {e}", case.label()));
    let c = claims_of(&token);
    let sub = c["sub"].as_str().unwrap_or_default();
    assert_eq!(sub, creds.subject_id, "{}: sub of {c}", case.label());
    let want_client = if case.delegated() {
        &creds.delegate_id
    } else {
        &creds.subject_id
    };
    assert_eq!(
        c["client_id"].as_str().unwrap_or_default(),
        want_client,
        "{}: client_id of {c}",
        case.label()
    );
    if case.delegated() {
        assert_eq!(
            c["act"]["sub"].as_str().unwrap_or_default(),
            creds.delegate_id,
            "{}: act of {c}",
            case.label()
        );
    }
    let bound = c.get("cnf").is_some();
    let want_bound = matches!(case, Case::DirectMtls | Case::DelegatedMtls);
    assert_eq!(bound, want_bound, "{}: cnf of {c}", case.label());
    token
}

fn main() {
    let opts = Opts::parse();
    // Before any thread exists: the server logs at INFO; keep the log quiet.
    if std::env::var_os("ZTID_LOG").is_none() {
        std::env::set_var("ZTID_LOG", "warn");
    }
    let release = build_binaries();
    let rev = report::git_rev();
    let started = time::OffsetDateTime::now_utc();
    let bench_start = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let quiet = measure::wait_machine_quiet(Duration::from_secs_f64(opts.wait_quiet()));
    if quiet.0 >= 0.05 {
        log(format!(
            "WARNING: starting anyway, other processes use {:.0}% of the machine",
            quiet.0 * 100.0
        ));
    }
    let load_start = load::loadavg1();

    // ---- the reference, in this process, before the server starts
    log("raw ES256 signing (ring), 1 and 2 threads");
    let raw = raw::raw_es256(opts.warm(), opts.dur());
    log(format!(
        "  {:.0}/s on 1 thread ({:.1} µs, {:.1} µs CPU), {:.0}/s on 2 threads",
        raw.rate1,
        raw.us_per_sign(),
        raw.cpu_us1,
        raw.rate2
    ));

    // ---- server with the token endpoint, agent, entries, grants
    let sts_port = free_port();
    let sts: SocketAddr = format!("127.0.0.1:{sts_port}").parse().expect("addr");
    log(format!("starting ztid-server (--sts {sts}) and ztid-agent"));
    let server = Server::start_with(TD, &["--sts", &sts.to_string()]);
    let agent = Agent::start(&server);
    let pids = (
        server.proc.as_ref().expect("server running").child.id(),
        agent.proc.child.id(),
    );
    entry_for_my_uid(&server, &agent, SUBJECT_ID, &[]);
    entry_for_my_uid(&server, &agent, DELEGATE_ID, &[]);
    let subject_grant = server.cli_ok(&[
        "grant",
        "create",
        "--spiffe-id",
        SUBJECT_ID,
        "--audience",
        AUDIENCE,
        "--scope",
        "read",
        "--scope",
        "write",
    ]);
    let delegate_grant = server.cli_ok(&[
        "grant",
        "create",
        "--spiffe-id",
        DELEGATE_ID,
        "--audience",
        AUDIENCE,
        "--scope",
        "read",
        "--scope",
        "write",
        "--may-delegate",
    ]);
    log(format!(
        "  grants: {} / {}",
        subject_grant.lines().next().unwrap_or(""),
        delegate_grant.lines().next().unwrap_or("")
    ));
    let roots = bundle_roots(&server);
    let fsync = disk::fsync_probe(&server.data_dir(), 300);
    log(format!(
        "  fdatasync in the server's data dir: p50 {} p99 {}",
        us(fsync.p50),
        us(fsync.p99)
    ));

    let runs = rt.block_on(async {
        let anonymous = Endpoint {
            addr: sts,
            tls: client::tls_config(&roots, None),
        };
        let issuer = wait_sts(&anonymous).await;
        log(format!("  token endpoint up, issuer {issuer}"));
        let creds = credentials(&agent.endpoint(), &issuer).await;
        log(format!(
            "  subject {} / delegate {}",
            creds.subject_id, creds.delegate_id
        ));
        // The subject's own token, bound to its certificate: what delegates exchange.
        let (ep, body) = request_of(Case::DirectMtls, &creds, "", sts, &roots);
        let subject_token = check_case(Case::DirectMtls, &creds, &ep, body).await;
        let mut runs = Vec::new();
        for case in Case::ALL {
            let (ep, body) = request_of(case, &creds, &subject_token, sts, &roots);
            check_case(case, &creds, &ep, body.clone()).await;
            for &n in &opts.in_flight {
                log(format!("{} at {n} in flight", case.label()));
                let run = client::load(&ep, body.clone(), n, opts.warm(), opts.dur(), pids).await;
                log(format!(
                    "  {:.0}/s, p50 {} p99 {}, server CPU {:.0} µs/exchange, {} errors{}",
                    run.rate(),
                    us(run.lat.p50),
                    us(run.lat.p99),
                    run.server_us(),
                    run.errors,
                    run.first_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                ));
                runs.push((case, run));
            }
        }
        (issuer, runs)
    });
    let load_end = load::loadavg1();
    let total = bench_start.elapsed();
    drop(agent);
    drop(server);

    let r = report::Report {
        opts: opts.clone(),
        release,
        rev,
        started,
        total,
        issuer: runs.0,
        sts,
        raw,
        runs: runs.1,
        fsync,
        quiet,
        load: (load_start, load_end),
        foreign_max: measure::foreign_max(),
    };
    let section = r.section();
    println!("{section}");
    if let Some(path) = opts.doc() {
        report::write_section(&path, &section);
        log(format!("wrote {}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Opts::command().debug_assert();
        let o = Opts::try_parse_from(["ztid-sts-bench"]).unwrap();
        assert_eq!(
            (o.secs(), o.wait_quiet(), o.in_flight.clone()),
            (5.0, 60.0, vec![1, 16])
        );
        assert_eq!(o.doc(), Some(workspace_root().join("docs/performance.md")));
        let q = Opts::try_parse_from(["ztid-sts-bench", "--quick", "--in-flight", "2,4"]).unwrap();
        assert_eq!(
            (q.secs(), q.wait_quiet(), q.in_flight.clone()),
            (1.0, 0.0, vec![2, 4])
        );
        assert_eq!(q.doc(), None);
        assert!(Opts::try_parse_from(["ztid-sts-bench", "--in-flight", "0"]).is_err());
        assert!(Opts::try_parse_from(["ztid-sts-bench", "--secs", "0"]).is_err());
    }

    #[test]
    fn form_encoding() {
        assert_eq!(
            form(&[
                ("a", "https://x.example/"),
                ("scope", "read write"),
                ("t", "a.b-c_~")
            ]),
            "a=https%3A%2F%2Fx.example%2F&scope=read+write&t=a.b-c_~"
        );
    }
}
