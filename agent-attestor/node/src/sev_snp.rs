//! `sev-snp` node attestation, node side: reports from configfs-tsm (optionally through
//! the SVSM's vTPM service), framed as `ztid_attestation::sev_snp` says.

pub use ztid_attestation::sev_snp::*;
use ztid_attestation::Error;

use crate::tsm::{self, TsmClient};
use crate::NodeAttestor;

/// What the SEV-SNP attestor needs to know.
#[derive(Debug, Clone)]
pub struct SnpAttestorConfig {
    /// The configfs-tsm report directory (normally `/sys/kernel/config/tsm/report`).
    pub tsm_root: std::path::PathBuf,
    /// Ask for reports through the SVSM's vTPM service (`--sev-snp-svsm-vtpm`).
    pub through_svsm_vtpm: bool,
}

/// Agent side: reports from configfs-tsm.
pub struct SnpAttestor {
    client: TsmClient,
    through_svsm_vtpm: bool,
}

impl SnpAttestor {
    /// The attestor `config` describes.
    pub fn new(config: &SnpAttestorConfig) -> Result<Self, Error> {
        let client = TsmClient::new(config.tsm_root.clone(), TSM_PROVIDER);
        if config.through_svsm_vtpm {
            Self::through_svsm_vtpm(client)
        } else {
            Self::with_client(client)
        }
    }

    /// An attestor whose reports come from the SVSM's vTPM service: made at VMPL 0 by
    /// the SVSM over SHA-512(report_data ‖ the vTPM EK's `TPMT_PUBLIC`), so the CA learns
    /// in hardware which TPM is this guest's vTPM.
    pub fn through_svsm_vtpm(client: TsmClient) -> Result<Self, Error> {
        let mut a = Self::with_client(client.with_service(tsm::TsmService {
            provider: "svsm".into(),
            guid: SVSM_VTPM_GUID.into(),
            manifest_version: 0,
        }))?;
        a.through_svsm_vtpm = true;
        Ok(a)
    }

    /// An attestor reading reports through `client`.
    pub fn with_client(client: TsmClient) -> Result<Self, Error> {
        if !client.root().is_dir() {
            return Err(Error::Config(format!(
                "sev-snp: configfs-tsm report directory {} does not exist (is this an SEV-SNP guest with configfs mounted?)",
                client.root().display()
            )));
        }
        Ok(Self {
            client,
            through_svsm_vtpm: false,
        })
    }
}

impl NodeAttestor for SnpAttestor {
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
        // Refuses a challenge for another key than the agent's before asking the PSP.
        let rd = tsm::report_data_for_challenge(challenge, agent_spki)?;
        let rep = self.client.report(&rd)?;
        if rep.outblob.len() != REPORT_LEN {
            return Err(Error::Protocol(format!(
                "configfs-tsm returned {} bytes; an SEV-SNP report is {REPORT_LEN}",
                rep.outblob.len()
            )));
        }
        let expected = match (&rep.manifest, self.through_svsm_vtpm) {
            (Some(m), true) if m.len() <= MAX_MANIFEST => svsm_report_data(&rd, m),
            (Some(_), true) => {
                return Err(Error::Protocol(format!(
                    "the SVSM manifest is larger than {MAX_MANIFEST} bytes"
                )))
            }
            _ => rd,
        };
        // report_data sits at 0x50..0x90 (the length was checked above).
        if rep.outblob.get(0x50..0x90) != Some(&expected[..]) {
            return Err(Error::Protocol(
                "configfs-tsm returned a report for other report_data".into(),
            ));
        }
        let mut out = Vec::new();
        if let (Some(m), true) = (&rep.manifest, self.through_svsm_vtpm) {
            out.extend_from_slice(MANIFEST_MAGIC);
            out.extend_from_slice(&(m.len() as u32).to_le_bytes());
            out.extend_from_slice(m);
        }
        out.extend_from_slice(&rep.outblob);
        if let Some(aux) = rep.auxblob {
            out.extend_from_slice(&aux);
        }
        Ok(out)
    }
}
