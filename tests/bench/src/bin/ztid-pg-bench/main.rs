//! `ztid-pg-bench`: a benchmark (not a test) of real release `ztid-server` processes on
//! the PostgreSQL datastore against the embedded sled one (issue 13). On this machine
//! it measures
//!
//! 1. node API mint throughput (batches, several calls in flight) and sequential mint
//!    latency, sled against PostgreSQL at 1,000 entries, in alternating rounds;
//! 2. sequential mint latency on PostgreSQL at 1,000 and at 1,000,000 entries (two
//!    databases of one PostgreSQL, two servers side by side, alternating rounds), with
//!    the bulk insert rate through `DataStore::create_entry` (the rest loaded with `COPY`
//!    in exactly the rows the store writes: the store has no bulk call);
//! 3. server restart time (to a healthy admin API and to the first successful mint) and
//!    VmRSS/VmHWM at 1,000,000 entries on PostgreSQL, and on sled;
//! 4. database bytes per entry (tables and indexes, the change log separately);
//! 5. a simulated fleet: N join-token agents attested through the node API, each
//!    syncing every few seconds (`SyncEntries` since its last revision) against 3 servers
//!    round-robin: sync latency and server/PostgreSQL CPU per sync;
//!
//! and prints a markdown section (also written to `--out`). With `--watch` each fleet
//! agent also holds a `WatchChanges` stream (issue 17): server memory per stream and the
//! fan-out of one change to every stream. `--streams-only` measures just that, at
//! `--stream-agents` agents (1,000) on 1 and then 2 servers (`--stream-servers`).
//!
//! Run: `cargo build --release -p ztid-bench --bin ztid-pg-bench` then
//! `target/release/ztid-pg-bench` (it builds release `ztid-server` and `ztid-agent`
//! first unless `ZTID_BENCH_NO_BUILD` or `ZTID_BIN_DIR` is set). PostgreSQL is the test
//! harness's own (`ztid_test_support::postgres`, Debian's `postgresql` binaries).
#![forbid(unsafe_code)]

#[allow(dead_code)]
#[path = "../ztid-bench/measure.rs"]
mod measure;
#[allow(dead_code)]
#[path = "../ztid-bench/node_api.rs"]
mod node_api;

mod cpu;
mod fleet;
mod mint;
mod pg;
mod report;
mod streams;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use tonic::transport::Channel;
use ztid_ca::datastore::{DataStore, SledStore};
use ztid_proto::node::node_client::NodeClient;
use ztid_test_support::postgres::TestPostgres;
use ztid_tests::{entry_for_my_uid, wait_for, Agent, Server};

use measure::{status_kib, wait_quiet};
use node_api::{agent_client, server_pid_of, wait_node_api};

pub const TD: &str = "bench.test";
pub const BENCH_ID: &str = "spiffe://bench.test/bench";

static START: OnceLock<Instant> = OnceLock::new();

pub fn log(msg: impl AsRef<str>) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[ztid-pg-bench {t:>6.1}s] {}", msg.as_ref());
}

/// PostgreSQL datastore against sled, and several servers, on real ztid-server
/// processes (issue 13). Prints a markdown section.
#[derive(Parser, Debug, Clone)]
#[command(name = "ztid-pg-bench")]
pub struct Opts {
    /// Entries of the big PostgreSQL database.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(2000..))]
    pub entries: u64,
    /// Entries of the big sled datastore (0: skip the sled restart at scale).
    #[arg(long, default_value_t = 1_000_000)]
    pub sled_entries: u64,
    /// At most this many seconds of sled bulk insert; the restart is measured at what
    /// was reached.
    #[arg(long, default_value_t = 420.0)]
    pub sled_insert_max_secs: f64,
    /// Seconds of `DataStore::create_entry` into PostgreSQL before the rest goes by COPY.
    #[arg(long, default_value_t = 20.0)]
    pub api_insert_secs: f64,
    /// Seconds per server of each mint load (in 4 alternating rounds).
    #[arg(long, default_value_t = 4.0)]
    pub secs: f64,
    /// Simulated agents of the fleet.
    #[arg(long, default_value_t = 10_000)]
    pub agents: usize,
    /// Servers of the fleet's cluster.
    #[arg(long, default_value_t = 3)]
    pub servers: usize,
    /// Seconds between two syncs of one agent.
    #[arg(long, default_value_t = 5.0)]
    pub sync_interval: f64,
    /// Seconds of the fleet's measured window.
    #[arg(long, default_value_t = 60.0)]
    pub fleet_secs: f64,
    /// At most this many seconds of waiting for a quiet machine first.
    #[arg(long, default_value_t = 60.0)]
    pub wait_quiet: f64,
    /// Where to write the markdown section.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A short smoke run: 20,000 entries, 300 agents for 10 s, 1 s loads.
    #[arg(long)]
    pub quick: bool,
    /// Each fleet agent also holds a `WatchChanges` stream open (issue 17): server
    /// VmRSS with and without the streams, and the notice fan-out.
    #[arg(long)]
    pub watch: bool,
    /// Fan-out rounds with streams (a node alias created, then deleted: 2 changes each).
    #[arg(long, default_value_t = 10)]
    pub watch_rounds: usize,
    /// Only the streams measurement (implies `--watch`): per server count in
    /// `--stream-servers`, a fresh small database, that many servers and
    /// `--stream-agents` agents; nothing else is run.
    #[arg(long)]
    pub streams_only: bool,
    /// Simulated agents of `--streams-only`.
    #[arg(long, default_value_t = 1000)]
    pub stream_agents: usize,
    /// Server counts of `--streams-only`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub stream_servers: Vec<usize>,
}

impl Opts {
    fn apply_quick(mut self) -> Self {
        if self.quick {
            self.entries = 20_000;
            self.sled_entries = 20_000;
            self.api_insert_secs = 2.0;
            self.secs = 1.0;
            self.agents = 300;
            self.fleet_secs = 10.0;
            self.wait_quiet = 0.0;
        }
        self
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf()
}

fn build_binaries() -> bool {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("bin dir").to_path_buf();
    let release = dir.file_name().is_some_and(|n| n == "release");
    if std::env::var_os("ZTID_BIN_DIR").is_some() {
        return release;
    }
    if std::env::var_os("ZTID_BENCH_NO_BUILD").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "--bin",
            "ztid-server",
            "--bin",
            "ztid-agent",
        ]);
        if release {
            cmd.arg("--release");
        }
        log("building ztid-server and ztid-agent (no-op when up to date)");
        assert!(cmd.status().expect("cargo").success(), "cargo build failed");
    }
    if !release {
        log("WARNING: not a release build; figures are meaningless");
    }
    std::env::set_var("ZTID_BIN_DIR", &dir);
    release
}

/// The commit measured, and the files of the working tree that differ from it outside
/// `tests/bench/` and `docs/` (the tree is shared: others' work in progress is built in).
pub fn git_rev() -> String {
    let root = workspace_root();
    let rev = measure::sh(
        "git",
        &[
            "-C",
            &root.to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let status = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let dirty: Vec<String> = status
        .lines()
        .filter_map(|l| l.get(3..))
        .map(|p| p.rsplit(" -> ").next().unwrap_or(p).to_string())
        .filter(|p| !p.starts_with("tests/bench/") && !p.starts_with("docs/"))
        .collect();
    if dirty.is_empty() {
        format!("`{rev}`")
    } else {
        format!(
            "`{rev}` plus uncommitted work in progress of others in {} files ({})",
            dirty.len(),
            dirty.join(", ")
        )
    }
}

pub fn stop_server(server: &mut Server) {
    if let Some(mut p) = server.proc.take() {
        p.stop();
    }
}

/// A restart: stopped, then started again; when it answered.
#[derive(Clone, Debug, Default)]
pub struct Restart {
    pub entries: u64,
    /// Start → admin healthcheck answers (None: not within the harness's 30 s).
    pub health: Option<Duration>,
    /// Start → first successful `SignX509Svids`.
    pub mint: Option<Duration>,
    pub rss_ready: u64,
    /// How long the server stayed busy after it answered.
    pub busy: Duration,
    pub rss_quiet: u64,
    pub hwm: u64,
}

fn timed_restart(
    rt: &tokio::runtime::Runtime,
    server: &mut Server,
    client: &NodeClient<Channel>,
    entry: &str,
    csr: &[u8],
    entries: u64,
) -> Restart {
    stop_server(server);
    let t0 = Instant::now();
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| server.restart())).is_ok();
    let mut r = Restart {
        entries,
        ..Default::default()
    };
    if !started {
        log("  the server did not answer its healthcheck within 30 s");
        return r;
    }
    r.health = Some(t0.elapsed());
    wait_node_api(rt, client, entry, csr);
    r.mint = Some(t0.elapsed());
    let pid = server_pid_of(server);
    r.rss_ready = status_kib(pid, "VmRSS");
    r.busy = wait_quiet(pid, Duration::from_secs(180));
    r.rss_quiet = status_kib(pid, "VmRSS");
    r.hwm = status_kib(pid, "VmHWM");
    log(format!(
        "  restart at {entries} entries: healthy {:?}, first mint {:?}, RSS {} KiB → {} KiB after {:?} busy, HWM {} KiB",
        r.health.unwrap_or_default(),
        r.mint.unwrap_or_default(),
        r.rss_ready,
        r.rss_quiet,
        r.busy,
        r.hwm
    ));
    r
}

fn key_and_csr(spiffe_id: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id.to_string().try_into().expect("uri"),
    )];
    params.serialize_request(&key).expect("csr").der().to_vec()
}

/// X.509 authorities in a server's `bundle show`.
fn bundle_certs(server: &Server) -> Vec<Vec<u8>> {
    let r = server.cli(&["bundle", "show"]);
    if !r.ok {
        return Vec::new();
    }
    pem::parse_many(r.stdout.as_bytes())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect()
}

fn sled_insert(
    server: &Server,
    from: u64,
    to: u64,
    threads: usize,
    max: Duration,
) -> (u64, Duration, Duration) {
    let store = SledStore::open(&server.data_dir().join("datastore")).expect("open sled");
    let (reached, t) = pg::api_insert(&store, from, to, threads, max, measure::now_unix());
    let t1 = Instant::now();
    store.flush().expect("flush");
    (reached, t, t1.elapsed())
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    total
}

fn main() {
    let opts = Opts::parse().apply_quick();
    START.get_or_init(Instant::now);
    if std::env::var_os("ZTID_LOG").is_none() {
        std::env::set_var("ZTID_LOG", "warn");
    }
    let release = build_binaries();
    let git = git_rev();
    let date = measure::sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let quiet = measure::wait_machine_quiet(Duration::from_secs_f64(opts.wait_quiet));
    log(format!(
        "others used {:.0}% of the machine at the start (waited {:?})",
        quiet.0 * 100.0,
        quiet.1
    ));
    let t_run = Instant::now();

    // ---- PostgreSQL, two databases; a sled server and a server on each database
    log("starting PostgreSQL (initdb into a temporary directory)");
    let pg = TestPostgres::start();
    let pg_settings = pg::settings(&pg);
    let postmaster = pg::postmaster_pid(&pg);
    if opts.streams_only {
        let fleets = streams::run(&rt, &pg, postmaster, &opts);
        let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let md = streams::markdown(
            &fleets,
            &opts,
            release,
            &git,
            &date,
            (load_start.trim(), load_end.trim()),
            t_run.elapsed(),
        );
        println!("{md}");
        let out = opts
            .out
            .clone()
            .unwrap_or_else(|| workspace_root().join("target/ztid-pg-bench-streams.md"));
        std::fs::write(&out, &md).expect("write the section");
        log(format!("wrote {}", out.display()));
        drop(pg);
        return;
    }
    let db_small = pg::Db::new(&pg, ztid_test_support::postgres::DATABASE);
    let db_big = pg::Db::new(&pg, "ztid_big");
    let cfg_small = db_small.config("server.toml");
    let cfg_big = db_big.config("server.toml");
    log("starting servers and agents");
    let mut s_sled = Server::start(TD);
    let mut a_sled = Agent::start(&s_sled);
    let e_sled = entry_for_my_uid(&s_sled, &a_sled, BENCH_ID, &[]);
    let mut s_small = Server::start_with(TD, &["--config", cfg_small.to_str().unwrap()]);
    let mut a_small = Agent::start(&s_small);
    let e_small = entry_for_my_uid(&s_small, &a_small, BENCH_ID, &[]);
    let mut s_big = Server::start_with(TD, &["--config", cfg_big.to_str().unwrap()]);
    let mut a_big = Agent::start(&s_big);
    let e_big = entry_for_my_uid(&s_big, &a_big, BENCH_ID, &[]);
    let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..1000)
            .map(|i| key_and_csr(&format!("{BENCH_ID}/{i:032x}")))
            .collect(),
    );
    let clients = |s: &Server, a: &Agent| -> Vec<NodeClient<Channel>> {
        let _g = rt.enter();
        (0..2).map(|_| agent_client(s, a)).collect()
    };
    let c_sled = clients(&s_sled, &a_sled);
    let c_small = clients(&s_small, &a_small);
    let c_big = clients(&s_big, &a_big);
    wait_node_api(&rt, &c_sled[0], &e_sled, &csrs[0]);
    wait_node_api(&rt, &c_small[0], &e_small, &csrs[0]);
    wait_node_api(&rt, &c_big[0], &e_big, &csrs[0]);

    // ---- 1,000 entries on sled and on the small database
    let now = measure::now_unix();
    log("999 more entries into the sled store and the small database");
    stop_server(&mut s_sled);
    let (_, sled_ins_1k, _) = sled_insert(&s_sled, 0, 999, 2, Duration::from_secs(120));
    let restart_sled_1k = timed_restart(&rt, &mut s_sled, &c_sled[0], &e_sled, &csrs[0], 1000);
    let loader_small = db_small.loader(&pg);
    let (_, pg_ins_1k) = pg::api_insert(&loader_small, 0, 999, 4, Duration::from_secs(120), now);
    drop(loader_small);

    // ---- the big database: create_entry for a while, then COPY, with its server down
    log(format!(
        "filling the big database to {} entries",
        opts.entries
    ));
    stop_server(&mut s_big);
    let loader_big = db_big.loader(&pg);
    let target = opts.entries - 1; // + the bench agent's own entry
    let (api_reached, api_time) = pg::api_insert(
        &loader_big,
        0,
        target,
        4,
        Duration::from_secs_f64(opts.api_insert_secs),
        now,
    );
    log(format!(
        "  DataStore::create_entry: {api_reached} entries in {:.1} s ({:.0}/s, 4 threads)",
        api_time.as_secs_f64(),
        api_reached as f64 / api_time.as_secs_f64()
    ));
    let copy_time = pg::copy_insert(&pg, &db_big, api_reached, target, now);
    log(format!(
        "  COPY: {} entries in {:.1} s",
        target - api_reached,
        copy_time.as_secs_f64()
    ));
    let vacuum_time = pg::vacuum_analyze(&pg, &db_big);
    let sizes_big = pg::sizes(&pg, &db_big);
    let sizes_small = pg::sizes(&pg, &db_small);
    log(format!(
        "  sizes: {sizes_big:?}; VACUUM ANALYZE {vacuum_time:?}"
    ));

    // ---- restarts on PostgreSQL
    log("restart of the big PostgreSQL server");
    let restart_pg_big = timed_restart(
        &rt,
        &mut s_big,
        &c_big[0],
        &e_big,
        &csrs[0],
        sizes_big.entries,
    );
    log("restart of the small PostgreSQL server");
    let restart_pg_small = timed_restart(
        &rt,
        &mut s_small,
        &c_small[0],
        &e_small,
        &csrs[0],
        sizes_small.entries,
    );

    // ---- (1) sled against PostgreSQL at 1,000 entries, (2) 1,000 against 1,000,000
    let target =
        |label: &str, s: &Server, c: &[NodeClient<Channel>], e: &str, pm: u32| mint::Target {
            label: label.to_string(),
            clients: c.to_vec(),
            entry_id: e.to_string(),
            pid: server_pid_of(s),
            postmaster: pm,
        };
    let t_sled = target("sled, 1,000 entries", &s_sled, &c_sled, &e_sled, 0);
    let t_small = target(
        "PostgreSQL, 1,000 entries",
        &s_small,
        &c_small,
        &e_small,
        postmaster,
    );
    let t_big = target("PostgreSQL, big", &s_big, &c_big, &e_big, postmaster);
    let per_round = Duration::from_secs_f64(opts.secs / 4.0);
    let mut store_runs = Vec::new();
    for load in [(1, 1), (10, 8), (100, 4)] {
        log(format!("(1) sled vs PostgreSQL, {load:?}"));
        let r = mint::alternate(&rt, &[&t_sled, &t_small], &csrs, load, 4, per_round);
        for (t, x) in [&t_sled, &t_small].iter().zip(&r) {
            log(format!(
                "  {}: {:.0} SVIDs/s (errors {}), call p50 {:?} p99 {:?}, server {:.0} µs/SVID, PostgreSQL {:.0} µs/SVID",
                t.label,
                x.rate(),
                x.errors,
                x.calls.p50,
                x.calls.p99,
                x.us_per_svid(x.cpu.servers),
                x.us_per_svid(x.cpu.postgres)
            ));
        }
        store_runs.push(r);
    }
    let mut scale_runs = Vec::new();
    for load in [(1, 1), (100, 4)] {
        log(format!(
            "(2) PostgreSQL 1,000 vs {} entries, {load:?}",
            sizes_big.entries
        ));
        let r = mint::alternate(&rt, &[&t_small, &t_big], &csrs, load, 4, per_round);
        for (t, x) in [&t_small, &t_big].iter().zip(&r) {
            log(format!(
                "  {}: {:.0} SVIDs/s, call p50 {:?} p99 {:?}, server {:.0} µs/SVID, PostgreSQL {:.0} µs/SVID",
                t.label,
                x.rate(),
                x.calls.p50,
                x.calls.p99,
                x.us_per_svid(x.cpu.servers),
                x.us_per_svid(x.cpu.postgres)
            ));
        }
        scale_runs.push(r);
    }
    let rss_after_mints = [
        status_kib(t_sled.pid, "VmRSS"),
        status_kib(t_small.pid, "VmRSS"),
        status_kib(t_big.pid, "VmRSS"),
    ];

    // ---- (5) the fleet: 3 servers on the big database
    log("(5) fleet: stopping the other servers and agents, starting the cluster");
    for a in [&mut a_sled, &mut a_small, &mut a_big] {
        a.proc.stop();
    }
    stop_server(&mut s_sled);
    stop_server(&mut s_small);
    drop((t_sled, t_small, t_big, c_small));
    let mut cluster = vec![s_big];
    for _ in 1..opts.servers {
        cluster.push(Server::start_with(
            TD,
            &["--config", cfg_big.to_str().unwrap()],
        ));
    }
    for s in &cluster {
        wait_for(
            "every server's authority in every bundle",
            Duration::from_secs(60),
            || (bundle_certs(s).len() == opts.servers).then_some(()),
        );
    }
    let roots = bundle_certs(&cluster[0]);
    let addrs: Vec<SocketAddr> = cluster.iter().map(|s| s.addr().parse().unwrap()).collect();
    let pids: Vec<u32> = cluster.iter().map(server_pid_of).collect();
    for &p in &pids {
        wait_quiet(p, Duration::from_secs(120));
    }
    let fleet = fleet::run(
        &rt,
        &loader_big as &dyn DataStore,
        &addrs,
        &pids,
        postmaster,
        &roots,
        &fleet::FleetOpts {
            agents: opts.agents,
            interval: Duration::from_secs_f64(opts.sync_interval),
            window: Duration::from_secs_f64(opts.fleet_secs),
            watch: opts.watch.then_some(fleet::WatchOpts {
                rounds: opts.watch_rounds,
            }),
        },
    );
    drop(loader_big);
    for s in cluster.iter_mut() {
        stop_server(s);
    }
    drop(cluster);
    drop(c_big);

    // ---- (3) sled at scale
    let sled_big = if opts.sled_entries > 1000 {
        log(format!(
            "(3) sled: filling to {} entries",
            opts.sled_entries
        ));
        let (reached, ins, flush) = sled_insert(
            &s_sled,
            999,
            opts.sled_entries - 1,
            2,
            Duration::from_secs_f64(opts.sled_insert_max_secs),
        );
        let entries = reached + 1;
        let bytes = dir_size(&s_sled.data_dir().join("datastore"));
        log(format!(
            "  {} entries in {:.1} s + flush {:.1} s, {:.0} MB",
            reached - 999,
            ins.as_secs_f64(),
            flush.as_secs_f64(),
            bytes as f64 / 1e6
        ));
        // The client made at the start, with the SVID the agent had then (still the
        // current or the previous one: the agent process is stopped).
        let r = timed_restart(&rt, &mut s_sled, &c_sled[0], &e_sled, &csrs[0], entries);
        stop_server(&mut s_sled);
        Some(report::SledBig {
            inserted: reached - 999,
            insert: ins,
            flush,
            bytes,
            restart: r,
        })
    } else {
        None
    };

    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let r = report::Report {
        opts: opts.clone(),
        release,
        git,
        date,
        load_start: load_start.trim().to_string(),
        load_end: load_end.trim().to_string(),
        quiet_start: quiet.0,
        foreign_max: cpu::foreign_max(),
        total: t_run.elapsed(),
        pg_settings,
        sled_ins_1k,
        pg_ins_1k,
        api_reached,
        api_time,
        copy_time,
        vacuum_time,
        sizes_big,
        sizes_small,
        restart_sled_1k,
        restart_pg_small,
        restart_pg_big,
        store_runs,
        scale_runs,
        rss_after_mints,
        fleet,
        sled_big,
    };
    let md = r.markdown();
    println!("{md}");
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/ztid-pg-bench.md"));
    std::fs::write(&out, &md).expect("write the section");
    log(format!("wrote {}", out.display()));
    drop(pg);
}
