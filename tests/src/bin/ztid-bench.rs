//! `ztid-bench`: a benchmark (not a test) of the real `ztid-server` and `ztid-agent`
//! processes on this machine. It measures
//!
//! (a) X.509-SVIDs minted per second through the node API (mutual TLS with the real
//!     agent SVID, `SignX509Svids`), next to the raw rcgen/ring CSR-verify-plus-sign rate;
//! (b) Workload API `FetchX509SVID` latency over the agent's Unix socket, for an identity
//!     already held and for the first call of a fresh process;
//! (c) mint latency with 1,000 and with 1,000,000 registration entries;
//! (d) agent memory at 1,000 live workload instances;
//!
//! prints a markdown table and rewrites `docs/performance.md`.
//!
//! Run: `cargo run --release -p ztid-tests --bin ztid-bench` (it builds the server and
//! agent binaries first). Options: `--quick` (short smoke run, no doc), `--entries N`,
//! `--instances N`, `--secs S`, `--wait-quiet S` (how long to wait for other processes
//! to leave the machine idle first; default 300), `--no-doc`, `--out PATH`.
//! Internal modes: `ztid-bench worker ENDPOINT` (connect, fetch once, print the
//! latency) and `ztid-bench hold ENDPOINT` (fetch once, then wait for stdin to close).
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateSigningRequestDer;
use tonic::transport::Channel;
use ztid_agent::node_client::{self, AgentSvid};
use ztid_spiffe::Selector;
use ztid_ca::datastore::{DataStore, EntryRecord, SledStore};
use ztid_proto::node::{self as pb, node_client::NodeClient};
use ztid_tests::{entry_for_my_uid, wait_for, Agent, Server, READY_TIMEOUT};

const TD: &str = "bench.test";
const BENCH_ID: &str = "spiffe://bench.test/bench";

// ---------------------------------------------------------------------------------------
// Small helpers: options, percentiles, /proc readings.

#[derive(Clone, Debug)]
struct Opts {
    quick: bool,
    entries: u64,
    instances: usize,
    secs: f64,
    wait_quiet: f64,
    doc: Option<PathBuf>,
}

impl Opts {
    fn parse() -> Self {
        let root = workspace_root();
        let mut o = Opts {
            quick: false,
            entries: 1_000_000,
            instances: 1000,
            secs: 5.0,
            wait_quiet: 300.0,
            doc: Some(root.join("docs/performance.md")),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut val = |name: &str| {
                args.next()
                    .unwrap_or_else(|| panic!("{name} needs a value"))
            };
            match a.as_str() {
                "--quick" => {
                    o.quick = true;
                    o.entries = 20_000;
                    o.instances = 100;
                    o.secs = 1.5;
                    o.wait_quiet = 10.0;
                    o.doc = None;
                }
                "--entries" => o.entries = val("--entries").parse().expect("--entries N"),
                "--instances" => o.instances = val("--instances").parse().expect("--instances N"),
                "--secs" => o.secs = val("--secs").parse().expect("--secs S"),
                "--wait-quiet" => {
                    o.wait_quiet = val("--wait-quiet").parse().expect("--wait-quiet S")
                }
                "--no-doc" => o.doc = None,
                "--out" => o.doc = Some(PathBuf::from(val("--out"))),
                "-h" | "--help" => {
                    println!("usage: ztid-bench [--quick] [--entries N] [--instances N] [--secs S] [--wait-quiet S] [--no-doc] [--out PATH]");
                    std::process::exit(0);
                }
                other => panic!("unknown option {other:?} (try --help)"),
            }
        }
        o
    }
    fn dur(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Latency summary over a sorted sample.
#[derive(Clone, Debug, Default)]
struct Lat {
    n: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
}

impl Lat {
    fn of(mut v: Vec<Duration>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort();
        let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        let sum: Duration = v.iter().sum();
        Self {
            n: v.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: *v.last().unwrap(),
            mean: sum / v.len() as u32,
        }
    }
}

fn us(d: Duration) -> String {
    let u = d.as_secs_f64() * 1e6;
    if u >= 10_000.0 {
        format!("{:.1} ms", u / 1000.0)
    } else if u >= 1000.0 {
        format!("{:.2} ms", u / 1000.0)
    } else {
        format!("{u:.0} µs")
    }
}

fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User+system CPU seconds of a process (all threads).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    ticks as f64 / clk_tck()
}

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM, ...).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Busy CPU seconds of the whole machine (all cores), from `/proc/stat`.
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum();
    busy as f64 / clk_tck()
}

/// CPU seconds of this process plus its reaped children (the worker processes).
fn self_and_children_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = (11..=14)
        .filter_map(|i| f.get(i).and_then(|x| x.parse::<u64>().ok()))
        .sum();
    ticks as f64 / clk_tck()
}

/// CPU seconds of the server, the agent and this process over a window, and how much
/// CPU the rest of the machine (anything not started by this benchmark) used meanwhile.
struct CpuWindow {
    pids: [String; 3],
    start: [f64; 3],
    ours0: f64,
    machine0: f64,
    t0: Instant,
}

impl CpuWindow {
    fn start(server: u32, agent: u32) -> Self {
        let pids = [server.to_string(), agent.to_string(), "self".to_string()];
        let start = [cpu_secs(&pids[0]), cpu_secs(&pids[1]), cpu_secs(&pids[2])];
        Self {
            ours0: start[0] + start[1] + self_and_children_secs(),
            start,
            pids,
            machine0: machine_busy_secs(),
            t0: Instant::now(),
        }
    }
    /// (server, agent, bench) CPU seconds since `start`; records foreign load.
    fn stop(&self) -> [f64; 3] {
        let out: [f64; 3] = std::array::from_fn(|i| cpu_secs(&self.pids[i]) - self.start[i]);
        let ours = cpu_secs(&self.pids[0]) + cpu_secs(&self.pids[1]) + self_and_children_secs()
            - self.ours0;
        let foreign = (machine_busy_secs() - self.machine0 - ours).max(0.0);
        let share = foreign / (self.t0.elapsed().as_secs_f64() * cores() as f64);
        note_foreign(share);
        out
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

static FOREIGN: std::sync::Mutex<(f64, u32)> = std::sync::Mutex::new((0.0, 0));

/// Remembers the largest share of the machine used by other processes in a window.
fn note_foreign(share: f64) {
    let mut f = FOREIGN.lock().unwrap();
    f.0 = f.0.max(share);
    f.1 += 1;
    if share > 0.05 {
        log(format!(
            "  WARNING: other processes used {:.0}% of the machine during this measurement",
            share * 100.0
        ));
    }
}

/// Waits (at most `max`) until other processes use under 5% of the machine for 2 s.
fn wait_machine_quiet(max: Duration) -> (f64, Duration) {
    let start = Instant::now();
    loop {
        let m0 = machine_busy_secs();
        let o0 = self_and_children_secs();
        std::thread::sleep(Duration::from_secs(2));
        let share = (machine_busy_secs() - m0 - (self_and_children_secs() - o0)).max(0.0)
            / (2.0 * cores() as f64);
        if share < 0.05 || start.elapsed() >= max {
            return (share, start.elapsed());
        }
        log(format!(
            "machine busy ({:.0}% used by other processes); waiting for it to quiet down",
            share * 100.0
        ));
    }
}

/// Waits until `pid` used less than 2% of a core over 500 ms (at most `max`).
fn wait_quiet(pid: u32, max: Duration) -> Duration {
    let start = Instant::now();
    let p = pid.to_string();
    loop {
        let a = cpu_secs(&p);
        std::thread::sleep(Duration::from_millis(500));
        if cpu_secs(&p) - a <= 0.01 || start.elapsed() > max {
            return start.elapsed();
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[ztid-bench] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------
// Worker modes (run as separate, short-lived processes).

/// Connects and fetches once: (connect → first response, of which the connect, SPIFFE ID).
fn fetch_once(endpoint: &str) -> Result<(Duration, Duration, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let t0 = Instant::now();
        let c = spiffe::WorkloadApiClient::connect_to(endpoint)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let connected = t0.elapsed();
        let svid = c
            .fetch_x509_svid()
            .await
            .map_err(|e| format!("fetch: {e}"))?;
        Ok((t0.elapsed(), connected, svid.spiffe_id().to_string()))
    })
}

/// `worker ENDPOINT`: one fetch, prints `ok <total ns> <connect ns> <spiffe id>`.
fn worker(endpoint: &str) -> ! {
    match fetch_once(endpoint) {
        Ok((d, c, id)) => {
            println!("ok {} {} {id}", d.as_nanos(), c.as_nanos());
            std::process::exit(0)
        }
        Err(e) => {
            println!("err {e}");
            std::process::exit(1)
        }
    }
}

/// `hold ENDPOINT`: one fetch, prints the result, then lives until stdin closes.
fn hold(endpoint: &str) -> ! {
    let r = fetch_once(endpoint);
    match &r {
        Ok((d, c, id)) => println!("ok {} {} {id}", d.as_nanos(), c.as_nanos()),
        Err(e) => println!("err {e}"),
    }
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 64];
    while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
    std::process::exit(if r.is_ok() { 0 } else { 1 })
}

/// (connect → first response, connect) from a worker's output line.
fn parse_worker_line(line: &str) -> Result<(Duration, Duration), String> {
    let mut it = line.split_whitespace();
    if it.next() != Some("ok") {
        return Err(line.trim().to_string());
    }
    let mut ns = || {
        it.next()
            .and_then(|n| n.parse::<u64>().ok())
            .map(Duration::from_nanos)
    };
    match (ns(), ns()) {
        (Some(total), Some(connect)) => Ok((total, connect)),
        _ => Err(format!("bad worker line {line:?}")),
    }
}

// ---------------------------------------------------------------------------------------
// The disk: fdatasync latency (the server's audit log syncs before every answer).

/// Latency of `write(256 B)` + `fdatasync` on a file in `dir`.
fn fsync_probe(dir: &Path, n: usize) -> Lat {
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
fn settle_disk(max: Duration) -> Duration {
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

// ---------------------------------------------------------------------------------------
// Raw crypto: rcgen CSR parse+verify, then an rcgen leaf signed by an rcgen issuer.

fn key_and_csr(spiffe_id: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.to_string().try_into().expect("uri"))];
    params.serialize_request(&key).expect("csr").der().to_vec()
}

fn csr_pool(n: usize, prefix: &str) -> Vec<Vec<u8>> {
    (0..n)
        // Instance segments in the one form the server accepts: 32 lowercase hex.
        .map(|i| key_and_csr(&format!("{prefix}/{i:032x}")))
        .collect()
}

fn raw_issuer() -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ztid");
    dn.push(DnType::CommonName, "bench X.509 authority");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{TD}").try_into().unwrap())];
    let _ = params.self_signed(&key).expect("self-signed CA");
    Issuer::new(params, key)
}

fn raw_parse_verify(csr: &[u8]) -> CertificateSigningRequestParams {
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
        .expect("CSR verifies")
}

/// The same leaf template the server uses (authority.rs `sign_leaf`).
fn raw_sign(
    issuer: &Issuer<'static, KeyPair>,
    csr: &CertificateSigningRequestParams,
    rng: &ring::rand::SystemRandom,
) -> usize {
    let mut serial = [0u8; 16];
    rng.fill(&mut serial).unwrap();
    serial[0] = (serial[0] & 0x7f).max(1);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ztid");
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let uri = csr
        .params
        .subject_alt_names
        .iter()
        .find_map(|s| match s {
            SanType::URI(u) => Some(u.clone()),
            _ => None,
        })
        .expect("URI SAN");
    params.subject_alt_names = vec![SanType::URI(uri)];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::seconds(10);
    params.not_after = now + time::Duration::hours(1);
    params
        .signed_by(&csr.public_key, issuer)
        .expect("sign")
        .der()
        .len()
}

struct Raw {
    /// CSR parse+verify+sign per second, one thread.
    rate1: f64,
    /// Same with two threads (the whole machine).
    rate2: f64,
    /// µs per op, one thread.
    us_total: f64,
    us_verify: f64,
    us_sign: f64,
    leaf_bytes: usize,
}

fn timed_loop(dur: Duration, mut f: impl FnMut(usize)) -> (u64, Duration) {
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..16 {
            f(n as usize);
            n += 1;
        }
        if start.elapsed() >= dur {
            return (n, start.elapsed());
        }
    }
}

fn raw_crypto(opts: &Opts, csrs: &[Vec<u8>]) -> Raw {
    let issuer = raw_issuer();
    let rng = ring::rand::SystemRandom::new();
    let warm = Duration::from_millis(if opts.quick { 200 } else { 500 });
    let part = Duration::from_secs_f64((opts.secs * 0.4).max(1.0));
    let one = |i: usize| raw_sign(&issuer, &raw_parse_verify(&csrs[i % csrs.len()]), &rng);
    let leaf_bytes = one(0);
    timed_loop(warm, |i| {
        one(i);
    });
    let (n, t) = timed_loop(opts.dur(), |i| {
        one(i);
    });
    let rate1 = n as f64 / t.as_secs_f64();
    let (nv, tv) = timed_loop(part, |i| {
        std::hint::black_box(raw_parse_verify(&csrs[i % csrs.len()]));
    });
    let parsed: Vec<_> = csrs.iter().take(64).map(|c| raw_parse_verify(c)).collect();
    let (ns, ts) = timed_loop(part, |i| {
        std::hint::black_box(raw_sign(&issuer, &parsed[i % parsed.len()], &rng));
    });
    // Two threads, each with its own issuer (as two server workers share one key).
    let issuer_ref = &issuer;
    let total = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|t| {
                s.spawn(move || {
                    let rng = ring::rand::SystemRandom::new();
                    let f = |i: usize| {
                        raw_sign(
                            issuer_ref,
                            &raw_parse_verify(&csrs[(i + t * 500) % csrs.len()]),
                            &rng,
                        )
                    };
                    timed_loop(warm, |i| {
                        f(i);
                    });
                    timed_loop(opts.dur(), |i| {
                        f(i);
                    })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .map(|(n, t)| n as f64 / t.as_secs_f64())
            .sum::<f64>()
    });
    Raw {
        rate1,
        rate2: total,
        us_total: 1e6 / rate1,
        us_verify: tv.as_secs_f64() * 1e6 / nv as f64,
        us_sign: ts.as_secs_f64() * 1e6 / ns as f64,
        leaf_bytes,
    }
}

// ---------------------------------------------------------------------------------------
// The node API as the agent.

fn agent_client(server: &Server, agent: &Agent) -> NodeClient<Channel> {
    let data = agent.data_dir();
    let pem = std::fs::read_to_string(data.join("agent_svid.pem")).expect("agent_svid.pem");
    let chain = ztid_spiffe::svid::certs_from_pem(&pem).expect("agent chain");
    let key = std::fs::read(data.join("agent_key.pk8")).expect("agent_key.pk8");
    let svid = AgentSvid::from_parts(chain, key).expect("agent SVID");
    assert_eq!(svid.spiffe_id, agent.spiffe_id);
    let roots_pem = std::fs::read_to_string(server.bundle_file()).expect("bundle");
    let roots = ztid_spiffe::svid::certs_from_pem(&roots_pem).expect("bundle certs");
    let verifier = Arc::new(ztid_spiffe::tls::ServerSvidVerifier::new(
        ztid_spiffe::tls::shared_roots(roots),
        format!("spiffe://{TD}/ztid/server"),
    ));
    let addr: SocketAddr = server.addr().parse().unwrap();
    node_client::connect(
        addr,
        verifier,
        Some(svid.certified_key().expect("agent key")),
    )
    .expect("node client")
}

#[derive(Default)]
struct MintRun {
    batch: usize,
    conc: usize,
    conns: usize,
    ok: u64,
    errors: u64,
    secs: f64,
    calls: Lat,
    cpu: [f64; 3],
}

impl MintRun {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
    fn cpu_us_per_svid(&self, i: usize) -> f64 {
        self.cpu[i] * 1e6 / self.ok.max(1) as f64
    }
}

async fn mint(
    clients: &[NodeClient<Channel>],
    entry_id: &str,
    csrs: &Arc<Vec<Vec<u8>>>,
    batch: usize,
    conc: usize,
    dur: Duration,
) -> (u64, u64, f64, Vec<Duration>) {
    let start = Instant::now();
    let deadline = start + dur;
    let mut handles = Vec::new();
    for t in 0..conc {
        let mut c = clients[t % clients.len()].clone();
        let csrs = csrs.clone();
        let entry = entry_id.to_string();
        handles.push(tokio::spawn(async move {
            let (mut ok, mut err) = (0u64, 0u64);
            let mut lats = Vec::new();
            let mut i = t * 7919;
            while Instant::now() < deadline {
                let requests = (0..batch)
                    .map(|_| {
                        i += 1;
                        pb::SvidRequest {
                            entry_id: entry.clone(),
                            csr: csrs[i % csrs.len()].clone(),
                        }
                    })
                    .collect();
                let t0 = Instant::now();
                match c
                    .sign_x509_svids(pb::SignX509SvidsRequest { requests })
                    .await
                {
                    Ok(r) => {
                        lats.push(t0.elapsed());
                        for res in r.into_inner().results {
                            match res.result {
                                Some(pb::svid_result::Result::Svid(_)) => ok += 1,
                                _ => err += 1,
                            }
                        }
                    }
                    Err(_) => err += batch as u64,
                }
            }
            (ok, err, lats)
        }));
    }
    let (mut ok, mut err, mut lats) = (0, 0, Vec::new());
    for h in handles {
        let (o, e, l) = h.await.expect("mint task");
        ok += o;
        err += e;
        lats.extend(l);
    }
    (ok, err, start.elapsed().as_secs_f64(), lats)
}

#[allow(clippy::too_many_arguments)]
fn mint_run(
    rt: &tokio::runtime::Runtime,
    clients: &[NodeClient<Channel>],
    entry_id: &str,
    csrs: &Arc<Vec<Vec<u8>>>,
    batch: usize,
    conc: usize,
    dur: Duration,
    pids: (u32, u32),
) -> MintRun {
    // Warm-up (connections, caches), then the timed window.
    rt.block_on(mint(
        clients,
        entry_id,
        csrs,
        batch,
        conc,
        Duration::from_millis(500),
    ));
    let cpu = CpuWindow::start(pids.0, pids.1);
    let (ok, errors, secs, lats) = rt.block_on(mint(clients, entry_id, csrs, batch, conc, dur));
    MintRun {
        batch,
        conc,
        conns: clients.len(),
        ok,
        errors,
        secs,
        calls: Lat::of(lats),
        cpu: cpu.stop(),
    }
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

/// Calls until the server answers again (after a restart the channel reconnects).
fn wait_node_api(
    rt: &tokio::runtime::Runtime,
    c: &NodeClient<Channel>,
    entry_id: &str,
    csr: &[u8],
) {
    wait_for(
        "the node API to answer as the agent",
        Duration::from_secs(120),
        || {
            let mut c = c.clone();
            let r = rt.block_on(c.sign_x509_svids(pb::SignX509SvidsRequest {
                requests: vec![pb::SvidRequest {
                    entry_id: entry_id.to_string(),
                    csr: csr.to_vec(),
                }],
            }));
            match r {
                Ok(r) => matches!(
                    r.into_inner()
                        .results
                        .first()
                        .and_then(|x| x.result.as_ref()),
                    Some(pb::svid_result::Result::Svid(_))
                )
                .then_some(()),
                Err(_) => None,
            }
        },
    );
}

fn timed_sync(
    rt: &tokio::runtime::Runtime,
    c: &NodeClient<Channel>,
    since: u64,
) -> (Duration, pb::SyncEntriesResponse) {
    let mut c = c.clone();
    let t0 = Instant::now();
    let r = rt
        .block_on(c.sync_entries(pb::SyncEntriesRequest {
            since_revision: since,
            bundle_sequence: u64::MAX,
            ..Default::default()
        }))
        .expect("SyncEntries")
        .into_inner();
    (t0.elapsed(), r)
}

// ---------------------------------------------------------------------------------------
// Bulk registration entries straight into the (stopped) server's datastore.

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

/// Inserts entries `from..to` with two threads; returns (insert, flush) time.
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

fn stop_server(server: &mut Server) {
    if let Some(mut p) = server.proc.take() {
        p.stop();
    }
}

fn dir_size(p: &Path) -> u64 {
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

// ---------------------------------------------------------------------------------------
// Worker processes.

fn spawn_worker(mode: &str, endpoint: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .arg(mode)
        .arg(endpoint)
        .stdin(if mode == "hold" {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn worker")
}

struct Fresh {
    lat: Lat,
    connect: Lat,
    wall: Lat,
    failures: usize,
    cpu: [f64; 3],
}

fn fresh_processes(endpoint: &str, max_n: usize, dur: Duration, pids: (u32, u32)) -> Fresh {
    // Warm-up: a few processes whose figures are not kept.
    for _ in 0..5 {
        let _ = spawn_worker("worker", endpoint).wait_with_output();
    }
    let cpu = CpuWindow::start(pids.0, pids.1);
    let (mut lats, mut connects, mut walls, mut failures) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let start = Instant::now();
    while lats.len() + failures < max_n && start.elapsed() < dur {
        let t0 = Instant::now();
        let out = spawn_worker("worker", endpoint)
            .wait_with_output()
            .expect("worker");
        walls.push(t0.elapsed());
        match parse_worker_line(&String::from_utf8_lossy(&out.stdout)) {
            Ok((d, c)) => {
                lats.push(d);
                connects.push(c);
            }
            Err(e) => {
                failures += 1;
                log(format!("worker failed: {e}"));
            }
        }
    }
    Fresh {
        lat: Lat::of(lats),
        connect: Lat::of(connects),
        wall: Lat::of(walls),
        failures,
        cpu: cpu.stop(),
    }
}

struct Memory {
    instances: usize,
    failures: usize,
    rss_before: u64,
    hwm_before: u64,
    rss_at: u64,
    hwm_at: u64,
    rss_after: u64,
    threads_at: u64,
    spawn_secs: f64,
    first_fetch: Lat,
    worker_rss: u64,
    leftover: usize,
}

fn memory_at_instances(agent_pid: u32, endpoint: &str, n: usize) -> Memory {
    // Let exited instances from earlier phases be forgotten first.
    std::thread::sleep(Duration::from_millis(2500));
    let rss_before = status_kib(agent_pid, "VmRSS");
    let hwm_before = status_kib(agent_pid, "VmHWM");
    let mut guard = HeldProcs(Vec::with_capacity(n));
    let held = &mut guard.0;
    let (mut lats, mut failures) = (Vec::new(), 0);
    let start = Instant::now();
    let wave = 4;
    while held.len() < n {
        let k = wave.min(n - held.len());
        let mut batch: Vec<Child> = (0..k).map(|_| spawn_worker("hold", endpoint)).collect();
        for mut c in batch.drain(..) {
            let mut line = String::new();
            let mut out = BufReader::new(c.stdout.take().expect("stdout"));
            let _ = out.read_line(&mut line);
            match parse_worker_line(&line) {
                Ok((d, _)) => lats.push(d),
                Err(e) => {
                    failures += 1;
                    log(format!("hold worker failed: {e}"));
                }
            }
            let stdin = c.stdin.take();
            held.push((c, stdin));
        }
        if held.len().is_multiple_of(250) {
            log(format!("  … {} live instances", held.len()));
        }
    }
    let spawn_secs = start.elapsed().as_secs_f64();
    // Two rotation ticks so the agent's housekeeping has run with all of them live.
    std::thread::sleep(Duration::from_millis(2500));
    let mut alive = 0;
    for (c, _) in held.iter_mut() {
        if c.try_wait().ok().flatten().is_none() {
            alive += 1;
        }
    }
    let rss_at = status_kib(agent_pid, "VmRSS");
    let hwm_at = status_kib(agent_pid, "VmHWM");
    let threads_at = status_kib(agent_pid, "Threads");
    let worker_rss = {
        let mut v: Vec<u64> = held
            .iter()
            .map(|(c, _)| status_kib(c.id(), "VmRSS"))
            .collect();
        v.sort();
        v[v.len() / 2]
    };
    // Clean up every process: closing stdin ends each one.
    for (_, stdin) in held.iter_mut() {
        drop(stdin.take());
    }
    let mut leftover = 0;
    for (c, _) in held.iter_mut() {
        let t0 = Instant::now();
        loop {
            if c.try_wait().ok().flatten().is_some() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                let _ = c.kill();
                let _ = c.wait();
                leftover += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(Duration::from_millis(2500));
    let rss_after = status_kib(agent_pid, "VmRSS");
    Memory {
        instances: alive,
        failures,
        rss_before,
        hwm_before,
        rss_at,
        hwm_at,
        rss_after,
        threads_at,
        spawn_secs,
        first_fetch: Lat::of(lats),
        worker_rss,
        leftover,
    }
}

/// Live `hold` workers; any still running when this is dropped (a panic) are killed.
struct HeldProcs(Vec<(Child, Option<ChildStdin>)>);

impl Drop for HeldProcs {
    fn drop(&mut self) {
        for (c, stdin) in self.0.iter_mut() {
            drop(stdin.take());
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// SHA-256 of a file the way the agent's workload attestor does it (64 KiB reads).
fn hash_file_time(p: &Path) -> (u64, Duration) {
    let t0 = Instant::now();
    let mut f = std::fs::File::open(p).expect("open exe");
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
        ctx.update(&buf[..k]);
    }
    std::hint::black_box(ctx.finish());
    (n, t0.elapsed())
}

// ---------------------------------------------------------------------------------------

fn build_binaries() {
    if std::env::var_os("ZTID_BIN_DIR").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("bin dir").to_path_buf();
    let release = dir.file_name().is_some_and(|n| n == "release");
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
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build of the server and agent failed");
    }
    if !release {
        log("WARNING: not a release build; figures are meaningless (use --release)");
    }
    std::env::set_var("ZTID_BIN_DIR", &dir);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("worker") => worker(args.get(2).expect("worker ENDPOINT")),
        Some("hold") => hold(args.get(2).expect("hold ENDPOINT")),
        _ => {}
    }
    let opts = Opts::parse();
    // Before any thread exists: the server logs every issuance at INFO; keep the log quiet.
    if std::env::var_os("ZTID_LOG").is_none() {
        std::env::set_var("ZTID_LOG", "warn");
    }
    build_binaries();
    // The commit the binaries were just built from (the tree may move during the run).
    let rev = git_rev();
    let log_level = std::env::var("ZTID_LOG").unwrap_or_default();
    let bench_start = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // ---- a quiet machine first: other processes' CPU would be measured as ours
    let quiet_start = wait_machine_quiet(Duration::from_secs_f64(opts.wait_quiet));
    if quiet_start.0 >= 0.05 {
        log(format!(
            "WARNING: starting anyway, other processes use {:.0}% of the machine; figures will be low",
            quiet_start.0 * 100.0
        ));
    }

    // ---- raw crypto
    log("raw rcgen/ring CSR verify + sign");
    let raw_csrs = csr_pool(1000, BENCH_ID);
    let raw_window = CpuWindow::start(0, 0);
    let raw = raw_crypto(&opts, &raw_csrs);
    raw_window.stop();
    log(format!(
        "  raw: {:.0}/s on 1 thread ({:.1} µs: verify {:.1} + sign {:.1}), {:.0}/s on 2 threads",
        raw.rate1, raw.us_total, raw.us_verify, raw.us_sign, raw.rate2
    ));

    // ---- server, agent, entry
    log("starting ztid-server and ztid-agent");
    let mut server = Server::start(TD);
    let agent = Agent::start(&server);
    let agent_pid = agent.proc.child.id();
    let entry_id = entry_for_my_uid(&server, &agent, BENCH_ID, &[]);
    let endpoint = agent.endpoint();
    // The server's audit log fdatasyncs before every answer: how fast is this disk?
    let fsync_early = fsync_probe(&server.data_dir(), 300);
    log(format!(
        "  fdatasync in the server's data dir: p50 {} p99 {}",
        us(fsync_early.p50),
        us(fsync_early.p99)
    ));
    // The entry reaches the agent on its next sync.
    let held_client = rt.block_on(async {
        let c = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .expect("connect to agent");
        let start = Instant::now();
        loop {
            match c.fetch_x509_svid().await {
                Ok(s) => {
                    assert!(s.spiffe_id().to_string().starts_with(BENCH_ID));
                    break;
                }
                Err(e) => {
                    assert!(
                        start.elapsed() < READY_TIMEOUT,
                        "no SVID from the agent: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        c
    });
    let clients: Vec<_> = {
        let _g = rt.enter();
        (0..2).map(|_| agent_client(&server, &agent)).collect()
    };
    let csrs = Arc::new(raw_csrs);
    wait_node_api(&rt, &clients[0], &entry_id, &csrs[0]);
    // Sanity: the SVID carries the CSR's identity.
    {
        let mut c = clients[0].clone();
        let r = rt
            .block_on(c.sign_x509_svids(pb::SignX509SvidsRequest {
                requests: vec![pb::SvidRequest {
                    entry_id: entry_id.clone(),
                    csr: csrs[3].clone(),
                }],
            }))
            .unwrap()
            .into_inner();
        match &r.results[0].result {
            Some(pb::svid_result::Result::Svid(s)) => {
                assert_eq!(s.spiffe_id, format!("{BENCH_ID}/{:032x}", 3));
                assert_eq!(ztid_tests::spiffe_id_of(&s.cert_chain[0]), s.spiffe_id);
            }
            other => panic!("SignX509Svids refused the bench CSR: {other:?}"),
        }
    }

    // ---- (a) throughput
    log("(a) node API SignX509Svids throughput");
    let pids = (server_pid_of(&server), agent_pid);
    let configs: &[(usize, usize, usize)] =
        &[(1, 1, 1), (1, 16, 2), (10, 8, 2), (100, 2, 2), (100, 4, 2)];
    let mut runs = Vec::new();
    for &(batch, conc, conns) in configs {
        let r = mint_run(
            &rt,
            &clients[..conns],
            &entry_id,
            &csrs,
            batch,
            conc,
            opts.dur(),
            pids,
        );
        log(format!(
            "  batch {batch:>3} × {conc:>2} in flight over {conns} conn: {:>8.0} SVIDs/s (errors {}), call p50 {} p99 {}, server CPU {:.1} µs/SVID, bench CPU {:.1} µs/SVID",
            r.rate(),
            r.errors,
            us(r.calls.p50),
            us(r.calls.p99),
            r.cpu_us_per_svid(0),
            r.cpu_us_per_svid(2)
        ));
        runs.push(r);
    }
    let best_idx = (0..runs.len())
        .max_by(|&a, &b| runs[a].rate().partial_cmp(&runs[b].rate()).unwrap())
        .expect("a run");

    // ---- (b) Workload API latency
    log("(b) FetchX509SVID latency, identity already held");
    let held = rt.block_on(async {
        let warm_end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < warm_end {
            held_client.fetch_x509_svid().await.expect("fetch");
        }
        let cpu = CpuWindow::start(pids.0, pids.1);
        let mut lats = Vec::new();
        let end = Instant::now() + opts.dur();
        while Instant::now() < end {
            let t0 = Instant::now();
            held_client.fetch_x509_svid().await.expect("fetch");
            lats.push(t0.elapsed());
        }
        (Lat::of(lats), cpu.stop())
    });
    log(format!(
        "  held: n {} p50 {} p99 {} max {}",
        held.0.n,
        us(held.0.p50),
        us(held.0.p99),
        us(held.0.max)
    ));

    log("(b) FetchX509SVID latency, first call of a fresh process");
    let exe = std::env::current_exe().unwrap();
    let (exe_bytes, exe_hash) = {
        hash_file_time(&exe); // page cache warm
        let mut v: Vec<Duration> = (0..5).map(|_| hash_file_time(&exe).1).collect();
        v.sort();
        (hash_file_time(&exe).0, v[2])
    };
    let fresh = fresh_processes(
        &endpoint,
        if opts.quick { 60 } else { 400 },
        opts.dur() * 2,
        pids,
    );
    log(format!(
        "  fresh: n {} p50 {} p99 {} max {} (failures {}); exe {:.1} MB hashes in {}",
        fresh.lat.n,
        us(fresh.lat.p50),
        us(fresh.lat.p99),
        us(fresh.lat.max),
        fresh.failures,
        exe_bytes as f64 / 1e6,
        us(exe_hash)
    ));

    // ---- (d) memory
    log(format!(
        "(d) agent memory at {} live instances",
        opts.instances
    ));
    let mem = memory_at_instances(agent_pid, &endpoint, opts.instances);
    log(format!(
        "  RSS before {} at {} {} after cleanup {}; HWM {}",
        mib(mem.rss_before),
        mem.instances,
        mib(mem.rss_at),
        mib(mem.rss_after),
        mib(mem.hwm_at)
    ));
    drop(held_client);

    // ---- (c) entries
    log("(c) mint latency with 1,000 and with many entries");
    let (_, s0) = timed_sync(&rt, &clients[0], 0);
    let rev_before = s0.revision;
    stop_server(&mut server);
    let (ins_1k, _) = bulk_insert(&server, 0, 999);
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
        agent_client(&big, &agent)
    };
    wait_node_api(&rt, &clients[0], &entry_id, &csrs[0]);
    wait_node_api(&rt, &big_client, &entry_id, &csrs[0]);
    let (sync_1k_inc, r1k) = timed_sync(&rt, &clients[0], rev_before);
    // Catching up over the big insert walks the whole entry log: time it, then let
    // both servers go quiet before the latency rounds.
    let (sync_big_inc, rbig) = timed_sync(&rt, &big_client, r1k.revision);
    let quiet = wait_quiet(server_pid_of(&big), Duration::from_secs(60));
    wait_quiet(server_pid_of(&server), Duration::from_secs(30));
    let (sync_big_none, _) = timed_sync(&rt, &big_client, rbig.revision);
    let (sync_big_full, full) = timed_sync(&rt, &big_client, 0);
    let fsync_late = fsync_probe(&big.data_dir(), 300);
    let (lat_1k, lat_big) = interleaved_mints(
        &rt,
        [&clients[0], &big_client],
        [server_pid_of(&server), server_pid_of(&big)],
        agent_pid,
        &entry_id,
        &csrs,
        opts.dur(),
    );
    let rss_server_1k = status_kib(server_pid_of(&server), "VmRSS");
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

    let total = bench_start.elapsed();
    stop_server(&mut server);
    drop(agent);

    // ---- report
    let r = Report {
        opts: opts.clone(),
        log_level,
        raw,
        runs,
        best_idx,
        held: held.0,
        held_cpu: held.1,
        fresh,
        exe_bytes,
        exe_hash,
        mem,
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
        total,
        quiet_start,
        foreign_max: FOREIGN.lock().unwrap().0,
        fsync_early,
        fsync_late,
        settle_big,
        git_rev: rev,
        kept_notes: kept_notes(opts.doc.as_deref()),
    };
    let summary = r.summary_table();
    println!("{summary}");
    if let Some(path) = &opts.doc {
        std::fs::create_dir_all(path.parent().unwrap()).ok();
        std::fs::write(path, r.document()).expect("write docs/performance.md");
        log(format!("wrote {}", path.display()));
    }
}

fn server_pid_of(server: &Server) -> u32 {
    server.proc.as_ref().expect("server running").child.id()
}

struct Report {
    opts: Opts,
    log_level: String,
    raw: Raw,
    runs: Vec<MintRun>,
    best_idx: usize,
    held: Lat,
    held_cpu: [f64; 3],
    fresh: Fresh,
    exe_bytes: u64,
    exe_hash: Duration,
    mem: Memory,
    ins_1k: Duration,
    ins_big: Duration,
    flush_big: Duration,
    ds_bytes: u64,
    restart_ready: Duration,
    quiet: Duration,
    lat_1k: MintRun,
    lat_big: MintRun,
    sync_1k_inc: Duration,
    sync_big_inc: Duration,
    sync_big_none: Duration,
    sync_big_full: Duration,
    full_len: usize,
    rss_server_1k: u64,
    rss_server_big: u64,
    total: Duration,
    quiet_start: (f64, Duration),
    foreign_max: f64,
    fsync_early: Lat,
    fsync_late: Lat,
    settle_big: Duration,
    git_rev: String,
    /// The sections of the previous `docs/performance.md` this run does not generate.
    kept_notes: Option<String>,
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
fn kept_notes(path: Option<&Path>) -> Option<String> {
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
/// benchmark's own (`tests/src/bin/ztid-bench.rs`, `docs/`) differ from it.
fn git_rev() -> String {
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
        path != "tests/src/bin/ztid-bench.rs" && !path.starts_with("docs/")
    });
    if dirty {
        format!("{rev} + local changes")
    } else {
        rev
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

impl Report {
    fn best(&self) -> &MintRun {
        &self.runs[self.best_idx]
    }
    fn ratio2(&self) -> f64 {
        self.best().rate() / self.raw.rate2
    }
    fn ratio1(&self) -> f64 {
        self.best().rate() / self.raw.rate1
    }
    fn entries_ratio(&self) -> f64 {
        self.lat_big.calls.p50.as_secs_f64() / self.lat_1k.calls.p50.as_secs_f64()
    }
    fn per_instance_kib(&self) -> f64 {
        (self.mem.rss_at as f64 - self.mem.rss_before as f64) / self.mem.instances.max(1) as f64
    }

    fn summary_table(&self) -> String {
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
            "| (b) FetchX509SVID, identity held: p50 / p99 (n={}) | {} / **{}** | p99 < 1 ms | {} |",
            self.held.n,
            us(self.held.p50),
            us(self.held.p99),
            met(self.held.p99 < Duration::from_millis(1))
        );
        let _ = writeln!(
            s,
            "| (b) FetchX509SVID, fresh process, connect→first response: p50 / p99 (n={}) | {} / **{}** | p99 < 5 ms | {} |",
            self.fresh.lat.n,
            us(self.fresh.lat.p50),
            us(self.fresh.lat.p99),
            met(self.fresh.failures == 0 && self.fresh.lat.p99 < Duration::from_millis(5))
        );
        let _ = writeln!(
            s,
            "| (c) mint latency, 1 CSR/call, sequential: p50 with 1,000 / {} entries | {} / {} | | |",
            thousands(self.opts.entries as f64),
            us(self.lat_1k.calls.p50),
            us(self.lat_big.calls.p50)
        );
        let _ = writeln!(
            s,
            "| (c) ratio {} / 1,000 entries (p50; p99 {} → {}) | **{:.2}** | ≤ 1.2 | {} |",
            thousands(self.opts.entries as f64),
            us(self.lat_1k.calls.p99),
            us(self.lat_big.calls.p99),
            self.entries_ratio(),
            met(self.entries_ratio() <= 1.2)
        );
        let _ = writeln!(
            s,
            "| (c) bulk insert of {} entries (DataStore::create_entry, 2 threads) + flush | {:.1} s + {:.1} s | | |",
            thousands((self.opts.entries - 1000) as f64),
            self.ins_big.as_secs_f64(),
            self.flush_big.as_secs_f64()
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

    fn document(&self) -> String {
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
            "Measured by the benchmark `tests/src/bin/ztid-bench.rs` against the real `ztid-server` and \
             `ztid-agent` processes (started by the `ztid-tests` harness), on one machine. This file is \
             rewritten by every full run, which keeps any section it does not generate itself (notes, \
             figures from other benches) after its own; the figures below are from the run of {date}, product commit `{}`.\n",
            self.git_rev
        );
        let _ = writeln!(d, "## How to run\n");
        let _ = writeln!(
            d,
            "```sh\ncargo run --release -p ztid-tests --bin ztid-bench\n```\n"
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
        for x in &self.runs {
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
        let f = &self.fresh;
        let _ = writeln!(d, "## (b) Workload API `FetchX509SVID` latency\n");
        let _ = writeln!(
            d,
            "Client: the unmodified `spiffe` 0.19 crate (`WorkloadApiClient::fetch_x509_svid`, which also \
             parses the returned certificate and key) over the agent's real Unix socket, entry selector \
             `unix:uid:<uid>` (per-instance).\n"
        );
        let _ = writeln!(
            d,
            "| case | n | p50 | p90 | p99 | max | target |\n|---|---:|---:|---:|---:|---:|---|"
        );
        let _ = writeln!(
            d,
            "| identity already held (same process, one connection, sequential calls) | {} | {} | {} | {} | {} | p99 < 1 ms: {} |",
            self.held.n,
            us(self.held.p50),
            us(self.held.p90),
            us(self.held.p99),
            us(self.held.max),
            met(self.held.p99 < Duration::from_millis(1))
        );
        let _ = writeln!(
            d,
            "| new process: connect → first response, timed inside the worker | {} | {} | {} | {} | {} | p99 < 5 ms: {} |",
            f.lat.n,
            us(f.lat.p50),
            us(f.lat.p90),
            us(f.lat.p99),
            us(f.lat.max),
            met(f.failures == 0 && f.lat.p99 < Duration::from_millis(5))
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
        let held_calls = self.held.n.max(1) as f64;
        let fresh_n = f.lat.n.max(1) as f64;
        let _ = writeln!(
            d,
            "Workers are this benchmark's own binary in `worker` mode (`{:.1} MB` executable), spawned \
             one after the other, {} failures. CPU per call — held: agent {:.0} µs, bench client {:.0} µs; \
             new process: agent {:.0} µs, server {:.0} µs. The agent's workload attestor hashes the \
             caller's executable (SHA-256, `agent-attestor/src/workload_attestation.rs` `sha256_file`) \
             and caches the hash by device, inode, size and ctime, so only the first process of a binary \
             pays it (the warm-up workers did): for this executable that costs **{}**, measured by \
             hashing it the same way in the bench process.\n",
            self.exe_bytes as f64 / 1e6,
            f.failures,
            self.held_cpu[1] * 1e6 / held_calls,
            self.held_cpu[2] * 1e6 / held_calls,
            f.cpu[1] * 1e6 / fresh_n,
            f.cpu[0] * 1e6 / fresh_n,
            us(self.exe_hash)
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
            ("1,000", &self.lat_1k, self.rss_server_1k),
            (n.as_str(), &self.lat_big, self.rss_server_big),
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
            us(self.fsync_late.p50),
            us(self.fsync_late.p99),
            self.settle_big.as_secs_f64()
        );
        let _ = writeln!(
            d,
            "\nRatio {n} / 1,000 entries: p50 **{:.2}**, p99 {:.2}, mean {:.2} (target ≤ 1.2: {}).\n",
            self.entries_ratio(),
            self.lat_big.calls.p99.as_secs_f64() / self.lat_1k.calls.p99.as_secs_f64(),
            self.lat_big.calls.mean.as_secs_f64() / self.lat_1k.calls.mean.as_secs_f64(),
            met(self.entries_ratio() <= 1.2)
        );
        let _ = writeln!(d, "| datastore operation | time |\n|---|---:|");
        let _ = writeln!(
            d,
            "| insert 999 entries (2 threads) | {:.2} s |",
            self.ins_1k.as_secs_f64()
        );
        let _ = writeln!(
            d,
            "| insert {} entries (2 threads) | {:.1} s ({:.1} µs/entry, {}/s) |",
            thousands((o.entries - 1000) as f64),
            self.ins_big.as_secs_f64(),
            self.ins_big.as_secs_f64() * 1e6 / (o.entries - 1000) as f64,
            thousands((o.entries - 1000) as f64 / self.ins_big.as_secs_f64())
        );
        let _ = writeln!(d, "| flush | {:.1} s |", self.flush_big.as_secs_f64());
        let _ = writeln!(
            d,
            "| datastore size on disk at {n} entries | {:.0} MB |",
            self.ds_bytes as f64 / 1e6
        );
        let _ = writeln!(
            d,
            "| server restart until healthy at {n} entries | {:.1} s |",
            self.restart_ready.as_secs_f64()
        );
        let _ = writeln!(
            d,
            "| agent's incremental `SyncEntries` at 1,000 entries (999 new, none its own) | {} |",
            us(self.sync_1k_inc)
        );
        let _ = writeln!(
            d,
            "| agent's incremental `SyncEntries` after {} new entries, none its own | **{}** |",
            thousands((o.entries - 1000) as f64),
            us(self.sync_big_inc)
        );
        let _ = writeln!(
            d,
            "| `SyncEntries` with nothing new, at {n} | {} |",
            us(self.sync_big_none)
        );
        let _ = writeln!(
            d,
            "| full `SyncEntries` (since 0; {} entries returned), at {n} | {} |",
            self.full_len,
            us(self.sync_big_full)
        );
        let _ = writeln!(
            d,
            "| server busy after restart at {n} entries before it went quiet | {:.1} s |\n",
            self.quiet.as_secs_f64()
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

    fn analysis(&self) -> String {
        let b = self.best();
        let r = &self.raw;
        let f = &self.fresh;
        let mut a = String::new();
        let _ = writeln!(a, "## Where the time goes (computed from this run)\n");
        let server_us = b.cpu_us_per_svid(0);
        let client_us = b.cpu_us_per_svid(2);
        let one = &self.runs[0];
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
            us(self.held.p50),
            us(self.held.p99),
            self.held_cpu[1] * 1e6 / self.held.n.max(1) as f64
        );
        let _ = writeln!(
            a,
            "- **(b) New process.** Connect → first response p50 {} / p99 {}, of which the client's \
             connect is p50 {}. The rest is the agent attesting the process (/proc reads, passwd/group \
             lookups, the cached executable hash), generating a P-256 key and CSR, and one \
             `SignX509Svids` round trip over mutual TLS in which the server signs and waits for its audit \
             `fdatasync` (disk p50 {} / p99 {}), then the response and the client's parse. Agent CPU per \
             new process {:.0} µs, server {:.0} µs. The first process of a never-seen executable also \
             pays its hash ({} for this {:.0} MB binary).",
            us(f.lat.p50),
            us(f.lat.p99),
            us(f.connect.p50),
            us(self.fsync_early.p50),
            us(self.fsync_early.p99),
            f.cpu[1] * 1e6 / f.lat.n.max(1) as f64,
            f.cpu[0] * 1e6 / f.lat.n.max(1) as f64,
            us(self.exe_hash),
            self.exe_bytes as f64 / 1e6
        );
        let _ = writeln!(
            a,
            "- **(c) Entries.** The mint path does keyed sled reads only (agent by SPIFFE ID, entry by \
             id): server CPU per mint {:.0} µs at 1,000 entries and {:.0} µs at {}; latency ratio {:.2} \
             (p50). An agent's incremental `SyncEntries` reads only its own parents' changes, through \
             the change log's by-parent index (`entry_changes_for_parent_since`): after {} creates \
             under other agents, one catch-up sync took {} of server time; the sled datastore took \
             {:.0} MB on disk; the server's RSS went {} → {}.",
            self.lat_1k.cpu_us_per_svid(0),
            self.lat_big.cpu_us_per_svid(0),
            thousands(self.opts.entries as f64),
            self.entries_ratio(),
            thousands((self.opts.entries - 1000) as f64),
            us(self.sync_big_inc),
            self.ds_bytes as f64 / 1e6,
            mib(self.rss_server_1k),
            mib(self.rss_server_big)
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
