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
