//! (b) Workload API `FetchX509SVID` latency over the agent's Unix socket: for an
//! identity already held (one client, sequential calls) and for the first call of a
//! fresh process (worker processes spawned one after the other).

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::measure::{log, us, CpuWindow, Lat};
use crate::workers::{parse_worker_line, spawn_worker};
use crate::Opts;

pub struct FetchLatency {
    /// Identity already held.
    pub held: Lat,
    /// (server, agent, bench) CPU seconds over the held window.
    pub held_cpu: [f64; 3],
    pub fresh: Fresh,
    /// Size of this executable and the time to hash it as the agent does.
    pub exe_bytes: u64,
    pub exe_hash: Duration,
}

pub struct Fresh {
    /// Connect → first response, timed inside the worker.
    pub lat: Lat,
    pub connect: Lat,
    /// Spawn → exit, seen by the parent.
    pub wall: Lat,
    pub failures: usize,
    pub cpu: [f64; 3],
    /// The samples of `lat` and `connect`, unsorted (to pool rounds).
    pub raw: Vec<Duration>,
    pub raw_connect: Vec<Duration>,
}

/// Both cases; `pids` are (server, agent).
pub fn fetch_latency(
    rt: &tokio::runtime::Runtime,
    held_client: &spiffe::WorkloadApiClient,
    endpoint: &str,
    opts: &Opts,
    pids: (u32, u32),
) -> FetchLatency {
    log("(b) FetchX509SVID latency, identity already held");
    let (held, held_cpu) = rt.block_on(async {
        let warm_end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < warm_end {
            held_client.fetch_x509_svid().await.expect("fetch");
        }
        let cpu = CpuWindow::start(pids.0, pids.1);
        let mut lats = Vec::new();
        let end = Instant::now() + opts.dur();
        while Instant::now() < end {
            let t0 = Instant::now();
            held_client.fetch_x509_svid().await.expect("fetch");
            lats.push(t0.elapsed());
        }
        (Lat::of(lats), cpu.stop())
    });
    log(format!(
        "  held: n {} p50 {} p99 {} max {}",
        held.n,
        us(held.p50),
        us(held.p99),
        us(held.max)
    ));

    log("(b) FetchX509SVID latency, first call of a fresh process");
    let exe = std::env::current_exe().unwrap();
    let (exe_bytes, exe_hash) = {
        hash_file_time(&exe); // page cache warm
        let mut v: Vec<Duration> = (0..5).map(|_| hash_file_time(&exe).1).collect();
        v.sort();
        (hash_file_time(&exe).0, v[2])
    };
    let fresh = fresh_processes(
        endpoint,
        if opts.quick { 60 } else { 400 },
        opts.dur() * 2,
        pids,
    );
    log(format!(
        "  fresh: n {} p50 {} p99 {} max {} (failures {}); exe {:.1} MB hashes in {}",
        fresh.lat.n,
        us(fresh.lat.p50),
        us(fresh.lat.p99),
        us(fresh.lat.max),
        fresh.failures,
        exe_bytes as f64 / 1e6,
        us(exe_hash)
    ));
    FetchLatency {
        held,
        held_cpu,
        fresh,
        exe_bytes,
        exe_hash,
    }
}

/// Up to `max_n` worker processes, one after the other, for at most `dur`.
pub fn fresh_processes(endpoint: &str, max_n: usize, dur: Duration, pids: (u32, u32)) -> Fresh {
    // Warm-up: a few processes whose figures are not kept.
    for _ in 0..5 {
        let _ = spawn_worker("worker", endpoint).wait_with_output();
    }
    let cpu = CpuWindow::start(pids.0, pids.1);
    let (mut lats, mut connects, mut walls, mut failures) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let start = Instant::now();
    while lats.len() + failures < max_n && start.elapsed() < dur {
        let t0 = Instant::now();
        let out = spawn_worker("worker", endpoint)
            .wait_with_output()
            .expect("worker");
        walls.push(t0.elapsed());
        match parse_worker_line(&String::from_utf8_lossy(&out.stdout)) {
            Ok((d, c)) => {
                lats.push(d);
                connects.push(c);
            }
            Err(e) => {
                failures += 1;
                log(format!("worker failed: {e}"));
            }
        }
    }
    Fresh {
        raw: lats.clone(),
        raw_connect: connects.clone(),
        lat: Lat::of(lats),
        connect: Lat::of(connects),
        wall: Lat::of(walls),
        failures,
        cpu: cpu.stop(),
    }
}

/// SHA-256 of a file the way the agent's workload attestor does it (64 KiB reads).
fn hash_file_time(p: &Path) -> (u64, Duration) {
    let t0 = Instant::now();
    let mut f = std::fs::File::open(p).expect("open exe");
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
        ctx.update(&buf[..k]);
    }
    std::hint::black_box(ctx.finish());
    (n, t0.elapsed())
}
