//! Unit tests over the real vectors in `../shared/vectors/snp` (override with `ZTID_VECTORS`).

use super::*;
use std::time::{Duration, UNIX_EPOCH};
use ztid_attestation::RefusalKind;

fn vectors() -> PathBuf {
    let p = std::env::var_os("ZTID_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors"));
    assert!(
        p.join("snp").is_dir(),
        "SEV-SNP test vectors not found at {} (set ZTID_VECTORS to the shared vectors directory)",
        p.display()
    );
    p.join("snp")
}

fn at(rfc: &str) -> SystemTime {
    let t =
        time::OffsetDateTime::parse(rfc, &time::format_description::well_known::Rfc3339).unwrap();
    UNIX_EPOCH + Duration::from_secs(t.unix_timestamp() as u64)
}

fn read(rel: &str) -> Vec<u8> {
    let p = vectors().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The detail of a refusal of `kind`.
fn refusal<T: std::fmt::Debug>(kind: RefusalKind, r: Result<T, Error>) -> String {
    match r {
        Err(Error::Refused(m)) if m.kind == kind => m.detail,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn vek_extensions_parse() {
    let c = AmdCert::from_der(&read("milan-virtee-sev/vcek_milan.der")).unwrap();
    assert_eq!(c.role, certs::Role::Vcek);
    assert_eq!(c.serial, vec![0]);
    assert_eq!(c.hwid.as_ref().unwrap().len(), 64);
    assert_eq!(
        (c.tcb.bootloader, c.tcb.tee, c.tcb.snp, c.tcb.microcode),
        (Some(3), Some(0), Some(8), Some(115))
    );
    let p = pem::parse(read("turin-microsoft/vcek.pem")).unwrap();
    let t = AmdCert::from_der(p.contents()).unwrap();
    assert_eq!(t.hwid.as_ref().unwrap().len(), 8);
    assert_eq!(t.tcb.fmc, Some(1));
    let v = AmdCert::from_der(&read("milan-trustee-vlek/vlek.der")).unwrap();
    assert_eq!(v.role, certs::Role::Vlek);
    assert!(v.hwid.is_none());
    assert_eq!(v.tcb.microcode, Some(217));
}

#[test]
fn debug_policy_is_refused_on_an_authentic_report() {
    // Flipping policy bit 19 breaks the signature, so the policy check is exercised on a
    // parsed report directly.
    let mut raw = tsm::maybe_hex(&read("milan-virtee-sev/report_milan.hex"));
    let rep = report::Report::parse(&raw).unwrap();
    let tcb = rep.reported_tcb(false);
    verify::check_policy(&rep, "Milan", tcb, &Policy::default()).unwrap();
    raw[0x08 + 2] |= 0x08; // bit 19
    let rep = report::Report::parse(&raw).unwrap();
    let m = refusal(
        PolicyMismatch,
        verify::check_policy(&rep, "Milan", tcb, &Policy::default()),
    );
    assert!(m.contains("allows debugging (bit 19)"), "{m}");
}

#[test]
fn policy_checks_each_name_their_rule() {
    let raw = tsm::maybe_hex(&read("milan-virtee-sev/report_milan.hex"));
    let rep = report::Report::parse(&raw).unwrap();
    let tcb = rep.reported_tcb(false);
    let check = |p: Policy| refusal(PolicyMismatch, verify::check_policy(&rep, "Milan", tcb, &p));
    let m = check(Policy {
        allowed_vmpl: vec![1],
        ..Policy::default()
    });
    assert!(m.contains("report VMPL 0 is not allowed"), "{m}");
    let m = check(Policy {
        measurements: vec![vec![0; 48]],
        ..Policy::default()
    });
    assert!(m.contains("is not in the measurements allow-list"), "{m}");
    let m = check(Policy {
        host_data: vec![vec![1; 32]],
        ..Policy::default()
    });
    assert!(m.contains("is not in the host_data allow-list"), "{m}");
    let mut min = BTreeMap::new();
    min.insert(
        "milan".to_string(),
        MinTcb {
            microcode: 116,
            ..MinTcb::default()
        },
    );
    let m = check(Policy {
        min_tcb: min,
        ..Policy::default()
    });
    assert!(
        m.contains("microcode 115 is below the minimum 116 for Milan"),
        "{m}"
    );
    let m = check(Policy {
        min_guest_svn: 1,
        ..Policy::default()
    });
    assert!(m.contains("below min_guest_svn 1"), "{m}");
    let m = check(Policy {
        products: vec!["genoa".into()],
        ..Policy::default()
    });
    assert!(m.contains("product Milan is not allowed"), "{m}");
}

#[test]
fn config_keys() {
    let t: toml::Table = toml::from_str(
        r#"
        allowed_vmpl = [0, 1]
        measurements = ["7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"]
        min_guest_svn = 2
        products = ["Milan"]
        [min_tcb.milan]
        bootloader = 3
        microcode = 115
        "#,
    )
    .unwrap();
    let c = parse_config(&t).unwrap();
    assert_eq!(c.policy.allowed_vmpl, vec![0, 1]);
    assert_eq!(c.policy.min_tcb["milan"].microcode, 115);
    assert_eq!(c.policy.products, vec!["milan"]);
    for bad in [
        "allowed_vmpl = [4]",
        "measurements = [\"abcd\"]",
        "colateral_dir = \"/x\"",
        "[min_tcb.milan]\nucode = 1",
    ] {
        let t: toml::Table = toml::from_str(bad).unwrap();
        assert!(matches!(parse_config(&t), Err(Error::Config(_))), "{bad}");
    }
}

#[test]
fn start_needs_empty_evidence_and_issues_a_bound_challenge() {
    use rcgen::PublicKeyData;
    let v = SnpVerifier::from_config(&toml::Table::new()).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .subject_public_key_info();
    let ctx = AttestationContext {
        agent_public_key: &key,
        now: at("2025-01-01T00:00:00Z"),
    };
    assert!(matches!(v.start(b"x", &ctx), Err(Error::Protocol(_))));
    let (c1, c2) = match (v.start(b"", &ctx).unwrap(), v.start(b"", &ctx).unwrap()) {
        (VerifierStep::Challenge(a, _), VerifierStep::Challenge(b, _)) => (a, b),
        _ => panic!("expected challenges"),
    };
    assert_eq!(c1.len(), 32 + key.len());
    assert_eq!(&c1[32..], &key[..]);
    assert_ne!(c1[..32], c2[..32], "each challenge has a fresh nonce");
}

#[test]
fn an_oversized_certificate_table_is_refused_as_malformed() {
    // A real report and VCEK, followed by a table that repeats the VCEK past the bound.
    let report = tsm::maybe_hex(&read("milan-virtee-sev/report_milan.hex"));
    let vek = read("milan-virtee-sev/vcek_milan.der");
    let rd: [u8; 64] = report[0x50..0x90].try_into().unwrap();
    let v = SnpVerifier::from_config(&toml::Table::new()).unwrap();
    let now = at("2025-06-01T00:00:00Z");
    let evidence = |n: usize| {
        let mut e = report.clone();
        e.extend(encode_cert_table(&vec![("vcek", vek.as_slice()); n]));
        e
    };
    v.verify_evidence(&evidence(collateral::MAX_TABLE_ITEMS), &rd, now)
        .unwrap();
    assert_eq!(
        refusal(
            Malformed,
            v.verify_evidence(&evidence(collateral::MAX_TABLE_ITEMS + 1), &rd, now)
        ),
        "malformed certificate table: more than 16 certificates and CRLs"
    );
}

#[test]
fn cached_vek_chain_still_refuses_tampering() {
    let report = tsm::maybe_hex(&read("milan-virtee-sev/report_milan.hex"));
    let vek = read("milan-virtee-sev/vcek_milan.der");
    let evidence = |report: &[u8], vek: &[u8]| {
        let mut e = report.to_vec();
        e.extend(encode_cert_table(&[("vcek", vek)]));
        e
    };
    let rd: [u8; 64] = report[0x50..0x90].try_into().unwrap();
    let v = SnpVerifier::from_config(&toml::Table::new()).unwrap();
    let now = at("2025-06-01T00:00:00Z");
    // The VCEK is parsed and its chain checked once; the second call finds both cached.
    v.verify_evidence(&evidence(&report, &vek), &rd, now)
        .unwrap();
    v.verify_evidence(&evidence(&report, &vek), &rd, now)
        .unwrap();

    // A flipped bit in the signed report (virtee's own negative test: byte 21, bit 7).
    let mut bad = report.clone();
    bad[21] ^= 0x80;
    refusal(
        RefusalKind::BadSignature,
        v.verify_evidence(&evidence(&bad, &vek), &rd, now),
    );
    // A VCEK whose signature bytes differ: other bytes, so no cache entry applies.
    let mut bad_vek = vek.clone();
    let last = bad_vek.len() - 1;
    bad_vek[last] ^= 1;
    let m = refusal(
        RefusalKind::UntrustedChain,
        v.verify_evidence(&evidence(&report, &bad_vek), &rd, now),
    );
    assert!(m.contains("signature does not verify"), "{m}");
    // The cached VCEK outside its validity (2030-04-03), and report_data not the nonce's.
    let m = refusal(
        RefusalKind::Expired,
        v.verify_evidence(&evidence(&report, &vek), &rd, at("2031-01-01T00:00:00Z")),
    );
    assert!(m.contains("expired at"), "{m}");
    let mut other = rd;
    other[0] ^= 1;
    refusal(
        RefusalKind::Replay,
        v.verify_evidence(&evidence(&report, &vek), &other, now),
    );
    // The report of another chip with this chip's (cached) VCEK.
    let genoa = read("genoa-trustee-azure/report.bin");
    let grd: [u8; 64] = genoa[0x50..0x90].try_into().unwrap();
    assert!(v
        .verify_evidence(&evidence(&genoa, &vek), &grd, now)
        .is_err());
    v.verify_evidence(&evidence(&report, &vek), &rd, now)
        .unwrap();
}

/// A verifier that fetches from a local KDS (`kds_crl = false`, plus `extra` config
/// lines), with the Milan vector's report, VCEK and report_data, and a time they verify at.
fn kds_case(extra: &str) -> KdsCase {
    kds_case_with_crl(false, extra)
}
struct KdsCase {
    kds: crate::fetch::test_server::Server,
    report: Vec<u8>,
    vek: Vec<u8>,
    rd: [u8; 64],
    cache: PathBuf,
    v: SnpVerifier,
    now: SystemTime,
    _tmp: tempfile::TempDir,
}

/// [`kds_case`] with `kds_crl` set to `crl`.
fn kds_case_with_crl(crl: bool, extra: &str) -> KdsCase {
    let kds = crate::fetch::test_server::Server::start();
    let report = tsm::maybe_hex(&read("milan-virtee-sev/report_milan.hex"));
    let vek = read("milan-virtee-sev/vcek_milan.der");
    let rd: [u8; 64] = report[0x50..0x90].try_into().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let cfg: toml::Table = toml::from_str(&format!(
        "kds_fetch = true\nkds_crl = {crl}\nkds_url = {:?}\nkds_cache_dir = {:?}\n{extra}",
        kds.addr,
        cache.display().to_string()
    ))
    .unwrap();
    KdsCase {
        v: SnpVerifier::from_config(&cfg).unwrap(),
        kds,
        report,
        vek,
        rd,
        cache,
        now: at("2025-06-01T00:00:00Z"),
        _tmp: tmp,
    }
}

/// A flood of reports naming bogus chips spends only the open KDS budget: a chip that
/// verified before still gets its VCEK fetched (from the reserve), a repeated bogus chip
/// costs no request, and a never-seen chip is refused naming the spent budget.
#[test]
fn bogus_chip_ids_cannot_starve_a_known_chip() {
    use crate::fetch::{MAX_REQUESTS_PER_MINUTE, NOT_FOUND_MEMORY};
    let KdsCase {
        kds,
        report,
        vek,
        rd,
        cache: _,
        v,
        now,
        _tmp,
    } = kds_case("");
    let mut with_vcek = report.clone();
    with_vcek.extend(encode_cert_table(&[("vcek", &vek)]));

    // The genuine chip verifies once (its VCEK in the host's table: no request).
    v.verify_evidence(&with_vcek, &rd, now).unwrap();
    assert!(kds.requests().is_empty());

    // The flood: made-up chip IDs (a version 2 report: Milan and Genoa are both asked).
    let bogus = |i: u32| {
        let mut r = report.clone();
        r[0x1A0..0x1A4].copy_from_slice(&i.to_be_bytes());
        r
    };
    let mut i = 0;
    let spent = loop {
        let m = refusal(
            RefusalKind::CollateralUnavailable,
            v.verify_evidence(&bogus(i), &rd, now),
        );
        if m.contains("not fetched") {
            break m;
        }
        assert!(m.contains("HTTP 404 Not Found"), "{m}");
        i += 1;
        assert!(
            i as usize <= MAX_REQUESTS_PER_MINUTE,
            "the open budget is bounded"
        );
    };
    assert!(
        spent.ends_with(&format!(
            "not fetched: this verifier already made {MAX_REQUESTS_PER_MINUTE} requests in the last minute"
        )),
        "{spent}"
    );
    assert_eq!(kds.requests().len(), MAX_REQUESTS_PER_MINUTE);

    // A bogus chip seen before costs no request: KDS's "not found" is remembered.
    let m = refusal(
        RefusalKind::CollateralUnavailable,
        v.verify_evidence(&bogus(0), &rd, now),
    );
    assert!(
        m.contains(&format!(
            "answered HTTP 404 0 s ago; not asked again for {} s",
            NOT_FOUND_MEMORY.as_secs()
        )),
        "{m}"
    );
    assert_eq!(kds.requests().len(), MAX_REQUESTS_PER_MINUTE);

    // The known chip needs its VCEK from KDS (as after a TCB update): the reserve serves it.
    let target = format!(
        "/vcek/v1/Milan/{}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115",
        hex::encode(&report[0x1A0..0x1E0])
    );
    kds.serve(&target, vek.clone());
    let node = v.verify_evidence(&report, &rd, now).unwrap();
    assert_eq!(node.method, METHOD);
    assert_eq!(kds.requests().last(), Some(&target));

    // A chip never verified before competes in the spent open budget: refused, naming it.
    let mut unknown = report.clone();
    unknown[0x1A0] ^= 0xff;
    let m = refusal(
        RefusalKind::CollateralUnavailable,
        v.verify_evidence(&unknown, &rd, now),
    );
    assert!(
        m.starts_with("the report is signed by a VCEK that neither the evidence nor the collateral holds, and fetching it from AMD KDS failed: ")
            && m.contains("not fetched: this verifier already made"),
        "{m}"
    );
}

/// KDS's "not found" for a known-good chip is retried after a minute, not an hour: asking
/// for a known chip's next TCB before AMD publishes it must not lock the chip out for an
/// hour after its firmware update.
#[test]
fn a_known_chips_not_found_is_retried_after_a_minute() {
    use crate::fetch::FAILURE_MEMORY;
    let KdsCase {
        kds: _kds,
        report,
        vek,
        rd,
        cache: _,
        v,
        now,
        _tmp,
    } = kds_case("products = [\"Milan\"]");
    let mut with_vcek = report.clone();
    with_vcek.extend(encode_cert_table(&[("vcek", &vek)]));
    v.verify_evidence(&with_vcek, &rd, now).unwrap();
    // The same chip at a TCB KDS does not know (yet): 404, remembered only as a failure.
    let mut next_tcb = report.clone();
    next_tcb[0x180] = next_tcb[0x180].wrapping_add(1);
    let first = refusal(
        RefusalKind::CollateralUnavailable,
        v.verify_evidence(&next_tcb, &rd, now),
    );
    assert!(first.contains("HTTP 404 Not Found"), "{first}");
    let again = refusal(
        RefusalKind::CollateralUnavailable,
        v.verify_evidence(&next_tcb, &rd, now),
    );
    assert!(
        again.contains(&format!(
            "not asked again for {} s",
            FAILURE_MEMORY.as_secs()
        )),
        "{again}"
    );
}

/// A VCEK fetched for a report it did not sign is not kept: KDS serves a genuine VCEK for
/// a real chip at any TCB, so forged reports of a known chip could otherwise fill the
/// cache, one file per made-up TCB.
#[test]
fn a_fetched_vcek_is_cached_only_for_a_report_it_signed() {
    let KdsCase {
        kds,
        report,
        vek,
        rd,
        cache,
        v,
        now,
        _tmp,
    } = kds_case("products = [\"Milan\"]");
    kds.serve(
        &format!(
            "/vcek/v1/Milan/{}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115",
            hex::encode(&report[0x1A0..0x1E0])
        ),
        vek,
    );
    let cached = || {
        std::fs::read_dir(cache.join("Milan"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let mut forged = report.clone();
    forged[0x2A0] ^= 1;
    let m = refusal(
        RefusalKind::BadSignature,
        v.verify_evidence(&forged, &rd, now),
    );
    assert_eq!(
        m,
        "report signature does not verify under the VCEK public key"
    );
    assert_eq!(
        cached(),
        0,
        "nothing on disk for a report the VCEK did not sign"
    );
    // Sent again: refused the same, without a second request (kept in memory).
    assert_eq!(
        refusal(
            RefusalKind::BadSignature,
            v.verify_evidence(&forged, &rd, now)
        ),
        m
    );
    assert_eq!(kds.requests().len(), 1);
    // The genuine report: verified with that VCEK, which is now on disk.
    v.verify_evidence(&report, &rd, now).unwrap();
    assert_eq!(cached(), 1);
    assert_eq!(kds.requests().len(), 1);
}

/// A VCEK whose issuer only looks like AMD's (CN `SEV-Milan`, another DN) makes the CA
/// fetch the cert_chain once: the current chain is cached though it does not fit, and the
/// next such VCEK is refused from the cache, so forged issuers cannot spend the budget
/// that CRL refreshes need.
#[test]
fn forged_issuers_fetch_the_cert_chain_once() {
    use crate::fetch::test_server::Server;
    let kds = Server::start();
    kds.serve(
        "/vcek/v1/Milan/cert_chain",
        read("milan-virtee-sev/cert_chain_milan"),
    );
    let report = tsm::maybe_hex(&read("milan-virtee-sev/report_milan.hex"));
    let rd: [u8; 64] = report[0x50..0x90].try_into().unwrap();
    // The genuine VCEK with one byte of its issuer's locality changed.
    let mut forged = read("milan-virtee-sev/vcek_milan.der");
    let at_locality = forged
        .windows(11)
        .position(|w| w == b"Santa Clara")
        .unwrap();
    forged[at_locality + 10] = b'b';
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let cfg: toml::Table = toml::from_str(&format!(
        "kds_fetch = true\nkds_crl = false\nkds_url = {:?}\nkds_cache_dir = {:?}",
        kds.addr,
        cache.display().to_string()
    ))
    .unwrap();
    let v = SnpVerifier::from_config(&cfg).unwrap();
    let now = at("2025-06-01T00:00:00Z");
    let mut evidence = report.clone();
    evidence.extend(encode_cert_table(&[("vcek", &forged)]));

    let m = refusal(
        RefusalKind::UntrustedChain,
        v.verify_evidence(&evidence, &rd, now),
    );
    assert_eq!(
        m,
        format!(
            "the cert_chain fetched from {}/vcek/v1/Milan/cert_chain fails verification: {0}/vcek/v1/Milan/cert_chain holds no signing key named \"SEV-Milan\"",
            kds.addr
        )
    );
    assert_eq!(kds.requests().len(), 1);
    assert!(cache.join("Milan/vcek-cert_chain.pem").is_file());
    // Again: refused from the cache, without a request.
    let m = refusal(
        RefusalKind::UntrustedChain,
        v.verify_evidence(&evidence, &rd, now),
    );
    assert!(
        m.ends_with("vcek-cert_chain.pem holds no signing key named \"SEV-Milan\""),
        "{m}"
    );
    assert_eq!(kds.requests().len(), 1);
}

/// An ECC P-256 EK `TPMT_PUBLIC` (TCG template attributes) with a fresh point.
fn ecc_ek_public() -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    let k =
        ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::ECDH_P256, &rng).unwrap();
    let point = k.compute_public_key().unwrap();
    let point = point.as_ref();
    let mut t = Vec::new();
    for v in [0x0023u16, 0x000b] {
        t.extend(v.to_be_bytes()); // ECC, nameAlg SHA-256
    }
    t.extend(0x0003_00b2u32.to_be_bytes());
    t.extend(0u16.to_be_bytes()); // authPolicy
    for v in [0x0006u16, 128, 0x0043, 0x0010, 0x0003, 0x0010] {
        t.extend(v.to_be_bytes()); // AES-128-CFB, no scheme, P-256, no KDF
    }
    for c in [&point[1..33], &point[33..65]] {
        t.extend(32u16.to_be_bytes());
        t.extend_from_slice(c);
    }
    t
}

/// The vTPM EK an SVSM manifest names is only as trustworthy as the launch measurement:
/// without a `measurements` allow-list no `vtpm-ek-hash` selector is emitted.
#[test]
fn vtpm_ek_hash_needs_a_measurement_allow_list() {
    let manifest = ecc_ek_public();
    let hash = ztid_attestation::tpm::ek_hash(&manifest).unwrap();
    let open = Policy::default();
    assert_eq!(vtpm_selector(&manifest, 0, &open).unwrap(), None);
    let measured = Policy {
        measurements: vec![vec![0; 48]],
        ..Policy::default()
    };
    assert_eq!(
        vtpm_selector(&manifest, 0, &measured)
            .unwrap()
            .unwrap()
            .to_string(),
        format!("sev-snp:vtpm-ek-hash:{hash}")
    );
    // Still refused: a manifest above VMPL 0, and one that is no EK, allow-list or not.
    for policy in [&open, &measured] {
        assert_eq!(
            refusal(
                RefusalKind::PolicyMismatch,
                vtpm_selector(&manifest, 1, policy)
            ),
            "a report carrying an SVSM vTPM manifest must be made at VMPL 0 (by the SVSM), not VMPL 1"
        );
        assert!(refusal(
            RefusalKind::Malformed,
            vtpm_selector(b"not a TPMT_PUBLIC", 0, policy)
        )
        .starts_with("the SVSM vTPM manifest is not an EK TPMT_PUBLIC"));
    }
}

#[test]
#[ignore = "profiling aid, run in release"]
fn profile_verify_parts() {
    use std::time::Instant;
    fn t(name: &str, n: u32, mut f: impl FnMut()) {
        let s = Instant::now();
        f();
        let first = s.elapsed().as_secs_f64() * 1e6;
        let s = Instant::now();
        for _ in 0..n {
            f();
        }
        println!(
            "{name}: first {first:.1} us, then {:.1} us",
            s.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
    let s = Instant::now();
    let store = TrustStore::builtin().unwrap();
    println!("builtin store: {:.1} us", s.elapsed().as_secs_f64() * 1e6);
    let report = tsm::maybe_hex(&read("milan-virtee-sev/report_milan.hex"));
    let vek = read("milan-virtee-sev/vcek_milan.der");
    let n = 200;
    let mut ev = report.clone();
    ev.extend(encode_cert_table(&[("vcek", &vek)]));
    let rd: [u8; 64] = report[0x50..0x90].try_into().unwrap();
    let v = SnpVerifier::from_config(&toml::Table::new()).unwrap();
    let now = at("2025-06-01T00:00:00Z");
    t("ztid verify_evidence", n, || {
        v.verify_evidence(&ev, &rd, now).unwrap();
    });
    t("AmdCert::from_der vek", n, || {
        AmdCert::from_der(&vek).unwrap();
    });
    t("x509-parser vek", n, || {
        x509_parser::parse_x509_certificate(&vek).unwrap();
    });
    t("sev Certificate::from_der vek", n, || {
        sev::certs::snp::Certificate::from_der(&vek).unwrap();
    });
    t("Report::parse", n, || {
        report::Report::parse(&report).unwrap();
    });
    let c = AmdCert::from_der(&vek).unwrap();
    let r = report::Report::parse(&report).unwrap();
    t("ring P-384 report sig", n, || {
        r.check_signature(&c.public_key, "VCEK").unwrap();
    });
    let ask = &store.intermediates[0].cert;
    let ark = &store.anchors[0].ark;
    let sark = sev::certs::snp::Certificate::from_der(&ark.der).unwrap();
    let sask = sev::certs::snp::Certificate::from_der(&ask.der).unwrap();
    let svek = sev::certs::snp::Certificate::from_der(&vek).unwrap();
    use sev::certs::snp::Verifiable;
    t("sev RSA vek by ask", 20, || {
        (&sask, &svek).verify().unwrap();
    });
    use sev::parser::ByteParser;
    let pr = sev::firmware::guest::AttestationReport::from_bytes(&report).unwrap();
    t("sev p384 report", 20, || {
        (&svek, &pr).verify().unwrap();
    });
    let chain = sev::certs::snp::Chain {
        ca: sev::certs::snp::ca::Chain {
            ark: sark,
            ask: sask,
        },
        vek: svek,
    };
    t("sev full chain+report", 20, || {
        (&chain, &pr).verify().unwrap();
    });
    let _ = ark;
}

/// A DER TLV (lengths below 64 KiB).
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let n = content.len();
    let mut out = vec![tag];
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend([0x81, n as u8]);
    } else {
        out.extend([0x82, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(content);
    out
}

/// A CRL naming ARK-Milan as its issuer, current from 2025-01-01 to 2035-01-01, with a
/// signature no ARK made: what a node can put in its certificate table (for the fetch
/// decision it stands for an older genuine AMD CRL, which a node can send as well).
fn crl_naming_ark_milan() -> Vec<u8> {
    let store = TrustStore::builtin().unwrap();
    let ark = &store
        .anchors
        .iter()
        .find(|a| a.ark.subject_cn == "ARK-Milan")
        .unwrap()
        .ark;
    // sha384WithRSAEncryption, NULL
    let alg = der(
        0x30,
        &[
            &[
                0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c,
            ][..],
            &[0x05, 0x00][..],
        ]
        .concat(),
    );
    let tbs = der(
        0x30,
        &[
            der(0x02, &[1]),
            alg.clone(),
            ark.subject_raw.clone(),
            der(0x17, b"250101000000Z"),
            der(0x17, b"350101000000Z"),
        ]
        .concat(),
    );
    let sig = der(0x03, &[&[0u8][..], &[0x42; 512][..]].concat());
    der(0x30, &[tbs, alg, sig].concat())
}

/// With `kds_crl = true`, only a CRL the CA keeps itself (`collateral_dir`, the KDS cache)
/// makes the fetch of AMD's current CRL unnecessary. A CRL from the chain's ARK in the
/// node's certificate table does not: a node could send an older genuine CRL, still
/// within its nextUpdate, to hide a later revocation of the ASK or ASVK.
#[test]
fn a_node_supplied_crl_does_not_stand_in_for_the_kds_crl() {
    let crl = crl_naming_ark_milan();
    let KdsCase {
        kds,
        report,
        vek,
        rd,
        v,
        now,
        _tmp,
        ..
    } = kds_case_with_crl(true, "");
    let mut evidence = report.clone();
    evidence.extend(encode_cert_table(&[("vcek", &vek), ("crl", &crl)]));
    // The CA asks KDS for the Milan CRL although the table holds one (KDS answers 404 here).
    let m = refusal(
        RefusalKind::CollateralUnavailable,
        v.verify_evidence(&evidence, &rd, now),
    );
    assert!(
        m.starts_with(
            "the collateral holds no CRL from ARK-Milan and fetching it from AMD KDS failed"
        ),
        "{m}"
    );
    assert_eq!(kds.requests(), vec!["/vcek/v1/Milan/crl".to_string()]);

    // A CRL from the operator's collateral_dir does stand in for it (and is checked: this
    // one's signature is not ARK-Milan's), without a request.
    let dir = _tmp.path().join("collateral");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("ark-milan.crl"), &crl).unwrap();
    let KdsCase {
        kds,
        report,
        vek,
        rd,
        v,
        now,
        ..
    } = kds_case_with_crl(
        true,
        &format!("collateral_dir = {:?}", dir.display().to_string()),
    );
    let mut evidence = report.clone();
    evidence.extend(encode_cert_table(&[("vcek", &vek)]));
    let m = refusal(
        RefusalKind::UntrustedChain,
        v.verify_evidence(&evidence, &rd, now),
    );
    assert_eq!(
        m,
        "CRL ark-milan.crl signature does not verify under ARK-Milan"
    );
    assert!(kds.requests().is_empty(), "{:?}", kds.requests());

    // The node's CRLs are still applied besides (here with `kds_crl = false`): this one
    // is refused for its signature.
    let KdsCase {
        kds,
        report,
        vek,
        rd,
        v,
        now,
        ..
    } = kds_case("");
    let mut evidence = report.clone();
    evidence.extend(encode_cert_table(&[("vcek", &vek), ("crl", &crl)]));
    let m = refusal(
        RefusalKind::UntrustedChain,
        v.verify_evidence(&evidence, &rd, now),
    );
    assert_eq!(
        m,
        "CRL cert table CRL entry signature does not verify under ARK-Milan"
    );
    assert!(kds.requests().is_empty(), "{:?}", kds.requests());
}
