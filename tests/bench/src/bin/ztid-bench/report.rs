//! The results of one run: the summary table printed at the end, what is kept of an
//! existing `docs/performance.md`, and the commit measured. The document itself is
//! written by `document.rs`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::entries::Entries;
use crate::fetch_latency::FetchLatency;
use crate::measure::{mib, sh, thousands, us, Lat};
use crate::memory::Memory;
use crate::node_api::MintRun;
use crate::raw_crypto::Raw;
use crate::throughput::Throughput;
use crate::{workspace_root, Opts};

pub struct Report {
    pub opts: Opts,
    /// `ZTID_LOG` of the server and agent.
    pub log_level: String,
    pub raw: Raw,
    /// (a)
    pub throughput: Throughput,
    /// (b)
    pub fetch: FetchLatency,
    /// (c)
    pub entries: Entries,
    /// (d)
    pub mem: Memory,
    pub total: Duration,
    /// Share of the machine others used when the run started, and how long it waited.
    pub quiet_start: (f64, Duration),
    pub foreign_max: f64,
    pub fsync_early: Lat,
    pub git_rev: String,
    /// The sections of the previous `docs/performance.md` this run does not generate.
    pub kept_notes: Option<String>,
}

/// Headings of the sections this benchmark writes; any other `## ` section of an
/// existing document (notes, figures from other benches) is carried over as is.
const GENERATED: &[&str] = &[
    "## How to run",
    "## Machine",
    "## Summary",
    "## (a) ",
    "## (b) ",
    "## (c) ",
    "## (d) ",
    "## Where the time goes (computed",
];

/// The sections of an existing document that this benchmark does not generate, in order.
pub fn kept_notes(path: Option<&Path>) -> Option<String> {
    let text = std::fs::read_to_string(path?).ok()?;
    let mut kept = String::new();
    let mut keep = false;
    for line in text.lines() {
        if line.starts_with("## ") {
            keep = !GENERATED.iter().any(|g| line.starts_with(g));
        } else if line.starts_with("# ") {
            keep = false;
        }
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    (!kept.trim().is_empty()).then_some(kept)
}

/// The commit measured, `+ local changes` when source files other than this
/// benchmark's own (`tests/bench/`, `docs/`) differ from it.
pub fn git_rev() -> String {
    let root = workspace_root();
    let root = root.to_string_lossy();
    let rev = sh("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
    if rev.is_empty() {
        return "unknown (not a git checkout)".into();
    }
    let status = sh(
        "git",
        &["-C", &root, "status", "--porcelain", "--untracked-files=no"],
    );
    let dirty = status.lines().any(|l| {
        let path = l.get(3..).unwrap_or("");
        !path.starts_with("tests/bench/") && !path.starts_with("docs/")
    });
    if dirty {
        format!("{rev} + local changes")
    } else {
        rev
    }
}

pub fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

impl Report {
    pub fn best(&self) -> &MintRun {
        self.throughput.best()
    }
    pub fn ratio2(&self) -> f64 {
        self.best().rate() / self.raw.rate2
    }
    pub fn ratio1(&self) -> f64 {
        self.best().rate() / self.raw.rate1
    }
    pub fn entries_ratio(&self) -> f64 {
        self.entries.lat_big.calls.p50.as_secs_f64() / self.entries.lat_1k.calls.p50.as_secs_f64()
    }
    pub fn per_instance_kib(&self) -> f64 {
        (self.mem.rss_at as f64 - self.mem.rss_before as f64) / self.mem.instances.max(1) as f64
    }

    pub fn summary_table(&self) -> String {
        let b = self.best();
        let mut s = String::new();
        let _ = writeln!(s, "| measurement | result | target | |");
        let _ = writeln!(s, "|---|---|---|---|");
        let _ = writeln!(
            s,
            "| (a) X.509-SVIDs/s via node API (batch {}, {} in flight, {} TLS conn) | **{}/s** | | |",
            b.batch,
            b.conc,
            b.conns,
            thousands(b.rate())
        );
        let _ = writeln!(
            s,
            "| (a) raw rcgen CSR verify+sign, same run | {}/s on 2 threads ({}/s on 1) | | |",
            thousands(self.raw.rate2),
            thousands(self.raw.rate1)
        );
        let _ = writeln!(
            s,
            "| (a) ratio end-to-end / raw (2 threads) | **{:.2}** ({:.2} vs 1 thread) | ≥ 0.5 | {} |",
            self.ratio2(),
            self.ratio1(),
            met(self.ratio2() >= 0.5)
        );
        let _ = writeln!(
            s,
            "| (b) FetchX509SVID, identity held: p50 / p99 (n={}) | {} / **{}** | p99 < 300 µs | {} |",
            self.fetch.held.n,
            us(self.fetch.held.p50),
            us(self.fetch.held.p99),
            met(self.fetch.held.p99 < Duration::from_micros(300))
        );
        let _ = writeln!(
            s,
            "| (b) FetchX509SVID, fresh process, connect→first response: p50 / p99 (n={}) | {} / **{}** | p99 < 1 ms | {} |",
            self.fetch.fresh.lat.n,
            us(self.fetch.fresh.lat.p50),
            us(self.fetch.fresh.lat.p99),
            met(self.fetch.fresh.failures == 0 && self.fetch.fresh.lat.p99 < Duration::from_millis(1))
        );
        let _ = writeln!(
            s,
            "| (c) mint latency, 1 CSR/call, sequential: p50 with 1,000 / {} entries | {} / {} | | |",
            thousands(self.opts.entries as f64),
            us(self.entries.lat_1k.calls.p50),
            us(self.entries.lat_big.calls.p50)
        );
        let _ = writeln!(
            s,
            "| (c) ratio {} / 1,000 entries (p50; p99 {} → {}) | **{:.2}** | ≤ 1.2 | {} |",
            thousands(self.opts.entries as f64),
            us(self.entries.lat_1k.calls.p99),
            us(self.entries.lat_big.calls.p99),
            self.entries_ratio(),
            met(self.entries_ratio() <= 1.2)
        );
        let _ = writeln!(
            s,
            "| (c) bulk insert of {} entries (DataStore::create_entry, 2 threads) + flush | {:.1} s + {:.1} s | | |",
            thousands((self.opts.entries - 1000) as f64),
            self.entries.ins_big.as_secs_f64(),
            self.entries.flush_big.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "| (d) agent VmRSS before → at {} live instances (VmHWM) | {} → {} ({}) | | |",
            self.mem.instances,
            mib(self.mem.rss_before),
            mib(self.mem.rss_at),
            mib(self.mem.hwm_at)
        );
        let _ = writeln!(
            s,
            "| (d) agent memory per live instance | **{:.1} KiB** | | |",
            self.per_instance_kib()
        );
        s
    }
}
