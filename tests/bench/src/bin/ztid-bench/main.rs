//! `ztid-bench`: a benchmark (not a test) of the real `ztid-server` and `ztid-agent`
//! processes on this machine. It measures
//!
//! (a) X.509-SVIDs minted per second through the node API (mutual TLS with the real
//!     agent SVID, `SignX509Svids`), next to the raw rcgen/ring CSR-verify-plus-sign rate
//!     (`throughput.rs`, `raw_crypto.rs`);
//! (b) Workload API `FetchX509SVID` latency over the agent's Unix socket, for an identity
//!     already held and for the first call of a fresh process (`fetch_latency.rs`);
//! (c) mint latency with 1,000 and with 1,000,000 registration entries (`entries.rs`);
//! (d) agent memory at 1,000 live workload instances (`memory.rs`);
//!
//! prints a markdown table and rewrites `docs/performance.md` (`report.rs`,
//! `document.rs`, `analysis.rs`).
//!
//! Run: `cargo run --release -p ztid-bench --bin ztid-bench` (it builds the server and
//! agent binaries first). Options: `--quick` (short smoke run, no doc), `--entries N`,
//! `--instances N`, `--secs S`, `--wait-quiet S` (how long to wait for other processes
//! to leave the machine idle first; default 300), `--no-doc`, `--out PATH`.
//! Internal modes: `ztid-bench worker ENDPOINT` (connect, fetch once, print the
//! latency) and `ztid-bench hold ENDPOINT` (fetch once, then wait for stdin to close).
#![forbid(unsafe_code)]

mod analysis;
mod disk;
mod document;
mod entries;
mod fetch_latency;
mod measure;
mod memory;
mod new_process;
mod node_api;
mod raw_crypto;
mod report;
mod throughput;
mod workers;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ztid_proto::node as pb;
use ztid_tests::{entry_for_my_uid, Agent, Server, READY_TIMEOUT};

use measure::{log, us, CpuWindow};
use node_api::{agent_client, server_pid_of, wait_node_api};

pub const TD: &str = "bench.test";
pub const BENCH_ID: &str = "spiffe://bench.test/bench";

/// Benchmark of the real ztid-server and ztid-agent on this machine: node API minting
/// throughput, Workload API latency, mint latency against the number of entries, agent
/// memory per live instance. Prints a summary and rewrites docs/performance.md.
#[derive(Parser, Debug)]
#[command(name = "ztid-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Short smoke run: 20,000 entries, 100 instances, 1.5 s windows, at most 10 s of
    /// waiting for a quiet machine, no document (options given explicitly still apply).
    #[arg(long)]
    quick: bool,
    /// Registration entries of the big server in (c) [default: 1000000; --quick 20000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1001..))]
    entries: Option<u64>,
    /// Live workload instances in (d) [default: 1000; --quick 100].
    #[arg(long, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    instances: Option<usize>,
    /// Seconds of each measurement window [default: 5; --quick 1.5].
    #[arg(long, value_name = "S", value_parser = positive_secs)]
    secs: Option<f64>,
    /// At most this many seconds of waiting for other processes to leave the machine
    /// idle first [default: 300; --quick 10].
    #[arg(long = "wait-quiet", value_name = "S", value_parser = non_negative_secs)]
    wait_quiet: Option<f64>,
    /// Do not write docs/performance.md (the later of --no-doc and --out wins).
    #[arg(long = "no-doc", overrides_with = "out")]
    no_doc: bool,
    /// Write the document here instead of docs/performance.md.
    #[arg(long, value_name = "PATH", overrides_with = "no_doc")]
    out: Option<PathBuf>,
    /// Measure only (b) for new processes and held identities, alternating between an
    /// agent without and one with a pool of N SVIDs minted ahead; prints a table and
    /// writes no document.
    #[arg(long = "new-process-only", value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16))]
    new_process_only: Option<usize>,
}

/// Internal modes: the worker processes this benchmark starts from its own binary.
#[derive(Subcommand, Debug)]
enum Mode {
    /// Connect to the Workload API at ENDPOINT, fetch once, print the latency, exit.
    Worker { endpoint: String },
    /// Fetch once from ENDPOINT, print the latency, then wait for stdin to close.
    Hold { endpoint: String },
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

/// The run's settings, after the defaults and `--quick` are applied.
#[derive(Clone, Debug)]
pub struct Opts {
    pub quick: bool,
    pub entries: u64,
    pub instances: usize,
    pub secs: f64,
    pub wait_quiet: f64,
    pub doc: Option<PathBuf>,
}

impl Opts {
    fn from_cli(c: &Cli) -> Self {
        let q = c.quick;
        let doc = if c.no_doc {
            None
        } else if let Some(out) = &c.out {
            Some(out.clone())
        } else if q {
            None
        } else {
            Some(workspace_root().join("docs/performance.md"))
        };
        Opts {
            quick: q,
            entries: c.entries.unwrap_or(if q { 20_000 } else { 1_000_000 }),
            instances: c.instances.unwrap_or(if q { 100 } else { 1000 }),
            secs: c.secs.unwrap_or(if q { 1.5 } else { 5.0 }),
            wait_quiet: c.wait_quiet.unwrap_or(if q { 10.0 } else { 300.0 }),
            doc,
        }
    }
    pub fn dur(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
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

/// Builds `ztid-server` and `ztid-agent` in this binary's profile (unless
/// `ZTID_BIN_DIR` or `ZTID_BENCH_NO_BUILD` is set) and points the harness at them.
fn build_binaries() {
    if std::env::var_os("ZTID_BIN_DIR").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("bin dir").to_path_buf();
    let release = dir.file_name().is_some_and(|n| n == "release");
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
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build of the server and agent failed");
    }
    if !release {
        log("WARNING: not a release build; figures are meaningless (use --release)");
    }
    std::env::set_var("ZTID_BIN_DIR", &dir);
}

fn main() {
    let cli = Cli::parse();
    match &cli.mode {
        Some(Mode::Worker { endpoint }) => workers::worker(endpoint),
        Some(Mode::Hold { endpoint }) => workers::hold(endpoint),
        None => {}
    }
    let opts = Opts::from_cli(&cli);
    // Before any thread exists: the server logs every issuance at INFO; keep the log quiet.
    if std::env::var_os("ZTID_LOG").is_none() {
        std::env::set_var("ZTID_LOG", "warn");
    }
    build_binaries();
    // The commit the binaries were just built from (the tree may move during the run).
    let rev = report::git_rev();
    let log_level = std::env::var("ZTID_LOG").unwrap_or_default();
    let bench_start = Instant::now();
    if let Some(pool) = cli.new_process_only {
        new_process::run(&opts, pool);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // ---- a quiet machine first: other processes' CPU would be measured as ours
    let quiet_start = measure::wait_machine_quiet(Duration::from_secs_f64(opts.wait_quiet));
    if quiet_start.0 >= 0.05 {
        log(format!(
            "WARNING: starting anyway, other processes use {:.0}% of the machine; figures will be low",
            quiet_start.0 * 100.0
        ));
    }

    // ---- raw crypto
    log("raw rcgen/ring CSR verify + sign");
    let raw_csrs = raw_crypto::csr_pool(1000, BENCH_ID);
    let raw_window = CpuWindow::start(0, 0);
    let raw = raw_crypto::raw_crypto(&opts, &raw_csrs);
    raw_window.stop();
    log(format!(
        "  raw: {:.0}/s on 1 thread ({:.1} µs: verify {:.1} + sign {:.1}), {:.0}/s on 2 threads",
        raw.rate1, raw.us_total, raw.us_verify, raw.us_sign, raw.rate2
    ));

    // ---- server, agent, entry
    log("starting ztid-server and ztid-agent");
    let mut server = Server::start(TD);
    let agent = Agent::start(&server);
    let agent_pid = agent.proc.child.id();
    let entry_id = entry_for_my_uid(&server, &agent, BENCH_ID, &[]);
    let endpoint = agent.endpoint();
    // The server's audit log fdatasyncs before every answer: how fast is this disk?
    let fsync_early = disk::fsync_probe(&server.data_dir(), 300);
    log(format!(
        "  fdatasync in the server's data dir: p50 {} p99 {}",
        us(fsync_early.p50),
        us(fsync_early.p99)
    ));
    let held_rt = measure::client_runtime();
    // The entry reaches the agent on its next sync.
    let held_client = held_rt.block_on(async {
        let c = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .expect("connect to agent");
        let start = Instant::now();
        loop {
            match c.fetch_x509_svid().await {
                Ok(s) => {
                    assert!(s.spiffe_id().to_string().starts_with(BENCH_ID));
                    break;
                }
                Err(e) => {
                    assert!(
                        start.elapsed() < READY_TIMEOUT,
                        "no SVID from the agent: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        c
    });
    let clients: Vec<_> = {
        let _g = rt.enter();
        (0..2).map(|_| agent_client(&server, &agent)).collect()
    };
    let csrs = Arc::new(raw_csrs);
    wait_node_api(&rt, &clients[0], &entry_id, &csrs[0]);
    // Sanity: the SVID carries the CSR's identity.
    {
        let mut c = clients[0].clone();
        let r = rt
            .block_on(c.sign_x509_svids(pb::SignX509SvidsRequest {
                requests: vec![pb::SvidRequest {
                    entry_id: entry_id.clone(),
                    csr: csrs[3].clone(),
                }],
            }))
            .unwrap()
            .into_inner();
        match &r.results[0].result {
            Some(pb::svid_result::Result::Svid(s)) => {
                assert_eq!(s.spiffe_id, format!("{BENCH_ID}/{:032x}", 3));
                assert_eq!(ztid_tests::spiffe_id_of(&s.cert_chain[0]), s.spiffe_id);
            }
            other => panic!("SignX509Svids refused the bench CSR: {other:?}"),
        }
    }

    let pids = (server_pid_of(&server), agent_pid);
    let throughput = throughput::throughput(&rt, &clients, &entry_id, &csrs, opts.dur(), pids);
    let fetch = fetch_latency::fetch_latency(&held_rt, &held_client, &endpoint, &opts, pids);
    let mem = memory::memory_at_instances(agent_pid, &endpoint, opts.instances);
    drop(held_client);
    let entries = entries::entries(&rt, &mut server, &agent, &clients, &entry_id, &csrs, &opts);

    let total = bench_start.elapsed();
    entries::stop_server(&mut server);
    drop(agent);

    // ---- report
    let r = report::Report {
        opts: opts.clone(),
        log_level,
        raw,
        throughput,
        fetch,
        entries,
        mem,
        total,
        quiet_start,
        foreign_max: measure::foreign_max(),
        fsync_early,
        git_rev: rev,
        kept_notes: report::kept_notes(opts.doc.as_deref()),
    };
    let summary = r.summary_table();
    println!("{summary}");
    if let Some(path) = &opts.doc {
        std::fs::create_dir_all(path.parent().unwrap()).ok();
        std::fs::write(path, r.document()).expect("write docs/performance.md");
        log(format!("wrote {}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn opts(args: &[&str]) -> Opts {
        let cli = Cli::try_parse_from(std::iter::once("ztid-bench").chain(args.iter().copied()))
            .expect("parses");
        assert!(cli.mode.is_none());
        Opts::from_cli(&cli)
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_quick() {
        let o = opts(&[]);
        assert!(!o.quick);
        assert_eq!(
            (o.entries, o.instances, o.secs, o.wait_quiet),
            (1_000_000, 1000, 5.0, 300.0)
        );
        assert_eq!(o.doc, Some(workspace_root().join("docs/performance.md")));
        let q = opts(&["--quick"]);
        assert!(q.quick);
        assert_eq!(
            (q.entries, q.instances, q.secs, q.wait_quiet),
            (20_000, 100, 1.5, 10.0)
        );
        assert_eq!(q.doc, None);
        // Explicit options apply with --quick, before or after it.
        let q = opts(&[
            "--entries",
            "5000",
            "--quick",
            "--secs",
            "0.5",
            "--wait-quiet",
            "0",
        ]);
        assert_eq!(
            (q.entries, q.instances, q.secs, q.wait_quiet),
            (5000, 100, 0.5, 0.0)
        );
        assert_eq!(opts(&["--instances", "7"]).instances, 7);
    }

    #[test]
    fn document_destination() {
        assert_eq!(opts(&["--no-doc"]).doc, None);
        assert_eq!(opts(&["--out", "x.md"]).doc, Some(PathBuf::from("x.md")));
        assert_eq!(
            opts(&["--quick", "--out", "x.md"]).doc,
            Some(PathBuf::from("x.md"))
        );
        // The later of --no-doc and --out wins.
        assert_eq!(
            opts(&["--no-doc", "--out", "x.md"]).doc,
            Some(PathBuf::from("x.md"))
        );
        assert_eq!(opts(&["--out", "x.md", "--no-doc"]).doc, None);
    }

    #[test]
    fn worker_modes_and_refusals() {
        let c = Cli::try_parse_from(["ztid-bench", "worker", "unix:/tmp/s"]).unwrap();
        assert!(matches!(c.mode, Some(Mode::Worker { endpoint }) if endpoint == "unix:/tmp/s"));
        let c = Cli::try_parse_from(["ztid-bench", "hold", "unix:/tmp/s"]).unwrap();
        assert!(matches!(c.mode, Some(Mode::Hold { endpoint }) if endpoint == "unix:/tmp/s"));
        for bad in [
            &["--entries", "1000"][..],
            &["--instances", "0"],
            &["--secs", "0"],
            &["--secs", "x"],
            &["--wait-quiet", "-1"],
            &["--bogus"],
        ] {
            let args = std::iter::once("ztid-bench").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }
}
