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
