//! Offline verification of captured evidence (`ztid-server evidence verify --kind tpm`):
//! every check of the live exchange but credential activation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::SystemTime;

use ztid_attestation::tpm::refused;
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::{Malformed, PolicyMismatch, Replay, Unsupported};

use super::{check_keys, quote, selectors_for, EvidenceFile, TpmPolicy, EVIDENCE_FORMAT, METHOD};

/// Verifies captured evidence offline (`ztid-server evidence verify`): the claims as JSON,
/// or the first failed check. `collateral` is a directory of EK CA certificates (default:
/// the config's `ek_ca_dir`); `report_data` is the nonce the quote must carry.
pub fn verify_offline(
    evidence: &[u8],
    collateral: Option<&Path>,
    report_data: Option<&[u8]>,
    at: SystemTime,
    config: &toml::Table,
) -> Result<serde_json::Value, Error> {
    let policy = TpmPolicy::from_table(config, collateral)?;
    let ev: EvidenceFile = serde_json::from_slice(evidence)
        .map_err(|e| refused(Malformed, format!("malformed TPM evidence file: {e}")))?;
    if ev.format != EVIDENCE_FORMAT {
        return Err(refused(
            Unsupported,
            format!(
                "TPM evidence format is {:?}, expected {EVIDENCE_FORMAT:?}",
                ev.format
            ),
        ));
    }
    let nonce =
        hex::decode(&ev.nonce).map_err(|e| refused(Malformed, format!("evidence nonce: {e}")))?;
    if let Some(rd) = report_data {
        if rd != nonce.as_slice() {
            return Err(refused(
                Replay,
                "evidence nonce differs from the expected --report-data",
            ));
        }
    }
    if ev.ek_cert.is_empty() {
        return Err(refused(
            PolicyMismatch,
            "the evidence has no EK certificate: only an SVSM SEV-SNP report can vouch for such an EK, which offline TPM evidence does not carry",
        ));
    }
    let keys = check_keys(&policy, &ev.ek_cert, &ev.ek_pub, &ev.ak_pub, at)?;
    let selection: BTreeSet<u8> = ev.pcrs.keys().copied().collect();
    let q = quote::verify_quote(
        &keys.ak,
        &ev.quote,
        &ev.signature,
        &nonce,
        &selection,
        &ev.pcrs,
    )?;
    let policies = policy.check_pcrs(&keys.node_id, &q.pcrs)?;
    let selectors: Vec<String> = selectors_for(&keys, &q.pcrs)?
        .iter()
        .map(|s| s.to_string())
        .collect();
    Ok(serde_json::json!({
        "method": METHOD,
        "node_id": keys.node_id,
        "agent_path": format!("/ztid/agent/{METHOD}/{}", keys.node_id),
        "ek_issuer": keys.ek_info.issuer,
        "ek_ca_chain": keys.ek_info.chain,
        "manufacturer": keys.ek_info.manufacturer,
        "model": keys.ek_info.model,
        "tpm_version": keys.ek_info.version,
        "ak_name": hex::encode(&keys.ak_name),
        "nonce": ev.nonce,
        "nonce_checked": report_data.is_some(),
        "pcrs": q.pcrs.iter().map(|(k, v)| (k.to_string(), hex::encode(v))).collect::<BTreeMap<_, _>>(),
        "pcr_policies_met": policies,
        "clock_ms": q.attest.clock.clock,
        "reset_count": q.attest.clock.reset_count,
        "restart_count": q.attest.clock.restart_count,
        "firmware_version": format!("{:016x}", q.attest.firmware_version),
        "selectors": selectors,
        "ak_residency": "not proven offline: credential activation needs the CA's live challenge",
    }))
}
