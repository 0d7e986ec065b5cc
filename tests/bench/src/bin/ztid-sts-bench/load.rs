//! The machine's load: busy CPU seconds of all cores and the load average, from `/proc`
//! (what `measure.rs` reads, for the per-window share of other processes it does not
//! expose).

/// Busy CPU seconds of the whole machine (all cores), from `/proc/stat`.
pub fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    busy as f64 / clk_tck()
}

fn clk_tck() -> f64 {
    crate::measure::sh("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0)
}

/// Cores of the machine.
pub fn cores() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64
}

/// The 1-minute load average.
pub fn loadavg1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}
