//! TPM attestation benchmark (results in `docs/performance.md`): enrolment wall time on
//! swtpm, CA-side verification cost per attestation, ECC vs RSA MakeCredential, and the
//! latency of one signature by the TPM-resident agent key; and, as a peer, Keylime's own
//! quote check (`keylime.tpm.tpm_util.checkquote`, PyPI `keylime`) on the same quote,
//! signature, PCR values and AK, timed in alternating rounds with ztid's in the same run.
//!
//! `cargo run --release -p ztid-bench --bin ztid-tpm-bench` (`--no-keylime` skips the peer;
//! the first run creates `target/bench-venv` and installs the pinned packages there;
//! `--summary-json PATH` also writes the figures as JSON, for `scripts/perf-targets.sh`).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

use clap::Parser;
use ztid_attestor::tpm::{self, EkKind, TpmAttestor};
use ztid_attestor::tpm_device::Tpm;
// The TPM exchange and swtpm fixture, shared with tests/tests/e2e/tpm_protocol.rs.
use ztid_test_support::tpm_attest::*;
use ztid_verifier::tpm::{credential, quote, wire, InitialEvidence, TpmVerifier};
use ztid_verifier::NodeVerifier;

/// TPM attestation costs on swtpm: enrolment wall time, CA-side verification per
/// attestation, MakeCredential for RSA and ECC EKs, one TPM-resident agent key signature.
#[derive(Parser, Debug)]
#[command(name = "ztid-tpm-bench")]
struct Cli {
    /// Skip the Keylime peer (no venv, no Python).
    #[arg(long)]
    no_keylime: bool,
    /// Alternating rounds of the ztid / Keylime quote-check comparison.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Quote checks per round, for each side.
    #[arg(long, default_value_t = 300)]
    per_round: usize,
    /// Also write the run's figures here as JSON (read by `scripts/perf-targets.sh`).
    #[arg(long, value_name = "PATH")]
    summary_json: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let load_start = loadavg();
    let f = fixture();
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let pol = policy(&f.ca, "");
    // Enrolment wall time: agent (TPM work) + CA, in-process, over swtpm's TCP socket.
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..10 {
        let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
        let t = std::time::Instant::now();
        last = Some(attest(&v, &mut a));
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "enrolment on swtpm (EK cert read, EK+AK create, CA start, activation, quote, CA resume): min {:?} median {:?} max {:?}",
        times[0], times[5], times[9]
    );
    let enrol_median = times[5];
    let (_, ev, _, _, k) = last.unwrap();
    let ev_parsed: InitialEvidence = serde_json::from_slice(&ev).unwrap();

    // CA side only, one core.
    let n = 2000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        ztid_verifier::tpm::check_keys(
            &pol,
            &ev_parsed.ek_cert,
            &ev_parsed.ek_pub,
            &ev_parsed.ak_pub,
            SystemTime::now(),
        )
        .unwrap();
    }
    let keys_s = t.elapsed().as_secs_f64() / n as f64;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let _ = challenge(v.start(&ev, &ctx(&k)).unwrap());
    }
    let start_s = t.elapsed().as_secs_f64() / n as f64;
    // A quote to verify repeatedly.
    let nonce = [9u8; 32];
    let pcrs: BTreeSet<u8> = (0..8).collect();
    let file: tpm::EvidenceFile =
        serde_json::from_slice(&tpm::capture_evidence(&f.tpm.tcti(), &nonce).unwrap()).unwrap();
    let ak = wire::Public::parse(&file.ak_pub).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        quote::verify_quote(&ak, &file.quote, &file.signature, &nonce, &pcrs, &file.pcrs).unwrap();
        pol.check_pcrs("x", &file.pcrs).unwrap();
    }
    let quote_s = t.elapsed().as_secs_f64() / n as f64;
    let keylime = if cli.no_keylime {
        serde_json::json!({ "not_run": "--no-keylime" })
    } else {
        keylime_peer(&file, &nonce, &pcrs, cli.rounds, cli.per_round)
    };
    let ek = wire::Public::parse(&ev_parsed.ek_pub).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        credential::make_credential(&ek, &ak.name().unwrap(), &[1u8; 32]).unwrap();
    }
    let cred_s = t.elapsed().as_secs_f64() / n as f64;
    // The same for the TPM's ECC P-384 EK (ephemeral ECDH + KDFe instead of RSA-OAEP).
    let ecc_ek = wire::Public::parse(
        &Tpm::open_with_ek(&f.tpm.tcti(), EkKind::Ecc)
            .unwrap()
            .ek_public()
            .unwrap(),
    )
    .unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        credential::make_credential(&ecc_ek, &ak.name().unwrap(), &[1u8; 32]).unwrap();
    }
    let ecc_cred_s = t.elapsed().as_secs_f64() / n as f64;
    // The agent key's certification, checked as the CA does.
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let blob = a_key_blob(&mut a);
    let ak_blob = Tpm::open(&f.tpm.tcti()).unwrap().create_ak().unwrap();
    let (cert, cert_sig) = Tpm::open(&f.tpm.tcti())
        .unwrap()
        .certify_with(&ak_blob, &blob, &nonce)
        .unwrap();
    let cert_ak = wire::Public::parse(&ak_blob.public_bytes().unwrap()).unwrap();
    let key_name = wire::Public::parse(&blob.public_area().unwrap())
        .unwrap()
        .name()
        .unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        ztid_verifier::tpm::verify_certification(&cert_ak, &cert, &cert_sig, &nonce, &key_name)
            .unwrap();
    }
    let certify_s = t.elapsed().as_secs_f64() / n as f64;
    eprintln!(
        "CA side per attestation: EK cert + key checks {:.3} ms, start (checks + agent key + MakeCredential + challenge) {:.3} ms, \
         MakeCredential alone {:.3} ms, quote verify + PCR policy {:.3} ms, agent key certification {:.3} ms",
        keys_s * 1e3,
        start_s * 1e3,
        cred_s * 1e3,
        quote_s * 1e3,
        certify_s * 1e3
    );
    eprintln!(
        "=> full CA-side verifications per second (one core): {:.0}",
        1.0 / (start_s + quote_s + certify_s)
    );
    eprintln!(
        "MakeCredential for the ECC P-384 EK: {:.3} ms (RSA-2048: {:.3} ms)",
        ecc_cred_s * 1e3,
        cred_s * 1e3
    );
    // Agent side: one signature by the TPM-resident agent key (what each mTLS handshake
    // to the server costs), on swtpm over TCP.
    let key = ztid_attestor::agent_key::TpmAgentKey::new(&f.tpm.tcti(), blob).unwrap();
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = std::time::Instant::now();
        key.sign(b"a TLS 1.3 CertificateVerify message").unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "TPM agent key signature on swtpm (open, SRK, load, sign, flush): min {:?} median {:?} p95 {:?}",
        times[0], times[25], times[47]
    );
    if let Some(path) = &cli.summary_json {
        let summary = serde_json::json!({
            "load_start": load_start, "load_end": loadavg(),
            "enrolment_median_ms": enrol_median.as_secs_f64() * 1e3,
            "ca_side_per_s": 1.0 / (start_s + quote_s + certify_s),
            "quote_verify_policy_ms": quote_s * 1e3,
            "keylime": keylime,
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Pinned peer packages: Keylime declares no dependencies on PyPI (its
/// requirements.txt is not in the wheel), so the two its `tpm_util` imports are pinned here.
const KEYLIME_PACKAGES: &[&str] = &["keylime==7.14.3", "cryptography==50.0.2", "PyYAML==6.0.4"];

/// The Python side: loads the inputs, checks that Keylime accepts the quote (and refuses
/// it under another nonce), then answers `run N` with the wall and thread-CPU nanoseconds
/// of N `checkquote` calls.
const KEYLIME_DRIVER: &str = r#"
import importlib.metadata, json, sys, time
from keylime.tpm import tpm_util
d = json.load(open(sys.argv[1]))
ak = d["ak_pem"].encode()
nonce = bytes.fromhex(d["nonce"])
sig = bytes.fromhex(d["sig"])
quote = bytes.fromhex(d["quote"])
pcrblob = bytes.fromhex(d["pcrblob"])
got = tpm_util.checkquote(ak, nonce, sig, quote, pcrblob, "sha256")
want = {int(k): v for k, v in d["pcrs"].items()}
if got != want:
    sys.exit("keylime returned other PCR values: %r" % got)
try:
    tpm_util.checkquote(ak, b"another nonce", sig, quote, pcrblob, "sha256")
    sys.exit("keylime accepted the quote under another nonce")
except Exception:
    pass
print("ready", importlib.metadata.version("keylime"), importlib.metadata.version("cryptography"), sys.version.split()[0], flush=True)
for line in sys.stdin:
    n = int(line.split()[1])
    w, c = time.perf_counter_ns(), time.thread_time_ns()
    for _ in range(n):
        tpm_util.checkquote(ak, nonce, sig, quote, pcrblob, "sha256")
    print(time.perf_counter_ns() - w, time.thread_time_ns() - c, flush=True)
"#;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

fn run_ok(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `target/bench-venv` with the pinned packages (created and filled the first time).
fn keylime_venv() -> Result<PathBuf, String> {
    let venv = target_dir().join("bench-venv");
    let py = venv.join("bin/python");
    let have = |py: &Path| {
        Command::new(py)
            .args(["-c", "import keylime.tpm.tpm_util, importlib.metadata as m; assert m.version('keylime') == '7.14.3'"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if py.exists() && have(&py) {
        return Ok(py);
    }
    eprintln!("creating {} with {KEYLIME_PACKAGES:?}", venv.display());
    run_ok(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_ok(
        Command::new(&py)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .args(KEYLIME_PACKAGES),
    )?;
    if have(&py) {
        Ok(py)
    } else {
        Err("keylime.tpm.tpm_util does not import after the install".into())
    }
}

/// The AK as Keylime takes it: a PEM SubjectPublicKeyInfo (the AK is ECC P-256 here).
fn ak_pem(ak: &wire::Public) -> String {
    let wire::PublicKey::Ecc { curve, x, y } = &ak.key else {
        panic!("the bench's AK is ECC P-256");
    };
    assert_eq!(*curve, 0x0003, "the bench's AK is ECC P-256");
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING 04||x||y }.
    let mut der = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
    der.extend(wire::ecc_point(x, y, 32).unwrap());
    pem::encode(&pem::Pem::new("PUBLIC KEY", der))
}

/// The PCR values in tpm2-tools' `tpm2_quote -o` layout, which `checkquote` parses:
/// a little-endian TPML_PCR_SELECTION padded to 16 TPMS_PCR_SELECTION of 8 bytes, then
/// the number of TPML_DIGEST that follow, each a count and 8 TPM2B_DIGEST of 2 + 64 bytes.
fn tpm2_tools_pcrblob(pcrs: &BTreeMap<u8, Vec<u8>>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(1u32.to_le_bytes());
    let mut mask = 0u32;
    for i in pcrs.keys() {
        mask |= 1 << i;
    }
    for bank in 0..16 {
        if bank == 0 {
            b.extend(0x000bu16.to_le_bytes()); // sha256
            b.push(3);
            b.extend(&mask.to_le_bytes()[..3]);
        } else {
            b.extend([0u8; 6]);
        }
        b.extend([0u8; 2]);
    }
    let values: Vec<&Vec<u8>> = pcrs.values().collect();
    let chunks: Vec<_> = values.chunks(8).collect();
    b.extend((chunks.len() as u32).to_le_bytes());
    for c in chunks {
        b.extend((c.len() as u32).to_le_bytes());
        for i in 0..8 {
            let v: &[u8] = c.get(i).map(|v| v.as_slice()).unwrap_or(&[]);
            b.extend((v.len() as u16).to_le_bytes());
            let mut ha = [0u8; 64];
            ha[..v.len()].copy_from_slice(v);
            b.extend(ha);
        }
    }
    b
}

/// This thread's CPU time (`/proc/thread-self/schedstat`, nanoseconds on the CPU).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// ztid's quote check against Keylime's on the same inputs, in alternating rounds; the
/// figures as JSON, or `{"not_run": reason}`.
fn keylime_peer(
    file: &tpm::EvidenceFile,
    nonce: &[u8],
    pcrs: &BTreeSet<u8>,
    rounds: usize,
    per_round: usize,
) -> serde_json::Value {
    let py = match keylime_venv() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("Keylime peer not run: {e}");
            return serde_json::json!({ "not_run": e });
        }
    };
    let ak = wire::Public::parse(&file.ak_pub).unwrap();
    let inputs = serde_json::json!({
        "ak_pem": ak_pem(&ak),
        "nonce": hex::encode(nonce),
        "sig": hex::encode(&file.signature),
        "quote": hex::encode(&file.quote),
        "pcrblob": hex::encode(tpm2_tools_pcrblob(&file.pcrs)),
        "pcrs": file.pcrs.iter().map(|(k, v)| (k.to_string(), hex::encode(v))).collect::<BTreeMap<_, _>>(),
    });
    let dir = tempfile::tempdir().unwrap();
    let input_path = dir.path().join("quote.json");
    std::fs::write(&input_path, inputs.to_string()).unwrap();
    let driver = dir.path().join("driver.py");
    std::fs::write(&driver, KEYLIME_DRIVER).unwrap();
    let mut child = Command::new(&py)
        .arg(&driver)
        .arg(&input_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = child.stdin.take().unwrap();
    let mut from = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    let header = line.trim().to_string();
    let Some(versions) = header.strip_prefix("ready ") else {
        eprintln!("Keylime peer not run: its check of our quote failed (see above)");
        let _ = child.wait();
        return serde_json::json!({ "not_run": "Keylime's check of the quote failed" });
    };
    let versions: Vec<&str> = versions.split(' ').collect();
    // ztid: the AK parsed from its TPMT_PUBLIC (Keylime loads its PEM) and the quote
    // checked (signature, nonce, PCR selection and digest), as Keylime's checkquote does.
    let ztid_once = || {
        let ak = wire::Public::parse(&file.ak_pub).unwrap();
        quote::verify_quote(&ak, &file.quote, &file.signature, nonce, pcrs, &file.pcrs).unwrap();
    };
    ztid_once();
    let (mut zw, mut zc, mut kw, mut kc) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (w, c) = (Instant::now(), thread_cpu_ns());
        for _ in 0..per_round {
            ztid_once();
        }
        zw.push(w.elapsed().as_nanos() as f64 / per_round as f64);
        zc.push((thread_cpu_ns() - c) as f64 / per_round as f64);
        writeln!(to, "run {per_round}").unwrap();
        line.clear();
        from.read_line(&mut line).unwrap();
        let mut it = line.split_whitespace().map(|x| x.parse::<f64>().unwrap());
        kw.push(it.next().unwrap() / per_round as f64);
        kc.push(it.next().unwrap() / per_round as f64);
    }
    drop(to);
    let _ = child.wait();
    let (zw, zc, kw, kc) = (median(zw), median(zc), median(kw), median(kc));
    eprintln!(
        "quote check vs Keylime {} (cryptography {}, Python {}), same quote, {rounds} alternating rounds of {per_round}, median per check: \
         ztid {:.1} µs wall / {:.1} µs CPU, Keylime checkquote {:.1} µs wall / {:.1} µs CPU; \
         per-core rate ztid/keylime = {:.2} (CPU), {:.2} (wall)",
        versions[0],
        versions.get(1).unwrap_or(&"?"),
        versions.get(2).unwrap_or(&"?"),
        zw / 1e3,
        zc / 1e3,
        kw / 1e3,
        kc / 1e3,
        kc / zc,
        kw / zw
    );
    serde_json::json!({
        "keylime": versions[0],
        "cryptography": versions.get(1).unwrap_or(&"?"),
        "python": versions.get(2).unwrap_or(&"?"),
        "rounds": rounds, "per_round": per_round,
        "ztid_cpu_us": zc / 1e3, "ztid_wall_us": zw / 1e3,
        "keylime_cpu_us": kc / 1e3, "keylime_wall_us": kw / 1e3,
        "ratio_cpu": kc / zc, "ratio_wall": kw / zw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout `checkquote`'s parser walks: 4 + 16 * 8 + 4 + 4 + 8 * 66 bytes for up
    /// to 8 PCRs, the mask in the first selection.
    #[test]
    fn pcrblob_layout() {
        let pcrs: BTreeMap<u8, Vec<u8>> = (0..8u8).map(|i| (i, vec![i; 32])).collect();
        let b = tpm2_tools_pcrblob(&pcrs);
        assert_eq!(b.len(), 4 + 16 * 8 + 4 + 4 + 8 * 66);
        assert_eq!(&b[4..10], &[0x0b, 0x00, 3, 0xff, 0, 0]);
        // One TPML_DIGEST of 8 digests, PCR 0's value first, PCR 1's 66 bytes later.
        assert_eq!(&b[132..136], &1u32.to_le_bytes());
        assert_eq!(&b[136..140], &8u32.to_le_bytes());
        assert_eq!(&b[140..142], &32u16.to_le_bytes());
        assert_eq!(b[142], 0);
        assert_eq!(b[142 + 66], 1);
    }
}
