//! `docs/performance.md` as this benchmark writes it: how to run, the machine, the
//! summary, one section per scenario, and where the time goes, then the sections of the
//! previous document it does not generate.

use std::fmt::Write as _;
use std::time::Duration;

use crate::measure::{mib, sh, thousands, us};
use crate::report::{met, Report};
use crate::{BENCH_ID, TD};

impl Report {
    pub fn document(&self) -> String {
        let o = &self.opts;
        let mut d = String::new();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .next()
            .map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        let kernel = sh("uname", &["-r"]);
        let rustc = sh("rustc", &["-V"]);
        let b = self.best();
        let r = &self.raw;

        let _ = writeln!(d, "# Performance\n");
        let _ = writeln!(
            d,
            "Measured by the benchmark `ztid-bench` (`tests/bench/`) against the real `ztid-server` and \
             `ztid-agent` processes (started by the `ztid-tests` harness), on one machine. This file is \
             rewritten by every full run, which keeps any section it does not generate itself (notes, \
             figures from other benches) after its own; the figures below are from the run of {date}, product commit `{}`.\n",
            self.git_rev
        );
        let _ = writeln!(d, "## How to run\n");
        let _ = writeln!(
            d,
            "```sh\ncargo run --release -p ztid-bench --bin ztid-bench\n```\n"
        );
        let _ = writeln!(
            d,
            "It builds `ztid-server` and `ztid-agent` in release mode first (a no-op when up to date), \
             takes about {:.0} s here (most of it the bulk insert of (c)), prints the summary table and \
             rewrites this file. `--quick` is a short smoke run that does not touch this file; \
             `--entries N`, `--instances N`, `--secs S`, `--wait-quiet S`, `--no-doc`, `--out PATH` \
             adjust it. Other processes on the machine distort every figure: the run first waits (up \
             to 300 s) for the machine to be idle and reports how much CPU others used meanwhile. No timing is \
             asserted: it is a benchmark, not a test.\n",
            self.total.as_secs_f64()
        );
        let _ = writeln!(
            d,
            "Settings: server and agent run with `ZTID_LOG={}` (the server logs every issuance and the \
             agent every mint and new instance at INFO; at INFO to a file the log, not the CA, would be \
             measured). Each measurement is a fixed window of {:.0} s after a warm-up; latencies are \
             percentiles of the sorted per-call sample (std::time::Instant). The bench client, the \
             server, the agent and the worker processes all share the machine's {nproc} cores. \
             The run waited {:.0} s for the machine to be quiet; the most CPU that other processes used \
             in any measurement window was {:.1}% of the machine (from `/proc/stat` minus the CPU of the \
             benchmark, the server, the agent and the workers). The server's data directory is on the \
             machine's disk, where `write` + `fdatasync` of 256 B took p50 {} / p99 {} at the start of \
             the run (the server's audit log syncs before every node API answer that issued something).\n",
            self.log_level,
            o.secs,
            self.quiet_start.1.as_secs_f64(),
            self.foreign_max * 100.0,
            us(self.fsync_early.p50),
            us(self.fsync_early.p99)
        );
        let _ = writeln!(d, "## Machine\n");
        let _ = writeln!(d, "| | |\n|---|---|");
        let _ = writeln!(d, "| date | {date} |");
        let _ = writeln!(d, "| nproc | {nproc} |");
        let _ = writeln!(d, "| CPU | {cpu} |");
        let _ = writeln!(
            d,
            "| memory | {:.1} GiB |",
            mem_total as f64 / 1024.0 / 1024.0
        );
        let _ = writeln!(d, "| kernel | {kernel} |");
        let _ = writeln!(
            d,
            "| compiler | {rustc}, `--release` (workspace profile: opt-level 3, debug = 1) |"
        );
        let _ = writeln!(
            d,
            "| crypto | ring 0.17 via rcgen 0.14 and rustls 0.23; datastore sled 0.34 |\n"
        );

        let _ = writeln!(d, "## Summary\n");
        d.push_str(&self.summary_table());
        d.push('\n');

        // (a)
        let _ = writeln!(d, "## (a) Minting throughput through the node API\n");
        let _ = writeln!(
            d,
            "A client in the bench process presents the real agent's SVID (`agent_svid.pem`, \
             `agent_key.pk8` from the agent's data dir) over mutual TLS 1.3 to the real server and calls \
             `SignX509Svids` for the agent's per-instance entry; each CSR (P-256, one URI SAN \
             `{BENCH_ID}/<segment>`) is taken from a pool of 1,000 prepared in advance, so client-side \
             key generation is not measured. Every result was checked to be an SVID (errors are counted).\n"
        );
        let _ = writeln!(
            d,
            "| CSRs per call | calls in flight | TLS conns | SVIDs/s | errors | call p50 | call p99 | server CPU µs/SVID | bench client CPU µs/SVID |"
        );
        let _ = writeln!(d, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for x in &self.throughput.runs {
            let _ = writeln!(
                d,
                "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |",
                x.batch,
                x.conc,
                x.conns,
                thousands(x.rate()),
                x.errors,
                us(x.calls.p50),
                us(x.calls.p99),
                x.cpu_us_per_svid(0),
                x.cpu_us_per_svid(2)
            );
        }
        let _ = writeln!(d);
        let _ = writeln!(
            d,
            "Raw rate in the same run, same machine: `rcgen::CertificateSigningRequestParams::from_der` \
             (x509-parser parse + ring ECDSA verify) on the same CSRs, then the server's leaf template \
             (random 127-bit serial, O=ztid, URI SAN, KU, EKU, BC, AKI, 1 h) signed with \
             `CertificateParams::signed_by` by an rcgen `Issuer` holding a P-256 `KeyPair`:\n"
        );
        let _ = writeln!(d, "| raw | per op | ops/s |\n|---|---:|---:|");
        let _ = writeln!(
            d,
            "| CSR parse + verify, 1 thread | {:.1} µs | {} |",
            r.us_verify,
            thousands(1e6 / r.us_verify)
        );
        let _ = writeln!(
            d,
            "| leaf build + sign, 1 thread | {:.1} µs | {} |",
            r.us_sign,
            thousands(1e6 / r.us_sign)
        );
        let _ = writeln!(
            d,
            "| verify + sign, 1 thread | {:.1} µs | {} |",
            r.us_total,
            thousands(r.rate1)
        );
        let _ = writeln!(d, "| verify + sign, 2 threads | | {} |", thousands(r.rate2));
        let _ = writeln!(d, "| leaf size | {} B DER | |\n", r.leaf_bytes);
        let _ = writeln!(
            d,
            "Best end-to-end: **{}/s** (batch {}, {} in flight) = **{:.2}** of the raw 2-thread rate and \
             {:.2} of the raw 1-thread rate (target ≥ 0.5: {}).\n",
            thousands(b.rate()),
            b.batch,
            b.conc,
            self.ratio2(),
            self.ratio1(),
            met(self.ratio2() >= 0.5)
        );

        // (b)
        let f = &self.fetch.fresh;
        let _ = writeln!(d, "## (b) Workload API `FetchX509SVID` latency\n");
        let _ = writeln!(
            d,
            "Client: the unmodified `spiffe` 0.19 crate (`WorkloadApiClient::fetch_x509_svid`, which also \
             parses the returned certificate and key) over the agent's real Unix socket, entry selector \
             `unix:uid:<uid>` (per-instance), on a current-thread tokio runtime in both cases (the held \
             client in the bench process, each fresh process in its own), so that the client adds no \
             wake-up between its own threads.\n"
        );
        let _ = writeln!(
            d,
            "| case | n | p50 | p90 | p99 | max | target |\n|---|---:|---:|---:|---:|---:|---|"
        );
        let _ = writeln!(
            d,
            "| identity already held (same process, one connection, sequential calls) | {} | {} | {} | {} | {} | p99 < 300 µs: {} |",
            self.fetch.held.n,
            us(self.fetch.held.p50),
            us(self.fetch.held.p90),
            us(self.fetch.held.p99),
            us(self.fetch.held.max),
            met(self.fetch.held.p99 < Duration::from_micros(300))
        );
        let _ = writeln!(
            d,
            "| new process: connect → first response, timed inside the worker | {} | {} | {} | {} | {} | p99 < 1 ms: {} |",
            f.lat.n,
            us(f.lat.p50),
            us(f.lat.p90),
            us(f.lat.p99),
            us(f.lat.max),
            met(f.failures == 0 && f.lat.p99 < Duration::from_millis(1))
        );
        let _ = writeln!(
            d,
            "| of which: connect (UDS + HTTP/2 handshake) | {} | {} | {} | {} | {} | |",
            f.connect.n,
            us(f.connect.p50),
            us(f.connect.p90),
            us(f.connect.p99),
            us(f.connect.max)
        );
        let _ = writeln!(
            d,
            "| (context) new process: spawn → exit, seen by the parent | {} | {} | {} | {} | {} | |\n",
            f.wall.n,
            us(f.wall.p50),
            us(f.wall.p90),
            us(f.wall.p99),
            us(f.wall.max)
        );
        let held_calls = self.fetch.held.n.max(1) as f64;
        let fresh_n = f.lat.n.max(1) as f64;
        let _ = writeln!(
            d,
            "Workers are this benchmark's own binary in `worker` mode (`{:.1} MB` executable), spawned \
             one after the other, {} failures. CPU per call — held: agent {:.0} µs, bench client {:.0} µs; \
             new process: agent {:.0} µs, server {:.0} µs. The agent's workload attestor hashes the \
             caller's executable (SHA-256, `agent/src/workload_attestation.rs` `sha256_file`) \
             and caches the hash by device, inode, size and ctime, so only the first process of a binary \
             pays it (the warm-up workers did): for this executable that costs **{}**, measured by \
             hashing it the same way in the bench process.\n",
            self.fetch.exe_bytes as f64 / 1e6,
            f.failures,
            self.fetch.held_cpu[1] * 1e6 / held_calls,
            self.fetch.held_cpu[2] * 1e6 / held_calls,
            f.cpu[1] * 1e6 / fresh_n,
            f.cpu[0] * 1e6 / fresh_n,
            us(self.fetch.exe_hash)
        );

        // (c)
        let n = thousands(o.entries as f64);
        let _ = writeln!(
            d,
            "## (c) Mint latency against the number of registration entries\n"
        );
        let _ = writeln!(
            d,
            "`SignX509Svids` with one CSR per call, one call at a time, for the bench agent's own entry. \
             The server was stopped and given 999 more entries directly through \
             `ztid_ca::datastore::SledStore::open(data_dir/datastore)` + `DataStore::create_entry` + \
             `flush()` (the admin CLI flushes on every create and would take hours); its data directory \
             was then copied to a second server (same CA keys, same agent record, own port), which got \
             the other {} entries the same way. Both servers then ran side by side and were measured in \
             10 alternating rounds of {:.1} s each, so whatever else ran on the machine hit both alike. \
             Other entries: `spiffe://{TD}/bulk/svc-<n>`, 100 per fictitious agent parent \
             `spiffe://{TD}/ztid/agent/join-token/<hex>`, selector `unix:uid:<n>`.\n",
            thousands((o.entries - 1000) as f64),
            o.secs / 10.0
        );
        let _ = writeln!(d, "| entries | n | p50 | p90 | p99 | mean | server CPU per mint | server RSS after |\n|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (label, x, rss) in [
            ("1,000", &self.entries.lat_1k, self.entries.rss_server_1k),
            (
                n.as_str(),
                &self.entries.lat_big,
                self.entries.rss_server_big,
            ),
        ] {
            let _ = writeln!(
                d,
                "| {label} | {} | {} | {} | {} | {} | {:.0} µs | {} |",
                x.calls.n,
                us(x.calls.p50),
                us(x.calls.p90),
                us(x.calls.p99),
                us(x.calls.mean),
                x.cpu_us_per_svid(0),
                mib(rss)
            );
        }
        let _ = writeln!(
            d,
            "\nEach call includes the server's audit `fdatasync`; the probe on the same disk gave p50 {} / \
             p99 {} at the start of the run and p50 {} / p99 {} just before these rounds. After the big \
             insert the benchmark ran `sync` and waited for the kernel's dirty pages to drain ({:.1} s), \
             so the insert's writes were not being flushed during the timing.",
            us(self.fsync_early.p50),
            us(self.fsync_early.p99),
            us(self.entries.fsync_late.p50),
            us(self.entries.fsync_late.p99),
            self.entries.settle_big.as_secs_f64()
        );
        let _ = writeln!(
            d,
            "\nRatio {n} / 1,000 entries: p50 **{:.2}**, p99 {:.2}, mean {:.2} (target ≤ 1.2: {}).\n",
            self.entries_ratio(),
            self.entries.lat_big.calls.p99.as_secs_f64() / self.entries.lat_1k.calls.p99.as_secs_f64(),
            self.entries.lat_big.calls.mean.as_secs_f64() / self.entries.lat_1k.calls.mean.as_secs_f64(),
            met(self.entries_ratio() <= 1.2)
        );
        let _ = writeln!(d, "| datastore operation | time |\n|---|---:|");
        let _ = writeln!(
            d,
            "| insert 999 entries (2 threads) | {:.2} s |",
            self.entries.ins_1k.as_secs_f64()
        );
        let _ = writeln!(
            d,
            "| insert {} entries (2 threads) | {:.1} s ({:.1} µs/entry, {}/s) |",
            thousands((o.entries - 1000) as f64),
            self.entries.ins_big.as_secs_f64(),
            self.entries.ins_big.as_secs_f64() * 1e6 / (o.entries - 1000) as f64,
            thousands((o.entries - 1000) as f64 / self.entries.ins_big.as_secs_f64())
        );
        let _ = writeln!(
            d,
            "| flush | {:.1} s |",
            self.entries.flush_big.as_secs_f64()
        );
        let _ = writeln!(
            d,
            "| datastore size on disk at {n} entries | {:.0} MB |",
            self.entries.ds_bytes as f64 / 1e6
        );
        let _ = writeln!(
            d,
            "| server restart until healthy at {n} entries | {:.1} s |",
            self.entries.restart_ready.as_secs_f64()
        );
        let _ = writeln!(
            d,
            "| agent's incremental `SyncEntries` at 1,000 entries (999 new, none its own) | {} |",
            us(self.entries.sync_1k_inc)
        );
        let _ = writeln!(
            d,
            "| agent's incremental `SyncEntries` after {} new entries, none its own | **{}** |",
            thousands((o.entries - 1000) as f64),
            us(self.entries.sync_big_inc)
        );
        let _ = writeln!(
            d,
            "| `SyncEntries` with nothing new, at {n} | {} |",
            us(self.entries.sync_big_none)
        );
        let _ = writeln!(
            d,
            "| full `SyncEntries` (since 0; {} entries returned), at {n} | {} |",
            self.entries.full_len,
            us(self.entries.sync_big_full)
        );
        let _ = writeln!(
            d,
            "| server busy after restart at {n} entries before it went quiet | {:.1} s |\n",
            self.entries.quiet.as_secs_f64()
        );

        // (d)
        let m = &self.mem;
        let _ = writeln!(
            d,
            "## (d) Agent memory at {} live workload instances\n",
            m.instances
        );
        let _ = writeln!(
            d,
            "{} processes of this benchmark in `hold` mode, spawned four at a time, each fetching its \
             X.509-SVID once (so the agent attested it and holds its per-instance key and SVID) and then \
             waiting on stdin; all alive at the reading (taken 2.5 s after the last, past two rotation \
             ticks). Then stdin was closed and every process exited ({} had to be killed).\n",
            m.instances, m.leftover
        );
        let _ = writeln!(d, "| agent (`/proc/<pid>/status`) | value |\n|---|---:|");
        let _ = writeln!(d, "| VmRSS before | {} |", mib(m.rss_before));
        let _ = writeln!(
            d,
            "| VmRSS at {} live instances | {} |",
            m.instances,
            mib(m.rss_at)
        );
        let _ = writeln!(
            d,
            "| per-instance delta | **{:.1} KiB** |",
            self.per_instance_kib()
        );
        let _ = writeln!(
            d,
            "| VmHWM before / at | {} / {} |",
            mib(m.hwm_before),
            mib(m.hwm_at)
        );
        let _ = writeln!(d, "| VmRSS after they all exited | {} |", mib(m.rss_after));
        let _ = writeln!(d, "| agent threads | {} |", m.threads_at);
        let _ = writeln!(
            d,
            "| first fetch per hold process: p50 / p99 | {} / {} |",
            us(m.first_fetch.p50),
            us(m.first_fetch.p99)
        );
        let _ = writeln!(
            d,
            "| time to bring up all {} | {:.1} s ({} failures) |",
            m.instances, m.spawn_secs, m.failures
        );
        let _ = writeln!(
            d,
            "| (context) RSS of one hold process (median) | {} |\n",
            mib(m.worker_rss)
        );

        d.push_str(&self.analysis());
        if let Some(kept) = self.kept_notes.as_deref() {
            d.push_str(kept.trim_end());
            d.push('\n');
        }
        d
    }
}
