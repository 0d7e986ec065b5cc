//! CPU seconds from `/proc`: of given processes, of a process tree (PostgreSQL's
//! postmaster and its backends), of this benchmark's whole tree, and of the machine, so
//! each window reports what other processes (the other people on the machine) used.

use std::collections::HashMap;
use std::time::Instant;

use crate::log;

fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        let s = crate::measure::sh("getconf", &["CLK_TCK"]);
        s.parse().unwrap_or(100.0)
    })
}

/// One process's (ppid, own CPU ticks, waited-for children's CPU ticks).
fn stat_of(pid: &str) -> Option<(u32, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    Some((n(1) as u32, n(11) + n(12), n(13) + n(14)))
}

/// Every process: pid → (ppid, own ticks, children ticks).
fn all_procs() -> HashMap<u32, (u32, u64, u64)> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        if let Some(s) = stat_of(name) {
            out.insert(pid, s);
        }
    }
    out
}

/// CPU seconds of `root` and all its descendants, waited-for children included.
fn tree_secs(procs: &HashMap<u32, (u32, u64, u64)>, root: u32) -> f64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &(ppid, _, _)) in procs {
        children.entry(ppid).or_default().push(pid);
    }
    let mut stack = vec![root];
    let mut ticks = 0u64;
    while let Some(p) = stack.pop() {
        if let Some(&(_, own, kids)) = procs.get(&p) {
            ticks += own + kids;
        }
        if let Some(c) = children.get(&p) {
            stack.extend(c);
        }
    }
    ticks as f64 / clk_tck()
}

fn own_secs(procs: &HashMap<u32, (u32, u64, u64)>, pid: u32) -> f64 {
    procs.get(&pid).map(|s| s.1).unwrap_or(0) as f64 / clk_tck()
}

/// Busy CPU seconds of the whole machine, from `/proc/stat`.
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
    let busy: u64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum();
    busy as f64 / clk_tck()
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// What a window measures: some `ztid-server`s, PostgreSQL's process tree (0: none).
#[derive(Clone, Debug)]
pub struct Groups {
    pub servers: Vec<u32>,
    pub postmaster: u32,
}

/// CPU seconds over a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub servers: f64,
    pub postgres: f64,
    /// This process (the clients).
    pub bench: f64,
    /// Everything else on the machine.
    pub foreign: f64,
    pub wall: f64,
}

impl Cpu {
    pub fn add(&mut self, o: &Cpu) {
        self.servers += o.servers;
        self.postgres += o.postgres;
        self.bench += o.bench;
        self.foreign += o.foreign;
        self.wall += o.wall;
    }
    /// Share of the machine (all cores) that other processes used.
    pub fn foreign_share(&self) -> f64 {
        self.foreign / (self.wall * cores() as f64).max(1e-9)
    }
}

struct Snap {
    servers: f64,
    postgres: f64,
    bench: f64,
    ours: f64,
    machine: f64,
}

fn snap(g: &Groups) -> Snap {
    let procs = all_procs();
    let me = std::process::id();
    Snap {
        servers: g.servers.iter().map(|&p| own_secs(&procs, p)).sum(),
        postgres: if g.postmaster == 0 {
            0.0
        } else {
            tree_secs(&procs, g.postmaster)
        },
        bench: own_secs(&procs, me),
        ours: tree_secs(&procs, me),
        machine: machine_busy_secs(),
    }
}

pub struct Window {
    g: Groups,
    s0: Snap,
    t0: Instant,
}

static FOREIGN_MAX: std::sync::Mutex<f64> = std::sync::Mutex::new(0.0);

impl Window {
    pub fn start(g: &Groups) -> Self {
        Self {
            g: g.clone(),
            s0: snap(g),
            t0: Instant::now(),
        }
    }
    pub fn stop(self) -> Cpu {
        let s1 = snap(&self.g);
        let wall = self.t0.elapsed().as_secs_f64();
        let cpu = Cpu {
            servers: s1.servers - self.s0.servers,
            postgres: s1.postgres - self.s0.postgres,
            bench: s1.bench - self.s0.bench,
            foreign: ((s1.machine - self.s0.machine) - (s1.ours - self.s0.ours)).max(0.0),
            wall,
        };
        let share = cpu.foreign_share();
        if wall > 1.0 {
            let mut m = FOREIGN_MAX.lock().unwrap();
            *m = m.max(share);
        }
        if share > 0.05 && wall > 1.0 {
            log(format!(
                "  note: other processes used {:.0}% of the machine in this window",
                share * 100.0
            ));
        }
        cpu
    }
}

/// The largest share of the machine other processes used in any window of a second
/// or more.
pub fn foreign_max() -> f64 {
    *FOREIGN_MAX.lock().unwrap()
}
