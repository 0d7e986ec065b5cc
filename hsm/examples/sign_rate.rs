//! Signatures per second through PKCS#11 (SoftHSM2) next to software keys (ring),
//! measured in the same run, on one thread and on every core.
//!
//! `cargo run --release -p ztid-hsm --example sign_rate [-- SECONDS]`
//!
//! Needs SoftHSM2 (`scripts/install-deps.sh`); the token lives in a temp dir.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;
use ztid_hsm::{KeyAlgorithm, KeyManager, Pkcs11KeyManager, SignatureFormat, SoftwareKeyManager};

fn module() -> PathBuf {
    if let Ok(m) = std::env::var("ZTID_PKCS11_MODULE") {
        return m.into();
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("SoftHSM2 is missing: run scripts/install-deps.sh (Debian package softhsm2)")
}

/// Signs a certificate-sized message for `secs` on `threads` threads; signatures per second.
fn rate(km: Arc<dyn KeyManager>, format: SignatureFormat, threads: usize, secs: f64) -> f64 {
    let msg = Arc::new(vec![0x5au8; 600]);
    let start = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (km, msg) = (km.clone(), msg.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while start.elapsed() < deadline {
                    km.sign("bench", &msg, format).expect("sign");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("seconds"))
        .unwrap_or(3.0);
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let ok = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ])
        .output()
        .expect("softhsm2-util: run scripts/install-deps.sh")
        .status
        .success();
    assert!(ok, "softhsm2-util --init-token failed");

    let hsm: Arc<dyn KeyManager> = Arc::new(
        Pkcs11KeyManager::open(&module(), "bench", Zeroizing::new("1234".into())).unwrap(),
    );
    hsm.generate("bench", KeyAlgorithm::EcdsaP256).unwrap();
    let soft: Arc<dyn KeyManager> =
        Arc::new(SoftwareKeyManager::open(dir.path().join("keys")).unwrap());
    soft.generate("bench", KeyAlgorithm::EcdsaP256).unwrap();

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("ECDSA P-256 signatures/s, {secs} s each, 600-byte message, {cores} cores");
    println!(
        "{:<26} {:>12} {:>12}",
        "backend / format",
        "1 thread",
        format!("{cores} threads")
    );
    for (name, km) in [("software (ring)", &soft), ("pkcs11 (SoftHSM2)", &hsm)] {
        for (fname, format) in [
            ("DER", SignatureFormat::Der),
            ("r||s", SignatureFormat::Fixed),
        ] {
            let one = rate(km.clone(), format, 1, secs);
            let all = rate(km.clone(), format, cores, secs);
            println!(
                "{:<26} {:>12.0} {:>12.0}",
                format!("{name} {fname}"),
                one,
                all
            );
        }
    }
}
