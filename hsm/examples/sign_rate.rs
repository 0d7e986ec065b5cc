//! Signatures per second through PKCS#11 (SoftHSM2) next to software keys (ring),
//! measured in the same run, on one thread and on every core.
//!
//! `cargo run --release -p ztid-hsm --example sign_rate [-- SECONDS]`
//!
//! Needs SoftHSM2 (`scripts/install-deps.sh`); the token lives in a temp dir.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "example run by hand: a panic ends the run with its message"
)]

use ztid_test_support::softhsm as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{init_tokens, module};
use zeroize::Zeroizing;
use ztid_hsm::{KeyAlgorithm, KeyManager, Pkcs11KeyManager, SignatureFormat, SoftwareKeyManager};

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
    init_tokens(dir.path(), &["bench"], "1234", "5678");

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
