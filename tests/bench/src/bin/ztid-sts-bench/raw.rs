//! The reference: ES256 signatures with ring (`EcdsaKeyPair::sign`, P-256, the JWS
//! fixed-length form every access token carries) of a message the size of an access
//! token's signing input, in this process, on one and on two threads.

use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use crate::measure::timed_loop;

/// Bytes signed per call: about the `header.claims` of an access token.
pub const MESSAGE_BYTES: usize = 300;

/// Raw signing rates.
#[derive(Clone, Debug, Default)]
pub struct RawSign {
    /// Signatures per second, one thread.
    pub rate1: f64,
    /// Signatures per second, two threads together (the whole machine).
    pub rate2: f64,
    /// CPU time of the signing thread per signature, µs, one thread: unlike the rates,
    /// it does not drop when other processes take the cores.
    pub cpu_us1: f64,
}

impl RawSign {
    /// Microseconds per signature on one thread.
    pub fn us_per_sign(&self) -> f64 {
        1e6 / self.rate1
    }
}

fn key() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("keygen");
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("key parses")
}

/// Signs for `dur` after `warm` on one thread, then on two threads sharing one key (as
/// the server's workers share the JWT authority's key).
pub fn raw_es256(warm: Duration, dur: Duration) -> RawSign {
    let key = key();
    // Printable bytes, like a base64url signing input.
    let message: Vec<u8> = (0..MESSAGE_BYTES).map(|i| b'A' + (i % 26) as u8).collect();
    let one = |rng: &SystemRandom| {
        std::hint::black_box(key.sign(rng, &message).expect("sign"));
    };
    let rng = SystemRandom::new();
    timed_loop(warm, |_| one(&rng));
    let cpu0 = thread_cpu_secs();
    let (n, t) = timed_loop(dur, |_| one(&rng));
    let cpu_us1 = (thread_cpu_secs() - cpu0) * 1e6 / n as f64;
    let rate1 = n as f64 / t.as_secs_f64();
    let rate2 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let rng = SystemRandom::new();
                    timed_loop(warm, |_| one(&rng));
                    timed_loop(dur, |_| one(&rng))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("signing thread"))
            .map(|(n, t)| n as f64 / t.as_secs_f64())
            .sum::<f64>()
    });
    RawSign {
        rate1,
        rate2,
        cpu_us1,
    }
}

/// User+system CPU seconds of the calling thread (`/proc/thread-self/stat`).
fn thread_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11usize, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|x| x.parse::<u64>().ok()))
        .sum();
    let tck: f64 = crate::measure::sh("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0);
    ticks as f64 / tck
}
