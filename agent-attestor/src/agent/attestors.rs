//! Picks the node attestor the config names.

use super::config::AgentConfig;
use crate::node_attestation::{
    join_token::JoinTokenAttestor, multi, sev_snp, tdx, tpm, NodeAttestor,
};
use crate::Error;

/// The attestor for `config.attestor`: one method, or several separated by commas
/// (`tpm,sev-snp`), which attest together ([`multi`]).
pub fn build(config: &AgentConfig) -> Result<Box<dyn NodeAttestor>, Error> {
    if config.attestor.contains(',') {
        let factors = config
            .attestor
            .split(',')
            .map(|m| single(config, m.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Box::new(multi::MultiAttestor::new(factors)?));
    }
    single(config, &config.attestor)
}

fn single(config: &AgentConfig, method: &str) -> Result<Box<dyn NodeAttestor>, Error> {
    Ok(match method {
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
