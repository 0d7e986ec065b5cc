//! Shared measurement helpers: latency summaries, number formatting, CPU and memory
//! readings from `/proc`, and waiting for the machine (or one process) to be idle.

use std::process::Command;
use std::time::{Duration, Instant};

/// Latency summary over a sorted sample.
#[derive(Clone, Debug, Default)]
pub struct Lat {
    pub n: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl Lat {
    pub fn of(mut v: Vec<Duration>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort();
        let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        let sum: Duration = v.iter().sum();
        Self {
            n: v.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: *v.last().unwrap(),
            mean: sum / v.len() as u32,
        }
    }
}

/// Runs `f` in blocks of 16 calls until `dur` has passed: (calls, elapsed).
pub fn timed_loop(dur: Duration, mut f: impl FnMut(usize)) -> (u64, Duration) {
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..16 {
            f(n as usize);
            n += 1;
        }
        if start.elapsed() >= dur {
            return (n, start.elapsed());
        }
    }
}

pub fn us(d: Duration) -> String {
    let u = d.as_secs_f64() * 1e6;
    if u >= 10_000.0 {
        format!("{:.1} ms", u / 1000.0)
    } else if u >= 1000.0 {
        format!("{:.2} ms", u / 1000.0)
    } else {
        format!("{u:.0} µs")
    }
}

pub fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User+system CPU seconds of a process (all threads).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    ticks as f64 / clk_tck()
}

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM, ...).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Busy CPU seconds of the whole machine (all cores), from `/proc/stat`.
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum();
    busy as f64 / clk_tck()
}

/// CPU seconds of this process plus its reaped children (the worker processes).
fn self_and_children_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = (11..=14)
        .filter_map(|i| f.get(i).and_then(|x| x.parse::<u64>().ok()))
        .sum();
    ticks as f64 / clk_tck()
}

/// CPU seconds of the server, the agent and this process over a window, and how much
/// CPU the rest of the machine (anything not started by this benchmark) used meanwhile.
pub struct CpuWindow {
    pids: [String; 3],
    start: [f64; 3],
    ours0: f64,
    machine0: f64,
    t0: Instant,
}

impl CpuWindow {
    pub fn start(server: u32, agent: u32) -> Self {
        let pids = [server.to_string(), agent.to_string(), "self".to_string()];
        let start = [cpu_secs(&pids[0]), cpu_secs(&pids[1]), cpu_secs(&pids[2])];
        Self {
            ours0: start[0] + start[1] + self_and_children_secs(),
            start,
            pids,
            machine0: machine_busy_secs(),
            t0: Instant::now(),
        }
    }
    /// (server, agent, bench) CPU seconds since `start`; records foreign load.
    pub fn stop(&self) -> [f64; 3] {
        let out: [f64; 3] = std::array::from_fn(|i| cpu_secs(&self.pids[i]) - self.start[i]);
        let ours = cpu_secs(&self.pids[0]) + cpu_secs(&self.pids[1]) + self_and_children_secs()
            - self.ours0;
        let foreign = (machine_busy_secs() - self.machine0 - ours).max(0.0);
        let share = foreign / (self.t0.elapsed().as_secs_f64() * cores() as f64);
        note_foreign(share);
        out
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

static FOREIGN: std::sync::Mutex<(f64, u32)> = std::sync::Mutex::new((0.0, 0));

/// Remembers the largest share of the machine used by other processes in a window.
fn note_foreign(share: f64) {
    let mut f = FOREIGN.lock().unwrap();
    f.0 = f.0.max(share);
    f.1 += 1;
    if share > 0.05 {
        log(format!(
            "  WARNING: other processes used {:.0}% of the machine during this measurement",
            share * 100.0
        ));
    }
}

/// The largest share of the machine other processes used in any window so far.
pub fn foreign_max() -> f64 {
    FOREIGN.lock().unwrap().0
}

/// The largest share of the machine other processes used in any window since the
/// last call (for a benchmark reporting it per row).
#[allow(dead_code, reason = "used by ztid-audit-bench, which shares this file")]
pub fn take_foreign_max() -> f64 {
    std::mem::take(&mut FOREIGN.lock().unwrap().0)
}

/// Waits (at most `max`) until other processes use under 5% of the machine for 2 s.
pub fn wait_machine_quiet(max: Duration) -> (f64, Duration) {
    let start = Instant::now();
    loop {
        let m0 = machine_busy_secs();
        let o0 = self_and_children_secs();
        std::thread::sleep(Duration::from_secs(2));
        let share = (machine_busy_secs() - m0 - (self_and_children_secs() - o0)).max(0.0)
            / (2.0 * cores() as f64);
        if share < 0.05 || start.elapsed() >= max {
            return (share, start.elapsed());
        }
        log(format!(
            "machine busy ({:.0}% used by other processes); waiting for it to quiet down",
            share * 100.0
        ));
    }
}

/// Waits until `pid` used less than 2% of a core over 500 ms (at most `max`).
pub fn wait_quiet(pid: u32, max: Duration) -> Duration {
    let start = Instant::now();
    let p = pid.to_string();
    loop {
        let a = cpu_secs(&p);
        std::thread::sleep(Duration::from_millis(500));
        if cpu_secs(&p) - a <= 0.01 || start.elapsed() > max {
            return start.elapsed();
        }
    }
}

/// The trimmed stdout of a command, or "" when it cannot run.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn log(msg: impl AsRef<str>) {
    eprintln!("[ztid-bench] {}", msg.as_ref());
}

/// The runtime of a Workload API client that measures the agent: current-thread, as a
/// new-process worker's is. On the bench's 2-worker runtime every call would also pay
/// two cross-thread wake-ups inside the client (its caller's thread and the worker that
/// owns the connection), about 30 µs each on a VM, which measure the client, not the agent.
pub fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime")
}
