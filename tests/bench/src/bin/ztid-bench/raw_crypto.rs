//! (a), the reference: rcgen CSR parse + verify, then an rcgen leaf with the server's
//! template signed by an rcgen issuer, in this process, on one and on two threads.
//! Also makes the CSR pool every node API scenario sends.

use std::time::Duration;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateSigningRequestDer;

use crate::measure::timed_loop;
use crate::{Opts, TD};

fn key_and_csr(spiffe_id: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.to_string().try_into().expect("uri"))];
    params.serialize_request(&key).expect("csr").der().to_vec()
}

/// `n` P-256 CSRs for `prefix/<instance>`, made in advance so key generation is not timed.
pub fn csr_pool(n: usize, prefix: &str) -> Vec<Vec<u8>> {
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

pub struct Raw {
    /// CSR parse+verify+sign per second, one thread.
    pub rate1: f64,
    /// Same with two threads (the whole machine).
    pub rate2: f64,
    /// µs per op, one thread.
    pub us_total: f64,
    pub us_verify: f64,
    pub us_sign: f64,
    pub leaf_bytes: usize,
}

pub fn raw_crypto(opts: &Opts, csrs: &[Vec<u8>]) -> Raw {
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
