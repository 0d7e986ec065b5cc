//! Picks the node attestor the config names.

use super::config::AgentConfig;
use crate::node_attestation::{join_token::JoinTokenAttestor, sev_snp, tdx, tpm, NodeAttestor};
use crate::Error;

/// The attestor for `config.attestor`.
pub fn build(config: &AgentConfig) -> Result<Box<dyn NodeAttestor>, Error> {
    Ok(match config.attestor.as_str() {
        "join-token" => Box::new(JoinTokenAttestor::new(
            config
                .join_token
                .clone()
                .ok_or_else(|| Error::Config("--join-token is required".into()))?,
        )),
        "tpm" => Box::new(tpm::TpmAttestor::new(config)?),
        "sev-snp" => Box::new(sev_snp::SnpAttestor::new(config)?),
        "tdx" => Box::new(tdx::TdxAttestor::new(config)?),
        other => return Err(Error::Config(format!("unknown attestor {other:?}"))),
    })
}
