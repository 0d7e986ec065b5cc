//! The markdown section: what was measured, against the targets.

use std::fmt::Write as _;
use std::time::Duration;

use crate::fleet::Fleet;
use crate::measure::{mib, thousands, us};
use crate::mint::Run;
use crate::pg::Sizes;
use crate::{Opts, Restart};

pub struct SledBig {
    pub inserted: u64,
    pub insert: Duration,
    pub flush: Duration,
    pub bytes: u64,
    pub restart: Restart,
}

pub struct Report {
    pub opts: Opts,
    pub release: bool,
    pub git: String,
    pub date: String,
    pub load_start: String,
    pub load_end: String,
    pub quiet_start: f64,
    pub foreign_max: f64,
    pub total: Duration,
    pub pg_settings: String,
    pub sled_ins_1k: Duration,
    pub pg_ins_1k: Duration,
    pub api_reached: u64,
    pub api_time: Duration,
    pub copy_time: Duration,
    pub vacuum_time: Duration,
    pub sizes_big: Sizes,
    pub sizes_small: Sizes,
    pub restart_sled_1k: Restart,
    pub restart_pg_small: Restart,
    pub restart_pg_big: Restart,
    /// Per load: [sled, PostgreSQL] at 1,000 entries.
    pub store_runs: Vec<Vec<Run>>,
    /// Per load: [PostgreSQL 1,000, PostgreSQL big].
    pub scale_runs: Vec<Vec<Run>>,
    /// VmRSS (KiB) of the sled, small and big servers after the mint rounds.
    pub rss_after_mints: [u64; 3],
    pub fleet: Fleet,
    pub sled_big: Option<SledBig>,
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn opt_d(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64()))
        .unwrap_or_else(|| "over 30 s (no answer)".into())
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

fn per_entry(bytes: u64, entries: u64) -> String {
    format!("{:.0} B", bytes as f64 / entries.max(1) as f64)
}

fn load_name(r: &Run) -> String {
    if r.batch == 1 && r.conc == 1 {
        "1 CSR/call, 1 in flight (sequential)".into()
    } else {
        format!("{} CSRs/call, {} in flight", r.batch, r.conc)
    }
}

impl Report {
    fn seq(&self) -> (&Run, &Run) {
        (&self.store_runs[0][0], &self.store_runs[0][1])
    }
    fn best(&self) -> (&Run, &Run) {
        let last = self.store_runs.last().unwrap();
        (&last[0], &last[1])
    }
    fn scale_seq(&self) -> (&Run, &Run) {
        (&self.scale_runs[0][0], &self.scale_runs[0][1])
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let big = self.sizes_big.entries;
        let f = &self.fleet;
        let _ = writeln!(
            s,
            "## PostgreSQL datastore and several servers (issue 13)\n"
        );
        let _ = writeln!(
            s,
            "Measured by `ztid-pg-bench` (`tests/bench/src/bin/ztid-pg-bench/`) on {}, commit {}, {} build \
             (`cargo build --release -p ztid-bench --bin ztid-pg-bench && target/release/ztid-pg-bench`; \
             run time {:.0} s). Real `ztid-server` processes, node API clients in the benchmark process \
             presenting real agent SVIDs over mutual TLS. PostgreSQL {} is the test harness's own \
             (`ztid_test_support::postgres`: `initdb` into a temporary directory, its own port, Unix \
             socket for the loader and loopback TCP with a password for the servers).\n",
            self.date,
            self.git,
            if self.release { "release" } else { "**debug**" },
            self.total.as_secs_f64(),
            self.pg_settings
        );
        let _ = writeln!(
            s,
            "**One machine, 2 cores, shared.** Every server (sled and PostgreSQL, and the 3 servers of \
             the fleet), PostgreSQL itself and the benchmark's clients run on the same 2 cores; \
             \"several servers\" here is a correctness setup, not more capacity. The machine was \
             also shared with other people's debug builds and tests: load average {} at the start \
             and {} at the end; other processes used {} of the machine when the run started and up \
             to {} in a measurement window (from `/proc/stat` minus the CPU of this benchmark's \
             process tree). Compare the ratios of servers measured in alternating rounds, not \
             absolute figures.\n",
            self.load_start,
            self.load_end,
            pct(self.quiet_start),
            pct(self.foreign_max)
        );

        // ---- summary
        let (sq_sled, sq_pg) = self.seq();
        let (b_sled, b_pg) = self.best();
        let (sc_small, sc_big) = self.scale_seq();
        let scale_ratio = sc_big.calls.p50.as_secs_f64() / sc_small.calls.p50.as_secs_f64();
        let rb = &self.restart_pg_big;
        let rss_ok = rb.rss_quiet.max(rb.rss_ready) < 300 * 1024;
        let _ = writeln!(s, "| figure | result | target | |");
        let _ = writeln!(s, "|---|---|---|---|");
        let _ = writeln!(
            s,
            "| mint throughput ({}), sled / PostgreSQL | {}/s / {}/s: ratio PostgreSQL/sled **{:.2}** | | |",
            load_name(b_sled),
            thousands(b_sled.rate()),
            thousands(b_pg.rate()),
            b_pg.rate() / b_sled.rate()
        );
        let _ = writeln!(
            s,
            "| sequential mint latency p50 / p99, sled → PostgreSQL (1,000 entries) | {} / {} → {} / {}: ratio p50 **{:.2}** | | |",
            us(sq_sled.calls.p50),
            us(sq_sled.calls.p99),
            us(sq_pg.calls.p50),
            us(sq_pg.calls.p99),
            sq_pg.calls.p50.as_secs_f64() / sq_sled.calls.p50.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "| PostgreSQL mint latency, {} / 1,000 entries (p50; p99 {} → {}) | {} → {}: **{:.2}** | ≤ 1.2 | {} |",
            thousands(big as f64),
            us(sc_small.calls.p99),
            us(sc_big.calls.p99),
            us(sc_small.calls.p50),
            us(sc_big.calls.p50),
            scale_ratio,
            met(scale_ratio <= 1.2)
        );
        let _ = writeln!(
            s,
            "| PostgreSQL server restart at {} entries: start → healthy / → first mint | {} / **{}** | < 2 s | {} |",
            thousands(big as f64),
            opt_d(rb.health),
            opt_d(rb.mint),
            met(rb.mint.is_some_and(|d| d < Duration::from_secs(2)))
        );
        let _ = writeln!(
            s,
            "| PostgreSQL server VmRSS at {} entries: after restart / after its background work (VmHWM) | {} / **{}** ({}) | < 300 MiB | {} |",
            thousands(big as f64),
            mib(rb.rss_ready),
            mib(rb.rss_quiet),
            mib(rb.hwm),
            met(rss_ok)
        );
        if let Some(sb) = &self.sled_big {
            let r = &sb.restart;
            let _ = writeln!(
                s,
                "| sled server restart at {} entries: → healthy / → first mint; VmRSS (VmHWM) | {} / {}; {} ({}) | (none) | |",
                thousands(r.entries as f64),
                opt_d(r.health),
                opt_d(r.mint),
                mib(r.rss_quiet),
                mib(r.hwm)
            );
        } else {
            let _ = writeln!(
                s,
                "| sled server restart and RSS at 1,000,000 entries | not measured in this run (earlier `ztid-bench` run: 14 s, ~1 GiB) | (none) | |"
            );
        }
        let z = &self.sizes_big;
        let _ = writeln!(
            s,
            "| PostgreSQL bytes per entry at {}: entries table + indexes / change log table + index | **{}** ({} + {}) / {} ({} + {}) | | |",
            thousands(big as f64),
            per_entry(z.entries_table + z.entries_indexes, z.entries),
            per_entry(z.entries_table, z.entries),
            per_entry(z.entries_indexes, z.entries),
            per_entry(z.changes_table + z.changes_indexes, z.entries),
            per_entry(z.changes_table, z.entries),
            per_entry(z.changes_indexes, z.entries)
        );
        let _ = writeln!(
            s,
            "| fleet: {} agents syncing every {:.0} s against {} servers: syncs/s (target rate), sync p50 / **p99** | {}/s ({}/s), {} / **{}** | | |",
            thousands(f.agents as f64),
            f.interval.as_secs_f64(),
            f.servers,
            thousands(f.rate()),
            thousands(f.target_rate()),
            us(f.lat.p50),
            us(f.lat.p99)
        );
        let _ = writeln!(
            s,
            "| fleet: CPU per sync, the {} servers together / PostgreSQL / the clients | **{:.0} µs** / {:.0} µs / {:.0} µs | | |",
            f.servers,
            f.per_sync_us(f.cpu.servers),
            f.per_sync_us(f.cpu.postgres),
            f.per_sync_us(f.cpu.bench)
        );
        s.push('\n');

        // ---- (1) and (2)
        let _ = writeln!(
            s,
            "### Minting: sled against PostgreSQL, and 1,000 against {} entries\n",
            thousands(big as f64)
        );
        let _ = writeln!(
            s,
            "`SignX509Svids` for the bench agent's own per-instance entry, CSRs from a pool made in \
             advance. Each load ran against both servers of a pair in 4 alternating rounds of {:.2} s \
             each after a 500 ms warm-up. CPU is per SVID over the rounds: the server process; \
             PostgreSQL (postmaster and all backends); the benchmark's clients. The 1,000-entry \
             PostgreSQL server and the {}-entry one use two databases of the same PostgreSQL.\n",
            self.opts.secs / 4.0,
            thousands(big as f64)
        );
        let _ = writeln!(
            s,
            "| server | load | SVIDs/s | errors | call p50 | call p99 | server CPU µs/SVID | PostgreSQL CPU µs/SVID | client CPU µs/SVID | others' share |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let labels_store = ["sled, 1,000 entries", "PostgreSQL, 1,000 entries"];
        let big_label = format!("PostgreSQL, {} entries", thousands(big as f64));
        let labels_scale = ["PostgreSQL, 1,000 entries", big_label.as_str()];
        for (runs, labels) in [
            (&self.store_runs, labels_store),
            (&self.scale_runs, labels_scale),
        ] {
            for pair in runs {
                for (r, l) in pair.iter().zip(labels) {
                    let _ = writeln!(
                        s,
                        "| {l} | {} | {} | {} | {} | {} | {:.0} | {} | {:.0} | {} |",
                        load_name(r),
                        thousands(r.rate()),
                        r.errors,
                        us(r.calls.p50),
                        us(r.calls.p99),
                        r.us_per_svid(r.cpu.servers),
                        if l.starts_with("sled") {
                            "–".to_string()
                        } else {
                            format!("{:.0}", r.us_per_svid(r.cpu.postgres))
                        },
                        r.us_per_svid(r.cpu.bench),
                        pct(r.cpu.foreign_share())
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "\nServer VmRSS after these rounds: sled {}, PostgreSQL at 1,000 entries {}, at {} {}.\n",
            mib(self.rss_after_mints[0]),
            mib(self.rss_after_mints[1]),
            thousands(big as f64),
            mib(self.rss_after_mints[2])
        );

        // ---- bulk load and sizes
        let _ = writeln!(s, "### Filling the stores\n");
        let api_rate = self.api_reached as f64 / self.api_time.as_secs_f64();
        let copied = big.saturating_sub(1 + self.api_reached);
        let _ = writeln!(s, "| step | entries | time | per second |");
        let _ = writeln!(s, "|---|---:|---:|---:|");
        let _ = writeln!(
            s,
            "| sled `DataStore::create_entry`, 2 threads, server stopped | 999 | {:.2} s | {} |",
            self.sled_ins_1k.as_secs_f64(),
            thousands(999.0 / self.sled_ins_1k.as_secs_f64())
        );
        let _ = writeln!(
            s,
            "| PostgreSQL `DataStore::create_entry` (`PgStore` in the benchmark), 4 threads | 999 | {:.2} s | {} |",
            self.pg_ins_1k.as_secs_f64(),
            thousands(999.0 / self.pg_ins_1k.as_secs_f64())
        );
        let _ = writeln!(
            s,
            "| PostgreSQL `DataStore::create_entry`, 4 threads, for {:.0} s | {} | {:.1} s | **{}** |",
            self.opts.api_insert_secs,
            thousands(self.api_reached as f64),
            self.api_time.as_secs_f64(),
            thousands(api_rate)
        );
        let _ = writeln!(
            s,
            "| PostgreSQL `COPY` of the rest, one transaction (rows as `create_entry` writes them) | {} | {:.1} s | {} |",
            thousands(copied as f64),
            self.copy_time.as_secs_f64(),
            thousands(copied as f64 / self.copy_time.as_secs_f64())
        );
        let _ = writeln!(
            s,
            "| `VACUUM ANALYZE` of the entry tables | | {:.1} s | |",
            self.vacuum_time.as_secs_f64()
        );
        if let Some(sb) = &self.sled_big {
            let _ = writeln!(
                s,
                "| sled `DataStore::create_entry`, 2 threads (+ flush {:.1} s) | {} | {:.1} s | {} |",
                sb.flush.as_secs_f64(),
                thousands(sb.inserted as f64),
                sb.insert.as_secs_f64(),
                thousands(sb.inserted as f64 / sb.insert.as_secs_f64())
            );
        }
        let _ = writeln!(
            s,
            "\nAt {} entries/s, `create_entry` alone would take {:.1} min for {}: every entry write \
             holds the cluster-wide revision row until it commits (the no-skip rule of \
             `draw_revisions`), so writers queue on it whatever the thread count.\n",
            thousands(api_rate),
            big as f64 / api_rate / 60.0,
            thousands(big as f64)
        );
        let zs = &self.sizes_small;
        let _ = writeln!(
            s,
            "| PostgreSQL size | {} entries | per entry | {} entries | per entry |",
            thousands(z.entries as f64),
            thousands(zs.entries as f64)
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        for (name, a, b) in [
            (
                "`ztid_entries` table (heap + TOAST)",
                z.entries_table,
                zs.entries_table,
            ),
            (
                "`ztid_entries` indexes (5)",
                z.entries_indexes,
                zs.entries_indexes,
            ),
            (
                "`ztid_entry_changes` table",
                z.changes_table,
                zs.changes_table,
            ),
            (
                "`ztid_entry_changes` indexes (2)",
                z.changes_indexes,
                zs.changes_indexes,
            ),
            ("whole database", z.database, zs.database),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {:.1} MB | {} | {:.1} MB | {} |",
                a as f64 / 1e6,
                per_entry(a, z.entries),
                b as f64 / 1e6,
                per_entry(b, zs.entries)
            );
        }
        if let Some(sb) = &self.sled_big {
            let _ = writeln!(
                s,
                "\nsled at {} entries: {:.0} MB on disk, {} per entry.",
                thousands(sb.restart.entries as f64),
                sb.bytes as f64 / 1e6,
                per_entry(sb.bytes, sb.restart.entries)
            );
        }
        s.push('\n');

        // ---- restarts
        let _ = writeln!(s, "### Restart and memory\n");
        let _ = writeln!(
            s,
            "SIGTERM, then a new process on the same data directory (and database): time from \
             the spawn to a healthy admin API, and to the first successful `SignX509Svids` through \
             the node API; VmRSS at that first mint and after the server went quiet (the \
             background check of stored entries pages through them all after start).\n"
        );
        let _ = writeln!(
            s,
            "| server | entries | → healthy | → first mint | busy after | VmRSS at first mint | VmRSS when quiet | VmHWM |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let mut rows: Vec<(&str, &Restart)> = vec![
            ("sled", &self.restart_sled_1k),
            ("PostgreSQL", &self.restart_pg_small),
            ("PostgreSQL", &self.restart_pg_big),
        ];
        if let Some(sb) = &self.sled_big {
            rows.push(("sled", &sb.restart));
        }
        for (name, r) in rows {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {:.1} s | {} | {} | {} |",
                thousands(r.entries as f64),
                opt_d(r.health),
                opt_d(r.mint),
                r.busy.as_secs_f64(),
                mib(r.rss_ready),
                mib(r.rss_quiet),
                mib(r.hwm)
            );
        }
        s.push('\n');

        // ---- fleet
        let _ = writeln!(
            s,
            "### A simulated fleet: {} agents, {} servers\n",
            thousands(f.agents as f64),
            f.servers
        );
        let _ = writeln!(
            s,
            "{} `ztid-server`s on the {}-entry database. {} join tokens were stored through \
             `DataStore::put_join_token` ({:.1} s); each simulated agent made its own P-256 key and \
             was attested through the node API's `Attest` stream (round-robin over the servers, 32 \
             at a time), then kept its own mutual-TLS connection with its SVID to one server \
             (agent k to server k mod {}). Agent k's node id is the parent of 100 of the bulk \
             entries, so each agent's first sync is a full answer of 100 entries. In the window \
             each agent calls `SyncEntries` every {:.0} s (first calls spread evenly over the \
             interval) with the revision and bundle sequence of its previous answer, page size \
             1,000 and the authority of its SVID as in use, as `ztid-agent` does; each sync \
             authenticates the agent and updates its record (`last_sync_at`) in PostgreSQL. The \
             simulated agents are node API clients in the benchmark process (its tokio runtime, \
             2 worker threads), not `ztid-agent` processes.\n",
            f.servers,
            thousands(big as f64),
            thousands(f.agents as f64),
            f.tokens_secs,
            f.servers,
            f.interval.as_secs_f64()
        );
        let _ = writeln!(s, "| fleet | value |");
        let _ = writeln!(s, "|---|---:|");
        let _ = writeln!(
            s,
            "| attestations: done / failed, time, p50 / p99 | {} / {}, {:.1} s ({}/s), {} / {} |",
            thousands(f.attest.n as f64),
            f.attest_failed,
            f.attest_secs,
            thousands(f.attest.n as f64 / f.attest_secs),
            us(f.attest.p50),
            us(f.attest.p99)
        );
        let _ = writeln!(
            s,
            "| first (full) sync incl. the TLS handshake, 64 at a time: agents / failed, entries, time, p50 / p99 | {} / {}, {}, {:.1} s, {} / {} |",
            thousands(f.first_sync.n as f64),
            f.first_failed,
            thousands(f.first_entries as f64),
            f.first_sync_secs,
            us(f.first_sync.p50),
            us(f.first_sync.p99)
        );
        let _ = writeln!(s, "| window | {:.1} s |", f.cpu.wall);
        let _ = writeln!(
            s,
            "| incremental syncs done / failed (per server) | {} / {} ({}) |",
            thousands(f.syncs as f64),
            f.failed,
            f.per_server
                .iter()
                .map(|x| thousands(*x as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            s,
            "| rate achieved / scheduled | {}/s / {}/s |",
            thousands(f.rate()),
            thousands(f.target_rate())
        );
        let _ = writeln!(
            s,
            "| sync latency p50 / p90 / p99 / max | {} / {} / **{}** / {} |",
            us(f.lat.p50),
            us(f.lat.p90),
            us(f.lat.p99),
            us(f.lat.max)
        );
        let _ = writeln!(
            s,
            "| start of each sync behind its schedule, p50 / p99 (the clients keeping up) | {} / {} |",
            us(f.late.p50),
            us(f.late.p99)
        );
        let _ = writeln!(
            s,
            "| entries received in the window (nothing changed: expected 0) | {} |",
            f.upserted
        );
        let _ = writeln!(
            s,
            "| CPU per sync: {} servers together / PostgreSQL / clients | **{:.0} µs** / {:.0} µs / {:.0} µs |",
            f.servers,
            f.per_sync_us(f.cpu.servers),
            f.per_sync_us(f.cpu.postgres),
            f.per_sync_us(f.cpu.bench)
        );
        let _ = writeln!(
            s,
            "| CPU over the window, cores: servers / PostgreSQL / clients / other people's processes | {:.2} / {:.2} / {:.2} / {:.2} |",
            f.cpu.servers / f.cpu.wall,
            f.cpu.postgres / f.cpu.wall,
            f.cpu.bench / f.cpu.wall,
            f.cpu.foreign / f.cpu.wall
        );
        let _ = writeln!(
            s,
            "| server VmRSS before the fleet → after the window (VmHWM) | {} |",
            f.rss_before
                .iter()
                .zip(&f.rss_after)
                .zip(&f.hwm_after)
                .map(|((a, b), h)| format!("{} → {} ({})", mib(*a), mib(*b), mib(*h)))
                .collect::<Vec<_>>()
                .join("; ")
        );
        let _ = writeln!(
            s,
            "| benchmark process VmRSS with {} connections | {} |",
            thousands(f.attest.n as f64),
            mib(f.bench_rss)
        );
        if let Some(e) = &f.first_error {
            let _ = writeln!(s, "| first error seen | `{}` |", e.replace('|', "/"));
        }
        s.push_str(&crate::streams::rows(f));
        s.push('\n');
        s
    }
}
