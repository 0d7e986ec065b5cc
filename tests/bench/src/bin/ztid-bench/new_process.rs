//! `--new-process-only`: (b) alone, with and without the agent's pool of SVIDs minted
//! ahead. One server, two agents on it (one with `svid_pool_size = 0`, one with the
//! pool), each with a per-instance entry for this uid; rounds alternate between them so
//! whatever else runs on the machine hits both alike. Prints a table; writes no document.

use std::time::{Duration, Instant};

use ztid_tests::{entry_for_my_uid, Agent, Server, READY_TIMEOUT};

use crate::fetch_latency::{fresh_processes, Fresh};
use crate::measure::{log, us, Lat};
use crate::node_api::server_pid_of;
use crate::{Opts, BENCH_ID, TD};

/// One agent's samples over every round.
#[derive(Default)]
struct Samples {
    held: Vec<Duration>,
    fresh: Vec<Duration>,
    connect: Vec<Duration>,
    failures: usize,
    /// Agent CPU seconds and calls, for the fresh processes.
    fresh_agent_cpu: f64,
    fresh_server_cpu: f64,
}

fn agent_with_pool(server: &Server, pool: usize, dir: &std::path::Path) -> Agent {
    let cfg = dir.join(format!("agent-pool-{pool}.toml"));
    std::fs::write(&cfg, format!("svid_pool_size = {pool}\n")).expect("agent config");
    Agent::start_with_args(server, &["--config", cfg.to_str().expect("utf-8 path")])
}

fn held_client(rt: &tokio::runtime::Runtime, agent: &Agent) -> spiffe::WorkloadApiClient {
    rt.block_on(async {
        let c = spiffe::WorkloadApiClient::connect_to(&agent.endpoint())
            .await
            .expect("connect to agent");
        let start = Instant::now();
        while let Err(e) = c.fetch_x509_svid().await {
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "no SVID from the agent: {e}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c
    })
}

fn held_window(
    rt: &tokio::runtime::Runtime,
    c: &spiffe::WorkloadApiClient,
    dur: Duration,
) -> Vec<Duration> {
    rt.block_on(async {
        let warm_end = Instant::now() + Duration::from_millis(200);
        while Instant::now() < warm_end {
            c.fetch_x509_svid().await.expect("fetch");
        }
        let mut lats = Vec::new();
        let end = Instant::now() + dur;
        while Instant::now() < end {
            let t0 = Instant::now();
            c.fetch_x509_svid().await.expect("fetch");
            lats.push(t0.elapsed());
        }
        lats
    })
}

pub fn run(opts: &Opts, pool: usize) {
    let rounds = if opts.quick { 2 } else { 6 };
    let per_round = if opts.quick { 30 } else { 100 };
    let quiet = crate::measure::wait_machine_quiet(Duration::from_secs_f64(opts.wait_quiet));
    log(format!(
        "other processes used {:.0}% of the machine before the run",
        quiet.0 * 100.0
    ));
    let server = Server::start(TD);
    let dir = tempfile::tempdir().expect("tempdir");
    let agents = [
        (0, agent_with_pool(&server, 0, dir.path())),
        (pool, agent_with_pool(&server, pool, dir.path())),
    ];
    for (_, a) in &agents {
        entry_for_my_uid(&server, a, BENCH_ID, &[]);
    }
    let held_rt = &crate::measure::client_runtime();
    let clients: Vec<_> = agents
        .iter()
        .map(|(_, a)| held_client(held_rt, a))
        .collect();
    let server_pid = server_pid_of(&server);
    let mut samples: [Samples; 2] = Default::default();
    let mut foreign_max: f64 = 0.0;
    for round in 0..rounds {
        // Alternate which goes first, too.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (size, agent) = &agents[i];
            let pids = (server_pid, agent.proc.child.id());
            let held = held_window(held_rt, &clients[i], opts.dur() / 2);
            let fresh: Fresh = fresh_processes(&agent.endpoint(), per_round, opts.dur() * 4, pids);
            let s = &mut samples[i];
            s.held.extend(held);
            s.fresh.extend(fresh.raw.iter().copied());
            s.connect.extend(fresh.raw_connect.iter().copied());
            s.failures += fresh.failures;
            s.fresh_server_cpu += fresh.cpu[0];
            s.fresh_agent_cpu += fresh.cpu[1];
            foreign_max = foreign_max.max(crate::measure::foreign_max());
            log(format!(
                "  round {round} pool {size}: new process p50 {} p99 {} (n {})",
                us(fresh.lat.p50),
                us(fresh.lat.p99),
                fresh.lat.n
            ));
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\n(b) new process, {rounds} alternating rounds of {per_round} processes per agent; \
         other processes' CPU, most in a window: {:.1}% of the machine; loadavg {}",
        foreign_max * 100.0,
        load.trim()
    );
    println!("| agent | case | n | p50 | p90 | p99 | max | target | agent CPU/new process | server CPU/new process |");
    println!("|---|---|---:|---:|---:|---:|---:|---|---:|---:|");
    for (i, (size, _)) in agents.iter().enumerate() {
        let s = &samples[i];
        let held = Lat::of(s.held.clone());
        let fresh = Lat::of(s.fresh.clone());
        let connect = Lat::of(s.connect.clone());
        let label = if *size == 0 {
            "pool off (svid_pool_size = 0)".to_string()
        } else {
            format!("pool on (svid_pool_size = {size})")
        };
        let n = fresh.n.max(1) as f64;
        println!(
            "| {label} | identity held | {} | {} | {} | {} | {} | p99 < 300 µs: {} | | |",
            held.n,
            us(held.p50),
            us(held.p90),
            us(held.p99),
            us(held.max),
            crate::report::met(held.p99 < Duration::from_micros(300))
        );
        println!(
            "| {label} | new process: connect → first response | {} | {} | {} | {} | {} | p99 < 1 ms: {} | {:.0} µs | {:.0} µs |",
            fresh.n,
            us(fresh.p50),
            us(fresh.p90),
            us(fresh.p99),
            us(fresh.max),
            crate::report::met(s.failures == 0 && fresh.p99 < Duration::from_millis(1)),
            s.fresh_agent_cpu / n * 1e6,
            s.fresh_server_cpu / n * 1e6,
        );
        println!(
            "| {label} | of which: connect | {} | {} | {} | {} | {} | | | |",
            connect.n,
            us(connect.p50),
            us(connect.p90),
            us(connect.p99),
            us(connect.max)
        );
        if s.failures > 0 {
            println!("| {label} | failures | {} | | | | | | | |", s.failures);
        }
    }
    drop(clients);
}
