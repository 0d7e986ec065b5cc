//! "Where the time goes": the closing section of `docs/performance.md`, computed from
//! the run's own figures.

use std::fmt::Write as _;

use crate::measure::{mib, thousands, us};
use crate::report::Report;

impl Report {
    pub fn analysis(&self) -> String {
        let b = self.best();
        let r = &self.raw;
        let f = &self.fetch.fresh;
        let mut a = String::new();
        let _ = writeln!(a, "## Where the time goes (computed from this run)\n");
        let server_us = b.cpu_us_per_svid(0);
        let client_us = b.cpu_us_per_svid(2);
        let one = &self.throughput.runs[0];
        let _ = writeln!(
            a,
            "- **(a) Throughput.** The raw verify+sign costs {:.1} µs on one core here ({:.1} verify + \
             {:.1} sign; `shared/notes/performance.md` measured 60.6 µs = 42.7 + 17.1 on a machine of the \
             same kind, ~16.5k/s/core). In the best end-to-end run the server spent {:.1} µs of CPU per SVID \
             ({:+.0}% over the raw work: TLS, HTTP/2, protobuf, the agent's authentication per call, a sled \
             read + JSON decode of the entry per CSR, the audit record per SVID and the audit writer's \
             `fdatasync` per batch, plus the signed head file it rewrites), and the bench client {:.1} µs more on the same cores. \
             Server plus client CPU, {:.1} µs per SVID, puts the two-core ceiling near {}/s; the run \
             reached {}/s. With one CSR per call and one call in flight the rate is latency-bound \
             ({}/s, call p50 {}): every answer waits for its own audit `fdatasync` (disk p50 {}).",
            r.us_total,
            r.us_verify,
            r.us_sign,
            server_us,
            (server_us / r.us_total - 1.0) * 100.0,
            client_us,
            server_us + client_us,
            thousands(2e6 / (server_us + client_us)),
            thousands(b.rate()),
            thousands(one.rate()),
            us(one.calls.p50),
            us(self.fsync_early.p50)
        );
        let _ = writeln!(
            a,
            "- **(b) Held identity.** A repeat `FetchX509SVID` is served from the agent's memory (peer \
             credentials, `/proc/<pid>/stat` and `/proc/<pid>/exe` to recognise the instance, the entry \
             match, the cached SVID, key and bundle): p50 {} / p99 {}, with {:.0} µs of agent CPU per call. \
             The notes' tonic-over-UDS loop, which generated a key per call, had p50 106 µs / p99 170 µs \
             with the same `spiffe` client.",
            us(self.fetch.held.p50),
            us(self.fetch.held.p99),
            self.fetch.held_cpu[1] * 1e6 / self.fetch.held.n.max(1) as f64
        );
        let _ = writeln!(
            a,
            "- **(b) New process.** Connect → first response p50 {} / p99 {}, of which the client's \
             connect is p50 {}. The rest is the agent attesting the process at accept (/proc reads, \
             passwd/group lookups, the cached executable hash; on the blocking pool, while the client \
             sends its request), the entry match, the check that the process is still the one that \
             connected (inline), and an SVID taken from the agent's pool (`svid_pool_size`), then the \
             response and the client's parse. The pool's refill, after the answer, is one \
             `SignX509Svids` round trip over mutual TLS in which the server signs and waits for its \
             audit `fdatasync` (disk p50 {} / p99 {}); it shares the 2 cores with the next process. \
             Agent CPU per new process {:.0} µs, server {:.0} µs (the refill's mint). The first \
             process of a never-seen executable also pays its hash ({} for this {:.0} MB binary).",
            us(f.lat.p50),
            us(f.lat.p99),
            us(f.connect.p50),
            us(self.fsync_early.p50),
            us(self.fsync_early.p99),
            f.cpu[1] * 1e6 / f.lat.n.max(1) as f64,
            f.cpu[0] * 1e6 / f.lat.n.max(1) as f64,
            us(self.fetch.exe_hash),
            self.fetch.exe_bytes as f64 / 1e6
        );
        let _ = writeln!(
            a,
            "- **(c) Entries.** The mint path does keyed sled reads only (agent by SPIFFE ID, entry by \
             id): server CPU per mint {:.0} µs at 1,000 entries and {:.0} µs at {}; latency ratio {:.2} \
             (p50). An agent's incremental `SyncEntries` reads only its own parents' changes, through \
             the change log's by-parent index (`entry_changes_for_parent_since`): after {} creates \
             under other agents, one catch-up sync took {} of server time; the sled datastore took \
             {:.0} MB on disk; the server's RSS went {} → {}.",
            self.entries.lat_1k.cpu_us_per_svid(0),
            self.entries.lat_big.cpu_us_per_svid(0),
            thousands(self.opts.entries as f64),
            self.entries_ratio(),
            thousands((self.opts.entries - 1000) as f64),
            us(self.entries.sync_big_inc),
            self.entries.ds_bytes as f64 / 1e6,
            mib(self.entries.rss_server_1k),
            mib(self.entries.rss_server_big)
        );
        let _ = writeln!(
            a,
            "- **(d) Memory.** Each live instance costs the agent about {:.1} KiB (its `Instance`: \
             selectors, segment, watch channel, JWT cache; the PKCS#8 key and DER SVID; allocator slack). \
             RSS was {} 2.5 s after they all exited: it did not shrink, which glibc's allocator rarely \
             does after frees (the benchmark does not check whether the agent had forgotten them).\n",
            self.per_instance_kib(),
            mib(self.mem.rss_after)
        );
        a
    }
}
