//! Bounded random-input robustness of what the CA reads from nodes: real SEV-SNP and TDX
//! evidence and TPM structures, mutated (a bit flipped anywhere, cut short, replaced by
//! random bytes), must be refused with an error. A flip inside the signed bytes must
//! never verify, and nothing may panic. (Deterministic: a fixed-seed generator, so a
//! failure reproduces.)
#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ztid_attestation::Error;
use ztid_verifier::multi::{MultiVerifier, METHOD as MULTI};
use ztid_verifier::tpm::wire;
use ztid_verifier::{sev_snp, tdx, AttestationContext, NodeVerifier, VerifierStep};

/// xorshift64*: enough randomness for mutations, reproducible by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Evidence files are binary or hex text.
fn binary(b: Vec<u8>) -> Vec<u8> {
    let t = String::from_utf8_lossy(&b);
    let t = t.trim();
    if !t.is_empty() && t.bytes().all(|c| c.is_ascii_hexdigit()) {
        hex::decode(t).expect("hex evidence")
    } else {
        b
    }
}

/// Runs `verify` on `n` mutations of `good`: flips inside `signed`, cuts inside the
/// first `structure` bytes (what its length fields cover; real quotes may carry zero
/// padding after it), random bytes and a non-zero byte appended must all fail.
fn mutate_and_check(
    good: &[u8],
    signed: std::ops::Range<usize>,
    structure: usize,
    n: usize,
    seed: u64,
    verify: &dyn Fn(&[u8]) -> Result<serde_json::Value, Error>,
) {
    verify(good).expect("the unmutated evidence verifies");
    let mut rng = Rng(seed);
    for i in 0..n {
        let mut m = good.to_vec();
        let what = match i % 5 {
            0 | 1 => {
                let pos = signed.start + rng.below(signed.len());
                m[pos] ^= 1 << rng.below(8);
                format!("bit flip at {pos}")
            }
            2 => {
                let len = rng.below(structure);
                m.truncate(len);
                format!("cut to {len} bytes")
            }
            3 => {
                m.push(1 + rng.below(255) as u8);
                "a non-zero byte appended".to_string()
            }
            _ => {
                let len = rng.below(good.len() * 2);
                m = rng.bytes(len);
                format!("{len} random bytes")
            }
        };
        assert!(verify(&m).is_err(), "{what} verified");
    }
}

#[test]
fn mutated_sev_snp_reports_are_refused() {
    let dir = ztid_tests::vectors("snp").join("milan-virtee-sev");
    let report = binary(std::fs::read(dir.join("report_milan.hex")).unwrap());
    let config = toml::Table::new();
    // 2025-06-01, inside the vector's window.
    let when = at(1_748_736_000);
    assert_eq!(report.len(), 0x4A0, "a bare report");
    mutate_and_check(&report, 0..0x2A0, 0x4A0, 400, 1, &|ev| {
        sev_snp::verify_offline(ev, Some(&dir), None, when, &config)
    });
}

#[test]
fn mutated_tdx_quotes_are_refused() {
    let dir = ztid_tests::vectors("tdx").join("v4-uptodate");
    let quote = std::fs::read(dir.join("quote.bin")).unwrap();
    let config = toml::Table::new();
    // 2025-07-01, inside the vector's window. Header (48) and TD report body (584) are
    // what the attestation key signs.
    let when = at(1_751_328_000);
    // Its signature data ends at 4936; 70 zero bytes of padding follow.
    assert_eq!(quote.len(), 5006);
    assert!(quote[4936..].iter().all(|b| *b == 0));
    mutate_and_check(&quote, 0..48 + 584, 4936, 400, 2, &|ev| {
        tdx::verify_offline(ev, Some(&dir), None, when, &config)
    });
    // Zero padding is accepted (the vector has it); a smuggled byte is named.
    let mut smuggled = quote.clone();
    smuggled[4936] = 7;
    match tdx::verify_offline(&smuggled, Some(&dir), None, when, &config) {
        Err(Error::Refused(m)) => assert_eq!(
            (m.kind, m.detail.as_str()),
            (
                ztid_attestation::RefusalKind::Malformed,
                "TDX quote has non-zero bytes after its signature data (70 bytes past offset 4936)"
            )
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tpm_structures_from_random_bytes_are_refused() {
    let mut rng = Rng(3);
    for _ in 0..20_000 {
        let len = rng.below(400);
        let b = rng.bytes(len);
        // Any outcome but a panic; random bytes are not a TPM_GENERATED attestation.
        let _ = wire::Public::parse(&b);
        let _ = wire::Signature::parse(&b);
        assert!(wire::Attest::parse(&b).is_err());
    }
    // Structurally plausible prefixes: the right magic and type, then garbage.
    for typ in [0x8017u16, 0x8018] {
        for _ in 0..5_000 {
            let mut b = 0xff54_4347u32.to_be_bytes().to_vec();
            b.extend_from_slice(&typ.to_be_bytes());
            let len = rng.below(200);
            b.extend(rng.bytes(len));
            let _ = wire::Attest::parse(&b);
        }
    }
}

/// A verifier that must never be reached: the envelope is refused before any factor.
struct Unreachable(&'static str);

impl NodeVerifier for Unreachable {
    fn method(&self) -> &'static str {
        self.0
    }
    fn start(&self, _: &[u8], _: &AttestationContext<'_>) -> Result<VerifierStep, Error> {
        panic!("a malformed envelope reached the {} verifier", self.0)
    }
}

#[test]
fn malformed_multi_factor_envelopes_are_refused_before_any_factor() {
    let v = MultiVerifier::new(
        vec![
            std::sync::Arc::new(Unreachable("tpm")),
            std::sync::Arc::new(Unreachable("sev-snp")),
        ],
        Default::default(),
    )
    .unwrap();
    assert_eq!(v.method(), MULTI);
    let ctx = AttestationContext {
        agent_public_key: b"key",
        now: SystemTime::now(),
    };
    let mut rng = Rng(4);
    let good = br#"{"parts":[{"method":"tpm","data":"AA=="},{"method":"tpm","data":"AA=="}]}"#;
    for i in 0..5_000 {
        let b = if i % 2 == 0 {
            let len = rng.below(300);
            rng.bytes(len)
        } else {
            let mut m = good.to_vec();
            let pos = rng.below(m.len());
            m[pos] = rng.next() as u8;
            m
        };
        assert!(v.start(&b, &ctx).is_err());
    }
}
