//! `--streams-only` (issue 17): server memory per open `WatchChanges` stream and the
//! fan-out of one change to every stream. For each server count, a fresh database of
//! the benchmark's PostgreSQL and that many servers on it; the fleet's agents (attested
//! for real, each its own mutual-TLS connection, one first sync) then each open a
//! `WatchChanges` stream, as `ztid-agent` does, and the servers' VmRSS is read before
//! and after; then node alias entries are created and deleted through a `PgStore` in
//! this process (so every server hears of them through `pg_notify` / `LISTEN`, none
//! from its own write) and each stream's notice is timed; then the usual sync window.

use std::fmt::Write as _;
use std::time::Duration;

use ztid_ca::datastore::DataStore;
use ztid_test_support::postgres::TestPostgres;
use ztid_tests::{wait_for, Server};

use crate::fleet::{self, Fleet, FleetOpts, WatchOpts};
use crate::measure::{mib, thousands, us};
use crate::node_api::server_pid_of;
use crate::{bundle_certs, log, pg, stop_server, Opts, TD};

/// Runs the measurement for every count in `--stream-servers`; returns the fleets.
pub fn run(
    rt: &tokio::runtime::Runtime,
    pg: &TestPostgres,
    postmaster: u32,
    opts: &Opts,
) -> Vec<Fleet> {
    let mut out = Vec::new();
    for &n in &opts.stream_servers {
        log(format!(
            "streams: {} agents with a WatchChanges stream each, {n} server(s)",
            opts.stream_agents
        ));
        let db = pg::Db::new(pg, &format!("ztid_streams_{n}"));
        let cfg = db.config("server.toml");
        let loader = db.loader(pg);
        let mut servers: Vec<Server> = (0..n.max(1))
            .map(|_| Server::start_with(TD, &["--config", cfg.to_str().unwrap()]))
            .collect();
        for s in &servers {
            wait_for(
                "every server's authority in every bundle",
                Duration::from_secs(60),
                || (bundle_certs(s).len() == servers.len()).then_some(()),
            );
        }
        let roots = bundle_certs(&servers[0]);
        let addrs: Vec<std::net::SocketAddr> =
            servers.iter().map(|s| s.addr().parse().unwrap()).collect();
        let pids: Vec<u32> = servers.iter().map(server_pid_of).collect();
        for &p in &pids {
            crate::measure::wait_quiet(p, Duration::from_secs(60));
        }
        let f = fleet::run(
            rt,
            &loader as &dyn DataStore,
            &addrs,
            &pids,
            postmaster,
            &roots,
            &FleetOpts {
                agents: opts.stream_agents,
                interval: Duration::from_secs_f64(opts.sync_interval),
                window: Duration::from_secs_f64(opts.fleet_secs),
                watch: Some(WatchOpts {
                    rounds: opts.watch_rounds,
                }),
            },
        );
        drop(loader);
        for s in servers.iter_mut() {
            stop_server(s);
        }
        out.push(f);
    }
    out
}

fn kib_list(v: &[u64]) -> String {
    v.iter().map(|k| mib(*k)).collect::<Vec<_>>().join(" + ")
}

/// The stream rows of one fleet (nothing when it held no streams).
pub fn rows(f: &Fleet) -> String {
    let mut s = String::new();
    let Some(st) = &f.streams else {
        return s;
    };
    let without: u64 = st.rss_without.iter().sum();
    let with: u64 = st.rss_with.iter().sum();
    let per = (with as f64 - without as f64) / st.opened.max(1) as f64;
    let _ = writeln!(
        s,
        "| `WatchChanges` streams open / failed, per server; time to open them all (64 at a time) | {} / {} ({}); {:.1} s |",
        thousands(st.opened as f64),
        st.open_failed,
        st.per_server
            .iter()
            .map(|x| thousands(*x as f64))
            .collect::<Vec<_>>()
            .join(", "),
        st.open_secs
    );
    let _ = writeln!(
        s,
        "| server VmRSS, {} agents connected and synced, no stream (quiet) | {} |",
        thousands(f.attest.n as f64),
        kib_list(&st.rss_without)
    );
    let _ = writeln!(
        s,
        "| server VmRSS with the streams open (quiet) | {} |",
        kib_list(&st.rss_with)
    );
    let _ = writeln!(
        s,
        "| **VmRSS per stream** (all servers' growth / streams) | **{:.1} KiB** ({} in all) |",
        per,
        mib(with.saturating_sub(without))
    );
    let _ = writeln!(
        s,
        "| fan-out: changes timed (node alias created / deleted through this process's `PgStore`); the write itself p50 / max | {} ; {} / {} |",
        st.changes,
        us(st.write.p50),
        us(st.write.max)
    );
    let _ = writeln!(
        s,
        "| fan-out: write's start → notice on **every** stream, per change: p50 / max | **{}** / **{}** |",
        us(st.fanout_all.p50),
        us(st.fanout_all.max)
    );
    let _ = writeln!(
        s,
        "| fan-out: write's start → notice on one stream, over all (change, stream) pairs: p50 / p99 / max; missed (30 s) | {} / {} / {}; {} |",
        us(st.fanout_each.p50),
        us(st.fanout_each.p99),
        us(st.fanout_each.max),
        st.missed
    );
    let _ = writeln!(
        s,
        "| streams that ended before the end of the window | {} |",
        st.ended_early
    );
    let _ = writeln!(
        s,
        "| first stream error seen | {} |",
        st.first_error
            .as_ref()
            .map_or("none".to_string(), |e| format!("`{}`", e.replace('|', "/")))
    );
    s
}

/// The markdown of a `--streams-only` run.
#[allow(clippy::too_many_arguments)]
pub fn markdown(
    fleets: &[Fleet],
    opts: &Opts,
    release: bool,
    git: &str,
    date: &str,
    load: (&str, &str),
    total: Duration,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Server memory per `WatchChanges` stream and notice fan-out (generated)\n"
    );
    let _ = writeln!(
        s,
        "`ztid-pg-bench --streams-only` ({}), {date}, {git}, {:.0} s; load average at the start `{}`, at the end `{}`. \
         {} simulated agents per server count ({}), each attested through the node API with a join \
         token, its own key, SVID and mutual-TLS connection (agent k to server k mod n), one \
         first sync, then one `WatchChanges` stream on that connection. VmRSS is read after the \
         servers went quiet (under 2 % of a core over 500 ms), before and after the streams. \
         Fan-out: {} rounds of a node alias entry (matching no agent: whom it concerns is unknown \
         to the feed, so every stream is told) created then deleted through a `PgStore` in the \
         benchmark process, so every server hears of it through `pg_notify` / `LISTEN`; one \
         change at a time, each stream's next notice timed from the write's start. Then a \
         {:.0} s window of `SyncEntries` every {:.0} s per agent with the streams open. The \
         clients (streams included) run on the benchmark's tokio runtime, 2 worker threads, \
         on the same 2 cores as the servers and PostgreSQL.\n",
        if release { "release" } else { "NOT a release build" },
        total.as_secs_f64(),
        load.0,
        load.1,
        thousands(opts.stream_agents as f64),
        opts.stream_servers
            .iter()
            .map(|n| format!("{n} server{}", if *n == 1 { "" } else { "s" }))
            .collect::<Vec<_>>()
            .join(", then "),
        opts.watch_rounds,
        opts.fleet_secs,
        opts.sync_interval
    );
    let _ = write!(s, "| |");
    for f in fleets {
        let _ = write!(
            s,
            " {} server{} |",
            f.servers,
            if f.servers == 1 { "" } else { "s" }
        );
    }
    let _ = write!(s, "\n|---|");
    for _ in fleets {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    // One column per fleet: the rows of each, side by side.
    let per: Vec<Vec<(String, String)>> = fleets
        .iter()
        .map(|f| {
            let mut r: Vec<(String, String)> = rows(f)
                .lines()
                .filter_map(|l| {
                    let l = l.trim().trim_start_matches('|').trim_end_matches('|');
                    l.split_once(" | ")
                        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
                })
                .collect();
            r.push((
                "attested agents / failed; first sync p50 / p99".into(),
                format!(
                    "{} / {}; {} / {}",
                    thousands(f.attest.n as f64),
                    f.attest_failed,
                    us(f.first_sync.p50),
                    us(f.first_sync.p99)
                ),
            ));
            r.push((
                "window with the streams open: syncs done / failed, p50 / p99".into(),
                format!(
                    "{} / {}, {} / {}",
                    thousands(f.syncs as f64),
                    f.failed,
                    us(f.lat.p50),
                    us(f.lat.p99)
                ),
            ));
            r.push((
                "server VmRSS after the window (VmHWM)".into(),
                f.rss_after
                    .iter()
                    .zip(&f.hwm_after)
                    .map(|(a, h)| format!("{} ({})", mib(*a), mib(*h)))
                    .collect::<Vec<_>>()
                    .join(" + "),
            ));
            r.push((
                "benchmark process VmRSS (the clients)".into(),
                mib(f.bench_rss),
            ));
            r
        })
        .collect();
    if let Some(first) = per.first() {
        for (i, (label, _)) in first.iter().enumerate() {
            let _ = write!(s, "| {label} |");
            for col in &per {
                let v = col.get(i).map(|(_, v)| v.as_str()).unwrap_or("");
                let _ = write!(s, " {v} |");
            }
            s.push('\n');
        }
    }
    s.push('\n');
    s
}
