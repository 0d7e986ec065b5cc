//! `tdx` node attestation, node side: quotes from configfs-tsm.

pub use ztid_attestation::tdx::*;
use ztid_attestation::Error;

use crate::tsm::{self, TsmClient};
use crate::NodeAttestor;

/// Agent side: quotes from configfs-tsm.
pub struct TdxAttestor {
    client: TsmClient,
}

impl TdxAttestor {
    /// An attestor reading quotes from the configfs-tsm report directory `tsm_root`.
    pub fn new(tsm_root: std::path::PathBuf) -> Result<Self, Error> {
        Self::with_client(TsmClient::new(tsm_root, TSM_PROVIDER))
    }

    /// An attestor reading quotes through `client`.
    pub fn with_client(client: TsmClient) -> Result<Self, Error> {
        if !client.root().is_dir() {
            return Err(Error::Config(format!(
                "tdx: configfs-tsm report directory {} does not exist (is this a TDX guest with configfs mounted?)",
                client.root().display()
            )));
        }
        Ok(Self { client })
    }
}

impl NodeAttestor for TdxAttestor {
    fn method(&self) -> &'static str {
        METHOD
    }
    fn initial_evidence(&mut self) -> Result<Vec<u8>, Error> {
        Ok(Vec::new())
    }
    fn check_challenge(&self, challenge: &[u8], agent_spki: &[u8]) -> Result<(), Error> {
        tsm::report_data_for_challenge(challenge, agent_spki).map(|_| ())
    }
    fn answer(&mut self, challenge: &[u8], agent_spki: &[u8]) -> Result<Vec<u8>, Error> {
        // Refuses a challenge for another key than the agent's before asking the TDX module.
        let rd = tsm::report_data_for_challenge(challenge, agent_spki)?;
        let rep = self.client.report(&rd)?;
        check_header(&rep.outblob).map_err(|e| Error::Protocol(format!("configfs-tsm: {e}")))?;
        Ok(rep.outblob)
    }
}
