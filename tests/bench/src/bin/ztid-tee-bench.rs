//! SEV-SNP and TDX verification on the real vectors, as the CA runs it for one
//! attestation answer (`verify_evidence`: the SNP report with its certificate table; the
//! TDX quote with the collateral read from its directory), on one thread, each next to a
//! peer verifier timed in the same run on the same inputs:
//!
//! - TDX: plain `dcap-qvl` (`QuoteVerifier::new_prod()` with the ring backend, the one
//!   ztid uses), given the quote and the collateral already parsed; ztid reads the
//!   collateral file at every call and runs its own checks around dcap-qvl's.
//! - SEV-SNP: the `sev` crate's own checks (`Verifiable` on ARK→ASK→VEK, then on the
//!   chain and the report: every signature, nothing else), with the ARK and ASK (or ASVK)
//!   parsed once beforehand and the VEK and report parsed per call. ztid checks more
//!   (dates, TCB against the VEK, chip ID, policy, report_data).
//!
//! Steady rates interleave ztid and the peer in batches of about 20 ms each, in
//! `--rounds` rounds of `--secs`/`--rounds` seconds; the ratio (ztid's rate over the
//! peer's) is per round, reported as the median with the lowest and highest, by the
//! thread's CPU time (`getrusage(RUSAGE_THREAD)`: on a shared machine, wall time also
//! counts the time other processes held the CPU) and by wall time. SEV-SNP first calls are timed in fresh
//! processes (this binary again, `--first-call`), `--first-runs` per side, alternating:
//! ztid's `SnpVerifier::from_config` (which loads and checks the pinned AMD roots) and its
//! first `verify_evidence`, and the peer's first verification.
//!
//! `cargo build --release -p ztid-bench --bin ztid-tee-bench && target/release/ztid-tee-bench`
//! (`--secs` or `ZTID_BENCH_SECONDS` per case, default 6; `--summary-json PATH` also
//! writes the figures as JSON, for `scripts/perf-targets.sh`). The vectors come from
//! `../shared/vectors` (or `ZTID_VECTORS`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Instant, SystemTime};

use clap::Parser;
use sev::certs::snp::{ca, Certificate, Chain, Verifiable};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;
use ztid_tests::at;
use ztid_verifier::{sev_snp, tdx};

/// SEV-SNP and TDX verification against peer verifiers, on the real vectors (one
/// thread), as markdown tables.
#[derive(Parser, Debug)]
#[command(name = "ztid-tee-bench")]
struct Cli {
    /// Seconds of timed loops per case (both sides together).
    #[arg(
        long,
        value_name = "S",
        env = "ZTID_BENCH_SECONDS",
        default_value_t = 6.0
    )]
    secs: f64,
    /// Alternating rounds per case.
    #[arg(long, default_value_t = 6)]
    rounds: u32,
    /// Fresh processes per side for the SEV-SNP first calls.
    #[arg(long, default_value_t = 7)]
    first_runs: u32,
    /// Also write the run's figures here as JSON (read by `scripts/perf-targets.sh`).
    #[arg(long, value_name = "PATH")]
    summary_json: Option<PathBuf>,
    /// (internal) Time one first call in this process: `ztid|peer` and a case index.
    #[arg(long, num_args = 2, value_names = ["SIDE", "CASE"], hide = true)]
    first_call: Option<Vec<String>>,
}

/// One SEV-SNP vector.
struct SnpCase {
    name: &'static str,
    /// The report (binary, or hex when the file name ends in `.hex`).
    report: &'static str,
    vek: &'static str,
    /// The ASK, ARK, ASVK PEM file of the product.
    roots: &'static str,
    vlek: bool,
    when: &'static str,
    config: &'static str,
}

const SNP: &[SnpCase] = &[
    SnpCase {
        name: "milan-virtee-sev (v2, VCEK)",
        report: "snp/milan-virtee-sev/report_milan.hex",
        vek: "snp/milan-virtee-sev/vcek_milan.der",
        roots: "snp/roots/milan_ask_ark_asvk.pem",
        vlek: false,
        when: "2025-06-01T00:00:00Z",
        config: "",
    },
    SnpCase {
        name: "milan-trustee-vlek (v3, VLEK)",
        report: "snp/milan-trustee-vlek/report.bin",
        vek: "snp/milan-trustee-vlek/vlek.der",
        roots: "snp/roots/milan_ask_ark_asvk.pem",
        vlek: true,
        when: "2025-06-01T00:00:00Z",
        config: "allowed_vmpl = [1]",
    },
    SnpCase {
        name: "genoa-trustee-azure (v3, VCEK)",
        report: "snp/genoa-trustee-azure/report.bin",
        vek: "snp/genoa-trustee-azure/vcek.pem",
        roots: "snp/roots/genoa_ask_ark_asvk.pem",
        vlek: false,
        when: "2026-01-01T00:00:00Z",
        config: "",
    },
    SnpCase {
        name: "turin-microsoft (v5, VCEK)",
        report: "snp/turin-microsoft/report.bin",
        vek: "snp/turin-microsoft/vcek.pem",
        roots: "snp/roots/turin_ask_ark_asvk.pem",
        vlek: false,
        when: "2026-06-01T00:00:00Z",
        config: "",
    },
];

/// A SEV-SNP vector loaded: the evidence as the CA receives it, and the peer's inputs.
struct SnpInputs {
    evidence: Vec<u8>,
    report: Vec<u8>,
    report_data: [u8; 64],
    vek_der: Vec<u8>,
    ark_der: Vec<u8>,
    /// The ASK, or the ASVK for a VLEK.
    ask_der: Vec<u8>,
}

fn vectors() -> PathBuf {
    ztid_tests::vectors("tdx");
    ztid_tests::vectors("snp").join("..")
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(vectors().join(rel)).unwrap()
}

fn der_of(b: Vec<u8>) -> Vec<u8> {
    if b.starts_with(b"-----") {
        pem::parse(b).unwrap().into_contents()
    } else {
        b
    }
}

fn snp_inputs(c: &SnpCase) -> SnpInputs {
    let report = if c.report.ends_with(".hex") {
        hex::decode(String::from_utf8(read(c.report)).unwrap().trim()).unwrap()
    } else {
        read(c.report)
    };
    let vek_der = der_of(read(c.vek));
    let kind = if c.vlek { "vlek" } else { "vcek" };
    let mut evidence = report.clone();
    evidence.extend(sev_snp::encode_cert_table(&[(kind, &vek_der)]));
    let roots = pem::parse_many(read(c.roots)).unwrap();
    let der = |i: usize| roots[i].contents().to_vec();
    SnpInputs {
        evidence,
        report_data: report[0x50..0x90].try_into().unwrap(),
        report,
        vek_der,
        ark_der: der(1),
        ask_der: der(if c.vlek { 2 } else { 0 }),
    }
}

/// The peer: the `sev` crate's checks, ARK and ASK parsed beforehand.
fn peer_verify(ca: &ca::Chain, i: &SnpInputs) -> Result<(), String> {
    let vek = Certificate::from_der(&i.vek_der).map_err(|e| e.to_string())?;
    let report = AttestationReport::from_bytes(&i.report).map_err(|e| e.to_string())?;
    let chain = Chain {
        ca: ca.clone(),
        vek,
    };
    (&chain, &report).verify().map_err(|e| e.to_string())
}

fn peer_ca(i: &SnpInputs) -> ca::Chain {
    ca::Chain {
        ark: Certificate::from_der(&i.ark_der).unwrap(),
        ask: Certificate::from_der(&i.ask_der).unwrap(),
    }
}

fn snp_verifier(c: &SnpCase) -> sev_snp::SnpVerifier {
    sev_snp::SnpVerifier::from_config(&toml::from_str(c.config).unwrap()).unwrap()
}

/// `--first-call SIDE CASE`: prints "load_us first_us" for one fresh process.
fn first_call(side: &str, case: usize) {
    let c = &SNP[case];
    let i = snp_inputs(c);
    let now = at(c.when);
    // Wall time: the thread's CPU time is only brought up to date at scheduler ticks,
    // too coarse for one call.
    let (load, first) = match side {
        "ztid" => {
            let t = Instant::now();
            let v = snp_verifier(c);
            let load = t.elapsed();
            let t = Instant::now();
            v.verify_evidence(&i.evidence, &i.report_data, now).unwrap();
            (load, t.elapsed())
        }
        _ => {
            let t = Instant::now();
            let ca = peer_ca(&i);
            let load = t.elapsed();
            let t = Instant::now();
            peer_verify(&ca, &i).unwrap();
            (load, t.elapsed())
        }
    };
    println!(
        "{:.1} {:.1}",
        load.as_secs_f64() * 1e6,
        first.as_secs_f64() * 1e6
    );
}

/// This thread's CPU time so far (user and system), in seconds: unlike wall time, it
/// leaves out the time other processes held the CPU. (`getrusage(RUSAGE_THREAD)`: exact
/// only at scheduler ticks and switches, so it is summed over batches of ~20 ms.)
fn cpu_secs() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_THREAD).unwrap();
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    s(u.user_time()) + s(u.system_time())
}

/// Wall and CPU seconds taken by `n` calls of `f`.
fn timed(n: u32, f: &mut dyn FnMut()) -> (f64, f64) {
    let c = cpu_secs();
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    (t.elapsed().as_secs_f64(), cpu_secs() - c)
}

/// What [`alternate`] measured.
struct Compared {
    /// Calls per CPU second: ztid, the peer.
    ztid: f64,
    peer: f64,
    /// Per round, ztid's rate over the peer's: by CPU time, by wall time.
    cpu_ratio: (f64, f64, f64),
    wall_ratio: (f64, f64, f64),
}

/// Median, lowest and highest.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// `rounds` rounds of `secs / rounds` seconds, each made of short alternating batches of
/// ztid and the peer (the order flipping each time), so that both see the same load
/// from other processes.
fn alternate(secs: f64, rounds: u32, ztid: &mut dyn FnMut(), peer: &mut dyn FnMut()) -> Compared {
    // Warm-up, and a batch size of about 20 ms per side.
    let once = timed(3, ztid).0 / 3.0;
    timed(3, peer);
    let batch = ((0.02 / once) as u32).clamp(1, 1000);
    let per = secs / f64::from(rounds);
    let (mut zc, mut pc, mut n) = (0.0, 0.0, 0u64);
    let (mut cpu, mut wall) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (mut z, mut p, mut k) = ((0.0, 0.0), (0.0, 0.0), 0u64);
        let add = |a: &mut (f64, f64), b: (f64, f64)| {
            a.0 += b.0;
            a.1 += b.1;
        };
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < per {
            if k % 2 == 0 {
                add(&mut z, timed(batch, ztid));
                add(&mut p, timed(batch, peer));
            } else {
                add(&mut p, timed(batch, peer));
                add(&mut z, timed(batch, ztid));
            }
            k += 1;
        }
        wall.push(p.0 / z.0);
        cpu.push(p.1 / z.1);
        zc += z.1;
        pc += p.1;
        n += k * u64::from(batch);
    }
    Compared {
        ztid: n as f64 / zc,
        peer: n as f64 / pc,
        cpu_ratio: spread(cpu),
        wall_ratio: spread(wall),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A ratio spread as "median (min–max)", the median in bold when `bold`.
fn show((m, lo, hi): (f64, f64, f64), bold: bool) -> String {
    if bold {
        format!("**{m:.3}** ({lo:.3}–{hi:.3})")
    } else {
        format!("{m:.3} ({lo:.3}–{hi:.3})")
    }
}

fn verdict(ratio: f64, target: f64) -> &'static str {
    if ratio >= target {
        "met"
    } else {
        "not met"
    }
}

fn main() {
    let cli = Cli::parse();
    if let Some(a) = &cli.first_call {
        first_call(&a[0], a[1].parse().unwrap());
        return;
    }
    let started = SystemTime::now();
    let load_start = loadavg();
    let (mut tdx_json, mut later_json, mut first_json) = (Vec::new(), Vec::new(), Vec::new());
    println!(
        "ztid-tee-bench at {} (Unix), load average {load_start} at start; {} s per case in {} alternating rounds",
        started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        cli.secs,
        cli.rounds
    );
    let v = vectors();

    println!("\n### TDX: ztid `verify_evidence` vs plain dcap-qvl (same quote, same collateral)\n");
    println!("| quote | ztid ms | dcap-qvl ms | ratio by CPU time: median (min–max) | by wall time | target | |");
    println!("|---|---:|---:|---|---|---|---|");
    for (dir, when) in [
        ("v4-uptodate", "2025-07-01T00:00:00Z"),
        ("v5-td15ex-uptodate", "2026-10-20T00:00:00Z"),
    ] {
        let q = read(&format!("tdx/{dir}/quote.bin"));
        let rd = dcap_report_data(&q);
        let cdir = v.join("tdx").join(dir);
        let cfg: toml::Table = toml::from_str(&format!(
            "collateral_dir = {:?}",
            cdir.display().to_string()
        ))
        .unwrap();
        let verifier = tdx::TdxVerifier::from_config(&cfg).unwrap();
        let collateral: dcap_qvl::QuoteCollateralV3 =
            serde_json::from_slice(&std::fs::read(cdir.join("collateral.json")).unwrap()).unwrap();
        let now = at(when);
        let secs = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let dcap = dcap_qvl::verify::QuoteVerifier::new_prod()
            .with_config::<dcap_qvl::configs::RingConfig>();
        let c = alternate(
            cli.secs,
            cli.rounds,
            &mut || {
                verifier.verify_evidence(&q, &rd, now).unwrap();
            },
            &mut || {
                dcap.verify(&q, &collateral, secs).unwrap();
            },
        );
        tdx_json.push(serde_json::json!({
            "quote": dir, "ztid_ms": 1000.0 / c.ztid, "peer_ms": 1000.0 / c.peer,
            "cpu_ratio": spread_json(c.cpu_ratio), "wall_ratio": spread_json(c.wall_ratio),
        }));
        println!(
            "| TDX {dir} | {:.3} | {:.3} | {} | {} | ≥ 0.95 | {} |",
            1000.0 / c.ztid,
            1000.0 / c.peer,
            show(c.cpu_ratio, true),
            show(c.wall_ratio, false),
            verdict(c.cpu_ratio.0, 0.95)
        );
    }

    println!(
        "\n### SEV-SNP: ztid `verify_evidence` vs the `sev` crate's checks (same report and VEK)\n"
    );
    println!("Later calls (ztid: VEK parsed and its chain signature checked once per process):\n");
    println!("| report | ztid ms | sev ms | ratio by CPU time: median (min–max) | by wall time |");
    println!("|---|---:|---:|---|---|");
    for c in SNP {
        let i = snp_inputs(c);
        let verifier = snp_verifier(c);
        let ca = peer_ca(&i);
        let now = at(c.when);
        if let Err(e) = peer_verify(&ca, &i) {
            println!("| {} | | | | | the sev crate refuses it: {e} |", c.name);
            continue;
        }
        let r = alternate(
            cli.secs,
            cli.rounds,
            &mut || {
                verifier
                    .verify_evidence(&i.evidence, &i.report_data, now)
                    .unwrap();
            },
            &mut || {
                peer_verify(&ca, &i).unwrap();
            },
        );
        later_json.push(serde_json::json!({
            "report": c.name, "ztid_ms": 1000.0 / r.ztid, "peer_ms": 1000.0 / r.peer,
            "cpu_ratio": spread_json(r.cpu_ratio), "wall_ratio": spread_json(r.wall_ratio),
        }));
        println!(
            "| {} | {:.3} | {:.3} | {} | {} |",
            c.name,
            1000.0 / r.ztid,
            1000.0 / r.peer,
            show(r.cpu_ratio, true),
            show(r.wall_ratio, false)
        );
    }

    println!(
        "\nFirst call in a fresh process ({} processes per side, alternating; medians, µs of \
         wall time; ratio = the sev crate's first verification time over ztid's):\n",
        cli.first_runs
    );
    println!("| report | ztid load (from_config) | ztid first verify | sev load (parse ARK, ASK) | sev first verify | ratio median (min–max) | target | |");
    println!("|---|---:|---:|---:|---:|---|---|---|");
    let exe = std::env::current_exe().unwrap();
    let run = |side: &str, case: usize| -> (f64, f64) {
        let out = Command::new(&exe)
            .args(["--first-call", side, &case.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = String::from_utf8(out.stdout).unwrap();
        let mut it = s.split_whitespace().map(|x| x.parse::<f64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    for (case, c) in SNP.iter().enumerate() {
        if peer_verify(&peer_ca(&snp_inputs(c)), &snp_inputs(c)).is_err() {
            continue;
        }
        let (mut zl, mut zf, mut pl, mut pf, mut ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..cli.first_runs {
            let (z, p) = if r % 2 == 0 {
                let z = run("ztid", case);
                (z, run("peer", case))
            } else {
                let p = run("peer", case);
                (run("ztid", case), p)
            };
            zl.push(z.0);
            zf.push(z.1);
            pl.push(p.0);
            pf.push(p.1);
            ratios.push(p.1 / z.1);
        }
        let (r, lo, hi) = spread(ratios);
        let (zl, zf, pl, pf) = (spread(zl).0, spread(zf).0, spread(pl).0, spread(pf).0);
        first_json.push(serde_json::json!({
            "report": c.name, "runs": cli.first_runs,
            "ztid_load_us": zl, "ztid_first_us": zf, "peer_load_us": pl, "peer_first_us": pf,
            "ratio": [r, lo, hi],
        }));
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | **{r:.2}** ({lo:.2}–{hi:.2}) | ≥ 1.0 | {} |",
            c.name,
            zl,
            zf,
            pl,
            pf,
            verdict(r, 1.0)
        );
    }
    println!(
        "\nLoad average {} at the end; run took {:.0} s.",
        loadavg(),
        started.elapsed().unwrap_or_default().as_secs_f64()
    );
    if let Some(path) = &cli.summary_json {
        let summary = serde_json::json!({
            "secs": cli.secs, "rounds": cli.rounds, "first_runs": cli.first_runs,
            "load_start": load_start, "load_end": loadavg(),
            "tdx": tdx_json, "snp_later": later_json, "snp_first": first_json,
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    }
}

/// A ratio spread for the JSON summary: `[median, lowest, highest]`.
fn spread_json((m, lo, hi): (f64, f64, f64)) -> serde_json::Value {
    serde_json::json!([m, lo, hi])
}

/// report_data of a TD quote: the last 64 bytes of the TD report body.
fn dcap_report_data(q: &[u8]) -> [u8; 64] {
    // v4: the body follows the 48-byte header; v5: after a 2-byte type and 4-byte size.
    // Every TD body starts with the TD 1.0 layout, whose report_data is at 520..584.
    let body = if u16::from_le_bytes([q[0], q[1]]) == 4 {
        48
    } else {
        54
    };
    q[body + 520..body + 584].try_into().unwrap()
}
