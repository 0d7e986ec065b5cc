//! SEV-SNP verification over the real hardware vectors in `../shared/vectors/snp`
//! (override with `ZTID_VECTORS`), through the library and through
//! `ztid-server evidence verify`. Every time is pinned.

use std::path::{Path, PathBuf};
use std::process::Command;
use ztid_tests::{at, refusal};

use serde_json::Value;
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{
    BadSignature, CollateralUnavailable, Expired, Malformed, PolicyMismatch, Replay, UntrustedChain,
};
use ztid_verifier::sev_snp;

fn vectors() -> PathBuf {
    ztid_tests::vectors("snp")
}

fn read(rel: &str) -> Vec<u8> {
    let p = vectors().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn table(toml_text: &str) -> toml::Table {
    toml::from_str(toml_text).expect("toml")
}

/// One vector: its directory, evidence file, a time inside its window, a time outside
/// and the reason expected there, the policy it needs, and claims to check.
struct Vector {
    dir: &'static str,
    evidence: &'static str,
    inside: &'static str,
    outside: &'static str,
    outside_reason: &'static str,
    config: &'static str,
    claims: &'static [(&'static str, &'static str)],
}

const VECTORS: &[Vector] = &[
    Vector {
        dir: "milan-virtee-sev",
        evidence: "report_milan.hex",
        inside: "2025-06-01T00:00:00Z",
        outside: "2030-04-04T00:00:00Z",
        outside_reason: "VCEK certificate SEV-VCEK expired at 2030-04-03T19:23:43Z (checked at 2030-04-04T00:00:00Z)",
        config: "",
        claims: &[
            ("product", "Milan"),
            ("signing_key", "VCEK"),
            ("report_version", "2"),
            ("measurement", "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"),
            ("report_data", "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd"),
            ("policy", "0x30000"),
            ("vmpl", "0"),
            ("tcb", r#"{"bootloader":3,"microcode":115,"snp":8,"tee":0}"#),
            ("trust_anchor", "ARK-Milan"),
        ],
    },
    Vector {
        dir: "milan-trustee-vcek",
        evidence: "report.bin",
        inside: "2025-06-01T00:00:00Z",
        outside: "2023-01-01T00:00:00Z",
        outside_reason: "VCEK certificate SEV-VCEK is not yet valid at 2023-01-01T00:00:00Z (valid from 2023-01-24T17:58:26Z)",
        config: "",
        claims: &[
            ("product", "Milan"),
            ("measurement", "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c"),
            ("report_data", "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e20000000000000000000000000000000000000000000000000000000000000000"),
            ("policy", "0x3001f"),
            ("guest_svn", "4"),
            ("vmpl", "0"),
        ],
    },
    Vector {
        dir: "milan-trustee-vlek",
        evidence: "report.bin",
        inside: "2025-06-01T00:00:00Z",
        outside: "2025-12-11T00:00:00Z",
        outside_reason: "VLEK certificate SEV-VLEK expired at 2025-12-10T22:14:21Z (checked at 2025-12-11T00:00:00Z)",
        // VMPL 1: only a policy allowing it accepts the report (see vlek_vmpl1_refused_by_default).
        config: "allowed_vmpl = [0, 1]",
        claims: &[
            ("product", "Milan"),
            ("signing_key", "VLEK"),
            ("report_version", "3"),
            ("vmpl", "1"),
            ("measurement", "8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc94e740dbe92c93c4e8c9af857f5ceeb5a493df2a570d7bf0"),
            ("tcb", r#"{"bootloader":4,"microcode":217,"snp":24,"tee":0}"#),
            ("vek_issuer", "SEV-VLEK-Milan"),
        ],
    },
    Vector {
        dir: "genoa-trustee-azure",
        evidence: "report.bin",
        inside: "2026-01-01T00:00:00Z",
        outside: "2032-01-25T00:00:00Z",
        outside_reason: "VCEK certificate SEV-VCEK expired at 2032-01-24T02:21:48Z (checked at 2032-01-25T00:00:00Z)",
        config: "",
        claims: &[
            ("product", "Genoa"),
            ("report_version", "3"),
            ("measurement", "f57dc09a507c6ecd82369bffb600f0003792f4d99bc26e985ec0c266fc34faf3706faf814c9e61065768a6ff917c89ae"),
            ("tcb", r#"{"bootloader":10,"microcode":84,"snp":23,"tee":0}"#),
            ("vmpl", "0"),
        ],
    },
    Vector {
        dir: "turin-microsoft",
        evidence: "report.bin",
        inside: "2026-06-01T00:00:00Z",
        outside: "2026-02-01T00:00:00Z",
        outside_reason: "VCEK certificate SEV-VCEK is not yet valid at 2026-02-01T00:00:00Z (valid from 2026-02-05T01:04:33Z)",
        config: "",
        claims: &[
            ("product", "Turin"),
            ("report_version", "5"),
            ("measurement", "6d6c354511d6f7c6d7504668903dc5bdc066a048b651840d8d03fb85299ebfa142fccf1d1b0baca496841bdf243619d4"),
            ("host_data", "b3452a0ed30f1010bd32740dd1610bc63296ceb0f882f2cac3a3152d651fe7e4"),
            ("report_data", "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"),
            ("tcb", r#"{"bootloader":1,"fmc":1,"microcode":81,"snp":4,"tee":1}"#),
        ],
    },
    Vector {
        dir: "turin-virtee-sev-chain-only",
        evidence: "vcek_turin.der",
        inside: "2026-01-01T00:00:00Z",
        outside: "2031-11-07T00:00:00Z",
        outside_reason: "VCEK certificate SEV-VCEK expired at 2031-11-06T21:14:00Z (checked at 2031-11-07T00:00:00Z)",
        config: "",
        claims: &[
            ("evidence", "certificate"),
            ("product", "Turin"),
            ("signing_key", "VCEK"),
            ("trust_anchor", "ARK-Turin"),
        ],
    },
];

fn check_claims(v: &Vector, claims: &Value) {
    for (k, want) in v.claims {
        let got = &claims[*k];
        if want.starts_with('{') {
            let want: Value = serde_json::from_str(want).unwrap();
            assert_eq!(got, &want, "{}: claim {k}", v.dir);
            continue;
        }
        let got = got
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| got.to_string());
        assert_eq!(&got, want, "{}: claim {k}", v.dir);
    }
}

fn lib_verify(v: &Vector, when: &str, rd: Option<&[u8]>) -> Result<Value, Error> {
    let dir = vectors().join(v.dir);
    sev_snp::verify_offline(
        &read(&format!("{}/{}", v.dir, v.evidence)),
        Some(&dir),
        rd,
        at(when),
        &table(v.config),
    )
}

#[test]
fn every_vector_verifies_inside_its_window_and_expires_outside() {
    for v in VECTORS {
        let claims = lib_verify(v, v.inside, None)
            .unwrap_or_else(|e| panic!("{} must verify at {}: {e}", v.dir, v.inside));
        check_claims(v, &claims);
        let m = refusal(Expired, lib_verify(v, v.outside, None));
        assert_eq!(m, v.outside_reason, "{}", v.dir);
    }
}

#[test]
fn report_data_must_match_all_64_bytes() {
    let v = &VECTORS[0];
    let good = hex::decode("d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd").unwrap();
    lib_verify(v, v.inside, Some(&good)).unwrap();
    let mut bad = good.clone();
    bad[63] ^= 1;
    let m = refusal(Replay, lib_verify(v, v.inside, Some(&bad)));
    assert!(
        m.starts_with("report_data does not match the expected binding"),
        "{m}"
    );
    // Only the first half given: zero-padded, so the second half must be zero: it is not.
    let m = refusal(Replay, lib_verify(v, v.inside, Some(&good[..32])));
    assert!(m.starts_with("report_data does not match"), "{m}");
    // milan-trustee-vcek binds a 32-byte hash followed by zeros.
    let v = &VECTORS[1];
    let rd =
        hex::decode("ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2").unwrap();
    lib_verify(v, v.inside, Some(&rd)).unwrap();
}

#[test]
fn flipped_bytes_in_the_signed_part_are_refused() {
    let v = &VECTORS[0];
    let dir = vectors().join(v.dir);
    let report = hex::decode(
        String::from_utf8(read("milan-virtee-sev/report_milan.hex"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    // virtee flips byte 21 bit 7; 0x90 is in the measurement; 0x183 is a reserved byte
    // inside reported_tcb (the sev crate's own check re-encodes the report and would
    // not notice it); 0x1E8 is the firmware build number.
    for (off, bit) in [
        (21usize, 0x80u8),
        (0x90, 0x01),
        (0x183, 0x01),
        (0x1E8, 0x40),
    ] {
        let mut r = report.clone();
        r[off] ^= bit;
        let m = refusal(
            BadSignature,
            sev_snp::verify_offline(&r, Some(&dir), None, at(v.inside), &table("")),
        );
        assert_eq!(
            m, "report signature does not verify under the VCEK public key",
            "flip at {off:#x}"
        );
    }
    // A reserved byte outside the TCB fields: refused before any signature check.
    let mut r = report.clone();
    r[0x1F8] ^= 1;
    let m = refusal(
        Malformed,
        sev_snp::verify_offline(&r, Some(&dir), None, at(v.inside), &table("")),
    );
    assert_eq!(
        m,
        "malformed SEV-SNP report: Skipped bytes were expected to be zeroed."
    );
}

#[test]
fn vlek_vmpl1_refused_by_default() {
    let v = &VECTORS[2];
    let dir = vectors().join(v.dir);
    let m = refusal(
        PolicyMismatch,
        sev_snp::verify_offline(
            &read("milan-trustee-vlek/report.bin"),
            Some(&dir),
            None,
            at(v.inside),
            &table(""),
        ),
    );
    assert_eq!(m, "report VMPL 1 is not allowed (allowed_vmpl = [0])");
}

#[test]
fn vcek_from_another_products_chain_is_refused() {
    let milan_vcek = read("milan-virtee-sev/vcek_milan.der");
    let genoa_ask = read("roots/genoa_ask_ark_asvk.pem");
    let m = refusal(
        UntrustedChain,
        sev_snp::verify_vek_chain(&milan_vcek, Some(&genoa_ask), at("2025-06-01T00:00:00Z")),
    );
    assert_eq!(
        m,
        "VCEK signature does not verify under SEV-Genoa (ASK pinned under ARK-Genoa)"
    );
    // The same VCEK whose issuer name was edited to claim Genoa: the pinned Genoa ASK
    // is picked by name and its signature check fails, through the full report path.
    let mut forged = milan_vcek.clone();
    let pos = forged
        .windows(9)
        .position(|w| w == b"SEV-Milan")
        .expect("issuer CN");
    forged[pos + 4..pos + 9].copy_from_slice(b"Genoa");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("vcek.der"), &forged).unwrap();
    let m = refusal(
        UntrustedChain,
        sev_snp::verify_offline(
            &read("milan-virtee-sev/report_milan.hex"),
            Some(tmp.path()),
            None,
            at("2025-06-01T00:00:00Z"),
            &table(""),
        ),
    );
    assert_eq!(
        m,
        "VCEK signature does not verify under SEV-Genoa (ASK pinned under ARK-Genoa)"
    );
    // And the right chain passes.
    sev_snp::verify_vek_chain(&milan_vcek, None, at("2025-06-01T00:00:00Z")).unwrap();
}

#[test]
fn vlek_checked_against_the_ask_is_refused() {
    let vlek = read("milan-trustee-vlek/vlek.der");
    let roots = read("roots/milan_ask_ark_asvk.pem");
    let blocks = pem::parse_many(&roots).unwrap();
    let ask = pem::encode(&blocks[0]);
    let asvk = pem::encode(&blocks[2]);
    let when = at("2025-06-01T00:00:00Z");
    let m = refusal(
        UntrustedChain,
        sev_snp::verify_vek_chain(&vlek, Some(ask.as_bytes()), when),
    );
    assert_eq!(
        m,
        "VLEK signature does not verify under SEV-Milan (ASK pinned under ARK-Milan)"
    );
    let ok = sev_snp::verify_vek_chain(&vlek, Some(asvk.as_bytes()), when).unwrap();
    assert_eq!(ok["product"], "Milan");
}

#[test]
fn measurement_outside_the_allow_list_is_refused() {
    let v = &VECTORS[0];
    let cfg = format!("measurements = [\"{}\"]", "00".repeat(48));
    let dir = vectors().join(v.dir);
    let m = refusal(
        PolicyMismatch,
        sev_snp::verify_offline(
            &read("milan-virtee-sev/report_milan.hex"),
            Some(&dir),
            None,
            at(v.inside),
            &table(&cfg),
        ),
    );
    assert_eq!(m, "measurement 7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f is not in the measurements allow-list");
    // Listed: accepted.
    let cfg = "measurements = [\"7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f\"]";
    sev_snp::verify_offline(
        &read("milan-virtee-sev/report_milan.hex"),
        Some(&dir),
        None,
        at(v.inside),
        &table(cfg),
    )
    .unwrap();
    // Turin host_data allow-list and minimum TCB.
    let dir = vectors().join("turin-microsoft");
    let m = refusal(
        PolicyMismatch,
        sev_snp::verify_offline(
            &read("turin-microsoft/report.bin"),
            Some(&dir),
            None,
            at("2026-06-01T00:00:00Z"),
            &table(&format!("host_data = [\"{}\"]", "11".repeat(32))),
        ),
    );
    assert!(m.contains("is not in the host_data allow-list"), "{m}");
    let m = refusal(
        PolicyMismatch,
        sev_snp::verify_offline(
            &read("turin-microsoft/report.bin"),
            Some(&dir),
            None,
            at("2026-06-01T00:00:00Z"),
            &table("[min_tcb.turin]\nfmc = 2"),
        ),
    );
    assert_eq!(
        m,
        "reported TCB fmc 1 is below the minimum 2 for Turin (min_tcb)"
    );
}

#[test]
fn missing_vek_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = refusal(
        CollateralUnavailable,
        sev_snp::verify_offline(
            &read("genoa-trustee-azure/report.bin"),
            Some(tmp.path()),
            None,
            at("2026-01-01T00:00:00Z"),
            &table(""),
        ),
    );
    assert_eq!(m, "the report is signed by a VCEK, but neither the evidence nor the collateral holds a VCEK certificate");
    // A VCEK of another chip: the report signature fails.
    std::fs::write(
        tmp.path().join("vcek.der"),
        read("milan-trustee-vcek/vcek.der"),
    )
    .unwrap();
    let m = refusal(
        BadSignature,
        sev_snp::verify_offline(
            &read("milan-virtee-sev/report_milan.hex"),
            Some(tmp.path()),
            None,
            at("2025-06-01T00:00:00Z"),
            &table(""),
        ),
    );
    assert_eq!(
        m,
        "report signature does not verify under the VCEK public key"
    );
}

#[test]
fn certificate_table_in_the_evidence_replaces_the_collateral_dir() {
    // report ‖ cert table (as the agent sends it), no collateral directory.
    let mut ev = read("genoa-trustee-azure/report.bin");
    let vcek = pem::parse(read("genoa-trustee-azure/vcek.pem")).unwrap();
    ev.extend(sev_snp::encode_cert_table(&[("vcek", vcek.contents())]));
    let c =
        sev_snp::verify_offline(&ev, None, None, at("2026-01-01T00:00:00Z"), &table("")).unwrap();
    assert_eq!(c["product"], "Genoa");
}

// ---- through the CLI ----

fn cli(args: &[&str]) -> (bool, String, String) {
    let bin = ztid_tests::bin("ztid-server");
    let o = Command::new(bin)
        .args(args)
        .output()
        .expect("run ztid-server");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn cli_verify(v: &Vector, when: &str, config: Option<&Path>) -> (bool, String, String) {
    let dir = vectors().join(v.dir);
    let ev = dir.join(v.evidence);
    let mut args = vec![
        "--output".to_string(),
        "json".into(),
        "evidence".into(),
        "verify".into(),
        "--kind".into(),
        "sev-snp".into(),
        "--evidence".into(),
        ev.display().to_string(),
        "--collateral".into(),
        dir.display().to_string(),
        "--at".into(),
        when.into(),
    ];
    if let Some(c) = config {
        args.push("--config".into());
        args.push(c.display().to_string());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    cli(&a)
}

#[test]
fn cli_gives_every_vectors_outcome() {
    let tmp = tempfile::tempdir().unwrap();
    for v in VECTORS {
        let config = (!v.config.is_empty()).then(|| {
            let p = tmp.path().join(format!("{}.toml", v.dir));
            std::fs::write(&p, format!("[attestors.sev_snp]\n{}\n", v.config)).unwrap();
            p
        });
        let (ok, out, err) = cli_verify(v, v.inside, config.as_deref());
        assert!(ok, "{}: {err}", v.dir);
        let claims: Value = serde_json::from_str(out.trim()).expect("JSON claims");
        check_claims(v, &claims);
        let (ok, _, err) = cli_verify(v, v.outside, config.as_deref());
        assert!(!ok, "{} must fail at {}", v.dir, v.outside);
        assert_eq!(
            err.trim(),
            format!("error: attestation refused: {}", v.outside_reason)
        );
    }
    // The VMPL 1 report without the permissive config.
    let (ok, _, err) = cli_verify(&VECTORS[2], VECTORS[2].inside, None);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "error: attestation refused: report VMPL 1 is not allowed (allowed_vmpl = [0])"
    );
    // report_data through the flag.
    let dir = vectors().join("milan-trustee-vcek");
    let ev = dir.join("report.bin").display().to_string();
    let d = dir.display().to_string();
    let base = [
        "evidence",
        "verify",
        "--kind",
        "sev-snp",
        "--evidence",
        &ev,
        "--collateral",
        &d,
        "--at",
        "2025-06-01T00:00:00Z",
        "--report-data",
    ];
    let mut good = base.to_vec();
    good.push("ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2");
    let (ok, out, err) = cli(&good);
    assert!(ok, "{err}");
    assert!(out.starts_with("Evidence verified (sev-snp)."), "{out}");
    let mut bad = base.to_vec();
    bad.push("ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e3");
    let (ok, _, err) = cli(&bad);
    assert!(!ok);
    assert!(
        err.contains("report_data does not match the expected binding"),
        "{err}"
    );
}
