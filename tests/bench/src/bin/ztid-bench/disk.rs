//! The disk: `fdatasync` latency (the server's audit log syncs before every answer),
//! waiting for dirty pages to drain, and the size of a directory tree.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::measure::Lat;

/// Latency of `write(256 B)` + `fdatasync` on a file in `dir`.
pub fn fsync_probe(dir: &Path, n: usize) -> Lat {
    let path = dir.join("ztid-bench-fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let line = [b'x'; 256];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        f.write_all(&line).expect("probe write");
        f.sync_data().expect("fdatasync");
        v.push(t0.elapsed());
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Lat::of(v)
}

/// `sync`, then waits (at most `max`) until the kernel's dirty + writeback pages are
/// under 32 MiB, so one phase's writes are not flushed during the next one's timing.
pub fn settle_disk(max: Duration) -> Duration {
    let start = Instant::now();
    let _ = Command::new("sync").status();
    loop {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = |k: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|r| r.trim_start_matches(':').split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if kib("Dirty") + kib("Writeback") < 32 * 1024 || start.elapsed() > max {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Bytes of all files under `p`.
pub fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let md = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            total += if md.is_dir() {
                dir_size(&e.path())
            } else {
                md.len()
            };
        }
    }
    total
}
