//! (c) Mint latency against the number of registration entries: one server with 1,000
//! entries and a copy of it with many more (written straight into the stopped server's
//! sled datastore), run side by side and measured in alternating rounds; plus the
//! agent's `SyncEntries` catch-up over entries that are not its own.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use ztid_ca::datastore::{DataStore, EntryRecord, SledStore};
use ztid_proto::node::node_client::NodeClient;
use ztid_spiffe::Selector;
use ztid_tests::{Agent, Server};

use crate::disk::{dir_size, fsync_probe, settle_disk};
use crate::measure::{log, now_unix, status_kib, thousands, us, wait_quiet, CpuWindow, Lat};
use crate::node_api::{agent_client, mint, server_pid_of, timed_sync, wait_node_api, MintRun};
use crate::{Opts, TD};

pub struct Entries {
    /// Inserting 999 entries; inserting the rest and flushing them.
    pub ins_1k: Duration,
    pub ins_big: Duration,
    pub flush_big: Duration,
    /// The big datastore's size on disk.
    pub ds_bytes: u64,
    pub restart_ready: Duration,
    /// How long the big server stayed busy after its restart.
    pub quiet: Duration,
    pub lat_1k: MintRun,
    pub lat_big: MintRun,
    pub sync_1k_inc: Duration,
    pub sync_big_inc: Duration,
    pub sync_big_none: Duration,
    pub sync_big_full: Duration,
    /// Entries returned by the full sync.
    pub full_len: usize,
    /// Server VmRSS (KiB) after the rounds.
    pub rss_server_1k: u64,
    pub rss_server_big: u64,
    pub fsync_late: Lat,
    pub settle_big: Duration,
}

/// Runs (c) against `server` (left running with 1,000 entries) and a second server it
/// creates and stops again.
pub fn entries(
    rt: &tokio::runtime::Runtime,
    server: &mut Server,
    agent: &Agent,
    clients: &[NodeClient<Channel>],
    entry_id: &str,
    csrs: &Arc<Vec<Vec<u8>>>,
    opts: &Opts,
) -> Entries {
    log("(c) mint latency with 1,000 and with many entries");
    let (_, s0) = timed_sync(rt, &clients[0], 0);
    let rev_before = s0.revision;
    stop_server(server);
    let (ins_1k, _) = bulk_insert(server, 0, 999);
    // A second server on a copy of this 1,000-entry state (same CA, same agent record),
    // filled up to the big count: both then run side by side and are measured in
    // alternating rounds, so load from anything else on the machine hits both alike.
    let mut big = Server::start(TD);
    stop_server(&mut big);
    std::fs::remove_dir_all(big.data_dir()).expect("clear the second server's data dir");
    let st = Command::new("cp")
        .arg("-a")
        .arg(server.data_dir())
        .arg(big.data_dir())
        .status()
        .expect("cp");
    assert!(st.success(), "copying the data directory failed");
    log(format!(
        "  inserting {} more entries into a copy of the datastore",
        thousands((opts.entries - 1000) as f64)
    ));
    let (ins_big, flush_big) = bulk_insert(&big, 999, opts.entries - 1);
    let ds_bytes = dir_size(&big.data_dir().join("datastore"));
    log(format!(
        "  inserted in {:.1} s (+ flush {:.1} s), datastore {:.0} MB",
        ins_big.as_secs_f64(),
        flush_big.as_secs_f64(),
        ds_bytes as f64 / 1e6
    ));
    let settle_big = settle_disk(Duration::from_secs(120));
    server.restart();
    let t_restart = Instant::now();
    big.restart();
    let restart_ready = t_restart.elapsed();
    let big_client = {
        let _g = rt.enter();
        agent_client(&big, agent)
    };
    wait_node_api(rt, &clients[0], entry_id, &csrs[0]);
    wait_node_api(rt, &big_client, entry_id, &csrs[0]);
    let (sync_1k_inc, r1k) = timed_sync(rt, &clients[0], rev_before);
    // Catching up over the big insert walks the whole entry log: time it, then let
    // both servers go quiet before the latency rounds.
    let (sync_big_inc, rbig) = timed_sync(rt, &big_client, r1k.revision);
    let quiet = wait_quiet(server_pid_of(&big), Duration::from_secs(60));
    wait_quiet(server_pid_of(server), Duration::from_secs(30));
    let (sync_big_none, _) = timed_sync(rt, &big_client, rbig.revision);
    let (sync_big_full, full) = timed_sync(rt, &big_client, 0);
    let fsync_late = fsync_probe(&big.data_dir(), 300);
    let (lat_1k, lat_big) = interleaved_mints(
        rt,
        [&clients[0], &big_client],
        [server_pid_of(server), server_pid_of(&big)],
        agent.proc.child.id(),
        entry_id,
        csrs,
        opts.dur(),
    );
    let rss_server_1k = status_kib(server_pid_of(server), "VmRSS");
    let rss_server_big = status_kib(server_pid_of(&big), "VmRSS");
    log(format!(
        "  1,000 entries: p50 {} p99 {} mean {}; {} entries: p50 {} p99 {} mean {}",
        us(lat_1k.calls.p50),
        us(lat_1k.calls.p99),
        us(lat_1k.calls.mean),
        thousands(opts.entries as f64),
        us(lat_big.calls.p50),
        us(lat_big.calls.p99),
        us(lat_big.calls.mean),
    ));
    log(format!(
        "  incremental sync over {} new unrelated entries: {}",
        thousands((opts.entries - 1000) as f64),
        us(sync_big_inc)
    ));
    stop_server(&mut big);
    drop(big);
    Entries {
        ins_1k,
        ins_big,
        flush_big,
        ds_bytes,
        restart_ready,
        quiet,
        lat_1k,
        lat_big,
        sync_1k_inc,
        sync_big_inc,
        sync_big_none,
        sync_big_full,
        full_len: full.upserted.len(),
        rss_server_1k,
        rss_server_big,
        fsync_late,
        settle_big,
    }
}

pub fn stop_server(server: &mut Server) {
    if let Some(mut p) = server.proc.take() {
        p.stop();
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn bulk_entry(n: u64, now: i64) -> EntryRecord {
    EntryRecord {
        id: format!(
            "{:016x}{:016x}",
            splitmix(n),
            splitmix(n ^ 0xABCD_EF01_2345_6789)
        ),
        spiffe_id: format!("spiffe://{TD}/bulk/svc-{n}"),
        // 100 entries per (fictitious) agent, as on a busy node.
        parent_id: format!(
            "spiffe://{TD}/ztid/agent/join-token/{:016x}",
            splitmix(n / 100 + 7)
        ),
        selectors: vec![Selector::parse(&format!("unix:uid:{}", 10_000 + n % 50_000)).unwrap()],
        x509_ttl: 0,
        jwt_ttl: 0,
        shared: false,
        dns_names: vec![],
        federates_with: vec![],
        node: false,
        hint: String::new(),
        revision: 0,
        created_at: now,
    }
}

/// Inserts entries `from..to` into the stopped `server`'s datastore with two threads;
/// returns (insert, flush) time.
fn bulk_insert(server: &Server, from: u64, to: u64) -> (Duration, Duration) {
    let store = SledStore::open(&server.data_dir().join("datastore")).expect("open datastore");
    let now = now_unix();
    let t0 = Instant::now();
    let threads = 2u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let store = &store;
            s.spawn(move || {
                let mut n = from + t;
                while n < to {
                    store
                        .create_entry(bulk_entry(n, now))
                        .expect("create_entry");
                    n += threads;
                    if t == 0 && (n - from) % 100_000 < threads {
                        log(format!("  … {} entries", n - from));
                    }
                }
            });
        }
    });
    let insert = t0.elapsed();
    let t1 = Instant::now();
    store.flush().expect("flush");
    (insert, t1.elapsed())
}

/// Sequential one-CSR mints against two servers in alternating rounds; returns a run
/// per server, each with its latencies and its own server's CPU.
fn interleaved_mints(
    rt: &tokio::runtime::Runtime,
    clients: [&NodeClient<Channel>; 2],
    server_pids: [u32; 2],
    agent_pid: u32,
    entry_id: &str,
    csrs: &Arc<Vec<Vec<u8>>>,
    total_each: Duration,
) -> (MintRun, MintRun) {
    let rounds = 10u32;
    let per_round = total_each / rounds;
    let mut out: [MintRun; 2] = Default::default();
    let mut lats: [Vec<Duration>; 2] = Default::default();
    for (i, c) in clients.iter().enumerate() {
        let one = std::slice::from_ref(*c);
        rt.block_on(mint(one, entry_id, csrs, 1, 1, Duration::from_millis(500)));
        out[i].batch = 1;
        out[i].conc = 1;
        out[i].conns = 1;
    }
    for round in 0..rounds {
        // Alternate which server goes first, too.
        for k in 0..2 {
            let i = (k + round as usize) % 2;
            let one = std::slice::from_ref(clients[i]);
            let cpu = CpuWindow::start(server_pids[i], agent_pid);
            let (ok, errors, secs, l) = rt.block_on(mint(one, entry_id, csrs, 1, 1, per_round));
            let c = cpu.stop();
            out[i].ok += ok;
            out[i].errors += errors;
            out[i].secs += secs;
            for (total, part) in out[i].cpu.iter_mut().zip(c) {
                *total += part;
            }
            lats[i].extend(l);
        }
    }
    let [a, b] = lats;
    out[0].calls = Lat::of(a);
    out[1].calls = Lat::of(b);
    let [x, y] = out;
    (x, y)
}
