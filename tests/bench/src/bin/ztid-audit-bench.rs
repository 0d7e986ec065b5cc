//! Mint throughput through the node API with the audit log on and off, in one run:
//! two real servers (identical but for `audit_enabled`), one agent each, the same
//! client load against both in alternating rounds, and the raw ring/rcgen CSR
//! verify-plus-sign rate (2 threads, in this process) measured before and after, so
//! the best durable mint rate is compared with the raw rate of the same run. Per row:
//! the median and the range of the rounds, the server's CPU per SVID, the audit
//! batches (seals) per second, and how much of the machine other processes used.
//! A benchmark, not a test: nothing is asserted about speed.
//!
//! `cargo run --release -p ztid-bench --bin ztid-audit-bench [-- --secs S --rounds N]`
//! (`--summary-json PATH` also writes the figures as JSON, for `scripts/perf-targets.sh`).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ztid_agent::node_client::connect;
use ztid_proto::node as pb;
use ztid_spiffe::tls::{shared_roots, ServerSvidVerifier};
use ztid_tests::*;

// The raw-rate measurement and the /proc readings of `ztid-bench`, shared as files.
#[allow(dead_code)]
#[path = "ztid-bench/measure.rs"]
mod measure;
#[allow(dead_code)]
#[path = "ztid-bench/raw_crypto.rs"]
mod raw_crypto;

/// Mint throughput through the node API with the audit log on and off: two real
/// servers, one agent each, the same load against both, alternated.
#[derive(Parser, Debug)]
#[command(name = "ztid-audit-bench")]
struct Cli {
    /// Seconds of each measurement window.
    #[arg(long, value_name = "S", default_value_t = 3.0)]
    secs: f64,
    /// Alternated off/on rounds per row (the median is reported, with the range).
    #[arg(long, value_name = "N", default_value_t = 5)]
    rounds: usize,
    /// Rows as BATCHxIN_FLIGHT[xCONNS], comma-separated.
    #[arg(
        long,
        value_name = "ROWS",
        default_value = "1x1,1x16,1x64x2,10x8,100x4x2"
    )]
    rows: String,
    /// Also write the run's figures here as JSON (read by `scripts/perf-targets.sh`).
    #[arg(long, value_name = "PATH")]
    summary_json: Option<std::path::PathBuf>,
}

/// What `raw_crypto` reads of `ztid-bench`'s options.
pub struct Opts {
    quick: bool,
    secs: f64,
}

impl Opts {
    fn dur(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
    }
}

const TD: &str = "bench.test";

struct Target {
    server: Server,
    agent: Agent,
    clients: Vec<ztid_proto::node::node_client::NodeClient<tonic::transport::Channel>>,
    entry: String,
}

fn target(rt: &tokio::runtime::Runtime, audit: bool, conns: usize) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, format!("audit_enabled = {audit}\n")).unwrap();
    let server = Server::start_with(TD, &["--config", cfg.to_str().unwrap()]);
    std::mem::forget(dir); // the config must outlive the server
    let agent = Agent::start(&server);
    let entry = entry_for_my_uid(&server, &agent, "spiffe://bench.test/w", &["--shared"]);
    let verifier = Arc::new(ServerSvidVerifier::new(
        shared_roots(bundle_roots(&server)),
        format!("spiffe://{TD}/ztid/server"),
    ));
    let _g = rt.enter();
    let clients = (0..conns)
        .map(|_| {
            connect(
                server.addr().parse().unwrap(),
                verifier.clone(),
                Some(agent.own_svid().certified_key().unwrap()),
            )
            .unwrap()
        })
        .collect();
    Target {
        server,
        agent,
        clients,
        entry,
    }
}

/// Seals (one per batch made durable) in the audit log so far; 0 without one.
fn seals(t: &Target) -> u64 {
    std::fs::read(t.server.data_dir().join("audit/audit.log"))
        .map(|b| b.windows(7).filter(|w| w == b"\"seal\":").count() as u64)
        .unwrap_or(0)
}

/// One window: SVIDs per second, server CPU µs per SVID, batches (seals) per second.
struct Window {
    rate: f64,
    cpu_us: f64,
    batches: f64,
}

/// SVIDs per second over `secs`, with `in_flight` concurrent calls of `batch` CSRs
/// spread over the target's connections.
fn measure(
    rt: &tokio::runtime::Runtime,
    t: &Target,
    csrs: &Arc<Vec<Vec<u8>>>,
    (batch, in_flight, conns): (usize, usize, usize),
    secs: f64,
) -> Window {
    let done = Arc::new(AtomicU64::new(0));
    let seals0 = seals(t);
    let cpu = measure::CpuWindow::start(
        t.server.proc.as_ref().unwrap().child.id(),
        t.agent.proc.child.id(),
    );
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for k in 0..in_flight {
            let (mut c, done, csrs, entry) = (
                t.clients[k % conns.min(t.clients.len())].clone(),
                done.clone(),
                csrs.clone(),
                t.entry.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut i = k * batch;
                while Instant::now() < deadline {
                    let requests = (0..batch)
                        .map(|j| pb::SvidRequest {
                            entry_id: entry.clone(),
                            csr: csrs[(i + j) % csrs.len()].clone(),
                        })
                        .collect();
                    i += batch;
                    let r = c
                        .sign_x509_svids(pb::SignX509SvidsRequest { requests })
                        .await
                        .expect("SignX509Svids");
                    let ok = r
                        .into_inner()
                        .results
                        .iter()
                        .filter(|r| matches!(r.result, Some(pb::svid_result::Result::Svid(_))))
                        .count();
                    assert_eq!(ok, batch, "every CSR signed");
                    done.fetch_add(ok as u64, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let [server_cpu, _, _] = cpu.stop();
    let n = done.load(Ordering::Relaxed) as f64;
    Window {
        rate: n / elapsed,
        cpu_us: server_cpu * 1e6 / n.max(1.0),
        batches: (seals(t) - seals0) as f64 / elapsed,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(0.0, f64::max);
    format!("{}–{}", measure::thousands(lo), measure::thousands(hi))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn raw_rate(csrs: &[Vec<u8>], secs: f64) -> f64 {
    raw_crypto::raw_crypto(&Opts { quick: false, secs }, csrs).rate2
}

fn main() {
    let cli = Cli::parse();
    let rows: Vec<(usize, usize, usize)> = cli
        .rows
        .split(',')
        .map(|r| {
            let f: Vec<usize> = r.split('x').map(|x| x.trim().parse().unwrap()).collect();
            (f[0], f[1], f.get(2).copied().unwrap_or(1))
        })
        .collect();
    let conns = rows.iter().map(|r| r.2).max().unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let load_start = loadavg();
    println!(
        "start {} UTC, load average {load_start}",
        measure::sh("date", &["-u", "+%Y-%m-%d %H:%M"]),
    );
    let on = target(&rt, true, conns);
    let off = target(&rt, false, conns);
    assert!(
        on.server.data_dir().join("audit/audit.log").exists()
            && !off.server.data_dir().join("audit").exists()
    );
    let csrs = Arc::new(
        (0..500)
            .map(|_| csr_for("spiffe://bench.test/w"))
            .collect::<Vec<_>>(),
    );
    let raw_before = raw_rate(&csrs, cli.secs);
    println!("raw ring/rcgen CSR verify+sign, 2 threads: {raw_before:.0}/s");
    println!(
        "| load | audit off SVIDs/s (median, range) | audit on SVIDs/s (median, range) | on/off | per-round on/off | server CPU µs/SVID off / on | batches/s | SVIDs per batch | others' CPU (max share) |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|---:|---:|");
    let mut best_on: f64 = 0.0;
    let mut best_off: f64 = 0.0;
    let (mut best_on_row, mut best_off_row) = (String::new(), String::new());
    let mut summary_rows = Vec::new();
    for row in &rows {
        let (batch, in_flight, c) = *row;
        let _ = measure(&rt, &off, &csrs, *row, 0.5); // warm-up
        let _ = measure(&rt, &on, &csrs, *row, 0.5);
        let (mut r_off, mut r_on) = (Vec::new(), Vec::new());
        let _ = measure::take_foreign_max();
        for round in 0..cli.rounds {
            // Alternate which goes first, so a burst of other work hits both alike.
            if round % 2 == 0 {
                r_off.push(measure(&rt, &off, &csrs, *row, cli.secs));
                r_on.push(measure(&rt, &on, &csrs, *row, cli.secs));
            } else {
                r_on.push(measure(&rt, &on, &csrs, *row, cli.secs));
                r_off.push(measure(&rt, &off, &csrs, *row, cli.secs));
            }
        }
        let rates = |v: &[Window]| v.iter().map(|w| w.rate).collect::<Vec<_>>();
        let (a, b) = (median(&rates(&r_off)), median(&rates(&r_on)));
        let name = format!("{batch}x{in_flight}x{c}");
        if b > best_on {
            (best_on, best_on_row) = (b, name.clone());
        }
        if a > best_off {
            (best_off, best_off_row) = (a, name.clone());
        }
        let per_round: Vec<f64> = r_on
            .iter()
            .zip(&r_off)
            .map(|(n, f)| n.rate / f.rate)
            .collect();
        let lo = per_round.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = per_round.iter().cloned().fold(0.0, f64::max);
        let batches = median(&r_on.iter().map(|w| w.batches).collect::<Vec<_>>());
        let foreign = measure::take_foreign_max();
        summary_rows.push(serde_json::json!({
            "row": name, "batch": batch, "in_flight": in_flight, "conns": c,
            "off": a, "on": b, "on_off": b / a, "on_off_rounds": [lo, hi],
            "svids_per_batch": b / batches.max(1.0), "others_cpu_max": foreign,
        }));
        println!(
            "| {batch} CSR/call, {in_flight} in flight, {c} conn | {} ({}) | {} ({}) | **{:.2}** | {lo:.2}–{hi:.2} | {:.0} / {:.0} | {} | {:.1} | {:.0}% |",
            measure::thousands(a),
            range(&rates(&r_off)),
            measure::thousands(b),
            range(&rates(&r_on)),
            b / a,
            median(&r_off.iter().map(|w| w.cpu_us).collect::<Vec<_>>()),
            median(&r_on.iter().map(|w| w.cpu_us).collect::<Vec<_>>()),
            measure::thousands(batches),
            b / batches.max(1.0),
            foreign * 100.0,
        );
    }
    let raw_after = raw_rate(&csrs, cli.secs);
    let raw = (raw_before + raw_after) / 2.0;
    println!(
        "raw 2-thread rate {raw_before:.0}/s before, {raw_after:.0}/s after (mean {raw:.0}/s); best durable mint {best_on:.0}/s = {:.2} of raw; best with the audit log off {best_off:.0}/s = {:.2} of raw",
        best_on / raw,
        best_off / raw
    );
    println!(
        "end {} UTC, load average {}",
        measure::sh("date", &["-u", "+%Y-%m-%d %H:%M"]),
        loadavg()
    );
    if let Some(path) = &cli.summary_json {
        let summary = serde_json::json!({
            "secs": cli.secs, "rounds": cli.rounds,
            "load_start": load_start, "load_end": loadavg(),
            "raw_before": raw_before, "raw_after": raw_after, "raw_mean": raw,
            "best_on": best_on, "best_on_row": best_on_row,
            "best_off": best_off, "best_off_row": best_off_row,
            "rows": summary_rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    }
}
