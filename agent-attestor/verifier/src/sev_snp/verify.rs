//! The SEV-SNP checks, in order: report shape, VEK chain to a pinned ARK (with dates),
//! report signature, CPUID product, reported TCB against the VEK, chip ID against the
//! VCEK hwID, AMD CRLs, report_data binding, then the operator's policy.

use std::collections::BTreeMap;

use ring::digest;

use crate::Error;
use ztid_attestation::RefusalKind::{
    self, CollateralUnavailable, KeyMismatch, Malformed, PolicyMismatch,
};

use super::certs::{rfc3339, AmdCert, Role, Source, TrustStore};
use super::collateral::Collateral;
use super::report::{product_of_cpuid, turin_layout, Report, SigningKey, Tcb, POLICY_DEBUG};
use crate::tsm;

/// Minimum TCB for one product; absent components are 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MinTcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    pub fmc: u8,
}

/// The operator's policy (see the module docs for the TOML keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    pub allowed_vmpl: Vec<u32>,
    pub measurements: Vec<Vec<u8>>,
    pub host_data: Vec<Vec<u8>>,
    pub min_tcb: BTreeMap<String, MinTcb>,
    pub min_guest_svn: u32,
    pub products: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allowed_vmpl: vec![0],
            measurements: Vec::new(),
            host_data: Vec::new(),
            min_tcb: BTreeMap::new(),
            min_guest_svn: 0,
            products: Vec::new(),
        }
    }
}

/// A report that passed every check.
pub(crate) struct Verified {
    /// The claims (`ztid-server evidence verify`); `Null` unless asked for.
    pub claims: serde_json::Value,
    pub node_id: String,
    pub measurement: [u8; 48],
    pub policy: u64,
    pub host_data: [u8; 32],
    /// The chip ID the VCEK certifies (64 bytes, 8 on Turin); none for a VLEK.
    pub chip_id: Option<Vec<u8>>,
    /// The VMPL the report was made at.
    pub vmpl: u32,
}

fn refuse(kind: RefusalKind, m: impl Into<String>) -> Error {
    Error::refused(kind, m)
}

pub(crate) fn hwid_matches(hwid: &[u8], chip_id: &[u8; 64]) -> bool {
    match hwid.len() {
        64 => hwid == chip_id,
        8 => hwid == &chip_id[..8],
        _ => false,
    }
}

/// The VEK that should have signed a report: the VCEK whose hwID matches `chip_id` (else
/// the first VCEK), or the first VLEK; with its label.
pub(crate) fn select_vek<'c>(
    collateral: &'c Collateral,
    chip_id: &[u8; 64],
    key: SigningKey,
) -> Result<(&'c AmdCert, &'static str), Error> {
    let (want, label) = match key {
        SigningKey::Vcek => (Role::Vcek, "VCEK"),
        SigningKey::Vlek => (Role::Vlek, "VLEK"),
    };
    let veks: Vec<&AmdCert> = collateral.certs.iter().filter(|c| c.role == want).collect();
    let vek = match key {
        SigningKey::Vcek => veks
            .iter()
            .find(|c| c.hwid.as_deref().is_some_and(|h| hwid_matches(h, chip_id)))
            .or(veks.first()),
        SigningKey::Vlek => veks.first(),
    }
    .copied()
    .ok_or_else(|| {
        refuse(CollateralUnavailable, format!(
            "the report is signed by a {label}, but neither the evidence nor the collateral holds a {label} certificate"
        ))
    })?;
    Ok((vek, label))
}

/// The ASKs and ASVKs in `collateral`.
pub(crate) fn signing_keys(collateral: &Collateral) -> Vec<AmdCert> {
    collateral
        .certs
        .iter()
        .filter(|c| matches!(c.role, Role::Ask(_) | Role::Asvk(_)))
        .cloned()
        .collect()
}

/// Verifies one report with the certificates and CRLs in `collateral` at `at` (Unix
/// seconds); `expected_report_data`, when given, must equal all 64 bytes of report_data.
/// The claims are built only `with_claims`.
pub(crate) fn verify(
    store: &TrustStore,
    raw: &[u8],
    collateral: &Collateral,
    at: i64,
    expected_report_data: Option<&[u8; 64]>,
    policy: &Policy,
    with_claims: bool,
) -> Result<Verified, Error> {
    let report = Report::parse(raw)?;
    let r = &report.parsed;
    let key = report.signing_key()?;
    let (vek, label) = select_vek(collateral, &r.chip_id, key)?;
    let intermediates = signing_keys(collateral);
    let chain = store.check_vek(vek, &intermediates, at)?;
    report.check_signature(&vek.public_key, label)?;

    if let (Some(f), Some(m)) = (r.cpuid_fam_id, r.cpuid_mod_id) {
        if let Some(p) = product_of_cpuid(f, m) {
            if turin_layout(p) != turin_layout(&chain.product)
                || (["Milan", "Genoa", "Turin", "Venice"].contains(&chain.product.as_str())
                    && p != chain.product)
            {
                return Err(refuse(KeyMismatch, format!(
                    "report CPUID family {f:#x} model {m:#x} is a {p} processor, but the {label} is for {}",
                    chain.product
                )));
            }
        }
    }
    let turin = turin_layout(&chain.product);
    let reported = report.reported_tcb(turin);
    let certified = vek.certified_tcb(turin)?;
    if reported != certified {
        return Err(refuse(
            KeyMismatch,
            format!(
            "reported TCB ({reported}) differs from the TCB the {label} certifies ({certified})"
        ),
        ));
    }
    let chip_id = match key {
        SigningKey::Vcek => {
            let hw = vek
                .hwid
                .as_deref()
                .ok_or_else(|| refuse(Malformed, "VCEK certificate lacks the hwID extension"))?;
            if !hwid_matches(hw, &r.chip_id) {
                return Err(refuse(
                    KeyMismatch,
                    format!(
                        "report chip_id {} does not match the VCEK hwID {}",
                        hex::encode(r.chip_id.get(..hw.len()).unwrap_or(&r.chip_id[..])),
                        hex::encode(hw)
                    ),
                ));
            }
            Some(hw.to_vec())
        }
        SigningKey::Vlek => None,
    };
    let crl_checked = store.check_crls(&collateral.crls, &chain, at)?;
    if let Some(expected) = expected_report_data {
        tsm::check_report_data(&r.report_data, expected)?;
    }
    check_policy(&report, &chain.product, reported, policy)?;

    #[allow(clippy::indexing_slicing, reason = "a SHA-256 digest is 32 bytes")]
    let node_id = {
        let mut c = digest::Context::new(&digest::SHA256);
        c.update(b"ztid/sev-snp/node-id/v1");
        c.update(&r.chip_id);
        c.update(&r.report_id);
        hex::encode(&c.finish().as_ref()[..16])
    };
    if !with_claims {
        return Ok(Verified {
            claims: serde_json::Value::Null,
            node_id,
            measurement: r.measurement,
            policy: report.policy(),
            host_data: r.host_data,
            chip_id,
            vmpl: r.vmpl,
        });
    }
    let anchor = match chain.anchor.source {
        Source::Amd => chain.anchor.ark.subject_cn.clone(),
        Source::Test => format!("{} (test root)", chain.anchor.ark.subject_cn),
    };
    let mut claims = serde_json::json!({
        "product": chain.product,
        "report_version": r.version,
        "signing_key": label,
        "measurement": hex::encode(r.measurement),
        "report_data": hex::encode(r.report_data),
        "host_data": hex::encode(r.host_data),
        "chip_id": hex::encode(r.chip_id),
        "vmpl": r.vmpl,
        "policy": format!("{:#x}", report.policy()),
        "debug": report.policy() & POLICY_DEBUG != 0,
        "guest_svn": r.guest_svn,
        "tcb": reported.to_json(),
        "current_tcb": report.current_tcb(turin).to_json(),
        "committed_tcb": report.committed_tcb(turin).to_json(),
        "launch_tcb": report.launch_tcb(turin).to_json(),
        "report_id": hex::encode(r.report_id),
        "family_id": hex::encode(r.family_id),
        "image_id": hex::encode(r.image_id),
        "id_key_digest": hex::encode(r.id_key_digest),
        "author_key_digest": hex::encode(r.author_key_digest),
        "platform_info": format!("{:#x}", u64::from(r.plat_info)),
        "vek_issuer": vek.issuer_cn,
        "vek_not_before": rfc3339(vek.not_before),
        "vek_not_after": rfc3339(vek.not_after),
        "trust_anchor": anchor,
        "crl_checked": crl_checked,
        "node_id": node_id,
    });
    if let (Some(f), Some(m), Some(s), Some(obj)) = (
        r.cpuid_fam_id,
        r.cpuid_mod_id,
        r.cpuid_step,
        claims.as_object_mut(),
    ) {
        obj.insert(
            "cpuid".into(),
            serde_json::json!({"family": f, "model": m, "stepping": s}),
        );
    }
    if let (Some(p), Some(obj)) = (&vek.product_name, claims.as_object_mut()) {
        obj.insert("vek_product_name".into(), p.clone().into());
    }
    Ok(Verified {
        claims,
        node_id,
        measurement: r.measurement,
        policy: report.policy(),
        host_data: r.host_data,
        chip_id,
        vmpl: r.vmpl,
    })
}

/// The operator's policy over an authenticated report.
pub(crate) fn check_policy(
    report: &Report<'_>,
    product: &str,
    reported: Tcb,
    policy: &Policy,
) -> Result<(), Error> {
    let r = &report.parsed;
    if report.policy() & POLICY_DEBUG != 0 {
        return Err(refuse(PolicyMismatch, format!(
            "guest policy {:#x} allows debugging (bit 19): the host can read and change guest memory",
            report.policy()
        )));
    }
    if !policy.allowed_vmpl.contains(&r.vmpl) {
        return Err(refuse(
            PolicyMismatch,
            format!(
                "report VMPL {} is not allowed (allowed_vmpl = {:?})",
                r.vmpl, policy.allowed_vmpl
            ),
        ));
    }
    if !policy.products.is_empty()
        && !policy
            .products
            .iter()
            .any(|p| p.eq_ignore_ascii_case(product))
    {
        return Err(refuse(
            PolicyMismatch,
            format!(
                "product {product} is not allowed (products = {:?})",
                policy.products
            ),
        ));
    }
    if !policy.measurements.is_empty()
        && !policy
            .measurements
            .iter()
            .any(|m| m[..] == r.measurement[..])
    {
        return Err(refuse(
            PolicyMismatch,
            format!(
                "measurement {} is not in the measurements allow-list",
                hex::encode(r.measurement)
            ),
        ));
    }
    if !policy.host_data.is_empty() && !policy.host_data.iter().any(|h| h[..] == r.host_data[..]) {
        return Err(refuse(
            PolicyMismatch,
            format!(
                "host_data {} is not in the host_data allow-list",
                hex::encode(r.host_data)
            ),
        ));
    }
    if let Some(min) = policy.min_tcb.get(&product.to_ascii_lowercase()) {
        let checks = [
            ("bootloader", reported.bootloader, min.bootloader),
            ("tee", reported.tee, min.tee),
            ("snp", reported.snp, min.snp),
            ("microcode", reported.microcode, min.microcode),
            ("fmc", reported.fmc.unwrap_or(0), min.fmc),
        ];
        for (name, have, need) in checks {
            if have < need {
                return Err(refuse(
                    PolicyMismatch,
                    format!(
                    "reported TCB {name} {have} is below the minimum {need} for {product} (min_tcb)"
                ),
                ));
            }
        }
    }
    if r.guest_svn < policy.min_guest_svn {
        return Err(refuse(
            PolicyMismatch,
            format!(
                "guest SVN {} is below min_guest_svn {}",
                r.guest_svn, policy.min_guest_svn
            ),
        ));
    }
    Ok(())
}

/// Checks a VCEK or VLEK certificate alone (no report): chain, dates, and what it certifies.
pub(crate) fn verify_vek_only(
    store: &TrustStore,
    vek: &AmdCert,
    collateral: &Collateral,
    at: i64,
) -> Result<serde_json::Value, Error> {
    let intermediates: Vec<AmdCert> = collateral
        .certs
        .iter()
        .filter(|c| matches!(c.role, Role::Ask(_) | Role::Asvk(_)))
        .cloned()
        .collect();
    let chain = store.check_vek(vek, &intermediates, at)?;
    let turin = turin_layout(&chain.product);
    let tcb = vek.certified_tcb(turin)?;
    let crl_checked = store.check_crls(&collateral.crls, &chain, at)?;
    let mut claims = serde_json::json!({
        "evidence": "certificate",
        "product": chain.product,
        "signing_key": vek.role.label(),
        "tcb": tcb.to_json(),
        "vek_issuer": vek.issuer_cn,
        "vek_not_before": rfc3339(vek.not_before),
        "vek_not_after": rfc3339(vek.not_after),
        "trust_anchor": chain.anchor.ark.subject_cn,
        "crl_checked": crl_checked,
    });
    if let (Some(h), Some(obj)) = (&vek.hwid, claims.as_object_mut()) {
        obj.insert("hwid".into(), hex::encode(h).into());
    }
    if let (Some(p), Some(obj)) = (&vek.product_name, claims.as_object_mut()) {
        obj.insert("vek_product_name".into(), p.clone().into());
    }
    Ok(claims)
}
