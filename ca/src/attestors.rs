//! The node attestation methods the server accepts beyond join tokens: each is enabled
//! by its `[attestors.*]` table in the config (or the matching `run` flag).

use std::sync::Arc;

use ztid_verifier::{multi, sev_snp, tdx, tpm, NodeVerifier};

use crate::config::ServerConfig;
use crate::{Error, Result};

/// The configured hardware verifiers.
pub struct Verifiers {
    /// One per configured method.
    pub single: Vec<Arc<dyn NodeVerifier>>,
    /// Combining them, when two or more are configured.
    pub multi: Option<Arc<multi::MultiVerifier>>,
}

/// Verifiers for every configured method, and the `multi` verifier combining them when
/// two or more are configured.
pub fn configured_verifiers(config: &ServerConfig) -> Result<Verifiers> {
    let mut out: Vec<Arc<dyn NodeVerifier>> = Vec::new();
    let a = &config.attestors;
    if let Some(t) = &a.tpm {
        out.push(Arc::new(
            tpm::TpmVerifier::from_config(t).map_err(Error::from)?,
        ));
    }
    if let Some(t) = &a.sev_snp {
        out.push(Arc::new(
            sev_snp::SnpVerifier::from_config(t).map_err(Error::from)?,
        ));
    }
    if let Some(t) = &a.tdx {
        out.push(Arc::new(
            tdx::TdxVerifier::from_config(t).map_err(Error::from)?,
        ));
    }
    check_svsm_binding_config(a)?;
    let combined = if out.len() >= 2 {
        Some(Arc::new(
            multi::MultiVerifier::from_config(a.multi.as_ref(), out.clone())
                .map_err(Error::from)?,
        ))
    } else if a.multi.is_some() {
        return Err(Error::Config(
            "[attestors.multi] needs two or more of [attestors.tpm], [attestors.sev_snp], [attestors.tdx]"
                .into(),
        ));
    } else {
        None
    };
    Ok(Verifiers {
        single: out,
        multi: combined,
    })
}

/// The SVSM vTPM binding is only as good as the guarantee that the report came from an
/// SVSM: in a guest without one, the guest kernel runs at VMPL 0 and could name any vTPM.
/// So `bind_vtpm` and `uncertified_ek` require the SEV-SNP measurement allow-list (the
/// operator's SVSM launch measurements) and VMPL 0 reports only.
fn check_svsm_binding_config(a: &crate::config::AttestorsConfig) -> Result<()> {
    let bind = a
        .multi
        .as_ref()
        .and_then(|t| t.get("bind_vtpm"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let uncertified = a
        .tpm
        .as_ref()
        .is_some_and(|t| t.contains_key("uncertified_ek"));
    if !bind && !uncertified {
        return Ok(());
    }
    let measured = a
        .sev_snp
        .as_ref()
        .and_then(|t| t.get("measurements"))
        .and_then(|v| v.as_array())
        .is_some_and(|m| !m.is_empty());
    let what = if bind {
        "[attestors.multi] bind_vtpm"
    } else {
        "[attestors.tpm] uncertified_ek"
    };
    if !measured {
        return Err(Error::Config(format!(
            "{what} trusts SVSM reports, so [attestors.sev_snp] measurements must list the SVSM launch measurements \
             (a guest without an SVSM runs at VMPL 0 and could name any vTPM)"
        )));
    }
    // Under an SVSM the guest kernel runs at VMPL 1 or higher and may ask for reports at
    // its own level with any report_data: only VMPL 0 reports are the SVSM's.
    let vmpl_zero_only = match a.sev_snp.as_ref().and_then(|t| t.get("allowed_vmpl")) {
        None => true,
        Some(v) => v
            .as_array()
            .is_some_and(|l| matches!(l.as_slice(), [only] if only.as_integer() == Some(0))),
    };
    if !vmpl_zero_only {
        return Err(Error::Config(format!(
            "{what} trusts SVSM reports, which are made at VMPL 0: [attestors.sev_snp] allowed_vmpl must be [0] \
             (a guest kernel at VMPL 1+ could otherwise name any vTPM)"
        )));
    }
    Ok(())
}
