//! The node attestation methods the server accepts beyond join tokens: each is enabled
//! by its `[attestors.*]` table in the config (or the matching `run` flag).

use ztid_agent_attestor::node_attestation::{sev_snp, tdx, tpm, NodeVerifier};

use crate::config::ServerConfig;
use crate::{Error, Result};

/// Verifiers for every configured method.
pub fn configured_verifiers(config: &ServerConfig) -> Result<Vec<Box<dyn NodeVerifier>>> {
    let mut out: Vec<Box<dyn NodeVerifier>> = Vec::new();
    let a = &config.attestors;
    if let Some(t) = &a.tpm {
        out.push(Box::new(
            tpm::TpmVerifier::from_config(t).map_err(Error::from)?,
        ));
    }
    if let Some(t) = &a.sev_snp {
        out.push(Box::new(
            sev_snp::SnpVerifier::from_config(t).map_err(Error::from)?,
        ));
    }
    if let Some(t) = &a.tdx {
        out.push(Box::new(
            tdx::TdxVerifier::from_config(t).map_err(Error::from)?,
        ));
    }
    Ok(out)
}
