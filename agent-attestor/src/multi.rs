//! `multi` node attestation: several hardware methods in one attempt, every one required.
//!
//! A confidential VM with a vTPM can prove two things at once: what was launched (the
//! SEV-SNP report or TDX quote, signed by the CPU vendor's keys) and its TPM's boot
//! state and keys. The agent presents both; the CA runs each method's verifier in step
//! and issues an identity only if all of them pass. One failing factor refuses the whole
//! attempt, with the factor named in the reason.
//!
//! # Binding the factors together
//! Every factor is bound to the same agent key, the one in the CSR: the TPM factor
//! proves the key was made in that TPM (TPM2_Certify by the activated AK), a TEE factor
//! carries a hash of the CA's nonce and that key in its report_data. So an attacker
//! cannot replay or splice evidence from other attempts, and the TEE's report speaks for
//! the very key the TPM holds.
//!
//! That alone does not prove in hardware that the TPM is the TEE guest's own vTPM:
//! report_data is whatever the guest kernel asks for, so a guest running the approved
//! image *with a compromised root* could vouch for the TPM key of another machine.
//!
//! # SVSM vTPM binding (SEV-SNP)
//! Under an SVSM, the agent asks for the report through the SVSM's vTPM service
//! (`--sev-snp-svsm-vtpm`): the SVSM, at VMPL 0 and part of the launch measurement, puts
//! SHA-512(binding ‖ its vTPM EK's `TPMT_PUBLIC`) in report_data, and the SNP verifier
//! reports that EK as `sev-snp:vtpm-ek-hash:…`. With `bind_vtpm = true` (and always when
//! the TPM's EK came without a certificate, `[attestors.tpm] uncertified_ek =
//! "svsm-bound"`), the combination requires it to equal the TPM factor's `tpm:ek-hash`,
//! so the TPM is proven in hardware to be this guest's vTPM. That holds only for reports
//! an SVSM made (a guest without one runs at VMPL 0 and could name any vTPM; a guest
//! kernel under one runs at VMPL 1+), so the server requires the SEV-SNP measurement
//! allow-list and `allowed_vmpl = [0]` with either setting, and the SNP verifier refuses
//! a manifest in a report not made at VMPL 0.
//!
//! # Protocol
//! Each message is a JSON [`Envelope`] of per-method parts. The first message has one
//! part per factor (its initial evidence); each challenge has one part per factor still
//! pending, and the answer one part per challenge. Factors that finish early wait.
//!
//! # Identity and selectors
//! node id = hex SHA-256 of the sorted `method=node id` lines of all factors, so the
//! agent is `spiffe://TD/ztid/agent/multi/<hex>`, distinct from what any single factor
//! would get: entries parented to it are only served after all factors passed.
//! Selectors: every factor's selectors, plus `multi:method:<method>` per factor. A node
//! alias that lists selectors of two methods (say `tpm:ek-hash:…` and
//! `sev-snp:measurement:…`) is therefore only granted to a node that proved both.
//!
//! # Server policy
//! `[attestors.multi] bind_vtpm = true` requires the SVSM vTPM binding above.
//! `[attestors.multi] required = ["tpm", "sev-snp"]` makes the CA refuse any attempt
//! that does not present every listed method together: single-method attempts, join
//! tokens included, are refused. (Agents already attested by a join token keep renewing
//! until they are evicted.)

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::RefusalKind::Malformed;
use crate::{b64, Error, RefusalKind};

/// The method name on the wire.
pub const METHOD: &str = "multi";
/// Most factors in one attempt.
pub const MAX_FACTORS: usize = 4;
/// Largest envelope accepted (TDX quotes with their certificate chain are ~10 KiB).
const MAX_MESSAGE: usize = 256 * 1024;

/// One message of the exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// One part per factor concerned.
    pub parts: Vec<Part>,
}

/// A factor's message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// The factor's method (`tpm`, `sev-snp`, `tdx`).
    pub method: String,
    /// What that method's own protocol says at this step.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
}

/// A refusal of `kind` with this reason.
pub fn refused(kind: RefusalKind, s: impl Into<String>) -> Error {
    Error::refused(kind, s)
}

/// Names the factor in a refusal (its kind stays).
pub fn in_factor(method: &str, e: Error) -> Error {
    match e {
        Error::Refused(r) => Error::refused(r.kind, format!("{method} factor: {}", r.detail)),
        other => other,
    }
}

/// Parses a multi-factor envelope (`what` names it in refusals): at most
/// `MAX_MESSAGE` bytes, JSON, each method at most once.
pub fn parse(bytes: &[u8], what: &str) -> Result<Envelope, Error> {
    if bytes.len() > MAX_MESSAGE {
        return Err(refused(
            Malformed,
            format!("multi-factor {what} is larger than {MAX_MESSAGE} bytes"),
        ));
    }
    let env: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| refused(Malformed, format!("malformed multi-factor {what}: {e}")))?;
    let mut seen = BTreeSet::new();
    for p in &env.parts {
        if !seen.insert(p.method.as_str()) {
            return Err(refused(
                Malformed,
                format!("multi-factor {what} names {} twice", p.method),
            ));
        }
    }
    Ok(env)
}

/// Encodes a multi-factor envelope as JSON.
pub fn encode(env: &Envelope) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(env).map_err(|e| Error::Protocol(e.to_string()))
}

/// Methods that may be combined: hardware evidence only (a join token is a one-time
/// secret, not a property of the machine).
pub fn combinable(method: &str) -> bool {
    matches!(method, "tpm" | "sev-snp" | "tdx")
}

/// Checks a list of factor methods: 2..=MAX_FACTORS, distinct, combinable.
pub fn check_methods<'a>(methods: impl IntoIterator<Item = &'a str>) -> Result<(), Error> {
    let mut seen = BTreeSet::new();
    for m in methods {
        if !combinable(m) {
            return Err(Error::Config(format!(
                "attestor {m:?} cannot be combined (multi-factor takes tpm, sev-snp, tdx)"
            )));
        }
        if !seen.insert(m) {
            return Err(Error::Config(format!("attestor {m:?} is listed twice")));
        }
    }
    if !(2..=MAX_FACTORS).contains(&seen.len()) {
        return Err(Error::Config(format!(
            "multi-factor attestation takes 2 to {MAX_FACTORS} methods"
        )));
    }
    Ok(())
}
