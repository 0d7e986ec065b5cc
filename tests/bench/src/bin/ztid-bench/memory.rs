//! (d) Agent memory at N live workload instances: N `hold` worker processes, each of
//! which fetched its X.509-SVID once, alive together; the agent's `/proc` status read
//! before, with all of them live, and after they exited.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::measure::{log, mib, status_kib, Lat};
use crate::workers::{parse_worker_line, spawn_worker, HeldProcs};

pub struct Memory {
    /// Hold processes alive at the reading.
    pub instances: usize,
    pub failures: usize,
    /// Agent VmRSS / VmHWM in KiB.
    pub rss_before: u64,
    pub hwm_before: u64,
    pub rss_at: u64,
    pub hwm_at: u64,
    pub rss_after: u64,
    pub threads_at: u64,
    pub spawn_secs: f64,
    pub first_fetch: Lat,
    /// Median VmRSS of one hold process, KiB.
    pub worker_rss: u64,
    /// Hold processes that had to be killed.
    pub leftover: usize,
}

pub fn memory_at_instances(agent_pid: u32, endpoint: &str, n: usize) -> Memory {
    log(format!("(d) agent memory at {n} live instances"));
    // Let exited instances from earlier phases be forgotten first.
    std::thread::sleep(Duration::from_millis(2500));
    let rss_before = status_kib(agent_pid, "VmRSS");
    let hwm_before = status_kib(agent_pid, "VmHWM");
    let mut guard = HeldProcs(Vec::with_capacity(n));
    let held = &mut guard.0;
    let (mut lats, mut failures) = (Vec::new(), 0);
    let start = Instant::now();
    let wave = 4;
    while held.len() < n {
        let k = wave.min(n - held.len());
        let mut batch: Vec<Child> = (0..k).map(|_| spawn_worker("hold", endpoint)).collect();
        for mut c in batch.drain(..) {
            let mut line = String::new();
            let mut out = BufReader::new(c.stdout.take().expect("stdout"));
            let _ = out.read_line(&mut line);
            match parse_worker_line(&line) {
                Ok((d, _)) => lats.push(d),
                Err(e) => {
                    failures += 1;
                    log(format!("hold worker failed: {e}"));
                }
            }
            let stdin = c.stdin.take();
            held.push((c, stdin));
        }
        if held.len().is_multiple_of(250) {
            log(format!("  … {} live instances", held.len()));
        }
    }
    let spawn_secs = start.elapsed().as_secs_f64();
    // Two rotation ticks so the agent's housekeeping has run with all of them live.
    std::thread::sleep(Duration::from_millis(2500));
    let mut alive = 0;
    for (c, _) in held.iter_mut() {
        if c.try_wait().ok().flatten().is_none() {
            alive += 1;
        }
    }
    let rss_at = status_kib(agent_pid, "VmRSS");
    let hwm_at = status_kib(agent_pid, "VmHWM");
    let threads_at = status_kib(agent_pid, "Threads");
    let worker_rss = {
        let mut v: Vec<u64> = held
            .iter()
            .map(|(c, _)| status_kib(c.id(), "VmRSS"))
            .collect();
        v.sort();
        v[v.len() / 2]
    };
    // Clean up every process: closing stdin ends each one.
    for (_, stdin) in held.iter_mut() {
        drop(stdin.take());
    }
    let mut leftover = 0;
    for (c, _) in held.iter_mut() {
        let t0 = Instant::now();
        loop {
            if c.try_wait().ok().flatten().is_some() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                let _ = c.kill();
                let _ = c.wait();
                leftover += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(Duration::from_millis(2500));
    let rss_after = status_kib(agent_pid, "VmRSS");
    log(format!(
        "  RSS before {} at {alive} {} after cleanup {}; HWM {}",
        mib(rss_before),
        mib(rss_at),
        mib(rss_after),
        mib(hwm_at)
    ));
    Memory {
        instances: alive,
        failures,
        rss_before,
        hwm_before,
        rss_at,
        hwm_at,
        rss_after,
        threads_at,
        spawn_secs,
        first_fetch: Lat::of(lats),
        worker_rss,
        leftover,
    }
}
