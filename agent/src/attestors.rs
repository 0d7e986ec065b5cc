//! Picks the node attestor the config names.

use super::config::AgentConfig;
use crate::Error;
use ztid_attestor::{join_token::JoinTokenAttestor, multi, sev_snp, tdx, tpm, NodeAttestor};

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
        "tpm" => Box::new(tpm::TpmAttestor::new(&tpm::TpmAttestorConfig {
            tcti: config.tpm_tcti.clone(),
            ek: config.tpm_ek.parse()?,
        })),
        "sev-snp" => Box::new(sev_snp::SnpAttestor::new(&sev_snp::SnpAttestorConfig {
            tsm_root: config.tsm_root.clone(),
            through_svsm_vtpm: config.sev_snp_svsm_vtpm,
        })?),
        "tdx" => Box::new(tdx::TdxAttestor::new(config.tsm_root.clone())?),
        other => return Err(Error::Config(format!("unknown attestor {other:?}"))),
    })
}
