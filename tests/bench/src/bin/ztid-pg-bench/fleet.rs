//! A simulated fleet: N agents, attested for real (join tokens put straight into the
//! database, redeemed through the node API's `Attest` stream), each with its own key,
//! SVID and mutual-TLS connection to one of the servers (round-robin), each calling
//! `SyncEntries` every interval with the revision and bundle sequence of its previous
//! answer, as `ztid-agent` does. The simulated agents are node API clients in this
//! process, not `ztid-agent` processes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::transport::Channel;
use ztid_agent::node_client::{self, AgentSvid};
use ztid_ca::datastore::{DataStore, JoinTokenRecord};
use ztid_proto::node::{self as pb, node_client::NodeClient};

use crate::cpu::{Cpu, Groups, Window};
use crate::measure::{status_kib, Lat};
use crate::pg::fleet_node_id;
use crate::{log, TD};

/// How ztid-agent pages a sync.
const PAGE_SIZE: u32 = 1000;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct FleetOpts {
    pub agents: usize,
    pub interval: Duration,
    pub window: Duration,
    /// Each agent also holds a `WatchChanges` stream open (issue 17): server memory
    /// with and without the streams, and `changes` rounds of notice fan-out.
    pub watch: Option<WatchOpts>,
}

pub struct WatchOpts {
    /// Changes whose notices are timed to every stream (each a node alias entry created,
    /// then deleted: two changes per round).
    pub rounds: usize,
}

/// What the watch streams measured.
#[derive(Default)]
pub struct Streams {
    /// Streams that delivered their first notice / that failed to open.
    pub opened: usize,
    pub open_failed: usize,
    /// Time to open every stream, 64 at a time, and get its first notice.
    pub open_secs: f64,
    /// Streams per server.
    pub per_server: Vec<usize>,
    /// Server VmRSS with every agent's connection open and synced, before the streams
    /// (quiet), and with the streams open (quiet).
    pub rss_without: Vec<u64>,
    pub rss_with: Vec<u64>,
    /// Changes timed.
    pub changes: usize,
    /// Per change: the write's start → the notice on every stream (the last stream).
    pub fanout_all: Lat,
    /// Per change and stream: the write's start → the notice on that stream.
    pub fanout_each: Lat,
    /// Per change: the write itself (`DataStore::create_entry` / `delete_entry` from
    /// this process, its commit and `pg_notify` included).
    pub write: Lat,
    /// (change, stream) pairs whose notice did not come within the timeout.
    pub missed: u64,
    /// Streams that ended before the end of the window.
    pub ended_early: u64,
    pub first_error: Option<String>,
}

#[derive(Default)]
pub struct Fleet {
    pub agents: usize,
    pub servers: usize,
    pub interval: Duration,
    pub tokens_secs: f64,
    pub attest: Lat,
    pub attest_secs: f64,
    pub attest_failed: u64,
    pub first_sync: Lat,
    pub first_sync_secs: f64,
    pub first_entries: u64,
    pub first_failed: u64,
    pub syncs: u64,
    pub failed: u64,
    pub upserted: u64,
    pub lat: Lat,
    /// How late each sync started against its schedule (the client keeping up).
    pub late: Lat,
    pub per_server: Vec<u64>,
    pub cpu: Cpu,
    pub rss_before: Vec<u64>,
    pub rss_after: Vec<u64>,
    pub hwm_after: Vec<u64>,
    pub bench_rss: u64,
    /// An error seen, for the report.
    pub first_error: Option<String>,
    pub streams: Option<Streams>,
}

impl Fleet {
    pub fn target_rate(&self) -> f64 {
        self.agents as f64 / self.interval.as_secs_f64()
    }
    pub fn rate(&self) -> f64 {
        self.syncs as f64 / self.cpu.wall.max(1e-9)
    }
    pub fn per_sync_us(&self, secs: f64) -> f64 {
        secs * 1e6 / self.syncs.max(1) as f64
    }
}

struct Member {
    server: usize,
    client: NodeClient<Channel>,
    authority: Option<String>,
}

fn token_of(nonce: u64, k: usize) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("ztid-pg-bench {nonce} {k}").as_bytes(),
    );
    hex::encode(d.as_ref())
}

fn key_and_csr() -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).expect("csr").der().to_vec();
    (key.serialize_der(), csr)
}

/// One join-token attestation through `client`: the agent's SVID chain.
async fn attest(
    client: &mut NodeClient<Channel>,
    token: &str,
    csr: Vec<u8>,
) -> Result<Vec<Vec<u8>>, String> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::AttestRequest {
        step: Some(pb::attest_request::Step::Init(pb::AttestInit {
            method: "join-token".into(),
            payload: token.as_bytes().to_vec(),
            csr,
        })),
    })
    .await
    .map_err(|_| "stream closed".to_string())?;
    let mut inbound = client
        .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    // Join-token attestation has no challenges: the first answer is the result.
    match inbound.message().await {
        Ok(Some(m)) => match m.step {
            Some(pb::attest_response::Step::Result(r)) => Ok(r.svid_chain),
            other => Err(format!("unexpected attestation step {other:?}")),
        },
        Ok(None) => Err("attestation stream ended".into()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// An attestation's outcome: (SVID chain, PKCS#8 key) or the error, and its latency.
type Attested = (Result<(Vec<Vec<u8>>, Vec<u8>), String>, Duration);

fn verifier(roots: &[Vec<u8>]) -> Arc<ztid_spiffe::tls::ServerSvidVerifier> {
    Arc::new(ztid_spiffe::tls::ServerSvidVerifier::new(
        ztid_spiffe::tls::shared_roots(roots.to_vec()),
        format!("spiffe://{TD}/ztid/server"),
    ))
}

/// Runs the fleet against `addrs` (servers with `pids`), the join tokens written
/// through `store`; `roots` is the cluster's bundle (every server's authority).
#[allow(clippy::too_many_arguments)]
pub fn run(
    rt: &tokio::runtime::Runtime,
    store: &dyn DataStore,
    addrs: &[SocketAddr],
    pids: &[u32],
    postmaster: u32,
    roots: &[Vec<u8>],
    o: &FleetOpts,
) -> Fleet {
    let n = o.agents;
    let mut f = Fleet {
        agents: n,
        servers: addrs.len(),
        interval: o.interval,
        rss_before: pids.iter().map(|&p| status_kib(p, "VmRSS")).collect(),
        ..Default::default()
    };
    // ---- join tokens, straight into the database (as `token generate` stores them)
    let nonce = crate::measure::now_unix() as u64;
    let t0 = Instant::now();
    let expires_at = crate::measure::now_unix() + 7200;
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                if k >= n {
                    break;
                }
                let token = token_of(nonce, k);
                let hash = ztid_attestation_hash(&token);
                store
                    .put_join_token(
                        &hash,
                        &JoinTokenRecord {
                            id: fleet_node_id(k as u64),
                            expires_at,
                            alias: None,
                        },
                    )
                    .expect("put_join_token");
            });
        }
    });
    f.tokens_secs = t0.elapsed().as_secs_f64();
    log(format!(
        "  {n} join tokens stored in {:.1} s",
        f.tokens_secs
    ));

    // ---- attestation through the node API, round-robin, 32 at a time
    let v = verifier(roots);
    let anon: Vec<NodeClient<Channel>> = {
        let _g = rt.enter();
        addrs
            .iter()
            .map(|a| node_client::connect(*a, v.clone(), None).expect("client"))
            .collect()
    };
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(32));
    let results: Vec<Attested> = rt.block_on(async {
        let mut hs = Vec::with_capacity(n);
        for k in 0..n {
            let sem = sem.clone();
            let mut c = anon[k % anon.len()].clone();
            let token = token_of(nonce, k);
            hs.push(tokio::spawn(async move {
                let _p = sem.acquire().await.unwrap();
                let (pk8, csr) = key_and_csr();
                let t = Instant::now();
                let r = attest(&mut c, &token, csr).await.map(|chain| (chain, pk8));
                (r, t.elapsed())
            }));
        }
        let mut out = Vec::with_capacity(n);
        for h in hs {
            out.push(h.await.unwrap());
        }
        out
    });
    f.attest_secs = t0.elapsed().as_secs_f64();
    let mut lats = Vec::new();
    let mut members: Vec<Option<Member>> = Vec::with_capacity(n);
    {
        let _g = rt.enter();
        for (k, (r, d)) in results.into_iter().enumerate() {
            match r {
                Ok((chain, pk8)) => {
                    lats.push(d);
                    let svid = AgentSvid::from_parts(chain.clone(), pk8).expect("agent SVID");
                    assert!(
                        svid.spiffe_id
                            .ends_with(&format!("/join-token/{}", fleet_node_id(k as u64))),
                        "unexpected agent ID {}",
                        svid.spiffe_id
                    );
                    let ck = svid.certified_key().expect("key");
                    let server = k % addrs.len();
                    members.push(Some(Member {
                        server,
                        client: node_client::connect(addrs[server], v.clone(), Some(ck))
                            .expect("client"),
                        authority: ztid_spiffe::svid::issuing_authority_of_chain(&chain, roots),
                    }));
                }
                Err(e) => {
                    f.attest_failed += 1;
                    f.first_error.get_or_insert(format!("attest: {e}"));
                    members.push(None);
                }
            }
        }
    }
    drop(anon);
    f.attest = Lat::of(lats);
    log(format!(
        "  {} agents attested in {:.1} s ({} failed), p50 {:?} p99 {:?}",
        f.attest.n, f.attest_secs, f.attest_failed, f.attest.p50, f.attest.p99
    ));

    // ---- first (full) sync of every agent, which also opens its connection
    let members: Vec<Arc<Member>> = members.into_iter().flatten().map(Arc::new).collect();
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(64));
    let firsts: Vec<Result<(u64, u64, u64, Duration), String>> = rt.block_on(async {
        let mut hs = Vec::with_capacity(members.len());
        for m in &members {
            let m = m.clone();
            let sem = sem.clone();
            hs.push(tokio::spawn(async move {
                let _p = sem.acquire().await.unwrap();
                let t = Instant::now();
                let mut c = m.client.clone();
                let mut token = String::new();
                let mut entries = 0u64;
                let (mut rev, mut seq) = (0, 0);
                loop {
                    let r = tokio::time::timeout(
                        CALL_TIMEOUT,
                        c.sync_entries(pb::SyncEntriesRequest {
                            since_revision: rev,
                            page_size: PAGE_SIZE,
                            page_token: token.clone(),
                            authorities_in_use: m.authority.iter().cloned().collect(),
                            ..Default::default()
                        }),
                    )
                    .await
                    .map_err(|_| "timeout".to_string())?
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                    entries += r.upserted.len() as u64;
                    rev = r.revision;
                    if let Some(b) = &r.bundle {
                        seq = b.sequence;
                    }
                    if r.next_page_token.is_empty() {
                        break;
                    }
                    token = r.next_page_token;
                }
                Ok((rev, seq, entries, t.elapsed()))
            }));
        }
        let mut out = Vec::with_capacity(hs.len());
        for h in hs {
            out.push(h.await.unwrap());
        }
        out
    });
    f.first_sync_secs = t0.elapsed().as_secs_f64();
    let mut lats = Vec::new();
    let mut state = Vec::with_capacity(members.len());
    for r in &firsts {
        match r {
            Ok((rev, seq, entries, d)) => {
                lats.push(*d);
                f.first_entries += entries;
                state.push(Some((*rev, *seq)));
            }
            Err(e) => {
                f.first_failed += 1;
                f.first_error.get_or_insert(format!("first sync: {e}"));
                state.push(None);
            }
        }
    }
    f.first_sync = Lat::of(lats);
    log(format!(
        "  first sync of {} agents in {:.1} s ({} entries, {} failed), p50 {:?} p99 {:?}",
        f.first_sync.n,
        f.first_sync_secs,
        f.first_entries,
        f.first_failed,
        f.first_sync.p50,
        f.first_sync.p99
    ));
    // The servers' background work after the connection storm settles first.
    for &p in pids {
        crate::measure::wait_quiet(p, Duration::from_secs(30));
    }
    let watching = o.watch.as_ref().map(|w| {
        let ok: Vec<Arc<Member>> = members
            .iter()
            .zip(&state)
            .filter(|(_, s)| s.is_some())
            .map(|(m, _)| m.clone())
            .collect();
        watch(rt, store, &ok, pids, w)
    });

    // ---- the window: every agent syncs every interval, spread evenly over it
    let active: Vec<(Arc<Member>, u64, u64)> = members
        .iter()
        .zip(state)
        .filter_map(|(m, s)| s.map(|(r, q)| (m.clone(), r, q)))
        .collect();
    let count = active.len();
    let interval = o.interval;
    let window = o.window;
    log(format!(
        "  {count} agents syncing every {:?} for {:?} against {} servers",
        interval,
        window,
        addrs.len()
    ));
    let cpu = Window::start(&Groups {
        servers: pids.to_vec(),
        postmaster,
    });
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let end = start + window;
    type Out = (
        Vec<Duration>,
        Vec<Duration>,
        u64,
        u64,
        usize,
        Option<String>,
    );
    let outs: Vec<Out> = rt.block_on(async {
        let mut hs = Vec::with_capacity(count);
        for (k, (m, rev, seq)) in active.into_iter().enumerate() {
            hs.push(tokio::spawn(async move {
                let mut c = m.client.clone();
                let (mut rev, mut seq) = (rev, seq);
                let mut next = start + interval.mul_f64(k as f64 / count as f64);
                let (mut lat, mut late) = (Vec::new(), Vec::new());
                let (mut failed, mut upserted) = (0u64, 0u64);
                let mut err = None;
                while next < end {
                    tokio::time::sleep_until(next).await;
                    let t = tokio::time::Instant::now();
                    late.push(t - next);
                    let r = tokio::time::timeout(
                        CALL_TIMEOUT,
                        c.sync_entries(pb::SyncEntriesRequest {
                            since_revision: rev,
                            bundle_sequence: seq,
                            page_size: PAGE_SIZE,
                            authorities_in_use: m.authority.iter().cloned().collect(),
                            ..Default::default()
                        }),
                    )
                    .await;
                    match r {
                        Ok(Ok(r)) => {
                            lat.push(t.elapsed());
                            let r = r.into_inner();
                            upserted += r.upserted.len() as u64;
                            rev = r.revision;
                            if let Some(b) = &r.bundle {
                                seq = b.sequence;
                            }
                        }
                        Ok(Err(s)) => {
                            failed += 1;
                            err.get_or_insert(format!("{:?}: {}", s.code(), s.message()));
                        }
                        Err(_) => {
                            failed += 1;
                            err.get_or_insert("timeout".to_string());
                        }
                    }
                    next += interval;
                }
                (lat, late, failed, upserted, m.server, err)
            }));
        }
        let mut out = Vec::with_capacity(hs.len());
        for h in hs {
            out.push(h.await.unwrap());
        }
        out
    });
    f.cpu = cpu.stop();
    f.per_server = vec![0; addrs.len()];
    let (mut lat, mut late) = (Vec::new(), Vec::new());
    for (l, lt, failed, up, server, err) in outs {
        f.per_server[server] += l.len() as u64;
        f.syncs += l.len() as u64;
        f.failed += failed;
        f.upserted += up;
        lat.extend(l);
        late.extend(lt);
        if let Some(e) = err {
            f.first_error.get_or_insert(format!("sync: {e}"));
        }
    }
    f.lat = Lat::of(lat);
    f.late = Lat::of(late);
    if let Some((mut st, w)) = watching {
        st.ended_early = w.ended.load(Ordering::Relaxed);
        for h in &w.tasks {
            h.abort();
        }
        f.streams = Some(st);
    }
    f.rss_after = pids.iter().map(|&p| status_kib(p, "VmRSS")).collect();
    f.hwm_after = pids.iter().map(|&p| status_kib(p, "VmHWM")).collect();
    f.bench_rss = status_kib(std::process::id(), "VmRSS");
    log(format!(
        "  {} syncs in {:.1} s ({:.0}/s, target {:.0}/s), {} failed; p50 {:?} p99 {:?}; server CPU {:.0} µs/sync, PostgreSQL {:.0} µs/sync, clients {:.0} µs/sync",
        f.syncs,
        f.cpu.wall,
        f.rate(),
        f.target_rate(),
        f.failed,
        f.lat.p50,
        f.lat.p99,
        f.per_sync_us(f.cpu.servers),
        f.per_sync_us(f.cpu.postgres),
        f.per_sync_us(f.cpu.bench),
    ));
    drop(members);
    f
}

/// SHA-256 of a token: the only form in which the CA keeps it
/// (`ztid_attestation::join_token::token_hash`).
fn ztid_attestation_hash(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The watch streams of the fleet, open until the end of the window.
struct Watching {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Streams that ended (cleanly or not) while they were meant to stay open.
    ended: Arc<AtomicU64>,
}

/// Notices one stream received: (entry revision, when).
type Arrivals = Arc<std::sync::Mutex<Vec<(u64, Instant)>>>;

/// How long a notice may take before it counts as missed.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(30);

/// A node alias entry that matches no agent: whom it concerns is unknown to the feed
/// (it may change any agent's aliases), so its notice goes to every stream.
fn fanout_entry(i: usize) -> ztid_ca::datastore::EntryRecord {
    let mut e = crate::pg::bulk_entry(u64::MAX / 2 + i as u64, crate::measure::now_unix());
    e.spiffe_id = format!("spiffe://{TD}/bench-fanout/{i}");
    e.parent_id = format!("spiffe://{TD}/ztid/server");
    e.selectors = vec![
        ztid_spiffe::Selector::parse(&format!("join-token:id:bench-fanout-{i}")).expect("selector"),
    ];
    e.node = true;
    e
}

/// Opens a `WatchChanges` stream per member (on its own connection, as `ztid-agent`
/// does), measures the servers' RSS before and after, and times `rounds` node-alias
/// creations and deletions from the write's return to each stream's notice.
fn watch(
    rt: &tokio::runtime::Runtime,
    store: &dyn DataStore,
    members: &[Arc<Member>],
    pids: &[u32],
    o: &WatchOpts,
) -> (Streams, Watching) {
    let n = members.len();
    let mut st = Streams {
        rss_without: pids.iter().map(|&p| status_kib(p, "VmRSS")).collect(),
        per_server: vec![0; pids.len()],
        ..Default::default()
    };
    log(format!(
        "  opening {n} WatchChanges streams; server VmRSS without them: {:?} KiB",
        st.rss_without
    ));
    let arrivals: Vec<Arrivals> = (0..n).map(|_| Arrivals::default()).collect();
    let ended = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(64));
    let (tasks, opened): (Vec<_>, Vec<_>) = rt.block_on(async {
        let mut tasks = Vec::with_capacity(n);
        let mut opened = Vec::with_capacity(n);
        for (m, arr) in members.iter().zip(&arrivals) {
            let (m, arr, ended, sem) = (m.clone(), arr.clone(), ended.clone(), sem.clone());
            let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
            tasks.push(tokio::spawn(async move {
                let mut c = m.client.clone();
                // Released at the first notice: 64 streams being opened at a time.
                let mut permit = Some(sem.acquire_owned().await.unwrap());
                let mut s = match tokio::time::timeout(
                    CALL_TIMEOUT,
                    c.watch_changes(pb::WatchChangesRequest {}),
                )
                .await
                {
                    Ok(Ok(s)) => s.into_inner(),
                    Ok(Err(e)) => {
                        let _ = first_tx.send(Err(format!("{:?}: {}", e.code(), e.message())));
                        return;
                    }
                    Err(_) => {
                        let _ = first_tx.send(Err("timeout".into()));
                        return;
                    }
                };
                let mut first = Some(first_tx);
                loop {
                    match s.message().await {
                        Ok(Some(notice)) => {
                            if let Some(tx) = first.take() {
                                permit.take();
                                let _ = tx.send(Ok(()));
                            } else {
                                arr.lock()
                                    .unwrap()
                                    .push((notice.entry_revision, Instant::now()));
                            }
                        }
                        Ok(None) | Err(_) => {
                            ended.fetch_add(1, Ordering::Relaxed);
                            if let Some(tx) = first.take() {
                                let _ = tx.send(Err("ended before its first notice".into()));
                            }
                            return;
                        }
                    }
                }
            }));
            opened.push(first_rx);
        }
        let mut out = Vec::with_capacity(n);
        for rx in opened {
            out.push(rx.await.unwrap_or_else(|_| Err("task ended".into())));
        }
        (tasks, out)
    });
    st.open_secs = t0.elapsed().as_secs_f64();
    let mut live = Vec::with_capacity(n);
    for (k, r) in opened.iter().enumerate() {
        match r {
            Ok(()) => {
                st.opened += 1;
                st.per_server[members[k].server] += 1;
                live.push(k);
            }
            Err(e) => {
                st.open_failed += 1;
                st.first_error.get_or_insert(format!("watch: {e}"));
            }
        }
    }
    for &p in pids {
        crate::measure::wait_quiet(p, Duration::from_secs(30));
    }
    st.rss_with = pids.iter().map(|&p| status_kib(p, "VmRSS")).collect();
    log(format!(
        "  {} streams open in {:.1} s ({} failed, per server {:?}); server VmRSS with them: {:?} KiB",
        st.opened, st.open_secs, st.open_failed, st.per_server, st.rss_with
    ));

    // ---- fan-out: one change at a time, every stream's notice awaited
    let (mut all, mut each, mut writes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..o.rounds {
        let mut id: Option<String> = None;
        for _ in 0..2 {
            let t = Instant::now();
            let revision = if let Some(id) = id.take() {
                store.delete_entry(&id).expect("delete the fan-out entry");
                store.current_revision().expect("revision")
            } else {
                let e = store
                    .create_entry(fanout_entry(i))
                    .expect("create the fan-out entry");
                id = Some(e.id);
                e.revision
            };
            writes.push(t.elapsed());
            // From the write's start: a notice may come before the write's answer (the
            // commit sends it).
            let deadline = t + NOTICE_TIMEOUT;
            let arrival = |k: usize| {
                arrivals[k]
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(r, at)| *r >= revision && *at >= t)
                    .map(|(_, at)| at.saturating_duration_since(t))
            };
            loop {
                let got: Vec<Option<Duration>> = live.iter().map(|&k| arrival(k)).collect();
                if got.iter().all(Option::is_some) || Instant::now() >= deadline {
                    let mut last = Duration::ZERO;
                    for g in got {
                        match g {
                            Some(d) => {
                                last = last.max(d);
                                each.push(d);
                            }
                            None => st.missed += 1,
                        }
                    }
                    all.push(last);
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            st.changes += 1;
        }
    }
    st.fanout_all = Lat::of(all);
    st.fanout_each = Lat::of(each);
    st.write = Lat::of(writes);
    log(format!(
        "  fan-out of {} changes to {} streams: all reached p50 {:?} max {:?}; per stream p50 {:?} p99 {:?}; {} missed; write p50 {:?}",
        st.changes,
        live.len(),
        st.fanout_all.p50,
        st.fanout_all.max,
        st.fanout_each.p50,
        st.fanout_each.p99,
        st.missed,
        st.write.p50
    ));
    (st, Watching { tasks, ended })
}
