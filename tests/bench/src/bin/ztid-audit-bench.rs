//! Mint throughput through the node API with the audit log on and off, in one run:
//! two real servers (identical but for `audit_enabled`), one agent each, the same
//! client load against both, alternated three times. A benchmark, not a test.
//!
//! `cargo run --release -p ztid-bench --bin ztid-audit-bench [-- --secs S]`
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ztid_agent::node_client::connect;
use ztid_proto::node as pb;
use ztid_spiffe::tls::{shared_roots, ServerSvidVerifier};
use ztid_tests::*;

/// Mint throughput through the node API with the audit log on and off: two real
/// servers, one agent each, the same load against both, alternated three times.
#[derive(Parser, Debug)]
#[command(name = "ztid-audit-bench")]
struct Cli {
    /// Seconds of each measurement window (the median of three is reported).
    #[arg(long, value_name = "S", default_value_t = 4.0)]
    secs: f64,
}

const TD: &str = "bench.test";

struct Target {
    server: Server,
    _agent: Agent,
    client: ztid_proto::node::node_client::NodeClient<tonic::transport::Channel>,
    entry: String,
}

fn target(rt: &tokio::runtime::Runtime, audit: bool) -> Target {
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
    let client = connect(
        server.addr().parse().unwrap(),
        verifier,
        Some(agent.own_svid().certified_key().unwrap()),
    )
    .unwrap();
    Target {
        server,
        _agent: agent,
        client,
        entry,
    }
}

/// SVIDs per second over `secs`, with `in_flight` concurrent calls of `batch` CSRs.
fn measure(
    rt: &tokio::runtime::Runtime,
    t: &Target,
    csrs: &Arc<Vec<Vec<u8>>>,
    batch: usize,
    in_flight: usize,
    secs: f64,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for k in 0..in_flight {
            let (mut c, done, csrs, entry) = (
                t.client.clone(),
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
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let secs = Cli::parse().secs;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let on = target(&rt, true);
    let off = target(&rt, false);
    assert!(
        on.server.data_dir().join("audit/audit.log").exists()
            && !off.server.data_dir().join("audit").exists()
    );
    let csrs = Arc::new(
        (0..500)
            .map(|_| csr_for("spiffe://bench.test/w"))
            .collect::<Vec<_>>(),
    );
    println!("| load | audit off SVIDs/s | audit on SVIDs/s | on/off |");
    println!("|---|---:|---:|---:|");
    for (batch, in_flight) in [(1, 1), (1, 16), (10, 8), (100, 4)] {
        let _ = measure(&rt, &off, &csrs, batch, in_flight, 0.5); // warm-up
        let _ = measure(&rt, &on, &csrs, batch, in_flight, 0.5);
        let (mut r_off, mut r_on) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            r_off.push(measure(&rt, &off, &csrs, batch, in_flight, secs));
            r_on.push(measure(&rt, &on, &csrs, batch, in_flight, secs));
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let (a, b) = (med(&mut r_off), med(&mut r_on));
        println!(
            "| {batch} CSR/call, {in_flight} in flight | {a:.0} | {b:.0} | {:.2} |",
            b / a
        );
    }
}
